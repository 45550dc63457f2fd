"""Time per optimizer step of LoRA, LoRA + random sparse, LoRA + IST and LISA-style full-layer tuning.

    istune bench time                                        # SmolLM2-135M, batch 4 x 256 tokens
    istune bench time --steps 4 --rounds 2 --strategies lora,ist
    istune bench time --ist probe_batch_size=2 --ist num_probes=2   # two extra IST rows

All rows live in one process and run in interleaved rounds (round r: ``--steps`` steps of every row in
turn), so a slow spell of a shared machine hits all alike. Each step is timed in parts by
:func:`istune.planning.step.timed_step`; each importance update apart, its median over T_c being the probe
cost per step. Reported: medians and the ratio of the total to LoRA's (``benchmarks/results/step_time``).
``--ist FIELD=VALUE[,FIELD=VALUE]`` adds a LoRA + IST row with those ISTConfig fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from istune.bench import records
from istune.bench.records import run_metadata, write_record
from istune.config import ISTConfig, options_dataclass
from istune.planning.rows import ROWS, Row

DEFAULT_OUT = "benchmarks/results/step_time"
PARTS = ("forward", "backward", "optimizer")
LORA = dict(rank=32, alpha=64)  # the paper's LoRA size (r=32, alpha 64)
# --strategies' names (this table's keys before one key per configuration; the keys work too) -> the rows.
STRATEGIES = {"lora": "lora", "random": "lora+random", "ist": "lora+ist", "ist-probe1": "lora+ist+probe1",
              "lisa": "full+random2", "ist-recompute": "lora+ist+recompute",
              "ist-recompute-probe1": "lora+ist+recompute+probe1"}


def builtin_rows() -> dict[str, Row]:
    """The rows ``--strategies`` chooses from, by the name it takes (LISA-style: embeddings and head frozen)."""
    return {name: ROWS[key] for name, key in STRATEGIES.items()}


def parse_ist_fields(text: str) -> dict[str, Any]:
    """``"probe_batch_size=1,num_probes=2"`` -> ``{"probe_batch_size": 1, "num_probes": 2}``, checked by ISTConfig.

    Raises:
        ValueError: naming ``--ist``, the text, and what to write instead.
    """
    known = {f.name: f for f in dataclasses.fields(options_dataclass())}
    values: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",")):
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--ist {text!r}: {item!r} is not FIELD=VALUE; write e.g. --ist probe_batch_size=1.")
        if name not in known:
            raise ValueError(f"--ist {text!r}: ISTConfig has no field {name!r}; use one of {', '.join(known)}.")
        values[name] = _convert(name, raw.strip(), str(known[name].type), text)
    try:
        ISTConfig(**{"strategy": "ist", **values})
    except (TypeError, ValueError) as error:
        raise ValueError(f"--ist {text!r}: {error}") from None
    return values


def _convert(name: str, raw: str, annotation: str, text: str) -> Any:
    """``raw`` as the type ``annotation`` names (bool, list of ints, int, float; None for Optional fields)."""
    if raw.lower() in ("none", "null") and ("Optional" in annotation or "None" in annotation):
        return None
    if "bool" in annotation:
        if raw.lower() in ("true", "1", "yes", "false", "0", "no"):
            return raw.lower() in ("true", "1", "yes")
        raise ValueError(f"--ist {text!r}: {name}={raw!r} is not a boolean; write {name}=true or {name}=false.")
    if "list" in annotation:
        try:
            return [int(v) for v in raw.replace(";", " ").split()]
        except ValueError:
            raise ValueError(f"--ist {text!r}: {name}={raw!r} is not a list of integers; separate them with "
                             f"';', e.g. {name}=0;5;11.") from None
    for kind in (int, float):
        if kind.__name__ in annotation:
            try:
                return kind(raw)
            except ValueError:
                if kind is int and "float" in annotation:
                    continue
                raise ValueError(f"--ist {text!r}: {name}={raw!r} is not a{'n' if kind is int else ''} "
                                 f"{kind.__name__}; write e.g. {name}=2.") from None
    return raw


def extra_row(values: dict[str, Any]) -> Row:
    """A LoRA + IST row with extra ISTConfig fields (``--ist``)."""
    shown = ", ".join(f"{k}={v}" for k, v in values.items())
    return Row(f"lora+ist({shown})", f"LoRA + IST ({shown})", "lora", {"strategy": "ist", **values}, False, "lora")


@dataclass
class Setup:
    """A row made ready to run: its model, optimizer and tuner, and the batches it trains and probes on."""

    row: Row
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    tuner: Any
    batch: dict
    probe_batch: dict
    times: dict = field(default_factory=lambda: {part: [] for part in (*PARTS, "step", "update")})


def build(row: Row, model: torch.nn.Module, batch: dict) -> Setup:
    """Adapters (or full layers), AdamW over every trainable parameter, and the row's SparseTuner."""
    from istune.core.tuner import SparseTuner
    from istune.planning.step import build_model, trainable

    model = build_model(None, row, model=model, seed=0, adapter=LORA, total_steps=1000)  # the same LoRA init
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-5)
    config = ISTConfig(**({"strategy": "ist", **row.ist} if row.ist is not None else {"strategy": "all"}))
    tuner = SparseTuner(model, config, optimizer=optimizer)
    size = config.probe_batch_size or len(batch["input_ids"])  # default: the training batch (as ISTCallback)
    probe_batch = {key: value[:size] for key, value in batch.items()}
    return Setup(row, model, optimizer, tuner, batch, probe_batch)


