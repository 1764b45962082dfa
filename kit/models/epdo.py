"""Neural ePDO models (He et al., ICLR 2023) for MNIST-rot, and the all-linear PDO-eConv baseline,
built from :mod:`kit.layers.epdo` (``../shared/reference/neural_epdo.md`` section 7).

Layout (the public ``pdo_mnist.pdo_net``), input ``(B, 1, 28, 28)``::

    conv1  linear PDO-eConv lift (order 4, 5x5) -> BN -> ReLU                     28x28
    conv2  Neural ePDO -> BN -> ReLU -> maxpool2                                  14x14
    conv3  Neural ePDO -> BN -> ReLU -> dropout
    conv4  Neural ePDO -> BN -> ReLU -> dropout -> maxpool2                       7x7
    conv5  Neural ePDO -> BN -> ReLU -> dropout
           (D16|5C16 only: restrict D16 -> C16; every D16 field becomes two C16 fields)
    conv6  Neural ePDO -> BN -> ReLU -> dropout
    head   max over each field's axis -> global max over space -> Linear(c5, 64) -> BatchNorm1d
           -> ReLU -> Linear(64, 10)

BN is one mean / variance / affine pair per field. Variants (widths in fields, g / s / reduction):

=====================  ==========================  ===========================  =========  =========
name                   field type                  widths                       g/s/r      params
=====================  ==========================  ===========================  =========  =========
nepdo-mnist-regular-*  C16 regular (d = 16)        16, 24, 32, 32, 48, 64       4 / 4 / 1  234,186
nepdo-mnist-quotient-  C16 regular + quotient_4    12, 16, 24, 24, 32, 64       4 / 1 / 2  229,374
gauss                  (d = 20)
nepdo-mnist-d16c16-    D16 regular (d = 32), then  12, 16, 24, 24, 32 ->        4 / 1 / 1  525,190
gauss                  C16 after conv5             restrict -> 64 -> 128 C16
pdo-econv-mnist-c16-   C16 regular, every layer a  16, 24, 32, 32, 48, 64       -          1,633,770
fd                     linear PDO-eConv
=====================  ==========================  ===========================  =========  =========

All four counts equal the public code's (measured there; tested here). Differences in behaviour
from the public code, none of which changes a parameter count:

* **Rotation direction.** One stencil convention for fd, gauss and rbffd: every model is
  equivariant in the kit's direction (the public gauss / RBF-FD models are mirrored).
* **Restriction.** In the kit's element order a D16 regular field restricted to C16 is simply two
  C16 regular fields (rotations shift both halves forward), so the restriction is a reshape; the
  public code needs a permutation because its reflected half cycles backwards.
* **bn6 of D16|5C16** normalises pairs of C16 fields jointly (64 affine pairs for 128 fields), as the
  public code does (its BN was built for 64 D16 fields); :class:`PairedBatchNorm`.
* **Dropout** defaults to dropping whole fields (``dropout_mode="field"``), which keeps the network
  equivariant in distribution during training; ``"channel"`` reproduces the public ``Dropout2d``
  on the flattened channels (single components of a field).
* **Gauss** uses the public code's raw (un-normalised, moment-uncorrected) Gaussian derivatives of
  width ``sigma = 1/(0.99 sqrt 2)`` (``stencil_kw={"normalize": False}``), in the sign-correct
  orientation; pass ``stencil_kw={}`` for the kit's moment-corrected default.
* Kernels are rebuilt from the parameters every training forward and cached only in eval mode,
  never stale (the public code evaluates with the kernel of the previous step).
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..fields import FieldType
from ..groups import Group, cyclic, dihedral
from ..layers.base import EquivariantModule, EquivariantSequential, FieldReLU, GroupBatchNorm, SpatialPool
from ..layers.epdo import LinearPDOConv, NeuralEPDOConv
from ..reps import field_rep
from . import register_model

__all__ = ["NeuralEPDONet", "RestrictToRotations", "PairedBatchNorm", "FieldDropout2d", "EPDOHead"]

PAPER = "He, Chen, Shen, Wang, Lin, Neural ePDOs: Spatially Adaptive Equivariant Partial Differential " \
        "Operator Based Networks, ICLR 2023"
_SRC = ("parameter count measured on the official code YuxuanChen21/Neural_ePDOs @f5399b1 "
        "(its pdo_net built and counted with a requires_grad filter)")
_NO_ERR = ("test error: not in the README or abstract; take Tables 1/2 from "
           "openreview.net/forum?id=D1Iqfm7WTkk before quoting")


# ------------------------------------------------------------------------------------ pieces
class RestrictToRotations(EquivariantModule):
    """Restrict D_n regular fields to C_n: each 32-dim D16 field becomes two C16 regular fields
    (the rotation half, then the reflection half: in the kit's element order a rotation shifts both
    halves forward). ``(B, C, 2n, H, W) -> (B, 2C, n, H, W)``; a view, no parameters."""

    def __init__(self, field_type: FieldType):
        super().__init__()
        G = field_type.group
        if not G.flip or field_type.rep.name != "regular":
            raise ValueError(f"RestrictToRotations needs D_n regular fields, got {field_type!r}")
        self.in_type = field_type
        self.out_type = FieldType(cyclic(G.n), "regular", 2 * field_type.n_fields)

    def _forward(self, x):                                                  # (B, C, 2n, H, W)
        B, C, D, H, W = x.shape
        return x.reshape(B, 2 * C, D // 2, H, W)                            # (B, 2C, n, H, W)


class PairedBatchNorm(EquivariantModule):
    """Batch norm with one mean / variance / affine pair per block of ``fields_per_block`` fields
    (statistics over the block's fields, their axes and space). Equivariant for permutation reps.
    The public D16|5C16 model's ``bn6`` is this with blocks of two C16 fields."""

    def __init__(self, field_type: FieldType, *, fields_per_block: int = 2, eps: float = 1e-5,
                 momentum: float = 0.1):
        super().__init__()
        if field_type.rep.perm is None or field_type.n_fields % fields_per_block:
            raise ValueError(f"PairedBatchNorm needs permutation fields in blocks of {fields_per_block}, "
                             f"got {field_type!r}")
        self.in_type = self.out_type = field_type
        self.k = fields_per_block
        self.bn = nn.BatchNorm3d(field_type.n_fields // fields_per_block, eps=eps, momentum=momentum)

    def _forward(self, x):                                                  # (B, C, D, H, W)
        B, C, D, H, W = x.shape
        return self.bn(x.reshape(B, C // self.k, self.k * D, H, W)).reshape(B, C, D, H, W)


class FieldDropout2d(EquivariantModule):
    """Dropout of whole fields (``mode="field"``, equivariant in distribution) or of single channels
    (``mode="channel"``, the public ``Dropout2d`` on ``(B, C*D, H, W)``). Identity in eval mode."""

    def __init__(self, field_type: FieldType, *, p: float = 0.1, mode: str = "field"):
        super().__init__()
        if mode not in ("field", "channel"):
            raise ValueError(f"dropout mode must be 'field' or 'channel', got {mode!r}")
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability p must be in [0, 1), got {p!r}")
        self.in_type = self.out_type = field_type
        self.p, self.mode = p, mode

    def _forward(self, x):                                                  # (B, C, D, H, W)
        if self.mode == "field":
            return F.dropout3d(x, self.p, self.training)
        t = self.in_type
        return t.unflatten(F.dropout2d(t.flatten(x), self.p, self.training))

    def field_dropout_p(self) -> float | None:
        """The probability with which this module drops whole fields now (training, ``mode="field"``), which a
        fused norm may draw itself (:func:`kit.kernels.bn_relu.batch_norm_relu`); ``None`` otherwise."""
        return self.p if (self.training and self.mode == "field") else None

    def extra_repr(self) -> str:
        return f"{self.in_type}, p={self.p}, mode={self.mode!r}"


class EPDOHead(EquivariantModule):
    """Max over each field's axis -> global max over space -> Linear -> BatchNorm1d -> ReLU -> Linear."""

    def __init__(self, field_type: FieldType, n_classes: int, *, hidden: int = 64):
        super().__init__()
        self.in_type = field_type
        self.out_type = FieldType(field_type.group, "trivial", n_classes, spatial=False)
        self.fc1 = nn.Linear(field_type.n_fields, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, n_classes)

    def invariant_features(self, x):
        return x.amax(dim=2).amax(dim=(-2, -1))                             # (B, C)

    def _forward(self, x):                                                  # (B, C, D, H, W)
        return self.fc2(F.relu(self.bn(self.fc1(self.invariant_features(x)))))


# -------------------------------------------------------------------------------------- the net
class NeuralEPDONet(EquivariantSequential):
    """The public ``pdo_net`` (see the module docstring).

    Args (keyword-only):
        group: C16 (``cyclic(16)``) or D16 (``dihedral(16)``).
        kind: ``"regular"`` or ``"quotient"`` (regular + quotient_4, C_n only).
        widths: six widths ``c0..c5`` (fields): lift -> c0, then five layers c0 -> c1 -> ... -> c5.
        restrict_after: for D_n, restrict to C_n after this many Neural ePDO layers (the public
            D16|5C16: 4, i.e. after conv5); the layers after it have twice the fields.
        g, s, reduction: Neural ePDO hyper-parameters; ``g=None`` makes every layer a linear
            PDO-eConv (the public ``--g -1`` baseline).
        method, stencil_kw: discretisation; dropout, dropout_mode; in_channels, num_classes.
    """

    def __init__(self, *, group: Group, kind: str = "regular", widths=(16, 24, 32, 32, 48, 64),
                 restrict_after: int | None = None, g: int | None = 4, s: int = 4, reduction: int = 1,
                 method: str = "fd", stencil_kw: dict | None = None, dropout: float = 0.1,
                 dropout_mode: str = "field", in_channels: int = 1, num_classes: int = 10):
        widths = tuple(widths)
        if len(widths) != 6:
            raise ValueError(f"widths must give 6 widths (lift + 5 layers), got {widths!r}")
        if restrict_after is not None and not (group.flip and 1 <= restrict_after <= 4):
            raise ValueError(f"restrict_after needs a dihedral group and a value in 1..4, got "
                             f"{restrict_after!r} with {group.name}")
        rep = field_rep(group, kind)
        disc = dict(method=method, stencil_kw=stencil_kw)
        lift = LinearPDOConv(in_type=FieldType(group, "trivial", in_channels), out_fields=widths[0],
                             out_rep=rep, **disc)
        t = lift.out_type
        mods = [lift, GroupBatchNorm(t), FieldReLU(t)]
        factor = 1
        for i in range(5):                              # conv2 .. conv6
            if restrict_after is not None and i == restrict_after:
                r = RestrictToRotations(t)
                mods.append(r)
                t, factor = r.out_type, 2
                rep = t.rep
            out = widths[i + 1] * factor
            if g is None:
                layer = LinearPDOConv(in_type=t, out_fields=out, out_rep=rep, **disc)
            else:
                layer = NeuralEPDOConv(in_type=t, out_fields=out, out_rep=rep, g=g, s=s, reduction=reduction,
                                       **disc)
            t = layer.out_type
            bn = PairedBatchNorm(t, fields_per_block=factor) if factor > 1 else GroupBatchNorm(t)
            mods += [layer, bn, FieldReLU(t)]
            if i >= 1:
                mods.append(FieldDropout2d(t, p=dropout, mode=dropout_mode))
            if i in (0, 2):
                mods.append(SpatialPool(t, kernel=2, mode="max"))
        mods.append(EPDOHead(t, num_classes))
        super().__init__(*mods)

    def invariant_features(self, x):
        """The head's invariant input ``(B, c5)`` (group max, spatial max): the quantity to test
        invariance on without the head's BatchNorm1d."""
        for m in self.layers[:-1]:
            x = m(x)
        return self.layers[-1].invariant_features(x)


# ------------------------------------------------------------------------------------ registry
_R = dict(widths=(16, 24, 32, 32, 48, 64), g=4, s=4, reduction=1)
_Q = dict(widths=(12, 16, 24, 24, 32, 64), g=4, s=1, reduction=2)
_D = dict(widths=(12, 16, 24, 24, 32, 64), g=4, s=1, reduction=1)
_GAUSS = {"normalize": False}
_TAGS = ("mnist", "epdo")
_CARD = dict(paper=PAPER, input_shape=(1, 28, 28), num_classes=10, recipe="neural-epdo-mnist-rot")


@register_model(
    "nepdo-mnist-regular-fd",
    description="Neural ePDO MNIST-rot net, C16 regular fields, fd stencils, widths 16/24/32/32/48/64, "
                "g=4, s=4, reduction 1",
    reported={"params": 234186, "flags": "--model R --dis fd --g 4 --s 4 --reduction 1", "source": _SRC,
              "test_error": None, "test_error_note": _NO_ERR}, tags=_TAGS, **_CARD)
def nepdo_mnist_regular_fd(*, widths=_R["widths"], g: int = 4, s: int = 4, reduction: int = 1,
                           method: str = "fd", stencil_kw: dict | None = None, dropout: float = 0.1,
                           dropout_mode: str = "field", num_classes: int = 10):
    return NeuralEPDONet(group=cyclic(16), kind="regular", widths=widths, g=g, s=s, reduction=reduction,
                         method=method, stencil_kw=stencil_kw, dropout=dropout, dropout_mode=dropout_mode,
                         num_classes=num_classes)


@register_model(
    "nepdo-mnist-regular-gauss",
    description="Neural ePDO MNIST-rot net, C16 regular fields, Gaussian-derivative stencils "
                "(raw, sigma 0.714 px: the official operator; stencil_kw={'normalize': True}: the kit's moment-corrected "
                "variant), widths 16/24/32/32/48/64, g=4, s=4, reduction 1",
    reported={"params": 234186, "flags": "--model R --dis gauss --g 4 --s 4 --reduction 1", "source": _SRC,
              "test_error": None, "test_error_note": _NO_ERR}, tags=_TAGS, **_CARD)
def nepdo_mnist_regular_gauss(*, widths=_R["widths"], g: int = 4, s: int = 4, reduction: int = 1,
                              method: str = "gauss", stencil_kw: dict | None = _GAUSS, dropout: float = 0.1,
                              dropout_mode: str = "field", num_classes: int = 10):
    return NeuralEPDONet(group=cyclic(16), kind="regular", widths=widths, g=g, s=s, reduction=reduction,
                         method=method, stencil_kw=stencil_kw, dropout=dropout, dropout_mode=dropout_mode,
                         num_classes=num_classes)


@register_model(
    "nepdo-mnist-quotient-gauss",
    description="Neural ePDO MNIST-rot net, C16 regular + quotient_4 fields (d = 20), raw Gaussian-derivative stencils "
                "(the official operator; stencil_kw={'normalize': True}: the kit's moment-corrected variant), "
                "widths 12/16/24/24/32/64, g=4, s=1, reduction 2",
    reported={"params": 229374, "flags": "--model Q --dis gauss --g 4 --s 1 --reduction 2", "source": _SRC,
              "test_error": None, "test_error_note": _NO_ERR}, tags=_TAGS, **_CARD)
def nepdo_mnist_quotient_gauss(*, widths=_Q["widths"], g: int = 4, s: int = 1, reduction: int = 2,
                               method: str = "gauss", stencil_kw: dict | None = _GAUSS, dropout: float = 0.1,
                               dropout_mode: str = "field", num_classes: int = 10):
    return NeuralEPDONet(group=cyclic(16), kind="quotient", widths=widths, g=g, s=s, reduction=reduction,
                         method=method, stencil_kw=stencil_kw, dropout=dropout, dropout_mode=dropout_mode,
                         num_classes=num_classes)


@register_model(
    "nepdo-mnist-d16c16-gauss", invariant="rotations",     # C16 after the restriction: no mirror
    description="Neural ePDO MNIST-rot net, D16 regular fields restricted to C16 after the 5th layer "
                "(conv6: 64 -> 128 C16 fields), raw Gaussian-derivative stencils (the official operator; "
                "stencil_kw={'normalize': True}: the kit's moment-corrected variant), widths 12/16/24/24/32/64, g=4, s=1, "
                "reduction 1",
    reported={"params": 525190, "flags": "--flip True --dis gauss --g 4 --s 1 --reduction 1", "source": _SRC,
              "build_time_official_s": 221,
              "test_error": None, "test_error_note": _NO_ERR,
              "reference_point": "E2CNN's D16|5C16 model: 0.682% test error (Papers-with-Code listing)"},
    tags=_TAGS, **_CARD)
def nepdo_mnist_d16c16_gauss(*, widths=_D["widths"], g: int = 4, s: int = 1, reduction: int = 1,
                             method: str = "gauss", stencil_kw: dict | None = _GAUSS, dropout: float = 0.1,
                             dropout_mode: str = "field", num_classes: int = 10):
    return NeuralEPDONet(group=dihedral(16), kind="regular", widths=widths, restrict_after=4, g=g, s=s,
                         reduction=reduction, method=method, stencil_kw=stencil_kw, dropout=dropout,
                         dropout_mode=dropout_mode, num_classes=num_classes)


@register_model(
    "nepdo-mnist-regular-fd-small",
    description="reduced Neural ePDO MNIST-rot net for CPU training: C8 regular fields (not C16), fd stencils, "
                "widths 8/8/16/16/16/32 (paper 16/24/32/32/48/64), g=2, s=2, reduction 1 (paper g=4, s=4); "
                "28,034 parameters and 42.7M MACs per image against the paper model's 234,186 and 550.1M",
    reported={"note": "reduced variant of nepdo-mnist-regular-fd (no paper number); same layer, same layout, "
                      "same recipe", "paper_model": "nepdo-mnist-regular-fd", "source": _SRC},
    tags=_TAGS + ("small",), **_CARD)
def nepdo_mnist_regular_fd_small(*, order: int = 8, widths=(8, 8, 16, 16, 16, 32), g: int = 2, s: int = 2,
                                 reduction: int = 1, method: str = "fd", stencil_kw: dict | None = None,
                                 dropout: float = 0.1, dropout_mode: str = "field", num_classes: int = 10):
    return NeuralEPDONet(group=cyclic(order), kind="regular", widths=widths, g=g, s=s, reduction=reduction,
                         method=method, stencil_kw=stencil_kw, dropout=dropout, dropout_mode=dropout_mode,
                         num_classes=num_classes)


@register_model(
    "pdo-econv-mnist-c16-fd",
    description="PDO-eConv baseline of the Neural ePDO code (--g -1): every layer a linear PDO-eConv of "
                "order 4 (5x5, fd), C16 regular, widths 16/24/32/32/48/64",
    reported={"params": 1633770, "flags": "--model R --dis fd --g -1", "source": _SRC,
              "test_error": None, "test_error_note": _NO_ERR}, tags=_TAGS + ("baseline",), **_CARD)
def pdo_econv_mnist_c16_fd(*, widths=_R["widths"], method: str = "fd", stencil_kw: dict | None = None,
                           dropout: float = 0.1, dropout_mode: str = "field", num_classes: int = 10):
    return NeuralEPDONet(group=cyclic(16), kind="regular", widths=widths, g=None, method=method,
                         stencil_kw=stencil_kw, dropout=dropout, dropout_mode=dropout_mode,
                         num_classes=num_classes)
