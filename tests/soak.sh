#!/bin/sh
# The soak (tests/tests/soak.rs): rounds of the fault scenario with random
# timing on one farm for MINUTES minutes (default 2; issue 10 asks for 15
# before a release), printing what each round saw and a summary (graphs,
# builds, retries, reruns, rebuilds of finished work, max client latency,
# coordinator RSS). Needs what the end-to-end tests need (root, Nix, unshare).
#
#   tests/soak.sh [MINUTES]          SOAK_SEED=N tests/soak.sh   replays a run
#
# Without SOAK_MINUTES, `cargo test` runs a single round of it.
set -eu
cd "$(dirname "$0")/.."
SOAK_MINUTES="${1:-${SOAK_MINUTES:-2}}"
export SOAK_MINUTES
exec cargo test -p farm-tests --test soak -- --nocapture
