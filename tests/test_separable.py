"""Separable G-CNNs on SE(2) / Sim(2): exact equivariance at 90 degrees for every layer variant and
model, deterministic evaluation, a cache that never goes stale (tests/test_families.py), the reference's parameter counts,
and an instrument that does catch the public code's Sim(2) bugs."""

import pytest
import torch

import kit.layers.separable as S
import kit.models.separable  # noqa: F401  (registers the models)
from kit import models
from kit.equivariance import check, max_error
from kit.fields import FieldType
from kit.groups import disk_mask
from kit.layers.separable import LIFT_VARIANTS, SIREN, VARIANTS, LieGroupConv, LieLiftingConv, shared_grid_offset
from kit.lie import SE2, Sim2

TOL = 1e-5
GRIDS = [SE2(4), SE2(8), Sim2(4, 3)]


def _quarters(G):
    return [g for g in G.elements if G.is_exact_on_grid(g)]


def _field(grid, C, digits, n=2, size=20):
    """A natural field: real digits (resized) on every (field, group-axis) slot, masked to the disk."""
    x = digits[: n * C * grid.dim, 0]
    x = torch.nn.functional.interpolate(x[:, None], size=(size, size), mode="bilinear", align_corners=False)
    return (x[:, 0] * disk_mask(size, size).float()).reshape(n, C, grid.dim, size, size)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("variant", LIFT_VARIANTS)
def test_lifting_exact_at_90_degrees(grid, variant, digits):
    m = LieLiftingConv(grid=grid, in_channels=1, out_fields=3, kernel_size=5, variant=variant)
    recs = check(m, _quarters(grid.group), x=digits[:2])
    assert len(recs) == 4 and max_error(recs) <= TOL, recs


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_group_conv_exact_at_90_degrees(grid, variant, digits):
    m = LieGroupConv(grid=grid, in_fields=2, out_fields=3, kernel_size=5, variant=variant)
    recs = check(m, _quarters(grid.group), x=_field(grid, 2, digits))
    assert len(recs) == 4 and max_error(recs) <= TOL, recs


def test_quarter_construction_equals_direct_evaluation(monkeypatch):
    """Kernels built from the first quarter by rot90 + roll equal the SIREN evaluated everywhere
    (so the exact construction is the continuous kernel, not merely some equivariant one)."""
    for grid in (SE2(8), Sim2(4, 3)):
        for cls, kw, variants in ((LieLiftingConv, dict(in_channels=2), LIFT_VARIANTS),
                                  (LieGroupConv, dict(in_fields=2), VARIANTS)):
            for v in variants:
                m = cls(grid=grid, out_fields=3, kernel_size=5, variant=v, **kw)
                a = m._build(0.3, torch.float32)
                with monkeypatch.context() as mp:
                    mp.setattr(S, "_rows", lambda g: g.rotations)
                    b = m._build(0.3, torch.float32)
                for p, q in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                    assert torch.allclose(p, q, atol=1e-5 * float(q.detach().abs().max())), (grid, cls, v)


def test_instrument_catches_reference_sim2_bugs(monkeypatch, digits):
    """Spec section 9, bug 1: the public Sim(2) group kernel is the spatial *transpose* of what it
    should be (it rotates the other way round); a kernel family completed by clockwise quarter turns
    is the same mistake. The check that passes above must fail on both."""
    grid = Sim2(4, 3)
    x = _field(grid, 2, digits)
    m = LieGroupConv(grid=grid, in_fields=2, out_fields=3, kernel_size=5)
    assert max_error(check(m, _quarters(grid.group), x=x)) <= TOL
    build = m._build
    with monkeypatch.context() as mp:
        mp.setattr(S, "_rows", lambda g: g.rotations)            # evaluate every row directly
        mp.setattr(m, "_build", lambda *a: build(*a).transpose(-1, -2))
        assert max_error(check(m, _quarters(grid.group), x=x)) > 1e-2

    def wrong_way(Kq, g, in_axis=None):              # the other quarters rotated clockwise
        Q = Kq.shape[0]
        parts = [Kq] + [torch.roll(torch.rot90(Kq, -r, dims=(-2, -1)), r * Q, dims=in_axis) for r in (1, 2, 3)]
        return torch.cat(parts, 0)

    with monkeypatch.context() as mp:
        mp.setattr(S, "_complete", wrong_way)
        assert max_error(check(m, _quarters(grid.group), x=x)) > 1e-2


