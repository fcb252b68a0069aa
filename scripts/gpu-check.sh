#!/usr/bin/env bash
# Issue 15's checks on a machine with an NVIDIA GPU, as one script: the tests on the GPU, the
# demo pipeline at a reduced scale, and, side by side with diffusers on the same GPU, an
# SD1.5-size UNet training step at 512 px (batch 1, gradient checkpointing) and a 50-step PNDM
# sample: seconds and peak memory, written to docs/bench/gpu.md (or $GPU_CHECK_OUT).
#
#   scripts/gpu-check.sh [device] [model] [train steps]     (defaults: cuda:0 sd15 5)
#
# `scripts/gpu-check.sh cpu mid` runs the same steps on the CPU at a size it can afford: that
# is how the script itself is tested where no GPU is lent.
#
# Needs: python3 with torch and diffusers (CUDA builds for a GPU), and for a GPU the NVIDIA
# driver and either a CUDA toolkit on PATH (nvcc) or network access for scripts/cuda-toolkit.sh
# (nvcc from PyPI; the cuBLAS/cuRAND/NVRTC libraries then come from PyPI too).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${1:-cuda:0}
MODEL=${2:-sd15}
TRAIN_STEPS=${3:-5}
SAMPLE_STEPS=50
OUT=${GPU_CHECK_OUT:-docs/bench/gpu.md}
THREADS=$(nproc)
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS

FEATURES=()
if [ "$DEVICE" != cpu ]; then
    FEATURES=(--features cuda)
    if ! command -v nvcc >/dev/null; then
        root=$(scripts/cuda-toolkit.sh --libraries)
        export CUDA_ROOT="$root" CUDA_PATH="$root" PATH="$root/bin:$PATH"
        export LD_LIBRARY_PATH="$root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        export CUDARC_CUDA_VERSION=13040
    fi
    # The GPU's own compute capability (nvidia-smi knows it; candle's build asks for it).
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$cap}"
fi

WORK=$(mktemp -d)
# `|| true`: under `set -e` a failing command in the trap (kill with no jobs) sets the exit code.
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
log() { echo "gpu-check: $*" >&2; }

# Peak memory of a command: on a GPU, the most `nvidia-smi` saw the process use (polled every
# 0.2 s; the CUDA context included, the same way for both sides); on the CPU, its peak RSS.
# Prints the command's stdout, then one line `peak_mib N`.
measure() {
    if [ "$DEVICE" = cpu ]; then
        /usr/bin/time -f "peak_mib %M" -o "$WORK/time" "$@"
        awk '{print $1, $2 / 1024}' "$WORK/time"
        return
    fi
    "$@" &
    local pid=$! peak=0 used
    while kill -0 "$pid" 2>/dev/null; do
        used=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits |
            awk -F', ' -v p="$pid" '$1 == p {print $2}')
        [ -n "$used" ] && [ "$used" -gt "$peak" ] && peak=$used
        sleep 0.2
    done
    wait "$pid"
    echo "peak_mib $peak"
}

log "building ($DEVICE${FEATURES[*]:+, ${FEATURES[*]}})"
cargo build --release --locked "${FEATURES[@]}" --bin sdpipe
cargo build --release --locked "${FEATURES[@]}" -p sdpipe-train --example train_bench
cargo build --release --locked "${FEATURES[@]}" -p sdpipe-diffusion --example bench_sample
BIN=${CARGO_TARGET_DIR:-target}/release

log "1. the ML crates' tests on $DEVICE (SDPIPE_TEST_DEVICE)"
# A failure is reported (and makes the script fail at the end); the other checks still run.
tests_status=passed
SDPIPE_TEST_DEVICE=$DEVICE cargo test --locked "${FEATURES[@]}" -p sdpipe-unet \
    -p sdpipe-metrics -p sdpipe-diffusion -p sdpipe-train -p sdpipe-caption \
    >"$WORK/tests.log" 2>&1 || tests_status=FAILED
grep -E "^test result|FAILED|panicked|^error" "$WORK/tests.log" >&2 || true
tests=$(grep -c "^test result: ok" "$WORK/tests.log" || true)
failed=$(grep -c "^test result: FAILED" "$WORK/tests.log" || true)

log "2. pipelines/demo.yaml at the test suite's size, every stage on $DEVICE"
# The project is the pipeline file's folder: runs/ and cache/ land beside it.
mkdir -p "$WORK/demo"
cp pipelines/demo.yaml "$WORK/demo/"
demo_started=$(date +%s.%N)
"$BIN/sdpipe" run "$WORK/demo/demo.yaml" --device "$DEVICE" --json \
    --set=base_data.count=8 --set=target_data.count=10 --set=target_set.test_count=4 \
    --set=vae.max_train_steps=3 --set=pretrain.max_train_steps=3 \
    --set=finetune.max_train_steps=2 --set=sample_base.steps=3 --set=sample_finetuned.steps=3 \
    >"$WORK/demo.json"
demo_seconds=$(echo "$(date +%s.%N) - $demo_started" | bc)
test -s "$WORK/demo/runs/demo/report/report/README.md"
# Stage logs are stored as objects; text ones hold the device line the ML kinds write.
devices=$(grep -rhI "^device: " "$WORK/demo/cache/objects" | sort | uniq -c | xargs)
log "   stage logs: $devices"

