"""``dac-upload report RUN``: one self-contained HTML page of a run, for people who would
rather look than read: the array tasks' attempts on a timeline, throughput over time, bytes
per task, the files not done by cause and the failed files.

Two halves: :func:`gather` reads the run directory into a :class:`ReportData` (pure data,
no HTML), :func:`render` lays the charts out and fills ``templates/report.html.j2``
(autoescaped: file names may hold ``<``, ``&`` and quotes). The page loads nothing (a CSP
meta tag forbids it): inline CSS and SVG, no script, so it opens from an HPC file system
with no network.

Everything comes from the run directory, never from Slurm: the report must work long after
the jobs have left sacct. The results are streamed task by task (one task's latest record
per name in memory, the throughput binned as it goes, only the first ``max_failed`` failed
files kept), so a run of millions of files costs the memory of its largest task.

Where an attempt's start and end come from, best first: the Slurm output file of its
execution (the array script's ``... task T on HOST at T0`` and ``... exit code RC at T1``
lines, read from its first and last 64 KB: the whole execution, the worker's start-up
included), the attempt's marker (``started_at``, ``finished_at``: only the latest finished
attempt has one), its own records (``finished_at`` of the first and the last), and for an
end the output file's mtime (when it was last written)."""

from __future__ import annotations

import calendar
import math
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from . import __version__
from .files import atomic_write_stream, read_json, read_manifest, read_result_records
from .progress import human_bytes
from .runrecord import (
    ALREADY_PRESENT,
    DONE_STATES,
    FAILED,
    NOT_ATTEMPTED,
    PERMANENT_CAUSES,
    UPLOADED,
    RunLayout,
    RunReadError,
    RunRecord,
    read_run_json,
)

REPORT_NAME = "report.html"   # in the run directory, unless --out says otherwise
MAX_FAILED = 500              # failed files listed on the page (all are counted)
MAX_ERROR_CHARS = 1000        # of one error on the page
MAX_LINE_PROBLEMS = 20        # per results file, as collect says them
MAX_PROBLEMS = 100            # on the page
LOG_PEEK = 64 << 10           # bytes read at each end of a Slurm output file
NO_RESULT = "no result"       # the cause of a planned file without any record (as summary.json)

# Bin widths in seconds, each a multiple of the one before: bins aligned on multiples of
# the width merge exactly when the width grows, so the records can come in any order.
BIN_LADDER = (1, 5, 10, 30, 60, 300, 600, 1800, 3600, 10800, 21600, 86400, 604800)
FINE_BINS = 4096              # bins held while reading (then the width grows)
SHOWN_BINS = 100              # bins on the page, at most (the width is a step of the ladder)

# An attempt's outcome -> what it means (the page's legend)
OUTCOMES = {
    "ok": "every file done",
    "failed": "finished, some files failed",
    "stopped": "stopped (wall time near, scancel): resubmit finishes it",
    "aborted": "aborted: Rucio or the storage kept failing, or a fatal error",
    "refused": "refused its input (run directory or manifest unusable)",
    "died": "killed before writing its marker",
    "ended": "over (a later attempt replaced its marker; no Slurm log says how it ended)",
    "open": "no end recorded: still running, or killed",
}
EXIT_OUTCOME = {0: "ok", 1: "failed", 2: "refused", 3: "aborted", 4: "stopped"}

# A task's state without the scheduler's view (status.py's, less pending/running)
TASK_STATES = {
    "done": "every file uploaded or already present",
    "failed": "its latest attempt finished; files not done",
    "unfinished": "its latest attempt wrote no marker: still running, or killed",
    "not started": "no attempt has left a trace",
}

_TS = rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)"
_LOG_START = re.compile(rb"^dac-upload: run \S+ task (\d+) on (\S+) at " + _TS + rb"\s*$",
                        re.MULTILINE)
_LOG_END = re.compile(rb"^dac-upload: run \S+ task (\d+) exit code (\d+) at " + _TS
                      + rb"\s*$", re.MULTILINE)
_SLURM_CANCEL = re.compile(rb"\*\*\* (?:JOB|STEP) \S+ ON \S+ CANCELLED AT \S+"
                           rb"(?: DUE TO ([A-Z][A-Z ]*?))? \*\*\*")
_SLURM_OOM = re.compile(rb"oom[_-]kill event", re.IGNORECASE)
_LOG_NAME = re.compile(r"job(\d+)\.index(\d+)\.out")


# ---------------------------------------------------------------- the data
@dataclass(frozen=True)
class LogRun:
    """One execution of an array task as its Slurm output file says it."""

    task: int
    path: str                  # relative to the run directory
    array_job: str             # the array's job id (%A); the execution is array_job_index
    index: int                 # the local index (%a)
    host: str | None
    start: float | None        # epoch seconds (UTC)
    end: float | None          # the end line's time; None without one
    exit_code: int | None
    last_seen: float | None    # the file's mtime: when it was last written
    killed: str | None         # Slurm's own word at the end ("cancelled: TIME LIMIT", ...)

    @property
    def slurm_job(self) -> str:
        return f"{self.array_job}_{self.index}"


