"""An RSE whose storage fills up during a run, on the real Slurm and the plain Rucio: a POSIX
RSE of its own on a 2 MiB tmpfs, and more bytes to upload than fit.

Rucio's POSIX protocol reports the disk's ENOSPC as ``KeyError: 'prefix'`` (bulk) or
``RSE does not support requested operation. Details: 'prefix'`` (stock), and leaves the
half-written ``PFN.rucio.upload`` behind. Checked here through an admin client and the
tmpfs itself: the files not done say the storage is full, none of them has a replica, no
temporary or partial copy is left, every file reported uploaded is AVAILABLE with its bytes;
and once there is room, a resubmission finishes the run with every file registered once."""

from __future__ import annotations

import subprocess
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import StackUnderTest
from ithelpers import (
    CI_DIR,
    RUCIO_CFG,
    RUCIO_URL,
    SCOPE,
    Stack,
    adler32_of,
    chown_user,
    dac_upload,
    job_toml,
    load_summary,
    make_files,
    run_dir_of,
    unique_prefix,
    write_job,
)
from test_faults import assert_in_rucio_once

FULL = "is full (No space left on device)"


@pytest.fixture
def full_stack(posix_stack: Any) -> Iterator[StackUnderTest]:
    """A new POSIX RSE (a unique name) whose prefix is a 2 MiB tmpfs writable by dacuser,
    with an unlimited quota for root (the tests' Rucio account); unmounted afterwards, and
    the RSE removed as far as Rucio lets it."""
    client = posix_stack.client
    rse = "FULL_" + uuid.uuid4().hex[:6].upper()
    top = CI_DIR / "tests" / f"tmpfs-{rse.lower()}"
    top.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(top)],
                   check=True, capture_output=True)
    try:
        chown_user(top)
        client.add_rse(rse)
        client.add_protocol(rse, {"scheme": "file", "hostname": "localhost", "port": 0,
                                  "prefix": str(top),
                                  "impl": "rucio.rse.protocols.posix.Default",
                                  "domains": {"lan": {"read": 1, "write": 1, "delete": 1},
                                              "wan": {"read": 1, "write": 1, "delete": 1}}})
        client.set_local_account_limit("root", rse, -1)
        yield StackUnderTest(Stack("posix", rse, RUCIO_URL, top, RUCIO_CFG), client)
    finally:
        subprocess.run(["umount", str(top)], check=False, capture_output=True)
        top.rmdir()
        _remove_rse(client, rse)


def _remove_rse(client: Any, rse: str) -> None:
    """The RSE's rules, then the RSE (Rucio then marks it deleted; its replicas cannot be
    deleted through the API, the generic policy's perm_delete_replicas says no to all).
    Best effort: a test RSE left over is harmless under its unique name."""
    try:
        for rule in list(client.list_replication_rules({"rse_expression": rse})):
            client.delete_replication_rule(rule["id"], purge_replicas=True)
        client.delete_rse(rse)
    except Exception as exc:   # say why, do not fail the test
        print(f"test RSE {rse} not removed: {type(exc).__name__}: {exc}")


def _on_disk(stack: StackUnderTest, prefix: str) -> list[Path]:
    return stack.files_under(SCOPE, prefix)


@pytest.mark.parametrize("mode", ["bulk", "stock"])
def test_full_storage(workdir: Path, full_stack: StackUnderTest, mode: str) -> None:
    stack, client = full_stack, full_stack.client
    files = make_files(workdir / "src", 12, size=300_000)    # 3.6 MB for a 2 MiB tmpfs
    chown_user(workdir)
    prefix = unique_prefix()
    job = write_job(workdir, f"full-{mode}", job_toml(
        prefix, rse=stack.rse, files_per_batch=12, max_running=1,
        upload=f'mode = "{mode}"\nchunk_size = 2\ntransfers = 2'))
    proc = dac_upload(["submit", str(job), "--wait", "--timeout", "300"], cwd=workdir)
    run_dir = run_dir_of(proc.stdout)
    summary = load_summary(run_dir)
    assert summary["complete"] is False, proc.stdout + proc.stderr
    recs = {k.split(":", 1)[1]: v for k, v in summary["files"].items()}
    done = {n for n, r in recs.items() if r["status"] in ("uploaded", "already_present")}
    assert done and len(done) < len(files), {n: r["status"] for n, r in recs.items()}

    # the files not done say why, in the storage's words, and never as KeyError / 'prefix'
    for name, rec in recs.items():
        if name not in done:
            assert FULL in rec["error"] and f"RSE {stack.rse}" in rec["error"], rec
            assert "prefix" not in rec["error"], rec
    marker = (run_dir / "results" / "task-00000.done.json").read_text()
    assert FULL in marker, marker                    # the task stopped, saying why once
    log = "".join(p.read_text() for p in (run_dir / "logs").glob("job*.out"))
    assert "KeyError" not in log and "Details: 'prefix'" not in log, log

    # Rucio (asked directly): a replica only for the files done, each AVAILABLE with the
    # right adler32 and bytes, and those bytes on the tmpfs
    registered: set[Path] = set()
    for rel, src in files.items():
        name = prefix + rel
        reps = [r for r in client.list_replicas([{"scope": SCOPE, "name": name}],
                                                all_states=True)
                if stack.rse in (r.get("states") or {})]
        if name not in done:
            assert reps == [], (name, reps)
            continue
        assert len(reps) == 1 and reps[0]["states"][stack.rse] == "AVAILABLE", (name, reps)
        assert reps[0]["adler32"] == adler32_of(src)
        assert reps[0]["bytes"] == src.stat().st_size
        path = stack.path_of(reps[0]["rses"][stack.rse][0])
        assert path.read_bytes() == src.read_bytes()
        registered.add(path)

    # the tmpfs: no temporary copy, no partial one; a complete copy nobody registered (a
    # chunk's sibling, copied while the task was stopping) only with the bytes of its file
    by_adler = {adler32_of(p): p for p in files.values()}
    for path in _on_disk(stack, prefix):
        assert not path.name.endswith(".rucio.upload"), path
        if path not in registered:
            data = path.read_bytes()
            src = by_adler.get(f"{zlib.adler32(data) & 0xFFFFFFFF:08x}")
            assert src is not None and src.name == path.name, f"partial copy {path}"
            assert data == src.read_bytes(), path

    # room again (the RSE's admins): a resubmission finishes, every file registered once
    subprocess.run(["mount", "-o", "remount,size=16m", str(stack.data_dir)], check=True,
                   capture_output=True)
    again = dac_upload(["resubmit", str(run_dir), "--wait", "--timeout", "300"], cwd=workdir)
    assert again.returncode == 0, again.stdout + again.stderr
    assert load_summary(run_dir)["complete"] is True
    assert_in_rucio_once(stack, prefix, files)
