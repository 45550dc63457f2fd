"""Every selection rule on the tuner's machinery: one table of rules x the guarantees all of them share.

Each registered rule trains a tiny random model in a plain loop; the checks hold for all alike: only
the selected layers' adapters move, every selection passes check_selection, a selection is held
``switch_interval`` steps, and a run cut in two by state_dict/load_state_dict equals the straight run
bit for bit. Then the rules' own definitions (BAdam's exact order, LISA = 'random' held K steps,
'gradnorm' told the norms of the layers that trained), and rules of one's own: by object, by name,
the docs' example, and ones that break the contract.
"""

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from istune import ISTConfig, SparseTuner
from istune.core.measures import layer_gradient_norms
from istune.core.rules import BAdamRule, RandomRule
from istune.core.selection import SelectionRule, StepView, check_selection, register_rule, rule_factory, rule_names

from ..tiny_models import peft_model

NUM_LAYERS = 5
DOCS = Path(__file__).resolve().parents[2] / "docs" / "methods.md"
# The configuration each rule trains with here (N_u = 2 of 5: BAdam's last block wraps around).
RULE_CONFIGS = {
    "ist": {"update_layers": 2, "probe_interval": 2},
    "random": {"update_layers": 2},
    "lisa": {"update_layers": 2, "switch_interval": 2},
    "badam": {"update_layers": 2, "switch_interval": 2, "block_order": "random"},
    "fixed": {"layers": [1, 3]},
    "all": {},
    "owlore": {"update_layers": 2, "calibration_interval": 3, "outlier_threshold": 3.0},
    "gradnorm": {"update_layers": 2, "exploration": 0.2},
    "probe-once": {"update_layers": 2, "probe_by": "suppression"},
}
RULES = rule_names()  # every rule registered by istune.core.rules


