"""Command line: ``python -m kit <command>``.

    reproduce   execute every notebook (quick profile) into runs/notebooks/, figures into figures/,
                then the quick sweep (sweeps/quick.yaml) and its report
    sweep       run a sweep spec: python -m kit sweep sweeps/quick.yaml [--jobs N] [--executor slurm]
    report      gather a sweep into markdown + CSV + a figure: python -m kit report quick
    bench       one benchmark across all families beside escnn: python -m kit bench [--only GLOB] [--device cuda]
                (python -m kit bench --help for its options)
    zoo         the trained zoo: python -m kit zoo export (runs/zoo -> kit/weights/), zoo list, zoo heldout
    lessons     write the student lesson notebooks from their solutions (notebooks/lessons/solutions/);
                --check: fail if a committed student notebook is out of date
    data        python -m kit data fetch mnist (the raw files, md5-checked, into data/mnist); data list
    check       grid-exact equivariance of registered models, float32 error beside its round-off floor
                and the float64 error: python -m kit check "nepdo-*" [--seeds 0 1] [--set method=rbffd]

A bad input (a spec with a YAML error, an unknown key, a missing file, CUDA asked for but absent, a
report before any run) ends in one line on stderr and exit code 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import sys
import time


def _key_values(items, flag: str, convert) -> dict:
    """``["k=v", ...]`` -> ``{k: convert(v)}``; a clear exit for anything that is not KEY=VALUE."""
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise SystemExit(f"{flag} expects KEY=VALUE, got {item!r}")
        out[k] = convert(v)
    return out


def _reproduce(args) -> int:
    from .run.notebooks import REPO, execute, notebook_paths

    paths = notebook_paths(pattern=args.notebooks)
    print(f"eqkit reproduce: {len(paths)} notebook(s) -> {REPO / 'runs' / 'notebooks'}, figures -> {REPO / 'figures'}")
    t = time.time()
    failed = []
    for p in paths:
        try:
            execute(p, REPO / "runs" / "notebooks")
        except Exception as e:  # keep going: report every failing notebook at the end
            failed.append((p.name, e))
            if getattr(e, "ename", None):          # papermill: the exception raised inside the notebook
                why = f"{e.ename}: {str(e.evalue).strip().splitlines()[0] if str(e.evalue).strip() else ''} (cell " \
                      f"{getattr(e, 'exec_count', '?')} of runs/notebooks/{p.name})"
            else:
                why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            print(f"  {p.name}: FAILED ({why})")
    print(f"done in {time.time() - t:.0f} s; {len(paths) - len(failed)} ok, {len(failed)} failed")
    ok = not failed
    if args.sweep:
        from .run.sweeps import report, run_sweep
        spec = REPO / args.sweep
        res = run_sweep(spec, jobs=args.jobs)
        try:
            report(res["sweep"], figure_path=REPO / "figures" / f"sweep_{res['sweep']}.png")
        except Exception as e:
            print(f"  report FAILED ({type(e).__name__}: {e})")
            ok = False
        ok = ok and res["ok"]
    print(f"eqkit reproduce finished in {time.time() - t:.0f} s" + ("" if ok else " (with failures)"))
    return 0 if ok else 1


def _sweep(args) -> int:
    from .run.sweeps import report, run_sweep

    slurm = _key_values(args.slurm, "--slurm", lambda v: int(v) if v.isdigit() else v)
    import ast

    def literal(v):                                  # a Python literal (numbers, None, lists), else the string
        try:
            return ast.literal_eval(v)
        except (ValueError, SyntaxError):
            return v
    res = run_sweep(args.spec, jobs=args.jobs, executor=args.executor, only=args.only, slurm=slurm,
                    threads=args.threads, dry_run=args.dry_run, runs_dir=args.runs_dir,
                    set_params=_key_values(args.set, "--set", literal))
    if args.report and not args.dry_run:
        report(res["sweep"], runs_dir=args.runs_dir)
    return 0 if res["ok"] else 1


def _report(args) -> int:
    from .run.sweeps import report

    if args.sweep == "zoo":                          # the zoo's table comes from its committed manifests
        from .run import zoo
        path = zoo.write_report(None if args.out is None else f"{args.out}/zoo.md")
        print(path.read_text())
        return 0
    res = report(args.sweep, runs_dir=args.runs_dir, out_dir=args.out)
    print(res["markdown"].read_text())
    return 0


def _zoo(args) -> int:
    from .run import zoo

    if args.action == "export":
        zoo.export_sweep(args.runs_dir, only=args.only)
        zoo.write_report()
    elif args.action == "heldout":
        print(f"wrote {zoo.build_heldout()}")
    else:
        for m in zoo.zoo_rows():
            print(f"  {m['model']:30s} {m['params']:>8,} params  test {m['final_test_acc']:.2f} %  "
                  f"held-out {m['heldout']['accuracy']:.2f} %  {m['file']} ({m['bytes'] / 1e6:.2f} MB)")
    return 0


def _data(args) -> int:
    from . import data

    if args.action == "list":
        for name, (_, _, desc) in data.DATASETS.items():
            print(f"  {name:18s} {desc}")
        print(f"  {'auto':18s} mnist-rot-rebuilt where raw MNIST is found, else mnist-rot-sample "
              f"(now: {data.resolve_dataset('auto')})")
        return 0
    if args.name != "mnist":
        raise ValueError(f"data fetch knows 'mnist' (the four raw files); got {args.name!r}. MNIST-rot "
                         f"(official) and CIFAR are downloaded on first use by kit.data.load_dataset")
    print(f"fetching raw MNIST (md5-checked) from {', '.join(data.MNIST_MIRRORS)}")
    folder = data.fetch_mnist(args.dest, log=print)
    print(f"raw MNIST in {folder}")
    return 0


def _check(args) -> int:
    import ast
    import json

    from ._io import atomic_write_text
    from .equivariance import precision_markdown, precision_report
    from .models import list_models

    def literal(v):                                  # a Python literal, or else the bare string
        try:
            return ast.literal_eval(v)
        except (ValueError, SyntaxError):
            return v
    overrides = _key_values(args.set, "--set", literal)
    names = [n for pat in args.models for n in (list_models(pat) or [None]) if n] if args.models else []
    missing = [pat for pat in args.models if not list_models(pat)]
    if missing:
        raise SystemExit(f"no registered model matches {missing}; see kit.models.list_models()")
    rows = []
    for n in dict.fromkeys(names):
        t = time.time()
        part = precision_report(n, seeds=args.seeds, overrides=overrides, batch=args.batch)
        rows += part
        for r in part:
            print(f"  {n:28s} seed {r['seed']}: err f32 {r['error_f32']:.2e}  round-off {r['roundoff']:.2e}  "
                  f"err f64 {r['error_f64']:.1e}  ({time.time() - t:.0f} s)", flush=True)
    print(precision_markdown(rows, target=args.target))
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=1))
        print(f"wrote {args.json}")
    return 0


def _lessons(args) -> int:
    from .teach.lessons import build
    paths = build(check=args.check)
    print(f"{len(paths)} student lesson notebook(s) {'up to date' if args.check else 'written'} in notebooks/lessons/")
    return 0


#: what a bad input raises; anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, RuntimeError, ImportError, KeyError)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return _main(argv)
    except USER_ERRORS as e:
        if debug:
            raise
        command = argv[0] if argv and not argv[0].startswith("-") else ""
        msg = str(e).strip() or type(e).__name__
        print(f"python -m kit {command}: error: {msg} [--debug: traceback]".replace("kit : ", "kit: "),
              file=sys.stderr)
        return 2


def _main(argv) -> int:
    if argv[:1] == ["bench"]:                  # its own argument parser (kit/measure/bench.py)
        from .measure.bench import main as bench_main
        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m kit", description="eqkit command line",
                                     epilog="--debug (anywhere): show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("reproduce", help="execute every notebook with its quick parameters, then the quick sweep")
    rp.add_argument("--notebooks", default="*.ipynb", help="glob of notebooks to run (default: all)")
    rp.add_argument("--sweep", default="sweeps/quick.yaml",
                    help="sweep spec run after the notebooks, relative to the repository (default: sweeps/quick.yaml); "
                         "'' to skip")
    rp.add_argument("--jobs", type=int, default=2, help="parallel runs of the sweep (default 2)")
    rp.set_defaults(func=_reproduce)

    sp = sub.add_parser("sweep", help="run a sweep spec (YAML): every run = notebooks/train.ipynb via papermill")
    sp.add_argument("spec", help="path of the sweep spec, e.g. sweeps/quick.yaml")
    sp.add_argument("--jobs", type=int, default=1, help="parallel local runs (process pool)")
    sp.add_argument("--executor", default="local", choices=["local", "slurm", "submitit-local"],
                    help="local process pool, or submitit (slurm cluster / submitit's local executor)")
    sp.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                    help="submitit/slurm option, e.g. --slurm partition=gpu --slurm gpus_per_node=1")
    sp.add_argument("--only", default=None, help="glob(s) of run names to run, comma-separated")
    sp.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    sp.add_argument("--runs-dir", default=None, help="root folder of sweeps (default: runs/)")
    sp.add_argument("--dry-run", action="store_true", help="list the runs and their status, run and write nothing")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a shared parameter of the spec, e.g. --set DATASET=mnist-rot-sample --set EPOCHS=1")
    sp.add_argument("--report", action="store_true", help="write the report afterwards")
    sp.set_defaults(func=_sweep)

    rr = sub.add_parser("report", help="gather a sweep into report.md, report.csv and report.png")
    rr.add_argument("sweep", help="sweep name (folder under runs/), sweep folder, or spec path")
    rr.add_argument("--runs-dir", default=None)
    rr.add_argument("--out", default=None, help="output folder (default: the sweep folder)")
    rr.set_defaults(func=_report)
    zp = sub.add_parser("zoo", help="the trained zoo: export finished runs/zoo runs to kit/weights/, list, heldout")
    zp.add_argument("action", choices=["export", "list", "heldout"])
    zp.add_argument("--runs-dir", default=None, help="the zoo sweep folder (default: runs/zoo)")
    zp.add_argument("--only", default="*", help="glob(s) of run names to export, comma-separated")
    zp.set_defaults(func=_zoo)
    dp = sub.add_parser("data", help="datasets: fetch raw MNIST ahead of use, list the dataset names")
    dp.add_argument("action", choices=["fetch", "list"])
    dp.add_argument("name", nargs="?", default="mnist", help="what to fetch (default: mnist)")
    dp.add_argument("--dest", default=None, help="folder (default: data/mnist in the repository)")
    dp.set_defaults(func=_data)
    lp = sub.add_parser("lessons", help="write the student lesson notebooks from their solutions")
    lp.add_argument("--check", action="store_true", help="write nothing; fail if a student notebook is out of date")
    lp.set_defaults(func=_lessons)
    sub.add_parser("bench", help="one benchmark across all families beside escnn (python -m kit bench --help)")
    cp = sub.add_parser("check", help="grid-exact equivariance of registered models: float32 error, its round-off "
                                      "floor, float64 error")
    cp.add_argument("models", nargs="+", help="registered model names or globs, e.g. 'nepdo-*'")
    cp.add_argument("--seeds", type=int, nargs="+", default=[0], help="initialisation seeds (default 0)")
    cp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="constructor override, e.g. --set method=rbffd --set stencil_kw=None")
    cp.add_argument("--batch", type=int, default=8, help="digits measured (default 8)")
    cp.add_argument("--target", type=float, default=None, help="mark float32 errors above this value")
    cp.add_argument("--json", default=None, help="also write the rows to this JSON file (atomically)")
    cp.set_defaults(func=_check)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
