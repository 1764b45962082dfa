"""Command line: ``python -m kit <command>``.

    reproduce   execute every notebook (quick profile) into runs/notebooks/, figures into figures/
"""
from __future__ import annotations

import argparse
import sys
import time


def _reproduce(args) -> int:
    from .notebooks import REPO, execute, notebook_paths

    paths = notebook_paths(pattern=args.notebooks)
    print(f"eqkit reproduce: {len(paths)} notebook(s) -> {REPO / 'runs' / 'notebooks'}, figures -> {REPO / 'figures'}")
    t = time.time()
    failed = []
    for p in paths:
        try:
            execute(p, REPO / "runs" / "notebooks")
        except Exception as e:  # keep going: report every failing notebook at the end
            failed.append((p.name, e))
            print(f"  {p.name}: FAILED ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    print(f"done in {time.time() - t:.0f} s; {len(paths) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kit", description="eqkit command line")
    sub = parser.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("reproduce", help="execute every notebook with its quick parameters")
    rp.add_argument("--notebooks", default="*.ipynb", help="glob of notebooks to run (default: all)")
    rp.set_defaults(func=_reproduce)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
