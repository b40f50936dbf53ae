"""Nightly incremental runs: ledger + lock -> at most one new run of a job per night.

Order of a night: take the job's lock (exit LOCKED if another night holds it); check that
the credentials outlive the job's time limit (CREDENTIALS); look at the newest submitted run
(exit STILL_GOING while its tasks or collector are queued; resubmit its retryable tasks and
stop there for tonight, giving up on a task once it has run 1 + ``max_resubmits`` times);
catalogue only files new or changed since the ledger; submit a run for them (or nothing);
release the lock, then wait with --wait. Files the ledger marks as needing a person
(conflicts, unreadable, ...) are reported every night, with exit NEEDS_PERSON, until fixed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import JobConfig, slurm_time_seconds
from .errors import Exit
from .files import utc_now
from .locks import JobLock, LockError, run_submission_lock
from .rucio.errors import RucioUnavailable
from .runrecord import (
    DONE_STATES,
    PERMANENT_CAUSES,
    RunLayout,
    RunReadError,
    RunRecord,
    read_run_json,
    run_dirs,
)


@contextlib.contextmanager
def job_lock(job: JobConfig, break_stale: bool = False, mode: str | None = None,
             stale_after: float = 86400) -> Iterator[JobLock]:
    job.runs_dir.mkdir(parents=True, exist_ok=True)
    lock = JobLock(job.runs_dir, mode or os.environ.get("DAC_UPLOAD_LOCK", "auto"), stale_after,
                   name="nightly")
    lock.acquire(break_stale)
    try:
        yield lock
    finally:
        lock.release()


def latest_run(job: JobConfig) -> Path | None:
    """The newest run of the job that was submitted (run ids start with their UTC time; a
    run only planned, never submitted, is nobody's previous run)."""
    for run_dir in reversed(run_dirs(job.runs_dir)):
        if read_run_json(run_dir).get("submissions"):   # a damaged one: RunReadError
            return run_dir
    return None


def credentials_problem(job: JobConfig) -> str | None:
    """One line if the job's credentials are unusable (missing, readable by others, expired)
    or will not outlive the job's time limit (plus the time the array may wait in the
    queue, which we cannot know): a night that would fail anyway is not started."""
    from .rucio.credentials import CredentialsError, expiry_warning, local_problems, resolve

    try:
        creds = resolve(job.rucio, os.environ, os.getuid(), str(job.path))
    except CredentialsError as exc:
        return exc.lines[0]
    problems = local_problems(creds)
    if problems:
        return problems[0]
    return expiry_warning(creds, slurm_time_seconds(job.slurm.time),
                          f"the job's time limit of {job.slurm.time}")


def describe_needs_person(rows: list[tuple[str, str]], limit: int = 10) -> list[str]:
    lines = [f"needs a person: {rel} ({status.split(':', 1)[1]})" for rel, status in
             rows[:limit]]
    if len(rows) > limit:
        lines.append(f"needs a person: ... and {len(rows) - limit} more (see the ledger)")
    return lines


class Reporter:
    """Everything goes to the job's nightly.log; the terminal (or cron's mail) gets it too,
    except with --quiet, when only problems are shown."""

    def __init__(self, log_path: Path, quiet: bool) -> None:
        self.log_path = log_path
        self.quiet = quiet

    def __call__(self, message: str, problem: bool = False) -> None:
        stamp = utc_now()
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"{stamp} {'PROBLEM ' if problem else ''}{message}\n")
        if problem or not self.quiet:
            import click

            click.echo(("problem: " if problem else "") + message, err=problem)


@dataclass(frozen=True)
class NightOptions:
    full: bool = False            # ignore the ledger: every matching file (Rucio decides)
    wait: bool = False
    timeout: float = 86400.0
    break_stale_lock: bool = False
    max_resubmits: int = 3        # per task: a permanently broken task cannot loop forever
    offline: bool = False


def run_night(job: JobConfig, opts: NightOptions, say: Reporter,
              preflight: Any = None, script_check: Any = None) -> int:
    """One night for one job; returns the exit code (see the constants above). The lock is
    held while deciding and submitting, not while waiting (--wait): a later night then sees
    the run going and exits STILL_GOING."""
    from .ledger import LedgerError

    lock_mode = os.environ.get("DAC_UPLOAD_LOCK", "auto")
    if lock_mode not in ("auto", "flock", "soft"):
        say(f"DAC_UPLOAD_LOCK={lock_mode!r}: use auto, flock or soft", problem=True)
        return Exit.USER
    try:
        with job_lock(job, opts.break_stale_lock, lock_mode) as lock:
            for note in lock.notes:
                say(note)
            code, waiting = _night(job, opts, say, preflight, script_check)
            stuck = _still_needing_a_person(job)
    except LockError as exc:
        say(str(exc), problem=True)
        return Exit.LOCKED
    except LedgerError as exc:
        say(str(exc), problem=True)
        return Exit.USER
    if waiting is not None:
        code = _wait(*waiting, opts, say)
        stuck = _still_needing_a_person(job, forget=False)  # no lock held: read only
    for line in describe_needs_person(stuck):
        say(line, problem=True)
    return Exit.NEEDS_PERSON if stuck and code == Exit.OK else code


