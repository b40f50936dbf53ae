"""What only the grid stack has (HTTPS + X.509 proxy, XRootD over root:// and davs://, no
rename): a proxy that expires while the run goes on, proxies the tool must refuse, a CA it
does not know, a host name the server's certificate does not carry, and doctor's probe going
through the job's own upload path. Every mistake is one line saying what to do, before
anything is created; nothing is lost."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from ithelpers import (
    GRID_CA,
    SCOPE,
    as_user,
    chown_user,
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
from test_faults import assert_in_rucio_once, status_json

USER_CERT = GRID_CA.parent / "user" / "usercert.pem"
USER_KEY = GRID_CA.parent / "user" / "userkey.pem"


def grid_proxy_init(out: Path, *args: str, valid: str = "12:00") -> None:
    """A proxy made by Globus' grid-proxy-init, as dacuser (the key is theirs)."""
    proc = as_user(["grid-proxy-init", "-valid", valid, "-cert", str(USER_CERT), "-key",
                    str(USER_KEY), "-out", str(out), *args], out.parent,
                   X509_CERT_DIR=str(GRID_CA))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def plan_error(workdir: Path, job: Path) -> str:
    """`dac-upload plan` refuses the job: exit 2, exactly one error line, no run made."""
    proc = dac_upload(["plan", str(job)], cwd=workdir)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    runs = job.parent / job.stem / "runs"
    assert not runs.exists() or not any(p.is_dir() and not p.name.startswith(".")
                                        and (p / "run.json").exists() for p in runs.iterdir())
    return errors[0]


def doctor_fails(workdir: Path, job: Path, fragment: str, *args: str) -> str:
    proc = dac_upload(["doctor", str(job), *args], cwd=workdir)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    fails = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and fragment in fails[0], proc.stdout
    return fails[0]


def test_proxy_expiring_mid_run_stops_tasks_then_resubmit_completes(workdir: Path,
                                                                      grid_stack: Any) -> None:
    """Task 0 uploads while the proxy is good; the proxy then runs out before task 1
    starts: task 1 stops at once with the cause and the renewal, nothing is half done,
    resubmit refuses the expired proxy, and after grid-proxy-init it completes the run."""
    files = make_files(workdir / "src", 8, size=2_000)
    proxy = workdir / "x509up"
    grid_proxy_init(proxy, "-rfc", valid="0:02")                # two minutes
    chown_user(workdir)
    prefix = unique_prefix()
    job = write_job(workdir, "expiry", job_toml(prefix, rse=grid_stack.rse, files_per_batch=4,
                                                max_running=1))
    proc = dac_upload(["submit", str(job)], cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    array_id, collector_id = parse_submitted(proc.stdout)
    run_dir = run_dir_of(proc.stdout)
    subprocess.run(["scontrol", "hold", f"{array_id}_1"], check=True, capture_output=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "results" / "task-00000.done.json").exists():
        assert time.monotonic() < deadline, "task 0 did not finish"
        time.sleep(0.2)
    marker0 = json.loads((run_dir / "results" / "task-00000.done.json").read_text())
    assert marker0["uploaded"] == 4, marker0
    # the worker treats a proxy with less than a minute left as expired
    end = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", str(proxy)],
                         capture_output=True, text=True, check=True).stdout
    ends_at = time.mktime(time.strptime(end.strip().split("=", 1)[1], "%b %d %H:%M:%S %Y %Z"))
    time.sleep(max(0.0, ends_at - time.mktime(time.gmtime()) - 60 + 2))
    subprocess.run(["scontrol", "release", f"{array_id}_1"], check=True, capture_output=True)
    wait_for_jobs([array_id, collector_id])

    st = status_json(run_dir, workdir)
    assert [t["state"] for t in st["tasks"]] == ["done", "failed"], st["tasks"]
    assert st["causes"] == {"aborted": 4}, st["causes"]
    summary = load_summary(run_dir)
    undone = [f for f in summary["files"].values() if f["status"] != "uploaded"]
    assert len(undone) == 4 and all(f["status"] == "not_attempted" for f in undone)
    assert all(f"the X.509 proxy {proxy} " in f["error"] and "grid-proxy-init -rfc" in f["error"]
               for f in undone), undone[0]["error"]
    for f in undone:   # nothing of them registered
        assert not list(grid_stack.client.list_replicas([{"scope": SCOPE, "name": f["name"]}]))

    refused = dac_upload(["resubmit", str(run_dir)], cwd=workdir)
    assert refused.returncode == 2 and f"the X.509 proxy {proxy} " in refused.stderr, \
        refused.stdout + refused.stderr
    grid_proxy_init(proxy, "-rfc")
    again = dac_upload(["resubmit", str(run_dir), "--wait", "--timeout", "600"], cwd=workdir)
    assert again.returncode == 0, again.stdout + again.stderr
    assert load_summary(run_dir)["complete"] is True
    assert_in_rucio_once(grid_stack, prefix, files)


def _proxy_legacy(workdir: Path) -> str:
    grid_proxy_init(workdir / "x509up", "-old")
    return ""


def _proxy_plain_cert(workdir: Path) -> str:
    (workdir / "x509up").write_bytes(USER_CERT.read_bytes() + USER_KEY.read_bytes())
    return ""


def _proxy_without_voms(workdir: Path) -> str:
    grid_proxy_init(workdir / "x509up", "-rfc")
    return 'voms = "lsst"'


