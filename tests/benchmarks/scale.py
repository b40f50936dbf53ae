"""Benchmark: a run's bookkeeping at millions of files, each step side by side with `find`.

For each --files N it builds (once, kept in --dir) a tree of N sparse files (5,000 per
directory, sizes 1 KiB - 1 GiB log-uniform, made by ftruncate: no data blocks) and a job
file, then measures each step in a fresh process (wall seconds; CPU seconds of all its
processes; peak RSS of its largest process):

  find      find ROOT -type f -printf '%s %T@ %p\\n' > /dev/null (the anchor of plan)
  plan      dac-upload plan --offline JOB (the walk included)

then fills results/ as the array tasks would, with the worker's own code: each file's
record made by upload.common.not_attempted and completed as the bulk path completes an uploaded
file, appended by files.JsonlAppender; each task's marker with upload.task.task_index. Then:

  json      one json.loads per result line, over every task's results (the anchor of
            collect: the least any reader of the records does)
  collect   dac-upload collect RUN (summary.json, the ledger, collected.json)
  status    dac-upload status RUN, and status RUN --json
  resubmit  what resubmit computes before submitting (runview.run_view, tasks_to_retry)

With --big-task N (N one of the --files sizes) it also plans that tree as one task of N
files, fills its one results file (several GB at 5M), cuts one record in the middle short
(as a kill that a later attempt ended with a newline leaves it), and collects: the line is
reported, every other record kept (checked in summary.json's counts).

    python tests/benchmarks/scale.py --files 1000000 5000000 10000000 --big-task 5000000
    python tests/benchmarks/scale.py --small          # 3,000 files: that it works (CI)
    python tests/benchmarks/scale.py --repeating-sizes --dir /tmp/dac-upload-scale-r ...

collect's peak RSS is that of the larger of its two processes (the summary's, and the
ledger's writer, which holds at most SQLite's 64 MB page cache besides the rows in hand).

Page cache warm: the tree is walked once by `find` before anything is counted.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

PER_DIR = 5000

# run in a child: peak RSS (ru_maxrss, KiB) of the command it runs (its largest process),
# and the CPU seconds of all its processes (user + system; collect's forked ledger writer
# included: it is waited for)
MEASURE = r"""
import resource, subprocess, sys, time
t0 = time.monotonic()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode
wall = time.monotonic() - t0
use = resource.getrusage(resource.RUSAGE_CHILDREN)
print(rc, wall, use.ru_maxrss, use.ru_utime + use.ru_stime)
"""

FILL = r"""
import sys
from pathlib import Path
from dac_upload.files import JsonlAppender, atomic_write_json, read_manifest, utc_now
from dac_upload.runrecord import RunLayout
from dac_upload.runrecord import STORAGE_VERIFIED, UPLOADED, RunRecord
from dac_upload.upload.common import not_attempted
from dac_upload.upload.task import task_index
from dac_upload.files import read_json
run_dir = Path(sys.argv[1])
layout = RunLayout(run_dir)
run = read_json(layout.run_json)
s = RunRecord(run).task_settings()
layout.results.mkdir(exist_ok=True)
for task in range(int(run["plan"]["tasks"])):
    manifest = read_manifest(layout.manifest(task))
    with JsonlAppender(layout.result(task), sync_every=60.0) as out:
        for i, entry in enumerate(manifest["files"]):
            rec = not_attempted(s, entry, "", "")
            rec.update(status=UPLOADED, cause=None, error=None, adler32=f"{i:08x}",
                       md5=f"{i:032x}", pfn=f"root://echo.example:1094/rucio/{entry['name']}",
                       verified=STORAGE_VERIFIED, task=task, attempt=1,
                       finished_at=utc_now())
            out.append(rec)
    atomic_write_json(layout.done_marker(task), {
        "task": task, "attempt": 1, "exit_code": 0, "finished_at": utc_now(),
        "index": task_index(task, manifest, layout.result(task))})
"""

JSON_PASS = r"""
import json, sys
from pathlib import Path
n = 0
for path in sorted(Path(sys.argv[1]).glob("task-*[0-9].jsonl")):
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            json.loads(line)
            n += 1
