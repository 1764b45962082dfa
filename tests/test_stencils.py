"""Stencil library: one component order and one sign convention (x right, y up, cross-correlation)
for all three discretisations; exactness on polynomials; the measured order of accuracy on smooth
functions; the behaviour of the Gaussian derivative with and without moment correction."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kit.kernels.stencils import DEFAULT_SIGMA, METHODS, fd_1d, gaussian_derivative, offsets, stencil, stencil_bank
from kit.reps import component_index, component_name, components

HS = np.array([0.2, 0.1, 0.05, 0.025])


pytestmark = pytest.mark.usefixtures("one_thread")



def _comps(method, size):
    if size == 5:
        return components(4)
    if method == "rbffd":
        return components(2)
    return [c for c in components(4) if max(c) <= 2]


def _dmono(n, k, x):
    """k-th derivative of x^n."""
    return 0.0 if k > n else math.factorial(n) / math.factorial(n - k) * x ** (n - k)


# -------------------------------------------------------------------- layout and order
def test_component_order_and_index():
    assert components(4) == [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2), (3, 0), (2, 1), (1, 2), (0, 3),
                             (4, 0), (3, 1), (2, 2), (1, 3), (0, 4)]
    assert [component_index(i, j) for i, j in components(4)] == list(range(15))
    assert [component_name(*c) for c in components(2)] == ["1", "dx", "dy", "dxx", "dxy", "dyy"]
    for m in METHODS:
        bank = stencil_bank(4, m, 5)
        assert bank.shape == (15, 5, 5) and bank.dtype == torch.float64
        for k, (i, j) in enumerate(components(4)):
            assert torch.equal(bank[k], stencil(i, j, method=m))


def test_fd_matches_the_paper_table():
    table = {0: [0, 0, 1, 0, 0], 1: [0, -.5, 0, .5, 0], 2: [0, 1, -2, 1, 0], 3: [-.5, 1, 0, -1, .5],
             4: [1, -4, 6, -4, 1]}
    for m, w in table.items():
        assert np.array_equal(fd_1d(m), w)
    K = stencil(1, 0)                                 # dx: +1/2 right of the centre
    assert K[2, 3] == 0.5 and K[2, 1] == -0.5 and K.abs().sum() == 1
    K = stencil(0, 1)                                 # dy: +1/2 ABOVE the centre (y up, row 0 on top)
    assert K[1, 2] == 0.5 and K[3, 2] == -0.5 and K.abs().sum() == 1
    K = stencil(1, 1, size=3)                         # dxy: top-left -1/4, top-right +1/4
    assert torch.equal(K, torch.tensor([[-.25, 0, .25], [0, 0, 0], [.25, 0, -.25]], dtype=torch.float64))
    K = stencil(3, 1)                                 # dxxxy: d3 on the row y=+1, negated on y=-1
    assert torch.equal(K[1], torch.tensor([-.25, .5, 0, -.5, .25], dtype=torch.float64))
    assert torch.equal(K[3], -K[1]) and not K[[0, 2, 4]].any()
    assert torch.equal(stencil(2, 2, size=5)[1:4, 1:4], stencil(2, 2, size=3))


def test_stencils_are_cached_and_fresh():
    a, b = stencil(2, 1, method="gauss"), stencil(2, 1, method="gauss")
    assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    a.zero_()                                          # mutating a result never touches the cache
    assert stencil(2, 1, method="gauss").abs().sum() > 0


def test_gaussian_closed_form_matches_rbf_basis():
    from rbf.basis import ga
    s = 0.8
    u = offsets(5) + np.array([0.13, -0.31])
    for i, j in [(0, 0), (1, 2)]:                      # each non-zero diff costs rbf ~2 s to compile
        ref = ga(u, np.zeros((1, 2)), eps=1 / (s * math.sqrt(2)), diff=(i, j))[:, 0] / (2 * math.pi * s * s)
        assert np.allclose(gaussian_derivative(i, j, u, s), ref, rtol=1e-12, atol=1e-14)


def test_rbffd_closed_form_phs_matches_the_library():
    """The closed-form odd-PHS derivatives give the same RBF-FD weights as rbf's symbolic phs5."""
    from rbf.pde.fd import weight_matrix
    ref = weight_matrix(np.zeros((1, 2)), offsets(5), 25, (2, 1), phi="phs5", order=3).toarray().reshape(5, 5)
    assert np.allclose(stencil(2, 1, method="rbffd").numpy(), ref, rtol=0, atol=1e-11)
    with pytest.raises(ValueError, match=r"phs3 is only C\^2: its derivative of order 3 is singular"):
        stencil(2, 1, method="rbffd", phi="phs3")
    assert np.allclose(stencil(1, 1, method="rbffd", phi="phs7").numpy()[1:4, 1:4].sum(), 0, atol=1e-12)


