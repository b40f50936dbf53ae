"""The Butler side, on the planning host only (``pip install 'dac-upload[butler]'``).

- A Butler repository as the source: the query ([butler] collections, dataset_types, where)
  gives the datasets; the datastore's own records give each one's file, relative to the
  datastore root, which becomes the Rucio name (after [naming] prefix), so the tree at the
  destination mirrors the source datastore. Each file carries its datasets: type, run, data
  ID, storage class, formatter, id and the serialized ``DatasetRef`` (the ``rubin_sidecar``
  that Rubin's ingest daemon turns back into the ref).
- A plain tree with [[butler.map]] entries: a regex with named groups per dataset type gives
  each file its data ID (values converted to the dimension's type by the dimension universe).
- The dimension records the destination needs, as a ``butler export`` YAML file.

``lsst.daf.butler`` is imported here only, and only when a job asks for it: the array tasks
never import this module (they get plain JSON from the manifests).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..catalogue import UNREADABLE, Catalogue, Entry, Problem, Reader, Verdict, _inside, classify
from ..config import ButlerConfig
from ..errors import UserError
from ..progress import Progress

INSTALL_HINT = "pip install 'dac-upload[butler]'"


# the rubin_butler values of lsst/rucio_register (data_type.py), read by lsst-dm/ctrl_ingestd
RUBIN_DATA_PRODUCT = "data_product"


RUBIN_RAW_FILE = "raw_file"


RUBIN_DIM_FILE = "dim_file"


RUBIN_ZIP_FILE = "zip_file"


ZIP_FRAGMENT = "#zip-path="      # how the datastore names a dataset inside a zip


class ButlerError(UserError):
    """A Butler problem the user can fix; one line each, like PlanError."""


def import_butler() -> Any:
    """The ``lsst.daf.butler`` package, or one line saying how to get it."""
    try:
        import lsst.daf.butler as daf_butler
    except ImportError as exc:
        raise ButlerError([f"this job needs lsst-daf-butler on the planning host ({exc}); "
                           f"run: {INSTALL_HINT} (the array tasks do not need it)"]) from None
    return daf_butler


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) < 300 else text[:297] + "..."


def rubin_metadata(dataset: dict[str, Any], sidecar: str,
                   raw_types: tuple[str, ...]) -> dict[str, str]:
    """The file DID's metadata as lsst/rucio_register writes it (both values strings): a
    data product or raw with its ``DatasetRef.to_json()``, or a zip with an empty sidecar."""
    if dataset.get("in_zip"):
        return {"rubin_butler": RUBIN_ZIP_FILE, "rubin_sidecar": ""}
    kind = RUBIN_RAW_FILE if dataset["dataset_type"] in raw_types else RUBIN_DATA_PRODUCT
    return {"rubin_butler": kind, "rubin_sidecar": sidecar}


# ----------------------------------------------------------------------------- repository source
@dataclass
class RepoSource:
    """What planning learned from a Butler repository: the catalogue of its files, the
    datasets in each (relpath -> list, usually one), and for each file the full sidecar of
    its first dataset (``DatasetRef.to_json()`` with dimension records, as rucio_register's
    data-products command writes it; the datasets themselves keep a compact ref)."""

    catalogue: Catalogue
    datasets: dict[str, list[dict[str, Any]]]
    sidecars: dict[str, str]
    butler: Any = field(repr=False)
    refs: list[Any] = field(repr=False)
    notes: list[str] = field(default_factory=list)
    # relpath -> (ref, datastore record) of each dataset of a file not inside a zip: what a
    # Butler zip's index ([packing], butler/zips.py) says of its member
    stored: dict[str, list[tuple[Any, Any]]] = field(default_factory=dict, repr=False)

    def write_dimension_export(self, path: Path) -> None:
        """The dimension records of every uploaded dataset's data ID, and its RUN
        collections, as a ``butler export`` YAML file (``butler import DEST DIR
        --export-file FILE`` at the destination). Written atomically."""
        tmp = path.with_name(f".{path.name}.tmp")
        data_ids = {ref.dataId for ref in self.refs}
        runs = sorted({ref.run for ref in self.refs})
        try:
            with self.butler.export(filename=str(tmp), format="yaml") as export:
                export.saveDataIds(data_ids)
                for run in runs:
                    export.saveCollection(run)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        except Exception as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise ButlerError([f"exporting the dimension records failed: {_one_line(exc)}"]
                              ) from None
        os.replace(tmp, path)


def open_repo(cfg: ButlerConfig, where: str) -> tuple[Any, Any, Any]:
    """(butler, its file datastore, the datastore root URI), read-only; one line if the
    repository cannot be opened or has no local POSIX datastore."""
    daf_butler = import_butler()
    try:
        butler = daf_butler.Butler.from_config(cfg.repo, writeable=False)
    except Exception as exc:  # FileNotFoundError, ValueError, ... from deep inside
        raise ButlerError([f"{where}: [butler] repo = {cfg.repo!r} cannot be opened as a "
                           f"Butler repository ({_one_line(exc)}); give its directory, its "
                           "butler.yaml or a label of the repository index"]) from None
    datastore = _file_datastore(butler)
    root_uri = getattr(datastore, "root", None)
    records_of = getattr(datastore, "_get_stored_records_associated_with_refs", None)
    if root_uri is None or records_of is None or root_uri.scheme != "file":
        raise ButlerError([f"{where}: [butler] repo = {cfg.repo!r}: its datastore "
                           f"({type(datastore).__name__}, root {root_uri}) is not a POSIX "
                           "file datastore; dac-upload uploads files from a local datastore"])
    return butler, datastore, root_uri


def datastore_root(cfg: ButlerConfig, where: str) -> Path:
    """The source root of a Butler-source job: its datastore's root directory."""
    butler, _, root_uri = open_repo(cfg, where)
    butler.close()
    return Path(root_uri.ospath)


