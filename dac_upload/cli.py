"""The ``dac-upload`` command: parse options, call one step, print the outcome.

Exit codes: errors.Exit (0 success; 1 the run finished with failed files; 2 a problem you can
fix, nothing submitted; 3 Slurm, sbatch or the Rucio server; nightly adds 10-13), the table
in docs/cli.md. Every command that reports takes ``--json``: one JSON document on stdout,
errors included (Reply); the lines for a person go to stderr then.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, NoReturn

import click

from . import __version__
from .catalogue import write_catalogue
from .config import ConfigError, JobConfig, load_job, parse_duration
from .errors import EXIT_MEANING, TASK_EXIT_MEANING, Exit
from .files import utc_now
from .pipeline import (
    CollectorNotSubmitted,
    PlanError,
    PreparedRun,
    Submission,
    already_submitted,
    catalogue_only,
    credential_warnings,
    prepare_run,
    resolve_credentials,
    submit_run,
    submit_tasks,
)
from .progress import Progress, human_bytes
from .rucio import credentials, preflight
from .rucio.credentials import Credentials
from .rucio.errors import RucioUnavailable
from .runrecord import RunRecord


class Reply:
    """What one command says: lines for a person on stdout, or with ``--json`` one document
    on stdout (``ok``, ``exit_code``, the command's keys, ``warnings``, and ``errors`` when
    it failed) and the lines on stderr. Warnings and errors go to stderr either way."""

    def __init__(self) -> None:
        self.json = False
        self.doc: dict[str, Any] = {}
        self.warnings: list[str] = []

    def line(self, text: str) -> None:
        click.echo(text, err=self.json)

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        click.echo(f"warning: {text}", err=True)

    def note(self, text: str) -> None:
        self.doc.setdefault("notes", []).append(text)
        click.echo(f"note: {text}", err=True)

    def finish(self, code: int = Exit.OK, errors: list[str] | None = None) -> NoReturn:
        if self.json:
            doc = {"ok": code == Exit.OK, "exit_code": code, **self.doc}
            doc["warnings"] = list(self.doc.get("warnings", [])) + self.warnings
            if errors is not None:
                doc["errors"] = errors
            click.echo(json.dumps(doc, indent=1, default=str))
        sys.exit(code)


REPLY = Reply()


def _json_flag(ctx: click.Context, _: click.Parameter, value: bool) -> None:
    REPLY.json = bool(value)


json_option = click.option(
    "--json", is_flag=True, is_eager=True, expose_value=False, callback=_json_flag,
    help="Print one JSON document on stdout (errors too, with exit_code); text goes to "
         "stderr.")


def _fail(lines: list[str] | str, code: int) -> NoReturn:
    lines = [lines] if isinstance(lines, str) else list(lines)
    for line in lines:
        click.echo(f"error: {line}", err=True)
    REPLY.finish(code, errors=lines)


def _load(job_file: str) -> JobConfig:
    try:
        job = load_job(job_file)
    except ConfigError as exc:
        _fail(exc.lines, Exit.USER)
    if job.rucio.lifetime:
        days = job.rucio.lifetime / 86400
        REPLY.warn(f"[rucio] lifetime = {job.rucio.lifetime} s: the uploaded data becomes "
                   f"deletable {days:.1f} days after upload; remove 'lifetime' to keep it")
    return job


class RunArgument(click.ParamType):
    """A run directory, or a job file for its latest run (``status t3.toml``)."""

    name = "RUN"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Path:
        return run_of(str(value))


def run_of(arg: str) -> Path:
    """RUN's directory: the directory itself, or the newest run of the job file ARG; exit 2
    with the fix otherwise."""
    from .runrecord import run_dirs

    path = Path(arg)
    if path.is_dir():
        return path.resolve()
    if not path.exists():
        _fail(f"{arg}: no such run directory or job file", Exit.USER)
    try:
        job = load_job(arg)
    except ConfigError as exc:
        _fail([f"{arg} is neither a run directory nor a valid job file:", *exc.lines],
              Exit.USER)
    runs = run_dirs(job.runs_dir)
    if not runs:
        _fail(f"{arg}: no run of this job yet in {job.runs_dir}; make one: dac-upload submit "
              f"{arg}", Exit.USER)
    click.echo(f"run: {runs[-1]} (the latest of {len(runs)} of {arg}; dac-upload runs {arg} "
               "lists them)", err=True)
    return runs[-1].resolve()


RUN = RunArgument()


class Duration(click.ParamType):
    """Seconds, or a duration as the job file writes them: "90m", "12h", "2d"."""

    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return float(parse_duration(str(value)))
        except ValueError:
            self.fail(f"{value!r} is not a duration: give seconds or e.g. \"90m\", \"12h\", "
                      "\"2d\"", param, ctx)


def _timeout_option(what: str) -> Callable[..., Any]:
    return click.option("--timeout", type=Duration(), default="24h", show_default=True,
                        help=f"How long {what} waits (seconds, or e.g. 90m, 12h, 2d).")


def _check_run_rucio(run_dir: Path, what: str) -> None:
    """Before Slurm gets tasks of a planned run: the server answers, the run's credentials
    log in (a real login), its scope and RSE are usable. A submission that could only fail
    would spend an attempt (and nightly's resubmission budget) for nothing."""
    try:
        problems = preflight.run_problems(RunRecord(_read_run_json(run_dir)))
    except RucioUnavailable as exc:
        _fail(f"{exc}; not {what}: the tasks could only fail (try again when it answers, "
              "or --offline to submit anyway)", Exit.SERVICE)
    if problems:
        _fail([*problems, f"not {what}: fix the above first (or --offline to submit anyway)"],
              Exit.USER)


def _plan(job: JobConfig, offline: bool, catalogue_file: Path | None = None,
          script_check: Any = None) -> PreparedRun:
    try:
        return prepare_run(job, preflight=None if offline else preflight.job_problems,
                           progress=None if catalogue_file else Progress("cataloguing"),
                           catalogue_file=catalogue_file, script_check=script_check)
    except PlanError as exc:
        _fail(exc.lines, Exit.USER)
    except RucioUnavailable as exc:
        _fail(f"{exc} (or plan without the Rucio checks: --offline)", Exit.SERVICE)


def _describe(prep: PreparedRun) -> None:
    sizes = [b.bytes for b in prep.batches]
    REPLY.line(f"run {prep.run_id}: {prep.files:,} files, {human_bytes(prep.bytes)} in "
               f"{len(prep.batches)} array tasks (batch sizes {human_bytes(min(sizes))} - "
               f"{human_bytes(max(sizes))})" + (f", {prep.skipped} skipped (see skipped.jsonl)"
                                                 if prep.skipped else ""))
    REPLY.line(f"run directory: {prep.layout.dir}")
    creds = Credentials.from_record(prep.run["credentials"])
    REPLY.doc["run"] = {"run_id": prep.run_id, "run_dir": str(prep.layout.dir),
                        "files": prep.files, "bytes": prep.bytes, "tasks": len(prep.batches),
                        "skipped": prep.skipped, "credentials": creds.describe(),
                        "array_script": str(prep.layout.array_script),
                        "collector_script": str(prep.layout.collect_script),
                        "butler": RunRecord(prep.run).butler}
    b = REPLY.doc["run"]["butler"]
    if b:
        where = (f"repository {b['repo']}" if b["kind"] == "repo"
                 else f"{len(b['maps'])} [[butler.map]] entries")
        REPLY.line(f"butler:        {b['files_with_datasets']:,} files with datasets, from "
                   f"{where}"
                   + ("; Rucio metadata rubin_butler/rubin_sidecar" if b["metadata"] else "")
                   + (f"; dimension records in {b['dimension_export']}"
                      if b["dimension_export"] else "")
                   + (f" (uploaded too, as {b['dimension_file']})"
                      if b.get("dimension_file") else ""))
    for note in prep.notes:
        REPLY.note(note)
    REPLY.line("credentials:   " + creds.describe())
    for line in credential_warnings(prep):
        REPLY.warn(line)
    REPLY.line(f"array script:  {prep.layout.array_script}")
    REPLY.line(f"collector:     {prep.layout.collect_script}")


_KEPT: list[Any] = []   # big results left to the process's end (entry's exit frees nothing)


def _keep_until_exit(obj: Any) -> None:
    if _FAST_EXIT:
        _KEPT.append(obj)


_FAST_EXIT = False


def entry() -> None:
    """The ``dac-upload`` program (and ``python -m dac_upload``): the command, then an exit
    without freeing every object one by one, as mypy does: planning a million files leaves
    a few million, and freeing them took 0.35 s. Logging is shut down and the output flushed
    first; no thread is left running by then. Tests call ``main`` itself."""
    global _FAST_EXIT
    _FAST_EXIT = True
    try:
        main()
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:                                  # sys.exit("message"): as Python does it
            print(exc.code, file=sys.stderr)
            code = 1
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:                            # a closed pipe: as Python does it
        code = code or 120
    os._exit(code)


def _code_lines(meanings: dict[int, str]) -> str:
    """Exit codes as a table click keeps (\\b): the code, its meaning wrapped under it."""
    import textwrap

    return "\n".join(textwrap.fill(text, 92, initial_indent=f"  {code:>2}  ",
                                    subsequent_indent=" " * 6)
                      for code, text in sorted(meanings.items()))


EXIT_CODES_HELP = "\b\nExit codes:\n" + _code_lines(EXIT_MEANING)


def _epilog(*examples: str, codes: str = "") -> str:
    """A command's examples (and its exit codes), kept as written by click (\\b)."""
    text = "\b\nExamples:\n" + "\n".join(f"  {e}" for e in examples)
    return text + (f"\n\n\b\nExit codes: {codes}" if codes else "")


@click.group(context_settings={"help_option_names": ["-h", "--help"],
                               "max_content_width": 100},
             epilog=EXIT_CODES_HELP + "\n\n\b\nShell completion (bash; zsh and fish "
             "alike):\n  eval \"$(_DAC_UPLOAD_COMPLETE=bash_source dac-upload)\"\n\n"
             "A RUN is a run directory, or a job file for its latest run.")
@click.version_option(__version__, prog_name="dac-upload")
def main() -> None:
    """Upload a file tree into Rucio with a Slurm job array, and collect a summary.json.

    \b
    A first upload:
      dac-upload doctor job.toml          check everything the run needs
      dac-upload submit --wait job.toml   plan, submit, wait, report
      dac-upload status job.toml          what its latest run has done
    """
    global REPLY
    REPLY = Reply()


@main.command(short_help="Catalogue, batch and render a run; submit nothing.",
              epilog=_epilog("dac-upload plan job.toml",
                             "dac-upload plan --offline job.toml",
                             "dac-upload plan job.toml --catalogue tree.json",
                             codes="0 planned; 2 the job cannot be planned as it is (each "
                                   "line says why); 3 the Rucio server did not answer."))
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--offline", is_flag=True,
              help="Skip the Rucio checks (scope, RSE, credentials); plan from files only.")
