"""IQs the server answers itself: roster, disco (XEP-0030), ping (XEP-0199),
version (XEP-0092), carbons (XEP-0280), the legacy session request; plus IQs
between users. Handlers are registered by (type, payload element); plug-ins
add theirs through `Hooks.iq_handlers`. An unknown get/set is answered with
`<service-unavailable/>`, never ignored.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Awaitable
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from xmpp_ha.core.errors import StanzaCondition, StanzaError
from xmpp_ha.im.hooks import IqHandler
from xmpp_ha.protocol import ns
from xmpp_ha.protocol.stanzas import StanzaHeader, iq_result

if TYPE_CHECKING:
    from xmpp_ha.im.manager import SessionManager, UserRecord
    from xmpp_ha.im.session import ClientSession

SERVER_FEATURES = (
    ns.DISCO_INFO,
    ns.DISCO_ITEMS,
    ns.PING,
    ns.VERSION,
    ns.CARBONS,
    ns.ROSTER,
    "urn:xmpp:sm:3",
    "msgoffline",
)


def _software_version() -> str:
    try:
        return version("xmpp-ha")
    except PackageNotFoundError:
        return "0"


class IqService:
    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager
        roster = manager.roster
        self._builtin: dict[tuple[str, str], IqHandler] = {
            ("get", ns.tag(ns.ROSTER, "query")): lambda s, iq: roster.get(s, iq),
            ("set", ns.tag(ns.ROSTER, "query")): roster.set,
            ("get", ns.tag(ns.DISCO_INFO, "query")): self._disco_info,
            ("get", ns.tag(ns.DISCO_ITEMS, "query")): self._disco_items,
            ("get", ns.tag(ns.PING, "ping")): self._pong,
            ("get", ns.tag(ns.VERSION, "query")): self._version,
            ("set", ns.tag(ns.SESSION, "session")): self._pong,
            ("set", ns.tag(ns.CARBONS, "enable")): self._carbons_on,
            ("set", ns.tag(ns.CARBONS, "disable")): self._carbons_off,
        }

    def outbound(
        self, session: ClientSession, stanza: ET.Element, header: StanzaHeader
    ) -> Awaitable[None] | None:
        assert session.jid is not None
        if session.record is None and not session.standby:
            return None  # the session ended: nobody is left to answer
        to = header.to
        for_server = to is None or (to.domain == self.manager.domain and not to.local)
        for_own_account = to is not None and to == session.jid.bare
        if for_server or for_own_account:
            if header.type in ("result", "error"):
                return None  # answers to our pings and pushes
            payload = stanza[0]
            key = (header.type, payload.tag)
            handler = self.manager.hooks.iq_handlers.get(key) or self._builtin.get(key)
            if handler is None or (for_own_account and key[1] not in _ACCOUNT_PAYLOADS):
                raise StanzaError(StanzaCondition.SERVICE_UNAVAILABLE)
            return handler(session, stanza)
        return self.manager.route(stanza, header)

    def deliver_local(
        self, record: UserRecord, stanza: ET.Element, header: StanzaHeader
    ) -> Awaitable[None] | None:
        to = header.to
        assert to is not None
        if to.resource:
            target = record.sessions.get(to.resource)
            if target is not None:
                target.send(stanza)
                return None
        return self.for_account(stanza, header)

    def for_account(self, stanza: ET.Element, header: StanzaHeader) -> Awaitable[None] | None:
        """An IQ to an account (online or not) that no resource takes: the server answers
        disco#info on the account's behalf (RFC 6121 §8.5.2), and refuses the rest."""
        to = header.to
        assert to is not None
        if header.type == "get" and stanza[0].tag == ns.tag(ns.DISCO_INFO, "query"):
            query = ET.Element(ns.tag(ns.DISCO_INFO, "query"))
            ET.SubElement(query, ns.tag(ns.DISCO_INFO, "identity"),
                          {"category": "account", "type": "registered"})  # fmt: skip
            reply = iq_result(stanza, query, sender=str(to.bare))
            return self.manager.route(reply, StanzaHeader.of(reply))
        if header.type in ("get", "set"):
            return self.manager.bounce(stanza, StanzaError(StanzaCondition.SERVICE_UNAVAILABLE))
        return None

    # --- handlers -------------------------------------------------------------

    def _reply(self, session: ClientSession, request: ET.Element, child: ET.Element | None) -> None:
        session.send(iq_result(request, child, sender=request.get("to") or self.manager.domain))

    def _disco_info(self, session: ClientSession, stanza: ET.Element) -> None:
        if stanza[0].get("node"):
            raise StanzaError(StanzaCondition.ITEM_NOT_FOUND)
        query = ET.Element(ns.tag(ns.DISCO_INFO, "query"))
        if stanza.get("to") and stanza.get("to") != self.manager.domain:
            ET.SubElement(query, ns.tag(ns.DISCO_INFO, "identity"),
                          {"category": "account", "type": "registered"})  # fmt: skip
        else:
            ET.SubElement(query, ns.tag(ns.DISCO_INFO, "identity"),
                          {"category": "server", "type": "im", "name": "xmpp-ha"})  # fmt: skip
            extra = [f for provider in self.manager.hooks.disco_features for f in provider(session)]
            for feature in (*SERVER_FEATURES, *extra):
                ET.SubElement(query, ns.tag(ns.DISCO_INFO, "feature"), {"var": feature})
        self._reply(session, stanza, query)

    def _disco_items(self, session: ClientSession, stanza: ET.Element) -> None:
        if stanza[0].get("node"):
            raise StanzaError(StanzaCondition.ITEM_NOT_FOUND)
        self._reply(session, stanza, ET.Element(ns.tag(ns.DISCO_ITEMS, "query")))

    def _pong(self, session: ClientSession, stanza: ET.Element) -> None:
        self._reply(session, stanza, None)

    def _version(self, session: ClientSession, stanza: ET.Element) -> None:
        query = ET.Element(ns.tag(ns.VERSION, "query"))
        ET.SubElement(query, ns.tag(ns.VERSION, "name")).text = "xmpp-ha"
        ET.SubElement(query, ns.tag(ns.VERSION, "version")).text = _software_version()
        self._reply(session, stanza, query)

    def _carbons_on(self, session: ClientSession, stanza: ET.Element) -> None:
        session.carbons = True
        self._reply(session, stanza, None)

    def _carbons_off(self, session: ClientSession, stanza: ET.Element) -> None:
        session.carbons = False
        self._reply(session, stanza, None)


# IQs a user may address to their own bare JID (the server answers for the account)
_ACCOUNT_PAYLOADS = frozenset(
    {ns.tag(ns.ROSTER, "query"), ns.tag(ns.DISCO_INFO, "query"), ns.tag(ns.DISCO_ITEMS, "query"),
     ns.tag(ns.PING, "ping"), ns.tag(ns.CARBONS, "enable"), ns.tag(ns.CARBONS, "disable")}
)  # fmt: skip