def catalogue_from_repo(cfg: ButlerConfig, where: str, progress: Progress | None = None,
                        keep: Callable[[str, int, float], bool] | None = None,
                        symlinks: str = "follow") -> RepoSource:
    """Query the repository and catalogue the files of the datasets found. ``keep`` (the
    nightly ledger filter) drops files already accounted for, and their datasets;
    ``symlinks`` is [source] symlinks (a datastore made with ``-t symlink`` holds links)."""
    butler, datastore, root_uri = open_repo(cfg, where)
    records_of = datastore._get_stored_records_associated_with_refs
    root = Path(root_uri.ospath)

    lacking: dict[Any, tuple[str, ...]] = {}   # dataset id -> elements it has no record of
    refs = _found_refs(butler, cfg, where, lacking)

    cat = Catalogue(root=root)
    records = records_of(refs) if refs else {}
    files: dict[str, list[tuple[Any, Any, bool]]] = {}
    for ref, info, relpath, in_zip in _files_of(refs, records, root_uri, cat):
        files.setdefault(relpath, []).append((ref, info, in_zip))
    _whole_zips(butler, records_of, root_uri, files, cat, lacking)
    reader = Reader()
    root_real = os.path.realpath(root)
    datasets: dict[str, list[dict[str, Any]]] = {}
    sidecars: dict[str, str] = {}
    stored: dict[str, list[tuple[Any, Any]]] = {}
    kept: list[Any] = []
    shared = 0
    nbytes = 0
    for relpath in sorted(files):      # path order: the ledger filter reads one directory
        members = files[relpath]       # at a time
        path = str(root / relpath)
        verdict = _file_verdict(path, symlinks, members[0][0])
        if verdict.skipped:
            cat.skipped.append(Problem(relpath, verdict.skipped))
            continue
        if verdict.refused:
            cat.refused.append(Problem(relpath, verdict.refused))
            continue
        st = verdict.st
        if verdict.link_dir is not None and not _inside(verdict.link_dir, root_real):
            cat.outside_targets.add(verdict.link_dir)
        if keep is not None and not keep(relpath, st.st_size, st.st_mtime):
            continue
        if not reader.can_read(st, path):
            cat.refused.append(Problem(relpath, UNREADABLE))
            continue
        datasets[relpath] = [_dataset_entry(ref, info, in_zip) for ref, info, in_zip in members]
        sidecars[relpath] = members[0][0].to_json()
        if not members[0][2]:
            stored[relpath] = [(ref, info) for ref, info, _ in members]
        kept.extend(ref for ref, _, _ in members)
        shared += len(members) > 1 and not members[0][2]
        cat.columns.add(relpath, st.st_size, st.st_mtime)
        nbytes += st.st_size
        if progress is not None:
            progress.update(cat.file_count, nbytes)
    if progress is not None:
        progress.done()
    notes = []
    if shared:
        notes.append(f"{shared} files hold more than one dataset: summary.json lists them all, "
                     "but the rubin_sidecar metadata carries the first only")
    incomplete = [(ref.datasetType.name, _label(ref), lacking[ref.id]) for ref in kept
                  if lacking.get(ref.id)]
    if incomplete:
        notes.append(missing_records_note(incomplete))
    return RepoSource(cat, datasets, sidecars, butler, kept, notes, stored)


