"""Unit tests for tether.net.tcpoffload: TCP segmentation (tun reads) and coalescing (tun writes).

Packets are built here with struct (``tcp_packet``, ``udp_packet``, ``vnet``), independently of
the module, with every checksum computed in full.  Checksums are computed and verified with
``tether.net.packet.checksum`` (itself checked against a word-by-word RFC 1071 reference in
``test_packet.py``) because the packets here reach 64 KiB; the small headers use the word-by-word
``ref_checksum`` below.

``split_frame`` is held to the kernel's ``tcp_gso_segment`` exactly: its output must equal, byte
for byte, the segments ``tcp_packet`` builds from the per-segment fields the kernel would give
them.  ``coalesce`` is checked the way the sandbox's kernel would take its frames: the virtio-net
header must be what ``virtio_net_hdr_to_skb`` accepts for a TCP GSO frame, the partial checksum
must complete to a valid one, and segmenting the frame again (``split_frame`` standing in for the
kernel) must give back the original packets - byte for byte when their IPv4 IDs were consecutive,
and up to the IPv4 ID and header checksum when they were not.  Every malformed kind is named in
the test ids; random and mutated bytes raise only ValueError (``split_frame``) or nothing
(``coalesce``).
"""

from __future__ import annotations

import ipaddress
import os
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tether.net import tcpoffload as to
from tether.net.packet import PLAIN_VNET_HEADER, checksum
from tether.net.tcpoffload import coalesce, join_frame, split_frame

from reference_checksum import ref_checksum, ref_pseudo

V4A, V4B = ipaddress.IPv4Address("10.0.2.100").packed, ipaddress.IPv4Address("203.0.113.10").packed
V6A = ipaddress.IPv6Address("fd00:7e7e::100").packed
V6B = ipaddress.IPv6Address("2001:db8:10::10").packed
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
DF, MF = 0x4000, 0x2000
NEEDS_CSUM, DATA_VALID = 1, 2
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4, GSO_ECN = 0, 1, 3, 4, 5, 0x80
OPTIONS = b"\x01\x01\x08\x0a" + bytes(range(1, 9))  # NOP NOP timestamps: the usual 12 bytes


# ---------------------------------------------------------------------------------------------
# Independent builders and checkers (no tcpoffload code)


def partial_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """What the kernel leaves in the L4 checksum field for CHECKSUM_PARTIAL: the folded
    pseudo-header sum, not complemented (``~tcp_v4_check(len, saddr, daddr, 0)``)."""
    return ~ref_checksum(ref_pseudo(src, dst, proto, length)) & 0xFFFF


def ip_packet(version: int, proto: int, segment: bytes, *, src: bytes | None = None,
              dst: bytes | None = None, ident: int = 0x1234, tos: int = 0, ttl: int = 64,
              flags_offset: int = DF, flow: int = 0x12345, ip_options: bytes = b"",
              total: int | None = None, ihl: int | None = None) -> bytes:
    src = src or (V4A if version == 4 else V6A)
    dst = dst or (V4B if version == 4 else V6B)
    if version == 6:
        return struct.pack("!IHBB16s16s", 6 << 28 | tos << 20 | flow, len(segment), proto, ttl, src,
                           dst) + segment
    ihl = 5 + len(ip_options) // 4 if ihl is None else ihl
    total = 20 + len(ip_options) + len(segment) if total is None else total
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, total, ident, flags_offset, ttl, proto, 0,
                         src, dst) + ip_options
    header = header[:10] + ref_checksum(header).to_bytes(2, "big") + header[12:]
    return header + segment


def tcp_packet(version: int = 4, payload: bytes = b"", *, seq: int = 1000, ack: int = 777_000,
               flags: int = ACK, window: int = 501, options: bytes = b"", sport: int = 40000,
               dport: int = 443, urgent: int = 0, check: str | int = "full", **ip) -> bytes:
    """A TCP/IPv4 or TCP/IPv6 packet; ``check``: "full" (a complete checksum), "partial" (the
    pseudo-header sum a TSO super packet carries) or a literal field value."""
    src = ip.get("src") or (V4A if version == 4 else V6A)
    dst = ip.get("dst") or (V4B if version == 4 else V6B)
    doff = (20 + len(options)) // 4
    segment = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, window, 0,
                          urgent) + options + payload
    if check == "full":
        value = checksum(ref_pseudo(src, dst, 6, len(segment)) + segment)
    elif check == "partial":
        value = partial_sum(src, dst, 6, len(segment))
    else:
        value = check
    segment = segment[:16] + value.to_bytes(2, "big") + segment[18:]
    return ip_packet(version, 6, segment, **ip)


def udp_packet(version: int, data: bytes, check: str = "full", **ip) -> bytes:
    src = ip.get("src") or (V4A if version == 4 else V6A)
    dst = ip.get("dst") or (V4B if version == 4 else V6B)
    segment = struct.pack("!HHHH", 5353, 53, 8 + len(data), 0) + data
    if check == "full":
        value = checksum(ref_pseudo(src, dst, 17, len(segment)) + segment) or 0xFFFF
    else:
        value = partial_sum(src, dst, 17, len(segment))
    return ip_packet(version, 17, segment[:6] + value.to_bytes(2, "big") + segment[8:], **ip)


