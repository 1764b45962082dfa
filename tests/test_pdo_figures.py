"""Notebook 04 in library form (kit.explore.pdo): every figure builder returns a drawable figure that
shows what it claims, the stencil gallery explorer redraws headless, and the convergence figure
carries the measured log-log slope of the 45-degree error (2 +- 0.3, the paper's quadratic order)."""
import io
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from kit.explore import pdo as pdoviz  # noqa: E402
from kit.groups import cyclic  # noqa: E402
from kit.layers.pdo import LEARNABLE, PDOLiftingConv  # noqa: E402
from kit.kernels.stencils import DEFAULT_SIGMA, stencil  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures(one_thread):
    yield
    plt.close("all")


def _texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [fig._suptitle.get_text() if fig._suptitle else ""]


def _pixels(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    return buf.getvalue()


# ---------------------------------------------------------------------- operators
def test_operator_coefficients_and_labels():
    c = pdoviz.operator_coefficients({"dx": 1.0, (1, 1): 0.5})
    assert c.shape == (15,) and c[1] == 1.0 and c[4] == 0.5 and c.sum() == 1.5
    assert pdoviz.operator_coefficients("1")[0] == 1.0
    assert pdoviz.operator_label({"dx": 1, "dxy": -0.5}) == r"$\partial_{x}$ - 0.5 $\partial_{xy}$"
    with pytest.raises(ValueError, match=r"unknown operator 'dyx'"):
        pdoviz.operator_coefficients("dyx")
    with pytest.raises(ValueError, match=r"total order 5"):
        pdoviz.operator_coefficients("dxxxyy")


# ---------------------------------------------------------------------- heat maps
def test_gallery_writes_every_stencil_value_in_its_cell():
    fig = pdoviz.stencil_gallery_figure(("dx", "dxy", "dxxx"), ("fd", "gauss"), size=3)
    assert len(fig.axes) == 6
    fd_dx = fig.axes[0]
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in fd_dx.texts}
    assert len(cells) == 9 and cells[(1, 2)] == "0.5" and cells[(1, 0)] == "-0.5" and cells[(0, 0)] == "0"
    gauss_dx = fig.axes[1]                                             # rows: operators, columns: methods
    K = stencil(1, 0, method="gauss", size=3).numpy()
    got = {(round(t.get_position()[1]), round(t.get_position()[0])): float(t.get_text()) for t in gauss_dx.texts}
    assert all(abs(got[r, c] - K[r, c]) <= 0.01 * abs(K[r, c]) + 1e-12 for r in range(3) for c in range(3))
    assert "not on 3×3" in fig.axes[4].texts[0].get_text()              # dxxx: a note, no exception
    assert _pixels(fig)


def test_stencil_figure_single_and_undefined():
    fig = pdoviz.stencil_figure("dxxy", method="gauss", sigma=1.0)
    assert len(fig.axes[0].texts) == 25 and "σ=1.00" in fig.axes[0].get_title()
    fig = pdoviz.stencil_figure("dxxx", method="fd", size=3)
    assert "not defined" in fig.axes[0].texts[0].get_text()


# ---------------------------------------------------------------- rotated kernels
def test_rotated_kernels_are_the_layer_kernels_and_turn_counter_clockwise():
    """For a learnable monomial, rotated_kernels is the kernel a PDO lifting layer applies at each
    orientation; for dx the positive lobe's direction is the element's angle (counter-clockwise)."""
    G = cyclic(8)
    layer = PDOLiftingConv(group=G, in_channels=1, out_fields=1, method="gauss", parametrization="pdo",
                           offset=0.3).double()
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, 0, LEARNABLE.index((2, 1))] = 1.0
    K = layer.filter().detach()[:, 0]                                     # (8, 5, 5)
    assert torch.allclose(pdoviz.rotated_kernels("dxxy", 8, method="gauss", offset=0.3), K, atol=1e-12)
    R = pdoviz.rotated_kernels("dx", 8)
    for k in range(8):                                                    # centroid of the weights
        xs = torch.arange(5.0, dtype=torch.float64) - 2
        cx, cy = (R[k] * xs[None, :]).sum(), (R[k] * -xs[:, None]).sum()
        assert math.isclose(math.atan2(cy, cx) % (2 * math.pi), 2 * math.pi * k / 8, abs_tol=1e-9)
    Q = pdoviz.rotated_kernels("dxxy", 4, method="rbffd", offset=0.2)
    assert all(torch.allclose(Q[(k + 1) % 4], torch.rot90(Q[k], 1), atol=1e-12) for k in range(4))


