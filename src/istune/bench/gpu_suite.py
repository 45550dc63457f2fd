"""The GPU suite: measured peak memory and step time of the frontier rows on a LLaMA-7B shape, and SmolLM2 runs.

One command on a machine with one CUDA GPU (``--budget_s`` caps it; install torch's CUDA build there)::

    bash scripts/setup.sh && .venv/bin/python benchmarks/gpu_suite.py     # = istune bench gpu
    .venv/bin/python benchmarks/gpu_suite.py --tiny                       # CPU smoke test: tiny shapes, seconds

Part 1, each frontier row (:data:`FRONTIER_ROWS`) in its own process on LLaMA-7B's shape (random weights
made on the GPU), bf16, SDPA, LoRA r = 32, batch 1 x 1024: memory is one measured step
(:func:`istune.planning.step.measured_steps`, IST at the worst step ``istune plan`` assumes) under
:class:`~istune.planning.step.CudaPeak`, beside ``istune plan``'s prediction; time is ``--steps`` steps of
the row's real policy (probes included), one by one with ``torch.cuda.synchronize``.
Part 2: ``--finetune_steps`` steps of SmolLM2-135M on the commonsense mix for LoRA, random sparse and IST
(:func:`istune.integrations.loop.train`), the held-out loss at the end.

Results are written after every row; ``--resume`` keeps rows measured with the same settings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from istune.bench.child import ChildFailed, run_in_child
from istune.bench.records import markdown_table, run_metadata, write_record
from istune.planning.rows import ROWS, Row, table_names
from istune.planning.shapes import SHAPES

__all__ = ["FRONTIER_ROWS", "FINETUNE_ROWS", "SuiteSettings", "build_parser", "main", "run_row"]

GIB = 1024**3
NOT_MEASURED = "not yet measured on a GPU"

FRONTIER_ROWS = tuple(ROWS[key] for key in ("lora", "lora+gc", "lora+ist", "lora+ist+recompute", "lora+ist+gc",
                                            "lora+ist+gc+stored2", "lora+ist+stored8", "lora+random", "lisa", "dora",
                                            "dora+ist"))
OPTIONAL = ("dora", "dora+ist")  # only with --dora
FINETUNE_ROWS = (  # SmolLM2 runs: the configuration on another model, so rows of their own
    Row("smollm2:lora", "SmolLM2 LoRA", ist={"strategy": "all"}),
    Row("smollm2:ist", "SmolLM2 LoRA + IST", ist={"strategy": "ist"}),
    Row("smollm2:random", "SmolLM2 LoRA + random sparse", ist={"strategy": "random"}),
)
# The order rows start in: the frontier's core, the fine-tuning runs, then the rest (what a short budget drops).
ORDER = ("lora", "lora+gc", "ist", "ist+recompute", "ist+gc", "smollm2:lora", "smollm2:ist", "smollm2:random",
         "ist+gc+stored2", "ist+stored8", "random", "lisa", "dora", "dora+ist")
ALL_ROWS = {row.key: row for row in FRONTIER_ROWS + FINETUNE_ROWS}
NAMES = table_names(ALL_ROWS)


@dataclass(frozen=True)
class SuiteSettings:
    """What every row shares (the command line's options)."""

    tiny: bool = False
    device: str = "cuda"
    shape: str = "llama-7b"
    batch_size: int = 1
    seq_len: int = 1024
    dtype: str = "bfloat16"
    rank: int = 32
    warmup_steps: int = 3
    steps: int = 20
    finetune_steps: int = 200
    finetune_batch_size: int = 4
    cutoff_len: int = 256
    heldout_samples: int = 64
    seed: int = 0
    extra: dict = field(default_factory=dict)


def tiny_settings(device: str) -> SuiteSettings:
    return SuiteSettings(tiny=True, device=device, shape="tiny-llama", batch_size=2, seq_len=64, dtype="float32",
                         rank=8, warmup_steps=1, steps=2, finetune_steps=4, finetune_batch_size=2, cutoff_len=64,
                         heldout_samples=8)


def _predict(row: Row, settings: SuiteSettings, config) -> dict | None:
    """istune plan's prediction for the row (meta device), or None where the planner has no such row."""
    if row.method == "lisa":
        return None
    from istune.planning.planner import PlanSettings, predict

    if row.ist is not None and row.ist.get("strategy") == "random":  # random sparse: IST's memory (same N_u)
        row = ROWS[f"{row.method}+ist"]
    result = predict(config, row, PlanSettings(batch_size=settings.batch_size, seq_len=settings.seq_len,
                                               dtype=settings.dtype, method=row.method, rank=settings.rank,
                                               optimizer_impl="foreach",  # the suite's AdamW
                                               kernels="cpu" if settings.device == "cpu" else "cuda"))
    return {"row": row.key, "peak_bytes": result["peak_bytes"], "budget_bytes": result["budget_bytes"],
            "seconds": result["seconds"], "selected": result["selected"]}


def run_frontier_row(row: Row, settings: SuiteSettings) -> dict[str, Any]:
    from istune.config import ISTConfig
    from istune.core.tuner import SparseTuner
    from istune.planning.step import CudaPeak, build_model, make_batch, measured_steps, timed_step, trainable
    from istune.planning.tracker import MemoryTracker

    device = torch.device(settings.device)
    config = SHAPES[settings.shape].config(attention="sdpa", seq_len=settings.seq_len)
    config.use_cache = False
    model = build_model(config, row, dtype=settings.dtype, device=device, seed=settings.seed, total_steps=100,
                        adapter=dict(rank=settings.rank, alpha=2 * settings.rank))  # weights made on the device
    prediction = _predict(row, settings, config)
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-5, foreach=True)
    batch = make_batch(config.vocab_size, settings.batch_size, settings.seq_len, settings.seed, "sdpa", device)
    make_tuner = None
    if row.ist is not None:  # memory: the worst step, as istune plan predicts it (the larger of its candidates)
        from istune.planning.worst_case import worst_case_selection

        ist = ISTConfig(**{"strategy": "ist", **row.ist})
        layers = worst_case_selection(config.num_hidden_layers, ist.resolve(config.num_hidden_layers).update_layers)
        if row.ist.get("stored_layers") is not None:
            layers = prediction["selected"]
        options = {k: v for k, v in row.ist.items() if k not in ("strategy", "update_layers")}
        fixed = ISTConfig(strategy="fixed", layers=layers, **options)
        make_tuner = lambda: SparseTuner(model, fixed, optimizer=optimizer)  # noqa: E731
    meter = CudaPeak(device) if device.type == "cuda" else MemoryTracker(model, optimizer, device=device)
    # (LISA: the measured step starts a sampling period, with state for its layers only: no warm-up)
    _, tuner = measured_steps(model, optimizer, batch, meter, make_tuner, warm_up=row.method != "lisa")
    peak = meter.report() if device.type == "cuda" else {"peak_allocated_bytes": meter.report()["peak_bytes"],
                                                           "peak_reserved_bytes": None}
    if tuner:
        tuner.close()
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
    return {
        **peak, "prediction": prediction,
        "step_seconds_median": statistics.median(times), "step_seconds_mean": statistics.fmean(times),
        "steps_timed": len(times),
    }


