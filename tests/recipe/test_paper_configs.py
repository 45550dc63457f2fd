"""Every recipe in configs/paper/ runs: 2 steps on a tiny random LLaMA, flags overriding model, data and steps."""

import json
import re
from pathlib import Path

import pytest
import yaml

from istune.cli import main

PAPER = Path(__file__).resolve().parents[2] / "configs" / "paper"
RECIPES = sorted(PAPER.glob("*.yaml"))


def test_the_paper_recipes_are_there():
    names = {path.stem for path in RECIPES}
    for model in ("llama7b", "llama13b"):
        for method in ("lora", "dora", "series", "parallel"):
            assert {f"commonsense-{model}-{method}", f"commonsense-{model}-{method}-ist"} <= names
    assert {"commonsense-llama3-8b-lora", "commonsense-llama3-8b-lora-ist",
            "arithmetic-llama3-8b-lora", "arithmetic-llama3-8b-lora-ist"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipe_runs_two_steps_on_a_tiny_model(path, tiny_llama_dir, data_file, tmp_path):
    text = path.read_text()
    values = yaml.safe_load(text)
    first = text.splitlines()[0]
    assert first.startswith(f"# istune train --config configs/paper/{path.name}")
    assert re.search(rf"# Expects the hub model {re.escape(values['model'])} ", text)
    assert "# predicted peak GPU memory:" in text
    assert values["cutoff_len"] == 256
    assert values["per_device_train_batch_size"] * values["gradient_accumulation_steps"] == 16
    assert values["num_train_epochs"] == 3 and values["warmup_steps"] == 100 and values["max_steps"] == -1
    assert values["mu"] == (100 if path.stem.startswith("arithmetic") else 10) if values["strategy"] == "ist" else True
    if values["method"] in ("lora", "dora"):
        assert (values["rank"], values["alpha"], values["lora_dropout"]) == (32, 64, 0.05)
    if path.stem.startswith("commonsense"):
        assert values["eval_limit"] is None and values["eval_tasks"] == "all"  # the full test sets

    out = tmp_path / "run"
    overrides = ["--model", str(tiny_llama_dir), "--data", str(data_file), "--output_dir", str(out),
                 "--max_steps", "2", "--heldout_samples", "4", "--eval_tasks", "none", "--compare_base", "false",
                 "--bf16", "false"]  # a CI CPU may have no bfloat16
    assert main(["train", "--config", str(path), *overrides]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["adapter"]["method"] == values["method"] and results["ist"]["strategy"] == values["strategy"]
    assert results["training"]["learning_rate"] == values["learning_rate"]
    assert results["training"]["gradient_accumulation_steps"] == 4 and results["training"]["max_steps"] == 2
    assert len(results["importance"]) == 2 and (out / "adapter").is_dir()
