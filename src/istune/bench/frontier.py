"""The memory-time frontier: LoRA, LoRA + gradient checkpointing, IST and its options, in the HF Trainer.

    istune bench frontier                                   # LLaMA 12 x 768, batch 1 x 1024 (about 25 min, 2 cores)
    istune bench frontier --size smollm2-135m               # SmolLM2-135M, batch 1 x 1024
    istune bench frontier --size tiny                       # 8 x 256 LLaMA, 4 x 256 tokens (per-step overhead)
    istune bench frontier --size test --rows lora,ist       # seconds: what the tests run

Every row trains with transformers' ``Trainer`` (LoRA r=32, alpha 64, dropout 0.05; fp32; random token
ids; IST through ``ISTCallback``; checkpointing rows: non-reentrant) on a model with random weights.

- **Memory**: each row in its own process (:mod:`istune.bench.child`), ``memory_steps`` steps, IST seeded to
  select layer 0 (with ``stored_layers``, also :func:`stored_worst_step`; the larger counts): the growth of
  the peak resident set over ``trainer.train()`` (:class:`~istune.planning.step.RssPeak`). A rule that
  chooses from a measurement of the model ('owlore', 'gradnorm', 'probe-once') runs as it trains, its
  measurement at the first step included (gradient norms: one backward with every adapter trainable; outlier
  ratios: one forward without gradients), and once more with layer 0 fixed (:func:`worst_step`).
- **Time**: rows interleaved in rounds, a fresh Trainer each; a step is the time between two
  ``on_step_end`` events, so the Trainer's and the callback's work (probes included) is part of it. IST rows
  draw as in training (seed 42 + round); the mean of the steps without an importance update plus one
  update's mean time over T_c is reported. The first step of each round is not in that mean; its own mean
  (``first_step_s``) holds a rule's one-time measurement.

Writes ``OUT.json``, ``OUT.md`` and ``OUT.png`` (memory against time, the frontier drawn).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from istune.bench import records
from istune.bench.child import run_in_child
from istune.bench.records import run_metadata, write_record
from istune.planning.rows import ROWS as ALL_ROWS
from istune.planning.rows import Row, table_names
from istune.planning.shapes import SHAPES

DEFAULT_OUT = "benchmarks/results/frontier"
PROBE_INTERVAL = 10  # T_c, the paper's default: the time of an importance update is amortised over it
TIME_SEED = 42  # IST's seed in round 0 of the time runs (ISTConfig's default); round k uses TIME_SEED + k

# LISA-style here: 2 whole layers a step, embeddings and head frozen (LISA trains them too).
DEFAULT_KEYS = ("lora", "lora+gc", "lora+ist", "lora+ist+recompute", "lora+ist+gc", "lora+ist+gc+stored3",
                "lora+ist+stored8", "lora+random", "full+random2", "dora", "dora+gc", "dora+ist", "dora+ist+gc")
# The peers' selection rules: with --rows only, so a run without --rows measures what the records' commands did.
RULE_KEYS = ("lora+lisa", "lora+badam", "lora+owlore", "lora+gradnorm", "lora+probe-once")
ROWS: dict[str, Row] = {key: ALL_ROWS[key] for key in DEFAULT_KEYS + RULE_KEYS}
# The names --rows lists (this table's keys before one key per configuration; the keys work too).
ROW_NAMES = ("lora", "lora+ckpt", "ist", "ist+recompute", "ist+ckpt", "ist+ckpt+stored3", "ist+stored8", "random",
             "lisa", "dora", "dora+ckpt", "dora+ist", "dora+ist+ckpt", "lora+lisa", "lora+badam", "lora+owlore",
             "lora+gradnorm", "lora+probe-once")
NAMES = table_names(ROWS, local={"lisa": "full+random2"})


@dataclass(frozen=True)
class Size:
    """A model and batch: ``config`` (transformers config keyword arguments) or ``model`` (a loadable name)."""

    name: str
    description: str
    batch_size: int
    seq_len: int
    steps: int  # per row per round
    rounds: int
    memory_steps: int
    config: dict = field(default_factory=dict)
    model: str | None = None


SIZES: dict[str, Size] = {size.name: size for size in (
    Size("llama-12x768", "LLaMA architecture, 12 layers x 768 (MLP 2048, 12 heads, vocab 32000), SDPA", 1, 1024,
         steps=11, rounds=2, memory_steps=3, config=SHAPES["llama-12x768"].sizes),
    Size("smollm2-135m", "SmolLM2-135M-Instruct (30 layers x 576), SDPA", 1, 1024, steps=5, rounds=2,
         memory_steps=3, model="smollm2-135m"),
    Size("tiny", "LLaMA architecture, 8 layers x 256 (MLP 688, 4 heads, vocab 32000), SDPA", 4, 256,
         steps=31, rounds=3, memory_steps=3,
         config=dict(num_hidden_layers=8, hidden_size=256, intermediate_size=688, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=32000)),
    Size("test", "LLaMA architecture, 4 layers x 32 (tests)", 2, 16, steps=3, rounds=1, memory_steps=2,
         config=dict(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128)),
)}


def build_model(size: Size, row: Row) -> torch.nn.Module:
    """The size's model (random weights from its config, or the named model) with the row's trainable parts."""
    import transformers

    from istune.planning.step import build_model as build
    from istune.planning.step import load_model

    row = dataclasses.replace(row, checkpointing=False)  # the Trainer turns it on (activation_checkpointing)
    torch.manual_seed(0)
    if size.model is not None:
        model = load_model(size.model)
        model.set_attn_implementation("sdpa")
        return build(None, row, model=model, seed=None, total_steps=1000)
    config = transformers.LlamaConfig(**size.config, attn_implementation="sdpa")
    return build(config, row, seed=0, total_steps=1000)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class _StepClock(TrainerCallback):
    """Notes the time of every ``on_step_end`` (listed last: after every other callback's work)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.ends: list[float] = []

    def on_train_begin(self, *args, **kwargs):
        self.ends = [self.clock()]

    def on_step_end(self, *args, **kwargs):
        self.ends.append(self.clock())


def ist_seed(row: Row, size: Size, num_layers: int) -> int:
    """The IST seed whose first ``memory_steps`` draws select layer 0 (the step with the largest peak)."""
    from istune.config import ISTConfig
    from istune.planning.worst_case import worst_case_seed

    config = ISTConfig(**row.ist)
    count = config.resolve(num_layers).update_layers
    return worst_case_seed(config.strategy, num_layers, count, 42, size.memory_steps)[0]


def worst_step(row: Row, num_layers: int) -> list[int] | None:
    """The step whose peak can be the largest and which the memory run's seeded draws may not reach, to train
    as a fixed selection: :func:`stored_worst_step`, or for a rule that chooses from a measurement ('owlore',
    'gradnorm', 'probe-once') layer 0 and the top N_u − 1 layers. None when the seeded draws reach every one."""
    from istune.config import ISTConfig
    from istune.planning.worst_case import worst_case_selection

    if row.ist is not None and not seeded(ISTConfig(**row.ist).strategy):
        return worst_case_selection(num_layers, ISTConfig(**row.ist).resolve(num_layers).update_layers)
    return stored_worst_step(row, num_layers)


def seeded(strategy: str) -> bool:
    """Whether the rule's first selections are steered to layer 0 by a seed (its draws, as worst_case_seed
    simulates them, come from its seed and IST's importance alone) or start there whatever the seed (BAdam's
    ascending order). Other rules choose from a measurement of the model: their memory runs add a run with
    layer 0 fixed (:func:`worst_step`)."""
    from istune import rule_catalog

    rule = rule_catalog.traits(strategy)
    return rule.runs_importance_probes or not rule.uses_probe_batches


def stored_worst_step(row: Row, num_layers: int) -> list[int] | None:
    """With ``stored_layers = M`` (1 <= M < N_L), the other step whose peak can be the largest
    (:func:`istune.planning.worst_case.worst_case_selections`): its memory run fixes it. Else None."""
    from istune.config import ISTConfig
    from istune.planning.worst_case import worst_case_selections

    if row.ist is None or row.ist.get("stored_layers") is None:
        return None
    count = ISTConfig(**row.ist).resolve(num_layers).update_layers
    selections = worst_case_selections(num_layers, count, row.ist["stored_layers"])
    return selections[1] if len(selections) > 1 else None


def make_trainer(row: Row, size: Size, model: torch.nn.Module, steps: int, output_dir: str, clock=None,
                 seed: int | None = None, layers: list[int] | None = None):
    """A Trainer for ``steps`` steps of ``row`` (ISTCallback with T_c = 10 for IST rows).

    ``seed``: IST's seed; default the one whose first steps select layer 0 (the memory runs' worst case).
    ``layers``: train these layer positions every step instead (strategy 'fixed'; no importance updates).
    """
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from istune.config import ISTConfig
    from istune.core.layers import find_adapter_layers
    from istune.integrations.hf import ISTCallback

    callbacks = []
    if row.ist is not None:
        if seed is None:
            seed = ist_seed(row, size, len(find_adapter_layers(model)))
        options = {**row.ist, "strategy": "fixed", "layers": layers} if layers is not None else row.ist
        config = ISTConfig(**options, probe_interval=PROBE_INTERVAL, seed=seed)
        callbacks.append(ISTCallback(config))
    if clock is not None:
        callbacks.append(clock)
    args = TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=size.batch_size, learning_rate=1e-4,
        lr_scheduler_type="constant", logging_steps=10, report_to=[], save_strategy="no", disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), seed=0, dataloader_num_workers=0,
        activation_checkpointing=row.checkpointing, activation_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, model.config.vocab_size, (steps * size.batch_size, size.seq_len),
                        generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in ids]  # random token ids
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # no log lines on stdout (the memory runs report there)
    return trainer