def _found_refs(butler: Any, cfg: ButlerConfig, where: str,
                lacking: dict[Any, tuple[str, ...]]) -> list[Any]:
    """The datasets the query finds, once each (a calibration certified for several
    validity ranges comes once per range); ButlerError naming each dataset_types entry
    that finds none. ``lacking`` gets the datasets without some dimension records."""
    types, hits, errors = _dataset_types(butler, cfg, where)
    if errors:
        raise ButlerError(errors)
    by_id: dict[Any, Any] = {}
    for name in types:
        found = _query_datasets(butler, cfg, name, where, lacking)
        for ref in found:
            by_id.setdefault(ref.id, ref)
        for pattern in cfg.dataset_types:
            if fnmatch.fnmatchcase(name, pattern) and found:
                hits[pattern] += 1
    for pattern, n in hits.items():
        if n == 0:
            errors.append(f"{where}: [butler] dataset_types entry {pattern!r} finds no dataset "
                          f"in {list(cfg.collections)}" + (f" where {cfg.where}" if cfg.where
                                                           else "")
                          + "; fix the name, the collections or the where expression")
    if errors:
        raise ButlerError(errors)
    return list(by_id.values())


def _file_verdict(path: str, symlinks: str, ref: Any) -> Verdict:
    """catalogue.classify for a file the datastore lists; one that is not there says which
    dataset the datastore lists it for."""
    try:
        verdict = classify(path, os.lstat(path), symlinks)
    except FileNotFoundError:
        verdict = Verdict(missing=True)
    except OSError as exc:
        return Verdict(refused=f"cannot stat: {exc.strerror}")
    if verdict.missing:
        return Verdict(refused=f"the datastore lists it for {_label(ref)}, but the file is "
                               "missing")
    return verdict


def _query_datasets(butler: Any, cfg: ButlerConfig, name: str, where: str,
                    lacking: dict[Any, tuple[str, ...]]) -> list[Any]:
    """Every dataset of ``name`` the query matches, each with its dimension records.

    ``with_dimension_records=True`` (what rucio_register asks) joins the record of every
    element of the data ID, so a dataset whose data ID has an element without a record (a
    visit without its visit_detector_region rows: common, daf_butler says, as different
    processes write them) is left out without a word. The query without records finds those
    too; they get the records the repository has, and ``lacking`` the names of the others."""
    args: dict[str, Any] = {"collections": list(cfg.collections), "where": cfg.where,
                            "find_first": cfg.find_first, "explain": False, "limit": None}
    try:
        complete = butler.query_datasets(name, with_dimension_records=True, **args)
        every = butler.query_datasets(name, **args)
        have = {ref.id for ref in complete}
        rest = list({ref.id: ref for ref in every if ref.id not in have}.values())
        expanded = with_records(butler, rest)
    except Exception as exc:
        raise ButlerError([f"{where}: [butler] the query for {name!r} in "
                           f"{list(cfg.collections)} failed: {_one_line(exc)}; check "
                           "collections and where"]) from None
    for ref, missing in expanded:
        if missing:
            lacking[ref.id] = missing
    return complete + [ref for ref, _ in expanded]


