"""The Butler parts without services: [butler] in the job file, plain-tree maps (with the real
dimension universe), Rubin's metadata, the worker's metadata step, the summary's Butler
fields and the ingest tables butler-table writes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from unit_helpers import assert_valid_summary, job_text, write_job

from dac_upload.butler.ingest import ingest_tables
from dac_upload.butler.source import ButlerError, map_tree, rubin_metadata
from dac_upload.catalogue import Entry
from dac_upload.collect import build_summary
from dac_upload.config import ConfigError, load_job
from dac_upload.rucio.errors import MetadataRefused, RucioFileError
from dac_upload.runrecord import TaskSettings
from dac_upload.upload.common import StopRequest, TaskState
from dac_upload.upload.task import with_metadata

MAP = """
[[butler.map]]
dataset_type = "raw"
run = "DECam/raw/all"
path = 'raw/(?P<exposure>\\d+)/(?P<detector>\\d+)\\.fits'
data_id = {instrument = "DECam"}
storage_class = "Exposure"
"""


def _job_errors(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_job(write_job(tmp_path, text))
    return info.value.lines


# ----------------------------------------------------------------------------- job file
def test_map_section_parses(tmp_path: Path) -> None:
    job = load_job(write_job(tmp_path, job_text() + MAP))
    (m,) = job.butler.maps
    assert job.butler.kind == "map"
    assert (m.dataset_type, m.run, m.storage_class, m.formatter) == (
        "raw", "DECam/raw/all", "Exposure", None)
    assert dict(m.data_id) == {"instrument": "DECam"}
    assert m.pattern.fullmatch("raw/123/07.fits").groupdict() == {"exposure": "123",
                                                                  "detector": "07"}


def test_repo_section_takes_the_repository_as_the_root(tmp_path: Path) -> None:
    text = job_text().replace('root = "data"', "") + """
