"""Batch runs: a sweep spec (YAML) expands to runs; each run is the training notebook executed by
papermill into ``runs/<sweep>/<run>/``; a report gathers every run beside the papers' numbers.

A spec::

    name: quick                       # the folder runs/quick/
    notebook: notebooks/train.ipynb   # default
    description: ...
    parameters:                       # notebook parameters shared by every run
      DATASET: mnist-rot-rebuilt
      EPOCHS: 3
    grid:                             # cartesian product, on top of `parameters`
      MODEL: [cnn-mnist, p4-mnist]
      SEED: [0, 1]
    runs:                             # and/or explicit runs, each on top of `parameters` (not
      - {MODEL: p4-mnist, EPOCHS: 9}  #   crossed with the grid); each may have `name`, `optional: true`
    optional: [e4-mnist-normal]       # runs of these models are left out (with a note) if unregistered
    run_name: "{MODEL}-s{SEED}"       # default: the values that vary, joined by '_'
    slurm: {partition: gpu, gpus_per_node: 1, timeout_min: 600}

Parameter names are checked against the notebook's ``parameters`` cell, and ``MODEL`` /
``DATASET`` / ``PRESET`` / ``OVERRIDES`` values against the registries, before anything runs; an
unknown name fails with a message listing the valid ones. A run whose model is not registered and
that is marked optional (``optional: true`` in ``runs``, or its model listed under ``optional:``) is
left out with a note, so a spec can name models that land later.

Each run folder holds ``params.json``, the executed ``train.ipynb``, ``metrics.jsonl``,
``checkpoint.pt``, ``summary.json`` (written when the run finished) and ``error.txt`` (when it
failed). Running a sweep again skips finished runs and resumes interrupted ones from their
checkpoint; a failing run is reported and does not stop the others. ``jobs`` > 1 runs a local
process pool; ``executor='slurm'`` submits every run with submitit (``'submitit-local'``: its
local executor, used by the tests).
"""
from __future__ import annotations

import ast
import csv
import io
import itertools
import json
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .._compat import require
from .._io import REPO_DIR, atomic_write_json, atomic_write_text, name_matches
from .train import CHECKPOINT_FILE, ERROR_FILE, PARAMS_FILE, RUN_FILE, SUMMARY_FILE

__all__ = ["REPO", "Run", "Sweep", "load_spec", "notebook_parameters", "run_sweep", "execute_run", "report",
           "RESERVED", "EXECUTORS"]

REPO = REPO_DIR
RESERVED = ("OUT_DIR", "FIGURES_DIR", "RESUME")          # set by the runner for every run
SPEC_KEYS = ("name", "notebook", "description", "parameters", "grid", "runs", "run_name", "slurm", "runs_dir",
             "optional")
EXECUTORS = ("local", "slurm", "submitit-local")


@dataclass
class Run:
    name: str
    params: dict
    dir: Path
    notebook: Path
    optional: bool = False


@dataclass
class Sweep:
    name: str
    notebook: Path
    runs: list
    dir: Path
    description: str = ""
    slurm: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)     # (run name, why): optional runs left out
    spec_dir: Path | None = None                    # the spec's folder: 'module:callable' models are found there


