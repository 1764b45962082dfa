"""``kit.export(model)``: a plain-PyTorch copy of a kit model for deployment, in eval mode, that needs
nothing from eqkit at run time (the answer to escnn's ``.export()``).

The model is traced with ``torch.export`` (non-strict) after one eager forward has built every
static kernel from the weights: the steered G-conv filter banks, the PDO and Neural-ePDO bases
contracted with their coefficients, the 1x1 intertwiners, the SIREN-sampled Lie-group kernels
are **baked in as constants** (no kernel expansion at run time), and everything input-dependent
(E4's generated kernels, the Neural-ePDO stencils and their per-pixel aggregation, batch-norm in
eval mode, pooling) stays as plain aten operations. The result is the ``torch.fx.GraphModule`` of the
exported program (``exported.module()``); ``exported.program`` is the ``ExportedProgram`` itself, for
``torch.export.save`` / ONNX / AOTInductor. Outputs are checked against the source model.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
import torch.nn as nn

from .. import _compat

__all__ = ["export"]


@contextmanager
def _exporting():
    _compat.EXPORTING = True
    try:
        yield
    finally:
        _compat.EXPORTING = False


def _example(model: nn.Module) -> torch.Tensor:
    t = getattr(model, "in_type", None)
    if t is None or not t.spatial:
        raise ValueError(f"pass example=... (an input batch): {type(model).__name__} has no spatial in_type to make one from")
    p = next(model.parameters(), None)
    return torch.rand(2, t.channels, 28, 28, dtype=p.dtype if p is not None else torch.float32,
                      generator=torch.Generator().manual_seed(0))


def export(model: nn.Module, example: torch.Tensor | None = None, *, check: bool = True, rtol: float = 1e-6):
    """A deployable copy of ``model`` (left untouched): eval mode, kernels baked in, no eqkit at run time.

    ``example``: an input batch fixing the traced shapes (default: two random ``28 x 28`` images with
    the model's input channels). ``check``: compare the export with the source run on its plain-PyTorch
    paths (those the export traces) on ``example`` and raise when the relative error exceeds ``rtol``. The
    source's fused CPU kernels compute the same operators in another float32 rounding: E4's fused generator
    (``kit/kernels/csrc/e4_fused.cpp``) puts the E4 models 1e-6-3e-6 (relative) from the export, as far as
    every float32 path is from float64 (tested in ``tests/test_export.py``). Returns a ``torch.fx.GraphModule`` whose
    ``.program`` attribute is the ``torch.export.ExportedProgram``."""
    src = copy.deepcopy(model).eval()
    x = _example(src) if example is None else example
    with torch.no_grad():
        src(x)                                          # eager: every KernelCache builds its kernel now
        with _exporting():                              # the plain-PyTorch paths, the ones the export traces
            ref = src(x)
            program = torch.export.export(src, (x,), strict=False)
    gm = program.module()
    gm.program = program
    if check:
        with torch.no_grad():
            out = gm(x)
        err = ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()
        if not err <= rtol:
            raise RuntimeError(f"the export of {type(model).__name__} differs from the model by {err:.2e} "
                               f"(relative, above rtol={rtol:g}) on the example input")
    return gm
