"""Who the array tasks are to Rucio: resolve, check and write the client configuration.

The job file's ``[rucio]`` keys win over the user's own rucio.cfg (``config``, else the one
Rucio itself would find), which wins over the environment of the planning shell. Everything
is resolved to absolute paths once, at plan time, because cron and ``apptainer --cleanenv``
lose the environment. The result is written into the run directory as ``rucio.cfg`` (mode
0600) WITHOUT any secret: a password is read from its own file by the worker when it
connects, a token through ``BEARER_TOKEN_FILE``, a proxy or key from its own path.

Pure except for the functions that read files (``local_problems``, ``read_password``,
``load_base``) and ``write_client_config``; nothing here talks to Rucio.
"""

from __future__ import annotations

import base64
import calendar
import configparser
import io
import json
import os
import re
import stat
import subprocess
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import AUTH_TYPES, RucioConfig
from ..errors import UserError
from ..files import atomic_write_text

# our name -> Rucio's auth_type (a token is found by Rucio's WLCG bearer-token discovery)
RUCIO_AUTH_TYPE = {"x509_proxy": "x509_proxy", "userpass": "userpass", "token": "oidc",
                   "x509": "x509"}
DEFAULT_CA_DIR = Path("/etc/grid-security/certificates")
# [client] keys that hold a secret: never copied into a generated configuration
SECRET_KEYS = ("password",)


class CredentialsError(UserError):
    """The credentials cannot be used as configured; ``lines`` says why, one line each."""


@dataclass(frozen=True)
class Credentials:
    """Where the tasks find the server and their identity (paths only, never a secret)."""

    auth_type: str
    host: str | None
    auth_host: str | None
    account: str | None
    ca_cert: Path | None            # what Rucio verifies the server with (a directory here)
    proxy: Path | None
    certificate: Path | None
    key: Path | None
    username: str | None
    password_file: Path | None      # holds the password (or is a rucio.cfg, see below)
    password_in_config: bool        # password_file is the user's rucio.cfg ([client] password)
    token_file: Path | None
    base_config: Path | None
    voms: str | None = None         # the VO whose VOMS attributes the proxy must carry

    # ------------------------------------------------------------------ derived
    def secret_files(self) -> list[tuple[str, Path]]:
        """(what, path) of every file only the user may read."""
        out = [("X.509 proxy", self.proxy), ("private key", self.key),
               ("password file", self.password_file), ("token file", self.token_file)]
        return [(what, p) for what, p in out if p is not None]

    def bind_paths(self) -> list[Path]:
        """Host paths the worker reads inside a container (bound read-only, same path). A
        token agent replaces its file by renaming a new one over it, which a bound file would
        not show: the token file's directory is bound instead."""
        token_dir = self.token_file.parent if self.token_file else None
        paths = [self.ca_cert, self.proxy, self.certificate, self.key, self.password_file,
                 token_dir]
        return [p for p in paths if p is not None]

    def environment(self) -> dict[str, str]:
        """Variables the worker needs besides RUCIO_CONFIG (grid tools read these too)."""
        env: dict[str, str] = {}
        if self.proxy:
            env["X509_USER_PROXY"] = str(self.proxy)
        if self.ca_cert and not str(self.ca_cert).endswith((".pem", ".crt")):
            env["X509_CERT_DIR"] = str(self.ca_cert)
        if self.token_file:
            env["BEARER_TOKEN_FILE"] = str(self.token_file)
        if self.certificate and self.key:   # for storage protocols that take them (gfal)
            env["X509_USER_CERT"], env["X509_USER_KEY"] = str(self.certificate), str(self.key)
        return env

    def record(self) -> dict[str, Any]:
        """For run.json: every field is a name or a path, none is a secret."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Credentials:
        paths = ("ca_cert", "proxy", "certificate", "key", "password_file", "token_file",
                 "base_config")
        values = {k: (Path(rec[k]) if k in paths and rec.get(k) else rec.get(k))
                  for k in cls.__dataclass_fields__}
        values["password_in_config"] = bool(rec.get("password_in_config"))
        return cls(**values)

    def describe(self) -> str:
        """One line for people: how the tasks will authenticate (no secret)."""
        who = {"x509_proxy": f"X.509 proxy {self.proxy}",
               "userpass": f"user {self.username!r}, password from {self.password_file}",
               "token": f"token from {self.token_file}",
               "x509": f"certificate {self.certificate}"}[self.auth_type]
        return (f"{self.host or '(no server)'} as account {self.account or '(default)'} "
                f"with {who}")


# ----------------------------------------------------------------------------- resolving
def default_config_path(env: Mapping[str, str]) -> Path | None:
    """The rucio.cfg Rucio itself would read (rucio.common.config: RUCIO_CONFIG, then
    $RUCIO_HOME/etc, $VIRTUAL_ENV/etc, $CONDA_PREFIX/etc, /opt/rucio/etc)."""
    if env.get("RUCIO_CONFIG"):
        return Path(env["RUCIO_CONFIG"])
    dirs = [Path(env[v]) / "etc" for v in ("RUCIO_HOME", "VIRTUAL_ENV", "CONDA_PREFIX")
            if env.get(v)]
    for d in [*dirs, Path("/opt/rucio/etc")]:
        if (d / "rucio.cfg").is_file():
            return d / "rucio.cfg"
    return None


def load_base(path: Path | None) -> configparser.ConfigParser:
    """The user's rucio.cfg, raw (no interpolation: it is copied as written)."""
    parser = configparser.ConfigParser(interpolation=None)
    if path is not None:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    return parser


