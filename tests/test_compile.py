"""``torch.compile`` contract: every registered model is captured whole and matches eager.

* Registry: every model (CI sizes of ``tests/test_models.small``) is captured by dynamo with
  ``fullgraph=True`` (a graph break inside any layer fails) and run through AOTAutograd
  (``backend="aot_eager"``: the functionalised forward and backward graphs inductor receives, without
  its C++ code generation, which costs 30-60 s per model on 2 cores). Eval logits match eager within
  1e-5 relative in float32.
* Inductor (the default backend) on a tiny stack of each family's layers: eval and training (logits
  and every gradient), ``dynamic=False`` and the default, two batch sizes.
* The compiled kernel never goes stale: an optimizer step, ``load_state_dict``, an in-place edit and a
  train/eval switch are all seen by the compiled model (nothing is cached under compile: the steered
  kernel is built inside the graph from the live parameters).

The whole registry under inductor (eval and training) is measured by ``python -m kit bench --compile``
(columns beside eager), outside CI.
"""
import copy

import pytest
import torch

import kit.models as models
from kit.groups import cyclic
from kit.layers import (E4Conv, EquivariantSequential, FieldReLU, GroupBatchNorm, GroupConv, InvariantHead,
                        LieGroupConv, LieLiftingConv, LiftingConv, NeuralEPDOConv, PDOGroupConv,
                        PDOLiftingConv)
from kit.lie import SE2
from test_models import small

ALL = models.list_models()


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _input(card, batch, dtype=torch.float32):
    return torch.rand(batch, *card.input_shape, generator=torch.Generator().manual_seed(batch), dtype=dtype)


@pytest.mark.parametrize("name", ALL)
def test_registry_model_captured_whole_and_matches_eager(name):
    torch._dynamo.reset()
    card = models.model_card(name)
    m = models.calibrate_batchnorm(small(name), _input(card, 8))   # logits that depend on the input
    c = torch.compile(m, backend="aot_eager", fullgraph=True, dynamic=False)
    x = _input(card, 2)
    with torch.no_grad():
        ref, out = m(x), c(x)
    assert (ref[0] - ref[1]).abs().max() > 1e-4, "the two inputs must give different logits"
    assert out.shape == ref.shape and _rel(out, ref) <= 1e-5, (name, _rel(out, ref))


# ------------------------------------------------------------------ tiny stacks, inductor
def _stack(family: str):
    G = cyclic(4)
    if family == "gconv":
        mods = [LiftingConv(group=G, in_channels=1, out_fields=2, kernel_size=3),
                GroupConv(group=G, in_fields=2, out_fields=2, kernel_size=3)]
    elif family == "e4":
        mods = [LiftingConv(group=G, in_channels=1, out_fields=2, kernel_size=3),
                E4Conv(group=G, in_fields=2, out_fields=2, kernel_size=3, reduction=1, channels_per_slice=1)]
    elif family == "pdo":
        mods = [PDOLiftingConv(group=G, in_channels=1, out_fields=2),
                PDOGroupConv(group=G, in_fields=2, out_fields=2)]
    elif family == "nepdo":
        lift = LiftingConv(group=G, in_channels=1, out_fields=2, kernel_size=3)
        mods = [lift, NeuralEPDOConv(in_type=lift.out_type, out_fields=2, g=2, s=1)]
    elif family == "separable":
        grid = SE2(4)
        lift = LieLiftingConv(grid=grid, in_channels=1, out_fields=2, kernel_size=5)
        mods = [lift, LieGroupConv(grid=grid, in_fields=2, out_fields=2, kernel_size=5, variant="separable")]
    else:  # pragma: no cover
        raise KeyError(family)
    t = mods[-1].out_type
    mods += [GroupBatchNorm(t), FieldReLU(t), InvariantHead(t, 3)]
    return EquivariantSequential(*mods)


FAMILIES = ["gconv", "e4", "pdo", "nepdo", "separable"]


