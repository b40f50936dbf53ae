"""The CLI's contract: what each exit code means (errors.Exit, docs/cli.md) and that a
problem is one `error:` line with the fix on stderr, nothing on stdout and nothing made."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
from click.testing import CliRunner
from unit_helpers import write_job

from dac_upload import __version__, slurm
from dac_upload.cli import main
from dac_upload.config import JobConfig
from dac_upload.errors import Exit
from dac_upload.pipeline import prepare_run
from dac_upload.rucio import preflight
from dac_upload.rucio.errors import RucioUnavailable


def test_cli_plan_reports_each_problem_and_exits_2(tmp_path: Path) -> None:
    path = write_job(tmp_path, """\
        [source]
        root = "data"
        symlinks = "sometimes"

        [rucio]
        scope = "user.test"

        [slurm]
        tme = "01:00:00"

        [container]
        runtime = "none"
        """)
    result = CliRunner().invoke(main, ["plan", "--offline", str(path)])
    assert result.exit_code == 2, result.output
    err = result.stderr.splitlines()
    assert len(err) == 3, err
    assert all(line.startswith(f"error: {path.resolve()}: ") for line in err)
    assert any("symlinks" in line for line in err)
    assert any("'rse' is required" in line for line in err)
    assert any("unknown key 'tme'; did you mean 'time'?" in line for line in err)
    assert result.stdout == ""
    assert not (tmp_path / "job").exists()  # no runs directory


def test_cli_missing_job_file_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["plan", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2
    assert "job file not found" in result.stderr


def test_cli_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"dac-upload, version {__version__}\n"


@pytest.mark.parametrize("args", [[], ["plan"], ["submit"], ["worker"], ["collect"]])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_cli_help(args: list[str], flag: str) -> None:
    result = CliRunner().invoke(main, [*args, flag])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: ")
    if args:
        assert f" {args[0]} " in result.stdout.splitlines()[0]
    else:
        for command in ("plan", "submit", "worker", "collect"):
            assert command in result.stdout


def _no_slurm(*_: Any, **__: Any) -> int:
    raise slurm.SlurmError("cannot reach slurmctld: Connection refused")


def test_submit_without_slurm_exits_3_and_makes_nothing(
        make_job: Callable[..., JobConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    job = make_job()
    monkeypatch.setattr(slurm, "max_array_size", _no_slurm)
    result = CliRunner().invoke(main, ["submit", "--offline", str(job.path)])
    assert result.exit_code == Exit.SERVICE, result.output
    assert result.stderr.startswith("error: cannot reach slurmctld")
    assert result.stdout == "" and not job.runs_dir.exists()


EXPIRED = "X.509 proxy /tmp/x509up_u1000 expired 2 h ago: run voms-proxy-init"


def test_submit_job_names_expired_credentials_before_slurm_is_asked(
        make_job: Callable[..., JobConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    """slurmctld down and the proxy expired: the proxy is what the user can fix now."""
    from dac_upload.rucio import credentials

    job = make_job()
    monkeypatch.setattr(slurm, "max_array_size", _no_slurm)
    monkeypatch.setattr(credentials, "local_problems", lambda _: [EXPIRED])
    result = CliRunner().invoke(main, ["submit", str(job.path)])
    assert (result.exit_code, result.stderr) == (Exit.USER, f"error: {EXPIRED}\n")
    assert not job.runs_dir.exists() or not list(job.runs_dir.glob("2*"))


def test_submit_run_twice_is_refused_before_slurm_is_asked(
        make_job: Callable[..., JobConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    from dac_upload.rucio import credentials
    from dac_upload.runrecord import read_run_json, write_run_json

    layout = prepare_run(make_job(), preflight=None).layout
    run = read_run_json(layout.dir)
    run["submissions"].append({"attempt": 1, "arrays": [{"job_id": "42", "offset": 0,
                                                          "task_ids": "0"}],
                               "collector_job_id": "43", "task_ids": "0", "left_over": ""})
    write_run_json(layout.dir, run)
    monkeypatch.setattr(slurm, "max_array_size", _no_slurm)
    monkeypatch.setattr(credentials, "local_problems", lambda _: [EXPIRED])   # said after
    result = CliRunner().invoke(main, ["submit", "--offline", "--run", str(layout.dir)])
    assert result.exit_code == Exit.USER, result.output
    assert result.stderr.startswith(f"error: {layout.dir}: already submitted (array job 42)")
    assert EXPIRED not in result.stderr


def test_plan_names_the_collector_s_time_before_rucio_is_asked(
        make_job: Callable[..., JobConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    """A job file that would be refused anyway is refused with exit 2 while Rucio is down,
    not exit 3 (try later) followed by exit 2."""
    job = make_job(slurm='time = "00:01:00"\nstop_margin = 10')

    def down(*_: Any) -> list[str]:
        raise RucioUnavailable("cannot reach the Rucio server https://rucio.test: timed out")

    monkeypatch.setattr(preflight, "job_problems", down)
    result = CliRunner().invoke(main, ["plan", str(job.path)])
    assert result.exit_code == Exit.USER, result.output
    assert "[slurm] time (60 s) is shorter than the collector" in result.stderr


def test_nightly_names_expired_credentials_before_slurm_is_asked(
        make_job: Callable[..., JobConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    from dac_upload import nightly

    job = make_job()
    monkeypatch.setattr(slurm, "max_array_size", _no_slurm)
    monkeypatch.setattr(nightly, "credentials_problem", lambda _: EXPIRED)
    result = CliRunner().invoke(main, ["nightly", str(job.path)])
    assert result.exit_code == Exit.CREDENTIALS, result.output
    assert EXPIRED in result.output and "slurmctld" not in result.output


def test_plan_with_the_rucio_server_down_exits_3(make_job: Callable[..., JobConfig],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    job = make_job()

    def down(*_: Any) -> list[str]:
        raise RucioUnavailable("cannot reach the Rucio server https://rucio.test: timed out")

    monkeypatch.setattr(preflight, "job_problems", down)
    result = CliRunner().invoke(main, ["plan", str(job.path)])
    assert result.exit_code == Exit.SERVICE, result.output
    assert result.stderr == ("error: cannot reach the Rucio server https://rucio.test: timed "
                             "out (or plan without the Rucio checks: --offline)\n")
    assert not job.runs_dir.exists() or not list(job.runs_dir.glob("2*"))   # no run made


def test_plan_refused_by_rucio_exits_2_with_each_line(make_job: Callable[..., JobConfig],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    job = make_job()
    monkeypatch.setattr(preflight, "job_problems",
                        lambda *_: ["scope 'user.test' does not exist", "RSE 'X' is unknown"])
    result = CliRunner().invoke(main, ["plan", str(job.path)])
    assert result.exit_code == Exit.USER, result.output
    assert result.stderr.splitlines() == [f"error: {line}" for line in (
        "scope 'user.test' does not exist", "RSE 'X' is unknown")]


@pytest.mark.parametrize("command", ["status", "resubmit", "collect"])
def test_a_damaged_run_json_exits_2_naming_the_file(make_job: Callable[..., JobConfig],
                                                    command: str) -> None:
    layout = prepare_run(make_job(), preflight=None).layout
    layout.run_json.write_text("{not json")
    result = CliRunner().invoke(main, [command, str(layout.dir)])
    assert result.exit_code == Exit.USER, result.output
    assert result.stderr.startswith("error: " + ("cannot collect: " if command == "collect"
                                                 else "") + f"{layout.run_json}: damaged, "
                                    "not valid JSON")


def test_a_directory_that_is_no_run_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["status", str(tmp_path)])
    assert result.exit_code == Exit.USER
    assert result.stderr == (f"error: {tmp_path}: no run.json, so not a run directory "
                             "(dac-upload plan JOB makes one)\n")


def test_status_of_a_planned_run_exits_0_and_says_what_next(
        make_job: Callable[..., JobConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    layout = prepare_run(make_job(), preflight=None).layout
    monkeypatch.setattr(slurm, "array_states", _no_slurm)   # status answers without Slurm
    result = CliRunner().invoke(main, ["status", "--json", str(layout.dir)])
    assert result.exit_code == Exit.OK, result.output
    doc = json.loads(result.stdout)
    assert [t["state"] for t in doc["tasks"]] == ["not started"]
    assert doc["next"] == f"dac-upload submit --run {layout.dir} (planned, never submitted)"


def test_submit_needs_a_job_or_a_run() -> None:
    result = CliRunner().invoke(main, ["submit"])
    assert result.exit_code == Exit.USER
    assert result.stderr == "error: give either JOB_FILE or --run RUN\n"


# ----------------------------------------------------------------------------- runs by job
def test_a_job_file_stands_for_its_latest_run(make_job: Callable[..., JobConfig],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`status t3.toml` gave click's "is a file"; now every RUN takes a job file."""
    job = make_job()
    prepare_run(job, preflight=None)
    newest = prepare_run(job, preflight=None).layout.dir
    monkeypatch.setattr(slurm, "array_states", _no_slurm)
    result = CliRunner().invoke(main, ["status", "--json", str(job.path)])
    assert result.exit_code == Exit.OK, result.output
    assert json.loads(result.stdout)["run_dir"] == str(newest)
    assert f"run: {newest} (the latest of 2 of {job.path}" in result.stderr


