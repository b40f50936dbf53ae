"""config: job file -> JobConfig; every problem at once, one line each; the CLI's exit 2."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from unit_helpers import job_text, write_job

from dac_upload import render
from dac_upload.config import ConfigError, load_job, parse_duration, parse_job, parse_size

REPO = Path(__file__).resolve().parents[2]


def _errors(tmp_path: Path, text: str) -> tuple[Path, list[str]]:
    path = write_job(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert str(info.value) == "\n".join(info.value.lines)
    return path.resolve(), info.value.lines


# ----------------------------------------------------------------------------- a good job
def test_full_job_parses(tmp_path: Path) -> None:
    path = write_job(tmp_path, """\
        [job]
        name = "lsst-dp1"
        runs_dir = "/scratch/runs"

        [source]
        root = "/rds/project/dp1"
        include = ["**/*.fits", "**/*.yaml"]
        exclude = ["**/tmp/**"]
        symlinks = "skip"

        [rucio]
        scope = "user.jbloggs"
        rse = "RAL_ECHO"
        account = "jbloggs"
        dataset = "dp1:raw-2024"
        lifetime = "30d"
        config = "rucio.cfg"

        [naming]
        prefix = "dp1/"
        replace_invalid = "_"

        [batching]
        files_per_batch = 500
        bytes_per_batch = "200 GB"
        max_running = 8

        [slurm]
        partition = "icelake"
        account = "DIRAC-DP002-CPU"
        time = "1-00:00:00"
        mem = "4G"
        cpus_per_task = 2
        job_name = "dp1"
        extra = {qos = "normal", exclusive = true, requeue = false, nice = 10}

        [container]
        runtime = "apptainer"
        image = "~/images/dac-upload.sif"
        binds = ["/rds:/rds:ro"]
        """)
    job = load_job(path)
    assert job.name == "lsst-dp1"
    assert job.path == path.resolve()
    assert job.text == path.read_text()
    assert job.runs_dir == Path("/scratch/runs")
    assert job.source.root == Path("/rds/project/dp1")
    assert job.source.include == ("**/*.fits", "**/*.yaml")
    assert job.source.exclude == ("**/tmp/**",)
    assert job.source.symlinks == "skip"
    r = job.rucio
    assert (r.scope, r.rse, r.account) == ("user.jbloggs", "RAL_ECHO", "jbloggs")
    assert r.dataset_did == ("dp1", "raw-2024")
    assert r.lifetime == 30 * 86400
    assert r.config == tmp_path.resolve() / "rucio.cfg"
    assert (job.naming.prefix, job.naming.replace_invalid) == ("dp1/", "_")
    assert job.batching.files_per_batch == 500
    assert job.batching.bytes_per_batch == 200 * 10**9
    assert job.batching.max_running == 8
    s = job.slurm
    assert (s.partition, s.account, s.time, s.mem, s.cpus_per_task, s.job_name) == (
        "icelake", "DIRAC-DP002-CPU", "1-00:00:00", "4G", 2, "dp1")
    # true -> flag without value, false -> left out, numbers -> strings
    assert s.extra == {"qos": "normal", "exclusive": "", "nice": "10"}
    assert job.container.runtime == "apptainer"
    assert job.container.image == Path.home() / "images/dac-upload.sif"
    assert job.container.binds == ("/rds:/rds:ro",)
    assert job.container.python is None


def test_defaults(tmp_path: Path) -> None:
    job = load_job(write_job(tmp_path / "jobs", job_text(), "csd3-dp1.toml"))
    jobdir = (tmp_path / "jobs").resolve()
    assert job.name == "csd3-dp1"  # the file stem
    assert job.runs_dir == jobdir / "csd3-dp1" / "runs"
    assert job.source.root == jobdir / "data"
    assert job.source.include == ("**/*",)
    assert job.source.exclude == ()
    assert job.source.symlinks == "follow"
    assert job.rucio.account is None
    assert job.rucio.dataset is None and job.rucio.dataset_did is None
    assert job.rucio.lifetime is None and job.rucio.config is None
    assert (job.naming.prefix, job.naming.replace_invalid) == ("", None)
    assert job.batching.files_per_batch == 1000
    assert job.batching.bytes_per_batch is None
    assert job.batching.max_running == 4
    assert (job.slurm.time, job.slurm.mem, job.slurm.cpus_per_task) == ("01:00:00", "2G", 1)
    assert job.slurm.partition is None and job.slurm.extra == {}


def test_relative_paths_resolve_against_the_job_file_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jobdir = tmp_path / "jobs"
    path = write_job(jobdir, job_text(job='runs_dir = "../runs"',
                                      source="").replace('root = "data"', 'root = "../data/x"'))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    job = load_job(path)
    assert job.source.root == tmp_path.resolve() / "data" / "x"
    assert job.runs_dir == tmp_path.resolve() / "runs"
    # a relative job path is resolved too
    monkeypatch.chdir(tmp_path)
    job2 = load_job(Path("jobs") / "job.toml")
    assert job2.path == path.resolve()
    assert job2.source.root == job.source.root


def test_bare_dataset_lives_in_the_job_scope(tmp_path: Path) -> None:
    job = load_job(write_job(tmp_path, job_text(rucio='dataset = "raw-2024"')))
    assert job.rucio.dataset_did == ("user.test", "raw-2024")


def test_include_may_be_a_single_string(tmp_path: Path) -> None:
    job = load_job(write_job(tmp_path, job_text(source='include = "**/*.fits"')))
    assert job.source.include == ("**/*.fits",)


def test_parse_job_from_dict_without_a_file() -> None:
    job = parse_job({"source": {"root": "data"}, "rucio": {"scope": "s", "rse": "R"},
                     "container": {"runtime": "none"}}, path=Path("/home/u/jobs/x.toml"))
    assert job.name == "x"
    assert job.source.root == Path("/home/u/jobs/data")
    assert job.runs_dir == Path("/home/u/jobs/x/runs")
    assert job.text == ""


def test_runs_dir_expands_home(tmp_path: Path) -> None:
    job = load_job(write_job(tmp_path, job_text(job='runs_dir = "~/dac-runs"')))
    assert job.runs_dir == Path.home() / "dac-runs"


def test_example_job_loads() -> None:
    example = REPO / "jobs" / "example.toml"
    if not example.exists():
        pytest.skip("jobs/example.toml not written yet")
    job = load_job(example)
    assert job.path == example.resolve()
    assert job.name == "example"
    assert job.runs_dir == example.resolve().parent / "example" / "runs"
    assert job.source.root.is_absolute()
    assert job.source.include and job.rucio.scope and job.rucio.rse
    assert job.rucio.lifetime is None  # the example must not make data deletable
    assert render.sbatch_option_problems(job) == []


def test_csd3_example_renders_a_contained_apptainer_task() -> None:
    """jobs/csd3-example.toml as a new user copies it: proxy on a shared file system, the CA
    directory and the proxy bound read-only, only the worker's variables passed."""
    from dac_upload.rucio import credentials

    example = REPO / "jobs" / "csd3-example.toml"
    job = load_job(example)
    assert job.rucio.lifetime is None and job.rucio.auth_type == "x509_proxy"
    assert (job.upload.mode, job.upload.rename) == ("bulk", "never")   # Echo cannot rename
    assert job.rucio.proxy == Path.home() / ".globus" / "x509up_dac"
    creds = credentials.resolve(job.rucio, {}, 1000, str(example))
    assert credentials.local_warnings(creds) == []      # not in /tmp
    run_dir = job.runs_dir / "R1"
    ctx = render.script_context(job, "R1", run_dir, "/usr/bin/python3", creds)
    proxy, ca = str(job.rucio.proxy), "/etc/grid-security/certificates"
    assert ctx.binds == (f"{job.source.root}:{job.source.root}:ro", str(run_dir),
                         f"{ca}:{ca}:ro", f"{proxy}:{proxy}:ro")
    body = render.render_body("array.sh.j2", ctx)
    script = render.full_script(render.array_options(job, "0-99", 8), body)
    for line in ("#SBATCH --partition           icelake", "#SBATCH --time                12:00:00",
                 "#SBATCH --array               0-99%8", "#SBATCH --signal              B:USR1@600",
                 "apptainer exec --cleanenv --contain \\",
                 f"  --env X509_USER_PROXY={proxy} \\", f"  --env X509_CERT_DIR={ca} \\",
                 f"  --env RUCIO_CONFIG={run_dir}/rucio.cfg \\"):
        assert line in script.splitlines(), line
    assert render.sbatch_option_problems(job) == []


