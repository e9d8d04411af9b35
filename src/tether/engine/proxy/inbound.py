"""Published ports (``-p``, ``tether ctl NAME ports``): the world's connections into the sandbox.

Theory of operation
-------------------
For a published TCP port the engine listens on the host (HOSTADDR:HOSTPORT, in the host netns).
An accepted client C:c is joined to a connection made *inside* the sandbox's netns to the
loopback's SANDBOXPORT, from a socket bound (IP_TRANSPARENT) to C:c itself, so the sandboxed
server's ``accept()`` returns the real client.  Such a socket must be *made* in the sandbox's
netns, which only the holder (pid 1) is in; but a socket keeps its netns wherever it is used, and
tether's user holds every capability over the sandbox's namespaces.  So the holder makes blank
sockets in batches (``POOL_BATCH``, refilled below ``POOL_LOW``, stocked as soon as a port is
published) and tether binds and connects them itself: a connection costs no round trip to pid 1.  A policy route in the sandbox
(``from 127.0.0.1`` / ``from ::1`` -> local delivery, see ``ns.spawn``) brings the server's
answers back to that socket instead of out of the tun.  Once connected the two sockets are
relayed with splice (``RelayPair``), like outgoing connections.  If C:c is taken inside (rare)
the socket is bound to another port of C: the server then sees C with a different port.

For a published UDP port the engine has one host socket; each client C:c is a flow with its own
inside socket (bound to C:c, connected to the loopback's SANDBOXPORT).  Datagrams go both ways;
a flow ends after ``idle`` seconds of silence.  Datagrams that arrive while a flow's inside
socket is being made wait (at most ``PENDING_DATAGRAMS``).

Limits keep a flood of clients from exhausting tether's fds: at most ``MAX_CONNECTING`` TCP
clients wait for their inside connection (more are reset at once) and ``MAX_FLOWS`` UDP clients
have flows (datagrams of further ones are dropped); each refusal counts, with an ``error`` event
for the first and every thousandth.

The sandboxed server must listen on the loopback (or on every address): that is where the
connections arrive.  A client whose family the sandbox lacks (``--ipv4-only``/``--ipv6-only``)
is refused; an IPv4 client of a dual-stack host socket (``[::]:PORT``) is unmapped first.

Events: ``connect``, ``close`` and ``error`` with ``direction: "in"``, ``src`` the client, ``dst``
``SANDBOX_ADDRESS:SANDBOXPORT`` and ``rule`` ``publish:KEY``.  Inbound traffic is the owner's
explicit choice (the ``-p`` itself); the policy governs what the sandbox reaches *out* to.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tether import _sys
from tether.audit import Audit, format_endpoint
from tether.engine.proxy.relay import PipePool, RelayPair
from tether.ns.link import HolderLink, close_fds
from tether.publish import Publish

ACCEPTS_PER_WAKEUP = 64
DATAGRAMS_PER_WAKEUP = 64
PENDING_DATAGRAMS = 64
INSIDE_CONNECT_TIMEOUT = 10.0
MAX_CONNECTING = 1024  # TCP clients waiting for their inside connection; beyond: reset at once
MAX_FLOWS = 4096  # UDP clients at once; datagrams of further clients are dropped
POOL_BATCH = 8  # blank inside sockets asked of the holder at a time
POOL_LOW = 4  # refill below this many
UDP_IDLE = 60.0
MAX_DATAGRAM = 65535


def _unmapped(address: str) -> str:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@dataclass(eq=False)
class _Port:
    spec: Publish
    sock: socket.socket
    accepted: int = 0


@dataclass(eq=False)
class _TcpConn:
    port: _Port
    client: tuple[str, int]
    conn: socket.socket
    started: float
    inside: socket.socket | None = None
    timer: asyncio.TimerHandle | None = None
    pair: RelayPair | None = None


@dataclass(eq=False)
class _UdpFlow:
    port: _Port
    client: tuple[str, int]  # as the host socket reports it (possibly v4-mapped): where to reply
    started: float
    last: float
    inside: socket.socket | None = None
    pending: list[bytes] = field(default_factory=list)
    bytes_in: int = 0  # world -> sandbox
    bytes_out: int = 0  # sandbox -> world


class InboundProxy:
    def __init__(self, link: HolderLink, audit: Audit, pool: PipePool, sandbox_addresses: dict[int, str],
                 idle: float = UDP_IDLE, clock: Callable[[], float] = time.monotonic) -> None:
        self.link = link
        self.audit = audit
        self.pool = pool
        self.sandbox_addresses = sandbox_addresses  # family (4/6) -> the sandbox's address, for events
        self.idle = idle
        self.clock = clock
        self.ports: dict[Publish, _Port] = {}
        self._tcp: set[_TcpConn] = set()
        self._udp: dict[tuple[Publish, tuple[str, int]], _UdpFlow] = {}
        self.ended_up = self.ended_down = 0  # bytes of finished connections and flows
        self.refused = 0  # clients turned away by MAX_CONNECTING / MAX_FLOWS
        self._pools: dict[tuple[int, str], list[socket.socket]] = {}
        self._waiting: dict[tuple[int, str], deque[Callable[[socket.socket | None, str | None], None]]] = {}
        self._refilling: set[tuple[int, str]] = set()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    # -- published ports ---------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for port in self.ports.values():
            self._watch(port)
        self._prefill({spec.proto for spec in self.ports})
        self._sweeper = self._loop.call_later(min(5.0, self.idle / 4), self._sweep)

    def add(self, opened: list[tuple[Publish, socket.socket]]) -> None:
        for spec, sock in opened:
            port = _Port(spec, sock)
            self.ports[spec] = port
            if self._loop is not None:
                self._watch(port)
        if self._loop is not None:
            self._prefill({spec.proto for spec, _ in opened})

    def remove(self, proto: str, address: str | None, host_port: int) -> list[Publish]:
        """Stop publishing what matches (``address`` None: any); live connections and flows stay."""
        gone = [spec for spec in self.ports if spec.proto == proto and spec.host_port == host_port
                and (address is None or spec.host_address == address)]
        for spec in gone:
            port = self.ports.pop(spec)
            if self._loop is not None:
                self._loop.remove_reader(port.sock.fileno())
            for flow in [f for f in self._udp.values() if f.port is port]:
                self._end_flow(flow)  # its replies would have no socket to leave by
            port.sock.close()
        return gone

    def listing(self) -> list[dict]:
        return [{"proto": p.spec.proto, "host_address": p.spec.host_address, "host_port": p.spec.host_port,
                 "sandbox_port": p.spec.sandbox_port, "key": p.spec.key, "accepted": p.accepted}
                for p in sorted(self.ports.values(), key=lambda p: p.spec)]

    def connections(self, now: float) -> list[dict]:
        rows = []
        for c in self._tcp:
            rows.append(self._row(c.port, "tcp", c.client, "relaying" if c.pair else "connecting", now - c.started,
                                  c.pair.bytes_up if c.pair else 0, c.pair.bytes_down if c.pair else 0))
        for f in self._udp.values():
            rows.append(self._row(f.port, "udp", f.client, "open", now - f.started, f.bytes_out, f.bytes_in))
        return rows

    def _row(self, port: _Port, proto: str, client: tuple[str, int], state: str, age: float, up: int,
             down: int) -> dict:
        return {"proto": proto, "direction": "in", "src": self._client(client), "dst": self._sandbox_end(port, client),
                "rule": f"publish:{port.spec.key}", "state": state, "age_s": round(age, 3),
                "bytes_up": up, "bytes_down": down}

    @property
    def live(self) -> int:
        return len(self._tcp) + len(self._udp)

    def totals(self) -> tuple[int, int]:
        """Bytes sandbox -> world and world -> sandbox so far."""
        pairs = [c.pair for c in self._tcp if c.pair is not None]
        return (self.ended_up + sum(p.bytes_up for p in pairs) + sum(f.bytes_out for f in self._udp.values()),
                self.ended_down + sum(p.bytes_down for p in pairs) + sum(f.bytes_in for f in self._udp.values()))

    def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for pool in self._pools.values():
            for sock in pool:
                sock.close()
        self._pools.clear()
        for spec in list(self.ports):
            self.remove(spec.proto, spec.host_address, spec.host_port)
        for c in list(self._tcp):
            self._end_tcp(c, "sandbox stopped", reset=True)
        for f in list(self._udp.values()):
            self._end_flow(f)

    def _watch(self, port: _Port) -> None:
        assert self._loop is not None
        handler = self._on_acceptable if port.spec.proto == "tcp" else self._on_datagrams
        self._loop.add_reader(port.sock.fileno(), handler, port)

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _client(client: tuple[str, int]) -> str:
        return format_endpoint(_unmapped(client[0]), client[1])

    def _sandbox_end(self, port: _Port, client: tuple[str, int]) -> str:
        family = 6 if ":" in _unmapped(client[0]) else 4
        return format_endpoint(self.sandbox_addresses.get(family, "?"), port.spec.sandbox_port)

    def _emit(self, event: str, port: _Port, proto: str, client: tuple[str, int], **fields: object) -> None:
        self.audit.emit(event, proto=proto, src=self._client(client), dst=self._sandbox_end(port, client),
                        rule=f"publish:{port.spec.key}", verdict="allow", direction="in", **fields)

    def _refused(self, port: _Port, proto: str, client: tuple[str, int], reason: str) -> None:
        """A client turned away by a limit: one ``error`` event per 1000 (a flood must not flood
        the log too)."""
        self.refused += 1
        if self.refused == 1 or self.refused % 1000 == 0:
            self._emit("error", port, proto, client, reason=f"{reason} ({self.refused} refused)")

    def _request_inside(self, port: _Port, kind: str, client: tuple[str, int],
                        then: Callable[[socket.socket | None, str | None], None]) -> None:
        """A socket inside the sandbox, bound to the client's address and connecting to the
        published sandbox port: a blank one from the pool, set up here."""
        address = _unmapped(client[0])
        family = 6 if ":" in address else 4
        if family not in self.sandbox_addresses:
            then(None, f"the sandbox has no IPv{family}")
            return

        def connect(sock: socket.socket | None, error: str | None) -> None:
            if sock is None:
                then(None, error)
                return
            try:
                _sys.connect_inside(sock, (address, client[1]), port.spec.sandbox_port)
            except OSError as exc:
                sock.close()
                then(None, f"cannot connect inside: {exc.strerror or exc}")
                return
            then(sock, None)

        self._blank((family, kind), connect)

    def _blank(self, key: tuple[int, str], then: Callable[[socket.socket | None, str | None], None]) -> None:
        """A blank socket of the sandbox's netns (family, kind): from the pool at once, or once
        the holder has sent more.  The pool is refilled ahead of need (below ``POOL_LOW``)."""
        pool = self._pools.setdefault(key, [])
        if pool:
            then(pool.pop(), None)
        else:
            self._waiting.setdefault(key, deque()).append(then)
        if len(pool) < POOL_LOW:
            self._refill(key)

    def _refill(self, key: tuple[int, str]) -> None:
        if key in self._refilling:
            return
        self._refilling.add(key)

        def on_reply(reply: dict, fds: list[int]) -> None:
            self._refilling.discard(key)
            sockets = [socket.socket(fileno=fd) for fd in fds] if reply.get("ok") else []
            if not reply.get("ok"):
                close_fds(fds)
            if self._closed:
                for sock in sockets:
                    sock.close()
                return
            pool, waiting = self._pools.setdefault(key, []), self._waiting.setdefault(key, deque())
            pool.extend(sockets)
            while waiting and pool:
                waiting.popleft()(pool.pop(), None)
            if not sockets:
                reason = str(reply.get("reason") or "the sandbox could not make sockets")
                while waiting:
                    waiting.popleft()(None, reason)
            elif waiting or len(pool) < POOL_LOW:
                self._refill(key)

        self.link.request({"blank": {"family": key[0], "kind": key[1], "count": POOL_BATCH}}, on_reply)

    def _prefill(self, kinds: set[str]) -> None:
        """Stock the pools for the published protocols, so the first client waits for nothing."""
        for family in self.sandbox_addresses:
            for kind in kinds:
                if len(self._pools.get((family, kind), ())) < POOL_LOW:
                    self._refill((family, kind))

    # -- TCP ----------------------------------------------------------------------------------

    def _on_acceptable(self, port: _Port) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, peer = port.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. EMFILE; the client is refused by the kernel's backlog in time
            port.accepted += 1
            if sum(1 for c in self._tcp if c.pair is None) >= MAX_CONNECTING:
                _sys.set_reset_on_close(conn)
                conn.close()
                self._refused(port, "tcp", (peer[0], peer[1]), f"{MAX_CONNECTING} connections already waiting")
                continue
            c = _TcpConn(port, (peer[0], peer[1]), conn, time.monotonic())
            self._tcp.add(c)
            self._request_inside(port, "tcp", c.client, lambda inside, error, c=c: self._on_inside(c, inside, error))

    def _on_inside(self, c: _TcpConn, inside: socket.socket | None, error: str | None) -> None:
        if c not in self._tcp:  # closed meanwhile
            if inside is not None:
                inside.close()
            return
        if inside is None:
            self._end_tcp(c, error or "no inside socket", reset=True)
            return
        assert self._loop is not None
        c.inside = inside
        self._loop.add_writer(inside.fileno(), self._on_inside_connected, c)
        c.timer = self._loop.call_later(INSIDE_CONNECT_TIMEOUT, self._on_inside_timeout, c)

    def _on_inside_timeout(self, c: _TcpConn) -> None:
        self._end_tcp(c, f"the sandbox did not accept within {INSIDE_CONNECT_TIMEOUT:g} s", reset=True)

    def _on_inside_connected(self, c: _TcpConn) -> None:
        assert self._loop is not None and c.inside is not None
        self._loop.remove_writer(c.inside.fileno())
        if c.timer is not None:
            c.timer.cancel()
            c.timer = None
        err = c.inside.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._end_tcp(c, f"sandbox port {c.port.spec.sandbox_port}: {os.strerror(err)}", reset=True)
            return
        c.pair = RelayPair(self._loop, self.pool, c.inside, c.conn, lambda pair, error: self._on_pair_closed(c, error))
        self._emit("connect", c.port, "tcp", c.client)
        c.pair.start()

    def _on_pair_closed(self, c: _TcpConn, error: BaseException | None) -> None:
        self._tcp.discard(c)
        assert c.pair is not None
        self.ended_up += c.pair.bytes_up
        self.ended_down += c.pair.bytes_down
        fields: dict[str, object] = {}
        if error is not None:
            fields["reason"] = getattr(error, "strerror", None) or str(error) or type(error).__name__
        self._emit("close", c.port, "tcp", c.client, bytes_up=c.pair.bytes_up, bytes_down=c.pair.bytes_down,
                   duration_ms=(time.monotonic() - c.started) * 1000, **fields)

    def _end_tcp(self, c: _TcpConn, reason: str, reset: bool) -> None:
        if c not in self._tcp:
            return
        self._tcp.discard(c)
        if c.timer is not None:
            c.timer.cancel()
        if c.pair is not None:
            c.pair.abort(ConnectionAbortedError(reason))
            return
        if c.inside is not None:
            if self._loop is not None:
                self._loop.remove_writer(c.inside.fileno())
            c.inside.close()
        if reset:
            try:
                _sys.set_reset_on_close(c.conn)
            except OSError:
                pass
        c.conn.close()
        self._emit("error", c.port, "tcp", c.client, reason=reason)

    # -- UDP ----------------------------------------------------------------------------------

    def _on_datagrams(self, port: _Port) -> None:
        for _ in range(DATAGRAMS_PER_WAKEUP):
            try:
                data, peer = port.sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            client = (peer[0], peer[1])
            flow = self._udp.get((port.spec, client))
            if flow is None:
                if len(self._udp) >= MAX_FLOWS:
                    self._refused(port, "udp", client, f"flow limit {MAX_FLOWS} reached")
                    continue
                now = self.clock()
                flow = _UdpFlow(port, client, now, now)
                self._udp[(port.spec, client)] = flow
                port.accepted += 1
                self._request_inside(port, "udp", client, lambda inside, error, f=flow: self._on_flow_inside(f, inside, error))
            flow.last = self.clock()
            flow.bytes_in += len(data)
            if flow.inside is None:
                if len(flow.pending) < PENDING_DATAGRAMS:
                    flow.pending.append(data)
                continue
            self._send_inside(flow, data)

    def _send_inside(self, flow: _UdpFlow, data: bytes) -> None:
        assert flow.inside is not None
        try:
            flow.inside.send(data)
        except OSError:
            pass  # ECONNREFUSED (nothing listens yet), a full buffer: UDP may drop

    def _on_flow_inside(self, flow: _UdpFlow, inside: socket.socket | None, error: str | None) -> None:
        if self._udp.get((flow.port.spec, flow.client)) is not flow:
            if inside is not None:
                inside.close()
            return
        if inside is None:
            self._udp.pop((flow.port.spec, flow.client), None)
            self._emit("error", flow.port, "udp", flow.client, reason=error or "no inside socket")
            return
        assert self._loop is not None
        flow.inside = inside
        self._loop.add_reader(inside.fileno(), self._on_replies, flow)
        self._emit("connect", flow.port, "udp", flow.client)
        for data in flow.pending:
            self._send_inside(flow, data)
        flow.pending.clear()

    def _on_replies(self, flow: _UdpFlow) -> None:
        assert flow.inside is not None
        for _ in range(DATAGRAMS_PER_WAKEUP):
            try:
                data = flow.inside.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # ECONNREFUSED from an earlier datagram: nothing listened then
            flow.last = self.clock()
            flow.bytes_out += len(data)
            try:
                flow.port.sock.sendto(data, flow.client)
            except OSError:
                pass
            if flow.port.spec not in self.ports:  # unpublished meanwhile: the host socket is closed
                return

    def _sweep(self) -> None:
        now = self.clock()
        for flow in [f for f in self._udp.values() if now - f.last >= self.idle]:
            self._end_flow(flow)
        assert self._loop is not None
        self._sweeper = self._loop.call_later(min(5.0, self.idle / 4), self._sweep)

    def _end_flow(self, flow: _UdpFlow) -> None:
        if self._udp.pop((flow.port.spec, flow.client), None) is None:
            return
        self.ended_up += flow.bytes_out
        self.ended_down += flow.bytes_in
        if flow.inside is not None:
            if self._loop is not None:
                self._loop.remove_reader(flow.inside.fileno())
            flow.inside.close()
            self._emit("close", flow.port, "udp", flow.client, bytes_up=flow.bytes_out, bytes_down=flow.bytes_in,
                       duration_ms=(self.clock() - flow.started) * 1000)