print(n)
"""

RESUBMIT = r"""
import sys
from pathlib import Path
from dac_upload.runview import run_view
from dac_upload.status import tasks_to_retry
_, tasks = run_view(Path(sys.argv[1]), scheduler=False)
print(len(tasks_to_retry(tasks)))
"""


def build(base: Path, sizes: list[int], repeating: bool = False) -> dict[int, Path]:
    """The trees, one root per size, nested so that each holds the one before it: the files
    of size N that are not in the smaller tree go into ROOT_N/more (5,000 per directory), and
    the smaller tree is ROOT_N/part. 1M, 5M and 10M then cost 10M inodes, not 16M. Kept: a
    marker file says a tree is complete; a missing or different one is built again."""
    sizes = sorted(set(sizes))
    roots: dict[int, Path] = {}
    root = base / "tree"
    for n in reversed(sizes):   # the largest is the outermost
        roots[n] = root
        root = root / "part"
    marker = base / (("built-repeating-" if repeating else "built-logsizes-")
                     + "-".join(map(str, sizes)))
    if marker.exists():
        return roots
    shutil.rmtree(base, ignore_errors=True)
    t0 = time.monotonic()
    # sizes log-uniform from 1 KiB to 1 GiB, fixed seed, unrelated to the path (as in
    # upload.py): dealing by size then spreads each batch over the whole tree, as a real
    # tree's sizes do (a pattern that repeats per directory kept batches local and made
    # planning look 2x quicker than on such a tree)
    rng = random.Random(11)
    previous = 0
    for n in sizes:
        more = roots[n] / "more"
        more.mkdir(parents=True)
        for d in range(-(-(n - previous) // PER_DIR)):
            sub = more / f"visit{d:05d}"
            sub.mkdir()
            for i in range(min(PER_DIR, n - previous - d * PER_DIR)):
                fd = os.open(sub / f"calexp_{i:05d}.fits", os.O_CREAT | os.O_WRONLY, 0o644)
                size = (1024 + (i * 2654435761) % 2**30 if repeating  # the same per directory
                        else int(2 ** rng.uniform(10, 30)))
                os.ftruncate(fd, size)   # sparse: no data blocks
                os.close(fd)
        previous = n
    print(f"built {sizes[-1]:,} sparse files in {time.monotonic() - t0:.0f} s", flush=True)
    marker.touch()
    return roots


def job_file(base: Path, root: Path) -> Path:
    path = base / "scale.toml"
    path.write_text(f"""
[job]
runs_dir = "{base / 'runs'}"
[source]
root = "{root}"
[rucio]
scope = "bench"
rse = "ECHO"
host = "http://rucio.invalid"
[naming]
prefix = "scale/"
[batching]
files_per_batch = 1000
max_running = 50
[slurm]
time = "04:00:00"
mem = "4G"
[container]
runtime = "none"
""")
    return path


def measure(args: list[str], env: dict[str, str] | None = None,
            ok: tuple[str, ...] = ("0",)) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in MB, CPU seconds) of ``args`` in a fresh process; exits if
    it fails (an exit code not in ``ok``)."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True,
                         text=True, env=env)
    rc, wall, rss, cpu = out.stdout.split()
    if rc not in ok:
        sys.exit(f"failed ({rc}): {' '.join(args)}\n{out.stderr}")
    return float(wall), int(rss) / 1024, float(cpu)


def row(step: str, wall: float, rss: float, cpu: float, anchor: float | None = None,
        what: str = "") -> None:
    ratio = f"{wall / anchor:6.2f}x {what}" if anchor else ""
    print(f"  {step:<14} {wall:8.1f} s  {cpu:8.1f} s  {rss:8.0f} MB  {ratio}", flush=True)


def settle() -> None:
    """Drop the page cache (as root): the GBs of results and summaries of the size before
    would otherwise push this tree's inodes out of memory, and `find` would read them from
    the disk (40 s instead of 2 s at 1M files). The inodes are then cached by the warm-up
    walk, as everywhere else in this benchmark."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        print("  (not root: the page cache is not dropped; find may read inodes from disk)")


