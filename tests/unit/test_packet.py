"""Unit tests for tether.net.packet: the tun packet codec.

Packets fed to ``parse`` are built here by hand with struct, independently of the module (the
``ref_*`` helpers, with their own word-by-word RFC 1071 checksum), and every packet the module builds
is checked the way a receiving kernel would: the IPv4 header, and the UDP/ICMPv6 segment with its
pseudo-header (or the ICMPv4 message), must each sum to zero.  When scapy is installed the same
packets are cross-checked against its encoder/decoder (skipped otherwise: scapy is not a dependency).
Every malformed kind is named in the test ids; random and mutated bytes raise only ValueError.
"""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tether.net import packet as pk
from tether.net.packet import Icmp, Packet, build_echo_reply, build_udp, build_unreachable, checksum, parse

from reference_checksum import ref_checksum, ref_pseudo

V4A, V4B = ipaddress.IPv4Address("10.0.2.100"), ipaddress.IPv4Address("203.0.113.10")
V6A, V6B = ipaddress.IPv6Address("fd00:7e7e::100"), ipaddress.IPv6Address("2001:db8:10::10")
HOPOPTS, ROUTING, FRAGMENT, DSTOPTS = 0, 43, 44, 60

# ---------------------------------------------------------------------------------------------
# Independent reference encoders (no tether code)


def ref_ipv4(src, dst, proto: int, payload: bytes, *, ttl: int = 64, options: bytes = b"",
             flags_offset: int = 0, total: int | None = None, ihl: int | None = None) -> bytes:
    ihl = (20 + len(options)) // 4 if ihl is None else ihl
    total = 20 + len(options) + len(payload) if total is None else total
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 0x1234, flags_offset, ttl, proto, 0,
                         ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed) + options
    header = header[:10] + ref_checksum(header).to_bytes(2, "big") + header[12:]
    return header + payload


def ref_ipv6(src, dst, next_header: int, payload: bytes, *, hop_limit: int = 64,
             payload_len: int | None = None) -> bytes:
    payload_len = len(payload) if payload_len is None else payload_len
    return struct.pack("!IHBB16s16s", 0x60012345, payload_len, next_header, hop_limit,
                       ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed) + payload


def ref_ip(src, dst, proto: int, payload: bytes, ttl: int = 64) -> bytes:
    if ipaddress.ip_address(src).version == 4:
        return ref_ipv4(src, dst, proto, payload, ttl=ttl)
    return ref_ipv6(src, dst, proto, payload, hop_limit=ttl)


def ref_udp(src, dst, sport: int, dport: int, data: bytes, *, length: int | None = None) -> bytes:
    length = 8 + len(data) if length is None else length
    segment = struct.pack("!HHHH", sport, dport, length, 0) + data
    pseudo = ref_pseudo(ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed, 17, len(segment))
    return segment[:6] + (ref_checksum(pseudo + segment) or 0xFFFF).to_bytes(2, "big") + segment[8:]


def ref_icmp(src, dst, kind: int, code: int, rest: bytes, body: bytes) -> bytes:
    message = struct.pack("!BBH", kind, code, 0) + rest + body
    if ipaddress.ip_address(src).version == 6:
        value = ref_checksum(ref_pseudo(ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed,
                                        58, len(message)) + message)
    else:
        value = ref_checksum(message)
    return message[:2] + value.to_bytes(2, "big") + message[4:]


def ref_echo(src, dst, identifier: int, sequence: int, data: bytes, *, reply: bool = False) -> bytes:
    v6 = ipaddress.ip_address(src).version == 6
    kind = (129 if reply else 128) if v6 else (0 if reply else 8)
    message = ref_icmp(src, dst, kind, 0, struct.pack("!HH", identifier, sequence), data)
    return ref_ip(src, dst, 58 if v6 else 1, message)


def ext(next_header: int, units: int = 0) -> bytes:
    """A generic IPv6 extension header of (units + 1) * 8 bytes, padded with PadN-like bytes."""
    return bytes([next_header, units]) + bytes([1, (units + 1) * 8 - 4]) + bytes((units + 1) * 8 - 4)


def frag(next_header: int, offset: int = 0, more: bool = False) -> bytes:
    return struct.pack("!BBHI", next_header, 0, offset << 3 | more, 0xCAFE)


def assert_checksums(raw: bytes) -> None:
    """What the receiving kernel checks, recomputed here (packets the module builds: no options)."""
    if raw[0] >> 4 == 4:
        assert ref_checksum(raw[:20]) == 0, "IPv4 header checksum"
        assert int.from_bytes(raw[2:4], "big") == len(raw)
        proto, src, dst, l4 = raw[9], raw[12:16], raw[16:20], raw[20:]
    else:
        assert int.from_bytes(raw[4:6], "big") == len(raw) - 40
        proto, src, dst, l4 = raw[6], raw[8:24], raw[24:40], raw[40:]
    if proto == 1:
        assert ref_checksum(l4) == 0, "ICMP checksum"
    else:
        assert proto in (17, 58)
        assert ref_checksum(ref_pseudo(src, dst, proto, len(l4)) + l4) == 0, f"proto {proto} checksum"


# ---------------------------------------------------------------------------------------------
# Strategies

families = st.sampled_from([4, 6])


def address_pair(version: int):
    return st.tuples(st.ip_addresses(v=version), st.ip_addresses(v=version))


