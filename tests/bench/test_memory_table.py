"""istune.bench.memory_table: meta against CPU (SDPA and eager), worst-case IST steps, exact bytes, CLI errors,
output files with the eager column."""

import dataclasses
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from istune.bench import memory_table
from istune.bench.memory_table import VARIANTS, Settings, check_meta, measure, variants_for
from istune.planning.rows import ALIASES, Row
from istune.planning.shapes import SHAPES
from istune.planning.worst_case import draw_schedule

FLOAT = 4  # bytes per float32
TINY = Settings(seq_len=16, steps=2, rank=4, bottleneck_size=8, extra_attentions=())  # seconds per run
ROWS = {**{v.key: v for v in VARIANTS}, **{old: v for v in VARIANTS for old, key in ALIASES.items() if key == v.key}}


def llama_parameters(shape) -> int:
    """Parameters of a LLaMA shape, counted from its sizes (not from a model)."""
    s = shape.sizes
    hidden, inner, vocab = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    kv = hidden // s["num_attention_heads"] * s["num_key_value_heads"]
    layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inner + 2 * hidden  # q, o; k, v; MLP; two norms
    return s["num_hidden_layers"] * layer + 2 * vocab * hidden + hidden  # embeddings, head (untied), final norm


@pytest.mark.parametrize("shape, attention, keys", [
    ("tiny-llama", "eager", ["full", "lora+ist", "lisa"]),
    ("tiny-gpt2", "eager", ["lora", "full+ist:drop"]),
    ("tiny-llama", "sdpa", ["full", "lora+ist", "lora:ckpt"]),
    ("tiny-gpt2", "sdpa", ["lora", "lora+ist:recompute"]),
])
def test_meta_device_agrees_with_cpu(shape, attention, keys):
    rows = [ROWS[k] for k in keys]
    records = check_meta([shape], rows, dataclasses.replace(TINY, attention=attention), device="cpu")

    assert [(r["variant"], r["attention"]) for r in records] == [(v.key, attention) for v in rows]
    for r in records:
        assert r["agrees"], r
        assert r["relative_difference"] <= 1e-3 and r["relative_difference_mean"] <= 1e-3
        # the only differences: AdamW's step counters (CPU scalars, counted only when the parameters are on the CPU)
        # and, with SDPA, the meta flash kernel's RNG state (24 bytes per layer)
        assert abs(r["measured_peak_bytes"] - r["meta_peak_bytes"]) < 2000
        # the CPU's flash kernel has no dropout: GPT-2's SDPA rows are checked with attention dropout off
        assert r["attention_dropout_off"] == (attention == "sdpa" and shape == "tiny-gpt2")


def attention_bytes_per_layer(shape, seq_len: int) -> tuple[int, int]:
    """What one LLaMA layer keeps for the backward pass of its attention core (float32, batch 1), counted from
    the sizes: eager, and SDPA's fused kernel. Both keep the queries and the output's transposed copy."""
    s = shape.sizes
    heads, kv_heads = s["num_attention_heads"], s["num_key_value_heads"]
    head_dim = s["hidden_size"] // heads
    eager = heads * seq_len * seq_len + 2 * heads * seq_len * head_dim  # probabilities; K and V repeated to H heads
    fused = 2 * kv_heads * seq_len * head_dim + heads * seq_len * head_dim + heads * seq_len  # K, V; output; LSE
    return FLOAT * eager, FLOAT * fused