def notebook_parameters(path) -> dict:
    """``{name: default}`` of the notebook's cell tagged ``parameters`` (parsed, not executed)."""
    nb = json.loads(Path(path).read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            out = {}
            for node in ast.parse(src).body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    try:
                        out[node.targets[0].id] = ast.literal_eval(node.value)
                    except ValueError:
                        out[node.targets[0].id] = None
            return out
    raise ValueError(f"{path}: no code cell tagged 'parameters'")


def _safe_name(s: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_.=+" else "-" for c in s)
    return keep.strip("-.") or "run"


def _check_values(params: dict, where: str) -> None:
    from .. import data, models
    from . import train
    if "MODEL" in params and isinstance(params["MODEL"], str) and ":" not in params["MODEL"]:
        models.model_card(params["MODEL"])                          # lists the valid names
    if "DATASET" in params and params["DATASET"] != "auto" and params["DATASET"] not in data.DATASETS:
        raise ValueError(f"{where}: unknown dataset {params['DATASET']!r}; valid datasets: auto, "
                         f"{', '.join(data.DATASETS)}")
    if params.get("PRESET") is not None and params["PRESET"] not in train.PRESETS:
        raise ValueError(f"{where}: unknown preset {params['PRESET']!r}; valid presets: {', '.join(train.PRESETS)}")
    if "PRESET" in params and params["PRESET"] is None and isinstance(params.get("MODEL"), str) \
            and ":" not in params["MODEL"]:
        recipe = models.model_card(params["MODEL"]).recipe
        if recipe is not None and recipe not in train.PRESETS:
            raise ValueError(f"{where}: the card of {params['MODEL']!r} names recipe {recipe!r}, which is not a "
                             f"preset; set PRESET (valid presets: {', '.join(train.PRESETS)})")
    if params.get("OVERRIDES"):
        if not isinstance(params["OVERRIDES"], dict):
            raise ValueError(f"{where}: OVERRIDES must be a mapping of recipe fields")
        train.get_recipe(params.get("PRESET") or "mnist-quick", **dict(params["OVERRIDES"]))


def load_spec(spec, runs_dir=None, *, set_params: dict | None = None) -> Sweep:
    """Parse and validate a sweep spec (a YAML path or a dict) into a :class:`Sweep`. ``set_params``
    override the spec's shared ``parameters`` (``python -m kit sweep SPEC --set DATASET=...``), checked
    against the notebook's parameters like every other value."""
    yaml = require("yaml", "run", feature="reading a sweep spec")
    from .. import models

    spec_path = spec
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"sweep spec {path} not found")
        try:
            spec = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:                          # the file, the line, the column, the problem
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
            raise ValueError(f"{where}: YAML syntax error in the sweep spec: {what}") from None
        default_name = path.stem
    else:
        default_name = "sweep"
    if not isinstance(spec, dict):
        raise ValueError("a sweep spec must be a mapping")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in the sweep spec; valid keys: {', '.join(SPEC_KEYS)}")
    name = _safe_name(str(spec.get("name", default_name)))
    nb = Path(spec.get("notebook", "notebooks/train.ipynb"))
    nb = nb if nb.is_absolute() else REPO / nb
    if not nb.is_file():
        raise FileNotFoundError(f"notebook {nb} of sweep {name!r} not found")
    valid = notebook_parameters(nb)
    base = {**dict(spec.get("parameters") or {}), **dict(set_params or {})}
    grid = dict(spec.get("grid") or {})
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ValueError(f"grid entry {k!r} must be a non-empty list, got {v!r}")
    explicit = list(spec.get("runs") or [])
    settable = sorted(set(valid) - set(RESERVED))

    def check_keys(d, where):
        bad = sorted(set(d) - set(valid))
        if bad:
            raise ValueError(f"{where}: unknown parameter(s) {bad} of {nb.name}; "
                             f"valid parameters: {', '.join(settable)}")
        res = sorted(set(d) & set(RESERVED))
        if res:
            raise ValueError(f"{where}: parameter(s) {res} are set by the sweep runner for every run")

    check_keys(base, "parameters")
    check_keys(grid, "grid")
    combos = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())] if grid else []
    entries = [(c, None, False) for c in combos]
    for i, r in enumerate(explicit):
        if not isinstance(r, dict):
            raise ValueError(f"runs[{i}] must be a mapping, got {r!r}")
        r = dict(r)
        rname, optional = r.pop("name", None), bool(r.pop("optional", False))
        check_keys(r, f"runs[{i}]")
        entries.append((r, rname, optional))
    if not entries:
        entries = [({}, None, False)]
    varying = sorted({k for e, _, _ in entries for k in e})
    template = spec.get("run_name")
    root = Path(runs_dir or spec.get("runs_dir") or REPO / "runs")
    root = root if root.is_absolute() else REPO / root
    optional_models = set(spec.get("optional") or [])
    runs, skipped, names = [], [], set()
    for params_i, rname, optional in entries:
        params = {**base, **params_i}
        full = {**valid, **params}
        if rname is None:
            if template:
                try:
                    rname = template.format(**full)
                except KeyError as e:
                    raise ValueError(f"run_name {template!r} uses {e} which is not a parameter; valid: "
                                     f"{', '.join(settable)}") from None
            else:
                rname = "_".join(str(full[k]) for k in varying) or "run"
        rname = _safe_name(str(rname))
        if rname in names:
            raise ValueError(f"two runs of sweep {name!r} are both named {rname!r}; set run_name or names")
        names.add(rname)
        optional = optional or full.get("MODEL") in optional_models
        if optional and isinstance(full.get("MODEL"), str) and full["MODEL"] not in models.list_models():
            skipped.append((rname, f"model {full['MODEL']!r} is not registered"))
            continue
        _check_values(full, f"run {rname!r}")
        runs.append(Run(rname, params, root / name / rname, nb, optional))
    return Sweep(name, nb, runs, root / name, str(spec.get("description", "")), dict(spec.get("slurm") or {}),
                 skipped, spec_dir=path.parent.resolve() if isinstance(spec_path, (str, os.PathLike)) else None)