# ----------------------------------------------------------------------------- problems
def test_every_problem_reported_at_once_one_line_each(tmp_path: Path) -> None:
    path, lines = _errors(tmp_path, """\
        [sourc]
        x = 1

        [source]
        inclde = ["*.fits"]
        symlinks = "maybe"

        [rucio]
        scope = "bad scope!"
        lifetime = "forever"

        [batching]
        files_per_batch = "many"
        max_running = 0

        [slurm]
        time = "two hours"
        cpus_per_task = true

        [container]
        runtime = "apptainer"
        binds = ["rel:/x"]
        """)
    expected_keys = [
        "[sourc]", "'inclde'", "'root'", "symlinks", "'rse'", "lifetime",
        "files_per_batch", "max_running", "time", "cpus_per_task", "scope", "image",
        "'rel:/x'",
    ]
    assert len(lines) == len(expected_keys), "\n".join(lines)
    for line in lines:
        assert "\n" not in line
        assert line.startswith(f"{path}: "), line
    for key in expected_keys:
        assert sum(key in line for line in lines) >= 1, (key, lines)
    assert any("unknown key 'inclde'; did you mean 'include'?" in ln for ln in lines)
    assert f"{path}: [source] 'root' is required: set it to the directory to upload from" in lines
    assert any(ln.startswith(f"{path}: [rucio] 'rse' is required") for ln in lines)
    assert f"{path}: [slurm] time = 'two hours' is not valid: use a Slurm time such as " \
           '"02:00:00" or "1-00:00:00"' in lines


