"""WireGuard's cryptographic primitives, named as the whitepaper names them (sans-IO).

Rules of this file: pure functions of bytes, no state, no sockets; the one clock read
(``tai64n`` without an argument) can be replaced by passing the time.  Everything the handshake
(``noise.py``) computes is built from the functions here, so each primitive is written once, has
a test vector, and the handshake reads like section 5.4 of the whitepaper ("WireGuard: Next
Generation Kernel Network Tunnel", J. A. Donenfeld).

Theory of operation
-------------------
WireGuard does not negotiate: one suite, ``Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s``, so each
primitive below has exactly one meaning.

* ``digest`` is HASH: BLAKE2s with a 32-byte output.  ``mac`` is MAC: *keyed* BLAKE2s with a
  16-byte output (BLAKE2's own keying, not HMAC), used for mac1/mac2 and for cookies.
* ``hmac`` is HMAC-BLAKE2s as in RFC 2104 (BLAKE2s's block is 64 bytes, its output 32); the
  whitepaper defines it that way on purpose, since Noise's HKDF needs an HMAC and BLAKE2's keyed
  mode is not one.  ``kdf`` is Noise's HKDF: ``t0 = HMAC(key, input)``, ``t1 = HMAC(t0, 0x1)``,
  ``t(i) = HMAC(t0, t(i-1) || i)``; ``kdf1``..``kdf3`` return the first 1..3 outputs.
* ``Cipher`` is AEAD: ChaCha20-Poly1305 (RFC 8439) under one key, with WireGuard's 96-bit nonce
  = 4 zero bytes || the 64-bit counter, little-endian.  A ``Cipher`` keeps the ``cryptography``
  context, so the transport path builds it once per key, not once per packet.
* ``xaead_seal``/``xaead_open`` are XAEAD: XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha), used only
  to encrypt cookies under a random 24-byte nonce.  ``cryptography`` has no XChaCha, so it is
  built here the standard way: ``hchacha20(key, nonce[:16])`` derives a subkey, and the AEAD runs
  under that subkey with the nonce 4 zero bytes || ``nonce[16:]``.  HChaCha20 is the one primitive
  written out in this file, in plain Python: it runs once per cookie reply, never per packet.
* ``dh`` is DH: X25519 (RFC 7748).  A public key of small order (the identity, points of order
  2, 4, 8, and their non-canonical spellings) makes the shared secret all zeros whatever the
  private key, which would let an attacker fix the handshake's secrets; such a result is refused
  (``CryptoError``), as the whitepaper and every WireGuard implementation require.  OpenSSL already
  refuses it; the check here does not depend on that.
* ``tai64n`` is TIMESTAMP: 8 bytes big-endian of 2^62 + 10 + Unix seconds (the TAI64 label; TAI
  ran 10 s ahead of UTC in 1970) and 4 bytes big-endian of nanoseconds.  The nanoseconds are
  rounded down to a multiple of 2^24 (about 16.8 ms), as wireguard-go and Linux do, so that a
  handshake does not reveal the sender's clock more finely than the responder's flood limit (one
  initiation per peer per 20 ms) needs.  Byte order makes timestamps compare as byte strings.

Errors: a failed authentication or a refused DH raises ``CryptoError``; the handshake turns it
into its own error with a reason.  Wrong argument lengths are the caller's bug (``ValueError``).
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
import struct
import time
from collections.abc import Iterable
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

KEY_LEN: Final = 32  # every key: X25519 private/public, ChaCha20 key, PSK, chaining key
HASH_LEN: Final = 32  # HASH, HMAC and KDF outputs
MAC_LEN: Final = 16  # MAC (mac1, mac2, cookie)
TAG_LEN: Final = 16  # Poly1305 tag appended by AEAD and XAEAD
XNONCE_LEN: Final = 24  # XAEAD nonce
TIMESTAMP_LEN: Final = 12  # TAI64N
TAI64_BASE: Final = (1 << 62) + 10  # TAI64 label of the Unix epoch
TIMESTAMP_WHITENING: Final = (1 << 24) - 1  # nanosecond bits cleared in a timestamp
_NONCE_PREFIX: Final = bytes(4)
_COUNTER: Final = struct.Struct("<Q")
_BLOCK: Final = 64  # BLAKE2s block size, the HMAC pad length


class CryptoError(Exception):
    """An AEAD did not authenticate, or a Diffie-Hellman result was refused."""


# ---------------------------------------------------------------------------------------------
# HASH, MAC, HMAC, KDF


def digest(*parts: bytes) -> bytes:
    """HASH(parts concatenated): BLAKE2s-256."""
    state = hashlib.blake2s()
    for part in parts:
        state.update(part)
    return state.digest()


def mac(key: bytes, *parts: bytes) -> bytes:
    """MAC(key, parts concatenated): keyed BLAKE2s with a 16-byte output."""
    state = hashlib.blake2s(key=key, digest_size=MAC_LEN)
    for part in parts:
        state.update(part)
    return state.digest()


def hmac(key: bytes, *parts: bytes) -> bytes:
    """HMAC(key, parts concatenated): RFC 2104 HMAC over BLAKE2s-256."""
    state = _hmac.new(key, digestmod=hashlib.blake2s)
    for part in parts:
        state.update(part)
    return state.digest()


def kdf(key: bytes, data: bytes, count: int) -> tuple[bytes, ...]:
    """The first ``count`` (1..3) outputs of Noise's HKDF with chaining key ``key``."""
    if not 1 <= count <= 3:
        raise ValueError(f"KDF gives 1 to 3 outputs, not {count}")
    prk = hmac(key, data)
    outputs: list[bytes] = []
    previous = b""
    for index in range(1, count + 1):
        previous = hmac(prk, previous, bytes((index,)))
        outputs.append(previous)
    return tuple(outputs)


