"""Walk a source tree with ``os.scandir`` and record what matches: path, size, mtime.

Symlink policy (``[source] symlinks``): directory symlinks are never descended (no cycles, no
escaping the tree, no file counted twice) and are listed as skipped. A symlink to a file is
uploaded with the content of its target under the link's own name when ``follow`` (default;
Butler datastores made with ``-t symlink`` consist of such links), listed as skipped when
``skip``, and refused when ``refuse``. A dangling link that matches the patterns is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter
from pathlib import Path
from typing import Any, Callable, NamedTuple

from .config import SourceConfig
from .files import atomic_write_blocks
from .naming import dir_pruned, glob_matcher
from .progress import Progress


class Entry(NamedTuple):
    """One catalogued file. A named tuple, not a dataclass: a million of them are held at
    once (about 100 bytes less each, and quicker to make)."""

    relpath: str
    size: int
    mtime: float


@dataclass(frozen=True)
class Problem:
    relpath: str
    reason: str


class Columns(NamedTuple):
    """A catalogue's files as three parallel lists, as a catalogue file holds them: read
    from a file they are used as they are, without a million Entry tuples (0.1 s and 64 MB
    at a million files)."""

    relpath: list[str]
    size: list[int]
    mtime: list[float]

    @classmethod
    def of(cls, entries: Sequence[Entry]) -> Columns:
        """Entry tuples (a walk's) as columns."""
        return cls(list(map(itemgetter(0), entries)), list(map(itemgetter(1), entries)),
                   list(map(itemgetter(2), entries)))


@dataclass
class Catalogue:
    root: Path
    entries: list[Entry] = field(default_factory=list)   # from a walk
    refused: list[Problem] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)
    pattern_hits: dict[str, int] = field(default_factory=dict)
    # directories outside the root that followed file symlinks point into (Apptainer binds)
    outside_targets: set[str] = field(default_factory=set)
    columns: Columns | None = None   # from a catalogue file (``entries`` is then empty)

    def files(self) -> Columns:
        """The files as columns, whichever way they were catalogued."""
        return self.columns if self.columns is not None else Columns.of(self.entries)

    def file_entries(self) -> list[Entry]:
        """The files as Entry tuples, whichever way they were catalogued."""
        if self.columns is None:
            return self.entries
        return list(map(tuple.__new__, repeat(Entry), zip(*self.columns)))

    @property
    def file_count(self) -> int:
        return len(self.columns.relpath) if self.columns is not None else len(self.entries)

    @property
    def total_bytes(self) -> int:
        if self.columns is not None:
            return sum(self.columns.size)
        return sum(map(itemgetter(1), self.entries))


def walk(source: SourceConfig, progress: Progress | None = None,
         keep: Callable[[str, int, float], bool] | None = None) -> Catalogue:
    """Catalogue every regular file below ``source.root`` matched by include and not by
    exclude. Problems (unreadable, dangling, not a regular file, bad encoding) are collected,
    not raised, so the user sees all of them at once. ``keep(relpath, size, mtime)`` (the
    nightly ledger filter) drops files as they are found, so only those kept are held."""
    root = source.root
    cat = Catalogue(root=root, pattern_hits={p: 0 for p in source.include})
    include = [(p, glob_matcher(p)) for p in source.include]
    exclude = [glob_matcher(p) for p in source.exclude]
    root_real = os.path.realpath(root)
    uid = os.geteuid()
    groups = set(os.getgroups()) | {os.getegid()}
    symlinks = source.symlinks
    entries_out = cat.entries
    nbytes = hits = 0

    def selected(rel: str) -> bool:
        for pattern, matches in include:
            if matches(rel):
                cat.pattern_hits[pattern] += 1
                return not any(m(rel) for m in exclude)
        return False

    if len(include) == 1 and not exclude:   # the usual job: one test, hits counted below
        only_pattern, selected = include[0]
    else:
        only_pattern = None

    for rel_dir, found, dir_links in _scan(root, source.exclude, cat):
        mark = len(cat.skipped)
        cat.skipped.extend(dir_links)
        prefix = f"{rel_dir}/" if rel_dir else ""
        rels = [prefix + e.name for e in found]
        try:   # one test for the whole directory; a bad name is looked for only if needed
            "\0".join(rels).encode("utf-8")
            all_utf8 = True
        except UnicodeEncodeError:
            all_utf8 = False
        for rel, entry in zip(rels, found):
            if not all_utf8 and not _valid_utf8(rel):
                if selected(rel):
                    hits += 1
                    cat.refused.append(Problem(_printable(rel),
                                               "the file name is not valid UTF-8"))
                continue
            if not selected(rel):
                continue
            hits += 1
            is_link = entry.is_symlink()   # directory symlinks never get here
            if is_link:
                if symlinks == "skip":
                    cat.skipped.append(Problem(rel, "symlink skipped (symlinks = \"skip\")"))
                    continue
                if symlinks == "refuse":
                    cat.refused.append(Problem(rel, "is a symlink and symlinks = \"refuse\"; "
                                               "remove it or set symlinks = \"follow\""))
                    continue
            try:
                st = entry.stat(follow_symlinks=True)
            except FileNotFoundError:
                reason = "dangling symlink" if is_link else "vanished while cataloguing"
                cat.refused.append(Problem(rel, reason))
                continue
            except OSError as exc:
                cat.refused.append(Problem(rel, f"cannot stat: {exc.strerror}"))
                continue
            mode = st.st_mode
            if not stat.S_ISREG(mode):
                cat.refused.append(Problem(rel, "not a regular file"))
                continue
            if keep is not None and not keep(rel, st.st_size, st.st_mtime):
                continue
            if mode & 0o444 != 0o444 and not _readable(st, uid, groups) \
                    and not os.access(entry.path, os.R_OK):
                cat.refused.append(Problem(rel, "not readable by you; fix its permissions "
                                           "(chmod u+r or g+r) or exclude it"))
                continue
            if is_link:
                target_dir = os.path.dirname(os.path.realpath(entry.path))
                if not _inside(target_dir, root_real):
                    cat.outside_targets.add(target_dir)
            entries_out.append(Entry(rel, st.st_size, st.st_mtime))
            nbytes += st.st_size
            if progress is not None and not len(entries_out) & 0x3FFF:   # a huge directory
                progress.update(len(entries_out), nbytes)
        if dir_links and len(cat.skipped) > mark + len(dir_links):   # in name order, as found
            cat.skipped[mark:] = sorted(cat.skipped[mark:], key=lambda p: p.relpath)
        if progress is not None:
            progress.update(len(entries_out), nbytes)
    if only_pattern is not None:
        cat.pattern_hits[only_pattern] = hits
    if progress is not None:
        progress.done()
    return cat


