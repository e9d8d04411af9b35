"""Unit tests for tether.engine.wireguard.timers: WireGuard's per-peer timers on a fake clock.

Nothing sleeps: a ``FakeClock`` is moved by hand and ``poll`` is called at chosen instants, so
every test checks that a timer fires exactly at its deadline and not a tick before.  ``Jitter``
returns a chosen sample in [0, 1]; 0 makes deadlines round numbers.  The hypothesis test at the
end drives random event sequences (with a simulated device answering the actions) and checks the
invariants the I/O shell relies on.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.engine.wireguard.timers import (
    COOKIE_REFRESH_TIME,
    KEEPALIVE_TIMEOUT,
    MAX_TIMER_HANDSHAKES,
    NEW_HANDSHAKE_AFTER,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_ON_RECEIVE_AFTER,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    ZERO_KEY_MATERIAL_AFTER,
    GiveUp,
    PeerTimers,
    SendHandshakeInitiation,
    SendKeepalive,
    Timer,
    ZeroKeys,
    keypair_expired,
    should_rekey_on_receive,
    should_rekey_on_send,
)

EPS = 1e-6
T0 = 1000.0  # a monotonic clock does not start at 0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> float:
        assert dt >= 0
        self.now += dt
        return self.now

    def set(self, when: float) -> float:
        assert when >= self.now, "the clock is monotonic"
        self.now = when
        return self.now


class Jitter:
    def __init__(self, value: float = 0.0) -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.value


def make(persistent_keepalive: int = 0, jitter: float = 0.0,
         start: bool = True) -> tuple[PeerTimers, FakeClock, Jitter]:
    clock, jit = FakeClock(), Jitter(jitter)
    timers = PeerTimers(persistent_keepalive, clock=clock, jitter=jit)
    if start:
        timers.start()
    return timers, clock, jit


def send_initiation(timers: PeerTimers) -> None:
    """What the device does when it sends an initiation (after the door said yes)."""
    timers.any_authenticated_packet_traversal()
    timers.any_authenticated_packet_sent()
    timers.handshake_initiated()


def fires_exactly_at(timers: PeerTimers, clock: FakeClock, when: float) -> list:
    """Nothing before ``when``; return what poll gives at ``when``."""
    assert timers.poll(when - EPS) == []
    clock.set(when)
    return timers.poll()


# --- constants ------------------------------------------------------------------------------------

def test_constants_are_the_whitepapers():
    assert REKEY_AFTER_MESSAGES == 2**60
    assert REJECT_AFTER_MESSAGES == 2**64 - 2**13 - 1
    assert (REKEY_AFTER_TIME, REJECT_AFTER_TIME, REKEY_ATTEMPT_TIME) == (120, 180, 90)
    assert (REKEY_TIMEOUT, KEEPALIVE_TIMEOUT, COOKIE_REFRESH_TIME) == (5, 10, 120)
    assert MAX_TIMER_HANDSHAKES == 18
    assert REKEY_ON_RECEIVE_AFTER == 165
    assert ZERO_KEY_MATERIAL_AFTER == 540
    assert NEW_HANDSHAKE_AFTER == 15
    assert REKEY_TIMEOUT_JITTER_MAX == pytest.approx(0.3333, abs=1e-4)


# --- lifecycle ------------------------------------------------------------------------------------

def test_new_timers_are_stopped_and_ignore_events():
    timers, clock, _ = make(persistent_keepalive=25, start=False)
    assert not timers.running
    for event in EVENTS:
        getattr(timers, event)()
    assert timers.next_deadline() is None
    assert timers.want_handshake() is False
    clock.advance(10_000)
    assert timers.poll() == []


def test_start_sends_first_keepalive_only_with_persistent_keepalive():
    assert make(persistent_keepalive=0, start=False)[0].start() == []
    timers = make(persistent_keepalive=25, start=False)[0]
    assert timers.start() == [SendKeepalive()]
    assert timers.start() == []  # already running


def test_stop_cancels_every_timer_and_start_resets_counters():
    timers, clock, _ = make(persistent_keepalive=25)
    assert timers.want_handshake()
    send_initiation(timers)
    timers.data_sent()
    timers.data_received()
    timers.session_derived()
    assert all(timers.deadline(t) is not None for t in Timer)
    clock.advance(5)
    assert timers.poll() == [SendHandshakeInitiation(retry=True)]
    assert timers.handshake_attempts == 1
    timers.stop()
    assert timers.next_deadline() is None
    timers.data_received()
    assert timers.next_deadline() is None
    clock.advance(1000)
    assert timers.poll() == []
    assert timers.start() == [SendKeepalive()]
    assert timers.handshake_attempts == 0
    assert timers.want_handshake()  # the door is open again after a restart


def test_handshake_complete_resets_counters_even_when_stopped():
    timers, clock, _ = make()
    timers.want_handshake()
    send_initiation(timers)
    clock.advance(5)
    timers.poll()
    timers.stop()
    clock.advance(1)
    timers.handshake_complete()
    assert timers.handshake_attempts == 0
    assert timers.last_handshake == clock.now


# --- retransmit handshake -------------------------------------------------------------------------

def test_retransmit_fires_rekey_timeout_after_the_initiation():
    timers, clock, _ = make()
    assert timers.want_handshake()
    send_initiation(timers)
    assert timers.deadline(Timer.RETRANSMIT_HANDSHAKE) == T0 + REKEY_TIMEOUT
    actions = fires_exactly_at(timers, clock, T0 + REKEY_TIMEOUT)
    assert actions == [SendHandshakeInitiation(retry=True)]
    assert timers.handshake_attempts == 1
    assert timers.deadline(Timer.RETRANSMIT_HANDSHAKE) is None  # re-armed by the next send only


def test_retransmit_cancelled_by_handshake_complete():
    timers, clock, _ = make()
    timers.want_handshake()
    send_initiation(timers)
    clock.advance(2)
    timers.handshake_complete()
    assert timers.deadline(Timer.RETRANSMIT_HANDSHAKE) is None
    assert timers.last_handshake == T0 + 2
    clock.advance(100)
    assert timers.poll() == []


def run_until_give_up(timers: PeerTimers, clock: FakeClock) -> tuple[int, float]:
    """Answer every retry like a device whose peer never responds; return (initiations, when)."""
    assert timers.want_handshake()
    send_initiation(timers)
    sent = 1
    while True:
        nxt = timers.deadline(Timer.RETRANSMIT_HANDSHAKE)
        assert nxt is not None
        actions = fires_exactly_at(timers, clock, nxt)
        if actions == [GiveUp()]:
            return sent, clock.now
        assert actions == [SendHandshakeInitiation(retry=True)]
        send_initiation(timers)
        sent += 1
        assert sent < 100


@pytest.mark.parametrize("jitter", [0.0, 0.5, 1.0])
def test_retries_then_gives_up_like_the_implementations(jitter):
    timers, clock, _ = make(jitter=jitter)
    sent, when = run_until_give_up(timers, clock)
    assert sent == MAX_TIMER_HANDSHAKES + 2 == 20
    step = REKEY_TIMEOUT + jitter * REKEY_TIMEOUT_JITTER_MAX
    assert when == pytest.approx(T0 + 20 * step)
    assert timers.handshake_attempts == MAX_TIMER_HANDSHAKES + 1
    # after giving up: no more retries, keys zeroed 3 x REJECT_AFTER_TIME later
    assert timers.deadline(Timer.RETRANSMIT_HANDSHAKE) is None
    assert timers.deadline(Timer.ZERO_KEY_MATERIAL) == pytest.approx(when + ZERO_KEY_MATERIAL_AFTER)
    assert timers.next_deadline() == timers.deadline(Timer.ZERO_KEY_MATERIAL)
    assert fires_exactly_at(timers, clock, when + ZERO_KEY_MATERIAL_AFTER) == [ZeroKeys()]


def test_give_up_cancels_passive_keepalive_and_keeps_a_pending_zero_timer():
    timers, clock, _ = make()
    timers.session_derived()  # zero key material at T0 + 540
    timers.want_handshake()
    send_initiation(timers)
    for _ in range(MAX_TIMER_HANDSHAKES + 1):
        clock.advance(REKEY_TIMEOUT)
        assert timers.poll() == [SendHandshakeInitiation(retry=True)]
        send_initiation(timers)
    timers.data_received()  # a passive keepalive pending at give-up time
    clock.advance(REKEY_TIMEOUT)
    assert timers.poll() == [GiveUp()]
    assert timers.deadline(Timer.SEND_KEEPALIVE) is None
    assert timers.deadline(Timer.ZERO_KEY_MATERIAL) == T0 + ZERO_KEY_MATERIAL_AFTER


def test_new_packets_restart_the_attempt_count():
    """A user who keeps sending keeps the handshake going (non-retry requests reset the count)."""
    timers, clock, _ = make()
    timers.want_handshake()
    send_initiation(timers)
    for _ in range(10):
        clock.advance(REKEY_TIMEOUT)
        assert timers.poll() == [SendHandshakeInitiation(retry=True)]
        send_initiation(timers)
    assert timers.handshake_attempts == 10
    assert timers.want_handshake() is False  # refused by the door, but the count restarts
    assert timers.handshake_attempts == 0
    assert timers.want_handshake(retry=True) is False
    assert timers.handshake_attempts == 0


def test_retransmit_refused_by_the_door_stops_retrying():
    timers, clock, _ = make()
    timers.want_handshake()
    send_initiation(timers)
    clock.advance(3)
    timers.handshake_response_sent()  # the peer initiated meanwhile; we answered
    clock.advance(2)
    assert timers.poll() == []
    assert timers.handshake_attempts == 1
    assert timers.next_deadline() is None


# --- one initiation per REKEY_TIMEOUT -------------------------------------------------------------

def test_door_allows_one_initiation_per_rekey_timeout():
    timers, clock, _ = make()
    assert timers.want_handshake() is True
    assert timers.want_handshake() is False
    clock.advance(REKEY_TIMEOUT - EPS)
    assert timers.want_handshake() is False
    clock.set(T0 + REKEY_TIMEOUT)
    assert timers.want_handshake() is True


def test_door_counts_responses_sent():
    timers, clock, _ = make()
    timers.handshake_response_sent()
    clock.advance(REKEY_TIMEOUT - EPS)
    assert timers.want_handshake() is False
    clock.set(T0 + REKEY_TIMEOUT)
    assert timers.want_handshake() is True


# --- jitter ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("sample", [0.0, 0.25, 0.999999, 1.0])
def test_jitter_is_scaled_into_bounds(sample):
    timers, clock, jit = make(jitter=sample)
    timers.handshake_initiated()
    timers.data_sent()
    assert jit.calls == 2
    extra = sample * REKEY_TIMEOUT_JITTER_MAX
    assert timers.deadline(Timer.RETRANSMIT_HANDSHAKE) == pytest.approx(T0 + REKEY_TIMEOUT + extra)
    assert timers.deadline(Timer.NEW_HANDSHAKE) == pytest.approx(T0 + NEW_HANDSHAKE_AFTER + extra)


def test_jitter_is_drawn_anew_for_each_arming():
    timers, clock, jit = make(jitter=0.0)
    timers.handshake_initiated()
    first = timers.deadline(Timer.RETRANSMIT_HANDSHAKE)
    jit.value = 1.0
    timers.handshake_initiated()
    assert timers.deadline(Timer.RETRANSMIT_HANDSHAKE) == pytest.approx(first + 1 / 3)


@given(st.floats(min_value=0.0, max_value=1.0))
def test_jitter_never_leaves_its_bounds(sample):
    timers, _, _ = make(jitter=sample)
    timers.handshake_initiated()
    when = timers.deadline(Timer.RETRANSMIT_HANDSHAKE)
    assert T0 + REKEY_TIMEOUT <= when <= T0 + (REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX)


@pytest.mark.parametrize("bad", [-0.01, 1.01, 333.0, math.nan, math.inf])
def test_jitter_source_out_of_range_is_refused(bad):
    timers, _, _ = make(jitter=bad)
    with pytest.raises(ValueError, match="jitter"):
        timers.handshake_initiated()


def test_keepalive_timers_take_no_jitter():
    timers, _, jit = make(persistent_keepalive=25, jitter=1.0)
    timers.data_received()
    timers.any_authenticated_packet_traversal()
    timers.session_derived()
    assert jit.calls == 0
    assert timers.deadline(Timer.SEND_KEEPALIVE) == T0 + KEEPALIVE_TIMEOUT
    assert timers.deadline(Timer.PERSISTENT_KEEPALIVE) == T0 + 25
    assert timers.deadline(Timer.ZERO_KEY_MATERIAL) == T0 + ZERO_KEY_MATERIAL_AFTER


# --- passive keepalive ----------------------------------------------------------------------------

def test_passive_keepalive_after_receiving_data_and_sending_nothing():
    timers, clock, _ = make()
    timers.data_received()
    assert fires_exactly_at(timers, clock, T0 + KEEPALIVE_TIMEOUT) == [SendKeepalive()]
    assert timers.next_deadline() is None


def test_passive_keepalive_cancelled_by_anything_sent():
    timers, clock, _ = make()
    timers.data_received()
    clock.advance(4)
    timers.any_authenticated_packet_sent()
    clock.advance(100)
    assert timers.poll() == []


def test_receiving_only_keepalives_asks_for_no_keepalive():
    timers, clock, _ = make()
    timers.any_authenticated_packet_traversal()
    timers.any_authenticated_packet_received()  # a keepalive: no data_received()
    assert timers.next_deadline() is None


def test_more_data_keeps_the_first_deadline_and_asks_for_another_keepalive():
    timers, clock, _ = make()
    timers.data_received()
    clock.advance(3)
    timers.data_received()
    assert timers.deadline(Timer.SEND_KEEPALIVE) == T0 + KEEPALIVE_TIMEOUT
    assert fires_exactly_at(timers, clock, T0 + KEEPALIVE_TIMEOUT) == [SendKeepalive()]
    # re-armed for another one...
    assert timers.deadline(Timer.SEND_KEEPALIVE) == T0 + 2 * KEEPALIVE_TIMEOUT
    assert fires_exactly_at(timers, clock, T0 + 2 * KEEPALIVE_TIMEOUT) == [SendKeepalive()]
    assert timers.next_deadline() is None  # ...only one


def test_another_keepalive_is_cancelled_by_the_keepalive_being_sent():
    """As in the kernel and wireguard-go: the keepalive goes out after the re-arm, and its own
    "sent" event cancels the re-armed timer."""
    timers, clock, _ = make()
    timers.data_received()
    timers.data_received()
    clock.advance(KEEPALIVE_TIMEOUT)
    assert timers.poll() == [SendKeepalive()]
    timers.any_authenticated_packet_traversal()
    timers.any_authenticated_packet_sent()
    assert timers.next_deadline() is None


# --- new handshake (we sent, heard nothing) -------------------------------------------------------

def test_new_handshake_when_data_sent_goes_unanswered():
    timers, clock, _ = make()
    timers.data_sent()
    clock.advance(3)
    timers.data_sent()  # keeps the first deadline
    when = T0 + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT
    assert timers.deadline(Timer.NEW_HANDSHAKE) == when
    assert fires_exactly_at(timers, clock, when) == [SendHandshakeInitiation(retry=False)]


def test_new_handshake_cancelled_by_anything_received():
    timers, clock, _ = make()
    timers.data_sent()
    clock.advance(14)
    timers.any_authenticated_packet_received()  # a keepalive counts
    clock.advance(100)
    assert timers.poll() == []
    timers.data_sent()  # and the next unanswered data arms it anew
    assert timers.deadline(Timer.NEW_HANDSHAKE) == clock.now + NEW_HANDSHAKE_AFTER


def test_new_handshake_restarts_the_attempt_count_and_respects_the_door():
    timers, clock, _ = make()
    timers.want_handshake()
    send_initiation(timers)
    timers.data_sent()  # new handshake due at +15 unless something comes back
    clock.advance(REKEY_TIMEOUT)
    assert timers.poll() == [SendHandshakeInitiation(retry=True)]  # (the device fails to send it)
    assert timers.handshake_attempts == 1
    assert timers.next_deadline() == T0 + NEW_HANDSHAKE_AFTER
    clock.set(T0 + NEW_HANDSHAKE_AFTER - 1)
    timers.handshake_response_sent()  # 1 s before the deadline: the door is shut then
    clock.set(T0 + NEW_HANDSHAKE_AFTER)
    assert timers.poll() == []  # refused, but the attempt count restarted all the same
    assert timers.handshake_attempts == 0
    timers.data_sent()
    clock.advance(NEW_HANDSHAKE_AFTER)
    assert timers.poll() == [SendHandshakeInitiation(retry=False)]


# --- zero key material ----------------------------------------------------------------------------

def test_zero_key_material_three_reject_after_times_after_the_last_session():
    timers, clock, _ = make()
    timers.session_derived()
    clock.advance(100)
    timers.session_derived()  # a newer session pushes it back
    assert fires_exactly_at(timers, clock, T0 + 100 + 3 * REJECT_AFTER_TIME) == [ZeroKeys()]
    assert timers.next_deadline() is None


# --- persistent keepalive -------------------------------------------------------------------------

def test_persistent_keepalive_every_interval_of_silence():
    timers, clock, _ = make(persistent_keepalive=25)
    timers.any_authenticated_packet_traversal()
    clock.advance(10)
    timers.any_authenticated_packet_traversal()  # traffic pushes it back
    assert fires_exactly_at(timers, clock, T0 + 35) == [SendKeepalive()]
    timers.any_authenticated_packet_traversal()  # the keepalive itself re-arms it
    assert fires_exactly_at(timers, clock, T0 + 60) == [SendKeepalive()]


def test_persistent_keepalive_zero_is_off():
    timers, clock, _ = make(persistent_keepalive=0)
    timers.any_authenticated_packet_traversal()
    assert timers.deadline(Timer.PERSISTENT_KEEPALIVE) is None
    clock.advance(1000)
    assert timers.poll() == []


def test_set_persistent_keepalive_on_and_off():
    timers, clock, _ = make(persistent_keepalive=0)
    assert timers.set_persistent_keepalive(25) == [SendKeepalive()]  # turned on: one now
    timers.any_authenticated_packet_traversal()
    assert timers.deadline(Timer.PERSISTENT_KEEPALIVE) == T0 + 25
    assert timers.set_persistent_keepalive(30) == []  # changed, not turned on
    assert timers.set_persistent_keepalive(0) == []
    assert timers.deadline(Timer.PERSISTENT_KEEPALIVE) is None
    clock.advance(1000)
    assert timers.poll() == []
    timers.stop()
    assert timers.set_persistent_keepalive(5) == []  # stopped: start() will send it
    assert timers.start() == [SendKeepalive()]


@pytest.mark.parametrize("bad", [-1, 65536, 1.5, True, "25", None])
def test_persistent_keepalive_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="persistent keepalive"):
        PeerTimers(bad)
    timers, _, _ = make(persistent_keepalive=25)
    with pytest.raises(ValueError, match="persistent keepalive"):
        timers.set_persistent_keepalive(bad)
    assert timers.persistent_keepalive == 25


# --- poll -----------------------------------------------------------------------------------------

def test_poll_defaults_to_the_clock_and_fires_each_due_timer_once():
    timers, clock, _ = make(persistent_keepalive=10)
    timers.data_received()  # send keepalive at +10
    timers.any_authenticated_packet_traversal()  # persistent keepalive at +10
    timers.session_derived()
    clock.advance(10)
    assert timers.poll() == [SendKeepalive()]  # one keepalive, not two
    assert timers.next_deadline() == T0 + ZERO_KEY_MATERIAL_AFTER


def test_late_poll_fires_in_deadline_order_and_rearms_in_the_future():
    timers, clock, _ = make(persistent_keepalive=0)
    timers.want_handshake()
    send_initiation(timers)  # retransmit at +5
    timers.data_received()
    timers.data_received()  # keepalive at +10, another one wanted
    timers.session_derived()  # zero at +540
    clock.advance(1000)
    actions = timers.poll()
    assert actions == [SendHandshakeInitiation(retry=True), SendKeepalive(), ZeroKeys()]
    assert timers.next_deadline() == clock.now + KEEPALIVE_TIMEOUT  # re-armed from now


def test_poll_before_any_deadline_changes_nothing():
    timers, clock, _ = make()
    timers.data_sent()
    timers.data_received()
    before = {t: timers.deadline(t) for t in Timer}
    assert timers.poll(T0 + KEEPALIVE_TIMEOUT - EPS) == []
    assert {t: timers.deadline(t) for t in Timer} == before


# --- keypair age rules ----------------------------------------------------------------------------

def test_rekey_on_send_initiator_by_age():
    assert not should_rekey_on_send(T0, True, 0, T0 + REKEY_AFTER_TIME - EPS)
    assert should_rekey_on_send(T0, True, 0, T0 + REKEY_AFTER_TIME)


def test_responder_never_rekeys_by_age_on_send():
    assert not should_rekey_on_send(T0, False, 0, T0 + REKEY_AFTER_TIME)
    assert not should_rekey_on_send(T0, False, 0, T0 + 10 * REJECT_AFTER_TIME)


@pytest.mark.parametrize("is_initiator", [True, False])
def test_rekey_on_send_by_message_count_for_both_roles(is_initiator):
    assert not should_rekey_on_send(T0, is_initiator, REKEY_AFTER_MESSAGES, T0)
    assert should_rekey_on_send(T0, is_initiator, REKEY_AFTER_MESSAGES + 1, T0)


def test_rekey_on_receive_only_initiator_near_the_end():
    assert not should_rekey_on_receive(T0, True, T0 + REKEY_ON_RECEIVE_AFTER - EPS)
    assert should_rekey_on_receive(T0, True, T0 + REKEY_ON_RECEIVE_AFTER)
    assert not should_rekey_on_receive(T0, False, T0 + REJECT_AFTER_TIME)


def test_keypair_expiry_by_age_and_by_count():
    assert not keypair_expired(T0, T0 + REJECT_AFTER_TIME - EPS, 0)
    assert keypair_expired(T0, T0 + REJECT_AFTER_TIME, 0)
    assert not keypair_expired(T0, T0, REJECT_AFTER_MESSAGES - 1)
    assert keypair_expired(T0, T0, REJECT_AFTER_MESSAGES)


def test_keep_key_fresh_sending_goes_through_the_door():
    timers, clock, _ = make()
    created = clock.now
    clock.advance(REKEY_AFTER_TIME)
    assert timers.keep_key_fresh_sending(created, False, 5) is False  # responder
    assert timers.keep_key_fresh_sending(created, True, 5) is True
    assert timers.keep_key_fresh_sending(created, True, 6) is False  # one per REKEY_TIMEOUT
    clock.advance(REKEY_TIMEOUT)
    assert timers.keep_key_fresh_sending(created, True, 7) is True
    assert timers.keep_key_fresh_sending(clock.now, True, 7) is False  # a fresh keypair


def test_keep_key_fresh_receiving_once_per_handshake():
    timers, clock, _ = make()
    created = clock.now
    clock.advance(REKEY_ON_RECEIVE_AFTER - EPS)
    assert timers.keep_key_fresh_receiving(created, True) is False
    clock.set(created + REKEY_ON_RECEIVE_AFTER)
    assert timers.keep_key_fresh_receiving(created, False) is False  # responder
    assert timers.keep_key_fresh_receiving(created, True) is True
    clock.advance(REKEY_TIMEOUT)
    assert timers.keep_key_fresh_receiving(created, True) is False  # already asked
    timers.handshake_complete()
    assert timers.keep_key_fresh_receiving(created, True) is True  # next handshake: again


def test_keep_key_fresh_receiving_flag_is_spent_even_when_the_door_is_shut():
    timers, clock, _ = make()
    created = clock.now
    clock.advance(REKEY_ON_RECEIVE_AFTER)
    timers.handshake_response_sent()
    assert timers.keep_key_fresh_receiving(created, True) is False
    clock.advance(REKEY_TIMEOUT)
    assert timers.keep_key_fresh_receiving(created, True) is False


# --- random event sequences -----------------------------------------------------------------------

EVENTS = [
    "data_sent", "data_received", "any_authenticated_packet_sent",
    "any_authenticated_packet_received", "any_authenticated_packet_traversal",
    "handshake_initiated", "handshake_complete", "session_derived", "handshake_response_sent",
]

# which timers may produce each action
SOURCES = {
    SendHandshakeInitiation(retry=True): {Timer.RETRANSMIT_HANDSHAKE},
    SendHandshakeInitiation(retry=False): {Timer.NEW_HANDSHAKE},
    SendKeepalive(): {Timer.SEND_KEEPALIVE, Timer.PERSISTENT_KEEPALIVE},
    ZeroKeys(): {Timer.ZERO_KEY_MATERIAL},
    GiveUp(): {Timer.RETRANSMIT_HANDSHAKE},
}

OPS = st.one_of(
    st.tuples(st.just("advance"), st.floats(min_value=0.0, max_value=700.0)),
    st.tuples(st.just("to_deadline"), st.sampled_from([-EPS, 0.0, EPS])),
    st.tuples(st.just("event"), st.sampled_from(EVENTS)),
    st.tuples(st.just("want"), st.booleans()),
    st.tuples(st.just("keepalive"), st.sampled_from([0, 1, 25])),
    st.tuples(st.just("poll"), st.booleans()),
    st.tuples(st.just("run"), st.integers(min_value=1, max_value=25)),
    st.tuples(st.just("stop"), st.none()),
    st.tuples(st.just("start"), st.none()),
)


def check_poll(timers: PeerTimers, now: float) -> list:
    before = {t: timers.deadline(t) for t in Timer}
    due = {t for t, when in before.items() if when is not None and when <= now}
    actions = timers.poll(now)
    for action in actions:
        assert SOURCES[action] & due, f"{action} at {now} with no due timer: {before}"
    assert len(actions) == len(set(actions))
    if not due:
        assert actions == []
        assert {t: timers.deadline(t) for t in Timer} == before
    nxt = timers.next_deadline()
    assert nxt is None or nxt > now
    assert timers.handshake_attempts <= MAX_TIMER_HANDSHAKES + 1
    return actions


def device_answers(timers: PeerTimers, actions: list) -> None:
    for action in actions:
        if isinstance(action, SendHandshakeInitiation):
            send_initiation(timers)
        elif isinstance(action, SendKeepalive):
            timers.any_authenticated_packet_traversal()
            timers.any_authenticated_packet_sent()


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(OPS, max_size=80),
       jitters=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=8),
       keepalive=st.sampled_from([0, 1, 25]))
def test_random_sequences_never_fire_early_nor_leave_past_deadlines(ops, jitters, keepalive):
    clock = FakeClock()
    draws = iter(jitters * 1000)
    timers = PeerTimers(keepalive, clock=clock, jitter=lambda: next(draws))
    timers.start()
    for op, arg in ops:
        if op == "advance":
            clock.advance(arg)
        elif op == "to_deadline":
            nxt = timers.next_deadline()
            if nxt is not None:
                clock.set(max(clock.now, nxt + arg))
        elif op == "event":
            getattr(timers, arg)()
        elif op == "want":
            if timers.want_handshake(retry=arg):
                send_initiation(timers)
        elif op == "keepalive":
            device_answers(timers, timers.set_persistent_keepalive(arg))
        elif op == "poll":
            actions = check_poll(timers, clock.now)
            if arg:
                device_answers(timers, actions)
        elif op == "run":  # let time pass deadline by deadline, the device answering
            for _ in range(arg):
                nxt = timers.next_deadline()
                if nxt is None:
                    break
                clock.set(max(clock.now, nxt))
                device_answers(timers, check_poll(timers, clock.now))
        elif op == "stop":
            timers.stop()
            assert timers.next_deadline() is None
        else:
            device_answers(timers, timers.start())
        for when in (timers.deadline(t) for t in Timer):
            assert when is None or math.isfinite(when)
    check_poll(timers, clock.now)