[butler]
repo = "repo/butler.yaml"
collections = ["HSC/runs/RC2"]
dataset_types = ["calexp"]
where = "instrument = 'HSC'"
"""
    job = load_job(write_job(tmp_path, text))
    assert job.butler.kind == "repo" and job.butler.metadata
    assert job.butler.repo == str(tmp_path / "repo" / "butler.yaml")
    assert job.source.root == tmp_path / "repo"
    assert job.butler.raw_dataset_types == ("raw",)


@pytest.mark.parametrize("extra, expected", [
    ('[butler]\nrepo = "r"\n', "[butler] repo needs collections"),
    ('[butler]\nrepo = "r"\ncollections = ["c"]\n' + MAP, "do not go together"),
    ('[butler]\ncollections = ["c"]\n', "[butler] collections is used only with repo"),
    ('[butler]\nrepo = "r"\ncollections = ["c"]\nfind_first = "yes"\n',
     "[butler] find_first = 'yes' is not valid"),
    ('[butler]\nrepos = "r"\n', "unknown key 'repos'; did you mean 'repo'?"),
    ('[[butler.map]]\ndataset_type = "raw"\nrun = "r"\npath = "raw/(.*"\n',
     "is not a valid regular expression"),
    ('[[butler.map]]\ndataset_type = "raw"\nrun = "r"\npath = "raw/x"\n',
     "path has no named group"),
    ('[[butler.map]]\ndataset_type = "raw"\nrun = "r"\npath = "(?P<detector>\\\\d+)"\n'
     'data_id = {detector = 1}\n', "detector comes both from a path group and from data_id"),
    ('[[butler.map]]\ndataset_type = "raw"\npath = "(?P<detector>\\\\d+)"\n',
     "[[butler.map]] #1 'run' is required"),
    ('[[butler.map]]\ndataset_type = "raw"\nrun = "r"\npath = "(?P<detector>\\\\d+)"\n'
     'formater = "x"\n', "unknown key 'formater'; did you mean 'formatter'?"),
])
def test_butler_mistakes_are_one_line_each(tmp_path: Path, extra: str, expected: str) -> None:
    lines = _job_errors(tmp_path, job_text() + extra)
    assert any(expected in line for line in lines), lines


def test_source_keys_are_refused_with_a_butler_source(tmp_path: Path) -> None:
    lines = _job_errors(tmp_path, job_text(source='include = ["*.fits"]')
                        + '[butler]\nrepo = "r"\ncollections = ["c"]\n')
    assert sum("is not used with a Butler source" in line for line in lines) == 2, lines


# ----------------------------------------------------------------------------- plain-tree maps
daf_butler = pytest.importorskip("lsst.daf.butler", reason="needs dac-upload[butler]")


@pytest.fixture(scope="module")
def universe() -> Any:
    return daf_butler.DimensionUniverse()


def _map_job(tmp_path: Path, maps: str) -> Any:
    return load_job(write_job(tmp_path, job_text() + maps))


def test_map_tree_converts_values_and_reports_unmatched(tmp_path: Path, universe: Any) -> None:
    job = _map_job(tmp_path, MAP)
    entries = [Entry("raw/00123/07.fits", 10, 1.0), Entry("raw/notes.txt", 3, 1.0),
               Entry("raw/1/2.fits.gz", 3, 1.0)]
    datasets, unmatched, problems = map_tree(entries, job.butler, "job.toml", universe)
    assert unmatched == ["raw/notes.txt", "raw/1/2.fits.gz"] and not problems
    (d,) = datasets["raw/00123/07.fits"]
    assert d["data_id"] == {"detector": 7, "exposure": 123, "instrument": "DECam"}
    assert d["dimensions"] == ["instrument", "detector", "exposure"]
    assert (d["dataset_type"], d["run"], d["storage_class"], d["ref"]) == (
        "raw", "DECam/raw/all", "Exposure", None)


def test_map_tree_value_of_the_wrong_type_is_a_problem(tmp_path: Path, universe: Any) -> None:
    job = _map_job(tmp_path, MAP.replace("(?P<exposure>\\d+)", "(?P<exposure>\\w+)"))
    _, _, problems = map_tree([Entry("raw/abc/1.fits", 1, 1.0)], job.butler, "j", universe)
    (p,) = problems
    assert p.relpath == "raw/abc/1.fits" and "'abc' is not a int" in p.reason


@pytest.mark.parametrize("maps, expected", [
    (MAP.replace("detector", "detektor"), "detektor is not a dimension"),
    (MAP.replace('data_id = {instrument = "DECam"}', ""), "the data ID lacks instrument"),
])
def test_map_tree_bad_dimensions_refused_before_any_file(tmp_path: Path, universe: Any,
                                                         maps: str, expected: str) -> None:
    job = _map_job(tmp_path, maps)
    with pytest.raises(ButlerError) as info:
        map_tree([], job.butler, "job.toml", universe)
    assert len(info.value.lines) == 1 and expected in info.value.lines[0]


def test_rubin_metadata_as_rucio_register_writes_it() -> None:
    ds = {"dataset_type": "calexp", "ref": "{}", "in_zip": False}
    assert rubin_metadata(ds, '{"id": "x"}', ("raw",)) == {"rubin_butler": "data_product",
                                                           "rubin_sidecar": '{"id": "x"}'}
    assert rubin_metadata({**ds, "dataset_type": "raw"}, "{}", ("raw",))["rubin_butler"] == \
        "raw_file"
    assert rubin_metadata({**ds, "in_zip": True}, "{}", ("raw",)) == {
        "rubin_butler": "zip_file", "rubin_sidecar": ""}


# ----------------------------------------------------------------------------- worker: metadata
class _MetaRucio:
    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.calls: list[list[tuple[str, dict[str, str]]]] = []

    def set_metadata_bulk(self, scope: str, items: list[tuple[str, dict[str, str]]]) -> None:
        self.calls.append(items)
        if self.fail:
            raise self.fail


def _settings(tmp_path: Path) -> TaskSettings:
    return TaskSettings(scope="s", rse="R", account=None, dataset=None, lifetime=None,
                    root=tmp_path, retries=0, retry_wait=0, mode="bulk", chunk_size=2)


def _recs() -> list[dict[str, Any]]:
    return [{"name": n, "status": st, "error": None, "cause": None}
            for n, st in (("a", "uploaded"), ("b", "already_present"), ("c", "failed"),
                          ("d", "uploaded"))]


def _meta_run(tmp_path: Path, rio: _MetaRucio) -> tuple[list[dict[str, Any]], TaskState]:
    state = TaskState()
    meta = {n: {"rubin_butler": "data_product", "rubin_sidecar": n} for n in "abcd"}
    with StopRequest() as stop:
        out = list(with_metadata(rio, _settings(tmp_path), iter(_recs()), meta, stop, state,
                                  4))
    return out, state


def test_metadata_groups_are_the_bulk_chunks(tmp_path: Path) -> None:
    """One request per chunk of the bulk path, small first and last chunks included."""
    from dataclasses import replace as dc_replace

    from dac_upload.upload.bulk import chunk_sizes

    rio = _MetaRucio()
    recs = [{"name": f"f{i}", "status": "uploaded", "error": None, "cause": None}
            for i in range(1000)]
    meta = {r["name"]: {"rubin_butler": "data_product"} for r in recs}
    with StopRequest() as stop:
        out = list(with_metadata(rio, dc_replace(_settings(tmp_path), chunk_size=200),
                                  iter(recs), meta, stop, TaskState(), 1000))
    assert [len(call) for call in rio.calls] == chunk_sizes(1000, 200)
    assert len(out) == 1000 and {r["metadata"] for r in out} == {"set"}


def test_metadata_set_for_done_files_in_groups(tmp_path: Path) -> None:
    rio = _MetaRucio()
    out, state = _meta_run(tmp_path, rio)
    assert [[n for n, _ in call] for call in rio.calls] == [["a", "b"], ["d"]]
    assert [r.get("metadata") for r in out] == ["set", "set", None, "set"]
    assert state.metadata_refused is None


def test_metadata_refused_once_files_stay_uploaded(tmp_path: Path) -> None:
    rio = _MetaRucio(MetadataRefused("no JSON plugin"))
    out, state = _meta_run(tmp_path, rio)
    assert len(rio.calls) == 1                       # asked once, not again
    assert [r["status"] for r in out] == ["uploaded", "already_present", "failed", "uploaded"]
    assert [r.get("metadata") for r in out] == ["refused", "refused", None, "refused"]
    assert state.metadata_refused == "no JSON plugin"


def test_metadata_error_fails_the_files_for_a_resubmission(tmp_path: Path) -> None:
    out, state = _meta_run(tmp_path, _MetaRucio(RucioFileError("permission denied")))
    assert [r["status"] for r in out] == ["failed"] * 4
    assert "its Butler metadata was not set (permission denied)" in out[0]["error"]
    assert out[2]["error"] is None and not state.aborted


# ----------------------------------------------------------------------------- summary, tables
def _summary(tmp_path: Path) -> dict[str, Any]:
    run = {"run_id": "20240501T100000Z-0a1b2c", "created_at": "2024-05-01T10:00:00Z",
           "job": {"name": "b"}, "source": {"root": "/repo"}, "plan": {"tasks": 1},
           "rucio": {"scope": "s", "rse": "R", "account": None, "dataset": None,
                     "lifetime": None},
           "butler": {"kind": "repo", "repo": "/repo", "collections": ["u/a b"],
                      "dataset_types": ["*"], "where": "", "find_first": False,
                      "metadata": True, "raw_dataset_types": ["raw"], "maps": [],
                      "files": "butler.jsonl", "dimension_export": "butler-dimensions.yaml",
                      "dimension_file": None},
           "submissions": []}
    files = [("c/1.yaml", "uploaded"), ("c/2.yaml", "failed"), ("x.txt", "uploaded")]
    manifest = {"files": [{"relpath": r, "name": "p/" + r, "size": 1, "mtime": 1.0,
                           **({"meta": {"rubin_butler": "data_product"}}
                              if r != "x.txt" else {})} for r, _ in files]}
    results = [{"name": "p/" + r, "status": st, "bytes": 1, "attempt": 1,
                "adler32": "0000abcd" if st == "uploaded" else None, "md5": None,
                "pfn": f"davs://se:1094/rucio/s/p/{r}" if st == "uploaded" else None,
                "guid": None, "error": None if st == "uploaded" else "boom",
                "cause": None if st == "uploaded" else "rucio",
                "metadata": "refused" if st == "uploaded" else None} for r, st in files]
    datasets = {r: [{"dataset_type": "cfg", "run": "u/a b", "data_id": {"instrument": "I",
                                                                      "detector": i},
                     "dimensions": ["instrument", "detector"], "storage_class": "Dict",
                     "is_calibration": False, "formatter": "f.Y", "dataset_id": f"id{i}",
                     "ref": "{}", "in_zip": False}] for i, (r, _) in enumerate(files[:2])}
    markers = {0: {"task": 0, "exit_code": 1, "finished_at": "2024-05-01T10:05:00Z",
                   "metadata_refused": "no plugin"}}
    summary = build_summary(run, {0: manifest}, {0: results}, markers, [], datasets)
    (tmp_path / "butler-dimensions.yaml").write_text("data: []\n")
    return assert_valid_summary(summary)


def test_summary_carries_datasets_and_one_metadata_warning(tmp_path: Path) -> None:
    s = _summary(tmp_path)
    assert s["warnings"] == ["Butler metadata was not set: no plugin"]
    b = s["butler"]
    assert (b["files_with_datasets"], b["files_without_datasets"], b["datasets"],
            b["metadata_refused"]) == (2, 1, 2, 1)
    f = s["files"]["s:p/c/1.yaml"]
    assert f["datasets"][0]["data_id"] == {"instrument": "I", "detector": 0}
    assert s["files"]["s:p/x.txt"]["metadata"] is None


def test_ingest_tables_and_commands(tmp_path: Path) -> None:
    from astropy.table import Table

    s = _summary(tmp_path)
    out = tmp_path / "out dir"
    made = ingest_tables(s, tmp_path, out, relative_to="davs://se:1094/rucio")
    (t,) = made.tables
    assert t.path == out / "cfg.u_a_b.ecsv" and t.rows == 1
    table = Table.read(t.path, format="ascii.ecsv")
    assert table.colnames == ["uri", "detector", "instrument"]
    assert list(table["uri"]) == ["s/p/c/1.yaml"] and list(table["detector"]) == [0]
    assert made.not_uploaded == ["c/2.yaml (failed: boom)"]
    assert made.not_matched == ["x.txt"]
    assert (out / "butler-dimensions.yaml").read_text() == "data: []\n"
    assert made.commands == [
        'butler import "$DEST" "$HERE" --export-file "$HERE"/butler-dimensions.yaml',
        'butler register-dataset-type "$DEST" cfg Dict instrument detector',
        'butler ingest-files -t direct --formatter f.Y --prefix "$PREFIX" '
        "--id-generation-mode DATAID_TYPE_RUN \"$DEST\" cfg 'u/a b' \"$HERE\"/cfg.u_a_b.ecsv"]
    script = made.script.read_text()
    assert script.startswith("#!/bin/sh\n") and made.commands[-1] in script
    assert "PREFIX=davs://se:1094/rucio/" in script
    subprocess.run(["sh", "-n", str(made.script)], check=True)   # valid shell
    before = {p: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ButlerError, match="exists"):
        ingest_tables(s, tmp_path, out)                          # nothing overwritten
    assert {p: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(ButlerError, match="do not start with --relative-to"):
        ingest_tables(s, tmp_path, tmp_path / "o2", relative_to="root://other/")


def test_array_tasks_never_import_the_butler() -> None:
    """lsst-daf-butler is a planning-side extra: the worker, bulk and collect paths (what
    runs inside an array task or the collector job) must not import it."""
    code = ("import sys, dac_upload.upload.task, dac_upload.upload.bulk, dac_upload.collect, "
            "dac_upload.rucio.client; "
            "print(sorted(m for m in sys.modules if m.startswith('lsst')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- a real repository
def _repo_with_everything(tmp: Path) -> tuple[Path, Path]:
    """A source repository (SQLite, local datastore) holding: plain datasets, a zip made by
    retrieve-artifacts and ingested with ingest-zip, a calibration certified for two
    validity ranges, a file symlinked from outside the root. Returns (repo, outside dir)."""
    import astropy.time
    from lsst.daf.butler import (
        Butler,
        CollectionType,
        DatasetRef,
        DatasetType,
        FileDataset,
        Timespan,
    )

    def records(b: Any) -> None:
        reg = b.registry
        reg.insertDimensionData("instrument", {"name": "Cam", "visit_max": 10,
                                               "exposure_max": 1000, "detector_max": 10,
                                               "class_name": "lsst.obs.base.Instrument"})
        reg.insertDimensionData("detector", *[{"instrument": "Cam", "id": d,
                                               "full_name": f"d{d}"} for d in (0, 1)])
        reg.insertDimensionData("physical_filter", {"instrument": "Cam", "name": "r",
                                                    "band": "r"})
        reg.insertDimensionData("day_obs", {"instrument": "Cam", "id": 20261125})
        reg.insertDimensionData("group", {"instrument": "Cam", "name": "g"})
        reg.insertDimensionData("exposure", *[{
            "instrument": "Cam", "id": e, "physical_filter": "r", "obs_id": f"e{e}",
            "day_obs": 20261125, "group": "g"} for e in (1, 2)])

    repos = []
    for name in ("other", "repo"):
        Butler.makeRepo(str(tmp / name))
        b = Butler.from_config(str(tmp / name), writeable=True)
        records(b)
        u = b.dimensions
        for dt in (DatasetType("cfg", ("instrument", "detector", "exposure"),
                               "StructuredDataDict", universe=u),
                   DatasetType("calcfg", ("instrument", "detector"), "StructuredDataDict",
                               universe=u, isCalibration=True)):
            b.registry.registerDatasetType(dt)
        b.registry.registerRun("run")
        repos.append(b)
    other, b = repos
    zipped = [other.put({"e": 2, "d": d}, "cfg", instrument="Cam", detector=d, exposure=2,
                        run="run") for d in (0, 1)]
    zip_path = other.retrieve_artifacts_zip(zipped, tmp / "zips")
    b.ingest_zip(zip_path, transfer="copy")
    b.put({"e": 1, "d": 0}, "cfg", instrument="Cam", detector=0, exposure=1, run="run")
    # one file in the datastore holding two datasets
    shared = tmp / "shared.yaml"
    shared.write_text("e: 1\n")
    u = b.dimensions
    refs = [DatasetRef(b.get_dataset_type("cfg"), {"instrument": "Cam", "detector": 1,
                                                   "exposure": 1}, run="run2"),
            DatasetRef(b.get_dataset_type("cfg"), {"instrument": "Cam", "detector": 1,
                                                   "exposure": 2}, run="run2")]
    b.registry.registerRun("run2")
    b.ingest(FileDataset(path=str(shared), refs=refs), transfer="copy")
    # a calibration certified for two validity ranges
    b.registry.registerRun("calib/run")
    cal = b.put({"flat": 1}, "calcfg", instrument="Cam", detector=0, run="calib/run")
    b.registry.registerCollection("calib", CollectionType.CALIBRATION)
    t = [astropy.time.Time(f"2026-0{m}-01", scale="tai") for m in (1, 2, 3, 4)]
    b.registry.certify("calib", [cal], Timespan(t[0], t[1]))
    b.registry.certify("calib", [cal], Timespan(t[2], t[3]))
    # a file in the datastore that is a symlink to a file elsewhere
    outside = tmp / "elsewhere"
    outside.mkdir()
    link_ref = b.put({"e": 1, "d": 1}, "cfg", instrument="Cam", detector=1, exposure=1,
                     run="run")
    target = Path(b.getURI(link_ref).ospath)
    (outside / target.name).write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(outside / target.name)
    b.close()
    other.close()
    del u
    return tmp / "repo", outside


@pytest.fixture(scope="module")
def real_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _repo_with_everything(tmp_path_factory.mktemp("butler"))


def _repo_cfg(tmp_path: Path, repo: Path, collections: str, extra: str = "") -> Any:
    text = job_text().replace('root = "data"', "") + f"""
