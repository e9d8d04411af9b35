"""The WireGuard device: peers, sessions, cryptokey routing and timers tied together (sans-IO).

Rules of this file: no sockets, no tun, no threads, no sleeping.  The time is the injected
``clock`` (monotonic seconds) and ``wallclock`` (Unix seconds: handshake timestamps and "latest
handshake"), randomness the injected ``randbytes`` (indices, ephemeral keys, jitter, cookie
secrets).  Three inputs - an IP packet from the tun (``tun_packet``), a UDP datagram with its
source address (``udp_datagram``), the passing of time (``tick``) - each return an ``Output``: the
datagrams to send, each with its destination, and the IP packets to write into the tun, in
batches, so the I/O shell can hand them to ``sendmmsg``/GSO and batched tun writes.  The shell
calls ``tick`` at ``next_deadline()``.  Nothing raises on bad input: every datagram or packet that
is malformed, forged, replayed, stale or not routable is dropped and counted (``counters``).

Theory of operation
-------------------
The pieces are the sibling modules: ``noise`` (messages, handshake, cookies), ``allowedips``
(cryptokey routing), ``replay`` (the receive window), ``timers`` (every "when" of the protocol).
This file holds the state they do not: which sessions exist, which one sends, the index table,
the queue of packets waiting for a session, endpoints, statistics.  Its structure follows
wireguard-go's device (send.go, receive.go, keypair.go, indextable.go), whose behaviour is the
reference for interop.

**Index table.**  Every handshake we start or answer gets a random 32-bit *local index*, unique
among all peers; the other side puts it in the receiver field of what it sends back (responses,
cookie replies, transport data), which is how a datagram finds its peer without trial
decryption.  A finished handshake's index passes to the session it created.  Entries are either a
``Session`` or a ``_Pending`` handshake (initiations we sent, waiting for a response).

**Sessions.**  Each peer has up to three (the whitepaper's and wireguard-go's keypairs):
``current`` (sends and receives), ``previous`` (receives only: packets still in flight when the
session changed) and ``next``.  The *initiator* of a handshake trusts its new session as soon as
the response authenticates: it becomes ``current`` and the old current becomes ``previous``.  The
*responder* cannot know that its response arrived, so its new session waits in ``next`` until the
first transport message authenticated with it (key confirmation); then it is promoted, and the
initiator always sends one at once (staged packets, or an empty keepalive).  Only ``current``
sends; a session older than REJECT_AFTER_TIME, or whose counter reached REJECT_AFTER_MESSAGES,
neither sends nor receives.  Each session has its own send counter and its own replay filter.

**Sending** (``tun_packet``).  The destination address picks the peer (longest match in the
AllowedIPs table; none: dropped, ``tun_no_route``).  The packet joins the peer's *staged* queue
(at most ``MAX_STAGED_PACKETS``, the oldest dropped, as wireguard-go), and the queue is flushed
at once when ``current`` is usable: each packet padded to a multiple of 16 within the MTU, sealed
under the next counter, framed.  Without a usable session the device asks the timers for a
handshake (``want_handshake``: at most one initiation per REKEY_TIMEOUT) and the packets wait;
the session that arrives flushes them, the retransmit timer retries and eventually gives up and
drops them.  After sending, ``keep_key_fresh_sending`` may ask for a rekey (initiator after
REKEY_AFTER_TIME, anyone after REKEY_AFTER_MESSAGES).

**Receiving** (``udp_datagram``).  The type word and the size pick the path; anything else is
``rx_malformed``.  Handshake messages (types 1, 2) first pass mac1 (cheap, no Diffie-Hellman);
*under load* (``force_under_load``, or more than ``handshake_load_threshold`` handshake messages
in one second, for UNDER_LOAD_AFTER seconds after) they must also carry a valid mac2, else they
are answered with a cookie reply and nothing else is spent on them.  An initiation is consumed
(the peer is found by its static key), answered with a response, and the new session goes to
``next``.  A response must be addressed to the peer's pending initiation; its session becomes
``current`` and staged packets or a keepalive follow.  A cookie reply (type 3) is stored in the
peer's cookie jar; the retransmitted message then carries mac2.  Transport data (type 4) finds
its session by receiver index, is refused when the session is too old, authenticated, checked
against the replay window (after authentication, so a forgery cannot move the window), may
promote ``next``, feeds the timers, and - unless it is an empty keepalive - must be an IPv4 or
IPv6 packet whose *source* address routes back to the same peer (cryptokey routing inbound), or
it is dropped (``rx_bad_source``).  Its length is cut to the IP header's length (the padding).

**Roaming.**  Every authenticated message from a peer (initiation, response, transport data)
sets that peer's endpoint to the datagram's source, so replies follow a peer that moved.  A
cookie reply does not (it proves nothing about the peer).

**Timers.**  Each peer has a ``PeerTimers``; the device reports the events at wireguard-go's call
sites (listed in ``timers.py``) and carries out the actions ``poll`` returns: send an initiation,
send a keepalive (an empty transport message, or the staged packets if any), zero the keys
(sessions, pending handshake, queue), give up (drop the queue).

**Statistics.**  ``show()`` gives what ``wg show`` prints: per peer its public key (never the
private or preshared key), endpoint, allowed IPs, latest handshake (wall clock), bytes received
and sent (whole datagrams, handshakes included), persistent keepalive; and the device's drop
counters.
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Final, TypeAlias

from tether.engine.wireguard import crypto, noise
from tether.engine.wireguard.allowedips import AllowedIPs, IPNetwork
from tether.engine.wireguard.conf import DEFAULT_MTU, WgConfig
from tether.engine.wireguard.crypto import CryptoError
from tether.engine.wireguard.keys import encode_key, generate_private_key
from tether.engine.wireguard.noise import (
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_TRANSPORT,
    TRANSPORT_HEADER,
    CookieChecker,
    HandshakeError,
    HandshakeState,
    Keypair,
    KnownPeer,
    PeerKeys,
    StaticIdentity,
)
from tether.engine.wireguard.replay import ReplayFilter
from tether.engine.wireguard.timers import (
    REJECT_AFTER_MESSAGES,
    GiveUp,
    PeerTimers,
    SendHandshakeInitiation,
    SendKeepalive,
    ZeroKeys,
    keypair_expired,
)

Address: TypeAlias = tuple  # a UDP address as the socket API gives it: (host, port[, ...])

MAX_STAGED_PACKETS: Final = 128  # per peer, waiting for a session (wireguard-go's QueueStagedSize)
SEND_BATCH: Final = 64  # staged packets of one tun batch sent before more are staged
HANDSHAKE_LOAD_THRESHOLD: Final = 128  # handshake messages per second that mean "under load"
UNDER_LOAD_AFTER: Final = 1.0  # seconds the device stays under load after the rate was exceeded
_SIZES: Final = {kind: layout.minimum for kind, layout in noise.MESSAGES.items()}
_TRANSPORT_HEADER_LEN: Final = TRANSPORT_HEADER.size
_IPV4_HEADER_LEN: Final = 20
_IPV6_HEADER_LEN: Final = 40
_PADDING: Final = noise.PADDING  # pad16
_ZEROS: Final = bytes(_PADDING)


# ---------------------------------------------------------------------------------------------
# Inputs and outputs


@dataclass(slots=True)
class Output:
    """What one call produced: datagrams for the UDP socket and packets for the tun, in order.

    Pass the same ``Output`` as ``out=`` to several calls to collect one batch."""

    datagrams: list[tuple[bytes, Address]] = field(default_factory=list)
    packets: list[bytes] = field(default_factory=list)

    def clear(self) -> None:
        self.datagrams.clear()
        self.packets.clear()


@dataclass(frozen=True)
class PeerSpec:
    """One peer as the device needs it: the endpoint already resolved by the caller."""

    public_key: bytes
    preshared_key: bytes | None = field(default=None, repr=False)
    endpoint: Address | None = None
    allowed_ips: tuple[IPNetwork | str, ...] = ()
    persistent_keepalive: int | None = None  # seconds; None or 0: off


@dataclass(slots=True)
class Counters:
    """Everything the device dropped or did beside moving packets, by reason."""

    tun_malformed: int = 0  # not IPv4/IPv6, or shorter than its header
    tun_no_route: int = 0  # destination in no peer's AllowedIPs
    staged_dropped: int = 0  # waiting packets dropped: queue full, handshake given up, keys zeroed
    no_endpoint: int = 0  # messages not sent: the peer has no endpoint yet
    rx_malformed: int = 0  # unknown type word, or a size that does not fit the type
    rx_bad_mac1: int = 0  # handshake message not addressed to our public key
    rx_handshake_invalid: int = 0  # initiation/response refused (unknown peer, forged, replayed...)
    rx_unknown_index: int = 0  # response/cookie/transport for no handshake or session of ours
    rx_cookie_invalid: int = 0  # cookie reply that does not authenticate or was not asked for
    rx_cookie_replies: int = 0  # cookie replies accepted
    rx_expired: int = 0  # transport data on a session past REJECT_AFTER_TIME
    rx_auth_failed: int = 0  # transport data that does not authenticate
    rx_replayed: int = 0  # transport counter seen before or behind the window
    rx_keepalives: int = 0  # empty transport messages (not an error)
    rx_inner_malformed: int = 0  # decrypted data that is not a whole IPv4/IPv6 packet
    rx_bad_source: int = 0  # decrypted packet whose source is not in the sender's AllowedIPs
    cookie_replies_sent: int = 0  # handshake messages answered with a cookie (under load)
    handshakes_failed: int = 0  # our own initiation/response could not be made (bad peer key)
    handshakes_completed: int = 0  # sessions confirmed, either side initiating (rekeys included)


# ---------------------------------------------------------------------------------------------
# Sessions, pending handshakes, peers


class Session:
    """One keypair in use: its keys, counter, replay window and owner."""

    __slots__ = ("peer", "keypair", "local_index", "created", "is_initiator", "send_counter", "replay")

    def __init__(self, peer: Peer, keypair: Keypair) -> None:
        self.peer = peer
        self.keypair = keypair
        self.local_index = keypair.local_index
        self.created = keypair.created
        self.is_initiator = keypair.is_initiator
        self.send_counter = 0  # the next nonce
        self.replay = ReplayFilter()

    def __repr__(self) -> str:
        role = "initiator" if self.is_initiator else "responder"
        return f"<Session {self.local_index:#010x} {role} sent={self.send_counter}>"

    def can_send(self, now: float) -> bool:
        return not keypair_expired(self.created, now, self.send_counter)


class _Pending:
    """An index-table entry for an initiation we sent, waiting for its response."""

    __slots__ = ("peer", "state")

    def __init__(self, peer: Peer, state: HandshakeState) -> None:
        self.peer = peer
        self.state = state


class Peer:
    """One configured peer's state.  Read it (tests, diagnostics); the device alone changes it."""

    __slots__ = ("public_key", "known", "endpoint", "allowed_ips", "timers", "current", "previous",
                 "next", "handshake", "staged", "rx_bytes", "tx_bytes", "latest_handshake")

    def __init__(self, spec: PeerSpec, timers: PeerTimers) -> None:
        psk = spec.preshared_key if spec.preshared_key is not None else bytes(crypto.KEY_LEN)
        self.public_key = bytes(spec.public_key)
        self.known = KnownPeer(PeerKeys(self.public_key, bytes(psk)))
        self.endpoint: Address | None = tuple(spec.endpoint) if spec.endpoint is not None else None
        self.allowed_ips = tuple(ipaddress.ip_network(n, strict=False) for n in spec.allowed_ips)
        self.timers = timers
        self.current: Session | None = None
        self.previous: Session | None = None
        self.next: Session | None = None
        self.handshake: _Pending | None = None  # our initiation waiting for a response
        self.staged: deque[bytes] = deque()
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.latest_handshake: float | None = None  # wall clock of the last completed handshake

    def __repr__(self) -> str:
        return f"<Peer {encode_key(self.public_key)[:8]}…>"


