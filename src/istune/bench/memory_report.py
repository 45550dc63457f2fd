"""Tables of ``istune bench memory`` (:mod:`istune.bench.memory_table`): markdown from its result dict."""

from __future__ import annotations

from typing import Any

from istune.bench.records import markdown_table
from istune.planning.rows import METHOD_LABELS, ROWS, Row
from istune.planning.shapes import SHAPES
from istune.planning.tracker import CATEGORIES

GB = 1e9  # tables are in GB (10^9 bytes); the JSON holds bytes
# The rows, in table order; the first table shows MAIN_KEYS, the second the rest.
VARIANTS: tuple[Row, ...] = tuple(ROWS[key] for key in (
    "full", "full+ist", "series", "series+ist", "parallel", "parallel+ist", "lora", "lora+ist", "lisa",
    "lora+ist+recompute", "lora+ist:drop", "lora+ist+recompute:drop", "lora+gc", "lora+ist+gc", "full+ist:drop",
    "full+ist+recompute:drop"))
MAIN_KEYS = ("full", "full+ist", "series", "series+ist", "parallel", "parallel+ist", "lora", "lora+ist", "lisa")


def gb(n: float) -> str:
    return f"{n / GB:.2f}"


def _ratio(runs: dict[str, dict], key: str) -> float | None:
    run = runs.get(key)
    base = runs.get(run["baseline"]) if run and run["baseline"] else None
    return run["peak_bytes"] / base["peak_bytes"] if base else None


