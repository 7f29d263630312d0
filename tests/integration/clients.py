"""Clients for integration tests: slixmpp over real TLS, and a raw XML client.

- `ClientPool` makes slixmpp clients that share one SSL context, logs them in
  to a running node and disconnects every one of them at the end of a test.
- `Client.inbox` records every element a client receives (stanzas, SASL and
  stream-management elements alike), so a test waits for the exact stanza it
  expects, with a timeout, instead of sleeping and then looking.
- `RawClient` speaks just enough XMPP (STARTTLS, SASL PLAIN, bind) to log in
  and then do exactly what the test says, e.g. nothing at all.

Matchers are plain functions of a slixmpp stanza; the common ones and a few
RFC 6121 steps (subscribe, roster get/set, round trip) are here, anything
more particular belongs to its test module.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import slixmpp
from slixmpp import JID, Iq, Message, Presence
from slixmpp.xmlstream import StanzaBase

WAIT = 5.0  # seconds a test waits for something that should happen at once

Match = Callable[[StanzaBase], bool]


class NodeAddress(Protocol):
    """What a client needs of a node (tests.integration.conftest.RunningNode has it)."""

    @property
    def host(self) -> str: ...

    port: int


class LoginFailed(AssertionError):
    """A client that should have started a session did not."""


class Inbox:
    """Every element one client received, in order, until a test takes it."""

    def __init__(self, client: slixmpp.ClientXMPP) -> None:
        self._items: list[StanzaBase] = []
        self._arrived = asyncio.Event()
        client.add_filter("in", self._record)

    def _record(self, stanza: StanzaBase) -> StanzaBase:
        self._items.append(stanza)
        self._arrived.set()
        return stanza

    def take(self, match: Match) -> StanzaBase | None:
        """Remove and return the oldest element matching, or None."""
        for index, stanza in enumerate(self._items):
            if match(stanza):
                return self._items.pop(index)
        return None

    def take_all(self, match: Match) -> list[StanzaBase]:
        taken = [stanza for stanza in self._items if match(stanza)]
        self._items = [stanza for stanza in self._items if not match(stanza)]
        return taken

    async def next(self, match: Match, timeout: float = WAIT, what: str = "") -> StanzaBase:
        """Wait for (and remove) the oldest element matching."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = self.take(match)
            if found is not None:
                return found
            remaining = deadline - loop.time()
            if remaining <= 0:
                received = "\n  ".join(str(item) for item in self._items) or "(nothing)"
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what or 'a matching stanza'}; "
                    f"received and not taken:\n  {received}"
                )
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                pass


