"""The measuring instrument: how equivariant is a module, element by element and angle by angle.

* :func:`check` — relative error ``||f(g.x) - g.f(x)|| / ||g.f(x)||`` for every group element
  (exact actions: ``rot90`` / ``flip`` and field-axis permutations), measured inside a centred
  disk so that corners do not count. Exactly equivariant layers give float noise (<= 1e-5 in
  float32); a plain CNN gives O(1).
* :func:`error_vs_angle` — for any angle, on or off the group grid. The input is rotated by
  interpolation; the output is rotated back and compared. Each record carries the layer's
  ``error`` **and** the interpolation ``floor``: the same measurement with the same resampling but
  no net rotation, i.e. the error an ideal (continuously equivariant) map would still show on this
  grid. A layer error far above its floor is the layer's fault; one near its floor is resampling.

  - spatial outputs: ``error = ||R_-t f(R_t x) - f(x)|| / ||f(x)||`` inside the disk,
    ``floor = ||R_-t R_t f(x) - f(x)|| / ||f(x)||`` (the identity map, round-tripped where the
    layer's output lives). Regular outputs are rotated back with the group element when ``t`` is
    a group angle; off the group grid they are compared after max-pooling over the group axis (the
    invariant part, the only one with a defined action there).
  - invariant outputs (logits): ``error = ||f(R_t x) - f(x)|| / ||f(x)||``,
    ``floor = ||f(R_t x) - f(R*_t x)|| / ||f(x)||`` where ``R*_t`` is a reference rotation
    (:func:`reference_rotation`: 4x bicubic supersampling, rotation, 4x4 area downsampling). An
    exactly invariant model would show ``||f(R_t x) - f(true rotated x)||``; the floor estimates
    it with the best rotation available, i.e. the share of the error owed to resampling.

The default input is a batch of real rotated digits from the bundled MNIST sample
(:mod:`kit.sample`), masked to the centred disk so no content leaves the frame when rotated.
Modules are measured in eval mode, without gradients; their mode is restored afterwards.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .fields import FieldType
from .groups import Element, act_on_image, disk_mask

__all__ = ["Record", "check", "error_vs_angle", "default_input", "max_error", "records_table",
           "reference_rotation"]


@dataclass
class Record:
    """One measurement: the element (None off the group grid), its angle, the relative error."""

    element: Element | None
    angle: float          # degrees, counter-clockwise
    mirror: bool
    error: float
    floor: float | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["element"] = repr(self.element) if self.element is not None else None
        return d


# ----------------------------------------------------------------------------- helpers
def _types(module) -> tuple[FieldType, FieldType]:
    try:
        return module.in_type, module.out_type
    except AttributeError:
        raise ValueError(f"{type(module).__name__} has no in_type/out_type; eqkit's instrument measures "
                         f"modules with the equivariance contract (kit.fields.FieldType)") from None


@contextmanager
def _evaluating(module: nn.Module):
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was)


def default_input(in_type: FieldType, *, size: int = 28, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Real digits from the bundled sample, shaped for ``in_type`` and masked to the centred disk.

    Trivial inputs with C channels take C different digits per batch item; field inputs of
    dimension D take C*D digits (a natural, non-symmetric field).
    """
    from .sample import load_sample

    if not in_type.spatial:
        raise ValueError(f"no default input for a non-spatial type {in_type}; pass x")
    imgs = load_sample()["images"][:, 0]                                    # (N, 28, 28)
    n = batch * in_type.channels
    idx = torch.randperm(imgs.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    x = imgs[idx]
    if size != imgs.shape[-1]:
        x = nn.functional.interpolate(x[:, None], size=(size, size), mode="bilinear",
                                      align_corners=False)[:, 0]
    x = x * disk_mask(size, size).to(x.dtype)
    shape = (batch, in_type.n_fields) + (() if in_type.is_trivial else (in_type.dim,)) + (size, size)
    return x.reshape(shape)


def _rel(a: torch.Tensor, b: torch.Tensor, spatial: bool) -> float:
    """``||a - b|| / ||b||`` (inside the centred disk for spatial tensors), in float64."""
    a, b = a.double(), b.double()
    if spatial:
        m = disk_mask(*a.shape[-2:], device=a.device).to(a.dtype)
        a, b = a * m, b * m
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else float("nan")


def _input(module, x):
    in_type, _ = _types(module)
    if x is None:                      # registry models know their input size (e.g. 32 for CIFAR)
        card = getattr(module, "card", None)
        x = default_input(in_type, size=card.input_shape[-1] if card is not None else 28)
    in_type.check(x, "x")
    p = next(module.parameters(), None)
    return x.to(device=p.device, dtype=p.dtype) if p is not None and p.is_floating_point() else x


# --------------------------------------------------------------------------- the API
def check(module: nn.Module, elements: list[Element] | None = None, x: torch.Tensor | None = None,
          *, batch_elements: int = 8) -> list[Record]:
    """Relative equivariance error of ``module`` at each group element (default: all of them).

    ``x`` defaults to real digits (:func:`default_input`). Transformed inputs are batched
    ``batch_elements`` elements at a time.
    """
    in_type, out_type = _types(module)
    G = in_type.group
    elements = G.elements if elements is None else list(elements)
    x = _input(module, x)
    records = []
    with _evaluating(module):
        y = module(x)
        B = x.shape[0]
        for s in range(0, len(elements), batch_elements):
            chunk = elements[s:s + batch_elements]
            ys = module(torch.cat([in_type.transform(x, g) for g in chunk]))      # f(g.x), stacked
            for i, g in enumerate(chunk):
                err = _rel(ys[i * B:(i + 1) * B], out_type.transform(y, g), out_type.spatial)
                records.append(Record(g, G.degrees(g), bool(g.f), err))
    return records


def error_vs_angle(module: nn.Module, angles, x: torch.Tensor | None = None, *, mirror: bool = False,
                   mode: str = "bilinear") -> list[Record]:
    """Layer error and interpolation floor at each angle (degrees); see the module docstring.

    ``module`` must take images (trivial spatial fields). ``mirror=True`` flips (x -> -x) before
    rotating (dihedral groups). ``mode`` is the interpolation of ``grid_sample``.
    """
    in_type, out_type = _types(module)
    if not (in_type.is_trivial and in_type.spatial):
        raise ValueError(f"error_vs_angle needs a module that takes images (trivial spatial fields); "
                         f"got in_type {in_type}. Use check() at group elements instead.")
    G = in_type.group
    if mirror and not G.flip:
        raise ValueError(f"mirror=True needs a dihedral group, the module's group is {G.name}")
    x = _input(module, x)
    rot = lambda t, a, m=False: act_on_image(t, a, mirror=m, mode=mode)
    records = []
    with _evaluating(module):
        y = module(x)
        for a in angles:
            a = float(a)
            k = a * G.n / 360.0
            g = G.element(round(k), int(mirror)) if abs(k - round(k)) < 1e-9 else None
            xr = rot(x, a, mirror)
            yr = module(xr)
            if not out_type.spatial:                                              # invariant outputs
                err = _rel(yr, y, False)
                floor = _rel(yr, module(reference_rotation(x, a, mirror=mirror)), False)
            else:
                yy, yb = y, yr
                if g is not None:                                                 # exact field-axis action
                    yb = out_type.transform(yr, G.inverse(g), mode=mode)
                else:
                    if not out_type.is_trivial:
                        yy, yb = y.amax(dim=2), yr.amax(dim=2)                     # invariant part
                    yb = act_on_image(rot(yb, -a), 0.0, mirror=mirror)               # (R M)^-1 = M R^-1
                err = _rel(yb, yy, True)
                trip = rot(rot(yy, a), -a)
                floor = _rel(trip, yy, True)
            records.append(Record(g, a, mirror, err, floor))
    return records


def reference_rotation(x: torch.Tensor, degrees: float, *, mirror: bool = False,
                       supersample: int = 4) -> torch.Tensor:
    """A high-quality rotation of images ``(B, C, H, W)``: bicubic upsampling by ``supersample``,
    bilinear rotation on the fine grid, then ``supersample x supersample`` area downsampling.
    Multiples of 90 degrees (and mirrors) are exact on the grid and returned exactly."""
    if abs(degrees / 90 - round(degrees / 90)) < 1e-9:
        return act_on_image(x, degrees, mirror=mirror)
    up = nn.functional.interpolate(x, scale_factor=supersample, mode="bicubic", align_corners=False)
    return nn.functional.avg_pool2d(act_on_image(up, degrees, mirror=mirror), supersample)


def max_error(records: list[Record]) -> float:
    """The largest error over the records (NaN-aware: NaN propagates)."""
    errs = [r.error for r in records]
    return max(errs) if not any(math.isnan(e) for e in errs) else float("nan")


def records_table(records: list[Record]) -> str:
    """A small fixed-width table of records (for printing in notebooks and logs)."""
    lines = [f"{'element':>18} {'angle':>7} {'mirror':>6} {'error':>10} {'floor':>10}"]
    for r in records:
        floor = f"{r.floor:10.2e}" if r.floor is not None else f"{'-':>10}"
        el = repr(r.element) if r.element is not None else "-"
        lines.append(f"{el:>18} {r.angle:7.1f} {str(r.mirror):>6} {r.error:10.2e} {floor}")
    return "\n".join(lines)
