"""Butler-ready uploads against the real services: a source Butler repository (SQLite, local
datastore) goes through the real Slurm into the real Rucio on PostgreSQL; each file DID carries
Rubin's rubin_butler / rubin_sidecar metadata, and the sidecar turns back into the source ref.
Then a fresh destination Butler imports the dimension records and the real `butler
ingest-files -t direct` ingests the tables `dac-upload butler-table` wrote, pointing at the
files on the test RSE: every dataset is there with the source's data ID, and reads back the
same. A plain tree with a [[butler.map]] goes the same way; a file no map matches is
reported, not dropped. On the SQLite Rucio (no JSON metadata plugin) the upload says once
that the metadata was refused, and the files are uploaded all the same. Datasets of visits
without visit_detector_region records (which a query with dimension records leaves out) are
uploaded too, said in the plan, and ingest at the destination by both paths."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import pytest
from conftest import PG_RUCIO_URL
from ithelpers import (
    RSE,
    SCOPE,
    VENV_BIN,
    adler32_of,
    as_user,
    chown_user,
    dac_upload,
    job_toml,
    load_summary,
    parse_submitted,
    run_dir_of,
    unique_prefix,
    wait_for_jobs,
    write_job,
)

daf_butler = pytest.importorskip("lsst.daf.butler", reason="needs dac-upload[butler]")
Butler = daf_butler.Butler
DatasetRef = daf_butler.DatasetRef
DatasetType = daf_butler.DatasetType

INSTRUMENT = "DummyCam"
RUN1, RUN2 = "u/dac/run1", "u/dac/run2"


def _add_dimension_records(butler: Any, exposures: tuple[int, ...] = (100, 101),
                           detectors: int = 3) -> None:
    reg = butler.registry
    reg.insertDimensionData("instrument", {
        "name": INSTRUMENT, "visit_max": 1000, "exposure_max": 1000, "detector_max": 10,
        "class_name": "lsst.obs.base.Instrument"})
    reg.insertDimensionData("detector", *[{"instrument": INSTRUMENT, "id": d,
                                           "full_name": f"d{d}"} for d in range(detectors)])
    reg.insertDimensionData("physical_filter", {"instrument": INSTRUMENT, "name": "dc-r",
                                                "band": "r"})
    reg.insertDimensionData("day_obs", {"instrument": INSTRUMENT, "id": 20261125})
    reg.insertDimensionData("group", {"instrument": INSTRUMENT, "name": "g1"})
    reg.insertDimensionData("exposure", *[{
        "instrument": INSTRUMENT, "id": e, "physical_filter": "dc-r", "obs_id": f"e{e}",
        "day_obs": 20261125, "group": "g1"} for e in exposures])


def _source_repo(root: Path) -> dict[str, Any]:
    """A source Butler with two dataset types in two runs (and one left out by the query):
    dataset id -> the object put."""
    from astropy.table import Table

    Butler.makeRepo(str(root))
    butler = Butler.from_config(str(root), writeable=True)
    _add_dimension_records(butler)
    u = butler.dimensions
    for dt in (DatasetType("cfg", ("instrument", "detector", "exposure"), "StructuredDataDict",
                           universe=u),
               DatasetType("tbl", ("instrument", "exposure"), "AstropyTable", universe=u),
               DatasetType("other", ("instrument",), "StructuredDataDict", universe=u)):
        butler.registry.registerDatasetType(dt)
    for run in (RUN1, RUN2):
        butler.registry.registerRun(run)
    put: dict[str, Any] = {}
    for e in (100, 101):
        for d in range(3):
            obj = {"exposure": e, "detector": d, "pad": "x" * (100 * d)}
            ref = butler.put(obj, "cfg", instrument=INSTRUMENT, detector=d, exposure=e,
                             run=RUN1)
            put[str(ref.id)] = obj
        tbl = Table({"a": [1, 2, e], "b": [0.5, 1.5, 2.5]})
        ref = butler.put(tbl, "tbl", instrument=INSTRUMENT, exposure=e, run=RUN2)
        put[str(ref.id)] = tbl
    butler.put({"not": "selected"}, "other", instrument=INSTRUMENT, run=RUN1)
    butler.close()
    return put


def _butler_job(prefix: str, repo: str, upload: str = "bulk") -> str:
    return f"""
