"""Figure builders shared by the notebooks: every function returns a figure object (matplotlib
``Figure`` or plotly ``go.Figure``), so tests can call it and notebooks only display or save it.

Static figures for ``figures/`` are matplotlib (no browser needed to export them); interactive
ones are plotly. :func:`save` writes a matplotlib figure atomically; :func:`show` saves it and shows the
written PNG (the one way a notebook puts a figure on screen and in ``figures/``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.text import Text

from .._io import atomic_savefig
from ..equivariance import Record
from ..groups import act_on_image, disk_mask

__all__ = ["save", "show", "legibility", "NOTEBOOK_WIDTH_PX", "MIN_SCREEN_PT", "feature_maps_figure", "group_axis_figure", "error_vs_angle_figure", "plot_error_vs_angle",
           "error_vs_angle_plotly"]

_COLORS = {"cnn-mnist": "#d62728", "p4-mnist": "#1f77b4", "p4m-mnist": "#2ca02c"}


def save(fig, path: str | Path, *, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically (:func:`kit._io.atomic_savefig`)."""
    return atomic_savefig(fig, path, dpi=dpi, format="png")


#: the width (CSS px) of a notebook's output area in JupyterLab's default layout, a 1280-px-wide window
#: with the file browser open: a wider PNG is scaled down to it, and its text with it
NOTEBOOK_WIDTH_PX = 900
#: the smallest text a figure may show at that width (points on screen: 1 pt = 96/72 CSS px)
MIN_SCREEN_PT = 10.0


