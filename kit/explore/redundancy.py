"""Kernel redundancy of group convolutions: how close is a kernel to *separable*?

The observation that motivates separable G-CNNs (Knigge, Romero & Bekkers, ICML 2022): in a trained
regular G-CNN, the spatial slices of a group-conv kernel along the subgroup axis look like multiples
of one spatial pattern, i.e. the kernel is nearly rank 1 in the ``(subgroup) x (space)`` unfolding.
This module measures exactly what a separable kernel assumes (spec section 7):

* **subgroup axis**: for each output field ``o`` and input field ``i``, the kernel of the identity
  output element ``A = K[o, i]`` unfolded to ``(D, k*k)`` (``D`` = size of the input group axis);
* **channels** (the ``separable`` variant also shares the spatial kernel over input channels):
  ``A = K[o]`` unfolded to ``(C*D, k*k)``.

For each ``A`` with singular values ``s``: the rank-1 explained variance ``s_1^2 / sum s^2`` (1 for a
separable kernel), the effective rank ``exp(H(s^2 / sum s^2))`` and the rank-1 relative error
``||A - s_1 u_1 v_1^T||_F / ||A||_F = sqrt(1 - explained)``.

Works for the kernels of any group-conv layer of the kit: :class:`kit.layers.GroupConv` (weights
``(O, C, |G|, k, k)`` are already the identity element's kernel) and the SE(2) / Sim(2) layers of
:mod:`kit.layers.separable` (``canonical_kernel()``), or any module exposing ``canonical_kernel()``.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn

__all__ = ["KernelStats", "LayerReport", "group_kernel", "group_conv_layers", "spectrum", "subgroup_stats",
           "channel_stats", "rank1_approximation", "analyze", "compare", "compare_table", "random_baseline",
           "spectra_figure", "explained_variance_figure", "slices_figure", "rank1_figure", "summary_figure",
           "wrap", "train_with_initial", "kernel_explorer"]

AXES = ("subgroup", "channels")


# ------------------------------------------------------------------------------- kernels
def group_kernel(layer: nn.Module) -> torch.Tensor:
    """The identity output element's kernel ``(O, C, D, k, k)`` of a group-conv layer (detached), through
    the family-protocol hook :meth:`kit.layers.EquivariantModule.canonical_kernel`."""
    hook = getattr(layer, "canonical_kernel", None)
    K = hook() if hook is not None else None
    if K is None:
        raise ValueError(f"{type(layer).__name__} is not a group convolution with a static kernel (expected a kit layer whose "
                         f"canonical_kernel() returns one, e.g. kit.layers.GroupConv)")
    return K.detach()


def group_conv_layers(model: nn.Module, *, min_kernel: int = 2) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every layer in ``model`` with a static group kernel (``canonical_kernel()``
    is not None) of spatial size at least ``min_kernel`` (1x1 skips are rank 1 trivially and left out by
    default). Lifting layers have no input group axis and are not group convolutions here."""
    out = []
    for name, m in model.named_modules():
        hook = getattr(m, "canonical_kernel", None)
        if hook is not None and getattr(m, "kernel_size", min_kernel) >= min_kernel and hook() is not None:
            out.append((name or type(m).__name__, m))
    return out


# ------------------------------------------------------------------------------ statistics
@dataclass
class KernelStats:
    """Spectral statistics of a batch of unfolded kernels ``A (..., m, n)``.

    ``singular_values (..., r)`` (descending), ``explained``, ``effective_rank``, ``rank1_error`` of
    shape ``(...)``; all-zero matrices give NaN (and are ignored by :meth:`mean`).
    """

    singular_values: torch.Tensor
    explained: torch.Tensor
    effective_rank: torch.Tensor
    rank1_error: torch.Tensor

    @property
    def energy(self) -> torch.Tensor:
        """``s_i^2 / sum s^2`` per matrix, ``(..., r)``."""
        s2 = self.singular_values.square()
        return s2 / s2.sum(-1, keepdim=True)

    def mean(self, what: str = "explained") -> float:
        v = getattr(self, what).flatten()
        v = v[~torch.isnan(v)]
        return float(v.mean()) if v.numel() else float("nan")

    def median(self, what: str = "explained") -> float:
        v = getattr(self, what).flatten()
        v = v[~torch.isnan(v)]
        return float(v.median()) if v.numel() else float("nan")


