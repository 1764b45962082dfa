"""Notebook 03 (E4 dynamic filters) in library form: an E4-Net (trained, from the zoo, or untrained
and calibrated), the kernels its first E4 layer generates at a pixel, and figure builders /
ipywidgets explorers on top of them.

* :func:`setup` builds ``e4-mnist-normal`` and picks one real digit. ``pretrained=True``: the zoo's
  trained weights (:func:`kit.models.create` with ``pretrained=True``), with the exact untrained
  initialisation of that training run beside it (:func:`kit.run.zoo.initial_twin`, batch norm
  calibrated on real digits) as ``lab.initial``; ``pretrained=False``: a seeded, untrained model,
  batch norm calibrated on real digits. :meth:`E4Lab.kernels_at` returns the steered dynamic kernels
  ``(S, |G|, K, K)`` the first E4 layer generates at one pixel, one per slice and group element.
* :func:`dynamic_filters_figure`: the digit with the pixel marked, and those kernels.
* :func:`filter_rotation_figure`: rotate the digit by quarter turns; the kernels at the *rotated*
  pixel are the upright ones, rotated and moved along the group axis (checked numerically).
* :func:`trained_vs_initial_figure`: the trained model's kernels at a pixel beside those of its
  initialisation (``pretrained=True`` only), with the kernel norm at every pixel.
* :func:`static_vs_dynamic_figure`: a G-CNN kernel is the same at every pixel; an E4 kernel is not.
* :func:`affine_break` / :func:`affine_break_figure`: the kit's per-field GroupNorm affine is exact
  for any values (on the trained weights, and after randomly perturbing every parameter); the
  official per-channel affine breaks equivariance once its values differ across orientations (no
  model was trained with it, so that case is a perturbation).
* :func:`filter_explorer`: sliders for pixel row / column, slice and rotation.

Every figure function returns a matplotlib figure (save it with :func:`kit.explore.viz.save`).
"""
from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
from matplotlib.ticker import LogLocator
import torch
import torch.nn as nn

from .. import models
from ..equivariance import check
from ..groups import Element, Group, disk_mask
from .lab import Lab
from ..layers.e4 import E4Conv
from ..layers.gconv import GroupConv
from ..data.sample import load_sample

__all__ = ["E4Lab", "setup", "perturb_parameters", "dynamic_filters_figure", "filter_rotation_figure",
           "trained_vs_initial", "trained_vs_initial_figure", "static_vs_dynamic_figure", "affine_break",
           "affine_break_figure", "filter_explorer"]


def _label(G: Group, g: Element) -> str:
    return f"{G.degrees(g):g}°" + (" m" if g.f else "")