def _path(value: str | None, env: Mapping[str, str]) -> Path | None:
    """A configured path, expanded as Rucio would; None if a variable is not set here."""
    if not value or not value.strip():
        return None
    expanded = os.path.expanduser(_expandvars(value.strip(), env))
    if "$" in expanded:
        return None
    return Path(os.path.abspath(expanded))


_VAR_RE = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def _expandvars(value: str, env: Mapping[str, str]) -> str:
    """os.path.expandvars with ``env`` instead of os.environ: unknown names stay as they are."""
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return env.get(name, m.group(0))
    return _VAR_RE.sub(one, value)


def resolve(rucio: RucioConfig, env: Mapping[str, str], uid: int, where: str) -> Credentials:
    """The job's ``[rucio]`` + the user's rucio.cfg + the planning
    shell's environment -> Credentials. Raises CredentialsError naming each fix."""
    base_path = rucio.config or default_config_path(env)
    try:
        base = load_base(base_path)
    except FileNotFoundError:
        raise CredentialsError([f"{where}: [rucio] config = {str(base_path)!r} does not exist; "
                                "fix the path or leave it out"]) from None
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise CredentialsError([f"{where}: cannot read the Rucio configuration {base_path}: "
                                f"{' '.join(str(exc).split())}"]) from None

    def cfg(key: str) -> str | None:
        return base.get("client", key, fallback=None) or None

    errors: list[str] = []
    auth = rucio.auth_type or cfg("auth_type") or "x509_proxy"
    auth = {"oidc": "token"}.get(auth, auth)
    if auth not in AUTH_TYPES:
        errors.append(f"{where}: auth_type {auth!r} (from {base_path}) cannot run unattended "
                      f"in a batch job; set [rucio] auth_type to one of {', '.join(AUTH_TYPES)}")
    host = rucio.host or cfg("rucio_host")
    if not host:
        errors.append(f"{where}: no Rucio server: set [rucio] host = \"https://...\" (or "
                      "config = a rucio.cfg with rucio_host)")
    # a server named in the job file is not paired with another one's auth host
    auth_host = rucio.auth_host or (rucio.host if rucio.host else cfg("auth_host")) or host
    account = rucio.account or env.get("RUCIO_ACCOUNT") or cfg("account")

    if rucio.ca_dir is not None:
        ca_cert: Path | None = rucio.ca_dir
    else:
        ca_cert = (_path(env.get("X509_CERT_DIR"), env) or _path(cfg("ca_cert"), env)
                   or (DEFAULT_CA_DIR if DEFAULT_CA_DIR.is_dir() else None))
    secure = any(str(h or "").startswith("https:") for h in (host, auth_host))
    if secure and ca_cert is None:
        errors.append(f"{where}: {host} uses https but no CA directory was found: set "
                      f"[rucio] ca_dir (e.g. \"{DEFAULT_CA_DIR}\" or "
                      "\"/cvmfs/grid.cern.ch/etc/grid-security/certificates\")")

    proxy = certificate = key = password_file = token_file = None
    password_in_config = False
    username = None
    if auth == "x509_proxy":
        proxy = (rucio.proxy or _path(cfg("client_x509_proxy"), env)
                 or _path(env.get("X509_USER_PROXY"), env) or Path(f"/tmp/x509up_u{uid}"))
    elif auth == "x509":
        home = Path(env.get("HOME", "~")).expanduser()
        certificate = (rucio.certificate or _path(cfg("client_cert"), env)
                       or _path(env.get("X509_USER_CERT"), env)
                       or home / ".globus" / "usercert.pem")
        key = (rucio.key or _path(cfg("client_key"), env)
               or _path(env.get("X509_USER_KEY"), env) or home / ".globus" / "userkey.pem")
    elif auth == "userpass":
        username = rucio.username or cfg("username")
        if not username:
            errors.append(f"{where}: auth_type userpass needs [rucio] username")
        if rucio.password_file is not None:
            password_file = rucio.password_file
        elif cfg("password") and base_path is not None:
            password_file, password_in_config = Path(os.path.abspath(base_path)), True
        else:
            errors.append(f"{where}: auth_type userpass needs [rucio] password_file = a file "
                          "holding only the password, readable by you alone (chmod 600)")
    elif auth == "token":
        token_file = rucio.token_file or _path(env.get("BEARER_TOKEN_FILE"), env)
        if token_file is None:
            errors.append(f"{where}: auth_type token needs [rucio] token_file = the file your "
                          "token agent keeps fresh (or BEARER_TOKEN_FILE set when planning)")
    if errors:
        raise CredentialsError(errors)
    return Credentials(
        auth_type=auth, host=host, auth_host=auth_host, account=account, ca_cert=ca_cert,
        proxy=proxy, certificate=certificate, key=key, username=username,
        password_file=password_file, password_in_config=password_in_config,
        token_file=token_file,
        base_config=Path(os.path.abspath(base_path)) if base_path else None,
        voms=rucio.voms if auth == "x509_proxy" else None)


