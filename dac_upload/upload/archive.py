"""Build one planned archive from its members: a ZIP file the worker then uploads like any
other file (upload/bulk.py) and registers as a Rucio archive of them.

The archive is the same bytes every time it is built from the same files (a resubmission
after a crash builds it again and finds the copy or the replica of the first attempt to be
the same): members stored (no compression: the products are compressed already, and a
reader extracts one member by its offset), in the planned order, with a fixed timestamp
and mode; written as a stream (a data descriptor after each member, no seek back), so that
the archive's adler32 and md5 are computed from the bytes as they are written, and each
member is read once, for the archive and for its own adler32 and md5 at the same time.
ZIP64 records are written where the archive needs them (more than 65,535 members, offsets
beyond 4 GiB).

A member that is not the file the plan catalogued (size or modification time, before or
after it is read, or bytes read) stops the build: the partial archive is removed, and
MemberChanged names the file. Scratch space that runs out raises ScratchFull, any other
failure to write there ScratchUnusable. Either way
nothing half-built is left to be uploaded.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import MISSING_ERROR, catalogue_change, unreadable_error

FIXED_TIME = (1980, 1, 1, 0, 0, 0)   # the earliest a ZIP entry can say: no build time in it
MEMBER_MODE = 0o100644                # a regular file, rw-r--r--
_CHUNK = 4 << 20


class MemberChanged(Exception):
    """A member differs from the catalogue: the archive must not be registered."""

    def __init__(self, relpath: str, what: str) -> None:
        super().__init__(f"{relpath} changed since it was catalogued ({what})")
        self.relpath, self.what = relpath, what


class MemberUnreadable(Exception):
    """A member is missing or cannot be read."""

    def __init__(self, relpath: str, cause: str, why: str) -> None:
        super().__init__(f"{relpath}: {why}")
        self.relpath, self.cause, self.why = relpath, cause, why


class ScratchFull(Exception):
    """The scratch directory ran out of space while the archive was written."""


class ScratchUnusable(Exception):
    """Writing the archive in the scratch directory failed otherwise (an I/O error, the
    directory removed under the task): that archive fails, the task goes on."""


@dataclass(frozen=True)
class BuiltMember:
    relpath: str
    name: str
    bytes: int
    adler32: str
    md5: str | None


@dataclass(frozen=True)
class BuiltArchive:
    path: Path
    bytes: int
    adler32: str
    md5: str
    members: tuple[BuiltMember, ...]
    mtime: float   # read from the open file: no second look at a scratch that may be gone


class _ChecksummedStream:
    """A write-only, unseekable file object that checksums what goes through it: zipfile
    sees no ``seek`` and writes a data descriptor after each member instead of going back to
    its header, so every byte is written once, in order."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._adler = 1
        self._md5 = hashlib.md5(usedforsecurity=False)   # a checksum, not security
        self._pos = 0

    def write(self, data: bytes | memoryview) -> int:
        self._handle.write(data)
        self._adler = zlib.adler32(data, self._adler)
        self._md5.update(data)
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        self._handle.flush()

    @property
    def adler32(self) -> str:
        return f"{self._adler & 0xFFFFFFFF:08x}"

    @property
    def md5(self) -> str:
        return self._md5.hexdigest()


