"""Packing small files: which archive each file goes into (pure), and the archive the worker
builds from them (deterministic bytes, checksums as written, a changed member refused,
scratch space running out)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

import pytest
from test_bulk import FakeBulk, _adler
from unit_helpers import assert_valid_summary

from dac_upload.config import JobConfig
from dac_upload.files import read_jsonl, read_manifest
from dac_upload.packing import (
    ARCHIVE_SUFFIX,
    archive_name,
    member_overhead,
    pack_batch,
)
from dac_upload.pipeline import prepare_run
from dac_upload.rucio.client import DidInfo
from dac_upload.rucio.errors import RucioFatal
from dac_upload.runrecord import RunLayout
from dac_upload.upload.archive import (
    MemberChanged,
    MemberUnreadable,
    ScratchFull,
    ScratchUnusable,
    build_archive,
)
from dac_upload.upload.task import run_task


def _files(sizes: list[int]) -> list[tuple[str, str, int, float]]:
    return [(f"d/f{i:03d}", f"p/d/f{i:03d}", s, 1.5) for i, s in enumerate(sizes)]


# ------------------------------------------------------------------------- planning (pure)
def test_small_files_are_packed_in_path_order_large_ones_go_loose() -> None:
    files = _files([10, 5000, 20, 30, 9999, 40])
    archives, loose = pack_batch(files, below=100, target=10**6, prefix="p/.packed/")
    assert [a.members for a in archives] == [(0, 2, 3, 5)]
    assert loose == [1, 4]
    a = archives[0]
    assert a.name.startswith("p/.packed/") and a.name.endswith(ARCHIVE_SUFFIX)
    assert a.bytes == 98 + sum(files[i][2] + member_overhead(files[i][1]) for i in a.members)


def test_archives_fill_up_to_the_target_and_never_beyond() -> None:
    files = _files([100] * 50)
    one = 100 + member_overhead(files[0][1])
    target = 98 + 10 * one
    archives, loose = pack_batch(files, below=1000, target=target, prefix="x/")
    assert [len(a.members) for a in archives] == [10] * 5 and loose == []
    assert all(a.bytes <= target for a in archives)
    assert [m for a in archives for m in a.members] == list(range(50))   # in order, once each


def test_a_lone_small_file_is_not_an_archive() -> None:
    files = _files([10, 5000, 5000])
    archives, loose = pack_batch(files, below=100, target=10**6, prefix="x/")
    assert archives == [] and loose == [0, 1, 2]


def test_files_the_packer_refuses_go_loose() -> None:
    """A Butler source's own zips are never packed (ingest-zip reads no zip in a zip)."""
    files = _files([10, 10, 10, 10])
    archives, loose = pack_batch(files, 100, 10_000, "p/a/",
                                 packs=lambda rel: rel != "d/f001")
    (a,) = archives
    assert a.members == (0, 2, 3) and loose == [1]


def test_other_bytes_in_the_archive_give_it_another_name() -> None:
    """A Butler zip's index (another RUN, formatter or dataset id) is part of its name: the
    same files with another index never take the name of an archive already uploaded."""
    members = [("p/a", 1, 1.0), ("p/b", 2, 1.0)]
    plain = archive_name("p/x/", members)
    assert archive_name("p/x/", members, b"") == plain
    one, other = archive_name("p/x/", members, b"{run: a}"), archive_name("p/x/", members,
                                                                          b"{run: b}")
    assert len({plain, one, other}) == 3 and one == archive_name("p/x/", members, b"{run: a}")


def test_the_same_files_give_the_same_name_a_touched_one_another() -> None:
    files = _files([1, 2, 3])
    a1, _ = pack_batch(files, 100, 10**6, "x/")
    a2, _ = pack_batch(list(files), 100, 10**6, "x/")
    assert a1 == a2
    touched = [*files[:2], (files[2][0], files[2][1], 3, 2.5)]
    assert pack_batch(touched, 100, 10**6, "x/")[0][0].name != a1[0].name
    assert archive_name("x/", [("a", 1, 1.0)]) != archive_name("x/", [("a", 1, 1.0),
                                                                      ("b", 1, 1.0)])


