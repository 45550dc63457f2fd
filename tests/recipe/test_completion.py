"""A run's completion: interrupted during its evaluation, `--resume_from_checkpoint true` finishes it without
training again and writes the results an uninterrupted run writes; a complete run is recognised as complete."""

import json

import pytest

from istune.cli import main
from istune.eval import cached
from istune.recipe import run_file

from .conftest import train_args

EVAL = ["--eval_tasks", "piqa,boolq", "--eval_limit", "2", "--eval_method", "both"]
# What differs between two runs of the same options: wall-clock times, and the Trainer's folders (its logging_dir
# holds a timestamp). Everything else of results.json must be equal.
TIMING_FIELDS = ("train_seconds", "total_seconds")
LOG_TIMING_FIELDS = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
FOLDER_FIELDS = ("output_dir", "logging_dir")


def comparable(results: dict) -> dict:
    """``results`` without the fields that differ between two runs of the same options (named above)."""
    kept = {key: value for key, value in results.items() if key not in TIMING_FIELDS}
    kept["training"] = {k: v for k, v in results["training"].items() if k not in FOLDER_FIELDS}
    kept["log_history"] = [{k: v for k, v in entry.items() if k not in LOG_TIMING_FIELDS}
                           for entry in results["log_history"]]
    return kept


class Interrupted(KeyboardInterrupt):
    pass


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("completion") / "whole"
    assert main(train_args(tiny_llama_dir, data_file, out, *EVAL)) == 0
    return json.loads((out / "results.json").read_text())


def _must_not_run(*args, **kwargs):
    raise AssertionError("the run trained (or loaded a model) again")


def test_a_run_cut_short_in_its_evaluation_is_finished_without_training(uninterrupted, tiny_llama_dir, data_file,
                                                                        tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    calls = []

    def interrupted_evaluation(*args, **kwargs):
        calls.append(1)
        raise Interrupted()

    monkeypatch.setattr(cached, "evaluate_model", interrupted_evaluation)  # the tuned model's evaluation
    with pytest.raises(Interrupted):
        main(train_args(tiny_llama_dir, data_file, out, *EVAL))
    monkeypatch.undo()
    assert calls and (out / "adapter").is_dir() and not (out / "results.json").exists()
    assert run_file.run_state(out) == run_file.TRAINED
    assert json.loads((out / run_file.RUN_FILE).read_text())["state"] == "trained"

    # Without --resume_from_checkpoint: refused, with the advice that finishes it (not the one that discards it).
    assert main(train_args(tiny_llama_dir, data_file, out, *EVAL)) == 2
    error = capsys.readouterr().err
    assert "already holds a run whose training finished and whose evaluation did not" in error
    assert "--resume_from_checkpoint true" in error and "--overwrite" not in error

    # With other evaluation options: refused, naming the option.
    assert main(train_args(tiny_llama_dir, data_file, out, *EVAL, "--eval_limit", "3",
                           "--resume_from_checkpoint", "true")) == 2
    assert "--eval_limit=3 (run: 2)" in capsys.readouterr().err

    from transformers import Trainer

    monkeypatch.setattr(Trainer, "train", _must_not_run)
    assert main(train_args(tiny_llama_dir, data_file, out, *EVAL, "--resume_from_checkpoint", "true")) == 0
    assert "evaluating its adapters (nothing trains again)" in capsys.readouterr().out
    resumed = json.loads((out / "results.json").read_text())
    assert comparable(resumed) == comparable(uninterrupted)
    assert set(resumed) == set(uninterrupted) and "base" in resumed and "score" in resumed["tuned"]
    assert json.loads((out / run_file.RUN_FILE).read_text())["state"] == "evaluated"


def test_a_complete_run_is_recognised_as_complete(uninterrupted, tiny_llama_dir, data_file, tmp_path, monkeypatch,
                                                 capsys):
    out = tmp_path / "run"
    original = run_file.write_run_file

    def killed_after_results(folder, record):  # the kill comes as the run exits, after results.json
        if record.get("state") == run_file.EVALUATED:
            raise Interrupted()
        original(folder, record)

    monkeypatch.setattr(run_file, "write_run_file", killed_after_results)
    with pytest.raises(Interrupted):
        main(train_args(tiny_llama_dir, data_file, out, *EVAL))
    monkeypatch.undo()
    assert run_file.run_state(out) == run_file.COMPLETE
    written = (out / "results.json").read_text()
    assert comparable(json.loads(written)) == comparable(uninterrupted)
    capsys.readouterr()

    monkeypatch.setattr("istune.recipe.train.load_model_and_tokenizer", _must_not_run)
    assert main(train_args(tiny_llama_dir, data_file, out, *EVAL, "--resume_from_checkpoint", "true")) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"istune train: {out} holds a complete run; its results are in {out / 'results.json'}"
    assert (out / "results.json").read_text() == written

    assert main(train_args(tiny_llama_dir, data_file, out, *EVAL)) == 2  # without --resume_from_checkpoint
    assert "already holds a run" in capsys.readouterr().err


def test_a_folder_whose_saving_was_cut_short_names_the_way_out(tiny_llama_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)  # adapter/ without a run file saying training finished
    assert run_file.run_state(out) == run_file.PARTIAL
    assert main(train_args(tiny_llama_dir, data_file, out)) == 2
    assert "has no checkpoint to resume from; choose another folder or pass --overwrite" in capsys.readouterr().err