def test_sdpa_on_meta_keeps_what_the_cpu_flash_kernel_keeps_and_no_attention_matrix():
    shape, settings = SHAPES["tiny-llama"], dataclasses.replace(TINY, seq_len=128, steps=1)
    sdpa_meta = measure(shape, ROWS["lora"], settings, kernels="cpu")  # the CPU's kernels: fp32 and GQA fused
    sdpa_cpu = measure(shape, ROWS["lora"], settings, device="cpu")  # torch's fused flash kernel, on real tensors
    eager_meta = measure(shape, ROWS["lora"], dataclasses.replace(settings, attention="eager"))
    gpu_meta = measure(shape, ROWS["lora"], settings)  # a GPU's kernels (the default): fp32 + GQA runs the math one
    layers, rng_state = shape.num_layers, 24  # the meta flash kernel's philox seed and offset (uint64: 2 + 1)

    eager, fused = attention_bytes_per_layer(shape, 128)
    assert shape.sizes["num_key_value_heads"] < shape.sizes["num_attention_heads"]  # grouped KV heads
    assert eager_meta["peak_bytes"] - sdpa_meta["peak_bytes"] == layers * (eager - fused - rng_state)
    assert gpu_meta["peak_bytes"] == eager_meta["peak_bytes"]
    assert sdpa_meta["peak_phase"] == eager_meta["peak_phase"] == sdpa_cpu["peak_phase"] == "backward"
    assert sdpa_cpu["peak_breakdown"]["activations"] == sdpa_meta["peak_breakdown"]["activations"] - layers * rng_state
    assert sdpa_cpu["peak_bytes"] == pytest.approx(sdpa_meta["peak_bytes"], rel=1e-4)


def test_gpt2_sdpa_with_attention_dropout_on_the_cpu_keeps_more_than_the_fused_kernel():
    # Why --check turns GPT-2's attention dropout off for SDPA: with it, the CPU runs SDPA's math fallback.
    shape, settings = SHAPES["tiny-gpt2"], dataclasses.replace(TINY, seq_len=64, steps=1)
    no_dropout, changed = memory_table.without_attention_dropout(shape)
    fused_cpu = measure(no_dropout, ROWS["lora"], settings, device="cpu")["peak_bytes"]
    math_cpu = measure(shape, ROWS["lora"], settings, device="cpu")["peak_bytes"]
    fused_meta = measure(shape, ROWS["lora"], settings)["peak_bytes"]  # the stand-in: dropout changes no bytes
    eager_meta = measure(shape, ROWS["lora"], dataclasses.replace(settings, attention="eager"))["peak_bytes"]

    assert changed and shape.config().attn_pdrop > 0 and no_dropout.config().attn_pdrop == 0
    assert fused_meta == pytest.approx(fused_cpu, rel=1e-4)
    assert math_cpu > eager_meta > fused_meta
    assert memory_table.without_attention_dropout(SHAPES["tiny-llama"]) == (SHAPES["tiny-llama"], False)


@pytest.mark.parametrize("key", ["lora+ist", "parallel+ist", "full+ist"])
def test_ist_peak_is_a_worst_case_step_with_layer_0(key):
    run = measure(SHAPES["tiny-llama"], ROWS[key], TINY)

    worst = run["steps"][run["worst_step"]]
    assert 0 in worst["selected"]  # the heaviest step is one that trains layer 0
    assert run["peak_bytes"] == worst["peak_bytes"] == max(s["peak_bytes"] for s in run["steps"])
    assert all(len(s["selected"]) == run["update_layers"] == 1 for s in run["steps"])  # 25 percent of 4 layers
    assert run["mean_step_peak_bytes"] == sum(s["peak_bytes"] for s in run["steps"]) / len(run["steps"])
    config = run["ist_config"]
    schedule = draw_schedule(config["strategy"], 4, 1, config["seed"], TINY.steps + 1)
    assert [s["selected"] for s in run["steps"]] == schedule[1:]  # seeded, after one settling step
    assert measure(SHAPES["tiny-llama"], ROWS[key], TINY)["steps"] == run["steps"]


