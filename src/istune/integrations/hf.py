"""ISTCallback: IST in a Hugging Face ``Trainer`` with one line.

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                      callbacks=[ISTCallback(ISTConfig())])

Events per optimizer step (transformers 5.x): ``on_step_begin`` picks the layers and
freezes the rest before the first micro-batch's forward, so gradient accumulation keeps
one selection per optimizer step; ``on_pre_optimizer_step`` zeroes, on the device, the
gradients of a step that has a NaN/inf one (:mod:`istune.core.non_finite`); ``on_step_end``
(after ``optimizer.step`` and ``zero_grad``) counts the step, runs the importance probes every T_c steps and puts the IST state into the TrainerState
that every checkpoint saves.

``on_train_begin`` checks the setup before any step (:mod:`istune.integrations.trainer_checks`:
DDP settings, FSDP2 allowed, FSDP1/DeepSpeed refused, torch.compile warned about) and the probe
data. Under FSDP2 the Trainer's checkpoint saving and optimizer loading are wrapped at
``on_init_end`` (:mod:`istune.integrations.sharded_checkpoints`).
"""

from __future__ import annotations

import base64
import inspect
import json
import logging
import os
from collections.abc import Mapping
from typing import Optional

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import CallbackHandler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from istune.config import ISTConfig
from istune.core import distributed, sharding
from istune.core.non_finite import NonFiniteSteps
from istune.core.probe import ProbeSampler, default_loss, preserved_global_rng
from istune.core.tuner import SparseTuner
from istune.integrations import adalora, sharded_checkpoints
from istune.integrations.console import use_readable_console
from istune.integrations.trainer_checks import check_trainer_setup

logger = logging.getLogger(__name__)

