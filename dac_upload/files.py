"""Atomic writes and JSON-lines helpers.

Anything another process reads (manifests, results, run.json, summary.json) is written to a
temporary file in the same directory, fsynced, then renamed over the target, so a reader sees
the old content or the new one, never half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from operator import itemgetter
from pathlib import Path
from typing import IO, Any, Callable

from . import __version__


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # honoured like open() would: group-writable sites stay so


def _synced_temp(path: Path, directory: Path, write: Callable[[IO[Any]], None],
                 text: bool) -> str:
    """``write(handle)`` into a new temporary file in ``directory`` named after ``path``,
    flushed and fsynced; its name. On failure it is removed again."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with (os.fdopen(fd, "w", encoding="utf-8", newline="") if text
              else os.fdopen(fd, "wb")) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _atomic_write(path: Path, mode: int, write: Callable[[IO[Any]], None],
                  text: bool, sync_dir: bool = True) -> None:
    """``write(handle)`` into a same-directory temp file, fsync, rename over ``path``; then
    fsync the directory, unless the caller does it once for many files (``sync_dir``)."""
    path = Path(path)
    _publish(_synced_temp(path, path.parent, write, text), path, mode, sync_dir)


def _publish(tmp: str, path: Path, mode: int, sync_dir: bool = True) -> None:
    """The synced temp file ``tmp`` renamed over ``path`` (removed if that fails)."""
    try:
        os.chmod(tmp, mode & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o666,
                       sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (same-directory temp file, fsync, rename)."""
    _atomic_write(path, mode, lambda handle: handle.write(data), text=False,
                  sync_dir=sync_dir)


def atomic_write_blocks(path: Path, blocks: Iterable[bytes], mode: int = 0o666) -> str:
    """Write ``blocks`` one after the other, atomically and streamed; return the file's
    sha256 (hashed as written, not read back)."""
    digest = hashlib.sha256()

    def write(handle: IO[Any]) -> None:
        for block in blocks:
            digest.update(block)
            handle.write(block)

    _atomic_write(path, mode, write, text=False)
    return digest.hexdigest()


def atomic_write_stream(path: Path, write: Callable[[IO[bytes]], None],
                        mode: int = 0o666) -> None:
    """``write(handle)`` (a binary file) into ``path`` atomically: temp file, fsync,
    rename, directory fsync."""
    _atomic_write(path, mode, write, text=False)


def atomic_write_headed(path: Path, room: int, body: Callable[[IO[bytes]], None],
                        head: Callable[[], bytes], mode: int = 0o666) -> bool:
    """Write atomically a file whose first bytes are known only once the rest is written
    (summary.json: its counts come first). ``body(handle)`` writes from offset ``room`` of
    the temp file; then ``head()``, padded to ``room`` with spaces and a newline (whitespace
    to JSON), is written before it, so no byte of the body is written twice. A head longer
    than that goes into another temp file, followed by a kernel copy of the body. True if the
    head fitted."""
    path = Path(path)
    first, fitted = b"", False

    def write(handle: IO[bytes]) -> None:
        nonlocal first, fitted
        handle.seek(room)
        body(handle)
        first = head()
        fitted = len(first) < room   # room for the newline that ends the padding
        if fitted:
            handle.seek(0)
            handle.write(first + b" " * (room - len(first) - 1) + b"\n")

    tmp = _synced_temp(path, path.parent, write, text=False)
    if not fitted:
        try:
            other = _synced_temp(path, path.parent, lambda handle: (
                handle.write(first), append_file(handle, Path(tmp), start=room)), text=False)
        finally:
            Path(tmp).unlink(missing_ok=True)
        tmp = other
    _publish(tmp, path, mode)
    return fitted


def append_file(handle: IO[bytes], source: Path, start: int = 0) -> None:
    """Append the bytes of ``source`` from offset ``start`` to ``handle`` inside the kernel
    (copy_file_range: the 500 MB of a million files' summary entries in 0.1 s, against 2 s
    read and written back by Python); by reads where the file systems cannot."""
    handle.flush()
    with open(source, "rb") as src:
        offset = start
        left = os.fstat(src.fileno()).st_size - start
        try:
            while left > 0:
                copied = os.copy_file_range(src.fileno(), handle.fileno(), left, offset)
                if copied == 0:
                    break
                left -= copied
                offset += copied
        except OSError:   # EXDEV, ENOSYS, EINVAL: the copy goes on from where it stopped
            pass
        src.seek(offset)
        shutil.copyfileobj(src, handle, 8 << 20)


def link_or_copy(source: Path, target: Path, block: int = 8 << 20) -> None:
    """Hard-link ``source`` as ``target`` (a new name, no bytes written: dac-upload never
    changes a file it wrote in place, it replaces it); copy it atomically where a link is
    impossible (another file system, links not allowed)."""
    try:
        os.link(source, target)
        _fsync_dir(Path(target).parent)
        return
    except OSError:
        pass

    def blocks() -> Iterator[bytes]:
        with open(source, "rb") as handle:
            while chunk := handle.read(block):
                yield chunk

    atomic_write_blocks(target, blocks())


def write_files_atomically(items: Iterable[tuple[Path, str | bytes]], directory: Path,
                           mode: int = 0o666, threads: int = 8,
                           group_bytes: int = 256 << 20) -> None:
    """Many files of one directory, each atomically: texts are made up to ``group_bytes``
    at a time, then a pool writes each to a temporary file and fsyncs it (the file system
    and the disk work on several at once, and no writer waits for the GIL: writing from a
    pool while the next texts were being made left the writers starved); once all are
    written, each is renamed into place and the directory fsynced once. Nothing appears
    under its name before its bytes are on disk; on failure the temporary files are
    removed. A million files' manifests (90 MB, one group) are written in 0.2 s, against
    0.3-0.7 s one after the other; a Butler source's sidecars (1-2 KB a file) make several
    groups, so memory stays bounded."""
    from concurrent.futures import ThreadPoolExecutor

    temps: list[tuple[str, Path]] = []

    def write(item: tuple[Path, bytes]) -> None:
        path, data = item
        tmp = _synced_temp(path, directory, lambda handle: handle.write(data), text=False)
        temps.append((tmp, path))   # list.append is atomic: the pool shares the list

    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            group: list[tuple[Path, bytes]] = []
            held = 0
            for path, text in items:
                group.append((path, text.encode("utf-8") if isinstance(text, str) else text))
                held += len(group[-1][1])
                if held >= group_bytes:
                    list(pool.map(write, group))
                    group, held = [], 0
            list(pool.map(write, group))
            del group
        for tmp, path in temps:
            os.chmod(tmp, mode & ~_UMASK)
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(directory)


def atomic_write_lines(path: Path, lines: Iterable[str], mode: int = 0o666) -> None:
    """Write text lines (each ending in a newline) atomically, streamed: a long list is
    never held as one string."""
    _atomic_write(path, mode, lambda handle: handle.writelines(lines), text=True)


MANIFEST_FORMAT = 2
PACKED_MANIFEST_FORMAT = 3   # format 2 and its "archives": read by workers that pack
MANIFEST_COLUMNS = ("relpath", "name", "size", "mtime")


def manifest_bytes(header: dict[str, Any], files: Sequence[tuple[str, str, int, float]],
                   meta: dict[str, Any] | None = None,
                   extra: Iterable[dict[str, Any]] = (),
                   archives: Sequence[dict[str, Any]] = ()) -> bytes:
    """A task's manifest (format 2): ``header``, then one row [relpath, name, size, mtime]
    per file (``columns`` names them), the ``extra`` entries (dicts with those keys) as more
    rows, and ``meta`` (relpath -> the DID metadata that file gets) for the files that have
    it; ``archives`` ({name, members: row numbers, bytes}: packing.pack_batch) make it format
    3, which a worker that cannot pack refuses. Rows rather than an object per file, written
    by orjson: a million files' manifests took 1.2 s of CPU as objects (json's encoder, or
    %-formatting), 0.7 s this way. Read it with :func:`read_manifest`."""
    import orjson

    extra = list(extra)
    meta = meta or {}
    rows: Any = files   # plain tuples: orjson writes them as they are
    if extra:
        rows = [*files, *([e[c] for c in MANIFEST_COLUMNS] for e in extra)]
    mine = {e["relpath"]: e["meta"] for e in extra if "meta" in e}
    if meta:
        mine.update((rel, meta[rel]) for rel in map(itemgetter(0), files) if rel in meta)
    doc = {**header, "manifest_format": PACKED_MANIFEST_FORMAT if archives else MANIFEST_FORMAT,
           "columns": list(MANIFEST_COLUMNS), "files": rows, "meta": mine}
    if archives:
        doc["archives"] = list(archives)
    try:
        return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)
    except TypeError as exc:   # orjson's: a size beyond 64 bits, a path that is not UTF-8
        raise ValueError(f"cannot write a manifest: {exc}") from None


def read_manifest(path: Path) -> dict[str, Any]:
    """A task's manifest with its "files" as dicts {relpath, name, size, mtime (, meta)},
    whichever format it was written in: 2 (rows and a meta map, :func:`manifest_bytes`) or
    1 (an object per file: runs planned by earlier versions)."""
    manifest = read_json(path)
    fmt = manifest.get("manifest_format", 1) if isinstance(manifest, dict) else None
    if fmt == 1:
        return manifest
    if fmt not in (MANIFEST_FORMAT, PACKED_MANIFEST_FORMAT):
        raise ValueError(f"{path}: manifest format {fmt!r}, which this dac-upload "
                         f"{__version__} cannot read (it reads 1 to {PACKED_MANIFEST_FORMAT}): run "
                         "the worker of the dac-upload that planned the run (rebuild the "
                         "Apptainer image)")
    try:
        columns, meta = manifest.pop("columns"), manifest.pop("meta")
        width = len(columns)
        if any(len(row) != width for row in manifest["files"]):
            raise ValueError("a row does not match the columns")
        manifest["files"] = [dict(zip(columns, row)) for row in manifest["files"]]
        for entry in manifest["files"]:
            if entry["relpath"] in meta:
                entry["meta"] = meta[entry["relpath"]]
        for archive in manifest.get("archives") or ():
            if not archive["members"] or any(
                    not 0 <= i < len(manifest["files"]) for i in archive["members"]):
                raise ValueError(f"archive {archive['name']} lists a member it has no row for")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: a damaged manifest ({type(exc).__name__}: {exc})") from None
    return manifest


def atomic_write_text(path: Path, text: str, mode: int = 0o666,
                      sync_dir: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode, sync_dir)


def atomic_write_json(path: Path, obj: Any, mode: int = 0o666, pretty: bool = True) -> None:
    """Key-sorted JSON so that re-running a step gives a byte-identical file. ``pretty=False``
    for machine-read files: only then does json use its C encoder (10x faster)."""
    text = json.dumps(obj, indent=1 if pretty else None, sort_keys=True,
                      ensure_ascii=False) + "\n"
    atomic_write_text(path, text, mode)


def atomic_write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    atomic_write_lines(path, (json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n"
                              for r in records))


def utc_now() -> str:
    """The one timestamp format of run.json, records, markers, the ledger and logs."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_json(path: Path) -> Any:
    """A JSON file, read by orjson (a manifest in a quarter of json's time); by json what
    orjson refuses (lone surrogates, integers beyond 64 bits, NaN), so the same documents
    are read, and a bad one raises json's own ValueError."""
    import orjson

    with open(path, "rb") as handle:
        data = handle.read()
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data.decode("utf-8"))


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the records of a JSON-lines file, skipping torn lines.

    A worker killed mid-write leaves an incomplete final line (which a later attempt ends
    with a newline before appending); every complete record is still valid. A torn record
    was never finished, so skipping it means its file is simply done again.
    """
    for _, line in _complete_lines(path):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield record


def _complete_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, stripped text) of each complete, non-empty line; a torn last line (no
    newline: a writer killed mid-line) ends the file."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.endswith("\n"):
                return
            if line.strip():
                yield number, line.strip()


def read_result_records(path: Path, problems: list[str] | None = None,
                        shown: str | None = None) -> Iterator[dict[str, Any]]:
    """The result records of a task's file (a torn last line skipped, as read_jsonl does:
    its writer is gone or still writing); any other line that is not a record (no JSON, a
    record cut short by a kill that a later attempt ended with a newline, JSON without a
    string "name" and "status") is skipped and said in ``problems`` with its line number,
    naming the file as ``shown``: what is not understood is reported, never acted on.

    Read 8 MB of lines at a time, each block parsed as one JSON array by one orjson call
    (a third of the time of a call per line); a block that does not parse as one record
    per line is read again line by line, to say which. Memory: the block, whatever the
    file's size."""
    import orjson  # the faster decoder; json still reads what orjson refuses

    shown = shown or str(path)
    number = 0   # lines before the block
    with open(path, "rb") as handle:
        while lines := handle.readlines(8 << 20):
            torn = not lines[-1].endswith(b"\n")   # only the file's last line can be
            if torn:
                lines.pop()
            stripped = list(map(bytes.strip, lines))
            texts = list(filter(None, stripped))
            try:
                records = orjson.loads(b"[" + b",".join(texts) + b"]")
            except orjson.JSONDecodeError:
                records = None
            if records is not None and len(records) == len(texts) and all(
                    type(r) is dict and type(r.get("name")) is str
                    and type(r.get("status")) is str for r in records):
                yield from records
            else:
                yield from _records_line_by_line(stripped, number, problems, shown)
            number += len(lines)
            if torn:
                return


