"""Discrete partial-derivative operators on small square stencils: three discretisations, one
interface, one component order, one sign convention.

A stencil ``K`` of size ``k x k`` (``k`` = 3 or 5) approximates ``d^(i+j) / dx^i dy^j`` at a pixel
``p`` as a **cross-correlation** kernel, exactly as ``torch.nn.functional.conv2d`` applies it::

    (K * f)(p) = sum_u K[u] f(p + u)  ~=  h^(i+j) * (d^i_x d^j_y f)(p)        # unit grid (h = 1)

On a grid of spacing ``h`` divide by ``h^(i+j)``. Offsets follow :mod:`kit.groups`: kernel row
``r`` is ``y = k//2 - r`` (**y points up**, row 0 is the top) and column ``c`` is ``x = c - k//2``
(x points right). So ``stencil(1, 0)`` has ``+1/2`` right of the centre and ``stencil(0, 1)`` has
``+1/2`` *above* it. Every method obeys this same convention; in particular rotating a stencil
with ``torch.rot90(K, 1)`` (counter-clockwise) gives the stencil of the rotated operator
(tested in ``tests/test_stencils.py`` and ``tests/test_pdo.py``).

Component order (:func:`components`): by total order, then descending power of x::

    1 | dx dy | dxx dxy dyy | dxxx dxxy dxyy dyyy | dxxxx dxxxy dxxyy dxyyy dyyyy

i.e. ``(i, j)`` sits at index ``(i+j)(i+j+1)/2 + j`` (:func:`component_index`). (One public code
base orders the Gaussian / RBF-FD components ``dy^k`` first and uses ``d phi(u)`` instead of
``d phi(-u)``, which mirrors those discretisations; here nothing differs between methods.)

Methods
-------
``"fd"`` -- central finite differences: tensor products of the 1-D second-order central stencils
    on the smallest symmetric support (``d1 = [-1/2, 0, 1/2]``, ``d2 = [1, -2, 1]``,
    ``d3 = [-1/2, 1, 0, -1, 1/2]``, ``d4 = [1, -4, 6, -4, 1]``), derived by solving the moment
    equations in exact rational arithmetic. These are the PDO-eConv stencils (Shen et al. 2020).
    Exact for polynomials of total degree ``<= i+j+1``; truncation error O(h^2).
``"gauss"`` -- Gaussian derivatives: the derivative of a normalised Gaussian of width ``sigma``
    (pixels), the RBF ``rbf.basis.ga`` (``exp(-(eps r)^2)``, ``eps = 1/(sigma sqrt 2)``) divided by
    ``2 pi sigma^2``, differentiated in closed form (Hermite polynomials; checked against
    ``rbf.basis.ga(diff=...)`` in the tests) and sampled with the sign-correct cross-correlation
    orientation ``(d^a G)(-u)``. With ``normalize=True`` (default) the sampled kernel gets the
    smallest (least-squares) correction that makes its discrete moments exact,
    ``sum_u K[u] u^b / b! = delta_ab`` for all ``|b| <= i+j+1`` that the support can resolve: the
    stencil is then exact on polynomials of degree ``<= i+j+1`` and O(h^2) accurate for every
    ``sigma`` (measured slope 2.0 for sigma = 0.5, 0.71, 1.0 px); the error constant depends on
    ``sigma``, not monotonically. With
    ``normalize=False`` the raw samples are returned: their moments are off by the aliasing
    (small ``sigma``) or the truncation to ``k x k`` (large ``sigma``) of the Gaussian, e.g. the
    first moment of ``dx`` is off by -12% / -0.5% / -9% at sigma = 0.5 / 0.71 / 1.0 px, and
    ``sum(dxx) != 0``. So at a fixed ``sigma`` in pixels the raw stencil is **inconsistent**: under
    grid refinement its error levels off at a constant relative bias (odd orders, ``dx``) or grows
    like ``h^-2`` (even orders >= 2, from the non-zero lower moments). ``sigma`` is in pixels,
    i.e. relative to ``h``; the default ``1/(0.99 sqrt 2) ~ 0.714`` is the width the Neural ePDO
    code uses (``eps = 0.99``) and is near the sweet spot of the raw kernel.
``"rbffd"`` -- RBF-FD weights (``rbf.pde.fd.weight_matrix``): polyharmonic spline ``phi`` (default
    ``"phs5"``, r^5) augmented with polynomials of degree ``degree`` (default ``max(i+j, 2)``) on all
    ``k x k`` nodes. Exact for polynomials of degree ``<= max(degree, i+j+1)`` by the symmetry of the
    node set; O(h^2) for the default degree. The RBF must be smooth enough for the derivative to
    exist at the centre node: r^3 is only C^2 (its order-3/4 weights come out as garbage from
    ``rbf``; here they raise), so the default is r^5 (C^4, conditionally positive definite of
    order 3, hence degree >= 2). For odd PHS the RBF's derivatives are evaluated in closed form
    (:func:`_odd_phs`) instead of by ``rbf``'s symbolic compilation (~2 s per derivative); any
    other ``rbf.basis`` name goes through the library as is. The weights are averaged over the
    square grid's 8 symmetries (:func:`_d4_symmetrise`): the same operator, with the symmetry that
    ``rbf``'s solve loses at 1e-12 restored exactly.
    Odd-power PHS are scale-free, so the unit-grid weights divided by ``h^(i+j)`` are exactly the
    RBF-FD weights on a grid of spacing ``h``. On a 3x3 support (9 nodes) the polynomial space of
    degree 3 does not fit, so 3x3 RBF-FD stencils exist for ``i + j <= 2`` only.

A ``k x k`` support resolves derivatives of order ``<= k-1`` per axis, so 3x3 stencils exist for
``i, j <= 2`` (e.g. ``dxxyy`` but not ``dxxx``). Stencils are deterministic and cached; every call
returns a fresh float64 tensor.
"""
from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

