"""Tiny tokenizer and random models for the eval tests (no downloads)."""

from __future__ import annotations

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
