"""A run as it stands: its directory's records plus the scheduler's view -> task statuses.

Shared by ``status``, ``resubmit`` and ``nightly``; raises SlurmError when the scheduler
cannot be asked (callers decide whether they can do without it).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from . import slurm
from .collect import RunState, read_run
from .runrecord import RunLayout, RunRecord
from .status import TaskStatus, task_state, task_status


def _indexed(task: int, marker: dict[str, Any] | None, slurm_state: str | None,
             run_dir: Path) -> TaskStatus | None:
    """The task's status from its marker's index (upload.task.task_index), without reading its
    manifest or records; None when there is none, or when the results file has grown since
    (a later attempt wrote records, then died): the caller reads them."""
    index = (marker or {}).get("index")
    if not isinstance(index, dict):
        return None
    result = RunLayout(run_dir).result(task)
    size = result.stat().st_size if result.exists() else 0
    if size != index.get("results_bytes"):
        return None
    if "not_done" not in index and index["files_done"] != index["files"]:
        return None   # a marker of an earlier version: the records name the files
    state = task_state(slurm_state, index["files_done"] == index["files"], True, True)
    return TaskStatus(task=task, state=state, files=index["files"],
                      files_done=index["files_done"], bytes=index["bytes"],
                      bytes_done=index["bytes_done"], slurm_state=slurm_state,
                      causes=Counter(index["causes"]),
                      permanent_only=bool(index["permanent_only"]),
                      not_done=list(index.get("not_done", [])))


def _untouched(task: int, plan: dict[str, Any], marker: dict[str, Any] | None,
               slurm_state: str | None, run_dir: Path) -> TaskStatus | None:
    """A task with no marker and no records: its counts from run.json (plan.task_files and
    task_bytes), without reading its manifest; None for runs planned before they existed."""
    files, nbytes = plan.get("task_files"), plan.get("task_bytes")
    if marker is not None or files is None or nbytes is None or task >= len(files) \
            or RunLayout(run_dir).result(task).exists():
        return None
    state = task_state(slurm_state, files[task] == 0, False, False)
    return TaskStatus(task=task, state=state, files=files[task], files_done=0,
                      bytes=nbytes[task], bytes_done=0, slurm_state=slurm_state,
                      causes=Counter({"no record": files[task]}) if files[task] else Counter())


def run_view(run_dir: Path, scheduler: bool = True) -> tuple[RunState, list[TaskStatus]]:
    state = read_run(run_dir, datasets=False)
    subs = RunRecord(state.run).submissions
    arrays = [a for s in subs for a in s.get("arrays", [])]
    known = slurm.array_states([a["job_id"] for a in arrays]) if scheduler else {}
    sched: dict[int, str] = {}
    logs: dict[int, str] = {}
    for a in arrays:  # later submissions override earlier ones
        for local in slurm.expand_indices(a["task_ids"]):
            logs[a["offset"] + local] = f"logs/job{a['job_id']}.index{local}.out"
        for (array, index), st in known.items():
            if array == a["job_id"]:
                sched[a["offset"] + index] = st
    collector = subs[-1].get("collector_job_id") if subs else None
    if collector and scheduler:
        state.collector = (collector, slurm.job_state(collector))
    elif collector:
        state.collector = (collector, None)
    plan = state.run["plan"]
    tasks = [_indexed(t, state.markers.get(t), sched.get(t), run_dir)
             or _untouched(t, plan, state.markers.get(t), sched.get(t), run_dir)
             or task_status(t, state.manifests[t], state.results.get(t, []),
                            state.markers.get(t), sched.get(t)) for t in state.manifests]
    for t in tasks:
        t.log = logs.get(t.task)
    return state, tasks


def run_state(run_dir: Path, run: dict[str, Any], scheduler: bool = True) -> str:
    """One word or phrase for ``dac-upload runs``: planned, queued, running, complete,
    collected with N failed, not collected, or submitted (without the scheduler's view).
    The scheduler is asked only about runs submitted and not collected."""
    from .collect import COLLECTED, collected_counts, collection_state
    from .status import ACTIVE_STATES

    rec = RunRecord(run)
    subs = rec.submissions
    if not subs:
        return "planned"
    state, _ = collection_state(run_dir, run)
    if state == COLLECTED:
        try:
            done = collected_counts(run_dir)
        except (OSError, ValueError):
            done = {}
        if done.get("complete"):
            return "complete"
        failed = (done.get("counts") or {}).get("failed")
        return f"collected, {failed:,} failed" if isinstance(failed, int) else "collected"
    if not scheduler:
        return "submitted"
    arrays = [a["job_id"] for s in subs for a in s.get("arrays", [])]
    states = set(slurm.array_states(arrays).values()) if arrays else set()
    collector = subs[-1].get("collector_job_id")
    collector_state = slurm.job_state(collector) if collector else None
    if "RUNNING" in states:
        return "running"
    if "PENDING" in states:
        return "queued"
    if collector_state in ACTIVE_STATES:
        return "collecting"
    return "not collected"


def runs_overview(runs_dir: Path, scheduler: bool = True) -> list[dict[str, Any]]:
    """``dac-upload runs``: each run of a runs folder, oldest first, from its run.json (and
    collected.json), without reading manifests or results. A run.json that cannot be read
    is listed with the reason, not skipped."""
    from .runrecord import RunReadError, read_run_json, run_dirs

    rows = []
    for run_dir in run_dirs(runs_dir):
        try:
            run = read_run_json(run_dir)
        except RunReadError as exc:
            rows.append({"run_id": run_dir.name, "run_dir": str(run_dir), "created_at": None,
                         "state": "unreadable", "why": str(exc), "files": None,
                         "bytes": None, "tasks": None, "submissions": None})
            continue
        rec = RunRecord(run)
        rows.append({"run_id": rec.run_id, "run_dir": str(run_dir),
                     "created_at": rec.created_at,
                     "state": run_state(run_dir, run, scheduler), "files": rec.files,
                     "bytes": rec.bytes, "tasks": rec.tasks_planned,
                     "submissions": len(rec.submissions)})
    return rows
