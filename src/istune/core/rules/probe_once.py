"""One-time probe: at the first step a probe picks N_u layers, which then train at every step.

After Aletheia (2026), which picks the layers to fine-tune once, by a probe before training, and
keeps them. Two probes:

- ``probe_by="gradient"`` (the default): one forward and backward with every adapter trainable
  (``view.gradient_norms()``); the N_u layers with the largest adapter-gradient norm. Cost: one
  training step over all layers.
- ``probe_by="suppression"``: IST's probe (eq. 8) with one layer at a time at full response and every
  other layer's adapters scaled by β; the N_u layers whose lone probe gives the lowest loss. Cost: N_L
  forward passes without gradients on one probe batch (``view.probe_losses`` with N_L candidates),
  once.

Why gradients are the default: right after LoRA's initialisation (B = 0) every adapter outputs zero, so
scaling it by β changes nothing and all N_L suppression probes give the same loss; they carry no signal
(the rule then logs a warning and the choice among the tied layers is random). The gradient with respect
to B is not zero there (it is ∂L/∂(output) times A·x), so gradient norms rank the layers from the first
step. Ties are broken at random with the tuner's generator in both probes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from istune.core.rules.sampling import check_state
from istune.core.selection import SelectionRule, StepView
from istune.rule_catalog import RuleParameter

logger = logging.getLogger(__name__)

# 'gradient' by default: suppression probes are blind at LoRA's initialisation (B = 0).
PROBE_BY = RuleParameter(
    "probe_by", "gradient", choices=("gradient", "suppression"), source="after Aletheia 2026",
    help="How 'probe-once' (after Aletheia 2026) picks its N_u layers at step 0: 'gradient' (default: the largest "
    "adapter-gradient norms; works from LoRA's initialisation) or 'suppression' (IST's eq. 8 probe with each layer "
    "alone at full response: the lowest losses).")
PROBES = PROBE_BY.choices


class ProbeOnceRule(SelectionRule):
    """The N_u layers a probe ranks highest at the first step, then the same layers at every step.

    Args:
        probe_by: 'gradient' (largest adapter-gradient norms) or 'suppression' (lowest loss with only
            that layer at full response).

    Example:
        >>> ISTConfig(strategy="probe-once", probe_by="gradient")

    Raises:
        ValueError: ``probe_by`` is not one of :data:`PROBES`.
    """

    name = "probe-once"
    parameters = (PROBE_BY,)  # no K: it never chooses again

    def __init__(self, probe_by: str = PROBE_BY.default):
        PROBE_BY.check(probe_by)
        self.probe_by = probe_by
        self.uses_probe_losses = probe_by == "suppression"  # the tuner must prepare eq. 8 suppression for it
        self.uses_gradient_norms = probe_by == "gradient"
        self.chosen: list[int] | None = None
        self.scores: list[float] | None = None

    def select(self, view: StepView) -> Sequence[int]:
        if self.chosen is None:
            self.chosen, self.scores = self._probe(view)
            logger.info("probe-once (%s): training layers %s from now on; scores %s", self.probe_by, self.chosen,
                        [round(score, 6) for score in self.scores])
        return list(self.chosen)

    def _probe(self, view: StepView) -> tuple[list[int], list[float]]:
        """The chosen positions (sorted) and every layer's score, higher = more important."""
        if self.probe_by == "gradient":
            scores = torch.as_tensor(view.gradient_norms(), dtype=torch.float64).flatten()
            what = "gradient norms"
        else:
            losses = torch.as_tensor(view.probe_losses([[j] for j in range(view.num_layers)]),
                                     dtype=torch.float64).flatten()
            scores = -losses
            what = "suppression probe losses"
            if len(losses) and bool(torch.isfinite(losses).all()) and bool((losses == losses[0]).all()):
                logger.warning("probe-once: all %d suppression probes gave the same loss %s (every adapter outputs "
                               "zero, as right after LoRA's initialisation): the layers are chosen at random. Use "
                               "probe_by='gradient'.", len(losses), float(losses[0]))
        if scores.shape != (view.num_layers,) or not bool(torch.isfinite(scores).all()):
            raise ValueError(f"selection rule {self.name!r}: the {what} at step {view.step} are "
                             f"{(-scores if what.startswith('supp') else scores).tolist()}; they must be "
                             f"{view.num_layers} finite numbers. The probe batch may have overflowed (fp16) or hold "
                             "no target tokens.")
        order = torch.randperm(view.num_layers, generator=view.generator)  # random tie-break
        ranked = order[torch.argsort(scores[order], descending=True, stable=True)]
        return sorted(ranked[: view.count].tolist()), scores.tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"probe_by": self.probe_by, "chosen": self.chosen, "scores": self.scores}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(self.name, state, ("chosen",))
        self.chosen = None if state["chosen"] is None else [int(j) for j in state["chosen"]]
        self.scores = state.get("scores")
