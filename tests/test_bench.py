"""The cross-family benchmark (kit/measure/bench.py) on tiny sizes: every entry builds and is measured, the
instrument can tell an equivariant layer from a CNN, MACs agree with the kit's cost counter and with
the closed form, results are resumable, and the escnn comparison code (the ``compare`` extra) keeps
the kit's conventions."""
import json

import pytest
import torch

from kit.measure import bench, complexity
from kit import models
from kit.equivariance import check
from kit.groups import cyclic, dihedral

TINY = dict(batch=2, width=16, kernel=3, angles=(0, 45, 90, 180), repeats=1, warmup=0)
# the CNN and the PDO paper head are not invariant by design (the benchmark shows it)
NOT_EQUIVARIANT = {"cnn-conv", "cnn-mnist", "pdo-mnist-p8"}
HEAVY = {"nepdo-mnist-regular-fd"}            # measured once below, not in the parametrized sweep


def _needs(name):
    if bench.entries()[name].library == "escnn" and not bench.escnn_available():
        pytest.skip("escnn (the compare extra, `make compare`) is not installed")


@pytest.mark.parametrize("name", [n for n in bench.entries() if n not in HEAVY])
def test_every_entry_is_measured(name):
    _needs(name)
    r = bench.measure_entry(name, **TINY)
    json.dumps(r)                                                   # JSON-ready
    eq, tp = r["equivariance"], r["throughput"]
    assert eq["angles"] == [0, 45, 90, 180] and len(eq["error"]) == len(eq["floor"]) == 4
    assert eq["error"][0] < 1e-6                                    # the identity
    assert r["params"] > 0 and r["macs"] > 0
    assert tp["fwd_img_s"] > 0 and tp["train_img_s"] > 0 and tp["fwd_peak_bytes"] > 0
    assert "CPU" in r["device"] and r["threads"] >= 1
    if name in NOT_EQUIVARIANT:
        assert eq["error_90"] > 0.05, "the instrument must see a non-equivariant module"
    else:
        assert eq["error_90"] <= 1e-5
        assert eq["max_grid_error"] <= 1e-5
        if r["library"] == "eqkit":                         # exact by construction: float64 rounding only
            assert eq["max_grid_error_f64"] <= 1e-12
    if r["kind"] == "model":
        assert r["params"] == models.count_parameters(bench.entries()[name].build(16, 3)[0])


def test_mirrors_are_measured_for_dihedral_groups():
    r = bench.measure_entry("p4m-gconv", **TINY)
    eq = r["equivariance"]
    assert len(eq["mirror_error"]) == 4 and eq["mirror_error"][0] <= 1e-5 and eq["mirror_error"][2] <= 1e-5
    assert len(eq["grid_elements"]) == 8 and max(eq["grid_errors"]) <= 1e-5


def test_layer_macs_match_the_closed_form():
    # group conv: per image H W (O |G|) (C |G|) k^2; a plain conv: H W O C k^2
    for name, G in (("p4-gconv", 4), ("p4m-gconv", 8), ("cnn-conv", 1)):
        layer, _ = bench.entries()[name].build(16, 3)
        m = complexity.count_macs(layer, (16 // G, G, 13, 13) if G > 1 else (16, 13, 13))
        assert m.macs == m.macs_counted == 13 * 13 * 16 * 16 * 9, name
        assert m.macs_dynamic == 0


def test_the_bench_columns_come_from_the_one_counter():
    m = models.create("e4-mnist-normal")
    ref = complexity.count_macs(m, (1, 28, 28))
    got = bench._macs_of(m, torch.randn(2, 1, 28, 28))
    assert got == {"macs": ref.macs, "macs_counted": ref.macs_counted, "macs_dynamic": ref.macs_dynamic,
                   "macs_kernel_build": ref.macs_kernel_build} and ref.macs_dynamic > 0


def test_neural_epdo_aggregation_is_counted():
    layer, _ = bench.entries()["nepdo-conv"].build(16, 3)            # C16, 1 regular field
    assert complexity.count_macs(layer, (1, 16, 11, 11)).macs_dynamic == 16 * 25 * 11 * 11
    # the full paper model (a BatchNorm1d head: batch 1 in train mode used to crash the cost counter):
    # 5 Neural-ePDO layers, every input channel filtered with 25 generated taps per pixel
    cost = complexity.count_macs(models.create("nepdo-mnist-regular-fd"), (1, 28, 28))
    assert cost.macs_dynamic == 10_976_000 and cost.macs_counted > 0


def test_heavy_model_is_measured():
    """The full Neural ePDO model, measured once (the heaviest entry). Its float32 logits at 90 degrees
    (1.0-1.5e-5, against 1e-5) are the open item of issue 6, asserted in tests/test_epdo.py; here the
    symmetry itself is checked in float64, where rounding cannot hide a wrong convention."""
    r = bench.measure_entry("nepdo-mnist-regular-fd", **TINY)
    assert r["params"] == 234_186 and r["macs_dynamic"] > 0 and r["equivariance"]["error"][1] > 1e-3
    model = bench.entries()["nepdo-mnist-regular-fd"].build(16, 3)[0]
    models.calibrate_batchnorm(model, bench._digits(16)).double()
    G = model.in_type.group
    assert max(rec.error for rec in check(model, [G.element(4), G.element(8), G.element(12)])) <= 1e-9


def test_run_is_resumable_and_draws(tmp_path):
    logs = []
    kw = dict(out_dir=tmp_path, batch=2, width=16, kernel=3, angles=(0, 90, 180), repeats=1, warmup=0,
              log=logs.append)
    res = bench.run("cnn-conv,p4-gconv", **kw)
    assert not res["failed"] and {r["name"] for r in res["results"]} == {"cnn-conv", "p4-gconv"}
    for f in ("cnn-conv.json", "p4-gconv.json", "table.md", "error_vs_angle.png", "throughput.png"):
        assert (tmp_path / f).exists() and (tmp_path / f).stat().st_size > 500, f
    table = (tmp_path / "table.md").read_text()
    assert "| p4-gconv | G-CNN | C4 |" in table and "CPU" in table
    stamp = json.loads((tmp_path / "p4-gconv.json").read_text())["when"]
    logs.clear()
    bench.run("p4-gconv", **kw)                                      # same settings: kept, not re-measured
    assert any("kept" in line for line in logs)
    assert json.loads((tmp_path / "p4-gconv.json").read_text())["when"] == stamp
    logs.clear()
    bench.run("p4-gconv", **{**kw, "angles": (0, 90)})                # other settings: measured again
    assert not any("kept" in line for line in logs)
    assert json.loads((tmp_path / "p4-gconv.json").read_text())["settings"]["angles"] == [0, 90]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="no benchmark entry matches"):
        bench.list_entries("nope*")
    with pytest.raises(ValueError, match="unknown benchmark entry"):
        bench.measure_entry("nope")
    with pytest.raises(ValueError, match="divisor of 360"):
        bench.angles(7)
    with pytest.raises(ValueError, match="repeats must be"):
        bench.throughput(torch.nn.Identity(), torch.zeros(1), repeats=0)


def test_cli_lists_entries(capsys):
    from kit.__main__ import main
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in bench.entries())


