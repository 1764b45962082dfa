"""Notebook 06 (separable G-CNNs on Lie groups) in library form: continuous SIREN kernels sampled on
grids of any size, separable vs non-separable kernels, and error vs angle for SE(2) grids.

* :func:`resample` puts the *same* SIREN on another grid: the parameters of a continuous-kernel layer
  do not depend on the number of sampled group elements.
* :func:`kernel_function_figure` draws the separable layer's H-kernel ``k_ij(dtheta)`` (SE(2)) or
  ``k_ij(dtheta, dlog s)`` (Sim(2)) densely, with the sampled grid points on top, and the spatial kernel
  ``k_j(h^-1 x)`` at every sampled output element.
* :func:`side_by_side_figure`: the identity element's kernel over the input group axis for a
  non-separable and a separable layer, with the rank-1 explained variance of each.
* :func:`error_sweep`: error vs angle with the interpolation floor
  (:func:`kit.equivariance.error_vs_angle`) for SE(2) grids of 4, 8, 16 rotations: a lifting layer's
  invariant part, or the logits of untrained, BN-calibrated ResNets.
* :func:`exactness_table`: every layer variant on SE(2) and Sim(2) at the 90-degree rotations.
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import torch

from . import models, redundancy
from .equivariance import error_vs_angle
from .groups import disk_mask
from .layers.separable import (SE2, LieGrid, LieGroupConv, LieLiftingConv, Sim2, _inv_det, _spatial_coords,
                              _spatial_mask)
from .sample import load_sample

__all__ = ["make_layers", "resample", "h_kernel", "spatial_kernels", "kernel_function_figure",
           "side_by_side_figure", "error_sweep", "exactness_table", "exactness_text", "grid_explorer"]


def make_layers(*, seed: int = 0, rotations: int = 8, scales: int = 1, in_fields: int = 4, out_fields: int = 4,
                kernel_size: int = 7) -> dict:
    """``{"nonseparable": layer, "separable": layer}`` group convs on SE(2) (``scales == 1``) or Sim(2)."""
    grid = SE2(rotations) if scales == 1 else Sim2(rotations, scales)
    out = {}
    for i, v in enumerate(("nonseparable", "separable")):
        torch.manual_seed(seed + i)
        out[v] = LieGroupConv(grid=grid, in_fields=in_fields, out_fields=out_fields, kernel_size=kernel_size,
                              variant=v).eval()
    return out


def resample(layer: LieGroupConv, grid: LieGrid) -> LieGroupConv:
    """The same continuous kernel (same SIREN weights) sampled on another grid of the same group type."""
    if grid.is_sim2 != layer.grid.is_sim2:
        raise ValueError(f"cannot move a {layer.grid.name} kernel to {grid.name}: the SIREN inputs differ")
    new = LieGroupConv(grid=grid, in_fields=layer.in_type.n_fields, out_fields=layer.out_type.n_fields,
                       kernel_size=layer.kernel_size, padding=layer.padding, variant=layer.variant,
                       **layer.siren_kw)
    new.load_state_dict(layer.state_dict())
    return new.eval()


@torch.no_grad()
def h_kernel(layer: LieGroupConv, dtheta: torch.Tensor, dlog_s: torch.Tensor | None = None) -> torch.Tensor:
    """The separable layer's H-kernel at relative rotations ``dtheta`` (radians, any values) and, for
    Sim(2), relative log-scales ``dlog_s`` (broadcast together): ``(..., O, C)``."""
    if layer.variant != "separable":
        raise ValueError(f"h_kernel needs a separable layer, got variant {layer.variant!r}")
    t = torch.as_tensor(dtheta, dtype=torch.float64) % (2 * math.pi)
    parts = [t / math.pi - 1.0]                                      # the reference's normalisation
    if layer.grid.is_sim2:
        if dlog_s is None:
            raise ValueError("a Sim(2) layer needs dlog_s")
        t, d = torch.broadcast_tensors(parts[0], torch.as_tensor(dlog_s, dtype=torch.float64))
        parts = [t, d]
    x = torch.stack(parts, -1).float()
    O, C = layer.out_type.n_fields, layer.in_type.n_fields
    return layer.kernel_net_h(x).view(*x.shape[:-1], O, C)


@torch.no_grad()
def spatial_kernels(layer: LieGroupConv, *, offset: float = 0.0) -> torch.Tensor:
    """The separable layer's spatial kernels at every sampled output element ``(N, S, O, k, k)``
    (masked and normalised as in the layer)."""
    g, k = layer.grid, layer.kernel_size
    X = _spatial_coords(g, k, offset, g.rotations)
    w = _spatial_mask(g, X) * _inv_det(g).view(1, -1, 1, 1)
    return (layer.kernel_net(X.float()) * w[..., None].float()).permute(0, 1, 4, 2, 3)


def _img(ax, a, v, title=None):
    ax.imshow(np.asarray(a, dtype=float), cmap="RdBu_r", vmin=-v, vmax=v)
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def kernel_function_figure(layer: LieGroupConv, *, out: int = 0, inp: int = 0, pairs: int = 3):
    """The continuous H-kernel with its grid samples (top) and the spatial kernel at every sampled
    output rotation (bottom) of a *separable* layer; see the module docstring."""
    g = layer.grid
    N, S = g.rotations, g.scales
    cols = max(N, 4)
    fig = plt.figure(figsize=(min(1.15 * cols + 1, 19), 4.2 + 1.2 * S))
    gs = fig.add_gridspec(1 + S, cols, height_ratios=[2.4] + [1.0] * S)
    ax = fig.add_subplot(gs[0, :])
    dense = torch.linspace(0, 2 * math.pi, 721)[:-1]
    grid_t = 2 * math.pi * torch.arange(N) / N
    deg = lambda t: np.degrees(np.asarray(t))
    if S == 1:
        kd, kg = h_kernel(layer, dense), h_kernel(layer, grid_t)
        for p in range(pairs):
            o, i = (out + p) % layer.out_type.n_fields, (inp + p) % layer.in_type.n_fields
            line, = ax.plot(deg(dense), kd[:, o, i].numpy(), lw=1.3, label=f"k_H[out {o}, in {i}]")
            ax.plot(deg(grid_t), kg[:, o, i].numpy(), "o", ms=6, color=line.get_color())
        ax.set_ylabel("k_H(dtheta)")
        ax.legend(fontsize=7, loc="upper right")
        ax.set_title(f"separable kernel on {g.name}: continuous H-kernel (lines) and the {N} sampled relative "
                     f"rotations (dots); the reference's angle encoding has a seam at 0/360", fontsize=9)
    else:
        ls = g.log_scales()
        dls = torch.linspace(-float(ls[-1]) * 1.15, float(ls[-1]) * 1.15, 121)
        kd = h_kernel(layer, dense[None, :], dls[:, None])[..., out, inp]            # (121, 720)
        v = float(kd.abs().max()) or 1.0
        ax.imshow(kd.numpy(), aspect="auto", origin="lower", cmap="RdBu_r", vmin=-v, vmax=v,
                  extent=[0, 360, float(dls[0]), float(dls[-1])])
        d = (ls[None, :] - ls[:, None]).flatten().unique()
        tt, dd = torch.meshgrid(torch.tensor(deg(grid_t), dtype=torch.float64), d, indexing="ij")
        ax.plot(tt.flatten(), dd.flatten(), "k.", ms=5)
        ax.set_ylabel("dlog s")
        ax.set_title(f"separable kernel on {g.name}: continuous H-kernel k_H(dtheta, dlog s)[out {out}, in {inp}] "
                     f"and the sampled grid (dots)", fontsize=9)
    ax.set_xlabel("relative rotation dtheta (degrees)")
    ax.set_xlim(0, 360)
    ax.set_xticks(range(0, 361, 45))
    ax.grid(alpha=0.3)
    KR = spatial_kernels(layer)[:, :, out]                                              # (N, S, k, k)
    v = float(KR.abs().max()) or 1.0
    step = max(1, math.ceil(N / cols))
    for s in range(S):
        for c, a in enumerate(range(0, N, step)):
            _img(fig.add_subplot(gs[1 + s, c]), KR[a, s], v,
                 f"k_R, {360 * a / N:g}°" + (f", s={math.exp(g.log_scales()[s]):.2f}" if S > 1 else ""))
    fig.tight_layout()
    return fig


def side_by_side_figure(layers: dict, *, out: int = 0, inp: int = 0):
    """Identity-element kernels ``K[out, inp]`` over the input group axis: non-separable (top row),
    separable (middle) and the non-separable kernel's best rank-1 (separable) approximation (bottom)."""
    non, sep = layers["nonseparable"], layers["separable"]
    Kn, Ks = non.canonical_kernel(), sep.canonical_kernel()
    g = non.grid
    D = g.dim
    R1 = redundancy.rank1_approximation(Kn[out:out + 1, inp:inp + 1])[0, 0]
    evn = redundancy.subgroup_stats(Kn).mean()
    evs = redundancy.subgroup_stats(Ks).mean()
    rows = [(f"non-separable\nEV1 {evn:.2f}", Kn[out, inp]), (f"separable\nEV1 {evs:.2f}", Ks[out, inp]),
            ("non-sep.\nrank-1 approx.", R1)]
    fig, axes = plt.subplots(3, D, figsize=(1.2 * D + 1.4, 4.4), squeeze=False)
    for r, (name, K) in enumerate(rows):
        v = float(K.abs().max()) or 1.0
        for d in range(D):
            a, s = divmod(d, g.scales)
            lab = f"{360 * a / g.rotations:g}°" + (f",s{s}" if g.scales > 1 else "")
            _img(axes[r, d], K[d], v, lab if r == 0 else None)
        axes[r, 0].set_ylabel(name, fontsize=8)
    fig.suptitle(f"{g.name}: kernel of output element 0 over the input group axis, field [out {out}, in {inp}] "
                 f"(EV1 = mean rank-1 explained variance over all fields)", fontsize=9)
    fig.tight_layout()
    return fig


