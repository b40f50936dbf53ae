"""Fixtures of the integration layer (see ithelpers.py for what they rely on)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
from ithelpers import (
    CI_DIR,
    GRID_DIR,
    GRID_PROXY,
    RUCIO_CFG,
    STACKS,
    Stack,
    _services_problem,
    chown_user,
    grid_problem,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


# what a failed integration test leaves in its report: the tasks' logs of its runs and the
# ends of the services' logs, so a failure seen once in CI can be read without a rerun
_SERVICE_LOGS = [GRID_DIR / "apache" / "log" / "error.log",
                 GRID_DIR / "xrootd" / "log" / "dacgrid" / "xrootd.log",
                 CI_DIR / "rucio" / "log" / "gunicorn.log"]


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - 200 * lines))
            return "\n".join(fh.read().decode(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({exc})"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    workdir = getattr(item, "funcargs", {}).get("workdir")
    if isinstance(workdir, Path):
        for log in sorted(workdir.glob("**/logs/*"))[:40]:
            if log.is_file():
                report.sections.append((f"run log {log.relative_to(workdir)}", _tail(log, 40)))
    for log in _SERVICE_LOGS:
        if log.is_file():
            report.sections.append((f"service log {log}", _tail(log, 60)))


@pytest.fixture(scope="session")
def services() -> None:
    problem = _services_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"integration services unavailable in CI: {problem}")
        pytest.skip(problem)


@pytest.fixture
def workdir(services: None, request: pytest.FixtureRequest) -> Path:
    """A fresh directory owned by dacuser, outside root's private /tmp/pytest-of-root."""
    base = CI_DIR / "tests"
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    d = base / f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    (d / "token").mkdir()
    cfg = RUCIO_CFG.read_text().replace(
        str(CI_DIR / "rucio" / "token"), str(d / "token"))
    (d / "rucio.cfg").write_text(cfg)
    (d / "rucio.cfg").chmod(0o600)
    chown_user(d)
    return d


@pytest.fixture(scope="session")
def rucio_client(services: None) -> Any:
    os.environ["RUCIO_CONFIG"] = str(RUCIO_CFG)
    from rucio.client import Client
    from rucio.common.config import clean_cached_config

    clean_cached_config()   # a configuration read earlier in this process must not stay
    return Client()


PG_CI_DIR = CI_DIR / "rucio-pg"
PG_RUCIO_URL = "http://127.0.0.1:18081"


@pytest.fixture(scope="session")
def pg_rucio_client(services: None) -> Any:
    """A client of the second test Rucio server, the one on PostgreSQL (up.sh starts it):
    only there does Rucio keep free-form DID metadata such as rubin_sidecar."""
    import urllib.request

    try:
        urllib.request.urlopen(f"{PG_RUCIO_URL}/ping", timeout=5).read()
    except OSError as exc:
        problem = f"the PostgreSQL Rucio server ({PG_RUCIO_URL}) is not up: {exc}"
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    return _client_of(PG_CI_DIR / "etc" / "client.cfg")


@pytest.fixture
def pg_workdir(workdir: Path, pg_rucio_client: Any) -> Path:
    """workdir, with its rucio.cfg pointing at the PostgreSQL server."""
    cfg = (PG_CI_DIR / "etc" / "client.cfg").read_text().replace(
        str(PG_CI_DIR / "token"), str(workdir / "token"))
    (workdir / "rucio.cfg").write_text(cfg)
    chown_user(workdir)
    return workdir


def _client_of(cfg: Path) -> Any:
    """A Rucio client configured by ``cfg``; the process's RUCIO_CONFIG is left as it was
    (host, account and token file are read when the client is made, and kept)."""
    from rucio.client import Client
    from rucio.common.config import clean_cached_config

    before = os.environ.get("RUCIO_CONFIG")
    os.environ["RUCIO_CONFIG"] = str(cfg)
    clean_cached_config()
    try:
        return Client()
    finally:
        if before is None:
            os.environ.pop("RUCIO_CONFIG", None)
        else:
            os.environ["RUCIO_CONFIG"] = before
        clean_cached_config()


class StackUnderTest:
    """The stack a parametrised test runs on (ithelpers.Stack's fields and methods) and an
    admin client of its Rucio server: the independent checker."""

    def __init__(self, stack: Stack, client: Any) -> None:
        self.stack, self.client = stack, client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stack, name)


_ADMIN_CLIENTS: dict[str, Any] = {}


def _stack_for(request: pytest.FixtureRequest, workdir: Path) -> StackUnderTest:
    stack = STACKS[request.param]
    if stack.grid:
        problem = grid_problem()
        if problem:
            if os.environ.get("CI"):
                pytest.fail(f"grid stack unavailable in CI: {problem}")
            pytest.skip(problem)
        shutil.copy(GRID_PROXY, workdir / "x509up")   # the test's own: it may replace it
        (workdir / "x509up").chmod(0o600)
    (workdir / "rucio.cfg").write_text(stack.client_cfg(workdir))
    (workdir / "rucio.cfg").chmod(0o600)
    chown_user(workdir)
    if stack.id not in _ADMIN_CLIENTS:
        _ADMIN_CLIENTS[stack.id] = (_client_of(stack.admin_cfg) if stack.grid else None)
    client = _ADMIN_CLIENTS[stack.id] or request.getfixturevalue("rucio_client")
    return StackUnderTest(stack, client)


@pytest.fixture(params=list(STACKS))
def stack(request: pytest.FixtureRequest, workdir: Path) -> StackUnderTest:
    """Each stack in turn: posix (plain HTTP, userpass, POSIX RSE), root and davs (HTTPS,
    X.509 proxy, XRootD through gfal2, no rename). The workdir's rucio.cfg points at it."""
    return _stack_for(request, workdir)


@pytest.fixture(params=[s for s in STACKS if STACKS[s].grid])
def grid_stack(request: pytest.FixtureRequest, workdir: Path) -> StackUnderTest:
    """The grid stack only, over root:// and over davs://."""
    return _stack_for(request, workdir)


@pytest.fixture
def posix_stack(workdir: Path, rucio_client: Any) -> StackUnderTest:
    """The plain stack alone, for tests of what does not depend on the storage."""
    return StackUnderTest(STACKS["posix"], rucio_client)
