"""Benchmark: the bulk worker against Rucio's stock client and against `cp`, side by side in one
run, on the local test services (tests/services/: SQLite Rucio, one gunicorn worker, POSIX
RSE). Run as root with the services up (it acts as the unprivileged user 'dacuser'):

    $DAC_CI_DIR/venv/bin/python tests/benchmarks/upload.py           # docs/performance.md
    $DAC_CI_DIR/venv/bin/python tests/benchmarks/upload.py --small   # proves it works (CI)

1. small files: --files files of 1 KiB-1 MiB (fixed seed). The same set four times, under
   other names: `rucio upload --rse RSE --scope test --register-after-upload FILE...` (the
   stock CLI, one process) versus `dac-upload worker --run RUN --task 0` (one array task
   holding every file, run directly: planning and Slurm are not timed), each with a rule
   per file and each into a dataset (`rucio upload ... FILE... test:DATASET`, `[rucio]
   dataset`). files/s and the ratios, like with like; `sync` before each timed run; the
   worker runs 3 times each way (a fresh set each time) and its median is compared.
2. requests per file: lines the Rucio server's access log gained during each run.
3. large files: --big-files files of --big-size: `cp FILES RSE_DIR/...; sync` versus the
   worker (checksums, copy, destination check, registration) `; sync`. MB/s and the ratio.
4. planning at scale: a synthetic tree of --plan-files sparse files (1 KiB-1 GiB): `find
   ROOT -type f -printf '%s %T@ %p\\n'` versus `dac-upload plan JOB --offline --catalogue
   FILE` (the catalogue made first by `dac-upload catalogue JOB --out FILE`, which is timed
   too, as is planning with the walk); seconds, the ratio, peak RSS (/usr/bin/time) and the
   peak PSS of the plan's process tree.

Each figure is printed with the command that produced it. Data is generated under --dir
(default /tmp/dac-upload-bench) and removed at the end, except the plan tree (kept for the
next run: delete it to rebuild). Files uploaded into the test Rucio stay there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

CI_DIR = Path(os.environ.get("DAC_CI_DIR", "/tmp/dac-upload-ci"))
VENV_BIN = CI_DIR / "venv" / "bin"
RUCIO_CLI = CI_DIR / "rucio" / "cli" / "bin" / "rucio"
CLIENT_CFG = CI_DIR / "rucio" / "etc" / "client.cfg"
ACCESS_LOG = CI_DIR / "rucio" / "log" / "access.log"
RSE_DIR = CI_DIR / "rucio" / "rse"
RSE, SCOPE, USER = "LOCAL_DISK", "test", "dacuser"
URL = "http://127.0.0.1:18080"
SERVER = "SQLite, one gunicorn worker"


def use_postgres() -> None:
    """--server postgres: the second test server (PostgreSQL, two gunicorn workers, port
    18081), for comparison with a production-like database; the targets are on SQLite."""
    global CLIENT_CFG, ACCESS_LOG, RSE_DIR, URL, SERVER
    base = CI_DIR / "rucio-pg"
    CLIENT_CFG, ACCESS_LOG = base / "etc" / "client.cfg", base / "log" / "access.log"
    RSE_DIR, URL = base / "rse", "http://127.0.0.1:18081"
    SERVER = "PostgreSQL, two gunicorn workers"
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"


def user_env(**extra: str) -> dict[str, str]:
    """The clean environment dacuser's commands run with."""
    return {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": f"/home/{USER}",
            "USER": USER, "LANG": "C.UTF-8", **extra}


def as_user(args: list[str], cwd: Path, **env: str) -> tuple[float,
                                                              subprocess.CompletedProcess]:
    """Run as dacuser with a clean environment; (wall seconds, result)."""
    t0 = time.monotonic()
    proc = subprocess.run([RUNUSER, "-u", USER, "--", *args], cwd=cwd, env=user_env(**env),
                          capture_output=True, text=True, check=False)
    return time.monotonic() - t0, proc


