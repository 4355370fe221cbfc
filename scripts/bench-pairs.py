#!/usr/bin/env python3
"""Paired before/after ratios from a bench-recv.sh or bench-migrate.sh log run with MULTIFD_BENCH_BASE.

Usage: scripts/bench-pairs.py LOG NOW:BASE...   e.g. recv:recv_base prealloc:prealloc_base
For each pair of variants and channel count: the median of the per-repetition ratios NOW/BASE (both
ran within seconds of each other), their interquartile range, and in how many repetitions NOW was
slower (BENCHMARKS.md "Before and after the receive session").
"""
import re
import statistics
import sys

times = {}
for line in open(sys.argv[1]):
    m = re.match(r"rep (\d+) channels (\d+) (\S+)\s+([0-9.]+) s", line)
    if m:
        times[(int(m[1]), int(m[2]), m[3])] = float(m[4])
reps = sorted({k[0] for k in times})
for pair in sys.argv[2:]:
    now, base = pair.split(":")
    for ch in sorted({k[1] for k in times}):
        r = [times[(i, ch, now)] / times[(i, ch, base)] for i in reps if (i, ch, now) in times and (i, ch, base) in times]
        if len(r) < 2:
            continue
        q = statistics.quantiles(r, n=4)
        slower = sum(x > 1 for x in r)
        print(f"{now}/{base} channels {ch}: median {statistics.median(r):.3f} IQR {q[0]:.3f}-{q[2]:.3f}, slower in {slower}/{len(r)}")
