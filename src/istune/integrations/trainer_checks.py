"""What ISTCallback checks in a Trainer's setup before the first step (docs/distributed.md has the why and the tests).

=======================================================  =====================================
setup                                                    outcome
=======================================================  =====================================
DDP (torchrun, accelerate launch), find_unused on        works (the Trainer's default for peft models)
DDP with ``ddp_find_unused_parameters=False``            ValueError: set it to True
DDP with ``ddp_static_graph=True``                       ValueError
DDP + reentrant activation checkpointing                 ValueError: use ``use_reentrant=False``
FSDP2 (``fsdp_config={'version': 2}``, the accelerate    works: per-parameter freezing, probes on the sharded
config file configs/accelerate/fsdp2.yaml)               model, checkpoints with every adapter, exact resume
FSDP2 without the Trainer (``callbacks=[...]``), saving  ValueError: use ``add_ist``, or ``save_strategy='no'``
FSDP2 + full layers with strategy 'ist'                  NotImplementedError (from SparseTuner): use 'random'
FSDP2 + ``unselected_optimizer_state='offload'`` (GPU)   NotImplementedError (from SparseTuner): 'drop' or FSDP2's
                                                         own cpu_offload
FSDP1 (``fsdp_config={'version': 1}``)                   NotImplementedError: shard with FSDP2
DeepSpeed ZeRO-2 / ZeRO-3 with ``add_ist(trainer, ...)``   works: per-layer optimizer groups, unselected ones
                                                         skipped (:mod:`istune.integrations.deepspeed`)
DeepSpeed without the Trainer (``callbacks=[...]``)      ValueError: use ``add_ist``
DeepSpeed optimizer section, offload, stage 0/1          NotImplementedError (from the deepspeed module)
DTensor parameters outside FSDP2 (tensor parallelism)    NotImplementedError: shard with FSDP2
``torch_compile=True``                                   warning: recompiles per selection, no speed-up
=======================================================  =====================================
"""

from __future__ import annotations

import logging

from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedModel

from istune.core import distributed, sharding
from istune.core.activation_checkpointing import uses_reentrant_checkpointing
from istune.core.checks import refuse_reentrant_checkpointing_under_ddp
from istune.integrations import deepspeed, trainer_internals

logger = logging.getLogger(__name__)


def check_trainer_setup(args, model: nn.Module, trainer=None, accelerator_state=None) -> None:
    """Refuse setups IST cannot train correctly; warn about ones it trains without benefit.

    Args:
        args: the Trainer's ``TrainingArguments``.
        model: the model the callback was given (``trainer.model``).
        trainer: the Trainer, when ISTCallback was given it (``add_ist``, ``ISTCallback(trainer=...)``): its
            accelerator and its DDP wrapper are checked themselves.
        accelerator_state: without the Trainer, accelerate's ``AcceleratorState`` (shared by every
            ``Accelerator`` of the process, the Trainer's included); the DDP settings then come from ``args``,
            from which the Trainer builds its DDP wrapper.

    Raises:
        NotImplementedError: FSDP1, DTensor parameters outside FSDP2 (tensor parallelism), or a DeepSpeed
            setting IST cannot keep exact.
        ValueError: a DDP setup that would fail or train the wrong parameters; DeepSpeed without the Trainer;
            FSDP2 with checkpoint saving without the Trainer.
    """
    engine = _check_sharding(args, model, trainer, accelerator_state)
    # FSDP2 reduces only the gradients that exist, DeepSpeed is checked by its own module: no DDP to check.
    if distributed.world_size() > 1 and engine is None:
        _check_ddp(args, model, trainer)
        refuse_reentrant_checkpointing_under_ddp(uses_reentrant_checkpointing(model))
    if getattr(args, "torch_compile", False):
        logger.warning(
            "IST with torch_compile=True: requires_grad is part of torch.compile's guards, so the model is recompiled "
            "for every new layer selection until torch._dynamo's recompile limit (8), then runs uncompiled. Results "
            "are correct but expect no speed-up; istune does not support torch.compile."
        )
    if trainer is None and engine == "fsdp2" and _value(getattr(args, "save_strategy", "no")) != "no":
        raise ValueError(
            f"ISTCallback under FSDP2 with save_strategy={_value(args.save_strategy)!r} needs the Trainer: every "
            "adapter must be trainable while a checkpoint is saved (FSDP2 saves only trainable parameters), and "
            "transformers hands callbacks no Trainer. Add IST after building the Trainer with "
            "istune.add_ist(trainer, config) instead of Trainer(callbacks=[ISTCallback(config)]), or pass "
            "save_strategy='no'.")


