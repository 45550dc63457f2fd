"""istune.option_checks: comma-separated option values and lower bounds, with errors that name the option."""

from types import SimpleNamespace

import pytest

from istune.option_checks import parse_list, require_at_least_one


def test_parse_list_converts_and_keeps_order():
    assert parse_list("seeds", " 3, 1,2 ", int) == [3, 1, 2]
    assert parse_list("mu_values", "1,0.5", float) == [1.0, 0.5]
    assert parse_list("variants", "half,full", allowed={"full": 0, "half": 1}) == ["half", "full"]


@pytest.mark.parametrize("text, kind, allowed, message", [
    (" , ", int, None, r"--seeds=' , ' is empty; give comma-separated values, e.g. --seeds 1,2"),
    ("1,x", int, None, r"--seeds='1,x': 'x' is not an int; use a comma-separated list of ints"),
    ("1,1", int, None, r"--seeds='1,1' repeats a value"),
    ("full,tiny", str, ("full", "half"),
     r"--seeds='full,tiny': unknown 'tiny'; use a comma-separated list of full, half"),
])
def test_parse_list_refuses_bad_values_naming_the_option(text, kind, allowed, message):
    with pytest.raises(ValueError, match=message):
        parse_list("seeds", text, kind, allowed)


def test_require_at_least_one_names_the_first_bad_option():
    require_at_least_one(SimpleNamespace(steps=1, rounds=5), ("steps", "rounds"))
    with pytest.raises(ValueError, match=r"--rounds=0 must be at least 1"):
        require_at_least_one(SimpleNamespace(steps=1, rounds=0), ("steps", "rounds"))
