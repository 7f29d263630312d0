"""The shared store's tables, as SQLAlchemy Core metadata (SQLite and PostgreSQL).

Rules:
- This module describes the *current* schema; `migrations` brings older stores
  to it step by step. A table added here needs a migration step that creates it.
- Users are keyed by their case-folded localpart. Every table that belongs to a
  user names it in `username` or `owner`, with a foreign key; `SQLStore.delete_user`
  still deletes those rows explicitly, so deletion never depends on the
  database enforcing foreign keys.
- Contacts are bare JID text, stored exactly as the im layer gives them.
- Offline messages are delivered in `id` order, and `id` only grows.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    false,
    func,
)

# Named constraints keep later ALTERs (drop or replace a constraint) portable.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

USERNAME_LENGTH = 1023  # RFC 7622 §3.3.1: a localpart is at most 1023 bytes

# SQLite only auto-assigns an INTEGER PRIMARY KEY; PostgreSQL gets BIGSERIAL.
_ROW_ID = BigInteger().with_variant(Integer(), "sqlite")


def _user_column(name: str, *, primary_key: bool = False) -> Column[str]:
    return Column(
        name,
        String(USERNAME_LENGTH),
        ForeignKey("users.username", ondelete="CASCADE"),
        primary_key=primary_key,
        nullable=False,
    )


schema_version = Table(
    "schema_version",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1
    Column("version", Integer, nullable=False),
    CheckConstraint("id = 1", name="single_row"),
)

users = Table(
    "users",
    metadata,
    Column("username", String(USERNAME_LENGTH), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

scram_credentials = Table(
    "scram_credentials",
    metadata,
    _user_column("username", primary_key=True),
    Column("mechanism", String(32), primary_key=True),  # "SCRAM-SHA-1" or "SCRAM-SHA-256"
    Column("salt", LargeBinary, nullable=False),
    Column("iterations", Integer, nullable=False),
    Column("stored_key", LargeBinary, nullable=False),
    Column("server_key", LargeBinary, nullable=False),
)

roster_items = Table(
    "roster_items",
    metadata,
    _user_column("owner", primary_key=True),
    Column("contact", Text, primary_key=True),
    Column("name", Text, nullable=False, default=""),
    Column("subscription", String(4), nullable=False, default="none"),
    Column("ask", Boolean, nullable=False, default=False),
    Column("approved", Boolean, nullable=False, default=False),
    Column("groups", Text, nullable=False, default="[]"),  # JSON list of group names
    CheckConstraint("subscription IN ('none', 'to', 'from', 'both')", name="subscription"),
)

# One row per user, created with the user; bumped on every roster change.
roster_versions = Table(
    "roster_versions",
    metadata,
    _user_column("owner", primary_key=True),
    Column("version", Integer, nullable=False, default=0),
)

pending_subscriptions = Table(
    "pending_subscriptions",
    metadata,
    _user_column("owner", primary_key=True),
    Column("contact", Text, primary_key=True),
    Column("stanza", Text, nullable=False),
)

offline_messages = Table(
    "offline_messages",
    metadata,
    Column("id", _ROW_ID, primary_key=True, autoincrement=True),
    _user_column("username"),
    Column("stanza", Text, nullable=False),
    Column("stored_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index(None, "username", "id"),
)

# Tables that belong to a user, children first: the order `delete_user` clears them.
USER_TABLES: tuple[tuple[Table, str], ...] = (
    (offline_messages, "username"),
    (pending_subscriptions, "owner"),
    (roster_items, "owner"),
    (roster_versions, "owner"),
    (scram_credentials, "username"),
)

# --- schema version 2: the redundancy group (SPEC §1-§5, DESIGN §3-§4) ---------------
# Written by `xmpp_ha.store.cluster.ClusterStore`. Nodes and groups are named
# by the administrator; the checks on those names live in `xmpp_ha.ha.groups`.

NODE_NAME_LENGTH = 128
GROUP_NAME_LENGTH = 128

nodes = Table(
    "nodes",
    metadata,
    Column("name", String(NODE_NAME_LENGTH), primary_key=True),
    Column("host", Text, nullable=False),  # where clients and the peer reach the node
    Column("c2s_port", Integer, nullable=False),
    Column("admin_port", Integer, nullable=False),
    Column("service_port", Integer, nullable=False),
    Column("software_version", String(64), nullable=False),
    Column("relogin_lower", Float, nullable=False, server_default="120"),  # seconds
    Column("relogin_upper", Float, nullable=False, server_default="537"),  # seconds
    Column("registered_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)


def _node_column(name: str, *, nullable: bool) -> Column[str]:
    return Column(name, String(NODE_NAME_LENGTH), ForeignKey("nodes.name"), nullable=nullable)


# One row per group, holding its failover record (`xmpp_ha.ha.srm.GroupRecord`).
groups = Table(
    "groups",
    metadata,
    Column("name", String(GROUP_NAME_LENGTH), primary_key=True),
    Column("description", String(128), nullable=False, default=""),
    Column("ha_enabled", Boolean, nullable=False, server_default=false()),
    _node_column("node1", nullable=False),
    _node_column("node2", nullable=True),
    Column("failed_over", String(NODE_NAME_LENGTH), nullable=True),  # whose users are on its peer
    Column("failed_over_by_admin", Boolean, nullable=False, server_default=false()),
    Column("failed_mode", Boolean, nullable=False, server_default=false()),
    Column("transition", String(16), nullable=True),  # a user move started, not finished
    Column("transition_node", String(NODE_NAME_LENGTH), nullable=True),  # who carries it out
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint(
        "transition IS NULL OR transition IN ('take-over', 'give-back', 'take-all')",
        name="transition",
    ),
    CheckConstraint("node2 IS NULL OR node2 <> node1", name="distinct_nodes"),
)

# Cluster-wide settings: SRM parameters and the user assignment mode, one JSON value a key.
cluster_params = Table(
    "cluster_params",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# Where each user lives. `epoch` grows on every change of `current_node`: the fencing token.
assignments = Table(
    "assignments",
    metadata,
    _user_column("username", primary_key=True),
    Column("home_node", String(NODE_NAME_LENGTH), nullable=True),
    Column("current_node", String(NODE_NAME_LENGTH), nullable=True),
    Column("epoch", BigInteger, nullable=False, server_default="0"),
    Index(None, "current_node"),
    Index(None, "home_node"),
)

# A node's liveness witness: it bumps `counter` every heartbeat interval.
leases = Table(
    "leases",
    metadata,
    Column("node", String(NODE_NAME_LENGTH), primary_key=True),
    Column("counter", BigInteger, nullable=False, server_default="0"),
    Column("renewed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

CLUSTER_TABLES: tuple[Table, ...] = (nodes, groups, cluster_params, assignments, leases)

# `SQLStore.delete_user` clears a user's assignment too (see the rules above).
USER_TABLES = ((assignments, "username"), *USER_TABLES)
