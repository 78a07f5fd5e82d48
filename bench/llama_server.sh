#!/usr/bin/env bash
# Build llama-server from the llama.cpp vendored by llama-cpp-python (bench only).
#
# Usage: bench/llama_server.sh            # configure + build, prints the binary path
# Env:   LLAMA_CPP_SRC  vendored llama.cpp (default: the llama-cpp-python 0.3.36 sdist)
#        JOBS           parallel build jobs (default 2)
#
# The build lives in bench/.work/llama-server-build (git-ignored) and is never
# committed. Re-running is incremental. Only the llama-server target is built.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="${LLAMA_CPP_SRC:-/tmp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp}"
build="$here/.work/llama-server-build"
jobs="${JOBS:-2}"

if [[ ! -f "$src/CMakeLists.txt" ]]; then
    echo "llama.cpp source not found at $src (set LLAMA_CPP_SRC)" >&2
    exit 2
fi
mkdir -p "$build"

if [[ ! -f "$build/CMakeCache.txt" ]]; then
    cmake -S "$src" -B "$build" -G Ninja \
        -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_BUILD_TOOLS=ON \
        -DGGML_NATIVE=ON
fi
cmake --build "$build" --target llama-server -j "$jobs"

bin="$build/bin/llama-server"
test -x "$bin"
echo "$bin"