def kdf1(key: bytes, data: bytes) -> bytes:
    """KDF1: the new chaining key."""
    return kdf(key, data, 1)[0]


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    """KDF2: (chaining key, cipher key), or the two transport keys."""
    first, second = kdf(key, data, 2)
    return first, second


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    """KDF3: (chaining key, tau, cipher key) when the preshared key is mixed in."""
    first, second, third = kdf(key, data, 3)
    return first, second, third


# ---------------------------------------------------------------------------------------------
# AEAD and XAEAD


def counter_nonce(counter: int) -> bytes:
    """WireGuard's 96-bit AEAD nonce: 4 zero bytes || the 64-bit counter, little-endian."""
    return _NONCE_PREFIX + _COUNTER.pack(counter)


class Cipher:
    """AEAD under one key: ChaCha20-Poly1305 with the counter nonce."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_LEN:
            raise ValueError(f"a ChaCha20-Poly1305 key is {KEY_LEN} bytes, not {len(key)}")
        self._aead = ChaCha20Poly1305(bytes(key))

    def __repr__(self) -> str:
        return "<Cipher>"  # never the key

    def seal(self, counter: int, plaintext: bytes, associated: bytes = b"") -> bytes:
        """Ciphertext || 16-byte tag."""
        return self._aead.encrypt(counter_nonce(counter), plaintext, associated)

    def seal_messages(self, header: bytes, counter: int, plaintexts: Iterable[bytes]) -> list[bytes]:
        """``header || counter || ciphertext || tag`` for each plaintext, under consecutive
        counters from ``counter`` (a WireGuard transport message when ``header`` is the type and
        receiver index): one loop per batch, the counter's 8 bytes made once for nonce and header."""
        encrypt = self._aead.encrypt
        messages = []
        for plaintext in plaintexts:
            little = counter.to_bytes(8, "little")
            messages.append(header + little + encrypt(_NONCE_PREFIX + little, plaintext, None))
            counter += 1
        return messages

    def open(self, counter: int, ciphertext: bytes, associated: bytes = b"") -> bytes:
        """The plaintext, or ``CryptoError`` when the tag does not authenticate."""
        try:
            return self._aead.decrypt(counter_nonce(counter), ciphertext, associated)
        except InvalidTag:
            raise CryptoError("AEAD tag does not authenticate") from None


def aead_seal(key: bytes, counter: int, plaintext: bytes, associated: bytes) -> bytes:
    """AEAD(key, counter, plaintext, associated)."""
    return Cipher(key).seal(counter, plaintext, associated)


