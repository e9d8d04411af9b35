"""WireGuard keys: generate, derive, and convert to and from the base64 text of ``wg`` (sans-IO).

Theory of operation
-------------------
**Keys.**  WireGuard's static and preshared keys are 32 raw bytes.  A private key is a Curve25519
scalar; ``wg genkey`` draws 32 random bytes and *clamps* them (clears the 3 low bits, clears the top
bit, sets bit 254), so that the text it prints is already the scalar X25519 uses.  X25519 clamps
again internally, so an unclamped key derives the same public key; we clamp anyway, so that our
keys are byte-for-byte the kind ``wg genkey`` writes.  The public key is X25519(private, 9), computed
by ``cryptography``.  A preshared key (``wg genpsk``) is 32 random bytes, unclamped.

**Text.**  Every WireGuard tool writes a key as standard base64 with padding: 44 characters, the
last one ``=``.  ``decode_key`` accepts exactly what ``wg``'s ``key_from_base64`` accepts: those 44
characters (surrounding whitespace stripped), decoding to 32 bytes, in the one canonical spelling
(the unused low bits of the 43rd character must be zero; ``wg`` rejects a key whose last digit is,
say, ``B`` instead of ``A`` for the same bytes, and so do we, so that two tools never disagree
about whether a config file is valid).

**Secrecy.**  A key that reaches an error message, a log line or ``ctl`` output is leaked.  So
``BadKey``'s message describes the text (``not base64``, ``decodes to 31 bytes, not 32``) and never
quotes it: the text may be a real private key with one character mistyped.  ``SecretKey`` is a
``bytes`` whose ``repr()`` and ``str()`` are ``<secret key>``: anything that formats a container
holding one (a dataclass ``repr``, an f-string, a logged dict) shows nothing.  Its bytes are still
there for the cipher (``bytes(key)``, slicing, ``key.hex()`` — the last one is an explicit request).

Randomness is injectable (``randbytes``) so callers and tests can be deterministic; the default is
``os.urandom``, the same source as ``wg genkey``'s ``getrandom``.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Callable
from typing import Final

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

KEY_LEN: Final = 32  # bytes of every WireGuard key
KEY_TEXT_LEN: Final = 44  # characters of its base64 text, the last one "="
_BASE64: Final = re.compile(r"[A-Za-z0-9+/]*={0,2}")


class BadKey(ValueError):
    """Text or bytes that are not a WireGuard key.  The message never contains the key itself."""


class SecretKey(bytes):
    """The bytes of a private or preshared key, hidden from ``repr()``/``str()``/formatting."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<secret key>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return format(repr(self), spec)


def clamp(scalar: bytes) -> bytes:
    """Clamp 32 bytes into a Curve25519 private key, exactly as ``wg genkey`` does."""
    check_key(scalar)
    out = bytearray(scalar)
    out[0] &= 248
    out[31] = (out[31] & 127) | 64
    return bytes(out)


def generate_private_key(randbytes: Callable[[int], bytes] = os.urandom) -> SecretKey:
    """A fresh clamped private key (``wg genkey``)."""
    return SecretKey(clamp(randbytes(KEY_LEN)))


def generate_preshared_key(randbytes: Callable[[int], bytes] = os.urandom) -> SecretKey:
    """A fresh preshared key (``wg genpsk``): 32 random bytes."""
    key = randbytes(KEY_LEN)
    check_key(key)
    return SecretKey(key)


def public_key(private: bytes) -> bytes:
    """The public key of a private key (``wg pubkey``)."""
    check_key(private)
    return X25519PrivateKey.from_private_bytes(bytes(private)).public_key().public_bytes_raw()


def encode_key(key: bytes) -> str:
    """The 44-character base64 text of a key, as every WireGuard tool writes it."""
    check_key(key)
    return base64.b64encode(bytes(key)).decode("ascii")


def decode_key(text: str) -> bytes:
    """The 32 bytes of a key's base64 text; ``BadKey`` (which never quotes ``text``) otherwise."""
    text = text.strip()
    if not _BASE64.fullmatch(text) or len(text) % 4:
        raise BadKey("not base64")
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:  # only reachable through padding in odd places: the regex let it by
        raise BadKey("not base64") from None
    if len(raw) != KEY_LEN:
        raise BadKey(f"decodes to {len(raw)} bytes, not {KEY_LEN}")
    if base64.b64encode(raw).decode("ascii") != text:
        raise BadKey("not canonical base64 (the last character carries stray bits)")
    return raw


def check_key(key: bytes) -> None:
    """Refuse (``BadKey``) anything that is not 32 bytes long."""
    if len(key) != KEY_LEN:
        raise BadKey(f"a key is {KEY_LEN} bytes, not {len(key)}")
