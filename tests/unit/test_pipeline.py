"""pipeline: prepare_run writes a complete run directory or nothing; submit_run records ids."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any, Callable

import pytest

from dac_upload import render
from dac_upload.catalogue import read_catalogue, write_catalogue
from dac_upload.config import JobConfig
from dac_upload.files import read_json, read_jsonl, read_manifest
from dac_upload.pipeline import (
    CollectorNotSubmitted,
    PlanError,
    _body_of,
    catalogue_only,
    chunk_indices,
    compress_indices,
    prepare_run,
    submit_run,
    submit_tasks,
)
from dac_upload.rucio.credentials import Credentials
from dac_upload.slurm import SlurmError

TREE = {"a.fits": b"a" * 10, "b.fits": b"b" * 20, "raw/c.fits": b"c" * 30,
        "raw/d.fits": b"d" * 40, "raw/e.txt": b"e", "tmp/t.fits": b"t"}
FITS = ["a.fits", "b.fits", "raw/c.fits", "raw/d.fits"]


class FakeSubmit:
    """Stands in for slurm.submit: records the calls, returns the next job id."""

    def __init__(self, *ids: str | Exception) -> None:
        self.ids = list(ids)
        self.calls: list[dict[str, Any]] = []

    def __call__(self, options: dict[str, Any], body: str, run_dir: Path,
                 script_name: str) -> str:
        self.calls.append({"options": dict(options), "body": body, "run_dir": run_dir,
                           "script_name": script_name})
        job_id = self.ids.pop(0)
        if isinstance(job_id, Exception):
            raise job_id
        return job_id


@pytest.fixture
def job(make_job: Callable[..., JobConfig]) -> JobConfig:
    return make_job(TREE, source='include = ["**/*.fits"]\nexclude = ["**/tmp/**"]',
                    batching="files_per_batch = 2", slurm="partition = \"icelake\"")


def _runs(job: JobConfig) -> list[str]:
    return sorted(os.listdir(job.runs_dir)) if job.runs_dir.exists() else []


# ----------------------------------------------------------------------------- prepare_run
def test_prepare_run_writes_the_run_directory(job: JobConfig) -> None:
    prep = prepare_run(job, preflight=None, python="/opt/py/bin/python")
    layout = prep.layout
    assert layout.dir.parent == job.runs_dir
    assert _runs(job) == [prep.run_id]
    assert (prep.files, prep.bytes, prep.skipped) == (4, 100, 0)
    assert len(prep.batches) == 2

    run = read_json(layout.run_json)
    assert run["state"] == "planned"
    assert run["run_id"] == prep.run_id
    assert run["submissions"] == []
    assert run["plan"]["tasks"] == 2 and run["plan"]["task_ids"] == "0-1"
    assert run["plan"]["largest_batch_bytes"] == 50 and run["plan"]["smallest_batch_bytes"] == 50
    assert run["catalogue"]["sha256"] == hashlib.sha256(layout.catalogue.read_bytes()).hexdigest()
    assert (run["catalogue"]["files"], run["catalogue"]["bytes"]) == (4, 100)
    assert run["job"]["sha256"] == hashlib.sha256(job.text.encode()).hexdigest()
    assert layout.job_copy.read_text() == job.text
    assert run["source"]["root"] == str(job.source.root)
    assert run["rucio"]["scope"] == "user.test" and run["rucio"]["rse"] == "TEST_RSE"
    assert run["runtime"]["python"] == "/usr/bin/python3"  # the job's own python wins
    assert run["slurm"]["array"]["array"] == "0-1%4"
    assert run["slurm"]["collector"]["dependency"] == "afterany:ARRAY_JOB_ID"
    # the tasks' own Rucio configuration: private, no secret, named in run.json
    client_cfg = layout.dir / "rucio.cfg"
    assert stat.S_IMODE(client_cfg.stat().st_mode) == 0o600
    assert "rucio_host = http://rucio.invalid\n" in client_cfg.read_text()
    assert run["credentials"]["client_config"] == "rucio.cfg"
    assert run["credentials"]["auth_type"] == "x509_proxy"

    assert [e.relpath for e in read_catalogue(layout.catalogue)[0].file_entries()] == FITS
    assert list(read_jsonl(layout.skipped)) == []
    manifests = [read_manifest(layout.manifest(t)) for t in range(2)]
    assert sorted(f["relpath"] for m in manifests for f in m["files"]) == FITS
    for t, m in enumerate(manifests):
        assert m["task"] == t and m["run_id"] == prep.run_id
        assert m["bytes"] == sum(f["size"] for f in m["files"])
        for f in m["files"]:
            assert f["name"] == f["relpath"]
            assert f["size"] == len(TREE[f["relpath"]])
    assert not layout.manifest(2).exists()
    assert layout.results.is_dir() and layout.logs.is_dir()
    assert list(layout.results.iterdir()) == []

    array = layout.array_script.read_text()
    assert array.startswith("#!/bin/bash\n")
    assert "\n#SBATCH --array               0-1%4\n" in array
    assert "\n#SBATCH --partition           icelake\n" in array
    assert f"RUN_DIR={layout.dir.resolve()}\n" in array
    collect = layout.collect_script.read_text()
    assert collect.startswith("#!/bin/bash\n")
    assert "\n#SBATCH --dependency          afterany:ARRAY_JOB_ID\n" in collect
    for script in (layout.array_script, layout.collect_script):
        assert stat.S_IMODE(script.stat().st_mode) == 0o755


def test_plan_from_a_catalogue_file_is_the_plan_of_the_walk(
        job: JobConfig, make_job: Callable[..., JobConfig], tmp_path: Path) -> None:
    """dac-upload catalogue, then plan --catalogue: the same manifests as planning with a
    walk, the catalogue file kept as the run's catalogue; refused for another [source], for
    a file that is not a catalogue, and (one line each) before anything is written."""
    walked = prepare_run(job).layout
    path = tmp_path / "cat.json"
    write_catalogue(path, catalogue_only(job), job.source, "now", "t")
    (job.path.parent / "data" / "raw" / "new.fits").write_bytes(b"late")   # not catalogued
    planned = prepare_run(job, catalogue_file=path)
    layout = planned.layout
    for t in range(2):
        a, b = read_manifest(walked.manifest(t)), read_manifest(layout.manifest(t))
        assert a["files"] == b["files"] and a["bytes"] == b["bytes"]
    assert layout.catalogue.read_bytes() == path.read_bytes()
    run = read_json(layout.run_json)
    assert run["catalogue"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert run["catalogue"]["from_file"] == str(path.resolve())
    assert run["catalogue"]["files"] == 4
    assert read_json(walked.run_json)["catalogue"]["from_file"] is None

    other = make_job(TREE, filename="other.toml", source='include = ["**/*.txt"]')
    before = _runs(other)
    with pytest.raises(PlanError) as exc:
        prepare_run(other, catalogue_file=path)
    assert len(exc.value.lines) == 1
    assert "made for another [source] (include ['**/*.fits']" in exc.value.lines[0]
    assert "dac-upload catalogue" in exc.value.lines[0]
    assert _runs(other) == before
    path.write_text("[]")
    with pytest.raises(PlanError, match="not a catalogue written by dac-upload catalogue"):
        prepare_run(job, catalogue_file=path)


def test_catalogue_only_refuses_what_plan_refuses(make_job: Callable[..., JobConfig]) -> None:
    job = make_job(TREE, source='include = ["**/*.fits", "**/*.none"]')
    with pytest.raises(PlanError) as exc:
        catalogue_only(job)
    assert exc.value.lines == [f"{job.path}: [source] include pattern '**/*.none' matches "
                               f"no file under {job.source.root}; fix the pattern or the root"]


def test_scripts_body_round_trips(job: JobConfig) -> None:
    """What submit hands to simple-slurm rebuilds exactly the array.sh that plan wrote."""
    layout = prepare_run(job, preflight=None).layout
    run = read_json(layout.run_json)
    body = _body_of(layout.array_script)
    assert body.startswith("# dac-upload ")
    assert render.full_script(run["slurm"]["array"], body) == layout.array_script.read_text()
    body = _body_of(layout.collect_script)
    assert render.full_script(run["slurm"]["collector"], body) == \
        layout.collect_script.read_text()


def test_skipped_symlinks_are_recorded(make_job: Callable[..., JobConfig]) -> None:
    job = make_job({"a.fits": b"a"}, source='symlinks = "skip"')
    os.symlink(job.source.root / "a.fits", job.source.root / "l.fits")
    prep = prepare_run(job, preflight=None)
    assert prep.skipped == 1
    assert list(read_jsonl(prep.layout.skipped)) == [
        {"relpath": "l.fits", "reason": 'symlink skipped (symlinks = "skip")'}]
    assert read_json(prep.layout.run_json)["catalogue"]["skipped"] == 1


def test_invalid_name_creates_nothing(make_job: Callable[..., JobConfig]) -> None:
    job = make_job({"ok.fits": b"1", "my file.fits": b"2"})
    with pytest.raises(PlanError) as info:
        prepare_run(job, preflight=None)
    assert info.value.lines == [
        f"{job.source.root}/my file.fits: the name contains characters Rucio does not allow: "
        "' '; rename the file, exclude it, or set [naming] replace_invalid = \"_\""]
    assert not job.runs_dir.exists()


def test_replace_invalid_lets_it_through(make_job: Callable[..., JobConfig]) -> None:
    job = make_job({"ok.fits": b"1", "my file.fits": b"2"}, naming='replace_invalid = "_"')
    prep = prepare_run(job, preflight=None)
    names = [f["name"] for f in read_manifest(prep.layout.manifest(0))["files"]]
    assert names == ["my_file.fits", "ok.fits"]


def test_include_matching_nothing(make_job: Callable[..., JobConfig]) -> None:
    job = make_job({"a.fits": b"1"}, source='include = ["**/*.fits", "**/*.hdf5"]')
    with pytest.raises(PlanError) as info:
        prepare_run(job, preflight=None)
    assert info.value.lines == [
        f"{job.path}: [source] include pattern '**/*.hdf5' matches no file under "
        f"{job.source.root}; fix the pattern or the root"]
    assert not job.runs_dir.exists()


def test_overlapping_include_patterns_plan(make_job: Callable[..., JobConfig]) -> None:
    job = make_job(TREE, source='include = ["**/*.fits", "raw/*.fits"]')
    prep = prepare_run(job, preflight=None)  # 'raw/*.fits' counts no hit of its own
    assert prep.files == 5


def test_all_problems_at_once(make_job: Callable[..., JobConfig]) -> None:
    job = make_job({"a b.fits": b"1", "c d.fits": b"2", "e.fits": b"3"},
                   source='include = ["*.fits", "*.nope"]', slurm='extra = {qoss = "x"}')
    os.mkfifo(job.source.root / "p.fits")
    with pytest.raises(PlanError) as info:
        prepare_run(job, preflight=None)
    lines = info.value.lines
    assert len(lines) == 5, lines
    assert "[slurm] extra: unknown sbatch option(s): qoss" in lines[0]
    assert lines[1] == f"{job.source.root}/p.fits: not a regular file"
    assert "'*.nope' matches no file" in lines[2]
    assert lines[3].startswith(f"{job.source.root}/a b.fits: the name contains")
    assert lines[4].startswith(f"{job.source.root}/c d.fits: the name contains")
    assert not job.runs_dir.exists()


def test_many_problems_are_capped(make_job: Callable[..., JobConfig]) -> None:
    job = make_job({f"bad {i:02d}.fits": b"x" for i in range(25)})
    with pytest.raises(PlanError) as info:
        prepare_run(job, preflight=None)
    assert len(info.value.lines) == 21
    assert info.value.lines[-1] == "... and 5 more naming problems"


def test_missing_root(make_job: Callable[..., JobConfig]) -> None:
    job = make_job({})
    job.source.root.rmdir()
    with pytest.raises(PlanError) as info:
        prepare_run(job, preflight=None)
    assert info.value.lines == [f"{job.path}: [source] root = {str(job.source.root)!r} is not "
                                "a directory; fix the path"]


def test_nothing_to_upload(make_job: Callable[..., JobConfig]) -> None:
    job = make_job({"a.fits": b"1"}, source='exclude = ["*.fits"]')
    with pytest.raises(PlanError) as info:
        prepare_run(job, preflight=None)
    assert info.value.lines == [f"{job.path}: nothing to upload under {job.source.root}"]
    assert not job.runs_dir.exists()


def test_preflight_problem_creates_nothing(job: JobConfig) -> None:
    seen: list[JobConfig] = []

    def preflight(j: JobConfig, creds: Credentials) -> list[str]:
        seen.append(j)
        assert creds.host == "http://rucio.invalid"
        return ["Rucio scope 'user.test' does not exist; ask your Rucio admins"]

    with pytest.raises(PlanError) as info:
        prepare_run(job, preflight=preflight)
    assert info.value.lines == ["Rucio scope 'user.test' does not exist; ask your Rucio admins"]
    assert seen == [job]
    assert not job.runs_dir.exists()


def test_preflight_not_called_when_files_already_fail(make_job: Callable[..., JobConfig]) -> None:
    job = make_job({"a b.fits": b"1"})
    called: list[JobConfig] = []
    with pytest.raises(PlanError):
        prepare_run(job, preflight=lambda j, c: called.append(j) or [])
    assert called == []


def test_preflight_ok(job: JobConfig) -> None:
    prep = prepare_run(job, preflight=lambda j, c: [])
    assert _runs(job) == [prep.run_id]


def test_two_plans_two_run_directories(job: JobConfig) -> None:
    first = prepare_run(job, preflight=None)
    second = prepare_run(job, preflight=None)
    assert first.run_id != second.run_id
    assert _runs(job) == sorted([first.run_id, second.run_id])


def test_a_runs_folder_inside_the_tree_is_never_catalogued(
        make_job: Callable[..., JobConfig]) -> None:
    """t3.toml beside t3/ with runs in t3/runs: the second plan must not upload the first
    one's job copy, rucio.cfg and manifests (nor the ledger or nightly.log)."""
    job = make_job(TREE, job='runs_dir = "data/runs"')
    first = prepare_run(job, preflight=None)
    (job.runs_dir / "nightly.log").write_text("a log\n")
    second = prepare_run(job, preflight=None)
    assert second.files == first.files == len(TREE)
    cat, _ = read_catalogue(second.layout.catalogue)
    assert not [r for r in cat.files().relpath if r.startswith("runs/")]
    assert any("runs folder" in n and "never uploaded" in n for n in second.notes)


