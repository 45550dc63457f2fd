"""Response suppression (paper eq. 8): scale a layer's contribution by β, exactly.

For every suppressed adapter module the output becomes
``base(x) + β·(adapted(x) − base(x))``. Two ways get there:

* LoRA and AdaLoRA add ``scaling · Δ(x)`` to the base output, and istune's bottleneck
  adapters ``scaling · δ`` around an affine base, so multiplying their ``scaling`` by β
  is exact and costs nothing.
* Every other peft tuner layer (DoRA, whose magnitude part is not scaled by ``scaling``;
  IA3, LoHa, LoKr, VeRA, OFT, BOFT, FourierFT, LN tuning, ...) gets a forward hook that
  also runs ``module.base_layer`` on the same input and blends the two outputs.

A *full layer* (a decoder block that trains its own weights, LISA-style) has no adapter
to scale; its change is suppressed instead: during the probe its weights are
``W0 + β·(W − W0)``, with W0 the weights it started from (:func:`prepare_suppression`
keeps a copy). The blended weights exist for one block at a time, while it runs.

Only adapter modules and full layers are touched: no attribute of any other module
(such as the attention's own ``scaling``) is changed. :func:`prepare_suppression` refuses,
before training, what cannot be suppressed exactly.

Quantized bases (QLoRA: bitsandbytes ``Linear4bit``, ``Linear8bitLt``) need nothing else:
peft's LoRA layers for them add ``scaling · Δ(x)`` to the quantized layer's output, and the
blend runs the quantized ``base_layer`` itself. What a quantized adapter module must do for
the scaling path, read ``scaling`` at every forward, is checked once per module class
(:func:`_reads_scaling`): a fused kernel that captured the scale elsewhere is refused.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from istune.core.layers import AdapterLayer, loaded_peft_class, snapshot_initial_weights

logger = logging.getLogger(__name__)

# LoRA initialisations that move part of the pretrained weight into the adapter (and out of
# base_layer): β would then scale pretrained knowledge, not the fine-tuning change.
RESIDUAL_LORA_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def scales_linearly(module: nn.Module) -> bool:
    """True when scaling ``module.scaling`` by β scales exactly the adapter's contribution."""
    if getattr(module, "is_istune_adapter", False):
        return isinstance(getattr(module, "scaling", None), float)  # bottleneck adapters around an affine base
    if not isinstance(module, loaded_peft_class("peft.tuners.lora", "LoraLayer")):
        return False
    active = module.active_adapters
    variants = getattr(module, "lora_variant", {}) or {}
    dora = getattr(module, "use_dora", {}) or {}
    return all(name not in variants and not dora.get(name, False) for name in active)


def suppression_problems(model: nn.Module, layers: list[AdapterLayer]) -> list[str]:
    """Why eq. 8 cannot be applied exactly to some of ``layers`` (empty when it can).

    A layer is suppressible when every trainable parameter in it belongs to an adapter
    module that wraps a ``base_layer`` (and is not part of that base layer), or when it
    has no adapter modules and trains its own weights (a full layer).
    """
    problems = []
    for config in (getattr(model, "peft_config", None) or {}).values():
        init = getattr(config, "init_lora_weights", None)
        if isinstance(init, str) and init.lower().startswith(RESIDUAL_LORA_INITS):
            problems.append(
                f"LoRA init_lora_weights={init!r} moves part of the pretrained weights into the adapter, so scaling "
                "the adapter by β would scale pretrained knowledge, not the fine-tuning change; use the default "
                "init (init_lora_weights=True) or strategy 'random'")
    for layer in layers:
        problem = _layer_problem(layer)
        if problem:
            problems.append(f"layer {layer.index} ('{layer.name}'): {problem}")
    return problems


