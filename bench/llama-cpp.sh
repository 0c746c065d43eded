#!/usr/bin/env bash
# Builds llama.cpp (through llama-cpp-python==0.3.36, from source) into a virtual environment
# outside the repository, for the reference measurements. Idempotent.
#   bench/llama-cpp.sh avx2     # edge-class build: AVX2/FMA/F16C, no AVX-512/AMX
#   bench/llama-cpp.sh native   # everything this CPU has (-fno-dse: GCC 12 miscompiles AMX setup)
# Prints the venv's python on stdout.
set -euo pipefail
flavor="${1:-avx2}"
root="${OUTPOST_BENCH_CACHE:-$HOME/.cache/outpost/bench}"
venv="$root/llama-cpp-$flavor"
case "$flavor" in
  avx2) args="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_AVX_VNNI=OFF" ;;
  native) args="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS=-fno-dse -DCMAKE_CXX_FLAGS=-fno-dse" ;;
  *) echo "usage: $0 avx2|native" >&2; exit 2 ;;
esac
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip >&2
  CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$venv/bin/pip" install --quiet --no-cache-dir --no-binary llama-cpp-python llama-cpp-python==0.3.36 >&2
fi
echo "$venv/bin/python"
