"""eqkit layers: one file per idea (gconv, e4, stencils, pdo, epdo, separable)."""
from .base import (EquivariantModule, EquivariantSequential, FieldReLU, GroupBatchNorm, GroupPool,
                   InvariantHead, KernelCache, SpatialPool)
from .e4 import E4Conv, FieldGroupNorm
from .gconv import GroupConv, LiftingConv
from .pdo import PDOGroupConv, PDOLiftingConv

__all__ = ["EquivariantModule", "EquivariantSequential", "FieldReLU", "GroupBatchNorm", "GroupPool",
           "InvariantHead", "KernelCache", "SpatialPool", "GroupConv", "LiftingConv", "E4Conv", "FieldGroupNorm",
           "PDOGroupConv", "PDOLiftingConv"]