pairs = families.flatmap(address_pair)
ports = st.integers(0, 0xFFFF)
# Payload sizes the issue names (0, 1, 1400, the IPv4 maximum) and anything small, random content.
sizes = st.one_of(st.sampled_from([0, 1, 1400, 65507]), st.integers(0, 2000))
payloads = st.builds(lambda n, rnd: rnd.randbytes(n), sizes, st.randoms(use_true_random=False))
unicast_pairs = pairs.filter(lambda p: not (p[0].is_multicast or p[0].is_unspecified or p[1].is_multicast
                                            or p[1] == ipaddress.IPv4Address("255.255.255.255")))

# ---------------------------------------------------------------------------------------------
# checksum


def test_checksum_rfc1071_example():
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to 0xddf2.
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == ~0xDDF2 & 0xFFFF


@pytest.mark.parametrize("data, expected", [
    (b"", 0xFFFF), (b"\0" * 101, 0xFFFF), (b"\xff" * 64, 0), (b"\x01", 0xFEFF), (b"\x00\x01", 0xFFFE),
], ids=["empty", "zeros", "all-ones", "odd-single", "one-word"])
def test_checksum_edges(data, expected):
    assert checksum(data) == expected == ref_checksum(data)


@given(st.one_of(st.binary(max_size=300),
                 st.builds(lambda n, rnd: rnd.randbytes(n), st.sampled_from([4095, 4096, 4097, 8191, 8193, 65535]),
                           st.randoms(use_true_random=False))))
def test_checksum_matches_word_by_word(data):
    assert checksum(data) == ref_checksum(data)
    assert checksum(bytearray(data)) == checksum(memoryview(data)) == ref_checksum(data)


@given(st.binary(max_size=200).map(lambda b: b + bytes(len(b) % 2)))
def test_checksum_inserted_folds_to_zero(data):
    whole = data + checksum(data).to_bytes(2, "big")
    assert checksum(whole) == 0


# ---------------------------------------------------------------------------------------------
# UDP


@given(pairs, ports, ports, payloads, st.integers(0, 255))
@example((V4A, V4B), 1, 2, bytes(range(256)) * 255 + bytes(227), 64)  # 65507 bytes: a 65535-byte packet
@example((V6A, V6B), 1, 2, bytes(range(256)) * 255 + bytes(247), 1)  # 65527 bytes
def test_udp_round_trip(addresses, sport, dport, data, ttl):
    src, dst = addresses
    raw = build_udp(src, sport, dst, dport, data, ttl=ttl)
    assert_checksums(raw)
    packet = parse(raw)
    assert (packet.version, packet.src, packet.dst, packet.proto, packet.ttl) == (src.version, src, dst, 17, ttl)
    assert packet.hop_limit == ttl and not packet.fragment and packet.icmp is None
    assert packet.udp is not None
    assert (packet.udp.src_port, packet.udp.dst_port, packet.udp.data) == (sport, dport, data)
    assert len(packet.header) == (20 if src.version == 4 else 40)
    assert packet.header + packet.payload == raw
    # The module's encoding is the reference encoding (IPv4 fixed fields aside: id 0, DF).
    l4 = raw[len(packet.header):]
    assert l4 == ref_udp(src, dst, sport, dport, data)


@pytest.mark.parametrize("src, dst, size, total", [
    (V4A, V4B, 65507, 65535), (V6A, V6B, 65527, 65575),
], ids=["ipv4-65507", "ipv6-65527"])
def test_udp_largest_datagram(src, dst, size, total):
    data = random.Random(size).randbytes(size)
    raw = build_udp(src, 4000, dst, 53, data)
    assert len(raw) == total
    assert_checksums(raw)
    assert parse(raw).udp.data == data


@pytest.mark.parametrize("src, dst, size", [(V4A, V4B, 65508), (V6A, V6B, 65528)], ids=["ipv4", "ipv6"])
def test_udp_too_large(src, dst, size):
    with pytest.raises(ValueError, match="exceeds"):
        build_udp(src, 1, dst, 2, bytes(size))


@pytest.mark.parametrize("args, match", [
    ((V4A, 1, V6B, 2, b""), "families differ"),
    ((V4A, -1, V4B, 2, b""), "source port"),
    ((V4A, 1, V4B, 65536, b""), "destination port"),
], ids=["mixed-families", "negative-port", "port-too-large"])
def test_udp_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        build_udp(*args)


def test_udp_bad_ttl():
    with pytest.raises(ValueError, match="TTL"):
        build_udp(V4A, 1, V4B, 2, b"", ttl=256)


def test_udp_accepts_address_strings_and_buffers():
    raw = build_udp("10.0.2.100", 5, "203.0.113.10", 6, memoryview(b"xyz"))
    assert raw == build_udp(V4A, 5, V4B, 6, b"xyz")
    assert parse(bytearray(raw)) == parse(memoryview(raw)) == parse(raw)


@pytest.mark.parametrize("src, dst", [(V4A, V4B), (V6A, V6B)], ids=["ipv4", "ipv6"])
def test_udp_computed_zero_checksum_is_sent_as_ffff(src, dst):
    # With data equal to the checksum of a 2-byte zero payload, the words sum to 0xffff: checksum 0.
    probe = build_udp(src, 7, dst, 9, b"\0\0")
    data = probe[-4:-2]
    raw = build_udp(src, 7, dst, 9, data)
    assert raw[-4:-2] == b"\xff\xff"
    assert_checksums(raw)


# ---------------------------------------------------------------------------------------------
# parse: packets built by hand


@given(st.sampled_from([b"", b"\x01" * 4, b"\x07\x07\x04" + bytes(37)]), st.integers(0, 255), ports, ports,
       st.binary(max_size=100))
