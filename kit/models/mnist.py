"""MNIST-sized baselines: a plain CNN and regular G-CNNs on C4 (p4) and D4 (p4m).

All three share one layout (Cohen & Welling 2016 style) and a matched parameter budget of about
72k, so that their comparison is about equivariance, not size:

    conv5 -> conv3 -> pool2 -> conv3 -> conv3 -> pool2 -> conv3 -> conv3 -> invariant head
    28x28            14x14                      7x7

Each conv is followed by (group) batch norm and ReLU. Widths (fields per stage): p4 (8, 16, 32),
p4m (6, 11, 23) (|G| = 8: widths / sqrt(2)), CNN (16, 32, 64) channels (widths * sqrt(|C4|)).
The G-CNNs end with max-pooling over the group axis and global average pooling, so their logits
are exactly invariant to the group (tested); the CNN ends with global average pooling and declares
the same C4 types only so that the instrument can show that it is *not* invariant.

Input ``(B, 1, 28, 28)``, output logits ``(B, 10)``.
"""
from __future__ import annotations

import torch.nn as nn

from ..fields import FieldType
from ..groups import Group, cyclic, dihedral
from ..layers import (EquivariantSequential, FieldReLU, GroupBatchNorm, GroupConv, InvariantHead,
                      LiftingConv, SpatialPool)
from . import register_model

__all__ = ["GCNN", "PlainCNN"]

_SOURCE = "Cohen & Welling, Group Equivariant Convolutional Networks, ICML 2016 (architecture style)"


def _block(conv):
    t = conv.out_type
    return [conv, GroupBatchNorm(t), FieldReLU(t)]


class GCNN(EquivariantSequential):
    """Regular G-CNN for small images: lifting conv, group convs, two 2x2 poolings, invariant head."""

    def __init__(self, *, group: Group, widths=(8, 16, 32), in_channels: int = 1, num_classes: int = 10,
                 lift_kernel: int = 5, kernel_size: int = 3):
        if len(widths) != 3:
            raise ValueError(f"widths must give 3 stage widths, got {widths!r}")
        w1, w2, w3 = widths
        mods = _block(LiftingConv(group=group, in_channels=in_channels, out_fields=w1, kernel_size=lift_kernel))
        mods += _block(GroupConv(group=group, in_fields=w1, out_fields=w1, kernel_size=kernel_size))
        mods += [SpatialPool(mods[-1].out_type)]
        for a, b in ((w1, w2), (w2, w2)):
            mods += _block(GroupConv(group=group, in_fields=a, out_fields=b, kernel_size=kernel_size))
        mods += [SpatialPool(mods[-1].out_type)]
        for a, b in ((w2, w3), (w3, w3)):
            mods += _block(GroupConv(group=group, in_fields=a, out_fields=b, kernel_size=kernel_size))
        mods += [InvariantHead(mods[-1].out_type, num_classes)]
        super().__init__(*mods)


class PlainCNN(nn.Module):
    """The non-equivariant baseline with the same layout (declares C4 types for the instrument)."""

    def __init__(self, *, widths=(16, 32, 64), in_channels: int = 1, num_classes: int = 10,
                 lift_kernel: int = 5, kernel_size: int = 3):
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"widths must give 3 stage widths, got {widths!r}")
        w1, w2, w3 = widths
        C4 = cyclic(4)
        self.in_type = FieldType(C4, "trivial", in_channels)
        self.out_type = FieldType(C4, "trivial", num_classes, spatial=False)

        def block(a, b, k):
            return [nn.Conv2d(a, b, k, padding=k // 2), nn.BatchNorm2d(b), nn.ReLU()]

        self.features = nn.Sequential(
            *block(in_channels, w1, lift_kernel), *block(w1, w1, kernel_size), nn.MaxPool2d(2),
            *block(w1, w2, kernel_size), *block(w2, w2, kernel_size), nn.MaxPool2d(2),
            *block(w2, w3, kernel_size), *block(w3, w3, kernel_size))
        self.linear = nn.Linear(w3, num_classes)

    def stage_features(self, x, stage: int = 1):
        """The channels after the ``stage``-th ReLU (as :meth:`kit.layers.EquivariantSequential.stage_features`)."""
        x = self.in_type.check(x, "PlainCNN input")
        seen = 0
        for m in self.features:
            x = m(x)
            seen += isinstance(m, nn.ReLU)
            if seen == stage:
                return x                                                   # (B, C, H, W)
        raise ValueError(f"stage must be in [1, {seen}] (PlainCNN has {seen} ReLU stages), got {stage}")

    def forward(self, x):
        x = self.in_type.check(x, "PlainCNN input")                         # (B, 1, 28, 28)
        return self.linear(self.features(x).mean(dim=(-2, -1)))              # (B, 10)


_CARD = dict(input_shape=(1, 28, 28), num_classes=10, recipe="mnist-quick", tags=("mnist", "baseline"))


@register_model("cnn-mnist", paper="baseline (no equivariance)", invariant="none",
                description="plain CNN, 6 conv layers, ~72k parameters", **_CARD)
def cnn_mnist(*, widths=(16, 32, 64), num_classes: int = 10, in_channels: int = 1):
    return PlainCNN(widths=widths, num_classes=num_classes, in_channels=in_channels)


@register_model("p4-mnist", paper=_SOURCE, description="C4 regular G-CNN (p4), ~72k parameters", **_CARD)
def p4_mnist(*, widths=(8, 16, 32), num_classes: int = 10, in_channels: int = 1):
    return GCNN(group=cyclic(4), widths=widths, num_classes=num_classes, in_channels=in_channels)


@register_model("p4m-mnist", paper=_SOURCE, description="D4 regular G-CNN (p4m), ~72k parameters", **_CARD)
def p4m_mnist(*, widths=(6, 11, 23), num_classes: int = 10, in_channels: int = 1):
    return GCNN(group=dihedral(4), widths=widths, num_classes=num_classes, in_channels=in_channels)
