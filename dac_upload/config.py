"""Job file (TOML) -> frozen, validated ``JobConfig``.

Every problem is reported as one line that names the file, the key and the fix, all of them at
once, before anything touches the file system, Slurm or Rucio (exit code 2 at the CLI).
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from . import naming
from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11 (CSD3 login nodes)
    import tomli as tomllib

RUNTIMES = ("none", "apptainer")
UPLOAD_MODES = ("bulk", "stock")
RENAME_MODES = ("auto", "never", "always")
AUTH_TYPES = ("x509_proxy", "userpass", "token", "x509")
# [rucio] keys that belong to one auth_type
_USED_BY = {"proxy": "x509_proxy", "voms": "x509_proxy", "certificate": "x509", "key": "x509",
            "username": "userpass", "password_file": "userpass", "token_file": "token"}
SYMLINK_POLICIES = ("follow", "skip", "refuse")
_SLURM_TIME_RE = re.compile(r"(\d+-)?\d+(:\d{1,2}){0,2}|\d+-\d+")
_JOB_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*")
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgtp])(i)?)?(b)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "pi": 2**50}
_DURATION_RE = re.compile(r"\s*(\d+)\s*([smhdw]?)\s*")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


_INVALID = object()  # stands for a value already reported as invalid
WALKERS = 4   # [source] walkers: processes that list and stat directories (catalogue.walk)


class ConfigError(UserError):
    """A job file problem the user can fix; ``lines`` holds one line per problem."""


# ----------------------------------------------------------------------------- value parsers
def parse_size(value: Any) -> int:
    """``500``, ``"200 GB"``, ``"1.5TiB"`` -> bytes."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        if value <= 0:
            raise ValueError
        return value
    if not isinstance(value, str):
        raise ValueError
    m = _SIZE_RE.fullmatch(value)
    if not m:
        raise ValueError
    unit = ((m.group(2) or "") + (m.group(3) or "")).lower()
    exact = float(m.group(1)) * _SIZE_UNITS[unit]
    if exact < 1 or (exact != int(exact) and not unit):
        raise ValueError  # no fractions of a byte
    return int(exact)


def slurm_time_seconds(value: str) -> int:
    """Slurm's time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) -> seconds."""
    days, _, rest = value.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH[:MM[:SS]]
        h, m, s = [*parts, 0, 0][:3]
    elif len(parts) == 3:
        h, m, s = parts
    else:  # MM[:SS]
        h, (m, s) = 0, [*parts, 0][:2]
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def slurm_mem_bytes(value: str) -> int | None:
    """Slurm's --mem sizes (a bare number is MB; K, M, G, T are powers of 1024) -> bytes;
    None for a form this does not know (sbatch's own check decides on it)."""
    text = str(value).strip()
    try:
        unit = 1 << {"K": 10, "M": 20, "G": 30, "T": 40}[text[-1].upper()] \
            if text[-1:].isalpha() else 1 << 20
        return int(float(text[:-1] if text[-1:].isalpha() else text) * unit)
    except (ValueError, KeyError, IndexError):
        return None


def parse_duration(value: Any) -> int:
    """``3600``, ``"30d"``, ``"12h"`` -> seconds."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        if value <= 0:
            raise ValueError
        return value
    m = _DURATION_RE.fullmatch(value) if isinstance(value, str) else None
    if not m or int(m.group(1)) <= 0:
        raise ValueError
    return int(m.group(1)) * _DURATION_UNITS[m.group(2)]


# ----------------------------------------------------------------------------- schema
_Check = Callable[[Any], Any]


def _str(v: Any) -> str:
    """A one-line string: a newline would end an #SBATCH line early and start a command."""
    if not isinstance(v, str) or not v.strip() or "\n" in v or "\r" in v:
        raise ValueError
    return v


