"""Representations beyond the regular one, and how derivatives transform: the algebra the PDO
families are built on (Shen et al., ICML 2020; He et al., ICLR 2023). Core: depends on
:mod:`kit.groups` only; used by the kernel machinery (:mod:`kit.kernels`) and the layers.

* The monomial basis of derivatives ``d^i_x d^j_y`` (:func:`components`, :func:`component_index`,
  :func:`component_name`): one component order for the whole kit.
* :func:`substitution_matrix`: how a polynomial in ``D = (dx, dy)`` changes under ``D -> A^T D``
  (the exact expansion behind every rotated PDO).
* Representations: :func:`quotient_rep` (C_n acting on the cosets of C_h), :func:`derivative_rep`
  (how the order-k derivatives ``(dx^k, dx^(k-1) dy, ..., dy^k)`` of a rotated function transform),
  :func:`pdo_rep` (orders 0..4, 15-dim), :func:`coefficient_rep` (its contragredient: how PDO
  coefficients transform), :func:`direct_sum`, :func:`tensor_rep`, :func:`contragredient` and
  :func:`field_rep` (``"regular"`` or the Neural-ePDO paper's ``"quotient"`` type, regular +
  quotient_4); :func:`rep_key`, a content key for caches.

Conventions as in :mod:`kit.groups`: ``(g.f)(x) = rho(g) f(A_g^-1 x)``, x right, y up. For
``f' = f o A^-1`` the chain rule gives ``grad f'(x) = A grad f(A^-1 x)`` (A orthogonal), so the
vector ``U_k`` of order-k derivatives transforms as ``U_k'(x) = D_k(g) U_k(A^-1 x)`` with ``D_k(g)``
the k-th symmetric power of ``A_g`` in the monomial basis: ``D(g) = T(A_g^T)`` with ``T`` the
:func:`substitution_matrix`.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from .groups import Group, Representation, regular_rep

__all__ = ["MAX_ORDER", "components", "component_index", "component_name", "substitution_matrix",
           "quotient_rep", "derivative_rep", "pdo_rep", "coefficient_rep", "direct_sum", "tensor_rep",
           "contragredient", "field_rep", "rep_key"]

MAX_ORDER = 4                 # PDOs of order <= 4 (15 monomials), the kit's highest order


# ------------------------------------------------------------------------- the monomial basis
def components(max_order: int) -> list[tuple[int, int]]:
    """``[(i, j), ...]`` for all ``d^i_x d^j_y`` with ``i + j <= max_order``, in the kit's order."""
    _check_order(max_order, "max_order")
    return [(k - j, j) for k in range(max_order + 1) for j in range(k + 1)]


def component_index(i: int, j: int) -> int:
    """Position of ``d^i_x d^j_y`` in :func:`components`: ``(i+j)(i+j+1)/2 + j``."""
    if i < 0 or j < 0:
        raise ValueError(f"derivative orders must be >= 0, got (i, j) = ({i}, {j})")
    k = i + j
    return k * (k + 1) // 2 + j


def component_name(i: int, j: int) -> str:
    """``'1'``, ``'dx'``, ``'dxxy'``, ... (for tables and plots)."""
    return "1" if i + j == 0 else "d" + "x" * i + "y" * j


def _check_order(order, what):
    if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order <= MAX_ORDER:
        raise ValueError(f"{what} must be an int in 0..{MAX_ORDER}, got {order!r}")



