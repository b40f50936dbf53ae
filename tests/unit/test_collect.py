"""collect: result records -> summary.json; nothing dropped, byte-identical re-runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from unit_helpers import assert_valid_summary

from dac_upload import __version__
from dac_upload.collect import build_summary, collect, merge_records, records_so_far
from dac_upload.files import atomic_write_json
from dac_upload.runrecord import RunLayout

FILE_FIELDS = {"scope", "name", "bytes", "adler32", "md5", "rse", "pfn", "guid", "path",
               "relpath", "batch", "attempt", "status", "cause", "error", "verified"}


RUN_ID = "20240501T100000Z-0a1b2c"


def _run(tasks: int = 3) -> dict[str, Any]:
    return {"run_id": RUN_ID, "created_at": "2024-05-01T10:00:00Z", "job": {"name": "dp1"},
            "source": {"root": "/data"}, "plan": {"tasks": tasks},
            "rucio": {"scope": "user.t", "rse": "TEST_RSE", "account": None,
                      "dataset": "ds", "lifetime": None},
            "submissions": [{"attempt": 1, "arrays": [{"job_id": "100", "offset": 0,
                                                       "task_ids": f"0-{tasks - 1}"}],
                             "collector_job_id": "101", "task_ids": f"0-{tasks - 1}",
                             "left_over": "", "submitted_at": "2024-05-01T10:01:00Z"}]}


def _entry(name: str, size: int) -> dict[str, Any]:
    return {"relpath": f"rel/{name}", "name": name, "size": size, "mtime": 1.0}


def _rec(name: str, status: str, size: int = 1, attempt: int = 1,
         error: str | None = None) -> dict[str, Any]:
    ok = status in ("uploaded", "already_present")
    return {"name": name, "status": status, "bytes": size, "attempt": attempt,
            "adler32": "0000abcd" if ok else None,
            "md5": "d41d8cd98f00b204e9800998ecf8427e" if ok else None,
            "pfn": f"davs://se/{name}" if ok else None, "guid": "g-" + name if ok else None,
            "error": error}


def _marker(task: int, code: int, finished: str, **more: Any) -> dict[str, Any]:
    return {"task": task, "exit_code": code, "finished_at": finished, **more}


# ----------------------------------------------------------------------------- merge_records
def test_later_success_beats_earlier_failure() -> None:
    merged = merge_records([_rec("a", "failed", attempt=1, error="boom"),
                            _rec("a", "uploaded", attempt=2)])
    assert merged["a"]["status"] == "uploaded" and merged["a"]["attempt"] == 2


def test_success_beats_later_failure() -> None:
    merged = merge_records([_rec("a", "uploaded", attempt=1),
                            _rec("a", "failed", attempt=2, error="conflict")])
    assert merged["a"]["status"] == "uploaded" and merged["a"]["attempt"] == 1


def test_latest_failure_and_latest_success_win() -> None:
    merged = merge_records([_rec("a", "failed", attempt=1, error="one"),
                            _rec("a", "failed", attempt=2, error="two"),
                            _rec("b", "uploaded", attempt=1),
                            _rec("b", "already_present", attempt=2)])
    assert merged["a"]["error"] == "two"
    assert merged["b"]["status"] == "already_present"
    assert merge_records([]) == {}


# ----------------------------------------------------------------------------- build_summary
def _scenario() -> dict[str, Any]:
    manifests = {
        0: {"files": [_entry("a", 10), _entry("b", 20)]},
        1: {"files": [_entry("c", 30), _entry("d", 40), _entry("e", 50)]},
        2: {"files": [_entry("f", 60)]},  # never ran: no result, no marker
    }
    results = {
        0: [_rec("a", "failed", 10, 1, "upload failed: timeout"), _rec("b", "uploaded", 20, 1),
            _rec("a", "uploaded", 10, 2)],
        1: [_rec("c", "already_present", 30), _rec("d", "failed", 40, 1, "conflict: x")],
    }
    markers = {0: _marker(0, 0, "2024-05-01T11:00:00Z", rucio_host="https://rucio:443",
                          rucio_account="jbloggs"),
               1: _marker(1, 1, "2024-05-01T12:00:00Z")}
    return {"run": _run(), "manifests": manifests, "results": results, "markers": markers}


def test_build_summary() -> None:
    s = assert_valid_summary(build_summary(**_scenario()))
    assert s["schema_version"] == 2
    assert s["tool"] == {"name": "dac-upload", "version": __version__}
    assert (s["job"], s["run_id"], s["created_at"]) == ("dp1", RUN_ID, "2024-05-01T10:00:00Z")
    assert s["finished_at"] == "2024-05-01T12:00:00Z"
    assert s["source_root"] == "/data"
    assert s["rucio"] == {"host": "https://rucio:443", "account": "jbloggs", "scope": "user.t",
                          "rse": "TEST_RSE", "dataset": "ds", "lifetime": None}
    assert s["slurm"] == {"submissions": _run()["submissions"]}
    assert s["complete"] is False
    assert s["counts"] == {"files": 6, "bytes": 210, "uploaded": 2, "already_present": 1,
                           "failed": 1, "not_attempted": 2, "bytes_uploaded": 30,
                           "tasks": 3, "tasks_with_result": 2, "tasks_missing_result": 1}
    c = s["counts"]
    assert c["uploaded"] + c["already_present"] + c["failed"] + c["not_attempted"] == c["files"]
    assert s["tasks_missing_result"] == [2]
    assert s["failed_tasks"] == [1]

    files = s["files"]
    assert list(files) == [f"user.t:{n}" for n in "abcdef"]
    for key, f in files.items():
        assert set(f) == FILE_FIELDS
        assert key == f"{f['scope']}:{f['name']}"
        assert f["rse"] == "TEST_RSE"
        assert f["path"] == f"/data/{f['relpath']}"
    assert files["user.t:a"]["status"] == "uploaded" and files["user.t:a"]["attempt"] == 2
    assert files["user.t:a"]["error"] is None
    assert files["user.t:a"]["pfn"] == "davs://se/a"
    assert files["user.t:a"]["adler32"] == "0000abcd"
    assert files["user.t:c"]["status"] == "already_present"
    assert files["user.t:d"]["status"] == "failed" and files["user.t:d"]["error"] == "conflict: x"
    assert [files[f"user.t:{n}"]["batch"] for n in "abcdef"] == [0, 0, 1, 1, 1, 2]
    # e: its task finished without a record for it; f: its task never wrote anything
    e, f = files["user.t:e"], files["user.t:f"]
    assert e["status"] == f["status"] == "not_attempted"
    assert e["error"] == "the task finished without a record for this file"
    assert f["error"].startswith("the task wrote no result")
    assert "dac-upload status" in f["error"]
    assert (f["bytes"], f["adler32"], f["md5"], f["pfn"], f["guid"]) == (60, None, None, None,
                                                                         None)


def test_task_without_marker_but_with_records() -> None:
    sc = _scenario()
    del sc["markers"][1]  # killed before writing its marker: its records still count
    s = assert_valid_summary(build_summary(**sc))
    assert s["tasks_missing_result"] == [1, 2]
    assert s["files"]["user.t:c"]["status"] == "already_present"
    assert s["files"]["user.t:e"]["error"].startswith("the task wrote no result")
    assert s["failed_tasks"] == []
    assert s["finished_at"] == "2024-05-01T11:00:00Z"


def test_complete_run() -> None:
    manifests = {0: {"files": [_entry("a", 1)]}, 1: {"files": [_entry("b", 2)]}}
    results = {0: [_rec("a", "uploaded", 1)], 1: [_rec("b", "already_present", 2)]}
    markers = {0: _marker(0, 0, "2024-05-01T11:00:00Z"),
               1: _marker(1, 0, "2024-05-01T11:30:00Z")}
    run = _run(2)
    run["rucio"]["account"] = "from-job"
    s = assert_valid_summary(build_summary(run, manifests, results, markers))
    assert s["complete"] is True
    assert s["failed_tasks"] == [] and s["tasks_missing_result"] == []
    assert s["rucio"]["account"] == "from-job" and s["rucio"]["host"] is None
    assert s["counts"]["bytes_uploaded"] == 1


def test_nothing_ran() -> None:
    manifests = {0: {"files": [_entry("a", 1)]}}
    s = assert_valid_summary(build_summary(_run(1), manifests, {}, {}))
    assert s["complete"] is False
    assert s["finished_at"] is None
    assert s["counts"]["not_attempted"] == 1
    assert s["tasks_missing_result"] == [0]


# ----------------------------------------------------------------------------- collect()
def _write_run(run_dir: Path) -> RunLayout:
    sc = _scenario()
    layout = RunLayout(run_dir)
    for d in (layout.manifests, layout.results, layout.logs):
        d.mkdir(parents=True)
    atomic_write_json(layout.run_json, sc["run"])
    for task, manifest in sc["manifests"].items():
        atomic_write_json(layout.manifest(task), manifest)
    for task, recs in sc["results"].items():
        text = "".join(json.dumps(r) + "\n" for r in recs)
        layout.result(task).write_text(text + ('{"name": "torn' if task == 1 else ""))
    for task, marker in sc["markers"].items():
        atomic_write_json(layout.done_marker(task), marker)
    return layout


def test_collect_writes_byte_identical_summary(tmp_path: Path) -> None:
    layout = _write_run(tmp_path / "R1")
    header = collect(layout.dir)
    first = layout.summary.read_bytes()
    whole = build_summary(**_scenario())
    assert json.loads(first) == whole
    assert header == {k: v for k, v in whole.items() if k != "files"}
    assert collect(layout.dir) == header
    assert layout.summary.read_bytes() == first
    assert sorted(p.name for p in layout.dir.iterdir()) == [
        "logs", "manifests", "results", "run.json", "summary.json"]


def test_summary_header_written_into_its_room_or_before_a_copy(tmp_path: Path) -> None:
    """The header goes into the room kept before the entries (a line of spaces after it);
    where the pass finds more warnings than that room holds, the entries are copied after
    it instead: the same document either way, and no temp file left."""
    from dac_upload.collect import HEADER_SLACK

    layout = _write_run(tmp_path / "R1")
    collect(layout.dir)
    lines = layout.summary.read_text().splitlines(keepends=True)
    files_at = lines.index(' "files": {\n')
    assert lines[files_at - 1].strip() == "" and lines[files_at - 2].endswith(",\n")
    layout2 = _write_run(tmp_path / "R2")
    torn = "".join(f'{{"name": "torn {i}\n' for i in range(HEADER_SLACK // 40))
    layout2.result(0).write_text(layout2.result(0).read_text() + torn)
    collect(layout2.dir)
    text = layout2.summary.read_text()
    doc = json.loads(text)
    assert len([w for w in doc["warnings"] if "incomplete record" in w]) == 20
    assert len("".join(doc["warnings"])) > HEADER_SLACK
    assert '"warnings": [' in text and ',\n "files": {\n' in text   # no room: no padding
    assert {k: v for k, v in doc.items() if k not in ("warnings",)} == {
        k: v for k, v in json.loads(layout.summary.read_text()).items() if k != "warnings"}
    assert sorted(p.name for p in layout2.dir.iterdir()) == [
        "logs", "manifests", "results", "run.json", "summary.json"]


def test_collect_missing_manifest_raises(tmp_path: Path) -> None:
    layout = _write_run(tmp_path / "R1")
    layout.manifest(2).unlink()
    with pytest.raises(ValueError, match=r"task-00002\.json: missing"):
        collect(layout.dir)
    assert not layout.summary.exists()


def test_records_so_far(tmp_path: Path) -> None:
    layout = _write_run(tmp_path / "R1")
    # task 0: 3 records (10 + 20 + 10 bytes); task 1: 2 records and a torn line (30 + 40)
    assert records_so_far(layout.dir) == (5, 110)
    assert records_so_far(tmp_path / "nothing-yet") == (0, 0)


def test_collection_state_follows_the_collector(tmp_path: Path) -> None:
    """Not collected until collect_run finished (summary, ledger, then collected.json); stale
    once a task writes again or the run is submitted again."""
    import os

    from dac_upload.collect import (
        COLLECTED,
        NOT_COLLECTED,
        STALE,
        collect_run,
        collection_state,
    )

    layout = _write_run(tmp_path / "R1")
    run = json.loads(layout.run_json.read_text())
    assert collection_state(layout.dir, run) == (NOT_COLLECTED, "no summary.json yet")
    collect(layout.dir)   # summary written, the rest not: a collector killed in between
    state, why = collection_state(layout.dir, run)
    assert state == NOT_COLLECTED and "ledger" in why
    summary, ledger_problem = collect_run(layout.dir)
    assert ledger_problem is None and summary["run_id"] == run["run_id"]
    assert collection_state(layout.dir, run)[0] == COLLECTED
    with open(layout.result(0), "a") as out:   # a task wrote after the collector
        out.write(json.dumps({"name": "x", "status": "failed"}) + "\n")
    os.utime(layout.result(0), ns=(1, 1))
    assert collection_state(layout.dir, run) == (STALE, "summary.json predates the latest "
                                                 "task results")
    collect_run(layout.dir)
    again = dict(run, submissions=[*run.get("submissions", []), {"arrays": []}])
    assert collection_state(layout.dir, again)[0] == STALE


def test_foreign_result_lines_are_named_not_fatal(tmp_path: Path) -> None:
    """A line that is JSON but no record, or no JSON at all, is reported with its file and
    line; the run still collects (a torn last line is not reported: a kill leaves one)."""
    layout = _write_run(tmp_path / "R1")
    with open(layout.result(0), "a") as out:
        out.write('{"note": "by hand"}\nnot json\n')
    summary = collect(layout.dir)
    assert summary["warnings"] == [
        "results/task-00000.jsonl line 4: not a result record (no name and status; ignored)",
        "results/task-00000.jsonl line 5: not a result record (ignored)"]


def test_damaged_run_json_is_named(tmp_path: Path) -> None:
    from dac_upload.runrecord import RunReadError

    layout = _write_run(tmp_path / "R1")
    layout.run_json.write_text('{"run_id": ')
    with pytest.raises(RunReadError, match=r"R1/run\.json: damaged, not valid JSON"):
        collect(layout.dir)
    layout.run_json.unlink()
    with pytest.raises(RunReadError, match=r"no run\.json, so not a run directory"):
        collect(layout.dir)


def test_a_manifest_changed_after_planning_is_refused_reported_and_restored(
        make_job: Any) -> None:
    """A manifest cut short or edited after planning: the worker and submit refuse it (its
    sha256 is not run.json's), the summary still lists every catalogued file (from the
    manifest as planned, made again from the catalogue), and remake-manifests restores it
    byte for byte."""
    from click.testing import CliRunner

    from dac_upload.cli import main
    from dac_upload.pipeline import PlanError, prepare_run, submit_tasks
    from dac_upload.upload.task import run_task

    files = {f"f{i}.dat": bytes([i]) * 3 for i in range(6)}
    job = make_job(files, batching="files_per_batch = 2")
    layout = prepare_run(job, preflight=None).layout
    planned = layout.manifest(1).read_bytes()
    doc = json.loads(planned)
    doc["files"] = doc["files"][:1]               # a row dropped: still valid JSON
    layout.manifest(1).write_text(json.dumps(doc))
    assert run_task(layout.dir, 1, rucio_factory=lambda _a: None) == 2
    marker = json.loads(layout.done_marker(1).read_text())
    assert "not the manifest planned" in marker["aborted"]
    assert "remake-manifests" in marker["aborted"]
    with pytest.raises(PlanError, match=r"task-00001\.json: not the manifest planned"):
        submit_tasks(layout.dir, [1], 1000, lambda *a: "1")
    collect(layout.dir)
    summary = json.loads(layout.summary.read_text())
    assert summary["counts"]["files"] == 6
    assert {f["relpath"] for f in summary["files"].values()} == set(files)
    assert any("task-00001.json: not the manifest planned" in w and "remake-manifests" in w
               for w in summary["warnings"])
    out = CliRunner().invoke(main, ["remake-manifests", str(layout.dir)])
    assert out.exit_code == 0, out.output
    assert layout.manifest(1).read_bytes() == planned
    again = CliRunner().invoke(main, ["remake-manifests", str(layout.dir)])
    assert "nothing to do" in again.output


def test_summary_streams_as_documented(tmp_path: Path) -> None:
    """The reader in docs/summary-schema.md gets the same header and files as json.load."""
    layout = _write_run(tmp_path / "R1")
    collect(layout.dir)
    whole = json.loads(layout.summary.read_text())
    files = {}
    with open(layout.summary, encoding="utf-8") as f:
        head = []
        for line in f:
            if line == ' "files": {\n':
                break
            head.append(line)
        header = json.loads("".join(head).rstrip().rstrip(",") + "}")
        for line in f:
            if line.startswith(" }"):
                break
            (key, entry), = json.loads("{" + line.rstrip().rstrip(",") + "}").items()
            files[key] = entry
    assert header == {k: v for k, v in whole.items() if k != "files"}
    assert files == whole["files"] and len(files) == whole["counts"]["files"]


def test_a_torn_line_inside_a_results_file_is_reported_and_the_rest_kept(
        tmp_path: Path) -> None:
    """A task killed mid-line whose next attempt ended the line and went on: that line is
    named, every complete record before and after it counts."""
    layout = _write_run(tmp_path / "R1")
    text = layout.result(1).read_text()          # ends with a torn '{"name": "torn'
    layout.result(1).write_text(text + "\n" + json.dumps(
        {"name": "e", "status": "uploaded", "bytes": 50, "attempt": 3}) + "\n")
    collect(layout.dir)
    summary = json.loads(layout.summary.read_text())
    assert "results/task-00001.jsonl line 3: an incomplete record" in summary["warnings"][0]
    assert summary["files"]["user.t:e"]["status"] == "uploaded"


def test_collector_fit() -> None:
    """The collector's [slurm] time and mem are checked at plan time against the run."""
    from dac_upload.render import collector_fit

    assert collector_fit(1_000_000, 1000, False, 3600, 2 << 30) == []
    (line,) = collector_fit(50_000_000, 1000, False, 600, 2 << 30)
    assert line.startswith("[slurm] time (600 s) is shorter than the collector of 50,000,000")
    (line,) = collector_fit(1_000_000, 1000, True, 86400, 1 << 30)
    assert "most of it the Butler datasets" in line


