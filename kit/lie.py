"""Grids on the Lie groups SE(2) = R^2 x| SO(2) and Sim(2) = R^2 x| (SO(2) x R+), the continuous groups
of the separable G-CNNs (Knigge, Romero & Bekkers, ICML 2022), beside the finite groups of
:mod:`kit.groups`. Core: depends on :mod:`kit.groups` and :mod:`kit.fields` only.

* SE(2): ``N`` rotations ``theta_a = offset + 2 pi a / N``; the rotation sub-grid *is* the kit's
  cyclic group C_N, so a field is a regular C_N field ``(B, C, N, H, W)``.
* Sim(2): ``N`` rotations x ``S`` scales ``s_m = exp(m log(s_max) / (S - 1))`` (a truncated scale grid,
  no wrap), rotation-major layout ``(B, C, N*S, H, W)``; the group axis carries
  ``regular(C_N) (x) 1_S`` (:func:`scale_regular_rep`), a permutation representation.

The layers that sample kernels on these grids are in :mod:`kit.layers.separable`.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from .fields import FieldType
from .groups import CyclicGroup, Representation, cyclic, regular_rep

__all__ = ["LieGrid", "SE2", "Sim2", "scale_regular_rep", "TWO_PI"]

TWO_PI = 2 * math.pi


@lru_cache(maxsize=None)
def scale_regular_rep(n: int, scales: int) -> Representation:
    """``regular(C_n) (x) 1_scales``: C_n acts on the rotation index of a rotation-major
    ``(n * scales)`` axis by a cyclic roll, leaving the scale index unchanged."""
    G = cyclic(n)
    if scales == 1:
        return regular_rep(G)
    eye = torch.eye(scales, dtype=torch.float64)
    mats = torch.stack([torch.kron(G.regular_matrix(g), eye) for g in G.elements])
    return Representation(G, f"regular x {scales} scales", mats)


class LieGrid:
    """A discretisation of SE(2) (``scales == 1``) or Sim(2): ``rotations`` angles x ``scales`` scales.

    Use :func:`SE2` / :func:`Sim2`. ``group`` is the rotation sub-grid as the kit's C_N; ``rep`` the
    representation carried by the group axis (``dim = rotations * scales``).
    """

    def __init__(self, rotations: int, scales: int = 1, s_max: float = 1.74):
        if isinstance(rotations, bool) or not isinstance(rotations, int) or rotations < 1:
            raise ValueError(f"rotations must be an int >= 1, got {rotations!r}")
        if isinstance(scales, bool) or not isinstance(scales, int) or scales < 1:
            raise ValueError(f"scales must be an int >= 1, got {scales!r}")
        if scales > 1 and not s_max > 1:
            raise ValueError(f"s_max must be > 1 for a scale grid, got {s_max!r}")
        self.rotations, self.scales = rotations, scales
        self.s_max = float(s_max) if scales > 1 else 1.0
        self.group: CyclicGroup = cyclic(rotations)
        self.rep = scale_regular_rep(rotations, scales)

    @property
    def is_sim2(self) -> bool:
        return self.scales > 1

    @property
    def name(self) -> str:
        return (f"Sim(2)[{self.rotations} rot x {self.scales} scales]" if self.is_sim2
                else f"SE(2)[{self.rotations} rot]")

    def __repr__(self) -> str:
        return self.name

    def __eq__(self, other) -> bool:
        return isinstance(other, LieGrid) and (self.rotations, self.scales, self.s_max) == \
            (other.rotations, other.scales, other.s_max)

    def __hash__(self) -> int:
        return hash((self.rotations, self.scales, self.s_max))

    @property
    def dim(self) -> int:
        """Size of the group axis of a field, ``rotations * scales``."""
        return self.rotations * self.scales

    @property
    def exact_quarters(self) -> bool:
        """True when the grid contains the rotations by 90 degrees (``rotations % 4 == 0``)."""
        return self.rotations % 4 == 0

    def field_type(self, n_fields: int) -> FieldType:
        return FieldType(self.group, self.rep, n_fields)

    def trivial_type(self, n_channels: int) -> FieldType:
        return FieldType(self.group, "trivial", n_channels)

    def angles(self, offset: float = 0.0) -> torch.Tensor:
        """The rotation angles ``offset + 2 pi a / N`` (radians, counter-clockwise), float64."""
        return offset + TWO_PI * torch.arange(self.rotations, dtype=torch.float64) / self.rotations

    def log_scales(self) -> torch.Tensor:
        """``log s_m``, evenly spaced in ``[0, log s_max]`` (float64, ``(S,)``)."""
        if self.scales == 1:
            return torch.zeros(1, dtype=torch.float64)
        return torch.linspace(0.0, math.log(self.s_max), self.scales, dtype=torch.float64)


def SE2(rotations: int) -> LieGrid:
    """SE(2) sampled with ``rotations`` angles (the rotation sub-grid is C_rotations)."""
    return LieGrid(rotations, 1)


def Sim2(rotations: int, scales: int = 3, s_max: float = 1.74) -> LieGrid:
    """Sim(2) sampled with ``rotations`` angles x ``scales`` scales in ``[1, s_max]`` (reference: 3, 1.74)."""
    return LieGrid(rotations, scales, s_max)
