"""The planner: a training run's peak GPU memory predicted from the model's config alone (no weights, no GPU).

Its command line is ``istune plan`` (:mod:`istune.bench.plan`). Each row's model is built on PyTorch's
meta device (shapes, no data) and runs :func:`istune.planning.step.measured_steps` inside a
:class:`~istune.planning.tracker.MemoryTracker`: weights (``--load_in_4bit``: nf4 with its state and peft's
float32 parts), adapter gradients, AdamW's state, saved activations, logits and every temporary alive at
the peak. SDPA and 4-bit layers keep what their GPU kernels keep (:mod:`istune.planning.kernels`). IST rows
measure the worst step (:mod:`istune.planning.worst_case`). The prediction is tensor bytes
(``torch.cuda.max_memory_allocated``); ``budget`` adds a rule-of-thumb margin for the CUDA context,
workspaces and fragmentation (``prediction × 1.10 + 1 GiB``). Bf16 autocast over float32 weights is not
modelled. Agreement with real CPU runs is tested within 10% (``tests/planning/test_planner.py``).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from istune import rule_catalog
from istune.config import ISTConfig
from istune.io import write_text
from istune.planning.kernels import KERNEL_DEVICES, fused_sdpa_on_meta
from istune.planning.rows import ROWS, Row, stored_row
from istune.planning.step import DTYPES, build_model, make_batch, measured_steps, quiet, trainable
from istune.planning.worst_case import worst_case_selection, worst_case_selections

__all__ = ["PLAN_KEYS", "PlanSettings", "fill_comment", "plan", "predict", "predict_recipe", "recipe_settings",
           "table"]

GIB = 1024**3
PLAN_METHODS = ("lora", "dora", "series", "parallel")
ATTENTIONS = ("sdpa", "eager")
MARGIN_FRACTION = 0.10  # the budget column: allocator rounding and fragmentation ...
CONTEXT_BYTES = GIB  # ... plus the CUDA context, outside PyTorch's allocator (rule of thumb)
COMMENT_PREFIX = "# predicted peak GPU memory:"
# The rows `istune plan` predicts (for --method other than LoRA: the same rows of that method).
PLAN_KEYS = ("lora", "lora+gc", "lora+ist", "lora+ist+recompute", "lora+ist+gc", "lora+ist:drop",
             "lora+ist+recompute:drop", "lora+ist+gc:drop")


@dataclass(frozen=True)
class PlanSettings:
    """What the planned run trains with (the command line's options)."""

    batch_size: int = 1
    seq_len: int = 1024
    dtype: str = "bfloat16"
    method: str = "lora"
    rank: int = 32  # the paper: r = 32
    lora_dropout: float = 0.05  # the paper's recipes (dropout keeps a mask and a copy of each adapter input)
    target_modules: tuple[str, ...] | None = None  # None: istune's default placement (LoRA on q/k/v/up/down)
    bottleneck_size: int = 256
    load_in_4bit: bool = False
    double_quant: bool = True  # QLoRA's recipe (bnb_4bit_use_double_quant)
    attention: str = "sdpa"
    update_fraction: float | None = None  # N_u / N_L; None: ISTConfig's default (0.25)
    update_layers: int | None = None
    optimizer_impl: str = "foreach"  # AdamW's default on CUDA
    seed: int = 0  # of the random token ids (their values do not change the memory)
    kernels: str = "cuda"  # whose SDPA kernel choice to model: a GPU's, or "cpu" (what the tests measure against)


def validate_settings(settings: PlanSettings) -> None:
    """Check every option before any work; errors name the option, the value and the fix."""
    for name in ("batch_size", "seq_len", "rank", "bottleneck_size"):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name}={value!r} must be a positive integer.")
    if settings.dtype not in DTYPES:
        raise ValueError(f"--dtype={settings.dtype!r} is not one of {', '.join(DTYPES)}; use one of those.")
    if settings.method not in PLAN_METHODS:
        raise ValueError(f"--method={settings.method!r} cannot be planned; use one of {', '.join(PLAN_METHODS)}.")
    if settings.attention not in ATTENTIONS:
        raise ValueError(f"--attn_implementation={settings.attention!r} is not one of {', '.join(ATTENTIONS)}.")
    if settings.kernels not in KERNEL_DEVICES:
        raise ValueError(f"kernels={settings.kernels!r}: use one of {', '.join(KERNEL_DEVICES)}.")
    if settings.optimizer_impl not in ("foreach", "for-loop"):
        raise ValueError(f"--optimizer_impl={settings.optimizer_impl!r}: use foreach (CUDA's default) or for-loop.")
    if not 0 <= settings.lora_dropout < 1:
        raise ValueError(f"--lora_dropout={settings.lora_dropout!r} must be in [0, 1).")
    if settings.load_in_4bit and settings.method != "lora":
        raise ValueError(f"--load_in_4bit with --method={settings.method} is not planned (bottleneck adapters: not "
                         "over 4-bit weights; DoRA: peft dequantizes each 4-bit weight in its forward, which the "
                         "planner's stand-in does not model); use --method lora (QLoRA).")
    ISTConfig(update_fraction=settings.update_fraction, update_layers=settings.update_layers)  # named errors


