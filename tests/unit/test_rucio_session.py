"""rucio.client's process set-up for a run's credentials (no server needed)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dac_upload.config import parse_job
from dac_upload.rucio import credentials
from dac_upload.rucio.client import _TokenFileClient, use_client_config


@pytest.fixture(autouse=True)
def _restore_process_state() -> Iterator[None]:
    """use_client_config changes this process's environment and Rucio's cached
    configuration: give both back, so later tests (the integration layer's admin client
    among them) do not see this test's server."""
    from rucio.common.config import clean_cached_config

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    clean_cached_config()


def _creds(tmp_path: Path, **keys: str) -> credentials.Credentials:
    raw = {"source": {"root": str(tmp_path)},
           "rucio": {"scope": "s", "rse": "R", "host": "http://r", **keys},
           "container": {"runtime": "none"}}
    job = parse_job(raw, path=tmp_path / "j.toml")
    return credentials.resolve(job.rucio, {}, 1234, "j.toml")


def test_inherited_variables_cannot_override_the_runs_choices(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("RUCIO_ACCOUNT", "someone"), ("RUCIO_AUTH_TYPE", "ssh"),
                        ("RUCIO_CLIENT_PROXY", "/x"), ("BEARER_TOKEN", "t"),
                        ("X509_CERT_DIR", "/other")):
        monkeypatch.setenv(name, value)
    pw = tmp_path / "pw"
    pw.write_text("p%w\n")
    c = _creds(tmp_path, account="jb", auth_type="userpass", username="u",
               password_file=str(pw))
    cfg = tmp_path / "rucio.cfg"
    credentials.write_client_config(cfg, credentials.client_config_text(
        c, credentials.load_base(None)))
    use_client_config(cfg, c)
    assert os.environ["RUCIO_ACCOUNT"] == "jb" and os.environ["RUCIO_AUTH_TYPE"] == "userpass"
    assert os.environ["RUCIO_CONFIG"] == str(cfg)
    for name in ("RUCIO_CLIENT_PROXY", "BEARER_TOKEN", "X509_CERT_DIR"):
        assert name not in os.environ
    from rucio.common.config import config_get

    assert config_get("client", "password") == "p%w"        # in memory, interpolation-safe
    assert "p%w" not in cfg.read_text()


def test_password_header_is_never_logged(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    c = _creds(tmp_path, auth_type="userpass", username="u", password_file=str(pw))
    cfg = tmp_path / "rucio.cfg"
    credentials.write_client_config(cfg, credentials.client_config_text(
        c, credentials.load_base(None)))
    use_client_config(cfg, c)
    log = logging.getLogger("baseclient")
    handler = logging.StreamHandler()
    log.addHandler(handler)
    monkeypatch.setattr(log, "level", logging.DEBUG)
    try:
        log.debug("HTTP header:  X-Rucio-Password: s3cret")
    finally:
        log.removeHandler(handler)
    assert "s3cret" not in capsys.readouterr().err


def test_token_client_rereads_the_file_and_never_prompts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "bt"
    token.write_text("old\n")
    monkeypatch.setenv("BEARER_TOKEN_FILE", str(token))
    client = object.__new__(_TokenFileClient)       # no server: only the renewal logic
    client.auth_token = "old"
    assert client._BaseClient__get_token_oidc() is False    # not renewed: CannotAuthenticate
    token.write_text("new\n")
    assert client._BaseClient__get_token_oidc() is True and client.auth_token == "new"


def test_slow_rule_requests_get_smaller(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request that took too long per rule (SQLite's lock waits) halves the next ones."""
    from dac_upload.rucio import client as rucio_client

    sizes: list[int] = []

    class SlowClient:
        def add_replication_rule(self, dids: list[Any], *args: Any, **kw: Any) -> None:
            sizes.append(len(dids))
            clock[0] += len(dids) * (1.0 if len(dids) > 25 else 0.01)

    clock = [0.0]
    monkeypatch.setattr(rucio_client.time, "monotonic", lambda: clock[0])
    rio = object.__new__(rucio_client.RucioIO)
    rio.client, rio.rules_per_request, rio.ruled = SlowClient(), 100, set()
    monkeypatch.setattr(rucio_client.RucioIO, "account", property(lambda self: "a"))
    assert rio.add_rules("s", [f"n{i}" for i in range(300)], "R", None) == []
    assert sizes == [100, 50, 25, 25, 25, 25, 25, 25]
    assert sum(sizes) == 300


@pytest.mark.parametrize("text, expect", [
    ("HTTPSConnectionPool(host='h', port=443): Max retries exceeded (Caused by SSLError("
     "SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
     "failed: self-signed certificate in certificate chain (_ssl.c:992)')))",
     "is not signed by a CA in /ca (self-signed certificate in certificate chain): set "
     "[rucio] ca_dir"),
    ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: Hostname mismatch, "
     "certificate is not valid for 'alias.example'. (_ssl.c:992)",
     "does not name that host (Hostname mismatch, certificate is not valid for "
     "'alias.example'.): set [rucio] host"),
    ("[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca (_ssl.c:2580)",
     "refused the X.509 proxy /px during the TLS handshake (unknown ca): make a fresh RFC "
     "3820 proxy"),
    ("Connection refused", None),
])
def test_tls_failures_say_what_to_fix(text: str, expect: str | None) -> None:
    from dac_upload.rucio.client import tls_problem

    line = tls_problem("https://h", Path("/ca"), Path("/px"), text)
    assert (line is None) if expect is None else (line is not None and expect in line), line


def test_a_file_still_being_written_is_no_verified_copy() -> None:
    from rucio.common.exception import RSEChecksumUnavailable

    from dac_upload.rucio.storage import _still_written

    assert _still_written(RSEChecksumUnavailable("Could not get the checksum (Operation now "
                                                 "in progress)"))
    assert not _still_written(RSEChecksumUnavailable("checksum not supported"))
