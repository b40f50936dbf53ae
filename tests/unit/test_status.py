"""status: per-task state from records, markers and the scheduler; what resubmit retries."""

from __future__ import annotations

from typing import Any

import pytest

from dac_upload.status import next_command, task_status, tasks_to_retry

MANIFEST = {"files": [{"name": n, "size": s, "relpath": n} for n, s in
                      (("a", 10), ("b", 20), ("c", 30))]}


def rec(name: str, status: str, cause: str | None = None, attempt: int = 1) -> dict[str, Any]:
    return {"name": name, "status": status, "cause": cause, "attempt": attempt}


@pytest.mark.parametrize(("records", "marker", "slurm", "state"), [
    ([], None, None, "not started"),
    ([], None, "PENDING", "pending"),
    ([rec("a", "uploaded")], None, "RUNNING", "running"),
    ([rec("a", "uploaded"), rec("b", "already_present"), rec("c", "uploaded")],
     {"attempt": 1}, None, "done"),
    ([rec("a", "uploaded"), rec("b", "failed", "missing")], {"attempt": 1}, None, "failed"),
    ([rec("a", "uploaded")], None, None, "died"),                  # killed: no marker
    ([], None, "FAILED", "died"),                                  # died before any record
    # attempt 2 was killed after attempt 1 wrote its marker: the marker is stale
    ([rec("a", "failed", "rucio"), rec("a", "uploaded", None, 2)], {"attempt": 1}, None,
     "died"),
])
def test_states(records: list[dict[str, Any]], marker: dict[str, Any] | None,
                slurm: str | None, state: str) -> None:
    assert task_status(0, MANIFEST, records, marker, slurm).state == state


def test_counts_and_causes() -> None:
    t = task_status(3, MANIFEST, [rec("a", "uploaded"), rec("b", "failed", "unreadable")],
                    {"attempt": 1}, None)
    assert (t.files, t.files_done, t.bytes, t.bytes_done) == (3, 1, 60, 10)
    assert dict(t.causes) == {"unreadable": 1, "no record": 1}
    assert not t.permanent_only                 # c has no record: worth a retry


def test_permanent_failures_are_not_retried_unless_asked() -> None:
    perm = task_status(0, MANIFEST, [rec("a", "uploaded"), rec("b", "failed", "missing"),
                                     rec("c", "failed", "conflict")], {"attempt": 1}, None)
    transient = task_status(1, MANIFEST, [rec("a", "failed", "transient")], {"attempt": 1},
                            None)
    done = task_status(2, MANIFEST, [rec(n, "uploaded") for n in "abc"], {"attempt": 1}, None)
    running = task_status(3, MANIFEST, [], None, "RUNNING")
    tasks = [perm, transient, done, running]
    assert perm.permanent_only
    assert tasks_to_retry(tasks) == [1]
    assert tasks_to_retry(tasks, retry_permanent=True) == [0, 1]
    assert next_command(tasks, "R").startswith("wait")
    assert next_command([perm, transient, done], "R") == "dac-upload resubmit R"
    assert "--retry-permanent" in next_command([perm, done], "R")
    assert next_command([done], "R").startswith("nothing")


def test_next_command_sees_an_uncollected_run() -> None:
    """Every task done but no collector finished: resubmit (which submits the collector);
    while the collector is queued: wait for it."""
    from dac_upload.collect import COLLECTED, NOT_COLLECTED

    done = task_status(0, {"files": [{"name": "a", "size": 1}]},
                       [{"name": "a", "status": "uploaded"}], {"attempt": 1}, "COMPLETED")
    missing = (NOT_COLLECTED, "no summary.json yet")
    assert next_command([done], "R", missing, ("7", "CANCELLED")).startswith(
        "dac-upload resubmit R (the run is not collected: no summary.json yet")
    assert next_command([done], "R", missing, ("7", "RUNNING")).startswith(
        "wait for the collector (job 7)")
    assert next_command([done], "R", (COLLECTED, "ok"), ("7", None)).startswith("nothing")
    for ended in ("OUT_OF_MEMORY", "TIMEOUT"):   # by hand, where the job's limits do not hold
        assert next_command([done], "R", missing, ("7", ended)) == (
            f"dac-upload collect R (the collector job 7 ended {ended}: collect on this node, "
            "which is not held to its limits)")


