"""The packed path ([packing]): each planned archive of the task is built in scratch space,
uploaded through the bulk path like any file (copied, verified on the RSE, registered,
protected by a rule or its dataset's rule), and only then its members are registered as
its constituents in Rucio, with their own size and checksums: each member stays a DID of
its own that Rucio resolves through the archive (``rucio download scope:name`` extracts it).

Per archive: the bulk path's 4-6 requests for the archive, then per 1,000 members (the most
Rucio takes in one request) one looking up their names and one registering them: about
0.002 requests per file.

The members get no rule of their own (the archive's covers them; Rucio would turn a rule on
a member into one on the archive) and are never attached to the job's dataset (the archive
is: a dataset rule over constituents stays REPLICATING for good). A member name that Rucio
already holds with the same size and adler32 (a resubmission, or the same file uploaded on
its own before) is registered again without harm (ignore_duplicate); one with other content
is a conflict, left alone, the rest of the archive registered.

An archive is built from every one of its members, including those an earlier attempt
finished: the same files give the same bytes, so the earlier attempt's copy or replica is
found to be the same one. A member that changed, vanished or cannot be read stops its
archive (nothing of it is uploaded or registered): that file gets its cause, the others
``archive``; a scratch directory that fills up or cannot be written fails the archive with
cause ``scratch``, and the task goes on with the next.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..packing import BUTLER_INDEX
from ..runrecord import ALREADY_PRESENT, DONE_STATES, FAILED, UPLOADED, TaskSettings
from .archive import (
    BuiltArchive,
    MemberChanged,
    MemberUnreadable,
    ScratchFull,
    ScratchUnusable,
    build_archive,
    discard,
)
from .common import (
    StopRequest,
    TaskState,
    abort_reason,
    changed_error,
    existing_verdict,
    not_attempted,
    retrying,
    set_metadata,
)
from .session import RucioSession

Record = dict[str, Any]


def scratch_dir(s: TaskSettings) -> Path:
    """Where archives are built: [packing] scratch, else $TMPDIR (Slurm sites point it at
    the node's local disk), else the system's temporary directory."""
    return s.scratch or Path(os.environ.get("TMPDIR") or tempfile.gettempdir())


def packed_records(rio: RucioSession, s: TaskSettings, files: Sequence[Record],
                   archives: Sequence[dict[str, Any]], todo: set[str], stop: StopRequest,
                   state: TaskState) -> Iterator[Record]:
    """The records of the members still to do (names in ``todo``) of the manifest's
    ``archives`` (member positions into ``files``), archive after archive."""
    from .bulk import bulk_records

    work = [a for a in archives if any(files[i]["name"] in todo for i in a["members"])]
    if not work:
        return
    base = scratch_dir(s)
    try:
        here = Path(tempfile.mkdtemp(prefix="dac-upload-pack-", dir=base))
    except OSError as exc:
        why = f"cannot use the scratch directory {base} ([packing] scratch): {exc.strerror}"
        for a in work:
            yield from (_failed(s, files[i], "scratch", why) for i in a["members"]
                        if files[i]["name"] in todo)
        return
    try:
        for a in work:
            members = [files[i] for i in a["members"]]
            mine = [m for m in members if m["name"] in todo]
            reason = state.aborted or stop.reason
            if reason:
                cause = "aborted" if state.aborted else "stopped"
                yield from (not_attempted(s, m, reason, cause) for m in mine)
                continue
            index = a.get("index")   # a Butler zip's, written by the planner
            try:
                built = build_archive(s.root, members, here / Path(a["name"]).name, s.md5,
                                      (BUTLER_INDEX, index.encode()) if index else None)
            except (MemberChanged, MemberUnreadable) as exc:
                yield from _unbuildable(s, a["name"], mine, exc)
                continue
            except ScratchFull as exc:
                yield from (_failed(s, m, "scratch", f"{exc}; free space there or set "
                                    "[packing] scratch, then resubmit") for m in mine)
                continue
            except ScratchUnusable as exc:
                yield from (_failed(s, m, "scratch", f"{exc}; set [packing] scratch to a "
                                    "directory that works, then resubmit") for m in mine)
                continue
            entry = {"relpath": built.path.name, "name": a["name"], "size": built.bytes,
                     "mtime": built.mtime, "adler32": built.adler32,
                     "md5": built.md5}   # checksummed as written: not read again
            try:
                rec = next(iter(bulk_records(
                    rio, replace(s, root=here), [entry], stop,
                    lambda why: setattr(state, "aborted", why), lambda: state.aborted,
                    state.copies)))
            finally:
                discard(built.path)
            if a.get("meta") and rec["status"] in DONE_STATES:   # Rubin's zip_file
                set_metadata(rio, s, [rec], {a["name"]: a["meta"]}, stop, state)
            for r in _members(rio, s, a["name"], rec, built, mine, stop, state):
                if r["status"] not in DONE_STATES:   # as a loose file's: done files only
                    r["metadata"] = None
                yield r
    finally:
        shutil.rmtree(here, ignore_errors=True)


def _members(rio: RucioSession, s: TaskSettings, archive: str, rec: Record,
             built: BuiltArchive, mine: list[Record], stop: StopRequest,
             state: TaskState) -> Iterator[Record]:
    """The members' records once the archive's own upload is decided: registered as its
    constituents if the archive is done, else failed or not attempted as the archive."""
    from ..rucio.errors import RucioFileError

    by_name = {m.name: m for m in built.members}
    out = [_member_record(s, e, by_name[e["name"]], archive, rec) for e in mine]
    if rec["status"] not in DONE_STATES:
        for r in out:
            r.update(status=rec["status"], cause=rec["cause"], pfn=None, verified=None,
                     error=f"its archive {s.scope}:{archive} is not done: {rec['error']}")
        yield from out
        return
    names = [r["name"] for r in out]
    try:
        known = retrying(lambda: rio.dids_bulk(s.scope, names), s, stop,
                         "looking up the archive's members", transient_too=True)
    except Exception as exc:
        yield from _interrupted(out, archive, exc, state)
        return
    attach = []
    for r in out:
        did = known.get(r["name"])
        if did is not None and existing_verdict(r["bytes"], r["adler32"], did.bytes,
                                                did.adler32) == "conflict":
            r.update(status=FAILED, cause="conflict", pfn=None, verified=None, error=(
                f"conflict: {s.scope}:{r['name']} is already in Rucio with other content "
                f"(bytes {did.bytes}, adler32 {did.adler32}); left alone (its bytes are in "
                f"the archive {archive}, not registered as its content): rename or remove "
                "one of them"))
            continue
        if did is not None and rec["status"] == UPLOADED:
            r.update(status=ALREADY_PRESENT, verified=None, note=(
                "already in Rucio with these bytes; registered as a member of the archive "
                "too"))
        attach.append(r)
    try:
        retrying(lambda: rio.add_to_archive(s.scope, archive, attach), s, stop,
                 "registering the archive's members", transient_too=True)
    except RucioFileError as exc:
        for r in attach:
            r.update(status=FAILED, cause="rucio", pfn=None, verified=None, error=(
                f"its archive {s.scope}:{archive} is uploaded, but registering this file "
                f"as its member failed ({exc}); a resubmission registers it"))
    except Exception as exc:
        yield from _interrupted(out, archive, exc, state)
        return
    yield from out


def _member_record(s: TaskSettings, entry: Record, member: Any, archive: str,
                   rec: Record) -> Record:
    return {"relpath": entry["relpath"], "path": str(s.root / entry["relpath"]),
            "scope": s.scope, "name": entry["name"], "rse": s.rse, "bytes": member.bytes,
            "adler32": member.adler32, "md5": member.md5, "pfn": rec.get("pfn"),
            "guid": None, "status": rec["status"], "cause": None, "error": None,
            "verified": rec.get("verified"), "archive": archive,
            "metadata": rec.get("metadata")}


def _interrupted(out: list[Record], archive: str, exc: BaseException,
                 state: TaskState) -> Iterator[Record]:
    """The archive is uploaded but the server went away before its members were
    registered: the task stops; a resubmission finds the archive and registers them."""
    state.aborted = state.aborted or abort_reason(exc)
    for r in out:
        if r["status"] in DONE_STATES:
            r.update(status=FAILED, cause="interrupted", pfn=None, verified=None, error=(
                f"its archive {archive} is uploaded; the task stopped before this file was "
                f"registered as its member ({state.aborted}); a resubmission does it"))
    yield from out


def _unbuildable(s: TaskSettings, archive: str, mine: list[Record],
                 exc: MemberChanged | MemberUnreadable) -> Iterator[Record]:
    if isinstance(exc, MemberChanged):
        culprit_cause, culprit_error, what = "changed", changed_error(exc.what), "changed"
    else:
        culprit_cause, culprit_error, what = exc.cause, exc.why, exc.cause
    for m in mine:
        if m["relpath"] == exc.relpath:
            yield _failed(s, m, culprit_cause, culprit_error)
        else:
            yield _failed(s, m, "archive", (
                f"not uploaded: packed into {s.scope}:{archive} with {exc.relpath}, which is "
                f"{what}; nothing of the archive was uploaded"))


def _failed(s: TaskSettings, entry: Record, cause: str, error: str) -> Record:
    rec = not_attempted(s, entry, "", cause)
    rec.update(status=FAILED, error=error)
    return rec
