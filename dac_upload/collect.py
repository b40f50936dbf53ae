"""Result records -> summary.json. The collector never talks to Rucio: the result files say
what happened. Every file of every manifest appears in the summary; a task that wrote no
result is listed, and its files are reported as not attempted, never silently dropped.

Re-running ``collect`` on the same results gives a byte-identical summary.json (it carries no
time of its own, only the times the tasks recorded).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

from . import __version__
from .files import (
    atomic_write_headed,
    atomic_write_json,
    read_json,
    read_jsonl,
    read_manifest,
    read_result_records,
    utc_now,
)
from .runrecord import (
    ALREADY_PRESENT,
    DONE_STATES,
    FAILED,
    NOT_ATTEMPTED,
    PERMANENT_CAUSES,
    REMAKE_HINT,
    UPLOADED,
    RunLayout,
    RunReadError,
    RunRecord,
    manifest_problem,
    read_run_json,
)

SCHEMA_VERSION = 2


def merge_records(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> the record that counts: the latest success, else the latest record (pure)."""
    best: dict[str, dict[str, Any]] = {}
    for rec in records:
        prev = best.get(rec["name"])
        if prev is None or rec["status"] in DONE_STATES or prev["status"] not in DONE_STATES:
            best[rec["name"]] = rec
    return best


