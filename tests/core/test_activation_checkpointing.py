"""IST's per-step checkpointing (istune.core.activation_checkpointing) changes memory and work, never numbers.

Blocks below the lowest selected layer run without autograd; under transformers' gradient
checkpointing the others are checkpointed by it; `recompute_unselected` checkpoints the
unselected ones without it; `stored_layers` keeps the activations of that many of them and
recomputes the rest, with or without it.
"""

import functools

import pytest
import torch

from istune import ISTConfig, SparseTuner
from istune.bench import MemoryTracker
from istune.core.layers import prepare_full_layer_tuning

from ..tiny_models import CORE_FAMILIES, peft_model, tiny_model

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
    return (model, tuner, *_step_loss_and_grads(model, tuner, batch, seed))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_same_loss_and_gradients_with_dropout(family, attention):
    # The configs have use_cache=True: a KV cache exists in the training forward, and the replay must not extend it.
    batch = _batch()
    _, _, loss, grads = _train_step(family, False, batch, attention=attention)
    _, tuner, loss_recomputed, grads_recomputed = _train_step(family, True, batch, attention=attention)
    assert tuner._checkpointing.recomputed_calls == 1  # only layer 2: layer 0 needs no backward, 1 and 3 train
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
    assert tuner._checkpointing.recomputed_calls == 0


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
    assert calls and tuner._checkpointing.recomputed_calls == 3  # the instance forward ran inside the checkpoint
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
    assert tuner._checkpointing.recomputed_calls == 0  # every block is already checkpointed by transformers
    assert checkpointed_loss.detach() == loss
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(parameter.grad, grads[name], rtol=1e-6, atol=1e-7)


def test_config_refuses_recompute_without_unselected_layers():
    with pytest.raises(ValueError, match="recompute_unselected.*strategy 'all'"):
        ISTConfig(strategy="all", recompute_unselected=True)
    with pytest.raises(ValueError, match="recompute_unselected='yes'.*true or false"):
        ISTConfig(recompute_unselected="yes")


def _checkpointed_step(family, batch, attention="sdpa", reentrant=False, model=None, selected=SELECTED):
    """One IST step under transformers' gradient checkpointing, set up as the Trainer does for a peft model."""
    model = model if model is not None else peft_model(family, "lora", num_layers=NUM_LAYERS)
    model.set_attn_implementation(attention)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()  # what peft and the Trainer do under checkpointing: the cause of the waste
    tuner = SparseTuner(model, ISTConfig(strategy="fixed", layers=selected))
    return (model, tuner, *_step_loss_and_grads(model, tuner, batch, seed=0))


