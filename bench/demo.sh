#!/usr/bin/env bash
# The demo's figures (README's first section, the comments in pipelines/demo.yaml): how long
# `sdpipe run pipelines/demo.yaml` takes in a fresh folder and again with everything cached,
# what its report says the models draw (scene accuracy on the 16 test captions), and the same
# judge on more held-out dusk captions, where 16 leave a wide interval. Results:
# docs/bench/demo.md.
#
#   bench/demo.sh [heldout]     (default: 96 held-out captions)
#
# Builds sdpipe in release, copies `pipelines/` into an empty folder and runs the committed demo
# there (nothing cached), then once more (a no-op), then the demo with `bench/heldout.sh`'s five
# stages appended (each model sampled on more held-out dusk captions and judged), which reuses
# every cached stage of the demo, so only the new stages run and the models judged are its own.
# Prints the machine, the load average, wall/user/system seconds, the slowest stages, the
# report's metrics and both scene-accuracy tables. Needs python3 (standard library only).
# Environment: CARGO_TARGET_DIR (default: target).
set -euo pipefail
cd "$(dirname "$0")/.."
HELDOUT=${1:-96}
cargo build --release -q
ROOT=$(pwd)
BIN="$ROOT/${CARGO_TARGET_DIR:-target}/release/sdpipe"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp -r pipelines "$WORK/"
rm -rf "$WORK/pipelines/cache" "$WORK/pipelines/runs"
cd "$WORK"

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "commit: $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet || echo ' (uncommitted changes)')"
echo "before the first run: $(uptime)"
TIMEFORMAT='%R s wall, %U s user, %S s system'
echo "first run (fresh folder): $( { time "$BIN" run pipelines/demo.yaml >first.out 2>first.err; } 2>&1 )"
echo "slowest stages:"
grep -E '✓ .* ran in ' first.err | sed -E 's/.*✓ (.*) ran in ([0-9.]+)s.*/\2 \1/' | sort -rn | head -6 |
    sed 's/^/  /'
echo "second run (no-op): $( { time "$BIN" run pipelines/demo.yaml >/dev/null 2>&1; } 2>&1 )"

"$ROOT/bench/heldout.sh" pipelines/demo.yaml "$HELDOUT" >pipelines/demo-heldout.yaml
"$BIN" run pipelines/demo-heldout.yaml -q >/dev/null 2>heldout.err || { cat heldout.err >&2; exit 1; }

python3 - <<'EOF'
import json, glob, os
def table(title, pattern, extra=()):
    print(f"\n{title}\n")
    print("| model | background | style | shape colours | images |")
    print("|---|---|---|---|---|")
    for path in sorted(glob.glob(pattern)) + list(extra):
        m = json.load(open(path))
        name = os.path.basename(os.path.dirname(path))
        n = m["images"]
        cell = lambda k: "%d%% (%d of %d)" % (round(100 * m[k]), round(m[k] * n), n)
        print(f"| {name} | {cell('background')} | {cell('style')} | {cell('colours')} | {n} |")
print("\nthe demo's report, the other metrics (16 test images):\n")
print("| model | FID | KID mean | LPIPS | CMMD | CLIP score (mean, clamped) |")
print("|---|---|---|---|---|---|")
for fid in sorted(glob.glob("pipelines/runs/demo/fid_*/metrics.json")):
    point = os.path.basename(os.path.dirname(fid))[len("fid_"):]
    m = {k: json.load(open(f"pipelines/runs/demo/{k}_{point}/metrics.json"))
         for k in ("fid", "lpips", "cmmd", "clip")}
    print("| %s | %.1f | %.3f | %.4f | %.4f | %.3f |" % (
        point, m["fid"]["fid"], m["fid"]["kid_mean"], m["lpips"]["lpips"],
        m["cmmd"]["cmmd"], m["clip"]["mean_clamped"]))
table("the demo's report (16 test captions):", "pipelines/runs/demo/scene_[bf]*/metrics.json",
      ["pipelines/runs/demo/scene_vae/metrics.json"])
table("held-out dusk captions:", "pipelines/runs/demo-heldout/heldout_scene_*/metrics.json")
EOF
