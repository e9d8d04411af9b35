"""WireGuard's handshake, cookies and transport framing, as pure functions over bytes (sans-IO).

Rules of this file: no sockets, no timers, no randomness that the caller cannot replace.  Bytes
come in, bytes and keys go out; the time is always an argument (``now``: the caller's monotonic
clock, in seconds), and so are ephemeral keys (``ephemeral=``, default: fresh random) and sender
indices (the device owns the index table, since indices must be unique across all its peers).
Every message of every type that is malformed, truncated, forged, replayed or simply not for us
raises ``HandshakeError`` with a reason, and nothing else; a message that fails changes no state.
What this file does not do: decide *when* to handshake (timers), which keypair is current
(the device), replay windows for transport counters (``replay.py``), or routing (``allowedips.py``).

Theory of operation
-------------------
**Messages.**  Four types, each a little-endian 32-bit type word (type byte + 3 zero bytes) and
fixed fields; ``MESSAGES`` is the table of their layouts and the only place that knows them:

=====  ===================  ======  =========================================================
type   message              bytes   fields after the type word
=====  ===================  ======  =========================================================
1      handshake initiation  148    sender, ephemeral, static (48, sealed), timestamp (28,
                                    sealed), mac1, mac2
2      handshake response     92    sender, receiver, ephemeral, empty (16, sealed), mac1, mac2
3      cookie reply           64    receiver, nonce (24), cookie (32, sealed)
4      transport data       >=32    receiver, counter (u64), packet (sealed, >= 16)
=====  ===================  ======  =========================================================

**Handshake** (whitepaper 5.4.2-5.4.4, Noise IKpsk2).  Both sides start from the chaining key
``C = HASH(CONSTRUCTION)`` and the hash ``H = HASH(HASH(C || IDENTIFIER) || responder's static
public key)``.  Every public value sent is mixed into ``H`` (``_mix_hash``) and every key
agreement into ``C`` (``kdf1``/``kdf2``), so the final keys commit to the whole transcript.  The
initiator sends its ephemeral key, its static key sealed under es, and a TAI64N timestamp sealed
under ss.  The responder, from its private key alone, opens the static key, looks the peer up by
it (``lookup_peer_by_static``), opens the timestamp, and refuses it unless it is *greater* than
every timestamp that peer sent before: a captured initiation cannot be replayed, even after a
restart of the responder's peer list, as long as the initiator's clock moves forward.  It also
refuses more than one initiation per peer per ``INITIATION_MIN_INTERVAL`` (flood protection).
The responder answers with its ephemeral key and an empty AEAD under a key mixed from ee, se and
the preshared key (``kdf3``: zeros when none is set); the initiator, checking that tag, learns that
the responder holds the private key it addressed.  Both then split ``C`` into two transport keys
(``kdf2(C, "")``: the initiator sends with the first, the responder with the second).

**MACs and cookies** (5.4.4, 5.4.7).  Every handshake message carries ``mac1 = MAC(HASH("mac1----"
|| receiver's static public key), message up to mac1)``: checked first, with no Diffie-Hellman,
so a packet from someone who does not know our public key costs a hash.  ``mac2`` is zeros unless
we hold a cookie from that peer younger than ``COOKIE_LIFETIME``; then ``mac2 = MAC(cookie,
message up to mac2)``.  A responder under load (its device decides) answers a message whose mac2
is not valid with a *cookie reply* instead of doing DH: the cookie is ``MAC(secret, sender's IP
address bytes || UDP port, big-endian)`` under a secret that changes every ``COOKIE_LIFETIME``
(``CookieChecker``), sealed with XChaCha20-Poly1305 under ``HASH("cookie--" || responder's public
key)``, a random nonce, and the answered message's mac1 as associated data: only the host that
sent that mac1 (``CookieJar`` remembers the last one it sent) can use the reply, and only while it
receives at the address it claims.  The retried message then carries a valid mac2.

**Transport** (5.4.6).  ``seal_transport`` frames a packet: header (type 4, the peer's index for
this keypair, the counter) and ChaCha20-Poly1305 of the packet with the counter as nonce.
Padding to a multiple of 16 (``pad16``) hides packet lengths a little; it is the caller's choice,
the receiver's IP layer ignores it.  ``open_transport`` checks the receiver index and the tag
and returns the counter, which the caller must pass to its replay window *after* authentication.

**State.**  ``StaticIdentity`` (our keys) and ``PeerKeys`` are immutable.  ``KnownPeer`` is what
the handshake remembers per peer: the greatest timestamp and last initiation time (responder
side) and the ``CookieJar`` (its cookie and our last mac1).  ``HandshakeState`` is one handshake in
progress; it is used once: a second response to it is refused.  ``Keypair`` is the result.
"""

