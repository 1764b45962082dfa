"""ipywidgets explorers: thin wrappers that redraw a :mod:`kit.explore.viz` figure when a control moves.

Every explorer of the kit is built by :func:`explorer`: an ``ipywidgets`` container whose ``state``
dict holds the figure shown now and a draw counter; the figure is re-rendered into an ``Output``
(``clear_output(wait=True)``: no flicker). Sliders use ``continuous_update=False`` because every
redraw runs the networks.
"""
from __future__ import annotations

import ipywidgets as W
import matplotlib.pyplot as plt
from IPython.display import display

from . import viz

__all__ = ["explorer", "rotation_explorer"]


def explorer(rows, render):
    """The one explorer scheme of the kit: ``rows`` of controls (a widget, or a list of widgets shown
    side by side) above one ``Output``; ``render() -> (figure, args)`` is drawn now and again whenever a
    control's value changes (sliders should use ``continuous_update=False``). Returns the ``VBox``;
    its ``state = {"draws", "figure", "args"}`` says what is shown now (the tests read it)."""
    shown = [W.HBox(list(r)) if isinstance(r, (list, tuple)) else r for r in rows]
    rows = [list(r) if isinstance(r, (list, tuple)) else [r] for r in rows]
    out = W.Output()
    box = W.VBox(shown + [out])
    box.state = {"draws": 0, "figure": None, "args": None}

    def draw(*_):
        fig, args = render()
        box.state.update(draws=box.state["draws"] + 1, figure=fig, args=args)
        with out:
            out.clear_output(wait=True)
            display(fig)
        plt.close(fig)

    for w in (w for r in rows for w in r):
        w.observe(draw, names="value")
    draw()
    return box


def rotation_explorer(cnn, gcnn, x, *, angle: float = 45.0, step: float = 5.0):
    """Rotate the digit with a slider; see CNN and G-CNN first-layer feature maps side by side."""
    slider = W.FloatSlider(value=angle, min=0, max=360, step=step, description="angle (°)",
                           continuous_update=False, readout_format=".0f",
                           layout=W.Layout(width="420px"))
    channel = W.IntSlider(value=0, min=0, max=min(8, gcnn.layers[0].out_type.n_fields) - 1,
                          description="field", continuous_update=False)

    def render():
        return (viz.feature_maps_figure(cnn, gcnn, x, slider.value, channel=channel.value),
                (slider.value, channel.value))

    return explorer([[slider, channel]], render)
