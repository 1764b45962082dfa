"""One benchmark across every family of the kit, measured beside escnn's ``R2Conv``.

    python -m kit bench                       # everything, CPU, writes figures/bench/*.json + PNG
    python -m kit bench --only 'p4*'          # a subset (glob over entry names)
    python -m kit bench --device cuda         # on a GPU
    python -m kit bench --list                # the entries
    python -m kit bench --compile             # also every entry under torch.compile (compiled columns)

For the CNN baseline and one representative **layer** and **model** of every family (regular G-CNN,
E4-Net, PDO-eConv, Neural ePDO, Separable G-CNN), and for escnn ``R2Conv`` with regular fields on
C4, D4, C8 and C16 (the ``compare`` extra, ``make compare``), it measures:

* **equivariance error from 0 to 360 degrees** (5-degree steps) with the interpolation floor, by
  :func:`kit.equivariance.error_vs_angle` on real digits; plus the largest error over the group
  elements that are exact on the pixel grid (multiples of 90 degrees, and mirrors for D4), by
  :func:`kit.equivariance.check`. A layer is measured inside a two-layer block ``lift -> ReLU ->
  layer`` (its family's lifting layer first), so that its input is an image that can be rotated by
  any angle; a model is measured on its logits, with batch-norm statistics calibrated on real digits
  (:func:`kit.models.calibrate_batchnorm`; an uncalibrated untrained net barely depends on its input).
* **parameters and MACs per image** (conv / matmul MACs counted by ``FlopCounterMode``, the dynamic
  per-pixel aggregation of E4 and Neural ePDO layers added through the layers' ``dynamic_macs`` hook:
  the kit's one counter, :func:`kit.measure.complexity.count_macs`),
  and the batch-independent MACs of building the kernels from the parameters in a training step.
* **throughput** (images/s) of the forward pass (eval mode, no gradient, cached kernels) and of
  forward + backward (train mode, kernels rebuilt, as in a training step), the median of
  ``repeats`` timed runs after a warm-up, and the **peak memory** of each (CPU: bytes allocated by
  torch, from profiler memory events; CUDA: ``max_memory_allocated``).

Layers run at a matched width of 64 channels (``fields x |G|``) on 28 x 28 inputs with 5 x 5 kernels;
models are the papers' MNIST-rot networks at their own widths (their parameter counts differ).
Every JSON states the device, threads, load average and library versions; a finished entry is kept
and skipped on a re-run with the same settings (``--force`` re-measures), so an interrupted run
loses nothing.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .. import models
from ..equivariance import check, error_vs_angle, float64_twin
from ..fields import FieldType
from ..groups import Group, cyclic, dihedral
from ..layers.base import EquivariantModule, EquivariantSequential, FieldReLU
from ..layers.registry import example_block, families, fields_for
from .._compat import resolve_device
from .._io import REPO_DIR, atomic_write_json, atomic_write_text, name_matches
from .timing import alternated, peak_memory, sync, timed

__all__ = ["Entry", "entries", "angles", "list_entries", "escnn_available", "EscnnBlock", "throughput",
           "measure_entry", "paired_ratio", "run", "load_results", "table_markdown", "comparison_markdown", "error_figure", "speed_figure", "main"]

REPO = REPO_DIR
OUT_DIR = REPO / "figures" / "bench"
def angles(step: float = 5) -> tuple[float, ...]:
    """``0, step, ..., 360`` degrees (``step`` must divide 360, so 90 degrees is on the list when 90 is)."""
    if not step > 0 or abs(360 / step - round(360 / step)) > 1e-9:
        raise ValueError(f"step must be a positive divisor of 360 degrees, got {step!r}")
    n = round(360 / step)
    return tuple(round(i * step, 6) for i in range(n + 1))


ANGLES = angles(5)
WIDTH = 64                     # channels of every benchmarked layer (fields x |G|)
KERNEL = 5
SIZE = 28


# ============================================================================ what is measured
@dataclass(frozen=True)
class Entry:
    """One benchmarked module.

    ``build(width, kernel)`` returns ``(module, block)``: ``module`` is timed and counted (a layer with
    field inputs, or a whole model); ``block`` takes images and is measured for equivariance (for a
    layer: its family's lifting layer, a ReLU, then the layer; for a model: the model itself).
    """

    name: str
    kind: str                 # "layer" | "model"
    family: str
    group: str
    library: str              # "eqkit" | "escnn"
    description: str
    build: Callable = field(repr=False, compare=False)
    counterpart: str | None = None      # the escnn entry measured at the same fields and kernel size


class PlainConv(EquivariantModule):
    """A plain ``Conv2d`` with declared C4 trivial types, so the instrument can measure (and show) that
    a CNN layer is *not* equivariant. ``(B, C_in, H, W) -> (B, C_out, H, W)``."""

    def __init__(self, *, in_channels: int, out_channels: int, kernel_size: int = KERNEL):
        super().__init__()
        C4 = cyclic(4)
        self.in_type, self.out_type = FieldType(C4, "trivial", in_channels), FieldType(C4, "trivial", out_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)

    def _forward(self, x):
        return self.conv(x)


def _cnn_layer(width, k):
    layer = PlainConv(in_channels=width, out_channels=width, kernel_size=k)
    return layer, EquivariantSequential(PlainConv(in_channels=1, out_channels=width, kernel_size=k),
                                        FieldReLU(layer.in_type), layer)


def _family_layer(fam):
    def build(width, k):
        layer, lift = fam.layer(width=width, kernel_size=k)
        return layer, example_block(layer, lift)
    return build


def _model(name, **overrides):
    def build(width, k):
        m = models.create(name, **overrides)
        return m, m
    return build


# ------------------------------------------------------------------------------------- escnn
def escnn_available() -> bool:
    """Whether the optional ``compare`` extra (escnn) is importable."""
    try:
        import escnn  # noqa: F401
        return True
    except Exception:
        return False


class EscnnBlock(EquivariantModule):
    """An escnn module behind the kit's contract: kit field layout in and out.

    escnn's conventions on the grid coincide with the kit's (checked in tests/test_bench.py): its
    C_N element ``k`` acts on images as ``torch.rot90(x, k, dims=(-2, -1))`` (counter-clockwise), its
    D_N element ``(-, 0)`` as the mirror ``x -> -x``, a regular field's channels are indexed by the
    group elements in the kit's order, and ``rho(g) e_h = e_{gh}``. So the adapter only reshapes
    ``(B, C, |G|, H, W) <-> (B, C*|G|, H, W)``.
    """

    def __init__(self, module, in_type: FieldType, out_type: FieldType, escnn_in_type):
        super().__init__()
        self.module, self.in_type, self.out_type, self._etype = module, in_type, out_type, escnn_in_type

    def _forward(self, x):
        from escnn import nn as enn
        y = self.module(enn.GeometricTensor(self.in_type.flatten(x), self._etype)).tensor   # (B, C*|G|, H, W)
        return self.out_type.unflatten(y)                                                    # (B, C, |G|, H, W)


def _escnn_layer(n: int, flip: bool):
    def build(width, k):
        from escnn import gspaces
        from escnn import nn as enn
        gs = gspaces.flipRot2dOnR2(n) if flip else gspaces.rot2dOnR2(n)
        G = dihedral(n) if flip else cyclic(n)
        f = fields_for(width, G.order)
        t_img = enn.FieldType(gs, [gs.trivial_repr])
        t_reg = enn.FieldType(gs, [gs.regular_repr] * f)
        conv = enn.R2Conv(t_reg, t_reg, kernel_size=k, padding=k // 2)
        kin, kout = FieldType(G, "regular", f), FieldType(G, "regular", f)
        layer = EscnnBlock(conv, kin, kout, t_reg)
        block = EscnnBlock(enn.SequentialModule(enn.R2Conv(t_img, t_reg, kernel_size=k, padding=k // 2),
                                                enn.ReLU(t_reg), conv),
                           FieldType(G, "trivial", 1), kout, t_img)
        return layer, block
    return build


def _entries() -> dict[str, Entry]:
    """The plain-CNN baseline, one entry per registered layer-family example (:mod:`kit.layers.registry`,
    queried on every call, so a family registered later is measured too), escnn's layers and models."""
    E = [Entry("cnn-conv", "layer", "CNN baseline", "-", "eqkit", "Conv2d 64 -> 64 channels", _cnn_layer)]
    E += [Entry(f.name, "layer", f.family, f.group, "eqkit", f.description, _family_layer(f), f.counterpart)
          for f in families()]
    E += [
        Entry("escnn-c4", "layer", "escnn R2Conv", "C4", "escnn", "R2Conv, 16 -> 16 regular fields",
              _escnn_layer(4, False)),
        Entry("escnn-d4", "layer", "escnn R2Conv", "D4", "escnn", "R2Conv, 8 -> 8 regular fields",
              _escnn_layer(4, True)),
        Entry("escnn-c8", "layer", "escnn R2Conv", "C8", "escnn", "R2Conv, 8 -> 8 regular fields",
              _escnn_layer(8, False)),
        Entry("escnn-c16", "layer", "escnn R2Conv", "C16", "escnn", "R2Conv, 4 -> 4 regular fields",
              _escnn_layer(16, False)),
    ]
    for name, family in (("cnn-mnist", "CNN baseline"), ("p4-mnist", "G-CNN"), ("p4m-mnist", "G-CNN"),
                         ("e4-mnist-normal", "E4-Net"), ("pdo-mnist-p8", "PDO-eConv"),
                         ("nepdo-mnist-regular-fd", "Neural ePDO"), ("sep-se2-mnist-small", "Separable G-CNN")):
        card = models.model_card(name)
        E.append(Entry(name, "model", family, "", "eqkit", card.description, _model(name)))
        if name == "pdo-mnist-p8":                   # the paper's head is not invariant; also measure an invariant one
            E.append(Entry("pdo-mnist-p8-invhead", "model", family, "", "eqkit",
                           "pdo-mnist-p8 with head='invariant' (group max-pool, spatial mean, linear) instead "
                           "of the paper's dense 4x4 head", _model(name, head="invariant")))
    return {e.name: e for e in E}


def entries() -> dict[str, Entry]:
    """Every benchmark entry by name (built afresh: families registered since are included)."""
    return _entries()


def list_entries(pattern: str = "*", *, kind: str | None = None, library: str | None = None) -> list[str]:
    """Entry names matching a glob (comma-separated globs allowed), optionally one kind / library."""
    all_entries = entries()
    names = [n for n, e in all_entries.items() if name_matches(n, pattern)
             and (kind is None or e.kind == kind) and (library is None or e.library == library)]
    if not names:
        raise ValueError(f"no benchmark entry matches {pattern!r}; entries: {', '.join(all_entries)}")
    return names


# ============================================================================ measurements
def _exact_elements(G: Group):
    return [g for g in G.elements if G.is_exact_on_grid(g)]


def _digits(n: int, seed: int = 0) -> torch.Tensor:
    from ..data.sample import load_sample
    imgs = load_sample()["images"]                                           # (N, 1, 28, 28)
    idx = torch.randperm(imgs.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return imgs[idx].float()


def _macs_of(module: nn.Module, x: torch.Tensor) -> dict:
    """The benchmark's MAC columns, from the kit's one counter (:func:`kit.measure.complexity.count_macs`)."""
    from .complexity import count_macs
    c = count_macs(module, tuple(x.shape[1:]))
    return {"macs": c.macs, "macs_counted": c.macs_counted, "macs_dynamic": c.macs_dynamic,
            "macs_kernel_build": c.macs_kernel_build}


def throughput(module: nn.Module, x: torch.Tensor, *, repeats: int = 7, warmup: int = 2) -> dict:
    """Images/s and peak memory of the forward pass (eval, no grad) and of forward + backward (train,
    ``module(x).square().mean().backward()``), on ``x``'s device; medians of ``repeats`` runs."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    device, B = x.device, x.shape[0]

    def fwd():
        with torch.no_grad():
            module(x)

    def train_step():
        module.zero_grad(set_to_none=True)
        module(x).square().mean().backward()

    module.eval()
    tf = timed(fwd, repeats=repeats, warmup=warmup, device=device)
    peak_f = peak_memory(fwd, device=device)
    module.train()
    tt = timed(train_step, repeats=repeats, warmup=warmup, device=device)
    peak_t = peak_memory(train_step, device=device)
    module.zero_grad(set_to_none=True)
    module.eval()
    mf, mt = statistics.median(tf), statistics.median(tt)
    return {"batch": B, "fwd_s": mf, "fwd_img_s": B / mf, "fwd_times": tf, "fwd_peak_bytes": peak_f,
            "train_s": mt, "train_img_s": B / mt, "train_times": tt, "train_peak_bytes": peak_t}


def _warm_up(device: torch.device, seconds: float = 1.0):
    """Run convolutions for about ``seconds`` first, so the first entry is not timed on a cold CPU /
    cold oneDNN or cuDNN caches (the first entry measured 35 % slow without it)."""
    conv = nn.Conv2d(64, 64, 5, padding=2).to(device)
    x = torch.randn(16, 64, 28, 28, device=device)
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        conv(x).sum().backward()
    sync(device)


def paired_ratio(a: nn.Module, b: nn.Module, x: torch.Tensor, *, rounds: int = 9, warmup: int = 2) -> dict:
    """Time ``a`` over time ``b`` on the same input, measured in alternation (:func:`kit.measure.timing.alternated`)
    so that a drift of the machine's speed hits both alike: the median over ``rounds`` of the per-round
    ratio, for the forward pass (eval, no grad) and for forward + backward (train)."""

    def fwd(m):
        with torch.no_grad():
            m(x)

    def step(m):
        m.zero_grad(set_to_none=True)
        m(x).square().mean().backward()

    out = {}
    for key, fn, mode in (("fwd", fwd, False), ("train", step, True)):
        a.train(mode), b.train(mode)
        ta, tb = alternated(lambda: fn(a), lambda: fn(b), rounds=rounds, warmup=warmup, device=x.device)
        ratios = [p / q for p, q in zip(ta, tb)]
        out[f"{key}_time_ratio"] = statistics.median(ratios)
        out[f"{key}_ratios"] = ratios
    a.zero_grad(set_to_none=True), b.zero_grad(set_to_none=True)
    a.eval(), b.eval()
    return out


def _field_input(t: FieldType, batch: int, size: int, device, seed: int = 0) -> torch.Tensor:
    shape = (batch, t.n_fields) + (() if t.is_trivial else (t.dim,)) + (size, size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _error_block(entry: Entry, block: nn.Module, angles) -> dict:
    G = block.in_type.group
    if entry.kind == "model":
        models.calibrate_batchnorm(block, _digits(64))
    recs = error_vs_angle(block, angles)
    exact = check(block, _exact_elements(G), roundoff=True)   # with the float32 round-off floor
    out = {"angles": [r.angle for r in recs], "error": [r.error for r in recs], "floor": [r.floor for r in recs],
           "grid_elements": [repr(r.element) for r in exact], "grid_errors": [r.error for r in exact],
           "grid_roundoff": [r.floor for r in exact],
           "max_grid_error": max(r.error for r in exact if r.element != G.identity)
           if len(exact) > 1 else float("nan")}
    # the same elements in float64: what is left is the construction itself, not float32 rounding (a deep
    # copy: escnn shares basis-expansion modules between layers of equal type, a cache)
    others = [g for g in _exact_elements(G) if g != G.identity]
    if others:
        out["max_grid_error_f64"] = max(r.error for r in check(float64_twin(block), others))
    at90 = [e for a, e in zip(out["angles"], out["error"]) if abs(a - 90) < 1e-9]
    out["error_90"] = at90[0] if at90 else None
    r90 = [r.floor for r in exact if abs(r.angle - 90) < 1e-9 and not r.mirror]
    out["roundoff_90"] = r90[0] if r90 else None
    if G.flip:
        rm = error_vs_angle(block, angles, mirror=True)
        out["mirror_error"] = [r.error for r in rm]
        out["mirror_floor"] = [r.floor for r in rm]
    return out


def _versions() -> dict:
    v = {"torch": torch.__version__, "python": platform.python_version()}
    if escnn_available():
        import escnn
        v["escnn"] = getattr(escnn, "__version__", "?")
    return v


def device_description(device: torch.device, threads: int) -> str:
    """The device in words, e.g. ``"CPU: 2 cores (x86_64), 2 torch threads"``."""
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    return f"CPU: {os.cpu_count()} cores ({platform.machine()}), {threads} torch threads"


def compiled_throughput(module: nn.Module, x: torch.Tensor, *, repeats: int = 7, warmup: int = 2) -> dict:
    """``torch.compile(module)`` (default settings) against eager: the speed-up (``fwd_speedup`` /
    ``train_speedup``: eager time over compiled time, timed in alternation by :func:`paired_ratio`,
    not as two separate medians, which a shared machine skews), the compile time of the eval and the training graphs (the first call of
    each) and the relative difference of the compiled eval output from eager's on ``x``."""
    torch._dynamo.reset()
    compiled = torch.compile(module)
    module.eval()
    with torch.no_grad():
        ref = module(x)
        t = time.perf_counter()
        out = compiled(x)
        sync(x.device)
        compile_fwd = time.perf_counter() - t
    module.train()
    t = time.perf_counter()
    compiled(x).square().mean().backward()
    sync(x.device)
    compile_train = time.perf_counter() - t
    module.zero_grad(set_to_none=True)
    paired = paired_ratio(compiled, module, x, rounds=max(repeats, 5), warmup=warmup)   # alternated, one run
    tp = dict(compile_fwd_s=compile_fwd, compile_train_s=compile_train,
              fwd_speedup=1.0 / paired["fwd_time_ratio"], train_speedup=1.0 / paired["train_time_ratio"],
              rel_diff=float((out - ref).norm() / ref.norm().clamp_min(1e-30)))
    module.eval()
    return tp


def measure_entry(name: str, *, device: str | torch.device = "cpu", batch: int = 16, size: int = SIZE,
                  width: int = WIDTH, kernel: int = KERNEL, angles=ANGLES, repeats: int = 7, warmup: int = 2,
                  seed: int = 0, compile: bool = False) -> dict:
    """Every measurement of one entry, as a JSON-ready dict (see the module docstring); with
    ``compile=True`` also the same throughput under ``torch.compile`` (:func:`compiled_throughput`)."""
    all_entries = entries()
    if name not in all_entries:
        raise ValueError(f"unknown benchmark entry {name!r}; entries: {', '.join(all_entries)}")
    e = all_entries[name]
    if e.library == "escnn" and not escnn_available():
        raise RuntimeError(f"{name} needs escnn, the optional 'compare' extra: run `make compare` "
                           f"(installs gfortran if missing, then pip install -e '.[compare]')")
    device = torch.device(device)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    module, block = e.build(width, kernel)
    build_s = time.perf_counter() - t0
    res = {"name": name, "kind": e.kind, "family": e.family, "group": e.group or block.in_type.group.name,
           "library": e.library, "description": e.description, "counterpart": e.counterpart,
           "build_s": build_s, "params": sum(p.numel() for p in module.parameters() if p.requires_grad)}
    t = time.perf_counter()
    res["equivariance"] = _error_block(e, block, angles)              # CPU, float32, real digits
    res["equivariance"]["seconds"] = time.perf_counter() - t
    if e.kind == "model":
        x = _field_input(module.in_type, batch, module.card.input_shape[-1], "cpu", seed)
    else:
        x = _field_input(module.in_type, batch, size, "cpu", seed)
    res.update(_macs_of(module, x))
    module.to(device)
    threads = torch.get_num_threads()
    res["throughput"] = throughput(module, x.to(device), repeats=repeats, warmup=warmup)
    if compile:
        res["compiled"] = compiled_throughput(module, x.to(device), repeats=repeats, warmup=warmup)
    if e.counterpart and escnn_available():           # the same fields and kernel size in escnn, timed in turn
        other, _ = all_entries[e.counterpart].build(width, kernel)
        res["vs_counterpart"] = {"name": e.counterpart,
                                 **paired_ratio(module, other.to(device), x.to(device), rounds=max(repeats, 5))}
    res["device"] = device_description(device, threads)
    res["threads"] = threads
    from .complexity import load_average
    res["load"] = load_average()
    res["versions"] = _versions()
    res["when"] = _dt.datetime.now().isoformat(timespec="seconds")
    return res


# ============================================================================ run, store, draw
def _settings(**kw) -> dict:
    kw["angles"] = list(kw["angles"])
    kw["device"] = str(kw["device"])
    return kw


def load_results(out_dir: str | Path = OUT_DIR) -> list[dict]:
    """Every entry's result in ``out_dir`` (``<entry>.json``), in the registry's order."""
    out_dir = Path(out_dir)
    res = []
    for name in entries():
        p = out_dir / f"{name}.json"
        if p.exists():
            res.append(json.loads(p.read_text()))
    return res


def run(pattern: str = "*", *, out_dir: str | Path = OUT_DIR, device: str = "cpu", batch: int | None = None,
        size: int = SIZE, width: int = WIDTH, kernel: int = KERNEL, angles=ANGLES, repeats: int = 7,
        warmup: int = 2, force: bool = False, figures: bool = True, compile: bool = False, log=print) -> dict:
    """Measure every entry matching ``pattern`` into ``out_dir/<entry>.json`` (an entry already measured
    with the same settings is kept unless ``force``), then write ``table.md`` and the figures from every
    result in ``out_dir``.

    escnn entries are skipped, with a note, when the ``compare`` extra is not installed.
    Returns ``{"results": [...], "skipped": {...}, "failed": {...}, "files": [...]}``.
    """
    out_dir = Path(out_dir)
    dev = resolve_device(device)                                   # a clear error when CUDA is absent
    batch = batch if batch is not None else (128 if dev.type == "cuda" else 16)
    settings = _settings(device=device, batch=batch, size=size, width=width, kernel=kernel, angles=angles,
                         repeats=repeats, warmup=warmup)
    if compile:
        settings["compile"] = True
    skipped, failed, t_all = {}, {}, time.perf_counter()
    names = list_entries(pattern)
    log(f"eqkit bench: {len(names)} entries -> {out_dir} ({device_description(dev, torch.get_num_threads())})")
    _warm_up(dev)
    for name in names:
        path = out_dir / f"{name}.json"
        if path.exists() and not force:
            try:
                old = json.loads(path.read_text())
                if old.get("settings") == settings:
                    log(f"  {name:24s} kept (measured {old.get('when')} on {old.get('device')}; --force re-measures)")
                    continue
            except (json.JSONDecodeError, OSError):
                pass
        if entries()[name].library == "escnn" and not escnn_available():
            skipped[name] = "escnn not installed (make compare)"
            log(f"  {name:24s} skipped: escnn not installed (`make compare` installs the compare extra)")
            continue
        t = time.perf_counter()
        try:
            res = measure_entry(name, device=device, batch=batch, size=size, width=width, kernel=kernel,
                                angles=angles, repeats=repeats, warmup=warmup, compile=compile)
        except Exception as exc:                      # keep going; report every failure at the end
            failed[name] = f"{type(exc).__name__}: {exc}"
            log(f"  {name:24s} FAILED {failed[name]}")
            continue
        res["settings"] = settings
        atomic_write_json(path, res, default=float)
        tp = res["throughput"]
        log(f"  {name:24s} {time.perf_counter() - t:5.1f} s  err90 {_fmt_err(res['equivariance']['error_90'])}  "
            f"fwd {tp['fwd_img_s']:8.1f} img/s  fwd+bwd {tp['train_img_s']:8.1f} img/s"
            + (f"  compiled speed-up {res['compiled']['fwd_speedup']:.2f}x / {res['compiled']['train_speedup']:.2f}x"
               if compile else ""))
    results = load_results(out_dir)                  # every entry measured so far, not only this call's
    files = []
    if results and figures:
        comp = compiled_markdown(results)
        files.append(atomic_write_text(out_dir / "table.md", table_markdown(results) + "\n\n"
                                       + comparison_markdown(results) + ("\n\n" + comp if comp else "")))
        files.append(_save_fig(error_figure(results), out_dir / "error_vs_angle.png"))
        files.append(_save_fig(speed_figure(results), out_dir / "throughput.png"))
    log(f"done in {time.perf_counter() - t_all:.0f} s; {len(results)} results, {len(skipped)} skipped, "
        f"{len(failed)} failed")
    return {"results": results, "skipped": skipped, "failed": failed, "files": files}


def _save_fig(fig, path: Path) -> Path:
    from ..explore.viz import save
    save(fig, path)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def _fmt_err(e) -> str:
    return "-" if e is None or (isinstance(e, float) and math.isnan(e)) else f"{e:.1e}"


def _mb(b) -> str:
    return f"{b / 2 ** 20:.1f}"


def _macs(m) -> str:
    return f"{m / 1e6:.1f}M" if m < 1e9 else f"{m / 1e9:.2f}G"


def table_markdown(results: list[dict]) -> str:
    """The README table: one row per entry, layers then models."""
    by = {r["name"]: r for r in results}
    devs = sorted({r["device"] for r in results})
    st = sorted({json.dumps({k: v for k, v in r["settings"].items() if k != "angles"}, sort_keys=True)
                 for r in results})
    st = "; ".join(", ".join(f"{k} {v}" for k, v in json.loads(s).items()) for s in st)
    lines = [f"Device: {'; '.join(devs)}. Settings: {st}. Layers at `width` channels (fields x |G|), "
             f"`size` x `size` inputs, `kernel` x `kernel` kernels; models at 28x28 with their own widths.", "",
             "| entry | family | group | params | MACs/img | err 90° | round-off 90° | grid err f64 | "
             "max err 0–360° (floor) | fwd img/s | fwd+bwd img/s | peak MB fwd / fwd+bwd | vs escnn fwd+bwd |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in ("layer", "model"):
        for r in (r for r in results if r["kind"] == kind):
            eq, tp = r["equivariance"], r["throughput"]
            worst = max(range(len(eq["error"])), key=lambda i: eq["error"][i])
            ratio = "-"
            if r.get("vs_counterpart"):
                ratio = f"{r['vs_counterpart']['train_time_ratio']:.2f}x time"
            lines.append(
                f"| {r['name']} | {r['family']} | {r['group']} | {r['params']:,} | {_macs(r['macs'])} | "
                f"{_fmt_err(eq['error_90'])} | {_fmt_err(eq.get('roundoff_90'))} | "
                f"{_fmt_err(eq.get('max_grid_error_f64'))} | "
                f"{_fmt_err(eq['error'][worst])} at {eq['angles'][worst]:.0f}° "
                f"({_fmt_err(eq['floor'][worst])}) | {tp['fwd_img_s']:.0f} | {tp['train_img_s']:.0f} | "
                f"{_mb(tp['fwd_peak_bytes'])} / {_mb(tp['train_peak_bytes'])} | {ratio} |")
    lines += ["", "err: relative error ||f(g.x) - g.f(x)|| / ||g.f(x)|| on real digits (float32; layers: "
              "lift -> ReLU -> layer; models: logits, batch-norm calibrated); round-off 90°: the float32 "
              "round-off floor of that measurement against a float64 copy (kit.equivariance.check with "
              "roundoff=True: err <= round-off + the float64 error); floor: the same rotation applied "
              "to an identity map (feature maps) or the error against a 4x supersampled rotation (logits). "
              "grid err f64: the largest error over the grid-exact elements other than the identity (multiples "
              "of 90°, mirrors for D4), the module in float64. "
              "'vs escnn': the kit layer's fwd+bwd time over escnn R2Conv's at the same fields and kernel size, "
              "median of per-round ratios with the two timed in alternation."]
    return "\n".join(lines)


def compiled_markdown(results: list[dict]) -> str:
    """Eager beside ``torch.compile`` (default settings) for every entry measured with ``--compile``."""
    rows = [r for r in results if r.get("compiled")]
    if not rows:
        return ""
    lines = ["| entry | fwd speed-up | fwd+bwd speed-up | compile s (eval / train) | rel. diff from eager |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        c = r["compiled"]
        lines.append(f"| {r['name']} | {c['fwd_speedup']:.2f}x | {c['train_speedup']:.2f}x | "
                     f"{c['compile_fwd_s']:.0f} / {c['compile_train_s']:.0f} | {_fmt_err(c['rel_diff'])} |")
    lines += ["", "Compiled: `torch.compile(module)` with default settings, eager's time over the compiled "
              "module's (above 1: compile is faster), the median of per-round ratios with the two timed in "
              "alternation in one run; compile s: the first eval and the first training call."]
    return "\n".join(lines)


def comparison_markdown(results: list[dict]) -> str:
    """The kit's regular group convs beside escnn ``R2Conv`` at the same fields and kernel size."""
    by = {r["name"]: r for r in results}
    lines = ["| group | eqkit / escnn time, fwd+bwd | eqkit / escnn time, fwd | fwd+bwd img/s eqkit / escnn | "
             "err 90° eqkit / escnn (float32) | grid err eqkit / escnn (float64) | max err 0–360° eqkit / escnn | "
             "params eqkit / escnn |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        c = by.get(r.get("counterpart") or "")
        v = r.get("vs_counterpart")
        if c is None or v is None:
            continue
        a, b = r["throughput"], c["throughput"]
        ea, eb = r["equivariance"], c["equivariance"]
        lines.append(f"| {r['group']} | {v['train_time_ratio']:.2f} | {v['fwd_time_ratio']:.2f} | "
                     f"{a['train_img_s']:.0f} / {b['train_img_s']:.0f} | "
                     f"{_fmt_err(ea['error_90'])} / {_fmt_err(eb['error_90'])} | "
                     f"{_fmt_err(ea.get('max_grid_error_f64'))} / {_fmt_err(eb.get('max_grid_error_f64'))} | "
                     f"{_fmt_err(max(ea['error']))} / "
                     f"{_fmt_err(max(eb['error']))} | {r['params']:,} / {c['params']:,} |")
    if len(lines) == 2:
        return "(no eqkit / escnn pair measured: `make compare`, then `python -m kit bench`)"
    return "\n".join(lines)


def _style(r):
    return dict(ls="--" if r["library"] == "escnn" else "-", lw=1.4)


def _color_key(r):
    """One colour per group for the G-CNN / escnn layers (so a pair shares it), else one per entry."""
    return r["group"] if r["family"] in ("G-CNN", "escnn R2Conv") and r["kind"] == "layer" else r["name"]


def _angle_step(results: list[dict]) -> str:
    """The measured angle step(s), e.g. ``"5°"``, from the results' angle lists."""
    steps = sorted({round(float(a[1]) - float(a[0]), 6) for r in results
                    if len(a := r["equivariance"]["angles"]) > 1})
    return ", ".join(f"{s:g}°" for s in steps) or "—"


def error_figure(results: list[dict]):
    """Equivariance error vs rotation angle, 0-360 degrees: G-CNN layers beside escnn, the family
    layers, and the models, one panel above the other (legend right of each); dotted lines are each
    eqkit entry's interpolation floor. Sized for a notebook: 7.4 in wide, no text under 8 pt."""
    import matplotlib.pyplot as plt

    panels = [("G-CNN layers: eqkit (solid) vs escnn R2Conv (dashed)",
               lambda r: r["kind"] == "layer" and (r["family"] in ("G-CNN", "escnn R2Conv", "CNN baseline"))),
              ("one layer per family (lift -> ReLU -> layer)",
               lambda r: r["kind"] == "layer" and r["library"] == "eqkit" and r["name"] not in
               ("p4m-gconv", "p8-gconv", "c16-gconv")),
              ("models (logits; floor: 4x supersampled rotation)", lambda r: r["kind"] == "model")]
    fig, axes = plt.subplots(3, 1, figsize=(7.4, 8.6), sharex=True, sharey=True, layout="constrained")
    cmap = plt.get_cmap("tab10")
    for ax, (title, keep) in zip(axes, panels):
        shown = list(filter(keep, results))
        colors = {k: cmap(i % 10) for i, k in enumerate(dict.fromkeys(map(_color_key, shown)))}  # per panel
        for r in shown:
            c = colors[_color_key(r)]
            eq = r["equivariance"]
            err = [max(e, 1e-9) for e in eq["error"]]
            ax.semilogy(eq["angles"], err, color=c, label=f"{r['name']} ({r['group']})", **_style(r))
            if r["library"] == "eqkit":
                ax.semilogy(eq["angles"], [max(f, 1e-9) for f in eq["floor"]], color=c, ls=":", lw=0.9)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(0, 361, 45))
        ax.set_xlim(0, 360)
        ax.tick_params(labelsize=8)
        ax.axhline(1e-5, color="k", lw=0.6, alpha=0.5)
        ax.grid(alpha=0.3)
        ax.set_ylabel("relative error", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
                      handlelength=1.8, labelspacing=0.3)
        else:
            ax.text(0.5, 0.5, "no entry measured", transform=ax.transAxes, ha="center", va="center", fontsize=9)
    axes[-1].set_xlabel("rotation (degrees, counter-clockwise)", fontsize=9)
    dev = "; ".join(sorted({r["device"] for r in results}))
    fig.suptitle(f"Equivariance error vs angle ({_angle_step(results)} steps; dotted: interpolation floor; "
                 f"black line: 1e-5)\n{dev}", fontsize=10)
    return fig


def speed_figure(results: list[dict]):
    """Throughput (forward, forward + backward) and peak memory per entry, layers and models. Sized for
    a notebook: 7.4 in wide, no text under 8 pt; escnn entries' names in red."""
    import matplotlib.pyplot as plt
    import numpy as np

    kinds = [(k, [r for r in results if r["kind"] == k]) for k in ("layer", "model")]
    kinds = [(k, rs) for k, rs in kinds if rs] or [("layer", [])]
    ratios = [max(len(rs), 3) + 1.5 for _, rs in kinds]

    def log_axis(ax, values, label):
        """A log x axis from the decade below the smallest bar (so every bar has a visible base)."""
        if values:
            ax.set_xscale("log")
            ax.set_xlim(10 ** math.floor(math.log10(min(values))), max(values) * 1.4)
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel(label, fontsize=9)
        ax.tick_params(which="both", labelsize=8)

    fig, axes = plt.subplots(len(kinds), 2, figsize=(7.4, 0.24 * sum(ratios) + 1.4), squeeze=False,
                             layout="constrained", gridspec_kw={"width_ratios": [1.45, 1], "height_ratios": ratios})
    handles, labels = [], []
    for row, (kind, rs) in enumerate(kinds):
        y = np.arange(len(rs))
        names = [f"{r['name']} ({r['group']})" for r in rs]
        ax = axes[row, 0]
        fwd, train = [r["throughput"]["fwd_img_s"] for r in rs], [r["throughput"]["train_img_s"] for r in rs]
        ax.barh(y - 0.2, fwd, 0.4, label="forward (eval)")
        ax.barh(y + 0.2, train, 0.4, label="forward + backward (train)")
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        log_axis(ax, fwd + train, "images / s (log)")
        batch = f", batch {rs[0]['throughput']['batch']}" if rs else ""
        ax.set_title(f"{kind}s: throughput{batch}", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
        for i, r in enumerate(rs):
            if r["library"] == "escnn":
                ax.get_yticklabels()[i].set_color("tab:red")
        if not handles:
            handles, labels = ax.get_legend_handles_labels()
        ax = axes[row, 1]
        fwd = [r["throughput"]["fwd_peak_bytes"] / 2 ** 20 for r in rs]
        train = [r["throughput"]["train_peak_bytes"] / 2 ** 20 for r in rs]
        ax.barh(y - 0.2, fwd, 0.4, label="forward")
        ax.barh(y + 0.2, train, 0.4, label="forward + backward")
        ax.set_yticks(y, [""] * len(rs))
        ax.invert_yaxis()
        log_axis(ax, fwd + train, "peak memory (MiB, log)")
        ax.set_title(f"{kind}s: peak memory", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    dev = "; ".join(sorted({r["device"] for r in results}))
    fig.suptitle(f"Throughput and memory (escnn entries in red)\n{dev}", fontsize=10)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


# ============================================================================ command line
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kit bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="*", help="glob(s) over entry names, comma-separated (default: all)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--batch", type=int, default=None, help="batch for throughput (default: 16 on CPU, 128 on GPU)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median; default 7)")
    p.add_argument("--step", type=float, default=5, help="angle step of the error curves, degrees (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    p.add_argument("--out", default=str(OUT_DIR), help="output folder (default: figures/bench)")
    p.add_argument("--force", action="store_true", help="re-measure entries already measured")
    p.add_argument("--list", action="store_true", help="list the entries and exit")
    p.add_argument("--compile", action="store_true",
                   help="also measure every entry under torch.compile (default settings): compiled columns")
    p.add_argument("--speedup", default=None, metavar="MODEL[,MODEL...]",
                   help="instead: time a training step of these registered models with the kit's fused kernels "
                        "against kit.kernels.reference_kernels(), alternated in one run (batch --batch or 64)")
    a = p.parse_args(argv)
    if a.speedup:
        from .complexity import reference_speedup, reference_speedup_markdown
        rows = [reference_speedup(n.strip(), batch=a.batch or 64, rounds=a.repeats, threads=a.threads)
                for n in a.speedup.split(",") if n.strip()]
        print(reference_speedup_markdown(rows))
        return 0
    if a.list:
        for n, e in entries().items():
            print(f"{n:24s} {e.kind:6s} {e.library:6s} {e.family:16s} {e.description}")
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    res = run(a.only, out_dir=a.out, device=a.device, batch=a.batch, repeats=a.repeats, force=a.force,
              angles=angles(a.step), compile=a.compile)
    for f in res["files"]:
        print(f"  wrote {f}")
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
