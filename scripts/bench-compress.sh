#!/usr/bin/env bash
# Compressed-migration benchmark (BENCHMARKS.md, section "Compressed migrations"); not part of
# scripts/test-all.sh. A guest image of 40% zero pages, 30% text-like (compressible) pages and 30%
# random pages; for each method (zstd and zlib, level 1, QEMU's default) and channel count, every
# variant interleaved in each repetition after one unmeasured warm-up round:
#   qsrc_recv   QEMU 10.0 source -> multifd recv (fresh destination memory)
#   qsrc_qdst   QEMU source -> QEMU destination (fresh memory), both set to the method
#   send_recv   multifd send -> multifd recv
#   qsrc_sink   QEMU source -> a sink that reads and drops every byte: the least time any
#               destination can take against this source (its compression is the work), the floor
#               for qsrc_recv
#   floor       std-shim/examples/codec_floor.rs: the same codec calls on the same pages in as many
#               threads (one compressing and one decompressing per channel), no I/O: the floor for
#               send_recv
# Goals (issue "Compressed migrations"): qsrc_recv <= 0.8x qsrc_qdst; send_recv <= 0.8x qsrc_qdst;
# where the floor shows a goal is out of reach, within 10% of the floor.
# Time of a run: from the migration's start (QEMU: the `migrate` command; multifd send: its
# "connecting at" line) to the destination having everything (multifd recv: "all pages received";
# QEMU: query-migrate completed, polled every 2 ms). CPU seconds per GiB of guest: each process over
# the measured interval where it is a QEMU (/proc), over its whole life for ours (getrusage of the
# reaped child: includes setup, so an upper bound). Wire bytes: what multifd recv read.
#
# Usage: scripts/bench-compress.sh [REPS] [CHANNELS...]   (defaults: 5 reps, channels 1 2 4)
# Knobs: MULTIFD_BENCH_MIB (guest size, default 1024), MULTIFD_BENCH_DIR (work dir),
#   MULTIFD_BENCH_METHODS (default "zstd zlib").
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
REPS="${1:-5}"
shift || true
CHANNELS="${*:-1 2 4}"
MIB="${MULTIFD_BENCH_MIB:-1024}"
WORK="${MULTIFD_BENCH_DIR:-/tmp/multifd-bench-compress}"
METHODS="${MULTIFD_BENCH_METHODS:-zstd zlib}"
cargo build --release --quiet -p multifd-std --bin multifd --example codec_floor
BIN="$(pwd)/target/release/multifd"
mkdir -p "$WORK"
echo "== $(qemu-system-x86_64 --version | head -n1); $(nproc) CPUs; guest ${MIB} MiB; reps $REPS; channels $CHANNELS; methods $METHODS"
PYTHONPATH="$(pwd)/scripts" exec python3 - "$BIN" "$WORK" "$MIB" "$REPS" "$METHODS" $CHANNELS <<'PY'
import os, random, re, subprocess, sys, time
from benchlib import ChildCpu, Qemu, Recv, Runs, discard_sink, free_port, same_file, send_started

BIN, WORK, MIB, REPS, METHODS = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5].split()
CHANNELS = [int(c) for c in sys.argv[6:]]
IMAGE = os.path.join(WORK, "mixed.img")
PAGE, GIB, MIBF = 4096, MIB / 1024, float(1 << 20)
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there been one all we their has would when if so no will more other can its "
         "migration channel page guest memory packet stream sync epoch block zero dirty round source destination").split()