def test_parse_ipv4_with_options(options, ttl, sport, dport, data):
    raw = ref_ipv4(V4A, V4B, 17, ref_udp(V4A, V4B, sport, dport, data), ttl=ttl, options=options)
    packet = parse(raw)
    assert len(packet.header) == 20 + len(options) and packet.header == raw[:20 + len(options)]
    assert packet.ttl == ttl and packet.proto == 17 and packet.proto_offset == 9
    assert packet.udp == pk.Udp(sport, dport, data)


@given(st.lists(st.tuples(st.sampled_from([ROUTING, DSTOPTS, FRAGMENT]), st.integers(0, 3)), max_size=6),
       st.booleans(), st.binary(max_size=64))
def test_parse_ipv6_extension_chain(chain, hop_by_hop, data):
    """Any chain of up to 7 headers (hop-by-hop first, atomic fragments) is walked to the UDP."""
    kinds = ([(HOPOPTS, 1)] if hop_by_hop else []) + chain
    segment = ref_udp(V6A, V6B, 1234, 53, data)
    headers, offsets, offset = b"", [], 40
    for i, (kind, units) in enumerate(kinds):
        following = kinds[i + 1][0] if i + 1 < len(kinds) else 17
        piece = frag(following) if kind == FRAGMENT else ext(following, units)
        offsets.append(offset)
        headers += piece
        offset += len(piece)
    first = kinds[0][0] if kinds else 17
    raw = ref_ipv6(V6A, V6B, first, headers + segment)
    packet = parse(raw)
    assert packet.proto == 17 and not packet.fragment
    assert packet.header == raw[:40 + len(headers)] and packet.payload == segment
    assert packet.proto_offset == (offsets[-1] if offsets else 6)
    assert packet.udp == pk.Udp(1234, 53, data)


def test_parse_ipv6_extension_bound_is_exact():
    segment = ref_udp(V6A, V6B, 1, 2, b"ok")
    eight = b"".join(ext(DSTOPTS) for _ in range(7)) + ext(17)
    assert parse(ref_ipv6(V6A, V6B, DSTOPTS, eight + segment)).udp.data == b"ok"
    nine = b"".join(ext(DSTOPTS) for _ in range(8)) + ext(17)
    with pytest.raises(ValueError, match="more than 8 IPv6 extension headers"):
        parse(ref_ipv6(V6A, V6B, DSTOPTS, nine + segment))


@given(st.sampled_from([4, 6]), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(max_size=200))
def test_parse_echo_request(version, identifier, sequence, data):
    src, dst = (V4A, V4B) if version == 4 else (V6A, V6B)
    packet = parse(ref_echo(src, dst, identifier, sequence, data))
    assert packet.proto == (1 if version == 4 else 58)
    assert packet.icmp == Icmp(8 if version == 4 else 128, 0, identifier, sequence, data)
    assert packet.icmp.is_echo and packet.udp is None


def test_parse_other_icmp_keeps_rest_of_header_in_data():
    quoted = ref_ipv4(V4B, V4A, 17, ref_udp(V4B, V4A, 1, 2, b""))
    packet = parse(ref_ipv4(V4A, V4B, 1, ref_icmp(V4A, V4B, 3, 3, bytes(4), quoted)))
    assert packet.icmp == Icmp(3, 3, None, None, bytes(4) + quoted)
    assert not packet.icmp.is_echo


def test_parse_icmpv4_number_in_ipv6_is_just_a_protocol():
    packet = parse(ref_ipv6(V6A, V6B, 1, b"\x08"))
    assert packet.proto == 1 and packet.icmp is None and packet.payload == b"\x08"


@pytest.mark.parametrize("version", [4, 6])
def test_parse_other_protocol(version):
    src, dst = (V4A, V4B) if version == 4 else (V6A, V6B)
    packet = parse(ref_ip(src, dst, 47, b"gre!"))
    assert (packet.proto, packet.payload, packet.udp, packet.icmp) == (47, b"gre!", None, None)


@pytest.mark.parametrize("version", [4, 6])
def test_parse_trims_trailing_bytes(version):
    src, dst = (V4A, V4B) if version == 4 else (V6A, V6B)
    raw = ref_ip(src, dst, 17, ref_udp(src, dst, 1, 2, b"data"))
    packet = parse(raw + b"\0" * 6)
    assert packet.header + packet.payload == raw and packet.udp.data == b"data"


def test_parse_ipv4_fragments():
    whole = ref_udp(V4A, V4B, 1000, 2000, bytes(range(40)))
    first = parse(ref_ipv4(V4A, V4B, 17, whole[:24], flags_offset=0x2000))
    assert first.fragment and not first.later_fragment
    assert first.udp == pk.Udp(1000, 2000, bytes(range(16)))
    later = parse(ref_ipv4(V4A, V4B, 17, whole[24:], flags_offset=3))
    assert later.fragment and later.later_fragment and later.udp is None
    assert later.proto == 17 and later.payload == whole[24:]
    last_icmp = parse(ref_ipv4(V4A, V4B, 1, b"\x00" * 3, flags_offset=5))
    assert last_icmp.fragment and last_icmp.icmp is None  # 3 bytes: no ICMP header, yet no error


