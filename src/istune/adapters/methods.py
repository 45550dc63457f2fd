"""Put a PEFT method's adapters into a model, save them and load them back (``istune train --method``).

LoRA, DoRA and AdaLoRA come from Hugging Face peft; series and parallel bottleneck
adapters from :mod:`istune.adapters` (the paper's Table 9 placement by default); ``full``
trains whole decoder layers without adapters (LISA-style). Every method puts one
trainable group into each decoder layer, which is what IST selects from.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from istune.io import write_text

METHODS = ("lora", "dora", "adalora", "series", "parallel", "full")
METHOD_FILE = "istune_method.json"


@contextmanager
def quiet_peft_wrapping():
    """Hide the one FutureWarning peft's own code raises when it wraps a model on transformers 5.

    ``PeftModel`` reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates in favour of
    ``is_activation_checkpointing``: a warning about peft's code that the user cannot act on, printed on every run.
    Every other warning passes.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def load_peft_adapters(base_model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """peft's ``PeftModel.from_pretrained`` on ``base_model``, without peft's deprecation warning."""
    import peft

    with quiet_peft_wrapping():
        return peft.PeftModel.from_pretrained(base_model, directory)


# LLM-Adapters' LoRA placement for LLaMA (attention q/k/v and MLP up/down); other families: all linear layers.
_LORA_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]}


@dataclass
class AdapterArgs:
    """Which PEFT method, and its size."""

    method: str = field(default="lora", metadata={
        "help": f"PEFT method: {', '.join(METHODS)} ('full': whole layers, LISA-style)."})
    rank: int = field(default=32, metadata={"help": "LoRA/DoRA rank r; AdaLoRA's initial rank (paper: 32)."})
    alpha: float = field(default=64, metadata={"help": "LoRA/DoRA/AdaLoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt. Default: LoRA on q/k/v/up/down projections for "
                                "LLaMA-like models (all linear layers otherwise); bottleneck adapters on the MLP."})
    bottleneck_size: int = field(default=256, metadata={
        "help": "Series/parallel adapter bottleneck size (paper: 256)."})
    adalora_target_rank: int = field(default=8, metadata={"help": "AdaLoRA: average rank after reallocation."})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method={self.method!r} is not a known PEFT method; use one of {', '.join(METHODS)}.")
        for name in ("rank", "bottleneck_size", "adalora_target_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)!r} must be at least 1.")
        if self.method == "adalora" and self.adalora_target_rank >= self.rank:
            raise ValueError(f"--adalora_target_rank={self.adalora_target_rank} must be below --rank={self.rank}: "
                             "AdaLoRA prunes from the initial rank down to the target.")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora-dropout={self.lora_dropout!r} must be in [0, 1).")


def add_adapters(model: nn.Module, args: AdapterArgs, total_steps: int) -> nn.Module:
    """Return ``model`` with the adapters of ``args.method`` in every layer; only they are trainable.

    Args:
        total_steps: optimizer steps of the run (AdaLoRA schedules its rank budget over them).
    """
    if args.method == "full":
        from istune.core.layers import prepare_full_layer_tuning

        return prepare_full_layer_tuning(model)
    if args.method in ("series", "parallel"):
        from istune.adapters.config import BottleneckConfig
        from istune.adapters.model import add_bottleneck_adapters, add_paper_bottleneck_adapters

        if args.target_modules is None:  # series on {Up, Down}, parallel on {Up, Gate} (paper, Table 9)
            return add_paper_bottleneck_adapters(model, args.method, bottleneck_size=args.bottleneck_size)
        config = BottleneckConfig(kind=args.method, bottleneck_size=args.bottleneck_size,
                                  target_modules=args.target_modules)
        return add_bottleneck_adapters(model, config)
    import peft

    targets = args.target_modules or _LORA_TARGETS.get(getattr(model.config, "model_type", ""), "all-linear")
    common = dict(target_modules=targets, lora_alpha=args.alpha, lora_dropout=args.lora_dropout, task_type="CAUSAL_LM")
    if args.method == "adalora":
        warmup = max(1, total_steps // 10)
        config = peft.AdaLoraConfig(init_r=args.rank, target_r=args.adalora_target_rank, total_step=total_steps,
                                    tinit=warmup, tfinal=warmup, deltaT=max(1, total_steps // 20), **common)
    else:
        config = peft.LoraConfig(r=args.rank, use_dora=args.method == "dora", **common)
    with quiet_peft_wrapping():
        return peft.get_peft_model(model, config)


def save_adapters(model: nn.Module, directory: str | os.PathLike, args: AdapterArgs) -> Path:
    """Save only the adapters (safetensors) and which method made them; ``full``: the whole model."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if args.method == "full":
        model.save_pretrained(directory)
    elif args.method in ("series", "parallel"):
        from istune.adapters.model import save_bottleneck_adapters

        save_bottleneck_adapters(model, directory)
    else:
        model.save_pretrained(directory)
    write_text(directory / METHOD_FILE, json.dumps(asdict(args), indent=2))
    return directory


def load_adapters(base_model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load adapters saved by :func:`save_adapters` onto a fresh base model (inference mode)."""
    directory = Path(directory)
    method_file = directory / METHOD_FILE
    if not method_file.is_file():
        raise FileNotFoundError(f"{directory} holds no {METHOD_FILE}: is it the output folder of `istune train`?")
    args = AdapterArgs(**json.loads(method_file.read_text()))
    if args.method == "full":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(directory, dtype=next(base_model.parameters()).dtype)
    if args.method in ("series", "parallel"):
        from istune.adapters.model import load_bottleneck_adapters

        return load_bottleneck_adapters(base_model, directory)
    return load_peft_adapters(base_model, directory)
