"""Per-layer measurements the data-driven selection rules ask for: adapter-gradient norms and outlier ratios.

Pure functions over ``(model, layers, batch, loss_fn)``; the tuner calls them to fill
:class:`~istune.core.selection.StepView`'s ``gradient_norms`` and ``outlier_ratios`` and, before each
optimizer step, :func:`layer_gradient_norms` for the rules that watch the gradients of the layers that
trained. Training is untouched: parameters, ``requires_grad`` flags and ``.grad`` are the same after a
measurement as before, dropout is off, and no global RNG is drawn from. Under torch.distributed every
result is averaged over ranks (:func:`~istune.core.distributed.mean_over_ranks`), bitwise identically, so
every rank's rule sees the same numbers; every rank must call them at the same point.

Cost: :func:`gradient_norms` is one forward and backward with every adapter trainable (the memory of a
step that trains all layers); :func:`outlier_ratios` is one forward without gradients plus two passes over
the decoder blocks' weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from istune.core import distributed
from istune.core.layers import AdapterLayer, is_adapter_module
from istune.core.probe import LossFn, default_loss, move_to_device, probe_mode

_NO_GRADIENT = ("gradient_norms: no adapter parameter of {names} received a gradient: these blocks ran without "
                "autograd or do not reach the loss. Measure with every decoder block running the backward pass (no "
                "block skipped below the lowest selected layer; gradient checkpointing non-reentrant).")


def gradient_norms(model: nn.Module, layers: Sequence[AdapterLayer], batch: Any,
                   loss_fn: LossFn = default_loss) -> torch.Tensor:
    """Each layer's adapter-gradient L2 norm from one forward and backward with every adapter trainable.

    The gradients are taken with :func:`torch.autograd.grad` on the layers' parameters only, so no
    ``.grad`` anywhere in the model is written (the adapters' own and those of any other trainable
    parameter stay exactly as they were). During the forward every adapter parameter requires grad,
    re-asserted by a forward pre-hook registered after any existing one (a tuner's hook that re-freezes
    the unselected layers before each forward runs first); the flags are restored afterwards. Eval mode
    (dropout off); the model's mode is restored.

    Args:
        model: the model (not a DDP wrapper: the tuner passes the module inside).
        layers: the adapter layers, position j = ``layers[j]``.
        batch: one batch for ``loss_fn`` (moved to the model's device).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default the model's own loss.

    Returns:
        ``(N_L,)`` float64 on the CPU: ``sqrt(sum over the layer's parameters of ||grad||^2)``, averaged
        over ranks.

    Raises:
        RuntimeError: no adapter parameter of some layer received a gradient (its block ran without
            autograd, e.g. a training loop that skips the backward of the lowest blocks).
    """
    parameters = [parameter for layer in layers for parameter in layer.parameters]
    device = next(model.parameters()).device
    batch = move_to_device(batch, device)
    was_training = model.training
    model.eval()
    try:
        with _all_trainable(model, parameters), torch.enable_grad():
            loss = loss_fn(model, batch)
            if not loss.requires_grad:
                raise RuntimeError(_NO_GRADIENT.format(names=[layer.name for layer in layers]))
            gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
    finally:
        model.train(was_training)
    norms, start = [], 0
    silent = []
    for layer in layers:
        layer_gradients = gradients[start: start + len(layer.parameters)]
        start += len(layer.parameters)
        if all(gradient is None for gradient in layer_gradients):
            silent.append(layer.name)
        norms.append(_norm(layer_gradients))
    if silent:
        raise RuntimeError(_NO_GRADIENT.format(names=silent))
    return _mean_over_ranks(torch.stack(norms), device)


def layer_gradient_norms(layers: Sequence[AdapterLayer], positions: Iterable[int]) -> dict[int, float]:
    """The adapter-gradient L2 norm of each layer at ``positions``, read from ``.grad`` (None counts as 0).

    Call after the backward pass and before the optimizer step (and after a gradient scaler's
    ``unscale_``: scaled gradients give scaled norms). Averaged over ranks so every rank holds the same
    numbers (under DDP the gradients are already equal; without it each rank's differ).

    Returns:
        ``{position: norm}`` for every position, in the order given.
    """
    positions = list(positions)
    if not positions:
        return {}
    device = layers[positions[0]].parameters[0].device
    norms = torch.stack([_norm([parameter.grad for parameter in layers[j].parameters]) for j in positions])
    norms = _mean_over_ranks(norms, device)
    return {j: float(norm) for j, norm in zip(positions, norms.tolist())}


def outlier_ratios(model: nn.Module, layers: Sequence[AdapterLayer], batch: Any, multiplier: float,
                   loss_fn: LossFn = default_loss) -> torch.Tensor:
    """OwLore's outlier ratio of each decoder layer, from one forward on ``batch``.

    OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity", its ``check_outlier_mean`` on the
    Wanda metric) and OwLore (Li et al. 2024, "OwLore: Outlier-weighed Layerwise Sampled Low-Rank
    Projection", which samples layers by these ratios): for every linear map W (out x in) of the
    block, the outlier score of weight (i, j) is ``A_ij = |W_ij| * ||X_j||_2``, with ``X_j`` the j-th
    input feature over all tokens of the batch (padding included); the layer's ratio is the share of
    its scores above ``multiplier`` x the mean score of the layer (all its linear maps together)::

        ratio_l = #{A_ij > M * mean(A)} / #A        over every linear map of block l

    The linear maps are the block's ``nn.Linear`` modules and GPT-2 style ``Conv1D`` ones, and the
    base layers of its adapter modules (peft LoRA's ``base_layer``): the pretrained weights, without the
    adapters' change (zero at LoRA's initialisation, small later); the adapters' own matrices are left
    out. OWL reports the ratio in percent; a fraction here (sampling in proportion is the same).
    Input norms come from forward hooks on the linear maps, in eval mode without gradients; scaling
    all ``||X_j||`` of a layer by one constant (OWL averages over calibration samples) leaves the ratio
    unchanged.

    Args:
        model: the model.
        layers: the adapter layers; ``layer.block`` is the decoder block measured.
        batch: one calibration batch for ``loss_fn`` (moved to the model's device).
        multiplier: M, the outlier threshold over the layer's mean score (OWL: 5 for LLaMA; OwLore's
            released LLaMA-2 ratios use 13).
        loss_fn: runs the forward; its value is not used.

    Returns:
        ``(N_L,)`` float64 on the CPU, each in [0, 1], averaged over ranks.

    Raises:
        ValueError: ``multiplier`` is not positive, or a block holds no floating-point linear map
            (quantized base weights are packed; their magnitudes mean nothing).
    """
    if not multiplier > 0:
        raise ValueError(f"outlier_ratios: multiplier={multiplier!r}; the outlier threshold M must be > 0 "
                         "(OWL uses 5, OwLore 13).")
    maps = [_linear_maps(layer) for layer in layers]
    squared_norms: dict[int, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple, output: Any) -> None:
        features = args[0].detach()
        squares = features.reshape(-1, features.shape[-1]).float().pow(2).sum(dim=0)
        squared_norms[id(module)] = squared_norms.get(id(module), 0) + squares

    hooks = [module.register_forward_hook(record) for layer_maps in maps for module, _ in layer_maps]
    device = next(model.parameters()).device
    try:
        with probe_mode(model):
            loss_fn(model, move_to_device(batch, device))
    finally:
        for hook in hooks:
            hook.remove()
    ratios = []
    for layer, layer_maps in zip(layers, maps):
        missing = [name for (module, _), name in zip(layer_maps, _names(layer, layer_maps))
                   if id(module) not in squared_norms]
        if missing:
            raise RuntimeError(f"outlier_ratios: the linear maps {missing} of {layer.name} did not run in the "
                               "forward pass; their input norms are unknown.")
        scores = [(weight, squared_norms[id(module)].sqrt()) for module, weight in layer_maps]
        ratios.append(_outlier_share(scores, multiplier))
    return _mean_over_ranks(torch.tensor(ratios, dtype=torch.float64, device=device), device)


def _outlier_share(scores: list[tuple[torch.Tensor, torch.Tensor]], multiplier: float) -> float:
    """Share of ``|W| * ||X||`` entries above ``multiplier`` x their mean, over several (W, ||X||) pairs.

    Two passes (the mean, then the count) so only one map's scores exist at a time.
    """
    total, count = 0.0, 0
    for weight, input_norms in scores:
        total += float((weight.detach().float().abs() * input_norms).sum(dtype=torch.float64))
        count += weight.numel()
    threshold = multiplier * total / count
    above = sum(int((weight.detach().float().abs() * norms > threshold).sum()) for weight, norms in scores)
    return above / count


def _linear_maps(layer: AdapterLayer) -> list[tuple[nn.Module, torch.Tensor]]:
    """``(module whose input is recorded, weight as out x in)`` for every linear map of the layer's block."""
    block = layer.block
    if block is None:
        raise ValueError(f"outlier_ratios: {layer.name} has no decoder block recorded; find the layers with "
                         "istune.core.layers.find_adapter_layers.")
    inside_adapters = {id(sub) for module in block.modules() if is_adapter_module(module)
                       for sub in module.modules() if sub is not module}
    maps = []
    for module in block.modules():
        if id(module) in inside_adapters:
            continue
        target = getattr(module, "base_layer", None) if is_adapter_module(module) else module
        weight = _weight_out_in(target) if target is not None else None
        if weight is not None:
            maps.append((target, weight))
    quantized = [type(module).__name__ for module, weight in maps if not weight.is_floating_point()]
    if quantized or not maps:
        raise ValueError(f"outlier_ratios: {layer.name} holds no floating-point linear map "
                         f"({quantized[0] + ' is quantized' if quantized else 'none found'}); outlier ratios need "
                         "the weights' magnitudes. Use another selection rule for quantized (QLoRA) models.")
    return maps


def _weight_out_in(module: nn.Module) -> torch.Tensor | None:
    """The weight of a linear map as (out features, in features); None for any other module."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 linear: weight (in, out)
        return module.weight.t()
    return None


def _names(layer: AdapterLayer, maps: list[tuple[nn.Module, torch.Tensor]]) -> list[str]:
    names = {id(module): name for name, module in layer.block.named_modules()}
    return [f"{layer.name}.{names.get(id(module), '?')}" for module, _ in maps]


def _norm(gradients: Iterable[torch.Tensor | None]) -> torch.Tensor:
    """L2 norm over several gradients (None counts as zero), float64 on the CPU."""
    total = torch.zeros((), dtype=torch.float64)
    for gradient in gradients:
        if gradient is not None:
            if hasattr(gradient, "full_tensor"):  # a DTensor shard (FSDP2): the whole gradient
                gradient = gradient.full_tensor()
            total += gradient.detach().double().pow(2).sum().cpu()
    return total.sqrt()


def _mean_over_ranks(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    values = values.to(device=distributed.collective_device(device), dtype=torch.float64)
    return distributed.mean_over_ranks(values).cpu()


@contextlib.contextmanager
def _all_trainable(model: nn.Module, parameters: list[nn.Parameter]) -> Iterator[None]:
    """Every parameter in ``parameters`` requires grad inside the block, also after any forward pre-hook."""
    saved = [parameter.requires_grad for parameter in parameters]

    def enable(*_: Any) -> None:
        for parameter in parameters:
            if not parameter.requires_grad:
                parameter.requires_grad_(True)

    enable()
    hook = model.register_forward_pre_hook(enable)
    try:
        yield
    finally:
        hook.remove()
        for parameter, flag in zip(parameters, saved):
            parameter.requires_grad_(flag)
