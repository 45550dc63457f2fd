"""Tables of ``istune bench memory`` (:mod:`istune.bench.memory_table`): markdown from its result dict."""

from __future__ import annotations

from typing import Any, Optional

from istune.planning.rows import ROWS, Row
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


def _ratio(runs: dict[str, dict], key: str) -> Optional[float]:
    run = runs.get(key)
    base = runs.get(run["baseline"]) if run and run["baseline"] else None
    return run["peak_bytes"] / base["peak_bytes"] if base else None


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _head(cells: list[str], left: int = 1) -> list[str]:
    return [_row(cells), "|" + "---|" * left + "---:|" * (len(cells) - left)]


def main_table(runs: dict[str, dict[str, dict]]) -> list[str]:
    """The paper's layout: a row per shape; each method without and with IST, and their ratio (worst-case peaks)."""
    keys = [k for k in MAIN_KEYS if any(k in by_key for by_key in runs.values())]
    labels = {v.key: v.label for v in VARIANTS}
    head = ["shape", "base weights"]
    for key in keys:
        head.append(labels[key])
        baseline = next(v.baseline for v in VARIANTS if v.key == key)
        if baseline in keys:
            head.append("ratio" if key.startswith(baseline) else f"/ {labels[baseline]}")
    lines = _head(head)
    for shape, by_key in runs.items():
        cells = [shape, gb(next(iter(by_key.values()))["base_weight_bytes"])]
        for key in keys:
            run = by_key.get(key)
            cells.append(gb(run["peak_bytes"]) if run else "")
            if next(v.baseline for v in VARIANTS if v.key == key) in keys:
                ratio = _ratio(by_key, key)
                cells.append(f"{ratio:.2f}" if ratio is not None else "")
        lines.append(_row(cells))
    return lines


def extras_table(runs: dict[str, dict[str, dict]]) -> list[str]:
    """The rows with further IST options: worst-case peak and ratio to the plain method, a column pair per row."""
    keys = [v.key for v in VARIANTS if v.key not in MAIN_KEYS and any(v.key in r for r in runs.values())]
    if not keys:
        return []
    labels = {v.key: v.label for v in VARIANTS}
    lines = _head(["shape"] + [c for key in keys for c in (labels[key], "ratio")])
    for shape, by_key in runs.items():
        cells = [shape]
        for key in keys:
            ratio = _ratio(by_key, key)
            cells += [gb(by_key[key]["peak_bytes"]) if key in by_key else "", f"{ratio:.2f}" if ratio else ""]
        lines.append(_row(cells))
    return lines


def attention_table(runs: dict[str, dict[str, dict]], attention: str, extras: list[str]) -> list[str]:
    """Every row's worst-case peak with the table's attention and, beside it, with each extra attention."""
    head = ["shape", "row", f"{attention} GB", "ratio"]
    for extra in extras:
        head += [f"{extra} GB", "ratio", f"{extra} / {attention}"]
    lines = _head(head, left=2)
    for shape, by_key in runs.items():
        for key, run in by_key.items():
            base = by_key.get(run["baseline"])
            cells = [shape, run["label"], gb(run["peak_bytes"]),
                     f"{run['peak_bytes'] / base['peak_bytes']:.2f}" if base else ""]
            for extra in extras:
                peak = run["extra_attention"][extra]["peak_bytes"]
                base_peak = base["extra_attention"][extra]["peak_bytes"] if base else None
                cells += [gb(peak), f"{peak / base_peak:.2f}" if base else "", f"{peak / run['peak_bytes']:.2f}"]
            lines.append(_row(cells))
    return lines


def steps_table(runs: dict[str, dict[str, dict]]) -> list[str]:
    """Sparse rows: worst-case and mean step peaks (ratio to the plain method) and every step's selection."""
    lines = _head(["shape", "row", "N_u of N_L", "worst step GB", "ratio", "mean step GB", "ratio",
                   "layers selected per step (worst step marked *)"], left=2)
    lines[1] = "|---|---|---:|---:|---:|---:|---:|---|"
    for shape, by_key in runs.items():
        for key, run in by_key.items():
            if run["ist_config"] is None:
                continue
            base = by_key.get(run["baseline"])
            ratio = (lambda n: f"{n / base['peak_bytes']:.2f}") if base else (lambda n: "")
            selections = "; ".join(",".join(map(str, s["selected"])) + ("*" if s["step"] == run["worst_step"] else "")
                                   for s in run["steps"])
            lines.append(_row([shape, run["label"], f"{run['update_layers']} of {run['num_layers']}",
                               gb(run["peak_bytes"]), ratio(run["peak_bytes"]), gb(run["mean_step_peak_bytes"]),
                               ratio(run["mean_step_peak_bytes"]), selections]))
    return lines


