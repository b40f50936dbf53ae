"""Benchmark: many small files, packed ([packing]) against the ways they go one by one, side by
side in one run on the production-like grid stack (tests/services/start-grid.sh: Rucio 41 on
HTTPS with X.509 proxies, XRootD through gfal2). Run as root with the grid stack up (it acts
as the grid user 'dacuser'):

    $DAC_CI_DIR/venv/bin/python tests/benchmarks/packed.py                 # 20,000 files
    $DAC_CI_DIR/venv/bin/python tests/benchmarks/packed.py --small         # CI: it works

--files files of 1-64 KiB (fixed seed, random bytes), the same bytes under other names for
each method:

  seed     the method dac-upload replaces: batches of 20 files, 10 `rucio upload --rse RSE
           --scope SCOPE --register-after-upload FILE...` processes at once (--slow-files of
           them: it is too slow for all)
  stock    one `rucio upload ... --register-after-upload` process (--slow-files of them)
  bulk     `dac-upload worker --run RUN --task 0`, one task of every file, a rule per file
  dataset  the same into a dataset (one rule)
  packed   the same with [packing] below = "1 MiB": the files in ZIP archives, each archive
           one file with a rule, its members registered as its constituents

For each: files/s, the requests the Rucio server got meanwhile (lines Apache's access log
gained, from any client) per file, and the objects on the storage per file, counted on the
XRootD server's disk (not from the tool's records); then packed's ratios to the seed's
method. Planning and Slurm are not timed (the worker runs directly, as in grid_upload.py).
Files uploaded into Rucio stay there; the local data is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tomllib

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grid_upload as grid
import upload

SEED_BATCH, SEED_PROCESSES = 20, 10


def objects_on_storage(prefix: str) -> int:
    """Files on the XRootD server's disk under names starting with ``prefix``."""
    top = grid.STORAGE / "rucio" / upload.SCOPE
    mark = "/" + prefix.rstrip("/")
    flat = "/" not in prefix.rstrip("/")
    return sum(len(names) if not flat else sum(n.startswith(prefix) for n in names)
               for dirpath, _, names in os.walk(top) if flat or mark in dirpath + "/")


def registered(pattern: str) -> int:
    from rucio.client import Client

    os.environ["RUCIO_CONFIG"] = str(grid.ADMIN_CFG)
    return len(list(Client().list_dids(upload.SCOPE, {"name": pattern}, did_type="file")))


def seed_method(base: Path, files: list[Path], cfg: Path, pattern: str) -> tuple[float, int]:
    """Batches of SEED_BATCH, SEED_PROCESSES `rucio upload` processes at once; (seconds,
    requests). The files it really registered are counted, its exit codes not trusted."""
    batches = [files[i:i + SEED_BATCH] for i in range(0, len(files), SEED_BATCH)]

    def one(batch: list[Path]) -> None:
        upload.as_user([str(upload.RUCIO_CLI), "upload", "--rse", upload.RSE, "--scope",
                        upload.SCOPE, "--register-after-upload", *map(str, batch)], base,
                       RUCIO_CONFIG=str(cfg))

    grid.sync()
    before, t0 = upload.log_lines(), time.monotonic()
    with ThreadPoolExecutor(SEED_PROCESSES) as pool:
        list(pool.map(one, batches))
    seconds, requests = time.monotonic() - t0, upload.log_lines() - before
    found = registered(pattern)
    if found != len(files):
        sys.exit(f"the seed's method registered {found}/{len(files)} files")
    return seconds, requests