class SummaryBuilder:
    """summary.json made task by task: ``entries`` gives one task's file entries (and counts
    them), ``header`` everything else once every task has been through. Memory is the
    markers (one small dict per task) plus the task in hand, whatever the run's size; a
    Butler source's datasets (relpath -> datasets, from butler.jsonl) are the exception."""

    def __init__(self, run: dict[str, Any], markers: dict[int, dict[str, Any]],
                 datasets: dict[str, list[dict[str, Any]]] | None = None) -> None:
        self.run, self.markers, self.datasets = run, markers, datasets or {}
        record = RunRecord(run)
        self.scope, self.rse, self.root = record.scope, record.rse, record.root
        self._root = str(self.root).rstrip("/") + "/"   # joined by hand: pathlib's join
        # cost 5 s a million files
        self.counts = {"files": 0, "bytes": 0, UPLOADED: 0, ALREADY_PRESENT: 0, FAILED: 0,
                       NOT_ATTEMPTED: 0, "bytes_uploaded": 0}
        self.missing_tasks: list[int] = []
        self.tasks = 0
        self.butler = {"files_with_datasets": 0, "files_without_datasets": 0, "datasets": 0,
                       "metadata_set": 0, "metadata_refused": 0}

    def entries(self, task: int, manifest: dict[str, Any],
                records: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
        """("scope:name", entry) of each file of the task's manifest, in its order."""
        merged = merge_records(records)
        self.tasks += 1
        if task not in self.markers:
            self.missing_tasks.append(task)
        butler, counts = RunRecord(self.run).butler, self.counts
        scope, rse, root, found = self.scope, self.rse, self._root, merged.get
        for entry in manifest["files"]:
            name, relpath = entry["name"], entry["relpath"]
            rec = found(name)
            if rec is None:
                why = ("the task wrote no result (it never ran, or died before this file): "
                       "see dac-upload status for its log") if task not in self.markers else \
                      "the task finished without a record for this file"
                rec = {"status": NOT_ATTEMPTED, "cause": "no result", "error": why,
                       "bytes": entry["size"], "adler32": None, "md5": None, "pfn": None,
                       "guid": None, "attempt": None}
            get, status = rec.get, rec["status"]
            out = {
                "scope": scope, "name": name, "bytes": get("bytes"),
                "adler32": get("adler32"), "md5": get("md5"), "rse": rse,
                "pfn": get("pfn"), "guid": get("guid"),
                "path": relpath if relpath[:1] == "/" else root + relpath,
                "relpath": relpath, "batch": task, "attempt": get("attempt"),
                "status": status, "cause": get("cause"), "error": get("error"),
                "verified": get("verified") if status == UPLOADED else None,
            }
            if get("archive"):   # [packing]: the archive that holds it, at this member path
                out["archive"], out["member"] = get("archive"), name
            if butler:
                ds = self.datasets.get(entry["relpath"], [])
                out["datasets"] = ds
                # a packed file's is its archive's (a Butler zip's zip_file)
                out["metadata"] = rec.get("metadata") if entry.get("meta") or \
                    get("archive") else None
                if entry["name"] != butler.get("dimension_file"):
                    self.butler["files_with_datasets" if ds else "files_without_datasets"] += 1
                self.butler["datasets"] += len(ds)
                if out["metadata"] in ("set", "refused"):
                    self.butler[f"metadata_{out['metadata']}"] += 1
            counts["files"] += 1
            counts["bytes"] += entry["size"]
            counts[status] += 1
            if status == UPLOADED:
                counts["bytes_uploaded"] += get("bytes") or 0
            yield f"{scope}:{name}", out

    def largest_header(self, warnings: list[str] | None = None) -> dict[str, Any]:
        """A header at least as long as this run's can be with these warnings: every count
        at 19 digits, the tasks without a marker missing (as ``entries`` will find them);
        summary.json keeps room for it before the entries."""
        most = SummaryBuilder(self.run, self.markers)
        most.counts = dict.fromkeys(self.counts, 10**19 - 1)
        most.butler = dict.fromkeys(self.butler, 10**19 - 1)
        most.tasks = 10**19 - 1
        most.missing_tasks = [t for t in range(RunRecord(self.run).tasks)
                              if t not in self.markers]
        return most.header(warnings)

    def header(self, warnings: list[str] | None = None) -> dict[str, Any]:
        """The summary without "files" (call once every task's entries were taken)."""
        run, markers, counts = self.run, self.markers, self.counts
        warnings = list(warnings or [])
        refused = sorted({m["metadata_refused"] for m in markers.values()
                          if m.get("metadata_refused")})
        warnings += [f"Butler metadata was not set: {why}" for why in refused]
        if self.butler["metadata_refused"] and not refused:   # its marker was replaced
            warnings.append(f"Butler metadata was not set on {self.butler['metadata_refused']}"
                            " files: the Rucio server refused it (see the tasks' logs)")
        finished = [m["finished_at"] for m in markers.values() if m.get("finished_at")]
        missing = self.missing_tasks
        head = {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "dac-upload", "version": __version__},
            "job": run["job"]["name"],
            "run_id": run["run_id"],
            "created_at": run["created_at"],
            "finished_at": max(finished) if finished else None,
            "source_root": str(self.root),
            "rucio": {"host": _from_markers(markers, "rucio_host"),
                      "account": RunRecord(run).account or _from_markers(
                          markers, "rucio_account"),
                      **{k: run["rucio"].get(k) for k in ("scope", "rse", "dataset",
                                                          "lifetime")}},
            "slurm": {"submissions": RunRecord(run).submissions},
            "complete": counts[UPLOADED] + counts[ALREADY_PRESENT] == counts["files"],
            "counts": {**counts, "tasks": self.tasks,
                       "tasks_with_result": self.tasks - len(missing),
                       "tasks_missing_result": len(missing)},
            "tasks_missing_result": missing,
            "failed_tasks": sorted(t for t, m in markers.items() if m.get("exit_code")),
            "warnings": warnings,
        }
        if RunRecord(run).butler:
            keys = ("kind", "repo", "collections", "dataset_types", "where", "find_first",
                    "metadata", "raw_dataset_types", "maps", "dimension_export",
                    "dimension_file")
            head["butler"] = {**{k: run["butler"].get(k) for k in keys}, **self.butler}
        return head


