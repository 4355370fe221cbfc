#!/usr/bin/env bash
# Counts what one side of a migration asks of the kernel (BENCHMARKS.md "Before and after the receive
# session", run E): figures that, unlike wall time, the hypervisor's noise does not move much.
# Usage: scripts/count-side.sh recv|send RECV_BIN SEND_BIN CHANNELS IMAGE [--prealloc]
#   runs RECV_BIN recv and SEND_BIN send over loopback with IMAGE as block m0, twice: once with the
#   side named first under `perf stat` (software events: page faults, context switches, CPU
#   migrations; over the whole process, so the block file's write is in them), once under `strace -c -f` (system calls by name; strace slows the run,
#   so its times mean nothing, its counts do). Prints, per packet of the
#   migration (the receiver's JSON report), page faults, context switches and system calls, and the
#   ten most frequent calls. Context switches move from run to run with the scheduler (several-fold
#   between identical runs here); faults and system calls do not. Fails if a block file differs from IMAGE.
set -euo pipefail
role=$1 rb=$2 sb=$3 ch=$4 img=$5 pre=${6:-}
case $role in recv | send) ;; *) echo "first argument: recv or send, not $role" >&2; exit 2 ;; esac
command -v strace >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace >/dev/null
command -v perf >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null
d=$(mktemp -d /tmp/multifd-count.XXXXXX)
trap 'rm -rf "$d"' EXIT
size_mib=$(($(stat -c %s "$img") >> 20))
one() { # one(WRAPPER...): a migration with the chosen side run under WRAPPER; prints the report
  local r=("$rb") s=("$sb")
  if [ "$role" = recv ]; then r=("$@" "$rb"); else s=("$@" "$sb"); fi
  local extra=()
  [ "$pre" = --prealloc ] && extra=(--prealloc "m0:${size_mib}M")
  rm -rf "$d/out" "$d/port"
  "${r[@]}" recv --listen 127.0.0.1:0 --channels "$ch" --out "$d/out" --port-file "$d/port" --json \
    --io-timeout 120 "${extra[@]}" >"$d/report.json" 2>"$d/recv.err" &
  for _ in $(seq 300); do [ -s "$d/port" ] && break; sleep 0.1; done
  "${s[@]}" send --connect "127.0.0.1:$(cat "$d/port")" --channels "$ch" --image "$img:m0" --io-timeout 120 \
    >/dev/null 2>"$d/send.err"
  wait
  cmp -s "$d/out/m0.bin" "$img" || { echo "the received block differs from $img" >&2; exit 1; }
}
one perf stat -x, -o "$d/perf.txt" -e minor-faults,major-faults,context-switches,cpu-migrations
packets=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])["packets"])' "$d/report.json")
one strace -c -f -o "$d/strace.txt"
python3 - "$d/perf.txt" "$d/strace.txt" "$packets" "$role" <<'PY'
import sys
perf, strace, packets, role = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ev = {}
for line in open(perf):
    f = line.strip().split(",")
    if len(f) > 2 and f[0] and f[0][0].isdigit():
        ev[f[2]] = float(f[0])
calls, total = [], 0
for line in open(strace):
    f = line.split()
    if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
        n = int(f[3])
        calls.append((n, f[-1]))
        total += n
calls.sort(reverse=True)
print(f"{role}: {packets} packets; per packet: minor faults {ev.get('minor-faults', 0) / packets:.2f}, "
      f"context switches {ev.get('context-switches', 0) / packets:.3f}, CPU migrations "
      f"{ev.get('cpu-migrations', 0) / packets:.3f}, system calls {total / packets:.2f}")
print("  most frequent calls (count, per packet): " + ", ".join(f"{n} {c} ({n / packets:.2f})" for n, c in calls[:10]))
PY
