"""Dual connections for one simulated user, as a pure decision core (docs/dual-connections.md).

The driver owns the sockets and the clock. It tells the core what happened, with
the time, and carries out the actions the core returns, in order; `due()` says
when to call `tick()` next. No sockets, no clock, no random source here.

Two connections, each named by the node it goes to: the **active** one (served)
and the **standby** one (inactive). Rules:
- Once the active session runs and the server offers dual connections, ask it
  for a standby plan; a plan opens the standby `delay` seconds later on the
  plan's node (a standby refused or lost: ask again after a back-off).
- The active connection lost: with a standby session up, ask it to activate
  (the switch starts now); without one, log in again on the other node.
- Activation granted (answer or push): the standby becomes the active session;
  send presence (broadcast and directed), re-send what the old session never
  had acknowledged, probe a round trip to ourselves, and close the old
  connection if it is still open. The switch ends when the probe comes back:
  that is the failover's downtime. A few seconds later ask for a new plan (not
  sooner: the server has the whole switch of many users to do).
- The standby connection lost (its node failed, most likely, and that node's
  users are switching to ours right now): ask for a new plan as late as after
  a switch; a standby refused while opening: ask again after a back-off.
- Activation refused because the old session is alive (`conflict`): try again
  shortly (the server learns of its death in a moment), at most a few times,
  then log in again; refused otherwise: log in again.
- Messages are de-duplicated by (sender, id): the server hands on what an old
  session never acknowledged, so a message can come twice.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

BACKOFF_MIN = 0.5  # s before asking for a new plan after a failed standby
BACKOFF_MAX = 30.0
ACTIVATE_RETRY = 0.1  # s between activation attempts refused with conflict
ACTIVATE_TRIES = 50
DEDUP_WINDOW = 4096  # (sender, id) pairs remembered
# s (times the jitter) after a switch, or after the standby was lost: ask for a new plan
PLAN_AFTER_SWITCH = 4.0


# --- actions for the driver --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestPlan:
    """Send `<iq type='get'><plan/></iq>` on the active connection."""


@dataclass(frozen=True, slots=True)
class OpenStandby:
    """Connect, log in and bind with `<standby/>` on this node."""

    node: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Activate:
    """Send `<iq type='set'><activate/></iq>` on the standby connection."""


@dataclass(frozen=True, slots=True)
class Promote:
    """The standby connection is the active one from now on; the old one (if any) is
    closed by the driver. Then: presence, re-sent stanzas, the probe."""

    resend: list[ET.Element]


@dataclass(frozen=True, slots=True)
class Relogin:
    """No standby to switch to: log in (actively) on this node."""

    node: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Probe:
    """Send a message to our own full JID; report it with `probe_returned()`."""


Action = RequestPlan | OpenStandby | Activate | Promote | Relogin | Probe


@dataclass
class Downtime:
    started: float  # when the active session was lost (or the push came)
    ended: float | None = None  # when the first round trip on the new session came back
    pushed: bool = False
    activated: float | None = None  # when the new session became active

    @property
    def seconds(self) -> float | None:
        return None if self.ended is None else self.ended - self.started


@dataclass
class DualCore:
    """One user's two connections. `nodes`: node name -> (host, port), both nodes."""

    nodes: dict[str, tuple[str, int]]
    # factor applied to each back-off (the driver draws it, e.g. uniform 0.5-1.0, so that
    # users who lost their standby at the same moment do not all ask again at once)
    jitter: Callable[[], float] = lambda: 1.0
    active: str | None = None  # node of the active session, None while there is none
    standby: str | None = None  # node of a running standby session
    standby_opening: str | None = None  # a standby session being opened there
    downtimes: list[Downtime] = field(default_factory=list)
    duplicates: int = 0
    _plan_at: float | None = None  # when to ask for a plan (after a back-off)
    _open_at: tuple[float, OpenStandby] | None = None
    _backoff: float = BACKOFF_MIN
    _switch: Downtime | None = None
    _activating: bool = False
    _activate_tries: int = 0
    _activate_at: float | None = None
    _unacked: list[ET.Element] = field(default_factory=list)
    _last_active: str | None = None
    _seen: OrderedDict[tuple[str, str], None] = field(default_factory=OrderedDict)

    # --- time ------------------------------------------------------------------

    def due(self) -> float | None:
        """The next time `tick()` has something to do, None when nothing waits."""
        times = [t for t in (self._plan_at, self._activate_at) if t is not None]
        if self._open_at is not None:
            times.append(self._open_at[0])
        return min(times) if times else None

    def tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        if self._activate_at is not None and now >= self._activate_at:
            self._activate_at = None
            if self.standby is not None:
                self._activating = True
                actions.append(Activate())
        if self._open_at is not None and now >= self._open_at[0]:
            opening = self._open_at[1]
            self._open_at = None
            if self.active is not None and self.standby is None and opening.node != self.active:
                self.standby_opening = opening.node
                actions.append(opening)
        if self._plan_at is not None and now >= self._plan_at:
            self._plan_at = None
            if self.active is not None and self.standby is None and self.standby_opening is None:
                actions.append(RequestPlan())
        return actions

    # --- the active session ------------------------------------------------------

    def active_started(self, now: float, node: str, *, dual_offered: bool) -> list[Action]:
        """An active session runs on `node` (after a login or a relogin)."""
        self.active = self._last_active = node
        self._backoff = BACKOFF_MIN
        if self._switch is not None:  # a relogin ended a switch: the plan a little later
            if dual_offered and self.standby is None:
                self._plan_at = now + PLAN_AFTER_SWITCH * self.jitter()
            return [Probe()]
        if dual_offered and self.standby is None:
            return [RequestPlan()]
        return []

    def plan(self, now: float, node: str, host: str, port: int, delay: float) -> list[Action]:
        self.nodes[node] = (host, port)
        if self.standby is None and self.standby_opening is None:
            self._open_at = (now + max(delay, 0.0), OpenStandby(node, host, port))
        return []

    def plan_refused(self, now: float) -> list[Action]:
        """No plan (dual connections not offered here now): ask again later."""
        return self._retry_plan(now)

    def active_lost(self, now: float, unacked: list[ET.Element]) -> list[Action]:
        """The active connection ended; `unacked`: what it had sent, not acknowledged."""
        self._unacked.extend(unacked)
        lost = self.active
        self.active = None
        if self._switch is None:
            self._switch = Downtime(started=now)
        if self.standby is not None:
            self._activating = True
            self._activate_tries = 1
            return [Activate()]
        other = self._other(lost)
        host, port = self.nodes[other]
        return [Relogin(other, host, port)]

    def relogin_failed(self, now: float, node: str) -> list[Action]:
        """A relogin did not succeed: try the other node."""
        other = self._other(node)
        host, port = self.nodes[other]
        return [Relogin(other, host, port)]

    # --- the standby session -------------------------------------------------------

    def standby_started(self, now: float) -> list[Action]:
        assert self.standby_opening is not None
        self.standby, self.standby_opening = self.standby_opening, None
        self._backoff = BACKOFF_MIN
        if self.active is None and not self._activating:  # lost the active one meanwhile
            self._activating = True
            self._activate_tries = 1
            return [Activate()]
        return []

    def standby_lost(self, now: float) -> list[Action]:
        """The standby connection ended or was refused (before or after binding)."""
        was_running = self.standby is not None
        self.standby = self.standby_opening = None
        self._activating = False
        if self.active is None:
            node = self._other(self._last_active)
            host, port = self.nodes[node]
            return [Relogin(node, host, port)]
        if was_running:  # its node's users are switching to our node now: ask later
            self._plan_at = now + PLAN_AFTER_SWITCH * self.jitter()
            return []
        return self._retry_plan(now)

    def activated(self, now: float, *, pushed: bool = False) -> list[Action]:
        """The standby session is active now (the answer to Activate, or a push)."""
        if self.standby is None:
            return []  # both came (a push crossed our request): the first one counted
        if self._switch is None:  # pushed while the old session was fine
            self._switch = Downtime(started=now, pushed=True)
        self._switch.activated = now
        self.active, self.standby = self.standby, None
        self._last_active = self.active
        self._activating = False
        self._activate_at = None
        resend, self._unacked = self._unacked, []
        self._plan_at = now + PLAN_AFTER_SWITCH * self.jitter()
        return [Promote(resend), Probe()]

    def activation_refused(self, now: float, condition: str) -> list[Action]:
        self._activating = False
        if condition in ("conflict", "remote-server-timeout") and (
            self._activate_tries < ACTIVATE_TRIES
        ):
            self._activate_tries += 1
            self._activate_at = now + ACTIVATE_RETRY
            return []
        self.standby = None  # the driver closes it
        node = self._last_active or self._other(None)
        host, port = self.nodes[node]
        return [Relogin(node, host, port)]

    def old_unacked(self, stanzas: list[ET.Element]) -> None:
        """What the old active connection had not seen acknowledged when it was closed
        after a push (the driver closes it on Promote)."""
        self._unacked.extend(stanzas)

    # --- traffic --------------------------------------------------------------------

    def probe_returned(self, now: float) -> list[Action]:
        """The switch is over (its new plan is due a little later)."""
        if self._switch is not None:
            self._switch.ended = now
            self.downtimes.append(self._switch)
            self._switch = None
        return []

    def message_received(self, sender: str, message_id: str) -> bool:
        """True when this (sender, id) is new; a duplicate is counted and False."""
        if not message_id:
            return True
        key = (sender, message_id)
        if key in self._seen:
            self.duplicates += 1
            return False
        self._seen[key] = None
        if len(self._seen) > DEDUP_WINDOW:
            self._seen.popitem(last=False)
        return True

    @property
    def switching(self) -> bool:
        return self._switch is not None

    # --- helpers ----------------------------------------------------------------------

    def _retry_plan(self, now: float) -> list[Action]:
        self._plan_at = now + self._backoff * self.jitter()
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        return []

    def _other(self, node: str | None) -> str:
        names = sorted(self.nodes)
        if node in names and len(names) > 1:
            return names[1 - names.index(node)]
        return names[0]