def vnet(flags: int = 0, gso_type: int = GSO_NONE, hdr_len: int = 0, gso_size: int = 0,
         csum_start: int = 0, csum_offset: int = 0) -> bytes:
    """struct virtio_net_hdr, native byte order (as the tun uses it without TUNSETVNETLE)."""
    return struct.pack("=BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def tso_frame(version: int, payload: bytes, gso_size: int, *, ecn: bool = False, **fields) -> bytes:
    """A tun read as the kernel makes it for TSO: partial checksum, header lengths filled in."""
    packet = tcp_packet(version, payload, check="partial", **fields)
    ip_len = (packet[0] & 0x0F) * 4 if version == 4 else 40
    tcp_len = (packet[ip_len + 12] >> 4) * 4
    gso_type = (GSO_TCPV4 if version == 4 else GSO_TCPV6) | (GSO_ECN if ecn else 0)
    return vnet(NEEDS_CSUM, gso_type, ip_len + tcp_len, gso_size, ip_len, 16) + packet


def ip_header_len(packet: bytes) -> int:
    return (packet[0] & 0x0F) * 4 if packet[0] >> 4 == 4 else 40


def addresses(packet: bytes) -> tuple[bytes, bytes]:
    return (packet[12:16], packet[16:20]) if packet[0] >> 4 == 4 else (packet[8:24], packet[24:40])


def l4_valid(packet: bytes, proto: int = 6) -> bool:
    """The L4 checksum (with its pseudo-header) verifies, as the receiving kernel checks it."""
    src, dst = addresses(packet)
    segment = packet[ip_header_len(packet):]
    return checksum(ref_pseudo(src, dst, proto, len(segment)) + segment) == 0


def ip_valid(packet: bytes) -> bool:
    return packet[0] >> 4 == 6 or ref_checksum(packet[:ip_header_len(packet)]) == 0


def tcp_fields(packet: bytes) -> dict:
    ip_len = ip_header_len(packet)
    sport, dport, seq, ack, doff, flags, window, check, urgent = struct.unpack_from(
        "!HHIIBBHHH", packet, ip_len)
    head = ip_len + (doff >> 4) * 4
    return {"ident": struct.unpack_from("!H", packet, 4)[0] if packet[0] >> 4 == 4 else None,
            "seq": seq, "ack": ack, "flags": flags, "window": window, "check": check,
            "head": head, "payload": packet[head:]}


def flow(count: int, size: int = 1000, version: int = 4, seq: int = 1000, ident: int = 100,
         **fields) -> list[bytes]:
    """``count`` back-to-back full segments of one flow, consecutive IPv4 IDs, distinct payloads."""
    return [tcp_packet(version, bytes([i % 251]) * size, seq=(seq + i * size) % 2**32,
                       ident=(ident + i) & 0xFFFF, **fields) for i in range(count)]


def payload_of(packet: bytes) -> bytes:
    return tcp_fields(packet)["payload"]


def unframe(frames: list[list[bytes]]) -> list[bytes]:
    """What the sandbox's kernel makes of the frames: a plain frame is its packet, a GSO frame is
    segmented (``split_frame`` standing in for ``tcp_gso_segment``)."""
    out = []
    for frame in frames:
        if len(frame) == 2 and frame[0] == PLAIN_VNET_HEADER:
            out.append(frame[1])
        else:
            out.extend(split_frame(join_frame(frame)))
    return out


def shape(frames: list[list[bytes]]) -> list[int]:
    """How many input packets each frame carries (a plain frame is also two buffers)."""
    return [1 if len(f) == 2 and f[0] == PLAIN_VNET_HEADER else len(f) for f in frames]


def check_frames(frames: list[list[bytes]], packets: list[bytes], max_bytes: int = 65535) -> None:
    """Every frame is a plain frame holding the very input packet, or a valid merged frame of the
    next inputs; together they account for every input, in order."""
    done = 0
    for frame, count in zip(frames, shape(frames)):
        if count == 1:
            assert frame[1] is packets[done]
        else:
            check_merged_frame(frame, packets[done:done + count], min(max_bytes, 65535))
        done += count
    assert done == len(packets)


def ref_run_info(packet: bytes) -> dict | None:
    """The coalescing rules written out field by field (a reference model): what must match
    within a run, or None for a packet that never joins one."""
    if not packet or packet[0] >> 4 not in (4, 6):
        return None
    if packet[0] >> 4 == 4:
        if len(packet) < 40 or packet[0] != 0x45 or ref_checksum(packet[:20]) != 0:
            return None
        _vi, tos, total, _id, frag, ttl, proto, _c, src, dst = struct.unpack_from("!BBHHHBBH4s4s", packet)
        if total != len(packet) or frag & (MF | 0x1FFF) or proto != 6:
            return None
        ip, ip_len = (tos, frag, ttl, src, dst), 20
    else:
        if len(packet) < 60:
            return None
        vcf, plen, next_header, hop, src, dst = struct.unpack_from("!IHBB16s16s", packet)
        if plen + 40 != len(packet) or next_header != 6:
            return None
        ip, ip_len = (vcf, hop, src, dst), 40
    sport, dport, seq, ack, doff, flags, window, _c, urgent = struct.unpack_from("!HHIIBBHHH", packet, ip_len)
    head = ip_len + (doff >> 4) * 4
    if doff >> 4 < 5 or head >= len(packet) or flags not in (ACK, ACK | PSH):
        return None
    return {"key": (packet[0] >> 4, ip, sport, dport, ack, doff, window, urgent, packet[ip_len + 20:head]),
            "seq": seq, "psh": bool(flags & PSH), "size": len(packet) - head, "length": len(packet)}


def ref_shape(packets: list[bytes], max_bytes: int = 65535) -> list[int]:
    """Run lengths by the reference model: greedy, in order, each run as long as allowed."""
    out, run = [], None
    for packet in packets:
        info = ref_run_info(packet)
        if (run and info and not run["closed"] and info["key"] == run["key"] and info["seq"] == run["next"]
                and info["size"] <= run["size"] and run["count"] < 64
                and run["length"] + info["size"] <= min(max_bytes, 65535)):
            run["count"] += 1
            run["length"] += info["size"]
            run["next"] = (info["seq"] + info["size"]) % 2**32
            run["closed"] = info["psh"] or info["size"] < run["size"]
            continue
        if run:
            out.append(run["count"])
            run = None
        if info is None:
            out.append(1)
            continue
        run = {**info, "count": 1, "next": (info["seq"] + info["size"]) % 2**32, "closed": info["psh"]}
    if run:
        out.append(run["count"])
    return out


def check_merged_frame(frame: list[bytes], originals: list[bytes], max_bytes: int = 65535) -> None:
    """A coalesced frame is what ``virtio_net_hdr_to_skb`` and ``tcp_gso_segment`` accept."""
    assert 2 <= len(frame) == len(originals) <= to.MAX_SEGMENTS
    raw = join_frame(frame)
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack_from("=BBHHHH", raw)
    packet = raw[10:]
    first = originals[0]
    version = first[0] >> 4
    ip_len = ip_header_len(first)
    head = tcp_fields(first)["head"]
    payloads = [payload_of(p) for p in originals]
    assert (flags, gso_type, hdr_len, csum_start, csum_offset) == (
        NEEDS_CSUM, GSO_TCPV4 if version == 4 else GSO_TCPV6, head, ip_len, 16)
    assert gso_size == len(payloads[0]) and all(len(p) == gso_size for p in payloads[:-1])
    assert 0 < len(payloads[-1]) <= gso_size
    # The buffers: virtio-net header + headers + first payload, then the other payloads as they are.
    assert frame[1:] == payloads[1:]
    assert len(packet) == head + sum(map(len, payloads)) <= max_bytes
    assert packet[head:] == b"".join(payloads)
    if version == 4:
        assert struct.unpack_from("!H", packet, 2)[0] == len(packet) and ip_valid(packet)
        assert packet[4:6] == first[4:6]  # the first segment's IP ID
    else:
        assert struct.unpack_from("!H", packet, 4)[0] == len(packet) - 40
    fields = tcp_fields(packet)
    assert fields["flags"] == ACK | (tcp_fields(originals[-1])["flags"] & PSH)
    # Everything but lengths, IPv4 checksum, flags and TCP checksum is the first packet's.
    mask = [(2, 4), (10, 12)] if version == 4 else [(4, 6)]
    mask += [(ip_len + 13, ip_len + 14), (ip_len + 16, ip_len + 18)]
    strip = lambda b: bytes(0 if any(lo <= i < hi for lo, hi in mask) else x for i, x in enumerate(b[:head]))
    assert strip(packet) == strip(first)
    # CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum over the new TCP length (0 and
    # 0xffff are the same number in one's complement) ...
    src, dst = addresses(packet)
    expected = partial_sum(src, dst, 6, len(packet) - ip_len)
    assert fields["check"] % 0xFFFF == expected % 0xFFFF
    # ... so what a NIC (or skb_checksum_help) computes from csum_start makes it a valid packet.
    completed = split_frame(vnet(NEEDS_CSUM, GSO_NONE, 0, 0, csum_start, csum_offset) + packet)[0]
    assert l4_valid(completed)


# ---------------------------------------------------------------------------------------------
# split_frame: no GSO


def test_plain_frame_is_returned_unchanged():
    packet = tcp_packet(4, b"hello")
    for frame in (vnet() + packet, memoryview(vnet() + packet), bytearray(vnet() + packet),
                  vnet(DATA_VALID) + packet):
        out = split_frame(frame)
        assert out == [packet] and type(out[0]) is bytes


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("proto, data", [(6, b"x" * 1000), (6, b"odd"), (6, b""),
                                         (17, b"y" * 999), (17, b"")],
                         ids=["tcp", "tcp-odd", "tcp-empty", "udp-odd", "udp-empty"])
def test_needs_csum_is_completed(version, proto, data):
    if proto == 6:
        full, partial = tcp_packet(version, data), tcp_packet(version, data, check="partial")
        offset = 16
    else:
        full, partial = udp_packet(version, data), udp_packet(version, data, check="partial")
        offset = 6
    start = ip_header_len(full)
    assert full != partial
    out = split_frame(vnet(NEEDS_CSUM, GSO_NONE, start + 20, 0, start, offset) + partial)
    assert out == [full] and l4_valid(out[0], proto)


def test_needs_csum_result_zero_is_stored_as_ffff():
    # Choose the data so that the UDP checksum comes out 0: UDP must then carry 0xffff, and the
    # kernel's skb_checksum_help stores 0xffff for any protocol.
    probe = udp_packet(4, b"\0\0")
    word = struct.unpack_from("!H", probe, 26)[0]  # the checksum with zero data: ~S
    data = word.to_bytes(2, "big")  # adding ~S makes the sum 0xffff, the checksum 0
    partial = udp_packet(4, data, check="partial")
    out = split_frame(vnet(NEEDS_CSUM, GSO_NONE, 28, 0, 20, 6) + partial)[0]
    assert struct.unpack_from("!H", out, 26)[0] == 0xFFFF and l4_valid(out, 17)


def test_needs_csum_at_packet_end():
    packet = bytes(30)
    out = split_frame(vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 8) + packet)[0]
    assert out[:28] == bytes(28) and out[28:] == b"\xff\xff"  # all-zero data sums to 0


