"""IPv4/IPv6 packet codec for what the proxy engine reads from and writes to ``tun0`` (sans-IO).

Rules of this file: no sockets, no fds, no clocks; bytes in, values out.  Everything here is a
pure function of its arguments, so the engine's tun loop is a thin shell around it.

Theory of operation
-------------------
The sandbox's ``tun0`` is opened with ``IFF_TUN | IFF_NO_PI | IFF_VNET_HDR``: every ``read()``
returns exactly one IP packet after a 10-byte virtio-net header (``VNET_HDR_LEN``; no offloads are
enabled for reads, so it says nothing the engine needs), and every ``write()`` is one such header
and one IP packet - or, with ``UdpFramer``, one UDP "super packet" the kernel cuts into datagrams
(GSO) and whose checksum it fills in.  TCP and UDP never
reach the tun on the fast path (nft redirects them to sockets the engine holds), so what the engine
sees here is the rest: ICMP/ICMPv6 echo, other IP protocols, and whatever the capture rules let by.
The engine needs four things, and this module provides exactly those:

* ``parse(packet)`` -> ``Packet``: the addresses, the upper-layer protocol and its bytes, and, for
  UDP and ICMP/ICMPv6, the decoded L4 header.  IPv4 options are skipped via IHL; IPv6 extension
  headers (hop-by-hop, routing, destination options, fragment) are walked to the upper-layer
  protocol, at most ``MAX_EXTENSION_HEADERS`` of them.  Fragments are reported (``fragment=True``);
  the first fragment's L4 header is decoded (its data is then only the part in this fragment),
  a later fragment's L4 is not (it has no header).  Reassembly is not done here.
* ``build_udp`` / ``build_echo_reply``: complete packets with every checksum filled in (IPv4
  header, UDP and ICMPv6 with their pseudo-headers, ICMPv4), ready to ``write()`` to the tun.
* ``build_unreachable``: the protocol-appropriate refusal (design principle 4: deny is loud) -
  ICMP destination unreachable / ICMPv6 destination unreachable or parameter problem, quoting the
  refused packet as RFC 1812 (576-byte cap) and RFC 4443 (1280-byte cap) ask.  It refuses
  (``ValueError``) to answer what the RFCs say must never be answered: an ICMP error, a later
  fragment, a packet from an unspecified or multicast source or to a multicast/broadcast address.
* ``UdpFramer``: the headers for a flow's datagrams into the sandbox - virtio-net header, IP,
  UDP - computed from what was fixed when the flow began, for one ``writev`` with the datagrams
  behind them.  Several datagrams of one ``tether.net.gso`` run become one GSO frame; the UDP
  checksum is left to the kernel (``NEEDS_CSUM``: a local receiver trusts it), which spares the
  per-datagram checksum in Python that IPv6 otherwise demands.
* ``checksum``: the RFC 1071 Internet checksum without a per-word Python loop.  2**16 is 1 modulo
  0xffff, so the one's-complement sum of the 16-bit words is the data read as one big integer,
  modulo 0xffff; the data is read as 4 KiB integers that are added, then reduced once (~40 us for
  64 KiB here, ~3 us for 1400 bytes).

Validation is what a receiving kernel does before it would act on a packet: the version, IHL >= 5,
length fields consistent with the bytes read (bytes beyond the IP total / payload length are
trailing padding and are dropped, as the kernel trims them), the L4 header present and its length
field consistent.  Checksums of parsed packets are *not* verified - the sandbox's own kernel made
them.  Every malformed or truncated input raises ``ValueError`` with a message saying what is wrong
and where; nothing else escapes (``tests/unit/test_packet.py`` fuzzes this with hypothesis).  The
caller drops such a packet and carries on (design principle 6).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address, ip_address
from collections.abc import Sequence
from typing import Literal, TypeAlias

IPAddress: TypeAlias = IPv4Address | IPv6Address
UnreachableKind: TypeAlias = Literal["port", "admin", "protocol", "net", "host"]

# IP protocol numbers (upper layer and IPv6 extension headers).
PROTO_HOPOPTS = 0
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ROUTING = 43
PROTO_FRAGMENT = 44
PROTO_ICMPV6 = 58
PROTO_DSTOPTS = 60

# ICMP types this module builds or must recognise.
ICMP_ECHO_REPLY, ICMP_DEST_UNREACH, ICMP_ECHO_REQUEST = 0, 3, 8
ICMPV6_DEST_UNREACH, ICMPV6_PARAM_PROBLEM = 1, 4
ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY = 128, 129
_ICMP_PROTO = {4: PROTO_ICMP, 6: PROTO_ICMPV6}
ECHO_TYPES = {4: (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY), 6: (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY)}
# ICMPv4 types that are queries/replies rather than errors (RFC 792, 950, 1256).  Any other type is
# treated as an error and never answered with an error (RFC 1122 3.2.2); ICMPv6 errors are < 128.
_ICMPV4_INFORMATIONAL = frozenset({0, 8, 9, 10, 13, 14, 15, 16, 17, 18})

DEFAULT_TTL = 64
IPV4_HEADER_LEN = 20  # what the builders emit: no options
IPV6_HEADER_LEN = 40
UDP_HEADER_LEN = 8
ICMP_HEADER_LEN = 8  # type, code, checksum + 4 bytes (id/seq, unused, MTU or pointer)
MAX_IP_PACKET = 65535  # IPv4 total length / IPv6 payload length are 16 bits; no jumbograms
MAX_UDP_DATA = {4: MAX_IP_PACKET - IPV4_HEADER_LEN - UDP_HEADER_LEN,  # 65507
                6: MAX_IP_PACKET - UDP_HEADER_LEN}                     # 65527: the UDP length field
# An ICMP error must stay small enough to be delivered anywhere: RFC 1812 4.3.2.3 (576 bytes for
# IPv4, quoting at least the IP header and 8 bytes) and RFC 4443 2.4(c) (the IPv6 minimum MTU).
MAX_ICMP_ERROR = {4: 576, 6: 1280}
# IPv6 extension headers walked to reach the upper layer.  Each takes >= 8 bytes, so the packet
# length bounds the walk already; the explicit cap keeps a crafted chain cheap and predictable.
MAX_EXTENSION_HEADERS = 8
CHECKSUM_CHUNK = 4096  # bytes summed as one integer (even; 2-8 KiB measured fastest for 64 KiB)
_EXTENSION_NAMES = {PROTO_HOPOPTS: "hop-by-hop options", PROTO_ROUTING: "routing",
                    PROTO_FRAGMENT: "fragment", PROTO_DSTOPTS: "destination options"}

# (type, code) of the refusal for each kind, per family.  IPv6 has no "protocol unreachable": an
# unknown next header is a parameter problem (code 1) pointing at the offending next-header field.
UNREACHABLE: dict[int, dict[str, tuple[int, int]]] = {
    4: {"net": (ICMP_DEST_UNREACH, 0), "host": (ICMP_DEST_UNREACH, 1),
        "protocol": (ICMP_DEST_UNREACH, 2), "port": (ICMP_DEST_UNREACH, 3),
        "admin": (ICMP_DEST_UNREACH, 13)},  # communication administratively prohibited (RFC 1812)
    6: {"net": (ICMPV6_DEST_UNREACH, 0),  # no route to destination
        "admin": (ICMPV6_DEST_UNREACH, 1),  # communication administratively prohibited
        "host": (ICMPV6_DEST_UNREACH, 3),  # address unreachable
        "port": (ICMPV6_DEST_UNREACH, 4),
        "protocol": (ICMPV6_PARAM_PROBLEM, 1)},  # unrecognized next header
}

_IPV4 = struct.Struct("!BBHHHBBH4s4s")  # ver/ihl, tos, total length, id, flags/frag, ttl, proto, csum
_IPV6 = struct.Struct("!IHBB16s16s")  # ver/class/flow, payload length, next header, hop limit
_UDP = struct.Struct("!HHHH")  # src port, dst port, length, checksum
_ICMP = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence (echo layout)
_IPV4_DF, _IPV4_MF, _IPV4_OFFSET = 0x4000, 0x2000, 0x1FFF


@dataclass(frozen=True, slots=True)
class Udp:
    """A decoded UDP header.  ``data`` is the datagram's payload (partial in a first fragment)."""

    src_port: int
    dst_port: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Icmp:
    """A decoded ICMP or ICMPv6 message.

    For echo request/reply, ``identifier`` and ``sequence`` are set and ``data`` is the echo
    payload.  For any other type they are ``None`` and ``data`` is everything after the 4-byte
    type/code/checksum (for errors: the 4 unused/MTU/pointer bytes, then the quoted packet).
    """

    type: int
    code: int
    identifier: int | None
    sequence: int | None
    data: bytes

    @property
    def is_echo(self) -> bool:
        return self.identifier is not None


