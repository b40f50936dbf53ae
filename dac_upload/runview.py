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
    state = task_state(slurm_state, index["files_done"] == index["files"], True, True)
    return TaskStatus(task=task, state=state, files=index["files"],
                      files_done=index["files_done"], bytes=index["bytes"],
                      bytes_done=index["bytes_done"], slurm_state=slurm_state,
                      causes=Counter(index["causes"]),
                      permanent_only=bool(index["permanent_only"]))


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
