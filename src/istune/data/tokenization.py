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
features the same way and may be used instead.
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


def tokenize_example(
    example: dict[str, Any], tokenizer: Any, cutoff_len: int = 256, train_on_inputs: bool = True
) -> dict[str, list[int]]:
    """Input ids, attention mask and labels of one LLM-Adapters example.

    Args:
        example: A row with ``instruction``, ``output`` and optional ``input``.
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
    instruction, input_text = example["instruction"], example.get("input") or None
    ids = _encode(tokenizer, generate_prompt(instruction, input_text, example["output"]), cutoff_len, add_eos=True)
    labels = list(ids)
    if not train_on_inputs:
        prompt_len = len(_encode(tokenizer, generate_prompt(instruction, input_text), cutoff_len, add_eos=False))
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
    """Right-pads a batch of tokenized examples into tensors.

    Padding uses ``pad_token_id`` in ``input_ids``, 0 in ``attention_mask`` and
    -100 in ``labels``.

    Args:
        tokenizer: Supplies ``pad_token_id`` (falls back to ``eos_token_id``).
        pad_to_multiple_of: Round the padded length up to a multiple of this.
    """

    def __init__(self, tokenizer: Any, pad_to_multiple_of: int | None = None) -> None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("tokenizer has neither pad_token_id nor eos_token_id; set tokenizer.pad_token first")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} must be a positive integer or None")
        self.pad_token_id, self.pad_to_multiple_of = pad, pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        fills = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {
            key: torch.tensor([list(f[key]) + [fill] * (length - len(f[key])) for f in features], dtype=torch.long)
            for key, fill in fills.items()
        }