@dataclass(frozen=True, slots=True)
class Packet:
    """One IP packet as read from the tun.

    ``header`` is the raw IP header (with IPv4 options, or with the IPv6 extension headers up to the
    upper layer), ``payload`` the upper-layer bytes after it (trailing bytes beyond the IP length
    fields dropped).  ``proto`` is the upper-layer protocol; for an IPv6 later fragment it is the
    fragment header's next header.  ``udp``/``icmp`` are set when ``proto`` is UDP / ICMP of the
    packet's family and this is not a later fragment.
    """

    version: int
    src: IPAddress
    dst: IPAddress
    proto: int
    ttl: int
    header: bytes
    payload: bytes
    fragment: bool = False
    udp: Udp | None = None
    icmp: Icmp | None = None
    # Offset in the packet of the next-header (IPv6) / protocol (IPv4) byte naming ``proto``: the
    # pointer of an ICMPv6 "unrecognized next header" parameter problem.
    proto_offset: int = 9
    # True for a fragment other than the first (its payload starts mid-datagram).
    later_fragment: bool = False

    @property
    def hop_limit(self) -> int:
        """The IPv6 name of ``ttl``."""
        return self.ttl

    def with_sequence(self, sequence: int) -> Packet:
        """This echo request with another sequence number (to answer each reply a host ICMP socket
        returns for a flow with the sequence it carries, not the latest request's)."""
        if self.icmp is None or self.icmp.identifier is None:
            raise ValueError("not an ICMP echo message")
        if not 0 <= sequence <= 0xFFFF:
            raise ValueError(f"ICMP sequence {sequence} out of range 0..65535")
        return replace(self, icmp=replace(self.icmp, sequence=sequence))


