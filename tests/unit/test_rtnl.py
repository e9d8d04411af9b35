"""Unit tests for tether.net.rtnl: the encoders against pyroute2, the parsers against bad input.

pyroute2 is the reference encoder here (it is not used at run time, see the module docstring):
each message is built with pyroute2's ifinfmsg/ifaddrmsg/rtmsg from the same fields and
attributes, in the same order, and the bytes must be identical, header included.  The parsers
are checked with round trips, hand-built malformed datagrams (each named in the test id) and
hypothesis: on arbitrary bytes they return or raise ValueError, never loop or raise anything else.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink import (
    NLM_F_ACK as PR_ACK,
    NLM_F_CREATE as PR_CREATE,
    NLM_F_DUMP as PR_DUMP,
    NLM_F_EXCL as PR_EXCL,
    NLM_F_REQUEST as PR_REQUEST,
    nlmsgerr,
)
from pyroute2.netlink.rtnl import RTM_GETADDR, RTM_NEWADDR, RTM_NEWLINK, RTM_NEWROUTE
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from tether.net import rtnl
from tether.net.rtnl import (
    NLMSG_DONE,
    NLMSG_ERROR,
    NetlinkError,
    Reply,
    attr,
    encode_addr_add,
    encode_addr_dump,
    encode_link_set,
    encode_route_add,
    error_code,
    message,
    parse_address,
    parse_attrs,
    parse_messages,
)

NEW_FLAGS = PR_REQUEST | PR_ACK | PR_CREATE | PR_EXCL


def _encode(msg, kind: int, flags: int, seq: int) -> bytes:
    msg["header"]["type"] = kind
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg["header"]["pid"] = 0
    msg.encode()
    return bytes(msg.data)


# --- constants agree with pyroute2's (i.e. the kernel headers) ---------------------------------


def test_message_types_and_flags_match_kernel_values():
    assert (rtnl.RTM_NEWLINK, rtnl.RTM_NEWADDR, rtnl.RTM_GETADDR, rtnl.RTM_NEWROUTE) == (
        RTM_NEWLINK, RTM_NEWADDR, RTM_GETADDR, RTM_NEWROUTE)
    assert (rtnl.NLM_F_REQUEST, rtnl.NLM_F_ACK, rtnl.NLM_F_CREATE, rtnl.NLM_F_EXCL, rtnl.NLM_F_DUMP) == (
        PR_REQUEST, PR_ACK, PR_CREATE, PR_EXCL, PR_DUMP)


# --- encoders: byte-for-byte equal to pyroute2 -----------------------------------------------

LINK_CASES = [
    # seq, index, up, mtu
    (1, 1, True, None),
    (7, 3, True, 1400),
    (0xFFFFFFFF, 2**31 - 1, False, None),
    (42, 12, False, 65520),
    (5, 4, True, 576),
]


@pytest.mark.parametrize("seq,index,up,mtu", LINK_CASES,
                         ids=[f"seq{c[0]}-if{c[1]}-{'up' if c[2] else 'down'}-mtu{c[3]}" for c in LINK_CASES])
def test_link_set_matches_pyroute2(seq, index, up, mtu):
    ref = ifinfmsg()
    ref["family"] = socket.AF_UNSPEC
    ref["index"] = index
    ref["flags"] = 1 if up else 0  # IFF_UP
    ref["change"] = 1  # only IFF_UP changes
    ref["attrs"] = [("IFLA_MTU", mtu)] if mtu is not None else []
    assert encode_link_set(seq, index, up, mtu) == _encode(ref, RTM_NEWLINK, PR_REQUEST | PR_ACK, seq)


ADDR_CASES = [
    (1, 2, "10.0.2.100/24"),
    (9, 4, "192.0.2.1/32"),
    (3, 1, "0.0.0.1/0"),
    (11, 7, "2001:db8::5/64"),
    (12, 7, "fd00::1/128"),
    (13, 9, "::1/128"),
]


@pytest.mark.parametrize("seq,index,iface", ADDR_CASES, ids=[c[2] for c in ADDR_CASES])
def test_addr_add_matches_pyroute2(seq, index, iface):
    interface = ipaddress.ip_interface(iface)
    ref = ifaddrmsg()
    ref["family"] = socket.AF_INET if interface.version == 4 else socket.AF_INET6
    ref["prefixlen"] = interface.network.prefixlen
    ref["flags"] = 0x02  # IFA_F_NODAD
    ref["scope"] = 0
    ref["index"] = index
    ref["attrs"] = [("IFA_LOCAL", str(interface.ip)), ("IFA_ADDRESS", str(interface.ip))]
    assert encode_addr_add(seq, index, interface) == _encode(ref, RTM_NEWADDR, NEW_FLAGS, seq)


ROUTE_CASES = [
    # seq, index, destination, gateway
    (1, 5, "0.0.0.0/0", "10.0.2.2"),
    (2, 5, "0.0.0.0/0", None),
    (3, 6, "10.0.2.0/24", None),
    (4, 6, "203.0.113.0/24", "10.0.2.2"),
    (5, 7, "::/0", "fd00::2"),
    (6, 7, "2001:db8::/32", None),
    (7, 8, "2001:db8::1/128", "fe80::1"),
]


@pytest.mark.parametrize("seq,index,dst,gw", ROUTE_CASES, ids=[f"{c[2]}-via-{c[3]}" for c in ROUTE_CASES])
def test_route_add_matches_pyroute2(seq, index, dst, gw):
    destination = ipaddress.ip_network(dst)
    ref = rtmsg()
    ref["family"] = socket.AF_INET if destination.version == 4 else socket.AF_INET6
    ref["dst_len"] = destination.prefixlen
    ref["src_len"] = 0
    ref["tos"] = 0
    ref["table"] = 254  # RT_TABLE_MAIN
    ref["proto"] = 4  # RTPROT_STATIC
    ref["scope"] = 0  # RT_SCOPE_UNIVERSE
    ref["type"] = 1  # RTN_UNICAST
    ref["flags"] = 0
    attrs = []
    if destination.prefixlen:
        attrs.append(("RTA_DST", str(destination.network_address)))
    if gw is not None:
        attrs.append(("RTA_GATEWAY", gw))
    attrs.append(("RTA_OIF", index))
    ref["attrs"] = attrs
    gateway = ipaddress.ip_address(gw) if gw is not None else None
    assert encode_route_add(seq, index, destination, gateway) == _encode(ref, RTM_NEWROUTE, NEW_FLAGS, seq)


def test_default_route_carries_no_rta_dst():
    data = encode_route_add(1, 5, ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_address("10.0.2.2"))
    decoded = rtmsg(data)
    decoded.decode()
    assert decoded.get_attr("RTA_DST") is None
    assert decoded.get_attr("RTA_GATEWAY") == "10.0.2.2"
    assert decoded.get_attr("RTA_OIF") == 5
    assert decoded["dst_len"] == 0


@pytest.mark.parametrize("seq", [1, 2, 0xFFFFFFFF])
def test_addr_dump_matches_pyroute2(seq):
    ref = ifaddrmsg()
    ref["family"] = socket.AF_UNSPEC
    assert encode_addr_dump(seq) == _encode(ref, RTM_GETADDR, PR_REQUEST | PR_DUMP, seq)


def test_encoded_length_field_is_total_length_and_attrs_are_aligned():
    for data in (
        encode_link_set(1, 1, True, 1500),
        encode_addr_add(2, 1, ipaddress.ip_interface("2001:db8::1/64")),
        encode_route_add(3, 1, ipaddress.ip_network("2001:db8::/32"), ipaddress.ip_address("fe80::1")),
        encode_addr_dump(4),
    ):
        assert struct.unpack_from("=I", data)[0] == len(data)
        assert len(data) % 4 == 0


# --- attr / message framing ------------------------------------------------------------------

ATTR_CASES = [
    (1, b"", b"\x04\x00\x01\x00"),
    (2, b"\x01", b"\x05\x00\x02\x00\x01\x00\x00\x00"),
    (3, b"\x01\x02\x03", b"\x07\x00\x03\x00\x01\x02\x03\x00"),
    (4, b"\x01\x02\x03\x04", b"\x08\x00\x04\x00\x01\x02\x03\x04"),
    (5, b"\xff" * 5, b"\x09\x00\x05\x00" + b"\xff" * 5 + b"\x00\x00\x00"),
]


@pytest.mark.parametrize("kind,payload,expected", ATTR_CASES, ids=[f"payload{len(c[1])}" for c in ATTR_CASES])
def test_attr_length_excludes_padding_and_pads_to_four(kind, payload, expected):
    assert attr(kind, payload) == expected


attr_lists = st.lists(st.tuples(st.integers(0, 0x3FFF), st.binary(max_size=64)), max_size=8)


@given(attr_lists)
def test_attrs_round_trip(attrs):
    body = b"".join(attr(kind, payload) for kind, payload in attrs)
    assert list(parse_attrs(body)) == attrs


@given(st.integers(0, 0x3FFF), st.binary(max_size=16), st.sampled_from([0x8000, 0x4000, 0xC000]))
def test_parse_attrs_strips_nested_and_byteorder_flags(kind, payload, flag):
    body = bytearray(attr(kind, payload))
    struct.pack_into("=H", body, 2, kind | flag)
    assert list(parse_attrs(bytes(body))) == [(kind, payload)]


messages_st = st.lists(
    st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.binary(max_size=64)),
    max_size=6,
)


@given(messages_st)
def test_messages_round_trip(msgs):
    # The kernel pads every message but the last to 4 bytes; do the same.
    parts = [message(kind, flags, seq, body) for kind, flags, seq, body in msgs]
    datagram = b"".join(p + b"\0" * (-len(p) % 4) for p in parts)
    assert list(parse_messages(datagram)) == [Reply(kind, seq, body) for kind, _flags, seq, body in msgs]


def test_parse_messages_ignores_trailing_bytes_shorter_than_a_header():
    one = message(NLMSG_DONE, 0, 5, struct.pack("=i", 0))
    assert list(parse_messages(one + b"\0" * 15)) == [Reply(NLMSG_DONE, 5, struct.pack("=i", 0))]


def _hdr(length: int, kind: int = NLMSG_DONE, seq: int = 1) -> bytes:
    return struct.pack("=IHHII", length, kind, 0, seq, 0)


MALFORMED_MESSAGES = [
    ("length-zero", _hdr(0) + b"\0" * 16),
    ("length-smaller-than-header", _hdr(15)),
    ("length-one", _hdr(1) + b"\0" * 32),
    ("length-beyond-data", _hdr(32) + b"\0" * 8),
    ("length-huge", _hdr(0xFFFFFFFF) + b"\0" * 4),
    ("second-message-length-zero", message(NLMSG_DONE, 0, 1, b"\0" * 4) + _hdr(0) + b"\0" * 16),
    ("second-message-truncated", message(NLMSG_DONE, 0, 1, b"\0" * 4) + _hdr(40) + b"\0" * 4),
]


@pytest.mark.parametrize("data", [d for _, d in MALFORMED_MESSAGES], ids=[n for n, _ in MALFORMED_MESSAGES])
def test_parse_messages_rejects_malformed(data):
    with pytest.raises(ValueError, match="malformed netlink message"):
        list(parse_messages(data))


def test_parse_messages_of_truncated_header_yields_nothing():
    # Fewer than 16 bytes cannot hold a header: nothing to parse, and no loop.
    for n in range(16):
        assert list(parse_messages(_hdr(16)[:n])) == []


MALFORMED_ATTRS = [
    ("rta-len-zero", struct.pack("=HH", 0, 1) + b"\0" * 8),
    ("rta-len-three", struct.pack("=HH", 3, 1) + b"\0" * 8),
    ("rta-len-beyond-body", struct.pack("=HH", 12, 1) + b"\0" * 4),
    ("rta-len-max", struct.pack("=HH", 0xFFFF, 1)),
    ("second-rta-len-zero", attr(1, b"abcd") + struct.pack("=HH", 0, 2) + b"\0" * 4),
]


@pytest.mark.parametrize("body", [d for _, d in MALFORMED_ATTRS], ids=[n for n, _ in MALFORMED_ATTRS])
def test_parse_attrs_rejects_malformed(body):
    with pytest.raises(ValueError, match="malformed rtattr"):
        list(parse_attrs(body))


@settings(max_examples=500)
@given(st.binary(max_size=256))
def test_parse_messages_on_random_bytes_returns_or_raises_value_error(data):
    try:
        replies = list(parse_messages(data))
    except ValueError:
        return
    for reply in replies:
        assert isinstance(reply, Reply)
        assert len(reply.body) <= len(data) - 16


@settings(max_examples=500)
@given(st.binary(max_size=256))
def test_parse_attrs_on_random_bytes_returns_or_raises_value_error(data):
    try:
        attrs = list(parse_attrs(data))
    except ValueError:
        return
    assert sum(4 + len(payload) for _, payload in attrs) <= len(data)


@settings(max_examples=300, deadline=1000)
@given(messages_st, st.data())
def test_parse_messages_with_one_corrupted_length_returns_or_raises_value_error(msgs, data):
    parts = [message(kind, flags, seq, body) for kind, flags, seq, body in msgs]
    datagram = bytearray(b"".join(p + b"\0" * (-len(p) % 4) for p in parts))
    if len(datagram) >= 4:
        at = data.draw(st.integers(0, len(datagram) - 4))
        struct.pack_into("=I", datagram, at, data.draw(st.integers(0, 0xFFFFFFFF)))
    try:
        list(parse_messages(bytes(datagram)))
    except ValueError:
        pass


# --- parse_address ---------------------------------------------------------------------------


def _addr_body(family: int, attrs: list[tuple[int, bytes]], prefixlen: int = 24) -> bytes:
    return struct.pack("=BBBBI", family, prefixlen, 0, 0, 1) + b"".join(attr(k, v) for k, v in attrs)


V4, V4_PEER = ipaddress.ip_address("10.0.2.100"), ipaddress.ip_address("10.0.2.1")
V6, V6_PEER = ipaddress.ip_address("2001:db8::5"), ipaddress.ip_address("2001:db8::1")

ADDRESS_CASES = [
    ("v4-local-and-address", _addr_body(socket.AF_INET, [(2, V4.packed), (1, V4.packed)]), V4),
    ("v4-local-preferred-over-peer", _addr_body(socket.AF_INET, [(1, V4_PEER.packed), (2, V4.packed)]), V4),
    ("v4-address-only", _addr_body(socket.AF_INET, [(1, V4.packed)]), V4),
    ("v4-with-label", _addr_body(socket.AF_INET, [(3, b"lo\0"), (1, V4.packed)]), V4),
    ("v6-address-only", _addr_body(socket.AF_INET6, [(1, V6.packed)], 64), V6),
    ("v6-local-preferred-over-peer", _addr_body(socket.AF_INET6, [(1, V6_PEER.packed), (2, V6.packed)], 64), V6),
    ("no-address-attr", _addr_body(socket.AF_INET, [(3, b"eth0\0")]), None),
    ("no-attrs", _addr_body(socket.AF_INET, []), None),
    ("family-af-packet", _addr_body(socket.AF_PACKET, [(1, V4.packed)]), None),
    ("family-unspec", _addr_body(socket.AF_UNSPEC, [(1, V6.packed)]), None),
]


@pytest.mark.parametrize("body,expected", [c[1:] for c in ADDRESS_CASES], ids=[c[0] for c in ADDRESS_CASES])
def test_parse_address(body, expected):
    assert parse_address(body) == expected


@pytest.mark.parametrize("iface", [c[2] for c in ADDR_CASES], ids=[c[2] for c in ADDR_CASES])
def test_parse_address_reads_what_pyroute2_encodes(iface):
    interface = ipaddress.ip_interface(iface)
    ref = ifaddrmsg()
    ref["family"] = socket.AF_INET if interface.version == 4 else socket.AF_INET6
    ref["prefixlen"] = interface.network.prefixlen
    ref["index"] = 3
    ref["attrs"] = [("IFA_ADDRESS", str(interface.ip)), ("IFA_LABEL", "eth0"), ("IFA_LOCAL", str(interface.ip))]
    data = _encode(ref, RTM_NEWADDR, 0, 1)
    [reply] = list(parse_messages(data))
    assert reply.kind == RTM_NEWADDR
    assert parse_address(reply.body) == interface.ip


def test_addr_dump_reply_sequence_parses_to_addresses():
    parts = []
    for iface in ("127.0.0.1/8", "10.0.2.100/24", "::1/128"):
        interface = ipaddress.ip_interface(iface)
        ref = ifaddrmsg()
        ref["family"] = socket.AF_INET if interface.version == 4 else socket.AF_INET6
        ref["prefixlen"] = interface.network.prefixlen
        ref["attrs"] = [("IFA_LOCAL", str(interface.ip))]
        parts.append(_encode(ref, RTM_NEWADDR, 2, 9))  # NLM_F_MULTI
    parts.append(message(NLMSG_DONE, 2, 9, struct.pack("=i", 0)))
    replies = list(parse_messages(b"".join(parts)))
    assert [r.kind for r in replies] == [RTM_NEWADDR] * 3 + [NLMSG_DONE]
    assert {r.seq for r in replies} == {9}
    expected = [ipaddress.ip_address(a) for a in ("127.0.0.1", "10.0.2.100", "::1")]
    assert [parse_address(r.body) for r in replies[:3]] == expected


@pytest.mark.parametrize("body", [b"", b"\x02", b"\x02\x18\x00"],
                         ids=["empty-body", "one-byte-body", "three-byte-body"])
def test_parse_address_of_truncated_body_raises_value_error(body):
    try:
        result = parse_address(body)
    except ValueError:
        return
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"raised {type(exc).__name__}, not ValueError") from exc
    raise AssertionError(f"returned {result!r}")


# --- error_code ------------------------------------------------------------------------------

ERROR_CASES = [
    ("ack", 0, 0),
    ("eperm", -errno.EPERM, errno.EPERM),
    ("eexist", -errno.EEXIST, errno.EEXIST),
    ("enodev", -errno.ENODEV, errno.ENODEV),
    ("einval", -errno.EINVAL, errno.EINVAL),
]


@pytest.mark.parametrize("raw,expected", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_error_code_of_pyroute2_encoded_nlmsgerr(raw, expected):
    ref = nlmsgerr()
    ref["error"] = raw
    ref["msg"] = {"header": {"length": 16, "type": RTM_NEWLINK, "flags": 5, "sequence_number": 3, "pid": 0}}
    data = _encode(ref, NLMSG_ERROR, 0, 3)
    [reply] = list(parse_messages(data))
    assert (reply.kind, reply.seq) == (NLMSG_ERROR, 3)
    assert error_code(reply.body) == expected


def test_error_code_reads_only_the_leading_errno():
    assert error_code(struct.pack("=i", -errno.EEXIST) + encode_link_set(3, 1)) == errno.EEXIST


@pytest.mark.parametrize("body", [b"", b"\xff\xff"], ids=["empty-error-body", "two-byte-error-body"])
def test_error_code_of_truncated_body_raises_value_error(body):
    try:
        error_code(body)
    except ValueError:
        return
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"raised {type(exc).__name__}, not ValueError") from exc
    raise AssertionError("no error")


# --- the socket shell, in the current netns (read-only, no privileges needed) ----------------


def test_rtnl_lists_loopback_addresses():
    with rtnl.Rtnl() as nl:
        found = nl.addresses()
    assert ipaddress.ip_address("127.0.0.1") in found


def test_rtnl_reports_kernel_errors_as_netlink_error():
    # 127.0.0.1/8 already exists on lo: with NLM_F_EXCL the kernel refuses (EEXIST as root,
    # EPERM without CAP_NET_ADMIN) and nothing changes.
    with rtnl.Rtnl() as nl:
        if ipaddress.ip_address("127.0.0.1") not in nl.addresses():
            pytest.skip("lo has no 127.0.0.1 here")
        with pytest.raises(NetlinkError) as info:
            nl.add_address("lo", ipaddress.ip_interface("127.0.0.1/8"))
    assert info.value.errno in (errno.EEXIST, errno.EPERM)
    assert "add address 127.0.0.1/8 to lo" in str(info.value)
