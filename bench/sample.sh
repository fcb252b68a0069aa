#!/usr/bin/env bash
# Seconds per sampling step, sdpipe vs diffusers, measured in the same run. Results:
# docs/bench/sample.md.
#
#   bench/sample.sh [threads] [steps] [rounds]     (defaults: 2 threads, 10 steps, 3 rounds)
#
# Builds stages/diffusion/examples/bench_sample.rs in release, writes the tiny and the mid-size
# pipeline folders once (the diffusers layout; both sides load the same files), then for each
# round and each model runs sdpipe (`bench_sample time`) and diffusers (`bench/sample.py`) one
# after the other, the order swapped every round. Each run loads the folder, makes one warm-up
# call and times one call of PNDM `steps` steps with guidance 7.5 (UNet batch 2), latents out,
# no VAE decode. A step is one UNet call plus the scheduler update (PNDM makes steps + 1).
# Prints every run with the 1-minute load average around it, then per model the median seconds
# per step of each side and the ratio sdpipe / diffusers (below 1: sdpipe is faster). Last, the
# UNet's main ops alone at the mid model's shapes, both sides (`bench_sample ops`,
# `bench/sample.py ops`), to show where a difference comes from.
#
# Needs python3 with torch and diffusers. Environment: CARGO_TARGET_DIR (default: target).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-2}
STEPS=${2:-10}
ROUNDS=${3:-3}
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
cargo build --release -q -p sdpipe-diffusion --example bench_sample
BIN="${CARGO_TARGET_DIR:-target}/release/examples/bench_sample"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$BIN" write "$WORK" >/dev/null

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "threads $THREADS, PNDM $STEPS steps, guidance 7.5, $ROUNDS rounds; $(uptime)"
run() { # side model round
    local line
    if [ "$1" = sdpipe ]; then
        line=$("$BIN" time "$WORK/$2" "$STEPS")
    else
        line=$(python3 bench/sample.py "$WORK/$2" "$STEPS" "$THREADS" 2>"$WORK/stderr") ||
            { cat "$WORK/stderr" >&2; exit 1; }
    fi
    echo "{\"model\": \"$2\", \"round\": $3, ${line#\{}" | tee -a "$WORK/results.jsonl"
}
for round in $(seq 1 "$ROUNDS"); do
    for model in tiny mid; do
        if [ $((round % 2)) = 1 ]; then
            run sdpipe "$model" "$round"
            run diffusers "$model" "$round"
        else
            run diffusers "$model" "$round"
            run sdpipe "$model" "$round"
        fi
    done
done

python3 - "$WORK/results.jsonl" <<'EOF'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
print("\n| model | sdpipe s/step | diffusers s/step | ratio sdpipe/diffusers | load (1 min) |")
print("|---|---|---|---|---|")
for model in ("tiny", "mid"):
    med = {side: statistics.median(r["per_step"] for r in runs
                                   if r["model"] == model and r["side"] == side)
           for side in ("sdpipe", "diffusers")}
    loads = [v for r in runs if r["model"] == model for v in (r["load_before"], r["load_after"])]
    print("| %s | %.4f | %.4f | %.2f | %.2f–%.2f |" % (
        model, med["sdpipe"], med["diffusers"], med["sdpipe"] / med["diffusers"],
        min(loads), max(loads)))
EOF

echo
echo "ops at the mid model's shapes (median of 5); $(uptime)"
"$BIN" ops | sed 's/^/sdpipe: /'
python3 bench/sample.py ops "$THREADS" | sed 's/^/torch:  /'
