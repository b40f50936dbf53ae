"""Pure: what each array task of a run has done, and which tasks a resubmission must run.

The truth about "done" is the tasks' own result records and markers; the scheduler's view
(``sched``: task index -> Slurm state, possibly empty) only says which tasks are still pending
or running, or left the queue without a word.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .collect import COLLECTED, merge_records
from .runrecord import DONE_STATES, PERMANENT_CAUSES, RunRecord

OUT_OF_RESOURCES = ("OUT_OF_MEMORY", "TIMEOUT")   # a collector's end a resubmit would repeat
ACTIVE_STATES = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING",
                 "SUSPENDED", "SIGNALING", "STAGE_OUT")

# final states of a task that started (a CANCELLED one without records may never have run)
RAN_STATES = ("COMPLETED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
              "PREEMPTED", "DEADLINE")

# state -> what it means for the operator (docs/operations.md explains each)
MEANING = {
    "done": "every file uploaded or already present",
    "failed": "finished; some files failed",
    "running": "running now",
    "pending": "waiting in the queue",
    "died": "left the queue without finishing its result (killed, wall time, node failure)",
    "not started": "never ran (not submitted, or cancelled while pending)",
}


@dataclass
class TaskStatus:
    task: int
    state: str
    files: int
    files_done: int
    bytes: int
    bytes_done: int
    slurm_state: str | None
    causes: Counter = field(default_factory=Counter)
    permanent_only: bool = False   # every file still to do failed for a reason a person fixes
    log: str | None = None         # the Slurm output of its latest attempt, relative to the run
    # the files not done that have a record: {"name", "relpath", "cause", "error"}, in
    # manifest order (a file never tried has no record: its task says how many)
    not_done: list[dict[str, Any]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.files_done == self.files


def task_status(task: int, manifest: dict[str, Any], records: list[dict[str, Any]],
                marker: dict[str, Any] | None, slurm_state: str | None) -> TaskStatus:
    merged = merge_records(records)
    files = manifest["files"]
    done = [f for f in files if merged.get(f["name"], {}).get("status") in DONE_STATES]
    todo = [f for f in files if merged.get(f["name"], {}).get("status") not in DONE_STATES]
    causes = Counter((merged.get(f["name"]) or {}).get("cause") or "no record" for f in todo)
    permanent_only = bool(todo) and all(c in PERMANENT_CAUSES for c in causes)
    not_done = [file_line(merged[f["name"]]) for f in todo if f["name"] in merged]
    state = task_state(slurm_state, len(done) == len(files),
                       marker is not None and _marker_is_latest(marker, records),
                       bool(records))
    return TaskStatus(task=task, state=state, files=len(files), files_done=len(done),
                      bytes=sum(f["size"] for f in files),
                      bytes_done=sum(f["size"] for f in done), slurm_state=slurm_state,
                      causes=causes, permanent_only=permanent_only, not_done=not_done)


def file_line(record: dict[str, Any]) -> dict[str, Any]:
    """What status says of a file not done: its Rucio name, its path in the source, why."""
    return {"name": record["name"], "relpath": record.get("relpath"),
            "cause": record.get("cause") or record.get("status"), "error": record.get("error")}


def task_state(slurm_state: str | None, complete: bool, finished: bool,
               has_records: bool) -> str:
    """A task's state (MEANING) from the scheduler's state, whether all its files are
    done, whether its latest attempt finished (wrote the marker last), and whether any
    attempt wrote records (pure)."""
    if slurm_state in ACTIVE_STATES:
        return "running" if slurm_state != "PENDING" else "pending"
    if complete:
        return "done"
    if finished:
        return "failed"
    return "died" if has_records or slurm_state in RAN_STATES else "not started"


def _marker_is_latest(marker: dict[str, Any], records: list[dict[str, Any]]) -> bool:
    """A marker belongs to the last attempt that wrote records (else that attempt died)."""
    last = max((int(r.get("attempt") or 0) for r in records), default=0)
    return int(marker.get("attempt") or 0) >= last


def tasks_to_retry(tasks: list[TaskStatus], retry_permanent: bool = False) -> list[int]:
    """Tasks a resubmission runs: not done, not active, and with something worth retrying."""
    return [t.task for t in tasks
            if t.state in ("failed", "died", "not started")
            and (retry_permanent or not t.permanent_only)]


def next_command(tasks: list[TaskStatus], run_dir: str, collection: tuple[str, str] = ("", ""),
                 collector: tuple[str | None, str | None] = (None, None),
                 job_file: str | None = None, submitted: bool = True) -> str:
    """The one command to run next. ``collection`` is collect.collection_state's (state,
    why); ``collector`` the latest collector's (job id, Slurm state or None); ``job_file``
    the job's, for a file that needs a new run; ``submitted``: run.json records a
    submission."""
    if any(t.state in ("pending", "running") for t in tasks):
        return f"wait for the tasks, then: dac-upload status {run_dir}"
    if not submitted:
        return f"dac-upload submit --run {run_dir} (planned, never submitted)"
    if tasks_to_retry(tasks):
        return f"dac-upload resubmit {run_dir}"
    job, job_state = collector
    if job and job_state in ACTIVE_STATES:
        return f"wait for the collector (job {job}), then: dac-upload status {run_dir}"
    if collection[0] and collection[0] != COLLECTED:
        if job_state in OUT_OF_RESOURCES:   # the same job would stop the same way again
            return (f"dac-upload collect {run_dir} (the collector job {job} ended "
                    f"{job_state}: collect on this node, which is not held to its limits)")
        return (f"dac-upload resubmit {run_dir} (the run is not collected: {collection[1]}; "
                "it submits the collector)")
    if any(not t.complete for t in tasks):
        return CAUSE_NEXT["changed" if set(_causes(tasks)) <= {"changed"} else "missing"
                          ].format(run=run_dir, job=job_file or "JOB")
    return f"nothing: the run is complete ({run_dir}/summary.json)"


# the next command for the files of one cause, once the run's tasks are over
CAUSE_NEXT = {
    "changed": ("plan a new run for the files that changed after planning, once they are "
                "final: dac-upload submit {job} (this run's other files are done or listed)"),
    "missing": "fix the files listed, then: dac-upload resubmit --retry-permanent {run}",
    "unreadable": "fix the files listed, then: dac-upload resubmit --retry-permanent {run}",
    "conflict": ("a file of that name with other content is already in Rucio: rename it "
                 "([naming] prefix) in a new run, or if the Rucio copy is wrong, ask its "
                 "owner; then: dac-upload resubmit --retry-permanent {run}"),
    "archive": ("packed with a file that changed, vanished or cannot be read (listed under "
                "its own cause): once that is settled, plan a new run: dac-upload submit {job}"
                " (a new run packs them into a new archive)"),
}
TRANSIENT_NEXT = "dac-upload resubmit {run} (retries them)"


def _causes(tasks: list[TaskStatus]) -> Counter[str]:
    out: Counter[str] = Counter()
    for t in tasks:
        if not t.complete:
            out.update(t.causes)
    return out


def cause_next(cause: str, run_dir: str, job_file: str | None) -> str:
    """What to do about the files of one cause (pure)."""
    return CAUSE_NEXT.get(cause, TRANSIENT_NEXT).format(run=run_dir, job=job_file or "JOB")


def collector_line(collection: tuple[str, str],
                   collector: tuple[str | None, str | None]) -> str:
    """What status says of the run's summary and its latest collector."""
    job, state = collector
    where = (f"; collector job {job}: {state}" if job and state else
             f"; collector job {job}: gone from the queue" if job else "")
    if collection[0] == COLLECTED:
        return f"summary: up to date{where}"
    return f"summary: {collection[0]}: {collection[1]}{where}"


