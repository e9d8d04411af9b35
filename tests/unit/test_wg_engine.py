"""The WireGuard engine's I/O shell: two real Devices, each behind a ``WireGuardEngine`` with a
real UDP socket on loopback and a SOCK_DGRAM socketpair standing in for its tun (one packet per
read and write, as a tun).  What goes into one "tun" comes out of the other, encrypted on the way."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct

from tether.engine.wireguard.device import Device, PeerSpec
from tether.engine.wireguard.engine import WireGuardEngine, mapped, open_udp_socket, unmap
from tether.engine.wireguard.keys import generate_private_key, public_key


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


def test_two_engines_carry_packets_both_ways_over_loopback():
    async def main():
        keys = [generate_private_key() for _ in range(2)]
        socks = [open_udp_socket(None) for _ in range(2)]
        ports = [s.getsockname()[1] for s in socks]
        tuns = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(2)]  # (engine end, app end)
        addresses = ["10.99.0.1", "10.99.0.2"]
        engines = []
        for me, other in ((0, 1), (1, 0)):
            device = Device(keys[me], [PeerSpec(public_key(keys[other]), endpoint=("127.0.0.1", ports[other]),
                                                allowed_ips=(ipaddress.ip_network(f"{addresses[other]}/32"),))])
            engines.append(WireGuardEngine(tuns[me][0].fileno(), socks[me], device))
        loop = asyncio.get_running_loop()
        try:
            for engine in engines:
                engine.start()
            app = [pair[1] for pair in tuns]
            for side in app:
                side.setblocking(False)
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
            shown = engines[0].show()["peers"][0]
            assert shown["latest_handshake"] and shown["rx_bytes"] > 0 and shown["tx_bytes"] > 0
            totals = engines[0].totals()
            assert totals["connections"] == 1 and totals["bytes_up"] == shown["tx_bytes"]
            assert engines[0].send_errors == 0 and engines[0].tun_errors == 0
        finally:
            for engine in engines:
                engine.close()
            for sock in socks:
                sock.close()
            for pair in tuns:
                for end in pair:
                    end.close()

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