def _check_sharding(args, model: nn.Module, trainer, accelerator_state=None) -> str | None:
    """Refuse the sharded engines IST cannot train; return 'fsdp2', 'deepspeed', or None (neither).

    What IST cannot do under FSDP2 is refused by SparseTuner (:func:`istune.core.sharding.check_fsdp2`).
    """
    state = _accelerator_state(trainer, accelerator_state)
    if deepspeed.is_deepspeed(args, trainer, state):
        if trainer is None:
            raise ValueError(
                "ISTCallback under DeepSpeed needs the Trainer: it builds the optimizer with one param group per "
                "layer and skips the unselected layers' groups in ZeRO's step, and transformers hands callbacks no "
                "Trainer. Add IST after building the Trainer with istune.add_ist(trainer, config) instead of "
                "Trainer(callbacks=[ISTCallback(config)]). See docs/distributed.md.")
        deepspeed.check_deepspeed_config(deepspeed.deepspeed_config(trainer))
        deepspeed.check_optimizer_split(trainer)
        return "deepspeed"
    version = fsdp_version(args, model, trainer, accelerator_state)
    if version == 1:
        raise NotImplementedError(
            "istune does not support FSDP1 (fsdp_config version 1): it flattens each wrapped module's parameters into "
            "one FlatParameter when it wraps the model. Without use_orig_params a decoder layer's frozen base weights "
            "and trainable adapters would share one flat parameter with one requires_grad, so IST could not freeze "
            "adapters per layer; with use_orig_params=True it is untested, because FSDP1 needs an accelerator and "
            "istune is tested on CPU (FSDP1 is also deprecated in transformers 5). " + _USE_FSDP2)
    if version is None and sharding.has_dtensor_parameters(model):
        raise NotImplementedError(
            "istune does not support parameters sharded as DTensors outside FSDP2 (tensor parallelism): untested "
            "with a requires_grad that changes every step. " + _USE_FSDP2)
    return "fsdp2" if version == 2 else None


_USE_FSDP2 = ("Shard with FSDP2 instead: TrainingArguments(fsdp='full_shard auto_wrap', fsdp_config={'version': 2}) "
              "or accelerate launch --config_file configs/accelerate/fsdp2.yaml; or use DDP. See docs/distributed.md.")


def fsdp_version(args, model: nn.Module, trainer=None, accelerator_state=None) -> int | None:
    """1 or 2 when the model is (to be) sharded with FSDP, else None.

    The accelerator's state (the Trainer's, or ``accelerator_state``) decides when there is one:
    accelerate shards only on accelerator backends, so ``TrainingArguments(fsdp=...)`` on CPU
    processes trains with DDP. Without it: the model's wrappers (:func:`istune.core.sharding.wrapped_fsdp_version`),
    then the arguments. The one FSDP detection of the Trainer integration (its checks, its checkpoints).
    """
    state = _accelerator_state(trainer, accelerator_state)
    plugin = getattr(state, "fsdp_plugin", None)
    if plugin is not None:
        return int(getattr(plugin, "fsdp_version", 1))
    wrapped = sharding.wrapped_fsdp_version(model)
    if wrapped is not None:
        return wrapped
    if state is None and (trainer_internals.is_fsdp_enabled(trainer) or getattr(args, "fsdp", None)):
        config = getattr(args, "fsdp_config", None) or {}
        return int(config.get("version", config.get("fsdp_version", 2)))  # transformers 5's default is FSDP2
    return None


def _value(option) -> str:
    return str(getattr(option, "value", option))


def _accelerator_state(trainer, accelerator_state):
    if accelerator_state is not None:
        return accelerator_state
    return trainer_internals.accelerator_state(trainer)


def _check_ddp(args, model: nn.Module, trainer) -> None:
    """Check the Trainer's DDP wrapper; without the Trainer, the settings it builds the wrapper from."""
    wrapper = _find_ddp(trainer_internals.wrapped_model(trainer))
    if wrapper is not None:
        distributed.check_ddp(wrapper)
    else:
        distributed.check_ddp_settings(find_unused_parameters=_trainer_find_unused_parameters(args, model),
                                       static_graph=bool(getattr(args, "ddp_static_graph", None)))


def _trainer_find_unused_parameters(args, model: nn.Module) -> bool:
    """The ``find_unused_parameters`` the Trainer builds DDP with (``Trainer._build_accelerator_args``).

    Unless ``ddp_find_unused_parameters`` says, it is off for a transformers model with activation
    checkpointing (e.g. full-layer tuning) and on for any other model (peft's included).
    """
    chosen = getattr(args, "ddp_find_unused_parameters", None)
    if chosen is not None:
        return bool(chosen)
    if isinstance(model, PreTrainedModel):
        checkpointing = (getattr(model, "is_activation_checkpointing", False)
                         or getattr(args, "activation_checkpointing", False)
                         or getattr(args, "gradient_checkpointing", False))
        return not checkpointing
    return True


def _find_ddp(model: nn.Module | None) -> DistributedDataParallel | None:
    """The DDP wrapper in a chain of wrappers (torch.compile's OptimizedModule keeps it as ``_orig_mod``)."""
    while model is not None and not isinstance(model, DistributedDataParallel):
        model = getattr(model, "_orig_mod", None)
    return model
