"""rucio_io.Storage with Rucio's real POSIX protocol on a temporary directory (no server):
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

from dac_upload import rucio_io


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
    storage = rucio_io.Storage(_settings(rse), "never", SimpleNamespace(auth_token="opaque"))
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
