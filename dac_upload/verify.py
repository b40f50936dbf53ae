"""``dac-upload verify RUN``: a finished run checked again, as ``rclone check`` does, against
what Rucio and the storage hold now, and optionally against the source files.

A packed file ([packing]) is checked as its archive's member: Rucio has it, with the
recorded size and checksums, resolved to its archive's PFN; the archive's rule, dataset and
stored bytes (checked once per archive, against Rucio's size and adler32 of the archive) are
its own.

For every file that summary.json says is ``uploaded`` or ``already_present``: Rucio has the
file with the recorded size and checksums and an AVAILABLE replica on the run's RSE; a rule
on the file, or on a dataset or container it is in, protects it there (with a dataset: the
file is still in it); the storage's own stat and checksum of the object at its PFN agree
(gfal2 for root:// and davs://, the file on disk for a POSIX RSE); with ``source`` the
source file still has its catalogued size and mtime (``"size"``), and its adler32
(``"checksum"``, one read of every file).

In bulk, so that a million files take minutes: summary.json is streamed, CHUNK files at a
time (memory does not grow with the run); each chunk is ONE list_replicas request. A run's
dataset is read once: its files (ONE streamed listing, kept in an SQLite table on disk), its
rules and those of the containers it is in. Files that it does not protect (every file of a
run without a dataset) wait in that table; then, if there are more than ONE_BY_ONE, ONE
streamed listing of the scope's file rules on the RSE strikes off those it protects (first
the rules made since the run was planned; all of them if many files are still open); the
few left are asked one by one, with the collections they are in.
The storage and source checks of a chunk run in a bounded thread pool while its Rucio
request is out. Rucio's delete-rule only sets a rule's expires_at an hour ahead: such a
rule (in a run without a lifetime) is ``rule_expiring``, one past its expiry none.

The comparisons are pure functions (``rucio_problems``, ``storage_problems``,
``source_problems``); the Rucio and storage calls are in rucio/client.py
(``RucioIO.file_replicas``, ``did_rules``, ``ruled_files``, ``rses_of``,
``storage_reader``) and rucio/storage.py (``Storage.inspect``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Protocol

from .errors import Exit, UserError
from .files import atomic_write_stream, read_checksums, read_manifest
from .runrecord import DONE_STATES, RunLayout, RunReadError, RunRecord, read_run_json

if TYPE_CHECKING:
    from .rucio.client import FileReplicas, RuleInfo
    from .rucio.storage import StoredObject

SOURCE_MODES = ("none", "size", "checksum")
PROBLEMS_FILE = "verify.jsonl"      # in the run directory: every problem, one per line

CHUNK = 1000                # files per list_replicas request: the server takes no more
EXAMPLES_PER_CAUSE = 5      # problems per cause kept for the report (all go to the file)
ONE_BY_ONE = 50             # so few unprotected files are asked rule by rule at once
ONE_BY_ONE_MAX = 1000       # at most this many are asked rule by rule after the listings
STORAGE_ERRORS_IN_A_ROW = 25   # then the storage is taken for unreachable: stop
RETRY_WAITS = (2.0, 5.0)    # seconds before each further try of a failed Rucio request
CLOCK_SKEW = timedelta(hours=1)   # between the planning host's clock and the server's
PARENT_CACHE = 10_000       # collections whose protection is remembered at once

# cause -> what it means (the text report's headings; the docs list them)
CAUSES: dict[str, str] = {
    "missing_replica": "Rucio has no such file, or no replica of it on the RSE",
    "not_available": "its replica on the RSE is not AVAILABLE",
    "size_mismatch": "Rucio's size is not the recorded one",
    "checksum_mismatch": "Rucio's adler32 or md5 is not the recorded one",
    "no_rule": "no rule on the file, nor on a dataset or container it is in, covers the RSE",
    "rule_expiring": "the rules that cover the RSE expire (deleted since, or given a lifetime)",
    "not_in_dataset": "the file is no longer in the run's dataset",
    "not_in_archive": "[packing]: Rucio does not resolve the file to the archive that holds it",
    "storage_missing": "the storage has nothing at the PFN",
    "storage_size_mismatch": "the storage's size is not the recorded one",
    "storage_checksum_mismatch": "the storage's checksum is not the recorded one",
    "storage_error": "the storage could not say (its error is given)",
    "source_missing": "the source file is gone",
    "source_changed": "the source file is not what was uploaded",
    "source_unreadable": "the source file cannot be read",
}

Found = list[tuple[str, str]]   # (cause, detail) of one file


class VerifyError(UserError):
    """The run cannot be verified as it is (not collected, no summary, unreadable, the
    credentials refused): one line per problem with the fix; the CLI exits Exit.USER."""


class StorageReader(Protocol):
    """An RSE's storage, read (rucio.storage.Storage)."""

    def inspect(self, pfn: str) -> StoredObject: ...


