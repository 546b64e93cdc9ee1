#!/usr/bin/env bash
# Build llama.cpp's own C++ server (`llama-server`) from the llama.cpp that llama-cpp-python vendors,
# the version pinned in constraints.txt, with the same flags as scripts/install.sh's wheel; cached
# under ~/.cache/barkgpt/llama-server-<key>/ (a few minutes on 2 cores, once). Prints its path.
# benchmarks/serve_load.py --configs llama-server runs it; the serving benchmark compares against it.
set -euo pipefail
cd "$(dirname "$0")/.."
llama_version=$(sed -n 's/^llama-cpp-python==//p' constraints.txt)
llama_cmake_args="${LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF}"
key=$(printf '%s %s' "$llama_version" "$llama_cmake_args" | sha256sum | cut -c1-12)
dest="${BARKGPT_CACHE:-$HOME/.cache/barkgpt}/llama-server-$key"
if [ ! -x "$dest/llama-server" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  echo "==> building llama-server from llama-cpp-python $llama_version's llama.cpp (cached after)" >&2
  python3 -m pip download -q --no-binary :all: --no-deps -d "$work" "llama-cpp-python==$llama_version" >&2
  tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
  src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
  # shellcheck disable=SC2086  # the flags are words
  cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    $llama_cmake_args >&2
  cmake --build "$work/build" --target llama-server -j "$(nproc)" >&2
  mkdir -p "$dest.tmp"
  cp "$work/build/bin/llama-server" "$dest.tmp/"
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
fi
echo "$dest/llama-server"
