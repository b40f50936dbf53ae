"""dac-upload verify (dac_upload/verify.py) on runs made by the real planner, worker (bulk
path, fake Rucio) and collector, checked against a fake Rucio and a fake storage that start
as the upload left them and are then broken one thing at a time: which files are named,
with which cause, and how many requests it takes."""

from __future__ import annotations

import inspect
import json
import os
import zlib
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
from test_bulk import CONTENT, FakeBulk

from dac_upload import verify
from dac_upload.collect import collect_run
from dac_upload.config import JobConfig
from dac_upload.errors import Exit
from dac_upload.files import read_json, read_jsonl
from dac_upload.pipeline import prepare_run
from dac_upload.rucio.client import FileReplicas, RucioIO, RuleInfo
from dac_upload.rucio.errors import RucioFatal, RucioFileError, RucioTransient, RucioUnavailable
from dac_upload.rucio.storage import Storage, StoredObject
from dac_upload.runrecord import RunLayout
from dac_upload.upload.task import run_task
from dac_upload.verify import (
    StorageReader,
    VerifyError,
    VerifySession,
    covers,
    source_problems,
    storage_problems,
    verify_run,
)

SCOPE, RSE = "user.test", "TEST_RSE"


def _adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


def _rule(expr: str = RSE, copies: int = 1, rid: str = "r",
          expires: datetime | None = None) -> RuleInfo:
    return RuleInfo(id=rid, rse_expression=expr, copies=copies, state="OK", account="tester",
                    expires_at=expires)


