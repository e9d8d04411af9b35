"""Unit tests for tether.net.nflog: config requests byte for byte, packet messages parsed.

The two config requests are compared with pyroute2's encoding of the same nfnetlink message
(pyroute2 has no NFLOG module; the message class below declares the NFULA_CFG_* attributes of
<linux/netfilter/nfnetlink_log.h>).  Packet messages are built here by hand, independently of
tether's own attr(), the way the kernel lays them out: nlmsghdr, nfgenmsg, then NFULA_PACKET_HDR,
NFULA_PREFIX (NUL-terminated), interface and uid attributes and NFULA_PAYLOAD (the first bytes of
the refused packet).  Bad input raises ValueError and nothing else (hypothesis).
"""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, nla
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_ULOG, nfgen_msg

from tether.net import nflog
from tether.net.nflog import Refusal, encode_bind, encode_copy_mode, parse_ip_packet, parse_refusals

NLMSG_ERROR, NLMSG_DONE = 2, 3
PACKET, CONFIG = 0x400, 0x401
NFULA_PACKET_HDR, NFULA_TIMESTAMP, NFULA_IFINDEX_OUTDEV, NFULA_PAYLOAD, NFULA_PREFIX, NFULA_UID = 1, 3, 5, 9, 10, 11


class nflog_config(nfgen_msg):
    """NFULNL_MSG_CONFIG as pyroute2 would declare it."""

    nla_map = (
        ("NFULA_CFG_UNSPEC", "none"),
        ("NFULA_CFG_CMD", "uint8"),
        ("NFULA_CFG_MODE", "cfg_mode"),
        ("NFULA_CFG_NLBUFSIZ", "be32"),
        ("NFULA_CFG_TIMEOUT", "be32"),
        ("NFULA_CFG_QTHRESH", "be32"),
        ("NFULA_CFG_FLAGS", "be16"),
    )

    class cfg_mode(nla):
        fields = (("copy_range", ">I"), ("copy_mode", "B"), ("_pad", "B"))


def _reference(seq: int, group: int, attrs: list) -> bytes:
    msg = nflog_config()
    msg["header"].update(type=NFNL_SUBSYS_ULOG << 8 | 1, flags=NLM_F_REQUEST | NLM_F_ACK, sequence_number=seq, pid=0)
    msg.update(nfgen_family=socket.AF_UNSPEC, version=0, res_id=group)
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data)


# --- config requests ---------------------------------------------------------------------------

GROUPS = [0, 1, 2, 0x1234, 0xFFFF]


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("seq", [1, 2, 0xFFFFFFFF])
def test_bind_matches_pyroute2(seq, group):
    assert encode_bind(seq, group) == _reference(seq, group, [("NFULA_CFG_CMD", 1)])  # NFULNL_CFG_CMD_BIND


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("copy_range", [nflog.COPY_RANGE, 40, 0xFFFF])
def test_copy_mode_matches_pyroute2(group, copy_range):
    expected = _reference(2, group, [
        ("NFULA_CFG_MODE", {"copy_range": copy_range, "copy_mode": 2, "_pad": 0}),  # NFULNL_COPY_PACKET
        ("NFULA_CFG_QTHRESH", 1),
    ])
    assert encode_copy_mode(2, group, copy_range) == expected


def test_bind_bytes_spelled_out():
    assert encode_bind(7, 1) == bytes.fromhex(
        "1c000000"  # nlmsg_len 28 (host order)
        "0104"  # type 0x0401: NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_CONFIG
        "0500"  # NLM_F_REQUEST | NLM_F_ACK
        "07000000"  # seq
        "00000000"  # pid
        "00" "00" "0001"  # nfgenmsg: AF_UNSPEC, NFNETLINK_V0, res_id = group, big endian
        "0500" "0100" "01" "000000"  # NFULA_CFG_CMD (len 5) = BIND, padded
    )


def test_copy_mode_bytes_spelled_out():
    assert encode_copy_mode(8, 0x0102) == bytes.fromhex(
        "28000000" "0104" "0500" "08000000" "00000000"
        "00" "00" "0102"  # group big endian
        "0a00" "0200" "00000080" "02" "00" "0000"  # NFULA_CFG_MODE: copy_range 128 (BE), COPY_PACKET, pad
        "0800" "0500" "00000001"  # NFULA_CFG_QTHRESH = 1 (BE)
    )


def test_copy_range_covers_ipv6_and_tcp_headers():
    assert nflog.COPY_RANGE >= 40 + 20


# --- IP packets --------------------------------------------------------------------------------


