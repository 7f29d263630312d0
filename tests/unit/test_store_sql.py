"""SQLStore against a real SQLite file, and against PostgreSQL when
XMPP_HA_TEST_PG_URL names a server (e.g. postgresql+asyncpg://postgres@127.0.0.1:55432/postgres).

Each module run creates its own PostgreSQL database and every test starts from
empty tables, so the server named may be shared.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.engine import make_url

from xmpp_ha.protocol.scram import derive_credentials
from xmpp_ha.store import schema
from xmpp_ha.store.migrations import (
    CURRENT_SCHEMA_VERSION,
    SchemaMismatch,
    schema_version,
    upgrade,
)
from xmpp_ha.store.repository import (
    NoSuchUser,
    PendingSubscription,
    RosterItem,
    StoreUnavailable,
    UserExists,
)
from xmpp_ha.store.sql import SQLStore, create_engine, normalize_url, validate_username


async def count_rows(url: str, table_name: str) -> int:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            table = schema.metadata.tables[table_name]
            return int(await conn.scalar(select(func.count()).select_from(table)) or 0)
    finally:
        await engine.dispose()


# URLs and names (no database)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:////var/lib/x.db", "sqlite+aiosqlite:////var/lib/x.db"),
        ("sqlite+aiosqlite:///rel.db", "sqlite+aiosqlite:///rel.db"),
        ("postgresql://u:pw@db:5432/xmpp", "postgresql+asyncpg://u:pw@db:5432/xmpp"),
        ("postgres://u@db/xmpp", "postgresql+asyncpg://u@db/xmpp"),
        ("postgresql+psycopg2://u@db/xmpp", "postgresql+asyncpg://u@db/xmpp"),
        ("postgresql+asyncpg://u@db/xmpp", "postgresql+asyncpg://u@db/xmpp"),
    ],
)
def test_normalize_url(given: str, expected: str) -> None:
    assert normalize_url(given) == expected


def test_normalize_plain_path(tmp_path: Path) -> None:
    assert normalize_url(str(tmp_path / "a.db")) == f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"


@pytest.mark.parametrize("bad", ["", "mysql://u@h/db", "://nothing"])
def test_normalize_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_url(bad)


def test_validate_username() -> None:
    assert validate_username("Alice") == "alice"
    for bad in ["", "a@b", "a b", "a/b", "x" * 1024, "tab\t"]:
        with pytest.raises(ValueError, match="invalid username"):
            validate_username(bad)


# opening and schema


async def test_open_requires_schema_unless_create(url: str) -> None:
    if url.startswith("sqlite"):
        Path(make_url(url).database or "").touch()
    with pytest.raises(SchemaMismatch) as caught:
        await SQLStore.open(url)
    assert caught.value.found is None
    created = await SQLStore.open(url, create=True)
    await created.close()
    reopened = await SQLStore.open(url)
    await reopened.ping()
    await reopened.close()


async def test_upgrade_is_idempotent(url: str) -> None:
    engine = create_engine(url)
    try:
        assert await schema_version(engine) is None
        assert await upgrade(engine) == CURRENT_SCHEMA_VERSION
        assert await upgrade(engine) == CURRENT_SCHEMA_VERSION
        assert await schema_version(engine) == CURRENT_SCHEMA_VERSION
    finally:
        await engine.dispose()


async def test_newer_schema_is_refused(store: SQLStore, url: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                update(schema.schema_version).values(version=CURRENT_SCHEMA_VERSION + 1)
            )
        with pytest.raises(SchemaMismatch, match="newer than this software"):
            await upgrade(engine)
    finally:
        await engine.dispose()
    with pytest.raises(SchemaMismatch):
        await SQLStore.open(url)
    with pytest.raises(SchemaMismatch):
        await SQLStore.open(url, create=True)


async def test_missing_sqlite_file_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="no such database file"):
        await SQLStore.open(str(tmp_path / "absent.db"))
    assert not (tmp_path / "absent.db").exists()


async def test_driver_errors_become_store_unavailable(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreUnavailable, match="garbage.db"):
        await SQLStore.open(str(garbage))
    with pytest.raises(StoreUnavailable, match="Connect|refused"):
        await SQLStore.open("postgresql://nobody:secret@127.0.0.1:1/none", create=True)


async def test_unreachable_store_hides_password() -> None:
    with pytest.raises(StoreUnavailable) as caught:
        await SQLStore.open("postgresql://nobody:secret@127.0.0.1:1/none")
    assert "secret" not in str(caught.value)


async def test_sqlite_connection_settings(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(text("PRAGMA journal_mode")) == "wal"
            assert await conn.scalar(text("PRAGMA busy_timeout")) == 5000
            assert await conn.scalar(text("PRAGMA foreign_keys")) == 1
    finally:
        await engine.dispose()
    with sqlite3.connect(tmp_path / "s.db") as other:  # WAL is a property of the file
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)


# users and credentials


async def test_add_user(store: SQLStore) -> None:
    assert await store.list_users() == []
    await store.add_user("Alice", "secret")
    await store.add_user("bob", "secret")
    assert await store.list_users() == ["alice", "bob"]
    assert await store.user_exists("ALICE")
    assert not await store.user_exists("carol")
    assert not await store.user_exists("not@valid")
    with pytest.raises(UserExists):
        await store.add_user("alice", "other")
    with pytest.raises(ValueError, match="invalid username"):
        await store.add_user("x@y", "secret")
    assert await store.roster_version("alice") == 0


async def test_credentials_verify_the_password(store: SQLStore) -> None:
    await store.add_user("alice", "pencil")
    for mechanism in ("SCRAM-SHA-1", "SCRAM-SHA-256"):
        stored = await store.get_credentials("Alice", mechanism)
        assert stored is not None
        assert stored.mechanism == mechanism
        assert len(stored.salt) == 16
        assert derive_credentials("pencil", mechanism, stored.salt, stored.iterations) == stored
    sha1 = await store.get_credentials("alice", "SCRAM-SHA-1")
    sha256 = await store.get_credentials("alice", "SCRAM-SHA-256")
    assert sha1 is not None and sha256 is not None and sha1.salt != sha256.salt
    assert await store.get_credentials("nobody", "SCRAM-SHA-1") is None


async def test_set_password(store: SQLStore) -> None:
    await store.add_user("alice", "old")
    before = await store.get_credentials("alice", "SCRAM-SHA-256")
    await store.set_password("ALICE", "new")
    after = await store.get_credentials("alice", "SCRAM-SHA-256")
    assert after is not None and after != before
    assert derive_credentials("new", "SCRAM-SHA-256", after.salt, after.iterations) == after
    with pytest.raises(NoSuchUser):
        await store.set_password("nobody", "x")


async def test_delete_user_removes_every_row(store: SQLStore, url: str) -> None:
    await store.add_user("alice", "pw")
    await store.add_user("bob", "pw")
    for owner in ("alice", "bob"):
        await store.put_roster_item(owner, RosterItem("carol@example.org"))
        await store.add_pending_subscription(owner, PendingSubscription("dave@x", "<presence/>"))
        await store.store_offline(owner, "<message/>", 10)
    await store.delete_user("Alice")
    assert await store.list_users() == ["bob"]
    for table_name in (
        "users",
        "scram_credentials",
        "roster_items",
        "roster_versions",
        "pending_subscriptions",
        "offline_messages",
    ):
        per_user = 2 if table_name == "scram_credentials" else 1
        assert await count_rows(url, table_name) == per_user, table_name
    with pytest.raises(NoSuchUser):
        await store.delete_user("alice")
    await store.add_user("alice", "again")
    assert await store.get_roster("alice") == []
    assert await store.roster_version("alice") == 0
    assert await store.count_offline("alice") == 0


async def test_import_users(store: SQLStore) -> None:
    await store.add_user("existing", "keep-me")
    kept = await store.get_credentials("existing", "SCRAM-SHA-1")
    added = await store.import_users(
        [("one", "p1"), ("Two", "p2"), ("existing", "other"), ("ONE", "ignored")]
    )
    assert added == 2
    assert await store.list_users() == ["existing", "one", "two"]
    assert await store.get_credentials("existing", "SCRAM-SHA-1") == kept
    one = await store.get_credentials("one", "SCRAM-SHA-256")
    assert one is not None
    assert derive_credentials("p1", "SCRAM-SHA-256", one.salt, one.iterations) == one
    assert await store.roster_version("two") == 0
    assert await store.import_users([]) == 0
    assert await store.import_users([("one", "again")]) == 0


async def test_import_is_all_or_nothing_on_invalid_input(store: SQLStore) -> None:
    with pytest.raises(ValueError, match="invalid username"):
        await store.import_users([("good", "pw"), ("bad@name", "pw")])
    with pytest.raises(ValueError, match="password for 'bad-password'"):
        await store.import_users([("good", "pw"), ("bad-password", "with\x07bell")])
    assert await store.list_users() == []


async def test_import_two_thousand_users(store: SQLStore) -> None:
    accounts = [(f"user{index:04d}", f"password-{index}") for index in range(2000)]
    assert await store.import_users(accounts) == 2000
    names = await store.list_users()
    assert len(names) == 2000 and names[0] == "user0000" and names[-1] == "user1999"
    last = await store.get_credentials("user1999", "SCRAM-SHA-1")
    assert last is not None
    assert derive_credentials("password-1999", "SCRAM-SHA-1", last.salt, last.iterations) == last


# roster and subscriptions


async def test_roster_items_and_versions(store: SQLStore) -> None:
    await store.add_user("alice", "pw")
    assert await store.get_roster("alice") == []
    assert await store.get_roster_item("alice", "bob@example.org") is None
    bob = RosterItem("bob@example.org", "Bob", "both", groups=("Friends", "Work"))
    carol = RosterItem("carol@example.org", subscription="none", ask=True, approved=True)
    await store.put_roster_item("alice", bob)
    await store.put_roster_item("Alice", carol)
    assert await store.roster_version("alice") == 2
    assert await store.get_roster("alice") == [bob, carol]
    assert await store.get_roster_item("alice", "carol@example.org") == carol

    renamed = RosterItem("bob@example.org", "Robert", "to")
    await store.put_roster_item("alice", renamed)
    assert await store.get_roster_item("alice", "bob@example.org") == renamed
    assert await store.roster_version("alice") == 3

    await store.remove_roster_item("alice", "bob@example.org")
    assert await store.get_roster("alice") == [carol]
    assert await store.roster_version("alice") == 4
    await store.remove_roster_item("alice", "bob@example.org")  # absent: no change
    assert await store.roster_version("alice") == 4


async def test_roster_of_unknown_user(store: SQLStore) -> None:
    assert await store.get_roster("nobody") == []
    assert await store.roster_version("nobody") == 0
    with pytest.raises(NoSuchUser):
        await store.put_roster_item("nobody", RosterItem("bob@example.org"))
    with pytest.raises(NoSuchUser):
        await store.remove_roster_item("nobody", "bob@example.org")


async def test_pending_subscriptions(store: SQLStore) -> None:
    await store.add_user("alice", "pw")
    assert await store.get_pending_subscriptions("alice") == []
    await store.add_pending_subscription(
        "alice", PendingSubscription("zed@x", "<presence id='1'/>")
    )
    await store.add_pending_subscription(
        "alice", PendingSubscription("bob@x", "<presence id='2'/>")
    )
    await store.add_pending_subscription(
        "alice", PendingSubscription("zed@x", "<presence id='3'/>")
    )
    assert await store.get_pending_subscriptions("ALICE") == [
        PendingSubscription("bob@x", "<presence id='2'/>"),
        PendingSubscription("zed@x", "<presence id='3'/>"),
    ]
    await store.remove_pending_subscription("alice", "zed@x")
    await store.remove_pending_subscription("alice", "absent@x")
    assert await store.get_pending_subscriptions("alice") == [
        PendingSubscription("bob@x", "<presence id='2'/>")
    ]
    assert await store.get_pending_subscriptions("nobody") == []
    with pytest.raises(NoSuchUser):
        await store.add_pending_subscription("nobody", PendingSubscription("bob@x", "<p/>"))


# offline messages


async def test_offline_queue_limit_and_order(store: SQLStore) -> None:
    await store.add_user("alice", "pw")
    assert [await store.store_offline("Alice", f"<m{i}/>", 3) for i in range(5)] == [
        True,
        True,
        True,
        False,
        False,
    ]
    assert await store.count_offline("alice") == 3
    assert await store.take_offline("alice") == ["<m0/>", "<m1/>", "<m2/>"]
    assert await store.take_offline("alice") == []
    assert await store.count_offline("alice") == 0
    assert not await store.store_offline("alice", "<m/>", 0)


async def test_offline_for_unknown_user(store: SQLStore) -> None:
    with pytest.raises(NoSuchUser):
        await store.store_offline("nobody", "<m/>", 10)
    assert await store.take_offline("nobody") == []
    assert await store.count_offline("nobody") == 0


async def test_store_offline_many(store: SQLStore) -> None:
    await store.add_user("alice", "pw")
    await store.add_user("bob", "pw")
    await store.store_offline("alice", "<a0/>", 3)
    kept = await store.store_offline_many(
        [
            ("alice", "<a1/>"),
            ("bob", "<b0/>"),
            ("nobody", "<n/>"),
            ("Alice", "<a2/>"),
            ("alice", "<a3/>"),
            ("bob", "<b1/>"),
        ],
        3,
    )
    assert kept == [True, True, False, True, False, True]
    assert await store.take_offline("alice") == ["<a0/>", "<a1/>", "<a2/>"]
    assert await store.take_offline("bob") == ["<b0/>", "<b1/>"]
    assert await store.store_offline_many([], 3) == []


async def test_concurrent_offline_writers_respect_the_limit(store: SQLStore, url: str) -> None:
    await store.add_user("alice", "pw")
    other = await SQLStore.open(url)
    try:
        results = await asyncio.gather(
            *(
                (store if index % 2 else other).store_offline("alice", f"<m{index}/>", 5)
                for index in range(20)
            )
        )
        assert results.count(True) == 5
        taken = await asyncio.gather(store.take_offline("alice"), other.take_offline("alice"))
        assert sorted(taken[0] + taken[1]) == sorted(
            f"<m{index}/>" for index, ok in enumerate(results) if ok
        )
    finally:
        await other.close()


# two nodes, health


async def test_two_nodes_see_each_others_writes(store: SQLStore, url: str) -> None:
    node_b = await SQLStore.open(url)
    try:
        await store.add_user("alice", "pw")
        assert await node_b.user_exists("alice")
        await node_b.put_roster_item("alice", RosterItem("bob@x", "Bob"))
        assert await store.get_roster("alice") == [RosterItem("bob@x", "Bob")]
        assert await store.roster_version("alice") == 1
        await store.store_offline("alice", "<m/>", 10)
        assert await node_b.take_offline("alice") == ["<m/>"]
        assert await store.count_offline("alice") == 0
        await node_b.delete_user("alice")
        assert not await store.user_exists("alice")
    finally:
        await node_b.close()


async def test_ping(store: SQLStore) -> None:
    await store.ping()


async def test_load_users_matches_load_user_for_each(store: SQLStore) -> None:
    for name in ("alice", "bob", "carol"):
        await store.add_user(name, "pw")
    await store.put_roster_item("alice", RosterItem("bob@localhost", subscription="both"))
    await store.put_roster_item(
        "alice", RosterItem("carol@localhost", name="C", ask=True, groups=("Friends", "Work"))
    )
    await store.add_pending_subscription("bob", PendingSubscription("dave@x", "<presence/>"))
    names = ["alice", "bob", "carol", "Alice", "nobody"]
    loaded = await store.load_users(names)
    assert loaded == [await store.load_user(name) for name in names]
    assert [len(roster) for roster, _ in loaded] == [2, 0, 0, 2, 0]
    assert await store.load_users(["bob"]) == [await store.load_user("bob")]
