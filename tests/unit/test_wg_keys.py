"""WireGuard key helpers: generation, derivation, base64 text, and agreement with the real ``wg``."""

from __future__ import annotations

import base64
import shutil
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.engine.wireguard.keys import (
    KEY_LEN, BadKey, SecretKey, clamp, decode_key, encode_key, generate_preshared_key,
    generate_private_key, public_key,
)

WG = shutil.which("wg")
needs_wg = pytest.mark.skipif(WG is None, reason="wg (wireguard-tools) is not installed")

# RFC 7748 section 6.1: Alice's private and public key.
ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")


def wg(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    assert WG is not None
    return subprocess.run([WG, *args], input=stdin, capture_output=True, text=True, timeout=10)


def test_generated_private_key_is_32_clamped_bytes() -> None:
    key = generate_private_key()
    assert len(key) == KEY_LEN
    assert key[0] & 7 == 0 and key[31] & 0x80 == 0 and key[31] & 0x40
    assert generate_private_key() != key


def test_generation_uses_the_injected_randomness() -> None:
    assert generate_private_key(lambda n: b"\xff" * n) == b"\xf8" + b"\xff" * 30 + b"\x7f"
    assert generate_preshared_key(lambda n: b"\xff" * n) == b"\xff" * 32  # unclamped
    with pytest.raises(BadKey):
        generate_preshared_key(lambda n: b"short")


def test_clamp_is_idempotent_and_keeps_the_public_key() -> None:
    raw = bytes(range(200, 232))
    assert clamp(clamp(raw)) == clamp(raw)
    assert public_key(raw) == public_key(clamp(raw))  # X25519 clamps internally anyway


def test_public_key_matches_rfc7748() -> None:
    assert public_key(ALICE_PRIVATE) == ALICE_PUBLIC


@pytest.mark.parametrize("length", [0, 31, 33])
def test_public_key_refuses_wrong_lengths(length: int) -> None:
    with pytest.raises(BadKey, match=f"not {length}"):
        public_key(b"\x01" * length)


def test_base64_round_trip() -> None:
    text = encode_key(ALICE_PUBLIC)
    assert len(text) == 44 and text.endswith("=")
    assert decode_key(text) == ALICE_PUBLIC
    assert decode_key(f"  {text}\n") == ALICE_PUBLIC  # surrounding whitespace, as read from a file


@pytest.mark.parametrize(("text", "message"), [
    ("", "decodes to 0 bytes, not 32"),
    ("not a key!", "not base64"),
    (base64.b64encode(b"x" * 31).decode(), "decodes to 31 bytes, not 32"),
    (base64.b64encode(b"x" * 33).decode(), "decodes to 33 bytes, not 32"),
    (base64.b64encode(b"x" * 32).decode().rstrip("="), "not base64"),  # no padding: wg refuses too
    (base64.b64encode(b"x" * 32).decode()[:-2] + "h=", "not canonical"),  # stray low bits
    (base64.urlsafe_b64encode(b"\xff" * 32).decode(), "not base64"),  # the URL-safe alphabet
    ("=" + base64.b64encode(b"x" * 32).decode()[1:], "not base64"),
])
def test_decode_refuses_without_quoting_the_text(text: str, message: str) -> None:
    with pytest.raises(BadKey) as info:
        decode_key(text)
    assert message in str(info.value)
    if len(text) > 8:
        assert text.strip("=") not in str(info.value)


def test_secret_key_hides_itself() -> None:
    secret = generate_private_key()
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}", "%s" % secret, repr([secret])):
        assert shown in ("<secret key>", "[<secret key>]")
    assert secret == bytes(secret) and type(bytes(secret)) is bytes
    assert encode_key(secret) == base64.b64encode(bytes(secret)).decode()


@given(st.binary(min_size=32, max_size=32))
def test_every_key_round_trips(raw: bytes) -> None:
    assert decode_key(encode_key(raw)) == raw


@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/= \n-_", max_size=50))
def test_decode_accepts_only_the_canonical_text_of_32_bytes(text: str) -> None:
    try:
        raw = decode_key(text)
    except BadKey:
        return
    assert encode_key(raw) == text.strip()


@needs_wg
def test_wg_pubkey_agrees_with_ours() -> None:
    for _ in range(5):
        private = generate_private_key()
        out = wg("pubkey", stdin=encode_key(private) + "\n")
        assert out.returncode == 0, out.stderr
        assert decode_key(out.stdout) == public_key(private)


@needs_wg
def test_we_read_wg_genkey_and_genpsk() -> None:
    private = decode_key(wg("genkey").stdout)
    assert clamp(private) == private
    assert decode_key(wg("pubkey", stdin=encode_key(private)).stdout) == public_key(private)
    assert len(decode_key(wg("genpsk").stdout)) == KEY_LEN


@needs_wg
def test_wg_and_we_agree_on_non_canonical_text() -> None:
    text = encode_key(b"x" * 32)[:-2] + "h="
    assert wg("pubkey", stdin=text + "\n").returncode != 0
    with pytest.raises(BadKey):
        decode_key(text)


def test_secret_key_is_a_bytes() -> None:
    assert isinstance(SecretKey(b"\x00" * 32), bytes)
