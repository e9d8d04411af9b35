"""The WireGuard engine's I/O shell: two real Devices, each behind a ``WireGuardEngine`` with a
real UDP socket on loopback and a SOCK_DGRAM socketpair standing in for its tun (one packet per
read and write, as a tun).  What goes into one "tun" comes out of the other, encrypted on the way."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import struct

import pytest

from tether.engine.wireguard import engine as engine_module
from tether.engine.wireguard.device import Device, PeerSpec
from tether.engine.wireguard.engine import (ALL_OFFLOADS, WireGuardEngine, mapped, offloads_from_environment,
                                            open_udp_socket, protocol_clock, time_scale_from_environment, unmap)
from tether.engine.wireguard.keys import generate_private_key, public_key
from tether.net.packet import checksum
from tether.net.tcpoffload import split_frame


def ipv4_packet(src: str, dst: str, payload: bytes) -> bytes:
    """A minimal IPv4/UDP packet (checksums are not checked by the device)."""
    udp = struct.pack("!HHHH", 40000, 7, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                         ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    return header + udp


def test_unmap_and_mapped():
    assert unmap("::ffff:192.0.2.1") == "192.0.2.1" and unmap("2001:db8::1") == "2001:db8::1"
    assert unmap("192.0.2.1") == "192.0.2.1"
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert mapped(v6, "192.0.2.1") == "::ffff:192.0.2.1" and mapped(v6, "::1") == "::1"
        assert mapped(v4, "192.0.2.1") == "192.0.2.1"
    finally:
        v6.close()
        v4.close()


def tcp_super_frame(src: str, dst: str, payload: bytes, mss: int) -> bytes:
    """What a tun with TSO hands its reader: a virtio-net header (GSO TCPV4, NEEDS_CSUM) and one
    IPv4/TCP packet carrying ``payload`` whole."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, 1000, 1, 5 << 4, 0x18, 65535, 0, 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 7, 0x4000, 64, 6, 0,
                         ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    vnet = struct.pack("=BBHHHH", 1, 1, 40, mss, 20, 16)
    return vnet + header + tcp


def tcp_payloads(frames: list[bytes]) -> tuple[bytes, int]:
    """The TCP data carried by tun frames read from the far side, and how many segments carried it;
    every segment's IPv4 and TCP checksums must be right."""
    data, segments = b"", 0
    for frame in frames:
        for packet in split_frame(frame):
            assert checksum(packet[:20]) == 0
            pseudo = packet[12:20] + struct.pack("!BBH", 0, 6, len(packet) - 20)
            assert checksum(pseudo + packet[20:]) == 0
            data += packet[20 + (packet[32] >> 4) * 4:]
            segments += 1
    return data, segments


class Pair:
    """Two engines over loopback UDP, each with a SOCK_DGRAM socketpair for a tun."""

    addresses = ["10.99.0.1", "10.99.0.2"]

    def __init__(self, vnet_header: bool = False, offloads: frozenset[str] = ALL_OFFLOADS):
        keys = [generate_private_key() for _ in range(2)]
        self.socks = [open_udp_socket(None) for _ in range(2)]
        self.ports = [s.getsockname()[1] for s in self.socks]
        self.tuns = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(2)]  # (engine, app)
        self.engines = []
        for me, other in ((0, 1), (1, 0)):
            device = Device(keys[me], [PeerSpec(public_key(keys[other]), endpoint=("127.0.0.1", self.ports[other]),
                                                allowed_ips=(ipaddress.ip_network(f"{self.addresses[other]}/32"),))])
            self.engines.append(WireGuardEngine(self.tuns[me][0].fileno(), self.socks[me], device,
                                                vnet_header=vnet_header, offloads=offloads))
        self.app = [pair[1] for pair in self.tuns]

    def start(self) -> None:
        for engine in self.engines:
            engine.start()
        for side in self.app:
            side.setblocking(False)

    async def packet(self, text: bytes) -> bytes:
        """A small packet into tun 0 (vnet framing); what tun 1 reads."""
        self.app[0].send(bytes(10) + ipv4_packet(self.addresses[0], self.addresses[1], text))
        return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.app[1], 65535), 10)

    async def tcp_through(self, payload: bytes, mss: int) -> tuple[list[bytes], int]:
        """``payload`` as one TSO frame into tun 0; the frames tun 1 reads until it all arrived
        (checked whole), and how many segments carried it."""
        self.app[0].send(tcp_super_frame(self.addresses[0], self.addresses[1], payload, mss))
        frames, got, segments = [], b"", 0
        while len(got) < len(payload):
            frames.append(await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.app[1], 65535 + 10), 10))
            got, segments = tcp_payloads(frames)
        assert got == payload
        return frames, segments

    def close(self) -> None:
        for engine in self.engines:
            engine.close()
        for sock in self.socks:
            sock.close()
        for pair in self.tuns:
            for end in pair:
                end.close()


