"""Trainer checkpoints under FSDP2 with IST: every adapter saved, each adapter's optimizer state loaded.

The Trainer saves and loads FSDP2 checkpoints through accelerate and torch's distributed state
dicts, and both decide per parameter by ``requires_grad``:

* *Saving* a peft model keeps only trainable parameters (``ignore_frozen_params``): the
  adapters IST froze this step would be missing from ``pytorch_model_fsdp.bin``, and a resumed
  run would start them from their initial weights.
* *Loading* the optimizer refuses a trainable parameter without saved state ("Missing optimizer
  state for parameter ..."), and gives a frozen one no state. Under IST an adapter never
  selected yet (or whose state ``unselected_optimizer_state='drop'`` removed) has none.

:func:`guard_checkpoints` wraps the Trainer's two methods so that every adapter is trainable
while a checkpoint is saved (the selection is put back right after), and exactly the adapters
whose state the checkpoint holds are trainable while the optimizer is loaded (all of them again
right after, before IST starts). The callback records those layers in the IST state at every
step (:func:`layers_with_optimizer_state`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator

import torch

from istune.core.layers import AdapterLayer, find_adapter_layers
from istune.integrations import deepspeed, trainer_internals
from istune.integrations.trainer_checks import fsdp_version

logger = logging.getLogger(__name__)

OPTIMIZER_STATE_KEY = "optimizer_state_layers"  # in the IST state: positions of the layers whose adapters have state


def layers_with_optimizer_state(optimizer: torch.optim.Optimizer, layers: list[AdapterLayer]) -> list[int]:
    """Positions of the layers whose every adapter parameter has optimizer state."""
    state = optimizer.state
    return [j for j, layer in enumerate(layers) if all(p in state for p in layer.parameters)]


def guard_checkpoints(trainer, state_key: str, current_layers: Callable[[], list[AdapterLayer] | None],
                      layers_path: str | None = None, towers: str = "train") -> None:
    """Wrap ``trainer``'s checkpoint saving and optimizer loading (once) for FSDP2 runs; other runs pass through.

    Args:
        trainer: the Trainer (``_save_checkpoint`` and ``_load_optimizer_and_scheduler`` are wrapped).
        state_key: where the IST state lives in ``TrainerState.stateful_callbacks``.
        current_layers: returns the tuner's layers while training (None before).
        layers_path: ``ISTConfig.layers_path``, to find the tuner's layers before it exists.
        towers: ``ISTConfig.towers``, likewise.
    """
    if not trainer_internals.has_methods(trainer, trainer_internals.SAVE_CHECKPOINT, trainer_internals.LOAD_OPTIMIZER):
        logger.warning("IST: this transformers version has no Trainer._save_checkpoint/_load_optimizer_and_scheduler;"
                       " FSDP2 checkpoints may miss the adapters frozen at the step they are saved.")
        return

    def with_every_adapter(save):
        def save_with_every_adapter(*args, **kwargs):  # DeepSpeed too: it saves a peft model without frozen parameters
            layers = current_layers() if _is_fsdp2(trainer) or deepspeed.is_deepspeed(trainer=trainer) else None
            with _trainable(layers, lambda position: True) if layers else contextlib.nullcontext():
                return save(*args, **kwargs)

        return save_with_every_adapter

    def with_saved_state(load):
        def load_with_saved_state(checkpoint):
            saved = _saved_layers(checkpoint, state_key) if _is_fsdp2(trainer) else None
            if saved is None:
                return load(checkpoint)
            with _trainable(find_adapter_layers(trainer.model, layers_path, towers), saved.__contains__):
                return load(checkpoint)

        return load_with_saved_state

    trainer_internals.replace_method(trainer, trainer_internals.SAVE_CHECKPOINT, with_every_adapter)
    trainer_internals.replace_method(trainer, trainer_internals.LOAD_OPTIMIZER, with_saved_state)


@contextlib.contextmanager
def _trainable(layers: list[AdapterLayer], trains: Callable[[int], bool]) -> Iterator[None]:
    """Within the context, layer j's adapters have ``requires_grad = trains(j)``; afterwards what they had."""
    before = [[p.requires_grad for p in layer.parameters] for layer in layers]
    try:
        for position, layer in enumerate(layers):
            for parameter in layer.parameters:
                parameter.requires_grad_(trains(position))
        yield
    finally:
        for flags, layer in zip(before, layers):
            for flag, parameter in zip(flags, layer.parameters):
                parameter.requires_grad_(flag)


def _is_fsdp2(trainer) -> bool:
    return fsdp_version(getattr(trainer, "args", None), trainer.model, trainer) == 2


def _saved_layers(checkpoint: str | None, state_key: str) -> set[int] | None:
    """The layers the checkpoint holds optimizer state for, or None (no checkpoint, or no such record)."""
    path = os.path.join(checkpoint, "trainer_state.json") if checkpoint else None
    if path is None or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        saved = (json.load(handle).get("stateful_callbacks") or {}).get(state_key) or {}
    layers = saved.get(OPTIMIZER_STATE_KEY)
    return set(layers) if isinstance(layers, list) else None
