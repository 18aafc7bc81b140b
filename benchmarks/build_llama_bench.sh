#!/usr/bin/env bash
# Build llama.cpp's own `llama-bench` from the same vendored llama.cpp source that the installed
# llama-cpp-python was built from, CPU-only, configured as that package's wheel is.
#
#   benchmarks/build_llama_bench.sh [TARGET...]      (default target: llama-bench)
#
# The source is the llama-cpp-python sdist of the installed version (override with
# LLAMA_CPP_PYTHON_VERSION), fetched with `pip download --no-binary :all:` or taken from
# LLAMA_CPP_PYTHON_SDIST (a .tar.gz or an unpacked directory). The build goes to
# benchmarks/.build/build-<version>/ and is reused: nothing is rebuilt when the binaries exist
# and were configured with the same flags. Prints the path of each binary on stdout; the
# configure and compile chatter goes to stderr. Takes ~5 minutes on 2 cores the first time.
#
# Flags: llama-cpp-python's CMakeLists.txt (scikit-build-core, Release) forces
# BUILD_SHARED_LIBS=ON, LLAMA_BUILD_COMMON=ON and LLAMA_CURL=OFF and otherwise keeps llama.cpp's
# defaults on Linux: GGML_NATIVE=ON (-march=native), GGML_OPENMP=ON, llamafile kernels and CPU
# weight repacking on. We pass those explicitly, turn every GPU backend off (the comparison is
# CPU against CPU), and append $CMAKE_ARGS last, as pip's build of the wheel does, so a wheel
# installed with CMAKE_ARGS=... can be matched by exporting the same value here.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root="$here/.build"
py=${PYTHON:-"$here/../.venv/bin/python"}
[ -x "$py" ] || py=python3

installed=$("$py" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' \
  2>/dev/null || true)
version=${LLAMA_CPP_PYTHON_VERSION:-${installed:-0.3.36}}
if [ -n "$installed" ] && [ "$installed" != "$version" ]; then
  echo "warning: llama-cpp-python $installed is installed; building llama.cpp from $version" >&2
fi

src="$root/llama_cpp_python-$version"
build="$root/build-$version"
stamp="$build/.llmkit-bench-flags"
if [ "$#" -gt 0 ]; then targets=("$@"); else targets=(llama-bench); fi

flags=(
  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_COMMON=ON -DLLAMA_CURL=OFF
  -DGGML_NATIVE=ON -DGGML_OPENMP=ON
  -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_HIP=OFF -DGGML_SYCL=OFF
  -DGGML_MUSA=OFF -DGGML_OPENCL=OFF -DGGML_RPC=OFF
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_SERVER=OFF
)
# shellcheck disable=SC2206  # CMAKE_ARGS is a space-separated list, as pip reads it
[ -n "${CMAKE_ARGS:-}" ] && flags+=(${CMAKE_ARGS})

mkdir -p "$root"
# One build at a time (another benchmark may call this script concurrently).
exec 9>"$root/.lock"
command -v flock >/dev/null && flock 9

want="${flags[*]}"
all_built=1
for t in "${targets[@]}"; do [ -x "$build/bin/$t" ] || all_built=0; done
if [ "$all_built" = 1 ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  for t in "${targets[@]}"; do echo "$build/bin/$t"; done
  exit 0
fi

if [ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]; then
  given=${LLAMA_CPP_PYTHON_SDIST:-}
  if [ -n "$given" ] && [ -d "$given" ]; then
    rm -rf "$src.tmp" && cp -r "$given" "$src.tmp"
  else
    tarball=${given:-"$root/llama_cpp_python-$version.tar.gz"}
    if [ ! -f "$tarball" ]; then
      echo "downloading the llama-cpp-python $version sdist from PyPI" >&2
      "$py" -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$version" -d "$root" >&2
    fi
    rm -rf "$src.tmp" && mkdir "$src.tmp"
    tar -xzf "$tarball" -C "$src.tmp" --strip-components=1
  fi
  grep -q "__version__ = \"$version\"" "$src.tmp/llama_cpp/__init__.py" || {
    echo "error: $src.tmp is not llama-cpp-python $version" >&2; exit 1; }
  rm -rf "$src" && mv "$src.tmp" "$src"
fi

cmake -S "$src/vendor/llama.cpp" -B "$build" "${flags[@]}" >&2
cmake --build "$build" --target "${targets[@]}" -j "$(nproc 2>/dev/null || echo 2)" >&2
echo "$want" > "$stamp"
for t in "${targets[@]}"; do echo "$build/bin/$t"; done
