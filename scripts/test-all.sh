#!/usr/bin/env bash
# The one command that runs every test of multifd-rs (README: "Run every test").
# Installs what it needs first (scripts/setup.sh), then runs the tiers below, printing one summary
# line per tier, and exits non-zero if any tier failed. Knobs, for demonstrating that a tier can fail:
#   MULTIFD_FW_FEATURES=fail-demo   build the firmware in tier 4 with a deliberately failing check
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
NIGHTLY="${MULTIFD_NIGHTLY:-nightly-2026-10-30}"
TARGETS=(thumbv7m-none-eabi thumbv7em-none-eabihf riscv32imac-unknown-none-elf aarch64-unknown-none x86_64-unknown-none)
LOGDIR="$ROOT/target/test-logs"
mkdir -p "$LOGDIR"

START=$(date +%s)
SUMMARY=()
FAILED=0

# run_tier NAME CMD...: runs CMD quietly into a log; prints the log's tail if it fails.
run_tier() {
  local name="$1"
  shift
  local log="$LOGDIR/$name.log"
  local t0
  t0=$(date +%s)
  echo "== tier $name: running"
  # Run in a background subshell: `set -e` inside the tier is ignored in an `if` condition.
  (
    set -e
    "$@"
  ) >"$log" 2>&1 &
  local rc=0
  wait $! || rc=$?
  if [ "$rc" -eq 0 ]; then
    SUMMARY+=("PASS  tier $name ($(($(date +%s) - t0)) s)$(tier_detail "$log" | paste -sd" " -)")
  else
    FAILED=1
    SUMMARY+=("FAIL  tier $name ($(($(date +%s) - t0)) s), log: $log")
    echo "---- last 60 lines of $log ----"
    tail -n 60 "$log"
    echo "----"
  fi
}

# A short factual detail for the summary line: test counts from cargo's result lines.
tier_detail() {
  local passed failed
  passed=$(grep -Eo 'test result: [a-z]+\. [0-9]+ passed' "$1" | awk '{s+=$4} END {print s+0}')
  failed=$(grep -Eo '[0-9]+ failed' "$1" | awk '{s+=$1} END {print s+0}')
  if grep -q 'test result:' "$1"; then echo ": $passed tests passed, $failed failed"; fi
  grep -o '^firmware: exit.*' "$1" | sed 's/^/: /' || true
  grep -o '^tsan: .*' "$1" | sed 's/^/; /' || true
  grep -o '^fuzz: .*' "$1" | sed 's/^/: /' | paste -sd' ' - || true
  grep -o '^leaks: .*' "$1" | sed 's/^/; /' || true
  grep -o '^soak: .*' "$1" | sed 's/^/; /' || true
}

# Everything concurrent in the core goes through its `sync` seam, so loom can replace it.
check_sync_seam() {
  local hits
  hits=$(grep -rnE 'core::sync::atomic|core::cell::UnsafeCell|core::hint::spin_loop|portable_atomic::' core/src \
    --include=*.rs | grep -v '^core/src/sync.rs:' || true)
  if [ -n "$hits" ]; then
    echo "atomics, cells and spin hints in multifd-core must come from crate::sync; found:"
    echo "$hits"
    return 1
  fi
}

tier1_lint() {
  set -e
  check_sync_seam
  # No non-test function in the std shim is longer than 80 lines (it is glue; logic lives in the core).
  python3 scripts/fn-lengths.py 80 std-shim/src
  # The firmware's and the fuzz harness's receive drivers stay thin: the session decides (120 lines).
  python3 scripts/driver-lengths.py 120
  cargo fmt --all --check
  cargo clippy --workspace --all-targets -- -D warnings
  cargo clippy -p multifd-core --all-targets --features log -- -D warnings
  cargo clippy -p firmware-demo -p multifd-core --profile fw --target thumbv7m-none-eabi -- -D warnings
  RUSTFLAGS="--cfg loom" cargo clippy -p multifd-core --all-targets --target-dir target/loom -- -D warnings
}

tier2_test() {
  set -e
  cargo test --workspace
  # The embedding examples: each a whole migration (send engine, in-memory transport, receive
  # session) that checks the destination byte for byte and exits non-zero otherwise.
  cargo run -q -p multifd-core --example embed_send
  cargo run -q -p multifd-core --example embed_recv
  cargo test -p multifd-core --features log
  # With defmt the core needs a global logger to link: its unit and doc tests bring one, the
  # examples (std programs that log nothing) do not, so only those two target kinds run here.
  cargo test -p multifd-core --features defmt --lib
  cargo test -p multifd-core --features defmt --doc
}

tier3_nostd() {
  set -e
  local t
  for t in "${TARGETS[@]}"; do
    cargo build -p multifd-core --target "$t"
    cargo build -p multifd-core --target "$t" --features defmt
  done
}

tier4_firmware() {
  set -e
  local features=()
  [ -n "${MULTIFD_FW_FEATURES:-}" ] && features=(--features "$MULTIFD_FW_FEATURES")
  cargo fw-build "${features[@]}"
  local out="$LOGDIR/firmware-run.txt"
  local rc=0
  cargo fw "${features[@]}" >"$out" 2>&1 || rc=$?
  cat "$out"
  if [ "$rc" -ne 0 ]; then
    echo "firmware exited with code $rc (expected 0)"
    return 1
  fi
  grep -q 'PASS:' "$out" || { echo "decoded firmware log has no PASS line"; return 1; }
  if grep -qE 'FAILED|panic:' "$out"; then echo "decoded firmware log reports a failure"; return 1; fi
  echo "firmware: exit 0, $(grep -c 'check .*: ok' "$out") checks ok, $(grep -o 'PASS:.*' "$out")"
}

