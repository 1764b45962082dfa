"""Figure builders shared by the notebooks: every function returns a figure object (matplotlib
``Figure`` or plotly ``go.Figure``), so tests can call it and notebooks only display or save it.

Static figures for ``figures/`` are matplotlib (no browser needed to export them); interactive
ones are plotly. :func:`save` writes a matplotlib figure atomically; :func:`show` saves it and shows the
written PNG (the one way a notebook puts a figure on screen and in ``figures/``).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import torch

from .._io import atomic_savefig
from ..equivariance import Record
from ..groups import act_on_image

__all__ = ["save", "show", "feature_maps_figure", "group_axis_figure", "error_vs_angle_figure", "plot_error_vs_angle",
           "error_vs_angle_plotly"]

_COLORS = {"cnn-mnist": "#d62728", "p4-mnist": "#1f77b4", "p4m-mnist": "#2ca02c"}


def save(fig, path: str | Path, *, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically (:func:`kit._io.atomic_savefig`)."""
    return atomic_savefig(fig, path, dpi=dpi, format="png")


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
    out = save(fig, path, dpi=dpi) if path is not None else None
    if shell:
        display(Image(filename=str(out)) if out is not None else fig)
    plt.close(fig)
    return out


def _img(ax, a, title=None, cmap="magma", sym=False):
    a = a.detach().float().cpu().numpy()
    if sym:
        v = float(abs(a).max()) or 1.0
        ax.imshow(a, cmap="RdBu_r", vmin=-v, vmax=v)
    else:
        ax.imshow(a, cmap=cmap)
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def _first_features(model, x):
    """Output of the model's first conv block (after its nonlinearity): the model's ``stage_features``."""
    if not hasattr(model, "stage_features"):
        raise TypeError(f"{type(model).__name__} has no stage_features(x, stage) method (expected a kit model: "
                        f"an EquivariantSequential or PlainCNN)")
    return model.stage_features(x, 1)                # (B, C, |G|, H, W) or (B, C, H, W)


@torch.no_grad()
def feature_maps_figure(cnn, gcnn, x: torch.Tensor, angle: float = 90.0, *, channel: int = 0,
                        mode: str = "bilinear"):
    """First-layer feature maps of a CNN and a G-CNN for the upright and the rotated digit.

    Columns: the input, the CNN map of ``channel``, and the G-CNN maps of field ``channel`` for each
    group element. The rightmost row shows each map rotated *back* by ``-angle``: for the G-CNN it
    matches the upright row up to a cyclic shift of the group axis; for the CNN it does not.
    """
    x = x[:1]                                                        # (1, 1, H, W)
    xr = act_on_image(x, angle, mode=mode)
    G = gcnn.in_type.group
    cols = 2 + G.order
    fig, axes = plt.subplots(3, cols, figsize=(1.6 * cols, 5.2))
    rows = [("upright", x), (f"rotated {angle:g}°", xr)]
    maps = []
    for r, (name, inp) in enumerate(rows):
        c = _first_features(cnn, inp)[0, channel]                     # (H, W)
        g = _first_features(gcnn, inp)[0, channel]                    # (|G|, H, W)
        maps.append((c, g))
        _img(axes[r, 0], inp[0, 0], f"input, {name}", cmap="gray")
        _img(axes[r, 1], c, "CNN")
        for i, el in enumerate(G.elements):
            _img(axes[r, 2 + i], g[i], f"G-CNN, g={G.degrees(el):g}°{'m' if el.f else ''}")
    c, g = maps[1]
    _img(axes[2, 0], act_on_image(xr, -angle, mode=mode)[0, 0], "input, rotated back", cmap="gray")
    _img(axes[2, 1], act_on_image(c, -angle, mode=mode), "CNN, rotated back")
    for i, el in enumerate(G.elements):
        _img(axes[2, 2 + i], act_on_image(g[i], -angle, mode=mode), "rotated back")
    fig.suptitle(f"First-layer feature maps, input rotated by {angle:g}° "
                 f"(bottom row: rotated back; {G.name} maps reappear on a shifted group axis)", fontsize=10)
    fig.tight_layout()
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
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    for name, recs in results.items():
        plot_error_vs_angle(ax, recs, label=name, color=_COLORS.get(name))
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("rotation angle (degrees, counter-clockwise)")
    ax.set_ylabel("relative error")
    ax.set_xticks(range(0, 361, 45))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title or "Equivariance error vs rotation angle (values < 1e-9 drawn at 1e-9)", fontsize=10)
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
                      xaxis=dict(tickmode="linear", tick0=0, dtick=45), template="plotly_white")
    return fig