# ---------------------------------------------------------------------------------------------
# Checksums


def checksum(data: bytes | bytearray | memoryview) -> int:
    """RFC 1071 Internet checksum: the one's complement of the one's-complement sum of the words.

    An odd length is padded with a zero byte.  A buffer whose checksum field holds a correct
    checksum sums to 0xffff, so ``checksum(whole) == 0`` verifies it.
    """
    return _complement(_word_sum(data))


# Folding a packet-sized integer: x = hi * 2**k + lo is congruent to hi + lo when k is a multiple of
# 16, and hi + lo is 0 only when x is.  Halving the integer twice before the final ``% 0xffff``
# (a long division, ~1 ns per bit on 3.11) is cheaper than dividing it whole; the masks per size
# are made once.
_FOLD_FROM = 512
_FOLDS: dict[int, tuple[int, int, int, int]] = {}


def _folds(size: int) -> tuple[int, int, int, int]:
    """Shift widths (multiples of 16 bits) and masks that halve a ``size``-byte integer twice."""
    first = (size * 4) & ~15
    second = (first // 2) & ~15
    _FOLDS[size] = folds = (first, (1 << first) - 1, second, (1 << second) - 1)
    return folds


def _word_sum(data: bytes | bytearray | memoryview) -> int:
    """A number congruent to the sum of the big-endian 16-bit words of ``data`` modulo 0xffff.

    2**16 == 1 (mod 0xffff), so any even-length run of bytes read as one integer is congruent to the
    sum of its words.  Reading CHECKSUM_CHUNK bytes at a time and adding keeps the final modulo on
    a small number, twice as fast as one 64 KiB integer.  The result is 0 only for all-zero data.
    """
    size = len(data)
    if size <= CHECKSUM_CHUNK and not size & 1:  # one packet's worth: a single integer
        value = int.from_bytes(data, "big")
        if size >= _FOLD_FROM:  # halved twice: shifts and masks are cheaper than a long division
            first, first_mask, second, second_mask = _FOLDS.get(size) or _folds(size)
            value = (value >> first) + (value & first_mask)
            value = (value >> second) + (value & second_mask)
        return value
    view = memoryview(data).cast("B")
    even = len(view) & ~1
    total = 0
    for start in range(0, even, CHECKSUM_CHUNK):
        total += int.from_bytes(view[start:min(start + CHECKSUM_CHUNK, even)], "big")
    if even != len(view):
        total += view[even] << 8  # the odd last byte, padded with a zero byte
    return total


def _complement(total: int) -> int:
    """Checksum from a ``_word_sum`` (or a sum of them over even-length parts)."""
    # The one's-complement sum is 0 only for all-zero data; otherwise it lies in 1..0xffff, where
    # 0xffff ("negative zero") stands for 0 modulo 0xffff.
    folded = total % 0xFFFF
    if folded == 0 and total:
        folded = 0xFFFF
    return ~folded & 0xFFFF


def _l4_checksum(src: IPAddress, dst: IPAddress, proto: int, *parts: bytes) -> int:
    """UDP (RFC 768, RFC 8200 8.1) / ICMPv6 (RFC 4443 2.3) checksum over the pseudo-header and
    ``parts`` (the segment, split without copying; every part but the last of even length)."""
    length = sum(len(part) for part in parts)
    if src.version == 4:
        pseudo = src.packed + dst.packed + struct.pack("!xBH", proto, length)
    else:
        pseudo = src.packed + dst.packed + struct.pack("!I3xB", length, proto)
    return _complement(_word_sum(pseudo) + sum(_word_sum(part) for part in parts))


# ---------------------------------------------------------------------------------------------
# Parsing


def parse(packet: bytes | bytearray | memoryview) -> Packet:
    """Decode one IPv4 or IPv6 packet; ``ValueError`` says what is malformed."""
    ip = _parse_ip(packet)
    if ip.later_fragment:
        return ip
    if ip.proto == PROTO_UDP:
        return replace(ip, udp=_parse_udp(ip.payload, ip.fragment))
    if ip.proto == _ICMP_PROTO[ip.version]:
        return replace(ip, icmp=_parse_icmp(ip.payload, ip.version))
    return ip


def _parse_ip(packet: bytes | bytearray | memoryview) -> Packet:
    """The IP layer alone (``udp``/``icmp`` unset): all a refusal needs, even if the L4 is garbled."""
    packet = bytes(packet)
    if not packet:
        raise ValueError("empty packet")
    version = packet[0] >> 4
    if version == 4:
        return _parse_ipv4(packet)
    if version == 6:
        return _parse_ipv6(packet)
    raise ValueError(f"IP version {version} (expected 4 or 6)")


def _parse_ipv4(packet: bytes) -> Packet:
    if len(packet) < IPV4_HEADER_LEN:
        raise ValueError(f"truncated IPv4 header: {len(packet)} bytes, need {IPV4_HEADER_LEN}")
    ver_ihl, _tos, total, _ident, flags_offset, ttl, proto, _csum, src, dst = _IPV4.unpack_from(packet)
    header_len = (ver_ihl & 0x0F) * 4
    if header_len < IPV4_HEADER_LEN:
        raise ValueError(f"IPv4 IHL {ver_ihl & 0x0F} < 5")
    if header_len > len(packet):
        raise ValueError(f"IPv4 header length {header_len} exceeds the {len(packet)} bytes read")
    if total < header_len:
        raise ValueError(f"IPv4 total length {total} is shorter than its header ({header_len})")
    if total > len(packet):
        raise ValueError(f"IPv4 total length {total} exceeds the {len(packet)} bytes read")
    offset = flags_offset & _IPV4_OFFSET
    return Packet(version=4, src=IPv4Address(src), dst=IPv4Address(dst), proto=proto, ttl=ttl,
                  header=packet[:header_len], payload=packet[header_len:total],
                  fragment=bool(flags_offset & _IPV4_MF or offset), proto_offset=9,
                  later_fragment=offset != 0)


def _parse_ipv6(packet: bytes) -> Packet:
    if len(packet) < IPV6_HEADER_LEN:
        raise ValueError(f"truncated IPv6 header: {len(packet)} bytes, need {IPV6_HEADER_LEN}")
    _vcf, payload_len, next_header, hop_limit, src, dst = _IPV6.unpack_from(packet)
    end = IPV6_HEADER_LEN + payload_len
    if end > len(packet):
        raise ValueError(f"IPv6 payload length {payload_len} exceeds the "
                         f"{len(packet) - IPV6_HEADER_LEN} bytes after the header")
    offset, field, count = IPV6_HEADER_LEN, 6, 0
    fragment = later = False
    while next_header in _EXTENSION_NAMES:
        name = _EXTENSION_NAMES[next_header]
        count += 1
        if count > MAX_EXTENSION_HEADERS:
            raise ValueError(f"more than {MAX_EXTENSION_HEADERS} IPv6 extension headers")
        if next_header == PROTO_HOPOPTS and offset != IPV6_HEADER_LEN:
            raise ValueError(f"IPv6 hop-by-hop options header at offset {offset}, not first")
        if end - offset < 8:
            raise ValueError(f"truncated IPv6 {name} header at offset {offset}")
        if next_header == PROTO_FRAGMENT:
            length = 8
            frag_field = int.from_bytes(packet[offset + 2:offset + 4], "big")
            more, frag_offset = frag_field & 1, frag_field >> 3
            # An atomic fragment (offset 0, no more fragments; RFC 6946) is a whole packet.
            fragment = fragment or bool(more or frag_offset)
            later = frag_offset != 0
        else:
            length = (packet[offset + 1] + 1) * 8
            if offset + length > end:
                raise ValueError(f"truncated IPv6 {name} header at offset {offset}: "
                                 f"{length} bytes declared, {end - offset} present")
        field, next_header = offset, packet[offset]
        offset += length
        if later:  # what follows is the middle of the datagram, not headers
            break
    return Packet(version=6, src=IPv6Address(src), dst=IPv6Address(dst), proto=next_header,
                  ttl=hop_limit, header=packet[:offset], payload=packet[offset:end],
                  fragment=fragment, proto_offset=field, later_fragment=later)


def _parse_udp(segment: bytes, fragment: bool) -> Udp:
    if len(segment) < UDP_HEADER_LEN:
        raise ValueError(f"truncated UDP header: {len(segment)} bytes, need {UDP_HEADER_LEN}")
    sport, dport, length, _csum = _UDP.unpack_from(segment)
    if length < UDP_HEADER_LEN:
        raise ValueError(f"UDP length {length} < {UDP_HEADER_LEN}")
    if length < len(segment) or (length > len(segment) and not fragment):
        raise ValueError(f"UDP length {length} does not match the {len(segment)}-byte segment")
    return Udp(src_port=sport, dst_port=dport, data=segment[UDP_HEADER_LEN:])


def _parse_icmp(message: bytes, version: int) -> Icmp:
    if len(message) < 4:
        raise ValueError(f"truncated ICMP header: {len(message)} bytes, need 4")
    kind, code = message[0], message[1]
    if kind in ECHO_TYPES[version]:
        if len(message) < ICMP_HEADER_LEN:
            raise ValueError(f"truncated ICMP echo header: {len(message)} bytes, need {ICMP_HEADER_LEN}")
        _t, _c, _csum, identifier, sequence = _ICMP.unpack_from(message)
        return Icmp(type=kind, code=code, identifier=identifier, sequence=sequence,
                    data=message[ICMP_HEADER_LEN:])
    return Icmp(type=kind, code=code, identifier=None, sequence=None, data=message[4:])


# ---------------------------------------------------------------------------------------------
# Building


def _ip_header(src: IPAddress, dst: IPAddress, proto: int, payload_len: int, ttl: int) -> bytes:
    """A fixed IP header without options.  IPv4: DF set, ID 0 (an atomic datagram, RFC 6864)."""
    if not 0 <= ttl <= 255:
        raise ValueError(f"TTL {ttl} out of range 0..255")
    if src.version == 4:
        header = bytearray(_IPV4.pack(0x45, 0, IPV4_HEADER_LEN + payload_len, 0, _IPV4_DF, ttl, proto,
                                      0, src.packed, dst.packed))
        struct.pack_into("!H", header, 10, checksum(header))
        return bytes(header)
    return _IPV6.pack(6 << 28, payload_len, proto, ttl, src.packed, dst.packed)


def _address_pair(src: IPAddress | str, dst: IPAddress | str) -> tuple[IPAddress, IPAddress]:
    source, destination = ip_address(src), ip_address(dst)
    if source.version != destination.version:
        raise ValueError(f"address families differ: {source} and {destination}")
    return source, destination


def _icmp_message(src: IPAddress, dst: IPAddress, kind: int, code: int, rest: bytes, body: bytes) -> bytes:
    """IP header + ICMP/ICMPv6 message (type, code, checksum, 4 bytes ``rest``, body)."""
    proto = _ICMP_PROTO[src.version]
    head = struct.pack("!BBH4s", kind, code, 0, rest)
    # ICMPv4 has no pseudo-header; ICMPv6 has one, like UDP.
    if src.version == 4:
        value = _complement(_word_sum(head) + _word_sum(body))
    else:
        value = _l4_checksum(src, dst, proto, head, body)
    head = struct.pack("!BBH4s", kind, code, value, rest)
    return b"".join((_ip_header(src, dst, proto, len(head) + len(body), DEFAULT_TTL), head, body))


def _check_ports(sport: int, dport: int) -> None:
    for name, port in (("source", sport), ("destination", dport)):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"UDP {name} port {port} out of range 0..65535")


