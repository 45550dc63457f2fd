"""IST under torch.distributed: every rank must train the same layers and hold the same importance.

Each rank runs its own :class:`~istune.core.tuner.SparseTuner`. Their states stay identical
because every rank starts from the same seed (or checkpoint), draws from its own copy of
the same generator, and feeds the update the same numbers: the probe losses, which
:func:`mean_over_ranks` makes bitwise identical on every rank. :func:`check_in_sync`
verifies this at run time and fails loudly when a rank drifts.

DDP needs ``find_unused_parameters=True``: the adapters IST freezes in a step produce no
gradient, and without it DDP waits for them ("Expected to have finished reduction in the
prior iteration"). A parameter no rank used keeps ``grad=None``, so the optimizer does not
move it on any rank.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def world_size() -> int:
    """Number of ranks; 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def collective_device(model_device: torch.device) -> torch.device:
    """Where tensors for a collective must live: the CPU for gloo, the model's device otherwise (NCCL)."""
    if world_size() > 1 and dist.get_backend() == "gloo":
        return torch.device("cpu")
    return model_device


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over all ranks, bitwise identical on every rank.

    All-gather, then the same sum in rank order on every rank (an all-reduce does not
    promise identical bits everywhere). Without torch.distributed, ``values`` itself.
    """
    if world_size() == 1:
        return values
    gathered = [torch.empty_like(values) for _ in range(world_size())]
    dist.all_gather(gathered, values.contiguous())
    return torch.stack(gathered).mean(dim=0)


def check_in_sync(fields: Mapping[str, torch.Tensor], step: int, device: torch.device) -> None:
    """Raise on every rank if any rank's ``fields`` differ from rank 0's.

    One all-gather of a 48-bit digest per field (a few bytes whatever N_L), so it is cheap
    enough to run at every importance update.

    Raises:
        RuntimeError: naming the step, the differing ranks and fields.
    """
    if world_size() == 1:
        return
    names = sorted(fields)
    local = torch.tensor([_digest(fields[name]) for name in names], dtype=torch.float64, device=device)
    gathered = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(gathered, local)
    reference = gathered[0].tolist()
    differing = {}
    for other, digests in enumerate(gathered[1:], start=1):
        names_off = [name for name, a, b in zip(names, reference, digests.tolist()) if a != b]
        if names_off:
            differing[other] = names_off
    if differing:
        details = "; ".join(f"rank {r} differs from rank 0 in {', '.join(f)}" for r, f in differing.items())
        raise RuntimeError(
            f"IST ranks are out of sync after {step} optimizer steps: {details}. Every rank must train the same "
            "layers: use the same ISTConfig (seed included) and model on every rank, add ISTCallback on every rank, "
            "and resume all ranks from the same checkpoint."
        )


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (after checking the wrapper suits IST), else ``model``."""
    if isinstance(model, DistributedDataParallel):
        check_ddp(model)
        return model.module
    return model


def check_ddp(wrapper: DistributedDataParallel) -> None:
    """Refuse a DDP wrapper that cannot skip the adapters IST froze this step.

    Raises:
        ValueError: ``find_unused_parameters`` is off, or ``static_graph`` is on.
    """
    check_ddp_settings(wrapper.find_unused_parameters, getattr(wrapper, "static_graph", False))


def check_ddp_settings(find_unused_parameters: bool, static_graph: bool) -> None:
    """:func:`check_ddp` on the settings a DDP wrapper is (to be) built with."""
    if not find_unused_parameters:
        raise ValueError(
            "IST freezes the adapters of unselected layers each step, so DDP must be built with "
            "find_unused_parameters=True (Trainer: TrainingArguments(ddp_find_unused_parameters=True)); "
            "otherwise DDP fails with 'Expected to have finished reduction in the prior iteration'."
        )
    if static_graph:
        raise ValueError(
            "DDP static_graph=True assumes the same parameters get gradients every step, but IST changes the "
            "trained layers every step. Build DDP without static_graph (Trainer: ddp_static_graph=None or False)."
        )


def _digest(value: torch.Tensor) -> int:
    """A 48-bit digest of a tensor's bytes (exact in a float64, so it can travel in one gather)."""
    data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=6).digest(), "big")
