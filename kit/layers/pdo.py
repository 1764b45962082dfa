"""PDO-eConvs (Shen, Hao, Lin, Liu, Jiang, Zhang, Li, Zhang, ICML 2020): rotation-equivariant
convolutions built from partial differential operators.

The math
--------
With ``D = (dx, dy)`` (x right, y up, as in :mod:`kit.groups`), a PDO is a polynomial
``P(D) = sum_a c_a D^a``. For ``A`` in O(2) and ``(pi_B f)(x) = f(B^-1 x)`` the chain rule gives

    P(A^T D) [pi_B f](x) = [ P((B^-1 A)^T D) f ](B^-1 x),

so the **lifting layer** ``Psi f(x, g) = P(A_g^T D) f (x)`` maps a rotated input to a rotated,
group-shifted output, ``Psi(pi_B f)(x, g) = Psi f(B^-1 x, B^-1 g)``: the regular representation of
:mod:`kit.groups`. The **group layer** uses one PDO per relative element,
``Phi e(x, g) = sum_h P_{g^-1 h}(A_g^T D) e(., h)(x)``, equivariant by the same substitution.
``P(A^T D)`` is obtained **analytically**: ``dx -> A00 dx + A10 dy``, ``dy -> A01 dx + A11 dy``
(for a rotation by t: ``dx -> c dx + s dy``, ``dy -> -s dx + c dy``), expanded exactly
(:func:`kit.reps.substitution_matrix`). The learnable family is the paper's 9 monomials ``dx^i dy^j`` with
``i, j <= 2`` (total order <= 4), so the rotated operator needs every derivative up to order 4 and
is discretised on 5x5 stencils by any of the three families of :mod:`kit.kernels.stencils`
(``"fd"``: the paper's second-order central differences; ``"gauss"``; ``"rbffd"``).

Equivariance on the grid: every element that is a multiple of 90 degrees (and the mirrors of D_n)
is exact, because each stencil family maps onto itself under ``rot90`` / ``flip`` exactly as the
derivatives do (tested for all three). Other angles (45, 60, 22.5 degrees ...) are approximate
with error O(h^2) in the grid spacing h (the paper's quadratic order; measured in
``tests/test_pdo.py``).

Parametrisation (``parametrization=``):

* ``"kernel"`` (default, the paper's): a raw 3x3 weight ``W`` per PDO; the coefficients are
  ``c = vec(W) M^-1`` where the rows of ``M (9, 9)`` are the 3x3 central-difference stencils of the
  9 monomials (:func:`fd_monomial_matrix`, det M = -1). With ``method="fd"`` and no angle offset the
  identity element's kernel is exactly ``W`` zero-padded to 5x5. Weight decay acts on ``W``.
* ``"pdo"``: the 9 coefficients ``c`` themselves (initialised with the same distribution).

Both have 9 parameters per PDO: lifting ``9 * C_in * C_out``, group ``9 * |G| * C_in * C_out``.
Each group element ``g`` uses ``A_g = group.matrix(g) @ R(offset)``; the paper's code uses
``offset = pi/8`` (a fixed re-parametrisation that does not affect equivariance; the effective
angle of ``(k, f)`` is ``2 pi k / n + (-1)^f offset``).

Shapes: lifting ``(B, C_in, H, W) -> (B, C_out, |G|, H', W')``; group
``(B, C_in, |G|, H, W) -> (B, C_out, |G|, H', W')``; one ``conv2d`` with a
``(C_out*|G|, C_in*D_in, 5, 5)`` filter bank (ordering as :mod:`kit.layers.gconv`), synthesised
from the coefficients and cached in eval mode (:class:`kit.layers.base.KernelCache`).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn as nn

from ..fields import FieldType
from ..groups import Group, cyclic, plane_coords, rotation_matrix
from ..reps import component_index, components, substitution_matrix
from .base import EquivariantModule, KernelCache, field_conv2d
from .registry import fields_for, register_family
from ..kernels.stencils import METHODS, stencil, stencil_bank

__all__ = ["PDOLiftingConv", "PDOGroupConv", "LEARNABLE", "fd_monomial_matrix",
           "pdo_basis", "refinement_study"]

#: the paper's 9 learnable monomials ``dx^i dy^j`` (i, j <= 2), in the kit's component order
LEARNABLE: list[tuple[int, int]] = [c for c in components(4) if max(c) <= 2]
_LEARN_IDX = [component_index(i, j) for i, j in LEARNABLE]      # [0, 1, 2, 3, 4, 5, 7, 8, 12]
KERNEL_SIZE = 5


@lru_cache(maxsize=None)
def _fd_monomial_matrix() -> np.ndarray:
    return np.stack([stencil(i, j, method="fd", size=3).numpy().reshape(9) for i, j in LEARNABLE])


def fd_monomial_matrix() -> torch.Tensor:
    """``M (9, 9)``: row p = the 3x3 central-difference stencil of ``LEARNABLE[p]`` (row-major).
    A raw 3x3 weight ``W`` maps to PDO coefficients ``c = vec(W) @ M^-1``."""
    return torch.from_numpy(_fd_monomial_matrix().copy())


@lru_cache(maxsize=64)
def _pdo_basis(group: Group, method: str, offset: float, kernel: bool, stencil_kw: tuple) -> np.ndarray:
    S = stencil_bank(4, method, KERNEL_SIZE, **dict(stencil_kw)).reshape(15, -1).numpy()  # (15, 25)
    R0 = rotation_matrix(offset)
    out = []
    for g in group.elements:
        T = substitution_matrix(group.matrix(g) @ R0).numpy()[_LEARN_IDX]        # (9, 15)
        out.append(T @ S)                                                      # (9, 25)
    B = np.stack(out)                                                          # (G, 9, 25)
    if kernel:
        B = np.einsum("pq,gqk->gpk", np.linalg.inv(_fd_monomial_matrix()), B)
    B.setflags(write=False)
    return B


def pdo_basis(group: Group, *, method: str = "fd", offset: float = 0.0, parametrization: str = "pdo",
              **stencil_kw) -> torch.Tensor:
    """``(|G|, 9, 25)`` float64: ``kernel_g = w @ basis[g]`` is the flattened 5x5 stencil of
    ``P(A_g^T D)`` for the 9 parameters ``w`` of one PDO (coefficients for ``"pdo"``, ``vec(W)`` of
    the raw 3x3 weight for ``"kernel"``). Cached."""
    _check_args(group, method, parametrization)
    return torch.from_numpy(_pdo_basis(group, method, float(offset), parametrization == "kernel",
                                       tuple(sorted(stencil_kw.items()))).copy())


def _check_args(group, method, parametrization):
    if not isinstance(group, Group):
        raise ValueError(f"expected a kit.groups.Group (cyclic(n) / dihedral(n)), got {group!r}")
    if method not in METHODS:
        raise ValueError(f"unknown discretisation method {method!r}; expected one of {METHODS}")
    if parametrization not in ("kernel", "pdo"):
        raise ValueError(f"parametrization must be 'kernel' or 'pdo', got {parametrization!r}")


class _PDOConv(KernelCache, EquivariantModule):
    """Shared machinery: any input type with a permutation representation -> regular output."""

    def __init__(self, in_type: FieldType, out_fields: int, relative: bool, method: str,
                 parametrization: str, offset: float, padding: int, stride: int, bias: bool,
                 stencil_kw: dict | None):
        super().__init__()
        G = in_type.group
        _check_args(G, method, parametrization)
        if isinstance(out_fields, bool) or not isinstance(out_fields, int) or out_fields < 1:
            raise ValueError(f"out_fields must be an int >= 1, got {out_fields!r}")
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be an int >= 0, got {padding!r}")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be an int >= 1, got {stride!r}")
        self.in_type, self.out_type = in_type, FieldType(G, "regular", out_fields)
        self.method, self.parametrization, self.offset = method, parametrization, float(offset)
        self.padding, self.stride, self.relative = padding, stride, relative
        self.stencil_kw = dict(stencil_kw or {})
        basis = pdo_basis(G, method=method, offset=offset, parametrization=parametrization, **self.stencil_kw)
        self.register_buffer("basis", basis, persistent=False)                 # (G, 9, 25) float64
        self.register_buffer("perm", G.regular_perm.clone(), persistent=False)  # (G, G)
        lead = (out_fields, in_type.n_fields) + ((G.order,) if relative else ())
        shape = lead + ((3, 3) if parametrization == "kernel" else (9,))
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.zeros(out_fields)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        """He init of the raw 3x3 weights (std sqrt(2 / fan_in), fan_in = 9 C_in D_in); for
        ``"pdo"`` the coefficients of the same random 3x3 kernels."""
        std = math.sqrt(2.0 / (9 * self.in_type.channels))
        with torch.no_grad():
            W = torch.randn(*self.weight.shape[:-2 if self.parametrization == "kernel" else -1], 9) * std
            if self.parametrization == "pdo":
                W = W.double() @ torch.linalg.inv(fd_monomial_matrix())
            self.weight.copy_(W.reshape(self.weight.shape))
            if self.bias is not None:
                self.bias.zero_()

    def coefficients(self) -> torch.Tensor:
        """The PDO coefficients ``(C_out, C_in[, |G|], 9)`` in :data:`LEARNABLE` order
        (at the identity element, before the angle offset)."""
        if self.parametrization == "pdo":
            return self.weight
        Minv = torch.linalg.inv(fd_monomial_matrix()).to(self.weight)
        return self.weight.flatten(-2) @ Minv

    def _build(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def filter(self) -> torch.Tensor:
        """The filter bank ``(C_out*|G|, C_in*D_in, 5, 5)`` (cached in eval mode)."""
        return self.cached_kernel(self._build, self.weight)

    def _forward(self, x):
        return field_conv2d(x, self.in_type, self.out_type, self.filter(), self.bias,
                            stride=self.stride, padding=self.padding)       # (B, C_out, |G|, H', W')

    def extra_repr(self) -> str:
        off = f", offset={self.offset:.4g}" if self.offset else ""
        return (f"{self.in_type} -> {self.out_type}, method={self.method!r}, "
                f"parametrization={self.parametrization!r}{off}, padding={self.padding}, stride={self.stride}")


class PDOLiftingConv(_PDOConv):
    """PDO-eConv lifting layer: ``in_channels`` images / scalar fields -> ``out_fields`` regular fields.

    One learnable PDO per (output field, input channel), rotated analytically to every element.

    Args:
        group: ``kit.groups.cyclic(n)`` or ``dihedral(n)`` (any n; the paper uses 4, 6, 8, 12).
        in_channels, out_fields: the layer outputs ``out_fields * |G|`` channels.
        method: stencil family ``"fd"`` | ``"gauss"`` | ``"rbffd"``; ``stencil_kw`` go to
            :func:`kit.kernels.stencils.stencil` (e.g. ``{"sigma": 1.0}``).
        parametrization: ``"kernel"`` (raw 3x3 weights, the paper's) or ``"pdo"`` (coefficients).
        offset: angle offset in radians (the paper's code: ``pi / 8``).
        padding: default 2 ("same" for the 5x5 stencils); the paper's MNIST net pads 1.
        stride, bias: as ``conv2d`` (one bias per field; the paper has none). With ``stride > 1`` the
            layer is exact on the grid only when ``H + 2 padding - 5`` is a multiple of the stride
            (a symmetric sampling grid; :func:`kit.equivariance.check` warns otherwise).

    Shapes: ``(B, C_in, H, W) -> (B, C_out, |G|, H', W')``.
    """

    def __init__(self, *, group: Group, in_channels: int, out_fields: int, method: str = "fd",
                 parametrization: str = "kernel", offset: float = 0.0, padding: int = 2, stride: int = 1,
                 bias: bool = False, stencil_kw: dict | None = None):
        super().__init__(FieldType(group, "trivial", in_channels), out_fields, False, method,
                         parametrization, offset, padding, stride, bias, stencil_kw)

    def _build(self):
        w = self.weight.flatten(-2) if self.parametrization == "kernel" else self.weight   # (O, C, 9)
        O, C, _ = w.shape
        K = torch.einsum("ocp,gpk->ogck", w, self.basis.to(w.dtype))                       # (O, G, C, 25)
        return K.reshape(O * self.basis.shape[0], C, KERNEL_SIZE, KERNEL_SIZE)


class PDOGroupConv(_PDOConv):
    """PDO-eConv group layer: ``in_fields`` regular fields -> ``out_fields`` regular fields.

    One learnable PDO per (output field, input field, relative element ``r``); output orientation
    ``g`` applies ``P_{g^-1 h}(A_g^T D)`` to input orientation ``h`` and sums over ``h``.
    Args as :class:`PDOLiftingConv`, with ``in_fields`` regular input fields.

    Shapes: ``(B, C_in, |G|, H, W) -> (B, C_out, |G|, H', W')``.
    """

    def __init__(self, *, group: Group, in_fields: int, out_fields: int, method: str = "fd",
                 parametrization: str = "kernel", offset: float = 0.0, padding: int = 2, stride: int = 1,
                 bias: bool = False, stencil_kw: dict | None = None):
        super().__init__(FieldType(group, "regular", in_fields), out_fields, True, method,
                         parametrization, offset, padding, stride, bias, stencil_kw)

    def _build(self):
        w = self.weight.flatten(-2) if self.parametrization == "kernel" else self.weight   # (O, C, G_rel, 9)
        O, C, G, _ = w.shape
        R = torch.einsum("ocrp,gpk->ogcrk", w, self.basis.to(w.dtype))   # (O, G_out, C, G_rel, 25)
        idx = self.perm.to(w.device)[None, :, None, :, None].expand(O, G, C, G, R.shape[-1])
        K = torch.gather(R, 3, idx)                   # K[o, g, c, h] = R[o, g, c, index(g^-1 h)]
        return K.reshape(O * G, C * G, KERNEL_SIZE, KERNEL_SIZE)


# ------------------------------------------------------------------- O(h^2) measurement
def _smooth_test_function(x, y):
    """A smooth, non-symmetric analytic image: Gaussian envelope times an oblique cosine."""
    return torch.exp(-((x - 0.2) ** 2 + (y + 0.1) ** 2) / 2.0) * torch.cos(1.3 * x - 0.6 * y + 0.4)


def refinement_study(*, method: str = "fd", n: int = 8, k: int = 1, hs=(0.2, 0.1, 0.05, 0.025),
                     out_fields: int = 4, radius: float = 2.0, offset: float = 0.0, seed: int = 0,
                     stencil_kw: dict | None = None, f=None) -> list[dict]:
    """Equivariance error of a C_n PDO lifting layer at the element ``k`` (angle ``360 k / n``)
    as the grid is refined, with the rotation applied **analytically** (no interpolation).

    A smooth function ``f(x, y)`` (default: Gaussian x cosine) is sampled on grids of spacing
    ``h``. One random PDO per output field (float64, fixed ``seed``) is scaled to the continuum,
    ``c_a -> c_a / h^|a|``, so that every ``h`` discretises the same operators. For every grid point
    ``p`` within ``radius`` of the centre the study compares the layer on the rotated function,
    ``Psi(f o R^-1)(p, g)``, with the layer on ``f`` evaluated at the off-grid point ``R^-1 p``
    (a 5x5 patch of ``f`` sampled around ``R^-1 p``), orientation ``r^-k g``. Their difference is the
    layer's equivariance error only: ``max |difference| / max |Psi f|``. Exact elements (multiples
    of 90 degrees) give float64 noise; others decay like h^2.

    Returns ``[{"h": h, "error": e, "points": N}, ...]``.
    """
    f = _smooth_test_function if f is None else f
    G = cyclic(n)
    b = G.element(k)
    R = G.matrix(b)
    gen = torch.Generator().manual_seed(seed)
    coeffs = torch.randn(out_fields, 1, 9, generator=gen, dtype=torch.float64)
    orders = torch.tensor([i + j for i, j in LEARNABLE], dtype=torch.float64)
    layer = PDOLiftingConv(group=G, in_channels=1, out_fields=out_fields, method=method,
                           parametrization="pdo", offset=offset, padding=0, stencil_kw=stencil_kw).double()
    u = torch.tensor([[c - 2, 2 - r] for r in range(5) for c in range(5)], dtype=torch.float64)  # (25, 2)
    perm = G.regular_perm[G.index(b)]
    out = []
    for h in hs:
        with torch.no_grad():
            layer.weight.copy_(coeffs / h ** orders)
        m = int(round(radius / h))
        N = 2 * m + 1                                              # evaluation grid, centre = 0
        X, Y = plane_coords(N + 4, N + 4, spacing=h)              # x right, y up (row 0 on top)
        Xr, Yr = R[0, 0] * X + R[1, 0] * Y, R[0, 1] * X + R[1, 1] * Y      # R^-1 p = R^T p
        with torch.no_grad():
            y1 = layer(f(Xr, Yr)[None, None])[0]                   # (O, G, N, N): Psi(f o R^-1)
            P = torch.stack([X[2:-2, 2:-2].reshape(-1), Y[2:-2, 2:-2].reshape(-1)], -1)  # (N*N, 2)
            Q = P @ R                                               # rows: (R^T p)^T
            pts = Q[:, None, :] + h * u[None]                       # (N*N, 25, 2)
            patches = f(pts[..., 0], pts[..., 1]).reshape(-1, 1, 5, 5)
            y2 = layer(patches)[:, :, :, 0, 0]                      # (N*N, O, G): Psi f at R^-1 p
        y2 = y2[:, :, perm].permute(1, 2, 0).reshape(y1.shape)     # rho(b) on the group axis
        mask = (X[2:-2, 2:-2] ** 2 + Y[2:-2, 2:-2] ** 2) <= radius ** 2
        err = ((y1 - y2).abs() * mask).amax() / (y2.abs() * mask).amax()
        out.append({"h": float(h), "error": float(err), "points": int(mask.sum())})
    return out


# ------------------------------------------------------------------------------ the family registry
@register_family("pdo-conv", family="PDO-eConv", group="C8", description="PDOGroupConv fd, 8 -> 8 regular fields",
                 paper="Shen et al., PDO-eConvs, ICML 2020")
def _pdo_example(*, width, kernel_size):
    G = cyclic(8)
    f = fields_for(width, G.order)                      # PDO stencils are 5 x 5 whatever kernel_size is
    return (PDOGroupConv(group=G, in_fields=f, out_fields=f, method="fd"),
            PDOLiftingConv(group=G, in_channels=1, out_fields=f, method="fd"))
