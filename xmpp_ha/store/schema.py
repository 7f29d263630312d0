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
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
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
