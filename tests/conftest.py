"""Shared fixtures: real digits from the bundled sample, deterministic seeds, small thread count."""
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Tests never touch the network: no first-use download (a test of a download path passes its own
    fake ``fetch`` and lifts this)."""
    monkeypatch.setenv("KIT_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits():
    """Real rotated MNIST digits (bundled sample), (N, 1, 28, 28) in [0, 1], masked to the disk."""
    from kit.groups import disk_mask
    from kit.data.sample import load_sample
    return load_sample()["images"] * disk_mask(28, 28).float()


@pytest.fixture
def one_thread():
    """One torch thread for the test (modules opt in with ``pytestmark = usefixtures("one_thread")``):
    small kernels run faster without two threads contending on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

