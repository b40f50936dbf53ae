"""The bulk upload path against the real Rucio and Slurm: every file AVAILABLE with the right
size, adler32 and md5, protected by a rule (or attached to the dataset, whose rule covers it);
a task killed between its copies and their registration, or in the middle of a large file's
copy, then resubmitted, ends with every file registered exactly once and nothing left on the
RSE that Rucio does not know. Each test runs on every stack (posix, root, davs)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from ithelpers import (
    SCOPE,
    adler32_of,
    chown_user,
    dac_upload,
    job_toml,
    load_summary,
    make_files,
    parse_submitted,
    run_dir_of,
    submit_with_hook,
    unique_prefix,
    wait_for_jobs,
    write_job,
)


def _files(workdir: Path, n: int) -> dict[str, Path]:
    files = make_files(workdir / "src", n, size=3_000)
    (workdir / "src" / "empty.dat").write_bytes(b"")
    files["empty.dat"] = workdir / "src" / "empty.dat"
    chown_user(workdir)
    return files


def _check_in_rucio(stack: Any, prefix: str, files: dict[str, Path],
                    dataset: str | None = None, guid: bool = False) -> None:
    """One DID, one AVAILABLE replica with our size, adler32 and md5, the bytes on the RSE;
    protected by its own rule, or attached to ``dataset`` (and then no rule of its own); a
    GUID only with [upload] guid = true."""
    client, rse = stack.client, stack.rse
    attached = ({c["name"] for c in client.list_content(SCOPE, dataset)} if dataset else set())
    for rel, src in files.items():
        name = prefix + rel
        data = src.read_bytes()
        reps = list(client.list_replicas([{"scope": SCOPE, "name": name}], all_states=True))
        assert len(reps) == 1 and reps[0]["states"] == {rse: "AVAILABLE"}, (name, reps)
        meta = client.get_metadata(SCOPE, name)
        assert (meta["bytes"], meta["adler32"], meta["md5"]) == (
            len(data), adler32_of(src), hashlib.md5(data).hexdigest()), name
        assert bool(meta["guid"]) is guid, (name, meta["guid"])
        pfn = reps[0]["rses"][rse][0]
        assert stack.path_of(pfn).read_bytes() == data
        rules = list(client.list_did_rules(SCOPE, name))
        if dataset:
            assert name in attached and not rules, name
        else:
            assert [r["rse_expression"] for r in rules] == [rse] and not rules[0]["expires_at"]


def test_bulk_upload_with_rules_and_with_a_dataset(workdir: Path, stack: Any) -> None:
    files = _files(workdir, 40)
    prefix = unique_prefix()
    job = write_job(workdir, "bulk", job_toml(prefix, rse=stack.rse, files_per_batch=25,
                                              max_running=2,
                                              upload="chunk_size = 7\ntransfers = 3"))
    proc = dac_upload(["submit", str(job), "--wait", "--timeout", "300"], cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = load_summary(run_dir_of(proc.stdout))
    assert summary["complete"] and summary["counts"]["uploaded"] == len(files)
    _check_in_rucio(stack, prefix, files)
    assert len(stack.files_under(SCOPE, prefix)) == len(files)   # no temporary names left

    # the same files into a dataset, never renaming on the RSE (Echo): all already present,
    # attached; then new names straight into the dataset
    dataset = f"{prefix.rstrip('/')}_ds"
    again = write_job(workdir, "bulk2", job_toml(prefix, rse=stack.rse, files_per_batch=25,
                                                 max_running=2,
                                                 rucio=f'dataset = "{dataset}"',
                                                 upload='rename = "never"'))
    proc = dac_upload(["submit", str(again), "--wait", "--timeout", "300"], cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert load_summary(run_dir_of(proc.stdout))["counts"]["already_present"] == len(files)
    assert {c["name"] for c in stack.client.list_content(SCOPE, dataset)} == {
        prefix + rel for rel in files}
    prefix2 = unique_prefix()
    new = write_job(workdir, "bulk3", job_toml(prefix2, rse=stack.rse, files_per_batch=25,
                                               max_running=2,
                                               rucio=f'dataset = "{dataset}2"',
                                               upload='rename = "never"\nguid = true'))
    proc = dac_upload(["submit", str(new), "--wait", "--timeout", "300"], cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _check_in_rucio(stack, prefix2, files, dataset=f"{dataset}2", guid=True)
    assert [r["rse_expression"] for r in stack.client.list_did_rules(SCOPE, f"{dataset}2")] \
        == [stack.rse]


def test_crash_between_copies_and_registration_is_repaired(workdir: Path,
                                                           stack: Any) -> None:
    files = _files(workdir, 29)                               # 30 files, 1 task, 3 chunks
    prefix = unique_prefix()
    job = write_job(workdir, "crash", job_toml(prefix, rse=stack.rse, files_per_batch=30,
                                               max_running=1,
                                               upload="chunk_size = 10"))
    # the crash is the test's own sitecustomize (crash_after_copy.py), naming the run
    run_dir, *jobs = submit_with_hook(workdir, job, Path(__file__).with_name(
        "crash_after_copy.py"), "DAC_UPLOAD_TEST_CRASH_AFTER_COPY")
    wait_for_jobs(jobs)
    # the task died after copying its first chunk: copies on the RSE, nothing registered
    copies = stack.files_under(SCOPE, prefix)
    assert len(copies) == 10, copies
    assert not list(stack.client.list_dids(SCOPE, {"name": f"{prefix}*"}, did_type="file"))
    assert not (run_dir / "results" / "task-00000.done.json").exists()

    proc = dac_upload(["resubmit", str(run_dir), "--wait", "--timeout", "300"], cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = load_summary(run_dir)
    assert summary["complete"] and summary["counts"]["uploaded"] == len(files)
    _check_in_rucio(stack, prefix, files)
    on_rse = sorted(stack.files_under(SCOPE, prefix))
    assert len(on_rse) == len(files)                          # no orphan, no temporary name
    registered = set()
    for rel in files:
        rep = next(iter(stack.client.list_replicas([{"scope": SCOPE, "name": prefix + rel}])))
        registered.add(stack.path_of(rep["rses"][stack.rse][0]))
    assert set(on_rse) == registered
    log = "".join(p.read_text() for p in (run_dir / "logs").glob("job*.out"))
    assert log.count("registered the verified copy an earlier attempt of this task left "
                     "on the RSE") == 10


def test_worker_killed_mid_copy_of_a_large_file(workdir: Path, stack: Any) -> None:
    """SIGKILL while a large file is being written to the storage (on a storage that cannot
    rename, the partial copy sits at the file's final PFN): no replica is AVAILABLE with
    wrong bytes, and after resubmit the file is registered once with its own bytes and no
    partial copy is left anywhere."""
    files = _files(workdir, 3)
    big = workdir / "src" / "big.dat"
    block = os.urandom(1 << 20)
    with open(big, "wb") as fh:
        for _ in range(768):                                   # 768 MiB
            fh.write(block)
    files["big.dat"] = big
    size = big.stat().st_size
    chown_user(workdir)
    prefix = unique_prefix()
    # on POSIX, rename = "never" puts the partial copy at the final path, as on Echo
    upload = "transfers = 1" + ('\nrename = "never"' if stack.id == "posix" else "")
    job = write_job(workdir, "bigkill", job_toml(prefix, rse=stack.rse, files_per_batch=10,
                                                 max_running=1, upload=upload))
    proc = dac_upload(["submit", str(job)], cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    array_id, collector_id = parse_submitted(proc.stdout)
    run_dir = run_dir_of(proc.stdout)
    # where Rucio's "hash" paths put it (md5 of scope:name): watched directly, as walking the
    # whole RSE between two looks can take longer than a local copy of the file
    digest = hashlib.md5(f"{SCOPE}:{prefix}big.dat".encode()).hexdigest()
    final = (stack.data_dir / ("rucio" if stack.grid else "") / SCOPE / digest[:2]
             / digest[2:4] / f"{prefix}big.dat")
    partial = None
    deadline = time.monotonic() + 300
    while partial is None and time.monotonic() < deadline:
        try:
            if 0 < final.stat().st_size < size:
                partial = final
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    assert partial is not None, "never saw the large file half-written on the storage"
    subprocess.run(["pkill", "-KILL", "-f", f"worker --run {run_dir} --task 0$"], check=True)
    wait_for_jobs([array_id, collector_id])
    if stack.id == "root":   # XRootD holds a killed gfal2 writer's file (POSC) until its hold ends
        # (20 s on the test stack), then removes it; a resubmit inside that window was seen
        # to block in gfal2 for minutes (the closing note of issue 14): wait it out
        deadline = time.monotonic() + 120
        while partial.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not partial.exists(), f"XRootD still holds {partial}"
    name = prefix + "big.dat"
    for rep in stack.client.list_replicas([{"scope": SCOPE, "name": name}], all_states=True):
        if rep["states"].get(stack.rse) == "AVAILABLE":   # only ever with its whole bytes
            assert stack.path_of(rep["rses"][stack.rse][0]).stat().st_size == size

    again = dac_upload(["resubmit", str(run_dir), "--wait", "--timeout", "600"], cwd=workdir)
    assert again.returncode == 0, again.stdout + again.stderr
    summary = load_summary(run_dir)
    assert summary["complete"] is True
    _check_in_rucio(stack, prefix, files)
    on_storage = stack.files_under(SCOPE, prefix)
    assert len(on_storage) == len(files), sorted(map(str, on_storage))   # nothing partial
    if stack.id != "root":   # the partial copy (no POSC over davs) sat at the final name
        log = "".join(p.read_text() for p in (run_dir / "logs").glob("job*.out"))
        assert "replaced the unregistered copy an earlier attempt of this task left" in log, log
