"""Peak training memory per model shape and PEFT method, with and without IST (the paper's Table 1).

    .venv/bin/python -m istune.bench.memory_table                      # every shape and method, meta device
    .venv/bin/python -m istune.bench.memory_table --shapes gpt2-small --methods lora --device cpu
    .venv/bin/python -m istune.bench.memory_table --check              # also check meta against a CPU run
    .venv/bin/python -m istune.bench.memory_table --attention sdpa     # no eager column (half the runs)
    .venv/bin/python -m istune.bench.memory_table --quantize 4bit --device cpu --shapes llama-12x768 \\
        --methods lora --seq_len 512 --out benchmarks/results/qlora_memory.json    # QLoRA: a 4-bit base

Each row is built from its shape's config (random weights; on the ``meta`` device without memory) and
runs :func:`istune.planning.step.measured_steps` inside a :class:`~istune.planning.tracker.MemoryTracker`:
a warm-up step training every layer (not for LISA, whose measured steps lie in one sampling period), a
settling step, then ``--steps`` measured steps, seeded to include IST's worst case
(:mod:`istune.planning.worst_case`). SDPA on the meta device runs through
:func:`istune.planning.kernels.fused_sdpa_on_meta` (what a GPU's kernels keep; the kernels module says
why). ``--check`` runs small shapes on the CPU and on meta and requires the peaks to agree within 0.1
percent (SDPA rows without attention dropout: the CPU's flash kernel has none).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from istune.bench.memory_report import VARIANTS, check_table, gb, markdown
from istune.bench.records import run_metadata, write_record
from istune.config import ISTConfig, option_names
from istune.core.tuner import SparseTuner
from istune.option_checks import parse_list, require_at_least_one
from istune.planning.kernels import fused_sdpa_on_meta
from istune.planning.rows import Row
from istune.planning.shapes import SHAPES, Shape
from istune.planning.step import DTYPES, build_model, make_batch, measured_steps, trainable
from istune.planning.tracker import MemoryTracker
from istune.planning.worst_case import worst_case_seed

__all__ = ["METHODS", "Settings", "VARIANTS", "build_parser", "check_meta", "main", "measure", "measure_row",
           "variants_for"]

PAPER_SHAPES = ("gpt2-small", "tinyllama-1.1b", "llama-7b", "llama-13b")
METHODS = ("full", "series", "parallel", "lora", "lisa")
DEVICES = ("meta", "cpu", "cuda")
ATTENTIONS = ("sdpa", "eager")
ATTENTION_DROPOUT = {"gpt2": "attn_pdrop", "llama": "attention_dropout"}  # the config field, per Shape.family
OPTIMIZER_IMPLS = ("foreach", "for-loop")
QUANTIZATIONS = ("none", "4bit")
ADAPTER_METHODS = ("series", "parallel", "lora")  # what --quantize can be combined with
CHECK_TOLERANCE = 1e-3  # meta and measured peaks must agree within 0.1 percent


@dataclass(frozen=True)
class Settings:
    """What every run shares (the command line's options)."""

    seq_len: int = 1024  # the paper: prompts of up to 1024 tokens
    batch_size: int = 1  # the paper: mini-batch 1
    dtype: str = "float32"
    attention: str = "sdpa"  # transformers' default; the paper left flash attention out: see extra_attentions
    extra_attentions: tuple[str, ...] = ("eager",)  # each row measured with these too: a peak column each
    steps: int = 4  # measured steps per run, after one unmeasured warm-up step
    rank: int = 32  # LoRA rank (the paper: 32)
    bottleneck_size: int = 256  # series/parallel bottleneck (the paper: 256)
    seed: int = 0
    lisa_layers: int = 2  # LISA's paper: 2 layers
    lisa_embeddings: bool = True  # LISA's paper: embeddings and LM head always train
    optimizer_impl: str = "foreach"  # AdamW's default on CUDA
    quantize: str = "none"  # '4bit': the base model in bitsandbytes nf4 (QLoRA)


def variants_for(methods: list[str]) -> tuple[list[Row], list[Row]]:
    """The rows of ``methods`` that this ISTConfig supports, and those it does not (skipped)."""
    known = set(option_names())
    chosen = [v for v in VARIANTS if v.method in methods]
    usable = [v for v in chosen if v.ist is None or set(v.ist) <= known]
    return usable, [v for v in chosen if v not in usable]


def _quantizer(settings: Settings, device: str):
    """``model`` reloaded with its linear layers in 4-bit nf4 (bitsandbytes), computing in ``settings.dtype``."""
    def quantize(model: torch.nn.Module) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=DTYPES[settings.dtype])
        with tempfile.TemporaryDirectory() as folder, torch.device("cpu"):
            model.save_pretrained(folder)
            del model
            return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, device_map=device,
                                                        dtype=DTYPES[settings.dtype],
                                                        attn_implementation=settings.attention)  # not in config.json

    return quantize