def test_runs_folder_equal_to_the_root_is_refused(make_job: Callable[..., JobConfig]) -> None:
    job = make_job(TREE, job='runs_dir = "data"')
    with pytest.raises(PlanError, match=r"runs_dir is the \[source\] root"):
        prepare_run(job, preflight=None)


def test_a_runs_folder_elsewhere_gives_no_note(job: JobConfig) -> None:
    assert prepare_run(job, preflight=None).notes == []


# ----------------------------------------------------------------------------- submit_run
def test_submit_run_records_both_jobs(job: JobConfig) -> None:
    layout = prepare_run(job, preflight=None).layout
    fake = FakeSubmit("100", "101")
    sub = submit_run(layout.dir, max_array_size=1001, submit=fake)
    assert (sub.collector_job_id, sub.task_ids, sub.attempt) == ("101", "0-1", 1)
    assert sub.arrays == [{"job_id": "100", "offset": 0, "task_ids": "0-1"}]

    array_call, collect_call = fake.calls
    assert array_call["script_name"] == "array.submit1.0.sh"   # never the planned array.sh
    assert collect_call["script_name"] == "collect.submit1.sh"
    assert array_call["run_dir"] == collect_call["run_dir"] == layout.dir
    assert array_call["options"]["array"] == "0-1%4"
    assert array_call["options"]["export"] == "ALL,DAC_UPLOAD_TASK_OFFSET=0"
    assert array_call["options"]["signal"] == "B:USR1@300"
    assert collect_call["options"]["dependency"] == "afterany:100"
    assert array_call["body"] == _body_of(layout.array_script)
    assert collect_call["body"].startswith("# dac-upload ")
    assert "#SBATCH" not in array_call["body"] + collect_call["body"]

    run = read_json(layout.run_json)
    assert run["state"] == "submitted"
    [s] = run["submissions"]
    assert (s["arrays"], s["collector_job_id"], s["task_ids"]) == (
        [{"job_id": "100", "offset": 0, "task_ids": "0-1"}], "101", "0-1")
    assert s["submitted_at"].endswith("Z")


