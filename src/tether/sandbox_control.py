"""The methods a running sandbox serves on its control socket (``tether ps``, ``tether ctl``).

Each method takes a ``control.Request`` and returns a JSON-able result (or ``STREAMING`` and
pushes events).  They only read the engine's and audit's state, or ask the runner to act
(``stop``): no method can change what the sandbox may reach except ``policy.reload``, which goes
through the same validation as the command line.

Methods (params -> result):

* ``status`` -> ``{name, pid, tether_pid, engine, uptime_s, started, argv, uid, connections,
  denied, bytes_up, bytes_down}`` (``pid``: the sandbox's pid 1, the holder).
* ``connections`` -> ``{"connections": [{proto, src, dst, rule, state, age_s, bytes_up,
  bytes_down[, name][, idle_s]}]}`` oldest first.
* ``events`` ``{follow: bool = false, backlog: int = 100}``: the last ``backlog`` audit events
  (at most ``audit.RECENT``) as event frames, then, with ``follow``, every new one until the
  client leaves; without it the response ``{"events": N}`` ends the stream.
* ``policy.show`` -> ``{"default": "allow"|"deny", "rules": [{"action", "rule", "match"}],
  "file"}`` (rules in evaluation order; ``match`` spells out what a rule covers).
* ``policy.reload`` -> ``{"default", "rules": N, "file"}`` once the re-read ``--policy FILE``
  is in force (kernel ruleset swapped by the holder, then the engine); ``invalid-config`` (the
  file's error, the current policy stays) or ``conflict`` (no ``--policy``).
* ``ports.list`` -> ``{"ports": [{proto, host_address, host_port, sandbox_port, key, accepted}]}``;
  ``ports.add`` ``{spec: "[ADDR:]HOSTPORT:SANDBOXPORT[/udp]"}`` -> ``{"added": [KEY...]}``
  (``bad-params``, or ``conflict`` when a host port cannot be bound); ``ports.rm`` ``{port:
  "[ADDR:]HOSTPORT[/udp]"}`` -> ``{"removed": [KEY...]}`` (``not-found``).  Live connections
  stay when their port is removed (UDP flows end: their replies would have no socket).
* ``wg.show`` -> the WireGuard engine's ``wg show`` data (``conflict`` for other engines): the
  interface's public key and listening port, each peer (public key, endpoint, allowed IPs, latest
  handshake, bytes, persistent keepalive), the device's counters and the I/O shell's (``io``).
* ``stop`` ``{timeout: float = 10}``: SIGTERM to CMD now, SIGKILL to the whole sandbox after
  ``timeout`` seconds if it is still running -> ``{"stopping": true, "timeout": T}``.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from tether import wire
from tether.audit import Audit
from tether.control import STREAMING, Method, MethodError, Request
from tether.policy import Policy, Rule
from tether.hostsock import HostSocketError
from tether.publish import PublishError, open_host_sockets, parse_key, parse_publish

MAX_STOP_TIMEOUT = 3600.0


@dataclass
class SandboxInfo:
    name: str
    holder_pid: int
    argv: list[str]
    policy_file: str | None
    started: float  # time.monotonic() at start
    started_at: datetime


class SandboxControl:
    def __init__(self, info: SandboxInfo, engine: Any, audit: Audit, policy: Callable[[], Policy], *,
                 stop: Callable[[float], None], reload: Callable[[Callable], None]) -> None:
        self.info = info
        self.engine = engine
        self.audit = audit
        self.policy = policy
        self._stop = stop
        self._reload = reload

    def methods(self) -> dict[str, Method]:
        return {"status": self.status, "connections": self.connections, "events": self.events,
                "policy.show": self.policy_show, "policy.reload": self.policy_reload, "stop": self.stop,
                "ports.list": self.ports_list, "ports.add": self.ports_add, "ports.rm": self.ports_rm,
                "wg.show": self.wg_show}

    def status(self, request: Request) -> dict:
        return {"name": self.info.name, "pid": self.info.holder_pid, "tether_pid": os.getpid(),
                "engine": getattr(self.engine, "name", "proxy"),
                "uptime_s": round(time.monotonic() - self.info.started, 3),
                "started": self.info.started_at.isoformat(timespec="seconds"), "argv": self.info.argv,
                "uid": os.getuid(), **self.engine.totals()}

    def _inbound(self) -> Any:
        """The engine's published ports; the WireGuard engine has none (the tunnel is the only way)."""
        inbound = getattr(self.engine, "inbound", None)
        if inbound is None:
            raise MethodError(wire.CONFLICT, "this sandbox's engine publishes no ports (its only way out and in "
                                             "is its tunnel)")
        return inbound

    def wg_show(self, request: Request) -> dict:
        """The WireGuard engine's peers (public keys only, as ``wg show``)."""
        show = getattr(self.engine, "show", None)
        if show is None:
            raise MethodError(wire.CONFLICT, "this sandbox does not run the WireGuard engine (tether run --wireguard)")
        return show()

    def connections(self, request: Request) -> dict:
        return {"connections": self.engine.connections()}

    def events(self, request: Request) -> object:
        return stream_events(request, self.audit)

    def policy_show(self, request: Request) -> dict:
        policy = self.policy()
        return {"default": policy.default, "file": self.info.policy_file,
                "rules": [{"action": rule.action, "rule": rule.text, "match": describe_match(rule)}
                          for rule in policy.ordered_rules()]}

    def policy_reload(self, request: Request) -> object:
        def done(result: dict | None, error: tuple[str, str] | None) -> None:
            if error is None:
                request.finish(result)
            else:
                request.fail(*error)

        self._reload(done)
        return STREAMING

    def ports_list(self, request: Request) -> dict:
        return {"ports": self._inbound().listing()}

    def ports_add(self, request: Request) -> dict:
        inbound = self._inbound()  # first: no host socket is opened for an engine without ports
        spec = _param(request, "spec", str, "")
        try:
            publishes = parse_publish(spec)
        except PublishError as exc:
            raise MethodError(wire.BAD_PARAMS, str(exc)) from None
        try:
            opened = open_host_sockets(publishes)
        except HostSocketError as exc:
            raise MethodError(wire.CONFLICT, str(exc) + (f" ({exc.hint})" if exc.hint else "")) from None
        inbound.add(opened)
        return {"added": [p.key for p, _ in opened]}

    def ports_rm(self, request: Request) -> dict:
        text = _param(request, "port", str, "")
        try:
            proto, address, port = parse_key(text)
        except PublishError as exc:
            raise MethodError(wire.BAD_PARAMS, str(exc)) from None
        gone = self._inbound().remove(proto, address, port)
        if not gone:
            raise MethodError(wire.NOT_FOUND, f"{text} is not published (see: ports list)")
        return {"removed": [p.key for p in gone]}

    def stop(self, request: Request) -> dict:
        timeout = _param(request, "timeout", (int, float), 10.0)
        if not 0 <= timeout <= MAX_STOP_TIMEOUT:
            raise MethodError(wire.BAD_PARAMS, f"timeout must be 0-{MAX_STOP_TIMEOUT:g} seconds")
        self._stop(float(timeout))
        return {"stopping": True, "timeout": float(timeout)}