def format_table(tasks: list[TaskStatus]) -> str:
    from .progress import human_bytes

    lines = [f"{'task':>5}  {'state':<12} {'files done/all':<15}  {'bytes done/all':<21}  "
             "slurm / causes"]
    for t in tasks:
        causes = ", ".join(f"{c} {n}" for c, n in sorted(t.causes.items()))
        lines.append(f"{t.task:>5}  {t.state:<12} {t.files_done:>7}/{t.files:<7}  "
                     f"{human_bytes(t.bytes_done):>10}/{human_bytes(t.bytes):<10}  "
                     f"{t.slurm_state or '-'}" + (f"  {causes}" if causes else ""))
    return "\n".join(lines)


def as_json(tasks: list[TaskStatus]) -> list[dict[str, Any]]:
    return [{"task": t.task, "state": t.state, "files": t.files, "files_done": t.files_done,
             "bytes": t.bytes, "bytes_done": t.bytes_done, "slurm_state": t.slurm_state,
             "causes": dict(sorted(t.causes.items())), "permanent_only": t.permanent_only,
             "log": t.log}
            for t in tasks]


FILES_SHOWN = 3   # per cause, in the text of status (--json and the list file have all)


def not_done_files(tasks: list[TaskStatus]) -> list[dict[str, Any]]:
    """Every file not done that has a record, with its task, in task order."""
    return [{"task": t.task, **f} for t in tasks for f in t.not_done]


