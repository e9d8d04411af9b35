"""TCP segmentation and coalescing for a tun with offloads (TSO and GRO in software; sans-IO).

Rules of this file: no fds, no clocks; bytes in, values out.  Every checksum helper and every
virtio-net constant comes from ``tether.net.packet``; this file only adds what TCP needs.

Theory of operation
-------------------
The WireGuard engine opens the sandbox's tun with ``IFF_VNET_HDR`` and enables
``TUNSETOFFLOAD(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)``.  The sandbox's TCP stack
then hands the tun what it would hand a NIC that segments and checksums in hardware, and takes
from it what a NIC's receive offload would deliver.  The WireGuard peer, however, must see plain,
complete IP packets.  This module is the "hardware" in both directions:

* Out of the sandbox, ``split_frame(frame)``: every tun read is a ``struct virtio_net_hdr``
  (``VNET_HDR_LEN`` bytes, native byte order) and one IP packet.

  - ``gso_type`` NONE with ``NEEDS_CSUM``: the field at ``csum_start + csum_offset`` holds only
    the folded pseudo-header sum; the checksum over ``packet[csum_start:]`` is computed and stored
    as the kernel's ``skb_checksum_help`` would (a result of 0 is stored as 0xffff, which UDP
    needs and TCP accepts).  Any protocol: the header says where, not what.  Without
    ``NEEDS_CSUM`` (or with ``DATA_VALID``) the packet is complete already and goes out as is.
  - ``gso_type`` TCPV4/TCPV6 (with or without the ECN bit): a "super packet" of up to 64 KiB is
    cut into ``gso_size``-byte segments exactly as the kernel's ``tcp_gso_segment`` and
    ``inet_gso_segment`` / ``ipv6_gso_segment`` do: segment *i* gets sequence number
    ``seq + i * gso_size``, IPv4 ID ``id + i``, its own lengths and IPv4 header checksum; FIN and
    PSH stay on the last segment only, CWR on the first only (the ECN bit in ``gso_type`` only
    says that CWR is set; nothing else changes).  Every TCP checksum is computed in full: the
    super packet's own checksum field (a partial sum over the super packet's length) is ignored.
  - ``hdr_len`` is never used: kernels fill it inconsistently (``skb_headlen`` on the way out);
    header lengths come from IHL (IPv6: the hop-by-hop and destination options headers a socket
    may add, walked and copied into every segment) and the TCP data offset.  ``csum_start`` / ``csum_offset`` of a
    GSO frame are ignored too, for the same reason: TCP's layout is known.

  Speed is the point: at 1 Gbit/s this runs for ~90,000 segments a second.  What is the same for
  every segment of a frame (the header bytes that do not change, their word sum, the
  pseudo-header's addresses and protocol) is computed once per frame; per segment there is one
  ``struct`` pack of the header, one ``_word_sum`` over the payload slice, and a few additions.

* Into the sandbox, ``coalesce(packets)`` is GRO in software: the packets the engine decrypted in
  one batch, in order, become tun writes, each a list of buffers for one ``os.writev``.  A stretch
  of TCP segments that the sandbox's kernel could cut back into exactly the same segments
  (``tcp_gso_segment`` again) is written as one GSO frame, so the sandbox's stack takes one big
  skb instead of dozens.  The rules follow the kernel's ``tcp_gro_receive`` / ``inet_gro_receive``
  and wireguard-go's ``tcpPacketsCanCoalesce``, restricted to the in-order case (no reordering,
  no flow table: runs are consecutive packets of the batch).  A packet joins the current run when

  - it is TCP over IPv4 without options and not a fragment, or over IPv6 with TCP directly after
    the fixed header, and its length fields agree with its size (and, IPv4, its header checksum
    is right: merging rewrites that header, so a bad one would otherwise be laundered);
  - its flags are exactly ACK, or ACK|PSH; PSH ends the run (SYN, FIN, RST, URG, ECE, CWR never
    merge, so no ECN bit is ever needed in ``gso_type``);
  - every header byte but the lengths, IPv4 ID and checksum, sequence number, flags and TCP
    checksum equals the run's first packet's: addresses, ports, TOS / traffic class and flow label,
    TTL / hop limit, DF, ack number, window, urgent pointer, data offset and option bytes;
  - its sequence number is the run's next one, and its payload is non-empty and no longer than
    the first packet's (which is ``gso_size``); a shorter one ends the run;
  - the result stays within ``max_bytes`` of IP packet (at most 65535) and ``MAX_SEGMENTS``.

  A run of two or more becomes one frame: virtio-net header (``NEEDS_CSUM``, TCPV4/TCPV6,
  ``hdr_len`` = IP + TCP header, ``gso_size`` = the first payload's length, ``csum_start`` = the
  IP header length, ``csum_offset`` = 16), the first packet's headers with the new IP length (and
  IPv4 header checksum), PSH if the last packet had it, and in the TCP checksum field the folded,
  *not* complemented pseudo-header sum over the new TCP length - what ``CHECKSUM_PARTIAL`` means
  (``__tcp_v4_send_check``; ``tcp_gso_segment`` adjusts it per segment from there) and what
  ``UdpFramer`` stores for UDP.  Then the payloads, not copied.  Anything else - a run of one,
  another protocol, a malformed packet - is written as ``PLAIN_VNET_HEADER`` + the packet,
  untouched.  ``coalesce`` never raises: the packets come from the peer, and a packet it does not
  understand is simply not merged; the sandbox's kernel judges it as it would any other.

What the sandbox sees differs from the unmerged packets in two ways only, both as with kernel GRO.
IPv4 IDs: a merged run carries the first ID, and if the kernel ever re-segments the frame (the
sandbox forwards it) the segments get consecutive IDs from there, which equal the originals' only
if those were consecutive (TCP senders' are; they are not checked).  TCP checksums: ``NEEDS_CSUM``
tells the receiving kernel the checksum needs no verification, so the merged segments' checksums
are never checked.  Not verifying them here is deliberate: WireGuard's AEAD already proved the
packets are what the peer sent, which is why the kernel's own WireGuard marks every decrypted
packet ``CHECKSUM_UNNECESSARY`` (``drivers/net/wireguard/receive.c``); checking would double the
per-packet cost.  (wireguard-go does verify before merging.)

Malformed frames from the tun raise ``ValueError`` naming the field and offset; nothing else
escapes (``tests/unit/test_tcpoffload.py`` fuzzes both functions with hypothesis).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from functools import lru_cache

from tether.net.packet import (
    IPV4_HEADER_LEN, IPV6_HEADER_LEN, MAX_EXTENSION_HEADERS, MAX_IP_PACKET, PLAIN_VNET_HEADER, PROTO_DSTOPTS,
    PROTO_HOPOPTS, PROTO_TCP, VNET_F_NEEDS_CSUM,
    VNET_GSO_NONE, VNET_HDR_LEN, _IPV4, _IPV4_MF, _IPV4_OFFSET, _IPV6, _VNET, _complement, _word_sum,
)

__all__ = ["VNET_GSO_TCPV4", "VNET_GSO_TCPV6", "VNET_GSO_ECN", "MAX_SEGMENTS", "split_frame",
           "coalesce", "join_frame"]

# virtio-net gso_type values (include/uapi/linux/virtio_net.h) beyond those in tether.net.packet.
VNET_GSO_TCPV4 = 1
VNET_GSO_TCPV6 = 4
VNET_GSO_ECN = 0x80  # OR'd into TCPV4/TCPV6: the super packet's first segment carries CWR
_GSO_NAMES = {0: "NONE", 1: "TCPV4", 3: "UDP", 4: "TCPV6", 5: "UDP_L4"}

# TCP header (RFC 9293): flags byte and checksum field offsets, the flags themselves.
TCP_HEADER_LEN = 20  # without options
TCP_FLAGS_OFFSET = 13
TCP_CHECK_OFFSET = 16  # csum_offset of a TCP frame; the kernel rejects any other for TCP GSO
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80

# Segments per coalesced frame, a bound on what one frame stands for (the same number as
# UDP_MAX_SEGMENTS and tether.net.gso.MAX_SEGMENTS).  Full-size segments reach the 64 KiB limit
# first (45 of 1448 bytes); the cap matters only for small ones.
MAX_SEGMENTS = 64

_TCP_SEQ_FLAGS = struct.Struct("!4xI4xBB")  # from the TCP header: seq, data offset byte, flags
_CHECK = struct.Struct("!H")
# A TCP/IPv4 packet without IP options up to the TCP flags: version/IHL, total length, flags and
# fragment offset, protocol, seq, data offset byte, flags.  The same for TCP/IPv6: version byte,
# payload length, next header, seq, data offset byte, flags.
_V4_TCP = struct.Struct("!BxH2xHxB10x4xI4xBB")
_V6_TCP = struct.Struct("!B3xHB33x4xI4xBB")
_MIN_V4_TCP = IPV4_HEADER_LEN + TCP_HEADER_LEN
_MIN_V6_TCP = IPV6_HEADER_LEN + TCP_HEADER_LEN


def join_frame(frame: list[bytes]) -> bytes:
    """One ``coalesce`` frame as the single buffer ``os.writev`` would write (for tests and for
    callers without ``writev``)."""
    return b"".join(frame)


# ---------------------------------------------------------------------------------------------
# Out of the sandbox: split_frame


def split_frame(frame: bytes | memoryview) -> list[bytes]:
    """One tun read (virtio-net header + IP packet) -> complete IP packets, checksums filled."""
    view = memoryview(frame).cast("B")
    if len(view) < VNET_HDR_LEN:
        raise ValueError(f"frame of {len(view)} bytes is shorter than the {VNET_HDR_LEN}-byte "
                         "virtio-net header")
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = _VNET.unpack_from(view)
    packet = view[VNET_HDR_LEN:]
    if gso_type == VNET_GSO_NONE:
        if flags & VNET_F_NEEDS_CSUM:
            return [_complete_checksum(packet, csum_start, csum_offset)]
        return [bytes(packet)]
    kind = gso_type & ~VNET_GSO_ECN
    if kind in (VNET_GSO_TCPV4, VNET_GSO_TCPV6):
        return _segment_tcp(packet, 4 if kind == VNET_GSO_TCPV4 else 6, gso_size)
    name = _GSO_NAMES.get(kind, "unknown") + (" | ECN" if gso_type & VNET_GSO_ECN else "")
    raise ValueError(f"unsupported gso_type {gso_type:#04x} ({name}): only TCPV4 and TCPV6 are "
                     "segmented")


def _complete_checksum(packet: memoryview, start: int, offset: int) -> bytes:
    """What a NIC does for ``NEEDS_CSUM``: checksum ``packet[start:]`` (the field included, since it
    holds the pseudo-header sum) and store it at ``start + offset``; one copy of the packet."""
    size = len(packet)
    if start > size or offset + 2 > size - start:
        raise ValueError(f"checksum field at csum_start {start} + csum_offset {offset} does not "
                         f"lie within the {size}-byte packet")
    if offset % 2:
        # A 16-bit checksum is only meaningful at an even distance from where the sum starts.
        raise ValueError(f"csum_offset {offset} is odd")
    value = _complement(_word_sum(packet[start:])) or 0xFFFF  # skb_checksum_help's CSUM_MANGLED_0
    field = start + offset
    return b"".join((packet[:field], _CHECK.pack(value), packet[field + 2:]))


def _skip_ipv6_options(packet: memoryview, next_header: int, end: int) -> tuple[int, int]:
    """(the protocol after them, its offset): past the hop-by-hop and destination options headers
    a socket's sticky options (``IPV6_HOPOPTS``, ``IPV6_DSTOPTS``) put before TCP.  They are copied
    into every segment unchanged; a routing header (it changes the checksum's pseudo-header) or a
    fragment header stops the walk, and the caller refuses the frame."""
    offset = IPV6_HEADER_LEN
    for _ in range(MAX_EXTENSION_HEADERS):
        if next_header not in (PROTO_HOPOPTS, PROTO_DSTOPTS):
            break
        if offset + 2 > end:
            raise ValueError(f"truncated IPv6 extension header at offset {offset}")
        next_header, length = packet[offset], (packet[offset + 1] + 1) * 8
        if offset + length > end:
            raise ValueError(f"IPv6 extension header of {length} bytes at offset {offset} runs past the "
                             f"{end}-byte packet")
        offset += length
    return next_header, offset


@lru_cache(maxsize=64)
def _segment_layout(version: int, ip_len: int, tcp_len: int) -> struct.Struct:
    """Headers of one segment: the bytes that never change as ``s`` fields, the rest as numbers.

    IPv4: ver/IHL+TOS, total length, ID, flags+TTL+proto, header checksum, addresses+options.
    IPv6: ver/class/flow, payload length, next header+hop limit+addresses+extension headers.
    TCP: ports, seq, ack+data offset, flags, window, checksum, urgent pointer+options."""
    ip = f"2sHH4sH{ip_len - 12}s" if version == 4 else f"4sH{ip_len - 6}s"
    return struct.Struct(f"!{ip}4sI5sB2sH{tcp_len - 18}s")


def _segment_tcp(packet: memoryview, version: int, gso_size: int) -> list[bytes]:
    """Cut one TCP super packet into ``gso_size``-byte segments, as ``tcp_gso_segment`` does."""
    gso = f"TCPV{version}"
    if gso_size == 0:
        raise ValueError(f"gso_size 0 in a {gso} frame")
    size = len(packet)
    if not size:
        raise ValueError(f"empty packet in a {gso} frame")
    if packet[0] >> 4 != version:
        raise ValueError(f"IP version {packet[0] >> 4} in a {gso} frame")
    if version == 4:
        if size < IPV4_HEADER_LEN:
            raise ValueError(f"truncated IPv4 header: {size} bytes, need {IPV4_HEADER_LEN}")
        ver_ihl, _tos, end, id0, flags_offset, _ttl, proto, _csum, _src, _dst = _IPV4.unpack_from(packet)
        ip_len = (ver_ihl & 0x0F) * 4
        if ip_len < IPV4_HEADER_LEN:
            raise ValueError(f"IPv4 IHL {ver_ihl & 0x0F} < 5")
        if ip_len > size:
            raise ValueError(f"IPv4 header length {ip_len} exceeds the {size}-byte packet")
        if end < ip_len:
            raise ValueError(f"IPv4 total length {end} is shorter than its header ({ip_len})")
        if end > size:
            raise ValueError(f"IPv4 total length {end} exceeds the {size}-byte packet")
        if flags_offset & (_IPV4_MF | _IPV4_OFFSET):
            raise ValueError(f"IPv4 fragment (flags/offset {flags_offset:#06x}) in a {gso} frame")
        addresses = packet[12:20]
    else:
        if size < IPV6_HEADER_LEN:
            raise ValueError(f"truncated IPv6 header: {size} bytes, need {IPV6_HEADER_LEN}")
        _vcf, payload_len, proto, _hop, _src, _dst = _IPV6.unpack_from(packet)
        end, id0 = IPV6_HEADER_LEN + payload_len, 0
        if end > size:
            raise ValueError(f"IPv6 payload length {payload_len} exceeds the "
                             f"{size - IPV6_HEADER_LEN} bytes after the header")
        proto, ip_len = _skip_ipv6_options(packet, proto, end)
        addresses = packet[8:40]
    if proto != PROTO_TCP:
        what = "next header" if version == 6 else "protocol"
        raise ValueError(f"IPv{version} {what} {proto} is not TCP in a {gso} frame"
                         + (" (only hop-by-hop and destination options may precede it)" if version == 6 else ""))
    if end - ip_len < TCP_HEADER_LEN:
        raise ValueError(f"truncated TCP header at offset {ip_len}: {end - ip_len} bytes, "
                         f"need {TCP_HEADER_LEN}")
    seq0, doff_byte, tcp_flags = _TCP_SEQ_FLAGS.unpack_from(packet, ip_len)
    tcp_len = (doff_byte >> 4) * 4
    if tcp_len < TCP_HEADER_LEN:
        raise ValueError(f"TCP data offset {doff_byte >> 4} < 5 at offset {ip_len + 12}")
    if ip_len + tcp_len > end:
        raise ValueError(f"TCP data offset {doff_byte >> 4} ({tcp_len} bytes) runs past the "
                         f"{end - ip_len} bytes of TCP at offset {ip_len}")
    head = ip_len + tcp_len
    payload = packet[head:end]

    # Per frame: the unchanging pieces and their sums (their offsets are all even, so each
    # piece's word sum is its share of the header's).
    t = ip_len
    ports, ack_doff, window, rest = (bytes(packet[t:t + 4]), bytes(packet[t + 8:t + 13]),
                                     bytes(packet[t + 14:t + 16]), bytes(packet[t + 18:head]))
    tcp_base = (_word_sum(addresses) + PROTO_TCP  # pseudo-header; the TCP length is added per segment
                + _word_sum(ports) + _word_sum(ack_doff) + _word_sum(window) + _word_sum(rest))
    if version == 4:
        ip_a, ip_b, ip_c = bytes(packet[0:2]), bytes(packet[6:10]), bytes(packet[12:ip_len])
        ip_base = _word_sum(ip_a) + _word_sum(ip_b) + _word_sum(ip_c)
    else:
        ip_a, ip_b = bytes(packet[0:4]), bytes(packet[6:ip_len])  # extension headers included
        options_len = ip_len - IPV6_HEADER_LEN
    pack = _segment_layout(version, ip_len, tcp_len).pack

    count = -(-len(payload) // gso_size) or 1  # an empty payload still makes one packet
    last = count - 1
    if count == 1:
        first_flags = tcp_flags
    else:
        first_flags = tcp_flags & ~(FIN | PSH)
    middle_flags = tcp_flags & ~(FIN | PSH | CWR)
    last_flags = tcp_flags & ~CWR
    out = []
    for i in range(count):
        start = i * gso_size
        chunk = payload[start:start + gso_size]
        seg_len = tcp_len + len(chunk)
        seq = (seq0 + start) & 0xFFFFFFFF
        flags = first_flags if i == 0 else last_flags if i == last else middle_flags
        tcp_sum = _complement(tcp_base + seg_len + (seq >> 16) + (seq & 0xFFFF) + flags
                              + _word_sum(chunk))
        if version == 4:
            total = ip_len + seg_len
            ident = (id0 + i) & 0xFFFF
            header = pack(ip_a, total, ident, ip_b, _complement(ip_base + total + ident), ip_c,
                          ports, seq, ack_doff, flags, window, tcp_sum, rest)
        else:
            header = pack(ip_a, options_len + seg_len, ip_b, ports, seq, ack_doff, flags, window, tcp_sum, rest)
        out.append(header + chunk)
    return out


# ---------------------------------------------------------------------------------------------
# Into the sandbox: coalesce


def _key_mask(version: int, tcp_len: int) -> int:
    """All ones over the IP + TCP headers except the fields that differ between the segments of
    one run: IP lengths, IPv4 ID and checksum, TCP seq, flags and checksum."""
    ip_len = IPV4_HEADER_LEN if version == 4 else IPV6_HEADER_LEN
    mask = bytearray(b"\xff" * (ip_len + tcp_len))
    varying = [(2, 6), (10, 12)] if version == 4 else [(4, 6)]
    varying += [(ip_len + 4, ip_len + 8), (ip_len + TCP_FLAGS_OFFSET, ip_len + TCP_FLAGS_OFFSET + 1),
                (ip_len + TCP_CHECK_OFFSET, ip_len + TCP_CHECK_OFFSET + 2)]
    for begin, stop in varying:
        mask[begin:stop] = bytes(stop - begin)
    return int.from_bytes(mask, "big")


# Indexed by the TCP header length: (IPv4 mask, IPv6 mask).
_KEY_MASKS = {tcp_len: (_key_mask(4, tcp_len), _key_mask(6, tcp_len)) for tcp_len in range(20, 61, 4)}


def _mergeable(packet: bytes) -> tuple[int, int, int, int, int, int] | None:
    """(version, header length, key, seq, flags, payload length) of a TCP segment that may join a
    run, or None for anything that may not (malformed, not TCP, wrong flags, no payload).

    The key is the headers read as one integer with the varying fields masked out: two packets
    may share a run exactly when their keys are equal (the version nibble and the data offset are
    part of it, so headers of different lengths never compare equal)."""
    size = len(packet)
    if size >= _MIN_V4_TCP and packet[0] == 0x45:  # IPv4 without options
        version = 4
        _vi, total, flags_offset, proto, seq, doff_byte, flags = _V4_TCP.unpack_from(packet)
        if total != size or flags_offset & (_IPV4_MF | _IPV4_OFFSET) or proto != PROTO_TCP:
            return None
        ip_len = IPV4_HEADER_LEN
    elif size >= _MIN_V6_TCP and packet[0] >> 4 == 6:
        version = 6
        _vb, payload_len, proto, seq, doff_byte, flags = _V6_TCP.unpack_from(packet)
        if payload_len + IPV6_HEADER_LEN != size or proto != PROTO_TCP:
            return None
        ip_len = IPV6_HEADER_LEN
    else:
        return None
    if flags & ~PSH != ACK:
        return None
    tcp_len = (doff_byte >> 4) * 4
    head = ip_len + tcp_len
    if tcp_len < TCP_HEADER_LEN or head >= size:  # also refuses an empty payload
        return None
    headers = int.from_bytes(packet[:head], "big")
    # The IPv4 header's words sum to 0 modulo 0xffff exactly when its checksum is right.
    if version == 4 and (headers >> (tcp_len * 8)) % 0xFFFF:
        return None
    key = headers & _KEY_MASKS[tcp_len][version == 6]
    return version, head, key, seq, flags, size - head


def coalesce(packets: Sequence[bytes], max_bytes: int = MAX_IP_PACKET) -> list[list[bytes]]:
    """Decrypted packets (complete IP packets, in order) -> tun frames, each a list of buffers to
    ``writev``: a run of TCP segments as one GSO frame, anything else as it came (module docstring)."""
    limit = min(max_bytes, MAX_IP_PACKET)
    frames: list[list[bytes]] = []
    run: list[bytes] = []
    # The current run: its version, header length, key, next seq, segment size, IP length,
    # whether it is closed (PSH or a short segment seen) and whether the last had PSH.
    version = head = key = next_seq = seg_size = ip_total = 0
    closed = psh = False
    for packet in packets:
        info = _mergeable(packet)
        if info is not None and run and not closed:
            _version, _head, p_key, p_seq, p_flags, p_payload = info  # equal keys: same layout
            if (p_key == key and p_seq == next_seq and p_payload <= seg_size
                    and len(run) < MAX_SEGMENTS and ip_total + p_payload <= limit):
                run.append(packet)
                ip_total += p_payload
                next_seq = (p_seq + p_payload) & 0xFFFFFFFF
                psh = bool(p_flags & PSH)
                closed = psh or p_payload < seg_size
                continue
        if run:
            frames.append(_run_frame(run, version, head, seg_size, psh))
            run = []
        if info is None:
            frames.append([PLAIN_VNET_HEADER, packet])
            continue
        version, head, key, seq, p_flags, seg_size = info
        run = [packet]
        next_seq = (seq + seg_size) & 0xFFFFFFFF
        ip_total = len(packet)
        psh = closed = bool(p_flags & PSH)
    if run:
        frames.append(_run_frame(run, version, head, seg_size, psh))
    return frames


def _run_frame(run: list[bytes], version: int, head: int, seg_size: int, psh: bool) -> list[bytes]:
    """The tun frame for one run: plain for a single packet, else one GSO super packet."""
    first = run[0]
    if len(run) == 1:
        return [PLAIN_VNET_HEADER, first]
    ip_len = IPV4_HEADER_LEN if version == 4 else IPV6_HEADER_LEN
    payload = 0
    for packet in run:
        payload += len(packet) - head
    tcp_len = head - ip_len + payload
    header = bytearray(first[:head])
    if version == 4:
        struct.pack_into("!H", header, 2, ip_len + tcp_len)
        header[10:12] = b"\0\0"
        struct.pack_into("!H", header, 10, _complement(_word_sum(header[:ip_len])))
        pseudo = _word_sum(header[12:20]) + PROTO_TCP
        gso_type = VNET_GSO_TCPV4
    else:
        struct.pack_into("!H", header, 4, tcp_len)
        pseudo = _word_sum(header[8:40]) + PROTO_TCP
        gso_type = VNET_GSO_TCPV6
    if psh:
        header[ip_len + TCP_FLAGS_OFFSET] |= PSH
    # CHECKSUM_PARTIAL: the folded pseudo-header sum, not complemented; the kernel adds the rest.
    struct.pack_into("!H", header, ip_len + TCP_CHECK_OFFSET, (pseudo + tcp_len) % 0xFFFF)
    vnet = _VNET.pack(VNET_F_NEEDS_CSUM, gso_type, head, seg_size, ip_len, TCP_CHECK_OFFSET)
    frame = [vnet + header + first[head:]]
    frame.extend(memoryview(packet)[head:] for packet in run[1:])  # writev takes them as they are
    return frame
