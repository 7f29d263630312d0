"""Node configuration: frozen dataclasses, loaded from TOML, checked at construction.

Rules:
- Every section is a frozen dataclass; its `__post_init__` checks the type of
  every field (from the annotations) and then its own rules. A bad value
  raises `ConfigError` naming the key as `section.key`, whether it came from
  a file or from code. Bad config never starts a node.
- TOML: unknown sections and unknown keys are errors; `int` is accepted where
  a float is expected, never `bool` for a number; strings become `Path`s.
  Relative paths in a file are relative to that file's directory.
- Defaults that depend on another section (the store URL and the TLS files
  live under `node.data_dir`) are filled in by `_derived_defaults`.
- Adding a section (e.g. `[ha]`): write a `_Section` subclass with
  `SECTION = "ha"`, and add a field to `NodeConfig` with a default factory.
  Rules that span sections go in `NodeConfig.__post_init__`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import resource
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NoReturn

__all__ = [
    "C2SSection",
    "ConfigError",
    "HASection",
    "LimitsSection",
    "NodeConfig",
    "NodeSection",
    "StoreSection",
    "TlsSection",
    "config_from_dict",
    "default_config",
    "ensure_default_certs",
    "load_config",
]

# File descriptors kept free for the store, logs, the peer link and admin API.
FD_RESERVE = 256
DEFAULT_MAX_CONNECTIONS = 18_000
CERTS_DIR_NAME = "certs"
STORE_FILE_NAME = "store.db"
_STORE_SCHEMES = ("sqlite+aiosqlite://", "postgresql+asyncpg://")
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


def open_file_limit() -> int | None:
    """The soft RLIMIT_NOFILE of this process, or None when unlimited."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def _default_max_connections() -> int:
    # The default adapts to a smaller limit; an explicit value is checked strictly.
    limit = open_file_limit()
    if limit is None:
        return DEFAULT_MAX_CONNECTIONS
    return max(1, min(DEFAULT_MAX_CONNECTIONS, limit - FD_RESERVE))


# ----------------------------------------------------------------- checking


_TYPE_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean (true or false)",
    Path: "a path (string)",
}


def _describe(value: Any) -> str:
    names = {str: "string", int: "integer", float: "float", bool: "boolean"}
    kind = names.get(type(value), type(value).__name__)
    return f"{value!r} ({kind})"


def _coerce(where: str, annotation: Any, value: Any) -> Any:
    """Return `value` as `annotation` or raise ConfigError for `where`."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        concrete = [option for option in options if option is not type(None)]
        if len(concrete) != 1:
            raise TypeError(f"{where}: unsupported annotation {annotation}")
        annotation = concrete[0]
    expected = _TYPE_NAMES.get(annotation)
    if expected is None:
        raise TypeError(f"{where}: unsupported annotation {annotation}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: must be a finite number, got {value!r}")
            return float(value)
    elif annotation is Path:
        if isinstance(value, Path):
            return value
        if isinstance(value, str) and value:
            return Path(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: expected {expected}, got {_describe(value)}")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


@dataclass(frozen=True)
class _Section:
    """Base of every section: type checks from the annotations, then `_validate`."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for item in dataclasses.fields(self):
            where = f"{self.SECTION}.{item.name}"
            value = _coerce(where, hints[item.name], getattr(self, item.name))
            object.__setattr__(self, item.name, value)
        self._validate()

    def _validate(self) -> None:
        """Section rules; raise with `self._fail(key, message)`."""

    def _fail(self, key: str, message: str) -> NoReturn:
        raise ConfigError(f"{self.SECTION}.{key}: {message}")

    def _positive(self, *keys: str) -> None:
        for key in keys:
            value = getattr(self, key)
            if value <= 0:
                self._fail(key, f"must be positive, got {value!r}")

    def _not_negative(self, *keys: str) -> None:
        for key in keys:
            value = getattr(self, key)
            if value < 0:
                self._fail(key, f"must not be negative, got {value!r}")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(item.name for item in dataclasses.fields(cls))

    @classmethod
    def path_keys(cls) -> tuple[str, ...]:
        hints = _hints(cls)
        return tuple(
            name
            for name in cls.keys()
            if hints[name] is Path or Path in typing.get_args(hints[name])
        )


# ----------------------------------------------------------------- sections


@dataclass(frozen=True)
class NodeSection(_Section):
    SECTION: ClassVar[str] = "node"

    name: str = "n1"  # node id: log prefix, certificate file name, peer identity
    domain: str = "localhost"  # the XMPP domain this node serves
    data_dir: Path = Path(".xmpp-ha")  # the embedded store and generated certificates

    def _validate(self) -> None:
        if not _NODE_NAME.match(self.name):
            self._fail(
                "name",
                f"{self.name!r} is not a node name: use 1-63 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit",
            )
        domain = self.domain
        if not domain or domain != domain.strip() or any(c in domain for c in "@/ \t\r\n"):
            self._fail("domain", f"{domain!r} is not a domain name (no '@', '/' or spaces)")
        if domain != domain.lower() or domain.endswith("."):
            self._fail("domain", f"{domain!r}: write it in lower case without a trailing dot")
        if len(domain.encode()) > 253:
            self._fail("domain", "longer than 253 bytes")


