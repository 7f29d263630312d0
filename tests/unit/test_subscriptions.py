"""Presence subscription state against RFC 6121 Appendix A, row by row.

The nine defined states of A.1 are (subscription, ask, pending in); the module
keeps the first two on the roster item and gets the third as `pending_in`. Each
row of the A.2 (outbound) and A.3 (inbound) tables is one case: the state
before, whether the stanza is routed (A.2) or delivered (A.3), the state after.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xmpp_ha.im.subscriptions import Outcome, inbound, outbound
from xmpp_ha.store.repository import RosterItem

CONTACT = "romeo@example.net"
KINDS = ("subscribe", "unsubscribe", "subscribed", "unsubscribed")

# RFC 6121 A.1: the name of each defined state -> (subscription, ask, pending in)
STATES: dict[str, tuple[str, bool, bool]] = {
    "None": ("none", False, False),
    "None + Pending Out": ("none", True, False),
    "None + Pending In": ("none", False, True),
    "None + Pending Out/In": ("none", True, True),
    "To": ("to", False, False),
    "To + Pending In": ("to", False, True),
    "From": ("from", False, False),
    "From + Pending Out": ("from", True, False),
    "Both": ("both", False, False),
}
NAMES = {value: name for name, value in STATES.items()}
SAME = "no state change"
PRE_APPROVAL = "pre-approval"  # A.2.3: no state change, the subscription is pre-approved

# (existing state, routed or delivered?, new state), in the RFC's row order.
Row = tuple[str, bool, str]

A_2_1_SUBSCRIBE: list[Row] = [
    ("None", True, "None + Pending Out"),
    ("None + Pending Out", True, SAME),
    ("None + Pending In", True, "None + Pending Out/In"),
    ("None + Pending Out/In", True, SAME),
    ("To", True, SAME),
    ("To + Pending In", True, SAME),
    ("From", True, "From + Pending Out"),
    ("From + Pending Out", True, SAME),
    ("Both", True, SAME),
]
A_2_2_UNSUBSCRIBE: list[Row] = [
    ("None", True, SAME),
    ("None + Pending Out", True, "None"),
    ("None + Pending In", True, SAME),
    ("None + Pending Out/In", True, "None + Pending In"),
    ("To", True, "None"),
    ("To + Pending In", True, "None + Pending In"),
    ("From", True, SAME),
    ("From + Pending Out", True, "From"),
    ("Both", True, "From"),
]
A_2_3_SUBSCRIBED: list[Row] = [
    ("None", False, PRE_APPROVAL),
    ("None + Pending Out", False, PRE_APPROVAL),
    ("None + Pending In", True, "From"),
    ("None + Pending Out/In", True, "From + Pending Out"),
    ("To", False, PRE_APPROVAL),
    ("To + Pending In", True, "Both"),
    ("From", False, SAME),
    ("From + Pending Out", False, SAME),
    ("Both", False, SAME),
]
A_2_4_UNSUBSCRIBED: list[Row] = [
    ("None", False, SAME),  # [1] cancels a pre-approval
    ("None + Pending Out", False, SAME),  # [1]
    ("None + Pending In", True, "None"),
    ("None + Pending Out/In", True, "None + Pending Out"),
    ("To", False, SAME),  # [1]
    ("To + Pending In", True, "To"),
    ("From", True, "None"),
    ("From + Pending Out", True, "None + Pending Out"),
    ("Both", True, "To"),
]
A_3_1_SUBSCRIBE: list[Row] = [
    ("None", True, "None + Pending In"),
    ("None + Pending Out", True, "None + Pending Out/In"),
    ("None + Pending In", False, SAME),
    ("None + Pending Out/In", False, SAME),
    ("To", True, "To + Pending In"),
    ("To + Pending In", False, SAME),
    ("From", False, SAME),  # * the server auto-replies "subscribed"
    ("From + Pending Out", False, SAME),  # *
    ("Both", False, SAME),  # *
]
A_3_2_UNSUBSCRIBE: list[Row] = [
    ("None", False, SAME),
    ("None + Pending Out", False, SAME),
    ("None + Pending In", True, "None"),
    ("None + Pending Out/In", True, "None + Pending Out"),
    ("To", False, SAME),
    ("To + Pending In", True, "To"),
    ("From", True, "None"),
    ("From + Pending Out", True, "None + Pending Out"),
    ("Both", True, "To"),
]
A_3_3_SUBSCRIBED: list[Row] = [
    ("None", False, SAME),
    ("None + Pending Out", True, "To"),
    ("None + Pending In", False, SAME),
    ("None + Pending Out/In", True, "To + Pending In"),
    ("To", False, SAME),
    ("To + Pending In", False, SAME),
    ("From", False, SAME),
    ("From + Pending Out", True, "Both"),
    ("Both", False, SAME),
]
A_3_4_UNSUBSCRIBED: list[Row] = [
    ("None", False, SAME),
    ("None + Pending Out", True, "None"),
    ("None + Pending In", False, SAME),
    ("None + Pending Out/In", True, "None + Pending In"),
    ("To", True, "None"),
    ("To + Pending In", True, "None + Pending In"),
    ("From", False, SAME),
    ("From + Pending Out", True, "From"),
    ("Both", True, "From"),
]

# Rows where the module differs from the RFC, with the reason the case is xfail.
DEVIATIONS: dict[tuple[str, str, str], str] = {}


Handler = Callable[[str, str, RosterItem | None, bool], Outcome]


TABLES: list[tuple[str, str, list[Row]]] = [
    ("outbound", "subscribe", A_2_1_SUBSCRIBE),
    ("outbound", "unsubscribe", A_2_2_UNSUBSCRIBE),
    ("outbound", "subscribed", A_2_3_SUBSCRIBED),
    ("outbound", "unsubscribed", A_2_4_UNSUBSCRIBED),
    ("inbound", "subscribe", A_3_1_SUBSCRIBE),
    ("inbound", "unsubscribe", A_3_2_UNSUBSCRIBE),
    ("inbound", "subscribed", A_3_3_SUBSCRIBED),
    ("inbound", "unsubscribed", A_3_4_UNSUBSCRIBED),
]


def rows(states: tuple[str, ...] = tuple(STATES)) -> list[object]:
    """Every table row whose existing state is in `states`, as pytest cases."""
    cases: list[object] = []
    for direction, kind, table in TABLES:
        for state, routed, new_state in table:
            if state not in states:
                continue
            reason = DEVIATIONS.get((direction, kind, state))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            case_id = f"{direction}-{kind}-{state}".replace(" ", "")
            cases.append(
                pytest.param(direction, kind, state, routed, new_state, marks=marks, id=case_id)
            )
    return cases


HANDLERS: dict[str, Handler] = {"outbound": outbound, "inbound": inbound}


def item_in(state: str, *, approved: bool = False) -> tuple[RosterItem, bool]:
    """A roster item for CONTACT in the RFC state `state`, and 'pending in'."""
    subscription, ask, pending_in = STATES[state]
    item = RosterItem(contact=CONTACT, subscription=subscription, ask=ask, approved=approved)  # type: ignore[arg-type]
    return item, pending_in


def state_after(outcome: Outcome, item: RosterItem | None, pending_in: bool) -> str:
    """The RFC state once `outcome` is applied to (item, pending_in)."""
    new_item = outcome.item if outcome.item is not None else item
    subscription = new_item.subscription if new_item is not None else "none"
    ask = new_item.ask if new_item is not None else False
    pending = (pending_in or outcome.store_pending) and not outcome.drop_pending
    return NAMES[(subscription, ask, pending)]


@pytest.mark.parametrize(("direction", "kind", "state", "routed", "new_state"), rows())
def test_rfc6121_appendix_a(
    direction: str, kind: str, state: str, routed: bool, new_state: str
) -> None:
    item, pending_in = item_in(state)
    outcome = HANDLERS[direction](kind, CONTACT, item, pending_in)
    expected = state if new_state in (SAME, PRE_APPROVAL) else new_state
    assert (outcome.route, state_after(outcome, item, pending_in)) == (routed, expected)
    if new_state == PRE_APPROVAL:
        assert outcome.item is not None and outcome.item.approved


@pytest.mark.parametrize(
    ("direction", "kind", "state", "routed", "new_state"), rows(("None", "None + Pending In"))
)
def test_rfc6121_appendix_a_without_a_roster_item(
    direction: str, kind: str, state: str, routed: bool, new_state: str
) -> None:
    """The states None and None + Pending In also hold for a contact not in the roster."""
    """The states None and None + Pending In also hold for a contact not in the roster."""
    pending_in = STATES[state][2]
    outcome = HANDLERS[direction](kind, CONTACT, None, pending_in)
    expected = state if new_state in (SAME, PRE_APPROVAL) else new_state
    assert (outcome.route, state_after(outcome, None, pending_in)) == (routed, expected)


# --- the footnotes and the text around the tables ------------------------------------


@pytest.mark.parametrize("state", ["From", "From + Pending Out", "Both"])
def test_inbound_subscribe_when_already_subscribed_is_auto_approved(state: str) -> None:
    item, pending_in = item_in(state)
    outcome = inbound("subscribe", CONTACT, item, pending_in)
    assert outcome == Outcome(auto_reply="subscribed")


@pytest.mark.parametrize("state", ["None", "None + Pending Out", "To"])
def test_inbound_subscribe_is_kept_pending(state: str) -> None:
    item, pending_in = item_in(state)
    outcome = inbound("subscribe", CONTACT, item, pending_in)
    assert outcome.store_pending and outcome.item is None and not outcome.auto_reply


@pytest.mark.parametrize(
    ("state", "after"),
    [("None", "from"), ("None + Pending Out", "from"), ("To", "both")],
)
def test_inbound_subscribe_with_pre_approval_is_approved_at_once(state: str, after: str) -> None:
    """RFC 6121 §3.4: a pre-approved request is answered by the server and not delivered."""
    item, pending_in = item_in(state, approved=True)
    outcome = inbound("subscribe", CONTACT, item, pending_in)
    assert outcome.item == replace(item, subscription=after, approved=False)  # type: ignore[arg-type]
    assert outcome.auto_reply == "subscribed"
    assert not outcome.route and not outcome.store_pending


@pytest.mark.parametrize("state", ["None", "None + Pending Out", "To"])
def test_outbound_subscribed_pre_approves_once(state: str) -> None:
    item, pending_in = item_in(state)
    outcome = outbound("subscribed", CONTACT, item, pending_in)
    assert outcome == Outcome(item=replace(item, approved=True))
    again = outbound("subscribed", CONTACT, replace(item, approved=True), pending_in)
    assert again == Outcome()


@pytest.mark.parametrize("state", ["None", "None + Pending Out", "To"])
def test_outbound_unsubscribed_cancels_a_pre_approval(state: str) -> None:
    """A.2.4 footnote [1]."""
    item, pending_in = item_in(state, approved=True)
    outcome = outbound("unsubscribed", CONTACT, item, pending_in)
    assert outcome == Outcome(item=replace(item, approved=False))


@pytest.mark.parametrize("state", ["None + Pending In", "None + Pending Out/In", "To + Pending In"])
def test_outbound_subscribed_answers_the_request_and_sends_presence(state: str) -> None:
    """RFC 6121 §3.1.5: the contact's available presence follows the approval."""
    item, pending_in = item_in(state)
    outcome = outbound("subscribed", CONTACT, item, pending_in)
    assert outcome.drop_pending and outcome.route
    assert outcome.send_presence == "available"


