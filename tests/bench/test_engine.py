"""The benchmarks' shared engine: one key per configuration, the child-process runner, the record writer."""

from __future__ import annotations

import json
import os

import pytest

from istune.bench import child, records
from istune.planning.rows import ALIASES, ROWS, table_names


def test_every_alias_names_one_existing_row_and_the_old_spellings_of_a_row_meet():
    assert all(key in ROWS and alias not in ROWS for alias, key in ALIASES.items())
    # LoRA + gradient checkpointing was lora+ckpt (frontier), lora+gc (plan, gpu) and lora:ckpt (memory table)
    assert {ALIASES.get(name, name) for name in ("lora+ckpt", "lora+gc", "lora:ckpt")} == {"lora+gc"}
    assert {ALIASES.get(name, name) for name in ("ist+ckpt", "ist+gc", "lora+ist:ckpt")} == {"lora+ist+gc"}
    assert {ALIASES.get(name, name) for name in ("ist-recompute", "ist+recompute", "lora+ist:recompute")} == {
        "lora+ist+recompute"}


def test_a_key_spells_its_configuration():
    for key, row in ROWS.items():
        assert key == row.key and key.startswith(row.method)
        assert ("+gc" in key) == row.checkpointing
        assert ("+stored" in key) == ("stored_layers" in (row.ist or {}))
        drops = (row.ist or {}).get("unselected_optimizer_state") == "drop"
        assert (":drop" in key) == (drops and row.method != "lisa")


def test_table_names_take_the_keys_their_aliases_and_local_names_only():
    names = table_names(["lora", "lora+gc"], local={"lisa": "lora"})
    assert names == {"lora": "lora", "lora+gc": "lora+gc", "lora+ckpt": "lora+gc", "lora:ckpt": "lora+gc",
                     "lisa": "lora"}


def test_with_method_moves_key_label_and_baseline():
    row = ROWS["lora+ist+gc"].with_method("dora")
    assert (row.key, row.label, row.method, row.baseline) == ("dora+ist+gc", "DoRA + IST + gradient checkpointing",
                                                              "dora", "dora")
    assert row.ist == ROWS["lora+ist+gc"].ist and ROWS["dora+ist+gc"] == row


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