def test_random_offset_training_is_stochastic_but_still_equivariant(digits):
    grid = SE2(4)
    m = LieGroupConv(grid=grid, in_fields=2, out_fields=2, kernel_size=5, variant="separable", random_offset=True)
    x = _field(grid, 2, digits, n=1)
    m.train()
    with torch.no_grad():
        assert not torch.equal(m(x), m(x))                                   # a new offset per call
        for off in (0.0, 0.4):                                               # any fixed offset: exact
            with shared_grid_offset(m, off):
                y = m(x)
                for g in _quarters(grid.group):
                    t = m.in_type.transform(x, g)
                    err = (m(t) - m.out_type.transform(y, g)).norm() / y.norm()
                    assert err <= TOL, (off, g, err)
        m.eval()
        assert torch.equal(m(x), m(x))                                       # eval: fixed grid


def test_sim2_field_layout():
    grid = Sim2(4, 3)
    t = grid.field_type(1)
    assert t.dim == 12 and t.rep.perm is not None
    x = torch.arange(12.0).view(1, 1, 12, 1, 1)                              # position a*S + m
    y = t.transform(x, grid.group.element(1))
    assert y.flatten().tolist() == [9, 10, 11, 0, 1, 2, 3, 4, 5, 6, 7, 8]    # rotation index +1, scale kept
    assert SE2(4).field_type(2) == FieldType(grid.group, "regular", 2)      # SE(2) fields are regular C_N


SMALL = ["sep-se2-mnist-small", "nonsep-se2-mnist-small", "dsep-se2-mnist-small", "sep-sim2-mnist-small"]


@pytest.mark.parametrize("name", SMALL)
def test_models_invariant_at_90_and_deterministic(name, digits):
    m = models.calibrate_batchnorm(models.create(name, random_offset=True, widths=(4, 4, 8)), digits[:16])
    recs = check(m, _quarters(m.in_type.group), x=digits[300:302])
    assert max_error(recs) <= TOL, recs
    with torch.no_grad():
        assert torch.equal(m(digits[:2]), m(digits[:2]))                     # eval: two calls, same logits
        m.train()
        a, b = m(digits[:2]), m(digits[:2])
    assert not torch.equal(a, b)                                             # training draws grid offsets


@pytest.mark.parametrize("name,params", [("nonsep-se2-mnist", 716_490), ("sep-se2-mnist", 755_370),
                                         ("dsep-se2-mnist", 77_802), ("sep-sim2-mnist", 755_722)])
def test_parameter_counts_match_reference(name, params):
    m = models.create(name)
    assert models.count_parameters(m) == params == models.model_card(name).reported["params"]


def test_siren_defaults_and_validation():
    m = LieGroupConv(grid=SE2(4), in_fields=2, out_fields=3)
    net = m.kernel_net
    assert isinstance(net, SIREN) and m.kernel_size == 7
    assert net.first.in_features == 3 and net.first.out_features == 64 and len(net.hidden) == 1
    assert net.omega_0 == net.first_omega_0 == 10.0 and net.final.out_features == 6
    with pytest.raises(ValueError, match="unknown variant 'gseparable'"):
        LieGroupConv(grid=SE2(4), in_fields=2, out_fields=3, variant="gseparable")
    with pytest.raises(ValueError, match="kernel_size must be a positive odd int"):
        LieGroupConv(grid=SE2(4), in_fields=2, out_fields=3, kernel_size=4)
    with pytest.raises(ValueError, match=r"expected a field axis \(dim 2\) of size D=12"):
        LieGroupConv(grid=Sim2(4, 3), in_fields=1, out_fields=1)(torch.zeros(1, 1, 4, 9, 9))


def test_lab_continuous_kernel_matches_layer_and_explorer_redraws():
    import io

    import matplotlib
    matplotlib.use("Agg")
    import kit.explore.separable as lab

    layer = lab.make_layers(rotations=4, in_fields=2, out_fields=2, kernel_size=5)["separable"]
    KH, _ = layer._build(0.0, torch.float32)                                 # (O*N, C*N, 1, 1)
    theta = 2 * torch.pi * torch.arange(4) / 4                              # relative rotations b - a
    dense = lab.h_kernel(layer, theta)                                      # (4, O, C)
    assert torch.allclose(KH.view(2, 4, 2, 4)[:, 0].permute(2, 0, 1), dense, atol=1e-6)
    assert lab.resample(layer, SE2(16)).state_dict().keys() == layer.state_dict().keys()

    def pixels(fig):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=40)
        return buf.getvalue()

    box = lab.grid_explorer(layer)
    slider = box.children[0].children[0]
    assert box.state["draws"] == 1 and box.state["args"] == (4, 1)
    first = pixels(box.state["figure"])
    slider.value = 8
    assert box.state["draws"] == 2 and box.state["args"] == (8, 1) and pixels(box.state["figure"]) != first
