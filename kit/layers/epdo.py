"""Neural ePDOs (He, Chen, Shen, Wang, Lin, ICLR 2023): spatially adaptive partial differential
operators whose coefficients an equivariant pointwise MLP generates from the local features.

What is here
------------
* The representations it needs live in :mod:`kit.reps` (quotient, derivative, PDO and
  coefficient representations, tensor products, duals, the field types); every equivariant map is
  solved by :func:`kit.kernels.intertwiners.intertwiner_basis` (float64, orthonormal, cached).
* :class:`EquivariantConv1x1` (pointwise equivariant channel mixing), :class:`LinearPDOConv` (the
  linear PDO-eConv of order 4 on 5x5 stencils, the lifting layer of the paper) and
  :class:`NeuralEPDOConv` (the Neural ePDO layer).

The math (kit conventions: ``(g.f)(x) = rho(g) f(A_g^-1 x)``, x right, y up)
------------------------------------------------------------------------------
For ``f' = f o A^-1`` the chain rule gives ``grad f'(x) = A grad f(A^-1 x)`` (A orthogonal), so the
vector ``U_k`` of order-k derivatives transforms as ``U_k' (x) = D_k(g) U_k(A^-1 x)`` with ``D_k(g)``
the k-th symmetric power of ``A_g`` in the monomial basis (:func:`kit.reps.derivative_rep`; computed with
:func:`kit.reps.substitution_matrix`, ``D(g) = T(A_g^T)``).

* Linear PDO-eConv: ``y(x) = W U(x)`` with ``U = (d^a f_i)`` of type ``D (x) rho_in`` is equivariant
  iff ``rho_out(g) W = W (D(g) (x) rho_in(g))``; one basis per order k, discretised with the 15
  stencils (kernel ``K[o, i] = sum_a W[o, (a, i)] S_a``), each basis kernel at unit Frobenius norm.
* Neural ePDO (depthwise, "diagonal" coefficients): ``y_c(x) = sum_a C[c, a](x) d^a f_c(x)`` for a
  permutation ``rho``. Writing the rotated derivatives out, ``y' = rho(g) y(A^-1 .)`` iff the
  generated coefficients transform as ``C' (x) = rho(g) C(A^-1 x) D(g)^-1``, i.e. the coefficient
  field has type ``rho (x) D^-T`` (:func:`kit.reps.coefficient_rep`). The generator is therefore an
  equivariant 1x1 map ``regular -> rho (x) D^-T``; the stencils are folded into its basis
  (``K = C S``, a ``d x 25`` stencil per generated field and pixel). On the pixel grid the 90-degree
  rotations and the mirrors map every stencil onto the stencil of the transformed operator
  exactly (tested in ``tests/test_stencils.py``), so the layer is exactly equivariant there, for
  fd, gauss and rbffd alike; other angles (22.5 degrees) are approximate.

The Neural ePDO layer (``x: (B, z, d, H, W)``, ``|G|`` group order):

1. ``m = (z d) // (reduction |G|)`` hidden regular fields; ``h = ReLU(norm(conv1x1(x)))``, ``norm`` =
   GroupNorm with one group per field (statistics over (|G|, H, W)), per-field affine, followed by
   the public code's *extra* per-field scale and bias (4 m parameters; the two affines compose to
   one, kept for the parameter count).
2. generator: grouped (``s`` groups of whole fields) equivariant 1x1 ``m regular -> g fields of
   rho (x) D^-T`` (15 coefficients per component), basis orthonormalised in kernel space (the public
   code's QR), output divided by 5; per pixel the stencils ``K = c S`` (the public code folds ``S``
   into the generator basis: the same map, 25 instead of 15 outputs per component).
3. L1 normalisation ``K <- K / (||K||_1 + 0.01)`` over the ``d * 25`` entries of each generated field
   per pixel (invariant under the exact grid symmetries, which permute those entries).
4. dynamic depthwise 5x5 filtering of ``x``: the z fields form ``z / g`` contiguous partitions of
   ``g`` fields; field ``j`` of every partition, component ``c``, is filtered at pixel ``x`` with the
   generated stencil ``K[j, c, :, x]``. Steps 2 (stencils from coefficients) to 4 run as one operator,
   :func:`kit.kernels.pdo_filter.pdo_filter` (a fused C++ kernel on the CPU that never materialises
   the stencils; the plain-PyTorch formulation is its reference in tests).
5. output: equivariant 1x1 ``z fields of rho -> out_fields of rho_out`` (no bias).

Parameters: ``z m d + 4 m + (m/s) g (d 15) + z z_out dim Hom(rho, rho_out)``, the public code's
count (``../shared/reference/neural_epdo.md`` section 6.3).

Speed paths on the CPU (the same operator; :func:`kit.kernels.reference_kernels` switches them off):

* wide 1x1 maps (``reduce``, ``expand``) in the isotypic bases (:mod:`kit.kernels.isotypic`: Schur's
  blocks, C16 regular 32 of 256 multiply-accumulates per field pair);
* on regular fields, the generator in the *untwisted* frame (:func:`untwisted_generator`): with
  ``chat_h = D^-T(h)^-1 c_h`` per component ``h`` the coefficients are 15 regular fields, so the generator
  is an isotypic map between regular fields too, and component ``h`` builds its stencils from the rotated
  bank ``D^-T(h)^T S``; nothing is transformed back.

Kernels (the 1x1 weights, the lifting filter bank, the generator weight) are rebuilt from the
parameters every training forward and cached in eval mode by :class:`kit.layers.base.KernelCache`
(never stale). All discretisations come from :func:`kit.kernels.stencils.stencil_bank` with one
component order and one sign convention, so fd, gauss and rbffd are equivariant in the same
direction (the public code mirrors gauss / RBF-FD, section 4.5 of the reference).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..fields import FieldType
from ..groups import Representation, cyclic, plane_coords, regular_rep
from ..kernels.intertwiners import _VERSION, _cached, _gram_recombination, _layer_basis, intertwiner_basis
from ..reps import MAX_ORDER, coefficient_rep, component_index, derivative_rep, field_rep, rep_key, tensor_rep
from .base import EquivariantModule, KernelCache, conv1x1
from .. import _compat
from ..kernels import isotypic
from ..kernels.aggregate import dynamic_aggregate
from ..kernels.isotypic import isotypic_weight
from ..kernels.pdo_filter import fused_op, generated_pdo_filter, pdo_filter
from .e4 import FieldGroupNorm
from .registry import fields_for, register_family
from ..kernels.stencils import METHODS, stencil_bank

__all__ = ["pdo_stencil_matrix", "pdo_conv_basis", "generator_basis", "EquivariantConv1x1", "LinearPDOConv",
           "NeuralEPDOConv", "centre_equivariance_error", "N_OPS", "KERNEL_SIZE"]

N_OPS = 15                    # PDOs of order <= 4 (kit.reps.MAX_ORDER): 1 + 2 + 3 + 4 + 5 monomials d^a ...
KERNEL_SIZE = 5               # ... discretised on 5x5 stencils


# ===================================================================================== stencils
def pdo_stencil_matrix(method: str = "fd", stencil_kw: dict | None = None,
                       stencils: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """``S (15, 25)`` float64, row ``a`` = the flattened 5x5 stencil of ``d^a`` (kit component
    order, one sign convention; :func:`kit.kernels.stencils.stencil_bank`), and a cache key.
    ``stencils (15, 5, 5)`` overrides the bank (e.g. to show that a mirrored bank is caught)."""
    if stencils is not None:
        S = torch.as_tensor(stencils, dtype=torch.float64)
        if tuple(S.shape) != (N_OPS, KERNEL_SIZE, KERNEL_SIZE):
            raise ValueError(f"stencils must have shape (15, 5, 5), got {tuple(S.shape)}")
        S = S.reshape(N_OPS, -1).contiguous()
        return S, "custom:" + hashlib.sha1(S.numpy().tobytes()).hexdigest()[:16]
    if method not in METHODS:
        raise ValueError(f"unknown discretisation method {method!r}; expected one of {METHODS}")
    kw = dict(stencil_kw or {})
    S = stencil_bank(MAX_ORDER, method, KERNEL_SIZE, **kw).reshape(N_OPS, -1)
    return S, f"{method}:{sorted(kw.items())}:" + hashlib.sha1(S.numpy().tobytes()).hexdigest()[:16]


def _order_slices():
    return [(k, component_index(k, 0), component_index(k, 0) + k + 1) for k in range(MAX_ORDER + 1)]


def pdo_conv_basis(rho_in: Representation, rho_out: Representation, S: torch.Tensor, skey: str) -> torch.Tensor:
    """Kernel basis ``(n, d_out, d_in, 25)`` float64 of the linear PDO-eConv ``rho_in -> rho_out``:
    per order k, ``Hom(D_k (x) rho_in, rho_out)`` contracted with the order-k stencils; each basis
    kernel at unit Frobenius norm."""
    def build():
        G = rho_in.group
        out = []
        for k, a, b in _order_slices():
            Dk = derivative_rep(G, k)
            W = intertwiner_basis(tensor_rep(Dk, rho_in), rho_out)                    # (n, do, (k+1) di)
            W = W.reshape(W.shape[0], rho_out.dim, k + 1, rho_in.dim)
            K = torch.einsum("noai,au->noiu", W, S[a:b])                               # (n, do, di, 25)
            nrm = K.flatten(1).norm(dim=1)
            K = K[nrm > 1e-12] / nrm[nrm > 1e-12, None, None, None]
            out.append(K)
        return torch.cat(out)
    return _layer_basis(("pdo", rep_key(rho_in), rep_key(rho_out), skey), build)


def generator_basis(rho: Representation, S: torch.Tensor, skey: str, *, structured: bool = True) -> torch.Tensor:
    """Coefficient-space basis ``(n, d, 15, |G|)`` float64 of the Neural ePDO coefficient generator
    ``regular -> rho (x) D^-T`` (``n = 15 d``), recombined so that the *kernels* ``B S`` are
    orthonormal (the QR orthonormalisation of the public code, done in kernel space through the
    Gram matrix). Cached in process and on disk.

    The raw solver basis is ``W_b[:, h] = (rho (x) D^-T)(h) e_b``, so for a permutation (orthogonal)
    ``rho`` its kernel-space Gram matrix is ``I_d (x) sum_h D^-T(h)^T S S^T D^-T(h)``: the 15 x 15
    factor is all that needs inverting (``structured=True``; the general ``n x n`` Gram matrix
    otherwise; both tested equal)."""
    G = rho.group
    d = rho.dim

    def build():
        V = tensor_rep(rho, coefficient_rep(G))                                        # d * 15
        W = intertwiner_basis(field_rep(G, "regular"), V, disk=False, orthonormal=False)  # (n, d*15, |G|)
        n = W.shape[0]
        W = W.reshape(n, d, N_OPS, G.order)
        SS = S @ S.T                                                                   # (15, 15)
        if structured and rho.perm is not None:
            Dc = coefficient_rep(G).matrices                                           # (|G|, 15, 15)
            T = _gram_recombination(torch.einsum("gab,ac,gcd->bd", Dc, SS, Dc))        # (15, 15)
            W = torch.einsum("xa,caz->cxz", T, W.reshape(d, N_OPS, -1))                # b = (c, a)
        else:
            WS = torch.einsum("ncaq,ab->ncbq", W, SS).reshape(n, -1)
            T = _gram_recombination(WS @ W.reshape(n, -1).T)                           # <W_n S, W_m S>
            W = T @ W.reshape(n, -1)
        return W.reshape(n, d, N_OPS, G.order).contiguous()
    key = (f"{_VERSION}|gen|{int(structured)}|{rep_key(rho)}|{skey}|"
           f"{hashlib.sha1(S.numpy().tobytes()).hexdigest()[:16]}")
    return _cached(key, build, (d, N_OPS, G.order), None)


@dataclass(frozen=True)
class UntwistedGenerator:
    """The Neural-ePDO generator in the untwisted frame (:func:`untwisted_generator`), for field types whose first
    ``|G|`` components are a regular summand.

    ``blocks (n_reg, 15, S, R, Cc)``: the basis elements of the regular summand as 15 maps regular -> regular in the
    isotypic bases of ``plan``; ``reg`` / ``rest``: which basis elements those are and which map to the other
    components (``rest_basis (n_rest, d - |G|, 15, |G|)``, applied densely; none for regular fields);
    ``banks (d, 15, 25)``: component ``h``'s stencil bank, ``D(h)^-T^T S`` on the regular summand, ``S`` after it.
    Float64."""
    plan: isotypic.IsotypicPlan
    blocks: torch.Tensor
    banks: torch.Tensor
    reg: torch.Tensor
    rest: torch.Tensor
    rest_basis: torch.Tensor

    def mac_ratio(self, c_in: int, c_out: int) -> float:
        """Multiply-accumulates per pixel against the dense generator, ``c_in`` hidden regular fields to ``c_out``
        coefficient fields (per group)."""
        G, d = self.plan.q_in.shape[-1], self.banks.shape[0]
        return (self.plan.mac_ratio(c_in, N_OPS * c_out) * G + (d - G)) / d


_UNTWISTED: dict = {}
#: hidden channels (per generator group) from which :class:`NeuralEPDOConv` generates in the untwisted frame
UNTWISTED_MIN_CHANNELS = 384

# Maps of at least this many pixels generate the coefficients chunk by chunk inside the fused filter
# (kit.kernels.pdo_filter.generated_pdo_filter; measured, 1 thread, batch 64, the layer's fwd + bwd: 1.1-1.3x at
# 28x28, 1.0-1.1x at 14x14, 0.7-0.9x at 7x7, where the coefficients are small and per-image GEMMs thin).
GENERATED_MIN_PIXELS = 196


def untwisted_generator(rho: Representation, S: torch.Tensor, skey: str) -> UntwistedGenerator | None:
    """The generator of :class:`NeuralEPDOConv` on fields of ``rho`` as (mostly) a map between regular fields.

    A coefficient field transforms as ``rho (x) D^-T`` (``c'_{gh} = D^-T(g) c_h`` on a regular summand, whose
    component ``h`` is group element ``h``). Untwisting each of those components, ``chat_h = D^-T(h)^-1 c_h``,
    gives ``chat'_{gh} = chat_h``: 15 regular fields. So the generator's part into the regular summand, an
    equivariant 1x1 map regular -> ``regular (x) D^-T``, is an equivariant 1x1 map regular -> regular^15, block
    diagonal in the isotypic bases (:mod:`kit.kernels.isotypic`; D16: 128 of 1024 multiply-accumulates per field
    pair), and the stencils of component ``h`` are ``S^T c_h = (D^-T(h)^T S)^T chat_h``: the rotated bank. No
    transform back to ``c`` is needed; the PDO filter takes one bank per component. Components after the regular
    summand (the quotient type's 4) keep their dense generator part (every basis element maps into one summand:
    checked). ``None`` without a regular summand first, or where the decomposition could not be verified to
    1e-10. Cached per (rho, stencils)."""
    key = (rep_key(rho), skey)
    if key in _UNTWISTED:
        return _UNTWISTED[key]
    out = None
    G = rho.group
    n_g = G.order
    reg = regular_rep(G)
    M = rho.matrices.double()
    if (rho.dim >= n_g and torch.equal(M[:, :n_g, :n_g], reg.matrices.double())
            and not M[:, :n_g, n_g:].any() and not M[:, n_g:, :n_g].any()):
        B = generator_basis(rho, S, skey)                                        # (n, d, 15, |G|)
        on_reg = B[:, :n_g].flatten(1).abs().amax(1) > 0
        on_rest = (B[:, n_g:].flatten(1).abs() > 0).any(1)
        plan = isotypic.isotypic_plan(reg, reg)
        if plan is not None and not (on_reg & on_rest).any() and on_reg.any():
            ri, qi = on_reg.nonzero().flatten(), on_rest.nonzero().flatten()
            Dc = coefficient_rep(G).matrices.double()                           # (|G|, 15, 15); comp. h = element h
            Bh = torch.einsum("hba,nhaq->nbhq", torch.linalg.inv(Dc), B[ri, :n_g])   # (n_reg, 15, |G|, |G|)
            nr = len(ri)
            blocks = plan.blocks(Bh.reshape(nr * N_OPS, n_g, n_g))               # (n_reg 15, S, R, Cc)
            rebuilt = torch.einsum("sre,nsri,sid->ned", plan.q_out, blocks, plan.q_in)
            if float((rebuilt - Bh.reshape(nr * N_OPS, n_g, n_g)).abs().max()) <= 1e-10:
                banks = torch.cat([torch.einsum("hab,bt->hat", Dc.transpose(1, 2), S),      # D(h)^T S
                                   S.expand(rho.dim - n_g, *S.shape)])                      # (d, 15, 25)
                out = UntwistedGenerator(plan, blocks.reshape(nr, N_OPS, *plan.slots).contiguous(),
                                         banks.contiguous(), ri, qi, B[qi, n_g:].contiguous())
    _UNTWISTED[key] = out
    return out


# ===================================================================================== the layers
def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return v


def _kaiming_std(n_basis: int, d_out: int, c_in: int) -> float:
    """Std of the basis coefficients so that the expanded weight has the He variance ``2 / fan_in``
    on average (basis elements of unit Frobenius norm)."""
    return math.sqrt(2.0 * d_out / (max(n_basis, 1) * c_in))


class EquivariantConv1x1(KernelCache, EquivariantModule):
    """Pointwise equivariant channel mixing ``in_type -> out_type`` (any representations of one
    group): ``weight (C_out, C_in, n)`` on the solved basis ``(n, d_out, d_in)``, no bias.
    Parameters: ``C_in C_out dim Hom(rho_in, rho_out)``.

    Wide maps on the CPU (:func:`kit.kernels.isotypic.worth_it`: >= 384 input channels, blocks at most half
    the dense multiply-accumulates) run in the isotypic bases, where Schur's lemma makes the map block
    diagonal (C16 regular: 8 blocks of 2 x 2 instead of a 16 x 16 circulant per field pair); the same
    operator, tested equal to the dense 1x1 convolution to 1e-12 in float64."""

    def __init__(self, in_type: FieldType, out_type: FieldType):
        super().__init__()
        if in_type.group != out_type.group or not in_type.spatial or not out_type.spatial:
            raise ValueError(f"EquivariantConv1x1 maps spatial fields of one group, got {in_type} -> {out_type}")
        self.in_type, self.out_type = in_type, out_type
        basis = intertwiner_basis(in_type.rep, out_type.rep)
        if basis.shape[0] == 0:
            raise ValueError(f"there is no non-zero equivariant map {in_type.rep!r} -> {out_type.rep!r}")
        self.register_buffer("basis", basis.float(), persistent=False)          # (n, d_out, d_in)
        self.weight = nn.Parameter(torch.randn(out_type.n_fields, in_type.n_fields, basis.shape[0])
                                   * _kaiming_std(basis.shape[0], out_type.dim, in_type.n_fields))
        self._plan = isotypic.isotypic_plan(in_type.rep, out_type.rep)   # block structure (Schur), or None

    def filter(self) -> torch.Tensor:
        """``(C_out d_out, C_in d_in, 1, 1)`` (cached in eval mode)."""
        def build():
            O, C, _ = self.weight.shape
            K = torch.einsum("ocn,npq->opcq", self.weight, self.basis.to(self.weight.dtype))
            return K.reshape(O * self.out_type.dim, C * self.in_type.dim, 1, 1)
        return self.cached_kernel(build, self.weight)

    def isotypic_filter(self) -> torch.Tensor:
        """The same map in the isotypic bases: blocks ``(S, C_out R, C_in Cc)`` (:mod:`kit.kernels.isotypic`;
        cached in eval mode)."""
        return self.cached_kernel(lambda: isotypic_weight(self.weight, self.basis, self._plan), self.weight,
                                 tag="isotypic")

    def uses_isotypic(self, x: torch.Tensor) -> bool:
        """Whether a forward on ``x`` takes the isotypic block path (wide maps on the CPU, outside
        :func:`kit.kernels.reference_kernels`) rather than the dense 1x1 convolution."""
        return not _compat.REFERENCE_KERNELS and isotypic.worth_it(self._plan, self.in_type.n_fields,
                                                                     self.out_type.n_fields, x)

    def _forward(self, x):                                               # (B, C_in, d_in, H, W)
        if self.uses_isotypic(x):
            return isotypic.isotypic_conv1x1(x, self.isotypic_filter(), self._plan)
        y = conv1x1(self.in_type.flatten(x), self.filter())              # (B, C_out*d_out, H, W)
        return self.out_type.unflatten(y)                                # (B, C_out, d_out, H, W)


class LinearPDOConv(KernelCache, EquivariantModule):
    """The linear PDO-eConv of order 4 on 5x5 stencils (the paper's lifting layer ``conv5x5``; with
    regular inputs the public code's ``--g -1`` baseline layer).

    Args (keyword-only):
        in_type: trivial (images) or permutation-representation fields.
        out_fields / out_rep: output fields and their representation (default regular).
        method / stencil_kw / stencils: discretisation (:func:`pdo_stencil_matrix`).
        padding: default 2 ("same").

    Basis per (input field, output field): ``dim Hom(D (x) rho_in, rho_out)``: 15 for trivial ->
    regular (C16 and D16), 20 for trivial -> regular + quotient_4, 240 for C16 regular -> regular.
    Shapes: ``(B, C_in[, d_in], H, W) -> (B, C_out, d_out, H, W)``.
    """

    def __init__(self, *, in_type: FieldType, out_fields: int, out_rep: Representation | str = "regular",
                 method: str = "fd", stencil_kw: dict | None = None, stencils: torch.Tensor | None = None,
                 padding: int = 2):
        super().__init__()
        G = in_type.group
        _positive_int("out_fields", out_fields)
        out_rep = field_rep(G, out_rep) if isinstance(out_rep, str) else out_rep
        self.in_type, self.out_type = in_type, FieldType(G, out_rep, out_fields)
        self.method = "custom" if stencils is not None else method
        self.padding = padding
        S, skey = pdo_stencil_matrix(method, stencil_kw, stencils)
        basis = pdo_conv_basis(in_type.rep, out_rep, S, skey)                     # (n, do, di, 25)
        self.register_buffer("basis", basis.float(), persistent=False)
        self.weight = nn.Parameter(torch.randn(out_fields, in_type.n_fields, basis.shape[0])
                                   * _kaiming_std(basis.shape[0], out_rep.dim, in_type.n_fields))

    def filter(self) -> torch.Tensor:
        """``(C_out d_out, C_in d_in, 5, 5)`` (cached in eval mode)."""
        def build():
            O, C, _ = self.weight.shape
            K = torch.einsum("ocn,npqu->opcqu", self.weight, self.basis.to(self.weight.dtype))
            return K.reshape(O * self.out_type.dim, C * self.in_type.dim, KERNEL_SIZE, KERNEL_SIZE)
        return self.cached_kernel(build, self.weight)

    def _forward(self, x):
        y = F.conv2d(self.in_type.flatten(x), self.filter(), padding=self.padding)
        return self.out_type.unflatten(y)                                # (B, C_out, d_out, H', W')

    def extra_repr(self) -> str:
        return f"{self.in_type} -> {self.out_type}, method={self.method!r}, bases={self.basis.shape[0]}"


class NeuralEPDOConv(KernelCache, EquivariantModule):
    """The Neural ePDO layer (``nlpdo``): a per-pixel PDO of order 4 whose coefficients an equivariant
    pointwise MLP generates from the input, applied depthwise as 5x5 stencils, then an equivariant 1x1.

    Args (keyword-only):
        in_type: ``z`` fields of a permutation representation ``rho`` (regular C_n / D_n, or the
            quotient type), dimension ``d``.
        out_fields / out_rep: output fields and their representation (default: ``rho``).
        g: fields per partition; the generator outputs ``g`` coefficient fields, field ``j`` of each
            of the ``z / g`` partitions uses the ``j``-th (the public ``--g``).
        s: groups of the generator's 1x1 conv (whole fields; ``s`` must divide ``g`` and ``m``).
        reduction: the hidden width is ``m = (z d) // (reduction |G|)`` regular fields.
        method / stencil_kw / stencils: discretisation (:func:`pdo_stencil_matrix`).
        l1_eps: the ``+0.01`` of the L1 normalisation; scale: the generator's ``1/5``.
        eps: GroupNorm epsilon.

    Shapes: ``(B, z, d, H, W) -> (B, out_fields, d_out, H, W)`` ("same" 5x5, stride 1).
    """

    def __init__(self, *, in_type: FieldType, out_fields: int, out_rep: Representation | str | None = None,
                 g: int = 4, s: int = 1, reduction: int = 1, method: str = "fd", stencil_kw: dict | None = None,
                 stencils: torch.Tensor | None = None, l1_eps: float = 0.01, scale: float = 0.2,
                 eps: float = 1e-5):
        super().__init__()
        if not isinstance(in_type, FieldType) or in_type.rep.perm is None or in_type.is_trivial \
                or not in_type.spatial:
            raise ValueError(f"NeuralEPDOConv needs spatial fields of a permutation representation of "
                             f"dimension > 1 (regular, quotient), got {in_type!r}")
        G = in_type.group
        for name, v in (("out_fields", out_fields), ("g", g), ("s", s), ("reduction", reduction)):
            _positive_int(name, v)
        z, d = in_type.n_fields, in_type.dim
        m = (z * d) // (reduction * G.order)
        if z % g:
            raise ValueError(f"g (fields per partition) must divide the {z} input fields, got g={g}")
        if m < 1:
            raise ValueError(f"reduction={reduction} leaves no hidden field (m = z d // (r |G|) = {m})")
        if g % s or m % s:
            raise ValueError(f"s (generator groups) must divide g={g} and the hidden width m={m}, got s={s}")
        if out_rep is None:
            out_rep = in_type.rep
        elif isinstance(out_rep, str):
            out_rep = field_rep(G, out_rep)
        self.in_type, self.out_type = in_type, FieldType(G, out_rep, out_fields)
        self.g, self.s, self.reduction, self.hidden = g, s, reduction, m
        self.method = "custom" if stencils is not None else method
        self.l1_eps, self.scale = l1_eps, scale

        hidden = FieldType(G, "regular", m)
        self.reduce = EquivariantConv1x1(in_type, hidden)                       # conv1: z*m*d
        self.norm = FieldGroupNorm(hidden, affine="per_field", eps=eps)         # 2m
        self.norm_scale = nn.Parameter(torch.ones(m))                           # the public code's extra
        self.norm_shift = nn.Parameter(torch.zeros(m))                          # per-field affine: 2m
        S, skey = pdo_stencil_matrix(method, stencil_kw, stencils)
        B = generator_basis(in_type.rep, S, skey)                               # (n, d, 15, |G|)
        self.register_buffer("gen_basis", B.float(), persistent=False)
        self.register_buffer("stencils", S.float(), persistent=False)           # (15, 25)
        self._exact = (S, skey)         # float64 originals for float64 runs (the basis from the in-process cache)
        self._untwisted = untwisted_generator(in_type.rep, S, skey)            # None unless regular fields
        n = B.shape[0]
        # conv2: g output fields, m/s hidden fields per group, n basis coefficients: (m/s) g n
        self.gen_weight = nn.Parameter(torch.randn(g, m // s, n) * _kaiming_std(n, d * N_OPS, m // s))
        self.expand = EquivariantConv1x1(in_type, self.out_type)               # conv3: z z_out dim Hom
        fused_op()                      # the fused PDO filter's operator, defined eagerly (torch.compile)

    # ------------------------------------------------------------------------- generator
    def generator_weight(self, *, kernels: bool = False) -> torch.Tensor:
        """The generator's 1x1 conv weight ``(g d 15, (m/s) |G|, 1, 1)``: PDO coefficients ``c_a`` (kit
        component order; cached in eval mode), or with ``kernels=True`` the same map with the stencils
        folded in, ``(g d 25, (m/s) |G|, 1, 1)`` (the public code's form; tests and figures)."""
        def build(kern):
            Wc = torch.einsum("jin,ncaq->jcaiq", self.gen_weight, self._buffer("gen_basis"))
            if kern:                                                            # (g, d, 15, m/s, |G|)
                Wc = torch.einsum("jcaiq,au->jcuiq", Wc, self._buffer("stencils"))      # (g, d, 25, m/s, |G|)
            g, d, A, i, q = Wc.shape
            return Wc.reshape(g * d * A, i * q, 1, 1) * self.scale
        if kernels:
            return build(True)
        return self.cached_kernel(lambda: build(False), self.gen_weight)

    def _buffer(self, name: str) -> torch.Tensor:
        """``gen_basis`` or ``stencils`` in the weights' dtype: the float32 buffer, or in float64 the exact
        float64 original (so every formulation of the layer is the same float64 operator, not one rounded
        through float32 in two different bases)."""
        w = self.gen_weight
        if w.dtype == torch.float64:
            S, skey = self._exact
            exact = generator_basis(self.in_type.rep, S, skey) if name == "gen_basis" else S
            return exact.to(w.device)
        return getattr(self, name).to(w.dtype)

    def stencil_bank(self) -> torch.Tensor:
        """The ``(15, 25)`` stencils ``S`` as the layer uses them: float32, or the exact float64 bank in float64."""
        return self._buffer("stencils")

    def untwisted_generator_weight(self) -> torch.Tensor:
        """The generator in the untwisted frame as isotypic blocks ``(S s, (g/s) 15 R, (m/s) Cc)``
        (:func:`untwisted_generator`; cached in eval mode)."""
        u = self._untwisted

        def build():
            w = self.gen_weight
            blocks = u.blocks.to(w.device, w.dtype)                            # (n_reg, 15, S, R, Cc)
            S, R, Cc = u.plan.slots
            g, mi, _ = w.shape
            Wh = torch.einsum("jin,nbsrk->sjbrik", w[..., u.reg.to(w.device)], blocks) * self.scale
            return Wh.reshape(S * self.s, (g // self.s) * N_OPS * R, mi * Cc)  # from (S, g, 15, R, m/s, Cc)
        return self.cached_kernel(build, self.gen_weight, tag="untwisted")

    def _rest_generator_weight(self) -> torch.Tensor:
        """The dense generator part into the components after the regular summand: ``(g d_rest 15, (m/s) |G|, 1,
        1)`` (cached in eval mode)."""
        u = self._untwisted

        def build():
            w = self.gen_weight
            Wc = torch.einsum("jin,ncaq->jcaiq", w[..., u.rest.to(w.device)], u.rest_basis.to(w.device, w.dtype))
            g, d, A, i, q = Wc.shape
            return Wc.reshape(g * d * A, i * q, 1, 1) * self.scale
        return self.cached_kernel(build, self.gen_weight, tag="untwisted-rest")

    def uses_untwisted_generator(self, x: torch.Tensor) -> bool:
        """Whether a forward on ``x`` generates the coefficients in the untwisted frame (a regular summand, a
        wide generator on the CPU, outside :func:`kit.kernels.reference_kernels`): :func:`untwisted_generator`."""
        u = self._untwisted
        if u is None or _compat.REFERENCE_KERNELS or x.device.type != "cpu":
            return False
        G = self.in_type.group.order
        mi = self.hidden // self.s
        return (mi * G >= UNTWISTED_MIN_CHANNELS
                and u.mac_ratio(mi, self.g // self.s) <= isotypic.MAX_MAC_RATIO)

    def hidden_features(self, x: torch.Tensor) -> torch.Tensor:
        """``h = ReLU(norm(conv1x1(x)))``: ``(B, m, |G|, H, W)``. The public code's extra per-field affine is
        folded into the GroupNorm's (``s (w n + b) + t = (s w) n + (s b + t)``, passed to :class:`FieldGroupNorm`
        as its affine): one pass over ``h`` instead of three (:func:`kit.kernels.reference_kernels`: separate ops)."""
        h = self.reduce(x)                                                      # (B, m, |G|, H, W)
        if _compat.REFERENCE_KERNELS:
            h = self.norm(h)
            h = h * self.norm_scale[:, None, None, None] + self.norm_shift[:, None, None, None]
        else:
            n = self.norm
            h = n(h, (n.weight * self.norm_scale, n.bias * self.norm_scale + self.norm_shift))
        return F.relu(h)

    def _coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """The generator's PDO coefficients ``(B, g*d*15, H, W)`` (input type checked)."""
        self.in_type.check(x, f"{type(self).__name__} input")
        h = self.hidden_features(x).flatten(1, 2)                              # (B, m*|G|, H, W)
        return conv1x1(h, self.generator_weight(), groups=self.s)              # (B, g*d*15, H, W)

    def _raw_stencils(self, x: torch.Tensor):
        """PDO coefficients ``(B, g, d, 15, HW)``, un-normalised stencils ``(B, g, d, 25, HW)`` and their
        L1 norms ``(B, g, 1, 1, HW)`` (``+ l1_eps``), each per pixel."""
        c = self._coefficients(x)                                               # (B, g*d*15, H, W)
        Bn, _, H, W = c.shape
        c = c.view(Bn, self.g, self.in_type.dim, N_OPS, H * W)
        k = torch.matmul(self._buffer("stencils").T, c)                         # (B, g, d, 25, H*W)
        norm = torch.linalg.vector_norm(k, 1, dim=(2, 3), keepdim=True) + self.l1_eps   # (B, g, 1, 1, H*W)
        return c, k, norm

    def generate(self, x: torch.Tensor, *, coefficients: bool = False) -> torch.Tensor:
        """The L1-normalised per-pixel stencils ``(B, g, d, 25, H, W)``; with ``coefficients=True``
        also the PDO coefficients ``(B, g, d, 15, H, W)`` of the same normalised operators.

        The generator outputs the 15 coefficients per component (cheaper than 25 taps: the 1x1
        generator conv dominates the cost of the layer); the stencils ``K = c S`` follow per pixel."""
        c, k, norm = self._raw_stencils(x)
        Bn, g, d, _, HW = k.shape
        H, W = x.shape[-2:]
        k = (k / norm).view(Bn, g, d, KERNEL_SIZE ** 2, H, W)                  # (B, g, d, 25, H, W)
        if not coefficients:
            return k
        return k, (c / norm).view(Bn, g, d, N_OPS, H, W)                        # (B, g, d, 15, H, W)

    def apply_stencils(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Dynamic depthwise filtering: field ``p g + j`` of ``x (B, z, d, H, W)`` with ``k[:, j]``."""
        Bn, z, d, H, W = x.shape
        g = self.g
        v = x.view(Bn, z // g, g, d, H, W).transpose(1, 2).reshape(Bn, z, d, H, W)   # j-major: slices
        y = dynamic_aggregate(v, k)                                              # (B, z, d, H, W)
        return y.view(Bn, g, z // g, d, H, W).transpose(1, 2).reshape(Bn, z, d, H, W)

    def dynamic_macs(self, H: int, W: int) -> int:
        """The family-protocol hook: the per-pixel 5x5 filtering of every input channel."""
        return self.in_type.channels * KERNEL_SIZE ** 2 * H * W

    def _forward(self, x):                                                       # (B, z, d, H, W)
        # coefficients -> stencils -> L1 normalisation -> filtering as one operator
        # (kit.kernels.pdo_filter: fused on the CPU; the stencils are never materialised)
        Bn, z, d, H, W = x.shape
        g = self.g
        if self.uses_untwisted_generator(x):
            # the coefficients untwisted per component, c_h = D(h)^-T chat_h: the generator is then a map
            # between regular fields (isotypic blocks) and component h's stencils come from the rotated bank
            # S_h = D(h)^-T^T S (same stencils, same operator; kit.layers.epdo.untwisted_generator)
            self.in_type.check(x, f"{type(self).__name__} input")
            h = self.hidden_features(x)                                          # (B, m, |G|, H, W)
            c = isotypic.isotypic_conv1x1(h, self.untwisted_generator_weight(), self._untwisted.plan,
                                          groups=self.s, inner=N_OPS)           # (B, g, |G|, 15, H, W)
            if len(self._untwisted.rest):                                        # the quotient type's 4 more
                cr = conv1x1(h.flatten(1, 2), self._rest_generator_weight(), groups=self.s)
                c = torch.cat([c, cr.view(Bn, g, d - c.shape[2], N_OPS, H, W)], dim=2)   # (B, g, d, 15, H, W)
            S = self._untwisted.banks.to(x.device, x.dtype)                      # (d, 15, 25)
        elif H * W >= GENERATED_MIN_PIXELS:
            # the generator's GEMM runs inside the fused filter, a chunk of images at a time: the coefficients
            # (B, g, d, 15, H, W) and their gradient are never held whole (the same operator)
            self.in_type.check(x, f"{type(self).__name__} input")
            h = self.hidden_features(x).flatten(1, 2)                           # (B, m*|G|, H, W)
            Wg = self.generator_weight()                                         # (g d 15, m/s |G|, 1, 1)
            y = generated_pdo_filter(x.view(Bn, z // g, g, d, H, W), h, Wg.view(self.s, -1, Wg.shape[1]),
                                     self._buffer("stencils"), self.l1_eps)      # (B, z/g, g, d, H, W)
            return self.expand(y.view(Bn, z, d, H, W))
        else:
            c = self._coefficients(x).view(Bn, g, d, N_OPS, H, W)               # (B, g, d, 15, H, W)
            S = self._buffer("stencils")
        y = pdo_filter(x.view(Bn, z // g, g, d, H, W), c, S, self.l1_eps)       # (B, z/g, g, d, H, W)
        return self.expand(y.view(Bn, z, d, H, W))                               # (B, z_out, d_out, H, W)

    def extra_repr(self) -> str:
        return (f"{self.in_type} -> {self.out_type}, g={self.g}, s={self.s}, reduction={self.reduction} "
                f"(hidden={self.hidden}), method={self.method!r}, generator bases={self.gen_basis.shape[0]}")


# ========================================================================= 22.5-degree measurement
def _blob_maps(n_maps: int, size: int, A_inv: torch.Tensor, *, seed: int, n_blobs: int, sigma: tuple,
               radius: float) -> torch.Tensor:
    """``(n_maps, size, size)`` float64: each map a sum of ``n_blobs`` Gaussian blobs (random centres
    within ``radius`` px of the image centre, widths in ``sigma``, amplitudes N(0, 1)), evaluated at
    ``A_inv p`` (p = pixel centres, x right, y up): the analytic rotation of the maps."""
    gen = torch.Generator().manual_seed(seed)
    c = (torch.rand(n_maps, n_blobs, 2, generator=gen, dtype=torch.float64) * 2 - 1) * radius
    s = sigma[0] + (sigma[1] - sigma[0]) * torch.rand(n_maps, n_blobs, generator=gen, dtype=torch.float64)
    a = torch.randn(n_maps, n_blobs, generator=gen, dtype=torch.float64)
    X, Y = plane_coords(size, size)                                         # x right, y up (row 0 on top)
    P = torch.stack([X, Y], -1) @ A_inv.T                                   # (size, size, 2): A^-1 p
    d2 = ((P[None, None] - c[:, :, None, None]) ** 2).sum(-1)               # (n, blobs, size, size)
    return (a[..., None, None] * torch.exp(-d2 / (2 * s[..., None, None] ** 2))).sum(1)


def centre_equivariance_error(module: EquivariantModule, element, *, batch: int = 4, size: int = 21,
                              seed: int = 0, n_blobs: int = 3, sigma=(1.5, 3.0), radius: float = 4.0,
                              direction: int = 1) -> float:
    """Relative equivariance error of ``module`` at a group element (e.g. 22.5 degrees), measured at
    the rotation centre with analytically rotated smooth inputs: no image interpolation at all.

    The input is a field of Gaussian blobs (:func:`_blob_maps`); ``g.x`` is sampled exactly, field
    axis included. At the centre pixel ``p = 0`` (``A^-1 0 = 0``) the output must satisfy
    ``f(g.x)(0) = rho_out(g) f(x)(0)``; the error is ``||f(g.x)(0) - rho_out(g^direction) f(x)(0)|| /
    ||f(x)(0)||`` over the batch and every output channel. ``direction=-1`` compares with the
    *opposite* rotation direction (what a mirrored discretisation would satisfy). The module runs in
    float64, eval mode, without gradients (its dtype and mode are restored)."""
    in_type, out_type = module.in_type, module.out_type
    G = in_type.group
    g = element
    A_inv = G.matrix(G.inverse(g))
    maps = lambda A: _blob_maps(batch * in_type.channels, size, A, seed=seed, n_blobs=n_blobs, sigma=sigma,
                                radius=radius)
    x = maps(torch.eye(2, dtype=torch.float64))
    xr = maps(A_inv)
    if in_type.is_trivial:
        x, xr = x.reshape(batch, in_type.n_fields, size, size), xr.reshape(batch, in_type.n_fields, size, size)
    else:
        shape = (batch, in_type.n_fields, in_type.dim, size, size)
        x, xr = x.reshape(shape), xr.reshape(shape)
        # (g.x)[c, j](p) = sum_k rho(g)[j, k] x[c, k](A^-1 p)
        xr = torch.einsum("jk,bck...->bcj...", in_type.rep(g), xr)
    was = module.training
    dtypes = {p.dtype for p in module.parameters()} | {b.dtype for b in module.buffers() if b.is_floating_point()}
    module.double().eval()
    try:
        with torch.no_grad():
            y = module(x)[..., size // 2, size // 2]                       # (B, C[, D]) at the centre
            yr = module(xr)[..., size // 2, size // 2]
    finally:
        if dtypes == {torch.float32}:
            module.float()
        module.train(was)
    h = g if direction == 1 else G.inverse(g)
    if not out_type.is_trivial:
        y = torch.einsum("jk,bck->bcj", out_type.rep(h), y)
    return float((yr - y).norm() / y.norm())


# ------------------------------------------------------------------------------ the family registry
@register_family("nepdo-conv", family="Neural ePDO", group="C16",
                 description="NeuralEPDOConv fd, 4 -> 4 regular fields (g=s=4, r=1)",
                 paper="He et al., Neural ePDOs, ICLR 2023")
def _nepdo_example(*, width, kernel_size):
    G = cyclic(16)
    f = fields_for(width, G.order)
    # the nepdo-mnist-regular-fd hyper-parameters: g = s = 4, reduction 1 (5 x 5 stencils whatever kernel_size is)
    return (NeuralEPDOConv(in_type=FieldType(G, "regular", f), out_fields=f, g=f, s=f, reduction=1, method="fd"),
            LinearPDOConv(in_type=FieldType(G, "trivial", 1), out_fields=f, method="fd"))
