"""Pure rendering: job + plan -> the array script and the collector script.

The script bodies come from Jinja2 templates in ``templates/``; the ``#SBATCH`` header comes
from simple-slurm's own builder (``Slurm(**options).script()``), the same object that submits,
so what ``plan`` shows is byte for byte what ``submit`` hands to sbatch.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from simple_slurm import Slurm

from . import __version__
from .config import JobConfig
from .rucio.credentials import Credentials
from .runrecord import CLIENT_CONFIG_NAME

SHELL = "/bin/bash"
ARRAY_DEPENDENCY_PLACEHOLDER = "ARRAY_JOB_ID"


def templates_dir() -> Path:
    """``templates/`` shipped in the wheel, or the repository's own for a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parent / "templates"):
        if (candidate / "array.sh.j2").is_file():
            return candidate
    raise FileNotFoundError(f"dac-upload templates not found next to {here}; reinstall dac-upload")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["sh"] = lambda v: shlex.quote(str(v))
    return env


@dataclass(frozen=True)
class ScriptContext:
    """Everything the templates may use; nothing secret ever goes in here (credentials are
    paths: the files are bound and read inside the task, never copied into a script)."""

    job: str
    run_id: str
    run_dir: str
    runtime: str
    python: str
    image: str | None
    binds: tuple[str, ...]              # the array task's container binds
    collect_binds: tuple[str, ...]      # the collector's (run and ledger; no credentials)
    environment: tuple[tuple[str, str], ...]   # what the worker gets besides the task id
    version: str = __version__


def _ro(path: str) -> str:
    return f"{path}:{path}:ro"


def script_context(job: JobConfig, run_id: str, run_dir: Path, python: str,
                   creds: Credentials | None = None) -> ScriptContext:
    """The worker sees the run's own rucio.cfg (``credentials.CLIENT_CONFIG_NAME`` in the
    run directory) and the credential variables, frozen here: cron and ``apptainer
    --cleanenv`` would lose the planning shell's environment."""
    env: dict[str, str] = {"RUCIO_CONFIG": str(Path(run_dir) / CLIENT_CONFIG_NAME)}
    env.update(creds.environment() if creds else {})
    binds: list[str] = []
    collect_binds: list[str] = []
    if job.container.runtime == "apptainer":
        root = str(job.source.root)
        binds = [_ro(root), str(run_dir)]
        for path in creds.bind_paths() if creds else []:
            if _ro(str(path)) not in binds:
                binds.append(_ro(str(path)))
        binds.extend(job.container.binds)
        # the collector writes summary.json and updates the ledger beside the runs
        collect_binds = [str(job.runs_dir)]
        if not Path(run_dir).is_relative_to(job.runs_dir):
            collect_binds.append(str(run_dir))
        collect_binds.extend(job.container.binds)
    return ScriptContext(
        job=job.name, run_id=run_id, run_dir=str(run_dir), runtime=job.container.runtime,
        python=job.container.python or python,
        image=str(job.container.image) if job.container.image else None,
        binds=tuple(binds), collect_binds=tuple(collect_binds),
        environment=tuple(env.items()),
    )


def bind_problems(job: JobConfig, run_dir: Path, creds: Credentials | None) -> list[str]:
    """Apptainer splits a bind list on ',' and a bind on ':': a path holding either cannot
    be bound. One line per such path, before anything is written."""
    if job.container.runtime != "apptainer":
        return []
    paths = [job.source.root, run_dir, job.runs_dir, *(creds.bind_paths() if creds else [])]
    return [f"{job.path}: {str(p)!r} contains ',' or ':', which Apptainer cannot bind; "
            "rename or move it (or use runtime = \"none\")"
            for p in dict.fromkeys(paths) if "," in str(p) or ":" in str(p)]


def render_body(template: str, ctx: ScriptContext) -> str:
    return render_template(template, **ctx.__dict__)


def render_template(template: str, **values: Any) -> str:
    """One of templates/ with these values (``| sh`` quotes a value for the shell)."""
    return _environment().get_template(template).render(**values)


def _common_options(job: JobConfig) -> dict[str, Any]:
    s = job.slurm
    opts: dict[str, Any] = {"time": s.time, "mem": s.mem, "cpus_per_task": s.cpus_per_task}
    if s.partition:
        opts["partition"] = s.partition
    if s.account:
        opts["account"] = s.account
    opts.update(s.extra)
    return opts


