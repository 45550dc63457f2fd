"""Activation checkpointing of the decoder layers that are not selected this step.

An unselected layer trains nothing, but the gradient of every selected layer below it
flows through it, so autograd keeps its activations (attention probabilities, MLP and
norm inputs) for the backward pass: most of a layer's memory, whatever it trains. With
``ISTConfig.recompute_unselected`` such a layer keeps only its inputs and runs its forward
again during the backward pass (non-reentrant :func:`torch.utils.checkpoint.checkpoint`,
the RNG state restored so dropout draws the same masks). Selected layers keep their
activations, as do layers that need no backward at all (nothing below them trains).

The price is one more forward of the unselected layers above the lowest selected one.
A checkpointed layer does not write to a KV cache (the replay would write it twice), as
under transformers' own gradient checkpointing; training has no use for the cache.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class UnselectedLayerRecompute:
    """Wraps each decoder block's ``forward`` so that unselected blocks are checkpointed.

    Args:
        blocks: the decoder blocks, in layer order (position j = ``blocks[j]``).

    Call :meth:`select` with the positions trained this step before the forward pass,
    and :meth:`remove` to restore the original ``forward`` methods.
    """

    def __init__(self, blocks: list[nn.Module]):
        self.blocks = list(blocks)
        self._checkpointed: set[int] = set()
        self.recomputed_calls = 0  # forwards run under checkpoint (counted once per forward, not per recompute)
        # A forward already set on the instance (accelerate's device-map hooks do that) is wrapped and put back.
        self._instance_forwards = [vars(block).get("forward") for block in self.blocks]
        for position, block in enumerate(self.blocks):
            block.forward = self._wrap(position, block, block.forward)

    def select(self, selected: list[int]) -> None:
        """Checkpoint every block whose position is not in ``selected``."""
        chosen = set(selected)
        self._checkpointed = {j for j in range(len(self.blocks)) if j not in chosen}

    def remove(self) -> None:
        """Give every block back the ``forward`` it had before."""
        for block, forward in zip(self.blocks, self._instance_forwards):
            if forward is None:
                vars(block).pop("forward", None)
            else:
                block.forward = forward
        self._checkpointed = set()

    def _wrap(self, position: int, block: nn.Module, forward: Callable) -> Callable:
        @functools.wraps(forward)
        def maybe_checkpointed(*args: Any, **kwargs: Any):
            if (position in self._checkpointed and torch.is_grad_enabled()
                    and not _checkpointed_by_transformers(block) and _needs_backward(args, kwargs)):
                self.recomputed_calls += 1
                if not getattr(block, "_can_checkpoint_with_cache", False):  # transformers' flag: reads the cache only
                    args, kwargs = _without_cache(args, kwargs)
                return checkpoint(forward, *args, use_reentrant=False, **kwargs)
            return forward(*args, **kwargs)

        return maybe_checkpointed


def _checkpointed_by_transformers(block: nn.Module) -> bool:
    """True when transformers' own gradient checkpointing already wraps this block's call."""
    return bool(getattr(block, "gradient_checkpointing", False)) and block.training


def _is_kv_cache(value: Any) -> bool:
    """A transformers ``Cache`` (or a legacy look-alike): something a layer appends its keys and values to."""
    return hasattr(value, "update") and hasattr(value, "get_seq_length")


def _without_cache(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's arguments with every KV cache replaced by None and ``use_cache`` off."""
    args = tuple(None if _is_kv_cache(value) else value for value in args)
    kwargs = {name: None if _is_kv_cache(value) else value for name, value in kwargs.items()}
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    return args, kwargs


def _needs_backward(args: tuple, kwargs: dict) -> bool:
    """True when some input tensor requires grad: a layer below it trains (or the embeddings do)."""
    def requires_grad(value: Any) -> bool:
        if isinstance(value, torch.Tensor):
            return value.requires_grad
        if isinstance(value, (tuple, list)):
            return any(requires_grad(item) for item in value)
        return False

    return requires_grad(args) or any(requires_grad(value) for value in kwargs.values())
