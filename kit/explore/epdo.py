"""Notebook 05 (Neural ePDOs) in library form: the PDO coefficients a Neural ePDO layer generates at a
pixel of a real digit, the 5x5 stencil they make, how both transform when the digit is rotated, the
three discretisations side by side, and the equivariance error at the C16 angles.

* :func:`setup` builds the stem (lift -> BN -> ReLU) and the first Neural ePDO layer of a
  ``nepdo-mnist-regular-*`` model and picks a digit. ``pretrained=True``: the zoo's trained
  :data:`ZOO_MODEL` (``nepdo-mnist-regular-fd-small``: the reduced **C8** variant, widths
  8/8/16/16/16/32, g=2, s=2, fd stencils, trained because the C16 paper model trains at ~7 img/s
  on a 2-core CPU), with its untrained twin (:func:`kit.run.zoo.initial_twin`, batch norm calibrated
  on real digits) as ``lab.initial``; ``pretrained=False``: the untrained C16 paper model with the
  chosen discretisation, batch norm calibrated on real digits.
* :meth:`EPDOLab.at` returns the normalised coefficients ``(g, d, 15)`` and stencils ``(g, d, 5, 5)`` at a pixel.
* :func:`coefficients_figure`: the digit with the pixel, one bar per differential operator, the stencil.
* :func:`trained_vs_initial_figure`: the coefficients of the trained layer at a pixel beside those
  of its initialisation, and how the coefficient mass splits over the derivative orders.
* :func:`rotation_figure`: rotate the digit by 90 degrees: at the rotated pixel the coefficients are
  the upright ones moved along the group axis and transformed by ``D^-T`` (exact); by the group's
  smallest angle (22.5° for C16, 45° for C8; centre pixel, interpolated digit) approximately.
* :func:`discretisations_figure`: fd / gauss / rbffd stencils of a few operators, and the stencil
  generated at the pixel by the same coefficients under each discretisation.
* :func:`error_vs_angle_figure`: lift and Neural ePDO errors at every multiple of 22.5 degrees, per
  discretisation, with analytically rotated inputs (:func:`kit.layers.epdo.centre_equivariance_error`).
* :func:`precision_by_depth` / :func:`precision_figure`: the 90-degree error of a whole model, stage by
  stage, in float32 beside its round-off floor and in float64 (:func:`kit.equivariance.check` with
  ``roundoff=True``): rounding that grows with depth, against a construction exact to 1e-14.

Every figure function returns a matplotlib figure (save it with :func:`kit.explore.viz.save`).
"""
from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
from matplotlib.ticker import LogLocator
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import models
from ..equivariance import Record
from ..fields import FieldType
from ..groups import act_on_image, cyclic, disk_mask
from .lab import Lab
from ..layers.base import EquivariantSequential
from ..layers.epdo import KERNEL_SIZE, N_OPS, LinearPDOConv, NeuralEPDOConv, centre_equivariance_error, pdo_stencil_matrix
from ..models import epdo as _epdo_models  # noqa: F401  (registers the nepdo-* models)
from ..reps import coefficient_rep, component_name, components, field_rep
from ..data.sample import load_sample
from .viz import plot_error_vs_angle

__all__ = ["EPDOLab", "setup", "coefficients_figure", "trained_vs_initial", "trained_vs_initial_figure",
           "rotation_figure", "discretisations_figure", "angle_errors", "error_vs_angle_figure",
           "coefficient_explorer", "precision_by_depth", "precision_figure", "OPERATOR_NAMES", "ZOO_MODEL"]

OPERATOR_NAMES = [component_name(i, j) for i, j in components(4)]
OPERATOR_ORDERS = [i + j for i, j in components(4)]
ZOO_MODEL = "nepdo-mnist-regular-fd-small"   # the Neural ePDO net of the trained zoo (C8, reduced)
_METHOD_KW = {"fd": None, "gauss": {"normalize": False}, "rbffd": None}