@pytest.mark.parametrize("state", ["None + Pending In", "From", "From + Pending Out", "Both"])
def test_outbound_unsubscribed_sends_unavailable(state: str) -> None:
    """RFC 6121 §3.2.2: unavailable presence goes out before the cancellation."""
    item, pending_in = item_in(state)
    outcome = outbound("unsubscribed", CONTACT, item, pending_in)
    assert outcome.send_presence == "unavailable"
    assert outcome.drop_pending == pending_in


def test_refusing_a_request_from_someone_not_in_the_roster_adds_nobody() -> None:
    outcome = outbound("unsubscribed", CONTACT, None, True)
    assert outcome.item is None and outcome.route and outcome.drop_pending


def test_approving_a_request_from_someone_not_in_the_roster_adds_them() -> None:
    outcome = outbound("subscribed", CONTACT, None, True)
    assert outcome.item == RosterItem(contact=CONTACT, subscription="from")
    assert outcome.route and outcome.drop_pending


def test_inbound_subscribe_from_a_stranger_creates_no_roster_item() -> None:
    """A.1 "None + Pending In": noted, but no roster item until the user approves."""
    outcome = inbound("subscribe", CONTACT, None, False)
    assert outcome == Outcome(route=True, store_pending=True)


@pytest.mark.parametrize("handler", [outbound, inbound])
@pytest.mark.parametrize("kind", ["available", "probe", "Subscribe", ""])
def test_other_types_are_refused(handler: Handler, kind: str) -> None:
    with pytest.raises(ValueError):
        handler(kind, CONTACT, None, False)