class FakeReader:
    """The storage: PFN -> bytes; ``errors`` PFN -> exception to raise."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.errors: dict[str, Exception] = {}
        self.asked: list[str] = []
        self.checksums = True

    def inspect(self, pfn: str) -> StoredObject:
        self.asked.append(pfn)
        if pfn in self.errors:
            raise self.errors[pfn]
        if pfn not in self.objects:
            return StoredObject(exists=False)
        data = self.objects[pfn]
        return StoredObject(True, len(data), _adler(data) if self.checksums else None)


class FakeVerify:
    """Rucio as verify asks it, in dictionaries; every request recorded (method, size)."""

    host = "https://rucio.test"

    def __init__(self) -> None:
        self.files: dict[str, FileReplicas] = {}
        self.rules: dict[str, list[RuleInfo]] = {}      # DID "scope:name" or name -> rules
        self.rule_made: dict[str, datetime] = {}        # name -> when its file rule was made
        self.expressions: dict[str, list[str]] = {RSE: [RSE]}
        self.reader = FakeReader({})
        self.calls: list[tuple[str, int]] = []
        self.fail: dict[str, list[Exception]] = {}
        self.refuse_storage: Exception | None = None
        self.parents_asked: list[bool] = []     # per file_replicas request
        self.containers: dict[str, list[str]] = {}   # collection -> its own collections

    @classmethod
    def after(cls, rio: FakeBulk, dataset: str | None = None) -> FakeVerify:
        """As the upload (a FakeBulk) left Rucio and the storage."""
        fake = cls()
        for name, did in rio.dids.items():
            rep = rio.replicas.get(name)
            parents = (f"{SCOPE}:{dataset}",) if dataset and name in rio.attached else ()
            fake.files[name] = FileReplicas(did.bytes, did.adler32, did.md5,
                                            rep.state if rep else None,
                                            (rep.pfn,) if rep else (), parents)
        for name in rio.rules:
            fake.rules[name] = [_rule(rid=f"rule-{name}")]
            fake.rule_made[name] = datetime.utcnow()
        if dataset:
            fake.rules[f"{SCOPE}:{dataset}"] = [_rule(rid="ds-rule")]
        fake.reader = FakeReader({f"file:///rse/{n}": d for n, d in rio.on_disk.items()})
        return fake

    def change(self, name: str, **kw: Any) -> None:
        f = self.files[name]
        self.files[name] = FileReplicas(**{**f.__dict__, **kw})

    def _call(self, method: str, n: int = 1) -> None:
        self.calls.append((method, n))
        if self.fail.get(method):
            raise self.fail[method].pop(0)

    def file_replicas(self, scope: str, names: list[str], rse: str,
                      parents: bool = False) -> dict[str, FileReplicas]:
        """As list_replicas: the parents only when asked for."""
        self._call("file_replicas", len(names))
        self.parents_asked.append(parents)
        return {n: self.files[n] if parents else FileReplicas(**{**self.files[n].__dict__,
                                                                "parents": ()})
                for n in names if n in self.files}

    def did_rules(self, scope: str, name: str) -> list[RuleInfo]:
        self._call("did_rules")
        return list(self.rules.get(f"{scope}:{name}", self.rules.get(name, [])))

    def ruled_files(self, scope: str, rse: str, created_after: datetime | None = None
                    ) -> Iterator[tuple[str, datetime | None]]:
        self._call("ruled_files", 0 if created_after is None else 1)
        for name, rules in self.rules.items():
            made = self.rule_made.get(name)
            if ":" in name or (created_after is not None and (made is None
                                                              or made < created_after)):
                continue
            for r in rules:
                if r.rse_expression == rse:
                    yield name, r.expires_at

    def rses_of(self, expression: str) -> list[str]:
        self._call("rses_of")
        return self.expressions.get(expression, [])

    def collection_files(self, scope: str, name: str) -> Iterator[tuple[str, str]]:
        """The files whose parents name the collection."""
        self._call("collection_files")
        for n, f in self.files.items():
            if f"{scope}:{name}" in f.parents:
                yield scope, n

    def parent_dids(self, scope: str, name: str) -> list[str]:
        self._call("parent_dids")
        return list(self.containers.get(f"{scope}:{name}", []))

    def storage_reader(self, rse: str) -> FakeReader:
        self._call("storage_reader")
        if self.refuse_storage is not None:
            raise self.refuse_storage
        return self.reader


@pytest.fixture(autouse=True)
def _no_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify, "RETRY_WAITS", (0.0, 0.0))


@pytest.fixture
def uploaded(make_job: Callable[..., JobConfig]) -> Callable[..., tuple[RunLayout, FakeBulk]]:
    """A run of CONTENT (5 files, one task) uploaded by the bulk path and collected."""
    def make(rucio: str = "", files: dict[str, bytes] | None = None
             ) -> tuple[RunLayout, FakeBulk]:
        job = make_job(files or CONTENT, upload="chunk_size = 10", rucio=rucio)
        layout, rio = prepare_run(job, preflight=None).layout, FakeBulk()
        assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 0
        collect_run(layout.dir)
        return layout, rio
    return make


def _problems(layout: RunLayout) -> set[tuple[str, str]]:
    return {(p["cause"], p["did"].split(":", 1)[1])
            for p in read_jsonl(layout.dir / verify.PROBLEMS_FILE)}


def test_a_run_as_uploaded_verifies(uploaded: Callable[..., Any]) -> None:
    layout, rio = uploaded()
    fake = FakeVerify.after(rio)
    seen: list[tuple[int, int]] = []
    report = verify_run(layout.dir, source="checksum", session=fake,
                        progress=lambda f, b: seen.append((f, b)))
    assert report.ok and report.exit_code == Exit.OK == 0
    assert (report.files, report.checked, report.not_done) == (5, 5, 0)
    assert report.bytes_checked == sum(map(len, CONTENT.values()))
    assert seen == [(5, report.bytes_checked)]
    assert (layout.dir / "verify.jsonl").read_text() == ""     # written, empty
    assert sorted(fake.reader.asked) == sorted(f"file:///rse/{n}" for n in CONTENT)
    # one request for the replicas; five files without a collection: their rules one by one
    assert fake.calls == [("storage_reader", 1), ("file_replicas", 5)] + [("did_rules", 1)] * 5
    assert fake.parents_asked == [False]     # without a dataset: not worth the server's time
    assert report.rucio_requests == len(fake.calls)
    text = report.render()
    assert text.splitlines()[0].startswith(f"verify {report.run_id}: all 5 files the run "
                                           "uploaded or found present are as recorded")
    assert "problems" not in text and "full list" not in text
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["ok"] is True and doc["exit_code"] == 0 and doc["causes"] == {}


def test_each_break_is_named_with_its_cause(uploaded: Callable[..., Any]) -> None:
    layout, rio = uploaded(files={f"f{i}.dat": bytes([i]) * (100 + i) for i in range(12)})
    fake = FakeVerify.after(rio)
    del fake.files["f0.dat"]                                      # DID gone
    fake.change("f1.dat", state=None, pfns=())                    # replica gone from the RSE
    fake.change("f2.dat", state="UNAVAILABLE")
    fake.change("f3.dat", bytes=1)
    fake.change("f4.dat", adler32="00000001")
    fake.rules.pop("f5.dat")                                      # its rule deleted
    fake.reader.objects["file:///rse/f6.dat"] = b"x" * 106        # same size, other bytes
    del fake.reader.objects["file:///rse/f7.dat"]
    fake.reader.objects["file:///rse/f8.dat"] = b"short"
    fake.reader.errors["file:///rse/f9.dat"] = RucioFileError("checking: Permission denied")
    report = verify_run(layout.dir, session=fake)
    assert report.exit_code == Exit.FAILURES == 1
    assert _problems(layout) == {
        ("missing_replica", "f0.dat"), ("missing_replica", "f1.dat"),
        ("not_available", "f2.dat"), ("size_mismatch", "f3.dat"),
        ("checksum_mismatch", "f4.dat"), ("no_rule", "f5.dat"),
        ("storage_checksum_mismatch", "f6.dat"), ("storage_missing", "f7.dat"),
        ("storage_size_mismatch", "f8.dat"), ("storage_error", "f9.dat")}
    assert report.files_with_problems == 10 and report.checked == 12
    assert sum(report.causes.values()) == 10
    by_cause = {p["cause"]: p for p in read_jsonl(layout.dir / "verify.jsonl")}
    assert by_cause["storage_missing"]["pfn"] == "file:///rse/f7.dat"
    assert "adler32 00000001" in by_cause["checksum_mismatch"]["detail"]
    assert by_cause["not_available"]["detail"] == f"its replica on {RSE} is UNAVAILABLE"
    text = report.render()
    assert text.splitlines()[0].endswith(
        "10 of 12 files have problems (2 missing_replica, 1 not_available, 1 size_mismatch, "
        "1 checksum_mismatch, 1 no_rule, 1 storage_missing, 1 storage_size_mismatch, "
        "1 storage_checksum_mismatch, 1 storage_error)")
    assert f"full list: {layout.dir / 'verify.jsonl'}" in text
    assert f"  {SCOPE}:f7.dat: nothing at file:///rse/f7.dat" in text
    # the missing DID's replica is not asked for rules; the storage is still looked at
    assert ("did_rules", 1) in fake.calls and "file:///rse/f0.dat" in fake.reader.asked


def test_md5_is_compared_when_both_have_one(uploaded: Callable[..., Any]) -> None:
    layout, rio = uploaded()
    fake = FakeVerify.after(rio)
    fake.change("f2.dat", md5="0" * 32)
    verify_run(layout.dir, session=fake)
    assert _problems(layout) == {("checksum_mismatch", "f2.dat")}


def test_source_checks_by_size_mtime_and_checksum(uploaded: Callable[..., Any],
                                                  tmp_path: Path) -> None:
    layout, rio = uploaded()
    data = tmp_path / "data"
    (data / "f0.dat").write_bytes(CONTENT["f0.dat"] + b"more")          # size
    st = (data / "f1.dat").stat()
    os.utime(data / "f1.dat", (st.st_atime, st.st_mtime + 5))           # mtime only
    (data / "f2.dat").unlink()
    same = bytearray(CONTENT["f3.dat"])
    same[0] ^= 0xFF                                                      # same size and mtime
    st = (data / "f3.dat").stat()
    (data / "f3.dat").write_bytes(bytes(same))
    os.utime(data / "f3.dat", ns=(st.st_atime_ns, st.st_mtime_ns))
    fake = FakeVerify.after(rio)
    assert verify_run(layout.dir, source="none", session=fake).ok
    verify_run(layout.dir, source="size", session=fake)
    assert _problems(layout) == {("source_changed", "f0.dat"), ("source_changed", "f1.dat"),
                                 ("source_missing", "f2.dat")}
    details = {p["relpath"]: p["detail"] for p in read_jsonl(layout.dir / "verify.jsonl")}
    assert details["f0.dat"].endswith(f"size {len(CONTENT['f0.dat'])} -> "
                                      f"{len(CONTENT['f0.dat']) + 4}")
    assert "modification time" in details["f1.dat"]
    report = verify_run(layout.dir, source="checksum", session=fake)
    assert ("source_changed", "f3.dat") in _problems(layout)
    assert report.causes == {"source_changed": 3, "source_missing": 1}
    with pytest.raises(ValueError):
        verify_run(layout.dir, source="md5", session=fake)


def test_source_problems_pure(tmp_path: Path) -> None:
    path = tmp_path / "a"
    path.write_bytes(b"abc")
    st = path.stat()
    entry = {"path": str(path), "bytes": 3, "adler32": _adler(b"abc")}
    assert source_problems(entry, (3, st.st_mtime), "checksum") == []
    assert source_problems(entry, None, "size") == []           # no manifest: size only
    assert source_problems(entry, (4, st.st_mtime), "size")[0][0] == "source_changed"
    assert source_problems({**entry, "adler32": "00000000"}, (3, st.st_mtime),
                           "checksum")[0][0] == "source_changed"
    assert source_problems({**entry, "path": str(tmp_path / "b")}, None,
                           "size")[0][0] == "source_missing"
    assert source_problems({**entry, "path": str(tmp_path)}, None, "checksum")[0][0] in (
        "source_changed", "source_unreadable")   # a directory where the file was


def test_storage_problems_pure() -> None:
    entry = {"bytes": 3, "adler32": _adler(b"abc"), "md5": "m"}
    assert storage_problems(entry, StoredObject(True, 3, _adler(b"abc")), "p") == []
    assert storage_problems(entry, StoredObject(True, 3, None, "m"), "p") == []
    assert storage_problems(entry, StoredObject(True, 3, None, "x"), "p")[0][0] == \
        "storage_checksum_mismatch"
    assert storage_problems(entry, StoredObject(True, None, None), "p") == []  # nothing to say
    assert storage_problems(entry, StoredObject(False), "p") == [("storage_missing",
                                                                  "nothing at p")]


def test_a_dataset_run_is_protected_by_the_datasets_rule(uploaded: Callable[..., Any]) -> None:
    layout, rio = uploaded(rucio='dataset = "ds"')
    fake = FakeVerify.after(rio, dataset="ds")
    report = verify_run(layout.dir, session=fake)
    assert report.ok, report.render()
    # the dataset once (its files, the collections it is in, its rules), then one request
    # per chunk for the replicas, without their parents (the server's slowest part)
    assert fake.calls == [("storage_reader", 1), ("collection_files", 1), ("parent_dids", 1),
                          ("did_rules", 1), ("file_replicas", 5)]
    assert fake.parents_asked == [False]
    fake.change("f1.dat", parents=())                           # detached
    verify_run(layout.dir, session=fake)
    assert _problems(layout) == {("not_in_dataset", "f1.dat"), ("no_rule", "f1.dat")}
    fake.rules[f"{SCOPE}:ds"] = [_rule("OTHER_RSE")]            # the dataset's rule moved
    verify_run(layout.dir, session=fake)
    assert {c for c, _ in _problems(layout)} == {"no_rule", "not_in_dataset"}
    assert {n for c, n in _problems(layout) if c == "no_rule"} == set(CONTENT)
    # a container the dataset is in, with a rule on the RSE, protects its files
    fake.containers[f"{SCOPE}:ds"] = [f"{SCOPE}:box"]
    fake.rules[f"{SCOPE}:box"] = [_rule()]
    verify_run(layout.dir, session=fake)
    assert _problems(layout) == {("not_in_dataset", "f1.dat"), ("no_rule", "f1.dat")}
    # a file with a rule of its own is protected whatever its dataset says
    fake.rules["f1.dat"] = [_rule()]
    verify_run(layout.dir, session=fake)
    assert _problems(layout) == {("not_in_dataset", "f1.dat")}
    fake.files.clear()                                         # the dataset gone, its files
    report = verify_run(layout.dir, session=fake)
    assert any("holds no file" in n for n in report.notes)
    assert report.causes == {"missing_replica": 5}


def test_a_file_of_a_run_without_a_dataset_may_be_protected_by_a_collection(
        uploaded: Callable[..., Any]) -> None:
    """Without a dataset the chunks are listed without parents; a file with no rule of its
    own is then asked for its collections, whose rules count as in a dataset run."""
    layout, rio = uploaded()
    fake = FakeVerify.after(rio)
    fake.rules.pop("f0.dat")
    fake.change("f0.dat", parents=(f"{SCOPE}:theirs",))
    fake.rules[f"{SCOPE}:theirs"] = [_rule()]
    assert verify_run(layout.dir, session=fake).ok
    assert fake.parents_asked == [False, True]
    fake.rules[f"{SCOPE}:theirs"] = [_rule("OTHER")]
    verify_run(layout.dir, session=fake)
    assert _problems(layout) == {("no_rule", "f0.dat")}


def test_a_deleted_rule_is_found_while_rucio_still_shows_it(
        uploaded: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Rucio's delete-rule only sets expires_at an hour ahead: such a rule is
    rule_expiring (the run asked for no lifetime), one past it no_rule; in a run with a
    lifetime an expiring rule is what was asked for. The same through the listing."""
    now = datetime.utcnow()
    for one_by_one in (50, 1):
        monkeypatch.setattr(verify, "ONE_BY_ONE", one_by_one)
        layout, rio = uploaded()
        fake = FakeVerify.after(rio)
        fake.rules["f0.dat"] = [_rule(expires=now + timedelta(minutes=50))]
        fake.rules["f1.dat"] = [_rule(expires=now - timedelta(minutes=1))]
        fake.rules["f2.dat"] = [_rule(expires=now + timedelta(minutes=5)),
                                _rule(expires=now + timedelta(minutes=50), rid="later")]
        report = verify_run(layout.dir, session=fake)
        assert _problems(layout) == {("rule_expiring", "f0.dat"), ("no_rule", "f1.dat"),
                                     ("rule_expiring", "f2.dat")}, one_by_one
        detail = {p["relpath"]: p["detail"] for p in read_jsonl(layout.dir / "verify.jsonl")}
        later = (now + timedelta(minutes=50)).strftime("%Y-%m-%dT%H:%M")
        assert later in detail["f0.dat"] and later in detail["f2.dat"]   # the last one
        assert "expires_at" in detail["f1.dat"]
        assert report.causes == {"rule_expiring": 2, "no_rule": 1}
    layout, rio = uploaded(rucio='lifetime = "30d"')
    fake = FakeVerify.after(rio)
    fake.rules["f0.dat"] = [_rule(expires=now + timedelta(days=29))]
    assert verify_run(layout.dir, session=fake).ok