@click.option("--catalogue", "catalogue_file", type=click.Path(dir_okay=False, exists=True),
              help="Plan from this file of `dac-upload catalogue` instead of walking the "
                   "source tree again.")
@json_option
def plan(job_file: str, offline: bool, catalogue_file: str | None) -> None:
    """Catalogue, batch and render a run of JOB_FILE; submit nothing. Its scripts are
    checked by sbatch --test-only when it is submitted (and by doctor)."""
    prep = _plan(_load(job_file), offline, Path(catalogue_file) if catalogue_file else None)
    _keep_until_exit(prep)
    _describe(prep)
    REPLY.doc["next"] = f"dac-upload submit --run {prep.layout.dir}"
    REPLY.line(f"nothing submitted; submit it with: {REPLY.doc['next']}")
    REPLY.finish()


@main.command(short_help="Walk the source tree once into a catalogue file.",
              epilog=_epilog("dac-upload catalogue job.toml --out tree.json",
                             "dac-upload plan job.toml --catalogue tree.json",
                             codes="0 written; 2 a problem with the tree or --out."))
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False),
              help="The catalogue file to write (for plan --catalogue).")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
@json_option
def catalogue(job_file: str, out_file: str, overwrite: bool) -> None:
    """Walk JOB_FILE's source tree and write what plan would upload to a catalogue file:
    plan it later, as often as needed, without walking again (plan --catalogue)."""
    job = _load(job_file)
    out = Path(out_file)
    if out.exists() and not overwrite:
        _fail(f"{out} exists; choose another --out, or --overwrite", Exit.USER)
    if not out.parent.is_dir():
        _fail(f"{out.parent} is not a directory; create it or choose another --out",
              Exit.USER)
    try:
        cat = catalogue_only(job, Progress("cataloguing"))
    except PlanError as exc:
        _fail(exc.lines, Exit.USER)
    try:
        write_catalogue(out, cat, job.source, utc_now(), f"dac-upload {__version__}")
    except OSError as exc:
        _fail(f"cannot write {out}: {exc.strerror}; choose another --out", Exit.USER)
    _keep_until_exit(cat)
    REPLY.doc.update(catalogue=str(out), files=cat.file_count, bytes=cat.total_bytes,
                     skipped=len(cat.skipped), root=str(job.source.root),
                     next=f"dac-upload plan {job_file} --catalogue {out}")
    REPLY.line(f"catalogue: {cat.file_count} files, {human_bytes(cat.total_bytes)}, "
               f"{len(cat.skipped)} skipped, under {job.source.root}")
    REPLY.line(f"written:   {out}")
    REPLY.line(f"plan it with: {REPLY.doc['next']}")
    REPLY.finish()


