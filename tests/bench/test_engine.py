"""The benchmarks' shared engine: the child-process runner, the record writer (the rows: tests/planning)."""

from __future__ import annotations

import json
import os

import pytest

from istune.bench import child, records


def echo(value, fail: bool = False) -> dict:
    if fail:
        raise RuntimeError("the child failed on purpose")
    return {"value": value, "pid": os.getpid()}


def test_the_child_runs_in_another_process_and_returns_its_record():
    record = child.run_in_child("tests.bench.test_engine:echo", {"value": [1, "a"]}, timeout=120)
    assert record["value"] == [1, "a"] and record["pid"] != os.getpid()


def test_a_failed_child_names_its_error_and_only_istune_functions_run(tmp_path):
    with pytest.raises(child.ChildFailed, match="the child failed on purpose"):
        child.run_in_child("tests.bench.test_engine:echo", {"value": 1, "fail": True}, timeout=120)
    with pytest.raises(ValueError, match="istune"):
        child.main(["os:getcwd", "{}", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()


def test_the_record_writer_writes_json_markdown_and_picture_whole(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots()
    axes.plot([0, 1], [1, 0])
    written = records.write_record(tmp_path / "out" / "table", {"a": 1}, "# table\n", figure)
    assert [p.name for p in written] == ["table.json", "table.png", "table.md"]
    assert json.loads(written[0].read_text()) == {"a": 1} and written[2].read_text() == "# table\n"
    assert written[1].read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["table.json", "table.md", "table.png"]


def test_a_failed_record_leaves_no_partial_file(tmp_path):
    out = tmp_path / "table"
    records.write_record(out, {"old": 1}, "old\n")
    with pytest.raises(TypeError):
        records.write_record(out, {"new": object()}, "new\n")  # not JSON: fails while writing
    assert json.loads(out.with_suffix(".json").read_text()) == {"old": 1}
    assert out.with_suffix(".md").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.json", "table.md"]  # no temporary file left