# =============================================================================================
# Executing runs
# =============================================================================================

def _write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj, default=str)


def run_status(run_dir) -> str:
    """'finished' (summary.json written), 'failed' (error.txt), 'interrupted' (a checkpoint but no
    summary), 'pending'."""
    d = Path(run_dir)
    if (d / SUMMARY_FILE).is_file():
        return "finished"
    if (d / ERROR_FILE).is_file():
        return "failed"
    if (d / CHECKPOINT_FILE).is_file():
        return "interrupted"
    return "pending"


def execute_run(run: Run, threads: int | None = None, timeout: int = 24 * 3600) -> dict:
    """Execute one run (papermill) unless it finished before; never raises: returns
    ``{'run', 'status' ('skipped' | 'finished' | 'failed'), 'seconds', 'error'}``."""
    pm = require("papermill", "run", feature="running a sweep")

    t = time.time()
    d = Path(run.dir)
    d.mkdir(parents=True, exist_ok=True)
    if run_status(d) == "finished":
        return dict(run=run.name, status="skipped", seconds=0.0, error=None)
    resumed = run_status(d) == "interrupted"
    (d / ERROR_FILE).unlink(missing_ok=True)
    params = dict(run.params)
    if threads and "THREADS" in notebook_parameters(run.notebook) and "THREADS" not in params:
        params["THREADS"] = int(threads)
    params.update(OUT_DIR=str(d.resolve()), FIGURES_DIR=str(d.resolve()), RESUME=True)
    _write_json(d / PARAMS_FILE, params)
    try:
        pm.execute_notebook(str(run.notebook), str(d / run.notebook.name), parameters=params,
                            cwd=str(run.notebook.parent), progress_bar=False, log_output=False,
                            execution_timeout=timeout)
        if run_status(d) != "finished":
            raise RuntimeError(f"the notebook ended without writing {d / 'summary.json'}")
        status, err = "finished", None
    except Exception as e:   # noqa: BLE001 -- report, never stop the other runs
        status = "failed"
        if getattr(e, "ename", None):          # papermill: the exception raised inside the notebook
            err = f"{e.ename}: {e.evalue} (in {d / run.notebook.name}, cell {getattr(e, 'exec_count', '?')})"
        else:
            err = f"{type(e).__name__}: {e}".strip()
        (d / ERROR_FILE).write_text(err + "\n\n" + traceback.format_exc())
    return dict(run=run.name, status=status, seconds=round(time.time() - t, 1), error=err,
                resumed=resumed)


def _execute_run_args(args):
    return execute_run(*args)


