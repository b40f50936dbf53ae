"""files: atomic writes, JSON lines (torn last line), one-read checksums."""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import zlib
from pathlib import Path

import pytest

from dac_upload.files import (
    JsonlAppender,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_jsonl,
    read_checksums,
    read_json,
    read_jsonl,
)


def test_atomic_write_json(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    obj = {"b": [1, 2.5, None], "a": {"ü": "naïve"}, "c": True}
    atomic_write_json(path, obj)
    assert json.loads(path.read_text(encoding="utf-8")) == obj
    assert read_json(path) == obj
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n")
    assert text.index('"a"') < text.index('"b"') < text.index('"c"')  # sorted keys
    assert "naïve" in text  # not \u-escaped
    assert os.listdir(tmp_path) == ["run.json"]  # no temp file left behind
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_atomic_write_json_is_byte_identical_on_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    atomic_write_json(path, {"z": 1, "a": [3, 2]})
    first = path.read_bytes()
    atomic_write_json(path, {"a": [3, 2], "z": 1})
    assert path.read_bytes() == first


def test_atomic_write_json_compact(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    obj = {"files": [{"relpath": "ü b", "size": 1}], "a": 1}
    atomic_write_json(path, obj, pretty=False)
    expected = '{"a": 1, "files": [{"relpath": "ü b", "size": 1}]}\n'
    assert path.read_text(encoding="utf-8") == expected
    assert read_json(path) == obj


def test_atomic_write_replaces_and_sets_mode(tmp_path: Path) -> None:
    path = tmp_path / "array.sh"
    path.write_text("old")
    atomic_write_bytes(path, b"#!/bin/bash\n", 0o755)
    assert path.read_bytes() == b"#!/bin/bash\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert os.listdir(tmp_path) == ["array.sh"]


def test_atomic_write_failure_leaves_old_content_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    atomic_write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"v": object()})  # not JSON: fails before any temp file
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert read_json(path) == {"v": 1}
    assert os.listdir(tmp_path) == ["x.json"]


def test_jsonl_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    records = [{"relpath": "a b", "size": 1}, {"relpath": "ü", "size": 2}, {}]
    atomic_write_jsonl(path, iter(records))
    assert list(read_jsonl(path)) == records
    assert path.read_text(encoding="utf-8").splitlines()[0] == '{"relpath": "a b", "size": 1}'


def test_read_jsonl_ignores_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text('{"name": "a"}\n\n{"name": "b"}\n{"name": "c", "sta', encoding="utf-8")
    assert list(read_jsonl(path)) == [{"name": "a"}, {"name": "b"}]


def test_read_jsonl_skips_a_torn_record_inside_the_file(tmp_path: Path) -> None:
    """A killed attempt's fragment, ended by the next attempt's newline, is not a record."""
    path = tmp_path / "r.jsonl"
    path.write_text('{"name": "a"}\n{"name": "x", "sta\n{"name": "b"}\n', encoding="utf-8")
    assert list(read_jsonl(path)) == [{"name": "a"}, {"name": "b"}]


def test_appender_appends_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    with JsonlAppender(path) as out:
        out.append({"name": "a", "n": 1})
    with JsonlAppender(path) as out:
        out.append({"name": "b"})
    assert path.read_text(encoding="utf-8") == '{"n": 1, "name": "a"}\n{"name": "b"}\n'
    assert list(read_jsonl(path)) == [{"name": "a", "n": 1}, {"name": "b"}]