def chown(path: Path) -> None:
    subprocess.run(["chown", "-R", f"{USER}:{USER}", str(path)], check=True)


def log_lines() -> int:
    with open(ACCESS_LOG, "rb") as fh:
        return sum(1 for _ in fh)


def write_set(root: Path, sizes: list[int], tag: str, seed: int) -> list[Path]:
    """The same bytes for the same seed: identical sets under different names."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i, size in enumerate(sizes):
        p = root / f"{tag}-{i:05d}.dat"
        p.write_bytes(rng.randbytes(size))
        out.append(p)
    return out


CHUNK = {"size": 0}   # [upload] chunk_size for the worker; 0 = the tool's default
BULK_RUNS = 3         # timed runs of the bulk worker each way (fresh names each time)


def job_text(root: Path, prefix: str, files_per_batch: int, transfers: int,
             dataset: str = "") -> str:
    return f"""
[source]
root = "{root}"
[rucio]
host = "{URL}"
account = "root"
auth_type = "userpass"
username = "ddmlab"
password_file = "../pw"
scope = "{SCOPE}"
rse = "{RSE}"
{f'dataset = "{dataset}"' if dataset else ""}
[naming]
prefix = "{prefix}"
[upload]
mode = "bulk"
{f"chunk_size = {CHUNK['size']}" if CHUNK["size"] else ""}
transfers = {transfers}
[batching]
files_per_batch = {files_per_batch}
[slurm]
time = "02:00:00"
[container]
runtime = "none"
"""


def plan_worker(base: Path, name: str, root: Path, n: int, transfers: int,
                dataset: str = "") -> tuple[float, int, Path, list[str]]:
    """Plan a one-task run of ``root`` and time `dac-upload worker` on it;
    (seconds, access-log lines, run dir, worker command)."""
    job = base / "jobs" / f"{name}.toml"
    job.parent.mkdir(parents=True, exist_ok=True)
    job.write_text(job_text(root, f"bench/{uuid.uuid4().hex[:8]}/", n, transfers, dataset))
    chown(base)
    _, planned = as_user([str(VENV_BIN / "dac-upload"), "plan", str(job)], base)
    if planned.returncode != 0:
        sys.exit(f"plan failed: {planned.stderr}")
    run_dir = Path(next(line.split(":", 1)[1].strip() for line in planned.stdout.splitlines()
                        if line.startswith("run directory:")))
    cmd = [str(VENV_BIN / "dac-upload"), "worker", "--run", str(run_dir), "--task", "0"]
    before = log_lines()
    seconds, done = as_user(cmd, base)
    requests = log_lines() - before
    records = [json.loads(line) for line in
               (run_dir / "results" / "task-00000.jsonl").read_text().splitlines()]
    uploaded = sum(r["status"] == "uploaded" for r in records)
    if done.returncode != 0 or uploaded != n:
        sys.exit(f"worker: exit {done.returncode}, {uploaded}/{n} uploaded:\n{done.stdout[-2000:]}")
    return seconds, requests, run_dir, cmd


def stock_cli(base: Path, files: list[Path], cfg: Path, pattern: str, n: int,
              dataset: str = "") -> tuple[float, int, list[str]]:
    """Time `rucio upload` (the stock CLI, one process) on ``files``; (seconds, access-log
    lines, command); checks with the admin client that it registered all of them."""
    cli = [str(RUCIO_CLI), "upload", "--rse", RSE, "--scope", SCOPE,
           "--register-after-upload", *map(str, files), *([dataset] if dataset else [])]
    subprocess.run(["sync"], check=True)   # each timed run starts with no dirty pages
    before = log_lines()
    seconds, proc = as_user(cli, base, RUCIO_CONFIG=str(cfg))
    requests = log_lines() - before
    from rucio.client import Client  # the admin client: did the CLI really upload them all?
    os.environ["RUCIO_CONFIG"] = str(CLIENT_CFG)
    found = len(list(Client().list_dids(SCOPE, {"name": pattern}, did_type="file")))
    if found != n:
        sys.exit(f"rucio upload registered {found}/{n} files (exit {proc.returncode}):\n"
                 f"{proc.stderr[-2000:]}")
    return seconds, requests, cli


def small_files(base: Path, n: int) -> None:
    rng = random.Random(42)
    sizes = [rng.randint(1024, 1024 * 1024) for _ in range(n)]
    total = sum(sizes)
    tag = uuid.uuid4().hex[:8]
    stock_files = write_set(base / "stock", sizes, f"s{tag}", 7)
    stockds_files = write_set(base / "stockds", sizes, f"t{tag}", 7)
    for k in range(BULK_RUNS):   # the bulk worker runs 3 times each way: its median is used
        write_set(base / f"bulk{k}", sizes, f"b{k}{tag}", 7)
        write_set(base / f"bulkds{k}", sizes, f"d{k}{tag}", 7)
    cfg = base / "rucio.cfg"
    cfg.write_text(CLIENT_CFG.read_text().replace(str(CLIENT_CFG.parent.parent / "token"),
                                                  str(base / "token")))
    (base / "token").mkdir(exist_ok=True)
    chown(base)
    cfg.chmod(0o600)
    print(f"\n1. {n} files of 1 KiB-1 MiB ({total / 1e6:.1f} MB), one process each, "
          "identical content under other names")
    stock_s, stock_requests, _ = stock_cli(base, stock_files, cfg, f"s{tag}-*", n)
    subprocess.run(["sync"], check=True)
    bulk_runs = []
    for k in range(BULK_RUNS):
        subprocess.run(["sync"], check=True)
        bulk_runs.append(plan_worker(base, f"small{k}", base / f"bulk{k}", n, 4))
    bulk_s, bulk_requests, _, cmd = sorted(bulk_runs)[BULK_RUNS // 2]
    # into a dataset, both ways: each file attached to it, its rule covering them (the
    # stock client then makes no rule per file either)
    sds_s, sds_requests, _ = stock_cli(base, stockds_files, cfg, f"t{tag}-*", n,
                                       f"{SCOPE}:bench_t{tag}")
    ds_runs = []
    for k in range(BULK_RUNS):
        subprocess.run(["sync"], check=True)
        ds_runs.append(plan_worker(base, f"smallds{k}", base / f"bulkds{k}", n, 4,
                                   dataset=f"bench_{k}{tag}"))
    ds_s, ds_requests, ds_run, _ = sorted(ds_runs)[BULK_RUNS // 2]
    # The server's floor: what a rule per file costs it, whoever asks. The dataset run's
    # files have no rule of their own (their dataset's rule covers them): rules for 100 of
    # them, in one request, as the bulk worker sends them.
    from rucio.client import Client
    names = [json.loads(line)["name"] for line in
             (ds_run / "results" / "task-00000.jsonl").read_text().splitlines()][:100]
    t0 = time.monotonic()
    Client().add_replication_rule([{"scope": SCOPE, "name": x} for x in names], 1, RSE)
    per_rule = (time.monotonic() - t0) / len(names)
    worker = (f"$ {' '.join(cmd[1:3])} RUN --task 0   ([upload] transfers = 4, chunk_size = "
              f"{CHUNK['size'] or 'default'})")
    print("   a rule per file:")
    print(f"   stock : {stock_s:7.2f} s  {n / stock_s:8.1f} files/s   "
          f"$ rucio upload --rse {RSE} --scope {SCOPE} --register-after-upload <{n} files>")
    print(f"   bulk  : {bulk_s:7.2f} s  {n / bulk_s:8.1f} files/s   {worker}   (median of "
          f"{', '.join(f'{r[0]:.2f}' for r in sorted(bulk_runs))} s)")
    print(f"   ratio : {stock_s / bulk_s:.1f}x the files/s of the stock client (target >= 20x)")
    floor = per_rule * n
    print(f"   server: {per_rule * 1000:.1f} ms per rule (one request of rules for "
          f"{len(names)} of the dataset run's files): the rules alone for {n} files take "
          f"{floor:.2f} s of the server, so with a rule per file no client gets beyond "
          f"{stock_s / floor:.1f}x")
    print("   into a dataset (the files attached to it, one rule on the dataset):")
    print(f"   stock : {sds_s:7.2f} s  {n / sds_s:8.1f} files/s   "
          f"$ rucio upload --rse {RSE} --scope {SCOPE} --register-after-upload <{n} files> "
          f"{SCOPE}:DATASET")
    print(f"   bulk  : {ds_s:7.2f} s  {n / ds_s:8.1f} files/s   {worker}, [rucio] dataset   "
          f"(median of {', '.join(f'{r[0]:.2f}' for r in sorted(ds_runs))} s)")
    print(f"   ratio : {sds_s / ds_s:.1f}x the files/s of the stock client into a dataset "
          f"(target >= 20x); {stock_s / ds_s:.1f}x the stock client with a rule per file")
    print(f"\n2. server requests per file (lines added to {ACCESS_LOG.name} meanwhile)")
    print(f"   stock : {stock_requests / n:.3f} per file ({stock_requests} requests)")
    print(f"   bulk  : {bulk_requests / n:.3f} per file ({bulk_requests} requests; "
          "target <= 0.05)")
    print(f"   stock into a dataset: {sds_requests / n:.3f} per file ({sds_requests} requests)")
    print(f"   bulk into a dataset: {ds_requests / n:.3f} per file ({ds_requests} requests; "
          "target <= 0.05)")
    for d in ("stock", "stockds", *(f"bulk{k}" for k in range(BULK_RUNS)),
              *(f"bulkds{k}" for k in range(BULK_RUNS))):
        shutil.rmtree(base / d)


def large_files(base: Path, k: int, size: int) -> None:
    block = random.Random(3).randbytes(64 * 1024 * 1024)
    src = base / "big"
    src.mkdir(parents=True, exist_ok=True)
    for i in range(k):
        with open(src / f"big-{i}.dat", "wb") as fh:
            left = size
            while left > 0:
                fh.write(block[:min(left, len(block))] if i == 0 else
                         bytes([i]) + block[1:min(left, len(block))])
                left -= len(block)
    chown(base)
    total = k * size
    print(f"\n3. {k} files of {size / 2**30:.2f} GiB ({total / 1e6:.0f} MB) onto the RSE's disk "
          f"({RSE_DIR}), each followed by sync")
    dest = RSE_DIR / f"bench-cp-{uuid.uuid4().hex[:8]}"
    dest.mkdir()
    chown(dest)
    subprocess.run(["sync"], check=True)
    cp_s, proc = as_user(["sh", "-c", f'cp "$@" {dest}/ && sync', "cp",
                             *[str(p) for p in sorted(src.iterdir())]], base)
    if proc.returncode != 0:
        sys.exit(f"cp failed: {proc.stderr}")
    shutil.rmtree(dest)
    subprocess.run(["sync"], check=True)
    bulk_s, _, _, cmd = plan_worker(base, "big", src, k, 4)
    sync_t0 = time.monotonic()
    subprocess.run(["sync"], check=True)
    bulk_s += time.monotonic() - sync_t0
    print(f"   cp    : {cp_s:7.2f} s  {total / cp_s / 1e6:8.1f} MB/s   $ cp FILES {RSE_DIR}/"
          "bench-cp/ && sync")
    print(f"   bulk  : {bulk_s:7.2f} s  {total / bulk_s / 1e6:8.1f} MB/s   $ {' '.join(cmd[1:3])} "
          "RUN --task 0 && sync   (adler32+md5 in one read, copy, destination adler32)")
    print(f"   ratio : {cp_s / bulk_s:.2f} of cp's MB/s (target >= 0.8)")
    shutil.rmtree(src)


def build_tree(root: Path, files: int) -> None:
    """1,000 files a directory, each sparse with a size from 1 KiB to 1 GiB (log-uniform,
    fixed seed): the sizes of a real tree for batching, no disk used."""
    marker = root.parent / f"tree-built-{files}-sized"
    if marker.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(11)
    per_dir = 1000
    for d in range(-(-files // per_dir)):
        sub = root / f"visit{d:05d}"
        sub.mkdir(parents=True)
        for i in range(min(per_dir, files - d * per_dir)):
            fd = os.open(sub / f"calexp_{i:05d}.fits", os.O_CREAT | os.O_WRONLY, 0o644)
            os.ftruncate(fd, int(2 ** rng.uniform(10, 30)))
            os.close(fd)
    chown(root)
    marker.touch()


def timed_runs(args: list[str], cwd: Path, times: int) -> tuple[list[float], float]:
    """Run ``args`` (as dacuser) ``times`` times; (sorted seconds, peak RSS in MB). Whatever
    a run leaves under cwd/plan is kept until all are done: deleting a thousand files just
    before making a thousand more slows the making on this disk (ext4 with discard)."""
    seconds, rss = [], 0.0
    for _ in range(times):
        t, proc = as_user(["/usr/bin/time", "-f", "%M", *args], cwd)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(args[:3])} failed: {proc.stderr[-2000:]}")
        seconds.append(t)
        rss = max(rss, int(proc.stderr.strip().splitlines()[-1]) / 1024)
    return sorted(seconds), rss


def tree_pss_mb(root_pid: int) -> float:
    """Proportional set size of a process and all its descendants, summed (MB): memory
    they use between them, a page shared after a fork counted once."""
    total, pids = 0, [root_pid]
    while pids:
        pid = pids.pop()
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("Pss:"))
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as fh:
                    pids += [int(x) for x in fh.read().split()]
        except (OSError, StopIteration):
            continue
    return total / 1024


def peak_tree_pss(args: list[str], cwd: Path) -> float:
    """Run ``args`` once as dacuser, sampling the PSS of its process tree every 20 ms;
    the peak (MB). A run of its own: the sampling would disturb a timed one."""
    proc = subprocess.Popen([RUNUSER, "-u", USER, "--", *args], cwd=cwd, env=user_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_pss_mb(proc.pid))
        time.sleep(0.02)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args[:3])} failed (exit {proc.returncode})")
    return peak


def planning(base: Path, files: int, times: int = 3) -> None:
    tree_base = base.parent / f"{base.name}-plantree"
    root = tree_base / "tree"
    t0 = time.monotonic()
    build_tree(root, files)
    built = time.monotonic() - t0
    shutil.rmtree(tree_base / "plan", ignore_errors=True)     # the last benchmark's runs
    subprocess.run(["sync"], check=True)
    time.sleep(8)                                             # let their deletion settle
    print(f"\n4. planning a synthetic tree of {files:,} files (sparse, 1 KiB-1 GiB) in "
          f"{-(-files // 1000)} directories (built in {built:.0f} s; page cache warm); each "
          f"timed {times} times, the median compared")
    find = ["find", str(root), "-type", "f", "-printf", r"%s %T@ %p\n"]
    subprocess.run(find, stdout=subprocess.DEVNULL, check=True)          # warm-up
    find_runs = []
    for _ in range(times):
        t0 = time.monotonic()
        subprocess.run(find, stdout=subprocess.DEVNULL, check=True)
        find_runs.append(time.monotonic() - t0)
    find_s = sorted(find_runs)[times // 2]
    job = tree_base / "plan.toml"
    job.write_text(f"""
