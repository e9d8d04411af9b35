"""The proxy engine of one sandbox: owns its capture fds and the handlers that serve them.

Fds owned (received from the spawner, closed by the Sandbox that owns them): the TCP capture
listeners and TPROXY UDP sockets (one per family), the NFLOG socket (the kernel's refusals,
turned into ``deny`` events) and the tun device.  Handlers owned (started by ``start()``, stopped
by ``close()``): ``TcpProxy``, ``UdpProxy``, the DNS stub's server, ``IcmpResponder`` (whatever
reaches ``tun0``), and the NFLOG reader.  All of them decide through one ``Decider`` whose
``NameMap`` the DNS stub fills, so domain rules apply to TCP, UDP and ICMP alike.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tether.audit import Audit, format_endpoint
from tether.engine.proxy.decide import Decider
from tether.engine.proxy.icmp import IcmpResponder
from tether.engine.proxy.inbound import InboundProxy
from tether.engine.proxy.tcp import CONNECT_TIMEOUT, TcpProxy
from tether.engine.proxy.udp import DNS_IDLE_TIMEOUT, IDLE_TIMEOUT, UdpProxy
from tether.names import NameMap
from tether.net import nflog, packet
from tether.net.nft import Ruleset, SandboxNet
from tether.ns.link import HolderLink
from tether.policy import Policy

TUN_READS_PER_WAKEUP = 256
MAX_DNS_TCP = 256  # concurrent DNS-over-TCP connections from one sandbox


@dataclass
class DnsSettings:
    upstreams: list[tuple[str, int]] = field(default_factory=list)
    deny_rcode: str = "REFUSED"
    passthrough: bool = False


class ProxyEngine:
    def __init__(self, *, tcp_listeners: list[socket.socket], udp_sockets: list[socket.socket],
                 nflog_sock: socket.socket, tun: int, policy: Policy, ruleset: Ruleset, audit: Audit,
                 allow_host_ports: frozenset[int], net: SandboxNet, dns: DnsSettings, link: HolderLink,
                 families: tuple[int, ...] = (4, 6), connect_timeout: float = CONNECT_TIMEOUT,
                 udp_timeout: float = IDLE_TIMEOUT) -> None:
        self.audit = audit
        self.ruleset = ruleset
        self.nflog = nflog_sock
        self.tun = tun
        self.names = NameMap()
        self.decider = Decider(policy, net, allow_host_ports, self.names)
        self.policy = policy
        self.dns_settings = dns
        self._dns_server = None  # built on first use: dnspython costs ~25 ms of start-up
        self.udp = UdpProxy(udp_sockets, self.write_tun, self.write_tun_frame, self.decider, audit, self._on_dns_datagram,
                            passthrough_dns=dns.passthrough, idle=udp_timeout,
                            dns_idle=min(DNS_IDLE_TIMEOUT, udp_timeout))
        self.tcp = TcpProxy(tcp_listeners, self.decider, audit, connect_timeout,
                            dns_handler=self._on_dns_connection, is_dns=self.udp.is_dns)
        self.icmp = IcmpResponder(self.write_tun, self.decider, audit)
        addresses = {4: str(net.address.ip), 6: str(net.address6.ip)}
        self.inbound = InboundProxy(link, audit, self.tcp.pool, {f: addresses[f] for f in families},
                                    idle=udp_timeout)
        self.dropped_packets = 0
        self.malformed_log_messages = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dns_tasks: set[asyncio.Task] = set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.tcp.start()
        self.udp.start()
        self.icmp.start()
        self.inbound.start()
        self.nflog.setblocking(False)
        self._loop.add_reader(self.nflog.fileno(), self._on_nflog)
        os.set_blocking(self.tun, False)
        self._loop.add_reader(self.tun, self._on_tun)

    async def drain(self, timeout: float = 1.0) -> None:
        """The sandbox has ended: relay what it sent just before (see the proxies' ``drain``)."""
        self.udp.drain()
        await self.tcp.drain(timeout)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.nflog.fileno())
            self._loop.remove_reader(self.tun)
        for task in list(self._dns_tasks):
            task.cancel()
        self.inbound.close()
        self.tcp.close()
        self.udp.close()
        self.icmp.close()
        if self._dns_server is not None:
            self._dns_server.close()

    def set_policy(self, policy: Policy, ruleset: Ruleset) -> None:
        """A reloaded policy (its ruleset already in the sandbox's kernel): every decision from
        now on - connections, flows, pings, DNS names - uses it; live connections stay."""
        self.policy = policy
        self.decider.policy = policy
        self.ruleset = ruleset

    # -- observation (the control socket) ---------------------------------------------------------

    def connections(self) -> list[dict]:
        """Every live TCP connection and UDP flow, oldest first."""
        now = time.monotonic()
        rows = (self.tcp.connections(now) + self.udp.connections(self.udp.clock())
                + self.inbound.connections(self.inbound.clock()))
        return sorted(rows, key=lambda row: -row["age_s"])

    def totals(self) -> dict[str, int]:
        """Counters for ``tether ps``: live connections, denials, bytes each way."""
        ups, downs = zip(self.tcp.totals(), self.udp.totals(), self.inbound.totals())
        return {"connections": self.tcp.live + len(self.udp.flows) + self.inbound.live,
                "denied": self.audit.denied, "bytes_up": sum(ups), "bytes_down": sum(downs)}

    def write_tun(self, pkt: bytes) -> None:
        """Inject one complete IP packet into the sandbox (as if received from the world)."""
        self.write_tun_frame((packet.PLAIN_VNET_HEADER, pkt))

    def write_tun_frame(self, parts: Sequence[bytes]) -> None:
        """Inject one tun frame - virtio-net header, then the packet - given in ``parts`` (one
        ``writev``: a GSO frame's datagrams are never copied into one buffer)."""
        try:
            os.writev(self.tun, parts)
        except OSError:
            self.dropped_packets += 1

    # -- DNS ----------------------------------------------------------------------------------

    @property
    def dns_server(self):
        """The DNS stub's server (``tether.engine.proxy.dns``), created at the first query."""
        if self._dns_server is None:
            from tether.engine.proxy.dns import DnsServer, DnsStub

            settings = self.dns_settings
            stub = DnsStub(upstreams=settings.upstreams, decide=lambda name: self.policy.evaluate_name(name),
                           on_answer=self._on_dns_answer, deny_rcode=settings.deny_rcode)
            self._dns_server = DnsServer(stub, self._loop, on_event=self._on_dns_event)
        return self._dns_server

    def _on_dns_answer(self, names: list[str], addresses: list, ttl: float) -> None:
        self.names.record_chain(names, addresses, ttl)

    def _on_dns_datagram(self, data: bytes, src: tuple[str, int], dst: tuple[str, int]) -> None:
        self.dns_server.serve_udp_datagram(data, lambda wire: self.udp.reply(dst, src, wire), peer=(src, dst, "udp"))

    def _on_dns_connection(self, conn: socket.socket, src: str, dst: tuple[str, int]) -> None:
        if len(self._dns_tasks) >= MAX_DNS_TCP:
            conn.close()
            self.audit.emit("error", proto="tcp", src=src, dst=format_endpoint(*dst), rule="dns", verdict="deny",
                            reason=f"more than {MAX_DNS_TCP} DNS-over-TCP connections")
            return
        task = asyncio.ensure_future(self._serve_dns_tcp(conn, (src, dst)))
        self._dns_tasks.add(task)
        task.add_done_callback(self._dns_tasks.discard)

    async def _serve_dns_tcp(self, conn: socket.socket, peer: tuple) -> None:
        reader, writer = await asyncio.open_connection(sock=conn)
        try:
            await self.dns_server.handle_tcp(reader, writer, peer=(peer[0], peer[1], "tcp"))
        finally:
            writer.close()

    def _on_dns_event(self, event, peer) -> None:
        """Refused names are audited with their rule; failures as errors; answers are not
        (the connections to the answered addresses are)."""
        if event.kind not in ("deny", "malformed", "servfail") or peer is None:
            return
        src, dst, transport = peer
        src_text = src if isinstance(src, str) else format_endpoint(*src)
        fields = {"name": event.name} if event.name else {}
        if event.kind == "deny":
            self.audit.emit("deny", proto="dns", src=src_text, dst=format_endpoint(*dst), rule=event.rule or "?",
                            verdict="deny", qtype=event.qtype, transport=transport, **fields)
        else:
            self.audit.emit("error", proto="dns", src=src_text, dst=format_endpoint(*dst), rule=event.rule or "dns",
                            verdict="allow", reason=f"{event.kind}: {event.detail}".rstrip(": "),
                            transport=transport, **fields)

    # -- kernel refusals and the tun ------------------------------------------------------------

    def _on_nflog(self) -> None:
        while True:
            try:
                datagram = self.nflog.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ENOBUFS: the kernel dropped log messages under a flood
                self.malformed_log_messages += 1
                return
            try:
                refusals = nflog.parse_refusals(datagram)
            except ValueError:
                self.malformed_log_messages += 1
                continue
            for refusal in refusals:
                rule = self.ruleset.label_of(refusal.prefix)
                if rule is None:
                    continue
                self.audit.emit("deny", proto=refusal.proto, src=format_endpoint(*refusal.src),
                                dst=format_endpoint(*refusal.dst), rule=rule, verdict="deny")

    def _on_tun(self) -> None:
        for _ in range(TUN_READS_PER_WAKEUP):
            try:
                raw = os.read(self.tun, packet.VNET_HDR_LEN + 65536)[packet.VNET_HDR_LEN:]
            except (BlockingIOError, InterruptedError):
                return
            try:
                self.icmp.handle(raw)
            except Exception:  # noqa: BLE001 - one bad packet never stops the engine
                self.dropped_packets += 1
