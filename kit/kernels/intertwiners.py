"""The intertwiner solver: a float64 basis of ``Hom_G(rho_in, rho_out) = {W : rho_out(g) W = W rho_in(g)}``
for finite rotation groups, orthonormal in the Frobenius inner product, and its cache. Used by the
Neural-ePDO / PDO-eConv layers (He et al., ICLR 2023) for every equivariant 1x1 map, PDO basis and
coefficient generator.

When one side is a permutation representation (regular, quotient, trivial: every case of the paper)
the null space is obtained orbit by orbit (Frobenius reciprocity: ``W e_(g.i0) = rho_out(g) w`` with
``w`` fixed by the stabiliser of ``i0``), which needs only tiny ``d_out``-sized null spaces; otherwise
the stacked constraint of the generators is solved densely (SVD, explicit tolerance). The public code
solves a 10240 x 5120 SVD at float32 tolerance for D16 (minutes; and the rank is wrong in float64);
here every basis of the D16 model takes < 1 s.

Bases are cached per (group, input rep, output rep) in process and, opt-in
(``KIT_EPDO_DISK_CACHE=1`` or ``disk=True``), on disk under ``.kit_cache/epdo`` (written atomically).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .._io import atomic_write
from ..groups import Group, Representation
from ..reps import contragredient, rep_key

__all__ = ["intertwiner_basis", "hom_dimension", "solve_dense", "cache_dir", "clear_cache", "TOL", "DISK_CACHE"]

TOL = 1e-8                    # relative singular-value threshold of the null spaces (float64)
_VERSION = "epdo-v1"          # bump to invalidate the on-disk cache


def _generators(G: Group) -> list[int]:
    gens = [G.index(G.element(1))]
    if G.flip:
        gens.append(G.index(G.element(0, 1)))
    return gens


def _null_space(A: torch.Tensor, tol: float = TOL) -> torch.Tensor:
    """Orthonormal basis (columns) of the null space of ``A`` (float64), relative tolerance ``tol``."""
    n = A.shape[1]
    if A.shape[0] == 0:
        return torch.eye(n, dtype=torch.float64)
    _, s, Vh = torch.linalg.svd(A, full_matrices=True)
    smax = s.max().item() if s.numel() else 0.0
    rank = int((s > tol * max(smax, 1.0)).sum())
    return Vh[rank:].T.contiguous()


def _orbit_solve(perm_in: torch.Tensor, M_out: torch.Tensor, tol: float) -> torch.Tensor:
    """``Hom(rho_in, rho_out)`` for a permutation ``rho_in`` given by gather indices
    ``perm_in (|G|, d_in)``: orbit by orbit, ``W e_(g.i0) = rho_out(g) w``, ``w`` fixed by Stab(i0)."""
    nG, d_in = perm_in.shape
    d_out = M_out.shape[-1]
    act = torch.empty_like(perm_in)                  # rho_in(g) e_i = e_(act[g, i])
    act.scatter_(1, perm_in, torch.arange(d_in).expand(nG, d_in).contiguous())
    seen = torch.zeros(d_in, dtype=torch.bool)
    blocks = []
    eye = torch.eye(d_out, dtype=torch.float64)
    for i0 in range(d_in):
        if seen[i0]:
            continue
        targets = act[:, i0]                                           # (|G|,) where g sends i0
        orbit = torch.unique(targets)
        seen[orbit] = True
        first = torch.tensor([int((targets == i).nonzero()[0]) for i in orbit])   # g_i with g_i . i0 = i
        stab = (targets == i0).nonzero().flatten()
        if len(stab) == 1:                                              # free orbit: all of rho_out
            cols = M_out[first]                                         # (|orbit|, d_out, d_out)
        else:
            Fx = _null_space((M_out[stab] - eye).reshape(-1, d_out), tol)        # (d_out, nF)
            if Fx.shape[1] == 0:
                continue
            cols = M_out[first] @ Fx                                    # (|orbit|, d_out, nF)
        B = torch.zeros(cols.shape[2], d_out, d_in, dtype=torch.float64)
        B[:, :, orbit] = cols.permute(2, 1, 0)
        blocks.append(B)
    if not blocks:
        return torch.zeros(0, d_out, d_in, dtype=torch.float64)
    return torch.cat(blocks)


def solve_dense(rho_in: Representation, rho_out: Representation, tol: float = TOL) -> torch.Tensor:
    """The plain solver: null space of the stacked constraint ``W rho_in(g) - rho_out(g) W = 0``
    over the generators (SVD, float64). ``(n, d_out, d_in)``, Frobenius-orthonormal. Memory and time
    grow like ``(d_in d_out)^2`` / ``^3``: for small representations (tests, cross-checks)."""
    G = rho_in.group
    di, do = rho_in.dim, rho_out.dim
    Ii, Io = torch.eye(di, dtype=torch.float64), torch.eye(do, dtype=torch.float64)
    # row-major vec(W): vec(W A) = kron(I, A^T) vec(W), vec(A W) = kron(A, I) vec(W)
    A = torch.cat([torch.kron(Io, rho_in.matrices[g].T.contiguous()) - torch.kron(rho_out.matrices[g], Ii)
                   for g in _generators(G)])
    N = _null_space(A, tol)                                             # (do*di, n)
    return N.T.reshape(-1, do, di).contiguous()


def _gram_recombination(gram: torch.Tensor) -> torch.Tensor:
    """``T (n, n)`` with ``T B`` orthonormal for a basis ``B`` of Gram matrix ``gram = B B^T``:
    ``T = R^-T`` with ``R`` the Cholesky factor (the ``R`` of a QR of ``B^T``)."""
    L = torch.linalg.cholesky(gram)                                     # gram = L L^T, R = L^T
    return torch.linalg.solve_triangular(L, torch.eye(L.shape[0], dtype=L.dtype), upper=False)


def _orthonormalise(B: torch.Tensor) -> torch.Tensor:
    if B.shape[0] == 0:
        return B
    flat = B.reshape(B.shape[0], -1)
    return (_gram_recombination(flat @ flat.T) @ flat).reshape(B.shape).contiguous()


def _solve(rho_in: Representation, rho_out: Representation, tol: float, orthonormal: bool = True) -> torch.Tensor:
    if rho_in.perm is not None:
        B = _orbit_solve(rho_in.perm, rho_out.matrices, tol)
    elif rho_out.perm is not None:                  # W^T in Hom(rho_out*, rho_in*), rho_out* = rho_out
        B = _orbit_solve(rho_out.perm, contragredient(rho_in).matrices, tol).transpose(1, 2)
    else:
        return solve_dense(rho_in, rho_out, tol)
    return _orthonormalise(B) if orthonormal else B.contiguous()


_MEM: dict = {}
_LAYER_BASES: dict = {}         # bases derived from solved ones (the layers' kernel bases), in process
#: opt-in (env ``KIT_EPDO_DISK_CACHE=1``): every basis of the paper's models solves in < 2 s cold, and
#: the D16 generator basis alone is 59 MB on disk, so the in-process cache is the default.
DISK_CACHE = os.environ.get("KIT_EPDO_DISK_CACHE", "0").lower() in ("1", "on", "true", "yes")


def cache_dir() -> Path:
    """``$KIT_CACHE_DIR/epdo`` if set, else ``<repo>/.kit_cache/epdo`` (ignored by git)."""
    root = os.environ.get("KIT_CACHE_DIR")
    base = Path(root) if root else Path(__file__).resolve().parents[2] / ".kit_cache"
    return base / "epdo"


def clear_cache(*, disk: bool = False) -> None:
    """Empty the in-process caches (and the on-disk one when ``disk``)."""
    _MEM.clear()
    _LAYER_BASES.clear()
    if disk and cache_dir().is_dir():
        for p in cache_dir().glob("*.pt"):
            p.unlink(missing_ok=True)


_LAYER_BASES: dict = {}


def _layer_basis(key, build):
    if key not in _LAYER_BASES:
        _LAYER_BASES[key] = build()
    return _LAYER_BASES[key]


def _disk_load(path: Path, shape_tail):
    try:
        B = torch.load(path, weights_only=True)
        if isinstance(B, torch.Tensor) and B.dtype == torch.float64 \
                and tuple(B.shape[1:]) == tuple(shape_tail):
            return B
    except Exception:                                # corrupt / foreign file: recompute
        pass
    return None


def _disk_save(path: Path, B: torch.Tensor) -> None:
    try:
        atomic_write(path, lambda fh: torch.save(B, fh))   # readers see the old file or the new one
    except OSError:                                        # read-only checkout: the cache is optional
        pass


def _cached(key: str, build, shape_tail, disk: bool | None):
    """In-process cache, then the on-disk one (atomic writes), then ``build()``."""
    B = _MEM.get(key)
    if B is not None:
        return B
    use_disk = DISK_CACHE if disk is None else disk
    path = cache_dir() / (hashlib.sha1(key.encode()).hexdigest() + ".pt")
    if use_disk and path.is_file():
        B = _disk_load(path, shape_tail)
    if B is None:
        B = build()
        if use_disk:
            _disk_save(path, B)
    _MEM[key] = B
    return B


def intertwiner_basis(rho_in: Representation, rho_out: Representation, *, disk: bool | None = None,
                      tol: float = TOL, orthonormal: bool = True) -> torch.Tensor:
    """Float64 basis ``(n, d_out, d_in)`` of ``{W : rho_out(g) W = W rho_in(g) for all g}``,
    orthonormal in the Frobenius inner product (unless ``orthonormal=False``: then the raw orbit
    basis). Cached per (group, rho_in, rho_out): in process, and on disk (``disk=None``: the module
    setting :data:`DISK_CACHE`, env ``KIT_EPDO_DISK_CACHE``; directory :func:`cache_dir`).
    Returns a tensor shared with the cache: do not modify it in place."""
    for r in (rho_in, rho_out):
        if not isinstance(r, Representation):
            raise ValueError(f"expected kit.groups.Representation objects, got {r!r}")
    if rho_in.group != rho_out.group:
        raise ValueError(f"{rho_in!r} and {rho_out!r} belong to different groups")
    key = f"{_VERSION}|hom|{tol:g}|{int(orthonormal)}|{rep_key(rho_in)}|{rep_key(rho_out)}"
    return _cached(key, lambda: _solve(rho_in, rho_out, tol, orthonormal), (rho_out.dim, rho_in.dim), disk)


def hom_dimension(rho_in: Representation, rho_out: Representation) -> int:
    """``dim Hom_G(rho_in, rho_out)`` from the characters, ``(1/|G|) sum_g chi_in(g^-1) chi_out(g)``
    (an independent check of the solver)."""
    G = rho_in.group
    inv = [G.index(G.inverse(g)) for g in G.elements]
    chi_in = torch.diagonal(rho_in.matrices, dim1=-2, dim2=-1).sum(-1)[inv]
    chi_out = torch.diagonal(rho_out.matrices, dim1=-2, dim2=-1).sum(-1)
    return int(round(float((chi_in * chi_out).sum()) / G.order))