@dataclass
class EPDOLab(Lab):
    """The stem and first Neural ePDO layer of a model (trained, or untrained and calibrated), and one
    digit ``x (1, 1, 28, 28)``; ``method`` the layer's discretisation."""

    method: str = "fd"

    def describe(self) -> str:
        """One line: which model, which weights (the zoo manifest's accuracies for a trained one)."""
        G, L = self.group, self.layer
        return super().describe(arch=f"{G.name} regular fields, g={L.g}, s={L.s}, {self.method} stencils")

    def check_slot(self, slot: int, component: int) -> None:
        """A clear error for a generated field / group component this layer does not have."""
        g, d = self.layer.g, self.group.order
        if not 0 <= slot < g:
            raise ValueError(f"slot must be in [0, {g}) (g = {g} generated fields per partition in {self.name}), "
                             f"got {slot}")
        if not 0 <= component < d:
            raise ValueError(f"component must be in [0, {d}) (the {self.group.name} group axis), got {component}")

    def at(self, x: torch.Tensor, row: int, col: int):
        """``(coefficients (g, d, 15), stencils (g, d, 5, 5))`` generated at pixel (row, col) of ``x``."""
        c, k = self.field(x)
        return c[..., row, col], k[..., row, col].reshape(*k.shape[:2], KERNEL_SIZE, KERNEL_SIZE)

    def field(self, x: torch.Tensor | None = None):
        """``(coefficients (g, d, 15, H, W), stencils (g, d, 25, H, W))`` at every pixel of ``x``."""
        with torch.no_grad():
            k, c = self.layer.generate(self.stem(self.x if x is None else x), coefficients=True)
        return c[0], k[0]


from ..run.zoo import Preprocess as _Preprocess  # noqa: E402  (the one stem for Standardized models)


def _stem(model: nn.Module) -> nn.Module:
    stem = EquivariantSequential(*model.layers[:3])
    return nn.Sequential(_Preprocess(model), stem) if hasattr(model, "preprocess") else stem


def setup(*, seed: int = 0, digit: int = 3, method: str | None = None, size: int = 28,
          pretrained: bool = False, name: str | None = None) -> EPDOLab:
    """The first two stages of a Neural ePDO MNIST-rot net and one digit of the bundled sample.

    ``pretrained=False``: ``nepdo-mnist-regular-<method>`` (C16; ``method`` "fd", "gauss" (default)
    or "rbffd"), seeded with ``seed``, untrained, batch norm calibrated on 64 real digits.
    ``pretrained=True``: the zoo's trained ``name`` (default :data:`ZOO_MODEL`, the reduced C8 fd
    net; ``method`` must be None or the model's), batch-norm statistics as trained, and
    ``lab.initial``, its untrained twin (:func:`kit.run.zoo.initial_twin`, calibrated on the same 64
    digits); without zoo weights it raises the zoo's error. The default pixel is the brightest on
    the stroke near the centre."""
    imgs = load_sample()["images"] * disk_mask(28, 28).float()
    if size != 28:
        imgs = F.interpolate(imgs, size=(size, size), mode="bilinear", align_corners=False)
        imgs = imgs * disk_mask(size, size).float()
    x = imgs[digit:digit + 1]
    # default pixel: the brightest pixel on the stroke near the centre
    w = x[0, 0] * disk_mask(size, size, radius=size / 4).float()
    pixel = divmod(int(w.argmax()), size)
    if pretrained:
        from ..run import zoo
        name = name or ZOO_MODEL
        model = models.create(name, pretrained=True)                           # the zoo's clear error if absent
        twin = zoo.initial_twin(name, calibrate=imgs[:64])
        layer = model.layers[3]
        if method not in (None, layer.method):
            raise ValueError(f"the trained {name} uses {layer.method!r} stencils; method={method!r} is only for "
                             f"the untrained path (pretrained=False)")
        initial = EPDOLab(stem=_stem(twin).eval(), layer=twin.layers[3].eval(), x=x, pixel=pixel, method=layer.method,
                      name=name)
        return EPDOLab(stem=_stem(model).eval(), layer=layer.eval(), x=x, pixel=pixel, method=layer.method, name=name,
                   pretrained=True, initial=initial)
    method = method or "gauss"
    if method not in _METHOD_KW:
        raise ValueError(f"method must be one of {sorted(_METHOD_KW)}, got {method!r}")
    torch.manual_seed(seed)
    name = name or ("nepdo-mnist-regular-gauss" if method == "gauss" else "nepdo-mnist-regular-fd")
    model = models.create(name, method=method, stencil_kw=_METHOD_KW[method])
    stem = EquivariantSequential(*model.layers[:3])
    layer = model.layers[3]
    models.calibrate_batchnorm(stem, imgs[:64])
    stem.eval()
    layer.eval()
    return EPDOLab(stem=stem, layer=layer, x=x, pixel=pixel, method=method, name=name)