def _records_line_by_line(lines: list[bytes], before: int, problems: list[str] | None,
                          shown: str) -> Iterator[dict[str, Any]]:
    import orjson

    for number, raw in enumerate(lines, before + 1):
        if not raw:
            continue
        try:
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:   # stricter than JSON (lone surrogates, ...)
                record = json.loads(raw.decode("utf-8", "replace"))
        except ValueError:
            if problems is not None:
                problems.append(f"{shown} line {number}: " + (
                    "an incomplete record (a task stopped while writing it; ignored: the "
                    "file's record from a later attempt counts)" if raw.startswith(b"{")
                    else "not a result record (ignored)"))
            continue
        if isinstance(record, dict) and isinstance(record.get("name"), str) \
                and isinstance(record.get("status"), str):
            yield record
        elif problems is not None:
            problems.append(f"{shown} line {number}: not a result record (no name and "
                            "status; ignored)")


class JsonlAppender:
    """Append records to a JSON-lines file, each flushed to the kernel before returning;
    fsynced by the first append ``sync_every`` seconds or more after the last fsync, and on
    close (``sync_every = 0``: every record).

    Used for per-file results: a task killed half-way leaves every record it finished. A
    node that crashes may lose the records written since the last fsync; the next attempt
    finds their files in Rucio (already_present). The bulk worker writes a chunk's records
    at once, and an fsync for each cost it 0.2 s per 1,000 files.
    """

    def __init__(self, path: Path, sync_every: float = 0.0) -> None:
        self.path = Path(path)
        self.sync_every = sync_every
        self._synced = time.monotonic()
        self._dirty = False
        torn = _ends_without_newline(self.path)
        self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        if torn:  # an earlier attempt was killed mid-record: end that fragment's line
            self._handle.write("\n")

    def append(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
        self._handle.flush()
        self._dirty = True
        if time.monotonic() - self._synced >= self.sync_every:
            self.sync()

    def sync(self) -> None:
        if self._dirty:
            os.fsync(self._handle.fileno())
            self._dirty = False
        self._synced = time.monotonic()

    def close(self) -> None:
        self._handle.flush()
        self.sync()
        self._handle.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ends_without_newline(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() == 0:
                return False
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"
    except FileNotFoundError:
        return False


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_THREAD_BUFFERS = threading.local()   # read_checksums' buffer, one per thread


def read_checksums(path: Path, chunk: int = 4 << 20,
                   md5: bool = True) -> tuple[int, str, str | None]:
    """(bytes, adler32 as 8 hex digits, md5 hex or None without ``md5``) from ONE read of
    the file: on cold parallel file systems the read, not the arithmetic, is what costs; on
    a warm one md5 is (about 1.3 s of CPU per GB here, adler32 0.3 s). The buffer is the
    calling thread's, kept between files: a new 4 MiB one per file was zeroed and
    page-faulted in (by the GIL's holder) for every file, most of which are far smaller."""
    adler = 1
    digest = hashlib.md5(usedforsecurity=False) if md5 else None   # a checksum, not security
    size = 0
    buf = getattr(_THREAD_BUFFERS, "buf", None)
    if buf is None or len(buf) != chunk:
        buf = _THREAD_BUFFERS.buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as handle:
        while True:
            n = handle.readinto(buf)
            if not n:
                break
            adler = zlib.adler32(view[:n], adler)
            if digest is not None:
                digest.update(view[:n])
            size += n
    return size, f"{adler & 0xFFFFFFFF:08x}", digest.hexdigest() if digest else None

