"""One checker per exercise of the lesson track: ``kit.teach.check("2.2", group_conv)``.

A checker calls the student's function on fixed float64 inputs and answers with a :class:`Verdict`:

1. it ran (an unfilled exercise, ``raise NotImplementedError``, says "not written yet");
2. the output has the expected type and shape (else: what was expected, what came);
3. it equals the kit's own answer — the kit's layers (:class:`kit.layers.LiftingConv`,
   :class:`kit.layers.GroupConv`), the field action (:meth:`kit.fields.FieldType.transform`) or the
   equivariance instrument (:func:`kit.equivariance.check`), never a copy of the solution;
4. where the answer is a layer, the instrument measures the student's function itself under every
   element of C4 and the verdict quotes that error.

When the output is wrong, the checker runs each typical mistake of :mod:`kit.teach.mistakes` on the
same inputs; a student output equal to one of them gets that mistake's hint ("group axis rolled the
wrong way", "missing the shift", ...). Otherwise the verdict says what property failed and by how much.

The exercises (signatures as the lessons state them; C4 throughout):

====  =========================================  ============================================
id    function                                   returns
====  =========================================  ============================================
1.1   ``rotate_image(x, r)``                     ``x (..., H, W)`` turned by ``r`` quarter turns
1.2   ``act_on_regular(f, r)``                   ``g·f`` for a regular field ``(B, C, 4, H, W)``
1.3   ``equivariance_error(fn, x, r)``           ``||fn(g·x) - g·fn(x)|| / ||g·fn(x)||``
2.1   ``lifting_conv(x, w)``                     ``(B, C_out, 4, H, W)`` from ``w (C_out, C_in, k, k)``
2.2   ``group_conv(x, w)``                       ``(B, C_out, 4, H, W)`` from ``w (C_out, C_in, 4, k, k)``
2.3   ``invariant_pool(y)``                      ``(B, C)``, unchanged when ``y`` is rotated
3.1   ``grid_preserved(degrees)``                does the rotation map the pixel grid onto itself
3.2   ``rotate_operator(a, b, degrees)``         ``(a', b')`` of the rotated operator ``a∂x + b∂y``
====  =========================================  ============================================
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from ..equivariance import check as _instrument
from ..fields import FieldType
from ..groups import act_on_image, cyclic
from .mistakes import MISTAKES

__all__ = ["Verdict", "Exercise", "EXERCISES", "check", "as_module"]

C4 = cyclic(4)
_TOL = 1e-9        # float64 inputs: a right answer agrees to round-off


@dataclass
class Verdict:
    """What a checker says: ``passed``, one ``message`` (the hint when it failed) and the measured
    ``details`` (errors, shapes). Truthy when passed; prints as one line, renders in colour in Jupyter."""
    exercise: str
    function: str
    passed: bool
    message: str
    mistake: str | None = None
    details: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        mark = "✓" if self.passed else "✗"
        return f"{mark} exercise {self.exercise} ({self.function}): {self.message}"

    __repr__ = __str__

    def _repr_html_(self) -> str:
        colour = "#1a7f37" if self.passed else "#cf222e"
        return (f'<div style="border-left:4px solid {colour};padding:4px 10px;margin:4px 0">'
                f'<b style="color:{colour}">{"✓" if self.passed else "✗"} exercise {self.exercise}</b> '
                f"(<code>{html.escape(self.function)}</code>): {html.escape(self.message)}</div>")


@dataclass(frozen=True)
class Exercise:
    id: str
    function: str
    task: str
    checker: Callable


class _Failed(Exception):
    """Raised inside a checker: the verdict is this failure."""

    def __init__(self, message, mistake=None, **details):
        super().__init__(message)
        self.message, self.mistake, self.details = message, mistake, details


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


def _call(fn, *args):
    try:
        return fn(*args)
    except NotImplementedError:
        raise _Failed("not written yet: replace the `raise NotImplementedError` line with your code, run "
                      "the cell, then this one.") from None
    except Exception as e:  # noqa: BLE001 - a student's exception is the answer to report
        raise _Failed(f"your function raised {type(e).__name__}: {e}") from None


def _tensor(out, expected_shape, what):
    if not isinstance(out, torch.Tensor):
        raise _Failed(f"expected a torch.Tensor of shape {tuple(expected_shape)} for {what}, got "
                      f"{type(out).__name__}{' (did you forget to return it?)' if out is None else ''}")
    return out


def _same(a, b) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
        float((a.double() - b.double()).norm()) <= _TOL * max(1.0, float(b.double().norm()))


def _match_mistake(ex_id, outputs, inputs, same=_same):
    """The first typical mistake whose outputs on ``inputs`` equal the student's ``outputs``."""
    for m in MISTAKES[ex_id]:
        try:
            theirs = [m.fn(*a) for a in inputs]
        except Exception:  # noqa: BLE001 - a mistake that does not apply to these inputs
            continue
        if all(same(o, t) for o, t in zip(outputs, theirs)):
            return m
    return None


