#!/usr/bin/env bash
# Installs the parts of NVIDIA's CUDA toolkit that building candle's CUDA kernels needs (nvcc,
# its crt headers and NVVM, the runtime headers, CCCL) from PyPI's wheels into target/cuda-toolkit, so that the `cuda`
# feature compiles on a machine with no GPU and no system CUDA. Prints the toolkit's root.
#
# No driver is needed to compile: nvcc is asked for compute capability 9.0 (H100/H200) instead
# of querying a GPU. The versions are pinned: cudarc 0.19 knows CUDA up to 13.4, so
# CUDARC_CUDA_VERSION (set by scripts/cuda-check.sh) must name the toolkit installed here.
set -euo pipefail
cd "$(dirname "$0")/.."

# Keep these and CUDARC_CUDA_VERSION in scripts/cuda-check.sh in step.
NVCC=13.4.92
CRT=13.4.92
NVVM=13.4.92
RUNTIME=13.4.92
CCCL=13.3.5.0.6

dir=target/cuda-toolkit
root="$PWD/$dir/nvidia/cu13"
stamp="$dir/.installed-$NVCC-$CRT-$NVVM-$RUNTIME-$CCCL"
if [ ! -e "$stamp" ]; then
    rm -rf "$dir"
    # --target installs into a folder of ours: nothing touches the system's Python.
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dir" \
        "nvidia-cuda-nvcc==$NVCC" "nvidia-cuda-crt==$CRT" "nvidia-nvvm==$NVVM" \
        "nvidia-cuda-runtime==$RUNTIME" "nvidia-cuda-cccl==$CCCL" >&2
    [ -x "$root/bin/nvcc" ] || { echo "cuda-toolkit.sh: no nvcc under $root/bin" >&2; exit 1; }
    touch "$stamp"
fi
echo "$root"
