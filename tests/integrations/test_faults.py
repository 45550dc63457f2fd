"""Bad inputs and faults: each gives a clear error before any step, or a warning and a safe skip.

One test per row of the table in docs/bad-inputs.md (rows covered elsewhere name their test there).
"""

import ast
import json
import logging
from pathlib import Path

import peft
import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback

import istune
from istune import ISTCallback, ISTConfig, SparseTuner
from istune.integrations import step_guard

from ..tiny_models import peft_model, tiny_model
from .test_hf import NUM_LAYERS, TokenDataset, _args, _trainer


class Examples(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(TokenDataset())


class NoLayers(nn.Module):
    """A model without a list of decoder layers."""

    def __init__(self):
        super().__init__()
        self.embed, self.proj = nn.Embedding(100, 16), nn.Linear(16, 100)

    def forward(self, input_ids, labels=None):
        logits = self.proj(self.embed(input_ids))
        return {"loss": nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()), "logits": logits}


class StepCounter(TrainerCallback):
    steps = 0

    def on_step_begin(self, *args, **kwargs):
        StepCounter.steps += 1


def _train(tmp_path, model=None, dataset=None, ist=None, **overrides):
    """Train briefly; return the trainer. Asserts that no step ran when training raised."""
    model = model if model is not None else peft_model("llama", "lora", num_layers=NUM_LAYERS)
    ist = ist if ist is not None else ISTCallback(ISTConfig(update_layers=1, probe_interval=1))
    StepCounter.steps = 0
    trainer = Trainer(model=model, args=_args(tmp_path, **{"max_steps": 2, **overrides}),
                      train_dataset=dataset if dataset is not None else TokenDataset(), callbacks=[ist, StepCounter()])
    try:
        trainer.train()
    except Exception:
        assert StepCounter.steps == 0, "the error came after training had started"
        raise
    return trainer


# ---- configuration -------------------------------------------------------------------------------


def test_callback_refuses_a_plain_dict():
    with pytest.raises(TypeError, match=r"takes an ISTConfig, not a dict; build one with ISTConfig\(\*\*values\)"):
        ISTCallback({"beta": 0.5})


def test_layers_path_is_looked_up_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    path = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    with pytest.raises(ValueError, match="layers_path=.*names no module of this model"):
        SparseTuner(peft_model("llama", "lora", num_layers=2), ISTConfig(layers_path=path))
    assert not marker.exists()


# ---- models --------------------------------------------------------------------------------------


def test_model_without_layers(tmp_path):
    model = peft.get_peft_model(NoLayers(), peft.LoraConfig(target_modules=["proj"]))
    with pytest.raises(ValueError, match=r"No list of decoder layers .* set ISTConfig.layers_path"):
        _train(tmp_path, model)


def test_adapters_only_outside_the_layers(tmp_path):
    model = peft.get_peft_model(tiny_model("llama", num_layers=2), peft.LoraConfig(target_modules=["lm_head"]))
    with pytest.raises(ValueError, match=r"No adapter modules or trainable parameters inside any layer list.*lm_head"):
        _train(tmp_path, model)


def test_adapters_also_outside_the_layers_are_named_in_a_warning(tmp_path, caplog):
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    model = peft.get_peft_model(tiny_model("llama", num_layers=NUM_LAYERS), config)
    with caplog.at_level(logging.WARNING):
        _train(tmp_path, model)
    assert "trainable parameters outside the decoder layers" in caplog.text and "lm_head" in caplog.text


def test_merged_adapters(tmp_path):
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"merged into their base weights.*unmerge_adapter\(\)"):
        _train(tmp_path, model)


# ---- data ----------------------------------------------------------------------------------------


def test_empty_training_data_is_the_trainers_error(tmp_path):
    with pytest.raises(ValueError, match="num_samples=0"):
        _train(tmp_path, dataset=TokenDataset(size=0))


def test_empty_probe_data(tmp_path):
    with pytest.raises(ValueError, match="The probe dataset is empty"):
        _train(tmp_path, ist=ISTCallback(probe_dataset=[]))


def test_iterable_training_data_needs_a_probe_dataset(tmp_path):
    with pytest.raises(ValueError, match="IterableDataset.*pass a map-style probe_dataset"):
        _train(tmp_path, dataset=Stream())
    _train(tmp_path, dataset=Stream(), ist=ISTCallback(ISTConfig(probe_interval=1), probe_dataset=TokenDataset()))


