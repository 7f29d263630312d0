"""Presence (RFC 6121 §4): broadcast, probes, directed presence, going offline.

Rules:
- Initial presence (the first available presence of a session) is sent to
  every contact with a 'from' or 'both' subscription and to all of the
  user's available resources (the sender included); probes go to every
  contact the user is subscribed to, stored subscription requests and
  offline messages are delivered.
- Directed presence to an entity outside the broadcast set is remembered,
  so that the entity hears 'unavailable' when the session goes.
- Subscription stanzas are the roster service's business.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from xmpp_ha.core.errors import StanzaCondition, StanzaError
from xmpp_ha.core.jid import JID
from xmpp_ha.protocol.stanzas import (
    SUBSCRIPTION_TYPES,
    StanzaHeader,
    make_presence,
    priority_of,
    readdressed,
)

if TYPE_CHECKING:
    from xmpp_ha.im.manager import SessionManager, UserRecord
    from xmpp_ha.im.session import ClientSession

_SEES_US = ("from", "both")  # the contact is subscribed to the user's presence
_WE_SEE = ("to", "both")  # the user is subscribed to the contact's presence


class PresenceService:
    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager

    # --- from the user's own session ----------------------------------------

    def outbound(
        self, session: ClientSession, stanza: ET.Element, header: StanzaHeader
    ) -> Awaitable[None] | None:
        if session.record is None:
            return None  # the session ended (its unavailable presence went out already)
        if not self.manager.switches.presence_engine:
            raise StanzaError(StanzaCondition.SERVICE_UNAVAILABLE, "presence engine stopped")
        if header.type in SUBSCRIPTION_TYPES:
            return self.manager.roster.outbound_subscription(session, stanza, header)
        if header.to is None:
            if header.type == "available":
                self._broadcast_available(session, stanza)
                return None
            if header.type == "unavailable":
                self._broadcast_unavailable(session, stanza)
                return None
            raise StanzaError(StanzaCondition.BAD_REQUEST, f"{header.type} presence needs a 'to'")
        if header.type == "probe":
            return self._answer_probe_from_user(session, header.to)
        if header.type in ("available", "unavailable"):
            self._track_directed(session, header)
        return self.manager.route(stanza, header)

    def _track_directed(self, session: ClientSession, header: StanzaHeader) -> None:
        assert header.to is not None and session.record is not None
        target = str(header.to)
        item = session.record.roster.get(str(header.to.bare))
        if item is not None and item.subscription in _SEES_US:
            return
        if header.type == "available" and session.available:
            session.directed.add(target)
        else:
            session.directed.discard(target)

    def _broadcast_available(self, session: ClientSession, stanza: ET.Element) -> None:
        assert session.jid is not None and session.record is not None
        initial = not session.available
        session.priority = priority_of(stanza)
        session.available = True
        session.presence_due = False
        session.presence = stanza
        record = session.record
        for own in record.available():
            if own.jid is not None:
                own.send(readdressed(stanza, str(own.jid)))
        self._to_subscribers(record, stanza)
        if not initial:
            return
        self.manager.became_available(record.username)
        for own in record.available():
            if own is not session and own.presence is not None and own.jid is not None:
                session.send(readdressed(own.presence, str(session.jid)))
        # beside, not before, the session's next stanzas: they do not depend on it, and
        # a switch's round trip must not wait for the look for stored messages
        session.beside(self._initial_extras(session))

    async def _initial_extras(self, session: ClientSession) -> None:
        assert session.jid is not None and session.record is not None
        record = session.record
        for contact, item in list(record.roster.items()):
            if item.subscription in _WE_SEE:
                probe = make_presence(str(session.jid), contact, "probe")
                self._send_off(self.manager.route(probe, StanzaHeader.of(probe)))
        for request in list(record.pending_in.values()):
            session.send(ET.fromstring(request.stanza))
        if session.priority >= 0:
            await self.manager.messages.flush_offline(session)

    def _broadcast_unavailable(self, session: ClientSession, stanza: ET.Element) -> None:
        assert session.jid is not None and session.record is not None
        if not session.available:
            return
        session.available = False
        session.presence = None
        record = session.record
        for own in record.sessions.values():
            if (own.available or own is session) and own.jid is not None:
                own.send(readdressed(stanza, str(own.jid)))
        self._to_subscribers(record, stanza, directed=session.directed)

    async def announce_offline(self, username: str) -> None:
        """A user whose node died: its subscribers hear 'unavailable' from its bare JID
        (the resources are unknown here), so nobody keeps a stale presence."""
        bare = str(self.manager.bare(username))
        for item in await self.manager.repo.get_roster(username):
            if item.subscription in _SEES_US:
                stanza = make_presence(bare, item.contact, "unavailable")
                self._send_off(self.manager.route(stanza, StanzaHeader.of(stanza)))

    def went_offline(self, session: ClientSession, jid: JID, record: UserRecord) -> None:
        """A session vanished while available: everyone who saw it hears 'unavailable'."""
        stanza = make_presence(str(jid), None, "unavailable")
        for own in record.available():
            if own.jid is not None:
                own.send(readdressed(stanza, str(own.jid)))
        self._to_subscribers(record, stanza, directed=session.directed)
        session.directed = set()

    def _to_subscribers(
        self, record: UserRecord, stanza: ET.Element, directed: set[str] | None = None
    ) -> None:
        """Copies to every subscriber and directed-presence target, sent on their way
        (each recipient's stanzas keep their order; nobody waits for remote ones)."""
        targets = [
            contact for contact, item in record.roster.items() if item.subscription in _SEES_US
        ]
        if directed:
            targets.extend(directed)
            directed.clear()
        for target in targets:
            copy = readdressed(stanza, target)
            self._send_off(self.manager.route(copy, StanzaHeader.of(copy)))

    def _send_off(self, pending: Awaitable[None] | None) -> None:
        if pending is not None:
            self.manager.spawn(pending)

    def _answer_probe_from_user(self, session: ClientSession, to: JID) -> Awaitable[None] | None:
        probe = make_presence(str(session.jid), str(to.bare), "probe")
        return self.manager.route(probe, StanzaHeader.of(probe))

    # --- to a user of this node ---------------------------------------------

    def deliver_local(
        self,
        record: UserRecord,
        stanza: ET.Element,
        header: StanzaHeader,
        *,
        from_peer: bool = False,
    ) -> Awaitable[None] | None:
        """`from_peer`: handed over by the other node of the group."""
        if header.type in SUBSCRIPTION_TYPES:
            return self.manager.roster.inbound_subscription(record.username, stanza, header)
        if header.type == "probe":
            self._answer_probe(record, header)
            return None
        if from_peer and header.type == "unavailable" and self.live_here(header.sender):
            return None  # stale: the node it left says so (dual connections: it moved here)
        to = header.to
        assert to is not None
        if to.resource:
            target = record.sessions.get(to.resource)
            if target is not None:
                target.send(stanza)
            return None
        for target in record.available():
            target.send(stanza)
        return None

    def live_here(self, sender: JID) -> bool:
        """The sender's full JID is an active session here, available or about to be (a
        standby just activated): an 'unavailable' from it was sent by the node whose
        session of that resource ended after the user moved here."""
        if not sender.resource or sender.domain != self.manager.domain:
            return False
        record = self.manager.users.get(sender.local)
        session = record.sessions.get(sender.resource) if record is not None else None
        return session is not None and (session.available or session.presence_due)

    def _answer_probe(self, record: UserRecord, header: StanzaHeader) -> None:
        """Send each available resource's presence to a subscribed prober (§4.3.2)."""
        item = record.roster.get(str(header.sender.bare))
        if item is None or item.subscription not in _SEES_US:
            return
        for session in record.available():
            if session.presence is None or session.jid is None:
                continue
            reply = readdressed(session.presence, str(header.sender))
            reply.set("from", str(session.jid))
            self._send_off(self.manager.route(reply, StanzaHeader.of(reply)))

    async def deliver_offline(
        self, username: str, stanza: ET.Element, header: StanzaHeader
    ) -> None:
        if header.type in SUBSCRIPTION_TYPES:
            await self.manager.roster.inbound_subscription(username, stanza, header)
        # other presence to an offline user is dropped (RFC 6121 §4.3.2, §4.6.3)
