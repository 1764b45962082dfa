"""ipywidgets explorers: thin wrappers that redraw a :mod:`kit.viz` figure when a control moves.

Each explorer returns an ``ipywidgets`` container whose ``state`` dict holds the figure shown now
and a draw counter; the figure is re-rendered into an ``Output`` (``clear_output(wait=True)``: no
flicker). Sliders use ``continuous_update=False`` because every
redraw runs the networks.
"""
from __future__ import annotations

import ipywidgets as W
import matplotlib.pyplot as plt
from IPython.display import display

from . import viz

__all__ = ["rotation_explorer"]


def rotation_explorer(cnn, gcnn, x, *, angle: float = 45.0, step: float = 5.0):
    """Rotate the digit with a slider; see CNN and G-CNN first-layer feature maps side by side."""
    slider = W.FloatSlider(value=angle, min=0, max=360, step=step, description="angle (°)",
                           continuous_update=False, readout_format=".0f",
                           layout=W.Layout(width="420px"))
    channel = W.IntSlider(value=0, min=0, max=min(8, gcnn.layers[0].out_type.n_fields) - 1,
                          description="field", continuous_update=False)
    out = W.Output()
    box = W.VBox([W.HBox([slider, channel]), out])
    box.state = {"draws": 0, "figure": None, "args": None}   # what is shown now (read by tests)

    def draw(*_):
        fig = viz.feature_maps_figure(cnn, gcnn, x, slider.value, channel=channel.value)
        box.state.update(draws=box.state["draws"] + 1, figure=fig, args=(slider.value, channel.value))
        with out:
            out.clear_output(wait=True)
            display(fig)
        plt.close(fig)

    slider.observe(draw, names="value")
    channel.observe(draw, names="value")
    draw()
    return box
