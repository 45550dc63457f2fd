"""The architecture matrix: every text-generation and image-text-to-text model type of the installed transformers,
tiny and random, with LoRA on all linear layers (tests/matrix/architectures.py does the work).

Marked ``matrix``: left out of the default run, CI runs it after the main suite (``pytest -m matrix tests/matrix``).
A type that cannot be built, or that peft refuses, is skipped with the reason (``-ra`` lists it). A type whose
failure docs/models.md's table records (scripts/architecture_matrix.py writes it) is an expected failure; any other
failure fails, so a regression, or a new type that fails, shows up until the table is regenerated.
"""

import re
from pathlib import Path

import pytest

from .architectures import TYPES, run

pytestmark = pytest.mark.matrix
TABLE = Path(__file__).resolve().parents[2] / "docs" / "models.md"


def _recorded_failures() -> dict[str, str]:
    rows = re.findall(r"^\| (\S+) \| \S+ \| fail: (.*) \|$", TABLE.read_text(), flags=re.MULTILINE)
    return dict(rows)


RECORDED = _recorded_failures()


@pytest.mark.parametrize("model_type", TYPES)
def test_architecture(model_type):
    result = run(model_type)
    if result.status == "not buildable":
        pytest.skip(f"not buildable: {result.reason}")
    if result.status == "fail":
        if model_type in RECORDED:
            pytest.xfail(f"recorded in docs/models.md: {result.reason}")
        pytest.fail(f"{model_type}: {result.reason} (a failure docs/models.md does not record)")


def test_every_type_is_in_the_table():
    listed = set(re.findall(r"^\| (\S+) \| ", TABLE.read_text(), flags=re.MULTILINE)) - {"type"}
    assert set(TYPES) <= listed, f"run scripts/architecture_matrix.py: {sorted(set(TYPES) - listed)} are new"
