"""The job's ledger: what earlier runs of a job did with each file (SQLite, stdlib).

One row per source path: the size and mtime it had when a run finished with it, its Rucio
name, and the outcome: ``uploaded`` / ``already_present`` (done), or a failure that needs a
person (``failed:<cause>``, e.g. ``failed:conflict``). A nightly run skips a file whose size
and mtime still match its row; any change makes it new again. Rows are looked up one
directory at a time, so a scan of millions of files never holds the whole ledger in memory.

The ledger is written by ``collect`` (the collector job at the end of a run) and by
``nightly`` under the job's lock (giving up on files, forgetting fixed ones), never at the
same time: nightly does nothing while a run of the job is queued, so SQLite's own locking,
which some NFS/Lustre mounts do not honour, is not relied on.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .files import utc_now

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    dir     TEXT NOT NULL,
    base    TEXT NOT NULL,
    size    INTEGER NOT NULL,
    mtime   REAL NOT NULL,
    name    TEXT NOT NULL,
    status  TEXT NOT NULL,
    run_id  TEXT NOT NULL,
    updated TEXT NOT NULL,
    PRIMARY KEY (dir, base)
) WITHOUT ROWID;
"""


def split(relpath: str) -> tuple[str, str]:
    d, _, b = relpath.rpartition("/")
    return d, b


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.db = sqlite3.connect(str(self.path), timeout=60)
        # up to 64 MB of pages held (SQLite's default is 2 MB): a collector's rows come in
        # no order of the key (a task's files are spread over the tree), and a million of
        # them took 5.5 s to insert with 2 MB, 3.6 s with 64 MB
        self.db.execute("PRAGMA cache_size = -65536")
        self.db.execute(_SCHEMA)
        self._staged_table, self._staged, self._staged_run = False, 0, ""   # stage_rows

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def directory(self, reldir: str) -> dict[str, tuple[int, float, str]]:
        """{basename: (size, mtime, status)} of one directory ('' is the root)."""
        rows = self.db.execute("SELECT base, size, mtime, status FROM files WHERE dir = ?",
                               (reldir,))
        return {base: (size, mtime, status) for base, size, mtime, status in rows}

    def record(self, rows: Iterable[dict[str, Any]], run_id: str, commit: bool = True) -> int:
        """Insert or replace rows {relpath, size, mtime, name, status}; return how many.
        ``commit=False`` leaves them in the open transaction (the collector commits once at
        the end: a commit per task cost 4.8 s of fsyncs at a million files)."""
        return self.record_rows([(r["relpath"], r["size"], r["mtime"], r["name"], r["status"])
                                 for r in rows], run_id, commit)

    def record_rows(self, rows: Iterable[Sequence[Any]], run_id: str,
                    commit: bool = True) -> int:
        """record() of (relpath, size, mtime, name, status) rows."""
        now = utc_now()
        data = [(*split(rel), size, mtime, name, status, run_id, now)
                for rel, size, mtime, name, status in rows]
        self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            data)
        if commit:
            self.db.commit()
        return len(data)

    # A run's rows come in no order of the key (a task's files are spread over the tree):
    # inserted as they come, each touches another page of a B-tree that outgrows the cache
    # (tests/benchmarks/ledger_merge.py: 5M rows 66.6 s). Appended to a temporary table
    # instead and merged in key order every MERGE_EVERY rows, each merge walks the B-tree
    # once, in order: 5M rows 38.5 s, 1M 6.9 s (against 10.1 s); what is left for commit()
    # is at most MERGE_EVERY rows.
    MERGE_EVERY = 500_000

    def stage_rows(self, rows: Iterable[Sequence[Any]], run_id: str) -> int:
        """record_rows() for a run's many rows, in the open transaction: kept aside, merged
        into the ledger every MERGE_EVERY rows and by merge_staged(); return how many."""
        if not self._staged_table:
            # TEMP: in SQLite's temporary file (TMPDIR), its pages cached apart, removed
            # with the connection; run_id and the time are added at the merge (as columns
            # here they cost a third more)
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS staged (dir TEXT, base TEXT, "
                            "size INTEGER, mtime REAL, name TEXT, status TEXT)")
            self._staged_table = True
        if run_id != self._staged_run:
            self.merge_staged()
            self._staged_run = run_id
        data = [(*split(rel), size, mtime, name, status)
                for rel, size, mtime, name, status in rows]
        self.db.executemany("INSERT INTO temp.staged VALUES (?, ?, ?, ?, ?, ?)", data)
        self._staged += len(data)
        if self._staged >= self.MERGE_EVERY:
            self.merge_staged()
        return len(data)

    def merge_staged(self) -> None:
        """The staged rows into the ledger, in key order (of two rows of one file, the one
        staged later wins, as if inserted in turn); still uncommitted."""
        if self._staged:
            self.db.execute("INSERT OR REPLACE INTO files SELECT dir, base, size, mtime, "
                            "name, status, ?, ? FROM temp.staged ORDER BY dir, base, rowid",
                            (self._staged_run, utc_now()))
            self.db.execute("DELETE FROM temp.staged")
            self._staged = 0

    def commit(self) -> None:
        self.merge_staged()
        self.db.commit()

    def forget(self, relpaths: Iterable[str]) -> None:
        with self.db:
            self.db.executemany("DELETE FROM files WHERE dir = ? AND base = ?",
                                [split(r) for r in relpaths])

    def needs_person(self) -> list[tuple[str, str]]:
        """(relpath, status) of every file whose last outcome was a failure to fix by hand."""
        rows = self.db.execute("SELECT dir, base, status FROM files WHERE status LIKE 'failed:%'"
                               " ORDER BY dir, base")
        return [(f"{d}/{b}" if d else b, s) for d, b, s in rows]

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT status, COUNT(*) FROM files GROUP BY status"))


class UnchangedFilter:
    """``keep(relpath, size, mtime)`` for the catalogue walk: True for files the ledger does
    not have with this size and mtime (new or changed). Holds one directory's rows at a time
    (the walk visits a directory's files together)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._dir: str | None = None
        self._rows: dict[str, tuple[int, float, str]] = {}
        self.unchanged = 0
        self.changed: set[str] = set()   # in the ledger with another size or mtime

    def __call__(self, relpath: str, size: int, mtime: float) -> bool:
        d, b = split(relpath)
        if d != self._dir:
            self._dir, self._rows = d, self.ledger.directory(d)
        row = self._rows.get(b)
        if row is not None and row[0] == size and row[1] == mtime:
            self.unchanged += 1
            return False
        if row is not None:
            self.changed.add(relpath)
        return True
