"""What a model costs: parameters, multiply-accumulates (MACs) per image, and measured time.

MACs are counted, not estimated by hand:

* **standard ops** (convolutions, linear layers, matmuls, einsums lowered to ``bmm``) with
  :class:`torch.utils.flop_counter.FlopCounterMode`; MACs = FLOPs / 2. The model runs on a
  ``meta``-device copy (shapes only, instant; a real copy where a module cannot run on meta) in
  train mode, so every kernel is rebuilt from its parameters as in a training step. Two passes,
  batch 2 and batch 3 (train-mode batch norm needs two values per channel), separate the cost
  **per image** (the difference, the papers' convention) from the batch-independent **kernel
  build** (steering the weight-tied filters: ``count(2) - 2 per_image``). The kit's group convs
  steer their filters with an einsum against permutation matrices, which the counter sees; the
  official code copies slices (no MACs). Per-image numbers are unaffected.
* **input-dependent work the counter does not see**: every layer answers the family-protocol hook
  :meth:`kit.layers.EquivariantModule.dynamic_macs` (0 by default), which the counter adds per call
  at the layer's actual output size. E4 and Neural-ePDO layers report their per-pixel aggregation
  with generated kernels (``out |G| K^2 H W`` for E4, :meth:`kit.layers.e4.E4Conv.aggregation_macs`;
  ``in channels x 25 x H W`` for Neural ePDO), elementwise multiply-adds (``mul`` / ``addcmul``)
  that FLOP counters do not see; :func:`aggregation_seen_by_counter` measures that the counter sees
  none of it (tested), so nothing is counted twice. No class is special-cased here: a new family's
  layer is counted through its hook.

Checked against the counts made on the official E4-Net code (../shared/reference/e4net.md 6): the
CIFAR ResNet-18 family agrees to rounding (the official CIFAR MACs include the aggregation; the
MNIST ones list it separately), which reproduces the paper's "56% parameters, 68% FLOPs".

Time: :func:`time_forward_backward` (median wall time of forward + backward, after warm-up, on the
current thread setting) and :func:`speed_comparison` (an E4 layer against a p4 / p4m group conv
of equal width). :func:`peak_memory` measures the largest amount of CPU memory allocated by torch
during a call (profiler memory events), e.g. to compare it with the size of an unfold.
"""
from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .._compat import require
from .. import models
from ..groups import Group, cyclic, dihedral
from ..layers.base import EquivariantModule
from .._io import atomic_write_text
from .timing import alternated, memory_profile, peak_memory, stats, timed, torch_threads
from ..kernels.aggregate import dynamic_aggregate, dynamic_aggregate_unfold
from ..layers.e4 import E4Conv
from ..layers.gconv import GroupConv

__all__ = ["step_profile", "step_profile_markdown", "training_step_ratio", "reference_speedup",
           "reference_speedup_markdown", "Cost", "count_macs", "aggregation_seen_by_counter", "cost_table", "cost_markdown", "cost_ratios",
           "cost_figure", "CIFAR_MODELS", "MNIST_MODELS", "PAIRS", "time_forward_backward", "peak_memory",
           "memory_profile",
           "SpeedCase", "SPEED_CASES", "speed_comparison", "speed_markdown", "aggregation_comparison",
           "load_average", "speed_cases", "save_text"]

CIFAR_MODELS = ("resnet18", "p4-resnet18", "p4-e4-resnet18", "p4m-resnet18", "p4m-e4-resnet18")
MNIST_MODELS = ("e4-mnist-normal", "e4-mnist-large")
PAIRS = (("p4-e4-resnet18", "p4-resnet18"), ("p4m-e4-resnet18", "p4m-resnet18"))