# ------------------------------------------------------------------------- building
def _tree(tmp_path: Path, sizes: list[int]) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path / "src"
    entries = []
    for i, size in enumerate(sizes):
        p = root / f"d{i % 3}" / f"f{i:03d}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(size))
        st = p.stat()
        entries.append({"relpath": str(p.relative_to(root)), "name": f"pre/{p.relative_to(root)}",
                        "size": st.st_size, "mtime": st.st_mtime})
    return root, entries


def _adler_md5(data: bytes) -> tuple[str, str]:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}", hashlib.md5(data).hexdigest()


def test_archive_is_a_stored_zip_with_the_members_and_their_checksums(tmp_path: Path) -> None:
    root, entries = _tree(tmp_path, [0, 1, 1000, 70000, 3])
    built = build_archive(root, entries, tmp_path / "a.zip")
    data = (tmp_path / "a.zip").read_bytes()
    assert (built.bytes, (built.adler32, built.md5)) == (len(data), _adler_md5(data))
    assert not (tmp_path / "a.zip.part").exists()
    with zipfile.ZipFile(tmp_path / "a.zip") as zf:
        assert zf.testzip() is None
        infos = zf.infolist()
        assert [i.filename for i in infos] == [e["name"] for e in entries]
        assert {i.compress_type for i in infos} == {zipfile.ZIP_STORED}
        for e, m, i in zip(entries, built.members, infos):
            content = (root / e["relpath"]).read_bytes()
            assert zf.read(i) == content
            assert (m.bytes, m.adler32, m.md5) == (len(content), *_adler_md5(content))
            assert i.date_time == (1980, 1, 1, 0, 0, 0) and i.external_attr >> 16 == 0o100644
    # what rucio download runs to extract a member: Info-ZIP's unzip
    out = subprocess.run(["unzip", "-tq", str(tmp_path / "a.zip")], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_same_members_give_the_same_bytes(tmp_path: Path) -> None:
    root, entries = _tree(tmp_path, [10, 20, 30])
    a = build_archive(root, entries, tmp_path / "a.zip")
    os.utime(root / entries[0]["relpath"], (1, entries[0]["mtime"]))   # atime only
    b = build_archive(root, entries, tmp_path / "b.zip")
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    assert (a.adler32, a.md5, a.bytes) == (b.adler32, b.md5, b.bytes)


def test_more_than_65535_members_get_zip64_records(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    entries = []
    for i in range(65540):
        p = root / f"{i:05d}"
        p.write_bytes(b"x")
        entries.append({"relpath": p.name, "name": p.name, "size": 1,
                        "mtime": p.stat().st_mtime})
    build_archive(root, entries, tmp_path / "big.zip", md5=False)
    with zipfile.ZipFile(tmp_path / "big.zip") as zf:
        assert len(zf.infolist()) == 65540 and zf.read("65539") == b"x"
    out = subprocess.run(["unzip", "-tq", str(tmp_path / "big.zip")], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("change", ["size", "mtime", "gone"])
def test_a_changed_member_stops_the_build_and_leaves_nothing(tmp_path: Path, change: str
                                                             ) -> None:
    root, entries = _tree(tmp_path, [10, 20, 30])
    victim = root / entries[1]["relpath"]
    if change == "size":
        victim.write_bytes(b"longer than twenty bytes")
    elif change == "mtime":
        os.utime(victim, (1, entries[1]["mtime"] + 5))
    else:
        victim.unlink()
    kind = MemberUnreadable if change == "gone" else MemberChanged
    with pytest.raises(kind) as exc:
        build_archive(root, entries, tmp_path / "a.zip")
    assert exc.value.relpath == entries[1]["relpath"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_scratch_full_is_said_and_leaves_nothing(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root, entries = _tree(tmp_path, [10, 20, 30])
    import dac_upload.upload.archive as archive

    real = archive._ChecksummedStream.write
    written = [0]

    def full(self: Any, data: Any) -> int:
        written[0] += len(data)
        if written[0] > 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(archive._ChecksummedStream, "write", full)
    with pytest.raises(ScratchFull, match=r"no space left in .* for the archive a\.zip"):
        build_archive(root, entries, tmp_path / "a.zip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ------------------------------------------------------------------------- the worker
PACK_CONTENT = {**{f"small/m{i:02d}.json": bytes([i]) * (5 + i) for i in range(6)},
                "big.fits": b"B" * 5000}


class FakePacking(FakeBulk):
    """FakeBulk and the archive registration: archive -> its members as registered."""

    def __init__(self) -> None:
        super().__init__()
        self.constituents: dict[str, dict[str, dict[str, Any]]] = {}

    def add_to_archive(self, scope: str, archive: str, members: list[dict[str, Any]]) -> None:
        self.calls.append(("add_to_archive", len(members)))
        self._maybe_fail("add_to_archive")
        for m in members:
            self.constituents.setdefault(archive, {})[m["name"]] = m
            self.dids.setdefault(m["name"], DidInfo(m["bytes"], m["adler32"], m["md5"], None))


@pytest.fixture
def packed(make_job: Callable[..., JobConfig]) -> Callable[..., RunLayout]:
    def make(packing: str = 'below = "1 KiB"', upload: str = "") -> RunLayout:
        j = make_job(PACK_CONTENT, packing=packing, upload=upload,
                     naming='prefix = "p/"')
        return prepare_run(j, preflight=None).layout
    return make


def _members_of(zip_bytes: bytes) -> dict[str, bytes]:
    import io

    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def test_small_files_go_in_one_archive_registered_with_its_members(
        packed: Callable[..., RunLayout], tmp_path: Path) -> None:
    layout, rio = packed(), FakePacking()
    manifest = read_manifest(layout.manifest(0))
    assert manifest["manifest_format"] == 3 and len(manifest["archives"]) == 1
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 0
    recs = {r["name"]: r for r in read_jsonl(layout.result(0))}
    archive = manifest["archives"][0]["name"]
    assert archive.startswith("p/archives/") and archive.endswith(".zip")
    # on the RSE: the archive and the large file, nothing else; a rule on each of them only
    assert sorted(rio.on_disk) == sorted(["p/big.fits", archive])
    assert rio.rules == {"p/big.fits", archive}
    assert _members_of(rio.on_disk[archive]) == {
        f"p/{rel}": data for rel, data in PACK_CONTENT.items() if rel != "big.fits"}
    assert sorted(rio.constituents[archive]) == sorted(
        f"p/{rel}" for rel in PACK_CONTENT if rel != "big.fits")
    for rel, data in PACK_CONTENT.items():
        r = recs[f"p/{rel}"]
        assert r["status"] == "uploaded" and (r["bytes"], r["adler32"]) == (len(data),
                                                                            _adler(data))
        if rel == "big.fits":
            assert "archive" not in r
        else:
            assert r["archive"] == archive and r["pfn"] == f"file:///rse/{archive}"
            m = rio.constituents[archive][f"p/{rel}"]
            assert (m["bytes"], m["adler32"], m["md5"]) == (len(data), _adler(data),
                                                            hashlib.md5(data).hexdigest())
    assert not list(tmp_path.glob("**/dac-upload-pack-*"))    # scratch cleaned up
    # collect: each packed file says its archive and member path
    from dac_upload.collect import collect

    collect(layout.dir)
    summary = assert_valid_summary(json.loads(layout.summary.read_text()))
    entry = summary["files"]["user.test:p/small/m00.json"]
    assert (entry["archive"], entry["member"]) == (archive, "p/small/m00.json")
    assert "archive" not in summary["files"]["user.test:p/big.fits"]


def test_a_resubmission_finds_the_archive_and_registers_nothing_twice(
        packed: Callable[..., RunLayout]) -> None:
    layout, rio = packed(), FakePacking()
    rio.fail["add_to_archive"] = [RucioFatal("the server went away")]
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) != 0
    recs = {r["name"]: r for r in read_jsonl(layout.result(0))}
    assert {r["cause"] for n, r in recs.items() if n != "p/big.fits"} == {"interrupted"}
    first = dict(rio.on_disk)
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 0
    assert rio.on_disk == first                      # the same bytes, one archive
    assert len(rio.constituents) == 1 and len(next(iter(rio.constituents.values()))) == 6
    latest = {r["name"]: r for r in read_jsonl(layout.result(0))}
    assert {r["status"] for r in latest.values()} <= {"uploaded", "already_present"}


def test_a_member_that_changed_stops_its_archive_only(packed: Callable[..., RunLayout],
                                                      tmp_path: Path) -> None:
    layout, rio = packed(), FakePacking()
    (tmp_path / "data" / "small" / "m03.json").write_bytes(b"changed!")
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) != 0
    recs = {r["name"]: r for r in read_jsonl(layout.result(0))}
    assert recs["p/small/m03.json"]["cause"] == "changed"
    assert {recs[f"p/small/m{i:02d}.json"]["cause"] for i in (0, 1, 2, 4, 5)} == {"archive"}
    assert "m03.json" in recs["p/small/m00.json"]["error"]
    assert recs["p/big.fits"]["status"] == "uploaded"
    assert sorted(rio.on_disk) == ["p/big.fits"] and not rio.constituents


def test_an_io_error_in_scratch_fails_the_archive_with_its_cause_and_the_task_goes_on(
        packed: Callable[..., RunLayout], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO (or the scratch directory removed under the task) is not a crash of the worker:
    the archive's files get cause scratch, nothing of it is registered, the rest is done."""
    import dac_upload.upload.archive as archive

    def broken(self: Any, data: Any) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(archive._ChecksummedStream, "write", broken)
    with pytest.raises(ScratchUnusable, match=r"cannot write the archive a\.zip in .*: "
                       r"Input/output error"):
        build_archive(*_tree(tmp_path / "t", [10, 20]), tmp_path / "t" / "a.zip")
    layout, rio = packed(), FakePacking()
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) != 0
    recs = {r["name"]: r for r in read_jsonl(layout.result(0))}
    small = [recs[f"p/small/m{i:02d}.json"] for i in range(6)]
    assert {(r["status"], r["cause"]) for r in small} == {("failed", "scratch")}
    assert "Input/output error; set [packing] scratch" in small[0]["error"]
    assert recs["p/big.fits"]["status"] == "uploaded"
    assert sorted(rio.on_disk) == ["p/big.fits"] and not rio.constituents
    assert not list(tmp_path.glob("**/dac-upload-pack-*"))


def test_a_member_name_in_rucio_with_other_content_is_a_conflict_the_rest_registered(
        packed: Callable[..., RunLayout]) -> None:
    layout, rio = packed(), FakePacking()
    rio.add_existing("p/small/m01.json", b"something else", replica=False)
    run_task(layout.dir, 0, rucio_factory=rio.factory)
    recs = {r["name"]: r for r in read_jsonl(layout.result(0))}
    assert recs["p/small/m01.json"]["cause"] == "conflict"
    (_archive, members), = rio.constituents.items()
    assert "p/small/m01.json" not in members and len(members) == 5
    assert rio.dids["p/small/m01.json"].bytes == len(b"something else")   # left alone


def test_packing_is_refused_where_it_cannot_work(make_job: Callable[..., JobConfig]) -> None:
    from dac_upload.config import ConfigError

    with pytest.raises(ConfigError, match=r'needs \[upload\] mode = "bulk"'):
        make_job(PACK_CONTENT, packing='below = "1 KiB"', upload='mode = "stock"')
    with pytest.raises(ConfigError, match="larger than archive_size"):
        make_job(PACK_CONTENT, packing='below = "2 GiB"\narchive_size = "1 GiB"')


def test_rucio_requests_hold_at_most_1000_dids_and_errors_are_cut() -> None:
    """Rucio's schema refuses a lookup or an attachment of more than 1,000 DIDs, and its
    refusal quotes the whole request: RucioIO splits both, and an error kept in each
    file's record is cut short."""
    from dac_upload.rucio.client import RucioIO
    from dac_upload.rucio.errors import DESCRIBE_LIMIT, describe

    sent: list[tuple[str, int]] = []

    class Client:
        def get_metadata_bulk(self, dids: list[dict[str, str]]) -> list[dict[str, Any]]:
            assert len(dids) <= 1000
            sent.append(("lookup", len(dids)))
            return [{"name": d["name"], "bytes": 1, "adler32": "00000001"} for d in dids]

        def attach_dids_to_dids(self, attachments: list[dict[str, Any]],
                                ignore_duplicate: bool) -> None:
            assert len(attachments) == 1 and ignore_duplicate
            assert len(attachments[0]["dids"]) <= 1000
            sent.append(("attach", len(attachments[0]["dids"])))

    rio = RucioIO.__new__(RucioIO)
    rio.client = Client()
    names = [f"n{i}" for i in range(2500)]
    assert len(rio.dids_bulk("s", names)) == 2500
    rio.add_to_archive("s", "a.zip", [{"name": n, "bytes": 1, "adler32": "00000001",
                                       "md5": None} for n in names])
    assert sent == [("lookup", 1000), ("lookup", 1000), ("lookup", 500),
                    ("attach", 1000), ("attach", 1000), ("attach", 500)]
    huge = Exception("Provided object does not match schema. Details: " + "x" * 1_000_000)
    text = describe(huge)
    assert len(text) < DESCRIBE_LIMIT + 100 and "1,000,048 characters in all" in text


def test_the_archive_is_not_read_again_for_its_checksums(
        packed: Callable[..., RunLayout], monkeypatch: pytest.MonkeyPatch) -> None:
    """build_archive checksums the archive as it writes it: the upload takes those, it does
    not read the archive a second time (up to archive_size per archive)."""
    import dac_upload.upload.common as common

    read: list[str] = []
    real = common.read_checksums

    def counting(path: Path, *args: Any, **kwargs: Any) -> Any:
        read.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(common, "read_checksums", counting)
    layout, rio = packed(), FakePacking()
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 0
    assert read == ["big.fits"]
    (archive,) = rio.constituents
    assert rio.dids[archive].adler32 == _adler(rio.on_disk[archive])


def test_nightly_keeps_a_file_changed_since_its_upload_loose_and_remakes_as_planned(
        make_job: Callable[..., JobConfig], tmp_path: Path) -> None:
    """A file the ledger has with another mtime is not packed with the night's new files
    (kept-loose.txt says which); remake-manifests packs as the plan did."""
    from dac_upload.ledger import Ledger, UnchangedFilter
    from dac_upload.pipeline import remake_manifests

    job = make_job(PACK_CONTENT, packing='below = "1 KiB"', naming='prefix = "p/"')
    data = tmp_path / "data"
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        ledger.record([{"relpath": rel, "size": (data / rel).stat().st_size,
                        "mtime": (data / rel).stat().st_mtime - (rel == "small/m02.json"),
                        "name": f"p/{rel}", "status": "uploaded"}
                       for rel in ("small/m01.json", "small/m02.json")], "R1")
        keep = UnchangedFilter(ledger)
        layout = prepare_run(job, preflight=None, keep=keep).layout
    manifest = read_manifest(layout.manifest(0))
    packed = {manifest["files"][i]["relpath"] for a in manifest["archives"]
              for i in a["members"]}
    assert "small/m02.json" not in packed and "small/m01.json" not in packed  # unchanged: gone
    assert packed == {f"small/m{i:02d}.json" for i in (0, 3, 4, 5)}
    assert "small/m02.json" in {e["relpath"] for e in manifest["files"]}       # loose
    assert layout.kept_loose.read_text() == "small/m02.json\n"
    assert remake_manifests(layout.dir)[0] == layout.manifest(0).read_bytes()


def test_an_io_error_on_a_source_file_is_the_source_s_not_the_scratch_s(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO from fstat on a member (a Lustre OST gone, ESTALE on NFS) names that file as
    unreadable; blaming scratch would send the operator to the wrong disk."""
    root, entries = _tree(tmp_path / "t", [10, 20])
    real_fstat = os.fstat

    def failing_on_sources(fd: int) -> os.stat_result:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(root)):
            raise OSError(errno.EIO, "Input/output error")
        return real_fstat(fd)

    monkeypatch.setattr(os, "fstat", failing_on_sources)
    target = tmp_path / "t" / "a.zip"
    with pytest.raises(MemberUnreadable) as caught:
        build_archive(root, entries, target)
    assert (caught.value.relpath, caught.value.cause) == (entries[0]["relpath"], "unreadable")
    assert not target.exists() and not target.with_name("a.zip.part").exists()


def test_a_scratch_that_also_refuses_the_cleanup_still_says_why_the_archive_failed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a dead scratch mount removing the partial archive fails too: the error that
    reaches the task is still the write's, typed, not the unlink's."""
    import dac_upload.upload.archive as archive

    def broken(self: Any, data: Any) -> int:
        raise OSError(errno.EIO, "Input/output error")

    real_unlink = Path.unlink

    def refusing(self: Path, missing_ok: bool = False) -> None:
        if self.name.endswith(".part"):
            raise OSError(errno.EIO, "Input/output error")
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(archive._ChecksummedStream, "write", broken)
    monkeypatch.setattr(Path, "unlink", refusing)
    with pytest.raises(ScratchUnusable, match=r"cannot write the archive a\.zip"):
        build_archive(*_tree(tmp_path / "t", [10, 20]), tmp_path / "t" / "a.zip")
