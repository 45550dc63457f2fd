"""istune.bench.timing: every row is timed in parts, probes only where IST runs, bad options are refused."""

import json

import pytest

from istune.bench import timing
from istune.config import ISTConfig
from tests.tiny_models import tiny_model


@pytest.fixture
def tiny(monkeypatch):
    """`--model` loads a random 4-layer LLaMA; counts the loads."""
    loads = []

    def load(name):
        loads.append(name)
        return tiny_model("llama", num_layers=4)

    monkeypatch.setattr(timing, "load_model", load)
    return loads


def test_every_row_is_timed_and_only_ist_rows_probe(tiny, tmp_path):
    out = tmp_path / "results" / "step_time"
    argv = ["--steps", "2", "--rounds", "2", "--batch_size", "2", "--seq_len", "8", "--ist", "num_probes=2,beta=0.5",
            "--out", str(out)]
    assert timing.main(argv) == 0

    saved = json.loads(out.with_suffix(".json").read_text())
    rows = saved["rows"]
    expected = [row.label for row in timing.builtin_rows().values()] + ["LoRA + IST (num_probes=2, beta=0.5)"]
    assert [row["label"] for row in rows] == expected
    assert len(tiny) == len(expected)  # one model copy per row
    for row in rows:
        assert all(row[part] > 0 for part in ("forward", "backward", "optimizer")), row
        assert row["samples"]["steps"] == 4  # rounds x steps, warm-up left out
        assert row["step"] >= row["forward"]
        if row["ist"]["strategy"] == "ist":
            # 2 steps per round < T_c = 10: one update timed per round
            assert row["samples"]["updates"] == 2 and row["probe_update"] > 0
            assert row["probe_per_step"] == pytest.approx(row["probe_update"] / 10)
        else:
            assert row["samples"]["updates"] == 0 and row["probe_update"] is None and row["probe_per_step"] == 0
        assert row["total"] == pytest.approx(row["step"] + row["probe_per_step"])
    assert rows[0]["vs_lora"] == 1.0
    assert rows[-1]["ist"] == {"strategy": "ist", "num_probes": 2, "beta": 0.5}
    lisa = next(row for row in rows if row["method"] == "full")
    blocks = tiny_model("llama", num_layers=4).model.layers
    assert lisa["trainable"] == sum(p.numel() for p in blocks.parameters())  # whole layers, not adapters

    markdown = out.with_suffix(".md").read_text()
    assert "-m istune bench time --steps 2" in markdown and "| LoRA + IST (probe batch 1) |" in markdown
    assert not list(out.parent.glob(".*tmp"))


def test_probe_batch_size_cuts_the_probe_batch():
    ids = tiny_model("llama").config.vocab_size
    import torch

    batch = {"input_ids": torch.arange(12).reshape(3, 4) % ids, "labels": torch.arange(12).reshape(3, 4) % ids}
    full = timing.build(timing.builtin_rows()["ist"], tiny_model("llama", num_layers=4), batch)
    small = timing.build(timing.builtin_rows()["ist-probe1"], tiny_model("llama", num_layers=4), batch)
    assert full.probe_batch["input_ids"].shape == (3, 4)
    assert small.probe_batch["input_ids"].tolist() == [batch["input_ids"][0].tolist()]


def test_recompute_rows_are_valid_ist_configs():
    for key in ("ist-recompute", "ist-recompute-probe1"):
        config = ISTConfig(**timing.builtin_rows()[key].ist)
        assert config.strategy == "ist" and config.recompute_unselected


@pytest.mark.parametrize("argv, words", [
    (["--strategies", "lora,lisa2"], ["--strategies='lora,lisa2'", "'lisa2'", "lora, random"]),
    (["--ist", "probe_batch=1"], ["--ist 'probe_batch=1'", "no field 'probe_batch'", "probe_batch_size"]),
    (["--ist", "probe_batch_size"], ["--ist 'probe_batch_size'", "FIELD=VALUE"]),
    (["--ist", "probe_batch_size=one"], ["probe_batch_size='one' is not an int", "probe_batch_size=2"]),
    (["--ist", "probe_batch_size=0"], ["--ist 'probe_batch_size=0'", "ISTConfig.probe_batch_size=0", ">= 1"]),
    (["--ist", "beta=1.5"], ["ISTConfig.beta=1.5", "[0, 1]"]),
    (["--ist", "beta=strong"], ["beta='strong' is not a float"]),
    (["--steps", "0"], ["--steps=0", "at least 1"]),
])
def test_bad_options_raise_before_any_model_loads(tiny, tmp_path, argv, words):
    with pytest.raises(ValueError) as error:
        timing.main(argv + ["--out", str(tmp_path / "out")])
    for word in words:
        assert word in str(error.value)
    assert tiny == [] and not list(tmp_path.iterdir())


def test_ist_values_are_converted_by_field_type():
    assert timing.parse_ist_fields("probe_batch_size=2, mu=100, probe_batch_size=none") == {
        "probe_batch_size": None, "mu": 100.0}
    assert timing.parse_ist_fields("beta=1") == {"beta": 1.0}
    if "recompute_unselected" in {f.name for f in __import__("dataclasses").fields(ISTConfig)}:
        assert timing.parse_ist_fields("recompute_unselected=true") == {"recompute_unselected": True}
        with pytest.raises(ValueError, match="recompute_unselected='maybe' is not a boolean"):
            timing.parse_ist_fields("recompute_unselected=maybe")
