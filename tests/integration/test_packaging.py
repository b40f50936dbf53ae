"""`pip install .` (not editable) must ship templates/ inside the package and find it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_ships_templates_and_renders_from_them(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("dac_upload-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "dac_upload/templates/array.sh.j2" in names
    assert "dac_upload/templates/collect.sh.j2" in names
    assert "dac_upload/templates/ingest.sh.j2" in names
    assert "dac_upload/templates/report.html.j2" in names
    assert any(n.endswith("entry_points.txt") for n in names)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, capture_output=True)
    code = ("from dac_upload import render; d = render.templates_dir(); print(d); "
            "assert (d / 'array.sh.j2').is_file()")
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    assert out == str(site / "dac_upload" / "templates")
