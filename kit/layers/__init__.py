"""eqkit layers: one file per idea (gconv, e4, stencils, pdo, epdo, separable)."""
from .base import (EquivariantModule, EquivariantSequential, FieldReLU, GroupBatchNorm, GroupPool,
                   InvariantHead, KernelCache, SpatialPool)
from .gconv import GroupConv, LiftingConv

__all__ = ["EquivariantModule", "EquivariantSequential", "FieldReLU", "GroupBatchNorm", "GroupPool",
           "InvariantHead", "KernelCache", "SpatialPool", "GroupConv", "LiftingConv"]
