"""The fast upload path (``[upload] mode = "bulk"``): a chunk of files at a time.

Per chunk: every file is read once for adler32 and md5 (a thread pool); ONE request asks
Rucio which names exist; the new files are copied onto the RSE by Rucio's own protocol layer
(a bounded pool of concurrent copies, each verified at the destination); only then are they
registered, in ONE request, as AVAILABLE replicas with the size and checksums just verified
at the destination; then they are protected: a rule per file (requests of
rucio_io.RULES_PER_REQUEST), or ONE request attaching them to the dataset, whose rule covers
them. (Reading the replicas back once more cost a fifth of the task's time and checks
nothing the registration request does not: it is not done.) Files already in Rucio with the
same content are ``already_present``; a name in Rucio with other content is a ``conflict``,
left alone.

Crash safety: nothing is registered before its copy is verified on the RSE, so a task killed
at any point leaves at worst copies nobody registered, or replicas without a rule. The next
attempt finds both: a copy that matches is registered as it is (``repaired``), one that does
not is an unregistered leftover and is overwritten; a replica without a rule gets one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from .worker import (
    ALREADY_PRESENT,
    FAILED,
    NOT_ATTEMPTED,
    UPLOADED,
    Settings,
    StopRequest,
    existing_verdict,
    local_record,
    not_attempted,
    retrying,
)

# test-only: make the worker die between the copies and their registration (a crash)
CRASH_AFTER_COPY = "DAC_UPLOAD_TEST_CRASH_AFTER_COPY"


class TaskAborted(Exception):
    """Every further file would fail the same way (credentials, server gone, ...)."""


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def bulk_records(rio: Any, s: Settings, todo: list[dict[str, Any]], stop: StopRequest,
                 abort: Callable[[str], None], aborted: Callable[[], str | None]
                 ) -> Iterator[dict[str, Any]]:
    """Result records of ``todo`` in manifest order, chunk by chunk. ``abort(reason)`` stops
    the task (the rest become not_attempted, cause aborted).

    Every Rucio request goes through one thread (the "lane", in order; the client is not
    shared between threads). While the lane registers and protects chunk N, this thread
    checksums and copies chunk N+1, whose name lookup was queued before N's registration:
    the server and the storage work at the same time. Chunk N's records are written once
    chunk N+1's copies are done (a task killed in between finds them already_present)."""
    parts = list(chunks(todo, s.chunk_size))
    with ThreadPoolExecutor(max_workers=s.transfers, thread_name_prefix="copy") as pool, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="rucio") as lane:
        storage = None
        lookups: dict[int, Future[Any]] = {}
        back: tuple[Future[Any], list[dict[str, Any]], list[dict[str, Any]]] | None = None
        for i, chunk in enumerate(parts):
            if aborted() or stop.reason:
                if back is not None:
                    yield from _finish(back, s, abort)
                    back = None
                reason = aborted() or stop.reason or ""
                yield from (not_attempted(s, e, reason, "aborted" if aborted() else "stopped")
                            for e in chunk)
                continue
            try:
                if storage is None:
                    storage = lane.submit(retrying, lambda: rio.storage(s.rse, s.rename), s,
                                          stop, f"reading RSE {s.rse}").result()
                if i not in lookups:
                    lookups[i] = _lookup(lane, rio, s, chunk, stop)
                front = _front(rio, storage, s, chunk, stop, pool, lane, lookups.pop(i))
                if i + 1 < len(parts):        # the next chunk's lookup goes ahead of our
                    lookups[i + 1] = _lookup(lane, rio, s, parts[i + 1], stop)   # registration
                fut = lane.submit(_back, rio, s, *front[1:], stop)
            except Exception as exc:
                if back is not None:
                    yield from _finish(back, s, abort)
                    back = None
                abort(_why(exc))
                yield from (not_attempted(s, e, aborted() or "", "aborted") for e in chunk)
                continue
            if back is not None:
                yield from _finish(back, s, abort)
            back = (fut, front[0], chunk)
        if back is not None:
            yield from _finish(back, s, abort)


def _why(exc: BaseException) -> str:
    from .rucio_io import RucioFatal

    if isinstance(exc, (RucioFatal, TaskAborted)):
        return str(exc)
    return f"internal error {type(exc).__name__}: {exc}"   # a bug: stop, say why once


