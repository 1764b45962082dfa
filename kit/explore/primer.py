"""The equivariance primer (notebook 01) in library form: calibrated baseline models, one digit,
and the error-vs-angle sweep for each model.

By default the models are the zoo's trained ones (:mod:`kit.run.zoo`, ``pretrained=True``): the feature
maps are those of networks that read digits. ``pretrained=False`` builds untrained models instead,
which is enough to show that equivariance is a property of the architecture, not of the weights;
their batch-norm statistics are calibrated on real digits first
(:func:`kit.models.calibrate_batchnorm`), otherwise an untrained network barely depends on its input
and every invariance measurement looks deceptively good.
"""
from __future__ import annotations

import torch

from .. import models
from ..equivariance import error_vs_angle
from ..groups import disk_mask
from ..data.sample import load_sample

__all__ = ["setup", "sweep"]

PRIMER_MODELS = ("cnn-mnist", "p4-mnist", "p4m-mnist")


def setup(*, seed: int = 0, digit: int = 0, calibration: int = 256, names=PRIMER_MODELS, pretrained: bool = False):
    """Return ``(models_by_name, x)``: eval-mode models and one digit ``(1,1,28,28)``. With
    ``pretrained`` the zoo's trained models (``seed`` unused), else seeded untrained models with
    batch norm calibrated on real digits."""
    imgs = load_sample()["images"] * disk_mask(28, 28).float()      # (N, 1, 28, 28)
    if not 0 <= digit < imgs.shape[0] - calibration:
        raise ValueError(f"digit must be in [0, {imgs.shape[0] - calibration}), got {digit}")
    calib = imgs[-calibration:]
    built = {}
    for i, name in enumerate(names):
        if pretrained:
            built[name] = models.create(name, pretrained=True)
            continue
        torch.manual_seed(seed + i)
        built[name] = models.calibrate_batchnorm(models.create(name), calib)
    return built, imgs[digit:digit + 1]


def sweep(built: dict, x: torch.Tensor, *, step: float = 5.0, mode: str = "bilinear") -> dict:
    """``{name: [Record]}`` from 0 to 360 degrees in ``step`` degree steps for every model."""
    if not 0 < step <= 360:
        raise ValueError(f"step must be in (0, 360] degrees, got {step}")
    n = int(round(360 / step))
    angles = [i * step for i in range(n + 1)]
    return {name: error_vs_angle(m, angles, x=x, mode=mode) for name, m in built.items()}
