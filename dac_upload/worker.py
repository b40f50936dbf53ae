"""Inside one array task: manifest -> uploads -> one result record per file.

The result file is the truth of what is done. Each record is appended and fsynced as soon as
its file is finished, so a task killed half-way leaves the records of the files it finished;
the ``.done.json`` marker is written atomically last. Files already recorded as done by an
earlier attempt are not touched again. The worker never talks to Slurm.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from .errors import TaskExit
from .files import (
    JsonlAppender,
    atomic_write_json,
    read_checksums,
    read_json,
    read_jsonl,
    read_manifest,
    read_result_records,
    utc_now,
)
from .progress import human_bytes
from .runrecord import (
    ALREADY_PRESENT,
    DONE_STATES,
    FAILED,
    NOT_ATTEMPTED,
    PERMANENT_CAUSES,
    STOCK_VERIFIED,
    UPLOADED,
    RunLayout,
    RunRecord,
    TaskSettings,
)

# Tests only: a bulk task of the run whose id this variable holds dies (exit 137) between
# its copies and their registration, as if killed. Naming the run keeps it from ever
# touching another run, whatever the environment carries.
CRASH_AFTER_COPY = "DAC_UPLOAD_TEST_CRASH_AFTER_COPY"


# proxy path -> ((inode, mtime, size), expiry): read again only when the file changes (a
# renewal while the task runs is picked up)
_PROXY_EXPIRY: dict[Path, tuple[tuple[int, int, int], float | None]] = {}


def proxy_problem(s: TaskSettings, now: float | None = None) -> str | None:
    """Why no further file can be done with the task's X.509 proxy (expired, or about to
    within PROXY_MARGIN), or None. Asked before each file or chunk: an expired proxy fails
    every storage operation, usually as some opaque TLS or authentication error of gfal2,
    XRootD or Rucio; this says the cause and the fix once."""
    if s.proxy is None:
        return None
    from .credentials import PROXY_MARGIN, proxy_facts, renew_proxy_command

    try:
        st = os.stat(s.proxy)
    except OSError:   # not there (yet): Rucio and the storage say what they make of that
        return None
    key = (st.st_ino, st.st_mtime_ns, st.st_size)
    seen = _PROXY_EXPIRY.get(s.proxy)
    if seen is None or seen[0] != key:
        facts = proxy_facts(s.proxy)
        seen = (key, facts.not_after if facts else None)
        _PROXY_EXPIRY[s.proxy] = seen
    end, now = seen[1], time.time() if now is None else now
    if end is None or end - now > PROXY_MARGIN:
        return None
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end))
    return (f"the X.509 proxy {s.proxy} {'expired' if end <= now else 'expires'} at {when}: "
            f"renew it ({renew_proxy_command(s.proxy)}, or grid-proxy-init -rfc -out "
            f"{s.proxy}), then resubmit")


def existing_verdict(size: int, adler32: str, did_bytes: int | None,
                     did_adler32: str | None) -> str:
    """'same' if the DID in Rucio has our size and adler32, else 'conflict' (pure)."""
    if did_bytes == size and (did_adler32 or "").lower().zfill(8) == adler32:
        return "same"
    return "conflict"


class CopyLog:
    """The task's copies.jsonl: before a copy onto the RSE starts, its name is appended
    (fsynced, a line per chunk). What an earlier attempt of this task listed (``earlier``)
    is this run's own: a file that Rucio holds by now is recorded uploaded by this run, and
    that attempt's temporary copies (``earlier_temps``) are removed."""

    def __init__(self, path: Path | None, attempt: int) -> None:
        """``path`` None: nothing is kept (doctor --probe)."""
        self.path, self.attempt = path, attempt
        self.earlier: set[str] = set()
        self.earlier_temps: set[str] = set()   # their writers' temporary-name tokens
        if path is not None and path.exists():
            for rec in read_jsonl(path):
                if int(rec.get("attempt") or 0) < attempt:
                    self.earlier.update(n for n in rec.get("names") or () if isinstance(n, str))
                    if isinstance(rec.get("temp"), str):
                        self.earlier_temps.add(rec["temp"])
        self._lock = threading.Lock()

    def started(self, names: list[str], temp: str | None = None) -> None:
        """``temp``: the token of the temporary names the copies use (Storage.temp_token),
        so that a later attempt can remove what a killed one left under them."""
        if not names or self.path is None:
            return
        import json

        line = json.dumps({"attempt": self.attempt, "names": names,
                           **({"temp": temp} if temp else {})}) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as out:
            out.write(line)
            out.flush()
            os.fsync(out.fileno())


