#!/usr/bin/env bash
# Metric network throughput: sdpipe (Rust CPU: candle + gemm) vs pytorch-fid / lpips (PyTorch
# CPU), same synthetic 512x512 inputs, batch sizes and thread count. Results:
# docs/bench/metrics.md.
# Usage: bench/metrics.sh [threads] [images] [pairs]   (needs python3 with torch, pytorch-fid,
# lpips, clean-fid (tests/parity/metrics.py imports it) installed; not part of the test suite)
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-2}
IMAGES=${2:-32}
PAIRS=${3:-32}
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
cargo build --release -q -p sdpipe-metrics --example bench_metrics
BIN="${CARGO_TARGET_DIR:-target}/release/examples/bench_metrics"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
"$BIN" "$THREADS" "$IMAGES" "$PAIRS"
# Its per-layer profile goes to stderr: kept out of the output, shown if the script fails.
ERR=$(mktemp)
trap 'rm -f "$ERR"' EXIT
python3 bench/metrics.py "$THREADS" "$IMAGES" "$PAIRS" 2>"$ERR" || { cat "$ERR" >&2; exit 1; }
