"""The Rucio client side: configuring the Rucio client for the run's credentials, the session
(RucioIO) every step uses for Rucio's server (preflight, lookups, bulk registration, rules,
datasets, metadata, UploadClient's stock upload), and the TLS and ping checks. With
rucio/errors.py and rucio/storage.py, the only code that imports rucio: everything Rucio says
becomes our own types and the two exceptions of rucio/errors.py.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
from rucio.client import Client
from rucio.client.uploadclient import UploadClient
from rucio.common import config as rucio_config
from rucio.common import exception as rexc

from .credentials import (
    RUCIO_AUTH_TYPE,
    Credentials,
    CredentialsError,
    read_password,
    renew_proxy_command,
)
from .errors import (
    LOG,
    MetadataRefused,
    RucioFatal,
    RucioFileError,
    RucioUnavailable,
    StorageFull,
    describe,
    full_message,
    storage_error,
    storage_full,
    translate,
    unreachable,
)
from .storage import Storage

# Rucio makes the rules of one request one by one in one transaction. On the SQLite test
# server a request of 500 made 365 rules in 2 s, then each further one waited 5 s for a lock
# (its own config read, once the transaction had spilled to disk); later, with a larger
# database, even requests of 100 stalled so. Requests start at RULES_PER_REQUEST rules and
# are halved (down to 10) after one that took more than RULE_SECONDS per rule.
RULES_PER_REQUEST = 100
DIDS_PER_REQUEST = 1000   # Rucio's schema: at most 1,000 DIDs in a lookup or an attachment


RULE_SECONDS = 0.05


@dataclass(frozen=True)
class DidInfo:
    bytes: int | None
    adler32: str | None
    md5: str | None
    guid: str | None = None


@dataclass(frozen=True)
class ReplicaInfo:
    state: str
    pfn: str
    bytes: int | None
    adler32: str | None


@dataclass(frozen=True)
class FileReplicas:
    """What Rucio holds of one file DID, for verify: the DID's size and checksums, its
    replica on the RSE asked about (``state`` None: no replica there) with that replica's
    PFNs, and every collection it is in, however deep ("scope:name")."""

    bytes: int | None
    adler32: str | None
    md5: str | None
    state: str | None
    pfns: tuple[str, ...]
    parents: tuple[str, ...]


@dataclass(frozen=True)
class RuleInfo:
    """One replication rule of a DID, as verify weighs it. ``expires_at`` (UTC, naive as
    the server's): a lifetime, or a deletion asked for (Rucio deletes a rule an hour after
    delete-rule, meanwhile it only expires)."""

    id: str
    rse_expression: str
    copies: int
    state: str
    account: str
    expires_at: datetime | None


_RFC1123 = "%a, %d %b %Y %H:%M:%S UTC"   # the server's dates (rucio.common.utils.DATE_FORMAT)


def _when(value: Any) -> datetime | None:
    """A date as the client gives it: a datetime (its JSON parser converts the server's
    RFC 1123 strings), a string it left alone, or None."""
    if value is None or isinstance(value, datetime):
        return value
    try:
        return datetime.strptime(str(value), _RFC1123)
    except ValueError:
        return None


def _external(did: str) -> str:
    """A DID as list_replicas names a parent ("scope:name" with the scope's internal form,
    which carries "@vo" on a multi-VO server) in its external form."""
    scope, _, name = did.partition(":")
    return f"{scope.split('@', 1)[0]}:{name}"


def _client_creds(creds: Credentials) -> dict[str, Any]:
    if creds.auth_type == "userpass":
        return {"username": creds.username, "password": read_password(creds)}
    if creds.auth_type == "x509_proxy":
        return {"client_proxy": str(creds.proxy)}
    if creds.auth_type == "x509":
        return {"client_cert": str(creds.certificate), "client_key": str(creds.key)}
    return {}   # token: Rucio finds it through BEARER_TOKEN_FILE (use_client_config)


class _Capture(logging.Handler):
    """Keep what UploadClient logs: it swallows transfer errors and only logs them."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.messages: list[str] = []
        self.errors: list[BaseException] = []   # logged with exc_info: the real chain

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])

    def reason(self) -> str | None:
        """The last failure UploadClient logged, as the storage said it when Rucio's
        wrapper hides it (``RSE does not support requested operation. Details:
        'prefix'``)."""
        for exc in reversed(self.errors):
            real = storage_error(exc)
            if real is not None:
                return describe(real)
        for msg in reversed(self.messages):
            if msg.startswith("Exception:"):
                return " ".join(msg[len("Exception:"):].split())
        for msg in reversed(self.messages):
            if "fail" in msg.lower() or "error" in msg.lower():
                return msg
        return None

    def full(self) -> str | None:
        """What the storage said, if a failure UploadClient logged means it is full."""
        for exc in reversed(self.errors):
            said = storage_full(exc)
            if said:
                return said
        return next((said for msg in reversed(self.messages) if msg.startswith("Exception:")
                     and (said := storage_full(Exception(msg)))), None)


