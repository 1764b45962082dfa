"""kit.run.train: presets with the papers' values, the schedule, exact resume after a kill, NaN stop,
clear errors, summaries, and DDP through torchrun (2 gloo processes) against one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from kit import data
from kit.run import train
from kit.run.train import PRESETS, get_recipe, lr_at

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ recipes
def test_presets_carry_the_papers_values():
    e4 = PRESETS["e4-mnist-rot"]
    assert (e4.optimizer, e4.lr, e4.weight_decay, e4.batch_size, e4.milestones, e4.gamma) == \
        ("adam", 0.02, 1e-4, 128, (60, 120, 160), 0.1)
    assert e4.reset_optimizer_each_epoch and e4.augmentation == "none" and not e4.val
    c = PRESETS["e4-cifar"]
    assert (c.optimizer, c.lr, c.momentum, c.nesterov, c.weight_decay, c.gamma, c.epochs, c.batch_size,
            c.normalise) == ("sgd", 0.1, 0.9, True, 5e-4, 0.2, 200, 128, "e4")
    s = PRESETS["separable-mnist-rot"]
    assert (s.optimizer, s.lr, s.schedule, s.batch_size, s.epochs) == ("adam", 1e-4, "cosine", 64, 300)
    n = PRESETS["neural-epdo-mnist-rot"]
    assert (n.lr, n.batch_size, n.augmentation) == (2e-3, 64, "rotate")
    assert [lr_at(n, e) for e in (59, 60, 120, 150, 180)] == pytest.approx([2e-3, 2e-4, 1e-4, 5e-5, 2.5e-5])
    assert [lr_at(e4, e) for e in (0, 59, 60, 120, 160, 198)] == pytest.approx([0.02, 0.02, 2e-3, 2e-4, 2e-5, 2e-5])
    p = PRESETS["pdo-econv-mnist"]
    assert [lr_at(p, e) for e in (0, 5, 6, 99, 100, 150)] == pytest.approx([1e-4, 1e-4, 1e-3, 1e-3, 1e-4, 1e-5])
    assert p.drop_last and p.batch_size == 128
    assert lr_at(s, 0) == 1e-4 and lr_at(s, 150) == pytest.approx(5e-5) and lr_at(s, 300) == pytest.approx(0)
    assert lr_at(PRESETS["pdo-econv-cifar"], 224) == 0.01 and lr_at(PRESETS["pdo-econv-cifar"], 225) == 0.001


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid presets: mnist-quick, e4-mnist-rot"):
        get_recipe("e4-mnist")
    with pytest.raises(ValueError, match=r"unknown recipe field\(s\) \['learning_rate'\]; valid fields: optimizer, lr"):
        get_recipe("mnist-quick", learning_rate=1)
    with pytest.raises(ValueError, match="valid names: cnn-mnist"):
        train.train("p5-mnist", "synthetic", epochs=1, progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="schedule must be one of"):
        get_recipe("mnist-quick", schedule="linear")


def test_augmentations_keep_shape_and_are_reproducible():
    x = torch.rand(4, 3, 32, 32)
    for kind in train.AUGMENTATIONS:
        a = train.augment(x, kind, torch.Generator().manual_seed(1))
        b = train.augment(x, kind, torch.Generator().manual_seed(1))
        assert a.shape == x.shape and torch.equal(a, b)
    with pytest.raises(ValueError, match="valid: none, rotate, crop-flip"):
        train.augment(x, "mixup", torch.Generator())


# ------------------------------------------------------------------------------------ exact resume
class TinyNet(nn.Module):
    """Conv + BN + dropout: every piece of state a resume must restore."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.3),
                               nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(96, 10))

    def forward(self, x):
        return self.f(x)


def _net(seed=0):
    torch.manual_seed(seed)
    return TinyNet()


def _bundle():
    return data.load_dataset("synthetic", train_subset=64, val_subset=32, test_subset=32)


_KW = dict(preset="mnist-quick", epochs=3, batch_size=16, augmentation="crop-flip", crop_pad=2,
           progress=False, log=lambda *_: None)


def _strip(hist):
    return [{k: v for k, v in h.items() if k not in ("time_s", "cpu_s")} for h in hist]


