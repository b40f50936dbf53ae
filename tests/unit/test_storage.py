"""rucio_storage.Storage with Rucio's real POSIX protocol on a temporary directory (no server):
concurrent copies into directories that do not exist yet.

Rucio's posix protocol creates a file's directory with ``if not exists: makedirs``; two
threads copying into the same new directory both see it missing, and the second makedirs
fails (FileExistsError, then ``KeyError: 'prefix'`` in its error path). The bulk worker's
copy pool hit this on the test RSE (one file in a thousand failed, "copying to LOCAL_DISK:
KeyError: 'prefix'")."""

from __future__ import annotations

import threading
import zlib
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from dac_upload.rucio import client as rucio_client
from dac_upload.rucio import errors as rucio_errors
from dac_upload.rucio import storage as rucio_storage


@pytest.fixture(autouse=True)
def _client_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The protocol layer reads Rucio's client configuration (policy package lookup): a
    minimal one, and Rucio's cached copy dropped afterwards."""
    from rucio.common.config import clean_cached_config

    cfg = tmp_path / "rucio.cfg"
    cfg.write_text("[client]\nrucio_host = http://127.0.0.1:9\nauth_host = "
                   "http://127.0.0.1:9\nauth_type = userpass\naccount = root\n")
    monkeypatch.setenv("RUCIO_CONFIG", str(cfg))
    clean_cached_config()
    yield
    clean_cached_config()


def _settings(prefix: Path) -> dict:
    """What rsemanager.get_rse_info gives for the test services' POSIX RSE."""
    domains = {"read": 1, "write": 1, "delete": 1}
    return {"rse": "TMP_DISK", "id": "0" * 32, "deterministic": True,
            "lfn2pfn_algorithm": "hash", "domain": ["lan", "wan"], "verify_checksum": True,
            "sign_url": None, "credentials": None, "volatile": False, "rse_type": "DISK",
            "staging_area": False,
            "protocols": [{"hostname": "localhost", "scheme": "file", "port": 0,
                           "prefix": str(prefix), "impl": "rucio.rse.protocols.posix.Default",
                           "domains": {"lan": dict(domains), "wan": dict(domains)},
                           "extended_attributes": None}]}


def test_concurrent_copies_into_one_new_directory(tmp_path: Path) -> None:
    rse = tmp_path / "rse"
    rse.mkdir()
    storage = rucio_storage.Storage(_settings(rse), "never", SimpleNamespace(auth_token="opaque"))
    src = tmp_path / "f.dat"
    src.write_bytes(b"x" * 4096)
    adler = f"{zlib.adler32(src.read_bytes()) & 0xFFFFFFFF:08x}"
    # names grouped by the directory the hash puts them in: a few land together
    by_dir: dict[str, list[str]] = defaultdict(list)
    for i in range(40000):
        name = f"n{i}"
        by_dir[str(Path(storage.pfn("test", name)).parent)].append(name)
    groups = [names[:3] for names in by_dir.values() if len(names) >= 3][:60]
    assert len(groups) == 60

    failures: list[str] = []
    with ThreadPoolExecutor(max_workers=3) as pool:
        for names in groups:
            start = threading.Barrier(len(names))

            def put(name: str, start: threading.Barrier = start) -> None:
                storage._protocol()                 # made before the race, as in the worker
                start.wait()
                try:
                    storage.put(src, "test", name, 4096, adler, lambda: False)
                except Exception as exc:   # collected, asserted below
                    failures.append(f"{name}: {exc}")

            list(pool.map(put, names))
    assert failures == []
    copied = [p for p in rse.rglob("*") if p.is_file()]
    assert len(copied) == 60 * 3


# ---------------------------------------------------------------- a full storage, own copies

def _adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


def _source(tmp_path: Path, data: bytes = b"y" * 10_000) -> tuple[Path, str]:
    src = tmp_path / "src.dat"
    src.write_bytes(data)
    return src, _adler(data)


def _files(top: Path) -> list[Path]:
    return sorted(p for p in top.rglob("*") if p.is_file())


@pytest.fixture
def rse(tmp_path: Path) -> Path:
    top = tmp_path / "rse"
    top.mkdir()
    return top


def _storage(rse: Path, rename: str = "auto") -> rucio_storage.Storage:
    return rucio_storage.Storage(_settings(rse), rename, SimpleNamespace(auth_token="opaque"))


