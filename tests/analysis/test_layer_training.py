"""Figure 2(b): which sets are planned from a ranking, and that a fixed-set run trains only those layers."""

from __future__ import annotations

import json
import re

import pytest
from safetensors.torch import load_file

from istune.analysis.cli import main
from istune.analysis.layer_training import parse_layer_sets, plan_layer_sets, read_ranking
from istune.recipe.train import train_run

RANKING = [2, 0, 3, 1]  # most important first


def test_top_bottom_and_all_sets_follow_the_ranking():
    planned = plan_layer_sets(4, RANKING, ["top", "bottom", "all"], [1, 2], [[3, 0]], seed=7)
    sets = {run.name: (run.ist.strategy, run.ist.layers) for run in planned}
    assert sets == {
        "top1-2-seed7": ("fixed", [2]), "top2-0_2-seed7": ("fixed", [0, 2]),
        "bottom1-1-seed7": ("fixed", [1]), "bottom2-1_3-seed7": ("fixed", [1, 3]),
        "all-seed7": ("all", None), "set-0_3-seed7": ("fixed", [0, 3]),
    }
    assert all(run.ist.seed == 7 for run in planned)
    assert [run.labels["k"] for run in planned] == [1, 2, 1, 2, 4, 2]


@pytest.mark.parametrize("kwargs,message", [
    (dict(k_values=[5]), "--k_values has k=5, out of range"),
    (dict(layer_sets=[[1, 4]]), "--layer_sets has layers [4], out of range"),
    (dict(ranking=None), "--kinds top/bottom need --ranking"),
    (dict(ranking=[0, 1, 2]), "--ranking orders 3 layers"),
    (dict(kinds=["top", "middle"]), "--kinds='top,middle'"),
])
def test_bad_sets_are_refused(kwargs, message):
    arguments = dict(num_layers=4, ranking=RANKING, kinds=["top", "bottom"], k_values=[1], layer_sets=[], seed=1)
    with pytest.raises(ValueError) as error:
        plan_layer_sets(**{**arguments, **kwargs})
    assert message in str(error.value)


def test_layer_sets_text_and_rankings(lora_run, tmp_path):
    assert parse_layer_sets("0,1;5") == [[0, 1], [5]]
    for bad in ("0,1;", "0,x", "1,1"):
        with pytest.raises(ValueError, match="--layer_sets="):
            parse_layer_sets(bad)
    assert read_ranking(str(lora_run)) == [2, 3, 0, 1]  # the run's importance, most important first
    removal = tmp_path / "layer_removal.json"
    removal.write_text(json.dumps({"ranking": RANKING}))
    assert read_ranking(str(removal)) == RANKING
    removal.write_text(json.dumps({"ranking": None}))
    with pytest.raises(ValueError, match="holds no complete 'ranking'"):
        read_ranking(str(removal))
    with pytest.raises(ValueError, match="--ranking='.*nowhere' is neither"):
        read_ranking(str(tmp_path / "nowhere"))


def _trained_layers(adapter_dir) -> set[int]:
    """Layers whose LoRA B moved away from peft's zero initialisation."""
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    moved = set()
    for name, tensor in weights.items():
        if "lora_B" in name and tensor.abs().max() > 0:
            moved.add(int(re.search(r"layers\.(\d+)\.", name).group(1)))
    return moved


def test_fixed_sets_train_only_their_layers(tiny_model_dir, data_file, tmp_path, capsys):
    ranking = tmp_path / "layer_removal.json"
    ranking.write_text(json.dumps({"ranking": RANKING}))
    out = tmp_path / "sets"
    assert main(["train-layers", "--out", str(out), "--ranking", str(ranking), "--kinds", "top,bottom,all",
                 "--k_values", "1,2", "--keep_adapters", "--model", str(tiny_model_dir), "--data", str(data_file),
                 "--max_steps", "3", "--batch_size", "2", "--heldout_samples", "8", "--rank", "4",
                 "--cutoff_len", "64"], train=train_run) == 0
    result = json.loads((out / "layer_training.json").read_text())
    assert (out / "layer_training.png").stat().st_size > 1000
    assert [row["name"] for row in result["rows"]] == ["top1-2-seed42", "top2-0_2-seed42", "bottom1-1-seed42",
                                                       "bottom2-1_3-seed42", "all-seed42"]
    for row in result["rows"]:
        assert _trained_layers(out / "runs" / row["name"] / "adapter") == set(row["layers"])
        assert row["heldout_loss"] > 0
    losses = {row["heldout_loss"] for row in result["rows"]}
    assert len(losses) == len(result["rows"])  # different sets, different models
    assert "held-out loss" in capsys.readouterr().out
    assert not list(out.rglob("*.tmp")) and not list((out / "runs").glob("*.work"))

    # a kept run folder loads back for remove-layers with the loss its training recorded
    run_dir = out / "runs" / "all-seed42"
    assert main(["remove-layers", str(run_dir), "--orders", "random", "--max_removed", "1"]) == 0
    removal = json.loads((run_dir / "layer_removal" / "layer_removal.json").read_text())
    tuned = json.loads((run_dir / "results.json").read_text())["tuned"]["heldout_loss"]
    assert removal["loss_without_removal"] == pytest.approx(tuned, rel=1e-6)
    assert removal["orders"]["random"]["loss"][1] != pytest.approx(tuned, rel=1e-9)


def test_train_layers_refuses_a_k_above_the_models_layers(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "sets"
    with pytest.raises(ValueError, match="--k_values has k=8, out of range: the model has N_L=4"):
        main(["train-layers", "--out", str(out), "--kinds", "top", "--k_values", "8", "--ranking", _ranking(tmp_path),
              "--model", str(tiny_model_dir), "--data", str(data_file)], train=_must_not_train)
    assert not out.exists()


def _must_not_train(*args, **kwargs):
    raise AssertionError("training started")


def _ranking(tmp_path) -> str:
    path = tmp_path / "ranking.json"
    path.write_text(json.dumps({"ranking": RANKING}))
    return str(path)
