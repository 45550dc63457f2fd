"""Every part of transformers' ``Trainer`` istune touches beyond the callback events, listed in one place.

A ``TrainerCallback`` is handed ``args``, ``state``, ``control`` and the model. Whatever else istune
uses of the Trainer is a row of :data:`TRAINER_ATTRIBUTES` (the attribute, whether it is the Trainer's
public API, what istune does with it, the modules that do it), and whatever behaviour of transformers
and accelerate it relies on is a row of :data:`OTHER_INTERNALS`. The attributes outside the public
API are reached only through this module's functions.

``tests/integrations/test_trainer_internals.py`` checks that the table names every Trainer attribute
the package touches and nothing else, that only this module touches the non-public ones, and that
each one still exists and behaves as relied on under the installed transformers; the side
environments (``.ci/envs``) run it under each tool's own transformers.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from accelerate import state as accelerate_state
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

SAVE_CHECKPOINT = "_save_checkpoint"
LOAD_OPTIMIZER = "_load_optimizer_and_scheduler"
CREATE_OPTIMIZER = "create_optimizer"

# name -> (public API of the Trainer, what istune does with it, the modules that do it)
TRAINER_ATTRIBUTES: dict[str, tuple[bool, str, str]] = {
    SAVE_CHECKPOINT: (False, "wrapped: every adapter trainable while a checkpoint is saved", "fsdp2_checkpoints"),
    LOAD_OPTIMIZER: (False, "wrapped: the adapters with saved optimizer state trainable while it loads (FSDP2)",
                     "fsdp2_checkpoints"),
    CREATE_OPTIMIZER: (False, "replaced: the optimizer split per layer, unselected groups skipped", "deepspeed"),
    "callback_handler": (False, "its callbacks list: IST before the reporters, readable printers", "hf, console"),
    "model_wrapped": (False, "the DeepSpeed engine (its skipped steps, for step_guard), the DDP wrapper (checked)",
                      "hf, trainer_checks"),
    "accelerator": (False, ".state (FSDP, DeepSpeed plugins), .unscale_gradients() (fp16 gradient rules)",
                    "trainer_checks, deepspeed, step_guard"),
    "is_deepspeed_enabled": (False, "detection of DeepSpeed", "deepspeed"),
    "is_fsdp_enabled": (False, "detection of FSDP before the accelerator is built", "trainer_checks"),
    "add_callback": (True, "add_ist adds the callback", "hf"),
    "pop_callback": (True, "the time benchmark takes its callback back", "bench.frontier"),
    "remove_callback": (True, "the benchmarks drop the printer", "bench.frontier"),
    "model": (True, "the adapter layers before IST starts", "fsdp2_checkpoints, deepspeed, axolotl"),
    "args": (True, "the TrainingArguments (DeepSpeed, FSDP settings)", "hf, deepspeed, fsdp2_checkpoints"),
    "optimizer": (True, "checked to be the one split per layer", "deepspeed"),
    "train": (True, "runs the training", "recipe.train, bench.frontier"),
    "state": (True, "the log history after training", "recipe.train"),
}

# what istune relies on beyond the Trainer's attributes -> the modules that rely on it
OTHER_INTERNALS: dict[str, str] = {
    "CallbackHandler.callbacks order: DefaultFlowCallback, reporters, given callbacks, printer": "hf (add_ist)",
    "ProgressCallback / PrinterCallback state in __dict__, carried into a subclass": "console",
    "Trainer.log appends to TrainerState.log_history before on_log": "metrics",
    "TrainerState.stateful_callbacks saved in trainer_state.json": "ist_state, fsdp2_checkpoints",
    "checkpoint folder f'{PREFIX_CHECKPOINT_DIR}-{global_step}'": "ist_state (on_save)",
    "accelerate's AcceleratorState shared by every Accelerator of the process": "hf (the one-line form)",
    "Trainer._build_accelerator_args: find_unused_parameters off with activation checkpointing": "trainer_checks",
    "step events: on_pre_optimizer_step after clipping, on_step_end after zero_grad; DeepSpeed steps in backward":
        "hf, step_guard",
}

_WRAPPED = "_istune_wrapped"  # set on a replacement method: a Trainer's methods are replaced once


def callback_handler(trainer) -> CallbackHandler:
    """The Trainer's ``CallbackHandler``; its ``callbacks`` list is what the events run over, in order."""
    return trainer.callback_handler


def run_after_default_flow(handler: CallbackHandler, callback) -> bool:
    """Move ``callback`` right after ``DefaultFlowCallback`` in ``handler``, so it runs before the reporters.

    The Trainer lists ``DefaultFlowCallback``, then the reporters of ``report_to``, then the callbacks it is
    given. Moving to an earlier position during an event (``on_train_begin``) keeps the handler's ongoing
    iteration intact: later callbacks keep their index.

    Returns:
        False (nothing moved) when ``callback`` is not in ``handler``'s list.
    """
    callbacks = handler.callbacks
    if not any(listed is callback for listed in callbacks):
        return False
    first = next((i + 1 for i, listed in enumerate(callbacks) if isinstance(listed, DefaultFlowCallback)), 0)
    if callbacks.index(callback) > first:
        callbacks.remove(callback)
        callbacks.insert(first, callback)
    return True


def wrapped_model(trainer):
    """The outermost model the Trainer trains (DeepSpeed's engine, the DDP wrapper, or the model); None: no Trainer."""
    return getattr(trainer, "model_wrapped", None)


def accelerator_state(trainer):
    """The state of the Trainer's accelerator (its FSDP and DeepSpeed plugins), or None."""
    return getattr(getattr(trainer, "accelerator", None), "state", None)


def shared_accelerator_state():
    """Without the Trainer: accelerate's state, shared by every ``Accelerator`` of the process (the Trainer's too)."""
    return accelerate_state.AcceleratorState() if accelerate_state.is_initialized() else None


def unscale_gradients(trainer) -> None:
    """Divide the gradients by the fp16 loss scale, as the Trainer does before clipping."""
    trainer.accelerator.unscale_gradients()


def is_deepspeed_enabled(trainer) -> bool:
    return bool(getattr(trainer, "is_deepspeed_enabled", False))


def is_fsdp_enabled(trainer) -> bool:
    return bool(getattr(trainer, "is_fsdp_enabled", False))


def has_methods(trainer, *names: str) -> bool:
    """Whether this transformers' Trainer has every one of the methods ``names``."""
    return all(getattr(trainer, name, None) is not None for name in names)


def replace_method(trainer, name: str, wrap: Callable[[Callable], Callable]) -> None:
    """Replace ``trainer.<name>`` on this instance by ``wrap(original)``; once: a replaced method is kept."""
    original = getattr(trainer, name)
    if getattr(original, _WRAPPED, False):
        return
    replacement = functools.wraps(original)(wrap(original))
    setattr(replacement, _WRAPPED, True)
    setattr(trainer, name, replacement)


def checkpoint_folder(output_dir: str, global_step: int) -> str:
    """The folder the Trainer saves the checkpoint of ``global_step`` in."""
    return os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{global_step}")


def add_to_logged_entry(state, metrics: dict) -> None:
    """Add ``metrics`` to the entry the Trainer appended to ``state.log_history`` for this step, before ``on_log``."""
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(metrics)
