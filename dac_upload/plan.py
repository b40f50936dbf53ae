"""Pure planning: catalogue entries -> Rucio names -> balanced batches; the run-directory layout.

Nothing here touches the file system, Slurm or Rucio, so it is tested in milliseconds.
"""

from __future__ import annotations

import heapq
import operator
from array import array
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from operator import itemgetter

from .catalogue import Columns, Entry, Problem
from .config import NamingConfig
from .naming import all_names_valid, make_name, name_problem

PlannedFile = tuple[str, str, int, float]
"""A catalogued file with its Rucio name: (relpath, name, size, mtime), indexed by REL,
NAME, SIZE and MTIME. Made on demand from a FileTable (a batch's files, for its manifest);
orjson writes plain tuples into the manifests as they are."""
REL, NAME, SIZE, MTIME = range(4)
_REL, _SIZE = itemgetter(REL), itemgetter(SIZE)


class FileTable(Sequence[PlannedFile]):
    """The planned files as columns (the catalogue's own, shared, not copied), a sequence of
    PlannedFile tuples made one at a time on demand. The usual name is the prefix and the
    relpath: then no name is held (names is None) and a batch's are made as its manifest is
    written. Five million files as tuples and names cost 1.4 GB; as columns 0.5 GB."""

    __slots__ = ("mtimes", "names", "prefix", "rels", "sizes")

    def __init__(self, rels: Sequence[str], sizes: Sequence[int], mtimes: Sequence[float],
                 prefix: str = "", names: Sequence[str] | None = None) -> None:
        self.rels, self.sizes, self.mtimes = rels, sizes, mtimes
        self.prefix, self.names = prefix, names

    @classmethod
    def of(cls, files: Sequence[PlannedFile]) -> FileTable:
        if isinstance(files, FileTable):
            return files
        return cls(list(map(_REL, files)), list(map(_SIZE, files)),
                   list(map(itemgetter(MTIME), files)), names=list(map(itemgetter(NAME), files)))

    def name(self, i: int) -> str:
        return self.names[i] if self.names is not None else self.prefix + self.rels[i]

    def __len__(self) -> int:
        return len(self.rels)

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return (self.rels[i], self.name(i), self.sizes[i], self.mtimes[i])

    def __iter__(self) -> Iterator[PlannedFile]:
        names = self.names if self.names is not None else map(self.prefix.__add__, self.rels)
        return zip(self.rels, names, self.sizes, self.mtimes)

    def take(self, positions: Sequence[int]) -> list[PlannedFile]:
        """The files at ``positions``, as tuples, made in C (zip and map), not by a call
        each (0.8 s at a million files)."""
        rels = list(map(self.rels.__getitem__, positions))
        names: Iterable[str] = (map(self.names.__getitem__, positions)
                                if self.names is not None else map(self.prefix.__add__, rels))
        return list(zip(rels, names, map(self.sizes.__getitem__, positions),
                        map(self.mtimes.__getitem__, positions)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(map(operator.eq, self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"FileTable({list(self)!r})"


class Batch:
    """One array task's files: positions into the run's FileTable (8 bytes a file), their
    tuples made when asked for (the manifest)."""

    __slots__ = ("bytes", "index", "positions", "table")

    def __init__(self, index: int, table: FileTable, positions: Sequence[int],
                 nbytes: int = -1) -> None:
        self.index, self.table = index, table
        self.positions = positions if isinstance(positions, array) else array("q", positions)
        self.bytes = nbytes if nbytes >= 0 else sum(map(table.sizes.__getitem__, positions))

    @property
    def count(self) -> int:
        return len(self.positions)

    @property
    def files(self) -> tuple[PlannedFile, ...]:
        return tuple(self.table.take(self.positions))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Batch):
            return NotImplemented
        return (self.index, self.bytes, self.files) == (other.index, other.bytes, other.files)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Batch({self.index}, {self.files!r}, {self.bytes})"


def name_files(entries: Sequence[Entry] | Columns,
               cfg: NamingConfig) -> tuple[FileTable, list[Problem]]:
    """Give every file (Entry tuples, or a catalogue's columns) its Rucio name; report
    invalid and duplicate names (both refused). The usual case (every name the prefix and a
    valid relpath, all unique) is decided for all files at once, by string tests that run
    in C, and holds no name; only otherwise does it go file by file, to say which."""
    cols = entries if isinstance(entries, Columns) else Columns.of(entries)
    rels = cols.relpath
    if cfg.replace_invalid is None and rels and all_names_valid(rels, cfg.prefix) \
            and _all_distinct(rels):
        return FileTable(rels, cols.size, cols.mtime, cfg.prefix), []
    kept: list[int] = []
    names: list[str] = []
    problems: list[Problem] = []
    first_with_name: dict[str, str] = {}
    for i, relpath in enumerate(rels):
        name = make_name(relpath, cfg.prefix, cfg.replace_invalid)
        why = name_problem(name)
        if why:
            fix = ("rename the file or exclude it" if cfg.replace_invalid is not None
                   else 'rename the file, exclude it, or set [naming] replace_invalid = "_"')
            if len(name) > 250:
                fix = "shorten the path or the [naming] prefix, or exclude it"
            problems.append(Problem(relpath, f"{why}; {fix}"))
            continue
        other = first_with_name.get(name)
        if other is not None:
            problems.append(Problem(relpath, f"gets the same Rucio name {name!r} as {other!r}; "
                                    "rename one of them or change [naming]"))
            continue
        first_with_name[name] = relpath
        kept.append(i)
        names.append(name)
    sizes, mtimes = cols.size, cols.mtime
    return FileTable([rels[i] for i in kept], array("q", map(sizes.__getitem__, kept)),
                     array("d", map(mtimes.__getitem__, kept)), names=names), problems


def _all_distinct(names: Sequence[str]) -> bool:
    """No name twice. A catalogue's paths are mostly in order already: each one greater
    than the one before proves it in one pass of C comparisons (0.03 s a million, against
    0.14 s for a set); otherwise the set decides."""
    return _in_order(names) or len(set(names)) == len(names)


def _in_order(names: Sequence[str]) -> bool:
    return all(map(operator.lt, names, islice(names, 1, None)))


def make_batches(files: Sequence[PlannedFile], files_per_batch: int | None,
                 bytes_per_batch: int | None) -> list[Batch]:
    """Split ``files`` (a FileTable, or PlannedFile tuples) into batches that respect both
    limits, balanced by bytes.

    With only ``files_per_batch`` (the usual job), the files, largest first, are dealt to
    the fewest batches that hold them like cards, back and forth ("snake"): every batch
    gets the same count (one more at most) and their bytes differ by at most the largest
    file; it is done by slicing, in C (a million files: 0.05 s, against 0.8 s for LPT's
    loop). With a byte limit: largest file first into the batch with the fewest bytes that
    still has room (LPT), which keeps the slowest array task close to the mean. When the
    files do not fit into the smallest possible number of batches, the whole assignment is
    redone with more batches (rather than opening a batch for the leftovers, which would
    leave it nearly empty). A
    file larger than ``bytes_per_batch`` gets a batch of its own. The result depends only on
    the input (ties broken by relpath), and the files in a batch are listed in path order for
    locality on the source file system. Batches hold positions into the table, not files.
    """
    if not files:
        return []
    table = FileTable.of(files)
    rels, sizes = table.rels, table.sizes
    n = len(table)
    max_files = files_per_batch or n
    max_bytes = bytes_per_batch
    # positions in path order (a walk's, usually, already are: no sort, no list)
    by_path: Sequence[int] = range(n) if _in_order(rels) else \
        sorted(range(n), key=rels.__getitem__)
    alone = [i for i in range(n) if sizes[i] > max_bytes] if max_bytes else []
    rest = [i for i in by_path if sizes[i] <= max_bytes] if max_bytes else by_path
    members: list[Sequence[int]] = []
    nbytes: list[int] = []
    if rest and not max_bytes:   # ranks in path order, dealt largest first
        rest_sizes = sizes if isinstance(rest, range) else array("q", map(sizes.__getitem__,
                                                                             rest))
        order = _largest_first(rest_sizes)
        step = 2 * -(-len(rest) // max_files)
        at = len(rest).__rmod__   # a key's rank
        for j in range(step // 2):
            ranks = sorted(map(at, order[j::step] + order[step - 1 - j::step]))
            members.append(array("q", ranks if isinstance(rest, range)
                                 else map(rest.__getitem__, ranks)))   # in path order
        del order
        nbytes = [sum(map(sizes.__getitem__, m)) for m in members]
    elif rest:
        ordered = sorted(rest, key=sizes.__getitem__, reverse=True)
        m = _min_batches(ordered, sizes, max_files, max_bytes)
        while True:
            lists, overflow = _lpt(ordered, sizes, m, max_files, max_bytes)
            if not overflow:
                break
            m += _min_batches(overflow, sizes, max_files, max_bytes)
        members = [sorted(one, key=rels.__getitem__) for one in lists]
        nbytes = [sum(map(sizes.__getitem__, one)) for one in members]
    done = [(one, b) for one, b in zip(members, nbytes) if one]   # each in path order
    done += [([i], sizes[i]) for i in alone]
    done.sort(key=lambda mb: rels[mb[0][0]])
    return [Batch(i, table, one, b) for i, (one, b) in enumerate(done)]


def _largest_first(sizes: Sequence[int]) -> list[int]:
    """Ranks 0..n-1 by size, largest first, ties in rank order, as keys (MAX - size) * n +
    rank in one sorted list (``key % n`` is the rank): a sort by key would hold a second list
    of n sizes beside it (200 MB at five million files)."""
    n, top = len(sizes), max(sizes)
    return sorted(map(operator.add, map(n.__mul__, map(top.__sub__, sizes)), range(n)))


def _min_batches(positions: Sequence[int], sizes: Sequence[int], max_files: int,
                 max_bytes: int | None) -> int:
    n = -(-len(positions) // max_files)
    if max_bytes:
        n = max(n, -(-sum(map(sizes.__getitem__, positions)) // max_bytes))
    return max(n, 1)


def _lpt(ordered: Sequence[int], sizes: Sequence[int], n: int, max_files: int,
         max_bytes: int | None) -> tuple[list[list[int]], list[int]]:
    """Assign files (positions, largest first) to ``n`` batches; return (batches, files
    that fit none)."""
    members: list[list[int]] = [[] for _ in range(n)]
    heap = [(0, i) for i in range(n)]  # (bytes, batch) of batches that still take files
    overflow: list[int] = []
    heapreplace, heappop = heapq.heapreplace, heapq.heappop
    limit = max_bytes or 0
    for f in ordered:
        used, i = heap[0] if heap else (0, -1)
        while i >= 0 and len(members[i]) >= max_files:
            heappop(heap)  # full by count for good
            used, i = heap[0] if heap else (0, -1)
        size = sizes[f]
        if i < 0 or (limit and used + size > limit):
            overflow.append(f)  # the emptiest batch cannot take it: none can
            continue
        heapreplace(heap, (used + size, i))
        members[i].append(f)
    return members, overflow


def compress_indices(indices: Sequence[int]) -> str:
    """[0,1,2,3,7,9,10] -> '0-3,7,9-10' (Slurm's --array syntax)."""
    out: list[str] = []
    values = sorted(set(indices))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(out)
