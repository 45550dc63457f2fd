"""The Trainer's own options for ``istune train``, with the main job's defaults.

:class:`RecipeTrainingArguments` is ``transformers.TrainingArguments`` with other defaults
(as trl's ``SFTConfig`` is): every Trainer option keeps its name and meaning, and a bare
``istune train`` runs the embedded main job (80 steps of batch 4 at 3e-4, no checkpoints).
Precision flags that cannot work here are refused when the arguments are built, before any
model loads.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import SaveStrategy

_HELP = {f.name: f.metadata.get("help", "") for f in TrainingArguments.__dataclass_fields__.values()}


def _default(name: str, value, why: str):
    """A TrainingArguments field with istune's default; the help keeps the Trainer's text and says why."""
    return field(default=value, metadata={"help": f"{_HELP[name]} istune's default: {value!r} ({why})."})


@dataclass
class RecipeTrainingArguments(TrainingArguments):
    """``transformers.TrainingArguments`` with the defaults of istune's main job.

    Example:
        >>> RecipeTrainingArguments(output_dir="runs/lora", max_steps=300)
    """

    output_dir: str | None = _default("output_dir", "runs/istune", "adapters, IST log and results go there")
    max_steps: int = _default("max_steps", 80, "the main job; -1 trains --num_train_epochs")
    per_device_train_batch_size: int = _default("per_device_train_batch_size", 4, "the main job")
    learning_rate: float = _default("learning_rate", 3e-4, "LoRA on a small model")
    warmup_steps: float = _default("warmup_steps", 0.05, "5 percent of the steps, then linear decay")
    logging_steps: float = _default("logging_steps", 10, "one console line every 10 steps")
    save_strategy: SaveStrategy | str = _default("save_strategy", "no", "the main job keeps only the final adapters; "
                                                 "give --save_strategy steps --save_steps K for checkpoints")
    report_to: None | str | list[str] = _default("report_to", "none", "console only")
    remove_unused_columns: bool = _default("remove_unused_columns", False, "the collator needs every column")

    def __post_init__(self) -> None:
        if self.fp16 and self.bf16:
            raise ValueError("--fp16=True and --bf16=True: choose one mixed precision (bf16 where the GPU has it, "
                             "fp16 on older GPUs).")
        if not _has_accelerator():
            self.use_cpu = True  # what the Trainer does anyway; lets --bf16 run on a CPU that has it
        if self.use_cpu and (self.bf16 or self.bf16_full_eval) and not cpu_has_bf16():
            flag = "--bf16" if self.bf16 else "--bf16_full_eval"
            raise ValueError(f"{flag}=True on a CPU without bfloat16 arithmetic (AVX512-BF16 or AMX): it would be "
                             f"emulated, many times slower. Drop {flag} (float32 on CPU) or train on a GPU.")
        super().__post_init__()


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available()


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively.

    x86: with AVX512-BF16 or AMX; other CPUs: if a bf16 matmul runs.
    """
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    try:
        torch.ones(2, 2, dtype=torch.bfloat16) @ torch.ones(2, 2, dtype=torch.bfloat16)
        return True
    except RuntimeError:
        return False
