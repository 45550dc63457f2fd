"""The GPU suite's CPU smoke mode (--tiny): both parts run, results land in --out after each row, the budgets, resume
and the checks on bad input work.

This file also runs in the side environment .ci/envs/node.txt, which holds only torch, transformers, peft,
accelerate, safetensors, pyyaml and pytest (a locked-down GPU node's stack): the suite needs nothing else.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from istune.bench import gpu_suite


def run(out, *argv: str) -> dict:
    assert gpu_suite.main(["--tiny", "--device", "cpu", "--out", str(out), *argv]) == 0
    return json.loads((out / "gpu_suite.json").read_text())


def test_tiny_suite_runs_both_parts_and_says_it_is_not_a_gpu_run(tmp_path, capsys):
    out = tmp_path / "results"  # made by the suite
    result = run(out, "--rows", "throughput:ist,lora,ist+recompute,lisa,throughput:lora")
    rows = {r["key"]: r for r in result["rows"]}
    # the suite's order: part 1, then part 2; one key per row
    assert list(rows) == ["lora", "lora+ist+recompute", "lisa", "throughput:lora", "throughput:ist"]
    assert all(r["status"] == "done" for r in rows.values())
    for key in ("lora", "lora+ist+recompute"):  # measured (CPU: live tensor bytes) beside istune plan's prediction
        measured, predicted = rows[key]["peak_allocated_bytes"], rows[key]["prediction"]["peak_bytes"]
        assert abs(predicted - measured) / measured <= 0.10
        assert rows[key]["steps_timed"] == 2 and rows[key]["step_seconds_median"] > 0
    assert rows["lora+ist+recompute"]["peak_allocated_bytes"] < rows["lora"]["peak_allocated_bytes"]
    assert rows["lora+ist+recompute"]["selected"] == [0]  # 4 layers, N_u = 1: the worst step trains layer 0
    assert rows["lisa"]["prediction"] is None
    # part 2: 10 steps of 2 x 32 tokens; IST probed once (T_c = 10), LoRA on every layer never
    for key, updates in (("throughput:lora", 0), ("throughput:ist", 1)):
        assert rows[key]["steps"] == 10 and rows[key]["tokens_per_step"] == 64
        assert rows[key]["importance_updates"] == updates
        assert rows[key]["tokens_per_second"] == pytest.approx(640 / rows[key]["train_seconds"])
    assert sorted(p.name for p in out.iterdir()) == ["gpu_suite.json", "gpu_suite.md"]
    text = (out / "gpu_suite.md").read_text()
    assert gpu_suite.NOT_MEASURED in text and "| LoRA + IST, recompute unselected |" in text
    assert "| LoRA + IST (probes every T_c steps) |" in text
    assert text.splitlines()[4].startswith("Command: `PYTHONPATH=src python3 benchmarks/gpu_suite.py --tiny")
    assert "| LoRA, every layer |" in capsys.readouterr().out  # the table is printed too


def test_stored_layers_rows_are_measured_at_each_worst_step_the_planner_counts(tmp_path):
    result = run(tmp_path / "out", "--rows", "ist+gc+stored2,ist+stored8")
    rows = {r["key"]: r for r in result["rows"]}
    assert all(r["status"] == "done" for r in rows.values())
    for key in ("lora+ist+gc+stored2", "lora+ist+stored8"):  # planned as the same row
        measured, prediction = rows[key]["peak_allocated_bytes"], rows[key]["prediction"]
        assert prediction["row"] == key and abs(prediction["peak_bytes"] - measured) / measured <= 0.10
    # 4 layers, N_u = 1, M = 2: the worst steps are [0] and [2]; M = 8 >= N_L leaves only [0]
    assert rows["lora+ist+gc+stored2"]["selected"] in ([0], [2])
    assert rows["lora+ist+gc+stored2"]["prediction"]["selected"] in ([0], [2])
    assert rows["lora+ist+stored8"]["selected"] == rows["lora+ist+stored8"]["prediction"]["selected"] == [0]


def test_the_budgets_stop_starting_rows_and_what_ran_is_kept(tmp_path):
    result = run(tmp_path / "a", "--rows", "lora,ist,throughput:lora", "--frontier_budget_s", "0.5")
    statuses = [r["status"] for r in result["rows"]]
    # the first frontier row starts (nothing has taken time yet) and takes more than 0.5 s; part 2 has its own
    assert statuses[0] == "done" and statuses[2] == "done"
    assert statuses[1].startswith("not run: 0 s of --frontier_budget_s left")
    result = run(tmp_path / "b", "--rows", "lora,ist,throughput:lora", "--budget_s", "0.5")
    assert [r["status"][:8] for r in result["rows"]] == ["done", "not run:", "not run:"]
    assert "--budget_s left" in result["rows"][2]["status"]


def test_a_row_over_its_row_budget_is_stopped_and_the_next_one_runs(tmp_path):
    # Each row in its own process; the child's start alone (Python, torch, transformers) takes over 0.5 s.
    result = run(tmp_path / "out", "--rows", "lora,throughput:lora", "--isolation", "process",
                 "--row_budget_s", "0.5")
    assert [r["status"] for r in result["rows"]] == ["stopped: over 0.5 s (--row_budget_s)"] * 2


def test_resume_keeps_rows_measured_with_the_same_settings(tmp_path):
    out = tmp_path / "out"
    first = run(out, "--rows", "throughput:lora")["rows"][0]
    second = run(out, "--rows", "throughput:lora,throughput:lora+gc", "--resume")["rows"]
    assert second[0] == first and second[1]["status"] == "done"
    third = run(out, "--rows", "throughput:lora", "--resume", "--throughput_steps", "3")["rows"]
    assert third[0]["steps"] == 3  # other settings: measured again


def test_a_row_runs_in_its_own_process(tmp_path):
    row = run(tmp_path / "out", "--rows", "throughput:ist", "--isolation", "process")["rows"][0]
    assert row["status"] == "done" and row["importance_updates"] == 1 and math.isfinite(row["tokens_per_second"])


def test_a_file_where_the_folder_should_be_is_refused(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"--out='.*blocker' is a file"):
        gpu_suite.main(["--tiny", "--out", str(blocker)])
    with pytest.raises(ValueError, match=r"--out='.*blocker/sub' cannot be written \(NotADirectoryError"):
        gpu_suite.main(["--tiny", "--out", str(blocker / "sub")])


def test_a_folder_holding_files_is_refused_unless_resuming(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"--out='.*' is not empty \(it holds notes.txt\).*--resume"):
        gpu_suite.main(["--tiny", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu"], r"--device=cpu runs only with --tiny"),
    (["--tiny", "--steps", "0"], r"--steps=0 must be at least 1"),
    (["--tiny", "--rows", "lora,nope"], r"--rows=.*unknown 'nope'"),
    (["--tiny", "--budget_s", "0"], r"--budget_s=0.0 must be positive"),
    (["--tiny", "--frontier_budget_s", "-1"], r"--frontier_budget_s=-1.0 must be positive"),
    (["--tiny", "--row_budget_s", "0"], r"--row_budget_s=0.0 must be positive"),
    (["--tiny", "--isolation", "thread"], r"--isolation='thread'"),
])
def test_bad_options_are_refused_before_any_row(argv, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        gpu_suite.main([*argv, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_the_full_suite_says_so(tmp_path):
    with pytest.raises(ValueError, match=r"--device=cuda.*sees no GPU.*--tiny"):
        gpu_suite.main(["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