@pytest.mark.parametrize("forked", [True, False])
def test_ledger_writer_forked_or_here_writes_the_same_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forked: bool) -> None:
    """The ledger's rows go to a forked writer (or, with another thread running, are written
    here): every done row and every permanent failure
    lands once, committed by finish(); finish(commit=False) leaves the ledger as it was."""
    import sqlite3
    import threading

    from dac_upload.collect import LedgerWriter

    if not forked:
        monkeypatch.setattr(threading, "active_count", lambda: 2)

    from dac_upload.collect import ledger_status

    def manifest(task: int) -> dict:
        return {"files": [{"relpath": f"d{i}/t{task}.fits", "size": i, "mtime": 1.5,
                           "name": f"p/d{i}/t{task}.fits"} for i in range(4)]}

    def statuses(task: int) -> list:
        return [ledger_status({"status": status, "cause": cause}) for status, cause in
                [("uploaded", None), ("already_present", None), ("failed", "conflict"),
                 ("failed", "rucio")]]

    path = tmp_path / "ledger.sqlite"
    writer = LedgerWriter(path, "R1", manifest)
    assert (writer.child is not None) == forked
    for task in (2, 0, 1):
        writer.put(task, manifest(task), statuses(task))
    assert writer.finish() is None
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT dir, base, size, mtime, name, status, run_id FROM files "
                          "ORDER BY dir, base").fetchall()
    assert rows == [(f"d{i}", f"t{t}.fits", i, 1.5, f"p/d{i}/t{t}.fits",
                     ("uploaded", "already_present", "failed:conflict")[i], "R1")
                    for i in range(3) for t in range(3)]   # a transient failure: no row
    new = {"files": [{"relpath": "new.fits", "size": 1, "mtime": 1.0, "name": "p/new"}]}
    dropped = LedgerWriter(path, "R2", lambda task: new)
    dropped.put(0, new, ["uploaded"])
    assert dropped.finish(commit=False) is None
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM files").fetchone() == (9,)
