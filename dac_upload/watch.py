"""A run while it goes, for ``submit --wait``: cheap enough to ask every 2 s of a run of
millions of files. Each task's results file is read from where the last poll stopped (only
the complete lines appended since), totals come from run.json's plan, task states from the
tasks' markers and, every ``scheduler_every`` seconds, from the scheduler (slurm.py).
Memory is O(tasks): done files are counted per task, never remembered by name."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .runrecord import DONE_STATES, FAILED, RunLayout, RunRecord, read_run_json

SchedulerView = Callable[[list[str]], dict[tuple[str, int], str]]


@dataclass(frozen=True)
class Snapshot:
    """What the display shows, at monotonic time ``at``."""

    at: float
    files_total: int
    bytes_total: int
    files_done: int
    bytes_done: int
    files_failed: int
    tasks: dict[str, int] = field(default_factory=dict)   # running, pending, done, ...
    tasks_total: int = 0


class _TaskFile:
    """One task's results file, read incrementally: its offset and its counts so far."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.done = 0
        self.done_bytes = 0
        self.failed = 0

    def read_new(self) -> None:
        try:
            size = self.path.stat().st_size
        except OSError:
            return
        if size <= self.offset:
            return
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read(size - self.offset)
        end = chunk.rfind(b"\n") + 1      # a line still being written waits for the next poll
        for line in chunk[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:            # a torn line: collect and status name it
                continue
            if not isinstance(rec, dict):
                continue
            if rec.get("status") in DONE_STATES:
                self.done += 1
                self.done_bytes += int(rec.get("bytes") or 0)
            elif rec.get("status") == FAILED:
                self.failed += 1
        self.offset += end


class RunWatcher:
    """``poll()`` -> Snapshot of the run in ``run_dir``. ``scheduler`` is
    slurm.array_states (None: markers only)."""

    def __init__(self, run_dir: Path, scheduler: SchedulerView | None = None,
                 scheduler_every: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.layout = RunLayout(run_dir)
        self.clock = clock
        self.scheduler = scheduler
        self.scheduler_every = scheduler_every
        self._asked = -1e18
        self._sched: dict[int, str] = {}
        run = RunRecord(read_run_json(run_dir))
        plan = run.doc.get("plan") or {}
        self.tasks = run.tasks
        self.task_files: list[int] = list(plan.get("task_files") or [0] * self.tasks)
        self.task_bytes: list[int] = list(plan.get("task_bytes") or [0] * self.tasks)
        self.files_total = int(run.files if run.files is not None else sum(self.task_files))
        self.bytes_total = int(run.bytes if run.bytes is not None else sum(self.task_bytes))
        self.results = {t: _TaskFile(self.layout.result(t)) for t in range(self.tasks)}

    def _arrays(self) -> list[dict[str, Any]]:
        return [a for s in RunRecord(read_run_json(self.layout.dir)).submissions
                for a in s.get("arrays", [])]

    def _scheduler_states(self, now: float) -> dict[int, str]:
        """Task -> Slurm state, asked at most every ``scheduler_every`` s; the last answer
        is kept when Slurm does not answer (the display must not stop a --wait)."""
        from . import slurm

        if self.scheduler is None or now - self._asked < self.scheduler_every:
            return self._sched
        self._asked = now
        try:
            arrays = self._arrays()
            known = self.scheduler([a["job_id"] for a in arrays]) if arrays else {}
        except (slurm.SlurmError, OSError, ValueError):
            return self._sched
        sched: dict[int, str] = {}
        for a in arrays:   # later submissions override earlier ones
            for (array, index), state in known.items():
                if array == a["job_id"]:
                    sched[a["offset"] + index] = state
        self._sched = sched
        return sched

    def _task_state(self, task: int, sched: dict[int, str]) -> str:
        from .status import ACTIVE_STATES

        state = sched.get(task)
        files = self.task_files[task] if task < len(self.task_files) else 0
        tf = self.results[task]
        if min(tf.done, files) >= files:   # the results are fresher than the scheduler's
            return "done"                  # answer, which is asked only now and then
        if state in ACTIVE_STATES:
            started = tf.offset > 0
            return "pending" if state == "PENDING" and not started else "running"
        try:
            marker = json.loads(self.layout.done_marker(task).read_text())
        except (OSError, ValueError):
            marker = None
        if isinstance(marker, dict):
            return "failed"
        return "died" if state is not None else "waiting"

    def poll(self) -> Snapshot:
        now = self.clock()
        sched = self._scheduler_states(now)
        done = done_bytes = failed = 0
        states: Counter[str] = Counter()
        for t, tf in self.results.items():
            tf.read_new()
            cap = self.task_files[t] if t < len(self.task_files) else tf.done
            done += min(tf.done, cap)
            done_bytes += min(tf.done_bytes, self.task_bytes[t]) \
                if t < len(self.task_bytes) else tf.done_bytes
            failed += tf.failed
            states[self._task_state(t, sched)] += 1
        return Snapshot(at=now, files_total=self.files_total, bytes_total=self.bytes_total,
                        files_done=done, bytes_done=done_bytes, files_failed=failed,
                        tasks=dict(states), tasks_total=self.tasks)
