"""doctor's checks without root or live services: Slurm, the worker's Python, the credential
files and the Rucio server are replaced one at a time, and each failure must be one FAIL
line with its fix, the checks that depend on it skipped."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from dac_upload import __version__, doctor, slurm
from dac_upload.config import JobConfig
from dac_upload.rucio import client as rucio_client
from dac_upload.rucio.errors import RucioUnavailable

USERPASS = 'auth_type = "userpass"\nusername = "jb"\npassword_file = "pw"'


def _worker_ok(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(args, 0, f"{__version__}\n", "")


@pytest.fixture
def healthy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slurm on PATH and answering; sbatch --test-only accepting."""
    monkeypatch.setattr(doctor.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(slurm, "slurm_version", lambda: "slurm 22.05.8")
    monkeypatch.setattr(slurm, "max_array_size", lambda: 1001)
    monkeypatch.setattr(slurm, "sbatch_test_only", lambda opts: "would start now")


def _job(make_job: Callable[..., JobConfig], tmp_path: Path, **extra: str) -> JobConfig:
    (tmp_path / "pw").write_text("secret\n")
    (tmp_path / "pw").chmod(0o600)
    return make_job(rucio=extra.pop("rucio", USERPASS), **extra)


def _by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


def test_an_invalid_job_file_is_all_it_says(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('[source]\nroot = "x"\n')
    checks = doctor.diagnose(str(path))
    assert {c.name for c in checks} == {"job file"} and doctor.failed(checks)
    assert any("'scope' is required" in c.detail for c in checks)


def test_slurm_not_on_path(make_job: Callable[..., JobConfig], tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    job = _job(make_job, tmp_path)
    monkeypatch.setattr(doctor.shutil, "which", lambda tool: None)
    monkeypatch.setattr(rucio_client, "ping", _down)
    check = _by_name(doctor.diagnose(str(job.path), run=_worker_ok))["slurm"]
    assert (check.status, check.detail) == ("FAIL", "sbatch, scontrol, squeue not found on PATH")
    assert "login node" in check.fix


def test_sbatch_refusing_the_options_names_them(make_job: Callable[..., JobConfig],
                                                tmp_path: Path, healthy: None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    job = _job(make_job, tmp_path, slurm='partition = "nope"')

    def refuse(opts: dict[str, Any]) -> str:
        raise slurm.SlurmError("invalid partition specified: nope")

    monkeypatch.setattr(slurm, "sbatch_test_only", refuse)
    monkeypatch.setattr(rucio_client, "ping", _down)
    check = _by_name(doctor.diagnose(str(job.path), run=_worker_ok))["sbatch"]
    assert check.status == "FAIL" and "partition nope" in check.detail
    assert "invalid partition specified" in check.detail and "sinfo -s" in check.fix


def test_the_workers_python_without_dac_upload(make_job: Callable[..., JobConfig],
                                               tmp_path: Path, healthy: None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    job = _job(make_job, tmp_path)
    monkeypatch.setattr(rucio_client, "ping", _down)

    def no_module(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(args, 1, "", "ModuleNotFoundError: No module "
                                           "named 'dac_upload'\n")

    check = _by_name(doctor.diagnose(str(job.path), run=no_module))["worker"]
    assert check.status == "FAIL"
    assert check.detail.endswith("dac-upload does not start (ModuleNotFoundError: No module "
                                 "named 'dac_upload')")
    assert check.fix == "pip install dac-upload into /usr/bin/python3's env"


def test_an_older_worker_is_a_warning(make_job: Callable[..., JobConfig], tmp_path: Path,
                                      healthy: None, monkeypatch: pytest.MonkeyPatch) -> None:
    job = _job(make_job, tmp_path)
    monkeypatch.setattr(rucio_client, "ping", _down)
    old = doctor.diagnose(str(job.path), run=lambda a: subprocess.CompletedProcess(
        a, 0, "0.0.1\n", ""))
    check = _by_name(old)["worker"]
    assert check.status == "WARN" and f"0.0.1, this host {__version__}" in check.detail


def test_a_password_file_open_to_others_skips_rucio(make_job: Callable[..., JobConfig],
                                                    tmp_path: Path, healthy: None) -> None:
    job = _job(make_job, tmp_path)
    (tmp_path / "pw").chmod(0o644)
    checks = doctor.diagnose(str(job.path), run=_worker_ok)
    names = _by_name(checks)
    assert any(c.status == "FAIL" and "pw" in c.detail for c in checks), checks
    assert names["rucio"].status == "SKIP" and "rucio server" not in names


def _down(creds: Any) -> str:
    raise RucioUnavailable("cannot reach the Rucio server http://rucio.invalid: refused")


def test_the_rucio_server_down(make_job: Callable[..., JobConfig], tmp_path: Path,
                               healthy: None, monkeypatch: pytest.MonkeyPatch) -> None:
    job = _job(make_job, tmp_path)
    monkeypatch.setattr(rucio_client, "ping", _down)
    checks = doctor.diagnose(str(job.path), run=_worker_ok)
    server = _by_name(checks)["rucio server"]
    assert server.status == "FAIL" and server.fix == "check [rucio] host; is the server up?"
    assert [c.name for c in checks][-1] == "rucio server"   # nothing asked of it after


def test_rucio_refusing_the_scope_skips_the_probe(make_job: Callable[..., JobConfig],
                                                  tmp_path: Path, healthy: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    job = _job(make_job, tmp_path)

    class Session:
        def checks(self, scope: str, rse: str, dataset_scope: str | None) -> list[Any]:
            return [("identity", True, "jb"), ("scope", False, f"scope {scope!r} not found")]

    @contextlib.contextmanager
    def session(creds: Any) -> Iterator[Session]:
        yield Session()

    monkeypatch.setattr(rucio_client, "ping", lambda creds: "41.0.0")
    monkeypatch.setattr(rucio_client, "fresh_session", session)
    checks = _by_name(doctor.diagnose(str(job.path), probe=True, run=_worker_ok))
    assert checks["rucio server"].status == "OK"
    assert (checks["scope"].status, checks["scope"].detail) == (
        "FAIL", "scope 'user.test' not found")
    assert checks["probe"].status == "SKIP"


def test_every_check_passing(make_job: Callable[..., JobConfig], tmp_path: Path,
                             healthy: None, monkeypatch: pytest.MonkeyPatch) -> None:
    job = _job(make_job, tmp_path)

    class Session:
        def checks(self, scope: str, rse: str, dataset_scope: str | None) -> list[Any]:
            return [("scope", True, "ok"), ("RSE", True, "ok")]

    @contextlib.contextmanager
    def session(creds: Any) -> Iterator[Session]:
        yield Session()

    monkeypatch.setattr(rucio_client, "ping", lambda creds: "41.0.0")
    monkeypatch.setattr(rucio_client, "fresh_session", session)
    checks = doctor.diagnose(str(job.path), run=_worker_ok)
    assert not doctor.failed(checks), [c.line() for c in checks if c.status == "FAIL"]
    assert _by_name(checks)["probe"].status == "SKIP"   # only with --probe
