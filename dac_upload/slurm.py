"""The only module that runs Slurm commands (sbatch through simple-slurm, scontrol, squeue).

Parsers of their output are pure functions at the top; the few functions that run commands
are at the bottom and turn every failure into ``SlurmError`` carrying Slurm's own message.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable

from .render import SHELL, make_slurm


class SlurmError(Exception):
    """A Slurm command failed; the message is one line with Slurm's own words."""


# ----------------------------------------------------------------------------- pure parsers
def parse_scontrol_config(text: str) -> dict[str, str]:
    """``scontrol show config`` -> {key: value}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and " " not in key.strip():
            out[key.strip()] = value.strip()
    return out


def parse_squeue_states(text: str) -> dict[str, str]:
    """Lines of ``%i %T`` (job id incl. array index, state) -> {id: state}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            out[parts[0]] = parts[1]
    return out


def parse_array_states(text: str) -> dict[tuple[str, int], str]:
    """``squeue -r -o '%F %K %T'`` or ``sacct -P -X -o JobID,State`` (``12_3|COMPLETED``,
    ``12_[4-7%2]|PENDING``) -> {(array job id, index): state}; other lines are ignored."""
    out: dict[tuple[str, int], str] = {}
    for line in text.splitlines():
        if "|" in line:
            job, _, state = line.partition("|")
            array, sep, index = job.partition("_")
        else:
            parts = line.split()
            if len(parts) < 3:
                continue
            array, index, state = parts[0], parts[1], parts[2]
            sep = "_"
        state = state.split()[0] if state.strip() else ""
        if not sep or not array.isdigit() or not state:
            continue
        for i in expand_indices(index.strip("[]").split("%")[0]):
            out[(array, i)] = state
    return out


def expand_indices(spec: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7] (the inverse of plan.compress_indices)."""
    result: list[int] = []
    for part in spec.split(","):
        lo, sep, hi = part.partition("-")
        if lo.isdigit() and (not sep or hi.isdigit()):
            result.extend(range(int(lo), int(hi or lo) + 1))
    return result


def last_error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["(sbatch printed nothing)"])[-1]


# ----------------------------------------------------------------------------- commands
def _require(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise SlurmError(f"'{tool}' not found on PATH: run this on a Slurm login node "
                         "(or 'module load slurm')")
    return path


def _run(args: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    _require(args[0])
    try:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"'{' '.join(args)}' did not answer within {timeout:.0f} s: "
                         "is slurmctld up? (try 'sinfo')") from None
    if proc.returncode != 0:
        raise SlurmError(f"'{' '.join(args)}' failed: {last_error_line(proc.stderr)}")
    return proc


def submit(options: dict[str, Any], body: str, run_dir: Path, script_name: str) -> str:
    """Submit ``body`` with ``options`` through simple-slurm; return the job id.

    simple-slurm writes ``script_name`` (header + body) and runs ``sbatch script_name`` in the
    current directory. We run it inside ``run_dir`` with a plain relative file name (no quoting
    problems), and capture file descriptor 2 because simple-slurm does not capture sbatch's
    stderr: a failure then reports sbatch's own error line instead of an empty AssertionError.
    """
    _require("sbatch")
    slurm = make_slurm(options)
    with _cwd(run_dir), _capture_stderr_fd() as captured:
        try:
            job_id = slurm.sbatch(body, job_file=script_name, convert=False, verbose=False,
                                  shell=SHELL)
        except (AssertionError, ValueError, IndexError, SystemExit):
            job_id = None
    if job_id is None:
        raise SlurmError(f"sbatch {script_name} failed: {last_error_line(captured['text'])}")
    return str(job_id)


def scontrol_config() -> dict[str, str]:
    return parse_scontrol_config(_run(["scontrol", "show", "config"]).stdout)


def test_script(script: str) -> str:
    """What ``sbatch --test-only`` says of this exact script (the header simple-slurm renders
    and the body): its "Job N to start at ..." line. Every ``#SBATCH`` line is parsed by
    sbatch itself, so a value it would refuse at submission is refused here, with its own
    words (SlurmError). The script is written to a private temporary directory, which is
    also the working directory: nothing is queued and nothing is left behind."""
    _require("sbatch")
    with tempfile.TemporaryDirectory(prefix="dac-upload-test-only-") as tmp:
        path = Path(tmp) / "job.sh"
        path.write_text(script)
        try:
            proc = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True,
                                  text=True, timeout=60, check=False, cwd=tmp)
        except subprocess.TimeoutExpired:
            raise SlurmError("sbatch --test-only did not answer within 60 s: is slurmctld "
                             "up? (try 'sinfo')") from None
    if proc.returncode != 0:
        raise SlurmError(last_error_line(proc.stderr))
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    return lines[-1] if lines else "accepted"


# --test-only's answer both for a request no node could ever meet (mem beyond every node)
# and for one that must wait because the nodes are drained or down (a maintenance): only the
# first is a refusal, and it is told apart by asking which nodes are out of service
NODES_UNAVAILABLE = "Requested node configuration is not available"


def _nodes_out_of_service() -> bool:
    """Some node is drained, down or otherwise out of service (sinfo's compact states)."""
    try:
        states = _run(["sinfo", "-h", "-o", "%t"]).stdout.split()
    except SlurmError:
        return True   # cannot tell: let sbatch itself decide at submission
    return any(st.rstrip("*~#!%$@^-") in ("drain", "drng", "down", "fail", "failg", "maint",
                                            "boot", "futr", "inval", "npc", "pow_dn", "unk")
               for st in states)


def script_problems(what: str, script: str) -> list[str]:
    """``sbatch --test-only``'s refusal of a run's script (pipeline.ScriptCheck), one line
    with the fix; [] when sbatch accepts it. The collector's ``--dependency`` names the
    array's job id, which it does not have yet (sbatch refuses the placeholder): that line
    alone is left out of the test."""
    tested = "".join(line for line in script.splitlines(keepends=True)
                     if not line.startswith("#SBATCH --dependency"))
    try:
        test_script(tested)
    except SlurmError as exc:
        if NODES_UNAVAILABLE in str(exc) and _nodes_out_of_service():
            return []   # drained or down nodes: sbatch would queue it, --test-only cannot tell
        return [f"sbatch --test-only refuses the run's {what}: {exc}; fix [slurm] partition, "
                "account, time, mem or extra in the job file ('sinfo -s' lists the "
                "partitions, 'sacctmgr show assoc user=$USER' your accounts)"]
    return []


def slurm_version() -> str:
    return _run(["sbatch", "--version"]).stdout.strip()


def max_array_size() -> int:
    value = scontrol_config().get("MaxArraySize", "1001")
    return int(value) if value.isdigit() else 1001


def queue_states(job_ids: Sequence[str]) -> dict[str, str]:
    """States of the jobs (array tasks one by one) still known to slurmctld; {} for jobs it
    has already forgotten (MinJobAge)."""
    try:
        proc = _run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(job_ids), "-o", "%i %T"])
    except SlurmError as exc:
        if "invalid job id" in str(exc).lower():
            return {}
        raise
    return parse_squeue_states(proc.stdout)


