"""What Rucio, gfal2 and the storage say, turned into our own two kinds: RucioFileError (this
file failed, go on with the next) and RucioFatal (every further file would fail the same way:
stop the task, say why once); and whether a storage error means the RSE is full."""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Iterator

LOG = logging.getLogger("dac_upload.rucio")


@functools.cache
def _kinds() -> tuple[tuple[type[BaseException], ...], ...]:
    """(fatal, transient, unreachable) exception types of Rucio and requests. Imported when
    first asked: our exception classes below are imported by steps that never talk to
    Rucio (planning --offline), which must not pay for importing it."""
    import requests
    from rucio.common import exception as rexc

    # errors that say nothing about one file but about the account, server or RSE
    fatal = (
        rexc.CannotAuthenticate, rexc.ServerConnectionException, rexc.InvalidRSEExpression,
        rexc.RSENotFound, rexc.ScopeNotFound, rexc.AccessDenied, rexc.RSEWriteBlocked,
        rexc.InsufficientAccountLimit, rexc.ConfigNotFound, rexc.MissingClientParameter,
        EOFError,   # a Rucio client that wanted to prompt (interactive login) in a batch job
    )
    # the server failed, not the request: worth another try after a pause
    transient = (rexc.DatabaseException, rexc.ServiceUnavailable,
                 rexc.ResourceTemporaryUnavailable)
    unreachable = (rexc.ServerConnectionException, requests.exceptions.ConnectionError,
                   requests.exceptions.Timeout)
    return fatal, transient, unreachable


class RucioFatal(Exception):
    """The account, server, scope or RSE is unusable: no further file can succeed."""


class RucioUnavailable(RucioFatal):
    """The Rucio server cannot be reached (as opposed to refusing us)."""


class RucioFileError(Exception):
    """This one file could not be uploaded; the message says why."""


class MetadataRefused(RucioFileError):
    """The server cannot keep free-form DID metadata (Rucio's JSON plugin is off: SQLite)."""


class RucioTransient(RucioFileError):
    """The server failed this request (HTTP 5xx, database busy): trying again may work."""


class StorageFull(RucioFatal):
    """The RSE's storage has no room (or our quota there is used up): every further copy
    would fail the same way, so the task stops and says so once."""


DESCRIBE_LIMIT = 600   # characters of an error's text kept: a record holds it per file


def describe(exc: BaseException) -> str:
    """``Name: details`` of a Rucio or storage error on one line, cut at DESCRIBE_LIMIT: the
    server's schema errors quote the whole request (1.7 MB for 20,000 names), and a task
    gives the same reason to every file it could not do."""
    name = type(exc).__name__
    text = " ".join(str(exc)[:4 * DESCRIBE_LIMIT].split())
    details = text.split("Details:", 1)[-1].strip() if "Details:" in text else text
    if details.startswith(name + ":"):
        details = details[len(name) + 1:].strip()
    if len(details) > DESCRIBE_LIMIT:
        details = details[:DESCRIBE_LIMIT] + f" ... ({len(str(exc)):,} characters in all)"
    return f"{name}: {details}" if details else name


def unreachable(exc: BaseException) -> bool:
    return isinstance(exc, _kinds()[2])


def translate(exc: BaseException, what: str) -> Exception:
    fatal, transient, _ = _kinds()
    if unreachable(exc):
        return RucioUnavailable(f"{what}: {describe(exc)}")
    if isinstance(exc, transient):
        return RucioTransient(f"{what}: {describe(exc)}")
    if isinstance(exc, fatal):
        return RucioFatal(f"{what}: {describe(exc)}")
    return RucioFileError(f"{what}: {describe(exc)}")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it was raised from or while handling (``__cause__``,
    ``__context__``) and any exception Rucio wrapped as an argument
    (``ServiceUnavailable(e)``): Rucio's protocols bury the storage's own error there. Its
    POSIX protocol, for one, reads ``self.rse['prefix']`` (a key that is never there) in the
    error path of ``put``, so ENOSPC or EACCES reaches us as ``KeyError: 'prefix'``, the
    OSError only in its ``__context__``."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__,
                 *(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))]


# errno values, and the words storages use (gfal2/XRootD text, WebDAV's HTTP 507), that mean
# the storage has no room for the file
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


_FULL_WORDS = ("no space left on device", "disk quota exceeded", "insufficient storage",
               "not enough space", "out of space", "enospc", "edquot")


def storage_full(exc: BaseException) -> str | None:
    """What the storage said if ``exc`` means it is full ("No space left on device", "Disk
    quota exceeded", ...), else None (pure)."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return os.strerror(e.errno)
    for e in _chain(exc):
        text = " ".join(str(e).split())
        low = text.lower()
        for word in _FULL_WORDS:
            at = low.find(word)
            if at >= 0:
                return text[at:at + len(word)]
    return None


def storage_error(exc: BaseException) -> OSError | None:
    """The storage's own OSError (one with an errno) behind ``exc``, if ``exc`` is not that
    error itself but a wrapper saying less (``KeyError: 'prefix'``); else None."""
    for e in _chain(exc):
        if e is not exc and isinstance(e, OSError) and e.errno:
            return e
    return None


def full_message(rse: str, said: str, pfn: str) -> str:
    return (f"the storage of RSE {rse} is full ({said}) writing {pfn}: no further file can "
            "be copied there; ask the RSE's admins for space (or set another [rucio] rse), "
            "then resubmit")


def storage_failure(exc: BaseException, what: str, rse: str, pfn: str) -> Exception:
    """``_translate`` for a storage operation: a full storage stops the task (StorageFull);
    otherwise the kind ``_translate`` gives, saying what the storage itself said."""
    said = storage_full(exc)
    if said:
        return StorageFull(full_message(rse, said, pfn))
    out = translate(exc, what)
    real = storage_error(exc)
    return type(out)(f"{what}: {describe(real)}") if real is not None else out
