"""PDO-eConv networks (Shen et al., ICML 2020): the MNIST-rot net and the CIFAR pre-activation
ResNets, built from :mod:`kit.layers.pdo`.

Architectures follow the released TF code (``shenzy08/PDO-eConvs``, ``mnist.py`` / ``cifar.py``);
the depth-26 p6 / p6m / wide-p8 ResNets are not released, their widths are inferred from the
reported parameter counts (``../shared/reference/pdo_econv.md`` section 5). Every model takes the
paper's defaults: C_n / D_n rotations with the code's angle offset ``pi/8``, the ``"kernel"``
parametrisation (raw 3x3 weights), fd stencils (``method=`` selects ``"gauss"`` / ``"rbffd"``),
no conv biases, batch norm with TF-contrib's ``eps=1e-3``, ``momentum=0.001`` (decay 0.999).
Reported parameter counts given as "0.36M" in the paper are stored as ``params`` with the
rounding in ``params_precision``.

``head="paper"`` keeps the paper's classifier, which is **not** rotation invariant (MNIST: a dense
4x4 conv over all 7*8 orientation channels; CIFAR: a 1x1 conv over all C*|G| pooled channels).
``head="invariant"`` replaces it by max-pooling over the group axis, spatial averaging and a
linear layer (fewer parameters; invariant at the C4 / D4 elements on inputs whose size keeps the
poolings / strides centred, e.g. 33x33 for the CIFAR nets, 28x28 for MNIST).
"""
from __future__ import annotations

import math

import torch.nn as nn

from ..fields import FieldType
from ..groups import Group, cyclic, dihedral
from ..layers import (EquivariantModule, EquivariantSequential, FieldDropout, FieldReLU, GroupBatchNorm, GroupConv,
                      InvariantHead, SpatialPool)
from ..layers.pdo import PDOGroupConv, PDOLiftingConv
from . import register_model

__all__ = ["PDOMNISTNet", "PDOResNet", "PDOPreActBlock", "FieldDropout", "DenseHead"]

PAPER = "Shen et al., PDO-eConvs: Partial Differential Operator Based Equivariant Convolutions, ICML 2020"
_CODE = "shenzy08/PDO-eConvs README (released code at 18d49a6); best test accuracy over epochs"
_BN = dict(eps=1e-3, momentum=0.001)          # TF-contrib batch_norm defaults (decay 0.999)
OFFSET = math.pi / 8                          # angle offset of the released code


class DenseHead(EquivariantModule):
    """The paper's MNIST classifier: one ``k x k`` VALID conv over all ``C * |G|`` channels -> logits
    (no bias). Not rotation invariant; declares an invariant output type only so that the
    instrument can measure how far from invariant it is."""

    def __init__(self, field_type: FieldType, n_classes: int, *, kernel_size: int, bias: bool = False):
        super().__init__()
        self.in_type = field_type
        self.out_type = FieldType(field_type.group, "trivial", n_classes, spatial=False)
        self.conv = nn.Conv2d(field_type.channels, n_classes, kernel_size, bias=bias)

    def _forward(self, x):
        y = self.conv(self.in_type.flatten(x))                              # (B, n_classes, 1, 1)
        if y.shape[-2:] != (1, 1):
            raise ValueError(f"DenseHead expects a {self.conv.kernel_size[0]}x{self.conv.kernel_size[0]} "
                             f"feature map, got {tuple(x.shape[-2:])}")
        return y.flatten(1)                                                   # (B, n_classes)


class PooledDenseHead(EquivariantModule):
    """The paper's CIFAR classifier: BN + ReLU happen before; global average pool over H, W keeps
    all ``C * |G|`` channels, then a linear map with bias (initialised to 0.1). Not invariant."""

    def __init__(self, field_type: FieldType, n_classes: int):
        super().__init__()
        self.in_type = field_type
        self.out_type = FieldType(field_type.group, "trivial", n_classes, spatial=False)
        self.linear = nn.Linear(field_type.channels, n_classes)
        nn.init.constant_(self.linear.bias, 0.1)

    def _forward(self, x):
        return self.linear(self.in_type.flatten(x).mean(dim=(-2, -1)))     # (B, n_classes)


def _bn_relu(t: FieldType):
    return [GroupBatchNorm(t, **_BN), FieldReLU(t)]