def _table(head: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    return markdown_table(head, rows, align).splitlines()


def _label(key: str) -> str:
    return next(v.label for v in VARIANTS if v.key == key)


def _baseline(key: str) -> str | None:
    return next(v.baseline for v in VARIANTS if v.key == key)


def main_table(runs: dict[str, dict[str, dict]]) -> list[str]:
    """The paper's layout: a row per shape; each method without and with IST, and their ratio (worst-case peaks)."""
    keys = [k for k in MAIN_KEYS if any(k in by_key for by_key in runs.values())]
    head = ["shape", "base weights"]
    for key in keys:
        head.append(_label(key))
        if _baseline(key) in keys:
            head.append("ratio" if key.startswith(_baseline(key)) else f"/ {_label(_baseline(key))}")
    rows = []
    for shape, by_key in runs.items():
        cells = [shape, gb(next(iter(by_key.values()))["base_weight_bytes"])]
        for key in keys:
            cells.append(gb(by_key[key]["peak_bytes"]) if key in by_key else "")
            if _baseline(key) in keys:
                ratio = _ratio(by_key, key)
                cells.append(f"{ratio:.2f}" if ratio is not None else "")
        rows.append(cells)
    return _table(head, rows)


def extras_table(runs: dict[str, dict[str, dict]]) -> list[str]:
    """The rows with further IST options: worst-case peak and ratio to the plain method, a column pair per row."""
    keys = [v.key for v in VARIANTS if v.key not in MAIN_KEYS and any(v.key in r for r in runs.values())]
    if not keys:
        return []
    rows = [[shape] + [cell for key in keys for cell in (gb(by_key[key]["peak_bytes"]) if key in by_key else "",
                                                          f"{_ratio(by_key, key):.2f}" if _ratio(by_key, key) else "")]
            for shape, by_key in runs.items()]
    return _table(["shape"] + [c for key in keys for c in (_label(key), "ratio")], rows)


def attention_table(runs: dict[str, dict[str, dict]], attention: str, extras: list[str]) -> list[str]:
    """Every row's worst-case peak with the table's attention and, beside it, with each extra attention."""
    head = ["shape", "row", f"{attention} GB", "ratio"]
    for extra in extras:
        head += [f"{extra} GB", "ratio", f"{extra} / {attention}"]
    rows = []
    for shape, by_key in runs.items():
        for run in by_key.values():
            base = by_key.get(run["baseline"])
            cells = [shape, run["label"], gb(run["peak_bytes"]),
                     f"{run['peak_bytes'] / base['peak_bytes']:.2f}" if base else ""]
            for extra in extras:
                peak = run["extra_attention"][extra]["peak_bytes"]
                base_peak = base["extra_attention"][extra]["peak_bytes"] if base else None
                cells += [gb(peak), f"{peak / base_peak:.2f}" if base else "", f"{peak / run['peak_bytes']:.2f}"]
            rows.append(cells)
    return _table(head, rows, "ll" + "r" * (len(head) - 2))


def steps_table(runs: dict[str, dict[str, dict]]) -> list[str]:
    """Sparse rows: worst-case and mean step peaks (ratio to the plain method) and every step's selection."""
    rows = []
    for by_key in runs.values():
        for run in by_key.values():
            if run["ist_config"] is None:
                continue
            base = by_key.get(run["baseline"])

            def ratio(n: float, base=base) -> str:
                return f"{n / base['peak_bytes']:.2f}" if base else ""

            selections = "; ".join(",".join(map(str, s["selected"])) + ("*" if s["step"] == run["worst_step"] else "")
                                   for s in run["steps"])
            rows.append([run["shape"], run["label"], f"{run['update_layers']} of {run['num_layers']}",
                         gb(run["peak_bytes"]), ratio(run["peak_bytes"]), gb(run["mean_step_peak_bytes"]),
                         ratio(run["mean_step_peak_bytes"]), selections])
    return _table(["shape", "row", "N_u of N_L", "worst step GB", "ratio", "mean step GB", "ratio",
                   "layers selected per step (worst step marked *)"], rows, "llrrrrrl")


def breakdown_table(runs: dict[str, dict[str, dict]]) -> list[str]:
    """What the (worst-case) peak of every run is made of."""
    rows = [[run["shape"], run["label"], gb(run["peak_bytes"]), run["peak_phase"],
             *(gb(run["peak_breakdown"][c]) for c in CATEGORIES), f"{run['params_trainable'] / 1e6:.1f}",
             f"{run['params_trained_worst_step'] / 1e6:.1f}"] for by_key in runs.values() for run in by_key.values()]
    return _table(["shape", "row", "peak GB", "phase", *CATEGORIES, "trainable params (M)",
                   "trained at the peak step (M)"], rows, "llrl" + "r" * (len(CATEGORIES) + 2))


def paper_table(runs: dict[str, dict[str, dict]]) -> list[str]:
    """The paper's Table 1 (GB) and its IST/plain ratios beside the ratios measured here."""
    shown = [s for s in runs if SHAPES[s].paper]
    if not shown:
        return []
    methods = [m for m in ("series", "parallel", "lora") if any(f"{m}+ist" in runs[s] for s in shown)]
    rows = []
    for shape in shown:
        paper = SHAPES[shape].paper
        cells = [shape, f"{paper['weights']} / {'OOM' if paper['full'] is None else paper['full']}"]
        cells += [f"{paper[m]} → {paper[m + '+ist']} ({paper[m + '+ist'] / paper[m]:.2f})" for m in methods]
        cells += [f"{_ratio(runs[shape], m + '+ist'):.2f}" if f"{m}+ist" in runs[shape] else "" for m in methods]
        rows.append(cells)
    return _table(["shape", "paper: weights / Full GB"]
                  + [f"paper {METHOD_LABELS[m]} → +IST GB (ratio)" for m in methods]
                  + [f"here {METHOD_LABELS[m]} ratio" for m in methods], rows)


def check_table(records: list[dict]) -> list[str]:
    rows = [[r["shape"], r.get("attention", "eager") + (", attention dropout off" if r.get("attention_dropout_off")
                                                        else ""),
             f"{r['label']} ({r['device']})", r["measured_peak_bytes"], r["meta_peak_bytes"],
             f"{r['relative_difference']:.2e}", f"{r['measured_mean_step_peak_bytes']:.0f}",
             f"{r['meta_mean_step_peak_bytes']:.0f}", f"{r['relative_difference_mean']:.2e}",
             "yes" if r["agrees"] else "NO"] for r in records]
    return _table(["shape", "attention", "row", "measured peak (bytes)", "meta peak (bytes)", "difference",
                   "measured mean step", "meta mean step", "difference", "within 0.1 percent"], rows, "lll" + "r" * 7)


def markdown(result: dict[str, Any]) -> str:
    meta, runs, settings = result["meta"], result["runs"], result["meta"]["settings"]
    n_steps = settings["steps"]
    other_attentions = list(settings.get("extra_attentions", []))
    attention = f"{settings['attention']} attention"
    if settings["attention"] == "sdpa" and meta["device"] == "meta":
        attention += " (on the meta device as a GPU's kernels keep it: `istune.planning.kernels`)"
    if other_attentions:
        attention += f"; every row measured with {' and '.join(other_attentions)} attention too (its own column)"
    lines = [
        "# Peak training memory per model shape and method, with and without IST"
        + (f" on a {settings['quantize']} base (QLoRA)" if settings.get("quantize", "none") != "none"
           else " (paper Table 1)"),
        "",
        f"Command (from the repository root): `{meta['command']}`",
        "",
        f"- date: {meta['date']}; commit: {meta['commit']}; machine: {meta['machine']}; torch "
        f"{meta['versions']['torch']}, transformers {meta['versions']['transformers']}, "
        f"peft {meta['versions']['peft']}",
        f"- device: {meta['device']} (meta: tensors with shapes and no data; the tracker counts the same storages "
        "as on a real device, without allocating them)",
        f"- setting: random weights, {settings['dtype']}, batch {settings['batch_size']} × {settings['seq_len']} "
        f"tokens, {attention}, dropout as configured (train mode), AdamW "
        f"({settings['optimizer_impl']}); LoRA r={settings['rank']} (alpha {2 * settings['rank']}, on q/k/v/up/down "
        f"for LLaMA, every linear layer for GPT-2); series/parallel bottleneck {settings['bottleneck_size']} (the "
        "paper's Table 9 placement); IST N_u = 25 percent of the layers; LISA: "
        f"{settings['lisa_layers']} layers{' + embeddings and LM head' if settings['lisa_embeddings'] else ''}",
        *([f"- base model quantized: {settings['quantize']} nf4 (bitsandbytes, QLoRA): every linear layer of the "
           "decoder layers; embeddings and LM head in the dtype above"] if settings.get("quantize", "none") != "none"
          else []),
        f"- each run: one unmeasured warm-up step training every layer (LISA: none); sparse rows then one "
        f"unmeasured step of their own; then {n_steps} measured steps",
        "- shapes: " + "; ".join(f"`{name}`: {SHAPES[name].description}" for name in runs),
        "- memory: peak of live tensor storage bytes (`istune.bench.MemoryTracker`), GB = 10^9 bytes. Not "
        "included: the CUDA context, allocator rounding and fragmentation, kernels' workspaces; a GPU's "
        "`max_memory_allocated` is somewhat higher, `nvidia-smi` higher still.",
        "",
        f"## Peak memory (GB), {settings['attention']} attention; IST: the worst-case step",
        "",
        *main_table(runs),
        "",
        "`base weights`: the frozen model alone. `ratio`: the column before it over the plain method "
        "(LISA: over Full). IST's peak is its worst measured step; the measured steps include one whose selection "
        "holds layer 0 (every layer above the lowest selected one keeps its activations for the backward pass), "
        "which any run of more than a few steps meets.",
    ]
    extras = extras_table(runs)
    if extras:
        lines += ["", "## Further IST options (GB; ratio to the plain method)", "", *extras]
    if other_attentions:
        lines += ["", f"## {settings['attention']} and {' and '.join(other_attentions)} attention, every row (GB; "
                  "ratio to the plain method)", "", *attention_table(runs, settings["attention"], other_attentions)]
    if meta["skipped_variants"]:
        lines += ["", "Skipped (this ISTConfig has no such option): " + ", ".join(meta["skipped_variants"]) + "."]
    lines += ["", "## Sparse rows: worst-case and mean step", "", *steps_table(runs), "",
              "Draws are seeded (the seed is the first at or after `--seed` whose steps include layer 0); at zero "
              "importance IST draws uniformly. The mean over so few steps depends on the draws; the expected step "
              "over a long run lies between the mean and the worst case.",
              "", "## Where the peak goes (GB)", "", *breakdown_table(runs)]
    paper = paper_table(runs)
    if paper:
        lines += ["", "## The paper's Table 1 beside these ratios", "", *paper, "",
                  "The paper measured GPU memory with 16-bit weights (its weights column: 2 bytes per parameter) "
                  "on Alpaca prompts of up to 1024 tokens; the absolute figures differ with the dtype, compare the "
                  "ratios."]
    if result["check"]:
        lines += ["", "## Meta device against a measured run", "", *check_table(result["check"]), "",
                  f"Small shapes at {meta['check_seq_len']} tokens, every row and attention, on both devices. The few "
                  "bytes of difference: AdamW's step counters (CPU scalars) and, for SDPA, the 24-byte RNG state per "
                  "layer the meta stand-in keeps as a GPU's kernel does. SDPA rows of shapes with attention dropout "
                  "are checked with it off (the CPU's flash kernel has none: `istune.planning.kernels`)."]
    lines += ["", "## How it was measured", "", *NOTES, ""]
    return "\n".join(lines)


NOTES = [
    "- Plain rows train every layer (Full: every parameter, embeddings and head included). IST rows use "
    "`SparseTuner` with ISTConfig defaults plus the row's options; importance updates are not measured (they are "
    "no-grad forwards; values cannot be read on the meta device), so the importance stays at zero.",
    "- The warm-up step before the measured steps trains every layer, so AdamW holds state for all of them, as late "
    "in a long run where every layer has been selected; `unselected_optimizer_state='drop'` then frees the state "
    "of the unselected layers. Offloading is not a row: on the meta device the tuner leaves the state in place, "
    "while on a GPU it would leave the device like 'drop' does.",
    "- Full + IST trains N_u whole decoder layers (embeddings, head and final norm frozen) drawn uniformly "
    "(strategy 'random': at zero importance 'ist' draws uniformly too; 'ist' keeps a copy of the initial weights "
    "in CPU memory, off the device, for its probes).",
    "- LISA trains N_u whole layers plus the embeddings and LM head; the measured steps lie in one sampling period, "
    "so only the active layers have optimizer state (an implementation that keeps AdamW state of earlier periods "
    "grows towards Full + IST's state).",
    "- `recompute_unselected` checkpoints the unselected layers; the tracker counts what checkpointing saves as "
    "`other`, not `activations`.",
]