def spectrum(A: torch.Tensor) -> KernelStats:
    """Statistics of the matrices ``A (..., m, n)`` (computed in float64)."""
    if A.dim() < 2:
        raise ValueError(f"expected matrices (..., m, n), got shape {tuple(A.shape)}")
    s = torch.linalg.svdvals(A.detach().double())                                  # (..., r)
    s2 = s.square()
    tot = s2.sum(-1)
    zero = tot <= 0
    p = s2 / torch.where(zero, torch.ones_like(tot), tot)[..., None]
    ev = torch.where(zero, torch.full_like(tot, float("nan")), p[..., 0])
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    erank = torch.where(zero, torch.full_like(tot, float("nan")), torch.exp(ent))
    err = torch.sqrt((1.0 - ev).clamp_min(0.0))
    return KernelStats(s, ev, erank, err)


def _unfold(K: torch.Tensor, axis: str) -> torch.Tensor:
    if K.dim() != 5:
        raise ValueError(f"expected a group kernel (O, C, D, k, k), got shape {tuple(K.shape)}")
    O, C, D, k1, k2 = K.shape
    if axis == "subgroup":
        return K.reshape(O, C, D, k1 * k2)
    if axis == "channels":
        return K.reshape(O, C * D, k1 * k2)
    raise ValueError(f"axis must be one of {AXES}, got {axis!r}")


def subgroup_stats(K: torch.Tensor) -> KernelStats:
    """Per ``(o, i)``: the ``(D, k*k)`` unfolding of ``K (O, C, D, k, k)``."""
    return spectrum(_unfold(K, "subgroup"))


def channel_stats(K: torch.Tensor) -> KernelStats:
    """Per ``o``: the ``(C*D, k*k)`` unfolding of ``K (O, C, D, k, k)``."""
    return spectrum(_unfold(K, "channels"))


def rank1_approximation(K: torch.Tensor, axis: str = "subgroup") -> torch.Tensor:
    """The best rank-1 approximation ``s_1 u_1 v_1^T`` of every unfolding, reshaped like ``K``."""
    A = _unfold(K, axis).double()
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    R = S[..., :1, None] * U[..., :, :1] @ Vh[..., :1, :]
    return R.reshape(K.shape).to(K.dtype)


def random_baseline(rows: int, cols: int, *, samples: int = 2000, seed: int = 0) -> float:
    """Mean rank-1 explained variance of i.i.d. Gaussian ``rows x cols`` matrices: the value an
    unstructured kernel gives (compare with ``1 / min(rows, cols)`` and with 1 for a separable one)."""
    g = torch.Generator().manual_seed(seed)
    return spectrum(torch.randn(samples, rows, cols, generator=g, dtype=torch.float64)).mean()


# ------------------------------------------------------------------------------- per layer
@dataclass
class LayerReport:
    name: str
    shape: tuple
    subgroup: KernelStats
    channels: KernelStats
    kernel: torch.Tensor

    def row(self) -> dict:
        O, C, D, k, _ = self.shape
        return {"layer": self.name, "shape": f"{O}x{C}x{D}x{k}x{k}",
                "rank1_ev_subgroup": self.subgroup.mean(), "eff_rank_subgroup": self.subgroup.mean("effective_rank"),
                "rank1_ev_channels": self.channels.mean(), "eff_rank_channels": self.channels.mean("effective_rank"),
                "random_ev_subgroup": random_baseline(D, k * k, samples=500)}