class PDOMNISTNet(EquivariantSequential):
    """The paper's MNIST-rot net (``mnist.py``), p8 by default: 26,747 parameters.

    ``(B, 1, 28, 28)`` -> lift(1 -> w) 26x26 -> gconv 24x24 -> maxpool 12x12 -> 4 gconvs 10, 8, 6,
    4 -> head -> ``(B, 10)``. Every PDO conv pads 1 and applies its 5x5 stencils VALID (the
    spatial size shrinks like a 3x3 conv); each is followed by BN + ReLU; dropout 0.2 after the
    lift and the last four gconvs.
    """

    def __init__(self, *, group: Group, width: int = 7, in_channels: int = 1, num_classes: int = 10,
                 method: str = "fd", offset: float = OFFSET, dropout: float = 0.2, head: str = "paper"):
        if head not in ("paper", "invariant"):
            raise ValueError(f"head must be 'paper' or 'invariant', got {head!r}")
        kw = dict(method=method, offset=offset, padding=1)
        lift = PDOLiftingConv(group=group, in_channels=in_channels, out_fields=width, **kw)
        t = lift.out_type
        mods = [lift, *_bn_relu(t), FieldDropout(t, p=dropout)]
        mods += [PDOGroupConv(group=group, in_fields=width, out_fields=width, **kw), *_bn_relu(t),
                 SpatialPool(t, kernel=2)]
        for _ in range(4):
            mods += [PDOGroupConv(group=group, in_fields=width, out_fields=width, **kw), *_bn_relu(t),
                     FieldDropout(t, p=dropout)]
        mods += [DenseHead(t, num_classes, kernel_size=4) if head == "paper" else InvariantHead(t, num_classes)]
        super().__init__(*mods)


class PDOPreActBlock(EquivariantModule):
    """Pre-activation basic block (the code's ``bottleneck``): ``p = ReLU(BN(x))``;
    ``out = shortcut + conv2(ReLU(BN(conv1(p))))`` with ``shortcut = x`` or a strided 1x1 group
    conv of ``p`` when the width or the resolution changes. ``(B, C_in, |G|, H, W) ->
    (B, C_out, |G|, H/stride, W/stride)``."""

    def __init__(self, *, group: Group, in_fields: int, out_fields: int, stride: int = 1, method: str = "fd",
                 offset: float = OFFSET):
        super().__init__()
        self.in_type = FieldType(group, "regular", in_fields)
        self.out_type = FieldType(group, "regular", out_fields)
        kw = dict(method=method, offset=offset, padding=2)
        self.pre = EquivariantSequential(*_bn_relu(self.in_type))
        self.conv1 = PDOGroupConv(group=group, in_fields=in_fields, out_fields=out_fields, stride=stride, **kw)
        self.mid = EquivariantSequential(*_bn_relu(self.out_type))
        self.conv2 = PDOGroupConv(group=group, in_fields=out_fields, out_fields=out_fields, **kw)
        self.shortcut = (None if stride == 1 and in_fields == out_fields else
                         GroupConv(group=group, in_fields=in_fields, out_fields=out_fields, kernel_size=1,
                                   padding=0, stride=stride, bias=False))

    def _forward(self, x):
        p = self.pre(x)
        s = x if self.shortcut is None else self.shortcut(p)
        return s + self.conv2(self.mid(self.conv1(p)))


class PDOResNet(EquivariantSequential):
    """The paper's CIFAR pre-activation ResNet (``cifar.py``), depth ``6n + 2``.

    ``(B, 3, 32, 32)`` -> lift(3 -> w1) -> 3 stages of ``n`` blocks with widths ``(w1, w2, w3)``
    regular fields (stride 2 at the first block of stages 2 and 3: 32 -> 16 -> 8) -> BN + ReLU ->
    head -> ``(B, num_classes)``.
    """

    def __init__(self, *, group: Group, n: int = 7, widths=(11, 23, 45), in_channels: int = 3,
                 num_classes: int = 10, method: str = "fd", offset: float = OFFSET, head: str = "paper"):
        if head not in ("paper", "invariant"):
            raise ValueError(f"head must be 'paper' or 'invariant', got {head!r}")
        if len(widths) != 3:
            raise ValueError(f"widths must give 3 stage widths, got {widths!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n (blocks per stage) must be an int >= 1, got {n!r}")
        lift = PDOLiftingConv(group=group, in_channels=in_channels, out_fields=widths[0], method=method,
                              offset=offset, padding=2)
        mods, w_in = [lift], widths[0]
        for s, w in enumerate(widths):
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                mods.append(PDOPreActBlock(group=group, in_fields=w_in, out_fields=w, stride=stride,
                                           method=method, offset=offset))
                w_in = w
        t = mods[-1].out_type
        mods += _bn_relu(t)
        mods.append(PooledDenseHead(t, num_classes) if head == "paper" else InvariantHead(t, num_classes))
        super().__init__(*mods)


