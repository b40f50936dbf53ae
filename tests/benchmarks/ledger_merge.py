"""Benchmark: the collector's ledger writes, side by side: a run's rows inserted as they come
(Ledger.record_rows in one transaction) against the collector's way (Ledger.stage_rows:
appended, merged in key order every MERGE_EVERY rows), into a new ledger.

The rows are those of a tree of 5,000 files per directory, in a shuffled order, 1,000 per
call: as a collector gets them, each task's files spread over the whole tree (files dealt
by size). Each method in a fresh process; wall seconds and peak RSS of that process (the
row tuples it makes are a part of it).

    python tests/benchmarks/ledger_merge.py --rows 1000000 5000000 [--staged-only 10000000]
    python tests/benchmarks/ledger_merge.py --small        # 20,000 rows: that it works (CI)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ONE = r"""
import os, random, resource, sys, time
from pathlib import Path
from dac_upload.ledger import Ledger
n, how, path = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
order = list(range(n))
random.Random(1).shuffle(order)
def rows(chunk):
    return [(f"more/visit{k // 5000:05d}/calexp_{k % 5000:05d}.fits", 1000 + k, 1.7e9 + k,
             f"scale/more/visit{k // 5000:05d}/calexp_{k % 5000:05d}.fits", "uploaded")
            for k in chunk]
path.unlink(missing_ok=True)
t0 = time.monotonic()
with Ledger(path) as ledger:
    for i in range(0, n, 1000):
        if how == "staged":
            ledger.stage_rows(rows(order[i:i + 1000]), "bench")
        else:
            ledger.record_rows(rows(order[i:i + 1000]), "bench", commit=False)
    t1 = time.monotonic()
    ledger.commit()
    assert ledger.counts() == {"uploaded": n}
t2 = time.monotonic()
print(t2 - t0, t2 - t1, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def measure(rows: int, how: str, path: Path) -> tuple[float, float, float]:
    """(wall seconds, of which the commit, peak RSS in MB)."""
    out = subprocess.run([sys.executable, "-c", ONE, str(rows), how, str(path)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{how} at {rows:,} rows failed:\n{out.stderr}")
    wall, tail, rss = out.stdout.split()
    return float(wall), float(tail), int(rss) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000])
    ap.add_argument("--staged-only", type=int, nargs="*", default=[],
                    help="sizes measured only the collector's way (as they come is slow)")
    ap.add_argument("--small", action="store_true", help="20,000 rows: that it works")
    ap.add_argument("--dir", type=Path, help="where the ledger goes (default: a temp dir)")
    a = ap.parse_args()
    sizes = [20_000] if a.small else a.rows
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        path = Path(tmp) / "ledger.sqlite"
        print(f"  {'rows':>11}  {'as they come':>22}  {'staged, merged in order':>30}  ratio")
        for n in sizes + ([] if a.small else a.staged_only):
            staged = measure(n, "staged", path)
            right = f"{staged[0]:7.1f} s (commit {staged[1]:4.1f} s) {staged[2]:5.0f} MB"
            if n in a.staged_only and n not in sizes:
                print(f"  {n:>11,}  {'-':>22}  {right:>30}", flush=True)
                continue
            old = measure(n, "as-they-come", path)
            left = f"{old[0]:7.1f} s {old[2]:5.0f} MB"
            print(f"  {n:>11,}  {left:>22}  {right:>30}  {old[0] / staged[0]:5.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