[butler]
repo = "{repo}"
collections = {collections}
{extra}
"""
    return load_job(write_job(tmp_path, text))


def test_catalogue_from_a_real_repository(tmp_path: Path, real_repo: tuple[Path, Path]) -> None:
    from dac_upload.butler.source import catalogue_from_repo

    repo, outside = real_repo
    job = _repo_cfg(tmp_path, repo, '["run", "run2", "calib"]')
    src = catalogue_from_repo(job.butler, "job.toml")
    cat = src.catalogue
    assert cat.root == repo and not cat.refused and not cat.skipped
    rel = {e.relpath: e for e in cat.file_entries()}
    zips = [r for r in rel if r.startswith("zips/")]
    assert len(zips) == 1 and zips[0].endswith(".zip")           # two datasets, one zip
    assert [d["in_zip"] for d in src.datasets[zips[0]]] == [True, True]
    shared = [r for r, ds in src.datasets.items() if len(ds) == 2 and not ds[0]["in_zip"]]
    assert len(shared) == 1 and "hold more than one dataset" in src.notes[0]
    calib = [ds for ds in src.datasets.values() if ds[0]["dataset_type"] == "calcfg"]
    assert len(calib) == 1 and len(calib[0]) == 1                # once, not once per range
    assert calib[0][0]["is_calibration"]
    assert outside.as_posix() in cat.outside_targets              # the symlink's target dir
    assert cat.file_count == 5 and len(src.refs) == 7
    # the compact ref in the datasets, the full one (with records) as the sidecar
    some = next(r for r, ds in src.datasets.items() if not ds[0]["in_zip"])
    assert '"records"' in src.sidecars[some] and '"records"' not in src.datasets[some][0]["ref"]
    from lsst.daf.butler import DatasetRef

    u = src.butler.dimensions
    assert DatasetRef.from_json(src.datasets[some][0]["ref"], universe=u) == \
        DatasetRef.from_json(src.sidecars[some], universe=u)


def test_symlinks_policy_applies_to_a_butler_source(tmp_path: Path,
                                                    real_repo: tuple[Path, Path]) -> None:
    from dac_upload.butler.source import catalogue_from_repo

    repo, _ = real_repo
    job = _repo_cfg(tmp_path, repo, '["run"]')
    skipped = catalogue_from_repo(job.butler, "j", symlinks="skip").catalogue
    assert [p.reason for p in skipped.skipped] == ['symlink skipped (symlinks = "skip")']
    refused = catalogue_from_repo(job.butler, "j", symlinks="refuse").catalogue
    assert len(refused.refused) == 1 and "symlinks = \"refuse\"" in refused.refused[0].reason


def test_query_problems_are_one_line(tmp_path: Path, real_repo: tuple[Path, Path]) -> None:
    from dac_upload.butler.source import catalogue_from_repo

    repo, _ = real_repo
    for collections, extra, expected in (
            ('["nope"]', "", "[butler] collections = ['nope']"),
            ('["run"]', 'dataset_types = ["cfgg"]', "entry 'cfgg' finds no dataset"),
            ('["run"]', "where = \"exposure = \"", "the query for 'cfg'")):
        job = _repo_cfg(tmp_path, repo, collections, extra)
        with pytest.raises(ButlerError) as info:
            catalogue_from_repo(job.butler, "job.toml")
        assert len(info.value.lines) == 1 and expected in info.value.lines[0], info.value.lines


def test_bad_data_id_in_a_map_is_one_line_not_a_crash(tmp_path: Path) -> None:
    lines = _job_errors(tmp_path, job_text() + MAP.replace('{instrument = "DECam"}',
                                                           "{detector = 1.5}"))
    assert len(lines) == 1 and "data_id = {'detector': 1.5} is not valid" in lines[0], lines


def test_a_repository_label_is_left_to_the_butler(tmp_path: Path) -> None:
    text = job_text().replace('root = "data"', "") + '[butler]\nrepo = "embargo"\n' \
        'collections = ["c"]\n'
    job = load_job(write_job(tmp_path, text))
    assert job.butler.repo == "embargo" and job.source.root == tmp_path


def test_a_zip_is_uploaded_whole_with_all_its_datasets(tmp_path: Path,
                                                       real_repo: tuple[Path, Path]) -> None:
    """The query selects one of the zip's two datasets: butler ingest-zip at the destination
    ingests both, so both are listed and both data IDs' records are exported."""
    from dac_upload.butler.source import catalogue_from_repo

    repo, _ = real_repo
    job = _repo_cfg(tmp_path, repo, '["run"]', 'where = "instrument = \'Cam\' AND detector = 0"')
    src = catalogue_from_repo(job.butler, "job.toml")
    (zip_rel,) = [r for r in src.datasets if r.endswith(".zip")]
    assert sorted(d["data_id"]["detector"] for d in src.datasets[zip_rel]) == [0, 1]
    assert {ref.dataId["detector"] for ref in src.refs if ref.dataId["exposure"] == 2} == {0, 1}
    export = tmp_path / "dims.yaml"
    src.write_dimension_export(export)
    assert "element: detector" in export.read_text()


