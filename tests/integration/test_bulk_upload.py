"""The bulk upload path against the real Rucio and Slurm: every file AVAILABLE with the right
size, adler32 and md5, protected by a rule (or attached to the dataset, whose rule covers it);
a task killed between its copies and their registration, then resubmitted, ends with every
file registered exactly once and nothing left on the RSE that Rucio does not know."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ithelpers import (
    CI_DIR,
    RSE,
    SCOPE,
    adler32_of,
    dac_upload,
    job_toml,
    load_summary,
    make_files,
    parse_submitted,
    run_dir_of,
    unique_prefix,
    wait_for_jobs,
    write_job,
)

RSE_DIR = CI_DIR / "rucio" / "rse"


def _files(workdir: Path, n: int) -> dict[str, Path]:
    files = make_files(workdir / "src", n, size=3_000)
    (workdir / "src" / "empty.dat").write_bytes(b"")
    files["empty.dat"] = workdir / "src" / "empty.dat"
    from ithelpers import chown_user
    chown_user(workdir)
    return files


def _check_in_rucio(client: Any, prefix: str, files: dict[str, Path],
                    dataset: str | None = None, guid: bool = False) -> None:
    """One DID, one AVAILABLE replica with our size, adler32 and md5, the bytes on the RSE;
    protected by its own rule, or attached to ``dataset`` (and then no rule of its own); a
    GUID only with [upload] guid = true."""
    attached = ({c["name"] for c in client.list_content(SCOPE, dataset)} if dataset else set())
    for rel, src in files.items():
        name = prefix + rel
        data = src.read_bytes()
        reps = list(client.list_replicas([{"scope": SCOPE, "name": name}], all_states=True))
        assert len(reps) == 1 and reps[0]["states"] == {RSE: "AVAILABLE"}, (name, reps)
        meta = client.get_metadata(SCOPE, name)
        assert (meta["bytes"], meta["adler32"], meta["md5"]) == (
            len(data), adler32_of(src), hashlib.md5(data).hexdigest()), name
        assert bool(meta["guid"]) is guid, (name, meta["guid"])
        pfn = reps[0]["rses"][RSE][0]
        assert Path(pfn[len("file://localhost"):]).read_bytes() == data
        rules = list(client.list_did_rules(SCOPE, name))
        if dataset:
            assert name in attached and not rules, name
        else:
            assert [r["rse_expression"] for r in rules] == [RSE] and not rules[0]["expires_at"]


def _on_rse(prefix: str) -> list[Path]:
    """Every file on the RSE's disk under this test's names (temporary ones included)."""
    out = []
    for dirpath, _, names in os.walk(RSE_DIR / SCOPE):
        if f"/{prefix.rstrip('/')}" in dirpath + "/":
            out.extend(Path(dirpath) / n for n in names)
    return out


def test_bulk_upload_with_rules_and_with_a_dataset(workdir: Path, rucio_client: Any) -> None:
    files = _files(workdir, 40)
    prefix = unique_prefix()
    job = write_job(workdir, "bulk", job_toml(prefix, files_per_batch=25, max_running=2,
                                              upload="chunk_size = 7\ntransfers = 3"))
    proc = dac_upload(["submit", str(job), "--wait", "--timeout", "300"], cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = load_summary(run_dir_of(proc.stdout))
    assert summary["complete"] and summary["counts"]["uploaded"] == len(files)
    _check_in_rucio(rucio_client, prefix, files)
    assert len(_on_rse(prefix)) == len(files)               # no temporary names left

    # the same files into a dataset, never renaming on the RSE (Echo): all already present,
    # attached; then new names straight into the dataset
    dataset = f"{prefix.rstrip('/')}_ds"
    again = write_job(workdir, "bulk2", job_toml(prefix, files_per_batch=25, max_running=2,
                                                 rucio=f'dataset = "{dataset}"',
                                                 upload='rename = "never"'))
    proc = dac_upload(["submit", str(again), "--wait", "--timeout", "300"], cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert load_summary(run_dir_of(proc.stdout))["counts"]["already_present"] == len(files)
    assert {c["name"] for c in rucio_client.list_content(SCOPE, dataset)} == {
        prefix + rel for rel in files}
    prefix2 = unique_prefix()
    new = write_job(workdir, "bulk3", job_toml(prefix2, files_per_batch=25, max_running=2,
                                               rucio=f'dataset = "{dataset}2"',
                                               upload='rename = "never"\nguid = true'))
    proc = dac_upload(["submit", str(new), "--wait", "--timeout", "300"], cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _check_in_rucio(rucio_client, prefix2, files, dataset=f"{dataset}2", guid=True)
    assert [r["rse_expression"] for r in rucio_client.list_did_rules(SCOPE, f"{dataset}2")] \
        == [RSE]


def test_crash_between_copies_and_registration_is_repaired(workdir: Path,
                                                           rucio_client: Any) -> None:
    files = _files(workdir, 29)                               # 30 files, 1 task, 3 chunks
    prefix = unique_prefix()
    job = write_job(workdir, "crash", job_toml(prefix, files_per_batch=30, max_running=1,
                                               upload="chunk_size = 10"))
    planned = dac_upload(["plan", str(job)], cwd=workdir)
    assert planned.returncode == 0, planned.stderr
    run_dir = run_dir_of(planned.stdout)
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    # the test hook names the run it applies to (sbatch --export=ALL passes it on)
    proc = dac_upload(["submit", "--run", str(run_dir)], cwd=workdir,
                      DAC_UPLOAD_TEST_CRASH_AFTER_COPY=run_id)
    assert proc.returncode == 0, proc.stderr
    wait_for_jobs(list(parse_submitted(proc.stdout)))
    # the task died after copying its first chunk: copies on the RSE, nothing registered
    copies = _on_rse(prefix)
    assert len(copies) == 10, copies
    assert not list(rucio_client.list_dids(SCOPE, {"name": f"{prefix}*"}, did_type="file"))
    assert not (run_dir / "results" / "task-00000.done.json").exists()

    proc = dac_upload(["resubmit", str(run_dir), "--wait", "--timeout", "300"], cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = load_summary(run_dir)
    assert summary["complete"] and summary["counts"]["uploaded"] == len(files)
    _check_in_rucio(rucio_client, prefix, files)
    on_rse = sorted(_on_rse(prefix))
    assert len(on_rse) == len(files)                          # no orphan, no temporary name
    registered = set()
    for rel in files:
        rep = next(iter(rucio_client.list_replicas([{"scope": SCOPE, "name": prefix + rel}])))
        registered.add(Path(rep["rses"][RSE][0][len("file://localhost"):]))
    assert set(on_rse) == registered
    log = "".join(p.read_text() for p in (run_dir / "logs").glob("job*.out"))
    assert log.count("registered the verified copy an earlier attempt left on the RSE") == 10
