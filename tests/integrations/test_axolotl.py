"""The axolotl plugin: ist_* keys checked as ISTConfig, axolotl's LISA and hook-bypassing kernels refused, and
IST trained through axolotl's own entry (``python -m axolotl.cli.train config.yaml``) on a tiny random LLaMA.

Runs in the side environment (``bash scripts/side_env.sh axolotl``); skipped where axolotl is not installed.
Each training runs in a child process: axolotl patches transformers' classes (attention, Trainer) for the
whole process, and the other tests of the process must not see that.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("axolotl.integrations.base")

from axolotl.utils.dict import DictDefault  # noqa: E402

from istune.config import ISTConfig, option_names  # noqa: E402
from istune.integrations.axolotl import ISTArgs, ist_args_model, ist_config, refuse_bypassed_hooks  # noqa: E402

from ..tiny_models import peft_model, save_tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "istune.integrations.axolotl.ISTPlugin"
RECORDER = "tests.integrations.axolotl_recorder.StepRecorder"
NUM_LAYERS = 4
STEPS = 6
WORDS = "the cat sat on mat dog ran to park it was red blue green".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), NUM_LAYERS)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """32 alpaca rows of random words."""
    rows = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with path.open("w", encoding="utf-8") as file:
        for _ in range(32):
            row = {"instruction": " ".join(rows.choices(WORDS, k=6)), "input": "",
                   "output": " ".join(rows.choices(WORDS, k=4))}
            file.write(json.dumps(row) + "\n")
    return path


def axolotl_config(model_dir, data_file, output_dir, **overrides) -> dict:
    """LoRA on every linear map, 6 steps of 2 rows at lr 0.01 on the CPU; IST trains 1 of 4 layers per step."""
    config = {
        "base_model": str(model_dir), "datasets": [{"path": str(data_file), "ds_type": "json", "type": "alpaca"}],
        "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_target_linear": True,
        "lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False,
        "sequence_len": 64, "micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": STEPS,
        "learning_rate": 0.01, "optimizer": "adamw_torch", "lr_scheduler": "constant", "val_set_size": 0,
        "output_dir": str(output_dir), "dataset_prepared_path": str(Path(output_dir) / "prepared"),
        "dataset_num_proc": 1, "logging_steps": 1, "save_strategy": "no",
        "plugins": [PLUGIN], "ist_update_layers": 1, "ist_probe_interval": 2,
    }
    return {**config, **overrides}


def validate(config: dict) -> DictDefault:
    """axolotl's own validation of a config, with its plugins' fields (what `axolotl train` does first)."""
    from axolotl.cli.config import prepare_plugins
    from axolotl.utils.config import validate_config

    config = DictDefault(config)
    prepare_plugins(config)
    return validate_config(config)


# ---- ist_* keys --------------------------------------------------------------------------------------------


def test_the_ist_keys_are_istconfig_options_with_the_prefix():
    names = {f.name for f in dataclasses.fields(ISTConfig)} - {"rule_options"} | {"block_order", "probe_by"}
    assert {f"ist_{name}" for name in names} <= set(ISTArgs.model_fields) == {f"ist_{n}" for n in option_names()}


def test_a_rule_of_ones_own_gets_an_ist_key_for_its_parameter():
    from istune.cli import import_rules

    import_rules([str(Path(__file__).parents[2] / "examples" / "rules" / "rotating_window.py")])
    assert "ist_stride" in ist_args_model().model_fields
    assert ist_config({"ist_strategy": "rotating-window", "ist_stride": 2}).stride == 2
    with pytest.raises(ValueError, match=r"ist_stride=0 in the axolotl config: ISTConfig.stride=0 is invalid"):
        ist_config({"ist_strategy": "rotating-window", "ist_stride": 0})


def test_ist_keys_reach_istconfig_through_axolotl_validation(model_dir, data_file, tmp_path):
    config = axolotl_config(model_dir, data_file, tmp_path, ist_strategy="random", ist_update_fraction=0.5,
                            ist_update_layers=None, ist_beta=0.5)
    assert ist_config(validate(config)) == ISTConfig(strategy="random", update_fraction=0.5, beta=0.5,
                                                               probe_interval=2)


@pytest.mark.parametrize("key, value, message", [
    ("ist_beta", 2, r"ist_beta=2 in the axolotl config: ISTConfig\.beta=2 is invalid: β must be a number in \[0, 1\]"),
    ("ist_strategy", "best", r"ist_strategy='best' in the axolotl config: ISTConfig\.strategy='best' is invalid"),
    ("ist_num_probes", "3", r"ist_num_probes='3' in the axolotl config: ISTConfig\.num_probes='3' is invalid"),
    ("ist_seed", None, r"ist_seed=None in the axolotl config: ISTConfig\.seed=None is invalid"),
    ("ist_betta", 0.5, r"'ist_betta' is no IST option: did you mean 'ist_beta'\?"),
])
def test_a_bad_ist_value_fails_axolotl_validation_with_istconfigs_error(model_dir, data_file, tmp_path, key, value,
                                                                       message):
    with pytest.raises(ValueError, match=message):
        validate(axolotl_config(model_dir, data_file, tmp_path, **{key: value}))


def test_axolotls_lisa_beside_the_plugin_is_refused(model_dir, data_file, tmp_path):
    config = axolotl_config(model_dir, data_file, tmp_path, lisa_n_layers=1, lisa_step_interval=2)
    with pytest.raises(ValueError, match=r"axolotl's LISA \(lisa_n_layers=1, lisa_step_interval=2\) and IST .*"
                                         r"Remove the lisa_\* keys; .*ist_strategy: lisa"):
        validate(config)


# ---- axolotl's fused LoRA kernels ----------------------------------------------------------------------------


@pytest.mark.parametrize("method, values, refused", [
    ("lora", {"lora_qkv_kernel": True, "lora_o_kernel": True, "lora_mlp_kernel": True}, None),
    ("dora", {"lora_qkv_kernel": False, "lora_o_kernel": False, "lora_mlp_kernel": False}, None),
    ("dora", {"lora_o_kernel": True}, r"IST suppresses .* through a forward hook .* set lora_o_kernel: false"),
    ("lora", {"lora_mlp_kernel": True, "ist_strategy": "owlore"},
     r"ist_strategy='owlore' records .* forward hooks, .* set lora_mlp_kernel: false"),
])
def test_kernels_are_refused_where_they_skip_ists_hooks(method, values, refused):
    model = peft_model("llama", method, num_layers=2)
    if refused is None:
        refuse_bypassed_hooks(values, model)
    else:
        with pytest.raises(ValueError, match=refused):
            refuse_bypassed_hooks(values, model)


# ---- training through axolotl --------------------------------------------------------------------------------


def train(tmp_path, config: dict) -> tuple[dict[int, list[int]], dict]:
    """Run ``python -m axolotl.cli.train`` on ``config``; the selections IST logged and what the recorder saw."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({**config, "plugins": config["plugins"] + [RECORDER]}), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "axolotl.cli.train", str(config_file)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    output = Path(config["output_dir"])
    events = [json.loads(line) for line in (output / "ist_log.jsonl").read_text(encoding="utf-8").splitlines()]
    selected = {event["step"]: event["selected"] for event in events if event["event"] == "select"}
    return selected, json.loads((output / "recorded.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("options", [
    {},
    # sample packing, and axolotl's fused LoRA kernels for q/k/v and o (its MLP kernel is Triton: GPU only)
    {"sample_packing": True, "pad_to_sequence_len": True, "lora_qkv_kernel": True, "lora_o_kernel": True},
], ids=["peft-forward", "packed-qkv-o-kernels"])
def test_ist_trains_only_the_selected_layers_through_axolotl(model_dir, data_file, tmp_path, options):
    config = axolotl_config(model_dir, data_file, tmp_path / "out", **options)
    selected, recorded = train(tmp_path, config)

    assert sorted(selected) == list(range(1, STEPS + 1))
    changed = {int(step): layers for step, layers in recorded["changed"].items()}
    assert changed == selected  # every step: the selected layer's adapters moved, and no other layer's
    assert all(len(layers) == 1 for layers in selected.values())
    losses = recorded["losses"]
    if options.get("lora_qkv_kernel"):  # β reaches the kernels: the same losses through them as through peft
        effect = abs(losses["peft"]["suppressed"] - losses["peft"]["full"])  # 0.012 (LoRA weights set by the recorder)
        assert effect > 1e-3
        for key in ("full", "suppressed"):  # the kernels sum in another order: 1e-5 apart, not `effect`
            assert abs(losses["kernels"][key] - losses["peft"][key]) < effect / 10, key
    else:
        assert losses is None
