"""End to end on the real Slurm and the real Rucio server: a job array with a throttle uploads a
tree, the collector writes summary.json, and Rucio and the RSE's disk agree with it."""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any

from ithelpers import (
    RSE,
    SCOPE,
    adler32_of,
    chown_user,
    dac_upload,
    load_summary,
    parse_submitted,
    run_dir_of,
    unique_prefix,
    wait_for_jobs,
    write_job,
)


def make_tree(root: Path, n: int, seed: int = 7) -> dict[str, Path]:
    """n files of 0-200 KiB, nested up to 12 levels; returns relpath -> path."""
    rng = random.Random(seed)
    files: dict[str, Path] = {}
    for i in range(n):
        depth = i % 13
        parts = [f"d{j}" for j in range(depth)]
        rel = "/".join([*parts, f"f{i:04d}.fits"])
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        size = 0 if i == 0 else rng.randint(1, 200 * 1024)
        path.write_bytes(rng.randbytes(size))
        files[rel] = path
    return files


def sample_running(array_id: str, until: float) -> int:
    """Largest number of this array's tasks seen RUNNING at once."""
    most = 0
    while time.monotonic() < until:
        out = subprocess.run(["squeue", "-h", "-r", "-j", array_id, "-t", "RUNNING",
                              "-o", "%i"], capture_output=True, text=True).stdout
        most = max(most, len(out.split()))
        pending = subprocess.run(["squeue", "-h", "-r", "-j", array_id, "-o", "%i"],
                                 capture_output=True, text=True).stdout
        if not pending.strip():
            break
        time.sleep(0.1)
    return most


def test_array_uploads_every_file(workdir: Path, stack: Any) -> None:
    # a source root with a space and a non-ASCII character: both must simply work
    root = workdir / "source data ü"
    files = make_tree(root, 50)
    (root / "d0" / "with space.fits").write_bytes(b"spaced name")   # replaced -> with_space
    files["d0/with_space.fits"] = root / "d0" / "with space.fits"
    target = files["d0/d1/d2/f0003.fits"]
    (root / "link.fits").symlink_to(target)                          # followed: link's name
    files["link.fits"] = target
    (root / "dirlink").symlink_to(root / "d0", target_is_directory=True)  # not descended
    (root / "notes.txt").write_text("not matched")
    chown_user(workdir)
    prefix = unique_prefix()
    job = write_job(workdir, "e2e", f"""
[source]
root = "../source data ü"
include = ["**/*.fits"]
[rucio]
scope = "{SCOPE}"
rse = "{stack.rse}"
config = "../rucio.cfg"
[naming]
prefix = "{prefix}"
replace_invalid = "_"
[upload]
guid = true
[batching]
files_per_batch = 12
max_running = 2
[slurm]
time = "00:20:00"
mem = "1G"
[container]
runtime = "none"
""")
    proc = dac_upload(["submit", str(job)], cwd=workdir)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    array_id, collector_id = parse_submitted(proc.stdout)
    run_dir = run_dir_of(proc.stdout)

    throttle = subprocess.run(["scontrol", "show", "job", array_id], capture_output=True,
                              text=True).stdout
    assert "ArrayTaskThrottle=2" in throttle
    most = sample_running(array_id, time.monotonic() + 300)
    wait_for_jobs([array_id, collector_id])
    assert 1 <= most <= 2, f"{most} tasks ran at once with a %2 throttle"

    summary = load_summary(run_dir)
    n_tasks = summary["counts"]["tasks"]
    assert n_tasks >= 4
    assert summary["complete"] is True
    assert summary["counts"]["files"] == len(files) == summary["counts"]["uploaded"]
    assert summary["tasks_missing_result"] == []
    assert summary["rucio"]["host"] == stack.url
    assert {f["relpath"] for f in summary["files"].values()} == {
        "d0/with space.fits" if rel == "d0/with_space.fits" else rel for rel in files}

    for rel, src in files.items():
        name = prefix + rel
        entry = summary["files"][f"{SCOPE}:{name}"]
        data = src.read_bytes()
        assert entry["status"] == "uploaded", entry
        assert entry["bytes"] == len(data)
        assert entry["adler32"] == adler32_of(src)
        assert entry["rse"] == stack.rse and entry["guid"] and entry["md5"]
        assert 0 <= entry["batch"] < n_tasks
        # the copy was checked by the storage's own checksum where it has one (XRootD)
        assert entry["verified"] == ("storage checksum" if stack.grid else "read back")
        # Rucio: the replica is AVAILABLE on the RSE with the right size and checksum
        reps = list(stack.client.list_replicas([{"scope": SCOPE, "name": name}],
                                               all_states=True))
        assert len(reps) == 1
        assert reps[0]["states"] == {stack.rse: "AVAILABLE"}
        assert reps[0]["adler32"] == entry["adler32"] and reps[0]["bytes"] == len(data)
        # the storage's disk holds exactly these bytes at the pfn the summary names
        assert reps[0]["rses"][stack.rse] == [entry["pfn"]]
        assert stack.path_of(entry["pfn"]).read_bytes() == data
        # no lifetime unless asked: the rule does not expire
        rules = list(stack.client.list_did_rules(SCOPE, name))
        assert rules and all(r["expires_at"] is None for r in rules)

    # nothing else on the storage under these names: no temporary or partial copy
    assert len(stack.files_under(SCOPE, prefix)) == len(files)
    # the directory symlink was not followed, and is reported
    skipped = (run_dir / "skipped.jsonl").read_text()
    assert "dirlink" in skipped
    # every task wrote its own log and exited 0
    logs = sorted(p.name for p in (run_dir / "logs").glob(f"job{array_id}.index*.out"))
    assert len(logs) == n_tasks
    assert all("exit code 0" in p.read_text() for p in (run_dir / "logs").glob("job*.out"))

    # the same job again: nothing is uploaded twice, everything is already present
    again = dac_upload(["submit", str(job), "--wait", "--timeout", "600"], cwd=workdir)
    assert again.returncode == 0, again.stderr + again.stdout
    second = load_summary(run_dir_of(again.stdout))
    assert second["counts"]["already_present"] == len(files)
    assert second["counts"]["uploaded"] == 0
    for key, entry in second["files"].items():
        assert entry["pfn"] == summary["files"][key]["pfn"]
        assert entry["guid"] == summary["files"][key]["guid"]
    assert os.path.exists(run_dir / "summary.json")