def _fail_copy(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """shutil.copy (what Rucio's POSIX protocol writes with) as on a storage failing with
    ``code``: half the bytes written, then the OSError, as a real copy onto a full disk."""
    import os
    import shutil

    def copy(src: str, dst: str) -> str:
        data = Path(src).read_bytes()
        Path(dst).write_bytes(data[:len(data) // 2])
        raise OSError(code, os.strerror(code), src, None, dst)

    monkeypatch.setattr(shutil, "copy", copy)


@pytest.mark.parametrize("rename", ["auto", "never"])
def test_full_storage_stops_the_task_and_leaves_nothing(
        tmp_path: Path, rse: Path, rename: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rucio's POSIX protocol turns ENOSPC into KeyError: 'prefix'; the storage's own words
    come back, the partial copy (temporary or in place) is removed, and a full storage stops
    the task (RucioFatal) rather than failing every later file one by one."""
    src, adler = _source(tmp_path)
    storage = _storage(rse, rename)
    _fail_copy(monkeypatch, 28)
    with pytest.raises(rucio_errors.StorageFull) as err:
        storage.put(src, "test", "a/f.dat", 10_000, adler, lambda: True)
    assert isinstance(err.value, rucio_errors.RucioFatal)
    text = str(err.value)
    assert text.startswith("the storage of RSE TMP_DISK is full (No space left on device) "
                           f"writing {storage.pfn('test', 'a/f.dat')}: "), text
    assert "ask the RSE's admins" in text and "prefix" not in text
    assert _files(rse) == []


def test_quota_exceeded_is_full_too(tmp_path: Path, rse: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    src, adler = _source(tmp_path)
    _fail_copy(monkeypatch, 122)   # EDQUOT
    with pytest.raises(rucio_errors.StorageFull, match=r"is full \(Disk quota exceeded\)"):
        _storage(rse).put(src, "test", "f.dat", 10_000, adler, lambda: True)
    assert _files(rse) == []


def test_other_storage_errors_say_what_the_storage_said(
        tmp_path: Path, rse: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EACCES is one file's failure, named as the storage named it, not as KeyError."""
    src, adler = _source(tmp_path)
    _fail_copy(monkeypatch, 13)
    with pytest.raises(rucio_errors.RucioFileError) as err:
        _storage(rse).put(src, "test", "f.dat", 10_000, adler, lambda: True)
    assert not isinstance(err.value, rucio_errors.RucioFatal)
    assert str(err.value).startswith("copying to TMP_DISK: PermissionError: [Errno 13] "
                                     "Permission denied"), err.value
    assert "prefix" not in str(err.value)
    assert _files(rse) == []


@pytest.mark.parametrize("text, said", [
    ("RSE does not support requested operation. Details: [Errno 28] No space left on "
     "device", "No space left on device"),
    ("Failed to put file: HTTP 507 Insufficient Storage", "Insufficient Storage"),
    ("xrootd: [ERROR] Server responded with an error: [3009] Disk quota exceeded",
     "Disk quota exceeded"),
    ("RSE does not support requested operation. Details: 'prefix'", None),
])
def test_storage_full_from_the_words(text: str, said: str | None) -> None:
    """Storages behind gfal2 say it in words only (no OSError in the chain)."""
    assert rucio_errors.storage_full(Exception(text)) == said


def test_storage_full_from_the_chain() -> None:
    """As Rucio's POSIX put raises it: the KeyError while handling the OSError, wrapped
    again by UploadClient (RSEOperationNotSupported(str(error)))."""
    from rucio.common.exception import RSEOperationNotSupported

    try:
        try:
            try:
                raise OSError(28, "No space left on device")
            except OSError:
                {}["prefix"]
        except Exception as error:
            raise RSEOperationNotSupported(str(error))  # noqa: B904 -- as UploadClient does
    except RSEOperationNotSupported as exc:
        wrapped = exc
    assert "prefix" in str(wrapped)
    assert rucio_errors.storage_full(wrapped) == "No space left on device"
    assert rucio_errors.storage_error(wrapped).errno == 28


def test_mismatching_copy_is_removed(tmp_path: Path, rse: Path) -> None:
    src, _ = _source(tmp_path)
    with pytest.raises(rucio_errors.RucioFileError, match="does not match the file"):
        _storage(rse).put(src, "test", "f.dat", 10_000, "00000001", lambda: True)
    assert _files(rse) == []


def _place(storage: rucio_storage.Storage, name: str, data: bytes) -> Path:
    """Bytes at a name's PFN, as an earlier copy would have left them (dated 1970, so that
    a copy written again shows: inode numbers are reused at once)."""
    import os

    path = Path(storage._protocol().pfn2path(storage.pfn("test", name)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (0, 0))
    return path


class Asked:
    """may_replace: records each question, answers ``answer``."""

    def __init__(self, answer: bool) -> None:
        self.answer, self.count = answer, 0

    def __call__(self) -> bool:
        self.count += 1
        return self.answer


def test_matching_copy_not_ours_is_kept(tmp_path: Path, rse: Path) -> None:
    """Matching bytes nobody of this task wrote (another writer's of the same name, whose
    copy may be registered at any moment): kept and "found", never deleted, Rucio not even
    asked; the registration's protection decides which upload counts."""
    src, adler = _source(tmp_path)
    storage = _storage(rse)
    path = _place(storage, "f.dat", src.read_bytes())
    asked = Asked(True)
    assert storage.put(src, "test", "f.dat", 10_000, adler, asked) == (
        storage.pfn("test", "f.dat"), "found")
    assert asked.count == 0 and path.stat().st_mtime == 0


def test_failed_copy_in_place_keeps_bytes_another_writer_finished(
        tmp_path: Path, rse: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Written in place (no rename), our copy fails; meanwhile another writer of the name
    put the file's bytes there (its replica may be registered): they are not removed."""
    src, adler = _source(tmp_path)
    storage = _storage(rse, "never")
    proto = storage._protocol()

    def put_then_fail(source: str, target: str, source_dir: str | None = None) -> None:
        Path(proto.pfn2path(target)).write_bytes(src.read_bytes())   # the other writer's
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(proto, "put", put_then_fail)
    with pytest.raises(rucio_errors.RucioFileError):
        storage.put(src, "test", "f.dat", 10_000, adler, Asked(True))
    assert Path(proto.pfn2path(storage.pfn("test", "f.dat"))).read_bytes() == src.read_bytes()


def test_holds_says_whether_the_pfn_has_these_bytes(tmp_path: Path, rse: Path) -> None:
    """What the bulk path asks after a failed copy (is another writer's copy of our bytes
    there?): the storage's own size and adler32; nothing there or other bytes: False."""
    src, adler = _source(tmp_path)
    storage = _storage(rse)
    assert not storage.holds("test", "f.dat", 10_000, adler)
    _place(storage, "f.dat", b"other bytes")
    assert not storage.holds("test", "f.dat", 10_000, adler)
    _place(storage, "f.dat", src.read_bytes())
    assert storage.holds("test", "f.dat", 10_000, adler)
    assert not storage.holds("test", "f.dat", 9_999, adler)


def test_matching_copy_not_ours_with_a_replica_is_found(tmp_path: Path, rse: Path) -> None:
    """A replica is registered now: left as it is, "found"; the caller's registration
    meets that replica and decides."""
    src, adler = _source(tmp_path)
    storage = _storage(rse)
    path = _place(storage, "f.dat", src.read_bytes())
    assert storage.put(src, "test", "f.dat", 10_000, adler, Asked(False))[1] == "found"
    assert path.stat().st_mtime == 0


def test_other_bytes_replaced_only_without_a_replica(tmp_path: Path, rse: Path) -> None:
    src, adler = _source(tmp_path)
    storage = _storage(rse)
    path = _place(storage, "f.dat", b"other bytes")
    with pytest.raises(rucio_errors.RucioFileError, match=r"other bytes are at .* left alone"):
        storage.put(src, "test", "f.dat", 10_000, adler, Asked(False))
    assert path.read_bytes() == b"other bytes"
    assert storage.put(src, "test", "f.dat", 10_000, adler, Asked(True))[1] == \
        "replaced"
    assert path.read_bytes() == src.read_bytes()


def test_temporary_name_is_the_writers_own(tmp_path: Path, rse: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each Storage writes PFN.TOKEN.rucio.upload with a token of its own; a stale
    temporary of its own token is removed before writing, another writer's is left alone."""
    src, adler = _source(tmp_path)
    first, second = _storage(rse, "always"), _storage(rse, "always")
    assert first.temp_token != second.temp_token
    assert len(first.temp_token) == 8 and int(first.temp_token, 16) >= 0
    pfn = first.pfn("test", "f.dat")
    mine = _place(first, "f.dat", b"stale, mine")
    mine = mine.rename(mine.with_name(f"{mine.name}.{first.temp_token}.rucio.upload"))
    theirs = mine.with_name(f"f.dat.{second.temp_token}.rucio.upload")
    theirs.write_bytes(b"theirs, being written")
    targets: list[str] = []
    proto = first._protocol()
    real_put = proto.put

    def put(source: str, target: str, source_dir: str | None = None) -> None:
        targets.append(target)
        assert not mine.exists()                # removed before the copy began
        real_put(source, target, source_dir)

    monkeypatch.setattr(proto, "put", put)
    assert first.put(src, "test", "f.dat", 10_000, adler, Asked(True)) == (pfn, "copied")
    assert targets == [f"{pfn}.{first.temp_token}.rucio.upload"]
    assert first.temp_pfn(pfn) == targets[0]
    assert theirs.read_bytes() == b"theirs, being written"
    final = Path(proto.pfn2path(pfn))
    assert sorted(_files(rse)) == sorted([final, theirs])



def test_a_killed_attempts_temporary_is_removed_by_the_next(tmp_path: Path,
                                                             rse: Path) -> None:
    """An earlier attempt of the task (its token in copies.jsonl) was killed mid-copy: its
    PFN.TOKEN.rucio.upload is removed by the next attempt's copy of that name."""
    src, adler = _source(tmp_path)
    killed, storage = _storage(rse, "always"), _storage(rse, "always")
    left = _place(killed, "f.dat", b"half")
    left = left.rename(left.with_name(f"{left.name}.{killed.temp_token}.rucio.upload"))
    pfn = storage.pfn("test", "f.dat")
    assert storage.put(src, "test", "f.dat", 10_000, adler, Asked(True),
                       stale_temps={killed.temp_token}) == (pfn, "copied")
    assert _files(rse) == [Path(storage._protocol().pfn2path(pfn))]


# ---------------------------------------------------------------- the stock path (UploadClient)

class _Client:
    """The few Client calls RucioIO.upload makes around UploadClient."""

    auth_token, vo = "opaque", "def"

    def __init__(self, replicas: list[dict]) -> None:
        self.replicas = replicas

    def get_did(self, scope: str, name: str) -> dict:
        from rucio.common.exception import DataIdentifierNotFound

        raise DataIdentifierNotFound()

    def list_replicas(self, dids: list, **kw: object) -> list[dict]:
        return self.replicas


class _FailingUploader:
    """UploadClient's failure path as in Rucio 41 (upload() and _upload_item()): the put of
    PFN.rucio.upload through the RSE's protocol, its error wrapped in
    RSEOperationNotSupported(str(error)), logged with exc_info, then NoFilesUploaded."""

    def __init__(self, storage: rucio_storage.Storage) -> None:
        self.storage, self.auth_token, self.logger = storage, None, None

    def upload(self, items: list[dict], summary_file_path: str | None = None) -> None:
        import logging
        import os

        from rucio.common.exception import (
            NoFilesUploaded,
            RSEOperationNotSupported,
            RucioException,
        )

        item = items[0]
        proto = self.storage._protocol()
        pfn = self.storage.pfn(item["did_scope"], item["did_name"])
        try:
            try:
                proto.put(os.path.basename(item["path"]), f"{pfn}.rucio.upload",
                          os.path.dirname(item["path"]))
            except Exception as error:
                raise RSEOperationNotSupported(str(error))  # noqa: B904 -- as Rucio
        except RucioException as error:
            self.logger(logging.WARNING, "Upload attempt failed")
            self.logger(logging.INFO, f"Exception: {error}", exc_info=True)
        raise NoFilesUploaded()


def _stock(rse: Path, replicas: list[dict] | None = None) -> rucio_client.RucioIO:
    rio = object.__new__(rucio_client.RucioIO)
    storage = _storage(rse)
    rio.client = _Client(replicas or [])
    rio._storages = {"TMP_DISK": storage}
    rio._uploader = _FailingUploader(storage)
    return rio


def test_stock_upload_on_a_full_storage(tmp_path: Path, rse: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """UploadClient says "RSE does not support requested operation. Details: 'prefix'" and
    leaves PFN.rucio.upload: the cause comes back from the logged chain, the temporary copy
    is removed (no replica is registered), and the task stops (StorageFull)."""
    src, _ = _source(tmp_path)
    rio = _stock(rse)
    _fail_copy(monkeypatch, 28)
    with pytest.raises(rucio_errors.StorageFull) as err:
        rio.upload(src, "test", "f.dat", "TMP_DISK", None, None)
    pfn = rio._storages["TMP_DISK"].pfn("test", "f.dat")
    assert str(err.value).startswith(
        f"the storage of RSE TMP_DISK is full (No space left on device) writing {pfn}: ")
    assert _files(rse) == []


def test_stock_upload_keeps_a_temporary_when_a_replica_is_registered(
        tmp_path: Path, rse: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica of the name registered meanwhile: what is on the storage is not ours to
    remove."""
    src, _ = _source(tmp_path)
    rio = _stock(rse, [{"name": "f.dat", "states": {"TMP_DISK": "COPYING"}, "rses": {}}])
    _fail_copy(monkeypatch, 28)
    with pytest.raises(rucio_errors.StorageFull):
        rio.upload(src, "test", "f.dat", "TMP_DISK", None, None)
    assert [p.name for p in _files(rse)] == ["f.dat.rucio.upload"]


def test_stock_upload_names_the_storage_error(tmp_path: Path, rse: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    src, _ = _source(tmp_path)
    rio = _stock(rse)
    _fail_copy(monkeypatch, 13)
    with pytest.raises(rucio_errors.RucioFileError) as err:
        rio.upload(src, "test", "f.dat", "TMP_DISK", None, None)
    assert not isinstance(err.value, rucio_errors.RucioFatal)
    assert str(err.value).startswith("upload failed: PermissionError: [Errno 13] Permission "
                                     "denied"), err.value
    assert _files(rse) == []