def _bars(ax, v, title, color="#1f77b4", pred=None, labels=True):
    """One bar per operator (beside ``pred``'s, orange, when given); ``labels``: operator names on x."""
    idx = np.arange(N_OPS)
    if pred is None:
        ax.bar(idx, v, color=color)
    else:
        ax.bar(idx - 0.2, v, width=0.4, color=color, label="measured")
        ax.bar(idx + 0.2, pred, width=0.4, color="#ff7f0e", label="predicted")
    ax.axhline(0, color="k", lw=0.5)
    _operator_axis(ax, labels)
    ax.tick_params(axis="y", labelsize=9)
    ax.yaxis.set_major_locator(plt.MaxNLocator(5))
    ax.set_title(title, fontsize=9)


def _operator_axis(ax, labels=True):
    """The 15 operators on x (their names, rotated, with ``labels``)."""
    ax.set_xticks(range(N_OPS))
    ax.set_xticklabels(OPERATOR_NAMES if labels else [], rotation=90, fontsize=9)


def _stencil(ax, K, title):
    v = float(np.abs(K).max()) or 1.0
    ax.imshow(K, cmap="RdBu_r", vmin=-v, vmax=v)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def _components(fig, ax, cax, c, title):
    """Heat map of the coefficients ``c (d, 15)`` of one field at every group component, colour bar in
    ``cax``; ``{v}`` in ``title`` becomes the colour scale's limit. Returns that limit."""
    v = float(c.abs().max()) or 1.0
    im = ax.imshow(c.numpy(), cmap="RdBu_r", vmin=-v, vmax=v, aspect="auto")
    _operator_axis(ax)
    ax.tick_params(axis="y", labelsize=9)
    ax.yaxis.set_major_locator(plt.MaxNLocator(4, integer=True))
    ax.set_ylabel("group component", fontsize=9)
    ax.set_title(title.format(v=f"{v:.2f}"), fontsize=9)
    cb = fig.colorbar(im, cax=cax)
    cb.ax.tick_params(labelsize=9)
    cb.locator = plt.MaxNLocator(5)
    cb.update_ticks()
    return v


def _digit_panel(ax, lab, row, col):
    """The lab's digit with the chosen pixel marked."""
    ax.imshow(lab.x[0, 0].numpy(), cmap="gray")
    ax.plot(col, row, "r+", ms=12, mew=2)
    ax.set_title(f"digit, pixel ({row}, {col})", fontsize=9)
    ax.axis("off")


