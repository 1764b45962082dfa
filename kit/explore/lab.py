"""The one explorer state: a model's stem and one of its layers, a real digit and a pixel, with the
group moves every explorer needs (act on the digit, follow a pixel through a group element) and the
line that says which weights are shown. Family explorers (:mod:`kit.explore.e4`, :mod:`kit.explore.epdo`) add
their own accessors in a subclass; nothing here knows a family.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..groups import Element, Group

__all__ = ["Lab"]


@dataclass
class Lab:
    """``stem(x)`` is what enters ``layer``; ``x (1, 1, H, W)`` the digit, ``pixel`` a default pixel
    on its stroke. ``initial``: for a trained model, the same stages at the exact weights its
    training started from (a lab of the same class, digit and pixel), else ``None``."""

    stem: nn.Module
    layer: nn.Module
    x: torch.Tensor
    pixel: tuple[int, int]
    name: str = ""
    pretrained: bool = False
    initial: "Lab | None" = None

    @property
    def group(self) -> Group:
        return self.layer.in_type.group

    @property
    def state(self) -> str:
        """``"trained"`` or ``"untrained"`` (for titles)."""
        return "trained" if self.pretrained else "untrained"

    def describe(self, arch: str | None = None) -> str:
        """One line: which model, which weights (the zoo manifest's accuracies for a trained one)."""
        from ..run import zoo
        return zoo.describe_weights(self.name, pretrained=self.pretrained, arch=arch or "")

    @torch.no_grad()
    def features(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """What enters the layer: ``stem(x)`` (default: the lab's digit)."""
        return self.stem(self.x if x is None else x)

    def check_pixel(self, row: int, col: int) -> None:
        """A clear error for a pixel outside the digit."""
        H, W = self.x.shape[-2:]
        if not (0 <= row < H and 0 <= col < W):
            raise ValueError(f"pixel ({row}, {col}) is outside the {H}x{W} image")

    def rotated(self, element: Element) -> torch.Tensor:
        """The digit acted on by ``element`` (exact on the grid)."""
        return self.group.act_on_image(self.x, element)

    def move_pixel(self, row: int, col: int, element: Element) -> tuple[int, int]:
        """Where pixel ``(row, col)`` lands when the image is acted on by ``element``."""
        self.check_pixel(row, col)
        H, W = self.x.shape[-2:]
        one = torch.zeros(H, W)
        one[row, col] = 1.0
        return divmod(int(self.group.act_on_image(one, element).argmax()), W)