def check_layer_counts(config, settings: PlanSettings) -> None:
    """N_u against the config's layer count, before any model is built (named error)."""
    num_layers = getattr(config, "num_hidden_layers", None)
    if isinstance(num_layers, int):
        ISTConfig(update_fraction=settings.update_fraction, update_layers=settings.update_layers).resolve(num_layers)


def _quantizer(settings: PlanSettings):
    """The 4-bit base (``--load_in_4bit``): nf4 linear layers in the decoder, then peft's kbit preparation."""
    def quantize(model: torch.nn.Module) -> torch.nn.Module:
        import peft

        from istune.core.layers import layer_list
        from istune.planning.kernels import quantize_linear_layers

        model.requires_grad_(True)
        blocks = list(layer_list(model, None)[1])
        quantize_linear_layers(model, blocks, DTYPES[settings.dtype], settings.double_quant)
        return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    return quantize


def predict(config, row: Row, settings: PlanSettings, selected: list[int] | None = None) -> dict[str, Any]:
    """Predicted peak bytes of one row's training step, and what makes it up.

    Args:
        config: the model's transformers config.
        row: the configuration (:data:`istune.planning.rows.ROWS`).
        settings: batch, sequence, dtype, method, ...
        selected: IST rows: the layers trained in the measured step. Default: the worst case
            (the largest peak of :func:`~istune.planning.worst_case.worst_case_selections`).

    Returns:
        dict with ``peak_bytes``, ``peak_breakdown`` (weights / gradients / optimizer /
        activations / other), ``peak_phase``, ``selected``, ``num_layers``, parameter counts.
    """
    started = time.perf_counter()
    row = row.with_method(settings.method) if row.method in PLAN_METHODS else row
    if row.ist is None or selected is not None:
        return _predict(config, row, settings, selected, started)
    num_layers = config.num_hidden_layers
    counts = ISTConfig(update_fraction=settings.update_fraction,
                       update_layers=settings.update_layers).resolve(num_layers)
    candidates = worst_case_selections(num_layers, counts.update_layers, row.ist.get("stored_layers"))
    return max((_predict(config, row, settings, layers, started) for layers in candidates),
               key=lambda result: result["peak_bytes"])


