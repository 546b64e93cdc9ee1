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

# llama-cpp-python compiles llama.cpp. We build it ourselves, once, into a wheelhouse keyed by
# version and flags: with -march=native on a CPU with AMX, llama.cpp moves quantized weights into
# AMX buffers and crashes on the first forward pass (llama.cpp issue #20824), so we build with
# AVX-512 but without AMX. LLAMA_CMAKE_ARGS overrides the flags (e.g. for an older CPU).
llama_version=$(sed -n 's/^llama-cpp-python==//p' constraints.txt)
llama_cmake_args="${LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF}"
install_llama_cpp() {
  local key wheelhouse
  key=$(printf '%s %s' "$llama_version" "$llama_cmake_args" | sha256sum | cut -c1-12)
  wheelhouse="${BARKGPT_WHEELHOUSE:-$HOME/.cache/barkgpt/wheels}/llama-$key"
  if ! ls "$wheelhouse"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "==> compiling llama-cpp-python $llama_version (about 4 minutes on 2 cores; cached after)"
    CMAKE_ARGS="$llama_cmake_args" "${pip[@]}" wheel -q --no-cache-dir --no-deps -w "$wheelhouse" \
      "llama-cpp-python==$llama_version"
  fi
  "${pip[@]}" install -q -c constraints.txt "$wheelhouse"/llama_cpp_python-*.whl
}
stamp="$venv/.installed-$extras"
# Re-install only when the dependency list changed (pip is slow even when nothing changes).
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ] || [ requirements.lock -nt "$stamp" ]; then
  echo "==> installing barkgpt[$extras]"
  "${pip[@]}" install -q --upgrade pip setuptools wheel
  # torch first, from the pinned CPU build, so no dependency can pull another one.
  "${pip[@]}" install -q -c constraints.txt torch==2.13.0
  install_llama_cpp
  "${pip[@]}" install -q -c constraints.txt -c requirements.lock -e ".[$extras]"
  touch "$stamp"
fi
# `dvc plots show` offline: vega, vega-lite and vega-embed inlined into DVC's page template
# (npm registry, pinned and sha512-checked, cached in ~/.cache/barkgpt/npm; skipped without npm).
"$venv/bin/python" scripts/offline_plots.py || echo "warning: dvc plots show will load vega from a CDN (see above)"
