#!/usr/bin/env bash
# Valgrind memcheck on the `multifd recv` and `multifd send` binaries, mostly on their error paths:
# a receiver fed malformed streams from tests/fixtures/malformed (bad packet, truncated page data,
# duplicate channel id, truncated main stream), a sender whose receiver refuses it and closes, a
# sender with nothing listening, and one small successful migration each way. Every run must end
# with the exit status the scenario expects, no memcheck error and no definitely or indirectly lost
# byte (still-reachable memory is not a leak). Prints one line per run and a summary:
#   leaks: N runs, E errors, B leaked bytes
# Exits non-zero if any run fails. Needs valgrind (scripts/setup.sh installs it). Network traffic
# stays on 127.0.0.1.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PATH="$HOME/.cargo/bin:$PATH"
command -v valgrind >/dev/null || { echo "valgrind not found: run scripts/setup.sh"; exit 1; }

nice -n 19 cargo build --release --quiet -p multifd-std --bin multifd || exit 1
BIN="$ROOT/target/release/multifd"
WORK=$(mktemp -d /tmp/multifd-valgrind.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
FIX="$ROOT/tests/fixtures/malformed"
TIMEOUT="${MULTIFD_VALGRIND_TIMEOUT:-180}"
VG=(valgrind --tool=memcheck --leak-check=full --show-leak-kinds=definite,indirect
  --errors-for-leak-kinds=definite,indirect --error-exitcode=99 --child-silent-after-fork=yes)

RUNS=0 ERRORS=0 LEAKED=0 FAILED=0

# Canary: a C program that leaks 100 bytes must fail these very options, or leak checking is off.
printf '#include <stdlib.h>\nint main(void){void*p=malloc(100);p=0;return p!=0;}\n' >"$WORK/canary.c"
cc -O0 -o "$WORK/canary" "$WORK/canary.c" || { echo "cannot build the leak canary (cc)"; exit 1; }
canary_rc=0
"${VG[@]}" --log-file="$WORK/canary.log" "$WORK/canary" || canary_rc=$?
if [ "$canary_rc" -ne 99 ] || ! grep -q 'definitely lost: 100 bytes' "$WORK/canary.log"; then
  echo "the leak canary was not reported (exit $canary_rc): valgrind's leak check is not working"
  cat "$WORK/canary.log"
  exit 1
fi
echo "canary: a 100-byte leak reported (exit 99), as it must be"

# check NAME LOG RC WANT: reads memcheck's summary from LOG, compares the exit code RC with WANT
# ("0" or "fail": any non-zero code but valgrind's 99 and timeout's 124).
check() {
  local name="$1" log="$2" rc="$3" want="$4" errs def ind ok=1
  errs=$(grep -Eo 'ERROR SUMMARY: [0-9,]+' "$log" | tail -n1 | grep -Eo '[0-9,]+$' | tr -d ,)
  def=$(grep -Eo 'definitely lost: [0-9,]+ bytes' "$log" | tail -n1 | grep -Eo '[0-9,]+' | head -n1 | tr -d ,)
  ind=$(grep -Eo 'indirectly lost: [0-9,]+ bytes' "$log" | tail -n1 | grep -Eo '[0-9,]+' | head -n1 | tr -d ,)
  if [ -z "$errs" ]; then
    echo "FAIL $name: no memcheck summary in $log (rc $rc)"
    FAILED=1
    return
  fi
  def=${def:-0} ind=${ind:-0}
  RUNS=$((RUNS + 1)) ERRORS=$((ERRORS + errs)) LEAKED=$((LEAKED + def + ind))
  case "$want" in
    0) [ "$rc" -eq 0 ] || ok=0 ;;
    fail) { [ "$rc" -ne 0 ] && [ "$rc" -ne 99 ] && [ "$rc" -ne 124 ]; } || ok=0 ;;
  esac
  [ "$errs" -eq 0 ] && [ $((def + ind)) -eq 0 ] || ok=0
  if [ "$ok" = 1 ]; then
    echo "ok   $name: exit $rc (want $want), $errs errors, $((def + ind)) bytes lost"
  else
    echo "FAIL $name: exit $rc (want $want), $errs errors, $def definitely + $ind indirectly lost; log:"
    tail -n 40 "$log"
    FAILED=1
  fi
}

wait_port() {
  local f="$1" i
  for i in $(seq 1 600); do
    [ -s "$f" ] && { cat "$f"; return 0; }
    sleep 0.1
  done
  return 1
}

# feed PORT FILE...: connects to PORT once per file, in order, writes the file and keeps every
# connection open until all are written (bash's /dev/tcp), then closes them.
feed() {
  local port="$1" fd=3 f
  shift
  for f in "$@"; do
    eval "exec $fd<>/dev/tcp/127.0.0.1/$port" 2>/dev/null || break
    cat "$f" >&"$fd" 2>/dev/null || true
    fd=$((fd + 1))
    sleep 0.1
  done
  sleep 0.5
  for ((f = 3; f < fd; f++)); do eval "exec $f>&-"; done
}