def build_summary(run: dict[str, Any], manifests: dict[int, dict[str, Any]],
                  results: dict[int, list[dict[str, Any]]],
                  markers: dict[int, dict[str, Any]],
                  warnings: list[str] | None = None,
                  datasets: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Pure: everything known about a run -> the summary document, held whole (tests and
    small runs; ``collect`` streams the same document to disk)."""
    builder = SummaryBuilder(run, markers, datasets)
    files = {key: entry for task in sorted(manifests)
             for key, entry in builder.entries(task, manifests[task], results.get(task, []))}
    return {**builder.header(warnings), "files": files}


def _from_markers(markers: dict[int, dict[str, Any]], key: str) -> str | None:
    """What the tasks saw (e.g. the Rucio host their client talked to): first one recorded."""
    for task in sorted(markers):
        if markers[task].get(key):
            return str(markers[task][key])
    return None


class _PerTask(Mapping[int, Any]):
    """task -> what ``read(task)`` gives, read when asked and not kept: a run's manifests
    and records are never all in memory at once."""

    def __init__(self, tasks: list[int], read: Callable[[int], Any]) -> None:
        self._tasks, self._known, self._read = tasks, set(tasks), read

    def __getitem__(self, task: int) -> Any:
        if task not in self._known:
            raise KeyError(task)
        return self._read(task)

    def __contains__(self, task: object) -> bool:   # Mapping's would read the task
        return task in self._known

    def __iter__(self) -> Iterator[int]:
        return iter(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)


@dataclass
class RunState:
    """Everything the run directory says about a run. ``manifests`` and ``results`` are read
    task by task when asked (see _PerTask); what reading them finds wrong is added to
    ``problems`` (once per task)."""

    run: dict[str, Any]
    manifests: Mapping[int, dict[str, Any]]
    results: Mapping[int, list[dict[str, Any]]]
    markers: dict[int, dict[str, Any]]
    problems: list[str]   # files in results/ that are not ours, markers that do not parse
    datasets: dict[str, list[dict[str, Any]]]   # relpath -> Butler datasets (butler.jsonl)
    collection: tuple[str, str] = ("", "")      # collection_state(): (state, why)
    collector: tuple[str | None, str | None] = (None, None)  # latest collector: (job, state)


MAX_LINE_PROBLEMS = 20   # per results file: a damaged file of millions of lines says enough


def read_run(run_dir: Path, datasets: bool = True) -> RunState:
    """The run as its directory says; ``datasets=False`` skips a Butler source's
    butler.jsonl (one line per file: the summary needs it, status does not)."""
    layout = RunLayout(run_dir)
    run = read_run_json(run_dir)
    n = RunRecord(run).tasks
    problems: list[str] = []
    said: set[tuple[str, int]] = set()
    remade: dict[int, bytes] = {}

    def manifest(t: int) -> dict[str, Any]:
        why = manifest_problem(run_dir, run, t)
        if why is None:
            try:
                return read_manifest(layout.manifest(t))
            except ValueError as exc:   # a run planned without digests
                why = str(exc) if str(layout.manifest(t)) in str(exc) else \
                    f"{layout.manifest(t)}: damaged ({exc})"
        if not remade:   # what the planner wrote, from the catalogue and the job copy
            from .pipeline import remake_manifests

            try:
                remade.update(remake_manifests(run_dir))
            except Exception as exc:
                raise RunReadError(f"{why}; and it cannot be made again from the run's "
                                   f"catalogue ({exc})") from None
        if t not in remade:
            raise RunReadError(f"{why}; the run's catalogue gives no task {t}")
        doc = json.loads(remade[t])
        doc["files"] = [dict(zip(doc["columns"], row)) for row in doc["files"]]
        if ("manifest", t) not in said:
            said.add(("manifest", t))
            problems.append(f"{why}: its files are reported from the manifest as planned "
                            f"(made again from the catalogue); {REMAKE_HINT} {run_dir}")
        return doc

    def records(t: int) -> list[dict[str, Any]]:
        found: list[str] = []
        recs = list(read_result_records(layout.result(t), found,
                                        f"results/{layout.result(t).name}"))
        if found and ("records", t) not in said:
            said.add(("records", t))
            problems.extend(found[:MAX_LINE_PROBLEMS])
            if len(found) > MAX_LINE_PROBLEMS:
                problems.append(f"results/{layout.result(t).name}: ... and "
                                f"{len(found) - MAX_LINE_PROBLEMS} more such lines")
        return recs

    markers: dict[int, dict[str, Any]] = {}
    for t in range(n):
        if layout.done_marker(t).exists():
            try:
                markers[t] = read_json(layout.done_marker(t))
            except ValueError:
                problems.append(f"results/{layout.done_marker(t).name}: not valid JSON "
                                "(ignored)")
    ours = {p.name for t in range(n) for p in (layout.result(t), layout.done_marker(t),
                                                 layout.copies(t))}
    for path in sorted(layout.results.iterdir()) if layout.results.exists() else []:
        if path.name not in ours and not path.name.startswith("."):
            problems.append(f"results/{path.name}: not a file of this run (ignored)")
    with_results = [t for t in range(n) if layout.result(t).exists()]
    by_relpath: dict[str, list[dict[str, Any]]] = {}
    butler = RunRecord(run).butler
    if datasets and butler and (layout.dir / butler["files"]).exists():
        by_relpath = {r["relpath"]: [{"in_zip": False, **d} for d in r["datasets"]]
                      for r in read_jsonl(layout.dir / butler["files"])}
    return RunState(run, _PerTask(list(range(n)), manifest), _PerTask(with_results, records),
                    markers, problems, by_relpath, collection_state(run_dir, run))


HEADER_SLACK = 2048   # bytes of summary.json's header room beyond SummaryBuilder.largest_header:
# for the warnings the pass itself finds (a torn line, a remade manifest); more than that and
# the entries are copied once after the header instead


def _header_text(header: dict[str, Any]) -> bytes:
    """summary.json's first lines: the header, sorted and indented (docs/summary-schema.md),
    without its closing brace, up to the line that opens "files"."""
    head = json.dumps(header, indent=1, sort_keys=True, ensure_ascii=False)
    return (head[:-2] + ",\n").encode("utf-8")


def _write_summary(run_dir: Path, state: RunState,
                   on_task: Callable[[int, dict[str, Any], list[str | None]], None] | None
                   = None) -> dict[str, Any]:
    """Stream summary.json: one pass over the tasks, each task's manifest and records read,
    turned into file entries and written out before the next; then the header (counts and
    warnings are known only then) into the room left for it before the entries, atomically
    (files.atomic_write_headed). ``on_task(task, manifest, ledger statuses)`` sees each
    task's files as they go (the ledger: ledger_status of each, in the manifest's order).
    Returns the summary without "files"."""
    import orjson  # encoding the entries is a large part of collect: the faster encoder

    layout = RunLayout(run_dir)
    builder = SummaryBuilder(state.run, state.markers, state.datasets)
    room = len(_header_text(builder.largest_header(state.problems))) + HEADER_SLACK
    dumps, sort = orjson.dumps, orjson.OPT_SORT_KEYS
    header: dict[str, Any] = {}

    def body(out: IO[bytes]) -> None:
        out.write(b' "files": {')
        sep = b"\n  "
        for task in state.manifests:
            manifest = state.manifests[task]
            lines: list[bytes] = []
            statuses: list[str | None] = []
            for key, entry in builder.entries(task, manifest, state.results.get(task, [])):
                lines.append(sep + dumps(key) + b": " + dumps(entry, option=sort))
                sep = b",\n  "
                if on_task is not None:
                    statuses.append(ledger_status(entry))
            out.write(b"".join(lines))   # one write per task, not per file
            if on_task is not None:
                on_task(task, manifest, statuses)
            del manifest, lines, statuses
        out.write(b"\n }\n}\n")

    def head() -> bytes:
        header.update(builder.header(state.problems))
        return _header_text(header)

    atomic_write_headed(layout.summary, room, body, head)
    return header


def collect(run_dir: Path) -> dict[str, Any]:
    """Write summary.json from the run's manifests, results and markers (streamed, see
    _write_summary); returns it without "files"."""
    return _write_summary(run_dir, read_run(run_dir))


class LedgerWriter:
    """The ledger's rows, task by task, in one transaction committed by ``finish``. Making
    and writing them (Ledger.stage_rows) costs about half as much CPU as the summary, so a
    forked child process does it while this one makes the summary, on another CPU where the
    job has one (the collector asks for two). Only each task's statuses go through the pipe;
    the child reads the task's manifest itself (``manifest(task)``, from the fork's copy of
    the run) for the paths, sizes, mtimes and names. A thread of the child reads the pipe
    while the ledger merges (at most 64 MB held there; beyond, the pipe holds back this
    process: memory stays bounded). In this process instead where a fork is unsafe (another
    thread is running) or impossible."""

    def __init__(self, path: Path, run_id: str,
                 manifest: Callable[[int], dict[str, Any]]) -> None:
        import threading

        self.problem: str | None = None
        self.local: _LedgerRows | None = None
        self.conn: Any = None
        self.child: Any = None
        if threading.active_count() == 1:
            import multiprocessing

            ctx = multiprocessing.get_context("fork")
            try:
                self.conn, theirs = ctx.Pipe()
                self.child = ctx.Process(target=_ledger_child,
                                         args=(theirs, path, run_id, manifest),
                                         name="dac-upload ledger", daemon=True)
                self.child.start()
                theirs.close()
                return
            except OSError:
                self.conn = self.child = None
        self.local = _LedgerRows(path, run_id)
        self.problem = self.local.problem

    def put(self, task: int, manifest: dict[str, Any], statuses: list[str | None]) -> None:
        """A task's ledger statuses (ledger_status of each file of ``manifest``, in its
        order)."""
        if self.problem is not None:
            return
        if self.local is not None:
            self.local.add(ledger_rows(manifest["files"], statuses))
            self.problem = self.local.problem
            return
        try:
            import orjson

            self.conn.send_bytes(orjson.dumps([task, statuses]))
        except (OSError, EOFError) as exc:   # the child gone, a pipe broken
            self.problem = f"the ledger's writer stopped ({exc})"
        except Exception as exc:
            self.problem = _ledger_error(exc)

    def finish(self, commit: bool = True) -> str | None:
        """Every row written and committed (or all of them dropped); why the ledger was not
        updated, or None."""
        if self.local is not None:
            return self.local.end(commit)
        try:
            self.conn.send_bytes(b"" if commit else b"!")
            said = self.conn.recv()
        except (OSError, EOFError):
            said = "the ledger's writer stopped before it committed"
        self.conn.close()
        self.child.join()
        self.problem = self.problem or said
        return self.problem


class _LedgerRows:
    """Rows into the ledger in one open transaction, in whichever process writes them; the
    first problem is kept and the rows after it dropped."""

    def __init__(self, path: Path, run_id: str) -> None:
        from .ledger import Ledger

        self.run_id = run_id
        self.problem: str | None = None
        self.ledger: Any = None
        try:
            self.ledger = Ledger(path)
        except Exception as exc:
            self.problem = _ledger_error(exc)

    def add(self, rows: list[Any]) -> None:
        if self.problem is None:
            try:
                self.ledger.stage_rows(rows, self.run_id)
            except Exception as exc:
                self.problem = _ledger_error(exc)

    def end(self, commit: bool) -> str | None:
        """Commit (``commit``) or drop the rows, close; the problem, or None."""
        if self.problem is None and commit:
            try:
                self.ledger.commit()
            except Exception as exc:
                self.problem = _ledger_error(exc)
        if self.ledger is not None:
            self.ledger.close()
        return self.problem


def _ledger_error(exc: BaseException) -> str:
    import sqlite3

    from .errors import UserError

    return str(exc) if isinstance(exc, (sqlite3.Error, OSError, UserError)) else repr(exc)


def _ledger_child(conn: Any, path: Path, run_id: str,
                  manifest: Callable[[int], dict[str, Any]]) -> None:
    """The ledger writer's process: [task, statuses] until an empty message, then commit
    ("!": drop them all); answers None or why the ledger was not updated (the rest is read
    and dropped). A thread reads the pipe meanwhile (at most _INBOX_BYTES held): while the
    ledger merges its staged rows (seconds), the summary's process goes on."""
    import orjson

    inbox = _Inbox(conn)
    rows = _LedgerRows(path, run_id)
    while (data := inbox.get()) not in (b"", b"!"):
        if rows.problem is None:
            try:
                task, statuses = orjson.loads(data)
                if any(statuses):   # a task of transient failures only adds nothing
                    rows.add(ledger_rows(manifest(task)["files"], statuses))
            except Exception as exc:
                rows.problem = _ledger_error(exc)
    conn.send(rows.end(commit=data == b""))
    conn.close()


