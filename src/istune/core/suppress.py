"""Response suppression (paper eq. 8): scale the adapters' contribution by β, exactly.

For every suppressed adapter module the output becomes
``base(x) + β·(adapted(x) − base(x))``. Two ways get there:

* LoRA and AdaLoRA add ``scaling · Δ(x)`` to the base output, so multiplying their
  ``scaling`` by β is exact and costs nothing.
* Everything else (DoRA, whose magnitude part is not scaled by ``scaling``; IA3, LoHa,
  LoKr, VeRA; istune's bottleneck adapters) gets a forward hook that also runs
  ``module.base_layer`` on the same input and blends the two outputs.

Only adapter modules are touched: no attribute of any other module (such as the
attention's own ``scaling``) is changed.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

try:
    from peft.tuners.lora import LoraLayer
except ImportError:  # pragma: no cover
    LoraLayer = ()


def scales_linearly(module: nn.Module) -> bool:
    """True when scaling ``module.scaling`` by β scales exactly the adapter's contribution."""
    if not isinstance(module, LoraLayer):
        return False
    active = module.active_adapters
    variants = getattr(module, "lora_variant", {}) or {}
    dora = getattr(module, "use_dora", {}) or {}
    return all(name not in variants and not dora.get(name, False) for name in active)


@contextlib.contextmanager
def suppress_adapters(modules: Iterable[nn.Module], beta: float) -> Iterator[None]:
    """Within the context, every adapter module in ``modules`` responds at β strength (eq. 8).

    Restores scalings and removes hooks on exit, also after an exception.

    Raises:
        ValueError: an adapter is merged into its base weights (its response can no
            longer be separated); unmerge before training.
    """
    restore_scaling: list[tuple[dict, str, float]] = []
    hooks = []
    try:
        for module in modules:
            if getattr(module, "merged", False):
                raise ValueError(f"Adapter {type(module).__name__} is merged into its base layer; IST cannot "
                                 "suppress a merged adapter. Call model.unmerge_adapter() before training.")
            if scales_linearly(module):
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
        for hook in hooks:
            hook.remove()


def _blend_hook(beta: float):
    def hook(module: nn.Module, args: tuple, kwargs: dict, adapted: torch.Tensor) -> torch.Tensor:
        if not isinstance(adapted, torch.Tensor):
            raise TypeError(f"Cannot suppress {type(module).__name__}: its forward returns "
                            f"{type(adapted).__name__}, not a tensor.")
        base = module.base_layer(*args, **kwargs)
        return base + beta * (adapted - base)

    return hook
