"""One attached container: its netns, the fds of its network, its supervised engine.

Ownership (trio-style: whoever opens, closes): a ``Session`` owns the container's netns fd, the
fd it watches for the container's end (a pidfd), everything the netns helper returned (tun,
capture sockets, NFLOG socket), the published host sockets, the external engine's placeholder
interface and the engine's ``Supervisor``.  ``stop()`` releases all of it, in this order: engine
stopped (it holds copies), fds closed (the tun vanishes with its last fd), then a helper removes
what outlives the tun inside the netns (the nft table, the divert rules) - so a container that
lives on after a detach keeps nothing of tether.

Engines: ``proxy`` runs ``tether.daemon.worker`` (a ``ProxyEngine`` on the session's fds);
``external`` runs the configured program with the tun fd (``tun_fd_env`` or ``{fd}`` in argv).
Such a program (wireguard-go) looks the tun's *name* up in its own netns - the daemon's - so the
session creates a placeholder tun of the same name there: up, no addresses, IPv6 off, nothing
routed to it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tether import _sys
from tether.config import ContainerConfig, expand_command
from tether.daemon import plan, worker
from tether.daemon.enter import run_in_netns
from tether.daemon.supervisor import Launch, RestartPolicy, Supervisor
from tether.errors import TetherError
from tether.net.rtnl import Rtnl
from tether.ns import netsetup
from tether.ns.link import close_fds
from tether.ns.spawn import receive_message, send_message
from tether.publish import open_host_sockets, parse_publish

if TYPE_CHECKING:
    from tether.daemon.log import DaemonLog

WORKER_REPLY_TIMEOUT = 5.0


class SessionError(TetherError):
    """The container could not be given its network; the message says why."""


class Session:
    def __init__(self, config: ContainerConfig, netns_fd: int, watch_fd: int | None, *, source: str,
                 peer: dict, log: DaemonLog, restart: RestartPolicy,
                 on_end: Callable[[Session, str], None]) -> None:
        self.config = config
        self.name = config.name
        self.netns_fd = netns_fd
        self.watch_fd = watch_fd  # pidfd of the container's (or attach client's) process, if known
        self.source = source  # attach | oci | admin
        self.peer = peer  # SO_PEERCRED of the client that attached, for the log and `sessions`
        self.log = log
        self.restart = restart
        self.on_end = on_end
        self.state = "configuring"
        self.started = time.monotonic()
        self.started_at = datetime.now(UTC)
        self.plan = plan.net_plan(config)  # wireguard: reads its file (validated when the config was loaded)
        self.named: dict[str, int | socket.socket] = {}
        self.published: list[tuple[Any, socket.socket]] = []
        self.placeholder: int | None = None
        self.capture_port = 0  # of the capture listeners (proxy engine): the ruleset redirects there
        self.supervisor: Supervisor | None = None
        self.worker: WorkerLink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Task | None = None
        self.end_listeners: list[Callable[[dict], None]] = []  # {"ended", "reconnect", "failed"} once ended

    # -- start --------------------------------------------------------------------------------

    async def start(self) -> dict:
        """Configure the netns and start the engine; the description the client is sent."""
        self._loop = asyncio.get_running_loop()
        try:
            await self._start()
        except BaseException:
            await self._release()
            raise
        if self.watch_fd is not None:
            self._loop.add_reader(self.watch_fd, self._on_process_gone)
        self.state = "running"
        self.log.emit("attach", self.name, source=self.source, engine=self.config.engine,
                      interface=self.plan.interface, **self.peer)
        return self.describe()

    async def _start(self) -> None:
        config = self.config
        ruleset_for_port: Callable[[int], str] | None = None
        if config.engine == "proxy":
            make_ruleset = plan.ruleset_for(config, self._policy())
            ruleset_for_port = lambda port: make_ruleset(port).script  # noqa: E731
        elif config.engine == "external":
            self.placeholder = _make_placeholder(self.plan.interface)
        job_plan = self.plan

        def configure() -> tuple[dict, list[int]]:
            named = netsetup.configure(job_plan, ruleset_for_port, replace=True)
            return {"fds": [name for name, _ in named]}, [netsetup.detach(item) for _, item in named]

        message, fds = await run_in_netns(self.netns_fd, configure)
        self.named = dict(zip(message["fds"], fds, strict=True))
        if "tcp4" in self.named or "tcp6" in self.named:
            listener = socket.socket(fileno=self.named["tcp4" if "tcp4" in self.named else "tcp6"])
            self.capture_port = listener.getsockname()[1]
            listener.detach()
        if config.ports:
            try:
                self.published = open_host_sockets([p for text in config.ports for p in parse_publish(text)])
            except TetherError as exc:
                raise SessionError(f"cannot publish the ports of {self.name}: {exc}", exc.hint) from None
        self.supervisor = Supervisor(self._launch, self.restart, self._on_engine_event, self._on_engine_failed)
        self.supervisor.start()

    def _policy(self):
        from tether.policy import PolicyFileError, RuleError
        try:
            with Rtnl() as rtnl:
                return plan.build_container_policy(self.config, rtnl.addresses())
        except (PolicyFileError, RuleError, OSError) as exc:
            raise SessionError(f"the policy of {self.name} cannot be built: {exc}") from None

    def _launch(self) -> Launch:
        tun = netsetup.fileno(self.named["tun"])
        if self.config.engine == "external":
            env = dict(os.environ)
            if self.config.tun_fd_env:
                env[self.config.tun_fd_env] = str(tun)
            return Launch(expand_command(self.config.command, tun), env, [tun])
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        fds = {name: netsetup.fileno(item) for name, item in self.named.items()}
        fds["netns"] = self.netns_fd
        ports = [[{"proto": spec.proto, "host_address": spec.host_address, "host_port": spec.host_port,
                   "sandbox_port": spec.sandbox_port}, sock.fileno()] for spec, sock in self.published]
        start = {"config": worker.config_to_json(self.config), "fds": fds, "ports": ports}
        link = WorkerLink(ours, self.log, self)
        env = dict(os.environ, **{worker.LINK_FD_ENV: str(theirs.fileno())})

        def started(process: subprocess.Popen) -> None:
            theirs.close()  # the worker has its copy
            self.worker = link
            link.start(start)

        def exited() -> None:
            theirs.close()  # no-op once closed: a socket object closes its fd once
            link.close()
            if self.worker is link:
                self.worker = None

        return Launch([sys.executable, "-m", "tether.daemon.worker"], env,
                      [theirs.fileno(), self.netns_fd, *fds.values(), *(fd for _, fd in ports)], started, exited)

    def _on_engine_event(self, kind: str, fields: dict) -> None:
        self.log.emit(kind, self.name, engine=self.config.engine, **fields)

    def _on_engine_failed(self) -> None:
        """The engine keeps dying: end the session rather than leave the container's connections
        captured with nobody to serve them (they would hang); without its tun and routes the
        container's connections fail at once, and its client learns why."""
        self.state = "failed"
        last = self.supervisor.last_exit if self.supervisor else "?"
        self.end(f"its engine failed ({self.restart.max_restarts} restarts in {self.restart.window:g} s; last: "
                 f"{last})", failed=True)

    # -- observation --------------------------------------------------------------------------

    def describe(self) -> dict:
        sup = self.supervisor
        return {"name": self.name, "state": self.state, "engine": self.config.engine, "source": self.source,
                "interface": self.plan.interface, "addresses": [str(a) for a in self.plan.addresses],
                "engine_state": sup.state if sup else "none",
                "engine_pid": sup.process.pid if sup and sup.process else None,
                "restarts": sup.restarts if sup else 0, "last_exit": sup.last_exit if sup else None,
                "uptime_s": round(time.monotonic() - self.started, 3),
                "started": self.started_at.isoformat(timespec="seconds"),
                "ports": [str(spec) for spec, _ in self.published], **self.peer}

    async def totals(self) -> dict:
        if self.worker is None:
            return {}
        try:
            return await self.worker.call({"op": "totals"})
        except SessionError:
            return {}

    async def apply_policy(self, config: ContainerConfig) -> dict:
        """A reloaded config that changes only the policy: the kernel's ruleset first (one nft
        transaction in the netns), then the engine (see ``runner._policy_reloader`` for why)."""
        old, self.config = self.config, config
        try:
            policy = self._policy()
            script = f"delete table inet {netsetup.TABLE}\n{plan.ruleset_for(config, policy)(self.capture_port).script}"
            await run_in_netns(self.netns_fd, lambda: (netsetup.run_nft(script, "swap the capture ruleset"), ({}, []))[1])
        except TetherError:
            self.config = old
            raise
        if self.worker is not None:
            await self.worker.call({"op": "policy", "config": worker.config_to_json(config)})
        return {"default": policy.default, "rules": len(policy.ordered_rules())}

    # -- end ----------------------------------------------------------------------------------

    @property
    def ending(self) -> bool:
        return self._stopping is not None

    def process_gone(self) -> bool:
        """Has the watched process exited (even if the loop has not told us yet)?"""
        if self.watch_fd is None or self.watch_fd < 0:
            return False
        return bool(select.select([self.watch_fd], [], [], 0)[0])

    def _on_process_gone(self) -> None:
        self.end("the container's process exited")

    def end(self, reason: str, reconnect: bool = False, failed: bool = False) -> asyncio.Task:
        """Tear the session down (once; later calls return the same task).  ``reconnect``: the
        client should attach again (the daemon is restarting, or the container's shape changed);
        ``failed``: the session ends because it cannot work (its client exits non-zero)."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(reason, reconnect, failed))
        return self._stopping

    async def _stop(self, reason: str, reconnect: bool, failed: bool) -> None:
        if self.state != "failed":
            self.state = "closing"
        await self._release()
        self.state = "closed"
        self.log.emit("detach", self.name, reason=reason)
        self.on_end(self, reason)
        for listener in self.end_listeners:
            listener({"ended": reason, "reconnect": reconnect, "failed": failed})

    async def _release(self) -> None:
        if self._loop is not None and self.watch_fd is not None:
            self._loop.remove_reader(self.watch_fd)
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self.worker is not None:
            self.worker.close()
        netsetup.close_named(list(self.named.items()))
        for _, sock in self.published:
            sock.close()
        self.published = []
        if self.named:
            job_plan = self.plan
            try:
                message, _ = await run_in_netns(self.netns_fd, lambda: ({"problems": netsetup.unconfigure(job_plan)}, []))
                for problem in message.get("problems", []):
                    self.log.emit("error", self.name, reason=f"teardown: {problem}")
            except TetherError as exc:
                self.log.emit("error", self.name, reason=f"teardown: {exc}")
        self.named = {}
        if self.placeholder is not None:
            os.close(self.placeholder)
            self.placeholder = None
        close_fds([fd for fd in (self.netns_fd, self.watch_fd) if fd is not None])
        self.netns_fd, self.watch_fd = -1, None


def _make_placeholder(name: str) -> int:
    """The same-named tun in the daemon's netns an external program resolves the name against."""
    try:
        fd = _sys.open_tun(name)
    except OSError as exc:
        raise SessionError(f"cannot create the placeholder interface {name} in the daemon's netns: "
                           f"{exc.strerror or exc}", "set interface = \"...\" to a name unused on the host") from None
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass
    try:
        with Rtnl() as rtnl:
            rtnl.link_up(name)
    except OSError as exc:
        os.close(fd)
        raise SessionError(f"cannot bring the placeholder interface {name} up: {exc}") from None
    return fd