# ----------------------------------------------------------------------------- missing records
def test_missing_records_note_counts_and_names_them() -> None:
    from dac_upload.butler.source import missing_records_note

    vdr = ("visit_detector_region",)
    note = missing_records_note([("calexp", "calexp@{'visit': 2} in r", vdr),
                                 ("calexp", "calexp@{'visit': 3} in r", vdr),
                                 ("src", "src@{'visit': 2} in r", vdr)])
    assert note.startswith("3 datasets (calexp: 2, src: 1) have no visit_detector_region "
                           "record in the repository (e.g. calexp@{'visit': 2} in r)"), note
    assert "they are uploaded" in note and "destination will lack the same records" in note
    two = missing_records_note([("a", "a@1", ("x",)), ("a", "a@2", ("x", "y"))])
    assert "have no x (2) or y (1) record" in two, two


def _repo_without_some_regions(tmp: Path) -> Path:
    """Five visits of three detectors, with visit_detector_region records for visit 1 only (as
    when regions were written for some visits), and a dataset per visit and detector."""
    from lsst.daf.butler import Butler, DatasetType
    from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d

    region = ConvexPolygon.convexHull([UnitVector3d(LonLat.fromDegrees(ra, dec))
                                       for ra, dec in ((10, 10), (11, 10), (11, 11))])
    Butler.makeRepo(str(tmp / "repo"))
    b = Butler.from_config(str(tmp / "repo"), writeable=True)
    reg = b.registry
    reg.insertDimensionData("instrument", {"name": "Cam", "visit_max": 10, "exposure_max": 10,
                                           "detector_max": 10,
                                           "class_name": "lsst.obs.base.Instrument"})
    reg.insertDimensionData("detector", *[{"instrument": "Cam", "id": d, "full_name": f"d{d}"}
                                          for d in range(3)])
    reg.insertDimensionData("physical_filter", {"instrument": "Cam", "name": "r", "band": "r"})
    reg.insertDimensionData("day_obs", {"instrument": "Cam", "id": 20261125})
    reg.insertDimensionData("visit", *[{"instrument": "Cam", "id": v, "name": f"v{v}",
                                        "physical_filter": "r", "day_obs": 20261125}
                                       for v in range(1, 6)])
    reg.insertDimensionData("visit_detector_region", *[{
        "instrument": "Cam", "visit": 1, "detector": d, "region": region} for d in range(3)])
    reg.registerDatasetType(DatasetType("vcfg", ("instrument", "visit", "detector"),
                                        "StructuredDataDict", universe=b.dimensions))
    reg.registerRun("run")
    for v in range(1, 6):
        for d in range(3):
            b.put({"v": v, "d": d}, "vcfg", instrument="Cam", visit=v, detector=d, run="run")
    b.close()
    return tmp / "repo"


