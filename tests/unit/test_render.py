"""render: the exact array and collector scripts for a CSD3-like job, both runtimes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dac_upload import __version__, render
from dac_upload.config import JobConfig, parse_job
from dac_upload.rucio import credentials

RUN_DIR = Path("/rds/project/x y/runs/R1")


def _job(container: dict[str, Any], **slurm: Any) -> JobConfig:
    raw = {
        "source": {"root": "/rds/project/dp1 data"},
        "rucio": {"scope": "user.jbloggs", "rse": "RAL_ECHO", "account": "jbloggs",
                  "host": "https://rucio.example.ac.uk",
                  "ca_dir": "/cvmfs/grid.cern.ch/etc/grid-security/certificates",
                  "proxy": "/home/u/grid proxy/x509up_u1234"},
        "slurm": {"partition": "icelake", "account": "DIRAC-DP002-CPU", "time": "02:00:00",
                  "mem": "4G", "extra": {"qos": "normal"}, **slurm},
        "container": container,
    }
    return parse_job(raw, path=Path("/home/u/jobs/csd3.toml"))


NONE = {"runtime": "none", "python": "/opt/venv/bin/python"}
APPTAINER = {"runtime": "apptainer", "image": "/rds/images/dac-upload.sif",
             "binds": ["/rds/project/calib:/calib:ro"]}


def _creds(job: JobConfig) -> credentials.Credentials:
    return credentials.resolve(job.rucio, {}, 1234, str(job.path))


def _array(job: JobConfig) -> str:
    ctx = render.script_context(job, "R1", RUN_DIR, "/usr/bin/python3", _creds(job))
    body = render.render_body("array.sh.j2", ctx)
    return render.full_script(render.array_options(job, "0-9", 3), body)


def _collector(job: JobConfig) -> str:
    ctx = render.script_context(job, "R1", RUN_DIR, "/usr/bin/python3", _creds(job))
    body = render.render_body("collect.sh.j2", ctx)
    return render.full_script(render.collector_options(job, "12345"), body)


def _expected(text: str) -> str:
    return text.replace("@VERSION@", __version__)


ARRAY_HEADER = """\
#!/bin/bash

#SBATCH --account             DIRAC-DP002-CPU
#SBATCH --array               0-9%3
#SBATCH --cpus-per-task       1
#SBATCH --export              ALL,DAC_UPLOAD_TASK_OFFSET=0
#SBATCH --job-name            dacu-csd3
#SBATCH --mem                 4G
#SBATCH --open-mode           append
#SBATCH --output              logs/job%A.index%a.out
#SBATCH --partition           icelake
#SBATCH --qos                 normal
#SBATCH --signal              B:USR1@300
#SBATCH --time                02:00:00

"""

COLLECT_HEADER = """\
#!/bin/bash

#SBATCH --account             DIRAC-DP002-CPU
#SBATCH --cpus-per-task       2
#SBATCH --dependency          afterany:12345
#SBATCH --job-name            dacu-csd3-collect
#SBATCH --mem                 4G
#SBATCH --open-mode           append
#SBATCH --output              logs/collect.job%j.out
#SBATCH --partition           icelake
#SBATCH --qos                 normal
#SBATCH --time                02:00:00

"""

ARRAY_NONE = ARRAY_HEADER + """\
# dac-upload @VERSION@: job csd3, run R1.
# One array task uploads one batch manifest: manifests/task-NNNNN.json -> results/task-NNNNN.jsonl
set -uo pipefail
RUN_DIR='/rds/project/x y/runs/R1'
# a run larger than MaxArraySize is split into arrays whose indices start at 0: add the offset
TASK="${SLURM_ARRAY_TASK_ID:?this script runs as a Slurm array task (sbatch --array)}"
TASK=$(( TASK + ${DAC_UPLOAD_TASK_OFFSET:-0} ))
# the run's own Rucio client configuration and credential paths (no secret is written here)
export RUCIO_CONFIG='/rds/project/x y/runs/R1/rucio.cfg'
export X509_USER_PROXY='/home/u/grid proxy/x509up_u1234'
export X509_CERT_DIR=/cvmfs/grid.cern.ch/etc/grid-security/certificates
# Slurm's wall-time warning (sbatch --signal=B:USR1@N) reaches this shell: pass it on, so the
# worker finishes its current file, records the rest as not attempted and exits cleanly.
trap 'echo "dac-upload: wall time near, stopping"; kill -USR1 "${worker:-}" 2>/dev/null' USR1
trap 'kill -TERM "${worker:-}" 2>/dev/null' TERM
echo "dac-upload: run R1 task $TASK on $(hostname) at $(date -u +%Y-%m-%dT%H:%M:%SZ)"
/opt/venv/bin/python -m dac_upload worker --run "$RUN_DIR" --task "$TASK" \\
  ${DAC_UPLOAD_RETRY_PERMANENT:+--retry-permanent} &
