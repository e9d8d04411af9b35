"""Unit tests for tether.engine.wireguard.crypto: WireGuard's primitives against published vectors.

Sources of the expected values (none computed by the code under test):
HChaCha20 - draft-irtf-cfrg-xchacha-03 section 2.2.1; XChaCha20-Poly1305 - the same draft, A.3.1;
X25519 - RFC 7748 sections 5.2 and 6.1; BLAKE2s-256 - RFC 7693 appendix B; the KDF - the three
vectors wireguard-go's device/kdf_test.go checks; HMAC - an RFC 2104 HMAC written out here over
hashlib's BLAKE2s; the small-order X25519 points - the seven u-coordinates (and their spellings
above p) that every X25519 implementation's low-order blacklist lists.
"""

from __future__ import annotations

import hashlib
import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.engine.wireguard import crypto
from tether.engine.wireguard.crypto import CryptoError

# ---------------------------------------------------------------------------------------------
# HChaCha20 and XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha-03)

XCHACHA_KEY = bytes(range(0x80, 0xA0))
XCHACHA_NONCE = bytes(range(0x40, 0x58))
XCHACHA_AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
XCHACHA_PLAINTEXT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future,"
    b" sunscreen would be it."
)
XCHACHA_CIPHERTEXT = bytes.fromhex(
    "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
    "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
    "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
    "21f9664c97637da9768812f615c68b13b52e"
)
XCHACHA_TAG = bytes.fromhex("c0875924c1c7987947deafd8780acf49")


def test_hchacha20_draft_vector() -> None:
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a0000000031415927")
    expected = "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"
    assert crypto.hchacha20(key, nonce).hex() == expected


def test_xchacha20_poly1305_draft_vector_seals() -> None:
    sealed = crypto.xaead_seal(XCHACHA_KEY, XCHACHA_NONCE, XCHACHA_PLAINTEXT, XCHACHA_AAD)
    assert sealed == XCHACHA_CIPHERTEXT + XCHACHA_TAG


def test_xchacha20_poly1305_draft_vector_opens() -> None:
    sealed = XCHACHA_CIPHERTEXT + XCHACHA_TAG
    assert crypto.xaead_open(XCHACHA_KEY, XCHACHA_NONCE, sealed, XCHACHA_AAD) == XCHACHA_PLAINTEXT


@pytest.mark.parametrize(
    "change",
    ["ciphertext", "tag", "aad", "nonce", "key"],
)
def test_xchacha20_poly1305_refuses_any_change(change: str) -> None:
    sealed, aad, nonce, key = XCHACHA_CIPHERTEXT + XCHACHA_TAG, XCHACHA_AAD, XCHACHA_NONCE, XCHACHA_KEY
    flip = {"ciphertext": 0, "tag": len(sealed) - 1}
    if change in flip:
        sealed = _flip(sealed, flip[change])
    elif change == "aad":
        aad = _flip(aad, 0)
    elif change == "nonce":
        nonce = _flip(nonce, 23)  # a byte past HChaCha20's part: the short nonce must be bound too
    else:
        key = _flip(key, 31)
    with pytest.raises(CryptoError):
        crypto.xaead_open(key, nonce, sealed, aad)


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 1]) + data[index + 1 :]


def test_xaead_refuses_wrong_nonce_length() -> None:
    with pytest.raises(ValueError):
        crypto.xaead_seal(XCHACHA_KEY, bytes(12), b"", b"")


# ---------------------------------------------------------------------------------------------
# AEAD with WireGuard's counter nonce


def test_counter_nonce_layout() -> None:
    # whitepaper 5.4.6: 32 bits of zeros followed by the 64-bit little-endian counter
    assert crypto.counter_nonce(0x0102030405060708) == bytes.fromhex("000000000807060504030201")
    assert crypto.counter_nonce(0) == bytes(12)


def test_aead_round_trip_and_tamper() -> None:
    key = bytes(range(32))
    sealed = crypto.aead_seal(key, 7, b"payload", b"hash")
    assert len(sealed) == len(b"payload") + crypto.TAG_LEN
    assert crypto.aead_open(key, 7, sealed, b"hash") == b"payload"
    for counter, data, associated in [(8, sealed, b"hash"), (7, _flip(sealed, 0), b"hash"), (7, sealed, b"hasi")]:
        with pytest.raises(CryptoError):
            crypto.aead_open(key, counter, data, associated)


