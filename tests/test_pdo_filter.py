"""The Neural-ePDO per-pixel PDO filter (:mod:`kit.kernels.pdo_filter`) and the CPU 1x1 convolution
(:func:`kit.layers.base.conv1x1`), the two speed paths of issue 15, against their references:

* the fused C++ filter equals the plain-PyTorch reference in float64 to 1e-12 (output and both
  gradients; fd, gauss, rbffd and a dense custom bank; odd sizes, one partition, 1x1 maps), passes
  gradcheck, and is what the layer runs on the CPU;
* a Neural ePDO layer's output and every parameter gradient are the same through either path;
* its training step at the benchmark size keeps at most half the reference's peak memory;
* ``conv1x1`` is ``F.conv2d`` (groups, bias, small and large maps, strided inputs);
* the generator's GEMM fused into the filter a chunk of images at a time (``generated_pdo_filter``, maps of
  >= 196 pixels) is generate-then-filter in float64 (output, every gradient; uneven chunks, generator groups,
  one bank per component), what the layer runs there and keeps less memory; compiled, the unfused form;
* the generator in the untwisted frame (wide layers on regular fields: isotypic blocks and one rotated stencil
  bank per component) is the same layer as the dense generator in float64 (output, every gradient), exactly
  equivariant, never stale in eval mode, and captured whole by ``torch.compile``; float64 layers use the exact
  float64 basis and stencils.
"""

import pytest
import torch
import torch.nn.functional as F

from kit.fields import FieldType
from kit.groups import cyclic, dihedral
from kit.kernels import pdo_filter as PF
from kit.layers import epdo as E
from kit.layers.base import POINTWISE_MATMUL_MIN_PIXELS, conv1x1
from kit.measure.timing import peak_memory
from fused_helpers import built_or_skip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fused():
    return built_or_skip(PF.fused_pdo_extension(), "PDO filter")


def _banks():
    g = torch.Generator().manual_seed(3)
    dense = torch.randn(15, 25, generator=g, dtype=torch.float64)
    dense[dense.abs() < 0.3] = 0.0                                   # a few exact zeros, a few empty taps
    dense[:, 7] = 0.0
    return {m: E.pdo_stencil_matrix(m)[0] for m in E.METHODS} | {"custom": dense}


SHAPES = [(2, 3, 2, 4, 7, 9), (1, 1, 1, 2, 1, 1), (3, 2, 4, 3, 5, 4), (1, 4, 2, 8, 14, 14)]


@pytest.mark.parametrize("bank", ["fd", "gauss", "rbffd", "custom"])
def test_fused_filter_equals_the_reference_in_float64(fused, bank):
    S = _banks()[bank]
    g = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        B, P, J, D, H, W = shape
        v = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
        c = torch.randn(B, J, D, 15, H, W, generator=g, dtype=torch.float64, requires_grad=True)
        y, y0 = PF.pdo_filter(v, c, S, 0.01), PF.pdo_filter_reference(v, c, S, 0.01)
        assert "pdo_filter" in type(y.grad_fn).__name__.lower() or y.grad_fn.name().startswith("eqkit"), y.grad_fn
        w = torch.randn(y.shape, generator=g, dtype=torch.float64)
        gr = torch.autograd.grad((y * w).sum(), (v, c))
        gr0 = torch.autograd.grad((y0 * w).sum(), (v, c))
        rel = lambda a, b: float((a - b).detach().norm() / b.detach().norm())
        assert rel(y, y0) < 1e-12, (bank, shape)
        assert rel(gr[0], gr0[0]) < 1e-12 and rel(gr[1], gr0[1]) < 1e-12, (bank, shape)
        yf, yf0 = PF.pdo_filter(v.float(), c.float(), S, 0.01), PF.pdo_filter_reference(v.float(), c.float(), S, 0.01)
        torch.testing.assert_close(yf, yf0, rtol=1e-5, atol=1e-6)


