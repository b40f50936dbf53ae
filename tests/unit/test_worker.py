"""upload.task.run_task with a fake Rucio: statuses, checksums, abort, resume, markers. These
tests drive the stock path ([upload] mode = "stock"); test_bulk.py drives the bulk path."""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Any, Callable

import pytest

from dac_upload.config import JobConfig
from dac_upload.files import read_json, read_jsonl
from dac_upload.pipeline import prepare_run
from dac_upload.rucio.client import DidInfo, ReplicaInfo
from dac_upload.rucio.errors import RucioFatal, RucioFileError
from dac_upload.runrecord import RunLayout
from dac_upload.upload.common import existing_verdict
from dac_upload.upload.task import run_task

CONTENT = {"a.fits": b"alpha", "b.fits": b"bravo-bravo", "sub/c.fits": b"", "sub/d.fits": b"d"}
SCOPE, RSE = "user.test", "TEST_RSE"
STOCK = 'mode = "stock"'


def _adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


class FakeRucio:
    """Rucio as the worker sees it (the RucioIO methods), kept in dictionaries."""

    host = "https://rucio.test:443"

    def __init__(self) -> None:
        self.account = "tester"
        self.dids: dict[str, DidInfo] = {}
        self.replicas: dict[str, ReplicaInfo] = {}
        self.uploads: list[dict[str, Any]] = []
        self.upload_errors: dict[str, Exception] = {}
        self.replica_after_upload: dict[str, ReplicaInfo] = {}
        self.factory_calls: list[str | None] = []
        self.datasets: list[tuple[tuple[str, str], str, int | None]] = []
        self.attached: list[tuple[tuple[str, str], str]] = []
        self.rules: list[tuple[str, str, int | None]] = []

    def factory(self, account: str | None) -> FakeRucio:
        self.factory_calls.append(account)
        return self

    def add_existing(self, name: str, data: bytes, state: str = "AVAILABLE",
                     guid: str | None = None) -> None:
        self.dids[name] = DidInfo(len(data), _adler(data), hashlib.md5(data).hexdigest(),
                                  guid or f"guid-{name}")
        self.replicas[name] = ReplicaInfo(state, f"davs://se/{name}", len(data), _adler(data))

    def did(self, scope: str, name: str) -> DidInfo | None:
        assert scope == SCOPE
        return self.dids.get(name)

    def replica(self, scope: str, name: str, rse: str) -> ReplicaInfo | None:
        assert (scope, rse) == (SCOPE, RSE)
        return self.replicas.get(name)

    def guid(self, scope: str, name: str) -> str | None:
        return self.dids[name].guid if name in self.dids else None

    def ensure_dataset(self, dataset: tuple[str, str], rse: str, lifetime: int | None) -> bool:
        self.datasets.append((dataset, rse, lifetime))
        return len(self.datasets) == 1

    def attach(self, dataset: tuple[str, str], scope: str, name: str) -> bool:
        self.attached.append((dataset, name))
        return True

    def ensure_rule(self, scope: str, name: str, rse: str, lifetime: int | None,
                    grouping: str = "NONE") -> bool:
        self.rules.append((name, rse, lifetime))
        return True

    def upload(self, path: Path, scope: str, name: str, rse: str,
               dataset: tuple[str, str] | None, lifetime: int | None,
               guid: str | None = None) -> tuple[str, str | None]:
        self.uploads.append({"path": Path(path), "scope": scope, "name": name, "rse": rse,
                             "dataset": dataset, "lifetime": lifetime, "guid": guid})
        if name in self.upload_errors:
            raise self.upload_errors[name]
        data = Path(path).read_bytes()
        if name not in self.dids:   # as Rucio: an existing DID keeps its GUID
            self.add_existing(name, data, guid=guid)
        else:
            self.replicas[name] = ReplicaInfo("AVAILABLE", f"davs://se/{name}", len(data),
                                              _adler(data))
        if name in self.replica_after_upload:
            self.replicas[name] = self.replica_after_upload[name]
        return f"davs://se/{name}?upload", guid or f"guid-{name}"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("DAC_UPLOAD_ATTEMPT", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def run(make_job: Callable[..., JobConfig]) -> tuple[RunLayout, JobConfig]:
    job = make_job(CONTENT, rucio='dataset = "ds1"\nlifetime = "1d"', upload=STOCK)
    prep = prepare_run(job, preflight=None, python="/usr/bin/python3")
    assert len(prep.batches) == 1
    return prep.layout, job


def _records(layout: RunLayout) -> dict[str, dict[str, Any]]:
    recs = list(read_jsonl(layout.result(0)))
    by_name = {r["name"]: r for r in recs}
    assert len(by_name) == len(recs), "one record per name and attempt"
    return by_name


# ----------------------------------------------------------------------------- verdict
@pytest.mark.parametrize(("did_bytes", "did_adler", "verdict"), [
    (5, "05c801f0", "same"),
    (5, "05C801F0", "same"),
    (5, "5c801f0", "same"),  # Rucio may drop leading zeros
    (6, "05c801f0", "conflict"),
    (5, "05c801f1", "conflict"),
    (None, "05c801f0", "conflict"),
    (5, None, "conflict"),
])
def test_existing_verdict(did_bytes: int | None, did_adler: str | None, verdict: str) -> None:
    assert existing_verdict(5, "05c801f0", did_bytes, did_adler) == verdict


# ----------------------------------------------------------------------------- run_task
def test_all_uploaded(run: tuple[RunLayout, JobConfig]) -> None:
    layout, job = run
    fake = FakeRucio()
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 0
    assert fake.factory_calls == [None]
    assert [u["name"] for u in fake.uploads] == ["a.fits", "b.fits", "sub/c.fits", "sub/d.fits"]
    assert all(u["dataset"] == (SCOPE, "ds1") and u["lifetime"] == 86400 for u in fake.uploads)
    # the dataset (carrying the lifetime) is made once per task, not once per file
    assert fake.datasets == [((SCOPE, "ds1"), RSE, 86400)]
    assert fake.uploads[0]["path"] == job.source.root / "a.fits"
    recs = _records(layout)
    for rel, data in CONTENT.items():
        r = recs[rel]
        assert r["status"] == "uploaded", r
        assert r["error"] is None
        assert r["bytes"] == len(data)
        assert r["adler32"] == _adler(data)
        assert r["md5"] == hashlib.md5(data).hexdigest()
        assert r["pfn"] == f"davs://se/{rel}"
        # the GUID is the worker's own, given to UploadClient: the DID's says who registered
        (upload,) = [u for u in fake.uploads if u["name"] == rel]
        assert r["guid"] == upload["guid"] == fake.dids[rel].guid
        assert (r["scope"], r["rse"], r["relpath"]) == (SCOPE, RSE, rel)
        assert r["path"] == str(job.source.root / rel)
        assert (r["task"], r["attempt"]) == (0, 1)
        assert r["finished_at"].endswith("Z")
    marker = read_json(layout.done_marker(0))
    assert marker["exit_code"] == 0
    assert (marker["files"], marker["done_before"], marker["uploaded"], marker["failed"]) == (
        4, 0, 4, 0)
    assert marker["bytes_uploaded"] == sum(len(d) for d in CONTENT.values())
    assert marker["aborted"] is None
    assert (marker["rucio_host"], marker["rucio_account"]) == (FakeRucio.host, "tester")


def test_one_file_error_others_go_on(run: tuple[RunLayout, JobConfig]) -> None:
    layout, _ = run
    fake = FakeRucio()
    fake.upload_errors["b.fits"] = RucioFileError("upload failed: 503 from the RSE")
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 1
    recs = _records(layout)
    assert recs["b.fits"]["status"] == "failed"
    assert recs["b.fits"]["error"] == "upload failed: 503 from the RSE"
    assert recs["b.fits"]["adler32"] == _adler(CONTENT["b.fits"])  # read before the upload
    assert [recs[n]["status"] for n in ("a.fits", "sub/c.fits", "sub/d.fits")] == ["uploaded"] * 3
    marker = read_json(layout.done_marker(0))
    assert (marker["exit_code"], marker["uploaded"], marker["failed"]) == (1, 3, 1)


def test_existing_same_content_is_already_present(run: tuple[RunLayout, JobConfig]) -> None:
    layout, _ = run
    fake = FakeRucio()
    fake.add_existing("a.fits", CONTENT["a.fits"])
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 0
    assert "a.fits" not in [u["name"] for u in fake.uploads]
    rec = _records(layout)["a.fits"]
    assert rec["status"] == "already_present"
    assert (rec["pfn"], rec["guid"]) == ("davs://se/a.fits", "guid-a.fits")
    assert rec["md5"] == hashlib.md5(CONTENT["a.fits"]).hexdigest()
    marker = read_json(layout.done_marker(0))
    assert (marker["already_present"], marker["uploaded"]) == (1, 3)


def test_existing_did_without_available_replica_is_uploaded(
        run: tuple[RunLayout, JobConfig]) -> None:
    layout, _ = run
    fake = FakeRucio()
    fake.add_existing("a.fits", CONTENT["a.fits"], state="UNAVAILABLE")
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 0
    assert "a.fits" in [u["name"] for u in fake.uploads]
    assert _records(layout)["a.fits"]["status"] == "uploaded"


def test_existing_other_content_is_a_conflict(run: tuple[RunLayout, JobConfig]) -> None:
    layout, _ = run
    fake = FakeRucio()
    fake.add_existing("b.fits", b"something else")
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 1
    assert "b.fits" not in [u["name"] for u in fake.uploads]
    rec = _records(layout)["b.fits"]
    assert rec["status"] == "failed"
    assert rec["error"].startswith("conflict: user.test:b.fits is already in Rucio with other "
                                   "content (bytes 14, adler32 ")
    assert fake.dids["b.fits"].bytes == 14  # left alone


def test_rucio_fatal_stops_the_task(run: tuple[RunLayout, JobConfig]) -> None:
    layout, _ = run
    fake = FakeRucio()
    fake.upload_errors["b.fits"] = RucioFatal("upload failed: CannotAuthenticate: expired")
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 3
    assert [u["name"] for u in fake.uploads] == ["a.fits", "b.fits"]
    recs = _records(layout)
    assert recs["a.fits"]["status"] == "uploaded"
    # the file in hand when the credentials were refused may be in Rucio: said, never
    # "not attempted" (a record must not say less than was done)
    assert (recs["b.fits"]["status"], recs["b.fits"]["cause"]) == ("failed", "interrupted")
    assert recs["b.fits"]["error"] == (
        "the task stopped while uploading this file (upload failed: CannotAuthenticate: "
        "expired): Rucio may hold it, registered; a resubmission checks and finishes it")
    for name in ("sub/c.fits", "sub/d.fits"):
        assert recs[name]["status"] == "not_attempted"
        assert recs[name]["error"] == ("task stopped before this file: upload failed: "
                                       "CannotAuthenticate: expired")
    marker = read_json(layout.done_marker(0))
    assert marker["exit_code"] == 3
    assert marker["aborted"] == "upload failed: CannotAuthenticate: expired"
    assert (marker["uploaded"], marker["failed"], marker["not_attempted"]) == (1, 1, 2)


def test_unexpected_exception_aborts_as_internal_error(run: tuple[RunLayout, JobConfig]) -> None:
    layout, _ = run
    fake = FakeRucio()
    fake.upload_errors["a.fits"] = KeyError("bug")
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 3
    assert read_json(layout.done_marker(0))["aborted"] == "internal error KeyError: 'bug'"
    assert len(fake.uploads) == 1


def test_client_that_cannot_start_aborts_everything(run: tuple[RunLayout, JobConfig]) -> None:
    layout, _ = run

    def factory(account: str | None) -> FakeRucio:
        raise RucioFatal("cannot start a Rucio client: no rucio.cfg")

    assert run_task(layout.dir, 0, rucio_factory=factory) == 3
    recs = _records(layout)
    assert len(recs) == 4
    assert all(r["status"] == "not_attempted" for r in recs.values())
    assert all(r["error"] == "task stopped before this file: cannot start a Rucio client: "
               "no rucio.cfg" for r in recs.values())
    marker = read_json(layout.done_marker(0))
    assert marker["rucio_host"] is None and marker["exit_code"] == 3


def test_file_deleted_after_planning_is_missing(run: tuple[RunLayout, JobConfig]) -> None:
    layout, job = run
    (job.source.root / "sub/c.fits").unlink()
    fake = FakeRucio()
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 1
    rec = _records(layout)["sub/c.fits"]
    assert rec["status"] == "failed"
    assert rec["error"] == "missing: the file vanished after it was catalogued"
    assert "sub/c.fits" not in [u["name"] for u in fake.uploads]


def test_file_changed_after_planning(run: tuple[RunLayout, JobConfig]) -> None:
    layout, job = run
    (job.source.root / "a.fits").write_bytes(b"alpha plus more")
    st = os.stat(job.source.root / "b.fits")  # same size, other mtime
    os.utime(job.source.root / "b.fits", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fake = FakeRucio()
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 1
    recs = _records(layout)
    assert recs["a.fits"]["status"] == "failed"
    assert recs["a.fits"]["error"] == ("changed since it was catalogued (size 5 -> 15); not "
                                       "uploaded: plan a new run once the file is final")
    assert recs["b.fits"]["status"] == "failed"
    assert recs["b.fits"]["error"].startswith(
        "changed since it was catalogued (modification time)")
    assert [u["name"] for u in fake.uploads] == ["sub/c.fits", "sub/d.fits"]


def test_replica_not_available_after_upload(run: tuple[RunLayout, JobConfig]) -> None:
    layout, _ = run
    fake = FakeRucio()
    fake.replica_after_upload["a.fits"] = ReplicaInfo("COPYING", "", 5, _adler(b"alpha"))
    fake.replica_after_upload["b.fits"] = ReplicaInfo("AVAILABLE", "p", 11, "00000001")
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 1
    recs = _records(layout)
    assert recs["a.fits"]["error"] == ("uploaded but the replica on TEST_RSE is COPYING, "
                                       "not AVAILABLE")
    assert recs["b.fits"]["error"].startswith("checksum mismatch after upload: Rucio has bytes "
                                              "11 adler32 00000001")


def test_rerun_after_success_does_nothing(run: tuple[RunLayout, JobConfig],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    layout, _ = run
    fake = FakeRucio()
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 0
    before = layout.result(0).read_bytes()
    monkeypatch.setenv("DAC_UPLOAD_ATTEMPT", "2")
    again = FakeRucio()
    assert run_task(layout.dir, 0, rucio_factory=again.factory) == 0
    assert again.uploads == []
    assert layout.result(0).read_bytes() == before
    marker = read_json(layout.done_marker(0))
    assert (marker["attempt"], marker["done_before"], marker["uploaded"]) == (2, 4, 0)
    assert marker["exit_code"] == 0


def test_resume_retries_only_what_failed(run: tuple[RunLayout, JobConfig],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    layout, _ = run
    fake = FakeRucio()
    fake.upload_errors["b.fits"] = RucioFileError("upload failed: timeout")
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 1
    monkeypatch.setenv("DAC_UPLOAD_ATTEMPT", "2")
    del fake.upload_errors["b.fits"]
    fake.uploads.clear()
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 0
    assert [u["name"] for u in fake.uploads] == ["b.fits"]
    recs = list(read_jsonl(layout.result(0)))
    assert [(r["name"], r["status"], r["attempt"]) for r in recs] == [
        ("a.fits", "uploaded", 1), ("b.fits", "failed", 1), ("sub/c.fits", "uploaded", 1),
        ("sub/d.fits", "uploaded", 1), ("b.fits", "uploaded", 2)]
    assert read_json(layout.done_marker(0))["done_before"] == 3


def test_resume_after_a_torn_last_line(run: tuple[RunLayout, JobConfig]) -> None:
    layout, _ = run
    fake = FakeRucio()
    fake.upload_errors["b.fits"] = RucioFileError("upload failed: timeout")
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 1
    # the task is killed while writing one more record
    with open(layout.result(0), "a", encoding="utf-8") as handle:
        handle.write('{"name": "b.fits", "sta')
    del fake.upload_errors["b.fits"]
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 0
    recs = list(read_jsonl(layout.result(0)))
    assert [r["name"] for r in recs if r["status"] == "uploaded"].count("b.fits") == 1


def test_unreadable_run_is_exit_2(tmp_path: Path) -> None:
    assert run_task(tmp_path, 0, rucio_factory=FakeRucio().factory) == 2
    layout = RunLayout(tmp_path)
    assert not layout.results.exists()


def test_missing_manifest_is_exit_2(run: tuple[RunLayout, JobConfig]) -> None:
    layout, _ = run
    assert run_task(layout.dir, 5, rucio_factory=FakeRucio().factory) == 2
    assert not layout.done_marker(5).exists()


@pytest.mark.parametrize("change", [
    {"manifest_format": 3},          # written by a later dac-upload
    {"columns": None},               # damaged: no columns
    {"files": [["x.dat", "p/x.dat"]]},   # damaged: a row shorter than the columns
])
def test_unknown_or_damaged_manifest_is_exit_2(run: tuple[RunLayout, JobConfig], change: dict,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """One line on stderr and exit 2, never a traceback, and nothing uploaded."""
    layout, _ = run
    manifest = json.loads(layout.manifest(0).read_text())
    manifest.update(change)
    if change.get("columns", 0) is None:
        del manifest["columns"]
    layout.manifest(0).write_text(json.dumps(manifest))
    fake = FakeRucio()
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read run" in err and "Traceback" not in err
    assert fake.uploads == [] and not layout.result(0).exists()


def test_run_json_needs_only_what_the_worker_reads(tmp_path: Path) -> None:
    """A run directory written by hand (the documented minimum) works too."""
    root = tmp_path / "src"
    root.mkdir()
    (root / "x.dat").write_bytes(b"xyz")
    st = os.stat(root / "x.dat")
    layout = RunLayout(tmp_path / "run")
    layout.manifests.mkdir(parents=True)
    (layout.run_json).write_text(json.dumps({
        "rucio": {"scope": SCOPE, "rse": RSE, "account": "acc", "dataset_did": None,
                  "lifetime": None},
        "source": {"root": str(root)}}))
    layout.manifest(0).write_text(json.dumps({"files": [
        {"relpath": "x.dat", "name": "p/x.dat", "size": 3, "mtime": st.st_mtime}]}))
    fake = FakeRucio()
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 0
    assert fake.factory_calls == ["acc"]
    assert fake.uploads[0]["dataset"] is None and fake.uploads[0]["lifetime"] is None
    [rec] = read_jsonl(layout.result(0))
    assert (rec["name"], rec["status"], rec["adler32"]) == ("p/x.dat", "uploaded", _adler(b"xyz"))


def test_already_present_file_is_attached_to_the_dataset(make_job: Callable[..., JobConfig],
                                                         ) -> None:
    """A file uploaded by an earlier run outside the dataset still ends up in it."""
    job = make_job(CONTENT, rucio='dataset = "ds1"', upload=STOCK)
    layout = prepare_run(job, preflight=None).layout
    fake = FakeRucio()
    fake.add_existing("a.fits", CONTENT["a.fits"])
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 0
    assert fake.attached == [((SCOPE, "ds1"), "a.fits")]
    assert fake.datasets == [((SCOPE, "ds1"), RSE, None)]


def test_existing_did_elsewhere_gets_a_rule_here(make_job: Callable[..., JobConfig]) -> None:
    """Rucio's upload makes no rule for a DID that existed: the worker adds one on our RSE."""
    layout = prepare_run(make_job(CONTENT, upload=STOCK), preflight=None).layout
    fake = FakeRucio()
    fake.add_existing("a.fits", CONTENT["a.fits"], state="UNAVAILABLE")
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 0
    assert fake.rules == [("a.fits", RSE, None)]         # only for the DID that existed


def test_unreachable_server_mid_task_is_reported_as_such(
        run: tuple[RunLayout, JobConfig]) -> None:
    from dac_upload.rucio.errors import RucioUnavailable

    layout, _ = run
    run_json = read_json(layout.run_json)
    run_json["rucio"].update(retries=2, retry_wait=0.01)
    layout.run_json.write_text(json.dumps(run_json))
    fake = FakeRucio()
    fake.upload_errors["b.fits"] = RucioUnavailable("upload failed: ServerConnectionException")
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 3
    assert [u["name"] for u in fake.uploads].count("b.fits") == 3    # tried 1 + 2 times
    marker = read_json(layout.done_marker(0))
    assert marker["aborted"] == "upload failed: ServerConnectionException"


def test_attempt_counts_a_killed_attempt_without_marker(
        run: tuple[RunLayout, JobConfig]) -> None:
    layout, _ = run
    layout.results.mkdir(exist_ok=True)
    layout.result(0).write_text('{"name": "zzz", "status": "failed", "attempt": 2}\n{"na')
    assert run_task(layout.dir, 0, rucio_factory=FakeRucio().factory) == 0
    assert read_json(layout.done_marker(0))["attempt"] == 3
    assert {r["attempt"] for r in _records(layout).values() if r["name"] != "zzz"} == {3}


def _fast_retries(layout: RunLayout, retries: int) -> None:
    run_json = read_json(layout.run_json)
    run_json["rucio"].update(retries=retries, retry_wait=0.01)
    layout.run_json.write_text(json.dumps(run_json))


def test_transient_server_error_is_retried_then_succeeds(
        run: tuple[RunLayout, JobConfig]) -> None:
    from dac_upload.rucio.errors import RucioTransient

    layout, _ = run
    _fast_retries(layout, 3)
    fake = FakeRucio()
    real_upload = fake.upload
    failures = {"b.fits": 2}

    def flaky(path: Path, scope: str, name: str, *args: Any,
              **kw: Any) -> tuple[str, str | None]:
        if failures.get(name):
            failures[name] -= 1
            raise RucioTransient("upload failed: DatabaseException: database is locked")
        return real_upload(path, scope, name, *args, **kw)

    fake.upload = flaky  # type: ignore[method-assign]
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 0
    assert _records(layout)["b.fits"]["status"] == "uploaded"


def test_transient_error_that_persists_fails_the_file_and_stops_the_task(
        run: tuple[RunLayout, JobConfig]) -> None:
    """A server that fails a request through every retry would fail the next files too:
    the file fails (cause transient), the rest wait for resubmit instead of each costing the
    whole retry budget."""
    from dac_upload.rucio.errors import RucioTransient

    layout, _ = run
    _fast_retries(layout, 1)
    fake = FakeRucio()
    fake.upload_errors["b.fits"] = RucioTransient("upload failed: DatabaseException: locked")
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 3
    recs = _records(layout)
    assert (recs["b.fits"]["status"], recs["b.fits"]["cause"]) == ("failed", "transient")
    assert [u["name"] for u in fake.uploads].count("b.fits") == 2
    assert {recs[n]["cause"] for n in ("sub/c.fits", "sub/d.fits")} == {"aborted"}


def test_wall_time_signal_stops_after_the_current_file(run: tuple[RunLayout, JobConfig]) -> None:
    """SIGUSR1 (forwarded by the array script) mid-batch: the file being uploaded finishes,
    the rest are not attempted (cause stopped), the marker says why, exit 4."""
    import signal

    layout, _ = run
    fake = FakeRucio()
    real_upload = fake.upload

    def upload_then_signal(path: Path, scope: str, name: str, *args: Any, **kw: Any):
        result = real_upload(path, scope, name, *args, **kw)
        if name == "b.fits":
            os.kill(os.getpid(), signal.SIGUSR1)
        return result

    fake.upload = upload_then_signal  # type: ignore[method-assign]
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 4
    recs = _records(layout)
    assert recs["a.fits"]["status"] == recs["b.fits"]["status"] == "uploaded"
    for name in ("sub/c.fits", "sub/d.fits"):
        assert (recs[name]["status"], recs[name]["cause"]) == ("not_attempted", "stopped")
    marker = read_json(layout.done_marker(0))
    assert marker["stopped"] == "wall time near (SIGUSR1 from Slurm)"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL   # handler restored


def test_server_unreachable_at_start_is_retried(run: tuple[RunLayout, JobConfig]) -> None:
    from dac_upload.rucio.errors import RucioUnavailable

    layout, _ = run
    _fast_retries(layout, 2)
    fake = FakeRucio()
    calls = []

    def factory(account: str | None) -> FakeRucio:
        calls.append(account)
        if len(calls) < 3:
            raise RucioUnavailable("cannot reach the Rucio server: ServerConnectionException")
        return fake

    assert run_task(layout.dir, 0, rucio_factory=factory) == 0
    assert len(calls) == 3


def test_files_needing_a_person_wait_unless_told(run: tuple[RunLayout, JobConfig]) -> None:
    """A resubmitted task leaves a conflicting file alone; --retry-permanent tries it."""
    layout, _ = run
    fake = FakeRucio()
    fake.add_existing("b.fits", b"something else")
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 1
    fake.uploads.clear()
    fake.dids.pop("b.fits")                                 # the person removed the old one
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 1   # still not complete
    assert fake.uploads == []                                # held: nothing tried
    assert read_json(layout.done_marker(0))["waiting_for_a_person"] == 1
    assert run_task(layout.dir, 0, rucio_factory=fake.factory, retry_permanent=True) == 0
    assert [u["name"] for u in fake.uploads] == ["b.fits"]
    last = [r for r in read_jsonl(layout.result(0)) if r["name"] == "b.fits"][-1]
    assert last["status"] == "uploaded"


def test_a_proxy_near_its_end_stops_the_task_with_the_renewal(tmp_path: Path,
                                                              proxy: Path) -> None:
    from dac_upload.rucio.credentials import PROXY_MARGIN, proxy_facts
    from dac_upload.runrecord import TaskSettings
    from dac_upload.upload.common import proxy_problem

    s = TaskSettings(scope="s", rse="R", account=None, dataset=None, lifetime=None,
                 root=tmp_path, proxy=proxy)
    facts = proxy_facts(proxy)
    assert facts is not None
    assert proxy_problem(s, now=facts.not_after - PROXY_MARGIN - 5) is None
    why = proxy_problem(s, now=facts.not_after - PROXY_MARGIN + 5)
    assert why is not None and why.startswith(f"the X.509 proxy {proxy} ")
    assert f"grid-proxy-init -rfc -out {proxy}), then resubmit" in why
    # no proxy, or one that is not there yet: Rucio and the storage say what they make of it
    assert proxy_problem(TaskSettings(scope="s", rse="R", account=None, dataset=None,
                                  lifetime=None, root=tmp_path)) is None
    assert proxy_problem(TaskSettings(scope="s", rse="R", account=None, dataset=None,
                                  lifetime=None, root=tmp_path,
                                  proxy=tmp_path / "absent")) is None


def test_stock_upload_another_run_registered_first_is_already_present(
        run: tuple[RunLayout, JobConfig]) -> None:
    """Two runs uploading the same name at once both succeed in UploadClient; the DID's
    GUID says whose registration counted: the other run's, so not uploaded here."""
    layout, _ = run
    fake = FakeRucio()
    real_upload = fake.upload

    def upload_racing(path: Path, scope: str, name: str, *args: Any, **kw: Any):
        if name == "a.fits":    # the other run's registration came first
            fake.add_existing("a.fits", CONTENT["a.fits"], guid="theirs")
        return real_upload(path, scope, name, *args, **kw)

    fake.upload = upload_racing  # type: ignore[method-assign]
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 0
    rec = _records(layout)["a.fits"]
    assert (rec["status"], rec["guid"]) == ("already_present", "theirs")
    assert "another upload registered this name first" in rec["note"]


def test_stock_upload_that_failed_after_rucio_got_the_file_says_so(
        run: tuple[RunLayout, JobConfig]) -> None:
    """UploadClient fails (a rename race, a rule it could not add) but Rucio has the file
    AVAILABLE with our bytes: registered by us (our GUID) is uploaded, by another upload
    already_present; neither is failed."""
    layout, _ = run
    fake = FakeRucio()
    real_upload = fake.upload

    def upload_then_fail(path: Path, scope: str, name: str, *args: Any, **kw: Any):
        if name == "a.fits":      # another run's copy won the rename
            fake.add_existing("a.fits", CONTENT["a.fits"], guid="theirs")
            raise RucioFileError("upload failed: Unable to rename the tmp file")
        if name == "b.fits":      # ours registered, then the rule failed
            real_upload(path, scope, name, *args, **kw)
            raise RucioFileError("upload failed: DuplicateRule")
        return real_upload(path, scope, name, *args, **kw)

    fake.upload = upload_then_fail  # type: ignore[method-assign]
    assert run_task(layout.dir, 0, rucio_factory=fake.factory) == 0
    recs = _records(layout)
    assert recs["a.fits"]["status"] == "already_present"
    assert "Unable to rename" in recs["a.fits"]["note"]
    assert recs["b.fits"]["status"] == "uploaded"
    assert "DuplicateRule" in recs["b.fits"]["note"]