def aead_open(key: bytes, counter: int, ciphertext: bytes, associated: bytes) -> bytes:
    """The inverse of ``aead_seal``; ``CryptoError`` when it does not authenticate."""
    return Cipher(key).open(counter, ciphertext, associated)


_SIGMA: Final = struct.unpack("<4I", b"expand 32-byte k")
# One ChaCha double round: four column quarter-rounds, then four diagonal ones (RFC 8439 2.3).
_DOUBLE_ROUND: Final = (
    (0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
    (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14),
)  # fmt: skip
_MASK32: Final = 0xFFFFFFFF


def _rotl32(value: int, bits: int) -> int:
    return ((value << bits) & _MASK32) | (value >> (32 - bits))


def _quarter_round(x: list[int], a: int, b: int, c: int, d: int) -> None:
    x[a] = (x[a] + x[b]) & _MASK32
    x[d] = _rotl32(x[d] ^ x[a], 16)
    x[c] = (x[c] + x[d]) & _MASK32
    x[b] = _rotl32(x[b] ^ x[c], 12)
    x[a] = (x[a] + x[b]) & _MASK32
    x[d] = _rotl32(x[d] ^ x[a], 8)
    x[c] = (x[c] + x[d]) & _MASK32
    x[b] = _rotl32(x[b] ^ x[c], 7)


def hchacha20(key: bytes, nonce: bytes) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha 2.2): a 32-byte subkey from a key and a 16-byte nonce.

    The ChaCha20 block function's 20 rounds over constants || key || nonce, *without* the final
    addition of the input, keeping words 0-3 and 12-15.
    """
    if len(key) != KEY_LEN or len(nonce) != 16:
        raise ValueError("HChaCha20 takes a 32-byte key and a 16-byte nonce")
    state = [*_SIGMA, *struct.unpack("<8I", key), *struct.unpack("<4I", nonce)]
    for _ in range(10):
        for a, b, c, d in _DOUBLE_ROUND:
            _quarter_round(state, a, b, c, d)
    return struct.pack("<8I", *state[0:4], *state[12:16])


def _xchacha_parts(key: bytes, nonce: bytes) -> tuple[ChaCha20Poly1305, bytes]:
    if len(nonce) != XNONCE_LEN:
        raise ValueError(f"an XChaCha20 nonce is {XNONCE_LEN} bytes, not {len(nonce)}")
    return ChaCha20Poly1305(hchacha20(key, nonce[:16])), _NONCE_PREFIX + nonce[16:]


def xaead_seal(key: bytes, nonce: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """XAEAD(key, nonce, plaintext, associated): XChaCha20-Poly1305, ciphertext || tag."""
    aead, short_nonce = _xchacha_parts(key, nonce)
    return aead.encrypt(short_nonce, plaintext, associated)


def xaead_open(key: bytes, nonce: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    """The inverse of ``xaead_seal``; ``CryptoError`` when it does not authenticate."""
    aead, short_nonce = _xchacha_parts(key, nonce)
    try:
        return aead.decrypt(short_nonce, ciphertext, associated)
    except InvalidTag:
        raise CryptoError("XAEAD tag does not authenticate") from None


# ---------------------------------------------------------------------------------------------
# DH and TIMESTAMP


def dh(private_key: bytes, public_key: bytes) -> bytes:
    """DH(private, public): the X25519 shared secret; ``CryptoError`` for a small-order public key."""
    if len(private_key) != KEY_LEN or len(public_key) != KEY_LEN:
        raise ValueError(f"X25519 keys are {KEY_LEN} bytes")
    private = X25519PrivateKey.from_private_bytes(bytes(private_key))
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(bytes(public_key)))
    except ValueError:  # OpenSSL refuses an all-zero result itself
        shared = bytes(KEY_LEN)
    if not any(shared):
        raise CryptoError("X25519 with a small-order public key (all-zero shared secret)")
    return shared


def tai64n(unix_ns: int | None = None) -> bytes:
    """TIMESTAMP: the 12-byte TAI64N label of ``unix_ns`` (default: now), whitened."""
    if unix_ns is None:
        unix_ns = time.time_ns()
    seconds, nanoseconds = divmod(unix_ns, 1_000_000_000)
    return struct.pack(">QI", TAI64_BASE + seconds, nanoseconds & ~TIMESTAMP_WHITENING)