@main.command(short_help="Plan a job and submit its array and collector.",
              epilog=_epilog("dac-upload submit job.toml",
                             "dac-upload submit --wait --timeout 12h job.toml",
                             "dac-upload submit --run runs/20261202T101500Z-1a2b3c",
                             codes="0 submitted (--wait: every file done); 1 --wait: the run "
                                   "finished with failed files; 2 a problem to fix, nothing "
                                   "submitted and no run left behind; 3 Slurm or the Rucio "
                                   "server."))
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@click.option("--run", "run_dir", type=RUN,
              help="Submit this already planned run (or a job file's latest run) instead of "
                   "planning a new one.")
@click.option("--offline", is_flag=True,
              help="Skip the Rucio checks (when planning, or of the run given by --run).")
@click.option("--wait", is_flag=True,
              help="Wait for the collector to finish and report the outcome.")
@_timeout_option("--wait")
@json_option
def submit(job_file: str | None, run_dir: Path | None, offline: bool, wait: bool,
           timeout: float) -> None:
    """Plan JOB_FILE and submit the array plus its collector (or submit --run RUN). Both
    scripts go through sbatch --test-only before the run directory is made."""
    from . import slurm

    if bool(job_file) == bool(run_dir):
        _fail("give either JOB_FILE or --run RUN", Exit.USER)
    job = _load(job_file) if job_file else None
    if run_dir is not None:   # the run's own problems named before Slurm is asked
        run = RunRecord(_read_run_json(run_dir))
        problem = already_submitted(run_dir, run)
        if problem:
            _fail(problem, Exit.USER)
        _check_run_credentials(run)
    elif job is not None and not offline:
        _check_credentials(_job_credentials(job), warn=False)   # plan warns, once
    max_array = _max_array_size()
    if job is not None:
        prep = _plan(job, offline, script_check=slurm.script_problems)
        _keep_until_exit(prep)
        _describe(prep)
        target = prep.layout.dir
    else:
        assert run_dir is not None
        target = run_dir
        if not offline:
            _check_run_rucio(target, "submitted")
    max_submit = _run_setting(target, "max_submit")
    with _locked_run(target):
        sub = _submission(target, lambda: submit_run(target, max_array, slurm.submit,
                                                     max_submit), made_here=job is not None)
    _after_submit(target, sub, wait, timeout)


@contextlib.contextmanager
def _locked_run(run_dir: Path) -> Iterator[None]:
    """The run's submission lock: a person and the nightly never submit the same tasks."""
    from .locks import LockError, run_submission_lock

    try:
        with run_submission_lock(run_dir):
            yield
    except LockError as exc:
        _fail(f"{exc}; try again when it has finished", Exit.USER)


def _check_run_credentials(run: RunRecord) -> None:
    """The credentials a planned run's tasks will use, checked again before Slurm gets tasks
    that could only fail (an expired proxy, a password file opened to others since)."""
    if run.credentials is not None:
        _check_credentials(Credentials.from_record(run.credentials))


def _job_credentials(job: JobConfig) -> Credentials:
    """The job's credentials as plan resolves them, or exit 2 with plan's line."""
    try:
        return resolve_credentials(job)
    except PlanError as exc:
        _fail(exc.lines, Exit.USER)


def _check_credentials(creds: Credentials, warn: bool = True) -> None:
    """Files present and the user's alone, a proxy or token not expired: else exit 2 with
    the fix; with ``warn``, what is only worth a warning (expiring soon) printed."""
    problems = credentials.local_problems(creds)
    if problems:
        _fail(problems, Exit.USER)
    for line in credentials.local_warnings(creds) if warn else ():
        click.echo(f"warning: {line}", err=True)


