"""From a collected run to what `butler ingest-files` needs at the destination: ECSV tables
per dataset type and run, the zips to ingest whole, and ingest.sh."""

from __future__ import annotations

import io
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from ..render import render_template
from ..runrecord import DONE_STATES
from .source import INSTALL_HINT, ButlerError

ID_GENERATION_MODE = "DATAID_TYPE_RUN"   # the same table ingested anywhere gives the same ids
# Rucio gives a constituent of an archive the archive's URL with this query (core/replica.py)
IN_ARCHIVE_QUERY = "xrdcl.unzip="


@dataclass(frozen=True)
class IngestTable:
    """One ECSV table for ``butler ingest-files``: one dataset type, run and formatter."""

    path: Path
    dataset_type: str
    run: str
    formatter: str | None
    storage_class: str | None
    dimensions: tuple[str, ...]
    is_calibration: bool
    rows: int


@dataclass
class IngestPlan:
    tables: list[IngestTable]
    zips: list[str]                  # zip files (butler ingest-zip), by URI
    not_uploaded: list[str]          # files with datasets that are not on the RSE
    not_matched: list[str]           # uploaded files without a dataset (no map matched)
    in_earlier_archive: list[str]    # already in Rucio as a member of another run's archive
    skipped: list[str]               # datasets left out when planning (skipped.jsonl)
    dimension_export: Path | None
    script: Path
    commands: list[str]


def ingest_tables(summary: dict[str, Any], run_dir: Path, out_dir: Path,
                  relative_to: str | None = None, overwrite: bool = False) -> IngestPlan:
    """Write one ECSV table per dataset type, run and formatter of a collected run (the
    file's URI first: its RSE URL, or that URL relative to ``relative_to``; then one column
    per dimension), the dimension records (Butler source) and ingest.sh, the commands that
    ingest them into a destination Butler. Nothing is written if a target exists (unless
    ``overwrite``). Needs astropy (the [butler] extra)."""
    try:
        from astropy.table import Table
    except ImportError as exc:
        raise ButlerError([f"butler-table needs astropy ({exc}); run: {INSTALL_HINT}"]) from None
    from ..files import atomic_write_text, read_jsonl

    butler = summary.get("butler")
    if not butler:
        raise ButlerError([f"{run_dir}: this run's job has no [butler] section, so its files "
                           "have no data IDs; add [butler] repo or [[butler.map]] and plan a "
                           "new run"])
    prefix = None
    if relative_to:
        prefix = relative_to if relative_to.endswith("/") else relative_to + "/"
    found = _by_table(summary, butler.get("dimension_file"), prefix, relative_to)
    groups, first, zips = found.groups, found.first, found.zips
    skipped: list[str] = []
    if butler.get("kind") == "repo" and (run_dir / "skipped.jsonl").exists():
        skipped = [f"{r['relpath']}: {r['reason']}" for r in read_jsonl(run_dir / "skipped.jsonl")]

    # names first, and nothing written while one of them is in the way
    ordered = sorted(groups, key=lambda g: (g[0], g[1], g[2] or "", g[3]))
    names = _table_names(ordered)
    export_name = butler.get("dimension_export")
    targets = [out_dir / n for n in [*names, *([export_name] if export_name else []),
                                     "ingest.sh"]]
    in_the_way = [t for t in targets if t.exists()]
    if in_the_way and not overwrite:
        raise ButlerError([f"{in_the_way[0]} exists (and {len(in_the_way) - 1} more of the "
                           "files to write); write elsewhere (--out) or pass --overwrite"
                           if len(in_the_way) > 1 else
                           f"{in_the_way[0]} exists; write elsewhere (--out) or pass "
                           "--overwrite"])
    export_text = None
    if export_name:
        try:
            export_text = (run_dir / export_name).read_text(encoding="utf-8")
        except OSError as exc:
            raise ButlerError([f"{run_dir / export_name}: cannot read the run's dimension "
                               f"records ({exc.strerror or exc})"]) from None

    out_dir.mkdir(parents=True, exist_ok=True)
    tables: list[IngestTable] = []
    for group, name in zip(ordered, names):
        dataset_type, run, formatter, dims = group
        path = out_dir / name
        rows = sorted(groups[group], key=lambda r: r[0])
        table = Table(rows=[(uri, *(data_id[k] for k in dims)) for uri, data_id in rows],
                      names=("uri", *dims))
        table.meta["comments"] = [f"dac-upload run {summary['run_id']}: {dataset_type} in "
                                  f"{run}, {len(rows)} files"]
        text = io.StringIO()
        table.write(text, format="ascii.ecsv")
        atomic_write_text(path, text.getvalue())
        d = first[group]
        tables.append(IngestTable(path, dataset_type, run, formatter, d.get("storage_class"),
                                  tuple(d.get("dimensions") or dims),
                                  bool(d.get("is_calibration")), len(rows)))
    export = None
    if export_name and export_text is not None:
        export = out_dir / export_name
        atomic_write_text(export, export_text)
    commands = _ingest_commands(tables, zips, export, prefix, found.zip_calibrations)
    script = out_dir / "ingest.sh"
    atomic_write_text(script, render_template("ingest.sh.j2", run_id=summary["run_id"],
                                              prefix=prefix, commands=commands), 0o777)
    return IngestPlan(tables, zips, found.not_uploaded, found.not_matched,
                      found.in_earlier_archive, skipped, export, script, commands)