def test_appender_fsyncs_at_most_every_sync_every_seconds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each record reaches the kernel at once (a killed task loses none); fsync only when
    sync_every has passed since the last one, and on close."""
    import dac_upload.files as files_mod

    synced: list[int] = []
    monkeypatch.setattr(files_mod.os, "fsync", lambda fd: synced.append(fd))
    clock = [100.0]
    monkeypatch.setattr(files_mod.time, "monotonic", lambda: clock[0])
    path = tmp_path / "results.jsonl"
    with JsonlAppender(path, sync_every=1.0) as out:
        for i in range(5):
            out.append({"i": i})
            assert path.read_text().count("\n") == i + 1      # flushed: visible at once
        assert synced == []
        clock[0] += 1.0
        out.append({"i": 5})
        assert len(synced) == 1
        out.append({"i": 6})
        assert len(synced) == 1
    assert len(synced) == 2                                    # close
    with JsonlAppender(path) as out:                           # default: every record
        out.append({"i": 7})
        out.append({"i": 8})
    assert len(synced) == 4


@pytest.mark.parametrize("size", [0, 10, 9 * 1024 * 1024 + 7])
def test_read_checksums(tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert read_checksums(path) == (size, f"{zlib.adler32(data) & 0xFFFFFFFF:08x}",
                                    hashlib.md5(data).hexdigest())


def test_read_checksums_known_values(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert read_checksums(empty) == (0, "00000001", "d41d8cd98f00b204e9800998ecf8427e")
    small = tmp_path / "small"
    small.write_bytes(b"a")  # adler32 with leading zeros: 00620062
    assert read_checksums(small) == (1, "00620062", "0cc175b9c0f1b6a831c399e269772661")


def test_read_checksums_small_chunks_agree(tmp_path: Path) -> None:
    data = os.urandom(100_003)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert read_checksums(path, chunk=4096) == read_checksums(path)
    assert read_checksums(path, chunk=7)[1] == f"{zlib.adler32(data):08x}"


def test_read_checksums_reuses_a_buffer_per_thread(tmp_path: Path) -> None:
    """One buffer per thread, kept between files: a small file read after a large one sees
    none of the large one's bytes, and threads never share a buffer."""
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(5)
    datas = [rng.randbytes(n) for n in (3 * 1024 * 1024, 1, 0, 70_000, 5, 1024 * 1024)] * 8
    paths = []
    for i, data in enumerate(datas):
        paths.append(tmp_path / f"f{i}")
        paths[-1].write_bytes(data)
    want = [(len(d), f"{zlib.adler32(d) & 0xFFFFFFFF:08x}", hashlib.md5(d).hexdigest())
            for d in datas]
    assert [read_checksums(p) for p in paths] == want
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(read_checksums, paths)) == want


def test_read_checksums_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_checksums(tmp_path / "missing")


def test_atomic_writes_honour_the_umask(tmp_path: Path) -> None:
    """Like open(): a site with umask 007 keeps group-writable run files, 022 does not."""
    import dac_upload.files as files

    old = files._UMASK
    try:
        files._UMASK = 0o007
        files.atomic_write_text(tmp_path / "a", "x")
        files._UMASK = 0o022
        files.atomic_write_text(tmp_path / "b", "x")
        files.atomic_write_text(tmp_path / "c", "x", mode=0o600)
    finally:
        files._UMASK = old
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o660
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o600




def test_manifest_round_trip(tmp_path: Path) -> None:
    """Format 2: rows written by orjson, read back as the entries the worker, collect and
    status use; metadata only for the files that have it; the extra entry (the Butler
    dimension file) last, with its own metadata."""
    from dac_upload.files import manifest_bytes, read_manifest

    files = [("a/ü x.fits", "dp1/a/ü x.fits", 12345678901, 1700000000.123456789),
             ('b/"q"\\.fits', 'dp1/b/"q"\\.fits', 0, 1.5e-7)]
    meta = {"a/ü x.fits": {"rubin_butler": "data_product", "rubin_sidecar": "{}"},
            "elsewhere.fits": {"rubin_butler": "x"}}
    extra = [{"relpath": "/run/dims.yaml", "name": "dp1/dims.yaml", "size": 7,
              "mtime": 3.0, "meta": {"rubin_butler": "dim_file", "rubin_sidecar": ""}}]
    path = tmp_path / "task-00000.json"
    data = manifest_bytes({"run_id": "R", "task": 0, "source_root": "/src", "bytes": 5},
                          files, meta, extra)
    path.write_bytes(data)
    assert json.loads(data)["manifest_format"] == 2 and data.endswith(b"\n")
    got = read_manifest(path)
    assert (got["run_id"], got["task"], got["bytes"]) == ("R", 0, 5)
    assert got["files"] == [
        {"relpath": "a/ü x.fits", "name": "dp1/a/ü x.fits", "size": 12345678901,
         "mtime": 1700000000.123456789, "meta": meta["a/ü x.fits"]},
        {"relpath": 'b/"q"\\.fits', "name": 'dp1/b/"q"\\.fits', "size": 0, "mtime": 1.5e-7},
        extra[0]]
    assert "columns" not in got and "meta" not in got


