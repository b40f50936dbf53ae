"""Benchmark: the bulk worker against Rucio's stock client, `xrdcp` and `gfal-copy`, side by
side in one run, on the production-like grid stack (tests/services/start-grid.sh: Rucio 41 on
HTTPS behind Apache with X.509 proxy auth, XRootD storage reached through gfal2, rename
denied). Run as root with the grid stack up (it acts as the grid user 'dacuser'):

    $DAC_CI_DIR/venv/bin/python tests/benchmarks/grid_upload.py                  # ECHO_ROOT
    $DAC_CI_DIR/venv/bin/python tests/benchmarks/grid_upload.py --rse ECHO_DAVS  # davs://
    $DAC_CI_DIR/venv/bin/python tests/benchmarks/grid_upload.py --small          # CI: it works

It is tests/benchmarks/upload.py pointed at the grid (use_grid): the same planning, worker
and stock-client steps, with the grid's server, RSE and job file, and every command run as
dacuser with X509_USER_PROXY and X509_CERT_DIR set, as in a grid user's shell.

1. small files: --files files of 1 KiB-1 MiB (fixed seed), the same bytes under other names
   each time: `rucio upload --rse RSE --scope test --register-after-upload FILE...` (the
   stock CLI, one process; the files it really registered are counted, its exit code is
   not trusted) versus `dac-upload worker --run RUN --task 0` (bulk mode, default settings:
   one array task holding every file, run directly: planning and Slurm are not timed) versus
   `XRD_CPUSEPGWRTRD=0 xrdcp --parallel 16 -r DIR/ root://.../DEST/` (one process, no
   registration and no checksum, into one directory made beforehand, untimed: the fastest
   single-process xrdcp found. --parallel 16 to 64 alike, 4 about 30% slower; without
   XRD_CPUSEPGWRTRD=0 xrdcp writes pages with a CRC32c each, which neither gfal2 nor the
   worker does, and takes twice as long). `sync` before each; the worker and xrdcp run 3
   times each, alternately, a fresh set each time, and their medians are compared. files/s
   and the ratios.
2. requests per file: lines the Apache access log gained during each run, the server time
   they took (the log's %D) and, for the worker, what they were. Any other client of the
   server meanwhile counts too: a request the worker does not make shows it.
3. large files: --big-files files of --big-size (a repeated random block, not sparse), the
   same files each way, under fresh names: xrdcp as above versus the worker (checksums,
   copy, the storage's adler32, registration) versus `gfal-copy -r` (one process, the files
   one after another), each followed by `sync`. MB/s and the ratios.

xrdcp always goes over root:// (this xrdcp has no davs:// plugin); gfal-copy and the clients
use the RSE's protocol. The worker asks XRootD for each copy's adler32; a server with all its
checksum jobs busy (xrootd.chksum max in grid/xrootd.sh: 4 made 30 s waits frequent) answers
"wait 30 s", and a run that met one is mostly idle (its CPU seconds show it): --xrd-log
counts those answers in the worker's XRootD client log (at Debug, which costs a little).

Each figure is printed with the command that produced it, the CPU seconds of that command's
processes and those Rucio's WSGI daemon and xrootd spent meanwhile (for any client), and the
load average, so that a disturbed figure shows and where the time went.
Data is generated under --dir (default /tmp/dac-upload-gridbench) and removed at the end, as
are the xrdcp and gfal-copy copies on the storage; files uploaded into Rucio stay there.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import upload
from upload import CI_DIR, SCOPE, VENV_BIN, chown, log_lines, plan_worker, stock_cli

GRID = CI_DIR / "grid"
URL = "https://127.0.0.1:18443"
ACCESS_LOG = GRID / "apache" / "log" / "access.log"
ADMIN_CFG = GRID / "rucio" / "etc" / "client-root.cfg"
USER_CFG = GRID / "rucio" / "etc" / "client-x509.cfg"
PROXY = Path("/home/dacuser/.globus/x509up_dac")
CA_DIR = GRID / "ca" / "certificates"
STORAGE = GRID / "xrootd" / "data"          # the XRootD server's oss.localroot
XRD_HOST = "localhost:11094"
ENDPOINT = {"ECHO_ROOT": f"root://{XRD_HOST}/", "ECHO_DAVS": "davs://localhost:18444"}
XROOT = ENDPOINT["ECHO_ROOT"]
GRID_ENV = {"X509_USER_PROXY": str(PROXY), "X509_CERT_DIR": str(CA_DIR),
            # gfal-copy takes the first python that imports gfal2_util: not the venv's
            "GFAL_PYTHONBIN": "/usr/bin/python3"}
XRDCP_PARALLEL = 16
# xrdcp writes in pages with a CRC32c each by default (XRootD 5): twice the time here, for
# a check neither gfal2 nor the worker makes (they check the whole copy's adler32 instead)
XRDCP_ENV = {"XRD_CPUSEPGWRTRD": "0"}
XRD_LOG = False   # --xrd-log
DATASET = False   # --dataset: both clients put the files into a dataset (no rule per file)
UPLOAD_LINES: list[str] = []   # --upload KEY=VALUE: more [upload] lines for the worker's job
PLAIN_JOB_TEXT, PLAIN_AS_USER = upload.job_text, upload.as_user
CPU: dict[str, str] = {}   # CPU seconds of the last command run as dacuser, and the servers'


def grid_job_text(root: Path, prefix: str, files_per_batch: int, transfers: int,
                  dataset: str = "") -> str:
    """upload.py's job file with the grid's [rucio] table: proxy, CA directory, the RSE."""
    rucio = f"""[rucio]
