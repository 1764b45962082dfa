"""Keep pyproject.toml, constraints.txt, environment.yml, the Makefile and .ci/run consistent."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]

# conda packages that exist only to build/bootstrap, not as eqkit dependencies
CONDA_BUILD_ONLY = {"cython", "sympy", "rtree", "c-compiler", "pip", "python"}
PINNED = ("torch", "torchvision")

_NAME_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalise(spec: str) -> str:
    """'Plotly_Foo[bar]>=6.1 ; marker' -> 'plotly-foo'."""
    m = _NAME_RE.match(spec)
    assert m, f"cannot parse requirement {spec!r}"
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def version_spec(spec: str) -> str:
    """Version part of a requirement, whitespace removed; conda '=x' -> '==x'."""
    spec = spec.split(";", 1)[0]
    rest = re.sub(r"\[.*?\]", "", spec[_NAME_RE.match(spec).end():])
    rest = rest.replace(" ", "")
    if re.fullmatch(r"=[^=].*", rest):  # conda single '=' pin
        rest = "=" + rest
    return rest


def pyproject_reqs() -> dict[str, str]:
    """The core dependencies and every extra but ``compare`` (escnn, added by ``make compare``)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = data["project"]
    reqs = list(project.get("dependencies", []))
    for extra, items in project.get("optional-dependencies", {}).items():
        if extra != "compare":
            reqs += [r for r in items if normalise(r) != "eqkit"]          # "eqkit[lab,run,rbf]": the extras themselves
    return {normalise(r): r for r in reqs}


def constraint_pins() -> dict[str, str]:
    lines = [l.split("#", 1)[0].strip() for l in (ROOT / "constraints.txt").read_text().splitlines()]
    return {normalise(l): l for l in lines if l}


def environment_reqs() -> tuple[dict[str, str], dict[str, str]]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda, pip = {}, {}
    for item in env["dependencies"]:
        if isinstance(item, dict):
            for p in item.get("pip", []):
                p = str(p).strip()
                if p.startswith("-e") or p in {".", "-e ."}:
                    continue
                pip[normalise(p)] = p
        else:
            conda[normalise(str(item))] = str(item)
    return conda, pip


def test_environment_yml_matches_pyproject():
    py = pyproject_reqs()
    conda, pip = environment_reqs()
    env = {k: v for k, v in {**conda, **pip}.items() if k not in CONDA_BUILD_ONLY}

    missing_in_env = sorted(set(py) - set(env))
    missing_in_py = sorted(set(env) - set(py))
    problems = []
    if missing_in_env:
        problems.append(f"in pyproject.toml but missing from environment.yml: {missing_in_env}")
    if missing_in_py:
        problems.append(f"in environment.yml but missing from pyproject.toml: {missing_in_py}")
    assert not problems, "; ".join(problems)


@pytest.mark.parametrize("name", PINNED)
def test_pinned_versions_agree(name):
    """constraints.txt pins exactly (what `make install` uses), environment.yml pins the same, and the
    library's range in pyproject.toml admits the pin (a range, never an exact pin: a researcher's own
    torch must not be downgraded)."""
    from packaging.requirements import Requirement

    py, pins = pyproject_reqs(), constraint_pins()
    conda, pip = environment_reqs()
    env = {**conda, **pip}
    assert name in py and name in pins and name in env, (name, sorted(pins))
    pin, env_v = version_spec(pins[name]), version_spec(env[name])
    assert pin.startswith("=="), f"{name} must be pinned with == in constraints.txt, got {pins[name]!r}"
    assert pin == env_v, f"{name} pins differ: constraints.txt {pins[name]!r} vs environment.yml {env[name]!r}"
    spec = Requirement(py[name]).specifier
    assert "==" not in str(spec), f"pyproject.toml pins {name} exactly ({py[name]!r}): declare a range"
    assert spec.contains(pin[2:]), f"pyproject.toml's {py[name]!r} does not admit the pinned {pin[2:]}"


def test_make_install_uses_the_constraints():
    text = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in text and "constraints.txt" in text.split("$(STAMP):", 1)[1].split("\n", 1)[0]


def test_ci_runs_make_test():
    script = ROOT / ".ci" / "run"
    assert script.is_file(), ".ci/run is missing"
    lines = [l.strip() for l in script.read_text().splitlines()]
    assert "make test" in lines, ".ci/run must contain a line 'make test'"


def test_makefile_test_target_runs_pytest():
    text = (ROOT / "Makefile").read_text()
    m = re.search(r"^test:[^\n]*\n((?:\t[^\n]*\n?)+)", text, re.MULTILINE)
    assert m, "Makefile has no 'test:' target with a recipe"
    assert re.search(r"-m\s+pytest|\bpytest\b", m.group(1)), (
        f"Makefile 'test' recipe does not run pytest:\n{m.group(1)}"
    )
