"""The bulk upload path (upload/bulk.py through upload.task.run_task) with a fake Rucio and
a fake RSE: which requests are made per chunk, what each file ends as, and failures at every
step."""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any, Callable

import pytest

from dac_upload.config import JobConfig
from dac_upload.files import atomic_write_json, read_json, read_jsonl
from dac_upload.pipeline import prepare_run
from dac_upload.rucio.client import DidInfo, ReplicaInfo
from dac_upload.rucio.errors import RucioFatal, RucioFileError, RucioTransient
from dac_upload.runrecord import RunLayout
from dac_upload.upload.bulk import chunk_sizes
from dac_upload.upload.task import run_task

CONTENT = {f"f{i}.dat": bytes([i]) * (10 + i) for i in range(5)}
SCOPE, RSE = "user.test", "TEST_RSE"


def _adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


class FakeStorage:
    """The RSE's disk: name -> bytes. ``leftover`` puts other bytes at a name's PFN first."""

    def __init__(self, rio: FakeBulk) -> None:
        self.rio = rio
        self.puts: list[str] = []
        self.leftover: dict[str, bytes] = {}
        self.replace_asked: list[str] = []
        self.held_asked: list[str] = []
        self.tried: list[str] = []
        self.verification = "storage checksum"

    def put(self, path: Path, scope: str, name: str, size: int, adler32: str,
            may_replace: Callable[[], bool], stale_temps: Any = ()) -> tuple[str, str]:
        """As Storage.put: a matching copy is kept and found, whoever wrote it; other bytes
        are replaced only while Rucio has no replica of the name."""
        self.tried.append(name)
        if name in self.rio.put_errors:
            raise self.rio.put_errors[name]
        data = Path(path).read_bytes()
        how = "copied"
        if name in self.leftover:
            if self.leftover[name] == data:   # kept, whoever wrote it
                how = "found"
            else:
                self.replace_asked.append(name)
                if not may_replace():
                    raise RucioFileError("other bytes are there and Rucio has a replica")
                how = "replaced"
        self.puts.append(name)
        self.rio.on_disk[name] = data
        return f"file:///rse/{name}", self.rio.put_how.get(name, how)

    def holds(self, scope: str, name: str, size: int, adler32: str) -> bool:
        data = self.rio.on_disk.get(name)
        self.held_asked.append(name)
        return data is not None and (len(data), _adler(data)) == (size, adler32)


class FakeBulk:
    """The RucioIO methods the bulk path uses, kept in dictionaries; every call recorded."""

    host, account = "https://rucio.test", "tester"

    def __init__(self) -> None:
        self.dids: dict[str, DidInfo] = {}
        self.replicas: dict[str, ReplicaInfo] = {}
        self.rules: set[str] = set()
        self.made: set[str] = set()        # rules this session made
        self.calls: list[tuple[str, int]] = []
        self.on_disk: dict[str, bytes] = {}
        self.put_errors: dict[str, Exception] = {}
        self.put_how: dict[str, str] = {}
        self.fail: dict[str, list[Exception]] = {}     # method -> exceptions to raise first
        self.attached: list[str] = []
        self.ensured: list[str] = []
        self.storage_obj = FakeStorage(self)

    def factory(self, account: str | None) -> FakeBulk:
        return self

    def _maybe_fail(self, method: str) -> None:
        if self.fail.get(method):
            raise self.fail[method].pop(0)

    def add_existing(self, name: str, data: bytes, replica: bool = True) -> None:
        self.dids[name] = DidInfo(len(data), _adler(data), hashlib.md5(data).hexdigest(),
                                  f"g-{name}")
        if replica:
            self.replicas[name] = ReplicaInfo("AVAILABLE", f"file:///rse/{name}", len(data),
                                              _adler(data))

    def storage(self, rse: str, rename: str) -> FakeStorage:
        self.calls.append(("storage", 1))
        return self.storage_obj

    def dids_bulk(self, scope: str, names: list[str]) -> dict[str, DidInfo]:
        self.calls.append(("dids_bulk", len(names)))
        self._maybe_fail("dids_bulk")
        return {n: self.dids[n] for n in names if n in self.dids}

    def replicas_bulk(self, scope: str, names: list[str], rse: str) -> dict[str, ReplicaInfo]:
        self.calls.append(("replicas_bulk", len(names)))
        return {n: self.replicas[n] for n in names if n in self.replicas}

    def add_replicas(self, rse: str, scope: str, files: list[dict[str, Any]]) -> None:
        """As Rucio 41: an existing DID is not compared, an existing replica (any state)
        is skipped, and neither is an error."""
        self.calls.append(("add_replicas", len(files)))
        self._maybe_fail("add_replicas")
        for f in files:
            if f["name"] not in self.dids:
                self.dids[f["name"]] = DidInfo(f["bytes"], f["adler32"], f["md5"], f["guid"])
            if f["name"] not in self.replicas:
                self.replicas[f["name"]] = ReplicaInfo("AVAILABLE", f["pfn"], f["bytes"],
                                                       f["adler32"])

    def add_rules(self, scope: str, names: list[str], rse: str,
                  lifetime: int | None) -> list[str]:
        """As RucioIO.add_rules: the names of a request refused (DuplicateRule) come back;
        names this session made a rule for are skipped."""
        self.calls.append(("add_rules", len(names)))
        self._maybe_fail("add_rules")
        todo = [n for n in names if n not in self.made]
        if any(n in self.rules for n in todo):
            return todo
        self.rules.update(todo)
        self.made.update(todo)
        return []

    def ensure_rule(self, scope: str, name: str, rse: str, lifetime: int | None,
                    grouping: str = "NONE") -> bool:
        """True if this session made the rule (now or before), False if one was there."""
        self.ensured.append(name)
        if name in self.made:
            return True
        if name in self.rules:
            return False
        self.rules.add(name)
        self.made.add(name)
        return True

    def attach_bulk(self, dataset: tuple[str, str], scope: str, names: list[str]) -> bool:
        self.calls.append(("attach_bulk", len(names)))
        self.attached.extend(names)
        return True

    def ensure_dataset(self, dataset: tuple[str, str], rse: str, lifetime: int | None) -> str:
        return "created"