from __future__ import annotations

import hmac as _hmac
import ipaddress
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from tether.engine.wireguard import crypto
from tether.engine.wireguard.crypto import CryptoError, digest, dh, kdf1, kdf2, kdf3
from tether.engine.wireguard.keys import generate_private_key, public_key

CONSTRUCTION: Final = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER: Final = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1: Final = b"mac1----"
LABEL_COOKIE: Final = b"cookie--"
INITIAL_CHAIN_KEY: Final = digest(CONSTRUCTION)
INITIAL_HASH: Final = digest(INITIAL_CHAIN_KEY, IDENTIFIER)

MESSAGE_INITIATION: Final = 1
MESSAGE_RESPONSE: Final = 2
MESSAGE_COOKIE_REPLY: Final = 3
MESSAGE_TRANSPORT: Final = 4

COOKIE_LIFETIME: Final = 120.0  # seconds a cookie (and the responder's cookie secret) is good for
INITIATION_MIN_INTERVAL: Final = 1 / 50  # seconds between two initiations accepted from one peer
PADDING: Final = 16  # transport plaintexts are padded to a multiple of this (pad16)
MAX_INDEX: Final = 2**32 - 1
MAX_COUNTER: Final = 2**64 - 1
_MACS_LEN: Final = 2 * crypto.MAC_LEN
_TYPE_WORD: Final = struct.Struct("<I")