def test_rotated_kernels_figure_layout():
    fig = pdoviz.rotated_kernels_figure("dx", ns=(4, 6))
    shown = [ax for ax in fig.axes if ax.axison]
    assert len(fig.axes) == 3 * 4 and len(shown) == 4 + 6                # C6 wraps onto a second row of 4
    assert [ax.get_title() for ax in shown[:4]] == ["k=0 · 0°", "k=1 · 90°", "k=2 · 180°", "k=3 · 270°"]
    assert any(t.get_text() == ".50" for t in shown[1].texts)           # numbers written
    # the arrow outside the k=1 (90 degree) kernel points straight up (row coordinate decreases)
    arrow = next(c for c in shown[1].get_children() if isinstance(c, matplotlib.text.Annotation))
    (x0, y0), (x1, y1) = arrow.xyann, arrow.xy
    assert abs(x1 - x0) < 1e-9 and y1 < y0


# ------------------------------------------------------------------ error vs angle
def test_layer_error_study_and_figure():
    res = pdoviz.layer_error_study((4, 8), step=45.0, n_digits=1, upsample=1, fields=2)
    assert set(res) == {"p4", "p8"} and [r.angle for r in res["p8"]] == [45.0 * i for i in range(9)]
    at = {n: {r.angle: r for r in recs} for n, recs in res.items()}
    assert at["p4"][90.0].error < 1e-5 and at["p8"][90.0].error < 1e-5 and at["p8"][270.0].error < 1e-5
    assert at["p8"][45.0].element is not None and at["p4"][45.0].element is None
    assert at["p4"][45.0].error > 1e-3 and at["p4"][45.0].floor > 1e-3
    fig = pdoviz.error_vs_angle_figure(res)
    assert len(fig.axes) == 2 and fig.axes[0].get_yscale() == "log"
    labels = fig.axes[1].get_legend().get_texts()
    assert {t.get_text() for t in labels} >= {"p4: layer error", "p8: interpolation floor"}
    assert "p8" in pdoviz.error_table(res, angles=(45.0,))


# ---------------------------------------------------------------- the O(h^2) figure
def test_convergence_slope_is_quadratic_and_shown_on_the_figure():
    """The acceptance criterion: log-log slope of the 45-degree error against h is 2 +- 0.3, and the
    figure writes the measured slope (legend and box)."""
    study = pdoviz.convergence_study(("fd", "gauss"), hs=(0.2, 0.1, 0.05, 0.025))
    for m, d in study.items():
        assert abs(d["slope"] - 2) <= 0.3, (m, d)
        assert d["slope"] == pytest.approx(pdoviz.fit_slope(d["h"], d["error"]))
        assert d["exact_error"] < 1e-9 and d["angle"] == 45.0
    fig = pdoviz.convergence_figure(study)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    box = "\n".join(_texts(fig))
    for m, d in study.items():
        assert f"{m}: fitted slope {d['slope']:.2f}" in legend
        assert f"slope {d['slope']:.2f} ✓" in box
    with pytest.raises(ValueError, match="positive"):
        pdoviz.fit_slope([0.1, 0.2], [0.0, 1.0])


# -------------------------------------------------------------------------- widget
def test_stencil_gallery_draws_and_redraws():
    box = pdoviz.stencil_gallery(operator="dxy", method="fd", size=5)
    (op, size), meth, (sigma, norm, note) = box.children[0].children, box.children[1], box.children[2].children
    assert not sigma.continuous_update and sigma.disabled and norm.disabled
    assert sigma.layout.display == norm.layout.display == "none" and note.layout.display is None   # fd: why, not σ
    assert "gauss" in note.value
    assert box.state["draws"] == 1 and box.state["args"] == ("dxy", "fd", 5, None, True)
    first = _pixels(box.state["figure"])
    meth.value = "gauss"
    assert box.state["draws"] == 2 and not sigma.disabled
    assert sigma.layout.display is None and note.layout.display == "none"
    assert box.state["args"] == ("dxy", "gauss", 5, pytest.approx(DEFAULT_SIGMA), True)
    second = _pixels(box.state["figure"])
    assert second != first
    sigma.value = 1.2
    assert box.state["args"][3] == 1.2 and "σ=1.20" in box.state["figure"].axes[0].get_title()
    op.value, size.value = "dxxx", 3                                  # undefined on 3x3: a note, no error
    assert box.state["draws"] == 5 and "not defined" in box.state["figure"].axes[0].texts[0].get_text()
    with pytest.raises(ValueError, match="unknown operator"):
        pdoviz.stencil_gallery(operator="dz")
