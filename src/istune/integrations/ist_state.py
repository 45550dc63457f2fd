"""What ISTCallback keeps of a run: the IST state in every Trainer checkpoint, and the JSON-lines log.

The state (importance, RNG states, step, selection, the selection rule's state) goes into
``TrainerState.stateful_callbacks`` under :data:`STATE_KEY`, so every checkpoint's
``trainer_state.json`` holds it and a resumed run continues exactly. The log has one JSON line per
selection and per probe, and per measurement a rule asked for ("measure": outlier ratios, gradient
norms, probe losses; "gradients": the norms a gradient rule was told); on resume it keeps the events
of the steps already trained. :class:`RunRecord` does both for the callback; the functions below it
are its parts.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path

import torch

from istune.core.probe import ProbeSampler
from istune.core.tuner import SparseTuner
from istune.integrations import fsdp2_checkpoints, trainer_internals
from istune.io import write_text

logger = logging.getLogger(__name__)

STATE_KEY = "istune"  # key of the IST state inside TrainerState.stateful_callbacks (saved with every checkpoint)
BEFORE_THE_STEP = ("select", "measure", "gradients")  # events recorded before the step they belong to had run
HISTORY_FLUSH_EVENTS = 64  # selection and probe events kept in memory before they are appended to the log


class RunRecord:
    """One training run's record: the IST state in the ``TrainerState`` and the JSON-lines log.

    Only the main process writes the log (:attr:`path` is None on the other ranks, and before training).
    """

    def __init__(self):
        self.path: str | None = None
        self.log_file: str | None = None
        self.sharded_optimizer = None  # under FSDP2: the optimizer whose per-layer state checkpoints record

    def start(self, args, state, log_file: str, tuner: SparseTuner, sampler: ProbeSampler | None,
              sharded_optimizer=None) -> None:
        """Continue ``tuner`` and ``sampler`` from the resumed state, and start the log (on resume: keep the steps
        already trained)."""
        self.sharded_optimizer = sharded_optimizer
        if state.global_step > 0:
            restore_state(state, tuner, sampler)
        self.log_file = log_file
        self.path = os.path.join(args.output_dir, log_file) if state.is_world_process_zero else None
        if self.path:
            truncate_log(self.path, keep_until_step=state.global_step)

    def flush(self, tuner: SparseTuner) -> None:
        """Append the tuner's events to the log, and clear them."""
        events, tuner.history = tuner.history, []
        if self.path:
            append_events(self.path, events)

    def save(self, state, tuner: SparseTuner, sampler: ProbeSampler | None) -> None:
        """Put the IST state into ``state`` (``TrainerState``): the next checkpoint saves it."""
        state.stateful_callbacks[STATE_KEY] = export_state(tuner, sampler, self.sharded_optimizer)

    def copy_log_into_checkpoint(self, args, state) -> None:
        """Add the log up to this step to the checkpoint the Trainer just saved (its state holds the IST state)."""
        checkpoint = trainer_internals.checkpoint_folder(args.output_dir, state.global_step)
        if self.path and os.path.exists(self.path) and os.path.isdir(checkpoint):
            write_text(os.path.join(checkpoint, self.log_file), Path(self.path).read_text(encoding="utf-8"))


def export_state(tuner: SparseTuner, sampler: ProbeSampler | None = None, sharded_optimizer=None) -> dict:
    """The tuner's state (and the probe sampler's RNG) as JSON values for ``trainer_state.json``.

    Under FSDP2 (``sharded_optimizer`` given) it also records which layers have optimizer state
    (:mod:`istune.integrations.fsdp2_checkpoints`).
    """
    tuner_state = tuner.state_dict()
    exported = {
        "num_layers": tuner_state["num_layers"],
        "strategy": tuner_state["strategy"],
        "importance": tuner_state["importance"].tolist(),
        "generator": _encode_rng(tuner_state["generator"]),
        "step": tuner_state["step"],
        "selected": tuner_state["selected"],
        "rule": tuner_state["rule"],
    }
    if sampler is not None:
        exported["probe_generator"] = _encode_rng(sampler.generator.get_state())
    if sharded_optimizer is not None:
        exported[fsdp2_checkpoints.OPTIMIZER_STATE_KEY] = fsdp2_checkpoints.layers_with_optimizer_state(
            sharded_optimizer, tuner.layers)
    return exported


def restore_state(state, tuner: SparseTuner, sampler: ProbeSampler | None = None) -> None:
    """Continue ``tuner`` (and ``sampler``) from the IST state in the resumed ``TrainerState``.

    Raises:
        ValueError: the saved state is malformed (nothing is changed then).
    """
    saved = (state.stateful_callbacks or {}).get(STATE_KEY)
    if saved is None:
        logger.warning("Resuming at step %d from a checkpoint without IST state: importance starts from zero.",
                       state.global_step)
        return
    try:
        tuner_state = {**saved, "generator": _decode_rng(saved["generator"])}
        probe_state = _decode_rng(saved["probe_generator"]) if "probe_generator" in saved else None
        if probe_state is not None:
            torch.Generator().set_state(probe_state)  # check it before anything changes
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"The IST state in the checkpoint (trainer_state.json, stateful_callbacks"
                         f"['{STATE_KEY}']) is malformed ({error!r}); resume from an intact checkpoint.") from None
    tuner.load_state_dict(tuner_state)
    if sampler is not None and probe_state is not None:
        sampler.generator.set_state(probe_state)


def append_events(path: str, events: list[dict]) -> None:
    """Append the tuner's history events to the log, one JSON line each."""
    if not events:
        return
    with open(path, "a", encoding="utf-8") as handle:
        for event in events:
            if event["event"] in BEFORE_THE_STEP:  # recorded before the step ran: name it by the step it trains
                event = {**event, "step": event["step"] + 1}
            handle.write(json.dumps(event) + "\n")


def truncate_log(path: str, keep_until_step: int) -> None:
    """Start a fresh log, or on resume keep only the events of steps already trained.

    A line cut short by a crash is dropped with a warning.
    """
    kept = []
    if keep_until_step > 0 and os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    if line.strip() and json.loads(line)["step"] <= keep_until_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    logger.warning("IST: dropped a malformed line of %s: %r", path, line[:80])
    write_text(path, "".join(kept))


def _encode_rng(rng_state: torch.Tensor) -> str:
    return base64.b64encode(rng_state.numpy().tobytes()).decode("ascii")


def _decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()