@pytest.fixture
def job(make_job: Callable[..., JobConfig]) -> Callable[..., RunLayout]:
    def make(upload: str = "chunk_size = 2", rucio: str = "") -> RunLayout:
        j = make_job(CONTENT, upload=upload, rucio=rucio)
        return prepare_run(j, preflight=None).layout
    return make


def _recs(layout: RunLayout) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in read_jsonl(layout.result(0))}


def test_new_files_cost_four_requests_per_chunk(job: Callable[..., RunLayout]) -> None:
    layout, rio = job(), FakeBulk()
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 0
    recs = _recs(layout)
    assert {r["status"] for r in recs.values()} == {"uploaded"}
    for name, data in CONTENT.items():
        r = recs[name]
        assert (r["bytes"], r["adler32"], r["md5"]) == (len(data), _adler(data),
                                                        hashlib.md5(data).hexdigest())
        assert r["pfn"] == f"file:///rse/{name}" and r["guid"] is None   # guid = false
        assert rio.on_disk[name] == data and name in rio.rules
    # 5 files in chunks of 2: 3 chunks x (lookup, register, read back, rules), each chunk's
    # lookup queued ahead of the previous chunk's registration (they overlap its copies)
    back = ["add_replicas", "replicas_bulk", "add_rules"]
    assert [c for c, _ in rio.calls] == ["storage", "dids_bulk", "dids_bulk", *back,
                                         "dids_bulk", *back, *back]
    assert [n for c, n in rio.calls if c == "add_replicas"] == [2, 2, 1]
    assert read_json(layout.done_marker(0))["uploaded"] == 5


def test_guid_only_when_asked(job: Callable[..., RunLayout]) -> None:
    """[upload] guid = true: a new GUID per new file, registered with it (as rucio upload
    does); the default registers none (the server sets it DID by DID)."""
    layout, rio = job(upload="chunk_size = 2\nguid = true"), FakeBulk()
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 0
    recs = _recs(layout)
    assert {len(r["guid"]) for r in recs.values()} == {32}
    assert {rio.dids[n].guid for n in recs} == {r["guid"] for r in recs.values()}
    layout, rio = job(), FakeBulk()
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 0
    assert {rio.dids[n].guid for n in _recs(layout)} == {None}


