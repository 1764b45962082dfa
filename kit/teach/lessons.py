"""The lesson track's two versions from one source: solutions stripped by a tool, never by hand.

The sources are ``notebooks/lessons/solutions/*.ipynb``, the teacher's notebooks, solutions included.
The student notebooks ``notebooks/lessons/*.ipynb`` are generated from them by :func:`build`
(``python -m kit lessons``; ``--check`` fails when a committed student notebook differs from what
the tool makes, which the test suite runs), so the two cannot drift apart. Two markings, nbgrader's
conventions, in plain JSON (no extra dependency):

* in a code cell, the lines from ``# BEGIN SOLUTION`` to ``# END SOLUTION`` (each on a line of its
  own) become ``# YOUR CODE HERE`` and ``raise NotImplementedError`` at the marker's indentation;
* a markdown cell tagged ``answer`` (the answer to a question) becomes an empty "Your answer" cell.

Everything else — the mathematics, the checkers' calls, the figures — is the same in both. Outputs
are never committed (the tests strip-check every notebook).
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

from .._io import REPO_DIR, atomic_write_text

__all__ = ["LESSONS", "SOLUTIONS", "strip_solutions", "build", "student_path"]

LESSONS = REPO_DIR / "notebooks" / "lessons"
SOLUTIONS = LESSONS / "solutions"
BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
ANSWER_TAG = "answer"
YOUR_ANSWER = "**Your answer.** *(write it here: double-click this cell)*"


def _lines(source) -> list[str]:
    text = "".join(source) if isinstance(source, list) else source
    return text.splitlines(keepends=True)


def _strip_code(lines: list[str], where: str) -> list[str]:
    out, inside, indent = [], False, ""
    for n, line in enumerate(lines, 1):
        mark = line.strip()
        if mark == BEGIN:
            if inside:
                raise ValueError(f"{where}, line {n}: {BEGIN!r} inside another solution block")
            inside, indent = True, line[:len(line) - len(line.lstrip())]
            out += [f"{indent}# YOUR CODE HERE\n", f"{indent}raise NotImplementedError\n"]
        elif mark == END:
            if not inside:
                raise ValueError(f"{where}, line {n}: {END!r} without {BEGIN!r}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: {BEGIN!r} is never closed by {END!r}")
    if out and not out[-1].endswith("\n") and lines and lines[-1].endswith("\n"):
        out[-1] += "\n"
    return out


def strip_solutions(nb: dict, *, name: str = "notebook") -> dict:
    """The student version of the lesson notebook ``nb`` (a new dict; ``nb`` is not changed)."""
    nb = copy.deepcopy(nb)
    for i, cell in enumerate(nb["cells"]):
        where = f"{name}, cell {i}"
        if cell["cell_type"] == "code":
            src = _lines(cell["source"])
            if any(line.strip() in (BEGIN, END) for line in src):
                new = _strip_code(src, where)
                cell["source"] = new
        elif cell["cell_type"] == "markdown" and ANSWER_TAG in cell.get("metadata", {}).get("tags", []):
            cell["source"] = [YOUR_ANSWER]
            cell["metadata"]["tags"] = [t for t in cell["metadata"]["tags"] if t != ANSWER_TAG] + ["your-answer"]
    nb.setdefault("metadata", {})["eqkit"] = {"generated_from": f"solutions/{name}",
                                              "regenerate": "python -m kit lessons"}
    return nb


def solution_blocks(nb: dict) -> list[str]:
    """The code of every solution block of a source notebook (what the tests run the checkers on)."""
    blocks = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            text = "".join(_lines(cell["source"]))
            blocks += re.findall(rf"^[ \t]*{re.escape(BEGIN)}\n(.*?)^[ \t]*{re.escape(END)}", text, re.S | re.M)
    return blocks


def student_path(source: Path) -> Path:
    return LESSONS / Path(source).name


def _dump(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def build(*, check: bool = False, sources: Path | None = None, out_dir: Path | None = None, log=print) -> list[Path]:
    """Write every student notebook from its source (``check=True``: write nothing, raise when a
    committed student notebook is missing or differs from the generated one). Returns the paths."""
    src_dir, out_dir = Path(sources or SOLUTIONS), Path(out_dir or LESSONS)
    srcs = sorted(src_dir.glob("*.ipynb"))
    if not srcs:
        raise FileNotFoundError(f"no lesson sources (*.ipynb) in {src_dir}")
    stale, paths = [], []
    for src in srcs:
        made = _dump(strip_solutions(json.loads(src.read_text()), name=src.name))
        dst = out_dir / src.name
        paths.append(dst)
        if check:
            if not dst.is_file() or dst.read_text() != made:
                stale.append(dst.name)
        else:
            atomic_write_text(dst, made)
            log(f"  {src.relative_to(src_dir.parent) if src_dir.parent in src.parents else src} -> {dst.name}")
    if stale:
        raise ValueError(f"student lesson notebook(s) out of date with their solutions: {', '.join(stale)}; "
                         f"run `python -m kit lessons` and commit the result")
    return paths
