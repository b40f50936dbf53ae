"""tests/benchmarks/upload.py --small runs end to end on the test services: it proves the
script works; the figures themselves are not judged here (docs/performance.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from ithelpers import CI_DIR

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "upload.py"


def test_upload_benchmark_small(workdir: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--dir",
                           str(CI_DIR / "tests" / f"bench-{workdir.name}")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for part in ("1. 30 files", "2. server requests per file", "3. 2 files", "4. planning"):
        assert part in out, out
    assert out.count("   ratio : ") == 3
    assert "$ rucio upload --rse LOCAL_DISK" in out and "$ cp FILES" in out


GRID_SCRIPT = SCRIPT.with_name("grid_upload.py")


def grid_script_small(script: Path, workdir: Path) -> str:
    """``script --small`` on the grid stack (tests/services/start-grid.sh), which up.sh
    starts unless DAC_GRID=0: without it the test is skipped (outside CI). Its output."""
    proc = subprocess.run([sys.executable, str(script), "--small", "--dir",
                           str(CI_DIR / "tests" / f"{script.stem}-{workdir.name}")],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 and "run tests/services/start-grid.sh" in proc.stderr \
            and not os.environ.get("CI"):
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_grid_upload_benchmark_small(workdir: Path) -> None:
    out = grid_script_small(GRID_SCRIPT, workdir)
    for part in ("1. 20 files", "2. server requests per file", "3. 2 files"):
        assert part in out, out
    assert out.count("   ratio : ") == 4
    for cmd in ("$ rucio upload --rse ECHO_ROOT", "$ dac-upload worker", " xrdcp --silent",
                "$ gfal-copy "):
        assert cmd in out, out


SCALE_SCRIPT = SCRIPT.with_name("scale.py")


def test_scale_benchmark_small(workdir: Path) -> None:
    """scale.py --small: the bookkeeping steps of a 3,000-file run, each beside its anchor
    (the figures at millions of files are in docs/performance.md)."""
    proc = subprocess.run([sys.executable, str(SCALE_SCRIPT), "--small", "--dir",
                           str(CI_DIR / "tests" / f"scale-{workdir.name}")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for step in ("find", "plan", "json.loads", "collect", "status --json", "resubmit view"):
        assert f"  {step} " in out, out
    assert out.count("x of ") == 2


LEDGER_SCRIPT = SCRIPT.with_name("ledger_merge.py")


def test_ledger_merge_benchmark_small(workdir: Path) -> None:
    """ledger_merge.py --small: both ways of writing a run's ledger rows, side by side."""
    proc = subprocess.run([sys.executable, str(LEDGER_SCRIPT), "--small", "--dir",
                           str(CI_DIR / "tests")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "as they come" in proc.stdout and proc.stdout.count("x\n") == 1, proc.stdout


PACKED_SCRIPT = SCRIPT.with_name("packed.py")


def test_packed_benchmark_small(workdir: Path) -> None:
    """packed.py --small on the grid stack: every method runs and is compared (the figures
    at 20,000 files are in docs/performance.md)."""
    out = grid_script_small(PACKED_SCRIPT, workdir)
    for way in ("seed", "stock", "bulk", "dataset", "packed"):
        assert f"   {way:<8}: " in out, out
    assert "x the seed's files/s" in out and "files per object on the storage" in out


ZIPS_SCRIPT = SCRIPT.with_name("butler_zips.py")


def test_butler_zips_benchmark_small(workdir: Path) -> None:
    """butler_zips.py --small: a map tree planned loose and as Butler zips, beside find
    (the figures at 200,000 files are in docs/performance.md)."""
    proc = subprocess.run([sys.executable, str(ZIPS_SCRIPT), "--small", "--dir",
                           str(CI_DIR / "tests" / f"zips-{workdir.name}")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for step in ("find", "plan loose", "plan packed"):
        assert f"  {step:<12}: " in proc.stdout, proc.stdout
    assert "packed / loose: " in proc.stdout
