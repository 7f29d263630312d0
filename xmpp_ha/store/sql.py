"""SQLStore: the Repository on SQLAlchemy 2 async, over SQLite or PostgreSQL.

Rules:
- Usernames are case-folded XMPP localparts. Creating users (`add_user`,
  `import_users`) validates names and raises ValueError for an invalid one;
  every other method only case-folds, so an invalid name is an unknown user.
- Reads about an unknown user return empty results (False, None, [], 0);
  writes raise NoSuchUser, except `store_offline_many`, which skips them.
- Every write is one transaction that first locks the user's row (SELECT ...
  FOR UPDATE on PostgreSQL; on SQLite, BEGIN IMMEDIATE takes the write lock
  for the whole file). Two nodes writing for one user therefore serialize:
  the offline limit holds, `take_offline` never hands a stanza out twice, and
  a roster version is never reused.
- SQLite is shared by both node processes: WAL journal, busy_timeout 5000 ms,
  foreign keys on, set on every new connection.
- Database failures (unreachable, locked, driver errors) surface as
  StoreUnavailable naming the store, password hidden.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self, cast

from sqlalchemy import Connection, delete, event, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from xmpp_ha.core.jid import JID, InvalidJID
from xmpp_ha.protocol.scram import DEFAULT_ITERATIONS, HASHES, derive_credentials
from xmpp_ha.store.migrations import (
    BEGIN_OPTION,
    CURRENT_SCHEMA_VERSION,
    SchemaMismatch,
    schema_version,
    upgrade,
)
from xmpp_ha.store.repository import (
    NoSuchUser,
    PendingSubscription,
    RosterItem,
    ScramCredentials,
    ScramMechanism,
    StoreUnavailable,
    Subscription,
    UserExists,
)
from xmpp_ha.store.schema import (
    USER_TABLES,
    offline_messages,
    pending_subscriptions,
    roster_items,
    roster_versions,
    scram_credentials,
    users,
)
from xmpp_ha.store.turns import turns_for

__all__ = ["SQLStore", "SchemaMismatch", "create_engine", "normalize_url", "validate_username"]

SQLITE_BUSY_TIMEOUT_MS = 5000
PG_CONNECT_TIMEOUT_S = 5.0
SALT_BYTES = 16
MECHANISMS: tuple[ScramMechanism, ...] = tuple(HASHES)
_IN_CHUNK = 500  # names per IN (...) list: well under both databases' parameter limits
_LOAD_CHUNK = 5000  # names per _LOAD_USERS_SQL (twice the parameters: under SQLite's 32766)
_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}
_WRITE = {BEGIN_OPTION: "BEGIN IMMEDIATE"}

Row = dict[str, Any]


def normalize_url(text: str) -> str:
    """A store URL for the async driver; a bare path means a SQLite file."""
    text = text.strip()
    if not text:
        raise ValueError("empty store URL")
    if "://" not in text:
        return "sqlite+aiosqlite:///" + str(Path(text).expanduser().resolve())
    try:
        url = make_url(text)
    except ArgumentError as exc:
        raise ValueError(f"invalid store URL {text!r}: {exc}") from None
    backend = url.drivername.partition("+")[0]
    if backend not in _ASYNC_DRIVERS:
        raise ValueError(f"unsupported store URL {text!r}: use sqlite:// or postgresql://")
    return url.set(drivername=_ASYNC_DRIVERS[backend]).render_as_string(hide_password=False)


def validate_username(username: str) -> str:
    """The case-folded localpart, or ValueError saying why `username` is not one."""
    try:
        local = JID.make(username, "localhost").local
    except InvalidJID as exc:
        raise ValueError(f"invalid username {username!r}: {exc}") from None
    if not local:
        raise ValueError("invalid username '': empty localpart")
    return local


def _sqlite_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    # We emit BEGIN ourselves (see _sqlite_begin): sqlite3's own transaction
    # handling skips BEGIN for SELECT and DDL, which breaks count-then-insert.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    for pragma in (
        f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}",
        "PRAGMA journal_mode = WAL",
        "PRAGMA foreign_keys = ON",
    ):
        cursor.execute(pragma)
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    connection.exec_driver_sql(connection.get_execution_options().get(BEGIN_OPTION, "BEGIN"))


def create_engine(url: str, *, pool_size: int | None = None) -> AsyncEngine:
    """An async engine for `url` (normalized), with the SQLite settings above.
    `pool_size`: connections kept (SQLAlchemy's default otherwise), none beyond."""
    url = normalize_url(url)
    pool: dict[str, Any] = {} if pool_size is None else {"pool_size": pool_size, "max_overflow": 0}
    if url.startswith("sqlite"):
        # a local file never goes stale: no pre-ping; every use commits or rolls back
        # itself, so the pool's extra ROLLBACK on return is a wasted thread hand-off
        engine = create_async_engine(url, pool_reset_on_return=None, **pool)
        event.listen(engine.sync_engine, "connect", _sqlite_connect)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
        return engine
    return create_async_engine(
        url, pool_pre_ping=True, connect_args={"timeout": PG_CONNECT_TIMEOUT_S}, **pool
    )


def _credential_rows(username: str, password: str) -> list[Row]:
    rows = []
    for mechanism in MECHANISMS:
        try:
            secrets = derive_credentials(
                password, mechanism, os.urandom(SALT_BYTES), DEFAULT_ITERATIONS
            )
        except ValueError as exc:
            raise ValueError(f"password for {username!r}: {exc}") from None
        rows.append(
            {
                "username": username,
                "mechanism": mechanism,
                "salt": secrets.salt,
                "iterations": secrets.iterations,
                "stored_key": secrets.stored_key,
                "server_key": secrets.server_key,
            }
        )
    return rows


def _derive_chunk(accounts: list[tuple[str, str]]) -> list[Row]:
    """Runs in a worker process."""
    return [row for username, password in accounts for row in _credential_rows(username, password)]


async def _derive_in_processes(accounts: list[tuple[str, str]]) -> list[Row]:
    workers = os.cpu_count() or 1
    # A few chunks per worker keeps them all busy to the end without paying
    # a round trip per account.
    size = max(1, min(250, -(-len(accounts) // (workers * 4))))
    chunks = [accounts[start : start + size] for start in range(0, len(accounts), size)]
    loop = asyncio.get_running_loop()
    # spawn, not fork: the parent runs an event loop and driver threads.
    pool = ProcessPoolExecutor(
        max_workers=min(workers, len(chunks)), mp_context=multiprocessing.get_context("spawn")
    )
    try:
        results = await asyncio.gather(
            *(loop.run_in_executor(pool, _derive_chunk, chunk) for chunk in chunks)
        )
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return [row for rows in results for row in rows]


def _chunks(names: Sequence[str], size: int = _IN_CHUNK) -> Iterable[Sequence[str]]:
    return (names[start : start + size] for start in range(0, len(names), size))


def _insert_ignoring_duplicates(connection: AsyncConnection) -> Any:
    """INSERT INTO users ... ON CONFLICT DO NOTHING RETURNING username, per dialect."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    return dialect.insert(users).on_conflict_do_nothing().returning(users.c.username)


def _roster_item(row: Any) -> RosterItem:
    return _roster_item_of(row.contact, row.name, row.subscription, row.ask, row.approved,
                           row.groups)  # fmt: skip


def _roster_item_of(
    contact: str, name: str, subscription: str, ask: Any, approved: Any, groups: str
) -> RosterItem:
    return RosterItem(
        contact=contact,
        name=name,
        subscription=cast(Subscription, subscription),
        ask=bool(ask),
        approved=bool(approved),
        groups=tuple(json.loads(groups)),
    )


# The login path's reads as plain SQL, for `_sqlite_rows` (one driver call each).
_CREDENTIALS_SQL = (
    "SELECT salt, iterations, stored_key, server_key FROM scram_credentials"
    " WHERE username = ? AND mechanism = ?"
)
_ROSTER_SQL = (
    "SELECT contact, name, subscription, ask, approved, groups FROM roster_items"
    " WHERE owner = ? ORDER BY contact"
)
_PENDING_SQL = "SELECT contact, stanza FROM pending_subscriptions WHERE owner = ? ORDER BY contact"
# rosters ('r') and pending requests ('p') of many users, in one statement
_LOAD_USERS_SQL = (
    "SELECT 'r', owner, contact, name, subscription, ask, approved, groups, NULL"
    " FROM roster_items WHERE owner IN ({marks})"
    " UNION ALL SELECT 'p', owner, contact, NULL, NULL, NULL, NULL, NULL, stanza"
    " FROM pending_subscriptions WHERE owner IN ({marks})"
    " ORDER BY 2, 3"
)
_OFFLINE_PROBE_SQL = "SELECT 1 FROM offline_messages WHERE username = ? LIMIT 1"
_USER_EXISTS_SQL = "SELECT 1 FROM users WHERE username = ?"


async def _roster_of(conn: AsyncConnection, name: str) -> list[RosterItem]:
    query = (
        select(roster_items).where(roster_items.c.owner == name).order_by(roster_items.c.contact)
    )
    return [_roster_item(row) for row in await conn.execute(query)]


async def _pending_of(conn: AsyncConnection, name: str) -> list[PendingSubscription]:
    query = (
        select(pending_subscriptions.c.contact, pending_subscriptions.c.stanza)
        .where(pending_subscriptions.c.owner == name)
        .order_by(pending_subscriptions.c.contact)
    )
    return [PendingSubscription(row.contact, row.stanza) for row in await conn.execute(query)]


class EngineStore:
    """An engine with the store's rules: connect/upgrade, errors as StoreUnavailable,
    transactions (writes start with BEGIN IMMEDIATE on SQLite, see _WRITE)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._writer = engine.execution_options(**_WRITE)
        self._where = f"store {engine.url.render_as_string(hide_password=True)}"
        self._postgres = engine.dialect.name == "postgresql"
        database = engine.url.database
        self._sqlite_file = (
            str(Path(database).resolve())
            if engine.dialect.name == "sqlite" and database and database != ":memory:"
            else None
        )

    @classmethod
    async def open(cls, url: str, *, create: bool = False, pool_size: int | None = None) -> Self:
        """Connect; `create` creates or upgrades the schema, else it must be current.
        `pool_size`: see `create_engine`.

        Raises SchemaMismatch (a StoreUnavailable) when the schema is missing or
        at another version, StoreUnavailable when the store cannot be reached.
        """
        engine = create_engine(url, pool_size=pool_size)
        store = cls(engine)
        try:
            database = engine.url.database or ":memory:"
            on_disk = engine.dialect.name == "sqlite" and database != ":memory:"
            if on_disk and not create and not Path(database).exists():
                # sqlite would create an empty file; say what is wrong instead.
                raise StoreUnavailable(f"{store._where}: no such database file")
            async with store._failures():
                if create:
                    await upgrade(engine)
                else:
                    found = await schema_version(engine)
                    if found != CURRENT_SCHEMA_VERSION:
                        raise SchemaMismatch(found, CURRENT_SCHEMA_VERSION, store._where)
        except BaseException:
            await engine.dispose()
            raise
        return store

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def close(self) -> None:
        await self._engine.dispose()

    @asynccontextmanager
    async def _failures(self) -> AsyncIterator[None]:
        try:
            yield
        except DBAPIError as exc:
            origin = exc.orig if exc.orig is not None else exc
            raise StoreUnavailable(f"{self._where}: {type(origin).__name__}: {origin}") from exc
        except (PoolTimeout, OSError) as exc:
            raise StoreUnavailable(f"{self._where}: {type(exc).__name__}: {exc}") from exc

    async def _sqlite_rows(self, sql: str, params: tuple[Any, ...]) -> list[Any] | None:
        """One read statement straight on the SQLite driver: one thread hand-off instead of
        the five (BEGIN, execute, fetch, COMMIT, return) a SQLAlchemy transaction costs.
        For the login path's reads; None on other dialects (callers then use SQLAlchemy)."""
        if self._engine.dialect.name != "sqlite":
            return None
        try:
            async with self._failures(), self._engine.connect() as conn:
                driver = (await conn.get_raw_connection()).driver_connection
                assert driver is not None
                return list(await driver.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{self._where}: {type(exc).__name__}: {exc}") from exc

    @asynccontextmanager
    async def _transaction(
        self, *, write: bool = False, lock: int | None = None, urgent: bool = False
    ) -> AsyncIterator[AsyncConnection]:
        """`lock`: a PostgreSQL advisory lock held for the transaction (SQLite's writer
        lock already serialises writes). On SQLite a write first waits for its turn
        among this process's writers (store/turns.py); `urgent` ones go first."""
        if write and self._sqlite_file is not None:
            # the turn is taken with a pooled connection in hand: a writer waiting for
            # the pool must not hold up the writers behind it
            async with self._failures(), self._writer.connect() as conn:
                async with turns_for(self._sqlite_file).turn(urgent=urgent), conn.begin():
                    yield conn
            return
        async with self._failures(), (self._writer if write else self._engine).begin() as conn:
            if lock is not None and self._postgres:
                await conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({lock})")
            yield conn


class SQLStore(EngineStore):
    """The shared store; see the module docstring for its rules."""

    async def _lock_user(self, connection: AsyncConnection, name: str) -> None:
        query = select(users.c.username).where(users.c.username == name).with_for_update()
        if (await connection.execute(query)).first() is None:
            raise NoSuchUser(name)

    # users and credentials

    async def add_user(self, username: str, password: str) -> None:
        name = validate_username(username)
        credentials = await asyncio.to_thread(_credential_rows, name, password)
        async with self._transaction(write=True) as conn:
            added = await conn.execute(_insert_ignoring_duplicates(conn), [{"username": name}])
            if added.first() is None:
                raise UserExists(name)
            await conn.execute(insert(scram_credentials), credentials)
            await conn.execute(insert(roster_versions), [{"owner": name, "version": 0}])

    async def set_password(self, username: str, password: str) -> None:
        name = username.casefold()
        credentials = await asyncio.to_thread(_credential_rows, name, password)
        async with self._transaction(write=True) as conn:
            await self._lock_user(conn, name)
            await conn.execute(
                delete(scram_credentials).where(scram_credentials.c.username == name)
            )
            await conn.execute(insert(scram_credentials), credentials)

    async def delete_user(self, username: str) -> None:
        """Delete the user and every row that belongs to it."""
        name = username.casefold()
        async with self._transaction(write=True) as conn:
            await self._lock_user(conn, name)
            for table, column in USER_TABLES:
                await conn.execute(delete(table).where(table.c[column] == name))
            await conn.execute(delete(users).where(users.c.username == name))

    async def user_exists(self, username: str) -> bool:
        name = username.casefold()
        found = await self._sqlite_rows(_USER_EXISTS_SQL, (name,))
        if found is None:
            query = select(users.c.username).where(users.c.username == name)
            async with self._transaction() as conn:
                found = list((await conn.execute(query)).all())
        return bool(found)

    async def list_users(self) -> list[str]:
        async with self._transaction() as conn:
            return list(await conn.scalars(select(users.c.username).order_by(users.c.username)))

    async def import_users(self, accounts: Iterable[tuple[str, str]]) -> int:
        """Create every account not already present; return how many were added.

        All usernames are validated before anything is written: an invalid
        name, or a password SASLprep refuses, raises ValueError and adds
        nobody. Names are case-folded; when the input names a user twice the
        first entry wins. Existing users are skipped and keep their password.
        Credentials (PBKDF2, ~2 ms an account) are derived in a process pool,
        then all rows are inserted in one transaction.
        """
        wanted: dict[str, str] = {}
        for username, password in accounts:
            wanted.setdefault(validate_username(username), password)
        existing = await self._existing_users(list(wanted))
        new = [(name, password) for name, password in wanted.items() if name not in existing]
        if not new:
            return 0
        credentials = await _derive_in_processes(new)
        async with self._transaction(write=True) as conn:
            # Another node may have added some of these meanwhile: keep theirs.
            result = await conn.execute(
                _insert_ignoring_duplicates(conn), [{"username": name} for name, _ in new]
            )
            added = set(result.scalars())
            if added:
                await conn.execute(
                    insert(scram_credentials),
                    [row for row in credentials if row["username"] in added],
                )
                await conn.execute(
                    insert(roster_versions), [{"owner": name, "version": 0} for name in added]
                )
        return len(added)

    async def _existing_users(self, names: Sequence[str]) -> set[str]:
        found: set[str] = set()
        async with self._transaction() as conn:
            for chunk in _chunks(names):
                query = select(users.c.username).where(users.c.username.in_(chunk))
                found.update(await conn.scalars(query))
        return found

    async def get_credentials(
        self, username: str, mechanism: ScramMechanism
    ) -> ScramCredentials | None:
        name = username.casefold()
        rows = await self._sqlite_rows(_CREDENTIALS_SQL, (name, mechanism))
        if rows is None:
            query = select(
                scram_credentials.c.salt, scram_credentials.c.iterations,
                scram_credentials.c.stored_key, scram_credentials.c.server_key,
            ).where(scram_credentials.c.username == name,
                    scram_credentials.c.mechanism == mechanism)  # fmt: skip
            async with self._transaction() as conn:
                rows = list((await conn.execute(query)).all())
        if not rows:
            return None
        salt, iterations, stored_key, server_key = rows[0]
        return ScramCredentials(
            mechanism, bytes(salt), int(iterations), bytes(stored_key), bytes(server_key)
        )

    # roster (RFC 6121 §2) and subscriptions (§3)

    async def get_roster(self, username: str) -> list[RosterItem]:
        async with self._transaction() as conn:
            return await _roster_of(conn, username.casefold())

    async def load_user(self, username: str) -> tuple[list[RosterItem], list[PendingSubscription]]:
        """What a session needs at login, in one read: the roster and pending requests."""
        name = username.casefold()
        roster_rows = await self._sqlite_rows(_ROSTER_SQL, (name,))
        pending_rows = await self._sqlite_rows(_PENDING_SQL, (name,))
        if roster_rows is not None and pending_rows is not None:
            roster = [_roster_item_of(*row) for row in roster_rows]
            return roster, [PendingSubscription(*row) for row in pending_rows]
        async with self._transaction() as conn:
            return await _roster_of(conn, name), await _pending_of(conn, name)

    async def load_users(
        self, usernames: Sequence[str]
    ) -> list[tuple[list[RosterItem], list[PendingSubscription]]]:
        """`load_user` for many users at once (a login storm, a failover): two reads."""
        if len(usernames) == 1:
            return [await self.load_user(usernames[0])]
        names = [username.casefold() for username in usernames]
        rosters: dict[str, list[RosterItem]] = {name: [] for name in names}
        pending: dict[str, list[PendingSubscription]] = {name: [] for name in names}
        if self._engine.dialect.name == "sqlite":
            # one driver call per chunk (a failover's thousands of activations wait on it)
            for chunk in _chunks(sorted(rosters), _LOAD_CHUNK):
                marks = ", ".join("?" * len(chunk))
                rows = await self._sqlite_rows(
                    _LOAD_USERS_SQL.format(marks=marks), (*chunk, *chunk)
                )
                for kind, owner, contact, *fields in rows or ():
                    if kind == "r":
                        rosters[owner].append(_roster_item_of(contact, *fields[:5]))
                    else:
                        pending[owner].append(PendingSubscription(contact, fields[5]))
            return [(rosters[name], pending[name]) for name in names]
        async with self._transaction() as conn:
            for chunk in _chunks(sorted(rosters)):
                query = (
                    select(roster_items)
                    .where(roster_items.c.owner.in_(chunk))
                    .order_by(roster_items.c.owner, roster_items.c.contact)
                )
                for row in await conn.execute(query):
                    rosters[row.owner].append(_roster_item(row))
                requests = (
                    select(pending_subscriptions)
                    .where(pending_subscriptions.c.owner.in_(chunk))
                    .order_by(pending_subscriptions.c.owner, pending_subscriptions.c.contact)
                )
                for row in await conn.execute(requests):
                    pending[row.owner].append(PendingSubscription(row.contact, row.stanza))
        return [(list(rosters[name]), list(pending[name])) for name in names]

    async def get_roster_item(self, username: str, contact: str) -> RosterItem | None:
        query = select(roster_items).where(
            roster_items.c.owner == username.casefold(), roster_items.c.contact == contact
        )
        async with self._transaction() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else _roster_item(row)

    async def put_roster_item(self, username: str, item: RosterItem) -> None:
        """Add or replace the item for `item.contact`; bumps the roster version."""
        name = username.casefold()
        values = {
            "name": item.name,
            "subscription": item.subscription,
            "ask": item.ask,
            "approved": item.approved,
            "groups": json.dumps(list(item.groups)),
        }
        async with self._transaction(write=True) as conn:
            await self._lock_user(conn, name)
            updated = await conn.execute(
                update(roster_items)
                .where(roster_items.c.owner == name, roster_items.c.contact == item.contact)
                .values(values)
            )
            if updated.rowcount == 0:
                await conn.execute(
                    insert(roster_items).values(owner=name, contact=item.contact, **values)
                )
            await self._bump_roster_version(conn, name)

    async def remove_roster_item(self, username: str, contact: str) -> None:
        """Remove the item if present (and then bump the roster version)."""
        name = username.casefold()
        async with self._transaction(write=True) as conn:
            await self._lock_user(conn, name)
            removed = await conn.execute(
                delete(roster_items).where(
                    roster_items.c.owner == name, roster_items.c.contact == contact
                )
            )
            if removed.rowcount:
                await self._bump_roster_version(conn, name)

    async def _bump_roster_version(self, connection: AsyncConnection, name: str) -> None:
        await connection.execute(
            update(roster_versions)
            .where(roster_versions.c.owner == name)
            .values(version=roster_versions.c.version + 1)
        )

    async def roster_version(self, username: str) -> int:
        query = select(roster_versions.c.version).where(
            roster_versions.c.owner == username.casefold()
        )
        async with self._transaction() as conn:
            version = await conn.scalar(query)
        return 0 if version is None else int(version)

    async def add_pending_subscription(self, username: str, request: PendingSubscription) -> None:
        """Record the request; a newer request from the same contact replaces the stanza."""
        name = username.casefold()
        match = (pending_subscriptions.c.owner == name) & (
            pending_subscriptions.c.contact == request.contact
        )
        async with self._transaction(write=True) as conn:
            await self._lock_user(conn, name)
            updated = await conn.execute(
                update(pending_subscriptions).where(match).values(stanza=request.stanza)
            )
            if updated.rowcount == 0:
                await conn.execute(
                    insert(pending_subscriptions).values(
                        owner=name, contact=request.contact, stanza=request.stanza
                    )
                )

    async def remove_pending_subscription(self, username: str, contact: str) -> None:
        name = username.casefold()
        async with self._transaction(write=True) as conn:
            await self._lock_user(conn, name)
            await conn.execute(
                delete(pending_subscriptions).where(
                    pending_subscriptions.c.owner == name,
                    pending_subscriptions.c.contact == contact,
                )
            )

    async def get_pending_subscriptions(self, username: str) -> list[PendingSubscription]:
        async with self._transaction() as conn:
            return await _pending_of(conn, username.casefold())

    # offline messages, oldest first

    async def store_offline(self, username: str, stanza: str, limit: int) -> bool:
        """Queue one stanza; False when the queue already holds `limit`; NoSuchUser if unknown."""
        name = username.casefold()
        async with self._transaction(write=True) as conn:
            await self._lock_user(conn, name)
            if await self._count_offline(conn, name) >= limit:
                return False
            await conn.execute(insert(offline_messages).values(username=name, stanza=stanza))
        return True

    async def store_offline_many(self, items: Sequence[tuple[str, str]], limit: int) -> list[bool]:
        """Queue (username, stanza) pairs in one transaction; says which were kept.

        Each user keeps stanzas in input order until its queue holds `limit`;
        the rest, and stanzas for unknown users, are dropped (False).
        """
        queued: dict[str, list[int]] = {}  # username -> indexes into items
        for index, (username, _) in enumerate(items):
            queued.setdefault(username.casefold(), []).append(index)
        kept = [False] * len(items)
        rows: list[Row] = []
        async with self._transaction(write=True) as conn:
            for chunk in _chunks(sorted(queued)):  # sorted: a fixed lock order
                present = await conn.scalars(
                    select(users.c.username)
                    .where(users.c.username.in_(chunk))
                    .order_by(users.c.username)
                    .with_for_update()
                )
                names = list(present)
                counts = await conn.execute(
                    select(offline_messages.c.username, func.count())
                    .where(offline_messages.c.username.in_(names))
                    .group_by(offline_messages.c.username)
                )
                held: dict[str, int] = {name: count for name, count in counts}
                for name in names:
                    room = max(limit - held.get(name, 0), 0)
                    for index in queued[name][:room]:
                        kept[index] = True
                        rows.append({"username": name, "stanza": items[index][1]})
            if rows:
                await conn.execute(insert(offline_messages), rows)
        return kept

    async def take_offline(self, username: str) -> list[str]:
        """Remove and return the user's queued stanzas, oldest first."""
        name = username.casefold()
        waiting = await self._sqlite_rows(_OFFLINE_PROBE_SQL, (name,))
        if waiting is None:
            probe = select(offline_messages.c.id).where(offline_messages.c.username == name)
            async with self._transaction() as conn:
                waiting = list((await conn.execute(probe.limit(1))).all())
        if not waiting:  # most logins find nothing: no writer lock taken
            return []
        async with self._transaction(write=True) as conn:
            try:
                await self._lock_user(conn, name)
            except NoSuchUser:
                return []
            queued = (
                await conn.execute(
                    select(offline_messages.c.id, offline_messages.c.stanza)
                    .where(offline_messages.c.username == name)
                    .order_by(offline_messages.c.id)
                )
            ).all()
            if queued:
                await conn.execute(
                    delete(offline_messages).where(
                        offline_messages.c.username == name,
                        offline_messages.c.id <= queued[-1].id,
                    )
                )
        return [row.stanza for row in queued]

    async def users_with_offline(self, usernames: Sequence[str]) -> set[str]:
        names = {username.casefold(): username for username in usernames}
        found: set[str] = set()
        for chunk in _chunks(list(names)):
            marks = ", ".join("?" * len(chunk))
            sql = f"SELECT DISTINCT username FROM offline_messages WHERE username IN ({marks})"
            rows = await self._sqlite_rows(sql, tuple(chunk))
            if rows is None:
                query = select(offline_messages.c.username).where(
                    offline_messages.c.username.in_(chunk)
                )
                async with self._transaction() as conn:
                    rows = list((await conn.execute(query.distinct())).all())
            found.update(names[row[0]] for row in rows)
        return found

    async def count_offline(self, username: str) -> int:
        async with self._transaction() as conn:
            return await self._count_offline(conn, username.casefold())

    async def _count_offline(self, connection: AsyncConnection, name: str) -> int:
        query = (
            select(func.count())
            .select_from(offline_messages)
            .where(offline_messages.c.username == name)
        )
        return int(await connection.scalar(query) or 0)

    # health

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""
        async with self._transaction() as conn:
            await conn.exec_driver_sql("SELECT 1")
