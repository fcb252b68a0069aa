#!/usr/bin/env bash
# The test command (the README's, and what .ci/run runs): every workspace test, the `cuda`
# feature compiled without a GPU (scripts/cuda-check.sh: nvcc and headers from PyPI), `cargo
# deny` (scripts/deny.sh: licences, bans, sources, advisories where reachable), then the
# Slurm executor's tests against a real single-node cluster that scripts/slurm-up.sh installs
# and starts on this machine.
#
# The Slurm part needs root and Debian's packages (slurm-wlm, munge). Where the cluster cannot
# be started (not root, no apt, no network) those tests are reported as NOT RUN, with the
# reason, and the script still passes: the default suite is the contract, the cluster is an
# extra this machine may not offer. SDPIPE_REQUIRE_SLURM=1 makes that a failure instead;
# SDPIPE_SKIP_SLURM=1 skips the cluster altogether.
set -euo pipefail
cd "$(dirname "$0")/.."

# With RUST_BACKTRACE set (CI sets it), candle captures and symbolises a backtrace inside every
# error it creates, which the ML crates' tests of refused input do by the hundred, in-process.
# Panics keep their backtraces; library errors need none (the sdpipe binary does the same).
export RUST_LIB_BACKTRACE="${RUST_LIB_BACKTRACE:-0}"

# A feature nobody compiles rots, so the `cuda` feature is compiled too. Most of its cost is
# nvcc building candle's PTX kernels (about 9 CPU-minutes from a fresh target folder), so it
# runs in the background at the lowest priority while the tests run, taking the CPU time they
# leave idle, in a target directory of its own (so neither waits for the other's build lock).
# It checks every crate that has a `cuda` feature (train pulls in diffusion and unet); the root
# crate only forwards the feature, which `cargo tree` resolves. SDPIPE_SKIP_CUDA_CHECK=1 skips
# it (a quick local run).
cuda_pid=
if [ "${SDPIPE_SKIP_CUDA_CHECK:-}" != 1 ]; then
    mkdir -p target
    cargo tree --locked --features cuda -e features -i candle-core >/dev/null
    # Its own process group (setsid), so that it can be stopped with everything it started.
    CARGO_TARGET_DIR=target/cuda-check setsid nice -n 19 scripts/cuda-check.sh \
        -p sdpipe-train -p sdpipe-metrics -p sdpipe-caption >target/cuda-check.log 2>&1 &
    cuda_pid=$!
    # A failing test ends the script: the background check must not outlive it.
    trap 'kill -- "-$cuda_pid" 2>/dev/null' EXIT
fi

# cargo deny (scripts/deny.sh: licences, bans, sources; advisories where the RustSec database
# can be had), also in the background: installing cargo-deny the first time is most of its
# cost. SDPIPE_SKIP_DENY=1 skips it.
deny_pid=
if [ "${SDPIPE_SKIP_DENY:-}" != 1 ]; then
    mkdir -p target
    setsid nice -n 19 scripts/deny.sh >target/deny.log 2>&1 &
    deny_pid=$!
    trap 'kill -- "-$cuda_pid" "-$deny_pid" 2>/dev/null' EXIT
fi

cargo test --workspace --locked

if [ -n "$deny_pid" ]; then
    if wait "$deny_pid"; then
        grep "NOT RUN" target/deny.log >&2 || true
        echo "test.sh: cargo deny passed (scripts/deny.sh)" >&2
    else
        tail -40 target/deny.log >&2
        echo "test.sh: cargo deny failed (log: target/deny.log)" >&2
        exit 1
    fi
fi

if [ -n "$cuda_pid" ]; then
    trap - EXIT
    if wait "$cuda_pid"; then
        echo "test.sh: the cuda feature compiles (scripts/cuda-check.sh)" >&2
    else
        tail -40 target/cuda-check.log >&2
        echo "test.sh: the cuda feature does not compile (log: target/cuda-check.log)" >&2
        exit 1
    fi
fi

if [ "${SDPIPE_SKIP_SLURM:-}" = 1 ]; then
    echo "test.sh: Slurm tests skipped (SDPIPE_SKIP_SLURM=1)" >&2
    exit 0
fi
# Installing the packages takes about a minute; a hung apt or daemon must not hang the suite.
if timeout 600 scripts/slurm-up.sh; then
    SDPIPE_SLURM_TESTS=1 cargo test --locked --test integration slurm::
else
    echo "test.sh: Slurm tests NOT RUN: scripts/slurm-up.sh could not start a cluster (above)" >&2
    [ "${SDPIPE_REQUIRE_SLURM:-}" = 1 ] && exit 1
    exit 0
fi