def _log(msg: str) -> None:
    print(f"{utc_now()} {msg}", flush=True)


def local_record(s: TaskSettings, entry: dict[str, Any]) -> dict[str, Any]:
    """The entry's record after looking at the file itself: unchanged since the catalogue,
    then adler32 and md5 in one read (status None: ready for Rucio), or a failure (changed,
    missing, unreadable)."""
    path = s.root / entry["relpath"]
    rec: dict[str, Any] = {"relpath": entry["relpath"], "path": str(path), "scope": s.scope,
                           "name": entry["name"], "rse": s.rse, "bytes": entry["size"],
                           "adler32": None, "md5": None, "pfn": None, "guid": None,
                           "status": FAILED, "cause": None, "error": None}
    try:
        st = os.stat(path)
        if st.st_size != entry["size"] or st.st_mtime != entry["mtime"]:
            what = (f"size {entry['size']} -> {st.st_size}" if st.st_size != entry["size"]
                    else "modification time")
            rec.update(cause="changed", error=(
                f"changed since it was catalogued ({what}); not uploaded: plan a new run once "
                "the file is final"))
            return rec
        size, adler32, md5 = read_checksums(path, md5=s.md5 or s.mode == "stock")
    except FileNotFoundError:
        rec.update(cause="missing", error="missing: the file vanished after it was catalogued")
        return rec
    except OSError as exc:
        rec.update(cause="unreadable", error=f"unreadable: {exc.strerror or exc}")
        return rec
    rec.update(bytes=size, adler32=adler32, md5=md5, status=None)
    return rec


def process_file(rio: Any, s: TaskSettings, entry: dict[str, Any],
                 copies: CopyLog | None = None) -> dict[str, Any]:
    """Upload one manifest entry with Rucio's stock UploadClient ([upload] mode = "stock");
    return its result record (never raises RucioFileError). The file's GUID is ours: the
    DID's GUID then says which upload registered it, so that two runs writing the same
    name at once never both say "uploaded". A task stopped (credentials refused, server
    gone) once the upload has begun gets a record saying the file may be in Rucio, under
    "_fatal" the exception that stops the task."""
    from .rucio_io import RucioFileError, RucioTransient

    rec = local_record(s, entry)
    if rec["status"] is not None:
        return rec
    rec["status"] = FAILED
    path, size, adler32 = s.root / entry["relpath"], rec["bytes"], rec["adler32"]
    begun = False
    try:
        did = rio.did(s.scope, entry["name"])
        if did is not None:
            if existing_verdict(size, adler32, did.bytes, did.adler32) == "conflict":
                rec.update(cause="conflict", error=(
                    f"conflict: {s.scope}:{entry['name']} is already in Rucio with other "
                    f"content (bytes {did.bytes}, adler32 {did.adler32}); left alone, rename "
                    "or remove one of them"))
                return rec
            rep = rio.replica(s.scope, entry["name"], s.rse)
            if rep is not None and rep.state == "AVAILABLE":
                _protect_present(rio, s, entry["name"])
                rec.update(status=ALREADY_PRESENT, pfn=rep.pfn,
                           guid=rio.guid(s.scope, entry["name"]))
                if copies is not None and entry["name"] in copies.earlier:
                    rec.update(status=UPLOADED, verified=STOCK_VERIFIED, note=(
                        "uploaded by an earlier attempt of this task, which stopped before "
                        "recording it"))
                return rec
        guid = uuid.uuid4().hex
        begun = True
        if copies is not None:
            copies.started([entry["name"]])
        try:
            pfn, _ = rio.upload(path, s.scope, entry["name"], s.rse, s.dataset, s.lifetime,
                                guid=guid)
        except RucioTransient:
            raise
        except RucioFileError as exc:   # maybe another upload of the name won a race
            settled = _settled_elsewhere(rio, s, entry, rec, guid, str(exc))
            if settled is None:
                raise
            return settled
        if did is not None and not s.dataset:  # Rucio made no rule for a DID that existed
            rio.ensure_rule(s.scope, entry["name"], s.rse, s.lifetime)
        rep = rio.replica(s.scope, entry["name"], s.rse)
        if rep is None or rep.state != "AVAILABLE":
            rec.update(cause="verify", error=(
                f"uploaded but the replica on {s.rse} is {rep.state if rep else 'missing'}, "
                "not AVAILABLE"))
            return rec
        if (rep.adler32 or "").lower().zfill(8) != adler32 or rep.bytes != size:
            rec.update(cause="verify", error=(
                f"checksum mismatch after upload: Rucio has bytes {rep.bytes} adler32 "
                f"{rep.adler32}, the file {size} {adler32} (it changed while uploading?)"))
            return rec
        registered = rio.guid(s.scope, entry["name"])
        if did is None and registered not in (None, guid):
            rec.update(status=ALREADY_PRESENT, pfn=rep.pfn or pfn, guid=registered, note=(
                "another upload registered this name first (a second run writing the same "
                "names?); this run's copy of the same bytes was not registered"))
            return rec
        rec.update(status=UPLOADED, pfn=rep.pfn or pfn,
                   guid=guid if did is None else registered, verified=STOCK_VERIFIED)
    except RucioTransient as exc:
        rec.update(cause="transient", error=str(exc))
    except RucioFileError as exc:
        rec.update(cause="rucio", error=str(exc))
    except Exception as exc:   # RucioFatal (credentials, server gone) or a bug
        from .rucio_io import StorageFull

        if not begun or isinstance(exc, StorageFull):   # a full storage registered nothing
            raise
        rec.update(cause="interrupted", error=(
            f"the task stopped while uploading this file ({exc}): Rucio may hold it, "
            "registered; a resubmission checks and finishes it"))
        rec["_fatal"] = exc
    return rec