def test_parse_ipv6_fragments():
    whole = ref_udp(V6A, V6B, 1000, 2000, bytes(range(40)))
    first = parse(ref_ipv6(V6A, V6B, FRAGMENT, frag(17, 0, True) + whole[:24]))
    assert first.fragment and first.udp == pk.Udp(1000, 2000, bytes(range(16)))
    assert first.proto_offset == 40 and len(first.header) == 48
    later = parse(ref_ipv6(V6A, V6B, HOPOPTS, ext(FRAGMENT) + frag(17, 3) + whole[24:]))
    assert later.fragment and later.later_fragment and later.udp is None
    assert later.proto == 17 and later.payload == whole[24:] and len(later.header) == 56
    # Later fragment whose fragmentable part starts with another header: not walked (it is data).
    opaque = parse(ref_ipv6(V6A, V6B, FRAGMENT, frag(DSTOPTS, 1) + b"\xff" * 3))
    assert opaque.proto == DSTOPTS and opaque.payload == b"\xff" * 3
    atomic = parse(ref_ipv6(V6A, V6B, FRAGMENT, frag(17) + whole))
    assert not atomic.fragment and atomic.udp.data == bytes(range(40))


# ---------------------------------------------------------------------------------------------
# parse: malformed input, every kind named

_UDP4 = ref_udp(V4A, V4B, 1, 2, b"abcd")
_UDP6 = ref_udp(V6A, V6B, 1, 2, b"abcd")
MALFORMED = {
    "empty": (b"", "empty packet"),
    "bad-version-0": (b"\x05" + bytes(39), "IP version 0"),
    "bad-version-5": (b"\x55" + bytes(39), "IP version 5"),
    "bad-version-15": (b"\xff" * 60, "IP version 15"),
    "ipv4-truncated-header": (ref_ipv4(V4A, V4B, 17, b"")[:19], "truncated IPv4 header"),
    "ipv4-ihl-0": (ref_ipv4(V4A, V4B, 17, _UDP4, ihl=0), "IHL 0 < 5"),
    "ipv4-ihl-4": (ref_ipv4(V4A, V4B, 17, _UDP4, ihl=4), "IHL 4 < 5"),
    "ipv4-ihl-beyond-data": (ref_ipv4(V4A, V4B, 17, b"", ihl=15) + bytes(8), "header length 60 exceeds"),
    "ipv4-total-length-beyond-data": (ref_ipv4(V4A, V4B, 17, _UDP4, total=20 + len(_UDP4) + 1),
                                      "total length 33 exceeds the 32 bytes"),
    "ipv4-total-length-below-header": (ref_ipv4(V4A, V4B, 17, _UDP4, total=19), "shorter than its header"),
    "ipv6-truncated-header": (ref_ipv6(V6A, V6B, 17, b"")[:39], "truncated IPv6 header"),
    "ipv6-payload-length-beyond-data": (ref_ipv6(V6A, V6B, 17, _UDP6, payload_len=13), "payload length 13"),
    "ipv4-truncated-udp-header": (ref_ipv4(V4A, V4B, 17, _UDP4[:7]), "truncated UDP header"),
    "ipv6-truncated-udp-header": (ref_ipv6(V6A, V6B, 17, b""), "truncated UDP header"),
    "udp-length-below-8": (ref_ipv4(V4A, V4B, 17, ref_udp(V4A, V4B, 1, 2, b"", length=7)), "UDP length 7 < 8"),
    "udp-length-longer-than-segment": (ref_ipv4(V4A, V4B, 17, ref_udp(V4A, V4B, 1, 2, b"ab", length=11)),
                                       "UDP length 11 does not match the 10-byte"),
    "udp-length-shorter-than-segment": (ref_ipv6(V6A, V6B, 17, ref_udp(V6A, V6B, 1, 2, b"ab", length=9)),
                                        "UDP length 9 does not match"),
    "udp-first-fragment-length-short": (ref_ipv4(V4A, V4B, 17, ref_udp(V4A, V4B, 1, 2, bytes(8), length=9),
                                                 flags_offset=0x2000), "UDP length 9 does not match"),
    "icmp-truncated-header": (ref_ipv4(V4A, V4B, 1, b"\x03\x03\x00"), "truncated ICMP header"),
    "icmp-truncated-echo": (ref_ipv4(V4A, V4B, 1, b"\x08\x00\x00\x00\x00\x01"), "truncated ICMP echo header"),
    "icmpv6-truncated-echo": (ref_ipv6(V6A, V6B, 58, b"\x80\x00\x00\x00"), "truncated ICMP echo header"),
    "ipv6-ext-header-truncated-chain": (ref_ipv6(V6A, V6B, HOPOPTS, ext(DSTOPTS) + ext(17)[:5]),
                                        "truncated IPv6 destination options header at offset 48"),
    "ipv6-ext-header-length-beyond-payload": (ref_ipv6(V6A, V6B, ROUTING, ext(17, 2)[:16]),
                                              "routing header at offset 40: 24 bytes declared, 16"),
    "ipv6-fragment-header-truncated": (ref_ipv6(V6A, V6B, FRAGMENT, frag(17)[:7]), "truncated IPv6 fragment"),
    "ipv6-ext-header-beyond-payload-length": (ref_ipv6(V6A, V6B, DSTOPTS, ext(17) + _UDP6, payload_len=4),
                                              "truncated IPv6 destination options"),
    "ipv6-ext-header-loop-bound": (ref_ipv6(V6A, V6B, DSTOPTS, ext(DSTOPTS) * 40 + ext(17) + _UDP6),
                                   "more than 8 IPv6 extension headers"),
    "ipv6-hop-by-hop-not-first": (ref_ipv6(V6A, V6B, DSTOPTS, ext(HOPOPTS) + ext(17) + _UDP6),
                                  "hop-by-hop options header at offset 48, not first"),
}