# --- two users, every stanza delivered: the two rosters agree --------------------------


@dataclass
class Side:
    """One user's view of the other: the roster item and whether a request waits."""

    contact: str
    item: RosterItem | None = None
    pending_in: bool = False

    def apply(self, outcome: Outcome) -> None:
        if outcome.item is not None:
            self.item = outcome.item
        if outcome.store_pending:
            self.pending_in = True
        if outcome.drop_pending:
            self.pending_in = False

    @property
    def subscription(self) -> str:
        return self.item.subscription if self.item is not None else "none"

    @property
    def ask(self) -> bool:
        return self.item.ask if self.item is not None else False

    @property
    def approved(self) -> bool:
        return self.item.approved if self.item is not None else False


def deliver(receiver: Side, sender: Side, kind: str) -> None:
    outcome = inbound(kind, receiver.contact, receiver.item, receiver.pending_in)
    receiver.apply(outcome)
    if outcome.auto_reply:  # the receiver's server answers for it
        deliver(sender, receiver, outcome.auto_reply)


def send(sender: Side, receiver: Side, kind: str) -> None:
    outcome = outbound(kind, sender.contact, sender.item, sender.pending_in)
    sender.apply(outcome)
    if outcome.route:
        deliver(receiver, sender, kind)


def check_consistent(alice: Side, bob: Side) -> None:
    for user, other in ((alice, bob), (bob, alice)):
        assert (user.subscription in ("to", "both")) == (other.subscription in ("from", "both"))
        # a request is pending out on one side exactly when it is pending in on the other
        assert user.ask == other.pending_in
        # the module's own invariants
        assert not (user.ask and user.subscription in ("to", "both"))
        assert not (user.approved and user.subscription in ("from", "both"))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from(KINDS)), max_size=30))
def test_both_sides_stay_consistent_when_everything_is_delivered(
    steps: list[tuple[bool, str]],
) -> None:
    alice = Side(contact="bob@example.net")
    bob = Side(contact="alice@example.com")
    for from_alice, kind in steps:
        if from_alice:
            send(alice, bob, kind)
        else:
            send(bob, alice, kind)
        check_consistent(alice, bob)


def test_mutual_subscription_handshake() -> None:
    alice = Side(contact="bob@example.net")
    bob = Side(contact="alice@example.com")
    send(alice, bob, "subscribe")
    assert (alice.subscription, alice.ask, bob.pending_in) == ("none", True, True)
    send(bob, alice, "subscribed")
    assert (alice.subscription, bob.subscription) == ("to", "from")
    send(bob, alice, "subscribe")
    send(alice, bob, "subscribed")
    assert (alice.subscription, bob.subscription) == ("both", "both")
    send(alice, bob, "unsubscribe")
    assert (alice.subscription, bob.subscription) == ("from", "to")
    send(alice, bob, "unsubscribed")
    assert (alice.subscription, bob.subscription) == ("none", "none")
    check_consistent(alice, bob)
