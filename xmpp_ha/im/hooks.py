"""Typed extension points of the session manager.

The HA layer (and any other plug-in) attaches here and nowhere else: it is
told when sessions open and close, may add stream features and IQ handlers
keyed by payload element, and may claim users that this node does not serve.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from xmpp_ha.core.errors import StanzaError, StreamCondition

if TYPE_CHECKING:
    from xmpp_ha.core.jid import JID
    from xmpp_ha.im.manager import UserRecord
    from xmpp_ha.im.session import ClientSession

SessionListener = Callable[["ClientSession"], None]
# (session, iq stanza) -> None when answered synchronously, or an awaitable
IqHandler = Callable[["ClientSession", ET.Element], Awaitable[None] | None]
# (username) -> None to accept a standby (inactive) session here, or the error to refuse with
StandbyGuard = Callable[[str], Awaitable["StanzaError | None"]]


@dataclass(frozen=True, slots=True)
class LoginRefusal:
    """Why a user may not be bound here: a stream error, and where to go instead."""

    condition: StreamCondition
    text: str = ""
    other_host: str = ""  # "host:port" for see-other-host


# (username) -> None to serve the user here, or the refusal to send
LoginGuard = Callable[[str], Awaitable[LoginRefusal | None]]
# (username, stanza) -> True when the stanza was handed to another node
RemoteRouter = Callable[[str, ET.Element], Awaitable[bool]]


@dataclass
class Hooks:
    session_bound: list[SessionListener] = field(default_factory=list)
    session_closed: list[SessionListener] = field(default_factory=list)
    stream_features: list[Callable[[ClientSession], list[ET.Element]]] = field(default_factory=list)
    iq_handlers: dict[tuple[str, str], IqHandler] = field(default_factory=dict)
    # features the server's disco#info lists for this session
    disco_features: list[Callable[[ClientSession], list[str]]] = field(default_factory=list)
    # asked before binding: None to serve the user here, or why not (and where to go)
    login_guard: LoginGuard | None = None
    # asked for a bind that declares a standby session (dual connections); None: refused
    standby_guard: StandbyGuard | None = None
    # asked for a local-domain user with no session here: did another node take the stanza?
    route_remote: RemoteRouter | None = None
    # asked before delivering to a user's sessions here: True when another node serves the
    # user now (its sessions here are about to end): stanzas go the `route_remote` way
    served_elsewhere: Callable[[str], bool] | None = None
    # asked before serving a bound session's input: False when this node is fenced
    may_serve: Callable[[], bool] | None = None
    # told the username after messages were stored offline for it (another node that
    # serves the user may have flushed its store already: it should look again)
    offline_stored: list[Callable[[str], None]] = field(default_factory=list)
    # told of an available session that ended (its full JID, its user's record): True
    # when it takes over telling the contacts (the user moved to another node, which
    # knows whether that resource lives on there), False to tell them now
    presence_gone: Callable[[ClientSession, JID, UserRecord], bool] | None = None

    def add_iq_handler(self, iq_type: str, payload_tag: str, handler: IqHandler) -> None:
        key = (iq_type, payload_tag)
        if key in self.iq_handlers:
            raise ValueError(f"an IQ handler for {key} is already registered")
        self.iq_handlers[key] = handler
