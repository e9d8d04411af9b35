"""The I/O shell of the WireGuard engine: the sandbox's tun and a host UDP socket around ``Device``.

Theory of operation
-------------------
Everything WireGuard decides is in the sans-IO ``device.Device``; this shell only moves bytes, and
moves them in batches, because at 1 Gbit/s a Python engine is paying for system calls and for
trips through the kernel's stack, not for the cipher (one ChaCha20-Poly1305 seal of 1420 bytes
costs ~2 µs; a ``sendto`` through a veth, 5-10 µs):

* **Sandbox to peer.**  The tun is opened with a virtio-net header (``IFF_VNET_HDR``) and told,
  with ``TUNSETOFFLOAD``, that we do TCP segmentation and checksums ourselves: the sandbox's TCP
  hands over up to 64 KiB per read (one "super packet") and ``tether.net.tcpoffload.split_frame``
  cuts it into MTU-sized segments with their checksums.  Their datagrams are sent with UDP GSO:
  one ``sendmsg`` with ``UDP_SEGMENT`` for up to 64 datagrams to one endpoint
  (``tether.net.gso.runs``), one pass through the host's routing and netfilter for all of them.
* **Peer to sandbox.**  Datagrams are read until the socket is empty (or ``FLUSH_EVERY``), the
  decrypted packets of one TCP flow that directly follow each other are merged back into one super
  packet (``tcpoffload.coalesce``: software GRO), and each is written with one ``writev``: the
  sandbox's TCP takes one 64 KiB skb instead of 45 segments, and acknowledges it once.
* Everything else (handshakes, keepalives, ICMP, UDP inside the tunnel) takes the same path as a
  batch of one.  A kernel that refuses UDP GSO (``EIO``: no checksum offload on the route's
  device, ``EINVAL``/``EMSGSIZE``: a segment bigger than the route's MTU, perhaps for a while) turns
  GSO off for ``GSO_RETRY_AFTER`` seconds; the same datagrams are then sent one by one, so the
  peer sees no difference.
* ``TETHER_WG_OFFLOADS`` (tso, gso, gro, or none) turns each of the three off: for a kernel whose
  offloads misbehave, and for ``benchmarks/wireguard.py --ablation``, which measures each one.

The UDP socket was made in the host netns before the sandbox existed, so the tunnel's own datagrams
never enter the sandbox (a kill switch by construction).  The socket is IPv6 dual-stack: IPv4
endpoints travel as v4-mapped addresses on the socket API and are unmapped before the device sees
them, so the device only knows plain addresses (roaming compares them).

The device's timers run on one loop timer, re-armed to ``Device.next_deadline()`` after every
burst.  The device's clock may run faster than the wall's (``TIME_SCALE_ENV``, for tests only:
a rekey after 120 s can then be watched in two), so the timer converts its deadlines back.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from tether import _sys
from tether.engine.wireguard.device import Output
from tether.net.gso import MAX_BYTES, runs
from tether.net.packet import PLAIN_VNET_HEADER, VNET_HDR_LEN
from tether.net.tcpoffload import coalesce, split_frame

READS_PER_WAKEUP = 256  # reads per readiness callback: then other fds get their turn...
BYTES_PER_WAKEUP = 1 << 20  # ...or this much read (a tun read may be a 64 KiB super packet)
FLUSH_EVERY = 64  # datagrams or packets collected before they are sent or written
MAX_PACKET = 65535
MAX_FRAME = VNET_HDR_LEN + MAX_PACKET
MAX_ENDPOINTS = 256  # sendto addresses kept (a tunnel has one per peer, more only when peers roam)
SOCKET_BUFFER = 4 << 20  # room for bursts while the engine is busy decrypting
TUN_OFFLOADS = _sys.TUN_F_CSUM | _sys.TUN_F_TSO4 | _sys.TUN_F_TSO6 | _sys.TUN_F_TSO_ECN
GSO_REFUSED = frozenset({errno.EIO, errno.EINVAL, errno.EMSGSIZE, errno.ENOPROTOOPT, errno.EOPNOTSUPP})
GSO_RETRY_AFTER = 10.0  # seconds without GSO after a refusal (a path MTU may have dropped for a while)

OFFLOADS_ENV = "TETHER_WG_OFFLOADS"  # which batching offloads to use (troubleshooting, benchmarks)
ALL_OFFLOADS: frozenset[str] = frozenset({"tso", "gso", "gro"})

TIME_SCALE_ENV = "TETHER_WG_TEST_TIME_SCALE"  # tests only: the protocol's clock runs this much faster
MAX_TIME_SCALE = 250.0  # beyond it, retried initiations come <20 ms apart: wireguard-go drops those as a flood


def time_scale_from_environment(environ: dict[str, str] | None = None) -> float:
    """``TETHER_WG_TEST_TIME_SCALE`` (1 when unset): how much faster the protocol's timers run.
    For tests that must see a rekey (120 s) or a session's end without waiting for it."""
    text = (os.environ if environ is None else environ).get(TIME_SCALE_ENV, "").strip()
    if not text:
        return 1.0
    try:
        scale = float(text)
    except ValueError:
        raise ValueError(f"{TIME_SCALE_ENV}={text!r} is not a number") from None
    if not 1.0 <= scale <= MAX_TIME_SCALE:
        raise ValueError(f"{TIME_SCALE_ENV}={text!r} must be between 1 and {MAX_TIME_SCALE:g}")
    return scale