def measure_memory_here(row: Row | str, size: Size | str, stored_worst: bool = False) -> dict:
    """Peak RSS growth of ``memory_steps`` Trainer steps of ``row``, in this process (Linux).

    ``stored_worst``: train :func:`worst_step`'s layers every step instead of the rule's own selections.
    """
    from istune.core.layers import find_adapter_layers
    from istune.planning.step import RssPeak

    row, size = ROWS[row] if isinstance(row, str) else row, SIZES[size] if isinstance(size, str) else size
    model = build_model(size, row)
    layers = worst_step(row, len(find_adapter_layers(model))) if stored_worst else None
    if stored_worst and layers is None:  # M < N_u or M >= N_L: the layer-0 step is the only worst one
        return {"row": row.key, "fixed_layers": None, "skipped": True}
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = make_trainer(row, size, model, size.memory_steps, output_dir, layers=layers)
        with RssPeak() as peak:
            trainer.train()
    return {"row": row.key, **peak.report(), "fixed_layers": layers}


def measure_memory(rows: list[Row], size: Size, progress: Callable[[str], None]) -> dict[str, dict]:
    """Each row in its own Python process (so no row inherits another's allocator state)."""
    results = {}
    for row in rows:
        stored = row.ist is not None and (row.ist.get("stored_layers") is not None
                                          or not seeded(row.ist.get("strategy", "ist")))
        runs = [run_in_child("istune.bench.frontier:measure_memory_here",
                             {"row": row.key, "size": size.name, "stored_worst": worst})
                for worst in ((False, True) if stored else (False,))]
        runs = [run for run in runs if not run.get("skipped")]
        results[row.key] = {**max(runs, key=lambda run: run["growth_bytes"]), "runs": runs}
        each = ", ".join(f"{run['growth_bytes'] / 1e9:.3f}" for run in runs)
        progress(f"memory {row.label}: {results[row.key]['growth_bytes'] / 1e9:.3f} GB"
                 + (f" (the larger of {each})" if len(runs) > 1 else ""))
    return results


