"""The typical wrong answers of the lessons' exercises, each with the hint a student gets for it.

These are what students actually write (rotating clockwise, forgetting to cycle the group axis,
rolling it the wrong way, pooling over space only, ...). :mod:`kit.teach.exercises` recognises them
by running each on the checker's inputs and comparing outputs, so that its answer names the mistake;
the tests run every checker against every mistake listed here and assert its hint.

Conventions (those of :mod:`kit.groups`): images ``(..., H, W)`` with x right and y up, a positive
angle turns counter-clockwise, one quarter turn is ``torch.rot90(x, 1, dims=(-2, -1))``; a regular
C4 field is ``(B, C, 4, H, W)`` and a rotation by ``r`` quarter turns moves orientation channel ``i``
to ``i + r`` (``torch.roll(f, r, dims=2)``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["Mistake", "MISTAKES"]


@dataclass(frozen=True)
class Mistake:
    """A typical wrong answer of one exercise: the function a student might write and the hint."""
    name: str
    fn: Callable
    hint: str


def _rot(x, r):
    return torch.rot90(x, r, dims=(-2, -1))


# --------------------------------------------------------------------------- 1.1 rotate_image
ROTATE_IMAGE = (
    Mistake("clockwise", lambda x, r: _rot(x, -r),
            "you turned clockwise. In the kit (x right, y up) a positive angle turns counter-clockwise: "
            "torch.rot90(x, r, dims=(-2, -1))."),
    Mistake("transpose", lambda x, r: x.transpose(-2, -1),
            "a transpose is a reflection (it mirrors the image across its diagonal), not a rotation: "
            "applied twice it gives the image back, a quarter turn does not."),
    Mistake("one-turn-only", lambda x, r: _rot(x, 1),
            "you always turn by one quarter turn: rotate by r quarter turns (r may be 0, negative or > 3)."),
    Mistake("wrong-axes", lambda x, r: torch.rot90(x, r, dims=(0, 1)),
            "you rotated the batch and channel axes: rotate the last two axes (H, W), dims=(-2, -1), "
            "whatever the leading axes are."),
)

# --------------------------------------------------------------------------- 1.2 act_on_regular
ACT_ON_REGULAR = (
    Mistake("no-roll", lambda f, r: _rot(f, r),
            "you rotated the maps but the group axis must cycle too: a rotation by r quarter turns moves "
            "orientation channel i to i + r (torch.roll(..., r, dims=2))."),
    Mistake("roll-wrong-way", lambda f, r: torch.roll(_rot(f, r), -r, dims=2),
            "the group axis is rolled the wrong way: orientation channel i moves to i + r, "
            "torch.roll(..., +r, dims=2)."),
    Mistake("roll-only", lambda f, r: torch.roll(f, r, dims=2),
            "you cycled the group axis but did not rotate the maps themselves: g acts on the plane too."),
    Mistake("roll-channel-axis", lambda f, r: torch.roll(_rot(f, r), r, dims=1),
            "you rolled the field axis (dim 1); the group axis of a regular field (B, C, 4, H, W) is dim 2."),
    Mistake("clockwise", lambda f, r: torch.roll(_rot(f, -r), -r, dims=2),
            "you turned clockwise (and rolled to match): the kit's positive angles turn counter-clockwise, "
            "torch.rot90(f, r, dims=(-2, -1)) and torch.roll(..., r, dims=2)."),
)


# --------------------------------------------------------------------------- 1.3 equivariance_error
def _rel(a, b):
    return float((a - b).norm() / b.norm())


EQUIVARIANCE_ERROR = (
    Mistake("invariance", lambda fn, x, r: _rel(fn(_rot(x, r)), fn(x)),
            "you compared f(g·x) with f(x): that measures invariance. Equivariance compares f(g·x) with "
            "g·f(x), the output transformed by the same g."),
    Mistake("rotate-back", lambda fn, x, r: _rel(fn(_rot(x, r)), _rot(fn(x), -r)),
            "you transformed f(x) by g^-1: compare f(g·x) with g·f(x), both rotated by the same r quarter "
            "turns."),
    Mistake("absolute", lambda fn, x, r: float((fn(_rot(x, r)) - _rot(fn(x), r)).norm()),
            "divide by ||g·f(x)||: a relative error does not change when the output is scaled."),
)


# --------------------------------------------------------------------------- 2.1 lifting_conv
def _lift(x, w, turns, stack_dim=2, padding=None):
    k = w.shape[-1]
    bank = torch.stack([_rot(w, t) for t in turns], dim=1)                 # (O, 4, C, k, k)
    O = w.shape[0]
    y = F.conv2d(x, bank.reshape(O * len(turns), *w.shape[1:]), padding=k // 2 if padding is None else padding)
    y = y.unflatten(1, (O, len(turns)))                                    # (B, O, 4, H, W)
    return y.transpose(1, 2) if stack_dim == 1 else y


LIFTING_CONV = (
    Mistake("no-steering", lambda x, w: _lift(x, w, (0, 0, 0, 0)),
            "the four orientation channels are identical: steer the kernel, i.e. correlate with "
            "rot90(w, k) for k = 0, 1, 2, 3."),
    Mistake("clockwise", lambda x, w: _lift(x, w, (0, -1, -2, -3)),
            "your kernels turn clockwise (rot90(w, -k)): the layer is still equivariant, but its group axis "
            "rolls the wrong way (by -r) when the input turns by +r. Steer with rot90(w, k, dims=(-2, -1))."),
    Mistake("group-axis-first", lambda x, w: _lift(x, w, (0, 1, 2, 3), stack_dim=1),
            "the group axis is in the wrong place: the kit's layout is (B, C_out, 4, H, W), group axis dim 2."),
    Mistake("no-padding", lambda x, w: _lift(x, w, (0, 1, 2, 3), padding=0),
            "pad by k // 2 so that the output keeps H x W and the centre of rotation stays the image centre."),
)


# --------------------------------------------------------------------------- 2.2 group_conv
def _gconv(x, w, *, rotate=1, shift=1):
    O, C, G, k, _ = w.shape
    bank = torch.stack([_rot(torch.roll(w, shift * t, dims=2), rotate * t) for t in range(G)], dim=1)
    y = F.conv2d(x.flatten(1, 2), bank.reshape(O * G, C * G, k, k), padding=k // 2)   # (B, O*4, H, W)
    return y.unflatten(1, (O, G))


GROUP_CONV = (
    Mistake("no-shift", lambda x, w: _gconv(x, w, shift=0),
            "missing the cyclic shift: for output orientation k the kernel is rotated by k quarter turns "
            "*and* its input group axis is rolled by k (torch.roll(w, k, dims=2)), because the input's "
            "orientation channels move when it turns."),
    Mistake("shift-wrong-way", lambda x, w: _gconv(x, w, shift=-1),
            "the group axis of the kernel is rolled the wrong way: for output orientation k use "
            "torch.roll(w, +k, dims=2), matching the action of exercise 1.2."),
    Mistake("shift-only", lambda x, w: _gconv(x, w, rotate=0),
            "you rolled the group axis but did not rotate the kernel's spatial part: the output orientation "
            "k needs rot90(..., k) as well."),
    Mistake("clockwise", lambda x, w: _gconv(x, w, rotate=-1, shift=-1),
            "you turned clockwise and rolled to match: equivariant, but for the opposite convention (the "
            "group axis rolls by -r). The kit turns counter-clockwise: rot90(roll(w, k, dims=2), k)."),
)


# --------------------------------------------------------------------------- 2.3 invariant_pool
INVARIANT_POOL = (
    Mistake("space-only", lambda y: y.amax(dim=(-2, -1)),
            "you pooled over space but kept the group axis: (B, C, 4) still changes when the input turns "
            "(its entries cycle). Pool over the group axis too, to get (B, C)."),
    Mistake("group-only", lambda y: y.amax(dim=2),
            "you pooled over the group axis only: the (B, C, H, W) maps still rotate with the input. Pool "
            "over space too, to get (B, C)."),
    Mistake("one-orientation", lambda y: y[:, :, 0].amax(dim=(-2, -1)),
            "picking one orientation channel is not invariant: a rotation moves the orientation channels "
            "along the group axis (exercise 1.2). Pool over all of them."),
    Mistake("all-fields", lambda y: y.amax(dim=(1, 2, 3, 4)),
            "you pooled the fields together too: keep one number per field, an output of shape (B, C)."),
)


# --------------------------------------------------------------------------- 3.1 grid_preserved
def _q(d, m):
    return abs(d / m - round(d / m)) < 1e-9


GRID_PRESERVED = (
    Mistake("45-degrees", lambda d: _q(d, 45.0),
            "45° is not a symmetry of the square grid: it sends the pixel (1, 0) to (0.707, 0.707), between "
            "pixels. Rotate a few lattice points and test whether they land on integers."),
    Mistake("half-turns-only", lambda d: _q(d, 180.0),
            "a quarter turn maps (x, y) to (-y, x): integers to integers, so 90° and 270° preserve the grid."),
    Mistake("full-turns-only", lambda d: _q(d, 360.0),
            "a quarter turn maps (x, y) to (-y, x): integers to integers, so every multiple of 90° preserves "
            "the grid."),
    Mistake("30-degrees", lambda d: _q(d, 30.0),
            "30° and 60° are symmetries of a hexagonal lattice, not of the square pixel grid: (1, 0) goes "
            "to (0.866, 0.5)."),
)


# --------------------------------------------------------------------------- 3.2 rotate_operator
def _turn(a, b, t):
    c, s = math.cos(t), math.sin(t)
    return c * a - s * b, s * a + c * b


ROTATE_OPERATOR = (
    Mistake("clockwise", lambda a, b, d: _turn(a, b, -math.radians(d)),
            "you turned the operator clockwise (R(θ) transposed): its coefficient vector (a, b) turns with "
            "the image, (a', b') = R(θ)(a, b) with R(θ) = [[cos θ, -sin θ], [sin θ, cos θ]]."),
    Mistake("radians", lambda a, b, d: _turn(a, b, d),
            "math.cos and math.sin take radians: convert the angle with math.radians(degrees) first."),
    Mistake("swapped", lambda a, b, d: _turn(b, a, math.radians(d)),
            "you swapped a and b: a multiplies ∂x and b multiplies ∂y."),
)

#: exercise id -> its typical mistakes
MISTAKES = {"1.1": ROTATE_IMAGE, "1.2": ACT_ON_REGULAR, "1.3": EQUIVARIANCE_ERROR, "2.1": LIFTING_CONV,
            "2.2": GROUP_CONV, "2.3": INVARIANT_POOL, "3.1": GRID_PRESERVED, "3.2": ROTATE_OPERATOR}