def make_mixed_image(path, mib):
    """40% zero pages, 30% text-like pages, 30% random; deterministic choice, reused if present."""
    if os.path.exists(path) and os.path.getsize(path) == mib << 20:
        return
    rng = random.Random(5)
    # A pool of distinct text pages, so that no two pages close together repeat each other whole
    # (a zstd window would otherwise find them); each use is stamped with its page number too.
    pool = []
    for _ in range(2048):
        text = " ".join(rng.choice(WORDS) for _ in range(900)).encode()
        pool.append((text * 2)[:PAGE])
    zero = bytes(PAGE)
    with open(path + ".tmp", "wb") as f:
        for p in range((mib << 20) // PAGE):
            r = rng.random()
            if r < 0.4:
                f.write(zero)
            elif r < 0.7:
                page = bytearray(rng.choice(pool))
                page[:16] = f"{p:016d}".encode()
                f.write(page)
            else:
                f.write(os.urandom(PAGE))
    os.rename(path + ".tmp", path)


def params(method, ch):
    return {"multifd-channels": ch, "multifd-compression": method, f"multifd-{method}-level": 1}


def qemu_src(ch, method):
    q = Qemu(WORK, "src", f"memory-backend-file,id=m0,size={MIB}M,mem-path={IMAGE},share=on")
    q.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]})
    q.cmd("migrate-set-parameters", {**params(method, ch), "max-bandwidth": 64 << 30, "zero-page-detection": "multifd"})
    return q