def _finish(back: tuple[Future[Any], list[dict[str, Any]], list[dict[str, Any]]],
            s: Settings, abort: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """The records of a chunk whose registration ran in the lane."""
    fut, recs, chunk = back
    try:
        fut.result()
    except Exception as exc:      # registration failed for good: the copies stay unregistered
        abort(_why(exc))          # (the next attempt finds them), the chunk is not done
        yield from (not_attempted(s, e, _why(exc), "aborted") for e in chunk)
        return
    yield from recs


def _lookup(lane: ThreadPoolExecutor, rio: Any, s: Settings, chunk: list[dict[str, Any]],
            stop: StopRequest) -> Future[Any]:
    names = [e["name"] for e in chunk]
    return lane.submit(retrying, lambda: rio.dids_bulk(s.scope, names), s, stop,
                       "looking up names", True)


def _front(rio: Any, storage: Any, s: Settings, chunk: list[dict[str, Any]],
           stop: StopRequest, pool: ThreadPoolExecutor, lane: ThreadPoolExecutor,
           lookup: Future[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                          list[dict[str, Any]], list[dict[str, Any]]]:
    """Read, ask, copy: (records of the chunk, copied, present, had_did)."""
    recs = list(pool.map(lambda e: local_record(s, e), chunk))
    pending = [r for r in recs if r["status"] is None]
    existing = lookup.result()
    maybe_present, to_copy = [], []
    for r in pending:
        did = existing.get(r["name"])
        if did is None:
            to_copy.append(r)
        elif existing_verdict(r["bytes"], r["adler32"], did.bytes, did.adler32) == "conflict":
            r.update(status=FAILED, cause="conflict", error=(
                f"conflict: {s.scope}:{r['name']} is already in Rucio with other content "
                f"(bytes {did.bytes}, adler32 {did.adler32}); left alone, rename or remove "
                "one of them"))
        else:
            r["guid"] = did.guid
            maybe_present.append(r)
    present, had_did = [], []
    if maybe_present:
        names = [r["name"] for r in maybe_present]
        reps = lane.submit(retrying, lambda: rio.replicas_bulk(s.scope, names, s.rse), s, stop,
                           "listing replicas", True).result()
        for r in maybe_present:
            rep = reps.get(r["name"])
            if rep is not None and rep.state == "AVAILABLE":
                r.update(status=ALREADY_PRESENT, pfn=rep.pfn)
                present.append(r)
            else:               # the name exists (elsewhere): add our copy as a replica
                had_did.append(r)
                to_copy.append(r)
    copied = _copy_all(storage, s, to_copy, stop, pool)
    if os.environ.get(CRASH_AFTER_COPY) and copied:
        os._exit(137)        # test hook: as if killed after the copies, before registering
    return recs, copied, present, had_did


def _back(rio: Any, s: Settings, copied: list[dict[str, Any]], present: list[dict[str, Any]],
          had_did: list[dict[str, Any]], stop: StopRequest) -> None:
    """Register, then protect (in the lane). Raises RucioFatal / TaskAborted to stop."""
    from .rucio_io import RucioFileError, RucioTransient

    for r in copied:
        if r not in had_did:
            r["guid"] = uuid.uuid4().hex
    try:
        retrying(lambda: rio.add_replicas(s.rse, s.scope, _replica_rows(copied)), s, stop,
                 "registering replicas", transient_too=True)
    except RucioFileError:   # one of them refused (a name registered meanwhile): one by one
        for r in list(copied):
            try:
                rio.add_replicas(s.rse, s.scope, _replica_rows([r]))
            except RucioTransient as exc:
                raise TaskAborted(f"the Rucio server keeps failing: {exc}") from None
            except RucioFileError as exc:
                r.update(status=FAILED, cause="rucio", error=f"copied but not registered: {exc}")
                copied.remove(r)
    registered = [r for r in copied if r["status"] is None]
    _protect(rio, s, registered, present, had_did, stop)
    for r in registered:
        if r["status"] is None:
            r["status"] = UPLOADED


def _replica_rows(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": r["name"], "bytes": r["bytes"], "adler32": r["adler32"], "md5": r["md5"],
             "pfn": r["pfn"], "guid": r["guid"]} for r in recs]


def _copy_all(storage: Any, s: Settings, recs: list[dict[str, Any]], stop: StopRequest,
              pool: ThreadPoolExecutor) -> list[dict[str, Any]]:
    """Copy concurrently; the records whose copy is verified on the RSE (pfn set)."""
    from .rucio_io import RucioFatal, RucioFileError, RucioTransient

    def one(r: dict[str, Any]) -> dict[str, Any]:
        if stop.reason:
            r.update(status=NOT_ATTEMPTED, cause="stopped",
                     error=f"task stopped before this file: {stop.reason}")
            return r
        try:
            r["pfn"], how = storage.put(s.root / r["relpath"], s.scope, r["name"], r["bytes"],
                                        r["adler32"])
            if how != "copied":
                r["note"] = ("registered the verified copy an earlier attempt left on the RSE"
                             if how == "found" else
                             "replaced an unregistered copy with other content on the RSE")
        except RucioFatal:
            raise
        except RucioTransient as exc:
            r.update(status=FAILED, cause="transient", error=str(exc))
        except RucioFileError as exc:
            cause = "verify" if "does not match" in str(exc) else "rucio"
            r.update(status=FAILED, cause=cause, error=str(exc))
        return r

    done = list(pool.map(one, recs))
    return [r for r in done if r["status"] is None]


def _protect(rio: Any, s: Settings, registered: list[dict[str, Any]],
             present: list[dict[str, Any]], had_did: list[dict[str, Any]],
             stop: StopRequest) -> None:
    """A dataset's rule covers what is attached to it; otherwise each file gets a rule on
    the RSE (in bulk; file by file only for names that may have one already)."""
    from .rucio_io import RucioFileError

    new = [r for r in registered if r not in had_did]
    older = present + [r for r in registered if r in had_did]
    try:
        if s.dataset:
            names = [r["name"] for r in new + older]
            if not retrying(lambda: rio.attach_bulk(s.dataset, s.scope, names), s, stop,
                            "attaching to the dataset", transient_too=True):
                for r in new + older:
                    rio.attach(s.dataset, s.scope, r["name"])
            return
        retrying(lambda: rio.add_rules(s.scope, [r["name"] for r in new], s.rse, s.lifetime),
                 s, stop, "adding rules", transient_too=True)
        if older and not retrying(lambda: rio.add_rules(
                s.scope, [r["name"] for r in older], s.rse, s.lifetime), s, stop,
                "adding rules", transient_too=True):
            for r in older:          # a crash between replica and rule must not leave it bare
                rio.ensure_rule(s.scope, r["name"], s.rse, s.lifetime)
    except RucioFileError as exc:
        for r in new + older:
            r.update(status=FAILED, cause="rucio", error=(
                f"registered but not protected ({exc}); a resubmission adds the rule"))
