"""Bad input gets one clear line: the command line exits 2 with the cause (file and line for a YAML
error, the valid names for an unknown key, the pending runs for an empty report), no traceback unless
``--debug``; the library raises errors that name the layer, the dtype and the device; a dry run writes
nothing."""
from __future__ import annotations

import re

import pytest
import torch
import yaml

from kit import models
from kit.__main__ import main as kit_main
from kit._compat import resolve_device


def _run(capsys, argv):
    rc = kit_main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: bad\nparameters:\n  EPOCHS: [1\n  SEED: 0\n")
    rc, _, err = _run(capsys, ["sweep", str(spec)])
    assert rc == 2 and err.count("\n") == 1, err                          # one line, no traceback
    assert f"{spec}:4:" in err and "YAML syntax error" in err and "Traceback" not in err


def test_missing_spec_unknown_key_and_unknown_set_parameter(tmp_path, capsys):
    rc, _, err = _run(capsys, ["sweep", str(tmp_path / "none.yaml")])
    assert rc == 2 and "none.yaml not found" in err
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "s", "paramters": {"EPOCHS": 1}}))
    rc, _, err = _run(capsys, ["sweep", str(spec)])
    assert rc == 2 and "unknown key(s) ['paramters']" in err and "valid keys:" in err
    rc, _, err = _run(capsys, ["sweep", "sweeps/quick.yaml", "--dry-run", "--set", "EPOCH=1"])
    assert rc == 2 and "unknown parameter(s) ['EPOCH']" in err and "EPOCHS" in err
    with pytest.raises(FileNotFoundError):                               # --debug: the exception itself
        kit_main(["sweep", str(tmp_path / "none.yaml"), "--debug"])


def test_dry_run_writes_nothing_and_set_overrides_the_spec(tmp_path, capsys):
    rc, out, _ = _run(capsys, ["sweep", "sweeps/quick.yaml", "--dry-run", "--runs-dir", str(tmp_path / "runs"),
                               "--set", "DATASET=synthetic", "--set", "EPOCHS=2"])
    assert rc == 0 and "(dry run)" in out and '"DATASET": "synthetic"' in out and '"EPOCHS": 2' in out
    assert not (tmp_path / "runs").exists()


def test_report_before_any_run_lists_the_pending_runs_and_paper_targets(tmp_path, capsys):
    rc, _, err = _run(capsys, ["report", "quick", "--runs-dir", str(tmp_path)])
    assert rc == 2 and "has no runs yet" in err and "python -m kit sweep sweeps/quick.yaml" in err
    # the quick sweep's 'auto' dataset is named with what it resolves to here, and the card's target
    assert re.search(r"e4-mnist-normal on auto \(here: mnist-rot-(rebuilt|sample)\), paper 98\.71 %", err), err
    rc, _, err = _run(capsys, ["report", "no-such-sweep", "--runs-dir", str(tmp_path)])
    assert rc == 2 and "no sweep 'no-such-sweep'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_but_absent(capsys):
    with pytest.raises(RuntimeError, match=r"device 'cuda' was asked for, but CUDA is not available here"):
        resolve_device("cuda")
    from kit.run.train import train
    with pytest.raises(RuntimeError, match="use device='cpu' or 'auto'"):
        train("cnn-mnist", "synthetic", device="cuda", epochs=1, progress=False)
    rc, _, err = _run(capsys, ["bench", "--device", "cuda", "--only", "p4-gconv"])
    assert rc == 2 and "CUDA is not available" in err
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    assert resolve_device("auto") == torch.device("cpu")


def test_dtype_and_device_mismatch_names_the_layer():
    m = models.create("p4-mnist").eval()
    with pytest.raises(TypeError, match=r"LiftingConv holds torch.float32 weights on cpu but got a torch.float64 input"):
        m(torch.rand(2, 1, 28, 28, dtype=torch.float64))
    assert m.double()(torch.rand(2, 1, 28, 28, dtype=torch.float64)).dtype == torch.float64   # the fix it names
