"""Failed-login throttling: doubling, cap, reset on success or quiet, bounded table."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from xmpp_ha.im.throttle import AuthThrottle

ADDRESS = "192.0.2.7"
OTHER = "2001:db8::1"


def test_delays_double_from_base_up_to_the_cap() -> None:
    throttle = AuthThrottle(base=1.0, cap=30.0)
    delays = [throttle.failed(ADDRESS, now=float(n)) for n in range(8)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert throttle.failures(ADDRESS) == 8


def test_base_scales_every_delay() -> None:
    throttle = AuthThrottle(base=0.25, cap=1.5)
    assert [throttle.failed(ADDRESS, now=0.0) for _ in range(5)] == [0.25, 0.5, 1.0, 1.5, 1.5]


def test_zero_base_never_delays() -> None:
    throttle = AuthThrottle(base=0.0)
    assert [throttle.failed(ADDRESS, now=0.0) for _ in range(5)] == [0.0] * 5
    assert throttle.failures(ADDRESS) == 5


def test_success_clears_the_record() -> None:
    throttle = AuthThrottle()
    for _ in range(4):
        throttle.failed(ADDRESS, now=10.0)
    throttle.succeeded(ADDRESS)
    assert throttle.failures(ADDRESS) == 0
    assert throttle.failed(ADDRESS, now=11.0) == 1.0


def test_success_of_an_unknown_address_is_harmless() -> None:
    throttle = AuthThrottle()
    throttle.succeeded(ADDRESS)
    assert throttle.failures(ADDRESS) == 0


def test_addresses_are_counted_apart() -> None:
    throttle = AuthThrottle()
    for _ in range(3):
        throttle.failed(ADDRESS, now=0.0)
    assert throttle.failed(OTHER, now=0.0) == 1.0
    throttle.succeeded(OTHER)
    assert throttle.failed(ADDRESS, now=0.0) == 8.0


def test_quiet_time_forgets_the_failures() -> None:
    throttle = AuthThrottle(forget_after=600.0)
    for _ in range(5):
        throttle.failed(ADDRESS, now=1000.0)
    assert throttle.failed(ADDRESS, now=1000.0 + 600.5) == 1.0  # counted from one again
    assert throttle.failures(ADDRESS) == 1


def test_quiet_time_is_measured_from_the_last_failure() -> None:
    throttle = AuthThrottle(forget_after=600.0)
    now = 0.0
    delays = []
    for _ in range(6):  # every failure within 600 s of the one before: never forgotten
        now += 500.0
        delays.append(throttle.failed(ADDRESS, now))
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]


def test_exactly_forget_after_is_not_yet_quiet() -> None:
    throttle = AuthThrottle(forget_after=600.0)
    throttle.failed(ADDRESS, now=0.0)
    assert throttle.failed(ADDRESS, now=600.0) == 2.0


def test_a_clock_going_backwards_forgets_nothing() -> None:
    throttle = AuthThrottle()
    throttle.failed(ADDRESS, now=5000.0)
    assert throttle.failed(ADDRESS, now=10.0) == 2.0


def test_table_is_bounded_and_drops_the_longest_quiet_address() -> None:
    throttle = AuthThrottle(max_entries=3)
    for n, address in enumerate(["a", "b", "c"]):
        throttle.failed(address, now=float(n))
    throttle.failed("a", now=3.0)  # "a" failed again: now "b" is the oldest
    throttle.failed("d", now=4.0)
    assert [throttle.failures(address) for address in "abcd"] == [2, 0, 1, 1]
    for n in range(100):
        throttle.failed(f"flood-{n}", now=5.0)
    remembered = [n for n in range(100) if throttle.failures(f"flood-{n}")]
    assert remembered == [97, 98, 99]  # the table never holds more than max_entries
    assert throttle.failures("a") == 0


def test_a_long_run_of_failures_stays_at_the_cap() -> None:
    throttle = AuthThrottle(base=1.0, cap=30.0)
    delays = [throttle.failed(ADDRESS, now=0.0) for _ in range(1100)]
    assert set(delays[5:]) == {30.0}


# --- against a model ------------------------------------------------------------------

# (address, seconds since the previous event, True for a failure / False for a success)
EVENTS = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.floats(0.0, 400.0), st.booleans()),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(EVENTS)
def test_delay_follows_the_consecutive_failure_count(
    events: list[tuple[str, float, bool]],
) -> None:
    """The delay is min(cap, base·2^(k-1)), k the failures since a success or a quiet gap."""
    base, cap, forget_after = 0.5, 30.0, 600.0
    throttle = AuthThrottle(base=base, cap=cap, forget_after=forget_after)
    model: dict[str, tuple[int, float]] = {}  # address -> (consecutive failures, last failure)
    now = 0.0
    for address, elapsed, failure in events:
        now += elapsed
        if not failure:
            throttle.succeeded(address)
            model.pop(address, None)
            continue
        count, last = model.get(address, (0, now))
        count = 1 if now - last > forget_after else count + 1
        model[address] = (count, now)
        assert throttle.failed(address, now) == min(cap, base * 2 ** (count - 1))
        assert throttle.failures(address) == count
