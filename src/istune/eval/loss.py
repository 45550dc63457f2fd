"""Held-out loss: the mean per-token loss of a model over a fixed set of examples."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from istune.core.probe import move_to_device


def heldout_loss(model: torch.nn.Module, examples: Sequence[Any], collate_fn: Callable[[list], dict],
                 batch_size: int = 8) -> float:
    """Token-weighted mean cross-entropy over ``examples`` (labels -100 are skipped).

    Every token counts once, whatever the batch it falls in, so the figure does not
    depend on ``batch_size``. The model's train/eval mode is restored afterwards.
    """
    if len(examples) == 0:
        raise ValueError("heldout_loss needs at least one example.")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = move_to_device(collate_fn([examples[i] for i in range(start, min(start + batch_size, len(examples)))]), device)
                labels = batch.pop("labels")
                logits = model(**batch).logits[:, :-1].float()
                targets = labels[:, 1:]
                losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                           ignore_index=-100, reduction="sum")
                total += losses.item()
                tokens += int((targets != -100).sum())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("heldout_loss: every label is -100; there is no token to score.")
    return total / tokens
