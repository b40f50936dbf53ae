"""Pure packing: which files of a batch go into which archive, and the archive's Rucio name.

Small files cost Rucio a DID, a replica and a rule each, and cost Ceph an object each; packed,
a few thousand of them cost one of each. Nothing here reads a file or talks to Rucio: the
plan decides the archives, the worker builds them (upload/archive.py).

Deterministic by construction: the same files (name, size, modification time) in the same
batch give the same archives with the same names, so a resubmission, or a second run over
the same tree, finds an archive that is already there instead of making a second one; a
file that changed gives another name, so no archive is ever rewritten.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

ARCHIVE_SUFFIX = ".zip"   # Rucio treats a file DID as an archive by this suffix
BUTLER_INDEX = "_butler_zip_index.json"   # daf_butler's ZipIndex.index_name, first member
NAME_DIGITS = 32          # hex digits of the members' sha256 in an archive's name

# what the ZIP format adds per member, stored, no extra field: the local header (30 bytes),
# the data descriptor a stream writer adds (16), the central directory entry (46), and the
# member path twice; and once per archive the end records (ZIP64 ones included, 98)
_PER_MEMBER, _PER_ARCHIVE = 30 + 16 + 46, 98


class PlannedArchive(NamedTuple):
    """One archive of a batch: its Rucio name, its members (positions into the batch's
    files, in path order: the order they are written in) and its expected size."""

    name: str
    members: tuple[int, ...]
    bytes: int


def member_overhead(name: str) -> int:
    """Bytes the ZIP format adds for one member whose path is ``name`` (UTF-8)."""
    return _PER_MEMBER + 2 * len(name.encode("utf-8"))


def archive_name(prefix: str, members: Sequence[tuple[str, int, float]],
                 extra: bytes = b"") -> str:
    """``prefix`` + the sha256 of the members' (name, size, mtime), in order, and of
    ``extra`` (the other bytes the archive holds: a Butler zip's index) + ".zip": the same
    archive gets the same name, any change (one file more, one touched, another dataset
    id or RUN in the index) another, so that no archive is ever rewritten."""
    digest = hashlib.sha256()
    for name, size, mtime in members:
        digest.update(f"{name}\0{size}\0{mtime!r}\n".encode())
    if extra:
        digest.update(b"\0extra\0" + extra)
    return f"{prefix}{digest.hexdigest()[:NAME_DIGITS]}{ARCHIVE_SUFFIX}"


def pack_batch(files: Sequence[tuple[str, str, int, float]], below: int, target: int,
               prefix: str, min_members: int = 2,
               packs: Callable[[str], bool] | None = None
               ) -> tuple[list[PlannedArchive], list[int]]:
    """Split a batch's files (PlannedFile tuples: relpath, name, size, mtime; in path order)
    into archives and loose files: every file smaller than ``below`` (and that ``packs``
    accepts, by relpath) goes into an archive,
    filled in path order (files of one directory end up together: what is read together is
    fetched together) up to ``target`` bytes, ZIP overhead included; the rest go as they are.
    An archive that would hold fewer than ``min_members`` files is not made: its files go
    loose. Returns (archives, positions of the loose files)."""
    archives: list[PlannedArchive] = []
    loose: list[int] = []
    group: list[int] = []
    size = _PER_ARCHIVE

    def close() -> None:
        nonlocal group, size
        if len(group) >= min_members:
            archives.append(PlannedArchive(
                archive_name(prefix, [(files[i][1], files[i][2], files[i][3]) for i in group]),
                tuple(group), size))
        else:
            loose.extend(group)
        group, size = [], _PER_ARCHIVE

    for i, (rel, name, nbytes, _mtime) in enumerate(files):
        if nbytes >= below or (packs is not None and not packs(rel)):
            loose.append(i)
            continue
        cost = nbytes + member_overhead(name)
        if group and size + cost > target:
            close()
        group.append(i)
        size += cost
    close()
    loose.sort()
    return archives, loose