# ------------------------------------------------------------------------ escnn conventions
@pytest.fixture
def needs_escnn():
    if not bench.escnn_available():
        pytest.skip("escnn (the compare extra, `make compare`) is not installed")


def test_escnn_acts_on_images_as_the_kit(needs_escnn):
    """escnn's C4 element k is the kit's rotation by 90 k degrees (torch.rot90, counter-clockwise) and
    its D4 element (-, 0) the kit's mirror x -> -x: what the adapter relies on."""
    from escnn import gspaces
    from escnn import nn as enn
    x = torch.randn(1, 1, 7, 7)
    for gs, G in ((gspaces.rot2dOnR2(4), cyclic(4)), (gspaces.flipRot2dOnR2(4), dihedral(4))):
        t = enn.FieldType(gs, [gs.trivial_repr])
        for e, g in zip(gs.fibergroup.elements, G.elements):
            assert torch.equal(enn.GeometricTensor(x, t).transform(e).tensor, G.act_on_image(x, g)), (e, g)


def test_escnn_regular_fields_follow_the_kit_layout(needs_escnn):
    """escnn's regular representation matrices equal the kit's, element by element (C4, D4, C8)."""
    from escnn import gspaces
    for gs, G in ((gspaces.rot2dOnR2(4), cyclic(4)), (gspaces.flipRot2dOnR2(4), dihedral(4)),
                  (gspaces.rot2dOnR2(8), cyclic(8))):
        for e, g in zip(gs.fibergroup.elements, G.elements):
            R = torch.as_tensor(gs.regular_repr(e)).float()
            assert torch.allclose(R, G.regular_matrix(g).float(), atol=1e-6), (e, g)


@pytest.mark.parametrize("kit_name", ["p4-gconv", "p4m-gconv"])
def test_kit_is_at_least_as_exact_as_escnn_at_90_degrees(needs_escnn, kit_name):
    """In float64 the kit's steered kernels are exact permutations (error ~1e-16); escnn's basis is
    sampled in float32, which leaves ~1e-7 at 90 degrees. (In float32 both sit at rounding level.)"""
    kit_layer, kit_block = bench.entries()[kit_name].build(16, 3)
    es_layer, es_block = bench.entries()[bench.entries()[kit_name].counterpart].build(16, 3)
    G = kit_block.in_type.group
    els = [g for g in G.elements if g != G.identity]
    import copy
    kit64 = max(r.error for r in check(copy.deepcopy(kit_block).double(), els))
    es64 = max(r.error for r in check(copy.deepcopy(es_block).double(), els))
    assert kit64 <= 1e-12 and kit64 <= es64


@pytest.mark.parametrize("name", ["escnn-c4", "escnn-d4"])
def test_escnn_block_passes_the_kit_check(needs_escnn, name):
    layer, block = bench.entries()[name].build(16, 3)
    assert max(r.error for r in check(block)) <= 1e-5               # every element, mirrors included
    x = torch.randn(2, layer.in_type.n_fields, layer.in_type.dim, 11, 11)
    assert max(r.error for r in check(layer, x=x)) <= 1e-5
