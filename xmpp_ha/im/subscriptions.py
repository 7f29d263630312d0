"""Presence subscription state (RFC 6121 §3 and Appendix A), as pure functions.

Each function takes one side's roster item for the other party (or None) and
whether an inbound request is pending, and returns an `Outcome`: the new item,
and what the server must do next. The session manager applies the outcome to
the store, the roster cache, pushes and routing.

Invariants: subscription is one of none/to/from/both; 'ask' (pending out) is
only set while 'to' is not held; an item with approved=True never has 'from'.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from xmpp_ha.store.repository import RosterItem, Subscription

_ADD_TO: dict[Subscription, Subscription] = {
    "none": "to",
    "from": "both",
    "to": "to",
    "both": "both",
}
_ADD_FROM: dict[Subscription, Subscription] = {
    "none": "from", "to": "both", "from": "from", "both": "both"
}  # fmt: skip
_DROP_TO: dict[Subscription, Subscription] = {"to": "none", "both": "from", "none": "none",
                                              "from": "from"}  # fmt: skip
_DROP_FROM: dict[Subscription, Subscription] = {"from": "none", "both": "to", "none": "none",
                                                "to": "to"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Outcome:
    item: RosterItem | None = None  # the changed item, None when nothing changed
    route: bool = False  # outbound: send the stanza on; inbound: deliver it to the user
    auto_reply: str = ""  # inbound: answer on the user's behalf with this presence type
    store_pending: bool = False  # inbound subscribe kept as "pending in"
    drop_pending: bool = False  # the pending inbound request is answered
    send_presence: str = ""  # outbound: 'available' or 'unavailable' from the user's resources


def _item(item: RosterItem | None, contact: str) -> RosterItem:
    return item if item is not None else RosterItem(contact=contact)


def outbound(kind: str, contact: str, item: RosterItem | None, pending_in: bool) -> Outcome:
    """The user sends subscription stanza `kind` to `contact`."""
    current = _item(item, contact)
    sub = current.subscription
    if kind == "subscribe":
        if sub in ("to", "both"):
            return Outcome(route=True)
        changed = None if current.ask and item is not None else replace(current, ask=True)
        return Outcome(item=changed, route=True)
    if kind == "unsubscribe":
        if sub in ("none", "from") and not current.ask:
            return Outcome(item=None, route=True)
        return Outcome(item=replace(current, subscription=_DROP_TO[sub], ask=False), route=True)
    if kind == "subscribed":
        if pending_in:
            changed = replace(current, subscription=_ADD_FROM[sub], approved=False)
            return Outcome(item=changed, route=True, drop_pending=True, send_presence="available")
        if sub in ("from", "both") or current.approved:
            return Outcome()
        return Outcome(item=replace(current, approved=True))  # pre-approval (§3.4)
    if kind == "unsubscribed":
        if sub in ("from", "both") or pending_in:
            changed = replace(current, subscription=_DROP_FROM[sub], approved=False)
            if item is None:
                changed = None  # refusing a request from someone not in the roster
            return Outcome(
                item=changed, route=True, drop_pending=pending_in, send_presence="unavailable"
            )
        if current.approved:
            return Outcome(item=replace(current, approved=False))
        return Outcome()
    raise ValueError(f"not a subscription type: {kind}")


def inbound(kind: str, contact: str, item: RosterItem | None, pending_in: bool) -> Outcome:
    """Subscription stanza `kind` arrives for the user from `contact`."""
    current = _item(item, contact)
    sub = current.subscription
    if kind == "subscribe":
        if sub in ("from", "both"):
            return Outcome(auto_reply="subscribed")
        if current.approved:
            changed = replace(current, subscription=_ADD_FROM[sub], approved=False)
            return Outcome(item=changed, auto_reply="subscribed")
        if pending_in:
            return Outcome()  # RFC 6121 A.3.1: a repeated request is not delivered again
        return Outcome(route=True, store_pending=True)
    if kind == "subscribed":
        if current.ask and sub in ("none", "from"):
            changed = replace(current, subscription=_ADD_TO[sub], ask=False)
            return Outcome(item=changed, route=True)
        return Outcome()
    if kind == "unsubscribe":
        if sub in ("from", "both"):
            changed = replace(current, subscription=_DROP_FROM[sub], approved=False)
            return Outcome(item=changed, route=True, drop_pending=pending_in)
        return Outcome(route=pending_in, drop_pending=pending_in)
    if kind == "unsubscribed":
        if sub in ("to", "both") or current.ask:
            changed = replace(current, subscription=_DROP_TO[sub], ask=False)
            return Outcome(item=changed, route=True)
        return Outcome()
    raise ValueError(f"not a subscription type: {kind}")
