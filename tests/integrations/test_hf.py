"""ISTCallback inside a real transformers Trainer on a tiny model."""

import json
import logging

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from istune import ISTCallback, ISTConfig, add_ist

from ..tiny_models import peft_model

NUM_LAYERS = 4


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, size=32, length=8, seed=0):
        self.ids = torch.randint(0, 100, (size, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class RecordingTrainer(Trainer):
    """Records every training micro-batch, to check IST leaves the data order alone."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen = getattr(self, "seen", []) + [inputs["input_ids"].clone()]
        return super().training_step(model, inputs, num_items_in_batch)


def _args(tmp_path, **overrides):
    defaults = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                    weight_decay=0.1, lr_scheduler_type="constant", logging_steps=1, report_to=[],
                    save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    return TrainingArguments(**{**defaults, **overrides})


def _trainer(tmp_path, callbacks, seed=0, **overrides):
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS, seed=seed)
    return RecordingTrainer(model=model, args=_args(tmp_path, **overrides), train_dataset=TokenDataset(),
                            callbacks=callbacks)


class ParameterWatcher(TrainerCallback):
    """Checks, after every optimizer step, that exactly the layers IST selected moved."""

    def __init__(self, ist):
        self.ist, self.steps = ist, 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.selected = list(self.ist.selected)
        self.before = [[p.detach().clone() for p in layer.parameters] for layer in self.ist.tuner.layers]

    def on_step_end(self, args, state, control, **kwargs):
        for j, (old, layer) in enumerate(zip(self.before, self.ist.tuner.layers)):
            moved = [not torch.equal(a, b) for a, b in zip(old, layer.parameters)]
            assert all(moved) if j in self.selected else not any(moved), (state.global_step, j, self.selected)
        self.steps += 1


class LogRecorder(TrainerCallback):
    """Stands for a reporter (TensorBoard, W&B) listed before ISTCallback."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.mark.parametrize("strategy", ["ist", "random"])
def test_trainer_trains_exactly_the_selected_layers(tmp_path, strategy):
    ist = ISTCallback(ISTConfig(strategy=strategy, update_layers=2, probe_interval=2))
    watcher = ParameterWatcher(ist)
    trainer = _trainer(tmp_path, [ist, watcher])
    trainer.train()
    assert watcher.steps == 6
    assert ist.importance.shape == (NUM_LAYERS,)
    assert (ist.importance.abs().sum() > 0) == (strategy == "ist")
    assert all(p.requires_grad for layer in ist.tuner.layers for p in layer.parameters)  # restored at the end


NEW_RULES = {"lisa": {"switch_interval": 2}, "badam": {"block_order": "random"}, "owlore": {"calibration_interval": 2},
             "gradnorm": {"exploration": 0.3}, "probe-once": {"probe_by": "suppression"}}


@pytest.mark.parametrize("rule", NEW_RULES)
def test_every_rule_trains_exactly_its_selection_in_the_trainer(tmp_path, rule):
    ist = ISTCallback(ISTConfig(strategy=rule, update_layers=2, **NEW_RULES[rule]))
    watcher = ParameterWatcher(ist)
    trainer = _trainer(tmp_path, [ist, watcher])
    trainer.train()
    assert watcher.steps == 6
    events = _read_log(tmp_path)
    assert [e["step"] for e in events if e["event"] == "select"] == list(range(1, 7))
    assert (ist.sampler is None) == (rule in ("lisa", "badam"))  # a probe sampler only for the rules that measure
    assert sum(e["event"] == "gradients" for e in events) == (6 if rule == "gradnorm" else 0)
    assert all(f"ist/selected/layer_{j:02d}" in trainer.state.log_history[0] for j in range(NUM_LAYERS))
    assert "ist/importance/layer_00" not in trainer.state.log_history[0]


def test_a_rule_object_reaches_the_tuner_through_add_ist(tmp_path):
    from istune.core.rules import BAdamRule

    trainer = _trainer(tmp_path, [], max_steps=4)
    rule = BAdamRule("descending")
    ist = add_ist(trainer, ISTConfig(update_layers=2), rule=rule)
    trainer.train()
    assert ist.tuner.rule is rule and ist.tuner.rule_name == "badam"
    assert [e["selected"] for e in _read_log(tmp_path) if e["event"] == "select"] == [[2, 3], [0, 1]] * 2


def _read_log(folder):
    return [json.loads(line) for line in (folder / "ist_log.jsonl").read_text().splitlines()]


def _adapters(trainer):
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("form", ["add_ist", "trainer="])
def test_metrics_reach_reporters_and_the_jsonl_log(tmp_path, form):
    recorder = LogRecorder()
    trainer = _trainer(tmp_path, [recorder])  # listed before IST, as the Trainer lists report_to's reporters
    config = ISTConfig(update_layers=1, probe_interval=3)
    if form == "add_ist":
        ist = add_ist(trainer, config)
    else:
        ist = ISTCallback(config, trainer=trainer)
        trainer.add_callback(ist)
    trainer.train()
    train_logs = [log for log in recorder.logs if "loss" in log]
    assert len(train_logs) == 6
    assert f"ist/importance/layer_{NUM_LAYERS - 1:02d}" in train_logs[-1]
    assert sum(train_logs[0][f"ist/selected/layer_{i:02d}"] for i in range(NUM_LAYERS)) == 1.0
    assert "ist/probe_loss" in train_logs[2]
    assert "ist/importance/layer_00" in trainer.state.log_history[0]
    events = _read_log(tmp_path)
    selections = [e for e in events if e["event"] == "select"]
    probes = [e for e in events if e["event"] == "probe"]
    assert [e["step"] for e in selections] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in probes] == [3, 6]
    assert probes[-1]["importance"] == pytest.approx(ist.importance.tolist())
    assert len(probes[0]["losses"]) == 3


def test_the_one_line_form_says_once_that_reporters_before_it_miss_its_metrics(tmp_path, caplog):
    recorder = LogRecorder()
    trainer = _trainer(tmp_path, [recorder, ISTCallback(ISTConfig(update_layers=1, probe_interval=3))])
    trainer.args.report_to = ["tensorboard"]  # what the warning reads (the Trainer built its reporters already)
    with caplog.at_level(logging.WARNING, logger="istune"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "will not reach the reporters" in r.getMessage()]
    assert len(warnings) == 1 and "['tensorboard']" in warnings[0] and "istune.add_ist(trainer, config)" in warnings[0]
    assert not any(key.startswith("ist/") for log in recorder.logs for key in log)
    train_history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(f"ist/selected/layer_{NUM_LAYERS - 1:02d}" in entry for entry in train_history)
    assert "ist/probe_loss" in train_history[2]


@pytest.mark.parametrize("strategy", ["ist", "random"])
def test_add_ist_trains_as_the_one_line_form(tmp_path, strategy):
    config = ISTConfig(strategy=strategy, update_layers=2, probe_interval=2)
    one_line = ISTCallback(config)
    plain = _trainer(tmp_path / "one_line", [one_line])
    plain.train()
    trainer = _trainer(tmp_path / "add_ist", [])
    explicit = add_ist(trainer, config)
    trainer.train()
    assert _read_log(tmp_path / "one_line") == _read_log(tmp_path / "add_ist")  # same selections and probes
    assert torch.equal(one_line.importance, explicit.importance)
    expected = _adapters(plain)
    for name, value in _adapters(trainer).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="already has an ISTCallback"):
        add_ist(trainer, config)