# ---------------------------------------------------------------------------------------------
# split_frame: TCP segmentation


def expected_segments(version: int, payload: bytes, gso_size: int, *, seq: int = 1000,
                      flags: int = ACK, ident: int = 0x1234, **fields) -> list[bytes]:
    """The segments ``tcp_gso_segment`` + ``inet_gso_segment`` make, built independently."""
    chunks = [payload[i:i + gso_size] for i in range(0, len(payload), gso_size)] or [b""]
    out = []
    for i, chunk in enumerate(chunks):
        seg_flags = flags
        if i < len(chunks) - 1:
            seg_flags &= ~(FIN | PSH)
        if i > 0:
            seg_flags &= ~CWR
        out.append(tcp_packet(version, chunk, seq=(seq + i * gso_size) % 2**32, flags=seg_flags,
                              ident=(ident + i) & 0xFFFF, **fields))
    return out


def assert_segments(out: list[bytes], version: int, payload: bytes, gso_size: int, **fields) -> None:
    assert out == expected_segments(version, payload, gso_size, **fields)
    assert b"".join(payload_of(p) for p in out) == payload
    assert all(ip_valid(p) and l4_valid(p) for p in out)


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("options", [b"", OPTIONS, b"\x01" * 40], ids=["no-options", "timestamps", "40-bytes"])
def test_tso_segmentation(version, options):
    payload = bytes(range(256)) * 19 + b"tail"  # 4868 bytes: 3 full segments and a short one
    flags = CWR | ECE | ACK | PSH | FIN
    fields = dict(seq=123456, flags=flags, options=options, window=4321, tos=0x28, ttl=17,
                  ident=0xBEEF)
    out = split_frame(tso_frame(version, payload, 1448, **fields))
    assert len(out) == 4 and [len(payload_of(p)) for p in out] == [1448, 1448, 1448, 524]
    assert [tcp_fields(p)["seq"] for p in out] == [123456 + i * 1448 for i in range(4)]
    assert [tcp_fields(p)["flags"] for p in out] == [CWR | ECE | ACK, ECE | ACK, ECE | ACK,
                                                     ECE | ACK | PSH | FIN]
    if version == 4:
        assert [tcp_fields(p)["ident"] for p in out] == [0xBEEF + i for i in range(4)]
        assert [struct.unpack_from("!H", p, 2)[0] for p in out] == [len(p) for p in out]
    else:
        assert [struct.unpack_from("!H", p, 4)[0] for p in out] == [len(p) - 40 for p in out]
    assert_segments(out, version, payload, 1448, **fields)


