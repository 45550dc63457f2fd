"""SparseTuner in a plain loop: exactly the selected layers train, the rest stay bitwise unchanged."""

import math

import pytest
import torch

from istune import ISTConfig, SparseTuner
from istune.core.suppress import suppress_adapters

from ..tiny_models import FAMILIES, peft_model

NUM_LAYERS = 4


def _batch(seed=0, batch_size=2, length=6):
    ids = torch.randint(0, 100, (batch_size, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _optimizer(model):
    # Weight decay would move a parameter with a zero gradient: only grad=None keeps it still.
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)


def _snapshot(tuner):
    return [[p.detach().clone() for p in layer.parameters] for layer in tuner.layers]


@pytest.mark.parametrize("strategy", ["ist", "random", "all", "fixed"])
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_exactly_the_selected_layers_change(family, method, strategy):
    model = peft_model(family, method, num_layers=NUM_LAYERS)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = _optimizer(model)
    kwargs = {"layers": [1, 3]} if strategy == "fixed" else ({} if strategy == "all" else {"update_layers": 2})
    config = ISTConfig(strategy=strategy, probe_interval=2, **kwargs)
    tuner = SparseTuner(model, config, optimizer=optimizer)
    expected_count = NUM_LAYERS if strategy == "all" else 2
    for step in range(4):
        before = _snapshot(tuner)
        selected = tuner.begin_step()
        assert len(selected) == expected_count
        model(**_batch(step)).loss.backward()
        for j, layer in enumerate(tuner.layers):
            has_grad = [p.grad is not None for p in layer.parameters]
            assert all(has_grad) if j in selected else not any(has_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tuner.end_step(probe_batch=_batch(100 + step))
        for j, (old, layer) in enumerate(zip(before, tuner.layers)):
            unchanged = [torch.equal(a, b) for a, b in zip(old, layer.parameters)]
            if j in selected:
                assert not any(unchanged), f"layer {j} was selected but some parameter did not move"
            else:
                assert all(unchanged), f"layer {j} was not selected but moved"
    if strategy == "fixed":
        assert tuner.selected == [1, 3]
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), f"base weight {name} changed"
    tuner.close()
    assert all(p.requires_grad for layer in tuner.layers for p in layer.parameters)


def _run(seed, steps=12, strategy="ist"):
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    optimizer = _optimizer(model)
    tuner = SparseTuner(model, ISTConfig(strategy=strategy, seed=seed, probe_interval=3, update_layers=2),
                        optimizer=optimizer)
    selections = []
    for step in range(steps):
        selections.append(tuner.begin_step())
        model(**_batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tuner.end_step(probe_batch=_batch(50 + step))
    return selections, tuner


def test_same_seed_same_run_and_importance_moves():
    selections_a, tuner_a = _run(seed=1)
    selections_b, tuner_b = _run(seed=1)
    selections_c, _ = _run(seed=2)
    assert selections_a == selections_b
    assert torch.equal(tuner_a.importance, tuner_b.importance)
    assert selections_a != selections_c
    assert tuner_a.importance.abs().sum() > 0
    assert sum(1 for e in tuner_a.history if e["event"] == "probe") == 4  # steps 3, 6, 9, 12


@pytest.mark.parametrize("reward_scale", ["paper", "spread"])
def test_importance_update_equals_eq_9_10_on_the_probe_losses(reward_scale):
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    config = ISTConfig(update_layers=2, probe_layers=2, num_probes=3, beta=0.25, mu=10.0, reward_scale=reward_scale)
    tuner = SparseTuner(model, config)
    tuner.importance = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64)
    start = tuner.importance.clone()
    batch = _batch(5)
    record = tuner.update_importance(batch)
    # Recompute every candidate's loss directly (eq. 8) and the update by hand (eq. 9-10).
    model.eval()
    losses = []
    with torch.no_grad():
        for candidate in record["candidates"]:
            outside = [m for j, layer in enumerate(tuner.layers) if j not in candidate for m in layer.adapters]
            with suppress_adapters(outside, 0.25):
                losses.append(model(**batch).loss.item())
    assert record["losses"] == pytest.approx(losses, rel=1e-6)
    gains = [math.exp(-loss) for loss in record["losses"]]
    rewards = [gain - sum(gains) / len(gains) for gain in gains]
    if reward_scale == "spread":
        rms = math.sqrt(sum(r * r for r in rewards) / len(rewards))
        rewards = [r / rms for r in rewards]
    expected = start.tolist()
    for candidate, reward in zip(record["candidates"], rewards):
        for i in candidate:
            expected[i] += 10.0 * reward
    assert tuner.importance.tolist() == pytest.approx(expected, abs=1e-12)
    assert len({tuple(c) for c in record["candidates"]}) == 3


def test_probes_run_without_grad_in_eval_mode_and_leave_rng_and_mode_alone():
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    seen = []

    def loss_fn(m, batch):
        seen.append((m.training, torch.is_grad_enabled()))
        return m(**batch).loss

    tuner = SparseTuner(model, ISTConfig(probe_interval=1), loss_fn=loss_fn)
    rng = torch.get_rng_state()
    tuner.begin_step()
    tuner.end_step(probe_batch=_batch())
    assert seen == [(False, False)] * 3
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)