def test_rule_expressions_are_resolved() -> None:
    calls: list[str] = []

    def resolve(expr: str) -> list[str]:
        calls.append(expr)
        return {"tier=1": [RSE, "B"], "site=X": [RSE], "B": ["B"]}.get(expr, [])

    assert covers(_rule(RSE), RSE, resolve) and calls == []
    assert covers(_rule("site=X"), RSE, resolve)
    assert covers(_rule("tier=1", copies=2), RSE, resolve)
    assert not covers(_rule("tier=1", copies=1), RSE, resolve)   # its copy may be on B
    assert not covers(_rule("B"), RSE, resolve) and not covers(_rule("gone"), RSE, resolve)


def test_many_files_without_collections_take_one_listing(
        uploaded: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ONE_BY_ONE the scope's file rules on the RSE are listed (those made since the
    run was planned first), not asked file by file; a rule with another expression is
    found only file by file."""
    monkeypatch.setattr(verify, "CHUNK", 2)
    monkeypatch.setattr(verify, "ONE_BY_ONE", 1)
    layout, rio = uploaded()
    fake = FakeVerify.after(rio)
    fake.rules.pop("f0.dat")
    fake.rules["f1.dat"] = [_rule("site=X")]
    fake.expressions["site=X"] = [RSE]
    report = verify_run(layout.dir, session=fake)
    assert _problems(layout) == {("no_rule", "f0.dat")}
    assert [c for c in fake.calls if c[0] == "file_replicas"] == [
        ("file_replicas", 2), ("file_replicas", 2), ("file_replicas", 1), ("file_replicas", 1)]
    assert ("ruled_files", 1) in fake.calls and ("ruled_files", 0) not in fake.calls
    # f0 and f1 one by one: their own rules, then f0's collections (none)
    assert [c for c in fake.calls if c[0] == "did_rules"] == [("did_rules", 1)] * 2
    assert fake.parents_asked == [False, False, False, True]
    assert report.rucio_requests == len(fake.calls)


def test_older_rules_are_listed_whole_and_too_many_left_are_not_asked_one_by_one(
        uploaded: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify, "ONE_BY_ONE", 1)
    monkeypatch.setattr(verify, "ONE_BY_ONE_MAX", 2)
    layout, rio = uploaded()
    fake = FakeVerify.after(rio)
    for name in ("f0.dat", "f1.dat", "f2.dat"):       # rules from before the run
        fake.rule_made[name] = datetime(2000, 1, 1)
    assert verify_run(layout.dir, session=fake).ok
    assert [c for c in fake.calls if c[0] == "ruled_files"] == [("ruled_files", 1),
                                                                 ("ruled_files", 0)]
    for name in CONTENT:
        fake.rules.pop(name)
    fake.calls.clear()
    report = verify_run(layout.dir, session=fake)
    assert report.causes == {"no_rule": 5}
    assert [c for c in fake.calls if c[0] == "did_rules"] == [("did_rules", 1)] * 2
    unasked = [p for p in read_jsonl(layout.dir / "verify.jsonl")
               if "not asked rule by rule" in p["detail"]]
    assert len(unasked) == 3


def test_files_the_run_did_not_upload_are_not_checked(uploaded: Callable[..., Any],
                                                      tmp_path: Path) -> None:
    layout, rio = uploaded()
    summary = (layout.dir / "summary.json").read_text()
    doc = json.loads(summary)
    assert doc["counts"]["uploaded"] == 5
    fake = FakeVerify.after(rio)
    # rewrite one entry as failed, keeping the one-file-per-line layout
    lines = summary.splitlines(keepends=True)
    i = next(n for n, line in enumerate(lines) if '"user.test:f2.dat"' in line)
    key, _, rest = lines[i].strip().partition(": ")
    entry = json.loads(rest.rstrip(","))
    entry.update(status="failed", cause="conflict")
    lines[i] = f"  {key}: {json.dumps(entry)}{',' if rest.endswith(',') else ''}\n"
    (layout.dir / "summary.json").write_text("".join(lines))
    fake.files.pop("f2.dat")
    report = verify_run(layout.dir, session=fake)
    assert report.ok and report.not_done == 1 and report.checked == 4
    assert "not checked: 1 files the run did not upload" in report.render()


def test_a_run_not_collected_or_damaged_is_refused(uploaded: Callable[..., Any]) -> None:
    layout, rio = uploaded()
    fake = FakeVerify.after(rio)
    (layout.dir / "verify.jsonl").write_text("earlier\n")
    (layout.collected).unlink()
    with pytest.raises(VerifyError, match="dac-upload collect"):
        verify_run(layout.dir, session=fake)
    collect_run(layout.dir)
    with open(layout.result(0), "a") as handle:     # a result written after the summary
        handle.write("\n")
    with pytest.raises(VerifyError, match="predates the latest task results"):
        verify_run(layout.dir, session=fake)
    collect_run(layout.dir)
    text = (layout.dir / "summary.json").read_text()
    (layout.dir / "summary.json").write_text(text[:len(text) // 2 + 40])   # cut short
    with open(layout.collected) as handle:
        done = json.load(handle)
    from dac_upload.collect import results_fingerprint
    assert done["results"] == results_fingerprint(layout.dir)
    with pytest.raises(VerifyError, match="collect the run again"):
        verify_run(layout.dir, session=fake)
    assert (layout.dir / "verify.jsonl").read_text() == "earlier\n"   # never half written
    with pytest.raises(VerifyError, match="so not a run directory"):
        verify_run(layout.dir / "nope", session=fake)


def test_a_damaged_summary_is_named_before_rucio_is_asked(
        uploaded: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Its fix (collect again) needs no Rucio: named even while the server is down."""
    layout, _ = uploaded()
    (layout.dir / "summary.json").write_text('{\n "format": "dac-upload summary",\n')

    def no_rucio(*_: Any) -> Any:
        raise AssertionError("Rucio asked before the summary was read")

    monkeypatch.setattr(verify, "_open_session", no_rucio)
    with pytest.raises(VerifyError, match=r"not a summary\.json written by dac-upload collect"):
        verify_run(layout.dir)


