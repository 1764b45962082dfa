"""Groups of planar rotations and reflections: the ONE place that owns the conventions.

Every layer, discretisation and model of eqkit takes its conventions from here; nothing
re-decides them. They are tested in ``tests/test_groups.py``.

Conventions
-----------
* **Images** are ``(..., H, W)`` tensors with row 0 at the top. A pixel ``(i, j)`` sits at the
  planar point ``x = j - (W-1)/2`` (right), ``y = (H-1)/2 - i`` (up): rotations are about the
  image centre.
* **Rotation direction.** A positive angle turns counter-clockwise *as displayed*.
  ``torch.rot90(img, 1, dims=(-2, -1))`` is the generator of C4 acting on images.
* **Elements.** C_n: ``Element(k)`` = rotation by ``2*pi*k/n``. D_n: ``Element(k, f)``:
  reflection first (``f=1`` mirrors the x axis, ``x -> -x``, i.e. a left-right flip of the
  image), then the rotation: ``g = r^k m^f``. Composition ``(k1,f1)(k2,f2) =
  (k1 + (-1)^f1 k2 mod n, f1 xor f2)``.
* **Element order** (the order of the group axis ``D`` of a regular field): C_n: ``k = 0..n-1``;
  D_n: the n rotations ``(k, 0)`` first, then the n reflections ``(k, 1)``; index ``f*n + k``.
* **Action on images**: ``(g.f)(p) = f(g^-1 p)``. Exact (``rot90`` / ``flip``) when the angle is a
  multiple of 90 degrees, interpolated (``grid_sample``) otherwise.
* **Regular representation**: ``rho(g) e_h = e_{gh}``, i.e. ``(g.v)[gh] = v[h]``; for C_n this
  is a cyclic roll of the group axis by ``+k``.

Continuous samplings of SE(2) / Sim(2) for the separable G-CNNs live with those layers and use
the same angle convention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

__all__ = [
    "Element", "Group", "CyclicGroup", "DihedralGroup", "cyclic", "dihedral",
    "rotate_image", "act_on_image", "rotate_batch", "rotation_matrix", "disk_mask", "plane_coords", "kernel_offsets",
    "Representation", "trivial_rep", "regular_rep",
]


@dataclass(frozen=True, order=True)
class Element:
    """A group element ``r^k m^f``: rotation index ``k`` after mirror flag ``f`` (0 or 1)."""

    k: int
    f: int = 0

    def __repr__(self) -> str:  # compact, readable in tables
        return f"Element(k={self.k}, f={self.f})" if self.f else f"Element(k={self.k})"


class Group:
    """A finite subgroup of O(2): cyclic C_n or dihedral D_n. Use :func:`cyclic` / :func:`dihedral`."""

    n: int  # number of rotations
    flip: bool

    def __init__(self, n: int, flip: bool):
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"group order n must be an int >= 1, got {n!r} ({type(n).__name__})")
        if n < 1:
            raise ValueError(f"group order n must be >= 1, got {n}")
        self.n, self.flip = n, bool(flip)

    # ----------------------------------------------------------------------------- basics
    @property
    def name(self) -> str:
        return f"{'D' if self.flip else 'C'}{self.n}"

    @property
    def order(self) -> int:
        return self.n * (2 if self.flip else 1)

    def __len__(self) -> int:
        return self.order

    def __repr__(self) -> str:
        return self.name

    def __eq__(self, other) -> bool:
        return isinstance(other, Group) and (self.n, self.flip) == (other.n, other.flip)

    def __hash__(self) -> int:
        return hash((self.n, self.flip))

    @cached_property
    def elements(self) -> list[Element]:
        """All elements, in the order of the group axis of a regular field."""
        return [Element(k, f) for f in range(2 if self.flip else 1) for k in range(self.n)]

    @property
    def identity(self) -> Element:
        return Element(0, 0)

    def element(self, k: int, f: int = 0) -> Element:
        """Build a (validated) element; ``k`` is taken modulo n."""
        if f not in (0, 1) or (f == 1 and not self.flip):
            raise ValueError(f"{self.name} has no element with mirror flag f={f!r} (expected "
                             f"{'0 or 1' if self.flip else '0'})")
        return Element(int(k) % self.n, int(f))

    def _check(self, g: Element) -> Element:
        if not isinstance(g, Element):
            raise ValueError(f"expected a kit.groups.Element of {self.name}, got {g!r}")
        if not (0 <= g.k < self.n) or g.f not in (0, 1) or (g.f and not self.flip):
            raise ValueError(f"{g!r} is not an element of {self.name} "
                             f"(expected 0 <= k < {self.n}, f {'in (0, 1)' if self.flip else '= 0'})")
        return g

    def index(self, g: Element) -> int:
        """Position of ``g`` on the group axis."""
        g = self._check(g)
        return g.f * self.n + g.k

    def compose(self, a: Element, b: Element) -> Element:
        """The product ``a b`` (apply ``b`` first)."""
        a, b = self._check(a), self._check(b)
        return Element((a.k + (-1) ** a.f * b.k) % self.n, a.f ^ b.f)

    def inverse(self, g: Element) -> Element:
        g = self._check(g)
        return Element(g.k, 1) if g.f else Element((-g.k) % self.n, 0)

    def angle(self, g: Element) -> float:
        """Rotation angle of ``g`` in radians (counter-clockwise), in ``[0, 2 pi)``."""
        return 2 * math.pi * self._check(g).k / self.n

    def degrees(self, g: Element) -> float:
        return 360.0 * self._check(g).k / self.n

    def is_exact_on_grid(self, g: Element) -> bool:
        """True when ``g`` maps the square pixel grid onto itself (multiple of 90 degrees)."""
        return (4 * self._check(g).k) % self.n == 0

    def matrix(self, g: Element) -> torch.Tensor:
        """The 2x2 orthogonal matrix of ``g`` acting on ``(x, y)`` points (float64)."""
        g = self._check(g)
        R = rotation_matrix(self.angle(g))
        return R @ torch.diag(torch.tensor([-1.0, 1.0], dtype=torch.float64)) if g.f else R

    # ------------------------------------------------------------------- representations
    @cached_property
    def cayley(self) -> torch.Tensor:
        """``cayley[a, b] = index(a b)`` (long tensor, |G| x |G|)."""
        els = self.elements
        return torch.tensor([[self.index(self.compose(a, b)) for b in els] for a in els])

    @cached_property
    def regular_perm(self) -> torch.Tensor:
        """``regular_perm[g, i] = index(g^-1 h_i)``: ``(rho(g) v)[i] = v[regular_perm[g, i]]``."""
        inv = [self.index(self.inverse(g)) for g in self.elements]
        return torch.stack([self.cayley[inv[gi]] for gi in range(self.order)])

    def regular_matrix(self, g: Element) -> torch.Tensor:
        """Permutation matrix of the regular representation, ``rho(g) e_h = e_{gh}``."""
        P = torch.zeros(self.order, self.order, dtype=torch.float64)
        P[torch.arange(self.order), self.regular_perm[self.index(g)]] = 1.0
        return P

    # -------------------------------------------------------------------------- action
    def act_on_image(self, x: torch.Tensor, g: Element, *, mode: str = "bilinear") -> torch.Tensor:
        """``g . x`` for images ``(..., H, W)``: exact for multiples of 90 degrees and mirrors."""
        g = self._check(g)
        return act_on_image(x, self.degrees(g), mirror=bool(g.f), mode=mode)


class Representation:
    """A real representation of a finite group: one ``d x d`` matrix per element (float64).

    ``matrices[i]`` is ``rho(G.elements[i])``. When every matrix is a permutation, ``perm[i]``
    holds the gather indices, ``(rho(g) v)[j] = v[perm[i, j]]``, and the action is exact.
    The homomorphism property is checked once at construction.
    """

    def __init__(self, group: Group, name: str, matrices: torch.Tensor):
        matrices = torch.as_tensor(matrices, dtype=torch.float64)
        if matrices.dim() != 3 or matrices.shape[0] != group.order or matrices.shape[1] != matrices.shape[2]:
            raise ValueError(f"representation {name!r} of {group.name}: expected matrices of shape "
                             f"({group.order}, d, d), got {tuple(matrices.shape)}")
        C = group.cayley
        err = (matrices[C.reshape(-1)] - torch.einsum("aij,bjk->abik", matrices, matrices)
               .reshape(-1, *matrices.shape[1:])).abs().max().item()
        if err > 1e-9:
            raise ValueError(f"representation {name!r} of {group.name} is not a homomorphism "
                             f"(max |rho(ab) - rho(a)rho(b)| = {err:.2e})")
        self.group, self.name, self.matrices = group, name, matrices
        is_perm = bool(((matrices == 0) | (matrices == 1)).all() and (matrices.sum(-1) == 1).all()
                       and (matrices.sum(-2) == 1).all())
        self.perm = matrices.argmax(-1) if is_perm else None

    @property
    def dim(self) -> int:
        return self.matrices.shape[-1]

    def __eq__(self, other) -> bool:
        return (isinstance(other, Representation) and self.group == other.group
                and self.name == other.name and torch.equal(self.matrices, other.matrices))

    def __hash__(self) -> int:
        return hash((self.group, self.name, self.dim))

    def __repr__(self) -> str:
        return f"{self.name}[{self.group.name}, d={self.dim}]"

    def __call__(self, g: Element) -> torch.Tensor:
        return self.matrices[self.group.index(g)]


def trivial_rep(group: Group) -> Representation:
    """The 1-dimensional trivial representation (scalar fields, images)."""
    return Representation(group, "trivial", torch.ones(group.order, 1, 1, dtype=torch.float64))


def regular_rep(group: Group) -> Representation:
    """The regular representation, ``rho(g) e_h = e_{gh}`` (dimension |G|)."""
    return Representation(group, "regular", torch.stack([group.regular_matrix(g) for g in group.elements]))


class CyclicGroup(Group):
    def __init__(self, n: int):
        super().__init__(n, flip=False)


class DihedralGroup(Group):
    def __init__(self, n: int):
        super().__init__(n, flip=True)


def cyclic(n: int) -> CyclicGroup:
    """C_n, the n rotations by multiples of ``360/n`` degrees."""
    return CyclicGroup(n)


def dihedral(n: int) -> DihedralGroup:
    """D_n, the n rotations and n reflections (order 2n)."""
    return DihedralGroup(n)


# ---------------------------------------------------------------------------- helpers
def rotation_matrix(theta: float) -> torch.Tensor:
    """Counter-clockwise rotation by ``theta`` radians acting on column vectors ``(x, y)``."""
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def _quarter_turns(degrees: float) -> int | None:
    q = degrees / 90.0
    return int(round(q)) % 4 if abs(q - round(q)) < 1e-9 else None


def rotate_image(x: torch.Tensor, degrees: float, *, mode: str = "bilinear") -> torch.Tensor:
    """Rotate images ``(..., H, W)`` counter-clockwise by ``degrees`` about the image centre.

    Multiples of 90 degrees use ``torch.rot90`` (exact); other angles resample with
    ``grid_sample`` (``mode`` 'bilinear', 'bicubic' or 'nearest'), zeros outside the image.
    """
    return act_on_image(x, degrees, mirror=False, mode=mode)


def plane_coords(H: int, W: int, *, spacing: float = 1.0, dtype=torch.float64,
                 device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, Y)``, each ``(H, W)``: the planar coordinates of the pixel centres, **x right, y up**,
    origin at the image centre, ``spacing`` apart (row 0 is the top row, so ``Y`` decreases down the
    rows). The one derivation of the pixel <-> plane convention: every rotation of images, kernels,
    stencils and analytic test functions in the kit builds on it."""
    xs = (torch.arange(W, dtype=dtype, device=device) - (W - 1) / 2) * spacing
    ys = ((H - 1) / 2 - torch.arange(H, dtype=dtype, device=device)) * spacing
    return xs.expand(H, W), ys[:, None].expand(H, W)