def coefficients_figure(lab: EPDOLab, row: int, col: int, *, slot: int = 0, component: int = 0):
    """The digit with the pixel; the 15 PDO coefficients of generated field ``slot``, group
    component ``component`` (one bar per operator, kit order); below them all the group components
    as a heat map (the one of the bars framed); the resulting 5x5 stencil."""
    lab.check_slot(slot, component)
    c, k = lab.at(lab.x, row, col)
    fig = plt.figure(figsize=(8.2, 5.6))
    outer = fig.add_gridspec(1, 2, width_ratios=[1.2, 3.4], wspace=0.3, top=0.87)
    gs = outer[1].subgridspec(2, 2, width_ratios=[1, 0.035], height_ratios=[1, 1.15], wspace=0.04, hspace=0.2)
    left = outer[0].subgridspec(2, 1, hspace=0.3)
    _digit_panel(fig.add_subplot(left[0]), lab, row, col)
    _stencil(fig.add_subplot(left[1]), k[slot, component].numpy(), f"stencil ({lab.method}),\ncomponent {component}")
    G = lab.group
    _bars(fig.add_subplot(gs[0, 0]), c[slot, component].numpy(), f"coefficients c_a, field {slot}, component "
          f"{component} ({G.degrees(G.elements[component]):g}°)", labels=False)
    ax = fig.add_subplot(gs[1, 0])
    _components(fig, ax, fig.add_subplot(gs[1, 1]), c[slot], f"all {c.shape[1]} components of field {slot}")
    ax.add_patch(plt.Rectangle((-0.5, component - 0.5), N_OPS, 1, fill=False, ec="black", lw=1.5))
    fig.suptitle(f"Neural ePDO, {lab.state} {lab.name} ({G.name}, {lab.method}):\nthe operator generated "
                 f"at one pixel", fontsize=10)
    return fig


def _operator_share(c: torch.Tensor) -> np.ndarray:
    """Each operator's share of the coefficients' L1 mass, ``(15,)`` summing to 1 (``c (g, d, 15, n)``)."""
    a = c.abs().transpose(-1, -2).reshape(-1, N_OPS).sum(0)
    return (a / a.sum()).numpy()


def trained_vs_initial(lab: EPDOLab, row: int | None = None, col: int | None = None, *, slot: int = 0,
                       component: int = 0) -> dict:
    """The coefficients the trained first Neural ePDO layer generates at pixel ``(row, col)`` beside
    its initial twin's (``lab`` from ``setup(pretrained=True)``). Returns ``trained`` / ``initial``
    coefficients ``(g, d, 15)`` and stencils ``(g, d, 5, 5)`` (``*_stencil``), ``share_*``
    (each operator's share of the coefficients' L1 mass, all fields and components, over the
    stroke pixels, digit > 0.5), ``relative_change`` ``||c_t - c_0|| / ||c_0||`` and ``cosine`` at
    the pixel, and ``rotation_error``: the trained coefficients at the 90°-rotated pixel against
    ``rho(g) c D(g)^-1`` (relative; float noise: exact)."""
    if lab.initial is None:
        raise ValueError("trained_vs_initial needs a lab from epdoviz.setup(pretrained=True) "
                         "(a trained model and its initial twin)")
    lab.check_slot(slot, component)
    row, col = lab.pixel if row is None else (row, col)
    (ct, kt), (c0, k0) = lab.at(lab.x, row, col), lab.initial.at(lab.x, row, col)
    stroke = lab.x[0, 0] > 0.5

    def share(l):
        return _operator_share(l.field()[0][..., stroke])                    # (g, d, 15, n) -> (15,)

    return dict(trained=ct, initial=c0, trained_stencil=kt, initial_stencil=k0, pixel=(row, col), slot=slot,
                component=component, share_trained=share(lab), share_initial=share(lab.initial),
                relative_change=float((ct - c0).norm() / c0.norm()),
                cosine=float((ct * c0).sum() / (ct.norm() * c0.norm())),
                rotation_error=rotation_errors(lab, row, col)[90.0][3])