def _int_pos(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError
    return v


def _int_nonneg(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError
    return v


def _str_list(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) and x and "\n" not in x
                                          and "\r" not in x for x in v):
        raise ValueError
    return tuple(v)


def _choice(options: tuple[str, ...]) -> _Check:
    def check(v: Any) -> str:
        if v not in options:
            raise ValueError
        return v
    return check


def _slurm_time(v: Any) -> str:
    if not isinstance(v, str) or not _SLURM_TIME_RE.fullmatch(v):
        raise ValueError
    return v


def _url(v: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"https?://[^\s/]+(/\S*)?", v):
        raise ValueError
    return v.rstrip("/")


def _table_of_str(v: Any) -> dict[str, str]:
    if not isinstance(v, dict):
        raise ValueError
    out = {}
    for key, val in v.items():
        if isinstance(val, bool):
            out[key] = "" if val else None
        elif isinstance(val, (str, int)) and "\n" not in str(val) and "\r" not in str(val):
            out[key] = str(val)
        else:
            raise ValueError
    return {k: val for k, val in out.items() if val is not None}


def _any_str(v: Any) -> str:
    if not isinstance(v, str) or "\n" in v or "\r" in v:
        raise ValueError
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError
    return v


def _data_id(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict) or not all(
            isinstance(x, (str, int)) and not isinstance(x, bool) for x in v.values()):
        raise ValueError
    return dict(v)


# ----------------------------------------------------------------------------- the keys
def setting(check: _Check, default: Any, expect: str, *, path: bool = False,
            key: str | None = None) -> Any:
    """A job-file key, declared once as a dataclass field: how its value is checked, its
    default (``...``: required) and what a valid value looks like (the fix an error message
    gives, and the help of the job-file reference that docref generates). ``path``: a path,
    relative to the job file's directory; ``key``: the TOML key when it is not the field's
    name."""
    meta = {"check": check, "default": default, "expect": expect, "path": path,
            "key": key}
    if default is ...:
        return field(metadata=meta)
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class JobKeys:
    """[job]: read while parsing only (JobConfig.name and JobConfig.runs_dir)."""

    name: str | None = setting(_str, None, 'a name such as "lsst-dp1"')
    runs_dir: str | None = setting(_str, None, "a directory path")


@dataclass(frozen=True)
class SourceConfig:
    root: Path = setting(_str, ..., "the directory to upload from", path=True)
    include: tuple[str, ...] = setting(_str_list, ("**/*",),
                                       'a list of globs such as ["**/*.fits"]')
    exclude: tuple[str, ...] = setting(_str_list, (), 'a list of globs such as ["**/tmp/**"]')
    symlinks: str = setting(_choice(SYMLINK_POLICIES), "follow", " or ".join(SYMLINK_POLICIES))
    walkers: int = setting(_int_pos, WALKERS,
                           "a number of processes such as 4 (1: no helper processes)")


@dataclass(frozen=True)
class RucioConfig:
    scope: str = setting(_str, ..., 'a Rucio scope such as "user.jbloggs"')
    rse: str = setting(_str, ..., 'an RSE name such as "RAL_ECHO"')
    account: str | None = setting(_str, None, "a Rucio account name")
    dataset: str | None = setting(_str, None, 'a dataset name, or "scope:name"')
    lifetime: int | None = setting(parse_duration, None,
                                   'seconds, or "30d" / "12h"; leave it out for none')
    config: Path | None = setting(_str, None, "the path of a rucio.cfg", path=True)
    retries: int = setting(_int_nonneg, 4, "how often a file is tried again when the server "
                           "is unreachable or fails (0 or more)")
    retry_wait: int = setting(parse_duration, 5,
                              "seconds before the first retry (doubling after)")
    # connection and identity; None = from the user's rucio.cfg / environment (rucio/credentials.py)
    host: str | None = setting(_url, None, 'the server URL, e.g. "https://rucio.example.org:443"')
    auth_host: str | None = setting(_url, None, "the authentication server URL (default: host)")
    auth_type: str | None = setting(_choice(AUTH_TYPES), None, " or ".join(AUTH_TYPES))
    ca_dir: Path | None = setting(_str, None, 'the CA directory, e.g. '
                                  '"/etc/grid-security/certificates"', path=True)
    proxy: Path | None = setting(_str, None, "the X.509 proxy file on a shared file system",
                                 path=True)
    voms: str | None = setting(_str, None, 'the VO whose VOMS attributes the proxy must carry, '
                               'e.g. "lsst" (storage that maps users by VO, as Echo does, '
                               "refuses a proxy without)")
    certificate: Path | None = setting(_str, None, "the X.509 certificate (auth_type x509)",
                                       path=True)
    key: Path | None = setting(_str, None, "the X.509 private key (auth_type x509), mode 600",
                               path=True)
    username: str | None = setting(_str, None, "the Rucio user name (auth_type userpass)")
    password_file: Path | None = setting(_str, None, "a file holding only the password, "
                                         "mode 600", path=True)
    token_file: Path | None = setting(_str, None, "the file your token agent keeps fresh "
                                      "(auth_type token)", path=True)

    @property
    def dataset_did(self) -> tuple[str, str] | None:
        """(scope, name) of the dataset; a bare name lives in the job's scope."""
        if not self.dataset:
            return None
        if ":" in self.dataset:
            scope, name = self.dataset.split(":", 1)
            return scope, name
        return self.scope, self.dataset


@dataclass(frozen=True)
class UploadConfig:
    mode: str = setting(_choice(UPLOAD_MODES), "bulk", '"bulk" (fast: bulk requests, '
                        'concurrent copies) or "stock" (Rucio\'s UploadClient, file by file)')
    chunk_size: int = setting(_int_pos, 500,
                              "files per bulk request to Rucio (a positive integer)")
    transfers: int = setting(_int_pos, 4, "concurrent copies per array task (a positive "
                             "integer)")
    rename: str = setting(_choice(RENAME_MODES), "auto", '"auto" (as the RSE\'s protocol '
                          'says), "never" (write the final name: Echo) or "always"')
    guid: bool = setting(_bool, False, "true or false (register a GUID with each new file, "
                         "as rucio upload does)")
    md5: bool = setting(_bool, True, "true or false (compute and register each file's md5 "
                        "besides its adler32)")


@dataclass(frozen=True)
class NamingConfig:
    prefix: str = setting(_any_str, "", 'a string such as "dp1/"')
    replace_invalid: str | None = setting(_any_str, None, 'a replacement string such as "_"')


@dataclass(frozen=True)
class PackingConfig:
    """[packing]: small files go to Rucio in ZIP archives (off unless ``below`` is set)."""

    below: int | None = setting(parse_size, None, 'a size such as "1 MiB": files smaller '
                                "than this are packed into archives (unset: no packing)")
    archive_size: int = setting(parse_size, 2**30, 'a size such as "1 GiB": the most an '
                                "archive holds (members and ZIP records)")
    names: str = setting(_any_str, "archives/", 'a name part such as "archives/": archives '
                         "are named [naming] prefix + this + a digest of their members + .zip")
    scratch: Path | None = setting(_str, None, "a directory on the compute node where the "
                                   "worker builds archives (default: $TMPDIR, else /tmp)",
                                   path=True)

    @property
    def enabled(self) -> bool:
        return self.below is not None


@dataclass(frozen=True)
class BatchingConfig:
    files_per_batch: int | None = setting(_int_pos, 1000, "a positive integer")
    bytes_per_batch: int | None = setting(parse_size, None,
                                          'bytes, or a size such as "200 GB"')
    max_running: int = setting(_int_pos, 4, "a positive integer (array tasks running at once)")


@dataclass(frozen=True)
class SlurmConfig:
    partition: str | None = setting(_str, None, "a partition name")
    account: str | None = setting(_str, None, "a Slurm project account")
    time: str = setting(_slurm_time, "01:00:00",
                        'a Slurm time such as "02:00:00" or "1-00:00:00"')
    mem: str = setting(_str, "2G", 'a Slurm memory size such as "4G"')
    cpus_per_task: int = setting(_int_pos, 1, "a positive integer")
    job_name: str | None = setting(_str, None, "a job name")
    extra: dict[str, str] = setting(_table_of_str, {},
                                    'a table of sbatch options, e.g. {qos = "normal"}')
    stop_margin: int = setting(parse_duration, 300, "seconds before the wall time at which a "
                               "task is asked to stop cleanly (sbatch --signal=B:USR1@N)")
    max_submit: int | None = setting(_int_pos, None, "the most array tasks submitted at once "
                                     "(site limit); the rest are left for dac-upload resubmit")


@dataclass(frozen=True)
class ContainerConfig:
    runtime: str = setting(_choice(RUNTIMES), "apptainer", " or ".join(RUNTIMES))
    image: Path | None = setting(_str, None, "the path of the .sif image", path=True)
    binds: tuple[str, ...] = setting(_str_list, (), 'a list such as ["/rds:/rds:ro"]')
    python: str | None = setting(_str, None,
                                 "the Python interpreter that runs the worker (runtime none)")


@dataclass(frozen=True)
class ButlerMapping:
    """One [[butler.map]] entry: plain-tree paths -> data IDs of one dataset type."""

    dataset_type: str = setting(_str, ..., 'the dataset type, e.g. "raw"')
    run: str = setting(_str, ..., 'the RUN collection at the destination, e.g. "DECam/raw/all"')
    # a regex, matched against the whole relative path
    path: str = setting(_str, ..., "a regular expression with named groups matching the "
                        "whole relative path, e.g. "
                        "'raw/(?P<exposure>\\d+)/(?P<detector>\\d+)\\.fits'")
    data_id: tuple[tuple[str, Any], ...] = setting(  # fixed values, sorted (key, value) pairs
        _data_id, (), 'a table of fixed values such as {instrument = "DECam"}')
    formatter: str | None = setting(_str, None,
                                    "the Formatter class for butler ingest-files --formatter")
    storage_class: str | None = setting(_str, None, 'the storage class, e.g. "Exposure" (for '
                                        "the register-dataset-type command)")

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(self.path)


@dataclass(frozen=True)
class ButlerConfig:
    """[butler]: a Butler repository as the source (repo + collections + dataset types), or
    data IDs for a plain tree (maps). Neither: no Butler fields at all."""

    repo: str | None = setting(_str, None, "the Butler repository (its directory or "
                               "butler.yaml)")
    collections: tuple[str, ...] = setting(_str_list, (), 'a list of collections such as '
                                           '["HSC/runs/RC2"]')
    dataset_types: tuple[str, ...] = setting(_str_list, ("*",), 'a list of dataset type names '
                                             'or globs, e.g. ["calexp", "src*"]')
    where: str = setting(_any_str, "", "a Butler query expression such as "
                         "\"instrument = 'HSC'\"")
    find_first: bool = setting(_bool, False, "true or false")
    # rubin_butler / rubin_sidecar on each file DID
    metadata: bool = setting(_bool, True, "true or false")
    raw_dataset_types: tuple[str, ...] = setting(
        _str_list, ("raw",), 'dataset types registered as "raw_file" for Rubin\'s ingest '
        'daemon, e.g. ["raw"]')
    maps: tuple[ButlerMapping, ...] = setting(lambda v: v, (), "a list of [[butler.map]] "
                                              "tables", key="map")

    @property
    def kind(self) -> str | None:
        return "repo" if self.repo else "map" if self.maps else None


def keys_of(cls: type) -> dict[str, tuple[_Check, Any, str]]:
    """A section's TOML keys -> (check, default, what a valid value looks like), from its
    dataclass: the one place each key is declared."""
    return {f.metadata["key"] or f.name: (f.metadata["check"], f.metadata["default"],
                                          f.metadata["expect"])
            for f in fields(cls) if "check" in f.metadata}


# [section] -> its dataclass, in the order the sections are listed
SECTIONS: dict[str, type] = {
    "job": JobKeys, "source": SourceConfig, "rucio": RucioConfig, "upload": UploadConfig,
    "naming": NamingConfig, "packing": PackingConfig, "batching": BatchingConfig,
    "slurm": SlurmConfig,
    "container": ContainerConfig, "butler": ButlerConfig, "butler.map": ButlerMapping,
}
_SCHEMA = {name: keys_of(cls) for name, cls in SECTIONS.items() if "butler" not in name}
_BUTLER_KEYS = keys_of(ButlerConfig)
_MAP_KEYS = keys_of(ButlerMapping)


@dataclass(frozen=True)
class JobConfig:
    name: str
    path: Path
    text: str
    runs_dir: Path
    source: SourceConfig
    rucio: RucioConfig
    naming: NamingConfig
    batching: BatchingConfig
    slurm: SlurmConfig
    container: ContainerConfig
    upload: UploadConfig = field(default_factory=UploadConfig)
    butler: ButlerConfig = field(default_factory=ButlerConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)

    @property
    def ledger_path(self) -> Path:
        """One ledger per destination (scope, RSE, naming), in the runs folder beside the
        runs: changing where or under which names files go starts from an empty ledger
        (the worker then asks Rucio about every file)."""
        import hashlib

        target = json.dumps([self.rucio.scope, self.rucio.rse, self.naming.prefix,
                             self.naming.replace_invalid])
        digest = hashlib.sha256(target.encode()).hexdigest()[:8]
        return self.runs_dir / f"ledger.{self.rucio.scope}.{self.rucio.rse}.{digest}.sqlite"



def _check_table(given: dict[str, Any], keys: dict[str, tuple[_Check, Any, str]], at: str,
                 errors: list[str]) -> dict[str, Any]:
    """Each key of a TOML table checked against ``keys`` (key -> check, default, what a
    valid value looks like); unknown keys, missing required keys and invalid values become
    lines in ``errors``, starting with ``at``. A missing key gets its default (None if it
    is required), an invalid one _INVALID."""
    for key in given:
        if key not in keys:
            hint = _close_match(key, keys)
            errors.append(f"{at} unknown key '{key}'" + (
                f"; did you mean '{hint}'?" if hint else f"; known keys are {', '.join(keys)}"))
    out: dict[str, Any] = {}
    for key, (check, default, expect) in keys.items():
        if key not in given:
            if default is ...:
                errors.append(f"{at} '{key}' is required: set it to {expect}")
            out[key] = None if default is ... else default
            continue
        try:
            out[key] = check(given[key])
        except (ValueError, TypeError):
            errors.append(f"{at} {key} = {given[key]!r} is not valid: use {expect}")
            out[key] = _INVALID
    return out


def _parse_butler(raw: Any, where: str, errors: list[str]) -> ButlerConfig:
    """[butler] and its [[butler.map]] entries; problems go to ``errors``, one line each."""
    if raw is None:
        return ButlerConfig()
    got = {key: _BUTLER_KEYS[key][1] if value is _INVALID else value
           for key, value in _check_table(raw, _BUTLER_KEYS, f"{where}: [butler]",
                                          errors).items()}
    maps: list[ButlerMapping] = []
    entries = got["map"]
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, (list, tuple)) or not all(isinstance(e, dict) for e in entries):
        errors.append(f"{where}: [butler] map must be [[butler.map]] tables, one per dataset "
                      "type and path pattern")
        entries = []
    for n, entry in enumerate(entries, 1):
        at = f"{where}: [[butler.map]] #{n}"
        before = len(errors)
        vals = _check_table(entry, _MAP_KEYS, at, errors)
        ok = len(errors) == before
        vals = {k: v for k, v in vals.items() if v is not _INVALID}
        rx = None
        if vals.get("path"):
            try:
                rx = re.compile(vals["path"])
            except re.error as exc:
                errors.append(f"{at} path {vals['path']!r} is not a valid regular expression "
                              f"({exc}); fix it")
                ok = False
        # how the path and data_id fit together, once both are known to be valid
        if rx is not None and ("data_id" not in entry or "data_id" in vals):
            fixed = vals.get("data_id") or {}
            if not rx.groupindex and not fixed:
                errors.append(f"{at} path has no named group such as (?P<exposure>\\d+) "
                              "and data_id is empty: nothing would give a data ID")
                ok = False
            both = set(rx.groupindex) & set(fixed)
            if both:
                errors.append(f"{at} {', '.join(sorted(both))} comes both from a path group "
                              "and from data_id: keep one")
                ok = False
        if ok:
            maps.append(ButlerMapping(
                dataset_type=vals["dataset_type"], run=vals["run"], path=vals["path"],
                data_id=tuple(sorted(dict(vals["data_id"]).items())),
                formatter=vals["formatter"], storage_class=vals["storage_class"]))
    cfg = ButlerConfig(repo=got["repo"], collections=got["collections"],
                       dataset_types=got["dataset_types"], where=got["where"],
                       find_first=got["find_first"], metadata=got["metadata"],
                       raw_dataset_types=got["raw_dataset_types"], maps=tuple(maps))
    if cfg.repo and entries:
        errors.append(f"{where}: [butler] repo (a Butler source) and [[butler.map]] (data IDs "
                      "for a plain tree) do not go together: keep one")
    if cfg.repo and not cfg.collections:
        errors.append(f"{where}: [butler] repo needs collections = [\"...\"], the collections "
                      "to upload from")
    if "dataset_types" in raw and not cfg.dataset_types:
        errors.append(f"{where}: [butler] dataset_types is empty: list the dataset types to "
                      "upload, or leave it out for all (\"*\")")
    if not cfg.repo:
        for key in ("collections", "where", "find_first", "dataset_types", "metadata",
                    "raw_dataset_types"):
            if key in raw:
                errors.append(f"{where}: [butler] {key} is used only with repo (a Butler "
                              "source): set repo or remove it")
    return cfg