def breakdown_table(runs: dict[str, dict[str, dict]]) -> list[str]:
    """What the (worst-case) peak of every run is made of."""
    lines = _head(["shape", "row", "peak GB", "phase", *CATEGORIES, "trainable params (M)",
                   "trained at the peak step (M)"], left=2)
    lines[1] = "|---|---|---:|---|" + "---:|" * (len(CATEGORIES) + 2)
    for shape, by_key in runs.items():
        for run in by_key.values():
            lines.append(_row([shape, run["label"], gb(run["peak_bytes"]), run["peak_phase"],
                               *(gb(run["peak_breakdown"][c]) for c in CATEGORIES),
                               f"{run['params_trainable'] / 1e6:.1f}",
                               f"{run['params_trained_worst_step'] / 1e6:.1f}"]))
    return lines


def paper_table(runs: dict[str, dict[str, dict]]) -> list[str]:
    """The paper's Table 1 (GB) and its IST/plain ratios beside the ratios measured here."""
    shown = [s for s in runs if SHAPES[s].paper]
    if not shown:
        return []
    methods = [m for m in ("series", "parallel", "lora") if any(f"{m}+ist" in runs[s] for s in shown)]
    names = {"series": "Series", "parallel": "Parallel", "lora": "LoRA"}
    lines = _head(["shape", "paper: weights / Full GB"]
                  + [f"paper {names[m]} → +IST GB (ratio)" for m in methods]
                  + [f"here {names[m]} ratio" for m in methods])
    for shape in shown:
        paper = SHAPES[shape].paper
        full = "OOM" if paper["full"] is None else paper["full"]
        cells = [shape, f"{paper['weights']} / {full}"]
        cells += [f"{paper[m]} → {paper[m + '+ist']} ({paper[m + '+ist'] / paper[m]:.2f})" for m in methods]
        cells += [f"{_ratio(runs[shape], m + '+ist'):.2f}" if f"{m}+ist" in runs[shape] else "" for m in methods]
        lines.append(_row(cells))
    return lines


def check_table(records: list[dict]) -> list[str]:
    lines = _head(["shape", "attention", "row", "measured peak (bytes)", "meta peak (bytes)", "difference",
                   "measured mean step", "meta mean step", "difference", "within 0.1 percent"], left=3)
    for r in records:
        attention = r.get("attention", "eager") + (", attention dropout off" if r.get("attention_dropout_off") else "")
        lines.append(_row([r["shape"], attention, f"{r['label']} ({r['device']})", str(r["measured_peak_bytes"]),
                           str(r["meta_peak_bytes"]), f"{r['relative_difference']:.2e}",
                           f"{r['measured_mean_step_peak_bytes']:.0f}", f"{r['meta_mean_step_peak_bytes']:.0f}",
                           f"{r['relative_difference_mean']:.2e}", "yes" if r["agrees"] else "NO"]))
    return lines


def markdown(result: dict[str, Any]) -> str:
    meta, runs, settings = result["meta"], result["runs"], result["meta"]["settings"]
    n_steps = settings["steps"]
    other_attentions = list(settings.get("extra_attentions", []))
    attention = f"{settings['attention']} attention"
    if settings["attention"] == "sdpa" and meta["device"] == "meta":
        attention += (" (on the meta device as the fused GPU kernel keeps it: output and log-sum-exp, no attention "
                      "matrix; `istune.planning.kernels.fused_sdpa_on_meta`; except float32 with grouped KV heads, "
                      "TinyLLaMA's, where a GPU runs SDPA's math kernel, which keeps the attention probabilities as "
                      "eager does)")
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
                  "ratio to the plain method)", "", *attention_table(runs, settings["attention"], other_attentions), "",
                  "Eager attention keeps each layer's (batch × heads × tokens × tokens) attention probabilities for the "
                  "backward pass; SDPA's fused kernel keeps its output and one log-sum-exp per query row."]
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
                  "bytes of difference are AdamW's step counters (CPU scalars, counted when the parameters are on the "
                  "CPU) and, for SDPA, the 24-byte RNG state per layer that the meta stand-in keeps as the GPU kernel "
                  "does and the CPU kernel does not. torch's CPU flash kernel has no dropout: with attention dropout "
                  "(GPT-2) the CPU runs SDPA's math fallback, which keeps the attention probabilities and the dropout "
                  "mask; a GPU's fused kernels apply dropout inside the kernel and the stand-in keeps the same bytes "
                  "with or without it, so SDPA rows of such shapes are checked with attention dropout off."]
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


