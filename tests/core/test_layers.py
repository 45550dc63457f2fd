"""Layer discovery by structure, on every family."""

import peft
import pytest

from istune import find_adapter_layers

from ..tiny_models import FAMILIES, peft_model, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_finds_every_layer_with_its_adapters(family):
    model = peft_model(family, "lora", num_layers=3)
    layers = find_adapter_layers(model)
    assert [layer.index for layer in layers] == [0, 1, 2]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    found = [p for layer in layers for p in layer.parameters]
    assert {id(p) for p in found} == trainable and len(found) == len(trainable)
    for layer in layers:
        block = model.get_submodule(layer.name)
        assert {id(m) for m in layer.adapters} == {id(m) for m in block.modules() if hasattr(m, "lora_A")}


def test_layers_without_adapters_are_not_counted():
    model = tiny_model("llama", num_layers=4)
    model = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj"], layers_to_transform=[1, 3]))
    assert [layer.index for layer in find_adapter_layers(model)] == [1, 3]


def test_layers_path_override_and_bad_path():
    model = peft_model("gpt2", "lora", num_layers=2)
    layers = find_adapter_layers(model, layers_path="base_model.model.transformer.h")
    assert len(layers) == 2
    with pytest.raises(ValueError, match="layers_path='transformer.blocks'.*candidate layer lists.*transformer.h"):
        find_adapter_layers(model, layers_path="transformer.blocks")


def test_model_without_adapters_lists_what_was_found():
    model = tiny_model("llama", num_layers=2)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"No adapter modules.*'model.layers' \(2x LlamaDecoderLayer, 0 adapters\)"):
        find_adapter_layers(model)


def test_adapters_only_outside_the_layers_is_refused():
    model = peft.get_peft_model(tiny_model("llama", num_layers=2), peft.LoraConfig(target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="trainable parameters: .*lm_head.lora_A"):
        find_adapter_layers(model)


def test_full_layer_tuning_without_adapters_uses_trainable_blocks():
    model = tiny_model("llama", num_layers=3)
    model.requires_grad_(False)
    model.model.layers.requires_grad_(True)
    layers = find_adapter_layers(model)
    assert len(layers) == 3 and all(not layer.adapters for layer in layers)
    assert sum(p.numel() for layer in layers for p in layer.parameters) == sum(
        p.numel() for p in model.model.layers.parameters())


def test_import_istune_loads_neither_peft_nor_transformers():
    """The core recognises peft layers without importing peft (and bitsandbytes, which prints on import)."""
    import subprocess
    import sys

    code = "import sys, istune; print(sorted(m for m in ('peft', 'transformers', 'bitsandbytes') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]" and out.stderr == ""
