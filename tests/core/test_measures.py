"""Adapter-gradient norms and outlier ratios: against references computed another way; training untouched."""

import copy

import pytest
import torch

from istune.core.layers import find_adapter_layers, is_adapter_module, prepare_full_layer_tuning
from istune.core.measures import gradient_norms, layer_gradient_norms, outlier_ratios

from ..tiny_models import peft_model, tiny_model


def _batch(seed=0, size=(2, 6)):
    ids = torch.randint(0, 100, size, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _reference_gradient_norms(model, batch):
    """Per-layer norms from a plain backward on a copy with every adapter trainable, read from .grad."""
    model = copy.deepcopy(model).eval()
    layers = find_adapter_layers(model)
    for layer in layers:
        for parameter in layer.parameters:
            parameter.requires_grad_(True)
            parameter.grad = None
    model(**batch).loss.backward()
    return torch.tensor([sum(float(p.grad.double().pow(2).sum()) for p in layer.parameters) ** 0.5
                         for layer in layers], dtype=torch.float64)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_norms_match_a_plain_backward(family):
    model = peft_model(family, "lora", num_layers=3)
    layers = find_adapter_layers(model)
    batch = _batch()
    norms = gradient_norms(model, layers, batch)
    assert norms.dtype == torch.float64 and norms.shape == (3,)
    assert bool((norms > 0).all())
    torch.testing.assert_close(norms, _reference_gradient_norms(model, batch), rtol=1e-5, atol=0)


def test_gradient_norms_leave_training_untouched():
    model = peft_model("llama", "lora", num_layers=3)
    layers = find_adapter_layers(model)
    head = model.get_output_embeddings().weight
    head.requires_grad_(True)  # a trainable parameter outside the layers must get no gradient either
    for parameter in layers[1].parameters + layers[2].parameters:
        parameter.requires_grad_(False)  # as the tuner leaves unselected layers
    for parameter in layers[0].parameters:
        parameter.grad = torch.randn_like(parameter)  # gradients already accumulated this step
    parameters_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags_before = {name: p.requires_grad for name, p in model.named_parameters()}
    grads_before = {name: (p.grad, None if p.grad is None else p.grad.clone()) for name, p in model.named_parameters()}

    norms = gradient_norms(model, layers, _batch())

    assert bool((norms > 0).all())  # the frozen layers were measured too
    assert model.training
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, parameters_before[name]), name
        assert parameter.requires_grad == flags_before[name], name
        grad_object, grad_copy = grads_before[name]
        assert parameter.grad is grad_object, name
        if grad_copy is not None:
            assert torch.equal(parameter.grad, grad_copy), name
    assert head.grad is None


def test_gradient_norms_survive_a_hook_that_refreezes_layers_before_the_forward():
    model = peft_model("llama", "lora", num_layers=3)
    layers = find_adapter_layers(model)
    batch = _batch()
    expected = gradient_norms(model, layers, batch)

    def refreeze(*_):  # what SparseTuner's mask hook does for the unselected layers
        for parameter in layers[0].parameters + layers[2].parameters:
            parameter.requires_grad_(False)

    hook = model.register_forward_pre_hook(refreeze)
    try:
        torch.testing.assert_close(gradient_norms(model, layers, batch), expected, rtol=0, atol=0)
    finally:
        hook.remove()


def test_gradient_norms_refuse_a_block_that_ran_without_autograd(monkeypatch):
    model = peft_model("llama", "lora", num_layers=2)
    layers = find_adapter_layers(model)
    block = layers[0].block
    monkeypatch.setattr(block, "forward", torch.no_grad()(block.forward))
    with pytest.raises(RuntimeError, match=r"model\.model\.layers\.0.*received a gradient"):
        gradient_norms(model, layers, _batch())


def test_gradient_norms_refuse_a_forward_without_autograd(monkeypatch):
    model = peft_model("llama", "lora", num_layers=2)
    monkeypatch.setattr(model, "forward", torch.no_grad()(model.forward))
    with pytest.raises(RuntimeError, match="received a gradient"):
        gradient_norms(model, find_adapter_layers(model), _batch())


