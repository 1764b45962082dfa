"""The lesson track (notebooks/lessons/): the student notebooks are exactly what the tool makes from
the solutions; every lesson executes with its solutions and its figures are legible at notebook width;
every checker passes the lesson's own solution and fails each typical mistake with that mistake's hint."""
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from kit import teach
from kit.__main__ import main as kit_main
from kit.explore.viz import MIN_SCREEN_PT
from kit.run.notebooks import execute, notebook_paths
from kit.teach.lessons import BEGIN, LESSONS, SOLUTIONS, build, solution_blocks, strip_solutions
from kit.teach.mistakes import MISTAKES

SOURCES = notebook_paths(SOLUTIONS)
CHECK_CALL = re.compile(r'teach\.check\("([\d.]+)",\s*(\w+)\)')


def _code(nb):
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def _checked(nb) -> dict[str, str]:
    """exercise id -> the function name the lesson checks it with."""
    return {m.group(1): m.group(2) for src in _code(nb) for m in CHECK_CALL.finditer(src)}


def _solutions() -> dict[str, object]:
    """Every exercise's solution function, defined by running the lessons' own solution cells."""
    out = {}
    for path in SOURCES:
        nb = json.loads(path.read_text())
        ns = {"torch": torch, "F": F, "math": math,
              "rotate_image": lambda x, r: torch.rot90(x, r, dims=(-2, -1))}   # lesson 2's given helper
        for src in _code(nb):
            if BEGIN in src:
                exec(compile(src, str(path), "exec"), ns)
        for ex, name in _checked(nb).items():
            out[ex] = ns[name]
    return out


def test_there_are_three_lessons_and_every_exercise_is_checked_in_one():
    assert len(SOURCES) == 3
    checked = {}
    for p in SOURCES:
        checked.update(_checked(json.loads(p.read_text())))
    assert set(checked) == set(teach.EXERCISES) == set(MISTAKES)
    for ex, name in checked.items():
        assert teach.EXERCISES[ex].function == name, (ex, name)


def test_student_notebooks_are_the_tool_output_of_the_solutions():
    """The committed student notebooks cannot drift from the solutions (python -m kit lessons --check)."""
    build(check=True)
    assert kit_main(["lessons", "--check"]) == 0


def test_a_stale_student_notebook_is_a_clear_error(tmp_path, capsys):
    for p in SOURCES:
        (tmp_path / p.name).write_text(p.read_text())
    out = tmp_path / "out"
    out.mkdir()
    build(sources=tmp_path, out_dir=out, log=lambda *_: None)
    build(check=True, sources=tmp_path, out_dir=out)                     # fresh: fine
    stale = out / SOURCES[0].name
    stale.write_text(stale.read_text().replace("# YOUR CODE HERE", "# my attempt"))
    with pytest.raises(ValueError, match=rf"out of date with their solutions: {SOURCES[0].name}.*python -m kit lessons"):
        build(check=True, sources=tmp_path, out_dir=out)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.stem)
def test_student_version_has_gaps_not_solutions(path):
    src = json.loads(path.read_text())
    student = json.loads((LESSONS / path.name).read_text())
    assert len(student["cells"]) == len(src["cells"])
    blocks = solution_blocks(src)
    assert blocks, "a lesson without exercises"
    text = "\n".join(_code(student))
    assert BEGIN not in text and "END SOLUTION" not in text
    assert text.count("raise NotImplementedError") == len(blocks)
    for block in blocks:                          # no solution line survives (beyond trivial ones)
        for line in block.strip().splitlines():
            if len(line.strip()) > 25:
                assert line.strip() not in text, line
    answers = [c for c in src["cells"] if "answer" in c.get("metadata", {}).get("tags", [])]
    mine = [c for c in student["cells"] if "your-answer" in c.get("metadata", {}).get("tags", [])]
    assert len(mine) == len(answers) >= 2
    assert not any("**Answer.**" in "".join(c["source"]) for c in student["cells"] if c["cell_type"] == "markdown")


