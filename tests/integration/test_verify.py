"""verify (dac_upload/verify.py) on runs the real tool uploaded through the real Slurm and
Rucio, on every stack (posix, root, davs): a run as uploaded passes; then Rucio, the storage
and the sources are broken behind the tool's back (bytes corrupted and a file deleted on the
storage's own disk, a rule deleted and a replica marked unavailable with an admin client,
source files changed) and verify names exactly those files, each with its cause. A rule
deleted through Rucio's API stays for an hour with expires_at set (the judge-cleaner removes
it then): verify says rule_expiring; a rule past its expiry (not yet removed, as here
without daemons) is no_rule.

verify_run runs as dacuser in a process of its own (python -c), as the ``dac-upload verify``
command will: with the run's own credentials, as its tasks had them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ithelpers import (
    RSE,
    SCOPE,
    VENV_BIN,
    as_user,
    chown_user,
    dac_upload,
    job_toml,
    load_summary,
    make_files,
    run_dir_of,
    unique_prefix,
    write_job,
)

VERIFY = """
import json, sys
from pathlib import Path
from dac_upload.verify import verify_run
report = verify_run(Path(sys.argv[1]), source=sys.argv[2], storage=sys.argv[3] == "1")
print(report.render(), file=sys.stderr)
print(json.dumps(report.to_json()))
"""


def verify_as_user(run_dir: Path, workdir: Path, source: str = "none",
                   storage: bool = True) -> dict[str, Any]:
    """verify_run's report (to_json) as dacuser gets it; its text goes to the test's log."""
    proc = as_user([str(VENV_BIN / "python"), "-c", VERIFY, str(run_dir), source,
                    "1" if storage else "0"], workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(proc.stderr)
    return json.loads(proc.stdout)


def problems(run_dir: Path) -> set[tuple[str, str]]:
    """(cause, relpath) of every line of RUN/verify.jsonl."""
    lines = (run_dir / "verify.jsonl").read_text().splitlines()
    return {(p["cause"], p["relpath"]) for p in map(json.loads, lines)}


def upload(workdir: Path, stack: Any, n: int, rucio: str = "") -> tuple[Path, str]:
    """n files of about 20 kB uploaded by `dac-upload submit --wait`: (run dir, prefix)."""
    make_files(workdir / "src", n)
    chown_user(workdir)
    prefix = unique_prefix()
    job = write_job(workdir, "verify", job_toml(prefix, rse=stack.rse, files_per_batch=4,
                                                max_running=2, rucio=rucio))
    proc = dac_upload(["submit", str(job), "--wait", "--timeout", "600"], cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = run_dir_of(proc.stdout)
    summary = load_summary(run_dir)
    assert summary["complete"] and summary["counts"]["uploaded"] == n, summary["counts"]
    return run_dir, prefix


def test_verify_names_exactly_what_was_broken(workdir: Path, stack: Any) -> None:
    run_dir, prefix = upload(workdir, stack, 8)
    summary = load_summary(run_dir)
    entry = {e["relpath"]: e for e in summary["files"].values()}

    report = verify_as_user(run_dir, workdir, source="checksum")
    assert report["ok"] and report["exit_code"] == 0, report
    assert (report["checked"], report["files"], report["not_done"]) == (8, 8, 0)
    assert (run_dir / "verify.jsonl").read_text() == ""
    # the storage's description, one list_replicas for the 8 files; without a dataset so
    # few files are asked their rules one by one (a bigger run lists the scope's rules)
    assert report["rucio_requests"] == 1 + 1 + 8, report

    # the storage: one object's bytes corrupted (same size), another's file deleted
    on_disk = stack.path_of(entry["f000.dat"]["pfn"])
    data = bytearray(on_disk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    on_disk.write_bytes(bytes(data))
    stack.path_of(entry["f001.dat"]["pfn"]).unlink()
    # Rucio, with an admin client: a rule deleted (the replica stays), another one expired,
    # a replica unavailable
    client = stack.client
    for rule in client.list_did_rules(SCOPE, prefix + "f002.dat"):
        client.delete_replication_rule(rule["id"], purge_replicas=False)
    for rule in client.list_did_rules(SCOPE, prefix + "f006.dat"):
        client.update_replication_rule(rule["id"], {"lifetime": -60})
    client.update_replicas_states(stack.rse, [{"scope": SCOPE, "name": prefix + "f005.dat",
                                               "state": "U"}])
    # the sources: one grown, one rewritten with other bytes of the same size and mtime
    src = workdir / "src"
    with open(src / "f003.dat", "ab") as handle:
        handle.write(b"appended")
    st = (src / "f004.dat").stat()
    same = bytearray((src / "f004.dat").read_bytes())
    same[0] ^= 0xFF
    (src / "f004.dat").write_bytes(bytes(same))
    os.utime(src / "f004.dat", ns=(st.st_atime_ns, st.st_mtime_ns))

    report = verify_as_user(run_dir, workdir, source="size")
    assert report["exit_code"] == 1
    assert problems(run_dir) == {
        ("storage_checksum_mismatch", "f000.dat"), ("storage_missing", "f001.dat"),
        ("rule_expiring", "f002.dat"), ("no_rule", "f006.dat"), ("source_changed", "f003.dat"),
        ("not_available", "f005.dat")}, report
    assert report["files_with_problems"] == 6
    assert report["examples"]["storage_missing"][0]["pfn"] == entry["f001.dat"]["pfn"]

    report = verify_as_user(run_dir, workdir, source="checksum")
    assert problems(run_dir) == {
        ("storage_checksum_mismatch", "f000.dat"), ("storage_missing", "f001.dat"),
        ("rule_expiring", "f002.dat"), ("no_rule", "f006.dat"), ("source_changed", "f003.dat"),
        ("source_changed", "f004.dat"), ("not_available", "f005.dat")}, report

    # Rucio alone: the storage and the sources are not looked at
    report = verify_as_user(run_dir, workdir, source="none", storage=False)
    assert problems(run_dir) == {("rule_expiring", "f002.dat"), ("no_rule", "f006.dat"),
                                 ("not_available", "f005.dat")}
    assert report["checks"]["storage"] is False


def test_verify_a_dataset_run(workdir: Path, posix_stack: Any) -> None:
    """A run into a dataset is protected by the dataset's rule: the dataset is read once,
    then one request per chunk; a file detached from the dataset has no rule left, and is
    no longer in it."""
    ds = f"verify_{unique_prefix().strip('/')}"
    run_dir, prefix = upload(workdir, posix_stack, 6, rucio=f'dataset = "{ds}"')
    report = verify_as_user(run_dir, workdir)
    assert report["ok"], report
    # the storage's description; the dataset's files, its collections and its rules; one
    # list_replicas for the 6 files
    assert report["rucio_requests"] == 1 + 3 + 1, report
    posix_stack.client.detach_dids(SCOPE, ds, [{"scope": SCOPE, "name": prefix + "f004.dat"}])
    report = verify_as_user(run_dir, workdir)
    assert problems(run_dir) == {("not_in_dataset", "f004.dat"), ("no_rule", "f004.dat")}
    assert report["files_with_problems"] == 1 and report["exit_code"] == 1
    assert RSE in report["examples"]["no_rule"][0]["detail"]
