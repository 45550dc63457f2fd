"""A tiny LLaMA on disk whose sizes bitsandbytes can quantize (hidden 64: one 64-value block per row)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..eval.conftest import make_tokenizer


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-64")
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_args(model_dir, data, out, *extra) -> list[str]:
    """`istune train` for 4 steps of batch 2 on the tiny model and data file, no task evaluation."""
    return ["train", "--model", str(model_dir), "--data", str(data), "--output_dir", str(out), "--eval_tasks", "none",
            "--max_steps", "4", "--train_samples", "24", "--heldout_samples", "8",
            "--per_device_train_batch_size", "2", "--rank", "4", "--alpha", "8", "--update_layers", "1",
            "--probe_interval", "2", "--logging_steps", "1", *extra]
