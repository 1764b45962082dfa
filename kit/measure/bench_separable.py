"""Speed and memory of separable vs non-separable group convolutions at equal widths.

    python -m kit.measure.bench_separable                      # one 32 -> 32 layer, 28x28, N = 4, 8, 16, CPU
    python -m kit.measure.bench_separable --level model        # the whole small / full ResNets
    python -m kit.measure.bench_separable --device cuda        # on a GPU

For each variant: the median wall time of one forward + backward pass (kernel synthesis by the SIREN
included, as in training), the bytes of tensors saved for the backward pass (exact, via
``torch.autograd.graph.saved_tensors_hooks``), the peak memory during the pass (CPU: resident set
size sampled every millisecond by a background thread, above the level before the pass; CUDA:
``torch.cuda.max_memory_allocated``), and the multiply-accumulates of the convolutions (derived:
non-separable ``HW N C N O k^2``, separable ``HW (N C N O + N O k^2)``, depthwise-separable
``HW (C O + N O N k^2)``). Ratios are against the non-separable variant.

CPU timings are not representative of the paper's GPU speed-ups (spec section 8: the CPU backward of
a depthwise convolution is slow); measure speed-ups on a GPU where one is available.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from ..layers.separable import VARIANTS, LieGroupConv
from ..lie import SE2, LieGrid, Sim2
from .timing import RSSPeak, peak_memory, timed

__all__ = ["measure", "layer_macs", "benchmark", "with_ratios", "table", "main"]


def measure(module: torch.nn.Module, x: torch.Tensor, *, repeats: int = 3, warmup: int = 1,
            peak: bool = True) -> dict:
    """Median forward+backward time (s), saved-for-backward bytes and peak memory (bytes) of
    ``module(x).square().mean().backward()`` in training mode (``peak_bytes`` is None when
    ``peak=False``; on CPU prefer :func:`_peak_in_fresh_process`)."""
    module.train()
    device = x.device

    def step():
        module.zero_grad(set_to_none=True)
        module(x).square().mean().backward()

    times = timed(step, repeats=repeats, warmup=warmup, device=device)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    module.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x).square().mean()
    y.backward()
    del y
    if not peak:
        peak = None
    elif device.type == "cuda":
        peak = peak_memory(step, device=device)
    else:
        module.zero_grad(set_to_none=True)
        with RSSPeak() as p:
            step()
        peak = p.peak
    return {"time_s": statistics.median(times), "saved_bytes": saved[0], "peak_bytes": peak}


def _build(level, variant, rotations, scales, width, batch, size, kernel_size, seed=0):
    grid = SE2(rotations) if scales == 1 else Sim2(rotations, scales)
    torch.manual_seed(seed)
    if level == "layer":
        m = LieGroupConv(grid=grid, in_fields=width, out_fields=width, kernel_size=kernel_size, variant=variant)
        x = torch.randn(batch, width, grid.dim, size, size)
    else:
        from ..models.separable import SepGResNet
        m = SepGResNet(grid=grid, variant=variant, widths=(width, width, 2 * width), kernel_size=kernel_size)
        x = torch.randn(batch, 1, 28, 28)
    return grid, m, x


def _peak_child(args, threads):
    torch.set_num_threads(threads)
    _, m, x = _build(*args)
    m.train()
    with RSSPeak() as p:
        m(x).square().mean().backward()
    return p.peak


def _peak_in_fresh_process(args, threads: int) -> int:
    """Peak RSS (bytes) of one forward+backward pass, measured in a freshly spawned process."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_peak_child, (args, threads))