class EventSource(Protocol):
    """What ``stream_events`` reads: the recent records and the live subscriber list."""

    recent: deque[dict]
    subscribers: list[Callable[[dict], None]]


def stream_events(request: Request, source: EventSource) -> object:
    """The ``events`` method over any event source (a sandbox's audit, the daemon's log)."""
    follow = _param(request, "follow", bool, False)
    backlog = _param(request, "backlog", int, 100)
    if backlog < 0:
        raise MethodError(wire.BAD_PARAMS, "backlog must be >= 0")
    recent = list(source.recent)[-backlog:] if backlog else []
    for record in recent:
        if not request.push(record):
            return STREAMING
    if not follow:
        request.finish({"events": len(recent)})
        return STREAMING

    def forward(record: dict) -> None:
        if not request.push(record):
            unsubscribe()

    def unsubscribe() -> None:
        if forward in source.subscribers:
            source.subscribers.remove(forward)

    source.subscribers.append(forward)
    request.on_close(unsubscribe)
    return STREAMING


def describe_match(rule: Rule) -> str:
    """What a rule matches, spelled out (a builtin's label does not say which network)."""
    if rule.domain is not None:
        prefix = {"suffix": "", "subdomains": "*.", "exact": "="}[rule.domain.kind]
        target = f"name {prefix}{rule.domain.name}"
    else:
        target = str(rule.network)
    proto = rule.proto or "any"
    ports = "" if rule.ports is None else (f" port {rule.ports[0]}" if rule.ports[0] == rule.ports[1]
                                            else f" ports {rule.ports[0]}-{rule.ports[1]}")
    return f"{proto} {target}{ports}"


def _param(request: Request, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = request.params.get(key, default)
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise MethodError(wire.BAD_PARAMS, f"{key} must be a number, not a boolean")
    if not isinstance(value, kind):
        raise MethodError(wire.BAD_PARAMS, f"{key} has the wrong type ({type(value).__name__})")
    return value
