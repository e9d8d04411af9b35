"""NFLOG (nfnetlink_log) codec: how the engine learns which rule the kernel used to refuse.

Denied connections never reach the engine: the sandbox's nft ``decide`` chain rejects them in
the kernel (fast ECONNREFUSED) after logging the packet to an NFLOG group with a prefix naming
the rule.  The engine holds a NETLINK_NETFILTER socket created *inside* the sandbox netns
(subscribing needs CAP_NET_ADMIN there, which only the spawner holds) and turns each message into
a ``deny`` audit event.  This module is sans-IO: it builds the two bind/config requests and
parses packet messages (prefix + the IP/TCP/UDP header of the refused packet) into ``Refusal``.
Malformed messages raise ``ValueError``; the caller drops them.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from tether.net.rtnl import NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, attr, error_code, message, parse_attrs, parse_messages

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = NFNL_SUBSYS_ULOG << 8 | 0
NFULNL_MSG_CONFIG = NFNL_SUBSYS_ULOG << 8 | 1
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_QTHRESH = 1, 2, 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_PAYLOAD, NFULA_PREFIX = 9, 10
COPY_RANGE = 128  # enough for an IPv6 header plus a TCP header; payload never leaves the kernel

_NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (big endian)


def encode_bind(seq: int, group: int) -> bytes:
    body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, group) + attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))
    return message(NFULNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, body)


def encode_copy_mode(seq: int, group: int, copy_range: int = COPY_RANGE) -> bytes:
    mode = struct.pack("!IBx", copy_range, NFULNL_COPY_PACKET)
    # Queue threshold 1: deliver each refusal at once (the kernel default batches for up to 1 s).
    body = (_NFGENMSG.pack(socket.AF_UNSPEC, 0, group) + attr(NFULA_CFG_MODE, mode)
            + attr(NFULA_CFG_QTHRESH, struct.pack("!I", 1)))
    return message(NFULNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, body)


@dataclass(frozen=True)
class Refusal:
    """One packet the kernel refused: who sent it where, and the log prefix of the rule."""

    prefix: str
    proto: str  # "tcp", "udp" or the IP protocol number as text
    src: tuple[str, int]
    dst: tuple[str, int]


def parse_ip_packet(packet: bytes) -> tuple[str, tuple[str, int], tuple[str, int]]:
    """(proto, (src, sport), (dst, dport)) of an IPv4/IPv6 packet's first bytes."""
    if not packet:
        raise ValueError("empty packet")
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < 20:
            raise ValueError("truncated IPv4 header")
        header_len = (packet[0] & 0x0F) * 4
        if header_len < 20:
            raise ValueError(f"bad IPv4 header length {header_len}")
        proto_num = packet[9]
        src, dst = ipaddress.IPv4Address(packet[12:16]), ipaddress.IPv4Address(packet[16:20])
    elif version == 6:
        if len(packet) < 40:
            raise ValueError("truncated IPv6 header")
        header_len = 40  # extension headers: ports reported as 0
        proto_num = packet[6]
        src, dst = ipaddress.IPv6Address(packet[8:24]), ipaddress.IPv6Address(packet[24:40])
    else:
        raise ValueError(f"not an IP packet (version {version})")
    proto = {6: "tcp", 17: "udp"}.get(proto_num, str(proto_num))
    sport = dport = 0
    if proto in ("tcp", "udp") and len(packet) >= header_len + 4:
        sport, dport = struct.unpack_from("!HH", packet, header_len)
    return proto, (str(src), sport), (str(dst), dport)


def parse_refusals(datagram: bytes) -> list[Refusal]:
    """Every packet message in one netlink datagram (ACKs and other messages are skipped)."""
    found = []
    for reply in parse_messages(datagram):
        if reply.kind != NFULNL_MSG_PACKET:
            continue
        attrs = dict(parse_attrs(reply.body[_NFGENMSG.size:]))
        payload = attrs.get(NFULA_PAYLOAD)
        if payload is None:
            raise ValueError("NFLOG packet message without payload")
        prefix = attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode(errors="replace")
        proto, src, dst = parse_ip_packet(payload)
        found.append(Refusal(prefix, proto, src, dst))
    return found


def open_socket(group: int) -> socket.socket:
    """A non-blocking NFLOG socket bound to ``group`` in the caller's current netns."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        for seq, request in enumerate((encode_bind, encode_copy_mode), start=1):
            sock.send(request(seq, group))
            for reply in parse_messages(sock.recv(4096)):
                if reply.kind == NLMSG_ERROR and error_code(reply.body):
                    err = error_code(reply.body)
                    raise OSError(err, f"NFLOG config: {os.strerror(err)}")
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