def test_second_submit_refused(job: JobConfig) -> None:
    layout = prepare_run(job, preflight=None).layout
    submit_run(layout.dir, 1001, FakeSubmit("100", "101"))
    again = FakeSubmit("200", "201")
    with pytest.raises(PlanError) as info:
        submit_run(layout.dir, 1001, again)
    assert info.value.lines == [f"{layout.dir}: already submitted (array job 100); see "
                                f"dac-upload status {layout.dir}, or plan a new run "
                                "(dac-upload submit JOB)"]
    assert again.calls == []
    assert len(read_json(layout.run_json)["submissions"]) == 1


def test_more_tasks_than_max_array_size_become_several_arrays(job: JobConfig) -> None:
    layout = prepare_run(job, preflight=None).layout  # 2 tasks, indices 0-1
    fake = FakeSubmit("100", "101", "102")
    sub = submit_run(layout.dir, max_array_size=1, submit=fake)
    assert sub.arrays == [{"job_id": "100", "offset": 0, "task_ids": "0"},
                          {"job_id": "101", "offset": 1, "task_ids": "0"}]
    _first, second, collector = fake.calls
    assert second["options"]["export"] == "ALL,DAC_UPLOAD_TASK_OFFSET=1"
    assert second["script_name"] == "array.submit1.1.sh"
    assert collector["options"]["dependency"] == "afterany:100:101"


