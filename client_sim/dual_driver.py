"""What the asyncio and gevent drivers of `client_sim.dual.DualCore` share.

A driver owns one user's connections and carries out the core's actions. The
parts that do no I/O of their own live here: the user's state, sending messages
(held while no session is active), the switch (`Promote`, `Probe`), reading the
server's answers to a plan or an activation request, and answering a pushed
activation. Subclasses do the I/O: logins, the standby, iq round trips, timers.
"""

from __future__ import annotations

import itertools
import random
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from client_sim.aio import new_nonce
from client_sim.dual import Action, DualCore, Promote
from client_sim.xmpp import ClientStream, IqReceived, MessageReceived, SaltedPasswordCache
from xmpp_ha.protocol import ns

PLAN = ns.tag(ns.DUAL, "plan")
ACTIVATE = ns.tag(ns.DUAL, "activate")
_IQ = ns.tag(ns.CLIENT, "iq")
_MESSAGE = ns.tag(ns.CLIENT, "message")
RECEIPT_REQUEST = ns.tag(ns.RECEIPTS, "request")
RECEIPT = ns.tag(ns.RECEIPTS, "received")
# ask for the server's <a/> after every stanza: after a switch the client re-sends what
# the old node never acknowledged, and with one request per 10 stanzas (the stream's
# default) that was up to 9 messages the recipient already had (dropped as duplicates)
ACK_EVERY = 1
PROBE_PREFIX = "probe-"  # ids of the messages a client sends itself to time a switch


class Connection(Protocol):
    stream: ClientStream

    @property
    def closed(self) -> bool: ...
    @property
    def jid(self) -> str: ...
    def send_stanza(self, stanza: ET.Element) -> None: ...
    def send_presence(self) -> None: ...
    def abort(self) -> None: ...


C = TypeVar("C", bound=Connection)
X = TypeVar("X")  # the driver's TLS context type


