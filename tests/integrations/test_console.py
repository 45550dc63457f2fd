"""The console while ISTCallback trains: one short line per log; the reporters still get every per-layer value."""

import ast

import pytest
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from istune import ISTCallback, ISTConfig, add_ist
from istune.integrations.console import ReadablePrinterCallback, ReadableProgressCallback, console_logs

from .test_hf import NUM_LAYERS, LogRecorder, _trainer


def test_console_logs_keep_the_trainer_values_and_name_the_top_layers():
    logs = {"loss": 1.5, "learning_rate": 3e-4, "ist/probe_loss": 1.4,
            **{f"ist/importance/layer_{i:02d}": value for i, value in enumerate([0.1, -2.0, 3.0, 0.1, 7.0, -1.0])},
            **{f"ist/selected/layer_{i:02d}": 0.5 for i in range(6)}}
    shown = console_logs(logs)
    assert shown == {"loss": 1.5, "learning_rate": 3e-4, "ist/probe_loss": 1.4, "ist/top_layers": "4 2 0 3 5"}
    assert len(logs) == 3 + 12  # the reporters' dict is not touched
    assert console_logs({"loss": 1.0, "ist/selected/layer_00": 1.0}) == {"loss": 1.0}  # random: no importance
    unranked = {"loss": 1.0, "ist/importance/layer_00": 0.0, "ist/importance/layer_01": 0.0}
    assert console_logs(unranked) == {"loss": 1.0}  # before the first importance update: nothing to rank


@pytest.mark.parametrize("form", ["add_ist", "one_line"])
@pytest.mark.parametrize("disable_tqdm", [True, False])
def test_trainer_console_is_one_short_line_per_log(tmp_path, capsys, disable_tqdm, form):
    reporter = LogRecorder()
    config = ISTConfig(update_layers=1, probe_interval=2)
    if form == "add_ist":  # IST runs before the reporter and swaps the Trainer's printer for the readable one
        trainer = _trainer(tmp_path, [reporter], max_steps=4, disable_tqdm=disable_tqdm)
        add_ist(trainer, config)
    else:  # the reporter runs first and gets no IST metric; the Trainer's own printer gets the short line
        trainer = _trainer(tmp_path, [reporter, ISTCallback(config)], max_steps=4, disable_tqdm=disable_tqdm)
    trainer.train()
    printer = ReadablePrinterCallback if disable_tqdm else ReadableProgressCallback
    original = PrinterCallback if disable_tqdm else ProgressCallback
    kinds = [type(c) for c in trainer.callback_handler.callbacks]
    assert (kinds.count(printer), kinds.count(original)) == ((1, 0) if form == "add_ist" else (0, 1))

    printed = capsys.readouterr()
    lines = [ast.literal_eval(line.strip()) for line in (printed.out + printed.err).replace("\r", "\n").splitlines()
             if line.strip().startswith("{'loss'")]
    assert len(lines) == 4
    reported = [log for log in reporter.logs if "loss" in log]
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    for step, (line, logged, entry) in enumerate(zip(lines, reported, history), start=1):
        assert not any(key.startswith(("ist/importance/", "ist/selected/")) for key in line)
        importance = [entry[f"ist/importance/layer_{i:02d}"] for i in range(NUM_LAYERS)]
        if form == "add_ist":  # what TensorBoard got
            assert [logged[f"ist/importance/layer_{i:02d}"] for i in range(NUM_LAYERS)] == importance
        else:
            assert not any(key.startswith("ist/") for key in logged)
        expected = sorted(range(NUM_LAYERS), key=lambda i: (-importance[i], i))
        if len(set(importance)) > 1:
            assert line["ist/top_layers"] == " ".join(map(str, expected))
        else:  # steps before the first probe (T_c = 2)
            assert "ist/top_layers" not in line and step < 2
        assert float(line["loss"]) == pytest.approx(logged["loss"], rel=1e-3)
        assert len(str(line)) < 300
    assert sum("ist/top_layers" in line for line in lines) == 3  # steps 2-4, after the first importance update
    assert any(f"ist/selected/layer_{i:02d}" in trainer.state.log_history[0] for i in range(NUM_LAYERS))
    assert not any("ist/top_layers" in entry for entry in history)  # the console's line only


def test_the_full_logs_can_still_be_printed(tmp_path, capsys):
    trainer = _trainer(tmp_path, [ISTCallback(ISTConfig(update_layers=1), readable_console=False)], max_steps=1)
    trainer.train()
    assert "ist/importance/layer_03" in capsys.readouterr().out