@pytest.mark.parametrize("path", SOURCES + [LESSONS / p.name for p in SOURCES],
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_committed_lesson_is_clean_with_a_parameters_cell(path):
    code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert not any(c.get("outputs") or c.get("execution_count") for c in code), "strip outputs before committing"
    assert "parameters" in code[0].get("metadata", {}).get("tags", []), "first code cell must be tagged 'parameters'"


def test_unfilled_exercise_says_not_written_yet():
    nb = json.loads((LESSONS / SOURCES[1].name).read_text())        # a student notebook, as handed out
    ns = {"torch": torch, "F": F, "math": math}
    for src in _code(nb):
        if "raise NotImplementedError" in src:
            exec(src, ns)
    v = teach.check("2.2", ns["group_conv"])
    assert not v and "not written yet" in v.message


def test_stripping_rejects_unbalanced_markers():
    nb = {"cells": [{"cell_type": "code", "metadata": {}, "source": ["def f():\n", "    # BEGIN SOLUTION\n",
                                                                     "    return 1\n"]}]}
    with pytest.raises(ValueError, match="never closed"):
        strip_solutions(nb, name="x.ipynb")
    nb["cells"][0]["source"] = ["# END SOLUTION\n"]
    with pytest.raises(ValueError, match="cell 0, line 1: '# END SOLUTION' without"):
        strip_solutions(nb, name="x.ipynb")


SOLUTION = _solutions()


@pytest.mark.parametrize("ex", list(teach.EXERCISES))
def test_checker_passes_the_lessons_solution(ex):
    v = teach.check(ex, SOLUTION[ex])
    assert v.passed, str(v)
    for key in ("equivariance_error", "invariance_error"):
        if key in v.details:
            assert v.details[key] < 1e-12, v                                # float64: round-off


@pytest.mark.parametrize("ex,mistake", [(ex, m) for ex, ms in MISTAKES.items() for m in ms],
                         ids=lambda a: a if isinstance(a, str) else a.name)
def test_checker_fails_each_typical_mistake_with_its_hint(ex, mistake):
    v = teach.check(ex, mistake.fn)
    assert not v.passed
    assert v.mistake == mistake.name and v.message == mistake.hint, str(v)


def test_checker_on_other_wrong_answers_says_what_failed():
    v = teach.check("2.2", lambda x, w: torch.zeros(2, 3, 4, 9, 9, dtype=torch.float64))
    assert not v and v.mistake is None and "relative difference 1 from the kit's answer" in v.message
    v = teach.check("2.1", lambda x, w: None)
    assert "expected a torch.Tensor of shape (2, 3, 4, 9, 9)" in v.message and "forget to return" in v.message
    v = teach.check("2.3", lambda y: torch.zeros(2, 3, dtype=y.dtype))
    assert not v and "does not depend on y" in v.message
    v = teach.check("1.1", lambda x, r: 1 / 0)
    assert "raised ZeroDivisionError" in v.message
    with pytest.raises(ValueError, match="unknown exercise '9.9'; the lessons have 1.1, 1.2"):
        teach.check("9.9", print)
    assert "✗ exercise 3.1" in str(teach.check("3.1", lambda d: True))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.stem)
def test_lesson_executes_with_its_solutions_and_figures_are_legible(path, tmp_path, monkeypatch):
    audit = tmp_path / "audit.jsonl"
    monkeypatch.setenv("KIT_FIGURE_AUDIT", str(audit))
    out = execute(path, tmp_path / "runs", figures_dir=tmp_path / "figures")
    nb = json.loads(out.read_text())
    outs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not [o for o in outs if o.get("output_type") == "error"]
    text = "".join("".join(o.get("text", "")) for o in outs) + "".join(
        "".join(o.get("data", {}).get("text/plain", "")) for o in outs)
    assert text.count("✓ exercise") == len(solution_blocks(json.loads(path.read_text())))
    assert "✗" not in text
    rows = [json.loads(line) for line in audit.read_text().splitlines()]
    assert len(rows) >= 1
    small = [r for r in rows if r["min_pt"] < MIN_SCREEN_PT]
    assert not small, small