worker=$!
while true; do
  wait "$worker"; rc=$?
  if [ "$rc" -gt 128 ] && kill -0 "$worker" 2>/dev/null; then continue; fi  # a trap ran
  break
done
echo "dac-upload: run R1 task $TASK exit code $rc at $(date -u +%Y-%m-%dT%H:%M:%SZ)"
exit "$rc"
"""

ARRAY_APPTAINER = ARRAY_HEADER + """\
# dac-upload @VERSION@: job csd3, run R1.
# One array task uploads one batch manifest: manifests/task-NNNNN.json -> results/task-NNNNN.jsonl
set -uo pipefail
RUN_DIR='/rds/project/x y/runs/R1'
# a run larger than MaxArraySize is split into arrays whose indices start at 0: add the offset
TASK="${SLURM_ARRAY_TASK_ID:?this script runs as a Slurm array task (sbatch --array)}"
TASK=$(( TASK + ${DAC_UPLOAD_TASK_OFFSET:-0} ))
# the run's own Rucio client configuration and credential paths (no secret is written here)
export RUCIO_CONFIG='/rds/project/x y/runs/R1/rucio.cfg'
export X509_USER_PROXY='/home/u/grid proxy/x509up_u1234'
export X509_CERT_DIR=/cvmfs/grid.cern.ch/etc/grid-security/certificates
# Slurm's wall-time warning (sbatch --signal=B:USR1@N) reaches this shell: pass it on, so the
# worker finishes its current file, records the rest as not attempted and exits cleanly.
trap 'echo "dac-upload: wall time near, stopping"; kill -USR1 "${worker:-}" 2>/dev/null' USR1
trap 'kill -TERM "${worker:-}" 2>/dev/null' TERM
echo "dac-upload: run R1 task $TASK on $(hostname) at $(date -u +%Y-%m-%dT%H:%M:%SZ)"
# --cleanenv --contain: the worker sees only these binds and these variables
apptainer exec --cleanenv --contain \\
  --bind '/rds/project/dp1 data:/rds/project/dp1 data:ro' \\
  --bind '/rds/project/x y/runs/R1' \\
  --bind /cvmfs/grid.cern.ch/etc/grid-security/certificates:/cvmfs/grid.cern.ch/etc/grid-security/certificates:ro \\
  --bind '/home/u/grid proxy/x509up_u1234:/home/u/grid proxy/x509up_u1234:ro' \\
  --bind /rds/project/calib:/calib:ro \\
  --env "SLURM_ARRAY_TASK_ID=$TASK" \\
  --env "SLURM_JOB_ID=${SLURM_JOB_ID:-}" \\
  --env 'RUCIO_CONFIG=/rds/project/x y/runs/R1/rucio.cfg' \\
  --env 'X509_USER_PROXY=/home/u/grid proxy/x509up_u1234' \\
  --env X509_CERT_DIR=/cvmfs/grid.cern.ch/etc/grid-security/certificates \\
  /rds/images/dac-upload.sif \\
  dac-upload worker --run "$RUN_DIR" --task "$TASK" \\
  ${DAC_UPLOAD_RETRY_PERMANENT:+--retry-permanent} &
worker=$!
while true; do
  wait "$worker"; rc=$?
  if [ "$rc" -gt 128 ] && kill -0 "$worker" 2>/dev/null; then continue; fi  # a trap ran
  break
