"""istune.planning.shapes: the paper's models and the benchmark shapes resolve offline; a local folder is read, a
broken one named; an unknown name says how to fix it."""

import json

import pytest
import torch
import transformers as tf

from istune.planning.shapes import BUILTIN_CONFIGS, resolve_model_config


@pytest.mark.parametrize("hub_id", ["huggyllama/llama-7b", "yahma/llama-7b-hf", "meta-llama/Meta-Llama-3-8B",
                                    "huggyllama/llama-13b", "yahma/llama-13b-hf"])
def test_the_papers_models_resolve_offline_to_builtin_shapes(hub_id, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing there
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config, source = resolve_model_config(hub_id)
    assert source.startswith(f"config: built-in shape for {hub_id}")
    for key, value in BUILTIN_CONFIGS[hub_id].items():
        if key not in ("model_type", "architectures", "rope_theta"):
            assert getattr(config, key) == value, key
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions == pytest.approx({"huggyllama/llama-7b": 6.74, "yahma/llama-7b-hf": 6.74,
                                      "meta-llama/Meta-Llama-3-8B": 8.03, "huggyllama/llama-13b": 13.02,
                                      "yahma/llama-13b-hf": 13.02}[hub_id],
                                     abs=0.01)


def test_benchmark_shapes_resolve_by_name(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config, source = resolve_model_config("LLaMA-12x768")
    assert source.startswith("config: benchmark shape llama-12x768")
    sizes = (config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size)
    assert sizes == (12, 768, 2048, 32000)
    with pytest.raises(ValueError, match="llama-12x768"):  # the error lists the benchmark shapes
        resolve_model_config("no-such-model")


def test_a_local_folder_is_read_and_a_broken_one_is_named(tmp_path):
    tf.LlamaConfig(num_hidden_layers=6, hidden_size=96, intermediate_size=192, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=128).save_pretrained(tmp_path / "good")
    config, source = resolve_model_config(str(tmp_path / "good"))
    assert config.num_hidden_layers == 6 and "good" in source
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"--model=.*holds no config.json"):
        resolve_model_config(str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(ValueError, match=r"--model=.*cannot be read"):
        resolve_model_config(str(tmp_path / "broken"))


def test_an_unknown_model_name_says_how_to_fix_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"--model='someone/unknown-7b'.*huggingface-cli download.*built-in"):
        resolve_model_config("someone/unknown-7b")
