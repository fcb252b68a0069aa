#!/usr/bin/env bash
# `cargo deny check` against deny.toml: licences, banned crates and sources always; RustSec
# advisories when the advisory database can be fetched (github.com/rustsec/advisory-db) or is
# already on this machine (cargo-deny's default place, $CARGO_HOME/advisory-dbs/). Run by
# scripts/test.sh. cargo-deny itself is installed (pinned, built from crates.io, about 4.5
# CPU-minutes) into target/tools the first time.
#
# Where the database cannot be had, the advisories are reported as NOT RUN with the reason and
# the script still passes, as the Slurm tests do; SDPIPE_REQUIRE_ADVISORIES=1 makes that a
# failure instead.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.20.2
tools="$PWD/target/tools"
deny="$tools/bin/cargo-deny"
if ! { [ -x "$deny" ] && [ "$("$deny" --version)" = "cargo-deny $VERSION" ]; }; then
    cargo install --locked --quiet --root "$tools" "cargo-deny@$VERSION"
fi

# Errors only: the duplicate-version warnings (bans) run to hundreds of lines; `cargo deny
# check bans` shows them.
"$deny" --log-level error --workspace --locked check licenses bans sources

dbs="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs"
if timeout 120 "$deny" --workspace fetch db >/dev/null 2>&1 || compgen -G "$dbs/advisory-db-*" >/dev/null; then
    "$deny" --log-level error --workspace --offline check advisories
else
    echo "deny.sh: advisories NOT RUN: the RustSec database cannot be fetched from here" \
        "(github.com/rustsec/advisory-db) and none is in $dbs" >&2
    [ "${SDPIPE_REQUIRE_ADVISORIES:-}" = 1 ] && exit 1
fi
echo "deny.sh: cargo deny passed" >&2
