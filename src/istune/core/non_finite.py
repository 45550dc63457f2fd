"""Optimizer steps with NaN/inf gradients, handled on the device without a host-device synchronisation.

A NaN or inf gradient would make every adapter it reaches NaN. Checking it on the host
(``bool(...)``) waits for the whole backward pass on a GPU at every step. Instead, per step:

- the largest absolute gradient entry is taken per tensor (one fused ``_foreach_norm``; NaN
  and inf propagate into it), and a device flag says whether any is non-finite;
- every gradient of the step is multiplied by ``1 - flag`` and its NaN/inf entries set to
  zero: a non-finite step reaches the optimizer as an all-zero gradient, so the adapters
  and the optimizer's moments stay finite (the moments' decay still moves an Adam-trained
  adapter a little, as a step with zero gradient does);
- device counters keep the non-finite steps in a row and since the last report.

:meth:`NonFiniteSteps.report` reads the counters, at a point where the host waits for the
device anyway (the Trainer reading the loss to log it), warns, and stops training after
``limit`` non-finite steps in a row.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class NonFiniteSteps:
    """Zeroes the gradients of steps with a NaN/inf gradient on the device; counts them there.

    Args:
        limit: non-finite steps in a row after which :meth:`report` raises ``FloatingPointError``.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._counters: torch.Tensor | None = None  # (in a row, since the last report, last such step), int64

    def zero_step_if_non_finite(self, gradients: list[torch.Tensor], step: int) -> None:
        """Make this step's gradients all zero when any entry of any of them is NaN/inf (no host sync)."""
        # FSDP2 shards gradients as DTensors: check and zero each rank's shard, and agree on the flag.
        sharded = any(_is_dtensor(gradient) for gradient in gradients)
        gradients = [gradient.to_local() if _is_dtensor(gradient) else gradient for gradient in gradients]
        device = gradients[0].device
        if self._counters is None or self._counters.device != device:
            self._counters = torch.zeros(3, dtype=torch.int64, device=device)
        largest = torch.stack([norm.float() for norm in torch._foreach_norm(gradients, float("inf"))])
        non_finite = (~torch.isfinite(largest)).any()
        if sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = non_finite.to(torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # queued, no host wait
            non_finite = flag.bool()
        torch._foreach_mul_(gradients, (~non_finite).float())
        for gradient in gradients:
            gradient.nan_to_num_(0.0, 0.0, 0.0)  # NaN * 0 is NaN
        flag = non_finite.long()
        in_a_row, since_report, last = self._counters.unbind()
        self._counters = torch.stack([(in_a_row + 1) * flag, since_report + flag,
                                      torch.where(non_finite, step, last)])

    def report(self, step: int) -> None:
        """Read the counters (one synchronisation: call it where the host waits anyway); warn or stop.

        Raises:
            FloatingPointError: ``limit`` or more non-finite steps in a row.
        """
        if self._counters is None:
            return
        in_a_row, since_report, last = self._counters.tolist()
        if since_report == 0:
            return
        self._counters[1] = 0
        message = (f"IST: NaN/inf gradients at step {last} ({since_report} such step(s) up to step {step}; the "
                   "training loss was NaN or inf: check the data, e.g. a batch whose labels are all -100, and the "
                   "learning rate)")
        if in_a_row >= self.limit:
            raise FloatingPointError(f"{message}; {in_a_row} steps in a row (limit {self.limit}), training stopped. "
                                     "Their gradients were zeroed before the optimizer saw them: the adapters and "
                                     "checkpoints are finite.")
        logger.warning("%s; those steps' gradients were zeroed: NaN/inf never reached the adapters.", message)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "to_local") and hasattr(tensor, "placements")
