"""ClusterStore against a real SQLite file, and against PostgreSQL when
XMPP_HA_TEST_PG_URL names a server (e.g. postgresql+asyncpg://postgres@127.0.0.1:55432/postgres).

Each module run creates its own PostgreSQL database and every test starts from
empty tables, so the server named may be shared.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from xmpp_ha.ha.groups import (
    AssignmentMode,
    GroupError,
    NoSuchGroup,
    NoSuchNode,
    ParamError,
    ReloginLimits,
    SRMParams,
)
from xmpp_ha.ha.srm import GroupRecord, Move
from xmpp_ha.store import schema
from xmpp_ha.store.cluster import (
    STATUS_HEALTHY,
    STATUS_SCHEMA_MISMATCH,
    STATUS_UNREACHABLE,
    Assignment,
    ClusterStore,
    NodeInfo,
    store_status,
)
from xmpp_ha.store.migrations import STEPS, SchemaMismatch, schema_version, upgrade
from xmpp_ha.store.repository import NoSuchUser, StoreUnavailable
from xmpp_ha.store.sql import SQLStore, create_engine

BALANCED = AssignmentMode.BALANCED
ACTIVE_STANDBY = AssignmentMode.ACTIVE_STANDBY
NONE = AssignmentMode.NONE
PAIR = ["n1", "n2"]


@pytest.fixture
async def cluster(url: str) -> AsyncIterator[ClusterStore]:
    opened = await ClusterStore.open(url, create=True)
    yield opened
    await opened.close()


@pytest.fixture
async def pair(cluster: ClusterStore) -> ClusterStore:
    """Nodes n1, n2 (and a spare n3) registered; group g1 holds n1 and n2."""
    for index, name in enumerate(("n1", "n2", "n3"), start=1):
        await cluster.register_node(name, f"10.0.0.{index}", 5222, 20075 + index, 22001, "1.0")
    await cluster.create_group("g1", "pair one", PAIR)
    return cluster


async def add_users(engine: AsyncEngine, names: list[str]) -> None:
    """Insert bare user rows (no credentials): enough for assignment."""
    async with engine.begin() as conn:
        await conn.execute(insert(schema.users), [{"username": name} for name in names])


def user_names(count: int, prefix: str = "user") -> list[str]:
    return [f"{prefix}{index:05}" for index in range(count)]


# --- opening, status, migration -------------------------------------------------------


async def test_open_requires_current_schema(url: str) -> None:
    if url.startswith("sqlite"):
        Path(make_url(url).database or "").touch()
    with pytest.raises(SchemaMismatch):
        await ClusterStore.open(url)
    created = await ClusterStore.open(url, create=True)
    assert await created.status_value() == STATUS_HEALTHY
    await created.close()
    reopened = await ClusterStore.open(url)
    assert await reopened.get_params() == SRMParams()
    await reopened.close()


async def test_status_values(url: str, tmp_path: Path) -> None:
    empty = ClusterStore(create_engine(url))
    try:
        assert await empty.status_value() == STATUS_SCHEMA_MISMATCH  # no schema yet
        await upgrade(empty.engine)
        assert await empty.status_value() == STATUS_HEALTHY
        async with empty.engine.begin() as conn:
            await conn.execute(update(schema.schema_version).values(version=99))
        assert await empty.status_value() == STATUS_SCHEMA_MISMATCH
    finally:
        await empty.close()
    assert await store_status(url) == STATUS_SCHEMA_MISMATCH
    assert await store_status("postgresql://nobody:pw@127.0.0.1:1/none") == STATUS_UNREACHABLE
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 100)
    assert await store_status(str(garbage)) == STATUS_UNREACHABLE
    assert await store_status("mysql://x/y") == STATUS_UNREACHABLE


async def test_unreachable_store_raises_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable):
        await ClusterStore.open("postgresql://nobody:secret@127.0.0.1:1/none")
    unreachable = ClusterStore(create_engine("postgresql://nobody:secret@127.0.0.1:1/none"))
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await unreachable.get_params()
        assert "secret" not in str(caught.value)
        with pytest.raises(StoreUnavailable):
            await unreachable.renew_lease("n1")
    finally:
        await unreachable.close()


def _create_v1(connection: Connection) -> None:
    schema.schema_version.create(connection)
    STEPS[0].apply(connection)
    connection.execute(insert(schema.schema_version).values(id=1, version=1))


async def test_migration_from_version_1(url: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_create_v1)
        await add_users(engine, ["alice"])
        assert await schema_version(engine) == 1
        with pytest.raises(SchemaMismatch, match="is at schema version 1; this software needs 2"):
            await ClusterStore.open(url)
        assert await ClusterStore(engine).status_value() == STATUS_SCHEMA_MISMATCH
        assert await upgrade(engine) == 2
        assert await schema_version(engine) == 2
    finally:
        await engine.dispose()
    sql = await SQLStore.open(url)
    cluster = await ClusterStore.open(url)
    try:
        assert await sql.list_users() == ["alice"]
        await cluster.register_node("n1", "h", 1, 2, 3, "1.0")
        assert await cluster.assign_user("alice", BALANCED, ["n1"]) == "n1"
        assert await cluster.status_value() == STATUS_HEALTHY
    finally:
        await sql.close()
        await cluster.close()


# --- nodes ------------------------------------------------------------------------


async def test_register_and_list_nodes(cluster: ClusterStore) -> None:
    assert await cluster.list_nodes() == []
    info = await cluster.register_node("n2", "10.0.0.2", 5222, 20075, 22001, "1.0")
    assert info == NodeInfo("n2", "10.0.0.2", 5222, 20075, 22001, "1.0", 120.0, 537.0)
    assert info.relogin == ReloginLimits()
    await cluster.register_node("n1", "10.0.0.1", 5223, 20076, 22002, "1.0")
    assert [node.name for node in await cluster.list_nodes()] == ["n1", "n2"]
    assert await cluster.get_node("n9") is None
    # re-registering updates the address and version, and keeps the re-login limits
    assert await cluster.set_relogin_limits("n2", 5, 10) == ReloginLimits(5, 10)
    again = await cluster.register_node("n2", "10.0.0.22", 5333, 20077, 22003, "1.1")
    assert again == NodeInfo("n2", "10.0.0.22", 5333, 20077, 22003, "1.1", 5.0, 10.0)
    assert await cluster.get_node("n2") == again


async def test_node_validation(cluster: ClusterStore) -> None:
    cases = [
        (("", "h", 1, 2, 3, "1"), "node name must not be empty"),
        (("n 1", "h", 1, 2, 3, "1"), "node name 'n 1' may hold only"),
        (("n1", " ", 1, 2, 3, "1"), "host of node 'n1' must not be empty"),
        (("n1", "h", 0, 2, 3, "1"), "c2s_port must be a port number in 1..65535, got 0"),
        (("n1", "h", 1, 70000, 3, "1"), "admin_port must be a port number"),
        (("n1", "h", 1, 2, "3", "1"), "service_port must be a port number"),
        (("n1", "h", 1, 2, 3, ""), "software version must not be empty"),
    ]
    for args, message in cases:
        with pytest.raises(GroupError, match=message):
            await cluster.register_node(*args)  # type: ignore[arg-type]
    assert await cluster.list_nodes() == []
    with pytest.raises(NoSuchNode, match="node 'n9' is not registered"):
        await cluster.set_relogin_limits("n9", 1, 2)
    await cluster.register_node("n1", "h", 1, 2, 3, "1")
    with pytest.raises(ParamError, match="client_relogin_lower \\(9 s\\) must not exceed"):
        await cluster.set_relogin_limits("n1", 9, 2)
    with pytest.raises(ParamError, match="client_relogin_lower must be a positive"):
        await cluster.set_relogin_limits("n1", 0, 2)


# --- groups -----------------------------------------------------------------------


async def test_group_lifecycle(pair: ClusterStore) -> None:
    group = await pair.get_group("g1")
    assert group is not None
    assert (group.name, group.description, group.ha_enabled, group.nodes) == (
        "g1",
        "pair one",
        False,
        ("n1", "n2"),
    )
    assert group.record == GroupRecord()
    assert group.peer("n1") == "n2" and group.peer("n2") == "n1" and group.peer("n3") is None
    assert await pair.group_of_node("n2") == group
    assert await pair.group_of_node("n3") is None
    single = await pair.create_group("solo", "", ["n3"], ha_enabled=True)
    assert single.nodes == ("n3",) and single.ha_enabled and single.peer("n3") is None
    assert [g.name for g in await pair.list_groups()] == ["g1", "solo"]

    updated = await pair.update_group("g1", description="renamed", ha_enabled=True)
    assert (updated.description, updated.ha_enabled) == ("renamed", True)
    unchanged = await pair.update_group("g1")
    assert unchanged == updated
    assert (await pair.update_group("g1", ha_enabled=False)).description == "renamed"

    await pair.delete_group("solo")
    assert await pair.get_group("solo") is None
    assert await pair.group_of_node("n3") is None
    with pytest.raises(NoSuchGroup, match="no group named 'solo'"):
        await pair.delete_group("solo")
    with pytest.raises(NoSuchGroup):
        await pair.update_group("solo", description="x")
    # a node freed by a deletion may join another group
    await pair.delete_group("g1")
    await pair.create_group("g2", "", ["n2", "n3"])
    assert (await pair.group_of_node("n2")) is not None


async def test_group_validation_messages(pair: ClusterStore) -> None:
    await pair.register_node("n4", "10.0.0.4", 5222, 20079, 22001, "2.0")
    await pair.register_node("n5", "10.0.0.5", 5222, 20080, 22001, "1.0")
    cases: list[tuple[str, str, list[str], type[Exception], str]] = [
        ("", "", ["n3"], GroupError, "group name must not be empty"),
        ("x" * 129, "", ["n3"], GroupError, "at most 128"),
        ("bad name", "", ["n3"], GroupError, "contains ' '"),
        ("g2", "a < b", ["n3"], GroupError, "must not contain '<'"),
        ("g2", "d" * 129, ["n3"], GroupError, "group description is 129 characters long"),
        ("g1", "", ["n3"], GroupError, "a group named 'g1' already exists"),
        ("G1", "", ["n3"], GroupError, "is taken by group 'g1' \\(names are unique regardless"),
        ("g2", "", [], GroupError, "needs one or two nodes, got 0"),
        ("g2", "", ["n3", "n5", "n4"], GroupError, "needs one or two nodes, got 3"),
        ("g2", "", ["n3", "n3"], GroupError, "must be different nodes, got 'n3' twice"),
        ("g2", "", ["n3", "n9"], NoSuchNode, "node 'n9' is not registered"),
        ("g2", "", ["n3", "n1"], GroupError, "node 'n1' already belongs to group 'g1'"),
        ("g2", "", ["n2"], GroupError, "node 'n2' already belongs to group 'g1'"),
        ("g2", "", ["n3", "n4"], GroupError, "'n3' runs '1.0', 'n4' runs '2.0'"),
    ]
    for name, description, members, error, message in cases:
        with pytest.raises(error, match=message):
            await pair.create_group(name, description, members)
    assert [g.name for g in await pair.list_groups()] == ["g1"]
    with pytest.raises(GroupError, match="must not contain '&'"):
        await pair.update_group("g1", description="this & that")
    assert (await pair.create_group("g2", "ok: #1 (east)", ["n3", "n5"])).nodes == ("n3", "n5")


async def test_concurrent_group_creation_keeps_a_node_in_one_group(
    pair: ClusterStore, url: str
) -> None:
    await pair.register_node("n4", "10.0.0.4", 5222, 20079, 22001, "1.0")
    await pair.register_node("n5", "10.0.0.5", 5222, 20080, 22001, "1.0")
    other = await ClusterStore.open(url)
    try:
        results = await asyncio.gather(
            pair.create_group("ga", "", ["n3", "n4"]),
            other.create_group("gb", "", ["n5", "n3"]),
            return_exceptions=True,
        )
    finally:
        await other.close()
    failures = [result for result in results if isinstance(result, Exception)]
    assert len(failures) == 1 and isinstance(failures[0], GroupError), results
    assert "node 'n3' already belongs to group" in str(failures[0])


# --- the failover record ---------------------------------------------------------------


async def test_failover_record(pair: ClusterStore) -> None:
    assert await pair.get_record("g1") == GroupRecord()
    await pair.set_failed_over("g1", "n1", True)
    assert await pair.get_record("g1") == GroupRecord(failed_over="n1", by_admin=True)
    await pair.begin_transition("g1", Move.GIVE_BACK, "n2")
    await pair.begin_transition("g1", Move.GIVE_BACK, "n2")  # resumed after a restart
    expected = GroupRecord("n1", True, False, Move.GIVE_BACK, "n2")
    assert await pair.get_record("g1") == expected
    with pytest.raises(GroupError, match="'n2' is already moving users \\(give-back\\);"):
        await pair.begin_transition("g1", Move.TAKE_OVER, "n1")
    with pytest.raises(GroupError, match="cannot be deleted while 'n2' is moving users"):
        await pair.delete_group("g1")
    await pair.end_transition("g1")
    await pair.end_transition("g1")  # idempotent
    with pytest.raises(GroupError, match="node 'n1' is failed over; fall back first"):
        await pair.delete_group("g1")
    await pair.set_failed_over("g1", None, True)  # clearing also clears by_admin
    assert await pair.get_record("g1") == GroupRecord()
    await pair.set_failed_mode("g1", True)
    assert (await pair.get_record("g1")).failed_mode
    with pytest.raises(GroupError, match="runs in failed mode; run recovery first"):
        await pair.delete_group("g1")
    await pair.set_failed_mode("g1", False)
    with pytest.raises(GroupError, match="node 'n3' is not a member of group 'g1'"):
        await pair.set_failed_over("g1", "n3")
    with pytest.raises(GroupError, match="node 'n3' is not a member of group 'g1'"):
        await pair.begin_transition("g1", Move.TAKE_ALL, "n3")
    for call in (
        pair.get_record("nope"),
        pair.set_failed_over("nope", None),
        pair.set_failed_mode("nope", True),
        pair.begin_transition("nope", Move.TAKE_OVER, "n1"),
        pair.end_transition("nope"),
    ):
        with pytest.raises(NoSuchGroup, match="no group named 'nope'"):
            await call
    await pair.begin_transition("g1", Move.TAKE_OVER, "n2")
    await pair.begin_transition("g1", Move.TAKE_ALL, "n2")  # the same node replaces its own
    assert await pair.get_record("g1") == GroupRecord(
        transition=Move.TAKE_ALL, transition_node="n2"
    )


# --- parameters ---------------------------------------------------------------------


async def test_params(cluster: ClusterStore, url: str) -> None:
    assert await cluster.get_params() == SRMParams()
    changed = await cluster.set_params(
        {"heartbeat_interval": 1, "heartbeat_timeout": 3, "enable_automatic_fallback": True}
    )
    assert changed == SRMParams(
        heartbeat_interval=1, heartbeat_timeout=3, enable_automatic_fallback=True
    )
    other = await ClusterStore.open(url)
    try:
        assert await other.get_params() == changed
        again = await other.set_params({"initialization_heartbeat_timeout": 4})
        assert again.heartbeat_timeout == 3.0 and again.initialization_heartbeat_timeout == 4.0
    finally:
        await other.close()
    with pytest.raises(ParamError, match="heartbeat_timeout \\(3 s\\) must not exceed"):
        await cluster.set_params({"initialization_heartbeat_timeout": 2})
    with pytest.raises(ParamError, match="unknown parameter 'nope'"):
        await cluster.set_params({"nope": 1})
    with pytest.raises(ParamError, match="is a per-node parameter"):
        await cluster.set_params({"client_relogin_upper": 1})
    with pytest.raises(ParamError, match="must be true or false"):
        await cluster.set_params({"monitor_authentication_service": "false"})
    assert (await cluster.get_params()).initialization_heartbeat_timeout == 4.0
    assert await cluster.set_params({}) == await cluster.get_params()


async def test_assignment_mode_setting(cluster: ClusterStore) -> None:
    assert await cluster.get_assignment_mode() is BALANCED
    assert await cluster.set_assignment_mode("active-standby") is ACTIVE_STANDBY
    assert await cluster.get_assignment_mode() is ACTIVE_STANDBY
    await cluster.set_assignment_mode(NONE)
    assert await cluster.get_assignment_mode() is NONE
    with pytest.raises(ParamError, match="unknown user assignment mode 'hot'"):
        await cluster.set_assignment_mode("hot")
    assert await cluster.get_params() == SRMParams()  # the mode is not an SRM parameter


# --- assignment ---------------------------------------------------------------------


async def test_balanced_spreads_evenly(pair: ClusterStore) -> None:
    await add_users(pair.engine, user_names(1000))
    assert await pair.assign_unassigned(BALANCED, PAIR) == 1000
    counts = await pair.count_by_node()
    assert counts["n1"] == {"home": 500, "current": 500}
    assert counts["n2"] == {"home": 500, "current": 500}
    assert counts["n3"] == {"home": 0, "current": 0}
    assert await pair.assign_unassigned(BALANCED, PAIR) == 0
    # one by one, with live counts
    await add_users(pair.engine, user_names(101, "late"))
    for name in user_names(101, "late"):
        home = await pair.assign_user(name, BALANCED, PAIR)
        assert home in PAIR
    counts = await pair.count_by_node()
    assert abs(counts["n1"]["home"] - counts["n2"]["home"]) <= 1
    assert counts["n1"]["home"] + counts["n2"]["home"] == 1101
    everyone = await pair.all_assignments()
    assert len(everyone) == 1101
    assert all(a.current_node == a.home_node and a.epoch == 0 for a in everyone.values())


async def test_two_sync_agents_at_once_assign_each_user_once(pair: ClusterStore, url: str) -> None:
    await add_users(pair.engine, user_names(300))
    other = await ClusterStore.open(url)
    try:
        placed = await asyncio.gather(
            pair.assign_unassigned(BALANCED, PAIR), other.assign_unassigned(BALANCED, PAIR)
        )
    finally:
        await other.close()
    assert sorted(placed) == [0, 300]
    counts = await pair.count_by_node()
    assert counts["n1"]["home"] == counts["n2"]["home"] == 150
    assert {a.epoch for a in (await pair.all_assignments()).values()} == {0}


async def test_assign_user_details(pair: ClusterStore) -> None:
    await add_users(pair.engine, ["alice", "bob", "carol"])
    assert await pair.assign_user("Alice", BALANCED, PAIR) == "n1"
    assert await pair.assign_user("alice", BALANCED, PAIR) == "n1"  # kept
    assert await pair.assign_user("bob", BALANCED, PAIR) == "n2"
    assert await pair.get_assignment("ALICE") == Assignment("alice", "n1", "n1", 0)
    assert await pair.get_assignment("nobody") is None
    with pytest.raises(NoSuchUser):
        await pair.assign_user("nobody", BALANCED, PAIR)
    assert await pair.assign_user("carol", NONE, PAIR) is None
    assert await pair.get_assignment("carol") is None
    assert await pair.assign_user("carol", BALANCED, []) is None


async def test_active_standby_and_none(pair: ClusterStore) -> None:
    await add_users(pair.engine, user_names(50))
    assert await pair.assign_unassigned(NONE, PAIR) == 0
    assert await pair.all_assignments() == {}
    assert await pair.assign_unassigned(ACTIVE_STANDBY, PAIR) == 50
    counts = await pair.count_by_node()
    assert counts["n1"] == {"home": 50, "current": 50} and counts["n2"]["home"] == 0


async def test_apply_mode_moves_homes_minimally(pair: ClusterStore) -> None:
    await add_users(pair.engine, user_names(11))
    await pair.assign_unassigned(ACTIVE_STANDBY, PAIR)
    assert await pair.apply_mode(NONE, PAIR) == 0
    assert await pair.apply_mode(BALANCED, PAIR) == 5
    counts = await pair.count_by_node()
    assert counts["n1"] == {"home": 6, "current": 6}
    assert counts["n2"] == {"home": 5, "current": 5}
    moved = [a for a in (await pair.all_assignments()).values() if a.home_node == "n2"]
    assert all(a.current_node == "n2" and a.epoch == 1 for a in moved)
    assert await pair.apply_mode(BALANCED, PAIR) == 0
    assert await pair.apply_mode(ACTIVE_STANDBY, PAIR) == 5
    assert (await pair.count_by_node())["n1"] == {"home": 11, "current": 11}


async def test_apply_mode_leaves_failed_over_users_where_they_are(pair: ClusterStore) -> None:
    await add_users(pair.engine, user_names(10))
    await pair.assign_unassigned(BALANCED, PAIR)  # 5 on n1, 5 on n2
    # n2 fails over: its users are served on n1
    taken = await pair.move_users("n2", "n1")
    await pair.set_failed_over("g1", "n2")
    assert len(taken) == 5
    before = await pair.all_assignments()
    # active-standby: n2's users get n1 as home; they are on n1 already
    assert await pair.apply_mode(ACTIVE_STANDBY, PAIR) == 5
    after = await pair.all_assignments()
    assert all(a.home_node == "n1" and a.current_node == "n1" for a in after.values())
    assert all(after[name].epoch == before[name].epoch for name in after)  # nobody moved
    # and back to balanced while n2 is still failed over: the new homes on n2 are
    # served on n1 until the fallback
    assert await pair.apply_mode(BALANCED, PAIR) == 5
    after = await pair.all_assignments()
    assert all(a.current_node == "n1" for a in after.values())
    assert sum(a.home_node == "n2" for a in after.values()) == 5
    returned = await pair.give_back("n1", "n2")
    assert len(returned) == 5
    counts = await pair.count_by_node()
    assert counts["n2"] == {"home": 5, "current": 5}


async def test_user_added_while_failed_over_is_served_by_the_backup(pair: ClusterStore) -> None:
    await add_users(pair.engine, ["alice", "bob"])
    assert await pair.assign_user("alice", BALANCED, PAIR) == "n1"
    await pair.move_users("n2", "n1")
    await pair.set_failed_over("g1", "n2", True)
    assert await pair.assign_user("bob", BALANCED, PAIR) == "n2"
    assert await pair.get_assignment("bob") == Assignment("bob", "n2", "n1", 0)
    # during a take-over (before the record says failed over) the same holds
    await pair.set_failed_over("g1", None)
    await pair.begin_transition("g1", Move.TAKE_OVER, "n1")
    await add_users(pair.engine, ["carol", "dave"])
    assert await pair.assign_user("carol", BALANCED, PAIR) == "n1"
    assert await pair.assign_user("dave", BALANCED, PAIR) == "n2"
    assert (await pair.get_assignment("dave")) == Assignment("dave", "n2", "n1", 0)
    await pair.end_transition("g1")
    assert await pair.give_back("n1", "n2") == ["bob", "dave"]


async def test_deleting_a_user_deletes_its_assignment(pair: ClusterStore, url: str) -> None:
    sql = await SQLStore.open(url)
    try:
        await sql.add_user("alice", "pw")
        await pair.assign_user("alice", BALANCED, PAIR)
        await sql.delete_user("alice")
        assert await pair.get_assignment("alice") is None
    finally:
        await sql.close()


# --- fenced moves ---------------------------------------------------------------------


async def test_moves_bump_epochs_of_moved_rows_only(pair: ClusterStore) -> None:
    names = user_names(6)
    await add_users(pair.engine, names)
    await pair.assign_unassigned(BALANCED, PAIR)
    on_n1 = sorted(n for n, a in (await pair.all_assignments()).items() if a.home_node == "n1")
    on_n2 = sorted(set(names) - set(on_n1))

    assert await pair.move_users("n1", "n2") == on_n1  # take over
    assert await pair.move_users("n1", "n2") == []
    assert await pair.move_users("n2", "n2") == []
    state = await pair.all_assignments()
    assert all(state[n] == Assignment(n, "n1", "n2", 1) for n in on_n1)
    assert all(state[n] == Assignment(n, "n2", "n2", 0) for n in on_n2)

    assert await pair.give_back("n2", "n1") == on_n1  # fallback
    assert await pair.give_back("n2", "n1") == []
    state = await pair.all_assignments()
    assert all(state[n] == Assignment(n, "n1", "n1", 2) for n in on_n1)

    assert await pair.take_all("n1", PAIR) == on_n2  # auto-recovery
    assert await pair.take_all("n1", PAIR) == []
    state = await pair.all_assignments()
    assert all(state[n] == Assignment(n, "n2", "n1", 1) for n in on_n2)
    assert all(state[n].epoch == 2 for n in on_n1)

    assert await pair.reset_to_home(PAIR) == on_n2  # recovery
    assert await pair.reset_to_home(PAIR) == []
    state = await pair.all_assignments()
    assert all(a.current_node == a.home_node for a in state.values())
    assert all(state[n].epoch == 2 for n in names)
    assert await pair.take_all("n1", ["n7"]) == []  # another group's users are not touched


async def test_ten_thousand_users_move_in_one_statement(pair: ClusterStore) -> None:
    names = user_names(10_000)
    await add_users(pair.engine, names)
    assert await pair.assign_unassigned(ACTIVE_STANDBY, PAIR) == 10_000
    started = time.perf_counter()
    moved = await pair.move_users("n1", "n2")
    elapsed = time.perf_counter() - started
    assert moved == names
    assert elapsed < 5.0, elapsed
    counts = await pair.count_by_node()
    assert counts["n2"] == {"home": 0, "current": 10_000}
    started = time.perf_counter()
    assert len(await pair.give_back("n2", "n1")) == 10_000
    assert time.perf_counter() - started < 5.0
    assert {a.epoch for a in (await pair.all_assignments()).values()} == {2}


async def test_claim_is_compare_and_set(pair: ClusterStore) -> None:
    await add_users(pair.engine, ["alice"])
    await pair.assign_user("alice", BALANCED, PAIR)
    assert not await pair.claim("alice", "n2", 5)  # stale epoch
    assert await pair.claim("ALICE", "n2", 0)
    assert await pair.get_assignment("alice") == Assignment("alice", "n1", "n2", 1)
    assert not await pair.claim("alice", "n1", 0)
    assert await pair.claim("alice", "n1", 1)
    assert not await pair.claim("nobody", "n1", 0)


async def test_two_concurrent_claimers_one_wins(pair: ClusterStore, url: str) -> None:
    await add_users(pair.engine, user_names(20))
    await pair.assign_unassigned(BALANCED, PAIR)
    other = await ClusterStore.open(url)
    try:
        for name in user_names(20):
            epoch = (await pair.get_assignment(name) or Assignment(name, None, None, -1)).epoch
            results = await asyncio.gather(
                pair.claim(name, "n1", epoch), other.claim(name, "n2", epoch)
            )
            assert sorted(results) == [False, True], name
            final = await pair.get_assignment(name)
            assert final is not None and final.epoch == epoch + 1
            assert final.current_node == ("n1" if results[0] else "n2")
    finally:
        await other.close()


# --- leases -------------------------------------------------------------------------


async def test_leases(cluster: ClusterStore, url: str) -> None:
    assert await cluster.read_lease("n1") is None
    assert await cluster.renew_lease("n1") == 1
    assert await cluster.renew_lease("n1") == 2
    assert await cluster.read_lease("n1") == 2
    assert await cluster.read_lease("n2") is None
    other = await ClusterStore.open(url)
    try:
        assert await other.read_lease("n1") == 2
        renewals = await asyncio.gather(
            *((cluster if index % 2 else other).renew_lease("n2") for index in range(10))
        )
        assert sorted(renewals) == list(range(1, 11))
        assert await cluster.read_lease("n2") == 10
    finally:
        await other.close()
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            stamps = (await conn.execute(select(schema.leases.c.renewed_at))).scalars().all()
        assert len(stamps) == 2 and all(stamp is not None for stamp in stamps)
    finally:
        await engine.dispose()
