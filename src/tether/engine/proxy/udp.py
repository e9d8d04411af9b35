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

Cost per datagram
-----------------
Per-datagram Python work is the protocol's demand here (principle 1), so the path is short and
batched:

* A wake-up reads one datagram when traffic is sparse (a request/response: no wasted EAGAIN
  ``recv`` after it), and drains up to ``DATAGRAMS_PER_WAKEUP`` when wake-ups come within
  ``BURST_GAP_NS`` of each other (a stream).
* A drained batch leaves per flow through ``tether.net.gso``: each run of equal datagrams is one
  ``sendmsg`` with ``UDP_SEGMENT``, one pass through the host's stack for up to 64 datagrams.  A
  path that refuses a size (EMSGSIZE: segments beyond its MTU; EIO: no checksum offload) lowers
  the flow's ``gso_max`` and the run goes out datagram by datagram (fragmented, if it must be).
* Replies go into the tun as frames built by the flow's ``UdpFramer``: headers precomputed, the
  UDP checksum left to the kernel, and a run of replies as one GSO frame (one ``writev``).
* Host sockets get ``FLOW_RECEIVE_BUFFER`` (4 MiB; rootless, net.core.rmem_max caps it), room for
  a burst from the world while the engine is busy elsewhere.

At 1 Gbit/s of 1400-byte datagrams (~89,000/s) this loses nothing in either direction on the
benchmark VM (``docs/benchmarks.md``); before batching, 2-4 % were lost.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tether import _sys
from tether.audit import Audit, format_endpoint
from tether.engine.proxy.decide import Decider
from tether.net import gso, packet

IDLE_TIMEOUT = 60.0
DNS_IDLE_TIMEOUT = 30.0
MAX_FLOWS = 4096
MAX_DATAGRAM = 65535
DATAGRAMS_PER_WAKEUP = 64
BURST_GAP_NS = 30_000  # wake-ups closer than this are one burst: drain up to DATAGRAMS_PER_WAKEUP
DESTINATION_MEMO = 4096
DRAIN_BATCHES = 1024  # at exit: up to 64 Ki datagrams left in a capture socket (4 MiB holds fewer)
FLOW_RECEIVE_BUFFER = 4 << 20  # a burst of replies while the engine is busy (capped by rmem_max rootless)
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
    framer: packet.UdpFramer  # headers of replies into the sandbox, dst -> src
    bytes_up: int = 0
    bytes_down: int = 0
    woke: int = 0  # monotonic ns of the last reply wake-up (see BURST_GAP_NS)
    gso_max: int = gso.MAX_BYTES  # largest datagram this flow's path segments (lowered on EINVAL)