@dataclass(frozen=True)
class C2SSection(_Section):
    SECTION: ClassVar[str] = "c2s"

    host: str = "127.0.0.1"  # listen address
    port: int = 5222  # 0 picks a free port (tests)
    max_connections: int = field(default_factory=_default_max_connections)
    handshake_timeout: float = 30.0  # TCP connect to authenticated and bound
    idle_timeout: float = 300.0  # silence before the server pings
    ping_timeout: float = 60.0  # unanswered ping before the stream is closed
    max_stanza_bytes: int = 262_144
    sm_resume_timeout: float = 300.0  # XEP-0198 resumption window; 0 disables resumption
    auth_fail_delay: float = 1.0  # base delay, doubling per consecutive failure from one IP
    auth_fail_delay_max: float = 30.0  # cap of that delay

    def _validate(self) -> None:
        if not self.host:
            self._fail("host", "must not be empty")
        if not 0 <= self.port <= 65535:
            self._fail("port", f"must be in 0..65535, got {self.port}")
        self._positive(
            "max_connections",
            "handshake_timeout",
            "idle_timeout",
            "ping_timeout",
            "max_stanza_bytes",
        )
        self._not_negative("sm_resume_timeout", "auth_fail_delay", "auth_fail_delay_max")
        if self.auth_fail_delay > self.auth_fail_delay_max:
            self._fail(
                "auth_fail_delay",
                f"{self.auth_fail_delay} is above c2s.auth_fail_delay_max "
                f"({self.auth_fail_delay_max})",
            )
        limit = open_file_limit()
        if limit is not None and self.max_connections > limit - FD_RESERVE:
            self._fail(
                "max_connections",
                f"{self.max_connections} does not fit the open-file limit: the soft "
                f"RLIMIT_NOFILE is {limit} and {FD_RESERVE} descriptors are kept in "
                f"reserve, so at most {max(0, limit - FD_RESERVE)} connections; lower "
                "c2s.max_connections or raise the limit (ulimit -n)",
            )


@dataclass(frozen=True)
class StoreSection(_Section):
    SECTION: ClassVar[str] = "store"

    url: str  # default: sqlite+aiosqlite:///<data_dir>/store.db
    create_schema: bool = True  # create or migrate the schema at start

    def _validate(self) -> None:
        if not self.url.startswith(_STORE_SCHEMES):
            scheme = self.url.split("://", 1)[0] if "://" in self.url else self.url
            self._fail(
                "url",
                f"unsupported store {scheme!r}: use one of "
                + ", ".join(s + "..." for s in _STORE_SCHEMES),
            )


@dataclass(frozen=True)
class TlsSection(_Section):
    SECTION: ClassVar[str] = "tls"

    cert_file: Path  # default: <data_dir>/certs/<node name>.pem
    key_file: Path  # default: <data_dir>/certs/<node name>-key.pem
    ca_file: Path | None = None  # the cluster CA; default <data_dir>/certs/ca.pem


@dataclass(frozen=True)
class LimitsSection(_Section):
    SECTION: ClassVar[str] = "limits"

    offline_messages_per_user: int = 1000
    max_resources_per_user: int = 10

    def _validate(self) -> None:
        self._positive("offline_messages_per_user", "max_resources_per_user")


@dataclass(frozen=True)
class HASection(_Section):
    """Membership of a presence redundancy group (SPEC §1, §4)."""

    SECTION: ClassVar[str] = "ha"

    enabled: bool = False  # run the SRM, the peer link and the admin API
    advertise_host: str = "127.0.0.1"  # where clients and the peer reach this node
    service_port: int = 22001  # the peer link (SRM heartbeats); 0 picks a free port
    admin_host: str = "127.0.0.1"  # admin RPC listen address
    admin_port: int = 20075  # admin RPC port; 0 picks a free port
    admin_token_file: Path | None = None  # default <data_dir>/admin-token

    def _validate(self) -> None:
        for key in ("service_port", "admin_port"):
            value = getattr(self, key)
            if not 0 <= value <= 65535:
                self._fail(key, f"must be in 0..65535, got {value}")
        for key in ("advertise_host", "admin_host"):
            if not getattr(self, key):
                self._fail(key, "must not be empty")


def _section_field(cls: type[_Section]) -> Any:
    return field(default_factory=cls)


@dataclass(frozen=True)
class NodeConfig:
    """One node's configuration. Every field is a section of the TOML file."""

    node: NodeSection
    store: StoreSection
    tls: TlsSection
    c2s: C2SSection = _section_field(C2SSection)
    limits: LimitsSection = _section_field(LimitsSection)
    ha: HASection = _section_field(HASection)

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            expected = _section_types()[item.name]
            if not isinstance(value, expected):
                raise ConfigError(f"[{item.name}]: expected {expected.__name__}, got {value!r}")

    @property
    def uses_default_certs(self) -> bool:
        """True when the TLS files are the generated defaults under data_dir."""
        tls = self.tls
        return (tls.cert_file, tls.key_file, tls.ca_file) == _default_tls_files(self.node)

    @property
    def admin_token_file(self) -> Path:
        return self.ha.admin_token_file or self.node.data_dir / "admin-token"