def analyze(model: nn.Module, *, min_kernel: int = 2) -> list[LayerReport]:
    """One :class:`LayerReport` per group convolution of ``model`` (or of the single layer ``model``)."""
    layers = group_conv_layers(model, min_kernel=min_kernel)
    if not layers:
        raise ValueError(f"{type(model).__name__} contains no group convolution with a kernel of size "
                         f">= {min_kernel}")
    reports = []
    for name, layer in layers:
        K = group_kernel(layer)
        reports.append(LayerReport(name, tuple(K.shape), subgroup_stats(K), channel_stats(K), K))
    return reports


def compare(trained: list[LayerReport] | nn.Module, initial: list[LayerReport] | nn.Module) -> list[dict]:
    """Trained vs initial kernels, layer by layer: mean rank-1 explained variance and effective rank
    along both axes, the unstructured (i.i.d. Gaussian) baseline of the same shape, and the relative
    kernel change ``||K_t - K_0|| / ||K_0||``."""
    t = trained if isinstance(trained, list) else analyze(trained)
    i = initial if isinstance(initial, list) else analyze(initial)
    if [r.name for r in t] != [r.name for r in i]:
        raise ValueError("trained and initial models have different group-conv layers: "
                         f"{[r.name for r in t]} vs {[r.name for r in i]}")
    rows = []
    for a, b in zip(t, i):
        O, C, D, k, _ = a.shape
        rows.append({"layer": a.name, "rank1_ev_trained": a.subgroup.mean(), "rank1_ev_init": b.subgroup.mean(),
                     "rank1_ev_random": random_baseline(D, k * k, samples=500),
                     "eff_rank_trained": a.subgroup.mean("effective_rank"),
                     "eff_rank_init": b.subgroup.mean("effective_rank"),
                     "channel_ev_trained": a.channels.mean(), "channel_ev_init": b.channels.mean(),
                     "kernel_change": float((a.kernel - b.kernel).norm() / b.kernel.norm().clamp_min(1e-30))})
    return rows


def compare_table(rows: list[dict]) -> str:
    """Fixed-width table of :func:`compare` rows (for notebooks and logs)."""
    head = f"{'layer':28s} {'rank-1 EV trained':>17s} {'init':>7s} {'eff.rank trained':>16s} {'init':>7s} " \
           f"{'chan EV trained':>15s} {'init':>7s} {'|dK|/|K0|':>9s}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['layer'][:28]:28s} {r['rank1_ev_trained']:17.3f} {r['rank1_ev_init']:7.3f} "
                     f"{r['eff_rank_trained']:16.2f} {r['eff_rank_init']:7.2f} {r['channel_ev_trained']:15.3f} "
                     f"{r['channel_ev_init']:7.3f} {r['kernel_change']:9.2f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- figures
FONT = 9                                  # smallest font of every figure (>= 10 pt on screen at <= 7.5 in)
WIDTH = 7.4                               # figure width (in): 888 px at 120 dpi, shown unscaled in a notebook


def wrap(text: str, width: float = WIDTH, fontsize: float = FONT + 1) -> str:
    """``text`` with every line wrapped to fit ``width`` inches at ``fontsize`` (long titles)."""
    n = max(20, int(width * 72 / (0.56 * fontsize)))
    return "\n".join(textwrap.fill(line, n) for line in text.split("\n"))


def _stats(r: LayerReport, axis: str) -> KernelStats:
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    return getattr(r, axis)


def _grid_axes(n: int, height: float = 2.35):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(WIDTH, height * rows + 0.9), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _shared_legend(fig, axes, n: int):
    """One legend for all ``n`` panels (the first panel's handles): in the first unused grid slot, else
    below the panels."""
    kw = dict(fontsize=FONT, frameon=False)
    if len(axes) > n:
        axes[n].set_visible(True), axes[n].axis("off")
        axes[n].legend(*axes[0].get_legend_handles_labels(), loc="center", **kw)
    else:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=2, **kw)


