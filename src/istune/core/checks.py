"""What SparseTuner refuses, or warns about, in a model and optimizer before it trains; each error names the fix."""

from __future__ import annotations

import logging

import torch
from torch import nn

from istune.core import distributed
from istune.core.layers import AdapterLayer, modality_towers, trainable_outside_layers

logger = logging.getLogger(__name__)


def refuse_merged_adapters(layers: list[AdapterLayer]) -> None:
    """Raise if an adapter is merged into its base weight (it would neither train nor be suppressed)."""
    merged = [layer.name for layer in layers if any(getattr(m, "merged", False) for m in layer.adapters)]
    if merged:
        raise ValueError(f"The adapters of {merged[0]}{' and others' if len(merged) > 1 else ''} are merged into "
                         "their base weights: a merged adapter takes no part in the forward pass, so IST can neither "
                         "suppress (eq. 8) nor train it. Call model.unmerge_adapter() before training.")


def warn_about_parameters_outside_layers(model: nn.Module, layers: list[AdapterLayer]) -> None:
    """Warn about trainable parameters outside the adapter layers: they train at every step.

    A multimodal model's vision (or audio) tower gets one plain line of its own: with ``towers="train"``
    its adapters are outside the language model's layers, which are all IST chooses among; with ``"select"``
    its blocks are among the layers (said once, at info level), and only its adapters outside them (a merger,
    a pooling head) train at every step.
    """
    outside = list(trainable_outside_layers(model, layers))
    towers = modality_towers(model)
    for tower, path in towers.items():
        held = {name for name in outside if name.startswith(f"{path}.")}
        blocks = [j for j, layer in enumerate(layers) if layer.name.startswith(f"{path}.")]
        if blocks:
            logger.info("IST: the %s's %d blocks that hold adapters ('%s') join the selection: positions %d-%d of "
                        "the N_L = %d layers IST chooses among.", tower, len(blocks), path, blocks[0], blocks[-1],
                        len(layers))
        if held and blocks:
            inner = sorted(name[len(path) + 1:] for name in held)
            logger.warning("IST: the %s's adapters outside its blocks ('%s': %s%s) train at every step, outside "
                           "the selection.", tower, path, ", ".join(inner[:3]), ", ..." if len(inner) > 3 else "")
        elif held:
            logger.warning("IST: the %s's adapters ('%s', %d trainable parameters) train at every step, outside "
                           "the selection; IST chooses among the language model's %d decoder layers only.",
                           tower, path, len(held), len(layers))
        outside = [name for name in outside if name not in held]
    if outside:
        why = "" if towers else " (intended for LISA-style embeddings or head; otherwise freeze them)"
        logger.warning("IST: %d trainable parameters outside the decoder layers (%s%s) train at every step%s; IST "
                       "chooses only among the layers.", len(outside), ", ".join(outside[:3]),
                       ", ..." if len(outside) > 3 else "", why)


def check_optimizer_holds(optimizer: torch.optim.Optimizer, layers: list[AdapterLayer]) -> None:
    """Raise if some adapter parameter is missing from the optimizer (frozen before it was built).

    Checked by SparseTuner when given the optimizer, and under DeepSpeed before its param groups are split per layer.
    """
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [layer.name for layer in layers if any(id(p) not in held for p in layer.parameters)]
    if missing:
        raise ValueError(
            f"The optimizer does not hold the adapter parameters of {len(missing)} layers ({', '.join(missing[:4])}"
            f"{', ...' if len(missing) > 4 else ''}): they would never train when selected. Build the optimizer over "
            "every adapter parameter before IST starts, with all adapters trainable (do not freeze adapters yourself)."
        )


def refuse_reentrant_checkpointing_under_ddp(reentrant: bool) -> None:
    """Raise when ``reentrant`` activation checkpointing runs in more than one process (DDP).

    Args:
        reentrant: whether checkpointing runs in torch's reentrant variant: SparseTuner asks its
            :class:`~istune.core.activation_checkpointing.LayerCheckpointing` at the first step, the Trainer's checks
            :func:`~istune.core.activation_checkpointing.uses_reentrant_checkpointing` before it.
    """
    if reentrant and distributed.world_size() > 1:
        raise ValueError(
            "Reentrant activation checkpointing under DDP with find_unused_parameters=True (which IST needs) fails "
            "with 'Expected to mark a variable ready only once'. Use the non-reentrant variant: "
            "TrainingArguments(gradient_checkpointing_kwargs={'use_reentrant': False}) (the default in transformers "
            "5), or model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})."
        )
