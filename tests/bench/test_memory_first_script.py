"""benchmarks/memory_first.py: the --tiny smoke run writes a consistent JSON and markdown."""

import json

import pytest

from tests.bench import load_benchmark_script


@pytest.fixture(scope="module")
def memory_first():
    pytest.importorskip("peft")
    return load_benchmark_script("memory_first")


def test_tiny_run_writes_results(memory_first, tmp_path):
    out = tmp_path / "results" / "mem.json"
    result = memory_first.main(["--tiny", "--steps", "2", "--out", str(out)])

    saved = json.loads(out.read_text())
    assert saved["ratio_ist_over_lora"] == result["ratio_ist_over_lora"]
    lora, ist = saved["results"]["lora"], saved["results"]["ist"]
    assert [len(s["selected"]) for s in lora["steps"]] == [4, 4]  # plain LoRA trains every layer
    assert [len(s["selected"]) for s in ist["steps"]] == [1, 1]  # N_u = 25% of 4 layers
    assert lora["peak_breakdown"]["weights"] == ist["peak_breakdown"]["weights"]
    assert ist["peak_bytes"] < lora["peak_bytes"]
    assert ist["importance_update"]["peak_bytes"] > 0
    for record in lora["steps"] + ist["steps"]:
        assert record["peak_bytes"] == sum(record["peak_breakdown"].values())

    markdown = out.with_suffix(".md").read_text()
    assert "memory_first.py --tiny --steps 2" in markdown
    assert "LoRA+IST (paper, Table 1) | 2.2" in markdown
    assert not list(out.parent.glob("*.tmp"))  # atomic writes left nothing behind