def kernel_offsets(size: int, *, dtype=torch.float64) -> torch.Tensor:
    """``(size*size, 2)`` planar offsets ``(x, y)`` of a ``size x size`` kernel's taps in row-major
    order (row 0 = top: ``y = size//2``; column 0 = left: ``x = -size//2``), from :func:`plane_coords`."""
    X, Y = plane_coords(size, size, dtype=dtype)
    return torch.stack([X.reshape(-1), Y.reshape(-1)], dim=-1)


def act_on_image(x: torch.Tensor, degrees: float, *, mirror: bool = False,
                 mode: str = "bilinear") -> torch.Tensor:
    """Mirror (``x -> -x``, if asked) then rotate by ``degrees`` counter-clockwise."""
    if x.dim() < 2:
        raise ValueError(f"expected an image tensor (..., H, W), got shape {tuple(x.shape)}")
    if mirror:
        x = torch.flip(x, dims=(-1,))
    q = _quarter_turns(degrees)
    if q is not None:
        return torch.rot90(x, q, dims=(-2, -1)) if q else x
    lead, (H, W) = x.shape[:-2], x.shape[-2:]
    flat = x.reshape(-1, 1, H, W)                                  # (N, 1, H, W)
    # Output pixel at point p samples the input at R^-1 p (points in pixel units, y up).
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    px, py = plane_coords(H, W)                                    # planar coordinates
    qx, qy = c * px + s * py, -s * px + c * py                      # R^-1 p
    col, row = qx + (W - 1) / 2, (H - 1) / 2 - qy
    grid = torch.stack([2 * col / (W - 1) - 1, 2 * row / (H - 1) - 1], dim=-1) if H > 1 and W > 1 \
        else torch.zeros(H, W, 2, dtype=torch.float64)
    grid = grid.to(dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)
    src = flat if flat.is_floating_point() else flat.float()
    out = F.grid_sample(src, grid.expand(src.shape[0], H, W, 2), mode=mode,
                        padding_mode="zeros", align_corners=True)
    return out.reshape(*lead, H, W).to(x.dtype)


