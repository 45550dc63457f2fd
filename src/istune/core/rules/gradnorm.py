"""Gradient norm: layers sampled by a running estimate of their adapter-gradient norm, with exploration.

Designed from the layer- and module-sampling papers that rank by gradient magnitude:

- GRASS (Tian et al. 2026, "Gradient-based Adaptive Layer-wise Importance Sampling for Memory-efficient
  LLM Fine-tuning") takes a layer's *mean gradient norm* as its importance and adapts the sampling
  probabilities as training moves on: the estimate here is of the same quantity, kept current;
- MISA (Liu et al. 2025, "Memory-Efficient LLMs Optimization with Module-wise Importance Sampling")
  keeps an exponential moving average of each block's gradient from the blocks that were sampled, and
  keeps every block's probability bounded away from zero so its estimate can be refreshed; it weighs
  blocks by a bandit rule on that estimate. Here the floor is an ε-uniform mixture (simpler, and its
  frequencies are easy to check), not MISA's exponential weights;
- AdaGradSelect (2025) and RoSA pick what to train by gradient magnitude too, the latter once.

The estimator. At the first step every layer's norm is measured once with every adapter trainable
(``view.gradient_norms()``), so no layer starts at zero. After each step's backward the tuner reports
the norms of the layers that trained; each of those estimates moves to ``g_i ← γ·g_i + (1−γ)·‖∇_i‖``,
the others keep theirs (a non-finite norm, an fp16 overflow, is skipped). A layer's gradient does not
depend on which other layers train (the forward is the same), so an observed norm is an unbiased
sample of that layer's norm on the batch: no importance weighting is needed.

The draw: ``p_i = (1 − ε)·g_i / Σ_k g_k + ε / N_L`` (uniform if every estimate is 0), N_u layers without
replacement (:func:`~istune.core.rules.sampling.sample_in_proportion`). With ε > 0 every layer keeps a
first-draw probability of at least ε / N_L, so a layer whose estimate went stale is revisited;
ε = 1 is uniform sampling ('random'), ε = 0 trusts the estimate alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from istune.core.rules.sampling import check_state, check_weights, sample_in_proportion
from istune.core.selection import SWITCH_INTERVAL, SelectionRule, StepView
from istune.rule_catalog import RuleParameter

EXPLORATION = RuleParameter(
    "exploration", 0.1, low=0, high=1, source="MISA 2025, GRASS 2026",
    help="ε in [0, 1]: the uniform share of the 'gradnorm' probabilities, p_i = (1 - ε)·g_i/Σg + ε/N_L, so every "
    "layer is revisited (an ε-mixture in place of MISA's bandit weights; MISA 2025, GRASS 2026). 0: gradient norms "
    "alone, 1: uniform. Default 0.1: every layer keeps >= ε/N_L of the first draw.")
GRADNORM_DECAY = RuleParameter(
    "gradnorm_decay", 0.9, low=0, high=1, high_open=True, source="MISA 2025",
    help="γ in [0, 1): the weight a layer's gradient-norm estimate keeps when the layer trains, g_i <- γ·g_i + "
    "(1 - γ)·|grad_i| (an EMA, as MISA 2025). Default 0.9: an estimate follows about its last 10 observations.")


class GradientNormRule(SelectionRule):
    """N_u layers drawn in proportion to an EMA of their adapter-gradient norms, mixed with uniform.

    Args:
        exploration: ε in [0, 1], the uniform share of the sampling probabilities.
        gradnorm_decay: γ in [0, 1), the weight an estimate keeps at each new observation.

    Example:
        >>> ISTConfig(strategy="gradnorm", exploration=0.1, gradnorm_decay=0.9)

    Raises:
        ValueError: ε outside [0, 1] or γ outside [0, 1).
    """

    name = "gradnorm"
    wants_gradients = True
    uses_gradient_norms = True
    parameters = (SWITCH_INTERVAL, EXPLORATION, GRADNORM_DECAY)

    def __init__(self, exploration: float = EXPLORATION.default, gradnorm_decay: float = GRADNORM_DECAY.default):
        EXPLORATION.check(exploration)
        GRADNORM_DECAY.check(gradnorm_decay)
        self.exploration = float(exploration)
        self.gradnorm_decay = float(gradnorm_decay)
        self.estimates: torch.Tensor | None = None

    def select(self, view: StepView) -> Sequence[int]:
        if self.estimates is None:
            norms = check_weights(self.name, "gradient norms", view.gradient_norms(), view.num_layers, view.step)
            self.estimates = norms.clone()
        return sample_in_proportion(self.probabilities(), view.count, view.generator)

    def observe_gradients(self, step: int, norms: dict[int, float]) -> None:
        if self.estimates is None:  # the tuner selects before it observes; nothing to update yet
            return
        for position, norm in norms.items():
            if math.isfinite(norm) and norm >= 0:
                previous = float(self.estimates[position])
                self.estimates[position] = self.gradnorm_decay * previous + (1 - self.gradnorm_decay) * norm

    def probabilities(self) -> torch.Tensor:
        """``(1 − ε)·g / Σg + ε / N_L`` (uniform when every estimate is 0), for the first draw.

        Raises:
            ValueError: called before the first selection (no estimate yet).
        """
        if self.estimates is None:
            raise ValueError("GradientNormRule.probabilities(): no estimate yet; the first select() measures them.")
        num_layers = len(self.estimates)
        uniform = torch.full_like(self.estimates, 1 / num_layers)
        total = self.estimates.sum()
        if total <= 0:
            return uniform
        return (1 - self.exploration) * self.estimates / total + self.exploration * uniform

    def state_dict(self) -> dict[str, Any]:
        return {"estimates": None if self.estimates is None else self.estimates.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(self.name, state, ("estimates",))
        estimates = state["estimates"]
        self.estimates = None if estimates is None else torch.tensor(estimates, dtype=torch.float64)
