"""`istune plan` (istune.bench.plan, the command line of istune.planning.planner): bad input refused before any
work, a table from a built-in shape. The predictions themselves: tests/planning/test_planner.py."""

import json
import re

import pytest

from istune import cli


@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "0"], r"--batch_size=0 must be a positive integer"),
    (["--seq_len", "-5"], r"--seq_len=-5 must be a positive integer"),
    (["--dtype", "float64"], r"--dtype='float64' is not one of"),
    (["--method", "adalora"], r"--method='adalora' cannot be planned"),
    (["--attn_implementation", "flash"], r"--attn_implementation='flash'"),
    (["--rows", "lora,nope"], r"--rows=.*unknown 'nope'"),
    (["--load_in_4bit", "--method", "series"], r"--load_in_4bit with --method=series"),
    (["--load_in_4bit", "--method", "dora"], r"--load_in_4bit with --method=dora is not planned"),
    (["--update_layers", "0"], r"update_layers=0"),
    (["--update_layers", "40"], r"update_layers=40.*only N_L=32"),
    (["--model", "no/such-model"], r"--model='no/such-model'"),
])
def test_bad_input_is_refused_before_any_work(argv, message, monkeypatch, tmp_path, capsys):

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = argv if "--model" in argv else ["--model", "huggyllama/llama-7b", *argv]
    assert cli.main(["plan", *argv]) == 2
    error = capsys.readouterr().err
    assert "predicting" not in error
    assert re.search(message, error), error


def test_the_command_prints_a_table_from_a_builtin_shape(monkeypatch, tmp_path, capsys):

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--model", "huggyllama/llama-7b", "--batch_size", "1", "--seq_len", "16",
                     "--rows", "lora", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "config: built-in shape for huggyllama/llama-7b" in printed and "| LoRA |" in printed
    row = json.loads(out.read_text())["rows"][0]
    # The weights: LLaMA-7B's 6,738,415,616 parameters in bf16, the adapters in fp32 (peft's default), the buffers.
    adapters = 4 * row["params_trainable"]
    assert 0 <= row["peak_breakdown"]["weights"] - (2 * 6738415616 + adapters) <= 2**20
    # At 16 tokens the activations are nothing: the peak is AdamW's step, with the adapters' gradients, two moments
    # and the foreach implementation's one temporary per parameter.
    assert row["peak_phase"] == "optimizer step"
    assert 3 * adapters < row["peak_bytes"] - row["peak_breakdown"]["weights"] <= 4.01 * adapters
