#!/usr/bin/env bash
# The soak (tests/tests/soak.rs): consecutive 8-channel migrations in one process through a proxy
# that injects a fault (cut, reset, init-byte corruption) at a seeded random point in every other
# run. Prints the per-run lines to target/test-logs/soak-runs.txt and the figures line:
#   soak: N runs ..., F faults injected ..., C completed byte-exact, E failed with an error, 0 hangs; threads, fds, RSS
# Knobs (environment): MULTIFD_SOAK_RUNS (default 100), MULTIFD_SOAK_SIZE (bytes, default 4 MiB),
# MULTIFD_SOAK_SEED (replay a printed seed), MULTIFD_SOAK_DEADLINE (seconds per run, default 120).
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export MULTIFD_SOAK_RUNS="${MULTIFD_SOAK_RUNS:-100}"
mkdir -p target/test-logs
log=target/test-logs/soak-runs.txt
rc=0
nice -n 19 cargo test --quiet -p multifd-tests --test soak -- --nocapture >"$log" 2>&1 || rc=$?
grep -E '^soak: ' "$log"
if [ "$rc" -ne 0 ]; then
  echo "soak failed (exit $rc); last lines of $log:"
  tail -n 30 "$log"
fi
exit "$rc"
