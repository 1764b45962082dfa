"""E4-Net models (He et al., "Efficient Equivariant Network", NeurIPS 2021) and their baselines.

MNIST-rot (``e4-mnist-normal``, ``e4-mnist-large``), C4 regular fields, input ``(B, 1, 28, 28)``::

    lift 3x3 -> BN -> ReLU                                              28x28
    E4 -> BN -> ReLU -> maxpool2                                        14x14
    [E4 -> BN -> ReLU -> dropout] x 2 -> maxpool2                        7x7
    [E4 -> BN -> ReLU -> dropout] x 3
    max over the group axis -> global max over space -> linear

Normal: 16 fields, K=5, channels_per_slice 8, reduction 1. Large: 24 fields, K=5, channels_per_slice 2,
reduction 2. Dropout 0.2 (elementwise).

CIFAR ResNet-18 family (``resnet18``, ``p4-resnet18``, ``p4-e4-resnet18``, ``p4m-resnet18``,
``p4m-e4-resnet18``), input ``(B, 3, 32, 32)``: stem 3x3 conv -> BN -> ReLU; 4 stages x 2 basic blocks,
strides 1, 2, 2, 2; block ``conv3x3(stride) -> dropout(0.2) -> BN -> ReLU -> conv3x3 -> BN``, plus
shortcut (1x1 conv + BN when the shape changes), add, ReLU; head: max over the group axis, global
average pooling, linear. Widths: R18 64/128/256/512 channels; p4 32/64/128/256 fields (x4);
p4m 22/44/88/176 fields (x8). The E4 variants replace the *second* 3x3 of every block by
:class:`kit.layers.e4.E4Conv` (K=3, reduction 2, channels_per_slice 2).

Downsampling. As in the official code, the group ResNets downsample by a full-resolution conv followed
by 2x2 max pooling (main branch and shortcut), not by a strided conv. This also keeps them exactly
rot90/mirror-equivariant: a stride-2 conv on an even-sized image samples pixels 0, 2, 4, ..., a grid
that a quarter turn maps onto the odd pixels, whereas 2x2 pooling cells of an image whose side is a
multiple of 2 map onto pooling cells. Inputs must therefore have sides divisible by 8 (three
poolings); 32x32 qualifies. The plain R18 baseline uses ordinary strided convs (it is not equivariant
anyway); it declares C4 types only so that the instrument can measure it.

Parameter counts vs the official code (../shared/reference/e4net.md section 6), with the default
``affine="per_field"`` GroupNorm in E4 layers: every E4 layer has ``2 hidden`` GroupNorm parameters
instead of the official ``2 |G| hidden`` (one pair per field instead of per field and orientation,
which makes trained models exactly equivariant). ``affine="per_channel"`` reproduces the official
counts exactly (tested).
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..fields import FieldType
from ..groups import Group, cyclic, dihedral
from ..layers.base import (EquivariantModule, EquivariantSequential, FieldDropout, FieldReLU, GroupBatchNorm,
                           GroupPool, InvariantHead, SpatialPool)
from ..layers.e4 import AFFINE_MODES, E4Conv
from ..layers.gconv import GroupConv, LiftingConv
from . import register_model

__all__ = ["FieldDropout", "GlobalMaxHead", "E4MnistNet", "GroupBasicBlock", "GroupResNet18", "ResNet18"]

_PAPER = "He et al., Efficient Equivariant Network, NeurIPS 2021 (E4-Net)"
_CODE = "official code LingshenHe/Efficient-Equivariant-Network @04b6057"
_SRC_ACC = f"official README ({_CODE}); best test accuracy over epochs"
_SRC_COUNT = f"counted on the {_CODE}"


# ---------------------------------------------------------------------------------- pieces
def _check_int(name: str, v, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


def _check_widths(widths, n: int, multiple: int = 1) -> tuple:
    ok = (isinstance(widths, (tuple, list)) and len(widths) == n
          and all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 and w % multiple == 0
                  for w in widths))
    if not ok:
        what = f"{n} positive ints" + (f" divisible by {multiple}" if multiple > 1 else "")
        raise ValueError(f"widths must be {what}, got {widths!r}")
    return tuple(widths)


class GlobalMaxHead(EquivariantModule):
    """Invariant head of the E4 MNIST nets: max over the group axis, global max over space, linear."""

    def __init__(self, field_type: FieldType, n_classes: int):
        super().__init__()
        self.in_type = field_type
        self.out_type = FieldType(field_type.group, "trivial", n_classes, spatial=False)
        self.pool = GroupPool(field_type, mode="max")
        self.linear = nn.Linear(field_type.n_fields, n_classes)

    def _forward(self, x):                                                   # (B, C, G, H, W)
        return self.linear(self.pool(x).amax(dim=(-2, -1)))                  # (B, n_classes)


# ------------------------------------------------------------------------------- MNIST-rot
class E4MnistNet(EquivariantSequential):
    """The E4-Net of the paper's MNIST-rot experiments (C4): a 3x3 lift and six E4 layers.

    Args (keyword-only): ``width`` (fields per layer), ``kernel_size``, ``reduction``,
    ``channels_per_slice`` (E4 settings), ``dropout``, ``affine`` (E4 GroupNorm), ``in_channels``,
    ``num_classes``, ``group`` (default C4 as in the paper; D4 also works).
    """

    def __init__(self, *, width: int = 16, kernel_size: int = 5, reduction: int = 1, channels_per_slice: int = 8,
                 dropout: float = 0.2, affine: str | None = "per_field", in_channels: int = 1,
                 num_classes: int = 10, group: Group | None = None):
        G = cyclic(4) if group is None else group
        _check_int("width", width)
        _check_int("in_channels", in_channels)
        _check_int("num_classes", num_classes)
        lift = LiftingConv(group=G, in_channels=in_channels, out_fields=width, kernel_size=3, bias=False)
        t = lift.out_type

        def e4_block(drop: bool):
            e4 = E4Conv(group=G, in_fields=width, out_fields=width, kernel_size=kernel_size, reduction=reduction,
                        channels_per_slice=channels_per_slice, affine=affine)
            return [e4, GroupBatchNorm(t), FieldReLU(t)] + ([FieldDropout(t, p=dropout)] if drop else [])

        mods = [lift, GroupBatchNorm(t), FieldReLU(t)]
        mods += e4_block(False) + [SpatialPool(t)]                              # 28 -> 14
        mods += e4_block(True) + e4_block(True) + [SpatialPool(t)]              # 14 -> 7
        mods += e4_block(True) + e4_block(True) + e4_block(True)
        mods += [GlobalMaxHead(t, num_classes)]
        super().__init__(*mods)


_MNIST = dict(input_shape=(1, 28, 28), num_classes=10, recipe="e4-mnist-rot", tags=("mnist", "e4"))


@register_model("e4-mnist-normal", paper=_PAPER, paper_overrides={"affine": "per_channel"},
                description="E4-Net 'Normal' for MNIST-rot: C4, 16 fields, 6 E4 layers (K=5, 8 channels/slice, "
                            "r=1), ~18k parameters",
                reported={"test_error": 1.29, "accuracy": 98.71, "params": 18_694, "macs": 15.5e6,
                          "macs_dynamic": 2.1e6,
                          "source": f"accuracy: {_SRC_ACC}; params, MACs (conv + linear, and dynamic "
                                    f"aggregation): {_SRC_COUNT}"},
                **_MNIST)
def e4_mnist_normal(*, width: int = 16, kernel_size: int = 5, reduction: int = 1, channels_per_slice: int = 8,
                    dropout: float = 0.2, affine: str | None = "per_field", num_classes: int = 10,
                    in_channels: int = 1):
    return E4MnistNet(width=width, kernel_size=kernel_size, reduction=reduction,
                      channels_per_slice=channels_per_slice, dropout=dropout, affine=affine,
                      num_classes=num_classes, in_channels=in_channels)


@register_model("e4-mnist-large", paper=_PAPER, paper_overrides={"affine": "per_channel"},
                description="E4-Net 'Large' for MNIST-rot: C4, 24 fields, 6 E4 layers (K=5, 2 channels/slice, "
                            "r=2), ~45k parameters",
                reported={"test_error": 1.19, "accuracy": 98.81, "params": 45_514, "macs": 38.0e6,
                          "macs_dynamic": 3.2e6,
                          "source": f"accuracy: {_SRC_ACC}; params, MACs (conv + linear, and dynamic "
                                    f"aggregation): {_SRC_COUNT}"},
                **_MNIST)
def e4_mnist_large(*, width: int = 24, kernel_size: int = 5, reduction: int = 2, channels_per_slice: int = 2,
                   dropout: float = 0.2, affine: str | None = "per_field", num_classes: int = 10,
                   in_channels: int = 1):
    return E4MnistNet(width=width, kernel_size=kernel_size, reduction=reduction,
                      channels_per_slice=channels_per_slice, dropout=dropout, affine=affine,
                      num_classes=num_classes, in_channels=in_channels)


# ------------------------------------------------------------------------ CIFAR ResNet-18
class GroupBasicBlock(EquivariantModule):
    """ResNet basic block on regular fields; ``e4`` replaces the second 3x3 group conv by an E4 layer.

    ``conv3x3 [-> maxpool2 if stride 2] -> dropout -> BN -> ReLU -> (conv3x3 | E4) -> BN``; shortcut
    ``conv1x1 [-> maxpool2] -> BN`` when the stride or the width changes; add; ReLU.
    """

    def __init__(self, *, group: Group, in_fields: int, out_fields: int, stride: int = 1, dropout: float = 0.2,
                 e4: dict | None = None):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        self.in_type = FieldType(group, "regular", in_fields)
        self.out_type = t = FieldType(group, "regular", out_fields)
        down = [SpatialPool(t, kernel=2)] if stride == 2 else []
        self.branch = EquivariantSequential(
            GroupConv(group=group, in_fields=in_fields, out_fields=out_fields, kernel_size=3, bias=False), *down,
            FieldDropout(t, p=dropout), GroupBatchNorm(t), FieldReLU(t),
            E4Conv(group=group, in_fields=out_fields, out_fields=out_fields, **e4) if e4 is not None else
            GroupConv(group=group, in_fields=out_fields, out_fields=out_fields, kernel_size=3, bias=False),
            GroupBatchNorm(t))
        self.shortcut = None
        if stride != 1 or in_fields != out_fields:
            self.shortcut = EquivariantSequential(
                GroupConv(group=group, in_fields=in_fields, out_fields=out_fields, kernel_size=1, bias=False),
                *([SpatialPool(t, kernel=2)] if stride == 2 else []), GroupBatchNorm(t))

    def _forward(self, x):                                                   # (B, C_in, G, H, W)
        s = x if self.shortcut is None else self.shortcut(x)                 # (B, C_out, G, H/s, W/s)
        return F.relu(self.branch(x) + s)                                    # (B, C_out, G, H/s, W/s)


class GroupResNet18(EquivariantSequential):
    """CIFAR ResNet-18 on regular fields of ``group`` (p4: C4, p4m: D4), optionally with E4 layers.

    Args (keyword-only): ``group``, ``widths`` (fields of the 4 stages), ``num_classes``,
    ``in_channels``, ``dropout``, ``e4`` (``None`` for the plain G-ResNet, else the E4 settings
    ``dict(kernel_size=, reduction=, channels_per_slice=, affine=)``). Image sides must be multiples
    of 8 for exact equivariance (see the module docstring).
    """

    def __init__(self, *, group: Group, widths=(32, 64, 128, 256), num_classes: int = 10, in_channels: int = 3,
                 dropout: float = 0.2, e4: dict | None = None):
        widths = _check_widths(widths, 4)
        _check_int("num_classes", num_classes)
        _check_int("in_channels", in_channels)
        lift = LiftingConv(group=group, in_channels=in_channels, out_fields=widths[0], kernel_size=3, bias=False)
        mods = [lift, GroupBatchNorm(lift.out_type), FieldReLU(lift.out_type)]
        prev = widths[0]
        for i, w in enumerate(widths):
            for j in range(2):
                mods.append(GroupBasicBlock(group=group, in_fields=prev, out_fields=w,
                                            stride=2 if (i > 0 and j == 0) else 1, dropout=dropout, e4=e4))
                prev = w
        mods.append(InvariantHead(mods[-1].out_type, num_classes))        # group max -> spatial mean -> linear
        super().__init__(*mods)


class _PlainBlock(nn.Module):
    def __init__(self, a: int, b: int, stride: int, dropout: float):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(a, b, 3, stride, 1, bias=False), nn.Dropout(dropout),
                                    nn.BatchNorm2d(b), nn.ReLU(),
                                    nn.Conv2d(b, b, 3, 1, 1, bias=False), nn.BatchNorm2d(b))
        self.shortcut = (nn.Sequential(nn.Conv2d(a, b, 1, stride, bias=False), nn.BatchNorm2d(b))
                         if stride != 1 or a != b else nn.Identity())

    def forward(self, x):                                                    # (B, a, H, W)
        return F.relu(self.branch(x) + self.shortcut(x))                     # (B, b, H/s, W/s)


class ResNet18(nn.Module):
    """The plain CIFAR ResNet-18 baseline of the paper (strided convs, dropout in every block).

    Declares C4 types (trivial in, logits out) only so that the instrument can show it is not invariant.
    """

    def __init__(self, *, widths=(64, 128, 256, 512), num_classes: int = 10, in_channels: int = 3,
                 dropout: float = 0.2):
        super().__init__()
        widths = _check_widths(widths, 4)
        _check_int("num_classes", num_classes)
        _check_int("in_channels", in_channels)
        C4 = cyclic(4)
        self.in_type = FieldType(C4, "trivial", in_channels)
        self.out_type = FieldType(C4, "trivial", num_classes, spatial=False)
        layers = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
        prev = widths[0]
        for i, w in enumerate(widths):
            for j in range(2):
                layers.append(_PlainBlock(prev, w, 2 if (i > 0 and j == 0) else 1, dropout))
                prev = w
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(prev, num_classes)

    def forward(self, x):
        x = self.in_type.check(x, "ResNet18 input")                          # (B, 3, 32, 32)
        return self.linear(self.features(x).mean(dim=(-2, -1)))              # (B, num_classes)


def _e4_settings(kernel_size, reduction, channels_per_slice, affine) -> dict:
    if affine not in AFFINE_MODES:
        raise ValueError(f"affine must be one of {AFFINE_MODES}, got {affine!r}")
    return dict(kernel_size=kernel_size, reduction=reduction, channels_per_slice=channels_per_slice, affine=affine)


_CIFAR = dict(input_shape=(3, 32, 32), num_classes=10, recipe="e4-cifar")


def _reported(params10, params100, macs, acc10, acc100, *, downsampling="full-resolution conv + maxpool") -> dict:
    return {"params": params10, "params_cifar100": params100, "macs": macs,
            "accuracy_cifar10": acc10, "accuracy_cifar100": acc100,
            "source": f"accuracy: {_SRC_ACC}, no augmentation; params (CIFAR-10 / CIFAR-100 heads) and MACs "
                      f"at 32x32 ({downsampling} downsampling): {_SRC_COUNT}"}


@register_model("resnet18", paper=f"baseline of {_PAPER}", invariant="none",
                description="plain CIFAR ResNet-18 (64/128/256/512, dropout 0.2 in every block), ~11.2M parameters",
                reported=_reported(11_173_962, 11_220_132, 555e6, 90.3, 66.0, downsampling="strided conv"), tags=("cifar", "baseline"),
                **_CIFAR)
def resnet18(*, num_classes: int = 10, widths=(64, 128, 256, 512), dropout: float = 0.2, in_channels: int = 3):
    return ResNet18(widths=widths, num_classes=num_classes, in_channels=in_channels, dropout=dropout)


@register_model("p4-resnet18", paper=f"baseline of {_PAPER}",
                description="p4 (C4) regular G-ResNet-18, 32/64/128/256 fields, ~11.2M parameters",
                reported=_reported(11_165_738, 11_188_868, 2_973e6, 92.47, 72.04), tags=("cifar", "baseline"),
                **_CIFAR)
def p4_resnet18(*, num_classes: int = 10, widths=(32, 64, 128, 256), dropout: float = 0.2, in_channels: int = 3):
    return GroupResNet18(group=cyclic(4), widths=widths, num_classes=num_classes, in_channels=in_channels,
                         dropout=dropout)


@register_model("p4-e4-resnet18", paper=_PAPER, paper_overrides={"affine": "per_channel"},
                description="p4 E4-ResNet-18: p4-ResNet-18 with the second 3x3 of every block replaced by E4 "
                            "(K=3, r=2, 2 channels/slice), ~6.3M parameters",
                reported=_reported(6_343_178, 6_366_308, 2_046e6, 93.58, 73.41), tags=("cifar", "e4"), **_CIFAR)
def p4_e4_resnet18(*, num_classes: int = 10, widths=(32, 64, 128, 256), dropout: float = 0.2, in_channels: int = 3,
                   kernel_size: int = 3, reduction: int = 2, channels_per_slice: int = 2,
                   affine: str | None = "per_field"):
    return GroupResNet18(group=cyclic(4), widths=widths, num_classes=num_classes, in_channels=in_channels,
                         dropout=dropout, e4=_e4_settings(kernel_size, reduction, channels_per_slice, affine))


@register_model("p4m-resnet18", paper=f"baseline of {_PAPER}",
                description="p4m (D4) regular G-ResNet-18, 22/44/88/176 fields, ~10.6M parameters",
                reported=_reported(10_552_992, 10_568_922, 5_619e6, 94.17, 75.05), tags=("cifar", "baseline"),
                **_CIFAR)
def p4m_resnet18(*, num_classes: int = 10, widths=(22, 44, 88, 176), dropout: float = 0.2, in_channels: int = 3):
    return GroupResNet18(group=dihedral(4), widths=widths, num_classes=num_classes, in_channels=in_channels,
                         dropout=dropout)


@register_model("p4m-e4-resnet18", paper=_PAPER, paper_overrides={"affine": "per_channel"},
                description="p4m E4-ResNet-18: p4m-ResNet-18 with the second 3x3 of every block replaced by E4 "
                            "(K=3, r=2, 2 channels/slice), ~5.8M parameters",
                reported=_reported(5_809_572, 5_825_502, 3_794e6, 95.04, 77.82), tags=("cifar", "e4"), **_CIFAR)
def p4m_e4_resnet18(*, num_classes: int = 10, widths=(22, 44, 88, 176), dropout: float = 0.2, in_channels: int = 3,
                    kernel_size: int = 3, reduction: int = 2, channels_per_slice: int = 2,
                    affine: str | None = "per_field"):
    return GroupResNet18(group=dihedral(4), widths=widths, num_classes=num_classes, in_channels=in_channels,
                         dropout=dropout, e4=_e4_settings(kernel_size, reduction, channels_per_slice, affine))
