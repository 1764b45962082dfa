"""The lessons' own figures, sized for a projector (every text >= 10 pt at notebook width; tested).

* :func:`equivariance_square` — lesson 1: ``f(g·x)`` and ``g·f(x)`` side by side, their difference
  and the measured error: the commutative square of equivariance, drawn;
* :func:`cyclic_shift_figure` — lesson 2: a lifting convolution's four orientation channels for the
  input turned by 0, 90, 180, 270 degrees (rotated back): the same maps, cycling along the group axis;
* :func:`grid_figure` / :func:`grid_explorer` — lesson 3: the pixel grid under a rotation (where each
  pixel centre lands, how far from the nearest pixel) and a digit turned there and back;
* :func:`round_trip_study` / :func:`round_trip_figure` — lesson 3: the error of that round trip at
  every angle: zero at the quarter turns only.

Functions return matplotlib figures; notebooks show them with :func:`kit.explore.viz.show`.
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Rectangle

from ..groups import act_on_image

__all__ = ["digits", "equivariance_square", "square_explorer", "cyclic_shift_figure", "grid_figure", "grid_explorer", "round_trip_study",
           "round_trip_figure"]

FONT = 10          # points at dpi 120 on a <= 7.5 in figure: 12.5 pt on screen


def digits(n: int = 4, *, first: int = 0) -> torch.Tensor:
    """``n`` digits ``(n, 1, 28, 28)`` of the bundled rotated-MNIST sample, inside the centred disk (so
    that every rotation keeps them in the frame), float32."""
    from ..data.sample import load_sample
    from ..groups import disk_mask
    x = load_sample()["images"][first:first + n].float()
    return x * disk_mask(*x.shape[-2:]).to(x.dtype)


def _panel(ax, a, title, *, cmap="RdBu_r", vmax=None, sym=True):
    a = a.detach().double().cpu()
    v = vmax if vmax is not None else (float(a.abs().max()) or 1.0)
    im = ax.imshow(a.numpy(), cmap=cmap, vmin=-v if sym else 0.0, vmax=v)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title, fontsize=FONT)
    return im


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


@torch.no_grad()
def equivariance_square(fn, x: torch.Tensor, degrees: float = 90.0, *, channel: int = 0, name: str = "f"):
    """Top: ``x``, ``f(x)``, ``g·f(x)``; bottom: ``g·x``, ``f(g·x)`` and ``f(g·x) - g·f(x)`` with the
    relative error ``||f(g·x) - g·f(x)|| / ||g·f(x)||`` in its title (``g``: a rotation by ``degrees``).
    ``fn`` maps images ``(B, 1, H, W)`` to maps ``(B, C, H, W)``; ``channel`` is the one drawn."""
    x = x[:1].double()
    gx = act_on_image(x, degrees)
    y, y_g = fn(x), fn(gx)                                            # (1, C, H, W)
    g_y = act_on_image(y, degrees)
    err = _rel(y_g, g_y)
    v = float(torch.stack([y.abs().max(), y_g.abs().max()]).max())
    fig, axes = plt.subplots(2, 3, figsize=(7.2, 5.0))
    _panel(axes[0, 0], x[0, 0], "x", cmap="gray", sym=False, vmax=float(x.max()))
    _panel(axes[1, 0], gx[0, 0], f"g·x  (g: {degrees:g}°)", cmap="gray", sym=False, vmax=float(x.max()))
    _panel(axes[0, 1], y[0, channel], f"{name}(x)", vmax=v)
    im = _panel(axes[1, 1], y_g[0, channel], f"{name}(g·x)", vmax=v)
    _panel(axes[0, 2], g_y[0, channel], f"g·{name}(x)", vmax=v)
    _panel(axes[1, 2], (y_g - g_y)[0, channel], "difference", vmax=v)
    for ax in (axes[0, 2], axes[1, 1]):                                # the two sides of the square
        for s in ax.spines.values():
            s.set_edgecolor("#1a7f37"), s.set_linewidth(2.5)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8).ax.tick_params(labelsize=FONT)
    fig.suptitle(f"equivariance: {name}(g·x) = g·{name}(x)?  relative error {err:.2g}", fontsize=FONT + 1)
    return fig


def square_explorer(fns: dict, x: torch.Tensor, *, degrees: float = 90.0):
    """A dropdown of maps (``{name: fn}``) and an angle slider; redraws :func:`equivariance_square`."""
    import ipywidgets as W

    from ..explore.widgets import explorer
    pick = W.Dropdown(options=list(fns), value=next(iter(fns)), description="map")
    slider = W.FloatSlider(value=degrees, min=0, max=360, step=15, description="angle (°)",
                           continuous_update=False, readout_format=".0f", layout=W.Layout(width="420px"))
    return explorer([[slider, pick]], lambda: (equivariance_square(fns[pick.value], x, slider.value, name="f"),
                                               (slider.value, pick.value)))


@torch.no_grad()
def cyclic_shift_figure(lift, x: torch.Tensor, w: torch.Tensor, *, field: int = 0):
    """``lift(x, w) -> (B, C, 4, H, W)``: row ``r`` shows its four orientation channels of ``field``
    for the input turned by ``r`` quarter turns, each map turned back by ``-r``. The map framed in
    row 0, column 0 reappears framed in row ``r``, column ``r``: the group axis shifts by one per turn."""
    x = x[:1].double()
    rows = [act_on_image(lift(act_on_image(x, 90.0 * r), w)[0, field], -90.0 * r) for r in range(4)]
    v = float(torch.stack([m.abs().max() for m in rows]).max())
    ref = rows[0][0]
    fig, axes = plt.subplots(4, 5, figsize=(7.2, 6.2))
    for r in range(4):
        _panel(axes[r, 0], act_on_image(x, 90.0 * r)[0, 0], f"input {90 * r}°", cmap="gray", sym=False,
               vmax=float(x.max()))
        for k in range(4):
            m = rows[r][k]
            im = _panel(axes[r, 1 + k], m, f"k = {k}" if r == 0 else "", vmax=v)
            if float((m - ref).norm()) <= 1e-9 * float(ref.norm()):
                axes[r, 1 + k].add_patch(Rectangle((-0.5, -0.5), m.shape[-1], m.shape[-2], fill=False,
                                                   ec="#1a7f37", lw=3))
    fig.colorbar(im, ax=axes[:, 1:].ravel().tolist(), shrink=0.7).ax.tick_params(labelsize=FONT)
    fig.suptitle("lifting conv: turn the input by 90°, the orientation channels cycle by one\n"
                 "(maps turned back; framed: equal to row 0, k = 0)", fontsize=FONT + 1)
    return fig


def _lattice(n: int = 3):
    r = torch.arange(-n, n + 1, dtype=torch.float64)
    X, Y = torch.meshgrid(r, r, indexing="xy")
    return X.reshape(-1), Y.reshape(-1)


@torch.no_grad()
def grid_figure(degrees: float = 45.0, x: torch.Tensor | None = None):
    """Left: the pixel centres of a 7x7 patch (grey) and where a rotation by ``degrees`` sends them
    (coloured by the distance to the nearest pixel centre). Right (with a digit ``x``): the digit turned
    by ``degrees`` and back, minus the digit — what interpolation costs."""
    X, Y = _lattice()
    t = math.radians(degrees)
    RX, RY = math.cos(t) * X - math.sin(t) * Y, math.sin(t) * X + math.cos(t) * Y
    dist = torch.sqrt((RX - RX.round()) ** 2 + (RY - RY.round()) ** 2)
    ncols = 2 if x is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(7.2 if x is not None else 4.2, 3.9), squeeze=False)
    ax = axes[0, 0]
    ax.scatter(X, Y, s=50, c="#bbbbbb", label="pixel centres")
    sc = ax.scatter(RX, RY, s=22, c=dist, cmap="viridis", vmin=0, vmax=0.71, label="rotated")
    ax.set_aspect("equal"), ax.set_xlim(-4.5, 4.5), ax.set_ylim(-4.5, 4.5)
    ax.set_xticks(range(-4, 5, 2)), ax.set_yticks(range(-4, 5, 2))
    ax.tick_params(labelsize=FONT)
    ax.set_title(f"grid rotated by {degrees:g}°: max distance\nto a pixel centre {float(dist.max()):.2f} px",
                 fontsize=FONT)
    cb = fig.colorbar(sc, ax=ax, shrink=0.8)
    cb.ax.tick_params(labelsize=FONT)
    cb.set_label("distance (px)", fontsize=FONT)
    if x is not None:
        x0 = x[:1, :1].double()
        back = act_on_image(act_on_image(x0, degrees), -degrees)
        diff = (back - x0)[0, 0]
        err = _rel(back, x0)
        im = _panel(axes[0, 1], diff, f"digit turned {degrees:g}° and back,\nminus the digit: error {err:.2g}",
                    vmax=float(diff.abs().max()) or 1.0)
        fig.colorbar(im, ax=axes[0, 1], shrink=0.8).ax.tick_params(labelsize=FONT)
    fig.tight_layout()
    return fig


def grid_explorer(x: torch.Tensor | None = None, *, degrees: float = 45.0):
    """A slider for the angle; redraws :func:`grid_figure`."""
    import ipywidgets as W

    from ..explore.widgets import explorer
    slider = W.FloatSlider(value=degrees, min=0, max=180, step=5, description="angle (°)",
                           continuous_update=False, readout_format=".0f", layout=W.Layout(width="420px"))
    return explorer([slider], lambda: (grid_figure(slider.value, x), slider.value))


@torch.no_grad()
def round_trip_study(x: torch.Tensor, *, step: float = 5.0, mode: str = "bilinear") -> dict:
    """Relative error of turning the digits ``x (B, 1, H, W)`` by each angle and back (inside the
    centred disk, where the image stays in the frame), for ``0 <= angle <= 360`` in ``step``s."""
    from ..groups import disk_mask
    x = x.double()
    mask = disk_mask(*x.shape[-2:]).double()
    angles = [step * i for i in range(int(round(360 / step)) + 1)]
    errs = []
    for a in angles:
        back = act_on_image(act_on_image(x, a, mode=mode), -a, mode=mode)
        errs.append(float(((back - x) * mask).norm() / (x * mask).norm()))
    return {"angles": angles, "error": errs, "mode": mode}


def round_trip_figure(study: dict):
    """:func:`round_trip_study` against the angle (linear scale: the quarter turns sit at exactly 0)."""
    fig, ax = plt.subplots(figsize=(7.2, 3.6))
    a, e = study["angles"], study["error"]
    ax.plot(a, e, "-o", ms=3, color="#1f77b4", label=f"{study['mode']} interpolation")
    q = [(ai, v) for ai, v in zip(a, e) if abs(ai / 90 - round(ai / 90)) < 1e-9]
    ax.plot([p[0] for p in q], [p[1] for p in q], "o", ms=8, mfc="white", color="#1a7f37",
            label=f"quarter turns: exact (max {max(p[1] for p in q):.0g})")
    ax.set_xticks(range(0, 361, 45))
    ax.set_ylim(0, 1.3 * max(e) if max(e) > 0 else 1.0)
    ax.tick_params(labelsize=FONT)
    ax.set_xlabel("angle (degrees)", fontsize=FONT)
    ax.set_ylabel("relative error", fontsize=FONT)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=FONT, loc="upper center", ncol=2)
    ax.set_title("turn digits by an angle and back: what interpolation loses", fontsize=FONT + 1)
    fig.tight_layout()
    return fig
