"""UDP relay: TPROXY-captured datagrams out through one host socket per flow, replies in via tun.

Theory of operation
-------------------
The sandbox's ruleset marks every UDP datagram it sends (except to its own addresses); a policy
route delivers marked datagrams locally, where an nft ``tproxy`` rule hands them to one of the
``udp_sockets`` (IP_TRANSPARENT, bound on the netns loopback, held here in the host netns).
``recvmsg`` returns the payload — reassembled by the sandbox's kernel, so datagrams up to 65507
bytes arrive whole — with the original destination in IP[V6]_ORIGDSTADDR.

A *flow* is (sandbox source addr:port, original destination addr:port).  Its first datagram is
decided (``Decider``: gateway mapping, policy, names served by the DNS stub); an allowed flow
gets a connected UDP socket in the host netns, a denied one an ICMP port unreachable back into
the sandbox (so a ``connect()``ed client sees ECONNREFUSED) and a ``deny`` event.  Replies from
the world are written into the tun as UDP packets from the original destination to the sandbox
source: the sandbox's kernel delivers them as if they came from the world (no per-destination
sockets inside the netns are needed).  ICMP errors the host socket reports (ECONNREFUSED) go
back the same way as port unreachable.

Flows expire after ``idle`` seconds without traffic (``dns_idle`` for port 53); at most
``max_flows`` live at once — beyond that new flows are refused (port unreachable) with one
``error`` event per refusal burst.  DNS to the stub (and, unless ``passthrough_dns``, to any
server on port 53) is handed to the DNS stub instead of being relayed.

Per-datagram Python work is the protocol's demand here (principle 1); it is kept to one
``recvmsg``, one dictionary lookup and one ``send`` per datagram, batched per wake-up.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from tether import _sys
from tether.audit import Audit, format_endpoint
from tether.engine.proxy.decide import Decider
from tether.net import packet

IDLE_TIMEOUT = 60.0
DNS_IDLE_TIMEOUT = 30.0
MAX_FLOWS = 4096
MAX_DATAGRAM = 65535
DATAGRAMS_PER_WAKEUP = 64
SWEEP_INTERVAL = 5.0

Endpoint = tuple[str, int]


@dataclass(eq=False)
class UdpFlow:
    src: Endpoint
    dst: Endpoint
    sock: socket.socket
    rule: str
    name: str | None
    idle: float
    started: float
    last: float
    bytes_up: int = 0
    bytes_down: int = 0


class UdpProxy:
    def __init__(self, sockets: list[socket.socket], write_tun: Callable[[bytes], None], decider: Decider,
                 audit: Audit, dns_handler: Callable[[bytes, Endpoint, Endpoint], None] | None = None,
                 passthrough_dns: bool = False, idle: float = IDLE_TIMEOUT, dns_idle: float = DNS_IDLE_TIMEOUT,
                 max_flows: int = MAX_FLOWS, clock: Callable[[], float] = time.monotonic) -> None:
        self.sockets = sockets
        self.write_tun = write_tun
        self.decider = decider
        self.audit = audit
        self.dns_handler = dns_handler
        self.passthrough_dns = passthrough_dns
        self.idle, self.dns_idle = idle, dns_idle
        self.max_flows = max_flows
        self.clock = clock
        self.flows: dict[tuple[Endpoint, Endpoint], UdpFlow] = {}
        self.refused_for_limit = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        net = decider.net
        self._stub_addresses = {str(net.dns), str(net.dns6)}

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for sock in self.sockets:
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._on_captured, sock)
        self._sweeper = self._loop.call_later(self._sweep_interval(), self._sweep)

    def _sweep_interval(self) -> float:
        return min(SWEEP_INTERVAL, self.idle / 4, self.dns_idle / 4)

    def close(self) -> None:
        if self._loop is not None:
            for sock in self.sockets:
                self._loop.remove_reader(sock.fileno())
        if self._sweeper is not None:
            self._sweeper.cancel()
        for flow in list(self.flows.values()):
            self._end(flow)

    # -- sandbox -> world -------------------------------------------------------------------

    def _on_captured(self, sock: socket.socket) -> None:
        for _ in range(DATAGRAMS_PER_WAKEUP):
            try:
                data, ancdata, _flags, src = sock.recvmsg(MAX_DATAGRAM, _sys.ORIGDST_CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            dst = _sys.original_destination_of_datagram(ancdata)
            if dst is None:
                continue
            source: Endpoint = (src[0], src[1])
            try:
                self._from_sandbox(source, dst, data)
            except Exception as exc:  # noqa: BLE001 - one flow's failure stays its own
                self.audit.emit("error", proto="udp", src=format_endpoint(*source), dst=format_endpoint(*dst),
                                rule="?", verdict="allow", reason=f"internal: {exc!r}")

    def is_dns(self, dst: Endpoint) -> bool:
        """For the stub: port 53 on its own addresses, and on any server unless passthrough."""
        return dst[1] == 53 and (dst[0] in self._stub_addresses or not self.passthrough_dns)

    def _from_sandbox(self, src: Endpoint, dst: Endpoint, data: bytes) -> None:
        if self.dns_handler is not None and self.is_dns(dst):
            self.dns_handler(data, src, dst)
            return
        flow = self.flows.get((src, dst))
        if flow is None:
            flow = self._open(src, dst, data)
            if flow is None:
                return
        try:
            flow.sock.send(data)
        except BlockingIOError:
            return  # host socket buffer full: UDP may drop
        except ConnectionRefusedError:  # an earlier datagram drew an ICMP port unreachable
            self._unreachable(src, dst, data, "port")
            return
        flow.bytes_up += len(data)
        flow.last = self.clock()

    def _open(self, src: Endpoint, dst: Endpoint, data: bytes) -> UdpFlow | None:
        decision, target = self.decider.decide("udp", dst[0], dst[1])
        name = getattr(decision, "name", None)
        if decision.verdict == "deny":
            self._unreachable(src, dst, data, "port")
            self.audit.emit("deny", proto="udp", src=format_endpoint(*src), dst=format_endpoint(*dst),
                            rule=decision.rule, verdict="deny", **({"name": name} if name else {}))
            return None
        if len(self.flows) >= self.max_flows:
            self._unreachable(src, dst, data, "port")
            self.refused_for_limit += 1
            if self.refused_for_limit == 1 or self.refused_for_limit % 1000 == 0:
                self.audit.emit("error", proto="udp", src=format_endpoint(*src), dst=format_endpoint(*dst),
                                rule=decision.rule, verdict="allow",
                                reason=f"flow limit {self.max_flows} reached ({self.refused_for_limit} refused)")
            return None
        family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(target)
        except OSError as exc:
            sock.close()
            self._unreachable(src, dst, data, "net" if exc.errno == errno.ENETUNREACH else "host")
            self.audit.emit("error", proto="udp", src=format_endpoint(*src), dst=format_endpoint(*dst),
                            rule=decision.rule, verdict="allow", reason=exc.strerror or str(exc))
            return None
        now = self.clock()
        idle = self.dns_idle if dst[1] == 53 else self.idle
        flow = UdpFlow(src, dst, sock, decision.rule, name, idle, now, now)
        self.flows[(src, dst)] = flow
        assert self._loop is not None
        self._loop.add_reader(sock.fileno(), self._on_reply, flow)
        self.audit.emit("connect", proto="udp", src=format_endpoint(*src), dst=format_endpoint(*dst),
                        rule=decision.rule, verdict="allow", **({"name": name} if name else {}))
        return flow

    # -- world -> sandbox -------------------------------------------------------------------

    def _on_reply(self, flow: UdpFlow) -> None:
        for _ in range(DATAGRAMS_PER_WAKEUP):
            try:
                data = flow.sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                self._unreachable(flow.src, flow.dst, b"", "port")
                continue
            except OSError:
                return
            self.reply(flow.dst, flow.src, data)
            flow.bytes_down += len(data)
            flow.last = self.clock()

    def reply(self, src: Endpoint, dst: Endpoint, data: bytes) -> None:
        """Deliver ``data`` to the sandbox's ``dst`` as a datagram from ``src`` (via the tun)."""
        self.write_tun(packet.build_udp(src[0], src[1], dst[0], dst[1], data, ipv4_checksum=False))

    def _unreachable(self, src: Endpoint, dst: Endpoint, data: bytes, kind: str) -> None:
        original = packet.build_udp(src[0], src[1], dst[0], dst[1], data[:64])
        try:
            self.write_tun(packet.build_unreachable(original, kind, src=ipaddress.ip_address(dst[0])))
        except ValueError:
            pass  # e.g. to a broadcast/multicast address: RFC 1122 forbids an ICMP error

    # -- expiry -----------------------------------------------------------------------------

    def _sweep(self) -> None:
        now = self.clock()
        for flow in [f for f in self.flows.values() if now - f.last >= f.idle]:
            self._end(flow)
        assert self._loop is not None
        self._sweeper = self._loop.call_later(self._sweep_interval(), self._sweep)

    def _end(self, flow: UdpFlow) -> None:
        if self.flows.pop((flow.src, flow.dst), None) is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(flow.sock.fileno())
        flow.sock.close()
        self.audit.emit("close", proto="udp", src=format_endpoint(*flow.src), dst=format_endpoint(*flow.dst),
                        rule=flow.rule, verdict="allow", bytes_up=flow.bytes_up, bytes_down=flow.bytes_down,
                        duration_ms=(self.clock() - flow.started) * 1000,
                        **({"name": flow.name} if flow.name else {}))