def test_the_list_of_problems_may_go_elsewhere(uploaded: Callable[..., Any],
                                            tmp_path: Path) -> None:
    layout, rio = uploaded()
    fake = FakeVerify.after(rio)
    fake.reader.objects.clear()
    out = tmp_path / "elsewhere.jsonl"
    report = verify_run(layout.dir, session=fake, problems_file=out)
    assert report.problems_file == out and len(out.read_text().splitlines()) == 5
    assert not (layout.dir / "verify.jsonl").exists()
    with pytest.raises(VerifyError, match="--out FILE"):
        verify_run(layout.dir, session=fake, problems_file=tmp_path / "no" / "such.jsonl")


def test_rucio_failures_are_retried_then_service_or_user_errors(
        uploaded: Callable[..., Any]) -> None:
    layout, rio = uploaded()
    fake = FakeVerify.after(rio)
    fake.fail["file_replicas"] = [RucioTransient("HTTP 500")]
    assert verify_run(layout.dir, session=fake).ok
    assert [c for c, _ in fake.calls].count("file_replicas") == 2
    fake.fail["file_replicas"] = [RucioUnavailable("cannot reach")] * 3
    with pytest.raises(RucioUnavailable, match="cannot reach"):
        verify_run(layout.dir, session=fake)
    fake.fail["file_replicas"] = [RucioTransient("HTTP 500")] * 3
    with pytest.raises(RucioUnavailable, match="keeps failing"):
        verify_run(layout.dir, session=fake)
    fake.fail["did_rules"] = [RucioFatal("CannotAuthenticate: no")]
    with pytest.raises(VerifyError, match="CannotAuthenticate"):
        verify_run(layout.dir, session=fake)
    fake.fail["file_replicas"] = [RucioFileError("odd")]
    with pytest.raises(RucioUnavailable, match="Rucio failed"):
        verify_run(layout.dir, session=fake)