def test_status_reads_markers_not_records(make_job: Any, monkeypatch: Any) -> None:
    """A task whose marker carries its index, and a task never run, cost status no manifest
    and no record read (O(tasks) at millions of files); a task whose results grew after its
    marker (a later attempt died) is read."""
    from test_worker import STOCK, FakeRucio

    import dac_upload.collect as collect_mod
    from dac_upload.pipeline import prepare_run
    from dac_upload.runview import run_view
    from dac_upload.upload.task import run_task

    job = make_job({f"f{i}.dat": bytes([i]) * 5 for i in range(4)},
                   batching="files_per_batch = 2", upload=STOCK)
    layout = prepare_run(job, preflight=None).layout
    assert run_task(layout.dir, 0, rucio_factory=FakeRucio().factory) == 0

    def refuse(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("status read a manifest or records")

    with monkeypatch.context() as m:
        m.setattr(collect_mod, "read_manifest", refuse)
        m.setattr(collect_mod, "read_result_records", refuse)
        _, tasks = run_view(layout.dir, scheduler=False)
    assert [(t.state, t.files, t.files_done, t.bytes) for t in tasks] == [
        ("done", 2, 2, 10), ("not started", 2, 0, 10)]
    with open(layout.result(0), "a") as out:   # a later attempt wrote, then died
        out.write('{"name": "f0.dat", "status": "failed", "attempt": 2}\n')
    _, tasks = run_view(layout.dir, scheduler=False)
    assert (tasks[0].state, tasks[0].files_done) == ("done", 2)   # read: the success counts


def test_the_report_counts_tasks_files_and_causes() -> None:
    """status's text and --json, made by status.report from the run's state and tasks."""
    from types import SimpleNamespace

    from dac_upload.status import report

    failed = task_status(0, MANIFEST, [rec("a", "uploaded"), rec("b", "failed", "unreadable")],
                         {"attempt": 1}, None)
    failed.log = "logs/job7.index0.out"
    done = task_status(1, {"files": [{"name": "a", "size": 1}]}, [rec("a", "uploaded")],
                       {"attempt": 1}, None)
    state = SimpleNamespace(run={"run_id": "R", "job": {"name": "j"}}, problems=["odd file"],
                            collection=("collected", "summary.json is up to date"),
                            collector=("8", "COMPLETED"))
    doc, lines = report(state, [failed, done], "/runs/R")
    assert doc["causes"] == {"no record": 1, "unreadable": 1}
    assert doc["summary"] == {"state": "collected", "why": "summary.json is up to date",
                              "collector_job_id": "8", "collector_slurm_state": "COMPLETED"}
    assert doc["warnings"] == ["odd file"] and doc["next"] == lines[-1][len("next: "):]
    assert lines[0] == "run R (j): 2/4 files done; tasks: 1 done, 1 failed"
    assert "not done, by cause: no record 1, unreadable 1" in lines
    assert "task 0 log: /runs/R/logs/job7.index0.out" in lines
    assert "warning: odd file" in lines


def _state(submissions: list[Any] | None = None) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(run={"run_id": "R", "job": {"name": "j", "file": "/jobs/j.toml"},
                                "submissions": [{"attempt": 1}] if submissions is None
                                else submissions},
                           problems=[], collection=("collected", "up to date"),
                           collector=("8", "COMPLETED"))


def _failed(task: int, causes: dict[str, str]) -> Any:
    records = [{**rec(n, "failed", c), "relpath": f"d/{n}.fits", "error": f"{c}: it is so"}
               for n, c in causes.items()]
    manifest = {"files": [{"name": n, "size": 1, "relpath": f"d/{n}.fits"} for n in causes]}
    return task_status(task, manifest, records, {"attempt": 1}, None)


def test_status_names_the_files_with_the_next_command_of_their_cause() -> None:
    """"fix the files listed" listed none; a changed file was sent to resubmit."""
    from dac_upload.status import report

    tasks = [_failed(0, {f"m{i}": "missing" for i in range(5)}),
             _failed(1, {"c1": "changed", "r1": "rucio"})]
    doc, lines = report(_state(), tasks, "/runs/R", full_list="/runs/R/not-done.jsonl")
    assert [f["name"] for f in doc["files_not_done"]] == ["m0", "m1", "m2", "m3", "m4", "c1",
                                                          "r1"]
    assert doc["files_not_done"][5] == {"task": 1, "name": "c1", "relpath": "d/c1.fits",
                                        "cause": "changed", "error": "changed: it is so"}
    assert doc["next_by_cause"]["changed"].endswith("dac-upload submit /jobs/j.toml (this "
                                                    "run's other files are done or listed)")
    assert doc["next_by_cause"]["rucio"] == "dac-upload resubmit /runs/R (retries them)"
    text = "\n".join(lines)
    assert ("missing: 5 file(s); next: fix the files listed, then: dac-upload resubmit "
            "--retry-permanent /runs/R") in lines
    assert "  d/m0.fits (task 0): missing: it is so" in lines
    assert "  ... and 2 more" in lines and "d/m3.fits" not in text
    assert "every file not done: /runs/R/not-done.jsonl" in lines
    assert doc["next"] == "dac-upload resubmit /runs/R"   # the rucio failure is retried


def test_only_changed_files_left_need_a_new_run_not_a_resubmit() -> None:
    from dac_upload.status import report

    doc, _ = report(_state(), [_failed(0, {"c1": "changed"})], "/runs/R")
    assert doc["next"].startswith("plan a new run for the files that changed")
    assert "dac-upload submit /jobs/j.toml" in doc["next"]


def test_a_planned_run_never_submitted_is_submitted_not_resubmitted() -> None:
    from dac_upload.status import report

    untouched = task_status(0, MANIFEST, [], None, None)
    doc, _ = report(_state(submissions=[]), [untouched], "/runs/R")
    assert doc["next"] == "dac-upload submit --run /runs/R (planned, never submitted)"
