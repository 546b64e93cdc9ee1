#!/usr/bin/env python
"""Make `dvc plots show` work with no network: a DVC HTML template with vega inlined.

DVC's own page loads vega, vega-lite and vega-embed from a CDN, so offline it shows a blank page.
This fetches the three packages from the npm registry with npm (pinned versions, sha512 checked,
cached in ~/.cache/barkgpt/npm), writes `.dvc/offline-plots.html` with their builds inlined in
<script> tags, and points DVC at it in `.dvc/config` (plots.html_template). Both files are
committed, so every clone draws its plots offline, installed by this script or not; run it again
only to change the pinned versions (or, with --root, for another DVC project). Idempotent, and a
second run needs no network.

    python scripts/offline_plots.py [--root PROJECT]
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

# The majors DVC's own template asks for (vega 5, vega-lite 5, vega-embed 6), newest of each;
# the integrity is the registry's sha512 of the package tarball.
PACKAGES = [
    ("vega", "5.33.1", "build/vega.min.js",
     "sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw=="),
    ("vega-lite", "5.23.0", "build/vega-lite.min.js",
     "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA=="),
    ("vega-embed", "6.29.0", "build/vega-embed.min.js",
     "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q=="),
]
TEMPLATE_NAME = "offline-plots.html"  # in .dvc/; plots.html_template is relative to .dvc/
CACHE = Path(os.environ.get("BARKGPT_NPM_CACHE", Path.home() / ".cache" / "barkgpt" / "npm"))

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- vega, vega-lite and vega-embed inlined (scripts/offline_plots.py): no network needed -->
SCRIPTS
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def tarball(name: str, version: str, expected: str) -> bytes:
    """The package tarball from the cache, else from the registry through npm; sha512 checked."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{name}-{version}.tgz"
    if not path.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise SystemExit(f"npm is not installed, and {path} is not cached: install Node.js and npm "
                             "(apt-get install -y npm), or copy the tarball there")
        out = subprocess.run([npm, "pack", f"{name}@{version}", "--pack-destination", str(CACHE), "--silent"],
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0 or not path.exists():
            raise SystemExit(f"npm pack {name}@{version} failed: {out.stderr.strip()[-500:]}")
    data = path.read_bytes()
    if integrity(data) != expected:
        path.unlink()
        raise SystemExit(f"{path}: sha512 does not match the pinned integrity; removed it, run again")
    return data


def build_template() -> str:
    scripts = []
    for name, version, member, expected in PACKAGES:
        with tarfile.open(fileobj=io.BytesIO(tarball(name, version, expected)), mode="r:gz") as tar:
            js = tar.extractfile(f"package/{member}").read().decode("utf-8")
        # the page is filled by str.replace of these placeholders, and a script ends at "</script"
        for bad in ("{plot_divs}", "{scripts}", "{refresh_tag}", "</script"):
            if bad in js:
                raise SystemExit(f"{name}@{version} {member} contains {bad!r}; it cannot be inlined as is")
        scripts.append(f"    <script>/* {name}@{version} */\n{js}\n    </script>")
    return PAGE.replace("SCRIPTS", "\n".join(scripts))


def configure_dvc(root: Path) -> None:
    """plots.html_template in the project's .dvc/config (committed, so every clone has it), and not
    in the git-ignored .dvc/config.local, where older installs put it."""
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")
    config = root / ".dvc" / "config"
    if TEMPLATE_NAME not in (config.read_text() if config.exists() else ""):
        done = dvc and subprocess.run([dvc, "config", "plots.html_template", TEMPLATE_NAME], cwd=root,
                                      capture_output=True, text=True, timeout=120).returncode == 0
        if not done:
            with config.open("a") as f:
                f.write(f"[plots]\n    html_template = {TEMPLATE_NAME}\n")
    local = root / ".dvc" / "config.local"
    if local.exists() and TEMPLATE_NAME in local.read_text() and dvc:
        subprocess.run([dvc, "config", "--local", "--unset", "plots.html_template"], cwd=root,
                       capture_output=True, text=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parent.parent), help="the project root")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    if not (root / ".dvc").is_dir():
        raise SystemExit(f"{root}: not a DVC project (no .dvc/ folder)")
    template = root / ".dvc" / TEMPLATE_NAME
    pinned = [f"/* {name}@{version} */" for name, version, _, _ in PACKAGES]
    if not template.exists() or not all(mark in template.read_text() for mark in pinned):
        template.write_text(build_template())  # the committed page is kept: no npm needed in a clone
    configure_dvc(root)
    print(f"dvc plots show: offline page template {template} ({template.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
