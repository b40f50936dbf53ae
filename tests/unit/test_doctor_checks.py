"""doctor's checks without root or live services: Slurm, the worker's Python, the credential
files and the Rucio server are replaced one at a time, and each failure must be one FAIL
line with its fix, the checks that depend on it skipped. The dry plan is plan's own code on a
real tree: doctor must refuse what plan refuses, in plan's words."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from dac_upload import __version__, doctor, pipeline, slurm
from dac_upload.config import ConfigError, JobConfig, load_job
from dac_upload.rucio import client as rucio_client
from dac_upload.rucio import preflight
from dac_upload.rucio.credentials import resolve
from dac_upload.rucio.errors import RucioFatal, RucioUnavailable

USERPASS = 'auth_type = "userpass"\nusername = "jb"\npassword_file = "pw"'


def _worker_ok(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(args, 0, f"{__version__}\n", "")


class Sbatch:
    """sbatch --test-only as slurm.script_problems asks it: what it was given, and a
    refusal for scripts holding ``refuse`` (the line submit would print)."""

    def __init__(self) -> None:
        self.tested: list[tuple[str, str]] = []
        self.refuse: str | None = None

    def __call__(self, what: str, script: str) -> list[str]:
        self.tested.append((what, script))
        if self.refuse is not None and self.refuse in script:
            return [f"sbatch --test-only refuses the run's {what}: sbatch: error: invalid "
                    "partition specified: nope; fix [slurm] partition, account, time, mem or "
                    "extra in the job file"]
        return []


@pytest.fixture
def sbatch(monkeypatch: pytest.MonkeyPatch) -> Sbatch:
    """Slurm on PATH and answering (MaxArraySize 5, as the test cluster's); sbatch
    --test-only accepting unless told otherwise; the Rucio server down (a FAIL of its own
    that the tests here look past)."""
    fake = Sbatch()
    monkeypatch.setattr(doctor.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(slurm, "slurm_version", lambda: "slurm 22.05.8")
    monkeypatch.setattr(slurm, "max_array_size", lambda: 5)
    monkeypatch.setattr(slurm, "script_problems", fake)
    monkeypatch.setattr(rucio_client, "ping", _down)
    return fake


def _job(make_job: Callable[..., JobConfig], tmp_path: Path, **extra: Any) -> JobConfig:
    (tmp_path / "pw").write_text("secret\n")
    (tmp_path / "pw").chmod(0o600)
    return make_job(extra.pop("files", None), rucio=extra.pop("rucio", USERPASS), **extra)


def _by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


def _fails(checks: list[doctor.Check], name: str) -> list[str]:
    return [c.detail for c in checks if c.name == name and c.status == "FAIL"]


def _plan_says(path: Path) -> list[str]:
    """What plan prints for this job file (its error lines), from plan's own code."""
    try:
        job = load_job(str(path))
    except ConfigError as exc:
        return list(exc.lines)
    try:
        pipeline.dry_plan(job)
    except pipeline.PlanError as exc:
        return list(exc.lines)
    return []


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
    checks = _by_name(doctor.diagnose(str(job.path), run=_worker_ok))
    check = checks["slurm"]
    assert (check.status, check.detail) == ("FAIL", "sbatch, scontrol, squeue not found on PATH")
    assert "login node" in check.fix
    assert checks["sbatch"].status == "SKIP"


# ----------------------------------------------------------------------------- the dry plan
def test_a_good_tree_is_one_ok_plan_line_with_the_counts(make_job: Callable[..., JobConfig],
                                                          tmp_path: Path,
                                                          sbatch: Sbatch) -> None:
    job = _job(make_job, tmp_path, files={"a.fits": b"12345", "b.fits": b"678",
                                          "c.fits": b"9"},
               batching="files_per_batch = 2")
    checks = doctor.diagnose(str(job.path), run=_worker_ok)
    plan = _by_name(checks)["plan"]
    assert (plan.status, plan.detail) == (
        "OK", "every check plan runs passes (nothing written): 3 files, 9 B in 2 array tasks")
    assert not job.runs_dir.exists()   # a dry plan writes nothing
    names = [c.name for c in checks]
    assert names[:7] == ["job file", "source", "plan", "slurm", "sbatch array",
                         "sbatch collector", "worker"]


def test_skipped_files_and_plans_notes_are_said(make_job: Callable[..., JobConfig],
                                                tmp_path: Path, sbatch: Sbatch) -> None:
    job = _job(make_job, tmp_path, source='symlinks = "skip"', job='runs_dir = "data/runs"')
    os.symlink(job.source.root / "a.fits", job.source.root / "link.fits")
    checks = doctor.diagnose(str(job.path), run=_worker_ok)
    plan = [c for c in checks if c.name == "plan"]
    assert (plan[0].status, plan[0].detail) == (
        "OK", "every check plan runs passes (nothing written): 1 file, 5 B in 1 array task, "
        "1 skipped (plan lists them in skipped.jsonl)")
    assert [(c.status, c.detail) for c in plan[1:]] == [
        ("WARN", note) for note in pipeline.dry_plan(job).notes]
    assert len(plan) == 2 and "runs folder" in plan[1].detail


def test_an_include_pattern_matching_nothing_is_plans_own_line(
        make_job: Callable[..., JobConfig], tmp_path: Path, sbatch: Sbatch) -> None:
    job = _job(make_job, tmp_path, source='include = ["**/*.fits", "**/*.hdf5"]')
    checks = doctor.diagnose(str(job.path), run=_worker_ok)
    assert _fails(checks, "plan") == _plan_says(job.path) == [
        f"{job.path}: [source] include pattern '**/*.hdf5' matches no file under "
        f"{job.source.root}; fix the pattern or the root"]
    assert _by_name(checks)["sbatch"].status == "SKIP"   # no plan, no scripts to test
    assert sbatch.tested == []


def test_a_reserved_slurm_extra_key_is_plans_line_not_sbatchs(
        make_job: Callable[..., JobConfig], tmp_path: Path, sbatch: Sbatch) -> None:
    job = _job(make_job, tmp_path, slurm='extra = {time = "01:00:00"}')
    checks = doctor.diagnose(str(job.path), run=_worker_ok)
    fails = _fails(checks, "plan")
    assert fails == _plan_says(job.path) == [
        f"{job.path}: [slurm] extra sets time: use the [slurm] key(s) of that name instead"]
    assert sbatch.tested == [] and not any("sbatch --help" in c.line() for c in checks)
    assert [c.name for c in checks if c.status == "FAIL"] == ["plan", "rucio server"]


def test_an_unknown_slurm_extra_option_is_named(make_job: Callable[..., JobConfig],
                                                tmp_path: Path, sbatch: Sbatch) -> None:
    job = _job(make_job, tmp_path, slurm='extra = {qoss = "x"}')
    fails = _fails(doctor.diagnose(str(job.path), run=_worker_ok), "plan")
    assert fails == _plan_says(job.path)
    assert len(fails) == 1 and "[slurm] extra: unknown sbatch option(s): qoss" in fails[0]


def test_an_account_with_a_space_is_refused_as_plan_refuses_it(
        make_job: Callable[..., JobConfig], tmp_path: Path, sbatch: Sbatch) -> None:
    """Plan refuses it (render.sbatch_value_problems, or the job file's own rule once
    config.py checks it): doctor says the same line, before any sbatch."""
    (tmp_path / "pw").write_text("secret\n")
    (tmp_path / "pw").chmod(0o600)
    from unit_helpers import job_text, write_job, write_tree

    write_tree(tmp_path / "data", {"a.fits": b"hello"})
    path = write_job(tmp_path, job_text(rucio=USERPASS, slurm='account = "my project!"'))
    checks = doctor.diagnose(str(path), run=_worker_ok)
    said = _plan_says(path)
    assert len(said) == 1 and "'my project!'" in said[0]
    assert [c.detail for c in checks if c.status == "FAIL"][:1] == said
    assert sbatch.tested == []


def test_the_files_plan_refuses_are_fail_lines(make_job: Callable[..., JobConfig],
                                               tmp_path: Path, sbatch: Sbatch) -> None:
    job = _job(make_job, tmp_path, files={"a.fits": b"1", "b c.fits": b"2"})
    root = job.source.root
    os.mkfifo(root / "p.fits")
    os.symlink(root / "gone.fits", root / "l1.fits")
    os.symlink(root / "gone.fits", root / "l2.fits")
    checks = doctor.diagnose(str(job.path), run=_worker_ok)
    fails = _fails(checks, "plan")
    assert fails == _plan_says(job.path)
    assert fails[:3] == [f"{root}/l1.fits: dangling symlink", f"{root}/l2.fits: dangling "
                         "symlink", f"{root}/p.fits: not a regular file"]
    assert len(fails) == 4 and fails[3].startswith(f"{root}/b c.fits: the name contains")
    assert _by_name(checks)["sbatch"].status == "SKIP"


def test_many_plan_lines_are_cut_with_how_many_more(make_job: Callable[..., JobConfig],
                                                    tmp_path: Path, sbatch: Sbatch) -> None:
    files: dict[str, bytes] = {f"bad {i:02d}.fits": b"x" for i in range(25)}
    job = _job(make_job, tmp_path, files=files)
    for i in range(25):
        os.mkfifo(job.source.root / f"p{i:02d}.fits")
    said = _plan_says(job.path)
    assert len(said) == 42   # 20 + 1 refused, 20 + 1 naming: more than doctor shows
    plan = [c for c in doctor.diagnose(str(job.path), run=_worker_ok) if c.name == "plan"]
    assert [c.detail for c in plan[:-1]] == said[:doctor.MAX_PLAN_LINES]
    assert plan[-1].detail == f"... and {42 - doctor.MAX_PLAN_LINES} more lines like these"
    assert "dac-upload plan --offline" in plan[-1].fix
    assert all(c.status == "FAIL" for c in plan)


def test_nothing_to_upload_fails_with_the_fix(make_job: Callable[..., JobConfig],
                                              tmp_path: Path, sbatch: Sbatch) -> None:
    job = _job(make_job, tmp_path, files={}, source='symlinks = "skip"')
    os.symlink(tmp_path / "pw", job.source.root / "link.fits")   # matched, then skipped
    plan = _by_name(doctor.diagnose(str(job.path), run=_worker_ok))["plan"]
    assert (plan.status, plan.detail) == (
        "FAIL", f"{job.path}: nothing to upload under {job.source.root}")
    assert "[source]" in plan.fix


def test_a_source_that_is_not_a_directory_skips_the_plan(make_job: Callable[..., JobConfig],
                                                         tmp_path: Path,
                                                         sbatch: Sbatch) -> None:
    job = _job(make_job, tmp_path)
    shutil.rmtree(job.source.root)
    checks = _by_name(doctor.diagnose(str(job.path), run=_worker_ok))
    assert checks["source"].status == "FAIL"
    assert (checks["plan"].status, checks["plan"].detail) == (
        "SKIP", "the source above must be fixed first")


def test_unresolvable_credentials_skip_the_plan_and_fail_once(
        make_job: Callable[..., JobConfig], tmp_path: Path, sbatch: Sbatch) -> None:
    job = _job(make_job, tmp_path, rucio=USERPASS + '\nconfig = "no-such.cfg"')
    checks = doctor.diagnose(str(job.path), run=_worker_ok)
    assert _by_name(checks)["plan"].status == "SKIP"
    assert len([c for c in checks if c.status == "FAIL"]) == 1
    assert "no-such.cfg" in _fails(checks, "credentials")[0]


# ----------------------------------------------------------------------------- the scripts
def _sbatch_lines(script: str) -> dict[str, str]:
    """A script's #SBATCH header as {option: value} (simple-slurm pads the value)."""
    return dict(re.match(r"#SBATCH --(\S+)\s+(.*)", ln).groups()   # type: ignore[union-attr]
                for ln in script.splitlines() if ln.startswith("#SBATCH "))


def test_sbatch_gets_the_scripts_plan_renders(make_job: Callable[..., JobConfig],
                                              tmp_path: Path, sbatch: Sbatch) -> None:
    job = _job(make_job, tmp_path, slurm='partition = "short"\nmem = "3G"')
    checks = _by_name(doctor.diagnose(str(job.path), run=_worker_ok))
    assert [what for what, _ in sbatch.tested] == ["array script", "collector script"]
    array, collector = (script for _, script in sbatch.tested)
    header = _sbatch_lines(array)
    assert array.startswith("#!/bin/bash\n") and " -m dac_upload worker --run " in array
    assert (header["partition"], header["mem"], header["array"], header["export"]) == (
        "short", "3G", "0%4", "ALL,DAC_UPLOAD_TASK_OFFSET=0")
    assert _sbatch_lines(collector)["job-name"] == f"dacu-{job.name}-collect"
    assert _sbatch_lines(collector)["dependency"] == "afterany:ARRAY_JOB_ID"  # slurm.py drops it
    run_dir = next(ln for ln in array.splitlines() if ln.startswith("RUN_DIR="))
    assert run_dir.startswith(f"RUN_DIR={job.runs_dir.resolve()}/") and not job.runs_dir.exists()
    assert checks["sbatch array"].status == checks["sbatch collector"].status == "OK"
    assert "partition short" in checks["sbatch array"].detail


def test_a_run_larger_than_max_array_size_is_tested_as_submit_sends_it(
        make_job: Callable[..., JobConfig], tmp_path: Path, sbatch: Sbatch) -> None:
    job = _job(make_job, tmp_path, files={f"f{i:02d}.fits": b"x" for i in range(12)},
               batching="files_per_batch = 1\nmax_running = 3")
    checks = _by_name(doctor.diagnose(str(job.path), run=_worker_ok))
    assert _sbatch_lines(sbatch.tested[0][1])["array"] == "0-4%3"   # the first of 5 + 5 + 2
    assert "tasks 0-11 go as 3 arrays (MaxArraySize 5)" in checks["sbatch array"].detail
    planned = pipeline.dry_plan(job)
    whole = pipeline.render_scripts(planned.job, "R", tmp_path / "R", "py", planned.creds,
                                    planned.batches)
    assert _sbatch_lines(whole.array)["array"] == "0-11%3"   # what plan writes: all of them
    assert _sbatch_lines(whole.array).keys() == _sbatch_lines(sbatch.tested[0][1]).keys()


def test_sbatch_refusing_the_array_skips_the_collector(make_job: Callable[..., JobConfig],
                                                       tmp_path: Path,
                                                       sbatch: Sbatch) -> None:
    job = _job(make_job, tmp_path, slurm='partition = "nope"')
    sbatch.refuse = "nope"
    checks = doctor.diagnose(str(job.path), run=_worker_ok)
    assert _fails(checks, "sbatch array") == [
        "sbatch --test-only refuses the run's array script: sbatch: error: invalid partition "
        "specified: nope; fix [slurm] partition, account, time, mem or extra in the job file"]
    assert _by_name(checks)["sbatch collector"].status == "SKIP"
    assert len(sbatch.tested) == 1


def test_sbatch_refusing_the_collector_alone(make_job: Callable[..., JobConfig],
                                             tmp_path: Path, sbatch: Sbatch) -> None:
    job = _job(make_job, tmp_path)
    sbatch.refuse = "-collect"
    checks = _by_name(doctor.diagnose(str(job.path), run=_worker_ok))
    assert checks["sbatch array"].status == "OK"
    assert checks["sbatch collector"].status == "FAIL"
    assert checks["sbatch collector"].detail.startswith(
        "sbatch --test-only refuses the run's collector script: ")


def test_the_real_script_problems_drops_only_the_dependency(
        make_job: Callable[..., JobConfig], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """slurm.test_script sees the collector without its placeholder dependency, the rest
    as rendered (the real Slurm refuses 'afterany:ARRAY_JOB_ID': 'Job dependency problem')."""
    job = _job(make_job, tmp_path)
    seen: list[str] = []
    monkeypatch.setattr(doctor.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(slurm, "slurm_version", lambda: "slurm 22.05.8")
    monkeypatch.setattr(slurm, "max_array_size", lambda: 1001)
    monkeypatch.setattr(slurm, "test_script", lambda s: seen.append(s) or "Job 1 to start")
    monkeypatch.setattr(rucio_client, "ping", _down)
    checks = _by_name(doctor.diagnose(str(job.path), run=_worker_ok))
    assert checks["sbatch collector"].status == "OK"
    assert "dependency" not in _sbatch_lines(seen[1]) and "-collect" in seen[1]
    assert _sbatch_lines(seen[1])["cpus-per-task"] == "2"


# ----------------------------------------------------------------------------- the worker
def test_the_workers_python_without_dac_upload(make_job: Callable[..., JobConfig],
                                               tmp_path: Path, sbatch: Sbatch) -> None:
    job = _job(make_job, tmp_path)

    def no_module(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(args, 1, "", "ModuleNotFoundError: No module "
                                           "named 'dac_upload'\n")

    check = _by_name(doctor.diagnose(str(job.path), run=no_module))["worker"]
    assert check.status == "FAIL"
    assert check.detail.endswith("dac-upload does not start (ModuleNotFoundError: No module "
                                 "named 'dac_upload')")
    assert check.fix == "pip install dac-upload into /usr/bin/python3's env"


def test_an_older_worker_is_a_warning(make_job: Callable[..., JobConfig], tmp_path: Path,
                                      sbatch: Sbatch) -> None:
    job = _job(make_job, tmp_path)
    old = doctor.diagnose(str(job.path), run=lambda a: subprocess.CompletedProcess(
        a, 0, "0.0.1\n", ""))
    check = _by_name(old)["worker"]
    assert check.status == "WARN" and f"0.0.1, this host {__version__}" in check.detail


# ----------------------------------------------------------------------------- credentials, Rucio
def test_a_password_file_open_to_others_skips_rucio(make_job: Callable[..., JobConfig],
                                                    tmp_path: Path, sbatch: Sbatch) -> None:
    job = _job(make_job, tmp_path)
    (tmp_path / "pw").chmod(0o644)
    checks = doctor.diagnose(str(job.path), run=_worker_ok)
    names = _by_name(checks)
    assert [c.detail for c in checks if c.status == "FAIL"] == [
        f"password file {tmp_path}/pw can be read by others (mode 644): run "
        f"'chmod 600 {tmp_path}/pw'"]
    assert names["rucio"].status == "SKIP" and "rucio server" not in names


def _down(creds: Any) -> str:
    raise RucioUnavailable("cannot reach the Rucio server http://rucio.invalid: refused")


def test_the_rucio_server_down(make_job: Callable[..., JobConfig], tmp_path: Path,
                               sbatch: Sbatch) -> None:
    job = _job(make_job, tmp_path)
    checks = doctor.diagnose(str(job.path), run=_worker_ok)
    server = _by_name(checks)["rucio server"]
    assert server.status == "FAIL" and server.fix == "check [rucio] host; is the server up?"
    assert [c.name for c in checks][-1] == "rucio server"   # nothing asked of it after


class _Session:
    """RucioIO as the preflight and doctor use it: ``checks`` (preflight keeps the failed)."""

    def __init__(self, results: list[tuple[str, bool, str]]) -> None:
        self.results = results

    def checks(self, scope: str, rse: str, dataset_scope: str | None) -> list[Any]:
        return list(self.results)

    def preflight(self, scope: str, rse: str, dataset_scope: str | None = None) -> list[str]:
        return [detail for _, ok, detail in self.results if not ok]


def _rucio(monkeypatch: pytest.MonkeyPatch, results: list[tuple[str, bool, str]]) -> None:
    @contextlib.contextmanager
    def session(creds: Any) -> Iterator[_Session]:
        yield _Session(results)

    monkeypatch.setattr(rucio_client, "ping", lambda creds: "41.0.0")
    monkeypatch.setattr(rucio_client, "fresh_session", session)


def test_rucio_refusing_the_scope_skips_the_probe(make_job: Callable[..., JobConfig],
                                                  tmp_path: Path, sbatch: Sbatch,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    job = _job(make_job, tmp_path)
    _rucio(monkeypatch, [("identity", True, "jb"), ("scope", False, "scope 'user.test' "
                                                                    "not found")])
    checks = _by_name(doctor.diagnose(str(job.path), probe=True, run=_worker_ok))
    assert checks["rucio server"].status == "OK"
    assert (checks["scope"].status, checks["scope"].detail) == (
        "FAIL", "scope 'user.test' not found")
    assert checks["probe"].status == "SKIP"


def _fatal(creds: Any) -> str:
    raise RucioFatal("https://rucio.invalid: the server's certificate is not signed by a CA "
                     "in /x: set [rucio] ca_dir")


def _write(path: Path, text: str, mode: int = 0o600) -> None:
    path.write_text(text)
    path.chmod(mode)


def _password_open(tmp: Path, mp: pytest.MonkeyPatch) -> str:
    (tmp / "pw").chmod(0o644)
    return USERPASS


def _password_missing(tmp: Path, mp: pytest.MonkeyPatch) -> str:
    (tmp / "pw").unlink()
    return USERPASS


def _certificate_missing(tmp: Path, mp: pytest.MonkeyPatch) -> str:
    _write(tmp / "k.pem", "k")
    return 'auth_type = "x509"\ncertificate = "nocert.pem"\nkey = "k.pem"'


def _key_open(tmp: Path, mp: pytest.MonkeyPatch) -> str:
    _write(tmp / "c.pem", "c", 0o644)
    _write(tmp / "k.pem", "k", 0o640)
    return 'auth_type = "x509"\ncertificate = "c.pem"\nkey = "k.pem"'


def _tls_refused(tmp: Path, mp: pytest.MonkeyPatch) -> str:
    mp.setattr(rucio_client, "ping", _fatal)
    return USERPASS


def _rucio_says_no(tmp: Path, mp: pytest.MonkeyPatch) -> str:
    _rucio(mp, [("identity", True, "ok"),
                ("scope", False, "Rucio scope 'user.test' does not exist"),
                ("RSE", True, "ok"), ("RSE write", False, "RSE 'TEST_RSE' is blocked"),
                ("quota", False, "account 'jb' has no quota on 'TEST_RSE'")])
    return USERPASS


BROKEN = [_password_open, _password_missing, _certificate_missing, _key_open, _tls_refused,
          _rucio_says_no]


@pytest.mark.parametrize("breakage", BROKEN, ids=[b.__name__.strip("_") for b in BROKEN])
def test_whatever_the_preflight_refuses_is_a_fail_line(
        make_job: Callable[..., JobConfig], tmp_path: Path, sbatch: Sbatch,
        monkeypatch: pytest.MonkeyPatch,
        breakage: Callable[[Path, pytest.MonkeyPatch], str]) -> None:
    """plan's online preflight (rucio.preflight.job_problems) and doctor, on the same job
    and the same (fake) server: every line the preflight refuses is one of doctor's FAILs,
    word for word, and doctor FAILs nothing else there."""
    (tmp_path / "pw").write_text("secret\n")
    (tmp_path / "pw").chmod(0o600)
    _rucio(monkeypatch, [("identity", True, "ok")])
    rucio = breakage(tmp_path, monkeypatch)
    job = make_job(rucio=rucio)
    creds = resolve(job.rucio, os.environ, os.getuid(), str(job.path))
    refused = preflight.job_problems(job, creds)
    assert refused, breakage.__name__
    checks = doctor.diagnose(str(job.path), run=_worker_ok)
    assert sorted(c.detail for c in checks if c.status == "FAIL") == sorted(refused)


def test_every_check_passing(make_job: Callable[..., JobConfig], tmp_path: Path,
                             sbatch: Sbatch, monkeypatch: pytest.MonkeyPatch) -> None:
    job = _job(make_job, tmp_path)
    _rucio(monkeypatch, [("scope", True, "ok"), ("RSE", True, "ok")])
    checks = doctor.diagnose(str(job.path), run=_worker_ok)
    assert not doctor.failed(checks), [c.line() for c in checks if c.status == "FAIL"]
    assert _by_name(checks)["probe"].status == "SKIP"   # only with --probe
    assert preflight.job_problems(job, resolve(job.rucio, os.environ, os.getuid(),
                                               str(job.path))) == []