def ist_config(variant: Row, settings: Settings, num_layers: int) -> tuple[ISTConfig, list[list[int]]]:
    """The row's ISTConfig (seed chosen for a worst-case step) and the selections its steps will make."""
    if variant.method == "lisa":  # one sampling period: the same layers every measured step
        seed, (layers,) = worst_case_seed("random", num_layers, settings.lisa_layers, settings.seed, 1)
        return ISTConfig(strategy="fixed", layers=layers, seed=seed), [layers] * settings.steps
    options = {"strategy": "ist", **variant.ist, "probe_interval": settings.steps + 2}  # no importance update is due
    count = ISTConfig(**options).resolve(num_layers).update_layers
    seed, schedule = worst_case_seed(options["strategy"], num_layers, count, settings.seed, settings.steps,
                                     unmeasured=1)  # the settling step
    return ISTConfig(**options, seed=seed), schedule


def measure(shape: Shape, variant: Row, settings: Settings, device: str = "meta",
            kernels: str = "cuda") -> dict[str, Any]:
    """Train ``settings.steps`` steps of one row with ``settings.attention`` inside a MemoryTracker; return the
    measurement (bytes). ``settings.extra_attentions`` are not measured here (see :func:`measure_row`).
    ``kernels``: on the meta device, whose SDPA kernels to stand in for (a GPU's, or the CPU's for ``--check``)."""
    meta_sdpa = settings.attention == "sdpa" and device == "meta"
    with fused_sdpa_on_meta(kernels) if meta_sdpa else contextlib.nullcontext():
        return _measure(shape, variant, settings, device)


def build(shape: Shape, variant: Row, settings: Settings, device: str) -> tuple[torch.nn.Module, int]:
    """The model of ``shape`` on ``device`` with ``variant``'s trainable parameters; and the base model's bytes."""
    base_bytes = []

    def base(model: torch.nn.Module) -> torch.nn.Module:
        if settings.quantize == "4bit":
            model = _quantizer(settings, device)(model)
        base_bytes.append(sum(t.nbytes for t in [*model.parameters(), *model.buffers()]))
        return model

    model = build_model(shape.config(settings.attention, settings.seq_len), variant, dtype=settings.dtype,
                        device=device, seed=settings.seed, total_steps=settings.steps + 1, base=base,
                        adapter=dict(rank=settings.rank, alpha=2 * settings.rank,
                                     bottleneck_size=settings.bottleneck_size),
                        train_embeddings=settings.lisa_embeddings, input_grads=True)
    return model, base_bytes[0]


