"""PDO-eConvs: the analytic rotation of PDOs, exact equivariance at the C4 / D4 elements for every
discretisation in the SAME direction, agreement of the three discretisations with the continuum
operator, the O(h^2) equivariance error at 45 degrees, caching and parameter counts."""
import math

import numpy as np
import pytest
import torch

import kit.layers.pdo as pdo
from kit.equivariance import check, max_error
from kit.groups import cyclic, dihedral, rotation_matrix
from kit.layers.pdo import LEARNABLE, PDOGroupConv, PDOLiftingConv, fd_monomial_matrix, refinement_study
from kit.kernels.stencils import METHODS
from kit.reps import component_index, components, substitution_matrix

TOL = 1e-5
GROUPS = [cyclic(4), dihedral(4), cyclic(8), dihedral(8), cyclic(6), cyclic(12), dihedral(12), cyclic(16)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _field_input(G, C, digits, n=2):
    k = n * C * G.order
    x = digits[:k, 0] if k <= digits.shape[0] else digits[torch.arange(k) % digits.shape[0], 0]
    return x.reshape(n, C, G.order, 28, 28)


# ----------------------------------------------------------------------- the algebra
def test_learnable_family_and_fd_matrix():
    assert LEARNABLE == [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2), (2, 1), (1, 2), (2, 2)]
    assert [component_index(*c) for c in LEARNABLE] == [0, 1, 2, 3, 4, 5, 7, 8, 12]
    M = fd_monomial_matrix()
    assert torch.linalg.det(M).item() == pytest.approx(-1.0, abs=1e-12)
    assert torch.linalg.cond(M).item() == pytest.approx(22.5, abs=0.1)


def test_substitution_is_the_chain_rule():
    """coeffs(P(A^T D)) = coeffs(P) @ T(A): checked on symbols xi (P(A^T xi) = sum (cT)_q xi^q),
    on the paper's closed forms, and as an anti-homomorphism T(AB) = T(B) T(A), mirrors included."""
    gen = torch.Generator().manual_seed(0)
    comps = components(4)
    for A in [rotation_matrix(0.7), rotation_matrix(2.1) @ torch.diag(torch.tensor([-1.0, 1.0], dtype=torch.float64))]:
        c = torch.randn(15, generator=gen, dtype=torch.float64)
        T = substitution_matrix(A)
        for xi in torch.randn(5, 2, generator=gen, dtype=torch.float64):
            eta = A.T @ xi
            lhs = sum(c[p] * eta[0] ** i * eta[1] ** j for p, (i, j) in enumerate(comps))
            rhs = sum((c @ T)[q] * xi[0] ** i * xi[1] ** j for q, (i, j) in enumerate(comps))
            assert abs(lhs - rhs) < 1e-12
    t = 0.4
    cs, s = math.cos(t), math.sin(t)
    T = substitution_matrix(rotation_matrix(t))
    row = T[component_index(1, 1)]                                # dxy -> -cs dxx + (c^2 - s^2) dxy + cs dyy
    assert torch.allclose(row[[3, 4, 5]], torch.tensor([-cs * s, cs * cs - s * s, cs * s], dtype=torch.float64))
    row = T[component_index(2, 2)]
    want = [cs * cs * s * s, 2 * cs * s * (s * s - cs * cs), cs ** 4 - 4 * cs * cs * s * s + s ** 4,
            2 * cs * s * (cs * cs - s * s), cs * cs * s * s]
    assert torch.allclose(row[10:], torch.tensor(want, dtype=torch.float64))
    A, B = rotation_matrix(0.3), rotation_matrix(1.1) @ torch.diag(torch.tensor([-1.0, 1.0], dtype=torch.float64))
    assert torch.allclose(substitution_matrix(A @ B), substitution_matrix(B) @ substitution_matrix(A))


def test_identity_kernel_is_the_raw_3x3_weight():
    """fd, 'kernel' parametrisation, no offset: the identity element's kernel is W zero-padded."""
    m = PDOLiftingConv(group=cyclic(8), in_channels=2, out_fields=3)
    K = m.filter().detach().reshape(3, 8, 2, 5, 5)[:, 0]
    assert torch.allclose(K[..., 1:4, 1:4], m.weight, atol=1e-6)
    assert K[..., 0, :].abs().max() < 1e-6 and K[..., :, 0].abs().max() < 1e-6