# ------------------------------------------------------------------------------ counting
@dataclass
class Cost:
    """Cost of one model for one input of ``input_shape`` (per image)."""

    name: str
    params: int
    macs_counted: int        # standard ops seen by FlopCounterMode, per image
    macs_dynamic: int        # input-dependent work the counter misses (layers' dynamic_macs hook), per image
    macs_kernel_build: int   # batch-independent: building the steered filters once per forward (train mode)
    input_shape: tuple

    @property
    def macs(self) -> int:
        """Total MACs per image: counted + dynamic."""
        return self.macs_counted + self.macs_dynamic

    def as_dict(self) -> dict:
        return {**asdict(self), "macs": self.macs}


def _counted_macs(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() // 2


def aggregation_seen_by_counter(layer: E4Conv, B: int, H: int, W: int) -> int:
    """MACs of ``layer``'s aggregation step (``B`` images of ``H x W``) that FlopCounterMode itself
    counts (run alone on meta tensors). Subtracted from the added aggregation MACs so nothing is
    counted twice; 0 for the kit's formulation."""
    G, KK = layer.out_type.dim, layer.kernel_size ** 2
    v = torch.empty(B, layer.out_type.n_fields, G, H, W, device="meta")
    kern = torch.empty(B, layer.slices, G, KK, H, W, device="meta")
    return _counted_macs(lambda: layer.aggregate(v, kern))


def count_macs(model: nn.Module, input_shape: tuple, *, name: str = "") -> Cost:
    """Parameters and MACs per image of ``model`` for inputs ``input_shape`` (without the batch:
    ``(C, H, W)`` for images, ``(C, D, H, W)`` for fields). The one MAC counter of the kit: the
    benchmark, the zoo's manifests and the cost tables all use it.

    The model is copied (to the meta device where it can run there); the original is untouched.
    See the module docstring for what is counted.
    """
    params = models.count_parameters(model)
    input_shape = tuple(int(v) for v in input_shape)
    try:
        (c2, dyn), (c3, _) = _count_on_copy(model, input_shape, "meta")
    except Exception:                         # a module that cannot run on meta (e.g. escnn's): real zeros
        (c2, dyn), (c3, _) = _count_on_copy(model, input_shape, "cpu")
    per_image = c3 - c2
    return Cost(name or type(model).__name__, params, per_image, dyn, c2 - 2 * per_image, input_shape)


def _count_on_copy(model: nn.Module, input_shape: tuple, device: str) -> list[tuple[int, int]]:
    """``(counted MACs, dynamic MACs per image)`` of a train-mode copy of ``model`` at batch 2 and 3."""
    import copy

    m = (_meta_copy(model) if device == "meta" else copy.deepcopy(model)).train()
    dyn: list[int] = []
    hooks = [mod.register_forward_hook(lambda mod, inp, out: dyn.append(mod.dynamic_macs(*out.shape[-2:])))
             for mod in m.modules() if isinstance(mod, EquivariantModule)
             and type(mod).dynamic_macs is not EquivariantModule.dynamic_macs]
    out = []
    try:
        for b in (2, 3):
            dyn.clear()
            # autograd stays on: FlopCounterMode's module tracker trips over escnn's modules under no_grad
            with FlopCounterMode(display=False) as counter:
                m(torch.zeros(b, *input_shape, device=device))
            out.append((counter.get_total_flops() // 2, sum(dyn)))
    finally:
        for h in hooks:
            h.remove()
    return out


def _meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` on the meta device, without copying parameter data."""
    import copy

    memo = {id(b): b.to("meta") for b in model.buffers()}
    memo.update({id(p): nn.Parameter(p.to("meta"), requires_grad=p.requires_grad) for p in model.parameters()})
    return copy.deepcopy(model, memo)


# ------------------------------------------------------------------------------ the table
def _reported_macs(card) -> tuple[int | None, str]:
    r = card.reported
    if "macs" not in r:
        return None, ""
    if "macs_dynamic" in r:                     # MNIST: conv + linear listed apart from the aggregation
        return int(r["macs"] + r["macs_dynamic"]), "conv+linear + aggregation, listed separately"
    return int(r["macs"]), "total"


def cost_table(names=CIFAR_MODELS + MNIST_MODELS, **overrides) -> list[dict]:
    """One row per registered model: parameters and MACs, ours and the reference's (official code).

    Keys: ``model``, ``params``, ``params_ref``, ``params_diff`` (relative), ``macs_counted``,
    ``macs_dynamic``, ``macs``, ``macs_ref``, ``macs_diff`` (relative), ``macs_kernel_build``,
    ``input``. ``overrides`` go to :func:`kit.models.create` (e.g. ``affine="per_channel"``).
    """
    rows = []
    for name in names:
        card = models.model_card(name)
        kw = {k: v for k, v in overrides.items() if k in card.parameters}
        cost = count_macs(models.create(name, **kw), card.input_shape, name=name)
        p_ref = card.reported.get("params")
        m_ref, _ = _reported_macs(card)
        rows.append({"model": name, "params": cost.params, "params_ref": p_ref,
                     "params_diff": (cost.params / p_ref - 1) if p_ref else None,
                     "macs_counted": cost.macs_counted, "macs_dynamic": cost.macs_dynamic, "macs": cost.macs,
                     "macs_ref": m_ref, "macs_diff": (cost.macs / m_ref - 1) if m_ref else None,
                     "macs_kernel_build": cost.macs_kernel_build,
                     "input": "x".join(map(str, card.input_shape))})
    return rows


def cost_ratios(rows: list[dict], pairs=PAIRS) -> list[dict]:
    """Parameter and MAC ratios ``model / baseline`` for each pair present in ``rows`` (ours and reference)."""
    by = {r["model"]: r for r in rows}
    out = []
    for a, b in pairs:
        if a in by and b in by:
            ra, rb = by[a], by[b]
            out.append({"model": a, "baseline": b, "params_ratio": ra["params"] / rb["params"],
                        "macs_ratio": ra["macs"] / rb["macs"],
                        "params_ratio_ref": (ra["params_ref"] / rb["params_ref"]) if ra["params_ref"] else None,
                        "macs_ratio_ref": (ra["macs_ref"] / rb["macs_ref"]) if ra["macs_ref"] else None})
    return out


def _pct(x):
    return "-" if x is None else f"{100 * x:+.2f}%"


def cost_markdown(rows: list[dict], ratios: list[dict] | None = None) -> str:
    """The cost table (and the pair ratios) as markdown."""
    ratios = cost_ratios(rows) if ratios is None else ratios
    lines = ["| model | input | params | params (ref.) | diff | MACs counted | + E4 aggregation | MACs total "
             "| MACs (ref.) | diff |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref_p = f"{r['params_ref']:,}" if r["params_ref"] else "-"
        ref_m = f"{r['macs_ref'] / 1e6:,.1f} M" if r["macs_ref"] else "-"
        lines.append(f"| {r['model']} | {r['input']} | {r['params']:,} | {ref_p} | {_pct(r['params_diff'])} "
                     f"| {r['macs_counted'] / 1e6:,.1f} M | {r['macs_dynamic'] / 1e6:,.2f} M "
                     f"| {r['macs'] / 1e6:,.1f} M "
                     f"| {ref_m} | {_pct(r['macs_diff'])} |")
    if ratios:
        lines += ["", "| ratio | params | params (ref.) | MACs | MACs (ref.) |", "|---|---:|---:|---:|---:|"]
        for q in ratios:
            f = lambda x: "-" if x is None else f"{100 * x:.1f}%"
            lines.append(f"| {q['model']} / {q['baseline']} | {f(q['params_ratio'])} | {f(q['params_ratio_ref'])} "
                         f"| {f(q['macs_ratio'])} | {f(q['macs_ratio_ref'])} |")
    lines += ["", "MACs per image (FLOPs = 2 MACs), counted with `torch.utils.flop_counter.FlopCounterMode` plus the "
              "E4 dynamic aggregation (`out |G| K^2 H W` per E4 layer), which FLOP counters do not see. Reference: "
              "counted on the official E4-Net code (../shared/reference/e4net.md section 6; its MNIST MACs list "
              "the aggregation separately, summed here). Parameter differences of the E4 models: per-field "
              "GroupNorm affine (2 per field instead of 2 per field and orientation), see kit/models/e4.py."]
    return "\n".join(lines)


_BAR = {"resnet18": "#7f7f7f", "p4-resnet18": "#1f77b4", "p4-e4-resnet18": "#aec7e8",
        "p4m-resnet18": "#2ca02c", "p4m-e4-resnet18": "#98df8a", "e4-mnist-normal": "#ff7f0e",
        "e4-mnist-large": "#ffbb78"}


def _unit(v: float) -> tuple[float, str]:
    return (1e6, "M") if v >= 1e6 else (1e3, "k")


def cost_figure(rows: list[dict]):
    """Horizontal bar charts: parameters and MACs per image of each model, ours beside the reference.

    One row of two panels per input size (CIFAR 3x32x32, MNIST 1x28x28: scales a thousand-fold
    apart). The MAC bars are split into counted ops (solid) and the E4 dynamic aggregation
    (hatched); the reference (official code) is a black tick. E4 bars carry their ratio to the
    matching G-CNN and the size of their aggregation.
    """
    by = {r["model"]: r for r in rows}
    ratios = {q["model"]: q for q in cost_ratios(rows)}
    groups = {}
    for r in rows:
        groups.setdefault(r["input"], []).append(r["model"])
    plt = require("matplotlib.pyplot", "lab", feature="the cost figure")
    sizes = [len(g) for g in groups.values()]
    fig, axes = plt.subplots(len(groups), 2, figsize=(8.7, 1.1 + sum(0.45 * n + 0.9 for n in sizes)), squeeze=False,
                             gridspec_kw={"height_ratios": sizes})
    notes, handles = [], {}
    for row_axes, (inp, names) in zip(axes, groups.items()):
        for ax, key in zip(row_axes, ("params", "macs")):
            unit, u = _unit(max(by[n][key] for n in names))
            for i, n in enumerate(names):
                r = by[n]
                col = _BAR.get(n, "#888888")
                if key == "macs":
                    ax.barh(i, r["macs_counted"] / unit, color=col, edgecolor="black", linewidth=0.5)
                    if r["macs_dynamic"]:
                        handles["E4 aggregation (not seen by FLOP counters)"] = ax.barh(
                            i, r["macs_dynamic"] / unit, left=r["macs_counted"] / unit, color="white",
                            edgecolor="black", hatch="////", linewidth=0.5)
                else:
                    ax.barh(i, r[key] / unit, color=col, edgecolor="black", linewidth=0.5)
                ref = r[f"{key}_ref"]
                if ref:
                    handles["reference (official code)"], = ax.plot([ref / unit] * 2, [i - 0.4, i + 0.4],
                                                                    color="black", lw=2)
                note = []
                q = ratios.get(n)
                if q:
                    v = q["params_ratio" if key == "params" else "macs_ratio"]
                    note.append(f"{100 * v:.1f}% of {q['baseline']}")
                if key == "macs" and r["macs_dynamic"]:
                    share = 100 * r["macs_dynamic"] / r["macs"]
                    note.append(f"aggregation {r['macs_dynamic'] / 1e6:.1f} M ({share:.1f}%)")
                if note:
                    end = max(r[key], ref or 0) / unit
                    notes.append((ax, end, ax.annotate("\n".join(note), (end, i), xytext=(4, 0),
                                                       textcoords="offset points", ha="left", va="center",
                                                       fontsize=9)))
            ax.set_yticks(range(len(names)))
            ax.set_yticklabels(names if key == "params" else [], fontsize=9)
            ax.set_ylim(len(names) - 0.5, -0.5)                              # first model on top
            ax.tick_params(axis="x", labelsize=9)
            ax.xaxis.set_major_locator(plt.MaxNLocator(4))
            ax.set_title(f"{'parameters' if key == 'params' else 'MACs per image'} ({u}), input {inp}", fontsize=9)
            ax.set_xlim(0, max(max(by[n][key], by[n][f"{key}_ref"] or 0) for n in names) / unit * 1.05)
            ax.grid(axis="x", alpha=0.3)
    fig.suptitle("E4-Net cost: parameters and MACs per image (FlopCounterMode + the dynamic aggregation)",
                 fontsize=10)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=9,
                   frameon=False)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
    fig.canvas.draw()                                                         # room for the notes right of the bars
    for ax, end, t in notes:
        w = ax.get_window_extent().width
        need = end * w / max(w - t.get_window_extent().width - 12, 1)
        ax.set_xlim(0, max(ax.get_xlim()[1], need))
    return fig


# ------------------------------------------------------------------------------ timing
def load_average() -> str:
    """The 1/5/15-minute load averages and the CPU count, for stating next to every timing."""
    try:
        a, b, c = os.getloadavg()
        return f"load {a:.2f} {b:.2f} {c:.2f} on {os.cpu_count()} CPUs"
    except OSError:                                                          # pragma: no cover
        return f"load unknown, {os.cpu_count()} CPUs"


def _fwd_bwd(module: nn.Module, x: torch.Tensor):
    """``module(x).sum().backward()`` in train mode, gradients cleared first."""
    module.train()
    x = x.detach().requires_grad_(True)

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).sum().backward()
    return step


def time_forward_backward(module: nn.Module, x: torch.Tensor, *, repeats: int = 10, warmup: int = 2) -> dict:
    """Wall time of ``module(x)`` forward + backward (of ``y.sum()``), in train mode.

    Returns ``{"median", "q25", "q75", "times"}`` in seconds over ``repeats`` runs after ``warmup``
    runs (:func:`kit.measure.timing.timed`). Runs on the current ``torch.get_num_threads()``.
    """
    return stats(timed(_fwd_bwd(module, x), repeats=repeats, warmup=warmup, device=x.device))


@dataclass(frozen=True)
class SpeedCase:
    """One E4-vs-G-conv comparison: layer widths and settings, input size and batch."""

    label: str
    group: str              # "C4" (p4) or "D4" (p4m)
    fields: int             # input and output fields of both layers
    size: int               # H = W
    batch: int
    kernel_size: int
    reduction: int
    channels_per_slice: int

    def group_obj(self) -> Group:
        return {"C4": cyclic(4), "D4": dihedral(4)}[self.group]


SPEED_CASES = (
    SpeedCase("CIFAR stage 2 (p4-E4-R18)", "C4", 64, 16, 32, 3, 2, 2),
    SpeedCase("MNIST-rot Normal", "C4", 16, 28, 32, 5, 1, 8),
)


def speed_cases(*, batch: int | None = None, cases=SPEED_CASES) -> tuple[SpeedCase, ...]:
    """The standard comparisons, optionally with another batch size (e.g. a quick profile)."""
    from dataclasses import replace

    return tuple(cases) if batch is None else tuple(replace(c, batch=batch) for c in cases)


def save_text(text: str, path) -> "os.PathLike":
    """Write ``text`` (e.g. a markdown table) to ``path`` atomically; returns the path."""
    return atomic_write_text(path, text)


def _layers(case: SpeedCase, seed: int = 0):
    G = case.group_obj()
    torch.manual_seed(seed)
    e4 = E4Conv(group=G, in_fields=case.fields, out_fields=case.fields, kernel_size=case.kernel_size,
                reduction=case.reduction, channels_per_slice=case.channels_per_slice)
    gc = GroupConv(group=G, in_fields=case.fields, out_fields=case.fields, kernel_size=case.kernel_size, bias=False)
    x = torch.randn(case.batch, case.fields, G.order, case.size, case.size)
    return e4, gc, x


def speed_comparison(cases=SPEED_CASES, *, repeats: int = 10, warmup: int = 2,
                     threads: int | None = None) -> list[dict]:
    """Forward + backward time of an E4 layer vs a group conv of equal width (same fields, kernel
    size, input), next to their MAC and parameter ratios.

    The two layers are timed alternately (one run each, ``repeats`` times) so that a changing machine
    load hits both alike; medians are reported. ``threads`` sets ``torch.set_num_threads`` for the
    measurement (restored afterwards). Each row records the threads and the load average.
    """
    rows = []
    with torch_threads(threads):
        for case in cases:
            e4, gc, x = _layers(case)
            shape = tuple(x.shape[1:])
            ce, cg = count_macs(e4, shape), count_macs(gc, shape)
            te, tg = alternated(_fwd_bwd(e4, x), _fwd_bwd(gc, x), rounds=repeats, warmup=warmup)
            me, mg = statistics.median(te), statistics.median(tg)
            rows.append({"case": case.label, "group": case.group, "fields": case.fields,
                         "input": f"{case.batch}x{case.fields}x{case.group_obj().order}x{case.size}x{case.size}",
                         "kernel_size": case.kernel_size, "e4_ms": 1e3 * me, "gconv_ms": 1e3 * mg,
                         "e4_iqr_ms": 1e3 * (statistics.quantiles(te, n=4)[2] - statistics.quantiles(te, n=4)[0])
                         if len(te) > 1 else 0.0,
                         "gconv_iqr_ms": 1e3 * (statistics.quantiles(tg, n=4)[2] - statistics.quantiles(tg, n=4)[0])
                         if len(tg) > 1 else 0.0,
                         "time_ratio": me / mg, "macs_ratio": ce.macs / cg.macs,
                         "params_ratio": ce.params / cg.params, "e4_macs": ce.macs, "gconv_macs": cg.macs,
                         "repeats": repeats, "threads": torch.get_num_threads(), "load": load_average(),
                         "device": "cpu"})
    return rows


def speed_markdown(rows: list[dict]) -> str:
    lines = ["| layer pair (equal width) | input B x C x G x H x W | K | E4 fwd+bwd | G-conv fwd+bwd | time E4/G-conv "
             "| MACs E4/G-conv | params E4/G-conv |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} ({r['group']}, {r['fields']} fields) | {r['input']} | {r['kernel_size']} "
                     f"| {r['e4_ms']:.1f} ms | {r['gconv_ms']:.1f} ms | {100 * r['time_ratio']:.0f}% "
                     f"| {100 * r['macs_ratio']:.0f}% | {100 * r['params_ratio']:.0f}% |")
    if rows:
        r = rows[0]
        lines += ["", f"CPU, {r['threads']} thread(s), median of {r['repeats']} alternating runs after warm-up; "
                      f"{r['load']} at the end of the measurement."]
    return "\n".join(lines)


def aggregation_comparison(case: SpeedCase = SPEED_CASES[0], *, repeats: int = 10, warmup: int = 2) -> dict:
    """Before/after for the dynamic aggregation alone: the unfold formulation (official) against the
    kit's tap loop, on the encoder output and kernels of ``case``: forward+backward time (median),
    peak memory of the forward without and with autograd, the unfold's size, and the largest
    difference of the results and gradients."""
    e4, _, x = _layers(case)
    with torch.no_grad():
        kern = e4.generate_kernels(x)
        v = e4.encoder(x)
    unfold_bytes = v.numel() * e4.kernel_size ** 2 * v.element_size()
    out = {"case": case.label, "v_bytes": v.numel() * v.element_size(),
           "kern_bytes": kern.numel() * kern.element_size(), "unfold_bytes": unfold_bytes,
           "threads": torch.get_num_threads()}
    results = {}
    for name, f in (("unfold", dynamic_aggregate_unfold), ("taps", dynamic_aggregate)):
        def run(f=f):
            vv, kk = v.clone().requires_grad_(True), kern.clone().requires_grad_(True)
            y = f(vv, kk)
            y.backward(torch.ones_like(y))
            return y, vv.grad, kk.grad
        ts = timed(run, repeats=repeats, warmup=warmup)
        with torch.no_grad():
            out[f"{name}_peak_nograd_bytes"] = peak_memory(lambda f=f: f(v, kern))
        vv, kk = v.clone().requires_grad_(True), kern.clone().requires_grad_(True)
        box = []
        out[f"{name}_peak_grad_bytes"], out[f"{name}_retained_grad_bytes"] = memory_profile(
            lambda f=f: box.append(f(vv, kk)))               # keeps the output and its graph alive
        box.clear()
        out[f"{name}_ms"] = 1e3 * statistics.median(ts)
        results[name] = run()
    out["max_abs_diff"] = max(float((a - b).detach().abs().max()) for a, b in zip(results["unfold"], results["taps"]))
    out["load"] = load_average()
    return out


# ----------------------------------------------------------------------- where a training step goes
STEP_CATEGORIES = (            # (category, substrings of profiler op names), first match wins
    ("dynamic aggregation (fused, fwd + bwd)", ("FusedAggregation", "DynamicAggregation", "GeneratedAggregation")),
    ("fused PDO filter (Neural ePDO, fwd + bwd)", ("pdo_filter", "GeneratedPDOFilter")),
    ("isotypic basis changes (fwd + bwd)", ("SlotChange",)),
    ("convolutions (oneDNN, fwd + bwd)", ("convolution", "conv2d", "conv3d")),
    ("batched matmuls (kernel generators, stencils)", ("bmm", "matmul", "addmm", "baddbmm", "aten::mm")),
    ("fused batch norm -> ReLU [-> pool] (fwd + bwd)", ("BatchNormReLU",)),
    ("batch / group norm", ("batch_norm", "group_norm")),
    ("pooling", ("pool",)),
    ("L1 norm (Neural ePDO)", ("vector_norm", "sgn", "abs")),
    ("dropout RNG (aten bernoulli_)", ("bernoulli",)),
    ("dropout (counter-based hash, fwd + bwd)", ("_Dropout",)),
    ("zero fill / copies", ("fill_", "zero_", "copy_")),
    ("pointwise (ReLU, mul, add, div, ...)", ("threshold", "clamp", "relu", "mul", "add", "div", "sub", "where")),
)


def _train_step(model: nn.Module, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *model.card.input_shape, generator=g)
    y = torch.randint(0, model.card.num_classes, (batch,), generator=g)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def step_profile(name: str, *, batch: int = 64, steps: int = 3, threads: int | None = 1) -> dict:
    """Where one training step (forward, backward, Adam) of registered model ``name`` spends its time,
    from ``torch.profiler`` self-CPU times grouped into :data:`STEP_CATEGORIES`. Returns
    ``{"name", "batch", "threads", "ms_per_step", "rows": [{"category", "ms", "share"}]}``."""
    from torch.profiler import ProfilerActivity, profile
    from ..models import create
    with torch_threads(threads):
        torch.manual_seed(0)
        step = _train_step(create(name), batch)
        for _ in range(2):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        ops = [(e.key, e.self_cpu_time_total / 1e3 / steps) for e in prof.key_averages()]
    total = sum(ms for _, ms in ops)
    cats = {c: 0.0 for c, _ in STEP_CATEGORIES}
    other = 0.0
    for key, ms in ops:
        for c, subs in STEP_CATEGORIES:
            if any(sub in key for sub in subs):
                cats[c] += ms
                break
        else:
            other += ms
    rows = [{"category": c, "ms": ms, "share": ms / total} for c, ms in cats.items() if ms > 0]
    rows.sort(key=lambda r: -r["ms"])
    rows.append({"category": "other (autograd, views, optimizer)", "ms": other, "share": other / total})
    return {"name": name, "batch": batch, "threads": threads, "ms_per_step": total, "rows": rows}


def step_profile_markdown(profiles: list[dict]) -> str:
    """One table: categories as rows, one ms / share column per profiled model."""
    cats = []
    for p in profiles:
        cats += [r["category"] for r in p["rows"] if r["category"] not in cats]
    head = "| where the time goes | " + " | ".join(f"{p['name']} ms (share)" for p in profiles) + " |"
    lines = [head, "|---|" + "---:|" * len(profiles)]
    for c in cats:
        cells = []
        for p in profiles:
            r = next((r for r in p["rows"] if r["category"] == c), None)
            cells.append(f"{r['ms']:.0f} ({100 * r['share']:.0f} %)" if r else "-")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("| **total per step** | " + " | ".join(f"**{p['ms_per_step']:.0f}**" for p in profiles) + " |")
    p0 = profiles[0]
    lines += ["", f"One training step (forward, backward, Adam), batch {p0['batch']}, {p0['threads']} thread(s), "
              "self-CPU time from torch.profiler (the profiler adds its own overhead; compare shares, and ratios "
              "with `training_step_ratio`)."]
    return "\n".join(lines)


def training_step_ratio(a: str, b: str, *, batch: int = 64, rounds: int = 8, threads: int | None = None) -> dict:
    """Images/s of registered model ``a``'s training step over ``b``'s, the two timed in alternation
    in one run (median of per-round ratios), as the issue's speed targets are stated."""
    from ..models import create
    with torch_threads(threads):
        torch.manual_seed(0)
        sa, sb = _train_step(create(a), batch), _train_step(create(b), batch)
        ta, tb = alternated(sa, sb, rounds=rounds, warmup=2)
        ratios = [q / p for p, q in zip(ta, tb)]
    return {"a": a, "b": b, "batch": batch, "threads": torch.get_num_threads() if threads is None else threads,
            "speed_ratio": statistics.median(ratios), "a_img_s": batch / statistics.median(ta),
            "b_img_s": batch / statistics.median(tb), "ratios": ratios, "load": load_average()}


def reference_speedup(name: str, *, batch: int = 64, rounds: int = 5, warmup: int = 1,
                      threads: int | None = 1) -> dict:
    """How much the fused kernels speed up one training step of registered model ``name``: the same
    model and batch stepped with the kit's kernels and inside :func:`kit.kernels.reference_kernels`
    (the plain-PyTorch paths the kit had before them: tap-loop aggregation, materialised Neural-ePDO
    stencils, oneDNN 1x1 convs), alternated in one run. ``speedup`` is the median of the per-round
    ratios reference time / kit time; ``min`` / ``max`` bound them. Command line:
    ``python -m kit bench --speedup NAME[,NAME...] --threads 1``."""
    from ..kernels import reference_kernels
    from ..models import create
    with torch_threads(threads):
        torch.manual_seed(0)
        step = _train_step(create(name), batch)

        def reference():
            with reference_kernels():
                step()
        tk, tr = alternated(step, reference, rounds=rounds, warmup=warmup)
        ratios = [r / k for k, r in zip(tk, tr)]
    return {"name": name, "batch": batch, "threads": torch.get_num_threads() if threads is None else threads,
            "rounds": rounds, "kit_ms": 1e3 * statistics.median(tk), "reference_ms": 1e3 * statistics.median(tr),
            "speedup": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "load": load_average()}


def reference_speedup_markdown(rows: list[dict]) -> str:
    """The rows of :func:`reference_speedup` as one table."""
    lines = ["| model | training step, reference kernels | with the kit's kernels | speedup (median; min-max) |",
             "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['name']}` | {r['reference_ms']:.0f} ms | {r['kit_ms']:.0f} ms "
                     f"| **{r['speedup']:.2f}x** ({r['min']:.2f}-{r['max']:.2f}) |")
    if rows:
        r = rows[0]
        lines += ["", f"Batch {r['batch']}, {r['threads']} thread(s), forward + backward + Adam, {r['rounds']} rounds "
                      f"alternating the two sides in one process; {r['load']} at the end."]
    return "\n".join(lines)