def _compare(ex_id, fn, inputs, truths, what):
    """Run ``fn`` on every input; fail with a mistake's hint, a shape message or the largest error."""
    outs = []
    for args, truth in zip(inputs, truths):
        out = _call(fn, *args)
        if isinstance(truth, torch.Tensor):
            out = _tensor(out, truth.shape, what(args))
        outs.append(out)
    if all(_same(o, t) for o, t in zip(outs, truths)):
        return outs
    m = _match_mistake(ex_id, outs, inputs)
    if m is not None:
        raise _Failed(m.hint, mistake=m.name)
    for args, o, t in zip(inputs, outs, truths):
        if tuple(o.shape) != tuple(t.shape):
            raise _Failed(f"wrong shape for {what(args)}: expected {tuple(t.shape)}, got {tuple(o.shape)}")
    errs = [float((o.double() - t).norm() / t.norm()) for o, t in zip(outs, truths)]
    i = max(range(len(errs)), key=errs.__getitem__)
    raise _Failed(f"the shape is right but the values are not: relative difference {errs[i]:.2g} from the "
                  f"kit's answer for {what(inputs[i])}", max_difference=errs[i])


class _AsModule(nn.Module):
    """A student's function as a module with the equivariance contract, for the instrument."""

    def __init__(self, fn, in_type, out_type, *params):
        super().__init__()
        self.fn, self.in_type, self.out_type, self.params = fn, in_type, out_type, params

    def forward(self, x):
        return self.fn(x, *self.params)


def as_module(fn, in_type: FieldType, out_type: FieldType, *params) -> nn.Module:
    """``fn(x, *params)`` as a module with the equivariance contract (``in_type`` / ``out_type``), so
    that :func:`kit.equivariance.check` can measure a function the student wrote."""
    for t, what in ((in_type, "in_type"), (out_type, "out_type")):
        if not isinstance(t, FieldType):
            raise TypeError(f"{what} must be a kit.fields.FieldType, got {type(t).__name__}")
    return _AsModule(fn, in_type, out_type, *params)


def _instrument_error(fn, in_type, out_type, x, *params) -> float:
    recs = _instrument(_AsModule(fn, in_type, out_type, *params), C4.elements, x=x)
    return max(r.error for r in recs)


def _verdict(ex: Exercise, fn) -> Verdict:
    if not callable(fn):
        return Verdict(ex.id, ex.function, False, f"expected your function {ex.function}, got "
                       f"{type(fn).__name__} {fn!r:.60}")
    try:
        message, details = ex.checker(fn)
    except _Failed as f:
        return Verdict(ex.id, ex.function, False, f.message, f.mistake, f.details)
    return Verdict(ex.id, ex.function, True, message, None, details)


# =============================================================================== the checkers
def _check_rotate_image(fn):
    x = _randn(2, 3, 6, 6)
    turns = (0, 1, 2, 3, 5, -1)
    inputs = [(x.clone(), r) for r in turns]
    truths = [act_on_image(x, 90.0 * r) for r in turns]
    _compare("1.1", fn, inputs, truths, lambda a: f"r = {a[1]}")
    return (f"matches kit.groups.act_on_image for r = {', '.join(map(str, turns))} (a group action: "
            f"turning by 1 then 2 is turning by 3)"), {}