def trained_vs_initial_figure(lab: EPDOLab, row: int | None = None, col: int | None = None, *, slot: int = 0,
                              component: int = 0):
    """Top row: the digit with pixel ``(row, col)`` and the stencil of field ``slot``, component
    ``component`` there, trained and initial (the twin the training started from). Middle row: the
    coefficients of field ``slot`` at every group component, trained and initial (heat maps, each on
    its own colour scale). Bottom row: the coefficients of component ``component``, trained beside
    initial, and each operator's share of the coefficient mass over the stroke, trained vs initial.
    The numbers of :func:`trained_vs_initial` are in the title and in ``fig.stats``."""
    st = trained_vs_initial(lab, row, col, slot=slot, component=component)
    row, col = st["pixel"]
    G = lab.group
    fig = plt.figure(figsize=(8.3, 8.6))
    outer = fig.add_gridspec(2, 1, height_ratios=[0.75, 2.4], hspace=0.12, top=0.87, bottom=0.04)
    top = outer[0].subgridspec(1, 3, wspace=0.3)
    lower = outer[1].subgridspec(2, 1, hspace=0.45)
    _digit_panel(fig.add_subplot(top[0]), lab, row, col)
    maps = lower[0].subgridspec(1, 5, width_ratios=[1, 0.04, 0.14, 1, 0.04], wspace=0.08)
    for i, what in enumerate(("trained", "initial")):
        c, k = st[what], st[f"{what}_stencil"]
        _stencil(fig.add_subplot(top[1 + i]), k[slot, component].numpy(),
                 f"{what}: stencil ({lab.method}),\ncomponent {component}")
        a = fig.add_subplot(maps[3 * i])
        _components(fig, a, fig.add_subplot(maps[3 * i + 1]), c[slot],
                    f"{what}: field {slot}, all {G.order} components (±{{v}})")
        if i:
            a.set_ylabel(""), a.set_yticklabels([])
    bottom = lower[1].subgridspec(1, 2, wspace=0.3)
    o = np.arange(N_OPS)
    a = fig.add_subplot(bottom[0])
    a.bar(o - 0.2, st["trained"][slot, component].numpy(), 0.4, color="#1f77b4", label="trained")
    a.bar(o + 0.2, st["initial"][slot, component].numpy(), 0.4, color="#7f7f7f", label="initial")
    a.axhline(0, color="k", lw=0.5)
    _operator_axis(a)
    a.tick_params(axis="y", labelsize=9)
    a.yaxis.set_major_locator(plt.MaxNLocator(5))
    a.set_title(f"coefficients c_a of component {component} ({G.degrees(G.elements[component]):g}°)", fontsize=9)
    a = fig.add_subplot(bottom[1])
    a.bar(o - 0.2, st["share_trained"], 0.4, color="#1f77b4", label="trained")
    a.bar(o + 0.2, st["share_initial"], 0.4, color="#7f7f7f", label="initial")
    _operator_axis(a)
    a.tick_params(axis="y", labelsize=9)
    a.yaxis.set_major_locator(plt.MaxNLocator(5))
    a.set_title("share of Σ|c_a| over the stroke\n(all fields and components)", fontsize=9)
    a.legend(fontsize=9, loc="upper right")
    fig.suptitle(f"{lab.name} ({G.name}, {lab.method}): first Neural ePDO layer, trained vs the initial "
                 f"weights\nof the same run; at the pixel ||c_trained − c_initial|| / ||c_initial|| = "
                 f"{st['relative_change']:.2f}, cosine {st['cosine']:.2f};\ntrained coefficients at the 90°-rotated "
                 f"pixel = ρ(g) c D(g)⁻¹ to {st['rotation_error']:.0e}", fontsize=10)
    fig.stats = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in st.items()
                 if not isinstance(v, torch.Tensor)}
    return fig


def coefficient_explorer(lab: EPDOLab, row: int | None = None, col: int | None = None, *, slot: int = 0,
                         component: int = 0):
    """ipywidgets: sliders for the pixel (row, column), the generated field (slot) and the group
    component; redraws :func:`coefficients_figure` on release. Returns an ``ipywidgets.VBox`` with
    ``state = {draws, figure, args}`` (read by tests)."""
    import ipywidgets as W
    from .widgets import explorer

    H, Wd = lab.x.shape[-2:]
    r0, c0 = lab.pixel if row is None else (row, col)
    lab.check_slot(slot, component)
    c, _ = lab.at(lab.x, r0, c0)
    kw = dict(continuous_update=False, style={"description_width": "initial"})
    rw = W.IntSlider(value=r0, min=0, max=H - 1, description="row", **kw)
    cl = W.IntSlider(value=c0, min=0, max=Wd - 1, description="column", **kw)
    sl = W.IntSlider(value=slot, min=0, max=c.shape[0] - 1, description="field", **kw)
    cp = W.IntSlider(value=component, min=0, max=c.shape[1] - 1, description="component", **kw)

    def render():
        args = (rw.value, cl.value, sl.value, cp.value)
        return coefficients_figure(lab, args[0], args[1], slot=args[2], component=args[3]), args

    return explorer([[rw, cl], [sl, cp]], render)