def _predict(config, row: Row, settings: PlanSettings, selected: list[int] | None, started: float) -> dict:
    from istune.core.layers import find_adapter_layers
    from istune.core.tuner import SparseTuner
    from istune.planning.tracker import MemoryTracker

    config = copy.deepcopy(config)
    config._attn_implementation = settings.attention  # what attn_implementation= sets, without its checks
    config.use_cache = False
    sdpa = fused_sdpa_on_meta(settings.kernels) if settings.attention == "sdpa" else contextlib.nullcontext()
    with sdpa, quiet():
        model = build_model(config, row, dtype=settings.dtype, device="meta", seed=settings.seed,
                            adapter=dict(rank=settings.rank, alpha=2 * settings.rank,
                                         lora_dropout=settings.lora_dropout, bottleneck_size=settings.bottleneck_size,
                                         target_modules=list(settings.target_modules) if settings.target_modules
                                         else None),
                            input_grads=False if row.ist is not None else None,
                            base=_quantizer(settings) if settings.load_in_4bit else None)
        num_layers = len(find_adapter_layers(model))
        params = trainable(model)
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=settings.optimizer_impl == "foreach")
        batch = make_batch(model.config.vocab_size, settings.batch_size, settings.seq_len, settings.seed,
                           settings.attention, "meta")  # SDPA: no mask (no padding: is_causal)
        make_tuner = None
        if row.ist is not None:
            counts = ISTConfig(update_fraction=settings.update_fraction,
                               update_layers=settings.update_layers).resolve(num_layers)
            selected = selected if selected is not None else worst_case_selection(num_layers, counts.update_layers)
            options = {k: v for k, v in row.ist.items() if k not in ("strategy", "update_layers")}
            config = ISTConfig(strategy="fixed", layers=list(selected), **options)
            make_tuner = lambda: SparseTuner(model, config, optimizer=optimizer)  # noqa: E731
        tracker = MemoryTracker(model, optimizer, device="meta")
        _, tuner = measured_steps(model, optimizer, batch, tracker, make_tuner)
        if tuner:
            tuner.close()
    report = tracker.report()
    return {
        "row": row.key, "label": row.label,
        "peak_bytes": report["peak_bytes"], "peak_breakdown": report["peak_breakdown"],
        "peak_phase": report["peak_phase"],
        "budget_bytes": int(report["peak_bytes"] * (1 + MARGIN_FRACTION)) + CONTEXT_BYTES,
        "selected": list(selected) if row.ist is not None else list(range(num_layers)),
        "num_layers": num_layers,
        "params_total": _parameter_count(model),
        "params_trainable": sum(p.numel() for p in params),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the model as built from its config (a 4-bit weight counts its parameters, not its bytes)."""
    from istune.planning.kernels import Meta4bitLinear

    packed = {id(m.weight): m.in_features * m.out_features for m in model.modules() if isinstance(m, Meta4bitLinear)}
    return sum(packed.get(id(p), p.numel()) for p in model.parameters())


def plan(config, settings: PlanSettings, rows: tuple[Row, ...], progress: bool = False) -> list[dict]:
    """:func:`predict` for every row (worst-case IST steps); LoRA rows become ``settings.method``'s."""
    validate_settings(settings)
    check_layer_counts(config, settings)
    results = []
    for row in rows:
        results.append(predict(config, row, settings))
        if progress:
            print(f"  {results[-1]['label']}: {_gib(results[-1]['peak_bytes'])} GiB ({results[-1]['seconds']} s)",
                  file=sys.stderr, flush=True)
    return results


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


def table(results: list[dict]) -> str:
    """The predictions as a Markdown table (GiB), with the ratio to the first row."""
    base = results[0]["peak_bytes"]
    lines = ["| configuration | peak GiB | vs first | budget GiB | weights | adapter grads + optimizer "
             "| saved activations | other (logits, temporaries) | peak in |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        b = r["peak_breakdown"]
        lines.append(f"| {r['label']} | {_gib(r['peak_bytes'])} | {r['peak_bytes'] / base:.2f} | "
                     f"{_gib(r['budget_bytes'])} | {_gib(b['weights'])} | {_gib(b['gradients'] + b['optimizer'])} | "
                     f"{_gib(b['activations'])} | {_gib(b['other'])} | {r['peak_phase']} |")
    return "\n".join(lines)


def header(source: str, config, settings: PlanSettings, results: list[dict]) -> str:
    """What was planned: the model, the method, the weights, the batch, and IST's worst step."""
    counts = results[0]
    weights = "nf4 (double quant)" if settings.load_in_4bit and settings.double_quant else (
        "nf4" if settings.load_in_4bit else settings.dtype)
    ist = [r for r in results if "+ist" in r["row"]]
    n_u = f"; IST trains N_u = {len(ist[0]['selected'])} of N_L = {ist[0]['num_layers']} layers, worst step " \
          f"(layers {ist[0]['selected']})" if ist else ""
    math = ("\nSDPA in float32 with grouped KV heads: a GPU runs its math kernel here, which keeps the (B, H, L, L) "
            "attention probabilities (istune.planning.kernels); --dtype bfloat16 avoids it."
            if _sdpa_math_on_gpu(config, settings) else "")
    return (f"{source}\n{getattr(config, 'model_type', '?')}, {counts['params_total'] / 1e9:.2f}B parameters "
            f"(adapters included); "
            f"{settings.method} r={settings.rank}, {counts['params_trainable'] / 1e6:.1f}M trainable; weights "
            f"{weights}; batch {settings.batch_size} x {settings.seq_len} tokens; attention {settings.attention}{n_u}"
            f"{math}")


def _sdpa_math_on_gpu(config, settings: PlanSettings) -> bool:
    """True when the planned run's SDPA falls back to the math kernel on a GPU (fp32, grouped KV heads)."""
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    compute = "float32" if settings.load_in_4bit else settings.dtype  # 4-bit: hidden states flow in float32
    return (settings.attention == "sdpa" and settings.kernels == "cuda" and compute == "float32"
            and isinstance(heads, int) and kv_heads != heads)


FOOTNOTE = ("Peak = tensor bytes at the worst moment of a step (what torch.cuda.max_memory_allocated reports). "
            "Not counted: the CUDA context (~0.5-1 GiB), workspaces, allocator fragmentation; budget = peak x 1.10 "
            "+ 1 GiB (a rule of thumb). Random sparse tuning has IST's memory (same N_u). 'offload' keeps the state "
            "in pinned CPU memory: on the GPU it is 'drop'.")


# Recipe keys (the Trainer's names first, then istune's) -> PlanSettings fields.
_RECIPE_KEYS = {
    "per_device_train_batch_size": "batch_size", "batch_size": "batch_size", "cutoff_len": "seq_len",
    "seq_len": "seq_len", "max_length": "seq_len", "method": "method", "rank": "rank", "lora_r": "rank",
    "lora_dropout": "lora_dropout", "target_modules": "target_modules", "bottleneck_size": "bottleneck_size",
    "load_in_4bit": "load_in_4bit", "attn_implementation": "attention", "update_fraction": "update_fraction",
    "update_layers": "update_layers",
}


def recipe_settings(values: dict) -> tuple[str, PlanSettings, Row]:
    """The model, the settings and the row a recipe's options describe (other options do not change memory)."""
    if not isinstance(values, dict):
        raise ValueError("a recipe file must be a YAML mapping of option names to values")
    model = values.get("model") or values.get("model_name_or_path")
    if not model:
        raise ValueError("the recipe names no model: add `model: <hub id or path>`")
    options = {_RECIPE_KEYS[k]: v for k, v in values.items() if k in _RECIPE_KEYS and v is not None}
    if "target_modules" in options:
        targets = options["target_modules"]
        options["target_modules"] = tuple(targets.split(",") if isinstance(targets, str) else targets)
    dtype = str(values.get("dtype") or values.get("torch_dtype") or "auto")
    if dtype == "auto":  # the recipe's auto: bf16 on a GPU that has it
        dtype = "float16" if values.get("fp16") else "bfloat16"
    options["dtype"] = dtype
    checkpointing = bool(values.get("gradient_checkpointing", False))
    gc = "+gc" if checkpointing else ""
    rule = rule_catalog.traits(values.get("strategy", "ist"))
    if rule is not None and rule.trains_all_layers:
        row = ROWS["lora" + gc]
    else:
        recompute = bool(values.get("recompute_unselected")) and not checkpointing
        drop = values.get("unselected_optimizer_state", "keep") != "keep"
        row = ROWS["lora+ist" + (gc or ("+recompute" if recompute else "")) + (":drop" if drop else "")]
        if values.get("stored_layers") is not None:  # the row with it, and the recipe's other IST options
            row = stored_row(values["stored_layers"], checkpointing, ist=row.ist)
    settings = PlanSettings(**options)
    return str(model), settings, row.with_method(settings.method) if settings.method in PLAN_METHODS else row


def predict_recipe(path: str | Path) -> tuple[dict, str]:
    """Predict the peak of the run a recipe YAML describes; return the prediction and its comment line."""
    import yaml

    from istune.planning.shapes import resolve_model_config

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--recipe={str(path)!r}: no such file; give a recipe YAML (configs/paper/*.yaml).")
    values = yaml.safe_load(path.read_text()) or {}
    model, settings, row = recipe_settings(values)
    validate_settings(settings)
    config, source = resolve_model_config(model)
    check_layer_counts(config, settings)
    result = predict(config, row, settings)
    weights = "4-bit" if settings.load_in_4bit else settings.dtype
    if settings.dtype == "float32" and (values.get("bf16") or values.get("fp16")):
        weights += " weights, autocast not modelled"
    comment = (f"{COMMENT_PREFIX} {_gib(result['peak_bytes'])} GiB tensors, budget {_gib(result['budget_bytes'])} "
               f"GiB ({result['label']}, batch {settings.batch_size} x {settings.seq_len}, {weights}; `istune plan "
               f"--recipe {path.as_posix()}`)")
    return {**result, "model": model, "source": source, "settings": asdict(settings)}, comment


def fill_comment(path: Path, comment: str) -> None:
    """Replace the recipe's ``# predicted peak GPU memory:`` line (or add it after the leading comments)."""
    lines = path.read_text().splitlines()
    at = next((i for i, line in enumerate(lines) if line.startswith(COMMENT_PREFIX)), None)
    if at is None:
        at = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
        lines.insert(at, comment)
    else:
        lines[at] = comment
    write_text(path, "\n".join(lines) + "\n")
