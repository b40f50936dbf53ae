"""Result records -> summary.json. The collector never talks to Rucio: the result files say
what happened. Every file of every manifest appears in the summary; a task that wrote no
result is listed, and its files are reported as not attempted, never silently dropped.

Re-running ``collect`` on the same results gives a byte-identical summary.json (it carries no
time of its own, only the times the tasks recorded).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .files import (
    atomic_write_json,
    read_json,
    read_jsonl,
    read_manifest,
    read_result_records,
    utc_now,
)
from .plan import RunLayout
from .worker import (
    ALREADY_PRESENT,
    DONE_STATES,
    FAILED,
    NOT_ATTEMPTED,
    PERMANENT_CAUSES,
    UPLOADED,
)

SCHEMA_VERSION = 1


def merge_records(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> the record that counts: the latest success, else the latest record (pure)."""
    best: dict[str, dict[str, Any]] = {}
    for rec in records:
        prev = best.get(rec["name"])
        if prev is None or rec["status"] in DONE_STATES or prev["status"] not in DONE_STATES:
            best[rec["name"]] = rec
    return best


def build_summary(run: dict[str, Any], manifests: dict[int, dict[str, Any]],
                  results: dict[int, list[dict[str, Any]]],
                  markers: dict[int, dict[str, Any]],
                  warnings: list[str] | None = None,
                  datasets: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Pure: everything known about a run -> the summary document. ``datasets`` (relpath
    -> Butler datasets, from butler.jsonl) adds each file's Butler fields."""
    datasets = datasets or {}
    warnings = list(warnings or [])
    refused = sorted({m["metadata_refused"] for m in markers.values()
                      if m.get("metadata_refused")})
    warnings += [f"Butler metadata was not set: {why}" for why in refused]
    scope, rse = run["rucio"]["scope"], run["rucio"]["rse"]
    root = Path(run["source"]["root"])
    files: dict[str, dict[str, Any]] = {}
    missing_tasks: list[int] = []
    counts = {"files": 0, "bytes": 0, UPLOADED: 0, ALREADY_PRESENT: 0, FAILED: 0,
              NOT_ATTEMPTED: 0, "bytes_uploaded": 0}
    for task in sorted(manifests):
        merged = merge_records(results.get(task, []))
        if task not in markers:
            missing_tasks.append(task)
        for entry in manifests[task]["files"]:
            rec = merged.get(entry["name"])
            if rec is None:
                why = ("the task wrote no result (it never ran, or died before this file): "
                       "see dac-upload status for its log") if task not in markers else \
                      "the task finished without a record for this file"
                rec = {"status": NOT_ATTEMPTED, "cause": "no result", "error": why,
                       "bytes": entry["size"],
                       "adler32": None, "md5": None, "pfn": None, "guid": None,
                       "attempt": None}
            key = f"{scope}:{entry['name']}"
            files[key] = {
                "scope": scope, "name": entry["name"], "bytes": rec.get("bytes"),
                "adler32": rec.get("adler32"), "md5": rec.get("md5"), "rse": rse,
                "pfn": rec.get("pfn"), "guid": rec.get("guid"),
                "path": str(root / entry["relpath"]), "relpath": entry["relpath"],
                "batch": task, "attempt": rec.get("attempt"), "status": rec["status"],
                "cause": rec.get("cause"), "error": rec.get("error"),
                "verified": rec.get("verified") if rec["status"] == UPLOADED else None,
            }
            if run.get("butler"):
                files[key]["datasets"] = datasets.get(entry["relpath"], [])
                files[key]["metadata"] = (rec.get("metadata") if entry.get("meta")
                                          else None)
            counts["files"] += 1
            counts["bytes"] += entry["size"]
            counts[rec["status"]] += 1
            if rec["status"] == UPLOADED:
                counts["bytes_uploaded"] += rec.get("bytes") or 0
    n_refused = sum(1 for f in files.values() if f.get("metadata") == "refused")
    if n_refused and not refused:   # the marker that said why was replaced by a later one
        warnings.append(f"Butler metadata was not set on {n_refused} files: the Rucio server "
                        "refused it (see the tasks' logs)")
    finished = [m["finished_at"] for m in markers.values() if m.get("finished_at")]
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "dac-upload", "version": __version__},
        "job": run["job"]["name"],
        "run_id": run["run_id"],
        "created_at": run["created_at"],
        "finished_at": max(finished) if finished else None,
        "source_root": str(root),
        "rucio": {"host": _from_markers(markers, "rucio_host"),
                  "account": run["rucio"].get("account") or _from_markers(markers,
                                                                          "rucio_account"),
                  **{k: run["rucio"].get(k) for k in ("scope", "rse", "dataset", "lifetime")}},
        "slurm": {"submissions": run.get("submissions", [])},
        "complete": counts[UPLOADED] + counts[ALREADY_PRESENT] == counts["files"],
        "counts": {**counts, "tasks": len(manifests),
                   "tasks_with_result": len(manifests) - len(missing_tasks),
                   "tasks_missing_result": len(missing_tasks)},
        "tasks_missing_result": missing_tasks,
        "failed_tasks": sorted(t for t, m in markers.items() if m.get("exit_code")),
        "warnings": warnings,
        **({"butler": _butler_summary(run["butler"], files)} if run.get("butler") else {}),
        "files": files,
    }


