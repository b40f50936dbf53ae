"""Helpers for the integration layer: the real Slurm and Rucio started by tests/services/.

The command under test runs as the unprivileged user ``dacuser`` (real users are never root,
and only a non-root worker can meet an unreadable file), from the venv that
tests/services/install.sh built with a non-editable install of this checkout.

A test that takes the ``stack`` fixture runs once on each stack of STACKS: the plain-HTTP
Rucio with a POSIX RSE, and the grid stack (HTTPS + X.509 proxy, XRootD over root:// and
davs://, no rename). Its checks read Rucio through an admin client of that stack's server
and the bytes on the storage's own disk, never the tool's reports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jobfiles

CI_DIR = Path(os.environ.get("DAC_CI_DIR", "/tmp/dac-upload-ci"))
VENV_BIN = CI_DIR / "venv" / "bin"
RUCIO_CFG = CI_DIR / "rucio" / "etc" / "client.cfg"
RUCIO_URL = "http://127.0.0.1:18080"
RSE = "LOCAL_DISK"
SCOPE = "test"
USER = "dacuser"
SERVICES = Path(__file__).resolve().parents[1] / "services"
GRID_DIR = CI_DIR / "grid"
GRID_URL = "https://127.0.0.1:18443"
GRID_CA = GRID_DIR / "ca" / "certificates"
GRID_PROXY = Path(f"/home/{USER}/.globus/x509up_dac")   # made by tests/services/grid/ca.sh


@dataclass(frozen=True)
class Stack:
    """A Rucio server and an RSE of it, as the tests see them."""

    id: str              # posix | root | davs
    rse: str
    url: str             # the Rucio server
    data_dir: Path       # the storage's own disk: what a PFN's path is relative to
    admin_cfg: Path      # a rucio.cfg for root on that server (the independent checker)

    @property
    def grid(self) -> bool:
        return self.id != "posix"

    def path_of(self, pfn: str) -> Path:
        """The file on this machine's disk that holds a PFN's bytes."""
        if not self.grid:
            assert pfn.startswith("file://localhost/"), pfn
            return Path(pfn[len("file://localhost"):])
        url = urlparse(pfn)
        assert url.scheme == self.id and url.hostname == "localhost", pfn
        return self.data_dir / url.path.lstrip("/")

    def files_under(self, scope: str, prefix: str) -> list[Path]:
        """Every file on the storage under this test's names (temporary ones included)."""
        top = self.data_dir / ("rucio" if self.grid else "") / scope
        out = []
        for dirpath, _, names in os.walk(top):
            if f"/{prefix.rstrip('/')}" in dirpath + "/":
                out.extend(Path(dirpath) / n for n in names)
        return out

    def stop_server(self) -> None:
        script, env = (("stop-grid.sh", "rucio"), {}) if self.grid else \
            (("stop-rucio.sh",), {"RUCIO_BASE": str(CI_DIR / "rucio")})
        subprocess.run(["bash", str(SERVICES / script[0]), *script[1:]], check=True,
                       capture_output=True, env=dict(os.environ, **env))

    def start_server(self) -> None:
        script, env = ("start-grid.sh", {}) if self.grid else \
            ("start-rucio.sh", {"RUCIO_BASE": str(CI_DIR / "rucio")})
        subprocess.run(["bash", str(SERVICES / script)], check=True, capture_output=True,
                       env=dict(os.environ, **env))

    def client_cfg(self, workdir: Path) -> str:
        """The rucio.cfg a test's jobs use (``config = "../rucio.cfg"``), with the test's own
        token cache (and, on the grid, the test's own copy of the proxy)."""
        if not self.grid:
            return RUCIO_CFG.read_text().replace(str(CI_DIR / "rucio" / "token"),
                                                 str(workdir / "token"))
        return (f"[client]\nrucio_host = {GRID_URL}\nauth_host = {GRID_URL}\n"
                f"auth_type = x509_proxy\naccount = {USER}\nca_cert = {GRID_CA}\n"
                f"client_x509_proxy = {workdir / 'x509up'}\nrequest_retries = 3\n"
                f"auth_token_file_path = {workdir / 'token' / 'auth_token_for_account_dacuser'}\n")


