"""kit.run.sweeps and `python -m kit sweep/report`: spec validation with helpful errors, runs executed by
papermill into runs/<sweep>/<run>/, finished runs skipped on re-run, interrupted ones resumed, a
failing run reported without stopping the others, the local pool, submitit's local executor, and
the report beside the registry's paper numbers. Runs train on tiny synthetic data."""
from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from kit.run import sweeps as runs, train
from kit.__main__ import main as kit_main

# each run: cnn-mnist, 1 epoch on 64 synthetic images (a few seconds, mostly the kernel start)
BASE = dict(DATASET="synthetic", PRESET="mnist-quick", EPOCHS=1, TRAIN_SUBSET=64, VAL_SUBSET=32, TEST_SUBSET=32,
            THREADS=1)


def _spec(tmp_path, name="t", **extra):
    spec = dict(name=name, parameters=dict(BASE), grid={"MODEL": ["cnn-mnist"]}, run_name="{MODEL}_s{SEED}")
    spec.update(extra)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_spec_errors_list_the_valid_names(tmp_path):
    with pytest.raises(ValueError,
                       match=r"unknown parameter\(s\) \['EPOCH'\] of train.ipynb; valid parameters: .*EPOCHS"):
        runs.load_spec(_spec(tmp_path, parameters={"EPOCH": 1}), runs_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown model .p5-mnist.; valid names: cnn-mnist, .*p4-mnist"):
        runs.load_spec(_spec(tmp_path, grid={"MODEL": ["p5-mnist"]}), runs_dir=tmp_path)
    with pytest.raises(ValueError, match="valid datasets: auto, mnist-rot, mnist-rot-rebuilt"):
        runs.load_spec(_spec(tmp_path, parameters={**BASE, "DATASET": "mnist"}), runs_dir=tmp_path)
    with pytest.raises(ValueError, match="valid presets: mnist-quick"):
        runs.load_spec(_spec(tmp_path, parameters={**BASE, "PRESET": "e4"}), runs_dir=tmp_path)
    with pytest.raises(ValueError, match="valid fields: optimizer, lr"):
        runs.load_spec(_spec(tmp_path, parameters={**BASE, "OVERRIDES": {"learning_rate": 1}}), runs_dir=tmp_path)
    with pytest.raises(ValueError, match="set by the sweep runner"):
        runs.load_spec(_spec(tmp_path, parameters={**BASE, "OUT_DIR": "x"}), runs_dir=tmp_path)
    with pytest.raises(ValueError, match="valid keys: name, notebook"):
        runs.load_spec(_spec(tmp_path, grids={}), runs_dir=tmp_path)
    with pytest.raises(ValueError, match="valid executors: local, slurm"):
        runs.run_sweep(_spec(tmp_path), executor="pbs", runs_dir=tmp_path)
    # expansion: grid x explicit runs, names, optional models left out
    sw = runs.load_spec(_spec(tmp_path, grid={"MODEL": ["cnn-mnist", "p4-mnist"], "SEED": [0, 1]},
                              runs=[{"name": "extra", "MODEL": "p4m-mnist"}, {"MODEL": "not-yet-registered"}],
                              optional=["not-yet-registered"]), runs_dir=tmp_path)
    assert [r.name for r in sw.runs] == ["cnn-mnist_s0", "cnn-mnist_s1", "p4-mnist_s0", "p4-mnist_s1", "extra"]
    assert sw.skipped and "not registered" in sw.skipped[0][1]
    assert sw.runs[-1].dir == tmp_path / "t" / "extra" and sw.runs[-1].params["EPOCHS"] == 1


def test_sweep_skips_finished_resumes_interrupted_reports_failures(tmp_path, capsys, monkeypatch):
    spec = tmp_path / "sw.yaml"
    spec.write_text(yaml.safe_dump(dict(name="sw", parameters=BASE,
                                        runs=[{"name": "cnn-mnist_s1", "MODEL": "cnn-mnist", "SEED": 1, "EPOCHS": 2},
                                              {"name": "diverges", "MODEL": "cnn-mnist",
                                               "OVERRIDES": {"batch_size": 1000, "drop_last": True}}])))
    sw = runs.load_spec(spec, runs_dir=tmp_path)
    # an interrupted run: s1 was killed after its first of two epochs (same settings as the notebook's)
    d1 = sw.dir / "cnn-mnist_s1"
    kw = dict(preset="mnist-quick", epochs=2, seed=1, train_subset=64, val_subset=32, test_subset=32,
              progress=False, log=lambda *_: None, threads=1)          # the runs' THREADS: same reductions
    train.train("cnn-mnist", "synthetic", out_dir=d1, stop_after=1, **kw)
    assert runs.run_status(d1) == "interrupted"

    res = runs.run_sweep(spec, jobs=2, runs_dir=tmp_path)
    st = {r["run"]: r for r in res["results"]}
    assert not res["ok"]
    assert st["cnn-mnist_s1"]["status"] == "finished" and st["cnn-mnist_s1"]["resumed"]
    assert st["diverges"]["status"] == "failed"
    assert "ValueError: the training split has 64 rows, fewer than one batch" in st["diverges"]["error"]
    for name in ("cnn-mnist_s1",):
        d = sw.dir / name
        assert {"params.json", "train.ipynb", "metrics.jsonl", "checkpoint.pt", "summary.json",
                "train_curves.png"} <= {f.name for f in d.iterdir()}
    # the resumed run ends exactly where an uninterrupted one ends
    ref = train.train("cnn-mnist", "synthetic", out_dir=tmp_path / "ref", **kw)
    strip = lambda h: [{k: v for k, v in x.items() if k not in ("time_s", "cpu_s")} for x in h]  # noqa: E731
    assert strip(train.read_metrics(d1)) == strip(train.read_metrics(tmp_path / "ref"))
    assert json.loads((d1 / "summary.json").read_text())["final_test_acc"] == ref["final_test_acc"]
    torch.set_num_threads(2)
    assert (sw.dir / "diverges" / "error.txt").is_file()

    # re-run through the CLI and submitit's local executor: finished runs skipped (never submitted),
    # the failing one tried again and reported
    capsys.readouterr()
    rc = kit_main(["sweep", str(spec), "--runs-dir", str(tmp_path), "--executor", "submitit-local", "--report"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "cnn-mnist_s1: skipped" in out and "diverges: failed" in out
    assert "1 failed" in out and "FAILED diverges" in out
    assert (sw.dir / ".submitit").is_dir()

    # the report: markdown + CSV + figure
    rep = runs.report("sw", runs_dir=tmp_path)
    md = rep["markdown"].read_text()
    assert "best test acc % over epochs †" in md and "paper acc % †" in md and "as the papers report" in md
    assert "| cnn-mnist_s1 | cnn-mnist | synthetic |" in md and "| diverges |" in md and "failed" in md
    rows = list(csv.DictReader(rep["csv"].open()))
    assert {r["run"] for r in rows} == {"cnn-mnist_s1", "diverges"}
    assert rep["figure"].stat().st_size > 10_000
    with pytest.raises(FileNotFoundError, match="sweeps there: .*sw"):
        runs.report("nope", runs_dir=tmp_path)


    # the report puts the registry's published number beside the measured one (a stand-in card here)
    from kit import models
    card = models.model_card("cnn-mnist")
    monkeypatch.setitem(models._REGISTRY, "cnn-mnist",
                        card.__class__(**{**card.__dict__, "reported": {"accuracy": 98.5, "params": 12345,
                                                                         "source": "a paper"}}))
    summ = json.loads((sw.dir / "cnn-mnist_s1" / "summary.json").read_text())
    summ.update(dataset="mnist-rot-rebuilt", rebuilt=True)
    (sw.dir / "cnn-mnist_s1" / "summary.json").write_text(json.dumps(summ))
    md = runs.report(sw.dir)["markdown"].read_text()
    assert "98.50" in md and "12,345" in md and "a paper" in md and "mnist-rot-rebuilt (rebuilt)" in md


def test_only_takes_comma_separated_globs(tmp_path):
    """Every ``--only`` (bench, sweep, zoo export) follows one rule: a glob or comma-separated globs."""
    from kit._io import name_matches
    assert name_matches("p4-mnist", "p4*,e4-*") and name_matches("e4-mnist-normal", "p4*, e4-*")
    assert not name_matches("p4m-mnist", "p4-*,e4-*") and name_matches("x", None) and not name_matches("x", "")
    spec = _spec(tmp_path, grid={"MODEL": ["cnn-mnist", "p4-mnist", "p4m-mnist"]})
    lines = []
    runs.run_sweep(spec, only="cnn-*,p4m-*", dry_run=True, runs_dir=tmp_path, log=lines.append)
    assert [ln.split(":")[0].strip() for ln in lines[1:]] == ["cnn-mnist_s0", "p4m-mnist_s0"], lines
