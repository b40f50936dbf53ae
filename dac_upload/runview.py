"""A run as it stands: its directory's records plus the scheduler's view -> task statuses.

Shared by ``status``, ``resubmit`` and ``nightly``; raises SlurmError when the scheduler
cannot be asked (callers decide whether they can do without it).
"""

from __future__ import annotations

from pathlib import Path

from . import slurm
from .collect import RunState, read_run
from .status import TaskStatus, task_status


def run_view(run_dir: Path, scheduler: bool = True) -> tuple[RunState, list[TaskStatus]]:
    state = read_run(run_dir)
    arrays = [a for s in state.run.get("submissions", []) for a in s.get("arrays", [])]
    known = slurm.array_states([a["job_id"] for a in arrays]) if scheduler else {}
    sched: dict[int, str] = {}
    logs: dict[int, str] = {}
    for a in arrays:  # later submissions override earlier ones
        for local in slurm.expand_indices(a["task_ids"]):
            logs[a["offset"] + local] = f"logs/job{a['job_id']}.index{local}.out"
        for (array, index), st in known.items():
            if array == a["job_id"]:
                sched[a["offset"] + index] = st
    subs = state.run.get("submissions", [])
    collector = subs[-1].get("collector_job_id") if subs else None
    if collector and scheduler:
        state.collector = (collector, slurm.job_state(collector))
    elif collector:
        state.collector = (collector, None)
    tasks = [task_status(t, state.manifests[t], state.results.get(t, []),
                         state.markers.get(t), sched.get(t)) for t in sorted(state.manifests)]
    for t in tasks:
        t.log = logs.get(t.task)
    return state, tasks