def build_udp(src: IPAddress | str, sport: int, dst: IPAddress | str, dport: int,
              data: bytes, ttl: int = DEFAULT_TTL) -> bytes:
    """A complete UDP/IPv4 or UDP/IPv6 packet (family from the addresses) with its checksums."""
    source, destination = _address_pair(src, dst)
    _check_ports(sport, dport)
    limit = MAX_UDP_DATA[source.version]
    if len(data) > limit:
        raise ValueError(f"UDP data of {len(data)} bytes exceeds {limit} for IPv{source.version}")
    length = UDP_HEADER_LEN + len(data)
    value = _l4_checksum(source, destination, PROTO_UDP, _UDP.pack(sport, dport, length, 0), data)
    # 0 means "no checksum" (forbidden in IPv6): a computed 0 is sent as its other form, 0xffff.
    udp_header = _UDP.pack(sport, dport, length, value or 0xFFFF)
    return b"".join((_ip_header(source, destination, PROTO_UDP, length, ttl), udp_header, data))


# --- frames for a tun with a virtio-net header (IFF_VNET_HDR) ---------------------------------

VNET_HDR_LEN = 10  # struct virtio_net_hdr, the tun's default TUNSETVNETHDRSZ
VNET_F_NEEDS_CSUM = 1  # checksum from csum_start, stored at csum_start + csum_offset, by the kernel
VNET_GSO_NONE = 0
VNET_GSO_UDP_L4 = 5  # UDP segmentation (USO): cut into gso_size-byte datagrams
# flags, gso_type, hdr_len, gso_size, csum_start, csum_offset: native ("legacy") byte order
_VNET = struct.Struct("=BBHHHH")
PLAIN_VNET_HEADER = bytes(VNET_HDR_LEN)  # "nothing to offload": an ordinary, complete packet
_UDP_CHECK_OFFSET = 6