host = "{URL}"
account = "dacuser"
auth_type = "x509_proxy"
proxy = "{PROXY}"
ca_dir = "{CA_DIR}"
scope = "{SCOPE}"
rse = "{upload.RSE}"
{f'dataset = "{dataset}"' if dataset else ""}
"""
    text, swapped = re.subn(r"\[rucio\]\n.*?(?=\[naming\])", rucio,
                            PLAIN_JOB_TEXT(root, prefix, files_per_batch, transfers), flags=re.S)
    if swapped != 1:
        sys.exit("upload.job_text has no [rucio] table before [naming]: update grid_upload.py")
    for line in UPLOAD_LINES:   # an --upload line replaces the key's own line, if any
        key = line.split("=", 1)[0].strip()
        text = re.sub(rf"^{re.escape(key)}\s*=.*\n", "", text, flags=re.M)
    return text.replace("[upload]\n", "[upload]\n" + "".join(f"{x}\n" for x in UPLOAD_LINES), 1)


def service_cpu() -> tuple[float, float]:
    """CPU seconds so far of Rucio's WSGI daemon (display-name rucio-https) and of xrootd:
    what the servers spent meanwhile, for any client."""
    tick, rucio, xrootd = os.sysconf("SC_CLK_TCK"), 0.0, 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                name = fh.read().split(b"\0")[0]
            with open(f"/proc/{pid}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        seconds = (int(fields[11]) + int(fields[12])) / tick   # utime + stime
        if name.startswith(b"rucio-https"):
            rucio += seconds
        elif name.endswith(b"/xrootd"):
            xrootd += seconds
    return rucio, xrootd


def grid_as_user(args: list[str], cwd: Path, **env: str) -> tuple[float,
                                                                   subprocess.CompletedProcess]:
    """upload.as_user with the grid user's variables, noting the CPU time the command's
    processes took (runuser waits for them, so they count as our children) and the
    servers' ("restarted" when a server was restarted meanwhile)."""
    before, servers = resource.getrusage(resource.RUSAGE_CHILDREN), service_cpu()
    out = PLAIN_AS_USER(args, cwd, **{**GRID_ENV, **env})
    after, (rucio, xrootd) = resource.getrusage(resource.RUSAGE_CHILDREN), service_cpu()
    own = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    spent = [f"{x - y:.1f} s" if x >= y else "restarted" for x, y in zip((rucio, xrootd), servers)]
    CPU[args[0]] = f"{own:5.1f} s (Rucio {spent[0]}, XRootD {spent[1]})"
    return out