STACKS = {
    "posix": Stack("posix", RSE, RUCIO_URL, CI_DIR / "rucio" / "rse", RUCIO_CFG),
    "root": Stack("root", "ECHO_ROOT", GRID_URL, GRID_DIR / "xrootd" / "data",
                  GRID_DIR / "rucio" / "etc" / "client-root.cfg"),
    "davs": Stack("davs", "ECHO_DAVS", GRID_URL, GRID_DIR / "xrootd" / "data",
                  GRID_DIR / "rucio" / "etc" / "client-root.cfg"),
}


def grid_problem() -> str | None:
    """Why the grid stack cannot be used, or None."""
    import ssl

    try:
        ctx = ssl.create_default_context(capath=str(GRID_CA))
        urllib.request.urlopen(f"{GRID_URL}/ping", timeout=5, context=ctx).read()
    except OSError as exc:
        return f"the grid stack is not up ({exc}): run tests/services/start-grid.sh"
    if not GRID_PROXY.is_file():
        return f"no proxy {GRID_PROXY}: run tests/services/start-grid.sh"
    return None


def _services_problem() -> str | None:
    if os.geteuid() != 0:
        return "the integration tests run as root (they act as dacuser through runuser)"
    if not (VENV_BIN / "dac-upload").exists():
        return f"no {VENV_BIN}/dac-upload: run tests/services/install.sh"
    try:
        subprocess.run(["sinfo", "-h"], check=True, capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "Slurm is not up: run tests/services/start-slurm.sh"
    try:
        urllib.request.urlopen(f"{RUCIO_URL}/ping", timeout=5).read()
    except OSError:
        return "the Rucio server is not up: run tests/services/start-rucio.sh"
    try:
        subprocess.run(["id", USER], check=True, capture_output=True)
    except subprocess.CalledProcessError:
        return f"user {USER} missing: run tests/services/install.sh"
    return None


def chown_user(path: Path) -> None:
    shutil.chown(path, USER, USER)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), *_ids())


def _ids() -> tuple[int, int]:
    import pwd

    pw = pwd.getpwnam(USER)
    return pw.pw_uid, pw.pw_gid


def user_env(**extra: str) -> dict[str, str]:
    """A clean, user-like environment for dacuser."""
    return {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": f"/home/{USER}",
            "USER": USER, "LANG": "C.UTF-8", **extra}


def as_user(args: list[str], cwd: Path, timeout: float = 600,
            **extra_env: str) -> subprocess.CompletedProcess:
    """Run a command as dacuser with a clean, user-like environment."""
    env = user_env(**extra_env)
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return subprocess.run([runuser, "-u", USER, "--", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def dac_upload(args: list[str], cwd: Path, timeout: float = 600,
               **extra_env: str) -> subprocess.CompletedProcess:
    return as_user([str(VENV_BIN / "dac-upload"), *args], cwd, timeout, **extra_env)


def write_job(workdir: Path, name: str, body: str) -> Path:
    jobs = workdir / "jobs"
    jobs.mkdir(exist_ok=True)
    path = jobs / f"{name}.toml"
    path.write_text(body)
    chown_user(workdir)
    return path


def submit_with_hook(workdir: Path, job: Path, hook: Path, variable: str,
                     value: str = "{run_id}") -> tuple[Path, str, str]:
    """Plan ``job``, then submit its run with the test-only ``hook`` installed as the
    workers' sitecustomize (on PYTHONPATH; sbatch --export=ALL passes it on) and
    ``variable`` set to ``value`` with the run's id in it: (run dir, array id, collector id).
    """
    planned = dac_upload(["plan", str(job)], cwd=workdir)
    assert planned.returncode == 0, planned.stderr
    run_dir = run_dir_of(planned.stdout)
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    hooks = workdir / "crash-hook"
    hooks.mkdir()
    shutil.copy(hook, hooks / "sitecustomize.py")
    chown_user(workdir)
    proc = dac_upload(["submit", "--run", str(run_dir)], cwd=workdir, PYTHONPATH=str(hooks),
                      **{variable: value.format(run_id=run_id)})
    assert proc.returncode == 0, proc.stderr
    return (run_dir, *parse_submitted(proc.stdout))


def unique_prefix() -> str:
    """Names in the long-lived test Rucio are unique per test run."""
    return f"it{time.strftime('%H%M%S')}{uuid.uuid4().hex[:6]}/"


def adler32_of(path: Path) -> str:
    return f"{zlib.adler32(path.read_bytes()) & 0xFFFFFFFF:08x}"


def wait_for_jobs(job_ids: list[str], timeout: float = 600) -> None:
    final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(job_ids),
                              "-o", "%i %T"], capture_output=True, text=True).stdout
        states = [line.split()[1] for line in out.splitlines() if line.strip()]
        if all(s in final for s in states):
            return
        time.sleep(0.5)
    raise AssertionError(f"jobs {job_ids} not finished after {timeout} s")


