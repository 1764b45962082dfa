"""The ipywidgets explorers, driven headless: building them draws a figure, moving a control
redraws it (batch notebook runs skip widgets, so this is where their logic is tested)."""
import io

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

import kit.primer as primer  # noqa: E402
from kit.widgets import rotation_explorer  # noqa: E402


@pytest.fixture(scope="module")
def built():
    return primer.setup(calibration=32)


def _pixels(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def test_rotation_explorer_draws_and_redraws(built):
    models, x = built
    box = rotation_explorer(models["cnn-mnist"], models["p4-mnist"], x, angle=45.0)
    (slider, field), out = box.children[0].children, box.children[1]
    assert slider.description.startswith("angle") and not slider.continuous_update
    assert box.state["draws"] == 1 and box.state["args"] == (45.0, 0)
    first = _pixels(box.state["figure"])
    slider.value = 90.0
    assert box.state["draws"] == 2 and box.state["args"] == (90.0, 0)
    second = _pixels(box.state["figure"])
    assert second != first, "moving the slider changes the picture"
    field.value = 1
    assert box.state["draws"] == 3 and _pixels(box.state["figure"]) != second


def test_epdo_coefficient_explorer_draws_and_redraws():
    from kit import epdoviz
    lab = epdoviz.setup(seed=0, digit=3)
    box = epdoviz.coefficient_explorer(lab)
    (row, col), (field, comp) = box.children[0].children, box.children[1].children
    assert not row.continuous_update and field.max == 3 and comp.max == lab.group.order - 1
    assert box.state["draws"] == 1 and box.state["args"] == (*lab.pixel, 0, 0)
    first = _pixels(box.state["figure"])
    row.value = row.value + 1
    assert box.state["draws"] == 2 and box.state["args"][0] == lab.pixel[0] + 1
    second = _pixels(box.state["figure"])
    assert second != first, "moving the pixel changes the picture"
    comp.value = 4
    assert box.state["draws"] == 3 and _pixels(box.state["figure"]) != second


def test_e4_filter_explorer_draws_and_redraws():
    from kit import e4viz
    lab = e4viz.setup(seed=0, digit=3, calibration=32)
    box = e4viz.filter_explorer(lab)
    (row, col), (sl, rot) = box.children[0].children, box.children[1].children
    assert not row.continuous_update and sl.max == lab.layer.slices - 1 and rot.max == 3
    assert box.state["draws"] == 1 and box.state["args"] == (*lab.pixel, 0, 1)
    first = _pixels(box.state["figure"])
    col.value = col.value + 1
    assert box.state["draws"] == 2 and box.state["args"][1] == lab.pixel[1] + 1
    second = _pixels(box.state["figure"])
    assert second != first, "moving the pixel changes the picture"
    rot.value = 2
    assert box.state["draws"] == 3 and box.state["args"][3] == 2 and _pixels(box.state["figure"]) != second


def test_every_explorer_uses_the_one_scheme():
    """No explorer builds its own Output / redraw loop: they all go through kit.widgets.explorer."""
    import inspect

    from kit import e4viz, epdoviz, pdoviz, redundancy, separable_lab, widgets
    for mod in (e4viz, epdoviz, pdoviz, redundancy, separable_lab, widgets):
        src = inspect.getsource(mod)
        assert src.count(".clear_output(") == (1 if mod is widgets else 0), mod.__name__
