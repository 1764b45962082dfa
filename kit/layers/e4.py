"""E4: the efficient equivariant layer of He, Chen, Shen, Dong, Wang & Lin, "Efficient Equivariant
Network", NeurIPS 2021 (E4-Net).

A regular G-conv couples space and the group axis in one weight-tied KxK kernel. E4 decouples them:

* **kernel generator** (pointwise in space, equivariant): group 1x1 conv ``in -> in/r`` fields,
  :class:`FieldGroupNorm`, ReLU, then one linear map (with bias) shared by every orientation that turns
  each orientation's hidden vector into ``S`` raw KxK kernels (``S = out / channels_per_slice``);
* **steering**: the raw kernel generated at orientation ``g`` is expressed in the frame of ``g``, i.e.
  it is acted on by ``g`` (kit convention: :meth:`kit.groups.Group.act_on_image`, counter-clockwise,
  mirror ``x -> -x`` first);
* **encoder** (the only map that mixes the group axis): group 1x1 conv ``in -> out`` fields;
* **dynamic depthwise aggregation** (involution-like): at every pixel and orientation, each of the
  ``channels_per_slice`` channels of slice ``s`` is filtered with that slice's steered KxK kernel;
  orientations are not mixed.

Why it is equivariant (kit conventions, ``(u.f)(x, h) = f(u^-1 x, u^-1 h)``): the generator and the
encoder are equivariant pointwise maps, so the raw kernels obey ``k'(x, h) = k(u^-1 x, u^-1 h)``.
Steering sets ``K(x, h) = h.k(x, h)``, hence ``K'(x, h) = u.K(u^-1 x, u^-1 h)``, and the output
``y(x, h) = sum_t K(x, h)[t] v(x + t, h)`` picks up ``t -> u^-1 t`` on both factors:
``y'(x, h) = y(u^-1 x, u^-1 h)``. On the pixel grid this is exact for every element of C4 / D4
(rot90 and mirrors permute the KxK taps).

Implementation notes

* The steering is a permutation of the K*K taps per orientation and the generator's last map is
  linear, so the layer steers the *generator's weights* (tiny, ``(S, |G|, K*K, C_hidden)``) instead
  of the generated kernels (``B x S x |G| x K*K x H x W``); the result is identical. The permutation
  comes from :func:`kit.kernels.steering.steering_matrices`, i.e. from the kit's one rotation convention.
* GroupNorm: one group per regular field, normalised over (|G|, H, W) of each sample. Its affine is
  **per field** by default (exactly equivariant whatever the values); ``affine="per_channel"``
  reproduces the official code (one affine pair per field *and* orientation: equivariant only while
  the pairs are equal across orientations, i.e. at initialisation, not after training).
* Only stride 1 and "same" zero padding (``K // 2``), as in the paper.
* Parameters: ``|G| in out`` (encoder) + ``|G| in in/r`` (generator 1x1) + ``2 in/r`` (GroupNorm, per
  field; ``2 |G| in/r`` per channel) + ``(in/r + 1) S K^2`` (generator linear + bias).
* Memory: the aggregation is a loop over the ``K^2`` taps that multiplies each shifted view of the
  zero-padded encoder output by that tap's kernel plane and accumulates in place
  (:func:`kit.kernels.aggregate.dynamic_aggregate`, with its own backward). The official code unfolds the encoder output
  instead (``K^2`` times its size) and multiplies the unfolding by the broadcast kernels (another
  ``K^2`` copies), and autograd keeps the unfolding for the backward. The tap loop materialises
  nothing larger than the padded encoder output and the kernels (which every formulation needs)
  and saves only those two for the backward. It computes the same products and sums (equal to the
  unfold formulation up to float rounding, tested in float64); the generator lays the kernels out
  tap-major so that each tap is read as whole ``H x W`` planes. :func:`kit.kernels.aggregate.dynamic_aggregate_unfold`
  keeps the unfold formulation as a reference (tests, before/after measurements in
  :mod:`kit.measure.complexity`). Measured on one CPU thread against the unfold version: the layer's
  forward+backward 2.6x (K=3, CIFAR stage) and 4.7x (K=5, MNIST-rot) faster; the aggregation keeps
  4-11x less memory for the backward (figures/e4_speed.md).
* **Fused aggregation (CPU).** :func:`kit.kernels.aggregate.dynamic_aggregate` runs a small C++ extension
  (``kit/kernels/csrc/aggregate.cpp``, built once with ``torch.utils.cpp_extension`` into torch's
  extension cache; ``make install`` builds it): one task per (image, slice, orientation) plane, whose
  ``K^2`` kernel planes and channel planes stay in cache while every tap is applied, forward and both
  backward products. The tap loop (:func:`kit.kernels.aggregate.dynamic_aggregate_taps`) stays the reference (tests: equal
  to 1e-12 in float64) and the fallback (GPU tensors, no compiler, ``EQKIT_FUSED=0``).
* **Generator fused into the aggregation (CPU).** The forward calls :func:`kit.kernels.aggregate.generated_aggregate`:
  one C++ operator (``kit/kernels/csrc/e4_fused.cpp``) takes the normalised hidden fields ``z``, the steered
  last map and the encoder output, and per (image, orientation) plane applies the ReLU, generates all
  ``S K^2`` kernel planes and aggregates them while they sit in cache; its backward regenerates them and gives
  the gradients of ``v``, ``z`` (through the ReLU), the generator weights and bias. The
  ``B x S x |G| x K^2 x H x W`` kernels (``S K^2 / out`` = 3.1 times the output at the MNIST widths) are never
  materialised nor saved, nor is the ReLU's output or a layout copy of the hidden fields. Training step of
  ``e4-mnist-normal`` against ``p4-mnist`` (one thread, alternated): 0.36x -> 0.51x with it and the hashed
  dropout (figures/speed.md, session 14). :meth:`generate_kernels` still returns the whole kernels (explorers,
  tests, GPU and ``torch.compile`` paths).
* Cost of the dynamic aggregation: ``out |G| K^2 H W`` MACs per image (:meth:`E4Conv.aggregation_macs`),
  which standard conv FLOP counters do not see.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..fields import FieldType
from ..groups import Group, cyclic
from ..kernels.aggregate import dynamic_aggregate, generated_aggregate, hidden_layout, kernel_layout
from ..kernels.steering import steering_matrices
from .base import EquivariantModule, KernelCache
from .gconv import GroupConv, LiftingConv
from .registry import fields_for, register_family

__all__ = ["E4Conv", "FieldGroupNorm", "AFFINE_MODES"]

AFFINE_MODES = ("per_field", "per_channel", None)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class FieldGroupNorm(EquivariantModule):
    """GroupNorm with one group per regular field: statistics over (|G|, H, W) of each sample.

    Args:
        field_type: regular (or any permutation-representation) spatial fields ``(B, C, D, H, W)``.
        affine: ``"per_field"`` (default; one (gamma, beta) per field, shared over the field axis:
            exactly equivariant for any values), ``"per_channel"`` (one pair per field and
            orientation, as in the official E4 code: *not* equivariant once the pairs differ across
            orientations), or ``None`` (no affine).
        eps: added to the variance.
    """

    def __init__(self, field_type: FieldType, *, affine: str | None = "per_field", eps: float = 1e-5):
        super().__init__()
        if not isinstance(field_type, FieldType) or field_type.rep.perm is None or not field_type.spatial \
                or field_type.is_trivial:
            raise ValueError(f"FieldGroupNorm needs spatial fields of a permutation representation of "
                             f"dimension > 1 (e.g. regular), got {field_type!r}")
        if affine not in AFFINE_MODES:
            raise ValueError(f"affine must be one of {AFFINE_MODES}, got {affine!r}")
        self.in_type = self.out_type = field_type
        self.affine, self.eps = affine, eps
        C, D = field_type.n_fields, field_type.dim
        shape = {"per_field": (C,), "per_channel": (C, D)}.get(affine)
        if shape is None:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        else:
            self.weight = nn.Parameter(torch.ones(shape))
            self.bias = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Normalise ``x``; ``affine``: per-field ``(weight, bias)`` to use instead of the module's own (a caller
        that folds an affine of its own into this one, e.g. :class:`kit.layers.epdo.NeuralEPDOConv`;
        ``per_field`` mode only)."""
        if affine is None:
            return EquivariantModule.forward(self, x)
        if self.affine != "per_field":
            raise ValueError(f"an affine override needs affine='per_field', this norm has {self.affine!r}")
        x = self.in_type.check(x, f"{type(self).__name__} input")
        return F.group_norm(x, self.in_type.n_fields, affine[0], affine[1], self.eps)

    def _forward(self, x):                                                  # (B, C, D, H, W)
        C = self.in_type.n_fields
        if self.affine == "per_channel":                                    # (C*D,) affine on (B, C*D, H, W)
            y = F.group_norm(x.flatten(1, 2), C, self.weight.flatten(), self.bias.flatten(), self.eps)
            return y.unflatten(1, (C, self.in_type.dim))                    # (B, C, D, H, W)
        # (N, C, *) with C groups: each group is one field over (D, H, W); weight/bias (C,) per field
        return F.group_norm(x, C, self.weight, self.bias, self.eps)         # (B, C, D, H, W)

    def extra_repr(self) -> str:
        return f"{self.in_type}, affine={self.affine!r}, eps={self.eps}"


