"""A lean XMPP client for load tests and, later, the dual-connection simulated client.

- `client_sim.xmpp`: the sans-I/O client stream (bytes in, events out).
- `client_sim.aio`: an asyncio driver over `xmpp_ha.net.tls.StreamConnection`.
"""
