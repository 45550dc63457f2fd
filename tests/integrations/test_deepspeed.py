"""IST under DeepSpeed ZeRO-2 and ZeRO-3: two CPU processes (gloo) against one process in plain torch.

The worker (deepspeed_worker.py) is launched with the repository's ZeRO-3 accelerate config file and
trains ZeRO-3, then ZeRO-2 (set through TrainingArguments); each run is compared with the same training
in one process without DeepSpeed. The checks of what is refused, and the pieces (the split per layer, the
skipping, the skipped-step counter), also run here in one process.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file

from istune import ISTConfig
from istune.core.layers import find_adapter_layers
from istune.core.tuner import build_rule
from istune.integrations import deepspeed, step_guard
from istune.integrations.trainer_checks import check_trainer_setup

from ..tiny_models import peft_model, tiny_model
from . import deepspeed_worker

REPO = Path(__file__).resolve().parents[2]
CONFIG_FILES = {stage: REPO / "configs" / "accelerate" / f"deepspeed_zero{stage}.yaml" for stage in (2, 3)}
TOLERANCE = dict(rtol=0, atol=1e-5)
STAGES = ["zero2", "zero3"]
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG_FILES[3]),
               "--num_processes", "2", "--main_process_port", "0", str(Path(deepspeed_worker.__file__)), str(out)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, f"accelerate launch failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The same training in one process, plain torch (no DeepSpeed): the reference."""
    trainer, _, recorder = deepspeed_worker.train(str(tmp_path_factory.mktemp("one")), 1, 0, stage=None)
    return deepspeed_worker.losses(trainer), recorder.selections, deepspeed_worker.adapter_weights(trainer.model)


def _layer(name: str) -> int:
    return int(re.search(r"\.layers\.(\d+)\.", name).group(1))


@needs_deepspeed
@pytest.mark.parametrize("stage", STAGES)
def test_zero_matches_plain_torch_in_one_process(ranks, single_process, stage):
    out, results = ranks
    losses, selections, weights = single_process
    result = results[0][stage]
    assert (result["engine"], result["stage"], result["world_size"]) == ("DeepSpeedEngine", int(stage[-1]), 2)
    assert result["from_launcher"] == (stage == "zero3")  # ZeRO-3 came from configs/accelerate/deepspeed_zero3.yaml
    assert result["groups"] == deepspeed_worker.NUM_LAYERS  # one param group per layer (LoRA: all weight-decayed)
    assert results[0][stage]["selections"] == results[1][stage]["selections"] == selections
    assert len({tuple(s) for s in selections}) > 1
    assert result["losses"] == pytest.approx(losses, abs=1e-5)
    assert results[0][stage]["importance"] == results[1][stage]["importance"]  # bitwise
    trained = [load_file(str(out / f"{stage}_rank{r}.safetensors")) for r in range(2)]
    assert trained[0].keys() == trained[1].keys() == weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(trained[0][name], trained[1][name], rtol=0, atol=0)
        torch.testing.assert_close(trained[0][name], value, **TOLERANCE)


@needs_deepspeed
@pytest.mark.parametrize("stage", STAGES)
def test_only_the_selected_layers_move_and_unselected_ones_stay_exact(ranks, stage):
    out, results = ranks
    for result in results:
        assert result[stage]["moved"] == result[stage]["selections"]
        assert result[stage]["resumed"]["moved"] == result[stage]["resumed"]["selections"]
    never_selected = set(range(deepspeed_worker.NUM_LAYERS)) - {j for s in results[0][stage]["selections"] for j in s}
    assert never_selected  # the data are such that one layer is never chosen: its adapters must be the initial ones
    initial = deepspeed_worker.adapter_weights(peft_model("llama", "lora", num_layers=deepspeed_worker.NUM_LAYERS))
    trained = load_file(str(out / f"{stage}_rank0.safetensors"))
    for name, value in initial.items():
        if _layer(name) in never_selected:
            assert torch.equal(trained[name], value), name


@needs_deepspeed
def test_without_skipping_zero_moves_every_layer_at_every_step(ranks):
    """The control: with IST's pre-hook off, ZeRO steps the frozen adapters' zero-filled partitions."""
    _, results = ranks
    every_layer = list(range(deepspeed_worker.NUM_LAYERS))
    assert results[0]["zero2"]["moved_without_skipping"] == [every_layer] * deepspeed_worker.MAX_STEPS


@needs_deepspeed
@pytest.mark.parametrize("stage", STAGES)
def test_resume_from_a_trainer_checkpoint_continues_exactly(ranks, stage):
    out, results = ranks
    result = results[0][stage]
    assert result["resumed"]["selections"] == result["selections"][3:]
    assert result["resumed"]["losses"] == pytest.approx(result["losses"][3:], abs=1e-6)
    assert result["resumed"]["importance"] == pytest.approx(result["importance"], abs=1e-6)
    final, continued = (load_file(str(out / f"{stage}_{name}0.safetensors")) for name in ("rank", "resumed"))
    for name, value in final.items():
        torch.testing.assert_close(continued[name], value, rtol=0, atol=1e-6)


