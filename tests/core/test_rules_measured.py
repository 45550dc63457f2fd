"""The data-driven rules (OwLore, gradient norm, one-time probe), driven with hand-built StepViews."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from istune.core.rules import GradientNormRule, OwLoreRule, ProbeOnceRule
from istune.core.rules.sampling import sample_in_proportion
from istune.core.selection import StepView, check_selection, rule_factory, rule_names


class Measures:
    """Fake measurements with fixed values; counts the calls, refuses the ones not provided."""

    def __init__(self, gradient_norms=None, outlier_ratios=None, probe_losses=None):
        self.values = {"gradient_norms": gradient_norms, "outlier_ratios": outlier_ratios,
                       "probe_losses": probe_losses}
        self.calls = {name: [] for name in self.values}

    def _get(self, name, argument=None):
        assert self.values[name] is not None, f"the rule asked for {name}, which this test does not provide"
        self.calls[name].append(argument)
        value = self.values[name]
        return value(argument) if callable(value) else torch.tensor(value, dtype=torch.float64)

    def view(self, step, num_layers, count, generator):
        return StepView(step=step, num_layers=num_layers, count=count, previous=(), generator=generator,
                        importance=torch.zeros(num_layers, dtype=torch.float64),
                        probe_losses=lambda candidates: self._get("probe_losses", candidates),
                        gradient_norms=lambda: self._get("gradient_norms"),
                        outlier_ratios=lambda multiplier: self._get("outlier_ratios", multiplier))


def _run(rule, measures, num_layers, count, steps, seed=0, generator=None, start=0, observe=None):
    """The selections of ``steps`` steps, each checked by check_selection; ``observe(step, sel)`` -> norms."""
    generator = generator or torch.Generator().manual_seed(seed)
    selections = []
    for step in range(start, start + steps):
        selection = check_selection(rule.name, rule.select(measures.view(step, num_layers, count, generator)),
                                    num_layers, count, step)
        if observe is not None:
            rule.observe_gradients(step, observe(step, selection))
        selections.append(selection)
    return selections


def _frequencies(selections, num_layers):
    counts = torch.zeros(num_layers, dtype=torch.float64)
    for selection in selections:
        counts[selection] += 1
    return counts / len(selections)


def _assert_frequencies(frequencies, probabilities, draws, sds=4.5):
    """Each inclusion frequency within ``sds`` binomial standard deviations of its probability."""
    probabilities = torch.as_tensor(probabilities, dtype=torch.float64)
    tolerance = sds * (probabilities * (1 - probabilities) / draws).sqrt() + 1e-12
    assert bool(((frequencies - probabilities).abs() <= tolerance).all()), (frequencies, probabilities)


def _inclusion_of_two(p):
    """P(i among 2 successive draws without replacement): p_i + Σ_{j≠i} p_j p_i / (1 − p_j)."""
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.stack([p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(len(p)) if j != i)
                        for i in range(len(p))])


# ---- OwLore --------------------------------------------------------------------------------------

RATIOS = [0.05, 0.01, 0.0, 0.02, 0.12]


def test_owlore_frequencies_follow_the_outlier_ratios():
    measures = Measures(outlier_ratios=RATIOS)
    draws = 20_000
    selections = _run(OwLoreRule(outlier_threshold=7.0), measures, 5, 1, draws)
    expected = torch.tensor(RATIOS, dtype=torch.float64) / sum(RATIOS)
    _assert_frequencies(_frequencies(selections, 5), expected, draws)
    assert measures.calls["outlier_ratios"] == [7.0]  # measured once, with M, at the start (R = 0)


def test_owlore_draws_several_layers_by_successive_sampling_and_never_a_ratio_zero_layer():
    measures = Measures(outlier_ratios=RATIOS)
    draws = 10_000
    frequencies = _frequencies(_run(OwLoreRule(), measures, 5, 2, draws), 5)
    _assert_frequencies(frequencies, _inclusion_of_two(torch.tensor(RATIOS) / sum(RATIOS)), draws)
    assert frequencies[2] == 0
    assert frequencies.argsort().tolist() == torch.tensor(RATIOS).argsort().tolist()  # ordered as the ratios


def test_owlore_fills_the_places_left_by_too_few_positive_ratios_uniformly():
    measures = Measures(outlier_ratios=[0.3, 0.0, 0.0, 0.1, 0.0])
    draws = 6_000
    frequencies = _frequencies(_run(OwLoreRule(), measures, 5, 3, draws), 5)
    assert frequencies[0] == 1 and frequencies[3] == 1
    _assert_frequencies(frequencies[[1, 2, 4]], [1 / 3] * 3, draws)


def test_owlore_with_every_ratio_zero_is_uniform():
    draws = 8_000
    frequencies = _frequencies(_run(OwLoreRule(), Measures(outlier_ratios=[0.0] * 4), 4, 1, draws), 4)
    _assert_frequencies(frequencies, [0.25] * 4, draws)


def test_owlore_recalibrates_every_r_steps():
    ratios = iter([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    measures = Measures(outlier_ratios=lambda multiplier: torch.tensor(next(ratios)))
    rule = OwLoreRule(calibration_interval=4)
    selections = _run(rule, measures, 3, 1, 12)
    assert len(measures.calls["outlier_ratios"]) == 3  # steps 0, 4, 8
    assert selections == [[1]] * 4 + [[0]] * 4 + [[2]] * 4
    assert rule.state_dict()["measured_at"] == 8


@pytest.mark.parametrize("bad", [[0.1, float("nan"), 0.2], [0.1, -0.2, 0.3], [0.1, 0.2]])
def test_owlore_refuses_invalid_ratios(bad):
    with pytest.raises(ValueError, match="'owlore'.*outlier ratios at step 0"):
        _run(OwLoreRule(), Measures(outlier_ratios=bad), 3, 1, 1)


# ---- gradient norm ---------------------------------------------------------------------------------

NORMS = [4.0, 1.0, 2.0, 0.5, 2.5]


def test_gradnorm_with_full_exploration_is_uniform():
    draws = 6_000
    frequencies = _frequencies(_run(GradientNormRule(exploration=1.0), Measures(gradient_norms=NORMS), 5, 1, draws), 5)
    _assert_frequencies(frequencies, [0.2] * 5, draws)


@pytest.mark.parametrize("exploration", [0.0, 0.3])
def test_gradnorm_frequencies_follow_the_estimates_mixed_with_uniform(exploration):
    draws = 6_000
    measures = Measures(gradient_norms=NORMS)
    rule = GradientNormRule(exploration=exploration)
    frequencies = _frequencies(_run(rule, measures, 5, 1, draws), 5)
    norms = torch.tensor(NORMS, dtype=torch.float64)
    expected = (1 - exploration) * norms / norms.sum() + exploration / 5
    torch.testing.assert_close(rule.probabilities(), expected)
    _assert_frequencies(frequencies, expected, draws)
    assert len(measures.calls["gradient_norms"]) == 1  # measured once, to initialise the estimates


def test_gradnorm_updates_the_layers_that_trained_by_an_ema():
    rule = GradientNormRule(gradnorm_decay=0.8)
    _run(rule, Measures(gradient_norms=[1.0, 2.0, 3.0, 4.0]), 4, 2, 1)
    rule.observe_gradients(0, {1: 5.0, 3: 0.0})
    rule.observe_gradients(1, {1: 1.0, 2: float("inf")})  # a non-finite norm (fp16 overflow) is skipped
    first = 0.8 * 2.0 + 0.2 * 5.0
    expected = [1.0, 0.8 * first + 0.2 * 1.0, 3.0, 0.8 * 4.0 + 0.2 * 0.0]
    assert rule.state_dict()["estimates"] == pytest.approx(expected, rel=1e-15)


def test_gradnorm_still_draws_a_layer_never_observed_under_exploration():
    draws = 6_000
    norms = [0.0, 1.0, 1.0, 1.0]  # layer 0 starts at zero and never trains under ε = 0
    never = _frequencies(_run(GradientNormRule(exploration=0.0), Measures(gradient_norms=norms), 4, 1, draws), 4)
    assert never[0] == 0
    explored = _frequencies(_run(GradientNormRule(exploration=0.2), Measures(gradient_norms=norms), 4, 1, draws), 4)
    _assert_frequencies(explored, [0.05, 0.3166666666666667, 0.3166666666666667, 0.3166666666666667], draws)


def test_gradnorm_follows_what_it_observes():
    """A layer whose observed gradients grow comes to be drawn most."""
    rule = GradientNormRule(exploration=0.1, gradnorm_decay=0.5)
    selections = _run(rule, Measures(gradient_norms=[1.0] * 4), 4, 1, 400,
                      observe=lambda step, selection: {j: 10.0 if j == 2 else 1.0 for j in selection})
    assert _frequencies(selections[200:], 4).argmax() == 2
    assert rule.wants_gradients


# ---- one-time probe --------------------------------------------------------------------------------

def test_probe_once_by_gradient_trains_the_top_layers_forever():
    measures = Measures(gradient_norms=[0.1, 0.5, 0.3, 0.9, 0.2])
    selections = _run(ProbeOnceRule(), measures, 5, 2, 20)
    assert selections == [[1, 3]] * 20
    assert len(measures.calls["gradient_norms"]) == 1


def test_probe_once_by_suppression_trains_the_lowest_loss_layers():
    measures = Measures(probe_losses=lambda candidates: torch.tensor([2.0, 1.5, 2.5, 1.0, 3.0]))
    selections = _run(ProbeOnceRule(probe_by="suppression"), measures, 5, 2, 10)
    assert selections == [[1, 3]] * 10
    assert measures.calls["probe_losses"] == [[[0], [1], [2], [3], [4]]]  # one layer at full response each, once


def test_probe_once_warns_when_suppression_probes_carry_no_signal(caplog):
    """At LoRA's initialisation (B = 0) every probe loss is equal: the choice is random, with a warning."""
    choices = set()
    for seed in range(6):
        measures = Measures(probe_losses=lambda candidates: torch.full((len(candidates),), 2.0))
        with caplog.at_level(logging.WARNING, logger="istune.core.rules.probe_once"):
            choices.add(tuple(_run(ProbeOnceRule(probe_by="suppression"), measures, 6, 2, 1, seed=seed)[0]))
    assert "probe_by='gradient'" in caplog.text
    assert len(choices) > 1


