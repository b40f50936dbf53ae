"""Benchmark: what Butler zips ([packing] in a Butler job) cost the planner, side by side in
one run: a [[butler.map]] tree of --files small YAML files (200 per directory), planned
offline as it is (the files loose, for `butler ingest-files`) and packed (each archive's
`_butler_zip_index.json` made by daf_butler's ZipIndex at planning), each in a fresh
process, beside `find` over the same tree:

    $DAC_CI_DIR/venv/bin/python tests/benchmarks/butler_zips.py --files 200000
    $DAC_CI_DIR/venv/bin/python tests/benchmarks/butler_zips.py --small      # CI: it works

Prints wall seconds and peak RSS of each, the manifests' bytes per file, and the ratios
packed / loose and packed / find. Needs lsst-daf-butler (the [butler] extra); no services.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
PER_DIR = 200
MAP = """
[[butler.map]]
dataset_type = "rawcfg"
run = "Cam/raw"
path = 'raw/(?P<instrument>[A-Za-z]+)/e(?P<exposure>\\d+)/d(?P<detector>\\d+)\\.yaml'
storage_class = "StructuredDataDict"
formatter = "lsst.daf.butler.formatters.yaml.YamlFormatter"
"""


def make_tree(root: Path, n: int) -> None:
    """n files of about 30 bytes, 200 per exposure directory; kept for the next run."""
    mark = root / f".complete-{n}"
    if mark.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    for i in range(n):
        e, d = divmod(i, PER_DIR)
        path = root / "raw" / "Cam" / f"e{e}" / f"d{d}.yaml"
        if d == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"exposure: {e}\ndetector: {d}\n")
    mark.touch()


def job_file(base: Path, name: str, packed: bool) -> Path:
    text = f"""[source]
root = "tree"
exclude = [".complete-*"]
[rucio]
scope = "user.bench"
rse = "BENCH_RSE"
host = "http://rucio.invalid"
[naming]
prefix = "bench/"
[batching]
files_per_batch = 10000
[container]
runtime = "none"
python = "{sys.executable}"
""" + MAP + ('[packing]\nbelow = "1 MiB"\n' if packed else "")
    path = base / f"{name}.toml"
    path.write_text(text)
    shutil.rmtree(base / name, ignore_errors=True)
    return path


def measured(args: list[str], base: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one process, by GNU time."""
    out = base / "time.txt"
    proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", str(out), *args],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{proc.stderr}")
    wall, kb = out.read_text().split()[-2:]
    return float(wall), int(kb) / 1024


def manifest_bytes(base: Path, name: str) -> int:
    return sum(p.stat().st_size for p in (base / name).glob("runs/*/manifests/*.json"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=200_000)
    ap.add_argument("--small", action="store_true", help="2,000 files (CI)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dac-upload-zipbench"))
    a = ap.parse_args()
    n = 2_000 if a.small else a.files
    base = a.dir
    base.mkdir(parents=True, exist_ok=True)
    make_tree(base / "tree", n)
    subprocess.run(["find", str(base / "tree"), "-type", "f"], check=True,
                   stdout=subprocess.DEVNULL)          # the page cache warm for all three
    rows = []
    find = measured(["find", str(base / "tree"), "-type", "f", "-printf", "%s %T@ %p\\n"],
                    base)
    rows.append(("find", *find, None))
    for name, packed in (("loose", False), ("packed", True)):
        job = job_file(base, name, packed)
        wall, rss = measured([str(BIN / "dac-upload"), "plan", "--offline", str(job)], base)
        rows.append((f"plan {name}", wall, rss, manifest_bytes(base, name) / n))
    print(f"{n:,} files of a [[butler.map]] tree, planned offline "
          f"(dac-upload plan --offline JOB):")
    for what, wall, rss, per_file in rows:
        extra = f", manifests {per_file:,.0f} bytes per file" if per_file else ""
        print(f"  {what:<12}: {wall:7.2f} s, peak RSS {rss:,.0f} MB{extra}")
    (_, f_s, _, _), (_, l_s, _, _), (_, p_s, _, _) = rows
    f_s = max(f_s, 0.01)    # GNU time's resolution
    print(f"  packed / loose: {p_s / l_s:.2f}x the time; packed / find: {p_s / f_s:.1f}x; "
          f"the Butler zip indexes cost {(p_s - l_s) / n * 1e6:.0f} us per file")
    if a.small:
        shutil.rmtree(base, ignore_errors=True)
    os.sync()


if __name__ == "__main__":
    main()