@pytest.fixture(scope="module")
def regionless_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _repo_without_some_regions(tmp_path_factory.mktemp("regions"))


def test_datasets_without_some_dimension_records_are_catalogued_and_said(
        tmp_path: Path, regionless_repo: Path) -> None:
    """The query with dimension records finds 3 of the 15 datasets (daf_butler joins
    visit_detector_region, which visits 2-5 lack): all of them are catalogued, with a note,
    and their sidecars and the dimension export work."""
    from lsst.daf.butler import Butler, DatasetRef

    from dac_upload.butler.source import catalogue_from_repo

    source = Butler.from_config(str(regionless_repo))
    assert len(source.query_datasets("vcfg", collections="run",
                                     with_dimension_records=True)) == 3
    job = _repo_cfg(tmp_path, regionless_repo, '["run"]',
                    'where = "instrument = \'Cam\' AND detector != 1"')
    src = catalogue_from_repo(job.butler, "job.toml")
    assert not src.catalogue.skipped and not src.catalogue.refused
    found = {d["dataset_id"] for ds in src.datasets.values() for d in ds}
    wanted = {str(r.id) for r in source.query_datasets("vcfg", collections="run",
                                                       where="instrument = 'Cam' AND "
                                                             "detector != 1")}
    assert found == wanted and len(wanted) == 10
    (note,) = src.notes
    assert note.startswith("8 datasets (vcfg: 8) have no visit_detector_region record in the "
                           "repository (e.g. vcfg@{'instrument': 'Cam', "), note
    u = source.dimensions
    for rel, (dataset,) in src.datasets.items():
        back = DatasetRef.from_json(src.sidecars[rel], universe=u)
        assert str(back.id) == dataset["dataset_id"] and back.dataId.hasRecords()
        assert '"visit":{"definition":"visit"' in src.sidecars[rel]
        assert ('"visit_detector_region"' in src.sidecars[rel]) == (back.dataId["visit"] == 1)
    export = tmp_path / "dims.yaml"
    src.write_dimension_export(export)
    text = export.read_text()
    assert "element: visit_detector_region" in text and "element: visit\n" in text
    assert text.count("name: v") == 5                    # every visit's record went along