def run_sweep(spec, *, jobs: int = 1, executor: str = "local", only: str | None = None, runs_dir=None,
              slurm: dict | None = None, threads: int | None = None, dry_run: bool = False,
              set_params: dict | None = None, log=print) -> dict:
    """Run every run of a sweep; return ``{'sweep', 'dir', 'results': [...], 'ok': bool}``.

    ``jobs``: parallel local runs (process pool; each run gets ``cpu_count // jobs`` torch threads
    unless ``THREADS`` is set). ``executor``: 'local', 'slurm' (submitit, options from the spec's
    ``slurm:`` section and ``slurm``) or 'submitit-local'. ``only``: a glob of run names.
    ``dry_run``: list the runs and their status, write nothing. ``set_params``: see :func:`load_spec`.
    ``only`` may list several globs, comma-separated (:func:`kit._io.name_matches`).
    """

    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; valid executors: {', '.join(EXECUTORS)}")
    sw = spec if isinstance(spec, Sweep) else load_spec(spec, runs_dir=runs_dir, set_params=set_params)
    runs = [r for r in sw.runs if name_matches(r.name, only)]
    for name, why in sw.skipped:
        log(f"  {name}: left out ({why}; optional run)")
    log(f"sweep {sw.name}: {len(runs)} run(s) -> {sw.dir} [{executor}, jobs={jobs}]" + (" (dry run)" if dry_run else ""))
    if dry_run:                                                 # reads the run folders, writes nothing
        for r in runs:
            log(f"  {r.name}: {run_status(r.dir)} {json.dumps(r.params)}")
        return dict(sweep=sw.name, dir=str(sw.dir), results=[], ok=True)
    sw.dir.mkdir(parents=True, exist_ok=True)
    # a 'module:callable' model: its module may live beside the spec or where the sweep was started
    from .train import MODEL_PATH_ENV
    here = [str(p) for p in (sw.spec_dir, Path.cwd().resolve()) if p is not None]
    os.environ[MODEL_PATH_ENV] = os.pathsep.join(dict.fromkeys(here + [
        d for d in os.environ.get(MODEL_PATH_ENV, "").split(os.pathsep) if d]))
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    t0 = time.time()
    results = []
    for r in [r for r in runs if run_status(r.dir) == "finished"]:      # never submitted again
        results.append(dict(run=r.name, status="skipped", seconds=0.0, error=None))
        log(_line(results[-1]))
    runs_all, runs = runs, [r for r in runs if run_status(r.dir) != "finished"]
    if executor == "local" and jobs <= 1:
        for r in runs:
            res = execute_run(r, threads)
            results.append(res)
            log(_line(res))
    elif executor == "local":
        import concurrent.futures as cf
        import multiprocessing as mp
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(_execute_run_args, (r, threads)): r for r in runs}
            for f in cf.as_completed(futs):
                try:
                    res = f.result()
                except Exception as e:  # a crashed worker
                    res = dict(run=futs[f].name, status="failed", seconds=None, error=f"{type(e).__name__}: {e}")
                results.append(res)
                log(_line(res))
    else:
        submitit = require("submitit", "run", feature="submitting a sweep to SLURM")
        folder = sw.dir / ".submitit"
        if executor == "slurm":
            ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
            opts = {**sw.slurm, **(slurm or {})}
            opts.setdefault("timeout_min", 24 * 60)
            ex.update_parameters(name=f"eqkit-{sw.name}", **{k if k.startswith("slurm_") or k in (
                "timeout_min", "gpus_per_node", "cpus_per_task", "mem_gb", "nodes", "tasks_per_node", "name")
                else f"slurm_{k}": v for k, v in opts.items()})
        else:
            ex = submitit.LocalExecutor(folder=str(folder))
            ex.update_parameters(timeout_min=int((slurm or {}).get("timeout_min", 60)))
        jobs_ = [(r, ex.submit(execute_run, r, threads)) for r in runs]
        for r, j in jobs_:
            try:
                res = j.result()
            except Exception as e:  # the job itself failed (node failure, timeout)
                res = dict(run=r.name, status="failed", seconds=None, error=f"{type(e).__name__}: {e}")
            results.append(res)
            log(_line(res))
    order = {r.name: i for i, r in enumerate(runs_all)}
    results.sort(key=lambda x: order.get(x["run"], 0))
    failed = [x for x in results if x["status"] == "failed"]
    counts = {s: sum(x["status"] == s for x in results) for s in ("finished", "skipped", "failed")}
    log(f"sweep {sw.name}: {counts['finished']} finished, {counts['skipped']} skipped (done before), "
        f"{counts['failed']} failed in {time.time() - t0:.0f} s")
    for x in failed:
        log(f"  FAILED {x['run']}: {(x['error'] or '').splitlines()[0][:300] if x['error'] else ''} "
            f"(see {sw.dir / x['run'] / 'error.txt'})")
    _write_json(sw.dir / "sweep.json", dict(name=sw.name, notebook=str(sw.notebook), description=sw.description,
                                            runs={r.name: r.params for r in sw.runs}, last_results=results,
                                            skipped=sw.skipped))
    return dict(sweep=sw.name, dir=str(sw.dir), results=results, ok=not failed)


