#!/usr/bin/env bash
# Send benchmark (not part of the test command): `multifd send` into a QEMU 10.0 destination versus a
# QEMU 10.0 source into the same kind of destination, same image, 1/2/4 channels, medians of N runs,
# interleaved (ours, QEMU, ours, QEMU, ...). Time = from starting the sender (our process, or QEMU's
# `migrate` command) to the destination reporting `completed` (query-migrate polled every 5 ms).
# Usage: scripts/bench-send.sh [SIZE_MIB (1024)] [RUNS (3)]. Results go to BENCHMARKS.md by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
SIZE_MIB="${1:-1024}"
RUNS="${2:-3}"
cargo build --release -q -p multifd-std --bin multifd
qemu-system-x86_64 --version | head -n1
exec python3 - "$SIZE_MIB" "$RUNS" <<'PY'
import json, os, random, socket, statistics, subprocess, sys, tempfile, time
size_mib, runs = int(sys.argv[1]), int(sys.argv[2])
size = size_mib << 20
tmp = tempfile.mkdtemp(prefix="multifd-bench-")
img = os.path.join(tmp, "image.img")
# Deterministic image: 40% zero pages, the rest pseudo-random.
rng = random.Random(1)
with open(img, "wb") as f:
    for _ in range(size // 4096):
        f.write(b"\0" * 4096 if rng.random() < 0.40 else rng.randbytes(4096))

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

class Qemu:
    def __init__(self, name, mem_path, incoming=None):
        self.sock = os.path.join(tmp, name + ".qmp")
        args = ["qemu-system-x86_64", "-M", "none,memory-backend=m0", "-accel", "tcg", "-object",
                f"memory-backend-file,id=m0,size={size},mem-path={mem_path},share=on", "-nodefaults",
                "-display", "none", "-serial", "none", "-monitor", "none", "-qmp",
                f"unix:{self.sock},server=on,wait=off"]
        if incoming:
            args += ["-incoming", "defer"]
        self.p = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        for _ in range(500):
            try:
                self.s = socket.socket(socket.AF_UNIX); self.s.connect(self.sock); break
            except OSError:
                time.sleep(0.01)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.cmd("qmp_capabilities")
    def cmd(self, name, **a):
        self.f.write(json.dumps({"execute": name, "arguments": a} if a else {"execute": name}) + "\n"); self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r: return r["return"]
            if "error" in r: raise RuntimeError(f"{name}: {r['error']}")
    def close(self):
        self.p.kill(); self.p.wait()

def dest(channels):
    ram = os.path.join(tmp, "dest.ram")
    with open(ram, "wb") as f: f.truncate(size)
    d = Qemu("dest", ram, incoming=True)
    d.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    d.cmd("migrate-set-parameters", **{"multifd-channels": channels})
    port = free_port()
    d.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
    return d, port, ram

def wait_done(d, t0):
    while True:
        st = d.cmd("query-migrate").get("status")
        if st == "completed": return time.monotonic() - t0
        if st == "failed": raise RuntimeError("destination failed")
        time.sleep(0.005)

def check(ram):
    with open(ram, "rb") as a, open(img, "rb") as b:
        while True:
            x, y = a.read(1 << 20), b.read(1 << 20)
            if x != y: raise RuntimeError("destination RAM differs from the image")
            if not x: return

def ours(channels):
    d, port, ram = dest(channels)
    t0 = time.monotonic()
    p = subprocess.Popen(["./target/release/multifd", "send", "--connect", f"127.0.0.1:{port}", "--channels",
                          str(channels), "--image", f"{img}:m0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t = wait_done(d, t0)
    assert p.wait() == 0
    d.close(); check(ram); return t

def qemu(channels):
    d, port, ram = dest(channels)
    s = Qemu("src", img)
    s.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    s.cmd("migrate-set-parameters", **{"multifd-channels": channels, "max-bandwidth": 68719476736})
    t0 = time.monotonic()
    s.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    t = wait_done(d, t0)
    s.close(); d.close(); check(ram); return t

print(f"image {size_mib} MiB, 40% zero pages, {runs} runs each, interleaved")
print("channels  ours_median_s  qemu_median_s  ours/qemu_time  ours_MiB/s  qemu_MiB/s")
for ch in (1, 2, 4):
    o, q = [], []
    for _ in range(runs):
        o.append(ours(ch)); q.append(qemu(ch))
    mo, mq = statistics.median(o), statistics.median(q)
    print(f"{ch:>8}  {mo:>13.3f}  {mq:>13.3f}  {mo/mq:>14.2f}  {size_mib/mo:>10.0f}  {size_mib/mq:>10.0f}", flush=True)
subprocess.run(["rm", "-rf", tmp])
PY
