"""Notebook 06 on trained separable zoo models (kit.explore.separable): the lab loads the zoo's weights and
the exact initial twin, the trained kernels are still exactly equivariant, training moved them, the
redundancy measure is what it says, and every figure builds with fonts >= 9 pt.

Tests that need the real weights skip (with the reason) while they are not in kit/weights; the rest
run on a stand-in zoo written to a temporary folder: the initial twin with random noise added (not
trained weights; a manifest with the file's sha256, as the zoo writes it)."""
import json
import random

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

import kit.explore.separable as lab  # noqa: E402
from zoo_helpers import HAVE, needs, small_fonts  # noqa: E402
from kit import models  # noqa: E402
from kit.run import zoo
from kit.equivariance import check, float64_twin, max_error  # noqa: E402
from kit.layers.separable import LieLiftingConv  # noqa: E402
from kit.lie import SE2, Sim2  # noqa: E402

ZOO = (lab.SE2_MODEL, lab.SIM2_MODEL, lab.DSEP_MODEL)


pytestmark = pytest.mark.usefixtures("one_thread")


def _seeded_build(name, seed=0):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return models.create(name)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """A weights folder holding, for each of the three models, its seed-0 initialisation plus noise."""
    root = tmp_path_factory.mktemp("standin_zoo")
    g = torch.Generator().manual_seed(123)
    for name in ZOO:
        state = {}
        for k, v in _seeded_build(name).state_dict().items():
            if v.is_floating_point() and "running" not in k:
                v = v + 0.3 * (v.std() if v.numel() > 1 else 0.1) * torch.randn(v.shape, generator=g)
            state[k] = v
        pt = zoo.weights_path(name, root)
        torch.save(state, pt)
        zoo._manifest_path(name, root).write_text(json.dumps(dict(
            model=name, builder_overrides={}, seed=0, sha256=zoo.sha256(pt),
            input_normalisation=dict(mean=[0.13], std=[0.297]), note="test stand-in: not trained")))
    return root


# ------------------------------------------------------------------------------ without weights
def test_pretrained_without_weights_raises_the_zoo_error(monkeypatch, tmp_path):
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ValueError, match="has no pretrained weights"):
        lab.open_kernels(True, rotations=4)
    with pytest.raises(ValueError, match="has no pretrained weights"):
        lab.zoo_pair(lab.SE2_MODEL)
    K = lab.open_kernels(False, rotations=4)
    assert K["models"] == {} and K["kernels"]["SE(2)"][1] is None and K["kernels"]["Sim(2)"][1] is None
    assert K["kernels"]["SE(2)"][0] is K["se2"]["separable"]


def test_resample_is_the_same_continuous_kernel():
    """A layer re-sampled on a grid with twice the rotations agrees with the original on the shared
    rotations (lifting kernels and spatial kernels of a separable conv)."""
    torch.manual_seed(0)
    lift = LieLiftingConv(grid=SE2(4), in_channels=1, out_fields=3, kernel_size=5)
    K4, K8 = lab._parts(lift)["k(x)"], lab._parts(lab.resample(lift, SE2(8)))["k(x)"]
    assert torch.allclose(K8.view(3, 8, 1, 5, 5)[:, ::2], K4.view(3, 4, 1, 5, 5), atol=1e-6)
    conv = lab.make_layers(rotations=4, in_fields=2, out_fields=3, kernel_size=5)["separable"]
    R4, R8 = lab.spatial_kernels(conv), lab.spatial_kernels(lab.resample(conv, SE2(8)))
    assert torch.allclose(R8[::2], R4, atol=1e-6)
    with pytest.raises(ValueError, match="cannot move"):
        lab.resample(lift, Sim2(4, 3))


def test_grid_explorer_with_initial_redraws_both():
    import io
    trained = lab.make_layers(seed=0, rotations=4, in_fields=2, out_fields=2, kernel_size=5)["separable"]
    initial = lab.make_layers(seed=5, rotations=4, in_fields=2, out_fields=2, kernel_size=5)["separable"]

    def pixels(fig):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=40)
        return buf.getvalue()

    alone = lab.kernel_function_figure(trained)
    both = lab.kernel_function_figure(trained, initial=initial)
    assert len(both.axes) == len(alone.axes) + 4                     # one more row of 4 spatial kernels
    assert not small_fonts(both), small_fonts(both)
    box = lab.grid_explorer(trained, initial=initial)
    first = pixels(box.state["figure"])
    assert len(box.state["figure"].axes) == len(both.axes)
    box.children[0].children[0].value = 8
    assert box.state["draws"] == 2 and box.state["args"] == (8, 1) and pixels(box.state["figure"]) != first
    assert len(box.state["figure"].axes) == 1 + 2 * 8
    with pytest.raises(ValueError, match="same layer on the same grid"):
        lab.kernel_function_figure(trained, initial=lab.resample(initial, SE2(8)))