class HandshakeError(Exception):
    """A WireGuard message was refused: malformed, truncated, forged, replayed or not for us.

    ``reason`` says which, in words fit for a debug log (never a key).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Layout(NamedTuple):
    """How one message type is laid out; ``struct`` covers the whole message, or its header."""

    name: str
    struct: struct.Struct
    exact: bool  # handshake messages have one size; transport data has a header and a minimum
    minimum: int


MESSAGES: Final[dict[int, Layout]] = {
    MESSAGE_INITIATION: Layout("handshake initiation", struct.Struct("<II32s48s28s16s16s"), True, 148),
    MESSAGE_RESPONSE: Layout("handshake response", struct.Struct("<III32s16s16s16s"), True, 92),
    MESSAGE_COOKIE_REPLY: Layout("cookie reply", struct.Struct("<II24s32s"), True, 64),
    MESSAGE_TRANSPORT: Layout("transport data", struct.Struct("<IIQ"), False, 16 + crypto.TAG_LEN),
}
TRANSPORT_HEADER: Final = MESSAGES[MESSAGE_TRANSPORT].struct
KEEPALIVE_LEN: Final = MESSAGES[MESSAGE_TRANSPORT].minimum


def message_type(data: bytes) -> int:
    """The type of a message whose size fits its type; ``HandshakeError`` otherwise."""
    if len(data) < _TYPE_WORD.size:
        raise HandshakeError(f"{len(data)} bytes is too short for a message")
    (kind,) = _TYPE_WORD.unpack_from(data)
    layout = MESSAGES.get(kind)
    if layout is None:
        raise HandshakeError(f"unknown message type word {kind:#x}")
    _check_size(data, layout)
    return kind


def receiver_index(data: bytes) -> int:
    """Our index a response, cookie reply or transport message is addressed to (for the lookup)."""
    kind = message_type(data)
    if kind == MESSAGE_INITIATION:
        raise HandshakeError("a handshake initiation has no receiver index")
    return _TYPE_WORD.unpack_from(data, 8 if kind == MESSAGE_RESPONSE else 4)[0]


def _check_size(data: bytes, layout: Layout) -> None:
    if len(data) < layout.minimum or (layout.exact and len(data) != layout.minimum):
        expected = f"{layout.minimum}" if layout.exact else f"at least {layout.minimum}"
        raise HandshakeError(f"{layout.name} of {len(data)} bytes, expected {expected}")


def _parse(data: bytes, kind: int) -> tuple:
    """The fields of a message that must be of type ``kind`` (the type word first)."""
    layout = MESSAGES[kind]
    if len(data) < _TYPE_WORD.size or _TYPE_WORD.unpack_from(data)[0] != kind:
        raise HandshakeError(f"not a {layout.name}")
    _check_size(data, layout)
    return layout.struct.unpack_from(data)


# ---------------------------------------------------------------------------------------------
# Keys and per-peer memory


@dataclass(frozen=True)
class StaticIdentity:
    """Our static key pair and the keys derived from our public key (mac1, cookie encryption)."""

    private_key: bytes = field(repr=False)
    public_key: bytes = field(init=False)
    mac1_key: bytes = field(init=False, repr=False)  # HASH(LABEL_MAC1 || our public key)
    cookie_key: bytes = field(init=False, repr=False)  # HASH(LABEL_COOKIE || our public key)
    responder_hash: bytes = field(init=False, repr=False)  # H after mixing our public key

    def __post_init__(self) -> None:
        _check_key(self.private_key, "private key")
        public = public_key(self.private_key)
        object.__setattr__(self, "public_key", public)
        object.__setattr__(self, "mac1_key", digest(LABEL_MAC1, public))
        object.__setattr__(self, "cookie_key", digest(LABEL_COOKIE, public))
        object.__setattr__(self, "responder_hash", digest(INITIAL_HASH, public))


@dataclass(frozen=True)
class PeerKeys:
    """A peer's static public key and our preshared key with it (zeros: none)."""

    public_key: bytes
    preshared_key: bytes = field(default=bytes(crypto.KEY_LEN), repr=False)

    def __post_init__(self) -> None:
        _check_key(self.public_key, "public key")
        _check_key(self.preshared_key, "preshared key")


def _check_key(key: bytes, what: str) -> None:
    if len(key) != crypto.KEY_LEN:
        raise ValueError(f"a {what} is {crypto.KEY_LEN} bytes, not {len(key)}")


class CookieJar:
    """Our side of a peer's cookies: the mac1 and mac2 we put on messages to it (the whitepaper's
    initiator-side state, used by both roles since responses carry MACs too)."""

    def __init__(self, peer_public_key: bytes) -> None:
        self._mac1_key = digest(LABEL_MAC1, peer_public_key)
        self._cookie_key = digest(LABEL_COOKIE, peer_public_key)
        self._last_mac1: bytes | None = None  # what a cookie reply must be bound to
        self._cookie: bytes | None = None
        self._cookie_time = 0.0

    def __repr__(self) -> str:
        return f"<CookieJar cookie={'yes' if self._cookie else 'no'}>"

    def has_fresh_cookie(self, now: float) -> bool:
        return self._cookie is not None and now - self._cookie_time < COOKIE_LIFETIME

    def add_macs(self, body: bytes, now: float) -> bytes:
        """``body`` (a handshake message up to mac1) || mac1 || mac2."""
        mac1 = crypto.mac(self._mac1_key, body)
        self._last_mac1 = mac1
        if self._cookie is not None and self.has_fresh_cookie(now):
            mac2 = crypto.mac(self._cookie, body, mac1)
        else:
            mac2 = bytes(crypto.MAC_LEN)
        return body + mac1 + mac2

    def take_cookie(self, nonce: bytes, sealed_cookie: bytes, now: float) -> None:
        """Open a cookie reply's cookie with our last mac1 as associated data, and keep it."""
        if self._last_mac1 is None:
            raise HandshakeError("cookie reply, but no handshake message was sent to that peer")
        try:
            cookie = crypto.xaead_open(self._cookie_key, nonce, sealed_cookie, self._last_mac1)
        except CryptoError:
            raise HandshakeError("cookie reply does not authenticate") from None
        self._cookie, self._cookie_time = cookie, now
        self._last_mac1 = None  # one reply per message sent, as Linux does


