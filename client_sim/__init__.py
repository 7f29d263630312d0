"""A lean XMPP client for load tests, with dual connections.

- `client_sim.xmpp`: the sans-I/O client stream (bytes in, events out).
- `client_sim.aio`: an asyncio driver over `xmpp_ha.net.tls.StreamConnection`.
- `client_sim.dual`: the sans-I/O dual-connection core (which connection is active,
  when to open the standby, when to activate, what to re-send).
- `client_sim.aio_dual`: its asyncio driver; `client_sim.bench`: `python -m client_sim bench`.
"""