# ----------------------------------------------------------------------------- checking
def too_open(mode: int) -> bool:
    """Readable or writable by anyone but the owner."""
    return bool(stat.S_IMODE(mode) & 0o077)


def local_problems(creds: Credentials, now: float | None = None) -> list[str]:
    """What is wrong with the credential files on this machine, one line each with the fix:
    missing files, files others can read, an expired proxy or token."""
    problems = [ca_problem(creds)]
    if creds.certificate is not None and not creds.certificate.is_file():
        problems.append(f"X.509 certificate {creds.certificate} not found: set [rucio] "
                        "certificate")
    for what, path in creds.secret_files():
        problems.append(secret_file_problem(what, path)
                        or lifetime_problem(creds, what, path, now))
    return [p for p in problems if p]


def ca_problem(creds: Credentials) -> str | None:
    if creds.ca_cert is not None and not creds.ca_cert.exists():
        return (f"CA directory {creds.ca_cert} does not exist: set [rucio] ca_dir to your "
                "site's (e.g. /etc/grid-security/certificates or "
                "/cvmfs/grid.cern.ch/etc/grid-security/certificates)")
    return None


def secret_file_problem(what: str, path: Path) -> str | None:
    """Missing, not a file, not yours, unreadable, or readable by others (refused, with the
    chmod). A private key must be 600 or 400 exactly, as Rucio demands."""
    try:
        st = path.stat()
    except OSError:
        return _missing(what, path)
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode):
        return f"{what} {path} is not a regular file"
    if st.st_uid != os.getuid():
        return (f"{what} {path} belongs to another user (uid {st.st_uid}): use a copy of your "
                "own, mode 600")
    if too_open(st.st_mode) or (what == "private key" and mode not in (0o600, 0o400)):
        return f"{what} {path} can be read by others (mode {mode:03o}): run 'chmod 600 {path}'"
    if not os.access(path, os.R_OK):
        return f"{what} {path} cannot be read by you (mode {mode:03o}): run 'chmod 600 {path}'"
    return None