@pytest.mark.parametrize("raw, match", MALFORMED.values(), ids=MALFORMED.keys())
def test_parse_malformed(raw, match):
    with pytest.raises(ValueError, match=match):
        parse(raw)


def _valid_samples() -> list[bytes]:
    return [
        build_udp(V4A, 1, V4B, 2, b"hello"),
        build_udp(V6A, 1, V6B, 2, b"hello"),
        ref_ipv4(V4A, V4B, 17, _UDP4, options=b"\x01" * 8),
        ref_echo(V4A, V4B, 1, 2, b"ping"),
        ref_echo(V6A, V6B, 1, 2, b"ping"),
        ref_ipv6(V6A, V6B, HOPOPTS, ext(ROUTING) + ext(FRAGMENT, 1) + frag(DSTOPTS, 0, True) + ext(17) + _UDP6),
        ref_ipv6(V6A, V6B, FRAGMENT, frag(58, 7) + b"\x80"),
    ]


@pytest.mark.parametrize("raw", _valid_samples(), ids=lambda raw: raw[:2].hex())
def test_parse_every_truncation(raw):
    parse(raw)
    for end in range(len(raw)):
        try:
            parse(raw[:end])
        except ValueError:
            pass


def _outcome(raw: bytes) -> Packet | None:
    try:
        return parse(raw)
    except ValueError as error:
        assert str(error)  # a message for the log, never empty
        return None


@given(st.binary(max_size=300))
def test_fuzz_random_bytes(raw):
    _outcome(raw)


@given(st.sampled_from([0x45, 0x46, 0x4F, 0x60]), st.binary(max_size=300))
def test_fuzz_plausible_first_byte(first, rest):
    _outcome(bytes([first]) + rest)


@given(st.sampled_from(_valid_samples()), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
       st.integers(0, 300))
def test_fuzz_mutated_valid_packets(raw, flips, cut):
    mutated = bytearray(raw)
    for position, value in flips:
        if position < len(mutated):
            mutated[position] = value
    _outcome(bytes(mutated[:cut]))


@given(st.binary(max_size=200), st.sampled_from(["port", "admin", "protocol", "net", "host"]))
def test_fuzz_unreachable_raises_only_value_error(raw, kind):
    src = V4A if raw[:1] and raw[0] >> 4 == 4 else V6A
    try:
        assert_checksums(build_unreachable(raw, kind, src))
    except ValueError:
        pass


# ---------------------------------------------------------------------------------------------
# Echo reply


@given(families, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), payloads, st.booleans())
@example(4, 0xFFFF, 0, b"\xa5" * 65507, False)
@example(6, 0, 0xFFFF, b"\x5a" * 65507, False)
def test_echo_reply_round_trip(version, identifier, sequence, data, replace):
    src, dst = (V4A, V4B) if version == 4 else (V6A, V6B)
    request = parse(ref_echo(src, dst, identifier, sequence, data))
    raw = build_echo_reply(request, b"other" if replace else None)
    assert_checksums(raw)
    reply = parse(raw)
    assert (reply.src, reply.dst, reply.proto, reply.ttl) == (dst, src, request.proto, 64)
    expected = b"other" if replace else data
    assert reply.icmp == Icmp(0 if version == 4 else 129, 0, identifier, sequence, expected)
    assert raw[len(reply.header):] == ref_icmp(dst, src, reply.icmp.type, 0,
                                               struct.pack("!HH", identifier, sequence), expected)


def test_echo_reply_largest():
    request = parse(ref_echo(V4A, V4B, 1, 1, bytes(65507)))
    assert len(build_echo_reply(request)) == 65535
    with pytest.raises(ValueError, match="exceeds 65507"):
        build_echo_reply(request, bytes(65508))


@pytest.mark.parametrize("raw, match", [
    (build_udp(V4A, 1, V4B, 2, b""), "not an ICMP echo request"),
    (ref_echo(V4A, V4B, 1, 2, b"", reply=True), "not an ICMP echo request"),
    (ref_echo(V6A, V6B, 1, 2, b"", reply=True), "not an ICMP echo request"),
    (ref_ipv4(V4A, V4B, 1, ref_icmp(V4A, V4B, 8, 0, bytes(4), bytes(16)), flags_offset=0x2000), "fragment"),
    (ref_echo(V6A, "ff02::1", 1, 2, b""), "unicast source"),
    (ref_echo(V4A, "255.255.255.255", 1, 2, b""), "unicast source"),
], ids=["udp", "echo-reply-v4", "echo-reply-v6", "first-fragment", "to-multicast", "to-broadcast"])
def test_echo_reply_refused(raw, match):
    with pytest.raises(ValueError, match=match):
        build_echo_reply(parse(raw))


def test_echo_reply_with_another_sequence():
    request = parse(ref_echo(V6A, V6B, 77, 1, b"seq"))
    reply = parse(build_echo_reply(request.with_sequence(9)))
    assert (reply.icmp.identifier, reply.icmp.sequence, reply.icmp.data) == (77, 9, b"seq")
    with pytest.raises(ValueError, match="out of range"):
        request.with_sequence(65536)
    with pytest.raises(ValueError, match="not an ICMP echo"):
        parse(build_udp(V4A, 1, V4B, 2, b"")).with_sequence(1)


# ---------------------------------------------------------------------------------------------
# ICMP errors