def _measure(shape: Shape, variant: Row, settings: Settings, device: str) -> dict[str, Any]:
    start = time.perf_counter()
    model, base_bytes = build(shape, variant, settings, device)
    params = trainable(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=settings.optimizer_impl == "foreach")
    batch = make_batch(model.config.vocab_size, settings.batch_size, settings.seq_len, settings.seed,
                       settings.attention, device)
    schedule, config, layer_params = None, None, []
    if variant.ist is not None:
        config, schedule = ist_config(variant, settings, shape.num_layers)

    def make_tuner() -> SparseTuner:
        tuner = SparseTuner(model, config, optimizer=optimizer)
        layer_params.extend(sum(p.numel() for p in layer.parameters) for layer in tuner.layers)
        return tuner

    tracker = MemoryTracker(model, optimizer, device=device)
    # LISA: the measured steps are the start of one sampling period (no warm-up step)
    selections, tuner = measured_steps(model, optimizer, batch, tracker, make_tuner if config else None,
                                       settings.steps, warm_up=variant.method != "lisa")
    outside = sum(p.numel() for p in params) - sum(layer_params)
    selections = [s if s is not None else list(range(shape.num_layers)) for s in selections]
    if schedule is not None and selections != schedule:
        raise RuntimeError(f"SparseTuner selected {selections}, not the layers drawn beforehand {schedule}: its "
                           "policy draws changed; update istune.planning.worst_case.draw_schedule to match.")
    report = tracker.report()
    if tuner:
        tuner.close()
    steps = [{"step": i, "selected": selected, "peak_bytes": region["peak_bytes"], "peak_phase": region["peak_phase"],
              "peak_breakdown": region["peak_breakdown"]}
             for i, (selected, region) in enumerate(zip(selections, report["regions"]))]
    worst = max(steps, key=lambda s: s["peak_bytes"])  # the measured steps include one that trains layer 0
    trained = sum(layer_params[j] for j in worst["selected"]) + outside if tuner else sum(p.numel() for p in params)
    return {
        "shape": shape.name, "variant": variant.key, "label": variant.label, "method": variant.method,
        "baseline": variant.baseline, "device": device, "attention": settings.attention,
        "ist_config": config.to_dict() if config else None,
        "num_layers": shape.num_layers, "update_layers": len(worst["selected"]),
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in params),
        "params_trained_worst_step": trained,
        "base_weight_bytes": base_bytes,
        "peak_bytes": worst["peak_bytes"],  # the worst step measured
        "peak_breakdown": worst["peak_breakdown"],
        "peak_phase": worst["peak_phase"],
        "worst_step": worst["step"],
        "mean_step_peak_bytes": sum(s["peak_bytes"] for s in steps) / len(steps),
        "category_max": report["category_max"],
        "optimizer_state_bytes_at_end": report["current"]["optimizer"],
        "allocator_peak_bytes": report["allocator_peak_bytes"],
        "steps": steps,
        "seconds": round(time.perf_counter() - start, 1),
    }


def measure_row(shape: Shape, variant: Row, settings: Settings, device: str = "meta") -> dict[str, Any]:
    """:func:`measure` with ``settings.attention``, and again (the same draws) with each of
    ``settings.extra_attentions``, whose peaks, phase and breakdown go into the run's ``extra_attention``."""
    run = measure(shape, variant, settings, device)
    run["extra_attention"] = {}
    for attention in settings.extra_attentions:
        other = measure(shape, variant, dataclasses.replace(settings, attention=attention, extra_attentions=()),
                        device)
        run["extra_attention"][attention] = {key: other[key] for key in (
            "peak_bytes", "mean_step_peak_bytes", "peak_phase", "peak_breakdown", "worst_step", "seconds")}
    return run


def without_attention_dropout(shape: Shape) -> tuple[Shape, bool]:
    """``shape`` with attention dropout 0, and whether that changed it (why: :mod:`istune.planning.kernels`)."""
    field = ATTENTION_DROPOUT[shape.family]
    if getattr(shape.config(), field) == 0:
        return shape, False
    return dataclasses.replace(shape, sizes={**shape.sizes, field: 0.0}), True