def lifetime_problem(creds: Credentials, what: str, path: Path,
                     now: float | None = None) -> str | None:
    """An expired (or unreadable) proxy, an expired JWT; a proxy that grid servers refuse
    (not RFC 3820) or that lacks the VOMS attributes the job says the storage needs."""
    if what == "X.509 proxy":
        facts = proxy_facts(path, now)
        if facts is None:
            return (f"cannot read the X.509 proxy {path} (openssl): renew it with "
                    f"voms-proxy-init --out {path}")
        if facts.seconds_left <= PROXY_MARGIN:   # the tasks would stop at their first file
            return proxy_expired_line(path, facts.seconds_left)
        return proxy_kind_problem(path, facts, creds.voms)
    if what == "token file":
        left = token_seconds_left(path, now)
        if left is not None and left <= 0:
            return (f"the token in {path} has expired: renew it (your token agent, e.g. "
                    "oidc-token or htgettoken, writes that file)")
    return None


def _missing(what: str, path: Path) -> str:
    fix = {"X.509 proxy": f"create it with voms-proxy-init --out {path} (or set [rucio] proxy)",
           "private key": "set [rucio] key",
           "password file": f"create it: install -m 600 /dev/null {path}, then write the "
                            "password into it",
           "token file": "set [rucio] token_file to the file your token agent writes"}[what]
    return f"{what} {path} not found: {fix}"


def local_warnings(creds: Credentials) -> list[str]:
    """Not wrong, but likely to bite on a cluster."""
    warnings = []
    for what, path in [("X.509 proxy", creds.proxy), ("token file", creds.token_file)]:
        if path is not None and str(path).startswith(("/tmp/", "/var/tmp/")):
            warnings.append(f"the {what} {path} is in /tmp, which is local to each node on "
                            "most clusters (CSD3 included): the array tasks may not see it; "
                            "put it on a shared file system (e.g. voms-proxy-init --out "
                            "~/.globus/x509up) and set [rucio] "
                            + ("proxy" if what == "X.509 proxy" else "token_file"))
    return warnings


# seconds: a proxy with less left is as good as expired (a copy or request started then
# may outlive it); the worker stops before a file when its proxy gets there
PROXY_MARGIN = 60.0


@dataclass(frozen=True)
class ProxyFacts:
    """What an X.509 proxy file says of itself (its first certificate, the proxy)."""

    not_after: float                # seconds since the epoch
    seconds_left: float
    rfc3820: bool                   # it carries RFC 3820's ProxyCertInfo extension
    legacy: bool                    # a pre-RFC Globus proxy: subject ends in CN=proxy
    fqans: tuple[str, ...]          # its VOMS attributes (/vo/Role=.../Capability=...)

    @property
    def vos(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f.split("/")[1] for f in self.fqans))


# RFC 3820 proxies carry this extension; openssl names it so in `-ext proxyCertInfo`
_PROXY_CERT_INFO = "Proxy Certificate Information"
# The VOMS attribute certificate extension (OID 1.3.6.1.4.1.8005.100.100.5), DER-encoded
_VOMS_AC_OID = bytes.fromhex("2b06010401be45646405")
_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.S)
_FQAN = re.compile(rb"/[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*/Role=[A-Za-z0-9_.\-]+"
                   rb"(/Capability=[A-Za-z0-9_.\-]+)?")


