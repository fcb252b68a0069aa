#!/usr/bin/env bash
# Seconds per finetuning step and peak memory, sdpipe vs diffusers, measured in the same run.
# Results: docs/bench/train.md.
#
#   bench/train.sh [threads] [steps] [rounds] [modes]
#       (defaults: 2 threads, 3 steps, 3 rounds, modes "plain checkpointing"; the LoRA modes are
#       lora-plain and lora-checkpointing: rank 4 on to_q/to_k/to_v/to_out.0, no EMA)
#
# Builds stages/train/examples/train_bench.rs in release, then for each round, each model
# (tiny, mid) and each mode (full finetuning or LoRA, with or without gradient checkpointing)
# runs sdpipe (`train_bench`) and
# diffusers (`bench/train_bench.py`) one after the other, the order swapped every round. Each
# run is its own process (so its peak RSS is its own), makes one warm-up step and reports the
# median of `steps` timed steps: MSE on ε, backward, gradient clipping, AdamW, EMA, batch 1, on
# random weights. Prints every run with the 1-minute load average before it, then per
# configuration the medians over the rounds and the ratio sdpipe / diffusers (below 1: sdpipe
# is faster, or uses less memory).
#
# Needs python3 with torch and diffusers. Environment: CARGO_TARGET_DIR (default: target).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-2}
STEPS=${2:-3}
ROUNDS=${3:-3}
MODES=${4:-plain checkpointing}
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
cargo build --release -q -p sdpipe-train --example train_bench
BIN="${CARGO_TARGET_DIR:-target}/release/examples/train_bench"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "threads $THREADS, $STEPS timed steps per run, $ROUNDS rounds, modes: $MODES; $(uptime)"
python3 -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)'
run() { # side model mode round
    local load line
    load=$(cut -d' ' -f1 /proc/loadavg)
    if [ "$1" = sdpipe ]; then
        line=$("$BIN" "$2" "$3" "$STEPS" "$THREADS")
    else
        line=$(python3 bench/train_bench.py "$2" "$3" "$STEPS" "$THREADS" 2>"$WORK/stderr") ||
            { cat "$WORK/stderr" >&2; exit 1; }
    fi
    echo "{\"round\": $4, \"mode\": \"$3\", \"load\": $load, ${line#\{}" | tee -a "$WORK/results.jsonl"
}
for round in $(seq 1 "$ROUNDS"); do
    for model in tiny mid; do
        for mode in $MODES; do
            if [ $((round % 2)) = 1 ]; then
                run sdpipe "$model" "$mode" "$round"
                run diffusers "$model" "$mode" "$round"
            else
                run diffusers "$model" "$mode" "$round"
                run sdpipe "$model" "$mode" "$round"
            fi
        done
    done
done

python3 - "$WORK/results.jsonl" "$MODES" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
modes = sys.argv[2].split()
print("\n| model | mode | sdpipe s/step | diffusers s/step | time ratio | sdpipe peak MiB | diffusers peak MiB | memory ratio | load (1 min) |")
print("|---|---|---|---|---|---|---|---|---|")
for model in ("tiny", "mid"):
    for mode in modes:
        rs = [r for r in runs if r["config"] == model and r["mode"] == mode]
        med = lambda side, key: statistics.median(r[key] for r in rs if r["impl"] == side)
        s, d = med("sdpipe", "median_s_per_step"), med("diffusers", "median_s_per_step")
        ms, md = med("sdpipe", "peak_rss_mib"), med("diffusers", "peak_rss_mib")
        loads = [r["load"] for r in rs]
        print("| %s | %s | %.3f | %.3f | %.2f | %.0f | %.0f | %.2f | %.2f–%.2f |" % (
            model, mode, s, d, s / d, ms, md, ms / md,
            min(loads), max(loads)))
PY