log "3. one training step, $MODEL, gradient checkpointing, sdpipe vs diffusers"
train_rows=()
for side in sdpipe diffusers sdpipe-fp16 diffusers-fp16; do
    case $side in
        sdpipe) cmd=("$BIN/examples/train_bench" "$MODEL" checkpointing "$TRAIN_STEPS" "$THREADS" "$DEVICE") ;;
        sdpipe-fp16) [ "$DEVICE" = cpu ] && continue
            cmd=("$BIN/examples/train_bench" "$MODEL" checkpointing "$TRAIN_STEPS" "$THREADS" "$DEVICE" fp16) ;;
        diffusers) cmd=(python3 bench/train_bench.py "$MODEL" checkpointing "$TRAIN_STEPS" "$THREADS" "$DEVICE" no) ;;
        diffusers-fp16) [ "$DEVICE" = cpu ] && continue
            cmd=(python3 bench/train_bench.py "$MODEL" checkpointing "$TRAIN_STEPS" "$THREADS" "$DEVICE" fp16) ;;
    esac
    measure "${cmd[@]}" >"$WORK/$side.train"
    s=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["median_s_per_step"])' "$WORK/$side.train")
    train_rows+=("| $side | $s | $(awk '/^peak_mib/ {printf "%.0f", $2}' "$WORK/$side.train") |")
    log "   $side: $s s/step"
done

log "4. $SAMPLE_STEPS PNDM steps, $MODEL, guidance 7.5, sdpipe vs diffusers"
"$BIN/examples/bench_sample" write "$WORK/models" "$MODEL" >/dev/null
sample_rows=()
dtypes=(f32)
[ "$DEVICE" != cpu ] && dtypes+=(f16)
for dtype in "${dtypes[@]}"; do
    for side in sdpipe diffusers; do
        if [ $side = sdpipe ]; then
            cmd=("$BIN/examples/bench_sample" time "$WORK/models/$MODEL" "$SAMPLE_STEPS" "$DEVICE" "$dtype")
        else
            cmd=(python3 bench/sample.py "$WORK/models/$MODEL" "$SAMPLE_STEPS" "$THREADS" "$DEVICE" "$dtype")
        fi
        if measure "${cmd[@]}" >"$WORK/$side-$dtype.sample" 2>"$WORK/$side-$dtype.err"; then
            s=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["seconds"])' "$WORK/$side-$dtype.sample")
            peak=$(awk '/^peak_mib/ {printf "%.0f", $2}' "$WORK/$side-$dtype.sample")
        else
            s="failed: $(tail -1 "$WORK/$side-$dtype.err")"; peak="–"
        fi
        sample_rows+=("| $side | $dtype | $s | $peak |")
        log "   $side $dtype: $s s"
    done
done

gpu=$([ "$DEVICE" = cpu ] && grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs ||
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)
{
    echo "# GPU check (scripts/gpu-check.sh)"
    echo
    if [ "$DEVICE" = cpu ]; then
        echo "No GPU has been lent to this project yet: this is the script's run on the CPU, at" \
            "a size the CPU affords, which proves that it works. On a GPU machine," \
            "\`scripts/gpu-check.sh\` (cuda:0, sd15) replaces this file with the real figures."
        echo
    fi
    echo "\`scripts/gpu-check.sh $DEVICE $MODEL $TRAIN_STEPS\`, $(date -u +%Y-%m-%d), commit" \
        "$(git rev-parse --short HEAD), on $gpu ($THREADS CPU threads)."
    python3 -c 'import torch, diffusers; print(f"torch {torch.__version__}, diffusers {diffusers.__version__}.")'
    echo
    echo "1. Tests with \`SDPIPE_TEST_DEVICE=$DEVICE\` (unet, metrics, diffusion, train, caption):" \
        "$tests_status ($tests test binaries passed, $failed failed)."
    echo "2. \`pipelines/demo.yaml\` at the test suite's size with \`--device $DEVICE\`:" \
        "every stage ran and the report was written, $(printf %.1f "$demo_seconds") s" \
        "(the ML stages' logs: $devices)."
    echo
    echo "3. One optimiser step of the $MODEL UNet, batch 1, gradient checkpointing (median of" \
        "$TRAIN_STEPS after a warm-up step; MSE, backward, clipping, AdamW, EMA):"
    echo
    echo "| side | s/step | peak MiB |"
    echo "|---|---|---|"
    printf '%s\n' "${train_rows[@]}"
    echo
    echo "4. Text to latents, $SAMPLE_STEPS PNDM steps, guidance 7.5 (UNet batch 2), after a" \
        "warm-up call:"
    echo
    echo "| side | dtype | seconds | peak MiB |"
    echo "|---|---|---|---|"
    printf '%s\n' "${sample_rows[@]}"
    echo
    echo "Peak memory: $([ "$DEVICE" = cpu ] && echo "peak RSS (GNU time)" ||
        echo "the most nvidia-smi saw the process use, CUDA context included")."
    echo "The -fp16 rows are the recipe's \`--mixed_precision fp16\` on each side: the UNet" \
        "under autocast over f32 weights, with a GradScaler (not run on the CPU, where fp16 is" \
        "slow). f16 sampling is \`torch_dtype=float16\` on each side: the models held in" \
        "fp16 (sdpipe's UNet under autocast, its norms in f32)."
} >"$OUT"
cat "$OUT"
[ "$tests_status" = passed ]
