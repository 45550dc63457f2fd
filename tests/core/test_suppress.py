"""Eq. 8 is exact: a suppressed adapter's layer outputs base + β·(adapted − base), for every method."""

import pytest
import torch

from istune.core.layers import find_adapter_layers
from istune.core.suppress import scales_linearly, suppress_adapters

from ..tiny_models import peft_model, tiny_model

METHODS = ["lora", "dora", "adalora", "ia3", "bottleneck"]


def _module_inputs(model, modules, input_ids):
    """Record each adapter module's input during one forward."""
    inputs = {}

    def record(module, args, output):
        inputs[id(module)] = args[0].detach()

    hooks = [m.register_forward_hook(record) for m in modules]
    with torch.no_grad():
        model(input_ids=input_ids)
    for hook in hooks:
        hook.remove()
    return inputs


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_each_suppressed_module_equals_direct_computation(family, method):
    model = peft_model(family, method, num_layers=2).eval()
    modules = [m for layer in find_adapter_layers(model) for m in layer.adapters]
    assert modules
    inputs = _module_inputs(model, modules, torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0)))
    beta = 0.25
    with torch.no_grad():
        for module in modules:
            x = inputs[id(module)]
            adapted, base = module(x), module.base_layer(x)
            assert not torch.allclose(adapted, base), (
                "the adapter must change the output for the test to mean anything")
            with suppress_adapters([module], beta):
                suppressed = module(x)
            torch.testing.assert_close(suppressed, base + beta * (adapted - base), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(module(x), adapted, rtol=0, atol=0)  # restored


@pytest.mark.parametrize("method", METHODS)
def test_beta_zero_on_every_layer_gives_the_base_model(method):
    model = peft_model("llama", method, num_layers=2).eval()
    input_ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    modules = [m for layer in find_adapter_layers(model) for m in layer.adapters]
    with torch.no_grad():
        adapted = model(input_ids=input_ids).logits
        with suppress_adapters(modules, 0.0):
            suppressed = model(input_ids=input_ids).logits
        base = tiny_model("llama", num_layers=2)(input_ids=input_ids).logits  # the same weights, no adapters
    assert not torch.allclose(adapted, base)
    torch.testing.assert_close(suppressed, base, rtol=1e-5, atol=1e-5)


def test_lora_takes_the_scaling_path_and_dora_the_general_one():
    lora = [m for layer in find_adapter_layers(peft_model("llama", "lora")) for m in layer.adapters]
    dora = [m for layer in find_adapter_layers(peft_model("llama", "dora")) for m in layer.adapters]
    assert all(scales_linearly(m) for m in lora)
    assert not any(scales_linearly(m) for m in dora)


def test_attention_scaling_is_never_touched():
    model = peft_model("llama", "lora", num_layers=2).eval()
    attention = model.base_model.model.model.layers[0].self_attn
    before = attention.scaling
    modules = [m for layer in find_adapter_layers(model) for m in layer.adapters]
    with suppress_adapters(modules, 0.25):
        assert attention.scaling == before
        assert modules[0].scaling["default"] == pytest.approx(0.25 * 2.0)
    assert modules[0].scaling["default"] == pytest.approx(2.0)


def test_merged_adapter_is_refused():
    model = peft_model("llama", "lora", num_layers=2)
    model.merge_adapter()
    modules = [m for layer in find_adapter_layers(model) for m in layer.adapters]
    with pytest.raises(ValueError, match="merged"):
        with suppress_adapters(modules, 0.25):
            pass