# ---------------------------------------------------------------------- conventions
@pytest.mark.parametrize("method", METHODS)
def test_sign_convention_through_conv2d(method):
    """Applied with F.conv2d to images laid out as kit.groups says (x = j - (W-1)/2 right,
    y = (H-1)/2 - i up), dx of the x-ramp and dy of the y-ramp are +1, the cross terms 0."""
    H = W = 9
    ii, jj = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64),
                            indexing="ij")
    ramps = torch.stack([jj - (W - 1) / 2, (H - 1) / 2 - ii])[:, None]     # (2, 1, H, W): x, y
    K = torch.stack([stencil(1, 0, method=method), stencil(0, 1, method=method)])[:, None]
    out = F.conv2d(ramps, K)                                                # (2 ramps, 2 ops, 5, 5)
    one = torch.ones_like(out[0, 0])
    assert torch.allclose(out[0, 0], one) and torch.allclose(out[1, 1], one)
    assert out[0, 1].abs().max() < 1e-12 and out[1, 0].abs().max() < 1e-12


def _rot90_defect(bank):
    """max |rot90(S_ij) - (-1)^j S_ji| (dx -> dy, dy -> -dx under a counter-clockwise quarter turn)
    and max |flip_x(S_ij) - (-1)^i S_ij| (x -> -x)."""
    rot = max((torch.rot90(bank[component_index(i, j)], 1, (-2, -1))
               - (-1) ** j * bank[component_index(j, i)]).abs().max().item() for i, j in components(4))
    flip = max((torch.flip(bank[component_index(i, j)], (-1,))
                - (-1) ** i * bank[component_index(i, j)]).abs().max().item() for i, j in components(4))
    return rot, flip


@pytest.mark.parametrize("method", METHODS)
def test_rot90_and_mirror_act_like_on_derivatives(method):
    rot, flip = _rot90_defect(stencil_bank(4, method, 5))
    assert rot < 1e-9 and flip < 1e-9, (rot, flip)


def test_a_mirrored_bank_is_caught():
    """Negative control: the x <-> y swap of one public code base breaks the rot90 identity, and
    the sign flip of odd orders (d phi(u) instead of d phi(-u)) fails the ramp test."""
    bank = stencil_bank(4, "gauss", 5)
    swapped = torch.stack([bank[component_index(j, i)] for i, j in components(4)])
    assert _rot90_defect(swapped)[0] > 0.1
    flipped = torch.stack([(-1) ** (i + j) * bank[k] for k, (i, j) in enumerate(components(4))])
    x = torch.arange(5, dtype=torch.float64) - 2
    assert (flipped[component_index(1, 0)] * x[None, :]).sum() < -0.9     # d/dx of x would be -1


# ------------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", [5, 3])
def test_exact_on_polynomials(method, size):
    """Every stencil reproduces d^i_x d^j_y of every monomial of total degree <= i+j+1 exactly
    (at an off-grid point), for all three methods."""
    u = offsets(size)
    p = (0.3, -0.7)
    for i, j in _comps(method, size):
        K = stencil(i, j, method=method, size=size).numpy().reshape(-1)
        for a in range(i + j + 2):
            for b in range(i + j + 2 - a):
                got = (K * (p[0] + u[:, 0]) ** a * (p[1] + u[:, 1]) ** b).sum()
                want = _dmono(a, i, p[0]) * _dmono(b, j, p[1])
                assert abs(got - want) < 1e-9 * max(1.0, abs(want)), (method, size, i, j, a, b, got, want)


def _plane_wave(i, j, x, y, kx=1.1, ky=0.7, ph=0.3):
    return kx ** i * ky ** j * np.cos(kx * x + ky * y + ph + (i + j) * np.pi / 2)


def _errors(K, i, j, hs=HS, p=(0.3, -0.2)):
    u = offsets(K.shape[-1])
    K = K.numpy().reshape(-1)
    return np.array([abs((K * _plane_wave(0, 0, p[0] + h * u[:, 0], p[1] + h * u[:, 1])).sum() / h ** (i + j)
                         - _plane_wave(i, j, *p)) for h in hs])


def _slope(hs, errs):
    return np.polyfit(np.log(hs), np.log(errs), 1)[0]


