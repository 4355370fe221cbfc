#!/usr/bin/env bash
# Whole-migration benchmark (BENCHMARKS.md, section "Send and whole migrations"); not part of
# scripts/test-all.sh. A 1 GiB guest image (about 40% zero pages), channel counts 1 2 4, every
# variant interleaved in each repetition after one unmeasured warm-up round:
#   ours_fresh   multifd send -> multifd recv (two processes, loopback), fresh destination memory
#   qemu_fresh   QEMU 10.0 source -> QEMU 10.0 destination (fresh memory-backend-ram)
#   ours_pre     multifd send -> multifd recv --prealloc m0:1G (destination memory touched first)
#   qemu_pre     QEMU source -> QEMU destination with prealloc=on
#   send_qdest   multifd send -> QEMU destination with prealloc=on (compare with qemu_pre)
#   iperf3       iperf3 over loopback with as many parallel streams as channels, 2 s
#   floor_fresh  std-shim/examples/loopback_floor.rs: the same data pages in the same packets over as
#   floor_pre    many connections, one writev and one readv each and nothing else, into fresh or
#                populated destination memory; the least time these bytes take on this machine
# Time of a run: from the start of the migration (QEMU source: the `migrate` command; multifd send:
# its "connecting at" timestamp, after it has loaded the image) to the destination having everything
# (multifd recv: its "all pages received" timestamp, before it writes the block file; QEMU: its
# query-migrate says completed, polled every 2 ms). multifd recv's block file is compared with the
# image after every run (outside the timing); a run that fails is reported and left out of the medians.
# Wire throughput = bytes multifd recv read from all connections / time.
# Every run also prints steal_%: the share of all CPU ticks during the run that the hypervisor gave
# to someone else (/proc/stat), which wall time includes; the before/after table gives its medians.
#
# Usage: scripts/bench-migrate.sh [REPS] [CHANNELS...]    (defaults: 5 reps, channels 1 2 4)
# Knobs: MULTIFD_BENCH_MIB (guest size, default 1024), MULTIFD_BENCH_DIR (work dir),
#   MULTIFD_BENCH_BASE (another build's `multifd` binary, e.g. of the commit before a change: its
#   send->recv and send->QEMU runs, both ends that build, are interleaved with this build's, and a
#   before/after table is printed: per-repetition ratios now/base of wall time and of CPU seconds,
#   their median, interquartile range and a bootstrap 95% interval of the median),
#   MULTIFD_BENCH_ONLY_BASE=1 (with MULTIFD_BENCH_BASE: run only this build's and the base build's
#   variants, no QEMU source, iperf3 or floor; every ratio against QEMU or the floor changes by exactly
#   the now/base factor, since both builds are divided by the same reference).
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
WORK="${MULTIFD_BENCH_DIR:-/tmp/multifd-bench-migrate}"
command -v iperf3 >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3 >/dev/null
cargo build --release --quiet -p multifd-std --bin multifd --example loopback_floor
BIN="$(pwd)/target/release/multifd"
mkdir -p "$WORK"
echo "== $(qemu-system-x86_64 --version | head -n1); $(iperf3 --version | head -n1); $(nproc) CPUs; guest ${MIB} MiB; reps $REPS; channels $CHANNELS"
BASE="${MULTIFD_BENCH_BASE:-}"
[ -z "$BASE" ] || [ -x "$BASE" ] || { echo "MULTIFD_BENCH_BASE=$BASE is not an executable" >&2; exit 2; }
PYTHONPATH="$(pwd)/scripts" BASE="$BASE" ONLY_BASE="${MULTIFD_BENCH_ONLY_BASE:-}" AA="${MULTIFD_BENCH_AA:-}" exec python3 - "$BIN" "$WORK" "$MIB" "$REPS" $CHANNELS <<'PY'
import json, os, re, subprocess, sys, time
from benchlib import (ChildCpu, Recv, Runs, make_image, qemu_dest, qemu_source, run_send, same_file, send_started,
                      start_migration)

BIN, WORK, MIB, REPS = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
CHANNELS = [int(c) for c in sys.argv[5:]]
IMAGE = os.path.join(WORK, "image.img")
MIBF = float(1 << 20)


