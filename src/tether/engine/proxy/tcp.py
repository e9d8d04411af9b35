"""TCP proxy: accept captured connections, decide, dial from the host, relay with splice.

Theory of operation
-------------------
The sandbox's nft ``capture`` chain redirects every outgoing TCP connection to ``listener``, a
socket bound to 127.0.0.1 *inside* the sandbox netns and held here, in the host netns.  The
sandbox's own kernel terminates the TCP connection (handshake, retransmission, windows: nothing
of TCP is reimplemented here).  For each accepted socket:

1. read the original destination (SO_ORIGINAL_DST);
2. map the gateway: ``10.0.2.2:PORT`` becomes the host's ``127.0.0.1:PORT`` for ``--allow-host``
   ports; the rest of the sandbox subnet is refused (the kernel already refuses it; this is the
   second line of defence);
3. evaluate the policy again (the kernel ruleset is compiled from the same policy, so a deny
   here means the two disagree — it is refused and audited all the same);
4. dial from the host netns with a timeout; refusal, unreachability or timeout resets the
   sandbox side at once (``error`` event with the reason);
5. relay with ``RelayPair`` (splice), ``connect`` event on success, ``close`` event with the
   byte counts and duration when both directions are finished.

Connections are driven by readiness callbacks (no task per connection: this is the
short-connection latency path), each guarded by its own try/except: a failure in one (even a
bug) is logged as an ``error`` event and resets only that connection.  The proxy owns the
listener's reader registration, the flows being dialled or relayed and their pipes; ``close()``
resets every live connection.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import time
from dataclasses import dataclass

from tether import _sys
from tether.audit import Audit, format_endpoint
from tether.engine.proxy.relay import PipePool, RelayPair
from tether.net.nft import GATEWAY_RULE, SandboxNet
from tether.policy import Decision, Policy

CONNECT_TIMEOUT = 10.0
ACCEPTS_PER_WAKEUP = 64


@dataclass
class TcpStats:
    live: int = 0
    accepted: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass(eq=False)  # identity semantics: flows live in sets
class _Flow:
    """One captured connection from accept to close."""

    conn: socket.socket
    started: float
    src: str = "?"
    dst: str = "?"
    rule: str = "?"
    upstream: socket.socket | None = None
    timer: asyncio.TimerHandle | None = None
    pair: RelayPair | None = None


class TcpProxy:
    def __init__(self, listener: socket.socket, policy: Policy, audit: Audit,
                 allow_host_ports: frozenset[int] = frozenset(), net: SandboxNet = SandboxNet(),
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.listener = listener
        self.policy = policy
        self.audit = audit
        self.allow_host_ports = allow_host_ports
        self.net = net
        self.connect_timeout = connect_timeout
        self.stats = TcpStats()
        self.pool = PipePool()
        self._dialling: set[_Flow] = set()
        self._relaying: set[_Flow] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._listener_address = self.listener.getsockname()[:2]
        self.listener.setblocking(False)
        self._loop.add_reader(self.listener.fileno(), self._on_acceptable)

    def close(self) -> None:
        """Reset every connection still dialling or relaying."""
        if self._loop is not None:
            self._loop.remove_reader(self.listener.fileno())
        for flow in list(self._dialling):
            self._dial_failed(flow, "sandbox stopped")
        for flow in list(self._relaying):
            assert flow.pair is not None
            flow.pair.abort(ConnectionAbortedError("sandbox stopped"))
        self.pool.close()

    def _on_acceptable(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, _peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving what we have
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return
                raise
            self.stats.accepted += 1
            flow = _Flow(conn, time.monotonic())
            try:
                self._start(flow)
            except Exception as exc:  # noqa: BLE001 - one connection's failure stays its own
                self._fail(flow, f"internal: {exc!r}")

    def _decide(self, addr: str, port: int) -> tuple[Decision, tuple[str, int]]:
        """(decision, address to dial) for an original destination."""
        ip = ipaddress.ip_address(addr)
        if ip == self.net.gateway:
            if port in self.allow_host_ports:
                return Decision("allow", f"allow-host:{port}"), ("127.0.0.1", port)
            return Decision("deny", GATEWAY_RULE), (addr, port)
        if ip in self.net.address.network:
            return Decision("deny", GATEWAY_RULE), (addr, port)
        return self.policy.evaluate("tcp", ip, port), (addr, port)

    def _start(self, flow: _Flow) -> None:
        """Decide and start a non-blocking dial (callbacks, not a task per connection: this
        is the short-connection latency path)."""
        conn = flow.conn
        conn.setblocking(False)
        peer = conn.getpeername()
        flow.src = format_endpoint(peer[0], peer[1])
        try:
            addr, port = _sys.original_destination(conn)
        except OSError:
            addr, port = self._listener_address
        if (addr, port) == self._listener_address:
            # Not redirected: a sandboxed process dialled the engine's socket itself.
            self._fail(flow, "no original destination: connection made directly to the engine's socket")
            return
        flow.dst = format_endpoint(addr, port)
        decision, target = self._decide(addr, port)
        flow.rule = decision.rule
        if decision.verdict == "deny":
            _reset(conn)
            self.audit.emit("deny", proto="tcp", src=flow.src, dst=flow.dst, rule=flow.rule, verdict="deny")
            return
        family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        upstream = flow.upstream = socket.socket(family, socket.SOCK_STREAM)
        upstream.setblocking(False)
        err = upstream.connect_ex(target)
        if err == 0:
            self._connected(flow)
        elif err == errno.EINPROGRESS:
            assert self._loop is not None
            self._dialling.add(flow)
            self._loop.add_writer(upstream.fileno(), self._on_dialled, flow)
            flow.timer = self._loop.call_later(self.connect_timeout, self._dial_failed, flow, "timeout")
        else:
            self._fail(flow, os.strerror(err))

    def _on_dialled(self, flow: _Flow) -> None:
        assert flow.upstream is not None and self._loop is not None
        self._loop.remove_writer(flow.upstream.fileno())
        self._dialling.discard(flow)
        if flow.timer is not None:
            flow.timer.cancel()
        try:
            err = flow.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(flow, os.strerror(err))
            else:
                self._connected(flow)
        except Exception as exc:  # noqa: BLE001
            self._fail(flow, f"internal: {exc!r}")

    def _dial_failed(self, flow: _Flow, reason: str) -> None:
        if flow not in self._dialling:
            return
        self._dialling.discard(flow)
        if flow.upstream is not None and self._loop is not None:
            self._loop.remove_writer(flow.upstream.fileno())
        self._fail(flow, reason)

    def _fail(self, flow: _Flow, reason: str) -> None:
        """Upstream refused, unreachable, timed out, or a bug: reset the sandbox side at once."""
        if flow.timer is not None:
            flow.timer.cancel()
        if flow.upstream is not None:
            flow.upstream.close()
        _reset(flow.conn)
        self.audit.emit("error", proto="tcp", src=flow.src, dst=flow.dst, rule=flow.rule, verdict="allow",
                        duration_ms=(time.monotonic() - flow.started) * 1000, reason=reason)

    def _connected(self, flow: _Flow) -> None:
        assert flow.upstream is not None and self._loop is not None
        for sock in (flow.conn, flow.upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.audit.emit("connect", proto="tcp", src=flow.src, dst=flow.dst, rule=flow.rule, verdict="allow")
        flow.pair = RelayPair(self._loop, self.pool, flow.conn, flow.upstream,
                              lambda pair, error: self._on_pair_closed(flow, pair, error))
        self._relaying.add(flow)
        self.stats.live += 1
        flow.pair.start()
        flow.pair.up.pump_now()  # the client has usually sent its request already: no wakeup needed

    def _on_pair_closed(self, flow: _Flow, pair: RelayPair, error: BaseException | None) -> None:
        self._relaying.discard(flow)
        self.stats.live -= 1
        self.stats.bytes_up += pair.bytes_up
        self.stats.bytes_down += pair.bytes_down
        fields = {}
        if error is not None:
            fields["reason"] = getattr(error, "strerror", None) or str(error) or type(error).__name__
        self.audit.emit("close", proto="tcp", src=flow.src, dst=flow.dst, rule=flow.rule, verdict="allow",
                        bytes_up=pair.bytes_up, bytes_down=pair.bytes_down,
                        duration_ms=(time.monotonic() - flow.started) * 1000, **fields)


def _reset(sock: socket.socket) -> None:
    """Close with an RST: the sandboxed client sees ECONNRESET at once, never a hang."""
    try:
        _sys.set_reset_on_close(sock)
    except OSError:
        pass
    sock.close()
