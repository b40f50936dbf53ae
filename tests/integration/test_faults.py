"""Faults on the real Slurm and Rucio, each ending with nothing lost, duplicated or
overwritten: a killed task, the Rucio server going away, the wall-time warning, bad files,
name conflicts, a run larger than MaxArraySize (5 on the test cluster), garbage in results."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from ithelpers import (
    RSE,
    SCOPE,
    adler32_of,
    chown_user,
    dac_upload,
    job_toml,
    load_summary,
    make_files,
    parse_arrays,
    parse_submitted,
    run_dir_of,
    unique_prefix,
    wait_for_jobs,
    write_job,
)

# The faults that must strike while a task is uploading (a kill, the server stopping, the
# wall-time signal) use the stock path: at ~6 files/s it is slow enough to be caught mid-run.
# The bulk path's own crash test is in test_bulk_upload.py.
STOCK = 'mode = "stock"'


def job_file(workdir: Path, name: str, prefix: str, files_per_batch: int, max_running: int,
             extra: str = "", upload: str = "", rse: str = RSE) -> Path:
    return write_job(workdir, name, job_toml(prefix, files_per_batch=files_per_batch,
                                             max_running=max_running, rucio=extra,
                                             upload=upload, rse=rse))


def status_json(run_dir: Path, workdir: Path) -> dict[str, Any]:
    proc = dac_upload(["status", str(run_dir), "--json"], cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def wait_for_records(run_dir: Path, task: int, n: int, timeout: float = 120) -> None:
    path = run_dir / "results" / f"task-{task:05d}.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"task {task} wrote fewer than {n} records in {timeout} s")


def resubmit_and_wait(run_dir: Path, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    proc = dac_upload(["resubmit", str(run_dir), "--wait", "--timeout", "600", *args],
                      cwd=workdir)
    return proc


def assert_in_rucio_once(stack: Any, prefix: str, files: dict[str, Path]) -> None:
    """Every file: one DID, one AVAILABLE replica on the stack's RSE with the right checksum
    and bytes, protected by a rule; the storage's disk holds exactly its bytes, and nothing
    else (no temporary or partial copy) is there under these names."""
    for rel, src in files.items():
        name = prefix + rel
        reps = list(stack.client.list_replicas([{"scope": SCOPE, "name": name}],
                                               all_states=True))
        assert len(reps) == 1, name
        assert reps[0]["states"] == {stack.rse: "AVAILABLE"}, (name, reps[0]["states"])
        assert reps[0]["adler32"] == adler32_of(src) and reps[0]["bytes"] == src.stat().st_size
        pfn = reps[0]["rses"][stack.rse][0]
        assert stack.path_of(pfn).read_bytes() == src.read_bytes()
        assert list(stack.client.list_did_rules(SCOPE, name)), f"{name} has no rule"
    on_disk = stack.files_under(SCOPE, prefix)
    assert len(on_disk) == len(files), sorted(map(str, on_disk))


def test_killed_task_is_finished_by_resubmit(workdir: Path, stack: Any) -> None:
    files = make_files(workdir / "src", 40)
    chown_user(workdir)
    prefix = unique_prefix()
    proc = dac_upload(["submit", str(job_file(workdir, "kill", prefix, 10, 4, upload=STOCK,
                                               rse=stack.rse))],
                      cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    array_id, collector_id = parse_submitted(proc.stdout)
    run_dir = run_dir_of(proc.stdout)
    wait_for_records(run_dir, 1, 2)
    # SIGKILL to the worker of task 1, as the OOM killer or a dying node would: no chance to
    # write a marker (scancel sends SIGTERM first, which the worker turns into a clean stop)
    subprocess.run(["pkill", "-KILL", "-f", f"worker --run {run_dir} --task 1$"], check=True)
    wait_for_jobs([array_id, collector_id])

    st = status_json(run_dir, workdir)
    task1 = st["tasks"][1]
    assert task1["state"] == "died", task1
    assert 2 <= task1["files_done"] < 10
    assert st["next"].startswith("dac-upload resubmit")
    assert load_summary(run_dir)["complete"] is False

    again = resubmit_and_wait(run_dir, workdir)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "tasks 0" in again.stdout and "(+1)" in again.stdout       # only task 1
    summary = load_summary(run_dir)
    assert summary["complete"] is True
    assert [s["task_ids"] for s in summary["slurm"]["submissions"]] == ["0-3", "1"]
    assert_in_rucio_once(stack, prefix, files)
    final = status_json(run_dir, workdir)
    assert {t["state"] for t in final["tasks"]} == {"done"}
    assert final["next"].startswith("nothing")
    nothing = dac_upload(["resubmit", str(run_dir)], cwd=workdir)
    assert nothing.returncode == 0 and "every task is complete" in nothing.stdout


def test_rucio_server_down_and_back(workdir: Path, stack: Any) -> None:
    files = make_files(workdir / "src", 30)
    chown_user(workdir)
    prefix = unique_prefix()
    job = job_file(workdir, "down", prefix, 10, 3, extra="retries = 1\nretry_wait = 1",
                   upload=STOCK, rse=stack.rse)
    proc = dac_upload(["submit", str(job)], cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    array_id, collector_id = parse_submitted(proc.stdout)
    run_dir = run_dir_of(proc.stdout)
    wait_for_records(run_dir, 0, 2)
    try:
        stack.stop_server()
        wait_for_jobs([array_id])                 # the tasks give up after their retries
    finally:
        stack.start_server()
    wait_for_jobs([collector_id])
    st = status_json(run_dir, workdir)
    assert any(t["state"] == "failed" for t in st["tasks"]), st
    assert st["causes"].get("aborted"), st["causes"]
    log = (run_dir / "logs" / f"job{array_id}.index0.out").read_text()
    assert "retry 1/1" in log and "exit code 3" in log

    again = resubmit_and_wait(run_dir, workdir)
    assert again.returncode == 0, again.stdout + again.stderr
    assert load_summary(run_dir)["complete"] is True
    assert_in_rucio_once(stack, prefix, files)


def test_bulk_tasks_wait_for_the_server_and_finish(workdir: Path, stack: Any) -> None:
    """The bulk path: the server is down when the tasks start; they retry (doubling waits)
    and finish once it is back, every file registered once."""
    files = make_files(workdir / "src", 20)
    chown_user(workdir)
    prefix = unique_prefix()
    job = job_file(workdir, "bulkdown", prefix, 10, 2, extra="retries = 4\nretry_wait = 2",
                   rse=stack.rse)
    planned = dac_upload(["plan", str(job)], cwd=workdir)      # preflight while it is up
    assert planned.returncode == 0, planned.stderr
    run_dir = run_dir_of(planned.stdout)
    try:
        stack.stop_server()
        # submit --run checks the server first and refuses: --offline submits anyway (the
        # site's compute nodes may reach a server this node cannot)
        proc = dac_upload(["submit", "--run", str(run_dir), "--offline"], cwd=workdir)
        assert proc.returncode == 0, proc.stderr
        array_id, collector_id = parse_submitted(proc.stdout)
        log = run_dir / "logs" / f"job{array_id}.index0.out"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "retry 1/4" not in (
                log.read_text() if log.exists() else ""):
            time.sleep(0.2)
    finally:
        stack.start_server()
    wait_for_jobs([array_id, collector_id])
    assert "retry 1/4 of connecting to Rucio" in log.read_text()
    summary = load_summary(run_dir)
    assert summary["complete"] is True and summary["counts"]["uploaded"] == len(files)
    assert_in_rucio_once(stack, prefix, files)


def test_wall_time_warning_keeps_finished_files(workdir: Path, posix_stack: Any) -> None:
    """Slurm's warning signal (the one --signal=B:USR1@N sends to the batch shell, here sent
    at once with scancel): the task stops cleanly, resubmit does the rest."""
    files = make_files(workdir / "src", 40, size=2_000)
    chown_user(workdir)
    prefix = unique_prefix()
    proc = dac_upload(["submit", str(job_file(workdir, "wall", prefix, 40, 1, upload=STOCK))],
                      cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    array_id, collector_id = parse_submitted(proc.stdout)
    run_dir = run_dir_of(proc.stdout)
    scontrol = subprocess.run(["scontrol", "show", "job", array_id], capture_output=True,
                              text=True).stdout
    assert "TimeLimit=00:10:00" in scontrol
    wait_for_records(run_dir, 0, 3)
    busy = dac_upload(["resubmit", str(run_dir)], cwd=workdir)   # politely refused
    assert busy.returncode == 2 and "still pending or running" in busy.stderr
    subprocess.run(["scancel", "--batch", "--signal=USR1", f"{array_id}_0"], check=True)
    wait_for_jobs([array_id, collector_id])
    log = (run_dir / "logs" / f"job{array_id}.index0.out").read_text()
    assert "wall time near" in log and "exit code 4" in log
    marker = json.loads((run_dir / "results" / "task-00000.done.json").read_text())
    assert marker["stopped"].startswith("wall time near")
    done = marker["uploaded"]
    assert 3 <= done < 40 and marker["not_attempted"] == 40 - done
    st = status_json(run_dir, workdir)
    assert st["tasks"][0]["state"] == "failed" and st["causes"] == {"stopped": 40 - done}

    again = resubmit_and_wait(run_dir, workdir)
    assert again.returncode == 0, again.stdout + again.stderr
    summary = load_summary(run_dir)
    assert summary["complete"] is True and summary["counts"]["uploaded"] == 40
    assert {f["attempt"] for f in summary["files"].values()} == {1, 2}
    assert_in_rucio_once(posix_stack, prefix, files)


def test_bad_files_are_reported_and_not_retried_forever(workdir: Path) -> None:
    files = make_files(workdir / "src", 8)
    chown_user(workdir)
    job = job_file(workdir, "bad", unique_prefix(), 4, 2)
    planned = dac_upload(["plan", str(job)], cwd=workdir)
    assert planned.returncode == 0, planned.stderr
    run_dir = run_dir_of(planned.stdout)
    files["f001.dat"].unlink()
    files["f006.dat"].chmod(0)
    proc = dac_upload(["submit", "--run", str(run_dir), "--wait"], cwd=workdir)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = load_summary(run_dir)
    by_rel = {f["relpath"]: f for f in summary["files"].values()}
    assert by_rel["f001.dat"]["error"].startswith("missing")
    assert by_rel["f006.dat"]["error"] == "unreadable: Permission denied"
    assert summary["counts"]["uploaded"] == 6
    st = status_json(run_dir, workdir)
    assert st["causes"] == {"missing": 1, "unreadable": 1}
    assert "--retry-permanent" in st["next"]
    assert sorted((f["relpath"], f["cause"]) for f in st["files_not_done"]) == [
        ("f001.dat", "missing"), ("f006.dat", "unreadable")]
    again = dac_upload(["resubmit", str(run_dir)], cwd=workdir)
    assert again.returncode == 0
    assert "nothing submitted" in again.stdout and "a person must fix" in again.stdout
    run = json.loads((run_dir / "run.json").read_text())
    assert len(run["submissions"]) == 1


def test_name_conflict_is_reported_never_overwritten(workdir: Path, stack: Any) -> None:
    prefix = unique_prefix()
    src = workdir / "src"
    src.mkdir()
    (src / "same.dat").write_bytes(b"first content")
    chown_user(workdir)
    job = job_file(workdir, "one", prefix, 10, 1, rse=stack.rse)
    first = dac_upload(["submit", str(job), "--wait"], cwd=workdir)
    assert first.returncode == 0, first.stdout + first.stderr
    before = list(stack.client.list_replicas([{"scope": SCOPE, "name": prefix + "same.dat"}]))
    pfn = before[0]["rses"][stack.rse][0]

    (src / "same.dat").write_bytes(b"other content!")
    second = dac_upload(["submit", str(job), "--wait"], cwd=workdir)
    assert second.returncode == 1
    entry = load_summary(run_dir_of(second.stdout))["files"][f"{SCOPE}:{prefix}same.dat"]
    assert entry["status"] == "failed" and entry["error"].startswith("conflict:")
    after = list(stack.client.list_replicas([{"scope": SCOPE, "name": prefix + "same.dat"}]))
    assert after[0]["adler32"] == before[0]["adler32"]
    assert stack.path_of(pfn).read_bytes() == b"first content"
    assert len(stack.files_under(SCOPE, prefix)) == 1


def test_run_larger_than_max_array_size(workdir: Path, posix_stack: Any) -> None:
    max_array = subprocess.run(["scontrol", "show", "config"], capture_output=True,
                               text=True).stdout
    if "MaxArraySize            = 5" not in max_array:
        pytest.skip("the test cluster runs with MaxArraySize=5 (tests/services/start-slurm.sh)")
    files = make_files(workdir / "src", 24, size=1_000)
    chown_user(workdir)
    prefix = unique_prefix()
    proc = dac_upload(["submit", str(job_file(workdir, "big", prefix, 2, 4)), "--wait"],
                      cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(parse_arrays(proc.stdout)) == 3                      # 12 tasks: 5 + 5 + 2
    assert "(+5)" in proc.stdout and "(+10)" in proc.stdout
    summary = load_summary(run_dir_of(proc.stdout))
    assert summary["complete"] and summary["counts"]["tasks"] == 12
    assert sorted({f["batch"] for f in summary["files"].values()}) == list(range(12))
    assert_in_rucio_once(posix_stack, prefix, files)


def test_garbage_in_results_is_reported_and_skipped(workdir: Path) -> None:
    make_files(workdir / "src", 4)
    chown_user(workdir)
    proc = dac_upload(["submit", str(job_file(workdir, "junk", unique_prefix(), 2, 2)),
                       "--wait"], cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = run_dir_of(proc.stdout)
    before = load_summary(run_dir)
    with open(run_dir / "results" / "task-00000.jsonl", "a") as fh:
        fh.write('{"name": "f000.dat", "status": "upl')           # a torn last line
    (run_dir / "results" / "notes.txt").write_text("someone's notes")
    again = dac_upload(["collect", str(run_dir)], cwd=workdir)
    assert again.returncode == 0, again.stdout + again.stderr
    after = load_summary(run_dir)
    assert after["warnings"] == ["results/notes.txt: not a file of this run (ignored)"]
    assert after["files"] == before["files"] and after["complete"]
    st = status_json(run_dir, workdir)
    assert st["warnings"] == after["warnings"]
    assert {t["state"] for t in st["tasks"]} == {"done"}
