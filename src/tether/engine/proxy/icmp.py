"""ICMP on the tun: echo relayed through the host's unprivileged ICMP sockets; the rest refused.

Theory of operation
-------------------
TCP and UDP never reach ``tun0`` (the ruleset captures them); what does is read here, one
packet per ``handle()`` call:

* **Echo requests** (ICMP type 8, ICMPv6 type 128) are decided like any destination (policy,
  names; ``proto`` ``icmp`` matches rules without protocol and port).  Allowed: sent from the
  host netns through an ICMP *datagram* socket (``socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)``,
  no privilege needed where ``net.ipv4.ping_group_range`` admits the user; the kernel rewrites
  the identifier to the socket's own, and matches replies to it).  One socket per (sandbox
  source, destination, identifier), closed after ``ECHO_IDLE`` seconds without requests.  The
  reply is rebuilt with the sandbox's identifier and sequence and written into the tun.  Denied:
  ICMP administratively prohibited plus a ``deny`` event.  If the host refuses ICMP sockets, that
  is said once on stderr and every echo is answered admin-prohibited.
* **Other IP protocols** (SCTP, GRE, raw IP...) get ICMP protocol unreachable (ICMPv6 parameter
  problem) and a ``deny`` event with rule ``protocol-not-relayed``.
* Router/neighbour solicitations, MLD reports and other ICMP the sandbox's own kernel emits are
  ignored silently.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import Callable

from tether.audit import Audit, format_endpoint
from tether.engine.proxy.decide import Decider
from tether.net import packet

ECHO_IDLE = 30.0
PROTOCOL_RULE = "protocol-not-relayed"
ICMP, ICMPV6 = 1, 58
ECHO_REQUEST = {4: 8, 6: 128}
ECHO_REPLY = {4: 0, 6: 129}


class IcmpResponder:
    def __init__(self, write_tun: Callable[[bytes], None], decider: Decider, audit: Audit,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.write_tun = write_tun
        self.decider = decider
        self.audit = audit
        self.clock = clock
        self.sockets: dict[tuple, tuple[socket.socket, packet.Packet, float]] = {}
        self.echo_unavailable: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    def close(self) -> None:
        for key in list(self.sockets):
            self._drop(key)

    def handle(self, raw: bytes) -> None:
        try:
            pkt = packet.parse(raw)
        except ValueError:
            return
        if pkt.proto in (ICMP, ICMPV6):
            if pkt.icmp is not None and pkt.icmp.type == ECHO_REQUEST[pkt.version] and not pkt.fragment:
                self._echo(pkt, raw)
            return
        if pkt.proto in (6, 17):
            if pkt.udp is not None or (pkt.proto == 6 and not pkt.later_fragment):
                self._stray(pkt, raw)
            return
        self._refuse(raw, "protocol", pkt.version)
        self.audit.emit("deny", proto=str(pkt.proto), src=_endpoint(pkt.src), dst=_endpoint(pkt.dst),
                        rule=PROTOCOL_RULE, verdict="deny")

    def _stray(self, pkt: packet.Packet, raw: bytes) -> None:
        """TCP/UDP that escaped capture (a link-local destination: its scoped route ignores the
        capture's policy route).  Refused like any destination: the policy's rule if it denies,
        else as not relayable — never a silent drop."""
        proto = "udp" if pkt.proto == 17 else "tcp"
        port = pkt.udp.dst_port if pkt.udp is not None else int.from_bytes(pkt.payload[2:4], "big")
        sport = pkt.udp.src_port if pkt.udp is not None else int.from_bytes(pkt.payload[0:2], "big")
        decision, _ = self.decider.decide(proto, pkt.dst, port)
        src, dst = _endpoint(pkt.src, sport), _endpoint(pkt.dst, port)
        if decision.verdict == "deny":
            self._refuse(raw, "port" if proto == "udp" else "admin", pkt.version, pkt.dst)
            self.audit.emit("deny", proto=proto, src=src, dst=dst, rule=decision.rule, verdict="deny")
        else:
            self._refuse(raw, "host", pkt.version, pkt.dst)
            self.audit.emit("error", proto=proto, src=src, dst=dst, rule=decision.rule, verdict="allow",
                            reason="not relayed: the destination's scoped route bypasses capture")

    def _refuse(self, raw: bytes, kind: str, version: int, source=None) -> None:
        """An ICMP error back to the sender, unless the RFCs forbid one for this packet."""
        try:
            self.write_tun(packet.build_unreachable(raw, kind, src=source or self._gateway(version)))
        except ValueError:
            pass

    def _gateway(self, version: int):
        net = self.decider.net
        return net.gateway if version == 4 else net.gateway6

    def _echo(self, pkt: packet.Packet, raw: bytes) -> None:
        decision, _target = self.decider.decide("icmp", pkt.dst, 0)
        proto = "icmp" if pkt.version == 4 else "icmpv6"
        if decision.verdict == "deny":
            self._refuse(raw, "admin", pkt.version)
            self.audit.emit("deny", proto=proto, src=_endpoint(pkt.src), dst=_endpoint(pkt.dst), rule=decision.rule,
                            verdict="deny", **_named(decision))
            return
        key = (pkt.src, pkt.dst, pkt.icmp.identifier)
        entry = self.sockets.get(key)
        if entry is None:
            sock = self._open(pkt)
            if sock is None:
                self._refuse(raw, "admin", pkt.version)
                return
            assert self._loop is not None
            self._loop.add_reader(sock.fileno(), self._on_reply, key)
            self.audit.emit("connect", proto=proto, src=_endpoint(pkt.src), dst=_endpoint(pkt.dst),
                            rule=decision.rule, verdict="allow", **_named(decision))
        else:
            sock = entry[0]
        self.sockets[key] = (sock, pkt, self.clock())
        # Echo header: type, code, checksum (kernel fills), identifier (kernel rewrites), sequence.
        header = bytes([ECHO_REQUEST[pkt.version], 0, 0, 0]) + pkt.icmp.identifier.to_bytes(2, "big") \
            + pkt.icmp.sequence.to_bytes(2, "big")
        try:
            sock.sendto(header + pkt.icmp.data, (str(pkt.dst), 0))
        except OSError:
            self._refuse(raw, "host", pkt.version)
        self._expire()

    def _open(self, pkt: packet.Packet) -> socket.socket | None:
        family, proto = (socket.AF_INET, socket.IPPROTO_ICMP) if pkt.version == 4 else \
            (socket.AF_INET6, socket.IPPROTO_ICMPV6)
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM, proto)
        except OSError as exc:
            if self.echo_unavailable is None:
                self.echo_unavailable = exc.strerror or str(exc)
                print(f"tether: ping cannot be relayed: the host refuses ICMP sockets ({self.echo_unavailable}); "
                      "allow them with: sysctl -w net.ipv4.ping_group_range='0 2147483647'", file=sys.stderr)
            return None
        sock.setblocking(False)
        return sock

    def _on_reply(self, key: tuple) -> None:
        entry = self.sockets.get(key)
        if entry is None:
            return
        sock, request, _ = entry
        while True:
            try:
                data = sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(data) < 8 or data[0] != ECHO_REPLY[request.version]:
                continue
            sequence = int.from_bytes(data[6:8], "big")
            try:
                self.write_tun(packet.build_echo_reply(request.with_sequence(sequence), data[8:]))
            except ValueError:
                continue

    def _expire(self) -> None:
        now = self.clock()
        for key, (_sock, _pkt, last) in list(self.sockets.items()):
            if now - last >= ECHO_IDLE:
                self._drop(key)

    def _drop(self, key: tuple) -> None:
        sock, _pkt, _last = self.sockets.pop(key)
        if self._loop is not None:
            self._loop.remove_reader(sock.fileno())
        sock.close()


def _endpoint(addr, port: int = 0) -> str:
    """Audit format ``addr:port`` (ICMP has no port: 0)."""
    return format_endpoint(str(addr), port)


def _named(decision) -> dict[str, str]:
    name = getattr(decision, "name", None)
    return {"name": name} if name else {}
