"""Shared fixtures for the adapter tests."""

import pytest
import torch


@pytest.fixture
def input_ids() -> torch.Tensor:
    """A fixed random batch, shape (2, 7)."""
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
