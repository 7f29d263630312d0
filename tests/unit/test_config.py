from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from xmpp_ha.config import (
    FD_RESERVE,
    C2SSection,
    ConfigError,
    LimitsSection,
    NodeConfig,
    NodeSection,
    config_from_dict,
    default_config,
    ensure_default_certs,
    load_config,
    open_file_limit,
)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    config = default_config()
    assert config.node == NodeSection(name="n1", domain="localhost", data_dir=Path(".xmpp-ha"))
    c2s = config.c2s
    assert (c2s.host, c2s.port) == ("127.0.0.1", 5222)
    limit = open_file_limit()
    expected_max = 18_000 if limit is None else min(18_000, limit - FD_RESERVE)
    assert c2s.max_connections == expected_max
    assert (c2s.handshake_timeout, c2s.idle_timeout, c2s.ping_timeout) == (30.0, 300.0, 60.0)
    assert (c2s.max_stanza_bytes, c2s.sm_resume_timeout) == (262_144, 300.0)
    assert (c2s.auth_fail_delay, c2s.auth_fail_delay_max) == (1.0, 30.0)
    assert config.store.url == "sqlite+aiosqlite:///.xmpp-ha/store.db"
    assert config.store.create_schema is True
    assert config.tls.cert_file == Path(".xmpp-ha/certs/n1.pem")
    assert config.tls.key_file == Path(".xmpp-ha/certs/n1-key.pem")
    assert config.tls.ca_file == Path(".xmpp-ha/certs/ca.pem")
    assert config.limits == LimitsSection(offline_messages_per_user=1000, max_resources_per_user=10)
    assert config.uses_default_certs


def test_default_config_arguments(tmp_path: Path) -> None:
    config = default_config(domain="example.org", port=0, data_dir=tmp_path, name="n2")
    assert config.node.domain == "example.org" and config.node.name == "n2"
    assert config.c2s.port == 0
    assert config.store.url == f"sqlite+aiosqlite:///{tmp_path}/store.db"
    assert config.tls.cert_file == tmp_path / "certs" / "n2.pem"


def test_sections_are_frozen() -> None:
    config = default_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.c2s.port = 1  # type: ignore[misc]


def test_load_full_file(tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir()
    path = _write(
        tmp_path,
        """
[node]
name = "n2"
domain = "example.org"
data_dir = "state"

[c2s]
host = "0.0.0.0"
port = 5223
max_connections = 1000
handshake_timeout = 10
idle_timeout = 120.5
ping_timeout = 20
max_stanza_bytes = 65536
sm_resume_timeout = 0
auth_fail_delay = 0.5
auth_fail_delay_max = 8

[store]
url = "postgresql+asyncpg://xmpp@db/xmpp"
create_schema = false

[tls]
cert_file = "tls/server.pem"
key_file = "/etc/xmpp/server-key.pem"
ca_file = "tls/ca.pem"

[limits]
offline_messages_per_user = 50
max_resources_per_user = 3
""",
    )
    config = load_config(path)
    assert config.node.data_dir == tmp_path / "state"  # relative to the file
    assert config.c2s.handshake_timeout == 10.0 and isinstance(config.c2s.handshake_timeout, float)
    assert config.c2s.max_connections == 1000
    assert config.c2s.sm_resume_timeout == 0.0
    assert config.store.url == "postgresql+asyncpg://xmpp@db/xmpp"
    assert config.store.create_schema is False
    assert config.tls.cert_file == tmp_path / "tls" / "server.pem"
    assert config.tls.key_file == Path("/etc/xmpp/server-key.pem")
    assert config.tls.ca_file == tmp_path / "tls" / "ca.pem"
    assert not config.uses_default_certs
    assert config.limits.max_resources_per_user == 3


def test_empty_file_gives_defaults_under_its_directory(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, ""))
    assert config.node.data_dir == tmp_path / ".xmpp-ha"
    assert config.store.url == f"sqlite+aiosqlite:///{tmp_path}/.xmpp-ha/store.db"
    assert config.tls.ca_file == tmp_path / ".xmpp-ha" / "certs" / "ca.pem"
    assert config.uses_default_certs


def test_explicit_certs_without_ca(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, '[tls]\ncert_file = "a.pem"\nkey_file = "a-key.pem"\n'))
    assert config.tls.ca_file is None
    assert not config.uses_default_certs


