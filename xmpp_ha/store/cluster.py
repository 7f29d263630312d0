"""ClusterStore: the redundancy group's state in the shared store.

Nodes, groups and their failover records, the SRM parameters, the user
assignment (home node, current node, fencing epoch) and the node leases
(SPEC §1-§5, DESIGN §3-§4), on the same SQLAlchemy engine settings as
`SQLStore` (schema version 2 and later).

Rules:
- What may be configured is decided by the pure rules of `xmpp_ha.ha.groups`;
  a refused request raises GroupError / ParamError (ValueError) with the
  reason. Database failures raise StoreUnavailable naming the store.
- Writes are single transactions. Configuration writes (nodes, groups,
  parameters) and assignment writes (placing users, moving them) each
  serialize between nodes: on PostgreSQL by an advisory transaction lock, on
  SQLite by BEGIN IMMEDIATE. So "a node belongs to one group" holds under
  concurrent admins, and a user placed while its group fails over lands
  where its group's users are served.
- A user's `epoch` grows by one whenever its `current_node` changes; that is
  the fencing token (DESIGN §4). A move of many users is one UPDATE ...
  RETURNING, whatever their number. `claim` is a compare-and-set on the epoch.
- Users added while their home node is failed over (SPEC §5) are accepted:
  they are placed on the node that serves that home node's users, and a
  fallback moves them home with the others (`serving_nodes`).
- A lease is a counter a node bumps every heartbeat interval; peers compare
  counters, never clocks.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from xmpp_ha.ha.groups import (
    DEFAULT_ASSIGNMENT_MODE,
    AssignmentMode,
    GroupError,
    NoSuchGroup,
    NoSuchNode,
    ParamError,
    ReloginLimits,
    SRMParams,
    check_member_shape,
    check_members,
    plan_assignment,
    rebalance,
    serving_nodes,
    validate_description,
    validate_group_name,
    validate_node_name,
    validate_port,
    validate_software_version,
)
from xmpp_ha.ha.srm import GroupRecord, Move
from xmpp_ha.store.migrations import (
    BEGIN_OPTION,
    CURRENT_SCHEMA_VERSION,
    schema_version,
)
from xmpp_ha.store.repository import NoSuchUser
from xmpp_ha.store.schema import assignments, cluster_params, groups, leases, users
from xmpp_ha.store.schema import nodes as node_table
from xmpp_ha.store.sql import EngineStore, create_engine

__all__ = [
    "STATUS_HEALTHY",
    "STATUS_SCHEMA_MISMATCH",
    "STATUS_UNREACHABLE",
    "Assignment",
    "ClusterStore",
    "Group",
    "NodeInfo",
    "store_status",
]

# "Replication status" (SPEC §2) of a node's view of the store.
STATUS_UNREACHABLE = 0  # the store does not answer (or answers with errors)
STATUS_SCHEMA_MISMATCH = 1  # reachable, but no schema or another version than this software's
STATUS_HEALTHY = 2  # reachable, schema current: set up and healthy

_CONFIG_LOCK = 0x786D7071  # pg_advisory_xact_lock keys; migrations uses 0x786D7070
_ASSIGN_LOCK = 0x786D7072
_MODE_KEY = "user_assignment_mode"
_PARAM_KEYS = frozenset(item.name for item in fields(SRMParams))
_IN_CHUNK = 500  # names per IN (...) list
_WRITE = {BEGIN_OPTION: "BEGIN IMMEDIATE"}


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    host: str
    c2s_port: int
    admin_port: int
    service_port: int
    software_version: str
    relogin_lower: float = 120.0  # seconds; see ReloginLimits
    relogin_upper: float = 537.0

    @property
    def relogin(self) -> ReloginLimits:
        return ReloginLimits(self.relogin_lower, self.relogin_upper)


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    description: str
    ha_enabled: bool
    nodes: tuple[str, ...]  # one or two; the first is the active node in active-standby
    record: GroupRecord  # the failover record

    def peer(self, node: str) -> str | None:
        """The other member, or None (single-node group, or `node` not a member)."""
        if node not in self.nodes or len(self.nodes) != 2:
            return None
        return self.nodes[1] if self.nodes[0] == node else self.nodes[0]


@dataclass(frozen=True, slots=True)
class Assignment:
    username: str
    home_node: str | None  # where the user lives when its group is normal
    current_node: str | None  # where the user is served now
    epoch: int  # fencing token: grows with every change of current_node


def _node_info(row: Any) -> NodeInfo:
    return NodeInfo(
        row.name,
        row.host,
        row.c2s_port,
        row.admin_port,
        row.service_port,
        row.software_version,
        float(row.relogin_lower),
        float(row.relogin_upper),
    )


def _record(row: Any) -> GroupRecord:
    return GroupRecord(
        failed_over=row.failed_over,
        by_admin=bool(row.failed_over_by_admin),
        failed_mode=bool(row.failed_mode),
        transition=Move(row.transition) if row.transition is not None else None,
        transition_node=row.transition_node,
    )


def _group(row: Any) -> Group:
    members = (row.node1,) if row.node2 is None else (row.node1, row.node2)
    return Group(row.name, row.description, bool(row.ha_enabled), members, _record(row))


def _assignment(row: Any) -> Assignment:
    return Assignment(row.username, row.home_node, row.current_node, int(row.epoch))


def _chunks(names: Sequence[str]) -> list[Sequence[str]]:
    return [names[start : start + _IN_CHUNK] for start in range(0, len(names), _IN_CHUNK)]


def _members_in(names: Sequence[str]) -> ColumnElement[bool]:
    return or_(groups.c.node1.in_(names), groups.c.node2.in_(names))


class ClusterStore(EngineStore):
    """The group's shared state; see the module docstring for its rules."""

    def _upsert(self, connection: AsyncConnection, table: Any) -> Any:
        dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
        return dialect.insert(table)

    # --- nodes -------------------------------------------------------------------

    async def register_node(
        self,
        name: str,
        host: str,
        c2s_port: int,
        admin_port: int,
        service_port: int,
        software_version: str,
    ) -> NodeInfo:
        """Add the node, or update its address and version; its re-login limits stay."""
        validate_node_name(name)
        if not isinstance(host, str) or not host.strip():
            raise GroupError(f"host of node {name!r} must not be empty")
        values = {
            "name": name,
            "host": host,
            "c2s_port": validate_port("c2s_port", c2s_port),
            "admin_port": validate_port("admin_port", admin_port),
            "service_port": validate_port("service_port", service_port),
            "software_version": validate_software_version(software_version),
        }
        async with self._transaction(write=True, lock=_CONFIG_LOCK) as conn:
            statement = self._upsert(conn, node_table).values(**values)
            statement = statement.on_conflict_do_update(
                index_elements=[node_table.c.name],
                set_={key: statement.excluded[key] for key in values if key != "name"},
            )
            await conn.execute(statement)
            row = (await conn.execute(select(node_table).where(node_table.c.name == name))).one()
        return _node_info(row)

    async def get_node(self, name: str) -> NodeInfo | None:
        async with self._transaction() as conn:
            row = (await conn.execute(select(node_table).where(node_table.c.name == name))).first()
        return None if row is None else _node_info(row)

    async def list_nodes(self) -> list[NodeInfo]:
        async with self._transaction() as conn:
            return [
                _node_info(row) for row in await conn.execute(select(node_table).order_by("name"))
            ]

    async def set_relogin_limits(self, node: str, lower: float, upper: float) -> ReloginLimits:
        limits = ReloginLimits(lower, upper)
        async with self._transaction(write=True, lock=_CONFIG_LOCK) as conn:
            result = await conn.execute(
                update(node_table)
                .where(node_table.c.name == node)
                .values(relogin_lower=limits.lower, relogin_upper=limits.upper)
            )
            if result.rowcount == 0:
                raise NoSuchNode(node)
        return limits

    # --- groups ------------------------------------------------------------------

    async def create_group(
        self, name: str, description: str, nodes: Sequence[str], ha_enabled: bool = False
    ) -> Group:
        validate_group_name(name)
        validate_description(description)
        members = check_member_shape(name, nodes)
        async with self._transaction(write=True, lock=_CONFIG_LOCK) as conn:
            taken = await conn.scalar(
                select(groups.c.name).where(func.lower(groups.c.name) == name.lower())
            )
            if taken == name:
                raise GroupError(f"a group named {name!r} already exists")
            if taken is not None:
                raise GroupError(
                    f"group name {name!r} is taken by group {taken!r} (names are unique"
                    " regardless of case)"
                )
            members_checked = await self._check_members(conn, name, members)
            await conn.execute(
                insert(groups).values(
                    name=name,
                    description=description,
                    ha_enabled=bool(ha_enabled),
                    node1=members_checked[0],
                    node2=members_checked[1] if len(members_checked) == 2 else None,
                )
            )
            return await self._group(conn, name)

    async def _check_members(
        self, conn: AsyncConnection, name: str, members: Sequence[str]
    ) -> tuple[str, ...]:
        wanted = [node for node in members if isinstance(node, str)]
        found = await conn.execute(
            select(node_table.c.name, node_table.c.software_version).where(
                node_table.c.name.in_(wanted)
            )
        )
        versions = {row.name: row.software_version for row in found}
        member_of: dict[str, str] = {}
        for row in await conn.execute(select(groups).where(_members_in(wanted))):
            for node in _group(row).nodes:
                member_of[node] = row.name
        return check_members(name, members, versions=versions, member_of=member_of)

    async def update_group(
        self, name: str, description: str | None = None, ha_enabled: bool | None = None
    ) -> Group:
        changes: dict[str, Any] = {}
        if description is not None:
            changes["description"] = validate_description(description)
        if ha_enabled is not None:
            changes["ha_enabled"] = bool(ha_enabled)
        async with self._transaction(write=True, lock=_CONFIG_LOCK) as conn:
            await self._update_group(conn, name, changes)
            return await self._group(conn, name)

    async def delete_group(self, name: str) -> None:
        """Refused while the group is failed over, moving users, or in failed mode."""
        async with self._transaction(write=True, lock=_CONFIG_LOCK) as conn:
            group = await self._group(conn, name)
            record = group.record
            if record.transition is not None:
                raise GroupError(
                    f"group {name!r} cannot be deleted while {record.transition_node!r} is"
                    f" moving users ({record.transition.value})"
                )
            if record.failed_over is not None:
                raise GroupError(
                    f"group {name!r} cannot be deleted while node {record.failed_over!r} is"
                    " failed over; fall back first"
                )
            if record.failed_mode:
                raise GroupError(
                    f"group {name!r} cannot be deleted while it runs in failed mode; run recovery first"
                )
            await conn.execute(groups.delete().where(groups.c.name == name))

    async def get_group(self, name: str) -> Group | None:
        async with self._transaction() as conn:
            row = (await conn.execute(select(groups).where(groups.c.name == name))).first()
        return None if row is None else _group(row)

    async def group_of_node(self, node: str) -> Group | None:
        async with self._transaction() as conn:
            row = (await conn.execute(select(groups).where(_members_in([node])))).first()
        return None if row is None else _group(row)

    async def list_groups(self) -> list[Group]:
        async with self._transaction() as conn:
            return [_group(row) for row in await conn.execute(select(groups).order_by("name"))]

    async def _group(self, conn: AsyncConnection, name: str) -> Group:
        row = (await conn.execute(select(groups).where(groups.c.name == name))).first()
        if row is None:
            raise NoSuchGroup(name)
        return _group(row)

    async def _update_group(
        self, conn: AsyncConnection, name: str, changes: Mapping[str, Any]
    ) -> None:
        result = await conn.execute(
            update(groups).where(groups.c.name == name).values(**changes, updated_at=func.now())
        )
        if result.rowcount == 0:
            raise NoSuchGroup(name)

    # --- the failover record (xmpp_ha.ha.srm.GroupRecord) ---------------------------------

    async def get_record(self, group: str) -> GroupRecord:
        async with self._transaction() as conn:
            return (await self._group(conn, group)).record

    async def set_failed_over(self, group: str, node: str | None, by_admin: bool = False) -> None:
        """Record that `node`'s users are on its peer; None: both serve their own."""
        async with self._transaction(write=True, lock=_CONFIG_LOCK) as conn:
            if node is not None:
                self._require_member(await self._group(conn, group), node)
            await self._update_group(
                conn,
                group,
                {"failed_over": node, "failed_over_by_admin": node is not None and by_admin},
            )

    async def set_failed_mode(self, group: str, failed: bool) -> None:
        async with self._transaction(write=True, lock=_CONFIG_LOCK) as conn:
            await self._update_group(conn, group, {"failed_mode": bool(failed)})

    async def begin_transition(self, group: str, move: Move, node: str) -> None:
        """Record that `node` starts `move`; the same node may record it again (a resumed
        move) or replace its own; a move recorded by the other member is refused."""
        async with self._transaction(write=True, lock=_CONFIG_LOCK) as conn:
            current = await self._group(conn, group)
            self._require_member(current, node)
            busy = current.record
            if busy.transition is not None and busy.transition_node != node:
                raise GroupError(
                    f"group {group!r}: {busy.transition_node!r} is already moving users"
                    f" ({busy.transition.value}); {node!r} cannot start {move.value}"
                )
            await self._update_group(
                conn, group, {"transition": Move(move).value, "transition_node": node}
            )

    async def end_transition(self, group: str) -> None:
        async with self._transaction(write=True, lock=_CONFIG_LOCK) as conn:
            await self._update_group(conn, group, {"transition": None, "transition_node": None})

    @staticmethod
    def _require_member(group: Group, node: str) -> None:
        if node not in group.nodes:
            raise GroupError(
                f"node {node!r} is not a member of group {group.name!r}"
                f" (members: {', '.join(group.nodes)})"
            )

    # --- cluster parameters --------------------------------------------------------

    async def get_params(self) -> SRMParams:
        """The SRM parameters; the SPEC's default for any never set."""
        async with self._transaction() as conn:
            return await self._params(conn)

    async def _params(self, conn: AsyncConnection) -> SRMParams:
        stored = await conn.execute(
            select(cluster_params).where(cluster_params.c.key.in_(sorted(_PARAM_KEYS)))
        )
        values = {row.key: json.loads(row.value) for row in stored}
        try:
            return SRMParams.from_mapping(values)
        except ParamError as exc:
            raise ParamError(f"the stored SRM parameters are invalid: {exc}") from None

    async def set_params(self, changes: Mapping[str, Any]) -> SRMParams:
        """Apply `changes` to the stored parameters; the merged result must be valid."""
        async with self._transaction(write=True, lock=_CONFIG_LOCK) as conn:
            merged = SRMParams.from_mapping(changes, base=await self._params(conn))
            values = merged.to_mapping()
            await self._put(conn, {key: values[key] for key in changes})
        return merged

    async def get_assignment_mode(self) -> AssignmentMode:
        async with self._transaction() as conn:
            stored = await conn.scalar(
                select(cluster_params.c.value).where(cluster_params.c.key == _MODE_KEY)
            )
        return (
            DEFAULT_ASSIGNMENT_MODE if stored is None else AssignmentMode.parse(json.loads(stored))
        )

    async def set_assignment_mode(self, mode: AssignmentMode | str) -> AssignmentMode:
        """Record the cluster's mode; `apply_mode` then moves the users' homes."""
        chosen = mode if isinstance(mode, AssignmentMode) else AssignmentMode.parse(mode)
        async with self._transaction(write=True, lock=_CONFIG_LOCK) as conn:
            await self._put(conn, {_MODE_KEY: chosen.value})
        return chosen

    async def _put(self, conn: AsyncConnection, values: Mapping[str, Any]) -> None:
        if not values:
            return
        statement = self._upsert(conn, cluster_params)
        statement = statement.on_conflict_do_update(
            index_elements=[cluster_params.c.key], set_={"value": statement.excluded.value}
        )
        await conn.execute(
            statement, [{"key": key, "value": json.dumps(value)} for key, value in values.items()]
        )

    # --- user assignment -------------------------------------------------------------

    async def assign_user(
        self, username: str, mode: AssignmentMode, group_nodes: Sequence[str]
    ) -> str | None:
        """Give the user a home node (kept if it has one); returns it (None: unassigned).

        NoSuchUser when the user does not exist.
        """
        name = username.casefold()
        async with self._transaction(write=True, lock=_ASSIGN_LOCK) as conn:
            found = await conn.scalar(
                select(users.c.username).where(users.c.username == name).with_for_update()
            )
            if found is None:
                raise NoSuchUser(name)
            home = await conn.scalar(
                select(assignments.c.home_node).where(assignments.c.username == name)
            )
            if home is not None:
                return str(home)
            placed = await self._place(conn, [name], mode, group_nodes)
        return placed.get(name)

    async def assign_unassigned(self, mode: AssignmentMode, group_nodes: Sequence[str]) -> int:
        """Give every user without a home node one; returns how many were placed."""
        if mode is AssignmentMode.NONE or not group_nodes:
            return 0
        async with self._transaction(write=True, lock=_ASSIGN_LOCK) as conn:
            query = (
                select(users.c.username)
                .select_from(users.outerjoin(assignments))
                .where(assignments.c.home_node.is_(None))
                .order_by(users.c.username)
            )
            names = list(await conn.scalars(query))
            placed = await self._place(conn, names, mode, group_nodes)
        return len(placed)

    async def _place(
        self,
        conn: AsyncConnection,
        names: Sequence[str],
        mode: AssignmentMode,
        group_nodes: Sequence[str],
    ) -> dict[str, str]:
        if mode is AssignmentMode.NONE or not names or not group_nodes:
            return {}
        counts = await self._home_counts(conn, group_nodes)
        serving = await self._serving(conn, group_nodes)
        placed: dict[str, str] = {}
        for name in names:
            home = plan_assignment(mode, group_nodes, counts)
            if home is None:
                return {}
            counts[home] = counts.get(home, 0) + 1
            placed[name] = home
        statement = self._upsert(conn, assignments)
        statement = statement.on_conflict_do_update(
            index_elements=[assignments.c.username],
            set_={
                "home_node": statement.excluded.home_node,
                "current_node": statement.excluded.current_node,
                "epoch": assignments.c.epoch + 1,
            },
        )
        rows = [
            {"username": name, "home_node": home, "current_node": serving.get(home, home)}
            for name, home in placed.items()
        ]
        await conn.execute(statement, rows)
        return placed

    async def _home_counts(self, conn: AsyncConnection, names: Sequence[str]) -> dict[str, int]:
        query = (
            select(assignments.c.home_node, func.count())
            .where(assignments.c.home_node.in_(names))
            .group_by(assignments.c.home_node)
        )
        return {row[0]: int(row[1]) for row in await conn.execute(query)}

    async def _serving(self, conn: AsyncConnection, names: Sequence[str]) -> dict[str, str]:
        found = [
            _group(row) for row in await conn.execute(select(groups).where(_members_in(names)))
        ]
        return serving_nodes((group.nodes, group.record) for group in found)

    async def apply_mode(self, mode: AssignmentMode, group_nodes: Sequence[str]) -> int:
        """Move home nodes to follow `mode` with as few moves as possible; returns how many.

        A user's current node follows its home only when the user is where its
        old home's users are served (not moved away by a failover); a new home
        that is failed over keeps the user on the node serving it.
        """
        if mode is AssignmentMode.NONE or not group_nodes:
            return 0
        async with self._transaction(write=True, lock=_ASSIGN_LOCK) as conn:
            query = select(assignments.c.username, assignments.c.home_node).where(
                assignments.c.home_node.in_(group_nodes)
            )
            by_home: dict[str | None, list[str]] = defaultdict(list)
            for row in await conn.execute(query):
                by_home[row.home_node].append(row.username)
            moves = rebalance(mode, by_home, group_nodes)
            serving = await self._serving(conn, group_nodes)
            old_home = {user: home for home, names in by_home.items() for user in names}
            pairs: dict[tuple[str, str], list[str]] = defaultdict(list)
            for user, new_home in sorted(moves.items()):
                pairs[(str(old_home[user]), new_home)].append(user)
            for (old, new), names in pairs.items():
                was, will = serving.get(old, old), serving.get(new, new)
                values: dict[str, Any] = {"home_node": new}
                if was != will:
                    follows = assignments.c.current_node == was
                    values["current_node"] = case((follows, will), else_=assignments.c.current_node)
                    values["epoch"] = case(
                        (follows, assignments.c.epoch + 1), else_=assignments.c.epoch
                    )
                for chunk in _chunks(names):
                    await conn.execute(
                        update(assignments)
                        .where(assignments.c.username.in_(chunk), assignments.c.home_node == old)
                        .values(**values)
                    )
        return len(moves)

    async def get_assignment(self, username: str) -> Assignment | None:
        query = select(assignments).where(assignments.c.username == username.casefold())
        async with self._transaction() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else _assignment(row)

    async def all_assignments(self) -> dict[str, Assignment]:
        async with self._transaction() as conn:
            return {
                row.username: _assignment(row) for row in await conn.execute(select(assignments))
            }

    async def count_by_node(self) -> dict[str, dict[str, int]]:
        """{node: {"home": users homed there, "current": users served there}}, every
        registered node included."""
        async with self._transaction() as conn:
            counts: dict[str, dict[str, int]] = {
                name: {"home": 0, "current": 0}
                for name in await conn.scalars(select(node_table.c.name))
            }
            for kind, column in (
                ("home", assignments.c.home_node),
                ("current", assignments.c.current_node),
            ):
                query = select(column, func.count()).where(column.is_not(None)).group_by(column)
                for node, count in await conn.execute(query):
                    counts.setdefault(node, {"home": 0, "current": 0})[kind] = int(count)
        return counts

    # --- fenced moves: one UPDATE ... RETURNING each, every moved row's epoch + 1 -----

    async def _move(self, where: ColumnElement[bool], current: Any) -> list[str]:
        statement = (
            update(assignments)
            .where(where)
            .values(current_node=current, epoch=assignments.c.epoch + 1)
            .returning(assignments.c.username)
        )
        # urgent: users wait for their move; on SQLite it goes before queued offline writes
        async with self._transaction(write=True, lock=_ASSIGN_LOCK, urgent=True) as conn:
            return sorted(await conn.scalars(statement))

    async def move_users(self, from_node: str, to_node: str) -> list[str]:
        """Take over: every user served on `from_node` is now served on `to_node`."""
        if from_node == to_node:
            return []
        return await self._move(assignments.c.current_node == from_node, to_node)

    async def give_back(self, holder: str, owner: str) -> list[str]:
        """Fallback: users homed on `owner` and served on `holder` go home."""
        if holder == owner:
            return []
        where = and_(assignments.c.home_node == owner, assignments.c.current_node == holder)
        return await self._move(where, owner)

    async def take_all(self, to_node: str, group_nodes: Sequence[str]) -> list[str]:
        """Auto-recovery: every user homed in the group is served on `to_node`."""
        where = and_(
            assignments.c.home_node.in_(list(group_nodes)),
            or_(assignments.c.current_node.is_(None), assignments.c.current_node != to_node),
        )
        return await self._move(where, to_node)

    async def reset_to_home(self, group_nodes: Sequence[str]) -> list[str]:
        """Recovery: every user homed in the group is served on its home node."""
        where = and_(
            assignments.c.home_node.in_(list(group_nodes)),
            or_(
                assignments.c.current_node.is_(None),
                assignments.c.current_node != assignments.c.home_node,
            ),
        )
        return await self._move(where, assignments.c.home_node)

    async def claim_users(
        self, usernames: Sequence[str], from_node: str, to_node: str
    ) -> list[str]:
        """Serve these users on `to_node` where `from_node` serves them now (one fenced
        move, one transaction); returns the users moved."""
        names = sorted({name.casefold() for name in usernames})
        if not names or from_node == to_node:
            return []
        where = and_(assignments.c.username.in_(names), assignments.c.current_node == from_node)
        return await self._move(where, to_node)

    async def claim(self, username: str, node: str, expected_epoch: int) -> bool:
        """Serve the user on `node` if its epoch is still `expected_epoch` (then epoch + 1)."""
        statement = (
            update(assignments)
            .where(
                assignments.c.username == username.casefold(),
                assignments.c.epoch == expected_epoch,
            )
            .values(current_node=node, epoch=assignments.c.epoch + 1)
        )
        async with self._transaction(write=True) as conn:
            return (await conn.execute(statement)).rowcount == 1

    # --- leases ------------------------------------------------------------------

    async def renew_lease(self, node: str) -> int:
        """Bump the node's lease; returns the new counter (1 on the first renewal).
        Urgent: on SQLite it goes before this process's other waiting writers."""
        async with self._transaction(write=True, urgent=True) as conn:
            statement = self._upsert(conn, leases).values(node=node, counter=1)
            statement = statement.on_conflict_do_update(
                index_elements=[leases.c.node],
                set_={"counter": leases.c.counter + 1, "renewed_at": func.now()},
            ).returning(leases.c.counter)
            return int((await conn.execute(statement)).scalar_one())

    async def read_lease(self, node: str) -> int | None:
        async with self._transaction() as conn:
            counter = await conn.scalar(select(leases.c.counter).where(leases.c.node == node))
        return None if counter is None else int(counter)

    # --- health ------------------------------------------------------------------

    async def status_value(self, timeout: float = 10.0) -> int:
        """The "replication status" (SPEC §2): STATUS_HEALTHY (2), STATUS_SCHEMA_MISMATCH
        (1) or STATUS_UNREACHABLE (0). Never raises."""
        try:
            found = await asyncio.wait_for(schema_version(self._engine), timeout)
        except Exception:  # a health probe: any failure to answer means unreachable
            return STATUS_UNREACHABLE
        return STATUS_HEALTHY if found == CURRENT_SCHEMA_VERSION else STATUS_SCHEMA_MISMATCH


async def store_status(url: str, timeout: float = 10.0) -> int:
    """`ClusterStore.status_value` for a store URL, without opening it first."""
    try:
        engine = create_engine(url)
    except Exception:
        return STATUS_UNREACHABLE
    try:
        return await ClusterStore(engine).status_value(timeout)
    finally:
        await engine.dispose()
