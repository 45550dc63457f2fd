"""Build a tiny random model of every text-generation and image-text-to-text type in the installed transformers,
put LoRA on all its linear layers and check IST on it: what tests/matrix/test_architectures.py asserts and
scripts/architecture_matrix.py tabulates into docs/models.md.

A tiny model is the config class's defaults shrunk by :data:`SMALL` (each key the config has), in every sub-config
(text, vision, audio ...), plus :data:`OVERRIDES` per type where the generic shrink is not enough. The batch is
text, plus :data:`IMAGE_INPUTS` for the types whose forward needs more (an image, a decoder input).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass

import peft
import torch
import transformers as tf
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

from istune import ISTConfig, SparseTuner, find_adapter_layers
from istune.core.suppress import suppress_adapters

VOCAB = 128
SMALL = {
    "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "vocab_size": VOCAB, "max_position_embeddings": 128,
    "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16, "num_experts": 4, "num_local_experts": 4,
    "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8,
    "layer_types": None, "image_size": 28, "patch_size": 14, "depth": 2, "num_layers": 2, "rotary_dim": 4,
    "mamba_n_heads": 8, "mamba_d_head": 8, "mamba_d_state": 8,
    # encoder-decoder types (BART ...), whose causal LM is the decoder
    "d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
}
TYPES = sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES))
IMAGE_TOKEN = VOCAB - 1  # the image placeholder token, where a type's tiny config needs one set
# M-RoPE (Qwen2-VL, GLM-4V): the modeling code's default sections, for the real head_dim, must sum to the tiny
# rotary half-dimension (head_dim 8: 4)
MROPE = {"text_config": {"rope_parameters": {"mrope_section": [2, 1, 1]}}}
# per type: config keyword arguments beyond the generic shrink (None: the key is left at its default); a dict is
# merged into the generic one key by key (a sub-config's dict, its rope parameters).
OVERRIDES: dict[str, dict] = {
    **dict.fromkeys(["qwen2_vl", "qwen2_5_vl", "qwen2_5_omni_thinker", "paddleocr_vl", "glm4v", "glm46v", "glm_ocr",
                     "glmga"], MROPE),
    # partial rotary factor 0.5: head_dim 16 for a rotary half of 4
    "glm4v_moe": {"text_config": {"head_dim": 16, "rope_parameters": {"mrope_section": [2, 1, 1]}}},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "mamba2": {"num_heads": 8},
    # multi-head latent attention: keys and values have one head per query head
    **dict.fromkeys(["axk2", "deepseek_v32", "glm_moe_dsa"], {"num_key_value_heads": 4}),
    "mistral_large4": {"text_config": {"num_key_value_heads": 4}},
    # num_hidden_layers is 2 x num_layers (two attention sublayers a block): 2 blocks, not 1 block whose inner
    # lists of 2 sublayers' MLPs match num_hidden_layers
    # hybrid linear-attention models: the layer types derived for 2 layers have no attention layer, which the
    # cache's sequence length needs
    **dict.fromkeys(["minicpm_ocr", "minicpmv4_6", "minicpmv4_7"],
                    {"text_config": {"layer_types": ["linear_attention", "full_attention"]}}),
    "lfm3_vl": {"text_config": {"layer_types": ["conv", "full_attention"]}},
    "hunyuan_vl": {"text_config": {"rope_parameters": {"mrope_section": [1, 1, 1, 1]}}},  # no default sections
    "step3p7": {"text_config": {"sliding_window": 4}},  # its sliding layers need one
    "diffusion_gemma": {"text_config": {"top_k_experts": 2}},  # the router needs one
    # BLIP-2's and Kosmos-2's query tokens, placed in the text (IMAGE_INPUTS)
    **dict.fromkeys(["blip-2", "instructblip"], {"num_query_tokens": 2, "image_token_index": IMAGE_TOKEN}),
    "instructblipvideo": {"num_query_tokens": 2, "video_token_index": IMAGE_TOKEN},
    "kosmos-2": {"latent_query_num": 2},
    # a gated cross-attention block every 2 layers (a real model's 4): with one a layer, that list of as many
    # (heavier) blocks is taken for the decoder layers
    "idefics": {"cross_layer_interval": 2},
    "xmod": {"default_language": "en_XX"},  # its adapters need a language
    "longcat_flash": {"num_hidden_layers": 4, "head_dim": 4},  # head_dim: the rotary part
    "zamba2": {"num_hidden_layers": 4, "layers_block_type": ["mamba", "hybrid"] * 2, "hybrid_layer_ids": [1, 3],
               "num_mem_blocks": 1, "use_mem_rope": False, "mamba_headdim": 8, "mamba_ngroups": 1,
               "n_mamba_heads": 8, "num_key_value_heads": 4},
}
# per type: the text config's attribute counting the decoder layers, where num_hidden_layers counts otherwise
LAYER_COUNT = {"longcat_flash": "num_layers"}
TOKENS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")


@dataclass
class Result:
    type: str
    status: str  # "pass", "fail", "not buildable"
    layers: int | None = None
    reason: str = ""
    seconds: float = 0.0


def model_class(model_type: str) -> type:
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) or MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type]
    return getattr(tf, name)


def tiny_config(config_class: type, overrides: dict | None = None) -> tf.PreTrainedConfig:
    """``config_class`` with its defaults shrunk: every key of :data:`SMALL` it has, in every sub-config too."""
    defaults = config_class()
    accepted = set(inspect.signature(config_class.__init__).parameters) | set(vars(defaults))
    kwargs = {key: value for key, value in SMALL.items() if (key in accepted or _get(defaults, key) is not None)
              and _same_kind(_get(defaults, key), value)}
    if "kv_lora_rank" in kwargs:  # multi-head latent attention: its head_dim is the rotary part
        kwargs.pop("head_dim", None)
    rope = getattr(defaults, "rope_parameters", None)
    if isinstance(rope, dict) and rope.get("mrope_section"):  # Qwen2-VL's M-RoPE splits the rotary half-dims
        old_head = getattr(defaults, "head_dim", None) or defaults.hidden_size // defaults.num_attention_heads
        total = max(round(sum(rope["mrope_section"]) * SMALL["head_dim"] / old_head), 1)
        kwargs["rope_parameters"] = {**rope, "mrope_section": [total - 2 * (total // 3), total // 3, total // 3]}
    for name in (getattr(config_class, "sub_configs", None) or {}):
        sub_default = getattr(defaults, name, None)
        if isinstance(sub_default, tf.PreTrainedConfig):
            kwargs[name] = tiny_config(type(sub_default)).to_dict()
    for key in TOKENS:  # ids past the shrunk vocabulary would index outside the embeddings
        value = getattr(defaults, key, None)
        if "vocab_size" in kwargs and isinstance(value, int) and value >= VOCAB:
            kwargs[key] = min(value, 2)
    _merge(kwargs, overrides or {})
    return config_class(**{k: v for k, v in kwargs.items() if v is not None or k in accepted})


def _merge(kwargs: dict, overrides: dict) -> None:
    """``overrides`` into ``kwargs``, a dict into a dict key by key (a sub-config's, its rope parameters)."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(kwargs.get(key), dict):
            _merge(kwargs[key], value)
        else:
            kwargs[key] = value


def _get(config, key):
    try:
        return getattr(config, key, None)
    except Exception:  # noqa: BLE001 - Gemma 4's per-layer attributes refuse a global read
        return None


def _same_kind(default, value) -> bool:
    """Whether ``value`` may replace ``default``: both numbers, or the default unset (not a list for an int)."""
    return default is None or value is None or isinstance(default, (int, float)) == isinstance(value, (int, float))


def build(model_type: str) -> torch.nn.Module:
    """A tiny random model of ``model_type`` with LoRA (r=4, B randomised) on all its linear layers, train mode."""
    model_cls = model_class(model_type)
    torch.manual_seed(0)
    model = model_cls(tiny_config(model_cls.config_class, OVERRIDES.get(model_type)))
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return peft.get_peft_model(model, config).train()


def text_layers(model: torch.nn.Module) -> int:
    config = model.get_base_model().config
    return getattr(config.get_text_config(decoder=True), LAYER_COUNT.get(config.model_type, "num_hidden_layers"))


def _image(config, *shape: int) -> torch.Tensor:
    """A random image batch of ``shape`` then 3 x size x size, the size of the vision config's images."""
    vision = getattr(config, "vision_config", None) or getattr(config, "encoder", None) or config
    size = getattr(vision, "image_size", 28)
    size = size if isinstance(size, int) else size[0]
    return torch.randn(*shape, 3, size, size, generator=torch.Generator().manual_seed(0))


def _placeholders(ids: torch.Tensor, token: int, count: int = 2) -> torch.Tensor:
    """``ids`` starting with ``count`` image placeholder tokens (OVERRIDES sets 2 query tokens)."""
    ids = ids.clone()
    ids[:, :count] = token
    return ids


def _blip2(config, ids: torch.Tensor) -> dict:
    return {"pixel_values": _image(config, len(ids)), "input_ids": _placeholders(ids, IMAGE_TOKEN)}


def _kosmos2(config, ids: torch.Tensor) -> dict:
    mask = torch.zeros_like(ids)
    mask[:, 1:3] = 1  # after the BOS: the latent queries' positions
    return {"pixel_values": _image(config, len(ids)), "image_embeds_position_mask": mask}


# per config type: the inputs beyond the text that its forward needs (a tiny image, the image placeholders in the
# text ...), from the config and the input ids; "input_ids" replaces the text (and the labels, unless "labels" is
# given too), None drops it
IMAGE_INPUTS: dict[str, Callable[[tf.PreTrainedConfig, torch.Tensor], dict]] = {
    "blip": lambda config, ids: {"pixel_values": _image(config, len(ids))},
    "blip-2": _blip2,
    "instructblip": lambda config, ids: {**_blip2(config, ids), "qformer_input_ids": ids},
    "instructblipvideo": lambda config, ids: {"pixel_values": _image(config, len(ids), 1), "qformer_input_ids": ids,
                                              "input_ids": _placeholders(ids, IMAGE_TOKEN)},
    "kosmos-2": _kosmos2,
    "idefics": lambda config, ids: {"pixel_values": _image(config, len(ids), 1),
                                    "image_attention_mask": torch.ones(*ids.shape, 1, dtype=torch.long)},
    # MusicGen (its causal LM's config type): a row of token ids a codebook, labels batch x positions x codebooks
    **dict.fromkeys(["musicgen_decoder", "musicgen_melody_decoder"], lambda config, ids: {
        "input_ids": ids.repeat_interleave(config.num_codebooks, 0),
        "labels": ids.unsqueeze(-1).expand(-1, -1, config.num_codebooks)}),
    "t5gemma2": lambda config, ids: {"decoder_input_ids": ids},  # the logits compared need a decoder input
    "vision-encoder-decoder": lambda config, ids: {"pixel_values": _image(config, len(ids)), "input_ids": None,
                                                   "decoder_input_ids": ids},
}


def _batch(seed: int, model: torch.nn.Module | None = None) -> dict:
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
    config = model.get_base_model().config if model is not None else None
    extra = IMAGE_INPUTS.get(getattr(config, "model_type", None))
    batch = {"input_ids": ids, **(extra(config, ids) if extra else {})}
    labels = batch.pop("labels", ids if batch["input_ids"] is None else batch["input_ids"])
    return {**{key: value for key, value in batch.items() if value is not None}, "labels": labels}


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    torch.manual_seed(0)  # the same draws in every forward compared (Diffusion Gemma samples its decoder input)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    return model(**inputs, use_cache=False).logits.float()


def check(model: torch.nn.Module) -> int:
    """The checks of one model; returns the number of layers found. Raises AssertionError on a broken guarantee."""
    layers = find_adapter_layers(model)
    expected = text_layers(model)
    assert len(layers) == expected, f"found {len(layers)} layers, the text config has {expected}"
    batch = _batch(7, model)
    modules = [m for layer in layers for m in layer.adapters]
    outside = [m for m in model.modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)
               and all(m is not n for n in modules)]  # e.g. a BERT LM head's dense: trains at every step, unsuppressed
    model.eval()
    for module in outside:
        module.enable_adapters(False)
    with torch.no_grad():
        adapted = _logits(model, batch)
        with suppress_adapters(modules, 0.0):
            suppressed = _logits(model, batch)
        with model.disable_adapter():  # (enables every adapter on leaving)
            base = _logits(model, batch)
    model.train()
    assert (adapted - base).abs().max() > 1e-4, "the adapters do not change the output"
    error = (suppressed - base).abs().max().item()
    assert error <= 1e-5, f"β=0 differs from the adapters-off output by {error:.2g}"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    tuner = SparseTuner(model, ISTConfig(strategy="ist", update_layers=1, probe_interval=3, seed=0),
                        optimizer=optimizer)
    updates = 0
    for step in range(6):
        before = [[p.detach().clone() for p in layer.parameters] for layer in tuner.layers]
        selected = tuner.begin_step()
        model(**_batch(step, model), use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        updates += tuner.end_step(probe_batch=_batch(100 + step, model)) is not None
        for j, (old, layer) in enumerate(zip(before, tuner.layers)):
            moved = [not torch.equal(a, b) for a, b in zip(old, layer.parameters)]
            if j in selected:
                assert any(moved), f"step {step}: selected layer {j} did not train"
            else:
                assert not any(moved), f"step {step}: layer {j} trained, not selected ({selected})"
    assert updates == 2, f"{updates} importance updates in 6 steps, expected 2"
    tuner.close()
    return len(layers)


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines()]
    line = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{type(error).__name__}: {line}"[:240]


def run(model_type: str) -> Result:
    started = time.perf_counter()
    try:
        model = build(model_type)
    except Exception as error:  # noqa: BLE001 - every reason is reported
        return Result(model_type, "not buildable", reason=first_line(error), seconds=time.perf_counter() - started)
    try:
        layers = check(model)
    except Exception as error:  # noqa: BLE001
        return Result(model_type, "fail", reason=first_line(error), seconds=time.perf_counter() - started)
    return Result(model_type, "pass", layers, seconds=time.perf_counter() - started)