def test_max_array_size_equal_to_task_count_is_one_array(job: JobConfig) -> None:
    layout = prepare_run(job, preflight=None).layout  # 2 tasks, indices 0-1
    sub = submit_run(layout.dir, max_array_size=2, submit=FakeSubmit("100", "101"))
    assert [a["job_id"] for a in sub.arrays] == ["100"]


def test_collector_failure_keeps_the_array_on_record(job: JobConfig) -> None:
    layout = prepare_run(job, preflight=None).layout
    fake = FakeSubmit("100", SlurmError("sbatch collect.sh failed: sbatch: error: QOSMaxSubmit"))
    with pytest.raises(CollectorNotSubmitted) as info:
        submit_run(layout.dir, 1001, fake)
    assert str(info.value) == (
        "array job(s) 100 were submitted but the collector was not (sbatch collect.sh failed: "
        f"sbatch: error: QOSMaxSubmit); when they have finished run: dac-upload collect "
        f"{layout.dir}")
    assert len(fake.calls) == 2
    run = read_json(layout.run_json)
    assert run["state"] == "submitted"
    [s] = run["submissions"]
    assert (s["arrays"][0]["job_id"], s["collector_job_id"]) == ("100", None)
    # and the array is never submitted twice
    with pytest.raises(PlanError, match="already submitted"):
        submit_run(layout.dir, 1001, FakeSubmit("200", "201"))


