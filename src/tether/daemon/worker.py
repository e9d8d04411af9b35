"""An engine process of the daemon: one container's proxy engine, on fds the daemon keeps.

Started by the session's ``Supervisor`` as ``python -m tether.daemon.worker`` with the link to the
daemon (a SEQPACKET socket) at fd 3 and the session's fds inherited at their own numbers.  The
first message on the link says which fd is what and carries the container's config; the worker
builds the policy from it (``tether.daemon.plan``, exactly as the daemon compiled the kernel's
ruleset), runs ``ProxyEngine`` until the link closes or SIGTERM, and reports over the link:

* worker -> daemon: ``{"ready": true}`` once serving; ``{"event": RECORD}`` per audit event (dropped,
  never blocking the engine, when the daemon does not read); ``{"id": N, "result": ...}`` answers.
* daemon -> worker: ``{"id": N, "op": "totals"}``; ``{"id": N, "op": "policy", "config": {...}}``
  (a reloaded config whose ruleset the daemon has already swapped in the kernel).

Sockets a published port needs inside the container (blank sockets, see ``InboundProxy``) are made
here by switching this thread's netns for the ``socket()`` calls and back (``NetnsSockets``): the
worker is single-threaded and root, and the sockets keep the netns they were made in.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import fields

from tether import _sys
from tether.audit import Audit
from tether.config import ContainerConfig
from tether.daemon import plan
from tether.net.rtnl import Rtnl
from tether.ns.link import close_fds
from tether.ns.spawn import receive_message, send_message
from tether.publish import Publish

LINK_FD_ENV = "TETHER_LINK_FD"
BLANK_MAX = 8


def config_to_json(config: ContainerConfig) -> dict:
    return {f.name: getattr(config, f.name) for f in fields(config)}


def config_from_json(obj: dict) -> ContainerConfig:
    known = {f.name for f in fields(ContainerConfig)}
    return ContainerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in obj.items() if k in known})


class NetnsSockets:
    """The ``HolderLink`` interface (``blank`` requests) served in-process: sockets of the
    container's netns, made by entering it for the ``socket()`` calls only."""

    def __init__(self, container_netns: int) -> None:
        self.container_netns = container_netns
        self.own_netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def request(self, message: dict, on_reply) -> None:
        loop = asyncio.get_running_loop()
        want = message.get("blank")
        if not isinstance(want, dict):
            loop.call_soon(on_reply, {"reply": "?", "ok": False, "reason": "unsupported request"}, [])
            return
        made: list[socket.socket] = []
        try:
            family = socket.AF_INET6 if want["family"] == 6 else socket.AF_INET
            kind = socket.SOCK_DGRAM if want["kind"] == "udp" else socket.SOCK_STREAM
            _sys.setns(self.container_netns, _sys.CLONE_NEWNET)
            try:
                for _ in range(max(1, min(int(want["count"]), BLANK_MAX))):
                    made.append(socket.socket(family, kind | socket.SOCK_NONBLOCK))
            finally:
                _sys.setns(self.own_netns, _sys.CLONE_NEWNET)
        except OSError as exc:
            for sock in made:
                sock.close()
            loop.call_soon(on_reply, {"reply": "blank", "ok": False, "reason": exc.strerror or str(exc)}, [])
            return
        loop.call_soon(on_reply, {"reply": "blank", "ok": True}, [sock.detach() for sock in made])

    def close(self) -> None:
        os.close(self.own_netns)


def main() -> int:
    _sys.set_parent_death_signal(signal.SIGTERM)
    link = socket.socket(fileno=int(os.environ[LINK_FD_ENV]))
    start, _ = receive_message(link, maxfds=0)
    from tether.runner import _run_event_loop

    return _run_event_loop(_serve(link, start))