def test_full_fine_tuning_gradients_and_adamw_state_are_three_times_the_weights():
    shape = SHAPES["tiny-llama"]
    run = measure(shape, ROWS["full"], TINY)
    params = llama_parameters(shape)
    with torch.device("meta"):
        buffers = sum(b.nbytes for b in AutoModelForCausalLM.from_config(shape.config()).buffers())

    assert run["params_total"] == run["params_trainable"] == params
    assert run["peak_breakdown"]["weights"] == FLOAT * params + buffers
    assert run["category_max"]["gradients"] == FLOAT * params
    assert run["optimizer_state_bytes_at_end"] == 2 * FLOAT * params  # exp_avg and exp_avg_sq (step counters: CPU)
    grads_and_state = run["category_max"]["gradients"] + run["optimizer_state_bytes_at_end"]
    assert grads_and_state == pytest.approx(3 * run["peak_breakdown"]["weights"], rel=1e-3)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_4bit_base_keeps_the_attention_asked_for(attention):
    # The 4-bit model is saved and reloaded; config.json does not hold the attention, so it must be passed again.
    pytest.importorskip("bitsandbytes")
    settings = dataclasses.replace(TINY, quantize="4bit", attention=attention)
    model, _ = memory_table.build(SHAPES["tiny-llama"], ROWS["lora"], settings, "cpu")
    assert model.config._attn_implementation == attention
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())


@pytest.mark.parametrize("embeddings", [True, False])
def test_lisa_trains_only_its_layers(embeddings):
    shape = SHAPES["tiny-llama"]
    settings = Settings(seq_len=16, steps=1, lisa_layers=2, lisa_embeddings=embeddings)
    run = measure(shape, ROWS["lisa"], settings)
    (step,) = run["steps"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape.config())
    trained = sum(p.numel() for j in step["selected"] for p in model.model.layers[j].parameters())
    if embeddings:
        trained += model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()

    assert len(step["selected"]) == 2 and 0 in step["selected"]
    assert run["params_trained_worst_step"] == trained
    assert run["optimizer_state_bytes_at_end"] == 2 * FLOAT * trained  # AdamW state after one step, active layers only
    assert run["ist_config"]["strategy"] == "fixed"


def test_rows_with_unknown_ist_options_are_skipped(monkeypatch):
    extra = Row("lora+ist+new", "LoRA + IST, new", "lora", {"no_such_option": True}, False, "lora")
    monkeypatch.setattr(memory_table, "VARIANTS", VARIANTS + (extra,))
    usable, skipped = variants_for(["lora"])
    assert skipped == [extra]
    assert [v.key for v in usable][:2] == ["lora", "lora+ist"]


def test_help_has_text_for_every_option_and_no_bare_percent():
    parser = memory_table.build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
        assert not re.search(r"%(?!%)", action.help.replace("%%", "")), action.help
    parser.format_help()  # formats without error


OK_ARGS = ["--shapes", "tiny-llama", "--methods", "lora", "--seq_len", "16", "--steps", "1"]


@pytest.mark.parametrize("args, option", [
    (["--shapes", "llama-70b"], "--shapes"),
    (["--methods", "lora,prefix"], "--methods"),
    (["--seq_len", "0"], "--seq_len"),
    (["--batch_size", "-1"], "--batch_size"),
    (["--steps", "0"], "--steps"),
    (["--dtype", "float8"], "--dtype"),
    (["--attention", "flash"], "--attention"),
    (["--attention", "sdpa,sdpa"], "--attention"),
    (["--attention", "sdpa,flash"], "--attention"),
    (["--device", "tpu"], "--device"),
    (["--methods", "lisa", "--lisa_layers", "5"], "--lisa_layers"),
    (["--check", "--check_shapes", "nope"], "--check_shapes"),
])
def test_bad_input_names_the_option_and_writes_nothing(tmp_path, args, option):
    with pytest.raises(ValueError, match=re.escape(option)):
        memory_table.main([*OK_ARGS, "--out", str(tmp_path / "t.json"), *args])
    assert not list(tmp_path.iterdir())


def test_cuda_without_cuda_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device=cuda"):
        memory_table.main([*OK_ARGS, "--device", "cuda", "--out", str(tmp_path / "t.json")])
    with pytest.raises(ValueError, match="--out"):
        memory_table.main([*OK_ARGS, "--out", str(tmp_path / "t.md")])
    assert not list(tmp_path.iterdir())