def ipv4(proto: int, src: str, dst: str, l4: bytes = b"", options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(l4), 0x1234, 0x4000, 64, proto, 0,
                         socket.inet_pton(socket.AF_INET, src), socket.inet_pton(socket.AF_INET, dst))
    return header + options + l4


def ipv6(next_header: int, src: str, dst: str, l4: bytes = b"") -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), next_header, 64,
                       socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)) + l4


def tcp(sport: int, dport: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)  # SYN


def udp(sport: int, dport: int) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8, 0)


ICMP_ECHO = struct.pack("!BBHHH", 8, 0, 0, 1, 1)

IP_CASES = [
    ("v4-tcp-syn", ipv4(6, "10.0.2.100", "203.0.113.7", tcp(40000, 443)),
     ("tcp", ("10.0.2.100", 40000), ("203.0.113.7", 443))),
    ("v4-udp", ipv4(17, "10.0.2.100", "9.9.9.9", udp(5353, 53)), ("udp", ("10.0.2.100", 5353), ("9.9.9.9", 53))),
    ("v4-icmp", ipv4(1, "10.0.2.100", "8.8.8.8", ICMP_ECHO), ("1", ("10.0.2.100", 0), ("8.8.8.8", 0))),
    ("v4-tcp-with-options", ipv4(6, "10.0.2.100", "203.0.113.7", tcp(1, 65535), options=b"\x01" * 8),
     ("tcp", ("10.0.2.100", 1), ("203.0.113.7", 65535))),
    ("v4-max-ihl", ipv4(6, "1.2.3.4", "5.6.7.8", tcp(7, 8), options=b"\x01" * 40),
     ("tcp", ("1.2.3.4", 7), ("5.6.7.8", 8))),
    ("v4-tcp-ports-only", ipv4(6, "1.2.3.4", "5.6.7.8", tcp(9, 10)[:4]), ("tcp", ("1.2.3.4", 9), ("5.6.7.8", 10))),
    ("v4-tcp-truncated-ports", ipv4(6, "1.2.3.4", "5.6.7.8", tcp(9, 10)[:3]), ("tcp", ("1.2.3.4", 0), ("5.6.7.8", 0))),
    ("v4-tcp-no-transport", ipv4(6, "1.2.3.4", "5.6.7.8"), ("tcp", ("1.2.3.4", 0), ("5.6.7.8", 0))),
    ("v4-options-cut-off", ipv4(6, "1.2.3.4", "5.6.7.8", options=b"\x01" * 8)[:24],
     ("tcp", ("1.2.3.4", 0), ("5.6.7.8", 0))),
    ("v6-tcp", ipv6(6, "fd00::100", "2001:db8::7", tcp(50000, 22)), ("tcp", ("fd00::100", 50000), ("2001:db8::7", 22))),
    ("v6-udp", ipv6(17, "fd00::100", "2001:4860::8888", udp(1234, 53)),
     ("udp", ("fd00::100", 1234), ("2001:4860::8888", 53))),
    ("v6-icmpv6", ipv6(58, "fd00::100", "2001:db8::1", ICMP_ECHO), ("58", ("fd00::100", 0), ("2001:db8::1", 0))),
    ("v6-extension-header", ipv6(0, "fd00::1", "2001:db8::1", b"\x06\x00" + b"\0" * 6 + tcp(1, 2)),
     ("0", ("fd00::1", 0), ("2001:db8::1", 0))),
    ("v6-tcp-truncated-ports", ipv6(6, "::1", "::2", tcp(1, 2)[:2]), ("tcp", ("::1", 0), ("::2", 0))),
    ("v6-mapped-addresses", ipv6(6, "::ffff:10.0.2.100", "::ffff:203.0.113.7", tcp(1, 2)),
     # str() of a mapped IPv6Address differs between Python versions: compare with what it gives
     ("tcp", (str(ipaddress.IPv6Address("::ffff:10.0.2.100")), 1),
      (str(ipaddress.IPv6Address("::ffff:203.0.113.7")), 2))),
]


@pytest.mark.parametrize("packet,expected", [c[1:] for c in IP_CASES], ids=[c[0] for c in IP_CASES])
def test_parse_ip_packet(packet, expected):
    assert parse_ip_packet(packet) == expected


BAD_PACKETS = [
    ("empty", b"", "empty packet"),
    ("v4-19-bytes", ipv4(6, "1.2.3.4", "5.6.7.8")[:19], "truncated IPv4 header"),
    ("v4-one-byte", b"\x45", "truncated IPv4 header"),
    ("v6-39-bytes", ipv6(6, "::1", "::2")[:39], "truncated IPv6 header"),
    ("v6-one-byte", b"\x60", "truncated IPv6 header"),
    ("version-0", b"\x05" + b"\0" * 59, "not an IP packet (version 0)"),
    ("version-5", b"\x55" + b"\0" * 59, "not an IP packet (version 5)"),
    ("version-15", b"\xff" * 60, "not an IP packet (version 15)"),
    ("ethernet-frame", bytes.fromhex("ffffffffffff0242ac1100020800") + ipv4(6, "1.2.3.4", "5.6.7.8"),
     "not an IP packet (version 15)"),
]


