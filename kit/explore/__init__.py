"""Explorers: the figures and widgets the notebooks show (one Lab, one show). Needs eqkit's ``[lab]``
extra (matplotlib, ipywidgets, plotly): importing any explorer without it says so."""
from .._compat import require

for _module in ("matplotlib", "ipywidgets"):
    require(_module, "lab", feature="kit.explore (the notebooks' figures and widgets)")
