"""The GPU suite's CPU smoke mode (--tiny): rows run, results are written after each row, the budget and resume
work."""

from __future__ import annotations

import json
import math

import pytest
import torch

from istune.bench import gpu_suite


def run(tmp_path, *argv: str) -> dict:
    out = tmp_path / "suite.json"
    assert gpu_suite.main(["--tiny", "--device", "cpu", "--out", str(out), *argv]) == 0
    return json.loads(out.read_text())


def test_tiny_suite_measures_every_kind_of_row_and_says_it_is_not_a_gpu_run(tmp_path):
    result = run(tmp_path, "--rows", "lora,ist+recompute,lisa,smollm2:ist")
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == ["lora", "lora+ist+recompute", "smollm2:ist", "lisa"]  # the suite's order, one key per row
    assert all(r["status"] == "done" for r in rows.values())
    for key in ("lora", "lora+ist+recompute"):  # measured (CPU: live tensor bytes) beside istune plan's prediction
        measured, predicted = rows[key]["peak_allocated_bytes"], rows[key]["prediction"]["peak_bytes"]
        assert abs(predicted - measured) / measured <= 0.10
        assert rows[key]["steps_timed"] == 2 and rows[key]["step_seconds_median"] > 0
    assert rows["lora+ist+recompute"]["peak_allocated_bytes"] < rows["lora"]["peak_allocated_bytes"]
    assert rows["lisa"]["prediction"] is None
    assert math.isfinite(rows["smollm2:ist"]["heldout_loss"]) and rows["smollm2:ist"]["steps"] == 4
    text = (tmp_path / "suite.md").read_text()
    assert gpu_suite.NOT_MEASURED in text and "| LoRA + IST, recompute unselected |" in text


def test_stored_layers_rows_are_measured_at_the_worst_step_the_plan_found(tmp_path):
    result = run(tmp_path, "--rows", "ist+gc+stored2,ist+stored8")
    rows = {r["key"]: r for r in result["rows"]}
    assert all(r["status"] == "done" for r in rows.values())
    for key in ("lora+ist+gc+stored2", "lora+ist+stored8"):  # planned as the same row
        measured, prediction = rows[key]["peak_allocated_bytes"], rows[key]["prediction"]
        assert prediction["row"] == key and abs(prediction["peak_bytes"] - measured) / measured <= 0.10
    # 4 layers, N_u = 1, M = 2: the worst steps are [0] and [2]; M = 8 >= N_L leaves only [0]
    assert rows["lora+ist+gc+stored2"]["prediction"]["selected"] in ([0], [2])
    assert rows["lora+ist+stored8"]["prediction"]["selected"] == [0]


def test_the_budget_stops_starting_rows_and_what_ran_is_kept(tmp_path):
    result = run(tmp_path, "--rows", "lora,ist,smollm2:lora", "--budget_s", "1")
    statuses = [r["status"] for r in result["rows"]]
    assert statuses[0] == "done"  # the first row starts (nothing has taken time yet) and takes more than 1 s
    assert all(s.startswith("not run:") for s in statuses[1:])


def test_resume_keeps_rows_measured_with_the_same_settings(tmp_path):
    first = run(tmp_path, "--rows", "smollm2:lora")["rows"][0]
    second = run(tmp_path, "--rows", "smollm2:lora,smollm2:random", "--resume")["rows"]
    assert second[0] == first and second[1]["status"] == "done"
    third = run(tmp_path, "--rows", "smollm2:lora", "--resume", "--finetune_steps", "3")["rows"]
    assert third[0]["steps"] == 3  # other settings: measured again


def test_a_row_runs_in_its_own_process(tmp_path):
    row = run(tmp_path, "--rows", "smollm2:random", "--isolation", "process")["rows"][0]
    assert row["status"] == "done" and math.isfinite(row["heldout_loss"])


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu"], r"--device=cpu runs only with --tiny"),
    (["--tiny", "--steps", "0"], r"--steps=0 must be at least 1"),
    (["--tiny", "--rows", "lora,nope"], r"--rows=.*unknown 'nope'"),
    (["--tiny", "--budget_s", "0"], r"--budget_s=0.0 must be positive"),
    (["--tiny", "--isolation", "thread"], r"--isolation='thread'"),
])
def test_bad_options_are_refused_before_any_row(argv, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        gpu_suite.main([*argv, "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_the_full_suite_says_so():
    with pytest.raises(ValueError, match=r"--device=cuda.*sees no GPU"):
        gpu_suite.main([])