class Client(slixmpp.ClientXMPP):
    """A slixmpp client with an inbox and a way to await its events."""

    def __init__(self, jid: str, password: str, context: ssl.SSLContext, **options: Any) -> None:
        super().__init__(jid, password, **options)
        self.enable_direct_tls = False
        self.ssl_context = context
        self.inbox = Inbox(self)
        # Subscription requests are the test's to answer: slixmpp approves them
        # by default, and None (typed as bool) turns that off.
        self.roster.auto_authorize = None  # type: ignore[assignment]
        self.roster.auto_subscribe = False

    def expect(self, event: str) -> asyncio.Future[Any]:
        """A future for the next `event`, registered now so that it cannot be missed."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def fire(data: Any) -> None:
            if not future.done():
                future.set_result(data)

        self.add_event_handler(event, fire, disposable=True)
        return future

    @property
    def connected(self) -> bool:
        return self.transport is not None

    async def request(self, iq: Iq, timeout: float = WAIT) -> Iq:
        """Send an IQ get/set; its result, or IqError carrying the error reply."""
        result: Iq = await iq.send(timeout=timeout)  # type: ignore[no-untyped-call]
        return result

    def drop_connection(self) -> None:
        """Kill the TCP connection with no </stream:stream>, as a network failure would."""
        assert self.transport is not None, "not connected"
        self.transport.abort()


async def wait_for(future: asyncio.Future[Any], what: str, timeout: float = WAIT) -> Any:
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


class ClientPool:
    """Makes clients for one test and closes them all at its end."""

    def __init__(self, ca_file: Path, *, domain: str, password: str) -> None:
        # One context for every client: each one costs a CA load otherwise.
        self.context = ssl.create_default_context(cafile=str(ca_file))
        self.domain = domain
        self.password = password
        self.clients: list[Client] = []

    def make(
        self,
        jid: str,
        *,
        password: str | None = None,
        plugins: Iterable[str] = (),
        sasl_mech: str | None = None,
    ) -> Client:
        if "@" not in jid:  # "alice/desk" is alice@<domain>/desk
            local, slash, resource = jid.partition("/")
            jid = f"{local}@{self.domain}{slash}{resource}"
        client = Client(
            jid, self.password if password is None else password, self.context, sasl_mech=sasl_mech
        )
        for plugin in plugins:
            client.register_plugin(plugin)
        self.clients.append(client)
        return client

    async def start(self, client: Client, node: NodeAddress, timeout: float = WAIT) -> Client:
        """Connect and wait for the session (authenticated and bound)."""
        started = client.expect("session_start")
        failed = client.expect("failed_all_auth")
        gone = client.expect("disconnected")
        client.connect(node.host, node.port)
        done, _ = await asyncio.wait(
            {started, failed, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if started not in done:
            outcome = (
                "authentication failed"
                if failed in done
                else ("disconnected" if gone in done else f"no session within {timeout}s")
            )
            raise LoginFailed(f"{client.requested_jid}: {outcome}")
        return client

    async def login(
        self,
        node: NodeAddress,
        jid: str,
        *,
        plugins: Iterable[str] = (),
        presence: bool = True,
        priority: int | None = None,
        roster: bool = False,
        sasl_mech: str | None = None,
    ) -> Client:
        """A started client; optionally with the roster fetched and initial presence sent.

        The roster comes first, as RFC 6121 recommends, so that the client is
        an "interested resource" before presence starts flowing.
        """
        client = await self.start(self.make(jid, plugins=plugins, sasl_mech=sasl_mech), node)
        if roster:
            await client.get_roster(timeout=WAIT)
        if presence:
            client.send_presence(ppriority=priority)
        return client

    async def close_all(self) -> None:
        closing = [client.disconnect(wait=1.0) for client in self.clients if client.connected]
        if closing:
            await asyncio.wait([asyncio.ensure_future(c) for c in closing], timeout=3)
        for client in self.clients:
            client.abort()
            client.cancel_connection_attempt()


# --- matchers and common steps ----------------------------------------------------


def is_message(body: str, *, sender: str | None = None, to: str | None = None) -> Match:
    def match(stanza: StanzaBase) -> bool:
        return (
            isinstance(stanza, Message)
            and stanza["type"] != "error"
            and stanza["body"] == body
            and (sender is None or str(stanza["from"]) == sender)
            and (to is None or str(stanza["to"]) == to)
        )

    return match


def is_chat(stanza: StanzaBase) -> bool:
    return isinstance(stanza, Message) and stanza["type"] == "chat"


def is_error_reply(stanza_id: str) -> Match:
    return lambda s: isinstance(s, Message) and s["type"] == "error" and s["id"] == stanza_id


def is_presence(ptype: str, sender: str) -> Match:
    """`ptype` is slixmpp's: 'available', a show value, 'unavailable', 'subscribe', ..."""
    return lambda s: isinstance(s, Presence) and s["type"] == ptype and str(s["from"]) == sender


def presence_from(sender: str) -> Match:
    return lambda s: isinstance(s, Presence) and str(s["from"]) == sender


def has_status(status: str, sender: str) -> Match:
    return lambda s: isinstance(s, Presence) and s["status"] == status and str(s["from"]) == sender


def is_roster_push(contact: str) -> Match:
    def match(stanza: StanzaBase) -> bool:
        if not isinstance(stanza, Iq) or stanza["type"] != "set":
            return False
        return contact in {str(jid) for jid in stanza["roster"]["items"]}

    return match


def push_item(push: StanzaBase) -> dict[str, Any]:
    ((_, item),) = push["roster"]["items"].items()
    return {key: item[key] for key in ("name", "subscription", "ask", "groups")}


async def roster_of(client: Client) -> dict[str, tuple[str, bool]]:
    """The server's roster of this user: contact -> (subscription, pending out)."""
    result = await client.get_roster(timeout=WAIT)
    assert result is not None
    return {
        str(jid): (item["subscription"], item["ask"] == "subscribe")
        for jid, item in result["roster"]["items"].items()
    }