EXPECTED_CODES = [
    (4, "net", 3, 0), (4, "host", 3, 1), (4, "protocol", 3, 2), (4, "port", 3, 3), (4, "admin", 3, 13),
    (6, "net", 1, 0), (6, "admin", 1, 1), (6, "host", 1, 3), (6, "port", 1, 4), (6, "protocol", 4, 1),
]


@pytest.mark.parametrize("version, kind, icmp_type, code", EXPECTED_CODES,
                         ids=[f"ipv{v}-{k}" for v, k, _, _ in EXPECTED_CODES])
def test_unreachable_type_code_and_quote(version, kind, icmp_type, code):
    client, server = (V4A, V4B) if version == 4 else (V6A, V6B)
    original = build_udp(client, 40000, server, 53, b"query")
    raw = build_unreachable(original, kind, server)
    assert_checksums(raw)
    error = parse(raw)
    assert (error.src, error.dst, error.icmp.type, error.icmp.code) == (server, client, icmp_type, code)
    rest = (6).to_bytes(4, "big") if (version, kind) == (6, "protocol") else bytes(4)
    assert error.icmp.data == rest + original
    assert raw[len(error.header):] == ref_icmp(server, client, icmp_type, code, rest, original)


@pytest.mark.parametrize("original, cap, quoted", [
    (build_udp(V4A, 1, V4B, 2, bytes(1472)), 576, 548),
    (build_udp(V4A, 1, V4B, 2, bytes(65507)), 576, 548),
    (build_udp(V4A, 1, V4B, 2, bytes(520)), 576, 548),  # exactly fits
    (build_udp(V4A, 1, V4B, 2, bytes(0)), 56, 28),
    (ref_ipv4(V4A, V4B, 17, _UDP4, options=bytes(40)), 20 + 8 + 72, 72),  # 60-byte header + UDP: all of it
    (build_udp(V6A, 1, V6B, 2, bytes(1452)), 1280, 1232),
    (build_udp(V6A, 1, V6B, 2, bytes(65527)), 1280, 1232),
    (build_udp(V6A, 1, V6B, 2, bytes(100)), 196, 148),
], ids=["v4-mtu", "v4-64k", "v4-exact", "v4-empty", "v4-options", "v6-mtu", "v6-64k", "v6-small"])
def test_unreachable_quote_and_size_cap(original, cap, quoted):
    src = V4B if original[0] >> 4 == 4 else V6B
    raw = build_unreachable(original, "port", src)
    assert len(raw) == cap and cap <= (576 if original[0] >> 4 == 4 else 1280)
    assert_checksums(raw)
    assert parse(raw).icmp.data[4:] == original[:quoted]


def test_unreachable_quote_excludes_trailing_padding():
    original = build_udp(V4A, 1, V4B, 2, b"x")
    assert parse(build_unreachable(original + bytes(10), "port", V4B)).icmp.data[4:] == original


def test_unreachable_ipv6_protocol_pointer_after_extension_headers():
    original = ref_ipv6(V6A, V6B, HOPOPTS, ext(DSTOPTS) + ext(253, 1) + b"experimental")
    error = parse(build_unreachable(original, "protocol", V6B))
    assert (error.icmp.type, error.icmp.code) == (4, 1)
    pointer = int.from_bytes(error.icmp.data[:4], "big")
    assert pointer == 48 and original[pointer] == 253


def test_unreachable_of_garbled_l4_still_sent():
    # The refusal needs only the IP header: a truncated UDP header is still refused loudly.
    original = ref_ipv4(V4A, V4B, 17, b"\x01\x02")
    assert parse(build_unreachable(original, "port", V4B)).icmp.data[4:] == original


@pytest.mark.parametrize("version", [4, 6])
def test_unreachable_for_echo_request_allowed(version):
    client, server = (V4A, V4B) if version == 4 else (V6A, V6B)
    original = ref_echo(client, server, 9, 9, b"ping")
    assert parse(build_unreachable(original, "admin", server)).icmp.data[4:] == original


@given(unicast_pairs, payloads, st.sampled_from(["port", "admin", "protocol", "net", "host"]))
@example((V4A, V4B), b"\x01" * 65507, "port")
@example((V6A, V6B), b"\x01" * 65507, "protocol")
def test_unreachable_any_udp(addresses, data, kind):
    src, dst = addresses
    original = build_udp(src, 5, dst, 6, data[:65507])
    raw = build_unreachable(original, kind, dst)
    assert_checksums(raw)
    header_len, cap = (20, 576) if src.version == 4 else (40, 1280)
    assert len(raw) == min(cap, header_len + 8 + len(original))
    error = parse(raw)
    assert error.dst == src and error.src == dst
    quote = error.icmp.data[4:]
    assert original.startswith(quote) and len(quote) >= min(len(original), 28)