def _protect_present(rio: Any, s: TaskSettings, name: str) -> None:
    """A file found in Rucio: attached to the dataset (an earlier run may have uploaded it
    outside it), or given a rule (a crash between replica and rule must not leave it
    unprotected)."""
    if s.dataset:
        rio.attach(s.dataset, s.scope, name)
    else:
        rio.ensure_rule(s.scope, name, s.rse, s.lifetime)


def _settled_elsewhere(rio: Any, s: TaskSettings, entry: dict[str, Any], rec: dict[str, Any],
                       guid: str, error: str) -> dict[str, Any] | None:
    """After a failed upload: the record Rucio's state says it should have, if the name is
    now AVAILABLE on the RSE with our bytes (registered by us before a later step failed,
    or by another upload writing the same name at that moment); None if it is not."""
    name = entry["name"]
    did = rio.did(s.scope, name)
    if did is None or existing_verdict(rec["bytes"], rec["adler32"], did.bytes,
                                       did.adler32) != "same":
        return None
    rep = rio.replica(s.scope, name, s.rse)
    if rep is None or rep.state != "AVAILABLE":
        return None
    _protect_present(rio, s, name)
    registered = rio.guid(s.scope, name)
    if registered == guid:
        return {**rec, "status": UPLOADED, "pfn": rep.pfn, "guid": guid, "cause": None,
                "error": None, "verified": STOCK_VERIFIED,
                "note": f"registered; Rucio's client then reported: {error}"}
    return {**rec, "status": ALREADY_PRESENT, "pfn": rep.pfn, "guid": registered,
            "cause": None, "error": None,
            "note": f"another upload registered this name meanwhile; this run's: {error}"}


def probe_record(rio: Any, job: Any, creds: Any, path: Path, name: str,
                 lifetime: int) -> dict[str, Any]:
    """Upload one file (doctor --probe) exactly as a task of ``job`` would, through its
    [upload] mode (bulk: copy, destination check, bulk registration and rule; stock: the
    UploadClient), with its RSE and settings, no dataset and a rule of ``lifetime``; its
    result record. A probe that takes another path than the job proves nothing."""
    st = path.stat()
    s = TaskSettings(scope=job.rucio.scope, rse=job.rucio.rse, account=creds.account, dataset=None,
                 lifetime=lifetime, root=path.parent, retries=0, retry_wait=1.0,
                 mode=job.upload.mode, chunk_size=1, transfers=1, rename=job.upload.rename,
                 guid=job.upload.guid, proxy=creds.proxy, md5=job.upload.md5)
    entry = {"relpath": path.name, "name": name, "size": st.st_size, "mtime": st.st_mtime}
    if s.mode == "stock":
        return process_file(rio, s, entry)
    from .bulk import bulk_records

    why: list[str] = []
    with StopRequest() as stop:
        recs = list(bulk_records(rio, s, [entry], stop, why.append,
                                 lambda: why[0] if why else None))
    return recs[0]


