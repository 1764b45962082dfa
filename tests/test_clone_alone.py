"""A clone alone: no shared folder beside it, no KIT_DATA, no network. ``python -m kit reproduce`` must
still execute every notebook's quick profile and the quick sweep (dataset ``auto`` -> the bundled
sample) and report success; a training on rebuilt MNIST-rot must fail with a message that says how to
fetch raw MNIST or use the sample. About three minutes (all notebooks, five one-epoch sweep runs)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(1500)
def test_reproduce_from_a_clone_with_no_data(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to clone")
    clone = tmp_path / "eqkit"                              # tmp/eqkit/../shared does not exist
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("KIT_DATA", "PYTHONPATH")}
    env.update(PYTHONPATH=str(clone), KIT_OFFLINE="1", KIT_CACHE_DIR=str(tmp_path / "cache"))
    py = [sys.executable, "-c"]

    probe = subprocess.run(py + ["import kit, kit.data as d; print(kit.__file__); print(d.resolve_dataset('auto'))"],
                           cwd=clone, env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    where, auto = probe.stdout.split()
    assert where.startswith(str(clone)) and auto == "mnist-rot-sample", probe.stdout

    fail = subprocess.run([sys.executable, "-m", "kit.run.train", "--model", "cnn-mnist", "--dataset",
                           "mnist-rot-rebuilt", "--epochs", "1"], cwd=clone, env=env, capture_output=True, text=True)
    assert fail.returncode != 0 and "python -m kit data fetch mnist" in fail.stderr \
        and "mnist-rot-sample" in fail.stderr, fail.stderr[-2000:]

    run = subprocess.run([sys.executable, "-m", "kit", "reproduce", "--jobs", "2"], cwd=clone, env=env,
                         capture_output=True, text=True)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "0 failed" in out and "(with failures)" not in out, out[-4000:]
    report = (clone / "runs" / "quick" / "report.md").read_text()
    assert "bundled 500-digit sample" in report or "mnist-rot-sample" in report, report[:2000]