BASE = os.environ.get("BASE") or None
ONLY_BASE = os.environ.get("ONLY_BASE") == "1"
AA = os.environ.get("AA") == "1"
GIB = MIB / 1024


def ours(ch, prealloc, binary=BIN):
    cpu = ChildCpu()
    r = Recv(binary, WORK, ch, MIB if prealloc else None)
    s = run_send(binary, r.port, ch, IMAGE)
    t0 = send_started(s)
    at, _, report = r.finish()
    u, s_ = cpu.stop()
    if not same_file(r.block_file(), IMAGE):
        raise RuntimeError("the received block differs from the image")
    os.unlink(r.block_file())
    t = at - t0
    # CPU: both processes over their whole lives (image load and --prealloc included), per GiB of guest.
    return t, {"wire_MiB/s": report["bytes"] / MIBF / t, "cpu_s/GiB": (u + s_) / GIB}


def qemu(ch, prealloc):
    d, port = qemu_dest(WORK, MIB, ch, prealloc)
    src = qemu_source(WORK, IMAGE, MIB, ch)
    try:
        t0 = start_migration(src, port)
        t1 = d.wait_status("completed")
        src.wait_status("completed")
    finally:
        src.stop()
        d.stop()
    return t1 - t0


def send_qdest(ch, binary=BIN):
    d, port = qemu_dest(WORK, MIB, ch, True)
    try:
        cpu = ChildCpu()
        s = run_send(binary, port, ch, IMAGE)
        t1 = d.wait_status("completed")
        t0 = send_started(s)
        u, s_ = cpu.stop()  # multifd send only: the QEMU destination is reaped later, in d.stop()
    finally:
        d.stop()
    return t1 - t0, {"send_cpu_s/GiB": (u + s_) / GIB}


def floor(ch, prealloc):
    args = [os.path.join(os.path.dirname(BIN), "examples", "loopback_floor"), IMAGE, str(ch)]
    out = subprocess.run(args + (["--prealloc"] if prealloc else []), capture_output=True, text=True, check=True)
    return float(re.search(r"loopback floor: ([0-9.]+) s", out.stdout).group(1))


def iperf(ch):
    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(IPERF_PORT), "-P", str(ch), "-t", "2", "-J"],
                         capture_output=True, text=True, check=True).stdout
    bps = json.loads(out)["end"]["sum_received"]["bits_per_second"]
    return 0.0, {"MiB/s": bps / 8 / MIBF}


