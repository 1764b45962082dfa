"""Kernel-redundancy analysis: the statistics are computed from the kernels (exactly 1 for a rank-1
kernel, known values for known spectra, changing when the kernels change), for every kind of
group-conv layer of the kit, and the figure builders return figures."""
import math

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

import kit.models.separable  # noqa: E402,F401
from kit import models  # noqa: E402
from kit.explore import redundancy as R
from kit.groups import cyclic  # noqa: E402
from kit.layers import GroupConv  # noqa: E402
from kit.layers.separable import LieGroupConv  # noqa: E402
from kit.lie import SE2, Sim2  # noqa: E402


def test_rank1_kernel_has_explained_variance_one():
    h, u = torch.randn(3, 5, 4), torch.randn(3, 5, 9)
    K = (h[..., None] * u[:, :, None]).reshape(3, 5, 4, 3, 3)          # K[o, i] = h u^T: rank 1
    st = R.subgroup_stats(K)
    assert st.explained.shape == (3, 5)
    assert torch.allclose(st.explained, torch.ones(3, 5, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(st.effective_rank, torch.ones(3, 5, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(R.rank1_approximation(K), K, atol=1e-5)


def test_known_spectrum_values():
    # singular values (3, 1): EV = 9 / 10, effective rank exp(H(0.9, 0.1)), rank-1 error sqrt(0.1)
    A = torch.zeros(1, 1, 2, 2, 2)
    A[0, 0, 0, 0, 0], A[0, 0, 1, 0, 1] = 3.0, 1.0
    st = R.subgroup_stats(A)
    assert st.explained.item() == pytest.approx(0.9)
    assert st.effective_rank.item() == pytest.approx(math.exp(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1))))
    assert st.rank1_error.item() == pytest.approx(math.sqrt(0.1))
    # D equal singular values: EV = 1/D, effective rank D
    E = torch.eye(4).reshape(1, 1, 4, 2, 2)
    st = R.subgroup_stats(E)
    assert st.explained.item() == pytest.approx(0.25) and st.effective_rank.item() == pytest.approx(4.0)
    # all-zero kernels are NaN and ignored by the mean
    Z = torch.cat([E, torch.zeros_like(E)], dim=1)
    assert math.isnan(R.subgroup_stats(Z).explained[0, 1].item()) and R.subgroup_stats(Z).mean() == pytest.approx(0.25)


def test_explained_variance_is_computed_from_the_kernels():
    """Not a constant: it follows the kernels, and mixing a rank-1 kernel with noise lowers it."""
    g = GroupConv(group=cyclic(4), in_fields=3, out_fields=2, kernel_size=3)
    a = R.analyze(g)[0].subgroup.mean()
    with torch.no_grad():
        g.weight.normal_()
    b = R.analyze(g)[0].subgroup.mean()
    assert a != b and 0 < a < 1 and 0 < b < 1
    h, u = torch.randn(2, 3, 4), torch.randn(2, 3, 9)
    rank1 = (h[..., None] * u[:, :, None]).reshape(2, 3, 4, 3, 3)
    noise = torch.randn_like(rank1)
    evs = [R.subgroup_stats(rank1 + t * noise).mean() for t in (0.0, 0.1, 0.5, 2.0)]
    assert evs[0] == pytest.approx(1.0) and all(x > y for x, y in zip(evs, evs[1:])), evs
    assert R.random_baseline(4, 9) == pytest.approx(0.5, abs=0.03)          # unstructured 4 x 9 kernels


def test_every_group_conv_layer_kind():
    p4 = R.analyze(models.create("p4-mnist"))
    assert [r.shape[2] for r in p4] == [4] * 5                              # lifting left out, |G| = 4
    for grid in (SE2(4), Sim2(4, 3)):
        sep = R.analyze(LieGroupConv(grid=grid, in_fields=3, out_fields=2, kernel_size=5, variant="separable"))[0]
        non = R.analyze(LieGroupConv(grid=grid, in_fields=3, out_fields=2, kernel_size=5))[0]
        assert sep.shape == non.shape == (2, 3, grid.dim, 5, 5)
        assert sep.subgroup.mean() == pytest.approx(1.0) and sep.channels.mean() == pytest.approx(1.0)
        assert non.subgroup.mean() < 0.99 and non.channels.mean() < non.subgroup.mean()
    # the canonical kernel is the identity element's slice of the sampled filter bank
    m = LieGroupConv(grid=SE2(4), in_fields=2, out_fields=3, kernel_size=3)
    full = m._build(0.0, torch.float32).view(3, 4, 2, 4, 3, 3)
    assert torch.equal(m.canonical_kernel(), full[:, 0].detach())
    with pytest.raises(ValueError, match="not a group convolution"):
        R.group_kernel(torch.nn.Conv2d(1, 1, 3))


def test_compare_trained_vs_initial_and_figures():
    init = models.create("nonsep-se2-mnist-small")
    trained = models.create("nonsep-se2-mnist-small")
    trained.load_state_dict(init.state_dict())
    with torch.no_grad():
        trained.final.kernel_net.final.weight.mul_(3.0).add_(0.01)
    rows = R.compare(trained, init)
    assert [r["layer"] for r in rows][-1] == "final"
    assert rows[0]["kernel_change"] == 0.0 and rows[-1]["kernel_change"] > 0.5
    assert rows[0]["rank1_ev_trained"] == rows[0]["rank1_ev_init"]
    assert "rank-1 EV trained" in R.compare_table(rows)
    t, i = R.analyze(trained)[-1:], R.analyze(init)[-1:]                # one panel keeps it fast
    for fig in (R.spectra_figure(t, i, axis="channels"), R.explained_variance_figure(t, i),
                R.rank1_figure(t[0].kernel, out=1, inp=2), R.summary_figure(rows[-1:])):
        assert fig.axes
        matplotlib.pyplot.close(fig)
    box = R.kernel_explorer(t, i)                                           # the widget, driven headless
    (layer, which), (out, inp) = box.children[0].children, box.children[1].children
    assert box.state["draws"] == 1 and box.state["args"] == ("final", 0, 0, "trained")
    which.value = "init"
    assert box.state["draws"] == 2 and box.state["args"] == ("final", 0, 0, "init")