class VerifySession(Protocol):
    """What verify asks of Rucio (rucio.client.RucioIO; the tests' fakes otherwise)."""

    @property
    def host(self) -> str: ...

    def file_replicas(self, scope: str, names: list[str], rse: str,
                      parents: bool = False) -> dict[str, FileReplicas]: ...

    def did_rules(self, scope: str, name: str) -> list[RuleInfo]: ...

    def ruled_files(self, scope: str, rse: str, created_after: datetime | None = None
                    ) -> Iterator[tuple[str, datetime | None]]: ...

    def rses_of(self, expression: str) -> list[str]: ...

    def collection_files(self, scope: str, name: str) -> Iterator[tuple[str, str]]: ...

    def parent_dids(self, scope: str, name: str) -> list[str]: ...

    def storage_reader(self, rse: str) -> StorageReader: ...


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file (a file may have several)."""

    cause: str
    did: str              # scope:name
    relpath: str
    detail: str
    task: int | None = None
    pfn: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"cause": self.cause, "did": self.did, "relpath": self.relpath,
                "detail": self.detail, "task": self.task, "pfn": self.pfn}


@dataclass
class VerifyReport:
    """What ``verify_run`` found: counts, the first problems of each cause, and where the
    full list is (``problems_file``)."""

    run_dir: Path
    run_id: str
    host: str
    scope: str
    rse: str
    source: str
    storage: bool
    files: int = 0              # in the summary
    checked: int = 0            # uploaded or already_present: the files verified
    bytes_checked: int = 0
    not_done: int = 0           # failed or not_attempted in the summary: not looked at
    files_with_problems: int = 0
    causes: dict[str, int] = field(default_factory=dict)     # cause -> problems
    examples: dict[str, list[Problem]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rucio_requests: int = 0
    seconds: float = 0.0
    problems_file: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.causes

    @property
    def exit_code(self) -> int:
        """Exit.OK when every checked file passed, Exit.FAILURES otherwise."""
        return Exit.OK if self.ok else Exit.FAILURES

    def to_json(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "run_id": self.run_id, "ok": self.ok,
                "exit_code": self.exit_code,
                "checks": {"rucio": self.host, "scope": self.scope, "rse": self.rse,
                           "storage": self.storage, "source": self.source},
                "files": self.files, "checked": self.checked,
                "bytes_checked": self.bytes_checked, "not_done": self.not_done,
                "files_with_problems": self.files_with_problems,
                "causes": dict(sorted(self.causes.items())),
                "examples": {c: [p.to_json() for p in ps]
                             for c, ps in sorted(self.examples.items())},
                "problems_file": str(self.problems_file) if self.problems_file else None,
                "notes": list(self.notes), "rucio_requests": self.rucio_requests,
                "seconds": round(self.seconds, 3)}

    def render(self, per_cause: int = EXAMPLES_PER_CAUSE) -> str:
        """For a person: one summary line, what was checked, the first problems of each
        cause, where the full list is."""
        what = ["Rucio (replica, checksums, rule)"]
        if self.storage:
            what.append("the storage")
        if self.source != "none":
            what.append("the source files" + (" (adler32 read again)"
                                               if self.source == "checksum" else
                                               " (size and mtime)"))
        if self.ok:
            head = (f"verify {self.run_id}: all {self.checked:,} files the run uploaded or "
                    f"found present are as recorded ({_human(self.bytes_checked)})")
        else:
            counts = ", ".join(f"{n:,} {c}" for c, n in self._ordered())
            head = (f"verify {self.run_id}: {self.files_with_problems:,} of {self.checked:,} "
                    f"files have problems ({counts})")
        lines = [head, f"  checked against {', '.join(what)}: {self.host}, scope "
                       f"{self.scope}, RSE {self.rse}"]
        if self.not_done:
            lines.append(f"  not checked: {self.not_done:,} files the run did not upload "
                         "(failed or not attempted: dac-upload status)")
        lines += [f"  note: {n}" for n in self.notes]
        for cause, n in self._ordered():
            lines.append(f"{cause} ({n:,}): {CAUSES.get(cause, cause)}")
            for p in self.examples.get(cause, [])[:per_cause]:
                lines.append(f"  {p.did}: {p.detail}")
            if n > per_cause:
                lines.append(f"  ... and {n - per_cause:,} more")
        if self.problems_file is not None and not self.ok:
            lines.append(f"full list: {self.problems_file}")
        lines.append(f"took {self.seconds:.1f} s, {self.rucio_requests:,} Rucio requests")
        return "\n".join(lines)

    def _ordered(self) -> list[tuple[str, int]]:
        rank = {c: i for i, c in enumerate(CAUSES)}
        return sorted(self.causes.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))


# ---------------------------------------------------------------------------- pure checks
def _adler(value: Any) -> str | None:
    return str(value).lower().zfill(8) if value else None


def rucio_problems(entry: dict[str, Any], view: FileReplicas | None, rse: str) -> Found:
    """What Rucio's view of the file says against the summary's entry (pure)."""
    did = f"{entry['scope']}:{entry['name']}"
    if view is None:
        return [("missing_replica", f"Rucio has no file {did}")]
    if view.state is None:
        return [("missing_replica", f"Rucio has no replica of it on {rse}")]
    out: Found = []
    if view.state != "AVAILABLE":
        out.append(("not_available", f"its replica on {rse} is {view.state}"))
    if view.bytes is not None and view.bytes != entry["bytes"]:
        out.append(("size_mismatch", f"Rucio has {view.bytes} bytes, the run recorded "
                                     f"{entry['bytes']}"))
    ours, theirs = _adler(entry.get("adler32")), _adler(view.adler32)
    if ours and theirs and ours != theirs:
        out.append(("checksum_mismatch", f"Rucio has adler32 {theirs}, the run recorded "
                                         f"{ours}"))
    elif entry.get("md5") and view.md5 and str(view.md5).lower() != entry["md5"]:
        out.append(("checksum_mismatch", f"Rucio has md5 {view.md5}, the run recorded "
                                         f"{entry['md5']}"))
    return out


def archive_problems(entry: dict[str, Any], view: FileReplicas | None) -> Found:
    """A packed file: Rucio resolves it to its archive (its replica's PFN is the archive's,
    without the server's ``?xrdcl.unzip=`` part), else it is not that archive's member
    (pure)."""
    from urllib.parse import urlparse

    if view is None or not view.pfns or not entry.get("pfn"):
        return []
    ours = urlparse(entry["pfn"]).path
    if any(urlparse(p).path == ours for p in view.pfns):
        return []
    return [("not_in_archive", f"Rucio resolves it to {view.pfns[0]}, not to its archive "
                               f"{entry['archive']} ({entry['pfn']})")]


def storage_problems(entry: dict[str, Any], got: StoredObject, pfn: str) -> Found:
    """What the storage's own view of the object says against the entry (pure)."""
    if not got.exists:
        return [("storage_missing", f"nothing at {pfn}")]
    if got.size is not None and got.size != entry["bytes"]:
        return [("storage_size_mismatch", f"the storage has {got.size} bytes at {pfn}, the "
                                          f"run recorded {entry['bytes']}")]
    ours = _adler(entry.get("adler32"))
    if got.adler32 and ours and got.adler32 != ours:
        return [("storage_checksum_mismatch", f"the storage computes adler32 {got.adler32} "
                                              f"for {pfn}, the run recorded {ours}")]
    if not got.adler32 and got.md5 and entry.get("md5") and got.md5 != entry["md5"]:
        return [("storage_checksum_mismatch", f"the storage computes md5 {got.md5} for "
                                              f"{pfn}, the run recorded {entry['md5']}")]
    return []


def source_problems(entry: dict[str, Any], planned: tuple[int, float] | None,
                    mode: str) -> Found:
    """The source file against what was catalogued (``planned``: the manifest's size and
    mtime; None: the entry's bytes only) and, in mode "checksum", its adler32 read again.
    Reads the file system, nothing else."""
    path = Path(entry["path"])
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return [("source_missing", f"{path} is gone")]
    except OSError as exc:
        return [("source_unreadable", f"{path}: {exc.strerror or exc}")]
    size, mtime = planned if planned is not None else (entry["bytes"], None)
    if st.st_size != size:
        return [("source_changed", f"{path}: size {size} -> {st.st_size}")]
    if mtime is not None and st.st_mtime != mtime:
        return [("source_changed", f"{path}: modification time "
                                   f"{_when(mtime)} -> {_when(st.st_mtime)}")]
    if mode == "checksum":
        try:
            _, adler, _ = read_checksums(path, md5=False)
        except OSError as exc:
            return [("source_unreadable", f"{path}: {exc.strerror or exc}")]
        ours = _adler(entry.get("adler32"))
        if ours and adler != ours:
            return [("source_changed", f"{path}: adler32 {ours} -> {adler} (same size and "
                                       "mtime)")]
    return []


NO, EXPIRING, YES = 0, 1, 2   # how well a rule (or the best of a file's) protects it


def protection(rule: RuleInfo, rse: str, resolve: Callable[[str], list[str]],
               now: datetime, lifetime: bool) -> int:
    """YES: the rule keeps a copy on ``rse``; EXPIRING: it does until its expires_at, and
    the run asked for no lifetime (Rucio's delete-rule only sets expires_at an hour ahead,
    the rule goes then); NO: it does not cover the RSE, or has expired (pure but for
    ``resolve``)."""
    if rule.expires_at is not None and rule.expires_at <= now:
        return NO
    if not covers(rule, rse, resolve):
        return NO
    return YES if rule.expires_at is None or lifetime else EXPIRING


def covers(rule: RuleInfo, rse: str, resolve: Callable[[str], list[str]]) -> bool:
    """Whether the rule keeps a copy on ``rse`` for sure: its expression is that RSE, or
    resolves to RSEs that include it with a copy on each (pure but for ``resolve``)."""
    if rule.rse_expression == rse:
        return True
    rses = resolve(rule.rse_expression)
    return rse in rses and (len(rses) == 1 or rule.copies >= len(rses))


# ---------------------------------------------------------------------------- summary.json
FILES_LINE = ' "files": {\n'


def read_header(handle: IO[str], path: Path) -> dict[str, Any]:
    """Everything of summary.json but its files (docs/summary-schema.md: the files come one
    per line after ``FILES_LINE``); the handle is left at the first file."""
    head = []
    for line in handle:
        if line == FILES_LINE:
            break
        head.append(line)
    else:
        raise VerifyError([f"{path}: no '\"files\": {{' line: not a summary.json written by "
                           "dac-upload collect; collect the run again"])
    try:
        return dict(json.loads("".join(head).rstrip().rstrip(",") + "}"))
    except ValueError as exc:
        raise VerifyError([f"{path}: its header is not JSON ({exc}); collect the run "
                           "again"]) from None


def read_entries(handle: IO[str], path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """The summary's files after read_header, one line each: (key, entry)."""
    import orjson

    for number, line in enumerate(handle, 1):
        if line.startswith(" }"):
            return
        text = line.strip().rstrip(",")
        try:
            ((key, entry),) = orjson.loads("{" + text + "}").items()
        except (orjson.JSONDecodeError, ValueError):
            raise VerifyError([f"{path}: file line {number} is not one file's entry; "
                               "collect the run again"]) from None
        yield key, entry
    raise VerifyError([f"{path}: it ends before its files do (cut short?); collect the run "
                       "again"])


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------- the run
def verify_run(run_dir: Path, *, source: str = "none", storage: bool = True,
               progress: Callable[[int, int], None] | None = None, threads: int = 8,
               problems_file: Path | None = None,
               session: VerifySession | None = None) -> VerifyReport:
    """Check every uploaded or already-present file of a collected run against Rucio, the
    storage (``storage``) and the source files (``source``: "none", "size" or
    "checksum"); write every problem to ``problems_file`` (RUN/verify.jsonl unless given:
    an admin may verify a run directory they cannot write), atomically, replacing the
    last list; return the report. ``progress(files, bytes)`` after each chunk;
    ``threads`` storage and source checks at once; ``session`` instead of a RucioIO
    with the run's own credentials (tests).

    Raises VerifyError (not collected, no summary, unreadable run, credentials refused:
    Exit.USER) or RucioUnavailable (the Rucio server or the storage cannot be reached or
    keeps failing: Exit.SERVICE)."""
    if source not in SOURCE_MODES:
        raise ValueError(f"source must be one of {SOURCE_MODES}, not {source!r}")
    t0 = time.monotonic()
    run_dir = Path(run_dir)
    doc = _collected_run(run_dir)
    record = RunRecord(doc)
    out = Path(problems_file) if problems_file is not None else run_dir / PROBLEMS_FILE
    if not os.access(out.parent, os.W_OK):
        raise VerifyError([f"{out}: cannot write into {out.parent}; give another place for "
                           "the list of problems (--out FILE)"])
    if session is None:
        session = _open_session(run_dir, doc)
    layout = RunLayout(run_dir)
    report = VerifyReport(run_dir=run_dir, run_id=record.run_id, host=session.host,
                          scope=record.scope, rse=record.rse, source=source,
                          storage=storage, problems_file=out)
    with tempfile.TemporaryDirectory(prefix="dac-upload-verify-") as tmp:
        db = _open_db(Path(tmp) / "verify.sqlite")
        pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="verify")
        try:
            def write(out: IO[bytes]) -> None:
                checker = _Checker(session, record, layout, report, out, db, pool,
                                   source, storage)
                with open(layout.summary, encoding="utf-8") as handle:
                    read_header(handle, layout.summary)
                    for chunk in _chunks(read_entries(handle, layout.summary), CHUNK):
                        checker.chunk(chunk)
                        if progress is not None:
                            progress(report.checked, report.bytes_checked)
                checker.finish()

            atomic_write_stream(out, write)
        finally:   # stopped: the chunk's checks not yet begun are dropped, not waited for
            pool.shutdown(wait=True, cancel_futures=True)
            db.close()
    report.seconds = time.monotonic() - t0
    return report


def _collected_run(run_dir: Path) -> dict[str, Any]:
    """run.json of a run whose summary is up to date, else VerifyError with the fix."""
    from .collect import COLLECTED, collection_state

    try:
        doc = read_run_json(run_dir)
    except RunReadError as exc:
        raise VerifyError([str(exc)]) from None
    except (OSError, ValueError) as exc:
        raise VerifyError([f"{run_dir} is not a readable run directory: {exc}"]) from None
    state, why = collection_state(run_dir, doc)
    if state != COLLECTED:
        raise VerifyError([f"{run_dir}: {why}: verify reads the collected summary; run "
                           f"dac-upload collect {run_dir} (or wait for the run's collector)"])
    summary = RunLayout(run_dir).summary
    if not os.access(summary, os.R_OK):
        raise VerifyError([f"{summary}: not readable by you; ask the run's owner, or verify "
                           "as them"])
    with open(summary, encoding="utf-8") as handle:   # a damaged one named before Rucio
        read_header(handle, summary)
    return doc


def _open_session(run_dir: Path, doc: dict[str, Any]) -> VerifySession:
    """A RucioIO with the run's own credentials, as its tasks had (RUN/rucio.cfg)."""
    from .rucio import credentials
    from .rucio.client import RucioIO
    from .rucio.errors import RucioFatal, RucioUnavailable

    record = RunRecord(doc)
    if record.credentials is not None:
        problems = credentials.local_problems(
            credentials.Credentials.from_record(record.credentials))
        if problems:
            raise VerifyError(problems)
    try:
        return RucioIO.for_run(run_dir, doc)
    except RucioUnavailable:
        raise
    except RucioFatal as exc:
        raise VerifyError([str(exc)]) from None


def _open_db(path: Path) -> sqlite3.Connection:
    """The files still to be shown protected, and the files found wrong (to count each
    once): on disk, so that memory does not grow with the run."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.executescript("""
        PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA cache_size = -16000;
        CREATE TABLE pending (scope TEXT, name TEXT, relpath TEXT, task INTEGER,
                              level INTEGER, until TEXT,
                              PRIMARY KEY (scope, name)) WITHOUT ROWID;
        CREATE TABLE wrong (did TEXT PRIMARY KEY) WITHOUT ROWID;
        CREATE TABLE members (scope TEXT, name TEXT, PRIMARY KEY (scope, name)) WITHOUT ROWID;
    """)
    return db


class _Checker:
    """One verification: the chunks in summary order, then the rules of the files no
    collection protects. Rucio is asked from the calling thread only (one client, in
    order); the pool does the storage and source checks."""

    def __init__(self, session: VerifySession, record: RunRecord, layout: RunLayout,
                 report: VerifyReport, out: IO[bytes], db: sqlite3.Connection,
                 pool: ThreadPoolExecutor, source: str, storage: bool) -> None:
        self.session, self.record, self.layout, self.report = session, record, layout, report
        self.out, self.db, self.pool, self.source = out, db, pool, source
        self.rse, self.scope, self.dataset = record.rse, record.scope, record.dataset_did
        self.reader: StorageReader | None = self._reader() if storage else None
        self.parents: dict[str, tuple[int, datetime | None]] = {}   # "scope:name" -> level
        self.now = datetime.now(timezone.utc).replace(tzinfo=None)   # naive UTC, as Rucio's
        self.lifetime = bool((record.doc.get("rucio") or {}).get("lifetime"))
        self.expressions: dict[str, list[str]] = {}
        self.planned: tuple[int | None, dict[str, tuple[int, float]] | None] = (None, None)
        self.storage_errors_in_a_row = 0
        self.no_checksum = 0   # objects the storage gave a size for but no checksum
        self.lock = threading.Lock()
        self.dataset_level: tuple[int, datetime | None] = (NO, None)
        # [packing]: each archive checked once, its problems given to each of its members
        self.archives: dict[tuple[str, str], Future[Found] | None] = {}
        if self.dataset is not None:
            self._read_dataset(*self.dataset)

    def _read_dataset(self, scope: str, name: str) -> None:
        """The run's dataset, once: its files into ``members`` (one streamed request), how
        its rules and those of the containers it is in protect them."""
        did = f"{scope}:{name}"

        def read() -> int:
            self.db.execute("DELETE FROM members")
            n, batch = 0, []
            for member in self.session.collection_files(scope, name):
                batch.append(member)
                if len(batch) >= 5000:
                    self.db.executemany("INSERT OR IGNORE INTO members VALUES (?, ?)", batch)
                    n, batch = n + len(batch), []
            self.db.executemany("INSERT OR IGNORE INTO members VALUES (?, ?)", batch)
            return n + len(batch)

        if not self._ask(read, f"the files of the run's dataset {did}"):
            self.report.notes.append(f"the run's dataset {did} holds no file (or is gone)")
        self.dataset_level = _best(self._parent_level(d) for d in self._ancestors(did))

    def _ancestors(self, did: str, limit: int = 100) -> list[str]:
        """``did`` and every collection above it (at most ``limit``)."""
        seen, todo = [did], [did]
        while todo and len(seen) < limit:
            scope, _, name = todo.pop(0).partition(":")
            for parent in self._ask(lambda s=scope, n=name: self.session.parent_dids(s, n),
                                    f"the collections of {scope}:{name}"):
                if parent not in seen:
                    seen.append(parent)
                    todo.append(parent)
        return seen

    # ---------------------------------------------------------------- Rucio, with retries
    def _ask(self, call: Callable[[], Any], what: str) -> Any:
        """``call()`` (one Rucio request), tried again after RETRY_WAITS when the server
        failed or did not answer. A refusal (credentials, RSE gone) is VerifyError; a
        server that keeps failing, or fails in a way that says nothing of the run, is
        RucioUnavailable (Exit.SERVICE)."""
        from .rucio.errors import RucioFatal, RucioFileError, RucioTransient, RucioUnavailable

        for i in range(len(RETRY_WAITS) + 1):
            self.report.rucio_requests += 1
            try:
                return call()
            except (RucioUnavailable, RucioTransient) as exc:
                last = exc
                if i < len(RETRY_WAITS):
                    time.sleep(RETRY_WAITS[i])
            except RucioFatal as exc:
                raise VerifyError([f"Rucio refused {what}: {_short(exc)}"]) from None
            except RucioFileError as exc:   # a request, not one file, failed
                raise RucioUnavailable(f"Rucio failed {what}: {_short(exc)}") from None
        if isinstance(last, RucioUnavailable):
            raise RucioUnavailable(_short(last)) from None
        raise RucioUnavailable(f"the Rucio server keeps failing {what}: {_short(last)}")

    def _reader(self) -> StorageReader | None:
        """The RSE's storage, or None (noted) when it cannot be read by PFN."""
        from .rucio.errors import RucioFatal, RucioTransient, RucioUnavailable

        self.report.rucio_requests += 1
        try:
            return self.session.storage_reader(self.rse)
        except RucioUnavailable:
            raise
        except RucioFatal as exc:   # signed URLs
            self.report.notes.append(f"the storage was not checked: {exc}")
            return None
        except RucioTransient as exc:
            raise RucioUnavailable(f"reading the description of RSE {self.rse}: {exc}") from None

    # ---------------------------------------------------------------- one chunk
    def chunk(self, chunk: list[tuple[str, dict[str, Any]]]) -> None:
        """One chunk of the summary: its storage and source checks go to the pool, its
        Rucio request goes out meanwhile; then each file's problems, in summary order."""
        self.report.files += len(chunk)
        done = [e for _, e in chunk if e.get("status") in DONE_STATES]
        self.report.not_done += len(chunk) - len(done)
        self.report.checked += len(done)
        self.report.bytes_checked += sum(int(e.get("bytes") or 0) for e in done)
        local: dict[int, Future[Found]] = {}
        for i, e in enumerate(done):
            # a packed file's PFN is its archive's: the archive is checked, once (below)
            pfn = None if e.get("archive") else e.get("pfn")
            if self.source != "none" or (self.reader is not None and pfn):
                planned = self._planned(e) if self.source != "none" else None
                local[i] = self.pool.submit(self._local, e, planned, pfn)
        views: dict[tuple[str, str], FileReplicas] = {}
        by_scope: dict[str, list[str]] = {}
        for e in done:
            by_scope.setdefault(e["scope"], []).append(e["name"])
        for e in done:   # [packing]: the archives too, in the same requests
            if e.get("archive") and (e["scope"], e["archive"]) not in self.archives:
                self.archives[(e["scope"], e["archive"])] = None
                by_scope.setdefault(e["scope"], []).append(e["archive"])
        for scope, names in by_scope.items():
            for part in _chunks(names, CHUNK):
                got = self._ask(lambda s=scope, n=part: self.session.file_replicas(s, n,
                                                                                  self.rse),
                                f"the replicas of {len(part)} files")
                views.update(((scope, n), v) for n, v in got.items())
        for key, seen in list(self.archives.items()):
            if seen is None:
                self.archives[key] = self._archive_checks(key, views.get(key))
        late: dict[int, tuple[str, Future[Found]]] = {}   # no PFN recorded: Rucio's
        for i, e in enumerate(done):
            view = views.get((e["scope"], e["name"]))
            if not e.get("pfn") and self.reader is not None and view is not None and view.pfns:
                late[i] = (view.pfns[0], self.pool.submit(self._local, e, None, view.pfns[0],
                                                          False))
        for i, e in enumerate(done):
            view = views.get((e["scope"], e["name"]))
            found = rucio_problems(e, view, self.rse)
            archive = e.get("archive")
            if archive:   # the archive's checks are its members': its rule, its bytes
                found += archive_problems(e, view)
                found += self.archives[(e["scope"], archive)].result()
            protected = archive or e["name"]
            if view is not None and view.state is not None:
                level, until = NO, None
                if self.dataset is not None:
                    if self._member(e["scope"], protected):
                        level, until = self.dataset_level
                    else:
                        ds = f"{self.dataset[0]}:{self.dataset[1]}"
                        found.append(("not_in_dataset", f"not in the run's dataset {ds}"))
                if level < YES:   # its own rules are looked at once every chunk is through
                    self.db.execute("INSERT OR IGNORE INTO pending VALUES (?, ?, ?, ?, ?, ?)",
                                    (e["scope"], protected, e.get("relpath", ""),
                                     e.get("batch"), level, _iso(until)))
            pfn = e.get("pfn")
            if i in local:
                found += self._storage_streak(local.pop(i).result())
            if i in late:
                pfn, fut = late.pop(i)
                found += self._storage_streak(fut.result())
            for cause, detail in found:
                self._problem(e, cause, detail, pfn if cause.startswith("storage_") else None)

    def _archive_checks(self, key: tuple[str, str], view: FileReplicas | None
                        ) -> Future[Found]:
        """An archive's own problems, found once and given to each of its members: Rucio
        has it with an AVAILABLE replica, and the storage's size and adler32 of it are
        Rucio's."""
        scope, name = key
        rec = {"scope": scope, "name": name, "bytes": view.bytes if view else None,
               "adler32": view.adler32 if view else None, "md5": view.md5 if view else None}
        found = [(cause, f"its archive {scope}:{name}: {detail}")
                 for cause, detail in rucio_problems(rec, view, self.rse)
                 if cause not in ("size_mismatch", "checksum_mismatch")]
        done: Future[Found] = Future()
        if self.reader is None or view is None or not view.pfns:
            done.set_result(found)
            return done
        pfn = view.pfns[0]

        def stored() -> Found:
            return found + [(cause, f"its archive {scope}:{name}: {detail}")
                            for cause, detail in self._stored(rec, pfn)]
        return self.pool.submit(stored)

    def _member(self, scope: str, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM members WHERE scope = ? AND name = ?",
                               (scope, name)).fetchone() is not None

    def _local(self, entry: dict[str, Any], planned: tuple[int, float] | None,
               pfn: str | None, source: bool = True) -> Found:
        """In the pool: the source checks, then the storage's view of ``pfn``."""
        found: Found = []
        if source and self.source != "none":
            found += source_problems(entry, planned, self.source)
        if self.reader is not None and pfn:
            found += self._stored(entry, pfn)
        return found

    def _stored(self, entry: dict[str, Any], pfn: str) -> Found:
        from .rucio.errors import RucioFileError, RucioTransient

        assert self.reader is not None
        for i in range(len(RETRY_WAITS) + 1):
            try:
                got = self.reader.inspect(pfn)
                break
            except RucioTransient as exc:
                if i == len(RETRY_WAITS):
                    return [("storage_error", str(exc))]
                time.sleep(RETRY_WAITS[i])
            except RucioFileError as exc:
                return [("storage_error", str(exc))]
        if got.exists and not got.adler32 and not got.md5:
            with self.lock:
                self.no_checksum += 1
        return storage_problems(entry, got, pfn)

    def _storage_streak(self, found: Found) -> Found:
        """Count storage errors in a row: past STORAGE_ERRORS_IN_A_ROW the storage is down
        (or refuses us), and every further file would say the same."""
        from .rucio.errors import RucioUnavailable

        errors = [d for c, d in found if c == "storage_error"]
        if not errors:
            self.storage_errors_in_a_row = 0
            return found
        self.storage_errors_in_a_row += 1
        if self.storage_errors_in_a_row >= STORAGE_ERRORS_IN_A_ROW:
            raise RucioUnavailable(
                f"the storage of RSE {self.rse} failed {self.storage_errors_in_a_row} checks "
                f"in a row, the last: {errors[0]}; try later, or verify without the storage "
                "checks")
        return found

    def _planned(self, entry: dict[str, Any]) -> tuple[int, float] | None:
        """The manifest's (size, mtime) of the entry: one task's manifest held at a time
        (the summary lists files task by task)."""
        task = entry.get("batch")
        if task is None:
            return None
        if self.planned[0] != task:
            try:
                files = read_manifest(self.layout.manifest(int(task)))["files"]
                table: dict[str, tuple[int, float]] | None = {
                    f["name"]: (int(f["size"]), float(f["mtime"])) for f in files}
            except (OSError, ValueError, KeyError, TypeError) as exc:
                note = (f"the manifest of task {task} cannot be read ({exc}): its sources "
                        "were checked against the summary's sizes only")
                if note not in self.report.notes:
                    self.report.notes.append(note)
                table = None
            self.planned = (int(task), table)
        return (self.planned[1] or {}).get(entry["name"])

    def _parent_level(self, parent: str) -> tuple[int, datetime | None]:
        """How the rules of a collection protect what is in it (asked once per run)."""
        if parent not in self.parents:
            if len(self.parents) >= PARENT_CACHE:
                self.parents.clear()
            scope, _, name = parent.partition(":")
            rules = self._ask(lambda: self.session.did_rules(scope, name),
                              f"the rules of {parent}")
            self.parents[parent] = self._rules_level(rules)
        return self.parents[parent]

    def _rules_level(self, rules: Iterable[RuleInfo]) -> tuple[int, datetime | None]:
        """The best protection of these rules, and until when when it is EXPIRING."""
        return _best((protection(r, self.rse, self._resolve, self.now, self.lifetime),
                      r.expires_at) for r in rules)

    def _resolve(self, expression: str) -> list[str]:
        if expression not in self.expressions:
            self.expressions[expression] = self._ask(
                lambda: self.session.rses_of(expression), f"the RSE expression {expression!r}")
        return self.expressions[expression]

    def _problem(self, entry: dict[str, Any], cause: str, detail: str,
                 pfn: str | None = None) -> None:
        did = f"{entry['scope']}:{entry['name']}"
        self._record(Problem(cause, did, entry.get("relpath", ""), detail,
                             entry.get("batch"), pfn))

    def _record(self, p: Problem) -> None:
        self.out.write((json.dumps(p.to_json(), sort_keys=True, ensure_ascii=False)
                        + "\n").encode("utf-8"))
        self.report.causes[p.cause] = self.report.causes.get(p.cause, 0) + 1
        shown = self.report.examples.setdefault(p.cause, [])
        if len(shown) < EXAMPLES_PER_CAUSE:
            shown.append(p)
        if self.db.execute("INSERT OR IGNORE INTO wrong VALUES (?)", (p.did,)).rowcount:
            self.report.files_with_problems += 1

    # ---------------------------------------------------------------- the rules left
    def finish(self) -> None:
        """The files no collection protects: shown protected by the scope's file rules on
        the RSE (streamed listings, when there are many), else asked one by one; what is
        left has no rule."""
        if self._pending() > ONE_BY_ONE:
            since = _planned_at(self.record)
            if since is not None:
                self._drain(since)
            if since is None or self._pending() > ONE_BY_ONE_MAX:
                self._drain(None)
        rows = self.db.execute("SELECT scope, name, relpath, task, level, until FROM pending "
                               "ORDER BY task, name")
        for scope, name, relpath, task, level, until in rows.fetchmany(ONE_BY_ONE_MAX):
            level, when, rules = self._asked(scope, name, (level, _from_iso(until)))
            if level == YES:
                continue
            self._record(_rule_problem(scope, name, relpath, task, level, when, self.rse,
                                       rules))
        for scope, name, relpath, task, level, until in rows:
            self._record(_rule_problem(scope, name, relpath, task, level, _from_iso(until),
                                       self.rse, None))
        if self.no_checksum:
            self.report.notes.append(
                f"the storage gave no checksum for {self.no_checksum:,} files: only their "
                "size was compared there")

    def _asked(self, scope: str, name: str, known: tuple[int, datetime | None]
               ) -> tuple[int, datetime | None, list[RuleInfo]]:
        """One file asked on its own: its own rules, then (if they do not protect it) the
        rules of every collection it is in, with what was ``known`` (its dataset's); the
        best level, until when, and its own rules."""
        rules = self._ask(lambda: self.session.did_rules(scope, name),
                          f"the rules of {scope}:{name}")
        level, until = _best([known, self._rules_level(rules)])
        if level < YES:
            got = self._ask(lambda: self.session.file_replicas(scope, [name], self.rse,
                                                               parents=True),
                            f"the collections of {scope}:{name}")
            view = got.get(name)
            if view is not None:
                level, until = _best([(level, until),
                                      *(self._parent_level(p) for p in view.parents)])
        return level, until, rules

    def _pending(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM pending").fetchone()[0])

    def _drain(self, since: datetime | None) -> None:
        """Strike off the pending files that a file rule of the scope on the RSE protects
        (those made after ``since``, or all): ONE streamed request. A rule that only
        expires is remembered (the file is asked on its own later, or reported so)."""
        def read() -> None:
            done: list[tuple[str, str]] = []
            expiring: list[tuple[str, str, str]] = []
            for name, expires in self.session.ruled_files(self.scope, self.rse, since):
                if expires is None or (self.lifetime and expires > self.now):
                    done.append((self.scope, name))
                elif expires > self.now:
                    expiring.append((_iso(expires) or "", self.scope, name))
                if len(done) + len(expiring) >= 5000:
                    flush(done, expiring)
                    done, expiring = [], []
            flush(done, expiring)

        def flush(done: list[tuple[str, str]], expiring: list[tuple[str, str, str]]) -> None:
            self.db.executemany("DELETE FROM pending WHERE scope = ? AND name = ?", done)
            self.db.executemany("UPDATE pending SET level = 1, until = max(coalesce(until, ''),"
                                " ?) WHERE scope = ? AND name = ? AND level <= 1", expiring)

        self._ask(read, f"the file rules of {self.scope} on {self.rse}")


def _best(levels: Iterable[tuple[int, datetime | None]]) -> tuple[int, datetime | None]:
    """The best (level, until) of several: the highest level; of EXPIRING ones the latest
    expiry (the file is protected until the last one goes)."""
    level, until = NO, None
    for lv, when in levels:
        if lv > level:
            level, until = lv, when if lv == EXPIRING else None
        elif lv == level == EXPIRING and when is not None and (until is None or when > until):
            until = when
    return level, until


def _rule_problem(scope: str, name: str, relpath: str, task: int | None, level: int,
                  until: datetime | None, rse: str, rules: list[RuleInfo] | None) -> Problem:
    """The no_rule or rule_expiring problem of a file (``rules``: its own, None when it
    was not asked on its own)."""
    if level == EXPIRING:
        return Problem("rule_expiring", f"{scope}:{name}", relpath, (
            f"the rules that keep it on {rse} expire at {_iso(until) or '?'} (deleted since: "
            "Rucio removes a deleted rule an hour later; or given a lifetime)"), task)
    if rules is None:
        return Problem("no_rule", f"{scope}:{name}", relpath, (
            f"no rule with RSE expression {rse} names it, nor a collection it is in (not "
            f"asked rule by rule: more than {ONE_BY_ONE_MAX:,} such files)"), task)
    others = ", ".join(f"{r.rse_expression} ({r.copies} cop{'y' if r.copies == 1 else 'ies'}"
                       + (f", expires_at {_iso(r.expires_at)}" if r.expires_at else "")
                       + ")"
                       for r in rules[:3])
    return Problem("no_rule", f"{scope}:{name}", relpath, (
        f"no rule on it or on a collection it is in covers {rse}"
        + (f"; its rules: {others}" if others else "")), task)


def _iso(when: datetime | None) -> str | None:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ") if when is not None else None


def _from_iso(text: str | None) -> datetime | None:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ") if text else None


def _planned_at(record: RunRecord) -> datetime | None:
    """When the run was planned, less CLOCK_SKEW: every rule its tasks made is younger."""
    try:   # UTC, as the server's own times (naive)
        return datetime.strptime(str(record.doc["created_at"]), "%Y-%m-%dT%H:%M:%SZ") \
            - CLOCK_SKEW
    except (KeyError, ValueError):
        return None


def _short(exc: BaseException, limit: int = 400) -> str:
    """An error in one line of at most ``limit`` characters: the server quotes a refused
    request whole (a thousand DIDs)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 5] + " ..."


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _human(n: int) -> str:
    from .progress import human_bytes

    return human_bytes(n)
