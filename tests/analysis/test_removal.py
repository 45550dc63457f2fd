"""Figure 2(a): greedy search is the stepwise argmin/argmax; β=0 removal is exactly a zeroed LoRA B;
the command's output."""

from __future__ import annotations

import itertools
import json
import math
import shutil

import pytest
import torch

from istune.analysis.cli import main
from istune.analysis.removal import greedy_removal, importance_order, random_order, removal_curve
from istune.analysis.run_folder import load_run
from istune.eval.loss import heldout_loss

from .conftest import IMPORTANCE, NUM_LAYERS

WEIGHTS = [0.1, 0.2, 0.3, 1.0]


def interacting_loss(removed):
    """Additive per-layer costs, plus a large penalty once layers 0 and 1 are both gone."""
    removed = set(removed)
    return 1.0 + sum(WEIGHTS[i] for i in removed) + (5.0 if {0, 1} <= removed else 0.0)


@pytest.mark.parametrize("remove,expected", [("least", [0, 2, 3, 1]), ("most", [3, 2, 1, 0])])
def test_greedy_order_follows_the_loss_given_what_is_already_removed(remove, expected):
    order, losses = greedy_removal(4, interacting_loss, remove)
    assert order == expected  # 'least' is not the single-removal order [0, 1, 2, 3]: layer 1 waits for the penalty
    assert losses == [interacting_loss(order[:k]) for k in range(5)]


@pytest.mark.parametrize("remove", ["least", "most"])
def test_greedy_choice_is_the_brute_force_extreme_at_every_step(remove):
    costs = {frozenset(s): math.sin(7 * sum((i + 1) ** 2 for i in s)) for r in range(5)
             for s in itertools.combinations(range(4), r)}
    order, losses = greedy_removal(4, lambda removed: costs[frozenset(removed)], remove)
    pick = min if remove == "least" else max
    for step in range(4):
        remaining = [p for p in range(4) if p not in order[:step]]
        assert costs[frozenset(order[:step + 1])] == pick(costs[frozenset(order[:step] + [p])] for p in remaining)
        assert losses[step + 1] == costs[frozenset(order[:step + 1])]


def test_greedy_ties_go_to_the_lower_position_and_steps_stop_early():
    assert greedy_removal(4, lambda removed: 1.0, "least", steps=2) == ([0, 1], [1.0, 1.0, 1.0])
    assert greedy_removal(4, lambda removed: 1.0, "most", steps=2)[0] == [0, 1]


def test_importance_and_random_orders():
    assert importance_order(IMPORTANCE, high_first=False) == [1, 0, 3, 2]
    assert importance_order(IMPORTANCE, high_first=True) == [2, 3, 0, 1]
    assert sorted(random_order(4, seed=5)) == [0, 1, 2, 3] and random_order(4, 5) == random_order(4, 5)
    assert removal_curve([2, 0], lambda removed: float(sum(removed) + len(removed))) == [0.0, 3.0, 4.0]


def _loss_with_zeroed_lora_b(lora_run, layers, heldout, collate):
    """The same run loaded by peft directly, with lora_B of ``layers`` set to zero."""
    import peft

    results = json.loads((lora_run / "results.json").read_text())
    from istune.models import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(results["run"]["model"])
    model = peft.PeftModel.from_pretrained(base, lora_run / "adapter").eval()
    with torch.no_grad():
        for index in layers:
            for name, parameter in model.base_model.model.model.layers[index].named_parameters():
                if "lora_B" in name:
                    parameter.zero_()
    return heldout_loss(model, heldout, collate)


@pytest.mark.parametrize("removed", [[2], [2, 0], [1, 3, 0]])
def test_removal_with_beta_zero_is_exactly_a_zeroed_lora_b(lora_run, removed):
    from istune.analysis.removal import heldout_loss_of_removed

    loaded = load_run(lora_run)
    loss = heldout_loss_of_removed(loaded)
    expected = _loss_with_zeroed_lora_b(lora_run, removed, loaded.heldout, loaded.collate)
    assert loss(removed) == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert abs(loss(removed) - loss([])) > 1e-3  # the adapters matter, so the comparison can fail
    assert loss([]) == pytest.approx(heldout_loss(loaded.model, loaded.heldout, loaded.collate))  # restored


