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
# One warm-up round (not counted) comes first. Prints every run and a table of medians with the ratios recv/qemu and prealloc/discard.
#
# Usage: scripts/bench-recv.sh [REPS] [CHANNELS...]     (defaults: 5 reps, channels 1 2 4)
# Knobs: MULTIFD_BENCH_MIB (guest size, default 1024), MULTIFD_BENCH_DIR (work dir).
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
exec python3 - "$BIN" "$WORK" "$MIB" "$REPS" $CHANNELS <<'PY'
import json, os, random, socket, statistics, subprocess, sys, threading, time

BIN, WORK, MIB, REPS = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
CHANNELS = [int(c) for c in sys.argv[5:]]
RAM = os.path.join(WORK, "ram.img")
PAGE = 4096


def make_image():
    if os.path.exists(RAM) and os.path.getsize(RAM) == MIB << 20:
        return
    rng = random.Random(1)
    zero = bytes(PAGE)
    with open(RAM + ".tmp", "wb") as f:
        for _ in range((MIB << 20) // (PAGE * 256)):
            chunk = bytearray()
            for _ in range(256):
                chunk += zero if rng.random() < 0.4 else os.urandom(PAGE)
            f.write(chunk)
    os.rename(RAM + ".tmp", RAM)


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        for _ in range(500):
            try:
                self.s.connect(path)
                break
            except OSError:
                time.sleep(0.01)
        self.f = self.s.makefile("rwb")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"QMP {name}: {r['error']}")


def qemu(tag, *args):
    sock = os.path.join(WORK, f"qmp-{tag}.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    p = subprocess.Popen(["qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-display", "none",
                          "-serial", "none", "-monitor", "none", "-qmp", f"unix:{sock},server=on,wait=off", *args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p, Qmp(sock)


def source():
    return qemu("src", "-M", "none,memory-backend=m0", "-object",
                f"memory-backend-file,id=m0,size={MIB}M,mem-path={RAM},share=on")


def start_migration(q, port, ch):
    q.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]})
    q.cmd("migrate-set-parameters", {"multifd-channels": ch, "max-bandwidth": 64 << 30,
                                     "zero-page-detection": "multifd"})
    t0 = time.time()
    q.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    return t0


def wait_status(q, want, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        st = q.cmd("query-migrate").get("status")
        if st == want:
            return time.time()
        if st == "failed":
            raise RuntimeError("migration failed")
        time.sleep(0.002)
    raise RuntimeError(f"no {want} within {timeout} s")


def stop(p, q):
    try:
        q.cmd("quit")
    except Exception:
        pass
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def run_recv(ch, prealloc):
    out = os.path.join(WORK, "out")
    portf = os.path.join(WORK, "port")
    if os.path.exists(portf):
        os.unlink(portf)
    args = [BIN, "recv", "--listen", "127.0.0.1:0", "--channels", str(ch), "--out", out, "--port-file", portf]
    if prealloc:
        args += ["--prealloc", f"m0:{MIB}M"]
    r = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    while not os.path.exists(portf):
        time.sleep(0.002)
    port = int(open(portf).read())
    p, q = source()
    t0 = start_migration(q, port, ch)
    wait_status(q, "completed")
    _, err = r.communicate(timeout=120)
    stop(p, q)
    if r.returncode != 0:
        raise RuntimeError(f"multifd recv failed: {err}")
    at = float(err.split("all pages received at unix time ")[1].split()[0])
    os.unlink(os.path.join(out, "m0.bin"))
    return at - t0


def run_qemu_dest(ch):
    port = free_port()
    d, dq = qemu("dst", "-M", "none,memory-backend=m0", "-object", f"memory-backend-ram,id=m0,size={MIB}M",
                 "-incoming", "defer")
    dq.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]})
    dq.cmd("migrate-set-parameters", {"multifd-channels": ch})
    dq.cmd("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
    p, q = source()
    t0 = start_migration(q, port, ch)
    t1 = wait_status(dq, "completed")
    wait_status(q, "completed")
    stop(p, q)
    stop(d, dq)
    return t1 - t0


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def run_discard(ch):
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    port = ls.getsockname()[1]
    ends = []

    def reader(c):
        buf = bytearray(1 << 20)
        while c.recv_into(buf):
            pass
        ends.append(time.time())

    threads = []

    def acceptor():
        for _ in range(ch + 1):
            c, _ = ls.accept()
            t = threading.Thread(target=reader, args=(c,))
            t.start()
            threads.append(t)

    a = threading.Thread(target=acceptor)
    a.start()
    p, q = source()
    t0 = start_migration(q, port, ch)
    wait_status(q, "completed")
    a.join()
    for t in threads:
        t.join()
    stop(p, q)
    ls.close()
    return max(ends) - t0


make_image()
runs = {}
VARIANTS = [("recv", lambda c: run_recv(c, False)), ("qemu", run_qemu_dest),
            ("prealloc", lambda c: run_recv(c, True)), ("discard", run_discard)]
# One unmeasured round first: the first migrations after the image is written run cold (page
# cache, transparent huge page pools) and would skew whichever variant came first.
for name, fn in VARIANTS:
    fn(CHANNELS[0])
for rep in range(REPS):
    for ch in CHANNELS:
        for name, fn in VARIANTS:
            t = fn(ch)
            runs.setdefault((name, ch), []).append(t)
            print(f"rep {rep + 1} channels {ch} {name:8s} {t:.3f} s", flush=True)

print()
print("| channels | recv (fresh) | QEMU dest (fresh) | recv/QEMU | recv --prealloc | discard sink | prealloc/discard |")
print("|---|---|---|---|---|---|---|")
for ch in CHANNELS:
    m = {n: statistics.median(runs[(n, ch)]) for n, _ in VARIANTS}
    print(f"| {ch} | {m['recv']:.3f} s | {m['qemu']:.3f} s | {m['recv'] / m['qemu']:.2f}x | "
          f"{m['prealloc']:.3f} s | {m['discard']:.3f} s | {m['prealloc'] / m['discard']:.2f}x |")
PY
