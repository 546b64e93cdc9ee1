"""`dvc plots show` with no network: the page draws the loss curve from inlined vega (Chromium).

The page is opened with every network request refused; the chart must still draw (a canvas with
the curve's pixels) and the page must not even try to reach a CDN.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def plots_page(bark_project, tmp_path_factory) -> Path:
    """`dvc plots show` in a fresh DVC project holding the bark training log and what a clone has of
    this repository's .dvc/ (its config and the committed page template): no install script ran."""
    root = tmp_path_factory.mktemp("plots") / "project"
    root.mkdir()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=root, check=True, env=env, timeout=120)
    for committed in (".dvc/config", ".dvc/offline-plots.html", "dvc.yaml"):
        shutil.copy(ROOT / committed, root / committed)
    (root / "reports/bark").mkdir(parents=True)
    shutil.copy(bark_project / "reports/bark/train_log.csv", root / "reports/bark/train_log.csv")
    shown = subprocess.run([str(BIN / "dvc"), "plots", "show", "-o", "dvc_plots"], cwd=root, capture_output=True,
                           text=True, timeout=300, env=env)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    page = root / "dvc_plots" / "index.html"
    html = page.read_text()
    assert "cdn.jsdelivr.net" not in html and "vega@5.33.1" in html
    return page


def test_the_offline_template_is_committed_not_local():
    """Every clone has it: in git and named by .dvc/config, not by the git-ignored config.local."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", ".dvc"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert {".dvc/config", ".dvc/offline-plots.html"} <= set(tracked), tracked
    assert "html_template = offline-plots.html" in (ROOT / ".dvc/config").read_text()
    # the install script keeps the committed page (no npm needed) when its pinned versions match
    before = (ROOT / ".dvc/offline-plots.html").stat().st_mtime_ns
    out = subprocess.run([sys.executable, str(ROOT / "scripts/offline_plots.py"), "--root", str(ROOT)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PATH": "/nonexistent"})
    assert out.returncode == 0, out.stderr
    assert (ROOT / ".dvc/offline-plots.html").stat().st_mtime_ns == before


def test_text_pipelines_plot_validation_bpb():
    import yaml

    from barkgpt.pipelines import get
    from barkgpt.pipelines.dvcfile import render

    for name, curve in (("bark", "loss"), ("webtext", "val_bpb"), ("localtext", "val_bpb")):
        stage = yaml.safe_load(render(get(name)))["stages"][f"{name}-train"]
        assert [{"x": "step", "y": curve}] == [{k: v for k, v in plot.items() if k in "xy"}
                                              for entry in stage["plots"] for plot in entry.values()], stage["plots"]


def test_plots_page_draws_the_loss_curve_offline(plots_page, tmp_path):
    if not shutil.which("chromium"):
        pytest.skip("Debian's chromium is not installed: apt-get install -y chromium")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the Python driver)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            refused = []

            def offline(route):  # the network is gone: anything but the file itself fails
                if route.request.url.startswith("file://"):
                    return route.continue_()
                refused.append(route.request.url)
                return route.abort()

            page.route("**/*", offline)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(plots_page.as_uri())
            page.wait_for_selector("canvas, svg.marks", timeout=20000)
            # pixels the chart drew (the canvas starts fully transparent)
            drawn = page.evaluate("""() => {
                const c = document.querySelector('canvas');
                if (!c) return document.querySelectorAll('svg.marks path').length;
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
                return n; }""")
            shot = tmp_path / "plots.png"  # kept under pytest's basetemp, for a person to look at
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    assert refused == [], refused
    assert drawn > 2000, f"only {drawn} pixels drawn: the chart is blank"
    from PIL import Image

    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20  # axes, labels and the curve, not a blank page
