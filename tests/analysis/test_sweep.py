"""Tables 10, 11, 4: the planned runs, refusal of bad input before any work, and resuming run by run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from istune.analysis.cli import main
from istune.analysis.sweep import plan_sweep, summarize
from istune.recipe.train import train_run


def test_parts_share_runs_and_carry_their_settings():
    planned, rows = plan_sweep(["mu", "beta", "ablation"], 4, mu_values=[1, 10], beta_values=[0, 0.25],
                               update_layers=2, ablation_update_layers=[1, 2], mu=10, beta=0.25, probe_interval=3,
                               seeds=[5])
    by_name = {run.name: run.ist for run in planned}
    assert sorted(by_name) == sorted(["random-u2-seed5", "ist-u2-mu1-beta0.25-seed5", "ist-u2-mu10-beta0.25-seed5",
                                      "ist-u2-mu10-beta0-seed5", "all-seed5", "random-u1-seed5",
                                      "ist-u1-mu10-beta0.25-seed5"])
    mu1 = by_name["ist-u2-mu1-beta0.25-seed5"]
    assert ((mu1.strategy, mu1.update_layers, mu1.mu, mu1.beta, mu1.probe_interval, mu1.seed)
            == ("ist", 2, 1, 0.25, 3, 5))
    assert by_name["ist-u2-mu10-beta0-seed5"].beta == 0
    assert (by_name["random-u1-seed5"].strategy, by_name["random-u1-seed5"].update_layers) == ("random", 1)
    assert by_name["all-seed5"].strategy == "all"
    assert [row["label"] for row in rows["ablation"]] == ["all layers (4)", "random, N_u=1", "IST, N_u=1",
                                                          "random, N_u=2", "IST, N_u=2"]
    assert rows["mu"][0]["value"] is None and [row["value"] for row in rows["mu"][1:]] == [1, 10]
    assert rows["beta"][1]["runs"] == rows["mu"][2]["runs"]  # μ=10, β=0.25 trains once


def test_unused_layer_counts_are_not_checked():
    # N_u=8 is for mu/beta only
    planned, rows = plan_sweep(["ablation"], 2, update_layers=8, ablation_update_layers=[1])
    assert sorted(run.name for run in planned) == ["all-seed42", "ist-u1-mu10-beta0.25-seed42", "random-u1-seed42"]


def test_summary_over_seeds():
    rows = {"mu": [{"label": "x", "value": 1.0, "runs": ["a", "b"]}]}
    records = {"a": {"heldout_loss": 1.0, "score_accuracy": 0.5}, "b": {"heldout_loss": 3.0, "score_accuracy": None}}
    row = summarize(rows, records)["mu"][0]
    assert (row["mean_loss"], row["min_loss"], row["max_loss"], row["mean_accuracy"]) == (2.0, 1.0, 3.0, 0.5)


@pytest.mark.parametrize("args,message", [
    (["--parts", "mu,gamma"], "unknown sweep parameter ['gamma']"),
    (["--parts", ""], "--parts='' is empty"),
    (["--mu_values", " , "], "--mu_values=' , ' is empty"),
    (["--mu_values", "1,ten"], "'ten' is not a float"),
    (["--mu_values", "1,1"], "repeats a value"),
    (["--mu_values", "0,1"], "--mu_values has 0.0, which is refused: ISTConfig.mu=0.0"),
    (["--beta_values", "0.5,1.5"], "--beta_values has 1.5, which is refused"),
    (["--update_layers", "5"], "--update_layers has N_u=5, out of range: the model has N_L=4"),
    (["--ablation_update_layers", "0"], "--ablation_update_layers has N_u=0, out of range"),
    (["--max_steps", "0"], "--max_steps=0"),
    (["--eval_limit", "-1"], "--eval_limit=-1"),
    (["--eval_tasks", "mmlu", "--eval_limit", "2"], "task='mmlu'"),
])
def test_bad_input_is_refused_before_any_work(tiny_model_dir, data_file, tmp_path, args, message):
    out = tmp_path / "sweep"
    with pytest.raises(ValueError) as error:
        main(["sweep", "--out", str(out), "--model", str(tiny_model_dir), "--data", str(data_file), *args],
             train=_must_not_train)
    assert message in str(error.value)
    assert not out.exists()


def _must_not_train(*args, **kwargs):
    raise AssertionError("training started")


def _sweep_args(out, model_dir, data, *extra):
    return ["sweep", "--out", str(out), "--parts", "mu,ablation", "--mu_values", "1,10", "--update_layers", "1",
            "--ablation_update_layers", "1", "--probe_interval", "1", "--model", str(model_dir), "--data", str(data),
            "--max_steps", "2", "--batch_size", "2", "--heldout_samples", "8", "--rank", "4", "--cutoff_len", "64",
            *extra]


def test_sweep_resumes_run_by_run(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "sweep"
    assert main(_sweep_args(out, tiny_model_dir, data_file), train=train_run) == 0
    names = ["random-u1-seed42", "ist-u1-mu1-beta0.25-seed42", "ist-u1-mu10-beta0.25-seed42", "all-seed42"]
    assert sorted(p.stem for p in (out / "runs").glob("*.json")) == sorted(names)
    first = {name: (out / "runs" / f"{name}.json").read_text() for name in names}
    record = json.loads(first["ist-u1-mu1-beta0.25-seed42"])
    assert record["ist"]["mu"] == 1 and record["settings"]["max_steps"] == 2 and record["heldout_loss"] > 0
    assert len(record["importance"]) == 4 and record["ist"]["strategy"] == "ist" and record["run_folder"] is None
    command = "-m istune analyze " + " ".join(_sweep_args(out, tiny_model_dir, data_file))
    assert record["metadata"]["command"].endswith(command)
    result = json.loads((out / "sweep.json").read_text())
    assert [row["label"] for row in result["parts"]["mu"]] == ["random, N_u=1", "IST μ=1", "IST μ=10"]
    assert "| IST μ=10 | 1 |" in (out / "sweep.md").read_text()
    assert (out / "sweep.png").stat().st_size > 1000

    # everything is done: nothing trains again
    assert main(_sweep_args(out, tiny_model_dir, data_file), train=_must_not_train) == 0
    assert {name: (out / "runs" / f"{name}.json").read_text() for name in names} == first

    (out / "runs" / "all-seed42.json").unlink()  # one run lost: only it trains again
    trained = []

    def recording_train(run, adapter, ist, **options):
        trained.append(ist.strategy)
        return train_run(run, adapter, ist, **options)

    assert main(_sweep_args(out, tiny_model_dir, data_file), train=recording_train) == 0
    assert trained == ["all"]
    again = json.loads((out / "runs" / "all-seed42.json").read_text())
    assert again["heldout_loss"] == pytest.approx(json.loads(first["all-seed42"])["heldout_loss"], rel=1e-5)

    # A record saved before an ISTConfig field existed still resumes when the field has its default.
    path = out / "runs" / "ist-u1-mu1-beta0.25-seed42.json"
    older = json.loads(path.read_text())
    del older["ist"]["recompute_unselected"]
    path.write_text(json.dumps(older))
    assert main(_sweep_args(out, tiny_model_dir, data_file), train=_must_not_train) == 0

    with pytest.raises(ValueError, match=r"--max_steps=3 \(saved: 2\)"):  # other settings would mix in silently
        main(_sweep_args(out, tiny_model_dir, data_file, "--max_steps", "3"), train=_must_not_train)


def test_a_failed_run_leaves_no_record_and_no_work_folder(tiny_model_dir, data_file, tmp_path):
    def failing_train(run, adapter, ist, **options):
        (Path(options["output_dir"]) / "adapter").mkdir(parents=True)
        raise RuntimeError("out of memory")

    out = tmp_path / "sweep"
    with pytest.raises(RuntimeError, match="out of memory"):
        main(_sweep_args(out, tiny_model_dir, data_file), train=failing_train)
    assert list((out / "runs").iterdir()) == []