Group = tuple[Any, ...]   # (dataset type, run, formatter, data ID keys): one table


class _ByTable(NamedTuple):
    groups: dict[Group, list[tuple[str, dict[str, Any]]]]   # table -> (URI, data ID) rows
    first: dict[Group, dict[str, Any]]                      # table -> its first dataset
    zips: list[str]                                         # URIs ingested whole
    not_uploaded: list[str]
    not_matched: list[str]
    zip_calibrations: set[str]                              # calibration types in zips
    in_earlier_archive: list[str]


def _by_table(summary: dict[str, Any], dimension_file: str | None, prefix: str | None,
              relative_to: str | None) -> _ByTable:
    """The summary's done files sorted into tables (pure); ButlerError if a URL does not
    start with --relative-to."""
    out = _ByTable({}, {}, [], [], [], set(), [])
    outside: list[str] = []
    zipped: set[str] = set()
    for _key, f in sorted(summary["files"].items()):
        if f["name"] == dimension_file:   # the records, for Rubin's daemon
            continue
        datasets = f.get("datasets") or []
        if not datasets:
            if f["status"] in DONE_STATES:
                out.not_matched.append(f["relpath"])
            continue
        if f["status"] not in DONE_STATES or not f.get("pfn"):
            out.not_uploaded.append(f"{f['relpath']} ({f['status']}"
                                    + (f": {f['error']}" if f.get("error") else "") + ")")
            continue
        uri = f["pfn"]
        if IN_ARCHIVE_QUERY in uri and not f.get("archive"):
            # a file this run found in Rucio already, inside an archive of an earlier run
            # (a file touched since, kept loose by nightly): its dataset goes with that
            # archive, and its URL is no file a Butler can read
            out.in_earlier_archive.append(f"{f['relpath']} (in {uri.split('?')[0]})")
            continue
        if prefix is not None:
            if not uri.startswith(prefix):
                outside.append(uri)
                continue
            uri = uri[len(prefix):]
        if datasets[0].get("in_zip") or f.get("archive"):   # a zip: ingested whole, once
            out.zip_calibrations.update(d["dataset_type"] for d in datasets
                                        if d.get("is_calibration"))
            if uri not in zipped:
                zipped.add(uri)
                out.zips.append(uri)
            continue
        for d in datasets:
            group = (d["dataset_type"], d["run"], d.get("formatter"),
                     tuple(sorted(d["data_id"])))
            out.groups.setdefault(group, []).append((uri, d["data_id"]))
            out.first.setdefault(group, d)
    if outside:
        raise ButlerError([f"{len(outside)} RSE URLs do not start with --relative-to "
                           f"{relative_to!r} (e.g. {outside[0]}); give the common prefix of "
                           "the RSE's URLs"])
    return out


def _table_names(ordered: list[Group]) -> list[str]:
    """<dataset type>.<run>.ecsv per table, numbered where two would share a name."""
    names: list[str] = []
    for dataset_type, run, _, _ in ordered:
        stem = f"{dataset_type}.{_slug(run)}"
        name, n = f"{stem}.ecsv", 1
        while name in names:
            n += 1
            name = f"{stem}.{n}.ecsv"
        names.append(name)
    return names


def _q(text: str) -> str:
    import shlex

    return shlex.quote(text)


def _ingest_commands(tables: list[IngestTable], zips: list[str], export: Path | None,
                     prefix: str | None, zip_calibrations: Collection[str] = ()
                     ) -> list[str]:
    """The lines of ingest.sh: records, dataset types, tables, zips (files by $HERE/name)."""
    commands: list[str] = []
    if export is not None:
        commands.append(f'butler import "$DEST" "$HERE" --export-file "$HERE"/{_q(export.name)}')
    registered: set[str] = set()
    for t in tables:
        if t.dataset_type in registered:
            continue
        registered.add(t.dataset_type)
        if t.storage_class:
            commands.append(f'butler register-dataset-type "$DEST" {_q(t.dataset_type)} '
                            f"{_q(t.storage_class)} {' '.join(_q(x) for x in t.dimensions)}"
                            + (" --is-calibration" if t.is_calibration else ""))
        else:
            commands.append(f"# register {t.dataset_type} at the destination first (its "
                            "storage class is not known: set [[butler.map]] storage_class)")
        if t.is_calibration:
            commands.append(f"# {t.dataset_type} is a calibration: ingest-files puts it in its "
                            "RUN only; certify it into a CALIBRATION collection yourself "
                            "(butler certify-calibrations)")
    for t in tables:
        commands.append("butler ingest-files -t direct"
                        + (f" --formatter {_q(t.formatter)}" if t.formatter else "")
                        + (' --prefix "$PREFIX"' if prefix else "")
                        + f" --id-generation-mode {ID_GENERATION_MODE}"
                        + f' "$DEST" {_q(t.dataset_type)} {_q(t.run)} "$HERE"/{_q(t.path.name)}')
    for dataset_type in sorted(zip_calibrations):
        commands.append(f"# {dataset_type} is a calibration: ingest-zip puts it in its RUN "
                        "only; certify it into a CALIBRATION collection yourself (butler "
                        "certify-calibrations)")
    for uri in zips:
        commands.append('butler ingest-zip -t direct "$DEST" '
                        + (f'"$PREFIX"{_q(uri)}' if prefix else _q(uri)))
    return commands


def _slug(run: str) -> str:
    """A RUN collection name as part of a file name (u/jbloggs/run1 -> u_jbloggs_run1)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in run)
