"""Exit codes, the one table: the commands' (the CLI and nightly) and an array task's.
docs/cli.md's tables are generated from here (docref)."""

from __future__ import annotations

from typing import Final


class UserError(Exception):
    """A problem the user can fix, one line per problem in ``lines``, each naming the file or
    key and the fix; the CLI prints them all and exits Exit.USER. Each step has its kind
    (config.ConfigError, credentials.CredentialsError, pipeline.PlanError, butler.ButlerError)."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


class Exit:
    """A ``dac-upload`` command's exit codes (plain ints: printed, compared and written to
    JSON as numbers on every Python the worker may run on)."""

    OK: Final = 0
    FAILURES: Final = 1
    USER: Final = 2
    SERVICE: Final = 3
    LOCKED: Final = 10
    STILL_GOING: Final = 11
    CREDENTIALS: Final = 12
    NEEDS_PERSON: Final = 13


EXIT_MEANING: dict[int, str] = {
    Exit.OK: "success: done, submitted, or nothing to do",
    Exit.FAILURES: "the run finished with failed files (collect, submit --wait, resubmit "
                   "--wait, nightly --wait)",
    Exit.USER: "a problem you can fix in the job file, the source tree, the run directory or "
               "your Rucio credentials, scope or RSE; nothing was submitted",
    Exit.SERVICE: "sbatch refused the job, or Slurm or the Rucio server could not be reached",
    Exit.LOCKED: "nightly: another nightly of this job holds the lock (or a stale lock: see "
                 "the message)",
    Exit.STILL_GOING: "nightly: the previous run still has tasks pending or running",
    Exit.CREDENTIALS: "nightly: credentials missing, open to others, or expiring before the "
                      "tasks' time limit",
    Exit.NEEDS_PERSON: "nightly: files failed for a reason only a person can fix (see the log)",
}


class TaskExit:
    """An array task's exit codes (also its ``.done.json`` ``exit_code``)."""

    OK: Final = 0
    FILES_FAILED: Final = 1
    BAD_INPUT: Final = 2
    ABORTED: Final = 3
    STOPPED: Final = 4


TASK_EXIT_MEANING: dict[int, str] = {
    TaskExit.OK: "every file of the manifest is done",
    TaskExit.FILES_FAILED: "some files failed (their records say why); resubmit retries "
                           "those worth retrying",
    TaskExit.BAD_INPUT: "the run directory or the manifest cannot be used (changed after "
                        "planning, unreadable)",
    TaskExit.ABORTED: "the task stopped early: Rucio or the storage kept failing, a fatal "
                      "Rucio error, or the X.509 proxy expired",
    TaskExit.STOPPED: "asked to stop (wall time near, scancel): resubmit finishes the rest",
}
