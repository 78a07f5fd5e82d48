#!/usr/bin/env bash
# Build the llama-cpp-python wheel from its sdist with this repo's patches applied.
#
# Usage: scripts/build_llama_wheel.sh PYTHON VERSION WHEELHOUSE
# Env:   CMAKE_ARGS (e.g. -DGGML_LLAMAFILE=OFF), passed through to the build.
#
# The sdist vendors llama.cpp (vendor/llama.cpp). Every patches/llama-cpp-python-VERSION-*.patch
# is applied to it with `patch -p1`, in name order; see patches/README.md for what each fixes and
# why. A patch that does not apply stops the build (it was written for exactly this version).
set -euo pipefail
py=$1 version=$2 wheelhouse=$3
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
tar xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version"
shopt -s nullglob
for p in "$root"/patches/llama-cpp-python-"$version"-*.patch; do
    echo "applying $(basename "$p")"
    patch -p1 --forward --silent -d "$src" < "$p"
done
# No AMX kernels on x86-64: ggml's AMX matmul (ggml_backend_amx_mul_mat) segfaults in the first
# decode on Sapphire Rapids-class machines, ours among them (a 2-core VM whose CPU reports
# amx_tile/amx_int8): llama.cpp issue #20824, open and unfixed; dspy dropped its AMX build for the
# same crash (stanfordnlp/dspy#10079). GGML_NATIVE's -march=native turns AMX on whenever the CPU has
# it; explicit -mno-amx-* flags win over -march in GCC and Clang, so ggml builds without the AMX
# buffer type and uses its AVX-512/AVX2 kernels instead.
if [ "$(uname -m)" = x86_64 ]; then
    export CFLAGS="${CFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    export CXXFLAGS="${CXXFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
mkdir -p "$wheelhouse"
"$py" -m pip wheel --no-deps --no-cache-dir "$src" -w "$wheelhouse"
