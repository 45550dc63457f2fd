"""Model shapes for memory benchmarks (the paper's Table 1 models, as configs: random weights, no download),
and the rows of the memory table (a PEFT method, trained plainly or with IST options).

A shape is a transformers config and nothing else: the memory of a training step depends
on the sizes of the tensors, not on their values, so a randomly initialised model (on the
meta device, even: no memory at all) measures the same as the pretrained one.

Example::

    config = SHAPES["llama-7b"].config(attention="sdpa", seq_len=1024)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import transformers

__all__ = ["MAIN_KEYS", "PAPER_COLUMNS", "SHAPES", "Shape", "VARIANTS", "Variant"]

# The paper's Table 1 columns, in GB; None where the paper reports OOM.
PAPER_COLUMNS = ("weights", "full", "series", "parallel", "lora", "series+ist", "parallel+ist", "lora+ist")


@dataclass(frozen=True)
class Shape:
    """One model shape.

    Attributes:
        name: the name used on the command line (``--shapes``).
        family: ``"gpt2"`` or ``"llama"`` (which transformers config class).
        sizes: keyword arguments of the config (layer count, widths, heads, vocabulary).
        description: one line for tables.
        paper: the paper's Table 1 row in GB, keyed by ``PAPER_COLUMNS`` (None for shapes it has no row for).
    """

    name: str
    family: str
    sizes: dict
    description: str
    paper: Optional[dict] = field(default=None)

    @property
    def num_layers(self) -> int:
        return self.sizes["n_layer"] if self.family == "gpt2" else self.sizes["num_hidden_layers"]

    def config(self, attention: str = "sdpa", seq_len: int = 1024) -> transformers.PretrainedConfig:
        """The transformers config of this shape, with ``attention`` as its attention implementation.

        GPT-2 has learned positions: ``n_positions`` is raised to ``seq_len`` when that is longer.
        """
        if self.family == "gpt2":
            sizes = {**self.sizes, "n_positions": max(self.sizes.get("n_positions", 1024), seq_len)}
            return transformers.GPT2Config(**sizes, attn_implementation=attention)
        return transformers.LlamaConfig(**self.sizes, attn_implementation=attention)


def _paper(*values: Optional[float]) -> dict:
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


# ---- the rows of the memory table (istune.bench.memory_table) -----------------------------


@dataclass(frozen=True)
class Variant:
    """One run per shape: a method, trained plainly or sparsely.

    Attributes:
        key: short name in the JSON (``"lora+ist"``).
        label: name in the tables.
        method: ``full``, ``series``, ``parallel``, ``lora`` or ``lisa``.
        ist: None to train every layer (no tuner); else ISTConfig keyword arguments.
        baseline: key of the run this one's ratio is taken against.
        checkpointing: transformers' gradient checkpointing on (non-reentrant), set up as the Trainer does
            for a peft model (``enable_input_require_grads``); with IST it is IST-aware (istune.core.checkpointing).
    """

    key: str
    label: str
    method: str
    ist: Optional[dict] = None
    baseline: Optional[str] = None
    checkpointing: bool = False


# The rows, in table order. Extra ISTConfig options are just more rows: a row whose options
# ISTConfig does not have is skipped (and listed as skipped in the output).
# Full + IST draws uniformly ('random'): at zero importance that is what 'ist' draws too, and
# 'ist' on whole layers keeps a CPU copy of their initial weights, which the meta device cannot make.
VARIANTS: tuple[Variant, ...] = (
    Variant("full", "Full", "full"),
    Variant("full+ist", "Full + IST", "full", {"strategy": "random"}, "full"),
    Variant("series", "Series", "series"),
    Variant("series+ist", "Series + IST", "series", {}, "series"),
    Variant("parallel", "Parallel", "parallel"),
    Variant("parallel+ist", "Parallel + IST", "parallel", {}, "parallel"),
    Variant("lora", "LoRA", "lora"),
    Variant("lora+ist", "LoRA + IST", "lora", {}, "lora"),
    Variant("lisa", "LISA", "lisa", {}, "full"),
    Variant("lora+ist:recompute", "LoRA + IST, recompute unselected", "lora", {"recompute_unselected": True}, "lora"),
    Variant("lora+ist:drop", "LoRA + IST, drop unselected state", "lora", {"unselected_optimizer_state": "drop"},
            "lora"),
    Variant("lora+ist:recompute+drop", "LoRA + IST, recompute + drop", "lora",
            {"recompute_unselected": True, "unselected_optimizer_state": "drop"}, "lora"),
    Variant("lora:ckpt", "LoRA + gradient checkpointing", "lora", None, "lora", checkpointing=True),
    Variant("lora+ist:ckpt", "LoRA + IST + gradient checkpointing", "lora", {}, "lora", checkpointing=True),
    Variant("full+ist:drop", "Full + IST, drop unselected state", "full",
            {"strategy": "random", "unselected_optimizer_state": "drop"}, "full"),
    Variant("full+ist:recompute+drop", "Full + IST, recompute + drop", "full",
            {"strategy": "random", "recompute_unselected": True, "unselected_optimizer_state": "drop"}, "full"),
)
MAIN_KEYS = ("full", "full+ist", "series", "series+ist", "parallel", "parallel+ist", "lora", "lora+ist", "lisa")
