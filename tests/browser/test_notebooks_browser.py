"""The interactive notebooks in a real browser: JupyterLab + headless Chromium (Python Playwright).

A session fixture starts JupyterLab on loopback with a token, serving a *copy* of ``notebooks/`` (so
the run neither saves outputs into the committed notebooks nor overwrites ``figures/*.png``: each
copy's ``FIGURES_DIR`` is set to a folder beside it). The lessons run in their solutions versions. For each notebook the test
opens it, waits for the kernel, runs all cells through the menu and asserts that

* every code cell executed and no output is a traceback (nor a widget that failed to render);
* every explorer (an ipywidgets box) shows its sliders and a figure, and pressing ArrowRight on a
  slider handle re-renders that figure (the ``src`` of its image changes);
* plotly figures are drawn where the notebook has them.

Screenshots of each explorer, before and after the key press, go to ``runs/browser/`` (ignored by
git); ``EQKIT_SCREENSHOTS=figures/browser`` writes them where the README shows them instead.

Needs Debian's ``chromium`` (``/usr/bin/chromium``; ``.ci/run`` installs it) and the ``playwright``
Python package (the ``test`` extra). Playwright's own browser download is never used. Without
either the tests are skipped, with the reason in pytest's summary (``-ra``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / os.environ.get("EQKIT_SCREENSHOTS", "runs/browser")
TOKEN = "eqkit-browser-test"


def _chromium() -> str | None:
    for cand in (shutil.which("chromium"), "/usr/bin/chromium"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


CHROMIUM = _chromium()
try:
    from playwright.sync_api import sync_playwright
    _PLAYWRIGHT = None
except ImportError as err:  # pragma: no cover - depends on the environment
    sync_playwright = None
    _PLAYWRIGHT = f"python package 'playwright' is not installed ({err}); pip install -e '.[test]'"

_MISSING = []
if CHROMIUM is None:
    _MISSING.append("no 'chromium' executable on PATH or at /usr/bin/chromium "
                    "(Debian: apt-get install chromium; .ci/run does this)")
if _PLAYWRIGHT:
    _MISSING.append(_PLAYWRIGHT)

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(bool(_MISSING), reason="browser test skipped: " + "; ".join(_MISSING))]

# notebook -> what it must show. "explorers": widget outputs holding a slider (in order); "plotly":
# plotly figures; "click_first": a button (by its text) to press before the first slider is live.
NOTEBOOKS = {
    "01_equivariance_primer.ipynb": dict(explorers=1, plotly=0),
    "03_e4_dynamic_filters.ipynb": dict(explorers=1, plotly=0),
    # the σ slider is shown for the Gaussian stencils only: switch the method first
    "04_pdo_stencils.ipynb": dict(explorers=1, plotly=0, click_first="gauss"),
    "05_neural_epdo.ipynb": dict(explorers=1, plotly=0),
    "06_separable_lie_groups.ipynb": dict(explorers=2, plotly=0),
}
# the lessons, as a teacher runs them in class: the solutions versions (the student ones stop at the gaps)
LESSON_NOTEBOOKS = {
    "lessons/solutions/lesson1_groups_and_equivariance.ipynb": dict(explorers=1, plotly=0),
    "lessons/solutions/lesson2_regular_gcnn.ipynb": dict(explorers=0, plotly=0),
    "lessons/solutions/lesson3_why_quarter_turns.ipynb": dict(explorers=1, plotly=0),
}
NOTEBOOKS.update(LESSON_NOTEBOOKS)
if os.environ.get("EQKIT_BROWSER_ALL"):   # notebook 02 trains for a minute or two first
    NOTEBOOKS["02_kernel_redundancy.ipynb"] = dict(explorers=1, plotly=0)

# cheaper sweeps in the served copies (appended to the parameters cell, as papermill would inject
# them): the browser checks rendering and interaction, tests/test_notebooks.py the quick profile
FAST_PARAMETERS = {
    "01_equivariance_primer.ipynb": {"ANGLE_STEP": 15.0},
    "03_e4_dynamic_filters.ipynb": {"SPEED_REPEATS": 1},
    "06_separable_lie_groups.ipynb": {"ANGLE_STEP": 15.0},
}

CELL_TIMEOUT_S = 300          # Run All of one notebook, at most
CHROMIUM_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


# ----------------------------------------------------------------------------- server + browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, method: str = "GET"):
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"token {TOKEN}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        body = r.read()
    return json.loads(body) if body else None


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """JupyterLab serving a copy of notebooks/; yields its base URL."""
    base = tmp_path_factory.mktemp("lab")
    nbdir = base / "notebooks"
    nbdir.mkdir()
    for name in NOTEBOOKS:
        nb = json.loads((ROOT / "notebooks" / name).read_text())
        params = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
        # figures into the served copy's folder, never over the repository's figures/
        fast = {**FAST_PARAMETERS.get(name, {}), "FIGURES_DIR": str(base / "figures")}
        extra = "".join(f"\n{k} = {v!r}  # browser test" for k, v in fast.items())
        params["source"] = "".join(params["source"]).rstrip("\n") + extra
        (nbdir / name).parent.mkdir(parents=True, exist_ok=True)
        (nbdir / name).write_text(json.dumps(nb, indent=1))
    (base / "figures").mkdir()
    for d in ("config", "data", "runtime", "ipython"):
        (base / d).mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               JUPYTER_CONFIG_DIR=str(base / "config"), JUPYTER_DATA_DIR=str(base / "data"),
               JUPYTER_RUNTIME_DIR=str(base / "runtime"), IPYTHONDIR=str(base / "ipython"),
               MPLBACKEND="module://matplotlib_inline.backend_inline")
    port = _free_port()
    log = open(base / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", f"--port={port}",
         "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={TOKEN}",
         f"--ServerApp.root_dir={nbdir}", "--LabApp.news_url=None",
         f"--LabApp.workspaces_dir={base / 'workspaces'}"],
        cwd=nbdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited ({proc.returncode}):\n{(base / 'jupyterlab.log').read_text()[-3000:]}")
            try:
                _get(f"{url}/api/status")
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail("jupyter lab did not answer /api/status within 90 s")
                time.sleep(0.3)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def browser():
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, lab):
    ctx = browser.new_context(viewport={"width": 1400, "height": 2400})
    p = ctx.new_page()
    yield p
    ctx.close()
    for k in _get(f"{lab}/api/kernels") or []:   # free the CPU and memory for the next notebook
        try:
            _get(f"{lab}/api/kernels/{k['id']}", method="DELETE")
        except OSError:
            pass


# ----------------------------------------------------------------------------- page helpers
PROMPTS_STARTED = """() => {
  const p = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
  return p.length > 0 && p.every(e => /\\[(\\*|\\d+)\\]/.test(e.textContent));
}"""

# 'done' when every code cell has a number, 'error' as soon as a traceback shows
RUN_STATE = """() => {
  const out = [...document.querySelectorAll('.jp-OutputArea-output')];
  if (out.some(o => /Traceback|Error displaying widget|Error rendering/.test(o.textContent))) return 'error';
  const p = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
  if (p.length && p.every(e => /\\[\\d+\\]/.test(e.textContent))) return 'done';
  return '';
}"""


def _run_all(page):
    page.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle")).wait_for(timeout=120_000)
    for _ in range(3):
        page.locator(".jp-Notebook").first.click()
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        try:
            page.wait_for_function(PROMPTS_STARTED, timeout=10_000)
            return
        except Exception:
            page.keyboard.press("Escape")
    raise AssertionError("Run → Run All Cells never started the cells (kernel not connected?)")


def _errors(page) -> list[str]:
    texts = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').all_inner_texts()
    texts += page.locator(".jp-OutputArea-output").filter(
        has_text=re.compile(r"Error displaying widget|Error rendering")).all_inner_texts()
    return [t for t in texts if re.search(r"Traceback|Error displaying widget|Error rendering", t)]


def _wait_src_change(img, old: str, timeout_s: float = 60.0) -> str | None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            src = img.get_attribute("src", timeout=2_000)
        except Exception:
            src = None               # cleared and not yet redrawn
        if src and src != old:
            return src
        time.sleep(0.2)
    return None


# ----------------------------------------------------------------------------- the test
@pytest.mark.timeout(CELL_TIMEOUT_S + 240)
@pytest.mark.parametrize("name", list(NOTEBOOKS), ids=[n.split("_")[0] for n in NOTEBOOKS])
def test_notebook_in_browser(name, lab, page):
    spec = NOTEBOOKS[name]
    stem = Path(name).stem
    SHOTS.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    page.goto(f"{lab}/lab/tree/{name}?token={TOKEN}&reset")
    _run_all(page)
    state = page.wait_for_function(RUN_STATE, timeout=CELL_TIMEOUT_S * 1000, polling=500).json_value()
    run_s = time.time() - t0
    errors = _errors(page)
    assert state == "done" and not errors, f"{name}: error output in the browser:\n" + "\n---\n".join(errors)[-4000:]

    cells = page.locator(".jp-Notebook .jp-CodeCell")
    n_imgs = page.locator(".jp-OutputArea-output img").count()
    assert n_imgs >= 1, f"{name}: no matplotlib image rendered"

    # plotly
    plots = page.locator(".js-plotly-plot")
    assert plots.count() == spec["plotly"], f"{name}: {plots.count()} plotly figures, expected {spec['plotly']}"
    for i in range(spec["plotly"]):
        plots.nth(i).scroll_into_view_if_needed()
        assert plots.nth(i).is_visible() and plots.nth(i).locator(".main-svg").count() >= 1

    # explorers: widget boxes in cell outputs that hold a slider and an Output widget with a figure
    explorers = page.locator(".jp-OutputArea-output").filter(has=page.locator(".widget-slider"))
    assert explorers.count() == spec["explorers"], \
        f"{name}: {explorers.count()} explorers with sliders rendered, expected {spec['explorers']}"
    for i in range(spec["explorers"]):
        box = explorers.nth(i)
        suffix = "" if i == 0 else f"_{i + 1}"
        box.scroll_into_view_if_needed()
        sliders = box.locator(".widget-slider")
        first_live = not (spec.get("click_first") and i == 0)
        # a slider that only acts after the click (04's σ: gauss only) is hidden until then
        assert sliders.first.is_visible() == first_live, \
            f"{name} explorer {i + 1}: slider {'not ' if first_live else ''}visible"
        img = box.locator(".jupyter-widgets-output-area img, .widget-output img").first
        img.wait_for(state="visible", timeout=60_000)
        width = img.evaluate("e => e.naturalWidth")
        assert width >= 400, f"{name} explorer {i + 1}: figure only {width} px wide"
        old = img.get_attribute("src")
        if not first_live:
            box.get_by_role("button", name=spec["click_first"], exact=True).click()
            old = _wait_src_change(img, old)
            assert old, f"{name}: clicking {spec['click_first']!r} did not redraw the figure"
            sliders.first.wait_for(state="visible", timeout=10_000)
        box.screenshot(path=str(SHOTS / f"{stem}{suffix}.png"))

        # the first enabled slider: focus its handle, one step to the right
        handle = box.locator(".widget-slider:not(.mod-disabled) .noUi-handle").first
        readout = handle.locator("xpath=ancestor::*[contains(@class,'widget-slider')][1]").locator(".widget-readout")
        before = readout.inner_text() if readout.count() else ""
        handle.focus()
        handle.press("ArrowRight")
        new = _wait_src_change(img, old)
        after = readout.inner_text() if readout.count() else ""
        assert after != before, f"{name} explorer {i + 1}: ArrowRight did not move the slider ({before!r})"
        assert new, f"{name} explorer {i + 1}: slider {before!r} -> {after!r} but the figure was not redrawn"
        page.wait_for_timeout(300)
        box.screenshot(path=str(SHOTS / f"{stem}{suffix}_after.png"))
        assert not _errors(page), f"{name}: error after moving the slider:\n" + "\n".join(_errors(page))[-3000:]

    if not spec["explorers"]:   # a notebook without explorer: its first figure
        first = page.locator(".jp-OutputArea-output img").first
        first.scroll_into_view_if_needed()
        first.screenshot(path=str(SHOTS / f"{stem}.png"))
    print(f"{name}: Run All {run_s:.0f} s, total {time.time() - t0:.0f} s, {n_imgs} images")