@dataclass(frozen=True)
class Attempt:
    """One attempt of a task, on the timeline. ``attempt`` None: a Slurm execution that left
    no record and no marker (killed at once, or refused before reading its input)."""

    task: int
    attempt: int | None
    start: float | None
    end: float | None
    start_from: str            # "marker", "Slurm log", "first record" or ""
    end_from: str              # "marker", "Slurm log", "last record", "log last written"
    outcome: str               # a key of OUTCOMES
    host: str | None
    slurm_job: str | None
    exit_code: int | None
    records: int               # records this attempt wrote
    bytes_uploaded: int        # by its "uploaded" records
    note: str | None           # why it aborted or stopped, or what Slurm said
    log: str | None            # its Slurm output file, relative to the run directory


@dataclass(frozen=True)
class TaskRow:
    """One array task: what its files came to (every attempt merged: the latest success
    counts, else the latest record) and its attempts."""

    task: int
    state: str                 # a key of TASK_STATES
    files: int | None          # planned (None: neither run.json nor the manifest says)
    bytes: int | None
    uploaded: int
    already_present: int
    failed: int
    not_attempted: int         # with a record, plus the files without any
    bytes_uploaded: int
    bytes_present: int
    attempts: tuple[Attempt, ...]

    @property
    def done(self) -> int:
        return self.uploaded + self.already_present


@dataclass(frozen=True)
class CauseCount:
    """The files not done for one cause."""

    cause: str
    status: str                # failed or not_attempted
    files: int
    bytes: int
    example: str | None        # the first such file's error
    permanent: bool            # only a person can fix it


@dataclass(frozen=True)
class FailedFile:
    task: int
    name: str
    relpath: str | None
    cause: str
    error: str | None
    attempt: int | None


@dataclass(frozen=True)
class Throughput:
    """Records binned by their finished_at: per bin of ``width`` seconds from ``start``,
    bytes uploaded, files done (uploaded or already present) and files failed. Every
    attempt's records count (each is something that happened)."""

    width: int
    start: float
    bytes: tuple[int, ...]
    done: tuple[int, ...]
    failed: tuple[int, ...]

    @property
    def end(self) -> float:
        return self.start + self.width * len(self.bytes)


@dataclass(frozen=True)
class ReportData:
    """Everything the page shows, read from the run directory (no HTML here)."""

    run_dir: str
    run_id: str
    job: str | None
    job_file: str | None
    scope: str | None
    rse: str | None
    account: str | None
    dataset: str | None
    source_root: str | None
    created_at: str | None
    mode: str | None
    run_state: str | None               # run.json's: planned, submitted
    summary_state: str                  # collect.collection_state: collected, stale, ...
    summary_why: str
    submissions: tuple[tuple[int, float | None, str], ...]  # (attempt, submitted_at, tasks)
    files: int | None                   # planned
    bytes: int | None
    counts: dict[str, int]              # uploaded, already_present, failed, not_attempted
    bytes_uploaded: int
    bytes_present: int
    tasks: tuple[TaskRow, ...]
    causes: tuple[CauseCount, ...]
    failed_files: tuple[FailedFile, ...]   # the first max_failed, in task order
    failed_total: int
    throughput: Throughput | None       # None: no record has a time yet
    first_record: float | None
    last_record: float | None
    problems: tuple[str, ...]
    problems_total: int
    generated_at: float
    version: str = __version__

    @property
    def done(self) -> int:
        return self.counts[UPLOADED] + self.counts[ALREADY_PRESENT]

    @property
    def not_done(self) -> int:
        return self.counts[FAILED] + self.counts[NOT_ATTEMPTED]

    @property
    def complete(self) -> bool:
        return self.files is not None and self.done == self.files

    @property
    def span(self) -> tuple[float, float] | None:
        """The time the run's attempts (and submissions) cover, or None before any."""
        times = [t for row in self.tasks for a in row.attempts for t in (a.start, a.end)
                 if t is not None]
        times += [t for _, t, _ in self.submissions if t is not None]
        if self.throughput is not None:
            times += [self.throughput.start, self.throughput.end]
        return (min(times), max(times)) if times else None