def permanent_failures(path: Path) -> set[str]:
    """Names whose latest record is a failure only a person can fix."""
    if not path.exists():
        return set()
    latest: dict[str, dict[str, Any]] = {}
    for r in read_jsonl(path):
        latest[r["name"]] = r
    return {n for n, r in latest.items()
            if r.get("status") == FAILED and r.get("cause") in PERMANENT_CAUSES}


def finished_names(path: Path) -> set[str]:
    """Names an earlier attempt of this task already uploaded or found present."""
    if not path.exists():
        return set()
    return {r["name"] for r in read_jsonl(path) if r.get("status") in DONE_STATES}


def run_task(run_dir: Path, task: int,
             rucio_factory: Callable[[str | None], Any] | None = None,
             retry_permanent: bool = False) -> int:
    """Process one manifest; return the task's exit code (0 only if every file is done)."""
    from .runrecord import REMAKE_HINT, manifest_problem, read_run_json

    layout = RunLayout(run_dir)
    try:
        run = read_run_json(run_dir, whole=False)
        why = manifest_problem(run_dir, run, task)
        if why is not None and task < RunRecord(run).tasks_planned:   # edited or cut: refused
            why = f"{why}; {REMAKE_HINT} {run_dir}, then resubmit"
            layout.results.mkdir(exist_ok=True)
            atomic_write_json(layout.done_marker(task), {
                "task": task, "attempt": _previous_attempt(layout.done_marker(task),
                                                           layout.result(task)) + 1,
                "host": socket.gethostname(), "started_at": utc_now(),
                "finished_at": utc_now(), "exit_code": TaskExit.BAD_INPUT, "aborted": why,
                "slurm_job_id": os.environ.get("SLURM_JOB_ID")})
            raise ValueError(why)
        manifest = read_manifest(layout.manifest(task))
    except (OSError, ValueError) as exc:
        print(f"dac-upload worker: cannot read run {run_dir} task {task}: {exc}",
              file=sys.stderr)
        return TaskExit.BAD_INPUT
    settings = RunRecord(run).task_settings()
    attempt = _previous_attempt(layout.done_marker(task), layout.result(task)) + 1
    started = utc_now()
    layout.results.mkdir(exist_ok=True)
    result_path = layout.result(task)
    done_before = finished_names(result_path)
    # a file whose last failure needs a person is left alone until they say it is fixed
    held = set() if retry_permanent else permanent_failures(result_path)
    todo = [e for e in manifest["files"]
            if e["name"] not in done_before and e["name"] not in held]
    _log(f"task {task}: {len(manifest['files'])} files in manifest, {len(done_before)} done "
         f"before, {len(held)} waiting for a person, {len(todo)} to do; scope "
         f"{settings.scope}, RSE {settings.rse}")

    counts = {UPLOADED: 0, ALREADY_PRESENT: 0, FAILED: 0, NOT_ATTEMPTED: 0}
    nbytes = 0
    aborted: str | None = None
    t0 = time.monotonic()
    with StopRequest() as stop, JsonlAppender(result_path, sync_every=1.0) as out:
        rio = None
        try:
            if rucio_factory is None:
                from .rucio_io import RucioIO

                def rucio_factory(_account: str | None) -> Any:
                    return RucioIO.for_run(layout.dir, run)
            rio = retrying(lambda: rucio_factory(settings.account), settings, stop,
                            "connecting to Rucio")
            if settings.dataset and todo:
                done = retrying(lambda: rio.ensure_dataset(
                    settings.dataset, settings.rse, settings.lifetime), settings, stop,
                    "creating the dataset")
                _log(f"dataset {':'.join(settings.dataset)}: {done}"
                     + (" (its rule is left as it is; lifetime not applied)"
                        if done == "exists" and settings.lifetime else ""))
        except Exception as exc:
            aborted = str(exc)
        state: dict[str, Any] = {"aborted": aborted,
                                 "copies": CopyLog(layout.copies(task), attempt)}
        if os.environ.get(CRASH_AFTER_COPY) == run.get("run_id"):   # the tests' crash
            state["crash_after_copy"] = lambda: os._exit(137)
        records = (_stock_records(rio, settings, todo, stop, state)
                   if settings.mode == "stock" or rio is None else
                   _bulk(rio, settings, todo, stop, state))
        meta = {e["name"]: e["meta"] for e in todo if e.get("meta")}
        if meta and rio is not None:
            records = _with_metadata(rio, settings, records, meta, stop, state, len(todo))
        for rec in records:
            rec.update(task=task, attempt=attempt, finished_at=utc_now())
            out.append(rec)
            counts[rec["status"]] += 1
            if rec["status"] == UPLOADED:
                nbytes += rec["bytes"] or 0
            _log(f"{rec['status']:<15} {settings.scope}:{rec['name']}"
                 + (f"  ({rec['error']})" if rec["error"] else "")
                 + (f"  ({rec.pop('note')})" if rec.get("note") else ""))
    aborted = state["aborted"]
    elapsed = max(time.monotonic() - t0, 1e-9)
    code = (TaskExit.ABORTED if aborted
            else TaskExit.STOPPED if stop.reason and counts[NOT_ATTEMPTED]
            else TaskExit.FILES_FAILED if counts[FAILED] or held else TaskExit.OK)
    marker = {"task": task, "attempt": attempt, "host": socket.gethostname(),
              "started_at": started, "finished_at": utc_now(), "exit_code": code,
              "files": len(manifest["files"]), "done_before": len(done_before),
              "uploaded": counts[UPLOADED], "already_present": counts[ALREADY_PRESENT],
              "failed": counts[FAILED], "not_attempted": counts[NOT_ATTEMPTED],
              "waiting_for_a_person": len(held),
              "bytes_uploaded": nbytes,
              "aborted": aborted, "stopped": stop.reason,
              "metadata_refused": state.get("metadata_refused"),
              "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
              "rucio_host": getattr(rio, "host", None),
              "rucio_account": getattr(rio, "account", None)}
    marker["index"] = task_index(task, manifest, result_path)
    atomic_write_json(layout.done_marker(task), marker)
    _log(f"task {task} finished: {counts[UPLOADED]} uploaded ({human_bytes(nbytes)}, "
         f"{nbytes / elapsed / 1e6:.1f} MB/s, {counts[UPLOADED] / elapsed:.1f} files/s), "
         f"{counts[ALREADY_PRESENT]} already present, {counts[FAILED]} failed, "
         f"{counts[NOT_ATTEMPTED]} not attempted"
         + (f"; aborted: {aborted}" if aborted else "")
         + (f"; stopped: {stop.reason}" if stop.reason else "") + f"; exit {code}")
    return code


