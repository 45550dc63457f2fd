"""OwLore: layers sampled in proportion to their outlier ratio (Li et al. 2024).

Li, Yin, Gao, Liu, "OwLore: Outlier-weighed Layerwise Sampled Low-Rank Projection for Memory-Efficient
LLM Fine-tuning" (2024; ACL 2025 Findings as "Outlier-weighed Layerwise Sampling for LLM Fine-tuning").
Each layer's outlier ratio D_l is OWL's (Yin et al. 2024): the share of ``|W_ij| * ||X_j||_2`` above M x
the layer's mean, measured on a calibration batch (:func:`istune.core.measures.outlier_ratios`). OwLore
then samples the layers to train with probability ``p_l = D_l / Σ_k D_k``, N_u of them without
replacement.

What the authors' released code (github.com/pixeli99/OwLore, ``lisa_prob_mode='owl'``) does, and how
this rule relates to it:

- the ratios are computed once, before training, from the pretrained model (a cached file named
  ``llama2_7b_ratio_13.txt``: M = 13 for LLaMA-2-7B; OWL uses M = 5 for LLaMA-7B pruning), and the
  probabilities never change. Here they are measured at the first step on a probe batch, and again
  every ``calibration_interval`` steps if that is positive (0, the default, follows OwLore);
- the layers are re-drawn every ``lisa_interval_steps`` (50 in its scripts) with
  ``np.random.choice(N_L, N_u, replace=False, p)``, the same successive sampling as
  ``torch.multinomial(p, N_u, replacement=False)``. That period is istune's generic ``switch_interval``
  K, which the tuner applies to every rule; this rule draws afresh whenever it is asked;
- the embeddings and the LM head are never frozen there (full-parameter fine-tuning, as LISA); with
  adapters inside the decoder layers, as here, they are not trained at all unless the user makes them
  trainable, which IST leaves alone;
- a layer with ratio 0 gets probability 0 there (numpy refuses to draw N_u distinct layers when fewer
  than N_u probabilities are positive). Here it keeps probability 0 while N_u layers with a positive ratio
  exist; otherwise the remaining places go to ratio-0 layers uniformly
  (:func:`~istune.core.rules.sampling.sample_in_proportion`).

OwLore also trains each sampled layer with GaLore's low-rank gradient projection; that is an optimizer
choice, outside the selection rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from istune.core.rules.sampling import check_state, check_weights, sample_in_proportion
from istune.core.selection import SWITCH_INTERVAL, SelectionRule, StepView
from istune.rule_catalog import RuleParameter

OUTLIER_THRESHOLD = RuleParameter(
    "outlier_threshold", 13.0, low=0, low_open=True, source="Li et al. 2024",
    help="M: OwLore (Li et al. 2024) counts a weight x input-activation score as an outlier above M x its layer's "
    "mean; layers are sampled in proportion to their share of outliers. Default 13 (OwLore's LLaMA-2 ratios; OWL "
    "prunes with 5).")
CALIBRATION_INTERVAL = RuleParameter(
    "calibration_interval", 0, low=0,
    help="R: OwLore re-measures the outlier ratios every R optimizer steps; 0 measures them once, at the first "
    "step, as OwLore does.")


class OwLoreRule(SelectionRule):
    """N_u layers drawn without replacement with probabilities in proportion to their outlier ratios.

    Args:
        outlier_threshold: M, a weight-activation score counts as an outlier above M x its layer's mean.
        calibration_interval: R, re-measure the ratios every R steps; 0 measures them only at the start.

    Example:
        >>> ISTConfig(strategy="owlore", outlier_threshold=13.0, calibration_interval=0)

    Raises:
        ValueError: M is not a positive number, or R is not a non-negative integer.
    """

    name = "owlore"
    uses_outlier_ratios = True
    parameters = (SWITCH_INTERVAL, OUTLIER_THRESHOLD, CALIBRATION_INTERVAL)

    def __init__(self, outlier_threshold: float = OUTLIER_THRESHOLD.default,
                 calibration_interval: int = CALIBRATION_INTERVAL.default):
        OUTLIER_THRESHOLD.check(outlier_threshold)
        CALIBRATION_INTERVAL.check(calibration_interval)
        self.outlier_threshold = float(outlier_threshold)
        self.calibration_interval = calibration_interval
        self.ratios: torch.Tensor | None = None
        self.measured_at: int | None = None

    def select(self, view: StepView) -> Sequence[int]:
        if self._calibration_due(view.step):
            ratios = view.outlier_ratios(self.outlier_threshold)
            self.ratios = check_weights(self.name, "outlier ratios", ratios, view.num_layers, view.step)
            self.measured_at = view.step
        return sample_in_proportion(self.ratios, view.count, view.generator)

    def probabilities(self) -> torch.Tensor | None:
        """``p_l = D_l / Σ D`` for the first draw (uniform when every ratio is 0); None before the first step."""
        if self.ratios is None:
            return None
        total = self.ratios.sum()
        return self.ratios / total if total > 0 else torch.full_like(self.ratios, 1 / len(self.ratios))

    def _calibration_due(self, step: int) -> bool:
        if self.ratios is None:
            return True
        return self.calibration_interval > 0 and step - self.measured_at >= self.calibration_interval

    def state_dict(self) -> dict[str, Any]:
        return {"ratios": None if self.ratios is None else self.ratios.tolist(), "measured_at": self.measured_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(self.name, state, ("ratios", "measured_at"))
        ratios, measured_at = state["ratios"], state["measured_at"]
        self.ratios = None if ratios is None else torch.tensor(ratios, dtype=torch.float64)
        self.measured_at = measured_at
