#!/usr/bin/env bash
# Compiles sdpipe with candle's CUDA backend (`--features cuda`) on a machine that has no GPU
# and no system CUDA: the toolkit comes from scripts/cuda-toolkit.sh. A feature nobody compiles
# rots, so the test command runs this. Extra arguments go to `cargo check` (`--features cudnn`
# needs cuDNN's headers, which this script does not install).
#
# `cargo check` runs the build scripts, so candle's kernels really are compiled by nvcc; only
# the final link, which needs the driver's libcuda, is left out (and, below, the one static
# library that only that link would use).
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
# candle-kernels' quantized-MoE library is compiled from empty sources (scripts/nvcc-check-only
# says why: half the check's CPU time, never used by sdpipe, never linked by a check); every PTX
# kernel is still compiled for real. SDPIPE_CUDA_CHECK_FULL=1 compiles the library too.
# cudaforge takes the toolkit's root from NVCC's path (its parent's parent), so the wrapper
# sits in a folder of its own beside links to the real include and library folders.
if [ "${SDPIPE_CUDA_CHECK_FULL:-}" != 1 ]; then
    shim="$PWD/target/cuda-check-nvcc"
    mkdir -p "$shim/bin"
    ln -sfn "$PWD/scripts/nvcc-check-only" "$shim/bin/nvcc"
    for d in include lib lib64; do
        [ -e "$root/$d" ] && ln -sfn "$root/$d" "$shim/$d"
    done
    export SDPIPE_REAL_NVCC="$root/bin/nvcc" NVCC="$shim/bin/nvcc"
fi
cargo check --locked --features cuda "$@"