_INBOX_BYTES = 64 << 20   # tasks' statuses (a million files: about 12 MB)


class _Inbox:
    """Messages from a pipe, read by a thread of their own as they come, up to
    ``_INBOX_BYTES`` held; a pipe that breaks reads as "!" (drop everything)."""

    def __init__(self, conn: Any) -> None:
        import collections
        import threading

        self.conn, self.held = conn, 0
        self.messages: collections.deque[bytes] = collections.deque()
        self.cond = threading.Condition()
        threading.Thread(target=self._read, name="ledger inbox", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.conn.recv_bytes()
            except (OSError, EOFError):
                data = b"!"
            with self.cond:
                while self.held > _INBOX_BYTES:
                    self.cond.wait()
                self.messages.append(data)
                self.held += len(data)
                self.cond.notify_all()
            if data in (b"", b"!"):
                return

    def get(self) -> bytes:
        with self.cond:
            while not self.messages:
                self.cond.wait()
            data = self.messages.popleft()
            self.held -= len(data)
            self.cond.notify_all()
            return data


def collect_run(run_dir: Path) -> tuple[dict[str, Any], str | None]:
    """What the collector job (and ``dac-upload collect``) does: summary.json and the job's
    ledger (task by task, as the summary is written), then collected.json saying both are
    done, what they were made from and the counts. Returns (the summary without "files",
    why the ledger was not updated or None). A collector killed on the way leaves no
    collected.json (or one that no longer fits the results): status, resubmit and nightly
    see the run as not collected, and collect again."""
    fingerprint = results_fingerprint(run_dir)   # before reading: a later write shows
    state = read_run(run_dir)
    record = RunRecord(state.run)
    writer = (LedgerWriter(record.ledger, record.run_id, state.manifests.__getitem__)
              if record.ledger else None)
    try:
        header = _write_summary(run_dir, state, writer.put if writer else None)
    except BaseException:
        if writer:
            writer.finish(commit=False)
        raise
    # every row committed (before collected.json: a run collected is in the ledger), or why
    ledger_problem = writer.finish() if writer else None
    atomic_write_json(RunLayout(run_dir).collected, {
        "submissions": len(RunRecord(state.run).submissions), "results": fingerprint,
        "complete": header["complete"], "counts": header["counts"],
        "tasks_missing_result": header["tasks_missing_result"],
        "ledger_problem": ledger_problem, "collected_at": utc_now()})
    return header, ledger_problem


def results_fingerprint(run_dir: Path) -> str:
    """What the results of a run look like from outside (each task file's size and mtime):
    a summary made from other results is stale. O(tasks) stat calls, no file read."""
    import hashlib

    layout = RunLayout(run_dir)
    seen = []
    for path in sorted(layout.results.iterdir()) if layout.results.exists() else []:
        if path.name.startswith("."):
            continue
        st = path.stat()
        seen.append(f"{path.name} {st.st_size} {st.st_mtime_ns}")
    return hashlib.sha256("\n".join(seen).encode()).hexdigest()


COLLECTED, NOT_COLLECTED, STALE = "collected", "not collected", "stale"


def collection_state(run_dir: Path, run: dict[str, Any]) -> tuple[str, str]:
    """(state, why) of the run's summary.json: COLLECTED (made by a collector that finished,
    from the results as they are now), NOT_COLLECTED (none, or the collector stopped before
    finishing) or STALE (made before the latest results or submission)."""
    layout = RunLayout(run_dir)
    try:
        done = read_json(layout.collected)
    except (OSError, ValueError):
        done = None
    if done is None:
        if layout.summary.exists():
            return NOT_COLLECTED, ("the last collector stopped after writing summary.json and "
                                   "before finishing (the job's ledger may lack this run)")
        return NOT_COLLECTED, "no summary.json yet"
    if int(done.get("submissions") or 0) < len(RunRecord(run).submissions):
        return STALE, "summary.json predates the latest submission"
    if done.get("results") != results_fingerprint(run_dir):
        return STALE, "summary.json predates the latest task results"
    return COLLECTED, "summary.json is up to date"


def collected_counts(run_dir: Path) -> dict[str, Any]:
    """The collected run's counts, complete and tasks_missing_result: from collected.json
    (a few lines), not from summary.json (hundreds of MB for a million files); from the
    summary only for a run collected before collected.json carried them."""
    layout = RunLayout(run_dir)
    done = read_json(layout.collected)
    return done if "counts" in done else read_json(layout.summary)


def records_so_far(run_dir: Path) -> tuple[int, int]:
    """(files with a result record, their bytes) over all tasks: progress while a run goes."""
    files = nbytes = 0
    for path in RunLayout(run_dir).results.glob("task-*.jsonl"):
        if path.name.endswith(".copies.jsonl"):
            continue
        for rec in read_jsonl(path):
            files += 1
            nbytes += rec.get("bytes") or 0
    return files, nbytes


def ledger_status(entry: dict[str, Any]) -> str | None:
    """What the ledger keeps of a file's summary entry: its status if done, failed:<cause>
    for a failure only a person can fix (so that a nightly run does not try it again while
    it is unchanged), else None (no row: the next run tries it)."""
    status = entry["status"]
    if status in DONE_STATES:
        return str(status)
    if status == FAILED and entry.get("cause") in PERMANENT_CAUSES:
        return f"failed:{entry['cause']}"
    return None


def ledger_rows(files: list[dict[str, Any]], statuses: list[str | None]
                ) -> list[tuple[str, int, float, str, str]]:
    """The ledger's rows of a task: (relpath, size, mtime, name, status) of each manifest
    entry whose ledger_status is not None."""
    if len(files) != len(statuses):   # the child read another manifest than the summary
        raise ValueError(f"{len(statuses)} statuses for a manifest of {len(files)} files")
    return [(f["relpath"], f["size"], f["mtime"], f["name"], status)
            for f, status in zip(files, statuses) if status]
