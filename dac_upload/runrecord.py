"""The run directory's contract, in one place: where each file of a run lives
(RunLayout), what run.json holds (new_run_record makes it at planning; RunRecord reads it,
with the defaults of runs planned by earlier versions written here once), the vocabulary of
the result records, and reading and writing run.json (an array task's exit codes are
errors.TaskExit). Every step after planning (submit, the worker, status, resubmit, collect,
nightly) reads a run here."""

from __future__ import annotations

import getpass
import hashlib
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .config import RucioConfig, UploadConfig
from .files import atomic_write_json, read_json, utc_now

if TYPE_CHECKING:
    from .config import JobConfig
    from .plan import Batch

SCHEMA_VERSION = 1                              # of run.json
CLIENT_CONFIG_NAME = "rucio.cfg"                # the run's own Rucio client configuration
BUTLER_FILE = "butler.jsonl"                    # relpath -> its Butler datasets
DIMENSION_EXPORT = "butler-dimensions.yaml"     # what the destination Butler must import

# ---------------------------------------------------------------- the result records
UPLOADED = "uploaded"
ALREADY_PRESENT = "already_present"
FAILED = "failed"
NOT_ATTEMPTED = "not_attempted"
DONE_STATES = (UPLOADED, ALREADY_PRESENT)

# How an uploaded file's copy was checked before it was registered (its record's "verified"):
# the RSE's own checksum of the copy (root://, davs://: XRootD computes it), a second read of
# the copy by the worker (a POSIX RSE), or Rucio's UploadClient ([upload] mode = "stock").
STORAGE_VERIFIED, READ_BACK_VERIFIED, STOCK_VERIFIED = "storage checksum", "read back", \
    "stock client"

# Why a file failed. A permanent cause needs a person (resubmit leaves such files alone
# unless asked); the others are worth another attempt.
# "archive": packed ([packing]) with a member that is changed, missing or unreadable, so
# its archive was not registered; "scratch": the archive could not be built in the scratch
# directory (full), worth another attempt.
PERMANENT_CAUSES = ("conflict", "missing", "unreadable", "changed", "archive")


# ---------------------------------------------------------------- the run directory
class RunLayout:
    """Where everything of one run lives. The run directory is the unit a user points at."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir)

    @property
    def run_json(self) -> Path:
        return self.dir / "run.json"

    @property
    def job_copy(self) -> Path:
        return self.dir / "job.toml"

    @property
    def catalogue(self) -> Path:
        return self.dir / "catalogue.json"

    @property
    def skipped(self) -> Path:
        return self.dir / "skipped.jsonl"

    @property
    def kept_loose(self) -> Path:
        """[packing] in nightly: files uploaded before and changed since, not packed."""
        return self.dir / "kept-loose.txt"

    @property
    def manifests(self) -> Path:
        return self.dir / "manifests"

    @property
    def results(self) -> Path:
        return self.dir / "results"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def array_script(self) -> Path:
        return self.dir / "array.sh"

    @property
    def collect_script(self) -> Path:
        return self.dir / "collect.sh"

    @property
    def summary(self) -> Path:
        return self.dir / "summary.json"

    @property
    def collected(self) -> Path:
        """Written last by ``collect``, after summary.json and the ledger: what they were made
        from (see collect.collection_state)."""
        return self.dir / "collected.json"

    def manifest(self, task: int) -> Path:
        return self.manifests / f"task-{task:05d}.json"

    def result(self, task: int) -> Path:
        return self.results / f"task-{task:05d}.jsonl"

    def done_marker(self, task: int) -> Path:
        return self.results / f"task-{task:05d}.done.json"

    def copies(self, task: int) -> Path:
        """The names each attempt of the task began to copy onto the RSE, written before the
        copies start: only a copy listed here may be adopted by a later attempt."""
        return self.results / f"task-{task:05d}.copies.jsonl"


def run_dirs(runs_dir: Path) -> list[Path]:
    """A job's runs, oldest first: the folders of its runs folder that hold a run.json. Run
    ids start with their UTC time to the second; two planned within one second are told
    apart by their job.toml, written once at planning."""
    if not runs_dir.is_dir():
        return []

    def age(run_dir: Path) -> tuple[str, int, str]:
        try:
            planned = RunLayout(run_dir).job_copy.stat().st_mtime_ns
        except OSError:
            planned = 0
        return run_dir.name[:16], planned, run_dir.name

    return sorted((p for p in runs_dir.iterdir() if (p / "run.json").is_file()), key=age)


# ---------------------------------------------------------------- run.json

class RunReadError(ValueError):
    """A file of a run directory cannot be read or understood; the message names it and
    says what to do (one line)."""


def read_run_json(run_dir: Path, whole: bool = True) -> dict[str, Any]:
    """run.json, or RunReadError naming it: every command that takes a run reads it here.
    ``whole=False`` (the worker) asks only for a JSON object: a run directory written by
    hand needs no more than what the worker reads (rucio, source; see TaskSettings)."""
    path = RunLayout(run_dir).run_json
    try:
        run = read_json(path)
    except FileNotFoundError:
        raise RunReadError(f"{run_dir}: no run.json, so not a run directory (dac-upload plan "
                           "JOB makes one)") from None
    except OSError as exc:
        raise RunReadError(f"{path}: cannot read it ({exc.strerror})") from None
    except ValueError as exc:
        raise RunReadError(f"{path}: damaged, not valid JSON ({exc}); restore it from a "
                           "backup, or move the run aside and plan a new run") from None
    if not isinstance(run, dict):
        raise RunReadError(f"{path}: not the record of a dac-upload run (not a JSON object); "
                           "restore it from a backup, or plan a new run")
    if whole and (not isinstance(run.get("plan"), dict) or "run_id" not in run
                  or "tasks" not in run["plan"]):
        raise RunReadError(f"{path}: not the record of a dac-upload run (no run_id or "
                           "plan.tasks); restore it from a backup, or plan a new run")
    return run


def manifest_problem(run_dir: Path, run: dict[str, Any], task: int) -> str | None:
    """Why the task's manifest is not the one planned (missing, or its sha256 differs from
    run.json's), or None. Runs planned before digests were recorded are taken as they are."""
    path = RunLayout(run_dir).manifest(task)
    digests = RunRecord(run).manifest_sha256
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return f"{path}: missing"
    except OSError as exc:
        return f"{path}: cannot read it ({exc.strerror})"
    if digests is None or task >= len(digests):
        return None
    if hashlib.sha256(data).hexdigest() != digests[task]:
        return f"{path}: not the manifest planned (changed since: its sha256 differs)"
    return None


