"""The measuring instrument: how equivariant is a module, element by element and angle by angle.

* :func:`check` — relative error ``||f(g.x) - g.f(x)|| / ||g.f(x)||`` for every group element,
  measured inside a centred disk so that corners do not count. Each record says whether the
  element's action is **exact** on the pixel grid (multiples of 90 degrees and mirrors: ``rot90`` /
  ``flip`` and field-axis permutations) or **interpolated** (45 degrees on C8, ...): exact layers give
  float noise (<= 1e-5 in float32) at the exact elements; at an interpolated element even a perfect
  map shows the resampling error, so those records carry ``interpolation_floor``, the same
  round trip as :func:`error_vs_angle`'s floor. A plain CNN gives O(1). With ``roundoff=True``
  each record also carries the float round-off ``floor`` (below). A network whose spatial sizes
  break exactness (an odd size before a stride-2 pooling or convolution: its sampling grid is not
  symmetric under rotation) is named in a warning at ``check`` time.
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

Round-off floor (``check(..., roundoff=True)``). With ``F`` the module in float64 (a deep copy),
the float32 error splits exactly into two round-off terms and the float64 error::

    f(g.x) - g.f(x) = [f(g.x) - F(g.x)] - g.[f(x) - F(x)] + [F(g.x) - g.F(x)]

so ``error <= floor + error_f64`` with ``floor = (||f(g.x) - F(g.x)|| + ||g.[f(x) - F(x)]||) /
||g.f(x)||``. When the float64 error is negligible (an exact construction: ~1e-14), the float32
error is rounding, bounded by ``floor``; a deep float32 network cannot show less than its own
round-off unless its arithmetic happens to be bitwise symmetric.

The default input is a batch of real rotated digits from the bundled MNIST sample
(:mod:`kit.data.sample`), masked to the centred disk so no content leaves the frame when rotated.
Modules are measured in eval mode, without gradients; their mode is restored afterwards.
"""
from __future__ import annotations

import copy
import math
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .fields import FieldType
from .groups import Element, act_on_image, disk_mask

__all__ = ["Record", "check", "float64_twin", "precision_trace", "precision_report", "precision_markdown", "error_vs_angle", "default_input", "max_error", "records_table",
           "reference_rotation"]


@dataclass
class Record:
    """One measurement: the element (None off the group grid), its angle, the relative error and,
    where measured, its floor (interpolation floor in :func:`error_vs_angle`, float round-off floor
    in :func:`check` with ``roundoff=True``)."""

    element: Element | None
    angle: float          # degrees, counter-clockwise
    mirror: bool
    error: float
    floor: float | None = None
    exact: bool | None = None                 # the action maps the pixel grid onto itself (multiples of 90 deg)
    interpolation_floor: float | None = None  # check(): for an interpolated action, what resampling alone costs

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
    from .data.sample import load_sample

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


def _norm(t: torch.Tensor, spatial: bool) -> float:
    """``||t||`` in float64, inside the centred disk for spatial tensors."""
    t = t.double()
    if spatial:
        t = t * disk_mask(*t.shape[-2:], device=t.device).to(t.dtype)
    return t.norm().item()


def _rel(a: torch.Tensor, b: torch.Tensor, spatial: bool) -> float:
    """``||a - b|| / ||b||`` (inside the centred disk for spatial tensors), in float64."""
    den = _norm(b, spatial)
    return _norm(a.double() - b.double(), spatial) / den if den > 0 else float("nan")


def float64_twin(module: nn.Module) -> nn.Module:
    """A float64 deep copy of ``module`` in eval mode: the reference for round-off measurements.
    Raises when the parameters already are float64 (buffers may be: some layers keep their solved
    bases in float64).

    A deep copy, so the module itself is untouched (and libraries that share sub-modules between
    layers, such as escnn's basis expansions, are not converted behind the module's back)."""
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    if not dtypes:                                  # parameter-free: judge by the floating buffers
        dtypes = {b.dtype for b in module.buffers() if b.is_floating_point()}
    if torch.float64 in dtypes:
        raise ValueError(f"a round-off floor needs a lower-precision module to compare with float64; "
                         f"{type(module).__name__} already has float64 parameters (dtypes {sorted(map(str, dtypes))})")
    return copy.deepcopy(module).double().eval()


