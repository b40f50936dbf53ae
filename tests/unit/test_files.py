"""files: atomic writes, JSON lines (torn last line), one-read checksums."""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import threading
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


def test_in_two_processes_does_every_item_once(tmp_path: Path) -> None:
    """Half the items in a forked child, half here; every item done exactly once."""
    from dac_upload.files import in_two_processes

    def work(part: list[int]) -> None:
        for i in part:
            with open(tmp_path / f"{i}.{os.getpid()}", "x"):
                pass

    in_two_processes(list(range(100)), work, least=10)
    done = sorted(p.name for p in tmp_path.iterdir())
    assert sorted(int(n.split(".")[0]) for n in done) == list(range(100))
    if len(os.sched_getaffinity(0)) >= 2 and threading.active_count() == 1:
        assert len({n.split(".")[1] for n in done}) == 2      # two processes did it


def test_in_two_processes_fails_when_the_child_fails(tmp_path: Path) -> None:
    from dac_upload.files import in_two_processes

    if len(os.sched_getaffinity(0)) < 2 or threading.active_count() > 1:
        pytest.skip("runs in one process here")

    def work(part: list[int]) -> None:
        if 1 in part:                                          # the child's half
            raise OSError("disk full")

    with pytest.raises(OSError, match="helper process"):
        in_two_processes(list(range(100)), work, least=10)


def test_in_two_processes_stays_in_one_without_room(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Not enough memory for a child's copies: everything in this process."""
    import dac_upload.files as files_mod

    monkeypatch.setattr(files_mod, "_room_for_a_copy", lambda: False)
    pids: set[int] = set()
    files_mod.in_two_processes(list(range(100)), lambda part: pids.add(os.getpid()), least=10)
    assert pids == {os.getpid()}
