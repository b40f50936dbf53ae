"""watch and progress: what submit --wait shows, from results read incrementally."""

from __future__ import annotations

import io
import json
from typing import Callable

from dac_upload.config import JobConfig
from dac_upload.pipeline import prepare_run
from dac_upload.progress import Rate, WaitDisplay, wait_line
from dac_upload.watch import RunWatcher, Snapshot


def _record(name: str, status: str, nbytes: int) -> bytes:
    return json.dumps({"name": name, "status": status, "bytes": nbytes}).encode() + b"\n"


def test_results_are_read_incrementally_and_a_half_line_waits(
        make_job: Callable[..., JobConfig]) -> None:
    job = make_job({f"f{i}.fits": b"x" * 100 for i in range(4)},
                   batching="files_per_batch = 2")
    layout = prepare_run(job, preflight=None).layout
    clock = iter(range(100))
    w = RunWatcher(layout.dir, clock=lambda: float(next(clock)))
    first = w.poll()
    assert (first.files_total, first.bytes_total, first.files_done) == (4, 400, 0)
    assert first.tasks == {"waiting": 2} and first.tasks_total == 2
    result = layout.result(0)
    result.write_bytes(_record("a", "uploaded", 100) + _record("b", "failed", 100)[:20])
    snap = w.poll()
    assert (snap.files_done, snap.bytes_done, snap.files_failed) == (1, 100, 0)
    with result.open("ab") as fh:   # the torn line ends, and a retry of b succeeds
        fh.write(_record("b", "failed", 100)[20:] + _record("b", "uploaded", 100))
    snap = w.poll()
    assert (snap.files_done, snap.bytes_done, snap.files_failed) == (2, 200, 1)
    assert snap.tasks == {"done": 1, "waiting": 1}
    assert w.results[0].offset == result.stat().st_size   # nothing read twice


def test_scheduler_states_are_asked_at_most_every_interval(
        make_job: Callable[..., JobConfig]) -> None:
    layout = prepare_run(make_job(), preflight=None).layout
    run = json.loads(layout.run_json.read_text())
    run["submissions"] = [{"arrays": [{"job_id": "7", "task_ids": "0", "offset": 0}]}]
    layout.run_json.write_text(json.dumps(run))
    asked: list[list[str]] = []

    def sched(ids: list[str]) -> dict[tuple[str, int], str]:
        asked.append(ids)
        return {("7", 0): "RUNNING"}

    now = [0.0]
    w = RunWatcher(layout.dir, scheduler=sched, scheduler_every=10, clock=lambda: now[0])
    assert w.poll().tasks == {"running": 1}
    now[0] = 5.0
    assert w.poll().tasks == {"running": 1} and len(asked) == 1
    now[0] = 11.0
    w.poll()
    assert len(asked) == 2


def test_results_overrule_a_scheduler_answer_that_is_seconds_old(
        make_job: Callable[..., JobConfig]) -> None:
    """Asked every 10 s, the scheduler said PENDING; the task's records say it ran."""
    job = make_job({"a.fits": b"x", "b.fits": b"y"}, batching="files_per_batch = 1")
    layout = prepare_run(job, preflight=None).layout
    run = json.loads(layout.run_json.read_text())
    run["submissions"] = [{"arrays": [{"job_id": "7", "task_ids": "0-1", "offset": 0}]}]
    layout.run_json.write_text(json.dumps(run))
    w = RunWatcher(layout.dir, scheduler=lambda ids: {("7", 0): "PENDING",
                                                      ("7", 1): "PENDING"})
    assert w.poll().tasks == {"pending": 2}
    layout.result(0).write_bytes(_record("a", "uploaded", 1))
    layout.result(1).write_bytes(_record("b", "failed", 1))
    assert w.poll().tasks == {"done": 1, "running": 1}


def _snap(at: float, files: int, nbytes: int, **tasks: int) -> Snapshot:
    return Snapshot(at=at, files_total=1000, bytes_total=10_000_000, files_done=files,
                    bytes_done=nbytes, files_failed=0, tasks=tasks, tasks_total=10)


def test_rate_is_recent_and_eta_takes_the_slower_measure() -> None:
    r = Rate(window=60)
    r.add(0, 0, 0)
    r.add(3600, 0, 0)          # an hour in the queue
    r.add(3610, 100, 1_000_000)
    assert r.per_second() == (10.0, 100_000.0)   # the queue's hour is out of the window
    assert r.eta(900, 9_000_000) == 90.0
    assert Rate().eta(5, 5) is None


def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    d = WaitDisplay(out, every=60, terminal=False, now=lambda: "2026-12-02T14:03:10Z")
    d.update(_snap(0, 0, 0, pending=10))
    d.update(_snap(30, 100, 1_000_000, pending=10))     # nothing changed, < 60 s: silent
    d.update(_snap(40, 120, 1_200_000, running=2, pending=8))   # tasks changed: a line
    d.finish(_snap(45, 1000, 10_000_000, done=10))
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[1] == ("2026-12-02T14:03:10Z uploading: 120/1,000 files (12.0 %), 1.2 MB/"
                        "10.0 MB, 3.0 files/s, 30.0 KB/s, ETA 4m53s; tasks 2 running, "
                        "8 pending")
    assert lines[2].endswith("(100.0 %), 10.0 MB/10.0 MB, 22.2 files/s, 222.2 KB/s, ETA "
                             "0m00s; tasks 10 done")


def test_a_terminal_gets_a_live_display_with_totals_rate_and_tasks() -> None:
    out = io.StringIO()
    d = WaitDisplay(out, terminal=True, width=120)
    d.update(_snap(0, 0, 0, pending=10))
    d.update(_snap(10, 250, 2_500_000, running=4, pending=6))
    d.finish(_snap(20, 500, 5_000_000, running=4, done=6))
    text = out.getvalue()
    assert "\x1b[" in text                      # drawn in place, with rich
    assert "500/1,000" in text and "50.0 %" in text and "5.0 MB/10.0 MB" in text
    assert "tasks: 4 running, 6 done" in text and "ETA" in text


def test_wait_line_of_an_empty_run() -> None:
    snap = Snapshot(at=0, files_total=0, bytes_total=0, files_done=0, bytes_done=0,
                    files_failed=0)
    assert "(100.0 %)" in wait_line(snap, Rate()) and "tasks none yet" in wait_line(
        snap, Rate())