def test_probe_once_refuses_non_finite_scores():
    with pytest.raises(ValueError, match="'probe-once'.*gradient norms at step 0"):
        _run(ProbeOnceRule(), Measures(gradient_norms=[0.1, float("nan"), 0.3]), 3, 1, 1)


# ---- shared: resume, parameters, registration ----------------------------------------------------------

def _observe(step, selection):
    return {j: 1.0 + 0.1 * ((step * 7 + j) % 5) for j in selection}


RESUMABLE = [
    (lambda: OwLoreRule(calibration_interval=7), Measures(outlier_ratios=lambda m: torch.rand(6) * 0.1), None),
    (lambda: GradientNormRule(exploration=0.2, gradnorm_decay=0.7), Measures(gradient_norms=[1.0, 2, 3, 4, 5, 6]),
     _observe),
    (lambda: ProbeOnceRule(), Measures(gradient_norms=[1.0, 6, 3, 4, 5, 2]), None),
]


@pytest.mark.parametrize("make, measures, observe", RESUMABLE, ids=["owlore", "gradnorm", "probe-once"])
def test_state_round_trip_continues_with_identical_selections(make, measures, observe):
    torch.manual_seed(0)  # the fake OwLore ratios draw from the global RNG; both runs see the same sequence
    rule, generator = make(), torch.Generator().manual_seed(3)
    _run(rule, measures, 6, 2, 10, generator=generator, observe=observe)
    state = json.loads(json.dumps(rule.state_dict()))  # what a checkpoint holds
    generator_state = generator.get_state()
    rng_state = torch.get_rng_state()

    continued = _run(rule, measures, 6, 2, 30, generator=generator, start=10, observe=observe)
    resumed_rule, resumed_generator = make(), torch.Generator()
    resumed_rule.load_state_dict(state)
    resumed_generator.set_state(generator_state)
    torch.set_rng_state(rng_state)
    resumed = _run(resumed_rule, measures, 6, 2, 30, generator=resumed_generator, start=10, observe=observe)
    assert resumed == continued
    assert resumed_rule.state_dict() == rule.state_dict()


