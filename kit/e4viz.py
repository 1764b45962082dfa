"""Notebook 03 (E4 dynamic filters) in library form: a calibrated E4-Net, the kernels its first E4
layer generates at a pixel, and figure builders / ipywidgets explorers on top of them.

* :func:`setup` builds ``e4-mnist-normal`` (untrained, batch-norm calibrated on real digits) and
  picks one real digit; :meth:`Lab.kernels_at` returns the steered dynamic kernels ``(S, |G|, K, K)``
  the first E4 layer generates at one pixel, one per slice and group element.
* :func:`dynamic_filters_figure`: the digit with the pixel marked, and those kernels.
* :func:`filter_rotation_figure`: rotate the digit by quarter turns; the kernels at the *rotated*
  pixel are the upright ones, rotated and moved along the group axis (checked numerically).
* :func:`static_vs_dynamic_figure`: a G-CNN kernel is the same at every pixel; an E4 kernel is not.
* :func:`affine_break` / :func:`affine_break_figure`: after randomly perturbing every parameter
  (as training would), the official per-channel GroupNorm affine breaks equivariance, the kit's
  per-field affine does not.
* :func:`filter_explorer`: sliders for pixel row / column, slice and rotation.

Every figure function returns a matplotlib figure (save it with :func:`kit.viz.save`).
"""
from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch
import torch.nn as nn

from . import models
from .equivariance import check
from .groups import Element, Group, disk_mask
from .layers.e4 import E4Conv
from .layers.gconv import GroupConv
from .sample import load_sample