def load_job(path: Path | str) -> JobConfig:
    """Read and validate a job file; raise ConfigError listing every problem."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{where}: job file not found; check the path"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{where}: cannot read the job file ({exc})"]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{where}: not valid TOML: {exc}; fix the syntax"]) from None
    return parse_job(raw, path=path.resolve(), text=text)


def parse_job(raw: dict[str, Any], path: Path, text: str = "") -> JobConfig:
    where = str(path)
    errors: list[str] = []
    values: dict[str, dict[str, Any]] = {}

    butler_raw = raw.get("butler")
    if butler_raw is not None and not isinstance(butler_raw, dict):
        errors.append(f"{where}: 'butler' must be a table [butler]")
        butler_raw = None
    butler_cfg = _parse_butler(butler_raw, where, errors)
    raw = {k: v for k, v in raw.items() if k != "butler"}
    source_raw = raw.get("source")
    if butler_cfg.repo:
        for key in ("root", "include", "exclude"):
            if isinstance(source_raw, dict) and key in source_raw:
                errors.append(f"{where}: [source] {key} is not used with a Butler source (the "
                              "files are the datastore's, under its root, as the query finds "
                              "them): remove it, or narrow [butler] dataset_types / where")
        # until planning opens the repository, the root is where the repository is
        path_like = "://" not in butler_cfg.repo and (
            "/" in butler_cfg.repo or butler_cfg.repo.startswith("~")
            or (path.parent / butler_cfg.repo).exists())
        repo_dir = butler_cfg.repo if path_like else "."
        if repo_dir.endswith((".yaml", ".json")):
            repo_dir = os.path.dirname(repo_dir) or "."
        raw = {**raw, "source": {**(source_raw if isinstance(source_raw, dict) else {}),
                                 "root": repo_dir}}

    for section in raw:
        if section not in _SCHEMA and section != "butler":
            known = ", ".join(f"[{name}]" for name in [*_SCHEMA, "butler"])
            errors.append(f"{where}: unknown section [{section}]; known sections are {known}")
        elif not isinstance(raw[section], dict):
            errors.append(f"{where}: '{section}' must be a table [{section}]")
    for section, keys in _SCHEMA.items():
        given = raw.get(section, {})
        values[section] = _check_table(given if isinstance(given, dict) else {}, keys,
                                       f"{where}: [{section}]", errors)

    if values["packing"].get("below") not in (None, _INVALID):
        # a Butler zip's index carries each dataset's storage class and formatter
        for n, m in enumerate(butler_cfg.maps, 1):
            lacking = [k for k in ("storage_class", "formatter") if getattr(m, k) is None]
            if lacking:
                errors.append(f"{where}: [[butler.map]] #{n} ({m.dataset_type}) needs "
                              f"{' and '.join(lacking)} with [packing]: its files go into "
                              "Butler zips, whose index names both; add them to the map")
    # the semantic checks judge only values that are valid one by one
    _semantic_checks({s: {k: val for k, val in kv.items() if val is not _INVALID}
                      for s, kv in values.items()}, where, errors, path)
    if errors:
        raise ConfigError(errors)
    v = values

    name = v["job"].get("name") or path.stem
    base = path.parent
    runs_dir = (Path(v["job"]["runs_dir"]).expanduser() if v["job"]["runs_dir"]
                else Path(name) / "runs")
    runs_dir = _abs(runs_dir, base)
    if butler_cfg.repo and "://" not in butler_cfg.repo:
        # a path, relative to the job file; a bare name that is no path there is a label of
        # the site's repository index (DAF_BUTLER_REPOSITORY_INDEX), left for the Butler
        repo = _abs(Path(butler_cfg.repo).expanduser(), base)
        if repo.exists() or "/" in butler_cfg.repo or butler_cfg.repo.startswith("~"):
            butler_cfg = replace(butler_cfg, repo=str(repo))

    def section(name: str) -> Any:
        """[name]'s dataclass; a path key made absolute against the job file's directory."""
        cls = SECTIONS[name]
        vals = dict(v[name])
        for f in fields(cls):
            if f.metadata.get("path") and vals.get(f.name):
                vals[f.name] = _abs(Path(vals[f.name]).expanduser(), base)
        return cls(**vals)

    return JobConfig(name=name, path=path, text=text, runs_dir=runs_dir,
                     source=section("source"), rucio=section("rucio"),
                     naming=section("naming"), batching=section("batching"),
                     slurm=section("slurm"), upload=section("upload"), butler=butler_cfg,
                     container=section("container"), packing=section("packing"))


def _semantic_checks(v: dict[str, dict[str, Any]], where: str, errors: list[str],
                     path: Path) -> None:
    name = v["job"].get("name") or path.stem
    if not _JOB_NAME_RE.fullmatch(name):
        key = "[job] name" if v["job"].get("name") else "the job file name (its default)"
        errors.append(f"{where}: {key} {name!r} is not a usable job name: use letters, digits, "
                      "'.', '_' and '-' (set [job] name)")
    job_name = v["slurm"].get("job_name")
    if job_name and not _JOB_NAME_RE.fullmatch(job_name):
        errors.append(f"{where}: [slurm] job_name = {job_name!r}: use letters, digits, '.', "
                      "'_' and '-'")
    s = v["slurm"]
    if s.get("time") and s.get("stop_margin"):
        limit = slurm_time_seconds(s["time"])
        if s["stop_margin"] >= limit or s["stop_margin"] > 65535:
            errors.append(f"{where}: [slurm] stop_margin = {s['stop_margin']} s must be shorter "
                          f"than time = {s['time']!r} ({limit} s) and at most 65535 s")
    r = v["rucio"]
    for key, check in (("scope", naming.scope_problem), ("account", naming.account_problem),
                       ("rse", naming.rse_problem)):
        if r.get(key):
            problem = check(r[key])
            if problem:
                errors.append(f"{where}: [rucio] {key} = {r[key]!r}: {problem}")
    if r.get("dataset"):
        ds_scope, sep, ds_name = r["dataset"].partition(":")   # as RucioConfig.dataset_did
        if not sep:
            ds_scope, ds_name = "", ds_scope
        problem = naming.name_problem(ds_name) or (naming.scope_problem(ds_scope) if sep
                                                    else None)
        if problem:
            errors.append(f"{where}: [rucio] dataset = {r['dataset']!r}: {problem}")
    if r.get("auth_type"):
        for key, kind in _USED_BY.items():
            if r.get(key) and r["auth_type"] != kind:
                errors.append(f"{where}: [rucio] {key} is used only with auth_type = "
                              f"\"{kind}\", not \"{r['auth_type']}\": remove one of them")
    rep = v["naming"].get("replace_invalid")
    if rep is not None and naming.name_problem("a" + rep) is not None:
        errors.append(f"{where}: [naming] replace_invalid = {rep!r} is itself not allowed in "
                      "a Rucio name: use '_', '-' or '.'")
    prefix = v["naming"].get("prefix")
    if prefix and naming.name_problem(prefix) is not None:
        errors.append(f"{where}: [naming] prefix = {prefix!r}: "
                      f"{naming.name_problem(prefix)}")
    pk = v["packing"]
    if pk.get("below") is not None:
        if v["upload"].get("mode") == "stock":
            errors.append(f"{where}: [packing] needs [upload] mode = \"bulk\" (the stock client "
                          "uploads file by file): remove mode or [packing]")
        if pk.get("archive_size") and pk["below"] > pk["archive_size"]:
            errors.append(f"{where}: [packing] below = {pk['below']} bytes is larger than "
                          f"archive_size = {pk['archive_size']} bytes: lower below")
        archive_like = (prefix or "") + (pk.get("names") or "") + "0" * 32 + ".zip"
        if naming.name_problem(archive_like) is not None:
            errors.append(f"{where}: [packing] names = {pk.get('names')!r}: archive names such "
                          f"as {archive_like!r} are not valid Rucio names: "
                          f"{naming.name_problem(archive_like)}")
    c = v["container"]
    if c.get("runtime") == "apptainer" and not c.get("image"):
        errors.append(f"{where}: [container] runtime = \"apptainer\" needs image = "
                      "\"/path/to/dac-upload.sif\" (or set runtime = \"none\")")
    for bind in c.get("binds") or ():
        if "," in bind or not bind.startswith("/"):
            errors.append(f"{where}: [container] binds entry {bind!r}: use one absolute "
                          "'src[:dst[:ro]]' per entry")


def _abs(p: Path, base: Path) -> Path:
    return Path(os.path.abspath(p if p.is_absolute() else base / p))


def _close_match(key: str, keys: dict[str, Any]) -> str | None:
    import difflib

    found = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.6)
    return found[0] if found else None