def test_data_order_and_rng_are_those_of_plain_training(tmp_path):
    plain = _trainer(tmp_path / "plain", [])
    plain.train()
    with_ist = _trainer(tmp_path / "ist", [ISTCallback(ISTConfig(probe_interval=1))])
    with_ist.train()
    assert len(plain.seen) == len(with_ist.seen) == 6
    assert all(torch.equal(a, b) for a, b in zip(plain.seen, with_ist.seen))


def test_gradient_accumulation_keeps_one_selection_per_optimizer_step(tmp_path):
    ist = ISTCallback(ISTConfig(update_layers=1, probe_interval=2))
    watcher = ParameterWatcher(ist)
    trainer = _trainer(tmp_path, [ist, watcher], gradient_accumulation_steps=3, max_steps=4)
    trainer.train()
    events = [json.loads(line) for line in (tmp_path / "ist_log.jsonl").read_text().splitlines()]
    assert len(trainer.seen) == 11  # 8 micro-batches an epoch: steps of 3, 3, 2, then 3
    assert [e["step"] for e in events if e["event"] == "select"] == [1, 2, 3, 4]
    assert watcher.steps == 4


def test_model_dependent_errors_before_any_step(tmp_path):
    trainer = _trainer(tmp_path, [ISTCallback(ISTConfig(update_layers=9))])
    with pytest.raises(ValueError, match="update_layers=9.*N_L=4"):
        trainer.train()
    assert not hasattr(trainer, "seen")


def test_resume_from_checkpoint_continues_the_uninterrupted_run(tmp_path):
    config = ISTConfig(update_layers=2, probe_interval=2)
    full_ist = ISTCallback(config)
    full = _trainer(tmp_path / "full", [full_ist], save_strategy="steps", save_steps=3)
    full.train()

    first = _trainer(tmp_path / "resumed", [ISTCallback(config)], save_strategy="steps", save_steps=3, max_steps=3)
    first.train()
    resumed_ist = ISTCallback(config)
    resumed = _trainer(tmp_path / "resumed", [resumed_ist], save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))

    assert torch.equal(full_ist.importance, resumed_ist.importance)
    assert _read_log(tmp_path / "full") == _read_log(tmp_path / "resumed")
    full_weights = {n: p for n, p in full.model.named_parameters() if "lora_" in n}
    for name, parameter in resumed.model.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(parameter, full_weights[name], rtol=0, atol=0)


