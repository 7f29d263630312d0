"""Versioned schema migrations for the shared store.

Rules:
- `schema_version` holds one row: the version the store is at. A store
  without it is empty (version 0).
- Step N takes a store at version N-1 to version N. Steps are idempotent
  (tables are created with checkfirst; a column is added only when missing),
  so a fresh store simply runs every step, and a step re-run after a crash
  does no harm.
- `upgrade` runs the pending steps and the version bump in one transaction,
  serialized between nodes: PostgreSQL by an advisory lock, SQLite by
  BEGIN IMMEDIATE (engines from `sql.create_engine` honour `BEGIN_OPTION`).
- A store newer than this code is refused, never downgraded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, Table, insert, inspect, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from xmpp_ha.store import schema
from xmpp_ha.store.repository import StoreUnavailable

# Execution option naming the statement that opens a SQLite transaction.
BEGIN_OPTION = "xmpp_ha_sqlite_begin"
_UPGRADE_LOCK = 0x786D7070  # pg_advisory_xact_lock key ("xmpp")


class SchemaMismatch(StoreUnavailable):
    """The store has no schema, or one at a version this code does not run on."""

    def __init__(self, found: int | None, expected: int, where: str = "the store") -> None:
        self.found = found
        self.expected = expected
        if found is None:
            text = f"{where} has no xmpp-ha schema; create it first"
        elif found > expected:
            text = (
                f"{where} is at schema version {found}, newer than this software "
                f"(version {expected}); upgrade the software"
            )
        else:
            text = f"{where} is at schema version {found}; this software needs {expected}; upgrade the store"
        super().__init__(text)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    summary: str
    apply: Callable[[Connection], None]


def _create_tables(*tables: Table) -> Callable[[Connection], None]:
    def apply(connection: Connection) -> None:
        for table in tables:
            table.create(connection, checkfirst=True)

    return apply


STEPS: tuple[Migration, ...] = (
    Migration(
        1,
        "users, SCRAM credentials, rosters, pending subscriptions, offline messages",
        _create_tables(
            schema.users,
            schema.scram_credentials,
            schema.roster_items,
            schema.roster_versions,
            schema.pending_subscriptions,
            schema.offline_messages,
        ),
    ),
    Migration(
        2,
        "redundancy groups: nodes, groups and failover records, cluster parameters,"
        " user assignments (home, current node, fencing epoch), node leases",
        _create_tables(
            schema.nodes,
            schema.groups,
            schema.cluster_params,
            schema.assignments,
            schema.leases,
        ),
    ),
    # Later: session registry.
)
CURRENT_SCHEMA_VERSION = STEPS[-1].version

if [step.version for step in STEPS] != list(range(1, len(STEPS) + 1)):
    raise AssertionError("migration steps must be numbered 1, 2, 3, ... without gaps")


def _describe(engine: AsyncEngine) -> str:
    return f"store {engine.url.render_as_string(hide_password=True)}"


def _read_version(connection: Connection) -> int | None:
    if not inspect(connection).has_table(schema.schema_version.name):
        return None
    found = connection.execute(select(schema.schema_version.c.version)).scalar_one_or_none()
    return None if found is None else int(found)


def _upgrade(connection: Connection, where: str) -> int:
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_UPGRADE_LOCK})")
    schema.schema_version.create(connection, checkfirst=True)
    stored = _read_version(connection)
    found = stored or 0
    if found > CURRENT_SCHEMA_VERSION:
        raise SchemaMismatch(found, CURRENT_SCHEMA_VERSION, where)
    for step in STEPS[found:]:
        step.apply(connection)
    if stored is None:
        connection.execute(
            insert(schema.schema_version).values(id=1, version=CURRENT_SCHEMA_VERSION)
        )
    elif found < CURRENT_SCHEMA_VERSION:
        connection.execute(update(schema.schema_version).values(version=CURRENT_SCHEMA_VERSION))
    return CURRENT_SCHEMA_VERSION


async def upgrade(engine: AsyncEngine) -> int:
    """Create or upgrade the schema to CURRENT_SCHEMA_VERSION; returns that version."""
    where = _describe(engine)
    writer = engine.execution_options(**{BEGIN_OPTION: "BEGIN IMMEDIATE"})
    async with writer.begin() as connection:
        return await connection.run_sync(_upgrade, where)


async def schema_version(engine: AsyncEngine) -> int | None:
    """The store's schema version, or None when it has no schema."""
    async with engine.connect() as connection:
        return await connection.run_sync(_read_version)
