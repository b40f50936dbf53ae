"""Nightly building blocks: the ledger, the unchanged-file filter, the soft lock's stale
detection, the proxy lifetime check."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dac_upload.config import parse_job
from dac_upload.ledger import Ledger, UnchangedFilter
from dac_upload.locks import JobLock, LockError
from dac_upload.nightly import credentials_problem
from dac_upload.rucio.credentials import proxy_seconds_left


def test_ledger_rows_per_directory(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.sqlite") as ledger:
        n = ledger.record([
            {"relpath": "a.fits", "size": 1, "mtime": 1.5, "name": "p/a.fits",
             "status": "uploaded"},
            {"relpath": "d/b.fits", "size": 2, "mtime": 2.5, "name": "p/d/b.fits",
             "status": "failed:conflict"},
            {"relpath": "d/c.fits", "size": 3, "mtime": 3.5, "name": "p/d/c.fits",
             "status": "already_present"}], "R1")
        assert n == 3
        assert ledger.directory("") == {"a.fits": (1, 1.5, "uploaded")}
        assert set(ledger.directory("d")) == {"b.fits", "c.fits"}
        assert ledger.needs_person() == [("d/b.fits", "failed:conflict")]
        # a later run's outcome replaces the row
        ledger.record([{"relpath": "d/b.fits", "size": 9, "mtime": 9.0, "name": "p/d/b.fits",
                        "status": "uploaded"}], "R2")
        assert ledger.needs_person() == []
        assert ledger.counts() == {"uploaded": 2, "already_present": 1}


def test_staged_rows_merge_in_key_order_and_drop_without_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The collector's path (stage_rows): rows merged every MERGE_EVERY and at commit; of two
    rows of one file the later wins, over the ledger's older row too; closed without a
    commit, nothing of the run is kept."""
    monkeypatch.setattr(Ledger, "MERGE_EVERY", 4)
    path = tmp_path / "l.sqlite"
    with Ledger(path) as ledger:
        ledger.record([{"relpath": "d/x", "size": 1, "mtime": 1.0, "name": "x",
                        "status": "failed:conflict"}], "R0")
    rows = [(f"d{i % 3}/f{(i * 7) % 10}", i, float(i), f"n{i}", "uploaded") for i in range(10)]
    with Ledger(path) as ledger:
        for i in range(0, 10, 3):                      # tasks of three rows, merged by fours
            ledger.stage_rows(rows[i:i + 3], "R1")
        ledger.stage_rows([("d0/f0", 99, 99.0, "again", "already_present"),
                           ("d/x", 2, 2.0, "x", "uploaded")], "R1")
        ledger.commit()
        assert ledger.counts() == {"uploaded": 10, "already_present": 1}
        assert ledger.directory("d0")["f0"] == (99, 99.0, "already_present")
        assert ledger.directory("d") == {"x": (2, 2.0, "uploaded")}
        assert ledger.db.execute("SELECT DISTINCT run_id FROM files").fetchall() == [("R1",)]
    with Ledger(path) as ledger:
        ledger.stage_rows([(f"e/{i}", i, 0.0, "e", "uploaded") for i in range(9)], "R2")
    with Ledger(path) as ledger:                       # closed without a commit: dropped
        assert ledger.directory("e") == {} and ledger.counts()["uploaded"] == 10


def test_ledger_stores_narrow_and_shows_rows_written_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Directories and runs are numbers, a name that is the run's prefix + the path is not
    stored; the view "files" shows every row as written (what docs/operations.md queries).
    Directory numbers held past DIR_IDS_HELD are looked up again, not made twice."""
    import dac_upload.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "DIR_IDS_HELD", 2)
    path = tmp_path / "l.sqlite"
    rows = [(f"d{i % 5}/f{i}", i, float(i), f"p/d{i % 5}/f{i}", "uploaded") for i in range(20)]
    rows += [("top.fits", 7, 7.0, "p/top.fits", "uploaded"),
             ("d0/renamed", 8, 8.0, "p/elsewhere/renamed", "already_present")]
    with Ledger(path) as ledger:
        ledger.stage_rows(rows, "R1")
        ledger.commit()
    import sqlite3

    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (2,)
        assert db.execute("SELECT COUNT(*) FROM dirs").fetchone() == (6,)   # '' and d0-d4
        assert db.execute("SELECT run_id, prefix FROM runs").fetchall() == [("R1", "p/")]
        assert db.execute("SELECT base, name FROM entries WHERE name IS NOT NULL"
                          ).fetchall() == [("renamed", "p/elsewhere/renamed")]
        shown = db.execute("SELECT dir, base, size, mtime, name, status, run_id FROM files"
                           ).fetchall()
    expected = [(*r[0].rpartition("/")[::2], *r[1:], "R1") for r in rows]
    assert sorted(shown) == sorted(expected)


SCHEMA_1 = """
CREATE TABLE files (dir TEXT NOT NULL, base TEXT NOT NULL, size INTEGER NOT NULL,
    mtime REAL NOT NULL, name TEXT NOT NULL, status TEXT NOT NULL, run_id TEXT NOT NULL,
    updated TEXT NOT NULL, PRIMARY KEY (dir, base)) WITHOUT ROWID;
