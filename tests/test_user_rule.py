"""A rule of the user's own with a parameter, in one file (examples/rules/rotating_window.py): the command line,
YAML, the config's checks, the resume check and LLaMA-Factory's keys take its parameter as a built-in rule's."""

import json
from pathlib import Path

import pytest

from istune.cli import import_rules, main
from istune.config import ISTConfig

from .test_cli import _train_args, tiny_model_dir  # noqa: F401 (a fixture)

RULE_FILE = Path(__file__).parents[1] / "examples" / "rules" / "rotating_window.py"


def _selections(out: Path) -> list[list[int]]:
    events = [json.loads(line) for line in (out / "ist_log.jsonl").read_text().splitlines()]
    return [event["selected"] for event in events if event["event"] == "select"]


def test_its_parameter_reaches_the_rule_from_flags_and_yaml(tiny_model_dir, data_file, tmp_path):  # noqa: F811
    rule = ["--rules_from", str(RULE_FILE), "--strategy", "rotating-window", "--update_layers", "1"]
    assert main(_train_args(tiny_model_dir, data_file, tmp_path / "default", *rule)) == 0
    assert _selections(tmp_path / "default") == [[0], [1], [0], [1]]  # stride 1 on N_L = 2 layers
    assert main(_train_args(tiny_model_dir, data_file, tmp_path / "flag", *rule, "--stride", "2")) == 0
    assert _selections(tmp_path / "flag") == [[0], [0], [0], [0]]  # stride 2: back to layer 0 every time
    assert json.loads((tmp_path / "flag" / "results.json").read_text())["ist"]["stride"] == 2

    config = tmp_path / "run.yaml"
    config.write_text(f"rules_from: {RULE_FILE}\nstrategy: rotating-window\nstride: 2\nupdate_layers: 1\n")
    assert main(_train_args(tiny_model_dir, data_file, tmp_path / "yaml", "--config", str(config))) == 0
    assert _selections(tmp_path / "yaml") == [[0], [0], [0], [0]]


@pytest.mark.parametrize("extra,message", [
    (["--strategy", "rotating-window", "--stride", "0"], "ISTConfig.stride=0 is invalid: use an integer >= 1"),
    (["--strategy", "ist", "--stride", "2"], "`stride` only applies to strategy 'rotating-window', not 'ist'"),
])
def test_a_bad_value_or_another_rule_is_refused_before_any_work(tiny_model_dir, data_file, tmp_path,  # noqa: F811
                                                                 capsys, extra, message):
    out = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, data_file, out, "--rules_from", str(RULE_FILE), *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_missing_rules_file_is_named(tiny_model_dir, data_file, tmp_path, capsys):  # noqa: F811
    assert main(_train_args(tiny_model_dir, data_file, tmp_path / "run", "--rules_from", "no/such/rules.py")) == 2
    assert "--rules_from='no/such/rules.py': no such file" in capsys.readouterr().err


def test_the_config_the_resume_check_and_llamafactory_take_it():
    from istune.integrations.llamafactory import ist_config
    from istune.recipe.run_file import must_match

    import_rules([str(RULE_FILE)])
    config = ISTConfig(strategy="rotating-window", stride=3, switch_interval=2)
    assert (config.stride, config.switch_interval, config.rule_options) == (3, 2, {"switch_interval": 2, "stride": 3})
    assert ISTConfig(**config.to_dict()) == config
    assert ISTConfig().stride == 1 and "stride" not in ISTConfig().rule_options  # ist does not take it
    assert "stride" in must_match()["ist"]  # a resume with another stride is refused
    assert ist_config({"strategy": "rotating-window", "stride": 2}).stride == 2
