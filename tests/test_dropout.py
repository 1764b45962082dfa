"""kit.kernels.dropout: element-wise dropout with a counter-based mask (csrc/dropout.cpp) against its plain-PyTorch
stream (dropout_mask), F.dropout's distribution, and the generator / thread / fallback contract."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kit.fields import FieldType
from kit.groups import cyclic
from kit.kernels import reference_kernels
from kit.kernels.dropout import dropout, dropout_extension, dropout_mask
from kit.layers import FieldDropout
from kit.measure.timing import torch_threads

pytestmark = pytest.mark.skipif(dropout_extension() is None, reason="no C++ compiler: dropout is F.dropout here")


def _seed_of_next_call() -> int:
    """The seed the next dropout call draws (the generator's state is put back)."""
    state = torch.get_rng_state()
    seed = int(torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), dtype=torch.int64))
    torch.set_rng_state(state)
    return seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_mask_is_the_reference_stream_forward_and_backward(dtype, p):
    x = torch.randn(3, 5, 4, 7, 9, dtype=dtype).requires_grad_()
    seed = _seed_of_next_call()
    y = dropout(x, p)
    assert type(y.grad_fn).__name__ == "_DropoutBackward"
    keep = dropout_mask(x.numel(), seed, p).view(x.shape)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=dtype)
    assert torch.equal(y, torch.where(keep, x * scale, torch.zeros((), dtype=dtype)))
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, gy)
    assert torch.equal(gx, torch.where(keep, gy * scale, torch.zeros((), dtype=dtype)))


def test_distribution_is_bernoulli():
    """Keep fraction within 5 sigma of 1 - p, and neighbouring elements (in memory and across calls) uncorrelated."""
    n, p = 2_000_000, 0.2
    x = torch.ones(n)
    a, b = dropout(x, p) != 0, dropout(x, p) != 0
    sigma = math.sqrt(p * (1 - p) / n)
    for m in (a, b):
        assert abs(m.double().mean().item() - (1 - p)) < 5 * sigma
    for u, v in ((a[1:], a[:-1]), (a, b), (a[64:], a[:-64])):
        u, v = u.double() - u.double().mean(), v.double() - v.double().mean()
        corr = (u * v).mean() / (u.std() * v.std())
        assert abs(corr.item()) < 5 / math.sqrt(n)


def test_one_generator_draw_reproducible_and_thread_independent():
    x = torch.randn(64, 16, 4, 7, 7)
    torch.manual_seed(5)
    y1 = dropout(x, 0.3)
    after = torch.get_rng_state()
    torch.manual_seed(5)
    torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), dtype=torch.int64)
    assert torch.equal(torch.get_rng_state(), after)            # exactly one draw: checkpoints resume it
    with torch_threads(2):
        torch.manual_seed(5)
        y2 = dropout(x, 0.3)
    assert torch.equal(y1, y2)                                   # each element's draw is its own
    assert not torch.equal(dropout(x, 0.3), dropout(x, 0.3))


def test_identity_fallbacks_and_errors():
    x = torch.randn(2, 3, 4, 5, 5)
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0) is x
    with reference_kernels():                                    # aten's F.dropout, its own stream
        torch.manual_seed(1)
        y = dropout(x.requires_grad_(), 0.3)
        torch.manual_seed(1)
        assert torch.equal(y, F.dropout(x, 0.3)) and type(y.grad_fn).__name__ != "_DropoutBackward"
    assert type(dropout(x.half(), 0.3).grad_fn).__name__ != "_DropoutBackward"   # other dtypes: F.dropout
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(ValueError, match=r"dropout probability p must be in \[0, 1\)"):
            dropout(x, bad)
    with pytest.raises(ValueError, match=r"dropout probability p must be in \[0, 1\), got True"):
        FieldDropout(FieldType(cyclic(4), "regular", 3), p=True)


def test_field_dropout_module_in_a_model_step():
    """E4's and the PDO nets' FieldDropout are one module, running the counter-based dropout in training."""
    from kit import models
    from kit.models.e4 import FieldDropout as E4Drop
    from kit.models.pdo import FieldDropout as PDODrop
    assert E4Drop is PDODrop is FieldDropout
    m = models.create("e4-mnist-normal").train()
    drops = [d for d in m.modules() if isinstance(d, FieldDropout)]
    assert len(drops) == 5
    seen = []
    h = drops[0].register_forward_hook(lambda mod, i, o: seen.append(type(o.grad_fn).__name__))
    m(torch.rand(2, 1, 28, 28)).sum().backward()
    h.remove()
    assert seen == ["_DropoutBackward"]
    assert all(p.grad is not None for p in m.parameters())
