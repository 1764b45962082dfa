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

:func:`pdo_filter` is what the layer calls: the extension on the CPU, the reference elsewhere and
under ``torch.compile``.
"""
from __future__ import annotations

import functools

import torch

from .._compat import is_compiling
from .aggregate import build_extension, dynamic_aggregate

__all__ = ["pdo_filter", "pdo_filter_reference", "fused_pdo_extension"]


def _check(v: torch.Tensor, coef: torch.Tensor, S: torch.Tensor):
    if v.dim() != 6 or coef.dim() != 6 or S.dim() != 2 or coef.shape[0] != v.shape[0] \
            or tuple(coef.shape[1:3]) != tuple(v.shape[2:4]) or coef.shape[3] != S.shape[0] \
            or tuple(coef.shape[-2:]) != tuple(v.shape[-2:]):
        raise ValueError(f"pdo_filter needs v (B, P, g, d, H, W), coef (B, g, d, A, H, W) and S (A, T); got "
                         f"{tuple(v.shape)}, {tuple(coef.shape)} and {tuple(S.shape)}")


@functools.lru_cache(maxsize=1)
def fused_pdo_extension():
    """The compiled fused PDO filter (``csrc/epdo_stencils.cpp``), or ``None`` (the reference is used)."""
    return build_extension("eqkit_epdo_stencils", "epdo_stencils.cpp")


def pdo_filter_reference(v: torch.Tensor, coef: torch.Tensor, S: torch.Tensor, eps: float) -> torch.Tensor:
    """The operator in plain PyTorch (see the module docstring): ``(B, P, g, d, H, W)``."""
    _check(v, coef, S)
    B, P, g, d, H, W = v.shape
    A, T = S.shape
    k = torch.matmul(S.T.to(coef.dtype), coef.reshape(B, g, d, A, H * W))        # (B, g, d, T, HW)
    n = torch.linalg.vector_norm(k, 1, dim=(2, 3), keepdim=True) + eps          # (B, g, 1, 1, HW)
    vj = v.transpose(1, 2).reshape(B, g * P, d, H, W)                            # j-major: g slices of P fields
    y = dynamic_aggregate(vj, k.view(B, g, d, T, H, W))                          # (B, g P, d, H, W)
    y = y.view(B, g, P, d, H, W) / n.view(B, g, 1, 1, H, W)
    return y.transpose(1, 2).contiguous()                                        # (B, P, g, d, H, W)


class _FusedPDOFilter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, coef, S, eps):
        y, n = fused_pdo_extension().forward(v, coef, S, eps)
        ctx.save_for_backward(v, coef, S, n, y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        v, coef, S, n, y = ctx.saved_tensors
        gv, gc = fused_pdo_extension().backward(v, coef, S, n, y, gy, ctx.needs_input_grad[0],
                                                ctx.needs_input_grad[1])
        return (gv if ctx.needs_input_grad[0] else None, gc if ctx.needs_input_grad[1] else None, None, None)


def pdo_filter(v: torch.Tensor, coef: torch.Tensor, S: torch.Tensor, eps: float) -> torch.Tensor:
    """The normalised per-pixel PDO filter (module docstring): ``(B, P, g, d, H, W)``. The fused
    extension on the CPU (float32 / float64, ``S`` a constant), else :func:`pdo_filter_reference`."""
    if is_compiling():
        return pdo_filter_reference(v, coef, S, eps)
    _check(v, coef, S)
    if (v.device.type == "cpu" and coef.device.type == "cpu" and v.dtype == coef.dtype
            and v.dtype in (torch.float32, torch.float64) and not S.requires_grad
            and fused_pdo_extension() is not None):
        return _FusedPDOFilter.apply(v.contiguous(), coef.contiguous(), S.detach().to(v.dtype), float(eps))
    return pdo_filter_reference(v, coef, S, eps)