async def _serve(link: socket.socket, start: dict) -> int:
    from tether.engine.proxy.engine import DnsSettings, ProxyEngine
    from tether.runner import host_resolvers

    config = config_from_json(start["config"])
    fds = start["fds"]
    if config.engine == "wireguard":
        return await _serve_wireguard(link, config, fds["tun"])
    with Rtnl() as rtnl:
        host_addresses = rtnl.addresses()
    policy = plan.build_container_policy(config, host_addresses)
    tcp = [socket.socket(fileno=fds[k]) for k in ("tcp4", "tcp6") if k in fds]
    udp = [socket.socket(fileno=fds[k]) for k in ("udp4", "udp6") if k in fds]
    ruleset = plan.ruleset_for(config, policy)(tcp[0].getsockname()[1])
    devnull = open(os.devnull, "w")
    audit = Audit(config.name, sink=None, stderr=devnull)
    link.setblocking(False)
    tell = _teller(link)
    audit.subscribers.append(lambda record: tell({"event": record}))
    sockets = NetnsSockets(fds["netns"])
    upstreams = [(a, 53) for a in config.dns] or host_resolvers()
    engine = ProxyEngine(tcp_listeners=tcp, udp_sockets=udp, nflog_sock=socket.socket(fileno=fds["nflog"]),
                         tun=fds["tun"], policy=policy, ruleset=ruleset, audit=audit,
                         allow_host_ports=frozenset(config.allow_host), net=plan.sandbox_net(config),
                         dns=DnsSettings(upstreams, "NXDOMAIN" if config.dns_deny == "nxdomain" else "REFUSED"),
                         link=sockets, families=tuple(f for f, on in ((4, config.ipv4), (6, config.ipv6)) if on),
                         connect_timeout=config.connect_timeout, udp_timeout=config.udp_timeout)
    engine.inbound.add([(Publish(**spec), socket.socket(fileno=fd)) for spec, fd in start.get("ports", [])])
    try:
        return await _run_engine(link, engine, lambda message: _answer(message, engine, config, host_addresses, tell),
                                 tell)
    finally:
        sockets.close()
        devnull.close()


async def _serve_wireguard(link: socket.socket, config: ContainerConfig, tun: int) -> int:
    """The WireGuard engine: its UDP socket bound here, in the daemon's netns; the tun from the
    daemon.  No audit events (nothing is decided per connection); ``totals`` for ``sessions``."""
    from tether.engine.wireguard.setup import prepare

    tunnel = prepare(config.config).start()
    engine = tunnel.engine(tun)
    link.setblocking(False)
    tell = _teller(link)

    def answer(message: dict) -> None:
        if message.get("op") == "totals":
            tell({"id": message.get("id"), "result": engine.totals()})
        else:
            tell({"id": message.get("id"), "error": f"unknown op {message.get('op')!r} for the WireGuard engine"})

    try:
        return await _run_engine(link, engine, answer, tell)
    finally:
        tunnel.close()


def _teller(link: socket.socket) -> Callable[[dict], None]:
    """Send a message to the daemon; never block the engine (a message the daemon is too slow to
    take is dropped), never fail (the daemon may be gone)."""
    def tell(message: dict) -> None:
        try:
            send_message(link, message)
        except OSError:
            pass
    return tell


async def _run_engine(link: socket.socket, engine, answer: Callable[[dict], None], tell: Callable[[dict], None]) -> int:
    """Serve ``engine`` until the daemon closes the link or SIGTERM; the daemon's requests go to
    ``answer``."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()

    def on_link() -> None:
        while True:
            try:
                message, extra = receive_message(link, maxfds=0)
            except (BlockingIOError, InterruptedError):
                return
            except (EOFError, OSError, ValueError):
                if not done.done():
                    done.set_result(0)  # the daemon is gone: so is its engine
                return
            close_fds(extra)
            answer(message)

    loop.add_reader(link.fileno(), on_link)
    loop.add_signal_handler(signal.SIGTERM, lambda: done.done() or done.set_result(0))
    engine.start()
    tell({"ready": True})
    try:
        return await done
    finally:
        engine.close()
        loop.remove_reader(link.fileno())


def _answer(message: dict, engine, config: ContainerConfig, host_addresses, tell) -> None:
    op, request_id = message.get("op"), message.get("id")
    try:
        if op == "totals":
            result = engine.totals()
        elif op == "policy":
            new = config_from_json(message["config"])
            policy = plan.build_container_policy(new, host_addresses)
            port = engine.tcp.listeners[0].getsockname()[1]
            engine.set_policy(policy, plan.ruleset_for(new, policy)(port))
            result = {"default": policy.default, "rules": len(policy.ordered_rules())}
        else:
            tell({"id": request_id, "error": f"unknown op {op!r}"})
            return
    except Exception as exc:  # noqa: BLE001 - one bad request never stops the engine
        tell({"id": request_id, "error": f"{op} failed: {exc}"})
        return
    tell({"id": request_id, "result": result})


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except json.JSONDecodeError as exc:
        print(f"tether worker: bad start message: {exc}", file=sys.stderr)
        sys.exit(2)
