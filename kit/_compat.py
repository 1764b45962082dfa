"""Platform shims, kept in one place.

torchvision 0.28.0 on PyPI is built against the CUDA build of torch 2.13.0. With the CPU build its
compiled extension cannot load, and ``import torchvision`` then fails while registering fake
kernels for two operators that were never defined (``torchvision::nms``, ``torchvision::qnms``).
eqkit uses only torchvision's datasets and transforms, which need no compiled ops: defining the
two operator *schemas* (no kernels) lets the pure-Python parts import. Calling the detection ops
still raises torchvision's own "operator not available" error.

:func:`require` imports an optional dependency or says which extra of eqkit provides it: the core
(``pip install eqkit``: torch, numpy) runs the groups, layers, models and the instrument; the
notebooks' figures and widgets need ``[lab]``, sweeps and training tools ``[run]``, RBF-FD stencils
``[rbf]``.
"""
from __future__ import annotations

import importlib
import warnings

import torch

__all__ = ["import_torchvision", "is_compiling", "require", "resolve_device"]

_SCHEMAS = {"nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"}
_lib = None


def import_torchvision():
    """``import torchvision`` that also works when its compiled ops cannot be loaded."""
    global _lib
    try:
        import torchvision
        return torchvision
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    import sys
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]                                 # drop the half-imported package
    if _lib is None:
        _lib = torch.library.Library("torchvision", "FRAGMENT")
        for op, schema in _SCHEMAS.items():
            try:
                torch._C._dispatch_find_schema_or_throw(f"torchvision::{op}", "")
            except RuntimeError:                              # not defined yet: define the schema
                _lib.define(schema)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)          # "Failed to load image Python extension"
        import torchvision
    return torchvision


def require(module: str, extra: str, *, feature: str):
    """``import module``, or an ImportError that names the feature, the missing package and the extra
    of eqkit that installs it (``pip install 'eqkit[extra]'``)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{feature} needs the package {module.split('.')[0]!r} ({e}), which eqkit's {extra!r} "
                          f"extra installs: pip install 'eqkit[{extra}]'") from e


def resolve_device(device="auto", *, local_rank: int = 0) -> torch.device:
    """``"auto"``: the GPU of ``local_rank`` when CUDA is available, else the CPU; anything else as
    ``torch.device``, with a clear error when CUDA is asked for and this torch has none."""
    if str(device) == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N' ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "a CPU-only build of torch" if torch.version.cuda is None else "no visible GPU"
        raise RuntimeError(f"device {str(device)!r} was asked for, but CUDA is not available here (torch "
                           f"{torch.__version__}, {why}): use device='cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


#: set by :func:`kit.models.export.export` while it traces (``torch.export``, non-strict): the layers take
#: their traceable paths and read their eval-mode kernels as constants (:meth:`KernelCache.cached_kernel`)
EXPORTING = False

#: set by :func:`kit.kernels.reference_kernels`: every hot path takes its plain-PyTorch reference (the tap
#: loop for dynamic aggregation, materialised stencils for the Neural-ePDO filter, oneDNN for 1x1 convs):
#: the kit as it ran before its fused kernels, for before / after measurements and for debugging
REFERENCE_KERNELS = False


def dispatch_mode_active() -> bool:
    """True inside a ``TorchDispatchMode`` (``torch.utils.flop_counter.FlopCounterMode``, tracers): operators
    that hide work inside one C++ call (E4's fused generator) then take their plain path, which such a mode sees."""
    f = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return bool(f()) if f is not None else False


def is_compiling() -> bool:
    """True while ``torch.compile`` (dynamo) traces the calling code, or :func:`kit.models.export.export`
    traces a model: layers then take their traceable paths (no C++ extension call) so the graph is whole."""
    if EXPORTING:
        return True
    f = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(f()) if f is not None else False