def task_index(task: int, manifest: dict[str, Any], result_path: Path) -> dict[str, Any]:
    """What ``status`` needs of the task after this attempt (every attempt's records merged),
    kept in its marker so that status reads one small file per task, not every record:
    files and bytes, done and all, the causes of the files not done, whether only a person
    can fix them, and the size of the results file it was made from (a later attempt that
    died after writing records makes the index stale: status then reads the records)."""
    from .status import task_status

    records = list(read_result_records(result_path)) if result_path.exists() else []
    t = task_status(task, manifest, records, None, None)
    return {"files": t.files, "bytes": t.bytes, "files_done": t.files_done,
            "bytes_done": t.bytes_done, "causes": dict(sorted(t.causes.items())),
            "permanent_only": t.permanent_only,
            "results_bytes": result_path.stat().st_size if result_path.exists() else 0}


def _stock_records(rio: Any, s: TaskSettings, todo: list[dict[str, Any]], stop: StopRequest,
                   state: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """[upload] mode = "stock": file by file through Rucio's UploadClient."""
    for entry in todo:
        if not state["aborted"] and (expired := proxy_problem(s)):
            state["aborted"] = expired
        if state["aborted"]:
            yield not_attempted(s, entry, state["aborted"], "aborted")
        elif stop.reason:
            yield not_attempted(s, entry, stop.reason, "stopped")
        else:
            try:
                rec = _with_retries(rio, s, entry, stop, state.get("copies"))
            except Exception as exc:  # RucioFatal, or a bug: stop, say why once
                state["aborted"] = _abort_reason(exc)
                rec = not_attempted(s, entry, state["aborted"], "aborted")
            else:
                fatal = rec.pop("_fatal", None)
                if fatal is not None:   # stopped half-way through this file: it says so
                    state["aborted"] = _abort_reason(fatal)
                elif rec.get("cause") == "transient":
                    # failed through every retry: the next file would fail the same way.
                    # UploadClient's errors do not say which side failed (gfal2's come
                    # wrapped in ServiceUnavailable, as the server's do): name both.
                    state["aborted"] = ("the Rucio server or the RSE's storage keeps "
                                        f"failing: {rec['error']}")
            yield rec


def _abort_reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, Exception) and _is_fatal(exc) else (
        f"internal error {type(exc).__name__}: {exc}")


