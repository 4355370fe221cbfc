#!/usr/bin/env python3
"""Code lines of the two receive drivers outside the std shim (issue 14: at most 120 each).

A driver is the section of its file that starts at the line `// The receive driver...` and runs to
the next `// -----` section line or the end of the file; blank lines and comment lines are not
counted. Checks on the harness's invariants and the firmware's fault injector sit in sections of
their own. Exits 1 if a driver is longer than the limit. Usage: driver-lengths.py [LIMIT]"""
import sys

LIMIT = int(sys.argv[1]) if len(sys.argv) > 1 else 120
DRIVERS = ["firmware-demo/src/migration.rs", "fuzz/common/engine_harness.rs"]


def driver_lines(path):
    lines = open(path, encoding="utf-8").read().splitlines()
    starts = [i for i, l in enumerate(lines) if l.startswith("// The receive driver")]
    if len(starts) != 1:
        sys.exit(f"{path}: expected one '// The receive driver' section line, found {len(starts)}")
    body = []
    for l in lines[starts[0] + 1:]:
        if l.startswith("// -----"):
            break
        body.append(l)
    return sum(1 for l in body if l.strip() and not l.strip().startswith("//"))


worst = 0
for path in DRIVERS:
    n = driver_lines(path)
    worst = max(worst, n)
    print(f"{n:4} lines  {path} (receive driver)")
print(f"driver-lengths: longest {worst} lines, limit {LIMIT}")
sys.exit(1 if worst > LIMIT else 0)