def test_manifest_of_an_earlier_version_is_read_as_it_is(tmp_path: Path) -> None:
    from dac_upload.files import read_manifest

    old = {"run_id": "R", "task": 3, "source_root": "/s", "bytes": 1,
           "files": [{"mtime": 2.5, "name": "n", "relpath": "r", "size": 1}]}
    (tmp_path / "m.json").write_text(json.dumps(old))
    assert read_manifest(tmp_path / "m.json") == old


def test_manifest_refuses_what_json_cannot_hold() -> None:
    from dac_upload.files import manifest_bytes

    with pytest.raises(ValueError, match="cannot write a manifest"):
        manifest_bytes({}, [("a", "a", 2**64, 1.0)])


@pytest.mark.parametrize("group_bytes", [1, 10, 1 << 20])
def test_write_files_atomically_in_groups(tmp_path: Path, group_bytes: int) -> None:
    from dac_upload.files import write_files_atomically

    items = [(tmp_path / f"f{i}.json", f"text {i}" if i % 2 else f"bytes {i}".encode())
             for i in range(25)]
    write_files_atomically(iter(items), tmp_path, group_bytes=group_bytes)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p, _ in items)
    for path, text in items:
        assert path.read_bytes() == (text.encode() if isinstance(text, str) else text)


def test_write_files_atomically_leaves_nothing_when_making_fails(tmp_path: Path) -> None:
    """A text that cannot be made (after some groups were written) leaves no file, under
    its name or as a temporary one."""
    from dac_upload.files import write_files_atomically

    def items():
        for i in range(10):
            if i == 7:
                raise ValueError("cannot make it")
            yield tmp_path / f"f{i}", b"x" * 100

    with pytest.raises(ValueError):
        write_files_atomically(items(), tmp_path, group_bytes=250)
    assert list(tmp_path.iterdir()) == []


def test_read_checksums_without_md5(tmp_path: Path) -> None:
    import zlib

    from dac_upload.files import read_checksums

    p = tmp_path / "f"
    p.write_bytes(b"x" * 5_000_000)
    assert read_checksums(p, md5=False) == (5_000_000, f"{zlib.adler32(p.read_bytes()):08x}",
                                            None)
    assert read_checksums(p)[2] is not None


def test_result_records_across_blocks_name_the_right_line(tmp_path: Path) -> None:
    """Records are parsed 8 MB of lines at a time: a bad line far into a large file is
    named by its own line number, and every other record is kept, in order."""
    from dac_upload.files import read_result_records

    pad = "x" * 480
    lines = [json.dumps({"name": f"f{i}", "status": "uploaded", "pad": pad})
             for i in range(40_000)]                       # about 20 MB: three blocks
    lines[30_000] = '{"name": "f30000", "status": "uplo'  # cut short, then a newline
    lines[30_001] = ""                                     # a blank line is no problem
    path = tmp_path / "task-00000.jsonl"
    path.write_text("\n".join(lines) + '\n{"name": "torn')
    problems: list[str] = []
    names = [r["name"] for r in read_result_records(path, problems, "results/t.jsonl")]
    assert names == [f"f{i}" for i in range(40_000) if i not in (30_000, 30_001)]
    assert problems == ["results/t.jsonl line 30001: an incomplete record (a task stopped "
                        "while writing it; ignored: the file's record from a later attempt "
                        "counts)"]


@pytest.mark.parametrize("head", [b"{head}\n", b"x" * 64])
def test_atomic_write_headed_pads_or_copies(tmp_path: Path, head: bytes) -> None:
    """A head that fits its room is padded to it with spaces and a newline; a longer one is
    followed by the body copied from the room onwards. Nothing else is left behind."""
    from dac_upload.files import atomic_write_headed

    target = tmp_path / "out"
    target.write_bytes(b"old")
    body = b"body " * 100_000
    fitted = atomic_write_headed(target, 16, lambda h: h.write(body), lambda: head)
    assert fitted == (len(head) < 16)
    pad = b" " * (16 - len(head) - 1) + b"\n" if fitted else b""
    assert target.read_bytes() == head + pad + body
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_write_headed_failure_leaves_the_old_file(tmp_path: Path) -> None:
    from dac_upload.files import atomic_write_headed

    target = tmp_path / "out"
    target.write_bytes(b"old")

    def body(handle: object) -> None:
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError):
        atomic_write_headed(target, 16, body, lambda: b"")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out"]
