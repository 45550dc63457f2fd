"""Model configs without a download: the benchmarks' shapes, and ``istune plan``'s model lookup.

:data:`SHAPES` are the models the memory benchmarks measure (the paper's Table 1 models and small ones for
tests), as transformers configs: a step's memory depends on the tensors' sizes, not their values.
:func:`resolve_model_config` finds a config offline: ``smollm2-135m``, a local folder, the local Hugging Face
cache, :data:`BUILTIN_CONFIGS` (the published ``config.json`` sizes of the recipes' models) or a shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import transformers

__all__ = ["BUILTIN_CONFIGS", "PAPER_COLUMNS", "SHAPES", "Shape", "resolve_model_config"]

# The paper's Table 1 columns, in GB; None where the paper reports OOM.
PAPER_COLUMNS = ("weights", "full", "series", "parallel", "lora", "series+ist", "parallel+ist", "lora+ist")


@dataclass(frozen=True)
class Shape:
    """One model shape: its ``--shapes`` name, ``family`` (``gpt2`` or ``llama``), the config's ``sizes``, a
    one-line ``description`` and the ``paper``'s Table 1 row in GB keyed by ``PAPER_COLUMNS`` (or None)."""

    name: str
    family: str
    sizes: dict
    description: str
    paper: dict | None = field(default=None)

    @property
    def num_layers(self) -> int:
        return self.sizes["n_layer"] if self.family == "gpt2" else self.sizes["num_hidden_layers"]

    def config(self, attention: str = "sdpa", seq_len: int = 1024) -> transformers.PretrainedConfig:
        """The transformers config with ``attention``; GPT-2's ``n_positions`` raised to ``seq_len`` if shorter."""
        if self.family == "gpt2":
            sizes = {**self.sizes, "n_positions": max(self.sizes.get("n_positions", 1024), seq_len)}
            return transformers.GPT2Config(**sizes, attn_implementation=attention)
        return transformers.LlamaConfig(**self.sizes, attn_implementation=attention)


def _paper(*values: float | None) -> dict:
    return dict(zip(PAPER_COLUMNS, values))


_LLAMA_VOCAB = 32000

SHAPES: dict[str, Shape] = {
    shape.name: shape
    for shape in (
        Shape("gpt2-small", "gpt2", {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257},
              "GPT-2 small (GPT2Config defaults): 12 layers, hidden 768, vocab 50257, 124M parameters",
              _paper(0.4, 3.4, 2.5, 2.8, 2.9, 2.0, 2.1, 2.2)),
        Shape("tinyllama-1.1b", "llama",
              {"num_hidden_layers": 22, "hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32,
               "num_key_value_heads": 4, "vocab_size": _LLAMA_VOCAB},
              "TinyLLaMA 1.1B: 22 layers, hidden 2048, MLP 5632, 32 heads (4 KV heads), vocab 32000",
              _paper(2.2, 15.9, 9.6, 10.3, 10.5, 8.0, 8.3, 8.5)),
        Shape("llama-7b", "llama",
              {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
               "num_key_value_heads": 32, "vocab_size": _LLAMA_VOCAB},
              "LLaMA 7B: 32 layers, hidden 4096, MLP 11008, 32 heads, vocab 32000",
              _paper(14, 60, 22, 23, 24, 19, 20, 20)),
        Shape("llama-13b", "llama",
              {"num_hidden_layers": 40, "hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
               "num_key_value_heads": 40, "vocab_size": _LLAMA_VOCAB},
              "LLaMA 13B: 40 layers, hidden 5120, MLP 13824, 40 heads, vocab 32000",
              _paper(27, None, 38, 41, 42, 35, 36, 36)),
        # Small shapes for tests and for checking the meta device against a CPU run (--check).
        Shape("llama-12x768", "llama",
              {"num_hidden_layers": 12, "hidden_size": 768, "intermediate_size": 2048, "num_attention_heads": 12,
               "num_key_value_heads": 12, "vocab_size": _LLAMA_VOCAB},
              "LLaMA architecture, 12 layers x 768 (GPT-2 small's size; for CPU runs such as the 4-bit table)"),
        Shape("tiny-llama", "llama",
              {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 256},
              "tiny LLaMA (tests, --check): 4 layers, hidden 64, MLP 128, 4 heads (2 KV heads), vocab 256"),
        Shape("tiny-gpt2", "gpt2",
              {"n_layer": 4, "n_embd": 64, "n_head": 4, "vocab_size": 256, "bos_token_id": 0, "eos_token_id": 0},
              "tiny GPT-2 (tests, --check): 4 layers, hidden 64, 4 heads, vocab 256"),
    )
}


