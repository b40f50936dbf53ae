"""Nightly incremental runs on the real Slurm and Rucio: only what is new, never two at once,
stale locks reported, changed files reported as conflicts."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from ithelpers import (
    RSE,
    SCOPE,
    USER,
    VENV_BIN,
    chown_user,
    dac_upload,
    job_toml,
    unique_prefix,
    user_env,
    write_job,
)
from test_faults import assert_in_rucio_once


def nightly_job(workdir: Path, prefix: str, rse: str = RSE) -> Path:
    return write_job(workdir, "night", job_toml(prefix, include="**/*.fits", max_running=4,
                                                rse=rse))


def add_files(root: Path, names: list[str]) -> None:
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(name.encode() * 50)


def runs(workdir: Path) -> list[Path]:
    d = workdir / "jobs" / "night" / "runs"
    return sorted(p for p in d.iterdir() if (p / "run.json").exists()) if d.exists() else []


def uploaded_relpaths(run_dir: Path) -> set[str]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {f["relpath"] for f in summary["files"].values() if f["status"] == "uploaded"}


def test_three_nights_upload_only_what_is_new(workdir: Path, stack: Any) -> None:
    src = workdir / "src"
    first = [f"2026-11-2{d}/img{i}.fits" for d in (1, 2) for i in range(5)]
    add_files(src, first)
    chown_user(workdir)
    prefix = unique_prefix()
    job = nightly_job(workdir, prefix, stack.rse)

    night1 = dac_upload(["nightly", str(job), "--wait"], cwd=workdir)
    assert night1.returncode == 0, night1.stdout + night1.stderr
    assert uploaded_relpaths(runs(workdir)[-1]) == set(first)

    new = ["2026-11-22/img9.fits", "2026-11-23/img0.fits", "2026-11-23/img1.fits"]
    add_files(src, new)
    chown_user(workdir)
    night2 = dac_upload(["nightly", str(job), "--wait"], cwd=workdir)
    assert night2.returncode == 0, night2.stdout + night2.stderr
    assert "3 new or changed files (10 unchanged)" in night2.stdout
    assert len(runs(workdir)) == 2
    assert uploaded_relpaths(runs(workdir)[-1]) == set(new)

    night3 = dac_upload(["nightly", str(job), "--quiet"], cwd=workdir)
    assert night3.returncode == 0, night3.stdout + night3.stderr
    assert night3.stdout == "" and night3.stderr == ""          # quiet: nothing to say
    assert len(runs(workdir)) == 2
    log = (workdir / "jobs" / "night" / "runs" / "nightly.log").read_text()
    assert "nothing new" in log and "13 files unchanged since the ledger" in log
    assert_in_rucio_once(stack, prefix, {rel: src / rel for rel in first + new})


def test_two_nightlies_at_once_make_one_run(workdir: Path) -> None:
    add_files(workdir / "src", [f"a/img{i}.fits" for i in range(8)])
    chown_user(workdir)
    job = nightly_job(workdir, unique_prefix())
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    cmd = [runuser, "-u", USER, "--", str(VENV_BIN / "dac-upload"), "nightly", str(job)]
    procs = [subprocess.Popen(cmd, cwd=workdir, env=user_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes[0] == 0 and codes[1] in (10, 11), results
    assert len(runs(workdir)) == 1
    loser = next(r for r in results if r[0] != 0)
    assert ("holds its lock" in loser[2]) or ("still has tasks" in loser[1]), loser


def test_stale_soft_lock_is_reported_not_broken(workdir: Path) -> None:
    add_files(workdir / "src", ["b/img0.fits"])
    chown_user(workdir)
    job = nightly_job(workdir, unique_prefix())
    job_dir = workdir / "jobs" / "night" / "runs"     # the lock lives beside the runs
    job_dir.mkdir(parents=True, exist_ok=True)
    dead = subprocess.Popen(["true"])
    dead.wait()                                               # a pid that no longer exists
    (job_dir / "nightly.lock").write_text("")
    (job_dir / "nightly.lock.json").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": dead.pid, "started": time.time() - 60,
         "mode": "soft"}))
    chown_user(workdir)

    stale = dac_upload(["nightly", str(job)], cwd=workdir, DAC_UPLOAD_LOCK="soft")
    assert stale.returncode == 10, stale.stdout + stale.stderr
    assert f"stale lock (its process is gone): pid {dead.pid}" in stale.stderr
    assert "--break-stale-lock" in stale.stderr
    assert (job_dir / "nightly.lock").exists() and runs(workdir) == []   # never broken silently

    broken = dac_upload(["nightly", str(job), "--break-stale-lock"], cwd=workdir,
                        DAC_UPLOAD_LOCK="soft")
    assert broken.returncode == 0, broken.stdout + broken.stderr
    assert "removed a stale lock" in broken.stdout
    assert len(runs(workdir)) == 1 and not (job_dir / "nightly.lock").exists()


def test_changed_file_is_a_conflict_and_the_nights_say_so(workdir: Path,
                                                          rucio_client: Any) -> None:
    src = workdir / "src"
    add_files(src, ["c/img0.fits", "c/img1.fits"])
    chown_user(workdir)
    prefix = unique_prefix()
    job = nightly_job(workdir, prefix)
    assert dac_upload(["nightly", str(job), "--wait"], cwd=workdir).returncode == 0
    name = prefix + "c/img1.fits"
    before = next(iter(rucio_client.list_replicas([{"scope": SCOPE, "name": name}])))

    (src / "c" / "img1.fits").write_bytes(b"new content, same name")
    os.utime(src / "c" / "img1.fits", (time.time() + 5, time.time() + 5))
    chown_user(workdir)
    night2 = dac_upload(["nightly", str(job), "--wait"], cwd=workdir)
    assert night2.returncode == 1, night2.stdout + night2.stderr       # files failed
    summary = json.loads((runs(workdir)[-1] / "summary.json").read_text())
    entry = summary["files"][f"{SCOPE}:{name}"]
    assert (entry["status"], entry["cause"]) == ("failed", "conflict")
    after = next(iter(rucio_client.list_replicas([{"scope": SCOPE, "name": name}])))
    assert after["adler32"] == before["adler32"]                        # not overwritten

    night3 = dac_upload(["nightly", str(job)], cwd=workdir)
    assert night3.returncode == 13, night3.stdout + night3.stderr      # needs a person
    assert "needs a person: c/img1.fits (conflict)" in night3.stderr
    assert len(runs(workdir)) == 2                                       # nothing new


def test_previous_run_with_failures_is_resubmitted_first(workdir: Path) -> None:
    src = workdir / "src"
    add_files(src, [f"d/img{i}.fits" for i in range(8)])
    chown_user(workdir)
    job = nightly_job(workdir, unique_prefix())
    night1 = dac_upload(["nightly", str(job)], cwd=workdir)
    assert night1.returncode == 0, night1.stdout + night1.stderr
    run_dir = runs(workdir)[-1]
    # one task's worker dies before it writes anything useful (as a node failure would)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if subprocess.run(["pkill", "-KILL", "-f", f"worker --run {run_dir} --task 1$"]
                          ).returncode == 0:
            break
        time.sleep(0.02)
    subprocess.run(["bash", "-c", f"while squeue -h -j $(python3 -c \"import json;"
                    f"print(json.load(open('{run_dir}/run.json'))['submissions'][0]"
                    "['collector_job_id'])\") | grep -q .; do sleep 0.5; done"], timeout=300)
    add_files(src, ["d/late.fits"])
    chown_user(workdir)

    night2 = dac_upload(["nightly", str(job), "--wait"], cwd=workdir)
    assert night2.returncode == 0, night2.stdout + night2.stderr
    assert "had unfinished tasks 1: resubmitted" in night2.stderr       # reported
    assert len(runs(workdir)) == 1                                        # no new run yet
    assert json.loads((run_dir / "summary.json").read_text())["complete"] is True

    night3 = dac_upload(["nightly", str(job), "--wait"], cwd=workdir)
    assert night3.returncode == 0, night3.stdout + night3.stderr
    assert "1 new or changed files (8 unchanged)" in night3.stdout        # the late file
    assert len(runs(workdir)) == 2
