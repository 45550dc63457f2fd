"""Training variants that must keep working with ISTCallback: activation checkpointing, autocast, TRL's
SFTTrainer, saving; and the ones istune refuses or warns about (FSDP1, torch.compile).

Gradient accumulation and resuming are in test_hf.py, DDP in test_ddp.py.
"""

import logging
from types import SimpleNamespace

import peft
import pytest
import torch
from transformers import TrainerCallback

from istune import ISTCallback, ISTConfig, SparseTuner
from istune.core import distributed, prepare_full_layer_tuning
from istune.core.activation_checkpointing import uses_reentrant_checkpointing
from istune.integrations.trainer_checks import check_trainer_setup, fsdp_version

from ..tiny_models import peft_model, tiny_model
from .test_hf import NUM_LAYERS, ParameterWatcher, _trainer


def _lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_changes_nothing_but_memory(tmp_path, reentrant):
    config = ISTConfig(update_layers=1, probe_interval=2)
    plain_ist = ISTCallback(config)
    plain = _trainer(tmp_path / "plain", [plain_ist], max_steps=4)
    plain.train()
    ist = ISTCallback(config)
    watcher = ParameterWatcher(ist)
    checkpointed = _trainer(tmp_path / "gc", [ist, watcher], max_steps=4, gradient_checkpointing=True,
                            gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed.train()
    assert checkpointed.model.base_model.model.model.layers[0].gradient_checkpointing
    assert uses_reentrant_checkpointing(checkpointed.model) == reentrant  # what the DDP check refuses
    assert watcher.steps == 4  # exactly the selected layers moved, every step
    assert torch.equal(ist.importance, plain_ist.importance)
    expected = _lora_weights(plain.model)
    for name, value in _lora_weights(checkpointed.model).items():
        torch.testing.assert_close(value, expected[name])


class AutocastRecorder(TrainerCallback):
    """Records, for every forward of the model, whether it ran in training or a probe and under which autocast."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.calls = []
        # On a submodule: accelerate wraps the model's own forward in autocast, outside its hooks.
        model.get_output_embeddings().register_forward_hook(lambda module, *_: self.calls.append(
            (module.training, torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))))


def test_bf16_autocast_trains_and_probes_in_bf16(tmp_path):
    ist = ISTCallback(ISTConfig(update_layers=1, probe_interval=2))
    watcher, recorder = ParameterWatcher(ist), AutocastRecorder()
    trainer = _trainer(tmp_path, [ist, watcher, recorder], max_steps=4, bf16=True)
    trainer.train()
    assert watcher.steps == 4
    assert set(recorder.calls) == {(True, torch.bfloat16), (False, torch.bfloat16)}  # training and probes
    assert sum(not training for training, _ in recorder.calls) == 2 * 3  # 2 probes x N_c candidates
    assert bool(torch.isfinite(ist.importance).all()) and ist.importance.abs().sum() > 0


def test_fp16_autocast_with_a_grad_scaler_in_a_plain_loop():
    # On CPU the Trainer's fp16 flag does nothing (accelerate enables fp16 autocast on accelerators only),
    # so the fp16 path -- autocast plus GradScaler with frozen adapters' grad None -- is checked directly.
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    tuner = SparseTuner(model, ISTConfig(update_layers=1), optimizer=optimizer)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        before = [[p.detach().clone() for p in layer.parameters] for layer in tuner.layers]
        selected = tuner.begin_step()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        tuner.end_step()
        for j, (old, layer) in enumerate(zip(before, tuner.layers)):
            moved = [not torch.equal(a, b) for a, b in zip(old, layer.parameters)]
            assert all(moved) if j in selected else not any(moved)


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the cat sat on a mat dog ran to park it was red blue green".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "<unk>", "</s>"] + words)}, "<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return words, PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                          eos_token="</s>")


def test_trl_sft_trainer_with_a_peft_config(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    words, tokenizer = _word_tokenizer()
    generator = torch.Generator().manual_seed(0)
    texts = [" ".join(words[i] for i in torch.randint(0, len(words), (6,), generator=generator).tolist())
             for _ in range(16)]
    ist = ISTCallback(ISTConfig(update_layers=1, probe_interval=2))
    watcher = ParameterWatcher(ist)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                     use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=100)
    trainer = SFTTrainer(model=tiny_model("llama", num_layers=NUM_LAYERS).train(), args=args,
                         train_dataset=Dataset.from_dict({"text": texts}), processing_class=tokenizer,
                         peft_config=peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
                         callbacks=[ist, watcher])
    trainer.train()
    assert watcher.steps == 4
    assert ist.tuner.num_layers == NUM_LAYERS and ist.importance.abs().sum() > 0
    assert (tmp_path / "ist_log.jsonl").read_text().count('"event": "probe"') == 2


class SnapshotOnSave(TrainerCallback):
    def __init__(self):
        self.saved = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        self.saved[state.global_step] = _lora_weights(model)


def test_saved_adapters_hold_every_layer_and_load_with_plain_peft(tmp_path):
    ist, snapshots = ISTCallback(ISTConfig(update_layers=1, probe_interval=2)), SnapshotOnSave()
    trainer = _trainer(tmp_path, [ist, snapshots], save_strategy="steps", save_steps=3)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    for folder, expected in [("checkpoint-3", snapshots.saved[3]), ("final", _lora_weights(trainer.model))]:
        loaded = peft.PeftModel.from_pretrained(tiny_model("llama", num_layers=NUM_LAYERS), str(tmp_path / folder))
        weights = _lora_weights(loaded)
        assert weights.keys() == expected.keys()
        assert {int(n.split(".layers.")[1].split(".")[0]) for n in weights} == set(range(NUM_LAYERS))
        for name, value in weights.items():
            torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, trainer.model.eval()(input_ids=ids).logits)
    assert (tmp_path / "checkpoint-3" / "ist_log.jsonl").read_text().count('"event": "select"') == 3


# DeepSpeed ZeRO-2/3 works with add_ist, and without the Trainer is refused: tests/integrations/test_deepspeed.py.
@pytest.mark.parametrize("setup, message", [
    (dict(args={"fsdp": True, "fsdp_config": {"version": 1}}), "istune does not support FSDP1 .*use_orig_params"),
    (dict(trainer=SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(
        fsdp_plugin=SimpleNamespace(fsdp_version=1))))), "FSDP1"),
    # Without the Trainer (callbacks=[ISTCallback()]): accelerate's shared state.
    (dict(accelerator_state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1))), "FSDP1"),
])
def test_fsdp1_is_refused_naming_fsdp2(setup, message):
    args = SimpleNamespace(**{"fsdp": [], "deepspeed": None, "torch_compile": False, **setup.get("args", {})})
    model = peft_model("llama", "lora", num_layers=2)
    with pytest.raises(NotImplementedError, match=message) as refused:
        check_trainer_setup(args, model, setup.get("trainer"), setup.get("accelerator_state"))
    assert "Shard with FSDP2 instead" in str(refused.value) and "configs/accelerate/fsdp2.yaml" in str(refused.value)


@pytest.mark.parametrize("args, trainer, version", [
    ({"fsdp": True, "fsdp_config": {"version": 2}}, None, 2),
    ({"fsdp": True, "fsdp_config": {}}, None, 2),  # transformers 5's default
    ({"fsdp": True, "fsdp_config": {"version": 2}}, SimpleNamespace(accelerator=SimpleNamespace(
        state=SimpleNamespace())), None),  # accelerate did not shard (CPU processes): DDP
    ({"fsdp": []}, None, None),
])
def test_fsdp_version_comes_from_the_trainer_first(args, trainer, version):
    model = peft_model("llama", "lora", num_layers=2)
    assert fsdp_version(SimpleNamespace(**args), model, trainer) == version
    if trainer is not None:  # without the Trainer, from accelerate's state (shared by the Trainer's accelerator)
        assert fsdp_version(SimpleNamespace(**args), model, accelerator_state=trainer.accelerator.state) == version


@pytest.mark.parametrize("arguments, message", [
    (dict(ddp_find_unused_parameters=False), "find_unused_parameters=True"),
    (dict(ddp_static_graph=True), "static_graph=True assumes"),
    (dict(gradient_checkpointing=True), "find_unused_parameters=True"),  # the Trainer's choice for this model
])
def test_ddp_settings_are_checked_from_the_arguments_without_the_trainer(monkeypatch, arguments, message):
    """Without the Trainer its DDP wrapper is out of reach: the settings it builds the wrapper from are checked."""
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    args = SimpleNamespace(**{"fsdp": [], "deepspeed": None, "torch_compile": False, **arguments})
    full_layers = prepare_full_layer_tuning(tiny_model("llama", num_layers=2))  # a transformers model, no peft
    with pytest.raises(ValueError, match=message):
        check_trainer_setup(args, full_layers)
    if "gradient_checkpointing" in arguments:  # a peft model: the Trainer turns find_unused_parameters on
        check_trainer_setup(args, peft_model("llama", "lora", num_layers=2))


@pytest.mark.parametrize("reentrant", [True, False])
def test_reentrant_checkpointing_under_ddp_is_refused_before_the_trainer_starts(monkeypatch, reentrant):
    """The same check and message as SparseTuner's at its first step (tests/core/test_activation_checkpointing.py)."""
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    args = SimpleNamespace(fsdp=[], deepspeed=None, torch_compile=False, ddp_find_unused_parameters=True)
    model = peft_model("llama", "lora", num_layers=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if not reentrant:
        check_trainer_setup(args, model)
        return
    with pytest.raises(ValueError, match="Reentrant activation checkpointing under DDP.*TrainingArguments"
                                         r"\(gradient_checkpointing_kwargs=\{'use_reentrant': False\}\)"):
        check_trainer_setup(args, model)


@pytest.mark.parametrize("find_unused, static_graph, message", [
    (False, False, "find_unused_parameters=True"), (True, True, "static_graph=True assumes")])
def test_ddp_wrappers_that_cannot_skip_frozen_adapters_are_refused(find_unused, static_graph, message):
    wrapper = SimpleNamespace(find_unused_parameters=find_unused, static_graph=static_graph)
    with pytest.raises(ValueError, match=message):
        distributed.check_ddp(wrapper)


def test_torch_compile_is_warned_about(caplog):
    args = SimpleNamespace(fsdp=[], deepspeed=None, torch_compile=True)
    with caplog.at_level(logging.WARNING):
        check_trainer_setup(args, peft_model("llama", "lora", num_layers=2))
    assert "recompiled for every new layer selection" in caplog.text
    assert "does not support torch.compile" in caplog.text
