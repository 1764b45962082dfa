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

:func:`generated_aggregate` is E4's use of it on the CPU: the kernels ``b + w @ h`` generated and applied
a chunk of images at a time, never held whole nor kept for the backward (which regenerates them).
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
# output (E4's chunked generator GEMMs may round differently from one whole GEMM: equal to ~1e-16 in float64).
# EQKIT_CFLAGS replaces both.
EXTRA_CFLAGS = os.environ.get("EQKIT_CFLAGS", "-march=native -ffp-contract=off").split()

__all__ = ["dynamic_aggregate", "dynamic_aggregate_taps", "dynamic_aggregate_functional",
           "dynamic_aggregate_unfold", "generated_aggregate", "kernel_layout", "fused_extension", "build_extension"]


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


GENERATED_CHUNK_BYTES = 2 ** 21     # kernels of this many bytes at a time (a few images; stays in cache)


def _chunks(B: int, per_image: int, chunk_bytes: int):
    n = max(1, min(B, chunk_bytes // max(per_image, 1)))
    return [(b0, min(B, b0 + n)) for b0 in range(0, B, n)]


class _GeneratedAggregation(torch.autograd.Function):
    """``dynamic_aggregate(v, kernels)`` with ``kernels = b + w @ h`` generated chunk by chunk of images
    (E4's generator output fused with the aggregation): the ``(B, S, G, K*K, H, W)`` kernels are never
    held whole, nor saved for the backward, which recomputes each chunk's kernels (one small GEMM) from
    the saved ``h``. Same products as generating all kernels and then aggregating; every chunk is
    written in place into the whole output / gradient (no per-chunk allocation or copy)."""

    @staticmethod
    def forward(ctx, v, h, w, b, K, chunk_bytes):
        # v (B, C, G, H, W); h (G, Ch, B*H*W); w (G, K*K*S, Ch); b (G, K*K*S, 1), rows tap-major (t, s)
        B, C, G, H, W = v.shape
        S = w.shape[1] // (K * K)
        v6 = v.reshape(B, S, C // S, G, H, W).contiguous()                          # (B, S, cps, G, H, W)
        ext = fused_extension()
        y = torch.zeros_like(v6)
        for b0, b1 in _chunks(B, w.shape[1] * G * H * W * v.element_size(), chunk_bytes):
            kern = _chunk_kernels(h, w, b, K, S, B, H, W, b0, b1)                   # (n, S, G, KK, H, W)
            ext.forward_out(v6[b0:b1], kern, y[b0:b1])
        ctx.save_for_backward(v6, h, w, b)
        ctx.K, ctx.chunk_bytes = K, chunk_bytes
        return y.view(B, C, G, H, W)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        v6, h, w, b = ctx.saved_tensors
        K = ctx.K
        B, S, cps, G, H, W = v6.shape
        need_v, need_h, need_w, need_b = ctx.needs_input_grad[:4]
        need_k = need_h or need_w or need_b
        gy = gy.reshape(B, S, cps, G, H, W).contiguous()
        ext = fused_extension()
        gv = torch.zeros_like(v6) if need_v else None
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros_like(w) if need_w else None
        gb = torch.zeros_like(b) if need_b else None
        HW, KKS = H * W, w.shape[1]
        wt = w.transpose(1, 2)                                                      # (G, Ch, KK*S)
        for b0, b1 in _chunks(B, KKS * G * HW * v6.element_size(), ctx.chunk_bytes):
            n = b1 - b0
            kern = _chunk_kernels(h, w, b, K, S, B, H, W, b0, b1)                   # (n, S, G, KK, H, W)
            gk = torch.zeros(G, KKS, n * HW, dtype=w.dtype) if need_k else None     # (G, KK*S, n*H*W)
            ext.backward_out(v6[b0:b1], kern, gy[b0:b1], gv[b0:b1] if need_v else None,
                             kernel_layout(gk, K, S, H, W) if need_k else None)
            if need_h:                                                              # into gh's chunk, in place
                _chunk_h(gh, B, HW, b0, b1).baddbmm_(wt, gk, beta=0)
            if need_w:
                gw.baddbmm_(gk, _chunk_h(h, B, HW, b0, b1).transpose(1, 2))
            if need_b:
                gb += gk.sum(-1, keepdim=True)
        return (gv.view(B, S * cps, G, H, W) if need_v else None), gh, gw, gb, None, None


def _chunk_h(h, B, HW, b0, b1):
    G, Ch = h.shape[:2]
    return h.view(G, Ch, B, HW)[:, :, b0:b1].reshape(G, Ch, (b1 - b0) * HW)       # (G, Ch, n*H*W), a view


def kernel_layout(k: torch.Tensor, K: int, S: int, H: int, W: int) -> torch.Tensor:
    """The one layout of generated kernels: a ``(G, K*K*S, n*H*W)`` buffer (rows tap-major ``(t, s)``, as
    :meth:`kit.layers.e4.E4Conv.generator_inputs` steers them) viewed as the ``(n, S, G, K*K, H, W)``
    kernels :func:`dynamic_aggregate` takes; every tap is a block of whole ``H x W`` planes."""
    G, _, N = k.shape
    return k.view(G, K * K, S, N // (H * W), H, W).permute(3, 2, 0, 1, 4, 5)


def _chunk_kernels(h, w, b, K, S, B, H, W, b0, b1):
    """Images ``b0:b1``'s kernels ``(n, S, G, K*K, H, W)``, a view of a ``(G, K*K, S, n, H, W)`` buffer."""
    return kernel_layout(torch.baddbmm(b, w, _chunk_h(h, B, H * W, b0, b1)), K, S, H, W)


def generated_aggregate(v: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, *, kernel_size: int,
                        chunk_bytes: int = GENERATED_CHUNK_BYTES) -> torch.Tensor:
    """:func:`dynamic_aggregate` of ``v (B, C, G, H, W)`` with the kernels ``b + w @ h`` that E4's generator
    makes (``h (G, Ch, B*H*W)`` hidden features, ``w (G, K*K*S, Ch)`` / ``b (G, K*K*S, 1)`` the steered
    generator, rows tap-major ``(t, s)``), generated a chunk of images at a time on the CPU fused path: the
    layer's peak memory no longer holds all ``B x S x G x K*K x H x W`` kernels, and the backward recomputes
    them instead of keeping them. Elsewhere (GPU, ``torch.compile``, :func:`kit.kernels.reference_kernels`)
    the kernels are generated whole and aggregated by :func:`dynamic_aggregate`."""
    G, Ch, N = h.shape
    B, C, G2, H, W = v.shape
    KK = kernel_size * kernel_size
    if G2 != G or N != B * H * W or w.shape[0] != G or w.shape[2] != Ch or w.shape[1] % KK \
            or tuple(b.shape) != (G, w.shape[1], 1) or C % (w.shape[1] // KK):
        raise ValueError(f"generated_aggregate needs v (B, C, G, H, W), h (G, Ch, B*H*W), w (G, K*K*S, Ch) and "
                         f"b (G, K*K*S, 1) with S dividing C; got {tuple(v.shape)}, {tuple(h.shape)}, "
                         f"{tuple(w.shape)}, {tuple(b.shape)} (K={kernel_size})")
    S = w.shape[1] // KK
    if (is_compiling() or _compat.REFERENCE_KERNELS or v.device.type != "cpu" or not h.is_contiguous()
            or len({v.dtype, h.dtype, w.dtype, b.dtype}) != 1 or v.dtype not in (torch.float32, torch.float64)
            or fused_extension() is None):
        k = torch.baddbmm(b, w, h)                                                  # (G, KK*S, B*H*W)
        return dynamic_aggregate(v, kernel_layout(k, kernel_size, S, H, W))
    return _GeneratedAggregation.apply(v, h, w, b, kernel_size, int(chunk_bytes))


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
