#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Ours over peer, per run and the median of the runs, from criterion's output.

    python3 benches/ratios.py run1.log run2.log ...

Each log is the output of one `cargo bench` run. Each benchmark of this crate
(an id with a `PrivateMemoryManager...` component) is paired with its peer in the same
run: the id with `GuestMemoryMmap...` or `raw_...` in that place (and the same rest, or
none). The ratio is ours / peer of criterion's median time (above 1: ours is slower;
for a throughput, its inverse is ours / peer). The median of the runs' ratios is what
BENCHMARKS.md records, with the runs' own peer and ours medians alongside.
"""
import re
import statistics
import sys

UNITS = {"ps": 1e-3, "ns": 1.0, "µs": 1e3, "us": 1e3, "ms": 1e6, "s": 1e9}
TIME = re.compile(r"time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]")


def medians(path):
    """{id: median time in ns} of one criterion run."""
    out, last_id = {}, None
    for line in open(path, encoding="utf-8", errors="replace"):
        line = line.rstrip("\n")
        m = TIME.search(line)
        head = line.split("time:")[0].strip()
        if head and not line.startswith(" "):
            last_id = head
        elif line and not line.startswith(" ") and "time:" not in line:
            last_id = line.strip()
        if m and last_id:
            if last_id in out:
                print(f"{path}: {last_id} twice; the last one counts", file=sys.stderr)
            out[last_id] = float(m.group(1)) * UNITS[m.group(2)]
    return out


def ours_at(ident):
    """Where in `ident` this crate's component is."""
    return next(k for k, p in enumerate(ident.split("/")) if p.startswith("PrivateMemoryManager"))


def peer_of(ours, ids):
    parts = ours.split("/")
    i = ours_at(ours)
    fallback = None
    for other in ids:
        q = other.split("/")
        if len(q) <= i or q[:i] != parts[:i]:
            continue
        if not (q[i].startswith("GuestMemoryMmap") or q[i].startswith("raw_")):
            continue
        if q[i + 1:] == parts[i + 1:]:
            return other
        if q[i + 1:] == []:
            fallback = other
    return fallback


def main():
    runs = [medians(p) for p in sys.argv[1:]]
    if not runs:
        sys.exit(__doc__)
    every = list(dict.fromkeys(i for run in runs for i in run))
    ids = [i for i in every if any(p.startswith("PrivateMemoryManager") for p in i.split("/"))]
    for ours in ids:
        peer = peer_of(ours, every)
        if peer is None:
            continue
        ratios, cells = [], []
        for run in runs:
            if ours in run and peer in run:
                r = run[ours] / run[peer]
                ratios.append(r)
                cells.append(f"{run[peer]:.1f}/{run[ours]:.1f}={r:.3f}")
        if ratios:
            print(f"{ours}  vs {peer.split('/')[ours_at(ours)]}")
            print(f"    runs (peer ns/ours ns=ratio): {'  '.join(cells)}")
            print(f"    median time ratio {statistics.median(ratios):.3f}"
                  f"  (throughput ours/peer {1 / statistics.median(ratios):.3f})")


if __name__ == "__main__":
    main()