# ---------------------------------------------------------------------------- registry
@register_model(
    "pdo-mnist-p8", paper=PAPER, invariant="none",           # the paper's dense 4x4 head
    description="PDO-eConv MNIST-rot net, p8 (C8), 7 fields per layer, 26,747 parameters (paper head: "
                "dense 4x4 conv over orientations, not invariant)",
    input_shape=(1, 28, 28), num_classes=10, recipe="pdo-econv-mnist",
    reported={"params": 26747, "test_error": 1.87, "dataset": "MNIST-rot-12k, no augmentation",
              "source": _CODE},
    tags=("mnist", "pdo"))
def pdo_mnist_p8(*, width: int = 7, num_classes: int = 10, in_channels: int = 1, method: str = "fd",
                 offset: float = OFFSET, dropout: float = 0.2, head: str = "paper"):
    return PDOMNISTNet(group=cyclic(8), width=width, in_channels=in_channels, num_classes=num_classes,
                       method=method, offset=offset, dropout=dropout, head=head)


_CIFAR = dict(input_shape=(3, 32, 32), num_classes=10, recipe="pdo-econv-cifar")


@register_model(
    "pdo-resnet44-p8", paper=PAPER, invariant="none",
    description="PDO-eConv pre-activation ResNet-44, p8, widths 11/23/45 (the released cifar.py defaults)",
    reported={"params": 2621693, "params_cifar100": 2654183, "test_error_cifar10": 3.68,
              "test_error_cifar100": 20.01, "source": _CODE + "; PwC lists 96.32% (C10)",
              "architecture": "released code defaults (n = 7, widths 11/23/45)"},
    tags=("cifar", "pdo"), **_CIFAR)
def pdo_resnet44_p8(*, widths=(11, 23, 45), num_classes: int = 10, method: str = "fd",
                    offset: float = OFFSET, head: str = "paper"):
    return PDOResNet(group=cyclic(8), n=7, widths=widths, num_classes=num_classes, method=method,
                     offset=offset, head=head)


@register_model(
    "pdo-resnet26-p6", paper=PAPER, invariant="none",
    description="PDO-eConv pre-activation ResNet-26, p6 (C6), widths 6/13/26 (inferred), 362,386 parameters",
    reported={"params": 360_000, "params_precision": 5_000, "test_error_cifar10": 5.65, "test_error_cifar100": 27.13,
              "source": "README table '0.36M'; widths inferred from the count (not in the released code)"},
    tags=("cifar", "pdo"), **_CIFAR)
def pdo_resnet26_p6(*, widths=(6, 13, 26), num_classes: int = 10, method: str = "fd",
                    offset: float = OFFSET, head: str = "paper"):
    return PDOResNet(group=cyclic(6), n=4, widths=widths, num_classes=num_classes, method=method,
                     offset=offset, head=head)


@register_model(
    "pdo-resnet26-p6m", paper=PAPER, invariant="none",
    description="PDO-eConv pre-activation ResNet-26, p6m (D6), widths 5/10/18 (inferred, speculative), "
                "372,587 parameters",
    reported={"params": 370_000, "params_precision": 5_000, "test_error_cifar10": 5.38, "test_error_cifar100": 27.00,
              "source": "README table '0.37M'; widths inferred from the count, speculative (reflections are "
                        "not in the released code)"},
    tags=("cifar", "pdo"), **_CIFAR)
def pdo_resnet26_p6m(*, widths=(5, 10, 18), num_classes: int = 10, method: str = "fd",
                     offset: float = OFFSET, head: str = "paper"):
    return PDOResNet(group=dihedral(6), n=4, widths=widths, num_classes=num_classes, method=method,
                     offset=offset, head=head)


@register_model(
    "pdo-resnet26-p8", paper=PAPER, invariant="none",
    description="PDO-eConv pre-activation ResNet-26, p8, wide: widths 20/40/80 (inferred), 4,591,630 parameters",
    reported={"params": 4_600_000, "params_precision": 50_000, "test_error_cifar10": 3.50, "test_error_cifar100": 18.40,
              "source": "README table '4.6M' (the abstract's 12.6% of WRN-28-10's 36.5M); widths inferred"},
    tags=("cifar", "pdo"), **_CIFAR)
def pdo_resnet26_p8(*, widths=(20, 40, 80), num_classes: int = 10, method: str = "fd",
                    offset: float = OFFSET, head: str = "paper"):
    return PDOResNet(group=cyclic(8), n=4, widths=widths, num_classes=num_classes, method=method,
                     offset=offset, head=head)
