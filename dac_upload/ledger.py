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

Stored narrow (schema 2): a row keeps its directory as a number (table ``dirs``), its run as
a number (table ``runs``: run_id, the time it was written), and its name only where it is
not the run's prefix followed by the path. A row of a million-file run is then about a
third as wide as written out, and the collector's writes touch a third of the pages. The
view ``files`` shows the rows written out (dir, base, size, mtime, name, status, run_id,
updated), for reading by hand with ``sqlite3``.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import utc_now

SCHEMA_VERSION = 2   # PRAGMA user_version; 0 with a table "files": the first, wide schema

_TABLES = """
CREATE TABLE IF NOT EXISTS dirs (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS runs (
    id      INTEGER PRIMARY KEY,
    run_id  TEXT NOT NULL UNIQUE,
    prefix  TEXT NOT NULL,        -- a row's name, where it has none: prefix || its path
    updated TEXT NOT NULL         -- when the run's rows were last written
);
CREATE TABLE IF NOT EXISTS entries (
    dir     INTEGER NOT NULL,     -- dirs.id
    base    TEXT NOT NULL,
    size    INTEGER NOT NULL,
    mtime   REAL NOT NULL,
    status  TEXT NOT NULL,
    run     INTEGER NOT NULL,     -- runs.id
    name    TEXT,                 -- NULL: the run's prefix || the path
    PRIMARY KEY (dir, base)
) WITHOUT ROWID;
CREATE VIEW IF NOT EXISTS files AS
    SELECT d.path AS dir, e.base AS base, e.size AS size, e.mtime AS mtime,
           COALESCE(e.name, r.prefix || d.path
                    || CASE d.path WHEN '' THEN '' ELSE '/' END || e.base) AS name,
           e.status AS status, r.run_id AS run_id, r.updated AS updated
    FROM entries e JOIN dirs d ON d.id = e.dir JOIN runs r ON r.id = e.run;
"""

DIR_IDS_HELD = 200_000   # directory numbers kept in memory by a writer (then looked up again)


class LedgerError(UserError):
    """A ledger this version cannot use (written by a newer one)."""

    def __init__(self, line: str) -> None:
        super().__init__([line])


def split(relpath: str) -> tuple[str, str]:
    d, _, b = relpath.rpartition("/")
    return d, b


def join(reldir: str, base: str) -> str:
    """The relpath that split() split."""
    return f"{reldir}/{base}" if reldir else base