done
echo "dac-upload: run R1 task $TASK exit code $rc at $(date -u +%Y-%m-%dT%H:%M:%SZ)"
exit "$rc"
"""

COLLECT_NONE = COLLECT_HEADER + """\
# dac-upload @VERSION@: job csd3, run R1.
# Collector: runs after every array task (afterany), merges results/ into summary.json.
set -uo pipefail
RUN_DIR='/rds/project/x y/runs/R1'
echo "dac-upload: collecting run R1 on $(hostname) at $(date -u +%Y-%m-%dT%H:%M:%SZ)"
/opt/venv/bin/python -m dac_upload collect "$RUN_DIR"
rc=$?
echo "dac-upload: collector exit code $rc at $(date -u +%Y-%m-%dT%H:%M:%SZ)"
exit "$rc"
"""

COLLECT_APPTAINER = COLLECT_HEADER + """\
# dac-upload @VERSION@: job csd3, run R1.
# Collector: runs after every array task (afterany), merges results/ into summary.json.
set -uo pipefail
RUN_DIR='/rds/project/x y/runs/R1'
echo "dac-upload: collecting run R1 on $(hostname) at $(date -u +%Y-%m-%dT%H:%M:%SZ)"
apptainer exec --cleanenv --contain \\
  --bind /home/u/jobs/csd3/runs \\
  --bind '/rds/project/x y/runs/R1' \\
  --bind /rds/project/calib:/calib:ro \\
  /rds/images/dac-upload.sif \\
  dac-upload collect "$RUN_DIR"
