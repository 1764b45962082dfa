"""eqkit as a library in a researcher's own environment: ``pip install .`` with no extras, into a fresh
venv that already has torch (this machine's, linked in, not reinstalled), installs nothing else, and
the core then builds every registered model and runs the instrument; an explorer or an RBF-FD stencil
says which extra it needs. About a minute (the venv, one wheel build, 30 models at CI size)."""
from __future__ import annotations

import importlib.metadata as md
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CORE = ("torch", "numpy", "ninja")                   # the core dependencies ...
TOOLS = ("pip", "setuptools")                        # ... and the installer and build backend (no isolation)


def _closure(names) -> list[md.Distribution]:
    """The installed distributions ``names`` and everything they require (markers evaluated, no extras)."""
    env, seen, todo, out = default_environment(), set(), list(names), []
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        dist = md.distribution(name)
        out.append(dist)
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
                todo.append(req.name)
    return out


def _link_site(dists, site: Path) -> None:
    """Symlink each distribution's top-level files and folders (its dist-info included) into ``site``."""
    site.mkdir()
    for d in dists:
        base = Path(d.locate_file(""))
        for top in {Path(f).parts[0] for f in d.files or [] if not str(f).startswith("..")}:
            src, dst = base / top, site / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)


@pytest.mark.timeout(900)
def test_core_install_builds_every_model_and_runs_check(tmp_path):
    src = tmp_path / "src"                                  # the package's sources (no build litter in the checkout)
    shutil.copytree(ROOT / "kit", src / "kit", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)   # bare: only what we link
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    _link_site(_closure(CORE + TOOLS), tmp_path / "machine-site")
    (Path(purelib) / "machine_torch.pth").write_text(str(tmp_path / "machine-site") + "\n")

    # no index: everything the core needs must already be there, nothing is fetched or downgraded
    inst = subprocess.run([str(py), "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-cache-dir",
                           str(src)], capture_output=True, text=True)
    assert inst.returncode == 0, inst.stdout[-3000:] + inst.stderr[-3000:]
    assert "Successfully installed eqkit-" in inst.stdout and "torch" not in inst.stdout.split("Successfully installed")[1]

    script = textwrap.dedent('''
        import importlib.util, torch
        for extra_only in ("matplotlib", "ipywidgets", "papermill", "yaml", "rbf", "torchvision"):
            assert importlib.util.find_spec(extra_only) is None, extra_only + " should not be installed"
        import kit, kit.models as M
        from kit.equivariance import check, max_error
        assert "site-packages" in kit.__file__, kit.__file__
        names = M.list_models()
        for n in names:
            card = M.model_card(n)
            m = M.create_ci(n).eval()
            y = m(torch.rand(2, *card.input_shape))
            assert y.shape == (2, card.num_classes) and torch.isfinite(y).all(), n
        m = M.calibrate_batchnorm(M.create("p4-mnist"), torch.rand(64, 1, 28, 28))
        err = max_error(check(m))                            # real digits: the bundled sample is package data
        assert err < 1e-5, err
        for mod, extra in (("kit.explore.viz", "lab"), ("kit.explore.e4", "lab")):
            try:
                __import__(mod)
            except ImportError as e:
                assert f"pip install 'eqkit[{extra}]'" in str(e), str(e)
            else:
                raise AssertionError(mod + " imported without the lab extra")
        from kit.kernels.stencils import stencil
        try:
            stencil(1, 0, method="rbffd")
        except ImportError as e:
            assert "pip install 'eqkit[rbf]'" in str(e) and "RBF-FD" in str(e), str(e)
        else:
            raise AssertionError("rbffd without the rbf extra")
        print("ok", len(names), "models", f"{err:.1e}")
    ''')
    run = subprocess.run([str(py), "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout[-3000:] + run.stderr[-5000:]
