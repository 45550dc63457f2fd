"""Fixtures shared across the test folders."""

import json

import pytest

from tests.eval.conftest import WORDS


@pytest.fixture(autouse=True)
def _eval_cache_per_test(tmp_path_factory, monkeypatch):
    """Cached base-model results go to a fresh folder per test, never to the user's ~/.cache/istune/eval."""
    monkeypatch.setenv("ISTUNE_EVAL_CACHE", str(tmp_path_factory.mktemp("eval-cache")))


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    rows = [{"instruction": f"question {WORDS[i % 20 + 20]} {WORDS[(3 * i) % 20 + 20]} ?", "input": "",
             "output": f"the correct answer is {'true' if i % 2 else 'false'}", "answer": "true" if i % 2 else "false"}
            for i in range(40)]
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps(rows))
    return path
