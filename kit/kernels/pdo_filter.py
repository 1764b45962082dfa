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

__all__ = ["pdo_filter", "pdo_filter_reference", "fused_pdo_extension", "fused_op"]


def _check(v: torch.Tensor, coef: torch.Tensor, S: torch.Tensor):
    if v.dim() != 6 or coef.dim() != 6 or S.dim() not in (2, 3) or coef.shape[0] != v.shape[0] \
            or tuple(coef.shape[1:3]) != tuple(v.shape[2:4]) or coef.shape[3] != S.shape[-2] \
            or (S.dim() == 3 and S.shape[0] != v.shape[3]) or tuple(coef.shape[-2:]) != tuple(v.shape[-2:]):
        raise ValueError(f"pdo_filter needs v (B, P, g, d, H, W), coef (B, g, d, A, H, W) and S (A, T) or one bank "
                         f"per component (d, A, T); got {tuple(v.shape)}, {tuple(coef.shape)} and {tuple(S.shape)}")


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