def _source_root(job: JobConfig) -> Path:
    """Where the ledger's paths are relative to: [source] root, or for a Butler source the
    datastore root its latest run recorded (opening the repository just for this would cost
    seconds every night)."""
    if job.butler.kind != "repo":
        return job.source.root

    for run_json in sorted(job.runs_dir.glob("2*/run.json"), reverse=True):
        try:
            return RunRecord.read(run_json.parent).root
        except (OSError, ValueError, KeyError):
            continue
    return job.source.root


def _still_needing_a_person(job: JobConfig, forget: bool = True) -> list[tuple[str, str]]:
    """Ledger rows that need a person, after forgetting those whose file is gone or is no
    longer selected by the job (deleting or excluding a file is a fix too)."""
    from .ledger import Ledger
    from .naming import matches_any

    if not job.ledger_path.exists():
        return []
    root = _source_root(job)
    with Ledger(job.ledger_path) as ledger:
        rows = ledger.needs_person()
        gone = [rel for rel, _ in rows
                if not (root / rel).exists()
                or not matches_any(rel, job.source.include)
                or matches_any(rel, job.source.exclude)]
        if forget:
            ledger.forget(gone)
    return [row for row in rows if row[0] not in set(gone)]


def _night(job: JobConfig, opts: NightOptions, say: Reporter,
           preflight: Any, script_check: Any = None
           ) -> tuple[int, tuple[str, Path] | None]:
    """(exit code, (collector, run dir) to wait for with --wait)."""
    from . import slurm
    from .ledger import Ledger, UnchangedFilter
    from .pipeline import (
        CollectorNotSubmitted,
        NothingToUpload,
        PlanError,
        prepare_run,
        submit_run,
    )

    problem = credentials_problem(job)   # before anything is submitted, resubmissions too,
    if problem:                          # and before Slurm: named even with slurmctld down
        say(problem, problem=True)
        return Exit.CREDENTIALS, None
    try:
        max_array = slurm.max_array_size()
    except slurm.SlurmError as exc:
        say(str(exc), problem=True)
        return Exit.SERVICE, None
    try:
        previous = latest_run(job)
        going = _older_run_going(job, previous)
        if going is not None:
            say(f"the earlier run {going.name} still has tasks queued: not starting another "
                "tonight")
            return Exit.STILL_GOING, None
        ended = (_previous_run(job, previous, opts, say, max_array,
                               None if opts.offline else preflight) if previous else None)
    except slurm.SlurmError as exc:
        say(f"cannot ask Slurm about the job's runs: {exc}", problem=True)
        return Exit.SERVICE, None
    except (OSError, ValueError, KeyError) as exc:   # RunReadError names the file
        say(f"cannot read a run of this job: {exc}; nothing new is planned until it is "
            "repaired or moved out of the runs folder", problem=True)
        return Exit.USER, None
    if ended is not None:
        return ended
    ledger = None if opts.full else Ledger(job.ledger_path)
    keep = UnchangedFilter(ledger) if ledger else None
    try:
        prep = prepare_run(job, preflight=None if opts.offline else preflight, keep=keep,
                           origin="nightly", script_check=script_check)
    except NothingToUpload:
        say(f"nothing new under {job.source.root}"
            + (f" ({keep.unchanged:,} files unchanged since the ledger)" if keep else ""))
        return Exit.OK, None
    except PlanError as exc:
        for line in exc.lines:
            say(line, problem=True)
        return Exit.USER, None
    except RucioUnavailable as exc:
        say(str(exc), problem=True)
        return Exit.SERVICE, None
    finally:
        if ledger is not None:
            ledger.close()
    say(f"run {prep.run_id}: {prep.files:,} new or changed files "
        + (f"({keep.unchanged:,} unchanged) " if keep else "") + f"in {len(prep.batches)} "
        f"tasks: {prep.layout.dir}")
    for note in prep.notes:   # what plan prints too (Butler datasets without records, ...)
        say(f"note: {note}")
    try:
        sub = submit_run(prep.layout.dir, max_array, slurm.submit, job.slurm.max_submit)
    except (slurm.SlurmError, PlanError, CollectorNotSubmitted) as exc:
        say(f"submission failed: {exc}", problem=True)
        return Exit.SERVICE, None
    say(f"submitted array job(s) {', '.join(a['job_id'] for a in sub.arrays)} and collector "
        f"{sub.collector_job_id}")
    return Exit.OK, ((sub.collector_job_id, prep.layout.dir) if opts.wait else None)