# ---------------------------------------------------------------------------- stand-in zoo
def test_standin_pair_is_the_exact_initial_twin(standin):
    trained, initial = lab.zoo_pair(lab.SE2_MODEL, root=standin)
    assert trained.pretrained["name"] == lab.SE2_MODEL and not trained.training and not initial.training
    fresh = _seeded_build(lab.SE2_MODEL)
    same = lab.kernel_changes(initial, fresh, refine=2)
    assert all(r["sampled"] == 0 and r["finer"] == 0 and r["params"] == 0 for r in same)
    rows = lab.kernel_changes(trained, initial, refine=2)
    assert [(r["layer"], r["part"]) for r in rows[:3]] == [("lift", "k(x)"), ("stages.0.conv1", "k_H"),
                                                           ("stages.0.conv1", "k_R")]
    assert {r["layer"] for r in rows} == set(lab.conv_layers(trained))
    assert all(r["sampled"] > 0.01 and r["finer"] > 0.01 and r["params"] > 0.01 for r in rows)
    assert "stages.0.conv1" in lab.kernel_changes_text(rows)
    with pytest.raises(ValueError, match="no Lie convolution 'nope'"):
        lab.kernel_layer(trained, "nope")


def test_standin_figures_build_with_readable_fonts(standin, monkeypatch):
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", standin)                # open_kernels as the notebook calls it
    K = lab.open_kernels(True, rotations=4)
    assert set(K["models"]) == set(ZOO)
    figs = [lab.kernel_function_figure(layer, initial=initial) for layer, initial in K["kernels"].values()]
    trained, initial = K["models"][lab.SE2_MODEL]
    figs.append(lab.trained_vs_initial_figure(trained, initial, refine=2))
    rows = lab.redundancy_rows(*K["models"][lab.DSEP_MODEL])
    figs.append(lab.redundancy_figure(rows))
    for fig in figs:
        assert isinstance(fig, matplotlib.figure.Figure)
        assert not small_fonts(fig), small_fonts(fig)
        matplotlib.pyplot.close(fig)
    with pytest.raises(ValueError, match="pick a separable group conv"):
        lab.trained_vs_initial_figure(trained, initial, layer="lift")


def test_redundancy_measure_on_standin(standin):
    """dseparable kernels: EV1 between 1/D (D = 4 input rotations) and 1, and the untrained
    non-separable reference is reported per layer; separable kernels are rank 1 along the group
    whatever their weights (EV1 = 1)."""
    rows = lab.redundancy_rows(*lab.zoo_pair(lab.DSEP_MODEL, root=standin))
    assert [r["layer"] for r in rows] == ["stages.0.conv1", "stages.0.conv2", "stages.4.conv1", "stages.4.conv2",
                                          "final"]
    for r in rows:
        for v in (r["rank1_ev_trained"], r["rank1_ev_init"], r["rank1_ev_reference"]):
            assert 0.25 - 1e-9 <= v < 1 - 1e-3
        assert r["rank1_ev_trained"] != r["rank1_ev_init"] and r["kernel_change"] > 0.01
    sep = lab.redundancy_rows(*lab.zoo_pair(lab.SE2_MODEL, root=standin), reference=None)
    assert all(abs(r["rank1_ev_trained"] - 1) < 1e-6 and r["rank1_ev_reference"] is None for r in sep)
    assert "stages.0.conv1" in lab.redundancy_text(rows)


# ---------------------------------------------------------------------------- the real zoo
@pytest.mark.parametrize("name", ZOO)
def test_trained_kernels_differ_from_initial(name):
    if name not in HAVE:
        pytest.skip(f"no zoo weights for {name} in kit/weights yet (train and export it: make zoo)")
    trained, initial = lab.zoo_pair(name)
    rows = lab.kernel_changes(trained, initial, refine=2)
    assert all(r["params"] > 1e-3 and r["sampled"] > 1e-3 for r in rows), lab.kernel_changes_text(rows)


@pytest.mark.parametrize("name", ZOO)
def test_trained_logits_invariant_at_90_degrees_in_float64(name):
    if name not in HAVE:
        pytest.skip(f"no zoo weights for {name} in kit/weights yet (train and export it: make zoo)")
    model = models.create(name, pretrained=True)
    G = model.in_type.group
    quarters = [g for g in G.elements if G.is_exact_on_grid(g)]
    recs = check(float64_twin(model), quarters)
    assert len(recs) == 4 and max_error(recs) <= 1e-10, recs
    assert lab.invariance_90(model) <= 1e-10
    assert "90/180/270" in lab.pretrained_text(model)


@needs(lab.DSEP_MODEL)
def test_trained_dseparable_redundancy():
    rows = lab.redundancy_rows(*lab.zoo_pair(lab.DSEP_MODEL))
    for r in rows:
        assert 0.25 - 1e-9 <= r["rank1_ev_trained"] <= 1 and r["kernel_change"] > 1e-3
