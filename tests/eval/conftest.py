"""Tiny tokenizer and random models for the eval tests (no downloads)."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
WORDS = (
    "the correct answer is true false solution1 solution2 answer1 answer2 answer3 option1 option2 "
    "ending1 ending2 ending3 ending4 question a cat dog sat on mat ran to park it was red blue green "
    "because so and . , ? : ### Instruction Response 0 1 2 3 4 5 6 7 8 9 42 very good bad"
).split()


def make_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer; adds no BOS (like GPT-2) unless ``add_bos`` (like LLaMA)."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


class SlicingLM(torch.nn.Module):
    """A causal LM as transformers 5.6-5.17 build one, around any newer one: the KV cache is called
    ``past_key_values``, and ``logits_to_keep`` slices the positions (``[:, logits_to_keep]``), so a 2-D
    boolean mask raises IndexError (counted in ``refused``)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.config, self.refused = inner, inner.config, 0
        self.cache_name = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=0):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache, **{self.cache_name: past_key_values})
        index = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        try:
            logits = out.logits[:, index, :]
        except IndexError:
            self.refused += 1
            raise
        return SimpleNamespace(logits=logits, past_key_values=getattr(out, self.cache_name))


def make_model(arch: str, vocab_size: int) -> torch.nn.Module:
    """A 2-layer random causal LM of the given architecture, seeded."""
    torch.manual_seed(0)
    ids = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **ids,
        )
        return LlamaForCausalLM(config)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128, **ids)
        return GPT2LMHeadModel(config)
    raise ValueError(f"arch={arch!r} unknown in tests")


ARCHS = ["llama", "gpt2"]


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(params=ARCHS)
def model(request, tokenizer) -> torch.nn.Module:
    return make_model(request.param, len(tokenizer))