def _max_array_size() -> int:
    """Ask Slurm before planning (after the checks that need no service): without it,
    planning would only leave a run nobody can submit."""
    from . import slurm

    try:
        return slurm.max_array_size()
    except slurm.SlurmError as exc:
        _fail(str(exc), Exit.SERVICE)


def _run_setting(run_dir: Path, key: str) -> int | None:
    return RunRecord(_read_run_json(run_dir)).slurm_limit(key)


def _read_run_json(run_dir: Path) -> dict[str, Any]:
    """run.json, or exit 2 with the line that names what is wrong with it."""
    from .runrecord import RunReadError, read_run_json

    try:
        return read_run_json(run_dir)
    except RunReadError as exc:
        _fail(str(exc), Exit.USER)


def _submission(target: Path, do_submit: Callable[[], Submission],
                made_here: bool = False) -> Submission:
    """Run a submission; every way it can fail becomes one line and an exit code. A run this
    command has just planned (``made_here``) that Slurm refused before any job of it was
    queued is removed: nothing that looks like a run is left behind."""
    from . import slurm

    try:
        return do_submit()
    except PlanError as exc:
        _fail(exc.lines, Exit.USER)
    except CollectorNotSubmitted as exc:
        _fail(str(exc), Exit.SERVICE)
    except slurm.SlurmError as exc:
        if made_here and not RunRecord(_read_run_json(target)).submissions:
            shutil.rmtree(target, ignore_errors=True)
            _fail(f"{exc}; nothing was submitted and the run directory {target} was removed "
                  "(fix [slurm] in the job file and submit the job again)", Exit.SERVICE)
        _fail(f"{exc} (fix [slurm] in the job file and submit the job again, or if the cause "
              f"has passed: dac-upload resubmit {target})", Exit.SERVICE)


def _after_submit(target: Path, sub: Submission, wait: bool, timeout: float) -> None:
    """Report a submission, optionally wait for its collector (no lock held)."""

    for array in sub.arrays:
        REPLY.line(f"submitted array job {array['job_id']}: tasks {array['task_ids']}"
                   + (f" (+{array['offset']})" if array["offset"] else ""))
    REPLY.line(f"submitted collector job {sub.collector_job_id} "
               f"({'afterany' if sub.arrays else 'alone'}), attempt {sub.attempt}")
    REPLY.doc["submission"] = {"attempt": sub.attempt, "arrays": sub.arrays,
                               "collector_job_id": sub.collector_job_id,
                               "held_back": sub.left_over or None,
                               "run_dir": str(target)}
    if sub.left_over:
        REPLY.line(f"held back by [slurm] max_submit: tasks {sub.left_over}; submit them "
                   f"later with: dac-upload resubmit {target}")
    REPLY.line(f"summary will be written to {target / 'summary.json'}")
    if wait:
        _wait_for(target, sub.collector_job_id, timeout)
        _report(target)
    REPLY.finish()


def _wait_for(target: Path, collector_job_id: str, timeout: float) -> None:
    """Follow the run until its collector has left the queue (progress on stderr)."""
    from . import slurm
    from .progress import WaitDisplay
    from .watch import RunWatcher

    watcher = RunWatcher(target, scheduler=slurm.array_states)
    display = WaitDisplay(sys.stderr)
    try:
        slurm.wait_until_gone(collector_job_id, timeout, poll=2.0,
                              on_poll=lambda: display.update(watcher.poll()))
    except slurm.SlurmError as exc:
        display.close()
        _fail(str(exc), Exit.SERVICE)
    display.finish(watcher.poll())


def _report(run_dir: Path) -> None:
    """The summary line of a collected run; exit 1 if it is not complete, or if the
    summary is missing or was not made from the results as they are now."""
    from .collect import COLLECTED, collected_counts, collection_state
    from .runrecord import read_run_json

    summary_path = run_dir / "summary.json"
    state, why = collection_state(run_dir, read_run_json(run_dir))
    if state != COLLECTED:
        _fail(f"the collector did not finish ({why}); see {run_dir / 'logs'}, then: "
              f"dac-upload resubmit {run_dir} (or dac-upload collect {run_dir})", Exit.FAILURES)
    s = collected_counts(run_dir)
    c = s["counts"]
    REPLY.doc["result"] = {"summary": str(summary_path), "counts": c,
                           "complete": s["complete"],
                           "tasks_missing_result": s["tasks_missing_result"]}
    REPLY.line(f"{summary_path}: {c['files']} files, {c['uploaded']} uploaded, "
               f"{c['already_present']} already present, {c['failed']} failed, "
               f"{c['not_attempted']} not attempted; tasks without result: "
               f"{s['tasks_missing_result'] or 'none'}")
    if not s["complete"]:
        REPLY.doc["next"] = f"dac-upload status {run_dir}"
        REPLY.line(f"next: {REPLY.doc['next']} (names the files and what to do)")
        REPLY.finish(Exit.FAILURES)


@main.command(short_help="Upload one batch manifest (what each array task runs).",
              epilog="\b\nExit codes (an array task's):\n" + _code_lines(TASK_EXIT_MEANING))
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="The run directory.")
@click.option("--task", type=int, envvar="SLURM_ARRAY_TASK_ID",
              help="Array index to process; when not given, $SLURM_ARRAY_TASK_ID (as Slurm "
                   "sets it in an array task).")
@click.option("--retry-permanent", is_flag=True,
              help="Also retry files whose last failure needed a person (set by "
                   "dac-upload resubmit --retry-permanent).")