def _tiny_tokenizer(rows: list[dict]):
    """--tiny: a word-level tokenizer over the data's vocabulary (no files needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = " ".join(r["instruction"] + " " + r["output"] for r in rows)
    words = ["<pad>", "<unk>", "<s>", "</s>", *sorted(set(text.split()))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def _tiny_rows() -> list[dict]:
    return [{"instruction": f"is {a} plus {b} even ?", "input": "", "output": f"the answer is {(a + b) % 2 == 0}"}
            for a in range(8) for b in range(8)]


def run_finetune_row(row: Row, settings: SuiteSettings) -> dict[str, Any]:
    import random

    from istune.config import ISTConfig
    from istune.core import ProbeSampler
    from istune.data import CausalLMCollator, InstructionDataset
    from istune.eval.loss import heldout_loss
    from istune.integrations.loop import train
    from istune.planning.step import build_model, trainable

    device = torch.device(settings.device)
    torch.manual_seed(settings.seed)
    adapter = dict(rank=settings.rank, alpha=2 * settings.rank)
    if settings.tiny:  # a 4-layer random LLaMA
        rows = _tiny_rows()
        tokenizer = _tiny_tokenizer(rows)
        config = SHAPES["tiny-llama"].config()
        config.update(dict(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=2, eos_token_id=3))
        model = build_model(config, ROWS["lora"], device=device, seed=None, adapter=adapter,
                            total_steps=settings.finetune_steps)
    else:
        from istune.data import build_commonsense_train
        from istune.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer("smollm2-135m", dtype=torch.float32)
        model = build_model(None, ROWS["lora"], model=model.to(device), device=device, seed=None, adapter=adapter,
                            total_steps=settings.finetune_steps)
        rows = build_commonsense_train()
    order = list(range(len(rows)))
    random.Random(settings.seed).shuffle(order)
    heldout = [rows[i] for i in order[: settings.heldout_samples]]
    needed = settings.finetune_steps * settings.finetune_batch_size
    train_rows = [rows[i] for i in order[settings.heldout_samples: settings.heldout_samples + needed]]
    collate = CausalLMCollator(tokenizer)
    train_set = InstructionDataset(train_rows, tokenizer, settings.cutoff_len, train_on_inputs=False)
    heldout_set = InstructionDataset(heldout, tokenizer, settings.cutoff_len, train_on_inputs=False)
    optimizer = torch.optim.AdamW(trainable(model), lr=3e-4)
    loader = torch.utils.data.DataLoader(train_set, batch_size=settings.finetune_batch_size, shuffle=True,
                                         collate_fn=collate, generator=torch.Generator().manual_seed(settings.seed))
    probes = ProbeSampler(train_set, collate, batch_size=settings.finetune_batch_size, seed=settings.seed)
    batches = (batch for _ in range(settings.finetune_steps) for batch in loader)  # enough for every step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    train(model, optimizer, batches, ISTConfig(seed=settings.seed, **row.ist), probe_batches=probes,
          max_steps=settings.finetune_steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    return {
        "heldout_loss": heldout_loss(model, heldout_set, collate, batch_size=8),
        "train_seconds": seconds, "steps": settings.finetune_steps,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "train_examples": len(train_rows), "heldout_examples": len(heldout),
    }


def run_row(key: str, settings: SuiteSettings | dict) -> dict[str, Any]:
    """Run one row in this process; the record of what it measured (with ``seconds`` and ``status``)."""
    settings = settings if isinstance(settings, SuiteSettings) else SuiteSettings(**settings)
    row = ALL_ROWS[key]
    started = time.perf_counter()
    result = run_finetune_row(row, settings) if row in FINETUNE_ROWS else run_frontier_row(row, settings)
    return {"key": key, "label": row.label, "status": "done", **result,
            "seconds": round(time.perf_counter() - started, 1)}


def _row_in_subprocess(key: str, settings: SuiteSettings, timeout_s: float) -> dict[str, Any]:
    """Run a row in a fresh Python process (its own CUDA context and peak counters); an OOM stays in it."""
    try:
        return run_in_child("istune.bench.gpu_suite:run_row", {"key": key, "settings": asdict(settings)}, timeout_s)
    except subprocess.TimeoutExpired:
        return {"key": key, "label": ALL_ROWS[key].label, "status": f"failed: over the {timeout_s:.0f} s left"}
    except ChildFailed as error:
        return {"key": key, "label": ALL_ROWS[key].label, "status": f"failed: {error}"}


def _size(value: float | None, unit: int) -> str:
    return "–" if value is None else f"{value / unit:.2f}"


def markdown(result: dict[str, Any]) -> str:
    meta, rows = result["meta"], {r["key"]: r for r in result["rows"]}
    settings, tiny = meta["settings"], meta["settings"]["tiny"]
    unit, name = (1024**2, "MiB") if tiny else (GIB, "GiB")
    lora = rows.get("lora", {})
    frontier = []
    for r in (rows[row.key] for row in FRONTIER_ROWS if row.key in rows):
        peak, plan = r.get("peak_allocated_bytes"), (r.get("prediction") or {}).get("peak_bytes")
        done, versus = r["status"] == "done", r["status"] == "done" and lora.get("status") == "done"
        frontier.append([r["label"], _size(peak, unit), _size(r.get("peak_reserved_bytes"), unit), _size(plan, unit),
                         f"{plan / peak:.3f}" if done and plan else "–",
                         f"{peak / lora['peak_allocated_bytes']:.2f}" if versus else "–",
                         f"{r['step_seconds_mean']:.3f} ({r['step_seconds_median']:.3f})" if done else "–",
                         f"{r['step_seconds_mean'] / lora['step_seconds_mean']:.2f}" if versus else "–", r["status"]])
    finetune = [[r["label"], f"{r['heldout_loss']:.4f}", f"{r['train_seconds']:.1f}",
                 _size(r.get("peak_allocated_bytes"), unit), r["status"]] if r["status"] == "done" else
                [r["label"], "–", "–", "–", r["status"]]
                for r in (rows[row.key] for row in FINETUNE_ROWS if row.key in rows)]
    warning = (f"**{NOT_MEASURED}.** This run used {meta['device']}; its figures are live tensor bytes "
               "(MemoryTracker), not a GPU's.\n\n" if meta["device"] != "cuda" else "")
    return (f"# GPU suite{' (--tiny smoke test)' if tiny else ''}\n\n{warning}Command: `{meta['command']}`  \n"
            f"Date: {meta['date']}; commit {meta['commit']}; {meta['machine']}\n\n"
            f"## Frontier: {settings['shape']} shape, {settings['dtype']}, batch {settings['batch_size']} x "
            f"{settings['seq_len']} tokens, SDPA, r = {settings['rank']}\n\n"
            + markdown_table(["row", f"peak allocated {name}", f"reserved {name}", f"istune plan {name}",
                              "plan / measured", "memory vs LoRA", "step s, mean (median)", "time vs LoRA", "status"],
                             frontier, "lrrrrrrrl")
            + f"\n\n## SmolLM2-135M{' (--tiny: a 4-layer random model)' if tiny else ''}, "
            f"{settings['finetune_steps']} steps on the commonsense mix, batch {settings['finetune_batch_size']}, "
            f"cutoff {settings['cutoff_len']}\n\n"
            + markdown_table(["row", "held-out loss", "train s", f"peak allocated {name}", "status"], finetune,
                             "lrrrl")
            + f"\n\nMemory: one step per row, isolation '{meta.get('isolation')}' (IST rows: the worst step, layer 0 "
            "selected). Time: the row's real policy; the mean over the timed steps includes IST's probes (every "
            "T_c = 10 steps), the median is a plain step. 'istune plan' is the planner's prediction of "
            "max_memory_allocated for the same row (random sparse: IST's row; LISA: not planned).\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="istune bench gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and a few steps: a smoke test (CPU, seconds)")
    parser.add_argument("--device", default=None, help="cuda (default) or cpu (with --tiny: cpu unless CUDA is there)")
    parser.add_argument("--budget_s", type=float, default=540,
                        help="total seconds: no row starts when less is left than the longest row took (default 540)")
    parser.add_argument("--rows", default=None, help=f"comma list of rows (default: all but DoRA), from: "
                        f"{', '.join(ORDER)}")
    parser.add_argument("--dora", action="store_true", help="also the DoRA rows")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per frontier row (default 20)")
    parser.add_argument("--finetune_steps", type=int, default=None, help="SmolLM2 steps (default 200)")
    parser.add_argument("--isolation", default=None, help="process: each row in its own Python process (the default; "
                        "its own CUDA context and peak counters, an OOM stays there); none: all rows in this process "
                        "(the default with --tiny)")
    parser.add_argument("--resume", action="store_true", help="keep rows already measured with the same settings")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON result (the .md goes beside it); default benchmarks/results/gpu_suite.json "
                        "(--tiny: gpu_suite_tiny.json)")
    return parser


def _settings(args: argparse.Namespace) -> SuiteSettings:
    device = args.device or ("cuda" if not args.tiny or torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"--device={device!r}: use cuda or cpu.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device=cuda, but this torch ({torch.__version__}, CUDA {torch.version.cuda}) sees no "
                         "GPU; install a CUDA build of torch on the GPU machine, or run --tiny on the CPU.")
    if device == "cpu" and not args.tiny:
        raise ValueError("--device=cpu runs only with --tiny (a 7B shape on a CPU takes hours); add --tiny.")
    settings = tiny_settings(device) if args.tiny else SuiteSettings(device=device)
    changes = {name: getattr(args, name) for name in ("steps", "finetune_steps") if getattr(args, name) is not None}
    for name, value in changes.items():
        if value < 1:
            raise ValueError(f"--{name}={value} must be at least 1.")
    if args.budget_s <= 0:
        raise ValueError(f"--budget_s={args.budget_s} must be positive (seconds).")
    return SuiteSettings(**{**asdict(settings), **changes})


def main(argv: list[str] | None = None) -> int:
    from istune.options import parse_list

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    settings = _settings(args)
    order = [NAMES[name] for name in ORDER]
    chosen = {NAMES[n] for n in parse_list("rows", args.rows, allowed=NAMES)} if args.rows else set(order)
    keys = [k for k in order if k in chosen and (args.rows or args.dora or k not in OPTIONAL)]
    out = args.out or Path("benchmarks/results") / ("gpu_suite_tiny.json" if args.tiny else "gpu_suite.json")
    if out.suffix != ".json":
        raise ValueError(f"--out={str(out)!r} must end in .json (the markdown goes beside it).")
    isolation = args.isolation or ("none" if args.tiny else "process")
    if isolation not in ("process", "none"):
        raise ValueError(f"--isolation={isolation!r}: use process or none.")
    done: dict[str, dict] = {}
    if args.resume and out.is_file():
        previous = json.loads(out.read_text())
        if previous["meta"]["settings"] == json.loads(json.dumps(asdict(settings))):
            done = {r["key"]: r for r in previous["rows"] if r["status"] == "done"}
    meta = {**run_metadata("benchmarks/gpu_suite.py", argv), "settings": asdict(settings),
            "device": settings.device,
            "gpu": torch.cuda.get_device_name() if settings.device == "cuda" else None, "isolation": isolation}
    started, longest = time.perf_counter(), 0.0
    records: list[dict] = []

    def save() -> None:
        result = {"meta": meta, "rows": records}
        write_record(out, result, markdown(result), indent=1)

    for key in keys:
        if key in done:
            records.append(done[key])
            continue
        left = args.budget_s - (time.perf_counter() - started)
        if left < longest or left <= 0:
            records.append({"key": key, "label": ALL_ROWS[key].label,
                            "status": f"not run: {left:.0f} s of --budget_s left, a row took up to {longest:.0f} s"})
            save()
            continue
        row_started = time.perf_counter()
        print(f"gpu suite: {key} ...", flush=True)
        if isolation == "none":
            try:
                record = run_row(key, settings)
            except torch.cuda.OutOfMemoryError as error:
                record = {"key": key, "label": ALL_ROWS[key].label, "status": f"failed: out of memory ({error})"}
        else:
            record = _row_in_subprocess(key, settings, timeout_s=left)
        longest = max(longest, time.perf_counter() - row_started)
        records.append(record)
        save()
        print(f"gpu suite: {key}: {record['status']} ({time.perf_counter() - row_started:.0f} s)", flush=True)
    print(markdown({"meta": meta, "rows": records}) + f"\nwrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
