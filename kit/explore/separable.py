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

Trained kernels (the zoo, :mod:`kit.run.zoo`):

* :func:`zoo_pair` returns a trained zoo model and its initial twin (the exact weights its run started
  from); :func:`kernel_layer` picks one of their convolutions by name (``"stages.0.conv1"``).
  :func:`kernel_function_figure` and :func:`grid_explorer` take ``initial=`` to draw both.
* :func:`kernel_changes` / :func:`trained_vs_initial_figure`: how far training moved each kernel
  function, on the sampled grid (what the loss sees) and on a finer grid of rotations (between the
  samples, where nothing constrains it), and what it did to one layer's H-kernel and spatial kernels.
* :func:`redundancy_rows` / :func:`redundancy_figure`: the paper's redundancy measure (rank-1 explained
  variance of each kernel's slices along the input rotation axis, :mod:`kit.explore.redundancy`). The zoo has
  no trained *non-separable* SE(2) model; the depthwise-separable one (``dsep-se2-mnist-small``,
  ``k_ij * k_j(x, h)``) is the trained kernel that is free to be non-separable in ``(x, h)``, and is
  compared with its initialisation, an untrained non-separable model and i.i.d. random kernels.
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
import numpy as np
import torch
import torch.nn as nn

from .. import models
from . import redundancy
from .redundancy import WIDTH, wrap
from ..equivariance import error_vs_angle
from ..groups import disk_mask
from ..layers.separable import LieGroupConv, LieLiftingConv, _inv_det, _LieConv, _spatial_coords, _spatial_mask
from ..lie import SE2, LieGrid, Sim2
from ..data.sample import load_sample

__all__ = ["make_layers", "resample", "h_kernel", "spatial_kernels", "kernel_function_figure",
           "side_by_side_figure", "error_sweep", "exactness_table", "exactness_text", "grid_explorer",
           "SE2_MODEL", "SIM2_MODEL", "DSEP_MODEL", "open_kernels", "zoo_pair", "conv_layers", "kernel_layer",
           "invariance_90", "pretrained_text", "kernel_changes", "kernel_changes_text", "trained_vs_initial_figure",
           "redundancy_rows", "redundancy_text", "redundancy_figure"]

SE2_MODEL, SIM2_MODEL, DSEP_MODEL = "sep-se2-mnist-small", "sep-sim2-mnist-small", "dsep-se2-mnist-small"
FONT = 9                                                                  # smallest font of every figure


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


def resample(layer: _LieConv, grid: LieGrid) -> _LieConv:
    """The same continuous kernel (same SIREN weights) sampled on another grid of the same group type
    (a group conv or a lifting layer)."""
    if grid.is_sim2 != layer.grid.is_sim2:
        raise ValueError(f"cannot move a {layer.grid.name} kernel to {grid.name}: the SIREN inputs differ")
    kw = dict(grid=grid, out_fields=layer.out_type.n_fields, kernel_size=layer.kernel_size, padding=layer.padding,
              variant=layer.variant, **layer.siren_kw)
    if isinstance(layer, LieLiftingConv):
        new = LieLiftingConv(in_channels=layer.in_type.n_fields, **kw)
    else:
        new = LieGroupConv(in_fields=layer.in_type.n_fields, **kw)
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
        ax.set_title(title, fontsize=FONT)