def test_examples_without_labels(tmp_path):
    rows = [{"input_ids": row} for row in TokenDataset().ids]
    with pytest.raises(ValueError, match=r"probe batches need 'labels'.*gave \['input_ids'\]"):
        _train(tmp_path, dataset=Examples(rows))


def test_examples_the_collator_cannot_batch(tmp_path):
    with pytest.raises(ValueError, match=r"IST cannot build a probe batch from the probe dataset \(TypeError"):
        _train(tmp_path, dataset=Examples(["not an example"] * 8))


def test_all_padding_probe_batch_skips_the_update(tmp_path, caplog):
    padding = [{"input_ids": row, "labels": torch.full_like(row, -100)} for row in TokenDataset().ids[:4]]
    ist = ISTCallback(ISTConfig(update_layers=1, probe_interval=1), probe_dataset=Examples(padding))
    with caplog.at_level(logging.WARNING):
        _train(tmp_path, ist=ist)
    assert "no target tokens (every label is -100" in caplog.text
    assert torch.equal(ist.importance, torch.zeros(NUM_LAYERS, dtype=torch.float64))
    probes = [json.loads(line) for line in (tmp_path / "ist_log.jsonl").read_text().splitlines() if "probe" in line]
    assert [p["skipped"] for p in probes] == [True, True]


# ---- numerics ------------------------------------------------------------------------------------


class Snapshots(TrainerCallback):
    def __init__(self):
        self.weights = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})


class NaNLossTrainer(Trainer):
    """Makes the training loss NaN at the given optimizer steps (1-based)."""

    nan_steps: set = set()

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step + 1 in self.nan_steps else loss


def _nan_trainer(tmp_path, nan_steps, max_steps):
    NaNLossTrainer.nan_steps = nan_steps
    ist = ISTCallback(ISTConfig(update_layers=1, probe_interval=2))
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    return ist, NaNLossTrainer(model=model, args=_args(tmp_path, max_steps=max_steps, max_grad_norm=0.0),
                               train_dataset=TokenDataset(), callbacks=[ist])


def test_a_nan_loss_reaches_the_optimizer_as_a_zero_gradient(tmp_path, caplog):
    # The NaN check runs on the device (no host-device synchronisation in a step): a non-finite step's gradients
    # are zeroed, so it trains exactly as a step whose loss is 0 * loss (all gradients zero) would.
    ist, trainer = _nan_trainer(tmp_path / "nan", {2}, max_steps=3)
    snapshots = Snapshots()
    trainer.add_callback(snapshots)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "NaN/inf gradients at step 2" in caplog.text and "gradients were zeroed" in caplog.text
    _, reference = _nan_trainer(tmp_path / "zero", set(), max_steps=3)
    reference.compute_loss = _zero_loss_at(reference, step=2)
    reference_snapshots = Snapshots()
    reference.add_callback(reference_snapshots)
    reference.train()
    for got, expected in zip(snapshots.weights, reference_snapshots.weights):
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    assert not all(torch.equal(snapshots.weights[1][n], snapshots.weights[2][n]) for n in snapshots.weights[1])
    assert all(bool(torch.isfinite(p).all()) for p in snapshots.weights[2].values())


def _zero_loss_at(trainer, step):
    compute_loss = trainer.compute_loss

    def zero_at_step(model, inputs, *args, **kwargs):
        loss = compute_loss(model, inputs, *args, **kwargs)
        return loss * 0.0 if trainer.state.global_step + 1 == step else loss

    return zero_at_step


def test_nan_losses_in_a_row_stop_training_with_finite_adapters(tmp_path):
    limit = step_guard.MAX_NON_FINITE_STEPS
    ist, trainer = _nan_trainer(tmp_path, set(range(1, 100)), max_steps=limit + 5)
    with pytest.raises(FloatingPointError, match=f"{limit} steps in a row \\(limit {limit}\\), training stopped"):
        trainer.train()
    assert trainer.state.global_step == limit  # read when the Trainer logs (every step here), after step `limit`
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())


# ---- checkpoints ---------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path):
    """A 4-layer run saved at step 2."""
    _trainer(tmp_path / "run", [ISTCallback(ISTConfig(update_layers=1, probe_interval=1))], max_steps=2,
             save_strategy="steps", save_steps=2).train()
    return tmp_path / "run" / "checkpoint-2"


def _resume(tmp_path, checkpoint, model=None):
    model = model if model is not None else peft_model("llama", "lora", num_layers=NUM_LAYERS)
    ist = ISTCallback(ISTConfig(update_layers=1, probe_interval=1))
    trainer = Trainer(model=model, args=_args(tmp_path / "resumed", max_steps=3), train_dataset=TokenDataset(),
                      callbacks=[ist])
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return ist