@contextlib.contextmanager
def _stat_retries(retries: int | None) -> Iterator[None]:
    """UploadClient treats a destination size of 0 as a storage race and retries its stat with
    back-off (1+2+...+32 s): an empty file took 63 s to upload. For an empty source file a size
    of 0 is the right answer, so ask once (Rucio's own option client.protocol_stat_retries)."""
    if retries is None:
        yield
        return
    cfg = rucio_config.get_config()
    if not cfg.has_section("client"):
        cfg.add_section("client")
    old = cfg.get("client", "protocol_stat_retries", fallback=None)
    cfg.set("client", "protocol_stat_retries", str(retries))
    try:
        yield
    finally:
        if old is None:
            cfg.remove_option("client", "protocol_stat_retries")
        else:
            cfg.set("client", "protocol_stat_retries", old)


# Variables a Rucio client reads before its configuration: clients Rucio makes itself
# (rsemgr's RSEClient()) would take them from an inherited environment (sbatch --export=ALL)
# over the run's own choices.
_OVERRIDING_ENV = ("RUCIO_ACCOUNT", "RUCIO_AUTH_TYPE", "RUCIO_CLIENT_PROXY", "RUCIO_CLIENT_CERT",
                   "RUCIO_CLIENT_KEY", "X509_CERT_DIR", "X509_USER_PROXY", "X509_USER_CERT",
                   "X509_USER_KEY", "BEARER_TOKEN", "BEARER_TOKEN_FILE")