def test_present_conflict_and_name_without_replica(job: Callable[..., RunLayout]) -> None:
    layout, rio = job("chunk_size = 10"), FakeBulk()
    rio.add_existing("f0.dat", CONTENT["f0.dat"])                 # same, with replica
    rio.rules.add("f0.dat")
    rio.add_existing("f1.dat", b"other content")                  # conflict
    rio.add_existing("f2.dat", CONTENT["f2.dat"], replica=False)  # name exists elsewhere
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 1
    recs = _recs(layout)
    assert recs["f0.dat"]["status"] == "already_present"
    assert recs["f0.dat"]["guid"] == "g-f0.dat"
    assert recs["f1.dat"]["cause"] == "conflict" and "f1.dat" not in rio.on_disk
    assert recs["f2.dat"]["status"] == "uploaded" and recs["f2.dat"]["guid"] == "g-f2.dat"
    assert sorted(rio.storage_obj.puts) == ["f2.dat", "f3.dat", "f4.dat"]
    # new names: one bulk rule; the older ones: bulk refused (f0 has one) -> file by file
    assert ("add_rules", 2) in rio.calls and sorted(rio.ensured) == ["f0.dat", "f2.dat"]


def test_dataset_attaches_instead_of_rules(job: Callable[..., RunLayout]) -> None:
    layout, rio = job("chunk_size = 10", rucio='dataset = "ds"'), FakeBulk()
    rio.add_existing("f0.dat", CONTENT["f0.dat"])
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 0
    assert sorted(rio.attached) == sorted(CONTENT) and not rio.rules
    assert ("attach_bulk", 5) in rio.calls


def test_copy_failures_fail_only_their_file(job: Callable[..., RunLayout]) -> None:
    """A copy that does not match is made once more (then cause verify); another refusal
    is not tried again."""
    layout, rio = _no_waits(job()), FakeBulk()
    rio.put_errors["f1.dat"] = RucioFileError("the copy at x does not match the file")
    rio.put_errors["f3.dat"] = RucioFileError("copying to TEST_RSE: RSEAccessDenied")
    rio.put_how["f4.dat"] = "found"
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 1
    recs = _recs(layout)
    assert (recs["f1.dat"]["cause"], recs["f3.dat"]["cause"]) == ("verify", "rucio")
    assert (rio.storage_obj.tried.count("f1.dat"), rio.storage_obj.tried.count("f3.dat")) == \
        (2, 1)
    assert "f1.dat" not in rio.dids and "f3.dat" not in rio.dids   # never registered
    assert [recs[n]["status"] for n in ("f0.dat", "f2.dat", "f4.dat")] == ["uploaded"] * 3


def _no_waits(layout: RunLayout) -> RunLayout:
    """The run's retry_wait set to 0 (the job file cannot say 0)."""
    run = read_json(layout.run_json)
    run["rucio"]["retry_wait"] = 0
    atomic_write_json(layout.run_json, run)
    return layout


def _other_writer_registers_at_look(rio: FakeBulk, name: str, at: int) -> None:
    """Our copy of ``name`` fails (the other writer rewrote it); the other writer's bytes,
    equal to ours, are on the RSE, and it registers them just before our ``at``-th lookup
    of the failed copies (the first lookup of the chunk not counted)."""
    rio.put_errors[name] = RucioFileError("the copy at x does not match the file")
    rio.on_disk[name] = CONTENT[name]
    real = rio.dids_bulk
    looks = [0]

    def dids_bulk(scope: str, names: list[str]) -> dict[str, DidInfo]:
        if names == [name]:
            looks[0] += 1
            if looks[0] == at:
                rio.add_existing(name, CONTENT[name])
        return real(scope, names)

    rio.dids_bulk = dids_bulk  # type: ignore[method-assign]


def test_copy_spoilt_once_is_made_again(job: Callable[..., RunLayout]) -> None:
    """Two uploads writing one name in place at once spoil each other's copy; each, alone,
    copies it again (after a wait drawn at random) and the second finds the first's."""
    layout, rio = _no_waits(job("chunk_size = 10")), FakeBulk()
    real_put = rio.storage_obj.put
    spoilt = []

    def put_spoilt_once(path: Path, scope: str, name: str, size: int, adler32: str,
                        may_replace: Callable[[], bool], **kw: Any) -> tuple[str, str]:
        if name == "f3.dat" and not spoilt:
            spoilt.append(name)
            raise RucioFileError("the copy at x does not match the file (size or adler32)")
        return real_put(path, scope, name, size, adler32, may_replace, **kw)

    rio.storage_obj.put = put_spoilt_once  # type: ignore[method-assign]
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 0
    assert _recs(layout)["f3.dat"]["status"] == "uploaded" and spoilt == ["f3.dat"]


