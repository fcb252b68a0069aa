#!/usr/bin/env bash
# Compiles sdpipe with candle's CUDA backend (`--features cuda`) on a machine that has no GPU
# and no system CUDA: the toolkit comes from scripts/cuda-toolkit.sh. A feature nobody compiles
# rots, so the test command runs this. Extra arguments go to `cargo check` (`--features cudnn`
# needs cuDNN's headers, which this script does not install).
#
# `cargo check` runs the build scripts, so candle's kernels really are compiled by nvcc; only
# the final link, which needs the driver's libcuda, is left out.
set -euo pipefail
cd "$(dirname "$0")/.."

root=$(scripts/cuda-toolkit.sh)
export CUDA_ROOT="$root" CUDA_PATH="$root" PATH="$root/bin:$PATH"
# No GPU to ask: build for compute capability 9.0 (H100/H200), as scripts/gpu-check.sh runs on.
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# The toolkit's version for cudarc's bindings: 13.4, as pinned in scripts/cuda-toolkit.sh.
export CUDARC_CUDA_VERSION=13040
# candle's kernel build (cudaforge) runs nvcc on half the cores by default; use them all.
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
cargo check --locked --features cuda "$@"
