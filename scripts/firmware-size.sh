#!/usr/bin/env bash
# Flash and RAM use of the firmware demo (the `fw` profile, as `cargo fw` builds it), and the share of
# its code that comes from multifd-core, for BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fw-build --quiet
ELF=target/thumbv7m-none-eabi/fw/firmware-demo
echo "== size -A $ELF (allocated sections)"
size -A "$ELF" | awk '$1 ~ /^\.(vector_table|text|rodata|data|bss|uninit)$/ {print; if ($1==".text"||$1==".rodata"||$1==".vector_table"||$1==".data") flash+=$2; if ($1==".data"||$1==".bss"||$1==".uninit") ram+=$2} END {printf "flash (vector_table+text+rodata+data): %d bytes\nram (data+bss+uninit, stack aside): %d bytes\n", flash, ram}'
# by_crate ELF: sums function symbols per crate (trait impls of firmware types count for the firmware).
by_crate() {
  nm --print-size --size-sort -C "$1" | python3 -c '
import sys
total = {}
for line in sys.stdin:
    parts = line.split(maxsplit=3)
    if len(parts) < 4 or parts[2] not in ("t", "T"):
        continue
    size, name = int(parts[1], 16), parts[3]
    if name.startswith("firmware_demo::") or name.startswith("<firmware_demo::"):
        crate = "firmware_demo"
    elif "multifd_core::" in name:
        crate = "multifd_core"
    elif "defmt" in name:
        crate = "defmt"
    else:
        crate = "other (core, builtins, cortex-m, semihosting)"
    total[crate] = total.get(crate, 0) + size
for crate, size in sorted(total.items()):
    print("  %-48s %6d bytes" % (crate, size))
print("  %-48s %6d bytes" % ("all functions", sum(total.values())))
'
}
echo "== code by crate in that build (LTO inlines much of the core into the firmware's functions)"
by_crate "$ELF"
# A measurement build: no LTO and no inlining heuristics, so the core's functions stay out of line
# and can be attributed (generic code instantiated by the firmware may still be inlined there).
echo "== code by crate, measurement build (no LTO, -inline-threshold=0)"
CARGO_PROFILE_FW_LTO=false RUSTFLAGS="-C llvm-args=-inline-threshold=0" CARGO_TARGET_DIR=target/fw-size \
  cargo build --quiet -p firmware-demo --profile fw --target thumbv7m-none-eabi
by_crate target/fw-size/thumbv7m-none-eabi/fw/firmware-demo