def check_meta(shape_names: list[str], variants: list[Row], settings: Settings,
               device: str = "cpu") -> list[dict[str, Any]]:
    """Run every row on ``device`` and on meta, for each attention; one record per (shape, attention, row): both
    peaks (worst-case and mean), their relative difference and ``agrees`` (within ``CHECK_TOLERANCE``). SDPA rows
    on the CPU run without attention dropout (``attention_dropout_off``)."""
    records = []
    for name, attention in ((n, a) for n in shape_names for a in (settings.attention, *settings.extra_attentions)):
        one = dataclasses.replace(settings, attention=attention, extra_attentions=())
        shape, dropout_off = SHAPES[name], False
        if attention == "sdpa" and device == "cpu":
            shape, dropout_off = without_attention_dropout(shape)
        for variant in variants:
            measured = measure(shape, variant, one, device)
            predicted = measure(shape, variant, one, "meta", kernels=device)  # the kernels of the device compared
            worst = abs(predicted["peak_bytes"] - measured["peak_bytes"]) / measured["peak_bytes"]
            mean = abs(predicted["mean_step_peak_bytes"] - measured["mean_step_peak_bytes"]) / measured[
                "mean_step_peak_bytes"]
            records.append({
                "shape": name, "variant": variant.key, "label": variant.label, "device": device,
                "attention": attention, "attention_dropout_off": dropout_off,
                "measured_peak_bytes": measured["peak_bytes"], "meta_peak_bytes": predicted["peak_bytes"],
                "measured_mean_step_peak_bytes": measured["mean_step_peak_bytes"],
                "meta_mean_step_peak_bytes": predicted["mean_step_peak_bytes"],
                "relative_difference": worst, "relative_difference_mean": mean,
                "allocator_peak_bytes": measured["allocator_peak_bytes"],
                "agrees": max(worst, mean) <= CHECK_TOLERANCE,
            })
            print(f"check {name:12s} {attention:5s} {variant.label:35s} {device} {measured['peak_bytes']} B, meta "
                  f"{predicted['peak_bytes']} B: {worst:.1e} apart", flush=True)
    return records


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="istune bench memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(PAPER_SHAPES),
                        help=f"comma list of model shapes, from: {', '.join(SHAPES)} (default: the paper's four)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma list of methods, from: {', '.join(METHODS)}; each runs without and with IST "
                        "(LISA: sparse only), plus the rows with further IST options (default: all)")
    parser.add_argument("--seq_len", type=int, default=1024, help="tokens per sequence (the paper: up to 1024)")
    parser.add_argument("--batch_size", type=int, default=1, help="sequences per step (the paper: 1)")
    parser.add_argument("--dtype", default="float32", help=f"parameter dtype, one of {', '.join(DTYPES)}")
    parser.add_argument("--attention", default="sdpa,eager",
                        help="comma list of attention kernels: the first is the table's, each further one adds a "
                        "peak column per row (default: sdpa, with eager beside it). sdpa: what the fused kernel keeps "
                        "(on the meta device through the planner's stand-in); eager: also the (B, H, L, L) "
                        "attention probabilities (the paper: no flash attention)")
    parser.add_argument("--steps", type=int, default=4,
                        help="measured optimizer steps per run, after one unmeasured warm-up step")
    parser.add_argument("--device", default="meta",
                        help="meta (no memory used, any shape in seconds), cpu or cuda (really allocates)")
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank r (the paper: 32); alpha is 2r")
    parser.add_argument("--bottleneck_size", type=int, default=256,
                        help="series/parallel adapter bottleneck (the paper: 256)")
    parser.add_argument("--lisa_layers", type=int, default=2,
                        help="LISA: whole decoder layers trained per sampling period (LISA's paper: 2)")
    parser.add_argument("--lisa_embeddings", action=argparse.BooleanOptionalAction, default=True,
                        help="LISA: train the embeddings and LM head too, as LISA's paper does (default: yes)")
    parser.add_argument("--quantize", default="none",
                        help="'4bit': load the base model in 4-bit nf4 (bitsandbytes; QLoRA); needs --device cpu "
                             "or cuda and adapter methods")
    parser.add_argument("--optimizer_impl", default="foreach",
                        help="AdamW implementation: foreach (CUDA's default; one parameter-sized temporary during "
                        "the step) or for-loop (CPU's default)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weights, the batch and the first layer draw tried")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/memory_table.json"),
                        help="JSON result; the markdown goes beside it with the suffix .md")
    parser.add_argument("--check", action="store_true",
                        help="first run --check_shapes on --check_device and on meta for every row and attention, "
                        "require the peaks to agree within 0.1 percent, and put the agreement in the output (SDPA on "
                        "the CPU: attention dropout off, as its fused kernel has none)")
    parser.add_argument("--check_shapes", default="tiny-llama,tiny-gpt2",
                        help="comma list of the (small) shapes --check runs")
    parser.add_argument("--check_seq_len", type=int, default=128, help="tokens per sequence in --check runs")
    parser.add_argument("--check_device", default="cpu", help="the device --check measures on: cpu or cuda")
    return parser


def _one_of(option: str, value: str, known) -> None:
    if value not in known:
        raise ValueError(f"{option}={value!r} is not one of {', '.join(known)}; use one of those.")