STATE_KEY = "istune"  # key of the IST state inside TrainerState.stateful_callbacks (saved with every checkpoint)
LOG_FILE = "ist_log.jsonl"
MAX_NON_FINITE_STEPS = 10  # consecutive optimizer steps with NaN/inf gradients before training stops
HISTORY_FLUSH_EVENTS = 64  # selection and probe events kept in memory before they are appended to the log


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
        readable_console: print each log as one short line (the per-layer series replaced by the
            top-5 layers by importance; :mod:`istune.integrations.console`); the reporters still
            get every value. False leaves the Trainer's printers as they are.

    Attributes:
        importance: the importance vector I (``N_L`` floats), once training started.
        selected: layer positions trained in the current step.
        tuner: the underlying :class:`~istune.core.tuner.SparseTuner`.

    Example:
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[ISTCallback()])
    """

    def __init__(self, config: Optional[ISTConfig] = None, probe_dataset=None, log_file: str = LOG_FILE,
                 readable_console: bool = True):
        if config is not None and not isinstance(config, ISTConfig):
            raise TypeError(f"ISTCallback(config=...) takes an ISTConfig, not a {type(config).__name__}; "
                            "build one with ISTConfig(**values).")
        self.config = config or ISTConfig()
        self.probe_dataset = probe_dataset
        self.log_file = log_file
        self.readable_console = readable_console
        self.tuner: Optional[SparseTuner] = None
        self.sampler: Optional[ProbeSampler] = None
        self._selection_counts: Optional[torch.Tensor] = None
        self._steps_since_log = 0
        self._last_probe: Optional[dict] = None
        self._log_path: Optional[str] = None
        self._sharded_optimizer = None  # under FSDP2: the optimizer whose per-layer state checkpoints record
        self._non_finite = NonFiniteSteps(MAX_NON_FINITE_STEPS)
        self._outside_parameters: list = []
        self._adalora = False

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

    def on_init_end(self, args, state, control, **kwargs):
        self._guard_checkpoints(_caller(Trainer))

    def _guard_checkpoints(self, trainer) -> None:
        # FSDP2 checkpoints save and load per requires_grad (sharded_checkpoints). Also from on_train_begin, for a
        # callback added after the Trainer was built (its first optimizer loading then goes unguarded).
        if trainer is not None:
            sharded_checkpoints.guard_checkpoints(trainer, STATE_KEY, lambda: self.tuner and self.tuner.layers,
                                                  self.config.layers_path)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        _run_before_reporters(self)
        if self.readable_console:
            use_readable_console(_caller(CallbackHandler))
        trainer = _caller(Trainer)
        check_trainer_setup(args, model, trainer)
        self._guard_checkpoints(trainer)
        if self.tuner is not None:
            self.tuner.close()
        loss_fn = _probe_loss(args, next(model.parameters()).device)
        self.tuner = SparseTuner(model, self.config, optimizer=optimizer, loss_fn=loss_fn)
        self._sharded_optimizer = optimizer if sharding.is_fsdp2(model) else None
        if self.config.strategy == "ist":
            dataset = self.probe_dataset if self.probe_dataset is not None else train_dataloader.dataset
            batch_size = self.config.probe_batch_size or args.per_device_train_batch_size
            # Each rank probes its own batches; SparseTuner averages the losses over ranks.
            seed = self.config.seed + 1 + distributed.rank()
            self.sampler = ProbeSampler(dataset, train_dataloader.collate_fn, batch_size, seed)
            _check_probe_batch(self.sampler)
            self.tuner.probe_batches = self.sampler
        self._selection_counts = torch.zeros(self.tuner.num_layers)
        self._steps_since_log = 0
        self._non_finite = NonFiniteSteps(MAX_NON_FINITE_STEPS)
        inside = {id(p) for layer in self.tuner.layers for p in layer.parameters}
        self._outside_parameters = [p for p in model.parameters() if p.requires_grad and id(p) not in inside]
        self._adalora = adalora.is_adalora(model)
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

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # A NaN/inf gradient would make every trained adapter NaN. fp16's GradScaler skips such steps itself.
        if args.fp16:
            return
        gradients = [p.grad for layer in self.tuner.layers for p in layer.parameters if p.grad is not None]
        gradients += [p.grad for p in self._outside_parameters if p.grad is not None]
        if gradients:
            self._non_finite.zero_step_if_non_finite(gradients, state.global_step + 1)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # AdaLoRA reallocates ranks after backward and before zero_grad; the Trainer never calls it.
        if self._adalora:
            adalora.update_and_allocate(model, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        record = self.tuner.end_step()
        if record is not None:
            self._last_probe = record
        # The Trainer reads the loss from the device when it logs or saves, right after this event: only then are
        # the NaN counters read (no extra host-device synchronisation), the log written, the state exported.
        due = control.should_log or control.should_save or control.should_training_stop \
            or state.global_step >= state.max_steps
        if due or len(self.tuner.history) >= HISTORY_FLUSH_EVENTS:
            self._write_history()
        if due:
            self._non_finite.report(state.global_step)
            state.stateful_callbacks[STATE_KEY] = self._export_state()

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save:  # save_strategy="epoch": the checkpoint follows this event
            self._write_history()
            state.stateful_callbacks[STATE_KEY] = self._export_state()

    def on_save(self, args, state, control, **kwargs):
        # The IST state is in the checkpoint's trainer_state.json; add the selection log up to this step.
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if self._log_path and os.path.exists(self._log_path) and os.path.isdir(checkpoint):
            with open(self._log_path, encoding="utf-8") as handle:
                _write_atomically(os.path.join(checkpoint, self.log_file), handle.read())

    def on_log(self, args, state, control, logs=None, **kwargs):
        strategy = self.config.strategy
        if self.tuner is None or logs is None or "loss" not in logs or strategy in ("all", "fixed"):
            return  # 'all' and 'fixed' have nothing that changes to report
        metrics = {}
        if strategy == "ist":
            metrics.update({f"ist/importance/layer_{i:02d}": float(v) for i, v in enumerate(self.tuner.importance)})
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
        if self._sharded_optimizer is not None:
            exported[sharded_checkpoints.OPTIMIZER_STATE_KEY] = sharded_checkpoints.layers_with_optimizer_state(
                self._sharded_optimizer, self.tuner.layers)
        return exported

    def _restore(self, state) -> None:
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
        self.tuner.load_state_dict(tuner_state)
        if self.sampler is not None and probe_state is not None:
            self.sampler.generator.set_state(probe_state)


def _encode_rng(rng_state: torch.Tensor) -> str:
    return base64.b64encode(rng_state.numpy().tobytes()).decode("ascii")


def _decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def _truncate_log(path: str, keep_until_step: int) -> None:
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
    _write_atomically(path, "".join(kept))


def _write_atomically(path: str, text: str) -> None:
    """Write ``text`` to a temporary name, then rename: readers never see a partial file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _check_probe_batch(sampler: ProbeSampler) -> None:
    """Collate one probe example now, so bad data fails before training rather than at the first probe."""
    try:
        with preserved_global_rng():
            batch = sampler.collate_fn([sampler.dataset[0]])
    except Exception as error:  # re-raised with what IST was doing; the original stays attached
        raise ValueError(f"IST cannot build a probe batch from the probe dataset ({type(error).__name__}: {error}). "
                         "Probe batches are collated like training batches: check the dataset's examples, or pass "
                         "ISTCallback(probe_dataset=...).") from error
    if not isinstance(batch, Mapping) or "labels" not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"IST's probe batches need 'labels' (the training loss); the collator gave {keys}. Use a "
                         "collator that adds labels (e.g. DataCollatorForLanguageModeling(mlm=False)).")


def _probe_loss(args, device: torch.device):
    """The probe loss under the autocast the Trainer trains with (bf16, or fp16 off the CPU)."""
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 and device.type != "cpu" else None
    if dtype is None:
        return default_loss

    def loss(model, batch):
        with torch.autocast(device.type, dtype=dtype):
            return default_loss(model, batch)

    return loss


def _caller(cls):
    """The nearest ``self`` of class ``cls`` up the call stack, or None.

    Callbacks are handed neither the Trainer nor its callback handler, but both are callers of
    every event.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, cls):
                return candidate
            frame = frame.f_back
        return None
    finally:
        del frame


def _run_before_reporters(callback: TrainerCallback) -> None:
    """Move ``callback`` right after DefaultFlowCallback in the Trainer's callback list.

    Reporting callbacks (TensorBoard, W&B, ...) come before user callbacks, so the
    metrics ``on_log`` adds would reach them one event late, if ever. The handler is not
    passed to callbacks; it is the caller of this event. Moving an element to an earlier
    position keeps the handler's ongoing iteration intact (later elements keep their index).
    """
    handler = _caller(CallbackHandler)
    if handler is None or callback not in handler.callbacks:
        logger.warning("ISTCallback could not reach the Trainer's callback list; IST metrics reach only the JSONL log "
                       "and reporters listed after it.")
        return
    if handler.callbacks.index(callback) > 1:
        handler.callbacks.remove(callback)
        handler.callbacks.insert(1, callback)