def build_archive(root: Path, members: Sequence[dict[str, Any]], target: Path,
                  md5: bool = True, first: tuple[str, bytes] | None = None) -> BuiltArchive:
    """Write the archive of ``members`` (manifest entries: relpath, name, size, mtime; in
    the planned order) at ``target``, its member paths their Rucio names (what
    ``rucio download`` extracts), after ``first`` (path, bytes: a Butler zip's index, which
    ``butler retrieve-artifacts --zip`` also writes first). Raises MemberChanged,
    MemberUnreadable, ScratchFull or ScratchUnusable, with nothing left at ``target``."""
    part = target.with_name(target.name + ".part")
    built: list[BuiltMember] = []
    try:
        with open(part, "wb") as handle:
            stream = _ChecksummedStream(handle)
            with zipfile.ZipFile(stream, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                if first is not None:
                    zf.writestr(_member_info(first[0], len(first[1])), first[1])
                for entry in members:
                    built.append(_add_member(zf, root, entry, md5))
            handle.flush()
            os.fsync(handle.fileno())
            mtime = os.fstat(handle.fileno()).st_mtime
        os.replace(part, target)
    except OSError as exc:
        discard(part)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ScratchFull(f"no space left in {target.parent} for the archive "
                              f"{target.name}: {exc.strerror}") from None
        raise ScratchUnusable(f"cannot write the archive {target.name} in {target.parent}: "
                              f"{exc.strerror or exc}") from None
    except BaseException:
        discard(part)
        raise
    return BuiltArchive(target, stream.tell(), stream.adler32, stream.md5, tuple(built), mtime)


def discard(archive: Path) -> None:
    """Remove an archive in scratch (partial, or uploaded); on a scratch that has failed,
    removing it may fail too, and that must not hide the error or outcome that matters."""
    with contextlib.suppress(OSError):
        archive.unlink(missing_ok=True)


def _source_stat(handle: Any, relpath: str) -> os.stat_result:
    """A member's status from its open file; an I/O error there (EIO on Lustre, ESTALE on
    NFS) is the source's, not the scratch's."""
    try:
        return os.fstat(handle.fileno())
    except OSError as exc:
        raise MemberUnreadable(relpath, "unreadable", unreadable_error(exc)) from None


def _add_member(zf: zipfile.ZipFile, root: Path, entry: dict[str, Any],
                md5: bool) -> BuiltMember:
    relpath = entry["relpath"]
    path = root / relpath
    try:
        handle = open(path, "rb", buffering=0)   # noqa: SIM115 - closed in the finally below
    except FileNotFoundError:
        raise MemberUnreadable(relpath, "missing", MISSING_ERROR) from None
    except OSError as exc:
        raise MemberUnreadable(relpath, "unreadable", unreadable_error(exc)) from None
    try:
        before = _source_stat(handle, relpath)
        _same(relpath, entry, before.st_size, before.st_mtime)
        info = _member_info(entry["name"], entry["size"])
        adler = 1
        digest = hashlib.md5(usedforsecurity=False) if md5 else None
        size = 0
        buf = bytearray(min(_CHUNK, max(entry["size"], 1)))
        view = memoryview(buf)
        with zf.open(info, "w") as out:
            while True:
                try:
                    n = handle.readinto(buf)
                except OSError as exc:
                    raise MemberUnreadable(relpath, "unreadable",
                                           unreadable_error(exc)) from None
                if not n:
                    break
                size += n
                if size > entry["size"]:
                    break
                out.write(view[:n])
                adler = zlib.adler32(view[:n], adler)
                if digest is not None:
                    digest.update(view[:n])
        after = _source_stat(handle, relpath)
    finally:
        with contextlib.suppress(OSError):   # opened to read: a failed close loses nothing read
            handle.close()
    if size != entry["size"]:
        raise MemberChanged(relpath, f"{entry['size']} bytes catalogued, "
                                     f"{'more' if size > entry['size'] else size} read")
    _same(relpath, entry, after.st_size, after.st_mtime)
    return BuiltMember(relpath, entry["name"], size, f"{adler & 0xFFFFFFFF:08x}",
                       digest.hexdigest() if digest else None)


def _member_info(name: str, size: int) -> zipfile.ZipInfo:
    """A member's header: stored, at the fixed time and mode (no build time in the bytes)."""
    info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3   # Unix: external_attr holds the mode
    info.external_attr = MEMBER_MODE << 16
    info.file_size = size
    return info


def _same(relpath: str, entry: dict[str, Any], size: int, mtime: float) -> None:
    what = catalogue_change(entry, size, mtime)
    if what is not None:
        raise MemberChanged(relpath, what)
