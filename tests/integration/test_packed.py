"""[packing] on the real Slurm, Rucio and storage, on every stack (posix, root, davs/X.509):
2,000 tiny files and a few large ones, packed. Checked against Rucio and the storage
directly, not the tool's summary: every small file is a constituent of its archive with its
own size and adler32 (list_archive_content), each archive a file DID with an AVAILABLE
replica, a rule and the storage's bytes equal to a ZIP of exactly its members; the objects
on the storage are the archives and the large files, nothing else; `rucio download` (the
real download client) of a sample of members gives back their bytes; verify passes, and names
exactly the files of an archive broken on the storage. A task killed while it packs is
finished by a resubmission with one archive, registered once (crash_in_packing.py)."""

from __future__ import annotations

import io
import json
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
from ithelpers import (
    GRID_CA,
    SCOPE,
    VENV_BIN,
    adler32_of,
    as_user,
    chown_user,
    dac_upload,
    job_toml,
    load_summary,
    run_dir_of,
    submit_with_hook,
    unique_prefix,
    wait_for_jobs,
    write_job,
)

SMALL, LARGE = 2000, 3


def rucio_cli_env(workdir: Path, stack: Any) -> dict[str, str]:
    """What `rucio download` needs as a user runs it: the workdir's rucio.cfg and, on the
    grid stacks, the proxy and the CA directory where gfal2 looks for them."""
    env = {"RUCIO_CONFIG": str(workdir / "rucio.cfg")}
    if stack.grid:
        env.update(X509_USER_PROXY=str(workdir / "x509up"), X509_CERT_DIR=str(GRID_CA))
    return env


def _tree(root: Path) -> dict[str, Path]:
    """2,000 files of 1-300 bytes in 20 directories, and 3 of 200 kB."""
    out = {}
    for i in range(SMALL):
        p = root / f"d{i % 20:02d}" / f"meta{i:04d}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b'{"i": %d}' % i + b" " * (i % 290))
        out[str(p.relative_to(root))] = p
    for i in range(LARGE):
        p = root / f"image{i}.fits"
        p.write_bytes(bytes([i]) * 200_000)
        out[p.name] = p
    return out