def _line(res: dict) -> str:
    extra = " (resumed)" if res.get("resumed") else ""
    secs = f" in {res['seconds']:.0f} s" if res.get("seconds") else ""
    err = f": {res['error'].splitlines()[0][:200]}" if res.get("error") else ""
    return f"  {res['run']}: {res['status']}{extra}{secs}{err}"


# =============================================================================================
# Report
# =============================================================================================

def _paper_numbers(model: str, dataset: str, fraction=1.0) -> tuple:
    """(accuracy %, params, note) the model's card reports for this kind of dataset, or Nones
    (also for a fraction of the training set: the cards hold full-data numbers)."""
    from .. import models
    if fraction not in (None, 1, 1.0):
        return None, None, ""
    try:
        card = models.model_card(model)
    except ValueError:
        return None, None, ""
    rep = card.reported or {}
    acc = None
    suffix = f"_{dataset}" if dataset.startswith("cifar") else "" if dataset.startswith("mnist-rot") else None
    if suffix is not None:
        acc = rep.get(f"accuracy{suffix}")
        if acc is None and rep.get(f"test_error{suffix}") is not None:
            acc = round(100.0 - rep[f"test_error{suffix}"], 4)
    params = rep.get(f"params_{dataset}") or rep.get("params")
    return acc, params, rep.get("source", "")


_COLUMNS = [("run", "run"), ("model", "model"), ("dataset", "dataset"), ("preset", "preset"),
            ("epochs", "epochs"), ("train_size", "train n"), ("params", "params"),
            ("final_test_acc", "final test acc %"), ("test_acc_at_best_val", "test acc % at best val epoch"),
            ("best_test_acc_over_epochs", "best test acc % over epochs †"),
            ("paper_acc", "paper acc % †"), ("paper_params", "paper params"),
            ("train_time_s", "train time s"), ("train_cpu_s", "train CPU s"), ("status", "status")]


def _sweep_dir(sweep, runs_dir=None) -> Path:
    p = Path(sweep)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return load_spec(p, runs_dir=runs_dir).dir
    if p.is_dir() and ((p / "sweep.json").is_file() or any(p.glob("*/params.json")) or any(p.glob("*/summary.json"))):
        return p
    root = Path(runs_dir) if runs_dir else REPO / "runs"
    if (root / str(sweep)).is_dir():
        return root / str(sweep)
    avail = sorted(d.name for d in root.glob("*") if d.is_dir()) if root.is_dir() else []
    raise FileNotFoundError(f"no sweep {sweep!r} in {root}; sweeps there: {', '.join(avail) or 'none'}")


def collect(sweep_dir) -> list[dict]:
    """One row per run folder of a sweep (finished, interrupted or failed)."""
    from .train import read_metrics
    rows = []
    for d in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
        params = json.loads((d / PARAMS_FILE).read_text()) if (d / PARAMS_FILE).is_file() else {}
        status = run_status(d)
        if status == "pending" and not params:
            continue
        if status == "finished":
            row = json.loads((d / SUMMARY_FILE).read_text())
        else:
            hist = read_metrics(d)
            row = dict(model=params.get("MODEL"), dataset=params.get("DATASET"), preset=params.get("PRESET"),
                       epochs=params.get("EPOCHS"))
            if (d / RUN_FILE).is_file():           # written by kit.run.train at the start of a run
                row.update(json.loads((d / RUN_FILE).read_text()))
            row.update(epochs_done=len(hist), final_test_acc=None, test_acc_at_best_val=None,
                       best_test_acc_over_epochs=None,
                       train_time_s=round(sum(h["time_s"] for h in hist), 1) if hist else None,
                       train_cpu_s=round(sum(h.get("cpu_s", 0) for h in hist), 1) if hist else None)
            if status == "failed":
                row["error"] = (d / ERROR_FILE).read_text().splitlines()[0][:300]
        if "recipe_overrides" not in row and (d / CHECKPOINT_FILE).is_file():   # runs of older versions
            try:
                import torch
                from .train import load_checkpoint, recipe_overrides
                ck = load_checkpoint(d / CHECKPOINT_FILE)
                row["recipe_overrides"] = recipe_overrides(ck["config"]["recipe"])
            except Exception:  # noqa: BLE001 -- a report never fails on one unreadable checkpoint
                pass
        row["run"], row["status"], row["history"] = d.name, status, read_metrics(d)
        if status == "interrupted":
            row["status"] = f"interrupted after epoch {row['epochs_done']}"
        acc, pp, src = _paper_numbers(str(row.get("model")), str(row.get("dataset") or ""),
                                      row.get("fraction", params.get("FRACTION", 1.0)))
        row.update(paper_acc=acc, paper_params=pp, paper_source=src)
        rows.append(row)
    return rows