REMAKE_HINT = "re-make it from the run's catalogue: dac-upload remake-manifests"


def write_run_json(run_dir: Path, run: dict[str, Any]) -> None:
    """run.json, replaced atomically: status and the collector may be reading it."""
    atomic_write_json(RunLayout(run_dir).run_json, run)


def new_run_record(job: JobConfig, run_id: str, layout: RunLayout, *, catalogue_sha256: str,
                   files: int, skipped: int, from_file: Path | None, batches: Sequence[Batch],
                   task_ids: str, manifest_sha256: list[str], credentials: dict[str, Any],
                   runtime: dict[str, Any], slurm: dict[str, Any],
                   butler: dict[str, Any] | None, origin: str) -> dict[str, Any]:
    """run.json as planning writes it: what every later step reads (RunRecord), the job's
    settings the tasks need, and an empty list of submissions."""
    sizes = [b.bytes for b in batches]
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "dac-upload", "version": __version__},
        "run_id": run_id,
        "state": "planned",
        "created_at": utc_now(),
        "created_by": {"user": getpass.getuser(), "host": socket.gethostname(),
                       "pid": os.getpid()},
        "job": {"name": job.name, "file": str(job.path), "copy": layout.job_copy.name,
                "sha256": hashlib.sha256(job.text.encode()).hexdigest()},
        "source": {"root": str(job.source.root), "include": list(job.source.include),
                   "exclude": list(job.source.exclude), "symlinks": job.source.symlinks},
        "rucio": {"scope": job.rucio.scope, "rse": job.rucio.rse, "account": job.rucio.account,
                  "dataset": job.rucio.dataset, "dataset_did": job.rucio.dataset_did,
                  "lifetime": job.rucio.lifetime,
                  "config": str(job.rucio.config) if job.rucio.config else None,
                  "retries": job.rucio.retries, "retry_wait": job.rucio.retry_wait},
        "catalogue": {"file": layout.catalogue.name, "sha256": catalogue_sha256,
                      "files": files, "bytes": sum(sizes), "skipped": skipped,
                      "from_file": str(from_file) if from_file else None},
        "plan": {"tasks": len(batches), "task_ids": task_ids,
                 "files_per_batch": job.batching.files_per_batch,
                 "bytes_per_batch": job.batching.bytes_per_batch,
                 "max_running": job.batching.max_running,
                 "manifest_sha256": manifest_sha256,   # the worker and submit refuse any other
                 "task_files": [b.count for b in batches],   # status without reading
                 "task_bytes": sizes,                          # the manifests
                 "largest_batch_bytes": max(sizes), "smallest_batch_bytes": min(sizes)},
        "upload": {"mode": job.upload.mode, "chunk_size": job.upload.chunk_size,
                   "transfers": job.upload.transfers, "rename": job.upload.rename,
                   "guid": job.upload.guid, "md5": job.upload.md5,
                   "scratch": str(job.packing.scratch) if job.packing.scratch else None},
        "credentials": credentials,
        "runtime": runtime,
        "slurm": slurm,
        "slurm_limits": {"max_submit": job.slurm.max_submit},
        "butler": butler,
        "ledger": str(job.ledger_path),
        "origin": origin,
        "submissions": [],
    }