def test_copy_failed_and_the_other_writer_registers_late(
        job: Callable[..., RunLayout]) -> None:
    """Two runs write one name; ours fails, the other registers our bytes only at our fourth
    look (a slow server): already_present, never failed; the waits go on only because our
    bytes are at the PFN."""
    layout, rio = _no_waits(job("chunk_size = 10")), FakeBulk()
    _other_writer_registers_at_look(rio, "f2.dat", 4)
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 0
    rec = _recs(layout)["f2.dat"]
    assert rec["status"] == "already_present" and rec["cause"] is None
    assert "another upload registered the name meanwhile" in rec["note"]
    assert rio.storage_obj.held_asked == ["f2.dat"] * 2
    assert "f2.dat" in rio.rules


def test_copy_failed_with_nobody_else_at_work_is_reported_after_two_looks(
        job: Callable[..., RunLayout]) -> None:
    """Nothing of ours at the PFN: no other writer to wait for; failed after two looks."""
    layout, rio = _no_waits(job("chunk_size = 10")), FakeBulk()
    _other_writer_registers_at_look(rio, "f2.dat", 99)
    del rio.on_disk["f2.dat"]
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 1
    rec = _recs(layout)["f2.dat"]
    assert rec["status"] == "failed" and rec["cause"] == "verify"
    assert [c for c in rio.calls if c == ("dids_bulk", 1)] == [("dids_bulk", 1)] * 2
    assert rio.storage_obj.held_asked == ["f2.dat"]


def test_server_failing_then_back_is_retried(job: Callable[..., RunLayout]) -> None:
    layout, rio = job('chunk_size = 10'), FakeBulk()
    rio.fail["add_replicas"] = [RucioTransient("HTTP 500")]
    _no_waits(layout)
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 0
    assert [c for c, _ in rio.calls].count("add_replicas") == 2


def test_fatal_error_aborts_the_task(job: Callable[..., RunLayout]) -> None:
    layout, rio = job(), FakeBulk()
    rio.fail["dids_bulk"] = [RucioFatal("CannotAuthenticate: no")]
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 3
    recs = _recs(layout)
    assert {r["status"] for r in recs.values()} == {"not_attempted"}
    assert {r["cause"] for r in recs.values()} == {"aborted"}
    assert not rio.on_disk
    assert read_json(layout.done_marker(0))["aborted"] == "CannotAuthenticate: no"


def test_resubmission_registers_what_a_crash_left_on_the_rse(
        job: Callable[..., RunLayout]) -> None:
    """A first attempt died after its copies (no records); the next finds the copies (the
    fake RSE says 'found') and registers them once."""
    layout, rio = job('chunk_size = 10'), FakeBulk()
    rio.storage_obj.leftover = dict(CONTENT)
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 0
    assert [n for c, n in rio.calls if c == "add_replicas"] == [5]
    assert {r["status"] for r in _recs(layout).values()} == {"uploaded"}


def test_stop_signal_during_copies_registers_what_was_copied(
        job: Callable[..., RunLayout]) -> None:
    """Slurm's wall-time warning arrives while the chunk is copying: the copies done are
    registered and protected, the rest recorded not_attempted (stopped), exit 4."""
    import os
    import signal
    import time

    layout, rio = job('chunk_size = 10\ntransfers = 1'), FakeBulk()
    real_put = rio.storage_obj.put

    def put_then_warn(path: Path, scope: str, name: str, size: int, adler32: str,
                      may_replace: Callable[[], bool], **kw: Any) -> tuple[str, str]:
        out = real_put(path, scope, name, size, adler32, may_replace, **kw)
        if len(rio.storage_obj.puts) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.3)   # the handler runs in the main thread: let it, before going on
        return out

    rio.storage_obj.put = put_then_warn  # type: ignore[method-assign]
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 4
    recs = _recs(layout)
    done = sorted(n for n, r in recs.items() if r["status"] == "uploaded")
    assert done == sorted(rio.storage_obj.puts) and len(done) == 2
    assert all(n in rio.rules and n in rio.dids for n in done)
    rest = [r for r in recs.values() if r["status"] != "uploaded"]
    assert len(rest) == 3 and {r["cause"] for r in rest} == {"stopped"}
    assert read_json(layout.done_marker(0))["stopped"]


