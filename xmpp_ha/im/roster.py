"""Roster management (RFC 6121 §2) and applying subscription outcomes (§3).

The decisions are in `subscriptions` (pure); this module applies them: it
writes the store, keeps the online user's cache in step, sends roster pushes
to interested resources and routes the stanzas the outcome asks for. Every
change to one user's roster runs under that user's lock.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace
from typing import TYPE_CHECKING

from xmpp_ha.core.errors import StanzaCondition, StanzaError
from xmpp_ha.core.jid import JID, InvalidJID
from xmpp_ha.im import subscriptions
from xmpp_ha.protocol import ns
from xmpp_ha.protocol.stanzas import IQ, StanzaHeader, iq_result, make_presence, readdressed
from xmpp_ha.protocol.xml import serialize
from xmpp_ha.store.repository import PendingSubscription, RosterItem

if TYPE_CHECKING:
    from xmpp_ha.im.manager import SessionManager
    from xmpp_ha.im.session import ClientSession

_QUERY = ns.tag(ns.ROSTER, "query")
_ITEM = ns.tag(ns.ROSTER, "item")
_GROUP = ns.tag(ns.ROSTER, "group")
MAX_GROUP_LENGTH = 1023
MAX_NAME_LENGTH = 1023


def item_element(item: RosterItem, *, removed: bool = False) -> ET.Element:
    attrs = {"jid": item.contact, "subscription": "remove" if removed else item.subscription}
    if item.name and not removed:
        attrs["name"] = item.name
    if item.ask and not removed:
        attrs["ask"] = "subscribe"
    element = ET.Element(_ITEM, attrs)
    if not removed:
        for group in item.groups:
            ET.SubElement(element, _GROUP).text = group
    return element


class RosterService:
    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager

    # --- jabber:iq:roster ----------------------------------------------------

    def get(self, session: ClientSession, stanza: ET.Element) -> None:
        assert session.record is not None
        session.roster_requested = True
        query = ET.Element(_QUERY)
        for item in session.record.roster.values():
            query.append(item_element(item))
        session.send(iq_result(stanza, query))

    async def set(self, session: ClientSession, stanza: ET.Element) -> None:
        assert session.record is not None and session.jid is not None
        query = stanza[0]
        items = query.findall(_ITEM)
        if len(items) != 1:
            raise StanzaError(StanzaCondition.BAD_REQUEST, "a roster set carries one item")
        element = items[0]
        try:
            contact = str(JID.parse(element.get("jid", "")).bare)
        except InvalidJID as exc:
            raise StanzaError(StanzaCondition.JID_MALFORMED, "bad jid in roster item") from exc
        username = session.jid.local
        if element.get("subscription") == "remove":
            await self._remove(session, contact)
        else:
            await self._update(username, contact, element)
        session.send(iq_result(stanza))

    async def _update(self, username: str, contact: str, element: ET.Element) -> None:
        name = element.get("name", "")
        groups = tuple(group.text or "" for group in element.findall(_GROUP))
        if len(set(groups)) != len(groups) or any(
            not g or len(g) > MAX_GROUP_LENGTH for g in groups
        ):
            raise StanzaError(StanzaCondition.BAD_REQUEST, "groups must be distinct and non-empty")
        if len(name) > MAX_NAME_LENGTH:
            raise StanzaError(StanzaCondition.NOT_ACCEPTABLE, "name too long")
        async with self.manager.user_lock(username):
            current = await self._item(username, contact) or RosterItem(contact=contact)
            await self._save(username, replace(current, name=name, groups=groups))

    async def _remove(self, session: ClientSession, contact: str) -> None:
        assert session.jid is not None
        username = session.jid.local
        async with self.manager.user_lock(username):
            item = await self._item(username, contact)
            if item is None:
                raise StanzaError(StanzaCondition.ITEM_NOT_FOUND, "no such roster item")
            await self.manager.repo.remove_roster_item(username, contact)
            record = self.manager.users.get(username)
            if record is not None:
                record.roster.pop(contact, None)
            self._push(username, item, removed=True)
        bare = str(session.jid.bare)
        # RFC 6121 §2.5.2: cancel both directions of the subscription
        if item.subscription in ("to", "both") or item.ask:
            await self._route(make_presence(bare, contact, "unsubscribe"))
        if item.subscription in ("from", "both"):
            await self._route(make_presence(bare, contact, "unsubscribed"))

    # --- subscriptions -------------------------------------------------------

    async def outbound_subscription(
        self, session: ClientSession, stanza: ET.Element, header: StanzaHeader
    ) -> None:
        assert session.jid is not None and header.to is not None
        username = session.jid.local
        contact = str(header.to.bare)
        async with self.manager.user_lock(username):
            item = await self._item(username, contact)
            pending = await self._pending(username, contact)
            outcome = subscriptions.outbound(header.type, contact, item, pending)
            await self._apply(username, contact, outcome)
        if outcome.route:
            routed = readdressed(stanza, contact)
            routed.set("from", str(session.jid.bare))
            await self._route(routed)
        if outcome.send_presence and session.record is not None:
            for own in session.record.available():
                if own.jid is None:
                    continue
                if outcome.send_presence == "available" and own.presence is not None:
                    presence = readdressed(own.presence, contact)
                else:
                    presence = make_presence(str(own.jid), contact, "unavailable")
                presence.set("from", str(own.jid))
                await self._route(presence)

    async def inbound_subscription(
        self, username: str, stanza: ET.Element, header: StanzaHeader
    ) -> None:
        contact = str(header.sender.bare)
        async with self.manager.user_lock(username):
            item = await self._item(username, contact)
            pending = await self._pending(username, contact)
            outcome = subscriptions.inbound(header.type, contact, item, pending)
            await self._apply(username, contact, outcome, request=stanza)
        record = self.manager.users.get(username)
        if outcome.route and record is not None:
            delivered = readdressed(stanza, str(record.bare))
            for session in record.available():
                session.send(delivered)
        if outcome.auto_reply:
            await self._route(
                make_presence(str(self.manager.bare(username)), contact, outcome.auto_reply)
            )
            if record is not None:
                for session in record.available():
                    if session.presence is not None and session.jid is not None:
                        presence = readdressed(session.presence, contact)
                        presence.set("from", str(session.jid))
                        await self._route(presence)

    async def _apply(
        self,
        username: str,
        contact: str,
        outcome: subscriptions.Outcome,
        request: ET.Element | None = None,
    ) -> None:
        if outcome.item is not None:
            await self._save(username, outcome.item)
        record = self.manager.users.get(username)
        if outcome.store_pending and request is not None:
            text = serialize(readdressed(request, str(self.manager.bare(username))), parent_ns="")
            pending = PendingSubscription(contact, text.decode())
            await self.manager.repo.add_pending_subscription(username, pending)
            if record is not None:
                record.pending_in[contact] = pending
        if outcome.drop_pending:
            await self.manager.repo.remove_pending_subscription(username, contact)
            if record is not None:
                record.pending_in.pop(contact, None)

    # --- helpers --------------------------------------------------------------

    async def _item(self, username: str, contact: str) -> RosterItem | None:
        record = self.manager.users.get(username)
        if record is not None:
            return record.roster.get(contact)
        return await self.manager.repo.get_roster_item(username, contact)

    async def _pending(self, username: str, contact: str) -> bool:
        record = self.manager.users.get(username)
        if record is not None:
            return contact in record.pending_in
        requests = await self.manager.repo.get_pending_subscriptions(username)
        return any(request.contact == contact for request in requests)

    async def _save(self, username: str, item: RosterItem) -> None:
        await self.manager.repo.put_roster_item(username, item)
        record = self.manager.users.get(username)
        if record is not None:
            record.roster[item.contact] = item
        self._push(username, item)

    def _push(self, username: str, item: RosterItem, *, removed: bool = False) -> None:
        record = self.manager.users.get(username)
        if record is None:
            return
        for session in record.interested():
            if session.jid is None:
                continue
            push = ET.Element(IQ, {"type": "set", "id": "push-" + self.manager.new_token(8),
                                   "to": str(session.jid)})  # fmt: skip
            query = ET.SubElement(push, _QUERY)
            query.append(item_element(item, removed=removed))
            session.send(push)

    async def _route(self, stanza: ET.Element) -> None:
        pending = self.manager.route(stanza, StanzaHeader.of(stanza))
        if pending is not None:
            await pending