make_image(IMAGE, MIB)
IPERF_PORT = 5299
server = subprocess.Popen(["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(0.5)
VARIANTS = [("ours_fresh", lambda c: ours(c, False)), ("qemu_fresh", lambda c: qemu(c, False)),
            ("ours_pre", lambda c: ours(c, True)), ("qemu_pre", lambda c: qemu(c, True)),
            ("send_qdest", send_qdest), ("iperf3", iperf), ("floor_fresh", lambda c: floor(c, False)),
            ("floor_pre", lambda c: floor(c, True))]
if ONLY_BASE and not BASE:
    sys.exit("MULTIFD_BENCH_ONLY_BASE=1 needs MULTIFD_BENCH_BASE")
if ONLY_BASE:
    VARIANTS = [(n, f) for n, f in VARIANTS if n in ("ours_fresh", "ours_pre", "send_qdest")]
if BASE:
    VARIANTS += [("ours_fresh_base", lambda c: ours(c, False, BASE)), ("ours_pre_base", lambda c: ours(c, True, BASE)),
                 ("send_qdest_base", lambda c: send_qdest(c, BASE))]
if BASE and AA:
    VARIANTS += [("ours_fresh_base2", lambda c: ours(c, False, BASE)), ("ours_pre_base2", lambda c: ours(c, True, BASE)),
                 ("send_qdest_base2", lambda c: send_qdest(c, BASE))]
runs = Runs()
try:
    warm = Runs()
    for name, fn in VARIANTS:
        warm.run("warm-up", CHANNELS[0], name, fn)
    for rep in range(1, REPS + 1):
        for ch in CHANNELS:
            # Every other repetition runs the variants in reverse, so none always comes first or last.
            for name, fn in (VARIANTS if rep % 2 else VARIANTS[::-1]):
                runs.run(rep, ch, name, fn)
finally:
    server.kill()


def before_after():
    print(f"\nBefore/after: this build against {BASE} (both ends), paired within each repetition:\n")
    both = ((None, "wall time"), ("cpu_s/GiB", "CPU s/GiB, both ends"))
    send = ((None, "wall time"), ("send_cpu_s/GiB", "CPU s/GiB, send"))
    pairs = [("ours_fresh", "ours_fresh_base", both), ("ours_pre", "ours_pre_base", both),
             ("send_qdest", "send_qdest_base", send)]
    if AA:
        # The base build against itself: what the same table says when nothing changed.
        pairs += [("ours_fresh_base2", "ours_fresh_base", both), ("ours_pre_base2", "ours_pre_base", both),
                  ("send_qdest_base2", "send_qdest_base", send)]
    runs.paired_table(pairs, CHANNELS)


if ONLY_BASE:
    before_after()
    runs.report_failures()
    sys.exit(0)
m = runs.median
print("\nMedians (seconds; ratio = ours / QEMU time):\n")
print("| channels | send->recv fresh | QEMU->QEMU fresh | ratio (goal <= 0.5) | send->recv prealloc | "
      "QEMU->QEMU prealloc | ratio (goal <= 0.8) | wire MiB/s | iperf3 MiB/s | wire/iperf3 (goal >= 0.8) | "
      "send->QEMU dest | QEMU src->QEMU dest | ratio (goal <= 1.0) |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for ch in CHANNELS:
    wire, ip = m("ours_pre", ch, "wire_MiB/s"), m("iperf3", ch, "MiB/s")
    print(f"| {ch} | {m('ours_fresh', ch):.3f} | {m('qemu_fresh', ch):.3f} | "
          f"{m('ours_fresh', ch) / m('qemu_fresh', ch):.2f} | {m('ours_pre', ch):.3f} | {m('qemu_pre', ch):.3f} | "
          f"{m('ours_pre', ch) / m('qemu_pre', ch):.2f} | {wire:.0f} | {ip:.0f} | {wire / ip:.2f} | "
          f"{m('send_qdest', ch):.3f} | {m('qemu_pre', ch):.3f} | {m('send_qdest', ch) / m('qemu_pre', ch):.2f} |")
print("\nThe floor (loopback_floor: the same bytes, nothing but writev and readv) against QEMU's time, i.e.")
print("the best ratio any sender and receiver pair could reach on this machine:\n")
print("| channels | floor fresh | floor/QEMU fresh (goal <= 0.5) | floor prealloc | floor/QEMU prealloc (goal <= 0.8) "
      "| send->recv prealloc / floor |")
print("|---:|---:|---:|---:|---:|---:|")
for ch in CHANNELS:
    ff, fp = m("floor_fresh", ch), m("floor_pre", ch)
    print(f"| {ch} | {ff:.3f} | {ff / m('qemu_fresh', ch):.2f} | {fp:.3f} | {fp / m('qemu_pre', ch):.2f} | "
          f"{m('ours_pre', ch) / fp:.2f} |")
if BASE:
    print(f"\nBefore/after: this build against {BASE} (both ends), interleaved in every repetition:\n")
    print("| channels | fresh ratio now | fresh ratio base | prealloc ratio now | prealloc ratio base "
          "| send->QEMU ratio now | send->QEMU ratio base | fresh now/base | prealloc now/base | send->QEMU now/base |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ch in CHANNELS:
        qf, qp = m('qemu_fresh', ch), m('qemu_pre', ch)
        of, ob, pf, pb = m('ours_fresh', ch), m('ours_fresh_base', ch), m('ours_pre', ch), m('ours_pre_base', ch)
        sf, sb = m('send_qdest', ch), m('send_qdest_base', ch)
        print(f"| {ch} | {of / qf:.2f} | {ob / qf:.2f} | {pf / qp:.2f} | {pb / qp:.2f} | {sf / qp:.2f} | {sb / qp:.2f} "
              f"| {of / ob:.3f} | {pf / pb:.3f} | {sf / sb:.3f} |")
    before_after()
runs.report_failures()
PY
