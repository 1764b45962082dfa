"""The ipywidgets explorers, driven headless: building them draws a figure, moving a control
redraws it (batch notebook runs skip widgets, so this is where their logic is tested)."""
import io

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

import kit.explore.primer as primer  # noqa: E402
from kit.explore.widgets import rotation_explorer  # noqa: E402


@pytest.fixture(scope="module")
def built():
    return primer.setup(calibration=32)


def _pixels(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _drive(box, first_args, moves):
    """Built: drawn once with ``first_args``. Then each ``(control, value, arg_index)`` move redraws once,
    changes the picture, and shows ``value`` at ``args[arg_index]``."""
    assert box.state["draws"] == 1 and box.state["args"] == first_args
    before = _pixels(box.state["figure"])
    for i, (control, value, k) in enumerate(moves):
        control.value = value
        assert box.state["draws"] == 2 + i and box.state["args"][k] == value, (control.description, box.state)
        now = _pixels(box.state["figure"])
        assert now != before, f"moving {control.description!r} changes the picture"
        before = now


def test_rotation_explorer_draws_and_redraws(built):
    models, x = built
    box = rotation_explorer(models["cnn-mnist"], models["p4-mnist"], x, angle=45.0)
    slider, field = box.children[0].children
    assert slider.description.startswith("angle") and not slider.continuous_update
    _drive(box, (45.0, 0), [(slider, 90.0, 0), (field, 1, 1)])


def test_epdo_coefficient_explorer_draws_and_redraws():
    from kit.explore import epdo as epdoviz
    lab = epdoviz.setup(seed=0, digit=3)
    box = epdoviz.coefficient_explorer(lab)
    (row, col), (field, comp) = box.children[0].children, box.children[1].children
    assert not row.continuous_update and field.max == 3 and comp.max == lab.group.order - 1
    _drive(box, (*lab.pixel, 0, 0), [(row, lab.pixel[0] + 1, 0), (comp, 4, 3)])


def test_e4_filter_explorer_draws_and_redraws():
    from kit.explore import e4 as e4viz
    lab = e4viz.setup(seed=0, digit=3, calibration=32)
    box = e4viz.filter_explorer(lab)
    (row, col), (sl, rot) = box.children[0].children, box.children[1].children
    assert not row.continuous_update and sl.max == lab.layer.slices - 1 and rot.max == 3
    _drive(box, (*lab.pixel, 0, 1), [(col, lab.pixel[1] + 1, 1), (rot, 2, 3)])


def test_every_explorer_uses_the_one_scheme():
    """No explorer builds its own Output / redraw loop: they all go through kit.explore.widgets.explorer."""
    import inspect

    from kit.explore import e4 as e4viz, epdo as epdoviz, pdo as pdoviz, redundancy, separable as separable_lab, widgets
    for mod in (e4viz, epdoviz, pdoviz, redundancy, separable_lab, widgets):
        src = inspect.getsource(mod)
        assert src.count(".clear_output(") == (1 if mod is widgets else 0), mod.__name__


def test_one_lab_moves_pixels_with_the_digit():
    """The explorers' one Lab (kit.explore.lab): following a pixel through a group element lands where the
    acted-on digit carries it, for every element of the group, and a pixel off the image is an error."""
    import torch

    from kit.explore.e4 import E4Lab
    from kit.explore.epdo import EPDOLab
    from kit.explore.lab import Lab
    from kit.explore import e4 as e4viz
    lab = e4viz.setup(calibration=16)
    assert isinstance(lab, E4Lab) and isinstance(lab, Lab) and issubclass(EPDOLab, Lab)
    H, W = lab.x.shape[-2:]
    r, c = 5, 19
    for g in lab.group.elements:
        one = torch.zeros(1, 1, H, W)
        one[..., r, c] = 1.0
        moved = lab.group.act_on_image(one, g)
        assert moved[0, 0, lab.move_pixel(r, c, g)[0], lab.move_pixel(r, c, g)[1]] == 1.0
        assert torch.equal(lab.rotated(g), lab.group.act_on_image(lab.x, g))
    with pytest.raises(ValueError, match="outside the 28x28 image"):
        lab.move_pixel(28, 0, lab.group.identity)
    with pytest.raises(ValueError, match="outside the 28x28 image"):
        lab.kernels_at(-1, 3)


def test_show_writes_the_png_and_closes_the_figure(tmp_path):
    """viz.show: the one way notebooks put a figure on screen and in figures/ (atomic PNG, figure closed)."""
    import matplotlib.pyplot as plt

    from kit.explore import viz
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    out = viz.show(fig, tmp_path / "sub" / "f.png")
    assert out == tmp_path / "sub" / "f.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
    assert viz.show(plt.figure()) is None and not list(tmp_path.glob("*.tmp*"))