def rotation_errors(lab: EPDOLab, row: int, col: int) -> dict:
    """``{degrees: (measured (g, d, 15), predicted (g, d, 15), pixel, relative error)}`` for the two
    cases of :func:`rotation_figure`: 90° at pixel ``(row, col)`` (exact on the grid) and the
    group's smallest angle at the centre pixel of a padded copy (digit rotated by interpolation)."""
    G = lab.group
    out = {}
    for k_el, x, (r, c_), (r2, c2) in _rotation_cases(lab, row, col):
        g = G.element(k_el)
        perm = field_rep(G).perm[G.index(g)]
        c0, _ = lab.at(x[0], r, c_)
        c1, _ = lab.at(x[1], r2, c2)
        Dt = coefficient_rep(G)(g).float()                                   # D^-T(g)
        pred = c0[:, perm] @ Dt.T                                            # rho(g) C D(g)^-1
        out[G.degrees(g)] = (c1, pred, (r2, c2), float((c1 - pred).norm() / pred.norm()))
    return out


def rotation_figure(lab: EPDOLab, row: int, col: int, *, slot: int = 0, component: int = 0):
    """Top: rotate the digit by 90 degrees; the coefficients at the rotated pixel, component
    ``rho(g) component``, vs the prediction ``c D(g)^-1`` from the upright ones (exact). Bottom: the
    group's smallest angle (22.5° for C16, 45° for C8), at the centre pixel of a 29x29 copy (digit
    rotated by interpolation: approximate)."""
    lab.check_slot(slot, component)
    fig, ax = plt.subplots(2, 1, figsize=(7.6, 5.6), sharex=True)
    out = {}
    for k, (a, (deg, (c1, pred, (r2, c2), err))) in enumerate(zip(ax, rotation_errors(lab, row, col).items())):
        out[deg] = err
        j = component
        _bars(a, c1[slot, j].numpy(), f"rotated {deg:g}°: pixel ({r2}, {c2}), component {j}; "
                                      f"rel. error (all fields) {err:.1e}", pred=pred[slot, j].numpy(), labels=k == 1)
    ax[0].legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.suptitle(f"Rotating the input moves the operator along the group axis and transforms its\n"
                 f"coefficients by D^-T ({lab.state} {lab.name}, {lab.group.name})", fontsize=10)
    fig.tight_layout()
    fig.errors = out
    return fig