def worker(run_dir: str, task: int | None, retry_permanent: bool) -> None:
    """Upload the files of one batch manifest (what each array task runs)."""
    from .upload.task import run_task

    if task is None:
        _fail("no --task and no $SLURM_ARRAY_TASK_ID: give the array index (the worker is "
              "what each array task runs; you rarely run it by hand)", Exit.USER)
    sys.exit(run_task(Path(run_dir).resolve(), task, retry_permanent=retry_permanent))


@main.command(short_help="Merge a run's results into summary.json and the ledger.",
              epilog=_epilog("dac-upload collect runs/20261202T101500Z-1a2b3c",
                             "dac-upload collect job.toml",
                             codes="0 every file done; 1 the run has failed files; 2 the "
                                   "run directory cannot be read."))
@click.argument("run_dir", metavar="RUN", type=RUN)
@json_option
def collect(run_dir: Path) -> None:
    """Merge the task results of RUN into summary.json and the job's ledger (what the
    collector job runs; run it by hand when a collector was killed or ran out of memory)."""
    from .collect import collect_run
    from .runrecord import RunReadError

    target = run_dir
    try:
        _, ledger_problem = collect_run(target)
    except RunReadError as exc:
        _fail(f"cannot collect: {exc}", Exit.USER)
    except OSError as exc:
        _fail(f"cannot collect {target}: {exc}", Exit.USER)
    if ledger_problem:   # summary.json is written; the ledger only saves a nightly some work
        REPLY.warn(f"the job's ledger was not updated ({ledger_problem}); the next nightly "
                   "will re-check these files with Rucio")
    _report(target)
    REPLY.finish()


@main.command("remake-manifests", short_help="Restore missing or changed manifests of a run.",
              epilog=_epilog("dac-upload remake-manifests runs/20261202T101500Z-1a2b3c",
                             codes="0 the manifests are as planned; 2 one cannot be made "
                                   "again as planned."))
@click.argument("run_dir", metavar="RUN", type=RUN)
@json_option
def remake_manifests(run_dir: Path) -> None:
    """Restore the manifests of RUN that are missing or were changed after planning,
    made again from the run's catalogue and job copy; each must match the digest run.json
    recorded at planning, or it is left as it is (exit 2)."""
    import hashlib

    from .files import atomic_write_bytes
    from .pipeline import remake_manifests as remake
    from .runrecord import RunLayout, manifest_problem

    target = run_dir
    run = _read_run_json(target)
    digests = RunRecord(run).manifest_sha256
    if not digests:
        _fail(f"{target}: planned by a dac-upload that recorded no manifest digests: its "
              "manifests cannot be checked or re-made; plan a new run", Exit.USER)
    bad = {t: why for t in range(RunRecord(run).tasks)
           if (why := manifest_problem(target, run, t))}
    REPLY.doc["restored"] = []
    if not bad:
        REPLY.line("every manifest is the one planned: nothing to do")
        REPLY.finish()
    try:
        made = remake(target)
    except Exception as exc:
        _fail(f"cannot make the manifests again from {target / 'catalogue.json'}: {exc}",
              Exit.USER)
    failed = []
    for t, why in sorted(bad.items()):
        data = made.get(t)
        if data is None or hashlib.sha256(data).hexdigest() != digests[t]:
            failed.append(f"task {t}: {why}; made again it still differs from the plan "
                          "(a Butler source's metadata and zip indexes are only in the "
                          "repository, a map tree's zip indexes need lsst-daf-butler here): "
                          "plan a "
                          "new run for these files")
            continue
        atomic_write_bytes(RunLayout(target).manifest(t), data)
        REPLY.doc["restored"].append(str(RunLayout(target).manifest(t)))
        REPLY.line(f"restored {RunLayout(target).manifest(t)} ({why})")
    if failed:
        _fail(failed, Exit.USER)
    REPLY.doc["next"] = f"dac-upload status {target}"
    REPLY.line(f"the manifests are as planned; next: dac-upload status {target}")
    REPLY.finish()


def _run_status(run_dir: Path, need_scheduler: bool = False) -> tuple[Any, list[Any]]:
    """(RunState, [TaskStatus]) from the run directory and the scheduler's view. Without the
    scheduler's view ``status`` still answers from the results; ``resubmit`` must not (it
    could start a second copy of a task that is running)."""
    from . import slurm
    from .runrecord import RunReadError
    from .runview import run_view

    try:
        return run_view(run_dir)
    except slurm.SlurmError as exc:
        if need_scheduler:
            _fail(f"cannot ask Slurm which tasks are still queued ({exc}); not resubmitting "
                  "(a running task could be started twice); try again", Exit.SERVICE)
        REPLY.warn(f"no scheduler view ({exc}); states come from results only")
    except RunReadError as exc:
        _fail(str(exc), Exit.USER)
    except (OSError, ValueError, KeyError) as exc:
        _fail(f"{run_dir} is not a readable run directory: {exc}", Exit.USER)
    try:
        return run_view(run_dir, scheduler=False)
    except RunReadError as exc:
        _fail(str(exc), Exit.USER)
    except (OSError, ValueError, KeyError) as exc:
        _fail(f"{run_dir} is not a readable run directory: {exc}", Exit.USER)


@main.command(short_help="What each task of a run has done, and what to run next.",
              epilog=_epilog("dac-upload status job.toml",
                             "dac-upload status runs/20261202T101500Z-1a2b3c",
                             "dac-upload status --json job.toml | jq '.files_not_done[]'",
                             codes="0 it answered (whatever the run's state); 2 not a "
                                   "readable run."))
@click.argument("run_dir", metavar="RUN", type=RUN)
@json_option
def status(run_dir: Path) -> None:
    """What every array task of RUN has done, the files not done (by cause, with what to
    do about each) and the next command to run. The full list of the files not done is
    written to RUN/not-done.jsonl."""
    from .status import not_done_files, report

    target = run_dir
    state, tasks = _run_status(target)
    full_list = _write_not_done(target, not_done_files(tasks))
    doc, lines = report(state, tasks, str(target), full_list)
    REPLY.doc.update(doc)
    if not REPLY.json:
        for line in lines:
            REPLY.line(line)
    REPLY.finish()