def test_non_finite_probe_loss_skips_the_update(caplog):
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    tuner = SparseTuner(model, ISTConfig(probe_interval=1), loss_fn=lambda m, b: torch.tensor(float("nan")))
    tuner.begin_step()
    record = tuner.end_step(probe_batch=_batch())
    assert record["skipped"] and torch.equal(tuner.importance, torch.zeros(NUM_LAYERS, dtype=torch.float64))
    assert "non-finite probe loss" in caplog.text


def test_mask_is_reapplied_when_peft_turns_requires_grad_back_on():
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    tuner = SparseTuner(model, ISTConfig(update_layers=1), optimizer=_optimizer(model))
    selected = tuner.begin_step()
    model.set_adapter("default")  # peft marks every adapter parameter trainable again
    assert all(p.requires_grad for layer in tuner.layers for p in layer.parameters)
    model(**_batch()).loss.backward()
    for j, layer in enumerate(tuner.layers):
        assert all((p.grad is not None) == (j in selected) for p in layer.parameters)


def test_optimizer_missing_adapter_parameters_is_refused():
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    first_layer = [p for n, p in model.named_parameters() if p.requires_grad and ".layers.0." in n]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad and
                                   all(p is not q for q in first_layer)])
    with pytest.raises(ValueError, match="optimizer does not hold the adapter parameters of 1 layers"):
        SparseTuner(model, ISTConfig(), optimizer=optimizer)


def test_model_dependent_config_errors_come_before_any_step():
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    with pytest.raises(ValueError, match="update_layers=5.*N_L=4"):
        SparseTuner(model, ISTConfig(update_layers=5))
    with pytest.raises(ValueError, match=r"layers=\[0, 7\].*out of range"):
        SparseTuner(model, ISTConfig(strategy="fixed", layers=[0, 7]))
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_two_layer_model_trains_and_probes():
    model = peft_model("gpt2", "lora", num_layers=2)
    optimizer = _optimizer(model)
    tuner = SparseTuner(model, ISTConfig(probe_interval=1), optimizer=optimizer)
    for step in range(3):
        tuner.begin_step()
        model(**_batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = tuner.end_step(probe_batch=_batch(9))
        assert len(record["candidates"]) == 2  # C(2, 1) distinct sets exist, fewer than N_c = 3


def test_state_dict_round_trip_continues_identically():
    selections, tuner = _run(seed=3, steps=12)
    _, resumed = _run(seed=3, steps=6)
    state = resumed.state_dict()
    fresh = SparseTuner(peft_model("llama", "lora", num_layers=NUM_LAYERS),
                        ISTConfig(seed=3, probe_interval=3, update_layers=2))
    fresh.load_state_dict(state)
    assert fresh.step == 6
    assert [fresh.begin_step() for _ in range(1)] == [selections[6]]
    with pytest.raises(ValueError, match="N_L=4.*this model has 2"):
        SparseTuner(peft_model("gpt2", "lora", num_layers=2), ISTConfig()).load_state_dict(state)