def use_grid(rse: str) -> None:
    """Point upload.py at the grid, as its use_postgres() points it at the second server:
    its plan_worker, stock_cli and log_lines read these module names when they run."""
    for name in ("RSE", "URL", "CLIENT_CFG", "ACCESS_LOG", "job_text", "as_user"):
        if not hasattr(upload, name):
            sys.exit(f"upload.py has no {name} any more: update grid_upload.py")
    upload.RSE, upload.URL, upload.CLIENT_CFG, upload.ACCESS_LOG = rse, URL, ADMIN_CFG, ACCESS_LOG
    upload.job_text, upload.as_user = grid_job_text, grid_as_user


def window(first: int, count: int) -> tuple[float, str]:
    """Access-log lines first..first+count: the server's time on them (%D, microseconds)
    and what they were ("POST /replicas x2 0.05 s, ...", DID names left out). Requests at
    the same time each count their wait for the server's one thread: an upper bound."""
    with open(ACCESS_LOG, "rb") as fh:
        lines = fh.readlines()[first:first + count]
    kinds: Counter[str] = Counter()
    times: Counter[str] = Counter()
    for line in lines:
        m = re.search(rb'"(\w+) (/[^/? ]*/?[^/? ]*)\S* HTTP/[\d.]+" \d{3} \S+ (\d+) ', line)
        if m:
            kind = f"{m.group(1).decode()} {m.group(2).decode()}"
            kinds[kind] += 1
            times[kind] += int(m.group(3)) / 1e6
    return sum(times.values()), ", ".join(f"{k} x{v} {times[k]:.2f} s"
                                          for k, v in kinds.most_common())


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def sync() -> None:
    subprocess.run(["sync"], check=True)


def timed_sync() -> float:
    """Seconds a sync takes: added to a large-file copy, whose data is on disk only then."""
    t0 = time.monotonic()
    sync()
    return time.monotonic() - t0


def copy_tool(base: Path, tool: str, src: Path, dest: str, n: int) -> tuple[float, str]:
    """Time one xrdcp or gfal-copy process copying the directory ``src`` to the fresh storage
    directory ``dest`` (under STORAGE); checks that all ``n`` files arrived, whole.
    (seconds, the command as printed)."""
    if tool == "xrdcp":   # it wants an existing directory for several files
        _, made = grid_as_user(["xrdfs", XRD_HOST, "mkdir", "-p", dest], base)
        if made.returncode != 0:
            sys.exit(f"xrdfs mkdir {dest} failed: {made.stderr}")
        cmd = ["xrdcp", "--silent", "--parallel", str(XRDCP_PARALLEL), "-r", f"{src}/",
               f"{XROOT}/{dest}/"]
        env, shown = XRDCP_ENV, (" ".join(f"{k}={v}" for k, v in XRDCP_ENV.items()) +
                                 f" {' '.join(cmd[:-2])} DIR/ {XROOT}/rucio/DEST/")
    else:
        cmd = ["gfal-copy", "-p", "-r", str(src), f"{ENDPOINT[upload.RSE]}/{dest}"]
        env, shown = {}, f"{' '.join(cmd[:-2])} DIR {ENDPOINT[upload.RSE]}/rucio/DEST"
    sync()
    seconds, proc = grid_as_user(cmd, base, **env)
    arrived = [p.stat().st_size for p in (STORAGE / dest.lstrip("/")).rglob("*") if p.is_file()]
    sent = sum(p.stat().st_size for p in src.iterdir())
    if proc.returncode != 0 or len(arrived) != n or sum(arrived) != sent:
        sys.exit(f"{tool}: exit {proc.returncode}, {len(arrived)}/{n} files and "
                 f"{sum(arrived)}/{sent} bytes arrived:\n"
                 f"{proc.stdout[-1000:]}{proc.stderr[-2000:]}")
    return seconds, shown


