"""dac-upload doctor against the real Slurm and Rucio: a good job is all OK, each kind of
mistake gives its own FAIL line (and exit 1), and what plan or submit refuse doctor refuses,
in their words: the tree, the [slurm] values, and the run's own scripts through the real
sbatch --test-only."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable

import jobfiles
import pytest
from ithelpers import (
    RSE,
    RUCIO_URL,
    SCOPE,
    VENV_BIN,
    chown_user,
    dac_upload,
    rucio_token,
    write_job,
)

PASSWORD = "secret"   # the test server's ddmlab password (tests/services/start-rucio.sh)


def _job(workdir: Path, rucio: str = "", slurm: str = "", container: str = "",
         source: str = "", batching: str = "") -> Path:
    (workdir / "src").mkdir(exist_ok=True)
    (workdir / "src" / "a.dat").write_bytes(b"doctor")
    pw = workdir / "rucio.password"
    if not pw.exists():
        pw.write_text(PASSWORD + "\n")
        pw.chmod(0o600)
    base_slurm = {"time": '"00:10:00"', "mem": '"1G"'}
    for line in slurm.splitlines():   # a test's own time or mem replaces the base's
        base_slurm.pop(line.split("=")[0].strip(), None)
    return write_job(workdir, "doc", jobfiles.job_text({
        "source": 'root = "../src"',
        "rucio": f'host = "{RUCIO_URL}"\nauth_type = "userpass"\nusername = "ddmlab"\n'
                 f'password_file = "../rucio.password"\naccount = "root"\nscope = "{SCOPE}"\n'
                 f'rse = "{RSE}"',
        "slurm": "\n".join(f"{k} = {v}" for k, v in base_slurm.items()),
        "container": 'runtime = "none"',
    }, rucio=rucio, slurm=slurm, container=container, source=source,
                   batching=batching))


def _doctor(workdir: Path, job: Path, *args: str, **env: str) -> tuple[int, list[str]]:
    proc = dac_upload(["doctor", str(job), *args], cwd=workdir, **env)
    return proc.returncode, proc.stdout.splitlines()


def _fails(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("FAIL")]


def test_good_job_is_all_ok_and_probe_round_trips(workdir: Path,
                                                  rucio_client: Any) -> None:
    job = _job(workdir)
    code, lines = _doctor(workdir, job, "--probe")
    assert code == 0, "\n".join(lines)
    assert lines[-1] == "all checks passed"
    names = [line.split(":")[0] for line in lines[:-1]]
    assert names == ["OK   job file", "OK   source", "OK   plan", "OK   slurm",
                     "OK   sbatch array", "OK   sbatch collector", "OK   worker",
                     "OK   credentials", "SKIP CA directory", "OK   password file",
                     "OK   rucio server", "OK   identity", "OK   scope", "OK   RSE",
                     "OK   RSE write", "OK   quota", "OK   probe"]
    probe = lines[-2]
    assert "replica AVAILABLE, adler32 matches, read back identical" in probe
    did = probe.split("uploaded ", 1)[1].split(" ", 1)[0]
    scope, name = did.split(":", 1)
    assert name.startswith("dac-upload-probe/dacuser-")
    rules = list(rucio_client.list_did_rules(scope, name))   # what it says it left
    assert [r["rse_expression"] for r in rules] == [RSE] and rules[0]["expires_at"]
    assert PASSWORD not in "\n".join(lines)

    proc = dac_upload(["doctor", str(job), "--json"], cwd=workdir)
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0 and doc["ok"] is True
    assert {c["status"] for c in doc["checks"]} == {"OK", "SKIP"}


def _no_quota_rse(client: Any) -> str:
    rse = "NOQUOTA_" + uuid.uuid4().hex[:6].upper()
    client.add_rse(rse)
    return rse


def _blocked_rse(client: Any) -> str:
    rse = "BLOCKED_" + uuid.uuid4().hex[:6].upper()
    client.add_rse(rse)
    client.set_local_account_limit("root", rse, -1)
    client.update_rse(rse, {"availability_write": False})
    return rse


MISTAKES: list[tuple[str, dict[str, str], Callable[[Path, Any], dict[str, str]] | None, str]] = [
    ("unknown key", {"rucio": "scopes = 'x'"}, None,
     "FAIL job file: {job}: [rucio] unknown key 'scopes'; did you mean 'scope'?"),
    ("bad partition", {"slurm": 'partition = "nosuch"'}, None,
     "FAIL sbatch array: sbatch --test-only refuses the run's array script: sbatch: error: "
     "invalid partition specified: nosuch; fix [slurm] partition"),
    ("mem beyond the node", {"slurm": 'mem = "900G"'}, None,
     "FAIL sbatch array: sbatch --test-only refuses the run's array script: allocation "
     "failure: Requested node configuration is not available; fix [slurm] partition"),
    ("include matching nothing", {"source": 'include = ["**/*.fits"]'}, None,
     "FAIL plan: {job}: [source] include pattern '**/*.fits' matches no file under "
     "{w}/src; fix the pattern or the root"),
    ("password file open to others", {}, lambda w, c: (w / "rucio.password").chmod(0o644),
     "FAIL password file: password file {w}/rucio.password can be read by others "
     "(mode 644): run 'chmod 600 {w}/rucio.password'"),
    ("password file missing", {}, lambda w, c: (w / "rucio.password").unlink(),
     "FAIL password file: password file {w}/rucio.password not found: create it"),
    ("wrong password", {}, lambda w, c: (w / "rucio.password").write_text("wrong\n"),
     "FAIL identity: Rucio at http://127.0.0.1:18080 refused the credentials "
     "(CannotAuthenticate: "),
    ("unknown scope", {}, None,
     "FAIL scope: Rucio scope 'nosuch.scope' ([rucio] scope) does not exist"),
    ("unknown RSE", {}, None, "FAIL RSE: RSE 'NOSUCH_RSE' does not exist; check [rucio] rse"),
    ("no quota", {}, None, "FAIL quota: account 'root' has no quota on"),
    ("write blocked", {}, None, "FAIL RSE write: RSE"),
    ("server down", {}, None,
     "FAIL rucio server: cannot reach the Rucio server http://127.0.0.1:9: "),
    ("missing CA directory", {"rucio": 'ca_dir = "/nonexistent/certificates"'}, None,
     "FAIL CA directory: CA directory /nonexistent/certificates does not exist"),
    ("no apptainer", {"container": ""}, None,
     "FAIL apptainer: apptainer (or singularity) not found on PATH"),
    ("no slurm", {}, None, "FAIL slurm: sbatch, scontrol, squeue not found on PATH"),
]


@pytest.mark.parametrize(("what", "edits", "breakage", "expected"), MISTAKES,
                         ids=[m[0] for m in MISTAKES])
def test_each_mistake_is_its_own_fail_line(workdir: Path, rucio_client: Any, what: str,
                                           edits: dict[str, str],
                                           breakage: Callable[..., Any] | None,
                                           expected: str) -> None:
    env: dict[str, str] = {}
    job = _job(workdir, edits.get("rucio", ""), edits.get("slurm", ""),
               edits.get("container", ""), edits.get("source", ""))
    text = job.read_text()
    if what == "unknown scope":
        text = text.replace(f'scope = "{SCOPE}"', 'scope = "nosuch.scope"')
    elif what == "unknown RSE":
        text = text.replace(f'rse = "{RSE}"', 'rse = "NOSUCH_RSE"')
    elif what == "no quota":
        text = text.replace(f'rse = "{RSE}"', f'rse = "{_no_quota_rse(rucio_client)}"')
    elif what == "write blocked":
        text = text.replace(f'rse = "{RSE}"', f'rse = "{_blocked_rse(rucio_client)}"')
    elif what == "server down":
        text = text.replace(RUCIO_URL, "http://127.0.0.1:9")
    elif what == "no apptainer":
        text = text.replace('runtime = "none"', 'runtime = "apptainer"\nimage = "/x.sif"')
    elif what == "no slurm":
        env["PATH"] = f"{VENV_BIN}"
    job.write_text(text)
    if breakage is not None:
        breakage(workdir, rucio_client)
    chown_user(workdir)
    code, lines = _doctor(workdir, job, **env)
    assert code == 1, "\n".join(lines)
    want = expected.format(job=job, w=workdir)
    fails = _fails(lines)
    assert len(fails) == 1, "\n".join(lines)
    assert fails[0].startswith(want), f"{fails[0]!r} does not start with {want!r}"
    assert any(fix in fails[0] for fix in ("; fix", "run 'chmod", ": set ", "ask ", "check ",
                                           "create it", "did you mean")), fails[0]
    assert lines[-1] == "1 check(s) failed"
    assert PASSWORD not in "\n".join(lines)


def test_token_auth_with_a_rucio_token(workdir: Path) -> None:
    """auth_type token: the token file (as a token agent keeps it) is all the tasks need."""
    token = workdir / "token.txt"
    token.write_text(rucio_token() + "\n")
    token.chmod(0o600)
    job = _job(workdir)
    text = job.read_text().replace('auth_type = "userpass"\nusername = "ddmlab"\n'
                                   'password_file = "../rucio.password"\n',
                                   'auth_type = "token"\ntoken_file = "../token.txt"\n')
    job.write_text(text)
    chown_user(workdir)
    code, lines = _doctor(workdir, job)
    assert code == 0, "\n".join(lines)
    assert f"OK   token file: {token} is readable by you alone" in lines
    assert "OK   identity: authenticated to http://127.0.0.1:18080 as account 'root'" in lines



def _plan_errors(workdir: Path, job: Path) -> list[str]:
    """plan --offline's error lines (its Rucio preflight is doctor's own Rucio checks)."""
    proc = dac_upload(["plan", "--offline", str(job)], cwd=workdir)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    return [line.removeprefix("error: ") for line in proc.stderr.splitlines()
            if line.startswith("error: ")]


def test_doctor_refuses_what_plan_refuses_in_its_words(workdir: Path) -> None:
    """A new user's job that doctor used to pass: an include pattern that matches nothing, a
    [slurm] extra key dac-upload sets itself, files plan refuses. doctor's FAIL lines are
    plan's lines, and sbatch is not asked about scripts plan would never write."""
    job = _job(workdir, source='include = ["**/*.dat", "**/*.fits"]',
               slurm='extra = {time = "01:00:00"}')
    src = workdir / "src"
    os.mkfifo(src / "pipe.dat")
    for name in ("l1.dat", "l2.dat", "l3.dat"):
        os.symlink(workdir / "gone", src / name)
    chown_user(workdir)
    said = _plan_errors(workdir, job)
    assert len(said) == 6, said   # the extra key, 4 refused files, the pattern
    code, lines = _doctor(workdir, job)
    assert code == 1, "\n".join(lines)
    assert [line.removeprefix("FAIL plan: ") for line in _fails(lines)] == said
    assert f"FAIL plan: {job}: [slurm] extra sets time: use the [slurm] key(s) of that name " \
           "instead" in lines
    assert f"FAIL plan: {src}/pipe.dat: not a regular file" in lines
    assert "SKIP sbatch: the plan above must pass first: the scripts sbatch gets are " \
           "rendered from it" in lines
    assert not any("sbatch --help" in line for line in lines)
    assert not (job.parent / "doc" / "runs").exists() or not any(
        (job.parent / "doc" / "runs").iterdir())   # neither wrote a run


