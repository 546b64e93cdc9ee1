#!/usr/bin/env bash
# Build llama.cpp's own C++ server (`llama-server`) from the llama.cpp that the pinned
# llama-cpp-python (constraints.txt) vendors, against the libraries its wheel already compiled
# (libllama, libggml*, libmtmd in the venv's llama_cpp/lib): only the server and llama.cpp's
# `common` are compiled here (a few minutes on 2 cores instead of the whole of llama.cpp again),
# and the server runs the very same llama.cpp as `barkgpt serve`.
# Cached under ~/.cache/barkgpt/llama-server/<version>-<key>/ (key: the wheel's libllama and its
# folder, which the binary's RUNPATH names); the
# sdist is kept beside the wheel in ~/.cache/barkgpt/wheels, and an interrupted build resumes in
# ~/.cache/barkgpt/llama-server/build-<version>-<key>/. Compiles under `nice` with JOBS jobs
# (default 2). Prints the binary's path. benchmarks/serve_load.py --configs llama-server runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
llama_version=$(sed -n 's/^llama-cpp-python==//p' constraints.txt)
# the real folder (a worktree's .venv may be a symlink): the binary's RUNPATH names it
lib=$("$venv/bin/python" -c "import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).resolve().parent / 'lib')")
key=$( (echo "$llama_version $lib"; sha256sum "$lib"/libllama.so | cut -d' ' -f1) | sha256sum | cut -c1-12)
cache="${BARKGPT_CACHE:-$HOME/.cache/barkgpt}"
dest="$cache/llama-server/$llama_version-$key"
if [ ! -x "$dest/llama-server" ]; then
  work="$cache/llama-server/build-$llama_version-$key"
  mkdir -p "$work" "$cache/wheels"
  echo "==> building llama-server from llama-cpp-python $llama_version's llama.cpp in $work (cached after)" >&2
  sdist="$cache/wheels/llama_cpp_python-$llama_version.tar.gz"
  if [ ! -f "$sdist" ]; then
    "$venv/bin/python" -m pip download -q --no-binary :all: --no-deps -d "$cache/wheels" \
      "llama-cpp-python==$llama_version" >&2
  fi
  src="$work/llama_cpp_python-$llama_version/vendor/llama.cpp"
  if [ ! -f "$work/.patched" ]; then
    rm -rf "$work/llama_cpp_python-$llama_version" "$work/build"
    tar -xzf "$sdist" -C "$work"
    # ggml, llama and mtmd become imported targets over the wheel's libraries; the tools are the server
    "$venv/bin/python" - "$src" "$lib" <<'EOF'
import sys
from pathlib import Path

src, lib = Path(sys.argv[1]), sys.argv[2]
top = src / "CMakeLists.txt"
s = top.read_text()
start = s.index("if (NOT TARGET ggml AND NOT LLAMA_USE_SYSTEM_GGML)")
end = s.index("endif()", start) + len("endif()")
imported = f"""
foreach(lib ggml ggml-base ggml-cpu llama mtmd)
    add_library(${{lib}} SHARED IMPORTED GLOBAL)
    set_target_properties(${{lib}} PROPERTIES IMPORTED_LOCATION {lib}/lib${{lib}}.so)
endforeach()
set_target_properties(ggml PROPERTIES INTERFACE_INCLUDE_DIRECTORIES ${{CMAKE_CURRENT_SOURCE_DIR}}/ggml/include)
set_target_properties(llama PROPERTIES INTERFACE_INCLUDE_DIRECTORIES
    "${{CMAKE_CURRENT_SOURCE_DIR}}/include;${{CMAKE_CURRENT_SOURCE_DIR}}/ggml/include" INTERFACE_LINK_LIBRARIES "ggml;ggml-base")
set_target_properties(mtmd PROPERTIES INTERFACE_INCLUDE_DIRECTORIES ${{CMAKE_CURRENT_SOURCE_DIR}}/tools/mtmd
    INTERFACE_LINK_LIBRARIES llama)
"""
s = s[:start] + imported + s[end:]
s = s.replace("add_subdirectory(src)\n", "", 1)
s = s[: s.index("set_target_properties(llama\n    PROPERTIES\n        PUBLIC_HEADER")]  # install rules of built targets
top.write_text(s)
tools = src / "tools" / "CMakeLists.txt"
t = tools.read_text()
tools.write_text(t[: t.index("if (EMSCRIPTEN)")] + "add_subdirectory(ui)\nadd_subdirectory(server)\n")
EOF
    touch "$work/.patched"
  fi
  # no web UI: its prebuilt assets come from Hugging Face, and the benchmark needs only the API
  # the server's own libraries (common, server-impl) static: one binary, linked only to the wheel's
  cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_MTMD=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >&2
  nice -n 10 cmake --build "$work/build" --target llama-server -j "${JOBS:-2}" >&2
  mkdir -p "$dest.tmp"
  cp "$work/build/bin/llama-server" "$dest.tmp/"
  "$dest.tmp/llama-server" --version >&2  # it runs (finds the wheel's libraries) before it is cached
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
  rm -rf "$work"
fi
echo "$dest/llama-server"
