"""The rules istune started with, as rule objects: 'ist' (the paper), 'random', 'fixed' and 'all'.

Each draws exactly as the tuner did before rules were objects (the same generator calls in the same
order), so their runs are bit-identical to those of earlier versions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from istune.core import policy
from istune.core.selection import SelectionRule, StepView


class ImportanceRule(SelectionRule):
    """IST's fine-tuning loop (eq. 6-7): ``p_i ~ U(0, σ(I_i))`` for every layer, the N_u largest train.

    The importance I is the tuner's: it runs the importance-updating loop (eq. 8-10) every T_c steps
    because this rule sets ``runs_importance_probes``, and hands I to :meth:`select` in ``view.importance``.

    Example:
        >>> ISTConfig(strategy="ist")
    """

    name = "ist"
    runs_importance_probes = True

    def select(self, view: StepView) -> Sequence[int]:
        return policy.sample_layers(view.importance, view.count, view.generator)


class RandomRule(SelectionRule):
    """N_u of the N_L layers uniformly at random, each draw independent of the last (random sparse tuning).

    With ``switch_interval`` K > 1 this is LISA's rule (see :class:`~istune.core.rules.lisa.LisaRule`).

    Example:
        >>> ISTConfig(strategy="random", update_layers=2)
    """

    name = "random"
    uses_probe_batches = False  # no measurement: the Trainer callback builds no probe sampler

    def select(self, view: StepView) -> Sequence[int]:
        return policy.sample_uniform_layers(view.num_layers, view.count, view.generator)


class FixedRule(SelectionRule):
    """The same layers at every step (``ISTConfig.layers``).

    Args:
        layers: the layer positions (0-based) to train.

    Example:
        >>> ISTConfig(strategy="fixed", layers=[0, 5, 11])
    """

    name = "fixed"
    uses_probe_batches = False
    trains_given_layers = True
    parameters = ()  # its layers are ISTConfig.layers; it never chooses again, so no K

    def __init__(self, layers: Sequence[int]):
        self.layers = sorted(layers)

    @classmethod
    def from_config(cls, config: Any) -> FixedRule:
        return cls(config.layers)

    def select(self, view: StepView) -> Sequence[int]:
        return list(self.layers)


class AllLayersRule(SelectionRule):
    """Every layer at every step: plain PEFT (N_u = N_L).

    Example:
        >>> ISTConfig(strategy="all")
    """

    name = "all"
    uses_probe_batches = False
    trains_all_layers = True
    parameters = ()

    def select(self, view: StepView) -> Sequence[int]:
        return list(range(view.num_layers))