def spectra_figure(reports: list[LayerReport], initial: list[LayerReport] | None = None, *,
                   axis: str = "subgroup"):
    """Normalised singular-value spectra ``s_i^2 / sum s^2`` per layer: median and 10-90 % band over
    the kernels; trained (solid) vs initial (dashed) when ``initial`` is given."""
    fig, axes = _grid_axes(len(reports))
    for j, r in enumerate(reports):
        ax = axes[j]
        series = [("trained" if initial is not None else "kernels", r, "#1f77b4", "-")]
        if initial is not None:
            series.append(("init", initial[j], "#7f7f7f", "--"))
        for label, rep, col, ls in series:
            e = _stats(rep, axis).energy
            e = e.reshape(-1, e.shape[-1])
            e = e[~torch.isnan(e).any(-1)].numpy()
            idx = np.arange(1, e.shape[1] + 1)
            ax.plot(idx, np.median(e, 0), ls, color=col, marker="o", ms=3, label=f"{label}: median,\n10-90 % band")
            ax.fill_between(idx, np.quantile(e, 0.1, 0), np.quantile(e, 0.9, 0), color=col, alpha=0.2)
        ax.set_yscale("log")
        ax.set_ylim(1e-4, 1.2)
        ax.set_xticks(idx if len(idx) <= 6 else np.unique(np.linspace(1, len(idx), 5).round().astype(int)))
        ev = ", ".join(f"{lab} {_stats(rep, axis).mean():.2f}" for lab, rep, _, _ in series)
        ax.set_title(f"{r.name} ({'x'.join(map(str, r.shape))})\nEV1 {ev}", fontsize=FONT)
        ax.set_xlabel("singular value index", fontsize=FONT)
        if j % 3 == 0:
            ax.set_ylabel(r"$s_i^2\,/\,\Sigma_j\,s_j^2$", fontsize=FONT + 1)
        ax.tick_params(labelsize=FONT)
        ax.grid(alpha=0.3)
    _shared_legend(fig, axes, len(reports))
    fig.suptitle(f"Singular-value spectra of group-conv kernels along the {axis} axis (rank 1 = separable)",
                 fontsize=FONT + 1)
    return fig


def explained_variance_figure(reports: list[LayerReport], initial: list[LayerReport] | None = None, *,
                              axis: str = "subgroup"):
    """Histograms of the rank-1 explained variance per layer, trained vs initial; the per-layer mean
    is printed in each panel title and marked by a vertical line."""
    fig, axes = _grid_axes(len(reports))
    bins = np.linspace(0, 1, 26)
    for j, r in enumerate(reports):
        ax = axes[j]
        pairs = [("trained" if initial is not None else "kernels", r, "#1f77b4")]
        if initial is not None:
            pairs.append(("init", initial[j], "#7f7f7f"))
        title = []
        for label, rep, col in pairs:
            st = _stats(rep, axis)
            v = st.explained.flatten()
            v = v[~torch.isnan(v)].numpy()
            ax.hist(v, bins=bins, color=col, alpha=0.55, label=f"{label}\n(line: its mean)", density=True)
            ax.axvline(st.mean(), color=col, lw=1.5)
            title.append(f"{label} {st.mean():.2f}")
        ax.set_title(f"{r.name}\nmean EV1 " + ", ".join(title), fontsize=FONT)
        ax.set_xlabel("rank-1 explained variance", fontsize=FONT)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1], ["0", ".25", ".5", ".75", "1"])
        ax.tick_params(labelsize=FONT)
        if j % 3 == 0:
            ax.set_ylabel("density", fontsize=FONT)
    _shared_legend(fig, axes, len(reports))
    fig.suptitle(f"Rank-1 explained variance of kernels along the {axis} axis (1 = separable)", fontsize=FONT + 1)
    return fig