def with_records(butler: Any, refs: list[Any]) -> list[tuple[Any, tuple[str, ...]]]:
    """Each ref with the dimension records the repository has for its data ID (None for the
    others), and the names of the elements it has none for: so that ``to_json`` (the
    sidecar) and ``Butler.export`` (the dimension file) work. Daf_butler's own expansion
    leaves a missing record out altogether, and both then fail with a KeyError."""
    from lsst.daf.butler import DataCoordinate, DimensionDataAttacher

    by_group: dict[Any, list[Any]] = {}
    for ref in refs:
        by_group.setdefault(ref.datasetType.dimensions, []).append(ref)
    out: list[tuple[Any, tuple[str, ...]]] = []
    for group, members in by_group.items():
        with butler.query() as query:
            attached = DimensionDataAttacher(dimensions=group).attach(
                group, [ref.dataId for ref in members], query)
        for ref, data_id in zip(members, attached):
            records = {element: _record_or_none(data_id, element) for element in group.elements}
            missing = tuple(e for e, record in records.items() if record is None)
            full = DataCoordinate.from_full_values(group, data_id.full_values)
            out.append((ref.expanded(full.expanded(records)), missing))
    return out


def _record_or_none(data_id: Any, element: str) -> Any:
    try:
        return data_id.records[element]
    except KeyError:     # the attacher found none in the repository
        return None


def missing_records_note(incomplete: list[tuple[str, str, tuple[str, ...]]]) -> str:
    """The plan's note on datasets whose data IDs lack dimension records in the source
    (``incomplete``: dataset type, label, missing elements, per dataset). They are uploaded:
    Butler ingests them without those records (a direct ingest and ingest-files alike), but
    the destination lacks them too, which whoever uses it must know."""
    by_type: dict[str, int] = {}
    by_element: dict[str, int] = {}
    for dataset_type, _, missing in incomplete:
        by_type[dataset_type] = by_type.get(dataset_type, 0) + 1
        for element in missing:
            by_element[element] = by_element.get(element, 0) + 1
    elements = " or ".join(e if len(by_element) == 1 else f"{e} ({n})"
                           for e, n in sorted(by_element.items()))
    types = ", ".join(f"{t}: {n}" for t, n in sorted(by_type.items()))
    return (f"{len(incomplete)} datasets ({types}) have no {elements} record in the repository "
            f"(e.g. {incomplete[0][1]}): they are uploaded with the records it has; the "
            "destination will lack the same records, so Butler queries with dimension records "
            "or by sky region will not find these datasets there (nor here) until those "
            "records are added")


def _whole_zips(butler: Any, records_of: Callable[[list[Any]], dict[Any, list[Any]]],
                root_uri: Any, files: dict[str, list[tuple[Any, Any, bool]]],
                cat: Catalogue, lacking: dict[Any, tuple[str, ...]]) -> None:
    """A zip (``butler ingest-zip``) is uploaded whole, and ``butler ingest-zip`` at the
    destination ingests every dataset of its index: so each zip lists all of them (and their
    dimension records are exported), not only those the query selected. ``lacking`` gets the
    record elements the extra datasets have no record of."""
    zips = [rel for rel, members in files.items() if members[0][2]]
    if not zips:
        return
    from lsst.daf.butler.datastores.file_datastore.retrieve_artifacts import ZipIndex

    for rel in zips:
        try:
            index = ZipIndex.from_zip_file(root_uri.join(rel))
        except Exception as exc:   # unreadable, or not a Butler zip
            cat.refused.append(Problem(rel, f"cannot read the zip's index: {_one_line(exc)}"))
            del files[rel]
            continue
        have = {ref.id for ref, _, _ in files[rel]}
        missing = [i for i in index.refs.compact_refs if i not in have]
        if not missing:
            continue
        extra = []
        for ref, no_record in with_records(butler, butler.get_many_datasets(missing)):
            extra.append(ref)
            if no_record:
                lacking[ref.id] = no_record
        extra_records = records_of(extra) if extra else {}
        for ref in extra:
            info = (extra_records.get(ref.id) or [None])[0]
            if info is not None:
                files[rel].append((ref, info, True))


