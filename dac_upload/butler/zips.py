"""Butler zips: the ``_butler_zip_index.json`` of each archive a Butler job's [packing] makes.

The planner (which has ``lsst-daf-butler``) writes each archive's index, daf_butler's own
``ZipIndex``, into the task's manifest; the worker (which has only rucio-clients) writes it
into the archive as its first member, as ``butler retrieve-artifacts --zip`` does. The
archive is then a Butler zip: ``butler ingest-zip`` at the destination reads the index
(dataset types, refs, each member's datastore record) and ingests every dataset in it, and
Rubin's ingest daemon does the same for a file DID marked ``rubin_butler = "zip_file"``.

Members are at their Rucio names (as in any archive of dac-upload): a Rucio constituent is
extracted by its DID name, and the name mirrors the source datastore's path. A Butler source
gives each dataset its own ref and datastore record; a [[butler.map]] tree gives the ref
``butler ingest-files --id-generation-mode DATAID_TYPE_RUN`` would give it (the same id at
any destination) and a record from the map's storage class and formatter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .source import RepoSource, _one_line, import_butler


def packable(datasets: dict[str, list[dict[str, Any]]], relpath: str) -> bool:
    """Whether a small file may go into an archive: not a zip the source datastore already
    holds (``butler ingest-zip`` cannot read a zip inside a zip). No member can be named
    like the index: a Rucio name does not start with '_'."""
    found = datasets.get(relpath)
    return not (found and found[0].get("in_zip"))


class WithoutIndex:
    """The planner's packing rule without lsst (remake_manifests in the collector's image,
    or for a Butler source, whose indexes need its repository): no index."""

    def __init__(self, datasets: dict[str, list[dict[str, Any]]]) -> None:
        self._datasets = datasets

    def packs(self, relpath: str) -> bool:
        return packable(self._datasets, relpath)

    def index(self, members: Sequence[tuple[str, str, int]]) -> None:
        return None


class ZipIndexer:
    """Makes the index of each Butler zip of a run. Every member with a dataset is in its
    archive's index: ``butler-table`` ingests the archive of such a file, not the file."""

    def __init__(self, datasets: dict[str, list[dict[str, Any]]],
                 repo: RepoSource | None) -> None:
        daf_butler = import_butler()
        from lsst.daf.butler import SerializedDatasetRefContainerV1
        from lsst.daf.butler.datastore.stored_file_info import SerializedStoredFileInfo
        from lsst.daf.butler.datastores.file_datastore.retrieve_artifacts import (
            ArtifactIndexInfo,
            ZipIndex,
        )

        self._d = daf_butler
        self._zip_index, self._info, self._stored = ZipIndex, ArtifactIndexInfo, \
            SerializedStoredFileInfo
        self._container = SerializedDatasetRefContainerV1
        self._datasets, self._repo = datasets, repo
        self._universe = repo.butler.dimensions if repo is not None else \
            daf_butler.DimensionUniverse()
        self._types: dict[tuple[str, tuple[str, ...], str], Any] = {}
        self._ids = daf_butler.DatasetIdFactory()
        self._simple: dict[str, Any] = {}     # a source's dataset types, serialized once

    def packs(self, relpath: str) -> bool:
        return packable(self._datasets, relpath)

    def problems(self, where: str) -> list[str]:
        """One line per [[butler.map]] dataset type that cannot go into an index (a name
        or storage class the Butler refuses), before anything is written. A Butler
        source's types are the repository's own: nothing to check."""
        if self._repo is not None:
            return []
        lines = []
        seen: set[tuple[str, tuple[str, ...], str]] = set()
        for found in self._datasets.values():
            for d in found:
                key = (d["dataset_type"], tuple(d["dimensions"]), d["storage_class"])
                if key in seen:
                    continue
                seen.add(key)
                try:
                    self._dataset_type(d)
                except Exception as exc:   # ValueError, KeyError, ... from daf_butler
                    lines.append(f"{where}: [[butler.map]] dataset_type = "
                                 f"{d['dataset_type']!r}, storage_class = "
                                 f"{d['storage_class']!r}: the Butler refuses it for a zip "
                                 f"index ({_one_line(exc)}); fix the map")
        return lines

    def index(self, members: Sequence[tuple[str, str, int]]) -> str | None:
        """The index (JSON text) of an archive of ``members`` (relpath, Rucio name = member
        path, size), or None if none of them holds a dataset (a plain archive). What
        ``SerializedDatasetRefContainerV1.from_refs`` makes, built from the datasets'
        parts: a plain tree's refs are not made at all (three times faster)."""
        types: dict[str, Any] = {}
        refs: dict[Any, Any] = {}
        artifacts: dict[str, Any] = {}
        for relpath, name, size in members:
            ids = []
            info = None   # the file's record: that of its first dataset
            for dataset_id, dataset_type, minimal, record in self._datasets_of(relpath, name,
                                                                                size):
                types.setdefault(minimal["dataset_type_name"], dataset_type)
                refs[dataset_id] = minimal
                ids.append(dataset_id)
                info = info or record
            if ids:
                artifacts[name] = self._info(info=info, ids=set(ids))
        if not artifacts:
            return None
        u = self._universe
        container = self._container.model_validate({
            "universe_version": u.version, "universe_namespace": u.namespace,
            "dataset_types": types, "compact_refs": refs})
        return self._zip_index(refs=container, artifact_map=artifacts).model_dump_json()

    def _datasets_of(self, relpath: str, name: str, size: int) -> list[tuple[Any, ...]]:
        """(id, serialized dataset type, compact ref, datastore record at the member path)
        of each dataset of the file, as from_refs writes them (without dimension records:
        the run's dimension export carries those): the source's own, or the map's."""
        out = []
        if self._repo is not None:
            for ref, info in self._repo.stored.get(relpath, ()):
                record = info.to_simple()
                record.path = name
                dataset_type = self._simple.get(ref.datasetType.name)
                if dataset_type is None:
                    dataset_type = self._simple[ref.datasetType.name] = \
                        ref.datasetType.to_simple()
                out.append((ref.id, dataset_type, {
                    "dataset_type_name": ref.datasetType.name, "run": ref.run,
                    "data_id": dict(ref.dataId.mapping)}, record))
            return out
        for d in self._datasets.get(relpath, ()):
            dataset_id, dataset_type, data_id = self._map_id(d)
            out.append((dataset_id, dataset_type, {
                "dataset_type_name": d["dataset_type"], "run": d["run"], "data_id": data_id},
                self._stored(formatter=d["formatter"], path=name,
                             storage_class=d["storage_class"], component=None,
                             checksum=None, file_size=size)))
        return out

    def _map_id(self, d: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
        """(id, serialized dataset type, data ID) of a [[butler.map]] dataset: the id that
        ``butler ingest-files --id-generation-mode DATAID_TYPE_RUN`` gives it."""
        daf = self._d
        dataset_type, simple = self._dataset_type(d)
        group = dataset_type.dimensions
        data_id = {k: d["data_id"][k] for k in group.required}
        coordinate = daf.DataCoordinate.from_required_values(group, tuple(data_id.values()))
        dataset_id = self._ids.makeDatasetId(d["run"], dataset_type, coordinate,
                                             daf.DatasetIdGenEnum.DATAID_TYPE_RUN)
        return dataset_id, simple, data_id

    def _dataset_type(self, d: dict[str, Any]) -> tuple[Any, Any]:
        """A map dataset's DatasetType (its storage class looked up: an unknown one raises)
        and its serialized form, made once per type."""
        key = (d["dataset_type"], tuple(d["dimensions"]), d["storage_class"])
        known = self._types.get(key)
        if known is None:
            dataset_type = self._d.DatasetType(d["dataset_type"], d["dimensions"],
                                               d["storage_class"], universe=self._universe)
            dataset_type.storageClass   # noqa: B018 - resolves the name, or raises
            known = self._types[key] = (dataset_type, dataset_type.to_simple())
        return known