class E4Conv(KernelCache, EquivariantModule):
    """The E4 layer: regular fields in, regular fields out, for C4 / D4 (and their subgroups).

    Args (keyword-only):
        group: ``kit.groups.cyclic(4)`` (p4) or ``dihedral(4)`` (p4m); any group whose elements all
            map the pixel grid onto itself (C1, C2, C4, D1, D2, D4) is accepted.
        in_fields, out_fields: numbers of regular input / output fields.
        kernel_size: odd size K of the generated kernels (3 on CIFAR, 5 on MNIST-rot in the paper).
        reduction: ``r``; the generator's hidden width is ``in_fields / r`` fields.
        channels_per_slice: fields that share one generated kernel (the official ``groups``); the
            number of slices is ``S = out_fields / channels_per_slice``.
        affine: GroupNorm affine, ``"per_field"`` (default, exact) / ``"per_channel"`` (official) /
            ``None``; see :class:`FieldGroupNorm`.
        eps: GroupNorm epsilon.

    Shapes: ``(B, in_fields, |G|, H, W) -> (B, out_fields, |G|, H, W)``.
    """

    def __init__(self, *, group: Group, in_fields: int, out_fields: int, kernel_size: int = 3,
                 reduction: int = 2, channels_per_slice: int = 2, affine: str | None = "per_field",
                 eps: float = 1e-5):
        super().__init__()
        if not isinstance(group, Group):
            raise ValueError(f"group must be a kit.groups.Group (cyclic(4) or dihedral(4)), got {group!r}")
        if not all(group.is_exact_on_grid(g) for g in group.elements):
            raise ValueError(f"E4Conv steers kernels by exact pixel permutations; it needs a group whose "
                             f"elements all map the pixel grid onto itself (C1, C2, C4, D1, D2, D4), "
                             f"got {group.name}")
        for name, v in (("in_fields", in_fields), ("out_fields", out_fields), ("reduction", reduction),
                        ("channels_per_slice", channels_per_slice)):
            _positive_int(name, v)
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 \
                or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int (a centred kernel), got {kernel_size!r}")
        if in_fields % reduction:
            raise ValueError(f"reduction must divide in_fields (hidden width in_fields / reduction), "
                             f"got in_fields={in_fields}, reduction={reduction}")
        if out_fields % channels_per_slice:
            raise ValueError(f"channels_per_slice must divide out_fields (slices = out_fields / "
                             f"channels_per_slice), got out_fields={out_fields}, "
                             f"channels_per_slice={channels_per_slice}")
        self.in_type = FieldType(group, "regular", in_fields)
        self.out_type = FieldType(group, "regular", out_fields)
        self.kernel_size, self.reduction, self.channels_per_slice = kernel_size, reduction, channels_per_slice
        self.hidden = in_fields // reduction
        self.slices = out_fields // channels_per_slice
        KK = kernel_size * kernel_size

        # kernel generator, stage 1: equivariant 1x1 -> GroupNorm (one group per field) -> ReLU
        self.reduce = GroupConv(group=group, in_fields=in_fields, out_fields=self.hidden, kernel_size=1,
                                bias=False)
        self.norm = FieldGroupNorm(self.reduce.out_type, affine=affine, eps=eps)
        # kernel generator, stage 2: one linear map hidden -> S*K*K shared by all orientations (+ bias)
        self.gen_weight = nn.Parameter(torch.empty(self.slices, KK, self.hidden))
        self.gen_bias = nn.Parameter(torch.empty(self.slices, KK))
        bound = 1.0 / math.sqrt(self.hidden)                 # PyTorch's default for a 1x1 conv
        nn.init.uniform_(self.gen_weight, -bound, bound)
        nn.init.uniform_(self.gen_bias, -bound, bound)
        # encoder ("value"): equivariant 1x1, the only map that mixes the group axis
        self.encoder = GroupConv(group=group, in_fields=in_fields, out_fields=out_fields, kernel_size=1,
                                 bias=False)

        # steering: tap permutation of every element, from the kit's steering matrices
        # (S[g] @ vec(k) = vec(g.k)); exact on the grid, so each S[g] is a permutation matrix.
        S = steering_matrices(group, kernel_size)                                   # (G, KK, KK)
        if not bool(((S == 0) | (S == 1)).all() and (S.sum(-1) == 1).all()):      # pragma: no cover
            raise RuntimeError("steering matrices of an on-grid group must be permutations")
        # tap_perm (G, KK): vec(g.k)[p] = vec(k)[tap_perm[g, p]]
        self.register_buffer("tap_perm", S.argmax(-1), persistent=False)

    # ------------------------------------------------------------------------- kernels
    def steered_generator(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Generator weights steered to every orientation: ``(S, |G|, K*K, hidden)`` and ``(S, |G|, K*K)``.

        Row ``[s, g, p]`` produces tap ``p`` of the kernel ``g.k_s`` (cached in eval mode)."""
        def build():
            return self.gen_weight[:, self.tap_perm], self.gen_bias[:, self.tap_perm]
        return self.cached_kernel(build, self.gen_weight, self.gen_bias)

    def generator_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The generator's normalised hidden fields before their ReLU and its steered last map:
        ``z (B, hidden, |G|, H, W)``, ``w (|G|, K*K*S, hidden)``, ``b (|G|, K*K*S, 1)``, rows tap-major; the
        kernels are ``b + w @ hidden_layout(z)`` (:func:`kit.kernels.aggregate.hidden_layout`: the ReLU)."""
        self.in_type.check(x, f"{type(self).__name__}.generate_kernels input")
        z = self.norm(self.reduce(x))                                              # (B, hidden, G, H, W)
        C, G = z.shape[1], z.shape[2]
        w, b = self.steered_generator()                                            # (S, G, KK, hidden), (S, G, KK)
        S, _, KK, _ = w.shape
        w = w.permute(1, 2, 0, 3).reshape(G, KK * S, C)                            # (G, KK*S, hidden)
        b = b.permute(1, 2, 0).reshape(G, KK * S, 1)                               # (G, KK*S, 1)
        return z, w, b

    def generate_kernels(self, x: torch.Tensor) -> torch.Tensor:
        """The steered dynamic kernels ``(B, S, |G|, K*K, H, W)`` for input fields ``x``.

        Returned as a view of a ``(|G|, K*K, S, B, H, W)`` buffer (one batched matmul per group
        element, bias fused): every tap is then a block of whole ``H x W`` planes, the layout the
        tap-loop aggregation reads fastest (an einsum would return pixels-outermost, taps-innermost).
        """
        z, w, b = self.generator_inputs(x)
        k = torch.baddbmm(b, w, hidden_layout(z))                                  # (G, KK*S, B*H*W)
        return kernel_layout(k, self.kernel_size, self.slices, *x.shape[-2:])     # (B, S, G, KK, H, W)

    def _forward(self, x):                                                         # (B, C_in, G, H, W)
        z, w, b = self.generator_inputs(x)                                         # kernels = b + w @ relu(z)
        v = self.encoder(x)                                                        # (B, C_out, G, H, W)
        # CPU: kernels generated and applied one (image, orientation) plane at a time, in cache (the same products)
        return generated_aggregate(v, z, w, b, kernel_size=self.kernel_size)      # (B, C_out, G, H, W)

    def aggregate(self, v: torch.Tensor, kern: torch.Tensor) -> torch.Tensor:
        """The dynamic aggregation step alone (``v`` encoder output, ``kern`` from :meth:`generate_kernels`)."""
        return dynamic_aggregate(v, kern)

    # ------------------------------------------------------------------------- describe
    def aggregation_macs(self, H: int, W: int) -> int:
        """MACs of the dynamic aggregation for one ``H x W`` image (not seen by conv FLOP counters)."""
        return self.out_type.channels * self.kernel_size ** 2 * H * W

    def dynamic_macs(self, H: int, W: int) -> int:
        """The family-protocol hook: the per-pixel aggregation, :meth:`aggregation_macs`."""
        return self.aggregation_macs(H, W)

    def extra_repr(self) -> str:
        return (f"{self.in_type} -> {self.out_type}, kernel_size={self.kernel_size}, reduction={self.reduction}, "
                f"channels_per_slice={self.channels_per_slice} (slices={self.slices}, hidden={self.hidden}), "
                f"affine={self.norm.affine!r}")


# ------------------------------------------------------------------------------ the family registry
@register_family("e4-conv", family="E4-Net", group="C4",
                 description="E4Conv, 16 -> 16 regular fields (r=1, 8 fields/slice)",
                 paper="He et al., Efficient Equivariant Network, NeurIPS 2021")
def _e4_example(*, width, kernel_size):
    G = cyclic(4)
    f = fields_for(width, G.order)
    # the e4-mnist-normal hyper-parameters: reduction 1, 8 fields per generated kernel
    return (E4Conv(group=G, in_fields=f, out_fields=f, kernel_size=kernel_size, reduction=1,
                   channels_per_slice=math.gcd(8, f)),
            LiftingConv(group=G, in_channels=1, out_fields=f, kernel_size=kernel_size))
