"""benchmarks/methods_table.py: the --tiny smoke run writes a consistent JSON and markdown, and --render redoes the .md."""

import json

import pytest

from tests.bench import load_benchmark_script


@pytest.fixture(scope="module")
def methods_table():
    return load_benchmark_script("methods_table")


def test_tiny_run_writes_results(methods_table, tmp_path):
    out = tmp_path / "results" / "methods.json"
    result = methods_table.main(["--tiny", "--steps", "2", "--out", str(out)])

    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(result["results"]))
    assert list(saved["results"]) == ["series", "parallel", "lora"]
    for method, pair in saved["results"].items():
        plain, ist = pair["all"], pair["ist"]
        assert [len(s["selected"]) for s in plain["steps"]] == [4, 4]  # plain PEFT trains every layer
        assert [len(s["selected"]) for s in ist["steps"]] == [1, 1]  # N_u = 25% of 4 layers
        assert plain["params_trainable"] == ist["params_trainable"] == 4 * ist["params_trained_per_step"]
        assert plain["peak_breakdown"]["weights"] == ist["peak_breakdown"]["weights"]
        for record in plain["steps"] + ist["steps"]:
            assert record["peak_bytes"] == sum(record["peak_breakdown"].values())

    markdown = out.with_suffix(".md")
    assert "methods_table.py --tiny --steps 2" in markdown.read_text()
    assert "| LoRA | " in markdown.read_text() and "| 2.9 | 2.2 | 0.76 |" in markdown.read_text()
    markdown.unlink()
    methods_table.main(["--render", "--out", str(out)])
    assert "| Series | " in markdown.read_text()
    assert not list(out.parent.glob("*.tmp"))  # atomic writes left nothing behind