def one_size(base: Path, root: Path, files: int) -> None:
    base.mkdir(parents=True, exist_ok=True)
    job = job_file(base, root)
    dac = shutil.which("dac-upload") or str(Path(sys.executable).with_name("dac-upload"))
    settle()
    subprocess.run(["find", str(root), "-type", "f"], stdout=subprocess.DEVNULL, check=True)
    print(f"\n{files:,} files ({-(-files // 1000):,} tasks of 1,000)")
    print(f"  {'step':<14} {'wall':>10}  {'CPU':>10}  {'peak RSS':>11}  ratio")
    find = measure(["sh", "-c", f"find '{root}' -type f -printf '%s %T@ %p\\n' > /dev/null"])
    row("find", *find)
    shutil.rmtree(base / "runs", ignore_errors=True)
    plan = measure([dac, "plan", "--offline", str(job)])
    row("plan", *plan, find[0], "of find")
    (run_dir,) = [p for p in (base / "runs").iterdir() if (p / "run.json").is_file()]
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", FILL, str(run_dir)], check=True)
    print(f"  (results of {files:,} files written by the worker's code in "
          f"{time.monotonic() - t0:.0f} s)", flush=True)
    anchor = measure([sys.executable, "-c", JSON_PASS, str(run_dir / "results")])
    row("json.loads", *anchor)
    collect = measure([dac, "collect", str(run_dir)])
    row("collect", *collect, anchor[0], "of json.loads")
    size = (run_dir / "summary.json").stat().st_size
    print(f"  (summary.json {size / 1e6:,.0f} MB)")
    row("status", *measure([dac, "status", str(run_dir)]))
    row("status --json", *measure([dac, "status", str(run_dir), "--json"]))
    row("resubmit view", *measure([sys.executable, "-c", RESUBMIT, str(run_dir)]))
    shutil.rmtree(run_dir)   # GBs of results and summary: the tree is what is kept


TEAR = r"""
import sys
from pathlib import Path
path = Path(sys.argv[1])
size = path.stat().st_size
with open(path, "r+b") as handle:
    handle.seek(size // 2)
    handle.readline()                      # to the start of a line in the middle
    start = handle.tell()
    line = handle.readline()
    rest = handle.read()
    handle.seek(start)
    handle.write(line[: len(line) // 2] + b"\n" + rest)   # one record cut short
    handle.truncate()
"""


def big_task(base: Path, root: Path, files: int, dac: str) -> None:
    """One task of ``files`` files: its results file of several GB with a torn record in
    the middle still collects; the line is named, the rest kept."""
    base.mkdir(parents=True, exist_ok=True)
    job = job_file(base, root)
    text = job.read_text().replace("files_per_batch = 1000", f"files_per_batch = {files}")
    job.write_text(text.replace('mem = "4G"', 'mem = "64G"').replace('time = "04:00:00"',
                                                                     'time = "24:00:00"'))
    shutil.rmtree(base / "runs", ignore_errors=True)
    plan = measure([dac, "plan", "--offline", str(job)])
    (run_dir,) = [p for p in (base / "runs").iterdir() if (p / "run.json").is_file()]
    subprocess.run([sys.executable, "-c", FILL, str(run_dir)], check=True)
    result = run_dir / "results" / "task-00000.jsonl"
    print(f"\none task of {files:,} files: plan {plan[0]:.1f} s; its results file "
          f"{result.stat().st_size / 1e9:.2f} GB, one record in the middle cut short")
    subprocess.run([sys.executable, "-c", TEAR, str(result)], check=True)
    settle()
    row("collect", *measure([dac, "collect", str(run_dir)], ok=("1",)))   # 1: not complete
    from dac_upload.verify import read_header

    with open(run_dir / "summary.json", encoding="utf-8") as handle:   # its first lines
        summary = read_header(handle, run_dir / "summary.json")
    said = [w for w in summary["warnings"] if " line " in w]
    print(f"  uploaded {summary['counts']['uploaded']:,} of {summary['counts']['files']:,};"
          f" warnings: {said}")
    assert summary["counts"]["uploaded"] == files - 1 and len(said) == 1, summary["counts"]
    shutil.rmtree(run_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, nargs="+", default=[1_000_000, 5_000_000])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dac-upload-scale"))
    ap.add_argument("--small", action="store_true", help="3,000 files: that it works")
    ap.add_argument("--repeating-sizes", action="store_true", help="sizes that repeat in "
                    "each directory (1024 + (i * 2654435761) %% 2**30, i the file's number "
                    "there): batches stay local, the easy case")
    ap.add_argument("--big-task", type=int, help="also one task of this many files (one of "
                    "--files) with a torn record in the middle of its results")
    a = ap.parse_args()
    sizes = [3000] if a.small else a.files
    roots = build(a.dir, sizes, a.repeating_sizes)
    for n in sorted(set(sizes)):
        one_size(a.dir / f"work-{n}", roots[n], n)
    big = 3000 if a.small else a.big_task
    if big:
        dac = shutil.which("dac-upload") or str(Path(sys.executable).with_name("dac-upload"))
        big_task(a.dir / f"big-{big}", roots[big], big, dac)


if __name__ == "__main__":
    main()
