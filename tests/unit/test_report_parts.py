"""dac-upload report: the data read from a synthetic run directory (attempts, their times,
the files' outcomes, the bins, the caps) and the page made from it (escaped, self-contained).
The page in a real browser is tests/integration/test_report.py's."""

from __future__ import annotations

import calendar
import json
import os
import random
import time
import tracemalloc
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from dac_upload import report
from dac_upload.files import atomic_write_json
from dac_upload.runrecord import RunLayout, RunReadError

HOSTILE = """d/<script>alert("x")</script>&amp;'q.dat"""   # a relpath as a user may have it
RUN_ID = "20261202T100000Z-abcdef"


def ts(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


T0 = float(calendar.timegm((2026, 12, 2, 10, 0, 0, 0, 0, 0)))   # the first submission


def rec(name: str, status: str, t: float, attempt: int, task: int, size: int = 100,
        cause: str | None = None, error: str | None = None,
        relpath: str | None = None) -> dict[str, Any]:
    return {"name": name, "relpath": relpath or name, "status": status, "bytes": size,
            "cause": cause, "error": error, "attempt": attempt, "task": task,
            "finished_at": ts(t), "scope": "user.test", "rse": "TEST_RSE"}


def run_json(tasks: int, task_files: list[int], submissions: list[dict[str, Any]],
             **plan: Any) -> dict[str, Any]:
    return {"run_id": RUN_ID, "state": "submitted", "created_at": ts(T0 - 60),
            "job": {"name": "nightly-raw", "file": "/home/u/jobs/raw.toml"},
            "source": {"root": "/data/raw"},
            "rucio": {"scope": "user.test", "rse": "TEST_RSE", "account": "u",
                      "dataset_did": None},
            "catalogue": {"files": sum(task_files), "bytes": 100 * sum(task_files)},
            "plan": {"tasks": tasks, "task_files": task_files,
                     "task_bytes": [100 * n for n in task_files], **plan},
            "upload": {"mode": "bulk"}, "submissions": submissions}


def marker(task: int, attempt: int, start: float, end: float, code: int,
           **extra: Any) -> dict[str, Any]:
    return {"task": task, "attempt": attempt, "host": "node1", "started_at": ts(start),
            "finished_at": ts(end), "exit_code": code, "slurm_job_id": "999",
            "aborted": None, "stopped": None, **extra}


def log_text(task: int, host: str, start: float, end: float | None, code: int | None,
             tail: str = "") -> str:
    text = (f"dac-upload: run {RUN_ID} task {task} on {host} at {ts(start)}\n"
            f"{ts(start + 1)} task {task}: 4 files in manifest\n{tail}")
    if end is not None:
        text += f"dac-upload: run {RUN_ID} task {task} exit code {code} at {ts(end)}\n"
    return text


def write_records(layout: RunLayout, task: int, records: list[dict[str, Any]],
                  extra: str = "") -> None:
    layout.results.mkdir(parents=True, exist_ok=True)
    with open(layout.result(task), "a", encoding="utf-8") as out:
        out.write("".join(json.dumps(r) + "\n" for r in records) + extra)


def make_run(run_dir: Path) -> RunLayout:
    """Five tasks of four files:
    0: one attempt, 3 uploaded and the hostile file unreadable; marker exit 1
    1: attempt 1 killed by Slurm's time limit after 2 uploads (no marker), attempt 2 (the
       resubmission) uploads the other 2; marker exit 0
    2: never ran
    3: aborted: 1 transient failure, 3 not attempted; a damaged line and a torn last line
    4: only a Slurm log: the batch script ended with exit code 2, no record, no marker"""
    layout = RunLayout(run_dir)
    for d in (layout.results, layout.logs, layout.manifests):
        d.mkdir(parents=True)
    subs = [{"attempt": 1, "submitted_at": ts(T0), "task_ids": "0-4",
             "arrays": [{"job_id": "100", "offset": 0, "task_ids": "0-4"}]},
            {"attempt": 2, "submitted_at": ts(T0 + 600), "task_ids": "1",
             "arrays": [{"job_id": "200", "offset": 1, "task_ids": "0"}]}]
    atomic_write_json(layout.run_json, run_json(5, [4] * 5, subs))
    write_records(layout, 0, [
        *(rec(f"p/t0/f{i}", "uploaded", T0 + 10 + i, 1, 0) for i in range(3)),
        rec("p/d/_script_alert__x___script__amp__q.dat", "failed", T0 + 14, 1, 0,
            cause="unreadable", error="unreadable: Permission denied <&>", relpath=HOSTILE)])
    atomic_write_json(layout.done_marker(0), marker(0, 1, T0 + 6, T0 + 15, 1))
    (layout.logs / "job100.index0.out").write_text(log_text(0, "node1", T0 + 5, T0 + 16, 1))

    write_records(layout, 1, [rec(f"p/t1/f{i}", "uploaded", T0 + 20 + i, 1, 1)
                              for i in range(2)])
    write_records(layout, 1, [rec(f"p/t1/f{i}", "uploaded", T0 + 620 + i, 2, 1)
                              for i in range(2, 4)])
    atomic_write_json(layout.done_marker(1), marker(1, 2, T0 + 612, T0 + 625, 0))
    (layout.logs / "job100.index1.out").write_text(log_text(
        1, "node2", T0 + 5, None, None,
        tail="slurmstepd: error: *** JOB 102 ON node2 CANCELLED AT 2026-12-02T10:05:00 DUE "
             "TO TIME LIMIT ***\n"))
    (layout.logs / "job200.index0.out").write_text(log_text(1, "node3", T0 + 610, T0 + 626, 0))

    write_records(layout, 3, [
        rec("p/t3/f0", "failed", T0 + 40, 1, 3, cause="transient",
            error="the Rucio server keeps failing: 503"),
        *(rec(f"p/t3/f{i}", "not_attempted", T0 + 41, 1, 3, cause="aborted",
              error="task stopped before this file: the Rucio server keeps failing: 503")
          for i in range(1, 4))],
        extra='not json at all\n{"name": "p/t3/f9", "sta')
    atomic_write_json(layout.done_marker(3), marker(
        3, 1, T0 + 31, T0 + 42, 3, aborted="the Rucio server keeps failing: 503"))
    (layout.logs / "job100.index3.out").write_text(log_text(3, "node1", T0 + 30, T0 + 43, 3))
    (layout.logs / "job100.index4.out").write_text(log_text(4, "node1", T0 + 50, T0 + 51, 2))
    (layout.logs / "collect.job101.out").write_text("dac-upload: collecting run\n")
    for name, last in (("job100.index0.out", 16), ("job100.index1.out", 25),
                       ("job200.index0.out", 626), ("job100.index3.out", 43),
                       ("job100.index4.out", 51)):   # when Slurm last wrote each
        os.utime(layout.logs / name, (T0 + last, T0 + last))
    return layout


# ---------------------------------------------------------------- gathering
def test_gather_counts_the_files_as_the_summary_would(tmp_path: Path) -> None:
    d = report.gather(make_run(tmp_path / "R").dir)
    assert (d.run_id, d.job, d.scope, d.rse, d.files) == (
        RUN_ID, "nightly-raw", "user.test", "TEST_RSE", 20)
    assert d.counts == {"uploaded": 7, "already_present": 0, "failed": 2,
                        "not_attempted": 11}   # 3 aborted + 4 of task 2 + 4 of task 4
    assert d.bytes_uploaded == 700
    assert [t.state for t in d.tasks] == ["failed", "done", "not started", "failed",
                                          "unfinished"]
    causes = {(c.status, c.cause): (c.files, c.permanent) for c in d.causes}
    assert causes == {("failed", "unreadable"): (1, True), ("failed", "transient"): (1, False),
                      ("not_attempted", "aborted"): (3, False),
                      ("not_attempted", "no result"): (8, False)}
    assert d.causes[0].cause == "no result"                      # the most files first
    assert [(f.task, f.cause, f.relpath) for f in d.failed_files] == [
        (0, "unreadable", HOSTILE), (3, "transient", "p/t3/f0")]
    assert d.summary_state == "not collected"
    assert [(k, ids) for k, _, ids in d.submissions] == [(1, "0-4"), (2, "1")]


def test_each_attempt_takes_its_times_from_the_best_source(tmp_path: Path) -> None:
    tasks = report.gather(make_run(tmp_path / "R").dir).tasks
    (a0,) = tasks[0].attempts
    assert (a0.attempt, a0.outcome, a0.exit_code, a0.slurm_job, a0.log) == (
        1, "failed", 1, "100_0", "logs/job100.index0.out")
    assert (a0.start, a0.end, a0.start_from, a0.end_from) == (T0 + 5, T0 + 16, "Slurm log",
                                                              "Slurm log")
    first, second = tasks[1].attempts
    # killed by Slurm: its start from the log, its end when the log was last written
    assert (first.attempt, first.outcome, first.host) == (1, "died", "node2")
    assert first.note == "Slurm cancelled it: time limit"
    assert (first.start, first.end, first.end_from) == (T0 + 5, T0 + 25, "log last written")
    assert (first.records, first.bytes_uploaded) == (2, 200)
    assert (second.attempt, second.outcome, second.slurm_job, second.host) == (
        2, "ok", "200_0", "node1")
    assert (second.start, second.end) == (T0 + 610, T0 + 626)
    assert tasks[2].attempts == ()
    assert tasks[3].attempts[0].outcome == "aborted"
    assert tasks[3].attempts[0].note == "the Rucio server keeps failing: 503"
    (orphan,) = tasks[4].attempts   # an execution that left no record and no marker
    assert (orphan.attempt, orphan.outcome, orphan.exit_code, orphan.records) == (
        None, "refused", 2, 0)


def test_an_earlier_attempt_takes_its_outcome_from_its_log(tmp_path: Path) -> None:
    """Its marker was replaced by the next attempt's: the batch script's exit code says it
    finished (1: files failed), or that it was killed (137)."""
    layout = make_run(tmp_path / "R")
    write_records(layout, 0, [rec("p/d/_script_alert__x___script__amp__q.dat", "failed",
                                  T0 + 700, 2, 0, cause="unreadable", error="again")])
    atomic_write_json(layout.done_marker(0), marker(0, 2, T0 + 699, T0 + 701, 1))
    (layout.logs / "job300.index0.out").write_text(log_text(0, "node1", T0 + 698, T0 + 702, 1))
    first, second = report.gather(layout.dir).tasks[0].attempts
    assert (first.attempt, first.outcome, first.log) == (1, "failed", "logs/job100.index0.out")
    assert "a later attempt replaced its marker" in (first.note or "")
    assert (second.attempt, second.outcome, second.start, second.end) == (
        2, "failed", T0 + 698, T0 + 702)
    (layout.logs / "job100.index0.out").write_text(log_text(0, "node1", T0 + 5, T0 + 16, 137))
    first = report.gather(layout.dir).tasks[0].attempts[0]
    assert (first.outcome, first.note) == ("died", "the batch script ended with exit code 137")


def test_without_logs_the_marker_then_the_records_give_the_times(tmp_path: Path) -> None:
    layout = make_run(tmp_path / "R")
    for path in layout.logs.iterdir():
        path.unlink()
    tasks = report.gather(layout.dir).tasks
    (a0,) = tasks[0].attempts
    assert (a0.start, a0.end, a0.start_from, a0.end_from) == (T0 + 6, T0 + 15, "marker",
                                                              "marker")
    first = tasks[1].attempts[0]   # no marker, no log: its records' span; how it ended: ?
    assert (first.start, first.end, first.outcome) == (T0 + 20, T0 + 21, "ended")
    assert (first.start_from, first.end_from) == ("first record", "last record")
    assert tasks[4].state == "not started"


def test_an_attempt_still_going_is_open(tmp_path: Path) -> None:
    layout = make_run(tmp_path / "R")
    write_records(layout, 2, [rec("p/t2/f0", "uploaded", T0 + 700, 1, 2)])
    (layout.logs / "job300.index0.out").write_text(log_text(2, "node4", T0 + 690, None, None))
    task = report.gather(layout.dir).tasks[2]
    assert task.state == "unfinished"
    (a,) = task.attempts
    assert (a.outcome, a.start, a.records, a.note) == ("open", T0 + 690, 1, None)


def test_a_damaged_record_line_is_said_and_the_rest_counted(tmp_path: Path) -> None:
    d = report.gather(make_run(tmp_path / "R").dir)
    assert d.problems == ("results/task-00003.jsonl line 5: not a result record (ignored)",)
    assert d.tasks[3].failed == 1 and d.tasks[3].not_attempted == 3   # the torn line: none
    page = report.render(d)
    assert "line 5: not a result record" in page


def test_a_results_file_of_bad_lines_says_a_few_and_counts_all(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "R")
    layout.dir.mkdir()
    atomic_write_json(layout.run_json, run_json(1, [1], []))
    write_records(layout, 0, [], extra="garbage\n" * 500)
    d = report.gather(layout.dir)
    assert d.problems_total == 500 and len(d.problems) == report.MAX_LINE_PROBLEMS + 1
    assert d.problems[-1] == "results/task-00000.jsonl: ... and 480 more such lines"
    assert "(21 of 500 shown)" in report.render(d)


def test_a_damaged_marker_is_said_and_ignored(tmp_path: Path) -> None:
    layout = make_run(tmp_path / "R")
    layout.done_marker(0).write_text("{not json")
    d = report.gather(layout.dir)
    assert "results/task-00000.done.json: not valid JSON (ignored)" in d.problems
    assert d.tasks[0].state == "unfinished"   # its records, and no marker that counts
    (a,) = d.tasks[0].attempts                # the batch script's end line says how it ended
    assert (a.outcome, a.exit_code) == ("failed", 1)
    assert a.note == "outcome from its Slurm log's exit code (it wrote no marker)"


def test_a_run_with_no_results_yet(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "R")
    layout.dir.mkdir()
    atomic_write_json(layout.run_json, run_json(3, [2, 2, 1], []))
    d = report.gather(layout.dir)
    assert [t.state for t in d.tasks] == ["not started"] * 3
    assert d.throughput is None and d.span is None and d.failed_total == 0
    assert d.counts["not_attempted"] == 5 and not d.complete
    assert [(c.cause, c.files, c.bytes) for c in d.causes] == [("no result", 5, 500)]
    page = report.render(d)
    assert 'id="no-timeline"' in page and 'id="no-throughput"' in page
    assert 'id="no-failed"' in page and "none yet" in page


def test_planned_counts_come_from_the_manifest_when_run_json_lacks_them(
        tmp_path: Path) -> None:
    from dac_upload.files import manifest_bytes

    layout = RunLayout(tmp_path / "R")
    layout.manifests.mkdir(parents=True)
    doc = run_json(1, [3], [])
    del doc["plan"]["task_files"], doc["catalogue"]
    atomic_write_json(layout.run_json, doc)
    layout.manifest(0).write_bytes(manifest_bytes(
        {"task": 0}, [("a", "p/a", 10, 1.0), ("b", "p/b", 20, 1.0), ("c", "p/c", 30, 1.0)]))
    d = report.gather(layout.dir)
    assert (d.tasks[0].files, d.tasks[0].bytes, d.files, d.bytes) == (3, 60, 3, 60)


@pytest.mark.parametrize("content, why", [
    (None, "no run.json"), ("{", "not valid JSON"), ("[]", "not a JSON object"),
    ('{"run_id": "x", "plan": {}}', "no run_id or plan.tasks"),
    ('{"run_id": "x", "plan": {"tasks": "many"}}', "plan.tasks is not a number")])
def test_not_a_run_is_refused(tmp_path: Path, content: str | None, why: str) -> None:
    (tmp_path / "R").mkdir()
    if content is not None:
        (tmp_path / "R" / "run.json").write_text(content)
    with pytest.raises(RunReadError, match=why):
        report.write_report(tmp_path / "R")
    assert not (tmp_path / "R" / "report.html").exists()


def test_the_failed_list_is_capped_and_all_are_counted(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "R")
    layout.dir.mkdir()
    atomic_write_json(layout.run_json, run_json(2, [5, 5], []))
    for task in (0, 1):
        write_records(layout, task, [
            rec(f"p/{task}/f{i}", "failed", T0 + i, 1, task, cause="verify",
                error="x" * 5000) for i in range(5)])
    d = report.gather(layout.dir, max_failed=3)
    assert d.failed_total == 10
    assert [f.name for f in d.failed_files] == ["p/0/f0", "p/0/f1", "p/0/f2"]
    assert all(len(f.error or "") <= report.MAX_ERROR_CHARS + 2 for f in d.failed_files)
    page = report.render(d)
    assert "The first <b>3</b> of <b" in page and ">10</b> failed files" in page
    assert f"dac-upload status {layout.dir}" in page   # where the full list is
    assert page.count("<tr><td class=\"n\">") == 3


def test_a_later_success_wins_over_an_earlier_failure(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "R")
    layout.dir.mkdir()
    atomic_write_json(layout.run_json, run_json(1, [2], []))
    write_records(layout, 0, [rec("p/a", "failed", T0, 1, 0, cause="transient"),
                              rec("p/a", "uploaded", T0 + 5, 2, 0),
                              rec("p/b", "uploaded", T0 + 6, 2, 0),
                              rec("p/b", "failed", T0 + 9, 3, 0, cause="verify")])
    d = report.gather(layout.dir)
    assert (d.counts["uploaded"], d.counts["failed"], d.failed_total) == (2, 0, 0)
    assert d.tasks[0].state == "done"
    tp = d.throughput
    assert tp is not None and (sum(tp.done), sum(tp.failed)) == (2, 2)   # every event


# ---------------------------------------------------------------- the bins
def test_bins_merge_exactly_whatever_the_order() -> None:
    rng = random.Random(3)
    events = [(T0 + rng.uniform(0, 7 * 3600), rng.randint(0, 10**6), rng.randint(0, 1),
               rng.randint(0, 1)) for _ in range(20_000)]
    a, b = report._Bins(), report._Bins()
    for e in events:
        a.add(*e)
    for e in sorted(events):
        b.add(*e)
    ra, rb = a.result(), b.result()
    assert ra == rb and ra is not None
    assert sum(ra.bytes) == sum(e[1] for e in events)
    assert (sum(ra.done), sum(ra.failed)) == (sum(e[2] for e in events),
                                              sum(e[3] for e in events))
    assert len(ra.bytes) <= report.SHOWN_BINS and ra.width == 300   # 7 h in 5-min bins
    assert ra.start % ra.width == 0 and ra.start <= min(e[0] for e in events) < ra.end
    i = int((events[0][0] - ra.start) // ra.width)   # each event lands in its own bin
    assert ra.bytes[i] >= events[0][1]


def test_a_short_run_keeps_one_second_bins() -> None:
    bins = report._Bins()
    for t, n in ((T0 + 2, 5), (T0, 1), (T0 + 2, 7)):
        bins.add(t, n, 1, 0)
    r = bins.result()
    assert r is not None and (r.width, r.start, r.bytes, r.done) == (1, T0, (1, 0, 12),
                                                                     (1, 0, 2))


def test_bins_stay_few_over_a_long_span() -> None:
    bins = report._Bins()
    for day in range(40):
        bins.add(T0 + day * 86400, 1, 1, 0)
        assert len(bins.bins) <= report.FINE_BINS
    r = bins.result()
    assert r is not None and r.width == 86400 and len(r.bytes) == 40


# ---------------------------------------------------------------- the page
class _Text(HTMLParser):
    """The page's elements and text, as a browser's parser sees them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.text: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs.extend(attrs)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_a_hostile_file_name_is_escaped(tmp_path: Path) -> None:
    page = report.render(report.gather(make_run(tmp_path / "R").dir))
    assert '<script>alert("x")' not in page and "&lt;script&gt;alert(&#34;x&#34;)" in page
    parsed = _Text()
    parsed.feed(page)
    assert "script" not in parsed.tags            # the name is text, not an element
    assert HOSTILE in parsed.text                 # and reads as it is
    assert "unreadable: Permission denied <&>" in parsed.text


def test_the_page_loads_nothing(tmp_path: Path) -> None:
    page = report.render(report.gather(make_run(tmp_path / "R").dir))
    parsed = _Text()
    parsed.feed(page)
    assert {"script", "link", "img", "iframe", "object", "embed"}.isdisjoint(parsed.tags)
    refs = [v for k, v in parsed.attrs if k in ("src", "href", "xlink:href", "action")]
    assert refs == []
    assert "url(" not in page and "@import" not in page
    assert ("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "style-src 'unsafe-inline'; img-src data:\">") in page


def test_the_page_has_a_row_per_task_and_a_bar_per_attempt(tmp_path: Path) -> None:
    d = report.gather(make_run(tmp_path / "R").dir)
    page = report.render(d)
    for t in range(5):
        assert f'<tr data-task="{t}">' in page
    assert page.count('<rect class="bar ') == 5   # 1 + 2 + 0 + 1 + 1 attempts
    assert 'class="bar died"' in page and 'class="bar refused"' in page
    assert "Slurm cancelled it: time limit" in page
    assert page.count('class="mark"') == 2        # submit, resubmit 2
    assert "resubmit 2" in page
    assert 'id="throughput-bytes"' in page and 'id="bytes-per-task"' in page
    assert 'id="causes"' in page and 'data-cause="no result"' in page


def test_a_lone_surrogate_in_a_name_is_written(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "R")
    layout.dir.mkdir()
    atomic_write_json(layout.run_json, run_json(1, [1], []))
    layout.results.mkdir()
    layout.result(0).write_text('{"name": "p/bad\\udc80", "status": "failed", '
                                '"cause": "rucio", "error": "no"}\n')
    out = report.write_report(layout.dir)
    assert out == layout.dir / "report.html"
    assert "p/bad\\udc80" in out.read_text(encoding="utf-8")


def test_write_report_is_atomic_and_takes_out(tmp_path: Path) -> None:
    layout = make_run(tmp_path / "R")
    out = report.write_report(layout.dir, tmp_path / "elsewhere.html")
    assert out == tmp_path / "elsewhere.html" and out.read_text().startswith("<!DOCTYPE html>")
    assert not (layout.dir / "report.html").exists()
    assert report.write_report(layout.dir) == layout.dir / "report.html"
    assert sorted(p.name for p in layout.dir.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["R", "elsewhere.html"]


def test_many_tasks_still_fit(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "R")
    layout.dir.mkdir()
    n = 1500
    atomic_write_json(layout.run_json, run_json(n, [1] * n, []))
    layout.results.mkdir()
    for t in range(0, n, 7):
        write_records(layout, t, [rec(f"p/{t}", "uploaded", T0 + t, 1, t)])
    d = report.gather(layout.dir)
    tl = report.timeline(d)
    assert tl is not None and tl["height"] < 3500 and len(tl["bars"]) == len(range(0, n, 7))
    cols = report.bytes_chart(d)
    assert cols is not None and cols["group"] == 4        # 1500 tasks in 892 units
    page = report.render(d)
    assert page.count("<tr data-task=") == n and "<details>" in page   # closed: long


def test_axis_steps_are_round() -> None:
    assert report.nice_scale(4.1e6) == (1e6, 5)
    assert report.nice_scale(300) == (100, 3)
    assert report.nice_scale(0) == (1.0, 4)
    assert report.nice_scale(7) == (2, 4)
    assert [lab for _, lab in report.time_ticks(T0 + 1, T0 + 3600)] == [
        "10:10", "10:20", "10:30", "10:40", "10:50", "11:00"]
    assert report.duration(3725) == "1 h 02 min" and report.duration(None) == "–"


def test_the_results_are_streamed(tmp_path: Path) -> None:
    """The run's records are never all in memory: 20 tasks of 3,000 records (65 MB as a
    list of dicts) are read in what one task's records take (the reader's block of lines
    and their dicts: about 18 MB here)."""
    layout = RunLayout(tmp_path / "R")
    layout.dir.mkdir()
    tasks, per = 20, 3000
    atomic_write_json(layout.run_json, run_json(tasks, [per] * tasks, []))
    layout.results.mkdir()
    for t in range(tasks):
        write_records(layout, t, [
            rec(f"prefix/some/longer/directory/name/task{t}/file{i:06d}.fits",
                "uploaded" if i % 50 else "failed", T0 + t * 60 + i // 100, 1, t,
                cause=None if i % 50 else "verify", error=None if i % 50 else "bad copy")
            for i in range(per)])
    tracemalloc.start()
    try:
        d = report.gather(layout.dir, max_failed=10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert d.counts["uploaded"] == tasks * per * 49 // 50 and d.failed_total == tasks * 60
    assert len(d.failed_files) == 10
    assert peak < 32 << 20, peak