def test_tcp_super_packets_are_segmented_sent_with_gso_and_coalesced_on_the_far_side():
    """vnet-header mode: a 64 KiB TSO frame from the sandbox leaves as MTU-sized datagrams (UDP GSO
    on loopback: a few sendmsg calls) and reaches the other sandbox as few GSO frames again, every
    segment with correct checksums and the data intact."""
    async def main():
        pair = Pair(vnet_header=True)
        try:
            pair.start()
            # a first packet to complete the handshake (staged packets go out one by one)
            first = await pair.packet(b"hello")
            assert first[10:].endswith(b"hello") and first[1] == 0  # a plain frame: no gso_type
            frames, segments = await pair.tcp_through(os.urandom(60000), 1360)
            assert segments == -(-60000 // 1360)
            assert len(frames) < segments  # coalesced: fewer writes than segments
            sender, receiver = pair.engines
            assert sender.stats["gso_sends"] >= 1 and sender.gso
            assert receiver.stats["gro_writes"] >= 1
            assert sender.stats["tun_malformed"] == 0 and receiver.stats["tun_errors"] == 0
            # a frame too short for its own virtio-net header is counted and dropped
            pair.app[0].send(b"\x01\x01")
            assert (await pair.packet(b"after")).endswith(b"after")
            assert sender.stats["tun_malformed"] == 1
        finally:
            pair.close()

    asyncio.run(main())


@pytest.mark.parametrize("refusal", [errno.EIO, errno.EINVAL, errno.EMSGSIZE])
def test_a_kernel_that_refuses_udp_gso_gets_the_same_datagrams_one_by_one(monkeypatch, refusal):
    """EIO (no checksum offload on the route's device), EINVAL/EMSGSIZE (a segment bigger than the
    route's MTU): GSO is turned off for good and the refused run goes out datagram by datagram."""
    calls = []

    def refuse(sock, datagrams, address=None):
        calls.append(len(datagrams))
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(engine_module._sys, "send_segmented", refuse)

    async def main():
        pair = Pair(vnet_header=True)
        try:
            pair.start()
            await pair.packet(b"hello")
            await pair.tcp_through(os.urandom(20000), 1360)
            sender = pair.engines[0]
            assert calls == [15] and sender.gso is False and sender.stats["gso_sends"] == 0
            assert sender.stats["send_errors"] == 0 and sender.show()["io"]["udp_gso"] is False
            assert sender.stats["gso_refusals"] == 1
            # GSO_RETRY_AFTER later, the next batch tries GSO again (and is refused again here)
            sender._gso_retry_at = 0.0
            await pair.tcp_through(os.urandom(5000), 1360)
            assert calls == [15, 4] and sender.stats["gso_refusals"] == 2 and sender.gso is False
        finally:
            pair.close()

    asyncio.run(main())


def test_a_gso_send_lost_to_a_full_buffer_is_counted_and_gso_stays_on(monkeypatch):
    """ENOBUFS/EAGAIN lose that run like any datagram (TCP resends); they say nothing about GSO."""
    monkeypatch.setattr(engine_module._sys, "send_segmented",
                        lambda sock, datagrams, address=None: (_ for _ in ()).throw(OSError(errno.ENOBUFS, "full")))
    pair = Pair(vnet_header=True)
    try:
        sender = pair.engines[0]
        sender._send_run([b"a" * 100, b"b" * 100], ("127.0.0.1", pair.ports[1]))
        assert sender.stats["send_errors"] == 1 and sender.gso is True
    finally:
        pair.close()


@pytest.mark.parametrize("offloads", [frozenset(), frozenset({"gso"}), frozenset({"gro"}), frozenset({"tso", "gro"})])
def test_each_offload_can_be_turned_off_and_the_data_still_arrives(offloads):
    """TETHER_WG_OFFLOADS: without gso every datagram is its own sendto, without gro every packet
    its own tun write; the data is the same."""
    async def main():
        pair = Pair(vnet_header=True, offloads=offloads)
        try:
            pair.start()
            await pair.packet(b"hello")
            frames, segments = await pair.tcp_through(os.urandom(30000), 1360)
            sender, receiver = pair.engines
            assert sender.gso == ("gso" in offloads) and receiver.gro == ("gro" in offloads)
            assert (sender.stats["gso_sends"] > 0) == ("gso" in offloads)
            assert (receiver.stats["gro_writes"] > 0) == ("gro" in offloads)
            assert (len(frames) == segments) == ("gro" not in offloads)
            shown = receiver.show()["io"]
            assert shown["udp_gso"] == ("gso" in offloads) and shown["tun_gro"] == ("gro" in offloads)
        finally:
            pair.close()

    asyncio.run(main())


def test_offloads_from_the_environment():
    assert offloads_from_environment({}) == ALL_OFFLOADS == {"tso", "gso", "gro"}
    assert offloads_from_environment({"TETHER_WG_OFFLOADS": ""}) == ALL_OFFLOADS
    assert offloads_from_environment({"TETHER_WG_OFFLOADS": "none"}) == frozenset()
    assert offloads_from_environment({"TETHER_WG_OFFLOADS": " GSO, tso "}) == {"gso", "tso"}
    for bad in ("lro", "tso,ufo", "none,gso"):
        with pytest.raises(ValueError, match="TETHER_WG_OFFLOADS"):
            offloads_from_environment({"TETHER_WG_OFFLOADS": bad})


def test_time_scale_from_the_environment():
    assert time_scale_from_environment({}) == 1.0
    assert time_scale_from_environment({"TETHER_WG_TEST_TIME_SCALE": " 60 "}) == 60.0
    assert time_scale_from_environment({"TETHER_WG_TEST_TIME_SCALE": "250"}) == 250.0
    for bad in ("x", "0.99", "251", "inf", "nan", "-1"):
        with pytest.raises(ValueError, match="TETHER_WG_TEST_TIME_SCALE"):
            time_scale_from_environment({"TETHER_WG_TEST_TIME_SCALE": bad})


def test_protocol_clock_runs_at_its_scale():
    import time

    assert protocol_clock(1.0) is time.monotonic
    fast = protocol_clock(50.0)
    wall, start = time.monotonic(), fast()
    time.sleep(0.04)
    elapsed = fast() - start
    assert 50 * 0.04 * 0.9 <= elapsed <= 50 * (time.monotonic() - wall) * 1.1


def test_two_engines_carry_packets_both_ways_over_loopback():
    async def main():
        pair = Pair()
        addresses, app = pair.addresses, pair.app
        loop = asyncio.get_running_loop()
        try:
            pair.start()
            sent = ipv4_packet(addresses[0], addresses[1], b"through the tunnel")
            app[0].send(sent)  # the sandbox's packet, into tun 0
            received = await asyncio.wait_for(loop.sock_recv(app[1], 65535), 10)
            assert received == sent
            reply = ipv4_packet(addresses[1], addresses[0], b"and back")
            app[1].send(reply)
            assert await asyncio.wait_for(loop.sock_recv(app[0], 65535), 10) == reply
            # a packet from an address the peer may not use is dropped by the receiver
            app[1].send(ipv4_packet("10.99.0.77", addresses[0], b"spoofed"))
            app[1].send(ipv4_packet(addresses[1], addresses[0], b"marker"))
            assert (await asyncio.wait_for(loop.sock_recv(app[0], 65535), 10)).endswith(b"marker")
            engine = pair.engines[0]
            shown = engine.show()
            (peer,) = shown["peers"]
            assert peer["latest_handshake"] and peer["rx_bytes"] > 0 and peer["tx_bytes"] > 0
            assert shown["listen_port"] == pair.ports[0] and shown["counters"]["handshakes_completed"] == 1
            assert shown["io"]["tun_offload"] is False  # no vnet header asked for
            totals = engine.totals()
            assert totals["connections"] == 1 and totals["bytes_up"] == peer["tx_bytes"]
            assert engine.stats["send_errors"] == 0 and engine.stats["tun_errors"] == 0
        finally:
            pair.close()

    asyncio.run(main())


def test_open_udp_socket_is_dual_stack_and_nonblocking():
    sock = open_udp_socket(None)
    try:
        assert not sock.getblocking()
        if sock.family == socket.AF_INET6:
            assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        assert os.get_inheritable(sock.fileno()) is False
    finally:
        sock.close()


class ClockDevice:
    """Just enough of a Device to watch the engine's timer: a deadline the test moves, and the
    ticks the engine makes."""

    def __init__(self) -> None:
        import time

        self.clock = time.monotonic
        self.deadline: float | None = None
        self.after_due: float | None = None  # the deadline once the current one has been ticked
        self.ticks: list[float] = []

    def now(self) -> float:
        return self.clock()

    def next_deadline(self) -> float | None:
        return self.deadline

    def tick(self, out):
        now = self.clock()
        self.ticks.append(now)
        if self.deadline is not None and self.deadline <= now:
            self.deadline = self.after_due
        return out


def test_the_timer_is_kept_when_deadlines_move_later_and_moved_when_they_come_sooner():
    async def main():
        device = ClockDevice()
        sock = open_udp_socket(None)
        tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        engine = WireGuardEngine(tun[0].fileno(), sock, device)
        try:
            engine.start()  # one tick at start, no deadline: no timer
            assert len(device.ticks) == 1 and engine._timer is None
            start = device.now()
            device.deadline = start + 0.3
            engine._arm()
            first = engine._timer
            device.deadline = start + 5.0  # later: the armed timer stays (it will fire early)
            engine._arm()
            assert engine._timer is first
            device.deadline = start + 0.05  # sooner: moved
            device.after_due = start + 5.0
            engine._arm()
            assert engine._timer is not first
            await asyncio.sleep(0.15)
            assert len(device.ticks) == 2 and device.ticks[1] - start >= 0.045  # fired at the sooner one
            # the device said 0.05 was due and now wants 5 s later; the early timer re-armed for it
            assert engine._timer is not None and engine._timer_deadline == start + 5.0
            device.deadline = None
        finally:
            engine.close()
            sock.close()
            for end in tun:
                end.close()
        assert engine._timer is None

    asyncio.run(main())


def test_one_wakeup_reads_at_most_its_byte_budget(monkeypatch):
    """A tun read can be a 64 KiB super packet: a wakeup stops after BYTES_PER_WAKEUP bytes (here
    3000) so the UDP socket and the timer get their turn; the rest waits for the next one."""
    monkeypatch.setattr(engine_module, "BYTES_PER_WAKEUP", 3000)

    async def main():
        pair = Pair(vnet_header=True)
        try:
            pair.start()
            await pair.packet(b"hello")  # the handshake
            sender = pair.engines[0]
            loop = asyncio.get_running_loop()
            loop.remove_reader(sender.tun)  # this test drives the reads itself
            for n in range(5):
                pair.app[0].send(bytes(10) + ipv4_packet(pair.addresses[0], pair.addresses[1], bytes(1000)))
            sent_before = sender.device.peers[0].tx_bytes
            sender._on_tun()
            per_packet = (sender.device.peers[0].tx_bytes - sent_before) // 3
            assert per_packet > 1000  # three packets of ~1 KB went out: 3 x 1038 bytes read > 3000
            sender._on_tun()
            assert sender.device.peers[0].tx_bytes - sent_before == 5 * per_packet
        finally:
            pair.close()

    asyncio.run(main())