def _with_metadata(rio: Any, s: TaskSettings, records: Iterator[dict[str, Any]],
                   meta: dict[str, dict[str, str]], stop: StopRequest,
                   state: dict[str, Any], n: int) -> Iterator[dict[str, Any]]:
    """Set the Butler metadata (rubin_butler, rubin_sidecar) of each done file's DID before
    its record is written: a file counts as done only with its metadata, and a resubmission
    finds the file present and sets it. One request per bulk chunk (whose records arrive
    together anyway; bulk.chunk_sizes says where each ends); file by file in stock mode, so
    that each record is still written as soon as its file is done. A server that cannot
    keep such metadata (no JSON plugin) is said once; the files stay uploaded, marked
    metadata "refused"."""
    from itertools import accumulate

    from .bulk import chunk_sizes
    from .rucio_io import MetadataRefused, RucioFileError

    # the bulk path yields one record per file, chunk after chunk: flush at its chunks' ends
    ends = set(accumulate(chunk_sizes(n, s.chunk_size))) if s.mode == "bulk" else None
    pending: list[dict[str, Any]] = []

    def flush() -> Iterator[dict[str, Any]]:
        done = [r for r in pending if r["status"] in DONE_STATES and r["name"] in meta]
        if done and state.get("metadata_refused") is None:
            try:
                retrying(lambda: rio.set_metadata_bulk(
                    s.scope, [(r["name"], meta[r["name"]]) for r in done]), s, stop,
                    "setting Butler metadata", transient_too=True)
                for r in done:
                    r["metadata"] = "set"
            except MetadataRefused as exc:
                state["metadata_refused"] = str(exc)
                _log(f"WARNING: Butler metadata not set: {exc}; the files are uploaded "
                     "without it (summary.json lists each file's datasets)")
            except RucioFileError as exc:
                for r in done:
                    r.update(status=FAILED, cause="rucio", error=(
                        f"uploaded, but its Butler metadata was not set ({exc}); a "
                        "resubmission sets it"))
            except Exception as exc:   # the server gone or refusing us: stop the task
                state["aborted"] = str(exc) if _is_fatal(exc) else (
                    f"internal error {type(exc).__name__}: {exc}")
                for r in done:
                    r.update(status=FAILED, cause="transient", error=(
                        f"uploaded, but its Butler metadata was not set ({exc}); a "
                        "resubmission sets it"))
        if state.get("metadata_refused") is not None:
            for r in done:
                r["metadata"] = "refused"
        yield from pending
        pending.clear()

    for seen, rec in enumerate(records, 1):
        pending.append(rec)
        if ends is None or seen in ends or stop.reason:
            yield from flush()
    yield from flush()