def test_cipher_never_shows_its_key() -> None:
    key = bytes(range(100, 132))
    assert key.hex() not in repr(crypto.Cipher(key)) and repr(key) not in repr(crypto.Cipher(key))


# ---------------------------------------------------------------------------------------------
# HASH, MAC, HMAC, KDF


def test_blake2s_rfc7693_vector() -> None:
    expected = "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982"
    assert crypto.digest(b"abc").hex() == expected
    assert crypto.digest(b"a", b"", b"bc") == crypto.digest(b"abc")


def test_mac_is_keyed_blake2s_128() -> None:
    key = bytes(32)
    assert len(crypto.mac(key, b"x")) == crypto.MAC_LEN
    # BLAKE2's own keying (a key block), not a hash of key || data and not HMAC:
    assert crypto.mac(key, b"x") != hashlib.blake2s(key + b"x", digest_size=16).digest()
    assert crypto.mac(key, b"x") != crypto.mac(bytes(31) + b"\1", b"x")


def reference_hmac_blake2s(key: bytes, message: bytes) -> bytes:
    """RFC 2104, written out: H((K ^ opad) || H((K ^ ipad) || m)), a 64-byte block."""
    if len(key) > 64:
        key = hashlib.blake2s(key).digest()
    key = key.ljust(64, b"\0")
    inner = hashlib.blake2s(bytes(b ^ 0x36 for b in key) + message).digest()
    return hashlib.blake2s(bytes(b ^ 0x5C for b in key) + inner).digest()


@given(key=st.binary(max_size=100), message=st.binary(max_size=300))
def test_hmac_is_rfc2104_over_blake2s(key: bytes, message: bytes) -> None:
    assert crypto.hmac(key, message) == reference_hmac_blake2s(key, message)


KDF_VECTORS = [  # (key, input, t0, t1, t2), wireguard-go device/kdf_test.go
    (
        "746573742d6b6579",
        "746573742d696e707574",
        "6f0e5ad38daba1bea8a0d213688736f19763239305e0f58aba697f9ffc41c633",
        "df1194df20802a4fe594cde27e92991c8cae66c366e8106aaa937a55fa371e8a",
        "fac6e2745a325f5dc5d11a5b165aad08b0ada28e7b4e666b7c077934a4d76c24",
    ),
    (
        "776972656775617264",
        "776972656775617264",
        "491d43bbfdaa8750aaf535e334ecbfe5129967cd64635101c566d4caefda96e8",
        "1e71a379baefd8a79aa4662212fcafe19a23e2b609a3db7d6bcba8f560e3d25f",
        "31e1ae48bddfbe5de38f295e5452b1909a1b4e38e183926af3780b0c1e1f0160",
    ),
    (
        "",
        "",
        "8387b46bf43eccfcf349552a095d8315c4055beb90208fb1be23b894bc2ed5d0",
        "58a0e5f6faefccf4807bff1f05fa8a9217945762040bcec2f4b4a62bdfe0e86e",
        "0ce6ea98ec548f8e281e93e32db65621c45eb18dc6f0a7ad94178610a2f7338e",
    ),
]


@pytest.mark.parametrize("key, data, t0, t1, t2", KDF_VECTORS)
def test_kdf_vectors(key: str, data: str, t0: str, t1: str, t2: str) -> None:
    key_bytes, data_bytes = bytes.fromhex(key), bytes.fromhex(data)
    assert [t.hex() for t in crypto.kdf3(key_bytes, data_bytes)] == [t0, t1, t2]
    assert [t.hex() for t in crypto.kdf2(key_bytes, data_bytes)] == [t0, t1]
    assert crypto.kdf1(key_bytes, data_bytes).hex() == t0


@given(key=st.binary(max_size=64), data=st.binary(max_size=64))
def test_kdf_is_noise_hkdf(key: bytes, data: bytes) -> None:
    prk = reference_hmac_blake2s(key, data)
    t0 = reference_hmac_blake2s(prk, b"\x01")
    t1 = reference_hmac_blake2s(prk, t0 + b"\x02")
    t2 = reference_hmac_blake2s(prk, t1 + b"\x03")
    assert crypto.kdf3(key, data) == (t0, t1, t2)


