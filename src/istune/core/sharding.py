"""IST on a model sharded with FSDP2 (torch's ``fully_shard``): what works, and what is refused.

FSDP2 keeps every parameter a separate ``DTensor`` (a shard per rank) and gathers the full
tensors of one wrapped module (a decoder block) for its forward and backward. IST works on
it as it does on one process:

* **Freezing per parameter.** FSDP2 copies each sharded parameter's ``requires_grad`` to
  the gathered one at every all-gather, and reduce-scatters only the gradients that exist;
  a frozen adapter gets no gradient on any rank (``grad is None``), so the optimizer skips it.
  Every rank freezes the same adapters, so every rank reduce-scatters the same set.
* **Probes.** FSDP2 all-gathers in the forward, so all ranks must run the same forwards:
  every rank runs the N_c probe forwards at the same step, each on its own probe batch, and
  the losses are averaged over ranks (:mod:`istune.core.distributed`).
* **Suppression of adapters** changes adapter modules' ``scaling`` or blends outputs in a
  forward hook (:mod:`istune.core.suppress`): it touches no parameter, so sharding does not
  matter.

Refused before the first step (:func:`check_fsdp2`):

* *Full layers with a rule whose probes suppress layers* (IST, probe-once by suppression, any rule
  with ``runs_importance_probes`` or ``uses_probe_losses``). Suppressing a full layer's change swaps the block's
  weights for ``W0 + β·(W − W0)`` around its forward; FSDP2 gathers the weights from its
  own sharded storage, so the swap would not reach the computation.
* *``unselected_optimizer_state='offload'`` with parameters on an accelerator.* Moving
  DTensor optimizer state between devices is untested here (no GPU).
"""

from __future__ import annotations

import torch
from torch import nn

from istune.config import ISTConfig
from istune.core.layers import AdapterLayer

try:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without distributed
    FSDPModule = FullyShardedDataParallel = DTensor = ()


def is_fsdp2(model: nn.Module) -> bool:
    """True when some module of ``model`` is wrapped by FSDP2's ``fully_shard``."""
    return any(isinstance(module, FSDPModule) for module in model.modules())


def wrapped_fsdp_version(model: nn.Module) -> int | None:
    """2 when some module of ``model`` is wrapped by FSDP2's ``fully_shard``, 1 by FSDP1's
    ``FullyShardedDataParallel``, else None. A Trainer decides before it wraps the model:
    :func:`istune.integrations.trainer_checks.fsdp_version` asks its accelerator first."""
    if is_fsdp2(model):
        return 2
    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        return 1
    return None


def has_dtensor_parameters(model: nn.Module) -> bool:
    """True when some parameter is a DTensor (FSDP2, tensor parallelism)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter; every rank must call it together for a DTensor."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def check_fsdp2(model: nn.Module, config: ISTConfig, layers: list[AdapterLayer], rule_name: str = "",
                suppresses: bool = False) -> None:
    """Refuse what IST cannot do on an FSDP2-sharded ``model``; nothing happens for other models.

    Args:
        rule_name: the selection rule's name, for the message.
        suppresses: the rule's probes suppress layers (eq. 8): its ``runs_importance_probes`` or
            ``uses_probe_losses`` (IST, probe-once by suppression, a rule of the user's own).

    Raises:
        NotImplementedError: full layers with a rule that suppresses them, or optimizer-state offloading
            of parameters that live on an accelerator.
    """
    if not is_fsdp2(model):
        return
    if suppresses and any(layer.is_full_layer for layer in layers):
        raise NotImplementedError(
            f"Full-layer (LISA-style) tuning with strategy {rule_name!r} is not supported under FSDP2: its probes "
            "suppress a full layer's change (eq. 8) by swapping its weights for W0 + β·(W − W0) around its forward, "
            "but FSDP2 gathers the weights from its own sharded storage, so the probes would measure the "
            "unsuppressed model. Use a rule without suppression probes ('random', 'fixed', 'lisa', ...) for full "
            "layers under FSDP2, adapters (LoRA, DoRA, ...) with this rule, or full layers under DDP.")
    on_accelerator = any(p.device.type not in ("cpu", "meta") for layer in layers for p in layer.parameters)
    if config.unselected_optimizer_state == "offload" and on_accelerator:
        raise NotImplementedError(
            "unselected_optimizer_state='offload' is not supported under FSDP2 with parameters on an accelerator: "
            "moving sharded (DTensor) optimizer state between devices is untested. Use FSDP2's own CPU offloading "
            "(fsdp_config={'cpu_offload': True}, which keeps every parameter's optimizer state in CPU memory), "
            "or unselected_optimizer_state='drop' or 'keep'.")