def run_steps(setup: Setup, steps: int, record: bool = True) -> None:
    """``steps`` training steps; every importance update (from ``end_step``) is timed apart from the step."""
    import time

    from istune.planning.step import timed_step

    updated = False
    for _ in range(steps):
        parts = timed_step(setup.model, setup.optimizer, setup.batch, setup.tuner, setup.probe_batch)
        if record:
            for part in (*PARTS, "step"):
                setup.times[part].append(parts[part])
            if parts["probed"]:
                setup.times["update"].append(parts["update"])
        updated |= parts["probed"]
    if record and setup.row.probes and not updated:  # fewer than T_c steps this round: time one update anyway
        t0 = time.perf_counter()
        setup.tuner.update_importance(setup.probe_batch)
        setup.times["update"].append(time.perf_counter() - t0)


def summarise(setup: Setup) -> dict:
    """Medians of one row; ``probe_update`` and ``probe_per_step`` are None/0 for rows without probes."""
    times = setup.times
    ist = {"strategy": "all"} if setup.row.ist is None else {"strategy": "ist", **setup.row.ist}
    row: dict[str, Any] = {"key": setup.row.key, "label": setup.row.label, "method": setup.row.method, "ist": ist}
    row.update({part: statistics.median(times[part]) for part in (*PARTS, "step")})
    row["probe_update"] = statistics.median(times["update"]) if times["update"] else None
    row["probe_interval"] = setup.tuner.config.probe_interval
    row["probe_per_step"] = row["probe_update"] / row["probe_interval"] if row["probe_update"] is not None else 0.0
    row["total"] = row["step"] + row["probe_per_step"]
    row["samples"] = {"steps": len(times["step"]), "updates": len(times["update"])}
    row["trainable"] = sum(p.numel() for layer in setup.tuner.layers for p in layer.parameters)
    return row


def measure(rows: list[Row], load_model: Callable[[], torch.nn.Module], batch_size: int, seq_len: int,
            steps: int, rounds: int, progress: Callable[[str], None] = print) -> list[dict]:
    """Build every row on its own copy of the model, warm up, run interleaved rounds; one summary per row."""
    setups = []
    for row in rows:
        model = load_model()
        ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len),
                            generator=torch.Generator().manual_seed(0))
        setups.append(build(row, model, {"input_ids": ids, "labels": ids.clone()}))
    for setup in setups:  # warm-up: one untimed step each (allocations, optimizer state)
        run_steps(setup, 1, record=False)
    for index in range(rounds):
        for setup in setups:
            run_steps(setup, steps)
        progress(f"round {index + 1}/{rounds} done")
    summaries = [summarise(setup) for setup in setups]
    lora = next((s["total"] for s in summaries if s["key"] == "lora"), None)
    for summary in summaries:
        summary["vs_lora"] = summary["total"] / lora if lora else None
    return summaries


