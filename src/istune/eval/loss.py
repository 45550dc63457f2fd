"""Held-out loss: the mean per-token loss of a model over a fixed set of examples."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from istune.core.probe import move_to_device
from istune.eval.logits import kept_logits


def heldout_loss(model: torch.nn.Module, examples: Sequence[Any], collate_fn: Callable[[list], dict],
                 batch_size: int = 8) -> float:
    """Token-weighted mean cross-entropy over ``examples`` (labels -100 are skipped).

    Every token counts once, whatever the batch it falls in, so the figure does not
    depend on ``batch_size``. The model's train/eval mode is restored afterwards.
    Only the positions that predict a labelled token are projected onto the
    vocabulary (``logits_to_keep``; a model without it computes them all).
    Padded and padding-free batches (``CausalLMCollator(padding_free=True)``) both work.
    """
    if len(examples) == 0:
        raise ValueError("heldout_loss needs at least one example.")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens, takes_masks = 0.0, 0, True
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                end = min(start + batch_size, len(examples))
                batch = move_to_device(collate_fn([examples[i] for i in range(start, end)]), device)
                labels = batch.pop("labels")
                for key in ("logits_to_keep", "shift_labels"):  # a collator's own selection; replaced below
                    batch.pop(key, None)
                targets = labels[:, 1:]
                summed, takes_masks = _summed_loss(model, batch, targets, takes_masks)
                total += summed
                tokens += int((targets != -100).sum())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("heldout_loss: every label is -100; there is no token to score.")
    return total / tokens


def _summed_loss(model: torch.nn.Module, batch: dict, targets: torch.Tensor, takes_masks: bool) -> tuple[float, bool]:
    """Summed cross-entropy of ``targets`` (labels shifted by one; -100 skipped) under ``model(**batch)``.

    Returns it with ``takes_masks`` (whether the forward takes a boolean ``logits_to_keep``; see ``kept_logits``).
    """
    labelled = targets != -100
    if "position_ids" in batch and "attention_mask" not in batch:
        batch["use_cache"] = False  # packed rows: a KV cache would hide the restarting positions from the mask
    keep = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    keep[:, :-1] = labelled  # position t predicts token t + 1
    _, logits, takes_masks = kept_logits(model, keep, takes_masks, **batch)
    loss = torch.nn.functional.cross_entropy(logits.float(), targets[labelled].to(logits.device), reduction="sum")
    return loss.item(), takes_masks
