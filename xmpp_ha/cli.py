"""`xmpp-ha`: run a node and administer its store and certificates.

Every command reports problems as one clear line on stderr and exit code 2
(bad usage or configuration) or 1 (the operation failed); none prints a
traceback for an expected failure.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import getpass
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from xmpp_ha.config import ConfigError, NodeConfig, default_config, load_config
from xmpp_ha.core.jid import JID, InvalidJID
from xmpp_ha.store.repository import NoSuchUser, StoreUnavailable, UserExists

T = TypeVar("T")


class CLIError(Exception):
    """An expected failure: printed as one line, exit code 1."""


# --- configuration and store -------------------------------------------------


def _node_config(args: argparse.Namespace) -> NodeConfig:
    if getattr(args, "config", None):
        config = load_config(Path(args.config))
        overrides = {key: getattr(args, key, None) for key in ("domain", "port", "data_dir")}
        if any(value is not None for value in overrides.values()):
            raise ConfigError("--domain, --port and --data-dir go without --config")
        return config
    port = getattr(args, "port", None)
    return default_config(
        domain=getattr(args, "domain", None) or "localhost",
        port=5222 if port is None else int(port),
        data_dir=Path(getattr(args, "data_dir", None) or ".xmpp-ha"),
    )


def _store_url(args: argparse.Namespace) -> str:
    if getattr(args, "store", None):
        return str(args.store)
    return _node_config(args).store.url


async def _with_store(url: str, work: Callable[..., Awaitable[T]], *, create: bool) -> T:
    from xmpp_ha.store.sql import SQLStore

    if create:
        _ensure_sqlite_dir(url)
    store = await SQLStore.open(url, create=create)
    try:
        return await work(store)
    finally:
        await store.close()


def _is_embedded(url: str) -> bool:
    from xmpp_ha.store.sql import normalize_url

    return normalize_url(url).startswith("sqlite")


def _store_exists(url: str) -> bool:
    from sqlalchemy.engine import make_url

    from xmpp_ha.store.sql import normalize_url

    if not _is_embedded(url):
        return True
    database = make_url(normalize_url(url)).database
    return bool(database) and Path(str(database)).exists()


def _ensure_sqlite_dir(url: str) -> None:
    """The embedded default creates its data directory on first use."""
    from sqlalchemy.engine import make_url

    from xmpp_ha.store.sql import normalize_url

    if _is_embedded(url):
        database = make_url(normalize_url(url)).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)


# --- commands ----------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from xmpp_ha.runtime.node import Node, prepare_embedded

    config = _node_config(args)
    if not args.config:
        prepare_embedded(config)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format=f"%(asctime)s {config.node.name} %(levelname)s %(name)s: %(message)s",
    )
    print(
        f"xmpp-ha node {config.node.name}: domain {config.node.domain}, "
        f"c2s {config.c2s.host}:{config.c2s.port} (STARTTLS), store {config.store.url}, "
        f"CA {config.tls.ca_file}",
        flush=True,
    )
    asyncio.run(Node(config).run(ready_file=Path(args.ready_file) if args.ready_file else None))
    return 0


def _username(text: str, domain: str | None = None) -> str:
    try:
        if "@" in text:
            jid = JID.parse(text)
            if domain is not None and jid.domain != domain:
                raise CLIError(f"{text}: not an account of domain {domain}")
            return jid.local
        return JID.make(text, "localhost").local
    except InvalidJID as exc:
        raise CLIError(f"{text!r} is not a valid username: {exc}") from exc


def _password(args: argparse.Namespace) -> str:
    if args.password is not None:
        return str(args.password)
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if first != getpass.getpass("again: "):
            raise CLIError("the passwords differ")
        return first
    line = sys.stdin.readline().rstrip("\n")
    if not line:
        raise CLIError("give --password, or the password on standard input")
    return line


async def _refuse_while_failed_over(url: str) -> None:
    """SPEC §5: no user is added while a node of a redundancy group is failed over."""
    from xmpp_ha.store.cluster import ClusterStore

    try:
        cluster = await ClusterStore.open(url)
    except StoreUnavailable:
        return  # no cluster schema yet: a lone node
    try:
        for group in await cluster.list_groups():
            record = group.record
            if record.failed_over or record.transition or record.failed_mode:
                raise CLIError(
                    f"cannot add users while node {record.failed_over or '?'} of group "
                    f"{group.name} is failed over (or moving users); fall back first"
                )
    finally:
        await cluster.close()


def cmd_users(args: argparse.Namespace) -> int:
    url = _store_url(args)
    create = _is_embedded(url)
    if args.users_command in ("add", "import") and not (create and not _store_exists(url)):
        asyncio.run(_refuse_while_failed_over(url))
    if args.users_command == "add":
        username, password = _username(args.username), _password(args)
        asyncio.run(_with_store(url, lambda s: s.add_user(username, password), create=create))
        print(f"added {username}")
    elif args.users_command == "passwd":
        username, password = _username(args.username), _password(args)
        asyncio.run(_with_store(url, lambda s: s.set_password(username, password), create=create))
        print(f"password of {username} changed")
    elif args.users_command == "del":
        username = _username(args.username)
        asyncio.run(_with_store(url, lambda s: s.delete_user(username), create=create))
        print(f"deleted {username}")
    elif args.users_command == "list":
        for name in asyncio.run(_with_store(url, lambda s: s.list_users(), create=create)):
            print(name)
    elif args.users_command == "import":
        accounts = list(_read_accounts(Path(args.file)))
        added = asyncio.run(_with_store(url, lambda s: s.import_users(accounts), create=create))
        print(f"imported {added} of {len(accounts)} accounts ({len(accounts) - added} existed)")
    return 0


def _read_accounts(path: Path) -> Iterator[tuple[str, str]]:
    """CSV lines `localpart,password` or `user@domain,password`; '#' starts a comment."""
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror}") from exc
    with handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) != 2 or not row[1]:
                raise CLIError(f"{path}:{number}: expected 'username,password'")
            yield _username(row[0].strip()), row[1]


def cmd_certs(args: argparse.Namespace) -> int:
    from xmpp_ha.certs import init_certs

    nodes = [name.strip() for name in args.nodes.split(",") if name.strip()]
    paths = init_certs(
        Path(args.dir), node_names=nodes, hosts=args.host or ["localhost", "127.0.0.1"],
        overwrite=args.force,
    )  # fmt: skip
    print(f"CA: {paths.ca_file}")
    for name, node in paths.nodes.items():
        print(f"{name}: {node.cert_file} (key {node.key_file})")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from xmpp_ha.store.migrations import upgrade
    from xmpp_ha.store.sql import create_engine

    url = _store_url(args)

    async def run() -> int:
        engine = create_engine(url)
        try:
            return await upgrade(engine)
        finally:
            await engine.dispose()

    _ensure_sqlite_dir(url)
    print(f"schema at version {asyncio.run(run())}")
    return 0


# --- argument parsing ----------------------------------------------------------


def _store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="node configuration (TOML)")
    parser.add_argument("--data-dir", help="embedded default's data directory (./.xmpp-ha)")
    parser.add_argument("--store", help="store URL, e.g. postgresql+asyncpg://user@host/db")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xmpp-ha", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run one node")
    serve.add_argument("--config", help="node configuration (TOML)")
    serve.add_argument("--domain", help="XMPP domain (localhost)")
    serve.add_argument("--port", type=int, help="c2s port (5222)")
    serve.add_argument("--data-dir", help="store and certificates directory (./.xmpp-ha)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--ready-file", help=argparse.SUPPRESS)
    serve.set_defaults(handler=cmd_serve)

    users = commands.add_parser("users", help="manage accounts")
    user_commands = users.add_subparsers(dest="users_command", required=True)
    for name, text in (("add", "add an account"), ("passwd", "change a password")):
        sub = user_commands.add_parser(name, help=text)
        sub.add_argument("username")
        sub.add_argument("--password", help="else read from the terminal or standard input")
        _store_options(sub)
    sub = user_commands.add_parser("del", help="delete an account and its data")
    sub.add_argument("username")
    _store_options(sub)
    _store_options(user_commands.add_parser("list", help="list accounts"))
    sub = user_commands.add_parser("import", help="import CSV lines 'username,password'")
    sub.add_argument("file")
    _store_options(sub)
    users.set_defaults(handler=cmd_users)

    certs = commands.add_parser("certs", help="certificates")
    cert_commands = certs.add_subparsers(dest="certs_command", required=True)
    init = cert_commands.add_parser("init", help="create a cluster CA and node certificates")
    init.add_argument("--dir", default="certs", help="output directory (./certs)")
    init.add_argument("--nodes", default="n1,n2", help="comma-separated node names (n1,n2)")
    init.add_argument("--host", action="append", help="host name or IP for the SAN (repeatable)")
    init.add_argument("--force", action="store_true", help="replace existing files")
    certs.set_defaults(handler=cmd_certs)

    db = commands.add_parser("db", help="the store's schema")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    _store_options(db_commands.add_parser("upgrade", help="create or upgrade the schema"))
    db.set_defaults(handler=cmd_db)

    from xmpp_ha import cli_admin

    cli_admin.add_parsers(commands)
    loadtest = commands.add_parser(
        "loadtest", help="failover under load: a pair, Locust users, a failure, a report"
    )
    try:
        from loadtests.run import add_arguments
    except ImportError:  # installed without the [load] extra
        loadtest.set_defaults(handler=_no_loadtest)
    else:
        add_arguments(loadtest)
        loadtest.set_defaults(handler=cmd_loadtest)
    return parser


def cmd_loadtest(args: argparse.Namespace) -> int:
    from loadtests.run import main as run_loadtest

    return run_loadtest(args)


def _no_loadtest(args: argparse.Namespace) -> int:
    raise CLIError("loadtest needs Locust and gevent: pip install -e '.[load]'")


def main(argv: Sequence[str] | None = None) -> int:
    from xmpp_ha.admin.client import AdminAPIError, AdminUnreachable
    from xmpp_ha.cli_admin import AdminCLIError

    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (ConfigError, ValueError) as exc:
        print(f"xmpp-ha: {exc}", file=sys.stderr)
        return 2
    except UserExists as exc:
        print(f"xmpp-ha: user {exc} already exists", file=sys.stderr)
        return 1
    except NoSuchUser as exc:
        print(f"xmpp-ha: no such user: {exc}", file=sys.stderr)
        return 1
    except (
        CLIError, AdminCLIError, AdminAPIError, AdminUnreachable, StoreUnavailable, OSError,
        RuntimeError, KeyError,
    ) as exc:  # fmt: skip
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"xmpp-ha: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