def measure_time(rows: list[Row], size: Size, steps: int, rounds: int, progress: Callable[[str], None],
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, dict]:
    """Interleaved rounds; per row the step-time summary (see the module docstring)."""
    from istune.integrations.hf import ISTCallback

    plain: dict[str, list[float]] = {row.key: [] for row in rows}
    first: dict[str, list[float]] = {row.key: [] for row in rows}
    updates: dict[str, list[float]] = {row.key: [] for row in rows}
    with tempfile.TemporaryDirectory() as output_dir:
        for index in range(rounds):
            for row in rows:
                step_clock = _StepClock(clock)
                # IST's seed: the same selections for every IST row of a round, other ones in the next round
                trainer = make_trainer(row, size, build_model(size, row), steps, output_dir, step_clock,
                                       seed=TIME_SEED + index)
                trainer.train()
                durations = [b - a for a, b in zip(step_clock.ends, step_clock.ends[1:])]
                first[row.key].append(durations[0])  # warm-up, and a rule's measurement at the first step
                probes = row.probes
                for step, seconds in enumerate(durations[1:], start=2):  # step 1: warm-up
                    if not (probes and step % PROBE_INTERVAL == 0):
                        plain[row.key].append(seconds)
                if probes:  # one importance update (N_c probe forwards), timed on its own
                    ist = trainer.pop_callback(ISTCallback)
                    start = clock()
                    ist.tuner.update_importance(ist.sampler())
                    updates[row.key].append(clock() - start)
            progress(f"time: round {index + 1}/{rounds} done")
    results = {}
    for row in rows:
        step = statistics.fmean(plain[row.key])
        update = statistics.fmean(updates[row.key]) if updates[row.key] else None
        results[row.key] = {"step_s": step, "probe_update_s": update, "first_step_s": statistics.fmean(first[row.key]),
                            "seconds_per_step": step + (update or 0.0) / PROBE_INTERVAL,
                            "samples": {"steps": len(plain[row.key]), "probe_updates": len(updates[row.key])}}
    return results


