"""`istune train | eval | plot` end to end on a tiny local model and a tiny LLM-Adapters file."""

import json

import pytest

from istune.cli import main

from .eval.conftest import make_model, make_tokenizer


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _train_args(model_dir, data, out, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data), "--output_dir", str(out), "--eval_tasks", "none",
            "--max_steps", "4", "--train_samples", "24", "--heldout_samples", "8",
            "--per_device_train_batch_size", "2", "--rank", "4", "--alpha", "8", "--probe_interval", "2",
            "--logging_steps", "1", *extra]


def test_train_eval_plot(tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, data_file, out, "--update_layers", "1")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["ist"]["update_layers"] == 1 and len(results["importance"]) == 2
    assert results["base"]["heldout_loss"] > 0 and results["tuned"]["heldout_loss"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    events = [json.loads(line) for line in (out / "ist_log.jsonl").read_text().splitlines()]
    assert [len(e["selected"]) for e in events if e["event"] == "select"] == [1, 1, 1, 1]
    assert "held-out loss" in capsys.readouterr().out

    assert main(["eval", str(out)]) == 0
    again = json.loads((out / "eval.json").read_text())
    assert again["tuned"]["heldout_loss"] == pytest.approx(results["tuned"]["heldout_loss"], rel=1e-5)

    assert main(["plot", str(out)]) == 0
    assert (out / "importance.png").stat().st_size > 1000 and (out / "selection.png").stat().st_size > 1000


def test_config_file_gives_defaults_that_flags_override(tiny_model_dir, data_file, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("strategy: random\nupdate_layers: 2\nmax_steps: 9\n")
    out = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, data_file, out, "--config", str(config)) + ["--max_steps", "3"]) == 0
    events = [json.loads(line) for line in (out / "ist_log.jsonl").read_text().splitlines()]
    assert [len(e["selected"]) for e in events] == [2, 2, 2]  # random: no probes; 3 steps from the flag


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--strategy", "lsia"], "ISTConfig.strategy='lsia'"),
        (["--strategy", "badam", "--exploration", "0.5"], "ISTConfig.exploration=0.5"),
        (["--beta", "2"], "ISTConfig.beta=2.0"),
        (["--method", "prefix"], "--method='prefix'"),
        (["--method", "adalora", "--adalora_target_rank", "4"], "--adalora_target_rank=4 must be below --rank=4"),
        (["--max_steps", "0"], "--max_steps=0"),
        (["--eval_tasks", "mmlu"], "task='mmlu'"),
    ],
)
def test_bad_input_fails_before_any_work(tiny_model_dir, data_file, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, data_file, out) + extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_data_file_and_taken_output_folder(tiny_model_dir, data_file, tmp_path, capsys):
    assert main(_train_args(tiny_model_dir, tmp_path / "nope.json", tmp_path / "a")) == 2
    assert "--data=" in capsys.readouterr().err
    taken = tmp_path / "taken"
    (taken / "adapter").mkdir(parents=True)
    assert main(_train_args(tiny_model_dir, data_file, taken)) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_unknown_config_key_is_refused(tiny_model_dir, data_file, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("stratgy: random\n")
    assert main(_train_args(tiny_model_dir, data_file, tmp_path / "run", "--config", str(config))) == 2
    error = capsys.readouterr().err
    assert f"--config={str(config)!r}: unknown option 'stratgy'; did you mean 'strategy'?" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["dora", "adalora", "series", "parallel", "full"])
def test_every_method_trains_saves_and_evaluates(tiny_model_dir, data_file, tmp_path, method):
    out = tmp_path / method
    extra = ["--method", method, "--bottleneck_size", "4", "--adalora_target_rank", "2"]
    assert main(_train_args(tiny_model_dir, data_file, out, *extra)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["adapter"]["method"] == method
    assert main(["eval", str(out)]) == 0
    again = json.loads((out / "eval.json").read_text())
    assert again["tuned"]["heldout_loss"] == pytest.approx(results["tuned"]["heldout_loss"], rel=1e-4)


def test_bench_and_analyze_dispatch(tmp_path, capsys):
    assert main(["bench"]) == 0
    assert "istune bench {memory,time,frontier,probes,gpu}" in capsys.readouterr().out
    assert main(["bench", "speed"]) == 2
    # A bad option reaches the benchmark's own check, which names it; nothing is written.
    out = tmp_path / "memory.json"
    assert main(["bench", "memory", "--shapes", "gpt5", "--out", str(out)]) == 2
    assert "gpt5" in capsys.readouterr().err
    assert not tmp_path.joinpath("memory.json").exists()
    assert main(["analyze", "remove-layers", str(tmp_path / "no-such-run")]) == 2
    assert "no-such-run" in capsys.readouterr().err


@pytest.mark.parametrize("logger,notice", [
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: No module ..."),
    ("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."),
])
def test_import_notices_are_dropped_and_nothing_else(caplog, logger, notice):
    import logging

    main(["--help"])
    log = logging.getLogger(logger)
    propagate, log.propagate = log.propagate, True  # DeepSpeed's logger prints itself; let caplog see it
    try:
        with caplog.at_level(logging.WARNING):
            log.warning(notice)
            log.warning("a real problem")
    finally:
        log.propagate = propagate
    messages = {r.getMessage() for r in caplog.records if r.name == logger}  # a set: a handler may see it twice
    assert messages == {"a real problem"}


def test_a_model_path_to_nothing_fails_before_any_work(data_file, tmp_path, capsys):
    assert main(_train_args(tmp_path / "no-such-model", data_file, tmp_path / "run")) == 2
    assert "no such folder, and not a hub id" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
