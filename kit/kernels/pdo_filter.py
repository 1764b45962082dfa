"""The per-pixel PDO filter of a Neural ePDO layer (He et al., ICLR 2023): stencils from coefficients,
their L1 normalisation and the depthwise filtering, as one operator.

``v (B, P, g, d, H, W)`` (field ``p g + j`` of the layer's input at ``[:, p, j]``), coefficients
``coef (B, g, d, A, H, W)`` of the ``A = 15`` operators ``d^a`` and their stencils ``S (A, T)``
(``T = 25``, taps row-major over the 5x5 window)::

    k[b, j, c, t, x]  = sum_a S[a, t] coef[b, j, c, a, x]                      # (B, g, d, T, H, W)
    n[b, j, x]        = sum_{c, t} |k[b, j, c, t, x]| + eps                      # (B, g, H, W)
    y[b, p, j, c, x]  = sum_t k[b, j, c, t, x] v[b, p, j, c, x + t] / n[b, j, x]  # "same" zero padding

Two formulations, tested equal in float64 (``tests/test_epdo_fused.py``):

* :func:`pdo_filter_reference`: plain PyTorch (a batched matmul for ``k``, ``vector_norm``, the tap
  aggregation of :mod:`kit.kernels.aggregate`); it materialises ``k`` (25/15 times the coefficients)
  and keeps it, and its sign, for the backward. Traceable by ``torch.compile``.
* the fused C++/OpenMP extension (``csrc/epdo_stencils.cpp``): one task per ``(b, j)`` builds each
  component's stencils in a ``25 x HW`` buffer from the non-zero entries of ``S`` only (70 of 375 for
  fd), filters every partition with them and normalises; its backward recomputes the stencils.
  Keeps only ``v``, ``coef``, ``n`` and ``y`` (the output, which the next 1x1 conv keeps anyway).

:func:`pdo_filter` is what the layer calls: the extension on the CPU (eager and under
``torch.compile``, as a custom operator), the reference elsewhere and inside :func:`kit.export`.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import _compat
from .aggregate import build_extension, dynamic_aggregate

__all__ = ["pdo_filter", "pdo_filter_reference", "generated_pdo_filter", "fused_pdo_extension", "fused_op",
           "GENERATED_CHUNK_BYTES"]


def _check(v: torch.Tensor, coef: torch.Tensor, S: torch.Tensor):
    if v.dim() != 6 or coef.dim() != 6 or S.dim() not in (2, 3) or coef.shape[0] != v.shape[0] \
            or tuple(coef.shape[1:3]) != tuple(v.shape[2:4]) or coef.shape[3] != S.shape[-2] \
            or (S.dim() == 3 and S.shape[0] != v.shape[3]) or tuple(coef.shape[-2:]) != tuple(v.shape[-2:]):
        raise ValueError(f"pdo_filter needs v (B, P, g, d, H, W), coef (B, g, d, A, H, W) and S (A, T) or one bank "
                         f"per component (d, A, T); got {tuple(v.shape)}, {tuple(coef.shape)} and {tuple(S.shape)}")


def _chunks(B: int, per_image: int, chunk_bytes: int):
    """Images ``[b0, b1)`` a few at a time: about ``chunk_bytes`` of per-image data each (at least one image)."""
    n = max(1, min(B, chunk_bytes // max(per_image, 1)))
    return [(b0, min(B, b0 + n)) for b0 in range(0, B, n)]


@functools.lru_cache(maxsize=1)
def fused_pdo_extension():
    """The compiled fused PDO filter (``csrc/epdo_stencils.cpp``), or ``None`` (the reference is used)."""
    return build_extension("eqkit_epdo_stencils", "epdo_stencils.cpp", fma=True)


def pdo_filter_reference(v: torch.Tensor, coef: torch.Tensor, S: torch.Tensor, eps: float) -> torch.Tensor:
    """The operator in plain PyTorch (see the module docstring): ``(B, P, g, d, H, W)``."""
    _check(v, coef, S)
    B, P, g, d, H, W = v.shape
    A, T = S.shape[-2:]
    k = torch.matmul(S.transpose(-1, -2).to(coef.dtype), coef.reshape(B, g, d, A, H * W))   # (B, g, d, T, HW)
    n = torch.linalg.vector_norm(k, 1, dim=(2, 3), keepdim=True) + eps          # (B, g, 1, 1, HW)
    vj = v.transpose(1, 2).reshape(B, g * P, d, H, W)                            # j-major: g slices of P fields
    y = dynamic_aggregate(vj, k.view(B, g, d, T, H, W))                          # (B, g P, d, H, W)
    y = y.view(B, g, P, d, H, W) / n.view(B, g, 1, 1, H, W)
    return y.transpose(1, 2).contiguous()                                        # (B, P, g, d, H, W)


_OP = None


def fused_op():
    """The extension as the custom operator ``eqkit::pdo_filter`` (with a fake kernel and an autograd
    formula), so that ``torch.compile`` captures it whole (``fullgraph=True``) and a compiled model runs
    the same kernel, with the same rounding, as the eager one; ``None`` without the extension. Defined
    once, eagerly (the Neural ePDO layer asks for it when it is built: dynamo does not trace the build)."""
    global _OP
    if _OP is None and fused_pdo_extension() is not None:
        _OP = _define_op()
    return _OP


def _define_op():
    @torch.library.custom_op("eqkit::pdo_filter", mutates_args=())
    def forward(v: Tensor, coef: Tensor, S: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        y, n = fused_pdo_extension().forward(v.contiguous(), coef.contiguous(), S.contiguous(), eps)
        return y, n                                                   # (B, P, g, d, H, W), (B, g, H, W)

    @forward.register_fake
    def _(v, coef, S, eps):
        B, P, g, d, H, W = v.shape
        return v.new_empty(v.shape), v.new_empty((B, g, H, W))

    @torch.library.custom_op("eqkit::pdo_filter_backward", mutates_args=())
    def backward_op(v: Tensor, coef: Tensor, S: Tensor, n: Tensor, y: Tensor, gy: Tensor,
                    need_v: bool, need_coef: bool) -> tuple[Tensor, Tensor]:
        gv, gc = fused_pdo_extension().backward(v.contiguous(), coef.contiguous(), S.contiguous(), n, y, gy,
                                                need_v, need_coef)
        return (gv if need_v else v.new_zeros(())), (gc if need_coef else coef.new_zeros(()))

    @backward_op.register_fake
    def _(v, coef, S, n, y, gy, need_v, need_coef):
        return (v.new_empty(v.shape) if need_v else v.new_empty(())), \
            (coef.new_empty(coef.shape) if need_coef else coef.new_empty(()))

    def setup_context(ctx, inputs, output):
        v, coef, S, _ = inputs
        y, n = output
        ctx.save_for_backward(v, coef, S, n, y)
        ctx.need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])

    def backward(ctx, gy, _gn):                                      # n is internal: its gradient is unused
        v, coef, S, n, y = ctx.saved_tensors
        gv, gc = backward_op(v, coef, S, n, y, gy.contiguous(), *ctx.need)
        return (gv if ctx.need[0] else None), (gc if ctx.need[1] else None), None, None

    forward.register_autograd(backward, setup_context=setup_context)
    return forward


def pdo_filter(v: torch.Tensor, coef: torch.Tensor, S: torch.Tensor, eps: float) -> torch.Tensor:
    """The normalised per-pixel PDO filter (module docstring): ``(B, P, g, d, H, W)``. The fused
    extension on the CPU (float32 / float64, ``S`` a constant; also under ``torch.compile``, as the
    custom operator ``eqkit::pdo_filter``), else :func:`pdo_filter_reference` (other devices, and while
    :func:`kit.export` traces a model, whose program must need nothing from eqkit, and under
    :func:`kit.kernels.reference_kernels`)."""
    _check(v, coef, S)
    op = _OP if _compat.is_compiling() else fused_op()
    if (op is not None and not _compat.EXPORTING and not _compat.REFERENCE_KERNELS and v.device.type == "cpu" and coef.device.type == "cpu"
            and v.dtype == coef.dtype and v.dtype in (torch.float32, torch.float64) and not S.requires_grad):
        return op(v, coef, S.detach().to(v.dtype), float(eps))[0]
    return pdo_filter_reference(v, coef, S, eps)


GENERATED_CHUNK_BYTES = 2 ** 22     # coefficients of this many bytes at a time (one 28x28 image of the MNIST
                                    # models: 1200 x 784 floats; the chunk stays in this CPU's 2 MB L2 / L3)


class _GeneratedPDOFilter(torch.autograd.Function):
    """``pdo_filter(v, w @ h, S, eps)`` with the generator's GEMM fused in, a chunk of images at a time: the
    ``(B, g, d, 15, H, W)`` coefficients (1200 values per pixel in the quotient model) and their gradient are
    never held whole, only one chunk in a reused buffer that stays in cache; the backward regenerates each
    chunk's coefficients from the saved ``h`` (one more GEMM) instead of keeping them. Every chunk's output
    and gradients are written in place into the whole tensors (no per-chunk allocation or copy)."""

    @staticmethod
    def forward(ctx, v, h, w, S, eps, chunk_bytes):
        # v (B, P, g, d, H, W); h (B, s, ci, HW); w (s, R, ci) with s R = g d A; S (A, T) or (d, A, T)
        B, P, g, d, H, W = v.shape
        s, R, _ = w.shape
        A = S.shape[-2]
        ext = fused_pdo_extension()
        y = torch.empty_like(v)
        n = v.new_empty((B, g, H, W))
        chunks = _chunks(B, s * R * H * W * v.element_size(), chunk_bytes)
        cbuf = v.new_empty((chunks[0][1] - chunks[0][0], s, R, H * W))              # (nb, s, R, HW)
        for b0, b1 in chunks:
            c = _generate(w, h, b0, b1, cbuf)
            ext.forward_out(v[b0:b1], c.view(b1 - b0, g, d, A, H, W), S, eps, y[b0:b1], n[b0:b1])
        ctx.save_for_backward(v, h, w, S, n, y)
        ctx.eps, ctx.chunk_bytes = eps, chunk_bytes
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        v, h, w, S, n, y = ctx.saved_tensors
        B, P, g, d, H, W = v.shape
        s, R, ci = w.shape
        A = S.shape[-2]
        need_v, need_h, need_w = ctx.needs_input_grad[:3]
        gy = gy.contiguous()
        ext = fused_pdo_extension()
        gv = torch.empty_like(v) if need_v else None
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros_like(w) if need_w else None
        wt = w.transpose(1, 2)                                                      # (s, ci, R)
        chunks = _chunks(B, s * R * H * W * v.element_size(), ctx.chunk_bytes)
        nb = chunks[0][1] - chunks[0][0]
        cbuf = v.new_empty((nb, s, R, H * W))
        gcbuf = v.new_empty((nb, s, R, H * W)) if (need_h or need_w) else None
        for b0, b1 in chunks:
            k = b1 - b0
            c = _generate(w, h, b0, b1, cbuf)
            gc = gcbuf[:k] if gcbuf is not None else None
            ext.backward_out(v[b0:b1], c.view(k, g, d, A, H, W), S, n[b0:b1], y[b0:b1], gy[b0:b1],
                             gv[b0:b1] if need_v else None, gc.view(k, g, d, A, H, W) if gc is not None else None)
            for i in range(k):
                if need_h:                                                          # (s, ci, HW), in place
                    torch.bmm(wt, gc[i], out=gh[b0 + i])
                if need_w:
                    gw.baddbmm_(gc[i], h[b0 + i].transpose(1, 2))                  # (s, R, ci)
        return gv, gh, gw, None, None, None


def _generate(w, h, b0, b1, cbuf):
    """Images ``b0:b1``'s coefficients ``w @ h`` into ``cbuf[:b1 - b0]`` (``(n, s, R, HW)``), one batched GEMM per
    image (batch: the ``s`` generator groups)."""
    for i in range(b1 - b0):
        torch.bmm(w, h[b0 + i], out=cbuf[i])
    return cbuf[:b1 - b0]


def generated_pdo_filter(v: torch.Tensor, h: torch.Tensor, w: torch.Tensor, S: torch.Tensor, eps: float, *,
                         chunk_bytes: int = GENERATED_CHUNK_BYTES) -> torch.Tensor:
    """:func:`pdo_filter` of ``v (B, P, g, d, H, W)`` with the coefficients the Neural-ePDO generator makes from
    the hidden features ``h (B, s ci, H, W)``: ``coef = w @ h`` per generator group (``w (s, R, ci)``,
    ``s R = g d A``; the 1x1 conv ``conv1x1(h, w.view(s R, ci, 1, 1), groups=s)``), generated a chunk of
    images at a time inside the fused filter on the CPU (:class:`_GeneratedPDOFilter`): the layer never holds
    the coefficients, nor their gradient, whole. Elsewhere (other devices, ``torch.compile``, :func:`kit.export`,
    :func:`kit.kernels.reference_kernels`) the coefficients are generated whole and :func:`pdo_filter` applies
    them: the same operator."""
    B, P, g, d, H, W = v.shape
    if h.dim() != 4 or w.dim() != 3 or h.shape[0] != B or tuple(h.shape[2:]) != (H, W) \
            or h.shape[1] != w.shape[0] * w.shape[2] or w.shape[0] * w.shape[1] != g * d * S.shape[-2] \
            or S.dim() not in (2, 3) or (S.dim() == 3 and S.shape[0] != d):
        raise ValueError(f"generated_pdo_filter needs h (B, s ci, H, W) and w (s, R, ci) with s R = g d A for v "
                         f"(B, P, g, d, H, W) and S (.., A, T); got v {tuple(v.shape)}, h {tuple(h.shape)}, "
                         f"w {tuple(w.shape)}, S {tuple(S.shape)}")
    s, R, ci = w.shape
    op = None if _compat.is_compiling() else fused_op()
    if (op is None or _compat.EXPORTING or _compat.REFERENCE_KERNELS or v.device.type != "cpu"
            or h.device.type != "cpu" or len({v.dtype, h.dtype, w.dtype}) != 1
            or v.dtype not in (torch.float32, torch.float64) or S.requires_grad):
        from ..layers.base import conv1x1
        coef = conv1x1(h, w.reshape(s * R, ci, 1, 1), groups=s)                     # (B, g d A, H, W)
        return pdo_filter(v, coef.view(B, g, d, S.shape[-2], H, W), S, eps)
    return _GeneratedPDOFilter.apply(v.contiguous(), h.reshape(B, s, ci, H * W).contiguous(), w.contiguous(),
                                     S.detach().to(v.dtype).contiguous(), float(eps), int(chunk_bytes))
