"""Fixtures for the data tests: a character-level tokenizer and a writer for data files.

The character tokenizer gives one token per character, so token counts are
string lengths and tokenizing a prefix gives a prefix of the ids: tests can
state exactly which positions are prompt and which are response.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SPECIALS = ["<pad>", "<unk>", "</s>"]


@pytest.fixture
def char_tokenizer():
    """A tokenizer with one token per printable ASCII character, ``</s>`` as EOS and no pad token."""
    return make_char_tokenizer()


def make_char_tokenizer():
    """:func:`char_tokenizer`, outside a fixture."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {token: index for index, token in enumerate(SPECIALS + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


@pytest.fixture
def write_file(tmp_path):
    """Write ``rows`` to ``tmp_path/name`` as a JSON list (``jsonl=False``) or JSON lines; return the path."""

    def write(name: str, rows, jsonl: bool = False) -> Path:
        path = tmp_path / name
        if isinstance(rows, str):
            path.write_text(rows, encoding="utf-8")
        elif jsonl:
            path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        else:
            path.write_text(json.dumps(rows), encoding="utf-8")
        return path

    return write