def legibility(fig, *, dpi: int = 120, width_px: int = NOTEBOOK_WIDTH_PX) -> dict:
    """How large the smallest text of ``fig`` is on screen when its PNG (saved at ``dpi``, tight
    bounding box, as :func:`save` does) is shown in a notebook ``width_px`` wide: ``min_pt`` (points on
    screen), the ``text`` it belongs to, the PNG's ``width_px`` and the display ``scale`` (<= 1). A
    figure is legible on a projector when ``min_pt >= MIN_SCREEN_PT``."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    png_px = fig.get_tightbbox(renderer).width * dpi
    scale = min(1.0, width_px / png_px)
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip() and t.figure is fig
             and t.get_window_extent(renderer).width > 0]
    if not texts:
        return {"min_pt": float("inf"), "text": None, "width_px": round(png_px), "scale": scale}
    small = min(texts, key=lambda t: t.get_fontsize())
    return {"min_pt": round(small.get_fontsize() * dpi / 96 * scale, 2), "text": small.get_text()[:60],
            "width_px": round(png_px), "scale": round(scale, 3)}


def _audit(fig, path, dpi):
    """With ``KIT_FIGURE_AUDIT=<file>``, :func:`show` appends each figure's :func:`legibility` to that
    file (one JSON line): how the test suite checks every notebook figure's text size."""
    log = os.environ.get("KIT_FIGURE_AUDIT")
    if log and hasattr(fig, "canvas"):
        row = {"path": str(path) if path is not None else None, **legibility(fig, dpi=dpi)}
        with open(log, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def show(fig, path: str | Path | None = None, *, dpi: int = 120) -> Path | None:
    """Save ``fig`` as PNG at ``path`` (atomically; ``None``: nothing written), close it, and display it:
    in a notebook the written file itself (what is on screen is what is in ``figures/``), the live
    figure when nothing was written. Outside IPython it only saves. Returns the path."""
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
        shell = get_ipython() is not None
    except ImportError:                                                   # pragma: no cover - IPython ships with jupyter
        shell = False
    _audit(fig, path, dpi)
    out = save(fig, path, dpi=dpi) if path is not None else None
    if shell:
        display(Image(filename=str(out)) if out is not None else fig)
    plt.close(fig)
    return out


def _img(ax, a, title=None, cmap="magma", sym=False, vmin=None, vmax=None):
    a = a.detach().float().cpu().numpy()
    if sym:
        v = float(abs(a).max()) or 1.0
        im = ax.imshow(a, cmap="RdBu_r", vmin=-v, vmax=v)
    else:
        im = ax.imshow(a, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return im


def _first_features(model, x):
    """Output of the model's first conv block (after its nonlinearity): the model's ``stage_features``."""
    if not hasattr(model, "stage_features"):
        raise TypeError(f"{type(model).__name__} has no stage_features(x, stage) method (expected a kit model: "
                        f"an EquivariantSequential or PlainCNN)")
    return model.stage_features(x, 1)                # (B, C, |G|, H, W) or (B, C, H, W)


def _disk_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` inside the centred disk (what the equivariance instrument measures)."""
    m = disk_mask(*a.shape[-2:]).to(torch.float64)
    a, b = a.double() * m, b.double() * m
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _frame(ax, color, lw=3.0):
    for sp in ax.spines.values():
        sp.set_visible(True), sp.set_color(color), sp.set_linewidth(lw)


@torch.no_grad()
def feature_maps_figure(cnn, gcnn, x: torch.Tensor, angle: float = 90.0, *, channel: int = 0,
                        mode: str = "bilinear"):
    """First-layer feature maps of a CNN and a G-CNN for the upright and the rotated digit.

    Columns: the input, the CNN map of ``channel``, and the G-CNN maps of field ``channel`` for each
    group element; rows: upright, rotated by ``angle``, and the rotated row rotated *back* by
    ``-angle``. Each rotated-back map is compared with the upright maps (relative error inside the
    centred disk, written under it): the CNN map with its own upright map, a G-CNN map with the
    upright map it matches best, which for a quarter turn is the one a cyclic shift of the group
    axis brings there. Frames colour-code the group axis: the upright map of element ``i`` and the
    rotated-back map that matches it share a colour, so the shift is seen. Each model's maps share
    one colour scale (its colour bar below). ``fig.errors`` = ``{"cnn": e, "gcnn": [(match, e), ...]}``.
    """
    x = x[:1]                                                        # (1, 1, H, W)
    xr = act_on_image(x, angle, mode=mode)
    G = gcnn.in_type.group
    n = G.order
    c0, g0 = _first_features(cnn, x)[0, channel], _first_features(gcnn, x)[0, channel]     # (H, W), (|G|, H, W)
    c1, g1 = _first_features(cnn, xr)[0, channel], _first_features(gcnn, xr)[0, channel]
    cb = act_on_image(c1, -angle, mode=mode)                          # (H, W)   rotated back
    gb = act_on_image(g1, -angle, mode=mode)                          # (|G|, H, W)
    cnn_err = _disk_rel(cb, c0)
    errs = [[_disk_rel(gb[i], g0[j]) for j in range(n)] for i in range(n)]
    match = [min(range(n), key=lambda j: errs[i][j]) for i in range(n)]
    colors = plt.get_cmap("tab10" if n <= 10 else "tab20")(range(n))
    cols, gap, sep, left = 2 + n, 0.08, 0.15, 0.5                 # inches: panel gap, group gap, row labels
    w = min(1.05, (7.4 - left - (cols - 1) * gap - 2 * sep) / cols)
    head, under, bar_h, foot = 0.95, 0.5, 0.12, 0.5
    W, H = left + cols * w + (cols - 1) * gap + 2 * sep + 0.1, head + 3 * w + 2 * gap + under + bar_h + foot
    fig = plt.figure(figsize=(W, H))
    xs = [left + c * (w + gap) + sep * min(c, 2) for c in range(cols)]

    def panel(r, c):
        return fig.add_axes([xs[c] / W, 1 - (head + (r + 1) * w + r * gap) / H, w / W, w / H])
    axes = [[panel(r, c) for c in range(cols)] for r in range(3)]
    cscale = dict(vmin=float(min(c0.min(), c1.min())), vmax=float(max(c0.max(), c1.max())))
    gscale = dict(vmin=float(min(g0.min(), g1.min())), vmax=float(max(g0.max(), g1.max())))
    tight = w < 0.9                                                # many group elements: shorter labels
    rows = [("upright", x, c0, g0), ("rotated" if tight else f"rotated {angle:g}°", xr, c1, g1),
            ("back" if tight else "rotated back", act_on_image(xr, -angle, mode=mode), cb, gb)]
    for r, (name, inp, c, g) in enumerate(rows):
        _img(axes[r][0], inp[0, 0], "input" if r == 0 else None, cmap="gray")
        axes[r][0].set_ylabel(name, fontsize=10)
        cim = _img(axes[r][1], c, "CNN" if r == 0 else None, **cscale)
        for i, el in enumerate(G.elements):
            ax = axes[r][2 + i]
            gim = _img(ax, g[i], f"g={G.degrees(el):g}°{'m' if el.f else ''}" if r == 0 else None, **gscale)
            if r == 0:
                _frame(ax, colors[i])
            elif r == 2:
                _frame(ax, colors[match[i]])
                best, e = G.elements[match[i]], errs[i][match[i]]
                ax.set_xlabel(f"{G.degrees(best):g}°{'m' if best.f else ''}\n{e:.0e}" if tight else
                              f"best: g={G.degrees(best):g}°\nerr {e:.1e}", fontsize=8)
    axes[2][1].set_xlabel(f"vs upright\n{cnn_err:.0e}" if tight else f"vs upright\nerr {cnn_err:.1e}", fontsize=8)
    if not tight:
        axes[0][2].set_title(f"G-CNN g={G.degrees(G.elements[0]):g}°", fontsize=9)
    y_bar = (foot) / H
    for im, c_from, c_to, label in ((cim, 1, 1, "CNN map"), (gim, 2, cols - 1, f"G-CNN ({G.name}) field {channel}")):
        x0 = xs[c_from] + (0.0 if c_from < c_to else 0.05 * w)
        x1 = xs[c_to] + w - (0.0 if c_from < c_to else 0.05 * w)
        bar = fig.colorbar(im, cax=fig.add_axes([x0 / W, y_bar, (x1 - x0) / W, bar_h / H]), orientation="horizontal")
        bar.ax.tick_params(labelsize=8)
        bar.locator = plt.MaxNLocator(3)
        bar.update_ticks()
        bar.set_label(label, fontsize=8)
    fig.suptitle(f"First-layer feature maps, input rotated by {angle:g}°\nbottom row: rotated back, compared "
                 f"with the upright maps{' (best match, error)' if tight else ''}\n"
                 f"frames: the upright {G.name} map each one matches", fontsize=10,
                 y=1 - 0.08 / H)
    fig.errors = {"cnn": cnn_err, "gcnn": [(G.elements[match[i]], errs[i][match[i]]) for i in range(n)]}
    return fig


@torch.no_grad()
def group_axis_figure(gcnn, x: torch.Tensor, *, channel: int = 0):
    """One G-CNN field for the digit rotated by each 90° step: the group axis cycles.

    Row r shows the field for the input rotated by ``r * 90°``, its |G| maps rotated back to the
    upright frame; the same maps reappear, shifted one step along the group axis per row.
    """
    G = gcnn.in_type.group
    quarter = [el for el in G.elements if G.is_exact_on_grid(el) and not el.f]
    fig, axes = plt.subplots(len(quarter), G.order + 1, figsize=(1.5 * (G.order + 1), 1.6 * len(quarter)))
    for r, el in enumerate(quarter):
        a = G.degrees(el)
        xr = act_on_image(x[:1], a)
        f = _first_features(gcnn, xr)[0, channel]                     # (|G|, H, W)
        _img(axes[r, 0], xr[0, 0], f"input {a:g}°", cmap="gray")
        for i, h in enumerate(G.elements):
            _img(axes[r, 1 + i], act_on_image(f[i], -a), f"axis {i}" if r == 0 else None)
    fig.suptitle(f"{G.name} regular field: rotate the input by 90° -> the group axis shifts by "
                 f"{G.n // 4} (maps shown rotated back)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_error_vs_angle(ax, recs: list[Record], *, label: str, color=None, style: str = "-o", ms: float = 2.5,
                        lw: float = 1.6, floor_style: str = ":", floor_lw: float = 1.2, floor_min: float = 1e-9,
                        elements: bool = False, keep=None, error_label: str = "error"):
    """The one drawing of an error-vs-angle curve (every error-vs-angle figure of the kit calls it): the
    error (``style``), the interpolation floor where measured (``floor_style``), and with ``elements``
    circles on the group's own angles. Values below ``floor_min`` are drawn at ``floor_min``; ``keep(r)``
    selects the records drawn. Returns the curve's colour."""
    recs = [r for r in recs if keep is None or keep(r)]
    a = [r.angle for r in recs]
    line, = ax.plot(a, [max(r.error, floor_min) for r in recs], style, ms=ms, lw=lw, color=color,
                    label=f"{label}: {error_label}")
    col = line.get_color()
    if recs and any(r.floor is not None for r in recs):
        ax.plot(a, [max(r.floor, floor_min) if r.floor is not None else float("nan") for r in recs], floor_style,
                lw=floor_lw, alpha=0.8, color=col, label=f"{label}: interpolation floor")
    if elements:
        on = [r for r in recs if r.element is not None]
        ax.plot([r.angle for r in on], [max(r.error, floor_min) for r in on], "o", ms=5, mfc="white", color=col,
                label=f"{label}: its group elements")
    return col


def error_vs_angle_figure(results: dict[str, list[Record]], *, title: str | None = None, logy: bool = True):
    """Static error-vs-angle curves (layer error solid, interpolation floor dotted)."""
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for name, recs in results.items():
        plot_error_vs_angle(ax, recs, label=name, color=_COLORS.get(name))
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("rotation angle (degrees, counter-clockwise)")
    ax.set_ylabel("relative error")
    ax.set_xticks(range(0, 361, 45))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=min(3, len(results)),
              frameon=False)
    ax.set_title(title or "Equivariance error vs rotation angle\n(values < 1e-9 drawn at 1e-9)", fontsize=10)
    fig.tight_layout()
    return fig


def error_vs_angle_plotly(results: dict[str, list[Record]], *, title: str | None = None):
    """Interactive version of :func:`error_vs_angle_figure` (hover for values)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, recs in results.items():
        col = _COLORS.get(name)
        a = [r.angle for r in recs]
        fig.add_trace(go.Scatter(x=a, y=[max(r.error, 1e-9) for r in recs], mode="lines+markers",
                                 name=f"{name}: error", line=dict(color=col, width=2), marker=dict(size=4)))
        if recs and recs[0].floor is not None:
            fig.add_trace(go.Scatter(x=a, y=[max(r.floor, 1e-9) for r in recs], mode="lines",
                                     name=f"{name}: floor", line=dict(color=col, dash="dash", width=1)))
    fig.update_layout(title=title or "Equivariance error vs angle", xaxis_title="angle (degrees)",
                      yaxis_title="relative error", yaxis_type="log", height=420, width=820,
                      yaxis_exponentformat="power", hovermode="x unified",   # 10^-6, not SI's "1µ"
                      xaxis=dict(tickmode="linear", tick0=0, dtick=45), template="plotly_white")
    return fig
