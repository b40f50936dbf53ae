"""Credentials through a real run: a password or token reaches Rucio, and nothing the tool
writes (scripts, rucio.cfg, run.json, results, summary.json, Slurm logs, nightly.log, the
ledger) or prints ever contains it."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path
from typing import Any

import jobfiles
import pytest
from ithelpers import (
    RSE,
    RUCIO_URL,
    SCOPE,
    chown_user,
    dac_upload,
    load_summary,
    make_files,
    rucio_token,
    run_dir_of,
    unique_prefix,
    write_job,
)


def _userpass_identity(client: Any) -> tuple[str, str]:
    """A fresh identity of the root account with a password found nowhere else."""
    username = f"leak{uuid.uuid4().hex[:8]}"
    password = f"pw-{uuid.uuid4().hex}%x"       # a '%' too: config interpolation must cope
    client.add_identity(account="root", identity=username, authtype="USERPASS",
                        email="leak@localhost", password=password)
    return username, password


def _job(workdir: Path, name: str, auth: str, files_per_batch: int = 1000) -> Path:
    """A job uploading ../src into the test Rucio, its credentials named by ``auth``."""
    return write_job(workdir, name, jobfiles.job_text({
        "source": 'root = "../src"',
        "rucio": f'host = "{RUCIO_URL}"\naccount = "root"\nscope = "{SCOPE}"\nrse = "{RSE}"',
        "naming": f'prefix = "{unique_prefix()}"',
        "batching": f"files_per_batch = {files_per_batch}",
        "slurm": 'time = "00:10:00"\nmem = "1G"',
        "container": 'runtime = "none"',
    }, rucio=auth))


def _every_file(*roots: Path) -> list[Path]:
    out = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            out.extend(Path(dirpath) / n for n in names)
    return out


@pytest.mark.parametrize("kind", ["userpass", "token"])
def test_secret_never_written_or_printed(workdir: Path, rucio_client: Any, kind: str) -> None:
    if kind == "userpass":
        username, secret = _userpass_identity(rucio_client)
        (workdir / "pw").write_text(secret + "\n")
        (workdir / "pw").chmod(0o600)
        auth = f'auth_type = "userpass"\nusername = "{username}"\npassword_file = "../pw"'
    else:
        secret = rucio_token()
        (workdir / "bt").write_text(secret + "\n")
        (workdir / "bt").chmod(0o600)
        auth = 'auth_type = "token"\ntoken_file = "../bt"'
    make_files(workdir / "src", 6)
    job = _job(workdir, "leak", auth, files_per_batch=3)
    chown_user(workdir)
    outputs = []
    proc = dac_upload(["submit", str(job), "--wait", "--timeout", "300"], cwd=workdir)
    outputs.append(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = run_dir_of(proc.stdout)
    summary = load_summary(run_dir)
    assert summary["complete"] is True and summary["counts"]["uploaded"] == 6
    for args in (["status", str(run_dir)], ["collect", str(run_dir)],
                 ["doctor", str(job), "--probe"], ["nightly", str(job)]):
        proc = dac_upload(args, cwd=workdir)
        outputs.append(proc.stdout + proc.stderr)
        assert proc.returncode == 0, f"{args}: {proc.stdout}{proc.stderr}"

    cfg = run_dir / "rucio.cfg"
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert (f"auth_type = {'userpass' if kind == 'userpass' else 'oidc'}\n"
            in cfg.read_text())
    runs = job.parent / "leak" / "runs"
    assert (runs / "nightly.log").is_file() and list((run_dir / "logs").iterdir())
    needle = secret.strip("pw-%x")         # also found escaped ('%%') or quoted
    written = [p for p in _every_file(runs, job.parent) if needle.encode() in p.read_bytes()]
    assert written == []
    assert not any(needle in out for out in outputs)


def test_planned_run_is_not_submitted_with_credentials_opened_since(workdir: Path) -> None:
    (workdir / "pw").write_text("secret\n")
    (workdir / "pw").chmod(0o600)
    make_files(workdir / "src", 2)
    job = _job(workdir, "opened", 'auth_type = "userpass"\nusername = "ddmlab"\n'
                                  'password_file = "../pw"')
    planned = dac_upload(["plan", str(job)], cwd=workdir)
    assert planned.returncode == 0, planned.stderr
    assert "credentials:   http://127.0.0.1:18080 as account root with user 'ddmlab', " \
           f"password from {workdir / 'pw'}" in planned.stdout
    run_dir = run_dir_of(planned.stdout)
    (workdir / "pw").chmod(0o644)
    for args in (["submit", "--run", str(run_dir)], ["resubmit", str(run_dir)]):
        proc = dac_upload(args, cwd=workdir)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr == (f"error: password file {workdir / 'pw'} can be read by others "
                               f"(mode 644): run 'chmod 600 {workdir / 'pw'}'\n")
    assert not (run_dir / "array.submit1.0.sh").exists()      # nothing reached Slurm
    (workdir / "pw").chmod(0o600)
    proc = dac_upload(["submit", "--run", str(run_dir), "--wait", "--timeout", "300"],
                      cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert load_summary(run_dir)["complete"] is True
