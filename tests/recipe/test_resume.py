"""Resuming `istune train` from a checkpoint: bit-identical to the uninterrupted run;
other runs' checkpoints refused."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from istune.cli import main
from istune.recipe import run_file

from .conftest import train_args

SAVE = ["--save_strategy", "steps", "--save_steps", "2", "--lora_dropout", "0.1", "--learning_rate", "1e-2"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "whole"
    assert main(train_args(tiny_llama_dir, data_file, out, *SAVE)) == 0
    return out


class Interrupted(KeyboardInterrupt):
    pass


def _interrupt_after_checkpoint(monkeypatch, step):
    """Stop the run (as Ctrl-C would) right after the Trainer saved ``checkpoint-<step>``."""
    original = run_file.RunFileCallback.on_save

    def on_save(self, args, state, control, **kwargs):
        original(self, args, state, control, **kwargs)
        if state.global_step == step:
            raise Interrupted()

    monkeypatch.setattr(run_file.RunFileCallback, "on_save", on_save)


@pytest.mark.parametrize("resume", ["true", "checkpoint-2"])
def test_resumed_run_ends_bit_identical(uninterrupted, tiny_llama_dir, data_file, tmp_path, monkeypatch, resume):
    out = tmp_path / "resumed"
    _interrupt_after_checkpoint(monkeypatch, step=2)
    with pytest.raises(Interrupted):
        main(train_args(tiny_llama_dir, data_file, out, *SAVE))
    monkeypatch.undo()
    # Interrupted: a loadable checkpoint, and none of the final outputs.
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint-2" / run_file.RUN_FILE).is_file()
    assert not (out / "adapter").exists() and not (out / "results.json").exists()
    # A checkpoint whose saving was cut short (no run file: it is written last) is passed over by 'true'.
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "trainer_state.json").write_text("{")

    target = "true" if resume == "true" else str(out / resume)
    assert main(train_args(tiny_llama_dir, data_file, out, *SAVE, "--resume_from_checkpoint", target)) == 0
    expected = load_file(str(uninterrupted / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    whole = json.loads((uninterrupted / "results.json").read_text())
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["importance"] == whole["importance"] and any(v != 0 for v in whole["importance"])
    assert resumed["tuned"]["heldout_loss"] == whole["tuned"]["heldout_loss"]
    assert (out / "ist_log.jsonl").read_text() == (uninterrupted / "ist_log.jsonl").read_text()
    initial = load_file(str(out / "checkpoint-2" / "adapter_model.safetensors"))
    assert any(not torch.equal(initial[name], got[name]) for name in got)  # steps 3-4 did train


@pytest.mark.parametrize("extra,message", [
    (["--strategy", "random"], "--strategy='random' (checkpoint: 'ist')"),
    (["--method", "dora"], "--method='dora' (checkpoint: 'lora')"),
    (["--update_layers", "2"], "--update_layers=2 (checkpoint: 1)"),
    (["--rank", "8"], "--rank=8 (checkpoint: 4)"),
    # every rule parameter, not only the rule and N_u (issue 35)
    (["--mu", "100"], "--mu=100.0 (checkpoint: 10.0)"),
    (["--probe_interval", "3"], "--probe_interval=3 (checkpoint: 2)"),
    (["--beta", "0.5"], "--beta=0.5 (checkpoint: 0.25)"),
    (["--switch_interval", "2"], "--switch_interval=2 (checkpoint: 1)"),
    (["--unselected_optimizer_state", "drop"], "--unselected_optimizer_state='drop' (checkpoint: 'keep')"),
])
def test_checkpoint_of_another_run_is_refused_before_loading(uninterrupted, tiny_llama_dir, data_file, tmp_path,
                                                             capsys, extra, message):
    out = tmp_path / "other"
    checkpoint = uninterrupted / "checkpoint-2"
    args = train_args(tiny_llama_dir, data_file, out, *SAVE, "--resume_from_checkpoint", str(checkpoint)) + extra
    assert main(args) == 2
    error = capsys.readouterr().err
    assert f"--resume_from_checkpoint={str(checkpoint)!r} was saved by another run: " in error
    assert message in error and "Resume with the options it was trained with" in error
    assert not out.exists()


def test_checkpoint_of_a_model_with_other_layer_count_is_refused(uninterrupted, tmp_path):
    record = json.loads((uninterrupted / "checkpoint-2" / run_file.RUN_FILE).read_text())
    with pytest.raises(ValueError, match=r"N_L=32 layers \(checkpoint: 2\)"):
        run_file.check_resume(str(uninterrupted / "checkpoint-2"), record, num_layers=32)


def test_a_checkpoint_cut_short_is_refused(uninterrupted, tiny_llama_dir, data_file, tmp_path, capsys):
    partial = tmp_path / "run" / "checkpoint-2"
    partial.mkdir(parents=True)
    (partial / "trainer_state.json").write_text((uninterrupted / "checkpoint-2" / "trainer_state.json").read_text())
    assert main(train_args(tiny_llama_dir, data_file, tmp_path / "new", "--resume_from_checkpoint", str(partial))) == 2
    assert "has no istune_run.json: its saving was cut short" in capsys.readouterr().err


@pytest.mark.parametrize("value,message", [
    ("true", "holds no complete checkpoint-* folder (one with istune_run.json)"),
    ("{tmp}", "is not a Trainer checkpoint (no trainer_state.json)"),
])
def test_nothing_to_resume_is_refused(tiny_llama_dir, data_file, tmp_path, capsys, value, message):
    out = tmp_path / "fresh"
    assert main(train_args(tiny_llama_dir, data_file, out, "--resume_from_checkpoint",
                           value.format(tmp=tmp_path))) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_run_file_from_before_a_rule_parameter_existed_resumes_with_its_default(uninterrupted, tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(uninterrupted / "checkpoint-2", checkpoint)
    record = json.loads((checkpoint / run_file.RUN_FILE).read_text())
    saved = json.loads(json.dumps(record))
    del saved["ist"]["probe_by"], saved["ist"]["gradnorm_decay"]  # fields added after that run was saved
    (checkpoint / run_file.RUN_FILE).write_text(json.dumps(saved))
    run_file.check_resume(str(checkpoint), record)  # the defaults match: no refusal
    record["ist"]["gradnorm_decay"] = 0.5
    with pytest.raises(ValueError, match=r"--gradnorm_decay=0.5 \(checkpoint: 0.9\)"):
        run_file.check_resume(str(checkpoint), record)