def _batch(seed, batch_size=2, length=6):
    ids = torch.randint(0, 100, (batch_size, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _config(name, **overrides):
    return ISTConfig(strategy=name, seed=7, **{**RULE_CONFIGS.get(name, {"update_layers": 2}), **overrides})


def _setup(config, rule=None, model=None):
    model = model or peft_model("llama", "lora", num_layers=NUM_LAYERS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    holder = []
    tuner = SparseTuner(model, config, optimizer=optimizer, rule=rule,
                        probe_batches=lambda: _batch(500 + holder[0].step))  # the same batch at the same step
    holder.append(tuner)
    return model, optimizer, tuner


def _train(model, optimizer, tuner, steps, check=None):
    """``steps`` optimizer steps of the plain loop; ``check(before, selected)`` after each."""
    selections = []
    for _ in range(steps):
        before = [[p.detach().clone() for p in layer.parameters] for layer in tuner.layers]
        selected = tuner.begin_step()
        model(**_batch(tuner.step)).loss.backward()
        tuner.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tuner.end_step(probe_batch=_batch(100 + tuner.step))
        if check is not None:
            check(before, selected)
        selections.append(selected)
    return selections


def _adapters(tuner):
    return [p.detach().clone() for layer in tuner.layers for p in layer.parameters]


@pytest.mark.parametrize("name", RULES)
def test_only_the_selected_layers_change_and_every_selection_is_valid(name):
    config = _config(name)
    model, optimizer, tuner = _setup(config)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    count = config.resolve(NUM_LAYERS).update_layers

    def check(before, selected):
        assert check_selection(name, selected, NUM_LAYERS, count, tuner.step) == selected
        for j, (old, layer) in enumerate(zip(before, tuner.layers)):
            moved = [not torch.equal(a, b) for a, b in zip(old, layer.parameters)]
            assert all(moved) if j in selected else not any(moved), (name, tuner.step, j, selected)

    selections = _train(model, optimizer, tuner, 6, check)
    if config.switch_interval > 1:  # held K steps, chosen again at 0, K, 2K
        assert all(selections[k] == selections[k + 1] for k in range(0, 6, config.switch_interval))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    tuner.close()
    assert all(p.requires_grad for layer in tuner.layers for p in layer.parameters)


def _straight_and_resumed(config):
    """(selections, tuner) of 6 steps straight, and of 3 + state_dict/load_state_dict into fresh objects + 3."""
    straight = _setup(config)
    selections = _train(*straight, 6)

    model, optimizer, tuner = _setup(config)
    resumed = _train(model, optimizer, tuner, 3)
    tuner_state = {**tuner.state_dict(), "rule": json.loads(json.dumps(tuner.state_dict()["rule"]))}  # as saved
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(weights[n])
    model, optimizer, tuner = _setup(config, model=model)
    optimizer.load_state_dict(optimizer_state)
    tuner.load_state_dict(tuner_state)
    resumed += _train(model, optimizer, tuner, 3)
    return (selections, straight[2]), (resumed, tuner)


@pytest.mark.parametrize("name", RULES)
def test_resume_from_state_dict_is_bit_equal(name):
    (selections, straight), (resumed, tuner) = _straight_and_resumed(_config(name))
    assert resumed == selections
    assert all(torch.equal(a, b) for a, b in zip(_adapters(tuner), _adapters(straight)))
    assert torch.equal(tuner.importance, straight.importance)


def test_a_state_without_rule_state_is_accepted():
    model, optimizer, tuner = _setup(_config("badam"))
    _train(model, optimizer, tuner, 2)
    state = tuner.state_dict()
    del state["rule"]  # as written before rules were objects
    _, _, fresh = _setup(_config("badam"))
    fresh.load_state_dict(state)
    assert fresh.step == 2 and fresh.rule.order == []


def test_badam_trains_blocks_in_their_exact_order():
    def run(order, steps, switch_interval=1):
        config = ISTConfig(strategy="badam", update_layers=2, block_order=order, switch_interval=switch_interval)
        model, optimizer, tuner = _setup(config)
        return _train(model, optimizer, tuner, steps)

    blocks = [[0, 1], [2, 3], [0, 4]]  # [4, 0] wraps around to fill N_u = 2
    assert BAdamRule.blocks(5, 2) == [[0, 1], [2, 3], [4, 0]]
    assert BAdamRule.blocks(10, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    assert run("ascending", 7) == [blocks[b] for b in (0, 1, 2, 0, 1, 2, 0)]
    assert run("descending", 7) == [blocks[b] for b in (2, 1, 0, 2, 1, 0, 2)]
    assert run("ascending", 6, switch_interval=2) == [blocks[b] for b in (0, 0, 1, 1, 2, 2)]
    generator = torch.Generator().manual_seed(ISTConfig().seed)  # the tuner's generator; only BAdam draws from it
    passes = torch.randperm(3, generator=generator).tolist() + torch.randperm(3, generator=generator).tolist()
    assert run("random", 6) == [blocks[b] for b in passes]
    assert sorted(passes[:3]) == sorted(passes[3:]) == [0, 1, 2]


def test_lisa_is_random_held_for_k_steps_and_uniform():
    def run(name, switch_interval):
        config = ISTConfig(strategy=name, update_layers=2, switch_interval=switch_interval, seed=3)
        model, optimizer, tuner = _setup(config)
        return _train(model, optimizer, tuner, 9)

    lisa, random_held = run("lisa", 3), run("random", 3)
    assert lisa == random_held
    assert all(lisa[k] == lisa[k + 1] == lisa[k + 2] for k in (0, 3, 6))
    assert run("random", 1)[:3] == lisa[::3]  # the same draws, each held 3 steps
    generator, draws = torch.Generator().manual_seed(0), 4000
    counts = torch.zeros(NUM_LAYERS)
    view = StepView(step=0, num_layers=NUM_LAYERS, count=2, previous=(), generator=generator,
                    importance=torch.zeros(NUM_LAYERS, dtype=torch.float64), probe_losses=None,
                    gradient_norms=None, outlier_ratios=None)
    for _ in range(draws):
        counts[rule_factory("lisa")().select(view)] += 1
    share = 2 / NUM_LAYERS
    assert torch.all((counts / draws - share).abs() < 4.5 * (share * (1 - share) / draws) ** 0.5)


def test_ist_holds_its_set_k_steps_while_probes_run_every_t_c():
    model, optimizer, tuner = _setup(ISTConfig(strategy="ist", update_layers=2, probe_interval=2, switch_interval=3))
    selections = _train(model, optimizer, tuner, 6)
    assert selections[0] == selections[1] == selections[2] and selections[3] == selections[4] == selections[5]
    assert [e["step"] for e in tuner.history if e["event"] == "probe"] == [2, 4, 6]
    assert tuner.importance.abs().sum() > 0


def test_gradnorm_is_told_the_norms_of_the_layers_that_trained():
    config = ISTConfig(strategy="gradnorm", update_layers=2, gradnorm_decay=0.5)
    model, optimizer, tuner = _setup(config)
    selected = tuner.begin_step()
    measured = [e for e in tuner.history if e["event"] == "measure"]
    assert [e["what"] for e in measured] == ["gradient_norms"]  # once, at the first step, with every layer
    estimates = tuner.rule.estimates.clone()
    model(**_batch(0)).loss.backward()
    expected = {j: float(torch.cat([p.grad.flatten() for p in tuner.layers[j].parameters]).double().norm())
                for j in selected}
    reported = tuner.before_optimizer_step()
    assert reported.keys() == expected.keys()
    assert all(reported[j] == pytest.approx(expected[j], rel=1e-9) for j in selected)
    for j in range(NUM_LAYERS):
        want = 0.5 * estimates[j] + 0.5 * expected[j] if j in selected else estimates[j]
        assert float(tuner.rule.estimates[j]) == pytest.approx(float(want), rel=1e-9)
    assert tuner.history[-1]["event"] == "gradients" and tuner.history[-1]["layers"] == selected


def test_a_non_finite_step_is_not_reported_and_other_rules_cost_nothing():
    model, optimizer, tuner = _setup(ISTConfig(strategy="gradnorm", update_layers=2))
    tuner.begin_step()
    model(**_batch(0)).loss.backward()
    tuner.layers[tuner.selected[0]].parameters[0].grad[0, 0] = float("nan")
    estimates = tuner.rule.estimates.clone()
    assert tuner.before_optimizer_step() is None
    assert torch.equal(tuner.rule.estimates, estimates)
    _, _, random_tuner = _setup(ISTConfig(strategy="random", update_layers=2))
    random_tuner.begin_step()
    assert random_tuner.before_optimizer_step() is None  # no gradient read at all: grads are None here


def test_layer_gradient_norms_match_the_reported_ones():
    model, optimizer, tuner = _setup(ISTConfig(strategy="gradnorm", update_layers=2))
    tuner.begin_step()
    model(**_batch(0)).loss.backward()
    assert tuner.before_optimizer_step() == layer_gradient_norms(tuner.layers, tuner.selected)


# ---- rules of one's own ---------------------------------------------------------------------------------------


def _docs_example() -> dict:
    """Run the docs' from-scratch rule (docs/methods.md, "A rule from scratch") once; its names."""
    if not hasattr(_docs_example, "names"):
        text = DOCS.read_text(encoding="utf-8")
        section = text[text.index("### A rule from scratch"):]
        code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
        names: dict = {}
        exec(compile(code, str(DOCS), "exec"), names)
        _docs_example.names = names
    return _docs_example.names


def test_the_docs_rule_trains_by_object_and_by_name_and_balances_the_layers():
    example = _docs_example()
    by_name = _setup(example["config"])
    assert by_name[2].rule_name == "least-trained"
    by_object = _setup(ISTConfig(update_layers=2), rule=example["LeastTrained"]())
    assert by_object[2].rule_name == "least-trained"
    selections = _train(*by_name, 5)
    assert selections == _train(*by_object, 5)
    counts = torch.zeros(NUM_LAYERS)
    for selection in selections:  # the least trained first: no layer is ever two selections ahead of another
        counts[selection] += 1
        assert counts.max() - counts.min() <= 1
    assert counts.tolist() == [2.0] * NUM_LAYERS


def test_the_docs_rule_resumes_exactly():
    (selections, straight), (resumed, tuner) = _straight_and_resumed(_docs_example()["config"])
    assert resumed == selections
    assert all(torch.equal(a, b) for a, b in zip(_adapters(tuner), _adapters(straight)))


class Broken(SelectionRule):
    """Returns what it is told to at ``bad_step``, a valid selection before."""

    name = "broken"

    def __init__(self, bad_step, bad):
        self.bad_step, self.bad = bad_step, bad

    def select(self, view):
        return self.bad if view.step == self.bad_step else list(range(view.count))


@pytest.mark.parametrize("bad,message", [
    ([0], r"returned 1 positions \[0\] at step 2 .*N_u = 2"),
    ([1, 1], r"returned 2 positions \[1, 1\] at step 2 \(1 distinct\)"),
    ([0, 5], r"returned positions \[5\] at step 2, outside \[0, 5\)"),
    (["a", 0], r"returned \['a', 0\] at step 2"),
])
def test_a_rule_breaking_the_contract_stops_at_that_step_naming_the_rule(bad, message):
    model, optimizer, tuner = _setup(ISTConfig(update_layers=2), rule=Broken(2, bad))
    _train(model, optimizer, tuner, 2)
    with pytest.raises(ValueError, match="selection rule 'broken' " + message):
        tuner.begin_step()
    assert tuner.step == 2


def test_what_is_not_a_rule_is_refused():
    with pytest.raises(TypeError, match="must be an istune.core.selection.SelectionRule"):
        _setup(ISTConfig(), rule=object())
    register_rule("not-a-rule", lambda config: "layers 0 and 1")
    with pytest.raises(ValueError, match="factory registered for strategy 'not-a-rule' returned 'layers 0 and 1'"):
        _setup(ISTConfig(strategy="not-a-rule"))


def test_unknown_strategy_lists_the_rules():
    with pytest.raises(ValueError) as error:
        rule_factory("lsia")
    assert all(repr(name) in str(error.value) for name in RULES)
    with pytest.raises(ValueError, match=r"ISTConfig.strategy='lsia' is invalid: use one of .*'badam'.*'lisa'"):
        ISTConfig(strategy="lsia")


def test_a_measuring_rule_without_probe_batches_says_what_to_pass():
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    tuner = SparseTuner(model, ISTConfig(strategy="owlore", update_layers=2))
    with pytest.raises(ValueError, match="selection rule 'owlore' asked for a measurement at step 0.*probe_batches"):
        tuner.begin_step()


def test_a_rule_registered_by_name_takes_the_config():
    class EveryOther(RandomRule):
        name = "every-other"

        def __init__(self, offset):
            self.offset = offset

        def select(self, view):
            return [(self.offset + 2 * i) % view.num_layers for i in range(view.count)]

    register_rule("every-other", lambda config: EveryOther(config.seed % 2))
    model, optimizer, tuner = _setup(ISTConfig(strategy="every-other", update_layers=2, seed=1))
    assert _train(model, optimizer, tuner, 2) == [[1, 3], [1, 3]]