def error_sweep(*, grids=(4, 8, 16), step: float = 5.0, seed: int = 0, digit: int = 7, level: str = "layer",
                calibration: int = 128, fields: int = 8, widths=(8, 8, 16), variant: str = "separable",
                **siren) -> dict:
    """``{"SE(2) N=n": [Record]}``: error vs angle (:func:`kit.equivariance.error_vs_angle`) for SE(2)
    grids of ``n`` rotations, same seed for every grid.

    ``level="layer"``: a non-separable lifting conv (``fields`` fields, kernel 7) followed by max-pooling
    over the group axis (the invariant part), compared with the rotated-back output at every angle;
    ``level="model"``: the logits of an untrained, BN-calibrated ``SepGResNet`` (``variant``, ``widths``).
    ``siren``: ``omega_0``, ``first_omega_0``, ``hidden``, ``num_hidden``.
    """
    if not 0 < step <= 360:
        raise ValueError(f"step must be in (0, 360] degrees, got {step}")
    if level not in ("layer", "model"):
        raise ValueError(f"level must be 'layer' or 'model', got {level!r}")
    from .layers import EquivariantSequential, GroupPool
    from .models.separable import SepGResNet

    imgs = load_sample()["images"] * disk_mask(28, 28).float()
    calib, x = imgs[-calibration:], imgs[digit:digit + 1]
    angles = [i * step for i in range(int(round(360 / step)) + 1)]
    out = {}
    for n in grids:
        torch.manual_seed(seed)
        if level == "layer":
            lift = LieLiftingConv(grid=SE2(n), in_channels=1, out_fields=fields, kernel_size=7, **siren)
            m = EquivariantSequential(lift, GroupPool(lift.out_type, mode="max")).eval()
        else:
            m = models.calibrate_batchnorm(SepGResNet(grid=SE2(n), variant=variant, widths=widths, **siren), calib)
        out[f"SE(2) N={n}"] = error_vs_angle(m, angles, x=x)
    return out


