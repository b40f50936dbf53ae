"""credentials: where the tasks' identity comes from, what is refused, what is written."""

from __future__ import annotations

import base64
import configparser
import json
import time
from pathlib import Path
from typing import Any

import pytest
from unit_helpers import make_proxy

from dac_upload.config import ConfigError, RucioConfig, parse_job
from dac_upload.rucio import credentials
from dac_upload.rucio.credentials import Credentials, CredentialsError


def _rucio(tmp_path: Path, **keys: Any) -> RucioConfig:
    raw = {"source": {"root": str(tmp_path)},
           "rucio": {"scope": "s", "rse": "R", **keys}, "container": {"runtime": "none"}}
    return parse_job(raw, path=tmp_path / "j.toml").rucio


def _resolve(tmp_path: Path, env: dict[str, str] | None = None, **keys: Any) -> Credentials:
    return credentials.resolve(_rucio(tmp_path, **keys), env or {}, 1234, "j.toml")


def _cfg(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "rucio.cfg"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_job_file_wins_over_rucio_cfg_which_wins_over_the_environment(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "[client]\nrucio_host = https://from-cfg\nauth_type = x509_proxy\n"
                         "account = cfgacct\nca_cert = /cfg/ca\nclient_x509_proxy = /cfg/px\n")
    env = {"X509_USER_PROXY": "/env/px", "RUCIO_ACCOUNT": "envacct"}
    c = _resolve(tmp_path, env, config=str(cfg))
    assert (c.host, c.auth_host, c.account) == ("https://from-cfg", "https://from-cfg", "envacct")
    assert (c.proxy, c.ca_cert, c.base_config) == (Path("/cfg/px"), Path("/cfg/ca"), cfg)
    c = _resolve(tmp_path, env, config=str(cfg), host="https://job", account="jobacct",
                 proxy="/job/px", ca_dir="/job/ca")
    assert (c.host, c.account, c.proxy, c.ca_cert) == ("https://job", "jobacct",
                                                      Path("/job/px"), Path("/job/ca"))


def test_x509_proxy_defaults_to_the_grid_default_path(tmp_path: Path) -> None:
    c = _resolve(tmp_path, host="http://r")
    assert c.auth_type == "x509_proxy" and c.proxy == Path("/tmp/x509up_u1234")
    assert _resolve(tmp_path, {"X509_USER_PROXY": "/shared/px"}, host="http://r").proxy \
        == Path("/shared/px")
    assert c.environment() == {"X509_USER_PROXY": "/tmp/x509up_u1234"}


def test_rucio_config_env_is_the_default_base(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "[client]\nrucio_host = http://env-cfg\nauth_type = token\n")
    c = _resolve(tmp_path, {"RUCIO_CONFIG": str(cfg), "BEARER_TOKEN_FILE": "/run/bt"})
    assert (c.host, c.auth_type, c.token_file) == ("http://env-cfg", "token", Path("/run/bt"))
    assert c.environment() == {"BEARER_TOKEN_FILE": "/run/bt"}


def test_password_in_the_users_rucio_cfg_is_read_from_there_never_copied(
        tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "[client]\nrucio_host = http://r\nauth_type = userpass\n"
                         "username = jb\npassword = pa%%ss\naccount = jb\n"
                         "[policy]\nschema = generic\n")
    c = _resolve(tmp_path, config=str(cfg))
    assert (c.password_file, c.password_in_config, c.username) == (cfg, True, "jb")
    assert credentials.read_password(c) == "pa%ss"       # as Rucio reads it (interpolated)
    text = credentials.client_config_text(c, credentials.load_base(cfg))
    assert "pa%" not in text and "password" not in text.split("\n", 2)[2]
    parsed = configparser.ConfigParser(interpolation=None)
    parsed.read_string(text)
    assert dict(parsed["client"]) == {"rucio_host": "http://r", "auth_type": "userpass",
                                      "account": "jb", "auth_host": "http://r",
                                      "username": "jb"}
    assert parsed["policy"]["schema"] == "generic"       # the rest is kept as written


def test_password_file_is_read_up_to_the_first_newline(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("with space \nsecond line\n")
    c = _resolve(tmp_path, host="http://r", auth_type="userpass", username="u",
                 password_file=str(pw))
    assert credentials.read_password(c) == "with space "
    assert c.record()["password_file"] == str(pw) and "with space" not in json.dumps(c.record())


def test_resolution_problems_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError) as info:
        _resolve(tmp_path, auth_type="userpass")
    assert info.value.lines == [
        'j.toml: no Rucio server: set [rucio] host = "https://..." (or config = a rucio.cfg '
        "with rucio_host)",
        "j.toml: auth_type userpass needs [rucio] username",
        "j.toml: auth_type userpass needs [rucio] password_file = a file holding only the "
        "password, readable by you alone (chmod 600)"]
    with pytest.raises(CredentialsError) as info:
        _resolve(tmp_path, host="http://r", auth_type="token")
    assert "needs [rucio] token_file" in info.value.lines[0]
    cfg = _cfg(tmp_path, "[client]\nrucio_host = http://r\nauth_type = ssh\n")
    with pytest.raises(CredentialsError) as info:
        _resolve(tmp_path, config=str(cfg))
    assert "auth_type 'ssh'" in info.value.lines[0] and "cannot run unattended" in \
        info.value.lines[0]
    with pytest.raises(CredentialsError) as info:
        _resolve(tmp_path, config=str(tmp_path / "nope.cfg"))
    assert "does not exist" in info.value.lines[0]


def test_https_needs_a_ca_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(credentials, "DEFAULT_CA_DIR", tmp_path / "no-such-dir")
    with pytest.raises(CredentialsError) as info:
        _resolve(tmp_path, host="https://rucio.example")
    assert "uses https but no CA directory was found: set [rucio] ca_dir" in \
        info.value.lines[0]
    assert _resolve(tmp_path, {"X509_CERT_DIR": "/cvmfs/ca"},
                    host="https://rucio.example").ca_cert == Path("/cvmfs/ca")


def test_keys_of_another_auth_type_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _rucio(tmp_path, auth_type="x509_proxy", password_file="pw")
    assert info.value.lines == [
        f"{tmp_path / 'j.toml'}: [rucio] password_file is used only with auth_type = "
        "\"userpass\", not \"x509_proxy\": remove one of them"]
    with pytest.raises(ConfigError) as info:
        _rucio(tmp_path, host="rucio.example.org")
    assert "[rucio] host = 'rucio.example.org' is not valid" in info.value.lines[0]


def test_files_others_can_read_are_refused_with_the_chmod(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("x\n")
    pw.chmod(0o640)
    c = _resolve(tmp_path, host="http://r", auth_type="userpass", username="u",
                 password_file=str(pw))
    assert credentials.local_problems(c) == [
        f"password file {pw} can be read by others (mode 640): run 'chmod 600 {pw}'"]
    pw.chmod(0o600)
    assert credentials.local_problems(c) == []
    pw.unlink()
    assert credentials.local_problems(c)[0].startswith(f"password file {pw} not found: "
                                                       "create it: install -m 600")


def test_missing_proxy_and_ca_directory(tmp_path: Path) -> None:
    c = _resolve(tmp_path, host="http://r", proxy=str(tmp_path / "px"),
                 ca_dir=str(tmp_path / "ca"))
    assert credentials.local_problems(c) == [
        f"CA directory {tmp_path / 'ca'} does not exist: set [rucio] ca_dir to your site's "
        "(e.g. /etc/grid-security/certificates or "
        "/cvmfs/grid.cern.ch/etc/grid-security/certificates)",
        f"X.509 proxy {tmp_path / 'px'} not found: create it with voms-proxy-init --out "
        f"{tmp_path / 'px'} (or set [rucio] proxy)"]


def _jwt(exp: float) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    return f"{part({'alg': 'none'})}.{part({'exp': int(exp), 'sub': 'u'})}.sig"


def test_token_lifetime_from_a_jwt(tmp_path: Path) -> None:
    token = tmp_path / "bt"
    token.write_text(_jwt(time.time() - 10) + "\n")
    token.chmod(0o600)
    c = _resolve(tmp_path, host="http://r", auth_type="token", token_file=str(token))
    assert credentials.local_problems(c) == [
        f"the token in {token} has expired: renew it (your token agent, e.g. oidc-token or "
        "htgettoken, writes that file)"]
    token.write_text(_jwt(time.time() + 3600))
    assert credentials.local_problems(c) == []
    warning = credentials.expiry_warning(c, 7200, "the array")
    assert warning is not None and warning.startswith(f"the token {token} expires in 1.0 h, "
                                                      "before the array (2.0 h)")
    token.write_text("an-opaque-rucio-token")
    assert credentials.token_seconds_left(token) is None
    assert credentials.expiry_warning(c, 7200, "the array") is None


def test_proxy_expiry_warning_names_the_renewal(tmp_path: Path, proxy: Path) -> None:
    c = _resolve(tmp_path, host="http://r", proxy=str(proxy))
    assert credentials.local_problems(c) == []
    assert credentials.expiry_warning(c, 12 * 3600, "the array") is None
    warning = credentials.expiry_warning(c, 2 * 86400, "the array can finish")
    assert warning == (f"the X.509 proxy {proxy} expires in 24.0 h, before the array can "
                       "finish (48.0 h): tasks running after that will fail to authenticate; "
                       f"renew it with voms-proxy-init --valid 60:00 --out {proxy}")
    tmp_proxy = _resolve(tmp_path, host="http://r", proxy="/tmp/x509up_u1")
    assert "local to each node" in credentials.local_warnings(tmp_proxy)[0]


def test_generated_config_is_0600_and_points_the_token_cache_when_asked(
        tmp_path: Path) -> None:
    c = _resolve(tmp_path, host="http://r", proxy="/shared/px", account="jb")
    path = tmp_path / "run" / "rucio.cfg"
    path.parent.mkdir()
    text = credentials.client_config_text(c, configparser.ConfigParser(),
                                          token_cache=tmp_path / "tok")
    credentials.write_client_config(path, text)
    assert path.stat().st_mode & 0o777 == 0o600
    parsed = configparser.ConfigParser(interpolation=None)
    parsed.read(path)
    assert dict(parsed["client"]) == {
        "rucio_host": "http://r", "auth_host": "http://r", "auth_type": "x509_proxy",
        "account": "jb", "client_x509_proxy": "/shared/px",
        "auth_token_file_path": str(tmp_path / "tok")}
    assert Credentials.from_record(c.record()) == c


# ----------------------------------------------------------------------------- review fixes
def test_no_secret_from_default_section_and_no_logging_section(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "[DEFAULT]\npassword = hunter2\nsite = cam\n"
                         "[client]\nrucio_host = http://r\nauth_type = userpass\nusername = u\n"
                         "[logging]\nforceloglevelDEBUG = 1\n[upload]\npreferred_impl = x\n")
    c = _resolve(tmp_path, config=str(cfg))
    text = credentials.client_config_text(c, credentials.load_base(cfg))
    assert "hunter2" not in text and "[logging]" not in text and "forceloglevel" not in text
    parsed = configparser.ConfigParser()             # as Rucio reads it
    parsed.read_string(text)
    assert parsed["upload"]["preferred_impl"] == "x" and parsed["upload"]["site"] == "cam"


def test_percent_in_a_path_survives_rucios_interpolation(tmp_path: Path) -> None:
    c = _resolve(tmp_path, host="http://r", proxy="/shared/100%/px")
    parsed = configparser.ConfigParser()             # BasicInterpolation, like Rucio
    parsed.read_string(credentials.client_config_text(c, configparser.ConfigParser()))
    assert parsed["client"]["client_x509_proxy"] == "/shared/100%/px"


def test_variables_expand_by_whole_name_only(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "[client]\nrucio_host = http://r\nclient_x509_proxy = $HOMEDIR/px\n")
    c = _resolve(tmp_path, {"HOME": "/home/u", "X509_USER_PROXY": "/env/px"}, config=str(cfg))
    assert c.proxy == Path("/env/px")      # $HOMEDIR is not $HOME + "DIR": left unresolved
    cfg.write_text("[client]\nrucio_host = http://r\nclient_x509_proxy = ${HOME}/px\n")
    assert _resolve(tmp_path, {"HOME": "/home/u"}, config=str(cfg)).proxy == Path("/home/u/px")


def test_job_host_is_not_paired_with_another_servers_auth_host(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "[client]\nrucio_host = https://prod\nauth_host = https://prod-auth\n"
                         "ca_cert = /ca\n")
    assert _resolve(tmp_path, config=str(cfg)).auth_host == "https://prod-auth"
    assert _resolve(tmp_path, config=str(cfg), host="https://test").auth_host == "https://test"


def test_private_key_needs_600_or_400_and_secrets_must_be_yours(tmp_path: Path) -> None:
    import os

    key = tmp_path / "userkey.pem"
    key.write_text("k")
    key.chmod(0o700)
    assert credentials.secret_file_problem("private key", key) == (
        f"private key {key} can be read by others (mode 700): run 'chmod 600 {key}'")
    key.chmod(0o400)
    assert credentials.secret_file_problem("private key", key) is None
    if os.getuid() == 0:      # only root can give a file away
        os.chown(key, 65534, 65534)
        assert "belongs to another user (uid 65534)" in \
            credentials.secret_file_problem("private key", key)


def test_x509_certificate_and_key_reach_the_storage_layer(tmp_path: Path) -> None:
    c = _resolve(tmp_path, host="http://r", auth_type="x509", certificate="/g/c.pem",
                 key="/g/k.pem")
    assert c.environment() == {"X509_USER_CERT": "/g/c.pem", "X509_USER_KEY": "/g/k.pem"}


@pytest.mark.parametrize("kind, expect", [
    ("rfc", None),
    ("legacy", "is a legacy (pre-RFC 3820) Globus proxy"),
    ("plain", "is not a proxy (no RFC 3820 ProxyCertInfo extension)"),
])
def test_only_rfc3820_proxies_pass(tmp_path: Path, kind: str, expect: str | None) -> None:
    px = make_proxy(tmp_path / kind, kind)
    facts = credentials.proxy_facts(px)
    assert facts is not None and 0 < facts.seconds_left <= 86400 and facts.fqans == ()
    problem = credentials.proxy_kind_problem(px, facts, None)
    if expect is None:
        assert problem is None
    else:
        assert problem is not None and expect in problem
        assert f"voms-proxy-init -rfc --valid 96:00 --out {px}" in problem


def test_a_proxy_without_the_vo_the_job_needs(tmp_path: Path) -> None:
    px = make_proxy(tmp_path)
    facts = credentials.proxy_facts(px)
    assert facts is not None
    problem = credentials.proxy_kind_problem(px, facts, "lsst")
    assert problem == (f"the X.509 proxy {px} carries no VOMS attributes, but [rucio] voms = "
                       "'lsst' says the storage needs them: make it with voms-proxy-init "
                       f"--voms lsst -rfc --valid 96:00 --out {px}")
