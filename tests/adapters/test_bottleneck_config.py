"""BottleneckConfig: defaults, normalisation, and errors that name the field."""

import dataclasses

import pytest

from istune.adapters import DEFAULT_TARGET_MODULES, BottleneckConfig
from istune.adapters.config import KINDS

from ..tiny_models import TINY_CONFIGS


def test_defaults_follow_the_paper():
    config = BottleneckConfig()
    assert (config.kind, config.bottleneck_size, config.init) == ("series", 256, "zero_up")
    assert config.target_modules is None
    assert all(f.metadata.get("help") for f in dataclasses.fields(BottleneckConfig))


@pytest.mark.parametrize("field, value", [
    ("kind", "houlsby"),
    ("non_linearity", "softmax"),
    ("init", "xavier"),
    ("bottleneck_size", 0),
    ("bottleneck_size", 2.5),
    ("dropout", 1.0),
    ("dropout", -0.1),
    ("scaling", float("nan")),
    ("target_modules", []),
    ("target_modules", ["down_proj", ""]),
    ("target_modules", "(unclosed"),
])
def test_invalid_value_names_field_and_value(field, value):
    with pytest.raises(ValueError, match=field) as err:
        BottleneckConfig(**{field: value})
    assert repr(value) in str(err.value)


def test_target_modules_normalised():
    assert BottleneckConfig(target_modules=("up_proj", "gate_proj")).target_modules == [
        "up_proj", "gate_proj"]
    assert BottleneckConfig(target_modules=r".*\.fc1").target_modules == r".*\.fc1"


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_tested_family_has_defaults_for_every_kind(family):
    assert set(DEFAULT_TARGET_MODULES[family]) == set(KINDS)