def test_array_failure_records_nothing(job: JobConfig) -> None:
    layout = prepare_run(job, preflight=None).layout
    with pytest.raises(SlurmError):
        submit_run(layout.dir, 1001, FakeSubmit(SlurmError("sbatch array.sh failed: x")))
    run = read_json(layout.run_json)
    assert (run["state"], run["submissions"]) == ("planned", [])
    sub = submit_run(layout.dir, 1001, FakeSubmit("300", "301"))  # a retry can go ahead
    assert sub.arrays[0]["job_id"] == "300"


def test_resubmission_is_a_new_attempt_of_only_the_given_tasks(job: JobConfig) -> None:
    layout = prepare_run(job, preflight=None).layout
    submit_run(layout.dir, 1001, FakeSubmit("100", "101"))
    fake = FakeSubmit("200", "201")
    sub = submit_tasks(layout.dir, [1], 1001, fake)
    assert (sub.attempt, sub.task_ids) == (2, "1")
    assert sub.arrays == [{"job_id": "200", "offset": 1, "task_ids": "0"}]
    assert [c["script_name"] for c in fake.calls] == ["array.submit2.0.sh",
                                                       "collect.submit2.sh"]
    assert len(read_json(layout.run_json)["submissions"]) == 2


def test_max_submit_holds_tasks_back(job: JobConfig) -> None:
    layout = prepare_run(job, preflight=None).layout
    sub = submit_run(layout.dir, 1001, FakeSubmit("100", "101"), max_submit=1)
    assert (sub.task_ids, sub.left_over) == ("0", "1")