BAD_VALUES: list[tuple[str, str]] = [
    ("[c2s]\nport = 70000\n", r"c2s\.port: must be in 0\.\.65535, got 70000"),
    ("[c2s]\nport = -1\n", r"c2s\.port: must be in 0\.\.65535, got -1"),
    ('[c2s]\nport = "5222"\n', r"c2s\.port: expected an integer, got '5222' \(string\)"),
    ("[c2s]\nport = 5222.0\n", r"c2s\.port: expected an integer, got 5222\.0 \(float\)"),
    ("[c2s]\nport = true\n", r"c2s\.port: expected an integer, got True \(boolean\)"),
    ("[c2s]\nhost = 127\n", r"c2s\.host: expected a string, got 127 \(integer\)"),
    ('[c2s]\nhost = ""\n', r"c2s\.host: must not be empty"),
    ("[c2s]\nmax_connections = 0\n", r"c2s\.max_connections: must be positive, got 0"),
    ("[c2s]\nhandshake_timeout = 0\n", r"c2s\.handshake_timeout: must be positive, got 0\.0"),
    ("[c2s]\nidle_timeout = -5\n", r"c2s\.idle_timeout: must be positive, got -5\.0"),
    ("[c2s]\nping_timeout = 0\n", r"c2s\.ping_timeout: must be positive"),
    ('[c2s]\nping_timeout = "60s"\n', r"c2s\.ping_timeout: expected a number, got '60s'"),
    ("[c2s]\nidle_timeout = inf\n", r"c2s\.idle_timeout: must be a finite number, got inf"),
    ("[c2s]\nmax_stanza_bytes = 0\n", r"c2s\.max_stanza_bytes: must be positive, got 0"),
    ("[c2s]\nsm_resume_timeout = -1\n", r"c2s\.sm_resume_timeout: must not be negative"),
    ("[c2s]\nauth_fail_delay = -1\n", r"c2s\.auth_fail_delay: must not be negative"),
    (
        "[c2s]\nauth_fail_delay = 40\n",
        r"c2s\.auth_fail_delay: 40\.0 is above c2s\.auth_fail_delay_max \(30\.0\)",
    ),
    ("[c2s]\nprot = 1\n", r"unknown key c2s\.prot; known keys in \[c2s\]: host, port, "),
    ("[nodes]\nname = 'x'\n", r"unknown section \[nodes\]; known sections: \[node\], "),
    ('c2s = "x"\n', r"\[c2s\] must be a table, got 'x' \(string\)"),
    ('[node]\nname = ""\n', r"node\.name: '' is not a node name"),
    ('[node]\nname = "../n1"\n', r"node\.name: '\.\./n1' is not a node name"),
    ('[node]\ndomain = "user@example.org"\n', r"node\.domain: 'user@example\.org' is not a"),
    ('[node]\ndomain = "Example.org"\n', r"node\.domain: 'Example\.org': write it in lower case"),
    ('[node]\ndata_dir = ""\n', r"node\.data_dir: expected a path \(string\), got ''"),
    ('[store]\nurl = "sqlite:///x.db"\n', r"store\.url: unsupported store 'sqlite': use one of"),
    ('[store]\ncreate_schema = "yes"\n', r"store\.create_schema: expected a boolean"),
    ('[tls]\ncert_file = "a.pem"\n', r"tls\.key_file: tls\.cert_file and tls\.key_file"),
    ('[tls]\nkey_file = "a.pem"\n', r"tls\.cert_file: tls\.cert_file and tls\.key_file"),
    ("[limits]\noffline_messages_per_user = 0\n", r"limits\.offline_messages_per_user: must be"),
    ("[limits]\nmax_resources_per_user = -1\n", r"limits\.max_resources_per_user: must be"),
    ("[limits]\nmax_resources_per_user = 1.5\n", r"limits\.max_resources_per_user: expected an"),
]


@pytest.mark.parametrize(("text", "message"), BAD_VALUES)
def test_bad_values_name_their_key(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")


def test_max_connections_must_fit_the_open_file_limit() -> None:
    limit = open_file_limit()
    if limit is None:
        pytest.skip("no open-file limit")
    C2SSection(max_connections=limit - FD_RESERVE)
    with pytest.raises(ConfigError) as info:
        C2SSection(max_connections=limit - FD_RESERVE + 1)
    message = str(info.value)
    assert message.startswith(f"c2s.max_connections: {limit - FD_RESERVE + 1} does not fit")
    assert f"RLIMIT_NOFILE is {limit}" in message
    assert f"{FD_RESERVE} descriptors are kept in reserve" in message
    assert f"at most {limit - FD_RESERVE} connections" in message


def test_construction_in_code_is_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"c2s\.port: must be in 0\.\.65535"):
        C2SSection(port=99999)
    with pytest.raises(ConfigError, match=r"c2s\.port: expected an integer"):
        C2SSection(port="5222")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"\[c2s\]: expected C2SSection"):
        dataclasses.replace(default_config(), c2s=LimitsSection())  # type: ignore[arg-type]
    config = dataclasses.replace(default_config(), c2s=C2SSection(port=0))
    assert isinstance(config, NodeConfig) and config.c2s.port == 0
    assert NodeSection(data_dir="x").data_dir == Path("x")  # type: ignore[arg-type]


def test_config_from_dict_without_base_dir() -> None:
    config = config_from_dict({"node": {"data_dir": "rel"}, "c2s": {"port": 0}})
    assert config.node.data_dir == Path("rel")
    assert config.store.url == "sqlite+aiosqlite:///rel/store.db"


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the configuration"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(_write(tmp_path, "[c2s\nport = 1\n"))
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[node]\ndomain = "\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


def test_ensure_default_certs_generates_once(tmp_path: Path) -> None:
    config = default_config(domain="example.org", data_dir=tmp_path / "data")
    assert ensure_default_certs(config) is True
    for path in (config.tls.cert_file, config.tls.key_file, config.tls.ca_file):
        assert path is not None and path.is_file()
    assert stat.S_IMODE(os.stat(config.tls.key_file).st_mode) == 0o600
    before = config.tls.cert_file.read_bytes()
    ensure_default_certs(config)
    assert config.tls.cert_file.read_bytes() == before

    from cryptography import x509

    cert = x509.load_pem_x509_certificate(before)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"example.org", "localhost", "n1"} <= set(names.get_values_for_type(x509.DNSName))


def test_ensure_default_certs_checks_explicit_files(tmp_path: Path) -> None:
    tables: dict[str, Any] = {"tls": {"cert_file": "x.pem", "key_file": "x-key.pem"}}
    config = config_from_dict(tables, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"tls\.cert_file: .*x\.pem does not exist"):
        ensure_default_certs(config)
    (tmp_path / "x.pem").write_text("cert")
    (tmp_path / "x-key.pem").write_text("key")
    assert ensure_default_certs(config) is False
