"""What the stock and the bulk path share: the proxy's expiry, how a file already in Rucio
is judged, a file's local record, the copy log, retries with back-off, and stopping on a
signal."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..files import (
    read_checksums,
    read_jsonl,
    utc_now,
)
from ..runrecord import (
    FAILED,
    NOT_ATTEMPTED,
    TaskSettings,
)

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
    from ..rucio.credentials import PROXY_MARGIN, proxy_facts, renew_proxy_command

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


def log(msg: str) -> None:
    print(f"{utc_now()} {msg}", flush=True)


MISSING_ERROR = "missing: the file vanished after it was catalogued"


def unreadable_error(exc: OSError) -> str:
    return f"unreadable: {exc.strerror or exc}"


def changed_error(what: str) -> str:
    return (f"changed since it was catalogued ({what}); not uploaded: plan a new run once "
            "the file is final")


def catalogue_change(entry: dict[str, Any], size: int, mtime: float) -> str | None:
    """What differs between a file's stat and its manifest entry (size first), or None."""
    if size != entry["size"]:
        return f"size {entry['size']} -> {size}"
    return "modification time" if mtime != entry["mtime"] else None


def local_record(s: TaskSettings, entry: dict[str, Any]) -> dict[str, Any]:
    """The entry's record after looking at the file itself: unchanged since the catalogue,
    then adler32 and md5 in one read (status None: ready for Rucio), or a failure (changed,
    missing, unreadable). An entry that carries its checksums (a file the worker wrote
    itself and checksummed as it wrote it: a packed archive) is not read again."""
    path = s.root / entry["relpath"]
    rec: dict[str, Any] = {"relpath": entry["relpath"], "path": str(path), "scope": s.scope,
                           "name": entry["name"], "rse": s.rse, "bytes": entry["size"],
                           "adler32": None, "md5": None, "pfn": None, "guid": None,
                           "status": FAILED, "cause": None, "error": None}
    want_md5 = s.md5 or s.mode == "stock"
    try:
        st = os.stat(path)
        what = catalogue_change(entry, st.st_size, st.st_mtime)
        if what is not None:
            rec.update(cause="changed", error=changed_error(what))
            return rec
        if entry.get("adler32") and (entry.get("md5") or not want_md5):
            size, adler32, md5 = st.st_size, entry["adler32"], entry.get("md5")
        else:
            size, adler32, md5 = read_checksums(path, md5=want_md5)
    except FileNotFoundError:
        rec.update(cause="missing", error=MISSING_ERROR)
        return rec
    except OSError as exc:
        rec.update(cause="unreadable", error=unreadable_error(exc))
        return rec
    rec.update(bytes=size, adler32=adler32, md5=md5, status=None)
    return rec


def abort_reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, Exception) and is_fatal(exc) else (
        f"internal error {type(exc).__name__}: {exc}")


@dataclass
class TaskState:
    """What one task's paths share while it runs: why it stopped (None while it goes on),
    the copy log of its attempt, and why the server refused Butler metadata (once)."""

    aborted: str | None = None
    copies: CopyLog | None = None
    metadata_refused: str | None = None


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
    from ..rucio.errors import RucioTransient, RucioUnavailable

    kinds = (RucioUnavailable, RucioTransient) if transient_too else (RucioUnavailable,)
    for i in range(s.retries + 1):
        try:
            return call()
        except kinds as exc:
            if i == s.retries or stop.reason is not None:
                if isinstance(exc, RucioTransient):
                    from ..rucio.errors import RucioFatal
                    raise RucioFatal(f"the Rucio server keeps failing: {exc}") from None
                raise
            pause(s, stop, i, what, str(exc))
    raise AssertionError("unreachable")


def pause(s: TaskSettings, stop: StopRequest, i: int, what: str, why: str) -> None:
    """The back-off before retry i+1: retry_wait doubling, at most 5 minutes; a stop signal
    cuts it short."""
    wait = min(s.retry_wait * 2 ** i, 300.0)
    log(f"retry {i + 1}/{s.retries} of {what} in {wait:.0f} s: {why}")
    stop.sleep(wait)


def not_attempted(s: TaskSettings, entry: dict[str, Any], reason: str,
                   cause: str) -> dict[str, Any]:
    return {"relpath": entry["relpath"], "path": str(s.root / entry["relpath"]),
            "scope": s.scope, "name": entry["name"], "rse": s.rse, "bytes": entry["size"],
            "adler32": None, "md5": None, "pfn": None, "guid": None, "status": NOT_ATTEMPTED,
            "cause": cause, "error": f"task stopped before this file: {reason}"}


def is_fatal(exc: Exception) -> bool:
    from ..rucio.errors import RucioFatal

    return isinstance(exc, RucioFatal)


def set_metadata(rio: Any, s: TaskSettings, done: list[dict[str, Any]],
                 meta: dict[str, dict[str, str]], stop: StopRequest, state: TaskState) -> None:
    """Set the Butler metadata (``meta``: name -> rubin_butler, rubin_sidecar) of the DIDs
    of ``done`` (records of done files, marked "set", "refused" or failed here) in one
    request. A server that cannot keep such metadata (no JSON plugin) is said once, in
    ``state``; the files stay done, marked "refused". Any other failure fails the files: a
    resubmission finds them present and sets it."""
    from ..rucio.errors import MetadataRefused, RucioFileError

    if done and state.metadata_refused is None:
        try:
            retrying(lambda: rio.set_metadata_bulk(
                s.scope, [(r["name"], meta[r["name"]]) for r in done]), s, stop,
                "setting Butler metadata", transient_too=True)
            for r in done:
                r["metadata"] = "set"
        except MetadataRefused as exc:
            state.metadata_refused = str(exc)
            log(f"WARNING: Butler metadata not set: {exc}; the files are uploaded "
                "without it (summary.json lists each file's datasets)")
        except RucioFileError as exc:
            for r in done:
                r.update(status=FAILED, cause="rucio", error=(
                    f"uploaded, but its Butler metadata was not set ({exc}); a "
                    "resubmission sets it"))
        except Exception as exc:   # the server gone or refusing us: stop the task
            state.aborted = abort_reason(exc)
            for r in done:
                r.update(status=FAILED, cause="transient", error=(
                    f"uploaded, but its Butler metadata was not set ({exc}); a "
                    "resubmission sets it"))
    if state.metadata_refused is not None:
        for r in done:
            r["metadata"] = "refused"
