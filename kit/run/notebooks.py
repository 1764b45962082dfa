"""Execute the kit's notebooks with papermill (their defaults are the quick profile).

``python -m kit reproduce`` runs every ``notebooks/*.ipynb`` into ``runs/notebooks/`` and lets the
notebooks write their figures into ``figures/``. Executed copies never overwrite the committed,
output-free notebooks.
"""
from __future__ import annotations

import time
from pathlib import Path

from .._compat import require
from .._io import REPO_DIR

__all__ = ["REPO", "notebook_paths", "notebook_path", "execute"]

REPO = REPO_DIR
NOTEBOOKS = REPO / "notebooks"


def notebook_path(path) -> Path:
    """A notebook's output folder as the notebook means it: a relative path (the default
    ``FIGURES_DIR = "../figures"``) is taken from the notebooks' folder, whatever the working directory
    papermill or Jupyter was started in; an absolute one is kept."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (NOTEBOOKS / p).resolve()


def notebook_paths(folder: str | Path | None = None, pattern: str = "*.ipynb") -> list[Path]:
    """The notebooks to run, sorted by name."""
    folder = Path(folder) if folder is not None else REPO / "notebooks"
    paths = sorted(p for p in folder.glob(pattern) if not p.name.startswith("."))
    if not paths:
        raise FileNotFoundError(f"no notebooks matching {pattern!r} in {folder}")
    return paths


def execute(path: str | Path, out_dir: str | Path, *, figures_dir: str | Path | None = None,
            parameters: dict | None = None, kernel_name: str = "python3", timeout: int = 900) -> Path:
    """Run one notebook with papermill; return the executed copy's path.

    ``FIGURES_DIR`` is injected as an absolute path (default: the repository's ``figures/``) so that
    the notebook writes its figures there whatever the working directory. Batch runs are not
    interactive: where the notebook declares an ``INTERACTIVE`` parameter it is set to ``False``
    (building ipywidgets under nbclient can block a cell forever: jupyter/nbclient#312,
    nteract/papermill#723; the widgets are tested headless in ``tests/test_widgets.py`` and in a
    real browser instead). ``timeout`` is per cell, in seconds.
    """
    pm = require("papermill", "run", feature="executing the notebooks")

    path, out_dir = Path(path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    declared = pm.inspect_notebook(str(path))
    params = {"FIGURES_DIR": str(Path(figures_dir or REPO / "figures").resolve())}
    if "INTERACTIVE" in declared:
        params["INTERACTIVE"] = False
    params.update(parameters or {})
    out = out_dir / path.name
    t = time.time()
    pm.execute_notebook(str(path), str(out), parameters=params, kernel_name=kernel_name,
                        cwd=str(path.parent), progress_bar=False, execution_timeout=timeout)
    print(f"  {path.name}: executed in {time.time() - t:.0f} s -> {out}")
    return out
