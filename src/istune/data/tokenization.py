"""Tokenization of LLM-Adapters examples for causal-LM training, and a padding collator.

Follows LLM-Adapters' ``finetune.py``: the full prompt (template + output) is
tokenized with truncation to ``cutoff_len``; EOS is appended when the text
was not cut and does not already end with it; labels copy the input ids.
With ``train_on_inputs=False`` the first ``n`` labels become -100, where
``n`` is the token count of the prompt alone (template with empty output,
no EOS), so the loss covers only the response and EOS.

Example:
    >>> dataset = InstructionDataset(rows, tokenizer, cutoff_len=256, train_on_inputs=False)
    >>> trainer = Trainer(model, args, train_dataset=dataset, data_collator=CausalLMCollator(tokenizer))

``transformers.DataCollatorForSeq2Seq(tokenizer, padding=True)`` pads these
features the same way and may be used instead. ``CausalLMCollator(tokenizer,
padding_free=True, labelled_logits_only=True)`` computes no padding and projects
only the labelled positions onto the vocabulary: the same loss, less work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from istune.data.llm_adapters import generate_prompt

IGNORE_INDEX = -100  # label value the cross-entropy loss skips


def _encode(tokenizer: Any, text: str, cutoff_len: int, add_eos: bool) -> list[int]:
    ids = list(tokenizer(text, truncation=True, max_length=cutoff_len, padding=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and len(ids) < cutoff_len and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def example_prompt(example: dict[str, Any]) -> str:
    """The text before the response: the row's own ``prompt`` if it has one (no template, as the evaluation's
    ``default_prompt`` reads it), else the LLM-Adapters template of its ``instruction`` and ``input``."""
    if "prompt" in example:
        return example["prompt"]
    return generate_prompt(example["instruction"], example.get("input") or None)


def tokenize_example(
    example: dict[str, Any], tokenizer: Any, cutoff_len: int = 256, train_on_inputs: bool = True
) -> dict[str, list[int]]:
    """Input ids, attention mask and labels of one LLM-Adapters example.

    Args:
        example: A row with ``instruction``, ``output`` and optional ``input``, or with its own ``prompt``
            (then trained as ``prompt + output``, without the template; see ``example_prompt``).
        tokenizer: A Hugging Face tokenizer with an EOS token.
        cutoff_len: Maximum tokens, EOS included (LLM-Adapters' ``cutoff_len``).
        train_on_inputs: If False, prompt tokens get label -100 (LLM-Adapters'
            default is True: the loss covers the whole text).

    Returns:
        ``{"input_ids", "attention_mask", "labels"}``, lists of equal length.

    Raises:
        ValueError: If ``cutoff_len`` is below 1.
    """
    if cutoff_len < 1:
        raise ValueError(f"cutoff_len={cutoff_len} must be at least 1 token")
    prompt = example_prompt(example)
    ids = _encode(tokenizer, prompt + example["output"], cutoff_len, add_eos=True)
    labels = list(ids)
    if not train_on_inputs:
        prompt_len = len(_encode(tokenizer, prompt, cutoff_len, add_eos=False))
        labels[:prompt_len] = [IGNORE_INDEX] * min(prompt_len, len(labels))
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


class InstructionDataset(Dataset):
    """A map-style dataset that tokenizes LLM-Adapters rows on access.

    Args:
        rows: LLM-Adapters rows (e.g. from ``load_llm_adapters_json``).
        tokenizer: A Hugging Face tokenizer.
        cutoff_len: Maximum tokens per example.
        train_on_inputs: If False, mask prompt tokens out of the loss.
    """

    def __init__(
        self, rows: Sequence[dict[str, Any]], tokenizer: Any, cutoff_len: int = 256, train_on_inputs: bool = True
    ) -> None:
        if cutoff_len < 1:
            raise ValueError(f"cutoff_len={cutoff_len} must be at least 1 token")
        self.rows, self.tokenizer = rows, tokenizer
        self.cutoff_len, self.train_on_inputs = cutoff_len, train_on_inputs

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return tokenize_example(self.rows[index], self.tokenizer, self.cutoff_len, self.train_on_inputs)


class CausalLMCollator:
    """Collates tokenized examples into a batch: right-padded, or packed into one row (padding-free).

    Padded (the default): ``input_ids``, ``attention_mask`` and ``labels`` of shape
    ``[batch, longest]``, padded with ``pad_token_id``, 0 and -100.

    Padding-free (``padding_free=True``, as TRL's ``padding_free``): the examples are
    concatenated into one row, ``[1, total tokens]``, with ``position_ids`` restarting at 0
    for each example and no ``attention_mask``; transformers' attention then keeps the
    examples apart (a block-diagonal causal mask, built from the restarting positions).
    The first label of each example is -100, so no example predicts the next one's first
    token. No padding is computed. The model must run without a KV cache
    (``config.use_cache=False``, which the Trainer sets), or the positions are not read.

    Labelled logits only (``labelled_logits_only=True``): also ``logits_to_keep``, the
    positions whose next label is not -100 (see ``labelled_positions``), and ``shift_labels``,
    those next labels. A transformers causal LM then projects only those positions onto the
    vocabulary and computes the same loss from them; with the prompt masked out
    (``train_on_inputs=False``) that is a few answer tokens per example instead of all of
    them. The model class must slice its hidden states with transformers'
    ``slice_logits_to_keep`` (``batch_layout_unsupported`` in ``istune.models``
    checks); the loss is unchanged, the logits returned are those of the kept positions.

    Args:
        tokenizer: Supplies ``pad_token_id`` (falls back to ``eos_token_id``).
        pad_to_multiple_of: Round the padded length up to a multiple of this (padded batches only).
        padding_free: Pack the examples into one row instead of padding them.
        labelled_logits_only: Add ``logits_to_keep`` and ``shift_labels`` (see above).
    """

    def __init__(self, tokenizer: Any, pad_to_multiple_of: int | None = None, *, padding_free: bool = False,
                 labelled_logits_only: bool = False) -> None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("tokenizer has neither pad_token_id nor eos_token_id; set tokenizer.pad_token first")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} must be a positive integer or None")
        if padding_free and pad_to_multiple_of is not None:
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} pads, padding_free=True does not; "
                             "use one of them")
        self.pad_token_id, self.pad_to_multiple_of = pad, pad_to_multiple_of
        self.padding_free, self.labelled_logits_only = padding_free, labelled_logits_only

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = self._packed(features) if self.padding_free else self._padded(features)
        if self.labelled_logits_only:
            batch.update(labelled_positions(batch["labels"]))
        return batch

    def _padded(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        fills = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {
            key: torch.tensor([list(f[key]) + [fill] * (length - len(f[key])) for f in features], dtype=torch.long)
            for key, fill in fills.items()
        }

    @staticmethod
    def _packed(features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        input_ids, labels, positions = [], [], []
        for feature in features:
            if not feature["input_ids"]:
                raise ValueError("padding_free=True cannot pack an example with no tokens")
            input_ids += feature["input_ids"]
            labels += [IGNORE_INDEX, *feature["labels"][1:]]
            positions += range(len(feature["input_ids"]))
        as_row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
        return {"input_ids": as_row(input_ids), "labels": as_row(labels), "position_ids": as_row(positions)}


def labelled_positions(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``logits_to_keep`` (positions whose next label is not -100) and ``shift_labels`` (those labels).

    Position t predicts token t + 1, so t is kept when ``labels[:, t + 1] != -100``. A batch of one row
    (every padding-free batch) gets the kept positions as a 1-D index tensor, which transformers 5.6-5.17
    also take (they index the hidden states with ``logits_to_keep``, ``[:, logits_to_keep]``); a batch of
    several rows gets a boolean mask ``[batch, seq]``, which only later versions take (a row's count differs).
    """
    following = torch.full_like(labels, IGNORE_INDEX)
    following[:, :-1] = labels[:, 1:]
    keep = following != IGNORE_INDEX
    positions = keep[0].nonzero().squeeze(1) if len(labels) == 1 else keep
    return {"logits_to_keep": positions, "shift_labels": following[keep]}