REFUSED = {
    "icmpv4-error": (ref_ipv4(V4A, V4B, 1, ref_icmp(V4A, V4B, 3, 3, bytes(4), bytes(28))), V4B, "ICMP error"),
    "icmpv4-unknown-type": (ref_ipv4(V4A, V4B, 1, ref_icmp(V4A, V4B, 200, 0, bytes(4), b"")), V4B,
                            "ICMP error"),
    "icmpv6-error": (ref_ipv6(V6A, V6B, 58, ref_icmp(V6A, V6B, 1, 4, bytes(4), bytes(48))), V6B, "ICMP error"),
    "icmp-empty": (ref_ipv4(V4A, V4B, 1, b""), V4B, "type is missing"),
    "ipv4-later-fragment": (ref_ipv4(V4A, V4B, 17, bytes(16), flags_offset=2), V4B, "other than the first"),
    "ipv6-later-fragment": (ref_ipv6(V6A, V6B, FRAGMENT, frag(17, 2) + bytes(16)), V6B, "other than the first"),
    "from-unspecified-v4": (build_udp("0.0.0.0", 68, "255.255.255.255", 67, b""), V4B, "from 0.0.0.0"),
    "from-unspecified-v6": (build_udp("::", 1, V6B, 2, b""), V6B, r"from ::"),
    "from-multicast": (build_udp("224.0.0.1", 1, V4B, 2, b""), V4B, "from 224.0.0.1"),
    "to-multicast-v6": (build_udp(V6A, 1, "ff02::fb", 5353, b""), V6B, "to ff02::fb"),
    "to-broadcast": (build_udp(V4A, 1, "255.255.255.255", 2, b""), V4B, "to 255.255.255.255"),
    "family-mismatch": (build_udp(V4A, 1, V4B, 2, b""), V6B, "not IPv4"),
    "malformed-original": (b"\x45\x00", V4B, "truncated IPv4 header"),
    "empty-original": (b"", V4B, "empty packet"),
}


@pytest.mark.parametrize("original, src, match", REFUSED.values(), ids=REFUSED.keys())
def test_unreachable_refused(original, src, match):
    with pytest.raises(ValueError, match=match):
        build_unreachable(original, "port", src)


def test_unreachable_unknown_kind():
    with pytest.raises(ValueError, match="unknown unreachable kind"):
        build_unreachable(build_udp(V4A, 1, V4B, 2, b""), "nope", V4B)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Cross-check with scapy (optional)


def test_scapy_agrees():
    scapy = pytest.importorskip("scapy.all")
    IP, IPv6, UDP, ICMP, raw_of = scapy.IP, scapy.IPv6, scapy.UDP, scapy.ICMP, scapy.raw
    rnd = random.Random(7)
    for size in (0, 1, 3, 1400, 65507):
        data = rnd.randbytes(size)
        ours = build_udp(V4A, 4000, V4B, 53, data)
        assert ours == raw_of(IP(src=str(V4A), dst=str(V4B), id=0, flags="DF") / UDP(sport=4000, dport=53) / data)
        ours6 = build_udp(V6A, 4000, V6B, 53, data)
        assert ours6 == raw_of(IPv6(src=str(V6A), dst=str(V6B)) / UDP(sport=4000, dport=53) / data)
    # Echo: scapy builds the request, we reply; scapy recomputes our checksums and gets the same.
    for request, layer in ((IP(src=str(V4A), dst=str(V4B)) / ICMP(id=3, seq=4) / b"abc", IP),
                           (IPv6(src=str(V6A), dst=str(V6B)) / scapy.ICMPv6EchoRequest(id=3, seq=4, data=b"abc"),
                            IPv6)):
        reply = build_echo_reply(parse(raw_of(request)))
        decoded = layer(reply)
        if layer is IP:
            assert decoded[ICMP].id == 3 and decoded[ICMP].seq == 4 and decoded[ICMP].type == 0
        else:
            assert decoded[scapy.ICMPv6EchoReply].data == b"abc"
        for field_layer in decoded.layers():
            if hasattr(decoded[field_layer], "chksum") or hasattr(decoded[field_layer], "cksum"):
                name = "chksum" if hasattr(decoded[field_layer], "chksum") else "cksum"
                recomputed = decoded.copy()
                delattr(recomputed[field_layer], name)
                assert raw_of(recomputed) == reply, field_layer
    # Errors: scapy decodes our quote as the original headers.
    original = raw_of(IP(src=str(V4A), dst=str(V4B)) / UDP(sport=1111, dport=2222) / (b"q" * 1000))
    error = IP(build_unreachable(original, "port", V4B))
    assert error[ICMP].type == 3 and error[ICMP].code == 3 and len(error) == 576
    assert error[scapy.UDPerror].sport == 1111 and error[scapy.IPerror].dst == str(V4B)
    original6 = raw_of(IPv6(src=str(V6A), dst=str(V6B)) / scapy.IPv6ExtHdrHopByHop()
                       / scapy.IPv6ExtHdrDestOpt() / UDP(sport=1111, dport=2222) / (b"q" * 3000))
    error6 = IPv6(build_unreachable(original6, "admin", V6B))
    assert error6[scapy.ICMPv6DestUnreach].code == 1 and len(error6) == 1280
    assert error6[scapy.IPerror6].src == str(V6A)
    # Parse scapy's extension-header chains and fragments.
    chain = raw_of(IPv6(src=str(V6A), dst=str(V6B)) / scapy.IPv6ExtHdrHopByHop() / scapy.IPv6ExtHdrRouting()
                   / scapy.IPv6ExtHdrDestOpt() / UDP(sport=5, dport=6) / b"chain")
    packet = parse(chain)
    assert packet.udp == pk.Udp(5, 6, b"chain") and packet.proto_offset == 56
    fragments = scapy.fragment6(IPv6(src=str(V6A), dst=str(V6B)) / scapy.IPv6ExtHdrFragment()
                                / UDP(sport=5, dport=6) / (b"f" * 3000), 1280)
    parsed = [parse(raw_of(f)) for f in fragments]
    assert all(p.fragment for p in parsed) and parsed[0].udp.src_port == 5
    assert all(p.udp is None and p.later_fragment for p in parsed[1:])