class WorkerLink:
    """The daemon's end of one worker incarnation's link: events into the log, answers to calls."""

    def __init__(self, sock: socket.socket, log: DaemonLog, session: Session) -> None:
        self.sock = sock
        self.log = log
        self.session = session
        self.ready = False
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, start: dict) -> None:
        self._loop = asyncio.get_running_loop()
        send_message(self.sock, start)
        self.sock.setblocking(False)
        self._loop.add_reader(self.sock.fileno(), self._on_readable)

    async def call(self, request: dict) -> Any:
        if self._loop is None or self.sock.fileno() < 0:
            raise SessionError("the engine is not running")
        request_id = next(self._ids)
        future = self._loop.create_future()
        self._waiting[request_id] = future
        try:
            send_message(self.sock, {**request, "id": request_id})
            reply = await asyncio.wait_for(future, WORKER_REPLY_TIMEOUT)
        except (OSError, TimeoutError, asyncio.TimeoutError) as exc:
            raise SessionError(f"the engine did not answer: {exc or 'timeout'}") from None
        finally:
            self._waiting.pop(request_id, None)
        if "error" in reply:
            raise SessionError(str(reply["error"]))
        return reply.get("result")

    def _on_readable(self) -> None:
        for _ in range(256):
            try:
                message, fds = receive_message(self.sock, maxfds=0)
            except (BlockingIOError, InterruptedError):
                return
            except (EOFError, OSError, ValueError):
                self.close()
                return
            close_fds(fds)
            if "event" in message and isinstance(message["event"], dict):
                self.log.record(message["event"])
            elif message.get("ready"):
                self.ready = True
            elif "id" in message:
                future = self._waiting.get(message["id"])
                if future is not None and not future.done():
                    future.set_result(message)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            if self._loop is not None:
                self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
        for future in self._waiting.values():
            if not future.done():
                future.set_result({"error": "the engine exited"})
