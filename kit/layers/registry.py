"""The layer-family registry: one example layer (and the lift that feeds it) per registered family.

Each layer file registers its family's examples at its bottom; every tool that needs "one layer of
each family" asks this registry instead of listing the families itself:

* ``python -m kit bench`` measures every registered example (equivariance error vs angle, MACs,
  throughput, peak memory) beside escnn's counterpart where one is named;
* :func:`kit.measure.complexity.count_macs` counts any layer through the :class:`EquivariantModule` hooks
  (``dynamic_macs``), not through a list of classes;
* ``tests/test_families.py`` runs the layer contract (shapes, float64 equivariance at the
  grid-exact elements, gradients reaching every parameter, kernel caches that never go stale) over
  every registered example.

So a new family is its layer file (with one ``@register_family`` at the bottom), its models file,
its test file and, if it trains with a paper's recipe, a preset. Not here: models (``kit.models``).

    @register_family("c4-myconv", family="My conv", group="C4", description="MyConv, 16 -> 16 fields")
    def _example(*, width, kernel_size):
        G = cyclic(4)
        layer = MyConv(group=G, in_fields=width // 4, out_fields=width // 4, kernel_size=kernel_size)
        lift = LiftingConv(group=G, in_channels=1, out_fields=width // 4, kernel_size=kernel_size)
        return layer, lift

The builder is keyword-only, takes a channel ``width`` (a multiple of every group order the
registry uses: 16 in the contract tests, 64 in the benchmark) and a ``kernel_size``, and returns
``(layer, lift)``: the layer under test and a lifting layer from one image channel to its input type.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from .base import EquivariantModule, EquivariantSequential, FieldReLU

__all__ = ["Family", "register_family", "families", "family", "example_block", "fields_for"]


@dataclass(frozen=True)
class Family:
    """One registered example layer of a family."""

    name: str                       # e.g. "p4-gconv": the benchmark entry's name
    family: str                     # e.g. "G-CNN"
    group: str                      # e.g. "C4", "SE(2), 8 rot."
    description: str                # what the example is, at the benchmark's width
    build: Callable = field(repr=False, compare=False)   # build(*, width, kernel_size) -> (layer, lift)
    paper: str = ""
    exact: bool = True              # float-precision equivariant at the group's grid-exact elements
    counterpart: str | None = None  # the escnn benchmark entry measured at the same fields and kernel size
    module: str = ""                # where it was registered (for error messages)

    def layer(self, *, width: int = 16, kernel_size: int = 5) -> tuple[EquivariantModule, EquivariantModule]:
        """``(layer, lift)`` at ``width`` channels; their types are checked to connect."""
        layer, lift = self.build(width=width, kernel_size=kernel_size)
        for what, m in (("layer", layer), ("lift", lift)):
            if not isinstance(m, EquivariantModule):
                raise TypeError(f"family {self.name!r} ({self.module}): its builder must return (layer, lift), "
                                f"both kit EquivariantModules; the {what} is a {type(m).__name__}")
        if lift.out_type != layer.in_type:
            raise ValueError(f"family {self.name!r} ({self.module}): the lift outputs {lift.out_type} but the "
                             f"layer expects {layer.in_type}")
        return layer, lift


_FAMILIES: dict[str, Family] = {}


def register_family(name: str, *, family: str, group: str, description: str, paper: str = "",
                    exact: bool = True, counterpart: str | None = None):
    """Decorator: register a keyword-only ``build(*, width, kernel_size) -> (layer, lift)`` under ``name``."""

    def deco(fn):
        if name in _FAMILIES:
            raise ValueError(f"layer family example {name!r} is registered twice "
                             f"({_FAMILIES[name].module} and {fn.__module__})")
        params = inspect.signature(fn).parameters
        if set(params) != {"width", "kernel_size"} or any(p.kind is not p.KEYWORD_ONLY for p in params.values()):
            raise TypeError(f"the builder of family {name!r} must be `def build(*, width, kernel_size)`, "
                            f"got {fn.__name__}{inspect.signature(fn)}")
        _FAMILIES[name] = Family(name, family, group, description, fn, paper, exact, counterpart, fn.__module__)
        return fn

    return deco


def families() -> list[Family]:
    """Every registered example, in registration order (registration happens on ``import kit.layers``)."""
    return list(_FAMILIES.values())


def family(name: str) -> Family:
    if name not in _FAMILIES:
        raise ValueError(f"unknown layer family example {name!r}; registered: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def example_block(layer: EquivariantModule, lift: EquivariantModule) -> EquivariantSequential:
    """``lift -> ReLU -> layer``: images in, the layer's output type out (what the benchmark and the
    contract measure end to end). The ReLU is skipped where the lift's output is not a permutation
    representation."""
    mods: list[nn.Module] = [lift]
    if lift.out_type.rep.perm is not None:
        mods.append(FieldReLU(lift.out_type))
    return EquivariantSequential(*mods, layer)


def fields_for(width: int, dim: int) -> int:
    """Fields of dimension ``dim`` (e.g. ``|G|`` for regular fields) in ``width`` channels."""
    if width % dim:
        raise ValueError(f"width {width} is not a multiple of the field dimension {dim}")
    return width // dim
