"""The IST policy: which layers to train (eq. 6-7) and how importance learns (eq. 9-10).

Pure torch, no model in sight. Every random draw comes from the policy's own
``torch.Generator``, so the same seed gives the same selections run after run
and the training loop's global RNG is never touched.
"""

from __future__ import annotations

import math

import torch


def sample_layers(importance: torch.Tensor, count: int, generator: torch.Generator) -> list[int]:
    """Draw a layer set from the importance policy (paper eq. 6-7).

    Each layer i gets a score ``p_i ~ U(0, sigmoid(I_i))``; the ``count`` layers with the
    largest scores are chosen. A layer with higher importance has a wider interval and
    so tends to win, but every layer keeps a chance.

    Args:
        importance: ``(N_L,)`` importance vector I.
        count: how many layers to choose (N_u for training, N_v for a probe candidate).
        generator: the policy's random generator.

    Returns:
        The chosen layer positions, sorted ascending.
    """
    upper = torch.sigmoid(importance.to(torch.float64))
    scores = torch.rand(upper.shape, generator=generator, dtype=torch.float64) * upper  # eq. 6
    chosen = torch.topk(scores, count).indices  # eq. 7
    return sorted(chosen.tolist())


def sample_uniform_layers(num_layers: int, count: int, generator: torch.Generator) -> list[int]:
    """Choose ``count`` of ``num_layers`` layers uniformly at random (random sparse / LISA-style)."""
    return sorted(torch.randperm(num_layers, generator=generator)[:count].tolist())


def sample_candidates(
    importance: torch.Tensor, size: int, num_candidates: int, generator: torch.Generator
) -> list[list[int]]:
    """Draw up to ``num_candidates`` distinct probe sets S_c^j of ``size`` layers each.

    Candidates come from the same policy as training selections (eq. 6-7). When fewer
    distinct sets exist than requested (e.g. a 2-layer model), all that exist are
    returned; the number of draws is bounded, so this never loops forever.
    """
    num_layers = importance.numel()
    wanted = min(num_candidates, math.comb(num_layers, size))
    candidates: list[list[int]] = []
    for _ in range(20 * num_candidates):
        if len(candidates) == wanted:
            break
        candidate = sample_layers(importance, size, generator)
        if candidate not in candidates:
            candidates.append(candidate)
    return candidates


def rewards_from_losses(losses: torch.Tensor, scale: str = "paper") -> torch.Tensor:
    """Reward of each probe candidate (paper eq. 9): ``r_j = exp(-L_j) - mean_k exp(-L_k)``.

    With ``scale="spread"`` the rewards are divided by their root mean square over the
    candidates, ``sqrt(mean_k r_k^2)``, so they have unit spread whatever the loss level and
    μ becomes scale-free (N_c = 2 gives rewards of exactly ±1). Equal losses give zero rewards
    in both scales.
    """
    gains = torch.exp(-losses.to(torch.float64))
    rewards = gains - gains.mean()
    if scale == "paper":
        return rewards
    if scale != "spread":
        raise ValueError(f"reward scale {scale!r}: use 'paper' or 'spread'")
    spread = rewards.square().mean().sqrt()
    return rewards / spread if spread > 0 else rewards


def update_importance(
    importance: torch.Tensor, candidates: list[list[int]], rewards: torch.Tensor, mu: float
) -> torch.Tensor:
    """Apply eq. 10: ``I_i += mu * r_j`` for every layer i in candidate S_c^j.

    A layer that appears in several candidates collects each of their rewards.
    Returns a new tensor; the input is left as it was.
    """
    updated = importance.clone()
    for candidate, reward in zip(candidates, rewards.tolist()):
        updated[candidate] += mu * reward
    return updated
