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

from .source import RepoSource, import_butler


class ZipIndexer:
    """Makes the index of each Butler zip of a run. Every member with a dataset is in its
    archive's index: ``butler-table`` ingests the archive of such a file, not the file."""

    def __init__(self, datasets: dict[str, list[dict[str, Any]]],
                 repo: RepoSource | None) -> None:
        daf_butler = import_butler()
        from lsst.daf.butler.datastores.file_datastore.retrieve_artifacts import (
            ArtifactIndexInfo,
            SerializedDatasetRefContainerV1,
            ZipIndex,
        )

        self._d = daf_butler
        self._zip_index, self._info = ZipIndex, ArtifactIndexInfo
        self._container = SerializedDatasetRefContainerV1
        self._datasets, self._repo = datasets, repo
        self._universe = repo.butler.dimensions if repo is not None else \
            daf_butler.DimensionUniverse()
        self._types: dict[tuple[str, tuple[str, ...], str], Any] = {}

    def packs(self, relpath: str) -> bool:
        """Whether a small file may go into an archive: not a zip the source datastore
        already holds (``butler ingest-zip`` cannot read a zip inside a zip)."""
        found = self._datasets.get(relpath)
        return not (found and found[0].get("in_zip"))

    def index(self, members: Sequence[tuple[str, str, int]]) -> str | None:
        """The index (JSON text) of an archive of ``members`` (relpath, Rucio name = member
        path, size), or None if none of them holds a dataset (a plain archive)."""
        refs: list[Any] = []
        artifacts: dict[str, Any] = {}
        for relpath, name, size in members:
            pairs = self._refs_and_records(relpath, name, size)
            if not pairs:
                continue
            refs.extend(ref for ref, _ in pairs)
            artifacts[name] = self._info(info=pairs[0][1], ids={ref.id for ref, _ in pairs})
        if not artifacts:
            return None
        return self._zip_index(refs=self._container.from_refs(refs),
                               artifact_map=artifacts).model_dump_json()

    def _refs_and_records(self, relpath: str, name: str, size: int) -> list[tuple[Any, Any]]:
        """(ref, serialized datastore record at the member path) for each dataset of the
        file: the source datastore's own record, or one made from the map."""
        if self._repo is not None:
            out = []
            for ref, info in self._repo.stored.get(relpath, ()):
                simple = info.to_simple()
                simple.path = name
                out.append((ref, simple))
            return out
        from lsst.daf.butler.datastore.stored_file_info import SerializedStoredFileInfo

        out = []
        for d in self._datasets.get(relpath, ()):
            ref = self._map_ref(d)
            out.append((ref, SerializedStoredFileInfo(
                formatter=d["formatter"], path=name, storage_class=d["storage_class"],
                component=None, checksum=None, file_size=size)))
        return out

    def _map_ref(self, d: dict[str, Any]) -> Any:
        """The ref of a [[butler.map]] dataset, with the id ``butler ingest-files
        --id-generation-mode DATAID_TYPE_RUN`` gives it."""
        daf = self._d
        key = (d["dataset_type"], tuple(d["dimensions"]), d["storage_class"])
        dataset_type = self._types.get(key)
        if dataset_type is None:
            dataset_type = self._types[key] = daf.DatasetType(
                d["dataset_type"], d["dimensions"], d["storage_class"],
                universe=self._universe)
        data_id = daf.DataCoordinate.standardize(
            {k: d["data_id"][k] for k in d["dimensions"]}, dimensions=dataset_type.dimensions)
        dataset_id = daf.DatasetIdFactory().makeDatasetId(
            d["run"], dataset_type, data_id, daf.DatasetIdGenEnum.DATAID_TYPE_RUN)
        return daf.DatasetRef(dataset_type, data_id, run=d["run"], id=dataset_id)