# ------------------------------------------------------------------------- rotated PDOs
def substitution_matrix(A, max_order: int = 4) -> torch.Tensor:
    """``T (n, n)`` float64 with ``coeffs(P(A^T D)) = coeffs(P(D)) @ T`` in the
    :func:`components` basis (``n = (max_order+1)(max_order+2)/2``).

    Row ``p`` holds the expansion of the monomial ``dx^i dy^j`` under ``dx -> A00 dx + A10 dy``,
    ``dy -> A01 dx + A11 dy``. Block-diagonal by total order.
    """
    A = np.asarray(torch.as_tensor(A, dtype=torch.float64))
    if A.shape != (2, 2):
        raise ValueError(f"expected a 2x2 matrix, got shape {A.shape}")
    comps = components(max_order)
    T = np.zeros((len(comps), len(comps)))
    # a homogeneous polynomial of degree k in (dx, dy) = array of length k+1 indexed by the dy power
    sx, sy = np.array([A[0, 0], A[1, 0]]), np.array([A[0, 1], A[1, 1]])
    for p, (i, j) in enumerate(comps):
        poly = np.ones(1)
        for _ in range(i):
            poly = np.convolve(poly, sx)
        for _ in range(j):
            poly = np.convolve(poly, sy)
        k = i + j
        for m, v in enumerate(poly):                  # m = power of dy, k - m = power of dx
            T[p, component_index(k - m, m)] = v
    return torch.from_numpy(T)


# ------------------------------------------------------------------------- representations
class _ProductRepresentation(Representation):
    """A representation assembled from checked factors (tensor products / direct sums / duals).

    The homomorphism property follows from the factors', so the O(|G|^2 d^3) re-check of
    :class:`kit.groups.Representation` is skipped (it would take minutes for ``d = 480``)."""

    def __init__(self, group: Group, name: str, matrices: torch.Tensor, key: str):
        self.group, self.name, self.matrices = group, name, matrices
        self.perm = _perm_of(matrices)
        self._key = key


def _perm_of(M: torch.Tensor):
    ok = bool(((M == 0) | (M == 1)).all() and (M.sum(-1) == 1).all() and (M.sum(-2) == 1).all())
    return M.argmax(-1) if ok else None


def rep_key(rep: Representation) -> str:
    """A content key for caching: group, name, dimension and a digest of the matrices."""
    key = getattr(rep, "_key", None)
    if key is None:
        digest = hashlib.sha1(rep.matrices.contiguous().numpy().tobytes()).hexdigest()[:16]
        key = f"{rep.group.name}:{rep.name}:{rep.dim}:{digest}"
        rep._key = key
    return key


def _check_group(group):
    if not isinstance(group, Group):
        raise ValueError(f"expected a kit.groups.Group (cyclic(n) / dihedral(n)), got {group!r}")


def quotient_rep(group: Group, subgroup: int) -> Representation:
    """The permutation representation of C_n on the cosets of its subgroup C_h (``h = subgroup``),
    dimension ``n / h``: the generator (rotation by 360/n degrees) shifts the cosets by one, the
    rotations of C_h act trivially. ``quotient_rep(cyclic(16), 4)`` is the public code's ``quo_4``
    (dimension 4; 90 degrees acts trivially)."""
    _check_group(group)
    if group.flip:
        raise ValueError(f"quotient_rep is defined for cyclic groups only, got {group.name}")
    if isinstance(subgroup, bool) or not isinstance(subgroup, int) or subgroup < 1 or group.n % subgroup:
        raise ValueError(f"the subgroup order must be an int dividing n = {group.n}, got {subgroup!r}")
    q = group.n // subgroup
    M = torch.zeros(group.order, q, q, dtype=torch.float64)
    for g in group.elements:                         # rho(k) e_j = e_(j + k mod q)
        M[group.index(g), (torch.arange(q) + g.k) % q, torch.arange(q)] = 1.0
    return Representation(group, f"quotient{subgroup}", M)


def direct_sum(*reps: Representation, name: str | None = None) -> Representation:
    """``rho_1 (+) rho_2 (+) ...``: block-diagonal matrices, field axis concatenated in order."""
    if not reps:
        raise ValueError("direct_sum needs at least one representation")
    G = reps[0].group
    if any(r.group != G for r in reps):
        raise ValueError(f"direct_sum: all representations must belong to one group, got "
                         f"{[r.group.name for r in reps]}")
    M = torch.stack([torch.block_diag(*[r.matrices[i] for r in reps]) for i in range(G.order)])
    return Representation(G, name or "+".join(r.name for r in reps), M)


