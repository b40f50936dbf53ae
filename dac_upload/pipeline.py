"""One way through: config -> catalogue -> plan -> render -> (submit).

``prepare_run`` validates everything it can before it creates anything: a job that would fail
(bad names, unreadable files, patterns that match nothing, unknown sbatch options, unknown
scope or RSE) leaves no run directory behind and raises ``PlanError`` with one line per
problem.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import sys
import time
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

from . import __version__, render
from .catalogue import (
    Catalogue,
    CatalogueFileError,
    own_dirs,
    read_catalogue,
    walk,
    write_catalogue,
)
from .config import JobConfig
from .errors import UserError
from .files import (
    atomic_write_jsonl,
    atomic_write_text,
    link_or_copy,
    manifest_bytes,
    utc_now,
    write_files_atomically,
)
from .naming import glob_regex
from .plan import Batch, FileTable, compress_indices, make_batches, name_files
from .progress import Progress
from .rucio import credentials
from .rucio.credentials import Credentials, CredentialsError
from .runrecord import (
    BUTLER_FILE,
    CLIENT_CONFIG_NAME,
    DIMENSION_EXPORT,
    RunLayout,
    RunRecord,
    new_run_record,
    read_run_json,
    write_run_json,
)

MAX_PROBLEM_LINES = 20


class PlanError(UserError):
    """The job cannot be planned as it is; ``lines`` says why, one problem per line."""


class NothingToUpload(PlanError):
    """Every matching file is already accounted for (nightly: not an error)."""


class CollectorNotSubmitted(Exception):
    """The array is in the queue but its collector job is not: say so, with the way out."""


@dataclass(frozen=True)
class PreparedRun:
    layout: RunLayout
    run_id: str
    files: int
    bytes: int
    batches: list[Batch]
    skipped: int
    run: dict[str, Any]          # what run.json holds
    notes: list[str] = field(default_factory=list)   # worth saying, not errors


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def _problem_lines(where: str, problems: list[Any], what: str) -> list[str]:
    lines = [f"{where}/{p.relpath}: {p.reason}" for p in problems[:MAX_PROBLEM_LINES]]
    if len(problems) > MAX_PROBLEM_LINES:
        lines.append(f"... and {len(problems) - MAX_PROBLEM_LINES} more {what}")
    return lines


def check_catalogue(job: JobConfig, cat: Catalogue) -> list[str]:
    errors = _problem_lines(str(job.source.root), cat.refused, "refused files")
    errors += unbound_link_targets(job, cat)
    for pattern, hits in cat.pattern_hits.items():
        # hits count the first include pattern a file matched: look again before complaining
        if hits == 0 and not any(map(glob_regex(pattern).fullmatch, cat.files().relpath)):
            errors.append(f"{job.path}: [source] include pattern {pattern!r} matches no file "
                          f"under {job.source.root}; fix the pattern or the root")
    return errors


def unbound_link_targets(job: JobConfig, cat: Catalogue) -> list[str]:
    """With Apptainer, only bound directories exist inside the container: a followed file
    symlink whose target is elsewhere would fail there as missing. One line naming them."""
    if job.container.runtime != "apptainer" or not cat.outside_targets:
        return []
    sources = [os.path.realpath(b.split(":", 1)[0]) for b in job.container.binds]
    unbound = sorted(d for d in cat.outside_targets
                     if not any(d == s or d.startswith(s.rstrip("/") + "/") for s in sources))
    if not unbound:
        return []
    shown = ", ".join(unbound[:3]) + (f" and {len(unbound) - 3} more" if len(unbound) > 3
                                      else "")
    return [f"{job.path}: file symlinks under the source root point into {shown}, which the "
            f"container will not see; add them to [container] binds (e.g. "
            f"\"{unbound[0]}:{unbound[0]}:ro\"), or set [source] symlinks = \"skip\""]


def resolve_credentials(job: JobConfig) -> Credentials:
    """The job's Rucio identity, from the job file, the user's rucio.cfg and this shell."""
    try:
        return credentials.resolve(job.rucio, os.environ, os.getuid(), str(job.path))
    except CredentialsError as exc:
        raise PlanError(exc.lines) from None


Preflight = Callable[[JobConfig, Credentials], list[str]]


@dataclass
class _Found:
    """The catalogue, and what a [butler] section added to it."""

    cat: Catalogue
    datasets: dict[str, list[dict[str, Any]]]
    repo: Any = None                            # butler.RepoSource, for the export
    unmatched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    catalogue_sha256: str | None = None         # of the catalogue file read, if one was


def load_catalogue(job: JobConfig, path: Path, shown: Path | None = None
                   ) -> tuple[Catalogue, str]:
    """A catalogue file made by ``dac-upload catalogue`` for this job's [source], and its
    sha256; PlanError (one line, naming ``shown`` or ``path``) if it cannot be read or was
    made for another source."""
    try:
        cat, header = read_catalogue(path)
    except CatalogueFileError as exc:
        message = str(exc)
        if shown is not None:
            message = message.replace(str(path), str(shown), 1)
        raise PlanError([message]) from None
    path = shown or path
    made_for = header["source"]
    wanted = {"root": str(job.source.root), "include": list(job.source.include),
              "exclude": list(job.source.exclude), "symlinks": job.source.symlinks}
    differ = [k for k in wanted if made_for.get(k) != wanted[k]]
    if differ:
        raise PlanError([f"{path}: this catalogue was made for another [source] "
                         f"({', '.join(f'{k} {made_for.get(k)!r}' for k in differ)}; "
                         f"{job.path} says {', '.join(repr(wanted[k]) for k in differ)}); "
                         f"make a new one: dac-upload catalogue {job.path} --out FILE"])
    return cat, header["sha256"]


def _catalogue(job: JobConfig, progress: Progress | None,
               keep: Callable[[str, int, float], bool] | None,
               catalogue_file: tuple[Path, Path] | None = None) -> tuple[JobConfig, _Found]:
    """Walk the tree (or read the catalogue file made by an earlier walk), or query the
    Butler repository ([butler] repo: the job's source root becomes the datastore root).
    Butler problems raise PlanError."""
    kind = job.butler.kind
    if catalogue_file is not None and (kind == "repo" or keep is not None):
        raise PlanError([f"{job.path}: a catalogue file cannot be used "
                         + ("with [butler] repo (the repository's query is the catalogue)"
                            if kind == "repo" else "by nightly (it looks for new files)")
                         + "; plan without --catalogue"])

    loaded = (load_catalogue(job, catalogue_file[0], catalogue_file[1])
              if catalogue_file is not None else None)
    digest = loaded[1] if loaded else None

    def tree() -> Catalogue:
        return loaded[0] if loaded else walk(job.source, progress, keep,
                                             own_dirs(job.source.root, job.runs_dir))

    notes = own_dirs_note(job)
    if kind is None:
        return job, _Found(tree(), {}, notes=notes, catalogue_sha256=digest)
    from .butler import source as butler_mod

    try:
        if kind == "repo":
            repo = butler_mod.catalogue_from_repo(job.butler, str(job.path), progress, keep,
                                                  job.source.symlinks)
            job = replace(job, source=replace(job.source, root=repo.catalogue.root))
            return job, _Found(repo.catalogue, repo.datasets, repo, notes=list(repo.notes))
        cat = tree()
        datasets, unmatched, problems = butler_mod.map_tree(cat.file_entries(), job.butler,
                                                            str(job.path))
    except butler_mod.ButlerError as exc:
        raise PlanError(exc.lines) from None
    cat.refused.extend(problems)
    return job, _Found(cat, datasets, unmatched=unmatched, notes=notes,
                       catalogue_sha256=digest)


def own_dirs_note(job: JobConfig) -> list[str]:
    """The one line that says the runs folder inside the tree is left out (see own_dirs)."""
    if not own_dirs(job.source.root, job.runs_dir):
        return []
    return [f"the runs folder {job.runs_dir} is inside [source] root: its files (runs, "
            "ledger, logs) are dac-upload's own and are never uploaded; set [job] runs_dir "
            "outside the tree to silence this"]


def _butler_record(job: JobConfig, found: _Found, planned: FileTable,
                   dimension_file: str | None) -> dict[str, Any] | None:
    b = job.butler
    if b.kind is None:
        return None
    files = sum(1 for rel in planned.rels if rel in found.datasets)
    return {"kind": b.kind, "repo": b.repo, "collections": list(b.collections),
            "dataset_types": list(b.dataset_types), "where": b.where,
            "find_first": b.find_first, "metadata": b.metadata and b.kind == "repo",
            "raw_dataset_types": list(b.raw_dataset_types),
            "maps": [{"dataset_type": m.dataset_type, "run": m.run, "path": m.path,
                      "data_id": dict(m.data_id), "formatter": m.formatter,
                      "storage_class": m.storage_class} for m in b.maps],
            "files": BUTLER_FILE, "files_with_datasets": files,
            "unmatched": len(found.unmatched),
            "dimension_export": DIMENSION_EXPORT if found.repo is not None else None,
            "dimension_file": dimension_file}


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Planning makes a few million small objects that live until the end and hold no
    cycles; Python's cyclic collector would walk all of them again and again as they are
    made (about 15 % of planning a million files). Reference counting still frees the rest.
    On the way out what is alive is frozen (moved out of the collector's sight, in O(1)):
    else the first collection after enabling it, and the one at exit, walk it all; the next
    plan in the same process unfreezes it."""
    was_enabled = gc.isenabled()
    gc.unfreeze()   # what an earlier plan in this process froze: collectable again
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.freeze()
            gc.enable()


# sbatch's verdict on a rendered script: ("the array script", its text) -> problem lines
ScriptCheck = Callable[[str, str], list[str]]


def prepare_run(job: JobConfig, preflight: Preflight | None = None,
                progress: Progress | None = None, python: str | None = None,
                keep: Callable[[str, int, float], bool] | None = None,
                origin: str = "plan", catalogue_file: Path | None = None,
                script_check: ScriptCheck | None = None) -> PreparedRun:
    """Catalogue, name, batch and render a run; write its directory. Nothing is submitted.
    ``keep`` filters the walk (nightly: only files new or changed since the ledger);
    ``preflight`` checks the credentials and the server (not with --offline);
    ``script_check`` (slurm.script_problems) hands both rendered scripts to
    ``sbatch --test-only`` before the run directory exists: a partition, account or memory
    Slurm refuses leaves no run behind;
    ``catalogue_file`` (from ``dac-upload catalogue``) replaces the walk: it is first
    hard-linked (or copied) into ``runs_dir`` and read from there, so that the run keeps
    exactly the catalogue it planned, whatever happens to the file meanwhile."""
    kept = None
    if catalogue_file is not None:
        job.runs_dir.mkdir(parents=True, exist_ok=True)
        kept = job.runs_dir / f".catalogue.{uuid.uuid4().hex[:12]}.json"
        try:
            link_or_copy(Path(catalogue_file), kept)
        except OSError as exc:
            kept.unlink(missing_ok=True)
            raise PlanError([f"{catalogue_file}: cannot read the catalogue: "
                             f"{exc.strerror}"]) from None
    try:
        with _cyclic_gc_paused():
            return _prepare_run(job, preflight, progress, python, keep, origin,
                                (kept, Path(catalogue_file)) if kept else None, script_check)
    finally:
        if kept is not None:
            kept.unlink(missing_ok=True)   # moved into the run directory, unless it failed


def catalogue_only(job: JobConfig, progress: Progress | None = None) -> Catalogue:
    """What ``dac-upload catalogue`` writes: the walk with plan's own checks of it (refused
    files, include patterns that match nothing, symlink targets Apptainer cannot see);
    PlanError lists the problems."""
    if job.butler.kind == "repo":
        raise PlanError([f"{job.path}: [butler] repo: the repository's query is the "
                         "catalogue; plan the job directly"])
    if not job.source.root.is_dir():
        raise PlanError([f"{job.path}: [source] root = {str(job.source.root)!r} is not a "
                         "directory; fix the path"])
    with _cyclic_gc_paused():
        cat = walk(job.source, progress, prune=own_dirs(job.source.root, job.runs_dir))
    errors = check_catalogue(job, cat)
    if errors:
        raise PlanError(errors)
    return cat


def _prepare_run(job: JobConfig, preflight: Preflight | None,
                 progress: Progress | None, python: str | None,
                 keep: Callable[[str, int, float], bool] | None,
                 origin: str, catalogue_file: tuple[Path, Path] | None,
                 script_check: ScriptCheck | None) -> PreparedRun:
    plan = _checked_plan(job, preflight, progress, keep, catalogue_file)
    job, found, files, batches, creds = plan.job, plan.found, plan.files, plan.batches, plan.creds
    run_id = new_run_id()
    scripts = render_scripts(job, run_id, (job.runs_dir / run_id).resolve(),
                             python or sys.executable, creds, batches)
    if script_check is not None:
        # the collector asks for the same partition, account, time and mem: one refusal
        refused = (script_check("array script", scripts.first_task)
                   or script_check("collector script", scripts.collector))
        if refused:
            raise PlanError(refused)
    _stage(progress, f"writing the run: {len(batches):,} manifests")
    layout = _run_directory(job, found, run_id)
    atomic_write_text(layout.job_copy, job.text)
    credentials.write_client_config(
        layout.dir / CLIENT_CONFIG_NAME,
        credentials.client_config_text(creds, credentials.load_base(creds.base_config)))
    if catalogue_file is not None:   # what was read, checked against the job: kept as it is
        os.replace(catalogue_file[0], layout.catalogue)
        catalogue_sha256 = found.catalogue_sha256
    else:
        catalogue_sha256 = write_catalogue(layout.catalogue, found.cat, job.source, utc_now(),
                                           f"dac-upload {__version__}")
    atomic_write_jsonl(layout.skipped, ({"relpath": p.relpath, "reason": p.reason}
                                        for p in found.cat.skipped))
    extra: list[dict[str, Any]] = []
    if found.repo is not None and job.butler.metadata:
        extra.append(_dimension_file_entry(job, run_id, layout.dir / DIMENSION_EXPORT))
    # [packing]: a file uploaded before and changed since goes on its own, never into a
    # new archive beside new files (a Butler zip holding a dataset the destination has
    # already is refused whole by butler ingest-zip)
    changed = (getattr(keep, "changed", None) or set()) if job.packing.enabled else set()
    if changed:   # what remake_manifests needs to pack as planned
        atomic_write_text(layout.kept_loose, "".join(f"{rel}\n" for rel in sorted(changed)))
    digests = _write_manifests(job, found, run_id, layout, batches, extra, plan.zips,
                               changed)
    if job.butler.kind is not None:
        atomic_write_jsonl(layout.dir / BUTLER_FILE, (
            {"relpath": rel, "datasets": found.datasets[rel]}
            for rel in sorted(files.rels) if rel in found.datasets))

    # what plan shows is what submit writes: simple-slurm's header + our body
    atomic_write_text(layout.array_script, scripts.array, 0o777)
    atomic_write_text(layout.collect_script, scripts.collector, 0o777)
    ctx, task_ids = scripts.context, scripts.task_ids
    array_opts, collect_opts = scripts.array_options, scripts.collector_options

    run = new_run_record(
        job, run_id, layout, catalogue_sha256=catalogue_sha256, files=len(files),
        skipped=len(found.cat.skipped),
        from_file=catalogue_file[1].resolve() if catalogue_file else None,
        batches=batches, task_ids=task_ids, manifest_sha256=digests,
        credentials={**creds.record(), "client_config": CLIENT_CONFIG_NAME},
        runtime={"kind": job.container.runtime, "python": ctx.python, "image": ctx.image},
        slurm={"array": array_opts, "collector": collect_opts},
        butler=_butler_record(job, found, files, extra[0]["name"] if extra else None),
        origin=origin)
    write_run_json(layout.dir, run)
    return PreparedRun(layout, run_id, len(files), sum(b.bytes for b in batches), batches,
                       len(found.cat.skipped), run, plan.notes)


def dry_plan(job: JobConfig, preflight: Preflight | None = None,
             progress: Progress | None = None) -> CheckedPlan:
    """Every check ``plan`` runs, on the same catalogue, without writing anything
    (``doctor``): PlanError or NothingToUpload where plan would refuse."""
    with _cyclic_gc_paused():
        return _checked_plan(job, preflight, progress, None, None)


class Scripts(NamedTuple):
    """A run's two scripts as sbatch will read them, and what they were made from."""

    context: render.ScriptContext
    task_ids: str
    array_options: dict[str, Any]
    collector_options: dict[str, Any]
    array: str
    collector: str
    # the array script as sbatch --test-only is given it: task 0 alone (the whole range may
    # be longer than MaxArraySize, which submit_tasks splits into arrays; the partition,
    # account, time and memory are the same for every part)
    first_task: str


def render_scripts(job: JobConfig, run_id: str, run_dir: Path, python: str,
                   creds: Credentials, batches: list[Batch]) -> Scripts:
    """The array and collector scripts of a run in ``run_dir`` (which need not exist yet):
    simple-slurm's header and our bodies, byte for byte what submit hands to sbatch."""
    ctx = render.script_context(job, run_id, run_dir, python, creds)
    task_ids = compress_indices([b.index for b in batches])
    array_opts = render.array_options(job, task_ids, job.batching.max_running)
    collect_opts = render.collector_options(job, None)
    body = render.render_body("array.sh.j2", ctx)
    return Scripts(ctx, task_ids, array_opts, collect_opts,
                   render.full_script(array_opts, body),
                   render.full_script(collect_opts, render.render_body("collect.sh.j2", ctx)),
                   render.full_script(render.with_offset(array_opts, "0", 0), body))


class CheckedPlan(NamedTuple):
    """A plan that passed every check, before anything is written."""

    job: JobConfig            # with a Butler source's datastore root as [source] root
    found: _Found
    files: FileTable
    batches: list[Batch]
    creds: Credentials
    notes: list[str]
    zips: Any = None          # butler.zips.ZipIndexer: [packing] in a Butler job


def _checked_plan(job: JobConfig, preflight: Preflight | None, progress: Progress | None,
                  keep: Callable[[str, int, float], bool] | None,
                  catalogue_file: tuple[Path, Path] | None) -> CheckedPlan:
    """Catalogue, names, batches, and every check that can refuse the plan (PlanError with
    all the lines at once; NothingToUpload); nothing is written."""
    if job.butler.kind != "repo" and not job.source.root.is_dir():
        raise PlanError([f"{job.path}: [source] root = {str(job.source.root)!r} is not a "
                         "directory; fix the path"])
    creds = resolve_credentials(job)
    errors = render.sbatch_option_problems(job)
    if os.path.realpath(job.runs_dir) == os.path.realpath(job.source.root):
        errors.append(f"{job.path}: [job] runs_dir is the [source] root ({job.source.root}): "
                      "each run would be uploaded by the next; set runs_dir to a folder "
                      "of its own")
    job, found = _catalogue(job, progress, keep, catalogue_file)
    _stage(progress, f"checking and naming {found.cat.file_count:,} files")
    errors += render.bind_problems(job, job.runs_dir / "RUN", creds)
    errors += check_catalogue(job, found.cat)
    files, name_problems = name_files(found.cat.files(), job.naming)
    errors += _problem_lines(str(job.source.root), name_problems, "naming problems")
    errors += _archive_name_clashes(job, files)
    zips = None
    try:
        zips = _zip_indexer(job, found.datasets, found.repo)
    except PlanError as exc:   # said with the other problems, not instead of them
        errors += exc.lines
    if zips is not None:
        errors += zips.problems(str(job.path))
    if errors:
        raise PlanError(errors)
    notes = list(found.notes)
    if found.unmatched:
        shown = ", ".join(found.unmatched[:3]) + (f" and {len(found.unmatched) - 3} more"
                                                 if len(found.unmatched) > 3 else "")
        notes.append(f"{len(found.unmatched)} files match no [[butler.map]] ({shown}): they "
                     "are uploaded, without a data ID; butler-table lists them")
    if not files:
        raise NothingToUpload([f"{job.path}: nothing to upload under {job.source.root}"
                               + (" that is new or changed" if keep else "")])
    batches = make_batches(files, job.batching.files_per_batch, job.batching.bytes_per_batch)
    errors += _collector_problems(job, len(files), max(b.count for b in batches))
    if errors:   # the job file's own problems before Rucio is asked (it may be down)
        raise PlanError(errors)
    if preflight is not None:
        _stage(progress, f"asking Rucio at {creds.host}: credentials, scope "
                         f"{job.rucio.scope}, RSE {job.rucio.rse}")
        errors += preflight(job, creds)
    if errors:
        raise PlanError(errors)
    return CheckedPlan(job, found, files, batches, creds, notes, zips)


def _archive_name_clashes(job: JobConfig, files: FileTable) -> list[str]:
    """[packing]: archives are named under [naming] prefix + [packing] names; a source file
    named there could take an archive's name: refused."""
    if not job.packing.enabled:
        return []
    under = job.naming.prefix + job.packing.names
    clash = next((name for name in (files.name(i) for i in range(len(files)))
                  if name.startswith(under)), None)
    if clash is None:
        return []
    return [f"{job.path}: {clash!r} is named under {under!r}, where [packing] names its "
            "archives: set [packing] names to a part no file name starts with"]


def _stage(progress: Progress | None, what: str) -> None:
    """One line saying what planning does now, after the walk (none without progress)."""
    if progress is not None:
        progress.stage(what)


def _run_directory(job: JobConfig, found: _Found, run_id: str) -> RunLayout:
    """The new run directory with its subdirectories (and a Butler source's dimension
    export, written first: a failure there leaves nothing behind)."""
    job.runs_dir.mkdir(parents=True, exist_ok=True)
    export_tmp = job.runs_dir / f".{run_id}.{DIMENSION_EXPORT}"
    if found.repo is not None:
        from .butler.source import ButlerError

        try:
            found.repo.write_dimension_export(export_tmp)
        except ButlerError as exc:
            raise PlanError(exc.lines) from None
    layout = RunLayout(job.runs_dir / run_id)
    layout.dir.mkdir()  # exclusive: never reuse an existing run directory
    if found.repo is not None:
        os.replace(export_tmp, layout.dir / DIMENSION_EXPORT)
    for sub in (layout.manifests, layout.results, layout.logs):
        sub.mkdir()
    return layout


def _write_manifests(job: JobConfig, found: _Found, run_id: str, layout: RunLayout,
                     batches: list[Batch], extra: list[dict[str, Any]],
                     indexer: Any = None, loose: Collection[str] = ()) -> list[str]:
    """Each batch's manifest, written by a pool; their sha256 digests, in task order."""
    meta = _metadata_of(job, found)
    digests: list[str] = []

    def manifests() -> Iterator[tuple[Path, bytes]]:
        for batch in batches:
            data = _manifest_of(run_id, str(job.source.root), batch, meta,
                                extra if batch.index == 0 else (), job, indexer, loose)
            digests.append(hashlib.sha256(data).hexdigest())
            yield layout.manifest(batch.index), data

    write_files_atomically(manifests(), layout.manifests)
    return digests


def _collector_problems(job: JobConfig, files: int, largest_task: int) -> list[str]:
    """The collector job gets the array's [slurm] time and mem: refuse a plan whose
    collector could not finish in them (render.collector_fit)."""
    from .config import slurm_mem_bytes, slurm_time_seconds
    from .render import collector_fit

    return [f"{job.path}: {line}" for line in collector_fit(
        files, largest_task, job.butler.kind is not None,
        slurm_time_seconds(job.slurm.time), slurm_mem_bytes(job.slurm.mem))]


def _manifest_of(run_id: str, root: str, batch: Batch, meta: dict[str, Any],
                 extra: Any, job: JobConfig, indexer: Any = None,
                 loose: Collection[str] = ()) -> bytes:
    files = batch.files
    archives = _archives_of(job, files, meta, indexer, loose)
    if archives and meta:   # a packed file's DID gets none: a Butler zip's archive does
        packed = {files[i][0] for a in archives for i in a["members"]}
        meta = {rel: meta[rel] for rel, *_ in files if rel in meta and rel not in packed}
    return manifest_bytes({"run_id": run_id, "task": batch.index, "source_root": root,
                           "bytes": batch.bytes}, files, meta, extra, archives)


def _zip_indexer(job: JobConfig, datasets: dict[str, list[dict[str, Any]]],
                 repo: Any) -> Any:
    """The maker of Butler zip indexes for a Butler job with [packing] (None otherwise);
    PlanError if lsst-daf-butler is not there."""
    if not (job.packing.enabled and job.butler.kind is not None):
        return None
    from .butler.source import ButlerError
    from .butler.zips import ZipIndexer

    try:
        return ZipIndexer(datasets, repo)
    except ButlerError as exc:
        raise PlanError(exc.lines) from None


def _archives_of(job: JobConfig, files: Any, meta: dict[str, Any] | None = None,
                 indexer: Any = None, loose: Collection[str] = ()) -> list[dict[str, Any]]:
    """A batch's archives ([packing]; none without it), as its manifest lists them: a
    Butler job's with their Butler zip index (``indexer``), and Rubin's zip_file metadata
    where its files would have had Rubin metadata. Files in ``loose`` (relpaths) are not
    packed."""
    from .packing import BUTLER_INDEX, archive_name, member_overhead, pack_batch

    p = job.packing
    if not p.enabled:
        return []
    packs = indexer.packs if indexer is not None else None
    if loose:
        def packs(rel: str, inner: Any = packs) -> bool:
            return rel not in loose and (inner is None or inner(rel))
    archives, _ = pack_batch(files, p.below, p.archive_size, job.naming.prefix + p.names,
                             packs=packs)
    out = []
    for a in archives:
        entry: dict[str, Any] = {"name": a.name, "members": list(a.members), "bytes": a.bytes}
        index = indexer.index([(files[i][0], files[i][1], files[i][2]) for i in a.members]
                              ) if indexer is not None else None
        if index is not None:
            from .butler.source import RUBIN_ZIP_FILE

            encoded = index.encode()
            entry["name"] = archive_name(job.naming.prefix + p.names, [
                (files[i][1], files[i][2], files[i][3]) for i in a.members], encoded)
            entry["index"] = index
            entry["bytes"] += len(encoded) + member_overhead(BUTLER_INDEX)
            if meta and any(files[i][0] in meta for i in a.members):
                entry["meta"] = {"rubin_butler": RUBIN_ZIP_FILE, "rubin_sidecar": ""}
        out.append(entry)
    return out


def remake_manifests(run_dir: Path) -> dict[int, bytes]:
    """The run's manifests made again, as plan made them, from what the run directory keeps:
    its catalogue and its copy of the job file (naming, batching). Byte-identical to the
    planned ones except where a Butler source's metadata or Butler zip indexes went into
    them (only the repository's query gives those); the digests in run.json tell which."""
    import tomllib

    from .catalogue import read_catalogue
    from .config import parse_job

    layout = RunLayout(run_dir)
    run = read_run_json(run_dir)
    text = layout.job_copy.read_text(encoding="utf-8")
    job = parse_job(tomllib.loads(text), Path(run["job"]["file"]), text)
    cat, _ = read_catalogue(layout.catalogue)
    files, _ = name_files(cat.files(), job.naming)
    batches = make_batches(files, job.batching.files_per_batch, job.batching.bytes_per_batch)
    extra = []
    dim = (run.get("butler") or {}).get("dimension_file")
    if dim and (layout.dir / DIMENSION_EXPORT).exists():
        extra = [_dimension_file_entry(job, run["run_id"], layout.dir / DIMENSION_EXPORT)]
    indexer = None
    if job.packing.enabled and job.butler.kind is not None:
        # the archives as planned: a source datastore's zips stay loose; a map tree's zip
        # indexes come from its datasets (a Butler source's need the repository: the
        # digests in run.json tell that those differ)
        from .butler.zips import WithoutIndex
        from .files import read_jsonl

        datasets = {r["relpath"]: r["datasets"]
                    for r in read_jsonl(layout.dir / BUTLER_FILE)}
        indexer = WithoutIndex(datasets)
        if job.butler.kind == "map":
            # without lsst (the collector's image): the files as planned, the archives
            # without their index (and so under other names: the digests say they differ)
            with contextlib.suppress(PlanError):
                indexer = _zip_indexer(job, datasets, None)
    loose: set[str] = set()
    if layout.kept_loose.exists():
        loose = set(layout.kept_loose.read_text(encoding="utf-8").splitlines())
    return {b.index: _manifest_of(run["run_id"], run["source"]["root"], b, {},
                                  extra if b.index == 0 else (), job, indexer, loose)
            for b in batches}


def _dimension_file_entry(job: JobConfig, run_id: str, export: Path) -> dict[str, Any]:
    """The run's dimension records as a file of its own in Rucio, marked rubin_butler =
    "dim_file" as lsst/rucio_register marks them: Rubin's ingest daemon imports such a file
    into the destination Butler (butler.import_) before the datasets need the records. Its
    relpath is absolute (the run directory, not the source tree): the worker reads it there."""
    from .butler.source import RUBIN_DIM_FILE

    st = export.stat()
    name = f"{job.naming.prefix}dac-upload-dimensions/{job.name}.{run_id}.yaml"
    return {"relpath": str(export.resolve()), "name": name, "size": st.st_size,
            "mtime": st.st_mtime, "meta": {"rubin_butler": RUBIN_DIM_FILE, "rubin_sidecar": ""}}


def _metadata_of(job: JobConfig, found: _Found) -> dict[str, dict[str, str]]:
    """relpath -> the Rucio metadata its DID gets (Butler source with [butler] metadata):
    Rubin's rubin_butler / rubin_sidecar, from the file's first dataset."""
    if found.repo is None or not job.butler.metadata:
        return {}
    from .butler.source import rubin_metadata

    sidecars = found.repo.sidecars
    return {rel: rubin_metadata(ds[0], sidecars[rel], job.butler.raw_dataset_types)
            for rel, ds in found.datasets.items()}


@dataclass(frozen=True)
class Submission:
    attempt: int
    arrays: list[dict[str, Any]]        # {"job_id", "offset", "task_ids"} per sbatch --array
    collector_job_id: str
    task_ids: str                        # the run's task indices this submission covers
    left_over: str                       # indices held back by [slurm] max_submit ("" if none)


def chunk_indices(indices: list[int], max_array_size: int,
                  max_chars: int = 4000) -> list[tuple[int, list[int]]]:
    """Split task indices into parts one ``sbatch --array`` can take: local indices (index -
    offset) below MaxArraySize, and the compressed list within sbatch's 4096 characters."""
    parts: list[tuple[int, list[int]]] = []
    for index in sorted(set(indices)):
        if parts and index - parts[-1][0] < max_array_size:
            parts[-1][1].append(index - parts[-1][0])
        else:
            parts.append((index, [0]))
    fitted: list[tuple[int, list[int]]] = []
    while parts:
        offset, local = parts.pop(0)
        if len(compress_indices(local)) <= max_chars or len(local) == 1:
            fitted.append((offset, local))
            continue
        half = len(local) // 2
        second = local[half:]
        parts[:0] = [(offset, local[:half]), (offset + second[0], [i - second[0] for i in second])]
    return fitted


def submit_tasks(run_dir: Path, indices: list[int], max_array_size: int,
                 submit: Callable[..., str], max_submit: int | None = None,
                 retry_permanent: bool = False) -> Submission:
    """Submit these task indices of a planned run (as several arrays when MaxArraySize or the
    --array length demand it, offsets passed to the script), then one collector depending
    (afterany) on all of them. Each array is recorded in run.json as soon as it is queued.

    ``submit(options, body, run_dir, script_name) -> job id`` is slurm.submit in real use.
    """
    from .runrecord import REMAKE_HINT, manifest_problem

    layout = RunLayout(run_dir)
    run = read_run_json(run_dir)
    indices = sorted(set(indices))
    bad = [why for t in indices if (why := manifest_problem(run_dir, run, t))]
    if bad:
        raise PlanError([*bad[:MAX_PROBLEM_LINES], f"nothing submitted; {REMAKE_HINT} "
                         f"{run_dir}"])
    left: list[int] = []
    if max_submit is not None and len(indices) > max_submit:
        indices, left = indices[:max_submit], indices[max_submit:]
    attempt = len(run["submissions"]) + 1
    array_body = _body_of(layout.array_script)
    collect_body = _body_of(layout.collect_script)
    sub: dict[str, Any] = {"attempt": attempt, "arrays": [], "collector_job_id": None,
                           "task_ids": compress_indices(indices),
                           "left_over": compress_indices(left),
                           "submitted_at": utc_now()}
    run["submissions"].append(sub)
    for n, (offset, local) in enumerate(chunk_indices(indices, max_array_size)):
        local_ids = compress_indices(local)
        opts = render.with_offset(run["slurm"]["array"], local_ids, offset, retry_permanent)
        if sub["arrays"]:  # one part after the other: max_running holds for the whole run
            opts["dependency"] = f"afterany:{sub['arrays'][-1]['job_id']}"
        # simple-slurm (re)writes the file it submits: never the planned array.sh
        job_id = submit(opts, array_body, layout.dir, f"array.submit{attempt}.{n}.sh")
        sub["arrays"].append({"job_id": job_id, "offset": offset, "task_ids": local_ids})
        run["state"] = "submitted"
        write_run_json(layout.dir, run)  # the run knows every queued array at once
    ids = [a["job_id"] for a in sub["arrays"]]
    collect_opts = dict(run["slurm"]["collector"], dependency="afterany:" + ":".join(ids))
    try:
        collector_id = submit(collect_opts, collect_body, layout.dir,
                              f"collect.submit{attempt}.sh")
    except Exception as exc:
        raise CollectorNotSubmitted(
            f"array job(s) {', '.join(ids)} were submitted but the collector was not ({exc}); "
            f"when they have finished run: dac-upload collect {layout.dir}") from exc
    sub["collector_job_id"] = collector_id
    sub["collector_dependency"] = collect_opts["dependency"]
    write_run_json(layout.dir, run)
    return Submission(attempt, sub["arrays"], collector_id, sub["task_ids"], sub["left_over"])


def submit_collector(run_dir: Path, submit: Callable[..., str]) -> Submission:
    """Submit the run's collector alone (no dependency): every task is over, but no
    collector finished since (killed, out of memory or time, cancelled). Recorded in
    run.json as a submission without arrays."""
    layout = RunLayout(run_dir)
    run = read_run_json(run_dir)
    attempt = len(run["submissions"]) + 1
    opts = {k: v for k, v in run["slurm"]["collector"].items() if k != "dependency"}
    job_id = submit(opts, _body_of(layout.collect_script), layout.dir,
                    f"collect.submit{attempt}.sh")
    run["submissions"].append({"attempt": attempt, "arrays": [], "collector_job_id": job_id,
                               "task_ids": "", "left_over": "", "collector_only": True,
                               "submitted_at": utc_now()})
    write_run_json(layout.dir, run)
    return Submission(attempt, [], job_id, "", "")


def already_submitted(run_dir: Path, run: RunRecord) -> str | None:
    """Why ``submit --run`` must not submit this run (it was, once), or None."""
    if not run.submissions:
        return None
    ids = ", ".join(a["job_id"] for a in run.submissions[0].get("arrays", []))
    return (f"{run_dir}: already submitted (array job {ids}); see dac-upload status "
            f"{run_dir}, or plan a new run (dac-upload submit JOB)")


def submit_run(run_dir: Path, max_array_size: int, submit: Callable[..., str],
               max_submit: int | None = None) -> Submission:
    """First submission of a planned run: every task."""
    run = RunRecord.read(run_dir)
    problem = already_submitted(run_dir, run)
    if problem:
        raise PlanError([problem])
    return submit_tasks(run_dir, list(range(run.tasks)), max_array_size,
                        submit, max_submit)


def _body_of(script: Path) -> str:
    """The template part of a rendered script (below simple-slurm's #SBATCH header)."""
    lines = script.read_text(encoding="utf-8").splitlines(keepends=True)
    i = 1
    while i < len(lines) and (not lines[i].strip() or lines[i].startswith("#SBATCH")):
        i += 1
    return "".join(lines[i:])


def credential_warnings(prep: PreparedRun) -> list[str]:
    """The proxy (or token) expiring before the array can finish, a proxy only this node
    can see: worth a line, not a refusal (the array may start at once, the node may be it)."""
    from .config import slurm_time_seconds

    creds = Credentials.from_record(prep.run["credentials"])
    waves = -(-len(prep.batches) // max(1, int(prep.run["plan"]["max_running"])))
    task_time = str(prep.run["slurm"]["array"]["time"])
    need = slurm_time_seconds(task_time) * waves
    expiry = credentials.expiry_warning(
        creds, need, f"the array can finish once it starts ({waves} wave(s) of {task_time})")
    return credentials.local_warnings(creds) + ([expiry] if expiry else [])
