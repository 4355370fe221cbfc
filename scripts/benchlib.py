"""Shared pieces of the benchmark scripts (scripts/bench-*.sh): the guest image, QEMU processes and
their QMP sockets, `multifd recv` / `multifd send` processes, CPU accounting and result tables.

Times are wall-clock unix times (time.time()) so that timestamps printed by our binaries
("... at unix time T") and by this script compare directly.
"""
import json
import os
import random
import resource
import re
import socket
import statistics
import subprocess
import threading
import time

PAGE = 4096
TICK = os.sysconf("SC_CLK_TCK")


def make_image(path, mib):
    """A deterministic guest image: about 40% zero pages, the rest random. Reused if present."""
    if os.path.exists(path) and os.path.getsize(path) == mib << 20:
        return
    rng = random.Random(1)
    zero = bytes(PAGE)
    with open(path + ".tmp", "wb") as f:
        for _ in range((mib << 20) // (PAGE * 256)):
            chunk = bytearray()
            for _ in range(256):
                chunk += zero if rng.random() < 0.4 else os.urandom(PAGE)
            f.write(chunk)
    os.rename(path + ".tmp", path)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        for _ in range(1000):
            try:
                self.s.connect(path)
                break
            except OSError:
                time.sleep(0.01)
        else:
            raise RuntimeError(f"QMP socket {path} never came up")
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


class Qemu:
    """A `qemu-system-x86_64 -M none` process with guest RAM backend `backend` (a -object string)."""

    def __init__(self, work, tag, backend, incoming=False):
        sock = os.path.join(work, f"qmp-{tag}.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        args = ["qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-display", "none", "-serial", "none",
                "-monitor", "none", "-qmp", f"unix:{sock},server=on,wait=off", "-M", "none,memory-backend=m0",
                "-object", backend]
        if incoming:
            args += ["-incoming", "defer"]
        self.p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.q = Qmp(sock)

    def cmd(self, name, args=None):
        return self.q.cmd(name, args)

    def cpu(self):
        return proc_cpu(self.p.pid)

    def multifd(self, channels, **params):
        self.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]})
        self.cmd("migrate-set-parameters", {"multifd-channels": channels, **params})

    def wait_status(self, want, timeout=120):
        end = time.time() + timeout
        while time.time() < end:
            st = self.cmd("query-migrate").get("status")
            if st == want:
                return time.time()
            if st == "failed":
                raise RuntimeError("QEMU reports the migration failed")
            time.sleep(0.002)
        raise RuntimeError(f"no {want} within {timeout} s")

    def stop(self):
        try:
            self.cmd("quit")
        except Exception:
            pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def qemu_source(work, image, mib, channels):
    """A QEMU source whose RAM is the image file (shared mapping), multifd on, bandwidth unlimited."""
    q = Qemu(work, "src", f"memory-backend-file,id=m0,size={mib}M,mem-path={image},share=on")
    q.multifd(channels, **{"max-bandwidth": 64 << 30, "zero-page-detection": "multifd"})
    return q