class KnownPeer:
    """What the handshake layer remembers about one configured peer, beside its keys."""

    def __init__(self, keys: PeerKeys) -> None:
        self.keys = keys
        self.cookies = CookieJar(keys.public_key)
        self.initiator_hash = digest(INITIAL_HASH, keys.public_key)  # H after mixing its key
        self.greatest_timestamp = bytes(crypto.TIMESTAMP_LEN)  # of initiations it sent us
        self.last_initiation: float | None = None  # when we last accepted one (flood check)

    def __repr__(self) -> str:
        return f"<KnownPeer {self.keys.public_key[:4].hex()}…>"


@dataclass(frozen=True, eq=False)
class Keypair:
    """The transport keys one handshake produced, and the indices that name them on the wire."""

    send_key: bytes = field(repr=False)
    receive_key: bytes = field(repr=False)
    local_index: int  # what the peer puts in the receiver field of packets to us
    remote_index: int  # what we put in the receiver field of packets to the peer
    created: float  # the caller's monotonic clock when the handshake completed
    is_initiator: bool
    send_cipher: crypto.Cipher = field(init=False, repr=False)
    receive_cipher: crypto.Cipher = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "send_cipher", crypto.Cipher(self.send_key))
        object.__setattr__(self, "receive_cipher", crypto.Cipher(self.receive_key))


@dataclass(eq=False)
class HandshakeState:
    """One handshake in progress: what the next message of it needs, used once."""

    identity: StaticIdentity
    peer: KnownPeer
    is_initiator: bool
    local_index: int | None  # initiator: its sender index; responder: set by create_response
    remote_index: int | None  # responder: the initiator's sender index
    chaining_key: bytes = field(repr=False)
    hash: bytes = field(repr=False)
    created: float
    local_ephemeral: bytes | None = field(default=None, repr=False)  # initiator
    remote_ephemeral: bytes | None = field(default=None, repr=False)  # responder
    finished: bool = False


# ---------------------------------------------------------------------------------------------
# The handshake


def _mix_hash(hash_: bytes, data: bytes) -> bytes:
    return digest(hash_, data)


def _dh(private_key: bytes, public: bytes, what: str) -> bytes:
    try:
        return dh(private_key, public)
    except CryptoError:
        raise HandshakeError(f"{what} is a small-order point") from None


def _mix_dh(chaining_key: bytes, private_key: bytes, public: bytes, what: str) -> bytes:
    return kdf1(chaining_key, _dh(private_key, public, what))


def _body(kind: int, *fields: bytes | int) -> bytes:
    """A handshake message of type ``kind`` up to its MACs, laid out by ``MESSAGES``."""
    zero_mac = bytes(crypto.MAC_LEN)
    return MESSAGES[kind].struct.pack(kind, *fields, zero_mac, zero_mac)[:-_MACS_LEN]


def _open(key: bytes, sealed: bytes, hash_: bytes, what: str) -> bytes:
    try:
        return crypto.aead_open(key, 0, sealed, hash_)
    except CryptoError:
        raise HandshakeError(f"{what} does not authenticate") from None


def _check_index(index: int) -> None:
    if not 0 <= index <= MAX_INDEX:
        raise ValueError(f"an index is a 32-bit unsigned integer, not {index}")


def _check_mac1(message: bytes, mac1_key: bytes) -> None:
    body_end = len(message) - _MACS_LEN
    expected = crypto.mac(mac1_key, message[:body_end])
    if not _hmac.compare_digest(expected, message[body_end : body_end + crypto.MAC_LEN]):
        raise HandshakeError("mac1 does not match (not addressed to our public key)")


