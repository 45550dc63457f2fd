"""BottleneckLayer: a frozen linear layer plus a trainable bottleneck adapter.

The wrapper keeps the original module as ``self.base_layer`` (frozen, untouched), so
``layer.base_layer(x)`` is always the un-adapted output for the same input, and all
trainable adapter weights live in the wrapper (``adapter_down``, ``adapter_up``).

With delta(h) = s * f(dropout(h) W_down) W_up, the forward of each kind is::

    series:        base(x) + delta(base(x))          # eq. 13, adapter on the output
    series_input:  base(x + delta(x))                # adapter on the input, then base
    parallel:      base(x) + delta(x)                # eq. 11, adapter beside base

Because base is affine (Linear / Conv1D), multiplying ``scaling`` by beta gives exactly
``base(x) + beta * (adapted(x) - base(x))`` for all three kinds.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import BottleneckConfig

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU,
                "identity": nn.Identity}


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """Return (in_features, out_features) of an nn.Linear or GPT-2 Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):  # transformers' Conv1D stores weight as (in, out)
        return tuple(module.weight.shape)
    return None


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain-torch use
        return False
    return isinstance(module, Conv1D)


class BottleneckLayer(nn.Module):
    """Wrap ``base_layer`` (nn.Linear or Conv1D) with a bottleneck adapter.

    Args:
        base_layer: the module to adapt; its parameters are frozen here.
        config: kind, bottleneck size, activation, dropout, scaling and init.

    Shapes: input ``(..., in_features)``, output ``(..., out_features)``. The adapter
    works on width d = out_features for ``series`` and in_features for ``series_input``;
    ``parallel`` maps in_features -> r -> out_features.
    """

    is_istune_adapter = True

    def __init__(self, base_layer: nn.Module, config: BottleneckConfig) -> None:
        super().__init__()
        features = linear_features(base_layer)
        if features is None:
            raise TypeError(f"BottleneckLayer wraps nn.Linear or transformers Conv1D, got "
                            f"{type(base_layer).__name__}: target a linear layer instead.")
        self.base_layer = base_layer
        self.in_features, self.out_features = features
        self.config = config
        self.kind = config.kind
        self.scaling = config.scaling
        for p in base_layer.parameters():
            p.requires_grad_(False)

        d_in, d_out = {
            "series": (self.out_features, self.out_features),
            "series_input": (self.in_features, self.in_features),
            "parallel": (self.in_features, self.out_features),
        }[config.kind]
        r = config.bottleneck_size
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.adapter_down = nn.Linear(d_in, r, bias=False, **factory)     # W_down: d_in x r
        self.adapter_up = nn.Linear(r, d_out, bias=False, **factory)      # W_up:   r x d_out
        self.adapter_act = _ACTIVATIONS[config.non_linearity]()
        self.adapter_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.reset_adapter_parameters()

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        """Initialise the adapter per ``config.init`` ('zero_up' starts at the base model)."""
        if self.config.init == "zero_up":
            self.adapter_down.reset_parameters()  # kaiming-uniform, nn.Linear's default
            nn.init.zeros_(self.adapter_up.weight)
        else:  # "bert"
            nn.init.normal_(self.adapter_down.weight, mean=0.0, std=0.02)
            nn.init.normal_(self.adapter_up.weight, mean=0.0, std=0.02)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The adapter's own parameters (never those of ``base_layer``)."""
        return [self.adapter_down.weight, self.adapter_up.weight]

    def adapter_delta(self, h: torch.Tensor) -> torch.Tensor:
        """s * f(dropout(h) W_down) W_up, computed in the adapter's dtype, returned in h's."""
        z = self.adapter_dropout(h.to(self.adapter_down.weight.dtype))
        return (self.adapter_up(self.adapter_act(self.adapter_down(z))) * self.scaling).to(h.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "series_input":
            return self.base_layer(x + self.adapter_delta(x))
        out = self.base_layer(x)
        return out + self.adapter_delta(out if self.kind == "series" else x)

    # Read-only views of the wrapped weights, for code that inspects `module.weight`.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, bottleneck_size={self.config.bottleneck_size}, "
                f"non_linearity={self.config.non_linearity}, scaling={self.scaling}")