def _bulk(rio: Any, s: TaskSettings, todo: list[dict[str, Any]], stop: StopRequest,
          state: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """[upload] mode = "bulk": chunks, bulk requests, concurrent copies (bulk.py)."""
    from .bulk import bulk_records

    def abort(reason: str) -> None:
        state["aborted"] = reason

    yield from bulk_records(rio, s, todo, stop, abort, lambda: state["aborted"],
                            state.get("crash_after_copy"), state.get("copies"))


class StopRequest:
    """SIGUSR1 (Slurm's wall-time warning, forwarded by the array script) or SIGTERM: finish
    the current file, record the rest as not attempted, write the marker, exit. Waits between
    retries are cut short too."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.reason: str | None = None
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        self.reason = ("wall time near (SIGUSR1 from Slurm)" if signum == signal.SIGUSR1
                       else f"asked to stop ({name})")
        self._event.set()

    def sleep(self, seconds: float) -> None:
        self._event.wait(seconds)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def retrying(call: Callable[[], Any], s: TaskSettings, stop: StopRequest, what: str,
             transient_too: bool = False) -> Any:
    """``call()``, again after a pause while the Rucio server cannot be reached (and, with
    ``transient_too``, while it fails the request: a bulk request stands for many files).
    After the last try a failing server aborts the task."""
    from .rucio_io import RucioTransient, RucioUnavailable

    kinds = (RucioUnavailable, RucioTransient) if transient_too else (RucioUnavailable,)
    for i in range(s.retries + 1):
        try:
            return call()
        except kinds as exc:
            if i == s.retries or stop.reason is not None:
                if isinstance(exc, RucioTransient):
                    from .rucio_io import RucioFatal
                    raise RucioFatal(f"the Rucio server keeps failing: {exc}") from None
                raise
            _pause(s, stop, i, what, str(exc))
    raise AssertionError("unreachable")


def _pause(s: TaskSettings, stop: StopRequest, i: int, what: str, why: str) -> None:
    """The back-off before retry i+1: retry_wait doubling, at most 5 minutes; a stop signal
    cuts it short."""
    wait = min(s.retry_wait * 2 ** i, 300.0)
    _log(f"retry {i + 1}/{s.retries} of {what} in {wait:.0f} s: {why}")
    stop.sleep(wait)


def _with_retries(rio: Any, s: TaskSettings, entry: dict[str, Any], stop: StopRequest,
                  copies: CopyLog | None = None) -> dict[str, Any]:
    """process_file, again after a pause (doubling, at most 5 min) when the server was
    unreachable or failed the request; an unreachable server after the last try aborts
    the task (raises RucioUnavailable, or returns the file's record under "_fatal" when
    its upload had begun), a failing one fails this file (cause transient)."""
    from .rucio_io import RucioUnavailable

    interrupted: dict[str, Any] | None = None   # a try cut short after its upload began
    for i in range(s.retries + 1):
        last = i == s.retries or stop.reason is not None
        try:
            rec = process_file(rio, s, entry, copies)
        except Exception as exc:   # before any upload of this try: nothing new to say
            if interrupted is not None and (last or not isinstance(exc, RucioUnavailable)):
                interrupted["_fatal"] = exc   # what an earlier try began is still unknown
                return interrupted
            if last or not isinstance(exc, RucioUnavailable):
                raise
            why = str(exc)
        else:
            fatal = rec.get("_fatal")
            if isinstance(fatal, RucioUnavailable) and not last:
                interrupted, why = rec, str(fatal)   # the next try looks at what Rucio holds
            elif rec.get("cause") != "transient" or last:
                return rec
            else:
                why = rec["error"]
        _pause(s, stop, i, f"{s.scope}:{entry['name']}", why)
    raise AssertionError("unreachable")


def not_attempted(s: TaskSettings, entry: dict[str, Any], reason: str,
                   cause: str) -> dict[str, Any]:
    return {"relpath": entry["relpath"], "path": str(s.root / entry["relpath"]),
            "scope": s.scope, "name": entry["name"], "rse": s.rse, "bytes": entry["size"],
            "adler32": None, "md5": None, "pfn": None, "guid": None, "status": NOT_ATTEMPTED,
            "cause": cause, "error": f"task stopped before this file: {reason}"}


def _is_fatal(exc: Exception) -> bool:
    from .rucio_io import RucioFatal

    return isinstance(exc, RucioFatal)


def _previous_attempt(marker: Path, results: Path) -> int:
    """Highest attempt seen so far: the marker's, or a killed attempt's records."""
    seen = 0
    with contextlib.suppress(OSError, ValueError):
        seen = int(read_json(marker).get("attempt") or 0)
    copies = results.with_name(results.name.replace(".jsonl", ".copies.jsonl"))
    for path in (results, copies):   # a killed attempt may have listed copies, nothing else
        if path.exists():
            seen = max([seen, *(int(r.get("attempt") or 0) for r in read_jsonl(path))])
    return seen