def _scan(root: Path, exclude: tuple[str, ...],
          cat: Catalogue) -> Iterator[tuple[str, list[os.DirEntry], list[Problem]]]:
    """Depth-first, name-ordered walk: (relative POSIX directory, its non-directories in
    name order, its directory symlinks as skipped problems) per directory ("" for the
    root)."""
    stack: list[tuple[str, str]] = [(str(root), "")]
    while stack:
        path, rel = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            cat.refused.append(Problem(rel or ".", f"cannot list directory: {exc.strerror}"))
            continue
        subdirs = []
        files = []
        dir_links = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                child = f"{rel}/{entry.name}" if rel else entry.name
                if not dir_pruned(child, exclude):
                    subdirs.append((entry.path, child))
            elif entry.is_symlink() and _is_dir(entry):
                dir_links.append(Problem(f"{rel}/{entry.name}" if rel else entry.name,
                                         "directory symlink not followed"))
            else:
                files.append(entry)
        if files or dir_links:
            yield rel, files, dir_links
        stack.extend(reversed(subdirs))


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _readable(st: os.stat_result, uid: int, groups: set[int]) -> bool:
    """Mode-bit read check from the stat we already have (no extra metadata call on Lustre);
    the caller confirms a negative answer with os.access, which also sees ACLs."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)


def _valid_utf8(rel: str) -> bool:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(rel: str) -> str:
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# ----------------------------------------------------------------------------- catalogue file
CATALOGUE_FORMAT = 1


class CatalogueFileError(Exception):
    """A catalogue file that cannot be used, with the line to show."""


def write_catalogue(path: Path, cat: Catalogue, source: SourceConfig, created_at: str,
                    tool: str) -> str:
    """The catalogue as one JSON document, its files in three columns (relpath, size,
    mtime) rather than an object each: json writes it in C (about half a second a million
    files) and parses it in 0.3 s, which is what lets ``plan --catalogue`` stay near 1.5x of
    ``find``. With it the source it was made for, the skipped entries and the symlink
    targets outside the root (Apptainer binds). The text is what json.dumps(sort_keys=True,
    ensure_ascii=False) gives, streamed 65,536 files at a time (the whole of it at once
    cost planning 150 MB at a million files). Returns the file's sha256."""
    count = cat.file_count

    def block(col: str, start: int, stop: int) -> list[Any]:   # not all of a column at once
        if cat.columns is not None:
            return getattr(cat.columns, col)[start:stop]
        return list(map(itemgetter(Columns._fields.index(col)), cat.entries[start:stop]))

    marks = {col: f"\x00column {col}\x00" for col in ("relpath", "size", "mtime")}
    doc = {"dac_upload_catalogue": CATALOGUE_FORMAT, "created_at": created_at, "tool": tool,
           "source": {"root": str(cat.root), "include": list(source.include),
                      "exclude": list(source.exclude), "symlinks": source.symlinks},
           "files": count, "bytes": cat.total_bytes,
           "skipped": [{"relpath": p.relpath, "reason": p.reason} for p in cat.skipped],
           "outside_targets": sorted(cat.outside_targets),
           "pattern_hits": cat.pattern_hits, **marks}
    text = json.dumps(doc, sort_keys=True, ensure_ascii=False) + "\n"

    def blocks() -> Iterator[bytes]:
        rest = text
        for col in ("mtime", "relpath", "size"):   # sorted keys
            before, rest = rest.split(json.dumps(marks[col]), 1)
            yield (before + "[").encode("utf-8")
            for i in range(0, count, 1 << 16):
                part = json.dumps(block(col, i, i + (1 << 16)), ensure_ascii=False)[1:-1]
                yield ((", " if i else "") + part).encode("utf-8")
            yield b"]"
        yield rest.encode("utf-8")

    return atomic_write_blocks(path, blocks())