def create_initiation(
    identity: StaticIdentity,
    peer: KnownPeer,
    sender_index: int,
    now: float,
    *,
    ephemeral: bytes | None = None,
    timestamp: bytes | None = None,
) -> tuple[bytes, HandshakeState]:
    """Message 1 to ``peer`` and the state that ``consume_response`` completes.

    ``timestamp`` defaults to ``crypto.tai64n()`` of the wall clock, the one clock WireGuard
    needs to be monotonic across restarts; ``ephemeral`` to a fresh private key.
    """
    _check_index(sender_index)
    local_ephemeral = generate_private_key() if ephemeral is None else ephemeral
    ephemeral_public = public_key(local_ephemeral)
    chaining_key = kdf1(INITIAL_CHAIN_KEY, ephemeral_public)
    hash_ = _mix_hash(peer.initiator_hash, ephemeral_public)
    es = _dh(local_ephemeral, peer.keys.public_key, "the peer's public key")
    chaining_key, key = kdf2(chaining_key, es)
    sealed_static = crypto.aead_seal(key, 0, identity.public_key, hash_)
    hash_ = _mix_hash(hash_, sealed_static)
    ss = _dh(identity.private_key, peer.keys.public_key, "the peer's public key")
    chaining_key, key = kdf2(chaining_key, ss)
    stamp = crypto.tai64n() if timestamp is None else timestamp
    if len(stamp) != crypto.TIMESTAMP_LEN:
        raise ValueError(f"a TAI64N timestamp is {crypto.TIMESTAMP_LEN} bytes, not {len(stamp)}")
    sealed_timestamp = crypto.aead_seal(key, 0, stamp, hash_)
    hash_ = _mix_hash(hash_, sealed_timestamp)
    body = _body(MESSAGE_INITIATION, sender_index, ephemeral_public, sealed_static, sealed_timestamp)
    message = peer.cookies.add_macs(body, now)
    state = HandshakeState(
        identity=identity,
        peer=peer,
        is_initiator=True,
        local_index=sender_index,
        remote_index=None,
        chaining_key=chaining_key,
        hash=hash_,
        created=now,
        local_ephemeral=local_ephemeral,
    )
    return message, state


def consume_initiation(
    identity: StaticIdentity,
    message: bytes,
    lookup_peer_by_static: Callable[[bytes], KnownPeer | None],
    now: float,
) -> tuple[KnownPeer, HandshakeState]:
    """Check message 1 (mac1 first, before any DH) and return its peer and the responder state.

    Accepting it records its timestamp and ``now`` in the peer (replay and flood protection).
    """
    _, sender, ephemeral_public, sealed_static, sealed_timestamp, _, _ = _parse(message, MESSAGE_INITIATION)
    _check_mac1(message, identity.mac1_key)
    chaining_key = kdf1(INITIAL_CHAIN_KEY, ephemeral_public)
    hash_ = _mix_hash(identity.responder_hash, ephemeral_public)
    es = _dh(identity.private_key, ephemeral_public, "the initiator's ephemeral key")
    chaining_key, key = kdf2(chaining_key, es)
    static = _open(key, sealed_static, hash_, "the initiator's static key")
    hash_ = _mix_hash(hash_, sealed_static)
    peer = lookup_peer_by_static(static)
    if peer is None:
        raise HandshakeError("initiation from a static key that is not one of our peers")
    ss = _dh(identity.private_key, peer.keys.public_key, "the peer's public key")
    chaining_key, key = kdf2(chaining_key, ss)
    timestamp = _open(key, sealed_timestamp, hash_, "the initiation's timestamp")
    hash_ = _mix_hash(hash_, sealed_timestamp)
    _check_fresh(peer, timestamp, now)
    peer.greatest_timestamp, peer.last_initiation = timestamp, now
    state = HandshakeState(
        identity=identity,
        peer=peer,
        is_initiator=False,
        local_index=None,
        remote_index=sender,
        chaining_key=chaining_key,
        hash=hash_,
        created=now,
        remote_ephemeral=ephemeral_public,
    )
    return peer, state