def test_dataset_with_lifetime_across_tasks(workdir: Path, rucio_client) -> None:
    """A dataset is created once with its rule (and the lifetime, asked for here), every file
    of every task is attached; a later run into another dataset attaches what is present."""
    root = workdir / "src"
    files = make_tree(root, 9, seed=3)
    chown_user(workdir)
    prefix = unique_prefix()
    dataset = prefix.strip("/").replace("/", "_") + "_ds"

    def job(name: str, ds: str, lifetime: str) -> Path:
        return write_job(workdir, name, f"""
[source]
root = "../src"
[rucio]
scope = "{SCOPE}"
rse = "{RSE}"
config = "../rucio.cfg"
dataset = "{ds}"
{lifetime}
[naming]
prefix = "{prefix}"
[batching]
files_per_batch = 3
max_running = 3
[container]
runtime = "none"
""")

    first = dac_upload(["submit", str(job("ds1", dataset, 'lifetime = "2d"')), "--wait"],
                       cwd=workdir)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "deletable 2.0 days after upload" in first.stderr      # the lifetime warning
    summary = load_summary(run_dir_of(first.stdout))
    assert summary["counts"]["uploaded"] == len(files) and summary["counts"]["tasks"] == 3
    content = {d["name"] for d in rucio_client.list_content(SCOPE, dataset)}
    assert content == {prefix + rel for rel in files}
    rules = list(rucio_client.list_did_rules(SCOPE, dataset))
    assert len(rules) == 1 and rules[0]["expires_at"] is not None
    assert all(not list(rucio_client.list_did_rules(SCOPE, prefix + rel)) for rel in files)

    again = dac_upload(["submit", str(job("ds2", dataset + "2", "")), "--wait"], cwd=workdir)
    assert again.returncode == 0, again.stdout + again.stderr
    assert load_summary(run_dir_of(again.stdout))["counts"]["already_present"] == len(files)
    content2 = {d["name"] for d in rucio_client.list_content(SCOPE, dataset + "2")}
    assert content2 == content
    rules2 = list(rucio_client.list_did_rules(SCOPE, dataset + "2"))
    assert all(r["expires_at"] is None for r in rules2)
