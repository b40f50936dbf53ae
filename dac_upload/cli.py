"""The ``dac-upload`` command: parse options, call one step, print the outcome.

Exit codes: errors.Exit (0 success; 1 the run finished with failed files; 2 a problem you can
fix, nothing submitted; 3 Slurm, sbatch or the Rucio server; nightly adds 10-13), the table
in docs/cli.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, NoReturn

import click

from . import __version__
from .catalogue import write_catalogue
from .config import ConfigError, JobConfig, load_job
from .errors import Exit
from .files import utc_now
from .pipeline import (
    CollectorNotSubmitted,
    PlanError,
    PreparedRun,
    Submission,
    catalogue_only,
    credential_warnings,
    prepare_run,
    submit_run,
    submit_tasks,
)
from .progress import Progress, human_bytes
from .rucio import credentials, preflight
from .rucio.credentials import Credentials
from .rucio.errors import RucioUnavailable
from .runrecord import RunRecord


def _fail(lines: list[str] | str, code: int) -> NoReturn:
    for line in [lines] if isinstance(lines, str) else lines:
        click.echo(f"error: {line}", err=True)
    sys.exit(code)


def _load(job_file: str) -> JobConfig:
    try:
        job = load_job(job_file)
    except ConfigError as exc:
        _fail(exc.lines, Exit.USER)
    if job.rucio.lifetime:
        days = job.rucio.lifetime / 86400
        click.echo(f"warning: [rucio] lifetime = {job.rucio.lifetime} s: the uploaded data "
                   f"becomes deletable {days:.1f} days after upload; remove 'lifetime' to keep "
                   "it", err=True)
    return job


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


def _plan(job: JobConfig, offline: bool, catalogue_file: Path | None = None) -> PreparedRun:
    try:
        return prepare_run(job, preflight=None if offline else preflight.job_problems,
                           progress=None if catalogue_file else Progress("cataloguing"),
                           catalogue_file=catalogue_file)
    except PlanError as exc:
        _fail(exc.lines, Exit.USER)
    except RucioUnavailable as exc:
        _fail(f"{exc} (or plan without the Rucio checks: --offline)", Exit.SERVICE)


def _describe(prep: PreparedRun) -> None:
    sizes = [b.bytes for b in prep.batches]
    click.echo(f"run {prep.run_id}: {prep.files:,} files, {human_bytes(prep.bytes)} in "
               f"{len(prep.batches)} array tasks (batch sizes {human_bytes(min(sizes))} - "
               f"{human_bytes(max(sizes))})" + (f", {prep.skipped} skipped (see skipped.jsonl)"
                                                 if prep.skipped else ""))
    click.echo(f"run directory: {prep.layout.dir}")
    b = RunRecord(prep.run).butler
    if b:
        where = (f"repository {b['repo']}" if b["kind"] == "repo"
                 else f"{len(b['maps'])} [[butler.map]] entries")
        click.echo(f"butler:        {b['files_with_datasets']:,} files with datasets, from {where}"
                   + ("; Rucio metadata rubin_butler/rubin_sidecar" if b["metadata"] else "")
                   + (f"; dimension records in {b['dimension_export']}"
                      if b["dimension_export"] else "")
                   + (f" (uploaded too, as {b['dimension_file']})"
                      if b.get("dimension_file") else ""))
    for note in prep.notes:
        click.echo(f"note: {note}", err=True)
    click.echo("credentials:   "
               + Credentials.from_record(prep.run["credentials"]).describe())
    for line in credential_warnings(prep):
        click.echo(f"warning: {line}", err=True)
    click.echo(f"array script:  {prep.layout.array_script}")
    click.echo(f"collector:     {prep.layout.collect_script}")


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dac-upload")
def main() -> None:
    """Upload a file tree into Rucio with a Slurm job array, and collect a summary.json."""


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--offline", is_flag=True,
              help="Skip the Rucio checks (scope, RSE, credentials); plan from files only.")
@click.option("--catalogue", "catalogue_file", type=click.Path(dir_okay=False, exists=True),
              help="Plan from this file of `dac-upload catalogue` instead of walking the "
                   "source tree again.")
def plan(job_file: str, offline: bool, catalogue_file: str | None) -> None:
    """Catalogue, batch and render a run of JOB_FILE; submit nothing."""
    prep = _plan(_load(job_file), offline, Path(catalogue_file) if catalogue_file else None)
    _keep_until_exit(prep)
    _describe(prep)
    click.echo(f"nothing submitted; submit it with: dac-upload submit --run {prep.layout.dir}")


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False),
              help="The catalogue file to write (for plan --catalogue).")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
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
    click.echo(f"catalogue: {cat.file_count} files, {human_bytes(cat.total_bytes)}, "
               f"{len(cat.skipped)} skipped, under {job.source.root}")
    click.echo(f"written:   {out}")
    click.echo(f"plan it with: dac-upload plan {job_file} --catalogue {out}")


@main.command()
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@click.option("--run", "run_dir", type=click.Path(file_okay=False, exists=True),
              help="Submit this already planned run instead of planning a new one.")
@click.option("--offline", is_flag=True,
              help="Skip the Rucio checks (when planning, or of the run given by --run).")
@click.option("--wait", is_flag=True,
              help="Wait for the collector to finish and report the outcome.")
@click.option("--timeout", default=86400.0, show_default=True,
              help="Seconds to wait with --wait.")
def submit(job_file: str | None, run_dir: str | None, offline: bool, wait: bool,
           timeout: float) -> None:
    """Plan JOB_FILE and submit the array plus its collector (or submit --run RUN)."""
    from . import slurm

    if bool(job_file) == bool(run_dir):
        _fail("give either JOB_FILE or --run RUN", Exit.USER)
    job = _load(job_file) if job_file else None
    max_array = _max_array_size()
    if job is not None:
        prep = _plan(job, offline)
        _keep_until_exit(prep)
        _describe(prep)
        target = prep.layout.dir
    else:
        target = Path(run_dir).resolve()
        _check_run_credentials(target)
        if not offline:
            _check_run_rucio(target, "submitted")
    max_submit = _run_setting(target, "max_submit")
    with _locked_run(target):
        sub = _submission(target, lambda: submit_run(target, max_array, slurm.submit,
                                                     max_submit))
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


def _check_run_credentials(run_dir: Path) -> None:
    """The credentials a planned run's tasks will use, checked again before Slurm gets tasks
    that could only fail (an expired proxy, a password file opened to others since)."""
    record = RunRecord(_read_run_json(run_dir)).credentials
    if record is None:
        return
    creds = Credentials.from_record(record)
    problems = credentials.local_problems(creds)
    if problems:
        _fail(problems, Exit.USER)
    for line in credentials.local_warnings(creds):
        click.echo(f"warning: {line}", err=True)


def _max_array_size() -> int:
    """Ask Slurm first: without it, planning would only leave a run nobody can submit."""
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


def _submission(target: Path, do_submit: Callable[[], Submission]) -> Submission:
    """Run a submission; every way it can fail becomes one line and an exit code."""
    from . import slurm

    try:
        return do_submit()
    except PlanError as exc:
        _fail(exc.lines, Exit.USER)
    except CollectorNotSubmitted as exc:
        _fail(str(exc), Exit.SERVICE)
    except slurm.SlurmError as exc:
        _fail(f"{exc} (fix [slurm] in the job file and submit the job again, or if the cause "
              f"has passed: dac-upload resubmit {target})", Exit.SERVICE)


def _after_submit(target: Path, sub: Submission, wait: bool, timeout: float) -> None:
    """Report a submission, optionally wait for its collector (no lock held)."""
    from . import slurm

    for array in sub.arrays:
        click.echo(f"submitted array job {array['job_id']}: tasks {array['task_ids']}"
                   + (f" (+{array['offset']})" if array["offset"] else ""))
    click.echo(f"submitted collector job {sub.collector_job_id} "
               f"({'afterany' if sub.arrays else 'alone'}), attempt {sub.attempt}")
    if sub.left_over:
        click.echo(f"held back by [slurm] max_submit: tasks {sub.left_over}; submit them "
                   f"later with: dac-upload resubmit {target}")
    click.echo(f"summary will be written to {target / 'summary.json'}")
    if wait:
        from .collect import records_so_far

        progress = Progress("uploading")
        try:
            slurm.wait_until_gone(sub.collector_job_id, timeout, poll=2.0,
                                  on_poll=lambda: progress.update(*records_so_far(target)))
        except slurm.SlurmError as exc:
            _fail(str(exc), Exit.SERVICE)
        progress.done()
        _report(target)


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
    click.echo(f"{summary_path}: {c['files']} files, {c['uploaded']} uploaded, "
               f"{c['already_present']} already present, {c['failed']} failed, "
               f"{c['not_attempted']} not attempted; tasks without result: "
               f"{s['tasks_missing_result'] or 'none'}")
    if not s["complete"]:
        sys.exit(Exit.FAILURES)


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="The run directory.")
@click.option("--task", type=int, envvar="SLURM_ARRAY_TASK_ID", required=True,
              help="Array index to process (default: $SLURM_ARRAY_TASK_ID).")
@click.option("--retry-permanent", is_flag=True,
              help="Also retry files whose last failure needed a person (set by "
                   "dac-upload resubmit --retry-permanent).")
def worker(run_dir: str, task: int, retry_permanent: bool) -> None:
    """Upload the files of one batch manifest (what each array task runs)."""
    from .upload.task import run_task

    sys.exit(run_task(Path(run_dir).resolve(), task, retry_permanent=retry_permanent))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
def collect(run_dir: str) -> None:
    """Merge the task results of RUN_DIR into summary.json and the job's ledger (what the
    collector job runs; run it by hand when a collector was killed or ran out of memory)."""
    from .collect import collect_run
    from .runrecord import RunReadError

    target = Path(run_dir).resolve()
    try:
        _, ledger_problem = collect_run(target)
    except RunReadError as exc:
        _fail(f"cannot collect: {exc}", Exit.USER)
    except OSError as exc:
        _fail(f"cannot collect {target}: {exc}", Exit.USER)
    if ledger_problem:   # summary.json is written; the ledger only saves a nightly some work
        click.echo(f"warning: the job's ledger was not updated ({ledger_problem}); the next "
                   "nightly will re-check these files with Rucio", err=True)
    _report(target)


@main.command("remake-manifests")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
def remake_manifests(run_dir: str) -> None:
    """Restore the manifests of RUN_DIR that are missing or were changed after planning,
    made again from the run's catalogue and job copy; each must match the digest run.json
    recorded at planning, or it is left as it is (exit 2)."""
    import hashlib

    from .files import atomic_write_bytes
    from .pipeline import remake_manifests as remake
    from .runrecord import RunLayout, manifest_problem

    target = Path(run_dir).resolve()
    run = _read_run_json(target)
    digests = RunRecord(run).manifest_sha256
    if not digests:
        _fail(f"{target}: planned by a dac-upload that recorded no manifest digests: its "
              "manifests cannot be checked or re-made; plan a new run", Exit.USER)
    bad = {t: why for t in range(RunRecord(run).tasks)
           if (why := manifest_problem(target, run, t))}
    if not bad:
        click.echo("every manifest is the one planned: nothing to do")
        return
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
                          "(a Butler source's metadata is only in the repository): plan a "
                          "new run for these files")
            continue
        atomic_write_bytes(RunLayout(target).manifest(t), data)
        click.echo(f"restored {RunLayout(target).manifest(t)} ({why})")
    if failed:
        _fail(failed, Exit.USER)
    click.echo(f"the manifests are as planned; next: dac-upload status {target}")


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
        click.echo(f"warning: no scheduler view ({exc}); states come from results only",
                   err=True)
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


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="One JSON document for scripts.")
def status(run_dir: str, as_json: bool) -> None:
    """What every array task of RUN_DIR has done, and the next command to run."""
    import json

    from .status import report

    target = Path(run_dir).resolve()
    doc, lines = report(*_run_status(target), str(target))
    if as_json:
        click.echo(json.dumps(doc, indent=1))
        return
    for line in lines:
        click.echo(line)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--force", is_flag=True,
              help="Submit even though tasks of the run are still pending or running.")
@click.option("--retry-permanent", is_flag=True,
              help="Also retry files that failed for a reason a person must fix (missing, "
                   "unreadable, conflict), once you have fixed it. A file that changed after "
                   "planning needs a new run (dac-upload submit JOB).")
@click.option("--wait", is_flag=True, help="Wait for the new collector and report.")
@click.option("--timeout", default=86400.0, show_default=True,
              help="Seconds to wait with --wait.")
@click.option("--offline", is_flag=True,
              help="Skip the Rucio checks (server, login, scope, RSE) before submitting.")
def resubmit(run_dir: str, force: bool, retry_permanent: bool, wait: bool,
             timeout: float, offline: bool) -> None:
    """Submit again only the tasks of RUN_DIR that are not complete; a new collector merges
    every attempt. Inside a task only the files not yet done are tried."""
    from . import slurm
    from .collect import COLLECTED
    from .pipeline import compress_indices, submit_collector
    from .status import ACTIVE_STATES, OUT_OF_RESOURCES, tasks_to_retry

    target = Path(run_dir).resolve()
    max_array = _max_array_size()
    max_submit = _run_setting(target, "max_submit")
    _check_run_credentials(target)
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
            click.echo(f"every task is over but the run is not collected "
                       f"({state.collection[1]}): submitting its collector")
            sub = _submission(target, lambda: submit_collector(target, slurm.submit))
        elif not retry:
            stuck = [t.task for t in tasks if not t.complete and t.permanent_only]
            if stuck:
                click.echo(f"nothing submitted: tasks {compress_indices(stuck)} have only "
                           "files that failed for a reason a person must fix (see dac-upload "
                           "status); fix them, then: dac-upload resubmit --retry-permanent "
                           f"{target}")
            elif job and job_state in ACTIVE_STATES:
                click.echo(f"nothing to resubmit: every task is over and its collector (job "
                           f"{job}) is {job_state}")
            else:
                click.echo("nothing to resubmit: every task is complete")
            return
        else:
            if not offline:
                _check_run_rucio(target, "resubmitted")
            sub = _submission(target, lambda: submit_tasks(
                target, retry, max_array, slurm.submit, max_submit, retry_permanent))
    _after_submit(target, sub, wait, timeout)


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--quiet", is_flag=True, help="Print only problems (everything still goes to "
              "the job's nightly.log).")
@click.option("--wait", is_flag=True, help="Wait for tonight's run and exit 1 if files failed.")
@click.option("--timeout", default=86400.0, show_default=True, help="Seconds to wait.")
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
    sys.exit(run_night(job, opts, say, preflight.job_problems))


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--probe", is_flag=True, help="Also upload one small file of our own to the RSE "
              "and read it back (left there with a 1 h rule; nothing is deleted).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of lines.")
def doctor(job_file: str, probe: bool, as_json: bool) -> None:
    """Check everything a run of JOB_FILE needs, one line each with the fix: the job file,
    Slurm (partition, account, time), the container or Python, the credentials, the Rucio
    server, scope, RSE and quota. Exit 1 if any check fails."""
    import json

    from .doctor import diagnose, failed

    checks = diagnose(job_file, probe=probe)
    if as_json:
        click.echo(json.dumps({"job_file": job_file, "ok": not failed(checks),
                               "checks": [c.as_dict() for c in checks]}, indent=2))
    else:
        for check in checks:
            click.echo(check.line())
        click.echo("all checks passed" if not failed(checks) else
                   f"{sum(c.status == 'FAIL' for c in checks)} check(s) failed")
    sys.exit(Exit.FAILURES if failed(checks) else 0)


@main.command("butler-table")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Where the tables go (default: RUN_DIR/butler-ingest).")
@click.option("--relative-to", metavar="URL",
              help="Write each file's URI relative to this prefix of its RSE URL; the "
                   "ingest command gets --prefix URL (replace it with the URL the "
                   "destination datastore reads, e.g. an s3:// endpoint).")
@click.option("--allow-missing", is_flag=True,
              help="Exit 0 even when files with datasets were not uploaded, uploaded "
                   "files match no [[butler.map]], or datasets were skipped when planning.")
@click.option("--overwrite", is_flag=True, help="Replace tables written before.")
def butler_table(run_dir: str, out_dir: str | None, relative_to: str | None,
                 allow_missing: bool, overwrite: bool) -> None:
    """Write ECSV tables for `butler ingest-files` from a collected run, and the commands.
    Exit 1 when files or datasets are left out (not uploaded, no data ID, skipped when
    planning), unless --allow-missing."""
    from .butler.ingest import ingest_tables
    from .butler.source import ButlerError
    from .files import read_json
    from .runrecord import RunLayout

    target = Path(run_dir).resolve()
    layout = RunLayout(target)
    if not layout.summary.exists():
        _fail(f"{target}: no summary.json yet; run: dac-upload collect {target}", Exit.USER)
    out = Path(out_dir).resolve() if out_dir else target / "butler-ingest"
    try:
        made = ingest_tables(read_json(layout.summary), target, out, relative_to, overwrite)
    except ButlerError as exc:
        _fail(exc.lines, Exit.USER)
    for t in made.tables:
        click.echo(f"table: {t.path} ({t.rows} files of {t.dataset_type} in {t.run})")
    if made.zips:
        click.echo(f"zips: {len(made.zips)} (butler ingest-zip)")
    if made.dimension_export:
        click.echo(f"dimension records: {made.dimension_export}")
    click.echo(f"commands ({made.script}, with HERE = its folder; run it as: sh "
               f"{made.script} DEST_REPO):")
    for line in made.commands:
        click.echo(f"  {line}")
    problems = [("files not uploaded", made.not_uploaded),
                ("files uploaded but matched by no [[butler.map]] (no data ID)",
                 made.not_matched),
                ("datasets left out when planning (skipped.jsonl)", made.skipped)]
    bad = False
    for what, items in problems:
        if items:
            bad = True
            click.echo(f"{len(items)} {what}:", err=True)
            for item in items[:20]:
                click.echo(f"  {item}", err=True)
            if len(items) > 20:
                click.echo(f"  ... and {len(items) - 20} more", err=True)
    if bad and not allow_missing:
        _fail("some files are not in the tables (above); resubmit or fix the maps, or pass "
              "--allow-missing to accept that", Exit.FAILURES)
