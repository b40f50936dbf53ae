"""What the upload paths ask of the Rucio side: ``RucioSession`` (rucio.client.RucioIO in
real use, the tests' fakes otherwise) and ``CopyTarget`` (rucio.storage.Storage). Written
down once so that the real classes and the fakes are held to the same interface
(tests/unit/test_session_protocol.py compares them)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from ..rucio.client import DidInfo, ReplicaInfo


class CopyTarget(Protocol):
    """An RSE's storage, written without UploadClient (the bulk path)."""

    @property
    def verification(self) -> str:
        """How a copy is checked, for the records' ``verified``."""
        ...

    def put(self, path: Path, scope: str, name: str, size: int, adler32: str,
            may_replace: Callable[[], bool], *,
            stale_temps: Collection[str] = ()) -> tuple[str, str]: ...

    def holds(self, scope: str, name: str, size: int, adler32: str) -> bool:
        """Whether the name's PFN holds these bytes now (False when the storage cannot say)."""
        ...


class RucioSession(Protocol):
    """One task's session with the Rucio server."""

    # lookups
    def did(self, scope: str, name: str) -> DidInfo | None: ...

    def dids_bulk(self, scope: str, names: list[str]) -> dict[str, DidInfo]: ...

    def replica(self, scope: str, name: str, rse: str) -> ReplicaInfo | None: ...

    def replicas_bulk(self, scope: str, names: list[str],
                      rse: str) -> dict[str, ReplicaInfo]: ...

    def guid(self, scope: str, name: str) -> str | None: ...

    # writing: the bulk path
    def storage(self, rse: str, rename: str = "auto") -> CopyTarget: ...

    def add_replicas(self, rse: str, scope: str, files: list[dict[str, Any]]) -> None: ...

    def add_rules(self, scope: str, names: list[str], rse: str,
                  lifetime: int | None) -> list[str]: ...

    def attach_bulk(self, dataset: tuple[str, str], scope: str, names: list[str]) -> bool: ...

    def add_to_archive(self, scope: str, archive: str, members: list[dict[str, Any]]
                       ) -> None: ...

    def set_metadata_bulk(self, scope: str, items: list[tuple[str, dict[str, Any]]]) -> None: ...

    # writing: the stock path, and both for datasets and rules
    def upload(self, path: Path, scope: str, name: str, rse: str,
               dataset: tuple[str, str] | None, lifetime: int | None,
               guid: str | None = None) -> tuple[str, str | None]: ...

    def ensure_dataset(self, dataset: tuple[str, str], rse: str, lifetime: int | None) -> str: ...

    def ensure_rule(self, scope: str, name: str, rse: str, lifetime: int | None,
                    grouping: str = "NONE") -> bool: ...

    def attach(self, dataset: tuple[str, str], scope: str, name: str) -> bool: ...