def test_small_files_packed_into_archives(workdir: Path, stack: Any) -> None:
    files = _tree(workdir / "src")
    chown_user(workdir)
    prefix = unique_prefix()
    job = write_job(workdir, "packed", job_toml(
        prefix, files_per_batch=1100, max_running=2, rse=stack.rse,
        packing='below = "100 kB"\narchive_size = "1 GiB"'))
    proc = dac_upload(["submit", str(job), "--wait", "--timeout", "600"], cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = run_dir_of(proc.stdout)
    summary = load_summary(run_dir)
    assert summary["complete"] is True

    client = stack.client
    archives: dict[str, set[str]] = {}
    for rel, src in files.items():
        entry = summary["files"][f"{SCOPE}:{prefix}{rel}"]
        if src.stat().st_size >= 100_000:
            assert "archive" not in entry
        else:
            archives.setdefault(entry["archive"], set()).add(prefix + rel)
    assert len(archives) == 2                       # one per task of 1,000 small files
    for archive, members in archives.items():
        # Rucio: the archive a file DID with an AVAILABLE replica and a rule
        (rep,) = client.list_replicas([{"scope": SCOPE, "name": archive}], all_states=True)
        assert rep["states"] == {stack.rse: "AVAILABLE"}, rep["states"]
        assert list(client.list_did_rules(SCOPE, archive)), f"{archive} has no rule"
        # its constituents: exactly these members, each with its own size and adler32
        content = {c["name"]: c for c in client.list_archive_content(SCOPE, archive)}
        assert set(content) == members
        for name in members:
            src = files[name[len(prefix):]]
            assert (content[name]["bytes"], content[name]["adler32"]) == (
                src.stat().st_size, adler32_of(src)), name
            assert not list(client.list_did_rules(SCOPE, name))   # the archive's rule keeps it
        # the storage: a ZIP of exactly these members, with their bytes
        stored = stack.path_of(rep["rses"][stack.rse][0]).read_bytes()
        assert rep["bytes"] == len(stored)
        with zipfile.ZipFile(io.BytesIO(stored)) as zf:
            assert {i.filename for i in zf.infolist()} == members
            for name in sorted(members)[:50]:
                assert zf.read(name) == files[name[len(prefix):]].read_bytes()
    # the objects on the storage: the archives and the large files, nothing else
    on_disk = stack.files_under(SCOPE, prefix)
    assert len(on_disk) == len(archives) + LARGE, sorted(map(str, on_disk))

    # the real download client fetches an archive like any file; unzip gives back the
    # members' bytes (rucio download 41 extracts a member itself only if its name holds no
    # '/': test_rucio_download_extracts_a_member, docs/job-file.md)
    dest = workdir / "download"
    first = sorted(archives)[0]
    (dest / SCOPE / first).parent.mkdir(parents=True)   # rucio download keeps, but does not
    chown_user(dest)                                     # make, the directories of a name
    got = as_user([str(VENV_BIN / "rucio"), "download", "--dir", str(dest),
                   f"{SCOPE}:{first}"], workdir, **rucio_cli_env(workdir, stack))
    assert got.returncode == 0, got.stdout + got.stderr
    (fetched,) = [p for p in dest.rglob("*.zip") if p.is_file()]
    for name in sorted(archives[first])[:20]:
        out = subprocess.run(["unzip", "-p", str(fetched), name], capture_output=True)
        assert out.returncode == 0 and out.stdout == files[name[len(prefix):]].read_bytes()

    # nothing to do again: the same run resubmitted finds every task complete
    again = dac_upload(["resubmit", str(run_dir)], cwd=workdir)
    assert again.returncode == 0 and "every task is complete" in again.stdout

    # verify: the run as uploaded passes; one archive's bytes broken on the storage's own
    # disk, behind the tool's back: verify names exactly that archive's files
    ok = dac_upload(["verify", str(run_dir), "--json"], cwd=workdir)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["files_with_problems"] == 0
    broken, members = sorted(archives.items())[0]
    (rep,) = client.list_replicas([{"scope": SCOPE, "name": broken}])
    path = stack.path_of(rep["rses"][stack.rse][0])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    bad = dac_upload(["verify", str(run_dir), "--json"], cwd=workdir)
    assert bad.returncode != 0, bad.stdout + bad.stderr
    lines = [json.loads(line) for line in (run_dir / "verify.jsonl").read_text().splitlines()]
    assert {p["cause"] for p in lines} == {"storage_checksum_mismatch"}, lines[:3]
    assert {p["did"] for p in lines} == {f"{SCOPE}:{n}" for n in members}
    assert all(f"its archive {SCOPE}:{broken}" in p["detail"] for p in lines)


@pytest.mark.parametrize("point", ["build", "members"])
def test_killed_while_packing_then_resubmitted(workdir: Path, stack: Any, point: str) -> None:
    """A task killed half-way through writing its archive (nothing uploaded), or once the
    archive is uploaded but before its members are registered; then resubmitted: one
    archive on the storage, the same bytes Rucio recorded, one replica, one rule, every
    member registered once."""
    src = workdir / "src"
    files = {}
    for i in range(60):
        p = src / f"m{i:03d}.yaml"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"k: %d\n" % i * (1 + i % 7))
        files[p.name] = p
    prefix = unique_prefix()
    job = write_job(workdir, "packkill", job_toml(prefix, rse=stack.rse, files_per_batch=100,
                                                  max_running=1, packing='below = "1 MiB"'))
    run_dir, *jobs = submit_with_hook(workdir, job, Path(__file__).with_name(
        "crash_in_packing.py"), "DAC_UPLOAD_TEST_CRASH_PACKING", f"{{run_id}}:{point}")
    wait_for_jobs(jobs)
    assert (run_dir / "crashed-once").exists()
    assert not (run_dir / "results" / "task-00000.done.json").exists()
    on_disk = stack.files_under(SCOPE, prefix)
    assert len(on_disk) == (0 if point == "build" else 1), on_disk
    assert not list(stack.client.list_dids(SCOPE, {"name": f"{prefix}m*"}, did_type="file"))

    again = dac_upload(["resubmit", str(run_dir), "--wait", "--timeout", "300"], cwd=workdir)
    assert again.returncode == 0, again.stdout + again.stderr
    summary = load_summary(run_dir)
    assert summary["complete"] and summary["counts"]["uploaded"] == len(files)
    (archive,) = {e["archive"] for e in summary["files"].values()}
    (stored,) = stack.files_under(SCOPE, prefix)       # one object: the archive
    if point == "members":
        assert stored == on_disk[0]                     # the first attempt's copy, kept
    (rep,) = stack.client.list_replicas([{"scope": SCOPE, "name": archive}], all_states=True)
    assert rep["states"] == {stack.rse: "AVAILABLE"}
    assert rep["adler32"] == adler32_of(stored) and rep["bytes"] == stored.stat().st_size
    assert len(list(stack.client.list_did_rules(SCOPE, archive))) == 1
    content = {c["name"]: c for c in stack.client.list_archive_content(SCOPE, archive)}
    assert set(content) == {prefix + rel for rel in files}
    assert all(content[prefix + rel]["adler32"] == adler32_of(p) for rel, p in files.items())


def test_rucio_download_extracts_a_member(workdir: Path, stack: Any) -> None:
    """`rucio download SCOPE:NAME` of a packed file: the real download client finds the
    archive through the member, fetches it and extracts the member (Info-ZIP unzip). Names
    without a '/' (Rucio 41's client extracts a member 'a/b' into a directory it does not
    create, and reports it done)."""
    src = workdir / "src"
    src.mkdir()
    files = {}
    for i in range(30):
        p = src / f"top{i:02d}.json"
        p.write_bytes(b'{"n": %d}' % i * (i + 1))
        files[p.name] = p
    prefix = unique_prefix().rstrip("/") + "-"
    job = write_job(workdir, "flat", job_toml(prefix, rse=stack.rse, files_per_batch=100,
                                              max_running=1, packing='below = "1 MiB"'))
    proc = dac_upload(["submit", str(job), "--wait", "--timeout", "300"], cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = load_summary(run_dir_of(proc.stdout))
    assert summary["complete"] and len({e["archive"] for e in summary["files"].values()}) == 1
    dest = workdir / "download"
    dest.mkdir()
    chown_user(dest)
    sample = [f"{prefix}top03.json", f"{prefix}top17.json"]
    got = as_user([str(VENV_BIN / "rucio"), "download", "--dir", str(dest),
                   *(f"{SCOPE}:{n}" for n in sample)], workdir,
                  **rucio_cli_env(workdir, stack))
    assert got.returncode == 0, got.stdout + got.stderr
    for name in sample:
        path = dest / SCOPE / name
        assert path.is_file(), (name, sorted(map(str, dest.rglob("*"))), got.stderr[-2000:])
        assert path.read_bytes() == files[name[len(prefix):]].read_bytes()
