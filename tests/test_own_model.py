"""The README's "Your own model" runs as written: the C8 network file, its check, a training, the
model back from the run folder with kit.load_run, and the same model in a sweep, found beside the spec."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _readme_blocks():
    text = (ROOT / "README.md").read_text()
    sec = text.split("### Your own model", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", sec, re.S)


def test_the_readme_example_runs_as_written(tmp_path):
    model_src, usage = _readme_blocks()
    (tmp_path / "mymodel.py").write_text(model_src)
    script = usage + textwrap_check
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KIT_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "exact" in r.stdout and "interp." in r.stdout and "LOADED OK" in r.stdout, r.stdout[-2000:]


textwrap_check = '''
x = torch.rand(4, 1, 28, 28)
assert summary is not None and summary["epochs_done"] == 1 and summary["dataset"] == "mnist-rot-sample"
state = kit.run.train.load_checkpoint("runs/mine/checkpoint.pt")["model"]
assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
assert not model.training
with torch.no_grad():
    assert torch.allclose(fast(x), model(x), rtol=1e-4, atol=1e-5)
print("LOADED OK")
'''


def test_load_run_errors_are_clear(tmp_path):
    from kit import load_run
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt in"):
        load_run(tmp_path)
    from kit.run.train import build_model
    with pytest.raises(ModuleNotFoundError, match=r"model 'nomodule:build': no module 'nomodule' on sys.path"):
        build_model("nomodule:build")


def test_a_sweep_finds_the_model_beside_its_spec(tmp_path, monkeypatch):
    from kit.run import sweeps
    model_src, _ = _readme_blocks()
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "mymodel_sweep.py").write_text(model_src)
    spec = proj / "mine.yaml"
    spec.write_text(yaml.safe_dump(dict(name="mine", parameters=dict(
        MODEL="mymodel_sweep:build", DATASET="synthetic", PRESET="mnist-quick", EPOCHS=1, TRAIN_SUBSET=64,
        VAL_SUBSET=32, TEST_SUBSET=32, THREADS=1))))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)                       # neither the working directory nor PYTHONPATH has it
    monkeypatch.setenv("KIT_MODEL_PATH", "")            # (restored after the test: run_sweep extends it)
    res = sweeps.run_sweep(spec, runs_dir=tmp_path / "runs", log=lambda *a: None)
    assert res["ok"], res
    from kit import load_run
    model, summary = load_run(tmp_path / "runs" / "mine" / "run")
    assert summary["model"] == "mymodel_sweep:build" and model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