def test_a_dataset_type_whose_datasets_all_lack_records_is_found(
        tmp_path: Path, regionless_repo: Path) -> None:
    """Once refused as 'finds no dataset': now catalogued, the note saying what is missing."""
    from dac_upload.butler.source import catalogue_from_repo

    job = _repo_cfg(tmp_path, regionless_repo, '["run"]',
                    'dataset_types = ["vcfg"]\nwhere = "instrument = \'Cam\' AND visit > 1"')
    src = catalogue_from_repo(job.butler, "job.toml")
    assert src.catalogue.file_count == 12
    (note,) = src.notes
    assert note.startswith("12 datasets (vcfg: 12) have no visit_detector_region record")


# ----------------------------------------------------------------------------- Butler zips
PACKING = '\n[packing]\nbelow = "1 MiB"\n'


def test_packing_a_map_needs_its_storage_class_and_formatter(tmp_path: Path) -> None:
    lines = _job_errors(tmp_path, job_text() + PACKING + MAP)
    assert len(lines) == 1 and "[[butler.map]] #1 (raw) needs formatter with [packing]" \
        in lines[0], lines
    with_both = MAP + 'formatter = "lsst.daf.butler.formatters.yaml.YamlFormatter"\n'
    assert load_job(write_job(tmp_path, job_text() + PACKING + with_both)).packing.enabled


def _planned_archives(job: Any) -> tuple[Any, list[dict[str, Any]]]:
    from dac_upload.files import read_manifest
    from dac_upload.pipeline import prepare_run

    layout = prepare_run(job, preflight=None).layout
    manifests = [read_manifest(p) for p in sorted(layout.manifests.glob("*.json"))]
    return layout, manifests