def markdown_table(rows: list[dict]) -> str:
    def show(value: float | None, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    return records.markdown_table(
        ["strategy", "forward s", "backward s", "optimizer s", "step s", "probe update s", "probes s/step",
         "total s/step", "vs LoRA"],
        ([r["label"], *(f"{r[part]:.3f}" for part in (*PARTS, "step")), show(r["probe_update"], ".3f"),
          f"{r['probe_per_step']:.3f}", f"{r['total']:.3f}", show(r["vs_lora"], ".2f")] for r in rows))


def write_results(out: Path, meta: dict, rows: list[dict], settings: dict) -> str:
    """Write ``out.json`` and ``out.md`` (each whole or not at all); return the table."""
    table = markdown_table(rows)
    write_record(out, {**meta, "settings": settings, "rows": rows}, (
        f"# Time per step\n\nCommand: `{meta['command']}`  \nCommit {meta['commit']}, {meta['date']}, "
        f"{meta['machine']}. "
        f"Model {settings['model']}, batch {settings['batch_size']} x {settings['seq_len']} tokens. Medians over "
        f"{settings['rounds']} interleaved rounds x {settings['steps']} steps; probe update = median time of one "
        f"`update_importance` (N_c probe forwards), amortised per step by dividing by T_c.\n\n{table}\n"))
    return table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="istune bench time", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or local path; default the embedded SmolLM2-135M")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per row (random ids, all in the loss)")
    parser.add_argument("--steps", type=int, default=10, help="steps per row per round (T_c = 10: one probe each)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strategies", default=None,
                        help=f"comma-separated rows, default all: {', '.join(builtin_rows())}")
    parser.add_argument("--ist", action="append", default=[], metavar="FIELD=VALUE[,FIELD=VALUE]",
                        help="add a LoRA + IST row with these ISTConfig fields (repeatable), e.g. probe_batch_size=2")
    parser.add_argument("--out", default=DEFAULT_OUT, help="results go to OUT.json and OUT.md")
    return parser.parse_args(argv)


def load_model(name: str | None) -> torch.nn.Module:
    from istune.planning.step import load_model

    return load_model(name)


def main(argv: list[str] | None = None) -> int:
    """``istune bench time``: measure, print the table, write ``--out``.json/.md. Bad options raise ValueError."""
    import sys

    from istune.option_checks import parse_list, require_at_least_one

    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    require_at_least_one(opts, ("batch_size", "seq_len", "steps", "rounds"))
    builtin = builtin_rows()
    keys = parse_list("strategies", opts.strategies, allowed=builtin) if opts.strategies else list(builtin)
    rows = [builtin[key] for key in keys]
    rows += [extra_row(parse_ist_fields(text)) for text in opts.ist]
    print(f"istune bench time: {len(rows)} rows, {opts.rounds} rounds x {opts.steps} steps, "
          f"batch {opts.batch_size} x {opts.seq_len}", flush=True)
    summaries = measure(rows, lambda: load_model(opts.model), opts.batch_size, opts.seq_len, opts.steps, opts.rounds,
                        progress=lambda text: print(text, flush=True))
    settings = {"model": opts.model or "smollm2-135m", "batch_size": opts.batch_size, "seq_len": opts.seq_len,
                "steps": opts.steps, "rounds": opts.rounds, "threads": torch.get_num_threads()}
    table = write_results(Path(opts.out), run_metadata("-m istune bench time", argv), summaries, settings)
    print(table)
    return 0
