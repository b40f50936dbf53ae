"""Walk a source tree with ``os.scandir`` and record what matches: path, size, mtime.

Symlink policy (``[source] symlinks``): directory symlinks are never descended (no cycles, no
escaping the tree, no file counted twice) and are listed as skipped. A symlink to a file is
uploaded with the content of its target under the link's own name when ``follow`` (default;
Butler datastores made with ``-t symlink`` consist of such links), listed as skipped when
``skip``, and refused when ``refuse``. A dangling link that matches the patterns is refused.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import stat
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import compress, islice, repeat
from operator import attrgetter, itemgetter
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
    """A catalogue's files as three parallel columns, as a catalogue file holds them: sizes
    and mtimes in typed arrays (8 bytes a file, against 36 for a list of ints or floats),
    relpaths in a list. A walk appends to them directly; no Entry tuple is made per file
    (64 bytes a file, 320 MB at five million)."""

    relpath: list[str]
    size: Sequence[int]
    mtime: Sequence[float]

    @classmethod
    def empty(cls) -> Columns:
        return cls([], array("q"), array("d"))

    @classmethod
    def of(cls, entries: Sequence[Entry]) -> Columns:
        """Entry tuples as columns."""
        return cls(list(map(itemgetter(0), entries)), array("q", map(itemgetter(1), entries)),
                   array("d", map(itemgetter(2), entries)))

    def add(self, relpath: str, size: int, mtime: float) -> None:
        self.relpath.append(relpath)
        self.size.append(size)     # type: ignore[attr-defined]
        self.mtime.append(mtime)   # type: ignore[attr-defined]


@dataclass
class Catalogue:
    root: Path
    columns: Columns = field(default_factory=Columns.empty)
    refused: list[Problem] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)
    pattern_hits: dict[str, int] = field(default_factory=dict)
    # directories outside the root that followed file symlinks point into (Apptainer binds)
    outside_targets: set[str] = field(default_factory=set)

    def files(self) -> Columns:
        return self.columns

    def file_entries(self) -> list[Entry]:
        """The files as Entry tuples (a Butler map's input; tests)."""
        return list(map(tuple.__new__, repeat(Entry), zip(*self.columns)))

    @property
    def file_count(self) -> int:
        return len(self.columns.relpath)

    @property
    def total_bytes(self) -> int:
        return sum(self.columns.size)


def walk(source: SourceConfig, progress: Progress | None = None,
         keep: Callable[[str, int, float], bool] | None = None,
         prune: tuple[str, ...] = ()) -> Catalogue:
    """Catalogue every regular file below ``source.root`` matched by include and not by
    exclude. Problems (unreadable, dangling, not a regular file, bad encoding) are collected,
    not raised, so the user sees all of them at once. ``keep(relpath, size, mtime)`` (the
    nightly ledger filter) drops files as they are found, so only those kept are held.

    A directory is handled whole where it can be (the usual case: valid names, no symlink,
    every file regular and readable): its columns are extended in C loops. Anything else
    in it sends that directory file by file, which says what is wrong with which. Listing
    and lstat'ing (see _list_dir) is most of a walk's time: past the first 20,000 entries
    ``source.walkers`` helper processes do it for the next directories while this one
    looks at the last (at a million files 1.7 s against 2.7 s alone on two cores); the
    catalogue is the same either way. ``prune``: directories (relative POSIX paths) never
    entered: the job's own runs folder when it lies inside the tree (own_dirs)."""
    root = source.root
    cat = Catalogue(root=root, pattern_hits={p: 0 for p in source.include})
    include = [(p, glob_matcher(p)) for p in source.include]
    exclude = [glob_matcher(p) for p in source.exclude]
    ctx = _WalkContext(source, cat, keep, os.path.realpath(root), include, exclude)
    cols = cat.columns
    nbytes = 0
    for rel_dir, path, listing, dir_links in _scan(root, source.exclude, cat,
                                                   source.walkers, frozenset(prune)):
        mark = len(cat.skipped)
        cat.skipped.extend(dir_links)
        if listing.names:
            before = len(cols.relpath)
            if not ctx.whole_directory(rel_dir, listing):
                ctx.file_by_file(rel_dir, path, listing)
            nbytes += sum(cols.size[before:])   # type: ignore[index]
        if dir_links and len(cat.skipped) > mark + len(dir_links):   # in name order, as found
            cat.skipped[mark:] = sorted(cat.skipped[mark:], key=lambda p: p.relpath)
        if progress is not None:
            progress.update(len(cols.relpath), nbytes)
    if ctx.only_pattern is not None:
        cat.pattern_hits[ctx.only_pattern] = ctx.hits
    if progress is not None:
        progress.done()
    return cat


_READ_ALL = 0o444
SKIP_SYMLINK = 'symlink skipped (symlinks = "skip")'
REFUSE_SYMLINK = 'is a symlink and symlinks = "refuse"; remove it or set symlinks = "follow"'
UNREADABLE = "not readable by you; fix its permissions (chmod u+r or g+r)"


def own_dirs(root: Path, runs_dir: Path) -> tuple[str, ...]:
    """The job's runs folder (run directories, ledger, locks, nightly.log: everything
    dac-upload writes) relative to the source root when it lies inside the tree, for the
    walk to leave out: a second plan must not upload the first one's manifests. () when it
    lies elsewhere; the folder and the root resolved, so that a symlinked path is seen."""
    real_root, real_runs = Path(os.path.realpath(root)), Path(os.path.realpath(runs_dir))
    if real_runs == real_root or not real_runs.is_relative_to(real_root):
        return ()
    return (real_runs.relative_to(real_root).as_posix(),)


class Reader:
    """Whether this user can read a file, from the stat already in hand (no extra metadata
    call on Lustre): the mode bits, confirmed by os.access (which also sees ACLs) only when
    they say no."""

    def __init__(self) -> None:
        self.uid, self.groups = os.geteuid(), set(os.getgroups()) | {os.getegid()}

    def can_read(self, st: Any, path: str) -> bool:
        return (st.st_mode & _READ_ALL == _READ_ALL or _readable(st, self.uid, self.groups)
                or os.access(path, os.R_OK))


class Verdict(NamedTuple):
    """What one source entry is, as the walk and a Butler source judge it alike: a file to
    upload (``st``: its stat, a symlink followed; ``link_dir``: the directory a followed
    symlink points into), or skipped or refused (``skipped``, ``refused``: why). ``missing``:
    it is not there (vanished, or a dangling symlink), which each caller says in its own
    words."""

    st: Any = None
    link_dir: str | None = None
    skipped: str | None = None
    refused: str | None = None
    missing: bool = False


def classify(path: str, lst: Any, symlinks: str) -> Verdict:
    """One entry, from its lstat ``lst``, under the [source] symlinks policy."""
    if stat.S_ISLNK(lst.st_mode):
        if symlinks == "skip":
            return Verdict(skipped=SKIP_SYMLINK)
        if symlinks == "refuse":
            return Verdict(refused=REFUSE_SYMLINK)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return Verdict(missing=True)
        except OSError as exc:
            return Verdict(refused=f"cannot stat: {exc.strerror}")
        if not stat.S_ISREG(st.st_mode):
            return Verdict(refused="not a regular file")
        return Verdict(st, os.path.dirname(os.path.realpath(path)))
    if not stat.S_ISREG(lst.st_mode):
        return Verdict(refused="not a regular file")
    return Verdict(lst)


class _WalkContext:
    """What the walk of one tree knows while it goes: the patterns, who the user is, what it
    has found."""

    def __init__(self, source: SourceConfig, cat: Catalogue,
                 keep: Callable[[str, int, float], bool] | None, root_real: str,
                 include: list[tuple[str, Callable[[str], bool]]],
                 exclude: list[Callable[[str], bool]]) -> None:
        self.cat, self.keep, self.root_real = cat, keep, root_real
        self.symlinks = source.symlinks
        self.reader = Reader()
        self.hits = 0
        self.include, self.exclude = include, exclude
        # the usual job: one include pattern, no exclude: one test, hits counted here
        self.only_pattern = include[0][0] if len(include) == 1 and not exclude else None
        self.only_matcher = include[0][1] if self.only_pattern is not None else None

    def selected(self, rel: str) -> bool:
        if self.only_matcher is not None:
            return self.only_matcher(rel)
        for pattern, matches in self.include:
            if matches(rel):
                self.cat.pattern_hits[pattern] += 1
                return not any(m(rel) for m in self.exclude)
        return False

    def whole_directory(self, rel_dir: str, listing: _Listing) -> bool:
        """The directory's matching files appended in C loops, if nothing in it needs a word
        (True); False, with nothing appended, sends it file by file."""
        if self.only_matcher is None or listing.errors:
            return False
        names = listing.names
        prefix = f"{rel_dir}/" if rel_dir else ""
        try:
            (prefix + "\0".join(names)).encode("utf-8")
        except UnicodeEncodeError:
            return False
        suffix = getattr(self.only_matcher, "visible_suffix", None)
        if suffix is None:   # any other pattern: its test, file by file
            rels = list(map(prefix.__add__, names))
            chosen = list(filter(self.only_matcher, rels))
            wanted = set(chosen) if len(chosen) != len(rels) else None
            picked = None if wanted is None else [r in wanted for r in rels]
        elif prefix[:1] == "." or "/." in prefix:   # a hidden directory: nothing matches
            return True
        elif not ("\0" + "\0".join(names)).count("\0.") \
                and all(map(str.endswith, names, repeat(suffix))):   # all of them
            chosen, picked = list(map(prefix.__add__, names)), None
        else:
            picked = [n[:1] != "." and n.endswith(suffix) for n in names]
            chosen = [prefix + n for n, p in zip(names, picked) if p]
        if not chosen:
            return True
        modes, sizes, mtimes = listing.modes, listing.sizes, listing.mtimes
        if picked is not None:
            modes, sizes, mtimes = (list(compress(col, picked))
                                    for col in (modes, sizes, mtimes))
        if not all(map(stat.S_ISREG, modes)):   # a symlink among them too
            return False
        if self.reader.uid != 0 and set(map(_READ_ALL.__and__, modes)) != {_READ_ALL}:
            return False   # someone cannot read one: the file-by-file path looks closer
        self.hits += len(chosen)
        if self.keep is not None:   # nightly: only the files new or changed since the ledger
            kept = list(map(self.keep, chosen, sizes, mtimes))
            chosen, sizes, mtimes = (list(compress(col, kept))
                                     for col in (chosen, sizes, mtimes))
        cols = self.cat.columns
        cols.relpath.extend(chosen)
        cols.size.extend(sizes)     # type: ignore[attr-defined]
        cols.mtime.extend(mtimes)   # type: ignore[attr-defined]
        return True

    def file_by_file(self, rel_dir: str, path: str, listing: _Listing) -> None:
        cat, cols = self.cat, self.cat.columns
        symlinks, keep = self.symlinks, self.keep
        prefix = f"{rel_dir}/" if rel_dir else ""
        for i, name in enumerate(listing.names):
            rel = prefix + name
            if not _valid_utf8(rel):
                if self.selected(rel):
                    self.hits += 1
                    cat.refused.append(Problem(_printable(rel),
                                               "the file name is not valid UTF-8"))
                continue
            if not self.selected(rel):
                continue
            self.hits += 1
            failed = listing.errors.get(i)
            if failed is not None:
                cat.refused.append(Problem(rel, "vanished while cataloguing"
                                           if failed[0] == errno.ENOENT
                                           else f"cannot stat: {failed[1]}"))
                continue
            file_path = os.path.join(path, name)
            verdict = classify(file_path, listing.stat(i), symlinks)
            if verdict.skipped:
                cat.skipped.append(Problem(rel, verdict.skipped))
                continue
            if verdict.refused or verdict.missing:
                cat.refused.append(Problem(rel, verdict.refused or "dangling symlink"))
                continue
            st = verdict.st
            if keep is not None and not keep(rel, st.st_size, st.st_mtime):
                continue
            if not self.reader.can_read(st, file_path):
                cat.refused.append(Problem(rel, f"{UNREADABLE} or exclude it"))
                continue
            if verdict.link_dir is not None and not _inside(verdict.link_dir, self.root_real):
                cat.outside_targets.add(verdict.link_dir)
            cols.add(rel, st.st_size, st.st_mtime)


class _Stat(NamedTuple):
    """What the walk uses of an lstat."""

    st_mode: int
    st_size: int
    st_mtime: float
    st_uid: int
    st_gid: int


class _Listing(NamedTuple):
    """A directory's entries in name order, each one's lstat as columns (a helper process
    sends them back as a few arrays, not a stat object each), the entries whose lstat
    failed (position -> (errno, strerror)), and why the directory itself could not be
    listed (or None)."""

    names: list[str]
    modes: Sequence[int]
    sizes: Sequence[int]
    mtimes: Sequence[float]
    uids: Sequence[int]
    gids: Sequence[int]
    errors: dict[int, tuple[int, str]]
    failed: str | None = None

    def stat(self, i: int) -> _Stat:
        return _Stat(self.modes[i], self.sizes[i], self.mtimes[i], self.uids[i], self.gids[i])

    def only(self, keep: list[bool]) -> _Listing:
        positions = list(compress(range(len(self.names)), keep))
        renumber = {old: new for new, old in enumerate(positions)}
        return _Listing(list(compress(self.names, keep)),
                        *(array(col.typecode, compress(col, keep))  # type: ignore[attr-defined]
                          for col in (self.modes, self.sizes, self.mtimes, self.uids,
                                      self.gids)),
                        {renumber[i]: e for i, e in self.errors.items() if i in renumber})


_MODE, _SIZE_OF, _MTIME_OF, _UID, _GID = map(attrgetter, (
    "st_mode", "st_size", "st_mtime", "st_uid", "st_gid"))


def _list_dir(path: str) -> _Listing:
    """One directory's names, sorted, and their lstat, made in C against the directory's
    descriptor (no DirEntry objects, no path lookup from the root: a third of a walk).
    Runs in a helper process as well: takes and returns only picklable values."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        return _Listing([], (), (), (), (), (), {}, exc.strerror or str(exc))
    try:
        names = sorted(os.listdir(fd))
        lstat_here = partial(os.stat, dir_fd=fd, follow_symlinks=False)
        errors: dict[int, tuple[int, str]] = {}
        try:
            stats: list[Any] = list(map(lstat_here, names))
        except OSError:
            stats = []
            for i, name in enumerate(names):
                try:
                    stats.append(lstat_here(name))
                except OSError as exc:
                    errors[i] = (exc.errno or 0, exc.strerror or str(exc))
                    stats.append(_Stat(0, 0, 0.0, 0, 0))
    except OSError as exc:
        return _Listing([], (), (), (), (), (), {}, exc.strerror or str(exc))
    finally:
        os.close(fd)
    return _Listing(names, array("Q", map(_MODE, stats)), array("q", map(_SIZE_OF, stats)),
                    array("d", map(_MTIME_OF, stats)), array("Q", map(_UID, stats)),
                    array("Q", map(_GID, stats)), errors)


POOL_AFTER = 20_000   # entries listed before helper processes are worth their start


def _scan(root: Path, exclude: tuple[str, ...], cat: Catalogue, walkers: int = 1,
          prune: frozenset[str] = frozenset()
          ) -> Iterator[tuple[str, str, _Listing, list[Problem]]]:
    """Depth-first, name-ordered walk: per directory ("" for the root) its relative POSIX
    path, its path, its non-directories (a _Listing) and its directory symlinks as skipped
    problems. With ``walkers`` > 1, once POOL_AFTER entries are seen, helper processes
    list the next directories on the stack while the caller looks at this one."""
    pool_after = POOL_AFTER
    stack: list[tuple[str, str]] = [(str(root), "")]
    helpers = _Helpers(min(walkers, len(os.sched_getaffinity(0))))
    seen = 0
    try:
        while stack:
            if seen >= pool_after:
                helpers.prefetch(p for p, _ in reversed(stack))
            path, rel = stack.pop()
            listing = helpers.listing(path)
            if listing.failed is not None:
                cat.refused.append(Problem(rel or ".",
                                           f"cannot list directory: {listing.failed}"))
                continue
            seen += len(listing.names)
            subdirs = []
            dir_links = []
            modes = listing.modes
            if any(map(stat.S_ISDIR, modes)) or any(map(stat.S_ISLNK, modes)):
                keep = []
                for name, mode in zip(listing.names, modes):   # 0: its lstat failed
                    child = f"{rel}/{name}" if rel else name
                    if stat.S_ISDIR(mode):
                        if child not in prune and not dir_pruned(child, exclude):
                            subdirs.append((os.path.join(path, name), child))
                        keep.append(False)
                    elif stat.S_ISLNK(mode) and _is_dir(os.path.join(path, name)):
                        dir_links.append(Problem(child, "directory symlink not followed"))
                        keep.append(False)
                    else:
                        keep.append(True)
                listing = listing.only(keep)
            if listing.names or dir_links:
                yield rel, path, listing, dir_links
            stack.extend(reversed(subdirs))
    finally:
        helpers.close()


class _Helpers:
    """Helper processes that list directories ahead of the walk, at most 2 per helper
    ahead. They are forked, and only while this process has no other thread (a fork copies
    a lock another thread may hold); spawning would run the caller's main script again in
    each. Any failure of theirs (none could start, one was killed) and the walk lists the
    directory itself."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.pool: Any = None
        self.ahead: dict[str, Any] = {}

    def prefetch(self, next_paths: Iterable[str]) -> None:
        if self.count < 2:
            return
        if self.pool is None:
            import multiprocessing
            import threading
            from concurrent.futures import ProcessPoolExecutor

            if threading.active_count() > 1:
                self.count = 0
                return
            try:
                self.pool = ProcessPoolExecutor(
                    self.count, mp_context=multiprocessing.get_context("fork"))
            except (OSError, ValueError):
                self.count = 0
                return
        for path in islice(next_paths, 2 * self.count):
            if path not in self.ahead:
                try:
                    self.ahead[path] = self.pool.submit(_list_dir, path)
                except Exception:   # a broken pool: the walk goes on alone
                    self.close()
                    return

    def listing(self, path: str) -> _Listing:
        future = self.ahead.pop(path, None)
        if future is not None:
            try:
                return future.result()
            except Exception:
                self.close()
        return _list_dir(path)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool, self.ahead, self.count = None, {}, 0


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
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
    mtime) rather than an object each: orjson writes the columns (0.1 s a million files)
    and parses them in 0.3 s, which is what lets ``plan --catalogue`` stay near 1.5x of
    ``find``. With it the source it was made for, the skipped entries and the symlink
    targets outside the root (Apptainer binds). The header is json.dumps(sort_keys=True,
    ensure_ascii=False), the columns compact, streamed 65,536 files at a time (the whole of
    it at once cost planning 150 MB at a million files): the same catalogue gives the same
    bytes. Returns the file's sha256."""
    count = cat.file_count

    def block(col: str, start: int, stop: int) -> list[Any]:   # not all of a column at once
        part = getattr(cat.columns, col)[start:stop]
        return part.tolist() if isinstance(part, array) else part

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
                yield (b"," if i else b"") + _json_items(block(col, i, i + (1 << 16)))
            yield b"]"
        yield rest.encode("utf-8")

    return atomic_write_blocks(path, blocks())


def _json_items(values: list[Any]) -> bytes:
    """A JSON array's items without the brackets, by orjson (five times quicker than json's
    C encoder: a second at five million files); json for what orjson refuses."""
    import orjson

    try:
        return orjson.dumps(values)[1:-1]
    except TypeError:
        return json.dumps(values, ensure_ascii=False)[1:-1].encode("utf-8")


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
        ok = ok and (not sizes or (min(sizes) >= 0 and max(sizes) < 1 << 63)) \
            and sum(sizes) == doc["bytes"] \
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
                    outside_targets=outside,
                    columns=Columns(rels, array("q", sizes), array("d", mtimes)))
    return cat, doc