def frontier_keys(rows: list[dict]) -> list[str]:
    """Rows no other row beats on both memory and time (lower is better on both)."""
    def beaten(a: dict) -> bool:
        memory, seconds = a["memory_bytes"], a["seconds_per_step"]
        return any(b is not a and b["memory_bytes"] <= memory and b["seconds_per_step"] <= seconds
                   and (b["memory_bytes"] < memory or b["seconds_per_step"] < seconds) for b in rows)

    return [r["key"] for r in rows if not beaten(r)]


def combine(rows: list[Row], memory: dict[str, dict], times: dict[str, dict]) -> list[dict]:
    combined = [{"key": row.key, "label": row.label, "method": row.method, "ist": row.ist,
                 "checkpointing": row.checkpointing, "memory_bytes": memory[row.key]["growth_bytes"],
                 "memory": memory[row.key], **times[row.key]} for row in rows]
    by_key = {r["key"]: r for r in combined}
    for reference in ("lora", "lora+gc"):
        if reference in by_key:
            for r in combined:
                r[f"memory_vs_{reference}"] = r["memory_bytes"] / by_key[reference]["memory_bytes"]
                r[f"time_vs_{reference}"] = r["seconds_per_step"] / by_key[reference]["seconds_per_step"]
    on_frontier = set(frontier_keys(combined))
    for r in combined:
        r["on_frontier"] = r["key"] in on_frontier
    return combined


def markdown_table(rows: list[dict]) -> str:
    def ratio(r: dict, name: str) -> str:
        return f"{r[name]:.2f}" if name in r else "–"

    return records.markdown_table(
        ["configuration", "memory GB", "vs LoRA", "vs LoRA + ckpt", "s/step", "vs LoRA", "vs LoRA + ckpt",
         "probe update s", "first step s", "frontier"],
        ([r["label"], f"{r['memory_bytes'] / 1e9:.3f}", ratio(r, "memory_vs_lora"), ratio(r, "memory_vs_lora+gc"),
          f"{r['seconds_per_step']:.3f}", ratio(r, "time_vs_lora"), ratio(r, "time_vs_lora+gc"),
          "–" if r["probe_update_s"] is None else f"{r['probe_update_s']:.3f}",
          f"{r['first_step_s']:.3f}" if "first_step_s" in r else "–", "yes" if r["on_frontier"] else ""]
         for r in rows), "l" + "r" * 8 + "c")