def proxy_facts(proxy: Path, now: float | None = None) -> ProxyFacts | None:
    """Expiry, kind and VOMS attributes of the X.509 proxy (openssl for the dates and
    extensions, the FQANs read from the certificate's DER: what voms-proxy-info prints as
    'attribute', without needing voms-clients inside the container); None if unreadable."""
    try:
        out = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-subject", "-nameopt",
                              "compat", "-ext", "proxyCertInfo", "-in", str(proxy)],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        with open(proxy, encoding="ascii", errors="replace") as handle:
            pem = _PEM_CERT.search(handle.read())
    except (OSError, subprocess.SubprocessError):
        return None
    lines = dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)
    try:
        end = calendar.timegm(time.strptime(lines.get("notAfter", "").strip(),
                                            "%b %d %H:%M:%S %Y %Z"))  # always GMT
    except ValueError:
        return None
    subject = lines.get("subject", "").strip()
    fqans: list[str] = []
    if pem is not None:
        try:
            der = base64.b64decode("".join(pem.group(1).split()))
        except ValueError:
            der = b""
        if _VOMS_AC_OID in der:   # each FQAN is an OCTET STRING: tag 4, a short length
            for m in re.finditer(rb"\x04([\x01-\x7f])/", der):
                value = der[m.end() - 1:m.end() - 1 + m.group(1)[0]]
                if _FQAN.fullmatch(value):
                    fqans.append(value.decode())
    return ProxyFacts(not_after=end, seconds_left=end - (time.time() if now is None else now),
                      rfc3820=_PROXY_CERT_INFO in out,
                      legacy=subject.endswith(("/CN=proxy", "/CN=limited proxy")),
                      fqans=tuple(dict.fromkeys(fqans)))


def proxy_seconds_left(proxy: Path, now: float | None = None) -> float | None:
    """Seconds until the X.509 proxy expires; None if it cannot be read."""
    facts = proxy_facts(proxy, now)
    return None if facts is None else facts.seconds_left


def renew_proxy_command(path: Path, voms: str | None = None) -> str:
    """The command every proxy message gives: an RFC 3820 proxy at the same path, 4 days."""
    return f"voms-proxy-init{' --voms ' + voms if voms else ''} -rfc --valid 96:00 --out {path}"


def proxy_expired_line(path: Path, seconds_left: float = 0.0) -> str:
    when = "has expired" if seconds_left <= 0 else f"expires in {seconds_left:.0f} s"
    return f"the X.509 proxy {path} {when}: renew it with {renew_proxy_command(path)}"


def proxy_kind_problem(path: Path, facts: ProxyFacts, voms: str | None) -> str | None:
    """A proxy that is not RFC 3820 (OpenSSL verifies only those: a legacy one works only
    where Globus' or GridSite's own code checks it), or one without the VOMS attributes of
    the VO the job names ([rucio] voms)."""
    fix = renew_proxy_command(path, voms)
    if not facts.rfc3820:
        what = ("a legacy (pre-RFC 3820) Globus proxy, subject ending in CN=proxy"
                if facts.legacy else "not a proxy (no RFC 3820 ProxyCertInfo extension)")
        return (f"the X.509 proxy {path} is {what}, which current grid services need not "
                f"accept: make an RFC 3820 proxy with {fix} (or grid-proxy-init -rfc)")
    if voms and voms not in facts.vos:
        has = f"attributes of {', '.join(facts.vos)} only" if facts.vos else "no VOMS attributes"
        return (f"the X.509 proxy {path} carries {has}, but [rucio] voms = {voms!r} says the "
                f"storage needs them: make it with {fix}")
    return None