def test_fused_filter_gradcheck(fused):
    S = _banks()["fd"]
    g = torch.Generator().manual_seed(1)
    v = torch.randn(1, 2, 2, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(1, 2, 2, 15, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, c: PF.pdo_filter(v, c, S, 0.01), (v, c))


def test_bad_shapes_are_named():
    S = _banks()["fd"]
    with pytest.raises(ValueError, match=r"v \(B, P, g, d, H, W\), coef \(B, g, d, A, H, W\)"):
        PF.pdo_filter(torch.zeros(1, 2, 2, 3, 4, 4), torch.zeros(1, 2, 3, 14, 4, 4), S, 0.01)


def _layer():
    G = cyclic(8)
    nl = E.NeuralEPDOConv(in_type=FieldType(G, "regular", 4), out_fields=3, g=2, s=2, method="fd").double()
    with torch.no_grad():
        for p in nl.parameters():
            p.add_(0.3 * torch.randn_like(p))                  # away from init: no symmetric accident
    return nl


def test_layer_through_either_path_is_the_same(fused, monkeypatch):
    nl = _layer()
    x = torch.randn(2, 4, 8, 11, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    outs = []
    for f in (PF.pdo_filter, PF.pdo_filter_reference):
        monkeypatch.setattr(E, "pdo_filter", f)
        nl.zero_grad()
        y = nl(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)).sum().backward()
        outs.append((y.detach(), [p.grad.clone() for p in nl.parameters()]))
    (y, g), (y0, g0) = outs
    assert float((y - y0).norm() / y0.norm()) < 1e-12
    assert all(float((a - b).norm() / b.norm()) < 1e-12 for a, b in zip(g, g0))


def test_layer_training_memory_is_at_most_half_the_reference(fused):
    """At the benchmark's size (16 images, 4 C16 fields = 64 channels, 28 x 28): the reference keeps the
    coefficients, the stencils (25/15 the coefficients), their sign and the normalised output; the fused path
    keeps none of them (the generator runs inside the filter, chunk by chunk)."""
    from kit.kernels import reference_kernels
    G = cyclic(16)
    nl = E.NeuralEPDOConv(in_type=FieldType(G, "regular", 4), out_fields=4, g=4, s=4, method="fd")
    x = torch.randn(16, 4, 16, 28, 28)

    def step():
        nl.zero_grad(set_to_none=True)
        nl(x).square().mean().backward()
    step()
    peaks = {"fused": peak_memory(step)}
    with reference_kernels():
        step()
        peaks["reference"] = peak_memory(step)
    assert peaks["fused"] <= 0.5 * peaks["reference"], peaks


@pytest.mark.parametrize("size,groups,bias", [(28, 1, False), (14, 2, True), (7, 1, True), (12, 4, False)])
def test_conv1x1_is_conv2d(size, groups, bias):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 16, size, size + 1, generator=g, dtype=torch.float64).transpose(-1, -2)  # strided
    w = torch.randn(24, 16 // groups, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, generator=g, dtype=torch.float64) if bias else None
    x.requires_grad_()
    y, y0 = conv1x1(x, w, b, groups=groups), F.conv2d(x, w, b, groups=groups)
    assert y.shape == y0.shape
    torch.testing.assert_close(y, y0, rtol=1e-12, atol=1e-12)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    for a, r in zip(torch.autograd.grad(y, (x, w), gy), torch.autograd.grad(y0, (x, w), gy)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    matmul = size * (size + 1) >= POINTWISE_MATMUL_MIN_PIXELS
    if b is None:                                            # the matmul on large maps, oneDNN on small ones
        assert ("Convolution" in type(y.grad_fn).__name__) != matmul, type(y.grad_fn).__name__


def test_the_custom_operator_passes_opcheck(fused):
    """``eqkit::pdo_filter`` (what torch.compile captures): schema, fake kernel and autograd formula."""
    S = _banks()["gauss"]
    g = torch.Generator().manual_seed(5)
    v = torch.randn(2, 2, 2, 3, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 2, 3, 15, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    PF.pdo_filter(v, c, S, 0.01)                                   # defines the operator
    torch.library.opcheck(torch.ops.eqkit.pdo_filter.default, (v, c, S, 0.01))


@pytest.mark.parametrize("side", [10, int(E.GENERATED_MIN_PIXELS ** 0.5) + 1], ids=["small", "large"])
def test_compiled_layer_runs_the_same_kernel(fused, side):
    """Captured whole (fullgraph) through the custom operator: the compiled layer's output and gradients
    are the eager ones to float32 round-off of the 1x1 maps around it, not of a different formulation. On
    large maps (eager: the generator inside the filter, chunk by chunk) the compiled layer generates the
    coefficients whole, then runs the same custom operator."""
    torch._dynamo.reset()
    nl = _layer().float()
    x = torch.randn(2, 4, 8, side + 1, side, generator=torch.Generator().manual_seed(6))
    c = torch.compile(nl, backend="aot_eager", fullgraph=True, dynamic=False)
    y, yc = nl(x), c(x)
    assert float((yc - y).norm() / y.norm()) < 1e-6
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    ge = torch.autograd.grad(y, list(nl.parameters()), gy)
    gc = torch.autograd.grad(yc, list(nl.parameters()), gy)
    assert all(float((a - b).norm() / b.norm()) < 1e-5 for a, b in zip(gc, ge))


def test_reference_kernels_runs_every_reference_path_and_gives_the_same_model(fused, monkeypatch):
    """``kit.kernels.reference_kernels()`` (what ``python -m kit bench --speedup`` measures against)
    routes the Neural-ePDO filter, E4's aggregation and 1x1 convs (dense, not in the isotypic bases) to
    their plain-PyTorch references
    (the fused kernels are never called inside it), the models' outputs stay the same in float64,
    and the previous setting comes back on exit, also after an exception."""
    import kit.models as M
    from kit import _compat
    from kit.kernels import aggregate as A
    from kit.kernels import reference_kernels
    torch.manual_seed(0)
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    nets = [M.create(n).double().eval() for n in ("nepdo-mnist-regular-fd-small", "e4-mnist-normal",
                                                   "nepdo-mnist-regular-fd")]     # paper width: isotypic 1x1s
    fast = [m(x) for m in nets]

    def refuse(*a, **k):
        raise AssertionError("a fused kernel ran inside reference_kernels()")
    monkeypatch.setattr(A._FusedAggregation, "apply", refuse)
    monkeypatch.setattr(A._GeneratedAggregation, "apply", refuse)
    monkeypatch.setattr(PF._GeneratedPDOFilter, "apply", refuse)
    monkeypatch.setattr(PF, "fused_op", lambda: type("Op", (), {"__call__": refuse})())
    from kit.kernels import isotypic
    assert any(m.uses_isotypic(torch.zeros(1, m.in_type.n_fields, m.in_type.dim, 14, 14))
               for m in nets[2].modules() if isinstance(m, E.EquivariantConv1x1))   # the model has wide maps
    monkeypatch.setattr(isotypic, "isotypic_conv1x1", refuse)
    with reference_kernels():
        assert _compat.REFERENCE_KERNELS
        slow = [m(x) for m in nets]
    assert not _compat.REFERENCE_KERNELS
    for f, s in zip(fast, slow):
        assert (f - s).abs().max().item() <= 1e-12 * f.abs().max().item()
    with pytest.raises(ZeroDivisionError), reference_kernels():
        1 / 0
    assert not _compat.REFERENCE_KERNELS
    for m in nets:                                                     # the guard itself bites outside
        with pytest.raises(AssertionError, match="fused kernel ran"):
            m(x)
    import types
    from kit.layers import base
    calls = []
    monkeypatch.setattr(base, "F", types.SimpleNamespace(conv2d=lambda *a, **k: calls.append(1) or F.conv2d(*a, **k)))
    h, w = torch.randn(2, 6, 28, 28), torch.randn(4, 6, 1, 1)
    y = conv1x1(h, w)                                                  # the matmul path
    with reference_kernels():
        assert torch.allclose(conv1x1(h, w), y, atol=1e-5)              # oneDNN
    assert len(calls) == 1


# ------------------------------------------------ the generator in the untwisted frame (regular fields)
def test_filter_with_one_bank_per_component_equals_the_reference(fused):
    """``pdo_filter`` with ``S (d, A, T)`` (component ``c`` builds its stencils with ``S[c]``): fused vs plain
    PyTorch, float64, output and both gradients."""
    gen = torch.Generator().manual_seed(11)
    v = torch.randn(2, 3, 2, 4, 9, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    coef = torch.randn(2, 2, 4, 15, 9, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    S = torch.randn(4, 15, 25, generator=gen, dtype=torch.float64)
    S[1, :, 3] = 0.0                                                    # a tap empty in one bank only
    y = PF.pdo_filter(v, coef, S, 0.01)
    y0 = PF.pdo_filter_reference(v, coef, S, 0.01)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    for a, b in ((y, y0), *zip(torch.autograd.grad(y, (v, coef), gy), torch.autograd.grad(y0, (v, coef), gy))):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()
    with pytest.raises(ValueError, match="one bank"):
        PF.pdo_filter(v, coef, S[:3], 0.01)


def _wide_nepdo(G, z, s, method, kind="regular", reduction=1):
    from kit.reps import field_rep
    torch.manual_seed(0)
    kw = {"stencil_kw": {"normalize": False}} if method == "gauss" else {}
    return E.NeuralEPDOConv(in_type=FieldType(G, field_rep(G, kind), z), out_fields=z, g=4, s=s,
                            reduction=reduction, method=method, **kw)


@pytest.mark.parametrize("G,z,s,method,kind,r", [(cyclic(16), 24, 1, "gauss", "regular", 1),
                                                  (cyclic(16), 48, 2, "fd", "regular", 1),
                                                  (dihedral(16), 12, 1, "fd", "regular", 1),
                                                  (cyclic(16), 40, 1, "gauss", "quotient", 2)], ids=str)
def test_untwisted_generator_is_the_same_layer(fused, G, z, s, method, kind, r):
    """A wide Neural ePDO generates its coefficients in the untwisted frame (isotypic blocks, rotated banks; the
    quotient type's 4 extra components densely); output and every gradient equal the dense generator's
    (``reference_kernels()``) in float64 to 1e-12, and the layer is exactly equivariant at the grid elements."""
    from kit.equivariance import check, max_error
    from kit.kernels import reference_kernels
    nl = _wide_nepdo(G, z, s, method, kind, r).double()
    d = nl.in_type.dim
    x = torch.randn(2, z, d, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2),
                    requires_grad=True)
    assert nl.uses_untwisted_generator(x)
    y = nl(x)
    gy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    params = [x] + list(nl.parameters())
    g1 = torch.autograd.grad(y, params, gy)
    with reference_kernels():
        assert not nl.uses_untwisted_generator(x)
        y0 = nl(x)
        g0 = torch.autograd.grad(y0, params, gy)
    for a, b in ((y, y0), *zip(g1, g0)):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()
    els = [g for g in G.elements if G.is_exact_on_grid(g)]
    xs = torch.randn(1, z, d, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert max_error(check(nl.eval(), els, xs)) <= 1e-12


def test_untwisted_generator_needs_a_regular_summand_and_its_banks_rotate_the_stencils():
    import kit.reps as R
    from kit.reps import coefficient_rep, field_rep
    S, skey = E.pdo_stencil_matrix("fd")
    u = E.untwisted_generator(field_rep(cyclic(16), "regular"), S, skey)
    assert u is not None and u.plan.slots == (8, 2, 2)
    Dc = coefficient_rep(cyclic(16)).matrices.double()
    assert torch.allclose(u.banks, Dc.transpose(1, 2) @ S, atol=1e-14)
    assert torch.allclose(u.banks[0], S, atol=1e-14)                   # element 0 is the identity
    q = E.untwisted_generator(field_rep(cyclic(16), "quotient"), S, skey)   # regular (+) quotient_4
    assert q is not None and (len(q.reg), len(q.rest)) == (240, 60) and torch.equal(q.banks[16:], S.expand(4, 15, 25))
    assert E.untwisted_generator(R.quotient_rep(cyclic(16), 4), S, skey) is None      # no regular summand
    nl = _wide_nepdo(cyclic(16), 8, 4, "fd")                            # narrow: the dense generator
    assert not nl.uses_untwisted_generator(torch.zeros(1, 8, 16, 3, 3))


def test_untwisted_generator_cache_never_stale(fused):
    nl = _wide_nepdo(cyclic(16), 24, 1, "fd").eval()
    x = torch.randn(1, 24, 16, 5, 5, generator=torch.Generator().manual_seed(5))
    assert nl.uses_untwisted_generator(x)
    with torch.no_grad():
        y1 = nl(x)
        nl.gen_weight.mul_(-1.5)                                        # in place: the cache must see it
        y2 = nl(x)
        from kit.kernels import reference_kernels
        with reference_kernels():
            y2_ref = nl(x)
    assert not torch.allclose(y1, y2)
    assert ((y2 - y2_ref).norm() / y2_ref.norm()) <= 1e-5


def test_float64_runs_use_the_exact_basis():
    """float32 layers read the float32 buffers; float64 layers the float64 originals (so the dense and the
    untwisted generators are one float64 operator, not two roundings of it)."""
    from kit.reps import field_rep
    nl = _wide_nepdo(cyclic(16), 8, 4, "fd")
    S, skey = E.pdo_stencil_matrix("fd")
    exact = E.generator_basis(field_rep(cyclic(16), "regular"), S, skey)
    assert torch.equal(nl._buffer("gen_basis"), exact.float())
    nl.double()
    assert torch.equal(nl._buffer("gen_basis"), exact) and torch.equal(nl._buffer("stencils"), S)


def test_compiled_untwisted_layer_is_captured_whole_and_matches_eager(fused):
    torch._dynamo.reset()
    nl = _wide_nepdo(cyclic(16), 24, 1, "gauss")
    x = torch.randn(2, 24, 16, 6, 6, generator=torch.Generator().manual_seed(8))
    assert nl.uses_untwisted_generator(x)
    c = torch.compile(nl, backend="aot_eager", fullgraph=True, dynamic=False)
    y, yc = nl(x), c(x)
    assert float((yc - y).norm() / y.norm()) <= 1e-5
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
    ge = torch.autograd.grad(y, list(nl.parameters()), gy)
    gc = torch.autograd.grad(yc, list(nl.parameters()), gy)
    assert all(float((a - b).norm() / b.norm()) <= 1e-5 for a, b in zip(gc, ge))


def test_group_norm_affine_override_is_the_folded_affine():
    """``FieldGroupNorm(x, affine=(w, b))`` (how the Neural ePDO folds its extra affine into the norm's):
    ``s (w n + b) + t`` equals the norm with ``(s w, s b + t)``; only the per-field mode takes an override."""
    from kit.layers.e4 import FieldGroupNorm
    t = FieldType(cyclic(4), "regular", 3)
    gn = FieldGroupNorm(t).double()
    with torch.no_grad():
        gn.weight.normal_(), gn.bias.normal_()
    s, sh = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    x = torch.randn(2, 3, 4, 5, 5, dtype=torch.float64)
    two_steps = gn(x) * s[:, None, None, None] + sh[:, None, None, None]
    assert torch.allclose(gn(x, (gn.weight * s, gn.bias * s + sh)), two_steps, atol=1e-12)
    with pytest.raises(ValueError, match="per_field"):
        FieldGroupNorm(t, affine="per_channel")(x.float(), (s.float(), sh.float()))


# ------------------------------------------------ the generator's GEMM fused into the filter (large maps)
def _generated_case(s, bank, g=3, dtype=torch.float64):
    gen = torch.Generator().manual_seed(11 + s)
    B, P, J, D, H, W, ci = 5, 2, 4, 3, 6, 7, 3
    S = _banks()[bank] if bank != "per-component" else torch.randn(D, 15, 25, generator=gen, dtype=torch.float64)
    v = torch.randn(B, P, J, D, H, W, generator=gen, dtype=dtype, requires_grad=True)
    h = torch.randn(B, s * ci, H, W, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(s, J * D * 15 // s, ci, generator=gen, dtype=dtype, requires_grad=True)
    return v, h, w, S


@pytest.mark.parametrize("s,bank", [(1, "gauss"), (2, "fd"), (4, "custom"), (1, "per-component")])
def test_generated_filter_is_generate_then_filter_in_float64(fused, s, bank):
    """``generated_pdo_filter`` (chunks of one, two (uneven: 5 images) and all images) equals the 1x1 generator
    followed by the reference filter: output and the gradients of v, h and the generator weight to 1e-12."""
    v, h, w, S = _generated_case(s, bank)
    B, P, J, D, H, W = v.shape
    coef = conv1x1(h, w.reshape(-1, w.shape[2], 1, 1), groups=s).view(B, J, D, 15, H, W)
    y0 = PF.pdo_filter_reference(v, coef, S, 0.01)
    gy = torch.randn(y0.shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    g0 = torch.autograd.grad(y0, (v, h, w), gy)
    per_image = w.shape[0] * w.shape[1] * H * W * 8
    for chunk in (1, 2 * per_image, 10 ** 9):
        y = PF.generated_pdo_filter(v, h, w, S, 0.01, chunk_bytes=chunk)
        assert type(y.grad_fn).__name__.startswith("_GeneratedPDOFilter")
        g1 = torch.autograd.grad(y, (v, h, w), gy)
        for a, b in ((y, y0), *zip(g1, g0)):
            assert (a - b).abs().max() <= 1e-12 * b.abs().max(), (chunk, s, bank)


def test_generated_filter_gradcheck_and_only_the_needed_gradients(fused):
    v, h, w, S = _generated_case(2, "fd")
    v, h, w = v[:2, :, :, :, :3, :4].detach(), h[:2, :, :3, :4].detach(), w.detach()
    for need in ((True, True, True), (False, True, False), (True, False, True)):
        args = [t.clone().requires_grad_(r) for t, r in zip((v, h, w), need)]
        assert torch.autograd.gradcheck(lambda *a: PF.generated_pdo_filter(*a, S, 0.01, chunk_bytes=1), args)


def test_generated_filter_names_bad_shapes():
    v, h, w, S = _generated_case(2, "fd")
    with pytest.raises(ValueError, match=r"h \(B, s ci, H, W\) and w \(s, R, ci\)"):
        PF.generated_pdo_filter(v, h[:, :5], w, S, 0.01)
    with pytest.raises(ValueError, match=r"s R = g d A"):
        PF.generated_pdo_filter(v, h, w[:, :-1], S, 0.01)


def test_layer_on_large_maps_runs_the_generator_inside_the_filter(fused, monkeypatch):
    """From ``GENERATED_MIN_PIXELS`` on, the layer's coefficients are generated inside the filter (and never as a
    whole tensor); the layer is the same float64 operator as under ``reference_kernels()`` (output, every
    parameter gradient, the input's), and stays exactly equivariant."""
    from kit.equivariance import check, max_error
    from kit.kernels import reference_kernels
    nl = _layer()
    side = int(E.GENERATED_MIN_PIXELS ** 0.5) + 1
    x = torch.randn(3, 4, 8, side, side - 1, dtype=torch.float64, generator=torch.Generator().manual_seed(13),
                    requires_grad=True)
    calls = []
    real = PF._GeneratedPDOFilter.apply
    monkeypatch.setattr(PF._GeneratedPDOFilter, "apply", lambda *a: calls.append(1) or real(*a))
    y = nl(x)
    assert calls == [1]
    gy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    params = [x] + list(nl.parameters())
    g1 = torch.autograd.grad(y, params, gy)
    with reference_kernels():
        y0 = nl(x)
        g0 = torch.autograd.grad(y0, params, gy)
    assert calls == [1]
    for a, b in ((y, y0), *zip(g1, g0)):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()
    small = torch.randn(1, 4, 8, 9, 9, dtype=torch.float64)
    nl(small)
    assert calls == [1]                                                  # small maps: generate, then filter
    els = [g for g in nl.in_type.group.elements if nl.in_type.group.is_exact_on_grid(g)]
    xs = torch.randn(1, 4, 8, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    assert max_error(check(nl.eval(), els, xs)) <= 1e-12


def test_generated_filter_keeps_less_than_generate_then_filter(fused, monkeypatch):
    """The layer's training step at the quotient model's first Neural-ePDO size (12 fields of d = 20, reduction
    2, 28 x 28, 8 images): generating inside the filter keeps neither the coefficients (1200 per pixel) nor
    their gradient; the peak drops by at least the coefficients' size."""
    from kit.reps import field_rep
    G = cyclic(16)
    nl = E.NeuralEPDOConv(in_type=FieldType(G, field_rep(G, "quotient"), 12), out_fields=16, g=4, s=1, reduction=2,
                          method="gauss")
    x = torch.randn(8, 12, 20, 28, 28)

    def step():
        nl.zero_grad(set_to_none=True)
        nl(x).square().mean().backward()
    peaks = {}
    for name, pixels in (("generated", E.GENERATED_MIN_PIXELS), ("whole", 10 ** 9)):
        monkeypatch.setattr(E, "GENERATED_MIN_PIXELS", pixels)
        step()
        peaks[name] = peak_memory(step)
    coefficients = 8 * 4 * 20 * 15 * 28 * 28 * 4                           # bytes (float32)
    assert peaks["generated"] <= peaks["whole"] - coefficients, (peaks, coefficients)
