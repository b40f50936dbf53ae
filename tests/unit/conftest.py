"""Fixtures of the unit layer (plain helpers live in unit_helpers.py)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import pytest
from unit_helpers import job_text, make_proxy, write_job, write_tree

from dac_upload.config import JobConfig, load_job


@pytest.fixture(autouse=True)
def _no_rucio_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests see no Rucio configuration or credentials of the machine they run on."""
    for name in ("RUCIO_CONFIG", "RUCIO_HOME", "RUCIO_ACCOUNT", "RUCIO_AUTH_TYPE",
                 "X509_USER_PROXY", "X509_CERT_DIR", "X509_USER_CERT", "X509_USER_KEY",
                 "BEARER_TOKEN", "BEARER_TOKEN_FILE", "VIRTUAL_ENV", "CONDA_PREFIX"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def proxy(tmp_path: Path) -> Path:
    """An RFC 3820 proxy valid for one day (openssl), mode 600."""
    return make_proxy(tmp_path)


@pytest.fixture
def make_job(tmp_path: Path) -> Callable[..., JobConfig]:
    """``make_job(files, source='include = [...]', ...)``: the tree ``tmp_path/data`` holding
    ``files`` (default one small file) and a loaded job file ``tmp_path/job.toml``."""

    def make(files: Mapping[str, bytes | str] | None = None, filename: str = "job.toml",
             **extra: str) -> JobConfig:
        write_tree(tmp_path / "data", {"a.fits": b"hello"} if files is None else files)
        return load_job(write_job(tmp_path, job_text(**extra), filename))

    return make