class UdpFramer:
    """Headers for the datagrams of one UDP flow written into the tun, from ``src`` to ``dst``.

    What does not change per datagram (addresses, ports, the partial sums of the IPv4 header and
    the pseudo-header) is computed once, when the flow starts; ``headers`` then costs a handful
    of integer operations.  The UDP checksum field holds the folded pseudo-header sum, as
    ``NEEDS_CSUM`` requires: the kernel adds the rest (and, for a GSO frame, re-derives it per
    datagram from the super packet's length)."""

    __slots__ = ("version", "_ip_len", "_ip_fixed", "_ip_sum", "_ports", "_pseudo_sum", "_ipv6_tail")

    def __init__(self, src: IPAddress | str, sport: int, dst: IPAddress | str, dport: int,
                 ttl: int = DEFAULT_TTL) -> None:
        source, destination = _address_pair(src, dst)
        _check_ports(sport, dport)
        if not 0 <= ttl <= 255:
            raise ValueError(f"TTL {ttl} out of range 0..255")
        self.version = source.version
        self._ports = struct.pack("!HH", sport, dport)
        addresses = source.packed + destination.packed
        self._pseudo_sum = (_word_sum(addresses) + PROTO_UDP) % 0xFFFF
        # IPv4: the header with total length and checksum 0, both filled in per frame.
        # IPv6: everything after the payload length (next header, hop limit, addresses).
        self._ip_len = IPV4_HEADER_LEN if self.version == 4 else IPV6_HEADER_LEN
        self._ip_fixed = _IPV4.pack(0x45, 0, 0, 0, _IPV4_DF, ttl, PROTO_UDP, 0, source.packed,
                                    destination.packed) if self.version == 4 else b""
        self._ip_sum = _word_sum(self._ip_fixed)
        self._ipv6_tail = struct.pack("!BB", PROTO_UDP, ttl) + addresses

    def headers(self, datagrams: Sequence[bytes]) -> bytes:
        """virtio-net + IP + UDP headers to write (``writev``) just before ``datagrams``: one
        ``tether.net.gso`` run, several datagrams becoming one GSO frame."""
        payload = 0
        for datagram in datagrams:
            payload += len(datagram)
        length = UDP_HEADER_LEN + payload
        if length - UDP_HEADER_LEN > MAX_UDP_DATA[self.version] or not datagrams:
            raise ValueError(f"{len(datagrams)} datagrams of {payload} bytes do not fit one IPv{self.version} packet")
        segmented = len(datagrams) > 1
        vnet = _VNET.pack(VNET_F_NEEDS_CSUM, VNET_GSO_UDP_L4 if segmented else VNET_GSO_NONE,
                          self._ip_len + UDP_HEADER_LEN, len(datagrams[0]) if segmented else 0,
                          self._ip_len, _UDP_CHECK_OFFSET)
        udp = self._ports + struct.pack("!HH", length, (self._pseudo_sum + length) % 0xFFFF)
        if self.version == 4:
            total = IPV4_HEADER_LEN + length
            ip = bytearray(self._ip_fixed)
            struct.pack_into("!H", ip, 2, total)
            struct.pack_into("!H", ip, 10, _complement(self._ip_sum + total))
            return vnet + ip + udp
        return vnet + struct.pack("!IH", 6 << 28, length) + self._ipv6_tail + udp