def test_a_job_file_without_runs_says_how_to_make_one(
        make_job: Callable[..., JobConfig]) -> None:
    job = make_job()
    result = CliRunner().invoke(main, ["status", str(job.path)])
    assert result.exit_code == Exit.USER
    assert result.stderr == (f"error: {job.path}: no run of this job yet in {job.runs_dir}; "
                             f"make one: dac-upload submit {job.path}\n")


def test_runs_lists_a_jobs_runs_oldest_first(make_job: Callable[..., JobConfig],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    job = make_job({"a.fits": b"x" * 1500, "b.fits": b"y"})
    first = prepare_run(job, preflight=None)
    second = prepare_run(job, preflight=None)
    (second.layout.dir / "run.json").write_text("{")
    monkeypatch.setattr(slurm, "array_states", _no_slurm)
    result = CliRunner().invoke(main, ["runs", "--json", str(job.path)])
    assert result.exit_code == Exit.OK, result.output
    rows = json.loads(result.stdout)["runs"]
    assert [(r["run_id"], r["state"], r["files"], r["bytes"]) for r in rows] == [
        (first.run_id, "planned", 2, 1501), (second.run_id, "unreadable", None, None)]
    text = CliRunner().invoke(main, ["runs", str(job.path)]).stdout.splitlines()
    assert text[0].split() == ["run", "planned", "(UTC)", "state", "files", "bytes", "tasks"]
    assert text[1].split()[0] == first.run_id and "planned" in text[1] and "1.5 KB" in text[1]


# ----------------------------------------------------------------------------- --json
@pytest.mark.parametrize("args", [["status", "--json", "/nonexistent/run"],
                                  ["plan", "--json", "/nonexistent/job.toml"]])
def test_an_error_under_json_is_a_json_document(args: list[str]) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == Exit.USER
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["exit_code"] == Exit.USER
    assert doc["errors"] and doc["errors"][0] in result.stderr


def test_plan_under_json_describes_the_run(make_job: Callable[..., JobConfig]) -> None:
    job = make_job()
    result = CliRunner().invoke(main, ["plan", "--offline", "--json", str(job.path)])
    assert result.exit_code == Exit.OK, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is True and doc["run"]["files"] == 1 and doc["run"]["tasks"] == 1
    assert doc["next"] == f"dac-upload submit --run {doc['run']['run_dir']}"
    assert "run directory:" in result.stderr   # the lines for a person, out of the way


# ----------------------------------------------------------------------------- submit refusals
def test_a_submit_slurm_refuses_leaves_no_run(make_job: Callable[..., JobConfig],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad partition, mem or account left an orphan run directory (exit 3)."""
    job = make_job()
    monkeypatch.setattr(slurm, "max_array_size", lambda: 1001)
    refusal = ["sbatch --test-only refuses the run's array script: sbatch: error: invalid "
               "partition specified: nopart; fix [slurm] ..."]
    monkeypatch.setattr(slurm, "script_problems", lambda what, text: refusal)
    result = CliRunner().invoke(main, ["submit", "--offline", str(job.path)])
    assert result.exit_code == Exit.USER, result.output
    assert result.stderr == "".join(f"error: {line}\n" for line in refusal)
    assert not list(job.runs_dir.glob("2*"))


def test_a_submit_sbatch_then_refuses_removes_its_new_run(
        make_job: Callable[..., JobConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    job = make_job()
    monkeypatch.setattr(slurm, "max_array_size", lambda: 1001)
    monkeypatch.setattr(slurm, "script_problems", lambda what, text: [])

    def refuse(*_: Any) -> str:
        raise slurm.SlurmError("sbatch array.sh failed: QOSMaxSubmitJobPerUserLimit")

    monkeypatch.setattr(slurm, "submit", refuse)
    result = CliRunner().invoke(main, ["submit", "--offline", str(job.path)])
    assert result.exit_code == Exit.SERVICE, result.output
    assert "nothing was submitted and the run directory" in result.stderr
    assert not list(job.runs_dir.glob("2*"))


# ----------------------------------------------------------------------------- options, help
def test_timeout_takes_the_job_files_durations() -> None:
    from dac_upload.cli import Duration

    assert Duration().convert("12h", None, None) == 43200.0
    assert Duration().convert("90", None, None) == 90.0
    result = CliRunner().invoke(main, ["submit", "--timeout", "soon", "x.toml"])
    assert result.exit_code == 2 and "'soon' is not a duration" in result.stderr


def test_worker_without_a_task_index_says_so(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    result = CliRunner().invoke(main, ["worker", "--run", str(tmp_path)])
    assert result.exit_code == Exit.USER
    assert result.stderr.startswith("error: no --task and no $SLURM_ARRAY_TASK_ID")


def test_every_command_has_examples_and_a_whole_short_help() -> None:
    top = CliRunner().invoke(main, ["--help"]).stdout
    assert "..." not in top.split("Commands:")[1]   # no summary cut off mid sentence
    assert "_DAC_UPLOAD_COMPLETE=bash_source dac-upload" in top and "Exit codes:" in top
    for name in main.commands:
        text = CliRunner().invoke(main, [name, "--help"]).stdout
        assert "Exit codes" in text, name
        if name != "worker":
            assert "Examples:" in text, name
        assert not ("[required]" in text and "default:" in text.split("--task")[-1][:80]), name


@pytest.mark.parametrize(("raised", "code"), [("user", Exit.USER), ("down", Exit.SERVICE)])
def test_verify_maps_its_refusals_to_exit_codes(make_job: Callable[..., JobConfig],
                                                monkeypatch: pytest.MonkeyPatch,
                                                raised: str, code: int) -> None:
    from dac_upload import verify as verify_mod

    layout = prepare_run(make_job(), preflight=None).layout

    def refuse(*_: Any, **__: Any) -> Any:
        if raised == "user":
            raise verify_mod.VerifyError([f"{layout.dir}: no summary.json yet: verify reads "
                                          "the collected summary"])
        raise RucioUnavailable("cannot reach the Rucio server https://rucio.test: timed out")

    monkeypatch.setattr(verify_mod, "verify_run", refuse)
    result = CliRunner().invoke(main, ["verify", "--json", str(layout.dir)])
    assert result.exit_code == code, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["exit_code"] == code and len(doc["errors"]) == 1


def test_report_writes_the_page_of_a_job_files_latest_run(
        make_job: Callable[..., JobConfig], tmp_path: Path) -> None:
    job = make_job()
    layout = prepare_run(job, preflight=None).layout
    result = CliRunner().invoke(main, ["report", "--json", str(job.path)])
    assert result.exit_code == Exit.OK, result.output
    page = Path(json.loads(result.stdout)["report"])
    assert page == layout.dir / "report.html" and page.read_text().startswith("<!DOCTYPE")
    bad = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert bad.exit_code == Exit.USER and "no run.json" in bad.stderr
