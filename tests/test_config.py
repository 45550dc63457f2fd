"""ISTConfig validation: bad values fail at construction, model-dependent ones at resolve()."""

import pytest

from istune import ISTConfig


@pytest.mark.parametrize(
    "kwargs,field,value",
    [
        ({"strategy": "lsia"}, "strategy", "'lsia'"),
        ({"update_fraction": 0.0}, "update_fraction", "0.0"),
        ({"update_fraction": 1.5}, "update_fraction", "1.5"),
        ({"update_layers": 0}, "update_layers", "0"),
        ({"update_layers": 2.5}, "update_layers", "2.5"),
        ({"update_layers": 2, "update_fraction": 0.5}, "update_layers", "2"),
        ({"probe_fraction": -0.1}, "probe_fraction", "-0.1"),
        ({"probe_layers": 3, "probe_fraction": 0.5}, "probe_layers", "3"),
        ({"num_probes": 0}, "num_probes", "0"),
        ({"probe_interval": 0}, "probe_interval", "0"),
        ({"beta": 1.2}, "beta", "1.2"),
        ({"beta": -0.1}, "beta", "-0.1"),
        ({"mu": 0}, "mu", "0"),
        ({"mu": float("inf")}, "mu", "inf"),
        ({"seed": "x"}, "seed", "'x'"),
        ({"strategy": "fixed"}, "layers", "None"),
        ({"strategy": "fixed", "layers": [1, 1]}, "layers", "[1, 1]"),
        ({"strategy": "fixed", "layers": [-1]}, "layers", "[-1]"),
        ({"strategy": "fixed", "layers": [0], "update_layers": 2}, "update_layers", "2"),
        ({"strategy": "random", "layers": [0]}, "layers", "[0]"),
        ({"probe_batch_size": 0}, "probe_batch_size", "0"),
        ({"reward_scale": "std"}, "reward_scale", "'std'"),
        ({"towers": "freeze"}, "towers", "'freeze'"),
        # the selection rules' parameters: out of range, or set for a rule that does not use them
        ({"switch_interval": 0}, "switch_interval", "0"),
        ({"strategy": "lisa", "switch_interval": -3}, "switch_interval", "-3"),
        ({"strategy": "badam", "switch_interval": 2.5}, "switch_interval", "2.5"),
        ({"strategy": "owlore", "outlier_threshold": 0}, "outlier_threshold", "0"),
        ({"strategy": "owlore", "outlier_threshold": -1.0}, "outlier_threshold", "-1.0"),
        ({"strategy": "owlore", "outlier_threshold": float("inf")}, "outlier_threshold", "inf"),
        ({"strategy": "owlore", "calibration_interval": -1}, "calibration_interval", "-1"),
        ({"strategy": "gradnorm", "exploration": 1.5}, "exploration", "1.5"),
        ({"strategy": "gradnorm", "exploration": -0.1}, "exploration", "-0.1"),
        ({"strategy": "gradnorm", "gradnorm_decay": 1.0}, "gradnorm_decay", "1.0"),
        ({"strategy": "gradnorm", "gradnorm_decay": -0.5}, "gradnorm_decay", "-0.5"),
        ({"strategy": "badam", "block_order": "sideways"}, "block_order", "'sideways'"),
        ({"strategy": "probe-once", "probe_by": "loss"}, "probe_by", "'loss'"),
        ({"strategy": "random", "block_order": "random"}, "block_order", "'random'"),
        ({"strategy": "ist", "exploration": 0.2}, "exploration", "0.2"),
        ({"strategy": "lisa", "outlier_threshold": 5.0}, "outlier_threshold", "5.0"),
        ({"strategy": "gradnorm", "calibration_interval": 10}, "calibration_interval", "10"),
        ({"strategy": "owlore", "probe_by": "suppression"}, "probe_by", "'suppression'"),
        ({"strategy": "fixed", "layers": [0], "switch_interval": 2}, "switch_interval", "2"),
        ({"strategy": "probe-once", "switch_interval": 4}, "switch_interval", "4"),
        ({"strategy": "badam", "layers": [0]}, "layers", "[0]"),
    ],
)
def test_bad_values_name_field_and_value(kwargs, field, value):
    with pytest.raises(ValueError) as error:
        ISTConfig(**kwargs)
    assert f"ISTConfig.{field}={value}" in str(error.value)


def test_unknown_strategy_lists_every_rule_and_a_registered_one_is_accepted():
    from istune.core.rules import RandomRule
    from istune.core.selection import register_rule, rule_names

    with pytest.raises(ValueError) as error:
        ISTConfig(strategy="lsia")
    assert all(repr(name) in str(error.value) for name in rule_names())
    assert "register_rule" in str(error.value)

    class Mine(RandomRule):
        name = "config-test-rule"

    register_rule(Mine.name, Mine)
    config = ISTConfig(strategy="config-test-rule", switch_interval=3)  # K, which it inherits from RandomRule
    assert config.resolve(8).update_layers == 2  # N_u as for 'random'
    assert config.switch_interval == 3
    with pytest.raises(ValueError, match="ISTConfig.exploration=0.5.*only applies to strategy 'gradnorm'"):
        ISTConfig(strategy="config-test-rule", exploration=0.5)  # a parameter it does not declare