[butler]
repo = "{repo}"
collections = ["{RUN1}", "{RUN2}"]
dataset_types = ["cfg", "tb*"]
[rucio]
scope = "{SCOPE}"
rse = "{RSE}"
config = "../rucio.cfg"
[naming]
prefix = "{prefix}"
[upload]
mode = "{upload}"
[batching]
files_per_batch = 3
max_running = 2
[slurm]
time = "00:10:00"
mem = "1G"
[container]
runtime = "none"
"""


def _submit_and_wait(workdir: Path, job: Path) -> Path:
    out = dac_upload(["submit", str(job)], workdir)
    assert out.returncode == 0, out.stdout + out.stderr
    array, collector = parse_submitted(out.stdout)
    wait_for_jobs([array, collector])
    return run_dir_of(out.stdout)


def _destination(path: Path) -> None:
    """A fresh, empty destination Butler repository, owned by the test user."""
    Butler.makeRepo(str(path))
    chown_user(path)


def _ingest(workdir: Path, script: Path, dest: Path) -> None:
    out = as_user(["sh", str(script), str(dest)], workdir)
    assert out.returncode == 0, out.stdout + out.stderr


def _listed_by_the_butler_cli(workdir: Path, dest: Path) -> int:
    """How many cfg and tbl datasets the real `butler query-datasets` lists in ``dest``."""
    listed = as_user([str(VENV_BIN / "butler"), "query-datasets", str(dest), "cfg", "tbl",
                      "--collections", "u/dac/*"], workdir)
    assert listed.returncode == 0, listed.stderr
    return sum(1 for line in listed.stdout.splitlines()
               if line.strip().startswith(("cfg ", "tbl ")))


def test_butler_repo_through_slurm_into_rucio_with_sidecar_metadata_then_ingest_files(
        pg_workdir: Path, pg_rucio_client: Any) -> None:
    workdir, client = pg_workdir, pg_rucio_client
    put = _source_repo(workdir / "repo")
    chown_user(workdir)
    prefix = unique_prefix()
    job = write_job(workdir, "butler", _butler_job(prefix, "../repo"))

    run_dir = _submit_and_wait(workdir, job)
    summary = load_summary(run_dir)
    assert summary["complete"], json.dumps(summary["counts"])
    assert summary["rucio"]["host"] == PG_RUCIO_URL
    files = summary["files"]
    assert len(files) == 9 and summary["counts"]["uploaded"] == 9   # 6 cfg + 2 tbl + records
    b = summary["butler"]
    assert b["kind"] == "repo" and b["files_without_datasets"] == 0
    assert b["datasets"] == 8 and b["metadata_set"] == 9
    assert not summary["warnings"]

    # the dimension records went too, as a file Rubin's ingest daemon imports (dim_file)
    dim = files.pop(f"{SCOPE}:{b['dimension_file']}")
    assert b["dimension_file"].startswith(prefix + "dac-upload-dimensions/")
    meta = client.get_metadata(SCOPE, dim["name"], plugin="ALL")
    assert (meta["rubin_butler"], meta["rubin_sidecar"]) == ("dim_file", "")
    exported = (run_dir / "butler-dimensions.yaml").read_bytes()
    assert Path(dim["pfn"][len("file://localhost"):]).read_bytes() == exported
    assert b"element: exposure" in exported and b"element: detector" in exported

    source = Butler.from_config(str(workdir / "repo"))
    refs = {str(r.id): r for dt in ("cfg", "tbl")
            for r in source.query_datasets(dt, collections=[RUN1, RUN2])}
    assert set(refs) == set(put)
    seen: set[str] = set()
    for f in files.values():
        # the Rucio name mirrors the datastore: prefix + the path under the datastore root
        (dataset,) = f["datasets"]
        ref = refs[dataset["dataset_id"]]
        relpath = source.getURI(ref).relative_to(source._datastore.root)
        assert f["name"] == prefix + relpath and f["relpath"] == relpath
        assert dataset["data_id"] == dict(ref.dataId.required)
        assert (dataset["dataset_type"], dataset["run"]) == (ref.datasetType.name, ref.run)
        # Rubin's metadata on the file DID, the sidecar turning back into the source ref
        meta = client.get_metadata(SCOPE, f["name"], plugin="ALL")
        assert meta["rubin_butler"] == "data_product"
        back = DatasetRef.from_json(meta["rubin_sidecar"], universe=source.dimensions)
        assert back == ref and back.id == ref.id and back.run == ref.run
        assert back.dataId.required == ref.dataId.required
        assert meta["adler32"] == adler32_of(Path(source.getURI(ref).ospath))
        assert f["metadata"] == "set"
        seen.add(dataset["dataset_id"])
    assert seen == set(put)

    # the destination side: dimension records, then butler ingest-files -t direct
    dest = workdir / "dest"
    _destination(dest)
    out = dac_upload(["butler-table", str(run_dir)], workdir)
    assert out.returncode == 0, out.stdout + out.stderr
    tables = sorted((run_dir / "butler-ingest").glob("*.ecsv"))
    assert [t.name for t in tables] == ["cfg.u_dac_run1.ecsv", "tbl.u_dac_run2.ecsv"]
    assert "butler ingest-files -t direct" in out.stdout
    _ingest(workdir, run_dir / "butler-ingest" / "ingest.sh", dest)

    assert _listed_by_the_butler_cli(workdir, dest) == 8
    target = Butler.from_config(str(dest))
    got = {(r.datasetType.name, r.run, tuple(sorted(r.dataId.required.items()))): r
           for dt in ("cfg", "tbl")
           for r in target.query_datasets(dt, collections=[RUN1, RUN2])}
    assert len(got) == 8
    for ref in refs.values():
        there = got[(ref.datasetType.name, ref.run, tuple(sorted(ref.dataId.required.items())))]
        uri = target.getURI(there)
        f = files[f"{SCOPE}:{prefix}{source.getURI(ref).relative_to(source._datastore.root)}"]
        assert str(uri).replace("file:///", "file://localhost/") == f["pfn"]
        assert uri.read() == source.getURI(ref).read()          # the same bytes
        obj = target.get(there)
        if ref.datasetType.name == "cfg":
            assert obj == put[str(ref.id)]
        else:
            assert list(obj["a"]) == list(put[str(ref.id)]["a"])
    # dimension records came from the source's export, not from this test
    assert {r.id for r in target.query_dimension_records("exposure")} == {100, 101}


PACKING = '\n[packing]\nbelow = "1 MiB"\n'


def _zip_members(data: bytes) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return zf.namelist()


def test_butler_repo_packed_into_butler_zips_then_ingest_zip(
        pg_workdir: Path, pg_rucio_client: Any) -> None:
    """[packing] with a Butler source: the archives are Butler zips (their index first),
    rubin_butler = "zip_file" on the archive only, and a fresh destination ingests them
    with the generated `butler ingest-zip` lines and reads every dataset back."""
    from lsst.daf.butler.datastores.file_datastore.retrieve_artifacts import ZipIndex
    from lsst.resources import ResourcePath

    workdir, client = pg_workdir, pg_rucio_client
    put = _source_repo(workdir / "repo")
    chown_user(workdir)
    prefix = unique_prefix()
    job = write_job(workdir, "zips", _butler_job(prefix, "../repo").replace(
        "files_per_batch = 3", "files_per_batch = 4") + PACKING)
    run_dir = _submit_and_wait(workdir, job)
    summary = load_summary(run_dir)
    assert summary["complete"], json.dumps(summary["counts"])
    b = summary["butler"]
    files = dict(summary["files"])
    dim = files.pop(f"{SCOPE}:{b['dimension_file']}")
    assert "archive" not in dim                 # the records go on their own (dim_file)
    archives: dict[str, list[dict[str, Any]]] = {}
    for f in files.values():
        archives.setdefault(f["archive"], []).append(f)
    assert len(files) == 8 and len(archives) == 2 and b["metadata_set"] == 9

    source = Butler.from_config(str(workdir / "repo"))
    refs = {str(r.id): r for dt in ("cfg", "tbl")
            for r in source.query_datasets(dt, collections=[RUN1, RUN2])}
    for name, members in archives.items():
        # Rucio: one file DID marked zip_file, its constituents the members, one rule
        meta = client.get_metadata(SCOPE, name, plugin="ALL")
        assert (meta["rubin_butler"], meta["rubin_sidecar"]) == ("zip_file", "")
        content = {c["name"] for c in client.list_archive_content(SCOPE, name)}
        assert content == {m["name"] for m in members}
        assert len(list(client.list_did_rules(SCOPE, name))) == 1
        for m in members:
            assert "rubin_butler" not in client.get_metadata(SCOPE, m["name"], plugin="ALL")
            assert m["pfn"] == members[0]["pfn"] and m["member"] == m["name"]
        # the stored bytes: a Butler zip, its index first, every dataset of its members
        stored = Path(members[0]["pfn"][len("file://localhost"):])
        assert _zip_members(stored.read_bytes()) == [
            "_butler_zip_index.json", *sorted(m["name"] for m in members)]
        index = ZipIndex.from_zip_file(ResourcePath(str(stored)))
        ids = {d["dataset_id"] for m in members for d in m["datasets"]}
        assert {str(i) for i in index.refs.compact_refs} == ids
        assert set(index.artifact_map) == {m["name"] for m in members}
        for m in members:
            info = index.artifact_map[m["name"]].info
            assert info.file_size == m["bytes"]
            ref = refs[m["datasets"][0]["dataset_id"]]
            assert info.formatter == m["datasets"][0]["formatter"]
            assert info.storage_class == ref.datasetType.storageClass_name

    out = dac_upload(["butler-table", str(run_dir)], workdir)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not list((run_dir / "butler-ingest").glob("*.ecsv"))    # nothing loose to table
    script = (run_dir / "butler-ingest" / "ingest.sh").read_text()
    assert script.count("butler ingest-zip -t direct") == 2
    assert script.index("butler import") < script.index("butler ingest-zip")
    dest = workdir / "dest"
    _destination(dest)
    _ingest(workdir, run_dir / "butler-ingest" / "ingest.sh", dest)

    assert _listed_by_the_butler_cli(workdir, dest) == 8
    target = Butler.from_config(str(dest))
    got = {str(r.id): r for dt in ("cfg", "tbl")
           for r in target.query_datasets(dt, collections=[RUN1, RUN2])}
    assert set(got) == set(put)                   # the source's own dataset ids
    for dataset_id, ref in got.items():
        assert ref.dataId.required == refs[dataset_id].dataId.required
        uri = str(target.getURI(ref))
        assert "#zip-path=" in uri and uri.split("#")[0].endswith(".zip")
        obj = target.get(ref)
        if ref.datasetType.name == "cfg":
            assert obj == put[dataset_id]
        else:
            assert list(obj["a"]) == list(put[dataset_id]["a"])

    ok = dac_upload(["verify", str(run_dir)], workdir)
    assert ok.returncode == 0, ok.stdout + ok.stderr


@pytest.mark.parametrize("packed", [False, True], ids=["loose", "packed"])
def test_plain_tree_with_a_regex_map_through_ingest_files(workdir: Path, packed: bool) -> None:
    """Loose: butler ingest-files tables. Packed: Butler zips whose index gives each
    dataset the id ingest-files would (DATAID_TYPE_RUN), the unmatched file packed too but
    in no index, and butler ingest-zip."""
    src = workdir / "src"
    expected = {}
    for e in (100, 101):
        for d in (0, 2):
            path = src / "raw" / INSTRUMENT / f"e{e}" / f"d{d}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"exposure: {e}\ndetector: {d}\n")
            expected[path.relative_to(src).as_posix()] = {"instrument": INSTRUMENT,
                                                          "exposure": e, "detector": d}
    (src / "raw" / "README.txt").write_text("not a dataset\n")
    chown_user(workdir)
    prefix = unique_prefix()
    job = write_job(workdir, "tree", job_toml(prefix, files_per_batch=3) + f"""