@pytest.mark.parametrize("version", [4, 6])
def test_tso_payload_exact_multiple(version):
    payload = bytes(range(250)) * 16
    out = split_frame(tso_frame(version, payload, 1000, flags=ACK | PSH))
    assert [len(payload_of(p)) for p in out] == [1000] * 4
    assert_segments(out, version, payload, 1000, flags=ACK | PSH)


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("size", [0, 1, 999, 1000])
def test_tso_payload_within_one_segment(version, size):
    flags = CWR | ACK | PSH | FIN  # one segment is first and last: keeps every flag
    out = split_frame(tso_frame(version, b"z" * size, 1000, flags=flags))
    assert out == [tcp_packet(version, b"z" * size, flags=flags)]
    assert l4_valid(out[0]) and ip_valid(out[0])


def test_tso_sequence_wraps_at_2_32():
    payload = bytes(range(256)) * 8
    seq = 2**32 - 700
    out = split_frame(tso_frame(6, payload, 600, seq=seq))
    assert [tcp_fields(p)["seq"] for p in out] == [2**32 - 700, 2**32 - 100, 500, 1100]
    assert_segments(out, 6, payload, 600, seq=seq)


def test_tso_ip_id_wraps():
    out = split_frame(tso_frame(4, b"q" * 3000, 1000, ident=0xFFFE))
    assert [tcp_fields(p)["ident"] for p in out] == [0xFFFE, 0xFFFF, 0]
    assert_segments(out, 4, b"q" * 3000, 1000, ident=0xFFFE)


@pytest.mark.parametrize("version", [4, 6])
def test_tso_ecn_bit(version):
    payload = b"e" * 5000
    plain = split_frame(tso_frame(version, payload, 1400, flags=CWR | ACK))
    with_ecn = split_frame(tso_frame(version, payload, 1400, ecn=True, flags=CWR | ACK))
    assert with_ecn == plain
    assert [tcp_fields(p)["flags"] for p in plain] == [CWR | ACK, ACK, ACK, ACK]


def test_tso_ignores_hdr_len_csum_fields_and_old_checksum():
    payload = b"h" * 3000
    packet = tcp_packet(4, payload, check=0xDEAD, options=OPTIONS)
    expected = expected_segments(4, payload, 1000, options=OPTIONS)
    for hdr_len in (0, 20, 9999):
        for csum_start, csum_offset in ((0, 0), (20, 16), (1000, 3)):
            frame = vnet(NEEDS_CSUM, GSO_TCPV4, hdr_len, 1000, csum_start, csum_offset) + packet
            assert split_frame(frame) == expected
    # Not NEEDS_CSUM (a kernel would not send that with GSO): the checksums are computed anyway.
    assert split_frame(vnet(0, GSO_TCPV4, 0, 1000) + packet) == expected


@pytest.mark.parametrize("version", [4, 6])
def test_tso_drops_bytes_beyond_ip_length(version):
    packet = tcp_packet(version, b"t" * 2500, check="partial")
    out = split_frame(vnet(NEEDS_CSUM, GSO_TCPV4 if version == 4 else GSO_TCPV6, 0, 1000) + packet
                      + b"trailing junk")
    assert_segments(out, version, b"t" * 2500, 1000)


def test_tso_ipv4_options_are_copied():
    options = b"\x94\x04\x00\x00"  # router alert
    payload = b"o" * 2100
    out = split_frame(tso_frame(4, payload, 1000, ip_options=options))
    assert all(p[20:24] == options and p[0] == 0x46 for p in out)
    assert_segments(out, 4, payload, 1000, ip_options=options)


def test_tso_odd_gso_size():
    payload = bytes(range(255)) * 3  # 765 bytes in 7-byte segments: odd lengths pad each sum
    out = split_frame(tso_frame(4, payload, 7))
    assert len(out) == 110
    assert_segments(out, 4, payload, 7)


def test_tso_full_64k_frame():
    payload = bytes(range(256)) * 255 + bytes(215)  # 65495 bytes: a 65535-byte IPv4 packet
    out = split_frame(tso_frame(4, payload, 1448, flags=ACK | PSH))
    assert len(out) == 46
    assert_segments(out, 4, payload, 1448, flags=ACK | PSH)


@pytest.mark.parametrize("options", [[(0, bytes(6))], [(60, bytes(14))], [(0, bytes(6)), (60, bytes(22))]],
                         ids=["hop-by-hop", "destination-options", "both"])
def test_tso6_with_extension_headers_keeps_them_in_every_segment(options):
    """A socket's sticky IPV6_HOPOPTS / IPV6_DSTOPTS sit between the IPv6 header and TCP in every
    packet of its connection, super packets included: each segment carries them unchanged, its
    payload length counts them, and its TCP checksum (which does not) is right."""
    payload = os.urandom(5000)
    super_packet = with_ipv6_options(tcp_packet(6, payload, check="partial"), options)
    chain = super_packet[40:super_packet.index(tcp_packet(6, payload, check="partial")[40:60])]
    out = split_frame(vnet(NEEDS_CSUM, GSO_TCPV6, 0, 1200, 40 + len(chain), 16) + super_packet)
    assert len(out) == 5
    got = b""
    for number, segment in enumerate(out):
        assert segment[6] == super_packet[6] and segment[40:40 + len(chain)] == chain
        assert struct.unpack_from("!H", segment, 4)[0] == len(segment) - 40
        tcp = segment[40 + len(chain):]
        assert ref_checksum(ref_pseudo(V6A, V6B, 6, len(tcp)) + tcp) == 0, number
        assert struct.unpack_from("!I", tcp, 4)[0] == (1000 + 1200 * number) % 2**32
        got += tcp[(tcp[12] >> 4) * 4:]
    assert got == payload


# --- malformed frames: each kind named -------------------------------------------------------

GOOD4 = tcp_packet(4, b"p" * 3000, check="partial")
GOOD6 = tcp_packet(6, b"p" * 3000, check="partial")
# a routing header (43) before TCP: it would change the checksum's pseudo-header, so it is refused
EXT6 = struct.pack("!IHBB16s16s", 6 << 28, 8 + 20, 43, 64, V6A, V6B) + bytes([6, 0]) + bytes(6) + GOOD6[40:60]