def _first_bad_relpath(rels: list[str]) -> str | None:
    """The first relpath that is not a plain relative path (absolute, a '.' or '..' or empty
    part, a NUL, not UTF-8), or None: the worker reads ROOT/relpath, so a hand-edited
    catalogue must not lead it outside the root. Substring tests over all of them joined,
    in C (a regular expression took a second per million); file by file only to name one."""
    if not rels:
        return None
    joined = "\0".join(rels)
    try:
        joined.encode("utf-8")
        wrapped = "\0" + joined.replace("/", "\0") + "\0"
        if joined.count("\0") == len(rels) - 1 and "\0\0" not in wrapped \
                and "\0..\0" not in wrapped and "\0.\0" not in wrapped:
            return None
    except UnicodeEncodeError:
        pass
    for rel in rels:
        parts = rel.split("/")
        if "\0" in rel or any(p in ("", ".", "..") for p in parts) or not _valid_utf8(rel):
            return _printable(rel)
    return None


def read_catalogue(path: Path) -> tuple[Catalogue, dict[str, Any]]:
    """The catalogue a file holds, and its header (everything but the three columns, plus
    "sha256": the file's, as read). Raises CatalogueFileError with one line saying what is
    wrong."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        digest = hashlib.sha256(data).hexdigest()
        import orjson  # 0.24 s a million files, against 0.38 s for json

        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:   # stricter than JSON (lone surrogates, 1e400):
            doc = json.loads(data)       # json reads those, and the checks below say why
    except OSError as exc:
        raise CatalogueFileError(f"{path}: cannot read the catalogue: {exc.strerror}") from None
    except ValueError as exc:
        raise CatalogueFileError(f"{path}: not a catalogue written by dac-upload catalogue "
                                 f"(not JSON: {exc})") from None
    if not isinstance(doc, dict) or doc.get("dac_upload_catalogue") != CATALOGUE_FORMAT:
        raise CatalogueFileError(f"{path}: not a catalogue written by dac-upload catalogue "
                                 f"(format {CATALOGUE_FORMAT}); make one with: dac-upload "
                                 "catalogue JOB --out FILE")
    try:
        rels, sizes, mtimes = doc.pop("relpath"), doc.pop("size"), doc.pop("mtime")
        ok = (len(rels) == len(sizes) == len(mtimes) == doc["files"]
              and not set(map(type, rels)) - {str} and not set(map(type, sizes)) - {int}
              and not set(map(type, mtimes)) - {float, int}
              and isinstance(doc["source"]["root"], str))
        skipped = [Problem(p["relpath"], p["reason"]) for p in doc["skipped"]]
        outside = set(doc["outside_targets"])
        hits = dict(doc["pattern_hits"])
        if ok and set(map(type, mtimes)) - {float}:
            mtimes = list(map(float, mtimes))
        ok = ok and (not sizes or min(sizes) >= 0) and sum(sizes) == doc["bytes"] \
            and all(map(math.isfinite, mtimes))
    except (KeyError, TypeError, AttributeError, OverflowError):
        ok = False
    if not ok:
        raise CatalogueFileError(f"{path}: a damaged catalogue (its columns or header do not "
                                 "fit together); make it again with dac-upload catalogue")
    bad = _first_bad_relpath(rels)
    if bad is not None:
        raise CatalogueFileError(f"{path}: {bad!r} is not a plain path under the root "
                                 "(absolute, '.', '..', an empty part, or not UTF-8); make the "
                                 "catalogue again with dac-upload catalogue")
    doc["sha256"] = digest
    cat = Catalogue(root=Path(doc["source"]["root"]), skipped=skipped, pattern_hits=hits,
                    outside_targets=outside, columns=Columns(rels, sizes, mtimes))
    return cat, doc