@functools.cache
def _section_types() -> dict[str, type[_Section]]:
    hints = _hints(NodeConfig)
    return {item.name: hints[item.name] for item in dataclasses.fields(NodeConfig)}


def _default_tls_files(node: NodeSection) -> tuple[Path, Path, Path]:
    certs = node.data_dir / CERTS_DIR_NAME
    return certs / f"{node.name}.pem", certs / f"{node.name}-key.pem", certs / "ca.pem"


def _derived_defaults(node: NodeSection) -> dict[str, dict[str, Any]]:
    """Defaults of keys that depend on [node]."""
    cert_file, key_file, ca_file = _default_tls_files(node)
    return {
        "store": {"url": f"sqlite+aiosqlite:///{node.data_dir / STORE_FILE_NAME}"},
        "tls": {"cert_file": cert_file, "key_file": key_file, "ca_file": ca_file},
    }


# ----------------------------------------------------------------- building


def _plain_default(cls: type[_Section], key: str) -> Any:
    for item in dataclasses.fields(cls):
        if item.name == key and item.default is not dataclasses.MISSING:
            return item.default
    return None


def config_from_dict(data: dict[str, Any], *, base_dir: Path | None = None) -> NodeConfig:
    """Build a NodeConfig from parsed TOML tables.

    `base_dir`: relative paths, given or default, are taken relative to it
    (the config file's directory); None leaves them relative to the working
    directory.
    """
    section_types = _section_types()
    unknown = sorted(set(data) - set(section_types))
    if unknown:
        known = ", ".join(f"[{name}]" for name in section_types)
        raise ConfigError(f"unknown section [{unknown[0]}]; known sections: {known}")
    tables: dict[str, dict[str, Any]] = {}
    for name, cls in section_types.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}] must be a table, got {_describe(table)}")
        extra = sorted(set(table) - set(cls.keys()))
        if extra:
            raise ConfigError(
                f"unknown key {name}.{extra[0]}; known keys in [{name}]: {', '.join(cls.keys())}"
            )
        tables[name] = dict(table)
        if base_dir is not None:
            for key in cls.path_keys():
                value = tables[name].get(key, _plain_default(cls, key))
                if isinstance(value, str | Path) and str(value) and not Path(value).is_absolute():
                    tables[name][key] = base_dir / value

    node = NodeSection(**tables["node"])
    tls_table = tables["tls"]
    if ("cert_file" in tls_table) != ("key_file" in tls_table):
        missing = "key_file" if "cert_file" in tls_table else "cert_file"
        raise ConfigError(f"tls.{missing}: tls.cert_file and tls.key_file are given together")
    derived = _derived_defaults(node)
    if "cert_file" in tls_table:
        # Explicit certificates: the CA is whatever the file says, or none.
        derived["tls"] = {"ca_file": None}
    sections: dict[str, _Section] = {"node": node}
    for name, cls in section_types.items():
        if name != "node":
            sections[name] = cls(**{**derived.get(name, {}), **tables[name]})
    return NodeConfig(**sections)  # type: ignore[arg-type]


def load_config(path: Path) -> NodeConfig:
    """Read and check a TOML configuration file."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    try:
        return config_from_dict(data, base_dir=path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def default_config(
    *,
    domain: str = "localhost",
    port: int = 5222,
    data_dir: Path = Path(".xmpp-ha"),
    name: str = "n1",
) -> NodeConfig:
    """The embedded configuration: SQLite store and generated certs under data_dir."""
    return config_from_dict(
        {
            "node": {"name": name, "domain": domain, "data_dir": data_dir},
            "c2s": {"port": port},
        }
    )


def ensure_default_certs(config: NodeConfig, *, hosts: list[str] | None = None) -> bool:
    """Create the default CA and node certificate when they are missing.

    Only for `uses_default_certs` configurations; explicit files are checked
    to exist instead. Returns True when the default certs are in use.
    """
    if not config.uses_default_certs:
        for key in ("cert_file", "key_file", "ca_file"):
            path = getattr(config.tls, key)
            if path is not None and not path.is_file():
                raise ConfigError(f"tls.{key}: {path} does not exist")
        return False
    from xmpp_ha.certs import init_certs  # cryptography is loaded only when needed

    names = hosts if hosts is not None else ["localhost", "127.0.0.1"]
    wanted = [config.node.domain, *names]
    if config.c2s.host not in ("0.0.0.0", "::", ""):
        wanted.append(config.c2s.host)
    unique = list(dict.fromkeys(wanted))
    certs_dir = config.tls.cert_file.parent
    init_certs(certs_dir, node_names=[config.node.name], hosts=unique)
    return True