def test_a_storage_that_keeps_failing_stops_verify(uploaded: Callable[..., Any],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify, "STORAGE_ERRORS_IN_A_ROW", 3)
    layout, rio = uploaded()
    fake = FakeVerify.after(rio)
    for name in ("f1.dat", "f2.dat"):                     # two in a row: each its own
        fake.reader.errors[f"file:///rse/{name}"] = RucioTransient("Connection refused")
    assert verify_run(layout.dir, session=fake).causes == {"storage_error": 2}
    assert fake.reader.asked.count("file:///rse/f1.dat") == 3    # tried again, twice
    for name in CONTENT:
        fake.reader.errors[f"file:///rse/{name}"] = RucioTransient("Connection refused")
    with pytest.raises(RucioUnavailable, match="failed 3 checks in a row"):
        verify_run(layout.dir, session=fake)
    assert verify_run(layout.dir, storage=False, session=fake).ok     # not asked
    assert ("storage_reader", 1) not in fake.calls[-2:]


def test_a_storage_that_cannot_be_read_by_pfn_is_noted(uploaded: Callable[..., Any]) -> None:
    layout, rio = uploaded()
    fake = FakeVerify.after(rio)
    fake.refuse_storage = RucioFatal("RSE TEST_RSE is reached through signed URLs")
    report = verify_run(layout.dir, session=fake)
    assert report.ok and fake.reader.asked == []
    assert "note: the storage was not checked: RSE TEST_RSE is reached through signed " \
           "URLs" in report.render()
    fake.refuse_storage = None
    fake.reader.checksums = False
    report = verify_run(layout.dir, session=fake)
    assert report.ok and any("no checksum for 5 files" in n for n in report.notes)


