"""The I/O shell of the WireGuard engine: the sandbox's tun and a host UDP socket around ``Device``.

Theory of operation
-------------------
Everything WireGuard decides is in the sans-IO ``device.Device``; this shell only moves bytes.  The
tun (created in the sandbox, plain IP packets: no virtio header, no packet info) is read in bursts
of up to ``READS_PER_WAKEUP`` packets, each handed to ``Device.tun_packet``; the UDP socket (made in
the host netns before the sandbox existed, so the tunnel's own datagrams never enter the sandbox:
a kill switch by construction) likewise into ``Device.udp_datagram``.  What the device returns is
sent at once: datagrams to their endpoints, packets into the tun.  The device's timers run on one
loop timer, re-armed to ``Device.next_deadline()`` after every call.

The socket is IPv6 dual-stack: IPv4 endpoints travel as v4-mapped addresses on the wire of the
socket API and are unmapped before the device sees them, so the device only knows plain
addresses (roaming compares them).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

READS_PER_WAKEUP = 256
MAX_PACKET = 65535


def unmap(host: str) -> str:
    """``::ffff:192.0.2.1`` -> ``192.0.2.1``: what a dual-stack socket reports for an IPv4 peer.
    String work only: this runs for every datagram received, and parsing the address with
    ``ipaddress`` cost more than decrypting the packet (5 µs, measured by the benchmark)."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def mapped(sock: socket.socket, host: str) -> str:
    """The address to ``sendto`` on ``sock``: IPv4 is v4-mapped on an IPv6 socket."""
    if sock.family == socket.AF_INET6 and ":" not in host:
        return "::ffff:" + host
    return host


def open_udp_socket(listen_port: int | None) -> socket.socket:
    """The tunnel's UDP socket, in the caller's (host) netns: dual-stack where IPv6 exists."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", listen_port or 0))
    except OSError:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.bind(("0.0.0.0", listen_port or 0))
    sock.setblocking(False)
    return sock


class WireGuardEngine:
    name = "wireguard"

    def __init__(self, tun: int, sock: socket.socket, device: Any) -> None:
        self.tun = tun
        self.sock = sock
        self.device = device
        self.send_errors = 0
        self.tun_errors = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        os.set_blocking(self.tun, False)
        self._loop.add_reader(self.tun, self._on_tun)
        self._loop.add_reader(self.sock.fileno(), self._on_udp)
        self._emit(self.device.tick())

    async def drain(self, timeout: float = 0.0) -> None:
        """Nothing to relay once the sandbox is gone: its packets had nowhere else to go."""

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.tun)
            self._loop.remove_reader(self.sock.fileno())
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- observation (the control socket) ---------------------------------------------------------

    def show(self) -> dict:
        return self.device.show()

    def connections(self) -> list[dict]:
        return []

    def totals(self) -> dict[str, int]:
        peers = self.device.show().get("peers", [])
        return {"connections": sum(1 for p in peers if p.get("latest_handshake")), "denied": 0,
                "bytes_up": sum(p.get("tx_bytes", 0) for p in peers),
                "bytes_down": sum(p.get("rx_bytes", 0) for p in peers)}

    # -- I/O -------------------------------------------------------------------------------------

    def _on_tun(self) -> None:
        for _ in range(READS_PER_WAKEUP):
            try:
                packet = os.read(self.tun, MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.tun_errors += 1
                break
            self._emit(self.device.tun_packet(packet), arm=False)
        self._arm()  # once per burst, not per packet

    def _on_udp(self) -> None:
        for _ in range(READS_PER_WAKEUP):
            try:
                data, source = self.sock.recvfrom(MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # an ICMP error queued on the socket (port unreachable): nothing to read
            self._emit(self.device.udp_datagram(data, (unmap(source[0]), source[1])), arm=False)
        self._arm()

    def _emit(self, out: Any, arm: bool = True) -> None:
        for data, (host, port) in out.datagrams:
            try:
                self.sock.sendto(data, (mapped(self.sock, host), port))
            except OSError:
                self.send_errors += 1
        for packet in out.packets:
            try:
                os.write(self.tun, packet)
            except OSError:
                self.tun_errors += 1
        if arm:
            self._arm()

    def _arm(self) -> None:
        if self._loop is None:
            return
        deadline = self.device.next_deadline()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self._loop.call_later(max(0.0, deadline - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._emit(self.device.tick())