def prepare_suppression(
    model: nn.Module,
    layers: list[AdapterLayer],
    initial_device: torch.device | str = "cpu",
    initial_state: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Check that every layer can be suppressed exactly and keep what full layers need (W0).

    Call once before training starts: W0 are the weights at this moment, or ``initial_state``
    (the state dict training started from, for a resumed run). Full layers cost a copy of
    their trainable weights on ``initial_device`` (default CPU: as many bytes as the
    trainable blocks, e.g. 13 GB for LLaMA-7B in bf16); adapter layers cost nothing.

    Raises:
        ValueError: listing each layer or setting that eq. 8 cannot suppress exactly.
    """
    problems = suppression_problems(model, layers)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ValueError(f"IST's probes cannot suppress this model's layers exactly (eq. 8): {shown}. "
                         "A rule without suppression probes needs none ('random', 'fixed', 'all', 'lisa', 'badam').")
    if any(layer.is_full_layer and layer.initial is None for layer in layers):
        size = snapshot_initial_weights(layers, initial_device, initial_state)
        logger.info("IST: kept the initial weights of %d full layers (%.1f MB on %s) to suppress their change.",
                    sum(layer.is_full_layer for layer in layers), size / 2**20, initial_device)


@contextlib.contextmanager
def suppress_layers(layers: Iterable[AdapterLayer], beta: float) -> Iterator[None]:
    """Within the context, every layer in ``layers`` contributes at β strength (eq. 8).

    Adapter layers: :func:`suppress_adapters` on their adapter modules. Full layers:
    :func:`suppress_layer_deltas` (needs :func:`prepare_suppression` first).
    """
    layers = list(layers)
    with suppress_adapters([m for layer in layers for m in layer.adapters], beta), \
            suppress_layer_deltas([layer for layer in layers if layer.is_full_layer], beta):
        yield


@contextlib.contextmanager
def suppress_adapters(modules: Iterable[nn.Module], beta: float) -> Iterator[None]:
    """Within the context, every adapter module in ``modules`` responds at β strength (eq. 8).

    Restores scalings and removes hooks on exit, also after an exception.

    Raises:
        ValueError: an adapter is merged into its base weights (its response can no
            longer be separated; unmerge before training), or has no ``base_layer``.
    """
    restore_scaling: list[tuple[dict, str, float]] = []
    restore_attribute: list[tuple[nn.Module, float]] = []
    hooks = []
    try:
        for module in modules:
            if getattr(module, "merged", False):
                raise ValueError(f"Adapter {type(module).__name__} is merged into its base layer; IST cannot "
                                 "suppress a merged adapter. Call model.unmerge_adapter() before training.")
            if getattr(module, "base_layer", None) is None:
                raise ValueError(f"Cannot suppress {type(module).__name__}: it wraps no base_layer to blend with.")
            if scales_linearly(module) and isinstance(module.scaling, float):
                restore_attribute.append((module, module.scaling))
                module.scaling = module.scaling * beta
            elif scales_linearly(module):
                for name in module.active_adapters:
                    if name in module.scaling:
                        restore_scaling.append((module.scaling, name, module.scaling[name]))
                        module.scaling[name] = module.scaling[name] * beta
            else:
                hooks.append(module.register_forward_hook(_blend_hook(beta), with_kwargs=True))
        yield
    finally:
        for scaling, name, value in reversed(restore_scaling):
            scaling[name] = value
        for module, value in reversed(restore_attribute):
            module.scaling = value
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def suppress_layer_deltas(layers: Iterable[AdapterLayer], beta: float) -> Iterator[None]:
    """Within the context, each full layer runs with weights ``W0 + β·(W − W0)``, for no-grad probes.

    The blended weights are made when the block's forward starts and dropped when it
    ends, so at most one block's worth of extra memory is alive; the trained weights are
    never copied, only swapped back.

    Raises:
        ValueError: a layer has no initial weights (call :func:`prepare_suppression` first).
        RuntimeError: a suppressed block runs with gradients enabled.
    """
    layers = list(layers)
    for layer in layers:
        if layer.initial is None or layer.block is None:
            raise ValueError(f"Full layer {layer.index} ('{layer.name}') has no initial weights to suppress its "
                             "change towards; call istune.core.suppress.prepare_suppression(model, layers) "
                             "before training.")
    swapped: dict[int, list[tuple[nn.Parameter, torch.Tensor]]] = {}
    hooks = []

    def make_hooks(layer: AdapterLayer):
        def before(module, args):
            if torch.is_grad_enabled():
                raise RuntimeError("Full-layer suppression swaps weights and is for probes under torch.no_grad().")
            saved = []
            for parameter, initial in zip(layer.parameters, layer.initial):
                trained = parameter.data
                start = initial.to(trained.device, non_blocking=True)
                saved.append((parameter, trained))
                parameter.data = torch.lerp(start, trained, beta)  # W0 + β(W − W0); β=0 gives W0, β=1 gives W
            swapped[layer.index] = saved

        def after(module, args, output):
            for parameter, trained in swapped.pop(layer.index, []):
                parameter.data = trained

        return before, after

    try:
        for layer in layers:
            before, after = make_hooks(layer)
            hooks.append(layer.block.register_forward_pre_hook(before))
            hooks.append(layer.block.register_forward_hook(after, always_call=True))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for saved in swapped.values():
            for parameter, trained in saved:
                parameter.data = trained


def _layer_problem(layer: AdapterLayer) -> str | None:
    names = layer.parameter_names or [str(i) for i in range(len(layer.parameters))]
    trainable = dict(zip(map(id, layer.parameters), names))
    if layer.is_full_layer:
        foreign = _peft_owned(layer.block, trainable) if layer.block is not None else []
        if foreign:
            return (f"its trainable parameters belong to peft modules that are not tuner layers "
                    f"({', '.join(foreign[:3])}; e.g. adaption prompt, or modules_to_save inside the layers), "
                    "whose output eq. 8 cannot scale")
        return None
    covered: set[int] = set()
    for module in layer.adapters:
        base = getattr(module, "base_layer", None)
        if base is None:
            return f"adapter {type(module).__name__} wraps no base_layer, so its response cannot be separated"
        if is_quantized(base) and scales_linearly(module) and not _reads_scaling(module):
            return (f"its {type(module).__name__} adapter on a quantized {type(base).__name__} does not read its "
                    "`scaling` in the forward pass (a fused kernel?), so β cannot reach its response; use peft's own "
                    "LoRA layers for this quantization (bitsandbytes 4/8-bit work) or strategy 'random'")
        covered |= {id(p) for p in module.parameters()} - {id(p) for p in base.parameters()}
    outside = [name for key, name in trainable.items() if key not in covered]
    if outside:
        more = ", ..." if len(outside) > 3 else ""
        return (f"trainable parameters outside its adapters ({', '.join(outside[:3])}{more}; e.g. peft "
                "bias='all'/'lora_only' or modules_to_save inside the layers): eq. 8 scales adapter outputs, not "
                "other weights; freeze them or use strategy 'random'")
    return None


def is_quantized(module: nn.Module) -> bool:
    """True when ``module`` holds integer-packed weights (bitsandbytes 4/8-bit, GPTQ, AWQ, ...)."""
    return any(not (p.is_floating_point() or p.is_complex()) for p in module.parameters(recurse=False)) or \
        type(module).__module__.split(".")[0] in ("bitsandbytes", "auto_gptq", "gptqmodel", "awq", "hqq")


_READS_SCALING: dict[type, bool] = {}  # per adapter module class: does its forward read `scaling`?


def _reads_scaling(module: nn.Module) -> bool:
    """Whether ``module``'s forward uses its ``scaling`` now (checked once per class).

    Runs one row through the module with every active scale set to NaN: a forward that reads
    the scale returns NaN even when the adapter's output is zero (LoRA's B starts at zero).
    """
    cls = type(module)
    if cls not in _READS_SCALING:
        weight = next((p for name, p in module.named_parameters()
                       if p.is_floating_point() and "base_layer" not in name), None)
        in_features = getattr(module, "in_features", None) or getattr(module.base_layer, "in_features", None)
        if weight is None or not isinstance(in_features, int):
            return True  # nothing to run it with; the structural checks stand
        x = torch.randn(1, in_features, dtype=weight.dtype, device=weight.device)
        with suppress_adapters([module], float("nan")), torch.no_grad():
            _READS_SCALING[cls] = bool(torch.isnan(module(x)).any())
    return _READS_SCALING[cls]


def _peft_owned(block: nn.Module, trainable: dict[int, str]) -> list[str]:
    """Names of trainable parameters that live inside a peft module of ``block``."""
    found = []
    for name, module in block.named_modules():
        if type(module).__module__.startswith("peft."):
            found += [f"{name}.{n}" if name else n for n, p in module.named_parameters() if id(p) in trainable]
    return sorted(set(found))


def _blend_hook(beta: float):
    def hook(module: nn.Module, args: tuple, kwargs: dict, adapted: torch.Tensor) -> torch.Tensor:
        if not isinstance(adapted, torch.Tensor):
            raise TypeError(f"Cannot suppress {type(module).__name__}: its forward returns "
                            f"{type(adapted).__name__}, not a tensor.")
        base = module.base_layer(*args, **kwargs)
        return base + beta * (adapted - base)

    return hook
