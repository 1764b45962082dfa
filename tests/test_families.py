"""The layer contract over the family registry (kit.layers.registry), and the proof that the registry
is the only place a new family has to be named: a toy family registered from a temporary module is
measured by the benchmark, counted by the cost counter and passes the same contract, with no other
file touched."""
import importlib
import sys
import textwrap

import pytest
import torch

from contract import check_cache_never_stale, check_cost, check_gradients, check_types_and_equivariance
from kit.measure import bench, complexity
from kit.layers import registry

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = [f.name for f in registry.families()]


def test_every_layer_file_registers_its_family():
    assert {f.module.rsplit(".", 1)[-1] for f in registry.families()} == {"gconv", "e4", "pdo", "epdo", "separable"}
    assert set(FAMILIES) <= set(bench.list_entries(kind="layer"))


@pytest.mark.parametrize("name", FAMILIES)
def test_types_and_float64_equivariance(name):
    err = check_types_and_equivariance(registry.family(name))
    assert err <= 1e-9


@pytest.mark.parametrize("name", FAMILIES)
def test_gradients_reach_every_parameter(name):
    check_gradients(registry.family(name))


@pytest.mark.parametrize("name", FAMILIES)
def test_kernel_cache_never_stale(name):
    assert check_cache_never_stale(registry.family(name))      # every registered family caches a kernel


@pytest.mark.parametrize("name", FAMILIES)
def test_cost_counter_counts_the_hooks(name):
    cost = check_cost(registry.family(name))
    assert (cost.macs_dynamic > 0) == (name in ("e4-conv", "nepdo-conv")), (name, cost)


def test_registry_rejects_bad_builders():
    with pytest.raises(TypeError, match=r"must be `def build\(\*, width, kernel_size\)`"):
        registry.register_family("bad", family="x", group="C4", description="x")(lambda width, k: None)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_family("p4-gconv", family="x", group="C4", description="x")(
            lambda *, width, kernel_size: None)
    with pytest.raises(ValueError, match="unknown layer family example 'nope'; registered: p4-gconv"):
        registry.family("nope")


TOY = '''
"""A toy family: a C4 group conv whose output is gated, per pixel, by its own input's group mean
(input-dependent work that FLOP counters do not see, declared through the dynamic_macs hook)."""
import torch
from kit.groups import cyclic
from kit.layers import GroupConv, LiftingConv
from kit.layers.registry import fields_for, register_family


class GatedGroupConv(GroupConv):
    def _forward(self, x):                                   # (B, C, |G|, H, W)
        y = super()._forward(x)
        gate = torch.sigmoid(x.mean(dim=(1, 2), keepdim=True))   # invariant per pixel: (B, 1, 1, H, W)
        return y * gate

    def dynamic_macs(self, H, W):
        return self.out_type.channels * H * W


@register_family("toy-gated-gconv", family="Toy", group="C4", description="GatedGroupConv, 16 -> 16 fields")
def build(*, width, kernel_size):
    f = fields_for(width, 4)
    return (GatedGroupConv(group=cyclic(4), in_fields=f, out_fields=f, kernel_size=kernel_size),
            LiftingConv(group=cyclic(4), in_channels=1, out_fields=f, kernel_size=kernel_size))
'''


@pytest.fixture
def toy_family(tmp_path, monkeypatch):
    (tmp_path / "toy_family_mod.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("toy_family_mod")
    yield registry.family("toy-gated-gconv")
    registry._FAMILIES.pop("toy-gated-gconv", None)
    sys.modules.pop("toy_family_mod", None)


def test_a_new_family_needs_only_its_own_file(toy_family):
    # the contract
    assert check_types_and_equivariance(toy_family) <= 1e-9
    check_gradients(toy_family)
    assert check_cache_never_stale(toy_family)
    # the cost counter, through the hook: 16 channels x 12 x 12 gate multiplies per image
    assert check_cost(toy_family).macs_dynamic == 16 * 12 * 12
    # the benchmark lists and measures it
    assert "toy-gated-gconv" in bench.list_entries("toy-*", kind="layer")
    r = bench.measure_entry("toy-gated-gconv", batch=2, size=12, width=16, kernel=3, angles=(0, 90, 45),
                            repeats=1, warmup=0)
    assert r["macs_dynamic"] == 16 * 12 * 12 and r["equivariance"]["error"][1] <= 1e-5
    assert r["family"] == "Toy"


def test_the_contract_can_fail(toy_family, monkeypatch):
    """A gate read from one orientation channel only (not invariant) breaks equivariance, and a cache
    keyed on nothing goes stale: the contract must catch both."""
    mod = sys.modules["toy_family_mod"]
    monkeypatch.setattr(mod.GatedGroupConv, "_forward", lambda self, x: mod.GroupConv._forward(self, x)
                        * torch.sigmoid(x[:, :, :1].mean(dim=1, keepdim=True)))
    with pytest.raises(AssertionError):
        check_types_and_equivariance(toy_family)

    def stale(self, build, *sources):          # a cache that ignores in-place edits of the weights
        if self.training:
            return build()
        if self._kernel_cache is None:
            self._kernel_cache = build()
        return self._kernel_cache
    monkeypatch.setattr(mod.GatedGroupConv, "cached_kernel", stale)
    with pytest.raises(AssertionError):
        check_cache_never_stale(toy_family)
