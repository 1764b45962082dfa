"""Separable group convolutions on Lie groups (Knigge, Romero & Bekkers, ICML 2022).

Regular group convolutions on SE(2) = R^2 x| SO(2) and Sim(2) = R^2 x| (SO(2) x R+) whose kernels
are *continuous* functions of the group coordinates, given by a SIREN (a sine MLP) and sampled on a
grid of group elements. Spec: ``../shared/reference/separable_gcnn.md``.

The grid (:class:`kit.lie.LieGrid`)
---------------------------
* SE(2): ``N`` rotations ``theta_a = offset + 2 pi a / N``. The rotation sub-grid *is* the kit's
  cyclic group C_N: a field is a regular C_N field ``(B, C, N, H, W)``, so
  :class:`kit.fields.FieldType`, :func:`kit.equivariance.check` and the pieces of
  :mod:`kit.layers.base` work unchanged.
* Sim(2): ``N`` rotations x ``S`` scales ``s_m = exp(m log(s_max) / (S - 1))`` (a truncated scale grid,
  no wrap). Layout ``(B, C, N*S, H, W)``, rotation-major: group-axis position ``a*S + m``. The field
  carries the representation ``regular(C_N) (x) 1_S`` of C_N (:func:`kit.lie.scale_regular_rep`): a rotation by
  ``k`` steps rolls the rotation index by ``k`` and leaves the scale index alone. It is a permutation
  representation, so ReLU, group batch norm, pooling and ``check()`` apply as for regular fields.
  Scale is a *learned-kernel* symmetry only (the grid is truncated): no exact scale equivariance is
  claimed.
* Evaluation uses the fixed grid (offset 0): deterministic outputs, kernels cached
  (:class:`kit.layers.base.KernelCache`). In training ``random_offset=True`` draws one global offset
  ``U[0, 2 pi / N)`` per forward call (a model shares one offset among all its layers, see
  :func:`shared_grid_offset`), a randomly rotated grid, not i.i.d. samples.

Kernels (SIREN over group coordinates, reference defaults: hidden 64, 1 hidden layer, omega_0 10)
------------------------------------------------------------------------------------------------
The SIREN sees Lie-algebra coordinates: the spatial offset ``u`` transformed by the output element,
``s_m^-1 R(-theta_a) u`` (``u`` on ``linspace(-1, 1, k)^2`` for SE(2), ``linspace(-s_max, s_max, k)^2``
for Sim(2); x right, y up, as in :mod:`kit.groups`), the relative rotation ``theta_b - theta_a``
normalised as ``theta / pi - 1`` and the relative log-scale ``log s_n - log s_m``.
Masks: hard disk (SE(2)) or ``sigmoid(3 (1 - |x'|))`` (Sim(2)) in space; a soft window
``sigmoid(slope (log(s_max)/S - |dlog s|))`` over scale pairs (slope 5, 10 for the separable H-kernel).
Normalisation ``1 / det(h) = 1 / s^2`` (the Jacobian of the planar dilation) in every variant; the
public code mixes ``1/s`` and ``1/s^2`` (see the spec).

Variants (i input channel, j output channel)
--------------------------------------------
============== ============================ ================================================
variant        kernel k_ij(x, h)            computation
============== ============================ ================================================
nonseparable   k_ij(x, h), one SIREN         one conv2d ``C*D -> O*D``, k x k
separable      k_ij(h) k_j(x)                1x1 conv ``C*D -> O*D`` then depthwise k x k conv
dseparable     k_ij k_j(x, h)                1x1 channel projection ``C -> O`` (shared over the group),
                                             then a depthwise group conv (groups = O)
============== ============================ ================================================

Lifting layers: ``nonseparable`` (the reference's lifting, used by every model) and ``separable``
(``k_ij k_j(h^-1 x)``: a 1x1 projection, then a per-channel spatial kernel steered to every element).

Exactness at 90 degrees. When ``N`` is a multiple of 4 the kernel is evaluated for the first quarter
of output rotations only and the others are built by *exact* pixel permutations,
``K[a + N/4, b] = rot90(K[a, b - N/4])``; relative rotations are computed from integer index
differences. The layers are therefore equivariant to float precision at every multiple of 90
degrees, for SE(2) and Sim(2) alike (the public code's Sim(2) variants are not, spec section 9), and
the SIREN is evaluated 4x less often.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..groups import plane_coords, rotate_image
from ..lie import SE2, TWO_PI, LieGrid
from .base import EquivariantModule, KernelCache, conv1x1
from .registry import fields_for, register_family

__all__ = ["SIREN", "LieLiftingConv", "LieGroupConv",
           "VARIANTS", "LIFT_VARIANTS", "shared_grid_offset", "lie_convs"]

VARIANTS = ("nonseparable", "separable", "dseparable")
LIFT_VARIANTS = ("nonseparable", "separable")


# ------------------------------------------------------------------------------------- SIREN
class SIREN(nn.Module):
    """Sine MLP ``f -> hidden -> ... -> out``: ``sin(omega (W x + b))`` layers, then a linear layer.

    Initialisation (reference): first layer ``U(+-1/f)`` (bias PyTorch default), hidden layers
    ``U(+-sqrt(6/hidden)/omega_0)`` (bias 0), final layer ``U(+-sqrt(6/hidden)/sqrt(fan_in))`` (bias 0)
    where ``fan_in`` is the number of terms one output of the convolution sums (``C_in k^2``).
    """

    def __init__(self, in_features: int, out_features: int, *, hidden: int = 64, num_hidden: int = 1,
                 omega_0: float = 10.0, first_omega_0: float = 10.0, fan_in: int = 1):
        super().__init__()
        self.first = nn.Linear(in_features, hidden)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_hidden))
        self.final = nn.Linear(hidden, out_features)
        self.omega_0, self.first_omega_0 = float(omega_0), float(first_omega_0)
        with torch.no_grad():
            self.first.weight.uniform_(-1 / in_features, 1 / in_features)
            for lin in self.hidden:
                b = math.sqrt(6 / hidden) / self.omega_0
                lin.weight.uniform_(-b, b)
                lin.bias.zero_()
            b = math.sqrt(6 / hidden) / math.sqrt(max(fan_in, 1))
            self.final.weight.uniform_(-b, b)
            self.final.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # (..., f) -> (..., out)
        h = torch.sin(self.first_omega_0 * self.first(x))
        for lin in self.hidden:
            h = torch.sin(self.omega_0 * lin(h))
        return self.final(h)


# ------------------------------------------------------------------------- coordinates, masks
def _rows(grid: LieGrid) -> int:
    """Number of output rotations whose kernels are evaluated; the rest follow by rot90."""
    return grid.rotations // 4 if grid.exact_quarters else grid.rotations


def _spatial_coords(grid: LieGrid, k: int, offset: float, rows: int) -> torch.Tensor:
    """``s_m^-1 R(-theta_a) u`` for ``a < rows``, every scale ``m`` and the ``k x k`` offsets ``u``:
    ``(rows, S, k, k, 2)`` float64, ``u`` normalised to ``[-1, 1]`` (x ``s_max`` for Sim(2))."""
    r = (k - 1) / 2
    X, Y = plane_coords(k, k)                                            # planar: x right, y up
    ux, uy = X / max(r, 1.0), Y / max(r, 1.0)
    ux, uy = ux * grid.s_max, uy * grid.s_max
    th = grid.angles(offset)[:rows].view(rows, 1, 1, 1)
    inv_s = torch.exp(-grid.log_scales()).view(1, -1, 1, 1)
    c, s = torch.cos(th), torch.sin(th)
    x = (c * ux + s * uy) * inv_s                                        # R(-theta) u / s
    y = (-s * ux + c * uy) * inv_s
    return torch.stack([x, y], dim=-1)                                   # (rows, S, k, k, 2)


def _spatial_mask(grid: LieGrid, coords: torch.Tensor) -> torch.Tensor:
    """``(rows, S, k, k)``: hard disk ``|x'| <= 1`` (SE(2)) or ``sigmoid(3 (1 - |x'|))`` (Sim(2))."""
    norm = coords.norm(dim=-1)
    if grid.is_sim2:
        return torch.sigmoid(3.0 * (1.0 - norm))
    return (norm <= 1.0 + 1e-9).to(coords.dtype)


def _rel_angle(grid: LieGrid, rows: int) -> torch.Tensor:
    """``(rows, N)``: the normalised relative rotation ``theta_b - theta_a`` (``theta / pi - 1``),
    computed from the integer index difference: exact, and independent of the grid offset."""
    N = grid.rotations
    d = (torch.arange(N).view(1, N) - torch.arange(rows).view(rows, 1)) % N
    return 2.0 * d.to(torch.float64) / N - 1.0


def _rel_log_scale(grid: LieGrid) -> torch.Tensor:
    """``(S_out, S_in)``: ``log s_n - log s_m``."""
    ls = grid.log_scales()
    return ls.view(1, -1) - ls.view(-1, 1)


def _scale_window(grid: LieGrid, slope: float) -> torch.Tensor:
    """``(S_out, S_in)`` soft window over scale pairs (ones for SE(2))."""
    d = _rel_log_scale(grid)
    if not grid.is_sim2:
        return torch.ones_like(d)
    return torch.sigmoid(slope * (math.log(grid.s_max) / grid.scales - d.abs()))


def _inv_det(grid: LieGrid) -> torch.Tensor:
    """``(S,)``: ``1 / det(h) = s^-2``."""
    return torch.exp(-2.0 * grid.log_scales())


def _complete(Kq: torch.Tensor, grid: LieGrid, in_axis: int | None = None) -> torch.Tensor:
    """Rows ``a < N/4`` (dim 0) -> all ``N`` rows: ``K[a + rQ] = rot90^r(roll^{rQ}_{in_axis} K[a])``.

    ``rot90`` acts on the last two (spatial) dims; ``in_axis`` is the input-rotation axis of a group
    kernel (None for lifting / spatial kernels). Exact: a permutation of entries.
    """
    Q, N = Kq.shape[0], grid.rotations
    if Q == N:
        return Kq
    parts = [Kq]
    for r in (1, 2, 3):
        P = rotate_image(Kq, 90.0 * r)                       # exact quarter turn (kit.groups)
        parts.append(torch.roll(P, r * Q, dims=in_axis) if in_axis is not None else P)
    return torch.cat(parts, dim=0)


def _grouped_conv(u: torch.Tensor, K: torch.Tensor, padding: int, groups: int) -> torch.Tensor:
    """``conv2d`` with ``groups``; on the CPU in channels-last layout, whose depthwise backward is
    several times faster (and far less erratic with several threads) than the contiguous one."""
    if u.device.type == "cpu":
        u = u.contiguous(memory_format=torch.channels_last)
        return F.conv2d(u, K, padding=padding, groups=groups).contiguous()
    return F.conv2d(u, K, padding=padding, groups=groups)


# ------------------------------------------------------------------------------- the layers
class _LieConv(KernelCache, EquivariantModule):
    """Shared machinery: grid, SIREN settings, grid offset, eval-mode kernel cache."""

    def __init__(self, grid: LieGrid, kernel_size: int, padding: int | None, variant: str,
                 variants: tuple, random_offset: bool, siren: dict):
        super().__init__()
        if not isinstance(grid, LieGrid):
            raise ValueError(f"grid must be a kit.lie.LieGrid (SE2(n) / Sim2(n)), got {grid!r}")
        if variant not in variants:
            raise ValueError(f"unknown variant {variant!r}; expected one of {variants}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 \
                or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int (a centred kernel), got {kernel_size!r}")
        self.grid, self.variant, self.kernel_size = grid, variant, kernel_size
        self.padding = kernel_size // 2 if padding is None else padding
        self.random_offset = bool(random_offset)
        self.siren_kw = dict(hidden=64, num_hidden=1, omega_0=10.0, first_omega_0=10.0)
        unknown = set(siren) - set(self.siren_kw)
        if unknown:
            raise ValueError(f"unknown SIREN setting(s) {sorted(unknown)}; valid: {sorted(self.siren_kw)}")
        self.siren_kw.update(siren)
        self._forced_offset: float | None = None

    def _siren(self, f: int, out: int, fan_in: int, **over) -> SIREN:
        return SIREN(f, out, fan_in=fan_in, **{**self.siren_kw, **over})

    def grid_offset(self) -> float:
        """The rotation offset of the sampled grid for this call (0 in eval: deterministic)."""
        if not self.training:
            return 0.0
        if self._forced_offset is not None:
            return float(self._forced_offset)
        if self.random_offset:
            return float(torch.rand(())) * TWO_PI / self.grid.rotations
        return 0.0

    def filters(self):
        """The sampled convolution weights of this call (cached in eval mode, never stale)."""
        offset = self.grid_offset()
        dtype = next(self.parameters()).dtype
        return self.cached_kernel(lambda: self._build(offset, dtype), *self.parameters())

    def extra_repr(self) -> str:
        return (f"{self.grid.name}, {self.variant}, {self.in_type} -> {self.out_type}, "
                f"kernel_size={self.kernel_size}, padding={self.padding}, random_offset={self.random_offset}")


class LieLiftingConv(_LieConv):
    """Lifting convolution ``(B, C, H, W) -> (B, O, N*S, H', W')`` on SE(2) / Sim(2).

    Args:
        grid: :func:`SE2` or :func:`Sim2`. in_channels / out_fields: channels and output fields.
        kernel_size: odd. padding: default ``kernel_size // 2``.
        variant: ``"nonseparable"`` (one SIREN ``R^2 -> C*O``, the reference's lifting) or
            ``"separable"`` (``k_ij k_j(h^-1 x)``: 1x1 projection, then a steered per-channel kernel).
        random_offset: draw a random grid rotation per training call.
        **siren: ``hidden``, ``num_hidden``, ``omega_0``, ``first_omega_0``.
    """

    def __init__(self, *, grid: LieGrid, in_channels: int, out_fields: int, kernel_size: int = 7,
                 padding: int | None = None, variant: str = "nonseparable", random_offset: bool = False,
                 **siren):
        super().__init__(grid, kernel_size, padding, variant, LIFT_VARIANTS, random_offset, siren)
        self.in_type, self.out_type = grid.trivial_type(in_channels), grid.field_type(out_fields)
        C, O, k = in_channels, out_fields, kernel_size
        if variant == "nonseparable":
            self.kernel_net = self._siren(2, O * C, C * k * k)
        else:
            self.weight = nn.Parameter(torch.empty(O, C).uniform_(-1 / math.sqrt(C), 1 / math.sqrt(C)))
            self.kernel_net = self._siren(2, O, k * k)

    def _build(self, offset: float, dtype):
        g, k, Q = self.grid, self.kernel_size, _rows(self.grid)
        O, C, S = self.out_type.n_fields, self.in_type.n_fields, g.scales
        X = _spatial_coords(g, k, offset, Q)                                        # (Q, S, k, k, 2)
        w = (_spatial_mask(g, X) * _inv_det(g).view(1, S, 1, 1)).to(dtype)          # (Q, S, k, k)
        K = self.kernel_net(X.to(dtype))                                            # (Q, S, k, k, O*C | O)
        if self.variant == "nonseparable":
            K = K.view(Q, S, k, k, O, C).permute(0, 1, 4, 5, 2, 3) * w[:, :, None, None]   # (Q, S, O, C, k, k)
            K = _complete(K, g).permute(2, 0, 1, 3, 4, 5)                                 # (O, N, S, C, k, k)
            return K.reshape(O * g.dim, C, k, k)
        K = K.permute(0, 1, 4, 2, 3) * w[:, :, None]                                      # (Q, S, O, k, k)
        K = _complete(K, g).permute(2, 0, 1, 3, 4)                                        # (O, N, S, k, k)
        return self.weight, K.reshape(O * g.dim, 1, k, k)

    def _forward(self, x):
        O = self.out_type.n_fields
        if self.variant == "nonseparable":
            y = F.conv2d(x, self.filters(), padding=self.padding)                   # (B, O*D, H', W')
        else:
            W, KR = self.filters()
            u = conv1x1(x, W[:, :, None, None])                                      # (B, O, H, W)
            y = _grouped_conv(u, KR, self.padding, O)                                  # (B, O*D, H', W')
        return self.out_type.unflatten(y)                                            # (B, O, D, H', W')


class LieGroupConv(_LieConv):
    """Group convolution ``(B, C, N*S, H, W) -> (B, O, N*S, H', W')`` on SE(2) / Sim(2).

    ``variant``: ``"nonseparable"`` (one SIREN over ``(x, y, dtheta[, dlog s]) -> C*O``),
    ``"separable"`` (``k_ij(h) k_j(x)``: an H-SIREN ``(dtheta[, dlog s]) -> C*O`` and a spatial SIREN
    ``(x, y) -> O``; a 1x1 conv then a depthwise conv) or ``"dseparable"`` (``k_ij k_j(x, h)``: a 1x1
    channel projection ``C -> O`` shared over the group, then a SIREN ``(x, y, dtheta[, dlog s]) -> O``
    depthwise over channels). Other args as :class:`LieLiftingConv`.
    """

    def __init__(self, *, grid: LieGrid, in_fields: int, out_fields: int, kernel_size: int = 7,
                 padding: int | None = None, variant: str = "nonseparable", random_offset: bool = False,
                 **siren):
        super().__init__(grid, kernel_size, padding, variant, VARIANTS, random_offset, siren)
        self.in_type, self.out_type = grid.field_type(in_fields), grid.field_type(out_fields)
        C, O, k = in_fields, out_fields, kernel_size
        fh = 2 if grid.is_sim2 else 1                                       # dtheta [, dlog s]
        if variant == "nonseparable":
            self.kernel_net = self._siren(2 + fh, O * C, C * k * k)
        elif variant == "separable":
            self.kernel_net_h = self._siren(fh, O * C, C)
            self.kernel_net = self._siren(2, O, k * k)
        else:
            self.weight = nn.Parameter(torch.empty(O, C).uniform_(-1 / math.sqrt(C), 1 / math.sqrt(C)))
            self.kernel_net = self._siren(2 + fh, O, k * k)

    # ------------------------------------------------------------------------------- kernels
    def _full_coords(self, offset: float, rows: int) -> torch.Tensor:
        """``(rows, S_out, N_in, S_in, k, k, f)``: spatial coords of the output element, the relative
        rotation and (Sim(2)) the relative log-scale."""
        g, k = self.grid, self.kernel_size
        N, S = g.rotations, g.scales
        X = _spatial_coords(g, k, offset, rows)[:, :, None, None]                     # (Q, S, 1, 1, k, k, 2)
        shape = (rows, S, N, S, k, k)
        parts = [X.expand(*shape, 2),
                 _rel_angle(g, rows).view(rows, 1, N, 1, 1, 1, 1).expand(*shape, 1)]
        if g.is_sim2:
            parts.append(_rel_log_scale(g).view(1, S, 1, S, 1, 1, 1).expand(*shape, 1))
        return torch.cat(parts, dim=-1)

    def _group_weight(self, offset: float, dtype, slope: float) -> torch.Tensor:
        """``(Q, S_out, S_in, k, k)``: spatial mask x scale window x 1/det of the output element."""
        g, Q, S = self.grid, _rows(self.grid), self.grid.scales
        m = _spatial_mask(g, _spatial_coords(g, self.kernel_size, offset, Q))           # (Q, S, k, k)
        w = m[:, :, None] * _scale_window(g, slope).view(1, S, S, 1, 1) * _inv_det(g).view(1, S, 1, 1, 1)
        return w.to(dtype)

    def _build(self, offset: float, dtype):
        g, k, Q = self.grid, self.kernel_size, _rows(self.grid)
        O, C, N, S, D = self.out_type.n_fields, self.in_type.n_fields, g.rotations, g.scales, g.dim
        if self.variant == "nonseparable":
            K = self.kernel_net(self._full_coords(offset, Q).to(dtype))        # (Q, S, N, S, k, k, O*C)
            K = K.view(Q, S, N, S, k, k, O, C).permute(0, 1, 6, 7, 2, 3, 4, 5)  # (Q, S, O, C, N, S, k, k)
            K = K * self._group_weight(offset, dtype, 5.0).view(Q, S, 1, 1, 1, S, k, k)
            K = _complete(K, g, in_axis=4).permute(2, 0, 1, 3, 4, 5, 6, 7)     # (O, N, S, C, N, S, k, k)
            return K.reshape(O * D, C * D, k, k)
        if self.variant == "dseparable":
            K = self.kernel_net(self._full_coords(offset, Q).to(dtype))        # (Q, S, N, S, k, k, O)
            K = K.permute(0, 1, 6, 2, 3, 4, 5)                                 # (Q, S, O, N, S, k, k)
            K = K * self._group_weight(offset, dtype, 5.0).view(Q, S, 1, 1, S, k, k)
            K = _complete(K, g, in_axis=3).permute(2, 0, 1, 3, 4, 5, 6)        # (O, N, S, N, S, k, k)
            return self.weight, K.reshape(O * D, D, k, k)
        # separable: H-kernel from the N distinct relative rotations, gathered as a circulant
        ang = 2.0 * torch.arange(N, dtype=torch.float64) / N - 1.0                   # d = (b - a) mod N
        parts = [ang.view(N, 1, 1, 1).expand(N, S, S, 1)]
        if g.is_sim2:
            parts.append(_rel_log_scale(g).view(1, S, S, 1).expand(N, S, S, 1))
        KH = self.kernel_net_h(torch.cat(parts, -1).to(dtype))                    # (N, S_out, S_in, O*C)
        KH = KH * _scale_window(g, 10.0).to(dtype).view(1, S, S, 1)
        idx = (torch.arange(N).view(1, N) - torch.arange(N).view(N, 1)) % N         # idx[a, b]
        KH = KH.view(N, S, S, O, C)[idx]                                             # (N_a, N_b, S, S, O, C)
        KH = KH.permute(4, 0, 2, 5, 1, 3).reshape(O * D, C * D, 1, 1)                # (O, a, m, C, b, n)
        X = _spatial_coords(g, k, offset, Q)
        KR = self.kernel_net(X.to(dtype)).permute(0, 1, 4, 2, 3)                     # (Q, S, O, k, k)
        KR = KR * (_spatial_mask(g, X) * _inv_det(g).view(1, S, 1, 1)).to(dtype)[:, :, None]
        KR = _complete(KR, g).permute(2, 0, 1, 3, 4)                                 # (O, N, S, k, k)
        return KH, KR.reshape(O * D, 1, k, k)

    def canonical_kernel(self) -> torch.Tensor:
        """The kernel of the identity output element (rotation 0, scale 1) on the fixed grid,
        ``(O, C, D_in, k, k)``, detached: what :mod:`kit.explore.redundancy` analyses (the other output
        elements' kernels are transformed copies)."""
        g, k = self.grid, self.kernel_size
        O, C, D = self.out_type.n_fields, self.in_type.n_fields, g.dim
        with torch.no_grad():
            dtype = next(self.parameters()).dtype
            built = self._build(0.0, dtype)
            if self.variant == "nonseparable":
                return built.view(O, D, C, D, k, k)[:, 0].clone()
            if self.variant == "separable":
                KH, KR = built
                kh = KH.view(O, D, C, D)[:, 0]                                        # (O, C, D)
                return kh[..., None, None] * KR.view(O, D, k, k)[:, 0][:, None, None]
            W, KD = built
            return W[:, :, None, None, None] * KD.view(O, D, D, k, k)[:, 0][:, None]

    # ------------------------------------------------------------------------------- forward
    def _forward(self, x):
        O, t = self.out_type.n_fields, self.in_type
        if self.variant == "nonseparable":
            y = F.conv2d(t.flatten(x), self.filters(), padding=self.padding)
        elif self.variant == "separable":
            KH, KR = self.filters()
            u = conv1x1(t.flatten(x), KH)                                             # (B, O*D, H, W)
            y = _grouped_conv(u, KR, self.padding, O * self.grid.dim)                 # depthwise
        else:
            W, KD = self.filters()
            u = torch.einsum("oc,bcdhw->bodhw", W, x).flatten(1, 2)                   # (B, O*D, H, W)
            y = _grouped_conv(u, KD, self.padding, O)
        return self.out_type.unflatten(y)                                             # (B, O, D, H', W')


# ---------------------------------------------------------------------- shared grid offsets
def lie_convs(module: nn.Module) -> list[_LieConv]:
    """Every SE(2) / Sim(2) convolution inside ``module``."""
    return [m for m in module.modules() if isinstance(m, _LieConv)]


@contextmanager
def shared_grid_offset(module: nn.Module, offset: float | None = None):
    """Make every Lie convolution of ``module`` use one grid offset (radians) inside the block.

    ``offset=None`` draws ``U[0, 2 pi / N)``. Only training-mode calls use offsets; eval is always
    the fixed grid. A model calls this around its training forward so that all its layers agree on
    which angle a group index stands for.
    """
    convs = lie_convs(module)
    if offset is None:
        N = min((c.grid.rotations for c in convs), default=1)
        offset = float(torch.rand(())) * TWO_PI / N
    for c in convs:
        c._forced_offset = offset
    try:
        yield offset
    finally:
        for c in convs:
            c._forced_offset = None


# ------------------------------------------------------------------------------ the family registry
@register_family("sep-conv", family="Separable G-CNN", group="SE(2), 8 rot.",
                 description="LieGroupConv separable, 8 -> 8 fields",
                 paper="Knigge, Romero & Bekkers, Exploiting Redundancy, ICML 2022")
def _separable_example(*, width, kernel_size):
    grid = SE2(8)
    f = fields_for(width, grid.dim)
    return (LieGroupConv(grid=grid, in_fields=f, out_fields=f, kernel_size=kernel_size, variant="separable"),
            LieLiftingConv(grid=grid, in_channels=1, out_fields=f, kernel_size=kernel_size))
