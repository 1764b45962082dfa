"""Every notebook executes end to end with papermill in its quick profile and writes its figures;
committed notebooks carry no outputs and have a tagged parameters cell."""
import json
from pathlib import Path

import pytest

from kit import models
from kit.explore.viz import MIN_SCREEN_PT
from kit.run.notebooks import execute, notebook_paths

NOTEBOOKS = notebook_paths()

# Notebook 06 opens the trained separable zoo models by default (PRETRAINED = True); while their weights
# are not in kit/weights it runs its untrained path, without the two figures that need trained kernels.
SEP_ZOO = ("sep-se2-mnist-small", "sep-sim2-mnist-small", "dsep-se2-mnist-small")
SEP_TRAINED = set(SEP_ZOO) <= set(models.list_models(pretrained=True))

EXPECTED_FIGURES = {
    "01_equivariance_primer.ipynb": ["primer_feature_maps.png", "primer_group_axis.png",
                                     "primer_error_vs_angle.png"],
    "03_e4_dynamic_filters.ipynb": ["e4_dynamic_filters.png", "e4_trained_vs_initial.png", "e4_filter_rotation.png",
                                    "e4_static_vs_dynamic.png", "e4_affine_break.png", "e4_cost.png"],
    "02_kernel_redundancy.ipynb": ["redundancy_rank1_trained.png", "redundancy_rank1_init.png",
                                   "redundancy_spectra.png", "redundancy_explained_variance.png",
                                   "redundancy_summary.png"],
    "06_separable_lie_groups.ipynb": ["separable_kernel_function.png", "separable_kernel_function_sim2.png",
                                      "separable_vs_nonseparable.png", "separable_error_vs_angle.png"]
                                     + (["separable_trained_vs_initial.png", "separable_redundancy_trained.png"]
                                        if SEP_TRAINED else []),
    "05_neural_epdo.ipynb": ["epdo_coefficients.png", "epdo_trained_vs_initial.png", "epdo_rotation.png",
                             "epdo_discretisations.png", "epdo_error_vs_angle.png", "epdo_precision_by_depth.png"],
    "train.ipynb": ["train_curves.png"],
    "08_trained_zoo.ipynb": ["zoo_error_vs_angle.png"],
    "04_pdo_stencils.ipynb": ["pdo_stencil_gallery.png", "pdo_rotated_kernels.png", "pdo_error_vs_angle.png",
                              "pdo_convergence.png"],
    "07_equivariance_benchmark.ipynb": ["bench/error_vs_angle.png", "bench/throughput.png"],
}

# In the test suite the figures folder is empty, so notebook 07 would measure everything (~6 min):
# a few entries at coarse angles exercise the same code. (`make reproduce` keeps the committed results.)
TEST_PARAMETERS = {
    "07_equivariance_benchmark.ipynb": {"ONLY": "cnn-conv,p4-gconv,escnn-c4,p4-mnist", "ANGLE_STEP": 45,
                                        "REPEATS": 1},
    "06_separable_lie_groups.ipynb": {"PRETRAINED": SEP_TRAINED},
}

# Notebooks whose default (PRETRAINED = True) opens a trained zoo model: without its weights in
# kit/weights the notebook raises the zoo's error, so the test skips with the reason.
NEEDS_WEIGHTS = {
    "03_e4_dynamic_filters.ipynb": "e4-mnist-normal",
    "05_neural_epdo.ipynb": "nepdo-mnist-regular-fd-small",
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_is_clean(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert not any(c.get("outputs") or c.get("execution_count") for c in code), "strip outputs before committing"
    assert "parameters" in code[0].get("metadata", {}).get("tags", []), "first code cell must be tagged 'parameters'"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_and_writes_legible_figures(path, tmp_path, monkeypatch):
    """... and every figure it shows (viz.show, audited through KIT_FIGURE_AUDIT) keeps its smallest text
    >= MIN_SCREEN_PT on screen at JupyterLab's default notebook width (a class can read it)."""
    need = NEEDS_WEIGHTS.get(path.name)
    if need and need not in models.list_models(pretrained=True):
        pytest.skip(f"{path.name} opens the trained {need} by default; its zoo weights are not in kit/weights yet "
                    f"(make zoo)")
    audit = tmp_path / "figure_audit.jsonl"
    monkeypatch.setenv("KIT_FIGURE_AUDIT", str(audit))
    out = execute(path, tmp_path / "runs", figures_dir=tmp_path / "figures",
                  parameters=TEST_PARAMETERS.get(path.name))
    nb = json.loads(out.read_text())
    errors = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    for name in EXPECTED_FIGURES.get(path.name, []):
        f = tmp_path / "figures" / name
        assert f.exists() and f.stat().st_size > 10_000, name
    rows = [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []
    shown = {Path(r["path"]).resolve().relative_to((tmp_path / "figures").resolve()).as_posix()
             for r in rows if r["path"]}
    assert set(EXPECTED_FIGURES.get(path.name, [])) <= shown, "every figure goes through viz.show"
    small = [(Path(r["path"] or "-").name, r["min_pt"], r["text"]) for r in rows if r["min_pt"] < MIN_SCREEN_PT]
    assert not small, f"text below {MIN_SCREEN_PT} pt at notebook width: {small}"


def test_outputs_go_where_the_notebook_folder_says(tmp_path, monkeypatch):
    """A relative FIGURES_DIR / OUT_DIR means "from the notebooks' folder", whatever the working
    directory papermill or Jupyter started in; every notebook resolves it so."""
    import json

    from kit.run.notebooks import NOTEBOOKS, notebook_path
    monkeypatch.chdir(tmp_path)
    assert notebook_path("../figures") == (NOTEBOOKS.parent / "figures").resolve()
    assert notebook_path(tmp_path / "abs") == tmp_path / "abs"
    for nb in sorted(NOTEBOOKS.glob("*.ipynb")):
        code = "".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code")
        if "FIGURES_DIR" in code:
            assert "notebook_path(FIGURES_DIR)" in code and "Path(FIGURES_DIR)" not in code, nb.name