@needs_deepspeed
@pytest.mark.parametrize("stage", STAGES)
def test_saved_adapters_hold_every_layer_and_plain_peft_loads_them(ranks, stage):
    """save_model after training, and the checkpoint saved at step 3 while three layers were frozen."""
    out, _ = ranks
    final = load_file(str(out / f"{stage}_rank0.safetensors"))
    for folder in (out / f"{stage}_adapter", out / stage / "checkpoint-3"):
        loaded = PeftModel.from_pretrained(tiny_model("llama", num_layers=deepspeed_worker.NUM_LAYERS), str(folder))
        weights = deepspeed_worker.adapter_weights(loaded)
        assert weights.keys() == final.keys()
        assert {_layer(name) for name in weights} == set(range(deepspeed_worker.NUM_LAYERS))
        if folder.name.endswith("adapter"):
            for name, value in weights.items():
                torch.testing.assert_close(value, final[name], rtol=0, atol=0)


@needs_deepspeed
def test_a_nan_step_is_skipped_by_deepspeed_and_training_goes_on(ranks):
    for result in ranks[1]:
        nan_step = result["zero2"]["nan_step"]
        assert nan_step["skipped_steps"] == 1 and nan_step["finite"]
        assert nan_step["moved"] == [nan_step["selections"][0], [], nan_step["selections"][2]]


@needs_deepspeed
def test_refused_setups_name_the_reason_and_the_fix(ranks):
    for result in ranks[1]:
        refused = result["refused"]
        assert refused["optimizer_in_config"].startswith("NotImplementedError: DeepSpeed config 'optimizer'")
        assert "TrainingArguments(optim=" in refused["optimizer_in_config"]
        assert refused["offload_optimizer"].startswith(
            "NotImplementedError: DeepSpeed zero_optimization.offload_optimizer.device = 'cpu'")
        assert refused["offload_param"].startswith(
            "NotImplementedError: DeepSpeed zero_optimization.offload_param.device = 'cpu'")
        assert refused["drop_state"].startswith(
            "NotImplementedError: ISTConfig.unselected_optimizer_state = 'drop' under DeepSpeed")
        assert refused["stage_1"].startswith("NotImplementedError: DeepSpeed zero_optimization.stage = 1")
        assert refused["one_line"].startswith("ValueError: ISTCallback under DeepSpeed needs the Trainer")
        assert "istune.add_ist(trainer, config)" in refused["one_line"]


# ---- in one process ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [2, 3])
def test_the_accelerate_config_files_choose_a_zero_stage_istune_accepts(stage):
    config = yaml.safe_load(CONFIG_FILES[stage].read_text())
    assert config["distributed_type"] == "DEEPSPEED" and config["deepspeed_config"]["zero_stage"] == stage
    zero = {"stage": stage, "offload_optimizer": {"device": config["deepspeed_config"]["offload_optimizer_device"]},
            "offload_param": {"device": config["deepspeed_config"]["offload_param_device"]}}
    deepspeed.check_deepspeed_config({"zero_optimization": zero})  # what accelerate builds from the file
    command = f"# accelerate launch --config_file {CONFIG_FILES[stage].relative_to(REPO)}"
    assert CONFIG_FILES[stage].read_text().startswith(command)


@pytest.mark.parametrize("config, message", [
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}, "DeepSpeed config 'optimizer'"),
    ({"zero_optimization": {"stage": 0}}, "zero_optimization.stage = 0"),
    ({}, "zero_optimization.stage = 0"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, "offload_param.device = 'nvme'"),
])
def test_deepspeed_settings_istune_cannot_keep_exact_are_refused(config, message):
    with pytest.raises(NotImplementedError, match=re.escape(message)):
        deepspeed.check_deepspeed_config(config)


@pytest.mark.parametrize("options, message", [
    (dict(unselected_optimizer_state="offload"), "unselected_optimizer_state = 'offload'"),
    (dict(strategy="gradnorm"), "selection rule 'gradnorm' reads adapter gradients"),
    (dict(strategy="probe-once", probe_by="gradient"), "selection rule 'probe-once' reads adapter gradients"),
])
def test_ist_options_that_need_what_zero_hides_are_refused(options, message):
    config = ISTConfig(**options)
    with pytest.raises(NotImplementedError, match=re.escape(message)):
        deepspeed.check_ist_options(config, build_rule(config))
    deepspeed.check_ist_options(ISTConfig(strategy="probe-once", probe_by="suppression"),
                                build_rule(ISTConfig(strategy="probe-once", probe_by="suppression")))


