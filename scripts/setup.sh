#!/usr/bin/env bash
# Installs everything the test command needs, idempotently. Safe to run again: each step checks first.
# Needs root (apt) on Debian bookworm; elsewhere it says what is missing and stops.
set -euo pipefail
cd "$(dirname "$0")/.."

# The nightly used for Miri (and later TSan and fuzzing). Pinned to a dated release so that a new
# nightly cannot break CI overnight. Bump deliberately, in its own commit.
NIGHTLY="${MULTIFD_NIGHTLY:-nightly-2026-10-30}"
QEMU_WANT="10.0"

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }
# quiet CMD...: runs CMD with its output kept aside; shows it only if CMD fails.
quiet() {
  local out rc=0
  out=$(mktemp)
  "$@" >"$out" 2>&1 || rc=$?
  [ "$rc" -eq 0 ] || cat "$out" >&2
  rm -f "$out"
  return "$rc"
}

command -v rustup >/dev/null || die "rustup not found: install it first (https://rustup.rs), then rerun"

# 1. The pinned stable toolchain, its components and bare-metal targets, from rust-toolchain.toml.
#    This machine may set RUSTUP_AUTO_INSTALL=0, so install explicitly; it is a no-op when present.
log "rust toolchain from rust-toolchain.toml"
quiet rustup toolchain install || die "rustup toolchain install (from rust-toolchain.toml) failed"

# 2. Pinned nightly with Miri and rust-src.
if ! rustup run "$NIGHTLY" cargo miri --version >/dev/null 2>&1; then
  log "installing $NIGHTLY with miri and rust-src"
  quiet rustup toolchain install "$NIGHTLY" --profile minimal --component miri --component rust-src \
    || die "could not install $NIGHTLY with miri"
fi

# 3. QEMU $QEMU_WANT (qemu-system-arm for the firmware, qemu-system-x86 for interop tests), from bookworm-backports.
qemu_ok() {
  command -v "$1" >/dev/null && "$1" --version | head -n1 | grep -q "version $QEMU_WANT"
}
if ! qemu_ok qemu-system-arm || ! qemu_ok qemu-system-x86_64; then
  [ "$(id -u)" = 0 ] || die "QEMU $QEMU_WANT is missing and installing it needs root (apt-get)"
  command -v apt-get >/dev/null || die "QEMU $QEMU_WANT is missing and this is not a Debian system: install qemu-system-arm and qemu-system-x86 $QEMU_WANT by hand"
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    log "adding the bookworm-backports apt source"
    cat > /etc/apt/sources.list.d/backports.sources <<'X'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
X
  fi
  log "installing QEMU $QEMU_WANT from bookworm-backports (apt)"
  export DEBIAN_FRONTEND=noninteractive
  quiet apt-get update || die "apt-get update failed"
  quiet apt-get install -y --no-install-recommends -t bookworm-backports \
    qemu-system-arm qemu-system-x86 || die "apt-get install of QEMU from bookworm-backports failed"
  qemu_ok qemu-system-arm || die "qemu-system-arm is not version $QEMU_WANT after install: $(qemu-system-arm --version | head -n1)"
fi

# 3b. iproute2 (`ip`), for the two-host test (network namespaces joined by a veth pair).
command -v ip >/dev/null || { [ "$(id -u)" = 0 ] || die "ip (iproute2) is missing and installing it needs root"; quiet apt-get install -y --no-install-recommends iproute2 || die "apt-get install iproute2 failed"; }
# 3c. A C compiler, for the zstd crate's bundled libzstd (zstd-sys builds it with `cc`).
command -v cc >/dev/null || { [ "$(id -u)" = 0 ] || die "a C compiler (cc) is missing and installing it needs root"; quiet apt-get install -y --no-install-recommends gcc libc6-dev || die "apt-get install gcc failed"; }
# 4. defmt-print, to decode the firmware's log. Installed with the pinned stable toolchain.
export PATH="$HOME/.cargo/bin:$PATH"
# (grep without -q: under pipefail an early exit could kill the writer and read as "missing".)
if ! command -v defmt-print >/dev/null || ! defmt-print --version 2>/dev/null | grep '^defmt-print 1\.' >/dev/null; then
  log "installing defmt-print (cargo install, about 2 minutes)"
  quiet cargo install --locked defmt-print@1.2.0 || die "cargo install defmt-print failed"
fi
# 5. cargo-fuzz, for the fuzz tier (run with the pinned nightly; the tool itself builds on stable).
if ! command -v cargo-fuzz >/dev/null || ! cargo-fuzz --version 2>/dev/null | grep '^cargo-fuzz 0\.13\.' >/dev/null; then
  log "installing cargo-fuzz (cargo install, about 2 minutes)"
  quiet cargo install --locked cargo-fuzz@0.13.2 || die "cargo install cargo-fuzz failed"
fi
# 6. valgrind, for the leak tier (memcheck on `multifd recv` and `multifd send`, scripts/valgrind.sh).
if ! command -v valgrind >/dev/null; then
  [ "$(id -u)" = 0 ] || die "valgrind is missing and installing it needs root (apt-get)"
  command -v apt-get >/dev/null || die "valgrind is missing and this is not a Debian system: install it by hand"
  log "installing valgrind (apt)"
  export DEBIAN_FRONTEND=noninteractive
  quiet apt-get update || die "apt-get update failed"
  quiet apt-get install -y --no-install-recommends valgrind || die "apt-get install valgrind failed"
fi
log "ok"