# ---------------------------------------------------------------- reading
class _Bins:
    """Binning as the records come, in any order: ``FINE_BINS`` bins at most, the width
    growing along BIN_LADDER when the records span more (merged exactly)."""

    def __init__(self) -> None:
        self.step = 0                               # index into BIN_LADDER
        self.bins: dict[int, list[int]] = {}        # bin -> [bytes, done, failed]
        self.lo = self.hi = 0

    def add(self, t: float, nbytes: int, done: int, failed: int) -> None:
        i = int(t // BIN_LADDER[self.step])
        if not self.bins:
            self.lo = self.hi = i
        elif i < self.lo or i > self.hi:
            self.lo, self.hi = min(self.lo, i), max(self.hi, i)
            while self.hi - self.lo >= FINE_BINS and self.step + 1 < len(BIN_LADDER):
                self._coarsen(self.step + 1)
            i = int(t // BIN_LADDER[self.step])
        b = self.bins.get(i)
        if b is None:
            self.bins[i] = [nbytes, done, failed]
        else:
            b[0] += nbytes
            b[1] += done
            b[2] += failed

    def _coarsen(self, step: int) -> None:
        k = BIN_LADDER[step] // BIN_LADDER[self.step]
        merged: dict[int, list[int]] = {}
        for i, (nbytes, done, failed) in self.bins.items():
            b = merged.setdefault(i // k, [0, 0, 0])
            b[0] += nbytes
            b[1] += done
            b[2] += failed
        self.bins, self.step, self.lo, self.hi = merged, step, self.lo // k, self.hi // k

    def result(self, shown: int = SHOWN_BINS) -> Throughput | None:
        if not self.bins:
            return None
        while self.hi - self.lo >= shown and self.step + 1 < len(BIN_LADDER):
            self._coarsen(self.step + 1)
        rows = [self.bins.get(i, (0, 0, 0)) for i in range(self.lo, self.hi + 1)]
        width = BIN_LADDER[self.step]
        return Throughput(width=width, start=float(self.lo * width),
                          bytes=tuple(r[0] for r in rows), done=tuple(r[1] for r in rows),
                          failed=tuple(r[2] for r in rows))


class _Clock:
    """The records' UTC times ("2026-12-02T14:26:55Z") as epoch seconds; a record of a
    chunk shares its second with hundreds of others, so parses are cached."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}

    def __call__(self, ts: Any) -> float | None:
        if type(ts) is not str:
            return None
        t = self._seen.get(ts)
        if t is None:
            try:
                t = float(calendar.timegm(time.strptime(ts, "%Y-%m-%dT%H:%M:%SZ")))
            except ValueError:
                return None
            if len(self._seen) > 100_000:
                self._seen.clear()
            self._seen[ts] = t
        return t


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def read_log(run_dir: Path, path: Path, clock: _Clock) -> LogRun | None:
    """What one Slurm output file says of its execution (its first and last LOG_PEEK
    bytes: the array script's start and end lines, Slurm's own last words), or None for a
    file that is not an array task's."""
    named = _LOG_NAME.fullmatch(path.name)
    if named is None:
        return None
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(0)
            head = handle.read(LOG_PEEK)
            if size > LOG_PEEK:
                handle.seek(max(LOG_PEEK, size - LOG_PEEK))
                tail = handle.read(LOG_PEEK)
            else:
                tail = head
            mtime = path.stat().st_mtime
    except OSError:
        return None
    start = _LOG_START.search(head)
    ends = list(_LOG_END.finditer(tail))
    end = ends[-1] if ends else None
    if start is None and end is None:
        return None
    task = int((start or end).group(1))   # type: ignore[union-attr]
    cancel = _SLURM_CANCEL.search(tail)
    killed = None
    if cancel is not None:
        killed = "Slurm cancelled it" + (f": {cancel.group(1).decode().lower()}"
                                         if cancel.group(1) else "")
    elif _SLURM_OOM.search(tail):
        killed = "Slurm: out of memory"
    return LogRun(task=task, path=str(path.relative_to(run_dir)), array_job=named.group(1),
                  index=int(named.group(2)),
                  host=start.group(2).decode(errors="replace") if start else None,
                  start=clock(start.group(3).decode()) if start else None,
                  end=clock(end.group(3).decode()) if end else None,
                  exit_code=int(end.group(2)) if end else None, last_seen=mtime,
                  killed=killed)


def read_logs(run_dir: Path, clock: _Clock) -> dict[int, list[LogRun]]:
    """Task -> its executions' Slurm output files, oldest first."""
    out: dict[int, list[LogRun]] = {}
    logs = RunLayout(run_dir).logs
    try:
        paths = sorted(logs.iterdir())
    except OSError:
        return out
    for path in paths:
        run = read_log(run_dir, path, clock)
        if run is not None:
            out.setdefault(run.task, []).append(run)
    for runs in out.values():
        runs.sort(key=lambda r: (r.start if r.start is not None else math.inf, r.path))
    return out


@dataclass
class _AttemptStats:
    first: float | None = None
    last: float | None = None
    records: int = 0
    bytes_uploaded: int = 0

    def add(self, t: float | None, nbytes: int) -> None:
        self.records += 1
        self.bytes_uploaded += nbytes
        if t is not None:
            self.first = t if self.first is None or t < self.first else self.first
            self.last = t if self.last is None or t > self.last else self.last


def attempts_of(task: int, stats: dict[int, _AttemptStats], marker: dict[str, Any] | None,
                logs: list[LogRun], clock: _Clock) -> list[Attempt]:
    """A task's attempts, from its records (per attempt), its marker (the latest attempt
    that finished) and its Slurm output files (each execution). Each attempt takes the
    execution that started last before its first trace (two seconds' grace: all these
    times are to the second); an execution no attempt takes is shown on its own."""
    mark_attempt = _int((marker or {}).get("attempt"))
    numbers = sorted(set(stats) | ({mark_attempt} if mark_attempt is not None else set()))
    latest = max(numbers, default=None)
    free = list(logs)
    out: list[Attempt] = []
    for n in numbers:
        st = stats.get(n, _AttemptStats())
        m = marker if n == mark_attempt else None
        start = clock(m.get("started_at")) if m else None
        end = clock(m.get("finished_at")) if m else None
        anchor = start if start is not None else st.first
        log = None
        if anchor is not None:
            before = [r for r in free if r.start is not None and r.start <= anchor + 2]
            log = before[-1] if before else None
        elif len(free) == 1 and n == latest:   # no time of its own: the only execution left
            log = free[0]
        if log is not None:
            free.remove(log)
        # the execution's own times (the batch script's lines) hold the worker's start-up
        # and end too; then the marker's (the worker's), then the records'
        start_from, end_from = ("marker" if start is not None else "",
                                "marker" if end is not None else "")
        if log is not None and log.start is not None:
            start, start_from = log.start, "Slurm log"
        if start is None and st.first is not None:
            start, start_from = st.first, "first record"
        if log is not None and log.end is not None:
            end, end_from = log.end, "Slurm log"
        if end is None:
            seen = [t for t in (st.last, log.last_seen if log else None) if t is not None]
            if seen:
                end = max(seen)
                end_from = ("log last written" if log and log.last_seen == end
                            else "last record")
        if m is not None:
            code = _int(m.get("exit_code"))
            outcome = EXIT_OUTCOME.get(code, "failed") if code is not None else "failed"
            note = m.get("aborted") or m.get("stopped")
        else:   # no marker of its own: replaced by a later attempt's, or never written
            code = log.exit_code if log else None
            replaced = mark_attempt is not None and n < mark_attempt
            if code is not None:   # the batch script's end line: the worker's exit code
                outcome = EXIT_OUTCOME.get(code, "died")
                note = (f"the batch script ended with exit code {code}" if outcome == "died"
                        else "outcome from its Slurm log's exit code (" + (
                            "a later attempt replaced its marker)" if replaced
                            else "it wrote no marker)"))
            elif log is not None:   # its batch script never said it ended
                outcome = "died" if log.killed or n != latest else "open"
                note = log.killed
            else:
                outcome, note = ("ended" if n != latest else "open"), None
        out.append(Attempt(task=task, attempt=n, start=start, end=end, start_from=start_from,
                           end_from=end_from, outcome=outcome,
                           host=(m or {}).get("host") or (log.host if log else None),
                           slurm_job=log.slurm_job if log else (
                               str(m["slurm_job_id"]) if m and m.get("slurm_job_id")
                               else None),
                           exit_code=code, records=st.records,
                           bytes_uploaded=st.bytes_uploaded,
                           note=str(note) if note else None,
                           log=log.path if log else None))
    last_log = logs[-1] if logs else None
    for log in free:   # executions that left no record and no marker of their own
        code = log.exit_code
        outcome = (EXIT_OUTCOME.get(code, "died") if code is not None else
                   "open" if log is last_log and not log.killed else "died")
        out.append(Attempt(
            task=task, attempt=None, start=log.start, end=log.end or log.last_seen,
            start_from="Slurm log" if log.start is not None else "",
            end_from="Slurm log" if log.end is not None else "log last written",
            outcome=outcome, host=log.host, slurm_job=log.slurm_job, exit_code=code,
            records=0, bytes_uploaded=0, log=log.path,
            note=log.killed or ("no record, and no marker of its own: see its Slurm log"
                                if code is not None else None)))
    out.sort(key=lambda a: (a.start if a.start is not None else math.inf,
                            a.attempt if a.attempt is not None else 0))
    return out


class _Gatherer:
    """One pass over the run's tasks; what is kept is the run's totals, one small row per
    task, the bins and the first failed files."""

    def __init__(self, run_dir: Path, run: dict[str, Any], max_failed: int) -> None:
        self.run_dir, self.run, self.max_failed = run_dir, run, max_failed
        self.layout = RunLayout(run_dir)
        self.clock = _Clock()
        self.bins = _Bins()
        self.counts = Counter({UPLOADED: 0, ALREADY_PRESENT: 0, FAILED: 0, NOT_ATTEMPTED: 0})
        self.bytes_uploaded = self.bytes_present = 0
        self.causes: dict[tuple[str, str], list[Any]] = {}   # -> [files, bytes, example]
        self.failed: list[FailedFile] = []
        self.failed_total = 0
        self.problems: list[str] = []
        self.problems_total = 0
        self.first: float | None = None
        self.last: float | None = None

    def problem(self, lines: list[str]) -> None:
        self.problems_total += len(lines)
        self.problems.extend(lines[:max(0, MAX_PROBLEMS - len(self.problems))])

    def planned(self, task: int) -> tuple[int | None, int | None]:
        """(files, bytes) planned for the task: run.json's, else its manifest's."""
        plan = self.run.get("plan") or {}
        files, nbytes = plan.get("task_files"), plan.get("task_bytes")
        if isinstance(files, list) and isinstance(nbytes, list) and task < min(
                len(files), len(nbytes)):
            return _int(files[task]), _int(nbytes[task])
        try:
            entries = read_manifest(self.layout.manifest(task))["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return None, None
        return len(entries), sum(int(e.get("size") or 0) for e in entries)

    def marker(self, task: int) -> dict[str, Any] | None:
        path = self.layout.done_marker(task)
        try:
            marker = read_json(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.problem([f"results/{path.name}: cannot read it ({exc.strerror}; ignored)"])
            return None
        except ValueError:
            self.problem([f"results/{path.name}: not valid JSON (ignored)"])
            return None
        if not isinstance(marker, dict):
            self.problem([f"results/{path.name}: not a task marker (ignored)"])
            return None
        return marker

    def records(self, task: int) -> Iterator[dict[str, Any]]:
        path = self.layout.result(task)
        found: list[str] = []
        try:
            yield from read_result_records(path, found, f"results/{path.name}")
        except FileNotFoundError:
            return
        except OSError as exc:
            self.problem([f"results/{path.name}: cannot read it ({exc.strerror}); its "
                          "records are not counted"])
        finally:
            if found:   # said as collect says them; every bad line counted
                lines = found[:MAX_LINE_PROBLEMS]
                if len(found) > MAX_LINE_PROBLEMS:
                    lines.append(f"results/{path.name}: ... and "
                                 f"{len(found) - MAX_LINE_PROBLEMS} more such lines")
                self.problem(lines)
                self.problems_total += len(found) - len(lines)

    def task(self, task: int, logs: list[LogRun]) -> TaskRow:
        files, nbytes = self.planned(task)
        marker = self.marker(task)
        stats: dict[int, _AttemptStats] = {}
        # name -> (status, bytes, cause, error, relpath, attempt): the record that counts
        latest: dict[str, tuple[Any, ...]] = {}
        clock, bins = self.clock, self.bins
        for rec in self.records(task):
            status = rec["status"]
            size = rec.get("bytes")
            size = size if type(size) is int else 0
            t = clock(rec.get("finished_at"))
            attempt = _int(rec.get("attempt")) or 0
            st = stats.get(attempt)
            if st is None:
                st = stats[attempt] = _AttemptStats()
            up = size if status == UPLOADED else 0
            st.add(t, up)
            if t is not None:
                bins.add(t, up, status in DONE_STATES, status == FAILED)
                self.first = t if self.first is None or t < self.first else self.first
                self.last = t if self.last is None or t > self.last else self.last
            prev = latest.get(rec["name"])
            if prev is None or status in DONE_STATES or prev[0] not in DONE_STATES:
                latest[rec["name"]] = (status, size) if status in DONE_STATES else (
                    status, size, rec.get("cause"), rec.get("error"), rec.get("relpath"),
                    attempt or None)
        c = Counter({UPLOADED: 0, ALREADY_PRESENT: 0, FAILED: 0, NOT_ATTEMPTED: 0})
        up_bytes = present_bytes = seen = 0
        for name, final in latest.items():
            seen += final[1]
            status = final[0] if final[0] in c else FAILED   # an unknown status is not done
            c[status] += 1
            if status == UPLOADED:
                up_bytes += final[1]
            elif status == ALREADY_PRESENT:
                present_bytes += final[1]
            else:
                self._not_done(task, name, status, *final[1:])
        del latest
        no_result = max(0, files - sum(c.values())) if files is not None else 0
        if no_result:   # their sizes are in the manifest, not read: what the rest leaves
            c[NOT_ATTEMPTED] += no_result
            self._cause(NOT_ATTEMPTED, NO_RESULT, no_result, max(0, (nbytes or 0) - seen),
                        "the task wrote no record of these files")
        self.counts.update(c)
        self.bytes_uploaded += up_bytes
        self.bytes_present += present_bytes
        attempts = attempts_of(task, stats, marker, logs, self.clock)
        complete = files is not None and c[UPLOADED] + c[ALREADY_PRESENT] == files
        latest_attempt = max(stats, default=0)
        finished = marker is not None and (_int(marker.get("attempt")) or 0) >= latest_attempt
        state = ("done" if complete else
                 "failed" if finished else
                 "unfinished" if attempts else "not started")
        return TaskRow(task=task, state=state, files=files, bytes=nbytes,
                       uploaded=c[UPLOADED], already_present=c[ALREADY_PRESENT],
                       failed=c[FAILED], not_attempted=c[NOT_ATTEMPTED],
                       bytes_uploaded=up_bytes, bytes_present=present_bytes,
                       attempts=tuple(attempts))

    def _cause(self, status: str, cause: str, files: int, nbytes: int,
               example: str | None) -> None:
        entry = self.causes.get((status, cause))
        if entry is None:
            self.causes[(status, cause)] = [files, nbytes, example]
        else:
            entry[0] += files
            entry[1] += nbytes
            entry[2] = entry[2] or example

    def _not_done(self, task: int, name: str, status: str, size: int, cause: Any,
                  error: Any, relpath: Any, attempt: int | None) -> None:
        cause = str(cause) if cause else status
        error = str(error) if error is not None else None
        if error and len(error) > MAX_ERROR_CHARS:
            error = error[:MAX_ERROR_CHARS] + " …"
        self._cause(status, cause, 1, size, error)
        if status != FAILED:
            return
        self.failed_total += 1
        if len(self.failed) < self.max_failed:
            self.failed.append(FailedFile(task=task, name=name, cause=cause, error=error,
                                          relpath=str(relpath) if relpath else None,
                                          attempt=attempt))


def _summary_state(run_dir: Path, run: dict[str, Any]) -> tuple[str, str]:
    from .collect import COLLECTED, collection_state

    try:
        state, why = collection_state(run_dir, run)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return "unknown", f"cannot tell ({exc})"
    if state == COLLECTED:
        try:
            done = read_json(RunLayout(run_dir).collected)
            why += "; the run is complete" if done.get("complete") else \
                "; the run is not complete"
        except (OSError, ValueError, AttributeError):
            pass
    return state, why


def gather(run_dir: Path, max_failed: int = MAX_FAILED) -> ReportData:
    """The run directory read into a ReportData, task by task. RunReadError when run.json
    is missing or damaged; whatever else cannot be read (a results file, a marker, a
    damaged line) is said in ``problems`` and the rest is shown."""
    run_dir = Path(run_dir)
    run = read_run_json(run_dir)
    record = RunRecord(run)
    try:
        tasks = record.tasks
    except (KeyError, TypeError, ValueError):
        raise RunReadError(f"{RunLayout(run_dir).run_json}: damaged (plan.tasks is not a "
                           "number); restore it from a backup, or plan a new run") from None
    g = _Gatherer(run_dir, run, max_failed)
    logs = read_logs(run_dir, g.clock)
    rows = [g.task(t, logs.get(t, [])) for t in range(tasks)]
    strays = sorted(t for t in logs if not 0 <= t < tasks)
    if strays:
        g.problem([f"logs: Slurm output of task {t}, which the run does not have (ignored)"
                   for t in strays])
    rucio, job, cat, source, upload = (_section(run, key) for key in (
        "rucio", "job", "catalogue", "source", "upload"))
    planned = [r.files for r in rows]
    files = _int(cat.get("files"))
    if files is None and None not in planned:
        files = sum(planned)   # type: ignore[arg-type]
    nbytes = _int(cat.get("bytes"))
    if nbytes is None and all(r.bytes is not None for r in rows):
        nbytes = sum(r.bytes or 0 for r in rows)
    dataset = rucio.get("dataset_did")
    submissions = tuple(
        (_int(s.get("attempt")) or i + 1, g.clock(s.get("submitted_at")),
         str(s.get("task_ids") or ""))
        for i, s in enumerate(record.submissions) if isinstance(s, dict))
    state, why = _summary_state(run_dir, run)
    causes = tuple(
        CauseCount(cause=cause, status=status, files=v[0], bytes=v[1], example=v[2],
                   permanent=cause in PERMANENT_CAUSES)
        for (status, cause), v in sorted(g.causes.items(), key=lambda kv: (-kv[1][0], kv[0])))
    return ReportData(
        run_dir=str(run_dir), run_id=record.run_id, job=job.get("name"),
        job_file=job.get("file"), scope=rucio.get("scope"), rse=rucio.get("rse"),
        account=rucio.get("account"),
        dataset=":".join(map(str, dataset)) if isinstance(dataset, list) else
        rucio.get("dataset"),
        source_root=source.get("root"), created_at=record.created_at,
        mode=upload.get("mode"), run_state=run.get("state"),
        summary_state=state, summary_why=why, submissions=submissions, files=files,
        bytes=nbytes, counts=dict(g.counts), bytes_uploaded=g.bytes_uploaded,
        bytes_present=g.bytes_present, tasks=tuple(rows), causes=causes,
        failed_files=tuple(g.failed), failed_total=g.failed_total,
        throughput=g.bins.result(), first_record=g.first, last_record=g.last,
        problems=tuple(g.problems), problems_total=g.problems_total,
        generated_at=time.time())


def _section(run: dict[str, Any], key: str) -> dict[str, Any]:
    """A section of run.json, or {} when a damaged one is not an object: the page shows
    what there is."""
    value = run.get(key)
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------- drawing
CHART_W = 1000     # the SVGs' user units; they scale to the page's width
PLOT_X = 92        # left margin (axis labels)
PLOT_R = 16


def nice_scale(value: float, most: int = 5) -> tuple[float, int]:
    """(step, steps) of a value axis from 0 to at least ``value``: the step 1, 2, 2.5 or 5
    times a power of ten, the fewest of them (at most ``most``) that reach it."""
    if value <= 0:
        return 1.0, 4
    power = 10.0 ** math.floor(math.log10(value / most))
    for m in (1, 2, 2.5, 5, 10, 20):
        steps = math.ceil(value / (m * power) - 1e-9)
        if steps <= most:
            return m * power, max(steps, 1)
    return 20 * power, most   # pragma: no cover


TICK_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600,
              43200, 86400, 172800, 604800, 2592000)


def time_ticks(t0: float, t1: float, most: int = 8) -> list[tuple[float, str]]:
    """Round UTC times between t0 and t1 (at most ``most``), labelled to the precision the
    step needs."""
    span = max(t1 - t0, 1.0)
    step = next((s for s in TICK_STEPS if span / s <= most), TICK_STEPS[-1])
    fmt = ("%H:%M:%S" if step < 60 else "%H:%M" if span < 86400 else
           "%m-%d %H:%M" if step < 86400 else "%Y-%m-%d")
    first = math.ceil(t0 / step) * step
    return [(t, time.strftime(fmt, time.gmtime(t)))
            for t in (first + i * step for i in range(int((t1 - first) // step) + 1))]


def utc(t: float | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return time.strftime(fmt, time.gmtime(t)) if t is not None else "–"


def duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "–"
    s = round(seconds)
    if s < 1:
        return "< 1 s"
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600:02d} h"


def rate(nbytes: float, seconds: float) -> str:
    return f"{human_bytes(nbytes / seconds)}/s" if seconds > 0 else "–"


@dataclass
class _Axis:
    t0: float
    t1: float
    x0: float = PLOT_X
    x1: float = CHART_W - PLOT_R

    def x(self, t: float) -> float:
        return round(self.x0 + (t - self.t0) / (self.t1 - self.t0) * (self.x1 - self.x0), 1)


def _ticks(axis: _Axis) -> list[dict[str, Any]]:
    """The time axis' labels; one at an end of the axis is anchored inwards."""
    out = []
    for t, label in time_ticks(axis.t0, axis.t1):
        x = axis.x(t)
        anchor = ("start" if x < axis.x0 + 25 else "end" if x > axis.x1 - 25 else "middle")
        out.append({"x": x, "label": label, "anchor": anchor})
    return out


def _attempt_title(a: Attempt) -> str:
    what = f"task {a.task}, " + (
        "an execution without records" if a.attempt is None else
        "attempt ? (records without an attempt number)" if a.attempt == 0 else
        f"attempt {a.attempt}")
    lines = [f"{what}: {OUTCOMES[a.outcome]}",
             f"start {utc(a.start)} UTC" + (f" ({a.start_from})" if a.start_from else ""),
             f"end {utc(a.end)} UTC" + (f" ({a.end_from})" if a.end_from else ""),
             f"{a.records:,} records, {human_bytes(a.bytes_uploaded)} uploaded"]
    if a.start is not None and a.end is not None:
        lines[0] += f", {duration(a.end - a.start)}"
    if a.host or a.slurm_job:
        lines.append(f"host {a.host or '?'}, Slurm job {a.slurm_job or '?'}"
                     + (f", exit code {a.exit_code}" if a.exit_code is not None else ""))
    if a.note:
        lines.append(a.note)
    return "\n".join(lines)


def timeline(data: ReportData) -> dict[str, Any] | None:
    """The tasks' attempts as bars on one time axis, a row per task; None before any."""
    span = data.span
    if span is None:
        return None
    t0, t1 = span[0], span[1] + 1
    pad = max((t1 - t0) * 0.01, 1.0)
    axis = _Axis(t0 - pad, t1 + pad)
    n = len(data.tasks)
    row = 22 if n <= 40 else max(2.0, min(14.0, 640 / n))
    top = 40   # two rows of submission labels above the tasks
    height = top + row * n + 28
    bars, rows, labels = [], [], []
    every = 1 if row >= 11 else next(k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000,
                                                  2000, 5000, 10**9) if k * row >= 12)
    for i, task in enumerate(data.tasks):
        y = top + i * row
        if row >= 6:
            rows.append({"y": round(y, 1), "h": round(row, 1), "odd": i % 2 == 1})
        if task.task % every == 0:
            labels.append({"y": round(y + row / 2, 1), "text": f"task {task.task}"})
        for a in task.attempts:
            start = a.start if a.start is not None else a.end
            end = a.end if a.end is not None else a.start
            if start is None or end is None:
                continue
            # the times are to the second (truncated): the attempt ran within [start, end + 1)
            x0, x1 = axis.x(start), axis.x(end + 1)
            inset = 3 if row >= 10 else 0.5 if row >= 4 else 0
            bars.append({"x": x0, "w": round(max(x1 - x0, 2.0), 1),
                         "y": round(y + inset, 1), "h": round(max(row - 2 * inset, 1), 1),
                         "outcome": a.outcome,
                         "label": (f"a{a.attempt}" if a.attempt else "?")
                         if row >= 16 and x1 - x0 >= 26 else "",
                         "title": _attempt_title(a)})
    marks: list[dict[str, Any]] = []
    for k, t, ids in data.submissions:
        if t is None:
            continue
        x = axis.x(t)
        # a label close to the one before goes on the other row
        crowded = bool(marks) and x - marks[-1]["x"] < 80 and marks[-1]["y"] == top - 22
        marks.append({"x": x, "y": top - 10 if crowded else top - 22,
                      "label": "submit" if k == 1 else f"resubmit {k}",
                      "title": f"submission {k} at {utc(t)} UTC (tasks {ids or '-'})"})
    ticks = _ticks(axis)
    return {"width": CHART_W, "height": round(height, 1), "top": top,
            "bottom": round(top + row * n, 1), "x0": PLOT_X, "x1": CHART_W - PLOT_R,
            "bars": bars, "rows": rows, "labels": labels, "marks": marks, "ticks": ticks,
            "axis": axis, "outcomes": sorted({b["outcome"] for b in bars},
                                             key=list(OUTCOMES).index)}


def _y_ticks(top: float, bottom: float, step: float, steps: int,
             fmt: Any) -> list[dict[str, Any]]:
    return [{"y": round(bottom - (bottom - top) * k / steps, 1), "label": fmt(step * k)}
            for k in range(steps + 1)]


def short_bytes(n: float) -> str:
    """human_bytes without a trailing ".0" (axis labels: "1 MB", "2.5 MB")."""
    text = human_bytes(n)
    return text.replace(".0 ", " ")


def throughput_charts(data: ReportData, axis: _Axis | None) -> list[dict[str, Any]]:
    """Bytes/s and files/s per bin, on the timeline's time axis."""
    tp = data.throughput
    if tp is None or axis is None:
        return []
    out = []
    for key, unit, series in (
            ("bytes", "bytes uploaded per second", ((tp.bytes, "up"),)),
            ("files", "files done per second (failed on top)",
             ((tp.done, "done"), (tp.failed, "failed")))):
        totals = [sum(s[0][i] for s in series) / tp.width for i in range(len(tp.bytes))]
        step, steps = nice_scale(max(totals, default=0))
        vmax = step * steps
        top, bottom = 12.0, 142.0
        fmt = ((lambda v: f"{short_bytes(v)}/s") if key == "bytes" else
               (lambda v: f"{v:,.4g}/s"))
        bars = []
        for i in range(len(tp.bytes)):
            b0 = tp.start + i * tp.width
            x0, x1 = axis.x(b0), axis.x(b0 + tp.width)
            base = 0.0
            for values, cls in series:
                v = values[i] / tp.width
                if v <= 0:
                    continue
                h = (bottom - top) * v / vmax
                y = bottom - (bottom - top) * base / vmax - h
                base += v
                what = (f"{human_bytes(values[i])} uploaded" if key == "bytes"
                        else f"{values[i]:,} files {cls}")
                bars.append({"x": x0, "w": round(max(x1 - x0 - 0.6, 0.8), 1),
                             "y": round(y, 1), "h": round(max(h, 0.8), 1), "cls": cls,
                             "title": f"{utc(b0, '%H:%M:%S')}–{utc(b0 + tp.width, '%H:%M:%S')}"
                                      f" UTC: {what} ({fmt(v)})"})
        out.append({"key": key, "title": unit, "width": CHART_W, "height": 168,
                    "top": top, "bottom": bottom, "x0": PLOT_X, "x1": CHART_W - PLOT_R,
                    "bars": bars, "yticks": _y_ticks(top, bottom, step, steps, fmt),
                    "ticks": _ticks(axis)})
    return out


def bytes_chart(data: ReportData) -> dict[str, Any] | None:
    """A column per task (per group of tasks when there are more than the plot is wide):
    uploaded, already present, and not done of what was planned."""
    if not data.tasks:
        return None
    plot_w = CHART_W - PLOT_X - PLOT_R
    group = max(1, math.ceil(len(data.tasks) / (plot_w / 2)))
    cols = []
    for i in range(0, len(data.tasks), group):
        part = data.tasks[i:i + group]
        up = sum(t.bytes_uploaded for t in part)
        present = sum(t.bytes_present for t in part)
        planned = sum(t.bytes or 0 for t in part)
        cols.append((part[0].task, part[-1].task, up, present, max(planned - up - present, 0)))
    step_v, steps = nice_scale(max((c[2] + c[3] + c[4] for c in cols), default=0))
    vmax = step_v * steps
    top, bottom = 12.0, 172.0
    step = plot_w / len(cols)
    gap = min(step * 0.2, 6) if step >= 4 else 0
    bars, labels = [], []
    every = next(k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 10**9)
                 if k * step >= 34)
    for j, (a, b, up, present, left) in enumerate(cols):
        x = round(PLOT_X + j * step + gap / 2, 1)
        w = round(max(step - gap, 0.8), 1)
        base = 0.0
        name = f"task {a}" if a == b else f"tasks {a}–{b}"
        for v, cls, what in ((up, "up", "uploaded"), (present, "present", "already present"),
                             (left, "left", "not done")):
            if v <= 0:
                continue
            h = (bottom - top) * v / vmax
            y = bottom - (bottom - top) * base / vmax - h
            base += v
            bars.append({"x": x, "w": w, "y": round(y, 1), "h": round(max(h, 0.8), 1),
                         "cls": cls, "title": f"{name}: {human_bytes(v)} {what}"})
        if j % every == 0:
            labels.append({"x": round(x + w / 2, 1), "label": str(a)})
    return {"width": CHART_W, "height": 200, "top": top, "bottom": bottom, "x0": PLOT_X,
            "x1": CHART_W - PLOT_R, "bars": bars, "labels": labels, "group": group,
            "yticks": _y_ticks(top, bottom, step_v, steps, short_bytes)}


def _environment() -> Any:
    import jinja2

    from .render import templates_dir

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir())),
                             undefined=jinja2.StrictUndefined, autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(bytes=human_bytes, utc=utc, duration=duration,
                       num=lambda n: "–" if n is None else f"{n:,}")
    return env


def _pct(part: float, whole: float | None) -> float:
    return round(100.0 * part / whole, 1) if whole else 0.0


def page_context(data: ReportData) -> dict[str, Any]:
    """What the template gets: the data and the charts laid out."""
    tl = timeline(data)
    active = (data.last_record - data.first_record + 1) if data.first_record is not None \
        and data.last_record is not None else None
    span = data.span
    return {
        "d": data, "timeline": tl,
        "throughput": throughput_charts(data, tl["axis"] if tl else None),
        "bytes_chart": bytes_chart(data),
        "outcomes": OUTCOMES, "task_states": TASK_STATES,
        "done_pct": _pct(data.done, data.files),
        "failed_pct": _pct(data.counts[FAILED], data.files),
        "bytes_pct": _pct(data.bytes_uploaded + data.bytes_present, data.bytes),
        "active": active, "elapsed": (span[1] - span[0]) if span else None,
        "avg_rate": rate(sum(data.throughput.bytes), active)
        if active and data.throughput else "–",
        "cause_max": max((c.files for c in data.causes), default=1),
        "next_by_cause": _next_by_cause(data),
        "tasks_open": len(data.tasks) <= 200,
        "task_counts": [f"{n:,} {state}" for state, n in Counter(
            t.state for t in data.tasks).most_common() if state != "done"],
    }


def _next_by_cause(data: ReportData) -> dict[str, str]:
    from .status import cause_next

    return {c.cause: cause_next(c.cause, data.run_dir, data.job_file) for c in data.causes}


def render_chunks(data: ReportData) -> Iterator[str]:
    """The page, in pieces as the template makes them (never the whole page at once)."""
    return _environment().get_template("report.html.j2").generate(**page_context(data))


def render(data: ReportData) -> str:
    return "".join(render_chunks(data))


def write_report(run_dir: Path, out: Path | None = None, *,
                 max_failed: int = MAX_FAILED) -> Path:
    """Gather the run and write its page atomically to ``out`` (default RUN/report.html);
    the path written. RunReadError when RUN is not a readable run; OSError when the page
    cannot be written there."""
    run_dir = Path(run_dir)
    data = gather(run_dir, max_failed=max_failed)
    target = Path(out) if out is not None else run_dir / REPORT_NAME

    def write(handle: IO[bytes]) -> None:
        for chunk in render_chunks(data):
            # a name read from JSON may hold a lone surrogate, which UTF-8 cannot encode
            handle.write(chunk.encode("utf-8", "backslashreplace"))

    atomic_write_stream(target, write)
    return target