@pytest.mark.parametrize("setup", [
    dict(accelerator_state=SimpleNamespace(deepspeed_plugin=object())),  # accelerate's shared state
    dict(args={"deepspeed_plugin": object()}),  # set by accelerate launch's config file
    dict(args={"deepspeed": "ds_config.json"}),
])
def test_deepspeed_without_the_trainer_is_refused_naming_add_ist(setup):
    args = SimpleNamespace(**{"fsdp": [], "deepspeed": None, "torch_compile": False, **setup.get("args", {})})
    with pytest.raises(ValueError, match=r"ISTCallback under DeepSpeed needs the Trainer.*istune\.add_ist"):
        check_trainer_setup(args, peft_model("llama", "lora", num_layers=2), None, setup.get("accelerator_state"))


def _split_optimizer(model):
    layers = find_adapter_layers(model)
    adapters = [p for layer in layers for p in layer.parameters]
    outside = torch.nn.Parameter(torch.ones(3))  # e.g. a trainable head: trains every step
    optimizer = torch.optim.AdamW([{"params": adapters[::2] + [outside], "weight_decay": 0.1},
                                   {"params": adapters[1::2], "weight_decay": 0.0}], lr=0.1)
    deepspeed.split_param_groups_by_layer(optimizer, layers)
    return layers, optimizer, outside


def test_the_optimizer_is_split_into_one_group_per_layer_and_original_group():
    model = peft_model("llama", "lora", num_layers=3)
    layers, optimizer, outside = _split_optimizer(model)
    tags = [(group[deepspeed.LAYER_KEY], group["weight_decay"]) for group in optimizer.param_groups]
    assert tags == [(0, 0.1), (1, 0.1), (2, 0.1), (None, 0.1), (0, 0.0), (1, 0.0), (2, 0.0)]
    for group in optimizer.param_groups:
        position = group[deepspeed.LAYER_KEY]
        expected = {id(outside)} if position is None else {id(p) for p in layers[position].parameters}
        assert {id(p) for p in group["params"]} <= expected
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(held) == len({id(p) for p in held}) == sum(len(layer.parameters) for layer in layers) + 1


def test_an_optimizer_missing_an_adapter_or_with_state_is_refused():
    model = peft_model("llama", "lora", num_layers=2)
    layers = find_adapter_layers(model)
    partial = torch.optim.AdamW(layers[0].parameters, lr=0.1)
    with pytest.raises(ValueError, match="does not hold the adapter parameters of 1 layers"):
        deepspeed.split_param_groups_by_layer(partial, layers)
    stepped = torch.optim.SGD([p for layer in layers for p in layer.parameters], lr=0.1, momentum=0.9)
    for p in layers[0].parameters:
        p.grad = torch.ones_like(p)
    stepped.step()
    with pytest.raises(ValueError, match="has state already"):
        deepspeed.split_param_groups_by_layer(stepped, layers)


def test_unselected_groups_get_no_step_and_no_state_even_with_zero_gradients():
    """What ZeRO hands the optimizer: every group with a gradient, zeros for the frozen layers."""
    model = peft_model("llama", "lora", num_layers=3)
    layers, optimizer, outside = _split_optimizer(model)
    selection = {"now": None}
    skipping = deepspeed.UnselectedGroupsSkipped(optimizer, lambda: selection["now"])
    before = [[p.detach().clone() for p in layer.parameters] for layer in layers]
    selection["now"] = [1]
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p) if group[deepspeed.LAYER_KEY] not in (1, None) else torch.ones_like(p)
    gradients = {id(p): p.grad for group in optimizer.param_groups for p in group["params"]}
    optimizer.step()
    for j, layer in enumerate(layers):
        moved = [not torch.equal(a, b) for a, b in zip(before[j], layer.parameters)]
        assert all(moved) if j == 1 else not any(moved)
        assert all((p in optimizer.state) == (j == 1) for p in layer.parameters)
    assert outside in optimizer.state
    assert all(p.grad is gradients[id(p)] for group in optimizer.param_groups for p in group["params"])  # put back
    skipping.remove()
    optimizer.step()  # without the hooks every group steps
    assert all(p in optimizer.state for layer in layers for p in layer.parameters)


def test_skipped_steps_warn_and_stop_training_after_the_limit(caplog):
    engine = SimpleNamespace(skipped_steps=0)
    counter = step_guard.SkippedSteps(limit=3)
    counter.observe(engine, 1)
    engine.skipped_steps += 1
    counter.observe(engine, 2)
    counter.observe(engine, 3)  # not skipped: the run of skipped steps restarts
    counter.report(3)
    assert "1 optimizer step(s) up to step 3 skipped by DeepSpeed" in caplog.text
    for step in (4, 5):
        engine.skipped_steps += 1
        counter.observe(engine, step)
    engine.skipped_steps += 1
    with pytest.raises(FloatingPointError, match="skipped 3 optimizer steps in a row up to step 6"):
        counter.observe(engine, 6)