def rotate_batch(x: torch.Tensor, degrees, *, mode: str = "bilinear") -> torch.Tensor:
    """Rotate image ``i`` of ``x (N, ..., H, W)`` by ``degrees[i]`` counter-clockwise (zeros outside):
    the convention and sampling grid of :func:`act_on_image` (pixel centres on the plane of
    :func:`plane_coords`, ``align_corners=True``), vectorised over the batch; exact quarter turns use
    ``torch.rot90`` (no interpolation). The one batched image action: the rebuilt MNIST-rot
    (:func:`kit.data.rotate_digits`) and the training augmentation (:func:`kit.run.train.augment`) use it.
    ``mode``: 'bilinear', 'bicubic' or 'nearest'. Floating inputs only; the dtype is kept."""
    if mode not in ("bilinear", "bicubic", "nearest"):
        raise ValueError(f"unknown interpolation mode {mode!r}; use 'bilinear', 'bicubic' or 'nearest'")
    if x.dim() < 3 or not x.is_floating_point():
        raise ValueError(f"expected floating images (N, ..., H, W), got {x.dtype} of shape {tuple(x.shape)}")
    N, H, W = x.shape[0], x.shape[-2], x.shape[-1]
    ang = torch.as_tensor(degrees, dtype=torch.float64).reshape(-1).cpu()
    if ang.numel() == 1 and N != 1:
        ang = ang.expand(N)
    if ang.numel() != N:
        raise ValueError(f"got {ang.numel()} angles for {N} images")
    flat = x.reshape(N, -1, H, W)                                   # (N, C, H, W)
    # Output pixel p samples the input at R^-1 p (planar coordinates: x right, y up, origin at the
    # image centre), written in grid_sample's normalised coordinates (u right, v down, in [-1, 1]
    # across pixel centres): u' = c u - s (H-1)/(W-1) v,  v' = s (W-1)/(H-1) u + c v.
    ax, ay = (H - 1) / (W - 1) if W > 1 else 0.0, (W - 1) / (H - 1) if H > 1 else 0.0
    t = torch.deg2rad(ang)
    c, s, z = torch.cos(t), torch.sin(t), torch.zeros_like(t)
    theta = torch.stack([torch.stack([c, -s * ax, z], -1), torch.stack([s * ay, c, z], -1)], 1)
    grid = F.affine_grid(theta, [N, 1, H, W], align_corners=True).to(device=x.device, dtype=x.dtype)
    out = F.grid_sample(flat, grid, mode=mode, padding_mode="zeros", align_corners=True)
    # Exact quarter turns: no interpolation at all, identical to act_on_image.
    q = ang / 90.0
    exact = (q - q.round()).abs() < 1e-9                          # same rule as _quarter_turns
    turns = q.round().remainder(4).long()
    for k in ((0, 1, 2, 3) if H == W else (0, 2)):                  # odd turns of a non-square image
        sel = (exact & (turns == k)).to(x.device)                     # do not keep its shape: sampled
        if sel.any():
            out[sel] = torch.rot90(flat[sel], k, dims=(-2, -1)) if k else flat[sel]
    return out.reshape(x.shape)


def disk_mask(H: int, W: int, *, radius: float | None = None, device=None) -> torch.Tensor:
    """Boolean ``(H, W)`` mask of the centred disk (default radius ``min(H, W)/2``).

    The mask is invariant under every rotation by 90 degrees and every mirror of the grid.
    """
    r = min(H, W) / 2 if radius is None else radius
    X, Y = plane_coords(H, W, device=device)
    return (X ** 2 + Y ** 2) <= r * r
