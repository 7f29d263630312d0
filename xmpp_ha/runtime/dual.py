"""Dual connections, the HA side (docs/dual-connections.md, namespace urn:xmpp-ha:dual:0).

The session manager knows inactive (standby) sessions as a kind of session;
this module decides everything that depends on the redundancy group:

- the feature is offered (stream feature, disco) only with HA on and TLS;
- a standby session is accepted for a user the peer serves, refused for one
  served here (the client should bind actively) or while this node is in a
  transition;
- the standby plan: the peer's client address and a delay drawn in this node's
  client re-login window;
- activation asked by a client: granted when this node serves the user,
  otherwise after the peer released the user over the peer link (it had no live
  session of the user and moved the user here in the store), or when the peer
  link was closed by the peer's system (its process ended), or once the SRM
  took the users over; every grant follows a fenced move in the store;
- activation pushed by the server to every standby session of a user that
  arrives here (take-over, fallback, recovery), so clients switch without
  noticing the failure themselves;
- the peer's release requests;
- the standby door: while this node is Idle (failed over by the administrator,
  its services stopped, e.g. for an upgrade) its client port still accepts
  standby sessions, and only those, so that the fallback moves its users back
  over their standby connections without a new login.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import weakref
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any

from xmpp_ha.core.batch import Batcher
from xmpp_ha.core.errors import StanzaCondition, StanzaError
from xmpp_ha.core.jid import JID, InvalidJID
from xmpp_ha.ha.model import State
from xmpp_ha.protocol import ns
from xmpp_ha.protocol.stanzas import iq_result
from xmpp_ha.store.repository import StoreUnavailable

if TYPE_CHECKING:
    from xmpp_ha.im.hooks import Hooks
    from xmpp_ha.im.manager import UserRecord
    from xmpp_ha.im.session import ClientSession
    from xmpp_ha.runtime.member import GroupMember
    from xmpp_ha.runtime.redundancy import Redundancy
    from xmpp_ha.store.cluster import Assignment

log = logging.getLogger(__name__)

PLAN = ns.tag(ns.DUAL, "plan")
ACTIVATE = ns.tag(ns.DUAL, "activate")
FEATURE = ns.tag(ns.DUAL, "dual")
_NO_STANDBY = frozenset(
    {State.INITIALIZING, State.FAILING_OVER, State.BACKUP_ACTIVATED, State.TAKING_BACK}
)
_RETRY = 0.05  # s between two looks at an activation that cannot be decided yet
_EXTRA_WAIT = 5.0  # s beyond the heartbeat timeout before an activation gives up
# a session of a user that moved to the peer ended: its contacts hear 'unavailable' unless
# the peer says, within the grace, that the resource lives on there (asked every poll)
_GONE_GRACE = 3.0  # s
_GONE_POLL = 0.25  # s


class DualConnections:
    def __init__(self, member: GroupMember) -> None:
        self.member = member
        self._request_ids = itertools.count(1)
        self._requests: dict[int, asyncio.Future[dict[str, Any]]] = {}  # asked of the peer
        # activations that take users from a closed peer at one time share one move
        self._claim: Batcher[str, bool] = Batcher(self._claim_batch)
        # plans asked at one time (a switch of many users) share one read of the limits
        self._relogin_limits: Batcher[str, tuple[float, float]] = Batcher(self._read_limits)
        # "does this resource live on at you?" asked at one time (a node stopping with
        # thousands of sessions) goes to the peer as one request
        self._live_at_peer: Batcher[str, bool] = Batcher(self._ask_live, max_batch=10_000)
        # sessions whose client asked for activation: it gets the result, no push as well
        self._asked: weakref.WeakSet[ClientSession] = weakref.WeakSet()

    def install(self, hooks: Hooks) -> None:
        hooks.stream_features.append(self._stream_features)
        hooks.disco_features.append(self._disco_features)
        hooks.standby_guard = self._standby_guard
        hooks.presence_gone = self._presence_gone
        hooks.add_iq_handler("get", PLAN, self._plan)
        hooks.add_iq_handler("set", ACTIVATE, self._activate)

    # --- what is offered ------------------------------------------------------------

    def _redundancy(self) -> Redundancy | None:
        redundancy = self.member.redundancy
        if redundancy is None or redundancy.peer is None or redundancy.srm.state is State.UNKNOWN:
            return None  # no group, no peer, or HA off
        return redundancy

    def offered_to(self, session: ClientSession) -> bool:
        return session.stream.encrypted and self._redundancy() is not None

    def _stream_features(self, session: ClientSession) -> list[ET.Element]:
        return [ET.Element(FEATURE)] if self.offered_to(session) else []

    def _disco_features(self, session: ClientSession) -> list[str]:
        return [ns.DUAL] if self.offered_to(session) else []

    async def _standby_guard(self, username: str) -> StanzaError | None:
        redundancy = self._redundancy()
        if redundancy is None:
            return StanzaError(StanzaCondition.FEATURE_NOT_IMPLEMENTED, "HA is off")
        if not redundancy.may_serve() or redundancy.srm.state in _NO_STANDBY:
            return StanzaError(
                StanzaCondition.SERVICE_UNAVAILABLE, "node in a transition: retry later", "wait"
            )
        if not redundancy.user_on_peer(username):
            return StanzaError(StanzaCondition.CONFLICT, "this node serves you")
        return None

    # --- the standby door ------------------------------------------------------------

    async def set_door(self, open_: bool) -> None:
        """Open the standby door while Idle (the services stopped), close it before they
        start: the client listener takes the port back. The standby sessions let in stay:
        they are what the fallback activates."""
        c2s = self.member.node.c2s
        if c2s is None:
            return
        if not open_:
            if c2s.door_open:
                await c2s.stop()
            return
        try:
            await c2s.open_door()
        except OSError as exc:
            log.warning("dual: cannot open the standby door: %s", exc)

    # --- the plan -----------------------------------------------------------------

    async def _plan(self, session: ClientSession, iq: ET.Element) -> None:
        redundancy = self._redundancy()
        if redundancy is None or not session.stream.encrypted:
            raise StanzaError(StanzaCondition.FEATURE_NOT_IMPLEMENTED, "no dual connections here")
        if session.standby:
            raise StanzaError(StanzaCondition.NOT_ALLOWED, "ask your active session")
        link = self.member.link
        if link is None or not link.connected:  # a plan would send the client to a dead node
            raise StanzaError(
                StanzaCondition.SERVICE_UNAVAILABLE, "the other node is down: ask later", "wait"
            )
        peer = redundancy.peer
        assert peer is not None and self.member.cluster is not None
        try:
            lower, upper = await self._relogin_limits(redundancy.node)
        except StoreUnavailable as exc:
            raise StanzaError(StanzaCondition.INTERNAL_SERVER_ERROR, "store unavailable") from exc
        plan = ET.Element(PLAN, {
            "node": peer.name, "host": peer.host, "port": str(peer.c2s_port),
            "delay": f"{random.uniform(lower, upper):.3f}",
        })  # fmt: skip
        session.send(iq_result(iq, plan, sender=self.member.node.config.node.domain))

    async def _read_limits(self, nodes: list[str]) -> list[tuple[float, float]]:
        assert self.member.cluster is not None
        limits: dict[str, tuple[float, float]] = {}
        for node in set(nodes):  # in practice one: this node
            info = await self.member.cluster.get_node(node)
            limits[node] = (info.relogin_lower, info.relogin_upper) if info else (120.0, 537.0)
        return [limits[node] for node in nodes]

    # --- activation asked by the client ---------------------------------------------

    async def _activate(self, session: ClientSession, iq: ET.Element) -> None:
        self._asked.add(session)
        if session.jid is not None and session.activation_started:
            # activated already (a push got there first, §5): answered all the same
            await session.activate()
            domain = self.member.node.config.node.domain
            session.send(iq_result(iq, ET.Element(ACTIVATE), sender=domain))
            return
        if not session.standby or session.jid is None:
            raise StanzaError(StanzaCondition.NOT_ALLOWED, "not a standby session")
        redundancy = self._redundancy()
        if redundancy is None:
            raise StanzaError(StanzaCondition.FEATURE_NOT_IMPLEMENTED, "HA is off")
        username = session.jid.local
        await self._take_user(redundancy, username)
        await self._activate_all(username, answer=(session, iq))

    async def _take_user(self, redundancy: Redundancy, username: str) -> None:
        """Return once this node serves the user (moved here in the store if needed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + redundancy.params.heartbeat_timeout + _EXTRA_WAIT
        assignment = redundancy.assignments.get(username)
        while True:
            if not redundancy.may_serve():
                raise StanzaError(StanzaCondition.SERVICE_UNAVAILABLE, "node fenced", "wait")
            if assignment is None:
                assignment = await self._read_assignment(redundancy, username)
            if assignment.current_node == redundancy.node:
                return
            link = self.member.link
            if redundancy.srm.state is State.TAKING_OVER:
                pass  # our SRM is moving every user here right now: wait for it
            elif link is not None and link.connected:
                released, why = await self._ask_release(username)
                if why == "alive":
                    peer = redundancy.peer.name if redundancy.peer else "the other node"
                    raise StanzaError(StanzaCondition.CONFLICT, f"your session on {peer} is alive")
                if released:
                    assignment = None  # the peer moved the user here: read it back
                    continue
            elif link is not None and link.closed_by_peer:
                # the peer's system closed the link (its process ended): take the user alone
                try:
                    claimed = await self._claim(username)
                except StoreUnavailable as exc:
                    raise StanzaError(
                        StanzaCondition.INTERNAL_SERVER_ERROR, "store unavailable"
                    ) from exc
                if claimed:
                    return
                assignment = redundancy.assignments.get(username)  # moved with others?
                if assignment is None or assignment.current_node != redundancy.node:
                    assignment = None  # not on the peer any more: read where it is
                continue
            if loop.time() > deadline:
                raise StanzaError(
                    StanzaCondition.REMOTE_SERVER_TIMEOUT, "the other node did not answer", "wait"
                )
            await asyncio.sleep(_RETRY)  # a silent peer: the SRM takes over after its timeout
            assignment = redundancy.assignments.get(username)  # kept fresh by its reloads

    async def _read_assignment(self, redundancy: Redundancy, username: str) -> Assignment:
        try:
            assignment = await redundancy.refresh_assignment(username)
        except StoreUnavailable as exc:
            raise StanzaError(StanzaCondition.INTERNAL_SERVER_ERROR, "store unavailable") from exc
        if assignment is None:
            raise StanzaError(StanzaCondition.ITEM_NOT_FOUND, "no assignment for this user")
        return assignment

    async def _claim_batch(self, usernames: list[str]) -> list[bool]:
        """Move users here from the peer whose system closed the link: one fenced move.
        Every user of the peer with a standby session here goes with the first ones to
        ask: their clients lost their sessions with that process too and are asking now
        (one move for all of them instead of one per batch of requests). True for each
        user served here now, however it got here (an earlier batch took most)."""
        redundancy, manager = self.member.redundancy, self.member.node.manager
        if redundancy is None or redundancy.peer is None or manager is None:
            return [False] * len(usernames)
        on_peer = {name for name in (*usernames, *manager.standby) if redundancy.user_on_peer(name)}
        if on_peer:
            moved = await redundancy.claim_from_peer(list(on_peer))
            log.info("dual: %d users taken over from a closed peer", len(moved))
        return [redundancy.user_here(username) for username in usernames]

    async def _ask_release(self, username: str) -> tuple[bool, str]:
        answer = await self._ask({"op": "release", "user": username})
        if answer is None:
            return False, "down"
        return bool(answer.get("ok")), str(answer.get("why", ""))

    async def _ask(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """Ask the peer over the link; its answer, None when the link is down or the peer
        stays silent for the heartbeat timeout."""
        link = self.member.link
        if link is None:
            return None
        request_id = next(self._request_ids)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._requests[request_id] = answer
        try:
            if not link.send_if_connected({"t": "dual", **request, "id": request_id}):
                return None
            return await asyncio.wait_for(answer, self.member.params.heartbeat_timeout)
        except TimeoutError:
            return None
        finally:
            self._requests.pop(request_id, None)

    # --- contacts of a user whose session here ended after it moved -------------------

    def _presence_gone(self, session: ClientSession, jid: JID, record: UserRecord) -> bool:
        """Told of an available session that ended: when its user moved to the peer, the
        contacts hear 'unavailable' only if that resource does not live on there (a
        switched dual-connected client), or does not within a grace period (a client
        logging in again)."""
        redundancy, manager = self._redundancy(), self.member.node.manager
        if redundancy is None or manager is None:
            return False
        if not (session.moved_away or redundancy.user_on_peer(jid.local)):
            return False
        manager.spawn(self._announce_unless_live(session, jid, record))
        return True

    async def _announce_unless_live(
        self, session: ClientSession, jid: JID, record: UserRecord
    ) -> None:
        manager = self.member.node.manager
        assert manager is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _GONE_GRACE
        while loop.time() < deadline:
            if await self._live_at_peer(str(jid)):
                return  # its client switched: its presence there stands
            await asyncio.sleep(_GONE_POLL)
        manager.presence.went_offline(session, jid, record)

    async def _ask_live(self, jids: list[str]) -> list[bool]:
        answer = await self._ask({"op": "live?", "jids": jids})
        live = answer.get("live") if answer is not None else None
        found = set(live) if isinstance(live, list) else set()
        return [jid in found for jid in jids]

    async def _activate_all(
        self, username: str, answer: tuple[ClientSession, ET.Element] | None = None
    ) -> None:
        """Every standby session of the user here becomes active: the one that asked gets
        the result, the others a pushed activation."""
        manager = self.member.node.manager
        assert manager is not None
        domain = self.member.node.config.node.domain
        sessions = list(manager.standby.get(username, {}).values())
        if answer is not None and answer[0] not in sessions:
            sessions.append(answer[0])  # a push activated it meanwhile: answer all the same
        for session in sessions:
            pushed_meanwhile = session.activation_started
            await session.activate()
            if answer is not None and session is answer[0]:
                session.send(iq_result(answer[1], ET.Element(ACTIVATE), sender=domain))
            elif not pushed_meanwhile and session not in self._asked:
                push = ET.Element(ns.tag(ns.CLIENT, "iq"), {
                    "type": "set", "id": "activate-" + manager.new_token(8),
                    "from": domain, "to": str(session.jid),
                })  # fmt: skip
                ET.SubElement(push, ACTIVATE)
                session.send(push)
        if answer is not None and answer[0].standby:  # it ended while activating
            raise StanzaError(StanzaCondition.ITEM_NOT_FOUND, "session gone")

    # --- activation pushed by the server -----------------------------------------------

    def peer_link_lost(self) -> None:
        """The peer link went down. Closed by the peer's system (its process ended, rule 3):
        take every user of the peer with a standby session here now and push their
        activation, while their clients are still noticing the loss themselves."""
        redundancy, manager, link = self._redundancy(), self.member.node.manager, self.member.link
        if redundancy is None or manager is None or link is None or not link.closed_by_peer:
            return
        if redundancy.srm.state is not State.NORMAL or not redundancy.may_serve():
            return  # in a transition, or fenced: the SRM decides
        users = [name for name in manager.standby if redundancy.user_on_peer(name)]
        if users:
            manager.spawn(self._take_from_closed_peer(users))

    async def _take_from_closed_peer(self, users: list[str]) -> None:
        try:
            moved = await asyncio.gather(*(self._claim(name) for name in users))
        except StoreUnavailable as exc:
            log.warning("dual: cannot take users from the closed peer: %s", exc)
            return
        self.users_arrived([name for name, ok in zip(users, moved, strict=True) if ok])

    def users_arrived(self, usernames: list[str]) -> list[asyncio.Future[None]]:
        """Users now served here (take-over, fallback, recovery): activate their standbys.
        Returns the activations under way (each ends once its push is written)."""
        manager = self.member.node.manager
        if manager is None:
            return []
        return [
            manager.spawn(self._activate_all(username))
            for username in usernames
            if username in manager.standby
        ]

    # --- the peer asks us to release a user --------------------------------------------

    def on_peer_message(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        manager = self.member.node.manager
        assert manager is not None
        if op == "release" and isinstance(message.get("user"), str):
            manager.spawn(self._release(str(message["user"]), message.get("id")))
        elif op == "live?" and isinstance(message.get("jids"), list):
            live = [jid for jid in message["jids"] if isinstance(jid, str) and self._live(jid)]
            self._answer(message, {"op": "live", "live": live})
        elif op in ("released", "live"):
            waiting = self._requests.get(message.get("id"))  # type: ignore[arg-type]
            if waiting is not None and not waiting.done():
                waiting.set_result(message)

    def _live(self, jid: str) -> bool:
        manager = self.member.node.manager
        assert manager is not None
        try:
            return manager.presence.live_here(JID.parse(jid))
        except InvalidJID:
            return False

    def _answer(self, request: dict[str, Any], answer: dict[str, Any]) -> None:
        link = self.member.link
        if link is not None:
            link.send_if_connected({"t": "dual", **answer, "id": request.get("id")})

    async def _release(self, username: str, request_id: object) -> None:
        released, why = await self._hand_over(username)
        self._answer({"id": request_id}, {"op": "released", "ok": released, "why": why})

    async def _hand_over(self, username: str) -> tuple[bool, str]:
        """The peer asks for a user whose client lost its session here: move the user to
        the peer unless a live session of it is still here."""
        redundancy, manager = self.member.redundancy, self.member.node.manager
        if redundancy is None or redundancy.peer is None or manager is None:
            return False, "no group"
        record = manager.users.get(username)
        if record is not None and any(s.hibernated_until is None for s in record.sessions.values()):
            return False, "alive"
        try:
            assignment = await redundancy.refresh_assignment(username)
            if assignment is None or assignment.current_node != redundancy.node:
                return True, "not here"  # the peer reads the store again
            if not await redundancy.give_user(username, assignment):
                return False, "raced"
        except StoreUnavailable:
            return False, "store"
        manager.end_hibernated(lambda name: name == username)  # no live one: checked above
        return True, "released"