def test_remove_layers_command_writes_every_order(lora_run, tmp_path, capsys):
    out = tmp_path / "removal"
    assert main(["remove-layers", str(lora_run), "--out_dir", str(out), "--seed", "1"]) == 0
    record = json.loads((out / "layer_removal.json").read_text())
    assert (out / "layer_removal.png").stat().st_size > 1000
    assert list(record["orders"]) == ["importance_low_first", "importance_high_first", "greedy_least", "greedy_most",
                                      "random"]
    assert record["orders"]["importance_low_first"]["removed"] == [1, 0, 3, 2]
    assert record["orders"]["importance_high_first"]["removed"] == [2, 3, 0, 1]
    single = {int(p): v for p, v in record["single_removal_loss"].items()}
    assert record["orders"]["greedy_least"]["removed"][0] == min(single, key=single.get)
    assert record["orders"]["greedy_most"]["removed"][0] == max(single, key=single.get)
    assert record["ranking"] == record["orders"]["greedy_most"]["removed"]

    loaded = load_run(lora_run)
    with loaded.model.disable_adapter():  # every adapter removed = the base model
        base_loss = heldout_loss(loaded.model, loaded.heldout, loaded.collate)
    for order in record["orders"].values():
        assert sorted(order["removed"]) == list(range(NUM_LAYERS))
        assert order["loss"][0] == pytest.approx(record["loss_without_removal"])
        assert order["loss"][-1] == pytest.approx(base_loss, rel=1e-6)
        assert order["perplexity"] == pytest.approx([math.exp(v) for v in order["loss"]])
    assert "greedy ranking" in capsys.readouterr().out


def test_remove_layers_limits_and_subsets(lora_run, tmp_path):
    out = tmp_path / "removal"
    assert main(["remove-layers", str(lora_run), "--out_dir", str(out), "--orders", "greedy_least,random",
                 "--max_removed", "2", "--heldout_samples", "4", "--metric", "loss"]) == 0
    record = json.loads((out / "layer_removal.json").read_text())
    assert list(record["orders"]) == ["greedy_least", "random"] and record["heldout_examples"] == 4
    assert all(len(order["removed"]) == 2 and len(order["loss"]) == 3 for order in record["orders"].values())
    assert record["ranking"] is None  # a partial greedy search ranks nothing


def _copy_with_strategy(lora_run, tmp_path, strategy):
    copy = tmp_path / "copy"
    shutil.copytree(lora_run, copy)
    results = json.loads((copy / "results.json").read_text())
    results["ist"]["strategy"] = strategy
    (copy / "results.json").write_text(json.dumps(results))
    return copy


@pytest.mark.parametrize("args,message", [
    (["--orders", "greedy_least,sideways"], "--orders has unknown ['sideways']"),
    (["--max_removed", "5"], "--max_removed=5 is more than the run's N_L=4"),
    (["--max_removed", "0"], "--max_removed=0 must be at least 1"),
    (["--heldout_samples", "99"], "--heldout_samples=99 must be between 1 and the run's 8"),
])
def test_bad_input_is_refused_before_any_output(lora_run, tmp_path, args, message):
    out = tmp_path / "removal"
    with pytest.raises(ValueError) as error:
        main(["remove-layers", str(lora_run), "--out_dir", str(out), *args])
    assert message in str(error.value)
    assert not out.exists()


def test_missing_run_folder_and_importance_of_a_run_without_it(lora_run, tmp_path):
    with pytest.raises(ValueError, match="run_dir='.*nowhere' is not the output folder"):
        main(["remove-layers", str(tmp_path / "nowhere")])
    plain = _copy_with_strategy(lora_run, tmp_path, "all")
    with pytest.raises(ValueError, match="strategy 'all', which learns no importance"):
        main(["remove-layers", str(plain), "--orders", "importance_low_first"])
    assert not (plain / "layer_removal").exists()
    assert main(["remove-layers", str(plain), "--max_removed", "1"]) == 0  # default orders skip importance
    record = json.loads((plain / "layer_removal" / "layer_removal.json").read_text())
    assert list(record["orders"]) == ["greedy_least", "greedy_most", "random"]
