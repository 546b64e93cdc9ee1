#!/usr/bin/env bash
# Create .venv (Python 3.11) and install BarkGPT with the extras given (default: all).
# Used by `make run`, `make test`, CI (.ci/run) and the Lambda image recipe, so all install alike.
#   scripts/install.sh            -> .[all]
#   scripts/install.sh all,dev    -> .[all,dev]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all}"
venv="${VENV:-.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3

if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating $venv with $($python --version)"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
stamp="$venv/.installed-$extras"
# Re-install only when the dependency list changed (pip is slow even when nothing changes).
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  echo "==> installing barkgpt[$extras] (llama-cpp-python compiles on first install, ~4 min)"
  "${pip[@]}" install -q --upgrade pip setuptools wheel
  # torch first, from the pinned CPU build, so no dependency can pull another one.
  "${pip[@]}" install -q -c constraints.txt torch==2.13.0
  "${pip[@]}" install -q -c constraints.txt -e ".[$extras]"
  touch "$stamp"
fi