def test_replica_here_not_available_is_left_alone(job: Callable[..., RunLayout]) -> None:
    layout, rio = job("chunk_size = 10"), FakeBulk()
    rio.add_existing("f1.dat", CONTENT["f1.dat"])
    rio.replicas["f1.dat"] = ReplicaInfo("UNAVAILABLE", "file:///rse/f1.dat", 11, "x")
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 1
    rec = _recs(layout)["f1.dat"]
    assert rec["cause"] == "rucio" and "is UNAVAILABLE, not AVAILABLE: left alone" in rec["error"]
    assert "f1.dat" not in rio.storage_obj.puts


def test_name_registered_meanwhile_by_someone_else_is_not_ours(
        job: Callable[..., RunLayout]) -> None:
    """Between our lookup and our registration another run registered the name with other
    content: Rucio skips our replica silently; the read-back says it is not ours."""
    layout, rio = job("chunk_size = 10"), FakeBulk()
    real_put = rio.storage_obj.put

    def put_racing(path: Path, scope: str, name: str, size: int, adler32: str,
                   may_replace: Callable[[], bool], **kw: Any) -> tuple[str, str]:
        if name == "f2.dat":
            rio.add_existing("f2.dat", b"someone else's bytes")
        return real_put(path, scope, name, size, adler32, may_replace, **kw)

    rio.storage_obj.put = put_racing  # type: ignore[method-assign]
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 1
    rec = _recs(layout)["f2.dat"]
    assert rec["cause"] == "verify" and "it is not ours" in rec["error"]
    assert "f2.dat" not in rio.rules


def test_leftover_with_other_bytes_replaced_only_without_a_replica(
        job: Callable[..., RunLayout]) -> None:
    layout, rio = job("chunk_size = 10"), FakeBulk()
    rio.storage_obj.leftover = {"f0.dat": b"partial", "f1.dat": b"someone's"}
    real_replicas = rio.replicas_bulk

    def replicas(scope: str, names: list[str], rse: str) -> dict[str, ReplicaInfo]:
        if names == ["f1.dat"]:        # the fresh check before overwriting f1's PFN
            return {"f1.dat": ReplicaInfo("COPYING", "file:///rse/f1.dat", 9, "x")}
        return real_replicas(scope, names, rse)

    rio.replicas_bulk = replicas  # type: ignore[method-assign]
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 1
    recs = _recs(layout)
    assert sorted(rio.storage_obj.replace_asked) == ["f0.dat", "f1.dat"]
    assert recs["f0.dat"]["status"] == "uploaded"
    assert recs["f1.dat"]["status"] == "failed" and "has a replica" in recs["f1.dat"]["error"]


def test_fatal_error_after_registration_keeps_what_each_file_got_to(
        job: Callable[..., RunLayout]) -> None:
    layout, rio = job("chunk_size = 10"), FakeBulk()
    rio.add_existing("f0.dat", b"other")                         # a conflict
    rio.fail["add_rules"] = [RucioFatal("InsufficientAccountLimit: none left")]
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 3
    recs = _recs(layout)
    assert recs["f0.dat"]["cause"] == "conflict"                 # decided before: kept
    for name in ("f1.dat", "f2.dat", "f3.dat", "f4.dat"):
        assert recs[name]["status"] == "failed" and recs[name]["cause"] == "interrupted"
        assert recs[name]["error"].startswith(
            "registered; the task stopped before its rule or dataset attachment was "
            "confirmed (InsufficientAccountLimit: none left)")
        assert "had_did" not in recs[name] and "_registered" not in recs[name]


@pytest.mark.parametrize("n, size, expected", [
    (1000, 500, [50, 100, 200, 300, 200, 100, 50]),
    (500, 500, [50, 100, 200, 100, 50]),
    (200, 500, [50, 100, 50]),
    (150, 100, [10, 20, 90, 20, 10]),
    (60, 500, [60]),
    (5, 2, [2, 2, 1]),
    (0, 500, []),
])
def test_chunk_sizes(n: int, size: int, expected: list[int]) -> None:
    assert chunk_sizes(n, size) == expected


