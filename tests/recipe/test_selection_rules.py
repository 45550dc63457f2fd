"""Every selection rule from the command line and YAML: `istune train --strategy <rule>`, its log and its plot."""

import json

import pytest

from istune.cli import _parse_train, main

from .conftest import train_args

NEW_RULES = {  # each with a parameter of its own, so the flags are exercised too
    "lisa": ["--switch_interval", "2"],
    "badam": ["--block_order", "descending"],
    "owlore": ["--outlier_threshold", "5", "--calibration_interval", "1"],
    "gradnorm": ["--exploration", "0.5", "--gradnorm_decay", "0.8"],
    "probe-once": ["--probe_by", "gradient"],
}


def test_rule_parameters_are_flags_and_yaml_keys(tmp_path):
    *_, ist, _ = _parse_train(["--strategy", "badam", "--block_order", "random", "--switch_interval", "5"])
    assert (ist.strategy, ist.block_order, ist.switch_interval) == ("badam", "random", 5)
    config = tmp_path / "run.yaml"
    config.write_text("strategy: owlore\noutlier_threshold: 5.0\ncalibration_interval: 50\n")
    *_, ist, _ = _parse_train(["--config", str(config)])
    assert (ist.strategy, ist.outlier_threshold, ist.calibration_interval) == ("owlore", 5.0, 50)


def test_a_rule_parameter_out_of_range_is_refused_naming_the_field(tiny_llama_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_llama_dir, data_file, out, "--strategy", "lisa", "--switch_interval", "0")) == 2
    assert "ISTConfig.switch_interval=0 is invalid" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("rule", NEW_RULES)
def test_each_rule_trains_from_the_command_line(tiny_llama_dir, data_file, tmp_path, rule):
    out = tmp_path / "run"
    extra = ["--strategy", rule, *NEW_RULES[rule], "--max_steps", "2", "--compare_base", "false"]
    assert main(train_args(tiny_llama_dir, data_file, out, *extra)) == 0
    events = [json.loads(line) for line in (out / "ist_log.jsonl").read_text().splitlines()]
    selections = [e for e in events if e["event"] == "select"]
    assert [e["step"] for e in selections] == [1, 2] and all(len(e["selected"]) == 1 for e in selections)
    assert not any(e["event"] == "probe" for e in events)  # IST's probes are IST's
    measured = {e["what"] for e in events if e["event"] == "measure"}
    assert measured == {"badam": set(), "lisa": set(), "owlore": {"outlier_ratios"},
                        "gradnorm": {"gradient_norms"}, "probe-once": {"gradient_norms"}}[rule]
    assert sum(e["event"] == "gradients" for e in events) == (2 if rule == "gradnorm" else 0)
    results = json.loads((out / "results.json").read_text())
    assert results["ist"]["strategy"] == rule
    assert any("ist/selected/layer_00" in entry for entry in results["log_history"])
    if rule == "badam":  # descending, N_u = 1 of N_L = 2: the top layer, then the bottom one
        assert [e["selected"] for e in selections] == [[1], [0]]
        assert main(["plot", str(out)]) == 0
        assert (out / "selection.png").is_file() and not (out / "importance.png").exists()
