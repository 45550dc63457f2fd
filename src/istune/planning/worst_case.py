"""Which IST step has the largest memory, in one place: every table measures (or seeds its draws to reach) it.

An IST step's memory is set by its lowest selected layer: every layer above it takes part in
the backward pass. So the worst step selects layer 0; any run of more than a few steps draws
it. With ``stored_layers = M`` a second step can be worse: the one that stores the most
selected blocks (which keep more than unselected ones).

- :func:`worst_case_selections`: the fixed selections the planner and the GPU suite measure;
- :func:`worst_case_seed`: the first seed whose draws include layer 0 (the memory table and the
  frontier measure IST's own draws, seeded so).
"""

from __future__ import annotations

import torch

from istune import rule_catalog
from istune.core import policy

__all__ = ["draw_schedule", "worst_case_seed", "worst_case_selection", "worst_case_selections"]


def worst_case_selection(num_layers: int, update_layers: int) -> list[int]:
    """IST's worst step: layer 0 (the whole stack takes part in the backward pass) and the N_u − 1 top layers."""
    return [0] + list(range(num_layers - update_layers + 1, num_layers))


def worst_case_selections(num_layers: int, update_layers: int, stored_layers: int | None = None) -> list[list[int]]:
    """The steps whose peak can be the largest: :func:`worst_case_selection`, and with ``stored_layers = M``
    (1 <= M < N_L) also the step that stores the most selected blocks: the lowest selected layer at
    N_L − max(M, N_u) and the N_u − 1 top layers. For M >= N_u every block that runs the backward pass is
    stored; for M < N_u the top N_u layers are selected and M of them stored. Draws rarely hit this second
    step (on 30 layers with N_u = M = 8, one selection in 5.9 million), so it is measured as a fixed selection."""
    selections = [worst_case_selection(num_layers, update_layers)]
    if stored_layers is not None and 1 <= stored_layers < num_layers:
        lowest = num_layers - max(stored_layers, update_layers)
        stored_worst = [lowest] + list(range(num_layers - update_layers + 1, num_layers))
        if stored_worst != selections[0]:
            selections.append(stored_worst)
    return selections


def draw_schedule(strategy: str, num_layers: int, count: int, seed: int, steps: int) -> list[list[int]]:
    """The layers each step selects, drawn as SparseTuner draws them at zero importance with ``seed``: by IST's
    importance sampling for a rule that runs the importance probes, else uniformly."""
    generator = torch.Generator().manual_seed(seed)
    rule = rule_catalog.traits(strategy)
    if rule is not None and rule.runs_importance_probes:
        zeros = torch.zeros(num_layers, dtype=torch.float64)
        return [policy.sample_layers(zeros, count, generator) for _ in range(steps)]
    return [policy.sample_uniform_layers(num_layers, count, generator) for _ in range(steps)]


def worst_case_seed(strategy: str, num_layers: int, count: int, seed: int, steps: int,
                    unmeasured: int = 0) -> tuple[int, list[list[int]]]:
    """The first seed at or after ``seed`` whose ``steps`` measured draws (after ``unmeasured`` ones) include
    layer 0 at least once; and those measured draws."""
    for candidate in range(seed, seed + 100_000):
        schedule = draw_schedule(strategy, num_layers, count, candidate, unmeasured + steps)[unmeasured:]
        if any(0 in selected for selected in schedule):
            return candidate, schedule
    raise RuntimeError(f"no seed in [{seed}, {seed + 100_000}) draws layer 0 in {steps} steps")  # pragma: no cover
