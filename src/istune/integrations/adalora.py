"""AdaLoRA's rank reallocation under sparse tuning.

peft's AdaLoRA needs ``update_and_allocate(global_step)`` after every backward and before
the gradients are cleared; a Trainer never calls it, so ISTCallback does. Its sensitivity
score is ``|p · p.grad|``, which fails on a parameter IST froze this step (``grad is None``),
and a score of zero would mark a layer unimportant merely because it was not selected.
Here a frozen parameter keeps the smoothed sensitivity and uncertainty of the last step it
trained, and a parameter never trained yet scores the mean of the measured parameters of its
kind (lora_A, lora_E or lora_B): a neutral prior, neither favoured nor cut first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def is_adalora(model: nn.Module) -> bool:
    return hasattr(getattr(model, "base_model", None), "rankallocator")


def update_and_allocate(model: nn.Module, global_step: int) -> None:
    """Call AdaLoRA's ``update_and_allocate`` so that frozen (unselected) layers are handled as above."""
    allocator = model.base_model.rankallocator
    with _sparse_aware(allocator, model):
        model.base_model.update_and_allocate(global_step)


@contextlib.contextmanager
def _sparse_aware(allocator, model: nn.Module) -> Iterator[None]:
    parameters = dict(model.base_model.model.named_parameters())  # the names the allocator sees
    original_score = allocator._element_score

    def update_ipt(_model):
        for name, parameter in _model.named_parameters():
            if "lora_" not in name or allocator.adapter_name not in name or parameter.grad is None:
                continue
            if name not in allocator.ipt:
                allocator.exp_avg_ipt[name] = torch.zeros_like(parameter)
                allocator.exp_avg_unc[name] = torch.zeros_like(parameter)
            with torch.no_grad():
                allocator.ipt[name] = (parameter * parameter.grad).abs().detach()
                allocator.exp_avg_ipt[name] = (allocator.beta1 * allocator.exp_avg_ipt[name]
                                               + (1 - allocator.beta1) * allocator.ipt[name])
                uncertainty = (allocator.ipt[name] - allocator.exp_avg_ipt[name]).abs()
                allocator.exp_avg_unc[name] = (allocator.beta2 * allocator.exp_avg_unc[name]
                                               + (1 - allocator.beta2) * uncertainty)

    def element_score(name):
        if name in allocator.exp_avg_ipt:
            return original_score(name)
        kind = next(k for k in ("lora_A", "lora_B", "lora_E") if k in name)
        measured = [original_score(n).mean() for n in allocator.exp_avg_ipt if kind in n]
        prior = torch.stack(measured).mean() if measured else torch.tensor(0.0)
        return torch.full_like(parameters[name], prior.item())

    allocator.update_ipt, allocator._element_score = update_ipt, element_score
    try:
        yield
    finally:
        del allocator.update_ipt, allocator._element_score