class DualDriver(Generic[C, X]):
    """`nodes`: both nodes' client addresses by name; `home`: where to log in first;
    `ssl_context`: shared by every client of the process (the driver's own type)."""

    def __init__(
        self,
        jid: str,
        password: str,
        nodes: dict[str, tuple[str, int]],
        *,
        home: str,
        ssl_context: X,
        resource: str = "sim",
        on_message: Callable[[MessageReceived], None] | None = None,
        key_cache: SaltedPasswordCache | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.jid = jid
        self.password = password
        self.home = home
        self.context = ssl_context
        self.core = DualCore(nodes=dict(nodes), jitter=lambda: random.uniform(0.5, 1.0))
        self.resource = resource
        self.on_message = on_message
        self.key_cache = key_cache
        self.timeout = timeout
        self.active: C | None = None
        self.standby: C | None = None
        self.sent = 0
        self._probes = itertools.count(1)
        self._probe_id = ""
        self._pending: list[ET.Element] = []  # sent while no session was active
        self._closing = False
        self._setup()

    # --- the API ----------------------------------------------------------------------

    def send_message(self, to: str, body: str, *, id: str, receipt: bool = False) -> None:
        """Send now, or as soon as a session is active again (nothing is dropped);
        `receipt`: ask the recipient for a XEP-0184 delivery receipt."""
        self.sent += 1
        stanza = ET.Element(_MESSAGE, {"to": to, "type": "chat", "id": id})
        ET.SubElement(stanza, ns.tag(ns.CLIENT, "body")).text = body
        if receipt:
            ET.SubElement(stanza, RECEIPT_REQUEST)
        self._send(stanza)

    def send_receipt(self, to: str, *, of: str) -> None:
        """The XEP-0184 receipt for message `of` (ids of receipts are `rcpt-` + `of`)."""
        stanza = ET.Element(_MESSAGE, {"to": to, "id": f"rcpt-{of}"})
        ET.SubElement(stanza, RECEIPT, {"id": of})
        self._send(stanza)

    def _send(self, stanza: ET.Element) -> None:
        if self.active is not None and not self.active.closed:
            self.active.send_stanza(stanza)
        else:
            self._pending.append(stanza)

    @property
    def serving_node(self) -> str | None:
        return self.core.active

    # --- for the subclasses -------------------------------------------------------------

    def _setup(self) -> None:
        """The subclass's own state (called at the end of __init__)."""

    def _run(self, actions: list[Action]) -> None:
        raise NotImplementedError

    def _stream(self, *, standby: bool) -> ClientStream:
        return ClientStream(
            jid=self.jid, password=self.password, nonce=new_nonce, resource=self.resource,
            stream_management=True, resumable=False, key_cache=self.key_cache, standby=standby,
            ack_interval=ACK_EVERY,
        )  # fmt: skip

    def _send_pending(self, connection: C) -> None:
        pending, self._pending = self._pending, []
        for stanza in pending:
            connection.send_stanza(stanza)

    def _on_message(self, event: MessageReceived, now: float) -> None:
        if event.id.startswith(PROBE_PREFIX) and event.sender.partition("/")[0] == self.jid:
            if event.id == self._probe_id:  # else a late copy (handed on by the old node)
                self._probe_id = ""
                self._run(self.core.probe_returned(now))
            return
        if self.core.message_received(event.sender, event.id) and self.on_message is not None:
            self.on_message(event)

    def _pushed(self, connection: C, event: IqReceived, now: float) -> bool:
        """A server-pushed activation on the standby: answered, and the core told."""
        if connection is not self.standby or event.element.find(ACTIVATE) is None:
            return False
        connection.send_stanza(ET.Element(_IQ, {"type": "result", "id": event.id,
                                                "to": event.sender}))  # fmt: skip
        self._run(self.core.activated(now, pushed=True))
        return True

    def _plan_answer(self, answer: ET.Element, now: float) -> list[Action]:
        plan = answer.find(PLAN)
        if answer.get("type") != "result" or plan is None:
            return self.core.plan_refused(now)
        try:
            port, delay = int(plan.get("port", "")), float(plan.get("delay", ""))
        except ValueError:
            return self.core.plan_refused(now)
        return self.core.plan(now, plan.get("node", ""), plan.get("host", ""), port, delay)

    def _activation_answer(self, connection: C, answer: ET.Element, now: float) -> list[Action]:
        if connection is not self.standby:
            return []  # a push crossed it: the switch happened already
        if answer.get("type") == "result":
            return self.core.activated(now)
        error = answer.find(ns.tag(ns.CLIENT, "error"))
        names = [child.tag.rpartition("}")[2] for child in (error if error is not None else ())]
        actions = self.core.activation_refused(now, names[0] if names else "undefined-condition")
        if self.core.standby is None:  # given up on it
            self.standby = None
            connection.abort()
        return actions

    def _promote(self, action: Promote) -> None:
        """The standby is the active session now: presence, what the old one had not seen
        acknowledged, and what waited for a session."""
        old, new = self.active, self.standby
        if new is None:
            return
        self.standby = None
        resend = list(action.resend)
        if old is not None:
            sm = old.stream.sm
            if sm is not None:
                resend.extend(sm.unacked())
            self.active = None
            old.abort()
        self.active = new
        new.send_presence()
        for stanza in resend:
            # the old session's requests died with it, and its presence is the one just sent
            if stanza.tag == _MESSAGE:
                new.send_stanza(stanza)
        self._send_pending(new)

    def _probe(self) -> None:
        """A message to our own full JID: its return ends the switch's downtime."""
        connection = self.active
        if connection is None or connection.closed:
            return
        self._probe_id = f"{PROBE_PREFIX}{next(self._probes)}"
        probe = ET.Element(ns.tag(ns.CLIENT, "message"),
                           {"to": connection.jid, "type": "chat", "id": self._probe_id})  # fmt: skip
        ET.SubElement(probe, ns.tag(ns.CLIENT, "body")).text = "probe"
        connection.send_stanza(probe)
