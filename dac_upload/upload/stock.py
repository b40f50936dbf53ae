"""[upload] mode = "stock": file by file through Rucio's UploadClient (each file looked up,
uploaded if needed, verified, with its retries); and doctor's one-file probe."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..runrecord import (
    ALREADY_PRESENT,
    FAILED,
    STOCK_VERIFIED,
    UPLOADED,
    TaskSettings,
)
from .common import (
    CopyLog,
    StopRequest,
    TaskState,
    abort_reason,
    existing_verdict,
    local_record,
    not_attempted,
    pause,
    proxy_problem,
)
from .session import RucioSession


def process_file(rio: RucioSession, s: TaskSettings, entry: dict[str, Any],
                 copies: CopyLog | None = None) -> dict[str, Any]:
    """Upload one manifest entry with Rucio's stock UploadClient ([upload] mode = "stock");
    return its result record (never raises RucioFileError). The file's GUID is ours: the
    DID's GUID then says which upload registered it, so that two runs writing the same
    name at once never both say "uploaded". A task stopped (credentials refused, server
    gone) once the upload has begun gets a record saying the file may be in Rucio, under
    "_fatal" the exception that stops the task."""
    from ..rucio.errors import RucioFileError, RucioTransient

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
        from ..rucio.errors import StorageFull

        if not begun or isinstance(exc, StorageFull):   # a full storage registered nothing
            raise
        rec.update(cause="interrupted", error=(
            f"the task stopped while uploading this file ({exc}): Rucio may hold it, "
            "registered; a resubmission checks and finishes it"))
        rec["_fatal"] = exc
    return rec


def _protect_present(rio: RucioSession, s: TaskSettings, name: str) -> None:
    """A file found in Rucio: attached to the dataset (an earlier run may have uploaded it
    outside it), or given a rule (a crash between replica and rule must not leave it
    unprotected)."""
    if s.dataset:
        rio.attach(s.dataset, s.scope, name)
    else:
        rio.ensure_rule(s.scope, name, s.rse, s.lifetime)


def _settled_elsewhere(rio: RucioSession, s: TaskSettings, entry: dict[str, Any],
                       rec: dict[str, Any], guid: str, error: str) -> dict[str, Any] | None:
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


def probe_record(rio: RucioSession, job: Any, creds: Any, path: Path, name: str,
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


def stock_records(rio: RucioSession, s: TaskSettings, todo: list[dict[str, Any]], stop: StopRequest,
                   state: TaskState) -> Iterator[dict[str, Any]]:
    """[upload] mode = "stock": file by file through Rucio's UploadClient."""
    for entry in todo:
        if not state.aborted and (expired := proxy_problem(s)):
            state.aborted = expired
        if state.aborted:
            yield not_attempted(s, entry, state.aborted, "aborted")
        elif stop.reason:
            yield not_attempted(s, entry, stop.reason, "stopped")
        else:
            try:
                rec = _with_retries(rio, s, entry, stop, state.copies)
            except Exception as exc:  # RucioFatal, or a bug: stop, say why once
                state.aborted = abort_reason(exc)
                rec = not_attempted(s, entry, state.aborted, "aborted")
            else:
                fatal = rec.pop("_fatal", None)
                if fatal is not None:   # stopped half-way through this file: it says so
                    state.aborted = abort_reason(fatal)
                elif rec.get("cause") == "transient":
                    # failed through every retry: the next file would fail the same way.
                    # UploadClient's errors do not say which side failed (gfal2's come
                    # wrapped in ServiceUnavailable, as the server's do): name both.
                    state.aborted = ("the Rucio server or the RSE's storage keeps "
                                        f"failing: {rec['error']}")
            yield rec


def _with_retries(rio: RucioSession, s: TaskSettings, entry: dict[str, Any], stop: StopRequest,
                  copies: CopyLog | None = None) -> dict[str, Any]:
    """process_file, again after a pause (doubling, at most 5 min) when the server was
    unreachable or failed the request; an unreachable server after the last try aborts
    the task (raises RucioUnavailable, or returns the file's record under "_fatal" when
    its upload had begun), a failing one fails this file (cause transient)."""
    from ..rucio.errors import RucioUnavailable

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
        pause(s, stop, i, f"{s.scope}:{entry['name']}", why)
    raise AssertionError("unreachable")