def _step_loss_and_grads(model, tuner, batch, seed):
    """One IST step's forward and backward: the loss and every parameter's gradient."""
    tuner.begin_step()
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_transformers_checkpointing_under_ist_gives_the_same_loss_and_gradients(family, attention):
    batch = _batch()
    _, _, loss, grads = _train_step(family, False, batch, attention=attention)
    _, tuner, checkpointed_loss, checkpointed_grads = _checkpointed_step(family, batch, attention)
    assert tuner._checkpointing.skipped_calls == 1  # layer 0, below the lowest selected layer (1)
    assert checkpointed_loss == loss
    assert checkpointed_grads.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(checkpointed_grads[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_reentrant_checkpointing_under_ist_trains_the_lowest_selected_layer():
    # Reentrant checkpointing gives parameters gradients only when an input requires grad; the input of the
    # lowest selected layer does not (nothing below ran autograd) unless IST makes it.
    batch = _batch()
    _, _, loss, grads = _train_step("llama", False, batch)
    _, tuner, checkpointed_loss, checkpointed_grads = _checkpointed_step("llama", batch, reentrant=True)
    assert tuner._checkpointing.skipped_calls == 1
    assert checkpointed_loss == loss
    assert checkpointed_grads.keys() == grads.keys()
    assert any(".layers.1." in name for name in grads)  # the lowest selected layer has its gradients
    for name in grads:
        torch.testing.assert_close(checkpointed_grads[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_reentrant_checkpointing_through_a_wrapper_trains_the_lowest_selected_layer():
    # LLaMA-Factory wraps the checkpoint function (functools.wraps, use_reentrant=True by default): seen through.
    batch = _batch()
    _, _, loss, grads = _train_step("llama", False, batch)
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    calls = []
    for block in model.base_model.model.model.layers:
        inner = block._gradient_checkpointing_func

        @functools.wraps(inner)
        def wrapped(*args, inner=inner, **kwargs):
            calls.append(1)
            return inner(*args, **kwargs)

        block._gradient_checkpointing_func = wrapped
    model.enable_input_require_grads()
    tuner = SparseTuner(model, ISTConfig(strategy="fixed", layers=SELECTED))
    assert tuner._checkpointing.reentrant_in_use()
    wrapped_loss, wrapped_grads = _step_loss_and_grads(model, tuner, batch, seed=0)
    assert calls  # the wrapper checkpointed the blocks
    assert wrapped_loss == loss and wrapped_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(wrapped_grads[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)


def _count_work(model):
    """Per block: forward calls of its submodules, and whether its output could carry a gradient back."""
    blocks = model.base_model.model.model.layers
    calls = [0] * len(blocks)
    output_requires_grad = [None] * len(blocks)
    for index, block in enumerate(blocks):
        for module in block.modules():
            if module is not block:
                module.register_forward_hook(lambda *_, i=index: calls.__setitem__(i, calls[i] + 1))

        def record(module, args, output, i=index):
            hidden = output[0] if isinstance(output, tuple) else output
            output_requires_grad[i] = hidden.requires_grad

        block.register_forward_hook(record)
    return calls, output_requires_grad


def test_nothing_below_the_lowest_selected_layer_runs_backward_or_is_recomputed():
    batch = _batch()
    once = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    once_calls, _ = _count_work(once)
    with torch.no_grad():
        once(**batch)  # the submodule calls of one forward, per block
    selected = [2, 3]
    # Reference: transformers' checkpointing alone, the same adapters frozen, no IST: every block recomputed.
    plain = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plain.enable_input_require_grads()
    for name, parameter in plain.named_parameters():
        parameter.requires_grad_(any(f".layers.{j}." in name for j in selected) and "lora_" in name)
    plain_calls, plain_grad = _count_work(plain)
    plain(**batch).loss.backward()
    # (a replay may stop early, once it has rebuilt what the backward needs: more calls than one forward, not 2x)
    assert all(c > once for c, once in zip(plain_calls, once_calls)) and all(plain_grad)

    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    calls, output_requires_grad = _count_work(model)
    _, tuner, _, _ = _checkpointed_step("llama", batch, model=model, selected=selected)
    assert calls[:2] == once_calls[:2]  # blocks 0, 1: one forward, no recompute
    assert all(c > once for c, once in zip(calls[2:], once_calls[2:]))  # 2, 3: forward and recompute
    assert output_requires_grad == [False, False, True, True]  # 0, 1: no autograd graph, so no backward
    assert tuner._checkpointing.skipped_calls == 1  # block 0 cut the graph; block 1's input needs no grad


def test_trained_embeddings_below_keep_their_gradient_under_checkpointing():
    # LISA-style: the embeddings train at every step, so every block below the lowest selected one passes
    # the gradient down and must run with autograd.
    batch = _batch()
    results = []
    for checkpointing in (False, True):
        model = prepare_full_layer_tuning(tiny_model("llama", num_layers=NUM_LAYERS), train_embeddings=True).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        tuner = SparseTuner(model, ISTConfig(strategy="fixed", layers=[2]))
        tuner.begin_step()
        model(**batch).loss.backward()
        results.append((tuner, model.get_input_embeddings().weight.grad))
    (_, plain_grad), (tuner, checkpointed_grad) = results
    assert tuner._checkpointing.skipped_calls == 0
    assert plain_grad is not None and plain_grad.abs().sum() > 0
    torch.testing.assert_close(checkpointed_grad, plain_grad, rtol=1e-6, atol=1e-7)


def test_blocks_without_adapters_below_the_lowest_selected_layer_are_skipped_too():
    import peft

    model = peft.get_peft_model(tiny_model("llama", num_layers=NUM_LAYERS),
                                peft.LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[2, 3])).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    tuner = SparseTuner(model, ISTConfig(strategy="fixed", layers=[0]))  # position 0 = block 2
    tuner.begin_step()
    model(**_batch()).loss.backward()
    assert tuner._checkpointing.skipped_calls == 1  # block 0 (no adapters, below block 2) ran without autograd


# ---- stored_layers: how many blocks from the lowest selected one upward keep their activations ----------

# SELECTED = [1, 3]: blocks 1, 2, 3 run the backward pass. The top block (3) first, then unselected ones (2), then 1.
STORED_FIRST = [3, 2, 1]


def _stored_layers_step(family, batch, stored, transformers_checkpointing, reentrant=False, model=None):
    model = model if model is not None else peft_model(family, "lora", num_layers=NUM_LAYERS)
    if transformers_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()  # as the Trainer does for a peft model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tuner = SparseTuner(model, ISTConfig(strategy="fixed", layers=SELECTED, stored_layers=stored), optimizer=optimizer)
    return (model, tuner, *_step_loss_and_grads(model, tuner, batch, seed=0))


@pytest.mark.parametrize("transformers_checkpointing", [False, True])
@pytest.mark.parametrize("stored", [0, 1, 2, 3])
@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_stored_layers_gives_the_same_loss_and_gradients_with_dropout(family, stored, transformers_checkpointing):
    batch = _batch()
    _, _, loss, grads = _train_step(family, False, batch)  # no checkpointing at all
    model, tuner, stored_loss, stored_grads = _stored_layers_step(family, batch, stored, transformers_checkpointing)
    checkpointing = tuner._checkpointing
    assert checkpointing.stored == frozenset(STORED_FIRST[:stored])
    # without transformers' checkpointing istune recomputes the blocks it does not store; with it, transformers does
    assert checkpointing.recomputed_calls == (0 if transformers_checkpointing else 3 - stored)
    assert checkpointing.skipped_calls == (1 if transformers_checkpointing else 0)  # block 0: no backward
    assert stored_loss == loss
    assert stored_grads.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(stored_grads[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)
    blocks = checkpointing.blocks
    flags = [block.gradient_checkpointing for block in blocks]
    assert flags == [transformers_checkpointing and j not in STORED_FIRST[:stored] for j in range(NUM_LAYERS)]
    tuner.close()  # the stored blocks' checkpointing flags come back
    assert [block.gradient_checkpointing for block in blocks] == [transformers_checkpointing] * NUM_LAYERS


@pytest.mark.parametrize("stored", [0, 3])  # the lowest selected block (1) recomputed, or stored
def test_stored_layers_under_reentrant_checkpointing_trains_the_lowest_selected_layer(stored):
    batch = _batch()
    _, _, loss, grads = _train_step("llama", False, batch)
    _, tuner, stored_loss, stored_grads = _stored_layers_step("llama", batch, stored, True, reentrant=True)
    assert tuner._checkpointing.reentrant_in_use()  # also when every block that runs backward is stored
    assert stored_loss == loss and stored_grads.keys() == grads.keys()
    assert any(".layers.1." in name for name in grads)
    for name in grads:
        torch.testing.assert_close(stored_grads[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_stored_blocks_run_once_under_transformers_checkpointing_and_the_others_twice():
    batch = _batch()
    once = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    once_calls, _ = _count_work(once)
    with torch.no_grad():
        once(**batch)
    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    calls, output_requires_grad = _count_work(model)
    _stored_layers_step("llama", batch, 2, True, model=model)  # blocks 3, 2 stored; 1 recomputed; 0 skipped
    assert [c > o for c, o in zip(calls, once_calls)] == [False, True, False, False]
    assert calls[0] == once_calls[0] and calls[2:] == once_calls[2:]
    assert output_requires_grad == [False, True, True, True]


def test_stored_layers_sets_the_peak_between_full_recompute_and_none():
    # GPT-2 with eager attention: long sequences make each block's activations large. Layer 0 selected: all four
    # blocks run backward; each stored block adds its activations to the peak, each recomputed one only its input.
    # Except the top block: the backward frees its activations before any recompute, and recomputing it would
    # rebuild the same bytes at that moment, so storing it costs nothing at this peak (in the blocks' backward;
    # with a large vocabulary the peak can come earlier, at the LM head).
    batch = _batch(length=96)
    peaks = []
    for stored in (0, 1, 2, 3, 4):
        model = peft_model("gpt2", "lora", num_layers=NUM_LAYERS)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        tuner = SparseTuner(model, ISTConfig(strategy="fixed", layers=[0], stored_layers=stored), optimizer=optimizer)
        with MemoryTracker(model, optimizer) as tracker:
            tuner.begin_step()
            model(**batch).loss.backward()
        peaks.append(tracker.report()["peak_bytes"])
        assert tuner._checkpointing.stored == frozenset([3, 2, 1, 0][:stored])  # block 0 (selected) stored last
    assert peaks[1] == peaks[0] and all(a < b for a, b in zip(peaks[1:], peaks[2:])), peaks


def test_config_checks_stored_layers():
    for value in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=f"stored_layers={value!r}.*>= 0"):
            ISTConfig(stored_layers=value)
    with pytest.raises(ValueError, match="stored_layers=2.*recompute_unselected=True.*only one"):
        ISTConfig(stored_layers=2, recompute_unselected=True)
    assert ISTConfig(strategy="all", stored_layers=0).stored_layers == 0  # plain per-layer checkpointing


def test_reentrant_checkpointing_under_ddp_is_refused_before_the_first_step(monkeypatch):
    from istune.core import distributed

    model = peft_model("llama", "lora", num_layers=NUM_LAYERS)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    tuner = SparseTuner(model, ISTConfig(update_layers=1))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)  # as under torchrun; refused before any collective
    with pytest.raises(ValueError, match="Reentrant activation checkpointing under DDP.*use_reentrant': False"):
        tuner.begin_step()