def kernel_function_figure(layer: LieGroupConv, *, initial: LieGroupConv | None = None, out: int = 0,
                           inp: int = 0, pairs: int = 3, labels=("trained", "initial")):
    """The continuous H-kernel with its grid samples (top) and the spatial kernel at every sampled
    output rotation (bottom) of a *separable* layer; see the module docstring.

    ``initial``: the same layer before training (:func:`zoo_pair`), drawn beside it: dashed H-kernel
    curves (SE(2)) or a second panel (Sim(2)), and its spatial kernels beside or below the trained
    ones, on the same colour scale. ``labels`` name the two. At most 16 rotations (Sim(2): 8) per
    scale are drawn, evenly spaced, in rows of at most 8."""
    g = layer.grid
    if initial is not None and (initial.grid != g or initial.variant != layer.variant):
        raise ValueError(f"initial must be the same layer on the same grid, got {initial.grid.name} "
                         f"{initial.variant} vs {g.name} {layer.variant}")
    N, S = g.rotations, g.scales
    shown = [(labels[0] if initial is not None else None, layer)] + ([(labels[1], initial)] if initial is not None else [])
    drawn = list(range(0, N, math.ceil(N / (16 if S == 1 else 8))))                # sampled rotations drawn
    side = len(shown) * len(drawn) <= 8                                             # panes side by side
    cols = len(drawn) if side else min(len(drawn), 8)
    per = math.ceil(len(drawn) / cols)                                              # rows per scale
    pw = min(1.1, (WIDTH - 1.0) / (cols * (len(shown) if side else 1)))            # image size (in)
    n_rows = S * per * (1 if side else len(shown))
    top_h = 2.8 if S == 1 else 2.6
    bottom_h = pw * n_rows + 0.3 * per * (1 if side else len(shown))       # titles on scale-0 rows
    fig = plt.figure(figsize=(WIDTH, top_h + bottom_h + 1.0), layout="constrained")
    outer = fig.add_gridspec(2, 1, height_ratios=[top_h, bottom_h])
    dense = torch.linspace(0, 2 * math.pi, 721)[:-1]
    grid_t = 2 * math.pi * torch.arange(N) / N
    deg = lambda t: np.degrees(np.asarray(t))
    if S == 1:
        ax = fig.add_subplot(outer[0])
        curves = [(h_kernel(L, dense), h_kernel(L, grid_t)) for _, L in shown]
        for p in range(pairs):
            o, i = (out + p) % layer.out_type.n_fields, (inp + p) % layer.in_type.n_fields
            color = None
            for j, (kd, kg) in enumerate(curves):
                line, = ax.plot(deg(dense), kd[:, o, i].numpy(), "-" if j == 0 else "--", lw=1.5 if j == 0 else 1.1,
                                color=color, label=f"out {o}, in {i}" if j == 0 else None)
                color = line.get_color()
                ax.plot(deg(grid_t), kg[:, o, i].numpy(), "o", ms=6, color=color,
                        mfc=color if j == 0 else "white")
        handles, _ = ax.get_legend_handles_labels()
        style = [Line2D([], [], color="k", ls=ls, marker="o", ms=5, mfc=mfc, label=name)
                 for (name, _), ls, mfc in zip(shown, ("-", "--"), ("k", "white")) if name]
        ax.legend(handles=handles + style, fontsize=FONT, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_ylabel("k_H(dtheta)", fontsize=FONT + 1)
        what = ", trained solid, initial dashed" if initial is not None else ""
        fig.suptitle(wrap(f"Separable kernel on {g.name}: continuous H-kernel (lines{what}) and its values at the "
                          f"{N} sampled relative rotations (dots); the angle encoding theta/pi - 1 has a seam at "
                          f"0/360°", WIDTH, FONT + 2), fontsize=FONT + 2)
        axes_top = [ax]
    else:
        ls = g.log_scales()
        dls = torch.linspace(-float(ls[-1]) * 1.15, float(ls[-1]) * 1.15, 121)
        kds = [h_kernel(L, dense[None, :], dls[:, None])[..., out, inp] for _, L in shown]   # (121, 720) each
        v = max(float(k.abs().max()) for k in kds) or 1.0
        sub = outer[0].subgridspec(1, len(shown))
        d = (ls[None, :] - ls[:, None]).flatten().unique()
        tt, dd = torch.meshgrid(torch.tensor(deg(grid_t), dtype=torch.float64), d, indexing="ij")
        axes_top = []
        for j, ((name, _), kd) in enumerate(zip(shown, kds)):
            ax = fig.add_subplot(sub[0, j])
            im = ax.imshow(kd.numpy(), aspect="auto", origin="lower", cmap="RdBu_r", vmin=-v, vmax=v,
                           extent=[0, 360, float(dls[0]), float(dls[-1])])
            ax.plot(tt.flatten(), dd.flatten(), "k.", ms=5)
            if j == 0:
                ax.set_ylabel("relative log-scale dlog s", fontsize=FONT + 1)
            ax.set_title(name or f"k_H[out {out}, in {inp}]", fontsize=FONT + 1)
            axes_top.append(ax)
        fig.colorbar(im, ax=axes_top, fraction=0.04, pad=0.02).ax.tick_params(labelsize=FONT)
        fig.suptitle(wrap(f"Separable kernel on {g.name}: continuous H-kernel\n"
                          f"k_H(dtheta, dlog s)[out {out}, in {inp}] and the sampled grid (dots)", WIDTH, FONT + 2),
                     fontsize=FONT + 2)
    for ax in axes_top:
        ax.set_xlabel("relative rotation dtheta (degrees)", fontsize=FONT + 1)
        ax.set_xlim(0, 360)
        ax.set_xticks(range(0, 361, 45 if S == 1 else 90))
        ax.tick_params(labelsize=FONT)
        ax.grid(alpha=0.3)
    KRs = [spatial_kernels(L)[:, :, out] for _, L in shown]                            # (N, S, k, k) each
    v = max(float(k.abs().max()) for k in KRs) or 1.0
    panes = outer[1].subgridspec(1, len(shown), wspace=0.08) if side else outer[1].subgridspec(len(shown), 1)
    for j, ((name, _), KR) in enumerate(zip(shown, KRs)):
        gs = panes[j].subgridspec(S * per, cols)
        for s in range(S):
            for n, a in enumerate(drawn):
                r, c = s * per + n // cols, n % cols
                ax = fig.add_subplot(gs[r, c])
                _img(ax, KR[a, s], v, f"{360 * a / N:g}°" if s == 0 else None)
                if c == 0 and n < cols:
                    lab = "\n".join(x for x in (name, f"s={math.exp(g.log_scales()[s]):.2f}" if S > 1 else None) if x)
                    ax.set_ylabel(lab, fontsize=FONT)
    fig.supxlabel(f"spatial kernel k_R[out {out}] at the sampled output rotations"
                  + (" and scales" if S > 1 else "") + ", one colour scale", fontsize=FONT + 1)
    return fig


def side_by_side_figure(layers: dict, *, out: int = 0, inp: int = 0):
    """Identity-element kernels ``K[out, inp]`` over the input group axis: non-separable (top row),
    separable (middle) and the non-separable kernel's best rank-1 (separable) approximation (bottom)."""
    non, sep = layers["nonseparable"], layers["separable"]
    Kn, Ks = non.canonical_kernel(), sep.canonical_kernel()
    g = non.grid
    R1 = redundancy.rank1_approximation(Kn[out:out + 1, inp:inp + 1])[0, 0]
    evn = redundancy.subgroup_stats(Kn).mean()
    evs = redundancy.subgroup_stats(Ks).mean()
    rows = [(f"non-separable\nEV1 {evn:.2f}", Kn[out, inp]), (f"separable\nEV1 {evs:.2f}", Ks[out, inp]),
            ("non-sep.\nrank-1 approx.", R1)]
    labels = [f"{360 * a / g.rotations:g}°" + (f",s{s}" if g.scales > 1 else "")
              for a, s in (divmod(d, g.scales) for d in range(g.dim))]
    return redundancy.slices_figure(rows, labels, wrap(
        f"{g.name}: kernel of output element 0 over the input group axis, field [out {out}, in {inp}]\n"
        f"(EV1 = mean rank-1 explained variance over all fields)", WIDTH))


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
    from ..layers import EquivariantSequential, GroupPool
    from ..models.separable import SepGResNet

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
    from ..equivariance import check, max_error
    from ..layers.separable import LIFT_VARIANTS, VARIANTS, LieLiftingConv as Lift

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


def grid_explorer(layer: LieGroupConv, *, initial: LieGroupConv | None = None, rotations: int | None = None):
    """Sliders for the number of sampled rotations (and scales): the same SIREN, re-sampled
    (``initial``: the untrained twin of ``layer``, re-sampled alongside)."""
    import ipywidgets as W
    from .widgets import explorer

    g = layer.grid
    rot = W.IntSlider(value=rotations or g.rotations, min=1, max=24, description="rotations",
                      continuous_update=False)
    sc = W.IntSlider(value=max(g.scales, 2), min=2, max=6, description="scales", continuous_update=False)

    def render():
        grid = Sim2(rot.value, sc.value, g.s_max) if g.is_sim2 else SE2(rot.value)
        fig = kernel_function_figure(resample(layer, grid),
                                     initial=None if initial is None else resample(initial, grid))
        return fig, (rot.value, grid.scales)

    return explorer([[rot] + ([sc] if g.is_sim2 else [])], render)


# ------------------------------------------------------------------------- trained kernels (zoo)
def _net(model: nn.Module) -> nn.Module:
    from ..run.zoo import Standardized
    return model.net if isinstance(model, Standardized) else model


def zoo_pair(name: str = SE2_MODEL, *, root=None, calibrate: torch.Tensor | None = None):
    """``(trained, initial)``: zoo model ``name`` with its trained weights (``kit.models.create(name,
    pretrained=True)``, eval mode) and its initial twin (:func:`kit.run.zoo.initial_twin`, the exact
    weights its training run started from). Without weights this raises the zoo's error (it names the
    models that have weights and how to build them). ``root``: another weights folder (development,
    tests); ``calibrate``: images for the twin's batch-norm statistics (the kernels do not use them)."""
    from ..run import zoo
    if root is None:
        trained = models.create(name, pretrained=True)
    else:
        man = zoo.manifest(name, root)
        trained = zoo.load_pretrained(name, models.create(name, **(man.get("builder_overrides") or {})), root=root)
    return trained, zoo.initial_twin(name, calibrate=calibrate, root=root)


def open_kernels(pretrained: bool = True, *, layer: str = "stages.0.conv1", seed: int = 0, rotations: int = 8,
                 scales: int = 3, root=None) -> dict:
    """Everything notebook 06 draws, in one call.

    Always: ``"se2"`` / ``"sim2"``, untrained ``{"nonseparable", "separable"}`` layer pairs
    (:func:`make_layers`). ``"kernels"``: ``{"SE(2)": (layer, initial), "Sim(2)": (layer, initial)}``
    for the kernel-function figures: with ``pretrained``, the convolution ``layer`` of the trained
    :data:`SE2_MODEL` / :data:`SIM2_MODEL` and of its initial twin (on the models' own grids);
    otherwise the untrained separable layers and ``None``. ``"models"``: ``{name: (trained, initial)}``
    for those two and :data:`DSEP_MODEL` (empty without ``pretrained``). Missing weights raise the
    zoo's error."""
    se2 = make_layers(seed=seed, rotations=rotations)
    sim2 = make_layers(seed=seed, rotations=rotations, scales=scales)
    out = {"se2": se2, "sim2": sim2, "models": {},
           "kernels": {"SE(2)": (se2["separable"], None), "Sim(2)": (sim2["separable"], None)}}
    if pretrained:
        for key, name in (("SE(2)", SE2_MODEL), ("Sim(2)", SIM2_MODEL), (None, DSEP_MODEL)):
            t, i = out["models"][name] = zoo_pair(name, root=root)
            if key:
                out["kernels"][key] = (kernel_layer(t, layer), kernel_layer(i, layer))
    return out


def conv_layers(model: nn.Module) -> dict:
    """``{name: layer}``: every SE(2) / Sim(2) convolution of ``model`` (lifting included), named
    inside the network (a :class:`kit.run.zoo.Standardized` wrapper is looked through)."""
    return {n: m for n, m in _net(model).named_modules() if isinstance(m, _LieConv)}


def kernel_layer(model: nn.Module, name: str = "stages.0.conv1") -> _LieConv:
    """The convolution ``name`` of ``model`` (see :func:`conv_layers` for the names)."""
    layers = conv_layers(model)
    if name not in layers:
        raise ValueError(f"{type(_net(model)).__name__} has no Lie convolution {name!r}; it has: {', '.join(layers)}")
    return layers[name]


def invariance_90(model: nn.Module, x: torch.Tensor | None = None) -> float:
    """Largest relative change of the logits of a float64 copy of ``model``
    (:func:`kit.equivariance.float64_twin`) under the rotations by multiples of 90 degrees
    (real digits by default)."""
    from ..equivariance import check, float64_twin, max_error
    m = float64_twin(model)
    G = m.in_type.group
    return max_error(check(m, [e for e in G.elements if G.is_exact_on_grid(e)], x=x))


def pretrained_text(trained: nn.Module) -> str:
    """One paragraph on a zoo model: what its manifest says (epochs, data, accuracies) and its
    invariance at 90 degrees measured now in float64."""
    info = getattr(trained, "pretrained", None)
    if info is None:
        raise ValueError("not a zoo model: load it with kit.models.create(name, pretrained=True) or zoo_pair")
    m = info["manifest"]
    acc = lambda v: "—" if v is None else f"{v:.2f} %"
    held = (m.get("heldout") or {}).get("accuracy")
    return (f"{info['name']}: {m.get('epochs', '?')} epochs on {m.get('dataset_label', m.get('dataset', '?'))}; "
            f"test accuracy {acc(m.get('final_test_acc'))} (final), {acc(m.get('test_acc_at_best_val'))} "
            f"(best-val epoch), held-out subset {acc(held)}; max relative change of the logits at "
            f"90/180/270 degrees (float64): {invariance_90(trained):.1e}")


_PARTS = {("lift", "nonseparable"): ("k(x)",), ("lift", "separable"): ("W", "k_j(x)"),
          ("conv", "nonseparable"): ("k(x,h)",), ("conv", "separable"): ("k_H", "k_R"),
          ("conv", "dseparable"): ("W", "k_j(x,h)")}


@torch.no_grad()
def _parts(layer: _LieConv) -> dict:
    """The tensors a layer builds from its SIRENs on its grid, by name (``k_H``, ``k_R``...)."""
    built = layer._build(0.0, next(layer.parameters()).dtype)
    built = built if isinstance(built, tuple) else (built,)
    names = _PARTS[("lift" if isinstance(layer, LieLiftingConv) else "conv", layer.variant)]
    return dict(zip(names, built))


def _finer(grid: LieGrid, refine: int) -> LieGrid:
    return Sim2(grid.rotations * refine, grid.scales, grid.s_max) if grid.is_sim2 else SE2(grid.rotations * refine)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def kernel_changes(trained: nn.Module, initial: nn.Module, *, refine: int = 8) -> list[dict]:
    """How far training moved every kernel function of a zoo model, layer by layer and part by part
    (``k_H`` and ``k_R`` of a separable conv, ``k(x)`` of the lifting...): the relative change
    ``||k_t - k_0|| / ||k_0||`` of the kernel sampled on the model's grid (what the loss sees),
    ``"sampled"``, and on a grid with ``refine`` times more rotations (mostly *between* the trained
    samples), ``"finer"``; ``"params"``: the relative change of the layer's SIREN parameters."""
    lt, l0 = conv_layers(trained), conv_layers(initial)
    if list(lt) != list(l0):
        raise ValueError(f"trained and initial models have different layers: {list(lt)} vs {list(l0)}")
    rows = []
    for name in lt:
        a, b = lt[name], l0[name]
        pa = torch.cat([p.detach().flatten() for p in a.parameters()])
        pb = torch.cat([p.detach().flatten() for p in b.parameters()])
        sa, sb = _parts(a), _parts(b)
        fa, fb = _parts(resample(a, _finer(a.grid, refine))), _parts(resample(b, _finer(b.grid, refine)))
        for part in sa:
            ka, kb = sa[part], sb[part]
            rows.append({"layer": name, "part": part, "variant": a.variant, "kernel_size": a.kernel_size,
                         "params": _rel(pa, pb), "sampled": _rel(ka, kb), "finer": _rel(fa[part], fb[part]),
                         "norm_ratio": float(ka.double().norm() / kb.double().norm().clamp_min(1e-300))})
    return rows


def kernel_changes_text(rows: list[dict]) -> str:
    lines = [f"{'layer':16s} {'part':9s} {'k':>2s} {'|dtheta|/|theta0|':>17s} {'|dk|/|k0| sampled':>18s} "
             f"{'finer grid':>10s} {'|k|/|k0|':>9s}"]
    lines += [f"{r['layer']:16s} {r['part']:9s} {r['kernel_size']:2d} {r['params']:17.3f} {r['sampled']:18.3f} "
              f"{r['finer']:10.3f} {r['norm_ratio']:9.3f}" for r in rows]
    return "\n".join(lines)


def trained_vs_initial_figure(trained: nn.Module, initial: nn.Module, *, layer: str = "stages.0.conv1",
                              refine: int = 8, fields: int = 8, rows: list[dict] | None = None):
    """What training did to the kernels of a separable zoo model (and its initial twin).

    Top: relative change of every kernel function, on the sampled grid and on a ``refine`` times finer
    grid of rotations (:func:`kernel_changes`). Middle: for ``layer``, the RMS over channel pairs of
    the H-kernel ``k_H(dtheta)`` (Sim(2): at ``dlog s = 0``), initial, trained and their difference,
    with the sampled rotations marked. Bottom: that layer's spatial kernels ``k_R`` (rotation 0, scale
    1) for the first ``fields`` output fields: initial, trained, difference, on one colour scale."""
    rows = kernel_changes(trained, initial, refine=refine) if rows is None else rows
    Lt, L0 = kernel_layer(trained, layer), kernel_layer(initial, layer)
    if Lt.variant != "separable":
        raise ValueError(f"layer {layer!r} is {Lt.variant}; pick a separable group conv: "
                         f"{', '.join(n for n, m in conv_layers(trained).items() if m.variant == 'separable')}")
    name = getattr(trained, "pretrained", {}).get("name", type(_net(trained)).__name__)
    g, O = Lt.grid, min(fields, Lt.out_type.n_fields)
    pw = min(1.0, (WIDTH - 1.1) / O)                                                  # spatial kernel size (in)
    heights = [0.26 * len(rows) + 1.0, 2.7, 3 * (pw + 0.08) + 0.5]
    fig = plt.figure(figsize=(WIDTH, sum(heights) + 0.6), layout="constrained")
    outer = fig.add_gridspec(3, 1, height_ratios=heights)

    ax = fig.add_subplot(outer[0])
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [r["sampled"] for r in rows], 0.4, color="#1f77b4", label="on the sampled grid")
    ax.barh(y + 0.2, [r["finer"] for r in rows], 0.4, color="#ff7f0e", label=f"on a {refine}x finer rotation grid")
    for yy, r in zip(y, rows):
        ax.text(max(r["sampled"], r["finer"]) * 1.02, yy, f"{r['sampled']:.2f} / {r['finer']:.2f}", va="center",
                fontsize=FONT)
    ax.set_yticks(y, [f"{r['layer']} {r['part']}" for r in rows], fontsize=FONT)
    ax.invert_yaxis()
    ax.set_xlim(0, max(max(r["sampled"], r["finer"]) for r in rows) * 1.25)
    ax.set_xlabel("relative change |k_trained - k_init| / |k_init| of every kernel function", fontsize=FONT + 1)
    ax.tick_params(labelsize=FONT)
    ax.legend(fontsize=FONT, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, frameon=False)
    ax.grid(axis="x", alpha=0.3)

    ax = fig.add_subplot(outer[1])
    dense = torch.linspace(0, 2 * math.pi, 721)[:-1]
    dls = torch.zeros(()) if g.is_sim2 else None
    args = (dense,) if dls is None else (dense, dls)
    kt, k0 = h_kernel(Lt, *args), h_kernel(L0, *args)                                   # (720, O, C)
    rms = lambda k: k.flatten(1).square().mean(1).sqrt().numpy()
    deg = np.degrees(dense.numpy())
    ax.plot(deg, rms(k0), "--", color="#7f7f7f", lw=1.5, label="initial")
    ax.plot(deg, rms(kt), "-", color="#1f77b4", lw=1.8, label="trained")
    ax.plot(deg, rms(kt - k0), "-", color="#d62728", lw=1.5, label="trained - initial")
    for a in range(g.rotations):
        ax.axvline(360 * a / g.rotations, color="k", lw=0.8, ls=":")
    ax.set_xlim(0, 360)
    ax.set_ylim(bottom=0)
    ax.set_xticks(range(0, 361, 45))
    ax.set_xlabel("relative rotation dtheta (degrees); dotted: the sampled rotations", fontsize=FONT + 1)
    ax.set_ylabel("RMS over channel\npairs of k_H", fontsize=FONT + 1)
    ax.tick_params(labelsize=FONT)
    ax.legend(fontsize=FONT, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    ax.set_title(f"{layer}: H-kernel k_H(dtheta)" + (" at dlog s = 0" if g.is_sim2 else ""),
                 fontsize=FONT + 1)

    KRt, KR0 = spatial_kernels(Lt)[0, 0, :O], spatial_kernels(L0)[0, 0, :O]             # (O, k, k)
    v = max(float(KRt.abs().max()), float(KR0.abs().max())) or 1.0
    bottom = outer[2].subgridspec(3, O)
    for r, (lab, K) in enumerate((("initial", KR0), ("trained", KRt), ("trained -\ninitial", KRt - KR0))):
        for o in range(O):
            a = fig.add_subplot(bottom[r, o])
            _img(a, K[o], v, f"out {o}" if r == 0 else None)
            if o == 0:
                a.set_ylabel(lab, fontsize=FONT)
    fig.supxlabel(f"spatial kernels k_R of {layer} (rotation 0, scale 1) per output field, one colour scale",
                  fontsize=FONT + 1)
    fig.suptitle(wrap(f"{name}: trained vs initial kernel functions (initial = the exact start of its "
                      f"training run)", WIDTH, FONT + 2), fontsize=FONT + 2)
    return fig


def redundancy_rows(trained: nn.Module, initial: nn.Module, *, reference: str | nn.Module | None =
                    "nonsep-se2-mnist-small", seed: int = 0) -> list[dict]:
    """The paper's redundancy measure, layer by layer (:func:`kit.explore.redundancy.compare`): the mean
    rank-1 explained variance of each kernel's ``(input rotations) x (space)`` slices of the identity
    output element, trained vs initial, the i.i.d. random baseline of that shape, and (``reference``)
    an untrained model of the same architecture (a registry name, built with ``seed``, or a module).
    ``ev_trained`` / ``ev_init`` also hold every kernel's value (``"values_*"``)."""
    t, i = redundancy.analyze(_net(trained)), redundancy.analyze(_net(initial))
    rows = redundancy.compare(t, i)
    ref = None
    if reference is not None:
        if isinstance(reference, str):
            torch.manual_seed(seed)
            reference = models.create(reference)
        ref = {r.name: r for r in redundancy.analyze(_net(reference))}
    for row, a, b in zip(rows, t, i):
        row["values_trained"], row["values_init"] = a.subgroup.explained.flatten(), b.subgroup.explained.flatten()
        row["rank1_ev_reference"] = ref[row["layer"]].subgroup.mean() if ref and row["layer"] in ref else None
        row["shape"] = "x".join(map(str, a.shape))
    return rows


def redundancy_text(rows: list[dict]) -> str:
    f = lambda v: "     —" if v is None else f"{v:6.3f}"
    lines = [f"{'layer':16s} {'kernel O x C x D x k x k':>24s} {'EV1 trained':>11s} {'init':>6s} "
             f"{'untrained ref':>13s} {'random':>6s} {'|dK|/|K0|':>9s}"]
    lines += [f"{r['layer']:16s} {r['shape']:>24s} {r['rank1_ev_trained']:11.3f} {r['rank1_ev_init']:6.3f} "
              f"{f(r['rank1_ev_reference']):>13s} {r['rank1_ev_random']:6.3f} {r['kernel_change']:9.3f}" for r in rows]
    return "\n".join(lines)


def redundancy_figure(rows: list[dict], *, title: str | None = None, reference_label: str = "untrained non-separable"):
    """Top: mean rank-1 explained variance along the input rotation axis per layer (trained, initial,
    ``reference``, i.i.d. random; 1 = separable). Bottom: the distribution over kernels, all layers
    pooled, trained vs initial."""
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(WIDTH, 7.6), gridspec_kw=dict(height_ratios=[1.45, 1]),
                                  layout="constrained")
    x = np.arange(len(rows))
    series = [("trained", "rank1_ev_trained", "#1f77b4"), ("initial twin", "rank1_ev_init", "#7f7f7f")]
    if any(r.get("rank1_ev_reference") is not None for r in rows):
        series.append((reference_label, "rank1_ev_reference", "#2ca02c"))
    w = 0.8 / len(series)
    for j, (lab, key, col) in enumerate(series):
        vals = [np.nan if r.get(key) is None else r[key] for r in rows]
        xx = x - 0.4 + w * (j + 0.5)
        ax.bar(xx, vals, w, color=col, label=lab)
        for a, v in zip(xx, vals):
            if np.isfinite(v):
                ax.text(a, v + 0.015, f"{v:.2f}", ha="center", fontsize=FONT, rotation=90 if len(rows) > 5 else 0)
    ax.hlines([r["rank1_ev_random"] for r in rows], x - 0.45, x + 0.45, colors="k", linestyles="--", lw=1.2,
              label="i.i.d. random kernels")
    ax.axhline(1.0, color="#9467bd", lw=1.2, ls=":", label="separable (by construction)")
    ax.set_xticks(x, [f"{r['layer']}\n{r['shape']}" for r in rows], fontsize=FONT)
    ax.set_ylim(0, 1.38)                                                  # room for the legend above 1
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("mean rank-1 explained variance", fontsize=FONT + 1)
    ax.tick_params(labelsize=FONT)
    ax.legend(fontsize=FONT, loc="upper center", ncol=3, frameon=False)
    ax.set_title("per layer, along the input rotation axis", fontsize=FONT + 1)
    bins = np.linspace(0, 1, 26)
    for lab, key, col in (("trained", "values_trained", "#1f77b4"), ("initial twin", "values_init", "#7f7f7f")):
        v = torch.cat([r[key] for r in rows])
        v = v[~torch.isnan(v)].numpy()
        ax2.hist(v, bins=bins, color=col, alpha=0.55, label=f"{lab} (mean {v.mean():.2f})", density=True)
    ax2.set_xlabel("rank-1 explained variance of one kernel", fontsize=FONT + 1)
    ax2.set_ylabel("density", fontsize=FONT + 1)
    ax2.tick_params(labelsize=FONT)
    ax2.legend(fontsize=FONT, loc="upper left")
    ax2.set_title("every kernel, all layers pooled", fontsize=FONT + 1)
    fig.suptitle(wrap(title or "Kernel redundancy: how well one spatial kernel explains the slices along the input "
                               "rotation axis", WIDTH, FONT + 2), fontsize=FONT + 2)
    return fig
