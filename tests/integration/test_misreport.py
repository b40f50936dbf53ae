"""What a run says is what Rucio and the storage hold, under the faults that made it say
otherwise (issue: nothing lost, nothing misreported). Each test injects the fault the way a
user met it and checks the outcome with the independent checker (an admin client of the
stack's Rucio and the storage's own disk), not with the tool's summary alone."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import uuid
from pathlib import Path
from typing import Any

from ithelpers import (
    CI_DIR,
    RSE,
    RUCIO_URL,
    SCOPE,
    STACKS,
    chown_user,
    dac_upload,
    job_toml,
    load_summary,
    make_files,
    run_dir_of,
    unique_prefix,
    wait_for_jobs,
    write_job,
)
from test_faults import assert_in_rucio_once, status_json, wait_for_records


def _runs(workdir: Path) -> list[Path]:
    return sorted(p.parent for p in workdir.glob("**/runs/**/run.json"))


def test_killed_collector_is_seen_and_collected_again(workdir: Path, posix_stack: Any) -> None:
    """The collector cancelled while it waits for the array: status says the run is not
    collected (never "complete"), the next nightly resubmits the collector before planning
    anything new and the ledger gets the run's files; resubmit does the same by hand."""
    files = make_files(workdir / "src", 8)
    chown_user(workdir)
    prefix = unique_prefix()
    job = write_job(workdir, "coll", job_toml(prefix, files_per_batch=4, max_running=2))
    night = dac_upload(["nightly", str(job)], cwd=workdir)
    assert night.returncode == 0, night.stdout + night.stderr
    m = re.search(r"submitted array job\(s\) ([\d, ]+) and collector (\d+)", night.stdout)
    assert m, night.stdout
    arrays, collector = m.group(1).split(", "), m.group(2)
    subprocess.run(["scancel", collector], check=True)       # while pending (afterany)
    wait_for_jobs([*arrays, collector])
    (run_dir,) = _runs(workdir)
    assert not (run_dir / "summary.json").exists()
    st = status_json(run_dir, workdir)
    assert {t["state"] for t in st["tasks"]} == {"done"}
    assert st["summary"]["state"] == "not collected"
    assert st["next"].startswith(f"dac-upload resubmit {run_dir} (the run is not collected")
    text = dac_upload(["status", str(run_dir)], cwd=workdir).stdout
    assert "summary: not collected: no summary.json yet" in text and "nothing:" not in text
    ledger = Path(json.loads((run_dir / "run.json").read_text())["ledger"])

    again = dac_upload(["nightly", str(job), "--wait", "--timeout", "300"], cwd=workdir)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"the previous run {run_dir.name} is not collected" in again.stdout + again.stderr
    assert len(_runs(workdir)) == 1                           # nothing new planned meanwhile
    summary = load_summary(run_dir)
    assert summary["complete"] is True and summary["counts"]["uploaded"] == 8
    with sqlite3.connect(ledger) as db:
        assert db.execute("SELECT COUNT(*) FROM files WHERE status = 'uploaded'"
                          ).fetchone() == (8,)
    assert status_json(run_dir, workdir)["next"].startswith("nothing")
    assert_in_rucio_once(posix_stack, prefix, files)

    # by hand: a second run's collector cancelled; resubmit submits the collector alone
    proc = dac_upload(["submit", str(job)], cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    second = run_dir_of(proc.stdout)
    ids = re.findall(r"submitted (?:array|collector) job (\d+)", proc.stdout)
    subprocess.run(["scancel", ids[-1]], check=True)
    wait_for_jobs(ids)
    resub = dac_upload(["resubmit", str(second), "--wait", "--timeout", "300"], cwd=workdir)
    assert resub.returncode == 0, resub.stdout + resub.stderr
    assert "every task is over but the run is not collected" in resub.stdout
    assert "submitted array job" not in resub.stdout
    s2 = load_summary(second)
    assert s2["complete"] is True and s2["counts"]["already_present"] == 8
    assert_in_rucio_once(posix_stack, prefix, files)


def test_collector_out_of_time_is_collected_here(workdir: Path, posix_stack: Any) -> None:
    """A collector that Slurm stops for its time limit (a real TIMEOUT: its script made to
    outlive a limit lowered to a minute) would stop again if resubmitted: status says so
    and names `dac-upload collect`, resubmit refuses with that command, and nightly collects
    the run itself before planning anything new."""
    files = make_files(workdir / "src", 4)
    chown_user(workdir)
    prefix = unique_prefix()
    job = write_job(workdir, "oot", job_toml(prefix, files_per_batch=4))
    proc = dac_upload(["plan", str(job)], cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = run_dir_of(proc.stdout)
    script = run_dir / "collect.sh"
    script.write_text(script.read_text().replace(
        "set -uo pipefail\n", "set -uo pipefail\nsleep 600   # the test: outlive the limit\n", 1))
    proc = dac_upload(["submit", "--run", str(run_dir)], cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = re.findall(r"submitted (?:array|collector) job (\d+)", proc.stdout)
    subprocess.run(["scontrol", "update", f"JobId={ids[-1]}", "TimeLimit=1"], check=True)
    wait_for_jobs(ids, timeout=400)
    st = status_json(run_dir, workdir)
    assert {t["state"] for t in st["tasks"]} == {"done"}
    assert st["summary"]["state"] == "not collected"
    assert st["summary"]["collector_slurm_state"] == "TIMEOUT"
    assert st["next"].startswith(f"dac-upload collect {run_dir} (the collector job {ids[-1]} "
                                 "ended TIMEOUT")
    resub = dac_upload(["resubmit", str(run_dir)], cwd=workdir)
    assert resub.returncode == 2 and "submitted" not in resub.stdout, resub.stdout
    assert f"ended TIMEOUT, and a new one would too: collect the run here: dac-upload " \
           f"collect {run_dir}" in resub.stderr
    night = dac_upload(["nightly", str(job)], cwd=workdir)
    assert night.returncode == 0, night.stdout + night.stderr
    assert "ended TIMEOUT; collecting it here" in night.stdout + night.stderr
    summary = load_summary(run_dir)
    assert summary["complete"] is True and summary["counts"]["uploaded"] == 4
    ledger = Path(json.loads((run_dir / "run.json").read_text())["ledger"])
    with sqlite3.connect(ledger) as db:
        assert db.execute("SELECT COUNT(*) FROM files WHERE status = 'uploaded'"
                          ).fetchone() == (4,)
    assert status_json(run_dir, workdir)["next"].startswith("nothing")
    assert_in_rucio_once(posix_stack, prefix, files)


def _concurrent_runs(workdir: Path, stack: Any, upload: str, n: int = 60) -> None:
    """Two job files (same root, scope, RSE and prefix) whose arrays start at the same
    moment (the node is drained while both are submitted), so that their tasks write the
    same names in the same order. Every name is uploaded by exactly one run, the other says
    already_present; Rucio holds each once, with its bytes, protected."""
    files = make_files(workdir / "src", n, size=4000)
    chown_user(workdir)
    prefix = unique_prefix()
    jobs = [write_job(workdir, name, job_toml(prefix, rse=stack.rse, files_per_batch=n // 3,
                                              max_running=3, upload=upload))
            for name in ("twin-a", "twin-b")]
    runs, collectors = [], []
    subprocess.run(["scontrol", "update", "NodeName=localhost", "State=DRAIN",
                    "Reason=dac-upload test: two runs start together"], check=True)
    try:
        for job in jobs:
            proc = dac_upload(["submit", str(job)], cwd=workdir)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            runs.append(run_dir_of(proc.stdout))
            collectors += re.findall(r"submitted (?:array|collector) job (\d+)", proc.stdout)
    finally:
        subprocess.run(["scontrol", "update", "NodeName=localhost", "State=RESUME"],
                       check=True)
    wait_for_jobs(collectors)
    summaries = [load_summary(r) for r in runs]
    for rel in files:
        key = f"{SCOPE}:{prefix}{rel}"
        said = sorted(s["files"][key]["status"] for s in summaries)
        assert said == ["already_present", "uploaded"], (rel, [s["files"][key]
                                                               for s in summaries])
    assert_in_rucio_once(stack, prefix, files)


def test_two_runs_writing_the_same_names_at_once_bulk(workdir: Path, stack: Any) -> None:
    _concurrent_runs(workdir, stack, 'mode = "bulk"\nchunk_size = 10')


def test_two_runs_writing_the_same_names_at_once_stock(workdir: Path, posix_stack: Any) -> None:
    _concurrent_runs(workdir, posix_stack, 'mode = "stock"', n=30)


def _password_job(workdir: Path, client: Any, prefix: str) -> tuple[Path, str, str]:
    """A job authenticating with a userpass identity of its own (revocable without
    touching anyone else's)."""
    username, password = f"rev{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    client.add_identity(account="root", identity=username, authtype="USERPASS",
                        email="rev@localhost", password=password)
    (workdir / "pw").write_text(password + "\n")
    (workdir / "pw").chmod(0o600)
    job = write_job(workdir, "revoked", f"""
[source]
root = "../src"
[rucio]
host = "{RUCIO_URL}"
account = "root"
auth_type = "userpass"
username = "{username}"
password_file = "../pw"
scope = "{SCOPE}"
rse = "{RSE}"
retries = 1
retry_wait = 1
[naming]
prefix = "{prefix}"
[upload]
mode = "stock"
[batching]
files_per_batch = 40
max_running = 2
[slurm]
time = "00:10:00"
mem = "1G"
[container]
runtime = "none"
""")
    return job, username, password


def _revoke(client: Any, username: str) -> None:
    """The identity deleted, its tokens gone from the database, the server restarted (its
    token cache is per process): the next request of a task cannot log in again."""
    client.del_identity(account="root", identity=username, authtype="USERPASS")
    stack = STACKS["posix"]
    stack.stop_server()
    with sqlite3.connect(CI_DIR / "rucio" / "rucio.db") as db:
        db.execute("DELETE FROM tokens WHERE identity = ?", (username,))
    stack.start_server()


def test_password_revoked_mid_run_never_under_reports(workdir: Path, posix_stack: Any) -> None:
    """The password revoked while the tasks upload: every file Rucio holds a replica of is
    reported uploaded, or failed saying it may be registered, never "not attempted"; a
    resubmission with the password still refused is refused before Slurm gets anything;
    with the identity back, resubmit finishes the run."""
    client = posix_stack.client
    files = make_files(workdir / "src", 80)   # stock mode: the revocation lands mid-run
    chown_user(workdir)
    prefix = unique_prefix()
    job, username, password = _password_job(workdir, client, prefix)
    proc = dac_upload(["submit", str(job)], cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = run_dir_of(proc.stdout)
    ids = re.findall(r"submitted (?:array|collector) job (\d+)", proc.stdout)
    wait_for_records(run_dir, 0, 3)
    _revoke(client, username)
    wait_for_jobs(ids)
    summary = load_summary(run_dir)
    assert summary["complete"] is False
    for rel in files:
        f = summary["files"][f"{SCOPE}:{prefix}{rel}"]
        reps = list(client.list_replicas([{"scope": SCOPE, "name": prefix + rel}],
                                         all_states=True))
        if reps and reps[0]["states"].get(RSE):
            assert f["status"] in ("uploaded", "already_present") or (
                f["status"] == "failed" and f["cause"] == "interrupted"
                and "may hold it" in f["error"]), f
    submissions = len(json.loads((run_dir / "run.json").read_text())["submissions"])
    refused = dac_upload(["resubmit", str(run_dir)], cwd=workdir)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "refused the credentials" in refused.stderr and "not resubmitted" in refused.stderr
    assert len(json.loads((run_dir / "run.json").read_text())["submissions"]) == submissions

    client.add_identity(account="root", identity=username, authtype="USERPASS",
                        email="rev@localhost", password=password)
    again = dac_upload(["resubmit", str(run_dir), "--wait", "--timeout", "300"], cwd=workdir)
    assert again.returncode == 0, again.stdout + again.stderr
    assert load_summary(run_dir)["complete"] is True
    assert_in_rucio_once(posix_stack, prefix, files)


def test_resubmit_while_the_server_is_down_is_refused(workdir: Path, posix_stack: Any) -> None:
    """A resubmission that could only fail (the Rucio server down) is refused with the
    reason and spends no attempt; --offline submits anyway."""
    make_files(workdir / "src", 4)
    chown_user(workdir)
    prefix = unique_prefix()
    job = write_job(workdir, "down", job_toml(prefix, files_per_batch=2, max_running=2))
    plan = dac_upload(["plan", str(job)], cwd=workdir)
    assert plan.returncode == 0, plan.stderr
    run_dir = run_dir_of(plan.stdout)
    posix_stack.stop_server()
    try:
        refused = dac_upload(["submit", "--run", str(run_dir)], cwd=workdir)
    finally:
        posix_stack.start_server()
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "cannot reach the Rucio server" in refused.stderr and "not submitted" in \
        refused.stderr
    assert json.loads((run_dir / "run.json").read_text())["submissions"] == []


def test_manifest_changed_after_planning(workdir: Path, posix_stack: Any) -> None:
    """A manifest edited validly after planning (one row replaced by another file): submit
    refuses it, naming it and the way back; remake-manifests restores it from the run's
    catalogue; the run then uploads every catalogued file."""
    files = make_files(workdir / "src", 10)
    (workdir / "src" / "extra.dat").write_bytes(b"not catalogued")
    chown_user(workdir)
    prefix = unique_prefix()
    job = write_job(workdir, "edit", job_toml(prefix, include="f*.dat", files_per_batch=5))
    plan = dac_upload(["plan", str(job)], cwd=workdir)
    assert plan.returncode == 0, plan.stderr
    run_dir = run_dir_of(plan.stdout)
    path = run_dir / "manifests" / "task-00001.json"
    manifest = json.loads(path.read_text())
    st = (workdir / "src" / "extra.dat").stat()
    manifest["files"][0] = ["extra.dat", prefix + "extra.dat", st.st_size, st.st_mtime]
    path.write_text(json.dumps(manifest))
    refused = dac_upload(["submit", "--run", str(run_dir)], cwd=workdir)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "task-00001.json: not the manifest planned" in refused.stderr
    assert f"dac-upload remake-manifests {run_dir}" in refused.stderr
    fixed = dac_upload(["remake-manifests", str(run_dir)], cwd=workdir)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    done = dac_upload(["submit", "--run", str(run_dir), "--wait", "--timeout", "300"],
                      cwd=workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = load_summary(run_dir)
    assert summary["counts"] == {**summary["counts"], "files": 10, "uploaded": 10}
    assert_in_rucio_once(posix_stack, prefix, files)
    assert not list(posix_stack.client.list_replicas(
        [{"scope": SCOPE, "name": prefix + "extra.dat"}]))


def test_unreadable_run_files_are_named(workdir: Path, posix_stack: Any) -> None:
    """A result line that is JSON but no record is named with its line and the run still
    collects; a damaged run.json is named by status and resubmit, and nightly reports a
    damaged newest run instead of skipping it."""
    files = make_files(workdir / "src", 4)
    chown_user(workdir)
    prefix = unique_prefix()
    job = write_job(workdir, "names", job_toml(prefix, files_per_batch=4))
    proc = dac_upload(["submit", str(job), "--wait", "--timeout", "300"], cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = run_dir_of(proc.stdout)
    with open(run_dir / "results" / "task-00000.jsonl", "a") as out:
        out.write('{"note": "added by hand"}\n')
    collect = dac_upload(["collect", str(run_dir)], cwd=workdir)
    assert collect.returncode == 0, collect.stdout + collect.stderr
    warning = "results/task-00000.jsonl line 5: not a result record (no name and status; " \
              "ignored)"
    assert load_summary(run_dir)["warnings"] == [warning]
    assert f"warning: {warning}" in dac_upload(["status", str(run_dir)], cwd=workdir).stdout
    assert_in_rucio_once(posix_stack, prefix, files)

    (run_dir / "run.json").write_text('{"run_id": "x", "plan": {"ta')
    for args in (["status", str(run_dir)], ["resubmit", str(run_dir)]):
        out = dac_upload(args, cwd=workdir)
        assert out.returncode == 2, out.stdout + out.stderr
        assert f"{run_dir}/run.json: damaged, not valid JSON" in out.stderr, out.stderr
    night = dac_upload(["nightly", str(job)], cwd=workdir)
    assert night.returncode == 2, night.stdout + night.stderr
    assert f"{run_dir}/run.json: damaged" in night.stderr
    assert len(_runs(workdir)) == 1
