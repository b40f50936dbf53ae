"""Inside one array task: manifest -> uploads -> one result record per file.

The result file is the truth of what is done. Each record is appended and fsynced as soon as
its file is finished, so a task killed half-way leaves the records of the files it finished;
the ``.done.json`` marker is written atomically last. Files already recorded as done by an
earlier attempt are not touched again. The worker never talks to Slurm.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from ..errors import TaskExit
from ..files import (
    JsonlAppender,
    atomic_write_json,
    read_json,
    read_jsonl,
    read_manifest,
    read_result_records,
    utc_now,
)
from ..progress import human_bytes
from ..runrecord import (
    ALREADY_PRESENT,
    DONE_STATES,
    FAILED,
    NOT_ATTEMPTED,
    PERMANENT_CAUSES,
    UPLOADED,
    RunLayout,
    RunRecord,
    TaskSettings,
)
from .common import CopyLog, StopRequest, TaskState, log, retrying, set_metadata
from .session import RucioSession
from .stock import stock_records


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
    layout = RunLayout(run_dir)
    try:
        run, manifest = _read_task(layout, task)
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
    log(f"task {task}: {len(manifest['files'])} files in manifest, {len(done_before)} done "
        f"before, {len(held)} waiting for a person, {len(todo)} to do; scope "
        f"{settings.scope}, RSE {settings.rse}")

    counts = {UPLOADED: 0, ALREADY_PRESENT: 0, FAILED: 0, NOT_ATTEMPTED: 0}
    nbytes = 0
    t0 = time.monotonic()
    with StopRequest() as stop, JsonlAppender(result_path, sync_every=1.0) as out:
        rio, aborted = _connect(layout, run, settings, stop, todo, rucio_factory)
        state = TaskState(aborted, CopyLog(layout.copies(task), attempt))
        archives = manifest.get("archives") or []
        bulk_files = len(todo)   # how many go through the bulk path's chunks
        if settings.mode == "stock" or rio is None:
            records = stock_records(rio, settings, todo, stop, state)
        elif archives:
            records, bulk_files = _packed(rio, settings, manifest["files"], archives, todo,
                                          stop, state)
        else:
            records = _bulk(rio, settings, todo, stop, state)
        meta = {e["name"]: e["meta"] for e in todo if e.get("meta")}
        if meta and rio is not None:
            records = with_metadata(rio, settings, records, meta, stop, state, bulk_files)
        for rec in records:
            rec.update(task=task, attempt=attempt, finished_at=utc_now())
            out.append(rec)
            counts[rec["status"]] += 1
            if rec["status"] == UPLOADED:
                nbytes += rec["bytes"] or 0
            log(f"{rec['status']:<15} {settings.scope}:{rec['name']}"
                + (f"  ({rec['error']})" if rec["error"] else "")
                + (f"  ({rec.pop('note')})" if rec.get("note") else ""))
    aborted = state.aborted
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
              "metadata_refused": state.metadata_refused,
              "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
              "rucio_host": getattr(rio, "host", None),
              "rucio_account": getattr(rio, "account", None)}
    marker["index"] = task_index(task, manifest, result_path)
    atomic_write_json(layout.done_marker(task), marker)
    log(f"task {task} finished: {counts[UPLOADED]} uploaded ({human_bytes(nbytes)}, "
        f"{nbytes / elapsed / 1e6:.1f} MB/s, {counts[UPLOADED] / elapsed:.1f} files/s), "
        f"{counts[ALREADY_PRESENT]} already present, {counts[FAILED]} failed, "
        f"{counts[NOT_ATTEMPTED]} not attempted"
        + (f"; aborted: {aborted}" if aborted else "")
        + (f"; stopped: {stop.reason}" if stop.reason else "") + f"; exit {code}")
    return code


def _read_task(layout: RunLayout, task: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run.json, the task's manifest); OSError or ValueError if they cannot be used. A
    manifest that is not the one planned is refused, and the task's marker says why."""
    from ..runrecord import REMAKE_HINT, manifest_problem, read_run_json

    run = read_run_json(layout.dir, whole=False)
    why = manifest_problem(layout.dir, run, task)
    if why is not None and task < RunRecord(run).tasks_planned:   # edited or cut: refused
        why = f"{why}; {REMAKE_HINT} {layout.dir}, then resubmit"
        layout.results.mkdir(exist_ok=True)
        atomic_write_json(layout.done_marker(task), {
            "task": task, "attempt": _previous_attempt(layout.done_marker(task),
                                                       layout.result(task)) + 1,
            "host": socket.gethostname(), "started_at": utc_now(),
            "finished_at": utc_now(), "exit_code": TaskExit.BAD_INPUT, "aborted": why,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID")})
        raise ValueError(why)
    return run, read_manifest(layout.manifest(task))


def _connect(layout: RunLayout, run: dict[str, Any], settings: TaskSettings,
             stop: StopRequest, todo: list[dict[str, Any]],
             rucio_factory: Callable[[str | None], Any] | None,
             ) -> tuple[RucioSession | None, str | None]:
    """(the task's Rucio session, or None; why the task cannot go on, or None): the
    session, retried while the server cannot be reached, and the dataset made sure of."""
    if rucio_factory is None:
        from ..rucio.client import RucioIO

        def rucio_factory(_account: str | None) -> Any:
            return RucioIO.for_run(layout.dir, run)
    rio = None
    try:
        rio = retrying(lambda: rucio_factory(settings.account), settings, stop,
                       "connecting to Rucio")
        if settings.dataset and todo:
            dataset = settings.dataset
            done = retrying(lambda: rio.ensure_dataset(dataset, settings.rse,
                                                       settings.lifetime),
                            settings, stop, "creating the dataset")
            log(f"dataset {':'.join(dataset)}: {done}"
                + (" (its rule is left as it is; lifetime not applied)"
                   if done == "exists" and settings.lifetime else ""))
    except Exception as exc:
        return rio, str(exc)
    return rio, None


def task_index(task: int, manifest: dict[str, Any], result_path: Path) -> dict[str, Any]:
    """What ``status`` needs of the task after this attempt (every attempt's records merged),
    kept in its marker so that status reads one small file per task, not every record:
    files and bytes, done and all, the causes of the files not done and the files themselves
    (status names them), whether only a person can fix them, and the size of the results
    file it was made from (a later attempt that died after writing records makes the index
    stale: status then reads the records)."""
    from ..status import task_status

    records = list(read_result_records(result_path)) if result_path.exists() else []
    t = task_status(task, manifest, records, None, None)
    return {"files": t.files, "bytes": t.bytes, "files_done": t.files_done,
            "bytes_done": t.bytes_done, "causes": dict(sorted(t.causes.items())),
            "permanent_only": t.permanent_only, "not_done": t.not_done,
            "results_bytes": result_path.stat().st_size if result_path.exists() else 0}


def with_metadata(rio: RucioSession, s: TaskSettings, records: Iterator[dict[str, Any]],
                   meta: dict[str, dict[str, str]], stop: StopRequest,
                   state: TaskState, n: int) -> Iterator[dict[str, Any]]:
    """Set the Butler metadata (rubin_butler, rubin_sidecar) of each done file's DID before
    its record is written: a file counts as done only with its metadata, and a resubmission
    finds the file present and sets it. One request per bulk chunk (whose records arrive
    together anyway; bulk.chunk_sizes says where each ends); file by file in stock mode, so
    that each record is still written as soon as its file is done. A server that cannot
    keep such metadata (no JSON plugin) is said once; the files stay uploaded, marked
    metadata "refused". ``n``: the files the bulk path takes; records after them (packed
    files, whose archive's metadata the packed path sets) pass at once."""
    from itertools import accumulate

    from .bulk import chunk_sizes

    # the bulk path yields one record per file, chunk after chunk: flush at its chunks' ends
    ends = set(accumulate(chunk_sizes(n, s.chunk_size))) if s.mode == "bulk" else None
    pending: list[dict[str, Any]] = []

    def flush() -> Iterator[dict[str, Any]]:
        done = [r for r in pending if r["status"] in DONE_STATES and r["name"] in meta]
        set_metadata(rio, s, done, meta, stop, state)
        yield from pending
        pending.clear()

    for seen, rec in enumerate(records, 1):
        pending.append(rec)
        if ends is None or seen in ends or seen > n or stop.reason:   # > n: packed files
            yield from flush()
    yield from flush()


def _bulk(rio: RucioSession, s: TaskSettings, todo: list[dict[str, Any]], stop: StopRequest,
          state: TaskState) -> Iterator[dict[str, Any]]:
    """[upload] mode = "bulk": chunks, bulk requests, concurrent copies (upload/bulk.py)."""
    from .bulk import bulk_records

    def abort(reason: str) -> None:
        state.aborted = reason

    yield from bulk_records(rio, s, todo, stop, abort, lambda: state.aborted,
                            state.copies)


def _packed(rio: RucioSession, s: TaskSettings, files: list[dict[str, Any]],
            archives: list[dict[str, Any]], todo: list[dict[str, Any]], stop: StopRequest,
            state: TaskState) -> tuple[Iterator[dict[str, Any]], int]:
    """[packing]: the files that are in no archive through the bulk path, then the
    archives (upload/packed.py); and how many files the bulk path takes (where its chunks,
    and so the metadata requests, end)."""
    from itertools import chain

    from .packed import packed_records

    packed = {files[i]["name"] for a in archives for i in a["members"]}
    loose = [e for e in todo if e["name"] not in packed]
    return chain(_bulk(rio, s, loose, stop, state) if loose else iter(()),
                 packed_records(rio, s, files, archives, {e["name"] for e in todo}, stop,
                                state)), len(loose)


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
