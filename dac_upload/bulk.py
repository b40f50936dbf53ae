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
from concurrent.futures import ThreadPoolExecutor
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
    the task (the rest become not_attempted, cause aborted)."""
    from .rucio_io import RucioFatal

    storage = None
    with ThreadPoolExecutor(max_workers=s.transfers, thread_name_prefix="copy") as pool:
        for chunk in chunks(todo, s.chunk_size):
            if aborted() or stop.reason:
                yield from (not_attempted(s, e, aborted() or stop.reason or "",
                                          "aborted" if aborted() else "stopped")
                            for e in chunk)
                continue
            try:
                if storage is None:
                    storage = retrying(lambda: rio.storage(s.rse, s.rename), s, stop,
                                       f"reading RSE {s.rse}")
                yield from process_chunk(rio, storage, s, chunk, stop, pool)
            except (RucioFatal, TaskAborted) as exc:
                abort(str(exc))
                yield from (not_attempted(s, e, str(exc), "aborted") for e in chunk)
            except Exception as exc:   # a bug: stop, say why once (as the stock path does)
                abort(f"internal error {type(exc).__name__}: {exc}")
                yield from (not_attempted(s, e, aborted() or "", "aborted") for e in chunk)


def process_chunk(rio: Any, storage: Any, s: Settings, chunk: list[dict[str, Any]],
                  stop: StopRequest, pool: ThreadPoolExecutor) -> list[dict[str, Any]]:
    """One chunk through read -> ask -> copy -> register -> verify -> protect; the records
    in the chunk's order. Raises RucioFatal (or TaskAborted) when the task must stop."""
    from .rucio_io import RucioFileError, RucioTransient

    recs = list(pool.map(lambda e: local_record(s, e), chunk))
    pending = [r for r in recs if r["status"] is None]
    existing = retrying(lambda: rio.dids_bulk(s.scope, [r["name"] for r in pending]), s, stop,
                        "looking up names", transient_too=True)
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
        reps = retrying(lambda: rio.replicas_bulk(
            s.scope, [r["name"] for r in maybe_present], s.rse), s, stop, "listing replicas",
            transient_too=True)
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

    new = [r for r in copied if r not in had_did]
    for r in new:
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
    return recs


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
