"""Message delivery (RFC 6121 §8.5), carbons (XEP-0280) and offline storage.

Rules:
- To a full JID whose session exists: that session. Otherwise normal and chat
  messages are treated as if sent to the bare JID, groupchat is refused and
  headline dropped.
- To a bare JID: every available session with the highest non-negative
  priority; when there is none, normal and chat messages are stored offline
  (with an XEP-0203 delay stamp) up to the per-user cap, after which the
  sender gets `<service-unavailable/>`.
- Carbons: chat messages (and normal ones with a body) are copied to the
  user's other resources that enabled carbons, unless marked private/no-copy.
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections.abc import Awaitable
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from xmpp_ha.core.batch import Batcher
from xmpp_ha.core.errors import StanzaCondition, StanzaError
from xmpp_ha.core.jid import JID
from xmpp_ha.im.offline import OfflineWriter
from xmpp_ha.protocol import ns
from xmpp_ha.protocol.stanzas import MESSAGE, OFFLINE_TYPES, StanzaHeader, delay, readdressed
from xmpp_ha.protocol.xml import serialize

if TYPE_CHECKING:
    from xmpp_ha.im.manager import SessionManager, UserRecord
    from xmpp_ha.im.session import ClientSession

_BODY = ns.tag(ns.CLIENT, "body")
_PRIVATE = ns.tag(ns.CARBONS, "private")
_NO_COPY = ns.tag(ns.HINTS, "no-copy")
_CARBON_TAGS = frozenset(ns.tag(ns.CARBONS, name) for name in ("sent", "received"))


def _carbon_eligible(stanza: ET.Element, message_type: str) -> bool:
    if message_type == "chat" or (message_type == "normal" and stanza.find(_BODY) is not None):
        return not any(
            child.tag in (_PRIVATE, _NO_COPY) or child.tag in _CARBON_TAGS for child in stanza
        )
    return False


def _carbon(direction: str, stanza: ET.Element, user: JID, to: JID) -> ET.Element:
    wrapper = ET.Element(
        MESSAGE, {"from": str(user.bare), "to": str(to), "type": stanza.get("type", "normal")}
    )
    carbon = ET.SubElement(wrapper, ns.tag(ns.CARBONS, direction))
    forwarded = ET.SubElement(carbon, ns.tag(ns.FORWARD, "forwarded"))
    forwarded.append(stanza)
    return wrapper


def utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class MessageService:
    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager
        self.offline = OfflineWriter(manager.repo, manager.limits.offline_messages_per_user)
        # logins at one time (a failover's activations) share one look for stored
        # messages (most find none), however many: every extra round costs a loop turn
        self._has_offline: Batcher[str, bool] = Batcher(self._users_with_offline, max_batch=10_000)

    def outbound(
        self, session: ClientSession, stanza: ET.Element, header: StanzaHeader
    ) -> Awaitable[None] | None:
        assert session.jid is not None  # the record is gone once the session ended, but
        # what the client sent before it went is still routed
        if header.to is None:  # RFC 6120 §10.3.1: addressed to the sender's bare JID
            stanza.set("to", str(session.jid.bare))
            header = replace(header, to=session.jid.bare)
        to = header.to
        assert to is not None
        if to.domain == self.manager.domain and not to.local:
            if header.type != "error":
                raise StanzaError(
                    StanzaCondition.SERVICE_UNAVAILABLE, "the server takes no messages"
                )
            return None
        if session.record is not None and _carbon_eligible(stanza, header.type):
            for other in session.record.sessions.values():
                if other is not session and other.carbons:
                    other.send(_carbon("sent", stanza, session.jid, other.jid or session.jid))
        return self.manager.route(stanza, header)

    def deliver_local(
        self, record: UserRecord, stanza: ET.Element, header: StanzaHeader, *, confirm: bool = False
    ) -> Awaitable[None] | None:
        """Deliver to the user's sessions here. `confirm`: the awaitable completes only once
        the receiving clients acknowledged it (XEP-0198), for a node that must not forget
        a stanza another node handed over before the client has it."""
        to = header.to
        assert to is not None
        if to.resource:
            target = record.sessions.get(to.resource)
            if target is not None:
                target.send(stanza)
                self._copy_received(record, stanza, header, exclude=(target,))
                return _receipts([target]) if confirm else None
            if header.type == "groupchat":
                return self.manager.bounce(stanza, StanzaError(StanzaCondition.SERVICE_UNAVAILABLE))
            if header.type not in OFFLINE_TYPES:
                return None
        targets = _highest_priority(record)
        if not targets:
            if header.type in OFFLINE_TYPES:
                return self.deliver_offline(record.username, stanza, header)
            if header.type == "groupchat":
                return self.manager.bounce(stanza, StanzaError(StanzaCondition.SERVICE_UNAVAILABLE))
            return None
        for target in targets:
            target.send(stanza)
        self._copy_received(record, stanza, header, exclude=targets)
        return _receipts(targets) if confirm else None

    def _copy_received(
        self,
        record: UserRecord,
        stanza: ET.Element,
        header: StanzaHeader,
        exclude: tuple[ClientSession, ...] | list[ClientSession],
    ) -> None:
        if not _carbon_eligible(stanza, header.type):
            return
        for other in record.sessions.values():
            if other.carbons and other not in exclude and other.jid is not None:
                other.send(_carbon("received", stanza, record.bare, other.jid))

    async def deliver_offline(
        self, username: str, stanza: ET.Element, header: StanzaHeader
    ) -> None:
        if header.type not in OFFLINE_TYPES:
            if header.type == "groupchat":
                pending = self.manager.bounce(
                    stanza, StanzaError(StanzaCondition.SERVICE_UNAVAILABLE)
                )
                if pending is not None:
                    await pending
            return
        async with self.manager.user_lock(username):
            record = self.manager.users.get(username)
            targets = _highest_priority(record) if record is not None else []
            if targets:  # the user came online meanwhile (and flushed): deliver instead
                for target in targets:
                    target.send(stanza)
                return
            _forget_lookups(record)
            kept = await self.offline.store(username, _stored_text(self._stamped(stanza)))
        if kept:
            self._stored(username)
        if not kept:
            full = await self.manager.repo.user_exists(username)  # else: no such user
            text = "offline storage is full" if full else ""
            pending = self.manager.bounce(
                stanza, StanzaError(StanzaCondition.SERVICE_UNAVAILABLE, text)
            )
            if pending is not None:
                await pending

    def _stamped(self, stanza: ET.Element) -> ET.Element:
        if stanza.find(ns.tag(ns.DELAY, "delay")) is not None:
            return stanza
        copy = readdressed(stanza, stanza.get("to", ""))
        delay(copy, from_domain=self.manager.domain, stamp=utc_stamp())
        return copy

    def look_for_offline(self, session: ClientSession) -> None:
        """Start looking for the user's stored messages now: a standby session was just
        activated and its presence comes one round trip later. `flush_offline` uses the
        answer unless messages were stored for the user meanwhile (then it looks again)."""
        assert session.jid is not None
        lookup = asyncio.ensure_future(self._has_offline(session.jid.local))
        lookup.add_done_callback(lambda done: done.cancelled() or done.exception())
        session.offline_lookup = lookup

    async def flush_offline(self, session: ClientSession) -> None:
        """Deliver stored messages to a session that just sent initial presence."""
        assert session.jid is not None
        async with self.manager.user_lock(session.jid.local):
            lookup, session.offline_lookup = session.offline_lookup, None
            if not await (lookup or self._has_offline(session.jid.local)):
                return
            stored = await self.manager.repo.take_offline(session.jid.local)
            if not stored:
                return
            if not session.can_receive:  # gone while we read: they stay stored
                await self.manager.repo.store_offline_many(
                    [(session.jid.local, text) for text in stored],
                    self.manager.limits.offline_messages_per_user,
                )
                return
            for text in stored:
                session.send(ET.fromstring(text))

    async def _users_with_offline(self, usernames: list[str]) -> list[bool]:
        found = await self.manager.repo.users_with_offline(usernames)
        return [username in found for username in usernames]

    def redeliver(self, messages: list[ET.Element]) -> list[Awaitable[None]]:
        """Messages a dead session never acknowledged go where the user is now: another
        resource here, the node that serves the user now (a failover moved it), else
        offline storage. They are on their way when this returns (each user's stanzas
        in transit keep their order); the awaitables complete once each was handed on."""
        pending: list[Awaitable[None]] = []
        for stanza in messages:
            step = self.manager.deliver(stanza, StanzaHeader.of(stanza))
            if step is not None:
                pending.append(step)
        return pending

    def _stored(self, username: str) -> None:
        for listener in self.manager.hooks.offline_stored:
            listener(username)

    async def flush_stored(self, username: str) -> None:
        """Another node stored messages for this user: hand them to its available
        sessions here, if it has any (they flushed the store when they became
        available, possibly just before those messages were written)."""
        record = self.manager.users.get(username)
        _forget_lookups(record)
        if record is None or not _highest_priority(record):
            return
        async with self.manager.user_lock(username):
            targets = (
                _highest_priority(record) if record is self.manager.users.get(username) else []
            )
            if not targets:
                return
            for text in await self.manager.repo.take_offline(username):
                stanza = ET.fromstring(text)
                for target in targets:
                    target.send(stanza)


def _forget_lookups(record: UserRecord | None) -> None:
    """Messages were stored for the user: a look for them started earlier is stale."""
    for session in record.sessions.values() if record is not None else ():
        session.offline_lookup = None


def _receipts(targets: list[ClientSession]) -> Awaitable[None] | None:
    """Completes when every target acknowledged what it was sent (those without stream
    management cannot: writing to them is all there is)."""
    pending = [receipt for target in targets if (receipt := target.receipt()) is not None]
    if not pending:
        return None
    return pending[0] if len(pending) == 1 else _every(pending)


async def _every(pending: list[asyncio.Future[None]]) -> None:
    for future in pending:
        await future


def _stored_text(stanza: ET.Element) -> str:
    """Self-contained XML (namespace declared) so that it parses back alone."""
    return serialize(stanza, parent_ns="").decode()


def _highest_priority(record: UserRecord) -> list[ClientSession]:
    best: list[ClientSession] = []
    top = 0
    for session in record.sessions.values():
        if not session.available or session.priority < 0:
            continue
        if not best or session.priority > top:
            best, top = [session], session.priority
        elif session.priority == top:
            best.append(session)
    return best
