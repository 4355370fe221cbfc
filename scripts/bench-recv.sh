#!/usr/bin/env bash
# Receive benchmark (BENCHMARKS.md, section "Receive"); not part of scripts/test-all.sh.
#
# A QEMU 10.0 source (-M none, 1 GiB file-backed guest RAM, about 40% zero pages, multifd with
# zero-page detection in the channels, max-bandwidth raised) migrates into four destinations, all
# variants interleaved in every repetition:
#   (a) recv      multifd recv, fresh destination memory
#       qemu      a QEMU 10.0 destination (-incoming defer) with fresh anonymous RAM
#   (b) prealloc  multifd recv --prealloc m0:1G (mapped and touched before the migration)
#       discard   a sink that reads every connection and drops the bytes (Python, one thread each)
# Time of one run: from the source's `migrate` command to the destination having everything
# (multifd recv: its "all pages received" timestamp, before it writes the block file; QEMU: its
# query-migrate says completed; discard sink: the last connection's EOF).
# One warm-up round (not counted) comes first. Prints every run and a table of medians with the
# ratios recv/qemu and prealloc/discard, and the destinations' CPU seconds (user, system) per GiB of
# guest RAM over the same interval (multifd recv: getrusage at "all pages received" minus /proc
# before the migration; QEMU: /proc/PID/stat before `migrate` and at completion). The received
# block file is compared with the image after every multifd recv run (outside the timing).
# Every run also prints steal_%: the share of all CPU ticks during the run that the hypervisor gave
# to someone else (/proc/stat), which wall time includes; the before/after table gives its medians.
#
# Usage: scripts/bench-recv.sh [REPS] [CHANNELS...]     (defaults: 5 reps, channels 1 2 4)
# Knobs: MULTIFD_BENCH_MIB (guest size, default 1024), MULTIFD_BENCH_DIR (work dir),
#   MULTIFD_BENCH_BASE (another build's `multifd` binary, e.g. of the commit before a change: its
#   recv and prealloc runs are interleaved with this build's, and a before/after table is printed:
#   per-repetition ratios now/base of wall time and of the destination's CPU seconds, their median,
#   interquartile range and a bootstrap 95% interval of the median),
#   MULTIFD_BENCH_ONLY_BASE=1 (with MULTIFD_BENCH_BASE: only the two builds' recv and prealloc runs,
#   no QEMU destination or discard sink; every ratio against those changes by exactly now/base).
#   MULTIFD_BENCH_AA=1 (with MULTIFD_BENCH_BASE: the base build's runs twice, as `_base` and
#   `_base2`, and the table also pairs them: the same build against itself, i.e. the spread this
#   machine gives when nothing changed, against which a now/base ratio is read).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
REPS="${1:-5}"
shift || true
CHANNELS="${*:-1 2 4}"
MIB="${MULTIFD_BENCH_MIB:-1024}"
WORK="${MULTIFD_BENCH_DIR:-/tmp/multifd-bench-recv}"
cargo build --release --quiet -p multifd-std --bin multifd
BIN="$(pwd)/target/release/multifd"
mkdir -p "$WORK"
echo "== $(qemu-system-x86_64 --version | head -n1); $(nproc) CPUs; guest ${MIB} MiB; reps $REPS; channels $CHANNELS"
BASE="${MULTIFD_BENCH_BASE:-}"
[ -z "$BASE" ] || [ -x "$BASE" ] || { echo "MULTIFD_BENCH_BASE=$BASE is not an executable" >&2; exit 2; }
PYTHONPATH="$(pwd)/scripts" BASE="$BASE" ONLY_BASE="${MULTIFD_BENCH_ONLY_BASE:-}" AA="${MULTIFD_BENCH_AA:-}" exec python3 - "$BIN" "$WORK" "$MIB" "$REPS" $CHANNELS <<'PY'
import os, sys
from benchlib import Recv, Runs, discard_sink, make_image, qemu_dest, qemu_source, same_file, start_migration

BIN, WORK, MIB, REPS = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
CHANNELS = [int(c) for c in sys.argv[5:]]
RAM = os.path.join(WORK, "ram.img")
GIB = MIB / 1024


BASE = os.environ.get("BASE") or None
ONLY_BASE = os.environ.get("ONLY_BASE") == "1"
AA = os.environ.get("AA") == "1"


def run_recv(ch, prealloc, binary=BIN):
    r = Recv(binary, WORK, ch, MIB if prealloc else None)
    src = qemu_source(WORK, RAM, MIB, ch)
    try:
        t0 = start_migration(src, r.port)
        src.wait_status("completed")
    finally:
        src.stop()
    at, (user, sys_), _ = r.finish()
    if not same_file(r.block_file(), RAM):
        raise RuntimeError("the received block differs from the source's RAM")
    os.unlink(r.block_file())
    return at - t0, {"user_s/GiB": user / GIB, "sys_s/GiB": sys_ / GIB, "cpu_s/GiB": (user + sys_) / GIB}