def _edit_ist_state(checkpoint, edit):
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    edit(state["stateful_callbacks"])
    path.write_text(json.dumps(state))


def test_checkpoint_of_another_layer_count(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="parameter group that doesn't match"):  # transformers, loading the optimizer
        _resume(tmp_path, checkpoint, peft_model("llama", "lora", num_layers=2))
    (checkpoint / "optimizer.pt").unlink()  # without optimizer state, IST's own check speaks
    with pytest.raises(ValueError, match="IST state is for a model with N_L=4 adapter layers, but this model has 2"):
        _resume(tmp_path, checkpoint, peft_model("llama", "lora", num_layers=2))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["istune"].update(generator="not base64!"), "IST state in the checkpoint .* is malformed"),
    (lambda s: s["istune"].pop("generator"), "IST state in the checkpoint .* is malformed"),
    (lambda s: s["istune"].update(generator="AAAA"), "invalid RNG state"),
    (lambda s: s["istune"].update(probe_generator="AAAA"), "IST state in the checkpoint .* is malformed"),
    (lambda s: s["istune"].update(importance=[0.0, float("nan"), 0.0, 0.0]), "invalid importance vector"),
    (lambda s: s["istune"].update(selected=[7]), r"invalid step 2 or selection \[7\]"),
])
def test_malformed_ist_state_in_a_checkpoint(tmp_path, checkpoint, edit, message):
    _edit_ist_state(checkpoint, edit)
    with pytest.raises(ValueError, match=message):
        _resume(tmp_path, checkpoint)


def test_checkpoint_without_ist_state_warns_and_starts_from_zero(tmp_path, checkpoint, caplog):
    _edit_ist_state(checkpoint, lambda s: s.pop("istune"))
    with caplog.at_level(logging.WARNING):
        _resume(tmp_path, checkpoint)
    assert "checkpoint without IST state: importance starts from zero" in caplog.text


def test_checkpoint_of_another_strategy_warns(tmp_path, checkpoint, caplog):
    _edit_ist_state(checkpoint, lambda s: s["istune"].update(strategy="random"))
    with caplog.at_level(logging.WARNING):
        _resume(tmp_path, checkpoint)
    assert "saved with strategy 'random', this run uses 'ist'" in caplog.text


def test_a_log_line_cut_short_by_a_crash_is_dropped_on_resume(tmp_path, checkpoint, caplog):
    log = tmp_path / "resumed" / "ist_log.jsonl"
    log.parent.mkdir()
    log.write_text((checkpoint / "ist_log.jsonl").read_text() + '{"event": "select", "st')
    with caplog.at_level(logging.WARNING):
        _resume(tmp_path, checkpoint)
    assert "dropped a malformed line" in caplog.text
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 3
    assert not list(log.parent.glob("*.tmp"))


def test_tuner_state_loads_with_weights_only(tmp_path):
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    tuner = SparseTuner(model, ISTConfig(probe_interval=1))
    tuner.begin_step()
    ids = TokenDataset().ids[:2]
    tuner.end_step(probe_batch={"input_ids": ids, "labels": ids})
    torch.save(tuner.state_dict(), tmp_path / "ist.pt")
    fresh = SparseTuner(peft_model("llama", "lora", num_layers=NUM_LAYERS), ISTConfig(probe_interval=1))
    fresh.load_state_dict(torch.load(tmp_path / "ist.pt", weights_only=True))
    assert torch.equal(fresh.importance, tuner.importance) and fresh.begin_step() == tuner.begin_step()


# ---- code ----------------------------------------------------------------------------------------


def _unsafe_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"import {n}" for n in names if n and n.split(".")[0] in {"pickle", "dill", "marshal", "shelve"}]
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Name) and node.func.id in {"eval", "exec", "compile", "__import__"}:
            found.append(f"{node.func.id}()")
        if isinstance(node.func, ast.Attribute) and ast.unparse(node.func) in {"torch.load", "yaml.load"}:
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if keywords.get("weights_only") != "True" and "Safe" not in keywords.get("Loader", ""):
                found.append(ast.unparse(node)[:60])
    return found


def test_no_code_is_evaluated_and_no_pickle_is_loaded():
    source = Path(istune.__file__).parent
    problems = {str(path.relative_to(source)): calls for path in sorted(source.rglob("*.py"))
                if (calls := _unsafe_calls(ast.parse(path.read_text(encoding="utf-8"))))}
    assert problems == {}