class Bulk(NamedTuple):
    """One timed worker run (ordered by its seconds, for the median)."""
    seconds: float
    requests: int
    server: float      # the server's time on those requests
    cpu: str           # the worker's CPU seconds, and the servers'
    kinds: str         # what the requests were
    waits: str         # with --xrd-log: how often XRootD told the worker to wait


def bulk_run(base: Path, name: str, root: Path, n: int, dataset: str = "") -> Bulk:
    """upload.plan_worker on the grid, with XRootD's client log at Debug if XRD_LOG says so
    (its "come back in 30 s" answers are invisible otherwise)."""
    log = base / f"xrd-{name}.log"
    if XRD_LOG:
        GRID_ENV.update(XRD_LOGLEVEL="Debug", XRD_LOGFILE=str(log))
    try:
        seconds, requests, _, _ = plan_worker(base, name, root, n, 4,   # 4: the default
                                              dataset)
    finally:
        GRID_ENV.pop("XRD_LOGLEVEL", None)
        GRID_ENV.pop("XRD_LOGFILE", None)
    waits = ""
    if XRD_LOG:
        with open(log, "rb") as fh:
            waits = f", {sum(b'Scheduling WaitTask' in line for line in fh)} XRootD waits"
        log.unlink()
    server, kinds = window(log_lines() - requests, requests)
    return Bulk(seconds, requests, server, CPU[str(VENV_BIN / "dac-upload")], kinds, waits)