def precision_trace(module: nn.Module, x: torch.Tensor | None = None, *, depth: int = 3) -> list[dict]:
    """Where float32 round-off grows: the relative deviation ``||f32 - f64|| / ||f64||`` of every
    sub-module's output (names up to ``depth`` dots, in call order), ``module`` against its
    :func:`float64_twin` on the same input (eval mode, default: real digits).

    Each row: ``name``, ``type``, ``rel`` and ``growth`` (``rel`` over the previous row's, the step's
    amplification). A well-conditioned chain grows by O(1) per step; a bilinear layer (a kernel
    generated from its input and applied to it, as E4 and Neural ePDO do) roughly doubles it, since
    the input's error enters both factors; a step that cancels (a small difference of large numbers,
    a division by a near-zero denominator) shows as a growth of 10 or more.
    """
    x = _input(module, x)
    twin = float64_twin(module)
    outs = ({}, {})
    order = []

    def attach(m, store, record):
        hooks = []
        for n, sub in m.named_modules():
            if not n or n.count(".") >= depth:
                continue

            def hook(mod, inp, out, n=n):
                if isinstance(out, torch.Tensor):
                    store[n] = out.detach()
                    if record and n not in order:
                        order.append(n)
            hooks.append(sub.register_forward_hook(hook))
        return hooks

    hooks = attach(module, outs[0], True) + attach(twin, outs[1], False)
    try:
        with _evaluating(module), torch.no_grad():
            outs[0][""] = module(x)
            outs[1][""] = twin(x.double())
    finally:
        for h in hooks:
            h.remove()
    types = dict(module.named_modules())
    rows, prev = [], None
    for n in order + [""]:
        a, b = outs[0][n].double(), outs[1][n]
        den = b.norm().item()
        rel = (a - b).norm().item() / den if den > 0 else float("nan")
        rows.append({"name": n or "(output)", "type": type(types[n]).__name__, "rel": rel,
                     "growth": rel / prev if prev else float("nan")})
        prev = rel if rel > 0 else prev
    return rows


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
          *, batch_elements: int = 8, roundoff: bool = False) -> list[Record]:
    """Relative equivariance error of ``module`` at each group element (default: all of them).

    ``x`` defaults to real digits (:func:`default_input`). Transformed inputs are batched
    ``batch_elements`` elements at a time. ``roundoff=True`` also runs a float64 copy of the module
    (:func:`float64_twin`, about twice the cost) on the same inputs and fills each record's
    ``floor`` with the round-off bound of the module docstring: ``error <= floor + error_f64``.
    """
    in_type, out_type = _types(module)
    G = in_type.group
    elements = G.elements if elements is None else list(elements)
    x = _input(module, x)
    twin = float64_twin(module) if roundoff else None
    sp = out_type.spatial
    records = []
    with _evaluating(module):
        with _asymmetric_sampling(module) as broken:
            y = module(x)
        if broken:
            warnings.warn("check: the input size breaks exactness on the grid: " + "; ".join(broken) + ". Rotating "
                          "the input by 90 degrees does not commute with that subsampling, so even the grid-exact "
                          "elements are not exact here; use sizes that every stride divides after padding "
                          "(e.g. 28x28 for the MNIST models).", stacklevel=2)
        dy = y.double() - twin(x.double()) if roundoff else None                  # f(x) - F(x)
        B = x.shape[0]
        for s in range(0, len(elements), batch_elements):
            chunk = elements[s:s + batch_elements]
            xs = torch.cat([in_type.transform(x, g) for g in chunk])
            ys = module(xs)                                                       # f(g.x), stacked
            dys = ys.double() - twin(xs.double()) if roundoff else None           # f(g.x) - F(g.x)
            for i, g in enumerate(chunk):
                gy = out_type.transform(y, g)
                err = _rel(ys[i * B:(i + 1) * B], gy, sp)
                floor = None
                if roundoff:
                    den = _norm(gy, sp)
                    floor = (_norm(dys[i * B:(i + 1) * B], sp) + _norm(out_type.transform(dy, g), sp)) / den \
                        if den > 0 else float("nan")
                exact = G.is_exact_on_grid(g)
                interp = None if exact else _interpolation_floor(module, in_type, out_type, x, y, g)
                records.append(Record(g, G.degrees(g), bool(g.f), err, floor, exact, interp))
    return records


def _interpolation_floor(module, in_type, out_type, x, y, g) -> float | None:
    """What resampling alone costs at an interpolated element: for spatial outputs the output's round
    trip ``g^-1.(g.y)`` against ``y``; for invariant outputs of an image model ``f(g.x)`` against
    ``f`` of a reference rotation (:func:`reference_rotation`); otherwise unknown (None)."""
    G = in_type.group
    if out_type.spatial:
        return _rel(out_type.transform(out_type.transform(y, g), G.inverse(g)), y, True)
    if in_type.is_trivial and in_type.spatial:
        return _rel(module(in_type.transform(x, g)), module(reference_rotation(x, G.degrees(g), mirror=bool(g.f))),
                    False)
    return None


