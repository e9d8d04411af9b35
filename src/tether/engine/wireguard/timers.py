"""WireGuard's per-peer protocol timers and keypair-age rules, as a pure state machine (sans-IO).

Rules of this file: no sockets, no threads, no sleeping, no randomness or time of its own.  Time
comes from the injected ``clock`` (the device's clock, ``time.monotonic`` in production, a fake in
tests) and jitter from the injected ``jitter``; events go in, a list of actions comes out, and
``next_deadline()`` tells the I/O shell when to call ``poll`` again.  The shell decides nothing:
every "when" of the protocol lives here, so every timer is tested by moving a fake clock.

Theory of operation
-------------------
**Why timers at all.**  WireGuard has no connection state on the wire: no "open", no "close", no
acknowledgements.  Sessions are kept fresh, dead peers are noticed and keys are forgotten purely by
timers reacting to which authenticated packets went out and came in (whitepaper section 6).  The
constants below carry the whitepaper's names (section 6.1); all times are seconds.

**The five timers.**  Each peer has five one-shot timers.  "Arm" sets the deadline to ``now +
delay`` (replacing a pending one, like the kernel's ``mod_timer``), "cancel" clears it; a deadline
is reached when ``now >= deadline``.

* **retransmit handshake** - armed by ``handshake_initiated`` (REKEY_TIMEOUT + jitter); cancelled
  by ``handshake_complete``; fires: retry the initiation, or give up (below).
* **send keepalive** (passive keepalive) - armed by ``data_received`` if not pending
  (KEEPALIVE_TIMEOUT); cancelled by ``any_authenticated_packet_sent``; fires: ``SendKeepalive``.
  We got data and had nothing to answer with: tell the peer its packets arrive.
* **new handshake** - armed by ``data_sent`` if not pending (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT +
  jitter); cancelled by ``any_authenticated_packet_received``; fires: a fresh initiation.  We sent
  data and heard nothing back, not even a passive keepalive: the session is presumed dead.
* **zero key material** - armed by ``session_derived``, and on giving up if not pending
  (3 x REJECT_AFTER_TIME); never cancelled, pushed back by every new session; fires: ``ZeroKeys``.
* **persistent keepalive** - armed by ``any_authenticated_packet_traversal`` when the interval is
  > 0 (the interval); cancelled by ``set_persistent_keepalive(0)``; fires: ``SendKeepalive``
  (keeps NAT and firewall state alive however quiet the tunnel is).

"If not pending" matters: a steady stream of data keeps the *first* deadline, so "we sent data
and got nothing back for 15 s" measures from the first unanswered packet, not the last.  When data
arrives while the send-keepalive timer is already pending, a flag asks for another keepalive one
KEEPALIVE_TIMEOUT after the first fires (the kernel's and wireguard-go's ``need_another_keepalive``;
in both, the keepalive's own "sent" event usually cancels that re-arm, and so it does here).

**Retries and giving up.** Every initiation sent arms the retransmit timer. When it fires with the
attempt counter at most MAX_TIMER_HANDSHAKES (REKEY_ATTEMPT_TIME / REKEY_TIMEOUT = 18), the counter
goes up by one and the initiation is retried (``SendHandshakeInitiation(retry=True)``); when it
fires with the counter above that, the peer gives up (``GiveUp``: drop the packets queued for want
of a session, stop retrying), cancels the passive keepalive and arms zero-key-material so the
residue of the partial exchange is erased in time. That is 1 + 19 = 20 initiations, the last one
given up on at 20 x (REKEY_TIMEOUT + jitter), so 100 to 106.7 s after the first: the counting of
the kernel and of wireguard-go, which this file follows, where the whitepaper says "for
Rekey-Attempt-Time (90 s)". Any *non-retry* initiation request (new data queued without a session,
a rekey, the new-handshake timer) resets the counter: as the paper says, a user who keeps sending
keeps the handshake alive.

**At most one initiation per REKEY_TIMEOUT.**  ``want_handshake`` is the one door to sending an
initiation: it resets the counter unless ``retry``, and answers False if an initiation or a
response was sent less than REKEY_TIMEOUT ago (both implementations count responses too).  The
``SendHandshakeInitiation`` actions that ``poll`` returns have been through that door already: the
shell sends them and must not ask again.  A retransmission refused by the door re-arms nothing
(as in wireguard-go and the kernel): a response went out meanwhile, so the peer is handshaking.
A cookie reply changes nothing here; the retransmit timer sends the next initiation (with MAC2).

**Keypair age (pure helpers).** A session may be used for REJECT_AFTER_TIME seconds and
REJECT_AFTER_MESSAGES messages (``keypair_expired``). Well before that, a new handshake is wanted
(``should_rekey_on_send``) after each transport message sent when more than REKEY_AFTER_MESSAGES
were sent with it, or - only if we were the *initiator* of that session - when it is
REKEY_AFTER_TIME old. The responder never rekeys by age on send, so both sides do not rekey at once
(thundering herd); instead, the initiator also checks on receive (``should_rekey_on_receive``): a
session REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT (165 s) old gets one last-minute
initiation, once per handshake, so a peer that only receives still rekeys before the session dies.
The ``keep_key_fresh_*`` methods combine those rules with the once-per-handshake flag and the door.


**What the device calls, and when** (the call sites of wireguard-go's send.go and receive.go)::

    send an initiation   only if want_handshake(retry) (or poll asked): any_authenticated_packet_
                         traversal(), any_authenticated_packet_sent(), send, handshake_initiated()
    initiation received  (valid) any_authenticated_packet_traversal(),
                         any_authenticated_packet_received(); then, sending the response:
                         handshake_response_sent(), session_derived(),
                         any_authenticated_packet_traversal(), any_authenticated_packet_sent()
    response received    (valid) any_authenticated_packet_traversal(),
                         any_authenticated_packet_received(), session_derived(),
                         handshake_complete(); then send a keepalive
    transport sent       any_authenticated_packet_traversal(), any_authenticated_packet_sent(),
                         data_sent() unless a keepalive; keep_key_fresh_sending(...)
    transport received   (authenticated, not replayed) handshake_complete() if it is the first
                         message on a new session (the responder's key confirmation); per batch:
                         keep_key_fresh_receiving(...), any_authenticated_packet_traversal(),
                         any_authenticated_packet_received(), data_received() if any was data
    no usable session    queue the packet; want_handshake() -> send an initiation
    peer up / down       start() (may ask for a first keepalive) / stop()

Lifecycle: a new ``PeerTimers`` is stopped; ``start()`` starts it.  While stopped, events arm
nothing, ``poll`` returns nothing and ``want_handshake`` says no (wireguard-go's
``timersActive``); ``handshake_complete`` still resets the counters.

Where this file and the whitepaper differ, it follows the kernel and wireguard-go (interop is
judged against them): the give-up counting above, and the jitter (the paper's "0 to 333 ms"), here
a uniform fraction of REKEY_TIMEOUT_JITTER_MAX (1/3 s), where the kernel draws ``[0, HZ/3)``
jiffies and wireguard-go whole milliseconds 0..333 (both add it to the new-handshake timer too).
Boundaries: a time limit is reached at ``age >= limit`` (the kernel's ``wg_birthdate_has_expired``;
wireguard-go says ``>``, a difference of one clock tick); the message-count rekey needs ``sent >
REKEY_AFTER_MESSAGES`` (both implementations), the reject ``counter >= REJECT_AFTER_MESSAGES``.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

# --- whitepaper section 6.1 ---------------------------------------------------------------------
REKEY_AFTER_MESSAGES: Final = 2**60
REJECT_AFTER_MESSAGES: Final = 2**64 - 2**13 - 1
REKEY_AFTER_TIME: Final = 120.0
REJECT_AFTER_TIME: Final = 180.0
REKEY_ATTEMPT_TIME: Final = 90.0
REKEY_TIMEOUT: Final = 5.0
KEEPALIVE_TIMEOUT: Final = 10.0
COOKIE_REFRESH_TIME: Final = 120.0  # a cookie (and the cookie secret) is good this long

# --- derived, as the implementations name them --------------------------------------------------
REKEY_TIMEOUT_JITTER_MAX: Final = 1 / 3  # seconds added at most to retransmit / new-handshake
MAX_TIMER_HANDSHAKES: Final = int(REKEY_ATTEMPT_TIME // REKEY_TIMEOUT)  # 18: see "Retries"
ZERO_KEY_MATERIAL_AFTER: Final = 3 * REJECT_AFTER_TIME  # 540 s without a new session
NEW_HANDSHAKE_AFTER: Final = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT  # 15 s (+ jitter) unanswered
REKEY_ON_RECEIVE_AFTER: Final = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT  # 165 s
MAX_PERSISTENT_KEEPALIVE: Final = 65535  # wg(8): 1..65535 seconds, 0 = off


class Timer(enum.Enum):
    """The five per-peer timers; declaration order breaks ties between equal deadlines."""

    RETRANSMIT_HANDSHAKE = "retransmit handshake"
    SEND_KEEPALIVE = "send keepalive"
    NEW_HANDSHAKE = "new handshake"
    ZERO_KEY_MATERIAL = "zero key material"
    PERSISTENT_KEEPALIVE = "persistent keepalive"

    # Members are singletons: identity hashing (in C) instead of Enum's hash of the name (in
    # Python), a measurable share of every packet's cost, since the timers are dict-keyed.
    __hash__ = object.__hash__


_ORDER: Final = {t: i for i, t in enumerate(Timer)}


# --- actions: what poll() asks the device to do -------------------------------------------------

@dataclass(frozen=True, slots=True)
class SendHandshakeInitiation:
    """Send a new initiation now (it already passed ``want_handshake``).  ``retry``: a
    retransmission (the attempt count goes on) rather than a fresh attempt.  Both timers that ask
    for one also mean "the path may be broken": forget the cached local source address."""

    retry: bool


@dataclass(frozen=True, slots=True)
class SendKeepalive:
    """Send an empty transport message on the current session (nothing, if packets are queued:
    they will do; no session: the device's send path asks for a handshake)."""


@dataclass(frozen=True, slots=True)
class ZeroKeys:
    """Erase every keypair and any handshake in progress for this peer, and drop its queue."""


@dataclass(frozen=True, slots=True)
class GiveUp:
    """The handshake did not complete: drop the packets queued for want of a session."""


Action = SendHandshakeInitiation | SendKeepalive | ZeroKeys | GiveUp


# --- keypair-age rules (pure) -------------------------------------------------------------------

def should_rekey_on_send(keypair_created: float, is_initiator: bool, sent_counter: int,
                         now: float) -> bool:
    """After sending on the current keypair: is a new handshake due?  ``sent_counter`` is the
    number of messages sent with it (its next nonce).  Time counts only for the initiator."""
    return sent_counter > REKEY_AFTER_MESSAGES or (
        is_initiator and now - keypair_created >= REKEY_AFTER_TIME)


def should_rekey_on_receive(keypair_created: float, is_initiator: bool, now: float) -> bool:
    """After receiving on the current keypair: is the initiator's last-minute handshake due?"""
    return is_initiator and now - keypair_created >= REKEY_ON_RECEIVE_AFTER


def keypair_expired(created: float, now: float, counter: int) -> bool:
    """May this keypair no longer carry a message?  ``counter``: the next nonce when sending,
    the received message's counter when receiving."""
    return now - created >= REJECT_AFTER_TIME or counter >= REJECT_AFTER_MESSAGES


def _check_keepalive(seconds: int) -> int:
    if isinstance(seconds, bool) or not isinstance(seconds, int) \
            or not 0 <= seconds <= MAX_PERSISTENT_KEEPALIVE:
        raise ValueError(f"persistent keepalive must be an integer 0..{MAX_PERSISTENT_KEEPALIVE} "
                         f"seconds (0 = off), not {seconds!r}")
    return seconds


# --- the state machine --------------------------------------------------------------------------

class PeerTimers:
    """One peer's timers, no I/O.  See the module docstring for the events and their call sites.

    ``clock`` returns seconds on a monotonic scale (keypair creation times given to the
    ``keep_key_fresh_*`` methods must be on the same scale); ``jitter`` returns a uniform sample
    in [0, 1] (``random.random``), scaled here to at most REKEY_TIMEOUT_JITTER_MAX.
    """

    def __init__(self, persistent_keepalive: int = 0, clock: Callable[[], float] = time.monotonic,
                 jitter: Callable[[], float] = random.random) -> None:
        self.persistent_keepalive = _check_keepalive(persistent_keepalive)
        self.clock = clock
        self._jitter_source = jitter
        self.running = False
        self.handshake_attempts = 0  # retransmissions of the current attempt so far
        self.last_handshake: float | None = None  # clock time of the last completed handshake
        self._deadlines: dict[Timer, float] = {}  # pending timers only
        self._need_another_keepalive = False
        self._sent_last_minute_handshake = False
        self._last_handshake_sent: float | None = None  # initiation or response, for the door

    # .. lifecycle ................................................................................

    def start(self) -> list[Action]:
        """The peer goes up.  With a persistent keepalive, send one at once (it also brings up
        the first handshake).  Starting a running peer does nothing."""
        if self.running:
            return []
        self.running = True
        self.handshake_attempts = 0
        self._need_another_keepalive = False
        self._sent_last_minute_handshake = False
        self._last_handshake_sent = None
        return [SendKeepalive()] if self.persistent_keepalive else []

    def stop(self) -> None:
        """The peer goes down: every timer is cancelled and events are ignored until ``start``."""
        self.running = False
        self._deadlines.clear()
        self._need_another_keepalive = False

    def set_persistent_keepalive(self, seconds: int) -> list[Action]:
        """Change the interval (0 = off).  Turning it on sends a keepalive at once."""
        old, self.persistent_keepalive = self.persistent_keepalive, _check_keepalive(seconds)
        if not seconds:
            self._cancel(Timer.PERSISTENT_KEEPALIVE)
        if self.running and not old and seconds:
            return [SendKeepalive()]
        return []

    # .. events ...................................................................................

    def data_sent(self) -> None:
        """A transport message carrying data (not a keepalive) was sent."""
        if self.running and Timer.NEW_HANDSHAKE not in self._deadlines:
            self._arm(Timer.NEW_HANDSHAKE, NEW_HANDSHAKE_AFTER + self._jitter())

    def data_received(self) -> None:
        """An authenticated transport message carrying data (not a keepalive) was received."""
        if not self.running:
            return
        if Timer.SEND_KEEPALIVE not in self._deadlines:
            self._arm(Timer.SEND_KEEPALIVE, KEEPALIVE_TIMEOUT)
        else:
            self._need_another_keepalive = True

    def any_authenticated_packet_sent(self) -> None:
        """Any authenticated packet was sent: keepalive, data, initiation or response."""
        if self.running:
            self._cancel(Timer.SEND_KEEPALIVE)

    def any_authenticated_packet_received(self) -> None:
        """Any authenticated packet was received: keepalive, data, initiation or response."""
        if self.running:
            self._cancel(Timer.NEW_HANDSHAKE)

    def any_authenticated_packet_traversal(self) -> None:
        """Just before an authenticated packet is sent, or after one is received."""
        if self.running and self.persistent_keepalive:
            self._arm(Timer.PERSISTENT_KEEPALIVE, float(self.persistent_keepalive))

    def handshake_initiated(self) -> None:
        """An initiation was sent."""
        if self.running:
            now = self._arm(Timer.RETRANSMIT_HANDSHAKE, REKEY_TIMEOUT + self._jitter())
            self._last_handshake_sent = now

    def handshake_response_sent(self) -> None:
        """A response was sent (it counts for the one-initiation-per-REKEY_TIMEOUT door)."""
        self._last_handshake_sent = self.clock()

    def handshake_complete(self) -> None:
        """A response was received and processed, or the first transport message arrived on a
        session we answered (key confirmation)."""
        if self.running:
            self._cancel(Timer.RETRANSMIT_HANDSHAKE)
        self.handshake_attempts = 0
        self._sent_last_minute_handshake = False
        self.last_handshake = self.clock()

    def session_derived(self) -> None:
        """Transport keys were derived (before sending a response, after receiving one)."""
        if self.running:
            self._arm(Timer.ZERO_KEY_MATERIAL, ZERO_KEY_MATERIAL_AFTER)

    # .. handshake requests .......................................................................

    def want_handshake(self, retry: bool = False) -> bool:
        """The device would like to send an initiation.  Unless ``retry``, this starts a new
        attempt (the retry count restarts).  True: send one now, then call the send events."""
        if not self.running:
            return False
        if not retry:
            self.handshake_attempts = 0
        return self._through_door(self.clock())

    def keep_key_fresh_sending(self, keypair_created: float, is_initiator: bool,
                               sent_counter: int) -> bool:
        """After a transport message was sent on the current keypair: True = send an initiation."""
        return should_rekey_on_send(keypair_created, is_initiator, sent_counter, self.clock()) \
            and self.want_handshake()

    def keep_key_fresh_receiving(self, keypair_created: float, is_initiator: bool) -> bool:
        """After authenticated transport messages arrived on the current keypair: True = send an
        initiation (the initiator's last-minute rekey, asked at most once per handshake)."""
        if self._sent_last_minute_handshake or not self.running:
            return False
        if not should_rekey_on_receive(keypair_created, is_initiator, self.clock()):
            return False
        self._sent_last_minute_handshake = True
        return self.want_handshake()

    # .. time .....................................................................................

    def deadline(self, timer: Timer) -> float | None:
        """When ``timer`` fires, or None if it is not pending."""
        return self._deadlines.get(timer)

    def next_deadline(self) -> float | None:
        """When ``poll`` is next due, or None if no timer is pending."""
        return min(self._deadlines.values(), default=None)

    def poll(self, now: float | None = None) -> list[Action]:
        """Fire every timer whose deadline is <= ``now`` (default: ``clock()``), earliest first,
        and return what the device must do, each action at most once."""
        if now is None:
            now = self.clock()
        actions: list[Action] = []
        fired: set[Timer] = set()  # each timer fires at most once per poll (re-arms are > now)
        while (timer := self._first_due(now, fired)) is not None:
            fired.add(timer)
            del self._deadlines[timer]
            for action in self._EXPIRE[timer](self, now):
                if action not in actions:
                    actions.append(action)
        return actions

    # .. expiry handlers (effects computed at the poll's `now`, as a late timer would) ............

    def _expired_retransmit_handshake(self, now: float) -> list[Action]:
        if self.handshake_attempts > MAX_TIMER_HANDSHAKES:
            self._cancel(Timer.SEND_KEEPALIVE)
            if Timer.ZERO_KEY_MATERIAL not in self._deadlines:
                self._deadlines[Timer.ZERO_KEY_MATERIAL] = now + ZERO_KEY_MATERIAL_AFTER
            return [GiveUp()]
        self.handshake_attempts += 1
        return [SendHandshakeInitiation(retry=True)] if self._through_door(now) else []

    def _expired_send_keepalive(self, now: float) -> list[Action]:
        if self._need_another_keepalive:
            self._need_another_keepalive = False
            self._deadlines[Timer.SEND_KEEPALIVE] = now + KEEPALIVE_TIMEOUT
        return [SendKeepalive()]

    def _expired_new_handshake(self, now: float) -> list[Action]:
        self.handshake_attempts = 0
        return [SendHandshakeInitiation(retry=False)] if self._through_door(now) else []

    def _expired_zero_key_material(self, now: float) -> list[Action]:
        return [ZeroKeys()]

    def _expired_persistent_keepalive(self, now: float) -> list[Action]:
        return [SendKeepalive()] if self.persistent_keepalive else []

    _EXPIRE: Final[dict[Timer, Callable[[PeerTimers, float], list[Action]]]] = {
        Timer.RETRANSMIT_HANDSHAKE: _expired_retransmit_handshake,
        Timer.SEND_KEEPALIVE: _expired_send_keepalive,
        Timer.NEW_HANDSHAKE: _expired_new_handshake,
        Timer.ZERO_KEY_MATERIAL: _expired_zero_key_material,
        Timer.PERSISTENT_KEEPALIVE: _expired_persistent_keepalive,
    }

    # .. helpers ..................................................................................

    def _first_due(self, now: float, fired: set[Timer]) -> Timer | None:
        due = [(when, _ORDER[t], t) for t, when in self._deadlines.items()
               if when <= now and t not in fired]
        return min(due)[2] if due else None

    def _through_door(self, now: float) -> bool:
        """At most one initiation per REKEY_TIMEOUT (counting responses sent)."""
        last = self._last_handshake_sent
        if last is not None and now - last < REKEY_TIMEOUT:
            return False
        self._last_handshake_sent = now
        return True

    def _arm(self, timer: Timer, delay: float) -> float:
        now = self.clock()
        self._deadlines[timer] = now + delay
        return now

    def _cancel(self, timer: Timer) -> None:
        self._deadlines.pop(timer, None)

    def _jitter(self) -> float:
        sample = self._jitter_source()
        if not 0.0 <= sample <= 1.0:  # also refuses NaN
            raise ValueError(f"jitter() must return a number in [0, 1], not {sample!r}")
        return sample * REKEY_TIMEOUT_JITTER_MAX