def _check_act_on_regular(fn):
    f = _randn(2, 3, 4, 5, 5, seed=1)
    ft = FieldType(C4, "regular", 3)
    turns = (0, 1, 2, 3, -1)
    inputs = [(f.clone(), r) for r in turns]
    truths = [ft.transform(f, C4.element(r % 4)) for r in turns]
    _compare("1.2", fn, inputs, truths, lambda a: f"r = {a[1]}")
    return "matches kit.fields.FieldType.transform for a regular C4 field, r = 0, 1, 2, 3, -1", {}


def _conv_fn(weight):
    k = weight.shape[-1]
    return lambda x: torch.nn.functional.conv2d(x, weight, padding=k // 2)


def _check_equivariance_error(fn):
    x = _randn(2, 1, 12, 12, seed=2)
    lap = torch.tensor([[0., 1., 0.], [1., -4., 1.], [0., 1., 0.]], dtype=torch.float64)
    dx = torch.tensor([[0., 0., 0.], [-.5, 0., .5], [0., 0., 0.]], dtype=torch.float64)
    fns = {"a Laplacian (equivariant)": _conv_fn(torch.stack([lap, lap.T]).unsqueeze(1)),
           "a horizontal derivative": _conv_fn(dx.reshape(1, 1, 3, 3)),
           "a random 3x3 filter": _conv_fn(_randn(2, 1, 3, 3, seed=3))}
    triv_in = FieldType(C4, "trivial", 1)
    inputs, truths, names = [], [], []
    for name, f in fns.items():
        for r in (1, 2, 3):
            gx, y = act_on_image(x, 90.0 * r), f(x)
            truths.append(float((f(gx) - act_on_image(y, 90.0 * r)).norm() / act_on_image(y, 90.0 * r).norm()))
            inputs.append((f, x.clone(), r))
            names.append(f"{name}, r = {r}")
    outs = []
    for a in inputs:
        o = _call(fn, *a)
        try:
            outs.append(float(o))
        except (TypeError, ValueError):
            raise _Failed(f"expected a number (a float or a 0-d tensor), got {type(o).__name__}") from None

    def close(a, b):
        return abs(a - b) <= 1e-6 * max(abs(b), 1e-9) + 1e-12

    if all(close(o, t) for o, t in zip(outs, truths)):
        inst = {n: _instrument_error(lambda z, f=f: f(z), triv_in, FieldType(C4, "trivial", f(x).shape[1]), x)
                for n, f in fns.items()}
        return ("your measure agrees with the kit's on every test function: " +
                "; ".join(f"{n}: {max(truths[3 * i:3 * i + 3]):.2g}" for i, n in enumerate(fns)) +
                " (kit.equivariance.check, which measures inside the centred disk, gives " +
                ", ".join(f"{v:.2g}" for v in inst.values()) + ")"), {"errors": dict(zip(names, truths))}
    m = _match_mistake("1.3", outs, inputs, same=lambda a, b: close(a, b))
    if m is not None:
        raise _Failed(m.hint, mistake=m.name)
    i = max(range(len(outs)), key=lambda j: abs(outs[j] - truths[j]))
    raise _Failed(f"for {names[i]} you measured {outs[i]:.4g}, the relative equivariance error is {truths[i]:.4g}")


def _check_conv(ex, fn, layer, x, w, in_type, out_type, shapes):
    """A conv exercise: ``fn(x, w)`` equals the kit ``layer`` given weights ``w``, and the instrument
    measures ``fn`` equivariant (``in_type`` -> ``out_type``)."""
    with torch.no_grad():
        layer.weight.copy_(w.reshape(layer.weight.shape))
        truth = layer(x)
    _compare(ex, fn, [(x, w)], [truth], lambda a: shapes)
    err = _instrument_error(fn, in_type, out_type, x, w)
    return (f"equals kit.layers.{type(layer).__name__} with your weights; the instrument measures your function "
            f"equivariant to {err:.1g} under every element of C4"), {"equivariance_error": err}


def _check_lifting_conv(fn):
    from ..layers import LiftingConv
    x, w = _randn(2, 2, 9, 9, seed=4), _randn(3, 2, 3, 3, seed=5)
    layer = LiftingConv(group=C4, in_channels=2, out_fields=3, kernel_size=3, bias=False).double().eval()
    return _check_conv("2.1", fn, layer, x, w, FieldType(C4, "trivial", 2), FieldType(C4, "regular", 3),
                       "x (2, 2, 9, 9), w (3, 2, 3, 3)")


def _check_group_conv(fn):
    from ..layers import GroupConv
    x, w = _randn(2, 2, 4, 9, 9, seed=6), _randn(3, 2, 4, 3, 3, seed=7)
    layer = GroupConv(group=C4, in_fields=2, out_fields=3, kernel_size=3, bias=False).double().eval()
    return _check_conv("2.2", fn, layer, x, w, FieldType(C4, "regular", 2), FieldType(C4, "regular", 3),
                       "x (2, 2, 4, 9, 9), w (3, 2, 4, 3, 3)")


def _check_invariant_pool(fn):
    y, y2 = _randn(2, 3, 4, 8, 8, seed=8), _randn(2, 3, 4, 8, 8, seed=9)
    out = _tensor(_call(fn, y.clone()), (2, 3), "y (2, 3, 4, 8, 8)")
    if tuple(out.shape) != (2, 3):
        m = _match_mistake("2.3", [out], [(y,)], same=lambda a, b: a.shape == b.shape and _same(a, b))
        raise _Failed(m.hint if m else f"expected shape (B, C) = (2, 3) for y (2, 3, 4, 8, 8), got "
                      f"{tuple(out.shape)}", mistake=m.name if m else None)
    if _same(_call(fn, y2), out):
        raise _Failed("your output does not depend on y: a constant is invariant but tells the classifier "
                      "nothing. Pool the values of y.")
    err = _instrument_error(fn, FieldType(C4, "regular", 3), FieldType(C4, "trivial", 3, spatial=False), y)
    if not err <= 1e-12:
        m = _match_mistake("2.3", [out], [(y,)])
        raise _Failed(m.hint if m else f"not invariant: rotating y changes your output by {err:.2g} (relative)",
                      mistake=m.name if m else None, invariance_error=err)
    return (f"(B, C) and invariant: the instrument measures {err:.1g} under every element of C4"), \
        {"invariance_error": err}


def _check_grid_preserved(fn):
    angles = (0.0, 22.5, 30.0, 45.0, 60.0, 72.0, 90.0, 120.0, 135.0, 180.0, 270.0, 360.0, 450.0, -90.0)
    truth = [abs(d / 90.0 - round(d / 90.0)) < 1e-9 for d in angles]
    outs = []
    for d in angles:
        o = _call(fn, d)
        if not isinstance(o, (bool, int)) and not (isinstance(o, torch.Tensor) and o.numel() == 1):
            raise _Failed(f"expected True or False for {d}°, got {type(o).__name__}")
        outs.append(bool(o))
    if outs == truth:
        return "True exactly at the multiples of 90° (the quarter turns), False at 22.5°, 30°, 45°, 60°, 72°, " \
               "120°, 135°", {}
    m = _match_mistake("3.1", outs, [(d,) for d in angles], same=lambda a, b: bool(a) == bool(b))
    if m is not None:
        raise _Failed(m.hint, mistake=m.name)
    wrong = [f"{d:g}°" for d, o, t in zip(angles, outs, truth) if o != t]
    raise _Failed(f"wrong at {', '.join(wrong)}: a rotation preserves the grid when it maps every pixel "
                  f"(integer point) to a pixel")


def _check_rotate_operator(fn):
    cases = ((1.0, 0.0, 45.0), (0.0, 1.0, 90.0), (0.3, -1.2, 30.0), (2.0, 0.5, 200.0), (1.0, 1.0, -60.0))
    truth = []
    for a, b, d in cases:
        c, s = math.cos(math.radians(d)), math.sin(math.radians(d))
        truth.append((c * a - s * b, s * a + c * b))
    outs = []
    for args in cases:
        o = _call(fn, *args)
        try:
            outs.append(tuple(float(v) for v in o))
            assert len(outs[-1]) == 2
        except (TypeError, ValueError, AssertionError):
            raise _Failed(f"expected a pair (a', b'), got {o!r:.60}") from None

    def close(o, t):
        return all(abs(u - v) <= 1e-9 for u, v in zip(o, t))
    if all(close(o, t) for o, t in zip(outs, truth)):
        # the property itself, measured: D_{v'}(g.u) = g.(D_v u) on a smooth image, at an exact quarter turn
        err = _operator_property(fn)
        return (f"(a', b') = R(θ)(a, b); on a smooth image the rotated operator applied to the rotated image "
                f"equals the rotated derivative to {err:.1g} at 90° (finite differences, exact on the grid)"), \
            {"property_error": err}
    m = _match_mistake("3.2", outs, list(cases), same=close)
    if m is not None:
        raise _Failed(m.hint, mistake=m.name)
    i = max(range(len(cases)), key=lambda j: max(abs(u - v) for u, v in zip(outs[j], truth[j])))
    raise _Failed(f"for a, b, degrees = {cases[i]} you returned ({outs[i][0]:.4g}, {outs[i][1]:.4g}); the rotated "
                  f"operator is ({truth[i][0]:.4g}, {truth[i][1]:.4g})")


def _operator_property(fn) -> float:
    from ..groups import plane_coords
    X, Y = plane_coords(33, 33, spacing=0.25)
    u = torch.exp(-(X - 0.7) ** 2 - 0.5 * (Y + 0.3) ** 2) * torch.cos(X + 2 * Y)     # (H, W), smooth

    def D(img, a, b):                       # a d/dx + b d/dy, central differences, x right, y up
        dxi = (img[1:-1, 2:] - img[1:-1, :-2]) / 0.5
        dyi = (img[:-2, 1:-1] - img[2:, 1:-1]) / 0.5
        return a * dxi + b * dyi
    a, b = 0.3, -1.2
    a2, b2 = (float(v) for v in fn(a, b, 90.0))
    lhs, rhs = D(act_on_image(u, 90.0), a2, b2), act_on_image(D(u, a, b), 90.0)
    return float((lhs - rhs).norm() / rhs.norm())


EXERCISES = {e.id: e for e in (
    Exercise("1.1", "rotate_image", "turn images (..., H, W) by r quarter turns counter-clockwise", _check_rotate_image),
    Exercise("1.2", "act_on_regular", "the action of a rotation by r quarter turns on a regular C4 field "
             "(B, C, 4, H, W)", _check_act_on_regular),
    Exercise("1.3", "equivariance_error", "the relative equivariance error of a map of images at r quarter turns",
             _check_equivariance_error),
    Exercise("2.1", "lifting_conv", "a C4 lifting convolution (B, C_in, H, W) -> (B, C_out, 4, H, W)",
             _check_lifting_conv),
    Exercise("2.2", "group_conv", "a C4 group convolution (B, C_in, 4, H, W) -> (B, C_out, 4, H, W)",
             _check_group_conv),
    Exercise("2.3", "invariant_pool", "a pooling (B, C, 4, H, W) -> (B, C) invariant to rotations",
             _check_invariant_pool),
    Exercise("3.1", "grid_preserved", "whether a rotation by `degrees` maps the pixel grid onto itself",
             _check_grid_preserved),
    Exercise("3.2", "rotate_operator", "the coefficients of the operator a∂x + b∂y rotated by `degrees`",
             _check_rotate_operator),
)}


def check(exercise: str, fn) -> Verdict:
    """Check the student's ``fn`` for ``exercise`` (``"1.1"`` ... ``"3.2"``, see the module table);
    returns a :class:`Verdict` (truthy when passed) that prints as one line and renders in Jupyter."""
    ex = EXERCISES.get(str(exercise))
    if ex is None:
        raise ValueError(f"unknown exercise {exercise!r}; the lessons have {', '.join(EXERCISES)}")
    return _verdict(ex, fn)
