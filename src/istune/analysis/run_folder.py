"""Load a finished ``istune train`` folder back: the tuned model, its adapter layers, its held-out data.

The held-out examples are the run's own (same data, seed and ``heldout_samples``), so a
loss measured here is the ``tuned.heldout_loss`` of its ``results.json`` when nothing
is removed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from istune.core.layers import AdapterLayer, find_adapter_layers, is_adapter_module


@dataclass
class LoadedRun:
    """A trained run, ready for analysis.

    Attributes:
        folder: the run's output folder.
        results: its ``results.json``.
        model: base model with the run's adapters, in eval mode.
        layers: the adapter layers (positions 0..N_L-1, the positions of ISTConfig.layers and of the importance I).
        heldout: the run's held-out examples (tokenized on access).
        collate: batches them.
        importance: the learned importance I per layer; None when the run learned none (strategy not 'ist').
    """

    folder: Path
    results: dict[str, Any]
    model: nn.Module
    layers: list[AdapterLayer]
    heldout: Any
    collate: Any
    importance: list[float] | None

    @property
    def strategy(self) -> str:
        return self.results["ist"]["strategy"]


def read_results(run_dir: str | Path, option: str = "run_dir") -> dict[str, Any]:
    """The ``results.json`` of a run folder; a clear error when ``run_dir`` is not one."""
    folder = Path(run_dir)
    results_file = folder / "results.json"
    if not results_file.is_file() or not (folder / "adapter").is_dir():
        raise ValueError(f"{option}={str(run_dir)!r} is not the output folder of a finished `istune train` run (it "
                         "needs results.json and adapter/); give the --output_dir of a run that has finished.")
    return json.loads(results_file.read_text())


def learned_importance(results: dict[str, Any]) -> list[float] | None:
    """The run's final importance I, or None when its strategy learns none."""
    if results.get("ist", {}).get("strategy") != "ist" or not results.get("importance"):
        return None
    return [float(value) for value in results["importance"]]


def load_run(run_dir: str | Path, heldout_samples: int | None = None) -> LoadedRun:
    """Load base model + adapters of ``run_dir`` and the run's held-out examples.

    Args:
        heldout_samples: score only the first this many held-out examples (a cheaper
            loss for greedy searches); default all of the run's.
    """
    import torch

    from istune.adapters.methods import load_adapters
    from istune.data import CausalLMCollator, InstructionDataset
    from istune.models import load_model_and_tokenizer
    from istune.runs import RunArgs, load_rows, saved_training_value

    folder = Path(run_dir)
    results = read_results(folder)
    run = dataclasses.replace(RunArgs.from_saved(results["run"]), overwrite=True)
    if heldout_samples is not None and not 1 <= heldout_samples <= run.heldout_samples:
        raise ValueError(f"--heldout_samples={heldout_samples} must be between 1 and the run's {run.heldout_samples}.")
    _, heldout_rows = load_rows(run, saved_training_value(results, "seed"))
    base, tokenizer = load_model_and_tokenizer(run.model, dtype=torch.float32)
    initial_state = base.state_dict() if results["adapter"]["method"] == "full" else None
    model = load_adapters(base, folder / "adapter").eval()
    layers = _discover_layers(model, initial_state, results["ist"].get("layers_path"),
                              results["ist"].get("towers", "train"))
    heldout = InstructionDataset(heldout_rows[:heldout_samples], tokenizer, run.cutoff_len, train_on_inputs=False)
    return LoadedRun(folder, results, model, layers, heldout, CausalLMCollator(tokenizer), learned_importance(results))


def _discover_layers(model: nn.Module, initial_state, layers_path: str | None,
                     towers: str = "train") -> list[AdapterLayer]:
    """The adapter layers of a model loaded for inference (where peft froze every parameter).

    Layer discovery reads ``requires_grad``, so adapter parameters are marked trainable
    again first (nothing trains here; it only tells adapters from base weights). Full
    layers (method 'full') get the pretrained weights as W0, to remove their change.
    """
    from istune.core.suppress import prepare_suppression, suppression_problems

    adapters = [module for module in model.modules() if is_adapter_module(module)]
    if adapters:
        model.requires_grad_(False)
        for module in adapters:
            base = {id(p) for p in module.base_layer.parameters()} if hasattr(module, "base_layer") else set()
            for parameter in module.parameters():
                if id(parameter) not in base:
                    parameter.requires_grad_(True)
    layers = find_adapter_layers(model, layers_path, towers)
    problems = suppression_problems(model, layers)
    if problems:
        raise ValueError(f"This run's adapters cannot be removed exactly (eq. 8 with β=0): {'; '.join(problems[:3])}.")
    prepare_suppression(model, layers, initial_state=initial_state)
    return layers
