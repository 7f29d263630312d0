"""A real slixmpp client logs in to a real node process over STARTTLS and chats."""

from __future__ import annotations

import asyncio
import ssl

import slixmpp

from tests.integration.conftest import DOMAIN, PASSWORD


async def test_two_slixmpp_clients_chat(node_factory) -> None:
    node = await node_factory(users=["alice", "bob"])
    context = ssl.create_default_context(cafile=str(node.ca_file))
    received: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    clients = []
    for name in ("alice", "bob"):
        client = slixmpp.ClientXMPP(f"{name}@{DOMAIN}/test", PASSWORD)
        client.enable_direct_tls = False
        client.ssl_context = context
        clients.append(client)
    alice, bob = clients
    bob.add_event_handler(
        "message", lambda msg: received.done() or received.set_result(str(msg["body"]))
    )
    for client in clients:
        started = asyncio.get_running_loop().create_future()
        client.add_event_handler("session_start", lambda _e, f=started: f.done() or f.set_result(1))
        client.connect(node.host, node.port)
        await asyncio.wait_for(started, 15)
        client.send_presence()
    alice.send_message(mto=f"bob@{DOMAIN}", mbody="hi bob", mtype="chat")
    assert await asyncio.wait_for(received, 10) == "hi bob"
    for client in clients:
        client.disconnect()