def qemu_dest(work, mib, channels, prealloc):
    """A QEMU destination with anonymous RAM (fresh, or `prealloc=on`), listening; returns (qemu, port)."""
    backend = f"memory-backend-ram,id=m0,size={mib}M" + (",prealloc=on" if prealloc else "")
    q = Qemu(work, "dst", backend, incoming=True)
    q.multifd(channels)
    port = free_port()
    q.cmd("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
    return q, port


def start_migration(src, port):
    t0 = time.time()
    src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    return t0


def proc_cpu(pid):
    """(user, system) CPU seconds of a live process, from /proc (10 ms resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


class Recv:
    """A `multifd recv` process on a free loopback port (written to a port file)."""

    def __init__(self, binary, work, channels, prealloc_mib=None):
        self.out = os.path.join(work, "out")
        portf = os.path.join(work, "port")
        if os.path.exists(portf):
            os.unlink(portf)
        args = [binary, "-v", "recv", "--listen", "127.0.0.1:0", "--channels", str(channels), "--out", self.out,
                "--port-file", portf, "--json"]
        if prealloc_mib:
            args += ["--prealloc", f"m0:{prealloc_mib}M"]
        self.p = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        while not os.path.exists(portf):
            if self.p.poll() is not None:
                raise RuntimeError(f"multifd recv exited early: {self.p.stderr.read()}")
            time.sleep(0.002)
        time.sleep(0.001)
        self.port = int(open(portf).read())
        self.cpu0 = proc_cpu(self.p.pid)

    def finish(self, timeout=120):
        """Waits for the exit; returns (all-pages-received unix time, (user, sys) cpu since start, report)."""
        out, err = self.p.communicate(timeout=timeout)
        if self.p.returncode != 0:
            raise RuntimeError(f"multifd recv failed: {err.strip().splitlines()[-1] if err.strip() else '?'}")
        m = re.search(r"all pages received at unix time ([0-9.]+) \(cpu user ([0-9.]+) s, sys ([0-9.]+) s\)", err)
        if not m:
            raise RuntimeError(f"multifd recv printed no completion time: {err}")
        at, user, sys_ = float(m.group(1)), float(m.group(2)), float(m.group(3))
        cpu = (user - self.cpu0[0], sys_ - self.cpu0[1])
        return at, cpu, json.loads(out.strip().splitlines()[-1])

    def block_file(self):
        return os.path.join(self.out, "m0.bin")


def run_send(binary, port, channels, image):
    """Starts `multifd send`; returns the process (stderr piped: its "connecting at" line is the start)."""
    return subprocess.Popen([binary, "-v", "send", "--connect", f"127.0.0.1:{port}", "--channels", str(channels),
                             "--image", f"{image}:m0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def send_started(proc, timeout=120):
    """Waits for `multifd send` to exit 0; returns the unix time it started connecting."""
    _, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"multifd send failed: {err.strip().splitlines()[-1] if err.strip() else '?'}")
    m = re.search(r"connecting at unix time ([0-9.]+)", err)
    if not m:
        raise RuntimeError(f"multifd send printed no start time: {err}")
    return float(m.group(1))


def same_file(a, b):
    """True when the two files hold the same bytes (cmp(1): several times faster than Python here)."""
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


class ChildCpu:
    """CPU seconds (user, system) of every child process reaped between start() and stop(): both ends
    of a migration run by this script, each counted over its whole life (so including its setup)."""

    def __init__(self):
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.u0, self.s0 = r.ru_utime, r.ru_stime

    def stop(self):
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime - self.u0, r.ru_stime - self.s0


def discard_sink(channels):
    """A listener that reads and drops every byte of channels+1 connections; returns (port, wait) where
    wait() blocks until every connection ended and returns the last EOF's unix time."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    ends, threads = [], []

    def reader(c):
        buf = bytearray(1 << 20)
        while c.recv_into(buf):
            pass
        ends.append(time.time())

    def acceptor():
        for _ in range(channels + 1):
            c, _ = ls.accept()
            t = threading.Thread(target=reader, args=(c,))
            t.start()
            threads.append(t)

    a = threading.Thread(target=acceptor)
    a.start()

    def wait():
        a.join()
        for t in threads:
            t.join()
        ls.close()
        return max(ends)

    return ls.getsockname()[1], wait


def steal_ticks():
    """(steal, all) clock ticks of every CPU since boot, from /proc/stat: time the hypervisor gave this
    VM's vCPUs to someone else (the 8th field), which every wall-clock figure here silently includes."""
    with open("/proc/stat") as f:
        xs = [int(x) for x in f.readline().split()[1:]]
    return xs[7] if len(xs) > 7 else 0, sum(xs[:8])


def steal_share(a, b):
    """Percent of all CPU ticks between two `steal_ticks()` readings that were stolen (0 if none passed)."""
    d = b[1] - a[1]
    return 100.0 * (b[0] - a[0]) / d if d > 0 else 0.0


class Runs:
    """Collects timed runs per (variant, channels); failed runs are printed and counted, never hidden."""

    def __init__(self):
        self.t = {}
        self.extra = {}
        self.reps = {}
        self.failures = []

    def run(self, rep, ch, name, fn):
        st0 = steal_ticks()
        try:
            r = fn(ch)
        except Exception as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            self.failures.append(f"rep {rep} channels {ch} {name}: {msg}")
            print(f"rep {rep} channels {ch} {name:12s} FAILED: {msg}", flush=True)
            return
        t, extra = r if isinstance(r, tuple) else (r, {})
        extra = dict(extra, **{"steal_%": steal_share(st0, steal_ticks())})
        self.t.setdefault((name, ch), []).append(t)
        self.reps.setdefault((name, ch, None), []).append((rep, t))
        for k, v in extra.items():
            self.extra.setdefault((name, ch, k), []).append(v)
            self.reps.setdefault((name, ch, k), []).append((rep, v))
        more = " ".join(f"{k}={v:.3f}" for k, v in extra.items())
        print(f"rep {rep} channels {ch} {name:12s} {t:.3f} s {more}", flush=True)

    def median(self, name, ch, key=None):
        xs = self.t.get((name, ch)) if key is None else self.extra.get((name, ch, key))
        return statistics.median(xs) if xs else float("nan")

    def paired(self, now, base, ch, key=None, boot=2000):
        """Per-repetition ratios now/base (the two ran seconds apart in the same repetition): a dict with
        the median, the quartiles, a bootstrap 95% interval of the median, how many were > 1, and the
        ratio of the two variants' minima over the same repetitions with its bootstrap 95% interval
        (noise on this VM only adds time, so the least time is the steadiest estimate of a cost)."""
        a, b = dict(self.rep_values(now, ch, key)), dict(self.rep_values(base, ch, key))
        pairs = [(a[i], b[i]) for i in a if i in b and b[i] > 0]
        r = [x / y for x, y in pairs]
        if len(r) < 4:
            return None
        rng = random.Random(7)
        meds, mins = [], []
        for _ in range(boot):
            sample = rng.choices(pairs, k=len(pairs))
            meds.append(statistics.median(x / y for x, y in sample))
            mins.append(min(x for x, _ in sample) / min(y for _, y in sample))
        meds.sort()
        mins.sort()
        q = statistics.quantiles(r, n=4)
        lo, hi = int(0.025 * boot), int(0.975 * boot) - 1
        return {"n": len(r), "median": statistics.median(r), "q1": q[0], "q3": q[2], "lo": meds[lo], "hi": meds[hi],
                "slower": sum(x > 1 for x in r), "min": min(x for x, _ in pairs) / min(y for _, y in pairs),
                "min_lo": mins[lo], "min_hi": mins[hi]}

    def rep_values(self, name, ch, key=None):
        return self.reps.get((name, ch, key), [])

    def paired_table(self, pairs, channels):
        """Prints the before/after table, one row per (pair, channels, measure); pairs are
        (now, base, ((key or None for the time, label), ...))."""
        print("| channels | variant | measure | now/base median | IQR | 95% interval of the median | slower in "
              "| ratio of minima | its 95% interval | steal % now, base (medians) |")
        print("|---:|---|---|---:|---|---|---:|---:|---|---|")
        for now, base, keys in pairs:
            for ch in channels:
                for key, label in keys:
                    p = self.paired(now, base, ch, key)
                    if p is None:
                        continue
                    print(f"| {ch} | {now} | {label} | {p['median']:.3f} | {p['q1']:.3f}-{p['q3']:.3f} | "
                          f"{p['lo']:.3f}-{p['hi']:.3f} | {p['slower']}/{p['n']} | {p['min']:.3f} | "
                          f"{p['min_lo']:.3f}-{p['min_hi']:.3f} | {self.median(now, ch, 'steal_%'):.1f}, "
                          f"{self.median(base, ch, 'steal_%'):.1f} |")

    def report_failures(self):
        print(f"\nfailed runs: {len(self.failures)}")
        for f in self.failures:
            print("  " + f)