def run_qemu_dest(ch):
    d, port = qemu_dest(WORK, MIB, ch, False)
    src = qemu_source(WORK, RAM, MIB, ch)
    try:
        c0 = d.cpu()
        t0 = start_migration(src, port)
        t1 = d.wait_status("completed")
        c1 = d.cpu()
        src.wait_status("completed")
    finally:
        src.stop()
        d.stop()
    return t1 - t0, {"user_s/GiB": (c1[0] - c0[0]) / GIB, "sys_s/GiB": (c1[1] - c0[1]) / GIB}


def run_discard(ch):
    port, wait = discard_sink(ch)
    src = qemu_source(WORK, RAM, MIB, ch)
    try:
        t0 = start_migration(src, port)
        src.wait_status("completed")
        return wait() - t0
    finally:
        src.stop()


make_image(RAM, MIB)
VARIANTS = [("recv", lambda c: run_recv(c, False)), ("qemu", run_qemu_dest),
            ("prealloc", lambda c: run_recv(c, True)), ("discard", run_discard)]
if ONLY_BASE and not BASE:
    sys.exit("MULTIFD_BENCH_ONLY_BASE=1 needs MULTIFD_BENCH_BASE")
if ONLY_BASE:
    VARIANTS = [(n, f) for n, f in VARIANTS if n in ("recv", "prealloc")]
if BASE:
    VARIANTS += [("recv_base", lambda c: run_recv(c, False, BASE)), ("prealloc_base", lambda c: run_recv(c, True, BASE))]
if BASE and AA:
    VARIANTS += [("recv_base2", lambda c: run_recv(c, False, BASE)), ("prealloc_base2", lambda c: run_recv(c, True, BASE))]
# One unmeasured round first: the first migrations after the image is written run cold (page
# cache, transparent huge page pools) and would skew whichever variant came first.
warm = Runs()
for name, fn in VARIANTS:
    warm.run("warm-up", CHANNELS[0], name, fn)
runs = Runs()
for rep in range(1, REPS + 1):
    for ch in CHANNELS:
        # Every other repetition runs the variants in reverse, so none always comes first or last.
        for name, fn in (VARIANTS if rep % 2 else VARIANTS[::-1]):
            runs.run(rep, ch, name, fn)



def before_after():
    print(f"\nBefore/after: this build against {BASE}, paired within each repetition:\n")
    dest = ((None, "wall time"), ("cpu_s/GiB", "CPU s/GiB, destination"))
    pairs = [("recv", "recv_base", dest), ("prealloc", "prealloc_base", dest)]
    if AA:
        # The base build against itself: what the same table says when nothing changed.
        pairs += [("recv_base2", "recv_base", dest), ("prealloc_base2", "prealloc_base", dest)]
    runs.paired_table(pairs, CHANNELS)


if ONLY_BASE:
    before_after()
    runs.report_failures()
    sys.exit(0)
m = runs.median
print()
# discard/QEMU: the best recv/QEMU ratio any destination could reach against this source, since
# none can finish before the source has sent everything, which is what the discard sink measures.
print("| channels | recv (fresh) | QEMU dest (fresh) | recv/QEMU | recv --prealloc | discard sink | prealloc/discard "
      "| discard/QEMU |")
print("|---|---|---|---|---|---|---|---|")
for ch in CHANNELS:
    print(f"| {ch} | {m('recv', ch):.3f} s | {m('qemu', ch):.3f} s | {m('recv', ch) / m('qemu', ch):.2f}x | "
          f"{m('prealloc', ch):.3f} s | {m('discard', ch):.3f} s | {m('prealloc', ch) / m('discard', ch):.2f}x | "
          f"{m('discard', ch) / m('qemu', ch):.2f}x |")
print()
print("CPU seconds per GiB of guest RAM (medians), destination process:")
print()
print("| channels | recv user | recv sys | QEMU dest user | QEMU dest sys | recv --prealloc user | recv --prealloc sys |")
print("|---|---|---|---|---|---|---|")
for ch in CHANNELS:
    u, s_ = "user_s/GiB", "sys_s/GiB"
    print(f"| {ch} | {m('recv', ch, u):.2f} | {m('recv', ch, s_):.2f} | {m('qemu', ch, u):.2f} | "
          f"{m('qemu', ch, s_):.2f} | {m('prealloc', ch, u):.2f} | {m('prealloc', ch, s_):.2f} |")
if BASE:
    print()
    print(f"Before/after: this build against {BASE}, interleaved in every repetition (ratios of medians):")
    print()
    print("| channels | recv/QEMU now | recv/QEMU base | prealloc/discard now | prealloc/discard base "
          "| recv now/base | prealloc now/base |")
    print("|---|---|---|---|---|---|---|")
    for ch in CHANNELS:
        q, d = m('qemu', ch), m('discard', ch)
        print(f"| {ch} | {m('recv', ch) / q:.2f}x | {m('recv_base', ch) / q:.2f}x | {m('prealloc', ch) / d:.2f}x | "
              f"{m('prealloc_base', ch) / d:.2f}x | {m('recv', ch) / m('recv_base', ch):.3f} | "
              f"{m('prealloc', ch) / m('prealloc_base', ch):.3f} |")
    before_after()
runs.report_failures()
PY