def test_kdf_counts() -> None:
    for count in (0, 4):
        with pytest.raises(ValueError):
            crypto.kdf(b"", b"", count)


# ---------------------------------------------------------------------------------------------
# X25519 (RFC 7748)

ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_PRIVATE = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PUBLIC = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
BASE_POINT = bytes([9]) + bytes(31)

SMALL_ORDER_POINTS = [
    "0000000000000000000000000000000000000000000000000000000000000000",  # 0
    "0100000000000000000000000000000000000000000000000000000000000000",  # 1
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",  # order 8
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",  # order 8
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p - 1
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p (= 0)
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p + 1 (= 1)
    "0000000000000000000000000000000000000000000000000000000000000080",  # 0, top bit set
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b880",  # order 8, top bit set
]


def test_x25519_rfc7748_section_6_1() -> None:
    assert crypto.dh(ALICE_PRIVATE, BASE_POINT) == ALICE_PUBLIC
    assert crypto.dh(BOB_PRIVATE, BASE_POINT) == BOB_PUBLIC
    assert crypto.dh(ALICE_PRIVATE, BOB_PUBLIC) == SHARED
    assert crypto.dh(BOB_PRIVATE, ALICE_PUBLIC) == SHARED


def test_x25519_rfc7748_section_5_2() -> None:
    scalar = bytes.fromhex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
    u = bytes.fromhex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
    expected = "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"
    assert crypto.dh(scalar, u).hex() == expected


@pytest.mark.parametrize("point", SMALL_ORDER_POINTS)
def test_x25519_refuses_small_order_points(point: str) -> None:
    with pytest.raises(CryptoError):
        crypto.dh(ALICE_PRIVATE, bytes.fromhex(point))


def test_x25519_wrong_lengths() -> None:
    with pytest.raises(ValueError):
        crypto.dh(ALICE_PRIVATE[:31], BOB_PUBLIC)


# ---------------------------------------------------------------------------------------------
# TAI64N


def test_tai64n_epoch() -> None:
    assert crypto.tai64n(0) == bytes.fromhex("400000000000000a" "00000000")


def test_tai64n_whitens_nanoseconds() -> None:
    stamp = crypto.tai64n(1_700_000_000 * 10**9 + 123_456_789)
    assert stamp[:8] == ((1 << 62) + 10 + 1_700_000_000).to_bytes(8, "big")
    assert stamp[8:] == (7 << 24).to_bytes(4, "big")  # 123456789 rounded down to 7 * 2**24


@given(a=st.integers(0, 2**62), b=st.integers(0, 2**62))
def test_tai64n_orders_like_time(a: int, b: int) -> None:
    # byte order is time order, at the whitened resolution (whole seconds, 2**24 ns steps)
    def resolution(ns: int) -> tuple[int, int]:
        return ns // 10**9, (ns % 10**9) >> 24

    assert (crypto.tai64n(a) < crypto.tai64n(b)) == (resolution(a) < resolution(b))
    assert (crypto.tai64n(a) == crypto.tai64n(b)) == (resolution(a) == resolution(b))


def test_tai64n_default_is_now() -> None:
    assert len(crypto.tai64n()) == crypto.TIMESTAMP_LEN
    assert crypto.tai64n() >= crypto.tai64n(0)


def test_seal_messages_is_header_counter_and_seal_for_consecutive_counters():
    cipher = crypto.Cipher(os.urandom(32))
    header = struct.pack("<II", 4, 0x01020304)
    plaintexts = [b"", b"x" * 16, os.urandom(1420)]
    first = 2**64 - 3  # the last three counters a key may use
    messages = cipher.seal_messages(header, first, plaintexts)
    assert len(messages) == 3
    for offset, (message, plaintext) in enumerate(zip(messages, plaintexts)):
        counter = first + offset
        assert message == header + struct.pack("<Q", counter) + cipher.seal(counter, plaintext)
        assert cipher.open(counter, message[16:]) == plaintext
    assert cipher.seal_messages(header, 0, []) == []