def _write_not_done(run_dir: Path, files: list[dict[str, Any]]) -> str | None:
    """RUN/not-done.jsonl (atomic), or None when there is nothing to list or the run
    directory is not writable by this user (status still answers)."""
    from .files import atomic_write_jsonl

    path = run_dir / "not-done.jsonl"
    if not files:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        return None
    try:
        atomic_write_jsonl(path, files)
    except OSError:
        return f"dac-upload status --json {run_dir} (files_not_done)"
    return str(path)


@main.command(short_help="Submit again the tasks of a run that are not complete.",
              epilog=_epilog("dac-upload resubmit job.toml",
                             "dac-upload resubmit --retry-permanent --wait job.toml",
                             codes="0 submitted or nothing to do; 1 --wait: files still "
                                   "failed; 2 a problem to fix (tasks still running, a run "
                                   "that needs a person); 3 Slurm or the Rucio server."))
@click.argument("run_dir", metavar="RUN", type=RUN)
@click.option("--force", is_flag=True,
              help="Submit even though tasks of the run are still pending or running.")
@click.option("--retry-permanent", is_flag=True,
              help="Also retry files that failed for a reason a person must fix (missing, "
                   "unreadable, conflict), once you have fixed it. A file that changed after "
                   "planning needs a new run (dac-upload submit JOB).")
@click.option("--wait", is_flag=True, help="Wait for the new collector and report.")
@_timeout_option("--wait")
@click.option("--offline", is_flag=True,
              help="Skip the Rucio checks (server, login, scope, RSE) before submitting.")
@json_option
def resubmit(run_dir: Path, force: bool, retry_permanent: bool, wait: bool,
             timeout: float, offline: bool) -> None:
    """Submit again only the tasks of RUN that are not complete; a new collector merges
    every attempt. Inside a task only the files not yet done are tried."""
    from . import slurm
    from .collect import COLLECTED
    from .pipeline import compress_indices, submit_collector
    from .status import ACTIVE_STATES, OUT_OF_RESOURCES, tasks_to_retry

    target = run_dir
    run = RunRecord(_read_run_json(target))   # a damaged run.json named before Slurm
    max_submit = run.slurm_limit("max_submit")
    _check_run_credentials(run)
    max_array = _max_array_size()
    with _locked_run(target):
        state, tasks = _run_status(target, need_scheduler=True)
        active = [t.task for t in tasks if t.state in ("pending", "running")]
        if active and not force:
            _fail(f"tasks {compress_indices(active)} of this run are still pending or "
                  "running; wait for them (dac-upload status), or use --force", Exit.USER)
        retry = tasks_to_retry(tasks, retry_permanent)
        job, job_state = state.collector
        if not retry and state.collection[0] != COLLECTED and job_state in OUT_OF_RESOURCES:
            _fail(f"every task is over but the collector (job {job}) ended {job_state}, and a "
                  f"new one would too: collect the run here: dac-upload collect {target}",
                  Exit.USER)
        if not retry and state.collection[0] != COLLECTED \
                and not (job and job_state in ACTIVE_STATES):
            REPLY.line(f"every task is over but the run is not collected "
                       f"({state.collection[1]}): submitting its collector")
            sub = _submission(target, lambda: submit_collector(target, slurm.submit))
        elif not retry:
            stuck = [t.task for t in tasks if not t.complete and t.permanent_only]
            if stuck:
                why = (f"nothing submitted: tasks {compress_indices(stuck)} have only files "
                       "that failed for a reason a person must fix (dac-upload status "
                       f"{target} names them); fix them, then: dac-upload resubmit "
                       f"--retry-permanent {target}")
            elif job and job_state in ACTIVE_STATES:
                why = (f"nothing to resubmit: every task is over and its collector (job "
                       f"{job}) is {job_state}")
            else:
                why = "nothing to resubmit: every task is complete"
            REPLY.doc.update(submitted=False, reason=why)
            REPLY.line(why)
            REPLY.finish()
        else:
            if not offline:
                _check_run_rucio(target, "resubmitted")
            sub = _submission(target, lambda: submit_tasks(
                target, retry, max_array, slurm.submit, max_submit, retry_permanent))
    _after_submit(target, sub, wait, timeout)


@main.command(short_help="Incremental run for cron/scrontab: only new or changed files.",
              epilog=_epilog("dac-upload nightly --quiet job.toml",
                             "scrontab line: 30 1 * * * dac-upload nightly --quiet /home/me/"
                             "jobs/dp1.toml"))
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--quiet", is_flag=True, help="Print only problems (everything still goes to "
              "the job's nightly.log).")
@click.option("--wait", is_flag=True, help="Wait for tonight's run and exit 1 if files failed.")
@_timeout_option("--wait")
@click.option("--full", is_flag=True, help="Ignore the ledger: every matching file (Rucio "
              "decides what is already there).")
@click.option("--break-stale-lock", is_flag=True,
              help="Remove a soft lock reported stale (only if no nightly of this job runs).")