@pytest.mark.parametrize("method,kw", [("fd", {}), ("rbffd", {}), ("gauss", {}), ("gauss", {"sigma": 0.5}),
                                       ("gauss", {"sigma": 1.0})], ids=["fd", "rbffd", "gauss", "gauss-s0.5",
                                                                        "gauss-s1.0"])
def test_second_order_accuracy_on_smooth_functions(method, kw):
    """log-log slope of |stencil/h^(i+j) f - d^(i,j) f| vs h is 2 for every component (the
    Gaussian with moment correction for every sigma); the FD / RBF-FD identity is exact."""
    slopes = {}
    for i, j in components(4):
        errs = _errors(stencil(i, j, method=method, **kw), i, j)
        if i + j == 0 and method != "gauss":
            assert errs.max() < 1e-14
            continue
        slopes[component_name(i, j)] = _slope(HS, errs)
    assert all(abs(s - 2) < 0.15 for s in slopes.values()), slopes


def test_raw_gaussian_derivative_is_inconsistent_at_fixed_sigma():
    """Without the moment correction the sampled Gaussian derivative at a fixed sigma (in pixels)
    does not converge: dx levels off at its first-moment bias, dxx blows up like h^-2."""
    hs = np.array([0.05, 0.025, 0.0125, 0.00625])
    u = offsets(5)
    for sigma in (0.5, DEFAULT_SIGMA, 1.0):
        Kx = stencil(1, 0, method="gauss", sigma=sigma, normalize=False)
        bias = (Kx.numpy().reshape(-1) * u[:, 0]).sum() - 1                 # relative bias of dx
        ex = _errors(Kx, 1, 0, hs)
        assert ex[-1] / ex[-2] > 0.8                                      # no longer converging
        assert abs(ex[-1] / abs(_plane_wave(1, 0, 0.3, -0.2)) - abs(bias)) < 0.2 * abs(bias) + 1e-4
        exx = _errors(stencil(2, 0, method="gauss", sigma=sigma, normalize=False), 2, 0, hs)
        assert _slope(hs, exx) < -1.5                                     # grows like h^-2
        # the corrected stencil at the same sigma converges at second order
        assert abs(_slope(hs, _errors(stencil(2, 0, method="gauss", sigma=sigma), 2, 0, hs)) - 2) < 0.15


# -------------------------------------------------------------------------- errors
def test_bad_arguments_name_expected_and_got():
    with pytest.raises(ValueError, match=r"unknown stencil method 'fdd'; expected one of"):
        stencil(1, 0, method="fdd")
    with pytest.raises(ValueError, match=r"total derivative order must be <= 4, got i \+ j = 5"):
        stencil(3, 2)
    with pytest.raises(ValueError, match=r"3x3 stencil resolves derivatives of order <= 2 per axis; dxxx"):
        stencil(3, 0, size=3)
    with pytest.raises(ValueError, match=r"size must be 3 or 5, got 7"):
        stencil(1, 0, size=7)
    with pytest.raises(ValueError, match=r"max_order=4 needs dxxx"):
        stencil_bank(4, "fd", 3)
    with pytest.raises(ValueError, match=r"needs more than 3x3 nodes"):
        stencil(2, 1, method="rbffd", size=3)
    with pytest.raises(ValueError, match=r"sigma applies to method='gauss' only"):
        stencil(1, 0, method="fd", sigma=1.0)
    with pytest.raises(ValueError, match=r"sigma must be > 0"):
        stencil(1, 0, method="gauss", sigma=0)


@pytest.mark.parametrize("method", METHODS)
def test_stencils_have_the_grid_symmetries_to_rounding(method):
    """Mirrors multiply d^i_x d^j_y by (-1)^i / (-1)^j, the diagonal swap maps it onto d^j_x d^i_y.
    RBF-FD weights straight from ``rbf``'s solve miss this at 1e-13-1e-12 (which a float64 C16
    equivariance test saw as 2e-12); the kit symmetrises them (measured 1.5e-16 relative). Gaussian
    weights are evaluated in closed form, with their moment correction: 2.2e-15."""
    tol = {"fd": 0.0, "rbffd": 1e-15, "gauss": 1e-14}[method]
    for i, j in components(4):
        K = np.asarray(stencil(i, j, method=method))
        K_ji = np.asarray(stencil(j, i, method=method))
        scale = np.abs(K).max()
        assert np.abs(K[:, ::-1] - (-1) ** i * K).max() <= tol * scale, (method, i, j)
        assert np.abs(K[::-1, :] - (-1) ** j * K).max() <= tol * scale, (method, i, j)
        assert np.abs(K_ji[::-1, ::-1].T - K).max() <= tol * scale, (method, i, j)