@pytest.mark.parametrize(("indices", "max_size", "expected"), [
    ([0, 1, 2, 3, 4, 5, 6], 3, [(0, [0, 1, 2]), (3, [0, 1, 2]), (6, [0])]),
    ([2, 7, 8], 5, [(2, [0]), (7, [0, 1])]),
    ([4, 5, 6], 1001, [(4, [0, 1, 2])]),
])
def test_chunk_indices(indices: list[int], max_size: int,
                       expected: list[tuple[int, list[int]]]) -> None:
    assert chunk_indices(indices, max_size) == expected


def test_chunk_indices_keeps_array_strings_short() -> None:
    every_other = list(range(0, 4000, 2))          # "0,2,4,..." is ~9,000 characters
    parts = chunk_indices(every_other, 100000, max_chars=4000)
    assert len(parts) > 1
    assert all(len(compress_indices(local)) <= 4000 for _, local in parts)
    assert sorted(o + i for o, local in parts for i in local) == every_other


def test_apptainer_needs_binds_for_symlink_targets(tmp_path: Path) -> None:
    """A Butler datastore made with -t symlink: the targets must be bound into Apptainer."""
    from dac_upload.config import parse_job

    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    (raw_dir / "r.fits").write_bytes(b"raw")
    src = tmp_path / "repo"
    src.mkdir()
    (src / "r.fits").symlink_to(raw_dir / "r.fits")

    def job(binds: list[str]) -> JobConfig:
        return parse_job({"source": {"root": str(src)},
                          "rucio": {"scope": "s", "rse": "R", "host": "http://r"},
                          "container": {"runtime": "apptainer", "image": "/x.sif",
                                        "binds": binds}}, path=tmp_path / "j.toml")

    with pytest.raises(PlanError) as info:
        prepare_run(job([]), preflight=None)
    assert f"point into {raw_dir}" in info.value.lines[0]
    assert f'"{raw_dir}:{raw_dir}:ro"' in info.value.lines[0]
    assert prepare_run(job([f"{tmp_path}:{tmp_path}:ro"]), preflight=None).files == 1
