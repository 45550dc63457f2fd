"""ISTCallback: IST in a Hugging Face ``Trainer``.

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds)
    add_ist(trainer, ISTConfig())        # or in one line: Trainer(..., callbacks=[ISTCallback(ISTConfig())])

Both forms train the same. transformers hands a callback neither the Trainer nor its callback
list, so only the callback added with :func:`add_ist` (or given ``ISTCallback(trainer=...)``) can
run before the reporters (``report_to``: TensorBoard, W&B, ...) that the Trainer lists before the
callbacks it is given, swap the Trainer's printers for readable ones (:mod:`istune.integrations.console`),
check the Trainer's DDP wrapper itself, and, under FSDP2, make checkpoints hold every adapter
(:mod:`istune.integrations.fsdp2_checkpoints`), and under DeepSpeed build the optimizer per layer and
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

The callback keeps the events and hands each job to one collaborator, each in its module of
``istune.integrations``: the IST metrics of each log (``metrics``), the state in checkpoints and the
JSONL log (``ist_state``), the gradients before the optimizer step (``step_guard``), the probe batches
(``probe_batches``), the setup checks (``trainer_checks``), checkpoints under FSDP2 and DeepSpeed
(``fsdp2_checkpoints``), DeepSpeed's optimizer (``deepspeed``). Every part of the Trainer they touch
beyond the events is listed in one table, :mod:`istune.integrations.trainer_internals`.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from istune.config import ISTConfig
from istune.core import sharding
from istune.core.probe import ProbeSampler
from istune.core.selection import SelectionRule
from istune.core.tuner import SparseTuner
from istune.integrations import adalora, deepspeed, fsdp2_checkpoints, trainer_internals
from istune.integrations.console import use_readable_console
from istune.integrations.ist_state import HISTORY_FLUSH_EVENTS, STATE_KEY, RunRecord
from istune.integrations.metrics import LogMetrics
from istune.integrations.probe_batches import probe_loss, probe_sampler
from istune.integrations.step_guard import StepGuard
from istune.integrations.trainer_checks import check_trainer_setup

LOG_FILE = "ist_log.jsonl"


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
    handler = trainer_internals.callback_handler(trainer)
    if any(isinstance(callback, ISTCallback) for callback in handler.callbacks):
        raise ValueError("add_ist(trainer): this Trainer already has an ISTCallback; two would fight over the "
                         "adapters. Remove it (trainer.pop_callback(ISTCallback)) or do not call add_ist.")
    callback = ISTCallback(config, trainer=trainer, **options)
    trainer.add_callback(callback)
    callback._take_place(handler)
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
        self.sampler: ProbeSampler | None = None  # for the rules that probe or measure
        self.metrics = LogMetrics()  # the IST metrics of each log
        self.record = RunRecord()  # the IST state in checkpoints, the JSONL log
        self.guard = StepGuard()  # the gradients before the optimizer step: NaN/inf, fp16 scale
        self._adalora = False
        self._before_reporters = False  # runs right after DefaultFlowCallback, the Trainer's printers swapped
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
        """Keep the Trainer; under FSDP2 and DeepSpeed its checkpoints save every adapter (fsdp2_checkpoints);
        under DeepSpeed it builds its optimizer per layer and skips the unselected layers (deepspeed)."""
        self.trainer = trainer
        fsdp2_checkpoints.guard_checkpoints(trainer, STATE_KEY, lambda: self.tuner and self.tuner.layers,
                                            self.config.layers_path, self.config.towers)
        if deepspeed.is_deepspeed(trainer.args, trainer):
            deepspeed.prepare_trainer(trainer, self.config, self.rule, lambda: self.tuner and self.tuner.selected)

    def _take_place(self, handler: CallbackHandler) -> None:
        """Run right after DefaultFlowCallback, before the reporters; swap the printers for readable ones.

        The Trainer lists its reporters (TensorBoard, W&B, ...) before the callbacks it is given, so
        the metrics ``on_log`` adds would never reach them. Nothing happens while this callback is not
        in ``handler``'s list.
        """
        if not trainer_internals.run_after_default_flow(handler, self):
            return
        if self.readable_console:
            use_readable_console(handler)
        self._before_reporters = True

    # ---- Trainer events ---------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        self._check_setup(args, model)
        if self.tuner is not None:
            self.tuner.close()
        under_deepspeed = self.trainer is not None and deepspeed.is_deepspeed(args, self.trainer)
        # ZeRO's optimizer holds flat partitions, not the parameters: the split per layer checked they are all in it.
        self.tuner = SparseTuner(model, self.config, optimizer=None if under_deepspeed else optimizer,
                                 loss_fn=probe_loss(args, next(model.parameters()).device), rule=self.rule)
        if self.tuner.uses_probe_batches:  # IST's probes, or a rule that may measure ('owlore', 'gradnorm', ...)
            self.sampler = probe_sampler(self.config, self.probe_dataset, args, train_dataloader)
            self.tuner.probe_batches = self.sampler
        self.guard.start(model, self.tuner, trainer_internals.wrapped_model(self.trainer) if under_deepspeed else None)
        self.metrics.start(self.tuner.num_layers)
        self._adalora = adalora.is_adalora(model)
        self.record.start(args, state, self.log_file, self.tuner, self.sampler,
                          sharded_optimizer=optimizer if sharding.is_fsdp2(model) else None)

    def _check_setup(self, args, model) -> None:
        """Take this callback's place in the Trainer's list when it has the Trainer; refuse what IST cannot train."""
        if self.trainer is not None:
            self._take_place(trainer_internals.callback_handler(self.trainer))
            check_trainer_setup(args, model, self.trainer)
            return
        check_trainer_setup(args, model, accelerator_state=trainer_internals.shared_accelerator_state())
        self.metrics.warn_reporters_miss_them(args.report_to, self.log_file)

    def on_step_begin(self, args, state, control, **kwargs):
        self.metrics.count(self.tuner.begin_step())

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.guard.unscale_for_gradient_rule(args, self.tuner, self.trainer)
        # A rule that learns from gradients reads the trained layers' norms (nothing happens for other rules). Before
        # the zeroing below: a NaN/inf step shows non-finite norms here and goes unreported; after, it would read 0.
        self.tuner.before_optimizer_step()
        self.guard.zero_step_if_non_finite(args, state, self.tuner)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # AdaLoRA reallocates ranks after backward and before zero_grad; the Trainer never calls it.
        if self._adalora:
            adalora.update_and_allocate(model, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.guard.after_step(state.global_step)  # under DeepSpeed: the engine's skipped steps
        self.metrics.probe_done(self.tuner.end_step())
        # The Trainer reads the loss from the device when it logs or saves, right after this event: only then are
        # the NaN counters read (no extra host-device synchronisation), the log written, the state exported.
        due = control.should_log or control.should_save or control.should_training_stop \
            or state.global_step >= state.max_steps
        if due or len(self.tuner.history) >= HISTORY_FLUSH_EVENTS:
            self.record.flush(self.tuner)
        if due:
            self.guard.report(state.global_step)
            self.record.save(state, self.tuner, self.sampler)

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save:  # save_strategy="epoch": the checkpoint follows this event
            self.record.flush(self.tuner)
            self.record.save(state, self.tuner, self.sampler)

    def on_save(self, args, state, control, **kwargs):
        self.record.copy_log_into_checkpoint(args, state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.tuner is None or logs is None or "loss" not in logs:
            return
        # Before the reporters, the full series; else only the printers follow, and they get the short line.
        self.metrics.add_to(logs, state, self.tuner, short=self.readable_console and not self._before_reporters)

    def on_train_end(self, args, state, control, **kwargs):
        if self.tuner is not None:
            self.record.flush(self.tuner)
            self.tuner.close()