def slices_figure(rows: list[tuple[str, torch.Tensor]], labels: list[str], title: str, *,
                  vmax: float | None = None, max_cols: int = 8):
    """Kernels over a group axis: one row of images per ``(name, T (D, k, k))`` in ``rows``, columns
    titled by ``labels`` (wrapped into blocks of at most ``max_cols`` columns); one symmetric colour
    scale ``vmax`` for all, or one per row (``None``)."""
    D = len(labels)
    cols = math.ceil(D / math.ceil(D / max_cols))
    blocks = math.ceil(D / cols)
    w = min(1.25, (WIDTH - 1.1) / cols)
    n = len(rows) * blocks
    fig, axes = plt.subplots(n, cols, figsize=(w * cols + 1.1, w * n + 0.3 * blocks + 0.2 * (title.count("\n") + 2)),
                             squeeze=False, layout="constrained")
    for b in range(blocks):
        for r, (name, T) in enumerate(rows):
            v = vmax or float(T.abs().max()) or 1.0
            for c in range(cols):
                ax, d = axes[b * len(rows) + r, c], b * cols + c
                if d >= D:
                    ax.set_visible(False)
                    continue
                ax.imshow(np.asarray(T[d], dtype=float), cmap="RdBu_r", vmin=-v, vmax=v)
                ax.set_xticks([]), ax.set_yticks([])
                if r == 0:
                    ax.set_title(labels[d], fontsize=FONT)
            axes[b * len(rows) + r, 0].set_ylabel(name, fontsize=FONT)
    fig.suptitle(title, fontsize=FONT + 1)
    return fig


def rank1_figure(K: torch.Tensor, *, out: int = 0, inp: int = 0, labels: list[str] | None = None,
                 title: str | None = None):
    """One kernel ``K[out, inp]`` laid out over its group axis (top), its rank-1 reconstruction
    (middle) and the residual (bottom), on one symmetric colour scale."""
    if K.dim() != 5:
        raise ValueError(f"expected a group kernel (O, C, D, k, k), got shape {tuple(K.shape)}")
    A = K[out:out + 1, inp:inp + 1]
    R = rank1_approximation(A)
    st = subgroup_stats(A)
    D = A.shape[2]
    title = title or (f"kernel [out {out}, in {inp}] over the group axis: rank-1 explained variance "
                      f"{st.mean():.3f}, relative error {st.mean('rank1_error'):.3f}")
    return slices_figure([(name, T[0, 0].float()) for name, T in (("kernel", A), ("rank-1", R), ("residual", A - R))],
                         labels or [f"h={d}" for d in range(D)], wrap(title, min(WIDTH, 1.25 * D + 1.1)),
                         vmax=float(A.abs().max()) or 1.0)