def test_main_writes_json_and_markdown_atomically(tmp_path, monkeypatch):
    written = []
    write = memory_table.write_record
    monkeypatch.setattr(memory_table, "write_record", lambda *args, **kwargs: written.extend(write(*args, **kwargs)))
    out = tmp_path / "results" / "memory.json"

    assert memory_table.main([*OK_ARGS, "--attention", "sdpa", "--out", str(out)]) == 0
    assert written == [out, out.with_suffix(".md")]
    assert not list(out.parent.glob("*.tmp")) and not list(out.parent.glob(".*"))
    saved = json.loads(out.read_text())
    runs = saved["runs"]["tiny-llama"]
    assert list(runs)[:2] == ["lora", "lora+ist"]
    assert saved["meta"]["settings"]["seq_len"] == 16 and saved["meta"]["device"] == "meta"
    assert saved["check"] is None
    for run in runs.values():
        assert run["peak_bytes"] == sum(run["peak_breakdown"].values())
    text = out.with_suffix(".md").read_text()
    assert "-m istune.bench.memory_table --shapes tiny-llama --methods lora" in text  # the command line
    ratio = runs["lora+ist"]["peak_bytes"] / runs["lora"]["peak_bytes"]
    assert "| LoRA | LoRA + IST | ratio |" in text and f"| {ratio:.2f} |" in text


def test_every_row_has_an_eager_column_beside_sdpa(tmp_path, monkeypatch):
    monkeypatch.setattr(memory_table, "VARIANTS", (ROWS["lora"], ROWS["lora+ist"]))  # two rows are enough
    out = tmp_path / "memory.json"
    # bfloat16: in float32 a GPU's SDPA runs the math kernel for tiny-llama's grouped KV heads, the same bytes as eager
    assert memory_table.main([*OK_ARGS, "--seq_len", "64", "--dtype", "bfloat16", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())  # default: --attention sdpa,eager
    runs = saved["runs"]["tiny-llama"]
    settings = dataclasses.replace(TINY, seq_len=64, steps=1, rank=32, bottleneck_size=256, dtype="bfloat16")
    text = out.with_suffix(".md").read_text()

    recorded = saved["meta"]["settings"]
    assert recorded["attention"] == "sdpa" and recorded["extra_attentions"] == ["eager"]
    assert "| shape | row | sdpa GB | ratio | eager GB | ratio | eager / sdpa |" in text
    for key in ("lora", "lora+ist"):
        eager = measure(SHAPES["tiny-llama"], ROWS[key], dataclasses.replace(settings, attention="eager"))
        assert runs[key]["attention"] == "sdpa"
        assert runs[key]["peak_bytes"] == measure(SHAPES["tiny-llama"], ROWS[key], settings)["peak_bytes"]
        assert runs[key]["extra_attention"]["eager"]["peak_bytes"] == eager["peak_bytes"] > runs[key]["peak_bytes"]
        ratio = eager["peak_bytes"] / runs[key]["peak_bytes"]
        assert re.search(rf"\| tiny-llama \| {re.escape(ROWS[key].label)} \|.*\| {ratio:.2f} \|\n", text)

    assert memory_table.main([*OK_ARGS, "--attention", "sdpa", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["runs"]["tiny-llama"]["lora"]["extra_attention"] == {}
    assert "eager GB" not in out.with_suffix(".md").read_text()


def test_check_puts_the_agreement_in_the_output(tmp_path):
    out = tmp_path / "t.json"
    assert memory_table.main([*OK_ARGS, "--methods", "lisa", "--out", str(out), "--check",
                              "--check_shapes", "tiny-llama", "--check_seq_len", "16"]) == 0
    saved = json.loads(out.read_text())
    assert [(r["shape"], r["attention"], r["variant"], r["agrees"]) for r in saved["check"]] == [
        ("tiny-llama", "sdpa", "lisa", True), ("tiny-llama", "eager", "lisa", True)]
    assert "## Meta device against a measured run" in out.with_suffix(".md").read_text()


def test_failed_check_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(memory_table, "CHECK_TOLERANCE", -1.0)  # nothing can agree
    out = tmp_path / "t.json"
    assert memory_table.main([*OK_ARGS, "--methods", "lisa", "--out", str(out), "--check",
                              "--check_shapes", "tiny-llama", "--check_seq_len", "16"]) == 1
    assert not list(tmp_path.iterdir())
