"""Layer discovery beyond plain decoders: VLMs find the language model's layers (never the vision tower's), hybrid
models (Jamba, Zamba2) a list of several block classes; and the errors when no list, or the wrong one, is named."""

import logging

import peft
import pytest
import torch
import transformers as tf
from torch import nn

from istune import ISTConfig, SparseTuner, find_adapter_layers
from istune.core.layers import prepare_full_layer_tuning

_TOKENS = {"vocab_size": 100, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, **_TOKENS}
_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "image_size": 28, "patch_size": 14}


def _mllama():
    """Llama 3.2 Vision: 2+1 vision encoder layers, 3 text layers of which layer 1 is a cross-attention layer."""
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_global_layers": 1,
              "attention_heads": 4, "image_size": 28, "patch_size": 14, "vision_output_dim": 64,
              "intermediate_layers_indices": [0], "max_num_tiles": 1, "supported_aspect_ratios": [[1, 1]]}
    config = tf.MllamaConfig(vision_config=vision, text_config={**_TEXT, "cross_attention_layers": [1]})
    return tf.MllamaForConditionalGeneration(config)


def _jamba():
    """Attention blocks at 1 and 3, Mamba blocks (PyTorch path, no kernels) at 0 and 2."""
    return tf.JambaForCausalLM(tf.JambaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2,
        mamba_d_state=4, mamba_expand=2, mamba_dt_rank=4, use_mamba_kernels=False, **_TOKENS))


def _zamba2():
    """Mamba blocks at 0 and 2, hybrid blocks (Mamba + a transformer block with tied weights) at 1 and 3."""
    return tf.Zamba2ForCausalLM(tf.Zamba2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, mamba_d_state=4,
        mamba_headdim=8, mamba_ngroups=1, n_mamba_heads=8, layers_block_type=["mamba", "hybrid"] * 2,
        hybrid_layer_ids=[1, 3], num_mem_blocks=1, use_mem_rope=False, **_TOKENS))


def _llava():
    return tf.LlavaForConditionalGeneration(tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(**_VISION), text_config=tf.LlamaConfig(**_TEXT), image_token_index=99))


def _idefics3():
    return tf.Idefics3ForConditionalGeneration(tf.Idefics3Config(
        vision_config=_VISION, text_config=tf.LlamaConfig(**_TEXT), scale_factor=2))


# name: (builder, the decoder list under the peft wrapper, its block classes)
ARCHITECTURES = {
    "mllama": (_mllama, "base_model.model.model.language_model.layers",
               {"MllamaSelfAttentionDecoderLayer", "MllamaCrossAttentionDecoderLayer"}),
    "jamba": (_jamba, "base_model.model.model.layers", {"JambaAttentionDecoderLayer", "JambaMambaDecoderLayer"}),
    "zamba2": (_zamba2, "base_model.model.model.layers", {"Zamba2MambaDecoderLayer", "Zamba2HybridLayer"}),
    "llava": (_llava, "base_model.model.model.language_model.layers", {"LlamaDecoderLayer"}),
    "idefics3": (_idefics3, "base_model.model.model.text_model.layers", {"LlamaDecoderLayer"}),
}


def _lora(model, target_modules="all-linear"):
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False)
    return peft.get_peft_model(model, config).train()


def _build(name):
    torch.manual_seed(0)
    return ARCHITECTURES[name][0]()


