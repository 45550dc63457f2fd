"""unselected_optimizer_state: keep, offload or drop the optimizer state of unselected layers."""

import pytest
import torch

from istune import ISTConfig, SparseTuner

from ..tiny_models import peft_model

NUM_LAYERS = 4


def _batch(seed):
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _run(policy, selections, lr=1e-2):
    """Train one step per selection (strategy 'fixed' re-created per step); return model, optimizer, tuners."""
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step, layers in enumerate(selections):
        tuner = SparseTuner(model, ISTConfig(strategy="fixed", layers=layers, unselected_optimizer_state=policy),
                            optimizer=optimizer)
        tuner.begin_step()
        model(**_batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tuner.close()
    return model, optimizer, tuner


def _layer_parameters(tuner, position):
    return tuner.layers[position].parameters


def test_keep_holds_the_state_of_unselected_layers():
    _, optimizer, tuner = _run("keep", [[0], [1]])
    assert all(p in optimizer.state for p in _layer_parameters(tuner, 0))


def test_drop_frees_the_state_and_restarts_the_moments():
    model, optimizer, tuner = _run("drop", [[0], [1]])
    assert not any(p in optimizer.state for p in _layer_parameters(tuner, 0))
    assert all(p in optimizer.state for p in _layer_parameters(tuner, 1))

    # Selected again, layer 0 takes a first Adam step from fresh moments: the same update as a new optimizer's.
    before = [p.detach().clone() for p in _layer_parameters(tuner, 0)]
    tuner = SparseTuner(model, ISTConfig(strategy="fixed", layers=[0], unselected_optimizer_state="drop"),
                        optimizer=optimizer)
    tuner.begin_step()
    model(**_batch(2)).loss.backward()
    grads = [p.grad.clone() for p in _layer_parameters(tuner, 0)]
    optimizer.step()
    reference = [torch.nn.Parameter(b.clone()) for b in before]
    fresh = torch.optim.AdamW(reference, lr=1e-2)
    for parameter, grad in zip(reference, grads):
        parameter.grad = grad
    fresh.step()
    for parameter, expected in zip(_layer_parameters(tuner, 0), reference):
        torch.testing.assert_close(parameter.detach(), expected.detach())


def test_drop_changes_the_updates_and_keep_does_not():
    selections = [[0], [1], [0]]
    kept, _, _ = _run("keep", selections)
    offloaded, _, _ = _run("offload", selections)  # CPU run: the state is already in CPU memory
    dropped, _, _ = _run("drop", selections)
    layer0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    kept_w, offloaded_w, dropped_w = (dict(m.named_parameters())[layer0] for m in (kept, offloaded, dropped))
    assert torch.equal(kept_w, offloaded_w)
    assert not torch.allclose(kept_w, dropped_w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading moves state off a CUDA device")
def test_offload_moves_unselected_state_to_cpu_and_back():
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS).cuda()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for layers in ([0], [1], [0]):
        tuner = SparseTuner(model, ISTConfig(strategy="fixed", layers=layers, unselected_optimizer_state="offload"),
                            optimizer=optimizer)
        tuner.begin_step()
        unselected = 1 - layers[0]
        for p in _layer_parameters(tuner, layers[0]):
            assert optimizer.state.get(p, {}).get("exp_avg", p).device.type == "cuda"
        for p in _layer_parameters(tuner, unselected):
            if p in optimizer.state:
                assert optimizer.state[p]["exp_avg"].device.type == "cpu"
        model(**{k: v.cuda() for k, v in _batch(0).items()}).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tuner.close()


def test_bad_policy_and_missing_optimizer_are_refused():
    with pytest.raises(ValueError, match="unselected_optimizer_state='discard'.*'keep', 'offload', 'drop'"):
        ISTConfig(unselected_optimizer_state="discard")
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    with pytest.raises(ValueError, match="needs the optimizer"):
        SparseTuner(model, ISTConfig(unselected_optimizer_state="drop"))