[source]
root = "tree"
[rucio]
host = "{URL}"
scope = "{SCOPE}"
rse = "{RSE}"
[batching]
files_per_batch = 1000
[container]
runtime = "none"
""")
    catalogue = tree_base / "catalogue.json"
    catalogue.unlink(missing_ok=True)
    chown(tree_base)
    exe = str(VENV_BIN / "dac-upload")
    cat_runs, cat_rss = timed_runs([exe, "catalogue", str(job), "--out", str(catalogue),
                                    "--overwrite"], tree_base, 1)
    plan_runs, plan_rss = timed_runs([exe, "plan", str(job), "--offline", "--catalogue",
                                      str(catalogue)], tree_base, times)
    walk_runs, walk_rss = timed_runs([exe, "plan", str(job), "--offline"], tree_base, 1)
    plan_pss = peak_tree_pss([exe, "plan", str(job), "--offline", "--catalogue",
                              str(catalogue)], tree_base)
    plan_s = plan_runs[times // 2]

    def runs(values: list[float]) -> str:
        return "(" + ", ".join(f"{v:.2f}" for v in values) + ")"

    print(f"   find              : {find_s:7.2f} s {runs(sorted(find_runs))}   $ find ROOT "
          "-type f -printf '%s %T@ %p\\n' > /dev/null")
    print(f"   plan --catalogue  : {plan_s:7.2f} s {runs(plan_runs)}   peak RSS "
          f"{plan_rss:.0f} MB   $ dac-upload plan JOB --offline --catalogue FILE   (names, "
          "1000-file batches, manifests, scripts, run directory)")
    print(f"   ratio             : {plan_s / find_s:.2f}x the time of find (target <= 1.5x, "
          "peak RSS <= 500 MB)")
    print(f"   memory            : {plan_pss:7.0f} MB at most, the plan's process tree (PSS "
          "summed, sampled every 20 ms in a run of its own)")
    print(f"   the walk itself   : {cat_runs[0]:7.2f} s   peak RSS {cat_rss:.0f} MB   "
          f"$ dac-upload catalogue JOB --out FILE   ({cat_runs[0] / find_s:.2f}x find)")
    print(f"   walk and plan     : {walk_runs[0]:7.2f} s   peak RSS {walk_rss:.0f} MB   "
          f"$ dac-upload plan JOB --offline   ({walk_runs[0] / find_s:.2f}x find)")
    shutil.rmtree(tree_base / "plan", ignore_errors=True)     # the run directories


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="a few files only (CI)")
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--big-files", type=int, default=4)
    ap.add_argument("--big-size", type=int, default=2**30)
    ap.add_argument("--plan-files", type=int, default=1_000_000)
    ap.add_argument("--skip", action="append", default=[],
                    choices=["small", "large", "plan"], help="leave a part out")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dac-upload-bench"))
    ap.add_argument("--server", choices=["sqlite", "postgres"], default="sqlite",
                    help="which test Rucio server (the targets are on sqlite)")
    ap.add_argument("--chunk-size", type=int, default=0,
                    help="[upload] chunk_size for the worker (default: the tool's)")
    args = ap.parse_args()
    if args.small:
        args.files, args.big_files, args.big_size, args.plan_files = 30, 2, 8 * 2**20, 3000
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark acts as dacuser through runuser")
    CHUNK["size"] = args.chunk_size
    if args.server == "postgres":
        use_postgres()
    base = args.dir
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    (base / "pw").write_text("secret\n")
    chown(base)
    (base / "pw").chmod(0o600)
    version = subprocess.run([str(VENV_BIN / "dac-upload"), "--version"], capture_output=True,
                             text=True).stdout.strip()
    print(f"{version}; Rucio server {URL} ({SERVER}), RSE {RSE} (POSIX); "
          f"{os.cpu_count()} CPUs")
    # planning first: the other parts write and delete gigabytes, which the disk is still
    # busy with after them (ext4 mounted with discard): planning measured 1.58x after them
    # and 1.43x on its own, an hour apart
    if "plan" not in args.skip:
        planning(base, args.plan_files)
    if "small" not in args.skip:
        small_files(base, args.files)
    if "large" not in args.skip:
        large_files(base, args.big_files, args.big_size)
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
