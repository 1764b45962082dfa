"""Field types: which representation each channel carries, and how a group element acts on it.

The equivariance contract of every eqkit module (escnn style): a module exposes ``in_type`` and
``out_type`` and satisfies ``out_type.transform(f(x), g) == f(in_type.transform(x, g))``.

Tensor layout (DESIGN.md):

* trivial fields (images, scalar feature maps): ``(B, C, H, W)``; non-spatial: ``(B, C)``;
* any other representation of dimension ``D``: ``(B, C, D, H, W)``; non-spatial ``(B, C, D)``.

``transform`` applies the spatial action of ``g`` (exact for multiples of 90 degrees and mirrors,
interpolated otherwise; see :mod:`kit.groups`) and ``rho(g)`` on the field axis ``D``.
"""
from __future__ import annotations

import torch

from .groups import Element, Group, Representation, regular_rep, trivial_rep

__all__ = ["FieldType", "regular", "trivial"]


class FieldType:
    """``n_fields`` fields of one representation ``rep`` of ``group``, on the plane or not.

    Args:
        group: the symmetry group (``kit.groups.cyclic(4)``, ...).
        rep: ``"trivial"``, ``"regular"`` or a :class:`kit.groups.Representation`.
        n_fields: number of fields ``C`` (>= 1).
        spatial: ``True`` for feature maps ``(..., H, W)``, ``False`` for vectors (logits).
    """

    def __init__(self, group: Group, rep: str | Representation, n_fields: int, *, spatial: bool = True):
        if not isinstance(group, Group):
            raise ValueError(f"expected a kit.groups.Group, got {group!r}")
        if isinstance(rep, str):
            makers = {"trivial": trivial_rep, "regular": regular_rep}
            if rep not in makers:
                raise ValueError(f"unknown representation {rep!r}; expected one of {sorted(makers)} "
                                 f"or a kit.groups.Representation")
            rep = makers[rep](group)
        if rep.group != group:
            raise ValueError(f"representation {rep!r} belongs to {rep.group.name}, not {group.name}")
        if isinstance(n_fields, bool) or not isinstance(n_fields, int) or n_fields < 1:
            raise ValueError(f"n_fields must be an int >= 1, got {n_fields!r}")
        self.group, self.rep, self.n_fields, self.spatial = group, rep, n_fields, bool(spatial)

    # ------------------------------------------------------------------------ describe
    @property
    def dim(self) -> int:
        """Dimension ``D`` of one field."""
        return self.rep.dim

    @property
    def is_trivial(self) -> bool:
        return self.rep.name == "trivial" and self.rep.dim == 1

    @property
    def channels(self) -> int:
        """Number of plain channels ``C * D`` (what ``conv2d`` sees)."""
        return self.n_fields * self.dim

    @property
    def ndim(self) -> int:
        return (2 if self.is_trivial else 3) + (2 if self.spatial else 0)

    def shape(self, H: int | None = None, W: int | None = None) -> tuple[int, ...]:
        """The per-sample shape: ``(C, H, W)`` for trivial fields, ``(C, D, H, W)`` otherwise (no H, W
        for non-spatial types)."""
        core = (self.n_fields,) if self.is_trivial else (self.n_fields, self.dim)
        if not self.spatial:
            return core
        if H is None or W is None:
            raise ValueError(f"{self!r} is spatial: shape() needs H and W")
        return (*core, int(H), int(W))

    def shape_str(self) -> str:
        field = "" if self.is_trivial else f", D={self.dim}"
        return f"(B, C={self.n_fields}{field}{', H, W' if self.spatial else ''})"

    def __repr__(self) -> str:
        where = "" if self.spatial else ", spatial=False"
        return f"FieldType({self.group.name}, {self.rep.name}, n_fields={self.n_fields}{where})"

    def __eq__(self, other) -> bool:
        return (isinstance(other, FieldType) and self.group == other.group and self.rep == other.rep
                and self.n_fields == other.n_fields and self.spatial == other.spatial)

    def __hash__(self) -> int:
        return hash((self.group, self.rep, self.n_fields, self.spatial))

    # ------------------------------------------------------------------------- check
    def check(self, x: torch.Tensor, what: str = "input") -> torch.Tensor:
        """Validate the layout of ``x``; raise a ``ValueError`` naming expected and actual shapes."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{what}: expected a torch.Tensor of shape {self.shape_str()}, "
                             f"got {type(x).__name__}")
        if x.dim() != self.ndim:
            raise ValueError(f"{what}: expected a {self.ndim}-D tensor {self.shape_str()} for {self!r}, "
                             f"got {x.dim()}-D of shape {tuple(x.shape)}")
        if x.shape[1] != self.n_fields:
            raise ValueError(f"{what}: expected C={self.n_fields} fields (dim 1) for {self!r}, "
                             f"got {x.shape[1]} in shape {tuple(x.shape)}")
        if not self.is_trivial and x.shape[2] != self.dim:
            raise ValueError(f"{what}: expected a field axis (dim 2) of size D={self.dim} "
                             f"({self.rep!r}), got {x.shape[2]} in shape {tuple(x.shape)}")
        return x

    # ---------------------------------------------------------------------- reshapes
    def flatten(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W) -> (B, C*D, H, W)`` (identity for trivial fields)."""
        return x if self.is_trivial else x.flatten(1, 2)

    def unflatten(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C*D, H, W) -> (B, C, D, H, W)`` (identity for trivial fields)."""
        return x if self.is_trivial else x.unflatten(1, (self.n_fields, self.dim))

    # ------------------------------------------------------------------------ action
    def transform(self, x: torch.Tensor, g: Element, *, mode: str = "bilinear") -> torch.Tensor:
        """``g . x``: the spatial action of ``g`` and ``rho(g)`` on the field axis."""
        self.check(x)
        if self.spatial:
            x = self.group.act_on_image(x, g, mode=mode)
        if self.is_trivial:
            return x
        i = self.group.index(g)
        if self.rep.perm is not None:                       # exact: a permutation of the D axis
            return x.index_select(2, self.rep.perm[i].to(x.device))
        M = self.rep.matrices[i].to(device=x.device, dtype=x.dtype)
        return torch.einsum("ij,bcj...->bci...", M, x)


def regular(group: Group, n_fields: int, **kw) -> FieldType:
    """``n_fields`` regular fields of ``group``."""
    return FieldType(group, "regular", n_fields, **kw)


def trivial(group: Group, n_fields: int, **kw) -> FieldType:
    """``n_fields`` trivial (scalar) fields of ``group``."""
    return FieldType(group, "trivial", n_fields, **kw)
