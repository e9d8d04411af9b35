"""RFC 1071 done the slow, obvious way, for tests that check tether's fast checksums against it
(no tether code here)."""

from __future__ import annotations

import struct


def ref_checksum(data: bytes) -> int:
    """RFC 1071, word by word with end-around carry: slow and obviously right."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ref_pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    """The IPv4 or IPv6 pseudo-header that TCP, UDP and ICMPv6 checksums cover."""
    if len(src) == 4:
        return src + dst + bytes([0, proto]) + length.to_bytes(2, "big")
    return src + dst + length.to_bytes(4, "big") + bytes([0, 0, 0, proto])