class RunRecord:
    """run.json, read. The defaults of runs planned by earlier versions (keys they did not
    write) are here and nowhere else; code that needs a value of run.json asks for it here."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc

    @classmethod
    def read(cls, run_dir: Path) -> RunRecord:
        return cls(read_run_json(run_dir))

    @property
    def run_id(self) -> str:
        return str(self.doc["run_id"])

    @property
    def tasks(self) -> int:
        return int(self.doc["plan"]["tasks"])

    @property
    def created_at(self) -> str | None:
        return self.doc.get("created_at")

    @property
    def job_file(self) -> str | None:
        """The job file the run was planned from (as it was then: its copy is job.toml)."""
        return (self.doc.get("job") or {}).get("file")

    @property
    def files(self) -> int | None:
        """Files planned; None for a run directory written by hand without the catalogue's
        counts."""
        return (self.doc.get("catalogue") or {}).get("files")

    @property
    def bytes(self) -> int | None:
        return (self.doc.get("catalogue") or {}).get("bytes")

    @property
    def tasks_planned(self) -> int:
        """plan.tasks, or 0 in a run directory written by hand without it."""
        return int((self.doc.get("plan") or {}).get("tasks") or 0)

    @property
    def scope(self) -> str:
        return str(self.doc["rucio"]["scope"])

    @property
    def rse(self) -> str:
        return str(self.doc["rucio"]["rse"])

    @property
    def account(self) -> str | None:
        return self.doc.get("rucio", {}).get("account")

    @property
    def dataset_did(self) -> tuple[str, str] | None:
        ds = self.doc["rucio"].get("dataset_did")
        return (ds[0], ds[1]) if ds else None

    @property
    def root(self) -> Path:
        return Path(self.doc["source"]["root"])

    @property
    def credentials(self) -> dict[str, Any] | None:
        """The credentials record (credentials.Credentials.record); None for runs planned
        before it was kept: their tasks use RUCIO_CONFIG as it is."""
        return self.doc.get("credentials") or None

    @property
    def client_config(self) -> str:
        return str((self.credentials or {}).get("client_config", CLIENT_CONFIG_NAME))

    @property
    def submissions(self) -> list[dict[str, Any]]:
        return list(self.doc.get("submissions", []))

    @property
    def ledger(self) -> Path | None:
        return Path(self.doc["ledger"]) if self.doc.get("ledger") else None

    @property
    def butler(self) -> dict[str, Any] | None:
        return self.doc.get("butler") or None

    @property
    def manifest_sha256(self) -> list[str] | None:
        """The planned manifests' digests; None for runs planned before they were kept."""
        return (self.doc.get("plan") or {}).get("manifest_sha256")

    def slurm_limit(self, key: str) -> int | None:
        return (self.doc.get("slurm_limits") or {}).get(key)

    def task_settings(self) -> TaskSettings:
        """A key a run planned by an earlier version lacks takes TaskSettings' default."""
        r = self.doc["rucio"]
        u = self.doc.get("upload") or {}
        proxy = (self.credentials or {}).get("proxy")
        given = {**{k: r[k] for k in ("retries", "retry_wait") if k in r},
                 **{k: u[k] for k in ("mode", "chunk_size", "transfers", "rename", "guid",
                                      "md5") if k in u}}
        if u.get("scratch"):
            given["scratch"] = Path(u["scratch"])
        return TaskSettings(scope=self.scope, rse=self.rse, account=self.account,
                            dataset=self.dataset_did, lifetime=r.get("lifetime"),
                            root=self.root, proxy=Path(proxy) if proxy else None, **given)


@dataclass(frozen=True)
class TaskSettings:
    """What an array task needs of run.json (RunRecord.task_settings). A key that a run
    planned by an earlier version lacks takes the job file's default (config), except
    ``mode`` and ``guid``, whose defaults were different before those keys existed."""

    scope: str
    rse: str
    account: str | None
    dataset: tuple[str, str] | None
    lifetime: int | None
    root: Path
    retries: int = RucioConfig.retries
    retry_wait: float = RucioConfig.retry_wait      # seconds
    mode: str = "stock"          # [upload]: "bulk" or "stock" (runs planned before: stock)
    chunk_size: int = UploadConfig.chunk_size
    transfers: int = UploadConfig.transfers
    rename: str = UploadConfig.rename
    guid: bool = True            # [upload] guid (runs planned before it existed: True)
    proxy: Path | None = None    # the X.509 proxy the tasks use, watched for its expiry
    md5: bool = UploadConfig.md5  # [upload] md5 (bulk only: UploadClient always computes it)
    scratch: Path | None = None   # [packing] scratch: where archives are built