def layer_macs(variant: str, grid: LieGrid, c_in: int, c_out: int, k: int, hw: int) -> int:
    """Multiply-accumulates of one group conv on ``hw`` output pixels (derived; SIREN excluded)."""
    D = grid.dim
    if variant == "nonseparable":
        return hw * D * c_out * D * c_in * k * k
    if variant == "separable":
        return hw * (D * c_out * D * c_in + D * c_out * k * k)
    if variant == "dseparable":
        return hw * (c_in * c_out + D * c_out * D * k * k)
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def benchmark(*, rotations=(4, 8, 16), scales: int = 1, width: int = 32, size: int = 28, batch: int = 8,
              kernel_size: int = 7, variants=VARIANTS, level: str = "layer", device: str = "cpu",
              repeats: int = 3, seed: int = 0) -> list[dict]:
    """Measure every variant at every number of rotations; returns rows (see :func:`with_ratios`).

    ``level="layer"``: one ``width -> width`` group conv on ``(batch, width, N*S, size, size)``.
    ``level="model"``: the registered ResNets (``{sep,nonsep,dsep}-se2-mnist``, with ``width`` widths
    ``(width, width, 2 width)``) on ``(batch, 1, 28, 28)``.
    """
    if level not in ("layer", "model"):
        raise ValueError(f"level must be 'layer' or 'model', got {level!r}")
    rows = []
    for n in rotations:
        for v in variants:
            args = (level, v, n, scales, width, batch, size, kernel_size, seed)
            grid, m, x = _build(*args)
            macs = batch * layer_macs(v, grid, width, width, kernel_size, size * size) if level == "layer" else None
            m, x = m.to(device), x.to(device)
            cpu = torch.device(device).type == "cpu"
            r = measure(m, x, repeats=repeats, peak=not cpu)
            if cpu:
                r["peak_bytes"] = _peak_in_fresh_process(args, torch.get_num_threads())
            rows.append({"group": grid.name, "rotations": n, "variant": v, "level": level, "width": width,
                         "batch": batch, "size": size, "device": str(device),
                         "params": sum(p.numel() for p in m.parameters()), "macs": macs, **r})
            del m, x
    return with_ratios(rows)


def with_ratios(rows: list[dict]) -> list[dict]:
    """Add ``*_ratio`` = non-separable / variant (> 1: the variant is cheaper) per group setting."""
    ref = {(r["group"], r["level"]): r for r in rows if r["variant"] == "nonseparable"}
    for r in rows:
        b = ref.get((r["group"], r["level"]))
        for key in ("time_s", "saved_bytes", "peak_bytes", "macs"):
            ok = b is not None and r.get(key) and b.get(key)
            r[key.split("_")[0] + "_ratio"] = b[key] / r[key] if ok else None
    return rows


def table(rows: list[dict]) -> str:
    """Fixed-width table of :func:`benchmark` rows."""
    f = lambda v, fmt: format(v, fmt) if v is not None else "-"
    lines = [f"{'group':24s} {'variant':13s} {'params':>8s} {'fwd+bwd s':>10s} {'x faster':>8s} "
             f"{'saved MB':>9s} {'x less':>7s} {'peak MB':>8s} {'x less':>7s} {'GMAC':>8s} {'x fewer':>7s}"]
    for r in rows:
        lines.append(f"{r['group']:24s} {r['variant']:13s} {r['params']:8d} {r['time_s']:10.4f} "
                     f"{f(r['time_ratio'], '8.2f')} {r['saved_bytes'] / 2**20:9.1f} {f(r['saved_ratio'], '7.2f')} "
                     f"{r['peak_bytes'] / 2**20:8.1f} {f(r['peak_ratio'], '7.2f')} "
                     f"{f(r['macs'] / 1e9 if r['macs'] else None, '8.2f')} {f(r['macs_ratio'], '7.1f')}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rotations", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--scales", type=int, default=1)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--kernel-size", type=int, default=7)
    p.add_argument("--level", choices=["layer", "model"], default="layer")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = benchmark(rotations=a.rotations, scales=a.scales, width=a.width, size=a.size, batch=a.batch,
                     kernel_size=a.kernel_size, level=a.level, device=a.device, repeats=a.repeats)
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"forward+backward, {a.level}, width {a.width}, batch {a.batch}, {a.size}x{a.size}, k={a.kernel_size}, {dev}")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
