"""ISTCallback: IST in a Hugging Face ``Trainer``.

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds)
    add_ist(trainer, ISTConfig())        # or in one line: Trainer(..., callbacks=[ISTCallback(ISTConfig())])

Both forms train the same. transformers hands a callback neither the Trainer nor its callback
list, so only the callback added with :func:`add_ist` (or given ``ISTCallback(trainer=...)``) can
run before the reporters (``report_to``: TensorBoard, W&B, ...) that the Trainer lists before the
callbacks it is given, swap the Trainer's printers for readable ones (:mod:`istune.integrations.console`),
check the Trainer's DDP wrapper itself, and, under FSDP2, make checkpoints hold every adapter
(:mod:`istune.integrations.sharded_checkpoints`), and under DeepSpeed build the optimizer per layer and
skip the unselected layers in ZeRO's step (:mod:`istune.integrations.deepspeed`). The one-line form
checks DDP through the ``TrainingArguments`` the Trainer builds it from, gives the console the short line itself, warns
once that the reporters get no IST metric when ``report_to`` names some (they are in
``trainer.state.log_history`` and the JSONL log either way), and refuses FSDP2 with checkpoint saving
and DeepSpeed.

Events per optimizer step (transformers 5.x): ``on_step_begin`` picks the layers and
freezes the rest before the first micro-batch's forward, so gradient accumulation keeps
one selection per optimizer step; ``on_pre_optimizer_step`` tells a rule that learns from
gradients ('gradnorm') the norms of the layers that trained, then zeroes, on the device, the
gradients of a step that has a NaN/inf one (:mod:`istune.core.non_finite`; under DeepSpeed the engine
skips such steps itself and ``on_step_end`` counts them); ``on_step_end``
(after ``optimizer.step`` and ``zero_grad``) counts the step, runs the importance probes every T_c steps and puts
the IST state into the TrainerState that every checkpoint saves.

``on_train_begin`` checks the setup before any step (:mod:`istune.integrations.trainer_checks`:
DDP settings, FSDP2 and DeepSpeed ZeRO-2/3 allowed, FSDP1 refused, torch.compile warned about) and the probe data.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from accelerate import state as accelerate_state
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from istune.config import ISTConfig
from istune.core import distributed, sharding
from istune.core.layers import trainable_outside_layers
from istune.core.non_finite import NonFiniteSteps
from istune.core.probe import ProbeSampler, default_loss, preserved_global_rng
from istune.core.selection import SelectionRule
from istune.core.tuner import SparseTuner
from istune.integrations import adalora, deepspeed, sharded_checkpoints
from istune.integrations.console import console_logs, use_readable_console
from istune.integrations.ist_state import STATE_KEY, append_events, export_state, restore_state, truncate_log
from istune.integrations.trainer_checks import check_trainer_setup, fsdp_version
from istune.io import write_text

logger = logging.getLogger(__name__)

LOG_FILE = "ist_log.jsonl"
MAX_NON_FINITE_STEPS = 10  # consecutive optimizer steps with NaN/inf gradients before training stops
HISTORY_FLUSH_EVENTS = 64  # selection and probe events kept in memory before they are appended to the log


def add_ist(trainer, config: ISTConfig | None = None, **options) -> ISTCallback:
    """Add IST to a Trainer already built; the callback is given the Trainer.

    The same training as ``Trainer(..., callbacks=[ISTCallback(config)])``; with the Trainer in hand the
    callback also runs before the reporters (so they get the IST metrics), prints one short line per log,
    checks the Trainer's own DDP wrapper, and under FSDP2 saves checkpoints with every adapter.

    Args:
        trainer: a ``transformers.Trainer`` (or subclass: TRL's ``SFTTrainer``, ...), before ``train()``.
        config: IST hyperparameters; default the paper's.
        **options: the other arguments of :class:`ISTCallback` (``probe_dataset``, ``log_file``,
            ``readable_console``, ``rule``).

    Returns:
        The callback, whose ``importance``, ``selected`` and ``tuner`` are readable during training.

    Raises:
        ValueError: the Trainer already has an ISTCallback.

    Example:
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=ds)
        >>> ist = add_ist(trainer, ISTConfig())
        >>> trainer.train()
    """
    if any(isinstance(callback, ISTCallback) for callback in trainer.callback_handler.callbacks):
        raise ValueError("add_ist(trainer): this Trainer already has an ISTCallback; two would fight over the "
                         "adapters. Remove it (trainer.pop_callback(ISTCallback)) or do not call add_ist.")
    callback = ISTCallback(config, trainer=trainer, **options)
    trainer.add_callback(callback)
    callback._take_place(trainer.callback_handler)
    return callback


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
            top-5 layers by importance; :mod:`istune.integrations.console`); the reporters and
            ``trainer.state.log_history`` still get every value. False prints every value.
        trainer: the Trainer this callback is (to be) added to with ``trainer.add_callback``;
            :func:`add_ist` does both. Without it (``Trainer(callbacks=[ISTCallback()])``) the
            reporters get no IST metric (see the module's docstring).
        rule: a selection rule object (:class:`~istune.core.selection.SelectionRule`) to use instead
            of the one ``config.strategy`` names.

    Attributes:
        importance: the importance vector I (``N_L`` floats), once training started.
        selected: layer positions trained in the current step.
        tuner: the underlying :class:`~istune.core.tuner.SparseTuner`.
        trainer: the Trainer, when given.

    Example:
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[ISTCallback()])
    """

    def __init__(self, config: ISTConfig | None = None, probe_dataset=None, log_file: str = LOG_FILE,
                 readable_console: bool = True, *, trainer=None, rule: SelectionRule | None = None):
        if config is not None and not isinstance(config, ISTConfig):
            raise TypeError(f"ISTCallback(config=...) takes an ISTConfig, not a {type(config).__name__}; "
                            "build one with ISTConfig(**values).")
        self.config = config or ISTConfig()
        self.rule = rule
        self.probe_dataset = probe_dataset
        self.log_file = log_file
        self.readable_console = readable_console
        self.trainer = None
        self.tuner: SparseTuner | None = None
        self.sampler: ProbeSampler | None = None
        self._selection_counts: torch.Tensor | None = None
        self._steps_since_log = 0
        self._last_probe: dict | None = None
        self._log_path: str | None = None
        self._sharded_optimizer = None  # under FSDP2: the optimizer whose per-layer state checkpoints record
        self._non_finite = NonFiniteSteps(MAX_NON_FINITE_STEPS)
        self._deepspeed_engine = None  # under DeepSpeed: the engine, whose skipped steps replace the NaN guard
        self._skipped_steps = deepspeed.SkippedSteps(MAX_NON_FINITE_STEPS)
        self._outside_parameters: list = []
        self._adalora = False
        self._before_reporters = False  # runs right after DefaultFlowCallback, the Trainer's printers swapped
        self._warned_about_reporters = False
        self._warned_about_scaled_norms = False
        if trainer is not None:
            self._attach(trainer)

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

    # ---- the Trainer, when given ------------------------------------------------------------

    def _attach(self, trainer) -> None:
        """Keep the Trainer; under FSDP2 and DeepSpeed its checkpoints save every adapter (sharded_checkpoints);
        under DeepSpeed it builds its optimizer per layer and skips the unselected layers (deepspeed)."""
        self.trainer = trainer
        sharded_checkpoints.guard_checkpoints(trainer, STATE_KEY, lambda: self.tuner and self.tuner.layers,
                                              self.config.layers_path, self.config.tower_layers)
        if deepspeed.is_deepspeed(trainer.args, trainer):
            deepspeed.prepare_trainer(trainer, self.config, self.rule, lambda: self.tuner and self.tuner.selected)

    def _take_place(self, handler: CallbackHandler) -> None:
        """Run right after DefaultFlowCallback, before the reporters; swap the printers for readable ones.

        The Trainer lists its reporters (TensorBoard, W&B, ...) before the callbacks it is given, so
        the metrics ``on_log`` adds would never reach them. Moving to an earlier position during an
        event (``on_train_begin``) keeps the handler's ongoing iteration intact: later callbacks keep
        their index. Nothing happens while this callback is not in ``handler``'s list.
        """
        callbacks = handler.callbacks
        if not any(callback is self for callback in callbacks):
            return
        first = next((i + 1 for i, callback in enumerate(callbacks) if isinstance(callback, DefaultFlowCallback)), 0)
        if callbacks.index(self) > first:
            callbacks.remove(self)
            callbacks.insert(first, self)
        if self.readable_console:
            use_readable_console(handler)
        self._before_reporters = True

    # ---- Trainer events ---------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        self._check_setup(args, model)
        if self.tuner is not None:
            self.tuner.close()
        loss_fn = _probe_loss(args, next(model.parameters()).device)
        under_deepspeed = self.trainer is not None and deepspeed.is_deepspeed(args, self.trainer)
        # ZeRO's optimizer holds flat partitions, not the parameters: the split per layer checked they are all in it.
        self.tuner = SparseTuner(model, self.config, optimizer=None if under_deepspeed else optimizer,
                                 loss_fn=loss_fn, rule=self.rule)
        self._deepspeed_engine = self.trainer.model_wrapped if under_deepspeed else None
        self._skipped_steps = deepspeed.SkippedSteps(MAX_NON_FINITE_STEPS)
        self._sharded_optimizer = optimizer if sharding.is_fsdp2(model) else None
        if self.tuner.uses_probe_batches:  # IST's probes, or a rule that may measure ('owlore', 'gradnorm', ...)
            self.sampler = self._probe_sampler(args, train_dataloader)
            self.tuner.probe_batches = self.sampler
        self._selection_counts = torch.zeros(self.tuner.num_layers)
        self._steps_since_log = 0
        self._non_finite = NonFiniteSteps(MAX_NON_FINITE_STEPS)
        self._outside_parameters = list(trainable_outside_layers(model, self.tuner.layers).values())
        self._adalora = adalora.is_adalora(model)
        if state.global_step > 0:
            restore_state(state, self.tuner, self.sampler)
        self._log_path = os.path.join(args.output_dir, self.log_file) if state.is_world_process_zero else None
        if self._log_path:
            truncate_log(self._log_path, keep_until_step=state.global_step)

    def _check_setup(self, args, model) -> None:
        """Take this callback's place in the Trainer's list when it has the Trainer; refuse what IST cannot train."""
        if self.trainer is not None:
            self._take_place(self.trainer.callback_handler)
            check_trainer_setup(args, model, self.trainer)
            return
        # Without the Trainer: accelerate's state is shared by every Accelerator of the process, the Trainer's too.
        accelerator = accelerate_state.AcceleratorState() if accelerate_state.is_initialized() else None
        check_trainer_setup(args, model, accelerator_state=accelerator)
        if fsdp_version(args, model, accelerator_state=accelerator) == 2 and _saves_checkpoints(args):
            raise ValueError(
                f"ISTCallback under FSDP2 with save_strategy={_value(args.save_strategy)!r} needs the Trainer: every "
                "adapter must be trainable while a checkpoint is saved (FSDP2 saves only trainable parameters), and "
                "transformers hands callbacks no Trainer. Add IST after building the Trainer with "
                "istune.add_ist(trainer, config) instead of Trainer(callbacks=[ISTCallback(config)]), or pass "
                "save_strategy='no'.")
        if args.report_to and not self._warned_about_reporters:
            self._warned_about_reporters = True
            logger.warning(
                "IST metrics (ist/importance/*, ist/selected/*, ist/probe_loss) will not reach the reporters %s: the "
                "Trainer calls them before the callbacks given in Trainer(callbacks=[...]) and hands callbacks no "
                "Trainer to change that. Add IST with istune.add_ist(trainer, config) after building the Trainer. "
                "The metrics are in trainer.state.log_history and %s either way.", list(args.report_to), self.log_file)

    def _probe_sampler(self, args, train_dataloader) -> ProbeSampler:
        dataset = self.probe_dataset if self.probe_dataset is not None else train_dataloader.dataset
        batch_size = self.config.probe_batch_size or args.per_device_train_batch_size
        # Each rank probes its own batches; SparseTuner averages the losses over ranks.
        seed = self.config.seed + 1 + distributed.rank()
        sampler = ProbeSampler(dataset, train_dataloader.collate_fn, batch_size, seed)
        _check_probe_batch(sampler)
        return sampler

    def on_step_begin(self, args, state, control, **kwargs):
        selected = self.tuner.begin_step()
        self._selection_counts[selected] += 1
        self._steps_since_log += 1

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.tuner.rule.wants_gradients and args.fp16 and not (args.max_grad_norm and args.max_grad_norm > 0):
            self._unscale_gradients()
        # A rule that learns from gradients reads the trained layers' norms (nothing happens for other rules). Before
        # the zeroing below: a NaN/inf step shows non-finite norms here and goes unreported; after, it would read 0.
        self.tuner.before_optimizer_step()
        # A NaN/inf gradient would make every trained adapter NaN. fp16's GradScaler skips such steps itself, and
        # DeepSpeed has stepped already (inside backward) and skips them too: on_step_end counts its skipped steps.
        if args.fp16 or self._deepspeed_engine is not None:
            return
        gradients = [p.grad for layer in self.tuner.layers for p in layer.parameters if p.grad is not None]
        gradients += [p.grad for p in self._outside_parameters if p.grad is not None]
        if gradients:
            self._non_finite.zero_step_if_non_finite(gradients, state.global_step + 1)

    def _unscale_gradients(self) -> None:
        """fp16 without clipping: the Trainer unscales the gradients only to clip them, so before the optimizer
        step they are still multiplied by the loss scale, and a rule that learns from gradient norms would read
        scaled ones. Unscale them here, as clipping would (the scaler's step then skips its own unscale: the
        same update). DeepSpeed keeps its own scaler and gradients, and refuses gradient rules."""
        if self._deepspeed_engine is not None:
            return
        if self.trainer is None:
            if not self._warned_about_scaled_norms:
                logger.warning("IST: rule %r reads gradient norms under fp16 without clipping, and this callback was "
                               "not given the Trainer (add_ist(trainer, config) gives it), so it cannot unscale "
                               "them: the norms it sees are multiplied by the loss scale. Use add_ist, or set "
                               "max_grad_norm > 0.", self.tuner.rule_name)
                self._warned_about_scaled_norms = True
            return
        self.trainer.accelerator.unscale_gradients()

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # AdaLoRA reallocates ranks after backward and before zero_grad; the Trainer never calls it.
        if self._adalora:
            adalora.update_and_allocate(model, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self._deepspeed_engine is not None:
            self._skipped_steps.observe(self._deepspeed_engine, state.global_step)
        record = self.tuner.end_step()
        if record is not None:
            self._last_probe = record
        # The Trainer reads the loss from the device when it logs or saves, right after this event: only then are
        # the NaN counters read (no extra host-device synchronisation), the log written, the state exported.
        due = control.should_log or control.should_save or control.should_training_stop \
            or state.global_step >= state.max_steps
        if due or len(self.tuner.history) >= HISTORY_FLUSH_EVENTS:
            self._flush_history()
        if due:
            self._non_finite.report(state.global_step)
            self._skipped_steps.report(state.global_step)
            state.stateful_callbacks[STATE_KEY] = export_state(self.tuner, self.sampler, self._sharded_optimizer)

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save:  # save_strategy="epoch": the checkpoint follows this event
            self._flush_history()
            state.stateful_callbacks[STATE_KEY] = export_state(self.tuner, self.sampler, self._sharded_optimizer)

    def on_save(self, args, state, control, **kwargs):
        # The IST state is in the checkpoint's trainer_state.json; add the selection log up to this step.
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if self._log_path and os.path.exists(self._log_path) and os.path.isdir(checkpoint):
            write_text(os.path.join(checkpoint, self.log_file), Path(self._log_path).read_text(encoding="utf-8"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.tuner is None or logs is None or "loss" not in logs:
            return
        if self.tuner.rule.trains_all_layers or self.tuner.rule.trains_given_layers:
            return  # 'all' and 'fixed' have nothing that changes to report
        metrics = {}
        if self.tuner.rule.runs_importance_probes:
            metrics.update({f"ist/importance/layer_{i:02d}": float(v) for i, v in enumerate(self.tuner.importance)})
        rates = self._selection_counts / max(self._steps_since_log, 1)
        metrics.update({f"ist/selected/layer_{i:02d}": float(v) for i, v in enumerate(rates)})
        if self._last_probe is not None:
            metrics["ist/probe_loss"] = sum(self._last_probe["losses"]) / len(self._last_probe["losses"])
        self._selection_counts.zero_()
        self._steps_since_log = 0
        # Before the reporters, the full series; else only the printers follow, and they get the short line.
        logs.update(metrics if self._before_reporters or not self.readable_console else console_logs(metrics))
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_train_end(self, args, state, control, **kwargs):
        if self.tuner is not None:
            self._flush_history()
            self.tuner.close()

    def _flush_history(self) -> None:
        events, self.tuner.history = self.tuner.history, []
        if self._log_path:
            append_events(self._log_path, events)


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


def _value(option) -> str:
    return str(getattr(option, "value", option))


def _saves_checkpoints(args) -> bool:
    return _value(getattr(args, "save_strategy", "no")) != "no"