def test_an_account_with_a_space_is_refused_before_sbatch(workdir: Path) -> None:
    job = _job(workdir, slurm='account = "my project!"')
    chown_user(workdir)
    said = _plan_errors(workdir, job)
    assert len(said) == 1 and "'my project!'" in said[0], said
    code, lines = _doctor(workdir, job)
    assert code == 1 and len(_fails(lines)) == 1, "\n".join(lines)
    assert _fails(lines)[0].split(": ", 1)[1] == said[0]
    assert not any("Invalid directive" in line for line in lines)


def test_a_run_larger_than_max_array_size_is_tested_as_submit_sends_it(
        workdir: Path) -> None:
    """12 tasks on the test cluster's MaxArraySize 5: sbatch refuses --array=0-11 outright,
    but submit sends 0-4, 0-4 (+5), 0-1 (+10); doctor tests the first of them, for real."""
    job = _job(workdir, slurm='partition = "debug"', batching="files_per_batch = 1")
    for i in range(11):
        (workdir / "src" / f"f{i:02d}.dat").write_bytes(b"x")
    chown_user(workdir)
    code, lines = _doctor(workdir, job)
    assert code == 0, "\n".join(lines)
    assert "OK   plan: every check plan runs passes (nothing written): 12 files, 17 B in 12 " \
           "array tasks" in lines
    array = next(line for line in lines if line.startswith("OK   sbatch array: "))
    assert "partition debug" in array and "tasks 0-11 go as 3 arrays (MaxArraySize 5), " \
           "the first tested: --array 0-4" in array, array
    assert any(line.startswith("OK   sbatch collector: ") for line in lines)
