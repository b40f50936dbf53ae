"""What goes wrong on a real cluster: a file that cannot be read, a task that never runs, and
the user errors that must be caught before anything is submitted."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ithelpers import (
    chown_user,
    dac_upload,
    job_toml,
    load_summary,
    parse_submitted,
    run_dir_of,
    unique_prefix,
    wait_for_jobs,
    write_job,
)

from dac_upload.files import read_manifest


def job_text(prefix: str, **over: str) -> str:
    return job_toml(prefix, include="**/*.dat", max_running=1, **over)


def make_files(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"file{i:02d}.dat"
        p.write_bytes(bytes([i]) * (100 + i))
        paths.append(p)
    return paths


def test_unreadable_file_and_task_that_never_ran(workdir: Path) -> None:
    make_files(workdir / "src", 12)            # 3 tasks of 4 files, one at a time
    job = write_job(workdir, "fail", job_text(unique_prefix()))
    planned = dac_upload(["plan", str(job)], cwd=workdir)
    assert planned.returncode == 0, planned.stderr
    run_dir = run_dir_of(planned.stdout)
    assert not (run_dir / "summary.json").exists()
    assert "nothing submitted" in planned.stdout

    # after planning, one file of task 0 becomes unreadable for the (non-root) user
    manifest = read_manifest(run_dir / "manifests" / "task-00000.json")
    bad = workdir / "src" / manifest["files"][1]["relpath"]
    never = read_manifest(run_dir / "manifests" / "task-00002.json")["files"]
    bad.chmod(0)
    submitted = dac_upload(["submit", "--run", str(run_dir)], cwd=workdir)
    assert submitted.returncode == 0, submitted.stderr
    array_id, collector_id = parse_submitted(submitted.stdout)
    # task 2 is cancelled before it can start (throttle %1 keeps it pending): no result
    subprocess.run(["scancel", f"{array_id}_2"], check=True)
    wait_for_jobs([array_id, collector_id])

    summary = load_summary(run_dir)          # the collector ran despite the failures
    assert summary["complete"] is False
    assert summary["tasks_missing_result"] == [2]
    assert summary["failed_tasks"] == [0]
    c = summary["counts"]
    assert (c["files"], c["uploaded"], c["failed"], c["not_attempted"]) == (12, 7, 1, 4)
    by_rel = {f["relpath"]: f for f in summary["files"].values()}
    assert by_rel[bad.name]["status"] == "failed"
    assert "unreadable" in by_rel[bad.name]["error"]
    assert "Permission denied" in by_rel[bad.name]["error"]
    assert len(never) == 4
    for entry in never:
        assert by_rel[entry["relpath"]]["status"] == "not_attempted"
        assert "wrote no result" in by_rel[entry["relpath"]]["error"]
    # the batch script exited with the worker's code; the collector says the run is incomplete
    log0 = (run_dir / "logs" / f"job{array_id}.index0.out").read_text()
    assert "exit code 1" in log0
    again = dac_upload(["collect", str(run_dir)], cwd=workdir)
    assert again.returncode == 1
    assert "1 failed, 4 not attempted" in again.stdout
    assert load_summary(run_dir) == summary   # collecting again gives the same summary


def test_plan_refuses_before_submission(workdir: Path) -> None:
    """Each user error: one line naming the file or key, exit code 2, no run directory."""
    src = workdir / "src"
    make_files(src, 3)
    (src / "bad name.dat").write_bytes(b"x")
    (src / "secret.dat").write_bytes(b"y")
    (src / "secret.dat").chmod(0)
    chown_user(workdir)
    job = write_job(workdir, "refuse", job_text(unique_prefix()))
    proc = dac_upload(["plan", str(job)], cwd=workdir)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert any("bad name.dat" in ln and "replace_invalid" in ln for ln in lines)
    assert any("secret.dat" in ln and "not readable" in ln for ln in lines)
    assert not (workdir / "jobs" / "refuse" / "runs").exists() or not any(
        (workdir / "jobs" / "refuse" / "runs").iterdir())


def test_unknown_scope_and_rse_are_caught_by_the_preflight(workdir: Path) -> None:
    make_files(workdir / "src", 2)
    chown_user(workdir)
    job = write_job(workdir, "scope", job_text(unique_prefix(), scope="nosuchscope",
                                               rse="NO_SUCH_RSE"))
    proc = dac_upload(["submit", str(job)], cwd=workdir)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert "scope 'nosuchscope' ([rucio] scope) does not exist" in lines[0]
    assert "RSE 'NO_SUCH_RSE' does not exist" in lines[1]
    assert "submitted" not in proc.stdout


def test_sbatch_error_surfaces_slurms_own_message(workdir: Path) -> None:
    make_files(workdir / "src", 2)
    chown_user(workdir)
    job = write_job(workdir, "part", job_text(unique_prefix(),
                                              slurm='partition = "nosuchpartition"'))
    proc = dac_upload(["submit", str(job)], cwd=workdir)
    assert proc.returncode == 2, proc.stdout + proc.stderr   # refused before any run exists
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, err
    assert "invalid partition specified: nosuchpartition" in err[0].lower()
    assert "fix [slurm] partition" in err[0]
    assert not list((job.parent / "part" / "runs").glob("2*"))   # no orphan run directory


def test_unknown_sbatch_option_is_a_plan_error(workdir: Path) -> None:
    make_files(workdir / "src", 2)
    chown_user(workdir)
    job = write_job(workdir, "opt", job_text(unique_prefix(),
                                             slurm='extra = { no_such_option = "1" }'))
    proc = dac_upload(["plan", str(job), "--offline"], cwd=workdir)
    assert proc.returncode == 2
    assert "no_such_option" in proc.stderr
