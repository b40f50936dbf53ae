"""The fast upload path (``[upload] mode = "bulk"``): a chunk of files at a time.

Per chunk: every file is read once for adler32 and md5 (a thread pool); ONE request asks
Rucio which names exist; the new files are copied onto the RSE by Rucio's own protocol layer
(a bounded pool of concurrent copies, each verified at the destination); only then are they
registered, in ONE request, as AVAILABLE replicas; ONE request reads them back (Rucio 41's
registration skips a replica that already exists, in any state, without saying so: only the
read-back shows that what is registered is ours); then they are protected: a rule per file
(requests of rucio.client.RULES_PER_REQUEST), or ONE request attaching them to the dataset,
whose rule covers them. Files already in Rucio with the same content are
``already_present``; a name in Rucio with other content is a ``conflict``, left alone; a
name with a replica on this RSE that is not AVAILABLE is left alone too.

Crash safety: nothing is registered before its copy is verified on the RSE, so a task killed
at any point leaves at worst copies nobody registered, or replicas without a rule. The next
attempt finds both: a copy that matches is registered as it is, one that does not is
overwritten only after Rucio says, in that moment, that no replica of the name is on the
RSE; a replica without a rule gets one.

Records: each file's record says how far it got. A chunk whose registration or protection
fails for good keeps what was decided before (conflicts, changed files, ...); its registered
files are ``failed`` (registered but not protected: a resubmission protects them), the
others ``not_attempted``.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from ..runrecord import ALREADY_PRESENT, FAILED, NOT_ATTEMPTED, UPLOADED, TaskSettings
from .common import (
    CopyLog,
    StopRequest,
    existing_verdict,
    local_record,
    not_attempted,
    proxy_problem,
    retrying,
)
from .session import CopyTarget, RucioSession

Record = dict[str, Any]
# how far a record got, kept on it while its chunk is under way (removed before writing):
# its registration request sent, its replica read back as ours, its rule or attachment
# confirmed; and whether that rule or attachment was found made by another upload
_SENT, _REGISTERED, _PROTECTED, _BY_OTHER = "_sent", "_registered", "_protected", "_by_other"


class TaskAborted(Exception):
    """Every further file would fail the same way (credentials, server gone, ...)."""


RAMP_FROM = 100   # chunk sizes at least this big ramp up at the start and down at the end


def chunk_sizes(n: int, size: int) -> list[int]:
    """How many of ``n`` files go into each chunk: at most ``size``, but the first and the
    last chunks grow from size/10, doubling (50, 100, 200, ... for 500), and the middle
    ones share the rest evenly (none smaller than the ramp's last step). The first chunk's
    reading and copying has no server work to overlap, and the last chunk's registration no
    reading: small end chunks shorten both. Each chunk costs 3-4 requests: a task of 500
    files makes five chunks, 0.04 requests per file (pure)."""
    if size < RAMP_FROM:
        return [min(size, n - i) for i in range(0, n, size)]
    ramp: list[int] = []
    left = n
    step = size // 10
    while step < size and left >= 2 * step:
        ramp.append(step)
        left -= 2 * step
        step *= 2
    while ramp and 0 < left < ramp[-1]:   # no middle chunk smaller than the ramp's last
        left += 2 * ramp.pop()
    parts = -(-left // size)
    middle = [left // parts + (i < left % parts) for i in range(parts)] if parts else []
    return ramp + middle + ramp[::-1]


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    start = 0
    for count in chunk_sizes(len(items), size):
        yield items[start:start + count]
        start += count


def bulk_records(rio: RucioSession, s: TaskSettings, todo: list[Record], stop: StopRequest,
                 abort: Callable[[str], None], aborted: Callable[[], str | None],
                 copies: CopyLog | None = None) -> Iterator[Record]:
    """Result records of ``todo`` in manifest order, chunk by chunk. ``abort(reason)`` stops
    the task (the rest become not_attempted, cause aborted).

    Every Rucio request goes through one thread (the "lane", in order; the client is never
    used by two threads). While the lane registers and protects chunk N, this thread
    checksums and copies chunk N+1, whose name lookup was queued before N's registration:
    the server and the storage work at the same time. Chunk N's records are written once
    chunk N+1's copies are done (a task killed in between finds them already_present); after
    a stop signal the next chunk is not read, so they are written at once.

    ``copies`` (the task's copies.jsonl) gets the names of a chunk before they are copied;
    what an earlier attempt listed there is this task's own (see _copier)."""
    copies = copies or CopyLog(None, 0)
    parts = list(chunks(todo, s.chunk_size))
    with ThreadPoolExecutor(max_workers=s.transfers, thread_name_prefix="copy") as pool, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="rucio") as lane:
        storage = None
        lookups: dict[int, Future[Any]] = {}
        back: tuple[Future[Any], list[Record]] | None = None
        for i, chunk in enumerate(parts):
            if aborted() or stop.reason:
                if back is not None:
                    yield from _finish(back, s, abort, stop)
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
                recs, copied, present = _front(rio, storage, s, chunk, stop, pool, lane,
                                               lookups.pop(i), copies)
                if i + 1 < len(parts) and not stop.reason:   # the next chunk's lookup goes
                    lookups[i + 1] = _lookup(lane, rio, s, parts[i + 1], stop)   # ahead
                fut = lane.submit(_back, rio, s, copied, present, stop, storage)
            except Exception as exc:
                if back is not None:
                    yield from _finish(back, s, abort, stop)
                    back = None
                reason, cause = _ended(exc, stop, abort)
                yield from (not_attempted(s, e, reason, cause) for e in chunk)
                continue
            if back is not None:
                yield from _finish(back, s, abort, stop)
            back = (fut, recs)
        if back is not None:
            yield from _finish(back, s, abort, stop)


def _ended(exc: BaseException, stop: StopRequest, abort: Callable[[str], None]
           ) -> tuple[str, str]:
    """(reason, cause) for files a failed step leaves undone: stopped when a stop signal
    came meanwhile (Slurm's warning during a retry), else the task is aborted."""
    from ..rucio.errors import RucioFatal

    if stop.reason:
        return stop.reason, "stopped"
    if isinstance(exc, (RucioFatal, TaskAborted)):
        reason = str(exc)
    else:
        reason = f"internal error {type(exc).__name__}: {exc}"   # a bug: say why once
    abort(reason)
    return reason, "aborted"


def _finish(back: tuple[Future[Any], list[Record]], s: TaskSettings,
            abort: Callable[[str], None], stop: StopRequest) -> Iterator[Record]:
    """The records of a chunk whose registration ran in the lane, each as far as it got."""
    fut, recs = back
    try:
        fut.result()
    except Exception as exc:
        reason, cause = _ended(exc, stop, abort)
        for r in recs:
            if r.get(_REGISTERED) and not r.get(_PROTECTED):
                r.update(status=FAILED, cause="interrupted", error=(
                    f"registered; the task stopped before its rule or dataset attachment was "
                    f"confirmed ({reason}); a resubmission makes sure"))
            elif r["status"] is None and r.get(_SENT):
                r.update(status=FAILED, cause="interrupted", error=(
                    f"copied and verified; the task stopped while registering it ({reason}):"
                    " it may be registered, without a rule; a resubmission checks and "
                    "finishes it"))
            elif r["status"] is None:
                r.update(status=NOT_ATTEMPTED, cause=cause,
                         error=f"task stopped before registering this file: {reason}")
            elif r["status"] == ALREADY_PRESENT and not r.get(_PROTECTED):
                r.update(status=FAILED, cause="rucio", error=(
                    f"already present, but its rule or dataset attachment was not checked "
                    f"({reason}); a resubmission does it"))
    for r in recs:
        for key in (_REGISTERED, _PROTECTED, _SENT, _BY_OTHER, "had_did"):
            r.pop(key, None)
    yield from recs


def _lookup(lane: ThreadPoolExecutor, rio: RucioSession, s: TaskSettings, chunk: list[Record],
            stop: StopRequest) -> Future[Any]:
    names = [e["name"] for e in chunk]
    return lane.submit(retrying, lambda: rio.dids_bulk(s.scope, names), s, stop,
                       "looking up names", True)


def _front(rio: RucioSession, storage: CopyTarget, s: TaskSettings, chunk: list[Record],
           stop: StopRequest, pool: ThreadPoolExecutor, lane: ThreadPoolExecutor,
           lookup: Future[Any], copies: CopyLog) -> tuple[list[Record], list[Record], list[Record]]:
    """Read, ask, copy: (records of the chunk, copied, present). A file whose name Rucio
    does not know is copied by the same thread right after its checksums, so reading one
    file and copying another overlap; the others wait for the whole chunk. The names to
    copy are written to copies.jsonl first (one fsync for the chunk)."""
    def no_replica_here(name: str) -> bool:
        """Asked (in the lane, at that moment) before a copy at the name's PFN that is not
        ours to register is overwritten: only an unregistered one may be."""
        reps = lane.submit(retrying, lambda: rio.replicas_bulk(s.scope, [name], s.rse), s,
                           stop, "listing replicas", True).result()
        return name not in reps

    copy_one = _copier(storage, s, stop, no_replica_here, copies.earlier,
                       copies.earlier_temps)
    known = lookup.result()
    temp = getattr(storage, "temp_token", None)
    copies.started([e["name"] for e in chunk if e["name"] not in known], temp)

    def local_then_copy(e: Record) -> tuple[Record, bool]:
        if stop.reason:                  # a stop signal: do not read the rest of the chunk
            return not_attempted(s, e, stop.reason, "stopped"), False
        r = local_record(s, e)
        if r["status"] is None and e["name"] not in known:
            return copy_one(r), True
        return r, False

    done = list(pool.map(local_then_copy, chunk))
    recs = [r for r, _ in done]
    copied = [r for r, tried in done if tried and r["status"] is None]
    pending = [r for r, tried in done if not tried and r["status"] is None]
    existing = known if pending else {}
    maybe_present, to_copy = [], []
    for r in pending:
        did = existing[r["name"]]
        if existing_verdict(r["bytes"], r["adler32"], did.bytes, did.adler32) == "conflict":
            r.update(status=FAILED, cause="conflict", error=(
                f"conflict: {s.scope}:{r['name']} is already in Rucio with other content "
                f"(bytes {did.bytes}, adler32 {did.adler32}); left alone, rename or remove "
                "one of them"))
        else:
            r["guid"] = did.guid
            maybe_present.append(r)
    present = []
    if maybe_present:
        names = [r["name"] for r in maybe_present]
        reps = lane.submit(retrying, lambda: rio.replicas_bulk(s.scope, names, s.rse), s, stop,
                           "listing replicas", True).result()
        for r in maybe_present:
            rep = reps.get(r["name"])
            if rep is None:              # the name exists elsewhere: add our copy here
                r["had_did"] = True
                to_copy.append(r)
            elif rep.state == "AVAILABLE":
                r.update(status=ALREADY_PRESENT, pfn=rep.pfn)
                if r["name"] in copies.earlier:   # an earlier attempt got this far, then died
                    r.update(verified=storage.verification, note=(
                        "uploaded by an earlier attempt of this task, which stopped before "
                        "recording it"))
                    r["_earlier"] = True
                present.append(r)
            else:                        # Rucio knows a replica here: never touch its bytes
                r.update(status=FAILED, cause="rucio", error=(
                    f"a replica of {s.scope}:{r['name']} on {s.rse} is {rep.state}, not "
                    "AVAILABLE: left alone, not overwritten; resubmit once Rucio has settled "
                    "it, or ask the RSE's admins"))

    copies.started([r["name"] for r in to_copy], temp)
    copied += [r for r in pool.map(copy_one, to_copy) if r["status"] is None]
    present += _registered_meanwhile(rio, s, stop, lane, [
        r for r, tried in done if tried and r["status"] == FAILED
        and r.get("cause") in _COPY_CAUSES] + [r for r in to_copy if r["status"] == FAILED
                                               and r.get("cause") in _COPY_CAUSES], storage)
    return recs, copied, present


_COPY_CAUSES = ("rucio", "verify", "transient")


def _registered_meanwhile(rio: RucioSession, s: TaskSettings, stop: StopRequest,
                          lane: ThreadPoolExecutor, failed: list[Record],
                          storage: CopyTarget) -> list[Record]:
    """Files whose copy failed, asked again (two requests for all of them): one that is
    AVAILABLE on the RSE by now with our bytes was uploaded meanwhile by someone else (a
    second run writing the same names, whose rewrite of the copy made ours fail): it is
    already_present, not failed. Returns those (to be protected like any present file).

    The other writer registers once its copy is verified, which on a busy server can take
    longer than one retry_wait: after the second look, a file is looked for again (waits
    doubling from retry_wait, [rucio] retries + 1 looks in all) only while that writer is
    seen at work: the copy reached the storage (not a transient failure) and the name's PFN
    holds our bytes now, the name not registered with other ones. Any other failed copy is
    reported after two looks, as before."""
    out: list[Record] = []
    looks = max(2, s.retries + 1)
    for look in range(looks):
        if not failed or stop.reason:
            break
        if look:
            stop.sleep(s.retry_wait * 2 ** (look - 1))
        asked = [r["name"] for r in failed]
        dids = lane.submit(retrying, lambda n=asked: rio.dids_bulk(s.scope, n), s, stop,
                           "looking up names", True).result()
        same = [r for r in failed if r["name"] in dids and existing_verdict(
            r["bytes"], r["adler32"], dids[r["name"]].bytes, dids[r["name"]].adler32) == "same"]
        found = [r["name"] for r in same]
        same_names = set(found)
        reps = lane.submit(retrying, lambda n=found: rio.replicas_bulk(s.scope, n, s.rse), s,
                           stop, "listing replicas", True).result() if same else {}
        for r in same:
            rep = reps.get(r["name"])
            if rep is not None and rep.state == "AVAILABLE":
                r.update(status=ALREADY_PRESENT, cause=None, pfn=rep.pfn, verified=None,
                         guid=dids[r["name"]].guid, note=(
                             f"this run's copy failed ({r['error']}), but another upload "
                             "registered the name meanwhile with these bytes"), error=None)
                out.append(r)
        failed = [r for r in failed if r["status"] == FAILED]
        if 1 <= look < looks - 1:   # looked at twice: only files someone is seen uploading
            failed = [r for r in failed if r.get("cause") != "transient"
                      and (r["name"] not in dids or r["name"] in same_names)
                      and storage.holds(s.scope, r["name"], r["bytes"], r["adler32"])]
    return out


def _back(rio: RucioSession, s: TaskSettings, copied: list[Record], present: list[Record],
          stop: StopRequest, storage: CopyTarget | None = None) -> None:
    """Register, read back, then protect (in the lane). Raises RucioFatal / TaskAborted to
    stop; each record says how far it got.

    Which upload of a name counts is decided by its protection: Rucio registers a replica
    that exists already without a word, but refuses a second rule of an account on an RSE
    (DuplicateRule) and a second attachment to a dataset. A file whose rule or attachment
    another upload made first (a second run writing the same names) is already_present,
    never uploaded by both."""
    from ..rucio.errors import RucioFileError, RucioTransient

    if s.guid:   # the server sets it DID by DID: about 40 % of its registration time
        for r in copied:
            if not r.get("had_did"):
                r["guid"] = uuid.uuid4().hex
    for r in copied:
        r[_SENT] = True
    try:
        retrying(lambda: rio.add_replicas(s.rse, s.scope, _replica_rows(copied)), s, stop,
                 "registering replicas", transient_too=True)
    except RucioFileError:   # one of them refused: one by one
        for r in copied:
            try:
                rio.add_replicas(s.rse, s.scope, _replica_rows([r]))
            except RucioTransient as exc:
                raise TaskAborted(f"the Rucio server keeps failing: {exc}") from None
            except RucioFileError as exc:
                r.update(status=FAILED, cause="rucio", error=f"copied but not registered: {exc}")
    copied = [r for r in copied if r["status"] is None]
    names = [r["name"] for r in copied]
    reps = retrying(lambda: rio.replicas_bulk(s.scope, names, s.rse), s, stop,
                    "checking replicas", transient_too=True) if names else {}
    for r in copied:
        rep = reps.get(r["name"])
        if rep is None or rep.state != "AVAILABLE":
            r.update(status=FAILED, cause="verify", error=(
                f"registered but the replica on {s.rse} is "
                f"{rep.state if rep else 'missing'}, not AVAILABLE"))
        elif (rep.adler32 or "").lower().zfill(8) != r["adler32"] or rep.bytes != r["bytes"]:
            r.update(status=FAILED, cause="verify", error=(
                f"Rucio's replica has bytes {rep.bytes} adler32 {rep.adler32}, the file "
                f"{r['bytes']} {r['adler32']}: it is not ours (registered meanwhile by "
                "someone else?); left alone"))
        else:
            r[_REGISTERED] = True
            r["pfn"] = rep.pfn or r["pfn"]
    _protect(rio, s, [r for r in copied if r.get(_REGISTERED)], present, stop)
    for r in copied:
        if r.get(_PROTECTED) and r.get(_BY_OTHER):
            r.update(status=ALREADY_PRESENT, verified=None, note=(
                "another upload protected this name first (a second run writing the same "
                "names?): counted there, not here"))
        elif r.get(_PROTECTED):
            r["status"] = UPLOADED
    for r in present:
        if r.pop("_earlier", False) and r.get(_PROTECTED):
            r["status"] = UPLOADED


def _replica_rows(recs: list[Record]) -> list[Record]:
    return [{"name": r["name"], "bytes": r["bytes"], "adler32": r["adler32"], "md5": r["md5"],
             "pfn": r["pfn"], "guid": None if r.get("had_did") else r["guid"]} for r in recs]


def _copier(storage: CopyTarget, s: TaskSettings, stop: StopRequest,
            may_replace: Callable[[str], bool],
            own: set[str] | frozenset[str] = frozenset(),
            stale_temps: set[str] | frozenset[str] = frozenset()) -> Callable[[Record], Record]:
    """Copy one file onto the RSE (a storage that fails transiently is tried again like the
    server); its record gets the pfn once the copy is verified there, or says why not.
    ``own``: names an earlier attempt of this task began to copy (copies.jsonl): the note
    says whose a copy found at the PFN was, and that attempt's temporary copies
    (``stale_temps``, their tokens) are removed."""
    from ..rucio.errors import RucioFatal, RucioFileError, RucioTransient
    from .common import log, pause

    def one(r: Record) -> Record:
        copied_again = False
        for i in range(s.retries + 1):
            if stop.reason:
                r.update(status=NOT_ATTEMPTED, cause="stopped",
                         error=f"task stopped before this file: {stop.reason}")
                return r
            expired = proxy_problem(s)
            if expired:        # every further copy would fail, most with an opaque error
                raise RucioFatal(expired)
            try:
                r["pfn"], how = storage.put(s.root / r["relpath"], s.scope, r["name"],
                                            r["bytes"], r["adler32"],
                                            lambda: may_replace(r["name"]),
                                            stale_temps=stale_temps if r["name"] in own
                                            else ())
                r["verified"] = storage.verification
                mine = r["name"] in own
                if how == "found":
                    r["note"] = ("registered the verified copy an earlier attempt of this "
                                 "task left on the RSE" if mine else
                                 "a verified copy of these bytes that this task did not "
                                 "write was at the PFN (another upload of the name?): kept")
                elif how == "replaced":
                    r["note"] = ("replaced the unregistered copy an earlier attempt of this "
                                 "task left on the RSE (partial, or not verified)" if mine
                                 else "replaced an unregistered copy on the RSE that this "
                                 "task did not make")
                return r
            except RucioFatal:
                raise
            except RucioFileError as exc:   # RucioTransient included
                expired = proxy_problem(s)
                if expired:    # the proxy ran out during this copy: that is the cause
                    raise RucioFatal(expired) from None
                if isinstance(exc, RucioTransient) and i < s.retries:
                    pause(s, stop, i, f"copying {s.scope}:{r['name']}", str(exc))
                    continue
                mismatch = "does not match" in str(exc)
                if mismatch and not copied_again and i < s.retries:
                    # once: a copy spoilt in transit, or two uploads of the name writing
                    # it in place at once (each spoils the other's; each would fail alone).
                    # The wait is drawn at random so that the two fall out of step; the
                    # second then finds the first one's verified copy.
                    copied_again = True
                    wait = s.retry_wait * random.uniform(0.5, 1.5)
                    log(f"copying {s.scope}:{r['name']} again in {wait:.1f} s: {exc}")
                    stop.sleep(wait)
                    continue
                cause = ("transient" if isinstance(exc, RucioTransient) else
                         "verify" if mismatch else "rucio")
                r.update(status=FAILED, cause=cause, error=str(exc))
                return r
        return r

    return one


def _protect(rio: RucioSession, s: TaskSettings, registered: list[Record], present: list[Record],
             stop: StopRequest) -> None:
    """A dataset's rule covers what is attached to it; otherwise each file gets a rule on
    the RSE (in bulk; file by file for names that may have one already, or when a bulk
    request fails). A file that cannot be protected fails alone."""
    from ..rucio.errors import RucioFileError

    new = [r for r in registered if not r.get("had_did")]
    older = present + [r for r in registered if r.get("had_did")]

    def each(recs: list[Record], call: Callable[[Record], Any]) -> None:
        for r in recs:
            try:
                made = call(r)
                r[_PROTECTED] = True
                if made is False and r["status"] is None:   # ours to claim, but claimed
                    r[_BY_OTHER] = True
            except RucioFileError as exc:
                r.update(status=FAILED, cause="rucio", error=(
                    f"registered but not protected ({exc}); a resubmission adds the rule"
                    if r["status"] is None else
                    f"already present, but not protected ({exc}); a resubmission does it"))

    def bulk(recs: list[Record], call: Callable[[list[str]], list[str]],
             one: Callable[[Record], Any], what: str) -> None:
        """``call(names)`` -> the names it could not protect in bulk: one by one."""
        if not recs:
            return
        try:
            left = set(retrying(lambda: call([r["name"] for r in recs]), s, stop, what,
                                transient_too=True))
        except RucioFileError:
            left = {r["name"] for r in recs}
        for r in recs:
            if r["name"] not in left:
                r[_PROTECTED] = True
        each([r for r in recs if r["name"] in left], one)

    if s.dataset:
        ds = s.dataset

        def attach_all(names: list[str]) -> list[str]:
            return [] if rio.attach_bulk(ds, s.scope, names) else names

        bulk(new + older, attach_all, lambda r: rio.attach(ds, s.scope, r["name"]),
             "attaching to the dataset")
        return

    def rule(r: Record) -> Any:
        return rio.ensure_rule(s.scope, r["name"], s.rse, s.lifetime)

    bulk(new, lambda names: rio.add_rules(s.scope, names, s.rse, s.lifetime), rule,
         "adding rules")
    bulk(older, lambda names: rio.add_rules(s.scope, names, s.rse, s.lifetime), rule,
         "adding rules")
