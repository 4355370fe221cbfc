#!/usr/bin/env bash
# Cargo runner for the firmware: boots the ELF in qemu-system-arm and decodes its defmt log.
# The exit status is the firmware's own (semihosting exit); 124 means QEMU was stopped by the timeout.
set -uo pipefail
ELF="$1"
shift
MACHINE="${QEMU_MACHINE:-mps2-an385}"
if ! command -v qemu-system-arm >/dev/null; then
  echo "qemu-runner: qemu-system-arm not found; run scripts/setup.sh" >&2
  exit 127
fi
if ! command -v defmt-print >/dev/null; then
  echo "qemu-runner: defmt-print not found; run scripts/setup.sh" >&2
  exit 127
fi
timeout "${QEMU_TIMEOUT:-60}" qemu-system-arm -machine "$MACHINE" -nographic \
  -semihosting-config enable=on,target=native -kernel "$ELF" |
  defmt-print -e "$ELF"
exit "${PIPESTATUS[0]}"
