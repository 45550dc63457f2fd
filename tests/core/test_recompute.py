"""recompute_unselected: checkpointing unselected layers changes memory, not numbers."""

import pytest
import torch

from istune import ISTConfig, SparseTuner
from istune.bench import MemoryTracker

from ..tiny_models import CORE_FAMILIES, peft_model

NUM_LAYERS = 4
SELECTED = [1, 3]  # layer 0 lies below the lowest selected one (no backward), layer 2 between: recomputed


def _batch(length=12, seed=0):
    ids = torch.randint(0, 100, (2, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _train_step(family, recompute, batch, seed=0, attention="sdpa"):
    model = peft_model(family, "lora", num_layers=NUM_LAYERS)  # train mode: dropout on where the family has it
    model.set_attn_implementation(attention)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tuner = SparseTuner(model, ISTConfig(strategy="fixed", layers=SELECTED, recompute_unselected=recompute),
                        optimizer=optimizer)
    tuner.begin_step()
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return model, tuner, loss.detach(), grads


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_same_loss_and_gradients_with_dropout(family, attention):
    # The configs have use_cache=True: a KV cache exists in the training forward, and the replay must not extend it.
    batch = _batch()
    _, _, loss, grads = _train_step(family, False, batch, attention=attention)
    _, tuner, loss_recomputed, grads_recomputed = _train_step(family, True, batch, attention=attention)
    assert tuner._recompute.recomputed_calls == 1  # only layer 2: layer 0 needs no backward, 1 and 3 train
    assert loss_recomputed == loss
    assert grads.keys() == grads_recomputed.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_recomputed[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_recompute_lowers_the_peak_of_a_step():
    # GPT-2 with eager attention saves T x T attention matrices per layer: a long sequence makes them dominate.
    batch = _batch(length=96)
    peaks = {}
    for recompute in (False, True):
        model = peft_model("gpt2", "lora", num_layers=NUM_LAYERS)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        tuner = SparseTuner(model, ISTConfig(strategy="fixed", layers=[0], recompute_unselected=recompute),
                            optimizer=optimizer)
        scopes = {f"layer {layer.index}": layer.block for layer in tuner.layers}
        with MemoryTracker(model, optimizer, scopes=scopes) as tracker:
            tuner.begin_step()
            model(**batch).loss.backward()
        peaks[recompute] = tracker.report()
    plain, recomputed = peaks[False], peaks[True]
    by_layer = plain["peak_activations_by_scope"]
    # Layers 1-3 are unselected above the lowest selected (0): checkpointed, they keep only their inputs
    # (counted as `other` by the tracker); the backward pass rebuilds one layer's activations at a time.
    # So the peak falls by about two layers' activations less those inputs: more than one layer's.
    assert plain["peak_bytes"] - recomputed["peak_bytes"] > by_layer["layer 1"] > 0
    hidden_states_bytes = 2 * 96 * 32 * 4  # batch x T x d fp32: the input the checkpoint keeps
    assert recomputed["peak_activations_by_scope"]["layer 1"] == hidden_states_bytes


def test_probes_and_no_grad_forwards_are_not_checkpointed():
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tuner = SparseTuner(model, ISTConfig(update_layers=1, recompute_unselected=True, probe_interval=1),
                        optimizer=optimizer)
    tuner.begin_step()
    tuner.update_importance(_batch())  # N_c no-grad probe forwards
    with torch.no_grad():
        model(**_batch())
    assert tuner._recompute.recomputed_calls == 0


def test_close_restores_the_blocks_forward():
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    blocks = model.base_model.model.model.layers
    calls = []
    hooked = blocks[2].forward
    blocks[2].forward = lambda *args, **kwargs: calls.append(1) or hooked(*args, **kwargs)  # as accelerate's hooks do
    instance_forward = vars(blocks[2])["forward"]
    tuner = SparseTuner(model, ISTConfig(strategy="fixed", layers=[0], recompute_unselected=True))
    tuner.begin_step()
    model(**_batch()).loss.backward()
    assert calls and tuner._recompute.recomputed_calls == 3  # the instance forward ran inside the checkpoint
    tuner.close()
    assert vars(blocks[2])["forward"] is instance_forward
    assert not any("forward" in vars(block) for j, block in enumerate(blocks) if j != 2)


def test_transformers_gradient_checkpointing_is_not_doubled():
    batch = _batch()
    _, _, loss, grads = _train_step("llama", False, batch)
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tuner = SparseTuner(model, ISTConfig(strategy="fixed", layers=SELECTED, recompute_unselected=True))
    tuner.begin_step()
    torch.manual_seed(0)
    checkpointed_loss = model(**batch).loss
    checkpointed_loss.backward()
    assert tuner._recompute.recomputed_calls == 0  # every block is already checkpointed by transformers
    assert checkpointed_loss.detach() == loss
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(parameter.grad, grads[name], rtol=1e-6, atol=1e-7)


def test_config_refuses_recompute_without_unselected_layers():
    with pytest.raises(ValueError, match="recompute_unselected.*strategy 'all'"):
        ISTConfig(strategy="all", recompute_unselected=True)
    with pytest.raises(ValueError, match="recompute_unselected='yes'.*true or false"):
        ISTConfig(recompute_unselected="yes")