rc=$?
echo "dac-upload: collector exit code $rc at $(date -u +%Y-%m-%dT%H:%M:%SZ)"
exit "$rc"
"""


def test_array_script_runtime_none() -> None:
    assert _array(_job(NONE)) == _expected(ARRAY_NONE)


def test_array_script_runtime_apptainer() -> None:
    assert _array(_job(APPTAINER)) == _expected(ARRAY_APPTAINER)


def test_collector_script_runtime_none() -> None:
    assert _collector(_job(NONE)) == _expected(COLLECT_NONE)


def test_collector_script_runtime_apptainer() -> None:
    assert _collector(_job(APPTAINER)) == _expected(COLLECT_APPTAINER)


def test_python_argument_used_when_the_job_names_none() -> None:
    job = _job({"runtime": "none"})
    ctx = render.script_context(job, "R1", RUN_DIR, "/usr/bin/python3 x")
    assert ctx.python == "/usr/bin/python3 x"
    body = render.render_body("array.sh.j2", ctx)
    assert "\n'/usr/bin/python3 x' -m dac_upload worker --run \"$RUN_DIR\"" in body


def test_userpass_binds_the_password_file_and_never_writes_the_password(
        tmp_path: Path) -> None:
    secret = tmp_path / "rucio pw"
    secret.write_text("s3cret-Pa55\n")
    raw = {"source": {"root": "/data"},
           "rucio": {"scope": "s", "rse": "R", "host": "http://127.0.0.1:18080",
                     "auth_type": "userpass", "username": "jb", "password_file": str(secret)},
           "container": APPTAINER}
    job = parse_job(raw, path=Path("/home/u/jobs/j.toml"))
    ctx = render.script_context(job, "R1", RUN_DIR, "/usr/bin/python3", _creds(job))
    assert ctx.binds == ("/data:/data:ro", str(RUN_DIR), f"{secret}:{secret}:ro",
                         "/rds/project/calib:/calib:ro")
    assert dict(ctx.environment) == {"RUCIO_CONFIG": f"{RUN_DIR}/rucio.cfg"}
    body = render.render_body("array.sh.j2", ctx)
    assert f"\n  --bind '{secret}:{secret}:ro' \\\n" in body
    assert "s3cret" not in body and "s3cret" not in repr(ctx)


def test_token_file_is_passed_as_bearer_token_file() -> None:
    raw = {"source": {"root": "/data"},
           "rucio": {"scope": "s", "rse": "R", "host": "http://r", "auth_type": "token",
                     "token_file": "/home/u/.config/token"},
           "container": APPTAINER}
    job = parse_job(raw, path=Path("/home/u/jobs/j.toml"))
    ctx = render.script_context(job, "R1", RUN_DIR, "/usr/bin/python3", _creds(job))
    assert dict(ctx.environment)["BEARER_TOKEN_FILE"] == "/home/u/.config/token"
    body = render.render_body("array.sh.j2", ctx)
    assert "\n  --env BEARER_TOKEN_FILE=/home/u/.config/token \\\n" in body
    # a token agent renames its new file over the old one: bind the directory, not the file
    assert "\n  --bind /home/u/.config:/home/u/.config:ro \\\n" in body


def test_paths_apptainer_cannot_bind_are_plan_errors() -> None:
    raw = {"source": {"root": "/data/a,b"},
           "rucio": {"scope": "s", "rse": "R", "host": "http://r", "proxy": "/p:x/proxy"},
           "container": APPTAINER}
    job = parse_job(raw, path=Path("/home/u/jobs/j.toml"))
    lines = render.bind_problems(job, job.runs_dir / "R1", _creds(job))
    assert lines == [
        "/home/u/jobs/j.toml: '/data/a,b' contains ',' or ':', which Apptainer cannot bind; "
        "rename or move it (or use runtime = \"none\")",
        "/home/u/jobs/j.toml: '/p:x/proxy' contains ',' or ':', which Apptainer cannot bind; "
        "rename or move it (or use runtime = \"none\")"]
    none = parse_job({**raw, "container": NONE}, path=Path("/home/u/jobs/j.toml"))
    assert render.bind_problems(none, none.runs_dir / "R1", _creds(none)) == []


def test_context_has_no_binds_without_apptainer() -> None:
    ctx = render.script_context(_job(NONE), "R1", RUN_DIR, "/x")
    assert ctx.binds == () and ctx.image is None and ctx.runtime == "none"


def test_array_options() -> None:
    job = _job(NONE, job_name="dp1", cpus_per_task=4)
    assert render.array_options(job, "0-3,7", 2) == {
        "job_name": "dp1", "array": "0-3,7%2", "output": "logs/job%A.index%a.out",
        "open_mode": "append", "signal": "B:USR1@300",
        "export": "ALL,DAC_UPLOAD_TASK_OFFSET=0", "time": "02:00:00", "mem": "4G",
        "cpus_per_task": 4, "partition": "icelake", "account": "DIRAC-DP002-CPU",
        "qos": "normal"}


def test_with_offset_keeps_the_throttle() -> None:
    opts = render.array_options(_job(NONE), "0-9", 3)
    part = render.with_offset(opts, "0-4", 10)
    assert part["array"] == "0-4%3"
    assert part["export"] == "ALL,DAC_UPLOAD_TASK_OFFSET=10"
    assert opts["array"] == "0-9%3"                      # the original is not changed


def test_collector_options() -> None:
    job = _job(NONE, cpus_per_task=4)
    opts = render.collector_options(job, "12345")
    assert opts["dependency"] == "afterany:12345"
    assert opts["job_name"] == "dacu-csd3-collect"
    assert opts["cpus_per_task"] == 2  # itself and the ledger's writer, whatever the job says
    assert opts["output"] == "logs/collect.job%j.out"
    placeholder = render.collector_options(job, None)["dependency"]
    assert placeholder == "afterany:ARRAY_JOB_ID"


def test_no_partition_no_account_lines() -> None:
    job = parse_job({"source": {"root": "/d"}, "rucio": {"scope": "s", "rse": "R"},
                     "container": NONE}, path=Path("/j/x.toml"))
    script = render.full_script(render.array_options(job, "0", 1), "true\n")
    assert "--partition" not in script and "--account" not in script
    assert script.startswith("#!/bin/bash\n\n#SBATCH --array               0%1\n")
    assert script.endswith("\n\ntrue\n")


def test_unknown_extra_option_is_one_line() -> None:
    job = _job(NONE, extra={"qoss": "normal", "mail_type": "END"})
    problems = render.sbatch_option_problems(job)
    assert len(problems) == 1
    assert problems[0].startswith("/home/u/jobs/csd3.toml: [slurm] extra: unknown sbatch "
                                  "option(s): qoss; see 'man sbatch'")


def test_dashed_extra_option_is_reported() -> None:
    problems = render.sbatch_option_problems(_job(NONE, extra={"mail-type": "END"}))
    assert len(problems) == 1 and "mail-type" in problems[0]


def test_known_extra_options_pass() -> None:
    job = _job(NONE, extra={"qos": "normal", "mail_type": "END", "exclusive": ""})
    assert render.sbatch_option_problems(job) == []
    script = render.full_script(render.array_options(job, "0", 1), "true\n")
    assert "\n#SBATCH --mail-type           END\n" in script
    assert "#SBATCH --exclusive" in [line.rstrip() for line in script.splitlines()]


def test_make_slurm_unknown_option_raises_value_error() -> None:
    with pytest.raises(ValueError, match="unknown sbatch option"):
        render.make_slurm({"not_an_option": "1"})


def test_templates_dir() -> None:
    tdir = render.templates_dir()
    assert (tdir / "array.sh.j2").is_file()
    assert (tdir / "collect.sh.j2").is_file()


def test_unknown_template_is_an_error() -> None:
    import jinja2

    ctx = render.script_context(_job(NONE), "R1", RUN_DIR, "/x")
    with pytest.raises(jinja2.TemplateNotFound):
        render.render_body("nope.sh.j2", ctx)


def test_extra_may_not_override_what_dac_upload_sets(tmp_path: Path) -> None:
    from dac_upload.config import parse_job

    raw = {"source": {"root": str(tmp_path)}, "rucio": {"scope": "s", "rse": "R"},
           "container": {"runtime": "none"},
           "slurm": {"extra": {"array": "0-3", "output": "x.out", "qos": "normal"}}}
    job = parse_job(raw, path=tmp_path / "j.toml")
    lines = render.sbatch_option_problems(job)
    assert len(lines) == 1
    assert "array, output" in lines[0] and "qos" not in lines[0]


def test_run_inside_the_job_folder_is_bound_once() -> None:
    """The collector binds the runs folder (the runs and the ledger it updates), which
    covers the run; the array task binds only its run."""
    job = _job(APPTAINER)
    ctx = render.script_context(job, "R1", job.runs_dir / "R1", "/usr/bin/python3", _creds(job))
    assert ctx.collect_binds == ("/home/u/jobs/csd3/runs", "/rds/project/calib:/calib:ro")
    assert "/home/u/jobs/csd3/runs/R1" in ctx.binds
    assert "/home/u/jobs/csd3/runs" not in ctx.binds


def test_extra_may_not_shadow_keys_of_its_own(tmp_path: Path) -> None:
    raw = {"source": {"root": str(tmp_path)}, "rucio": {"scope": "s", "rse": "R"},
           "container": {"runtime": "none"}, "slurm": {"extra": {"time": "01:00:00"}}}
    lines = render.sbatch_option_problems(parse_job(raw, path=tmp_path / "j.toml"))
    assert lines and "extra sets time: use the [slurm] key(s)" in lines[0]


# ----------------------------------------------------------------------------- header values
def test_an_account_with_a_space_is_refused_before_rendering() -> None:
    """`account = "my project!"` rendered `#SBATCH --account my project!`, which sbatch
    refused at submission ("Invalid directive ... project!")."""
    lines = render.sbatch_option_problems(_job(NONE, account="my project!"))
    assert lines == ["/home/u/jobs/csd3.toml: [slurm] account = 'my project!' holds a space, "
                     "and Slurm takes one word there; use the name Slurm knows (sacctmgr show "
                     "assoc user=$USER lists your accounts, sinfo -s the partitions)"]


@pytest.mark.parametrize("slurm", [{"partition": "ice lake"}, {"mem": "4 G"},
                                   {"extra": {"qos": "normal high"}}])
def test_a_space_where_slurm_takes_one_word_is_refused(slurm: dict[str, Any]) -> None:
    lines = render.sbatch_option_problems(_job(NONE, **slurm))
    assert len(lines) == 1 and "holds a space" in lines[0]


@pytest.mark.parametrize("value", ['x" --wrap "rm', "a\\b", "a\tb", "a\x1bb"])
def test_a_quote_backslash_or_control_character_is_refused(value: str) -> None:
    lines = render.sbatch_option_problems(_job(NONE, extra={"comment": value}))
    assert len(lines) == 1 and "cannot go into an #SBATCH line" in lines[0]


def test_a_value_slurm_takes_with_spaces_is_quoted_in_its_line() -> None:
    job = _job(NONE, extra={"comment": "dp1 #2 & more"})
    assert render.sbatch_option_problems(job) == []
    script = render.full_script(render.array_options(job, "0-3", 2), "true\n")
    header = [ln for ln in script.splitlines() if ln.startswith("#SBATCH")]
    assert '#SBATCH --comment             "dp1 #2 & more"' in header
    assert len(header) == len(render.array_options(job, "0-3", 2))


@pytest.mark.parametrize("key", ["partition", "account", "mem", "job_name"])
@pytest.mark.parametrize("value", ["a b", "a\nb", 'a"b', "a;b #c", "$(id)"])
def test_no_job_file_value_adds_a_directive_or_a_command(key: str, value: str) -> None:
    """Whatever a job file holds, it is refused (by the job file's checks or
    sbatch_option_problems) or it stays inside its own #SBATCH line, and the body is ours."""
    from dac_upload.config import ConfigError

    try:
        job = _job(NONE, **{key: value})
    except ConfigError:
        return
    if render.sbatch_option_problems(job):
        return
    options = render.array_options(job, "0", 1)
    script = render.full_script(options, "true\n")
    lines = script.splitlines()
    assert len([ln for ln in lines if ln.startswith("#SBATCH")]) == len(options)
    assert [ln for ln in lines if ln and not ln.startswith("#")] == ["true"]
