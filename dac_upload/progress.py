"""Progress for long operations: the walk's line (a terminal only, rate-limited), planning's
stages, and ``--wait``'s display (rich on a terminal, timestamped lines elsewhere)."""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Any, Callable, TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


class Progress:
    """``files, bytes, rate`` on one rewritten line of a terminal; silent when not a TTY."""

    def __init__(self, label: str, stream: TextIO | None = None, interval: float = 0.5) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval
        self.start = time.monotonic()
        self._last = 0.0
        self.files = 0
        self.bytes = 0

    def update(self, files: int, nbytes: int) -> None:
        self.files, self.bytes = files, nbytes
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._write(now)

    def _write(self, now: float, end: str = "") -> None:
        elapsed = max(now - self.start, 1e-9)
        self.stream.write(f"\r{self.label}: {self.files:,} files, {human_bytes(self.bytes)}, "
                          f"{self.files / elapsed:,.0f} files/s{end}")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled:
            self._write(time.monotonic(), end="\n")

    def stage(self, what: str) -> None:
        """One line for a step after the walk (writing manifests, asking Rucio): the
        seconds it takes are then not silent. Terminal only, like the rest."""
        if self.enabled:
            self.stream.write(f"{what} ...\n")
            self.stream.flush()


def _clock_text(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Rate:
    """Files/s and bytes/s over the last ``window`` seconds (not since the start: a run
    that waited an hour in the queue is not slow once it runs), and the ETA they give."""

    def __init__(self, window: float = 60.0) -> None:
        self.window = window
        self.points: deque[tuple[float, int, int]] = deque()

    def add(self, at: float, files: int, nbytes: int) -> None:
        self.points.append((at, files, nbytes))
        while len(self.points) > 2 and at - self.points[0][0] > self.window:
            self.points.popleft()

    def per_second(self) -> tuple[float, float]:
        if len(self.points) < 2:
            return 0.0, 0.0
        (t0, f0, b0), (t1, f1, b1) = self.points[0], self.points[-1]
        span = t1 - t0
        return ((f1 - f0) / span, (b1 - b0) / span) if span > 0 else (0.0, 0.0)

    def eta(self, files_left: int, bytes_left: int) -> float | None:
        """Seconds left by the slower of the two measures; None before anything moved."""
        fps, bps = self.per_second()
        guesses = [left / r for left, r in ((files_left, fps), (bytes_left, bps)) if r > 0]
        if not files_left and not bytes_left:
            return 0.0
        return max(guesses) if guesses else None


TASK_ORDER = ("running", "pending", "waiting", "done", "failed", "died")


def wait_line(snap: Any, rate: Rate) -> str:
    """One line of what a --wait sees (pure): files and bytes done of total with %, the
    recent rate, the ETA and the tasks by state."""
    pct = 100.0 * snap.bytes_done / snap.bytes_total if snap.bytes_total else (
        100.0 * snap.files_done / snap.files_total if snap.files_total else 100.0)
    fps, bps = rate.per_second()
    eta = rate.eta(snap.files_total - snap.files_done, snap.bytes_total - snap.bytes_done)
    tasks = ", ".join(f"{snap.tasks[s]} {s}" for s in TASK_ORDER if snap.tasks.get(s))
    return (f"uploading: {snap.files_done:,}/{snap.files_total:,} files ({pct:.1f} %), "
            f"{human_bytes(snap.bytes_done)}/{human_bytes(snap.bytes_total)}, "
            f"{fps:,.1f} files/s, {human_bytes(bps)}/s, ETA {_clock_text(eta)}"
            + (f", {snap.files_failed:,} failed" if snap.files_failed else "")
            + f"; tasks {tasks or 'none yet'}")


class WaitDisplay:
    """``submit --wait``'s progress. On a terminal a live rich display (two bars, files
    and bytes, and the tasks' line), rewritten in place; elsewhere (cron, a log, ``| tee``)
    a timestamped line every ``every`` seconds and whenever the tasks change state, and
    always at the end."""

    def __init__(self, stream: TextIO | None = None, every: float = 60.0,
                 terminal: bool | None = None, width: int | None = None,
                 now: Callable[[], str] | None = None) -> None:
        from .files import utc_now

        self.stream = stream if stream is not None else sys.stderr
        self.terminal = (hasattr(self.stream, "isatty") and self.stream.isatty()
                         if terminal is None else terminal)
        self.every = every
        self.now = now or utc_now
        self.rate = Rate()
        self._last_line_at: float | None = None
        self._last_tasks: dict[str, int] | None = None
        self._live: Any = None
        self._bars: Any = None
        self._width = width

    def _start_live(self, snap: Any) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.progress import BarColumn, Progress, TextColumn

        console = Console(file=self.stream, force_terminal=True, width=self._width)
        self._bars = Progress(TextColumn("{task.description:>6}"), BarColumn(),
                              TextColumn("{task.percentage:>5.1f} %"),
                              TextColumn("{task.fields[shown]}"), console=console,
                              auto_refresh=False)
        self._files = self._bars.add_task("files", total=max(snap.files_total, 1), shown="")
        self._bytes = self._bars.add_task("bytes", total=max(snap.bytes_total, 1), shown="")
        self._live = Live(self._bars, console=console, auto_refresh=False)
        self._live.start()

    def update(self, snap: Any) -> None:
        self.rate.add(snap.at, snap.files_done, snap.bytes_done)
        if self.terminal:
            if self._live is None:
                self._start_live(snap)
            fps, bps = self.rate.per_second()
            eta = self.rate.eta(snap.files_total - snap.files_done,
                                snap.bytes_total - snap.bytes_done)
            tasks = ", ".join(f"{snap.tasks[s]} {s}" for s in TASK_ORDER if snap.tasks.get(s))
            self._bars.update(self._files, completed=snap.files_done,
                              shown=f"{snap.files_done:,}/{snap.files_total:,}  "
                                    f"{fps:,.1f}/s  ETA {_clock_text(eta)}  tasks: {tasks}")
            self._bars.update(self._bytes, completed=snap.bytes_done,
                              shown=f"{human_bytes(snap.bytes_done)}/"
                                    f"{human_bytes(snap.bytes_total)}  {human_bytes(bps)}/s"
                                    + (f"  {snap.files_failed:,} failed"
                                       if snap.files_failed else ""))
            self._live.refresh()
            return
        changed = self._last_tasks is not None and snap.tasks != self._last_tasks
        if self._last_line_at is None or changed or snap.at - self._last_line_at >= self.every:
            self._line(snap)

    def _line(self, snap: Any) -> None:
        self._last_line_at, self._last_tasks = snap.at, dict(snap.tasks)
        self.stream.write(f"{self.now()} {wait_line(snap, self.rate)}\n")
        self.stream.flush()

    def finish(self, snap: Any) -> None:
        """The last state, always shown; then the display is closed."""
        if self.terminal:
            self.update(snap)
            self.close()
        else:
            self.rate.add(snap.at, snap.files_done, snap.bytes_done)
            self._line(snap)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