def plot(rows: list[dict], title: str):
    """Memory against time, one point per row, the frontier as a line through its rows (a matplotlib figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5.5))
    for r in rows:
        axes.scatter(r["seconds_per_step"], r["memory_bytes"] / 1e9, s=40,
                     color="tab:red" if r["ist"] is not None else "tab:blue", marker="o" if r["on_frontier"] else "x")
        axes.annotate(r["label"], (r["seconds_per_step"], r["memory_bytes"] / 1e9), fontsize=7,
                      xytext=(4, 3), textcoords="offset points")
    frontier = sorted((r for r in rows if r["on_frontier"]), key=lambda r: r["seconds_per_step"])
    axes.step([r["seconds_per_step"] for r in frontier], [r["memory_bytes"] / 1e9 for r in frontier],
              where="post", color="gray", linestyle="--", label="frontier (no row beats these on both)")
    axes.set_xlabel("seconds per optimizer step (mean, probes amortised)")
    axes.set_ylabel("peak memory growth, GB (peak RSS)")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def write_results(out: Path, meta: dict, settings: dict, rows: list[dict]) -> str:
    table = markdown_table(rows)
    figure = plot(rows, f"{settings['description']}, batch {settings['batch_size']} x {settings['seq_len']}, fp32, "
                        "HF Trainer")
    write_record(out, {**meta, "settings": settings, "rows": rows}, (
        f"# Memory and time per step: the frontier\n\n![frontier]({out.with_suffix('.png').name})\n\n"
        f"Command: `{meta['command']}`  \nCommit {meta['commit']}, {meta['date']}, {meta['machine']}; "
        f"load before the run: {settings['load']}.  \n{settings['description']}, batch {settings['batch_size']} x "
        f"{settings['seq_len']} tokens, fp32, LoRA/DoRA r=32, alpha 64, dropout 0.05 on q/k/v/up/down, HF Trainer, "
        f"IST defaults (N_u = 25%, T_c = {PROBE_INTERVAL}). Memory: growth of peak RSS over "
        f"{settings['memory_steps']} "
        f"steps, each row in its own process, IST's worst step (layer 0 selected) included. Time: means over "
        f"{settings['rounds']} interleaved rounds x {settings['steps'] - 1} timed steps "
        f"({settings.get('clock', 'wall')} clock; IST rows draw layers as in training, seed {TIME_SEED} + round), "
        f"probe updates amortised over T_c; first step s: the untimed first step of a round (warm-up, and the "
        f"one-time measurement of 'owlore', 'gradnorm', 'probe-once').\n\n{table}\n"), figure)
    return table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="istune bench frontier", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="llama-12x768", help=f"one of {', '.join(SIZES)}")
    parser.add_argument("--rows", default=None, help=f"comma-separated rows of {', '.join(ROW_NAMES)}; default all "
                        f"but the selection rules ({', '.join(RULE_KEYS)})")
    parser.add_argument("--steps", type=int, default=None, help="steps per row per round (default: the size's)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: the size's)")
    parser.add_argument("--clock", default="wall", choices=list(CLOCKS),
                        help="wall: elapsed time (default); cpu: this process's CPU time, steadier on a shared "
                        "machine (with OMP_NUM_THREADS=1 it is the work done; it leaves out time spent waiting)")
    parser.add_argument("--skip", default=None, choices=["memory", "time"], help="measure only the other one")
    parser.add_argument("--out", default=None, help=f"results go to OUT.json/.md/.png; default {DEFAULT_OUT}-SIZE")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``istune bench frontier``: measure, print the table, write the results. Bad options raise ValueError."""
    from istune.option_checks import parse_list

    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    if opts.size not in SIZES:
        raise ValueError(f"--size={opts.size!r} is not a known size; use one of {', '.join(SIZES)}.")
    size = SIZES[opts.size]
    chosen = {NAMES[name] for name in parse_list("rows", opts.rows, allowed=NAMES)} if opts.rows else set(DEFAULT_KEYS)
    keys = [key for key in ROWS if key in chosen]
    steps, rounds = opts.steps or size.steps, opts.rounds or size.rounds
    if steps < 2 or rounds < 1:  # the first step of a round is a warm-up
        raise ValueError(f"--steps={steps} / --rounds={rounds}: use --steps >= 2 (the first step of a round is not "
                         "timed) and --rounds >= 1.")
    rows = [ROWS[key] for key in keys]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"istune bench frontier: {size.description}, {len(rows)} rows; load {load}", flush=True)
    show = lambda text: print(text, flush=True)  # noqa: E731
    memory = measure_memory(rows, size, show) if opts.skip != "memory" else \
        {row.key: {"growth_bytes": float("nan")} for row in rows}
    times = measure_time(rows, size, steps, rounds, show, CLOCKS[opts.clock]) if opts.skip != "time" else \
        {row.key: {"step_s": float("nan"), "probe_update_s": None, "first_step_s": float("nan"),
                   "seconds_per_step": float("nan")} for row in rows}
    combined = combine(rows, memory, times)
    settings = {"size": size.name, "description": size.description, "batch_size": size.batch_size,
                "seq_len": size.seq_len, "steps": steps, "rounds": rounds, "memory_steps": size.memory_steps,
                "threads": torch.get_num_threads(), "clock": opts.clock, "load": load, "load_after": " ".join(
                    f"{x:.2f}" for x in os.getloadavg())}
    out = Path(opts.out or f"{DEFAULT_OUT}-{size.name}")
    table = write_results(out, run_metadata("-m istune bench frontier", argv), settings, combined)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
