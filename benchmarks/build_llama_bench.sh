#!/usr/bin/env bash
# Build llama.cpp's own `llama-bench` from the same vendored llama.cpp source that the pinned
# llama-cpp-python was built from, CPU-only and with the same defaults as its wheel
# (Release, GGML_NATIVE on, OpenMP on, shared libraries). Reuses an existing build.
# Prints the path of the binary on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
root="$here/.build"
src="$root/llama_cpp_python-$version"
bin="$root/build-$version/bin/llama-bench"
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
mkdir -p "$root"
if [ ! -d "$src" ]; then
  pip=${PIP:-"$here/../.venv/bin/pip"}
  [ -x "$pip" ] || pip=pip
  "$pip" download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$root" >&2
  tar -xzf "$root/llama_cpp_python-$version.tar.gz" -C "$root"
fi
cmake -S "$src/vendor/llama.cpp" -B "$root/build-$version" -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON >&2
cmake --build "$root/build-$version" --target llama-bench llama-quantize -j "$(nproc)" >&2
echo "$bin"
