"""apptainer/dac-upload.def: the pinned base image matches our rucio-clients pin and the
version CI tests against, it ships everything the package needs and no credentials."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
DEF = (REPO / "apptainer" / "dac-upload.def").read_text()


def _sections() -> dict[str, str]:
    parts = re.split(r"^%(\w+)\s*$", DEF, flags=re.MULTILINE)
    return {name: body for name, body in zip(parts[1::2], parts[2::2])}


def test_base_image_is_the_pinned_rucio_clients_release() -> None:
    tag = re.search(r"^From: rucio/rucio-clients:release-(\S+)$", DEF, re.MULTILINE)
    assert tag, "the image must bootstrap from the official rucio/rucio-clients image"
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(Requirement(d) for d in deps if d.startswith("rucio-clients"))
    assert pin.specifier.contains(tag.group(1)), f"{tag.group(1)} is outside {pin}"
    install = (REPO / "tests" / "services" / "install.sh").read_text()
    assert f"RUCIO_VERSION=${{RUCIO_VERSION:-{tag.group(1)}}}" in install   # what CI tests


def test_files_cover_the_package_and_nothing_secret() -> None:
    sections = _sections()
    copied = [line.split()[0] for line in sections["files"].splitlines() if line.strip()]
    assert set(copied) == {"pyproject.toml", "README.md", "LICENSE", "dac_upload", "templates"}
    assert all((REPO / c).exists() for c in copied)
    for forbidden in ("grid-security", ".pem", "x509", "usercert", "userkey", "password",
                      "token", "rucio.cfg"):
        assert forbidden not in sections["files"] + sections["post"]


def test_test_section_starts_the_worker() -> None:
    assert "dac-upload worker --help" in _sections()["test"]


def test_test_section_proves_the_images_own_gfal2_has_the_grid_plugins() -> None:
    """The worker reaches root:// and davs:// RSEs through the image's own gfal2: the image
    test fails when its bindings or its xrootd/http plugins are missing."""
    test = _sections()["test"]
    assert "import gfal2" in test and "get_plugin_names()" in test
    assert "('xrootd', 'http', 'file')" in test
