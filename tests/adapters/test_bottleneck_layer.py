"""BottleneckLayer on nn.Linear and GPT-2 Conv1D: exact forward, base_layer contract."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from istune.adapters import BottleneckConfig, BottleneckLayer

KINDS = ["series", "series_input", "parallel"]
ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "gelu": nn.functional.gelu,
               "silu": nn.functional.silu, "identity": lambda t: t}


def make_base(base_type: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(6, 10) if base_type == "linear" else Conv1D(10, 6)  # in 6, out 10


def make_layer(kind, base_type="linear", **overrides):
    config = BottleneckConfig(kind=kind, bottleneck_size=4, init="bert", **overrides)
    return BottleneckLayer(make_base(base_type), config)


@pytest.mark.parametrize("base_type", ["linear", "conv1d"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_forward_matches_manual_formula(kind, base_type, act):
    layer = make_layer(kind, base_type, non_linearity=act, scaling=0.7)
    x = torch.randn(3, 5, 6)
    w_down, w_up = layer.adapter_down.weight.T, layer.adapter_up.weight.T  # d x r, r x d
    f, s, base = ACTIVATIONS[act], 0.7, layer.base_layer
    if kind == "series":
        h = base(x)
        expected = h + s * f(h @ w_down) @ w_up
    elif kind == "series_input":
        expected = base(x + s * f(x @ w_down) @ w_up)
    else:
        expected = base(x) + s * f(x @ w_down) @ w_up
    torch.testing.assert_close(layer(x), expected)
    assert layer(x).shape == (3, 5, 10)


@pytest.mark.parametrize("base_type", ["linear", "conv1d"])
@pytest.mark.parametrize("kind", KINDS)
def test_base_layer_is_unadapted_and_suppression_is_computable(kind, base_type):
    layer = make_layer(kind, base_type)
    untouched = make_base(base_type)  # same seed: same weights as the wrapped base
    x = torch.randn(4, 6)
    assert torch.equal(layer.base_layer(x), untouched(x))
    beta = 0.25
    mixed = layer.base_layer(x) + beta * (layer(x) - layer.base_layer(x))
    layer.scaling = beta * layer.scaling  # affine base: scaling by beta is the same thing
    torch.testing.assert_close(layer(x), mixed)


@pytest.mark.parametrize("base_type", ["linear", "conv1d"])
@pytest.mark.parametrize("kind", KINDS)
def test_trainable_parameters_live_in_wrapper(kind, base_type):
    layer = make_layer(kind, base_type)
    assert layer.is_istune_adapter
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    trainable = {id(p) for p in layer.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in layer.adapter_parameters()}
    assert layer.weight is layer.base_layer.weight


@pytest.mark.parametrize("kind", KINDS)
def test_zero_up_init_starts_at_base(kind):
    layer = BottleneckLayer(make_base("linear"), BottleneckConfig(kind=kind, bottleneck_size=4))
    x = torch.randn(4, 6)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert layer.adapter_down.weight.abs().sum() > 0


def test_adapter_follows_base_dtype():
    base = nn.Linear(6, 10).to(torch.bfloat16)
    layer = BottleneckLayer(base, BottleneckConfig(kind="parallel", bottleneck_size=4))
    assert layer.adapter_up.weight.dtype == torch.bfloat16
    assert layer(torch.randn(2, 6, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_non_linear_base_is_rejected():
    with pytest.raises(TypeError, match="LayerNorm"):
        BottleneckLayer(nn.LayerNorm(6), BottleneckConfig())