def _butler_summary(b: dict[str, Any], files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Run-level Butler facts: where the datasets came from, and how many files have them."""
    keys = ("kind", "repo", "collections", "dataset_types", "where", "find_first",
            "metadata", "raw_dataset_types", "maps", "dimension_export", "dimension_file")
    metadata = [f.get("metadata") for f in files.values()]
    data = [f for f in files.values() if f["name"] != b.get("dimension_file")]
    return {**{k: b.get(k) for k in keys},
            "files_with_datasets": sum(1 for f in data if f.get("datasets")),
            "files_without_datasets": sum(1 for f in data if not f.get("datasets")),
            "datasets": sum(len(f.get("datasets") or ()) for f in files.values()),
            "metadata_set": metadata.count("set"),
            "metadata_refused": metadata.count("refused")}


def _from_markers(markers: dict[int, dict[str, Any]], key: str) -> str | None:
    """What the tasks saw (e.g. the Rucio host their client talked to): first one recorded."""
    for task in sorted(markers):
        if markers[task].get(key):
            return str(markers[task][key])
    return None


class RunReadError(ValueError):
    """A file of a run directory cannot be read or understood; the message names it and
    says what to do (one line)."""


def read_run_json(run_dir: Path) -> dict[str, Any]:
    """run.json, or RunReadError naming it: every command that takes a run reads it here."""
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
    if not isinstance(run, dict) or not isinstance(run.get("plan"), dict) \
            or "run_id" not in run or "tasks" not in run["plan"]:
        raise RunReadError(f"{path}: not the record of a dac-upload run (no run_id or "
                           "plan.tasks); restore it from a backup, or plan a new run")
    return run


def manifest_problem(run_dir: Path, run: dict[str, Any], task: int) -> str | None:
    """Why the task's manifest is not the one planned (missing, or its sha256 differs from
    run.json's), or None. Runs planned before digests were recorded are taken as they are."""
    import hashlib

    path = RunLayout(run_dir).manifest(task)
    digests = (run.get("plan") or {}).get("manifest_sha256")
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


@dataclass
class RunState:
    """Everything the run directory says about a run."""

    run: dict[str, Any]
    manifests: dict[int, dict[str, Any]]
    results: dict[int, list[dict[str, Any]]]
    markers: dict[int, dict[str, Any]]
    problems: list[str]   # files in results/ that are not ours, markers that do not parse
    datasets: dict[str, list[dict[str, Any]]]   # relpath -> Butler datasets (butler.jsonl)
    collection: tuple[str, str] = ("", "")      # collection_state(): (state, why)
    collector: tuple[str | None, str | None] = (None, None)  # latest collector: (job, state)


def read_run(run_dir: Path) -> RunState:
    layout = RunLayout(run_dir)
    run = read_run_json(run_dir)
    n = int(run["plan"]["tasks"])
    problems: list[str] = []
    manifests = {}
    remade: dict[int, bytes] | None = None
    for t in range(n):
        why = manifest_problem(run_dir, run, t)
        if why is None:
            try:
                manifests[t] = read_manifest(layout.manifest(t))
                continue
            except ValueError as exc:   # a run planned without digests
                why = str(exc) if str(layout.manifest(t)) in str(exc) else \
                    f"{layout.manifest(t)}: damaged ({exc})"
        if remade is None:   # what the planner wrote, from the catalogue and the job copy
            from .pipeline import remake_manifests

            try:
                remade = remake_manifests(run_dir)
            except Exception as exc:
                raise RunReadError(f"{why}; and it cannot be made again from the run's "
                                   f"catalogue ({exc})") from None
        if t not in remade:
            raise RunReadError(f"{why}; the run's catalogue gives no task {t}")
        manifests[t] = json.loads(remade[t])
        manifests[t]["files"] = [dict(zip(manifests[t]["columns"], row))
                                 for row in manifests[t]["files"]]
        problems.append(f"{why}: its files are reported from the manifest as planned (made "
                        f"again from the catalogue); {REMAKE_HINT} {run_dir}")
    results = {t: list(read_result_records(layout.result(t), problems,
                                           f"results/{layout.result(t).name}"))
               for t in range(n) if layout.result(t).exists()}
    markers: dict[int, dict[str, Any]] = {}
    for t in range(n):
        if layout.done_marker(t).exists():
            try:
                markers[t] = read_json(layout.done_marker(t))
            except ValueError:
                problems.append(f"results/{layout.done_marker(t).name}: not valid JSON "
                                "(ignored)")
    ours = {p.name for t in range(n) for p in (layout.result(t), layout.done_marker(t),
                                                 layout.copies(t))}
    for path in sorted(layout.results.iterdir()) if layout.results.exists() else []:
        if path.name not in ours and not path.name.startswith("."):
            problems.append(f"results/{path.name}: not a file of this run (ignored)")
    datasets: dict[str, list[dict[str, Any]]] = {}
    butler = run.get("butler")
    if butler and (layout.dir / butler["files"]).exists():
        datasets = {r["relpath"]: [{"in_zip": False, **d} for d in r["datasets"]]
                    for r in read_jsonl(layout.dir / butler["files"])}
    return RunState(run, manifests, results, markers, problems, datasets,
                    collection_state(run_dir, run))


def collect(run_dir: Path) -> dict[str, Any]:
    """Read every manifest, result and marker of the run, write summary.json atomically."""
    state = read_run(run_dir)
    summary = build_summary(state.run, state.manifests, state.results, state.markers,
                            state.problems, state.datasets)
    atomic_write_json(RunLayout(run_dir).summary, summary)
    return summary


def collect_run(run_dir: Path) -> tuple[dict[str, Any], str | None]:
    """What the collector job (and ``dac-upload collect``) does: summary.json, then the
    job's ledger, then collected.json saying both are done and what they were made from.
    Returns (summary, why the ledger was not updated or None). A collector killed on the
    way leaves no collected.json (or one that no longer fits the results): status,
    resubmit and nightly see the run as not collected, and collect again."""
    import sqlite3

    fingerprint = results_fingerprint(run_dir)   # before reading: a later write shows
    state = read_run(run_dir)
    summary = build_summary(state.run, state.manifests, state.results, state.markers,
                            state.problems, state.datasets)
    layout = RunLayout(run_dir)
    atomic_write_json(layout.summary, summary)
    ledger_problem = None
    if state.run.get("ledger"):
        try:
            update_ledger(Path(state.run["ledger"]), state.run["run_id"], state.manifests,
                          summary)
        except (sqlite3.Error, OSError) as exc:
            ledger_problem = str(exc)
    atomic_write_json(layout.collected, {
        "submissions": len(state.run.get("submissions", [])), "results": fingerprint,
        "complete": summary["complete"], "ledger_problem": ledger_problem,
        "collected_at": utc_now()})
    return summary, ledger_problem


def results_fingerprint(run_dir: Path) -> str:
    """What the results of a run look like from outside (each task file's size and mtime):
    a summary made from other results is stale. O(tasks) stat calls, no file read."""
    import hashlib

    layout = RunLayout(run_dir)
    seen = []
    for path in sorted(layout.results.iterdir()) if layout.results.exists() else []:
        if path.name.startswith("."):
            continue
        st = path.stat()
        seen.append(f"{path.name} {st.st_size} {st.st_mtime_ns}")
    return hashlib.sha256("\n".join(seen).encode()).hexdigest()


COLLECTED, NOT_COLLECTED, STALE = "collected", "not collected", "stale"


def collection_state(run_dir: Path, run: dict[str, Any]) -> tuple[str, str]:
    """(state, why) of the run's summary.json: COLLECTED (made by a collector that finished,
    from the results as they are now), NOT_COLLECTED (none, or the collector stopped before
    finishing) or STALE (made before the latest results or submission)."""
    layout = RunLayout(run_dir)
    try:
        done = read_json(layout.collected)
    except (OSError, ValueError):
        done = None
    if done is None:
        if layout.summary.exists():
            return NOT_COLLECTED, ("the last collector stopped after writing summary.json and "
                                   "before finishing (the job's ledger may lack this run)")
        return NOT_COLLECTED, "no summary.json yet"
    if int(done.get("submissions") or 0) < len(run.get("submissions", [])):
        return STALE, "summary.json predates the latest submission"
    if done.get("results") != results_fingerprint(run_dir):
        return STALE, "summary.json predates the latest task results"
    return COLLECTED, "summary.json is up to date"


def records_so_far(run_dir: Path) -> tuple[int, int]:
    """(files with a result record, their bytes) over all tasks: progress while a run goes."""
    files = nbytes = 0
    for path in RunLayout(run_dir).results.glob("task-*.jsonl"):
        if path.name.endswith(".copies.jsonl"):
            continue
        for rec in read_jsonl(path):
            files += 1
            nbytes += rec.get("bytes") or 0
    return files, nbytes


def ledger_rows(manifests: dict[int, dict[str, Any]],
                summary: dict[str, Any]) -> list[dict[str, Any]]:
    """What the ledger learns from a run: done files, and failures only a person can fix
    (so that a nightly run does not try them again while they are unchanged)."""
    scope = summary["rucio"]["scope"]
    rows = []
    for manifest in manifests.values():
        for entry in manifest["files"]:
            f = summary["files"][f"{scope}:{entry['name']}"]
            if f["status"] in DONE_STATES:
                status = f["status"]
            elif f["status"] == FAILED and f.get("cause") in PERMANENT_CAUSES:
                status = f"failed:{f['cause']}"
            else:
                continue
            rows.append({"relpath": entry["relpath"], "size": entry["size"],
                         "mtime": entry["mtime"], "name": entry["name"], "status": status})
    return rows


def update_ledger(path: Path, run_id: str, manifests: dict[int, dict[str, Any]],
                  summary: dict[str, Any]) -> int:
    from .ledger import Ledger

    with Ledger(path) as ledger:
        return ledger.record(ledger_rows(manifests, summary), run_id)
