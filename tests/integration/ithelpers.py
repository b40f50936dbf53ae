"""Helpers for the integration layer: the real Slurm and Rucio started by tests/services/.

The command under test runs as the unprivileged user ``dacuser`` (real users are never root,
and only a non-root worker can meet an unreadable file), from the venv that
tests/services/install.sh built with a non-editable install of this checkout.
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
from pathlib import Path
from typing import Any

CI_DIR = Path(os.environ.get("DAC_CI_DIR", "/tmp/dac-upload-ci"))
VENV_BIN = CI_DIR / "venv" / "bin"
RUCIO_CFG = CI_DIR / "rucio" / "etc" / "client.cfg"
RUCIO_URL = "http://127.0.0.1:18080"
RSE = "LOCAL_DISK"
SCOPE = "test"
USER = "dacuser"


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
             slurm: str = "", upload: str = "") -> str:
    """A job file for the tests: ../src into the test Rucio under ``prefix``, runtime none;
    ``rucio``, ``slurm`` and ``upload`` add lines to those sections."""
    return f"""
[source]
root = "../src"
include = ["{include}"]
[rucio]
scope = "{scope}"
rse = "{rse}"
config = "../rucio.cfg"
{rucio}
[naming]
prefix = "{prefix}"
[upload]
{upload}
[batching]
files_per_batch = {files_per_batch}
max_running = {max_running}
[slurm]
time = "00:10:00"
mem = "1G"
{slurm}
[container]
runtime = "none"
"""


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
