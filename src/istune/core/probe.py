"""Probe batches and probe losses for the importance-updating loop.

A probe runs the model without gradients, in eval mode (dropout off), and puts the
model back in the mode it was in. Probe batches come from istune's own seeded
sampler, so the training loop's data order and global RNG are untouched.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

LossFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]


def default_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The model's own loss for a batch holding ``labels`` (any Hugging Face causal LM)."""
    if "labels" not in batch:
        raise ValueError(f"The probe batch has no 'labels' (keys: {sorted(batch)}); IST's probes need the "
                         "training loss. Give batches with labels or pass loss_fn=... to SparseTuner.")
    if "use_cache" not in batch and getattr(getattr(model, "config", None), "use_cache", None) is not None:
        batch = {**batch, "use_cache": False}  # a probe needs no KV cache: building one costs time and memory
    return model(**batch).loss


class ProbeSampler:
    """Draws probe batches from a map-style dataset with its own seeded generator.

    Args:
        dataset: anything with ``__len__`` and ``__getitem__`` (the training set).
        collate_fn: turns a list of examples into a batch (the training collator).
        batch_size: examples per probe batch.
        seed: seed of the sampler's own ``torch.Generator``.
    """

    def __init__(self, dataset, collate_fn: Callable[[list], Any], batch_size: int, seed: int):
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise ValueError(f"Cannot sample probe batches from a {type(dataset).__name__} (no __len__/__getitem__, "
                             "e.g. an IterableDataset); pass a map-style probe_dataset to ISTCallback.")
        if len(dataset) == 0:
            raise ValueError("The probe dataset is empty; IST needs at least one example to measure importance.")
        self.dataset, self.collate_fn = dataset, collate_fn
        self.batch_size = min(batch_size, len(dataset))
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self) -> Any:
        indices = torch.randperm(len(self.dataset), generator=self.generator)[: self.batch_size].tolist()
        with preserved_global_rng():  # a random collator must not shift the trainer's RNG
            return self.collate_fn([self.dataset[i] for i in indices])


@contextlib.contextmanager
def preserved_global_rng() -> Iterator[None]:
    """Save and restore Python's and torch's CPU global RNG states around a block."""
    python_state, torch_state = random.getstate(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        torch.set_rng_state(torch_state)


@contextlib.contextmanager
def probe_mode(model: nn.Module) -> Iterator[None]:
    """No gradients, dropout off, regularisers off; the model's train/eval mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _without_loss_regularisers(model):
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _without_loss_regularisers(model: nn.Module) -> Iterator[None]:
    """Switch off terms peft adds to the loss (AdaLoRA's orthogonality regulariser) during probes."""
    configs = getattr(model, "peft_config", None) or {}
    saved = [(c, c.orth_reg_weight) for c in configs.values() if getattr(c, "orth_reg_weight", 0)]
    for config, _ in saved:
        config.orth_reg_weight = 0.0
    try:
        yield
    finally:
        for config, value in saved:
            config.orth_reg_weight = value


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def keep_quantized_layers_trainable(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; return how many layers were changed.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit``'s weight in place at
    its first forward in eval mode without gradients -- an IST probe is such a forward, so is an
    evaluation. Later training forwards then use a kernel without a backward: no gradient
    reaches the layers below (measured: layer 0's LoRA got none). :class:`SparseTuner` calls
    this when it starts; call it yourself right after loading if you evaluate the model before
    training (a layer already repacked stays so).
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
