"""Text table and atomic JSON of evaluate_tasks results."""

import json

import pytest

from istune.eval.report import format_table, write_json

RESULTS = {
    "generate": {
        "tasks": {
            "boolq": {"accuracy": 0.625, "correct": 5, "total": 8},
            "piqa": {"accuracy": 0.5, "correct": 4, "total": 8},
        },
        "average": 0.5625,
        "records": {"boolq": [{"index": 0, "correct": True}], "piqa": [{"index": 0, "correct": False}]},
    },
    "score": {
        "tasks": {"boolq": {"accuracy": 1.0, "correct": 8, "total": 8, "accuracy_per_char": 0.5}},
        "average": 1.0,
        "records": {"boolq": []},
    },
}


def test_format_table():
    assert format_table(RESULTS).splitlines() == [
        "method: generate",
        "task          n  accuracy",
        "boolq         8     62.50",
        "piqa          8     50.00",
        "average             56.25",
        "",
        "method: score",
        "task          n  accuracy",
        "boolq         8    100.00",
        "average            100.00",
    ]


@pytest.mark.parametrize("include_records", [True, False])
def test_write_json_round_trip(tmp_path, include_records):
    path = write_json(RESULTS, tmp_path / "nested" / "eval.json", include_records=include_records)
    loaded = json.loads(path.read_text())
    assert ("records" in loaded["generate"]) is include_records
    assert loaded["generate"]["tasks"] == RESULTS["generate"]["tasks"]
    assert loaded["score"]["average"] == 1.0
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]  # no temporary file left


def test_write_json_failure_keeps_previous_file(tmp_path):
    path = tmp_path / "eval.json"
    write_json(RESULTS, path)
    before = path.read_text()
    with pytest.raises(TypeError):
        write_json({"generate": {"tasks": {}, "average": object()}}, path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]