def _file_datastore(butler: Any) -> Any:
    """The butler's file datastore (a chain of one file datastore is unwrapped); None for a
    client/server Butler, which has no local datastore."""
    datastore = getattr(butler, "_datastore", None)
    children = getattr(datastore, "datastores", None)
    if children is not None:
        files = [d for d in children if hasattr(d, "_get_stored_records_associated_with_refs")]
        if len(files) == 1:
            return files[0]
    return datastore


def _dataset_types(butler: Any, cfg: ButlerConfig,
                   where: str) -> tuple[list[str], dict[str, int], list[str]]:
    """Names of the dataset types in the collections that the patterns select."""
    hits = {p: 0 for p in cfg.dataset_types}
    try:
        infos = butler.collections.query_info(list(cfg.collections), flatten_chains=True,
                                              include_summary=True)
    except Exception as exc:
        return [], hits, [f"{where}: [butler] collections = {list(cfg.collections)}: "
                          f"{_one_line(exc)}; list them with: butler query-collections "
                          f"{cfg.repo}"]
    present = sorted({name for info in infos for name in (info.dataset_types or ())})
    chosen = [n for n in present
              if any(fnmatch.fnmatchcase(n, p) for p in cfg.dataset_types)]
    return chosen, hits, []


def _files_of(refs: list[Any], records: dict[Any, list[Any]], root_uri: Any,
              cat: Catalogue) -> Iterator[tuple[Any, Any, str, bool]]:
    """(ref, stored-file record, path relative to the datastore root, inside a zip) for each
    dataset stored in one file inside the root (a dataset inside a zip made by ``butler
    ingest-zip`` gives the zip); the others are listed as skipped, with why."""
    for ref in refs:
        infos = records.get(ref.id, [])
        if not infos:
            cat.skipped.append(Problem(_label(ref), "no file in the datastore (not stored "
                                       "there, or stored by another datastore)"))
            continue
        zips = {info.path.partition(ZIP_FRAGMENT)[0] for info in infos}
        if len(infos) > 1 and not (len(zips) == 1 and ZIP_FRAGMENT in infos[0].path):
            for info in infos:
                cat.skipped.append(Problem(info.path, f"one of the {len(infos)} component "
                                           f"files of {_label(ref)} (a disassembled "
                                           "composite): Butler ingests whole files only"))
            continue
        info = infos[0]
        path, zip_mark, _ = info.path.partition(ZIP_FRAGMENT)   # a dataset inside a zip
        in_zip = bool(zip_mark)
        if "://" in path or path.startswith("/"):   # an absolute URI: inside the root?
            rel = _resource_path(path).relative_to(root_uri)
            if not rel:
                cat.skipped.append(Problem(path, f"{_label(ref)} is stored outside the "
                                           "datastore root (ingested with -t direct): "
                                           "upload it from its own tree"))
                continue
            path = rel
        yield ref, info, path, in_zip


def _resource_path(path: str) -> Any:
    from lsst.resources import ResourcePath

    return ResourcePath(path, forceAbsolute=True)


def _label(ref: Any) -> str:
    return f"{ref.datasetType.name}@{dict(ref.dataId.required)} in {ref.run}"