def test_requests_stay_per_chunk_for_a_bigger_run(uploaded: Callable[..., Any],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Rucio requests grow with chunks, not files: 40 files, chunks of 16, one listing."""
    monkeypatch.setattr(verify, "CHUNK", 16)
    monkeypatch.setattr(verify, "ONE_BY_ONE", 10)
    layout, rio = uploaded(files={f"d/f{i:02d}.dat": bytes([i]) * (i + 1) for i in range(40)})
    fake = FakeVerify.after(rio)
    report = verify_run(layout.dir, session=fake)
    assert report.ok and report.checked == 40
    assert fake.calls == [("storage_reader", 1), ("file_replicas", 16), ("file_replicas", 16),
                          ("file_replicas", 8), ("ruled_files", 1)]


def _params(cls: type, name: str) -> list[str] | None:
    member = inspect.getattr_static(cls, name)
    return None if isinstance(member, property) else list(
        inspect.signature(getattr(cls, name)).parameters)


@pytest.mark.parametrize(("protocol", "classes"), [(VerifySession, (RucioIO, FakeVerify)),
                                                   (StorageReader, (Storage, FakeReader))])
def test_the_session_and_the_fakes_keep_the_protocol(protocol: type,
                                                     classes: tuple[type, ...]) -> None:
    members = [n for n, v in vars(protocol).items()
               if not n.startswith("_") and (callable(v) or isinstance(v, property))]
    assert members
    for cls in classes:
        for name in members:
            want = _params(protocol, name)
            if want is None:
                assert hasattr(cls, name), (cls, name)
            else:
                assert _params(cls, name) == want, (cls, name)


def test_the_text_names_the_first_problems_of_each_cause(uploaded: Callable[..., Any],
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    layout, rio = uploaded()
    fake = FakeVerify.after(rio)
    fake.reader.objects.clear()
    report = verify_run(layout.dir, session=fake)
    text = report.render(per_cause=2)
    assert "storage_missing (5): the storage has nothing at the PFN" in text
    assert "  ... and 3 more" in text and len(report.examples["storage_missing"]) == 5
    assert read_json(layout.dir / "summary.json")["counts"]["uploaded"] == 5


def test_storage_inspect_on_a_posix_rse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Storage.inspect with Rucio's real POSIX protocol (no server): the size and adler32 of
    the file on disk, absent when it is not there, RucioFileError for a PFN it cannot map."""
    from types import SimpleNamespace

    from rucio.common.config import clean_cached_config
    from test_storage import _settings

    cfg = tmp_path / "rucio.cfg"
    cfg.write_text("[client]\nrucio_host = http://127.0.0.1:9\nauth_host = "
                   "http://127.0.0.1:9\nauth_type = userpass\naccount = root\n")
    monkeypatch.setenv("RUCIO_CONFIG", str(cfg))
    clean_cached_config()
    try:
        rse = tmp_path / "rse"
        rse.mkdir()
        storage = Storage(_settings(rse), "auto", SimpleNamespace(auth_token="opaque"))
        pfn = storage.pfn("test", "a/b.dat")
        path = Path(pfn[len("file://localhost"):])
        path.parent.mkdir(parents=True)
        path.write_bytes(b"hello world")
        assert storage.inspect(pfn) == StoredObject(True, 11, _adler(b"hello world"))
        path.write_bytes(b"hello there")
        assert storage.inspect(pfn).adler32 == _adler(b"hello there")
        path.unlink()
        assert storage.inspect(pfn) == StoredObject(False)
        with pytest.raises(RucioFileError, match="checking file://localhost/elsewhere"):
            storage.inspect("file://localhost/elsewhere/x")
    finally:
        clean_cached_config()