def test_a_butler_source_packed_gets_butler_zips_and_its_own_zip_stays_loose(
        tmp_path: Path, real_repo: tuple[Path, Path]) -> None:
    """Every packed file's datasets are in its archive's index (the file with two datasets
    with both ids, at its Rucio name), its DID gets no metadata (the archive gets
    zip_file); a zip of the source datastore is never packed (a zip in a zip)."""
    from lsst.daf.butler.datastores.file_datastore.retrieve_artifacts import ZipIndex

    repo, _ = real_repo
    job = _repo_cfg(tmp_path, repo, '["run", "run2", "calib"]', PACKING)
    layout, manifests = _planned_archives(job)
    datasets = {r["relpath"]: r["datasets"]
                for r in (json.loads(line) for line in
                          (layout.dir / "butler.jsonl").read_text().splitlines())}
    packed: set[str] = set()
    for m in manifests:
        for a in m["archives"]:
            members = [m["files"][i] for i in a["members"]]
            index = ZipIndex.model_validate_json(a["index"])
            assert set(index.artifact_map) == {e["name"] for e in members}
            assert {str(i) for i in index.refs.compact_refs} == {
                d["dataset_id"] for e in members for d in datasets[e["relpath"]]}
            for e in members:
                info = index.artifact_map[e["name"]]
                assert info.info.file_size == e["size"] and info.info.path == e["name"]
                assert {str(i) for i in info.ids} == {d["dataset_id"]
                                                      for d in datasets[e["relpath"]]}
                assert "meta" not in e
            assert a["meta"] == {"rubin_butler": "zip_file", "rubin_sidecar": ""}
            assert a["bytes"] > sum(e["size"] for e in members) + len(a["index"])
            packed.update(e["relpath"] for e in members)
    zips = {rel for rel, ds in datasets.items() if ds[0]["in_zip"]}
    assert zips and not zips & packed and len(packed) == len(datasets) - len(zips)
    loose = [e for m in manifests for e in m["files"] if e["relpath"] in zips]
    assert [e["meta"]["rubin_butler"] for e in loose] == ["zip_file"]
    assert any(len(datasets[rel]) == 2 for rel in packed)        # the shared file


def test_a_map_tree_packed_gets_the_ids_ingest_files_would_give(tmp_path: Path) -> None:
    from lsst.daf.butler import DatasetIdFactory, DatasetIdGenEnum, DatasetRef
    from lsst.daf.butler.datastores.file_datastore.retrieve_artifacts import ZipIndex
    from test_packing import FakePacking
    from unit_helpers import write_tree

    from dac_upload.upload.task import run_task

    write_tree(tmp_path / "data", {"raw/00123/07.fits": b"a" * 10,
                                   "raw/00123/08.fits": b"b" * 20, "raw/notes.txt": b"n"})
    job = _map_job(tmp_path, MAP + 'formatter = "lsst.obs.base.formatters.fitsExposure.'
                   'FitsExposureFormatter"\n' + PACKING)
    layout, (manifest,) = _planned_archives(job)
    (a,) = manifest["archives"]
    assert "meta" not in a                              # a map gives no Rubin metadata
    index = ZipIndex.model_validate_json(a["index"])
    assert set(index.artifact_map) == {"raw/00123/07.fits", "raw/00123/08.fits"}  # no notes
    u = daf_butler.DimensionUniverse()
    for ref in index.refs.to_refs(u):
        assert ref.id == DatasetIdFactory().makeDatasetId(
            ref.run, ref.datasetType, ref.dataId, DatasetIdGenEnum.DATAID_TYPE_RUN)
        assert isinstance(ref, DatasetRef) and ref.run == "DECam/raw/all"
    info = index.artifact_map["raw/00123/08.fits"].info
    assert (info.storage_class, info.file_size) == ("Exposure", 20)
    assert info.formatter.endswith("FitsExposureFormatter")

    # the worker writes the index first, as butler retrieve-artifacts --zip does
    rio = FakePacking()
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 0
    with zipfile.ZipFile(io.BytesIO(rio.on_disk[a["name"]])) as zf:
        first, *rest = zf.namelist()
        assert first == "_butler_zip_index.json"
        assert sorted(rest) == sorted(e["name"] for e in manifest["files"])
        assert zf.read("_butler_zip_index.json") == a["index"].encode()
        assert zf.read("raw/00123/08.fits") == b"b" * 20
    assert sorted(rio.constituents[a["name"]]) == sorted(
        e["name"] for e in manifest["files"])            # the index is not a Rucio file


def test_butler_table_ingests_each_butler_zip_once() -> None:
    from dac_upload.butler.ingest import _by_table

    def f(name: str, archive: str | None, status: str = "uploaded") -> dict[str, Any]:
        return {"name": name, "relpath": name, "status": status, "error": None,
                "pfn": f"file:///rse/{archive or name}", "archive": archive,
                "datasets": [{"dataset_type": "cfg", "run": "r", "data_id": {"x": 1},
                              "in_zip": False}]}

    files = [f("a/1", "z1.zip"), f("b/1", "z2.zip"), f("a/2", "z1.zip"), f("big", None),
             f("c/1", "z3.zip", status="failed"), f("old", None, "already_present")]
    files[-1]["pfn"] = "file:///rse/z0.zip?xrdcl.unzip=old"    # in an earlier run's zip
    files[1]["datasets"][0].update(dataset_type="flat", is_calibration=True)
    found = _by_table({"files": {x["name"]: x for x in files}}, None, None, None)
    assert found.zips == ["file:///rse/z1.zip", "file:///rse/z2.zip"]
    assert found.zip_calibrations == {"flat"}
    from dac_upload.butler.ingest import _ingest_commands

    lines = _ingest_commands([], found.zips, None, None, found.zip_calibrations)
    assert lines[0].startswith("# flat is a calibration: ingest-zip puts it in its RUN only")
    assert lines[1:] == [f'butler ingest-zip -t direct "$DEST" {u}' for u in found.zips]
    assert [uri for rows in found.groups.values() for uri, _ in rows] == ["file:///rse/big"]
    assert found.not_uploaded == ["c/1 (failed)"]
    assert found.in_earlier_archive == ["old (in file:///rse/z0.zip)"]


