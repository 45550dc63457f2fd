"""benchmarks/accuracy_compare.py: the report from saved runs, checked against numbers worked out by hand."""

import json
import math

import pytest

from tests.bench import load_benchmark_script


@pytest.fixture(scope="module")
def accuracy_compare():
    return load_benchmark_script("accuracy_compare")


def _save_run(out, strategy, seed, final_loss, score, generate):
    run = {"strategy": strategy, "seed": seed, "train_seconds": 10.0 * seed,
           "curve": [[0, 2.0], [3, 2 * final_loss], [6, final_loss]],
           "accuracy": {"score": {"boolq": score[:2], "piqa": score[2:]},
                        "generate": {"boolq": generate[:2], "piqa": generate[2:]}}}
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{strategy}-seed{seed}.json").write_text(json.dumps(run))


def _row(table, first_cell):
    line = next(line for line in table.splitlines() if line.startswith(f"| {first_cell} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_report_means_and_paired_differences(accuracy_compare, tmp_path):
    T, F = True, False
    _save_run(tmp_path, "all", 1, 0.20, [T, F, T, F], [T, T, F, F])
    _save_run(tmp_path, "all", 2, 0.22, [T, F, F, F], [T, T, F, F])
    _save_run(tmp_path, "ist", 1, 0.18, [T, T, T, F], [T, T, F, F])
    _save_run(tmp_path, "ist", 2, 0.19, [T, F, T, F], [T, F, F, F])

    table = accuracy_compare.report(tmp_path)

    ist = _row(table, "ist")
    assert ist[1] == "2"
    half = 12.706 * math.sqrt(((0.18 - 0.185) ** 2 + (0.19 - 0.185) ** 2) / 1) / math.sqrt(2)
    assert ist[2] == f"0.1850 ± {half:.4f}"
    assert ist[3].startswith("62.5 ± ")  # (75 + 50) / 2
    assert ist[5] == "15"  # mean train seconds
    # Paired, per item averaged over the two seeds: score (0, 50, 50, 0), generation (0, -50, 0, 0).
    diff = _row(table, "ist − all")
    assert diff[1] == "2"
    assert diff[2].startswith("-0.0250 ± ")
    assert diff[3].startswith("-0.0375 ± ")  # steps 3 and 6 lie in the last two thirds: mean 1.5 x final
    score_half = 3.182 * math.sqrt(sum((d - 25) ** 2 for d in (0, 50, 50, 0)) / 3) / 2
    assert diff[4] == f"+25.0 ± {score_half:.1f}"
    assert diff[5].startswith("-12.5 ± ")
    assert "| random |" not in table  # no runs saved for it
    assert (tmp_path / "loss_curves.png").stat().st_size > 0


def test_report_only_writes_results_without_training(accuracy_compare, tmp_path):
    _save_run(tmp_path, "all", 1, 0.2, [True] * 4, [False] * 4)
    accuracy_compare.main(["--out", str(tmp_path), "--report_only"])
    text = (tmp_path / "results.md").read_text()
    assert "--report_only" in text and "| all | 1 | 0.2000 ± nan |" in text


def test_report_compares_means_over_the_seeds_every_strategy_has(accuracy_compare, tmp_path):
    _save_run(tmp_path, "all", 1, 0.2, [True] * 4, [False] * 4)
    _save_run(tmp_path, "all", 2, 0.4, [True] * 4, [False] * 4)
    _save_run(tmp_path, "ist", 1, 0.1, [True] * 4, [False] * 4)

    table = accuracy_compare.report(tmp_path)

    assert table.startswith("Means over seed 1 ± 95% CI; runs without every strategy left out: all-seed2.")
    assert _row(table, "all")[1:3] == ["1", "0.2000 ± nan"]


def test_per_task_table_puts_the_base_model_beside_the_strategies(accuracy_compare, tmp_path):
    T, F = True, False
    _save_run(tmp_path, "all", 1, 0.2, [T, F, T, T], [F, F, T, F])
    _save_run(tmp_path, "all", 2, 0.2, [T, T, T, T], [F, F, F, F])
    (tmp_path / "base.json").write_text(json.dumps({"accuracy": {"score": {"boolq": [F, F], "piqa": [T, F]}}}))

    table = accuracy_compare.report(tmp_path)

    assert "| task | base (option scoring) | all (option scoring) | all (generation) |" in table
    assert _row(table, "boolq")[1:] == ["0.0", "75.0", "0.0"]
    assert _row(table, "piqa")[1:] == ["50.0", "100.0", "25.0"]
    assert _row(table, "average")[1:] == ["25.0", "87.5", "12.5"]


@pytest.mark.parametrize("flag, value, message", [("--strategies", "ist,lisa", "unknown 'lisa'; use a comma-separated list of all"),
                                                    ("--seeds", "1,two", "'two' is not an int")])
def test_bad_options_are_refused_before_any_work(accuracy_compare, tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit):
        accuracy_compare.main(["--out", str(tmp_path / "out"), flag, value])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_base_model_scored_on_other_items_is_refused(accuracy_compare, tmp_path):
    _save_run(tmp_path, "all", 1, 0.2, [True] * 4, [False] * 4)
    (tmp_path / "base.json").write_text(json.dumps({"accuracy": {"score": {"boolq": [True] * 3, "piqa": [True] * 2}}}))
    with pytest.raises(ValueError, match="other items"):
        accuracy_compare.report(tmp_path)


def test_report_without_saved_runs_says_what_to_do(accuracy_compare, tmp_path):
    with pytest.raises(FileNotFoundError, match="without --report_only first"):
        accuracy_compare.report(tmp_path)
