"""Dynamic (per-pixel) depthwise filtering, the memory-bound core of E4-Net (He et al., NeurIPS 2021)
and of the Neural ePDOs (He et al., ICLR 2023): ``y[b, s, c, g, x] = sum_t kern[b, s, g, t, x] *
v[b, s, c, g, x + t]``, zero "same" padding.

Four formulations of one operator (tested equal, float64):

* :func:`dynamic_aggregate`: what the layers call. On the CPU the fused C++/OpenMP extension
  (``csrc/aggregate.cpp``, :func:`fused_extension`, built by ``make install``), under
  ``torch.compile`` the traceable :func:`dynamic_aggregate_functional`, else the tap loop;
* :func:`dynamic_aggregate_taps`: the reference tap loop with in-place accumulation and a
  hand-written backward (nothing ``K^2`` times the size of ``v`` is materialised);
* :func:`dynamic_aggregate_unfold`: the official ``F.unfold`` formulation (for before/after
  measurements).

:func:`generated_aggregate` is E4's use of it: on the CPU one C++ operator (``csrc/e4_fused.cpp``,
:func:`e4_extension`) generates the kernels ``b + w @ relu(z)`` of one (image, orientation) plane in cache
and applies them there; they are never held whole nor kept for the backward (which regenerates them).
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import platform
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import _compat
from .._compat import is_compiling

def _cpu_tag() -> str:
    """A short tag of this CPU's instruction sets: the extensions are built with ``-march=native``, so a
    build is only ever loaded on the kind of CPU that compiled it (e.g. a home folder shared by a cluster)."""
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


# -march=native: the C++ loops vectorise with the CPU's widest units (AVX2 / AVX-512: 1.3-1.7x the default
# SSE2 build on this machine); -ffp-contract=off: no fused multiply-adds, so every product and sum rounds
# as in aten and the plain-PyTorch path (kit.export, torch.compile) gives the aggregation bit for bit the same
# output. (E4's fused generator, csrc/e4_fused.cpp, is built with fused multiply-adds: equal to ~1e-15 in float64.)
# EQKIT_CFLAGS replaces both.
EXTRA_CFLAGS = os.environ.get("EQKIT_CFLAGS", "-march=native -ffp-contract=off").split()

__all__ = ["dynamic_aggregate", "dynamic_aggregate_taps", "dynamic_aggregate_functional",
           "dynamic_aggregate_unfold", "generated_aggregate", "kernel_layout", "hidden_layout", "fused_extension",
           "e4_extension", "build_extension"]


def _shapes(v: torch.Tensor, kern: torch.Tensor):
    B, C, G, H, W = v.shape
    S, KK = kern.shape[1], kern.shape[3]
    K = math.isqrt(KK)
    if kern.dim() != 6 or K * K != KK or K % 2 == 0 or kern.shape[0] != B or kern.shape[2] != G \
            or tuple(kern.shape[-2:]) != (H, W) or C % S:
        raise ValueError(f"dynamic aggregation needs v (B, C, G, H, W) and kernels (B, S, G, K*K, H, W) with "
                         f"odd K and S dividing C; got {tuple(v.shape)} and {tuple(kern.shape)}")
    return B, C, G, H, W, S, C // S, K


def _tap(t: int, K: int, H: int, W: int):
    """Tap ``t`` (row-major in the KxK window) as a slice of the padded map: rows, columns."""
    i, j = divmod(t, K)
    return slice(i, i + H), slice(j, j + W)


class _DynamicAggregation(torch.autograd.Function):
    """``y[b, s, c, g, x] = sum_t kern[b, s, g, t, x] * v[b, s, c, g, x + t]`` by a loop over taps.

    Fastest when every tap of ``kern`` is made of whole contiguous ``H x W`` planes (the layout
    :meth:`E4Conv.generate_kernels` returns); any layout is correct. The kernel gradient is written
    in the kernels' own layout.
    """

    @staticmethod
    def forward(ctx, v, kern):
        B, C, G, H, W, S, cps, K = _shapes(v, kern)
        p = K // 2
        vp = F.pad(v, (p, p, p, p)).view(B, S, cps, G, H + 2 * p, W + 2 * p)       # zero "same" padding
        kt = kern.permute(3, 0, 1, 2, 4, 5)                                        # (KK, B, S, G, H, W) view
        y = torch.empty(B, S, cps, G, H, W, dtype=v.dtype, device=v.device)
        r, c = _tap(0, K, H, W)
        torch.mul(kt[0].unsqueeze(2), vp[..., r, c], out=y)
        for t in range(1, K * K):
            r, c = _tap(t, K, H, W)
            y.addcmul_(kt[t].unsqueeze(2), vp[..., r, c])                          # (B, S, cps, G, H, W)
        ctx.save_for_backward(vp, kern)
        return y.view(B, C, G, H, W)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        vp, kern = ctx.saved_tensors
        kt = kern.permute(3, 0, 1, 2, 4, 5)                                        # (KK, B, S, G, H, W) view
        B, S, cps, G, Hp, Wp = vp.shape
        K = math.isqrt(kt.shape[0])
        p = K // 2
        H, W = Hp - 2 * p, Wp - 2 * p
        gy = gy.reshape(B, S, cps, G, H, W)
        gv = gk = None
        if ctx.needs_input_grad[0]:                        # scatter every tap back: grad_v(x + t) += k_t(x) gy(x)
            gvp = torch.zeros_like(vp)
            for t in range(K * K):
                r, c = _tap(t, K, H, W)
                gvp[..., r, c].addcmul_(gy, kt[t].unsqueeze(2))
            gv = gvp[..., p:p + H, p:p + W].reshape(B, S * cps, G, H, W)
        if ctx.needs_input_grad[1]:                        # grad_k_t(x) = sum over the slice's channels
            gk = torch.empty_like(kern)                    # the kernels' own memory layout: no copy upstream
            gkt = gk.permute(3, 0, 1, 2, 4, 5)                                     # (KK, B, S, G, H, W) view
            for t in range(K * K):
                r, c = _tap(t, K, H, W)
                vt = vp[..., r, c]                                                 # (B, S, cps, G, H, W)
                # one thread: in-place multiply-adds over the slice's channels (no temporaries, fastest);
                # several threads: fewer, larger ops (each op is a parallel region with its own barrier)
                if cps <= 2 or (cps <= 16 and torch.get_num_threads() == 1):
                    torch.mul(gy[:, :, 0], vt[:, :, 0], out=gkt[t])
                    for i in range(1, cps):
                        gkt[t].addcmul_(gy[:, :, i], vt[:, :, i])
                else:
                    torch.sum(gy * vt, dim=2, out=gkt[t])
        return gv, gk


def build_extension(name: str, source: str, *, fma: bool = False):
    """Compile ``kit/kernels/csrc/<source>`` into torch's extension cache (``TORCH_EXTENSIONS_DIR``;
    about a minute, once per CPU kind) and return the module, or ``None`` where it cannot be built (a
    warning says why) or ``EQKIT_FUSED=0``. A compiler that refuses ``-march=native`` gets a plain
    ``-O3`` build. ``fma=True``: fused multiply-adds allowed (``-ffp-contract=fast``), for kernels that
    need not round like aten term by term (the Neural-ePDO filter, the isotypic basis changes: tested
    against their references to 1e-12 in float64); E4's aggregation keeps :data:`EXTRA_CFLAGS`."""
    if os.environ.get("EQKIT_FUSED", "1") == "0":
        return None
    src = Path(__file__).resolve().parent / "csrc" / source
    error = None
    flags = EXTRA_CFLAGS
    if fma and "EQKIT_CFLAGS" not in os.environ:
        flags = ["-march=native", "-ffp-contract=fast"]
    for extra, tag in ((flags, _cpu_tag() + ("f" if fma else "")), ([], "generic")):
        try:
            from torch.utils.cpp_extension import load
            return load(name=f"{name}_{tag}", sources=[str(src)], extra_cflags=["-O3", "-fopenmp"] + extra,
                        extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:  # noqa: BLE001 -- any build failure falls back to the plain-PyTorch path
            error = e
    warnings.warn(f"eqkit: the fused {source} could not be built ({type(error).__name__}: "
                  f"{str(error).strip().splitlines()[-1][:200] if str(error).strip() else ''}); using the plain "
                  f"PyTorch path (correct, slower). Install a C++ compiler and `pip install ninja` to enable it.")
    return None


@functools.lru_cache(maxsize=1)
def fused_extension():
    """The compiled fused aggregation (``kit/kernels/csrc/aggregate.cpp``; :func:`build_extension`),
    or ``None`` (the tap loop is used)."""
    return build_extension("eqkit_aggregate", "aggregate.cpp")


class _FusedAggregation(torch.autograd.Function):
    """:class:`_DynamicAggregation` through the C++ extension (same products, same tap order)."""

    @staticmethod
    def forward(ctx, v, kern):
        B, C, G, H, W, S, cps, K = _shapes(v, kern)
        v6 = v.reshape(B, S, cps, G, H, W)
        if v6.stride(-1) != 1:
            v6 = v6.contiguous()
        if kern.stride(-1) != 1 or torch.empty_like(kern).stride() != kern.stride():
            kern = kern.contiguous()                # (a sliced view: its gradient needs a dense layout)
        ctx.save_for_backward(v6, kern)
        return fused_extension().forward(v6, kern).view(B, C, G, H, W)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        v6, kern = ctx.saved_tensors
        B, S, cps, G, H, W = v6.shape
        gv, gk = fused_extension().backward(v6, kern, gy.reshape(B, S, cps, G, H, W),
                                            ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return (gv.view(B, S * cps, G, H, W) if ctx.needs_input_grad[0] else None,
                gk if ctx.needs_input_grad[1] else None)


@functools.lru_cache(maxsize=1)
def e4_extension():
    """The compiled E4 operator with its generator fused in (``csrc/e4_fused.cpp``; :func:`build_extension`,
    fused multiply-adds), or ``None`` (the kernels are generated whole and aggregated)."""
    return build_extension("eqkit_e4_fused", "e4_fused.cpp", fma=True)


class _GeneratedAggregation(torch.autograd.Function):
    """``dynamic_aggregate(v, kernels)`` with ``kernels = b + w @ relu(z)`` generated inside the C++ operator,
    one (image, orientation) plane at a time (``csrc/e4_fused.cpp``): the ``(B, S, G, K*K, H, W)`` kernels never
    reach memory, nor are they saved for the backward, which regenerates them from the saved ``z``; the ReLU
    is applied (and differentiated) there too. Same products as generating all kernels and then aggregating
    (summed in other orders, with fused multiply-adds)."""

    @staticmethod
    def forward(ctx, v, z, w, b, K):
        # v (B, C, G, H, W); z (B, Ch, G, H, W); w (G, K*K*S, Ch); b (G, K*K*S, 1), rows tap-major (t, s)
        B, C, G, H, W = v.shape
        S = w.shape[1] // (K * K)
        v6 = v.reshape(B, S, C // S, G, H, W).contiguous()                          # (B, S, cps, G, H, W)
        z, w, b = z.contiguous(), w.contiguous(), b.contiguous()
        ctx.save_for_backward(v6, z, w, b)
        ctx.K = K
        return e4_extension().forward(v6, z, w, b, K).view(B, C, G, H, W)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        v6, z, w, b = ctx.saved_tensors
        B, S, cps, G, H, W = v6.shape
        need = ctx.needs_input_grad[:4]
        gv, gz, gw, gb = e4_extension().backward(v6, z, w, b, gy.reshape(v6.shape), ctx.K, *need)
        return (gv.view(B, S * cps, G, H, W) if need[0] else None), (gz if need[1] else None), \
            (gw if need[2] else None), (gb if need[3] else None), None


def hidden_layout(z: torch.Tensor) -> torch.Tensor:
    """The generator's hidden features ``relu(z)`` of fields ``z (B, Ch, G, H, W)`` as the ``(G, Ch, B*H*W)``
    matrix one batched matmul per group element turns into kernels (the ReLU on the layout copy: one
    hidden-sized tensor is kept for the backward, not two)."""
    B, Ch, G, H, W = z.shape
    return F.relu(z.permute(2, 1, 0, 3, 4).reshape(G, Ch, B * H * W))              # (G, Ch, B*H*W)


def kernel_layout(k: torch.Tensor, K: int, S: int, H: int, W: int) -> torch.Tensor:
    """The one layout of generated kernels: a ``(G, K*K*S, n*H*W)`` buffer (rows tap-major ``(t, s)``, as
    :meth:`kit.layers.e4.E4Conv.generator_inputs` steers them) viewed as the ``(n, S, G, K*K, H, W)``
    kernels :func:`dynamic_aggregate` takes; every tap is a block of whole ``H x W`` planes."""
    G, _, N = k.shape
    return k.view(G, K * K, S, N // (H * W), H, W).permute(3, 2, 0, 1, 4, 5)


def generated_aggregate(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, b: torch.Tensor, *,
                        kernel_size: int) -> torch.Tensor:
    """:func:`dynamic_aggregate` of ``v (B, C, G, H, W)`` with the kernels ``b + w @ relu(z)`` that E4's generator
    makes (``z (B, Ch, G, H, W)`` its normalised hidden fields before the ReLU, ``w (G, K*K*S, Ch)`` /
    ``b (G, K*K*S, 1)`` its steered last map, rows tap-major ``(t, s)``). On the CPU one C++ operator
    (``csrc/e4_fused.cpp``) generates the kernels of one (image, orientation) plane in cache and applies them
    there: the ``B x S x G x K*K x H x W`` kernels are never held whole, and the backward regenerates them
    instead of keeping them. Elsewhere (GPU, ``torch.compile``, :func:`kit.kernels.reference_kernels`, inside a
    dispatch mode such as ``FlopCounterMode``, which then counts the generator's MACs) the
    kernels are generated whole (:func:`hidden_layout`, one batched matmul) and aggregated by
    :func:`dynamic_aggregate`."""
    B, C, G, H, W = v.shape
    KK = kernel_size * kernel_size
    if z.dim() != 5 or z.shape[0] != B or tuple(z.shape[2:]) != (G, H, W) or w.dim() != 3 or w.shape[0] != G \
            or w.shape[2] != z.shape[1] or w.shape[1] % KK or tuple(b.shape) != (G, w.shape[1], 1) \
            or C % (w.shape[1] // KK):
        raise ValueError(f"generated_aggregate needs v (B, C, G, H, W), z (B, Ch, G, H, W), w (G, K*K*S, Ch) and "
                         f"b (G, K*K*S, 1) with S dividing C; got {tuple(v.shape)}, {tuple(z.shape)}, "
                         f"{tuple(w.shape)}, {tuple(b.shape)} (K={kernel_size})")
    S = w.shape[1] // KK
    if (is_compiling() or _compat.REFERENCE_KERNELS or v.device.type != "cpu" or _compat.dispatch_mode_active()
            or len({v.dtype, z.dtype, w.dtype, b.dtype}) != 1 or v.dtype not in (torch.float32, torch.float64)
            or e4_extension() is None):
        k = torch.baddbmm(b, w, hidden_layout(z))                                   # (G, KK*S, B*H*W)
        return dynamic_aggregate(v, kernel_layout(k, kernel_size, S, H, W))
    return _GeneratedAggregation.apply(v, z, w, b, kernel_size)


def dynamic_aggregate_functional(v: torch.Tensor, kern: torch.Tensor) -> torch.Tensor:
    """The same filtering as one out-of-place sum over the taps, for ``torch.compile``: no
    ``autograd.Function`` and no in-place op, so dynamo traces it whole, AOTAutograd derives the
    backward and inductor fuses the ``K^2`` products (and their neighbours) into one loop."""
    B, C, G, H, W, S, cps, K = _shapes(v, kern)
    p = K // 2
    vp = F.pad(v, (p, p, p, p)).view(B, S, cps, G, H + 2 * p, W + 2 * p)           # zero "same" padding
    y = None
    for t in range(K * K):
        r, c = _tap(t, K, H, W)
        term = kern[:, :, :, t].unsqueeze(2) * vp[..., r, c]                      # (B, S, cps, G, H, W)
        y = term if y is None else y + term
    return y.reshape(B, C, G, H, W)


def dynamic_aggregate(v: torch.Tensor, kern: torch.Tensor) -> torch.Tensor:
    """Involution-like depthwise filtering with per-pixel kernels, "same" zero padding.

    ``v (B, C, G, H, W)``, ``kern (B, S, G, K*K, H, W)`` with ``S`` dividing ``C``: channel ``c`` of
    orientation ``g`` is filtered at pixel ``x`` with kernel ``kern[:, c // (C/S), g, :, x]`` (taps
    row-major over the KxK window centred on ``x``). Returns ``(B, C, G, H, W)``. On the CPU through the
    fused C++ extension (:func:`fused_extension`), else (and under :func:`kit.kernels.reference_kernels`)
    by :func:`dynamic_aggregate_taps`; both keep only ``v`` and ``kern`` for the backward.
    """
    if is_compiling():
        return dynamic_aggregate_functional(v, kern)
    if (not _compat.REFERENCE_KERNELS and v.device.type == "cpu" and kern.device.type == "cpu" and v.dtype == kern.dtype
            and v.dtype in (torch.float32, torch.float64) and fused_extension() is not None):
        _shapes(v, kern)
        return _FusedAggregation.apply(v, kern)
    return _DynamicAggregation.apply(v, kern)


def dynamic_aggregate_taps(v: torch.Tensor, kern: torch.Tensor) -> torch.Tensor:
    """The reference: the same filtering as a loop over the taps with in-place accumulation and a
    hand-written backward (first order): nothing ``K^2`` times the size of ``v`` is materialised."""
    return _DynamicAggregation.apply(v, kern)


def dynamic_aggregate_unfold(v: torch.Tensor, kern: torch.Tensor) -> torch.Tensor:
    """The same result through ``F.unfold`` (the official formulation): materialises ``K^2`` copies of
    ``v`` and their product with the kernels. Kept as a reference and for before/after measurements."""
    B, C, G, H, W, S, cps, K = _shapes(v, kern)
    u = F.unfold(v.flatten(1, 2), K, padding=K // 2)                               # (B, C*G*KK, H*W)
    u = u.view(B, S, cps, G, K * K, H, W)                                          # (B, S, cps, G, KK, H, W)
    return (u * kern.unsqueeze(2)).sum(dim=4).view(B, C, G, H, W)                   # (B, C, G, H, W)