def _rotation_cases(lab: EPDOLab, row: int, col: int):
    n = lab.group.n
    if n % 4:
        raise ValueError(f"the rotation figure needs a group with a 90° rotation (C_n, 4 | n), got {lab.group.name}")
    q = lab.group.element(n // 4)                                            # the rotation by 90 degrees
    yield n // 4, (lab.x, lab.rotated(q)), (row, col), lab.move_pixel(row, col, q)
    xp = F.pad(lab.x, (0, 1, 0, 1))                                          # 29x29: a centre pixel
    m = xp.shape[-1] // 2
    yield 1, (xp, act_on_image(xp, 360.0 / n, mode="bicubic")), (m, m), (m, m)


def discretisations_figure(lab: EPDOLab, row: int, col: int, *, slot: int = 0, component: int = 0,
                           operators=((1, 0), (2, 0), (1, 1), (3, 0), (2, 2))):
    """Rows fd / gauss / rbffd: the stencils of a few operators (one per column), and (last column)
    the stencil that the coefficients generated at the pixel make under each discretisation."""
    lab.check_slot(slot, component)
    c, _ = lab.at(lab.x, row, col)
    coef = c[slot, component].double()
    fig, ax = plt.subplots(3, len(operators) + 1, figsize=(1.25 * (len(operators) + 1) + 0.3, 4.9))
    for i, m in enumerate(("fd", "gauss", "rbffd")):
        S, _ = pdo_stencil_matrix(m, _METHOD_KW[m])
        S = S.reshape(N_OPS, KERNEL_SIZE, KERNEL_SIZE)
        for j, (a, b) in enumerate(operators):
            _stencil(ax[i, j], S[components(4).index((a, b))].numpy(), component_name(a, b) if i == 0 else None)
        K = torch.einsum("a,auv->uv", coef, S)
        _stencil(ax[i, -1], K.numpy(), "generated c·S" if i == 0 else None)
        ax[i, 0].set_ylabel(m, fontsize=10)
    fig.suptitle("Three discretisations, one component order and\nsign convention (red +, blue −)", fontsize=10)
    fig.tight_layout(h_pad=0.4, w_pad=0.4)
    return fig


def angle_errors(*, methods=("fd", "gauss", "rbffd"), steps: int = 8, fields: int = 4, batch: int = 4,
                 seed: int = 0) -> dict:
    """``{method: {"angles": [...], "lift": [...], "nlpdo": [...], "lift_opposite": [...],
    "nlpdo_opposite": [...]}}``: the errors at the C16 elements k = 1..steps (22.5 k degrees),
    centre protocol (:func:`kit.layers.epdo.centre_equivariance_error`), in the kit's direction and
    the opposite one."""
    G = cyclic(16)
    rep = field_rep(G)
    out = {}
    for m in methods:
        torch.manual_seed(seed)
        lift = LinearPDOConv(in_type=FieldType(G, "trivial", 1), out_fields=fields, method=m,
                             stencil_kw=_METHOD_KW[m])
        nl = NeuralEPDOConv(in_type=FieldType(G, rep, fields), out_fields=fields, g=4, s=1, method=m,
                            stencil_kw=_METHOD_KW[m])
        res = {"angles": [22.5 * k for k in range(1, steps + 1)]}
        for name, mod in (("lift", lift), ("nlpdo", nl)):
            for d, suffix in ((1, ""), (-1, "_opposite")):
                res[name + suffix] = [centre_equivariance_error(mod, G.element(k), batch=batch, direction=d)
                                      for k in range(1, steps + 1)]
        out[m] = res
    return out


def error_vs_angle_figure(errors: dict):
    """Relative error vs angle (log scale; exact zeros drawn at 1e-16) for each discretisation, in the
    kit's direction and the opposite one (:func:`kit.explore.viz.plot_error_vs_angle`)."""
    fig, ax = plt.subplots(1, 2, figsize=(7.6, 4.2), sharey=True)
    colors = {"fd": "#1f77b4", "gauss": "#2ca02c", "rbffd": "#d62728"}
    marks = {"fd": "o", "gauss": "s", "rbffd": "^"}

    def recs(angles, errs):
        return [Record(element=None, angle=float(a), mirror=False, error=float(e)) for a, e in zip(angles, errs)]
    for a, name in zip(ax, ("lift", "nlpdo")):
        for m, res in errors.items():
            angles = res["angles"]
            plot_error_vs_angle(a, recs(angles, res[name]), label=m, color=colors.get(m), style=marks.get(m, "o") + "-",
                                ms=6, floor_min=1e-16, error_label="kit direction")
            plot_error_vs_angle(a, recs(angles, res[name + "_opposite"]), label=m, color=colors.get(m), style="x:",
                                ms=6, floor_min=1e-16, error_label="opposite direction")
        a.set_yscale("log")
        a.yaxis.set_major_locator(LogLocator(numticks=6))
        a.set_xticks(angles, [f"{v:g}" for v in angles])
        a.tick_params(labelsize=9)
        a.set_xlabel("rotation (degrees)", fontsize=9)
        a.set_title({"lift": "linear PDO-eConv lift", "nlpdo": "Neural ePDO layer"}[name], fontsize=10)
        a.grid(alpha=0.3)
    ax[0].set_ylabel("relative error at the rotation centre", fontsize=9)
    h, l = ax[1].get_legend_handles_labels()
    fig.legend(h, l, fontsize=9, ncol=3, loc="lower center", frameon=False)
    fig.suptitle("C16 angles: exact at multiples of 90°, approximate in between;\nthe opposite direction is far off",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig


# ----------------------------------------------------------------------- float32 vs float64, by depth
def precision_by_depth(*, method: str = "gauss", widths=None, seed: int = 0, batch: int = 4) -> dict:
    """The 90-degree equivariance of ``nepdo-mnist-regular-<method>`` after each stage.

    Stages: the lift, each Neural ePDO layer (with its BN and ReLU), and the logits. At each stage,
    over the rotations by 90, 180 and 270 degrees (``batch`` real digits, untrained model with batch
    norm calibrated on 64 others): the float32 error, its round-off floor and the float64 error of
    :func:`kit.equivariance.check` (``roundoff=True``; ``error_f32 <= floor + error_f64``).
    ``widths`` overrides the six widths (``None``: the paper's 16, 24, 32, 32, 48, 64).
    """
    from ..equivariance import check, float64_twin

    torch.manual_seed(seed)
    name = "nepdo-mnist-regular-gauss" if method == "gauss" else "nepdo-mnist-regular-fd"
    kw = {} if widths is None else {"widths": tuple(widths)}
    model = models.create(name, method=method, stencil_kw=_METHOD_KW[method], **kw)
    imgs = load_sample()["images"] * disk_mask(28, 28).float()
    models.calibrate_batchnorm(model, imgs[:64])
    x = imgs[64:64 + batch]
    G = model.in_type.group
    rots = [g for g in G.elements if G.is_exact_on_grid(g) and g != G.identity]
    layers = list(model.layers)
    ends = [i + 3 for i, m in enumerate(layers) if isinstance(m, (LinearPDOConv, NeuralEPDOConv))]  # after ReLU
    stages, labels = [layers[:e] for e in ends] + [layers], \
        ["lift"] + [f"ePDO {i}" for i in range(1, len(ends))] + ["logits"]
    out = {"labels": labels, "error_f32": [], "floor": [], "error_f64": [], "method": method,
           "widths": None if widths is None else list(widths)}
    for mods in stages:
        block = EquivariantSequential(*mods) if mods is not layers else model
        recs = check(block, rots, x, roundoff=True)
        out["error_f32"].append(max(r.error for r in recs))
        out["floor"].append(max(r.floor for r in recs))
        out["error_f64"].append(max(r.error for r in check(float64_twin(block), rots, x.double())))
    return out


def precision_figure(res: dict, *, target: float = 1e-5):
    """Float32 error, its round-off floor and the float64 error per stage (log scale)."""
    fig, ax = plt.subplots(figsize=(7.4, 4.4))
    i = np.arange(len(res["labels"]))
    ax.semilogy(i, res["error_f32"], "o-", color="#1f77b4", label="float32 error at 90°·k")
    ax.semilogy(i, res["floor"], "v--", color="#1f77b4", mfc="none", alpha=0.7,
                label="float32 round-off floor\n(error <= floor + float64 error)")
    ax.semilogy(i, np.maximum(res["error_f64"], 1e-17), "s-", color="#2ca02c", label="float64 error at 90°·k")
    ax.axhline(target, color="#d62728", lw=1, ls=":", label=f"target {target:g} (issue 6)")
    ax.set_xticks(i, res["labels"])
    ax.yaxis.set_major_locator(LogLocator(numticks=7))
    ax.tick_params(labelsize=9)
    ax.set_ylabel("relative error\n(max over 90°, 180°, 270°)", fontsize=9)
    ax.grid(alpha=0.3, which="both", axis="y")
    ax.legend(fontsize=9, loc="center right")
    ax.set_title(f"Neural ePDO ({res['method']}), stage by stage: float32 rounding grows\nwith depth; "
                 f"float64 stays exact", fontsize=10)
    fig.tight_layout()
    return fig