def format_endpoint(address: Address | None) -> str | None:
    """``host:port``, ``[v6]:port`` as ``wg show`` writes it, or None."""
    if address is None:
        return None
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


# ---------------------------------------------------------------------------------------------
# The device


class Device:
    """A WireGuard interface without I/O: see the module docstring."""

    def __init__(
        self,
        private_key: bytes,
        peers: Iterable[PeerSpec] = (),
        *,
        mtu: int = DEFAULT_MTU,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
        randbytes: Callable[[int], bytes] = os.urandom,
        handshake_load_threshold: int = HANDSHAKE_LOAD_THRESHOLD,
    ) -> None:
        self._identity = StaticIdentity(bytes(private_key))
        self.public_key = self._identity.public_key
        self.mtu = mtu
        self.counters = Counters()
        self.force_under_load = False  # the shell may set this (e.g. a deep socket backlog)
        self.handshake_load_threshold = handshake_load_threshold
        self._clock = clock
        self._wallclock = wallclock
        self._randbytes = randbytes
        self._cookie_checker = CookieChecker(self._identity, randbytes)
        self._routes: AllowedIPs[Peer] = AllowedIPs()
        self._peers: dict[bytes, Peer] = {}
        self._index: dict[int, Session | _Pending] = {}
        self._startup: list[Peer] = []  # peers whose first keepalive is due at the next tick
        self._load_window_start = float("-inf")
        self._load_count = 0
        self._under_load_until = float("-inf")
        for spec in peers:
            self.add_peer(spec)

    @classmethod
    def from_config(cls, config: WgConfig, endpoints: Mapping[bytes, Address] | None = None,
                    **kwargs: object) -> Device:
        """A device for a parsed wg-quick file.  ``endpoints`` maps a peer's public key to its
        resolved endpoint; a peer whose Endpoint is an IP literal needs no entry."""
        specs = []
        for number, peer in enumerate(config.peers, 1):
            endpoint = (endpoints or {}).get(peer.public_key)
            if endpoint is None and peer.endpoint is not None:
                if peer.endpoint.address is None:
                    raise ValueError(f"peer {number}: endpoint {peer.endpoint.host} is a host name; "
                                     "resolve it before isolation and pass it in endpoints")
                endpoint = (peer.endpoint.host, peer.endpoint.port)
            specs.append(PeerSpec(peer.public_key, peer.preshared_key, endpoint, peer.allowed_ips,
                                  peer.persistent_keepalive))
        kwargs.setdefault("mtu", config.interface.mtu)
        return cls(config.interface.private_key, specs, **kwargs)  # type: ignore[arg-type]

    # .. peers ....................................................................................

    def add_peer(self, spec: PeerSpec) -> Peer:
        """Add a peer and start its timers (a persistent keepalive is sent at the next tick)."""
        key = bytes(spec.public_key)
        if key in self._peers:
            raise ValueError("a peer with that public key is already configured")
        if key == self.public_key:
            raise ValueError("a peer's public key is the interface's own")
        timers = PeerTimers(spec.persistent_keepalive or 0, clock=self._clock, jitter=self._jitter)
        peer = Peer(spec, timers)
        self._peers[key] = peer
        for network in peer.allowed_ips:
            self._routes.insert(network, peer)
        if timers.start():  # [SendKeepalive()] with a persistent keepalive
            self._startup.append(peer)
        return peer

    def remove_peer(self, public_key: bytes) -> None:
        """Forget a peer: its sessions, queue, routes and timers."""
        peer = self._peers.pop(bytes(public_key), None)
        if peer is None:
            return
        self._zero(peer)
        peer.timers.stop()
        self._routes.remove_peer(peer)
        if peer in self._startup:
            self._startup.remove(peer)

    def peer(self, public_key: bytes) -> Peer | None:
        return self._peers.get(bytes(public_key))

    @property
    def peers(self) -> list[Peer]:
        return list(self._peers.values())

    # .. inputs ...................................................................................

    def tun_packet(self, packet: bytes, out: Output | None = None) -> Output:
        """An IP packet the sandbox sent into the tun: route it to a peer and send or stage it.

        ``packet`` must be ``bytes`` (or a buffer the caller never reuses): a staged packet is kept."""
        return self.tun_packets((packet,), out)

    def tun_packets(self, packets: Iterable[bytes], out: Output | None = None) -> Output:
        """``tun_packet`` for a batch read from the tun (a TCP super packet's segments, say): each
        packet is routed (the previous packet's peer is reused for the same destination) and
        staged, then each peer's queue is sent at once, with the timers told once per batch."""
        if out is None:
            out = Output()
        counters, lookup = self.counters, self._routes.lookup
        touched: list[Peer] = []
        last_destination, peer = None, None
        for packet in packets:
            size = len(packet)
            version = packet[0] >> 4 if size else 0
            if version == 4 and size >= _IPV4_HEADER_LEN:
                destination = packet[16:20]
            elif version == 6 and size >= _IPV6_HEADER_LEN:
                destination = packet[24:40]
            else:
                counters.tun_malformed += 1
                continue
            if destination != last_destination:
                last_destination, peer = destination, lookup(destination)
            if peer is None:
                counters.tun_no_route += 1
                continue
            staged = peer.staged
            if len(staged) >= MAX_STAGED_PACKETS:  # _stage, inline: this runs for every packet
                staged.popleft()
                counters.staged_dropped += 1
            staged.append(packet)
            if peer not in touched:
                touched.append(peer)
            elif len(staged) >= SEND_BATCH:  # never let a long batch overflow the stage
                self._send_staged(peer, out)
        for peer in touched:
            self._send_staged(peer, out)
        return out

    def udp_datagram(self, data: bytes, source: Address, out: Output | None = None) -> Output:
        """A datagram from the UDP socket, from ``source``: handshake, cookie or transport data."""
        return self.udp_datagrams(((data, source),), out)

    def udp_datagrams(self, datagrams: Iterable[tuple[bytes, Address]], out: Output | None = None) -> Output:
        """``udp_datagram`` for a batch of (data, source) read from the socket.  Transport data is
        decrypted and delivered in order; each peer's timers hear about the batch once at its end
        (with the same effect as once per message: see ``_after_receiving``)."""
        if out is None:
            out = Output()
        counters = self.counters
        received: dict[Peer, int] = {}  # peer -> data messages among its authenticated ones
        for data, source in datagrams:
            size = len(data)
            kind = int.from_bytes(data[:4], "little") if size >= 4 else 0
            expected = _SIZES.get(kind)
            if expected is None or size < expected or (kind != MESSAGE_TRANSPORT and size != expected):
                counters.rx_malformed += 1
            elif kind == MESSAGE_TRANSPORT:
                self._receive_transport(bytes(data), source, out, received)
            else:
                if received:  # a handshake message sees the timers as they are by now
                    self._after_receiving(received, out)
                if kind == MESSAGE_COOKIE_REPLY:
                    self._receive_cookie_reply(bytes(data))
                else:
                    self._receive_handshake(kind, bytes(data), source, out)
        if received:
            self._after_receiving(received, out)
        return out

    def tick(self, out: Output | None = None) -> Output:
        """Run every timer that is due: retransmissions, keepalives, rekeys, zeroing, giving up."""
        if out is None:
            out = Output()
        startup, self._startup = self._startup, []
        for peer in startup:
            self._send_keepalive(peer, out)
        now = self._clock()
        for peer in list(self._peers.values()):
            deadline = peer.timers.next_deadline()
            if deadline is None or deadline > now:
                continue
            for action in peer.timers.poll(now):
                if isinstance(action, SendHandshakeInitiation):
                    self._send_initiation(peer, out)  # poll already went through the door
                elif isinstance(action, SendKeepalive):
                    self._send_keepalive(peer, out)
                elif isinstance(action, ZeroKeys):
                    self._zero(peer)
                elif isinstance(action, GiveUp):
                    self._flush_staged(peer)
        return out

    def now(self) -> float:
        """The device's clock: the shell turns ``next_deadline`` into a delay with it."""
        return self._clock()

    def next_deadline(self) -> float | None:
        """When ``tick`` is next due (on ``clock``'s scale), or None when no timer is pending."""
        if self._startup:
            return self._clock()
        deadlines = [d for peer in self._peers.values() if (d := peer.timers.next_deadline()) is not None]
        return min(deadlines, default=None)

    def under_load(self) -> bool:
        """Whether handshake messages must carry a valid mac2 (else they get a cookie reply)."""
        return self.force_under_load or self._clock() < self._under_load_until

    # .. observation ..............................................................................

    def show(self) -> dict:
        """What ``wg show`` prints, as JSON-ready data; public keys only."""
        return {
            "public_key": encode_key(self.public_key),
            "peers": [
                {
                    "public_key": encode_key(peer.public_key),
                    "endpoint": format_endpoint(peer.endpoint),
                    "allowed_ips": [str(n) for n in self._routes.entries(peer)],
                    "latest_handshake": peer.latest_handshake,
                    "rx_bytes": peer.rx_bytes,
                    "tx_bytes": peer.tx_bytes,
                    "persistent_keepalive": peer.timers.persistent_keepalive or None,
                }
                for peer in self._peers.values()
            ],
            "counters": asdict(self.counters),
        }

    # .. sending ..................................................................................

    def _stage(self, peer: Peer, packet: bytes) -> None:
        staged = peer.staged
        if len(staged) >= MAX_STAGED_PACKETS:
            staged.popleft()
            self.counters.staged_dropped += 1
        staged.append(packet)

    def _send_keepalive(self, peer: Peer, out: Output) -> None:
        """An empty transport message, unless packets are waiting (they will do)."""
        if not peer.staged:
            peer.staged.append(b"")
        self._send_staged(peer, out)

    def _send_staged(self, peer: Peer, out: Output) -> None:
        staged = peer.staged
        if not staged:
            return
        session = peer.current
        now = self._clock()
        if session is None or not session.can_send(now):
            if peer.timers.want_handshake():
                self._send_initiation(peer, out)
            return
        counter = session.send_counter
        count = max(0, min(len(staged), REJECT_AFTER_MESSAGES - counter))
        exhausted = count < len(staged)  # the session's counter runs out within this batch
        plaintexts = []
        data_sent, mtu, popleft = False, self.mtu, staged.popleft
        for _ in range(count):
            packet = popleft()
            size = len(packet)
            if size:
                data_sent = True
                pad = -size % _PADDING
                if pad and size < mtu:  # pad16 within the MTU, one concatenation
                    packet += _ZEROS[: min(pad, mtu - size)]
            plaintexts.append(packet)
        sent_any = count > 0
        if sent_any:
            session.send_counter = counter + count
            header = TRANSPORT_HEADER.pack(MESSAGE_TRANSPORT, session.keypair.remote_index, 0)[:8]
            messages = session.keypair.send_cipher.seal_messages(header, counter, plaintexts)
            endpoint = peer.endpoint
            if endpoint is None:
                self.counters.no_endpoint += count
                sent_bytes = 0
            else:
                out.datagrams.extend([(message, endpoint) for message in messages])
                sent_bytes = sum(map(len, messages))
        if exhausted and peer.timers.want_handshake():  # wait for a new session
            self._send_initiation(peer, out)
        if not sent_any:
            return
        peer.tx_bytes += sent_bytes
        timers = peer.timers
        timers.any_authenticated_packet_traversal()
        timers.any_authenticated_packet_sent()
        if data_sent:
            timers.data_sent()
        if peer.current is session and timers.keep_key_fresh_sending(
                session.created, session.is_initiator, session.send_counter):
            self._send_initiation(peer, out)

    def _send_initiation(self, peer: Peer, out: Output) -> None:
        """Send a new initiation (the caller went through ``want_handshake`` or ``poll``)."""
        now = self._clock()
        self._forget_pending(peer)
        index = self._new_index()
        try:
            message, state = noise.create_initiation(
                self._identity, peer.known, index, now,
                ephemeral=generate_private_key(self._randbytes),
                timestamp=crypto.tai64n(round(self._wallclock() * 1e9)),
            )
        except HandshakeError:  # the configured public key is a small-order point
            self.counters.handshakes_failed += 1
            return
        pending = _Pending(peer, state)
        self._index[index] = pending
        peer.handshake = pending
        peer.timers.any_authenticated_packet_traversal()
        peer.timers.any_authenticated_packet_sent()
        self._emit(peer, message, out)
        peer.timers.handshake_initiated()

    def _emit(self, peer: Peer, message: bytes, out: Output) -> None:
        if peer.endpoint is None:
            self.counters.no_endpoint += 1
            return
        out.datagrams.append((message, peer.endpoint))
        peer.tx_bytes += len(message)

    # .. receiving ................................................................................

    def _receive_handshake(self, kind: int, data: bytes, source: Address, out: Output) -> None:
        now = self._clock()
        self._count_handshake_load(now)
        checker = self._cookie_checker
        if not checker.check_mac1(data):
            self.counters.rx_bad_mac1 += 1
            return
        if self.force_under_load or now < self._under_load_until:
            address = noise.address_bytes(source[0], source[1])
            if not checker.check_mac2(data, address, now):
                out.datagrams.append((checker.create_cookie_reply(data, address, now), source))
                self.counters.cookie_replies_sent += 1
                return
        if kind == MESSAGE_INITIATION:
            self._receive_initiation(data, source, now, out)
        else:
            self._receive_response(data, source, now, out)

    def _receive_initiation(self, data: bytes, source: Address, now: float, out: Output) -> None:
        try:
            known, state = noise.consume_initiation(self._identity, data, self._lookup_known, now)
        except HandshakeError:
            self.counters.rx_handshake_invalid += 1
            return
        peer = self._peers[known.keys.public_key]
        peer.timers.any_authenticated_packet_traversal()
        peer.timers.any_authenticated_packet_received()
        peer.endpoint = source
        peer.rx_bytes += len(data)
        # Answer: our own initiation in progress, if any, is superseded (wireguard-go keeps one
        # handshake per peer); its retransmit timer stays armed until a session is confirmed.
        self._forget_pending(peer)
        index = self._new_index()
        try:
            response, keypair = noise.create_response(
                state, index, now, ephemeral=generate_private_key(self._randbytes))
        except HandshakeError:
            self.counters.handshakes_failed += 1
            return
        peer.timers.handshake_response_sent()
        self._begin_session(peer, Session(peer, keypair))
        peer.timers.session_derived()
        peer.timers.any_authenticated_packet_traversal()
        peer.timers.any_authenticated_packet_sent()
        self._emit(peer, response, out)

    def _receive_response(self, data: bytes, source: Address, now: float, out: Output) -> None:
        entry = self._index.get(int.from_bytes(data[8:12], "little"))
        if not isinstance(entry, _Pending) or entry.peer.handshake is not entry:
            self.counters.rx_unknown_index += 1
            return
        peer = entry.peer
        try:
            keypair = noise.consume_response(entry.state, data, now)
        except HandshakeError:
            self.counters.rx_handshake_invalid += 1
            return
        peer.endpoint = source
        peer.rx_bytes += len(data)
        peer.timers.any_authenticated_packet_traversal()
        peer.timers.any_authenticated_packet_received()
        peer.handshake = None  # its index now names the session
        self._begin_session(peer, Session(peer, keypair))
        peer.timers.session_derived()
        self._handshake_complete(peer)
        self._send_keepalive(peer, out)

    def _receive_cookie_reply(self, data: bytes) -> None:
        entry = self._index.get(int.from_bytes(data[4:8], "little"))
        if entry is None:
            self.counters.rx_unknown_index += 1
            return
        try:
            noise.consume_cookie_reply(entry.peer.known, data, self._clock())
        except HandshakeError:
            self.counters.rx_cookie_invalid += 1
            return
        self.counters.rx_cookie_replies += 1

    def _receive_transport(self, data: bytes, source: Address, out: Output, received: dict[Peer, int]) -> None:
        """Decrypt and deliver one transport message; ``received`` counts it for the timers."""
        counters = self.counters
        _, receiver, counter = TRANSPORT_HEADER.unpack_from(data)
        session = self._index.get(receiver)
        if type(session) is not Session:
            counters.rx_unknown_index += 1
            return
        now = self._clock()
        if keypair_expired(session.created, now, counter):
            counters.rx_expired += 1
            return
        replay = session.replay
        if not replay.would_accept(counter):  # spare the decryption of an obvious replay
            counters.rx_replayed += 1
            return
        try:
            plaintext = session.keypair.receive_cipher.open(counter, data[_TRANSPORT_HEADER_LEN:])
        except CryptoError:
            counters.rx_auth_failed += 1
            return
        if not replay.validate(counter):
            counters.rx_replayed += 1
            return
        peer = session.peer
        peer.rx_bytes += len(data)
        peer.endpoint = source
        if session is peer.next:  # key confirmation: the responder's session goes live
            self._promote_next(peer)
            self._handshake_complete(peer)
            self._send_staged(peer, out)
        if not plaintext:
            received.setdefault(peer, 0)
            counters.rx_keepalives += 1
            return
        received[peer] = received.get(peer, 0) + 1
        packet = self._inner_packet(plaintext)
        if packet is None:
            counters.rx_inner_malformed += 1
            return
        source_address = packet[12:16] if packet[0] >> 4 == 4 else packet[8:24]
        if self._routes.lookup(source_address) is not peer:
            counters.rx_bad_source += 1
            return
        out.packets.append(packet)

    def _after_receiving(self, received: dict[Peer, int], out: Output) -> None:
        """The timers' events for the authenticated transport messages of a batch, per peer (and
        ``received`` emptied): as if told after each message - every event but ``data_received``
        is idempotent within one instant, and ``data_received`` twice is what many are."""
        for peer, data_messages in received.items():
            timers, current = peer.timers, peer.current
            if current is not None and timers.keep_key_fresh_receiving(current.created, current.is_initiator):
                self._send_initiation(peer, out)
            timers.any_authenticated_packet_traversal()
            timers.any_authenticated_packet_received()
            for _ in range(min(data_messages, 2)):
                timers.data_received()
        received.clear()

    @staticmethod
    def _inner_packet(plaintext: bytes) -> bytes | None:
        """The IP packet inside a decrypted payload, cut to its header's length (no padding)."""
        size = len(plaintext)
        version = plaintext[0] >> 4
        if version == 4 and size >= _IPV4_HEADER_LEN:
            length = int.from_bytes(plaintext[2:4], "big")
            if length < _IPV4_HEADER_LEN:
                return None
        elif version == 6 and size >= _IPV6_HEADER_LEN:
            length = _IPV6_HEADER_LEN + int.from_bytes(plaintext[4:6], "big")
        else:
            return None
        if length > size:
            return None
        return plaintext if length == size else plaintext[:length]

    # .. sessions and the index table .............................................................

    def _begin_session(self, peer: Peer, session: Session) -> None:
        """Install a new session: current for its initiator, next for its responder."""
        self._index[session.local_index] = session
        if session.is_initiator:
            if peer.next is not None:
                self._drop_session(peer.current)
                self._drop_session(peer.previous)
                peer.previous, peer.next = peer.next, None
            else:
                self._drop_session(peer.previous)
                peer.previous = peer.current
            peer.current = session
        else:
            self._drop_session(peer.next)
            self._drop_session(peer.previous)
            peer.next, peer.previous = session, None

    def _promote_next(self, peer: Peer) -> None:
        self._drop_session(peer.previous)
        peer.previous, peer.current, peer.next = peer.current, peer.next, None

    def _handshake_complete(self, peer: Peer) -> None:
        peer.timers.handshake_complete()
        peer.latest_handshake = self._wallclock()
        self.counters.handshakes_completed += 1

    def _drop_session(self, session: Session | None) -> None:
        if session is not None and self._index.get(session.local_index) is session:
            del self._index[session.local_index]

    def _forget_pending(self, peer: Peer) -> None:
        pending = peer.handshake
        if pending is not None:
            peer.handshake = None
            index = pending.state.local_index
            if index is not None and self._index.get(index) is pending:
                del self._index[index]

    def _zero(self, peer: Peer) -> None:
        """Erase every session and handshake of ``peer`` and drop its queue."""
        for session in (peer.current, peer.previous, peer.next):
            self._drop_session(session)
        peer.current = peer.previous = peer.next = None
        self._forget_pending(peer)
        self._flush_staged(peer)

    def _flush_staged(self, peer: Peer) -> None:
        self.counters.staged_dropped += sum(1 for p in peer.staged if p)  # keepalives do not count
        peer.staged.clear()

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(self._randbytes(4), "little")
            if index not in self._index:
                return index

    def _lookup_known(self, static: bytes) -> KnownPeer | None:
        peer = self._peers.get(static)
        return None if peer is None else peer.known

    def _jitter(self) -> float:
        return int.from_bytes(self._randbytes(2), "little") / 0xFFFF

    def _count_handshake_load(self, now: float) -> None:
        if now - self._load_window_start >= 1.0:
            self._load_window_start, self._load_count = now, 0
        self._load_count += 1
        if self._load_count > self.handshake_load_threshold:
            self._under_load_until = now + UNDER_LOAD_AFTER