def test_killed_run_resumes_to_exactly_the_uninterrupted_result(tmp_path):
    full = train.train(_net(), _bundle(), out_dir=tmp_path / "a", **_KW)
    w_full = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]

    # "killed" after epoch 1: an exception escapes right after the epoch's checkpoint
    def kill(epoch, rec):
        if epoch == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train.train(_net(), _bundle(), out_dir=tmp_path / "b", callback=kill, **_KW)
    assert len(train.read_metrics(tmp_path / "b")) == 1 and not (tmp_path / "b" / "summary.json").exists()
    torch.manual_seed(999)                             # disturb every RNG the loop uses
    resumed = train.train(_net(seed=5), _bundle(), out_dir=tmp_path / "b", **_KW)
    w_res = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert w_full.keys() == w_res.keys()
    for k in w_full:
        assert torch.equal(w_full[k], w_res[k]), k
    assert _strip(train.read_metrics(tmp_path / "a")) == _strip(train.read_metrics(tmp_path / "b"))
    for k in ("final_test_acc", "test_acc_at_best_val", "best_test_acc_over_epochs", "final_train_loss"):
        assert full[k] == resumed[k]
    # stop_after (a clean stop) then resume, too; and a finished run returns its summary at once
    train.train(_net(), _bundle(), out_dir=tmp_path / "c", stop_after=2, **_KW)
    train.train(_net(), _bundle(), out_dir=tmp_path / "c", **_KW)
    assert _strip(train.read_metrics(tmp_path / "c")) == _strip(train.read_metrics(tmp_path / "a"))
    again = train.train(_net(), _bundle(), out_dir=tmp_path / "a", **_KW)
    assert again["final_test_acc"] == full["final_test_acc"]
    # other settings in the same folder: refused
    with pytest.raises(ValueError, match="other settings"):
        train.train(_net(), _bundle(), out_dir=tmp_path / "a", **{**_KW, "batch_size": 32})


def test_summary_metrics_files_and_labels(tmp_path):
    s = train.train(_net(), _bundle(), out_dir=tmp_path, test_every=2, **{**_KW, "epochs": 3})
    hist = train.read_metrics(tmp_path)
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert [("test_acc" in h) for h in hist] == [False, True, True]           # every 2nd epoch and the last
    assert s["device"] == "cpu" and s["finished"] and s["epochs_done"] == 3
    assert s["final_test_acc"] == hist[-1]["test_acc"]
    assert s["best_test_acc_over_epochs"] == max(h["test_acc"] for h in hist if "test_acc" in h)
    assert "as the papers report" in s["best_test_acc_over_epochs_label"]
    assert json.loads((tmp_path / "summary.json").read_text())["final_test_acc"] == s["final_test_acc"]
    assert "best test accuracy over epochs (as the papers report" in train.summary_table(s)
    assert not list(tmp_path.glob(".*tmp"))                                     # no temporary files left
    fig = train.curves_figure(tmp_path)
    assert len(fig.axes) == 2


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
    b = _bundle()
    b.train.images[5, 0, 3, 3] = float("nan")
    with pytest.raises(train.NonFiniteLossError,
                       match=r"loss is nan at epoch 1, batch \d+/4 .*Lower the learning rate"):
        train.train(_net(), b, out_dir=tmp_path, **_KW)


# ----------------------------------------------------------------------------------------- DDP
_DDP_MODEL = textwrap.dedent("""
    import torch, torch.nn as nn
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                             nn.Linear(64, 10))
""")


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    (tmp_path / "ddp_model.py").write_text(_DDP_MODEL)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kit.run.train",
            "--model", "ddp_model:build", "--dataset", "synthetic", "--epochs", "2",
            "--train-subset", "96", "--val-subset", "32", "--test-subset", "32", "--threads", "1", "--no-progress",
            "--set", "batch_size=32", "--set", "augmentation=\"crop-flip\"", "--set", "crop_pad=2"]
    sys.path.insert(0, str(tmp_path))                  # one process, in this one
    try:
        train.train("ddp_model:build", "synthetic", epochs=2, train_subset=96, val_subset=32, test_subset=32,
                    out_dir=tmp_path / "one", batch_size=32, augmentation="crop-flip", crop_pad=2, progress=False,
                    log=lambda *_: None)
    finally:
        sys.path.remove(str(tmp_path))
    two = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "two")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s1["world_size"] == 1 and s2["world_size"] == 2
    h1, h2 = train.read_metrics(tmp_path / "one"), train.read_metrics(tmp_path / "two")
    for a, b in zip(h1, h2):
        for k in ("train_loss", "val_loss", "test_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (k, a[k], b[k])
        assert a["train_acc"] == b["train_acc"]
    w1 = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["model"]
    w2 = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["model"]
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-6)


class _RunsCode:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_checkpoints_load_weights_only_and_a_crafted_one_is_refused(tmp_path, monkeypatch):
    from kit.run.train import load_checkpoint
    s = train.train("cnn-mnist", "synthetic", preset="mnist-quick", epochs=1, train_subset=32, val_subset=16,
              test_subset=16, out_dir=tmp_path / "run", progress=False, log=lambda *_: None)
    assert s["finished"]
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)      # no pickled objects at all
    assert isinstance(ck["rng"][0]["numpy"]["key"], torch.Tensor)
    monkeypatch.chdir(tmp_path)
    torch.save({"model": _RunsCode()}, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint.pt is not a safe eqkit checkpoint"):
        load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"not a safe eqkit checkpoint"):
        train.train("cnn-mnist", "synthetic", preset="mnist-quick", epochs=2, train_subset=32, val_subset=16,
              test_subset=16, out_dir=tmp_path / "run", progress=False, log=lambda *_: None)
    assert not (tmp_path / "PWNED").exists()