tier5_miri_loom() {
  set -e
  local miriflags="${MIRIFLAGS:--Zmiri-strict-provenance}"
  MIRIFLAGS="$miriflags" cargo "+$NIGHTLY" miri test -p multifd-core -- --skip send::tests::threads
  # Known gap: under Miri's weak-memory emulation the send engine's threaded tests spin without end
  # (they pass in seconds with it off, and natively, and the hand-over has loom models); until that is
  # understood they run under Miri with the emulation off, which still checks UB and data races.
  # Since the fifth of them was added they also spun without end (with CI=true in the environment,
  # not without) when Miri ran them side by side; one at a time they pass in about 10 s. Not yet
  # understood either: natively, under loom and under TSan the same code passes.
  MIRIFLAGS="$miriflags -Zmiri-disable-weak-memory-emulation" \
    cargo "+$NIGHTLY" miri test -p multifd-core --lib send::tests::threads -- --test-threads=1
  LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}" RUSTFLAGS="--cfg loom" \
    cargo test -p multifd-core --release --lib --target-dir target/loom -- loom_
}

# Each fuzz target of fuzz/ (its own workspace) for a bounded time; any crash fails the tier.
FUZZ_SECONDS="${MULTIFD_FUZZ_SECONDS:-30}"
tier7_fuzz() {
  set -e
  local t
  cd fuzz
  for t in $(cargo "+$NIGHTLY" fuzz list); do
    cargo "+$NIGHTLY" fuzz run -O "$t" -- -max_total_time="$FUZZ_SECONDS" 2>&1 | tee "$LOGDIR/fuzz-$t.txt" | tail -n 3
    echo "fuzz: $t $(grep -Eo '^Done [0-9]+ runs' "$LOGDIR/fuzz-$t.txt" | awk '{print $2}') executions"
  done
}

tier6_doc() {
  RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps
}

# ThreadSanitizer on the std shim and the real-thread lifecycle tests (nightly, std rebuilt with TSan).
# The canary (a deliberate race) must be reported, or the sanitizer is not really on.
tier8_tsan() {
  set -e
  local flags=(--target x86_64-unknown-linux-gnu --target-dir target/tsan -Zbuild-std)
  export RUSTFLAGS="-Zsanitizer=thread" RUSTDOCFLAGS="-Zsanitizer=thread"
  cargo "+$NIGHTLY" test "${flags[@]}" -p multifd-std --lib --tests
  # In-process tests only: the two that run the `multifd` binary as processes are skipped here (the
  # binary is built without the sanitizer; they run in tier 2).
  cargo "+$NIGHTLY" test "${flags[@]}" -p multifd-tests --test lifecycle_std --test regressions --test transport_faults \
    --test no_alloc_steady -- --skip cancelled_send_fails_both_sides_cleanly --skip send_extra_channel_is_refused_by_the_receiver
  local bin
  bin=$(cargo "+$NIGHTLY" test "${flags[@]}" -p multifd-tests --test lifecycle_std --no-run --message-format=json 2>/dev/null |
    grep -o '"executable":"[^"]*"' | head -n1 | cut -d'"' -f4)
  # grep reads all of nm's output (no -q): under pipefail an early exit would kill nm with SIGPIPE.
  nm "$bin" | grep __tsan_init >/dev/null || { echo "$bin is not instrumented by ThreadSanitizer"; return 1; }
  # On this kernel TSan now and then reports nothing for a whole process (seen in about 1 run in 20),
  # so the canary gets three tries; a sanitizer that is really off fails all three.
  local try reported=0
  for try in 1 2 3; do
    if ! cargo "+$NIGHTLY" test "${flags[@]}" -p multifd-tests --test tsan_canary -- --ignored \
      >"$LOGDIR/tsan-canary.txt" 2>&1 && grep -q 'ThreadSanitizer: data race' "$LOGDIR/tsan-canary.txt"; then
      reported=1
      break
    fi
  done
  [ "$reported" = 1 ] || { echo "the TSan canary's race was not reported in 3 tries: ThreadSanitizer is not active"; return 1; }
  echo "tsan: canary race reported (try $try), as it must be"
}

# Valgrind memcheck on `multifd recv` and `multifd send`, mostly error paths (scripts/valgrind.sh):
# no memcheck error, no definitely or indirectly lost byte; a leaking canary must be reported. Then
# the soak (scripts/soak.sh, 100 faulty and clean migrations in one process) with its figures.
tier9_leaks_soak() {
  set -e
  bash scripts/valgrind.sh
  bash scripts/soak.sh
}

echo "== setup"
if ! bash scripts/setup.sh; then
  echo "setup failed: see the message above"
  exit 1
fi

run_tier 1-lint tier1_lint
run_tier 2-test tier2_test
run_tier 3-nostd-build tier3_nostd
run_tier 4-firmware-qemu tier4_firmware
run_tier 5-miri-loom tier5_miri_loom
run_tier 6-doc tier6_doc
run_tier 7-fuzz tier7_fuzz
run_tier 8-tsan tier8_tsan
run_tier 9-leaks-soak tier9_leaks_soak

echo
echo "== summary ($(($(date +%s) - START)) s)"
printf '%s\n' "${SUMMARY[@]}"
if [ "$FAILED" -ne 0 ]; then
  echo "RESULT: FAILED"
  exit 1
fi
echo "RESULT: all tiers passed"