"""


def test_a_ledger_of_the_first_schema_is_converted_with_every_row(tmp_path: Path) -> None:
    """A ledger written by an earlier dac-upload (one wide table) is converted on opening,
    in one transaction: the same rows, names, runs and times, read as before; the wide
    table's pages given back."""
    import sqlite3

    path = tmp_path / "l.sqlite"
    old = [("d", "a.fits", 1, 1.5, "p/d/a.fits", "uploaded", "R1", "2026-01-01T00:00:00Z"),
           ("d", "b.fits", 2, 2.5, "p/x/b.fits", "failed:conflict", "R2",
            "2026-01-02T00:00:00Z"),
           ("", "top", 3, 3.5, "p/top", "already_present", "R1", "2026-01-01T00:00:09Z")]
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_1)
        db.executemany("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)", old)
    with Ledger(path) as ledger:
        assert ledger.directory("d") == {"a.fits": (1, 1.5, "uploaded"),
                                         "b.fits": (2, 2.5, "failed:conflict")}
        assert ledger.directory("") == {"top": (3, 3.5, "already_present")}
        assert ledger.needs_person() == [("d/b.fits", "failed:conflict")]
        rows = ledger.db.execute("SELECT dir, base, size, mtime, name, status, run_id, "
                                 "updated FROM files").fetchall()
        # a run's time is its latest row's
        assert sorted(rows) == sorted([(*old[0][:7], "2026-01-01T00:00:09Z"), *old[1:]])
        assert ledger.db.execute("SELECT COUNT(*) FROM entries WHERE name IS NULL"
                                 ).fetchone() == (2,)   # p/ + the path: not stored
        assert ledger.db.execute("PRAGMA freelist_count").fetchone() == (0,)   # vacuumed
        ledger.record([{"relpath": "d/b.fits", "size": 9, "mtime": 9.0, "name": "p/d/b.fits",
                        "status": "uploaded"}], "R3")
        assert ledger.needs_person() == []
    with Ledger(path) as ledger:   # opened again: nothing more to convert
        assert ledger.counts() == {"uploaded": 2, "already_present": 1}


def test_a_ledger_of_a_newer_schema_is_refused_with_the_fix(tmp_path: Path) -> None:
    import sqlite3

    from dac_upload.ledger import LedgerError

    path = tmp_path / "l.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 9")
    with pytest.raises(LedgerError, match=r"newer dac-upload .* upgrade dac-upload"):
        Ledger(path)


def test_unchanged_filter_keeps_new_and_changed_only(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.sqlite") as ledger:
        ledger.record([{"relpath": f"d{i % 3}/f{i}", "size": i, "mtime": float(i),
                        "name": f"f{i}", "status": "uploaded"} for i in range(30)], "R1")
        keep = UnchangedFilter(ledger)
        kept = [rel for rel, size, mtime in [("d0/f0", 0, 0.0), ("d0/f3", 3, 3.0),
                                             ("d0/new", 1, 1.0), ("d1/f1", 1, 99.0),
                                             ("d1/f4", 5, 4.0), ("d2/f2", 2, 2.0)]
                if keep(rel, size, mtime)]
        assert kept == ["d0/new", "d1/f1", "d1/f4"]      # new, mtime changed, size changed
        assert keep.unchanged == 3
        assert keep.changed == {"d1/f1", "d1/f4"}          # [packing] keeps these loose
        assert len(keep._rows) == 10                       # only the current directory held


def _write_stale(job_dir: Path, pid: int, age: float, host: str | None = None) -> None:
    (job_dir / "nightly.lock").write_text("")
    (job_dir / "nightly.lock.json").write_text(json.dumps(
        {"host": host or socket.gethostname(), "pid": pid, "started": time.time() - age,
         "mode": "soft"}))


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_soft_lock_reports_a_dead_holder_and_breaks_only_when_told(tmp_path: Path) -> None:
    pid = _dead_pid()
    _write_stale(tmp_path, pid, 60)
    with pytest.raises(LockError, match=f"stale lock \\(its process is gone\\): pid {pid}"):
        JobLock(tmp_path, "soft").acquire()
    assert (tmp_path / "nightly.lock").exists()
    lock = JobLock(tmp_path, "soft")
    lock.acquire(break_stale=True)
    assert any("removed a stale lock" in n for n in lock.notes)
    assert json.loads((tmp_path / "nightly.lock.json").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "nightly.lock").exists()


def test_soft_lock_of_a_live_holder_is_respected(tmp_path: Path) -> None:
    _write_stale(tmp_path, os.getpid(), 60)                 # alive: this very process
    with pytest.raises(LockError, match="holds its lock"):
        JobLock(tmp_path, "soft").acquire(break_stale=True)


def test_soft_lock_too_old_on_another_host_is_stale(tmp_path: Path) -> None:
    _write_stale(tmp_path, 12345, 2 * 86400, host="login-other")
    with pytest.raises(LockError, match=r"stale lock \(it is 48.0 h old\)"):
        JobLock(tmp_path, "soft").acquire()


def test_flock_mode_is_exclusive_across_processes(tmp_path: Path) -> None:
    lock = JobLock(tmp_path, "flock")
    lock.acquire()
    code = ("import sys; from pathlib import Path; from dac_upload.locks import JobLock, "
            "LockError\ntry:\n    JobLock(Path(sys.argv[1]), 'flock').acquire()\n"
            "except LockError as e:\n    print(e); sys.exit(10)\n")
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path)],
                           capture_output=True, text=True)
    assert other.returncode == 10, other.stderr
    assert f"pid {os.getpid()}" in other.stdout
    lock.release()


