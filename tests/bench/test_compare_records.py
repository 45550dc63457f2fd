"""benchmarks/compare_records.py: two hand-made records, equal modulo aliases and metadata, then one number changed."""

import copy
import json

import pytest

from tests.bench import load_benchmark_script

OLDER = {
    "meta": {"command": "old command", "date": "2026-01-01", "commit": "abc", "machine": "x86_64",
             "versions": {"torch": "2.13.0"}},
    "runs": {"tiny": {"lora:ckpt": {"variant": "lora:ckpt", "baseline": "lora", "peak_bytes": 1000,
                                     "mean_step_peak_bytes": 950.5, "seconds": 2.0, "selected": [0, 3]},
                      "ist": {"variant": "ist", "baseline": "lora", "peak_bytes": 700,
                              "ist_config": {"strategy": "ist"}, "seconds": 1.0, "selected": [0, 2]}}},
}


def _newer() -> dict:
    """OLDER as today's code writes it: keys renamed, metadata changed, one field more."""
    return {
        "meta": {"command": "new command", "date": "2026-12-06", "commit": "def", "machine": "arm64",
                 "versions": {"torch": "2.13.0"}},
        "runs": {"tiny": {"lora+gc": {"variant": "lora+gc", "baseline": "lora", "peak_bytes": 1000,
                                      "mean_step_peak_bytes": 950.5, "seconds": 9.0, "selected": [0, 3]},
                          "lora+ist": {"variant": "lora+ist", "baseline": "lora", "peak_bytes": 700,
                                       "ist_config": {"strategy": "ist", "stored_layers": None}, "seconds": 3.0,
                                       "selected": [0, 2]}}},
    }


@pytest.fixture(scope="module")
def script():
    return load_benchmark_script("compare_records")


def _run(script, tmp_path, newer: dict, capsys) -> tuple[int, str]:
    (tmp_path / "old.json").write_text(json.dumps(OLDER))
    (tmp_path / "new.json").write_text(json.dumps(newer))
    code = script.main([str(tmp_path / "old.json"), str(tmp_path / "new.json")])
    return code, capsys.readouterr().out


def test_equal_modulo_aliases_and_metadata(script, tmp_path, capsys):
    code, out = _run(script, tmp_path, _newer(), capsys)
    assert code == 0, out
    for name in ("command", "date", "commit", "machine", "seconds", "stored_layers"):
        assert f"`{name}`" in out  # every ignored field is named
    assert "| compared exactly: numbers | 7 |" in out  # lora+gc: peak, mean, 2 selected; lora+ist: peak, 2 selected
    assert out.rstrip().endswith("equal")


def test_a_changed_number_is_a_difference(script, tmp_path, capsys):
    newer = _newer()
    newer["runs"]["tiny"]["lora+ist"]["selected"][1] = 5
    changed = copy.deepcopy(newer)
    changed["runs"]["tiny"]["lora+gc"]["mean_step_peak_bytes"] = 950.25
    code, out = _run(script, tmp_path, changed, capsys)
    assert code == 1
    assert "DIFFERENT /runs/tiny/lora+ist/selected[1]: 2 != 5" in out
    assert "DIFFERENT /runs/tiny/lora+gc/mean_step_peak_bytes: 950.5 != 950.25" in out
    assert "| differences | 2 |" in out


def test_a_key_of_the_older_record_missing_in_the_newer_is_a_difference(script):
    newer = _newer()
    del newer["runs"]["tiny"]["lora+ist"]["peak_bytes"]
    assert script.compare(OLDER, newer)["differences"] == ["/runs/tiny/lora+ist/peak_bytes: in the older record only"]


def test_rename_maps_a_key_no_alias_covers(script):
    older = {"rows": [{"row": "ist+stored", "peak_bytes": 5}]}
    newer = {"rows": [{"row": "lora+ist+stored1", "peak_bytes": 5}]}
    assert script.compare(older, newer)["differences"] == ["/rows[0]/row: 'ist+stored' != 'lora+ist+stored1'"]
    assert script.compare(older, newer, {"ist+stored": "lora+ist+stored1"})["differences"] == []