def prefix_of(relpath: str, name: str) -> str:
    """What a name adds before its file's path ('' if it does not end with the path): a
    run's prefix, from its first file."""
    return name[:-len(relpath)] if relpath and name.endswith(relpath) else ""


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.db = sqlite3.connect(str(self.path), timeout=60)
        self._schema()
        self._writing = False   # _for_writing
        self._dir_ids: dict[str, int] = {}
        self._runs: dict[str, tuple[int, str]] = {}   # run_id -> (id, prefix)
        self._staged_table, self._staged, self._staged_run = False, 0, ""   # stage_rows

    def _schema(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            self.db.close()
            raise LedgerError(f"{self.path} was written by a newer dac-upload (ledger schema "
                              f"{version}, this one knows {SCHEMA_VERSION}): upgrade dac-upload")
        first = self.db.execute("SELECT type FROM sqlite_master WHERE name = 'files'"
                                ).fetchone()
        if version == 0 and first == ("table",):
            self._from_schema_1()
        elif version < SCHEMA_VERSION:
            self.db.executescript(f"BEGIN; {_TABLES} PRAGMA user_version = {SCHEMA_VERSION};"
                                  " COMMIT;")

    def _from_schema_1(self) -> None:
        """The first schema (one wide table "files", every name written out) into this one,
        in one transaction: the same rows, names, runs and times. The prefix is the one of
        the first row (a ledger is one destination's, of one [naming] prefix); a name that
        is not prefix + path is kept as it is."""
        db = self.db
        first = db.execute("SELECT dir, base, name FROM files LIMIT 1").fetchone()
        prefix = prefix_of(join(first[0], first[1]), first[2]) if first else ""
        db.execute("BEGIN")
        try:
            db.execute("ALTER TABLE files RENAME TO files_schema_1")
            for statement in _TABLES.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT INTO dirs (path) SELECT DISTINCT dir FROM files_schema_1 "
                       "ORDER BY dir")
            db.execute("INSERT INTO runs (run_id, prefix, updated) SELECT run_id, ?, "
                       "MAX(updated) FROM files_schema_1 GROUP BY run_id ORDER BY run_id",
                       (prefix,))
            db.execute("INSERT INTO entries SELECT d.id, f.base, f.size, f.mtime, f.status, "
                       "r.id, NULLIF(f.name, ? || f.dir || CASE f.dir WHEN '' THEN '' "
                       "ELSE '/' END || f.base)"
                       " FROM files_schema_1 f JOIN dirs d ON d.path = f.dir JOIN runs r ON "
                       "r.run_id = f.run_id ORDER BY d.id, f.base", (prefix,))
            db.execute("DROP TABLE files_schema_1")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.commit()
        except BaseException:
            db.rollback()
            raise
        # The wide table's pages back to the file system (under a third of the file is kept).
        # Without room for VACUUM's copy (or busy), the free pages stay and later rows reuse them.
        with contextlib.suppress(sqlite3.OperationalError):
            db.execute("VACUUM")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _for_writing(self) -> None:
        """Up to 64 MB of pages held (SQLite's default is 2 MB), for a writer only: a
        collector's rows come in no order of the key (a task's files are spread over the
        tree), and a million of them took 5.5 s to insert with 2 MB, 3.6 s with 64 MB. The
        nightly's walk reads each page once: there the larger cache only adds 60 MB."""
        if not self._writing:
            self.db.execute("PRAGMA cache_size = -65536")
            self._writing = True

    def _dir_id(self, path: str) -> int:
        """The number of a directory not in ``_dir_ids``: looked up, or made on first use
        (in the open transaction), then held."""
        row = self.db.execute("SELECT id FROM dirs WHERE path = ?", (path,)).fetchone()
        if row is None:
            dir_id = self.db.execute("INSERT INTO dirs (path) VALUES (?)", (path,)).lastrowid
            assert dir_id is not None
        else:
            dir_id = row[0]
        if len(self._dir_ids) >= DIR_IDS_HELD:
            self._dir_ids.clear()
        self._dir_ids[path] = dir_id
        return dir_id

    def _run(self, run_id: str, relpath: str, name: str) -> tuple[int, str]:
        """(number, prefix) of a run, made on first use: its prefix is what its first
        file's name adds before the path (kept for a run written before)."""
        known = self._runs.get(run_id)
        if known is None:
            row = self.db.execute("SELECT id, prefix FROM runs WHERE run_id = ?",
                                  (run_id,)).fetchone()
            if row is None:
                prefix = prefix_of(relpath, name)
                run = self.db.execute("INSERT INTO runs (run_id, prefix, updated) VALUES "
                                      "(?, ?, ?)", (run_id, prefix, utc_now())).lastrowid
                assert run is not None
                known = (run, prefix)
            else:
                known = (row[0], row[1])
            self._runs[run_id] = known
        return known

    def _narrow(self, rows: Iterable[Sequence[Any]], run_id: str
                ) -> tuple[int, list[tuple[Any, ...]]]:
        """(run number, [(dir number, base, size, mtime, status, name or None)])."""
        run, prefix, data = -1, "", []
        dir_id, known = self._dir_id, self._dir_ids.get
        for rel, size, mtime, name, status in rows:
            if run < 0:
                run, prefix = self._run(run_id, rel, name)
            d, _, b = rel.rpartition("/")   # split(), inlined: once a row
            data.append((known(d) or dir_id(d), b, size, mtime, status,
                         None if name == prefix + rel else name))
        return run, data

    def directory(self, reldir: str) -> dict[str, tuple[int, float, str]]:
        """{basename: (size, mtime, status)} of one directory ('' is the root)."""
        rows = self.db.execute("SELECT base, size, mtime, status FROM entries WHERE dir = "
                               "(SELECT id FROM dirs WHERE path = ?)", (reldir,))
        return {base: (size, mtime, status) for base, size, mtime, status in rows}

    def record(self, rows: Iterable[dict[str, Any]], run_id: str, commit: bool = True) -> int:
        """Insert or replace rows {relpath, size, mtime, name, status}; return how many.
        ``commit=False`` leaves them in the open transaction (the collector commits once at
        the end: a commit per task cost 4.8 s of fsyncs at a million files)."""
        return self.record_rows([(r["relpath"], r["size"], r["mtime"], r["name"], r["status"])
                                 for r in rows], run_id, commit)

    def record_rows(self, rows: Iterable[Sequence[Any]], run_id: str,
                    commit: bool = True) -> int:
        """record() of (relpath, size, mtime, name, status) rows, each inserted as it
        comes."""
        self._for_writing()
        run, data = self._narrow(rows, run_id)
        self.db.executemany(f"INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, {run}, ?)",
                            data)
        if data:
            self._touch(run)
        if commit:
            self.db.commit()
        return len(data)

    def _touch(self, run: int) -> None:
        self.db.execute("UPDATE runs SET updated = ? WHERE id = ?", (utc_now(), run))

    # A run's rows come in no order of the key (a task's files are spread over the tree):
    # inserted as they come, each touches another page of a B-tree that outgrows the cache
    # (tests/benchmarks/ledger_merge.py). Appended to a temporary table instead and merged
    # in key order every MERGE_EVERY rows, each merge walks the B-tree once, in order; what
    # is left for commit() is at most MERGE_EVERY rows.
    MERGE_EVERY = 500_000

    def stage_rows(self, rows: Iterable[Sequence[Any]], run_id: str) -> int:
        """record_rows() for a run's many rows, in the open transaction: kept aside, merged
        into the ledger every MERGE_EVERY rows and by merge_staged(); return how many."""
        self._for_writing()
        if not self._staged_table:
            # TEMP: in SQLite's temporary file (TMPDIR), its pages cached apart, removed
            # with the connection
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS staged (dir INTEGER, base TEXT,"
                            " size INTEGER, mtime REAL, status TEXT, name TEXT)")
            self._staged_table = True
        if run_id != self._staged_run:
            self.merge_staged()
            self._staged_run = run_id
        _, data = self._narrow(rows, run_id)
        self.db.executemany("INSERT INTO temp.staged VALUES (?, ?, ?, ?, ?, ?)", data)
        self._staged += len(data)
        if self._staged >= self.MERGE_EVERY:
            self.merge_staged()
        return len(data)

    def merge_staged(self) -> None:
        """The staged rows into the ledger, in key order (of two rows of one file, the one
        staged later wins, as if inserted in turn); still uncommitted."""
        if self._staged:
            run = self._runs[self._staged_run][0]
            self.db.execute("INSERT OR REPLACE INTO entries SELECT dir, base, size, mtime, "
                            "status, ?, name FROM temp.staged ORDER BY dir, base, rowid",
                            (run,))
            self.db.execute("DELETE FROM temp.staged")
            self._touch(run)
            self._staged = 0

    def commit(self) -> None:
        self.merge_staged()
        self.db.commit()

    def forget(self, relpaths: Iterable[str]) -> None:
        with self.db:
            self.db.executemany("DELETE FROM entries WHERE dir = (SELECT id FROM dirs WHERE "
                                "path = ?) AND base = ?", [split(r) for r in relpaths])

    def needs_person(self) -> list[tuple[str, str]]:
        """(relpath, status) of every file whose last outcome was a failure to fix by hand."""
        rows = self.db.execute("SELECT d.path, e.base, e.status FROM entries e JOIN dirs d "
                               "ON d.id = e.dir WHERE e.status LIKE 'failed:%' "
                               "ORDER BY d.path, e.base")
        return [(join(d, b), s) for d, b, s in rows]

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT status, COUNT(*) FROM entries GROUP BY status"))


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
