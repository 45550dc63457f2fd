"""What happens to the optimizer state of layers that are not selected this step.

An unselected layer gets no gradient, so the optimizer does not touch its state (Adam's
moments), but keeps it in memory. ``ISTConfig.unselected_optimizer_state``:

``keep``     (the paper) leave it where it is; a layer selected again continues with
             its moments.
``offload``  move it to CPU memory while the layer is unselected and back to the
             parameter's device when the layer is selected again. The update is the same
             as with ``keep``; the cost is the copies. On a CPU-only run it changes nothing.
``drop``     delete it; a layer selected again starts with fresh moments (Adam's bias
             correction restarts with it). Saves the memory and the copies, changes the
             updates.

For LoRA the state is small (2 × 4 bytes per adapter parameter with AdamW in fp32); for
full layers (LISA-style) it is twice the layer's weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from istune.config import OPTIMIZER_STATE_POLICIES as POLICIES


class UnselectedOptimizerState:
    """Applies the policy to an optimizer's per-parameter state.

    Args:
        optimizer: the optimizer (``optimizer.state`` maps parameters to dicts of state).
        policy: one of :data:`POLICIES`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, policy: str):
        if policy not in POLICIES:
            raise ValueError(f"unselected_optimizer_state={policy!r} is invalid: use one of {', '.join(POLICIES)}.")
        self.optimizer = optimizer
        self.policy = policy
        self._offloaded: dict[nn.Parameter, set[str]] = {}  # parameter -> keys of the state moved to CPU

    def apply(self, selected: Iterable[nn.Parameter], unselected: Iterable[nn.Parameter]) -> None:
        """Bring back the state of ``selected`` parameters; offload or drop that of ``unselected`` ones."""
        if self.policy == "keep":
            return
        state = self.optimizer.state
        for parameter in unselected:
            if parameter not in state:
                continue
            if self.policy == "drop":
                del state[parameter]
            else:
                self._offload(parameter, state[parameter])
        if self.policy == "offload":
            for parameter in selected:
                if parameter in self._offloaded and parameter in state:
                    self._restore(parameter, state[parameter])

    def _offload(self, parameter: nn.Parameter, entries: dict) -> None:
        if parameter.device.type in ("cpu", "meta"):  # already in CPU memory / nothing to move
            return
        moved = self._offloaded.setdefault(parameter, set())
        pin = parameter.device.type == "cuda"
        for key, value in entries.items():
            if isinstance(value, torch.Tensor) and value.device == parameter.device:
                entries[key] = value.to("cpu").pin_memory() if pin else value.to("cpu")
                moved.add(key)

    def _restore(self, parameter: nn.Parameter, entries: dict) -> None:
        for key in self._offloaded.pop(parameter):
            value = entries.get(key)
            if isinstance(value, torch.Tensor):
                entries[key] = value.to(parameter.device, non_blocking=True)