class _Redact(logging.Filter):
    """Rucio logs request headers at DEBUG, the password header included: never let it out."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "X-Rucio-Password" in text or "x-rucio-password" in text.lower():
            record.msg, record.args = "(a request header with a password was not logged)", ()
        return True


def use_client_config(path: Path, creds: Credentials) -> None:
    """Point this process's Rucio at ``path`` and the credentials (one job per process: the
    worker, or plan/doctor on the login node).

    Rucio makes clients of its own inside UploadClient (rsemgr's RSEClient()), which read
    the password from the configuration only: it is put into Rucio's configuration in this
    process's memory, never into a file. They also read RUCIO_ACCOUNT and friends before the
    configuration: those are set to the run's values or removed."""
    for name in _OVERRIDING_ENV:
        os.environ.pop(name, None)
    os.environ["RUCIO_CONFIG"] = str(path)
    os.environ["RUCIO_AUTH_TYPE"] = RUCIO_AUTH_TYPE[creds.auth_type]
    if creds.account:
        os.environ["RUCIO_ACCOUNT"] = creds.account
    os.environ.update(creds.environment())
    rucio_config.clean_cached_config()
    client_log = logging.getLogger("baseclient")
    client_log.setLevel(max(client_log.level, logging.INFO))
    if not any(isinstance(f, _Redact) for f in client_log.filters):
        client_log.addFilter(_Redact())
    if creds.auth_type == "userpass":
        try:
            password = read_password(creds)
        except CredentialsError as exc:
            raise RucioFatal(str(exc)) from None
        cfg = rucio_config.get_config()
        if not cfg.has_section("client"):
            cfg.add_section("client")
        cfg.set("client", "password", password.replace("%", "%%"))  # read back interpolated


class _TokenFileClient(Client):
    """auth_type token: the token lives in BEARER_TOKEN_FILE, which the user's token agent
    renews. On a 401 Rucio would start an interactive OIDC login (it waits on input()); read
    the file again instead, and never prompt."""

    def _BaseClient__get_token_oidc(self) -> bool:  # replaces BaseClient.__get_token_oidc
        try:
            with open(os.environ["BEARER_TOKEN_FILE"], encoding="utf-8") as handle:
                token = handle.read().strip()
        except (KeyError, OSError):
            return False
        if not token or token == self.auth_token:
            return False            # -> CannotAuthenticate: the token agent has not renewed it
        self.auth_token = token
        return True


def tls_problem(host: str, ca_dir: Path | None, proxy: Path | None, text: str) -> str | None:
    """What a failed TLS handshake with ``host`` means, as one line with the fix; None when
    ``text`` (the error's message) is not a TLS failure (pure). Rucio's own client hides
    these behind "Cannot connect to the Rucio server", which sends people to the network."""
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        detail = text.split("certificate verify failed:", 1)[-1].split("(_ssl")[0]
        detail = " ".join(detail.strip(" '\")").split())
        if "mismatch" in detail or "not valid for" in detail:
            return (f"the certificate of the Rucio server {host} does not name that host "
                    f"({detail}): set [rucio] host to the name its certificate carries (the "
                    "server's DNS name, not an address or an alias)")
        if "expired" in detail:
            return (f"the certificate of the Rucio server {host} has expired ({detail}): "
                    "ask the server's admins")
        return (f"the certificate of the Rucio server {host} is not signed by a CA in "
                f"{ca_dir or 'the default CA bundle'} ({detail}): set [rucio] ca_dir to the "
                "grid CA directory (/etc/grid-security/certificates, or "
                "/cvmfs/grid.cern.ch/etc/grid-security/certificates)")
    alert = re.search(r"(?:tlsv1|sslv3|tlsv13) alert ([a-z ]+)", text, re.IGNORECASE)
    if alert:
        why = alert.group(1).strip().lower()
        who = f"the X.509 proxy {proxy}" if proxy else "our certificate"
        fix = (f"make a fresh RFC 3820 proxy ({renew_proxy_command(proxy)})" if proxy
               else "check [rucio] certificate and key")
        return (f"the Rucio server {host} refused {who} during the TLS handshake ({why}): "
                f"{fix}; if that does not help, its admins must trust your CA")
    if "SSL" in text or "TLS" in text:
        return (f"the TLS handshake with the Rucio server {host} failed "
                f"({' '.join(text.split())[:200]}): check [rucio] host and ca_dir")
    return None


def ping(creds: Credentials) -> str:
    """The server's version from /ping; RucioUnavailable if it does not answer, RucioFatal
    (one line with the fix) if the TLS handshake fails. The X.509 proxy or certificate is
    presented as the tasks will present it, so a server that refuses it says so here."""
    verify: Any = str(creds.ca_cert) if creds.ca_cert else True
    cert: Any = (str(creds.proxy) if creds.proxy and creds.proxy.is_file() else
                 (str(creds.certificate), str(creds.key))
                 if creds.certificate and creds.key else None)
    try:
        reply = requests.get(f"{creds.host}/ping", timeout=30, verify=verify, cert=cert)
        reply.raise_for_status()
        return str(reply.json().get("version", "?"))
    except (requests.RequestException, ValueError, OSError) as exc:
        line = tls_problem(str(creds.host), creds.ca_cert, creds.proxy, str(exc))
        if line and isinstance(exc, (requests.exceptions.SSLError, OSError)):
            raise RucioFatal(line) from None
        raise RucioUnavailable(f"cannot reach the Rucio server {creds.host}: "
                               f"{describe(exc)}") from None


@contextlib.contextmanager
def fresh_session(creds: Credentials) -> Iterator[RucioIO]:
    """A session that really logs in (a private, empty token cache), for checks: a cached
    token would hide a wrong password or a revoked identity. Uses the same generated
    configuration as the run's tasks, written to a private temporary directory. The
    process's environment is given back as it was afterwards."""
    from .credentials import client_config_text, load_base, write_client_config

    saved = dict(os.environ)
    try:
        with tempfile.TemporaryDirectory(prefix="dac-upload-check-") as tmp:
            cfg = Path(tmp) / "rucio.cfg"
            write_client_config(cfg, client_config_text(creds, load_base(creds.base_config),
                                                        token_cache=Path(tmp) / "token"))
            use_client_config(cfg, creds)
            yield RucioIO(creds=creds)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        rucio_config.clean_cached_config()


class RucioIO:
    """A Rucio session for one process: one authenticated client, reused for every call."""

    def __init__(self, account: str | None = None, creds: Credentials | None = None) -> None:
        """Without ``creds``: whatever RUCIO_CONFIG says (old runs). With them: the server,
        account and identity they name; the password is read from its file only here."""
        try:
            if creds is None:
                self.client = Client(account=account)
            else:
                kind = _TokenFileClient if creds.auth_type == "token" else Client
                self.client = kind(rucio_host=creds.host, auth_host=creds.auth_host,
                                     account=creds.account,
                                     ca_cert=str(creds.ca_cert) if creds.ca_cert else None,
                                     auth_type=RUCIO_AUTH_TYPE[creds.auth_type],
                                     creds=_client_creds(creds))
        except CredentialsError as exc:
            raise RucioFatal(str(exc)) from None
        except rexc.CannotAuthenticate as exc:
            host = creds.host if creds else "the server"
            raise RucioFatal(f"Rucio at {host} refused the credentials ({describe(exc)}); "
                             "check the password, proxy or token and [rucio] account") from None
        except Exception as exc:  # the client raises many types while configuring itself
            if unreachable(exc):
                if creds is not None and str(creds.host).startswith("https:"):
                    ping(creds)   # a TLS failure raises RucioFatal, saying what to fix
                where = (f"the Rucio server {creds.host}" if creds is not None
                         else "the Rucio server of RUCIO_CONFIG")
                fix = ("check [rucio] host in the job file (or rucio_host in the rucio.cfg "
                       "its [rucio] config names)" if creds is not None
                       else "check rucio_host in the file RUCIO_CONFIG names")
                raise RucioUnavailable(f"cannot reach {where}: {describe(exc)}; {fix}, or "
                                       "try later") from None
            raise RucioFatal(f"cannot start a Rucio client: {describe(exc)}; check "
                             "RUCIO_CONFIG / rucio.cfg and your credentials") from None
        self._uploader: UploadClient | None = None
        self._storages: dict[str, Storage | None] = {}
        self.rules_per_request = RULES_PER_REQUEST
        self.ruled: set[tuple[str, str]] = set()   # DIDs this session made a rule for

    @classmethod
    def for_run(cls, run_dir: Path, run: dict[str, Any]) -> RucioIO:
        """The session an array task of this run uses (its rucio.cfg and credentials)."""
        from ..runrecord import RunRecord

        record = RunRecord(run)
        if record.credentials is None:
            return cls(record.account)
        creds = Credentials.from_record(record.credentials)
        use_client_config(run_dir / record.client_config, creds)
        return cls(creds=creds)

    @property
    def host(self) -> str:
        return str(getattr(self.client, "host", ""))

    @property
    def account(self) -> str:
        return str(self.client.account)

    # ------------------------------------------------------------------ preflight
    def preflight(self, scope: str, rse: str, dataset_scope: str | None = None) -> list[str]:
        """Problems that would make every upload fail, each one line with the fix. A server
        that cannot be reached raises RucioUnavailable instead (not the user's to fix)."""
        return [detail for _, ok, detail in self.checks(scope, rse, dataset_scope) if not ok]

    def checks(self, scope: str, rse: str, dataset_scope: str | None = None
               ) -> list[tuple[str, bool, str]]:
        """(what, ok, one line) for: who we are, the scope(s), the RSE, writing to it, our
        quota on it. A failure says the fix; later checks that cannot run are left out. A
        server that stops answering raises RucioUnavailable."""
        try:
            return self._checks(scope, rse, dataset_scope)
        except Exception as exc:
            if unreachable(exc):
                raise RucioUnavailable(f"cannot reach the Rucio server {self.host}: "
                                       f"{describe(exc)}; try later") from None
            raise

    def _checks(self, scope: str, rse: str, dataset_scope: str | None
                ) -> list[tuple[str, bool, str]]:
        out: list[tuple[str, bool, str]] = []
        try:
            who = self.client.whoami()
        except Exception as exc:
            if unreachable(exc):
                raise
            return [("identity", False, f"Rucio at {self.host} refused us: {describe(exc)}; "
                     "check the credentials (proxy, password or token) and [rucio] account")]
        account = (who or {}).get("account", self.account)
        out.append(("identity", True, f"authenticated to {self.host} as account {account!r}"))
        try:
            scopes = set(self.client.list_scopes())
        except Exception as exc:
            if unreachable(exc):
                raise
            return [*out, ("scope", False, f"cannot list Rucio scopes: {describe(exc)}")]
        for key, value in (("scope", scope), ("dataset", dataset_scope)):
            if not value or (key == "dataset" and value == scope):
                continue
            if value in scopes:
                out.append(("scope", True, f"scope {value!r} exists"))
            else:
                out.append(("scope", False, f"Rucio scope {value!r} ([rucio] {key}) does not "
                            "exist; ask your Rucio admins to create it, or use one of yours "
                            f"(e.g. user.{account})"))
        try:
            info = self.client.get_rse(rse)
        except rexc.RSENotFound:
            return [*out, ("RSE", False, f"RSE {rse!r} does not exist; check [rucio] rse "
                           "('rucio list-rses' lists them)")]
        except Exception as exc:
            if unreachable(exc):
                raise
            return [*out, ("RSE", False, f"cannot look up RSE {rse!r}: {describe(exc)}")]
        schemes = sorted({str(p.get("scheme")) for p in info.get("protocols") or []})
        out.append(("RSE", True, f"RSE {rse!r} exists (protocols: "
                    f"{', '.join(schemes) or 'none'})"))
        if info.get("availability_write") is False:
            out.append(("RSE write", False, f"RSE {rse!r} is blocked for writing; try later "
                        "or ask its admins"))
        else:
            out.append(("RSE write", True, f"RSE {rse!r} accepts writes"))
        if self._has_quota(account, rse):
            out.append(("quota", True, f"account {account!r} may write to {rse!r}"))
        else:
            out.append(("quota", False, f"account {account!r} has no quota on {rse!r} "
                        "(uploads would fail with InsufficientAccountLimit); ask the Rucio "
                        "admins for one ('rucio-admin account set-limits')"))
        return out

    def _has_quota(self, account: str, rse: str) -> bool:
        """A local limit on the RSE, or any global (RSE-expression) limit we cannot evaluate
        here; when Rucio will not tell us, assume yes rather than refuse a good job."""
        try:
            local = self.client.get_local_account_limit(account, rse).get(rse)
            if local is not None:
                return bool(local)
            return bool(self.client.get_global_account_limits(account))
        except Exception:
            return True

    # ------------------------------------------------------------------ queries
    def did(self, scope: str, name: str) -> DidInfo | None:
        try:
            d = self.client.get_did(scope, name)
        except rexc.DataIdentifierNotFound:
            return None
        except Exception as exc:
            raise translate(exc, f"looking up {scope}:{name}") from None
        return DidInfo(d.get("bytes"), d.get("adler32"), d.get("md5"))

    def replica(self, scope: str, name: str, rse: str) -> ReplicaInfo | None:
        """This file's replica on ``rse`` in any state, or None."""
        return self._replicas(scope, [name], rse, f"{scope}:{name}").get(name)

    # ------------------------------------------------------------------ bulk (fast worker)
    def dids_bulk(self, scope: str, names: list[str]) -> dict[str, DidInfo]:
        """The DIDs among ``names`` that exist, with their size, checksums and guid: one
        request per DIDS_PER_REQUEST names (names that do not exist are simply absent)."""
        out: dict[str, DidInfo] = {}
        for i in range(0, len(names), DIDS_PER_REQUEST):   # one request up to 1,000 names
            part = names[i:i + DIDS_PER_REQUEST]
            try:
                metas = self.client.get_metadata_bulk([{"scope": scope, "name": n}
                                                       for n in part])
                out.update((m["name"], DidInfo(m.get("bytes"), m.get("adler32"), m.get("md5"),
                                               m.get("guid"))) for m in metas)
            except Exception as exc:
                raise translate(exc, f"looking up {len(part)} names in {scope}") from None
        return out

    def replicas_bulk(self, scope: str, names: list[str], rse: str) -> dict[str, ReplicaInfo]:
        """Replicas on ``rse`` (any state) of these DIDs: one request."""
        return self._replicas(scope, names, rse, f"{len(names)} files")

    def _replicas(self, scope: str, names: list[str], rse: str,
                  what: str) -> dict[str, ReplicaInfo]:
        if not names:
            return {}
        try:
            # sort="random": the server's default ("geoip") looks for its GeoIP database
            # once per file: 0.73 s per 500 names against 0.14 s with "random" (measured on
            # the test server); with one RSE there is nothing to sort, and the PFN comes
            # from "rses", which the server orders by priority either way.
            reps = list(self.client.list_replicas([{"scope": scope, "name": n} for n in names],
                                                  all_states=True, rse_expression=rse,
                                                  sort="random"))
        except (rexc.DataIdentifierNotFound, rexc.ReplicaNotFound):
            return {}
        except Exception as exc:
            raise translate(exc, f"listing replicas of {what}") from None
        out = {}
        for rep in reps:
            state = (rep.get("states") or {}).get(rse)
            if state is not None:
                pfns = (rep.get("rses") or {}).get(rse) or []
                out[rep["name"]] = ReplicaInfo(state=str(state), pfn=pfns[0] if pfns else "",
                                               bytes=rep.get("bytes"),
                                               adler32=rep.get("adler32"))
        return out

    # ------------------------------------------------------------------ verify
    def file_replicas(self, scope: str, names: list[str], rse: str,
                      parents: bool = False) -> dict[str, FileReplicas]:
        """The file DIDs among ``names`` (at most 1,000: the server's limit; names Rucio
        does not know are absent), each with its replica on ``rse`` in any state, and with
        ``parents`` every collection it is in: ONE request (list_replicas, all_states; with
        resolve_parents the server looks up each file's parents, recursively, in the same
        request: on the test server 1.4 s per 1,000 files against 0.7 s without)."""
        if not names:
            return {}
        try:
            reps = list(self.client.list_replicas([{"scope": scope, "name": n} for n in names],
                                                  all_states=True, rse_expression=rse,
                                                  sort="random", resolve_parents=parents))
        except (rexc.DataIdentifierNotFound, rexc.ReplicaNotFound):
            return {}
        except Exception as exc:
            raise translate(exc, f"listing replicas of {len(names)} files on {rse}") from None
        out = {}
        for rep in reps:
            state = (rep.get("states") or {}).get(rse)
            out[rep["name"]] = FileReplicas(
                bytes=rep.get("bytes"), adler32=rep.get("adler32"), md5=rep.get("md5"),
                state=None if state is None else str(state),
                pfns=tuple((rep.get("rses") or {}).get(rse) or ()),
                parents=tuple(_external(p) for p in rep.get("parents") or ()))
        return out

    def did_rules(self, scope: str, name: str) -> list[RuleInfo]:
        """The rules on the DID itself (one request); [] if Rucio does not know it."""
        try:
            rules = list(self.client.list_did_rules(scope, name))
        except rexc.DataIdentifierNotFound:
            return []
        except Exception as exc:
            raise translate(exc, f"listing the rules of {scope}:{name}") from None
        return [RuleInfo(id=str(r.get("id")), rse_expression=str(r.get("rse_expression")),
                         copies=int(r.get("copies") or 1), state=str(r.get("state")),
                         account=str(r.get("account")), expires_at=_when(r.get("expires_at")))
                for r in rules]

    def ruled_files(self, scope: str, rse: str, created_after: datetime | None = None
                    ) -> Iterator[tuple[str, datetime | None]]:
        """(name, the rule's expires_at) of the file DIDs of ``scope`` with a rule whose RSE
        expression is exactly ``rse`` (any account), made after ``created_after`` (UTC) if
        given: ONE request, read as the server streams it (the client reads a GET's body
        line by line), so memory does not grow with the answer. A name comes once per such
        rule."""
        filters: dict[str, str] = {"scope": scope, "rse_expression": rse, "did_type": "F"}
        if created_after is not None:   # the server parses RFC 1123 (str_to_date)
            filters["created_after"] = created_after.strftime(_RFC1123)
        try:
            for rule in self.client.list_replication_rules(filters):
                yield str(rule["name"]), _when(rule.get("expires_at"))
        except Exception as exc:
            raise translate(exc, f"listing the file rules of {scope} on {rse}") from None

    def collection_files(self, scope: str, name: str) -> Iterator[tuple[str, str]]:
        """(scope, name) of every file in a dataset (a container's: recursively): ONE
        request, read as the server streams it. Nothing if Rucio does not know it."""
        try:
            for f in self.client.list_files(scope, name):
                yield str(f["scope"]), str(f["name"])
        except rexc.DataIdentifierNotFound:
            return
        except Exception as exc:
            raise translate(exc, f"listing the files of {scope}:{name}") from None

    def parent_dids(self, scope: str, name: str) -> list[str]:
        """The collections that hold the DID itself ("scope:name"): one request."""
        try:
            return [f"{p['scope']}:{p['name']}"
                    for p in self.client.list_parent_dids(scope, name)]
        except rexc.DataIdentifierNotFound:
            return []
        except Exception as exc:
            raise translate(exc, f"listing the collections of {scope}:{name}") from None

    def rses_of(self, expression: str) -> list[str]:
        """The RSEs an RSE expression stands for (one request); [] for an expression Rucio
        cannot resolve (the RSE may have been removed)."""
        try:
            return [str(r["rse"]) for r in self.client.list_rses(expression)]
        except (rexc.InvalidRSEExpression, rexc.RSENotFound):
            return []
        except Exception as exc:
            raise translate(exc, f"resolving the RSE expression {expression!r}") from None

    def storage_reader(self, rse: str) -> Storage:
        """The RSE's storage for reading what is there (verify): as ``storage``, but any
        RSE, deterministic or not; one reached through signed URLs (S3 with sign_url)
        cannot be read by PFN: RucioFatal, saying so."""
        from rucio.rse import rsemanager

        try:
            settings = rsemanager.get_rse_info(rse, vo=self.client.vo)
        except Exception as exc:
            raise translate(exc, f"reading the description of RSE {rse}") from None
        if settings.get("sign_url"):
            raise RucioFatal(f"RSE {rse} is reached through signed URLs: its objects cannot "
                             "be checked by their PFN")
        return Storage(settings, "auto", self.client)

    def add_replicas(self, rse: str, scope: str, files: list[dict[str, Any]]) -> None:
        """Register copies already verified on ``rse`` as AVAILABLE, in one request; each
        file dict has name, bytes, adler32, md5, pfn, guid. Creates the file DIDs."""
        if not files:
            return
        body = [{"scope": scope, "name": f["name"], "bytes": f["bytes"],
                 "adler32": f["adler32"], "pfn": f["pfn"], "state": "A",
                 **({"md5": f["md5"]} if f.get("md5") else {}),   # none with [upload] md5 = false
                 **({"meta": {"guid": f["guid"]}} if f.get("guid") else {})} for f in files]
        try:
            self.client.add_replicas(rse=rse, files=body)
        except Exception as exc:
            raise translate(exc, f"registering {len(files)} replicas on {rse}") from None

    def add_rules(self, scope: str, names: list[str], rse: str,
                  lifetime: int | None) -> list[str]:
        """One rule per DID on ``rse``, in requests of ``self.rules_per_request`` DIDs;
        returns the names of the requests that made none because one of their DIDs already
        had a rule (DuplicateRule), for the caller to take one by one. Names this session
        has made a rule for are skipped (a request tried again after a failure). A request
        that took more than RULE_SECONDS per rule halves the size of the next ones (at
        least 10): see RULES_PER_REQUEST."""
        refused: list[str] = []
        todo = [n for n in names if (scope, n) not in self.ruled]
        i = 0
        while i < len(todo):
            part = todo[i:i + self.rules_per_request]
            i += len(part)
            t0 = time.monotonic()
            try:
                self.client.add_replication_rule([{"scope": scope, "name": n} for n in part],
                                                 1, rse, lifetime=lifetime,
                                                 account=self.account)
            except rexc.DuplicateRule:
                refused += part
                continue
            except Exception as exc:
                raise translate(exc, f"adding rules for {len(part)} files on {rse}") from None
            self.ruled.update((scope, n) for n in part)
            if (time.monotonic() - t0) / len(part) > RULE_SECONDS:
                self.rules_per_request = max(10, self.rules_per_request // 2)
        return refused

    def set_metadata_bulk(self, scope: str, items: list[tuple[str, dict[str, Any]]]) -> None:
        """Set each file DID's metadata (name, {key: value}) in one request; keys the DID
        table has no column for (rubin_butler, rubin_sidecar) go to Rucio's JSON plugin.
        Raises MetadataRefused when the server has no plugin for them."""
        if not items:
            return
        try:
            self.client.set_dids_metadata_bulk(
                dids=[{"scope": scope, "name": name, "meta": meta} for name, meta in items])
        except rexc.InvalidMetadata as exc:
            if "No plugin manages" in str(exc):
                keys = sorted({k for _, meta in items for k in meta})
                raise MetadataRefused(
                    f"the Rucio server keeps no metadata {', '.join(keys)} (\"No plugin "
                    "manages\"): its JSON metadata plugin is off (a SQLite database, or "
                    "[metadata] plugins without json_meta)") from None
            raise translate(exc, f"setting the metadata of {len(items)} files") from None
        except Exception as exc:
            raise translate(exc, f"setting the metadata of {len(items)} files") from None

    def attach_bulk(self, dataset: tuple[str, str], scope: str, names: list[str]) -> bool:
        """Attach the files to the dataset in one request; False (nothing attached) if one
        was attached already, so the caller can go file by file."""
        if not names:
            return True
        try:
            self.client.attach_dids(dataset[0], dataset[1],
                                    [{"scope": scope, "name": n} for n in names])
        except (rexc.FileAlreadyExists, rexc.DuplicateContent):
            return False
        except Exception as exc:
            raise translate(exc, f"attaching {len(names)} files to "
                             f"{dataset[0]}:{dataset[1]}") from None
        return True

    def add_to_archive(self, scope: str, archive: str, members: list[dict[str, Any]]) -> None:
        """Register ``members`` ({name, bytes, adler32, md5}) as the constituents of the
        archive file DID ``scope:archive``, a request per DIDS_PER_REQUEST; one already
        there is left as it is (ignore_duplicate: a resubmission repeats it). One archive
        per request: Rucio 41 handles only the first attachment of a request whose target
        is an archive."""
        if not members:
            return
        dids = [{"scope": scope, "name": m["name"], "bytes": m["bytes"],
                 "adler32": m["adler32"], **({"md5": m["md5"]} if m.get("md5") else {})}
                for m in members]
        for i in range(0, len(dids), DIDS_PER_REQUEST):
            part = dids[i:i + DIDS_PER_REQUEST]
            try:
                self.client.attach_dids_to_dids([{"scope": scope, "name": archive,
                                                  "dids": part}], ignore_duplicate=True)
            except Exception as exc:
                raise translate(exc, f"registering {len(part)} files as the content of the "
                                f"archive {scope}:{archive}") from None

    def storage(self, rse: str, rename: str = "auto") -> Storage:
        """The RSE's storage through Rucio's own protocol layer (rsemgr): whatever protocol
        the RSE offers for writing (file, root, davs, s3, ...)."""
        from rucio.rse import rsemanager

        try:
            settings = rsemanager.get_rse_info(rse, vo=self.client.vo)
        except Exception as exc:
            raise translate(exc, f"reading the description of RSE {rse}") from None
        why = ("is not deterministic" if not settings.get("deterministic", True) else
               "is reached through signed URLs" if settings.get("sign_url") else None)
        if why:
            raise RucioFatal(f"RSE {rse} {why}: the bulk path cannot write it; set [upload] "
                             "mode = \"stock\"")
        return Storage(settings, rename, self.client)

    def guid(self, scope: str, name: str) -> str | None:
        try:
            return self.client.get_metadata(scope, name).get("guid")
        except Exception:
            return None

    # ------------------------------------------------------------------ datasets
    def ensure_dataset(self, dataset: tuple[str, str], rse: str, lifetime: int | None) -> str:
        """Make sure the dataset exists and a rule on ``rse`` protects it (and so every file
        attached to it). Returns what was done: "created", "rule added" (it existed without a
        rule on the RSE; the new rule carries the lifetime, if any) or "exists" (left as it
        is, its own rule and lifetime included).

        Done once per task, not per file: UploadClient forgets per call that it made the
        dataset and refuses every later file when a lifetime is set."""
        scope, name = dataset
        rule = {"account": self.account, "copies": 1, "rse_expression": rse,
                "grouping": "DATASET", "lifetime": lifetime}
        try:
            self.client.add_dataset(scope=scope, name=name, rules=[rule])
            return "created"
        except rexc.DataIdentifierAlreadyExists:
            pass
        except Exception as exc:
            raise translate(exc, f"creating dataset {scope}:{name}") from None
        return "rule added" if self.ensure_rule(scope, name, rse, lifetime, "DATASET") \
            else "exists"

    def ensure_rule(self, scope: str, name: str, rse: str, lifetime: int | None,
                    grouping: str = "NONE") -> bool:
        """Add a rule for the DID on ``rse`` unless one already names that RSE; True if
        this session added it (now or earlier), False if another one was there.
        UploadClient adds no rule when the DID existed before (a replica it adds to another
        RSE would otherwise be unprotected)."""
        if (scope, name) in self.ruled:
            return True
        try:
            if any(r.get("rse_expression") == rse
                   for r in self.client.list_did_rules(scope, name)):
                return False
            self.client.add_replication_rule([{"scope": scope, "name": name}], 1, rse,
                                             grouping=grouping, lifetime=lifetime,
                                             account=self.account)
        except rexc.DuplicateRule:
            return False
        except Exception as exc:
            raise translate(exc, f"adding a rule for {scope}:{name} on {rse}") from None
        self.ruled.add((scope, name))
        return True

    def attach(self, dataset: tuple[str, str], scope: str, name: str) -> bool:
        """Attach a file to the dataset; True if attached now, False if it was already
        (attaching it twice is not an error)."""
        try:
            self.client.attach_dids(dataset[0], dataset[1], [{"scope": scope, "name": name}])
        except rexc.FileAlreadyExists:
            return False
        except Exception as exc:
            raise translate(exc, f"attaching to {dataset[0]}:{dataset[1]}") from None
        return True

    # ------------------------------------------------------------------ upload
    def upload(self, path: Path, scope: str, name: str, rse: str,
               dataset: tuple[str, str] | None, lifetime: int | None,
               guid: str | None = None) -> tuple[str, str | None]:
        """Upload one file with Rucio's stock UploadClient; return (pfn, guid).

        ``register_after_upload``: no replica is registered before its bytes are on the RSE
        (and it needs no rename on the storage, which Echo cannot do). With a dataset, the
        file is attached to it and the dataset's rule (made by ensure_dataset) protects it;
        without one, the file gets its own rule, with ``lifetime`` only when asked for.
        """
        capture = _Capture()
        logger = logging.getLogger("dac_upload.rucio.upload")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logger.handlers = [capture]
        uploader = self._upload_client(logger)
        token = self.client.auth_token or ""   # a renewed JWT reaches the storage layer too
        uploader.auth_token = token if len(token.split(".")) == 3 else None
        item: dict[str, Any] = {"path": str(path), "rse": rse, "did_scope": scope,
                                "did_name": name, "register_after_upload": True,
                                **({"guid": guid} if guid else {})}
        if dataset:
            item["dataset_scope"], item["dataset_name"] = dataset
        elif lifetime:
            item["lifetime"] = lifetime
        fd, summary_path = tempfile.mkstemp(prefix=".upload-", suffix=".json")
        os.close(fd)
        free = False
        try:
            free = self._clear_unregistered_leftover(scope, name, rse)
            uploader.logger = logger.log
            with _stat_retries(0 if path.stat().st_size == 0 else None):
                uploader.upload([item], summary_file_path=summary_path)
            with open(summary_path, encoding="utf-8") as handle:
                entry = json.load(handle).get(f"{scope}:{name}", {})
            return str(entry.get("pfn", "")), entry.get("guid")
        except (rexc.NoFilesUploaded, rexc.NotAllFilesUploaded):
            pfn = self._remove_failed_copy(scope, name, rse, free)
            said = capture.full()
            if said:
                raise StorageFull(full_message(rse, said, pfn or f"{scope}:{name}")) from None
            reason = capture.reason() or "Rucio uploaded nothing and gave no reason"
            raise RucioFileError(f"upload failed: {reason}") from None
        except (RucioFatal, RucioFileError):   # ours already (the leftover check)
            raise
        except Exception as exc:
            self._remove_failed_copy(scope, name, rse, free)
            raise translate(exc, "upload failed") from None
        finally:
            Path(summary_path).unlink(missing_ok=True)

    def _remove_failed_copy(self, scope: str, name: str, rse: str, free: bool) -> str | None:
        """After UploadClient failed: remove what it wrote and left behind, which it does not
        itself (a copy that failed half-way, on a full storage say, stays as
        ``PFN.rucio.upload``; on an RSE that cannot rename, at the PFN itself: removed only
        if ``free``, nothing was there before this attempt), and only while no replica of the
        name is registered on the RSE (asked now). Returns the PFN (None if unknown); a
        removal that fails is logged, never raised over the upload's own error."""
        storage = self._storages.get(rse)
        if storage is None:
            return None
        pfn = None
        try:
            proto = storage._protocol()
            pfn = storage.pfn(scope, name)
            target = f"{pfn}.rucio.upload" if proto.renaming else pfn if free else None
            if target and proto.exists(target) and self.replica(scope, name, rse) is None:
                storage._protocol("delete").delete(target)
                LOG.info("removed %s, left by a failed upload of %s:%s", target, scope, name)
        except Exception as exc:   # the upload's own error is what the caller must see
            LOG.warning("could not remove what a failed upload of %s:%s left on %s: %s",
                         scope, name, rse, describe(exc))
        return pfn

    def _clear_unregistered_leftover(self, scope: str, name: str, rse: str) -> bool:
        """Rucio 41's UploadClient cannot replace what a crashed attempt left at a file's
        PFN on an RSE whose protocol does not rename (gfal NoRename, as for Echo): it finds
        the file, then deletes PFN.rucio.upload, which is not there, and fails the file for
        good ("Unable to remove temporary file ...: 404"). Such a leftover, which no DID
        points to (asked in that moment), is removed here, as UploadClient means to.
        True when, on such an RSE, nothing is at the PFN now (so what a failed upload leaves
        there is its own)."""
        if rse not in self._storages:
            try:
                self._storages[rse] = self.storage(rse)
            except RucioFatal:          # signed URLs, not deterministic: UploadClient's own
                self._storages[rse] = None
        storage = self._storages[rse]
        if storage is None:
            return False
        proto = storage._protocol()
        if proto.renaming:
            return False
        try:
            pfn = storage.pfn(scope, name)
            if not proto.exists(pfn):
                return True
            if self.did(scope, name) is not None:
                return False
            storage._protocol("delete").delete(pfn)
        except RucioFatal:
            raise
        except Exception as exc:
            raise translate(exc, f"removing an unregistered leftover of {scope}:{name} on "
                             f"{rse}") from None
        LOG.info("removed an unregistered leftover of %s:%s at %s", scope, name, pfn)
        return True

    def download(self, scope: str, name: str, rse: str, directory: Path) -> Path:
        """Read a file back from ``rse`` into ``directory`` (doctor --probe); its path."""
        from rucio.client.downloadclient import DownloadClient

        logger = logging.getLogger("dac_upload.rucio.download")
        logger.propagate = False
        logger.handlers = [logging.NullHandler()]   # the caller reports in one line
        (directory / name).parent.mkdir(parents=True, exist_ok=True)  # Rucio keeps the '/'s
        try:
            DownloadClient(client=self.client, logger=logger.log, tracing=False).download_dids(
                [{"did": f"{scope}:{name}", "rse": rse, "base_dir": str(directory),
                  "no_subdir": True}])
        except Exception as exc:
            raise translate(exc, f"reading {scope}:{name} back from {rse}") from None
        return directory / name

    def _upload_client(self, logger: logging.Logger) -> UploadClient:
        if self._uploader is None:
            # UploadClient(tracing=False) raises TypeError in rucio 41: switch it off after.
            self._uploader = UploadClient(_client=self.client, logger=logger)
            self._uploader.tracing = False
        return self._uploader