class UdpProxy:
    def __init__(self, sockets: list[socket.socket], write_tun: Callable[[bytes], None],
                 write_frame: Callable[[Sequence[bytes]], None], decider: Decider,
                 audit: Audit, dns_handler: Callable[[bytes, Endpoint, Endpoint], None] | None = None,
                 passthrough_dns: bool = False, idle: float = IDLE_TIMEOUT, dns_idle: float = DNS_IDLE_TIMEOUT,
                 max_flows: int = MAX_FLOWS, clock: Callable[[], float] = time.monotonic) -> None:
        self.sockets = sockets
        self.write_tun = write_tun
        self.write_frame = write_frame
        self.decider = decider
        self.audit = audit
        self.dns_handler = dns_handler
        self.passthrough_dns = passthrough_dns
        self.idle, self.dns_idle = idle, dns_idle
        self.max_flows = max_flows
        self.clock = clock
        self.flows: dict[tuple[Endpoint, Endpoint], UdpFlow] = {}
        self.refused_for_limit = 0
        self._captured_at = [0] * len(sockets)  # monotonic ns of each capture socket's last wake-up
        self._destinations: dict[bytes, Endpoint] = {}
        self.ended_bytes_up = self.ended_bytes_down = 0
        self.dropped = 0  # datagrams a host socket refused (e.g. EMSGSIZE): UDP may drop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        net = decider.net
        self._stub_addresses = {str(net.dns), str(net.dns6)}

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for index, sock in enumerate(self.sockets):
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._on_captured, sock, index)
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

    def drain(self) -> None:
        """The sandbox has ended: relay what it sent just before (still queued on the capture
        sockets), as a host's kernel sends what a process queued before it exited."""
        for sock in self.sockets:
            for _ in range(DRAIN_BATCHES):
                if self._relay_captured(sock, DATAGRAMS_PER_WAKEUP) < DATAGRAMS_PER_WAKEUP:
                    break

    def _on_captured(self, sock: socket.socket, index: int) -> None:
        now = time.monotonic_ns()
        self._relay_captured(sock, DATAGRAMS_PER_WAKEUP if now - self._captured_at[index] < BURST_GAP_NS else 1)
        self._captured_at[index] = time.monotonic_ns()

    def _relay_captured(self, sock: socket.socket, limit: int) -> int:
        """Read up to ``limit`` datagrams from a capture socket and relay them; how many were read
        (fewer than ``limit``: the socket is empty)."""
        batches: dict[UdpFlow, list[bytes]] = {}
        read = 0
        for _ in range(limit):
            try:
                data, ancdata, _flags, src = sock.recvmsg(MAX_DATAGRAM, _sys.ORIGDST_CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            read += 1
            dst = self._destination_of(ancdata)
            if dst is None:
                continue
            source: Endpoint = src if len(src) == 2 else src[:2]
            flow = self.flows.get((source, dst))
            if flow is None:
                try:
                    flow = self._first_of_flow(source, dst, data)
                except Exception as exc:  # noqa: BLE001 - one flow's failure stays its own
                    self.audit.emit("error", proto="udp", src=format_endpoint(*source), dst=format_endpoint(*dst),
                                    rule="?", verdict="allow", reason=f"internal: {exc!r}")
                    continue
                if flow is None:
                    continue
            batch = batches.get(flow)
            if batch is None:
                batches[flow] = [data]
            else:
                batch.append(data)
        for flow, datagrams in batches.items():
            self._send_up(flow, datagrams)
        return read

    def _destination_of(self, ancdata: list[tuple[int, int, bytes]]) -> Endpoint | None:
        """The original destination in ``ancdata``, memoised by its raw bytes: a few
        destinations carry most datagrams, and parsing one costs more than the lookup."""
        if len(ancdata) != 1:
            return _sys.original_destination_of_datagram(ancdata)
        raw = ancdata[0][2]
        dst = self._destinations.get(raw)
        if dst is None:
            dst = _sys.original_destination_of_datagram(ancdata)
            if dst is not None:
                if len(self._destinations) >= DESTINATION_MEMO:
                    self._destinations.clear()
                self._destinations[raw] = dst
        return dst

    def is_dns(self, dst: Endpoint) -> bool:
        """For the stub: port 53 on its own addresses, and on any server unless passthrough."""
        return dst[1] == 53 and (dst[0] in self._stub_addresses or not self.passthrough_dns)

    def _first_of_flow(self, src: Endpoint, dst: Endpoint, data: bytes) -> UdpFlow | None:
        """A datagram with no flow yet: the DNS stub's, or the start of a new flow (decided)."""
        if self.dns_handler is not None and self.is_dns(dst):
            self.dns_handler(data, src, dst)
            return None
        return self._open(src, dst, data)

    def _send_up(self, flow: UdpFlow, datagrams: list[bytes]) -> None:
        """Send one wake-up's datagrams of ``flow`` to the world, segmented by the kernel (GSO)
        where they allow it; a path that cannot segment a size lowers the flow's limit."""
        for run in [datagrams] if len(datagrams) == 1 else gso.runs(datagrams, flow.gso_max):
            try:
                _sys.send_segmented(flow.sock, run)
            except BlockingIOError:
                return  # host socket buffer full: UDP may drop
            except ConnectionRefusedError:  # an earlier datagram drew an ICMP port unreachable
                self._unreachable(flow.src, flow.dst, run[0], "port")
                continue
            except OSError as exc:
                if len(run) > 1 and exc.errno in (errno.EMSGSIZE, errno.EINVAL, errno.EIO):
                    flow.gso_max = 0 if exc.errno == errno.EIO else len(run[0]) - 1
                    self._send_up(flow, run)
                else:
                    self.dropped += len(run)
                continue
            flow.bytes_up += sum(map(len, run))
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
            _sys.set_receive_buffer(sock, FLOW_RECEIVE_BUFFER)
            sock.connect(target)
        except OSError as exc:
            sock.close()
            self._unreachable(src, dst, data, "net" if exc.errno == errno.ENETUNREACH else "host")
            self.audit.emit("error", proto="udp", src=format_endpoint(*src), dst=format_endpoint(*dst),
                            rule=decision.rule, verdict="allow", reason=exc.strerror or str(exc))
            return None
        now = self.clock()
        idle = self.dns_idle if dst[1] == 53 else self.idle
        flow = UdpFlow(src, dst, sock, decision.rule, name, idle, now, now,
                       framer=packet.UdpFramer(dst[0], dst[1], src[0], src[1]))
        self.flows[(src, dst)] = flow
        assert self._loop is not None
        self._loop.add_reader(sock.fileno(), self._on_reply, flow)
        self.audit.emit("connect", proto="udp", src=format_endpoint(*src), dst=format_endpoint(*dst),
                        rule=decision.rule, verdict="allow", **({"name": name} if name else {}))
        return flow

    # -- world -> sandbox -------------------------------------------------------------------

    def _on_reply(self, flow: UdpFlow) -> None:
        now = time.monotonic_ns()
        limit = DATAGRAMS_PER_WAKEUP if now - flow.woke < BURST_GAP_NS else 1
        datagrams: list[bytes] = []
        for _ in range(limit):
            try:
                datagrams.append(flow.sock.recv(MAX_DATAGRAM))
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                self._unreachable(flow.src, flow.dst, b"", "port")
            except OSError:
                break
        if datagrams:
            self._deliver(flow.framer, datagrams)
            flow.bytes_down += sum(map(len, datagrams))
            flow.last = self.clock()
        flow.woke = time.monotonic_ns()

    def _deliver(self, framer: packet.UdpFramer, datagrams: list[bytes]) -> None:
        """Write ``datagrams`` into the sandbox: each GSO run as one tun frame (the tun
        segments any size, so only a run's own rules split it)."""
        if len(datagrams) == 1:
            self.write_frame((framer.headers(datagrams), datagrams[0]))
            return
        for run in gso.runs(datagrams, gso.MAX_BYTES):
            self.write_frame((framer.headers(run), *run))

    def reply(self, src: Endpoint, dst: Endpoint, data: bytes) -> None:
        """Deliver ``data`` to the sandbox's ``dst`` as a datagram from ``src`` (via the tun)."""
        self._deliver(packet.UdpFramer(src[0], src[1], dst[0], dst[1]), [data])

    def _unreachable(self, src: Endpoint, dst: Endpoint, data: bytes, kind: str) -> None:
        original = packet.build_udp(src[0], src[1], dst[0], dst[1], data[:64])
        try:
            self.write_tun(packet.build_unreachable(original, kind, src=ipaddress.ip_address(dst[0])))
        except ValueError:
            pass  # e.g. to a broadcast/multicast address: RFC 1122 forbids an ICMP error

    # -- observation ------------------------------------------------------------------------

    def connections(self, now: float) -> list[dict]:
        """Live flows, for ``tether ctl NAME connections`` (``now`` on this proxy's clock)."""
        return [{"proto": "udp", "src": format_endpoint(*f.src), "dst": format_endpoint(*f.dst), "rule": f.rule,
                 "state": "open", "age_s": round(now - f.started, 3), "idle_s": round(now - f.last, 3),
                 "bytes_up": f.bytes_up, "bytes_down": f.bytes_down, **({"name": f.name} if f.name else {})}
                for f in self.flows.values()]

    def totals(self) -> tuple[int, int]:
        """Bytes up and down so far: ended flows plus live ones."""
        return (self.ended_bytes_up + sum(f.bytes_up for f in self.flows.values()),
                self.ended_bytes_down + sum(f.bytes_down for f in self.flows.values()))

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
        self.ended_bytes_up += flow.bytes_up
        self.ended_bytes_down += flow.bytes_down
        self.audit.emit("close", proto="udp", src=format_endpoint(*flow.src), dst=format_endpoint(*flow.dst),
                        rule=flow.rule, verdict="allow", bytes_up=flow.bytes_up, bytes_down=flow.bytes_down,
                        duration_ms=(self.clock() - flow.started) * 1000,
                        **({"name": flow.name} if flow.name else {}))