def offloads_from_environment(environ: dict[str, str] | None = None) -> frozenset[str]:
    """``TETHER_WG_OFFLOADS``: a comma-separated subset of tso, gso, gro, or ``none`` (all three when
    unset).  For a kernel whose offloads misbehave, and for measuring what each one is worth."""
    text = (os.environ if environ is None else environ).get(OFFLOADS_ENV)
    if text is None or not text.strip():
        return ALL_OFFLOADS
    names = {name.strip().lower() for name in text.split(",") if name.strip()}
    if names == {"none"}:
        return frozenset()
    unknown = names - ALL_OFFLOADS
    if unknown:
        raise ValueError(f"{OFFLOADS_ENV}={text!r}: unknown offload {', '.join(sorted(unknown))} "
                         "(use tso, gso, gro, or none)")
    return frozenset(names)


def protocol_clock(scale: float) -> Callable[[], float]:
    """The device's monotonic clock: ``time.monotonic`` itself, or one ``scale`` times faster."""
    if scale == 1.0:
        return time.monotonic
    origin = time.monotonic()
    return lambda: origin + (time.monotonic() - origin) * scale


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
    _sys.set_receive_buffer(sock, SOCKET_BUFFER)
    return sock


class WireGuardEngine:
    """Moves the bytes between ``tun`` (a vnet-header tun when ``vnet_header``), ``sock`` and
    ``device`` on the running loop.  Owns none of them: the caller closes them after ``close()``.
    ``time_scale`` is the device clock's speed (see ``protocol_clock``)."""

    name = "wireguard"

    def __init__(self, tun: int, sock: socket.socket, device: Any, *, vnet_header: bool = False,
                 time_scale: float = 1.0, offloads: frozenset[str] = ALL_OFFLOADS) -> None:
        self.tun = tun
        self.sock = sock
        self.device = device
        self.vnet_header = vnet_header
        self.time_scale = time_scale
        self.offloads = offloads
        self.tso = False  # the kernel hands us TCP super packets (TUNSETOFFLOAD accepted)
        self.gso = "gso" in offloads  # until the kernel refuses UDP_SEGMENT once
        self.gro = vnet_header and "gro" in offloads  # decrypted TCP coalesced into super packets
        self.stats = {"send_errors": 0, "tun_errors": 0, "tun_malformed": 0, "gso_sends": 0, "gso_refusals": 0,
                      "gro_writes": 0}
        self._gso_retry_at = float("inf")  # when GSO, refused once, is tried again
        self._out = Output()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline = 0.0  # the device-clock deadline _timer was set for
        self._addresses: dict[tuple[str, int], tuple[str, int]] = {}  # endpoint -> sendto address

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        os.set_blocking(self.tun, False)
        if self.vnet_header and "tso" in self.offloads:
            try:
                _sys.set_tun_offload(self.tun, TUN_OFFLOADS)
                self.tso = True
            except OSError:
                self.tso = False  # an old kernel: plain segments, still with a vnet header
        self._loop.add_reader(self.tun, self._on_tun)
        self._loop.add_reader(self.sock.fileno(), self._on_udp)
        self.device.tick(self._out)
        self._flush()
        self._arm()

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
        """The device's ``wg show`` data, the listening port and how this shell moves bytes."""
        show = self.device.show()
        show["listen_port"] = self.sock.getsockname()[1]
        show["io"] = {"tun_offload": self.tso, "udp_gso": self.gso, "tun_gro": self.gro, **self.stats}
        return show

    def connections(self) -> list[dict]:
        return []

    def totals(self) -> dict[str, int]:
        peers = self.device.show().get("peers", [])
        return {"connections": sum(1 for p in peers if p.get("latest_handshake")), "denied": 0,
                "bytes_up": sum(p.get("tx_bytes", 0) for p in peers),
                "bytes_down": sum(p.get("rx_bytes", 0) for p in peers)}

    # -- I/O -------------------------------------------------------------------------------------

    def _on_tun(self) -> None:
        out, device, tun, read = self._out, self.device, self.tun, os.read
        budget = BYTES_PER_WAKEUP
        for _ in range(READS_PER_WAKEUP):
            try:
                frame = read(tun, MAX_FRAME)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.stats["tun_errors"] += 1
                break
            budget -= len(frame)
            if self.vnet_header:
                try:
                    packets = split_frame(frame)
                except ValueError:  # a virtio-net header or super packet we cannot cut: dropped
                    self.stats["tun_malformed"] += 1
                    continue
                device.tun_packets(packets, out)
            else:
                device.tun_packet(frame, out)
            if len(out.datagrams) >= FLUSH_EVERY:
                self._flush()
            if budget <= 0:
                break
        self._flush()
        self._arm()  # once per burst, not per packet

    def _on_udp(self) -> None:
        out, device, receive = self._out, self.device, self.sock.recvfrom
        batch: list[tuple[bytes, tuple[str, int]]] = []
        budget = BYTES_PER_WAKEUP
        for _ in range(READS_PER_WAKEUP):
            try:
                data, source = receive(MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # an ICMP error queued on the socket (port unreachable): nothing to read
            batch.append((data, (unmap(source[0]), source[1])))
            budget -= len(data)
            if len(batch) >= FLUSH_EVERY:
                device.udp_datagrams(batch, out)
                batch.clear()
                self._flush()
            if budget <= 0:
                break
        if batch:
            device.udp_datagrams(batch, out)
        self._flush()
        self._arm()

    def _flush(self) -> None:
        """Send and write what the device produced since the last flush."""
        out = self._out
        if out.datagrams:
            self._send(out.datagrams)
        if out.packets:
            self._write(out.packets)
        out.clear()

    def _send(self, datagrams: list[tuple[bytes, tuple[str, int]]]) -> None:
        """Each stretch of datagrams to one endpoint as GSO runs (or one by one)."""
        count, first = len(datagrams), 0
        if count == 1:  # a handshake, a keepalive, an echo: no grouping
            data, endpoint = datagrams[0]
            self._send_one(data, self._socket_address(endpoint))
            return
        while first < count:
            endpoint = datagrams[first][1]
            end = first + 1
            while end < count and datagrams[end][1] == endpoint:
                end += 1
            address = self._socket_address(endpoint)
            payloads = [data for data, _ in datagrams[first:end]]
            if not self.gso and time.monotonic() >= self._gso_retry_at:
                self.gso, self._gso_retry_at = True, float("inf")
            if self.gso and len(payloads) > 1:
                for run in runs(payloads, MAX_BYTES):
                    self._send_run(run, address)
            else:
                for data in payloads:
                    self._send_one(data, address)
            first = end

    def _socket_address(self, endpoint: tuple[str, int]) -> tuple[str, int]:
        """The ``sendto`` address of a device endpoint (v4-mapped on a dual-stack socket), kept
        for the few endpoints a tunnel has (emptied if roaming ever makes it many)."""
        address = self._addresses.get(endpoint)
        if address is None:
            if len(self._addresses) >= MAX_ENDPOINTS:
                self._addresses.clear()
            address = self._addresses[endpoint] = (mapped(self.sock, endpoint[0]), endpoint[1])
        return address

    def _send_run(self, run: list[bytes], address: tuple[str, int]) -> None:
        if len(run) == 1 or not self.gso:
            for data in run:
                self._send_one(data, address)
            return
        try:
            _sys.send_segmented(self.sock, run, address)
            self.stats["gso_sends"] += 1
        except OSError as exc:
            if exc.errno not in GSO_REFUSED:
                self.stats["send_errors"] += 1  # ENOBUFS, EAGAIN, no route: lost like any datagram
                return
            self.gso = False  # this path cannot segment now: the same datagrams, one by one
            self.stats["gso_refusals"] += 1
            self._gso_retry_at = time.monotonic() + GSO_RETRY_AFTER
            for data in run:
                self._send_one(data, address)

    def _send_one(self, data: bytes, address: tuple[str, int]) -> None:
        try:
            self.sock.sendto(data, address)
        except OSError:
            self.stats["send_errors"] += 1

    def _write(self, packets: list[bytes]) -> None:
        tun, stats = self.tun, self.stats
        if self.vnet_header:
            writev = os.writev
            for frame in coalesce(packets) if self.gro else [[PLAIN_VNET_HEADER, packet] for packet in packets]:
                if frame[0][1]:  # the vnet header's gso_type: several packets in one
                    stats["gro_writes"] += 1
                try:
                    writev(tun, frame)
                except OSError:
                    stats["tun_errors"] += 1
        else:
            write = os.write
            for packet in packets:
                try:
                    write(tun, packet)
                except OSError:
                    stats["tun_errors"] += 1

    def _arm(self) -> None:
        """Have ``_on_timer`` run by the device's next deadline.  A timer already due no later is
        kept: most bursts push deadlines back (a keepalive, a rekey check), and a timer that
        fires early only finds nothing due and re-arms - cheaper than re-arming after every burst."""
        if self._loop is None:
            return
        deadline = self.device.next_deadline()
        if deadline is None:
            return  # a pending timer fires, finds nothing due, and is not re-armed
        if self._timer is not None:
            if self._timer_deadline <= deadline:
                return
            self._timer.cancel()
        delay = max(0.0, (deadline - self.device.now()) / self.time_scale)
        self._timer_deadline = deadline
        self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.device.tick(self._out)
        self._flush()
        self._arm()