def test_flock_probe_held_by_another_process_still_means_flock_works(tmp_path: Path) -> None:
    """Two nightlies started together probe at once: the loser must not crash (seen in CI)."""
    import fcntl

    from dac_upload.locks import flock_works

    fd = os.open(tmp_path / ".flock-probe", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)          # another open file description holds it
    try:
        assert flock_works(tmp_path) is True
    finally:
        os.close(fd)


def test_proxy_lifetime_against_the_time_limit(tmp_path: Path, proxy: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    left = proxy_seconds_left(proxy)
    assert left is not None and 86000 < left <= 86400
    cfg = tmp_path / "rucio.cfg"
    cfg.write_text("[client]\nrucio_host = http://r\nauth_type = x509_proxy\n")
    monkeypatch.setenv("X509_USER_PROXY", str(proxy))

    def job(time_limit: str):
        return parse_job({"source": {"root": str(tmp_path)},
                          "rucio": {"scope": "s", "rse": "R", "config": str(cfg)},
                          "slurm": {"time": time_limit}, "container": {"runtime": "none"}},
                         path=tmp_path / "j.toml")

    assert credentials_problem(job("12:00:00")) is None
    problem = credentials_problem(job("2-00:00:00"))
    assert problem is not None and "expires in 24.0 h" in problem and "48.0 h" in problem
    proxy.chmod(0o644)
    problem = credentials_problem(job("12:00:00"))
    assert problem == (f"X.509 proxy {proxy} can be read by others (mode 644): run "
                       f"'chmod 600 {proxy}'")
    cfg.write_text("[client]\nrucio_host = http://r\nauth_type = userpass\nusername = u\n"
                   "password = p\n")
    cfg.chmod(0o600)
    assert credentials_problem(job("2-00:00:00")) is None   # no proxy involved


def _job(tmp_path: Path, **rucio: str):
    return parse_job({"source": {"root": str(tmp_path / "src"), "include": ["**/*.fits"]},
                      "rucio": {"scope": "s", "rse": "R", **rucio},
                      "container": {"runtime": "none"}}, path=tmp_path / "j.toml")


def test_one_ledger_per_destination(tmp_path: Path) -> None:
    a, b = _job(tmp_path), _job(tmp_path, rse="OTHER")
    assert a.ledger_path.parent == a.runs_dir
    assert a.ledger_path.name.startswith("ledger.s.R.") and a.ledger_path != b.ledger_path
    assert a.ledger_path == _job(tmp_path).ledger_path


def test_latest_run_skips_runs_never_submitted(tmp_path: Path) -> None:
    from dac_upload.nightly import latest_run

    job = _job(tmp_path)
    for run_id, subs in (("20261101T000000Z-a", [{"arrays": []}]),
                         ("20261102T000000Z-b", [])):
        (job.runs_dir / run_id).mkdir(parents=True)
        (job.runs_dir / run_id / "run.json").write_text(json.dumps(
            {"run_id": run_id, "plan": {"tasks": 1}, "submissions": subs}))
    assert latest_run(job).name == "20261101T000000Z-a"


def test_latest_run_names_a_damaged_run_json(tmp_path: Path) -> None:
    from dac_upload.nightly import latest_run
    from dac_upload.runrecord import RunReadError

    job = _job(tmp_path)
    (job.runs_dir / "20261101T000000Z-a").mkdir(parents=True)
    (job.runs_dir / "20261101T000000Z-a" / "run.json").write_text('{"run_id": "x", "pl')
    with pytest.raises(RunReadError, match=r"20261101T000000Z-a/run.json: damaged"):
        latest_run(job)


def test_fixed_by_deleting_or_excluding_is_forgotten(tmp_path: Path) -> None:
    from dac_upload.nightly import _still_needing_a_person

    job = _job(tmp_path)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "kept.fits").write_bytes(b"x")
    (tmp_path / "src" / "now.txt").write_bytes(b"x")
    job.runs_dir.mkdir(parents=True)
    with Ledger(job.ledger_path) as ledger:
        ledger.record([{"relpath": rel, "size": 1, "mtime": 1.0, "name": rel,
                        "status": "failed:conflict"}
                       for rel in ("kept.fits", "gone.fits", "now.txt")], "R1")
    assert _still_needing_a_person(job) == [("kept.fits", "failed:conflict")]
    with Ledger(job.ledger_path) as ledger:
        assert ledger.needs_person() == [("kept.fits", "failed:conflict")]
