"""Regular group convolutions (Cohen & Welling, ICML 2016): lifting Z2 -> G and group G -> G.

One learnable kernel per (output field, input field) is steered to every group element ``g``:
``K_g(h, u) = rho_in(g) K(g^-1 u)`` on the input field axis ``h`` and the kernel offsets ``u``,
and the |G| steered copies are stacked as the output's regular field axis. A single ``conv2d``
then computes all of them: ``out[b, o, g] = corr(x, K_g)``.

* C4, D4 (and every element that is a multiple of 90 degrees or a mirror): kernels transformed by
  an exact permutation of pixels -> exactly equivariant (float noise).
* general C_n / D_n: kernels rotated by bilinear interpolation -> *approximately* equivariant;
  the elements of the C4 / D4 subgroup stay exact.
* ``stride > 1``: exact on the grid only when ``H + 2 padding - k`` (and the same for W) is a
  multiple of the stride, so that the sampled positions are symmetric under rotation; an odd 27x27
  input to a stride-2 layer is not (:func:`kit.equivariance.check` names such a layer in a warning).

Shapes: lifting ``(B, C_in, H, W) -> (B, C_out, |G|, H', W')``; group conv
``(B, C_in, |G|, H, W) -> (B, C_out, |G|, H', W')``. The steered filter bank is cached in eval
mode (see :class:`kit.layers.base.KernelCache`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..fields import FieldType
from ..groups import Group, cyclic, dihedral
from ..kernels.steering import steer_kernel, steering_matrices
from .base import EquivariantModule, KernelCache, field_conv2d
from .registry import fields_for, register_family

__all__ = ["LiftingConv", "GroupConv"]


class _RegularOutConv(KernelCache, EquivariantModule):
    """Shared machinery: any input type -> regular output fields."""

    def __init__(self, in_type: FieldType, out_fields: int, kernel_size: int, padding: int | None,
                 stride: int, bias: bool, interpolation: str):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int (a centred kernel), got {kernel_size}")
        if isinstance(out_fields, bool) or not isinstance(out_fields, int) or out_fields < 1:
            raise ValueError(f"out_fields must be an int >= 1, got {out_fields!r}")
        G = in_type.group
        self.in_type = in_type
        self.out_type = FieldType(G, "regular", out_fields)
        self.kernel_size, self.stride = kernel_size, stride
        self.padding = kernel_size // 2 if padding is None else padding
        self.exact = all(G.is_exact_on_grid(g) for g in G.elements)
        S = steering_matrices(G, kernel_size, mode=interpolation)
        rep = in_type.rep
        self.register_buffer("S", S.float(), persistent=False)
        self.register_buffer("rep_in", rep.matrices.float(), persistent=False)
        self.register_buffer("perm_in", rep.perm.clone() if rep.perm is not None else None, persistent=False)
        D = in_type.dim
        self.weight = nn.Parameter(torch.empty(out_fields, in_type.n_fields, D, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_fields)) if bias else None
        nn.init.normal_(self.weight, std=math.sqrt(2.0 / (in_type.channels * kernel_size ** 2)))

    def filter(self) -> torch.Tensor:
        """The steered filter bank ``(C_out*|G|, C_in*D_in, k, k)`` (cached in eval mode)."""
        return self.cached_kernel(lambda: steer_kernel(self.weight, self.S.to(self.weight.dtype),
                                                       self.rep_in.to(self.weight.dtype), self.perm_in),
                                  self.weight)

    def _forward(self, x):
        return field_conv2d(x, self.in_type, self.out_type, self.filter(), self.bias,
                            stride=self.stride, padding=self.padding)       # (B, C_out, |G|, H', W')

    def extra_repr(self) -> str:
        return (f"{self.in_type} -> {self.out_type}, kernel_size={self.kernel_size}, "
                f"{'exact' if self.exact else 'interpolated kernels (approximately equivariant)'}")


class LiftingConv(_RegularOutConv):
    """Lifting convolution: ``in_channels`` images / scalar fields -> ``out_fields`` regular fields.

    Args:
        group: ``kit.groups.cyclic(n)`` or ``dihedral(n)``.
        in_channels: number of input channels (trivial fields).
        out_fields: number of regular output fields (the layer outputs ``out_fields * |G|`` channels).
        kernel_size: odd kernel size. padding: default ``kernel_size // 2`` ("same").
        interpolation: how kernels are rotated for angles that are not multiples of 90 degrees.
    """

    def __init__(self, *, group: Group, in_channels: int, out_fields: int, kernel_size: int = 3,
                 padding: int | None = None, stride: int = 1, bias: bool = True,
                 interpolation: str = "bilinear"):
        super().__init__(FieldType(group, "trivial", in_channels), out_fields, kernel_size, padding,
                         stride, bias, interpolation)


class GroupConv(_RegularOutConv):
    """Group convolution: ``in_fields`` regular fields -> ``out_fields`` regular fields (same group).

    Args as :class:`LiftingConv`, with ``in_fields`` regular input fields.
    """

    def __init__(self, *, group: Group, in_fields: int, out_fields: int, kernel_size: int = 3,
                 padding: int | None = None, stride: int = 1, bias: bool = True,
                 interpolation: str = "bilinear"):
        super().__init__(FieldType(group, "regular", in_fields), out_fields, kernel_size, padding,
                         stride, bias, interpolation)

    def canonical_kernel(self) -> torch.Tensor:
        """The identity output element's kernel ``(C_out, C_in, |G|, k, k)``: the weight itself (detached)."""
        return self.weight.detach().clone()


# ------------------------------------------------------------------------------ the family registry
def _gconv_example(G: Group):
    def build(*, width, kernel_size):
        f = fields_for(width, G.order)
        return (GroupConv(group=G, in_fields=f, out_fields=f, kernel_size=kernel_size),
                LiftingConv(group=G, in_channels=1, out_fields=f, kernel_size=kernel_size))
    return build


for _G, _tag in ((cyclic(4), "p4"), (dihedral(4), "p4m"), (cyclic(8), "p8"), (cyclic(16), "c16")):
    _interp = not all(_G.is_exact_on_grid(g) for g in _G.elements)
    register_family(f"{_tag}-gconv", family="G-CNN", group=_G.name,
                    description=f"GroupConv, {64 // _G.order} -> {64 // _G.order} regular fields"
                                + (" (interpolated kernels)" if _interp else ""),
                    paper="Cohen & Welling, Group Equivariant Convolutional Networks, ICML 2016",
                    counterpart=f"escnn-{_G.name.lower()}")(_gconv_example(_G))
