"""ISTCallback: IST in a Hugging Face ``Trainer`` with one line.

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                      callbacks=[ISTCallback(ISTConfig())])

Events per optimizer step (transformers 5.x): ``on_step_begin`` picks the layers and
freezes the rest before the first micro-batch's forward, so gradient accumulation keeps
one selection per optimizer step; ``on_step_end`` (after ``optimizer.step`` and
``zero_grad``) counts the step and runs the importance probes every T_c steps.
"""

from __future__ import annotations

import base64
import inspect
import json
import logging
import os
from typing import Optional

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from istune.config import ISTConfig
from istune.core.probe import ProbeSampler
from istune.core.tuner import SparseTuner
from istune.integrations import adalora

logger = logging.getLogger(__name__)

STATE_KEY = "istune"  # key of the IST state inside TrainerState.stateful_callbacks (saved with every checkpoint)
LOG_FILE = "ist_log.jsonl"


class ISTCallback(TrainerCallback):
    """Importance-aware Sparse Tuning as a ``TrainerCallback``.

    Every optimizer step only N_u layers' adapters train, chosen by ``p_i ~ U(0, σ(I_i))``
    (eq. 6-7); every T_c steps N_c candidate sets are probed on one batch with the other
    adapters scaled by β (eq. 8), and ``I_i += μ·(e^{-L_j} − mean_k e^{-L_k})`` for i in S_c^j
    (eq. 9-10).

    Args:
        config: IST hyperparameters; default the paper's.
        probe_dataset: map-style dataset for the probe batches, collated like the training
            data; default: the training dataset, sampled by istune's own seeded sampler.
        log_file: JSON-lines file in ``args.output_dir`` with every selection and probe.

    Attributes:
        importance: the importance vector I (``N_L`` floats), once training started.
        selected: layer positions trained in the current step.
        tuner: the underlying :class:`~istune.core.tuner.SparseTuner`.

    Example:
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[ISTCallback()])
    """

    def __init__(self, config: Optional[ISTConfig] = None, probe_dataset=None, log_file: str = LOG_FILE):
        self.config = config or ISTConfig()
        self.probe_dataset = probe_dataset
        self.log_file = log_file
        self.tuner: Optional[SparseTuner] = None
        self.sampler: Optional[ProbeSampler] = None
        self._selection_counts: Optional[torch.Tensor] = None
        self._steps_since_log = 0
        self._last_probe: Optional[dict] = None
        self._log_path: Optional[str] = None

    @property
    def importance(self) -> torch.Tensor:
        return self._require_tuner().importance

    @property
    def selected(self) -> list[int]:
        return self._require_tuner().selected

    def _require_tuner(self) -> SparseTuner:
        if self.tuner is None:
            raise RuntimeError("ISTCallback has no state before training starts (trainer.train()).")
        return self.tuner

    # ---- Trainer events ---------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        _run_before_reporters(self)
        if self.tuner is not None:
            self.tuner.close()
        self.tuner = SparseTuner(model, self.config, optimizer=optimizer)
        if self.config.strategy == "ist":
            dataset = self.probe_dataset if self.probe_dataset is not None else train_dataloader.dataset
            batch_size = self.config.probe_batch_size or args.per_device_train_batch_size
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            self.sampler = ProbeSampler(dataset, train_dataloader.collate_fn, batch_size, self.config.seed + 1 + rank)
            self.tuner.probe_batches = self.sampler
        self._selection_counts = torch.zeros(self.tuner.num_layers)
        self._steps_since_log = 0
        if state.global_step > 0:
            self._restore(state)
        self._log_path = os.path.join(args.output_dir, self.log_file) if state.is_world_process_zero else None
        if self._log_path:
            os.makedirs(args.output_dir, exist_ok=True)
            _truncate_log(self._log_path, keep_until_step=state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        selected = self.tuner.begin_step()
        self._selection_counts[selected] += 1
        self._steps_since_log += 1

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # AdaLoRA reallocates ranks after backward and before zero_grad; the Trainer never calls it.
        if adalora.is_adalora(model):
            adalora.update_and_allocate(model, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        record = self.tuner.end_step()
        if record is not None:
            self._last_probe = record
        self._write_history()
        state.stateful_callbacks[STATE_KEY] = self._export_state()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.tuner is None or logs is None or "loss" not in logs:
            return
        metrics = {f"ist/importance/layer_{i:02d}": float(v) for i, v in enumerate(self.tuner.importance)}
        rates = self._selection_counts / max(self._steps_since_log, 1)
        metrics.update({f"ist/selected/layer_{i:02d}": float(v) for i, v in enumerate(rates)})
        if self._last_probe is not None:
            metrics["ist/probe_loss"] = sum(self._last_probe["losses"]) / len(self._last_probe["losses"])
        self._selection_counts.zero_()
        self._steps_since_log = 0
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_train_end(self, args, state, control, **kwargs):
        if self.tuner is not None:
            self._write_history()
            self.tuner.close()

    # ---- state and logs ---------------------------------------------------------------------

    def _write_history(self) -> None:
        events, self.tuner.history = self.tuner.history, []
        if not self._log_path or not events:
            return
        with open(self._log_path, "a", encoding="utf-8") as handle:
            for event in events:
                if event["event"] == "select":  # recorded before the step ran: name it by the step it trains
                    event = {**event, "step": event["step"] + 1}
                handle.write(json.dumps(event) + "\n")

    def _export_state(self) -> dict:
        tuner_state = self.tuner.state_dict()
        exported = {
            "num_layers": tuner_state["num_layers"],
            "strategy": tuner_state["strategy"],
            "importance": tuner_state["importance"].tolist(),
            "generator": _encode_rng(tuner_state["generator"]),
            "step": tuner_state["step"],
            "selected": tuner_state["selected"],
        }
        if self.sampler is not None:
            exported["probe_generator"] = _encode_rng(self.sampler.generator.get_state())
        return exported

    def _restore(self, state) -> None:
        saved = (state.stateful_callbacks or {}).get(STATE_KEY)
        if saved is None:
            logger.warning("Resuming at step %d from a checkpoint without IST state: importance starts from zero.",
                           state.global_step)
            return
        self.tuner.load_state_dict({**saved, "generator": _decode_rng(saved["generator"])})
        if self.sampler is not None and "probe_generator" in saved:
            self.sampler.generator.set_state(_decode_rng(saved["probe_generator"]))


def _encode_rng(rng_state: torch.Tensor) -> str:
    return base64.b64encode(rng_state.numpy().tobytes()).decode("ascii")


def _decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def _truncate_log(path: str, keep_until_step: int) -> None:
    """Start a fresh log, or on resume keep only the events of steps already trained."""
    kept = []
    if keep_until_step > 0 and os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            kept = [line for line in handle if line.strip() and json.loads(line)["step"] <= keep_until_step]
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(kept)
    os.replace(tmp, path)


def _run_before_reporters(callback: TrainerCallback) -> None:
    """Move ``callback`` right after DefaultFlowCallback in the Trainer's callback list.

    Reporting callbacks (TensorBoard, W&B, ...) come before user callbacks, so the
    metrics ``on_log`` adds would reach them one event late, if ever. The handler is not
    passed to callbacks; it is the caller of this event. Moving an element to an earlier
    position keeps the handler's ongoing iteration intact (later elements keep their index).
    """
    frame = inspect.currentframe()
    handler = None
    while frame is not None and handler is None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, CallbackHandler):
            handler = candidate
        frame = frame.f_back
    del frame
    if handler is None or callback not in handler.callbacks:
        logger.warning("ISTCallback could not reach the Trainer's callback list; IST metrics reach only the JSONL log "
                       "and reporters listed after it.")
        return
    if handler.callbacks.index(callback) > 1:
        handler.callbacks.remove(callback)
        handler.callbacks.insert(1, callback)