def summary_figure(rows: list[dict]):
    """Bar chart of :func:`compare` rows: mean rank-1 explained variance per layer, trained vs init."""
    fig, ax = plt.subplots(figsize=(min(WIDTH, max(4.0, 1.1 * len(rows) + 1.5)), 3.8), layout="constrained")
    x = np.arange(len(rows))
    t = [r["rank1_ev_trained"] for r in rows]
    i = [r["rank1_ev_init"] for r in rows]
    ax.bar(x - 0.2, t, 0.4, label="trained", color="#1f77b4")
    ax.bar(x + 0.2, i, 0.4, label="init", color="#7f7f7f")
    base = [r.get("rank1_ev_random") for r in rows]
    if all(b is not None for b in base):
        ax.hlines(base, x - 0.45, x + 0.45, colors="k", linestyles="--", lw=1.2, label="i.i.d. random kernels")
    for xx, a, b in zip(x, t, i):
        ax.text(xx - 0.2, a / 2, f"{a:.2f}", ha="center", va="center", fontsize=FONT, color="w", rotation=90)
        ax.text(xx + 0.2, b / 2, f"{b:.2f}", ha="center", va="center", fontsize=FONT, color="w", rotation=90)
    tilt = sum(len(r["layer"]) + 2 for r in rows) > 60                   # labels would touch
    ax.set_xticks(x, [r["layer"] for r in rows], rotation=30 if tilt else 0, ha="right" if tilt else "center",
                  fontsize=FONT)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean rank-1 explained variance", fontsize=FONT + 1)
    ax.tick_params(labelsize=FONT)
    ax.legend(fontsize=FONT, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    fig.suptitle("Kernel separability along the subgroup axis per layer", fontsize=FONT + 1)
    return fig


# ---------------------------------------------------------------------------- notebook 02
def train_with_initial(model: str = "p4-mnist", *, dataset: str = "mnist-rot-rebuilt", preset: str = "mnist-quick",
                       epochs: int = 2, train_subset: int | None = 2000, val_subset: int | None = 500,
                       test_subset: int | None = 1000, seed: int = 0, threads: int | None = None,
                       progress: bool = False, out_dir=None, **overrides):
    """``(trained, initial, summary)``: a registry model trained with :func:`kit.run.train.train` and a copy
    of its weights at initialisation (the control of the redundancy analysis)."""
    import copy

    from .. import models
    from ..run.train import train

    torch.manual_seed(seed)
    net = models.create(model)
    initial = copy.deepcopy(net).eval()
    summary = train(net, dataset, preset=preset, epochs=epochs, seed=seed, train_subset=train_subset,
                    val_subset=val_subset, test_subset=test_subset, threads=threads, progress=progress,
                    out_dir=out_dir, **overrides)
    return net.eval(), initial, summary


def pretrained_with_initial(model: str = "p4-mnist"):
    """``(trained, initial, summary)`` from the zoo: the trained weights of ``model``
    (:mod:`kit.run.zoo`) and exactly the initial weights its training run started from
    (:func:`kit.run.zoo.initial_twin`); ``summary`` is the run's summary (as :func:`train_with_initial`)."""
    from .. import models
    from ..run import zoo

    trained = models.create(model, pretrained=True)
    initial = zoo.initial_twin(model)
    return trained, initial, zoo.manifest(model)["summary"]


def trained_and_initial(model: str = "p4-mnist", *, pretrained: bool = True, **train_kw):
    """``(trained, initial, summary)``: from the zoo (:func:`pretrained_with_initial`) or, with
    ``pretrained=False``, trained here for a short run (:func:`train_with_initial` and ``train_kw``)."""
    if pretrained:
        return pretrained_with_initial(model)
    return train_with_initial(model, **train_kw)


def kernel_explorer(trained: list[LayerReport], initial: list[LayerReport] | None = None):
    """ipywidgets: pick a layer, an output and an input field, trained or initial weights; shows
    :func:`rank1_figure` (kernel over the group axis, rank-1 reconstruction, residual)."""
    import ipywidgets as W
    from .widgets import explorer

    layer = W.Dropdown(options=[(r.name, i) for i, r in enumerate(trained)], value=len(trained) - 1,
                       description="layer")
    out = W.IntSlider(value=0, min=0, max=trained[-1].shape[0] - 1, description="out field",
                      continuous_update=False)
    inp = W.IntSlider(value=0, min=0, max=trained[-1].shape[1] - 1, description="in field",
                      continuous_update=False)
    which = W.ToggleButtons(options=["trained"] + (["init"] if initial is not None else []), value="trained")

    def render():
        r = (trained if which.value == "trained" else initial)[layer.value]
        out.max, inp.max = r.shape[0] - 1, r.shape[1] - 1
        fig = rank1_figure(r.kernel, out=out.value, inp=inp.value,
                           title=f"{which.value} {r.name}: kernel [out {out.value}, in {inp.value}] over the "
                                 f"group axis, its rank-1 reconstruction and the residual")
        return fig, (r.name, out.value, inp.value, which.value)

    return explorer([[layer, which], [out, inp]], render)