def test_kernel_and_pdo_parametrisations_agree():
    G = dihedral(8)
    a = PDOGroupConv(group=G, in_fields=2, out_fields=3, method="gauss", offset=math.pi / 8)
    b = PDOGroupConv(group=G, in_fields=2, out_fields=3, method="gauss", offset=math.pi / 8,
                     parametrization="pdo")
    with torch.no_grad():
        b.weight.copy_(a.coefficients())
    assert torch.allclose(a.filter(), b.filter(), atol=1e-5)


# ---------------------------------------------------- rotation direction, all methods
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("G", [cyclic(8), dihedral(4), dihedral(12)], ids=str)
def test_rotated_kernels_are_rot90_of_each_other(method, G):
    """K_{g h} = g . K_h for every grid-exact g: for the 90-degree element this is torch.rot90
    (counter-clockwise) of the kernel, the same for fd, gauss and rbffd (a mirrored
    discretisation would give rot90(-1)); with the paper's pi/8 offset too."""
    m = PDOGroupConv(group=G, in_fields=2, out_fields=2, method=method, offset=math.pi / 8)
    L = PDOLiftingConv(group=G, in_channels=2, out_fields=2, method=method, offset=math.pi / 8)
    KL = L.filter().detach().reshape(2, G.order, 2, 5, 5)                 # (O, G, C, 5, 5)
    KG = m.filter().detach().reshape(2, G.order, 2, G.order, 5, 5)        # (O, G_out, C, G_in, 5, 5)
    q = G.element(G.n // 4)                                               # +90 degrees
    for h in G.elements:
        gh = G.index(G.compose(q, h))
        assert torch.allclose(KL[:, gh], torch.rot90(KL[:, G.index(h)], 1, (-2, -1)), atol=1e-6)
    for g in [e for e in G.elements if G.is_exact_on_grid(e)]:
        for h in G.elements:
            gh = G.index(G.compose(g, h))
            assert torch.allclose(KL[:, gh], G.act_on_image(KL[:, G.index(h)], g), atol=1e-6)
            # group kernels: output g h, input g h' <- act(g) of output h, input h'
            src = G.act_on_image(KG[:, G.index(h)], g)                    # (O, C, G_in, 5, 5)
            assert torch.allclose(KG[:, gh][:, :, G.cayley[G.index(g)]], src, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_odd_order_operators_change_sign_correctly(method):
    """The lifted dx applied to the x-ramp is +1 at 0 degrees, 0 at 90 (there it is dy), -1 at
    180; on the y-ramp 0, +1, 0: the rotated operator at angle t is cos(t) dx + sin(t) dy."""
    G = cyclic(8)
    m = PDOLiftingConv(group=G, in_channels=1, out_fields=1, method=method, parametrization="pdo",
                       padding=0).double()
    with torch.no_grad():
        m.weight.zero_()
        m.weight[0, 0, LEARNABLE.index((1, 0))] = 1.0
    ii, jj = torch.meshgrid(torch.arange(9.0), torch.arange(9.0), indexing="ij")
    ramps = torch.stack([jj - 4, 4 - ii])[:, None].double()               # x-ramp, y-ramp
    out = m(ramps)[:, 0, :, 2, 2]                                          # (2, 8) at the centre
    t = torch.arange(8, dtype=torch.float64) * math.pi / 4
    assert torch.allclose(out, torch.stack([t.cos(), t.sin()]), atol=1e-9), out


def test_a_mirrored_discretisation_breaks_equivariance(monkeypatch, digits):
    """Negative control: swap x <-> y in the stencil bank (the pitfall of one public code base):
    the layer turns the other way and the C4-element check fails loudly."""
    real = pdo.stencil_bank

    def swapped(max_order, method, size, **kw):
        b = real(max_order, method, size, **kw)
        return torch.stack([b[component_index(j, i)] for i, j in components(max_order)])

    pdo._pdo_basis.cache_clear()
    monkeypatch.setattr(pdo, "stencil_bank", swapped)
    try:
        m = PDOLiftingConv(group=cyclic(8), in_channels=1, out_fields=3, method="rbffd")
        errs = {r.angle: r.error for r in check(m, elements=[cyclic(8).element(2)], x=digits[:2])}
    finally:
        pdo._pdo_basis.cache_clear()
    assert errs[90.0] > 0.1, errs


# ------------------------------------------------------------ exact equivariance
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("G", GROUPS, ids=str)
def test_exact_at_the_c4_d4_elements(method, G, digits):
    exact = [g for g in G.elements if G.is_exact_on_grid(g)]
    lift = PDOLiftingConv(group=G, in_channels=1, out_fields=3, method=method, offset=math.pi / 8, bias=True)
    gc = PDOGroupConv(group=G, in_fields=2, out_fields=3, method=method, padding=1)
    r1 = check(lift, elements=exact, x=digits[:2])
    r2 = check(gc, elements=exact, x=_field_input(G, 2, digits))
    assert max_error(r1) <= TOL and max_error(r2) <= TOL, (r1, r2)


def test_approximate_off_the_grid(digits):
    G = cyclic(8)
    recs = {r.element.k: r.error for r in check(PDOLiftingConv(group=G, in_channels=1, out_fields=3), x=digits[:2])}
    assert max(recs[k] for k in (0, 2, 4, 6)) <= TOL
    assert min(recs[k] for k in (1, 3, 5, 7)) > 10 * TOL


# ------------------------------------------------------------- the continuum limit
def test_all_discretisations_approximate_the_same_rotated_operator():
    """Same coefficients, three discretisations, every orientation of C8: the lifted output on a
    plane wave matches the continuum P(A_g^T D) f (computed from the symbol, independently of
    substitution_matrix) -- this fails for a mirrored, sign-flipped or counter-rotating method."""
    G, h = cyclic(8), 0.05
    k, ph = torch.tensor([1.3, -0.8], dtype=torch.float64), 0.4
    gen = torch.Generator().manual_seed(1)
    c = torch.randn(2, 1, 9, generator=gen, dtype=torch.float64)
    orders = torch.tensor([i + j for i, j in LEARNABLE], dtype=torch.float64)
    t = h * (torch.arange(15, dtype=torch.float64) - 7)
    Y, X = torch.meshgrid(-t, t, indexing="ij")
    f = torch.cos(k[0] * X + k[1] * Y + ph)[None, None]                       # (1, 1, 15, 15)
    centre = torch.tensor(complex(math.cos(ph), math.sin(ph)))                # e^{i(k.0 + ph)}
    want = torch.zeros(2, G.order, dtype=torch.float64)
    for gi, g in enumerate(G.elements):
        eta = G.matrix(g).T @ k                                              # symbol: D -> i A^T k
        for o in range(2):
            sym = sum(c[o, 0, p] * (1j * eta[0]) ** i * (1j * eta[1]) ** j for p, (i, j) in enumerate(LEARNABLE))
            want[o, gi] = (sym * centre).real
    for method in METHODS:
        m = PDOLiftingConv(group=G, in_channels=1, out_fields=2, method=method, parametrization="pdo").double()
        with torch.no_grad():
            m.weight.copy_(c / h ** orders)
        got = m(f)[0, :, :, 7, 7]                                             # (2, 8) at the centre
        assert (got - want).abs().max() < 0.02 * want.abs().max(), (method, got, want)


@pytest.mark.parametrize("method", METHODS)
def test_45_degree_error_decays_quadratically(method):
    """p8 lifting layer, 45-degree rotation applied analytically to a smooth function: the
    equivariance error falls like h^2 (log-log slope 2 +- 0.3); at 90 degrees it is rounding."""
    hs = (0.2, 0.1, 0.05, 0.025)
    res = refinement_study(method=method, n=8, k=1, hs=hs)
    errs = np.array([r["error"] for r in res])
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert abs(slope - 2) <= 0.3, (slope, errs)
    assert errs[0] < 0.1 and np.all(np.diff(errs) < 0)
    assert max(r["error"] for r in refinement_study(method=method, n=8, k=2, hs=hs[:2])) < 1e-9


# ----------------------------------------------------------- module contract, cache
def test_parameter_counts_match_the_paper_formulas():
    assert sum(p.numel() for p in PDOLiftingConv(group=cyclic(8), in_channels=1, out_fields=7).parameters()) == 63
    assert sum(p.numel() for p in PDOGroupConv(group=cyclic(8), in_fields=7, out_fields=7).parameters()) == 3528
    g = PDOGroupConv(group=dihedral(6), in_fields=2, out_fields=5, parametrization="pdo", bias=True)
    assert sum(p.numel() for p in g.parameters()) == 9 * 12 * 2 * 5 + 5


def test_shapes_stride_and_backward(digits):
    G = dihedral(4)
    lift = PDOLiftingConv(group=G, in_channels=1, out_fields=3, method="gauss")
    gc = PDOGroupConv(group=G, in_fields=3, out_fields=2, stride=2, method="rbffd")
    y = lift(digits[:2])
    assert y.shape == (2, 3, 8, 28, 28)
    z = gc(y)
    assert z.shape == (2, 2, 8, 14, 14)
    z.square().mean().backward()
    assert lift.weight.grad.abs().sum() > 0 and gc.weight.grad.abs().sum() > 0


def test_bad_arguments_name_expected_and_got():
    with pytest.raises(ValueError, match=r"unknown discretisation method 'spline'; expected one of"):
        PDOLiftingConv(group=cyclic(8), in_channels=1, out_fields=2, method="spline")
    with pytest.raises(ValueError, match=r"parametrization must be 'kernel' or 'pdo', got 'raw'"):
        PDOGroupConv(group=cyclic(8), in_fields=1, out_fields=2, parametrization="raw")
    with pytest.raises(ValueError, match=r"expected a kit.groups.Group"):
        PDOLiftingConv(group=8, in_channels=1, out_fields=2)
    with pytest.raises(ValueError, match=r"out_fields must be an int >= 1, got 0"):
        PDOLiftingConv(group=cyclic(8), in_channels=1, out_fields=0)
    with pytest.raises(ValueError, match=r"expected a field axis \(dim 2\) of size D=8 .* got 4"):
        PDOGroupConv(group=cyclic(8), in_fields=1, out_fields=2)(torch.zeros(1, 1, 4, 9, 9))
    with pytest.raises(ValueError, match=r"sigma applies to method='gauss' only"):
        PDOLiftingConv(group=cyclic(8), in_channels=1, out_fields=2, stencil_kw={"sigma": 1.0})


# ------------------------------------------------------------------------------ models
REFERENCE_PARAMS = {               # ../shared/reference/pdo_econv.md section 5
    "pdo-mnist-p8": 26_747, "pdo-resnet44-p8": 2_621_693, "pdo-resnet26-p6": 362_386,
    "pdo-resnet26-p6m": 372_587, "pdo-resnet26-p8": 4_591_630}


def test_model_parameter_counts_match_the_reference():
    from kit import models
    import kit.models.pdo  # noqa: F401  (registers the models)
    for name, n in REFERENCE_PARAMS.items():
        card = models.model_card(name)
        got = models.count_parameters(models.create(name))
        assert got == n, (name, got, n)
        rep = card.reported
        assert abs(got - rep["params"]) <= rep.get("params_precision", 0), (name, got, rep)
        assert card.paper.startswith("Shen et al.") and rep["source"]
    assert models.count_parameters(models.create("pdo-resnet44-p8", num_classes=100)) == 2_654_183


def test_mnist_net_shapes_backward_and_invariant_head(digits):
    from kit import models
    import kit.models.pdo  # noqa: F401
    m = models.create("pdo-mnist-p8")
    y = m(digits[:2])
    assert y.shape == (2, 10)
    y.square().sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    inv = models.calibrate_batchnorm(models.create("pdo-mnist-p8", head="invariant"), digits[:64])
    G = inv.in_type.group
    recs = check(inv, elements=[g for g in G.elements if G.is_exact_on_grid(g)], x=digits[128:132])
    assert max_error(recs) <= TOL, recs
    paper = models.calibrate_batchnorm(models.create("pdo-mnist-p8"), digits[:64])
    assert check(paper, elements=[G.element(2)], x=digits[128:132])[0].error > 0.1   # dense head: not invariant


@pytest.mark.parametrize("name", ["pdo-resnet26-p6m", "pdo-resnet44-p8"])
def test_resnet_blocks_strides_and_invariant_head(name):
    """Narrow copies of the CIFAR nets (small inputs for speed): backward reaches every parameter;
    with the invariant head the logits are invariant at the grid-exact elements on a 9x9 input
    (odd sizes 9 -> 5 -> 3 keep the stride-2 sampling centred; 32x32 is not exactly invariant)."""
    from kit import models
    import kit.models.pdo  # noqa: F401
    m = models.create(name, widths=(2, 3, 3), head="invariant")
    y = m(torch.rand(2, 3, 16, 16))
    assert y.shape == (2, 10)
    y.square().sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    assert m[-3].out_type.n_fields == 3 and sum(isinstance(b, kit.models.pdo.PDOPreActBlock) for b in m) == (
        7 * 3 if "44" in name else 4 * 3)
    x = torch.rand(6, 3, 9, 9)
    m = models.calibrate_batchnorm(m, x)
    G = m.in_type.group
    recs = check(m, elements=[g for g in G.elements if G.is_exact_on_grid(g)], x=x[:2])
    assert max_error(recs) <= TOL, recs
