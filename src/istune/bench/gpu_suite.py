"""The GPU suite: a LLaMA-7B-shaped model with random weights, measured on one GPU with only a node's stack.

One command on a node with one CUDA GPU, from the repository root, with nothing installed and nothing
downloaded (torch, transformers, peft, accelerate, safetensors and pyyaml as the node has them)::

    PYTHONPATH=src python3 benchmarks/gpu_suite.py --out FOLDER      # = istune bench gpu --out FOLDER; <= 9 min
    PYTHONPATH=src python3 benchmarks/gpu_suite.py --tiny --out FOLDER   # CPU smoke test: tiny shapes, seconds

Part 1, the frontier (:data:`FRONTIER_ROWS`; ``--frontier_budget_s``, default 7 min): each row in its own
process on LLaMA-7B's shape (random weights made on the GPU), bf16, SDPA, LoRA r = 32, batch 1 x 1024.
Memory is one measured step (:func:`istune.planning.step.measured_steps`) under
:class:`~istune.planning.step.CudaPeak`, IST at each step ``istune plan`` counts as the worst, beside the
planner's prediction (made in this process on the meta device while the row runs on the GPU); time is
``--steps`` steps of the row's real policy (IST's probes included), one by one with ``torch.cuda.synchronize``.
Part 2, throughput (:data:`THROUGHPUT_ROWS`, within what is left of ``--budget_s``): the same shape trained
through :func:`istune.integrations.loop.train` on a fresh random batch (2 x 1024) every step, no
synchronization inside the timed steps: tokens/s and peak memory of LoRA on every layer, LoRA + gradient
checkpointing and LoRA + IST with its importance probes every T_c steps.

Budgets, all enforced here: a row starts only when what is left of its part's budget is at least the longest
row of that part so far, and a row is stopped at ``--row_budget_s`` or at what is left; a row that cannot
start is recorded as not run, with the reason. ``FOLDER/gpu_suite.{json,md}`` are rewritten after every row,
so a run cut short keeps what it measured; ``--resume`` keeps the rows already measured there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from istune import rule_catalog
from istune.bench.child import ChildFailed, run_in_child
from istune.bench.records import markdown_table, run_metadata, write_record
from istune.planning.rows import ROWS, Row, table_names
from istune.planning.shapes import SHAPES

__all__ = ["FRONTIER_ROWS", "RESULT_NAME", "THROUGHPUT_ROWS", "SuiteSettings", "build_parser", "check_out_folder",
           "main", "predict_row", "run_row"]

GIB = 1024**3
NOT_MEASURED = "not yet measured on a GPU"
RESULT_NAME = "gpu_suite"  # FOLDER/gpu_suite.json and FOLDER/gpu_suite.md
COMMAND = "PYTHONPATH=src python3 benchmarks/gpu_suite.py"

FRONTIER_ROWS = tuple(ROWS[key] for key in ("lora", "lora+gc", "lora+ist", "lora+ist+recompute", "lora+ist+gc",
                                            "lora+ist+gc+stored2", "lora+ist+stored8", "lora+random", "lisa", "dora",
                                            "dora+ist"))
OPTIONAL = ("dora", "dora+ist")  # only with --dora
THROUGHPUT_ROWS = (  # part 2: the training loop as a run would use it, so rows of their own
    Row("throughput:lora", "LoRA, every layer", ist={"strategy": "all"}),
    Row("throughput:lora+gc", "LoRA + gradient checkpointing", ist={"strategy": "all"}, checkpointing=True),
    Row("throughput:ist", "LoRA + IST (probes every T_c steps)", ist={}),
)
# The order rows start in, each part's most telling rows first (what a short budget drops is at the end).
FRONTIER_ORDER = ("lora", "lora+gc", "lora+ist", "lora+ist+recompute", "lora+ist+gc", "lora+ist+gc+stored2",
                  "lora+ist+stored8", "lora+random", "lisa", "dora", "dora+ist")
THROUGHPUT_ORDER = tuple(row.key for row in THROUGHPUT_ROWS)
ALL_ROWS = {row.key: row for row in FRONTIER_ROWS + THROUGHPUT_ROWS}
NAMES = table_names(ALL_ROWS)


@dataclass(frozen=True)
class SuiteSettings:
    """What every row shares (the command line's options); a run resumes only rows measured with the same."""

    tiny: bool = False
    device: str = "cuda"
    shape: str = "llama-7b"
    batch_size: int = 1  # part 1: one sequence of 1024 tokens, the paper's memory setting
    seq_len: int = 1024
    dtype: str = "bfloat16"
    rank: int = 32
    warmup_steps: int = 3  # untimed steps before each timed run (allocator and kernel caches warm)
    steps: int = 20  # part 1: timed steps; two importance updates (T_c = 10) fall inside them
    throughput_batch_size: int = 2
    throughput_seq_len: int = 1024
    throughput_steps: int = 30  # part 2: three importance updates
    seed: int = 0


def tiny_settings(device: str) -> SuiteSettings:
    return SuiteSettings(tiny=True, device=device, shape="tiny-llama", batch_size=2, seq_len=64, dtype="float32",
                         rank=8, warmup_steps=1, steps=2, throughput_batch_size=2, throughput_seq_len=32,
                         throughput_steps=10)


def _model_config(settings: SuiteSettings, seq_len: int):
    config = SHAPES[settings.shape].config(attention="sdpa", seq_len=seq_len)
    config.use_cache = False
    return config


def predict_row(key: str, settings: SuiteSettings) -> dict | None:
    """istune plan's prediction for a frontier row (meta device, no GPU), or None where the planner has no such
    row (LISA)."""
    row = ALL_ROWS[key]
    if row.method == "lisa":
        return None
    from istune.planning.planner import PlanSettings, predict

    rule = rule_catalog.traits(row.ist.get("strategy", "ist")) if row.ist is not None else None
    if rule is not None and not (rule.runs_importance_probes or rule.trains_all_layers):
        row = ROWS[f"{row.method}+ist"]  # sparse without probes ('random'): IST's memory (same N_u)
    result = predict(_model_config(settings, settings.seq_len), row,
                     PlanSettings(batch_size=settings.batch_size, seq_len=settings.seq_len, dtype=settings.dtype,
                                  method=row.method, rank=settings.rank,
                                  optimizer_impl="foreach",  # the suite's AdamW
                                  kernels="cpu" if settings.device == "cpu" else "cuda"))
    return {"row": row.key, "peak_bytes": result["peak_bytes"], "budget_bytes": result["budget_bytes"],
            "selected": result["selected"]}


def _peak(model, optimizer, device: torch.device):
    from istune.planning.step import CudaPeak
    from istune.planning.tracker import MemoryTracker

    return CudaPeak(device) if device.type == "cuda" else MemoryTracker(model, optimizer, device=device)


def _peak_report(meter, device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return meter.report()
    return {"peak_allocated_bytes": meter.report()["peak_bytes"], "peak_reserved_bytes": None}  # CPU: live tensors


def run_frontier_row(row: Row, settings: SuiteSettings) -> dict[str, Any]:
    """Part 1: the worst step's peak memory and ``steps`` timed steps of the row's real policy."""
    from istune.config import ISTConfig
    from istune.core.tuner import SparseTuner
    from istune.planning.step import build_model, make_batch, measured_steps, timed_step, trainable
    from istune.planning.worst_case import worst_case_selections

    device = torch.device(settings.device)
    config = _model_config(settings, settings.seq_len)
    model = build_model(config, row, dtype=settings.dtype, device=device, seed=settings.seed, total_steps=100,
                        adapter=dict(rank=settings.rank, alpha=2 * settings.rank))  # weights made on the device
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-5, foreach=True)
    batch = make_batch(config.vocab_size, settings.batch_size, settings.seq_len, settings.seed, "sdpa", device)
    # Memory: IST at each step the planner counts as the worst (layer 0 selected; with stored_layers also the step
    # storing the most selected blocks); the largest is the row's. (LISA: the step starts a sampling period, with
    # state for its layers only: no warm-up.)
    if row.ist is None:
        selections = [None]
    else:
        ist = ISTConfig(**{"strategy": "ist", **row.ist})
        selections = worst_case_selections(config.num_hidden_layers,
                                           ist.resolve(config.num_hidden_layers).update_layers,
                                           row.ist.get("stored_layers"))
    peak = None
    for layers in selections:
        make_tuner = None
        if layers is not None:
            options = {k: v for k, v in row.ist.items() if k not in ("strategy", "update_layers")}
            fixed = ISTConfig(strategy="fixed", layers=layers, **options)
            make_tuner = lambda fixed=fixed: SparseTuner(model, fixed, optimizer=optimizer)  # noqa: E731
        meter = _peak(model, optimizer, device)
        _, tuner = measured_steps(model, optimizer, batch, meter, make_tuner, warm_up=row.method != "lisa")
        if tuner:
            tuner.close()
        measured = {**_peak_report(meter, device), "selected": layers}
        if peak is None or measured["peak_allocated_bytes"] > peak["peak_allocated_bytes"]:
            peak = measured
    tuner = None
    if row.ist is not None:
        tuner = SparseTuner(model, ISTConfig(**{"strategy": "ist", **row.ist}), optimizer=optimizer,
                            probe_batches=lambda: batch)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = []  # the row's real policy: importance updates (N_c probe forwards) every T_c steps are part of it
    for index in range(settings.warmup_steps + settings.steps):
        parts = timed_step(model, optimizer, batch, tuner, sync=sync)
        if index >= settings.warmup_steps:
            times.append(parts["step"] + parts["update"])
    if tuner:
        tuner.close()
    return {**peak, "step_seconds_median": statistics.median(times), "step_seconds_mean": statistics.fmean(times),
            "steps_timed": len(times)}


def run_throughput_row(row: Row, settings: SuiteSettings) -> dict[str, Any]:
    """Part 2: ``throughput_steps`` steps through :func:`istune.integrations.loop.train`, a new random batch every
    step, timed as a whole (one synchronization at the end): tokens/s and the run's peak memory."""
    from istune.config import ISTConfig
    from istune.integrations.loop import train
    from istune.planning.step import build_model, make_batch, trainable

    device = torch.device(settings.device)
    size, length = settings.throughput_batch_size, settings.throughput_seq_len
    config = _model_config(settings, length)
    model = build_model(config, row, dtype=settings.dtype, device=device, seed=settings.seed, total_steps=100,
                        adapter=dict(rank=settings.rank, alpha=2 * settings.rank))
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-5, foreach=True)
    seeds = iter(range(settings.seed + 1, settings.seed + 1_000_000))
    def batches(count: int) -> list[dict]:  # made before the clock starts: the loop's time, not the data's
        return [make_batch(config.vocab_size, size, length, next(seeds), "sdpa", device) for _ in range(count)]

    probes = itertools.cycle(batches(4))  # IST's probe batches (a sampler's draws, made ahead as the batches are)
    ist = ISTConfig(seed=settings.seed, **row.ist)
    train(model, optimizer, batches(settings.warmup_steps), ist, probe_batches=lambda: next(probes),
          max_steps=settings.warmup_steps)  # warm-up: AdamW's state exists for every layer, as in a long run
    timed = batches(settings.throughput_steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    tuner = train(model, optimizer, timed, ist, probe_batches=lambda: next(probes),
                  max_steps=settings.throughput_steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    updates = sum(1 for event in tuner.history if event["event"] == "probe")
    return {
        "tokens_per_second": settings.throughput_steps * size * length / seconds, "train_seconds": seconds,
        "steps": settings.throughput_steps, "tokens_per_step": size * length, "importance_updates": updates,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None,
    }


def run_row(key: str, settings: SuiteSettings | dict) -> dict[str, Any]:
    """Run one row in this process; the record of what it measured (with ``seconds`` and ``status``)."""
    settings = settings if isinstance(settings, SuiteSettings) else SuiteSettings(**settings)
    row = ALL_ROWS[key]
    started, threads = time.perf_counter(), torch.get_num_threads()
    if settings.tiny and settings.device == "cpu":
        torch.set_num_threads(1)  # tiny matrices: more threads only wait on each other (3x slower on a busy CPU)
    try:
        result = run_throughput_row(row, settings) if row in THROUGHPUT_ROWS else run_frontier_row(row, settings)
    finally:
        torch.set_num_threads(threads)
    return {"key": key, "label": row.label, "status": "done", **result,
            "seconds": round(time.perf_counter() - started, 1)}


def _row_here(key: str, settings: SuiteSettings) -> dict[str, Any]:
    try:
        return run_row(key, settings)
    except torch.cuda.OutOfMemoryError as error:
        return {"key": key, "label": ALL_ROWS[key].label, "status": f"failed: out of memory ({error})"}


def _row_in_subprocess(key: str, settings: SuiteSettings, timeout_s: float, why: str) -> dict[str, Any]:
    """Run a row in a fresh Python process (its own CUDA context and peak counters); an OOM stays in it."""
    try:
        return run_in_child("istune.bench.gpu_suite:run_row", {"key": key, "settings": asdict(settings)}, timeout_s)
    except subprocess.TimeoutExpired:
        return {"key": key, "label": ALL_ROWS[key].label, "status": f"stopped: over {timeout_s:.3g} s ({why})"}
    except ChildFailed as error:
        return {"key": key, "label": ALL_ROWS[key].label, "status": f"failed: {error}"}


def _prediction(key: str, settings: SuiteSettings) -> dict[str, Any]:
    """The row's ``prediction`` (None for LISA, and for part 2), or the reason the planner gave none."""
    if ALL_ROWS[key] in THROUGHPUT_ROWS:
        return {"prediction": None}
    try:
        return {"prediction": predict_row(key, settings)}
    except Exception as error:  # a planner failure must not cost the measurement
        return {"prediction": None, "prediction_error": f"{type(error).__name__}: {error}"}


def measure(key: str, settings: SuiteSettings, isolation: str, timeout_s: float, why: str) -> dict[str, Any]:
    """One row's record with the planner's prediction beside it. ``isolation='process'``: the row runs in a child
    process (stopped after ``timeout_s``) while this process predicts; ``'none'``: one after the other, here."""
    if isolation == "none":
        return {**_row_here(key, settings), **_prediction(key, settings)}
    with ThreadPoolExecutor(max_workers=1) as pool:
        child = pool.submit(_row_in_subprocess, key, settings, timeout_s, why)  # the GPU works ...
        prediction = _prediction(key, settings)  # ... while this process predicts on the meta device
        return {**child.result(), **prediction}


def _size(value: float | None, unit: int) -> str:
    return "–" if value is None else f"{value / unit:.2f}"


def _frontier_cells(r: dict, lora: dict, unit: int) -> list[str]:
    peak, plan = r.get("peak_allocated_bytes"), (r.get("prediction") or {}).get("peak_bytes")
    done, versus = r["status"] == "done", r["status"] == "done" and lora.get("status") == "done"
    return [r["label"], _size(peak, unit), _size(r.get("peak_reserved_bytes"), unit), _size(plan, unit),
            f"{plan / peak:.3f}" if done and plan else "–",
            f"{peak / lora['peak_allocated_bytes']:.2f}" if versus else "–",
            f"{r['step_seconds_mean']:.3f} ({r['step_seconds_median']:.3f})" if done else "–",
            f"{r['step_seconds_mean'] / lora['step_seconds_mean']:.2f}" if versus else "–", r["status"]]


def _throughput_cells(r: dict, lora: dict, unit: int) -> list[str]:
    done, versus = r["status"] == "done", r["status"] == "done" and lora.get("status") == "done"
    peak, lora_peak = r.get("peak_allocated_bytes"), lora.get("peak_allocated_bytes")
    return [r["label"], f"{r['tokens_per_second']:.0f}" if done else "–",
            f"{r['tokens_per_second'] / lora['tokens_per_second']:.2f}" if versus else "–",
            _size(peak, unit), _size(r.get("peak_reserved_bytes"), unit),
            f"{peak / lora_peak:.2f}" if versus and peak and lora_peak else "–",
            str(r["importance_updates"]) if done else "–", r["status"]]


def markdown(result: dict[str, Any]) -> str:
    meta, rows = result["meta"], {r["key"]: r for r in result["rows"]}
    s, tiny = meta["settings"], meta["settings"]["tiny"]
    unit, name = (1024**2, "MiB") if tiny else (GIB, "GiB")
    frontier = [_frontier_cells(rows[row.key], rows.get("lora", {}), unit)
                for row in FRONTIER_ROWS if row.key in rows]
    throughput = [_throughput_cells(rows[row.key], rows.get("throughput:lora", {}), unit)
                  for row in THROUGHPUT_ROWS if row.key in rows]
    warning = (f"**{NOT_MEASURED}.** This run used {meta['device']}; its figures are live tensor bytes "
               "(MemoryTracker), not a GPU's.\n\n" if meta["device"] != "cuda" else "")
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    return (f"# GPU suite{' (--tiny smoke test)' if tiny else ''}\n\n{warning}Command: `{meta['command']}`  \n"
            f"Date: {meta['date']}; commit {meta['commit']}; {meta['machine']}; {versions}\n\n"
            f"## Part 1, frontier: {s['shape']} shape (random weights), {s['dtype']}, batch {s['batch_size']} x "
            f"{s['seq_len']} tokens, SDPA, r = {s['rank']}\n\n"
            + markdown_table(["row", f"peak allocated {name}", f"reserved {name}", f"istune plan {name}",
                              "plan / measured", "memory vs LoRA", "step s, mean (median)", "time vs LoRA", "status"],
                             frontier, "lrrrrrrrl")
            + f"\n\n## Part 2, throughput: {s['shape']} shape, batch {s['throughput_batch_size']} x "
            f"{s['throughput_seq_len']} tokens (a new random batch each step), {s['throughput_steps']} steps "
            f"through istune.integrations.loop.train\n\n"
            + markdown_table(["row", "tokens/s", "vs LoRA", f"peak allocated {name}", f"reserved {name}",
                              "memory vs LoRA", "importance updates", "status"], throughput, "lrrrrrrl")
            + f"\n\nPart 1 memory: one step per row, isolation '{meta['isolation']}' (IST rows: the worst step "
            "istune plan counts, layer 0 selected). Part 1 time: the row's real policy; the mean over the timed "
            "steps includes IST's probes (every T_c = 10 steps), the median is a plain step. 'istune plan' is the "
            "planner's prediction of max_memory_allocated for the same row (random sparse: IST's row; LISA: not "
            "planned). Part 2: wall time of the whole run, IST's importance updates (N_c = 3 probe forwards each) "
            "included; peak memory over the run.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="istune bench gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True,
                        help=f"folder for {RESULT_NAME}.json and {RESULT_NAME}.md (new or empty; with --resume, "
                        "the folder of the run to continue)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and a few steps: a smoke test (CPU, seconds)")
    parser.add_argument("--device", default=None, help="cuda (default) or cpu (with --tiny: cpu unless CUDA is there)")
    parser.add_argument("--budget_s", type=float, default=540,
                        help="seconds for the whole suite (default 540); part 2 gets what part 1 leaves")
    parser.add_argument("--frontier_budget_s", type=float, default=420,
                        help="seconds for part 1, the frontier (default 420)")
    parser.add_argument("--row_budget_s", type=float, default=90,
                        help="seconds one row may take before it is stopped (default 90; isolation 'process')")
    parser.add_argument("--rows", default=None, help=f"comma list of rows (default: all but DoRA), from: "
                        f"{', '.join(FRONTIER_ORDER + THROUGHPUT_ORDER)}")
    parser.add_argument("--dora", action="store_true", help="also the DoRA rows")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per frontier row (default 20)")
    parser.add_argument("--throughput_steps", type=int, default=None, help="timed steps per part 2 row (default 30)")
    parser.add_argument("--isolation", default=None, help="process: each row in its own Python process (the default; "
                        "its own CUDA context and peak counters, an OOM stays there); none: all rows in this process "
                        "(the default with --tiny)")
    parser.add_argument("--resume", action="store_true", help="keep rows already measured in --out with the same "
                        "settings")
    return parser


def _settings(args: argparse.Namespace) -> SuiteSettings:
    device = args.device or ("cuda" if not args.tiny or torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"--device={device!r}: use cuda or cpu.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device=cuda, but this torch ({torch.__version__}, CUDA {torch.version.cuda}) sees no "
                         "GPU; run the suite on a machine with one CUDA GPU, or add --tiny for the CPU smoke test.")
    if device == "cpu" and not args.tiny:
        raise ValueError("--device=cpu runs only with --tiny (a 7B shape on a CPU takes hours); add --tiny.")
    settings = tiny_settings(device) if args.tiny else SuiteSettings(device=device)
    changes = {name: getattr(args, name) for name in ("steps", "throughput_steps") if getattr(args, name) is not None}
    for name, value in changes.items():
        if value < 1:
            raise ValueError(f"--{name}={value} must be at least 1.")
    for name in ("budget_s", "frontier_budget_s", "row_budget_s"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name}={getattr(args, name)} must be positive (seconds).")
    return SuiteSettings(**{**asdict(settings), **changes})


def check_out_folder(out: Path, resume: bool) -> Path:
    """Make ``out`` if needed and check that it can be written and holds no other run; return it.

    Raises:
        ValueError: naming ``--out``, when it is a file, holds other files (without ``--resume``) or cannot be
            written.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out={str(out)!r} is a file; give a folder (new or empty) for {RESULT_NAME}.json/.md.")
    if out.is_dir() and not resume:
        held = sorted(p.name for p in out.iterdir())
        if held:
            raise ValueError(f"--out={str(out)!r} is not empty (it holds {', '.join(held[:3])}"
                             f"{', ...' if len(held) > 3 else ''}); give a new or empty folder, or --resume to "
                             "continue the run recorded there.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".{RESULT_NAME}.write-check"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"--out={str(out)!r} cannot be written ({type(error).__name__}: {error.strerror or error}); "
                         "give a folder you can write.") from None
    return out


def _kept_rows(out: Path, settings: SuiteSettings) -> dict[str, dict]:
    """--resume: the rows ``out`` holds that were measured (status done) with the same settings."""
    path = out / f"{RESULT_NAME}.json"
    if not path.is_file():
        return {}
    previous = json.loads(path.read_text())
    if previous["meta"]["settings"] != json.loads(json.dumps(asdict(settings))):
        return {}
    return {r["key"]: r for r in previous["rows"] if r["status"] == "done"}


def main(argv: list[str] | None = None) -> int:
    from istune.option_checks import parse_list

    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    settings = _settings(args)
    order = FRONTIER_ORDER + THROUGHPUT_ORDER
    chosen = {NAMES[n] for n in parse_list("rows", args.rows, allowed=NAMES)} if args.rows else set(order)
    keys = [k for k in order if k in chosen and (args.rows or args.dora or k not in OPTIONAL)]
    isolation = args.isolation or ("none" if args.tiny else "process")
    if isolation not in ("process", "none"):
        raise ValueError(f"--isolation={isolation!r}: use process or none.")
    out = check_out_folder(args.out, args.resume)
    done = _kept_rows(out, settings) if args.resume else {}
    meta = {**run_metadata("benchmarks/gpu_suite.py", argv), "command": " ".join([COMMAND, *argv]),
            "settings": asdict(settings), "device": settings.device,
            "gpu": torch.cuda.get_device_name() if settings.device == "cuda" else None, "isolation": isolation,
            "budgets_s": {"total": args.budget_s, "frontier": args.frontier_budget_s, "row": args.row_budget_s}}
    records: list[dict] = []

    def save() -> None:
        result = {"meta": meta, "rows": records}
        write_record(out / RESULT_NAME, result, markdown(result), indent=1)

    longest = {"frontier": 0.0, "throughput": 0.0}  # each part's longest row so far: the next one's estimate
    for key in keys:
        if key in done:
            records.append(done[key])
            continue
        part = "throughput" if ALL_ROWS[key] in THROUGHPUT_ROWS else "frontier"
        elapsed = time.perf_counter() - started
        left, why = args.budget_s - elapsed, "--budget_s"
        if part == "frontier" and args.frontier_budget_s - elapsed < left:
            left, why = args.frontier_budget_s - elapsed, "--frontier_budget_s"
        if left <= 0 or left < longest[part]:
            records.append({"key": key, "label": ALL_ROWS[key].label,
                            "status": f"not run: {max(left, 0):.0f} s of {why} left, a {part} row took up to "
                                      f"{longest[part]:.0f} s"})
            save()
            continue
        row_started = time.perf_counter()
        timeout, limit = (left, why) if left < args.row_budget_s else (args.row_budget_s, "--row_budget_s")
        print(f"gpu suite: {key}{f' (stopped after {timeout:.0f} s)' if isolation == 'process' else ''} ...",
              flush=True)
        record = measure(key, settings, isolation, timeout, limit)
        longest[part] = max(longest[part], time.perf_counter() - row_started)
        records.append(record)
        save()
        print(f"gpu suite: {key}: {record['status']} ({time.perf_counter() - row_started:.0f} s)", flush=True)
    save()
    print(markdown({"meta": meta, "rows": records}) + f"\nwrote {out / RESULT_NAME}.json and .md "
          f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