BAD_PARAMETERS = [
    (OwLoreRule, {"outlier_threshold": 0}, "outlier_threshold=0"),
    (OwLoreRule, {"outlier_threshold": -2.0}, "outlier_threshold=-2.0"),
    (OwLoreRule, {"outlier_threshold": float("inf")}, "outlier_threshold=inf"),
    (OwLoreRule, {"calibration_interval": -1}, "calibration_interval=-1"),
    (OwLoreRule, {"calibration_interval": 2.5}, "calibration_interval=2.5"),
    (GradientNormRule, {"exploration": -0.1}, "exploration=-0.1"),
    (GradientNormRule, {"exploration": 1.5}, "exploration=1.5"),
    (GradientNormRule, {"gradnorm_decay": 1.0}, "gradnorm_decay=1.0"),
    (GradientNormRule, {"gradnorm_decay": -0.5}, "gradnorm_decay=-0.5"),
    (ProbeOnceRule, {"probe_by": "loss"}, "probe_by='loss'"),
]


@pytest.mark.parametrize("rule, parameters, message", BAD_PARAMETERS)
def test_bad_parameters_name_the_field_and_value(rule, parameters, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        rule(**parameters)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        rule.from_config(SimpleNamespace(**parameters))


def test_rules_are_registered_and_built_from_a_config_by_field_name():
    assert {"owlore", "gradnorm", "probe-once"} <= set(rule_names())
    config = SimpleNamespace(outlier_threshold=5.0, calibration_interval=10, exploration=0.5, gradnorm_decay=0.0,
                             probe_by="suppression")
    owlore, gradnorm, probe = (rule_factory(name)(config) for name in ("owlore", "gradnorm", "probe-once"))
    assert (owlore.outlier_threshold, owlore.calibration_interval) == (5.0, 10)
    assert (gradnorm.exploration, gradnorm.gradnorm_decay) == (0.5, 0.0)
    assert probe.probe_by == "suppression"
    defaults = [rule_factory(name)(SimpleNamespace()) for name in ("owlore", "gradnorm", "probe-once")]
    assert (defaults[0].outlier_threshold, defaults[0].calibration_interval) == (13.0, 0)
    assert (defaults[1].exploration, defaults[1].gradnorm_decay) == (0.1, 0.9)
    assert defaults[2].probe_by == "gradient"


def test_sample_in_proportion_returns_distinct_sorted_positions():
    generator = torch.Generator().manual_seed(0)
    for count in range(1, 6):
        chosen = sample_in_proportion(torch.tensor([0.0, 3.0, 0.0, 1.0, 0.0]), count, generator)
        assert chosen == sorted(set(chosen)) and len(chosen) == count