def worker(base: Path, name: str, root: Path, n: int, dataset: str = "",
           packing: str = "") -> tuple[float, int, int]:
    """upload.plan_worker on the grid (one task of ``n`` files); (seconds, requests,
    objects on the storage)."""
    plain = upload.job_text

    def with_packing(*args: object, **kwargs: object) -> str:
        return plain(*args, **kwargs) + (f"[packing]\n{packing}\n" if packing else "")

    upload.job_text = with_packing
    try:
        grid.sync()
        seconds, requests, run_dir, _ = upload.plan_worker(base, name, root, n, 4, dataset)
    finally:
        upload.job_text = plain
    job = tomllib.loads((run_dir / "job.toml").read_text())
    return seconds, requests, objects_on_storage(job["naming"]["prefix"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--slow-files", type=int, default=400,
                    help="files for the seed's method and the stock client (default 400)")
    ap.add_argument("--small", action="store_true", help="200 files, 40 slow ones (CI)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dac-upload-packbench"))
    args = ap.parse_args()
    if args.small:
        args.files, args.slow_files = 200, 40
    problem = grid.grid_problem()
    if problem:
        sys.exit(problem)
    grid.use_grid("ECHO_ROOT")
    base, tag = args.dir, uuid.uuid4().hex[:8]
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    rng = random.Random(42)
    sizes = [rng.randint(1024, 64 * 1024) for _ in range(args.files)]
    slow = sizes[:args.slow_files]
    sets = {"seed": upload.write_set(base / "seed", slow, f"q{tag}", 7),
            "stock": upload.write_set(base / "stock", slow, f"s{tag}", 7)}
    for way in ("bulk", "dataset", "packed"):
        upload.write_set(base / way, sizes, f"{way[0]}{tag}", 7)
    cfg = base / "rucio.cfg"
    cfg.write_text(grid.USER_CFG.read_text().rstrip("\n") +
                   f"\nauth_token_file_path = {base}/token/auth_token_for_account_dacuser\n")
    (base / "token").mkdir()
    upload.chown(base)
    cfg.chmod(0o600)
    version = subprocess.run([str(upload.VENV_BIN / "dac-upload"), "--version"],
                             capture_output=True, text=True, check=False).stdout.strip()
    print(f"{version}; Rucio {grid.URL} (HTTPS, X.509 proxy, one WSGI process, SQLite), RSE "
          f"ECHO_ROOT (XRootD through gfal2); {os.cpu_count()} CPUs")
    print(f"{args.files} files of 1-64 KiB ({sum(sizes) / 1e6:.1f} MB); the seed's method and "
          f"the stock client on the first {args.slow_files}; {grid.load()}")
    rows = []
    try:
        s, r = seed_method(base, sets["seed"], cfg, f"q{tag}-*")
        rows.append(("seed", args.slow_files, s, r, args.slow_files,
                     f"{SEED_PROCESSES} x rucio upload --register-after-upload <{SEED_BATCH} "
                     "files> at a time"))
        s, r, _ = upload.stock_cli(base, sets["stock"], cfg, f"s{tag}-*", args.slow_files)
        rows.append(("stock", args.slow_files, s, r, args.slow_files,
                     f"rucio upload --register-after-upload <{args.slow_files} files>"))
        n = args.files
        s, r, o = worker(base, "bulk", base / "bulk", n)
        rows.append(("bulk", n, s, r, o, "dac-upload worker (a rule per file)"))
        s, r, o = worker(base, "dataset", base / "dataset", n, f"pb{tag}_dataset")
        rows.append(("dataset", n, s, r, o, "dac-upload worker ([rucio] dataset)"))
        s, r, o = worker(base, "packed", base / "packed", n, packing='below = "1 MiB"')
        rows.append(("packed", n, s, r, o, 'dac-upload worker ([packing] below = "1 MiB")'))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for way, files, seconds, requests, objects, cmd in rows:
        print(f"   {way:<8}: {files:6d} files {seconds:8.2f} s {files / seconds:9.1f} files/s "
              f"{requests / files:7.4f} requests/file {files / max(objects, 1):8.1f} files/object"
              f"   $ {cmd}")
    by = {row[0]: row for row in rows}
    rate = {way: row[1] / row[2] for way, row in by.items()}
    p = by["packed"]
    print(f"   ratio : packed {rate['packed'] / rate['seed']:.1f}x the seed's files/s (target "
          f">= 100x), {rate['packed'] / rate['stock']:.1f}x the stock client's, "
          f"{rate['packed'] / rate['bulk']:.1f}x the bulk worker's")
    print(f"   packed: {p[3] / p[1]:.5f} requests per file (target <= 0.001), "
          f"{p[1] / max(p[4], 1):.0f} files per object on the storage (target >= 100)")
    print(f"   {grid.load()}")


if __name__ == "__main__":
    main()