def files_lines(files: list[dict[str, Any]], run_dir: str, job_file: str | None,
                full_list: str | None) -> list[str]:
    """The files not done, by cause: how many, the first few with their error, and what
    to do about that cause; then where the full list is (pure)."""
    by_cause: dict[str, list[dict[str, Any]]] = {}
    for f in files:
        by_cause.setdefault(f["cause"] or "unknown", []).append(f)
    lines = []
    for cause, group in sorted(by_cause.items()):
        lines.append(f"{cause}: {len(group):,} file(s); next: "
                     f"{cause_next(cause, run_dir, job_file)}")
        for f in group[:FILES_SHOWN]:
            lines.append(f"  {f['relpath'] or f['name']} (task {f['task']}): {f['error']}")
        if len(group) > FILES_SHOWN:
            lines.append(f"  ... and {len(group) - FILES_SHOWN:,} more")
    if files and full_list:
        lines.append(f"every file not done: {full_list}")
    return lines


def report(state: Any, tasks: list[TaskStatus], run_dir: str, full_list: str | None = None
           ) -> tuple[dict[str, Any], list[str]]:
    """What ``dac-upload status`` says of a run (pure): the JSON document of ``--json`` and
    the lines it prints otherwise. ``state`` is collect.RunState; ``full_list`` where the
    caller wrote not_done_files (named in the text)."""
    causes: Counter[str] = Counter()
    for t in tasks:
        causes.update(t.causes)
    run = RunRecord(state.run)
    nxt = next_command(tasks, run_dir, state.collection, state.collector, run.job_file,
                       submitted=bool(run.submissions))
    unfinished = not_done_files(tasks)
    doc = {"run_dir": run_dir, "tasks": as_json(tasks), "causes": dict(sorted(causes.items())),
           "files_not_done": unfinished,
           "next_by_cause": {c: cause_next(c, run_dir, run.job_file)
                             for c in sorted({f["cause"] for f in unfinished})},
           "summary": {"state": state.collection[0], "why": state.collection[1],
                       "collector_job_id": state.collector[0],
                       "collector_slurm_state": state.collector[1]},
           "warnings": state.problems, "next": nxt}
    files = sum(t.files for t in tasks)
    done = sum(t.files_done for t in tasks)
    by_state = Counter(t.state for t in tasks)
    lines = [f"run {state.run['run_id']} ({state.run['job']['name']}): {done:,}/{files:,} "
             "files done; tasks: " + ", ".join(f"{n} {s}" for s, n in sorted(by_state.items())),
             format_table(tasks)]
    if causes:
        lines.append("not done, by cause: " + ", ".join(f"{c} {n}" for c, n in
                                                        sorted(causes.items())))
    lines += files_lines(unfinished, run_dir, run.job_file, full_list)
    lines += [f"task {t.task} log: {run_dir}/{t.log}" for t in tasks
              if t.state in ("failed", "died") and t.log]
    lines.append(collector_line(state.collection, state.collector))
    lines += [f"warning: {problem}" for problem in state.problems]
    lines += [f"  {s}: {MEANING[s]}" for s in sorted(by_state)]
    lines.append(f"next: {nxt}")
    return doc, lines