def test_built_in_names_are_the_registered_rules_and_defaults_are_the_rules():
    from istune.core.rules import BUILT_IN_NAMES, badam, gradnorm, owlore, probe_once
    from istune.core.selection import rule_names

    assert set(BUILT_IN_NAMES) <= set(rule_names())
    config = ISTConfig()
    assert (config.outlier_threshold, config.calibration_interval) == (owlore.OUTLIER_THRESHOLD.default,
                                                                      owlore.CALIBRATION_INTERVAL.default) == (13.0, 0)
    assert (config.exploration, config.gradnorm_decay) == (gradnorm.EXPLORATION.default,
                                                           gradnorm.GRADNORM_DECAY.default) == (0.1, 0.9)
    assert (config.probe_by, config.block_order) == (probe_once.PROBE_BY.default, badam.BLOCK_ORDER.default) \
        == ("gradient", "ascending")
    assert config.switch_interval == 1


@pytest.mark.parametrize("strategy,kwargs", [
    ("lisa", {"switch_interval": 50, "update_layers": 2}),
    ("badam", {"block_order": "random", "switch_interval": 5}),
    ("owlore", {"outlier_threshold": 5.0, "calibration_interval": 100, "switch_interval": 2}),
    ("gradnorm", {"exploration": 0.0, "gradnorm_decay": 0.5}),
    ("probe-once", {"probe_by": "suppression"}),
    ("ist", {"switch_interval": 3}),
])
def test_each_rule_takes_its_own_parameters(strategy, kwargs):
    config = ISTConfig(strategy=strategy, **kwargs)
    assert all(getattr(config, name) == value for name, value in kwargs.items())
    assert config.resolve(8).update_layers == kwargs.get("update_layers", 2)


def test_defaults_are_the_papers():
    counts = ISTConfig().resolve(32)
    assert (counts.update_layers, counts.probe_layers) == (8, 16)
    config = ISTConfig()
    assert (config.num_probes, config.probe_interval, config.beta, config.mu) == (3, 10, 0.25, 10.0)


@pytest.mark.parametrize(
    "kwargs,num_layers,update,probe",
    [
        ({}, 30, 8, 15),  # 7.5 rounds half up
        ({}, 2, 1, 1),  # at least one layer
        ({"update_fraction": 1.0}, 4, 4, 2),
        ({"update_layers": 3, "probe_layers": 2}, 4, 3, 2),
        ({"strategy": "all"}, 6, 6, 3),
        ({"strategy": "fixed", "layers": [0, 3]}, 4, 2, 2),
    ],
)
def test_resolve_counts(kwargs, num_layers, update, probe):
    counts = ISTConfig(**kwargs).resolve(num_layers)
    assert (counts.num_layers, counts.update_layers, counts.probe_layers) == (num_layers, update, probe)


@pytest.mark.parametrize(
    "kwargs,field",
    [({"update_layers": 5}, "update_layers"), ({"probe_layers": 9}, "probe_layers"),
     ({"strategy": "fixed", "layers": [0, 4]}, "layers")],
)
def test_model_dependent_values_fail_at_resolve(kwargs, field):
    config = ISTConfig(**kwargs)  # fine without a model
    with pytest.raises(ValueError, match=f"ISTConfig.{field}=.*N_L=4"):
        config.resolve(4)


def test_rule_is_another_name_for_strategy():
    assert ISTConfig(rule="lisa", switch_interval=5) == ISTConfig(strategy="lisa", switch_interval=5)
    with pytest.raises(ValueError, match="ISTConfig.strategy='ist' is invalid: rule='lisa' names the selection rule"):
        ISTConfig(rule="lisa", strategy="ist")


def test_rule_parameters_are_declared_once_and_checked_from_the_declaration():
    from istune import rule_catalog
    from istune.core.rules import badam

    assert rule_catalog.parameters()["block_order"] is badam.BLOCK_ORDER
    assert rule_catalog.rules_taking("block_order") == ["badam"]
    assert ISTConfig(strategy="badam").rule_options == {"switch_interval": 1, "block_order": "ascending"}
    with pytest.raises(ValueError, match=r"ISTConfig.block_order='sideways' is invalid: use one of 'ascending'"):
        ISTConfig(strategy="badam", block_order="sideways")
    with pytest.raises(TypeError, match="unknown option 'blok_order': did you mean 'block_order'"):
        ISTConfig(strategy="badam", blok_order="descending")