# recv_case CASE WANT: `multifd recv` under valgrind fed the corpus case's streams.
recv_case() {
  local case="$1" want="$2" dir="$WORK/recv-$1" port rc=0
  mkdir -p "$dir"
  timeout "$TIMEOUT" "${VG[@]}" --log-file="$dir/vg.log" "$BIN" recv --listen 127.0.0.1:0 --channels 2 \
    --out "$dir/out" --port-file "$dir/port" >"$dir/stdout" 2>"$dir/stderr" &
  local pid=$!
  if port=$(wait_port "$dir/port"); then
    local files=()
    mapfile -t files < <(ls "$FIX/$case".s*.bin | sort -V)
    feed "$port" "${files[@]}"
  fi
  wait "$pid" || rc=$?
  check "recv $case ($(grep -o 'multifd recv: [a-z]*:.*' "$dir/stderr" | head -c 100))" "$dir/vg.log" "$rc" "$want"
  if [ "$want" = fail ] && [ -n "$(ls -A "$dir/out" 2>/dev/null)" ]; then
    echo "FAIL recv $case: files left in $dir/out"
    FAILED=1
  fi
}

recv_case packet_bad_magic fail
recv_case truncated_page_data fail
recv_case init_duplicate_id fail
recv_case main_truncated fail
recv_case device_state_huge_then_eof fail
recv_case valid 0

# A small image for the sender (16 MiB: too much for socket buffers, so a refused sender notices).
IMG="$WORK/image.bin"
head -c $((16 << 20)) /dev/urandom >"$IMG"

# send_case NAME WANT RECV_CHANNELS: `multifd send` (2 channels) under valgrind into a native
# `multifd recv` expecting RECV_CHANNELS channels (1: it refuses channel id 1 and closes).
send_case() {
  local name="$1" want="$2" rch="$3" dir="$WORK/send-$1" port rc=0
  mkdir -p "$dir"
  timeout "$TIMEOUT" "$BIN" recv --listen 127.0.0.1:0 --channels "$rch" --out "$dir/out" \
    --port-file "$dir/port" >"$dir/recv.out" 2>"$dir/recv.err" &
  local rpid=$!
  port=$(wait_port "$dir/port") || port=1
  timeout "$TIMEOUT" "${VG[@]}" --log-file="$dir/vg.log" "$BIN" send --connect "127.0.0.1:$port" --channels 2 \
    --image "$IMG:m0" >"$dir/stdout" 2>"$dir/stderr" || rc=$?
  wait "$rpid" || true
  check "send $name ($(grep -o 'multifd send: .*' "$dir/stderr" | tail -n1 | head -c 100))" "$dir/vg.log" "$rc" "$want"
  if [ "$want" = 0 ] && ! cmp -s "$IMG" "$dir/out/m0.bin"; then
    echo "FAIL send $name: the received m0.bin differs from the image"
    FAILED=1
  fi
}

send_case refused-by-receiver fail 1
send_case complete 0 2

# Nothing listening: connect fails (a port just freed by a listener that closed).
dir="$WORK/send-no-listener"
mkdir -p "$dir"
free_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
rc=0
timeout "$TIMEOUT" "${VG[@]}" --log-file="$dir/vg.log" "$BIN" send --connect "127.0.0.1:$free_port" --channels 2 \
  --image "$IMG:m0" >"$dir/stdout" 2>"$dir/stderr" || rc=$?
check "send no-listener ($(tail -n1 "$dir/stderr" | head -c 100))" "$dir/vg.log" "$rc" fail

# The receiver under valgrind, fed by a native sender: a whole successful migration.
dir="$WORK/recv-from-sender"
mkdir -p "$dir"
rc=0
timeout "$TIMEOUT" "${VG[@]}" --log-file="$dir/vg.log" "$BIN" recv --listen 127.0.0.1:0 --channels 2 \
  --out "$dir/out" --port-file "$dir/port" >"$dir/stdout" 2>"$dir/stderr" &
pid=$!
if port=$(wait_port "$dir/port"); then
  timeout "$TIMEOUT" "$BIN" send --connect "127.0.0.1:$port" --channels 2 --image "$IMG:m0" >/dev/null 2>"$dir/send.err" || true
fi
wait "$pid" || rc=$?
check "recv from multifd send" "$dir/vg.log" "$rc" 0
cmp -s "$IMG" "$dir/out/m0.bin" || { echo "FAIL recv from multifd send: m0.bin differs from the image"; FAILED=1; }

echo "leaks: $RUNS runs, $ERRORS errors, $LEAKED leaked bytes"
exit "$FAILED"