def test_layer_gradient_norms_read_grad_and_count_none_as_zero():
    model = peft_model("llama", "lora", num_layers=3)
    layers = find_adapter_layers(model)
    for parameter in layers[0].parameters:
        parameter.grad = torch.full_like(parameter, 0.5)
    for parameter in layers[2].parameters[:1]:  # only one parameter of layer 2 has a gradient
        parameter.grad = torch.full_like(parameter, -2.0)
    norms = layer_gradient_norms(layers, [2, 0, 1])
    assert list(norms) == [2, 0, 1]
    assert norms[0] == pytest.approx(0.5 * sum(p.numel() for p in layers[0].parameters) ** 0.5, rel=1e-12)
    assert norms[2] == pytest.approx(2.0 * layers[2].parameters[0].numel() ** 0.5, rel=1e-12)
    assert norms[1] == 0.0
    assert layer_gradient_norms(layers, []) == {}


def _reference_outlier_ratios(model, multiplier, batch):
    """A hand loop: inputs recorded at the adapter wrappers (or plain linears), |W| * ||X_j|| per weight."""
    layers = find_adapter_layers(model)
    recorded = {}
    modules = []
    for layer in layers:
        adapters = [m for m in layer.block.modules() if is_adapter_module(m)]
        if adapters:
            modules += [(layer.index, m, m.base_layer) for m in adapters]
        else:
            modules += [(layer.index, m, m) for m in layer.block.modules()
                        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]
    hooks = [wrapper.register_forward_hook(lambda m, args, out: recorded.__setitem__(id(m), args[0].detach()))
             for _, wrapper, _ in modules]
    model.eval()
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    ratios = []
    for layer in layers:
        scores = []
        for index, wrapper, base in modules:
            if index != layer.index:
                continue
            x = recorded[id(wrapper)]
            x = x.reshape(-1, x.shape[-1])
            column_norms = torch.stack([x[:, j].norm() for j in range(x.shape[1])])
            weight = base.weight.detach()
            if type(base).__name__ == "Conv1D":
                weight = weight.t()  # stored (in, out)
            scores.append((weight.abs() * column_norms[None, :]).flatten())
        scores = torch.cat(scores)
        ratios.append(float((scores > multiplier * scores.mean()).sum()) / scores.numel())
    return torch.tensor(ratios, dtype=torch.float64)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("multiplier", [1.5, 3.0])
def test_outlier_ratios_match_a_hand_computation(family, multiplier):
    model = peft_model(family, "lora", num_layers=2)
    batch = _batch(size=(3, 7))
    ratios = outlier_ratios(model, find_adapter_layers(model), batch, multiplier)
    assert model.training  # mode restored
    expected = _reference_outlier_ratios(model, multiplier, batch)
    assert bool((expected > 0).all()) and bool((expected < 1).all())  # the check is not vacuous
    torch.testing.assert_close(ratios, expected, rtol=1e-6, atol=1e-6)


def test_outlier_ratios_of_full_layers_count_every_linear():
    model = prepare_full_layer_tuning(tiny_model("llama", num_layers=2))
    batch = _batch()
    ratios = outlier_ratios(model, find_adapter_layers(model), batch, 2.0)
    torch.testing.assert_close(ratios, _reference_outlier_ratios(model, 2.0, batch), rtol=1e-6, atol=1e-6)


def test_outlier_ratios_fall_as_the_threshold_rises():
    model = peft_model("llama", "lora", num_layers=2)
    layers = find_adapter_layers(model)
    low, high = (outlier_ratios(model, layers, _batch(), m) for m in (1.0, 4.0))
    assert bool((high <= low).all()) and bool((high < low).any())


@pytest.mark.parametrize("multiplier", [0, -1.0])
def test_outlier_ratios_refuse_a_non_positive_threshold(multiplier):
    model = peft_model("llama", "lora", num_layers=2)
    with pytest.raises(ValueError, match="multiplier"):
        outlier_ratios(model, find_adapter_layers(model), _batch(), multiplier)
