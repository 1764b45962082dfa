"""Equivariant 1x1 maps in the isotypic bases (:mod:`kit.kernels.isotypic`), the Neural-ePDO speed path of
issue 15, against the dense 1x1 convolution (its reference):

* the plan's bases are orthonormal, span irreducible subspaces, and rebuild every intertwiner basis
  element to 1e-12 (C16 / D16 regular, the quotient type, mixed, to and from trivial); Schur's blocks
  hold the multiply-accumulates counted from the representation theory (C16 regular: 32 of 256);
* a wide :class:`EquivariantConv1x1` takes the path, and its output, input gradient and weight gradient
  equal the dense map's in float64 to 1e-12; it is exactly equivariant (float64) and within float32
  round-off of the dense map;
* it is not taken where it does not pay (narrow maps, few savings), inside ``reference_kernels()``, or
  off the CPU; its eval-mode cache never goes stale and never mixes with the dense filter's;
* ``torch.compile`` captures it whole (inductor, fullgraph) and matches eager.
"""
import pytest
import torch

from kit.equivariance import check
from kit.fields import FieldType
from kit.groups import cyclic, dihedral, trivial_rep
from kit.kernels import isotypic as I
from kit.kernels import reference_kernels
from kit.kernels.intertwiners import intertwiner_basis
from kit.layers.epdo import EquivariantConv1x1
from kit.reps import field_rep, quotient_rep
from fused_helpers import built_or_skip

pytestmark = pytest.mark.usefixtures("one_thread")

C16, D16 = cyclic(16), dihedral(16)
PAIRS = {
    "C16 regular": (field_rep(C16, "regular"), field_rep(C16, "regular")),
    "D16 regular": (field_rep(D16, "regular"), field_rep(D16, "regular")),
    "C16 quotient type": (field_rep(C16, "quotient"), field_rep(C16, "quotient")),
    "C16 quotient -> regular": (field_rep(C16, "quotient"), field_rep(C16, "regular")),
    "C16 regular -> quotient_4": (field_rep(C16, "regular"), quotient_rep(C16, 4)),
    "C8 regular -> trivial": (field_rep(cyclic(8), "regular"), trivial_rep(cyclic(8))),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_plan_rebuilds_every_equivariant_map(name):
    rho_in, rho_out = PAIRS[name]
    plan = I.isotypic_plan(rho_in, rho_out)
    assert plan is not None, name
    B = intertwiner_basis(rho_in, rho_out)
    rebuilt = torch.einsum("sre,nsri,sid->ned", plan.q_out, plan.blocks(B), plan.q_in)
    assert (rebuilt - B).abs().max() <= 1e-12, name
    for q, rho in ((plan.q_in, rho_in), (plan.q_out, rho_out)):
        rows = q.reshape(-1, q.shape[-1])
        rows = rows[rows.norm(dim=1) > 0.5]                                    # drop the padding
        assert torch.allclose(rows @ rows.T, torch.eye(len(rows), dtype=torch.float64), atol=1e-12)
    # every slot row spans part of an invariant subspace: rho(g) maps the slot's span into itself
    for s in range(plan.slots[0]):
        q = plan.q_in[s][plan.q_in[s].norm(dim=1) > 0.5]
        proj = q.T @ q
        for M in rho_in.matrices.double():
            assert torch.allclose(proj @ M @ proj, M @ proj, atol=1e-12)


def test_schur_blocks_count_what_representation_theory_says():
    """C_n regular: the real Fourier basis, 2 one-dimensional and n/2-1 two-dimensional types (2n-2
    multiply-accumulates of n^2 per field pair; packed, the two 1-d types share one 2x2 slot: 2n);
    D_n regular: 4 one-dimensional types and n/2-1 two-dimensional ones of multiplicity 2."""
    plan = I.isotypic_plan(*PAIRS["C16 regular"])
    assert plan.slots == (8, 2, 2)
    assert int(plan.mask.sum()) == 2 * 16 - 2                                  # the exact block sizes
    plan = I.isotypic_plan(*PAIRS["D16 regular"])
    assert plan.slots == (8, 4, 4)
    assert int(plan.mask.sum()) == 4 * 1 + 7 * 16
    assert plan.mac_ratio(32, 32) < 0.2
    subspaces = I.irreducible_subspaces(field_rep(C16, "regular"))
    dims = sorted(q.shape[0] for _, q in subspaces)
    assert dims == [1, 1] + [2] * 7
    chars = {chi for chi, _ in subspaces}
    assert len(chars) == 9                                                     # 9 inequivalent types


def _wide(rep="regular", G=C16, c_in=24, c_out=32):
    torch.manual_seed(0)
    rho = field_rep(G, rep)
    return EquivariantConv1x1(FieldType(G, rho, c_in), FieldType(G, rho, c_out))


@pytest.mark.parametrize("G,rep,c_in,c_out", [(C16, "regular", 24, 32), (C16, "quotient", 20, 12),
                                               (D16, "regular", 12, 16)])
def test_wide_map_takes_the_isotypic_path_and_equals_the_dense_map(G, rep, c_in, c_out):
    m = _wide(rep, G, c_in, c_out).double()
    x = torch.randn(2, c_in, m.in_type.dim, 7, 5, dtype=torch.float64, requires_grad=True)
    assert m.uses_isotypic(x)
    y = m(x)
    gy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, m.weight), gy)
    with reference_kernels():
        assert not m.uses_isotypic(x)
        y0 = m(x)
        gx0, gw0 = torch.autograd.grad(y0, (x, m.weight), gy)
    for a, b in ((y, y0), (gx, gx0), (gw, gw0)):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()
    # float32: the two formulations differ by round-off only
    m32 = m.float()
    x32 = x.detach().float()
    with torch.no_grad():
        y32 = m32(x32)
        with reference_kernels():
            y32_dense = m32(x32)
    assert ((y32 - y32_dense).norm() / y32_dense.norm()) <= 1e-6