def compact_ref(ref: Any) -> str:
    """``DatasetRef.to_json()`` without the dimension records (a third of the size; still
    what ``DatasetRef.from_json`` reads): what summary.json keeps per dataset."""
    simple = json.loads(ref.to_json())
    simple.get("dataId", {}).pop("records", None)
    return json.dumps(simple, separators=(",", ":"))


def _dataset_entry(ref: Any, info: Any, in_zip: bool) -> dict[str, Any]:
    dt = ref.datasetType
    return {"dataset_type": dt.name, "run": ref.run,
            "data_id": dict(ref.dataId.required),
            "dimensions": list(dt.dimensions.required),
            "storage_class": dt.storageClass_name, "is_calibration": dt.isCalibration(),
            "formatter": info.formatter, "dataset_id": str(ref.id), "ref": compact_ref(ref),
            "in_zip": in_zip}


# ----------------------------------------------------------------------------- plain-tree maps
def map_tree(entries: list[Entry], cfg: ButlerConfig, where: str,
             universe: Any = None) -> tuple[dict[str, list[dict[str, Any]]], list[str],
                                            list[Problem]]:
    """Each entry's dataset by the first [[butler.map]] whose regex matches its whole
    relative path: (relpath -> [dataset], relpaths no map matched, problems). Values are
    converted to the dimension's type (an exposure id is an int). A map that names an
    unknown dimension or leaves out a required one raises ButlerError."""
    if universe is None:
        universe = import_butler().DimensionUniverse()
    plans = []
    errors: list[str] = []
    for n, m in enumerate(cfg.maps, 1):
        keys = set(m.pattern.groupindex) | {k for k, _ in m.data_id}
        unknown = sorted(k for k in keys if k not in universe.dimensions.names)
        if unknown:
            errors.append(f"{where}: [[butler.map]] #{n} ({m.dataset_type}): "
                          f"{', '.join(unknown)} is not a dimension of the Butler's universe "
                          f"({universe.namespace} {universe.version}); use dimension names "
                          "such as instrument, exposure, detector, visit")
            continue
        required = list(universe.conform(sorted(keys)).required)
        missing = [k for k in required if k not in keys]
        if missing:
            errors.append(f"{where}: [[butler.map]] #{n} ({m.dataset_type}): the data ID "
                          f"lacks {', '.join(missing)}, which {', '.join(sorted(keys))} "
                          "need: add a path group or a data_id value")
            continue
        types = {k: universe.dimensions[k].primaryKey.getPythonType() for k in keys}
        same = [p for p in plans if p[0].dataset_type == m.dataset_type and p[1] != required]
        if same:
            errors.append(f"{where}: [[butler.map]] #{n} ({m.dataset_type}) gives it the "
                          f"dimensions {', '.join(required)}, another map "
                          f"{', '.join(same[0][1])}: a dataset type has one set of dimensions")
            continue
        plans.append((m, required, types))
    if errors:
        raise ButlerError(errors)
    datasets: dict[str, list[dict[str, Any]]] = {}
    unmatched: list[str] = []
    problems: list[Problem] = []
    for e in entries:
        for m, required, types in plans:
            hit = m.pattern.fullmatch(e.relpath)
            if hit is None:
                continue
            raw = {**dict(m.data_id), **hit.groupdict()}
            try:
                data_id = {k: _convert(types[k], v) for k, v in sorted(raw.items())}
            except ValueError as exc:
                problems.append(Problem(e.relpath, f"matches the map for {m.dataset_type}, "
                                        f"but {exc}; fix the path regex"))
                break
            datasets[e.relpath] = [{
                "dataset_type": m.dataset_type, "run": m.run, "data_id": data_id,
                "dimensions": required, "storage_class": m.storage_class,
                "is_calibration": False, "formatter": m.formatter, "dataset_id": None,
                "ref": None, "in_zip": False}]
            break
        else:
            unmatched.append(e.relpath)
    return datasets, unmatched, problems


def _convert(kind: type, value: Any) -> Any:
    if value is None:
        raise ValueError("an optional group matched nothing")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a {kind.__name__}") from None