def _batch(model, seed):
    """Token ids and labels; for Mllama also one 1-tile image that every text position attends to."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (2, 6), generator=generator)
    batch = {"input_ids": ids, "labels": ids}
    if isinstance(model.get_base_model(), tf.MllamaForConditionalGeneration):
        batch |= {"pixel_values": torch.randn(2, 1, 1, 3, 28, 28, generator=generator),
                  "aspect_ratio_ids": torch.ones(2, 1, dtype=torch.long),
                  "aspect_ratio_mask": torch.ones(2, 1, 1, dtype=torch.long),
                  "cross_attention_mask": torch.ones(2, 6, 1, 1, dtype=torch.long)}
    return batch


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_discovery_finds_the_language_models_layers(name):
    model = _lora(_build(name))
    layers = find_adapter_layers(model)
    _, path, classes = ARCHITECTURES[name]
    assert len(layers) == model.config.get_text_config(decoder=True).num_hidden_layers
    assert [layer.name for layer in layers] == [f"{path}.{j}" for j in range(len(layers))]
    assert {type(layer.block).__name__ for layer in layers} == classes
    assert all(layer.adapters for layer in layers)


# Jamba's Mamba mixer multiplies by dt_proj.weight itself, bypassing a LoRA there (it would never train): the
# names of Jamba's model card instead.
JAMBA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "x_proj", "out_proj", "gate_proj", "up_proj",
                 "down_proj"]


@pytest.mark.parametrize("name", ["mllama", "jamba"])
def test_only_the_selected_layer_changes(name):
    model = _lora(_build(name), JAMBA_TARGETS if name == "jamba" else "all-linear")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    tuner = SparseTuner(model, ISTConfig(strategy="ist", update_layers=1, probe_interval=2), optimizer=optimizer)
    trained = set()
    for step in range(3):
        before = [[p.detach().clone() for p in layer.parameters] for layer in tuner.layers]
        selected = tuner.begin_step()
        model(**_batch(model, step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tuner.end_step(probe_batch=_batch(model, 100 + step))
        assert len(selected) == 1
        for j, (old, layer) in enumerate(zip(before, tuner.layers)):
            moved = [not torch.equal(a, b) for a, b in zip(old, layer.parameters)]
            assert all(moved) if j in selected else not any(moved), f"step {step}: layer {j}, selected {selected}"
        trained |= {type(tuner.layers[j].block).__name__ for j in selected}
    assert trained == ARCHITECTURES[name][2]  # (seeded) each kind of block was selected and trained
    tuner.close()


def test_full_layer_tuning_of_a_vlm_trains_the_language_models_layers():
    model = prepare_full_layer_tuning(_build("mllama"))
    trainable = {n.split(".layers.")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.language_model"}
    assert len(find_adapter_layers(model)) == 3


def test_the_vision_tower_is_named_once_in_plain_words(caplog):
    model = _lora(_build("mllama"))
    with caplog.at_level(logging.WARNING, logger="istune"):
        SparseTuner(model, ISTConfig(strategy="random", update_layers=1)).close()
    tower = [r.message for r in caplog.records if "vision tower" in r.message]
    assert len(tower) == 1
    assert tower[0].startswith("IST: the vision tower's adapters ('base_model.model.model.vision_model', ")
    assert "train at every step, outside the selection" in tower[0]
    assert "LISA" not in caplog.text


# ---- models without a transformers config ---------------------------------------------------------


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.proj(x)


class _Gate(_Block):
    """A second block class (as Jamba's Mamba blocks beside its attention blocks)."""


class _HybridNoConfig(nn.Module):
    """No transformers config: discovery falls back to the list with the most adapters, of whatever classes."""

    def __init__(self):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(8) for _ in range(3)])
        self.blocks = nn.ModuleList([_Block(), _Gate(), _Block()])


def test_without_a_config_a_list_of_several_block_classes_is_found():
    model = peft.get_peft_model(_HybridNoConfig(), peft.LoraConfig(target_modules=["proj"]))
    assert [layer.name for layer in find_adapter_layers(model)] == [f"base_model.model.blocks.{j}" for j in range(3)]


# ---- bad input -----------------------------------------------------------------------------------


class _SequentialBlocks(nn.Module):
    """No transformers config, and its blocks in an nn.Sequential: discovery cannot tell which list they are."""

    def __init__(self):
        super().__init__()
        self.embed, self.blocks, self.head = nn.Embedding(100, 8), nn.Sequential(_Block(), _Block()), nn.Linear(8, 100)


def test_no_layer_list_names_the_lists_seen_and_the_layers_path_to_set():
    model = peft.get_peft_model(_SequentialBlocks(), peft.LoraConfig(target_modules=["proj"]))
    message = (r"No list of decoder layers found in PeftModel: .*lists seen: 'base_model.model.blocks' "
               r"\(2x _Block, 2 adapters\); set ISTConfig.layers_path .* "
               r"\(e.g. layers_path='base_model.model.blocks'\)")
    with pytest.raises(ValueError, match=message):
        find_adapter_layers(model)
    assert len(find_adapter_layers(model, layers_path="base_model.model.blocks")) == 2


def test_layers_path_without_trainable_adapters_names_the_lists_that_have_them():
    model = _lora(_build("mllama"), target_modules=r".*language_model.*\.(q_proj|v_proj)")
    vision = "base_model.model.model.vision_model.transformer.layers"
    message = (rf"ISTConfig.layers_path='{vision}' names a layer list with no trainable adapters "
               r"\(2x MllamaVisionEncoderLayer, 0 adapters\); the layer lists that have them: "
               r"'base_model.model.model.language_model.layers' \(2x MllamaSelfAttentionDecoderLayer \+ "
               r"1x MllamaCrossAttentionDecoderLayer, 6 adapters\)")
    with pytest.raises(ValueError, match=message):
        find_adapter_layers(model, layers_path=vision)


def test_adapters_only_in_the_vision_tower_are_not_taken_for_the_decoder_layers():
    model = _lora(_build("mllama"), target_modules=r".*vision_model.*\.(q_proj|v_proj)")
    vision = "base_model.model.model.vision_model.transformer.layers"
    message = (r"No trainable parameters inside the language model's decoder layers "
               r"'base_model.model.model.language_model.layers' .*0 adapters\); the layer lists that have them: "
               rf"'{vision}' \(2x MllamaVisionEncoderLayer, 4 adapters\).*set ISTConfig.layers_path='{vision}'")
    with pytest.raises(ValueError, match=message):
        find_adapter_layers(model)
    assert len(find_adapter_layers(model, layers_path=vision)) == 2