def exactness_table(*, grids=None, seed: int = 0) -> list[dict]:
    """Largest equivariance error over the rotations by multiples of 90 degrees, for every layer
    variant on SE(2) and Sim(2) (real digits as input); all should be float noise."""
    from .equivariance import check, max_error
    from .layers.separable import LIFT_VARIANTS, VARIANTS, LieLiftingConv as Lift

    grids = grids or [SE2(4), SE2(8), Sim2(4, 3)]
    imgs = load_sample()["images"] * disk_mask(28, 28).float()
    rows = []
    for g in grids:
        G = g.group
        els = [e for e in G.elements if G.is_exact_on_grid(e)]
        field = imgs[: 2 * 2 * g.dim, 0].reshape(2, 2, g.dim, 28, 28)
        for kind, variants in (("lifting", LIFT_VARIANTS), ("group conv", VARIANTS)):
            for v in variants:
                torch.manual_seed(seed)
                if kind == "lifting":
                    m, x = Lift(grid=g, in_channels=1, out_fields=3, kernel_size=5, variant=v), imgs[:2]
                else:
                    m, x = LieGroupConv(grid=g, in_fields=2, out_fields=3, kernel_size=5, variant=v), field
                rows.append({"group": g.name, "layer": kind, "variant": v,
                             "max_error_90": max_error(check(m, els, x=x))})
    return rows


def exactness_text(rows: list[dict]) -> str:
    lines = [f"{'group':26s} {'layer':11s} {'variant':13s} {'max error at 90/180/270':>24s}"]
    lines += [f"{r['group']:26s} {r['layer']:11s} {r['variant']:13s} {r['max_error_90']:24.1e}" for r in rows]
    return "\n".join(lines)


def grid_explorer(layer: LieGroupConv, *, rotations: int | None = None):
    """Sliders for the number of sampled rotations (and scales): the same SIREN, re-sampled."""
    import ipywidgets as W
    from IPython.display import display

    g = layer.grid
    rot = W.IntSlider(value=rotations or g.rotations, min=1, max=24, description="rotations",
                      continuous_update=False)
    sc = W.IntSlider(value=max(g.scales, 2), min=2, max=6, description="scales", continuous_update=False)
    outw = W.Output()
    box = W.VBox([W.HBox([rot] + ([sc] if g.is_sim2 else [])), outw])
    box.state = {"draws": 0, "figure": None, "args": None}            # what is shown now (read by tests)

    def draw(*_):
        grid = Sim2(rot.value, sc.value, g.s_max) if g.is_sim2 else SE2(rot.value)
        fig = kernel_function_figure(resample(layer, grid))
        box.state.update(draws=box.state["draws"] + 1, figure=fig, args=(rot.value, grid.scales))
        with outw:
            outw.clear_output(wait=True)
            display(fig)
        plt.close(fig)

    rot.observe(draw, names="value")
    sc.observe(draw, names="value")
    draw()
    return box