# ---------------------------------------------------------------------------------------------
# UdpFramer: frames for a tun with a virtio-net header (what the kernel does with them is checked
# for real by the integration tests; here: every field the kernel reads)


def split_frame(frame: bytes) -> dict:
    """Read a frame the way tun_get_user + virtio_net_hdr_to_skb + UDP GSO would."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack_from("=BBHHHH", frame)
    packet = frame[10:]
    v4 = packet[0] >> 4 == 4
    ip_len = 20 if v4 else 40
    udp = packet[ip_len:ip_len + 8]
    data = packet[ip_len + 8:]
    size = gso_size if gso_type == pk.VNET_GSO_UDP_L4 else len(data) or 1
    return {"flags": flags, "gso_type": gso_type, "hdr_len": hdr_len, "gso_size": gso_size,
            "csum_start": csum_start, "csum_offset": csum_offset, "ip": packet[:ip_len], "udp": udp,
            "segments": [data[i:i + size] for i in range(0, len(data), size)] or [b""], "packet": packet}


def pseudo_sum(src, dst, length: int) -> int:
    """The folded one's-complement sum of the UDP pseudo-header (what NEEDS_CSUM wants)."""
    return ~ref_checksum(ref_pseudo(src.packed, dst.packed, 17, length)) & 0xFFFF


framer_runs = st.one_of(
    st.integers(1, 2000).map(lambda n: [n]),
    st.tuples(st.integers(1, 1500), st.integers(2, 40), st.integers(0, 1500)).map(
        lambda t: [t[0]] * t[1] + ([min(t[2], t[0])] if t[2] else [])),
)


@given(unicast_pairs, ports, ports, framer_runs, st.integers(0, 255))
@example((V4B, V4A), 7, 40000, [1400] * 46, 64)
@example((V6B, V6A), 7, 40000, [1400] * 46 + [3], 64)
@example((V4B, V4A), 7, 40000, [65507], 64)
@example((V6B, V6A), 7, 40000, [65527], 1)
def test_framer_frame_is_what_the_kernel_expects(addresses, sport, dport, sizes, ttl):
    src, dst = addresses
    datagrams = [bytes([i % 256]) * n for i, n in enumerate(sizes)]
    framer = pk.UdpFramer(src, sport, dst, dport, ttl=ttl)
    assert framer.version == src.version
    f = split_frame(framer.headers(datagrams) + b"".join(datagrams))
    ip_len = 20 if src.version == 4 else 40
    length = 8 + sum(sizes)
    assert f["flags"] == pk.VNET_F_NEEDS_CSUM
    assert (f["csum_start"], f["csum_offset"], f["hdr_len"]) == (ip_len, 6, ip_len + 8)
    if len(datagrams) > 1:
        assert (f["gso_type"], f["gso_size"]) == (pk.VNET_GSO_UDP_L4, sizes[0])
    else:
        assert (f["gso_type"], f["gso_size"]) == (pk.VNET_GSO_NONE, 0)
    assert f["segments"] == datagrams
    sp, dp, udp_len, check = struct.unpack("!HHHH", f["udp"])
    assert (sp, dp, udp_len) == (sport, dport, length)
    assert check % 0xFFFF == pseudo_sum(src, dst, length) % 0xFFFF, "partial checksum = pseudo-header sum"
    # The IP header is an ordinary, valid one for the whole (super) packet.
    parsed = parse(f["packet"])
    assert (parsed.src, parsed.dst, parsed.proto, parsed.ttl) == (src, dst, 17, ttl)
    if src.version == 4:
        assert ref_checksum(f["ip"]) == 0 and int.from_bytes(f["ip"][2:4], "big") == 20 + length
    else:
        assert int.from_bytes(f["ip"][4:6], "big") == length


def test_framer_headers_are_reused_per_frame():
    framer = pk.UdpFramer("203.0.113.10", 7, "10.0.2.100", 40000)
    a, b = framer.headers([b"x" * 10]), framer.headers([b"y" * 10])
    assert a == b, "same length, same headers: nothing of the data leaks into them"
    assert framer.headers([b"x" * 11]) != a


@pytest.mark.parametrize("src, dst, sizes, match", [
    ("203.0.113.10", "10.0.2.100", [65508], "do not fit one IPv4 packet"),
    ("203.0.113.10", "10.0.2.100", [1400] * 47, "do not fit one IPv4 packet"),
    ("2001:db8::1", "fd00:7e7e::100", [65528], "do not fit one IPv6 packet"),
    ("203.0.113.10", "10.0.2.100", [], "do not fit"),
], ids=["v4-too-big", "v4-run-too-big", "v6-too-big", "empty-run"])
def test_framer_refuses_what_does_not_fit(src, dst, sizes, match):
    with pytest.raises(ValueError, match=match):
        pk.UdpFramer(src, 7, dst, 9).headers([bytes(n) for n in sizes])


@pytest.mark.parametrize("args, match", [
    (("203.0.113.10", 70000, "10.0.2.100", 1), "source port 70000"),
    (("203.0.113.10", 1, "10.0.2.100", -1), "destination port -1"),
    (("203.0.113.10", 1, "fd00::1", 1), "address families differ"),
    (("not-an-address", 1, "10.0.2.100", 1), "does not appear to be an IPv4 or IPv6 address"),
], ids=["sport", "dport", "families", "garbage"])
def test_framer_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        pk.UdpFramer(*args)


def test_framer_bad_ttl():
    with pytest.raises(ValueError, match="TTL 256"):
        pk.UdpFramer("203.0.113.10", 1, "10.0.2.100", 1, ttl=256)
