"""A tiny 4-layer LLaMA on disk, a tiny LLM-Adapters file, and a finished run folder with strong adapters."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from istune.adapters.methods import AdapterArgs, save_adapters
from istune.config import ISTConfig
from istune.runs import RunArgs

from ..tiny_models import save_tiny_llama

NUM_LAYERS = 4
IMPORTANCE = [0.3, -1.0, 2.0, 0.5]  # least important first: 1, 0, 3, 2
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-4"), NUM_LAYERS)


def run_args(model_dir, data, **changes) -> RunArgs:
    """A tiny run: 4 steps of batch 2, 8 held-out examples, no task evaluation."""
    values = dict(model=str(model_dir), data=str(data), train_samples=16, heldout_samples=8,
                  eval_tasks="none", compare_base=False)
    return RunArgs(**{**values, **changes})


@pytest.fixture(scope="session")
def lora_run(tiny_model_dir, data_file, tmp_path_factory):
    """A run folder as `istune train` leaves it, with random (large) LoRA B so each layer's adapter matters."""
    import peft

    from istune.models import load_model_and_tokenizer

    folder = tmp_path_factory.mktemp("lora-run")
    adapter = AdapterArgs(method="lora", rank=4, alpha=8, target_modules=TARGETS)
    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    torch.manual_seed(1)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                       init_lora_weights=False))
    with torch.no_grad():  # a different strength per layer, so that the orders differ
        for index, block in enumerate(model.base_model.model.model.layers):
            for name, parameter in block.named_parameters():
                if "lora_B" in name:
                    parameter.mul_(1.0 + 2.0 * index)
    save_adapters(model, folder / "adapter", adapter)
    ist = ISTConfig(seed=3)
    results = {"run": asdict(run_args(tiny_model_dir, data_file)), "adapter": asdict(adapter),
               "ist": ist.to_dict(), "importance": IMPORTANCE,
               "training": {"seed": ist.seed, "max_steps": 4, "per_device_train_batch_size": 2}}
    (folder / "results.json").write_text(json.dumps(results))
    return folder
