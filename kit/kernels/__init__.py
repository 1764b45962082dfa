"""Kernel machinery shared by the layer families: the intertwiner solver and its cache
(:mod:`kit.kernels.intertwiners`). Depends on the core (:mod:`kit.groups`, :mod:`kit.reps`) only;
the layers (:mod:`kit.layers`) build on it."""

import contextlib

from .. import _compat


@contextlib.contextmanager
def reference_kernels(enabled: bool = True):
    """Within the block, run the plain-PyTorch reference of every fused kernel and speed path: the tap
    loop for dynamic aggregation (E4, Neural ePDO), materialised and normalised stencils for the
    Neural-ePDO filter, dense ``F.conv2d`` for 1x1 convolutions (no isotypic blocks, no untwisted
    generator: :mod:`kit.kernels.isotypic`), the Neural-ePDO generator's coefficients generated whole before the
    filter (not chunk by chunk inside it), the Neural-ePDO hidden affine as three separate ops, batch norm,
    ReLU, field dropout and 2 x 2 max pooling as separate modules (not :mod:`kit.kernels.bn_relu`), E4's
    generator outside its aggregation (not ``csrc/e4_fused.cpp``) and element-wise dropout by ``F.dropout``
    (aten's ``bernoulli_`` stream, not :mod:`kit.kernels.dropout`'s hash). The same
    operators (tested equal in float64; dropout: the same distribution, other draws), the speed and memory the kit had before its fused kernels: what
    ``python -m kit bench --speedup`` (:func:`kit.measure.complexity.reference_speedup`) measures against.
    Not thread-safe (a module flag); restores the previous setting on exit::

        with kit.kernels.reference_kernels():
            y_ref = model(x)
    """
    old = _compat.REFERENCE_KERNELS
    _compat.REFERENCE_KERNELS = bool(enabled)
    try:
        yield
    finally:
        _compat.REFERENCE_KERNELS = old