def tensor_rep(a: Representation, b: Representation, *, name: str | None = None) -> Representation:
    """``a (x) b``: ``kron(a(g), b(g))``; index ``(i, j) -> i * dim(b) + j``."""
    if a.group != b.group:
        raise ValueError(f"tensor_rep: {a!r} and {b!r} belong to different groups")
    M = torch.stack([torch.kron(a.matrices[i], b.matrices[i]) for i in range(a.group.order)])
    nm = name or f"({a.name})x({b.name})"
    return _ProductRepresentation(a.group, nm, M, f"tensor[{rep_key(a)}|{rep_key(b)}]")


def contragredient(rep: Representation) -> Representation:
    """The dual ``rho*(g) = rho(g^-1)^T`` (equal to ``rho`` for orthogonal, e.g. permutation, reps)."""
    G = rep.group
    inv = torch.tensor([G.index(G.inverse(g)) for g in G.elements])
    return _ProductRepresentation(G, f"({rep.name})*", rep.matrices[inv].transpose(-1, -2).contiguous(),
                                  f"dual[{rep_key(rep)}]")


_REP_CACHE: dict = {}


def _cached_rep(key, build):
    if key not in _REP_CACHE:
        _REP_CACHE[key] = build()
    return _REP_CACHE[key]


def pdo_rep(group: Group, max_order: int = MAX_ORDER) -> Representation:
    """How the derivatives ``U = (d^a f)``, ``|a| <= max_order`` (kit component order, 15-dim for
    order 4) of a rotated scalar function transform: ``U_{g.f}(x) = D(g) U_f(A_g^-1 x)``.
    Block-diagonal by order; ``D(g) = T(A_g^T)`` with :func:`substitution_matrix`."""
    _check_group(group)

    def build():
        M = torch.stack([substitution_matrix(group.matrix(g).T, max_order) for g in group.elements])
        M = torch.where(M.abs() < 1e-14, torch.zeros_like(M), M)        # exact zeros on 90-degree elements
        return Representation(group, f"derivatives<={max_order}", M)
    return _cached_rep(("pdo", group, max_order), build)


def derivative_rep(group: Group, order: int) -> Representation:
    """The order-k block of :func:`pdo_rep`: ``(dx^k, dx^(k-1) dy, ..., dy^k)``, dimension k+1."""
    if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order <= MAX_ORDER:
        raise ValueError(f"derivative order must be an int in 0..{MAX_ORDER}, got {order!r}")

    def build():
        full = pdo_rep(group, MAX_ORDER).matrices
        s = component_index(order, 0)
        return Representation(group, f"derivatives{order}", full[:, s:s + order + 1, s:s + order + 1].clone())
    return _cached_rep(("der", group, order), build)


def coefficient_rep(group: Group, max_order: int = MAX_ORDER) -> Representation:
    """How PDO coefficients transform: ``D^-T``, the contragredient of :func:`pdo_rep`. Coefficients
    ``c' = D(g)^-T c`` applied to the transformed derivatives ``U' = D(g) U`` give the same value,
    ``c' . U' = c . U``: the operator moves with the field."""
    return _cached_rep(("coef", group, max_order), lambda: contragredient(pdo_rep(group, max_order)))


def field_rep(group: Group, kind: str = "regular") -> Representation:
    """The field types of the paper: ``"regular"`` (C_n or D_n) or ``"quotient"`` = regular (+)
    quotient_4 of C_n (16 + 4 = 20 dimensions for C16; the public code's Q model)."""
    _check_group(group)
    if kind == "regular":
        return _cached_rep(("regular", group), lambda: regular_rep(group))
    if kind == "quotient":
        if group.flip or group.n % 4:
            raise ValueError(f"the quotient field type needs C_n with 4 | n, got {group.name}")
        return _cached_rep(("quotient", group), lambda: direct_sum(regular_rep(group), quotient_rep(group, 4),
                                                                   name="regular+quotient4"))
    raise ValueError(f"unknown field kind {kind!r}; expected 'regular' or 'quotient'")

