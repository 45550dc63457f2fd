"""The selection-rule contract: which N_u of the N_L layers' adapters train at each optimizer step.

A rule is a small object. Each optimizer step the tuner calls ``rule.select(view)`` and trains
exactly the layer positions it returns; everything else (freezing the others before the forward
pass, keeping the optimizer over every adapter, checkpoint state, ranks in step) is the tuner's.
A rule makes every random draw from ``view.generator`` (the tuner's seeded generator, saved in
checkpoints and identical on every rank), so selections are reproducible, resume bit-equal and
agree across ranks without any communication of their own.

What a rule sees (:class:`StepView`): the step number, N_L and N_u, the previous selection, the
importance I of IST, and measurements it may ask for (each computed by the tuner on a probe batch,
on demand, with the same result on every rank):

- ``view.probe_losses(candidates)``: the loss with the adapters outside each candidate set scaled
  by β (eq. 8), as IST's probes;
- ``view.gradient_norms()``: each layer's adapter-gradient L2 norm from one forward and backward
  with every adapter trainable (parameters unchanged, gradients cleared after);
- ``view.outlier_ratios(multiplier)``: each layer's share of weight × input-activation magnitudes
  above ``multiplier`` × the layer's mean (OwLore's outlier ratio), from one forward.

What a rule may be told after a step's backward, before the optimizer steps (only when it sets
``wants_gradients``): :meth:`SelectionRule.observe_gradients` with the adapter-gradient norm of
each layer that trained.

A rule written from scratch (train the N_u layers that trained least so far)::

    class LeastTrained(SelectionRule):
        name = "least-trained"

        def __init__(self):
            self.counts = None

        def select(self, view):
            if self.counts is None:
                self.counts = torch.zeros(view.num_layers)
            noise = torch.rand(view.num_layers, generator=view.generator)  # random tie-break
            chosen = torch.argsort(self.counts + noise)[: view.count].tolist()
            self.counts[chosen] += 1
            return chosen

        def state_dict(self):
            return {"counts": None if self.counts is None else self.counts.tolist()}

        def load_state_dict(self, state):
            self.counts = None if state["counts"] is None else torch.tensor(state["counts"])

    register_rule("least-trained", LeastTrained)   # then ISTConfig(strategy="least-trained")

A rule declares its parameters (:class:`~istune.rule_catalog.RuleParameter`) in ``parameters``; the
config, ``istune train``'s flags, YAML and the axolotl and LLaMA-Factory keys then take them by name, and
:meth:`SelectionRule.from_config` passes each to the rule's ``__init__``::

    TEMPERATURE = RuleParameter("temperature", 1.0, low=0, low_open=True, help="τ: softmax temperature.")

    class Softmax(SelectionRule):
        parameters = (SWITCH_INTERVAL, TEMPERATURE)    # K, which the tuner applies, and its own τ

        def __init__(self, temperature=1.0):
            self.temperature = temperature

    register_rule("softmax", Softmax)   # ISTConfig(strategy="softmax", temperature=0.5), --temperature 0.5
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from istune import rule_catalog
from istune.rule_catalog import RuleParameter, RuleTraits

# K: the tuner keeps each selection for K optimizer steps; every rule that chooses more than once takes it.
SWITCH_INTERVAL = RuleParameter(
    "switch_interval", 1, low=1,
    help="K: keep each selection for K optimizer steps; the rule chooses again at steps 0, K, 2K, ... 'ist': the "
    "importance-sampled set is held K steps (the probes still run every T_c steps); 'random' and 'lisa': LISA's "
    "sampling period K (Pan et al. 2024); 'badam': BAdam's switch_block_every (Luo et al. 2024); 'owlore', "
    "'gradnorm': steps between draws. Default 1: a new selection every step.")


@dataclass(frozen=True)
class StepView:
    """What a rule sees when the tuner asks for the layers of the coming optimizer step.

    Attributes:
        step: optimizer steps completed so far (0 for the first step).
        num_layers: N_L, the adapter layers (positions 0..N_L-1, bottom to top).
        count: N_u, how many positions :meth:`SelectionRule.select` must return.
        previous: the previous step's selection (empty before the first step).
        generator: the tuner's seeded generator; every random draw of a rule comes from it.
        importance: IST's importance vector I, ``(N_L,)`` float64 (zeros for other rules).
        probe_losses: ``candidates -> (len(candidates),) losses`` with the adapters outside each
            candidate scaled by β (eq. 8), on a probe batch; averaged over ranks.
        gradient_norms: ``() -> (N_L,)`` adapter-gradient L2 norms from one forward and backward on
            a probe batch with every adapter trainable; averaged over ranks.
        outlier_ratios: ``multiplier -> (N_L,)`` OwLore's outlier ratio of each layer on a probe
            batch; averaged over ranks.
    """

    step: int
    num_layers: int
    count: int
    previous: tuple[int, ...]
    generator: torch.Generator
    importance: torch.Tensor
    probe_losses: Callable[[list[list[int]]], torch.Tensor]
    gradient_norms: Callable[[], torch.Tensor]
    outlier_ratios: Callable[[float], torch.Tensor]


class SelectionRule:
    """Base class of the layer-selection rules; a subclass sets ``name`` and implements :meth:`select`.

    Attributes:
        name: the rule's name, as ``ISTConfig(strategy=...)`` and ``istune train --strategy`` take it.
        wants_gradients: the tuner calls :meth:`observe_gradients` before every optimizer step.
        runs_importance_probes: the tuner runs IST's importance-updating loop (eq. 8-10) every T_c steps.
        uses_probe_losses: the rule calls ``view.probe_losses``, so the tuner prepares suppression (eq. 8)
            before the first step.
        uses_probe_batches: the rule may call a measurement, so the Trainer callback builds a probe
            sampler; False for rules that never measure (no probe data is read for them).
        uses_gradient_norms: the rule calls ``view.gradient_norms`` (an extra backward pass).
        uses_outlier_ratios: the rule calls ``view.outlier_ratios`` (forward hooks on the linear maps).
        trains_all_layers: the rule trains every layer at every step (N_u = N_L).
        trains_given_layers: the rule trains ``ISTConfig.layers`` (N_u = their number).
        parameters: the rule's parameters (:class:`~istune.rule_catalog.RuleParameter`), which the config
            and every front end take by name; K (:data:`SWITCH_INTERVAL`) unless the rule never chooses again.
    """

    name: str = ""
    wants_gradients: bool = False
    runs_importance_probes: bool = False
    uses_probe_losses: bool = False
    uses_probe_batches: bool = True
    uses_gradient_norms: bool = False
    uses_outlier_ratios: bool = False
    trains_all_layers: bool = False
    trains_given_layers: bool = False
    parameters: tuple[RuleParameter, ...] = (SWITCH_INTERVAL,)

    @classmethod
    def from_config(cls, config: Any = None) -> SelectionRule:
        """The rule with each declared parameter that ``__init__`` takes read from ``config`` (its default if
        ``config`` lacks it)."""
        accepted = inspect.signature(cls.__init__).parameters
        values = {parameter.name: getattr(config, parameter.name, parameter.default)
                  for parameter in cls.parameters if parameter.name in accepted}
        return cls(**values)

    def select(self, view: StepView) -> Sequence[int]:
        """The ``view.count`` distinct layer positions (each in ``[0, view.num_layers)``) to train this step."""
        raise NotImplementedError

    def observe_gradients(self, step: int, norms: dict[int, float]) -> None:
        """The adapter-gradient L2 norm of each layer that trained at ``step`` (only with ``wants_gradients``)."""

    def state_dict(self) -> dict[str, Any]:
        """What the rule needs to continue exactly after a resume (JSON-serialisable values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output."""


_RULES: dict[str, Callable[..., SelectionRule]] = {}


def register_rule(name: str, factory: Callable[..., SelectionRule] | type[SelectionRule]) -> None:
    """Make ``ISTConfig(strategy=name)`` build its rule with ``factory``, and take its declared parameters.

    Args:
        factory: a :class:`SelectionRule` subclass (built with :meth:`SelectionRule.from_config`, so its
            declared ``parameters`` reach ``__init__``), a rule's ``from_config``, or any callable taking the
            config (or nothing) and returning a rule. The parameters and traits are read from the class (a
            plain function gets the base class's: K only).

    Raises:
        ValueError: ``name`` is already taken by another factory, or a parameter clashes with another rule's.
    """
    if isinstance(factory, type) and issubclass(factory, SelectionRule):
        factory = factory.from_config
    if name in _RULES and _RULES[name] != factory:
        raise ValueError(f"register_rule: a selection rule named {name!r} is already registered; pick another name.")
    rule_class = getattr(factory, "__self__", None)
    rule_class = rule_class if isinstance(rule_class, type) and issubclass(rule_class, SelectionRule) \
        else SelectionRule
    rule_catalog.enter(RuleTraits(
        name=name, parameters=tuple(rule_class.parameters),
        runs_importance_probes=rule_class.runs_importance_probes, trains_all_layers=rule_class.trains_all_layers,
        trains_given_layers=rule_class.trains_given_layers, uses_outlier_ratios=rule_class.uses_outlier_ratios,
        uses_probe_batches=rule_class.uses_probe_batches))
    _RULES[name] = factory


def rule_names() -> list[str]:
    """The registered rule names, sorted."""
    return sorted(_RULES)


def rule_factory(name: str) -> Callable[..., SelectionRule]:
    """The factory registered under ``name``.

    Raises:
        ValueError: no rule has that name; the message lists the available ones.
    """
    if name not in _RULES:
        raise ValueError(f"strategy={name!r} is not a selection rule; use one of "
                         f"{', '.join(repr(n) for n in rule_names())} or register one with "
                         "istune.core.selection.register_rule(name, factory).")
    return _RULES[name]


def check_selection(rule_name: str, selection: Sequence[int], num_layers: int, count: int, step: int) -> list[int]:
    """``selection`` as a sorted list, after checking it holds ``count`` distinct positions in range.

    Raises:
        ValueError: naming the rule, the step and what was wrong.
    """
    try:
        positions = [int(position) for position in selection]
    except (TypeError, ValueError):
        raise ValueError(f"selection rule {rule_name!r} returned {selection!r} at step {step}; "
                         "it must return a sequence of layer positions (ints).") from None
    if len(set(positions)) != len(positions) or len(positions) != count:
        raise ValueError(f"selection rule {rule_name!r} returned {len(positions)} positions {positions} at step "
                         f"{step} ({len(set(positions))} distinct); it must return N_u = {count} distinct positions.")
    outside = [position for position in positions if not 0 <= position < num_layers]
    if outside:
        raise ValueError(f"selection rule {rule_name!r} returned positions {outside} at step {step}, outside "
                         f"[0, {num_layers}); layer positions run from 0 to N_L - 1 = {num_layers - 1}.")
    return sorted(positions)