def _wait(collector: str, run_dir: Path, opts: NightOptions, say: Reporter) -> int:
    from . import slurm

    try:
        slurm.wait_until_gone(collector, opts.timeout, poll=2.0)
    except slurm.SlurmError as exc:
        say(str(exc), problem=True)
        return Exit.SERVICE
    from .collect import COLLECTED, collected_counts, collection_state

    summary_path = run_dir / "summary.json"
    done, why = collection_state(run_dir, read_run_json(run_dir))
    if done != COLLECTED:
        say(f"the collector of {run_dir.name} did not finish ({why}); the next night "
            "collects it again", problem=True)
        return Exit.FAILURES
    s = collected_counts(run_dir)
    c = s["counts"]
    say(f"{summary_path}: {c['uploaded']} uploaded, {c['already_present']} already present,"
        f" {c['failed']} failed, {c['not_attempted']} not attempted",
        problem=not s["complete"])
    return Exit.OK if s["complete"] else Exit.FAILURES


def _older_run_going(job: JobConfig, latest: Path | None) -> Path | None:
    """An older run (not the latest submitted one) that still has tasks queued: a run can
    be planned before another and submitted after it, or be resubmitted by hand."""
    from .runview import run_view

    for run_dir in sorted(job.runs_dir.iterdir()) if job.runs_dir.is_dir() else []:
        if run_dir == latest or not (run_dir / "run.json").is_file():
            continue
        with contextlib.suppress(OSError, ValueError):   # a few lines, not the summary
            if json.loads(RunLayout(run_dir).collected.read_text()).get("complete"):
                continue  # complete runs never go again by themselves
        with contextlib.suppress(OSError, ValueError):
            if not json.loads((run_dir / "run.json").read_text()).get("submissions"):
                continue
        try:
            _, tasks = run_view(run_dir)
        except (OSError, ValueError, KeyError) as exc:
            raise OSError(f"{run_dir}: {exc}") from exc  # name the damaged run
        if any(t.state in ("pending", "running") for t in tasks):
            return run_dir
    return None


def _previous_run(job: JobConfig, run_dir: Path, opts: NightOptions, say: Reporter,
                  max_array: int, preflight: Any = None
                  ) -> tuple[int, tuple[str, Path] | None] | None:
    """(exit code, what to wait for) if tonight ends with the previous run (still going, or
    resubmitted); None if tonight goes on to new files. Raises SlurmError without the
    scheduler's view (a running task must not be started twice)."""
    try:
        with run_submission_lock(run_dir):  # nobody resubmits this run while we judge it
            return _judge_previous_run(job, run_dir, opts, say, max_array, preflight)
    except LockError as exc:
        say(f"the previous run {run_dir.name} is being submitted by someone else ({exc}): "
            "not starting another tonight")
        return Exit.STILL_GOING, None