def array_options(job: JobConfig, task_ids: str, max_running: int) -> dict[str, Any]:
    """sbatch options of the array; paths are relative to the run directory, where sbatch runs
    (so a run directory with spaces never appears inside an ``#SBATCH`` line). Logs are named
    by array job and local index (see ``with_offset`` for arrays that do not start at 0)."""
    opts = {"job_name": job.slurm.job_name or f"dacu-{job.name}",
            "array": f"{task_ids}%{max_running}",
            "output": "logs/job%A.index%a.out",
            "open_mode": "append",
            "signal": f"B:USR1@{job.slurm.stop_margin}",
            "export": "ALL,DAC_UPLOAD_TASK_OFFSET=0"}
    opts.update(_common_options(job))
    return opts


def with_offset(options: dict[str, Any], local_ids: str, offset: int,
                retry_permanent: bool = False) -> dict[str, Any]:
    """The array options for one part of a run: local indices 0.. and the offset the script
    adds to ``$SLURM_ARRAY_TASK_ID`` (a run may need several arrays: MaxArraySize)."""
    throttle = str(options["array"]).rpartition("%")[2]
    export = f"ALL,DAC_UPLOAD_TASK_OFFSET={offset}"
    if retry_permanent:
        export += ",DAC_UPLOAD_RETRY_PERMANENT=1"
    return dict(options, array=f"{local_ids}%{throttle}", export=export)


def collector_options(job: JobConfig, array_job_id: str | None) -> dict[str, Any]:
    opts = {"job_name": (job.slurm.job_name or f"dacu-{job.name}") + "-collect",
            "dependency": f"afterany:{array_job_id or ARRAY_DEPENDENCY_PLACEHOLDER}",
            "output": "logs/collect.job%j.out",
            "open_mode": "append"}
    opts.update(_common_options(job))
    opts["cpus_per_task"] = 2   # the ledger is written by a second process (collect.py)
    return opts