@pytest.mark.parametrize(("extra", "section", "key"), [
    ({"source": "root = 5"}, "source", "root"),
    ({"source": 'include = [1, 2]'}, "source", "include"),
    ({"source": 'exclude = ""'}, "source", "exclude"),
    ({"rucio": "lifetime = 1.5"}, "rucio", "lifetime"),
    ({"rucio": "lifetime = -3"}, "rucio", "lifetime"),
    ({"naming": "prefix = 3"}, "naming", "prefix"),
    ({"batching": "files_per_batch = 1.5"}, "batching", "files_per_batch"),
    ({"batching": "files_per_batch = -1"}, "batching", "files_per_batch"),
    ({"batching": 'bytes_per_batch = "lots"'}, "batching", "bytes_per_batch"),
    ({"batching": "bytes_per_batch = 0"}, "batching", "bytes_per_batch"),
    ({"slurm": 'partition = ""'}, "slurm", "partition"),
    ({"slurm": "time = 120.0"}, "slurm", "time"),
    ({"slurm": 'time = "2h"'}, "slurm", "time"),
    ({"slurm": 'extra = "qos=normal"'}, "slurm", "extra"),
    ({"slurm": "extra = {qos = [1]}"}, "slurm", "extra"),
    ({"container": 'binds = "/a,/b"'}, "container", "binds"),
])
def test_wrong_types_one_line(tmp_path: Path, extra: dict[str, str], section: str,
                              key: str) -> None:
    text = job_text(**extra)
    if "root = 5" in extra.get("source", ""):
        text = text.replace('root = "data"\n', "")
    path, lines = _errors(tmp_path, text)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}: [{section}] ")
    assert key in lines[0]


@pytest.mark.parametrize(("section", "key"), [("source", "root"), ("rucio", "scope"),
                                              ("rucio", "rse")])
def test_missing_required(tmp_path: Path, section: str, key: str) -> None:
    text = job_text()
    text = re.sub(rf"(?m)^{key} = .*\n", "", text, count=1) if key != "scope" else \
        text.replace('scope = "user.test"\n', "")
    path, lines = _errors(tmp_path, text)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}: [{section}] '{key}' is required: set it to ")


@pytest.mark.parametrize("time", ["02:00:00", "1-00:00:00", "30", "90:00", "2-12", "1-2:30"])
def test_good_slurm_times(tmp_path: Path, time: str) -> None:
    job = load_job(write_job(tmp_path, job_text(slurm=f'time = "{time}"')))
    assert job.slurm.time == time


@pytest.mark.parametrize("time", ["two hours", "2h", "02:00:00:00", "1-", "-1", "", "1:2:3:4"])
def test_bad_slurm_times(tmp_path: Path, time: str) -> None:
    path, lines = _errors(tmp_path, job_text(slurm=f'time = "{time}"'))
    assert lines == [f"{path}: [slurm] time = {time!r} is not valid: use a Slurm time such as "
                     '"02:00:00" or "1-00:00:00"']