def test_isotypic_path_is_exactly_equivariant_in_float64():
    m = _wide().double().eval()
    x = torch.randn(1, 24, 16, 9, 9, dtype=torch.float64)
    assert m.uses_isotypic(x)
    records = check(m, x=x)
    assert records and max(r.error for r in records) <= 1e-12


def test_isotypic_path_only_where_it_pays(monkeypatch):
    narrow = _wide(c_in=16, c_out=16)                                           # 256 channels < MIN_CHANNELS
    assert not narrow.uses_isotypic(torch.randn(1, 16, 16, 3, 3))
    c4 = _wide(G=cyclic(4), c_in=128, c_out=128)                               # blocks 8 of 16 MACs: no gain
    assert c4._plan.mac_ratio(128, 128) > I.MAX_MAC_RATIO
    assert not c4.uses_isotypic(torch.randn(1, 128, 4, 3, 3))
    wide = _wide()
    x = torch.randn(1, 24, 16, 3, 3)
    assert wide.uses_isotypic(x)
    assert not wide.uses_isotypic(x.to("meta"))                                # off the CPU: the dense map
    calls = []
    real = I.isotypic_conv1x1
    monkeypatch.setattr(I, "isotypic_conv1x1", lambda *a: calls.append(1) or real(*a))
    wide(x)
    narrow(torch.randn(1, 16, 16, 3, 3))
    with reference_kernels():
        wide(x)
    assert calls == [1]


def test_isotypic_cache_never_stale_and_never_mixed_with_the_dense_filter():
    m = _wide().eval()
    x = torch.randn(1, 24, 16, 4, 4)
    with torch.no_grad():
        y1 = m(x)
        dense = m.filter()                                                     # the other kernel, same weight
        assert dense.shape == (32 * 16, 24 * 16, 1, 1)
        assert torch.equal(m(x), y1)
        m.weight.mul_(2.0)                                                     # an in-place update
        assert torch.allclose(m(x), 2 * y1, rtol=1e-5, atol=1e-6)
        state = {k: v.clone() for k, v in m.state_dict().items()}
        state["weight"] = state["weight"] / 4
        m.load_state_dict(state)
        assert torch.allclose(m(x), 0.5 * y1, rtol=1e-5, atol=1e-6)
        with reference_kernels():
            assert torch.allclose(m(x), 0.5 * y1, rtol=1e-5, atol=1e-6)


def test_compiled_isotypic_map_is_captured_whole_and_matches_eager():
    torch._dynamo.reset()
    m = _wide()
    x = torch.randn(2, 24, 16, 5, 5, generator=torch.Generator().manual_seed(1))
    assert m.uses_isotypic(x)
    c = torch.compile(m, fullgraph=True, dynamic=False)
    y, yc = m(x), c(x)
    assert ((yc - y).norm() / y.norm()) <= 1e-5
    gy = torch.randn_like(y)
    (ge,) = torch.autograd.grad(y, [m.weight], gy)
    (gc,) = torch.autograd.grad(yc, [m.weight], gy)
    assert ((gc - ge).norm() / ge.norm()) <= 1e-5


# ------------------------------------------------------------------ the fused basis changes (C++)
@pytest.fixture(scope="module")
def fused_transforms():
    return built_or_skip(I.fused_isotypic_extension(), "isotypic basis changes")


@pytest.mark.parametrize("G", [C16, D16], ids=str)
@pytest.mark.parametrize("B,C,O,H,W,groups,inner", [(3, 8, 12, 7, 5, 1, 1), (2, 8, 12, 5, 5, 2, 1),
                                                     (2, 6, 30, 3, 9, 2, 15), (1, 4, 4, 1, 1, 1, 1)])
def test_fused_basis_changes_equal_the_pytorch_formulation(fused_transforms, G, B, C, O, H, W, groups, inner):
    """One C++ pass per basis change (with its layout change) against matmul + permuted copy: float64, values
    and both gradients, grouped maps and the generator's inner layout, sizes that leave a vector tail."""
    rho = field_rep(G, "regular")
    plan = I.isotypic_plan(rho, rho)
    S, R, Cc = plan.slots
    gen = torch.Generator().manual_seed(B * 100 + O)
    x = torch.randn(B, C, rho.dim, H, W, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(S * groups, (O // groups) * R, (C // groups) * Cc, generator=gen, dtype=torch.float64,
                    requires_grad=True)
    y1 = I.isotypic_conv1x1(x, w, plan, groups=groups, inner=inner, fused=True)
    y0 = I.isotypic_conv1x1(x, w, plan, groups=groups, inner=inner, fused=False)
    assert y1.shape == y0.shape == ((B, O, rho.dim, H, W) if inner == 1 else (B, O // inner, rho.dim, inner, H, W))
    gy = torch.randn(y0.shape, generator=gen, dtype=torch.float64)
    g1 = torch.autograd.grad(y1, (x, w), gy)
    g0 = torch.autograd.grad(y0, (x, w), gy)
    for a, b in ((y1, y0), *zip(g1, g0)):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()


def test_wide_map_runs_the_fused_basis_changes(fused_transforms, monkeypatch):
    calls = []
    real = fused_transforms.to_slots
    monkeypatch.setattr(I, "fused_isotypic_extension",
                        lambda: type("E", (), {"to_slots": lambda self, *a: calls.append(1) or real(*a),
                                               "from_slots": lambda self, *a: fused_transforms.from_slots(*a)})())
    _wide()(torch.randn(1, 24, 16, 3, 3))
    assert calls == [1]