@pytest.mark.parametrize("size", [1, 2, 50, 99, 100, 101, 500, 1000])
def test_chunk_sizes_cover_every_file_within_the_size(size: int) -> None:
    """Every file once, no chunk bigger than the size; the two ends equal and no chunk in
    between smaller than them."""
    for n in range(0, 3 * size + 7, max(1, size // 7)):
        sizes = chunk_sizes(n, size)
        assert sum(sizes) == n and all(1 <= c <= size for c in sizes), (n, sizes)
        if len(sizes) > 2 and size >= 100:
            assert sizes[0] == sizes[-1] and min(sizes[1:-1]) >= sizes[0], (n, sizes)


def test_a_name_another_run_protected_first_is_not_uploaded_here(
        job: Callable[..., RunLayout]) -> None:
    """Two runs writing the same names at once: Rucio registers both replicas as one without
    a word, but only one rule per account and RSE. The run whose rule came second says
    already_present, never uploaded."""
    layout, rio = job("chunk_size = 10"), FakeBulk()
    real_put = rio.storage_obj.put

    def put_racing(path: Path, scope: str, name: str, size: int, adler32: str,
                   may_replace: Callable[[], bool], **kw: Any) -> tuple[str, str]:
        out = real_put(path, scope, name, size, adler32, may_replace, **kw)
        if name == "f1.dat":        # the other run registers and protects f1 meanwhile
            rio.add_existing("f1.dat", CONTENT["f1.dat"])
            rio.rules.add("f1.dat")
        return out

    rio.storage_obj.put = put_racing  # type: ignore[method-assign]
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 0
    recs = _recs(layout)
    assert recs["f1.dat"]["status"] == "already_present"
    assert "another upload protected this name first" in recs["f1.dat"]["note"]
    assert recs["f1.dat"]["verified"] is None
    assert {n for n, r in recs.items() if r["status"] == "uploaded"} == set(CONTENT) - {"f1.dat"}


def test_only_a_copy_this_task_started_is_registered_as_found(
        job: Callable[..., RunLayout]) -> None:
    """A verified copy at the PFN is registered as it is, whoever wrote it (bytes that may
    be another writer's registered replica are never deleted); the note says whether an
    earlier attempt of this task (copies.jsonl) made it."""
    layout, rio = job("chunk_size = 10"), FakeBulk()
    rio.storage_obj.leftover = {"f0.dat": CONTENT["f0.dat"], "f1.dat": CONTENT["f1.dat"]}
    layout.results.mkdir(exist_ok=True)
    layout.copies(0).write_text('{"attempt": 0, "names": ["f1.dat"]}\n')
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 0
    recs = _recs(layout)
    assert "that this task did not write" in recs["f0.dat"]["note"]
    assert "an earlier attempt of this task left" in recs["f1.dat"]["note"]
    assert {r["status"] for r in recs.values()} == {"uploaded"}
    # this attempt listed what it copied, before copying it
    logged = [json.loads(line) for line in layout.copies(0).read_text().splitlines()]
    assert logged[-1] == {"attempt": 1, "names": sorted(CONTENT)}


def test_registration_cut_short_says_the_file_may_be_registered(
        job: Callable[..., RunLayout]) -> None:
    """The registration request was sent when the credentials were refused: the files are
    not "not attempted" (a record never says less than was done) but failed, interrupted,
    saying they may be in Rucio; a resubmission finds them."""
    layout, rio = job("chunk_size = 10"), FakeBulk()
    real_add = rio.add_replicas

    def add_then_refuse(rse: str, scope: str, files: list[dict[str, Any]]) -> None:
        real_add(rse, scope, files)   # the server registered them, then the answer was lost
        raise RucioFatal("CannotAuthenticate: the password is no longer valid")

    rio.add_replicas = add_then_refuse  # type: ignore[method-assign]
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 3
    recs = _recs(layout)
    assert {(r["status"], r["cause"]) for r in recs.values()} == {("failed", "interrupted")}
    assert all("it may be registered" in r["error"] for r in recs.values())
    rio.add_replicas = real_add  # type: ignore[method-assign]
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 0
    again = [r for r in read_jsonl(layout.result(0)) if r["attempt"] == 2]
    # registered by attempt 1 (copies.jsonl lists them), protected by attempt 2: uploaded
    assert {r["status"] for r in again} == {"uploaded"}
    assert all("earlier attempt" in r["note"] for r in again)
