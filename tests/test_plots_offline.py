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
    """`dvc plots show` in a fresh DVC project holding the bark training log, with the offline template."""
    root = tmp_path_factory.mktemp("plots") / "project"
    root.mkdir()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=root, check=True, env=env, timeout=120)
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    (root / "reports/bark").mkdir(parents=True)
    shutil.copy(bark_project / "reports/bark/train_log.csv", root / "reports/bark/train_log.csv")
    out = subprocess.run([sys.executable, str(ROOT / "scripts/offline_plots.py"), "--root", str(root)],
                         capture_output=True, text=True, timeout=300, env=env)
    if out.returncode and "npm is not installed" in out.stderr + out.stdout:
        pytest.skip("npm is absent and the vega packages are not cached: apt-get install -y npm")
    assert out.returncode == 0, out.stderr[-2000:]
    shown = subprocess.run([str(BIN / "dvc"), "plots", "show", "-o", "dvc_plots"], cwd=root, capture_output=True,
                           text=True, timeout=300, env=env)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    page = root / "dvc_plots" / "index.html"
    html = page.read_text()
    assert "cdn.jsdelivr.net" not in html and "vega@5.33.1" in html
    return page


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
