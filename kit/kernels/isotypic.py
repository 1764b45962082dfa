"""Equivariant 1x1 maps in the isotypic basis: Schur's lemma turns the dense ``(C_out d_out) x (C_in d_in)``
matrix of an equivariant pointwise map into a few small blocks, one per irreducible type.

What this is (and is not)
-------------------------
An equivariant 1x1 map ``W = sum_n w[o, c, n] B_n`` (``B_n`` the intertwiner basis, :mod:`.intertwiners`)
commutes with the group. In a basis adapted to the representations (orthogonal ``Q_in``, ``Q_out`` whose
rows span irreducible subspaces), ``Q_out B_n Q_in^T`` vanishes between inequivalent irreducibles (Schur),
so the map is block diagonal over the irreducible *types* shared by ``rho_in`` and ``rho_out``. For C16
regular fields (the Neural ePDO models) the 16 x 16 circulant of each field pair becomes eight 2 x 2
blocks (the real Fourier basis: 32 instead of 256 multiply-accumulates), for D16 regular fields eight 4 x 4
blocks (128 instead of 1024). The kit packs the types into equal *slots* so that one batched matmul
applies every block::

    x_hat = Q_in  x                      # (S, C_in  Cc, B HW)   per field, then slot-major
    y_hat = W_hat x_hat                  # (S, C_out R,  B HW)   one bmm: S blocks
    y     = Q_out^T y_hat                # (B, C_out, d_out, H, W)

The same operator in exact arithmetic (tested against the dense map to 1e-12 in float64, values and
gradients); in float32 it differs by round-off. It is a CPU speed path for the wide 1x1 maps of the
Neural ePDOs (He et al., ICLR 2023), not a new layer: :class:`kit.layers.epdo.EquivariantConv1x1` takes
it when :func:`worth_it` says so, and :func:`kit.kernels.reference_kernels` switches it off. It is not
a Fourier transform of the *spatial* kernel (the 3x3 group convolutions rotate their kernels in space,
so their blocks do not separate this way).

How the basis is found (any finite rotation group, any real representation): the eigenvectors of a
random symmetric element of the commutant ``Hom(rho, rho)`` span irreducible subspaces (a generic
self-adjoint intertwiner separates every copy); their characters name the types. The plan is checked
at construction: ``Q_out^T W_hat Q_in`` must rebuild every basis element to 1e-10, else no plan is made
(and the dense map is used).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .. import _compat
from ..groups import Representation
from ..reps import rep_key
from .intertwiners import intertwiner_basis

__all__ = ["IsotypicPlan", "isotypic_plan", "irreducible_subspaces", "isotypic_conv1x1", "worth_it",
           "MIN_CHANNELS", "MAX_MAC_RATIO"]

#: the isotypic path pays for its two basis changes and layout copies (memory-bound) only when the dense
#: map is wide: measured on the Neural-ePDO MNIST shapes (1 thread, batch 64, fwd + bwd), 256 input
#: channels at 28x28 ran 0.6-0.7x the dense matmul, 384-512 channels at 14x14 1.35-1.75x
MIN_CHANNELS = 384
#: ... and only when the blocks hold at most this share of the dense map's multiply-accumulates
MAX_MAC_RATIO = 0.5


def irreducible_subspaces(rep: Representation, *, seed: int = 0) -> list[tuple[tuple, torch.Tensor]]:
    """``[(character, Q_s (d_s, d))]`` float64: orthonormal rows spanning the irreducible invariant
    subspaces of ``rep``, each with its character over the group elements (rounded: equal characters
    are equivalent irreducibles). Found as the eigenspaces of a random symmetric intertwiner."""
    C = intertwiner_basis(rep, rep)                                              # (n, d, d) commutant
    gen = torch.Generator().manual_seed(seed)
    A = torch.einsum("n,nij->ij", torch.randn(C.shape[0], generator=gen, dtype=torch.float64), C)
    ev, V = torch.linalg.eigh(A + A.T)                                           # ascending eigenvalues
    scale = max(1.0, float(ev.abs().max()))
    cuts = [0] + [i for i in range(1, len(ev)) if ev[i] - ev[i - 1] > 1e-7 * scale] + [len(ev)]
    M = rep.matrices.to(torch.float64)                                           # (|G|, d, d)
    out = []
    for a, b in zip(cuts, cuts[1:]):
        Qs = V[:, a:b].T.contiguous()                                            # (d_s, d)
        chi = torch.einsum("ie,gef,if->g", Qs, M, Qs)
        out.append((tuple(round(float(v), 6) + 0.0 for v in chi), Qs))
    return out


@dataclass(frozen=True)
class IsotypicPlan:
    """Block structure of ``Hom(rho_in, rho_out)`` in the isotypic bases.

    ``q_in (S, Cc, d_in)`` and ``q_out (S, R, d_out)``: per slot, the orthonormal rows of the irreducible
    types packed into it (zero rows pad a slot); ``mask (S, R, Cc)``: where a slot's rows and columns are of
    one type (Schur's blocks; elsewhere every equivariant map is zero). Float64."""
    q_in: torch.Tensor
    q_out: torch.Tensor
    mask: torch.Tensor

    @property
    def slots(self) -> tuple[int, int, int]:
        """``(S, R, Cc)``: slots, rows and columns per slot (per field pair)."""
        return tuple(self.mask.shape)

    def blocks(self, basis: torch.Tensor) -> torch.Tensor:
        """Equivariant maps ``basis (n, d_out, d_in)`` in the isotypic bases: ``(n, S, R, Cc)``, so that
        ``basis[n] = sum_s q_out[s]^T blocks[n, s] q_in[s]`` (in ``basis``'s dtype)."""
        q_out, q_in = self.q_out.to(basis.dtype), self.q_in.to(basis.dtype)
        return torch.einsum("sre,ned,sid->nsri", q_out, basis, q_in) * self.mask

    def mac_ratio(self, c_in: int, c_out: int) -> float:
        """Multiply-accumulates per pixel of the isotypic path (blocks and both basis changes) over the dense
        map's, for ``c_in -> c_out`` fields."""
        S, R, Cc = self.slots
        d_out, d_in = self.q_out.shape[-1], self.q_in.shape[-1]
        iso = S * R * Cc * c_out * c_in + S * Cc * d_in * c_in + S * R * d_out * c_out
        return iso / (d_out * d_in * c_out * c_in)


def _pack(types: list[tuple[torch.Tensor, torch.Tensor]]):
    """Greedy first-fit (largest first) of types ``(rows_out, rows_in)`` into slots of the largest type's size."""
    R = max(o.shape[0] for o, _ in types)
    Cc = max(i.shape[0] for _, i in types)
    slots: list[list] = []
    for o, i in sorted(types, key=lambda t: -t[0].shape[0] * t[1].shape[0]):
        for s in slots:
            if sum(a.shape[0] for a, _ in s) + o.shape[0] <= R and sum(b.shape[0] for _, b in s) + i.shape[0] <= Cc:
                s.append((o, i))
                break
        else:
            slots.append([(o, i)])
    return slots, R, Cc


@functools.lru_cache(maxsize=None)
def _plan(key_in: str, key_out: str, rho_in: Representation, rho_out: Representation):
    B = intertwiner_basis(rho_in, rho_out)                                       # (n, d_out, d_in)
    if B.shape[0] == 0:
        return None
    by_type: dict[tuple, list[list]] = {}
    for chi, Qs in irreducible_subspaces(rho_out):
        by_type.setdefault(chi, [[], []])[0].append(Qs)
    for chi, Qs in irreducible_subspaces(rho_in):
        by_type.setdefault(chi, [[], []])[1].append(Qs)
    shared = [(torch.cat(o), torch.cat(i)) for o, i in by_type.values() if o and i]
    if not shared:
        return None
    slots, R, Cc = _pack(shared)
    S = len(slots)
    q_out = torch.zeros(S, R, rho_out.dim, dtype=torch.float64)
    q_in = torch.zeros(S, Cc, rho_in.dim, dtype=torch.float64)
    mask = torch.zeros(S, R, Cc, dtype=torch.bool)                               # same type: Schur's blocks
    for s, slot in enumerate(slots):
        r = c = 0
        for o, i in slot:
            q_out[s, r:r + o.shape[0]], q_in[s, c:c + i.shape[0]] = o, i
            mask[s, r:r + o.shape[0], c:c + i.shape[0]] = True
            r, c = r + o.shape[0], c + i.shape[0]
    plan = IsotypicPlan(q_in.contiguous(), q_out.contiguous(), mask)
    rebuilt = torch.einsum("sre,nsri,sid->ned", q_out, plan.blocks(B), q_in)
    if float((rebuilt - B).abs().max()) > 1e-10:                                 # never a wrong operator
        return None
    return plan


def isotypic_plan(rho_in: Representation, rho_out: Representation) -> IsotypicPlan | None:
    """The cached :class:`IsotypicPlan` of ``Hom(rho_in, rho_out)`` (same basis order as
    :func:`kit.kernels.intertwiners.intertwiner_basis`), or ``None`` where there is no non-zero map or the
    decomposition could not be verified."""
    return _plan(rep_key(rho_in), rep_key(rho_out), rho_in, rho_out)


def worth_it(plan: IsotypicPlan | None, c_in: int, c_out: int, x: torch.Tensor) -> bool:
    """Whether :class:`kit.layers.epdo.EquivariantConv1x1` takes the isotypic path for input ``x``: a CPU
    tensor, a verified plan, at least :data:`MIN_CHANNELS` input channels and at most
    :data:`MAX_MAC_RATIO` of the dense map's multiply-accumulates."""
    return (plan is not None and x.device.type == "cpu" and c_in * plan.q_in.shape[-1] >= MIN_CHANNELS
            and plan.mac_ratio(c_in, c_out) <= MAX_MAC_RATIO)


def isotypic_weight(weight: torch.Tensor, basis: torch.Tensor, plan: IsotypicPlan) -> torch.Tensor:
    """The blocks ``(S, C_out R, C_in Cc)`` of the map ``sum_n weight[o, c, n] basis[n]`` (``weight
    (C_out, C_in, n)``, ``basis (n, d_out, d_in)`` equivariant)."""
    S, R, Cc = plan.slots
    O, C, _ = weight.shape
    Wh = torch.einsum("ocn,nsri->sorci", weight, plan.blocks(basis.to(weight.dtype)))   # (S, O, R, C, Cc)
    return Wh.reshape(S, O * R, C * Cc)


@functools.lru_cache(maxsize=1)
def fused_isotypic_extension():
    """The compiled basis changes (``csrc/isotypic.cpp``: each with its layout change, one pass), or ``None``."""
    from .aggregate import build_extension
    return build_extension("eqkit_isotypic", "isotypic.cpp", fma=True)


class _SlotChange(torch.autograd.Function):
    """The fused basis changes (C++), each the other's adjoint and so its backward: ``into=True``
    ``x (B, C, d, K, P) -> t (S, C, K, Cc, B, P)``, ``t = Q x`` per field; ``into=False`` the way back, ``Q^T t``."""

    @staticmethod
    def forward(ctx, x, q, into: bool):
        ctx.save_for_backward(q)
        ctx.into = into
        ext = fused_isotypic_extension()
        return ext.to_slots(x, q) if into else ext.from_slots(x, q)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (q,) = ctx.saved_tensors
        ext = fused_isotypic_extension()
        return (ext.from_slots(g, q) if ctx.into else ext.to_slots(g, q)), None, None


def _fused(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not _compat.is_compiling()
            and not _compat.REFERENCE_KERNELS and fused_isotypic_extension() is not None)


def isotypic_conv1x1(x: torch.Tensor, weight_hat: torch.Tensor, plan: IsotypicPlan, *, groups: int = 1,
                     inner: int = 1, fused: bool | None = None) -> torch.Tensor:
    """``(B, C_in, d_in, H, W) -> (B, C_out, d_out, H, W)``: the 1x1 map with blocks ``weight_hat``
    (:func:`isotypic_weight`): basis change, one batched matmul over the slots, basis change back.

    ``groups``: a grouped map (whole fields; ``weight_hat (S groups, C_out/groups R, C_in/groups Cc)``, group
    ``k`` maps input fields ``[k C_in/groups, (k+1) C_in/groups)`` to the same range of outputs). ``inner``: every
    ``inner`` consecutive output fields are laid out inside the component axis, ``(B, C_out/inner, d_out, inner,
    H, W)`` (the Neural-ePDO generator's coefficients, :class:`kit.layers.epdo.NeuralEPDOConv`).

    The basis changes run as one C++ pass each with their layout change (``csrc/isotypic.cpp``) on the CPU
    (``fused=None``: when built, not under ``torch.compile``); ``fused=False`` is the plain-PyTorch
    formulation (a batched matmul and a permuted copy each; the reference in tests)."""
    B, C, d_in, H, W = x.shape
    S, R, Cc = plan.slots
    P = H * W
    O = weight_hat.shape[1] * groups // R
    if fused is None:
        fused = _fused(x)
    if fused:
        q_in, q_out = plan.q_in.to(x.dtype), plan.q_out.to(x.dtype)
        t = _SlotChange.apply(x.reshape(B, C, d_in, 1, P), q_in, True)           # (S, C, 1, Cc, B, P)
        y = torch.bmm(weight_hat, t.view(S * groups, (C // groups) * Cc, B * P))  # (S groups, O/groups R, B P)
        y = _SlotChange.apply(y.view(S, O // inner, inner, R, B, P), q_out, False)   # (B, O/inner, d_out, inner, P)
        return y.view(B, O, -1, H, W) if inner == 1 else y.view(B, O // inner, -1, inner, H, W)
    q_in = plan.q_in.to(x.dtype).reshape(S * Cc, d_in)
    q_out = plan.q_out.to(x.dtype).reshape(S * R, -1)
    t = torch.matmul(q_in, x.reshape(B * C, d_in, P))                           # (B C, S Cc, P)
    t = t.view(B, C, S, Cc, P).permute(2, 1, 3, 0, 4)                            # (S, C, Cc, B, P)
    t = t.reshape(S * groups, (C // groups) * Cc, B * P)                         # (S groups, C/groups Cc, B P)
    y = torch.bmm(weight_hat, t)                                                 # (S groups, O/groups R, B P)
    y = y.view(S, O // inner, inner, R, B, P).permute(4, 1, 0, 3, 2, 5)          # (B, O/inner, S, R, inner, P)
    y = torch.matmul(q_out.T, y.reshape(B * (O // inner), S * R, inner * P))     # (B O/inner, d_out, inner P)
    return y.view(B, O, -1, H, W) if inner == 1 else y.view(B, O // inner, -1, inner, H, W)
