"""``dac-upload doctor JOB``: everything a first upload needs, checked one line at a time.

Each check says OK, WARN, FAIL or SKIP, what it saw and, when it is not OK, the fix. The
checks run in the order a new user would fix things (job file, source, a dry plan, Slurm and
the run's scripts, container, credentials, Rucio) and a check that cannot mean anything after
an earlier failure is skipped with the reason. ``--probe`` adds a real one-file round trip
through the RSE. Slurm is asked through slurm.py and Rucio through rucio/, like everywhere
else.

Doctor must refuse whatever ``plan`` or ``submit`` would refuse, in their words: it runs
plan's own checks (``pipeline.dry_plan``), hands the scripts plan renders to
``slurm.script_problems`` as submit does, and its credential and Rucio checks are the steps of
``rucio.preflight.problems`` (plan's online preflight) with an OK line for each that passes.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from . import __version__, pipeline, render
from .config import ConfigError, JobConfig, load_job, slurm_time_seconds
from .plan import compress_indices
from .progress import Progress, human_bytes
from .rucio import credentials
from .rucio.credentials import Credentials, CredentialsError

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
PROBE_LIFETIME = 3600   # the probe file's rule: Rucio's reaper removes it after an hour
# plan's refusals shown one FAIL line each, as plan prints them; each list of files in them is
# already cut by plan after pipeline.MAX_PROBLEM_LINES (and says how many more)
MAX_PLAN_LINES = 2 * pipeline.MAX_PROBLEM_LINES


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        return (f"{self.status:<4} {self.name}: {self.detail}"
                + (f"; fix: {self.fix}" if self.fix else ""))

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


Run = Callable[[list[str]], subprocess.CompletedProcess]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)


def diagnose(job_file: str, probe: bool = False, run: Run = _run) -> list[Check]:
    """Every check, in order; ``run`` runs the container commands (replaceable in tests)."""
    checks: list[Check] = []
    try:
        job = load_job(job_file)
    except ConfigError as exc:
        checks += [Check("job file", FAIL, line) for line in exc.lines]
        return checks
    checks.append(Check("job file", OK, f"{job.path} is valid (runtime {job.container.runtime}"
                        f", scope {job.rucio.scope}, RSE {job.rucio.rse})"))
    if job.rucio.lifetime:
        checks.append(Check("lifetime", WARN, f"[rucio] lifetime = {job.rucio.lifetime} s: "
                            "the uploaded data becomes deletable "
                            f"{job.rucio.lifetime / 86400:.1f} days after upload",
                            "remove 'lifetime' to keep the data"))
    source = _source_check(job)
    checks.append(source)
    creds: Credentials | None = None
    unresolved: list[str] = []
    try:
        creds = credentials.resolve(job.rucio, os.environ, os.getuid(), str(job.path))
    except CredentialsError as exc:
        unresolved = exc.lines
    planned = None
    if source.status == FAIL:
        checks.append(Check("plan", SKIP, "the source above must be fixed first"))
    elif creds is None:   # plan starts by resolving them: it would say only that
        checks.append(Check("plan", SKIP, "plan needs the job's Rucio credentials, which "
                            "cannot be resolved: see 'credentials' below"))
    else:
        found, planned = _plan_checks(job)
        checks += found
    checks += _slurm_checks(planned)
    checks += _runtime_checks(job, run)
    if creds is None:
        checks += [Check("credentials", FAIL, line) for line in unresolved]
        checks.append(Check("rucio", SKIP, "the credentials above must be fixed first"))
        return checks
    local = _credential_checks(job, creds)
    checks += local
    if any(c.status == FAIL for c in local):   # preflight stops there too, before the server
        checks.append(Check("rucio", SKIP, "the credential files above must be fixed first"))
        return checks
    checks += _rucio_checks(job, creds, probe)
    return checks


def failed(checks: list[Check]) -> bool:
    return any(c.status == FAIL for c in checks)


# ----------------------------------------------------------------------------- checks
def _source_check(job: JobConfig) -> Check:
    root = job.source.root
    if job.butler.kind == "repo":   # the datastore's root, which only the Butler knows
        from .butler.source import ButlerError, datastore_root

        try:
            root = datastore_root(job.butler, str(job.path))
        except ButlerError as exc:
            return Check("source", FAIL, exc.lines[0],
                         "fix [butler] repo (or install the [butler] extra, as it says)")
    if not root.is_dir():
        return Check("source", FAIL, f"{root} is not a directory", "fix [source] root")
    if not os.access(root, os.R_OK | os.X_OK):
        return Check("source", FAIL, f"{root} cannot be read by you",
                     "ask its owner for read access, or run as a member of its group")
    return Check("source", OK, f"{root} is readable")


def _plan_checks(job: JobConfig) -> tuple[list[Check], pipeline.CheckedPlan | None]:
    """plan's own checks, run by plan's own code (pipeline.dry_plan: the tree, the names,
    the [slurm] values, the binds, the collector's fit), nothing written. Each refusal is
    plan's line as plan prints it. Also the dry plan itself, for the checks after it; None
    when plan would refuse the job. Rucio is checked below, as doctor's own lines."""
    try:
        planned = pipeline.dry_plan(job, preflight=None, progress=Progress("cataloguing"))
    except pipeline.NothingToUpload as exc:
        return [Check("plan", FAIL, line, "put files under [source] root, or fix [source] "
                      "include / exclude (plan and submit refuse a job with nothing to upload)")
                for line in exc.lines], None
    except pipeline.PlanError as exc:
        lines = list(exc.lines)
        shown = lines if len(lines) <= MAX_PLAN_LINES + 1 else lines[:MAX_PLAN_LINES]
        out = [Check("plan", FAIL, line) for line in shown]
        if len(shown) < len(lines):
            out.append(Check("plan", FAIL, f"... and {len(lines) - len(shown)} more lines "
                             "like these", f"'dac-upload plan --offline {job.path}' prints "
                             "them all (and plans nothing while there is one)"))
        return out, None
    files = len(planned.files)
    size = sum(b.bytes for b in planned.batches)
    tasks = len(planned.batches)
    skipped = len(planned.found.cat.skipped)
    out = [Check("plan", OK, f"every check plan runs passes (nothing written): {files:,} "
                 f"file{'s' * (files != 1)}, {human_bytes(size)} in {tasks:,} array "
                 f"task{'s' * (tasks != 1)}"
                 + (f", {skipped:,} skipped (plan lists them in skipped.jsonl)" if skipped
                    else ""))]
    out += [Check("plan", WARN, note) for note in planned.notes]
    return out, planned


def _slurm_checks(planned: pipeline.CheckedPlan | None) -> list[Check]:
    """Slurm's commands, then both scripts of the dry plan, rendered as plan renders them,
    through ``sbatch --test-only`` exactly as submit hands them over (slurm.script_problems:
    sbatch itself reads the #SBATCH header, so what it would refuse at submission it
    refuses here, in its own words)."""
    from . import slurm

    missing = [t for t in ("sbatch", "scontrol", "squeue") if shutil.which(t) is None]
    if missing:
        return [Check("slurm", FAIL, f"{', '.join(missing)} not found on PATH",
                      "run doctor on a login node of the cluster (or 'module load slurm')"),
                Check("sbatch", SKIP, "Slurm's commands above must be found first")]
    try:
        max_array = slurm.max_array_size()
        out = [Check("slurm", OK, f"{slurm.slurm_version()}, MaxArraySize {max_array}")]
    except slurm.SlurmError as exc:
        return [Check("slurm", FAIL, str(exc), "is slurmctld up? try 'sinfo'"),
                Check("sbatch", SKIP, "Slurm above must answer first")]
    if planned is None:
        return [*out, Check("sbatch", SKIP, "the plan above must pass first: the scripts "
                            "sbatch gets are rendered from it")]
    array, collector, what = _scripts(planned, max_array)
    refused = slurm.script_problems("array script", array)
    if refused:
        return [*out, *(Check("sbatch array", FAIL, line) for line in refused),
                Check("sbatch collector", SKIP, "the array script above must pass first "
                      "(the collector asks for the same [slurm] partition, account, time "
                      "and mem)")]
    out.append(Check("sbatch array", OK, f"sbatch --test-only accepts the run's array script "
                     f"({what})"))
    refused = slurm.script_problems("collector script", collector)
    out += ([Check("sbatch collector", FAIL, line) for line in refused] if refused else
            [Check("sbatch collector", OK, "sbatch --test-only accepts the run's collector "
                   "script (its --dependency on the array left out: there is no array job "
                   "yet)")])
    return out


def _scripts(planned: pipeline.CheckedPlan, max_array: int) -> tuple[str, str, str]:
    """The array script as submit hands its first (or only) array to sbatch, the collector
    script as plan writes it, and a few words on what the array asks for. A run of more
    tasks than MaxArraySize goes as several arrays (pipeline.chunk_indices), each the
    planned options with render.with_offset; the first is the largest."""
    job = planned.job
    run_id = pipeline.new_run_id()   # a placeholder run: rendered, never written
    scripts = pipeline.render_scripts(job, run_id, (job.runs_dir / run_id).resolve(),
                                      sys.executable, planned.creds, planned.batches)
    parts = pipeline.chunk_indices([b.index for b in planned.batches], max_array)
    array = scripts.array
    if len(parts) > 1:
        offset, local = parts[0]
        array = render.full_script(
            render.with_offset(scripts.array_options, compress_indices(local), offset),
            render.render_body("array.sh.j2", scripts.context))
    opts = scripts.array_options
    what = ", ".join(f"{k} {opts[k]}" for k in ("partition", "account", "time", "mem")
                     if k in opts)
    if len(parts) > 1:
        what += (f"; tasks {scripts.task_ids} go as {len(parts)} arrays (MaxArraySize "
                 f"{max_array}), the first tested: --array {compress_indices(parts[0][1])}")
    else:
        what += f", --array {opts['array']}"
    return array, scripts.collector, what


def _runtime_checks(job: JobConfig, run: Run) -> list[Check]:
    """The worker's own dac-upload: the container's, or the Python of runtime none."""
    if job.container.runtime == "none":
        import sys

        python = job.container.python or sys.executable
        cmd = [python, "-c", "import dac_upload; print(dac_upload.__version__)"]
        what, fix = f"runtime none: {python}", f"pip install dac-upload into {python}'s env"
    else:
        tool = shutil.which("apptainer") or shutil.which("singularity")
        if tool is None:
            return [Check("apptainer", FAIL, "apptainer (or singularity) not found on PATH",
                          "'module load apptainer', or set [container] runtime = \"none\"")]
        image = job.container.image
        assert image is not None  # config requires it with runtime apptainer
        if not os.access(image, os.R_OK):
            return [Check("apptainer", OK, tool),
                    Check("image", FAIL, f"{image} is missing or unreadable",
                          "build it: apptainer build dac-upload.sif apptainer/dac-upload.def")]
        cmd = [tool, "exec", "--cleanenv", str(image), "dac-upload", "--version"]
        what, fix = f"image {image}", ("rebuild it from this checkout: apptainer build "
                                       f"{image} apptainer/dac-upload.def")
    try:
        proc = run(cmd)
    except (OSError, subprocess.SubprocessError) as exc:
        return [Check("worker", FAIL, f"{what}: cannot run it ({exc})", fix)]
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [Check("worker", FAIL, f"{what}: dac-upload does not start ({last})", fix)]
    version = proc.stdout.strip().split()[-1] if proc.stdout.strip() else "?"
    if version != __version__:
        return [Check("worker", WARN, f"{what} has dac-upload {version}, this host "
                      f"{__version__}", fix)]
    return [Check("worker", OK, f"{what} has dac-upload {version}, same as this host")]


def _credential_checks(job: JobConfig, creds: Credentials) -> list[Check]:
    """The credential files, one line each, with what plan's preflight refuses before it
    asks the server (credentials.local_problems) as FAIL lines in its words: the same
    functions make them, and a line of local_problems no check below says is added as it is."""
    refused = credentials.local_problems(creds)
    out = [Check("credentials", OK, creds.describe())]
    if creds.ca_cert is None:
        out.append(Check("CA directory", SKIP, "none needed: the server is not https"))
    elif problem := credentials.ca_problem(creds):
        out.append(Check("CA directory", FAIL, problem))
    else:
        n = (sum(1 for _ in creds.ca_cert.glob("*.0")) if creds.ca_cert.is_dir() else 1)
        out.append(Check("CA directory", OK, f"{creds.ca_cert} ({n} hashed CA certificates)")
                   if n else
                   Check("CA directory", WARN, f"{creds.ca_cert} holds no hashed CA "
                         "certificate (*.0): https checks will fail",
                         "point [rucio] ca_dir at the IGTF CA directory"))
    for what, path in creds.secret_files():
        problem = credentials.secret_file_problem(what, path)
        if problem:
            out.append(Check(what, FAIL, problem))
            continue
        left_problem = credentials.lifetime_problem(creds, what, path)
        if left_problem:
            out.append(Check(what, FAIL, left_problem))
            continue
        detail = f"{path} is readable by you alone"
        left = (credentials.proxy_seconds_left(path) if what == "X.509 proxy" else
                credentials.token_seconds_left(path) if what == "token file" else None)
        need = slurm_time_seconds(job.slurm.time)
        if left is not None:
            detail += f", valid for {left / 3600:.1f} h more"
        status, fix = OK, ""
        if left is not None and left < need:
            status = WARN
            fix = (f"renew it ({credentials.renew_proxy_command(path)}) before submitting"
                   if what == "X.509 proxy" else "make sure your token agent refreshes it")
            detail += f", less than one task's time limit ({job.slurm.time})"
        out.append(Check(what, status, detail, fix))
    said = {c.detail for c in out if c.status == FAIL}
    out += [Check("credentials", FAIL, line) for line in refused if line not in said]
    out += [Check("credentials", WARN, w) for w in credentials.local_warnings(creds)]
    return out


def _rucio_checks(job: JobConfig, creds: Credentials, probe: bool) -> list[Check]:
    """rucio.preflight.problems' steps (what plan and submit refuse online), one line each,
    OK ones too: the server's /ping as the tasks reach it, then a real login and
    RucioIO.checks (of which RucioIO.preflight is the failed part), then the probe."""
    import logging

    from .rucio.client import fresh_session, ping
    from .rucio.errors import RucioFatal, RucioUnavailable

    logging.getLogger("baseclient").setLevel(logging.CRITICAL)
    try:
        version = ping(creds)
    except RucioUnavailable as exc:
        return [Check("rucio server", FAIL, str(exc), "check [rucio] host; is the server up?")]
    except RucioFatal as exc:   # the TLS handshake failed: the line says what to fix
        return [Check("rucio server", FAIL, str(exc))]
    out = [Check("rucio server", OK, f"{creds.host} answers (Rucio {version})")]
    ds = job.rucio.dataset_did
    try:
        with fresh_session(creds) as rio:
            results = rio.checks(job.rucio.scope, job.rucio.rse, ds[0] if ds else None)
            out += [Check(name, OK if ok else FAIL, detail) for name, ok, detail in results]
            if not probe:
                out.append(Check("probe", SKIP, "add --probe for a one-file round trip "
                                 "through the RSE"))
            elif any(not ok for _, ok, _ in results):
                out.append(Check("probe", SKIP, "the Rucio checks above must pass first"))
            else:
                out.append(_probe(job, creds, rio))
    except RucioUnavailable as exc:
        out.append(Check("rucio", FAIL, str(exc), "try again later"))
    except RucioFatal as exc:
        out.append(Check("identity", FAIL, str(exc)))
    except Exception as exc:   # anything else Rucio raises: a line, not a traceback
        out.append(Check("rucio", FAIL, f"unexpected {type(exc).__name__}: {exc}",
                         "report it with this line"))
    return out


def _probe(job: JobConfig, creds: Credentials, rio: Any) -> Check:
    """Upload one small file of our own through the job's own upload path ([upload] mode:
    the bulk path's copy, destination check and bulk registration, or the stock
    UploadClient), with the job's RSE and settings, then check its replica and read it back.
    It is left on the RSE with a rule of PROBE_LIFETIME (Rucio's reaper removes it); nothing
    else is touched, nothing is deleted."""
    from .rucio.errors import RucioFatal, RucioFileError
    from .runrecord import UPLOADED
    from .upload.stock import probe_record

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = (f"{job.naming.prefix}dac-upload-probe/{getpass.getuser()}-{stamp}-"
            f"{uuid.uuid4().hex[:8]}")
    payload = (f"dac-upload doctor probe {stamp} {uuid.uuid4()}\n".encode() * 32)[:1024]
    did = f"{job.rucio.scope}:{name}"
    path = f"the {job.upload.mode} path"
    with tempfile.TemporaryDirectory(prefix="dac-upload-probe-") as tmp:
        src = Path(tmp) / "probe.dat"
        src.write_bytes(payload)
        try:
            rec = probe_record(rio, job, creds, src, name, PROBE_LIFETIME)
            if rec["status"] != UPLOADED:
                return Check("probe", FAIL, f"uploading {did} to {job.rucio.rse} through "
                             f"{path} failed: {rec['error']}",
                             "every file of this job would fail so: see the line above")
            rep = rio.replica(job.rucio.scope, name, job.rucio.rse)
            adler = f"{zlib.adler32(payload) & 0xFFFFFFFF:08x}"
            if rep is None or rep.state != "AVAILABLE" or rep.adler32 != adler:
                return Check("probe", FAIL, f"uploaded {did} but its replica on "
                             f"{job.rucio.rse} is {rep}", "ask the RSE's admins")
            back = rio.download(job.rucio.scope, name, job.rucio.rse, Path(tmp) / "back")
            same = back.read_bytes() == payload
        except (RucioFatal, RucioFileError, OSError) as exc:
            return Check("probe", FAIL, f"round trip of {did} through {job.rucio.rse} "
                         f"({path}) failed: {exc}", "see the line above; ask the RSE's admins")
    if not same:
        return Check("probe", FAIL, f"{did} read back from {job.rucio.rse} differs",
                     "ask the RSE's admins")
    return Check("probe", OK, f"uploaded {did} (1 KiB) to {job.rucio.rse} at {rep.pfn} "
                 f"through {path} (copy checked by {rec.get('verified')}), replica "
                 "AVAILABLE, adler32 matches, read back identical; left there with "
                 f"a {PROBE_LIFETIME // 3600} h rule (Rucio's reaper removes it)")