import numpy as np
import torch

from .._compat import require
from ..groups import kernel_offsets
from ..reps import MAX_ORDER, _check_order, component_name, components

__all__ = ["METHODS", "DEFAULT_SIGMA", "stencil", "stencil_bank", "fd_1d", "offsets", "gaussian_derivative"]

METHODS = ("fd", "gauss", "rbffd")
DEFAULT_SIGMA = 1.0 / (0.99 * math.sqrt(2.0))      # Gaussian width (pixels) of the Neural ePDO code


# ------------------------------------------------------------------------- offsets
def offsets(size: int) -> np.ndarray:
    """``(size*size, 2)`` planar offsets ``(x, y)`` of the kernel taps in row-major order
    (row 0 = top, ``y = size//2``; column 0 = left, ``x = -size//2``)."""
    return kernel_offsets(size).numpy()


# ------------------------------------------------------------------------------- FD
@lru_cache(maxsize=None)
def _fd_1d_exact(m: int) -> tuple[Fraction, ...]:
    """Second-order central stencil for d^m on offsets -r..r, r = (m+1)//2 (exact rationals)."""
    r = (m + 1) // 2
    n = 2 * r + 1
    us = list(range(-r, r + 1))
    # moment equations: sum_u w_u u^q / q! = [q == m], q = 0..n-1 (Gauss-Jordan on Fractions)
    A = [[Fraction(u ** q, math.factorial(q)) for u in us] + [Fraction(int(q == m))] for q in range(n)]
    for col in range(n):
        piv = next(row for row in range(col, n) if A[row][col] != 0)
        A[col], A[piv] = A[piv], A[col]
        A[col] = [v / A[col][col] for v in A[col]]
        for row in range(n):
            if row != col and A[row][col] != 0:
                A[row] = [a - A[row][col] * b for a, b in zip(A[row], A[col])]
    return tuple(A[q][n] for q in range(n))


def fd_1d(m: int, size: int = 5) -> np.ndarray:
    """1-D second-order central FD stencil for ``d^m`` (offsets ``-size//2 .. size//2``)."""
    w = _fd_1d_exact(m)
    if len(w) > size:
        raise ValueError(f"the central FD stencil for d^{m} needs {len(w)} taps, got size={size}")
    out = np.zeros(size)
    s = (size - len(w)) // 2
    out[s:s + len(w)] = [float(v) for v in w]
    return out