__all__ = ["Lab", "setup", "perturb_parameters", "dynamic_filters_figure", "filter_rotation_figure",
           "static_vs_dynamic_figure", "affine_break", "affine_break_figure", "filter_explorer"]


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
class Lab:
    """A calibrated E4 model, its first E4 layer, and one real digit ``x (1, 1, H, W)``."""

    model: nn.Module
    layer: E4Conv
    stem: nn.Module          # the model up to the first E4 layer (lift -> BN -> ReLU)
    x: torch.Tensor
    pixel: tuple[int, int]   # a default pixel on the digit's stroke

    @property
    def group(self) -> Group:
        return self.layer.in_type.group

    @torch.no_grad()
    def features(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """The regular fields entering the first E4 layer, ``(1, C, |G|, H, W)``."""
        return self.stem(self.x if x is None else x)

    @torch.no_grad()
    def kernel_field(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """Every generated, steered kernel: ``(S, |G|, K, K, H, W)`` for one image."""
        k = self.layer.generate_kernels(self.features(x))[0]                   # (S, G, KK, H, W)
        K = self.layer.kernel_size
        return k.unflatten(2, (K, K))                                          # (S, G, K, K, H, W)

    def kernels_at(self, row: int, col: int, x: torch.Tensor | None = None) -> torch.Tensor:
        """The kernels generated at pixel ``(row, col)``: ``(S, |G|, K, K)``, taps as an image
        (row 0 at the top, the kernel's centre on the pixel)."""
        H, W = self.x.shape[-2:]
        if not (0 <= row < H and 0 <= col < W):
            raise ValueError(f"pixel ({row}, {col}) is outside the {H}x{W} image")
        return self.kernel_field(x)[..., row, col]

    def rotated(self, element: Element) -> torch.Tensor:
        """The digit acted on by ``element`` (exact on the grid)."""
        return self.group.act_on_image(self.x, element)

    def move_pixel(self, row: int, col: int, element: Element) -> tuple[int, int]:
        """Where pixel ``(row, col)`` lands when the image is acted on by ``element``."""
        H, W = self.x.shape[-2:]
        one = torch.zeros(H, W)
        one[row, col] = 1.0
        i = int(self.group.act_on_image(one, element).argmax())
        return divmod(i, W)


def setup(*, name: str = "e4-mnist-normal", seed: int = 0, digit: int = 3, calibration: int = 128) -> Lab:
    """Build ``name`` (seeded, untrained, batch norm calibrated on ``calibration`` real digits, eval
    mode) and pick digit ``digit`` of the bundled sample; the default pixel is the brightest one
    within 8 pixels of the centre."""
    imgs = load_sample()["images"] * disk_mask(28, 28).float()                 # (N, 1, 28, 28)
    if not 0 <= digit < imgs.shape[0] - calibration:
        raise ValueError(f"digit must be in [0, {imgs.shape[0] - calibration}), got {digit}")
    torch.manual_seed(seed)
    model = models.calibrate_batchnorm(models.create(name), imgs[-calibration:])
    layers = list(model.layers)
    first = next(i for i, m in enumerate(layers) if isinstance(m, E4Conv))
    stem = nn.Sequential(*layers[:first]).eval()
    x = imgs[digit:digit + 1]
    near = disk_mask(28, 28, radius=8.0).float()
    r, c = divmod(int((x[0, 0] * near).argmax()), x.shape[-1])
    return Lab(model, layers[first], stem, x, (r, c))


# ------------------------------------------------------------------------------ drawing helpers
def _kernel(ax, k, vmax, title=None):
    ax.imshow(k.detach().float(), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    K = k.shape[-1]
    ax.plot([K // 2], [K // 2], marker="+", color="black", ms=6, mew=1)          # the kernel's centre
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def _digit(ax, x, pixels, title=None):
    ax.imshow(x[0, 0].detach(), cmap="gray")
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
def dynamic_filters_figure(lab: Lab, row: int | None = None, col: int | None = None, *,
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
                ax.set_ylabel(f"slice {s}", fontsize=8)
    fig.suptitle(f"E4 kernels generated at one pixel (first E4 layer, {lab.layer.kernel_size}x"
                 f"{lab.layer.kernel_size}, colour scale ±{vmax:.2f}; + = the pixel)", fontsize=9)
    return fig


def filter_rotation_figure(lab: Lab, row: int | None = None, col: int | None = None, *, quarter_turns: int = 1,
                           slice: int = 0):
    """Rotate the input by ``quarter_turns`` x 90°: top row, the kernels at the pixel of the upright
    digit; middle row, the kernels at the *moved* pixel of the rotated digit; bottom row, the
    prediction of equivariance: each upright kernel rotated by the same angle and moved one step per
    quarter turn along the group axis (``K'(u p, h) = u . K(p, u^-1 h)``). The title gives the
    largest difference between the middle and bottom rows (float noise: exact)."""
    row, col = (lab.pixel if row is None else (row, col if col is not None else lab.pixel[1]))
    G = lab.group
    u = G.element(quarter_turns % G.n)
    k0 = lab.kernels_at(row, col)[slice]                                         # (G, K, K)
    xr = lab.rotated(u)
    r, c = lab.move_pixel(row, col, u)
    k1 = lab.kernels_at(r, c, xr)[slice]                                          # (G, K, K)
    pred = torch.stack([G.act_on_image(k0[G.index(G.compose(G.inverse(u), h))], u) for h in G.elements])
    err = float((k1 - pred).abs().max())
    vmax = _vmax(k0, k1)
    fig = plt.figure(figsize=(2.6 + 1.25 * G.order, 4.6))
    gs = fig.add_gridspec(3, G.order + 1, width_ratios=[1.6] + [1] * G.order, wspace=0.15, hspace=0.35)
    _digit(fig.add_subplot(gs[0, 0]), lab.x, {"": (row, col)}, f"upright, pixel ({row}, {col})")
    _digit(fig.add_subplot(gs[1, 0]), xr, {"": (r, c)}, f"rotated {90 * (quarter_turns % G.n)}°, pixel ({r}, {c})")
    ax = fig.add_subplot(gs[2, 0])
    ax.axis("off")
    ax.text(0.5, 0.5, f"prediction:\nupright kernel of\ng' = u⁻¹g, rotated\nby u = {_label(G, u)}",
            ha="center", va="center", fontsize=8, transform=ax.transAxes)
    for i, h in enumerate(G.elements):
        src = G.compose(G.inverse(u), h)
        _kernel(fig.add_subplot(gs[0, 1 + i]), k0[i], vmax, f"g = {_label(G, h)}")
        _kernel(fig.add_subplot(gs[1, 1 + i]), k1[i], vmax)
        _kernel(fig.add_subplot(gs[2, 1 + i]), pred[i], vmax, f"rot({_label(G, src)} kernel)")
    fig.suptitle(f"Rotate the digit by {90 * (quarter_turns % G.n)}°: the kernel moves with the pixel, rotates, "
                 f"and shifts along the group axis\n(slice {slice}; colour scale ±{vmax:.2f}; "
                 f"max |middle − bottom| = {err:.1e}: float rounding)", fontsize=9, y=1.03)
    return fig


def static_vs_dynamic_figure(lab: Lab, pixels: dict[str, tuple[int, int]] | None = None, *,
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
    gs = fig.add_gridspec(2, n + 2, width_ratios=[2.0] + [1] * n + [2.0], wspace=0.2, hspace=0.35)
    _digit(fig.add_subplot(gs[:, 0]), lab.x, pixels, "digit, pixels A, B, C")
    for j, name in enumerate(pixels):
        ax = fig.add_subplot(gs[0, 1 + j])
        _kernel(ax, ek[name], ve, f"pixel {name}")
        if j == 0:
            ax.set_ylabel("E4 (dynamic)", fontsize=8)
        ax = fig.add_subplot(gs[1, 1 + j])
        _kernel(ax, gk, vg)
        if j == 0:
            ax.set_ylabel("G-CNN (static)", fontsize=8)
    norm = field.flatten(0, 1).norm(dim=0)                                          # (H, W)
    ax = fig.add_subplot(gs[0, n + 1])
    im = ax.imshow(norm, cmap="viridis")
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title("E4: kernel norm per pixel", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    ax = fig.add_subplot(gs[1, n + 1])
    ax.imshow(torch.full((H, W), float(gk.norm())), cmap="viridis", vmin=0, vmax=2 * float(gk.norm()))
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(f"G-CNN: {float(gk.norm()):.2f} everywhere", fontsize=8)
    fig.suptitle(f"Static vs dynamic filters (group element {_label(G, G.elements[element])}, "
                 f"E4 slice {slice}; each row on its own colour scale)", fontsize=9)
    return fig


@torch.no_grad()
def affine_break(lab: Lab, *, seed: int = 1, scale: float = 0.5) -> dict:
    """The first E4 layer with per-field (kit) and per-channel (official) GroupNorm affine, same
    weights, measured with :func:`kit.equivariance.check` on the digit's features at initialisation
    and after :func:`perturb_parameters`. Returns ``{(affine, state): [Record]}`` plus the
    difference maps ``|f(g x) - g f(x)|`` (summed over channels) at 90° after perturbation under
    ``"maps"``."""
    base = lab.layer
    x = lab.features()                                                             # (1, C, G, H, W)
    G = lab.group
    out, maps = {}, {}
    for affine in ("per_field", "per_channel"):
        m = E4Conv(group=G, in_fields=base.in_type.n_fields, out_fields=base.out_type.n_fields,
                   kernel_size=base.kernel_size, reduction=base.reduction,
                   channels_per_slice=base.channels_per_slice, affine=affine).eval()
        state = {k: v for k, v in base.state_dict().items() if not k.startswith("norm.")}
        m.load_state_dict(state, strict=False)                                     # norm stays at its 1/0 init
        out[(affine, "init")] = check(m, x=x)
        perturb_parameters(m, seed=seed, scale=scale)
        out[(affine, "perturbed")] = check(m, x=x)
        u = G.element(1)
        t = m.in_type
        d = (m(t.transform(x, u)) - m.out_type.transform(m(x), u)).abs().sum(dim=(1, 2))[0]   # (H, W)
        maps[affine] = d * disk_mask(*d.shape).to(d.dtype)
    out["maps"] = maps
    return out


def affine_break_figure(result: dict, *, tol: float = 1e-5):
    """Bars: relative equivariance error per group element (log scale) for per-field / per-channel
    GroupNorm affine, at initialisation and after perturbation; maps: where the 90° error lives."""
    keys = [("per_field", "init"), ("per_field", "perturbed"), ("per_channel", "init"), ("per_channel", "perturbed")]
    colors = ["#9ecae1", "#08519c", "#fcbba1", "#cb181d"]
    recs = result[keys[0]]
    labels = [f"{r.angle:g}°" + (" m" if r.mirror else "") for r in recs]
    floor = 1e-9
    fig = plt.figure(figsize=(11, 3.6))
    gs = fig.add_gridspec(1, 3, width_ratios=[2.2, 1, 1], wspace=0.25)
    ax = fig.add_subplot(gs[0])
    w = 0.8 / len(keys)
    for j, (key, col) in enumerate(zip(keys, colors)):
        errs = [max(r.error, floor) for r in result[key]]
        ax.bar([i + (j - 1.5) * w for i in range(len(recs))], errs, w, color=col,
               label=f"{key[0].replace('_', '-')} affine, {key[1]}")
    ax.axhline(tol, color="black", ls="--", lw=1)
    ax.text(len(recs) - 0.5, tol * 1.6, f"tolerance {tol:g}", ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, 1e4)                                                   # room for the legend
    ax.set_xticks(range(len(recs)))
    ax.set_xticklabels(labels)
    ax.set_xlabel("group element")
    ax.set_ylabel(f"relative error (values < {floor:g} drawn at {floor:g})", fontsize=8)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    ax.set_title("E4 layer equivariance error: GroupNorm affine per field vs per channel", fontsize=9)
    maps = result["maps"]
    vmax = max(float(m.max()) for m in maps.values()) or 1.0
    for k, (affine, m) in enumerate(maps.items()):
        a = fig.add_subplot(gs[1 + k])
        im = a.imshow(m, cmap="magma", vmin=0, vmax=vmax)
        a.set_xticks([]), a.set_yticks([])
        a.set_title(f"|f(r·x) − r·f(x)|, {affine.replace('_', '-')}\n(perturbed, 90°, max {float(m.max()):.1e})",
                    fontsize=8)
    fig.colorbar(im, ax=a, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    return fig


# ------------------------------------------------------------------------------ widgets
def filter_explorer(lab: Lab):
    """Sliders for the pixel (row, column), the slice and the rotation of the input (quarter turns);
    redraws :func:`filter_rotation_figure` on release."""
    import ipywidgets as W
    from IPython.display import display

    H, Wd = lab.x.shape[-2:]
    r0, c0 = lab.pixel
    row = W.IntSlider(value=r0, min=0, max=H - 1, description="row", continuous_update=False)
    col = W.IntSlider(value=c0, min=0, max=Wd - 1, description="column", continuous_update=False)
    sl = W.IntSlider(value=0, min=0, max=lab.layer.slices - 1, description="slice", continuous_update=False)
    rot = W.IntSlider(value=1, min=0, max=3, description="rotation ×90°", continuous_update=False,
                      style={"description_width": "initial"})   # the default width truncates the label
    out = W.Output()

    def draw(*_):
        with out:
            out.clear_output(wait=True)
            fig = filter_rotation_figure(lab, row.value, col.value, quarter_turns=rot.value, slice=sl.value)
            display(fig)
            plt.close(fig)

    for w in (row, col, sl, rot):
        w.observe(draw, names="value")
    draw()
    return W.VBox([W.HBox([row, col]), W.HBox([sl, rot]), out])
