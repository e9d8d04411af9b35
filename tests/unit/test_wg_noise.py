"""Unit tests for tether.engine.wireguard.noise: the handshake, cookies and transport framing.

Two of our own instances talk to each other here, with deterministic keys, ephemerals, timestamps,
clocks and cookie randomness, so every case is reproducible.  (That the bytes are also right for
the rest of the world is checked against wireguard-go: initiator, responder and cookie paths, with
and without a preshared key; see the report that introduced this file.)  Hypothesis checks the
robustness property: whatever bytes arrive, the only exception is HandshakeError.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.engine.wireguard import crypto, noise
from tether.engine.wireguard.noise import (
    CookieChecker,
    HandshakeError,
    KnownPeer,
    PeerKeys,
    StaticIdentity,
)
from tether.engine.wireguard.keys import public_key

ALICE_SOURCE = noise.address_bytes("192.0.2.10", 51820)  # where the initiator's packets come from
T0 = 1000.0  # the monotonic clock at the start of each test


def key(label: str) -> bytes:
    return crypto.digest(label.encode())


def stamp(seconds: int) -> bytes:
    return crypto.tai64n(1_700_000_000_000_000_000 + seconds * 10**9)


class Pair:
    """Alice (initiator) and Bob (responder), each knowing the other as a peer."""

    def __init__(self, alice_psk: bytes = bytes(32), bob_psk: bytes = bytes(32)) -> None:
        self.alice = StaticIdentity(key("alice static"))
        self.bob = StaticIdentity(key("bob static"))
        self.bob_at_alice = KnownPeer(PeerKeys(self.bob.public_key, alice_psk))
        self.alice_at_bob = KnownPeer(PeerKeys(self.alice.public_key, bob_psk))
        self.next_second = 0

    def lookup(self, static: bytes) -> KnownPeer | None:
        return self.alice_at_bob if static == self.alice.public_key else None

    def initiation(self, now: float = T0, seconds: int | None = None, index: int = 0x0A0A0A0A):
        if seconds is None:
            seconds, self.next_second = self.next_second, self.next_second + 1
        return noise.create_initiation(
            self.alice, self.bob_at_alice, index, now, ephemeral=key(f"alice eph {seconds}"), timestamp=stamp(seconds)
        )

    def consume(self, message: bytes, now: float = T0):
        return noise.consume_initiation(self.bob, message, self.lookup, now)

    def handshake(self, now: float = T0) -> tuple[noise.Keypair, noise.Keypair]:
        message, alice_state = self.initiation(now)
        _, bob_state = self.consume(message, now)
        response, bob_keys = noise.create_response(bob_state, 0x0B0B0B0B, now, ephemeral=key("bob eph"))
        return noise.consume_response(alice_state, response, now), bob_keys


# ---------------------------------------------------------------------------------------------
# The handshake


def test_full_handshake_keys_match_and_transport_flows_both_ways() -> None:
    alice_keys, bob_keys = Pair().handshake()
    assert alice_keys.send_key == bob_keys.receive_key and alice_keys.receive_key == bob_keys.send_key
    assert alice_keys.send_key != alice_keys.receive_key
    assert (alice_keys.local_index, alice_keys.remote_index) == (0x0A0A0A0A, 0x0B0B0B0B)
    assert (bob_keys.local_index, bob_keys.remote_index) == (0x0B0B0B0B, 0x0A0A0A0A)
    assert alice_keys.is_initiator and not bob_keys.is_initiator
    assert alice_keys.created == bob_keys.created == T0
    to_bob = noise.seal_transport(alice_keys, 0, b"ping")
    assert noise.open_transport(bob_keys, to_bob) == (0, b"ping")
    to_alice = noise.seal_transport(bob_keys, 5, noise.pad16(b"pong"))
    assert noise.open_transport(alice_keys, to_alice) == (5, b"pong" + bytes(12))


def test_messages_have_the_wire_sizes_and_fields() -> None:
    pair = Pair()
    message, alice_state = pair.initiation()
    assert len(message) == 148 and message[:4] == b"\x01\0\0\0"
    assert struct.unpack_from("<I", message, 4)[0] == 0x0A0A0A0A
    assert message[8:40] == public_key(key("alice eph 0"))  # the ephemeral travels in clear
    assert message[-16:] == bytes(16)  # no cookie yet: mac2 is zeros
    _, bob_state = pair.consume(message)
    response, _ = noise.create_response(bob_state, 0x0B0B0B0B, T0, ephemeral=key("bob eph"))
    assert len(response) == 92 and response[:4] == b"\x02\0\0\0"
    assert noise.message_type(response) == noise.MESSAGE_RESPONSE
    assert noise.receiver_index(response) == 0x0A0A0A0A
    alice_keys = noise.consume_response(alice_state, response, T0)
    keepalive = noise.seal_transport(alice_keys, 3, b"")
    assert len(keepalive) == noise.KEEPALIVE_LEN == 32
    assert noise.receiver_index(keepalive) == 0x0B0B0B0B
    assert keepalive[8:16] == (3).to_bytes(8, "little")


def test_the_handshake_is_a_pure_function_of_its_inputs() -> None:
    first, second = Pair().handshake(), Pair().handshake()
    assert first[0].send_key == second[0].send_key and first[1].send_key == second[1].send_key
    assert Pair().initiation()[0] == Pair().initiation()[0]


def test_different_ephemerals_give_different_keys() -> None:
    pair = Pair()
    first, _ = pair.handshake()
    second, _ = pair.handshake(T0 + 1)  # the next initiation uses the next ephemeral
    assert first.send_key != second.send_key


def test_preshared_key_on_both_sides() -> None:
    psk = key("psk")
    with_psk, bob_keys = Pair(psk, psk).handshake()
    without_psk, _ = Pair().handshake()
    assert with_psk.send_key == bob_keys.receive_key
    assert with_psk.send_key != without_psk.send_key  # same ephemerals: only the psk differs


@pytest.mark.parametrize("alice_psk, bob_psk", [(key("psk"), bytes(32)), (bytes(32), key("psk"))])
def test_preshared_key_on_one_side_only_fails_at_the_response(alice_psk: bytes, bob_psk: bytes) -> None:
    pair = Pair(alice_psk, bob_psk)
    message, alice_state = pair.initiation()
    _, bob_state = pair.consume(message)  # the psk is not in message 1 (psk2: mixed in message 2)
    response, _ = noise.create_response(bob_state, 1, T0)
    with pytest.raises(HandshakeError, match="response does not authenticate"):
        noise.consume_response(alice_state, response, T0)


def test_wrong_responder_static_key_means_no_handshake() -> None:
    pair = Pair()
    impostor = StaticIdentity(key("mallory static"))
    message, _ = pair.initiation()  # addressed to bob's public key
    with pytest.raises(HandshakeError, match="mac1"):
        noise.consume_initiation(impostor, message, pair.lookup, T0)


def test_wrong_responder_static_key_with_a_matching_mac1_still_fails() -> None:
    # An attacker who knows bob's *public* key can make mac1 right, but not open the static key.
    pair = Pair()
    impostor = StaticIdentity(key("mallory static"))
    message, _ = pair.initiation()
    forged = noise.CookieJar(impostor.public_key).add_macs(message[:-32], T0)
    with pytest.raises(HandshakeError, match="static key does not authenticate"):
        noise.consume_initiation(impostor, forged, pair.lookup, T0)


def test_unknown_initiator_is_refused() -> None:
    pair = Pair()
    message, _ = pair.initiation()
    with pytest.raises(HandshakeError, match="not one of our peers"):
        noise.consume_initiation(pair.bob, message, lambda static: None, T0)


def test_responder_with_a_wrong_key_for_the_initiator_fails() -> None:
    # bob's config holds the right name but another public key for alice: ss differs
    pair = Pair()
    wrong = KnownPeer(PeerKeys(StaticIdentity(key("carol static")).public_key))
    message, _ = pair.initiation()
    with pytest.raises(HandshakeError, match="timestamp does not authenticate"):
        noise.consume_initiation(pair.bob, message, lambda static: wrong, T0)


def test_bad_mac1_is_refused_before_any_diffie_hellman(monkeypatch: pytest.MonkeyPatch) -> None:
    pair = Pair()
    message, _ = pair.initiation()
    calls = []
    monkeypatch.setattr(noise, "dh", lambda *args: calls.append(args) or crypto.dh(*args))
    with pytest.raises(HandshakeError, match="mac1"):
        pair.consume(message[:20] + bytes([message[20] ^ 1]) + message[21:])
    assert calls == []
    pair.consume(message)
    assert len(calls) == 2  # es and ss: the work that mac1 protects


def test_replayed_initiation_is_refused() -> None:
    pair = Pair()
    message, _ = pair.initiation(seconds=10)
    pair.consume(message)
    with pytest.raises(HandshakeError, match="replayed"):
        pair.consume(message, T0 + 5)


def test_older_or_equal_timestamp_is_refused_and_newer_accepted() -> None:
    pair = Pair()
    pair.consume(pair.initiation(seconds=10)[0])
    for seconds in (9, 10):
        with pytest.raises(HandshakeError, match="replayed"):
            pair.consume(pair.initiation(seconds=seconds)[0], T0 + 1)
    assert pair.alice_at_bob.greatest_timestamp == stamp(10)  # refusals change nothing
    pair.consume(pair.initiation(seconds=11)[0], T0 + 1)
    assert pair.alice_at_bob.greatest_timestamp == stamp(11)


def test_initiation_flood_is_refused() -> None:
    pair = Pair()
    pair.consume(pair.initiation(seconds=1)[0], T0)
    with pytest.raises(HandshakeError, match="flood"):
        pair.consume(pair.initiation(seconds=2)[0], T0 + 0.019)
    pair.consume(pair.initiation(seconds=3)[0], T0 + 0.021)


def test_response_must_match_our_handshake() -> None:
    pair = Pair()
    message, alice_state = pair.initiation(index=1)
    _, bob_state = pair.consume(message)
    response, _ = noise.create_response(bob_state, 2, T0)
    _, other_state = pair.initiation(T0 + 1, index=3)  # a later handshake of alice's
    with pytest.raises(HandshakeError, match="receiver index"):
        noise.consume_response(other_state, response, T0)
    noise.consume_response(alice_state, response, T0)
    with pytest.raises(HandshakeError, match="already complete"):
        noise.consume_response(alice_state, response, T0)


def test_a_failed_response_leaves_the_handshake_usable() -> None:
    pair = Pair()
    message, alice_state = pair.initiation()
    _, bob_state = pair.consume(message)
    response, bob_keys = noise.create_response(bob_state, 2, T0)
    forged = response[:40] + bytes([response[40] ^ 1]) + response[41:]
    forged = noise.CookieJar(pair.alice.public_key).add_macs(forged[:-32], T0)  # right mac1, bad body
    with pytest.raises(HandshakeError):
        noise.consume_response(alice_state, forged, T0)
    assert noise.consume_response(alice_state, response, T0).send_key == bob_keys.receive_key


def test_misuse_is_a_runtime_error() -> None:
    pair = Pair()
    message, alice_state = pair.initiation()
    _, bob_state = pair.consume(message)
    with pytest.raises(RuntimeError):
        noise.create_response(alice_state, 1, T0)
    response, _ = noise.create_response(bob_state, 1, T0)
    with pytest.raises(RuntimeError):
        noise.create_response(bob_state, 1, T0)  # a responder answers once
    with pytest.raises(RuntimeError):
        noise.consume_response(bob_state, response, T0)
    with pytest.raises(ValueError):
        noise.create_initiation(pair.alice, pair.bob_at_alice, 2**32, T0)
    with pytest.raises(ValueError):
        noise.create_initiation(pair.alice, pair.bob_at_alice, 1, T0, timestamp=bytes(8))
    with pytest.raises(ValueError):
        PeerKeys(bytes(31))


def test_keys_never_appear_in_reprs() -> None:
    pair = Pair(key("psk"), key("psk"))
    message, alice_state = pair.initiation()
    _, bob_state = pair.consume(message)
    alice_keys, _ = pair.handshake(T0 + 1)
    secrets = [key("alice static"), key("psk"), alice_keys.send_key, alice_keys.receive_key,
               alice_state.chaining_key, key("alice eph 0")]  # fmt: skip
    shown = " ".join(map(repr, [pair.alice, pair.bob_at_alice, pair.bob_at_alice.keys, alice_state, bob_state,
                                alice_keys, CookieChecker(pair.bob)]))  # fmt: skip
    for secret in secrets:
        assert secret.hex() not in shown and repr(secret) not in shown


# ---------------------------------------------------------------------------------------------
# Small-order public keys


ORDER_8_POINT = "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"


@pytest.mark.parametrize("point", ["00" * 32, "01" + "00" * 31, ORDER_8_POINT])
def test_small_order_peer_key_is_refused_by_the_initiator(point: str) -> None:
    pair = Pair()
    bad = KnownPeer(PeerKeys(bytes.fromhex(point)))
    with pytest.raises(HandshakeError, match="small-order"):
        noise.create_initiation(pair.alice, bad, 1, T0)


def test_small_order_ephemeral_in_an_initiation_is_refused() -> None:
    pair = Pair()
    body = struct.pack("<II32s48s28s", 1, 7, bytes(32), bytes(48), bytes(28))
    message = noise.CookieJar(pair.bob.public_key).add_macs(body, T0)  # a valid mac1
    with pytest.raises(HandshakeError, match="small-order"):
        pair.consume(message)


def test_small_order_ephemeral_in_a_response_is_refused() -> None:
    pair = Pair()
    _, alice_state = pair.initiation(index=5)
    body = struct.pack("<III32s16s", 2, 9, 5, bytes.fromhex("01" + "00" * 31), bytes(16))
    response = noise.CookieJar(pair.alice.public_key).add_macs(body, T0)
    with pytest.raises(HandshakeError, match="small-order"):
        noise.consume_response(alice_state, response, T0)


def test_small_order_initiator_static_is_refused() -> None:
    pair = Pair()
    message, _ = pair.initiation()
    bad = KnownPeer(PeerKeys(bytes(32)))  # a responder configured with a small-order peer key
    with pytest.raises(HandshakeError, match="small-order"):
        noise.consume_initiation(pair.bob, message, lambda static: bad, T0)


# ---------------------------------------------------------------------------------------------
# Cookies


def counting_random():
    counter = itertools.count()
    return lambda n: crypto.digest(b"random", next(counter).to_bytes(8, "little"))[:n].ljust(n, b"r")


def test_cookie_path_end_to_end() -> None:
    pair = Pair()
    checker = CookieChecker(pair.bob, counting_random())
    message, _ = pair.initiation(T0)
    # bob is under load: mac1 is fine, mac2 is not, so he answers with a cookie instead of DH
    assert checker.check_mac1(message) and not checker.check_mac2(message, ALICE_SOURCE, T0)
    reply = checker.create_cookie_reply(message, ALICE_SOURCE, T0)
    assert len(reply) == 64 and noise.message_type(reply) == noise.MESSAGE_COOKIE_REPLY
    assert noise.receiver_index(reply) == 0x0A0A0A0A
    noise.consume_cookie_reply(pair.bob_at_alice, reply, T0 + 0.1)
    assert pair.bob_at_alice.cookies.has_fresh_cookie(T0 + 0.1)
    retry, alice_state = pair.initiation(T0 + 1)
    assert retry[-16:] != bytes(16)
    assert checker.check_mac1(retry) and checker.check_mac2(retry, ALICE_SOURCE, T0 + 1)
    _, bob_state = pair.consume(retry, T0 + 1)
    response, bob_keys = noise.create_response(bob_state, 0x0B0B0B0B, T0 + 1)
    assert noise.consume_response(alice_state, response, T0 + 1).send_key == bob_keys.receive_key


def test_mac2_is_bound_to_the_source_address() -> None:
    pair = Pair()
    checker = CookieChecker(pair.bob, counting_random())
    message, _ = pair.initiation()
    noise.consume_cookie_reply(pair.bob_at_alice, checker.create_cookie_reply(message, ALICE_SOURCE, T0), T0)
    retry, _ = pair.initiation(T0 + 1)
    assert checker.check_mac2(retry, ALICE_SOURCE, T0 + 1)
    assert not checker.check_mac2(retry, noise.address_bytes("192.0.2.10", 51821), T0 + 1)
    assert not checker.check_mac2(retry, noise.address_bytes("2001:db8::10", 51820), T0 + 1)


def test_cookie_expires_and_the_secret_rotates() -> None:
    pair = Pair()
    checker = CookieChecker(pair.bob, counting_random())
    message, _ = pair.initiation()
    noise.consume_cookie_reply(pair.bob_at_alice, checker.create_cookie_reply(message, ALICE_SOURCE, T0), T0)
    retry, _ = pair.initiation(T0 + 119)
    assert retry[-16:] != bytes(16) and checker.check_mac2(retry, ALICE_SOURCE, T0 + 119)
    late, _ = pair.initiation(T0 + 120)  # alice's cookie is too old to use
    assert late[-16:] == bytes(16)
    assert not checker.check_mac2(retry, ALICE_SOURCE, T0 + 120)  # and bob's secret is too old to check
    fresh = checker.create_cookie_reply(late, ALICE_SOURCE, T0 + 120)  # a new secret
    noise.consume_cookie_reply(pair.bob_at_alice, fresh, T0 + 120)
    again, _ = pair.initiation(T0 + 121)
    assert checker.check_mac2(again, ALICE_SOURCE, T0 + 121)
    assert not checker.check_mac2(retry, ALICE_SOURCE, T0 + 121)  # made with the old secret's cookie


def test_cookie_reply_is_bound_to_our_last_mac1_and_used_once() -> None:
    pair = Pair()
    checker = CookieChecker(pair.bob, counting_random())
    first, _ = pair.initiation()
    reply = checker.create_cookie_reply(first, ALICE_SOURCE, T0)
    pair.initiation(T0 + 1)  # alice sent another message since: the reply answers a stale mac1
    with pytest.raises(HandshakeError, match="cookie reply does not authenticate"):
        noise.consume_cookie_reply(pair.bob_at_alice, reply, T0 + 1)
    second, _ = pair.initiation(T0 + 2)
    reply = checker.create_cookie_reply(second, ALICE_SOURCE, T0 + 2)
    noise.consume_cookie_reply(pair.bob_at_alice, reply, T0 + 2)
    with pytest.raises(HandshakeError, match="no handshake message"):
        noise.consume_cookie_reply(pair.bob_at_alice, reply, T0 + 2)


def test_unsolicited_or_forged_cookie_reply_is_refused() -> None:
    pair = Pair()
    checker = CookieChecker(pair.bob, counting_random())
    message, _ = pair.initiation()
    stranger = KnownPeer(PeerKeys(pair.bob.public_key))  # never sent anything
    reply = checker.create_cookie_reply(message, ALICE_SOURCE, T0)
    with pytest.raises(HandshakeError, match="no handshake message"):
        noise.consume_cookie_reply(stranger, reply, T0)
    with pytest.raises(HandshakeError, match="does not authenticate"):
        noise.consume_cookie_reply(pair.bob_at_alice, reply[:-1] + bytes([reply[-1] ^ 1]), T0)
    nonce, mac1 = bytes(24), message[-32:-16]  # right mac1, but not sealed under bob's cookie key
    forged = struct.pack("<II24s32s", 3, 0x0A0A0A0A, nonce, crypto.xaead_seal(key("wrong"), nonce, bytes(16), mac1))
    with pytest.raises(HandshakeError, match="does not authenticate"):
        noise.consume_cookie_reply(pair.bob_at_alice, forged, T0)


def test_cookie_reply_only_for_a_valid_mac1() -> None:
    pair = Pair()
    checker = CookieChecker(pair.bob, counting_random())
    message, _ = pair.initiation()
    with pytest.raises(HandshakeError, match="mac1"):
        checker.create_cookie_reply(message[:-20] + bytes(20), ALICE_SOURCE, T0)
    assert not checker.check_mac1(message[:-20] + bytes(20))


def test_responses_carry_mac2_too() -> None:
    # the responder may hold a cookie from the initiator (who was under load earlier)
    pair = Pair()
    alice_checker = CookieChecker(pair.alice, counting_random())
    message, alice_state = pair.initiation()
    _, bob_state = pair.consume(message)
    response, _ = noise.create_response(bob_state, 2, T0)
    cookie_reply = alice_checker.create_cookie_reply(response, noise.address_bytes("198.51.100.7", 51820), T0)
    assert noise.receiver_index(cookie_reply) == 2
    noise.consume_cookie_reply(pair.alice_at_bob, cookie_reply, T0)
    message, alice_state = pair.initiation(T0 + 1)
    _, bob_state = pair.consume(message, T0 + 1)
    response, _ = noise.create_response(bob_state, 3, T0 + 1)
    assert alice_checker.check_mac2(response, noise.address_bytes("198.51.100.7", 51820), T0 + 1)
    noise.consume_response(alice_state, response, T0 + 1)


def test_address_bytes() -> None:
    assert noise.address_bytes("192.0.2.1", 0x1234) == bytes([192, 0, 2, 1, 0x12, 0x34])
    assert noise.address_bytes("fe80::1%eth0", 1) == bytes.fromhex("fe800000000000000000000000000001") + b"\0\1"


# ---------------------------------------------------------------------------------------------
# Transport


def test_pad16() -> None:
    assert [len(noise.pad16(bytes(n))) for n in (0, 1, 15, 16, 17, 1419)] == [0, 16, 16, 16, 32, 1424]
    assert noise.pad16(b"ab") == b"ab" + bytes(14)
    assert len(noise.pad16(bytes(1419), mtu=1420)) == 1420  # never past the MTU
    assert len(noise.pad16(bytes(1421), mtu=1420)) == 1421  # nor shorter than the packet


def test_transport_counters_and_limits() -> None:
    alice_keys, bob_keys = Pair().handshake()
    top = noise.MAX_COUNTER
    assert noise.open_transport(bob_keys, noise.seal_transport(alice_keys, top, b"x")) == (top, b"x")
    for bad in (-1, top + 1):
        with pytest.raises(ValueError):
            noise.seal_transport(alice_keys, bad, b"x")


def test_transport_refuses_tampering_and_strangers() -> None:
    alice_keys, bob_keys = Pair().handshake()
    packet = noise.seal_transport(alice_keys, 1, b"data")
    with pytest.raises(HandshakeError, match="receiver index"):
        noise.open_transport(alice_keys, packet)  # addressed to bob's index
    with pytest.raises(HandshakeError, match="does not authenticate"):
        noise.open_transport(bob_keys, packet[:8] + (2).to_bytes(8, "little") + packet[16:])  # counter changed
    for index in range(16, len(packet)):
        with pytest.raises(HandshakeError, match="does not authenticate"):
            noise.open_transport(bob_keys, packet[:index] + bytes([packet[index] ^ 0x80]) + packet[index + 1 :])
    other_keys, _ = Pair().handshake(T0 + 1)
    with pytest.raises(HandshakeError):
        noise.open_transport(other_keys, packet)


# ---------------------------------------------------------------------------------------------
# Malformed and truncated messages of every type


def sample_messages() -> dict[str, tuple[bytes, object]]:
    """One valid message of each type, and a function that consumes it as a device would.

    Each call works on a copy of the receiving side's state, so that calls are independent: a
    message that is accepted once does not make the next one fail for another reason.
    """
    pair = Pair()
    checker = CookieChecker(pair.bob, counting_random())
    initiation, alice_state = pair.initiation()
    _, bob_state = pair.consume(initiation)
    response, bob_keys = noise.create_response(bob_state, 0x0B0B0B0B, T0)
    alice_keys = noise.consume_response(dataclasses.replace(alice_state), response, T0)
    cookie_reply = checker.create_cookie_reply(initiation, ALICE_SOURCE, T0)
    return {
        "initiation": (initiation, lambda data: Pair().consume(data)),
        "response": (response, lambda data: noise.consume_response(dataclasses.replace(alice_state), data, T0)),
        "cookie reply": (cookie_reply, lambda data: noise.consume_cookie_reply(
            copy.deepcopy(pair.bob_at_alice), data, T0)),
        "transport": (noise.seal_transport(bob_keys, 0, b"hello"), lambda data: noise.open_transport(alice_keys, data)),
    }  # fmt: skip


SAMPLES = sample_messages()
KINDS = list(SAMPLES)


@pytest.mark.parametrize("kind", KINDS)
def test_the_samples_are_accepted(kind: str) -> None:
    message, consume = SAMPLES[kind]
    consume(message)  # so each refusal below is caused by the change made to the message


@pytest.mark.parametrize("kind", KINDS)
def test_every_truncation_is_refused(kind: str) -> None:
    message, consume = SAMPLES[kind]
    for length in range(len(message)):
        with pytest.raises(HandshakeError):
            consume(message[:length])
        if kind != "transport" or length < noise.KEEPALIVE_LEN:
            with pytest.raises(HandshakeError):
                noise.message_type(message[:length])


@pytest.mark.parametrize("kind", ["initiation", "response", "cookie reply"])
def test_handshake_messages_with_extra_bytes_are_refused(kind: str) -> None:
    message, consume = SAMPLES[kind]
    with pytest.raises(HandshakeError, match="bytes, expected"):
        consume(message + b"\0")


@pytest.mark.parametrize("kind", KINDS)
def test_nonzero_reserved_bytes_or_another_type_are_refused(kind: str) -> None:
    message, consume = SAMPLES[kind]
    for position in (1, 2, 3):
        with pytest.raises(HandshakeError, match="not a"):
            consume(message[:position] + b"\1" + message[position + 1 :])
    for other in (0, 1, 2, 3, 4, 5, 255):
        if other != message[0]:
            with pytest.raises(HandshakeError, match="not a"):
                consume(bytes([other]) + message[1:])


# Bytes no receiver can check: mac2 is checked only under load (by CookieChecker), and a cookie
# reply's receiver index is the caller's lookup key (a wrong one finds another peer, or none).
UNCHECKED = {"initiation": range(132, 148), "response": range(76, 92), "cookie reply": range(4, 8), "transport": ()}


@pytest.mark.parametrize("kind", KINDS)
def test_every_bit_flip_is_refused(kind: str) -> None:
    message, consume = SAMPLES[kind]
    for bit in range(len(message) * 8):
        index, mask = divmod(bit, 8)
        if index in UNCHECKED[kind]:
            continue
        with pytest.raises(HandshakeError):
            consume(message[:index] + bytes([message[index] ^ (1 << mask)]) + message[index + 1 :])


def test_message_type_table() -> None:
    expected = {"initiation": 1, "response": 2, "cookie reply": 3, "transport": 4}
    for kind, (message, _) in SAMPLES.items():
        assert noise.message_type(message) == expected[kind]
    for layout in noise.MESSAGES.values():  # the table's sizes and its structs agree
        assert layout.minimum == layout.struct.size + (0 if layout.exact else crypto.TAG_LEN)
    with pytest.raises(HandshakeError, match="unknown message type"):
        noise.message_type(b"\x05\0\0\0" + bytes(100))
    with pytest.raises(HandshakeError, match="no receiver index"):
        noise.receiver_index(SAMPLES["initiation"][0])
    with pytest.raises(HandshakeError, match="carries no mac1"):
        CookieChecker(Pair().bob).check_mac1(SAMPLES["transport"][0])


STATIC_PAIR = Pair()
STATIC_CHECKER = CookieChecker(STATIC_PAIR.bob, counting_random())
_, STATIC_ALICE_STATE = STATIC_PAIR.initiation()
STATIC_KEYS, _ = Pair().handshake()


def everything_that_reads_bytes(data: bytes) -> None:
    """Feed ``data`` to every entry point that takes a message from the network."""
    fresh = Pair()
    entry_points = [
        noise.message_type,
        noise.receiver_index,
        lambda d: fresh.consume(d),
        lambda d: noise.consume_response(dataclasses.replace(STATIC_ALICE_STATE), d, T0),
        lambda d: noise.consume_cookie_reply(fresh.bob_at_alice, d, T0),
        lambda d: noise.open_transport(STATIC_KEYS, d),
        STATIC_CHECKER.check_mac1,
        lambda d: STATIC_CHECKER.check_mac2(d, ALICE_SOURCE, T0),
        lambda d: STATIC_CHECKER.create_cookie_reply(d, ALICE_SOURCE, T0),
    ]
    for entry_point in entry_points:
        try:
            entry_point(data)
        except HandshakeError:
            pass


def with_type_and_size(kind: int, size: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=size - 4, max_size=size - 4).map(lambda body: struct.pack("<I", kind) + body)


def with_valid_mac1(kind: int, size: int, receiver_public: bytes, receiver: bytes = b"") -> st.SearchStrategy[bytes]:
    """Random fields behind a correct type, size, receiver index and mac1: past the cheap checks, into
    DH and AEAD."""
    jar = noise.CookieJar(receiver_public)
    at = 8 if kind == noise.MESSAGE_RESPONSE else 4
    return with_type_and_size(kind, size).map(
        lambda data: jar.add_macs(data[:at] + receiver + data[at + len(receiver) : -32], T0)
    )


ANY_MESSAGE = st.one_of(
    st.binary(max_size=200),
    with_type_and_size(1, 148),
    with_type_and_size(2, 92),
    with_type_and_size(3, 64),
    st.integers(32, 200).flatmap(lambda size: with_type_and_size(4, size)),
    with_valid_mac1(1, 148, STATIC_PAIR.bob.public_key),
    with_valid_mac1(2, 92, STATIC_PAIR.alice.public_key, struct.pack("<I", STATIC_ALICE_STATE.local_index)),
)


@given(ANY_MESSAGE)
def test_arbitrary_bytes_raise_nothing_but_handshake_error(data: bytes) -> None:
    everything_that_reads_bytes(data)


@given(st.sampled_from(KINDS), st.data())
def test_mutated_messages_raise_nothing_but_handshake_error(kind: str, data: st.DataObject) -> None:
    message, consume = SAMPLES[kind]
    start = data.draw(st.integers(0, len(message)))
    end = data.draw(st.integers(start, len(message)))
    replacement = data.draw(st.binary(max_size=40))
    mutated = message[:start] + replacement + message[end:]
    try:
        consume(mutated)
    except HandshakeError:
        pass
    everything_that_reads_bytes(mutated)