def test_memory_options_under_the_trainer(tmp_path):
    """recompute_unselected trains the same adapters; unselected_optimizer_state='drop' reaches the optimizer."""
    config = dict(update_layers=2, probe_interval=2)
    runs = {}
    for name, extra in {"plain": {}, "recompute": {"recompute_unselected": True},
                        "drop": {"unselected_optimizer_state": "drop"}}.items():
        ist = ISTCallback(ISTConfig(**config, **extra))
        trainer = _trainer(tmp_path / name, [ist])
        trainer.train()
        runs[name] = (trainer, ist)
    plain, recompute, drop = (dict(runs[n][0].model.named_parameters()) for n in ("plain", "recompute", "drop"))
    adapter_names = [n for n in plain if "lora_" in n]
    for name in adapter_names:
        torch.testing.assert_close(recompute[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.allclose(drop[n], plain[n]) for n in adapter_names)
    trainer, ist = runs["drop"]
    held = {p for p in trainer.optimizer.state}
    for position, layer in enumerate(ist.tuner.layers):
        assert all((p in held) == (position in ist.selected) for p in layer.parameters)


@pytest.mark.parametrize("reentrant", [False, True])
def test_trainer_gradient_checkpointing_is_ist_aware_and_trains_the_same(tmp_path, reentrant):
    """gradient_checkpointing=True: same adapters as without it; the layers below the lowest selected one skipped."""
    config = dict(update_layers=2, probe_interval=2)
    plain = _trainer(tmp_path / "plain", [ISTCallback(ISTConfig(**config))])
    plain.train()
    ist = ISTCallback(ISTConfig(**config))
    skipped = []
    ist_watch = type("Watch", (TrainerCallback,), {
        "on_step_end": lambda self, *a, **k: skipped.append(ist.tuner._checkpointing.skipped_calls)})()
    checkpointed = _trainer(tmp_path / "ckpt", [ist, ist_watch], gradient_checkpointing=True,
                            gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed.train()
    expected = dict(plain.model.named_parameters())
    for name, parameter in checkpointed.model.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(parameter, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert skipped[-1] > 0  # some step's lowest selected layer was above layer 0, and the layers below it were skipped


def test_gradient_rules_read_unscaled_norms_under_fp16_without_clipping():
    """fp16's loss scale multiplies every gradient until it is unscaled, and the Trainer unscales only to clip. With
    max_grad_norm=0 the callback unscales before the rule reads the norms (a real GradScaler on CPU stands for
    accelerate's): the rule sees the norms of the same step without scaling, and the scaler still steps."""
    from types import SimpleNamespace

    from istune.core import SparseTuner
    from istune.core.rules import RandomRule

    class GradientWatcher(RandomRule):
        wants_gradients = True

        def __init__(self):
            self.seen = []

        def observe_gradients(self, step, norms):
            self.seen.append(norms)

    ids = TokenDataset(size=4).ids

    def first_step_norms(scale: float, max_grad_norm: float) -> tuple[dict, float]:
        model = peft_model("llama", "lora", num_layers=NUM_LAYERS, seed=0)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        config, rule = ISTConfig(strategy="random", seed=3), GradientWatcher()
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        callback = ISTCallback(config)
        callback.tuner = SparseTuner(model, config, optimizer=optimizer, rule=rule)
        callback.trainer = SimpleNamespace(accelerator=SimpleNamespace(unscale_gradients=lambda: scaler.unscale_(
            optimizer)))
        callback.tuner.begin_step()
        scaler.scale(model(input_ids=ids, labels=ids).loss).backward()
        callback.on_pre_optimizer_step(SimpleNamespace(fp16=True, max_grad_norm=max_grad_norm), None, None)
        scaler.step(optimizer)  # unscales itself only if the callback did not
        scaler.update()
        return rule.seen[0], scaler.get_scale()

    reference, _ = first_step_norms(1.0, 0.0)
    unscaled, scale = first_step_norms(1024.0, 0.0)
    assert list(unscaled) == list(reference) and len(reference) == 1  # N_u = 1 of 4 layers, the same one
    assert all(unscaled[j] == pytest.approx(reference[j], rel=1e-6) for j in reference)
    assert scale == 1024.0  # a finite step: the scaler stepped and kept its scale
    # With clipping on, the Trainer has unscaled already and the callback leaves the gradients alone.
    scaled, _ = first_step_norms(1024.0, 1.0)
    assert all(scaled[j] == pytest.approx(1024.0 * reference[j], rel=1e-6) for j in reference)