@click.option("--offline", is_flag=True, help="Skip the Rucio checks when planning.")
def nightly(job_file: str, quiet: bool, wait: bool, timeout: float, full: bool,
            break_stale_lock: bool, offline: bool) -> None:
    """Incremental run for cron/scrontab: upload only files new or changed since the ledger,
    never beside a run still going. Exit codes: 0 nothing to do or submitted, 1 (--wait)
    files failed, 2 configuration, 3 submission failed, 10 locked, 11 previous run still
    going, 12 credentials expire too soon, 13 files need a person."""
    from . import slurm
    from .nightly import NightOptions, Reporter, run_night

    try:
        job = load_job(job_file)
    except ConfigError as exc:
        _fail(exc.lines, Exit.USER)
    job.runs_dir.mkdir(parents=True, exist_ok=True)
    say = Reporter(job.runs_dir / "nightly.log", quiet)
    if job.rucio.lifetime:
        say(f"[rucio] lifetime = {job.rucio.lifetime} s: uploads become deletable",
            problem=True)
    opts = NightOptions(full=full, wait=wait, timeout=timeout,
                        break_stale_lock=break_stale_lock, offline=offline)
    sys.exit(run_night(job, opts, say, preflight.job_problems,
                       script_check=slurm.script_problems))


@main.command(short_help="Check everything a run of a job needs, with the fixes.",
              epilog=_epilog("dac-upload doctor job.toml",
                             "dac-upload doctor --probe job.toml",
                             codes="0 every check passed; 1 a check failed (its line says "
                                   "the fix)."))
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--probe", is_flag=True, help="Also upload one small file of our own to the RSE "
              "and read it back (left there with a 1 h rule; nothing is deleted).")
@json_option
def doctor(job_file: str, probe: bool) -> None:
    """Check everything a run of JOB_FILE needs, one line each with the fix: the job file,
    a dry plan (every check plan runs), the scripts through sbatch --test-only, the
    container or Python, the credentials, the Rucio server, scope, RSE and quota. Exit 1 if
    any check fails."""
    from .doctor import diagnose, failed

    checks = diagnose(job_file, probe=probe)
    REPLY.doc.update(job_file=job_file, checks=[c.as_dict() for c in checks])
    if not REPLY.json:
        for check in checks:
            REPLY.line(check.line())
        REPLY.line("all checks passed" if not failed(checks) else
                   f"{sum(c.status == 'FAIL' for c in checks)} check(s) failed")
    REPLY.finish(Exit.FAILURES if failed(checks) else Exit.OK)


@main.command("butler-table", short_help="Write the tables and commands to ingest a run "
              "into a Butler.",
              epilog=_epilog("dac-upload butler-table job.toml",
                             "dac-upload butler-table --relative-to davs://echo.example:1094/"
                             "lsst RUN",
                             codes="0 written, every file in; 1 files or datasets left out "
                                   "(listed; --allow-missing accepts that); 2 not collected "
                                   "yet, or the tables exist (--overwrite)."))
@click.argument("run_dir", metavar="RUN", type=RUN)
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Where the tables go (default: RUN_DIR/butler-ingest).")
@click.option("--relative-to", metavar="URL",
              help="Write each file's URI relative to this prefix of its RSE URL; the "
                   "ingest command gets --prefix URL (replace it with the URL the "
                   "destination datastore reads, e.g. an s3:// endpoint).")
@click.option("--allow-missing", is_flag=True,
              help="Exit 0 even when files with datasets were not uploaded, uploaded "
                   "files match no [[butler.map]], datasets were skipped when planning, or "
                   "files were found inside an earlier run's archive.")
@click.option("--overwrite", is_flag=True, help="Replace tables written before.")
@json_option
def butler_table(run_dir: Path, out_dir: str | None, relative_to: str | None,
                 allow_missing: bool, overwrite: bool) -> None:
    """Write ECSV tables for `butler ingest-files` from a collected run, and the commands.
    Exit 1 when files or datasets are left out (not uploaded, no data ID, skipped when
    planning), unless --allow-missing."""
    from .butler.ingest import ingest_tables
    from .butler.source import ButlerError
    from .files import read_json
    from .runrecord import RunLayout

    target = run_dir
    layout = RunLayout(target)
    if not layout.summary.exists():
        _fail(f"{target}: no summary.json yet; run: dac-upload collect {target}", Exit.USER)
    out = Path(out_dir).resolve() if out_dir else target / "butler-ingest"
    try:
        made = ingest_tables(read_json(layout.summary), target, out, relative_to, overwrite)
    except ButlerError as exc:
        _fail(exc.lines, Exit.USER)
    for t in made.tables:
        REPLY.line(f"table: {t.path} ({t.rows} files of {t.dataset_type} in {t.run})")
    if made.zips:
        REPLY.line(f"zips: {len(made.zips)} (butler ingest-zip)")
    if made.dimension_export:
        REPLY.line(f"dimension records: {made.dimension_export}")
    REPLY.line(f"commands ({made.script}, with HERE = its folder; run it as: sh "
               f"{made.script} DEST_REPO):")
    for line in made.commands:
        REPLY.line(f"  {line}")
    problems = [("files not uploaded", "not_uploaded", made.not_uploaded),
                ("files uploaded but matched by no [[butler.map]] (no data ID)",
                 "not_matched", made.not_matched),
                ("datasets left out when planning (skipped.jsonl)", "skipped", made.skipped),
                ("files already in Rucio inside an earlier run's archive (their datasets go "
                 "with that archive's butler-table)", "in_earlier_archive",
                 made.in_earlier_archive)]
    REPLY.doc.update(
        tables=[{"path": str(t.path), "rows": t.rows, "dataset_type": t.dataset_type,
                 "run": t.run} for t in made.tables],
        zips=len(made.zips), dimension_export=made.dimension_export and str(
            made.dimension_export), script=str(made.script), commands=list(made.commands),
        **{key: list(items) for _, key, items in problems})
    bad = False
    for what, _, items in problems:
        if items:
            bad = True
            click.echo(f"{len(items)} {what}:", err=True)
            for item in items[:20]:
                click.echo(f"  {item}", err=True)
            if len(items) > 20:
                click.echo(f"  ... and {len(items) - 20} more", err=True)
    if bad and not allow_missing:
        _fail("some files are not in the tables (above, and written as they are); resubmit "
              "or fix the maps, or accept that: dac-upload butler-table --allow-missing "
              f"--overwrite {target}", Exit.FAILURES)
    REPLY.finish()