def with_ipv6_options(packet: bytes, options: list[tuple[int, bytes]]) -> bytes:
    """``packet`` (TCP/IPv6) with extension headers [(type, body)] inserted before TCP; each
    body is padded to a multiple of 8 bytes with its 2-byte next-header/length prefix."""
    chain, types = b"", [t for t, _ in options] + [6]
    for (kind, body), following in zip(options, types[1:]):
        length = -(-(len(body) + 2) // 8) * 8
        chain += bytes([following, length // 8 - 1]) + body.ljust(length - 2, b"\0")
    payload_len = struct.unpack_from("!H", packet, 4)[0] + len(chain)
    return packet[:4] + struct.pack("!HB", payload_len, types[0]) + packet[7:40] + chain + packet[40:]


def tso4(packet: bytes, gso_size: int = 1000) -> bytes:
    return vnet(NEEDS_CSUM, GSO_TCPV4, 40, gso_size, 20, 16) + packet


def tso6(packet: bytes, gso_size: int = 1000) -> bytes:
    return vnet(NEEDS_CSUM, GSO_TCPV6, 60, gso_size, 40, 16) + packet


def with_byte(packet: bytes, offset: int, value: int) -> bytes:
    return packet[:offset] + bytes([value]) + packet[offset + 1:]


BAD_FRAMES = {
    "empty-frame": (b"", "shorter than the 10-byte virtio-net header"),
    "short-vnet-header": (vnet()[:9], "shorter than the 10-byte virtio-net header"),
    "gso-size-0": (tso4(GOOD4, 0), "gso_size 0"),
    "gso-udp": (vnet(NEEDS_CSUM, GSO_UDP, 28, 1000, 20, 6) + GOOD4, r"unsupported gso_type 0x03 \(UDP\)"),
    "gso-udp-l4": (vnet(NEEDS_CSUM, GSO_UDP_L4, 28, 1000, 20, 6) + GOOD4, "unsupported gso_type 0x05"),
    "gso-unknown": (vnet(0, 2, 0, 1000) + GOOD4, r"unsupported gso_type 0x02 \(unknown\)"),
    "gso-ecn-alone": (vnet(0, GSO_ECN, 0, 1000) + GOOD4, "unsupported gso_type 0x80"),
    "gso-udp-ecn": (vnet(0, GSO_UDP | GSO_ECN, 0, 1000) + GOOD4, "unsupported gso_type 0x83"),
    "csum-start-beyond-packet": (vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 5000, 16) + GOOD4,
                                 "csum_start 5000 .* 3040-byte packet"),
    "csum-offset-beyond-packet": (vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 3019) + GOOD4,
                                  "csum_offset 3019 does not lie within"),
    "csum-field-half-outside": (vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 3038, 1) + GOOD4, "does not lie within"),
    "csum-offset-odd": (vnet(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 15) + GOOD4, "csum_offset 15 is odd"),
    "empty-packet": (tso4(b""), "empty packet in a TCPV4 frame"),
    "ipv6-in-tcpv4": (tso4(GOOD6), "IP version 6 in a TCPV4 frame"),
    "ipv4-in-tcpv6": (tso6(GOOD4), "IP version 4 in a TCPV6 frame"),
    "ipv4-truncated-header": (tso4(GOOD4[:19]), "truncated IPv4 header: 19 bytes"),
    "ipv4-ihl-below-5": (tso4(with_byte(GOOD4, 0, 0x44)), "IPv4 IHL 4 < 5"),
    "ipv4-ihl-beyond-packet": (tso4(with_byte(GOOD4, 0, 0x4F)[:50]), "IPv4 header length 60 exceeds the 50-byte"),
    "ipv4-total-below-header": (tso4(GOOD4[:2] + b"\x00\x10" + GOOD4[4:]), "total length 16 is shorter"),
    "ipv4-total-beyond-packet": (tso4(GOOD4[:-1]), "total length 3040 exceeds the 3039-byte packet"),
    "ipv4-fragment-mf": (tso4(ip_packet(4, 6, GOOD4[20:], flags_offset=MF)), "IPv4 fragment"),
    "ipv4-fragment-offset": (tso4(ip_packet(4, 6, GOOD4[20:], flags_offset=185)), "IPv4 fragment"),
    "ipv4-not-tcp": (tso4(udp_packet(4, b"u" * 3000)), "IPv4 protocol 17 is not TCP"),
    "ipv6-truncated-header": (tso6(GOOD6[:39]), "truncated IPv6 header: 39 bytes"),
    "ipv6-payload-beyond-packet": (tso6(GOOD6[:-1]), "IPv6 payload length 3020 exceeds the 3019 bytes"),
    "ipv6-not-tcp": (tso6(udp_packet(6, b"u" * 3000)), "IPv6 next header 17 is not TCP"),
    "ipv6-routing-header": (tso6(EXT6), "next header 43 is not TCP .*hop-by-hop and destination options"),
    "ipv6-options-past-packet": (tso6(EXT6[:6] + b"\x00" + EXT6[7:41] + b"\x0a" + EXT6[42:]),
                                 "extension header of 88 bytes at offset 40 runs past the 68-byte packet"),
    "tcp-truncated-header": (tso4(ip_packet(4, 6, GOOD4[20:39])), "truncated TCP header at offset 20: 19 bytes"),
    "tcp-truncated-by-total": (tso4(ip_packet(4, 6, GOOD4[20:], total=35)), "truncated TCP header at offset 20: 15"),
    "tcp-data-offset-below-5": (tso4(with_byte(GOOD4, 32, 0x40)), r"TCP data offset 4 < 5 at offset 32"),
    "tcp-data-offset-beyond-packet": (tso6(ip_packet(6, 6, with_byte(GOOD6[40:60], 12, 0xF0))),
                                      r"TCP data offset 15 \(60 bytes\) runs past the 20 bytes of TCP at offset 40"),
}