async def set_roster_item(
    client: Client,
    contact: str,
    *,
    name: str = "",
    groups: tuple[str, ...] = (),
    remove: bool = False,
) -> None:
    iq = client.make_iq_set()
    attributes: dict[str, Any] = {"name": name, "groups": list(groups)}
    if remove:
        attributes = {"subscription": "remove"}
    iq["roster"]["items"] = {JID(contact): attributes}
    await client.request(iq)


async def round_trip(client: Client) -> None:
    """Return once the server has handled every stanza this client sent before.

    A server handles one client's stanzas in order, so the answer to a ping
    comes after whatever the earlier stanzas caused (needs xep_0199).
    """
    await client.plugin["xep_0199"].send_ping(JID(client.boundjid.domain), timeout=WAIT)


def send_chat(sender: Client, to: str, body: str, *, private: bool = False) -> str:
    """Send a chat message; returns its id."""
    message = sender.make_message(mto=to, mbody=body, mtype="chat")
    if private:  # XEP-0280 §6: not to be copied, and XEP-0334 no-copy for good measure
        message.xml.append(ET.Element("{urn:xmpp:carbons:2}private"))
        message.xml.append(ET.Element("{urn:xmpp:hints}no-copy"))
    message.send()
    return str(message["id"])


async def subscribe(subscriber: Client, contact: Client) -> None:
    """`subscriber` asks for `contact`'s presence and gets it (RFC 6121 §3.1); pushes drained."""
    subscriber_bare, contact_bare = subscriber.boundjid.bare, contact.boundjid.bare
    subscriber.send_presence(pto=contact_bare, ptype="subscribe")
    await contact.inbox.next(is_presence("subscribe", subscriber_bare), what="subscribe")
    contact.send_presence(pto=subscriber_bare, ptype="subscribed")
    await subscriber.inbox.next(is_presence("subscribed", contact_bare), what="subscribed")
    await round_trip(contact)
    await round_trip(subscriber)
    for client, other in ((subscriber, contact_bare), (contact, subscriber_bare)):
        client.inbox.take_all(is_roster_push(other))


def delay_of(stanza: StanzaBase) -> ET.Element | None:
    """The XEP-0203 delay stamp of a stanza, if any."""
    return stanza.xml.find("{urn:xmpp:delay}delay")


# --- a raw client ------------------------------------------------------------------


class RawClient:
    """XMPP by hand over asyncio streams: STARTTLS, SASL PLAIN, bind, then as told."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.received = b""  # everything read since the last TLS/stream restart

    @classmethod
    async def login(
        cls,
        node: NodeAddress,
        context: ssl.SSLContext,
        *,
        username: str,
        password: str,
        domain: str,
        resource: str = "raw",
    ) -> RawClient:
        reader, writer = await asyncio.open_connection(node.host, node.port)
        client = cls(reader, writer)
        await client.open_stream(domain)
        await client.read_until(b"</stream:features>")
        client.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        await client.read_until(b"<proceed")
        await writer.start_tls(context, server_hostname=domain)
        await client.open_stream(domain)
        await client.read_until(b"</stream:features>")
        token = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
        client.send(
            f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>".encode()
        )
        await client.read_until(b"<success")
        await client.open_stream(domain)
        await client.read_until(b"</stream:features>")
        client.send(
            b"<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
            b"<resource>" + resource.encode() + b"</resource></bind></iq>"
        )
        await client.read_until(b"</iq>")
        return client

    async def open_stream(self, domain: str) -> None:
        self.received = b""
        self.send(
            f"<?xml version='1.0'?><stream:stream to='{domain}' version='1.0' "
            "xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>".encode()
        )

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def read_until(self, marker: bytes, timeout: float = WAIT) -> bytes:
        """Read until `marker` has been received; returns everything so far."""
        async with asyncio.timeout(timeout):
            while marker not in self.received:
                chunk = await self.reader.read(65536)
                if not chunk:
                    raise AssertionError(f"connection closed before {marker!r}: {self.received!r}")
                self.received += chunk
        return self.received

    async def read_to_end(self, timeout: float) -> bytes:
        """Read until the server closes the connection; returns everything received."""
        async with asyncio.timeout(timeout):
            while chunk := await self.reader.read(65536):
                self.received += chunk
        return self.received

    def close(self) -> None:
        self.writer.transport.abort()