@main.command(short_help="Check a run's files again against Rucio and the storage.",
              epilog=_epilog("dac-upload verify job.toml",
                             "dac-upload verify --source checksum runs/20261202T101500Z-1a2b3c",
                             "dac-upload verify --json job.toml | jq .causes",
                             codes="0 every file verified; 1 some files have problems (listed, "
                                   "all in RUN/verify.jsonl); 2 the run cannot be verified as "
                                   "it is (not collected, credentials); 3 Rucio or the storage "
                                   "could not be reached."))
@click.argument("run_dir", metavar="RUN", type=RUN)
@click.option("--source", type=click.Choice(["none", "size", "checksum"]), default="none",
              show_default=True,
              help="Also check the source files: size and modification time as catalogued, "
                   "or those and adler32 read again (every byte of the source).")
@click.option("--no-storage", is_flag=True,
              help="Ask only Rucio, not the storage's own size and adler32 of each object.")
@click.option("--threads", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Storage and source checks at once.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False),
              help="Where to write the full list of problems (default RUN/verify.jsonl).")
@json_option
def verify(run_dir: Path, source: str, no_storage: bool, threads: int,
           out_file: str | None) -> None:
    """Check every uploaded file of a collected RUN again: its replica on the RSE is
    AVAILABLE with the recorded size and checksums, a rule protects it (on the file or a
    dataset above it), the storage's own size and adler32 match (unless --no-storage), and
    optionally the source still matches. Rucio is asked in bulk (one request per 1,000
    files); nothing is changed anywhere."""
    from .verify import VerifyError, verify_run

    progress = Progress("verifying")
    try:
        report = verify_run(run_dir, source=source, storage=not no_storage,
                            progress=progress.update, threads=threads,
                            problems_file=Path(out_file).resolve() if out_file else None)
    except VerifyError as exc:
        _fail(exc.lines, Exit.USER)
    except RucioUnavailable as exc:
        _fail(f"{exc}; nothing was changed: try again when it answers", Exit.SERVICE)
    progress.done()
    REPLY.doc.update(report.to_json())
    if not REPLY.json:
        REPLY.line(report.render())
    REPLY.finish(report.exit_code)


@main.command("report", short_help="Write a self-contained HTML page of a run.",
              epilog=_epilog("dac-upload report runs/20261202T101500Z-1a2b3c",
                             "dac-upload report job.toml --out ~/public_html/raw.html",
                             codes="0 the page was written; 2 not a readable run, or the "
                                   "page cannot be written there."))
@click.argument("run_dir", metavar="RUN", type=RUN)
@click.option("--out", "out_file", type=click.Path(dir_okay=False), default=None,
              help="Where to write the page (default RUN/report.html).")
@click.option("--max-failed", type=click.IntRange(min=0), default=500, show_default=True,
              help="Failed files listed on the page (all are counted).")
@json_option
def report_page(run_dir: Path, out_file: str | None, max_failed: int) -> None:
    """One HTML page of RUN to look at rather than read: the array tasks on a timeline,
    throughput over time, bytes per task, failures by cause and the failed files. Every
    part is inline (no network, no script): it opens from the HPC file system in any
    browser. It reads only the run directory, while the run goes or long after."""
    from .report import write_report
    from .runrecord import RunReadError

    try:
        path = write_report(run_dir, Path(out_file).resolve() if out_file else None,
                            max_failed=max_failed)
    except RunReadError as exc:
        _fail(str(exc), Exit.USER)
    except OSError as exc:
        _fail(f"cannot write the report: {exc}; give --out FILE in a directory you can write",
              Exit.USER)
    REPLY.doc["report"] = str(path)
    REPLY.line(f"report: {path}")
    REPLY.finish()


@main.command(short_help="List a job's runs: id, when, state, files, bytes.",
              epilog=_epilog("dac-upload runs job.toml", "dac-upload runs --json job.toml",
                             codes="0 listed (also when there is none); 2 a bad job file."))
@click.argument("job_file", type=click.Path(dir_okay=False, exists=True))
@json_option
def runs(job_file: str) -> None:
    """The runs of JOB_FILE, oldest first: id, when planned, state (planned, queued,
    running, collected complete or with failures, not collected), files, bytes and tasks.
    The newest is what a command given JOB_FILE as its RUN works on."""
    from . import slurm
    from .runview import runs_overview

    try:
        job = load_job(job_file)
    except ConfigError as exc:
        _fail(exc.lines, Exit.USER)
    try:
        rows = runs_overview(job.runs_dir)
    except slurm.SlurmError as exc:
        REPLY.warn(f"no scheduler view ({exc}): submitted runs not collected show as "
                   "'submitted'")
        rows = runs_overview(job.runs_dir, scheduler=False)
    REPLY.doc.update(job_file=str(job.path), runs_dir=str(job.runs_dir), runs=rows)
    if not rows:
        REPLY.line(f"no runs yet in {job.runs_dir}; make one: dac-upload submit {job_file}")
    else:
        REPLY.line(f"{'run':<24} {'planned (UTC)':<20} {'state':<28} {'files':>10} "
                   f"{'bytes':>10} {'tasks':>6}")
        for r in rows:
            REPLY.line(f"{r['run_id']:<24} {(r['created_at'] or '?')[:19]:<20} "
                       f"{r['state']:<28} {_count(r['files']):>10} "
                       f"{human_bytes(r['bytes']) if r['bytes'] is not None else '?':>10} "
                       f"{_count(r['tasks']):>6}")
        REPLY.line(f"runs folder: {job.runs_dir}")
    REPLY.finish()


def _count(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"
