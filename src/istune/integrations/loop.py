"""IST from a plain PyTorch training loop, without transformers' Trainer.

The whole integration is two calls around each optimizer step::

    from istune import ISTConfig, SparseTuner
    from istune.core import ProbeSampler

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    tuner = SparseTuner(model, ISTConfig(), optimizer=optimizer,
                        probe_batches=ProbeSampler(dataset, collate_fn, batch_size=8, seed=0))
    for batch in loader:
        tuner.begin_step()                   # the rule (IST: eq. 6-7) chooses N_u layers; the others freeze
        model(**batch).loss.backward()
        tuner.before_optimizer_step()        # gradient rules ('gradnorm') read the trained layers' norms here
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tuner.end_step()                     # every T_c steps: probes and importance update (eq. 8-10)
    tuner.close()                            # every adapter trainable again

``before_optimizer_step`` is the one extra call a rule that learns from gradients needs
(``ISTConfig(strategy="gradnorm")``); for every other rule it returns at once, and leaving it out
changes nothing for them. :func:`train` below is that loop, with gradient accumulation, as a
runnable function.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from istune.config import ISTConfig
from istune.core.probe import move_to_device
from istune.core.selection import SelectionRule
from istune.core.tuner import SparseTuner
from istune.integrations import adalora


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Any],
    config: ISTConfig | None = None,
    *,
    probe_batches=None,
    gradient_accumulation_steps: int = 1,
    max_steps: int | None = None,
    rule: SelectionRule | None = None,
) -> SparseTuner:
    """Train ``model`` with IST over ``batches`` (dicts the model takes, with ``labels``).

    Args:
        model: a PEFT model whose adapters are trainable.
        optimizer: built over every adapter parameter.
        batches: micro-batches; ``gradient_accumulation_steps`` of them make one optimizer step.
        config: IST hyperparameters (default: the paper's).
        probe_batches: callable returning a probe batch (e.g. a :class:`~istune.core.ProbeSampler`); IST's
            probes and the rules that measure ('owlore', 'gradnorm', 'probe-once') need it.
        gradient_accumulation_steps: micro-batches per optimizer step; the selection changes
            only between optimizer steps.
        max_steps: stop after this many optimizer steps.
        rule: a selection rule object to use instead of the one ``config.strategy`` names.

    Returns:
        The tuner, closed (adapters trainable again), with its importance and history.
    """
    tuner = SparseTuner(model, config, optimizer=optimizer, probe_batches=probe_batches, rule=rule)
    device = next(model.parameters()).device
    model.train()
    micro_step = 0
    try:
        for batch in batches:
            if micro_step % gradient_accumulation_steps == 0:
                tuner.begin_step()
            loss = model(**move_to_device(batch, device)).loss / gradient_accumulation_steps
            loss.backward()
            micro_step += 1
            if micro_step % gradient_accumulation_steps == 0:
                tuner.before_optimizer_step()
                optimizer.step()
                if adalora.is_adalora(model):  # rank reallocation: after the step, before zero_grad (as peft says)
                    adalora.update_and_allocate(model, tuner.step)
                optimizer.zero_grad(set_to_none=True)
                tuner.end_step()
                if max_steps is not None and tuner.step >= max_steps:
                    break
    finally:
        tuner.close()
    return tuner