[[butler.map]]
dataset_type = "rawcfg"
run = "{INSTRUMENT}/raw/plain"
path = 'raw/(?P<instrument>[A-Za-z]+)/e(?P<exposure>\\d+)/d(?P<detector>\\d+)\\.yaml'
storage_class = "StructuredDataDict"
formatter = "lsst.daf.butler.formatters.yaml.YamlFormatter"
""" + (PACKING if packed else ""))
    run_dir = _submit_and_wait(workdir, job)
    summary = load_summary(run_dir)
    assert summary["complete"] and summary["counts"]["uploaded"] == 5
    assert summary["butler"]["files_without_datasets"] == 1
    by_rel = {f["relpath"]: f for f in summary["files"].values()}
    assert by_rel["raw/README.txt"]["datasets"] == []
    for rel, data_id in expected.items():
        (d,) = by_rel[rel]["datasets"]
        assert d["data_id"] == data_id     # exposure and detector are ints: converted
        assert by_rel[rel]["metadata"] is None   # a map gives no DatasetRef to send
        assert bool(by_rel[rel].get("archive")) == packed

    # the unmatched file is reported, and fails the command unless allowed
    out = dac_upload(["butler-table", str(run_dir)], workdir)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 files uploaded but matched by no [[butler.map]]" in out.stderr
    assert "raw/README.txt" in out.stderr
    out = dac_upload(["butler-table", str(run_dir), "--allow-missing", "--overwrite"], workdir)
    assert out.returncode == 0, out.stdout + out.stderr

    dest = workdir / "dest"
    Butler.makeRepo(str(dest))
    with Butler.from_config(str(dest), writeable=True) as b:
        _add_dimension_records(b, detectors=3)   # a plain tree brings no records of its own
    chown_user(dest)
    script = (run_dir / "butler-ingest" / "ingest.sh").read_text()
    assert ("butler ingest-zip" in script, "butler ingest-files" in script) == (packed,
                                                                                not packed)
    _ingest(workdir, run_dir / "butler-ingest" / "ingest.sh", dest)
    target = Butler.from_config(str(dest))
    refs = target.query_datasets("rawcfg", collections=f"{INSTRUMENT}/raw/plain")
    if packed:   # the ids ingest-files gives: the same datasets at any destination
        factory = daf_butler.DatasetIdFactory()
        for r in refs:
            assert r.id == factory.makeDatasetId(r.run, r.datasetType, r.dataId,
                                                 daf_butler.DatasetIdGenEnum.DATAID_TYPE_RUN)
    def key(x: dict[str, Any]) -> tuple[int, int]:
        return x["exposure"], x["detector"]

    assert sorted((dict(r.dataId.required) for r in refs), key=key) == sorted(
        expected.values(), key=key)
    for r in refs:
        rel = f"raw/{INSTRUMENT}/e{r.dataId['exposure']}/d{r.dataId['detector']}.yaml"
        if not packed:
            assert target.getURI(r).read() == (src / rel).read_bytes()
        else:
            assert str(target.getURI(r)).endswith(f"#zip-path={prefix}{rel}")
        assert target.get(r) == {"exposure": r.dataId["exposure"],
                                 "detector": r.dataId["detector"]}


def test_metadata_refused_by_a_sqlite_rucio_is_one_warning_and_files_still_upload(
        workdir: Path) -> None:
    _source_repo(workdir / "repo")
    chown_user(workdir)
    job = write_job(workdir, "butler", _butler_job(unique_prefix(), "../repo",
                                                   upload="stock"))
    run_dir = _submit_and_wait(workdir, job)
    summary = load_summary(run_dir)
    assert summary["complete"] and summary["counts"]["uploaded"] == 9
    assert summary["butler"]["metadata_refused"] == 9
    assert {f["metadata"] for f in summary["files"].values()} == {"refused"}
    (warning,) = summary["warnings"]
    assert "Butler metadata was not set" in warning and "JSON metadata plugin" in warning
    logs = "".join(p.read_text() for p in (run_dir / "logs").glob("*"))
    assert logs.count("WARNING: Butler metadata not set") == 3   # once per task (3 tasks)


def test_planning_needs_the_butler_extra_and_says_how(workdir: Path) -> None:
    """Without lsst-daf-butler on the planning host, one line says what to install."""
    job = write_job(workdir, "butler", _butler_job(unique_prefix(), "../repo"))
    out = as_user([str(VENV_BIN / "python"), "-c",
                   "import sys; sys.modules['lsst'] = None; "
                   "from dac_upload.cli import main; main()", "plan", "--offline",
                   str(job)], workdir)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "pip install 'dac-upload[butler]'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("packed", [False, True], ids=["loose", "packed"])
def test_nightly_with_a_butler_source_uploads_only_new_datasets(
        pg_workdir: Path, pg_rucio_client: Any, packed: bool) -> None:
    """Packed, the new datasets go into a new Butler zip; the first night's are untouched,
    and a file of the first night touched since goes on its own (already present), never
    into the new zip (butler ingest-zip refuses a zip with datasets it has beside new
    ones)."""
    workdir, client = pg_workdir, pg_rucio_client
    _source_repo(workdir / "repo")
    chown_user(workdir)
    job = write_job(workdir, "night", _butler_job(unique_prefix(), "../repo")
                    + (PACKING if packed else ""))
    night1 = dac_upload(["nightly", str(job), "--wait"], workdir)
    assert night1.returncode == 0, night1.stdout + night1.stderr
    night2 = dac_upload(["nightly", str(job), "--wait"], workdir)
    assert night2.returncode == 0 and "nothing new" in (night2.stdout + night2.stderr).lower(), (
        night2.stdout + night2.stderr)
    runs = sorted((workdir / "jobs" / "night" / "runs").glob("2*"))
    first = load_summary(runs[0])
    before = {f["archive"]: sorted(c["name"] for c in client.list_archive_content(
        SCOPE, f["archive"])) for f in first["files"].values() if f.get("archive")}
    assert bool(before) == packed

    with Butler.from_config(str(workdir / "repo"), writeable=True) as b:   # a new exposure
        b.registry.insertDimensionData("exposure", {
            "instrument": INSTRUMENT, "id": 102, "physical_filter": "dc-r", "obs_id": "e102",
            "day_obs": 20261125, "group": "g1"})
        new = [b.put({"exposure": 102, "detector": d}, "cfg", instrument=INSTRUMENT,
                     detector=d, exposure=102, run=RUN1) for d in (0, 1)]
    touched = next(f for f in first["files"].values() if f.get("datasets")
                   and f["name"] != first["butler"]["dimension_file"])
    path = workdir / "repo" / touched["relpath"]
    os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 60))
    chown_user(workdir)
    night3 = dac_upload(["nightly", str(job), "--wait"], workdir)
    assert night3.returncode == 0, night3.stdout + night3.stderr
    runs = sorted((workdir / "jobs" / "night" / "runs").glob("2*"))
    assert len(runs) == 2
    summary = load_summary(runs[-1])
    got = [f for f in summary["files"].values()
           if f["name"] not in (summary["butler"]["dimension_file"], touched["name"])]
    again = summary["files"][f"{SCOPE}:{touched['name']}"]
    assert again["status"] == "already_present" and "archive" not in again
    if packed:
        assert (runs[-1] / "kept-loose.txt").read_text() == touched["relpath"] + "\n"
    assert sorted(f["datasets"][0]["dataset_id"] for f in got) == sorted(str(r.id) for r in new)
    assert {f["status"] for f in got} == {"uploaded"}
    universe = new[0].datasetType.dimensions.universe
    if not packed:
        for f in got:
            meta = client.get_metadata(SCOPE, f["name"], plugin="ALL")
            assert DatasetRef.from_json(meta["rubin_sidecar"], universe=universe).id in {
                r.id for r in new}
    else:   # one new zip of the new files; the first night's zips as they were
        (archive,) = {f["archive"] for f in got}
        assert archive not in before
        assert sorted(c["name"] for c in client.list_archive_content(SCOPE, archive)) == \
            sorted(f["name"] for f in got)
        assert client.get_metadata(SCOPE, archive, plugin="ALL")["rubin_butler"] == "zip_file"
        for name, content in before.items():
            assert sorted(c["name"] for c in client.list_archive_content(SCOPE, name)) == \
                content
        # the destination takes both nights: the touched file's dataset came with the
        # first night's zip; the second night's butler-table says so and leaves it out
        dest = workdir / "dest"
        _destination(dest)
        for run, code in ((runs[0], 0), (runs[-1], 1)):
            out = dac_upload(["butler-table", str(run)], workdir)
            assert out.returncode == code, out.stdout + out.stderr
            _ingest(workdir, run / "butler-ingest" / "ingest.sh", dest)
        assert "1 files already in Rucio inside an earlier run's archive" in out.stderr
        assert touched["relpath"] in out.stderr
        with Butler.from_config(str(dest)) as target:
            got_ids = {str(r.id) for r in target.query_datasets("cfg", collections=RUN1)}
        assert {str(r.id) for r in new} <= got_ids and len(got_ids) == 8
    exported = (runs[-1] / "butler-dimensions.yaml").read_text()
    assert "id: 102" in exported


def test_doctor_looks_at_the_datastore_of_a_butler_source(pg_workdir: Path) -> None:
    _source_repo(pg_workdir / "repo")
    chown_user(pg_workdir)
    job = write_job(pg_workdir, "doc", _butler_job(unique_prefix(), "../repo"))
    out = dac_upload(["doctor", str(job)], pg_workdir)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"OK   source: {pg_workdir / 'repo'} is readable" in out.stdout, out.stdout
    bad = write_job(pg_workdir, "bad", _butler_job(unique_prefix(), "../no-such-repo"))
    out = dac_upload(["doctor", str(bad)], pg_workdir)
    assert out.returncode == 1
    assert "FAIL source:" in out.stdout and "cannot be opened as a Butler repository" in out.stdout


VISITS = (1, 2, 3, 4, 5)


def _repo_without_some_regions(root: Path) -> dict[str, Any]:
    """A source Butler with a vcfg dataset per visit and detector (15), whose visits 2-5 have
    no visit_detector_region records (regions written for visit 1 only): the query with
    dimension records finds 3 of the 15. Dataset id -> the object put."""
    from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d

    Butler.makeRepo(str(root))
    butler = Butler.from_config(str(root), writeable=True)
    _add_dimension_records(butler)
    reg = butler.registry
    reg.insertDimensionData("visit", *[{"instrument": INSTRUMENT, "id": v, "name": f"v{v}",
                                        "physical_filter": "dc-r", "day_obs": 20261125}
                                       for v in VISITS])
    region = ConvexPolygon.convexHull([UnitVector3d(LonLat.fromDegrees(ra, dec))
                                       for ra, dec in ((10, 10), (11, 10), (11, 11))])
    reg.insertDimensionData("visit_detector_region", *[{
        "instrument": INSTRUMENT, "visit": 1, "detector": d, "region": region}
        for d in range(3)])
    reg.registerDatasetType(DatasetType("vcfg", ("instrument", "visit", "detector"),
                                        "StructuredDataDict", universe=butler.dimensions))
    reg.registerRun(RUN1)
    put: dict[str, Any] = {}
    for v in VISITS:
        for d in range(3):
            obj = {"visit": v, "detector": d}
            ref = butler.put(obj, "vcfg", instrument=INSTRUMENT, visit=v, detector=d, run=RUN1)
            put[str(ref.id)] = obj
    assert len(butler.query_datasets("vcfg", collections=RUN1,
                                     with_dimension_records=True)) == 3
    butler.close()
    return put


def _regions_job(prefix: str, where: str = "") -> str:
    return _butler_job(prefix, "../repo").replace(
        f'"{RUN1}", "{RUN2}"', f'"{RUN1}"').replace(
        'dataset_types = ["cfg", "tb*"]',
        'dataset_types = ["vcfg"]' + (f'\nwhere = "{where}"' if where else ""))


def _region_records(butler: Any) -> set[tuple[int, int]]:
    return {(r.visit, r.detector) for r in butler.query_dimension_records(
        "visit_detector_region", explain=False)}


def test_datasets_whose_visits_lack_region_records_are_uploaded_said_and_ingest(
        pg_workdir: Path, pg_rucio_client: Any) -> None:
    """The issue: plan found 3 of 15 datasets, exit 0, nothing in skipped.jsonl. Now every
    dataset is planned (none skipped), the plan says which records 12 of them lack, and the
    destination ingests all 15 by the sidecar path (as lsst-dm/ctrl_ingestd does: import the
    dim_file, DatasetRef.from_json, Butler.ingest) and by ingest.sh, lacking the same records
    as the source."""
    workdir, client = pg_workdir, pg_rucio_client
    put = _repo_without_some_regions(workdir / "repo")
    chown_user(workdir)
    job = write_job(workdir, "regions", _regions_job(unique_prefix()))

    out = dac_upload(["plan", str(job)], workdir)
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = run_dir_of(out.stdout)
    planned = [json.loads(line) for line in (run_dir / "butler.jsonl").read_text().splitlines()]
    assert sorted(d["dataset_id"] for f in planned for d in f["datasets"]) == sorted(put)
    assert (run_dir / "skipped.jsonl").read_text().strip() == ""
    assert "skipped" not in out.stdout.splitlines()[0], out.stdout
    assert ("note: 12 datasets (vcfg: 12) have no visit_detector_region record in the "
            "repository") in out.stderr, out.stderr
    assert "they are uploaded with the records it has" in out.stderr

    sub = dac_upload(["submit", "--run", str(run_dir)], workdir)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    wait_for_jobs(list(parse_submitted(sub.stdout)))
    summary = load_summary(run_dir)
    assert summary["complete"] and summary["counts"]["uploaded"] == 16, summary["counts"]
    assert summary["butler"]["datasets"] == 15 and summary["butler"]["metadata_set"] == 16
    files = dict(summary["files"])
    dim = files.pop(f"{SCOPE}:{summary['butler']['dimension_file']}")

    # the sidecar path, as Rubin's ingest daemon takes it
    dest = workdir / "dest-sidecar"
    Butler.makeRepo(str(dest))
    target = Butler.from_config(str(dest), writeable=True)
    target.import_(filename=dim["pfn"][len("file://localhost"):])
    refs = []
    for f in files.values():
        meta = client.get_metadata(SCOPE, f["name"], plugin="ALL")
        refs.append(DatasetRef.from_json(meta["rubin_sidecar"], universe=target.dimensions))
    target.registry.registerDatasetType(refs[0].datasetType)
    target.ingest(*[daf_butler.FileDataset(path=f["pfn"], refs=[ref])
                    for f, ref in zip(files.values(), refs)], transfer="direct")
    got = target.query_datasets("vcfg", collections=RUN1)
    assert {str(r.id) for r in got} == set(put)
    assert all(target.get(r) == put[str(r.id)] for r in got)
    assert _region_records(target) == {(1, d) for d in range(3)}   # as at the source
    target.close()

    # the ECSV path: butler-table, then ingest.sh (butler import + ingest-files -t direct)
    made = dac_upload(["butler-table", str(run_dir)], workdir)
    assert made.returncode == 0, made.stdout + made.stderr
    dest = workdir / "dest-ecsv"
    _destination(dest)
    _ingest(workdir, run_dir / "butler-ingest" / "ingest.sh", dest)
    target = Butler.from_config(str(dest))
    got = target.query_datasets("vcfg", collections=RUN1)
    by_key = {(r.dataId["visit"], r.dataId["detector"]): r for r in got}
    assert sorted(by_key) == sorted((o["visit"], o["detector"]) for o in put.values())
    assert all(target.get(r) == {"visit": v, "detector": d} for (v, d), r in by_key.items())
    assert _region_records(target) == {(1, d) for d in range(3)}


def test_a_dataset_type_whose_datasets_all_lack_region_records_is_planned_with_the_cause(
        workdir: Path) -> None:
    """dataset_types = ["vcfg"] where visit > 1: every dataset lacks its region records. This
    was refused as 'finds no dataset'; now the 12 are planned and the note names the cause."""
    put = _repo_without_some_regions(workdir / "repo")
    chown_user(workdir)
    job = write_job(workdir, "regions", _regions_job(
        unique_prefix(), where=f"instrument = '{INSTRUMENT}' AND visit > 1"))
    out = dac_upload(["plan", "--offline", str(job)], workdir)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "finds no dataset" not in out.stderr
    assert ("note: 12 datasets (vcfg: 12) have no visit_detector_region record in the "
            "repository") in out.stderr, out.stderr
    planned = (run_dir_of(out.stdout) / "butler.jsonl").read_text().splitlines()
    assert len(planned) == 12 == len(put) - 3