def test_apptainer_needs_an_image(tmp_path: Path) -> None:
    text = job_text().replace('runtime = "none"', 'runtime = "apptainer"')
    path, lines = _errors(tmp_path, text)
    assert lines == [f'{path}: [container] runtime = "apptainer" needs image = '
                     '"/path/to/dac-upload.sif" (or set runtime = "none")']


def test_apptainer_is_the_default_runtime(tmp_path: Path) -> None:
    text = job_text().replace('runtime = "none"\n', "")
    _path, lines = _errors(tmp_path, text)
    assert len(lines) == 1 and "needs image" in lines[0]
    job = load_job(write_job(tmp_path, text + 'image = "dac.sif"\n'))
    assert job.container.runtime == "apptainer"
    assert job.container.image == tmp_path.resolve() / "dac.sif"


def test_invalid_runtime_is_one_line(tmp_path: Path) -> None:
    path, lines = _errors(tmp_path, job_text().replace('runtime = "none"', 'runtime = "docker"'))
    assert lines == [f"{path}: [container] runtime = 'docker' is not valid: use none or apptainer"]


@pytest.mark.parametrize("scope", ["bad scope", "user/x", "a" * 26, "ü"])
def test_invalid_scope(tmp_path: Path, scope: str) -> None:
    text = job_text().replace('scope = "user.test"', f'scope = "{scope}"')
    path, lines = _errors(tmp_path, text)
    assert lines == [f"{path}: [rucio] scope = {scope!r}: a scope is 1-25 characters of "
                     "A-Z a-z 0-9 . _ -"]


@pytest.mark.parametrize(("extra", "needle"), [
    ({"rucio": 'account = "JBloggs"'}, "[rucio] account = 'JBloggs': an account"),
    ({"rucio": 'dataset = "bad name"'}, "[rucio] dataset = 'bad name': the name contains"),
    ({"rucio": 'dataset = "bad scope:ok"'}, "[rucio] dataset = 'bad scope:ok': a scope"),
    ({"naming": 'replace_invalid = " "'}, "[naming] replace_invalid = ' ' is itself not"),
    ({"naming": 'prefix = ".x/"'}, "[naming] prefix = '.x/': a Rucio name must start"),
    ({"container": 'binds = ["/a,/b"]'}, "[container] binds entry '/a,/b'"),
])
def test_semantic_problems(tmp_path: Path, extra: dict[str, str], needle: str) -> None:
    path, lines = _errors(tmp_path, job_text(**extra))
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}: {needle}"), lines[0]


def test_rse_must_be_upper_case(tmp_path: Path) -> None:
    path, lines = _errors(tmp_path, job_text().replace("TEST_RSE", "test_rse"))
    assert len(lines) == 1 and lines[0].startswith(f"{path}: [rucio] rse = 'test_rse': ")


def test_unknown_key_without_close_match_lists_known_keys(tmp_path: Path) -> None:
    path, lines = _errors(tmp_path, job_text(batching="zzz = 1"))
    assert lines == [f"{path}: [batching] unknown key 'zzz'; known keys are files_per_batch, "
                     "bytes_per_batch, max_running"]


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    path, lines = _errors(tmp_path, 'naming = "x"\n' + job_text())
    assert lines == [f"{path}: 'naming' must be a table [naming]"]


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_job(tmp_path / "nope.toml")
    assert info.value.lines == [f"{tmp_path / 'nope.toml'}: job file not found; check the path"]
    path, lines = _errors(tmp_path, "[source\nroot = 1\n")
    assert len(lines) == 1
    assert lines[0].startswith(f"{path}: not valid TOML: ")
    assert lines[0].endswith("; fix the syntax")


# ----------------------------------------------------------------------------- value parsers
@pytest.mark.parametrize(("value", "expected"), [
    (500, 500),
    ("500", 500),
    ("200 GB", 200 * 10**9),
    ("200GB", 200 * 10**9),
    ("200 gb", 200 * 10**9),
    ("200G", 200 * 10**9),
    ("1.5TiB", int(1.5 * 2**40)),
    ("1.5 TiB", 1649267441664),
    ("4 KiB", 4096),
    ("4k", 4000),
    ("3 MB", 3 * 10**6),
    ("2 PB", 2 * 10**15),
    ("10 B", 10),
    ("10b", 10),
])
def test_parse_size(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", [0, -1, "0", "0.1", "abc", "", "GB", "5 XB", "-5 GB",
                                   "1e9", True, 1.5, None, [1]])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


