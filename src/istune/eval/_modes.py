"""Put a model in inference mode for evaluation and restore it exactly afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run the block with ``model.eval()`` and gradients off, then restore.

    Every submodule's own ``training`` flag is restored, not just the top
    one, so a model that was partly in eval mode comes back the same.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (where its inputs must go)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
