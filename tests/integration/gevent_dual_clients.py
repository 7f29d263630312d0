"""Run by test_dual_client.py in its own process: gevent dual clients against a pair.

    python tests/integration/gevent_dual_clients.py CA N1_HOST:PORT N2_HOST:PORT PASSWORD \
        RECEIVER,... SENDER,...

Receivers are homed on n1, senders on n2. Prints READY once every client has its
standby session; the test then fails n1. Senders chat to receivers all along;
once every receiver switched, the chat stops, and one JSON line reports what was
sent and received.
"""

from __future__ import annotations

import itertools
import json
import sys
import time

import gevent

from client_sim.gevent_dual import GeventDualClient, client_context
from client_sim.xmpp import MessageReceived, SaltedPasswordCache


def main(argv: list[str]) -> int:
    ca_file, n1, n2, password, receivers, senders = argv
    nodes = {}
    for name, address in (("n1", n1), ("n2", n2)):
        host, port = address.rsplit(":", 1)
        nodes[name] = (host, int(port))
    context = client_context(ca_file)
    cache = SaltedPasswordCache()
    received: dict[str, int] = {}

    def on_message(event: MessageReceived) -> None:
        received[event.id] = received.get(event.id, 0) + 1

    def client(name: str, home: str) -> GeventDualClient:
        return GeventDualClient(f"{name}@localhost", password, nodes, home=home,
                                ssl_context=context, key_cache=cache,
                                on_message=on_message)  # fmt: skip

    inbound = [client(name, "n1") for name in receivers.split(",")]
    outbound = [client(name, "n2") for name in senders.split(",")]
    everyone = inbound + outbound
    gevent.joinall([gevent.spawn(user.start) for user in everyone], raise_error=True)
    deadline = time.monotonic() + 20
    while not all(user.core.standby is not None for user in everyone):
        if time.monotonic() > deadline:
            print(json.dumps({"error": "standby sessions not open"}), flush=True)
            return 1
        gevent.sleep(0.05)
    print("READY", flush=True)
    sent: set[str] = set()
    ids = itertools.count()
    stop = False

    def chat(sender: GeventDualClient, to: GeventDualClient) -> None:
        while not stop:
            message_id = f"g{next(ids)}"
            sent.add(message_id)
            sender.send_message(to.jid, message_id, id=message_id)
            gevent.sleep(0.05)

    chats = [gevent.spawn(chat, s, r) for s, r in zip(outbound, inbound, strict=True)]
    deadline = time.monotonic() + 30
    while not all(user.core.downtimes for user in inbound) and time.monotonic() < deadline:
        gevent.sleep(0.05)
    gevent.sleep(0.5)
    stop = True
    gevent.joinall(chats)
    deadline = time.monotonic() + 10
    while not sent <= set(received) and time.monotonic() < deadline:
        gevent.sleep(0.05)
    report = {
        "switched": sum(1 for user in inbound if user.core.downtimes),
        "serving": [user.serving_node for user in inbound],
        "sent": len(sent),
        "received": len(set(received) & sent),
        "delivered_twice": sum(1 for count in received.values() if count > 1),
    }
    print(json.dumps(report), flush=True)
    for user in everyone:
        user.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
