#!/usr/bin/env python3
"""Lengths of the non-test functions in std-shim/src (from the `fn` line to its closing brace).

Prints the longest ones and exits 1 if any is longer than the limit (default 80 lines). Test code
is skipped: a `#[cfg(test)]` item and everything inside it. Usage: fn-lengths.py [LIMIT] [DIR]"""
import os
import re
import sys

LIMIT = int(sys.argv[1]) if len(sys.argv) > 1 else 80
ROOT = sys.argv[2] if len(sys.argv) > 2 else "std-shim/src"
FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+\"[^\"]*\"\s+)?fn\s+(\w+)")


def strip(line):
    """The line without string literals, char literals and a trailing // comment (enough for braces)."""
    line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
    line = re.sub(r"'(\\.|[^'\\])'", "''", line)
    return line.split("//", 1)[0]


def functions(path):
    lines = open(path, encoding="utf-8").read().splitlines()
    out, i, skip_depth, depth, pending_test = [], 0, None, 0, False
    while i < len(lines):
        raw = lines[i]
        code = strip(raw)
        if skip_depth is None and re.match(r"^\s*#\[cfg\((all\()?test", raw):
            pending_test = True
        m = FN.match(code)
        if m and skip_depth is None and not pending_test and "{" in "".join(strip(l) for l in lines[i:i + 40]):
            # Find the body's braces from this line on.
            d, j, opened = 0, i, False
            while j < len(lines):
                c = strip(lines[j])
                if not opened and ";" in c and "{" not in c and d == 0 and j > i and c.strip().endswith(";"):
                    break  # a declaration without a body (trait item)
                d += c.count("{") - c.count("}")
                opened = opened or "{" in c
                if opened and d == 0:
                    out.append((j - i + 1, m.group(7), path, i + 1))
                    break
                j += 1
        if pending_test and "{" in code:
            skip_depth = depth
            pending_test = False
        elif pending_test and code.strip().endswith(";"):
            pending_test = False
        depth += code.count("{") - code.count("}")
        if skip_depth is not None and depth <= skip_depth:
            skip_depth = None
        i += 1
    return out


found = []
for d, _, files in os.walk(ROOT):
    for f in files:
        if f.endswith(".rs") and not f.endswith("tests.rs"):
            found += functions(os.path.join(d, f))
found.sort(reverse=True)
for n, name, path, line in found[:8]:
    print(f"{n:4d} lines  {path}:{line}  fn {name}")
over = [f for f in found if f[0] > LIMIT]
print(f"fn-lengths: {len(found)} functions in {ROOT}, longest {found[0][0] if found else 0} lines, "
      f"{len(over)} over {LIMIT}")
sys.exit(1 if over else 0)