@pytest.mark.parametrize("packet,message", [c[1:] for c in BAD_PACKETS], ids=[c[0] for c in BAD_PACKETS])
def test_parse_ip_packet_rejects(packet, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_ip_packet(packet)


@pytest.mark.parametrize("ihl", [0, 1, 4], ids=["ihl-0", "ihl-1", "ihl-4"])
def test_parse_ip_packet_rejects_ipv4_header_length_below_20(ihl):
    packet = bytearray(ipv4(6, "1.2.3.4", "5.6.7.8", tcp(1000, 2000)))
    packet[0] = 0x40 | ihl
    with pytest.raises(ValueError):
        parse_ip_packet(bytes(packet))


@settings(max_examples=1000)
@given(st.binary(max_size=80))
def test_parse_ip_packet_on_random_bytes_returns_or_raises_value_error(data):
    try:
        proto, (src, sport), (dst, dport) = parse_ip_packet(data)
    except ValueError:
        return
    assert data[0] >> 4 in (4, 6)
    assert isinstance(proto, str) and 0 <= sport <= 65535 and 0 <= dport <= 65535


@settings(max_examples=300)
@given(st.sampled_from([4, 6]), st.sampled_from([1, 6, 17, 58, 132]), st.integers(1, 65535), st.integers(1, 65535),
       st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_parse_ip_packet_round_trip(version, proto, sport, dport, a, b):
    l4 = struct.pack("!HH", sport, dport) + b"\0" * 16
    if version == 4:
        src, dst = socket.inet_ntoa(a.to_bytes(4, "big")), socket.inet_ntoa(b.to_bytes(4, "big"))
        packet = ipv4(proto, src, dst, l4)
    else:
        src = str(ipaddress.IPv6Address(0x20010DB8 << 96 | a))
        dst = str(ipaddress.IPv6Address(0xFD00 << 112 | b << 32 | a))
        packet = ipv6(proto, src, dst, l4)
    name = {6: "tcp", 17: "udp"}.get(proto, str(proto))
    ports = (sport, dport) if name in ("tcp", "udp") else (0, 0)
    assert parse_ip_packet(packet) == (name, (src, ports[0]), (dst, ports[1]))


# --- packet messages ---------------------------------------------------------------------------


def nla_(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def nlmsg(kind: int, body: bytes, seq: int = 0, flags: int = 0) -> bytes:
    raw = struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body
    return raw + b"\0" * (-len(raw) % 4)


def packet_message(payload: bytes | None, prefix: bytes | None = b"tether:3\0", family: int = socket.AF_INET,
                   group: int = 1) -> bytes:
    body = struct.pack("!BBH", family, 0, group)
    body += nla_(NFULA_PACKET_HDR, struct.pack("!HBx", 0x0800, 3))  # hw_protocol, hook NF_INET_LOCAL_OUT
    body += nla_(NFULA_TIMESTAMP, struct.pack("!QQ", 1700000000, 5))
    if prefix is not None:
        body += nla_(NFULA_PREFIX, prefix)
    body += nla_(NFULA_IFINDEX_OUTDEV, struct.pack("!I", 2))
    body += nla_(NFULA_UID, struct.pack("!I", 1000))
    if payload is not None:
        body += nla_(NFULA_PAYLOAD, payload)
    return nlmsg(PACKET, body)


SYN4 = ipv4(6, "10.0.2.100", "203.0.113.7", tcp(40000, 443))
SYN6 = ipv6(6, "fd00::100", "2001:db8::7", tcp(50000, 22))
UDP4 = ipv4(17, "10.0.2.100", "9.9.9.9", udp(5353, 53))
ACK = nlmsg(NLMSG_ERROR, struct.pack("=i", 0) + struct.pack("=IHHII", 28, CONFIG, 5, 1, 0))

REFUSAL_CASES = [
    ("one-v4-tcp", packet_message(SYN4), [Refusal("tether:3", "tcp", ("10.0.2.100", 40000), ("203.0.113.7", 443))]),
    ("one-v6-tcp", packet_message(SYN6, b"tether:12\0", socket.AF_INET6),
     [Refusal("tether:12", "tcp", ("fd00::100", 50000), ("2001:db8::7", 22))]),
    ("udp", packet_message(UDP4, b"tether:0\0"), [Refusal("tether:0", "udp", ("10.0.2.100", 5353), ("9.9.9.9", 53))]),
    ("prefix-without-nul", packet_message(SYN4, b"tether:7"), [Refusal("tether:7", "tcp", ("10.0.2.100", 40000),
                                                                       ("203.0.113.7", 443))]),
    ("prefix-with-trailing-garbage", packet_message(SYN4, b"tether:7\0junk"),
     [Refusal("tether:7", "tcp", ("10.0.2.100", 40000), ("203.0.113.7", 443))]),
    ("prefix-missing", packet_message(SYN4, None), [Refusal("", "tcp", ("10.0.2.100", 40000), ("203.0.113.7", 443))]),
    ("prefix-not-utf8", packet_message(SYN4, b"tether:\xff\0"),
     [Refusal("tether:\ufffd", "tcp", ("10.0.2.100", 40000), ("203.0.113.7", 443))]),
    ("two-in-one-datagram", packet_message(SYN4, b"tether:1\0") + packet_message(UDP4, b"tether:2\0"),
     [Refusal("tether:1", "tcp", ("10.0.2.100", 40000), ("203.0.113.7", 443)),
      Refusal("tether:2", "udp", ("10.0.2.100", 5353), ("9.9.9.9", 53))]),
    ("ack-skipped", ACK, []),
    ("ack-then-packet", ACK + packet_message(SYN4), [Refusal("tether:3", "tcp", ("10.0.2.100", 40000),
                                                             ("203.0.113.7", 443))]),
    ("done-and-config-skipped", nlmsg(NLMSG_DONE, b"\0" * 4) + nlmsg(CONFIG, b"\0" * 4), []),
    ("empty-datagram", b"", []),
]


@pytest.mark.parametrize("datagram,expected", [c[1:] for c in REFUSAL_CASES], ids=[c[0] for c in REFUSAL_CASES])
def test_parse_refusals(datagram, expected):
    assert parse_refusals(datagram) == expected


BAD_DATAGRAMS = [
    ("payload-missing", packet_message(None), "without payload"),
    ("body-shorter-than-nfgenmsg", nlmsg(PACKET, b"\0\0"), "without payload"),
    ("payload-not-ip", packet_message(b"\x00" * 40), "not an IP packet"),
    ("payload-truncated-v4", packet_message(SYN4[:12]), "truncated IPv4 header"),
    ("payload-empty", packet_message(b""), "empty packet"),
    ("bad-nlmsg-length", struct.pack("=IHHII", 8, PACKET, 0, 0, 0), "malformed netlink message"),
    ("nlmsg-length-beyond-datagram", packet_message(SYN4)[:-8], "malformed netlink message"),
    ("bad-attr-length", nlmsg(PACKET, struct.pack("!BBH", 2, 0, 1) + struct.pack("=HH", 2, NFULA_PAYLOAD) + b"\0" * 4),
     "malformed rtattr"),
]


@pytest.mark.parametrize("datagram,message", [c[1:] for c in BAD_DATAGRAMS], ids=[c[0] for c in BAD_DATAGRAMS])
def test_parse_refusals_rejects(datagram, message):
    with pytest.raises(ValueError, match=message):
        parse_refusals(datagram)


@settings(max_examples=1000)
@given(st.binary(max_size=200))
def test_parse_refusals_on_random_bytes_returns_or_raises_value_error(data):
    try:
        result = parse_refusals(data)
    except ValueError:
        return
    assert all(isinstance(r, Refusal) for r in result)


attrs_st = st.lists(st.tuples(st.sampled_from([NFULA_PACKET_HDR, NFULA_PAYLOAD, NFULA_PREFIX, NFULA_UID, 0, 0x3FFF]),
                              st.one_of(st.binary(max_size=64), st.sampled_from([SYN4, SYN6, UDP4, b"tether:1\0"]))),
                    max_size=5)


@settings(max_examples=500)
@given(st.lists(st.tuples(st.sampled_from([PACKET, CONFIG, NLMSG_ERROR, NLMSG_DONE, 0x0402]),
                          st.binary(min_size=0, max_size=4), attrs_st), max_size=4),
       st.one_of(st.none(), st.integers(0, 400)))
def test_parse_refusals_on_well_framed_random_messages(messages, cut):
    """Framing right, content random (and optionally cut short): only ValueError may escape."""
    datagram = b"".join(nlmsg(kind, head + b"".join(nla_(k, v) for k, v in attrs)) for kind, head, attrs in messages)
    if cut is not None:
        datagram = datagram[:cut]
    try:
        result = parse_refusals(datagram)
    except ValueError:
        return
    assert len(result) <= sum(kind == PACKET for kind, _, _ in messages)
