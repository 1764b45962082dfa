"""Batch norm -> ReLU -> field dropout [-> 2 x 2 max pool] as one operator, for the training forward of the kit's
field batch norms (the ``GroupBatchNorm, FieldReLU[, FieldDropout2d][, SpatialPool]`` runs of
:class:`kit.layers.base.EquivariantSequential`).

What it is: the same three modules, in training mode (batch statistics, running statistics updated as
``nn.BatchNorm3d`` does), computed by one C++ pass structure (``csrc/bn_relu.cpp``): statistics (two reads),
then ``max(x alpha + beta, 0) * s`` (one read, one write; pooled: a quarter of the write); the backward
recomputes the ReLU mask (and the pooling's maxima) from ``x`` (two passes). The chain of modules makes three fresh tensors forward and three backward, each a memory pass
(and on this CPU, page faults of a fresh buffer cost about as much as the pass); the Neural-ePDO models spend
about a sixth of their step there. What it is not: an eval-mode path (running statistics: a plain affine) nor
a GPU one; elsewhere, under ``torch.compile``, :func:`kit.export` and :func:`kit.kernels.reference_kernels`,
the modules run one by one. Tested equal to the module chain in float64 to 1e-12 (output, every gradient,
running statistics, dropout draws) in ``tests/test_bn_relu.py``.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from .. import _compat
from .aggregate import build_extension

__all__ = ["bn_relu_extension", "batch_norm_relu", "can_fuse"]


@functools.lru_cache(maxsize=1)
def bn_relu_extension():
    """The compiled fused batch norm -> ReLU (``csrc/bn_relu.cpp``), or ``None`` (the modules run one by one)."""
    return build_extension("eqkit_bn_relu", "bn_relu.cpp")


class _BatchNormReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, s, eps, pool):
        # x (B, C, N), or (B, C, P, H, W) with pool: y (B, C, P, H/2, W/2); w, b (C,); s (B, C) dropout scale or None
        ext = bn_relu_extension()
        if pool:                                                  # idx: each window's maximum (uint8), for the backward
            y, mean, invstd, idx = ext.pool_forward(x, w, b, s, eps)
        else:
            (y, mean, invstd), idx = ext.forward(x, w, b, s, eps), None
        ctx.save_for_backward(x, w, b, s, mean, invstd, idx)
        ctx.mark_non_differentiable(mean, invstd)
        return y, mean, invstd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, _gmean, _ginvstd):
        x, w, b, s, mean, invstd, idx = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad[:3]
        ext = bn_relu_extension()
        if idx is not None:
            dx, dw, db = ext.pool_backward(gy, x, idx, w, b, s, mean, invstd, nx, nw, nb)
        else:
            dx, dw, db = ext.backward(gy, x, w, b, s, mean, invstd, nx, nw, nb)
        return (dx if nx else None), (dw if nw else None), (db if nb else None), None, None, None


def can_fuse(bn: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`batch_norm_relu` may run ``bn`` (an affine ``nn.BatchNorm*d`` tracking running statistics,
    in training mode) on ``x``: a float32 / float64 CPU tensor, eager (not compiling, not exporting), outside
    :func:`kit.kernels.reference_kernels`, with the extension built."""
    return (bn.training and bn.affine and bn.track_running_stats and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64) and bn.weight.dtype == x.dtype
            and not _compat.REFERENCE_KERNELS and not _compat.EXPORTING and not _compat.is_compiling()
            and bn_relu_extension() is not None)


def batch_norm_relu(x: torch.Tensor, bn: nn.Module, *, dropout_p: float = 0.0, pool: bool = False) -> torch.Tensor:
    """``dropout3d(relu(bn(x)), dropout_p)`` in training mode, fused (see the module docstring), then with
    ``pool=True`` a 2 x 2 max pool of stride 2 over the last two axes (``F.max_pool2d(., 2)``; they must be even):
    ``x (B, C, ...)`` with ``C = bn.num_features``; ``bn``'s running statistics and batch counter are updated
    exactly as its own forward would. The dropout draws whole ``(image, channel)`` slices with the same random
    calls as ``F.dropout3d`` (same generator state in, same out). Check :func:`can_fuse` first."""
    if x.dim() < 3 or x.shape[1] != bn.num_features:
        raise ValueError(f"batch_norm_relu needs x (B, {bn.num_features}, ...), got {tuple(x.shape)}")
    if pool and (x.dim() < 4 or x.shape[-1] % 2 or x.shape[-2] % 2):
        raise ValueError(f"batch_norm_relu(pool=True) needs x (B, C, ..., H, W) with H and W even, got {tuple(x.shape)}")
    B, C = x.shape[:2]
    s = None
    if dropout_p > 0:                                             # F.dropout3d's draw: (B, C, 1, 1, 1) Bernoulli
        s = x.new_empty((B, C)).bernoulli_(1 - dropout_p).div_(1 - dropout_p)
    H, W = x.shape[-2:]
    xv = x.contiguous().view(B, C, -1, H, W) if pool else x.contiguous().view(B, C, -1)
    y, mean, invstd = _BatchNormReLU.apply(xv, bn.weight, bn.bias, s, float(bn.eps), bool(pool))
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        f = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        n = x.numel() // C
        var = (1.0 / invstd) ** 2 - bn.eps                           # the biased batch variance
        bn.running_mean.mul_(1 - f).add_(mean.to(bn.running_mean.dtype), alpha=f)
        bn.running_var.mul_(1 - f).add_((var * n / max(n - 1, 1)).to(bn.running_var.dtype), alpha=f)
    return y.view(*x.shape[:-2], H // 2, W // 2) if pool else y.view(x.shape)
