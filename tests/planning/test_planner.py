"""istune.planning.planner: predictions from the config on the meta device against measured CPU peaks,
recipe files, stored_layers. The command's own checks: tests/bench/test_plan.py."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import transformers as tf

from istune.adapters.methods import AdapterArgs, add_adapters
from istune.config import ISTConfig
from istune.core.tuner import SparseTuner
from istune.planning import planner
from istune.planning.rows import ROWS as ALL_ROWS
from istune.planning.rows import Row, stored_row, table_names
from istune.planning.tracker import MemoryTracker
from istune.planning.worst_case import worst_case_selections

TOLERANCE = 0.10  # the bound on |predicted - measured| / measured
ROWS = {name: ALL_ROWS[key] for name, key in table_names(planner.PLAN_KEYS).items()}  # istune plan's names


def tiny_config() -> tf.LlamaConfig:
    # Wide enough against the vocabulary that the layers, not the logits, make up the peak.
    return tf.LlamaConfig(num_hidden_layers=6, hidden_size=96, intermediate_size=192, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128)


# kernels="cpu": these predictions are compared with CPU runs, whose flash kernel takes fp32 and grouped KV heads.
SETTINGS = planner.PlanSettings(batch_size=2, seq_len=64, dtype="float32", rank=8, update_layers=2, kernels="cpu")


def measure_on_cpu(config, row: Row, settings: planner.PlanSettings, selected: list[int]) -> int:
    """Peak bytes of a real CPU training step, set up as a user does (the public APIs, an all-ones mask)."""
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=settings.attention)
    model = add_adapters(model, AdapterArgs(method=settings.method, rank=settings.rank, alpha=2 * settings.rank,
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
    settings = dataclasses.replace(settings, attention=attention)
    predicted = planner.predict(config, ROWS[row_key], settings, selected=selected)
    measured = measure_on_cpu(config, ROWS[row_key], settings, predicted["selected"])
    return abs(predicted["peak_bytes"] - measured) / measured


@pytest.mark.parametrize("row_key, attention", [
    *[(key, "sdpa") for key in ("lora", "lora+gc", "ist", "ist+recompute", "ist+gc", "ist:drop")],
    ("lora", "eager"), ("ist+recompute", "eager"),
])
def test_worst_step_prediction_matches_cpu_measurement(row_key, attention):
    assert relative_gap(row_key, attention, None) <= TOLERANCE


@pytest.mark.parametrize("method", ["dora", "parallel"])
def test_other_methods_match_cpu_measurement(method):
    assert relative_gap("ist", "sdpa", None, settings=dataclasses.replace(SETTINGS, method=method)) <= TOLERANCE


@pytest.mark.parametrize("row_key, selected", [
    ("ist", [9, 11]), ("ist+recompute", [9, 11]),
    # IST-aware checkpointing: the 11 layers below the lowest selected one keep nothing (without it, transformers'
    # checkpointing kept their inputs because the embeddings' output requires grad: 21% above the prediction).
    ("ist+gc", [11]),
])
def test_prediction_matches_cpu_when_layer_0_is_not_selected(row_key, selected):
    # Many narrow layers, so that what the layers below the lowest selected one keep is a large part of the peak.
    config = tf.LlamaConfig(num_hidden_layers=12, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128)
    settings = dataclasses.replace(SETTINGS, seq_len=128, update_layers=len(selected))
    assert relative_gap(row_key, "sdpa", selected, config, settings) <= TOLERANCE


def test_fp32_sdpa_with_grouped_kv_heads_is_planned_as_the_gpus_math_kernel():
    """On CUDA, fp32 SDPA with enable_gqa runs the math kernel, which keeps what eager attention keeps."""
    config, row = tiny_config(), ROWS["lora"]  # 4 heads, 2 KV heads
    peak = {(dtype, attention, kernels): planner.predict(config, row, dataclasses.replace(
        SETTINGS, dtype=dtype, attention=attention, kernels=kernels))["peak_bytes"]
        for dtype, attention, kernels in [("float32", "sdpa", "cuda"), ("float32", "sdpa", "cpu"),
                                          ("float32", "eager", "cuda"), ("bfloat16", "sdpa", "cuda"),
                                          ("bfloat16", "sdpa", "cpu")]}
    probabilities = config.num_hidden_layers * SETTINGS.batch_size * config.num_attention_heads \
        * SETTINGS.seq_len ** 2 * 4  # each layer's (B, H, L, L) fp32 probabilities
    gpu_fp32, cpu_fp32 = peak["float32", "sdpa", "cuda"], peak["float32", "sdpa", "cpu"]
    eager = peak["float32", "eager", "cuda"]
    # The math kernel keeps the probabilities, the fused one does not (it keeps its own small log-sum-exp instead).
    assert gpu_fp32 - cpu_fp32 >= 0.9 * probabilities
    assert abs(gpu_fp32 - eager) / eager < 0.05  # ... as eager attention keeps them (eager adds one causal mask)
    assert peak["bfloat16", "sdpa", "cuda"] == peak["bfloat16", "sdpa", "cpu"]  # 16-bit: flash attention on a GPU


def test_the_plan_header_names_the_math_kernel_fallback():
    config = tiny_config()
    fp32 = dataclasses.replace(SETTINGS, kernels="cuda")
    results = [planner.predict(config, ROWS["lora"], fp32)]
    assert "math kernel" in planner.header("src", config, fp32, results)
    for settings, cfg in [(dataclasses.replace(fp32, dtype="bfloat16"), config), (SETTINGS, config),
                          (fp32, tf.LlamaConfig(**{**config.to_diff_dict(), "num_key_value_heads": 4}))]:
        assert "math kernel" not in planner.header("src", cfg, settings, results)


# ------------------------------------------------------------------------------ 4-bit (QLoRA)


@pytest.mark.parametrize("row_key", ["lora", "lora+gc"])
def test_4bit_prediction_matches_a_bitsandbytes_cpu_run(row_key, tmp_path):
    """QLoRA as the recipe sets it up: nf4 with double quantization, prepare_model_for_kbit_training, LoRA."""
    pytest.importorskip("bitsandbytes")
    import peft

    config = tf.LlamaConfig(num_hidden_layers=4, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128)
    settings = dataclasses.replace(SETTINGS, dtype="bfloat16", load_in_4bit=True)
    predicted = planner.predict(config, ROWS[row_key], settings)

    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    quantization = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=torch.bfloat16)
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, dtype=torch.bfloat16)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = add_adapters(model, AdapterArgs(rank=settings.rank, alpha=2 * settings.rank), total_steps=10).train()
    if ROWS[row_key].checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    ids = torch.randint(0, config.vocab_size, (settings.batch_size, settings.seq_len))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    for measured_step in (False, True):
        with MemoryTracker(model, optimizer) if measured_step else warnings.catch_warnings() as tracker:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    measured = tracker.report()["peak_bytes"]
    # The tracker does not see bitsandbytes' quantization state (plain attributes, not buffers), which the
    # prediction counts: a few percent of a tiny model's weights.
    assert abs(predicted["peak_bytes"] - measured) / measured <= TOLERANCE
    base = sum(p.numel() for p in tf.AutoModelForCausalLM.from_config(config).parameters())
    assert predicted["params_total"] == base + sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


# ------------------------------------------------------------------------------ recipe files


RECIPE = """# istune train --config {path}
# A tiny LLaMA, LoRA + IST on the commonsense mix
model: {model}
method: lora
per_device_train_batch_size: 2
cutoff_len: 32
bf16: true
gradient_checkpointing: {gc}
strategy: ist
learning_rate: 0.0003
"""


@pytest.mark.parametrize("gc, row_key", [(False, "lora+ist"), (True, "lora+ist+gc")])
def test_a_recipe_file_is_planned_and_its_comment_filled(gc, row_key, monkeypatch, tmp_path, capsys):
    from istune import cli

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_config().save_pretrained(tmp_path / "model")
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE.format(path=path, model=tmp_path / "model", gc=str(gc).lower()))
    model, settings, row = planner.recipe_settings(__import__("yaml").safe_load(path.read_text()))
    assert (model, settings.batch_size, settings.seq_len, settings.dtype, row.key) == (
        str(tmp_path / "model"), 2, 32, "bfloat16", row_key)
    assert cli.main(["plan", "--recipe", str(path), "--fill"]) == 0
    lines = path.read_text().splitlines()
    assert lines[2].startswith(planner.COMMENT_PREFIX) and "GiB" in lines[2] and lines[3].startswith("model:")
    result, _ = planner.predict_recipe(path)
    assert result["row"] == row_key
    assert result["peak_bytes"] == planner.predict(tiny_config(), row, settings)["peak_bytes"]
    assert cli.main(["plan", "--recipe", str(path), "--fill"]) == 0  # filled again: replaced, not added
    assert sum(line.startswith(planner.COMMENT_PREFIX) for line in path.read_text().splitlines()) == 1


# ------------------------------------------------------------------------------ stored_layers


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("stored, expected", [(3, [[0, 5], [3, 5]]), (1, [[0, 5], [4, 5]])])
def test_stored_layers_is_planned_at_the_larger_of_its_two_worst_steps_and_matches_cpu(checkpointing, stored,
                                                                                        expected):
    config = tiny_config()  # 6 layers, N_u = 2
    row = stored_row(stored, checkpointing)
    candidates = worst_case_selections(6, 2, stored)
    assert candidates == expected  # layer 0 selected; or the most selected blocks stored
    peaks = [planner.predict(config, row, SETTINGS, selected=layers)["peak_bytes"] for layers in candidates]
    predicted = planner.predict(config, row, SETTINGS)
    assert predicted["peak_bytes"] == max(peaks) and predicted["selected"] == candidates[peaks.index(max(peaks))]
    measured = max(measure_on_cpu(config, row, SETTINGS, layers) for layers in candidates)
    assert abs(predicted["peak_bytes"] - measured) / measured <= TOLERANCE


def test_plan_takes_stored_layers_from_the_command_line_and_from_a_recipe(tmp_path, capsys):
    from istune import cli

    assert cli.main(["plan", "--model", "smollm2-135m", "--stored_layers", "-1"]) == 2
    assert "stored_layers=-1" in capsys.readouterr().err
    values = {"model": "m", "gradient_checkpointing": True, "stored_layers": 4, "unselected_optimizer_state": "drop"}
    _, _, row = planner.recipe_settings(values)
    assert (row.key, row.checkpointing, row.ist) == (
        "lora+ist+gc+stored4:drop", True, {"stored_layers": 4, "unselected_optimizer_state": "drop"})
    _, _, row = planner.recipe_settings({"model": "m", "stored_layers": 2})
    assert (row.key, row.checkpointing, row.ist) == ("lora+ist+stored2", False, {"stored_layers": 2})