_LLAMA_1 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "vocab_size": 32000, "bos_token_id": 1,
            "eos_token_id": 2, "tie_word_embeddings": False}
_LLAMA_7B = {**_LLAMA_1, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32}
_LLAMA_13B = {**_LLAMA_1, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
              "num_attention_heads": 40, "num_key_value_heads": 40}

# hub id (as the recipes name it) -> config.json values
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "huggyllama/llama-7b": _LLAMA_7B,
    "yahma/llama-7b-hf": _LLAMA_7B,
    "huggyllama/llama-13b": _LLAMA_13B,
    "yahma/llama-13b-hf": _LLAMA_13B,
    "meta-llama/Meta-Llama-3-8B": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "vocab_size": 128256,
        "bos_token_id": 128000, "eos_token_id": 128001, "tie_word_embeddings": False},
    "Qwen/Qwen2.5-1.5B": {  # configs/compare/: the regime that fits one GPU-hour
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 1536,
        "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 151936,
        "bos_token_id": 151643, "eos_token_id": 151643, "tie_word_embeddings": True},
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": True},
}
_EMBEDDED = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _builtin(hub_id: str):
    from transformers import AutoConfig

    values = dict(BUILTIN_CONFIGS[hub_id])
    return AutoConfig.for_model(values.pop("model_type"), **values)


def resolve_model_config(name: str):
    """The transformers config of ``name`` and where it came from (one line for the output).

    Raises:
        ValueError: naming ``--model``, the value and what to give instead, when no config is found or read.
    """
    from transformers import AutoConfig

    from istune.models import MODEL_ALIASES, smollm2_cache_dir

    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"--model={name!r} is empty; give a hub id, a local folder with config.json, or "
                         f"'smollm2-135m'.")
    if name.lower() in MODEL_ALIASES:
        folder = smollm2_cache_dir()
        if (folder / "config.json").is_file():
            return AutoConfig.from_pretrained(folder), f"config: {folder / 'config.json'} (the embedded SmolLM2)"
        return _builtin(_EMBEDDED), f"config: built-in shape for {_EMBEDDED} (the embedded SmolLM2; no download)"
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model={name!r} is a path but holds no config.json; give the model's folder "
                             "(the one with config.json) or a hub id.")
        try:
            return AutoConfig.from_pretrained(path), f"config: {path / 'config.json'}"
        except (ValueError, OSError, KeyError, TypeError) as error:
            raise ValueError(f"--model={name!r}: its config.json cannot be read as a transformers config ({error}); "
                             "check that it is a causal language model's config.json.") from error
    cache_error = None
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True), f"config: {name} (local Hugging Face cache)"
    except (OSError, ValueError) as error:  # not cached (or not a valid id): fall back to the built-in shapes
        cache_error = error
    by_lower = {key.lower(): key for key in BUILTIN_CONFIGS}
    if name.lower() in by_lower:
        hub_id = by_lower[name.lower()]
        return _builtin(hub_id), (f"config: built-in shape for {hub_id} (not in the local Hugging Face cache; "
                                  "no download)")
    if name.lower() in SHAPES:
        shape = SHAPES[name.lower()]
        return shape.config(), f"config: benchmark shape {shape.name} ({shape.description})"
    raise ValueError(
        f"--model={name!r}: no config found offline (not a local folder, not in the local Hugging Face cache: "
        f"{str(cache_error).splitlines()[0] if cache_error else 'not found'}). Give a local folder holding the "
        f"model's config.json, fetch it once with `huggingface-cli download {name} config.json`, or use a built-in "
        f"shape: smollm2-135m, {', '.join(BUILTIN_CONFIGS)}, or a benchmark shape: {', '.join(SHAPES)}.")