def _fd(i: int, j: int, size: int) -> np.ndarray:
    # K[r, c] = d^j[y-offset = size//2 - r] * d^i[x-offset = c - size//2]: rows reversed (y up)
    return np.outer(fd_1d(j, size)[::-1], fd_1d(i, size))


# ---------------------------------------------------------------------------- Gauss
def _moment_matrix(i: int, j: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``u^b / b!`` over the taps for every ``b`` the support resolves with ``|b| <= i+j+1``,
    and the target moments ``delta_{ab}``."""
    u = offsets(size)
    rows, target = [], []
    for a in range(size):
        for b in range(size):
            if a + b <= i + j + 1:
                rows.append(u[:, 0] ** a * u[:, 1] ** b / (math.factorial(a) * math.factorial(b)))
                target.append(float((a, b) == (i, j)))
    return np.array(rows), np.array(target)


def gaussian_derivative(i: int, j: int, points, sigma: float) -> np.ndarray:
    """``d^i_x d^j_y G`` at ``points (N, 2)`` for the normalised Gaussian
    ``G = exp(-(eps r)^2) / (2 pi sigma^2)``, ``eps = 1/(sigma sqrt 2)`` (the ``rbf.basis.ga`` RBF),
    in closed form: ``(-1/sigma)^(i+j) He_i(x/sigma) He_j(y/sigma) G`` with the probabilists'
    Hermite polynomials ``He``. Agrees with ``rbf.basis.ga(..., diff=(i, j))`` to rounding (tested);
    the closed form avoids ``rbf``'s symbolic compilation (~1.7 s per derivative)."""
    from numpy.polynomial.hermite_e import hermeval

    p = np.asarray(points, dtype=np.float64)
    t = p / sigma
    G = np.exp(-0.5 * (t ** 2).sum(-1)) / (2 * math.pi * sigma ** 2)
    return ((-1.0 / sigma) ** (i + j) * hermeval(t[..., 0], [0] * i + [1])
            * hermeval(t[..., 1], [0] * j + [1]) * G)


def _gauss(i: int, j: int, size: int, sigma: float, normalize: bool) -> np.ndarray:
    # cross-correlation orientation: K[u] = (d^a G)(-u)
    K = gaussian_derivative(i, j, -offsets(size), sigma)
    if normalize:
        V, t = _moment_matrix(i, j, size)
        K = K + V.T @ np.linalg.lstsq(V @ V.T, t - V @ K, rcond=None)[0]
    return K.reshape(size, size)


# --------------------------------------------------------------------------- RBF-FD
@lru_cache(maxsize=None)
def _odd_phs(m: int):
    """The polyharmonic spline ``phi(r) = (-1)^((m+1)/2) (eps r)^m`` (odd ``m``; the sign of
    ``rbf.basis.phs<m>``) as an ``rbf.basis.RBF`` whose derivatives are evaluated in closed form.

    ``rbf`` differentiates RBFs symbolically and compiles a C ufunc per derivative (~2 s each);
    for odd PHS the closed form is short: ``d^a r^m = sum c x^p y^q r^s`` by the product rule,
    and every derivative of order ``< m`` vanishes at ``r = 0``. Checked against the library's
    own ``phs<m>`` in ``tests/test_stencils.py``."""
    basis = require("rbf.basis", "rbf", feature="RBF-FD stencils (method='rbffd')")
    EPS, R, RBF = basis.EPS, basis.R, basis.RBF

    sign = (-1) ** ((m + 1) // 2)

    class OddPHS(RBF):
        def __call__(self, x, c, eps=1.0, diff=None, out=None):
            x, c = np.asarray(x, dtype=np.float64), np.asarray(c, dtype=np.float64)
            if np.ndim(eps) != 0:
                raise ValueError(f"OddPHS supports a scalar eps only, got shape {np.shape(eps)}")
            diff = (0,) * x.shape[-1] if diff is None else tuple(int(v) for v in diff)
            if len(diff) != 2 or x.shape[-1] != 2 or c.shape[-1] != 2:
                raise ValueError(f"OddPHS is two-dimensional; got points of dimension {x.shape[-1]}, "
                                 f"diff {diff}")
            if sum(diff) >= m:
                raise ValueError(f"phs{m} is only C^{m - 1}: its derivative of order {sum(diff)} is "
                                 f"singular at the centre; use phs{m + 2} or higher")
            terms = {(0, 0, m): 1.0}                 # coefficient of x^p y^q r^s
            for axis, n in enumerate(diff):
                for _ in range(n):
                    new = {}
                    for (p, q, r), v in terms.items():
                        e = (p, q)[axis]
                        if e:                         # d/dx x^p = p x^(p-1)
                            k = (p - 1, q, r) if axis == 0 else (p, q - 1, r)
                            new[k] = new.get(k, 0.0) + v * e
                        if r:                         # d/dx r^s = s x r^(s-2)
                            k = (p + 1, q, r - 2) if axis == 0 else (p, q + 1, r - 2)
                            new[k] = new.get(k, 0.0) + v * r
                    terms = new
            d = x[..., :, None, :] - c[..., None, :, :]                    # (..., N, M, 2)
            rr = np.sqrt((d ** 2).sum(-1))
            safe = np.where(rr > 0, rr, 1.0)
            val = sum(v * d[..., 0] ** p * d[..., 1] ** q * safe ** r for (p, q, r), v in terms.items())
            val = np.where(rr > 0, val, 0.0) * sign * float(eps) ** m
            if out is not None:
                out[...] = val
                return out
            return val

    return OddPHS(sign * (EPS * R) ** m, tol=0.0, cpd_order=(m + 1) // 2)


def _rbffd(i: int, j: int, size: int, phi: str, degree: int | None) -> np.ndarray:
    weight_matrix = require("rbf.pde.fd", "rbf", feature="RBF-FD stencils (method='rbffd')").weight_matrix

    deg = max(i + j, 2) if degree is None else degree
    if deg < i + j:
        raise ValueError(f"RBF-FD polynomial degree must be >= the derivative order {i + j}, got {deg}")
    if (deg + 1) * (deg + 2) // 2 > size * size:
        raise ValueError(f"RBF-FD with polynomial degree {deg} needs more than {size}x{size} nodes "
                         f"(derivative {component_name(i, j)}): use size=5")
    if phi in ("phs1", "phs3", "phs5", "phs7", "phs9"):
        phi = _odd_phs(int(phi[3:]))                  # closed-form derivatives (fast)
    W = weight_matrix(np.zeros((1, 2)), offsets(size), size * size, (i, j), phi=phi, order=deg)
    return np.asarray(W.toarray()).reshape(size, size)


def _mirror_average(i: int, j: int, K: np.ndarray) -> np.ndarray:
    """Average of ``K`` (the ``d^i_x d^j_y`` stencil, row 0 on top) over the grid's two mirrors:
    ``x -> -x`` multiplies the operator by ``(-1)^i``, ``y -> -y`` by ``(-1)^j``."""
    return (K + (-1) ** i * K[:, ::-1] + (-1) ** j * K[::-1, :] + (-1) ** (i + j) * K[::-1, ::-1]) / 4


def _d4_symmetrise(i: int, j: int, K: np.ndarray, K_ji: np.ndarray) -> np.ndarray:
    """The stencil averaged over the 8 symmetries of the square grid (mirrors, and the diagonal swap
    ``x <-> y``, which maps the ``(j, i)`` stencil ``K_ji`` onto the ``(i, j)`` one: the array's
    anti-transpose). The exact RBF-FD weights on the symmetric node set have this symmetry (the
    solution of a symmetric system is unique), so the average is the same operator in exact
    arithmetic; ``rbf``'s solve breaks it at 1e-13-1e-12, which is what a float64 equivariance test
    of a C16 Neural ePDO then measured (2e-12 at 270 degrees), not the model."""
    Kt = _mirror_average(j, i, K_ji)[::-1, ::-1].T
    return (_mirror_average(i, j, K) + Kt) / 2


# ------------------------------------------------------------------------ interface
@lru_cache(maxsize=None)
def _stencil_np(i, j, method, size, sigma, normalize, phi, degree) -> np.ndarray:
    if method == "fd":
        K = _fd(i, j, size)
    elif method == "gauss":
        K = _gauss(i, j, size, sigma, normalize)
    else:
        K = _rbffd(i, j, size, phi, degree)
        K_ji = K if i == j else _rbffd(j, i, size, phi, degree)
        K = np.ascontiguousarray(_d4_symmetrise(i, j, K, K_ji))
    K.setflags(write=False)
    return K


def stencil(i: int, j: int, *, method: str = "fd", size: int = 5, sigma: float | None = None,
            normalize: bool = True, phi: str = "phs5", degree: int | None = None) -> torch.Tensor:
    """The ``(size, size)`` float64 cross-correlation stencil of ``d^i_x d^j_y`` (unit spacing).

    Args:
        i, j: derivative orders in x (right) and y (up); ``i + j <= 4``.
        method: ``"fd"``, ``"gauss"`` or ``"rbffd"`` (see the module docstring).
        size: 3 or 5 (3 only when ``i, j <= 2``; for ``"rbffd"`` only when ``i + j <= 2``).
        sigma: Gaussian width in pixels (``"gauss"`` only; default :data:`DEFAULT_SIGMA`).
        normalize: ``"gauss"`` only: correct the sampled kernel's moments (default) or not.
        phi, degree: ``"rbffd"`` only: the RBF (``rbf.basis`` name) and polynomial degree.
    """
    i, j, size, sigma, normalize, phi, degree = _validate(i, j, method, size, sigma, normalize, phi, degree)
    return torch.from_numpy(_stencil_np(i, j, method, size, sigma, normalize, phi, degree).copy())


def stencil_bank(max_order: int = 4, method: str = "fd", size: int = 5, **kw) -> torch.Tensor:
    """All stencils of total order ``<= max_order`` stacked in :func:`components` order:
    ``(n_ops, size, size)`` float64 with ``n_ops = (max_order+1)(max_order+2)/2``.
    ``kw`` as in :func:`stencil`."""
    _check_order(max_order, "max_order")
    if size == 3 and max_order > 2:
        bad = [component_name(i, j) for i, j in components(max_order) if max(i, j) > 2]
        raise ValueError(f"a 3x3 stencil resolves derivatives of order <= 2 per axis; max_order="
                         f"{max_order} needs {', '.join(bad)}: use size=5 or max_order <= 2")
    return torch.stack([stencil(i, j, method=method, size=size, **kw) for i, j in components(max_order)])


def _validate(i, j, method, size, sigma, normalize, phi, degree):
    for v, name in ((i, "i"), (j, "j")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"derivative order {name} must be an int >= 0, got {v!r}")
    if i + j > MAX_ORDER:
        raise ValueError(f"total derivative order must be <= {MAX_ORDER}, got i + j = {i + j}")
    if method not in METHODS:
        raise ValueError(f"unknown stencil method {method!r}; expected one of {METHODS}")
    if size not in (3, 5):
        raise ValueError(f"stencil size must be 3 or 5, got {size!r}")
    if max(i, j) > size - 1:
        raise ValueError(f"a {size}x{size} stencil resolves derivatives of order <= {size - 1} per axis; "
                         f"{component_name(i, j)} needs size=5")
    if method == "gauss":
        sigma = DEFAULT_SIGMA if sigma is None else float(sigma)
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0 (pixels), got {sigma}")
        normalize = bool(normalize)
    else:
        if sigma is not None:
            raise ValueError(f"sigma applies to method='gauss' only, got sigma={sigma} with method={method!r}")
        normalize = True
    if method != "rbffd":
        phi, degree = "phs5", None
    return i, j, size, sigma, normalize, phi, degree