def qemu_dst(ch, method):
    q = Qemu(WORK, "dst", f"memory-backend-ram,id=m0,size={MIB}M", incoming=True)
    q.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]})
    q.cmd("migrate-set-parameters", params(method, ch))
    port = free_port()
    q.cmd("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
    return q, port


def check(r):
    if not same_file(r.block_file(), IMAGE):
        raise RuntimeError("the received block differs from the image")
    os.unlink(r.block_file())


def qsrc_recv(ch, method):
    r = Recv(BIN, WORK, ch)
    src = qemu_src(ch, method)
    try:
        s0 = src.cpu()
        t0 = time.time()
        src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{r.port}"})
        src.wait_status("completed")
        s1 = src.cpu()
    finally:
        src.stop()
    at, (user, sys_), report = r.finish()
    check(r)
    return at - t0, {"src_cpu_s/GiB": (s1[0] + s1[1] - s0[0] - s0[1]) / GIB, "dst_cpu_s/GiB": (user + sys_) / GIB,
                     "wire_MiB": report["bytes"] / MIBF, "compressed/raw": report["compressed_bytes"] / max(1, report["raw_bytes"])}


def qsrc_qdst(ch, method):
    d, port = qemu_dst(ch, method)
    src = qemu_src(ch, method)
    try:
        s0, d0 = src.cpu(), d.cpu()
        t0 = time.time()
        src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        t1 = d.wait_status("completed")
        s1, d1 = src.cpu(), d.cpu()
        src.wait_status("completed")
    finally:
        src.stop()
        d.stop()
    return t1 - t0, {"src_cpu_s/GiB": (s1[0] + s1[1] - s0[0] - s0[1]) / GIB,
                     "dst_cpu_s/GiB": (d1[0] + d1[1] - d0[0] - d0[1]) / GIB}


def qsrc_sink(ch, method):
    port, wait = discard_sink(ch)
    src = qemu_src(ch, method)
    try:
        t0 = time.time()
        src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        src.wait_status("completed")
        return wait() - t0
    finally:
        src.stop()


def send_recv(ch, method):
    cpu = ChildCpu()
    r = Recv(BIN, WORK, ch)
    s = subprocess.Popen([BIN, "-v", "send", "--connect", f"127.0.0.1:{r.port}", "--channels", str(ch), "--image",
                          f"{IMAGE}:m0", "--compression", method, "--compression-level", "1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = send_started(s)
    at, _, report = r.finish()
    u, s_ = cpu.stop()
    check(r)
    return at - t0, {"both_cpu_s/GiB": (u + s_) / GIB, "wire_MiB": report["bytes"] / MIBF,
                     "compressed/raw": report["compressed_bytes"] / max(1, report["raw_bytes"])}


def floor(ch, method):
    cpu = ChildCpu()
    exe = os.path.join(os.path.dirname(BIN), "examples", "codec_floor")
    out = subprocess.run([exe, IMAGE, str(ch), method, "1"], capture_output=True, text=True, check=True).stdout
    u, s_ = cpu.stop()
    m = re.search(r"codec floor: ([0-9.]+) s, (\d+) compressed bytes for (\d+)", out)
    return float(m.group(1)), {"both_cpu_s/GiB": (u + s_) / GIB, "compressed/raw": int(m.group(2)) / int(m.group(3))}


make_mixed_image(IMAGE, MIB)
VARIANTS = []
for method in METHODS:
    for name, fn in (("qsrc_recv", qsrc_recv), ("qsrc_qdst", qsrc_qdst), ("qsrc_sink", qsrc_sink),
                     ("send_recv", send_recv), ("floor", floor)):
        VARIANTS.append((f"{name}_{method}", (lambda f, m: lambda c: f(c, m))(fn, method)))
warm = Runs()
for name, fn in VARIANTS:
    warm.run("warm-up", CHANNELS[0], name, fn)
runs = Runs()
for rep in range(1, REPS + 1):
    for ch in CHANNELS:
        # Every other repetition runs the variants in reverse, so none always comes first or last.
        for name, fn in (VARIANTS if rep % 2 else VARIANTS[::-1]):
            runs.run(rep, ch, name, fn)

m = runs.median


def spread(name, ch):
    xs = sorted(runs.t.get((name, ch), []))
    return f"{xs[0]:.3f}-{xs[-1]:.3f}" if xs else "-"


for method in METHODS:
    q, r, k, s, f = (f"{v}_{method}" for v in ("qsrc_qdst", "qsrc_recv", "qsrc_sink", "send_recv", "floor"))
    print(f"\n{method} level 1, medians in seconds (min-max), ratios of medians:\n")
    print("| channels | QEMU->QEMU | QEMU->recv | ratio (goal <= 0.8) | QEMU->sink | sink/QEMU->QEMU | QEMU->recv / sink "
          "| send->recv | ratio (goal <= 0.8) | codec floor | floor/QEMU->QEMU | send->recv / floor |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ch in CHANNELS:
        print(f"| {ch} | {m(q, ch):.3f} ({spread(q, ch)}) | {m(r, ch):.3f} ({spread(r, ch)}) | {m(r, ch) / m(q, ch):.2f} "
              f"| {m(k, ch):.3f} ({spread(k, ch)}) | {m(k, ch) / m(q, ch):.2f} | {m(r, ch) / m(k, ch):.2f} "
              f"| {m(s, ch):.3f} ({spread(s, ch)}) | {m(s, ch) / m(q, ch):.2f} | {m(f, ch):.3f} ({spread(f, ch)}) "
              f"| {m(f, ch) / m(q, ch):.2f} | {m(s, ch) / m(f, ch):.2f} |")
    print(f"\n{method}: CPU seconds per GiB of guest (medians) and compressed/raw bytes of the data pages:\n")
    print("| channels | QEMU src (->QEMU) | QEMU dst | QEMU src (->recv) | recv | send+recv | floor (both) "
          "| compressed/raw (QEMU) | compressed/raw (ours) | wire MiB QEMU->recv | wire MiB send->recv |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ch in CHANNELS:
        print(f"| {ch} | {m(q, ch, 'src_cpu_s/GiB'):.2f} | {m(q, ch, 'dst_cpu_s/GiB'):.2f} | {m(r, ch, 'src_cpu_s/GiB'):.2f} "
              f"| {m(r, ch, 'dst_cpu_s/GiB'):.2f} | {m(s, ch, 'both_cpu_s/GiB'):.2f} | {m(f, ch, 'both_cpu_s/GiB'):.2f} "
              f"| {m(r, ch, 'compressed/raw'):.3f} | {m(s, ch, 'compressed/raw'):.3f} | {m(r, ch, 'wire_MiB'):.0f} "
              f"| {m(s, ch, 'wire_MiB'):.0f} |")
runs.report_failures()
PY
