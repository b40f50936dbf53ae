"""Copies onto an RSE through Rucio's protocol layer (gfal2 for root:// and davs://, POSIX),
without UploadClient: the bulk path's writes, checksums and removals; and what the storage
says of an object already there (verify)."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rucio.client import Client
from rucio.common import exception as rexc

from .errors import LOG, RucioFatal, RucioFileError, describe, storage_failure


@dataclass(frozen=True)
class StoredObject:
    """What the storage itself says of the object at a PFN (Storage.inspect): whether it is
    there, its size and the checksum it computed (adler32; md5 where it gives only that)."""

    exists: bool
    size: int | None = None
    adler32: str | None = None
    md5: str | None = None


class Storage:
    """Copies onto one RSE with Rucio's protocol objects (one per thread: gfal contexts are
    not shared), verified at the destination before the caller registers anything.

    ``rename``: "auto" follows the RSE's protocol implementation (Rucio's NoRename classes
    say False), "never" writes straight to the final PFN (Echo cannot rename), "always"
    writes ``PFN.TOKEN.rucio.upload`` and renames it once verified. ``temp_token`` is this
    object's own (random, made once): two writers of one name (two tasks, two runs) never
    share a temporary file, and neither removes the other's."""

    def __init__(self, settings: dict[str, Any], rename: str, client: Client) -> None:
        import threading

        self.settings = settings
        self.rename_mode = rename
        self.verify_checksum = settings.get("verify_checksum", True) is not False
        self._local = threading.local()
        self._creating = threading.Lock()
        self._made_dirs: set[str] = set()   # on a POSIX RSE, by _make_local_parent
        self._token = client.auth_token if len(client.auth_token.split(".")) == 3 else None
        self.temp_token = secrets.token_hex(4)

    def _protocol(self, operation: str = "write") -> Any:
        from rucio.rse import rsemanager

        key = f"proto_{operation}"
        proto = getattr(self._local, key, None)
        if proto is None:
            with self._creating:   # create_protocol sets and pops a key of the RSE's shared
                proto = rsemanager.create_protocol(   # protocol dict: one thread at a time
                    self.settings, operation, domain="wan", auth_token=self._token,
                    logger=_quiet_log)
            proto.connect()
            setattr(self._local, key, proto)
        return proto

    @property
    def verification(self) -> str:
        """How _matches checks a copy: Rucio's POSIX protocol reads the copy back for its
        adler32; every other protocol (gfal: root, davs, ...) asks the storage, which
        computes it (XRootD's chksum), so the copy is not read again by us."""
        from ..runrecord import READ_BACK_VERIFIED, STORAGE_VERIFIED

        scheme = self._protocol().attributes.get("scheme")
        return READ_BACK_VERIFIED if scheme == "file" else STORAGE_VERIFIED

    @property
    def renames(self) -> bool:
        renaming = bool(self._protocol().renaming)
        if self.rename_mode == "always" and not renaming:
            impl = self._protocol().attributes.get("impl", "its protocol")
            raise RucioFatal(f"RSE {self.settings.get('rse')} cannot rename ({impl}): set "
                             "[upload] rename = \"auto\" (or \"never\"), which writes the final "
                             "name and registers nothing before the copy there is verified")
        if self.rename_mode == "auto":
            return renaming
        return self.rename_mode == "always"

    def pfn(self, scope: str, name: str) -> str:
        pfns = self._protocol().lfns2pfns({"scope": scope, "name": name})
        return str(next(iter(pfns.values())))

    def temp_pfn(self, pfn: str, token: str | None = None) -> str:
        """The temporary name this writer (or the writer of ``token``) copies ``pfn`` to
        before renaming it."""
        return f"{pfn}.{token or self.temp_token}.rucio.upload"

    def put(self, path: Path, scope: str, name: str, size: int, adler32: str,
            may_replace: Callable[[], bool], *,
            stale_temps: Collection[str] = ()) -> tuple[str, str]:
        """Copy ``path`` to its PFN and check the copy there; (pfn, how): "copied",
        "found" or "replaced". Raises RucioFileError, or StorageFull (a RucioFatal) when the
        storage has no room: every later copy would fail too.

        Something already at the PFN that matches (size and adler32) is kept and "found",
        whoever wrote it (an earlier attempt of this task, or another writer of the same
        name, such as a second run, whose copy may be registered at any moment): bytes that
        may be a registered replica's are never deleted. Which
        upload counts is then decided by the registration's protection (bulk._back), not
        by who wrote the bytes. Anything else there is replaced only if ``may_replace()``
        says no replica of the name is registered on the RSE at that moment (an
        unregistered leftover, partial or other bytes), else RucioFileError (left alone).

        What this attempt wrote is removed again when the copy fails: its temporary copy,
        or, written in place, the final one unless the bytes there are the file's by now or
        Rucio has a replica there (another writer of the name finished meanwhile).
        ``stale_temps``: the temporary-name tokens of earlier attempts of this task that
        began this name (copies.jsonl); a killed one's ``PFN.<token>.rucio.upload`` is
        removed."""
        written: str | None = None   # what this attempt has started to write
        pfn = ""
        try:
            proto = self._protocol()
            pfn = self.pfn(scope, name)
            how = "copied"
            if proto.exists(pfn):
                if self._keep_existing(proto, pfn, size, adler32, may_replace):
                    return pfn, "found"
                self._protocol("delete").delete(pfn)
                how = "replaced"
            target = self.temp_pfn(pfn) if self.renames else pfn
            for token in set(stale_temps) - {self.temp_token} if target != pfn else ():
                stale = self.temp_pfn(pfn, token)   # a killed earlier attempt's
                if proto.exists(stale):
                    self._protocol("delete").delete(stale)
            if target != pfn and proto.exists(target):   # ours, from a try that failed
                self._protocol("delete").delete(target)
            self._make_local_parent(proto, target)
            written = target
            proto.put(str(path), target, None)
            if not self._matches(proto, target, size, adler32):
                raise RucioFileError(f"the copy at {target} does not match the file (size or "
                                     "adler32): not registered")
            if target != pfn:
                proto.rename(target, pfn)
            return pfn, how
        except Exception as exc:
            if written is not None and (written != pfn or self._discardable(
                    pfn, size, adler32, may_replace)):
                self._discard(written)
            if isinstance(exc, (RucioFileError, RucioFatal)):
                raise
            rse = str(self.settings.get("rse"))
            raise storage_failure(exc, f"copying to {rse}", rse,
                                   pfn or f"{scope}:{name}") from None

    def holds(self, scope: str, name: str, size: int, adler32: str) -> bool:
        """Whether the name's PFN holds these bytes now, by the storage's own size and
        adler32: after a failed copy, the sign that another writer of the name finished
        (and registers it next). False when the storage cannot say."""
        try:
            return self._matches(self._protocol(), self.pfn(scope, name), size, adler32)
        except Exception:
            return False

    def _keep_existing(self, proto: Any, pfn: str, size: int, adler32: str,
                       may_replace: Callable[[], bool]) -> bool:
        """put's decision on a file already at ``pfn``: True to keep it ("found"), False to
        replace it; RucioFileError when it differs and a replica of the name is registered."""
        if self._matches(proto, pfn, size, adler32):
            return True   # whoever wrote these bytes: never deleted (see put)
        if may_replace():
            return False
        raise RucioFileError(f"other bytes are at {pfn} and Rucio now has a replica of that "
                             "name there: left alone")

    def _discardable(self, pfn: str, size: int, adler32: str,
                     may_replace: Callable[[], bool]) -> bool:
        """Whether a failed copy written in place (no rename) may be removed: not if the
        bytes there now are the file's (another writer of the same name finished meanwhile:
        its copy may be registered already), nor if Rucio has a replica there by now."""
        try:
            if self._matches(self._protocol(), pfn, size, adler32):
                return False
        except Exception:   # no checksum, gone: fall through to Rucio's answer
            pass
        try:
            return bool(may_replace())
        except Exception:
            return False

    def _discard(self, pfn: str) -> None:
        """Remove what a failed copy left at ``pfn`` (a partial or unverified copy nobody has
        registered); a removal that fails is logged, the copy's own error is what counts."""
        try:
            if self._protocol().exists(pfn):
                self._protocol("delete").delete(pfn)
        except Exception as exc:
            LOG.warning("could not remove %s after a failed copy: %s", pfn, describe(exc))

    def inspect(self, pfn: str) -> StoredObject:
        """The object at ``pfn`` as the storage reports it, for verify: over root:// and
        davs:// gfal2's stat and checksum (XRootD computes it, nothing is read here); on a
        POSIX RSE Rucio's protocol stats the file on disk and reads it for its adler32.
        Absent: ``exists`` False. RucioFileError when the storage cannot say (RucioTransient
        when asking again may help: a server that does not answer)."""
        rse = str(self.settings.get("rse"))
        try:
            proto = self._reader(pfn)
            st = proto.stat(pfn)
        except rexc.RSEChecksumUnavailable as exc:
            if _still_written(exc):
                raise RucioFileError(f"{pfn} is open for writing on {rse} (a copy under way, "
                                     "or one whose writer was killed): no checksum") from None
            raise RucioFileError(f"the storage of {rse} gives no checksum for {pfn}: "
                                 f"{describe(exc)}") from None
        except Exception as exc:
            if self._absent(pfn):
                return StoredObject(exists=False)
            raise storage_failure(exc, f"checking {pfn} on {rse}", rse, pfn) from None
        size = int(st["filesize"]) if st.get("filesize") is not None else None
        adler = str(st["adler32"]).lower().zfill(8) if st.get("adler32") else None
        md5 = str(st["md5"]).lower() if st.get("md5") else None
        return StoredObject(exists=True, size=size, adler32=adler, md5=md5)

    def _absent(self, pfn: str) -> bool:
        """True only when the storage says nothing is at ``pfn`` (an error says nothing)."""
        try:
            return not self._reader(pfn).exists(pfn)
        except Exception:
            return False

    def _reader(self, pfn: str) -> Any:
        """This thread's protocol object for reading ``pfn``: the RSE's read protocol of
        the PFN's scheme, else its write protocol (the one that wrote the PFN)."""
        from rucio.rse import rsemanager

        scheme = pfn.split("://", 1)[0] if "://" in pfn else None
        key = f"proto_read_{scheme}"
        proto = getattr(self._local, key, None)
        if proto is None:
            try:
                with self._creating:   # see _protocol
                    proto = rsemanager.create_protocol(
                        self.settings, "read", scheme=scheme, domain="wan",
                        auth_token=self._token, logger=_quiet_log)
                proto.connect()
            except rexc.RSEProtocolNotSupported:
                proto = self._protocol()
            setattr(self._local, key, proto)
        return proto

    def _make_local_parent(self, proto: Any, pfn: str) -> None:
        """Rucio's POSIX protocol makes a file's directory with "if not exists: makedirs",
        so two concurrent copies into the same new directory race and one fails
        (FileExistsError, reported as KeyError: 'prefix'; one file in a thousand on the test
        RSE). Made here first, race-free, once per directory (a set remembers them: with
        Rucio's "identity" paths a directory holds many files; with "hash" paths a
        1,000-file task spreads over about as many directories, and the set rarely helps);
        other protocols create directories on the server side."""
        if proto.attributes.get("scheme") == "file" and hasattr(proto, "pfn2path"):
            directory = os.path.dirname(proto.pfn2path(pfn))
            if directory not in self._made_dirs:
                os.makedirs(directory, exist_ok=True)
                self._made_dirs.add(directory)

    def _matches(self, proto: Any, pfn: str, size: int, adler32: str) -> bool:
        """The destination's own size and adler32 (a checksum is required unless the RSE
        says verify_checksum = False)."""
        try:
            st = proto.stat(pfn)
        except NotImplementedError:
            st = {}
        except rexc.RSEChecksumUnavailable as exc:
            if _still_written(exc):   # a file still open for writing is no verified copy
                return False
            st = {}
        stat_size = int(st["filesize"]) if st.get("filesize") is not None else None
        if "adler32" in st:   # gfal, xrootd, ... give the size as a string
            return str(st["adler32"]).lower().zfill(8) == adler32 and \
                stat_size in (None, size)
        if self.verify_checksum:
            raise RucioFileError(f"the RSE gives no checksum for {pfn}: cannot verify the copy "
                                 "(set verify_checksum on the RSE, or [upload] mode = "
                                 "\"stock\")")
        return stat_size == size


def _still_written(exc: BaseException) -> bool:
    """The storage will not checksum the file because it is open for writing: gfal2 writes
    to XRootD with POSC (persist on successful close), and a file whose writer was killed is
    held for the writer's return (XRootD's ofs.persist hold, 600 s by default), then removed;
    meanwhile a checksum is refused with EINPROGRESS or ETXTBSY. Seen on the test stack."""
    text = str(exc).lower()
    return "operation now in progress" in text or "text file busy" in text


def _quiet_log(level: int, msg: str, *args: Any, **kwargs: Any) -> None:
    """The logger Rucio's protocol objects are given: they call it as ``logging.log`` (Rucio's
    formatted_logger passes ``stacklevel=``), and only warnings are worth keeping."""
    if level >= logging.WARNING:
        LOG.log(level, msg, *args, **kwargs)
