"""Notebook 04 (PDO-eConvs and the stencil library) in library form: studies, figure builders and
the stencil-gallery explorer on top of :mod:`kit.kernels.stencils` and :mod:`kit.layers.pdo`.

* :func:`stencil_figure` / :func:`stencil_gallery_figure`: stencils as heat maps **with their
  numbers** written in the cells (one operator, or operators x discretisations).
* :func:`rotated_kernels` / :func:`rotated_kernels_figure`: one PDO rotated analytically to every
  element of C_n (``P(A_g^T D)``, the operator a PDO layer applies at orientation ``g``) and
  re-discretised on 5x5; an arrow outside each kernel points along the rotated x axis.
* :func:`layer_error_study` / :func:`error_vs_angle_figure`: error vs rotation angle of p4 / p6 /
  p8 PDO layers (lifting -> ReLU -> group layer) on real digits, next to the interpolation floor
  (:func:`kit.equivariance.error_vs_angle`).
* :func:`convergence_study` / :func:`convergence_figure`: the equivariance error at 45 degrees
  against the grid spacing h on a smooth input, rotation applied analytically
  (:func:`kit.layers.pdo.refinement_study`), with the fitted log-log slope written on the figure
  (the paper's quadratic order: slope 2).
* :func:`stencil_gallery`: ipywidgets explorer (operator, discretisation, size, Gaussian width).

Every figure function returns a matplotlib figure (save it with :func:`kit.explore.viz.save`).
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from ..equivariance import Record, error_vs_angle
from ..groups import cyclic, disk_mask, rotation_matrix
from ..layers import EquivariantSequential, FieldReLU
from ..layers.pdo import PDOGroupConv, PDOLiftingConv, refinement_study
from ..kernels.stencils import DEFAULT_SIGMA, METHODS, stencil, stencil_bank
from ..reps import component_index, component_name, components, substitution_matrix
from ..measure.timing import torch_threads as _threads
from .viz import plot_error_vs_angle

__all__ = ["OPERATORS", "GALLERY_OPERATORS", "DEFAULT_SIGMA", "operator_coefficients", "operator_label",
           "stencil_figure", "stencil_gallery_figure", "rotated_kernels", "rotated_kernels_figure", "layer_error_study",
           "error_vs_angle_figure", "error_table", "fit_slope", "convergence_study", "convergence_figure",
           "stencil_gallery"]

#: every operator the stencil library discretises, in its component order ('1', 'dx', ... 'dyyyy')
OPERATORS: list[str] = [component_name(i, j) for i, j in components(4)]
#: a default selection for the static gallery (orders 1 to 4, symmetric and not)
GALLERY_OPERATORS = ("dx", "dy", "dxx", "dxy", "dxxy", "dxxyy")
_METHOD_COLORS = {"fd": "#1f77b4", "gauss": "#ff7f0e", "rbffd": "#2ca02c"}
_GROUP_COLORS = {4: "#d62728", 6: "#9467bd", 8: "#1f77b4", 12: "#2ca02c", 16: "#8c564b"}




# --------------------------------------------------------------------------- operators
def _parse_name(name: str) -> tuple[int, int]:
    if name == "1":
        return 0, 0
    body = name[1:] if name.startswith("d") else ""
    if not body or set(body) - {"x", "y"} or body != "x" * body.count("x") + "y" * body.count("y"):
        raise ValueError(f"unknown operator {name!r}; expected one of {OPERATORS}")
    i, j = body.count("x"), body.count("y")
    if i + j > 4:
        raise ValueError(f"operator {name!r} has total order {i + j}; the library stops at 4 ({OPERATORS})")
    return i, j


def operator_coefficients(op) -> np.ndarray:
    """``(15,)`` float64 coefficients of a PDO in the stencil library's component order.

    ``op``: a name (``"dx"``, ``"dxxy"``, ``"1"``), an ``(i, j)`` pair, or a dict
    ``{name or (i, j): coefficient}`` for a combination, e.g. ``{"dx": 1.0, "dxy": 0.5}``.
    """
    items = op.items() if isinstance(op, dict) else [(op, 1.0)]
    c = np.zeros(len(OPERATORS))
    for key, v in items:
        if isinstance(key, str):
            i, j = _parse_name(key)
        elif isinstance(key, tuple) and len(key) == 2 and all(isinstance(t, int) and t >= 0 for t in key):
            i, j = key
            if i + j > 4:
                raise ValueError(f"operator {key} has total order {i + j}; the library stops at 4")
        else:
            raise ValueError(f"an operator is a name like 'dxy', an (i, j) pair or a dict of them; got {key!r}")
        c[component_index(i, j)] += float(v)
    return c


def _math_name(i: int, j: int) -> str:
    return "1" if i + j == 0 else r"$\partial_{" + "x" * i + "y" * j + "}$"


def operator_label(op) -> str:
    """A readable label (matplotlib mathtext) for :func:`operator_coefficients` input."""
    c = operator_coefficients(op)
    parts = []
    for (i, j), v in zip(components(4), c):
        if v == 0:
            continue
        mag = "" if abs(v) == 1 else f"{abs(v):g} "
        parts.append(("- " if v < 0 else "+ ") + mag + _math_name(i, j))
    s = " ".join(parts) if parts else "0"
    return s[2:] if s.startswith("+ ") else "-" + s[2:] if s.startswith("- ") else s


# ------------------------------------------------------------------------- heat maps
def _fmt(v: float, scale: float, compact: bool = False) -> str:
    """Cell text: '0' for (float-noise) zeros; 3 significant digits (2 below 0.1); ``compact``
    writes values below 0.01 as one-digit powers (``-7e-4``) to fit small cells."""
    if abs(v) <= 1e-12 * max(scale, 1.0):
        return "0"
    if compact and abs(v) < 0.01:
        m, e = f"{v:.0e}".split("e")
        return f"{m}e{int(e)}"
    return f"{v:.3g}" if abs(v) >= 0.1 else f"{v:.2g}"


def _heatmap(ax, K, *, numbers: bool = True, fontsize: float = 8.0, title: str | None = None,
             compact: bool = False, xlabels: bool = True, ylabels: bool = True):
    """Draw a stencil ``(k, k)`` as a symmetric red/blue heat map, its values written in the cells."""
    K = np.asarray(torch.as_tensor(K, dtype=torch.float64))
    vmax = float(np.abs(K).max()) or 1.0
    ax.imshow(K, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    k = K.shape[0]
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels([str(c - k // 2) for c in range(k)] if xlabels else [], fontsize=8)
    ax.set_yticklabels([str(k // 2 - r) for r in range(k)] if ylabels else [], fontsize=8)
    ax.tick_params(length=0, pad=1)
    ax.set_xticks(np.arange(-0.5, k, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, k, 1), minor=True)
    ax.grid(which="minor", color="white", lw=0.6)
    ax.tick_params(which="minor", length=0)
    if numbers:
        for r in range(k):
            for c in range(k):
                v = K[r, c]
                s = _fmt(v, vmax, compact)
                zero = s == "0"
                col = "0.6" if zero else ("white" if abs(v) > 0.55 * vmax else "black")
                ax.text(c, r, s, ha="center", va="center", fontsize=fontsize, color=col)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def _na(ax, text):
    ax.set_xticks([]), ax.set_yticks([])
    for s in ax.spines.values():
        s.set_color("0.8")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, color="0.4", transform=ax.transAxes, wrap=True)


def _method_label(method: str, sigma: float | None, normalize: bool = True) -> str:
    if method == "gauss":
        s = DEFAULT_SIGMA if sigma is None else sigma
        return f"gauss σ={s:.2f} px" + ("" if normalize else " (raw)")
    return {"fd": "fd (central)", "rbffd": "rbffd (phs5)"}.get(method, method)


def _try_stencil(i, j, method, size, sigma, normalize):
    kw = {"sigma": sigma, "normalize": normalize} if method == "gauss" else {}
    try:
        return stencil(i, j, method=method, size=size, **kw), None
    except ValueError as e:
        return None, str(e)


def stencil_figure(operator="dxy", *, method: str = "fd", size: int = 5, sigma: float | None = None,
                   normalize: bool = True):
    """One stencil, large, with its numbers: the cross-correlation weights on the unit grid
    (axis labels are the tap offsets x right, y up). A combination that the library does not
    define (e.g. ``dxxx`` on 3x3) is drawn as a note instead of raising."""
    i, j = _parse_name(operator) if isinstance(operator, str) else operator
    fig, ax = plt.subplots(figsize=(4.6 if size == 5 else 3.4,) * 2)
    K, err = _try_stencil(i, j, method, size, sigma, normalize)
    label = _method_label(method, sigma if method == "gauss" else None, normalize)
    head = f"{component_name(i, j)} · {label} · {size}×{size}"
    if K is None:
        _na(ax, "not defined:\n" + err.split(": ")[0].replace("; ", ";\n"))
        ax.set_title(head, fontsize=10)
    else:
        _heatmap(ax, K, fontsize=10 if size == 5 else 12, title=head)
        ax.set_xlabel(f"x offset   (sum of weights = {_fmt(float(K.sum()), float(K.abs().max()))})", fontsize=9)
        ax.set_ylabel("y offset (up)", fontsize=9)
    fig.tight_layout()
    return fig


def stencil_gallery_figure(operators=GALLERY_OPERATORS, methods=METHODS, *, size: int = 5,
                           sigma: float | None = None, normalize: bool = True):
    """Rows: operators; columns: discretisations (so a notebook-wide figure keeps its numbers
    readable). Every stencil on its own symmetric colour scale, its values written in the cells
    (unit grid; divide by h^order on a grid of spacing h)."""
    ops = [_parse_name(o) if isinstance(o, str) else o for o in operators]
    methods = list(methods)
    w = 2.25 if size == 5 else 1.6
    fig, axes = plt.subplots(len(ops), len(methods), figsize=(w * len(methods) + 0.7, w * len(ops) + 1.2),
                             squeeze=False)
    for r, (i, j) in enumerate(ops):
        for c, method in enumerate(methods):
            ax = axes[r, c]
            K, err = _try_stencil(i, j, method, size, sigma if method == "gauss" else None, normalize)
            if K is None:
                _na(ax, f"{component_name(i, j)}:\nnot on {size}×{size}")
            else:
                _heatmap(ax, K, fontsize=8, compact=True, xlabels=r == len(ops) - 1, ylabels=c == 0)
            if r == 0:
                ax.set_title(_method_label(method, sigma, normalize), fontsize=10)
            if c == 0:
                ax.set_ylabel(_math_name(i, j), fontsize=12)
    fig.suptitle(f"{size}×{size} stencils of " + r"$\partial_x^i\partial_y^j$"
                 + " (cross-correlation weights, unit grid)\n"
                 "tap offsets: x right, y up · red > 0, blue < 0\neach panel its own colour scale", fontsize=10)
    _grid_layout(fig, left=0.55, top=1.2, bottom=0.3, space=0.12)
    return fig


def _grid_layout(fig, *, left: float, top: float, bottom: float, space: float, right: float = 0.1):
    """Margins in inches for a grid of panels (cheaper than ``tight_layout`` on a big text-heavy grid)."""
    W, H = fig.get_size_inches()
    fig.subplots_adjust(left=left / W, right=1 - right / W, top=1 - top / H, bottom=bottom / H,
                        wspace=space, hspace=space + 0.1)


# ------------------------------------------------------------------- rotated kernels
def rotated_kernels(operator="dx", n: int = 8, *, method: str = "fd", offset: float = 0.0,
                    **stencil_kw) -> torch.Tensor:
    """``(n, 5, 5)`` float64: the PDO rotated analytically to every element of C_n,
    ``P(A_g^T D)`` with ``A_g`` the rotation by ``2 pi k / n + offset``, discretised on 5x5 stencils.
    For the 9 learnable monomials this is exactly the kernel a :class:`~kit.layers.pdo.PDOLiftingConv`
    with that PDO applies at orientation ``k`` (tested)."""
    c = torch.from_numpy(operator_coefficients(operator))
    S = stencil_bank(4, method, 5, **stencil_kw).reshape(15, 25)
    out = []
    for k in range(n):
        T = substitution_matrix(rotation_matrix(2 * math.pi * k / n + offset))
        out.append((c @ T @ S).reshape(5, 5))
    return torch.stack(out)


def rotated_kernels_figure(operator="dx", ns=(4, 6, 8), *, method: str = "fd", offset: float = 0.0,
                           numbers: bool = True, min_label: float = 0.05, cols: int = 4, **stencil_kw):
    """For each ``n`` in ``ns``, the group elements ``k = 0 .. n-1`` of C_n (angle ``360 k / n``,
    counter-clockwise), ``cols`` panels to a row (C_8 takes two rows at the default 4, so the numbers
    stay readable at notebook width). Each panel is the 5x5 kernel of the rotated operator; the
    arrow outside it points along the rotated x axis, so it (and the kernel) turns
    counter-clockwise as ``k`` increases. All panels share one colour scale; values are written with
    two decimals (no leading zero: ``-.50``) where ``|value| >= min_label`` x the largest (others left blank)."""
    ns = list(ns)
    if cols < 1:
        raise ValueError(f"cols must be a positive number of panels per row, got {cols!r}")
    cols = min(cols, max(ns))
    kernels = {n: rotated_kernels(operator, n, method=method, offset=offset, **stencil_kw) for n in ns}
    vmax = max(float(K.abs().max()) for K in kernels.values()) or 1.0
    starts, rows = {}, 0                                      # the first figure row of each group
    for n in ns:
        starts[n], rows = rows, rows + -(-n // cols)
    w = 1.75
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols + 0.6, w * rows + 1.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for n in ns:
        for k in range(n):
            ax = axes[starts[n] + k // cols, k % cols]
            ax.axis("on")
            K = kernels[n][k].numpy()
            ax.imshow(K, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            ax.set_xticks([]), ax.set_yticks([])
            for q in np.arange(-0.5, 5, 1.0):                    # cell grid
                ax.plot([q, q], [-0.5, 4.5], color="white", lw=0.6)
                ax.plot([-0.5, 4.5], [q, q], color="white", lw=0.6)
            if numbers:
                for i in range(5):
                    for j in range(5):
                        v = K[i, j]
                        if abs(v) >= min_label * vmax:   # small values left blank: the pattern stays readable
                            s = f"{v:.2f}" if vmax < 10 else f"{v:.3g}"
                            s = s.replace("0.", ".", 1) if s.lstrip("-").startswith("0.") else s   # -.50: fits a cell
                            col = "white" if abs(v) > 0.55 * vmax else "black"
                            ax.text(j, i, s, ha="center", va="center", fontsize=8, color=col)
            t = 2 * math.pi * k / n + offset
            ct, st = math.cos(t), math.sin(t)
            rad = 2.55 / max(abs(ct), abs(st))         # just outside the 5x5 square, on the ray at angle t
            ax.annotate("", xy=(2 + (rad + 0.6) * ct, 2 - (rad + 0.6) * st), xytext=(2 + rad * ct, 2 - rad * st),
                        arrowprops=dict(arrowstyle="-|>", color="black", lw=1.3, mutation_scale=11),
                        annotation_clip=False)
            ax.set_xlim(-1.2, 5.2), ax.set_ylim(5.2, -1.2)
            for s in ax.spines.values():
                s.set_visible(False)
            deg = 360.0 * k / n + math.degrees(offset)
            ax.set_title(f"k={k} · {deg:.4g}°", fontsize=10, pad=2)
            if k % cols == 0:
                ax.set_ylabel(f"C{n}" if k == 0 else f"C{n} (cont.)", fontsize=11, labelpad=10)
    off = f", offset {math.degrees(offset):.4g}°" if offset else ""
    fig.suptitle(f"{operator_label(operator)} rotated to every group element, discretised "
                 f"({method}, 5×5{off})\narrows: the rotated x axis, turning counter-clockwise as k grows\n"
                 f"one colour scale · blank cells: |value| < {min_label:g} × the largest", fontsize=10)
    _grid_layout(fig, left=0.45, top=0.95, bottom=0.05, space=0.1)
    return fig


# ---------------------------------------------------------------- error vs angle
def _digits(n_digits: int, upsample: int, first: int = 0) -> torch.Tensor:
    from ..data.sample import load_sample

    x = load_sample()["images"][first:first + n_digits]
    if upsample > 1:
        x = F.interpolate(x, scale_factor=upsample, mode="bicubic", align_corners=False).clamp(0, 1)
    H = x.shape[-1]
    return x * disk_mask(H, H).to(x.dtype)


def _pdo_layers(n: int, *, fields: int, method: str, seed: int, stencil_kw: dict | None):
    torch.manual_seed(seed)
    G = cyclic(n)
    lift = PDOLiftingConv(group=G, in_channels=1, out_fields=fields, method=method, stencil_kw=stencil_kw)
    group = PDOGroupConv(group=G, in_fields=fields, out_fields=fields, method=method, stencil_kw=stencil_kw)
    return EquivariantSequential(lift, FieldReLU(lift.out_type), group)


def layer_error_study(ns=(4, 6, 8), *, step: float = 5.0, n_digits: int = 4, first_digit: int = 0,
                      upsample: int = 2, method: str = "fd", fields: int = 4, seed: int = 0,
                      stencil_kw: dict | None = None, x: torch.Tensor | None = None,
                      threads: int | None = 1) -> dict[str, list[Record]]:
    """``{"p4": [Record], ...}``: :func:`kit.equivariance.error_vs_angle` from 0 to 360 degrees of a
    PDO lifting layer -> ReLU -> PDO group layer (``fields`` regular fields, random init ``seed``)
    for each C_n, on real digits of the bundled sample (``n_digits`` from ``first_digit``), bicubically
    upsampled by ``upsample`` (derivative stencils need an input that is smooth on the grid: on the raw
    28x28 digits the interpolation floor alone is ~0.2) and masked to the centred disk. ``x`` overrides
    the input ``(B, 1, H, W)``. ``threads``: ``torch.set_num_threads`` during the study (restored;
    default 1: these small convolutions run several times faster on one thread of a shared CPU
    than on two competing ones; ``None`` keeps the current setting)."""
    if not 0 < step <= 360:
        raise ValueError(f"step must be in (0, 360] degrees, got {step}")
    if isinstance(upsample, bool) or not isinstance(upsample, int) or upsample < 1:
        raise ValueError(f"upsample must be an int >= 1, got {upsample!r}")
    x = _digits(n_digits, upsample, first_digit) if x is None else x
    angles = [i * step for i in range(int(round(360 / step)) + 1)]
    with _threads(threads):
        return {f"p{n}": error_vs_angle(_pdo_layers(n, fields=fields, method=method, seed=seed,
                                                    stencil_kw=stencil_kw), angles, x=x) for n in ns}


def error_vs_angle_figure(results: dict[str, list[Record]], *, title: str | None = None, floor_min: float = 1e-9,
                          zoom: float = 180.0):
    """Error (solid) and interpolation floor (dotted) against the angle for each PDO layer; circles
    mark each group's own elements (measured with the exact field action there). Top: all angles,
    log scale (values below ``floor_min``, the exact zeros at 0 degrees, drawn at ``floor_min``).
    Bottom: linear scale over ``[0, zoom]`` degrees without the exact points, where a layer's error
    is compared with its floor."""
    fig, (ax, az) = plt.subplots(2, 1, figsize=(7.2, 8.4))
    top = 0.0
    for name, recs in results.items():
        n = int(name[1:]) if name[1:].isdigit() else None
        col = plot_error_vs_angle(ax, recs, label=name, color=_GROUP_COLORS.get(n), style="-", ms=0,
                                  floor_style=":", floor_lw=1.4, floor_min=floor_min, elements=True,
                                  error_label="layer error")

        def kept(r):                                                   # drop the exact (float-noise) points
            return r.angle <= zoom + 1e-9 and r.error > 1e-4
        plot_error_vs_angle(az, recs, label=name, color=col, style="-", ms=0, floor_style=":",
                            floor_lw=1.4, floor_min=0.0, elements=True, keep=kept)
        vals = [v for r in recs if kept(r) for v in (r.error, r.floor if r.floor is not None else 0.0)]
        top = max([top, *vals])
    ax.set_yscale("log")
    ax.set_ylabel("relative error (inside the disk)")
    az.set_ylabel("relative error")
    ax.set_title(title or f"all angles, log scale (exact zeros drawn at {floor_min:.0e}):\n"
                 "multiples of 90° are exact for p4 and p8 (float noise)", fontsize=10)
    az.set_ylim(0, 1.1 * top if top > 0 else 1)
    az.set_title(f"0–{zoom:g}°, linear scale, exact points left out:\nhow far each layer sits above its floor",
                 fontsize=10)
    for axis, hi, step in ((ax, 360, 45), (az, zoom, 15)):
        axis.set_xlabel("rotation angle of the input (degrees, counter-clockwise)")
        axis.set_xticks(np.arange(0, hi + 1, step))
        axis.set_xlim(-0.015 * hi, 1.015 * hi)
        axis.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    az.legend(handles, labels, fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.2),
              ncol=min(3, len(results)) if len(results) > 1 else 2, frameon=False)
    fig.suptitle("PDO layers (lifting → ReLU → group layer, untrained) on real digits:\n"
                 "equivariance error (solid) vs the interpolation floor (dotted)\n"
                 "circles: the group's own angles (whole field compared, exact group-axis shift);\n"
                 "elsewhere the orientation-pooled output is compared", fontsize=10)
    fig.tight_layout()
    return fig


def error_table(results: dict[str, list[Record]], angles=(30.0, 45.0, 60.0, 90.0)) -> str:
    """Fixed-width table: error, floor and their ratio at the chosen angles for each layer
    (``*`` marks the layer's own group elements)."""
    lines = [f"{'layer':>6} {'angle':>6} {'error':>9} {'floor':>9} {'error/floor':>12}"]
    for name, recs in results.items():
        for r in recs:
            if any(abs(r.angle - a) < 1e-9 for a in angles):
                ratio = f"{r.error / r.floor:12.2f}" if r.floor else f"{'-':>12}"
                mark = "*" if r.element is not None else " "
                lines.append(f"{name:>6} {r.angle:5.0f}{mark} {r.error:9.2e} {r.floor:9.2e} {ratio}")
    return "\n".join(lines)


# --------------------------------------------------------------- grid refinement
def fit_slope(hs, errors) -> float:
    """Least-squares slope of ``log(error)`` against ``log(h)``."""
    hs, errors = np.asarray(hs, dtype=float), np.asarray(errors, dtype=float)
    if hs.size < 2 or hs.shape != errors.shape or np.any(hs <= 0) or np.any(errors <= 0):
        raise ValueError(f"need >= 2 positive (h, error) pairs, got h={hs.tolist()}, errors={errors.tolist()}")
    return float(np.polyfit(np.log(hs), np.log(errors), 1)[0])


def convergence_study(methods=METHODS, *, hs=(0.2, 0.1, 0.05, 0.025), n: int = 8, k: int = 1,
                      seed: int = 0, stencil_kw: dict | None = None, threads: int | None = 1) -> dict[str, dict]:
    """For each discretisation: the equivariance error of a C_n PDO lifting layer at element ``k``
    (default 45 degrees) on a smooth input as the grid spacing ``h`` shrinks
    (:func:`kit.layers.pdo.refinement_study`: rotation applied analytically, no interpolation),
    its fitted log-log slope, and the error at the exact 90-degree element on the coarsest grid.
    ``threads`` as in :func:`layer_error_study`.

    Returns ``{method: {"h": [...], "error": [...], "slope": s, "exact_error": e90, "angle": deg, "n": n}}``."""
    with _threads(threads):
        return _convergence(methods, hs, n, k, seed, stencil_kw)


def _convergence(methods, hs, n, k, seed, stencil_kw):
    out = {}
    for m in methods:
        kw = (stencil_kw or {}) if m == "gauss" else None
        res = refinement_study(method=m, n=n, k=k, hs=hs, seed=seed, stencil_kw=kw)
        h = [r["h"] for r in res]
        e = [r["error"] for r in res]
        exact = None
        if n % 4 == 0:
            exact = refinement_study(method=m, n=n, k=n // 4, hs=hs[:1], seed=seed, stencil_kw=kw)[0]["error"]
        out[m] = {"h": h, "error": e, "slope": fit_slope(h, e), "exact_error": exact, "angle": 360.0 * k / n,
                  "n": n}
    return out


def convergence_figure(study: dict[str, dict], *, target: float = 2.0, tolerance: float = 0.3):
    """Log-log error against h for each discretisation with its fitted slope (in the legend and in
    the box), a reference line of slope ``target``, and the acceptance band in the title."""
    fig, ax = plt.subplots(figsize=(7.8, 5.0))
    lines = []
    for m, d in study.items():
        h, e = np.array(d["h"]), np.array(d["error"])
        col = _METHOD_COLORS.get(m)
        ax.loglog(h, e, "o-", lw=1.8, ms=6, color=col, label=f"{m}: fitted slope {d['slope']:.2f}")
        ok = abs(d["slope"] - target) <= tolerance
        ex = f" | 90° (exact): {d['exact_error']:.0e}" if d.get("exact_error") is not None else ""
        lines.append(f"{m:6s} slope {d['slope']:.2f} {'✓' if ok else '✗'}{ex}")
    allh = np.array(sorted({h for d in study.values() for h in d["h"]}))
    e0 = min(d["error"][int(np.argmax(d["h"]))] for d in study.values())
    ref = e0 * 0.5 * (allh / allh.max()) ** target
    ax.loglog(allh, ref, "--", color="0.4", lw=1.2, label=f"reference: slope {target:g} (h²)")
    angle = next(iter(study.values()))["angle"] if study else 45.0
    from matplotlib.ticker import FixedLocator, NullLocator
    ax.xaxis.set_major_locator(FixedLocator(allh))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{h:g}" for h in allh])
    ax.set_xlabel("grid spacing h (the same smooth function, sampled ever finer)")
    ax.set_ylabel(f"relative max error at {angle:g}° (inside radius 2)")
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize=9, loc="lower right")
    ax.text(0.02, 0.98, f"log-log slopes (target {target:g} ± {tolerance:g})\n" + "\n".join(lines),
            transform=ax.transAxes,
            va="top", ha="left", fontsize=9, family="monospace",
            bbox=dict(boxstyle="round", fc="white", ec="0.7", alpha=0.9))
    n = next(iter(study.values())).get("n", 8) if study else 8
    ax.set_title(f"PDO lifting layer (C{n}), rotation by {angle:g}° applied analytically to a smooth input:\n"
                 f"the equivariance error falls like $h^{{{target:g}}}$: halving h divides it by ~{2 ** target:g}",
                 fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------- widget
def stencil_gallery(operator: str = "dxy", method: str = "fd", size: int = 5, sigma: float = DEFAULT_SIGMA,
                    normalize: bool = True):
    """Explore the stencil library: operator, discretisation, size and Gaussian width (the width
    and the moment correction are active for ``gauss`` only). Redraws :func:`stencil_figure` on
    release; the width controls are hidden (a note says why) unless ``gauss`` is chosen. Returns an
    ``ipywidgets.VBox`` with ``state = {draws, figure, args}``."""
    import ipywidgets as W
    from .widgets import explorer

    if operator not in OPERATORS:
        raise ValueError(f"unknown operator {operator!r}; expected one of {OPERATORS}")
    op = W.Dropdown(options=OPERATORS, value=operator, description="operator")
    meth = W.ToggleButtons(options=list(METHODS), value=method, description="method",
                          style={"button_width": "72px"})   # default buttons are 150 px wide
    sz = W.ToggleButtons(options=[3, 5], value=size, description="size", style={"button_width": "48px"})
    sig = W.FloatSlider(value=sigma, min=0.3, max=2.0, step=0.05, description="σ (px)",
                        continuous_update=False, readout_format=".2f", layout=W.Layout(width="360px"))
    norm = W.Checkbox(value=normalize, description="moment-corrected")
    note = W.HTML("<i>σ and the moment correction belong to the Gaussian stencils: choose "
                  "<b>gauss</b> to set them (fd and rbffd have no width)</i>")

    def render():
        gauss = meth.value == "gauss"
        sig.disabled = norm.disabled = not gauss
        for w in (sig, norm):                                  # shown only where they act
            w.layout.display = None if gauss else "none"
        note.layout.display = "none" if gauss else None
        args = (op.value, meth.value, sz.value, sig.value if gauss else None, norm.value if gauss else True)
        return stencil_figure(args[0], method=args[1], size=args[2], sigma=args[3], normalize=args[4]), args

    return explorer([[op, sz], meth, [sig, norm, note]], render)