def test_a_map_tree_s_butler_zips_are_made_again_byte_for_byte(tmp_path: Path) -> None:
    """remake-manifests makes a packed map tree's manifests again, indexes included, equal
    to the planned ones (their digests in run.json)."""
    import hashlib

    from unit_helpers import write_tree

    from dac_upload.pipeline import remake_manifests
    from dac_upload.runrecord import RunRecord, read_run_json

    write_tree(tmp_path / "data", {f"raw/00123/{d:02d}.fits": b"x" * d for d in range(1, 6)})
    job = _map_job(tmp_path, MAP + 'formatter = "lsst.obs.base.formatters.fitsExposure.'
                   'FitsExposureFormatter"\n' + PACKING)
    layout, (manifest,) = _planned_archives(job)
    assert manifest["archives"][0]["index"]
    remade = remake_manifests(layout.dir)
    digests = RunRecord(read_run_json(layout.dir)).manifest_sha256
    assert hashlib.sha256(remade[0]).hexdigest() == digests[0]
    assert remade[0] == layout.manifest(0).read_bytes()


def test_a_map_type_the_butler_refuses_stops_the_plan_before_anything_is_written(
        tmp_path: Path) -> None:
    from unit_helpers import write_tree

    from dac_upload.pipeline import PlanError, prepare_run

    write_tree(tmp_path / "data", {"raw/00123/07.fits": b"a", "raw/00123/08.fits": b"b"})
    bad = MAP.replace('storage_class = "Exposure"', 'storage_class = "NoSuchClass"') + \
        'formatter = "x.Y"\n' + PACKING
    job = _map_job(tmp_path, bad)
    with pytest.raises(PlanError) as info:
        prepare_run(job, preflight=None)
    (line,) = info.value.lines
    assert "storage_class = 'NoSuchClass': the Butler refuses it for a zip index" in line
    assert not job.runs_dir.exists() or not any(job.runs_dir.iterdir())



def test_without_lsst_the_collector_still_remakes_the_files_of_a_packed_map_tree(
        tmp_path: Path) -> None:
    """The collector's image has no lsst: a damaged manifest of a packed map tree is made
    again with its files as planned (the archives without their index)."""
    from unit_helpers import write_tree

    write_tree(tmp_path / "data", {f"raw/00123/{d:02d}.fits": b"x" * d for d in range(1, 6)})
    job = _map_job(tmp_path, MAP + 'formatter = "x.Y"\n' + PACKING)
    layout, (manifest,) = _planned_archives(job)
    code = ("import sys, json; sys.modules['lsst'] = None; "
            "from dac_upload.pipeline import remake_manifests; "
            f"doc = json.loads(remake_manifests(__import__('pathlib').Path({str(layout.dir)!r}))"
            "[0]); print(json.dumps([doc['files'], [a['members'] for a in doc['archives']], "
            "['index' in a for a in doc['archives']]]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    files, members, indexed = json.loads(out.stdout)
    assert files == [[e["relpath"], e["name"], e["size"], e["mtime"]] for e in manifest["files"]]
    assert members == [a["members"] for a in manifest["archives"]] and indexed == [False]


def test_a_packed_butler_task_sets_loose_metadata_before_building_and_zip_file_after(
        tmp_path: Path, real_repo: tuple[Path, Path]) -> None:
    """The loose files' metadata (the source's own zip, the dimension records) is set where
    their chunk ends, before any archive is built (their records are not held meanwhile);
    each archive gets zip_file once it is uploaded; its members get none."""
    from test_packing import FakePacking

    from dac_upload.files import read_jsonl
    from dac_upload.upload.task import run_task

    class Rio(FakePacking):
        def __init__(self) -> None:
            super().__init__()
            self.meta: list[tuple[list[str], list[str]]] = []   # (names, archives on disk)

        def set_metadata_bulk(self, scope: str,
                              items: list[tuple[str, dict[str, str]]]) -> None:
            self.meta.append(([n for n, _ in items],
                              sorted(n for n in self.on_disk if n.endswith(".zip")
                                     and "/archives/" in f"/{n}")))

    repo, _ = real_repo
    job = _repo_cfg(tmp_path, repo, '["run", "run2", "calib"]', PACKING)
    layout, (manifest,) = _planned_archives(job)
    (archive,) = manifest["archives"]
    rio = Rio()
    assert run_task(layout.dir, 0, rucio_factory=rio.factory) == 0
    (loose_names, archives_then), (zip_names, archives_after) = rio.meta
    assert sorted(loose_names) == sorted(e["name"] for e in manifest["files"] if "meta" in e)
    assert archives_then == []                       # before the archive was uploaded
    assert zip_names == [archive["name"]] and archives_after == [archive["name"]]
    recs = {r["name"]: r for r in read_jsonl(layout.result(0))}
    members = {manifest["files"][i]["name"] for i in archive["members"]}
    assert {recs[n]["metadata"] for n in members} == {"set"}
