"""Before anything is submitted: would the tasks' uploads work? The credential files, then a
real login (not a cached token) with them, the scope, the RSE and the dataset's scope, one
line each with the fix. An unreachable server raises RucioUnavailable (exit 3, not 2)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import credentials
from .credentials import Credentials
from .errors import RucioFatal, RucioUnavailable

if TYPE_CHECKING:
    from ..config import JobConfig
    from ..runrecord import RunRecord


def problems(creds: Credentials, scope: str, rse: str, dataset_scope: str | None) -> list[str]:
    """What stands in the way of uploading to ``scope`` on ``rse`` with ``creds``."""
    found = credentials.local_problems(creds)
    if found:
        return found
    from .client import fresh_session, ping

    logging.getLogger("baseclient").setLevel(logging.CRITICAL)  # we report in one line
    try:
        ping(creds)   # a TLS failure (CA, host name, a refused proxy) is said as such
        with fresh_session(creds) as rio:
            return rio.preflight(scope, rse, dataset_scope)
    except RucioUnavailable:
        raise
    except RucioFatal as exc:
        return [str(exc)]


def job_problems(job: JobConfig, creds: Credentials) -> list[str]:
    """problems() for a job about to be planned (pipeline.prepare_run's preflight)."""
    ds = job.rucio.dataset_did
    return problems(creds, job.rucio.scope, job.rucio.rse, ds[0] if ds else None)


def run_problems(run: RunRecord) -> list[str]:
    """problems() for a planned run, with the credentials its tasks will use; [] for a run
    planned by a version that recorded none (its tasks use RUCIO_CONFIG as it is)."""
    if run.credentials is None:
        return []
    ds = run.dataset_did
    return problems(Credentials.from_record(run.credentials), run.scope, run.rse,
                    ds[0] if ds else None)
