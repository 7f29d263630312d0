"""What the session manager needs from the shared store, as a typed protocol.

The im layer depends on this interface only; `xmpp_ha.store.sql` implements it
with SQLAlchemy 2 async over SQLite (default) or PostgreSQL. Users are named
by their localpart (the node serves one domain); contacts by bare JID text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

ScramMechanism = Literal["SCRAM-SHA-1", "SCRAM-SHA-256"]
Subscription = Literal["none", "to", "from", "both"]


@dataclass(frozen=True, slots=True)
class ScramCredentials:
    """RFC 5802 stored secrets: the password itself is never kept."""

    mechanism: ScramMechanism
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


@dataclass(frozen=True, slots=True)
class RosterItem:
    contact: str  # bare JID text
    name: str = ""
    subscription: Subscription = "none"
    ask: bool = False  # an outbound subscribe is pending ("pending out")
    approved: bool = False  # pre-approved inbound subscription (RFC 6121 §3.4)
    groups: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class PendingSubscription:
    """An inbound subscription request not yet answered ("pending in")."""

    contact: str  # bare JID of the requester
    stanza: str  # the serialized <presence type='subscribe'/>, redelivered at login


class UserExists(Exception):
    pass


class NoSuchUser(Exception):
    pass


class StoreUnavailable(Exception):
    """The store cannot be reached or answered with an error."""


class Repository(Protocol):
    # users and credentials
    async def add_user(self, username: str, password: str) -> None: ...
    async def set_password(self, username: str, password: str) -> None: ...
    async def delete_user(self, username: str) -> None: ...
    async def user_exists(self, username: str) -> bool: ...
    async def list_users(self) -> list[str]: ...
    async def import_users(self, accounts: Iterable[tuple[str, str]]) -> int: ...
    async def get_credentials(
        self, username: str, mechanism: ScramMechanism
    ) -> ScramCredentials | None: ...

    # roster (RFC 6121 §2) and subscriptions (§3)
    async def get_roster(self, username: str) -> list[RosterItem]: ...
    async def load_user(
        self, username: str
    ) -> tuple[list[RosterItem], list[PendingSubscription]]: ...
    async def load_users(
        self, usernames: Sequence[str]
    ) -> list[tuple[list[RosterItem], list[PendingSubscription]]]:
        """`load_user` for each of `usernames`, in order, in as few reads as it can."""
        ...

    async def get_roster_item(self, username: str, contact: str) -> RosterItem | None: ...
    async def put_roster_item(self, username: str, item: RosterItem) -> None: ...
    async def remove_roster_item(self, username: str, contact: str) -> None: ...
    async def roster_version(self, username: str) -> int: ...
    async def add_pending_subscription(
        self, username: str, request: PendingSubscription
    ) -> None: ...
    async def remove_pending_subscription(self, username: str, contact: str) -> None: ...
    async def get_pending_subscriptions(self, username: str) -> list[PendingSubscription]: ...

    # offline messages, oldest first
    async def store_offline(self, username: str, stanza: str, limit: int) -> bool:
        """Queue one stanza; False when the user's queue already holds `limit`."""
        ...

    async def store_offline_many(self, items: Sequence[tuple[str, str]], limit: int) -> list[bool]:
        """Queue (username, stanza) pairs in one transaction; says which were kept (the
        user's queue had room and the user exists)."""
        ...

    async def take_offline(self, username: str) -> list[str]:
        """Remove and return the user's queued stanzas, oldest first."""
        ...

    async def users_with_offline(self, usernames: Sequence[str]) -> set[str]:
        """Which of these users have queued stanzas (one read for many logins)."""
        ...

    async def count_offline(self, username: str) -> int: ...

    # health
    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""
        ...

    async def close(self) -> None: ...
