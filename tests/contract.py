"""The layer contract every registered family example must keep (kit.layers.registry), as functions
that tests/test_families.py runs over the registry and that a family's own tests may call.

* types: the layer maps its ``in_type`` to its ``out_type`` (shapes checked by the field types);
* equivariance: in float64, ``lift -> ReLU -> layer`` commutes with every grid-exact element of the
  group to 1e-9 (families registered ``exact=False`` are skipped);
* gradients: a training step reaches every parameter;
* kernel caches never go stale: cached in eval mode without gradient, the cache follows in-place
  parameter edits (an optimiser step), ``load_state_dict``, dtype changes and ``.train()``; eval mode
  with gradient builds a differentiable kernel and caches nothing;
* cost: :func:`kit.measure.complexity.count_macs` counts the layer (static MACs > 0) and adds exactly what
  its ``dynamic_macs`` hook declares.
"""
from __future__ import annotations

import copy

import torch

from kit.measure import complexity
from kit.equivariance import check
from kit.layers import KernelCache
from kit.layers.registry import Family, example_block

WIDTH, KERNEL, SIZE = 16, 3, 12


def build(fam: Family, *, dtype=torch.float64):
    layer, lift = fam.layer(width=WIDTH, kernel_size=KERNEL)
    return layer.to(dtype), lift.to(dtype)


def layer_input(lift, *, batch: int = 2, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """A field of the layer's input type: the lift applied to smooth random images, then a ReLU."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(batch, *lift.in_type.shape(SIZE, SIZE), generator=g, dtype=dtype)
    with torch.no_grad():
        return lift.eval()(img).relu()


def check_types_and_equivariance(fam: Family) -> float:
    layer, lift = build(fam)
    x = layer_input(lift)
    y = layer.eval()(x)
    assert tuple(y.shape) == (2, *layer.out_type.shape(*x.shape[-2:])), (fam.name, tuple(y.shape))
    block = example_block(layer, lift).eval()
    G = lift.in_type.group
    exact = [g for g in G.elements if G.is_exact_on_grid(g)]
    img = torch.rand(2, *lift.in_type.shape(SIZE, SIZE), generator=torch.Generator().manual_seed(1),
                     dtype=torch.float64)
    err = max(r.error for r in check(block, exact, x=img))
    if fam.exact:
        assert err <= 1e-9, (fam.name, err)
    return err


def check_gradients(fam: Family) -> None:
    layer, lift = build(fam)
    x = layer_input(lift)
    layer.train()(x).square().mean().backward()
    missing = [n for n, p in layer.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing, (fam.name, missing)


def _caches(m) -> list:
    return [mod for mod in m.modules() if isinstance(mod, KernelCache)]


def _fresh(m):
    f = copy.deepcopy(m)
    for mod in _caches(f):
        mod._kernel_cache = None
    return f


def check_cache_never_stale(fam: Family) -> bool:
    """The cache contract; returns whether the layer caches anything at all."""
    layer, lift = build(fam)
    x = layer_input(lift)
    layer.eval()
    with torch.no_grad():
        y0 = layer(x)
        assert torch.equal(layer(x), y0), fam.name                          # deterministic, cached or not
        cached = any(mod._kernel_cache is not None for mod in _caches(layer))
        state = copy.deepcopy(layer.state_dict())
        for p in layer.parameters():                                         # an optimiser step, in place
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2), dtype=p.dtype))
        y1 = layer(x)
        assert not torch.allclose(y1, y0), fam.name
        assert torch.equal(y1, _fresh(layer)(x)), fam.name
        layer.load_state_dict(state)                                         # copies in place -> seen
        assert torch.equal(layer(x), y0), fam.name
    layer.train()
    assert all(mod._kernel_cache is None for mod in _caches(layer)), fam.name
    layer.eval()(x).sum().backward()                                         # eval with grad: not cached
    assert all(mod._kernel_cache is None for mod in _caches(layer)), fam.name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters()), fam.name
    layer.float()                                                            # a dtype change drops it
    with torch.no_grad():
        y32 = layer(x.float())
    assert y32.dtype == torch.float32 and torch.allclose(y32.double(), y0, rtol=1e-4, atol=1e-4), fam.name
    return cached


def check_cost(fam: Family) -> complexity.Cost:
    layer, lift = build(fam, dtype=torch.float32)
    shape = tuple(layer_input(lift, dtype=torch.float32).shape[1:])
    cost = complexity.count_macs(layer, shape)
    assert cost.macs_counted > 0, fam.name
    declared = layer.dynamic_macs(*layer(layer_input(lift, dtype=torch.float32)).shape[-2:])
    assert cost.macs_dynamic == declared, (fam.name, cost.macs_dynamic, declared)
    return cost


def check_all(fam: Family) -> None:
    check_types_and_equivariance(fam)
    check_gradients(fam)
    check_cache_never_stale(fam)
    check_cost(fam)
