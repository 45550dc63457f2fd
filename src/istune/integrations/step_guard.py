"""What ISTCallback does to an optimizer step's gradients before the optimizer sees them.

* **NaN/inf**: a NaN or inf gradient would make every trained adapter NaN. Before the optimizer
  step the gradients of a step that has one are zeroed on the device
  (:class:`~istune.core.non_finite.NonFiniteSteps`); after :data:`MAX_NON_FINITE_STEPS` such steps
  in a row training stops. fp16's GradScaler skips such steps itself. DeepSpeed has stepped
  already (inside ``backward``) and skips them too: :class:`SkippedSteps` counts the engine's
  skipped steps instead. Both are read only when the Trainer logs or saves, where the host waits
  for the device anyway.
* **fp16 without clipping**: the Trainer unscales the gradients only to clip them, so before the
  optimizer step they are still multiplied by the loss scale, and a rule that learns from
  gradient norms ('gradnorm') would read scaled ones. They are unscaled here, as clipping would
  (the scaler's step then skips its own unscale: the same update).
"""

from __future__ import annotations

import logging

from torch import nn

from istune.core.layers import trainable_outside_layers
from istune.core.non_finite import NonFiniteSteps
from istune.core.tuner import SparseTuner
from istune.integrations import trainer_internals

logger = logging.getLogger(__name__)

MAX_NON_FINITE_STEPS = 10  # consecutive optimizer steps with NaN/inf gradients before training stops


class StepGuard:
    """Guards each optimizer step's gradients (see the module's docstring) for one callback.

    Args:
        limit: NaN/inf steps in a row after which training stops with ``FloatingPointError``.
    """

    def __init__(self, limit: int = MAX_NON_FINITE_STEPS):
        self.limit = limit
        self.engine = None  # under DeepSpeed: the engine, whose skipped steps replace the zeroing
        self._non_finite = NonFiniteSteps(limit)
        self._skipped_steps = SkippedSteps(limit)
        self._outside_parameters: list[nn.Parameter] = []
        self._warned_about_scaled_norms = False

    def start(self, model: nn.Module, tuner: SparseTuner, engine=None) -> None:
        """Start a training run of ``model``; ``engine``: the DeepSpeed engine, when it trains through one."""
        self.engine = engine
        self._skipped_steps = SkippedSteps(self.limit)
        self._non_finite = NonFiniteSteps(self.limit)
        self._outside_parameters = list(trainable_outside_layers(model, tuner.layers).values())

    def unscale_for_gradient_rule(self, args, tuner: SparseTuner, trainer=None) -> None:
        """Unscale fp16 gradients that the Trainer left scaled (no clipping) when the rule reads gradient norms.

        DeepSpeed keeps its own scaler and gradients, and refuses gradient rules. Without the Trainer
        nothing can be unscaled: warn once.
        """
        if not (tuner.rule.wants_gradients and args.fp16 and not (args.max_grad_norm and args.max_grad_norm > 0)):
            return
        if self.engine is not None:
            return
        if trainer is None:
            if not self._warned_about_scaled_norms:
                logger.warning("IST: rule %r reads gradient norms under fp16 without clipping, and this callback was "
                               "not given the Trainer (add_ist(trainer, config) gives it), so it cannot unscale "
                               "them: the norms it sees are multiplied by the loss scale. Use add_ist, or set "
                               "max_grad_norm > 0.", tuner.rule_name)
                self._warned_about_scaled_norms = True
            return
        trainer_internals.unscale_gradients(trainer)

    def zero_step_if_non_finite(self, args, state, tuner: SparseTuner) -> None:
        """Zero this step's gradients, on the device, when any is NaN/inf (not under fp16 or DeepSpeed)."""
        if args.fp16 or self.engine is not None:
            return
        gradients = [p.grad for layer in tuner.layers for p in layer.parameters if p.grad is not None]
        gradients += [p.grad for p in self._outside_parameters if p.grad is not None]
        if gradients:
            self._non_finite.zero_step_if_non_finite(gradients, state.global_step + 1)

    def after_step(self, step: int) -> None:
        """Under DeepSpeed, after each optimizer step: count the step if the engine skipped it."""
        if self.engine is not None:
            self._skipped_steps.observe(self.engine, step)

    def report(self, step: int) -> None:
        """Warn about the NaN/inf steps since the last report; stop training after ``limit`` in a row.

        Raises:
            FloatingPointError: ``limit`` NaN/inf steps in a row.
        """
        self._non_finite.report(step)
        self._skipped_steps.report(step)


class SkippedSteps:
    """Counts the steps the DeepSpeed engine skipped (NaN/inf gradient norm); stops after ``limit`` in a row.

    Args:
        limit: skipped steps in a row after which :meth:`observe` raises ``FloatingPointError``.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0
        self.since_report = 0
        self._seen: int | None = None

    def observe(self, engine, step: int) -> None:
        """Read ``engine.skipped_steps`` after an optimizer step (a host integer: no synchronisation).

        Raises:
            FloatingPointError: ``limit`` skipped steps in a row.
        """
        skipped = int(getattr(engine, "skipped_steps", 0))
        if self._seen is None:
            self._seen = skipped
            skipped_now = False
        else:
            skipped_now, self._seen = skipped > self._seen, skipped
        self.in_a_row = self.in_a_row + 1 if skipped_now else 0
        self.since_report += int(skipped_now)
        if self.in_a_row >= self.limit:
            raise FloatingPointError(
                f"IST under DeepSpeed: the engine skipped {self.in_a_row} optimizer steps in a row up to step {step} "
                f"(limit {self.limit}) because the gradient norm was NaN or inf; training stopped. Check the data "
                "(e.g. a batch whose labels are all -100) and the learning rate. The adapters are finite: DeepSpeed "
                "applied none of those steps.")

    def report(self, step: int) -> None:
        """Warn once per log about the steps skipped since the last report."""
        if self.since_report:
            logger.warning("IST under DeepSpeed: %d optimizer step(s) up to step %d skipped by DeepSpeed (NaN/inf "
                           "gradient norm); the adapters never saw them.", self.since_report, step)
            self.since_report = 0
