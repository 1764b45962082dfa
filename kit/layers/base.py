"""Building blocks shared by every layer family: the module contract, kernel caching, and the
field-wise pieces of a G-CNN (nonlinearity, batch norm, pooling, invariant head).

Contract (escnn style): an :class:`EquivariantModule` has ``in_type`` and ``out_type``
(:class:`kit.fields.FieldType`) and checks its input against ``in_type`` on every call, so a
wrongly shaped tensor fails with a message naming the expected and the actual layout.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _compat
from .._compat import is_compiling
from ..fields import FieldType
from ..kernels import bn_relu as _bn_relu
from ..kernels import dropout as _dropout

__all__ = ["EquivariantModule", "KernelCache", "EquivariantSequential", "FieldReLU", "FieldDropout", "GroupBatchNorm",
           "GroupPool", "SpatialPool", "InvariantHead", "field_conv2d", "conv1x1"]


def _own_forward(cls):
    """:meth:`EquivariantModule.forward` with a code object of its own, named after ``cls``."""
    base = EquivariantModule.forward
    names = {"co_qualname": f"{cls.__qualname__}.forward"} if hasattr(base.__code__, "co_qualname") else {}
    code = base.__code__.replace(co_name="forward", **names)
    if code is base.__code__:                                               # pragma: no cover - never equal objects
        code = code.replace(co_firstlineno=code.co_firstlineno)
    fn = types.FunctionType(code, base.__globals__, "forward", base.__defaults__, base.__closure__)
    fn.__qualname__, fn.__doc__, fn.__module__ = f"{cls.__qualname__}.forward", base.__doc__, base.__module__
    return fn


def _raise_if_mismatched(module: nn.Module, x: torch.Tensor, err: Exception) -> None:
    """A TypeError naming the layer, the dtype / device of its weights and of the input, when they differ."""
    p = next((t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()), None)
    if p is not None and (x.dtype != p.dtype or x.device != p.device):
        raise TypeError(f"{type(module).__name__} holds {p.dtype} weights on {p.device} but got a {x.dtype} input on "
                        f"{x.device}: convert one to the other (x.to(model's dtype / device), or model.double() / "
                        f".to(device))") from err


class EquivariantModule(nn.Module):
    """Base class: subclasses set ``self.in_type`` / ``self.out_type`` and implement ``_forward``.

    Every subclass gets its own copy of :meth:`forward` (same code, its own code object), so that
    ``torch.compile`` caches each layer class separately: one shared code object would be recompiled
    for every layer type and fall back to eager at dynamo's recompile limit (8)."""

    in_type: FieldType
    out_type: FieldType

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "forward" not in cls.__dict__:
            cls.forward = _own_forward(cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_type.check(x, f"{type(self).__name__} input")
        if is_compiling():
            return self._forward(x)
        try:
            return self._forward(x)
        except RuntimeError as e:                 # torch's own message names neither the layer nor the fix
            _raise_if_mismatched(self, x, e)
            raise

    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- optional hooks of the family protocol (kit.layers.registry); the defaults mean "none" --------
    def dynamic_macs(self, H: int, W: int) -> int:
        """Multiply-accumulates per image of input-dependent work that FLOP counters do not see
        (E4 / Neural-ePDO per-pixel aggregation), for an ``H x W`` *output*; 0 for static layers.
        :func:`kit.measure.complexity.count_macs` adds it per call at the layer's actual output size."""
        return 0

    def canonical_kernel(self) -> torch.Tensor | None:
        """The identity output element's kernel ``(O, C, D, k, k)`` (detached) of a layer with a static
        group kernel (what :mod:`kit.explore.redundancy` analyses); ``None`` for layers without one."""
        return None

    def extra_repr(self) -> str:
        return f"{self.in_type} -> {self.out_type}"


class KernelCache:
    """Mixin: cache a kernel built from parameters, for evaluation only, and never stale.

    The cache (one entry per tag) is used only in eval mode when no gradient flows to the parameters; it is
    keyed on each source tensor's storage and in-place version counter (an optimizer step or
    ``load_state_dict`` bumps the version) and dropped on ``.train()`` / ``.eval()`` and on
    ``.to()`` / ``.cuda()`` / ``.half()``. Under ``torch.compile`` nothing is cached: the kernel
    is part of the compiled graph.
    """

    _kernel_cache = None

    def cached_kernel(self, build, *sources: torch.Tensor, tag: str = ""):
        """``build()``, cached in eval mode under ``tag`` (a layer that builds several kernels from the same
        parameters names them apart; one entry per tag)."""
        cache = self._kernel_cache
        # kit.export: the kernel built (eagerly, before tracing) from the weights is baked in as a constant
        if _compat.EXPORTING and cache is not None and tag in cache:
            return cache[tag][1]
        # under torch.compile the kernel is built inside the graph from the live parameters (graph
        # inputs), so a compiled model can never read a stale kernel
        if is_compiling() or self.training or (torch.is_grad_enabled() and any(t.requires_grad for t in sources)):
            self._kernel_cache = None
            return build()
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
        cache = {} if cache is None else cache
        hit = cache.get(tag)
        if hit is None or hit[0] != key:
            hit = cache[tag] = (key, build())
        self._kernel_cache = cache
        return hit[1]

    def train(self, mode: bool = True):
        self._kernel_cache = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._kernel_cache = None
        return super()._apply(fn, *args, **kwargs)


POINTWISE_MATMUL_MIN_PIXELS = 100     # below this (7x7 maps) oneDNN's 1x1 conv is the faster one


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
            groups: int = 1) -> torch.Tensor:
    """A 1x1 convolution ``(B, C, H, W) -> (B, O, H, W)`` (``weight (O, C/groups, 1, 1)``), the same map as
    ``F.conv2d(x, weight, bias, groups=groups)``. On the CPU, for maps of at least
    :data:`POINTWISE_MATMUL_MIN_PIXELS` pixels, as one batched matmul: with the few dozen channels of
    the kit's MNIST models oneDNN's 1x1 conv runs 2.7-3.3x slower forward + backward at 28x28
    (1 thread, batch 64; 1.1-2.1x at 14x14), and the equivariant 1x1 maps are a large share of E4's
    and the Neural ePDOs' steps (:func:`kit.kernels.reference_kernels`: always ``F.conv2d``)."""
    B, C, H, W = x.shape
    O = weight.shape[0]
    if (x.device.type != "cpu" or H * W < POINTWISE_MATMUL_MIN_PIXELS or tuple(weight.shape[2:]) != (1, 1)
            or _compat.REFERENCE_KERNELS):
        return F.conv2d(x, weight, bias, groups=groups)
    y = torch.matmul(weight.view(groups, O // groups, C // groups),
                     x.reshape(B, groups, C // groups, H * W))                      # (B, groups, O/groups, HW)
    y = y.view(B, O, H, W)
    return y if bias is None else y + bias.view(1, O, 1, 1)


def field_conv2d(x: torch.Tensor, in_type: FieldType, out_type: FieldType, filt: torch.Tensor,
                 bias: torch.Tensor | None, *, stride: int = 1, padding: int = 0) -> torch.Tensor:
    """Convolve fields ``x`` of ``in_type`` with a steered filter bank ``filt (C_out*D_out, C_in*D_in, k, k)``
    and one bias per *output field* (shared over its D axis): ``(B, C_out, D_out, H', W')``. A 1x1 bank
    at stride 1 goes through :func:`conv1x1`."""
    b = bias.repeat_interleave(out_type.dim) if bias is not None else None          # one bias per field
    if tuple(filt.shape[2:]) == (1, 1) and stride == 1 and padding == 0:
        return out_type.unflatten(conv1x1(in_type.flatten(x), filt, b))
    y = F.conv2d(in_type.flatten(x), filt, b, stride=stride, padding=padding)
    return out_type.unflatten(y)


class EquivariantSequential(EquivariantModule):
    """A chain of equivariant modules whose types are checked to connect at construction."""

    def __init__(self, *modules: EquivariantModule):
        super().__init__()
        if not modules:
            raise ValueError("EquivariantSequential needs at least one module")
        for i, (a, b) in enumerate(zip(modules, modules[1:])):
            if a.out_type != b.in_type:
                raise ValueError(f"module {i} ({type(a).__name__}) outputs {a.out_type} but module {i + 1} "
                                 f"({type(b).__name__}) expects {b.in_type}")
        self.layers = nn.ModuleList(modules)
        self.in_type, self.out_type = modules[0].in_type, modules[-1].out_type

    def _forward(self, x):
        layers, i = self.layers, 0
        while i < len(layers):
            m = layers[i]
            fused = _fused_norm_relu(layers, i, x)     # BN -> ReLU [-> dropout] [-> 2x2 max pool] in one op
            if fused is not None:
                x, i = fused
                continue
            x = m(x)
            i += 1
        return x

    def stage_features(self, x: torch.Tensor, stage: int = 1) -> torch.Tensor:
        """The fields after the ``stage``-th pointwise nonlinearity (:class:`FieldReLU`), i.e. the output
        of the ``stage``-th conv -> norm -> ReLU block counted from the input: what explorers show as
        "the features at stage k", ``(B, C, D, H, W)``."""
        seen = 0
        for m in self.layers:
            x = m(x)
            seen += isinstance(m, FieldReLU)
            if seen == stage:
                return x
        raise ValueError(f"stage must be in [1, {seen}] ({type(self).__name__} has {seen} FieldReLU stages), "
                         f"got {stage}")

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)


def _hooked(*modules) -> bool:
    from torch.nn.modules import module as _m
    return bool(_m._global_forward_hooks or _m._global_forward_pre_hooks) or any(
        mm._forward_hooks or mm._forward_pre_hooks for m in modules for mm in m.modules())


def _fused_norm_relu(layers, i: int, x: torch.Tensor):
    """The training-mode run ``GroupBatchNorm, FieldReLU[, a field dropout][, a 2 x 2 max SpatialPool]`` at
    ``layers[i]`` as one fused operator (:func:`kit.kernels.bn_relu.batch_norm_relu`): ``(y, next index)``, or
    ``None`` where it does not
    apply (eval mode, another device or dtype, hooks on the modules (precision traces, counters), compiling,
    exporting, :func:`kit.kernels.reference_kernels`). The same modules' result, statistics and dropout draws."""
    m = layers[i]
    if not (isinstance(m, GroupBatchNorm) and i + 1 < len(layers) and isinstance(layers[i + 1], FieldReLU)):
        return None
    if not _bn_relu.can_fuse(m.bn, x) or _hooked(m, layers[i + 1]):
        return None
    j = i + 2
    nxt = layers[j] if j < len(layers) else None
    p = nxt.field_dropout_p() if hasattr(nxt, "field_dropout_p") and not _hooked(nxt) else None
    j += p is not None
    nxt = layers[j] if j < len(layers) else None
    pool = (isinstance(nxt, SpatialPool) and nxt.mode == "max" and nxt.kernel == 2 and not _hooked(nxt)
            and x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0)
    x = m.in_type.check(x, f"{type(m).__name__} input")
    y = _bn_relu.batch_norm_relu(x, m.bn, dropout_p=p or 0.0, pool=pool)
    return y, j + pool


class FieldReLU(EquivariantModule):
    """Pointwise ReLU: equivariant for fields whose representation permutes coordinates."""

    def __init__(self, field_type: FieldType, *, inplace: bool = False):
        super().__init__()
        if field_type.rep.perm is None:
            raise ValueError(f"a pointwise nonlinearity is equivariant only for permutation "
                             f"representations (trivial, regular, quotient); got {field_type.rep!r}")
        self.in_type = self.out_type = field_type
        self.inplace = inplace

    def _forward(self, x):
        return F.relu(x, inplace=self.inplace)


class FieldDropout(EquivariantModule):
    """Element-wise dropout on any fields (identity in eval mode; equivariant in distribution in training).

    On the CPU its mask comes from a counter-based hash (:func:`kit.kernels.dropout.dropout`: ``F.dropout``'s
    distribution, not its random stream; about 10x faster here); ``F.dropout`` elsewhere and inside
    :func:`kit.kernels.reference_kernels`."""

    def __init__(self, field_type: FieldType, *, p: float = 0.2):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability p must be in [0, 1), got {p!r}")
        self.in_type = self.out_type = field_type
        self.p = float(p)

    def _forward(self, x):
        return _dropout.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"{self.in_type}, p={self.p}"


class GroupBatchNorm(EquivariantModule):
    """Batch norm with one mean/variance and one affine pair per *field* (shared over its D axis)."""

    def __init__(self, field_type: FieldType, *, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        if field_type.rep.perm is None:
            raise ValueError(f"GroupBatchNorm needs a permutation representation, got {field_type.rep!r}")
        self.in_type = self.out_type = field_type
        bn = nn.BatchNorm2d if field_type.is_trivial else nn.BatchNorm3d   # (B,C,H,W) / (B,C,D,H,W)
        self.bn = bn(field_type.n_fields, eps=eps, momentum=momentum)

    def _forward(self, x):
        return self.bn(x)


class GroupPool(EquivariantModule):
    """Pool over the group axis D (``max`` or ``mean``): regular fields -> invariant scalar fields."""

    def __init__(self, field_type: FieldType, *, mode: str = "max"):
        super().__init__()
        if mode not in ("max", "mean"):
            raise ValueError(f"mode must be 'max' or 'mean', got {mode!r}")
        if field_type.rep.perm is None:
            raise ValueError(f"GroupPool needs a permutation representation, got {field_type.rep!r}")
        self.in_type, self.mode = field_type, mode
        self.out_type = FieldType(field_type.group, "trivial", field_type.n_fields, spatial=field_type.spatial)

    def _forward(self, x):
        if self.in_type.is_trivial:
            return x
        return x.amax(dim=2) if self.mode == "max" else x.mean(dim=2)    # (B, C, H, W)


class SpatialPool(EquivariantModule):
    """``kernel x kernel`` spatial max / average pooling of every channel (stride = kernel).

    Exactly equivariant under the 90-degree rotations and mirrors when H and W are multiples of
    ``kernel`` (pooling cells map onto pooling cells); an odd size (p4-mnist on 27x27: 9e-2 at 90
    degrees) is not, and :func:`kit.equivariance.check` names the pooling in a warning.
    """

    def __init__(self, field_type: FieldType, *, kernel: int = 2, mode: str = "max"):
        super().__init__()
        if mode not in ("max", "avg"):
            raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
        self.in_type = self.out_type = field_type
        self.kernel, self.mode = kernel, mode

    def _forward(self, x):
        t = self.in_type
        pool = F.max_pool2d if self.mode == "max" else F.avg_pool2d
        return t.unflatten(pool(t.flatten(x), self.kernel))              # (B, C, D, H/k, W/k)


class InvariantHead(EquivariantModule):
    """Invariant classifier: pool over the group axis (max), average over space, then a linear map."""

    def __init__(self, field_type: FieldType, n_classes: int):
        super().__init__()
        self.in_type = field_type
        self.out_type = FieldType(field_type.group, "trivial", n_classes, spatial=False)
        self.pool = GroupPool(field_type, mode="max") if not field_type.is_trivial else None
        self.linear = nn.Linear(field_type.n_fields, n_classes)

    def _forward(self, x):
        if self.pool is not None:
            x = self.pool(x)                                               # (B, C, H, W)
        return self.linear(x.mean(dim=(-2, -1)))                           # (B, n_classes)
