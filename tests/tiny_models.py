"""Tiny random causal LMs of each family, built from configs (no download)."""

from __future__ import annotations

import torch
import transformers as tf

_SMALL = {"hidden_size": 32, "num_attention_heads": 4, "vocab_size": 100}
_LLAMA_LIKE = {**_SMALL, "intermediate_size": 64, "num_key_value_heads": 2}

# Each builder takes the number of decoder layers (N_L).
TINY_CONFIGS = {
    "llama": lambda n=2: tf.LlamaConfig(num_hidden_layers=n, **_LLAMA_LIKE),
    "qwen2": lambda n=2: tf.Qwen2Config(num_hidden_layers=n, **_LLAMA_LIKE),
    "mistral": lambda n=2: tf.MistralConfig(num_hidden_layers=n, **_LLAMA_LIKE),
    "gemma": lambda n=2: tf.GemmaConfig(num_hidden_layers=n, **_LLAMA_LIKE, head_dim=8),
    "gpt2": lambda n=2: tf.GPT2Config(n_layer=n, n_embd=32, n_head=4, vocab_size=100,
                                      bos_token_id=0, eos_token_id=0),
    "opt": lambda n=2: tf.OPTConfig(num_hidden_layers=n, **_SMALL, ffn_dim=64, word_embed_proj_dim=32),
    "gpt_neox": lambda n=2: tf.GPTNeoXConfig(num_hidden_layers=n, **_SMALL, intermediate_size=64),
    "bloom": lambda n=2: tf.BloomConfig(n_layer=n, hidden_size=32, n_head=4, vocab_size=100),
    "gptj": lambda n=2: tf.GPTJConfig(n_layer=n, n_embd=32, n_head=4, rotary_dim=4, vocab_size=100),
    "phi": lambda n=2: tf.PhiConfig(num_hidden_layers=n, **_SMALL, intermediate_size=64),
}
FAMILIES = list(TINY_CONFIGS)

# Whether this transformers takes a boolean ``logits_to_keep`` mask (padded rows' labelled logits): 5.6-5.17
# index the hidden states with it, ``[:, logits_to_keep]``, and raise IndexError (positions work in both).
TAKES_LOGIT_MASKS = hasattr(tf.modeling_utils, "slice_logits_to_keep")

# The families every behaviour is checked on (GPT-2 covers Conv1D); the rest get smoke tests.
CORE_FAMILIES = ["llama", "gpt2", "opt", "gpt_neox"]
KINDS = ["series", "series_input", "parallel"]


def tiny_model(family: str, seed: int = 0, num_layers: int = 2) -> torch.nn.Module:
    """A random tiny causal LM of ``family`` with ``num_layers`` layers, in eval mode; same seed -> same weights."""
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(TINY_CONFIGS[family](num_layers)).eval()


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


PEFT_METHODS = ["lora", "dora"]


def peft_model(family: str, method: str = "lora", num_layers: int = 4, seed: int = 0) -> torch.nn.Module:
    """A tiny model of ``family`` with adapters of ``method`` on every linear layer of every block, in train mode.

    LoRA B matrices are randomised so that adapters change the output from the start
    (peft initialises B to zero); every adapter parameter is trainable.
    """
    import peft

    model = tiny_model(family, seed=seed, num_layers=num_layers)
    if method == "bottleneck":
        from istune.adapters import BottleneckConfig, add_bottleneck_adapters

        model = add_bottleneck_adapters(model, BottleneckConfig(kind="parallel", bottleneck_size=8, init="bert"))
        return model.train()
    configs = {
        "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
        "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True,
                                        init_lora_weights=False),
        "adalora": lambda: peft.AdaLoraConfig(init_r=4, target_r=2, target_modules="all-linear", total_step=20,
                                              tinit=2, tfinal=2, deltaT=1, init_lora_weights=False),
        "ia3": lambda: peft.IA3Config(target_modules="all-linear", feedforward_modules=[], init_ia3_weights=False),
    }
    torch.manual_seed(seed + 1)
    return peft.get_peft_model(model, configs[method]()).train()


QUANTIZATIONS = ["4bit", "8bit"]


def quantized_peft_model(directory, bits: str, method: str = "lora", num_layers: int = 3,
                         seed: int = 0) -> torch.nn.Module:
    """A tiny LLaMA loaded in bitsandbytes ``bits`` ('4bit': nf4, '8bit': LLM.int8), LoRA/DoRA on every linear layer.

    bitsandbytes' CPU 4-bit kernels need at least 64 input features, so the model is wider than
    :func:`tiny_model`'s; its float weights are saved to ``directory`` once (same seed, same weights).
    Loaded as ``istune train`` loads it: 4-bit layers keep their trainable layout on CPU.
    """
    import os

    import peft

    if not os.path.exists(os.path.join(directory, "config.json")):
        torch.manual_seed(seed)
        config = tf.LlamaConfig(num_hidden_layers=num_layers, hidden_size=64, intermediate_size=128,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
        tf.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    quantization = (tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32)
                    if bits == "4bit" else tf.BitsAndBytesConfig(load_in_8bit=True))
    model = tf.AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization, device_map="cpu",
                                                    dtype=torch.float32)
    from istune.core.probe import keep_quantized_layers_trainable

    # no CPU repacking at eval-mode forwards (it drops gradients), as istune train
    keep_quantized_layers_trainable(model)
    torch.manual_seed(seed + 1)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=method == "dora",
                           init_lora_weights=False)
    return peft.get_peft_model(model, lora).train()


def save_tiny_llama(folder, num_layers: int = 4):
    """A random tiny LLaMA (seed 0) and the word-level test tokenizer saved in ``folder``, as from_pretrained loads
    them; returns ``folder``."""
    from .eval.conftest import make_tokenizer

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
