"""ISTConfig validation: bad values fail at construction, model-dependent ones at resolve()."""

import pytest

from istune import ISTConfig


@pytest.mark.parametrize(
    "kwargs,field,value",
    [
        ({"strategy": "lisa"}, "strategy", "'lisa'"),
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
    ],
)
def test_bad_values_name_field_and_value(kwargs, field, value):
    with pytest.raises(ValueError) as error:
        ISTConfig(**kwargs)
    assert f"ISTConfig.{field}={value}" in str(error.value)


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