def build_echo_reply(request: Packet, data: bytes | None = None) -> bytes:
    """The echo reply to ``request`` (ICMP or ICMPv6): from its destination to its source, same
    identifier and sequence, the request's data unless ``data`` is given."""
    icmp = request.icmp
    if icmp is None or icmp.type != ECHO_TYPES[request.version][0] or icmp.identifier is None:
        raise ValueError("not an ICMP echo request")
    if request.fragment:
        raise ValueError("echo request is a fragment; reassemble it first")
    if request.dst.is_multicast or request.dst == IPv4Address("255.255.255.255"):
        raise ValueError(f"echo request to {request.dst}: a reply needs a unicast source")
    body = icmp.data if data is None else bytes(data)
    limit = MAX_IP_PACKET - ICMP_HEADER_LEN - (IPV4_HEADER_LEN if request.version == 4 else 0)
    if len(body) > limit:
        raise ValueError(f"echo data of {len(body)} bytes exceeds {limit} for IPv{request.version}")
    rest = struct.pack("!HH", icmp.identifier, icmp.sequence)
    return _icmp_message(request.dst, request.src, ECHO_TYPES[request.version][1], 0, rest, body)


def build_unreachable(original: bytes | bytearray | memoryview, kind: UnreachableKind,
                      src: IPAddress | str) -> bytes:
    """The ICMP/ICMPv6 error refusing ``original``, from ``src`` to the original's source.

    ``kind`` picks the type/code from ``UNREACHABLE``.  The original packet (up to its IP length)
    is quoted as far as the error stays within ``MAX_ICMP_ERROR`` (576 bytes IPv4, 1280 IPv6).
    ``ValueError`` if ``original`` is malformed, the families differ, or the RFCs forbid an error
    here (RFC 1122 3.2.2, RFC 1812 4.3.2.7, RFC 4443 2.4(e)).
    """
    packet = _parse_ip(original)
    source = ip_address(src)
    if source.version != packet.version:
        raise ValueError(f"error source {source} is not IPv{packet.version} like the original")
    if kind not in UNREACHABLE[packet.version]:
        raise ValueError(f"unknown unreachable kind {kind!r}")
    refusal = _why_no_error(packet)
    if refusal:
        raise ValueError(f"no ICMP error may be sent about {refusal}")
    icmp_type, code = UNREACHABLE[packet.version][kind]
    rest = struct.pack("!I", packet.proto_offset) if icmp_type == ICMPV6_PARAM_PROBLEM else bytes(4)
    ip_len = IPV4_HEADER_LEN if packet.version == 4 else IPV6_HEADER_LEN
    room = MAX_ICMP_ERROR[packet.version] - ip_len - ICMP_HEADER_LEN
    whole = packet.header + packet.payload  # the original without trailing padding
    return _icmp_message(source, packet.src, icmp_type, code, rest, whole[:room])


def _why_no_error(packet: Packet) -> str | None:
    """Why an ICMP error about ``packet`` is forbidden, or None when it may be sent."""
    if packet.later_fragment:
        return "a fragment other than the first"
    if packet.src.is_unspecified or packet.src.is_multicast:
        return f"a packet from {packet.src}"
    if packet.dst.is_multicast or packet.dst == IPv4Address("255.255.255.255"):
        return f"a packet to {packet.dst}"
    if packet.proto == _ICMP_PROTO[packet.version]:
        if not packet.payload:
            return "an ICMP message whose type is missing"
        kind = packet.payload[0]
        is_error = (kind not in _ICMPV4_INFORMATIONAL) if packet.version == 4 else (kind < 128)
        if is_error:
            return f"an ICMP error (type {kind})"
    return None
