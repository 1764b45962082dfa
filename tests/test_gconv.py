"""Regular group convolutions: exact equivariance on C4 / D4, approximate on C8, kernel caching
that never goes stale (the contract over the family registry, tests/test_families.py), pooling and batch norm that keep the contract."""

import pytest
import torch

from kit.equivariance import check, max_error
from kit.fields import regular
from kit.groups import cyclic, dihedral
from kit.layers import (FieldReLU, GroupBatchNorm, GroupConv, GroupPool, InvariantHead, LiftingConv,
                        SpatialPool)

TOL = 1e-5


def _field_input(G, C, digits, n=2):
    # a natural regular field: C*|G| different digits arranged on the field axis
    return digits[: n * C * G.order, 0].reshape(n, C, G.order, 28, 28)


@pytest.mark.parametrize("G", [cyclic(4), dihedral(4)], ids=str)
@pytest.mark.parametrize("k", [3, 5])
def test_lifting_and_group_conv_exact(G, k, digits):
    lift = LiftingConv(group=G, in_channels=1, out_fields=4, kernel_size=k)
    gc = GroupConv(group=G, in_fields=3, out_fields=4, kernel_size=k)
    assert lift.exact and gc.exact
    r1 = check(lift, x=digits[:2])
    r2 = check(gc, x=_field_input(G, 3, digits))
    assert len(r1) == len(r2) == G.order
    assert max_error(r1) <= TOL and max_error(r2) <= TOL, (r1, r2)


def test_c8_exact_on_c4_subgroup_and_approximate_at_45(digits):
    G = cyclic(8)
    lift = LiftingConv(group=G, in_channels=1, out_fields=4, kernel_size=5)
    assert not lift.exact
    recs = {r.element.k: r.error for r in check(lift, x=digits[:2])}
    assert max(recs[k] for k in (0, 2, 4, 6)) <= TOL
    assert min(recs[k] for k in (1, 3, 5, 7)) > 10 * TOL       # interpolated kernels: approximate


def test_pool_norm_relu_head_keep_contract(digits):
    G = dihedral(4)
    t = regular(G, 3)
    x = _field_input(G, 3, digits)
    for m in [FieldReLU(t), GroupBatchNorm(t), GroupPool(t), SpatialPool(t), SpatialPool(t, mode="avg"),
              InvariantHead(t, 5)]:
        if isinstance(m, GroupBatchNorm):
            m.train()(x)          # non-trivial running statistics
        assert max_error(check(m, x=x)) <= TOL, m


def test_parameter_count_is_per_field():
    gc = GroupConv(group=cyclic(4), in_fields=3, out_fields=5, kernel_size=3)
    assert sum(p.numel() for p in gc.parameters()) == 5 * 3 * 4 * 9 + 5
    lift = LiftingConv(group=dihedral(4), in_channels=2, out_fields=5, kernel_size=5, bias=False)
    assert sum(p.numel() for p in lift.parameters()) == 5 * 2 * 25


def test_eval_mode_with_grad_still_differentiable(digits):
    m = LiftingConv(group=cyclic(4), in_channels=1, out_fields=2).eval()
    y = m(digits[:1])
    y.sum().backward()
    assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0
    y = m(digits[:1])                      # a second backward needs a fresh graph (no cached graph)
    y.sum().backward()


def test_bad_layer_inputs():
    G = cyclic(4)
    gc = GroupConv(group=G, in_fields=3, out_fields=2)
    with pytest.raises(ValueError, match="GroupConv input: expected a 5-D tensor"):
        gc(torch.randn(1, 12, 9, 9))
    with pytest.raises(ValueError, match=r"field axis \(dim 2\) of size D=4 .* got 8"):
        gc(torch.randn(1, 3, 8, 9, 9))
    lift = LiftingConv(group=G, in_channels=1, out_fields=2)
    with pytest.raises(ValueError, match=r"expected C=1 fields .* got 3"):
        lift(torch.randn(1, 3, 9, 9))
    with pytest.raises(ValueError, match="kernel_size must be a positive odd int"):
        GroupConv(group=G, in_fields=1, out_fields=1, kernel_size=4)
    with pytest.raises(ValueError, match="group order n must be >= 1"):
        LiftingConv(group=cyclic(0), in_channels=1, out_fields=1)
