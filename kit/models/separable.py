"""Separable G-CNNs on SE(2) / Sim(2) (Knigge, Romero & Bekkers, ICML 2022): the reference's
``ckgresnet`` for rotated MNIST (spec ``../shared/reference/separable_gcnn.md`` section 5).

    lift(1 -> w0, k) -> BN -> ReLU
    for each next width w_i:  Block(w_{i-1} -> w_i) -> BN -> MaxPool2 -> ReLU       28 -> 14 -> 7
    final gconv(w_last -> w_last, kernel clip(28/2^(len-1) - k, 3, 11) = 3, no padding) -> BN -> ReLU
    head: amax over (group, H, W) -> Linear(w_last, 256, no bias) -> BN1d -> ReLU -> Dropout -> Linear(256, 10)

``Block(a -> b)``: gconv(a -> a, k) -> BN -> ReLU -> gconv(a -> b, k) -> BN -> ReLU -> (+ skip) -> ReLU;
the skip is the identity, or a 1x1 group conv whose SIREN has half the hidden size when ``a != b``.
Every group conv of a model uses the model's ``variant``; the lifting layer is the reference's
non-separable one in every variant. Widths 32, 32, 64 and kernel 7 give exactly the reference's
parameter counts (716,490 / 755,370 / 77,802 for SE(2) non-separable / separable / depthwise-separable,
755,722 for Sim(2) separable; tested).

Logits are exactly invariant (float noise) to rotations by multiples of 90 degrees when the number of
rotations is a multiple of 4 (28 and 14 are even, so the 2x2 poolings commute with rot90).
In training with ``random_offset=True`` one grid offset is drawn per forward call and shared by all
layers; evaluation uses the fixed grid (deterministic logits).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..fields import FieldType
from ..layers import EquivariantModule, FieldReLU, GroupBatchNorm, SpatialPool
from ..layers.separable import LieGroupConv, LieLiftingConv, shared_grid_offset
from ..lie import SE2, LieGrid, Sim2
from . import register_model

__all__ = ["SepResBlock", "MaxMLPHead", "SepGResNet"]

_PAPER = ("Knigge, Romero & Bekkers, Exploiting Redundancy: Separable Group Convolutional Networks on Lie Groups, "
          "ICML 2022")


class SepResBlock(EquivariantModule):
    """``gconv(a->a) -> BN -> ReLU -> gconv(a->b) -> BN -> ReLU -> (+ skip) -> ReLU`` (reference block)."""

    def __init__(self, grid: LieGrid, in_fields: int, out_fields: int, *, kernel_size: int, variant: str,
                 random_offset: bool, siren: dict):
        super().__init__()
        kw = dict(grid=grid, kernel_size=kernel_size, variant=variant, random_offset=random_offset, **siren)
        self.conv1 = LieGroupConv(in_fields=in_fields, out_fields=in_fields, **kw)
        self.bn1 = GroupBatchNorm(self.conv1.out_type)
        self.conv2 = LieGroupConv(in_fields=in_fields, out_fields=out_fields, **kw)
        self.bn2 = GroupBatchNorm(self.conv2.out_type)
        self.skip = None
        if in_fields != out_fields:
            half = max(1, siren.get("hidden", 64) // 2)                  # reference: half the hidden size
            self.skip = LieGroupConv(in_fields=in_fields, out_fields=out_fields,
                                     **{**kw, "kernel_size": 1, "hidden": half})
        self.in_type, self.out_type = self.conv1.in_type, self.conv2.out_type

    def _forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return torch.relu(h + (x if self.skip is None else self.skip(x)))


class MaxMLPHead(EquivariantModule):
    """Invariant head of the reference (credited to SESN): ``amax`` over (group, H, W), then
    ``Linear(C, hidden, no bias) -> BN1d -> ReLU -> Dropout -> Linear(hidden, classes)``."""

    def __init__(self, field_type: FieldType, num_classes: int, *, hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        self.in_type = field_type
        self.out_type = FieldType(field_type.group, "trivial", num_classes, spatial=False)
        self.mlp = nn.Sequential(nn.Linear(field_type.n_fields, hidden, bias=False), nn.BatchNorm1d(hidden),
                                 nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def _forward(self, x):
        return self.mlp(x.amax(dim=(2, 3, 4)))                               # (B, C) -> (B, classes)


class SepGResNet(EquivariantModule):
    """The reference's CK-G-ResNet on a :class:`~kit.lie.LieGrid` (see module docstring)."""

    def __init__(self, *, grid: LieGrid, variant: str = "separable", widths=(32, 32, 64), kernel_size: int = 7,
                 in_channels: int = 1, num_classes: int = 10, input_size: int = 28, hidden: int = 64,
                 num_hidden: int = 1, omega_0: float = 10.0, first_omega_0: float = 10.0,
                 dropout: float = 0.0, random_offset: bool = False, head_hidden: int = 256):
        super().__init__()
        widths = tuple(widths)
        if len(widths) < 2:
            raise ValueError(f"widths needs a lifting width and at least one block width, got {widths!r}")
        n_pool = len(widths) - 1
        if input_size % (2 ** n_pool):
            raise ValueError(f"input_size {input_size} must be divisible by 2^{n_pool} (exact poolings)")
        siren = dict(hidden=hidden, num_hidden=num_hidden, omega_0=omega_0, first_omega_0=first_omega_0)
        self.grid, self.variant, self.random_offset = grid, variant, bool(random_offset)
        self.lift = LieLiftingConv(grid=grid, in_channels=in_channels, out_fields=widths[0],
                                   kernel_size=kernel_size, variant="nonseparable",
                                   random_offset=random_offset, **siren)
        t = self.lift.out_type
        self.lift_bn = GroupBatchNorm(t)
        stages = []
        for a, b in zip(widths, widths[1:]):
            block = SepResBlock(grid, a, b, kernel_size=kernel_size, variant=variant,
                                random_offset=random_offset, siren=siren)
            t = block.out_type
            stages += [block, GroupBatchNorm(t), SpatialPool(t, kernel=2), FieldReLU(t)]
        self.stages = nn.ModuleList(stages)
        size = input_size // 2 ** n_pool
        k_final = int(min(max(size - kernel_size, 3), 11))
        if k_final > size:
            raise ValueError(f"input_size {input_size} too small: final kernel {k_final} > feature size {size}")
        k_final -= 1 - k_final % 2                                              # odd (centred) kernel
        self.final = LieGroupConv(grid=grid, in_fields=widths[-1], out_fields=widths[-1], kernel_size=k_final,
                                  padding=0, variant=variant, random_offset=random_offset, **siren)
        self.final_bn = GroupBatchNorm(self.final.out_type)
        self.head = MaxMLPHead(self.final.out_type, num_classes, hidden=head_hidden, dropout=dropout)
        self.in_type, self.out_type = self.lift.in_type, self.head.out_type

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last group feature map ``(B, w_last, N*S, h, w)`` before the invariant head."""
        h = torch.relu(self.lift_bn(self.lift(x)))
        for m in self.stages:
            h = m(h)
        return torch.relu(self.final_bn(self.final(h)))

    def _forward(self, x):
        if self.training and self.random_offset:
            with shared_grid_offset(self):
                return self.head(self.features(x))
        return self.head(self.features(x))


# -------------------------------------------------------------------------------- registry
_REPORTED = {
    "source": f"{_PAPER}; parameter counts measured by instantiating the official modules at commit e2de2bd; "
              "accuracy from Papers-with-Code",
}
_CARD = dict(paper=_PAPER, input_shape=(1, 28, 28), num_classes=10, recipe="separable-mnist-rot")


def _se2(variant, *, widths, rotations, kernel_size, num_classes, in_channels, hidden, num_hidden, omega_0,
         first_omega_0, dropout, random_offset):
    return SepGResNet(grid=SE2(rotations), variant=variant, widths=widths, kernel_size=kernel_size,
                      num_classes=num_classes, in_channels=in_channels, hidden=hidden, num_hidden=num_hidden,
                      omega_0=omega_0, first_omega_0=first_omega_0, dropout=dropout, random_offset=random_offset)


def _register_se2(name, variant, params, description, widths, rotations, tags):
    reported = {**_REPORTED, "params": params} if params else {**_REPORTED, "note": "small-width variant"}

    @register_model(name, description=description, reported=reported, tags=tags, **_CARD)
    def build(*, widths=widths, rotations: int = rotations, kernel_size: int = 7, num_classes: int = 10,
              in_channels: int = 1, hidden: int = 64, num_hidden: int = 1, omega_0: float = 10.0,
              first_omega_0: float = 10.0, dropout: float = 0.0, random_offset: bool = False):
        return _se2(variant, widths=widths, rotations=rotations, kernel_size=kernel_size,
                    num_classes=num_classes, in_channels=in_channels, hidden=hidden, num_hidden=num_hidden,
                    omega_0=omega_0, first_omega_0=first_omega_0, dropout=dropout, random_offset=random_offset)

    build.__name__ = name.replace("-", "_")
    return build


_FULL, _SMALL = (32, 32, 64), (8, 8, 16)
for _v, _name, _params in (("separable", "sep-se2-mnist", 755_370), ("nonseparable", "nonsep-se2-mnist", 716_490),
                           ("dseparable", "dsep-se2-mnist", 77_802)):
    _register_se2(_name, _v, _params, f"SE(2) CK-G-ResNet, {_v} group convs, widths 32/32/64, kernel 7, "
                                      f"8 rotations (SIREN kernels)", _FULL, 8,
                  ("mnist", "separable", "se2"))
    _register_se2(_name + "-small", _v, None, f"SE(2) CK-G-ResNet, {_v}, widths 8/8/16, 4 rotations "
                                               f"(quick runs)", _SMALL, 4, ("mnist", "separable", "se2", "small"))


def _sim2(*, widths, rotations, scales, s_max, kernel_size, num_classes, in_channels, hidden, num_hidden,
          omega_0, first_omega_0, dropout, random_offset):
    return SepGResNet(grid=Sim2(rotations, scales, s_max), variant="separable", widths=widths,
                      kernel_size=kernel_size, num_classes=num_classes, in_channels=in_channels, hidden=hidden,
                      num_hidden=num_hidden, omega_0=omega_0, first_omega_0=first_omega_0, dropout=dropout,
                      random_offset=random_offset)


@register_model("sep-sim2-mnist", description="Sim(2) CK-G-ResNet, separable group convs, widths 32/32/64, "
                                              "kernel 7, 16 rotations x 3 scales in [1, 1.74]",
                reported={**_REPORTED, "params": 755_722, "test_error": 0.59,
                          "test_error_note": "Sim(2)-CNN on MNIST-rot (Papers-with-Code; the paper's best-test "
                                             "metric; configuration not confirmed)"},
                tags=("mnist", "separable", "sim2"), **_CARD)
def sep_sim2_mnist(*, widths=_FULL, rotations: int = 16, scales: int = 3, s_max: float = 1.74,
                   kernel_size: int = 7, num_classes: int = 10, in_channels: int = 1, hidden: int = 64,
                   num_hidden: int = 1, omega_0: float = 10.0, first_omega_0: float = 10.0,
                   dropout: float = 0.0, random_offset: bool = False):
    return _sim2(widths=widths, rotations=rotations, scales=scales, s_max=s_max, kernel_size=kernel_size,
                 num_classes=num_classes, in_channels=in_channels, hidden=hidden, num_hidden=num_hidden,
                 omega_0=omega_0, first_omega_0=first_omega_0, dropout=dropout, random_offset=random_offset)


@register_model("sep-sim2-mnist-small", description="Sim(2) CK-G-ResNet, separable, widths 8/8/16, "
                                                    "4 rotations x 3 scales (quick runs)",
                reported={**_REPORTED, "note": "small-width variant"},
                tags=("mnist", "separable", "sim2", "small"), **_CARD)
def sep_sim2_mnist_small(*, widths=_SMALL, rotations: int = 4, scales: int = 3, s_max: float = 1.74,
                         kernel_size: int = 7, num_classes: int = 10, in_channels: int = 1, hidden: int = 64,
                         num_hidden: int = 1, omega_0: float = 10.0, first_omega_0: float = 10.0,
                         dropout: float = 0.0, random_offset: bool = False):
    return _sim2(widths=widths, rotations=rotations, scales=scales, s_max=s_max, kernel_size=kernel_size,
                 num_classes=num_classes, in_channels=in_channels, hidden=hidden, num_hidden=num_hidden,
                 omega_0=omega_0, first_omega_0=first_omega_0, dropout=dropout, random_offset=random_offset)
