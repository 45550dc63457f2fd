"""Logits at chosen positions only, on every transformers version istune supports."""

from __future__ import annotations

from typing import Any

import torch


def kept_logits(model: torch.nn.Module, keep: torch.Tensor, takes_masks: bool = True,
                **inputs: Any) -> tuple[Any, torch.Tensor, bool]:
    """``model(**inputs)`` and its logits at the True positions of ``keep`` (``[batch, seq]`` boolean).

    Returns ``(output, logits [kept positions, vocab] row by row, takes_masks)``. With ``takes_masks`` the
    mask goes in as ``logits_to_keep``, so only those positions are projected onto the vocabulary
    (transformers' ``slice_logits_to_keep``). transformers 5.6-5.17 index the hidden states with it as a
    slice and raise IndexError: the call is then made again without it, every logit projected and the kept
    ones picked, and ``takes_masks`` comes back False so the caller's next calls skip the failing one. The same
    for a forward without ``logits_to_keep`` (a TypeError naming it). A model that ignores ``logits_to_keep``
    (logits of every position) has the kept ones picked the same way. A call
    given a KV cache is not retried (the failed call has already extended it): its IndexError propagates.
    """
    if takes_masks:
        try:
            out = model(**inputs, logits_to_keep=keep)
        except (IndexError, TypeError) as error:
            if isinstance(error, TypeError) and "logits_to_keep" not in str(error):
                raise  # another argument the forward lacks: the caller's to handle
            if "cache" in inputs or "past_key_values" in inputs:
                raise
        else:
            logits = out.logits
            if logits.dim() == 3 and logits.shape[:2] == keep.shape:  # logits_to_keep ignored
                return out, logits[keep.to(logits.device)], takes_masks
            return out, logits.reshape(-1, logits.shape[-1]), True
    out = model(**inputs)
    return out, out.logits[keep.to(out.logits.device)], False
