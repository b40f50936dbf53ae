"""Benchmark: the nightly incremental catalogue versus `find` on the same tree.

Builds (once) a tree of --files files in --dirs directories, a ledger that knows all of them
(as if an earlier night had uploaded them), then adds --new files, and measures, each in a
fresh process with /usr/bin/time (wall seconds, peak RSS), side by side in one run:

  find     find ROOT -type f -printf '%s %T@ %p\\n' > /dev/null
  nightly  catalogue.walk(source, keep=UnchangedFilter(ledger)): what `dac-upload nightly`
           runs before planning; it must find exactly the --new files
  full     catalogue.walk(source): the same walk without the ledger (holds every entry)

    python tests/benchmarks/incremental_scan.py --files 1000000 --new 1000

The tree is kept in --dir for later runs (delete it to rebuild). Page cache warm: one `find`
runs first and is not counted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SCAN = r"""
import sys, time
from pathlib import Path
from dac_upload.catalogue import walk
from dac_upload.config import SourceConfig
from dac_upload.ledger import Ledger, UnchangedFilter
root, ledger_path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
source = SourceConfig(root=Path(root), include=("**/*",), exclude=(), symlinks="follow")
if mode == "nightly":
    with Ledger(Path(ledger_path)) as ledger:
        keep = UnchangedFilter(ledger)
        cat = walk(source, keep=keep)
        print(cat.file_count, keep.unchanged)
else:
    cat = walk(source)
    print(cat.file_count, 0)
"""


def build(base: Path, files: int, dirs: int) -> tuple[Path, Path]:
    root, ledger_path = base / "tree", base / "ledger.sqlite"
    marker = base / f"built-{files}-{dirs}"
    if marker.exists():
        return root, ledger_path
    shutil.rmtree(base, ignore_errors=True)
    root.mkdir(parents=True)
    t0 = time.monotonic()
    per_dir = -(-files // dirs)
    for d in range(dirs):
        sub = root / f"visit{d:05d}"
        sub.mkdir()
        for i in range(min(per_dir, files - d * per_dir)):
            with open(sub / f"calexp_{i:05d}.fits", "wb") as fh:
                fh.write(b"x" * (i % 7))
    print(f"built {files:,} files in {dirs:,} dirs in {time.monotonic() - t0:.0f} s",
          flush=True)
    from dac_upload.ledger import Ledger

    t0 = time.monotonic()
    with Ledger(ledger_path) as ledger:
        for d in sorted(root.iterdir()):
            rows = []
            with os.scandir(d) as it:
                for e in it:
                    st = e.stat()
                    rel = f"{d.name}/{e.name}"
                    rows.append({"relpath": rel, "size": st.st_size, "mtime": st.st_mtime,
                                 "name": rel, "status": "uploaded"})
            ledger.record(rows, "bench")
    print(f"ledger of {files:,} rows in {time.monotonic() - t0:.0f} s", flush=True)
    marker.touch()
    return root, ledger_path


def add_new(root: Path, new: int) -> None:
    night = root / "visit-new"
    shutil.rmtree(night, ignore_errors=True)
    night.mkdir()
    for i in range(new // 2):
        (night / f"new_{i:05d}.fits").write_bytes(b"new")
    for i, d in enumerate(sorted(p for p in root.iterdir() if p.name != "visit-new")):
        if i >= new - new // 2:
            break
        (d / "late_arrival.fits").write_bytes(b"late")


def timed(cmd: list[str], stdout: int | None = subprocess.DEVNULL) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stdout) of cmd in a fresh process."""
    out = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], stdout=subprocess.PIPE
                         if stdout is None else stdout, stderr=subprocess.PIPE, text=True,
                         check=True)
    wall, rss_kb = out.stderr.strip().splitlines()[-1].split()
    return float(wall), int(rss_kb) / 1024, out.stdout or ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--new", type=int, default=1_000)
    ap.add_argument("--dirs", type=int, default=1_000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dac-upload-bench"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    root, ledger_path = build(args.dir, args.files, args.dirs)
    add_new(root, args.new)
    total = sum(1 for _ in root.rglob("*.fits"))
    find = ["find", str(root), "-type", "f", "-printf", r"%s %T@ %p\n"]
    py = [sys.executable, "-c", SCAN, str(root), str(ledger_path)]
    subprocess.run(find, stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    results: dict[str, list[tuple[float, float]]] = {"find": [], "nightly": [], "full": []}
    found = ""
    for _ in range(args.repeat):
        wall, rss, _ = timed(find)
        results["find"].append((wall, rss))
        wall, rss, found = timed([*py, "nightly"], stdout=None)
        results["nightly"].append((wall, rss))
        wall, rss, _ = timed([*py, "full"], stdout=None)
        results["full"].append((wall, rss))
    kept, unchanged = (int(x) for x in found.split())
    assert kept == args.new and unchanged == total - args.new, (kept, unchanged, total)
    best = {k: min(v) for k, v in results.items()}
    print(f"tree: {total:,} files in {args.dirs + 1:,} directories, {args.new:,} new; "
          f"best of {args.repeat}; command: {' '.join(sys.argv)}")
    print(f"{'':8} {'seconds':>8} {'files/s':>12} {'peak RSS MB':>12} {'time / find':>12}")
    for name, (wall, rss) in best.items():
        print(f"{name:8} {wall:8.2f} {total / wall:12,.0f} {rss:12.1f} "
              f"{wall / best['find'][0]:12.2f}")
    print(f"nightly found exactly the {kept:,} new files and skipped {unchanged:,} unchanged")


if __name__ == "__main__":
    main()