def validate(args: argparse.Namespace) -> tuple[list[str], list[str], list[str], list[str]]:
    """Check every option before any work; return the shapes, methods, check shapes and attentions.

    Raises:
        ValueError: naming the option, its value and what to give instead.
    """
    shapes = parse_list("shapes", args.shapes, allowed=SHAPES)
    methods = parse_list("methods", args.methods, allowed=METHODS)
    check_shapes = parse_list("check_shapes", args.check_shapes, allowed=SHAPES) if args.check else []
    require_at_least_one(args, ("seq_len", "batch_size", "steps", "rank", "bottleneck_size", "lisa_layers",
                                "check_seq_len"))
    _one_of("--dtype", args.dtype, DTYPES)
    attentions = parse_list("attention", args.attention, allowed=ATTENTIONS)
    _one_of("--device", args.device, DEVICES)
    _one_of("--optimizer_impl", args.optimizer_impl, OPTIMIZER_IMPLS)
    _one_of("--quantize", args.quantize, QUANTIZATIONS)
    if args.quantize != "none":
        if args.device == "meta" or args.check:
            raise ValueError(f"--quantize={args.quantize} needs a real device: bitsandbytes has no meta kernels; "
                             "use --device cpu or cuda, without --check.")
        others = [m for m in methods if m not in ADAPTER_METHODS]
        if others:
            raise ValueError(f"--quantize={args.quantize} with --methods {','.join(others)}: quantized weights cannot "
                             f"train (full, LISA); use adapter methods ({', '.join(ADAPTER_METHODS)}).")
    _one_of("--check_device", args.check_device, ("cpu", "cuda"))
    if "cuda" in (args.device, args.check_device if args.check else None) and not torch.cuda.is_available():
        option = "--device" if args.device == "cuda" else "--check_device"
        raise ValueError(f"{option}=cuda, but this torch sees no CUDA device; use meta (no memory needed) or cpu.")
    if "lisa" in methods:
        for name in shapes + check_shapes:
            if args.lisa_layers > SHAPES[name].num_layers:
                raise ValueError(f"--lisa_layers={args.lisa_layers} exceeds the {SHAPES[name].num_layers} layers of "
                                 f"shape {name!r}; use at most {SHAPES[name].num_layers}.")
    if args.out.suffix != ".json":
        raise ValueError(f"--out={str(args.out)!r} must end in .json (the markdown goes beside it as .md).")
    return shapes, methods, check_shapes, attentions


def main(argv: list[str] | None = None) -> int:
    """Run the table; return 0, or 1 when ``--check`` finds the meta device off (nothing is written then)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    shapes, methods, check_shapes, attentions = validate(args)
    settings = Settings(seq_len=args.seq_len, batch_size=args.batch_size, dtype=args.dtype, attention=attentions[0],
                        extra_attentions=tuple(attentions[1:]),
                        steps=args.steps, rank=args.rank, bottleneck_size=args.bottleneck_size, seed=args.seed,
                        lisa_layers=args.lisa_layers, lisa_embeddings=args.lisa_embeddings,
                        optimizer_impl=args.optimizer_impl, quantize=args.quantize)
    variants, skipped = variants_for(methods)
    print(f"memory table: shapes {', '.join(shapes)}; rows {', '.join(v.key for v in variants)}; device "
          f"{args.device}; batch {settings.batch_size} x {settings.seq_len} tokens, {settings.dtype}; attention "
          f"{', '.join(attentions)}"
          f"{', base in ' + settings.quantize if settings.quantize != 'none' else ''}", flush=True)
    check = None
    if args.check:
        check = check_meta(check_shapes, variants, dataclasses.replace(settings, seq_len=args.check_seq_len),
                           args.check_device)
        print("\n".join(check_table(check)), flush=True)
        if not all(r["agrees"] for r in check):
            print("the meta device disagrees with the measured runs (above); nothing written", file=sys.stderr)
            return 1
    runs: dict[str, dict[str, dict]] = {}
    for name in shapes:
        runs[name] = {}
        for variant in variants:
            run = measure_row(SHAPES[name], variant, settings, args.device)
            runs[name][variant.key] = run
            extra = "".join(f", {attention} {gb(other['peak_bytes'])} GB"
                            for attention, other in run["extra_attention"].items())
            print(f"{name:15s} {variant.label:35s} peak {gb(run['peak_bytes'])} GB (mean step "
                  f"{gb(run['mean_step_peak_bytes'])}){extra}, {run['seconds']} s", flush=True)
    meta = {**run_metadata("-m istune.bench.memory_table", argv), "settings": dataclasses.asdict(settings),
            "device": args.device, "check_seq_len": args.check_seq_len if args.check else None,
            "shapes": {name: SHAPES[name].description for name in shapes},
            "skipped_variants": [v.key for v in skipped]}
    result = {"meta": meta, "check": check, "runs": runs}
    text = markdown(result)
    write_record(args.out, result, text, indent=1)
    print("\n" + text + f"\nwrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