def _check_fresh(peer: KnownPeer, timestamp: bytes, now: float) -> None:
    if timestamp <= peer.greatest_timestamp:
        raise HandshakeError("replayed initiation (timestamp not newer than the last one)")
    if peer.last_initiation is not None and now - peer.last_initiation < INITIATION_MIN_INTERVAL:
        raise HandshakeError("initiation flood (less than 20 ms after the last one)")


def create_response(
    state: HandshakeState, sender_index: int, now: float, *, ephemeral: bytes | None = None
) -> tuple[bytes, Keypair]:
    """Message 2 answering a consumed initiation, and the responder's keypair."""
    if state.is_initiator or state.finished or state.remote_ephemeral is None or state.remote_index is None:
        raise RuntimeError("create_response needs the state of a consumed, unanswered initiation")
    _check_index(sender_index)
    peer = state.peer
    local_ephemeral = generate_private_key() if ephemeral is None else ephemeral
    ephemeral_public = public_key(local_ephemeral)
    hash_ = _mix_hash(state.hash, ephemeral_public)
    chaining_key = kdf1(state.chaining_key, ephemeral_public)
    chaining_key = _mix_dh(chaining_key, local_ephemeral, state.remote_ephemeral, "the initiator's ephemeral")
    chaining_key = _mix_dh(chaining_key, local_ephemeral, peer.keys.public_key, "the peer's public key")
    chaining_key, tau, key = kdf3(chaining_key, peer.keys.preshared_key)
    hash_ = _mix_hash(hash_, tau)
    sealed_empty = crypto.aead_seal(key, 0, b"", hash_)
    body = _body(MESSAGE_RESPONSE, sender_index, state.remote_index, ephemeral_public, sealed_empty)
    message = peer.cookies.add_macs(body, now)
    receive_key, send_key = kdf2(chaining_key, b"")
    state.finished = True
    state.local_index = sender_index
    return message, Keypair(send_key, receive_key, sender_index, state.remote_index, now, False)


def consume_response(state: HandshakeState, message: bytes, now: float) -> Keypair:
    """Check message 2 against our initiation and return the initiator's keypair."""
    if not state.is_initiator or state.local_ephemeral is None or state.local_index is None:
        raise RuntimeError("consume_response needs the state create_initiation returned")
    _, sender, receiver, ephemeral_public, sealed_empty, _, _ = _parse(message, MESSAGE_RESPONSE)
    if state.finished:
        raise HandshakeError("response to a handshake that is already complete")
    if receiver != state.local_index:
        raise HandshakeError("response addressed to another handshake (receiver index)")
    _check_mac1(message, state.identity.mac1_key)
    peer = state.peer
    hash_ = _mix_hash(state.hash, ephemeral_public)
    chaining_key = kdf1(state.chaining_key, ephemeral_public)
    what = "the responder's ephemeral key"
    chaining_key = _mix_dh(chaining_key, state.local_ephemeral, ephemeral_public, what)
    chaining_key = _mix_dh(chaining_key, state.identity.private_key, ephemeral_public, what)
    chaining_key, tau, key = kdf3(chaining_key, peer.keys.preshared_key)
    hash_ = _mix_hash(hash_, tau)
    _open(key, sealed_empty, hash_, "the response")
    send_key, receive_key = kdf2(chaining_key, b"")
    state.finished = True
    state.remote_index = sender
    return Keypair(send_key, receive_key, state.local_index, sender, now, True)


# ---------------------------------------------------------------------------------------------
# Cookies


def address_bytes(host: str, port: int) -> bytes:
    """What a cookie is computed over: the sender's packed IP address || UDP port, big-endian."""
    return ipaddress.ip_address(host.split("%", 1)[0]).packed + port.to_bytes(2, "big")


def _handshake_message(message: bytes) -> bytes:
    """A whole initiation or response (the two types that carry MACs)."""
    kind = message_type(message)
    if kind not in (MESSAGE_INITIATION, MESSAGE_RESPONSE):
        raise HandshakeError(f"a {MESSAGES[kind].name} carries no mac1/mac2")
    return bytes(message)


