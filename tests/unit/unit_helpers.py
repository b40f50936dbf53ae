"""Plain helpers shared by the unit tests (imported as ``unit_helpers``; conftest.py holds the
fixtures). The name is unique so it cannot clash with another test layer's conftest."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

import jobfiles

# Base lines of each section of a valid job; make_job() appends lines per section.
BASE_SECTIONS = {
    "job": "",
    "source": 'root = "data"',
    "rucio": 'scope = "user.test"\nrse = "TEST_RSE"\nhost = "http://rucio.invalid"',
    "naming": "",
    "upload": "",
    "batching": "",
    "slurm": "",
    "container": 'runtime = "none"\npython = "/usr/bin/python3"',
}


def job_text(**extra: str) -> str:
    """A valid job file; ``extra[section]`` holds more ``key = value`` lines for it."""
    return jobfiles.job_text(BASE_SECTIONS, **extra)


def write_tree(root: Path, files: Mapping[str, bytes | str]) -> None:
    """Create ``files`` (relative POSIX path -> content) below ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)


def write_job(directory: Path, text: str, filename: str = "job.toml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def assert_valid_summary(summary: dict) -> dict:
    """summary.json as the collector builds it must validate against docs/summary.schema.json."""
    import json

    import jsonschema

    schema = Path(__file__).resolve().parents[2] / "docs" / "summary.schema.json"
    jsonschema.validate(summary, json.loads(schema.read_text()),
                        cls=jsonschema.Draft202012Validator)
    return summary


def make_proxy(directory: Path, kind: str = "rfc", days: int = 1) -> Path:
    """An X.509 proxy made with openssl, mode 600: ``kind`` "rfc" (RFC 3820: ProxyCertInfo,
    subject = the user's + CN=<number>), "legacy" (a Globus proxy: subject + CN=proxy, no
    extension) or "plain" (the user certificate itself, not a proxy). The "user" is a
    self-signed certificate of its own: nothing here checks the chain."""
    import subprocess

    directory.mkdir(parents=True, exist_ok=True)
    user, user_key = directory / "user.pem", directory / "user.key"
    dn = "/DC=org/DC=test/CN=Test User"

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days), "-subj", dn,
        "-keyout", str(user_key), "-out", str(user))
    out = directory / "x509up"
    if kind == "plain":
        out.write_bytes(user.read_bytes() + user_key.read_bytes())
    else:
        key, csr, cert = directory / "px.key", directory / "px.csr", directory / "px.pem"
        ext = directory / "px.ext"
        ext.write_text("keyUsage = critical,digitalSignature,keyEncipherment\n"
                       + ("proxyCertInfo = critical,language:id-ppl-inheritAll\n"
                          if kind == "rfc" else ""))
        run("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
            "-subj", dn + ("/CN=4242" if kind == "rfc" else "/CN=proxy"), "-out", str(csr))
        run("x509", "-req", "-in", str(csr), "-CA", str(user), "-CAkey", str(user_key),
            "-set_serial", "4242", "-days", str(days), "-extfile", str(ext), "-out", str(cert))
        out.write_bytes(cert.read_bytes() + key.read_bytes() + user.read_bytes())
    out.chmod(0o600)
    return out