def _judge_previous_run(job: JobConfig, run_dir: Path, opts: NightOptions, say: Reporter,
                        max_array: int, preflight: Any = None
                        ) -> tuple[int, tuple[str, Path] | None] | None:
    from . import slurm
    from .collect import COLLECTED, collect_run
    from .pipeline import CollectorNotSubmitted, compress_indices, submit_collector, submit_tasks
    from .runview import run_view
    from .status import ACTIVE_STATES, OUT_OF_RESOURCES, tasks_to_retry

    state, tasks = run_view(run_dir)
    run = state.run
    active = [t.task for t in tasks if t.state in ("pending", "running")]
    if active:
        say(f"the previous run {run_dir.name} still has tasks {compress_indices(active)} "
            "pending or running: not starting another tonight")
        return Exit.STILL_GOING, None
    collector = run["submissions"][-1].get("collector_job_id")
    if collector and set(slurm.queue_states([collector]).values()) & set(ACTIVE_STATES):
        say(f"the previous run {run_dir.name} is still being collected (job {collector}): "
            "not starting another tonight")
        return Exit.STILL_GOING, None
    retry = tasks_to_retry(tasks)
    # a task submitted 1 + max_resubmits times is given up (counted from run.json, so a task
    # that dies before writing a record counts too); one held back by max_submit is not
    submitted: Counter = Counter(
        a["offset"] + i for s in state.run["submissions"] for a in s.get("arrays", [])
        for i in slurm.expand_indices(a["task_ids"]))
    ran = {t: submitted[t] for t in retry}
    give_up = [t for t in retry if ran[t] > opts.max_resubmits]
    if give_up:
        _give_up(job, run_dir, state, give_up, say)
    retry = [t for t in retry if t not in give_up]
    if not retry and state.collection[0] != COLLECTED \
            and state.collector[1] in OUT_OF_RESOURCES:
        # a collector job that ran out of memory or time would again: collect it here
        say(f"the previous run {run_dir.name} is not collected: its collector (job "
            f"{state.collector[0]}) ended {state.collector[1]}; collecting it here")
        try:
            _, ledger_problem = collect_run(run_dir)
        except (RunReadError, OSError) as exc:
            say(f"collecting the previous run {run_dir.name} failed: {exc}; fix it, then: "
                f"dac-upload collect {run_dir}", problem=True)
            return Exit.SERVICE, None
        if ledger_problem:
            say(f"the ledger was not updated from {run_dir.name} ({ledger_problem})",
                problem=True)
        return None
    if not retry and state.collection[0] != COLLECTED:
        # its files are in no up-to-date summary, and maybe not in the ledger: collect it
        # before anything new is planned (else they would be looked up and planned again)
        try:
            sub = submit_collector(run_dir, slurm.submit)
        except slurm.SlurmError as exc:
            say(f"the previous run {run_dir.name} is not collected ({state.collection[1]}); "
                f"submitting its collector failed: {exc}", problem=True)
            return Exit.SERVICE, None
        say(f"the previous run {run_dir.name} is not collected ({state.collection[1]}): "
            f"collector resubmitted (job {sub.collector_job_id}); new files wait for the "
            "next night", problem=True)
        return Exit.OK, ((sub.collector_job_id, run_dir) if opts.wait else None)
    if not retry:
        return None
    refused = _rucio_refuses(job, preflight, say, f"resubmitting tasks "
                             f"{compress_indices(retry)} of the previous run {run_dir.name}")
    if refused is not None:
        return refused, None
    try:
        sub = submit_tasks(run_dir, retry, max_array, slurm.submit, job.slurm.max_submit)
    except (slurm.SlurmError, CollectorNotSubmitted) as exc:
        say(f"resubmitting tasks {compress_indices(retry)} of the previous run "
            f"{run_dir.name} failed: {exc}", problem=True)
        return Exit.SERVICE, None
    say(f"the previous run {run_dir.name} had unfinished tasks {compress_indices(retry)}: "
        f"resubmitted (attempt {sub.attempt}; a task is given up after "
        f"{opts.max_resubmits + 1} runs); new files wait for the next night", problem=True)
    return Exit.OK, ((sub.collector_job_id, run_dir) if opts.wait else None)


def _rucio_refuses(job: JobConfig, preflight: Any, say: Reporter, what: str) -> int | None:
    """The exit code if the Rucio server is down or refuses the job's credentials, scope or
    RSE (said first), else None: a resubmission that can only fail spends one of the
    task's allowed runs for nothing."""
    if preflight is None:
        return None
    from .rucio.credentials import CredentialsError, resolve

    try:
        problems = preflight(job, resolve(job.rucio, os.environ, os.getuid(), str(job.path)))
    except CredentialsError as exc:
        problems = exc.lines
    except RucioUnavailable as exc:
        say(f"not {what}: {exc}", problem=True)
        return Exit.SERVICE
    for line in problems:
        say(f"not {what}: {line}", problem=True)
    return Exit.USER if problems else None


def _give_up(job: JobConfig, run_dir: Path, state: Any, tasks: list[int],
             say: Reporter) -> None:
    """After the last allowed resubmission: the files still not done go into the ledger as
    needing a person, so the next runs do not pick them up again while unchanged."""
    from .collect import merge_records
    from .ledger import Ledger

    rows = []
    for t in tasks:
        merged = merge_records(state.results.get(t, []))
        for entry in state.manifests[t]["files"]:
            rec = merged.get(entry["name"])
            if rec is not None and (rec.get("status") in DONE_STATES
                                    or rec.get("cause") in PERMANENT_CAUSES):
                continue  # done, or already in the ledger with its own cause
            rows.append({"relpath": entry["relpath"], "size": entry["size"],
                         "mtime": entry["mtime"], "name": entry["name"],
                         "status": "failed:gave-up"})
    with Ledger(job.ledger_path) as ledger:
        ledger.record(rows, RunRecord(state.run).run_id)
    say(f"gave up on {len(rows)} files of tasks {tasks} of run {run_dir.name}: they are "
        "retried when they change (or after fixing: dac-upload resubmit --retry-permanent)",
        problem=True)