def _unknown_ca(workdir: Path) -> str:
    return 'ca_dir = "/etc/ssl/certs"'          # the system's web CAs: not the grid CA


def _host_not_in_certificate(workdir: Path) -> str:
    return 'host = "https://127.0.0.2:18443"'   # loopback too, not in the certificate


@pytest.mark.parametrize("mistake, fragment", [
    (_proxy_legacy, "is a legacy (pre-RFC 3820) Globus proxy"),
    (_proxy_plain_cert, "is not a proxy (no RFC 3820 ProxyCertInfo extension)"),
    (_proxy_without_voms, "carries no VOMS attributes, but [rucio] voms = 'lsst'"),
    (_unknown_ca, "is not signed by a CA in /etc/ssl/certs (self-signed certificate in "
                  "certificate chain): set [rucio] ca_dir"),
    (_host_not_in_certificate, "does not name that host (IP address mismatch"),
], ids=["legacy-proxy", "not-a-proxy", "no-voms", "unknown-ca", "host-mismatch"])
def test_grid_credential_mistakes_are_one_line_each(workdir: Path, grid_stack: Any,
                                                    mistake: Any, fragment: str) -> None:
    make_files(workdir / "src", 2)
    rucio = mistake(workdir)
    (workdir / "x509up").chmod(0o600)
    chown_user(workdir)
    job = write_job(workdir, "bad", job_toml(unique_prefix(), rse=grid_stack.rse, rucio=rucio))
    line = plan_error(workdir, job)
    assert fragment in line, line
    assert "voms-proxy-init" in line or "[rucio]" in line, line     # it says what to do
    doctor_fails(workdir, job, fragment)


def test_a_proxy_with_the_voms_attributes_the_job_needs(workdir: Path, grid_stack: Any) -> None:
    """voms-proxy-fake makes a VOMS proxy without a VOMS server (signed by the test host
    certificate): with [rucio] voms = "lsst" it is accepted and the upload works."""
    files = make_files(workdir / "src", 3)
    ca = GRID_CA.parent
    fake = subprocess.run(
        ["voms-proxy-fake", "-rfc", "-hours", "2", "-cert", str(ca / "user.pem"),
         "-key", str(ca / "private" / "user.key"), "-hostcert", str(ca / "host.pem"),
         "-hostkey", str(ca / "private" / "host.key"), "-voms", "lsst",
         "-fqan", "/lsst/Role=NULL/Capability=NULL", "-uri", "localhost:15000",
         "-out", str(workdir / "x509up")], capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "X509_CERT_DIR": str(GRID_CA), "HOME": str(workdir),
             "RANDFILE": str(workdir / ".rnd")})
    assert fake.returncode == 0, fake.stdout + fake.stderr
    (workdir / "x509up").chmod(0o600)
    chown_user(workdir)
    prefix = unique_prefix()
    job = write_job(workdir, "voms", job_toml(prefix, rse=grid_stack.rse, rucio='voms = "lsst"'))
    proc = dac_upload(["submit", str(job), "--wait", "--timeout", "300"], cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_in_rucio_once(grid_stack, prefix, files)


def test_doctor_probe_goes_through_the_jobs_own_upload_path(workdir: Path,
                                                            grid_stack: Any) -> None:
    """rename = "always" cannot work on a storage that cannot rename: the bulk path's probe
    fails with the fix, and leaves nothing on the storage; the stock path's succeeds."""
    make_files(workdir / "src", 1)
    chown_user(workdir)
    prefix = unique_prefix()
    bulk = write_job(workdir, "probe", job_toml(prefix, rse=grid_stack.rse,
                                                upload='rename = "always"'))
    line = doctor_fails(workdir, bulk, "through the bulk path failed", "--probe")
    assert f"RSE {grid_stack.rse} cannot rename" in line and 'rename = \\"auto\\"' not in line
    assert 'set [upload] rename = "auto"' in line, line
    assert grid_stack.files_under(SCOPE, prefix) == []
    stock = write_job(workdir, "probe2", job_toml(prefix, rse=grid_stack.rse,
                                                  upload='mode = "stock"'))
    proc = dac_upload(["doctor", str(stock), "--probe"], cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "through the stock path" in proc.stdout and "all checks passed" in proc.stdout
    good = write_job(workdir, "probe3", job_toml(prefix, rse=grid_stack.rse))
    proc = dac_upload(["doctor", str(good), "--probe"], cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "through the bulk path (copy checked by storage checksum)" in proc.stdout


def test_without_md5_the_files_are_registered_with_adler32_only(workdir: Path,
                                                                grid_stack: Any) -> None:
    """[upload] md5 = false (large files on few cores): no md5 is computed or registered;
    adler32 (the storage's own, checked before registration) still protects each file."""
    files = make_files(workdir / "src", 3)
    chown_user(workdir)
    prefix = unique_prefix()
    job = write_job(workdir, "nomd5", job_toml(prefix, rse=grid_stack.rse, upload="md5 = false"))
    proc = dac_upload(["submit", str(job), "--wait", "--timeout", "300"], cwd=workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = load_summary(run_dir_of(proc.stdout))
    assert {(f["status"], f["md5"], f["verified"]) for f in summary["files"].values()} == {
        ("uploaded", None, "storage checksum")}
    for rel in files:
        assert grid_stack.client.get_metadata(SCOPE, prefix + rel)["md5"] is None
    assert_in_rucio_once(grid_stack, prefix, files)