def _pending_runs(sweep, runs_dir) -> str | None:
    """What to say when a sweep has no runs yet: its pending runs and the papers' targets (from its
    spec: the path given, or ``sweeps/<name>.yaml``), and the command that runs them; None without a spec."""
    p = Path(str(sweep))
    spec = p if p.suffix in (".yaml", ".yml") and p.is_file() else REPO / "sweeps" / f"{p.name}.yaml"
    if not spec.is_file():
        return None
    from .. import data
    sw = load_spec(spec, runs_dir=runs_dir)
    lines = [f"sweep {sw.name!r} has no runs yet in {sw.dir}: run `python -m kit sweep {spec.relative_to(REPO) if spec.is_relative_to(REPO) else spec}`."
             f" Its {len(sw.runs)} pending run(s) and the papers' targets:"]
    for r in sw.runs:
        full = {**notebook_parameters(sw.notebook), **r.params}
        asked = str(full.get("DATASET") or "")
        used = data.resolve_dataset(asked) if asked == "auto" else asked
        acc, _, src = _paper_numbers(str(full.get("MODEL")), used, full.get("FRACTION", 1.0))
        target = f"paper {acc:.2f} % ({src})" if acc is not None else "no paper number on its card"
        where = f"auto (here: {used})" if asked == "auto" else asked
        lines.append(f"  {r.name}: {full.get('MODEL')} on {where}, {target}")
    return "\n".join(lines)


def _fmt(v, key=""):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.0f}" if key.endswith(("time_s", "cpu_s")) else f"{v:.2f}"
    if isinstance(v, int) and key in ("params", "paper_params", "train_size"):
        return f"{v:,}"
    return str(v)


