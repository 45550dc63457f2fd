"""`istune plan`: predict a training run's peak GPU memory from the model's config alone (no weights, no GPU).

    istune plan --model huggyllama/llama-7b --batch_size 4 --seq_len 256 --dtype bfloat16
    istune plan --model meta-llama/Meta-Llama-3-8B --batch_size 1 --seq_len 1024 --load_in_4bit
    istune plan --model path/to/model_folder --batch_size 8 --seq_len 512 --json plan.json
    istune plan --recipe configs/paper/llama7b_lora_ist.yaml [--fill]   # the row a recipe file runs

How it predicts: the model is built from its config on PyTorch's meta device (tensors
with shapes and no data: a 13B model costs no memory), gets the method's adapters, and runs
AdamW steps exactly as training does, inside :class:`istune.bench.MemoryTracker`, which
counts the bytes of every tensor alive and keeps the largest total (the same accounting as
``istune bench memory``). Each row: one step that trains every layer (AdamW then holds state
for all of them, as late in a long run), one IST settling step, then the measured step.

What it counts, per row:

- the weights in ``--dtype`` (with ``--load_in_4bit``: nf4 storage with its quantization
  state, see :mod:`istune.bench.meta_kernels`, and what peft's
  ``prepare_model_for_kbit_training`` keeps in float32: embeddings, norms, LM head; the
  hidden states then flow in float32 between the 4-bit matmuls, as they do on a GPU);
- adapter gradients and AdamW's state (peft keeps adapters in float32 over bf16 weights);
- the activations autograd saves, the logits and the loss's float32 copies, and every
  temporary alive at the peak (the backward's gradients, AdamW's foreach temporaries);
- SDPA attention as the fused GPU kernel keeps it (output and log-sum-exp, no attention
  matrix); ``--attn_implementation eager`` keeps the ``(B, H, L, L)`` probabilities. So does
  SDPA in float32 on a model with grouped KV heads (SmolLM2, TinyLLaMA, LLaMA-3): there a GPU
  runs SDPA's math kernel (:mod:`istune.bench.meta_kernels`); the plan's header says so.

IST's peak over a run is its worst step: the one whose selection holds layer 0 (everything
above the lowest selected layer takes part in the backward pass; any run of more than a few
steps draws layer 0). The planner measures that step: layer 0 and the N_u − 1 top layers.
The IST rows follow istune's checkpointing design: with gradient checkpointing, layers below
the lowest selected one run without autograd and layers from it upward keep only their
input; with ``recompute_unselected`` the unselected layers above it keep only their input;
``unselected_optimizer_state`` ``drop`` and ``offload`` free the state of unselected layers
on the GPU (``offload`` keeps it in pinned CPU memory instead).

What it does not count: the prediction is tensor bytes, what ``torch.cuda.max_memory_allocated``
reports. A GPU needs more: the CUDA context and kernels' code (outside PyTorch's allocator,
typically 0.5–1 GiB), cuBLAS/flash-attention workspaces, and the caching allocator's rounding
and fragmentation (``max_memory_reserved`` above ``max_memory_allocated``). The ``budget``
column adds a margin for those: ``prediction × 1.10 + 1 GiB``, a rule of thumb, not a
measurement (``benchmarks/gpu_suite.py`` records allocated and reserved peaks beside the
prediction to check it). Mixed-precision autocast over float32 weights (``--bf16`` with
``--dtype float32``) is not modelled: the weights and activations are taken in ``--dtype``.
Agreement with measured peaks of real CPU runs (tiny models, the same MemoryTracker) is
tested within 10% (``tests/bench/test_plan.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

from istune.bench.meta_kernels import KERNEL_DEVICES
from istune.bench.records import write_atomic

__all__ = ["PlanSettings", "ROWS", "Row", "main", "plan", "predict", "predict_recipe", "worst_case_selection"]

GIB = 1024**3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PLAN_METHODS = ("lora", "dora", "series", "parallel")
ATTENTIONS = ("sdpa", "eager")
MARGIN_FRACTION = 0.10  # the budget column: allocator rounding and fragmentation ...
CONTEXT_BYTES = GIB  # ... plus the CUDA context, outside PyTorch's allocator (rule of thumb)
COMMENT_PREFIX = "# predicted peak GPU memory:"


@dataclass(frozen=True)
class Row:
    """One configuration of the table.

    Attributes:
        key: short name (``--rows``, JSON).
        label: name in the table (``{method}`` is replaced by the method's name).
        ist: None to train every layer; else ISTConfig options beyond the worst-case selection.
        checkpointing: transformers' gradient checkpointing (non-reentrant) on.
    """

    key: str
    label: str
    ist: Optional[dict] = None
    checkpointing: bool = False


ROWS: tuple[Row, ...] = (
    Row("lora", "{method}"),
    Row("lora+gc", "{method} + gradient checkpointing", checkpointing=True),
    Row("ist", "{method} + IST", {}),
    Row("ist+recompute", "{method} + IST, recompute_unselected", {"recompute_unselected": True}),
    Row("ist+gc", "{method} + IST + gradient checkpointing", {}, checkpointing=True),
    Row("ist:drop", "{method} + IST, unselected state drop/offload", {"unselected_optimizer_state": "drop"}),
    Row("ist+recompute:drop", "{method} + IST, recompute + state drop/offload",
        {"recompute_unselected": True, "unselected_optimizer_state": "drop"}),
    Row("ist+gc:drop", "{method} + IST + checkpointing + state drop/offload",
        {"unselected_optimizer_state": "drop"}, checkpointing=True),
)
ROW_KEYS = tuple(row.key for row in ROWS)
_METHOD_LABELS = {"lora": "LoRA", "dora": "DoRA", "series": "Series", "parallel": "Parallel"}


@dataclass(frozen=True)
class PlanSettings:
    """What the planned run trains with (the command line's options)."""

    batch_size: int = 1
    seq_len: int = 1024
    dtype: str = "bfloat16"
    method: str = "lora"
    rank: int = 32  # the paper: r = 32
    lora_dropout: float = 0.05  # the paper's recipes (dropout keeps a mask and a copy of each adapter input)
    target_modules: Optional[tuple[str, ...]] = None  # None: istune's default placement (LoRA on q/k/v/up/down)
    bottleneck_size: int = 256
    load_in_4bit: bool = False
    double_quant: bool = True  # QLoRA's recipe (bnb_4bit_use_double_quant)
    attention: str = "sdpa"
    update_fraction: Optional[float] = None  # N_u / N_L; None: ISTConfig's default (0.25)
    update_layers: Optional[int] = None
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
    from istune.config import ISTConfig

    ISTConfig(update_fraction=settings.update_fraction, update_layers=settings.update_layers)  # named errors


# ------------------------------------------------------------------------------ one prediction


def _decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    from istune.core.layers import _layer_list

    return _layer_list(model, None)[1]


def build_model(config, settings: PlanSettings) -> torch.nn.Module:
    """The model of ``config`` on the meta device with ``settings``' adapters (trainable) and weights."""
    from transformers import AutoModelForCausalLM

    from istune.recipe.methods import AdapterArgs, add_adapters

    config = copy.deepcopy(config)
    config._attn_implementation = settings.attention  # what attn_implementation= sets, without its checks
    config.use_cache = False
    torch.manual_seed(settings.seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[settings.dtype])
        if settings.load_in_4bit:
            import peft

            from istune.bench.meta_kernels import quantize_linear_layers

            model.requires_grad_(True)
            quantize_linear_layers(model, list(_decoder_blocks(model)), DTYPES[settings.dtype], settings.double_quant)
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        args = AdapterArgs(method=settings.method, rank=settings.rank, alpha=2 * settings.rank,
                           lora_dropout=settings.lora_dropout, bottleneck_size=settings.bottleneck_size,
                           target_modules=list(settings.target_modules) if settings.target_modules else None)
        model = add_adapters(model, args, total_steps=10)
    return model.train()


def worst_case_selection(num_layers: int, update_layers: int) -> list[int]:
    """IST's worst step: layer 0 (the whole stack takes part in the backward pass) and the N_u − 1 top layers."""
    return [0] + list(range(num_layers - update_layers + 1, num_layers))


def worst_case_selections(num_layers: int, update_layers: int, stored_layers: Optional[int] = None) -> list[list[int]]:
    """The steps whose peak can be the largest: :func:`worst_case_selection`, and with ``stored_layers = M``
    (1 <= M < N_L) also the step that stores the most selected blocks (which keep more than unselected ones):
    the lowest selected layer at N_L − max(M, N_u) and the N_u − 1 top layers. For M >= N_u every block that runs
    the backward pass is stored; for M < N_u the top N_u layers are selected and M of them stored."""
    selections = [worst_case_selection(num_layers, update_layers)]
    if stored_layers is not None and 1 <= stored_layers < num_layers:
        lowest = num_layers - max(stored_layers, update_layers)
        stored_worst = [lowest] + list(range(num_layers - update_layers + 1, num_layers))
        if stored_worst != selections[0]:
            selections.append(stored_worst)
    return selections


def stored_rows(stored_layers: int) -> tuple[Row, ...]:
    """The IST rows with ``stored_layers`` (``istune plan --stored_layers M``), with and without checkpointing."""
    return (Row("ist+stored", f"{{method}} + IST, stored_layers={stored_layers}", {"stored_layers": stored_layers}),
            Row("ist+gc+stored", f"{{method}} + IST + gradient checkpointing, stored_layers={stored_layers}",
                {"stored_layers": stored_layers}, checkpointing=True))


def _enable_checkpointing(model: torch.nn.Module, ist: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if ist:  # IST-aware checkpointing: layers below the lowest selected one run without autograd. With the
        model.disable_input_require_grads()  # embeddings' output not requiring grad, those frozen layers build no graph


def predict(config, row: Row, settings: PlanSettings, selected: Optional[list[int]] = None) -> dict[str, Any]:
    """Predicted peak bytes of one row's training step, and what makes it up.

    Args:
        config: the model's transformers config.
        row: the configuration (:data:`ROWS`).
        settings: batch, sequence, dtype, method, ...
        selected: IST rows: the layers trained in the measured step. Default: the worst case
            (the largest peak of :func:`worst_case_selections`).

    Returns:
        dict with ``peak_bytes``, ``peak_breakdown`` (weights / gradients / optimizer /
        activations / other), ``peak_phase``, ``selected``, ``num_layers``, parameter counts.
    """
    from istune.config import ISTConfig

    started = time.perf_counter()
    if row.ist is None or selected is not None:
        return _predict(config, row, settings, selected, started)
    num_layers = config.num_hidden_layers
    counts = ISTConfig(update_fraction=settings.update_fraction,
                       update_layers=settings.update_layers).resolve(num_layers)
    candidates = worst_case_selections(num_layers, counts.update_layers, row.ist.get("stored_layers"))
    return max((_predict(config, row, settings, layers, started) for layers in candidates),
               key=lambda result: result["peak_bytes"])


def _predict(config, row: Row, settings: PlanSettings, selected: Optional[list[int]], started: float) -> dict:
    from istune.bench.memory import MemoryTracker
    from istune.bench.memory_table import make_batch, train_step
    from istune.bench.meta_kernels import fused_sdpa_on_meta
    from istune.config import ISTConfig
    from istune.core.layers import find_adapter_layers
    from istune.core.tuner import SparseTuner

    sdpa = fused_sdpa_on_meta(settings.kernels) if settings.attention == "sdpa" else contextlib.nullcontext()
    with sdpa, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's and transformers' notes about meta tensors and dtypes
        model = build_model(config, settings)
        num_layers = len(find_adapter_layers(model))
        if row.checkpointing:
            _enable_checkpointing(model, ist=row.ist is not None)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=settings.optimizer_impl == "foreach")
        batch = make_batch(model.config.vocab_size, settings, "meta")  # SDPA: no mask (no padding: is_causal)
        train_step(model, optimizer, batch)  # AdamW state for every layer, as late in a long run
        tuner = None
        if row.ist is not None:
            counts = ISTConfig(update_fraction=settings.update_fraction,
                               update_layers=settings.update_layers).resolve(num_layers)
            selected = selected if selected is not None else worst_case_selection(num_layers, counts.update_layers)
            tuner = SparseTuner(model, ISTConfig(strategy="fixed", layers=list(selected), **row.ist),
                                optimizer=optimizer)
            tuner.begin_step()  # settling step: what the previous step leaves (e.g. 'drop' freed state)
            train_step(model, optimizer, batch)
            tuner.end_step()
        with MemoryTracker(model, optimizer, device="meta") as tracker:
            if tuner:
                tuner.begin_step()
            train_step(model, optimizer, batch)
            if tuner:
                tuner.end_step()
        if tuner:
            tuner.close()
    report = tracker.report()
    return {
        "row": row.key, "label": row.label.format(method=_METHOD_LABELS[settings.method]),
        "peak_bytes": report["peak_bytes"], "peak_breakdown": report["peak_breakdown"],
        "peak_phase": report["peak_phase"],
        "budget_bytes": int(report["peak_bytes"] * (1 + MARGIN_FRACTION)) + CONTEXT_BYTES,
        "selected": list(selected) if row.ist is not None else list(range(num_layers)),
        "num_layers": num_layers,
        "params_total": _parameter_count(model),
        "params_trainable": sum(p.numel() for p in trainable),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the model as built from its config (a 4-bit weight counts its parameters, not its bytes)."""
    from istune.bench.meta_kernels import Meta4bitLinear

    packed = {id(m.weight): m.in_features * m.out_features for m in model.modules() if isinstance(m, Meta4bitLinear)}
    return sum(packed.get(id(p), p.numel()) for p in model.parameters())


def check_layer_counts(config, settings: PlanSettings) -> None:
    """N_u against the config's layer count, before any model is built (named error)."""
    from istune.config import ISTConfig

    num_layers = getattr(config, "num_hidden_layers", None)
    if isinstance(num_layers, int):
        ISTConfig(update_fraction=settings.update_fraction, update_layers=settings.update_layers).resolve(num_layers)


def plan(config, settings: PlanSettings, rows: tuple[Row, ...] = ROWS, progress: bool = False) -> list[dict]:
    """:func:`predict` for every row (worst-case IST steps)."""
    validate_settings(settings)
    check_layer_counts(config, settings)
    results = []
    for row in rows:
        results.append(predict(config, row, settings))
        if progress:
            print(f"  {results[-1]['label']}: {_gib(results[-1]['peak_bytes'])} GiB ({results[-1]['seconds']} s)",
                  file=sys.stderr, flush=True)
    return results


# ------------------------------------------------------------------------------ output


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


def table(results: list[dict], settings: PlanSettings) -> str:
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


def _header(source: str, config, settings: PlanSettings, results: list[dict]) -> str:
    counts = results[0]
    weights = "nf4 (double quant)" if settings.load_in_4bit and settings.double_quant else (
        "nf4" if settings.load_in_4bit else settings.dtype)
    ist = [r for r in results if r["row"].startswith("ist")]
    n_u = f"; IST trains N_u = {len(ist[0]['selected'])} of N_L = {ist[0]['num_layers']} layers, worst step " \
          f"(layers {ist[0]['selected']})" if ist else ""
    math = ("\nSDPA in float32 with grouped KV heads: a GPU runs its math kernel here, which keeps the (B, H, L, L) "
            "attention probabilities as eager attention does (flash attention takes only 16-bit inputs; the "
            "memory-efficient kernel takes no grouped heads); --dtype bfloat16, or the Trainer's bf16 autocast (not "
            "modelled here), avoids it."
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


# ------------------------------------------------------------------------------ recipe files

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
    strategy = values.get("strategy", "ist")
    checkpointing = bool(values.get("gradient_checkpointing", False))
    if strategy == "all":
        row = next(r for r in ROWS if r.key == ("lora+gc" if checkpointing else "lora"))
    else:
        ist = {}
        if values.get("recompute_unselected") and not checkpointing:
            ist["recompute_unselected"] = True
        if values.get("unselected_optimizer_state", "keep") != "keep":
            ist["unselected_optimizer_state"] = "drop"
        key = "ist" + ("+gc" if checkpointing else "+recompute" if ist.get("recompute_unselected") else "")
        key += ":drop" if ist.get("unselected_optimizer_state") else ""
        row = next(r for r in ROWS if r.key == key)
        if values.get("stored_layers") is not None:  # the row with it, and the recipe's other IST options
            stored = next(r for r in stored_rows(values["stored_layers"]) if r.checkpointing == checkpointing)
            row = replace(stored, key=stored.key + key[len("ist+gc" if checkpointing else "ist"):],
                          ist={**ist, **stored.ist})
    return str(model), PlanSettings(**options), row


def predict_recipe(path: str | Path) -> tuple[dict, str]:
    """Predict the peak of the run a recipe YAML describes; return the prediction and its comment line."""
    import yaml

    from istune.bench.builtin_configs import resolve_model_config

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
    write_atomic(path, "\n".join(lines) + "\n")


# ------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="istune plan", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub id (local HF cache or built-in shape), local folder with config.json, "
                        "or 'smollm2-135m'")
    parser.add_argument("--batch_size", type=int, default=1, help="sequences per device per step")
    parser.add_argument("--seq_len", type=int, default=1024, help="tokens per sequence (cutoff_len)")
    parser.add_argument("--dtype", default="bfloat16", help=f"weight dtype: {', '.join(DTYPES)} (4-bit: the "
                        "compute dtype)")
    parser.add_argument("--method", default="lora", help=f"PEFT method: {', '.join(PLAN_METHODS)}")
    parser.add_argument("--rank", type=int, default=32, help="LoRA/DoRA rank r (the paper: 32)")
    parser.add_argument("--lora_dropout", type=float, default=0.05, help="LoRA dropout (the paper: 0.05)")
    parser.add_argument("--target_modules", default=None,
                        help="comma list of modules to adapt (default: istune's: LoRA on q/k/v/up/down for LLaMA)")
    parser.add_argument("--load_in_4bit", action="store_true", help="QLoRA: nf4 weights (bitsandbytes) and "
                        "peft's prepare_model_for_kbit_training")
    parser.add_argument("--double_quant", action=argparse.BooleanOptionalAction, default=True,
                        help="4-bit: quantize the quantization constants too (QLoRA's recipe; default yes)")
    parser.add_argument("--attn_implementation", default="sdpa", help="sdpa (fused kernel; default) or eager")
    parser.add_argument("--update_fraction", type=float, default=None, help="N_u / N_L for the IST rows "
                        "(default 0.25)")
    parser.add_argument("--update_layers", type=int, default=None, help="N_u as a layer count")
    parser.add_argument("--rows", default=",".join(ROW_KEYS), help=f"comma list of rows, from: {', '.join(ROW_KEYS)}")
    parser.add_argument("--stored_layers", type=int, default=None,
                        help="also plan IST with ISTConfig.stored_layers = M (M of the layers that run backward keep "
                        "their activations, the others are recomputed), with and without gradient checkpointing")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the predictions to this JSON file, and the table as Markdown beside it")
    parser.add_argument("--recipe", type=Path, default=None,
                        help="predict the run a recipe YAML describes (its model, batch, cutoff_len, method, "
                        "load_in_4bit, gradient_checkpointing, dtype/bf16, strategy, IST options) and print its "
                        "comment line")
    parser.add_argument("--fill", action="store_true", help="with --recipe: write the comment line into the file")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    from istune.bench.builtin_configs import resolve_model_config
    from istune.recipe.options import parse_list

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.recipe is not None:
        result, comment = predict_recipe(args.recipe)
        print(f"{result['source']}\n{comment}")
        if args.fill:
            fill_comment(args.recipe, comment)
            print(f"wrote the line into {args.recipe}")
        return 0
    if args.fill:
        raise ValueError("--fill needs --recipe <file>: it writes the predicted line into that recipe file.")
    if not args.model:
        raise ValueError("--model is required: a hub id, a local folder with config.json, or 'smollm2-135m'.")
    rows = parse_list("rows", args.rows, allowed=ROW_KEYS)
    targets = tuple(parse_list("target_modules", args.target_modules)) if args.target_modules else None
    settings = PlanSettings(batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype, method=args.method,
                            rank=args.rank, lora_dropout=args.lora_dropout, target_modules=targets,
                            load_in_4bit=args.load_in_4bit, double_quant=args.double_quant,
                            attention=args.attn_implementation, update_fraction=args.update_fraction,
                            update_layers=args.update_layers)
    validate_settings(settings)
    if args.json is not None and args.json.suffix != ".json":
        raise ValueError(f"--json={str(args.json)!r} must end in .json.")
    config, source = resolve_model_config(args.model)
    check_layer_counts(config, settings)
    print(f"istune plan: {args.model}: predicting {len(rows)} rows on the meta device ...", file=sys.stderr)
    planned = tuple(r for r in ROWS if r.key in rows)
    if args.stored_layers is not None:
        from istune.config import ISTConfig

        ISTConfig(stored_layers=args.stored_layers)  # a bad value: the named error, before any model is built
        planned += stored_rows(args.stored_layers)
    results = plan(config, settings, planned, progress=True)
    text = _header(source, config, settings, results) + "\n\n" + table(results, settings) + "\n\n" + FOOTNOTE
    print(text)
    if args.json is not None:
        from istune.bench.records import run_metadata

        meta = run_metadata("-m istune plan", argv, Path(__file__).resolve().parents[3])
        write_atomic(args.json, json.dumps({"meta": meta, "model": args.model, "source": source,
                                            "settings": asdict(settings), "rows": results}, indent=1) + "\n")
        write_atomic(args.json.with_suffix(".md"), f"# istune plan: {args.model}\n\nCommand: `{meta['command']}`  \n"
                     f"Date: {meta['date']}; commit {meta['commit']}\n\n{text}\n")
        print(f"wrote {args.json} and {args.json.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