@pytest.mark.parametrize("frame, message", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
def test_malformed_frame_raises_value_error(frame, message):
    with pytest.raises(ValueError, match=message):
        split_frame(frame)


VALID_FRAMES = [tso_frame(4, b"v" * 3000, 1000, options=OPTIONS), tso_frame(6, b"v" * 3000, 1000),
                vnet(NEEDS_CSUM, GSO_NONE, 40, 0, 20, 16) + GOOD4]


@given(st.binary(max_size=200))
@example(b"\x00" * 10)
@example(vnet(0, GSO_TCPV4, 0, 1) + b"\x45")
def test_split_fuzz_random_bytes(raw):
    try:
        out = split_frame(raw)
    except ValueError:
        return
    assert all(type(p) is bytes for p in out)


@given(st.sampled_from(VALID_FRAMES), st.lists(st.tuples(st.integers(0, 120), st.integers(0, 255)),
                                               max_size=6), st.integers(10, 3100))
def test_split_fuzz_mutated_frames(frame, flips, cut):
    raw = bytearray(frame[:cut])
    for offset, value in flips:
        if offset < len(raw):
            raw[offset] = value
    try:
        out = split_frame(bytes(raw))
    except ValueError:
        return
    assert all(type(p) is bytes for p in out)


# ---------------------------------------------------------------------------------------------
# split_frame then coalesce: the round trip


@st.composite
def super_packets(draw):
    version = draw(st.sampled_from([4, 6]))
    gso_size = draw(st.integers(1, 1460))
    # At most 300 segments per example: gso_size 1 with 64 KB would be 64,000 segments and only
    # slow the suite; the per-segment code is the same for 3 segments or 64,000.
    size = draw(st.integers(1, min(64000, gso_size * 300)))
    options = draw(st.sampled_from([b"", OPTIONS, b"\x01" * 40]))
    fields = dict(seq=draw(st.integers(0, 2**32 - 1)), ident=draw(st.integers(0, 0xFFFF)),
                  flags=draw(st.sampled_from([ACK, ACK | PSH])), options=options,
                  window=draw(st.integers(0, 0xFFFF)))
    seed = draw(st.binary(min_size=1, max_size=64))
    payload = (seed * (size // len(seed) + 1))[:size]
    return version, payload, gso_size, fields


@settings(max_examples=60)
@given(super_packets())
@example((4, b"x" * 64000, 1460, dict(seq=2**32 - 5, ident=0xFFFF, flags=ACK | PSH, options=OPTIONS,
                                       window=7)))
@example((6, b"x" * 3, 1, dict(seq=0, ident=0, flags=ACK, options=b"", window=0)))
def test_split_then_coalesce_round_trip(case):
    version, payload, gso_size, fields = case
    segments = split_frame(tso_frame(version, payload, gso_size, **fields))
    assert segments == expected_segments(version, payload, gso_size, **fields)
    assert all(l4_valid(p) for p in segments)
    frames = coalesce(segments)
    head = tcp_fields(segments[0])["head"]
    per_frame = min(to.MAX_SEGMENTS, (65535 - head) // gso_size)
    assert len(frames) == -(-len(segments) // per_frame)
    if len(segments) <= to.MAX_SEGMENTS:
        assert len(frames) == 1
    check_frames(frames, segments)
    assert b"".join(payload_of(p) for p in unframe(frames)) == payload
    assert unframe(frames) == segments


# ---------------------------------------------------------------------------------------------
# coalesce: merging


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("options", [b"", OPTIONS], ids=["no-options", "timestamps"])
def test_coalesce_merges_one_flow(version, options):
    packets = flow(5, 1000, version, options=options)
    frames = coalesce(packets)
    assert len(frames) == 1
    check_merged_frame(frames[0], packets)
    assert unframe(frames) == packets


def test_coalesce_merged_frame_layout():
    packets = flow(3, 1000, 4)
    (frame,) = coalesce(packets)
    ip = packets[0][:20]
    expected_ip = ip[:2] + (3040).to_bytes(2, "big") + ip[4:10] + b"\0\0" + ip[12:20]
    expected_ip = expected_ip[:10] + ref_checksum(expected_ip).to_bytes(2, "big") + expected_ip[12:]
    check = partial_sum(V4A, V4B, 6, 3020)
    expected_tcp = packets[0][20:36] + check.to_bytes(2, "big") + packets[0][38:40]
    assert frame == [vnet(NEEDS_CSUM, GSO_TCPV4, 40, 1000, 20, 16) + expected_ip + expected_tcp
                     + payload_of(packets[0]), payload_of(packets[1]), payload_of(packets[2])]


@pytest.mark.parametrize("version", [4, 6])
def test_coalesce_psh_on_last_is_kept_and_ends_the_run(version):
    packets = flow(3, 1000, version)
    packets[2] = tcp_packet(version, payload_of(packets[2]), seq=3000, ident=102, flags=ACK | PSH)
    more = flow(2, 1000, version, seq=4000, ident=103)
    frames = coalesce(packets + more)
    assert shape(frames) == [3, 2]
    assert tcp_fields(join_frame(frames[0])[10:])["flags"] == ACK | PSH
    check_merged_frame(frames[0], packets)
    check_merged_frame(frames[1], more)
    assert unframe(frames) == packets + more


def test_coalesce_psh_first_stands_alone():
    first = tcp_packet(4, b"a" * 1000, seq=1000, flags=ACK | PSH)
    rest = flow(2, 1000, 4, seq=2000, ident=0x1235)
    frames = coalesce([first] + rest)
    assert frames[0] == [PLAIN_VNET_HEADER, first] and len(frames) == 2
    check_merged_frame(frames[1], rest)


def test_coalesce_short_segment_ends_the_run():
    sizes = [1000, 1000, 500, 1000, 1000]
    packets, seq = [], 1000
    for i, size in enumerate(sizes):
        packets.append(tcp_packet(4, b"s" * size, seq=seq, ident=i))
        seq += size
    frames = coalesce(packets)
    assert shape(frames) == [3, 2]
    check_merged_frame(frames[0], packets[:3])
    check_merged_frame(frames[1], packets[3:])
    assert unframe(frames) == packets


def test_coalesce_longer_segment_starts_a_new_run():
    packets = [tcp_packet(4, b"l" * 500, seq=1000, ident=1), tcp_packet(4, b"l" * 500, seq=1500, ident=2),
               tcp_packet(4, b"l" * 1000, seq=2000, ident=3), tcp_packet(4, b"l" * 1000, seq=3000, ident=4)]
    frames = coalesce(packets)
    assert shape(frames) == [2, 2]
    assert unframe(frames) == packets


def one_field_differs(version: int, field: str) -> dict:
    """Packet 3 of a 6-packet flow built with one field changed (everything else in sequence)."""
    changes = {
        "sport": dict(sport=40001), "dport": dict(dport=444), "ack": dict(ack=777_001),
        "window": dict(window=502), "options": dict(options=OPTIONS[:-1] + b"\x09"),
        "options-length": dict(options=OPTIONS + b"\x01\x01\x01\x01"),
        "urgent-pointer": dict(urgent=5), "tos": dict(tos=0x01), "ttl": dict(ttl=63),
        "src": dict(src=V4B if version == 4 else V6B), "dst": dict(dst=V4A if version == 4 else V6A),
        "df": dict(flags_offset=0), "flow-label": dict(flow=0x54321),
    }
    return changes[field]


RULE_FIELDS_V4 = ["sport", "dport", "ack", "window", "options", "options-length", "urgent-pointer",
                  "tos", "ttl", "src", "dst", "df"]
RULE_FIELDS_V6 = ["sport", "dport", "ack", "window", "options", "options-length", "urgent-pointer",
                  "tos", "ttl", "src", "dst", "flow-label"]


@pytest.mark.parametrize("version, field", [(4, f) for f in RULE_FIELDS_V4] + [(6, f) for f in RULE_FIELDS_V6],
                         ids=[f"v4-{f}" for f in RULE_FIELDS_V4] + [f"v6-{f}" for f in RULE_FIELDS_V6])
def test_coalesce_a_differing_field_starts_a_new_run(version, field):
    base = dict(options=OPTIONS)
    packets = flow(6, 800, version, **base)
    changed = {**base, **one_field_differs(version, field)}
    # Packets 3.. carry the change (a new flow, or the same one after e.g. a window update).
    packets[3:] = [tcp_packet(version, payload_of(p), seq=tcp_fields(p)["seq"], ident=103 + i, **changed)
                   for i, p in enumerate(packets[3:])]
    frames = coalesce(packets)
    assert shape(frames) == [3, 3]
    check_merged_frame(frames[0], packets[:3])
    check_merged_frame(frames[1], packets[3:])
    assert unframe(frames) == packets


@pytest.mark.parametrize("seq_delta", [1, -1, 1000, -1000], ids=["gap-1", "overlap-1", "gap-segment",
                                                                 "retransmit"])
def test_coalesce_sequence_discontinuity_starts_a_new_run(seq_delta):
    packets = flow(3, 1000, 6) + flow(3, 1000, 6, seq=(4000 + seq_delta) % 2**32, ident=103)
    frames = coalesce(packets)
    assert shape(frames) == [3, 3]
    assert unframe(frames) == packets


def test_coalesce_across_sequence_wrap():
    packets = flow(4, 1000, 4, seq=2**32 - 1500)
    (frame,) = coalesce(packets)
    check_merged_frame(frame, packets)
    assert unframe([frame]) == packets


@pytest.mark.parametrize("flags", [SYN | ACK, FIN | ACK, RST | ACK, URG | ACK, ECE | ACK, CWR | ACK, 0, PSH,
                                   RST, CWR | ECE | ACK],
                         ids=["syn", "fin", "rst", "urg", "ece", "cwr", "none", "psh-no-ack", "rst-no-ack",
                              "cwr-ece"])
def test_coalesce_other_flags_never_merge(flags):
    packets = flow(5, 1000, 4)
    odd = tcp_packet(4, payload_of(packets[2]), seq=3000, ident=102, flags=flags)
    packets[2] = odd
    frames = coalesce(packets)
    assert frames[1] == [PLAIN_VNET_HEADER, odd]
    assert shape(frames) == [2, 1, 2]
    check_merged_frame(frames[0], packets[:2])
    check_merged_frame(frames[2], packets[3:])


def test_coalesce_empty_payload_never_merges():
    packets = flow(2, 1000, 4)
    pure_ack = tcp_packet(4, b"", seq=3000, ident=102)
    frames = coalesce(packets + [pure_ack, pure_ack])
    assert frames[1:] == [[PLAIN_VNET_HEADER, pure_ack]] * 2


def test_coalesce_respects_max_bytes():
    packets = flow(7, 1000, 4)
    frames = coalesce(packets, max_bytes=40 + 3 * 1000)
    assert shape(frames) == [3, 3, 1]
    assert all(len(join_frame(f)) - 10 <= 3040 for f in frames)
    assert unframe(frames) == packets
    # One byte less: runs of two.
    assert shape(coalesce(packets, max_bytes=40 + 3 * 1000 - 1)) == [2, 2, 2, 1]
    # Smaller than one packet: nothing merges, nothing is lost.
    assert coalesce(packets, max_bytes=100) == [[PLAIN_VNET_HEADER, p] for p in packets]


@pytest.mark.parametrize("version", [4, 6])
def test_coalesce_never_exceeds_65535(version):
    packets = flow(50, 1448, version)
    frames = coalesce(packets, max_bytes=10**6)
    head = 40 if version == 4 else 60
    per_frame = (65535 - head) // 1448
    assert shape(frames) == [per_frame, 50 - per_frame]
    assert all(len(join_frame(f)) - 10 <= 65535 for f in frames)
    assert unframe(frames) == packets


def test_coalesce_caps_runs_at_64_segments():
    packets = flow(130, 100, 4)
    frames = coalesce(packets)
    assert shape(frames) == [64, 64, 2]
    for frame, start in zip(frames, (0, 64, 128)):
        check_merged_frame(frame, packets[start:start + len(frame)])
    assert unframe(frames) == packets


def test_coalesce_run_of_one_is_plain_and_untouched():
    packet = flow(1, 1000, 4)[0]
    frames = coalesce([packet])
    assert frames == [[PLAIN_VNET_HEADER, packet]] and frames[0][1] is packet
    assert coalesce([]) == []


def test_coalesce_interleaved_flows_and_families_do_not_mix():
    a, b = flow(3, 1000, 4), flow(3, 1000, 6)
    mixed = [a[0], b[0], a[1], b[1], a[2], b[2]]
    assert coalesce(mixed) == [[PLAIN_VNET_HEADER, p] for p in mixed]
    frames = coalesce(a + b)
    assert shape(frames) == [3, 3]
    assert unframe(frames) == a + b


def test_coalesce_non_consecutive_ip_ids():
    # Kernel GRO would not merge these; merging is still safe for local delivery.  If the sandbox's
    # kernel re-segments the frame, the segments get consecutive IDs from the first one: only the
    # IPv4 ID (and so the header checksum) differ from what arrived.
    packets = [tcp_packet(4, b"i" * 1000, seq=1000 + i * 1000, ident=ident)
               for i, ident in enumerate([7, 1000, 3, 3])]
    (frame,) = coalesce(packets)
    check_merged_frame(frame, packets)
    again = unframe([frame])
    assert again != packets
    assert [tcp_fields(p)["ident"] for p in again] == [7, 8, 9, 10]
    strip = lambda p: p[:4] + p[6:10] + p[12:]
    assert [strip(p) for p in again] == [strip(p) for p in packets]
    assert all(ip_valid(p) and l4_valid(p) for p in again)


def test_coalesce_consecutive_ip_ids_round_trip_exactly():
    packets = flow(20, 1400, 4, ident=0xFFF0)  # IDs wrap past 0xffff as the kernel's do
    (frame,) = coalesce(packets)
    assert unframe([frame]) == packets


# --- what is emitted alone -------------------------------------------------------------------

# Each odd packet below is a variant of the packet that would come next in the flow of
# ``around()`` (seq 3000, IPv4 ID 102), so only its one defect keeps it out of the run.
_GOOD = {4: tcp_packet(4, b"g" * 1000, seq=3000, ident=102), 6: tcp_packet(6, b"g" * 1000, seq=3000)}
_G4, _G6 = _GOOD[4], _GOOD[6]
ALONE = {
    "udp": (4, udp_packet(4, b"u" * 1000)),
    "udp6": (6, udp_packet(6, b"u" * 1000)),
    "ipv4-fragment-mf": (4, ip_packet(4, 6, _G4[20:], ident=102, flags_offset=MF | DF)),
    "ipv4-fragment-offset": (4, ip_packet(4, 6, _G4[20:], ident=102, flags_offset=100)),
    "ipv4-options": (4, tcp_packet(4, b"g" * 1000, seq=3000, ident=102, ip_options=b"\x01" * 4)),
    "ipv4-bad-header-checksum": (4, _G4[:10] + bytes([_G4[10] ^ 1]) + _G4[11:]),
    "ipv4-total-short": (4, ip_packet(4, 6, _G4[20:], ident=102, total=1039)),
    "ipv4-total-long": (4, ip_packet(4, 6, _G4[20:], ident=102, total=1041)),
    "ipv4-padding": (4, _G4 + b"\0\0"),
    "ipv4-truncated": (4, _G4[:39]),
    "ipv4-header-only": (4, _G4[:20]),
    "ipv6-payload-length-short": (6, _G6[:4] + (1019).to_bytes(2, "big") + _G6[6:]),
    "ipv6-padding": (6, _G6 + b"\0\0"),
    "ipv6-truncated": (6, _G6[:59]),
    "ipv6-extension-header": (6, struct.pack("!IHBB16s16s", 6 << 28 | 0x12345, 1028, 0, 64, V6A, V6B)
                              + bytes([6, 0]) + bytes(6) + _G6[40:]),
    "tcp-data-offset-below-5": (4, with_byte(_G4, 32, 0x40)),
    "tcp-data-offset-beyond-packet": (4, ip_packet(4, 6, with_byte(_G4[20:60], 12, 0xF0), ident=102)),
    "tcp-headers-only": (4, tcp_packet(4, b"", seq=3000, ident=102)),
    "version-5": (4, b"\x55" + _G4[1:]),
    "empty": (4, b""),
    "one-byte": (4, b"\x45"),
}


def around(version: int) -> tuple[list[bytes], list[bytes]]:
    """Two segments before ``_GOOD[version]`` and two after it, all of one flow."""
    return flow(2, 1000, version), flow(2, 1000, version, seq=4000, ident=103)


@pytest.mark.parametrize("version", [4, 6])
def test_coalesce_alone_control(version):
    before, after = around(version)
    (frame,) = coalesce(before + [_GOOD[version]] + after)  # the unspoilt packet joins the run
    check_merged_frame(frame, before + [_GOOD[version]] + after)


@pytest.mark.parametrize("version, odd", ALONE.values(), ids=ALONE.keys())
def test_coalesce_emits_unmergeable_packets_alone(version, odd):
    before, after = around(version)
    frames = coalesce(before + [odd] + after)
    assert frames[1] == [PLAIN_VNET_HEADER, odd] and frames[1][1] is odd
    assert shape(frames) == [2, 1, 2]
    assert unframe(frames) == before + [odd] + after
    # And an unmergeable packet is never a run's first either.
    assert coalesce([odd] + after) == [[PLAIN_VNET_HEADER, odd], *coalesce(after)]


# --- hypothesis: coalesce never raises, loses, duplicates or reorders --------------------------


@given(st.lists(st.binary(max_size=120), max_size=20), st.integers(0, 70000))
def test_coalesce_fuzz_random_bytes(packets, max_bytes):
    frames = coalesce(packets, max_bytes)
    assert unframe(frames) == packets


@st.composite
def batches(draw):
    """A decrypted batch: segments of two flows (v4 and v6) with occasional gaps, short or empty
    payloads, other flags, plus garbage; each flow's IPv4 IDs consecutive, as senders' are."""
    seqs = {4: draw(st.integers(0, 2**32 - 1)), 6: draw(st.integers(0, 2**32 - 1))}
    ident = {4: draw(st.integers(0, 0xFFFF)), 6: 0}
    size = draw(st.sampled_from([1, 100, 1000, 1448]))
    out = []
    for _ in range(draw(st.integers(0, 80))):
        kind = draw(st.sampled_from(["v4"] * 6 + ["v6"] * 3 + ["garbage", "gap", "short"]))
        if kind == "garbage":
            out.append(draw(st.binary(max_size=80)))
            continue
        version = 6 if kind == "v6" else 4
        length = size if kind != "short" else draw(st.integers(0, size))
        if kind == "gap":
            seqs[version] = (seqs[version] + draw(st.integers(1, 3000))) % 2**32
        flags = draw(st.sampled_from([ACK] * 8 + [ACK | PSH, ACK | FIN, SYN, ACK | CWR]))
        out.append(tcp_packet(version, bytes([len(out) % 256]) * length, seq=seqs[version], flags=flags,
                              ident=ident[version]))
        seqs[version] = (seqs[version] + length) % 2**32
        ident[version] = (ident[version] + 1) & 0xFFFF
    return out


@settings(max_examples=80)
@given(batches(), st.sampled_from([65535, 10**6, 5000, 1500]))
def test_coalesce_batches_round_trip(packets, max_bytes):
    frames = coalesce(packets, max_bytes)
    assert unframe(frames) == packets  # nothing lost, duplicated, reordered or changed
    check_frames(frames, packets, max_bytes)
    assert shape(frames) == ref_shape(packets, max_bytes)  # and every run as long as the rules allow
