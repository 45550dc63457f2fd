"""The policy (eq. 6-7, 9-10) against computations written out another way."""

import math

import pytest
import torch

from istune.core import policy


def test_sample_layers_is_top_k_of_uniform_scores_scaled_by_sigmoid():
    importance = torch.tensor([0.0, 3.0, -2.0, 1.0, 0.5, -0.5], dtype=torch.float64)
    chosen = policy.sample_layers(importance, 3, torch.Generator().manual_seed(7))
    # The same draws by hand: p_i = u_i * sigmoid(I_i), S = the 3 largest p_i.
    u = torch.rand(6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    p = [u[i].item() / (1 + math.exp(-importance[i].item())) for i in range(6)]
    expected = sorted(sorted(range(6), key=lambda i: -p[i])[:3])
    assert chosen == expected


def test_sample_layers_prefers_important_layers():
    importance = torch.tensor([5.0, 5.0, -5.0, -5.0], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(500):
        counts[policy.sample_layers(importance, 2, generator)] += 1
    assert counts[0] > 400 and counts[1] > 400 and counts[2] < 100 and counts[3] < 100


def test_uniform_sampling_covers_all_layers_evenly():
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(8)
    for _ in range(2000):
        chosen = policy.sample_uniform_layers(8, 2, generator)
        assert len(set(chosen)) == 2
        counts[chosen] += 1
    assert (counts / 2000 - 0.25).abs().max() < 0.04


@pytest.mark.parametrize("num_layers,size,wanted,expected", [(2, 1, 3, 2), (2, 2, 3, 1), (3, 2, 3, 3), (32, 16, 3, 3)])
def test_candidates_are_distinct_and_bounded(num_layers, size, wanted, expected):
    importance = torch.zeros(num_layers, dtype=torch.float64)
    candidates = policy.sample_candidates(importance, size, wanted, torch.Generator().manual_seed(0))
    assert len(candidates) == expected
    assert len({tuple(c) for c in candidates}) == expected
    assert all(len(c) == size for c in candidates)


def test_rewards_match_eq_9():
    losses = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    mean_gain = (math.exp(-1.0) + math.exp(-2.0) + math.exp(-0.5)) / 3
    expected = [math.exp(-1.0) - mean_gain, math.exp(-2.0) - mean_gain, math.exp(-0.5) - mean_gain]
    assert policy.rewards_from_losses(losses).tolist() == pytest.approx(expected, abs=1e-15)


def test_spread_scaled_rewards_are_eq_9_over_their_root_mean_square():
    losses = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    paper = policy.rewards_from_losses(losses)
    scaled = policy.rewards_from_losses(losses, "spread")
    rms = math.sqrt(sum(r * r for r in paper.tolist()) / 3)
    assert scaled.tolist() == pytest.approx([r / rms for r in paper.tolist()], abs=1e-12)
    assert float(scaled.square().mean()) == pytest.approx(1.0, abs=1e-12)
    # Scale-free: shifting every loss by a constant multiplies eq. 9's rewards by e^-c, not these.
    assert policy.rewards_from_losses(losses + 3.0, "spread").tolist() == pytest.approx(scaled.tolist(), abs=1e-9)
    assert policy.rewards_from_losses(losses + 3.0).tolist() != pytest.approx(paper.tolist(), abs=1e-3)


def test_spread_scaled_rewards_of_two_candidates_are_plus_minus_one_and_of_equal_losses_zero():
    assert policy.rewards_from_losses(torch.tensor([0.3, 0.7], dtype=torch.float64), "spread").tolist() == \
        pytest.approx([1.0, -1.0])
    assert policy.rewards_from_losses(torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64), "spread").tolist() == \
        [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="'std'"):
        policy.rewards_from_losses(torch.tensor([0.5, 0.6]), "std")


def test_update_matches_eq_10_including_layers_in_several_candidates():
    importance = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    candidates = [[0, 1], [1, 2]]
    rewards = torch.tensor([0.5, -0.25], dtype=torch.float64)
    updated = policy.update_importance(importance, candidates, rewards, mu=10.0)
    assert updated.tolist() == pytest.approx([0.1 + 5.0, 0.2 + 5.0 - 2.5, 0.3 - 2.5, 0.4])
    assert importance.tolist() == [0.1, 0.2, 0.3, 0.4]  # input untouched
