"""Where ISTCallback's probe batches come from, and the loss it measures them with.

Probe batches are drawn by istune's own seeded sampler from ``probe_dataset`` or the training
data, collated like the training batches (``probe_batch_size`` examples, or the training batch
size); each rank draws its own. The loss runs under the autocast the Trainer trains with.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from istune.config import ISTConfig
from istune.core import distributed
from istune.core.probe import ProbeSampler, default_loss, preserved_global_rng


def probe_sampler(config: ISTConfig, probe_dataset, args, train_dataloader) -> ProbeSampler:
    """A sampler over ``probe_dataset`` (None: the training data), checked on one example now.

    Raises:
        ValueError: the collator fails on an example, or gives no ``labels``.
    """
    dataset = probe_dataset if probe_dataset is not None else train_dataloader.dataset
    batch_size = config.probe_batch_size or args.per_device_train_batch_size
    # Each rank probes its own batches; SparseTuner averages the losses over ranks.
    seed = config.seed + 1 + distributed.rank()
    sampler = ProbeSampler(dataset, train_dataloader.collate_fn, batch_size, seed)
    _check_probe_batch(sampler)
    return sampler


def probe_loss(args, device: torch.device):
    """The probe loss under the autocast the Trainer trains with (bf16, or fp16 off the CPU)."""
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 and device.type != "cpu" else None
    if dtype is None:
        return default_loss

    def loss(model, batch):
        with torch.autocast(device.type, dtype=dtype):
            return default_loss(model, batch)

    return loss


def _check_probe_batch(sampler: ProbeSampler) -> None:
    """Collate one probe example now, so bad data fails before training rather than at the first probe."""
    try:
        with preserved_global_rng():
            batch = sampler.collate_fn([sampler.dataset[0]])
    except Exception as error:  # re-raised with what IST was doing; the original stays attached
        raise ValueError(f"IST cannot build a probe batch from the probe dataset ({type(error).__name__}: {error}). "
                         "Probe batches are collated like training batches: check the dataset's examples, or pass "
                         "ISTCallback(probe_dataset=...).") from error
    if not isinstance(batch, Mapping) or "labels" not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"IST's probe batches need 'labels' (the training loss); the collator gave {keys}. Use a "
                         "collator that adds labels (e.g. DataCollatorForLanguageModeling(mlm=False)).")
