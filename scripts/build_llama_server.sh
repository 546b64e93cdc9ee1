#!/usr/bin/env bash
# Build llama.cpp's own C++ server (`llama-server`) from the llama.cpp that the pinned
# llama-cpp-python (constraints.txt) vendors, against the libraries its wheel already compiled
# (libllama, libggml*, libmtmd in the venv's llama_cpp/lib): only the server and llama.cpp's
# `common` are compiled here (a few minutes on 2 cores instead of the whole of llama.cpp again),
# and the server runs the very same llama.cpp as `barkgpt serve`. Cached under
# ~/.cache/barkgpt/llama-server-<key>/ (key: version + the wheel's libraries); prints its path.
# benchmarks/serve_load.py --configs llama-server runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
llama_version=$(sed -n 's/^llama-cpp-python==//p' constraints.txt)
lib=$("$venv/bin/python" -c "import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).parent / 'lib')")
key=$( (echo "$llama_version $lib"; sha256sum "$lib"/libllama.so) | sha256sum | cut -c1-12)
dest="${BARKGPT_CACHE:-$HOME/.cache/barkgpt}/llama-server-$key"
if [ ! -x "$dest/llama-server" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  echo "==> building llama-server from llama-cpp-python $llama_version's llama.cpp (cached after)" >&2
  "$venv/bin/python" -m pip download -q --no-binary :all: --no-deps -d "$work" "llama-cpp-python==$llama_version" >&2
  tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
  src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
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
  cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_MTMD=OFF >&2
  cmake --build "$work/build" --target llama-server -j "$(nproc)" >&2
  mkdir -p "$dest.tmp"
  cp "$work/build/bin/llama-server" "$dest.tmp/"
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
fi
echo "$dest/llama-server"