@contextmanager
def _asymmetric_sampling(module: nn.Module):
    """Collects, during one forward, every strided pooling / convolution whose input size leaves an
    asymmetric sampling grid (``(size + 2 padding - kernel) % stride != 0``), as readable strings."""
    found, hooks = [], []

    def pair(v):
        return (v, v) if isinstance(v, int) else tuple(v)[:2]
    for name, m in module.named_modules():
        if hasattr(m, "kernel") and type(m).__name__ == "SpatialPool":               # kit's pooling: stride = kernel
            k, s, p = pair(m.kernel), pair(m.kernel), (0, 0)
        elif isinstance(getattr(m, "stride", None), (int, tuple)) and not isinstance(m.stride, bool):
            s = pair(m.stride)
            k = pair(getattr(m, "kernel_size", s))
            pd = getattr(m, "padding", 0)
            p = pair(pd) if isinstance(pd, (int, tuple)) else (0, 0)
        else:
            continue
        if max(s) <= 1:
            continue

        def hook(mod, args, _out, name=name, k=k, s=s, p=p):
            H, W = args[0].shape[-2:]
            if any((n + 2 * pp - kk) % ss for n, kk, ss, pp in zip((H, W), k, s, p)):
                found.append(f"{name or type(mod).__name__} ({type(mod).__name__}, stride {s[0]}) sees {H}x{W}")
        hooks.append(m.register_forward_hook(hook))
    try:
        yield found
    finally:
        for h in hooks:
            h.remove()


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
            records.append(Record(g, a, mirror, err, floor, exact=abs(a / 90 - round(a / 90)) < 1e-9))
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
    """A small fixed-width table of records (for printing in notebooks and logs): the grid column says
    whether the action is exact on the pixel grid or interpolated (then with its interpolation floor)."""
    lines = [f"{'element':>18} {'angle':>7} {'mirror':>6} {'grid':>7} {'error':>10} {'floor':>10} {'interp.floor':>12}"]
    for r in records:
        floor = f"{r.floor:10.2e}" if r.floor is not None else f"{'-':>10}"
        interp = f"{r.interpolation_floor:12.2e}" if r.interpolation_floor is not None else f"{'-':>12}"
        grid = "-" if r.exact is None else ("exact" if r.exact else "interp.")
        el = repr(r.element) if r.element is not None else "-"
        lines.append(f"{el:>18} {r.angle:7.1f} {str(r.mirror):>6} {grid:>7} {r.error:10.2e} {floor} {interp}")
    return "\n".join(lines)


# ------------------------------------------------------------------- registry models, float32 vs float64
def precision_report(name: str, *, seeds=(0,), overrides: dict | None = None, batch: int = 8,
                     calibrate: int = 64) -> list[dict]:
    """The grid-exact equivariance of a registered model, split into rounding and construction.

    For each seed: the model is built (``kit.models.create(name, **overrides)``), its batch norms
    calibrated on ``calibrate`` inputs of real digits and measured on ``batch`` others
    (:func:`default_input` at the model card's input size; C-channel inputs take C digits) at every
    grid-exact element but the identity of the output's group (multiples of 90 degrees, mirrors
    for dihedral groups; a D16 model restricted to C16 is measured at the rotations only):
    ``error_f32`` (the largest float32 error), ``roundoff`` (the largest round-off floor of
    :func:`check`), ``forward_roundoff`` (how far the float32 output for the *unrotated* input is
    from the float64 one) and ``error_f64`` (the same measurement with the model in float64).
    """
    from . import models
    from .data.sample import load_sample

    n_digits = load_sample()["images"].shape[0]
    rows = []
    for seed in seeds:
        torch.manual_seed(seed)
        m = models.create(name, **(overrides or {}))
        t, size = m.in_type, m.card.input_shape[-1]
        for what, n in (("calibrate", calibrate), ("batch", batch)):
            if not 1 <= n * t.channels <= n_digits:
                raise ValueError(f"{what}={n} inputs of {t.channels} channel(s) need 1..{n_digits} bundled "
                                 f"digits, got {n * t.channels}")
        models.calibrate_batchnorm(m, default_input(t, size=size, batch=calibrate, seed=1))
        G = m.out_type.group          # the symmetry left at the output (D16|5C16: C16, no mirrors)
        els = [g for g in G.elements if G.is_exact_on_grid(g) and g != G.identity]
        x = default_input(t, size=size, batch=batch, seed=0)
        recs = check(m, els, x, roundoff=True)
        twin = float64_twin(m)
        with torch.no_grad():
            fwd = _rel(m(x), twin(x.double()), False)
        rows.append({"name": name, "overrides": dict(overrides or {}), "seed": seed,
                     "params": sum(p.numel() for p in m.parameters() if p.requires_grad),
                     "error_f32": max(r.error for r in recs), "roundoff": max(r.floor for r in recs),
                     "forward_roundoff": fwd,
                     "error_f64": max(r.error for r in check(twin, els, x.double()))})
    return rows


def precision_markdown(rows: list[dict], *, target: float | None = None) -> str:
    """A markdown table of :func:`precision_report` rows (``target``: mark float32 errors above it)."""
    lines = ["| model | seed | grid err f32 | round-off floor | f32 vs f64, unrotated | grid err f64 |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        tag = r["name"] + "".join(f" {k}={v}" for k, v in r["overrides"].items())
        mark = " ✗" if target is not None and r["error_f32"] > target else ""
        lines.append(f"| {tag} | {r['seed']} | {r['error_f32']:.2e}{mark} | {r['roundoff']:.2e} | "
                     f"{r['forward_roundoff']:.2e} | {r['error_f64']:.1e} |")
    return "\n".join(lines)