def token_seconds_left(token_file: Path, now: float | None = None) -> float | None:
    """Seconds until a JWT's ``exp``; None for a token that is not a JWT (a Rucio token
    says nothing about its own lifetime) or cannot be read."""
    try:
        token = token_file.read_text(encoding="utf-8").strip()
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"]) - (time.time() if now is None else now)
    except (OSError, IndexError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def expiry_warning(creds: Credentials, seconds_needed: int, what_needs_it: str,
                   now: float | None = None) -> str | None:
    """One line when the proxy (or a JWT) expires before the work that needs it is done."""
    path = creds.proxy or creds.token_file
    if path is None or not path.is_file():
        return None
    left = (proxy_seconds_left(path, now) if creds.proxy else token_seconds_left(path, now))
    if left is None or left <= 0 or left >= seconds_needed:
        return None
    hours = -(-seconds_needed // 3600)
    fix = (f"renew it with voms-proxy-init --valid {hours + 12}:00 --out {path}"
           if creds.proxy else "make sure your token agent keeps it fresh")
    return (f"the {'X.509 proxy' if creds.proxy else 'token'} {path} expires in "
            f"{_hours(left)}, before {what_needs_it} ({_hours(seconds_needed)}): tasks "
            f"running after that will fail to authenticate; {fix}")


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


# ----------------------------------------------------------------------------- writing
_NO_DEFAULTS = "dac-upload: no default section"   # read [DEFAULT] as a section of its own


def client_config_text(creds: Credentials, base: configparser.ConfigParser,
                       token_cache: Path | None = None) -> str:
    """The rucio.cfg the tasks use: the user's own, minus secrets (in every section,
    [DEFAULT] included) and minus [logging] (Rucio's DEBUG level prints request headers),
    with our [client] keys. ``token_cache`` points Rucio's token cache elsewhere (a check
    that must really log in)."""
    raw = configparser.ConfigParser(interpolation=None, default_section=_NO_DEFAULTS)
    buf = io.StringIO()
    base.write(buf)                     # what load_base read, [DEFAULT] included
    raw.read_string(buf.getvalue())
    out = configparser.ConfigParser(interpolation=None, default_section=_NO_DEFAULTS)
    for section in raw.sections():
        if section == "logging":
            continue
        out.add_section(section)
        for key, value in raw.items(section, raw=True):
            if key not in SECRET_KEYS:
                out.set(section, key, value)
    if not out.has_section("client"):
        out.add_section("client")
    for key in ("client_x509_proxy", "client_cert", "client_key", "username", "ca_cert",
                "account", "auth_host", "rucio_host", "auth_type"):
        out.remove_option("client", key)
    values = {"rucio_host": creds.host, "auth_host": creds.auth_host,
              "auth_type": RUCIO_AUTH_TYPE[creds.auth_type], "account": creds.account,
              "ca_cert": creds.ca_cert, "client_x509_proxy": creds.proxy,
              "client_cert": creds.certificate, "client_key": creds.key,
              "username": creds.username,
              "auth_token_file_path": token_cache}
    for key, value in values.items():
        if value is not None:   # Rucio reads with interpolation: a '%' is written as '%%'
            out.set("client", key, str(value).replace("%", "%%"))
    text = io.StringIO()
    text.write("# Written by dac-upload for this run; it holds no secret (the password, token "
               "or proxy is\n# read from its own file when the worker connects).\n")
    out.write(text)
    return text.getvalue()


def write_client_config(path: Path, text: str) -> None:
    """Mode 0600: it names the credentials' paths, which is nobody else's business."""
    atomic_write_text(path, text, 0o600)


def read_password(creds: Credentials) -> str:
    """The password, read when the worker connects (never copied anywhere). A file that
    cannot be read raises CredentialsError naming it (never its content)."""
    assert creds.password_file is not None
    try:
        with open(creds.password_file, encoding="utf-8") as handle:
            if not creds.password_in_config:
                return handle.readline().rstrip("\r\n")
            parser = configparser.ConfigParser()   # as Rucio reads it (with interpolation)
            parser.read_file(handle)
            return parser.get("client", "password")
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise CredentialsError([f"cannot read the password from {creds.password_file}: "
                                f"{type(exc).__name__}"]) from None
