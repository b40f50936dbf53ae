"""Progress lines for long operations: on a terminal only, rate-limited, never in cron logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO


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