def perturb_parameters(module: nn.Module, *, seed: int = 1, scale: float = 0.5) -> nn.Module:
    """Mimic training: add Gaussian noise (``scale`` x each tensor's spread) to *every* parameter,
    affine parameters at their 1/0 initialisation included. In place; returns the module."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            s = p.std().item() if p.numel() > 1 and p.std() > 0 else 1.0
            p.add_(scale * s * torch.randn(p.shape, generator=g))
    return module


@dataclass
class E4Lab(Lab):
    """An E4 model (trained, or untrained and calibrated), its first E4 layer (``stem``: the model up
    to it, lift -> BN -> ReLU) and one real digit ``x (1, 1, H, W)``."""

    model: nn.Module | None = None
    name: str = "e4-mnist-normal"

    @torch.no_grad()
    def kernel_field(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """Every generated, steered kernel: ``(S, |G|, K, K, H, W)`` for one image."""
        k = self.layer.generate_kernels(self.features(x))[0]                   # (S, G, KK, H, W)
        K = self.layer.kernel_size
        return k.unflatten(2, (K, K))                                          # (S, G, K, K, H, W)

    def kernels_at(self, row: int, col: int, x: torch.Tensor | None = None) -> torch.Tensor:
        """The kernels generated at pixel ``(row, col)``: ``(S, |G|, K, K)``, taps as an image
        (row 0 at the top, the kernel's centre on the pixel)."""
        self.check_pixel(row, col)
        return self.kernel_field(x)[..., row, col]


from ..run.zoo import Preprocess as _Preprocess  # noqa: E402  (the one stem for Standardized models)


def _split(model: nn.Module) -> tuple[nn.Module, E4Conv]:
    """``(stem, first E4 layer)``: the model up to its first E4 layer (input standardisation included)."""
    layers = list(model.layers)
    first = next(i for i, m in enumerate(layers) if isinstance(m, E4Conv))
    pre = [_Preprocess(model)] if hasattr(model, "preprocess") else []
    return nn.Sequential(*pre, *layers[:first]).eval(), layers[first]


def setup(*, name: str = "e4-mnist-normal", seed: int = 0, digit: int = 3, calibration: int = 128,
          pretrained: bool = False) -> E4Lab:
    """Pick digit ``digit`` of the bundled sample and build ``name`` in eval mode.

    ``pretrained=False``: seeded with ``seed``, untrained, batch norm calibrated on the last
    ``calibration`` real digits. ``pretrained=True``: the zoo's trained weights (batch-norm
    statistics as trained; ``seed`` is not used), and ``lab.initial``, the untrained twin of that
    zoo run (:func:`kit.run.zoo.initial_twin`, calibrated on the same digits); without zoo weights for
    ``name`` it raises the zoo's error. The default pixel is the brightest one within 8 pixels of
    the centre."""
    imgs = load_sample()["images"] * disk_mask(28, 28).float()                 # (N, 1, 28, 28)
    if not 0 <= digit < imgs.shape[0] - calibration:
        raise ValueError(f"digit must be in [0, {imgs.shape[0] - calibration}), got {digit}")
    x = imgs[digit:digit + 1]
    near = disk_mask(28, 28, radius=8.0).float()
    pixel = divmod(int((x[0, 0] * near).argmax()), x.shape[-1])
    if pretrained:
        from ..run import zoo
        model = models.create(name, pretrained=True)                           # the zoo's clear error if absent
        twin = zoo.initial_twin(name, calibrate=imgs[-calibration:])
        initial = _lab(twin, x, pixel, name=name)
        return _lab(model, x, pixel, name=name, pretrained=True, initial=initial)
    torch.manual_seed(seed)
    model = models.calibrate_batchnorm(models.create(name), imgs[-calibration:])
    return _lab(model, x, pixel, name=name)


def _lab(model, x, pixel, **kw) -> E4Lab:
    stem, layer = _split(model)
    return E4Lab(model=model, layer=layer, stem=stem, x=x, pixel=pixel, **kw)


# ------------------------------------------------------------------------------ drawing helpers
def _kernel(ax, k, vmax, title=None):
    ax.imshow(k.detach().float().numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    K = k.shape[-1]
    ax.plot([K // 2], [K // 2], marker="+", color="black", ms=6, mew=1)          # the kernel's centre
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def _digit(ax, x, pixels, title=None):
    ax.imshow(x[0, 0].detach().numpy(), cmap="gray")
    for name, (r, c) in pixels.items():
        ax.plot(c, r, marker="s", ms=7, mfc="none", mec="#ff3333", mew=1.5)
        if name:
            ax.annotate(name, (c, r), xytext=(5, -5), textcoords="offset points", color="#ff3333",
                        fontsize=9, fontweight="bold")
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def _vmax(*ts):
    return max(float(t.abs().max()) for t in ts) or 1.0


# ------------------------------------------------------------------------------ figures
def dynamic_filters_figure(lab: E4Lab, row: int | None = None, col: int | None = None, *,
                           quarter_turns: int = 0, slices: int | None = None):
    """The digit (rotated by ``quarter_turns`` x 90°) with pixel ``(row, col)`` marked, and the
    kernels the first E4 layer generates there: one row per slice, one column per group element.
    """
    row, col = (lab.pixel if row is None else (row, col if col is not None else lab.pixel[1]))
    G = lab.group
    u = G.element(quarter_turns % G.n)
    x = lab.rotated(u)
    r, c = lab.move_pixel(row, col, u)
    k = lab.kernels_at(r, c, x)                                                  # (S, G, K, K)
    S = k.shape[0] if slices is None else min(slices, k.shape[0])
    vmax = _vmax(k[:S])
    fig = plt.figure(figsize=(3.0 + 1.25 * G.order, 0.4 + 1.3 * max(S, 2)))
    gs = fig.add_gridspec(S, G.order + 2, width_ratios=[2.0, 0.3] + [1] * G.order, wspace=0.15, hspace=0.3)
    _digit(fig.add_subplot(gs[:, 0]), x, {"": (r, c)},
           f"input rotated {90 * (quarter_turns % G.n)}°,\npixel ({r}, {c})")
    for s in range(S):
        for i, g in enumerate(G.elements):
            ax = fig.add_subplot(gs[s, 2 + i])
            _kernel(ax, k[s, i], vmax, f"g = {_label(G, g)}" if s == 0 else None)
            if i == 0:
                ax.set_ylabel(f"slice {s}", fontsize=9)
    fig.suptitle(f"E4 kernels generated at one pixel ({lab.state} {lab.name}, first E4 layer, "
                 f"{lab.layer.kernel_size}x{lab.layer.kernel_size}, colour scale ±{vmax:.2f}; + = the pixel)",
                 fontsize=9)
    return fig


def rotated_kernels(lab: E4Lab, row: int, col: int, element: Element):
    """Rotate the digit by ``element``: ``(upright, measured, predicted)`` kernels ``(S, |G|, K, K)``
    at pixel ``(row, col)`` of the upright digit, at the moved pixel of the rotated digit, and the
    prediction of equivariance ``K'(u p, h) = u . K(p, u^-1 h)`` from the upright ones."""
    G, u = lab.group, element
    k0 = lab.kernels_at(row, col)                                                # (S, G, K, K)
    r, c = lab.move_pixel(row, col, u)
    k1 = lab.kernels_at(r, c, lab.rotated(u))                                    # (S, G, K, K)
    pred = torch.stack([G.act_on_image(k0[:, G.index(G.compose(G.inverse(u), h))], u) for h in G.elements], 1)
    return k0, k1, pred


def filter_rotation_figure(lab: E4Lab, row: int | None = None, col: int | None = None, *, quarter_turns: int = 1,
                           slice: int = 0):
    """Rotate the input by ``quarter_turns`` x 90°: top row, the kernels at the pixel of the upright
    digit; middle row, the kernels at the *moved* pixel of the rotated digit; bottom row, the
    prediction of equivariance: each upright kernel rotated by the same angle and moved one step per
    quarter turn along the group axis (``K'(u p, h) = u . K(p, u^-1 h)``). The title gives the
    largest difference between the middle and bottom rows (float noise: exact)."""
    row, col = (lab.pixel if row is None else (row, col if col is not None else lab.pixel[1]))
    G = lab.group
    u = G.element(quarter_turns % G.n)
    xr = lab.rotated(u)
    r, c = lab.move_pixel(row, col, u)
    k0, k1, pred = (k[slice] for k in rotated_kernels(lab, row, col, u))          # (G, K, K) each
    err = float((k1 - pred).abs().max())
    vmax = _vmax(k0, k1)
    fig = plt.figure(figsize=(2.6 + 1.25 * G.order, 4.6))
    gs = fig.add_gridspec(3, G.order + 1, width_ratios=[1.6] + [1] * G.order, wspace=0.15, hspace=0.35)
    _digit(fig.add_subplot(gs[0, 0]), lab.x, {"": (row, col)}, f"upright, pixel ({row}, {col})")
    _digit(fig.add_subplot(gs[1, 0]), xr, {"": (r, c)}, f"rotated {90 * (quarter_turns % G.n)}°, pixel ({r}, {c})")
    ax = fig.add_subplot(gs[2, 0])
    ax.axis("off")
    ax.text(0.5, 0.5, f"prediction:\nupright kernel of\ng' = u⁻¹g, rotated\nby u = {_label(G, u)}",
            ha="center", va="center", fontsize=9, transform=ax.transAxes)
    for i, h in enumerate(G.elements):
        src = G.compose(G.inverse(u), h)
        _kernel(fig.add_subplot(gs[0, 1 + i]), k0[i], vmax, f"g = {_label(G, h)}")
        _kernel(fig.add_subplot(gs[1, 1 + i]), k1[i], vmax)
        _kernel(fig.add_subplot(gs[2, 1 + i]), pred[i], vmax, f"rot({_label(G, src)} kernel)")
    fig.suptitle(f"Rotate the digit by {90 * (quarter_turns % G.n)}°: the kernel moves with the pixel, rotates, "
                 f"and shifts along the group axis\n({lab.state} {lab.name}, slice {slice}; colour scale "
                 f"±{vmax:.2f}; max |middle − bottom| = {err:.1e}: float rounding)", fontsize=9, y=1.03)
    fig.max_error = err
    return fig


def _norm_map(lab: E4Lab) -> torch.Tensor:
    """The norm of all kernels generated at each pixel (slices and group elements together), ``(H, W)``."""
    return lab.kernel_field().flatten(0, 3).norm(dim=0)


def trained_vs_initial(lab: E4Lab, row: int | None = None, col: int | None = None) -> dict:
    """The trained model's kernels at pixel ``(row, col)`` beside its initial twin's (``lab`` from
    ``setup(pretrained=True)``). Returns ``trained`` / ``initial`` kernels ``(S, |G|, K, K)``,
    ``norm_trained`` / ``norm_initial`` (the kernel norm at every pixel, ``(H, W)``) and numbers:
    ``rms_trained`` / ``rms_initial`` (rms tap at the pixel), ``relative_change``
    ``||K_t - K_0|| / ||K_0||``, ``cosine`` between them, ``stroke_ratio_*`` (mean kernel norm on
    the stroke, digit > 0.5, over the mean on the background, digit = 0, inside the disk) and
    ``rotation_error``: the largest ``|K'(u p) - u . K(p)|`` of the trained kernels over the quarter
    turns, relative to their largest tap (float noise: exact); ``positive_trained`` /
    ``positive_initial``: per slice, the share of positive taps at the pixel."""
    if lab.initial is None:
        raise ValueError("trained_vs_initial needs a lab from e4viz.setup(pretrained=True) "
                         "(a trained model and its initial twin)")
    row, col = (lab.pixel if row is None else (row, col if col is not None else lab.pixel[1]))
    kt, k0 = lab.kernels_at(row, col), lab.initial.kernels_at(row, col)
    nt, n0 = _norm_map(lab), _norm_map(lab.initial)
    img = lab.x[0, 0]
    disk = disk_mask(*img.shape)
    stroke, back = img > 0.5, (img == 0) & disk

    def ratio(n):
        return float(n[stroke].mean() / n[back].mean())

    G = lab.group
    rot = []
    for q in range(1, G.n):
        _, k1, pred = rotated_kernels(lab, row, col, G.element(q))
        rot.append(float((k1 - pred).abs().max() / k1.abs().max()))
    return dict(trained=kt, initial=k0, norm_trained=nt, norm_initial=n0, pixel=(row, col),
                rms_trained=float(kt.pow(2).mean().sqrt()), rms_initial=float(k0.pow(2).mean().sqrt()),
                relative_change=float((kt - k0).norm() / k0.norm()),
                cosine=float((kt * k0).sum() / (kt.norm() * k0.norm())),
                stroke_ratio_trained=ratio(nt), stroke_ratio_initial=ratio(n0), rotation_error=max(rot),
                positive_trained=[round(float((k > 0).float().mean()), 3) for k in kt],
                positive_initial=[round(float((k > 0).float().mean()), 3) for k in k0])


def trained_vs_initial_figure(lab: E4Lab, row: int | None = None, col: int | None = None):
    """Left, top block: the kernels the *trained* first E4 layer generates at pixel ``(row, col)``
    (one row per slice, one column per group element); bottom block: the same pixel in the untrained
    twin the training started from. Each block on its own colour scale (given in its row labels);
    right: the digit with the pixel, and the kernel norm at every pixel, trained and initial. The
    numbers of :func:`trained_vs_initial` are in the title and in ``fig.stats``."""
    st = trained_vs_initial(lab, row, col)
    row, col = st["pixel"]
    G = lab.group
    S = st["trained"].shape[0]
    h = 1.4 + 1.05 * 2 * S
    fig = plt.figure(figsize=(1.1 * G.order + 3.0, h))
    gs = fig.add_gridspec(1, 2, width_ratios=[G.order, 2.3], wspace=0.2, top=1 - 0.95 / h, bottom=0.02)
    left = gs[0].subgridspec(2, 1, hspace=0.12)
    right = gs[1].subgridspec(3, 1, hspace=0.5)
    ax = fig.add_subplot(right[0])
    _digit(ax, lab.x, {"": (row, col)}, f"digit, pixel ({row}, {col})")
    fig.colorbar(ax.images[0], ax=ax, fraction=0.046, pad=0.04).ax.set_visible(False)   # aligned with the maps
    blocks = (("trained", st["trained"], st["norm_trained"], st["stroke_ratio_trained"], st["positive_trained"]),
              ("initial", st["initial"], st["norm_initial"], st["stroke_ratio_initial"], st["positive_initial"]))
    for b, (what, k, norm, ratio, pos) in enumerate(blocks):
        vmax = _vmax(k)
        block = left[b].subgridspec(S, G.order, wspace=0.1, hspace=0.12)
        for s in range(S):
            for i, g in enumerate(G.elements):
                ax = fig.add_subplot(block[s, i])
                _kernel(ax, k[s, i], vmax, f"g = {_label(G, g)}" if b == 0 and s == 0 else None)
                if i == 0:
                    ax.set_ylabel(f"{what}, slice {s}\n{pos[s]:.0%} taps > 0" + (f"\n(scale ±{vmax:.2f})" if s == 0 else ""),
                                  fontsize=9)
        ax = fig.add_subplot(right[1 + b])
        im = ax.imshow(norm.numpy(), cmap="viridis")
        ax.plot(col, row, marker="s", ms=6, mfc="none", mec="#ff3333", mew=1.2)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"{what}: kernel norm\n(stroke / background {ratio:.1f}x)", fontsize=9)
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        cb.ax.tick_params(labelsize=9)
        cb.locator = plt.MaxNLocator(4)
        cb.update_ticks()
    fig.suptitle(f"{lab.name}, first E4 layer at one pixel: trained (top) vs the initial weights of the "
                 f"same run (bottom)\nrms tap {st['rms_trained']:.3f} vs {st['rms_initial']:.3f}; "
                 f"||K_trained − K_initial|| / ||K_initial|| = {st['relative_change']:.2f}, cosine "
                 f"{st['cosine']:.2f}\ntrained kernels at the rotated pixel = rotated kernels to "
                 f"{st['rotation_error']:.0e}", fontsize=10, y=0.995)
    fig.stats = {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
    return fig


def static_vs_dynamic_figure(lab: E4Lab, pixels: dict[str, tuple[int, int]] | None = None, *,
                             gconv: GroupConv | None = None, slice: int = 0, element: int = 0, seed: int = 0):
    """A G-CNN filter is one kernel per group element, the same at every pixel; an E4 kernel is
    generated per pixel. Columns: pixels A, B, C; rows: the E4 kernel (``slice``, ``element``) and a
    group conv's kernel (output field 0, input channel 0, same ``element``). Right: the norm of the
    kernel at every pixel (E4: follows the digit; G-CNN: constant)."""
    G = lab.group
    H, W = lab.x.shape[-2:]
    if pixels is None:
        r, c = lab.pixel
        pixels = {"A": (r, c), "B": (H // 2, 4), "C": (4, W // 2)}
    if gconv is None:
        torch.manual_seed(seed)
        gconv = GroupConv(group=G, in_fields=lab.layer.in_type.n_fields, out_fields=lab.layer.out_type.n_fields,
                          kernel_size=lab.layer.kernel_size, bias=False)
    with torch.no_grad():
        gk = gconv.filter()[element, 0]                                            # out field 0, element, in ch 0
    field = lab.kernel_field()[slice, element]                                     # (K, K, H, W)
    ek = {n: field[..., r, c] for n, (r, c) in pixels.items()}
    ve, vg = _vmax(*ek.values()), _vmax(gk)
    n = len(pixels)
    fig = plt.figure(figsize=(2.4 + 1.3 * n + 2.6, 3.6))
    gs = fig.add_gridspec(2, n + 2, width_ratios=[2.0] + [1] * n + [2.0], wspace=0.3, hspace=0.35)
    _digit(fig.add_subplot(gs[:, 0]), lab.x, pixels, "digit, pixels A, B, C")
    for j, name in enumerate(pixels):
        ax = fig.add_subplot(gs[0, 1 + j])
        _kernel(ax, ek[name], ve, f"pixel {name}")
        if j == 0:
            ax.set_ylabel("E4\n(dynamic)", fontsize=9)
        ax = fig.add_subplot(gs[1, 1 + j])
        _kernel(ax, gk, vg)
        if j == 0:
            ax.set_ylabel("G-CNN\n(static)", fontsize=9)
    norm = field.flatten(0, 1).norm(dim=0)                                          # (H, W)
    ax = fig.add_subplot(gs[0, n + 1])
    im = ax.imshow(norm.numpy(), cmap="viridis")
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title("E4: kernel norm per pixel", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=9)
    ax = fig.add_subplot(gs[1, n + 1])
    ax.imshow(torch.full((H, W), float(gk.norm())).numpy(), cmap="viridis", vmin=0, vmax=2 * float(gk.norm()))
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(f"G-CNN: {float(gk.norm()):.2f} everywhere", fontsize=9)
    fig.suptitle(f"Static vs dynamic filters: {lab.state} {lab.name} vs a random GroupConv of the same width\n"
                 f"(group element {_label(G, G.elements[element])}, E4 slice {slice}; each row on its own colour "
                 f"scale)", fontsize=9, y=1.02)
    return fig


@torch.no_grad()
def affine_break(lab: E4Lab, *, seed: int = 1, scale: float = 0.5) -> dict:
    """The first E4 layer with per-field (kit) and per-channel (official) GroupNorm affine, same
    weights, measured with :func:`kit.equivariance.check` on the digit's features.

    Untrained ``lab``: each version at initialisation (affine 1/0) and after
    :func:`perturb_parameters` (noise that mimics training), states ``"init"`` / ``"perturbed"``.
    Trained ``lab`` (``setup(pretrained=True)``): states ``"trained"`` -- per field, the zoo model's
    layer exactly as trained; per channel, the same weights with each field's trained (gamma, beta)
    copied to all its orientations, the only per-channel affine these weights define -- and
    ``"trained + noise"``, both after :func:`perturb_parameters`. No model was trained with a
    per-channel affine, so its break is always shown on perturbed values.

    Returns ``{(affine, state): [Record]}``, ``"keys"`` (those pairs in drawing order) and
    ``"maps"``: ``{(affine, state): |f(g x) - g f(x)|}`` at 90° (summed over channels, in the disk)
    for the per-field layer as trained (untrained lab: perturbed) and the perturbed per-channel one.
    """
    base = lab.layer
    x = lab.features()                                                             # (1, C, G, H, W)
    G = lab.group
    first, second = ("trained", "trained + noise") if lab.pretrained else ("init", "perturbed")
    out, maps, keys = {}, {}, []
    u = G.element(1)

    def diff(m):
        d = (m(m.in_type.transform(x, u)) - m.out_type.transform(m(x), u)).abs().sum(dim=(1, 2))[0]  # (H, W)
        return d * disk_mask(*d.shape).to(d.dtype)

    for affine in ("per_field", "per_channel"):
        m = E4Conv(group=G, in_fields=base.in_type.n_fields, out_fields=base.out_type.n_fields,
                   kernel_size=base.kernel_size, reduction=base.reduction,
                   channels_per_slice=base.channels_per_slice, affine=affine).eval()
        state = {k: v for k, v in base.state_dict().items() if not k.startswith("norm.")}
        m.load_state_dict(state, strict=False)                                     # norm at its 1/0 init
        if lab.pretrained and base.norm.affine is not None:                        # the trained (gamma, beta)
            for t in ("weight", "bias"):
                v = getattr(base.norm, t)                                           # (C,) per field, or (C, D)
                dst = getattr(m.norm, t)
                dst.copy_(v if v.shape == dst.shape else v[:, None].expand_as(dst))
        out[(affine, first)] = check(m, x=x)
        if affine == "per_field":
            maps[(affine, first)] = diff(m)
        perturb_parameters(m, seed=seed, scale=scale)
        out[(affine, second)] = check(m, x=x)
        keys += [(affine, first), (affine, second)]
        if affine == "per_channel" or not lab.pretrained:
            maps[(affine, second)] = diff(m)
    if not lab.pretrained:
        maps.pop(("per_field", first))
    out["keys"], out["maps"] = keys, maps
    out["pretrained"] = lab.pretrained
    return out


def _state_label(affine, state):
    return f"{affine.replace('_', '-')} affine, {state}"


def affine_break_figure(result: dict, *, tol: float = 1e-5):
    """Bars: relative equivariance error per group element (log scale) for per-field / per-channel
    GroupNorm affine in each state of :func:`affine_break`; maps: where the 90° error lives."""
    keys = result.get("keys") or [("per_field", "init"), ("per_field", "perturbed"), ("per_channel", "init"),
                                  ("per_channel", "perturbed")]
    colors = ["#9ecae1", "#08519c", "#fcbba1", "#cb181d"]
    recs = result[keys[0]]
    labels = [f"{r.angle:g}°" + (" m" if r.mirror else "") for r in recs]
    floor = 1e-9
    fig = plt.figure(figsize=(8.0, 5.0))
    gs = fig.add_gridspec(1, 2, width_ratios=[2.2, 1], wspace=0.22, top=0.84)
    ax = fig.add_subplot(gs[0])
    w = 0.8 / len(keys)
    top = max(r.error for k in keys for r in result[k])
    for j, (key, col) in enumerate(zip(keys, colors)):
        errs = [max(r.error, floor) for r in result[key]]
        ax.bar([i + (j - (len(keys) - 1) / 2) * w for i in range(len(recs))], errs, w, color=col,
               label=_state_label(*key))
    ax.axhline(tol, color="black", ls="--", lw=1)
    ax.text(-0.45, tol / 2.5, f"tolerance {tol:g}", ha="left", va="top", fontsize=9)
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, max(10 * top, 10 * tol))
    ax.yaxis.set_major_locator(LogLocator(numticks=7))
    ax.set_xticks(range(len(recs)))
    ax.set_xticklabels(labels, fontsize=9)
    ax.tick_params(labelsize=9)
    ax.set_xlabel("group element", fontsize=9)
    ax.set_ylabel(f"relative error (< {floor:g} drawn at {floor:g})", fontsize=9)
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    which = "trained weights" if result.get("pretrained") else "untrained weights"
    fig.suptitle(f"E4 layer equivariance error ({which}): GroupNorm affine per field vs per channel", fontsize=10)
    maps = result["maps"]
    vmax = max(float(m.max()) for m in maps.values()) or 1.0
    right = gs[1].subgridspec(len(maps), 2, width_ratios=[1, 0.07], wspace=0.08, hspace=0.6)
    for k, ((affine, state), m) in enumerate(maps.items()):
        a = fig.add_subplot(right[k, 0])
        im = a.imshow(m.numpy(), cmap="magma", vmin=0, vmax=vmax)
        a.set_xticks([]), a.set_yticks([])
        a.set_title(f"{affine.replace('_', '-')} affine,\n{state}\nmax {float(m.max()):.1e}", fontsize=9)
    cb = fig.colorbar(im, cax=fig.add_subplot(right[:, 1]))
    cb.ax.tick_params(labelsize=9)
    cb.set_label("|f(r·x) − r·f(x)| at 90°", fontsize=9)
    return fig


# ------------------------------------------------------------------------------ widgets
def filter_explorer(lab: E4Lab):
    """Sliders for the pixel (row, column), the slice and the rotation of the input (quarter turns);
    redraws :func:`filter_rotation_figure` on release."""
    import ipywidgets as W
    from .widgets import explorer

    H, Wd = lab.x.shape[-2:]
    r0, c0 = lab.pixel
    row = W.IntSlider(value=r0, min=0, max=H - 1, description="row", continuous_update=False)
    col = W.IntSlider(value=c0, min=0, max=Wd - 1, description="column", continuous_update=False)
    sl = W.IntSlider(value=0, min=0, max=lab.layer.slices - 1, description="slice", continuous_update=False)
    rot = W.IntSlider(value=1, min=0, max=3, description="rotation ×90°", continuous_update=False,
                      style={"description_width": "initial"})   # the default width truncates the label

    def render():
        args = (row.value, col.value, sl.value, rot.value)
        return filter_rotation_figure(lab, args[0], args[1], quarter_turns=args[3], slice=args[2]), args

    return explorer([[row, col], [sl, rot]], render)