@pytest.mark.parametrize("value", ["5 iB", "5i"])
def test_parse_size_bare_i_is_a_value_error(value: str) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


@pytest.mark.parametrize(("value", "expected"), [
    (3600, 3600),
    ("3600", 3600),
    ("45s", 45),
    ("10m", 600),
    ("12h", 12 * 3600),
    ("30d", 30 * 86400),
    (" 2 w ", 2 * 604800),
])
def test_parse_duration(value: object, expected: int) -> None:
    assert parse_duration(value) == expected


@pytest.mark.parametrize("value", [0, -5, "0d", "", "1.5h", "12 hours", "h", "3y", False, 2.0,
                                   None])
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("value", ["1.5", "0.0001 KB", "0", "5 XB"])
def test_parse_size_refuses_fractions_of_a_byte_and_nonsense(value: str) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


def test_job_name_from_a_file_name_with_a_space_is_refused(tmp_path: Path) -> None:
    raw = {"source": {"root": str(tmp_path)}, "rucio": {"scope": "s", "rse": "R"},
           "container": {"runtime": "none"}}
    with pytest.raises(ConfigError) as info:
        parse_job(raw, path=tmp_path / "my job.toml")
    assert len(info.value.lines) == 1
    assert "'my job'" in info.value.lines[0] and "[job] name" in info.value.lines[0]
    assert parse_job({**raw, "job": {"name": "my-job"}}, path=tmp_path / "my job.toml").name \
        == "my-job"


@pytest.mark.parametrize(("value", "seconds"), [
    ("30", 1800), ("10:30", 630), ("02:00:00", 7200), ("1-00", 86400), ("1-02:30", 95400),
    ("2-00:00:10", 172810)])
def test_slurm_time_seconds(value: str, seconds: int) -> None:
    from dac_upload.config import slurm_time_seconds

    assert slurm_time_seconds(value) == seconds


def test_stop_margin_must_fit_in_the_wall_time(tmp_path: Path) -> None:
    raw = {"source": {"root": str(tmp_path)}, "rucio": {"scope": "s", "rse": "R"},
           "container": {"runtime": "none"}, "slurm": {"time": "00:05:00", "stop_margin": 300}}
    with pytest.raises(ConfigError) as info:
        parse_job(raw, path=tmp_path / "j.toml")
    assert "stop_margin = 300 s must be shorter than time = '00:05:00' (300 s)" in \
        info.value.lines[0]


@pytest.mark.parametrize(("section", "key", "value"), [
    ("slurm", "mem", "2G\nrm -rf ~"), ("slurm", "partition", "icelake\r"),
    ("slurm", "extra", {"qos": "normal\necho hi"}), ("naming", "prefix", "a\nb/")])
def test_values_with_line_breaks_are_refused(tmp_path: Path, section: str, key: str,
                                             value: object) -> None:
    """A line break would end an #SBATCH line early and start a shell command."""
    raw: dict[str, dict[str, object]] = {
        "source": {"root": str(tmp_path)}, "rucio": {"scope": "s", "rse": "R"},
        "container": {"runtime": "none"}}
    raw.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError) as info:
        parse_job(raw, path=tmp_path / "j.toml")
    assert f"[{section}] {key}" in info.value.lines[0]


def test_dataset_needs_a_scope_before_the_colon(tmp_path: Path) -> None:
    raw = {"source": {"root": str(tmp_path)}, "rucio": {"scope": "s", "rse": "R",
                                                        "dataset": ":name"},
           "container": {"runtime": "none"}}
    with pytest.raises(ConfigError, match=r"\[rucio\] dataset = ':name'"):
        parse_job(raw, path=tmp_path / "j.toml")


def test_slurm_mem_bytes() -> None:
    from dac_upload.config import slurm_mem_bytes

    assert slurm_mem_bytes("2G") == 2 << 30 and slurm_mem_bytes("500") == 500 << 20
    assert slurm_mem_bytes("1.5T") == 3 << 39 and slurm_mem_bytes("64k") == 64 << 10
    assert slurm_mem_bytes("lots") is None and slurm_mem_bytes("") is None
