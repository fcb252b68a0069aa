#!/usr/bin/env bash
# Installs the parts of NVIDIA's CUDA toolkit that building candle's CUDA kernels needs (nvcc,
# its crt headers and NVVM, the runtime headers, CCCL) from PyPI's wheels into
# target/cuda-toolkit, so that the `cuda` feature compiles on a machine with no GPU and no
# system CUDA. Prints the toolkit's root.
#
# No driver is needed to compile: nvcc is asked for compute capability 9.0 (H100/H200) instead
# of querying a GPU. The versions are pinned: cudarc 0.19 knows CUDA up to 13.4, so
# CUDARC_CUDA_VERSION (set by scripts/cuda-check.sh) must name the toolkit installed here.
#
#   scripts/cuda-toolkit.sh               # what compiling needs (scripts/cuda-check.sh)
#   scripts/cuda-toolkit.sh --libraries   # also what linking and running need: cuBLAS, cuRAND
#                                         # and NVRTC, with the unversioned names the linker
#                                         # wants (scripts/gpu-check.sh on a GPU machine that
#                                         # has a driver but no toolkit)
set -euo pipefail
cd "$(dirname "$0")/.."

# Keep these and CUDARC_CUDA_VERSION in scripts/cuda-check.sh in step.
NVCC=13.4.92
CRT=13.4.92
NVVM=13.4.92
RUNTIME=13.4.92
CCCL=13.3.5.0.6
CUBLAS=13.4.3.11
CURAND=10.4.4.72
NVRTC=13.4.92

packages=("nvidia-cuda-nvcc==$NVCC" "nvidia-cuda-crt==$CRT" "nvidia-nvvm==$NVVM"
    "nvidia-cuda-runtime==$RUNTIME" "nvidia-cuda-cccl==$CCCL")
libraries=("nvidia-cublas==$CUBLAS" "nvidia-curand==$CURAND" "nvidia-cuda-nvrtc==$NVRTC")
dir=target/cuda-toolkit
root="$PWD/$dir/nvidia/cu13"
stamp="$dir/.installed-$(echo "${packages[*]}" | tr ' =' '_-')"
with_libraries="$dir/.libraries-$(echo "${libraries[*]}" | tr ' =' '_-')"
if [ "${1:-}" = --libraries ]; then
    packages+=("${libraries[@]}")
    [ -e "$with_libraries" ] || rm -f "$stamp"
fi

if [ ! -e "$stamp" ]; then
    rm -rf "$dir"
    # One pip call for every wheel: they share the top-level folder `nvidia`, which a second
    # `pip install --target` would skip (or, with --upgrade, replace). --target installs into a
    # folder of ours: nothing touches the system's Python.
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --retries 10 \
        --timeout 60 --target "$dir" "${packages[@]}" >&2
    [ -x "$root/bin/nvcc" ] || { echo "cuda-toolkit.sh: no nvcc under $root/bin" >&2; exit 1; }
    if [ "${1:-}" = --libraries ]; then
        # The wheels ship libX.so.N only; `-lX` looks for libX.so.
        for lib in "$root"/lib/lib*.so.*; do
            base=${lib%%.so.*}.so
            [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
        done
        # The driver's libcuda, which containers often mount as libcuda.so.1 only.
        driver=$(ldconfig -p | awk '/libcuda\.so\.1 / {print $NF; exit}')
        if [ -n "$driver" ] && [ ! -e "$root/lib/libcuda.so" ]; then
            ln -s "$driver" "$root/lib/libcuda.so"
        fi
        touch "$with_libraries"
    fi
    touch "$stamp"
fi
echo "$root"