@pytest.mark.parametrize("dynamic", [None, False], ids=["default", "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_inductor_tiny_stack_eval_and_training(family, dynamic):
    torch._dynamo.reset()
    eager = _stack(family)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)
    for batch in (2, 3):
        x = torch.rand(batch, 1, 12, 12, generator=torch.Generator().manual_seed(batch))
        eager.train(), model.train()
        ref, out = eager(x), compiled(x)
        assert _rel(out, ref) <= 1e-5, (family, batch, "train logits", _rel(out, ref))
        ref.square().sum().backward()
        out.square().sum().backward()
        # every gradient, as one vector (a bias before batch norm has a zero gradient: round-off only)
        g_ref = torch.cat([p.grad.flatten() for p in eager.parameters()])
        g_out = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert _rel(g_out, g_ref) <= 1e-5, (family, batch, "gradients", _rel(g_out, g_ref))
        eager.zero_grad(set_to_none=True), model.zero_grad(set_to_none=True)
        if dynamic is None and batch == 3:
            continue                     # default settings: eval compiled once (CI budget), train twice
        eager.eval(), model.eval()
        with torch.no_grad():
            ref, out = eager(x), compiled(x)
        assert _rel(out, ref) <= 1e-5, (family, batch, "eval logits", _rel(out, ref))


@pytest.mark.parametrize("family", ["gconv", "e4"])
def test_compiled_model_never_reads_a_stale_kernel(family):
    torch._dynamo.reset()
    eager = _stack(family).eval()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    x = torch.rand(2, 1, 12, 12)

    def agree(what):
        with torch.no_grad():
            ref, out = eager(x), compiled(x)
        assert _rel(out, ref) <= 1e-5, (family, what, _rel(out, ref))
        return out

    y0 = agree("initial")
    # an optimizer step on both copies (training step in train mode, then back to eval)
    for m in (eager, model):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m.train()
        m(x).square().mean().backward()
        opt.step()
        m.eval()
    y1 = agree("after an optimizer step")
    assert _rel(y1, y0) > 1e-3, "the step must change the logits for this test to mean anything"
    # load_state_dict with other weights
    other = _stack(family).eval()
    eager.load_state_dict(other.state_dict())
    model.load_state_dict(other.state_dict())
    y2 = agree("after load_state_dict")
    assert _rel(y2, y1) > 1e-3
    # an in-place edit under no_grad
    with torch.no_grad():
        for m in (eager, model):
            next(m.parameters()).mul_(2.0)
    agree("after an in-place edit")
    # a mode switch: train-mode batch statistics, then eval again
    eager.train(), model.train()
    with torch.no_grad():
        assert _rel(compiled(x), eager(x)) <= 1e-5
    eager.eval(), model.eval()
    agree("after train -> eval")


def test_bench_compiled_columns():
    """``python -m kit bench --compile``: the compiled measurement of a tiny stack (alternated speed-ups,
    compile times, the compiled output against eager) and its table."""
    from kit.measure.bench import compiled_markdown, compiled_throughput
    m = _stack("gconv")
    c = compiled_throughput(m, torch.rand(4, 1, 12, 12), repeats=3, warmup=1)
    assert c["fwd_speedup"] > 0 and c["train_speedup"] > 0 and c["compile_fwd_s"] > 0
    assert c["rel_diff"] <= 1e-5
    md = compiled_markdown([{"name": "tiny", "compiled": c}])
    assert md.startswith("| entry | fwd speed-up") and "| tiny |" in md
    assert compiled_markdown([{"name": "x"}]) == ""


def test_each_layer_class_compiles_once_without_recompiles():
    """A model compiled layer by layer: every EquivariantModule subclass has a forward code object of its
    own, so dynamo compiles each layer class once, with no recompile (error_on_recompile) and no fallback
    to eager at the recompile limit (8), however many layer types there are (every family's lift and
    layer, and the field-wise pieces: more than 8 classes)."""
    import torch._dynamo
    from kit.layers.base import GroupPool, SpatialPool
    from kit.layers.registry import families
    x = torch.rand(2, 1, 12, 12)
    runs = {}                                                   # one instance of every class, with its input
    with torch.no_grad():
        for fam in families():
            layer, lift = fam.layer(width=16, kernel_size=3)
            lift, layer = lift.eval(), layer.eval()
            h = lift(x)
            runs.setdefault(type(lift), (lift, x))
            runs.setdefault(type(layer), (layer, h))
        lift = families()[0].layer(width=16, kernel_size=3)[1].eval()
        h = lift(x)
        for m in (GroupBatchNorm(lift.out_type).eval(), FieldReLU(lift.out_type), SpatialPool(lift.out_type, kernel=2),
                  GroupPool(lift.out_type)):
            runs.setdefault(type(m), (m, h))
    assert len(runs) > 8 and len({id(c.forward.__code__) for c in runs}) == len(runs)   # a code object per class
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
            for _ in range(2):                                               # the second pass hits the caches
                for m, inp in runs.values():
                    torch.compile(m, backend="eager")(inp)
    finally:
        torch._dynamo.reset()