def make_slurm(options: dict[str, Any]) -> Slurm:
    """A fresh simple-slurm object (they accumulate commands, so never reuse one), its
    values as the ``#SBATCH`` lines must carry them (header_value).

    simple-slurm validates option names with argparse and exits on an unknown one; that
    becomes a ValueError naming the option."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return Slurm(**{k: header_value(v) for k, v in options.items()})
    except SystemExit:
        bad = ", ".join(sorted(k for k in options if not _known_option(k)))
        raise ValueError(f"unknown sbatch option(s): {bad or stderr.getvalue().strip()}") from None


def _known_option(key: str) -> bool:
    parser = Slurm().parser
    flag = "--" + key if len(key) > 1 else "-" + key
    return any(flag in a.option_strings for a in parser._actions
               if isinstance(a, argparse.Action))


def full_script(options: dict[str, Any], body: str) -> str:
    """The exact file simple-slurm writes and sbatch reads: its header, then our body."""
    slurm = make_slurm(options)
    slurm.add_cmd(body)
    return slurm.script(shell=SHELL, convert=False)


# set by dac-upload itself: letting [slurm] extra override them would break the run layout
RESERVED_OPTIONS = ("array", "output", "error", "open_mode", "job_name", "dependency",
                    "parsable", "wrap", "chdir", "wait", "test_only", "hold", "input", "signal",
                    "export")
# these have keys of their own in [slurm]: set them there
OWN_KEYS = ("time", "mem", "cpus_per_task", "partition", "account")


# sbatch options whose value may hold a space (quoted in the header); every other value
# is one word, as Slurm's names, sizes, times and lists are (job names are checked by the
# job file's own rule: letters, digits, '.', '_' and '-')
SPACED_OPTIONS = ("comment",)
# what no #SBATCH value may hold: a line end or control character would end the line and
# start a command; sbatch's own parser of #SBATCH lines reads " and \ as quoting
_NEVER_IN_HEADER = re.compile(r'[\x00-\x1f\x7f"\\]')


def header_value(value: Any) -> Any:
    """A value as its ``#SBATCH`` line carries it: one with whitespace in double quotes,
    which sbatch's parser of the header takes as one argument (sbatch_value_problems has
    refused whitespace where Slurm takes none, and any quote or control character)."""
    if isinstance(value, str) and any(c.isspace() for c in value):
        return f'"{value}"'
    return value


def sbatch_value_problems(job: JobConfig) -> list[str]:
    """One line per value that would reach an ``#SBATCH`` line and could change the script
    (a control character, a quote, a backslash) or that Slurm takes as one word but holds
    whitespace (``account = "my project!"``): sbatch would refuse it at submission with
    "Invalid directive", or worse, read it as another option."""
    where = {"partition": "[slurm] partition", "account": "[slurm] account",
             "mem": "[slurm] mem", "job_name": "[slurm] job_name (or [job] name)",
             **{k: f"[slurm] extra {k}" for k in job.slurm.extra}}
    out = []
    for key, value in _common_options(job).items() | {
            ("job_name", job.slurm.job_name or f"dacu-{job.name}")}:
        text = str(value)
        if _NEVER_IN_HEADER.search(text):
            out.append(f"{job.path}: {where.get(key, key)} = {text!r} holds a quote, a "
                       "backslash or a control character, which cannot go into an #SBATCH "
                       "line; remove it")
        elif key not in SPACED_OPTIONS and any(c.isspace() for c in text):
            out.append(f"{job.path}: {where.get(key, key)} = {text!r} holds a space, and "
                       "Slurm takes one word there; use the name Slurm knows (sacctmgr show "
                       "assoc user=$USER lists your accounts, sinfo -s the partitions)")
    return sorted(out)


def sbatch_option_problems(job: JobConfig) -> list[str]:
    """One line per [slurm] value that cannot go into the script (sbatch_value_problems), or
    extra option simple-slurm/sbatch would not accept, or that would override what
    dac-upload sets itself."""
    values = sbatch_value_problems(job)
    if values:
        return values
    owned = sorted(set(job.slurm.extra) & set(RESERVED_OPTIONS))
    if owned:
        return [f"{job.path}: [slurm] extra sets {', '.join(owned)}, which dac-upload sets "
                "itself; remove it (job names go in [slurm] job_name)"]
    own = sorted(set(job.slurm.extra) & set(OWN_KEYS))
    if own:
        return [f"{job.path}: [slurm] extra sets {', '.join(own)}: use the [slurm] key(s) "
                "of that name instead"]
    try:
        make_slurm(_common_options(job))
    except ValueError as exc:
        return [f"{job.path}: [slurm] extra: {exc}; see 'man sbatch' for the long option "
                "names (use _ for -, e.g. mail_type)"]
    return []


# What the collector job needs, as planned (collector_fit): collect took 6-9 s at 1M files
# and 38-41 s at 5M (sizes unrelated to the path: 6-9 µs a file), on the 2-core test machine
# (tests/benchmarks/scale.py, docs/performance.md): 50 µs a file is over five times that, for a
# slower file system and a ledger that grows. Its memory, both processes together: about
# 100 MB for the summary's and up to 200 MB for the ledger's writer (SQLite's cache, the
# statuses read ahead), plus the largest task's records (one task of 5M files: 18.9 GB, 4.0 KB a
# file), plus a Butler source's butler.jsonl, held whole.
COLLECT_SECONDS_PER_FILE = 50e-6
COLLECT_BASE_SECONDS = 120
COLLECT_BASE_BYTES = 384 << 20
COLLECT_BYTES_PER_TASK_FILE = 6 << 10      # a record, its entry and its manifest row
COLLECT_BYTES_PER_BUTLER_FILE = 4 << 10    # its datasets from butler.jsonl


def collector_fit(files: int, largest_task: int, butler: bool, time_limit: int,
                  mem_bytes: int | None) -> list[str]:
    """Why the run's collector would not fit its [slurm] time or mem (pure), one line each
    with the fix; [] if it fits. The collector is given the array's [slurm] time and mem."""
    need_s = COLLECT_BASE_SECONDS + files * COLLECT_SECONDS_PER_FILE
    need_b = (COLLECT_BASE_BYTES + largest_task * COLLECT_BYTES_PER_TASK_FILE
              + (files * COLLECT_BYTES_PER_BUTLER_FILE if butler else 0))
    out = []
    if need_s > time_limit:
        out.append(f"[slurm] time ({time_limit} s) is shorter than the collector of {files:,} "
                   f"files may need (about {need_s:.0f} s): raise it, or split the source "
                   "into several jobs")
    if mem_bytes is not None and need_b > mem_bytes:
        out.append(f"[slurm] mem ({mem_bytes >> 20} MB) is less than the collector of this run "
                   f"may need (about {need_b >> 20} MB"
                   + (", most of it the Butler datasets of every file" if butler else "")
                   + "): raise it" + (", or split the source" if butler else
                                      ", or lower [batching] files_per_batch"))
    return out