def parse_submitted(stdout: str) -> tuple[str, str]:
    """(first array job id, collector job id) from `dac-upload submit`/`resubmit` output."""
    arrays = parse_arrays(stdout)
    for line in stdout.splitlines():
        if line.startswith("submitted collector job"):
            return arrays[0], line.split()[3]
    raise AssertionError(f"no submission line in:\n{stdout}")


def parse_arrays(stdout: str) -> list[str]:
    """Every array job id `dac-upload submit`/`resubmit` reports."""
    return [line.split()[3].rstrip(":") for line in stdout.splitlines()
            if line.startswith("submitted array job")]


def run_dir_of(stdout: str) -> Path:
    for line in stdout.splitlines():
        if line.startswith("run directory:"):
            return Path(line.split(":", 1)[1].strip())
    raise AssertionError(f"no run directory in:\n{stdout}")


SUMMARY_SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "summary.schema.json"


def load_summary(run_dir: Path) -> dict[str, Any]:
    """The run's summary.json, validated against docs/summary.schema.json (every summary the
    integration layer reads goes through here)."""
    import jsonschema

    summary = json.loads((run_dir / "summary.json").read_text())
    jsonschema.validate(summary, json.loads(SUMMARY_SCHEMA.read_text()),
                        cls=jsonschema.Draft202012Validator)
    return summary


def job_toml(prefix: str, *, include: str = "**/*", scope: str = SCOPE, rse: str = RSE,
             files_per_batch: int = 4, max_running: int = 2, rucio: str = "",
             slurm: str = "", upload: str = "", packing: str = "") -> str:
    """A job file for the tests: ../src into the test Rucio under ``prefix``, runtime none;
    ``rucio``, ``slurm`` and ``upload`` add lines to those sections."""
    return jobfiles.job_text({
        "source": f'root = "../src"\ninclude = ["{include}"]',
        "rucio": f'scope = "{scope}"\nrse = "{rse}"\nconfig = "../rucio.cfg"',
        "naming": f'prefix = "{prefix}"',
        "batching": f"files_per_batch = {files_per_batch}\nmax_running = {max_running}",
        "slurm": 'time = "00:10:00"\nmem = "1G"',
        "container": 'runtime = "none"',
    }, rucio=rucio, slurm=slurm, upload=upload, packing=packing)


def make_files(root: Path, n: int, size: int = 20_000) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(n):
        p = root / f"f{i:03d}.dat"
        p.write_bytes(i.to_bytes(2, "big") * (size // 2 + i))
        out[p.name] = p
    return out


def rucio_token(password: str = "secret") -> str:
    """A Rucio token for root, fetched the way a token agent would (curl, no client)."""

    out = subprocess.run(["curl", "-sS", "-D", "-", "-o", "/dev/null",
                          "-H", "X-Rucio-Account: root", "-H", "X-Rucio-Username: ddmlab",
                          "-H", f"X-Rucio-Password: {password}",
                          f"{RUCIO_URL}/auth/userpass"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.lower().startswith("x-rucio-auth-token:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no token in {out}")
