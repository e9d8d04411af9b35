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
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from tether import _sys
from tether.audit import Audit, format_endpoint
from tether.engine.proxy.decide import Decider
from tether.engine.proxy.peek import MAX_PEEK, NEED_MORE, server_name
from tether.engine.proxy.relay import PipePool, RelayPair

CONNECT_TIMEOUT = 10.0
NAME_CHECKED_PORTS = frozenset({80, 443})
PEEK_TIMEOUT = 3.0  # for the client's first bytes (SNI/Host) on name-checked ports
PEEK_POLL = 0.01
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
    listener_address: tuple[str, int] = ("", 0)
    src: str = "?"
    dst: str = "?"
    rule: str = "?"
    name: str | None = None
    orig: tuple[str, int] = ("", 0)
    upstream: socket.socket | None = None
    timer: asyncio.TimerHandle | None = None
    pair: RelayPair | None = None


class TcpProxy:
    def __init__(self, listeners: list[socket.socket], decider: Decider, audit: Audit,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 dns_handler: Callable[[socket.socket, str, tuple[str, int]], None] | None = None,
                 is_dns: Callable[[tuple[str, int]], bool] = lambda dst: False) -> None:
        self.listeners = listeners
        self.decider = decider
        self.audit = audit
        self.connect_timeout = connect_timeout
        self.dns_handler = dns_handler
        self.is_dns = is_dns
        self.stats = TcpStats()
        self.pool = PipePool()
        self._dialling: set[_Flow] = set()
        self._relaying: set[_Flow] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for listener in self.listeners:
            listener.setblocking(False)
            self._loop.add_reader(listener.fileno(), self._on_acceptable, listener)

    async def drain(self, timeout: float) -> None:
        """The sandbox has ended: take the connections it made just before (still queued on the
        listeners) and let dials in progress finish, so each gets its audit event."""
        for listener in self.listeners:
            self._on_acceptable(listener)
        deadline = time.monotonic() + timeout
        while self._dialling and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    def close(self) -> None:
        """Reset every connection still dialling or relaying."""
        if self._loop is not None:
            for listener in self.listeners:
                self._loop.remove_reader(listener.fileno())
        for flow in list(self._dialling):
            self._dial_failed(flow, "sandbox stopped")
        for flow in list(self._relaying):
            assert flow.pair is not None
            flow.pair.abort(ConnectionAbortedError("sandbox stopped"))
        self.pool.close()

    def connections(self, now: float) -> list[dict]:
        """Live connections (dialling or relaying), for ``tether ctl NAME connections``."""
        rows = []
        for flow in (*self._dialling, *self._relaying):
            pair = flow.pair
            rows.append({"proto": "tcp", "src": flow.src, "dst": flow.dst, "rule": flow.rule,
                         "state": "relaying" if pair is not None else "dialling",
                         "age_s": round(now - flow.started, 3),
                         "bytes_up": pair.bytes_up if pair else 0, "bytes_down": pair.bytes_down if pair else 0,
                         **_named(flow)})
        return rows

    @property
    def live(self) -> int:
        return len(self._dialling) + len(self._relaying)

    def totals(self) -> tuple[int, int]:
        """Bytes up and down so far: finished connections plus what live ones have moved."""
        live = [flow.pair for flow in self._relaying if flow.pair is not None]
        return (self.stats.bytes_up + sum(p.bytes_up for p in live),
                self.stats.bytes_down + sum(p.bytes_down for p in live))

    def _on_acceptable(self, listener: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, _peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving what we have
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return
                raise
            self.stats.accepted += 1
            flow = _Flow(conn, time.monotonic(), listener_address=listener.getsockname()[:2])
            try:
                self._start(flow)
            except Exception as exc:  # noqa: BLE001 - one connection's failure stays its own
                self._fail(flow, f"internal: {exc!r}")

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
            addr, port = flow.listener_address
        if (addr, port) == flow.listener_address:
            # Not redirected: a sandboxed process dialled the engine's socket itself.
            self._fail(flow, "no original destination: connection made directly to the engine's socket")
            return
        flow.dst = format_endpoint(addr, port)
        flow.orig = (addr, port)
        if self.dns_handler is not None and self.is_dns((addr, port)):
            self.dns_handler(conn, flow.src, (addr, port))
            return
        decision, target = self.decider.decide("tcp", addr, port)
        flow.rule = decision.rule
        flow.name = getattr(decision, "name", None)
        if decision.verdict == "deny":
            self._deny(flow)
            return
        if flow.name is not None and port in NAME_CHECKED_PORTS:
            self._peek(flow, target, 0.0)
            return
        self._dial(flow, target)

    def _deny(self, flow: _Flow) -> None:
        _reset(flow.conn)
        self.audit.emit("deny", proto="tcp", src=flow.src, dst=flow.dst, rule=flow.rule, verdict="deny", **_named(flow))

    def _peek(self, flow: _Flow, target: tuple[str, int], waited: float) -> None:
        """Allowed through a domain rule, to port 80/443: check the TLS SNI / HTTP Host the client
        asks for before dialling (defeats asking a shared address for a different site)."""
        try:
            data = flow.conn.recv(MAX_PEEK, socket.MSG_PEEK)
        except BlockingIOError:
            data = b""
            complete = False
        except OSError as exc:
            self._fail(flow, exc.strerror or str(exc))
            return
        else:
            complete = True
        name = server_name(data) if data or not complete else None
        if name == NEED_MORE or (not data and not complete):
            if waited >= PEEK_TIMEOUT:
                name = None
            else:  # MSG_PEEK leaves the bytes queued, so readiness would fire at once: poll
                assert self._loop is not None
                self._dialling.add(flow)
                flow.timer = self._loop.call_later(PEEK_POLL, self._repeek, flow, target, waited + PEEK_POLL)
                return
        if name is None:
            flow.rule = f"{flow.rule} (no TLS SNI or HTTP Host to check)"
            self._deny(flow)
            return
        decision = self.decider.policy.evaluate("tcp", flow.orig[0], flow.orig[1], names=(name,))
        if decision.verdict != "allow" or getattr(decision, "name", None) is None:
            flow.rule = f"SNI/Host {name} not allowed (address allowed as {flow.name} by {flow.rule})"
            flow.name = name
            self._deny(flow)
            return
        flow.name, flow.rule = name, decision.rule
        self._dial(flow, target)

    def _repeek(self, flow: _Flow, target: tuple[str, int], waited: float) -> None:
        if flow not in self._dialling:
            return  # the sandbox stopped meanwhile
        self._dialling.discard(flow)
        flow.timer = None
        try:
            self._peek(flow, target, waited)
        except Exception as exc:  # noqa: BLE001
            self._fail(flow, f"internal: {exc!r}")

    def _dial(self, flow: _Flow, target: tuple[str, int]) -> None:
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
        self.audit.emit("error", proto="tcp", src=flow.src, dst=flow.dst, rule=flow.rule, verdict="allow", **_named(flow),
                        duration_ms=(time.monotonic() - flow.started) * 1000, reason=reason)

    def _connected(self, flow: _Flow) -> None:
        assert flow.upstream is not None and self._loop is not None
        for sock in (flow.conn, flow.upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.audit.emit("connect", proto="tcp", src=flow.src, dst=flow.dst, rule=flow.rule, verdict="allow", **_named(flow))
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
        self.audit.emit("close", proto="tcp", src=flow.src, dst=flow.dst, rule=flow.rule, verdict="allow", **_named(flow),
                        bytes_up=pair.bytes_up, bytes_down=pair.bytes_down,
                        duration_ms=(time.monotonic() - flow.started) * 1000, **fields)


def _named(flow: _Flow) -> dict[str, str]:
    """Audit events carry the name a domain rule decided on."""
    return {"name": flow.name} if flow.name else {}


def _reset(sock: socket.socket) -> None:
    """Close with an RST: the sandboxed client sees ECONNRESET at once, never a hang."""
    try:
        _sys.set_reset_on_close(sock)
    except OSError:
        pass
    sock.close()