def report(sweep, *, runs_dir=None, out_dir=None, figure_path=None, log=print) -> dict:
    """Gather a sweep's runs into ``report.md``, ``report.csv`` and ``report.png`` (in the sweep
    folder unless ``out_dir``); ``figure_path`` also saves the figure there. Returns the paths and rows."""
    import matplotlib
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401
    from .train import BEST_TEST_LABEL
    from ..explore.viz import save

    try:
        sdir = _sweep_dir(sweep, runs_dir)
        rows = collect(sdir) if sdir.is_dir() else []
    except FileNotFoundError as e:
        sdir, rows, missing = None, [], e
    else:
        missing = None
    if not rows:
        pending = _pending_runs(sweep, runs_dir)
        if pending:
            raise ValueError(pending)
        if missing:
            raise missing
        raise ValueError(f"sweep folder {sdir} has no runs yet (run `python -m kit sweep SPEC.yaml` first)")
    out = Path(out_dir) if out_dir else sdir
    out.mkdir(parents=True, exist_ok=True)
    labels = sorted({r.get("dataset_label") or str(r.get("dataset")) for r in rows if r.get("dataset")})
    rebuilt = any(r.get("rebuilt") or "rebuilt" in str(r.get("dataset")) for r in rows)

    # CSV
    buf = io.StringIO()
    w = csv.writer(buf)
    keys = [k for k, _ in _COLUMNS] + ["recipe_overrides", "dataset_label", "paper_source", "error"]
    w.writerow(keys)
    for r in rows:
        w.writerow(["" if r.get(k) is None else r.get(k) for k in keys])
    atomic_write_text(out / "report.csv", buf.getvalue())

    # Markdown
    lines = [f"# Sweep `{sdir.name}`", ""]
    lines += [f"Data: {'; '.join(labels)}."]
    if rebuilt:
        lines += ["", "**Rebuilt data**: MNIST-rot rebuilt offline from raw MNIST with the MNIST-rot protocol "
                      "(not the official archive of Larochelle et al. 2007); its numbers are not the papers' "
                      "numbers on MNIST-rot."]
    lines += ["", "| " + " | ".join(h for _, h in _COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for r in rows:
        cells = []
        for k, _ in _COLUMNS:
            v = r.get(k)
            if k == "dataset":
                v = f"{v} (rebuilt)" if r.get("rebuilt") or "rebuilt" in str(v) else v
            if k == "preset" and r.get("recipe_overrides"):
                ov = {a: b for a, b in r["recipe_overrides"].items() if a != "epochs"}
                v = f"{v} ({', '.join(f'{a}={b}' for a, b in ov.items())})" if ov else v
            if k == "test_acc_at_best_val" and v is not None and r.get("best_val_epoch"):
                v = f"{v:.2f} (ep {r['best_val_epoch']})"
            if k == "best_test_acc_over_epochs" and v is not None and r.get("best_test_epoch"):
                v = f"{v:.2f} (ep {r['best_test_epoch']})"
            cells.append(_fmt(v, k))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"† *{BEST_TEST_LABEL}*. The paper column is the registry's number "
                  "(`kit.models.model_card(name).reported`), obtained with the paper's full recipe on the official "
                  "dataset and selected the same way; '—' = the registry has no published number for that model."]
    srcs = sorted({(r["model"], r["paper_source"]) for r in rows if r.get("paper_source")})
    if srcs:
        lines += ["", "Sources of the paper numbers:"] + [f"* `{m}`: {s}" for m, s in srcs]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed runs:"] + [f"* `{r['run']}`: {r.get('error', '')}" for r in failed]
    lines += ["", "![report](report.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))

    # Figure: accuracy curves and final accuracies with the paper marks
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 0.4 * len(rows) + 3.2))
    for r in rows:
        pts = [(h["epoch"], h.get("test_acc") if h.get("test_acc") is not None else h.get("val_acc"))
               for h in r["history"]]
        pts = [p for p in pts if p[1] is not None]
        if pts:
            a1.plot(*zip(*pts), marker="o", label=r["run"])
    a1.set(xlabel="epoch", ylabel="test accuracy % (val where no test)", title=f"{sdir.name}: accuracy per epoch")
    a1.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    a1.grid(alpha=0.3)
    if any(r["history"] for r in rows):
        a1.legend(fontsize=7)
    ys = list(range(len(rows)))
    a2.barh(ys, [r.get("final_test_acc") or 0 for r in rows], color="tab:blue", alpha=0.7,
            label="final test (measured)")
    bt = [(y, r["best_test_acc_over_epochs"]) for y, r in zip(ys, rows)
          if r.get("best_test_acc_over_epochs") is not None]
    if bt:
        a2.plot([b for _, b in bt], [y for y, _ in bt], "k|", ms=14, label="best test over epochs (measured)")
    pa = [(y, r["paper_acc"]) for y, r in zip(ys, rows) if r.get("paper_acc") is not None]
    if pa:
        a2.plot([p for _, p in pa], [y for y, _ in pa], "r*", ms=12, label="paper (official data, full recipe)")
    a2.set_yticks(ys, [r["run"] for r in rows], fontsize=8)
    vals = [v for r in rows for v in (r.get("final_test_acc"), r.get("paper_acc")) if v is not None]
    lo = max(0.0, math.floor(min(vals) / 10) * 10 - 5) if vals else 0.0
    a2.set_xlim(lo, 100)
    a2.set(xlabel="accuracy %", title="final test accuracy vs paper" + (" (rebuilt data)" if rebuilt else ""))
    a2.grid(alpha=0.3, axis="x")
    a2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, frameon=False)
    fig.tight_layout()
    png = save(fig, out / "report.png")
    if figure_path:
        save(fig, figure_path)
    plt.close(fig)
    log(f"report of {sdir.name}: {len(rows)} run(s) -> {out / 'report.md'}, report.csv, report.png")
    return dict(markdown=out / "report.md", csv=out / "report.csv", figure=png, rows=rows)
