"""Element-wise dropout whose random mask costs one hash per element, not one ``bernoulli_`` draw.

What it is: ``dropout(x, p, training)`` has ``F.dropout``'s distribution (each element kept with probability
``1 - p``, to 6e-8, and scaled by ``1 / (1 - p)``) but draws its mask from a counter-based stream: element ``i``
of a call is kept when a 64-bit hash (MurmurHash3's finaliser) of ``seed + i * golden ratio`` clears a
threshold, with ``seed`` drawn from torch's default generator (so ``torch.manual_seed`` and a checkpoint's RNG
state reproduce it). The backward recomputes the mask from ``(seed, i)``: nothing but the seed is kept. On this
CPU aten's ``bernoulli_`` takes about 6 ns an element: in ``e4-mnist-normal``'s training step the five dropout
layers drew 22 ms of masks (figures/speed.md, session 14); the hash runs vectorised in one pass
(``csrc/dropout.cpp``). :func:`dropout_mask` is the same stream in plain PyTorch (the reference in tests).

What it is not: aten's random stream (a model trained with it does not draw ``F.dropout``'s masks), nor a GPU
kernel. On other devices and dtypes, under ``torch.compile`` / :func:`kit.export` and inside
:func:`kit.kernels.reference_kernels` it is ``F.dropout``.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import _compat
from .aggregate import build_extension

__all__ = ["dropout", "dropout_mask", "dropout_extension"]

_GOLDEN = 0x9E3779B97F4A7C15
_M1, _M2 = 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53
_MASK64 = (1 << 64) - 1


@functools.lru_cache(maxsize=1)
def dropout_extension():
    """The compiled counter-based dropout (``csrc/dropout.cpp``), or ``None`` (``F.dropout`` is used)."""
    return build_extension("eqkit_dropout", "dropout.cpp")


def _threshold(p: float) -> int:
    import math
    return math.ceil(p * 2 ** 24)


def dropout_mask(n: int, seed: int, p: float) -> torch.Tensor:
    """The keep mask (bool, ``n`` elements) of seed ``seed``: the stream of ``csrc/dropout.cpp`` written with
    int64 tensor ops (wrapping products; logical shifts as arithmetic ones masked). For tests; slow."""
    def u64(v: int) -> torch.Tensor:                        # an unsigned 64-bit constant as its int64 bit pattern
        return torch.tensor(v - (1 << 64) if v >= 1 << 63 else v, dtype=torch.int64)

    def shr(k: torch.Tensor, s: int) -> torch.Tensor:       # logical right shift
        return (k >> s) & ((1 << (64 - s)) - 1)

    i = torch.arange(n, dtype=torch.int64)
    k = u64(seed & _MASK64) + i * u64(_GOLDEN)
    k = k ^ shr(k, 33)
    k = k * u64(_M1)
    k = k ^ shr(k, 33)
    k = k * u64(_M2)
    k = k ^ shr(k, 33)
    return shr(k, 40) >= _threshold(p)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seed, p):
        ctx.seed, ctx.p = seed, p
        return dropout_extension().apply(x, seed, p)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        return dropout_extension().apply(gy.contiguous(), ctx.seed, ctx.p), None, None


def _fused(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not _compat.REFERENCE_KERNELS
            and not _compat.is_compiling() and not _compat.dispatch_mode_active()
            and dropout_extension() is not None)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` in distribution, with the counter-based mask of the module docstring on
    the CPU (float32 / float64, eager); ``F.dropout`` elsewhere. One draw from torch's default generator per
    call (the seed)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1), got {p!r}")
    if not training or p == 0.0:
        return x
    if not _fused(x):
        return F.dropout(x, p, training)
    seed = int(torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), dtype=torch.int64))
    return _Dropout.apply(x.contiguous(), seed, float(p))
