"""Shared fixtures: real digits from the bundled sample, deterministic seeds, small thread count."""
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits():
    """Real rotated MNIST digits (bundled sample), (N, 1, 28, 28) in [0, 1], masked to the disk."""
    from kit.groups import disk_mask
    from kit.sample import load_sample
    return load_sample()["images"] * disk_mask(28, 28).float()
