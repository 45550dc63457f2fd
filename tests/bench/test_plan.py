"""istune plan: predictions from the config on the meta device against measured CPU peaks, and its inputs."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import transformers as tf

from istune.bench import plan as planner
from istune.bench.builtin_configs import BUILTIN_CONFIGS, resolve_model_config
from istune.bench.memory import MemoryTracker
from istune.bench.meta_kernels import nf4_bytes
from istune.config import ISTConfig
from istune.core.tuner import SparseTuner
from istune.recipe.methods import AdapterArgs, add_adapters

TOLERANCE = 0.10  # the bound on |predicted - measured| / measured
ROWS = {row.key: row for row in planner.ROWS}


def tiny_config() -> tf.LlamaConfig:
    # Wide enough against the vocabulary that the layers, not the logits, make up the peak.
    return tf.LlamaConfig(num_hidden_layers=6, hidden_size=96, intermediate_size=192, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128)


SETTINGS = planner.PlanSettings(batch_size=2, seq_len=64, dtype="float32", rank=8, update_layers=2)


def measure_on_cpu(config, row: planner.Row, settings: planner.PlanSettings, selected: list[int]) -> int:
    """Peak bytes of a real CPU training step, set up as a user does (the public APIs, an all-ones mask)."""
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=settings.attention)
    model = add_adapters(model, AdapterArgs(rank=settings.rank, alpha=2 * settings.rank,
                                            lora_dropout=settings.lora_dropout), total_steps=10).train()
    if row.checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    ids = torch.randint(0, config.vocab_size, (settings.batch_size, settings.seq_len))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}

    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    tuner = None
    if row.ist is not None:
        tuner = SparseTuner(model, ISTConfig(strategy="fixed", layers=selected, **row.ist), optimizer=optimizer)
        tuner.begin_step()
        step()
        tuner.end_step()
    with MemoryTracker(model, optimizer) as tracker:
        if tuner:
            tuner.begin_step()
        step()
        if tuner:
            tuner.end_step()
    return tracker.report()["peak_bytes"]


def relative_gap(row_key: str, attention: str, selected: list[int] | None, config=None,
                 settings: planner.PlanSettings = SETTINGS) -> float:
    config = config or tiny_config()
    settings = planner.replace(settings, attention=attention)
    predicted = planner.predict(config, ROWS[row_key], settings, selected=selected)
    measured = measure_on_cpu(config, ROWS[row_key], settings, predicted["selected"])
    return abs(predicted["peak_bytes"] - measured) / measured


@pytest.mark.parametrize("row_key, attention", [
    *[(key, "sdpa") for key in ("lora", "lora+gc", "ist", "ist+recompute", "ist+gc", "ist:drop")],
    ("lora", "eager"), ("ist+recompute", "eager"),
])
def test_worst_step_prediction_matches_cpu_measurement(row_key, attention):
    assert relative_gap(row_key, attention, None) <= TOLERANCE


IST_GC_REASON = "IST-aware checkpointing lands with the ckpt branch"


@pytest.mark.parametrize("row_key", [
    "ist", "ist+recompute",
    # On main, transformers' checkpointing makes the embeddings' output require grad, so the layers below the
    # lowest selected one keep their inputs (and recompute); the planner models the ckpt branch, where they do not.
    pytest.param("ist+gc", marks=pytest.mark.xfail(strict=True, reason=IST_GC_REASON)),
])
def test_prediction_matches_cpu_when_only_the_top_layer_is_selected(row_key):
    # Many narrow layers and long sequences: what the 11 layers below the selected one keep is about 20% of the peak.
    config = tf.LlamaConfig(num_hidden_layers=12, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128)
    settings = planner.replace(SETTINGS, seq_len=256, update_layers=1)
    assert relative_gap(row_key, "sdpa", [11], config, settings) <= TOLERANCE
