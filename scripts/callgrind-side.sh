#!/usr/bin/env bash
# User-space instructions of one side of a migration, counted by callgrind (BENCHMARKS.md "Before and
# after the receive session"): repeatable whatever else the machine does, unlike wall time.
# Usage: scripts/callgrind-side.sh recv|send RECV_BIN SEND_BIN CHANNELS IMAGE
#   runs RECV_BIN recv and SEND_BIN send over loopback with IMAGE as block m0; the side named first
#   runs under callgrind. Prints its total instructions (Ir); fails if the block file differs.
set -euo pipefail
role=$1 rb=$2 sb=$3 ch=$4 img=$5
d=$(mktemp -d /tmp/multifd-cg.XXXXXX)
trap 'rm -rf "$d"' EXIT
vg=(valgrind --tool=callgrind "--callgrind-out-file=$d/cg.out")
r=("$rb") s=("$sb")
if [ "$role" = recv ]; then r=("${vg[@]}" "$rb"); else s=("${vg[@]}" "$sb"); fi
"${r[@]}" recv --listen 127.0.0.1:0 --channels "$ch" --out "$d/out" --port-file "$d/port" --json \
  --io-timeout 120 >/dev/null 2>"$d/recv.err" &
for _ in $(seq 200); do [ -s "$d/port" ] && break; sleep 0.1; done
"${s[@]}" send --connect "127.0.0.1:$(cat "$d/port")" --channels "$ch" --image "$img:m0" --io-timeout 120 \
  >/dev/null 2>"$d/send.err"
wait
cmp -s "$d/out/m0.bin" "$img" || { echo "the received block differs from $img" >&2; exit 1; }
grep -E '^(summary|totals):' "$d/cg.out" | head -n1 | awk '{print $2}'