def small_files(base: Path, n: int, runs: int, tag: str) -> None:
    rng = random.Random(42)
    sizes = [rng.randint(1024, 1024 * 1024) for _ in range(n)]
    stock_files = upload.write_set(base / "stock", sizes, f"s{tag}", 7)
    for k in range(runs):
        upload.write_set(base / f"bulk{k}", sizes, f"b{k}{tag}", 7)
        upload.write_set(base / f"xrdcp{k}", sizes, f"x{k}{tag}", 7)
    cfg = base / "rucio.cfg"    # dacuser's x509 client, with a token file of its own
    cfg.write_text(USER_CFG.read_text().rstrip("\n") +
                   f"\nauth_token_file_path = {base}/token/auth_token_for_account_dacuser\n")
    (base / "token").mkdir(exist_ok=True)
    chown(base)
    cfg.chmod(0o600)
    print(f"\n1. {n} files of 1 KiB-1 MiB ({sum(sizes) / 1e6:.1f} MB), one process each, "
          f"identical content under other names"
          f"{', each client into a dataset of its own' if DATASET else ', a rule per file'}; "
          f"{load()}")
    first = log_lines()
    sync()
    stock_s, stock_requests, _ = stock_cli(base, stock_files, cfg, f"s{tag}-*", n,
                                           f"{SCOPE}:gb{tag}_stock" if DATASET else "")
    stock_cpu, (stock_server, _) = CPU[str(upload.RUCIO_CLI)], window(first, stock_requests)
    bulk_runs, xrdcp_runs = [], []
    for k in range(runs):   # alternately, so that a disturbance hits both alike
        sync()
        bulk_runs.append(bulk_run(base, f"small{k}", base / f"bulk{k}", n,
                                  f"gb{tag}_bulk{k}" if DATASET else ""))
        xrdcp_s, cmd = copy_tool(base, "xrdcp", base / f"xrdcp{k}",
                                 f"/rucio/gridbench-{tag}/xrdcp{k}", n)
        xrdcp_runs.append((xrdcp_s, CPU["xrdcp"]))
    bulk = sorted(bulk_runs)[runs // 2]
    xrdcp_s, xrdcp_cpu = sorted(xrdcp_runs)[runs // 2]

    def median_of(values: list[tuple[float, ...]]) -> str:
        return (f"   (median of {', '.join(f'{v[0]:.2f}' for v in sorted(values))} s)"
                if runs > 1 else "")

    print(f"   stock : {stock_s:7.2f} s  {n / stock_s:8.1f} files/s   cpu {stock_cpu}   "
          f"$ rucio upload --rse {upload.RSE} --scope {SCOPE} --register-after-upload "
          f"<{n} files>")
    print(f"   bulk  : {bulk.seconds:7.2f} s  {n / bulk.seconds:8.1f} files/s   cpu "
          f"{bulk.cpu}   $ dac-upload worker --run RUN --task 0   ([upload] mode = "
          f"\"bulk\", defaults){median_of(bulk_runs)}{bulk.waits}")
    print(f"   xrdcp : {xrdcp_s:7.2f} s  {n / xrdcp_s:8.1f} files/s   cpu {xrdcp_cpu}   "
          f"$ {cmd}   (copy only){median_of(xrdcp_runs)}")
    print(f"   ratio : {stock_s / bulk.seconds:.1f}x the files/s of the stock client "
          "(target >= 20x)")
    print(f"   ratio : {xrdcp_s / bulk.seconds:.2f} of xrdcp's files/s, xrdcp's time / the "
          "worker's (target >= 0.5)")
    print(f"   {load()}")
    print(f"\n2. server requests per file (lines added to {ACCESS_LOG} meanwhile, by "
          "any client, and the server time they took)")
    print(f"   stock : {stock_requests / n:.3f} per file ({stock_requests} requests, "
          f"{stock_server:.2f} s of the server)")
    print(f"   bulk  : {bulk.requests / n:.3f} per file ({bulk.requests} requests, "
          f"{bulk.server:.2f} s of the server; target <= 0.05): {bulk.kinds}")
    for d in ("stock", *(f"bulk{k}" for k in range(runs)), *(f"xrdcp{k}" for k in range(runs))):
        shutil.rmtree(base / d)


def write_big(src: Path, k: int, size: int) -> None:
    """k files of ``size`` bytes: one 64 MiB random block repeated, each piece stamped with
    its file and position, so that no two pieces and no two files are alike."""
    block = random.Random(3).randbytes(64 * 2**20)
    src.mkdir(parents=True, exist_ok=True)
    for i in range(k):
        with open(src / f"big-{i}.dat", "wb") as fh:
            for j in range(0, size, len(block)):
                stamp = (i.to_bytes(4, "big") + j.to_bytes(8, "big"))
                fh.write((stamp + block[len(stamp):])[:size - j])


def large_files(base: Path, k: int, size: int, tag: str) -> None:
    src = base / "big"
    write_big(src, k, size)
    chown(base)
    total = k * size
    print(f"\n3. {k} files of {size / 2**30:.2f} GiB ({total / 1e6:.0f} MB), the same files "
          f"each way under fresh names, each followed by sync; {load()}")
    dest = f"/rucio/gridbench-{tag}"
    xrdcp_s, xrdcp_cmd = copy_tool(base, "xrdcp", src, f"{dest}/big-xrdcp", k)
    xrdcp_s, xrdcp_cpu = xrdcp_s + timed_sync(), CPU["xrdcp"]
    sync()
    bulk = bulk_run(base, "big", src, k)
    bulk_s = bulk.seconds + timed_sync()
    gfal_s, gfal_cmd = copy_tool(base, "gfal-copy", src, f"{dest}/big-gfal", k)
    gfal_s += timed_sync()

    def line(what: str, seconds: float, cpu: str, cmd: str) -> None:
        print(f"   {what:6}: {seconds:7.2f} s  {total / seconds / 1e6:8.1f} MB/s   "
              f"cpu {cpu}   $ {cmd} && sync")

    line("xrdcp", xrdcp_s, xrdcp_cpu, xrdcp_cmd)
    line("bulk", bulk_s, bulk.cpu, "dac-upload worker --run RUN --task 0   (adler32+md5 in "
         f"one read, copy, the storage's adler32, registration: {bulk.server:.2f} s of the "
         f"server{bulk.waits})")
    line("gfal", gfal_s, CPU["gfal-copy"], gfal_cmd)
    print(f"   ratio : {xrdcp_s / bulk_s:.2f} of xrdcp's MB/s (target >= 0.8)")
    print(f"   ratio : {gfal_s / bulk_s:.2f} of gfal-copy's MB/s")
    print(f"   {load()}")
    shutil.rmtree(src)


def grid_problem() -> str | None:
    """Why the grid stack cannot be benchmarked, if it cannot."""
    if os.geteuid() != 0:
        return "run as root: the benchmark acts as dacuser through runuser"
    ping = subprocess.run(["curl", "-sf", "--max-time", "10", "--capath", str(CA_DIR),
                           f"{URL}/ping"], capture_output=True, text=True, check=False)
    if ping.returncode != 0:
        return f"no answer from {URL}/ping: run tests/services/start-grid.sh"
    if not STORAGE.is_dir() or not PROXY.exists():
        return f"no {STORAGE} or {PROXY}: run tests/services/start-grid.sh"
    return None


def main() -> None:
    global XRDCP_PARALLEL, XRD_LOG, DATASET
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="a few files, the worker once (CI)")
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--big-files", type=int, default=4)
    ap.add_argument("--big-size", type=int, default=2**30)
    ap.add_argument("--rse", choices=sorted(ENDPOINT), default="ECHO_ROOT")
    ap.add_argument("--xrdcp-parallel", type=int, default=XRDCP_PARALLEL,
                    help=f"xrdcp --parallel (default {XRDCP_PARALLEL}: the fastest here)")
    ap.add_argument("--xrd-log", action="store_true",
                    help="the worker's XRootD client log at Debug, to count the server's waits")
    ap.add_argument("--skip", action="append", default=[], choices=["small", "large"],
                    help="leave a part out")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dac-upload-gridbench"))
    ap.add_argument("--dataset", action="store_true",
                    help="both clients put the small files into a dataset (one rule)")
    ap.add_argument("--upload", action="append", default=[], metavar="LINE",
                    help='another [upload] line for the worker\'s job, e.g. "md5 = false"')
    args = ap.parse_args()
    runs = upload.BULK_RUNS
    if args.small:
        args.files, args.big_files, args.big_size, runs = 20, 2, 8 * 2**20, 1
    problem = grid_problem()
    if problem:
        sys.exit(problem)
    XRDCP_PARALLEL, XRD_LOG = args.xrdcp_parallel, args.xrd_log
    UPLOAD_LINES.extend(args.upload)
    DATASET = args.dataset
    use_grid(args.rse)
    base, tag = args.dir, uuid.uuid4().hex[:8]
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    chown(base)
    version = subprocess.run([str(VENV_BIN / "dac-upload"), "--version"], capture_output=True,
                             text=True, check=False).stdout.strip()
    print(f"{version}; Rucio server {URL} (HTTPS, X.509 proxy, Apache + mod_wsgi, one "
          f"process, SQLite), RSE {args.rse} ({ENDPOINT[args.rse]}, XRootD, gfal2 NoRename); "
          f"{os.cpu_count()} CPUs" + (f"; [upload] {', '.join(args.upload)}" if args.upload
                                      else ""))
    try:
        if "small" not in args.skip:
            small_files(base, args.files, runs, tag)
        if "large" not in args.skip:
            large_files(base, args.big_files, args.big_size, tag)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(STORAGE / "rucio" / f"gridbench-{tag}", ignore_errors=True)


if __name__ == "__main__":
    main()