def job_state(job_id: str) -> str | None:
    """The state of one (non-array) job: squeue while slurmctld remembers it (MinJobAge),
    else sacct when accounting is on; None when neither knows it any more."""
    state = queue_states([job_id]).get(job_id)
    if state is None:
        with contextlib.suppress(SlurmError):  # accounting disabled or slurmdbd down
            for line in _run(["sacct", "-n", "-P", "-X", "-j", job_id,
                              "-o", "JobID,State"]).stdout.splitlines():
                job, _, st = line.partition("|")
                if job == job_id and st.strip():
                    state = st.split()[0]
    return state


def array_states(array_ids: Sequence[str]) -> dict[tuple[str, int], str]:
    """Per-task states of these arrays: sacct when accounting is on (it remembers after the
    jobs leave the queue), merged with squeue (current, but forgets after MinJobAge). Without
    accounting, sacct exits 1 and squeue alone answers; a task neither knows is gone."""
    states: dict[tuple[str, int], str] = {}
    ids = ",".join(array_ids)
    if not ids:
        return states
    with contextlib.suppress(SlurmError):  # accounting disabled or slurmdbd down
        states.update(parse_array_states(_run(
            ["sacct", "-n", "-P", "-X", "-j", ids, "-o", "JobID,State"]).stdout))
    accounted = dict(states)
    # squeue refuses the whole list if one id has been purged (MinJobAge): ask one by one
    for array_id in array_ids:
        try:
            out = _run(["squeue", "-h", "-r", "-t", "all", "-j", array_id,
                        "-o", "%F %K %T"]).stdout
        except SlurmError as exc:
            if "invalid job id" in str(exc).lower():
                continue
            if accounted:  # squeue failed but sacct answered: use what it said
                return accounted
            raise
        states.update(parse_array_states(out))
    return states


def wait_until_gone(job_id: str, timeout: float, poll: float = 1.0,
                    on_poll: Callable[[], None] | None = None) -> None:
    """Block until ``job_id`` has left the queue (or reached a final state)."""
    final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
             "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
    deadline = time.monotonic() + timeout
    while True:
        states = queue_states([job_id])
        if not states or all(s in final for s in states.values()):
            return
        if time.monotonic() > deadline:
            raise SlurmError(f"job {job_id} still {sorted(set(states.values()))} after "
                             f"{timeout:.0f} s")
        if on_poll is not None:
            on_poll()
        time.sleep(poll)


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def _capture_stderr_fd() -> Iterator[dict[str, str]]:
    """Point fd 2 at a temp file for the duration (children inherit it), then restore it."""
    captured = {"text": ""}
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured["text"] = tmp.read().decode("utf-8", "replace")