class CookieChecker:
    """The responder's side of cookies: check mac1 and mac2, and write cookie replies."""

    def __init__(self, identity: StaticIdentity, randbytes: Callable[[int], bytes] = os.urandom) -> None:
        self._mac1_key = identity.mac1_key
        self._cookie_key = identity.cookie_key
        self._randbytes = randbytes
        self._secret: bytes | None = None
        self._secret_time = 0.0

    def __repr__(self) -> str:
        return "<CookieChecker>"

    def check_mac1(self, message: bytes) -> bool:
        """Whether a handshake message's mac1 is addressed to our public key."""
        message = _handshake_message(message)
        try:
            _check_mac1(message, self._mac1_key)
        except HandshakeError:
            return False
        return True

    def check_mac2(self, message: bytes, source: bytes, now: float) -> bool:
        """Whether a handshake message's mac2 is made with the cookie we would give ``source``."""
        message = _handshake_message(message)
        if self._secret is None or now - self._secret_time >= COOKIE_LIFETIME:
            return False
        cookie = crypto.mac(self._secret, source)
        mac2_at = len(message) - crypto.MAC_LEN
        return _hmac.compare_digest(crypto.mac(cookie, message[:mac2_at]), message[mac2_at:])

    def create_cookie_reply(self, message: bytes, source: bytes, now: float) -> bytes:
        """A cookie reply to a handshake message (with a valid mac1) that came from ``source``."""
        message = _handshake_message(message)
        _check_mac1(message, self._mac1_key)
        if self._secret is None or now - self._secret_time >= COOKIE_LIFETIME:
            self._secret, self._secret_time = self._randbytes(crypto.HASH_LEN), now
        (sender,) = _TYPE_WORD.unpack_from(message, 4)
        mac1_at = len(message) - _MACS_LEN
        mac1 = message[mac1_at : mac1_at + crypto.MAC_LEN]
        nonce = self._randbytes(crypto.XNONCE_LEN)
        sealed = crypto.xaead_seal(self._cookie_key, nonce, crypto.mac(self._secret, source), mac1)
        return MESSAGES[MESSAGE_COOKIE_REPLY].struct.pack(MESSAGE_COOKIE_REPLY, sender, nonce, sealed)


def consume_cookie_reply(peer: KnownPeer, message: bytes, now: float) -> None:
    """Store the cookie of a reply to our last handshake message to ``peer`` (found by its
    receiver index); the next message to ``peer`` carries a mac2 made with it."""
    _, _, nonce, sealed = _parse(message, MESSAGE_COOKIE_REPLY)
    peer.cookies.take_cookie(nonce, sealed, now)


# ---------------------------------------------------------------------------------------------
# Transport data


def pad16(packet: bytes, mtu: int | None = None) -> bytes:
    """``packet`` with zeros up to a multiple of 16 bytes, but never past ``mtu`` (when given)."""
    padded = -(-len(packet) // PADDING) * PADDING
    if mtu is not None:
        padded = max(len(packet), min(padded, mtu))
    return bytes(packet) + bytes(padded - len(packet))


def seal_transport(keypair: Keypair, counter: int, plaintext: bytes) -> bytes:
    """A transport data message carrying ``plaintext`` (empty: a keepalive) under ``counter``."""
    if not 0 <= counter <= MAX_COUNTER:
        raise ValueError(f"a counter is a 64-bit unsigned integer, not {counter}")
    header = TRANSPORT_HEADER.pack(MESSAGE_TRANSPORT, keypair.remote_index, counter)
    return header + keypair.send_cipher.seal(counter, plaintext)


def open_transport(keypair: Keypair, message: bytes) -> tuple[int, bytes]:
    """(counter, plaintext) of a transport message for ``keypair``; check the counter after."""
    _, receiver, counter = _parse(message, MESSAGE_TRANSPORT)
    if receiver != keypair.local_index:
        raise HandshakeError("transport data addressed to another keypair (receiver index)")
    try:
        plaintext = keypair.receive_cipher.open(counter, bytes(message[TRANSPORT_HEADER.size :]))
    except CryptoError:
        raise HandshakeError("transport data does not authenticate") from None
    return counter, plaintext
