"""Drawing N_u distinct layers with probabilities in proportion to non-negative weights."""

from __future__ import annotations

import torch


def sample_in_proportion(weights: torch.Tensor, count: int, generator: torch.Generator) -> list[int]:
    """``count`` distinct positions drawn without replacement, each draw in proportion to ``weights``.

    Successive sampling, as ``torch.multinomial(weights, count, replacement=False)`` and numpy's
    ``choice(replace=False, p=...)`` do it: the first draw picks i with probability w_i / Σw, the next
    among the rest in proportion to their weights, and so on. A layer of weight 0 is never drawn while a
    layer of positive weight remains; when fewer than ``count`` weights are positive, the remaining places
    go to the zero-weight layers uniformly at random (the limit of giving them a vanishing floor). All
    zero: uniform.

    Args:
        weights: ``(N_L,)`` finite, non-negative.
        count: N_u, at most N_L.
        generator: every draw comes from it.

    Returns:
        The positions, sorted.
    """
    weights = weights.to(torch.float64)
    positive = torch.nonzero(weights > 0).flatten()
    zero = torch.nonzero(weights <= 0).flatten()
    chosen = []
    taken = min(count, len(positive))
    if taken:
        picks = torch.multinomial(weights[positive], taken, replacement=False, generator=generator)
        chosen += positive[picks].tolist()
    if count > taken:
        picks = torch.multinomial(torch.ones(len(zero), dtype=torch.float64), count - taken, replacement=False,
                                  generator=generator)
        chosen += zero[picks].tolist()
    return sorted(chosen)


def check_weights(rule: str, what: str, values: torch.Tensor, num_layers: int, step: int) -> torch.Tensor:
    """``values`` as a float64 CPU tensor after checking it holds ``num_layers`` finite, non-negative numbers.

    Raises:
        ValueError: naming the rule, what was measured, the step and the values.
    """
    values = torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float64).flatten()
    if values.shape != (num_layers,) or not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ValueError(f"selection rule {rule!r}: the {what} at step {step} are {values.tolist()}; they must be "
                         f"{num_layers} finite, non-negative numbers (one per layer). A non-finite value usually "
                         "means the measuring batch overflowed (fp16) or has no target tokens.")
    return values


def check_state(rule: str, state: dict, keys: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the rule and the missing keys unless ``state`` holds every key."""
    missing = [key for key in keys if key not in state]
    if missing:
        raise ValueError(f"selection rule {rule!r}: its saved state lacks {missing} (it has {sorted(state)}); "
                         f"resume with the strategy the checkpoint was written with.")
