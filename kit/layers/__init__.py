"""eqkit layers: one file per idea (gconv, e4, stencils, pdo, epdo, separable), each registering its
family's example layer in :mod:`kit.layers.registry`."""
from .base import (EquivariantModule, EquivariantSequential, FieldDropout, FieldReLU, GroupBatchNorm, GroupPool,
                   InvariantHead, KernelCache, SpatialPool)
from .e4 import E4Conv, FieldGroupNorm
from .epdo import EquivariantConv1x1, LinearPDOConv, NeuralEPDOConv
from .gconv import GroupConv, LiftingConv
from .pdo import PDOGroupConv, PDOLiftingConv
from .registry import Family, families, family, register_family
from .separable import LieGroupConv, LieLiftingConv

__all__ = ["EquivariantModule", "EquivariantSequential", "FieldReLU", "FieldDropout", "GroupBatchNorm", "GroupPool",
           "InvariantHead", "KernelCache", "SpatialPool", "GroupConv", "LiftingConv", "E4Conv", "FieldGroupNorm",
           "PDOGroupConv", "PDOLiftingConv", "EquivariantConv1x1", "LinearPDOConv", "NeuralEPDOConv",
           "LieLiftingConv", "LieGroupConv", "Family", "families", "family", "register_family"]
