"""What ISTCallback checks in a Trainer's setup before the first step (docs/distributed.md has the why).

=======================================================  =====================================
setup                                                    outcome
=======================================================  =====================================
DDP (torchrun, accelerate launch), find_unused on        works (the Trainer's default for peft models)
DDP with ``ddp_find_unused_parameters=False``            ValueError: set it to True
DDP with ``ddp_static_graph=True``                       ValueError
DDP + reentrant activation checkpointing                 ValueError: use ``use_reentrant=False``
FSDP, DeepSpeed, parameters sharded as DTensors          NotImplementedError
``torch_compile=True``                                   warning: recompiles per selection, no speed-up
=======================================================  =====================================
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from istune.core import distributed

logger = logging.getLogger(__name__)


def check_trainer_setup(args, model: nn.Module, trainer=None) -> None:
    """Refuse setups IST cannot train correctly; warn about ones it trains without benefit.

    Args:
        args: the Trainer's ``TrainingArguments``.
        model: the model the callback was given (``trainer.model``).
        trainer: the running Trainer when it could be found; gives the exact DDP wrapper.

    Raises:
        NotImplementedError: FSDP, DeepSpeed or DTensor-sharded parameters.
        ValueError: a DDP setup that would fail or train the wrong parameters.
    """
    _refuse_sharding(args, model, trainer)
    if distributed.world_size() > 1:
        _check_ddp(args, trainer)
        if uses_reentrant_checkpointing(model):
            raise ValueError(
                "Reentrant activation checkpointing under DDP with find_unused_parameters=True (which IST needs) fails "
                "with 'Expected to mark a variable ready only once'. Use the non-reentrant variant: "
                "TrainingArguments(gradient_checkpointing_kwargs={'use_reentrant': False}) (the default in "
                "transformers 5), or model.gradient_checkpointing_enable({'use_reentrant': False})."
            )
    if getattr(args, "torch_compile", False):
        logger.warning(
            "IST with torch_compile=True: requires_grad is part of torch.compile's guards, so the model is recompiled "
            "for every new layer selection until torch._dynamo's recompile limit (8), then runs uncompiled. Results "
            "are correct but expect no speed-up; istune does not support torch.compile."
        )


def uses_reentrant_checkpointing(model: nn.Module) -> bool:
    """True if a module of ``model`` runs transformers' activation checkpointing in the reentrant variant."""
    for module in model.modules():
        function = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) is True and function is not None:
            if isinstance(function, functools.partial):
                if function.keywords.get("use_reentrant", True):  # torch's default is the reentrant one
                    return True
            elif function is torch.utils.checkpoint.checkpoint:
                return True
    return False


def _refuse_sharding(args, model: nn.Module, trainer) -> None:
    fsdp = bool(getattr(trainer, "is_fsdp_enabled", False) or getattr(args, "fsdp", None)) or _is_fsdp_module(model)
    deepspeed = bool(getattr(trainer, "is_deepspeed_enabled", False) or getattr(args, "deepspeed", None))
    if fsdp or deepspeed or _has_dtensor_parameters(model):
        what = "FSDP" if fsdp else "DeepSpeed" if deepspeed else "parameters sharded as DTensors (FSDP2, tensor parallel)"
        raise NotImplementedError(
            f"istune does not support {what}: IST changes which adapter parameters train at every step, and sharded "
            "engines fix that set when they wrap the model (FSDP flattens parameters; DeepSpeed ZeRO partitions "
            "gradients and steps every partitioned parameter). Use DDP (torchrun / accelerate launch without an FSDP "
            "or DeepSpeed config); see docs/distributed.md."
        )


def _check_ddp(args, trainer) -> None:
    wrapper = _find_ddp(getattr(trainer, "model_wrapped", None))
    if wrapper is not None:
        distributed.check_ddp(wrapper)
    elif getattr(args, "ddp_find_unused_parameters", None) is False:  # no wrapper in sight: trust the arguments
        raise ValueError("IST needs DDP's find_unused_parameters=True; TrainingArguments(ddp_find_unused_parameters="
                         "False) forbids it. Remove the argument or set it to True.")


def _find_ddp(model: Optional[nn.Module]) -> Optional[DistributedDataParallel]:
    """The DDP wrapper in a chain of wrappers (torch.compile's OptimizedModule keeps it as ``_orig_mod``)."""
    while model is not None and not isinstance(model, DistributedDataParallel):
        model = getattr(model, "_orig_mod", None)
    return model


def _is_fsdp_module(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FullyShardedDataParallel)


def _has_dtensor_parameters(model: nn.Module) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.5
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())
