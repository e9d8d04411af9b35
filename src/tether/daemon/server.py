"""``tether serve``: the host daemon that gives configured containers their network.

Theory of operation
-------------------
The daemon reads ``tether.toml`` (``tether.config``), takes the name ``admin`` and every
configured container's name in its runtime directory (the same flock claims ``tether run`` uses,
so the two can never both own a name) and listens on:

* ``admin.sock`` (0600, root only): ``status``, ``sessions``, ``events``, ``attach {name, pid}``,
  ``detach {name}``, ``reload`` - ``tether ctl --admin``;
* ``NAME.sock`` per container (``socket_mode``/``socket_uid``/``socket_gid``), meant to be
  bind-mounted into that container: **the socket reached is the identity**.  Its methods act on
  NAME's session only and take no name; SO_PEERCRED is logged, never trusted.  ``attach`` takes
  the client's netns fd (and a pidfd), ``detach`` ends the session, ``status`` describes it.

An ``attach`` is refused unless its fd is a network namespace and not the host's own (the
daemon's or pid 1's): tether never reconfigures the host.  A container has at most one session;
each socket at most ``max_pending`` connections at once.  The session (``session.Session``) then
configures the netns through a forked helper and starts the engine under a supervisor.  It ends
when its client's connection closes (``tether attach``), when the watched process exits (the OCI
hook's container), on ``detach``, on a reload that removes or reshapes the container, or when the
daemon stops - never leaving a tun, nft table, process or fd behind.

Signals: SIGTERM/SIGINT stop (sessions torn down), SIGHUP reloads the config: policy changes
apply to new flows (kernel ruleset swapped, then the engine), containers removed are torn down,
new ones get their sockets, a container whose engine or network shape changed is torn down (its
``tether attach`` client reconnects and gets the new shape).  A config with errors is refused
and the running one stays.  ``sd_notify``: READY=1 once every socket listens.
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

from tether import __version__, _sys, runtime, wire
from tether.config import Config, ConfigError, ContainerConfig, load_config
from tether.control import STREAMING, ControlServer, MethodError, Request
from tether.daemon.log import DaemonLog
from tether.daemon.notify import sd_notify
from tether.daemon.session import Session, SessionError
from tether.daemon.supervisor import RestartPolicy
from tether.errors import TetherError
from tether.ns.link import close_fds
from tether.sandbox_control import stream_events

SOFTWARE = f"tether-daemon {__version__}"
ADMIN = "admin"
POLICY_KEYS = ("default", "allow", "deny", "policy", "allow_host", "dns", "dns_deny", "connect_timeout", "udp_timeout")
SOCKET_KEYS = ("socket_mode", "socket_uid", "socket_gid")
HELLO_TIMEOUT = 5.0  # a container socket's connection must say hello this soon, or lose its slot


class DaemonError(TetherError):
    """The daemon cannot start (runtime directory, a name already taken)."""


class _Endpoint:
    """One container's socket: its claim on the name, its server, its session (if attached)."""

    def __init__(self, config: ContainerConfig, claim: runtime.Claim, server: ControlServer) -> None:
        self.config = config
        self.claim = claim
        self.server = server
        self.session: Session | None = None
        self.attaching = False


class Daemon:
    def __init__(self, config: Config, runtime_dir: Path, log: DaemonLog) -> None:
        self.config = config
        self.runtime_dir = runtime_dir
        self.log = log
        self.endpoints: dict[str, _Endpoint] = {}
        self.admin_claim: runtime.Claim | None = None
        self.admin: ControlServer | None = None
        self._done: asyncio.Future[int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._host_netns = _host_namespaces()

    # -- life ---------------------------------------------------------------------------------

    async def serve(self) -> int:
        self._loop = asyncio.get_running_loop()
        self._done = self._loop.create_future()
        try:
            runtime.ensure_runtime_dir(self.runtime_dir, 0o755)
            self.admin_claim = self._claim(ADMIN)
            listener = self.admin_claim.listen()
            self.admin = ControlServer(listener, self._admin_methods(), {0}, SOFTWARE)
            self.admin.start()
            for config in self.config.containers.values():
                self._open_endpoint(config)
        except BaseException:
            await self._shutdown()
            raise
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self.stop)
        self._loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self._reload_logged()))
        self.log.emit("start", pid=os.getpid(), config=self.config.path, containers=sorted(self.endpoints),
                      runtime_dir=str(self.runtime_dir))
        sd_notify(f"READY=1\nSTATUS=serving {len(self.endpoints)} containers\nMAINPID={os.getpid()}")
        try:
            return await self._done
        finally:
            sd_notify("STOPPING=1")
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                self._loop.remove_signal_handler(sig)
            await self._shutdown()
            self.log.emit("stop", pid=os.getpid())

    def stop(self, code: int = 0) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(code)

    async def _shutdown(self) -> None:
        # all at once: each teardown waits for its engine to exit (up to its grace period)
        await asyncio.gather(*(self._close_endpoint(endpoint, "the daemon is stopping", reconnect=True)
                               for endpoint in list(self.endpoints.values())))
        if self.admin is not None:
            self.admin.close()
            self.admin = None
        if self.admin_claim is not None:
            self.admin_claim.release()
            self.admin_claim = None

    def _claim(self, name: str) -> runtime.Claim:
        try:
            return runtime.claim(self.runtime_dir, name)
        except runtime.RuntimeDirError as exc:
            raise DaemonError(f"cannot take {name!r} in {self.runtime_dir}: {exc}",
                              "is another tether serve (or a tether run with that --name) running there?") from None

    def _open_endpoint(self, config: ContainerConfig) -> None:
        claim = self._claim(config.name)
        try:
            listener = claim.listen()
            _apply_socket_access(claim.socket_path, config)
        except BaseException:
            claim.release()
            raise
        server = ControlServer(listener, {}, None, SOFTWARE, fd_methods=frozenset({"attach"}),
                               max_connections=self.config.daemon.max_pending, hello_timeout=HELLO_TIMEOUT)
        endpoint = _Endpoint(config, claim, server)
        server.methods = self._container_methods(endpoint)
        server.start()
        self.endpoints[config.name] = endpoint

    async def _close_endpoint(self, endpoint: _Endpoint, reason: str, reconnect: bool = False) -> None:
        self.endpoints.pop(endpoint.config.name, None)
        if endpoint.session is not None:
            await endpoint.session.end(reason, reconnect)
        endpoint.server.close()
        endpoint.claim.release()

    # -- reload -------------------------------------------------------------------------------

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except Exception as exc:  # noqa: BLE001 - a failed reload must be seen, and never stop the daemon
            self.log.emit("error", reason=f"reload failed: {exc!r}")

    async def reload(self) -> dict:
        try:
            new = load_config(self.config.path)
        except ConfigError as exc:
            self.log.emit("error", reason=f"reload refused, the running config stays: {exc}")
            return {"ok": False, "errors": str(exc).splitlines()}
        changes: dict[str, list[str]] = {"added": [], "removed": [], "reshaped": [], "policy": [], "errors": []}
        for name in [n for n in self.endpoints if n not in new.containers]:
            await self._close_endpoint(self.endpoints[name], "removed from the config")
            changes["removed"].append(name)
        for name, config in new.containers.items():
            endpoint = self.endpoints.get(name)
            try:
                if endpoint is None:
                    self._open_endpoint(config)
                    changes["added"].append(name)
                    continue
                await self._reconfigure(endpoint, config, changes)
            except (TetherError, MethodError) as exc:
                changes["errors"].append(f"{name}: {exc}")
        self.config = replace(new, daemon=replace(new.daemon, runtime_dir=str(self.runtime_dir)))
        for endpoint in self.endpoints.values():
            endpoint.server.max_connections = new.daemon.max_pending
        self.log.emit("reload", config=new.path, **{k: v for k, v in changes.items() if v})
        return {"ok": True, **changes}

    async def _reconfigure(self, endpoint: _Endpoint, config: ContainerConfig, changes: dict) -> None:
        old = endpoint.config
        if old == config:
            return
        endpoint.config = config
        if any(getattr(old, k) != getattr(config, k) for k in SOCKET_KEYS):
            _apply_socket_access(endpoint.claim.socket_path, config)
        session = endpoint.session
        if session is None:
            return
        shape_changed = any(getattr(old, k) != getattr(config, k) for k in _shape_keys())
        if shape_changed:
            await session.end("its engine or network changed in the config", reconnect=True)
            changes["reshaped"].append(config.name)
        elif any(getattr(old, k) != getattr(config, k) for k in POLICY_KEYS):
            await session.apply_policy(config)
            changes["policy"].append(config.name)

    # -- sessions -----------------------------------------------------------------------------

    async def _attach(self, endpoint: _Endpoint, netns_fd: int, watch_fd: int | None, source: str,
                      peer: dict) -> Session:
        """Start a session for ``endpoint``; the fds become the session's (closed on failure)."""
        config = endpoint.config
        try:
            self._check_netns(netns_fd)
        except MethodError as exc:
            close_fds([fd for fd in (netns_fd, watch_fd) if fd is not None])
            self.log.emit("refused", config.name, reason=exc.message, **peer)
            raise
        previous = endpoint.session
        if previous is not None and (previous.ending or previous.process_gone()):
            # A container restarting at once: its old session is (about to be) over - wait for it.
            await previous.end("the container's process exited")
        if endpoint.session is not None or endpoint.attaching:
            close_fds([fd for fd in (netns_fd, watch_fd) if fd is not None])
            holder = endpoint.session.peer.get("pid") if endpoint.session else None
            raise MethodError(wire.CONFLICT, f"container {config.name!r} already has a session"
                                             + (f" (attached by pid {holder})" if holder else ""))
        daemon = self.config.daemon
        session = Session(config, netns_fd, watch_fd, source=source, peer=peer, log=self.log,
                          restart=RestartPolicy(daemon.restart_max, daemon.restart_window),
                          on_end=lambda s, reason: self._on_session_end(endpoint, s))
        endpoint.attaching = True
        try:
            await session.start()
        except TetherError as exc:
            self.log.emit("refused", config.name, reason=str(exc), **peer)
            code = wire.INVALID_CONFIG if isinstance(exc, SessionError) else wire.INTERNAL
            raise MethodError(code, str(exc) + (f" (hint: {exc.hint})" if exc.hint else "")) from None
        finally:
            endpoint.attaching = False
        if self.endpoints.get(config.name) is not endpoint:  # removed by a reload meanwhile
            await session.end("removed from the config")
            raise MethodError(wire.NOT_FOUND, f"container {config.name!r} was removed from the config")
        endpoint.session = session
        return session

    def _on_session_end(self, endpoint: _Endpoint, session: Session) -> None:
        if endpoint.session is session:
            endpoint.session = None

    def _check_netns(self, fd: int) -> None:
        try:
            kind = _sys.namespace_type(fd)
        except OSError:
            raise MethodError(wire.BAD_PARAMS, "the fd sent is not a namespace (send /proc/self/ns/net)") from None
        if kind != _sys.CLONE_NEWNET:
            raise MethodError(wire.BAD_PARAMS, "the fd sent is a namespace, but not a network namespace")
        if _sys.namespace_inode(fd) in self._host_netns:
            raise MethodError(wire.PERMISSION_DENIED,
                              "that is the host's network namespace: tether never reconfigures the host")

    # -- container socket methods -------------------------------------------------------------

    def _container_methods(self, endpoint: _Endpoint) -> dict[str, Any]:
        def check_params(request: Request, allowed: set[str]) -> None:
            name = request.params.get("name")
            if name is not None and name != endpoint.config.name:
                raise MethodError(wire.PERMISSION_DENIED, f"this socket is {endpoint.config.name!r}'s; "
                                                          f"it cannot act on {name!r}")
            unknown = set(request.params) - allowed - {"name"}
            if unknown:
                raise MethodError(wire.BAD_PARAMS, f"unknown parameters: {', '.join(sorted(unknown))}")

        def attach(request: Request) -> object:
            fds, request.fds[:] = list(request.fds), []
            try:
                check_params(request, {"lifetime"})
                lifetime = request.params.get("lifetime", "connection")
                if lifetime not in ("connection", "process"):
                    raise MethodError(wire.BAD_PARAMS, "lifetime must be \"connection\" or \"process\"")
                if not 1 <= len(fds) <= 2:
                    raise MethodError(wire.BAD_PARAMS, f"attach takes the netns fd and optionally a pidfd; "
                                                       f"{len(fds)} fds were sent")
                watch = fds[1] if len(fds) == 2 else None
                if watch is not None and not _is_pidfd(watch):
                    raise MethodError(wire.BAD_PARAMS, "the second fd must be a pidfd (pidfd_open)")
                if lifetime == "process" and watch is None:
                    raise MethodError(wire.BAD_PARAMS, "lifetime \"process\" needs a pidfd of the process to watch")
            except MethodError:
                close_fds(fds)
                raise
            conn = request.connection
            peer = {"peer_pid": conn.peer_pid, "peer_uid": conn.peer_uid, "peer_gid": conn.peer_gid}
            asyncio.ensure_future(self._attach_and_watch(endpoint, fds[0], watch, lifetime, peer, request))
            return STREAMING

        def detach(request: Request) -> dict:
            check_params(request, set())
            session = endpoint.session
            if session is None:
                return {"detached": False}
            session.end("detached by its client")
            return {"detached": True}

        def status(request: Request) -> object:
            check_params(request, set())
            self._serve_later(request, self._container_status(endpoint))
            return STREAMING

        return {"attach": attach, "detach": detach, "status": status}

    async def _attach_and_watch(self, endpoint: _Endpoint, netns_fd: int, watch_fd: int | None, lifetime: str,
                                peer: dict, request: Request) -> None:
        """``attach``: an event ``{"configured": ...}`` once the network is up; the response
        ``{"ended", "reconnect"}`` when the session ends.  With lifetime ``connection`` the
        session ends when the client's connection does."""
        try:
            session = await self._attach(endpoint, netns_fd, watch_fd, "oci" if lifetime == "process" else "attach",
                                         peer)
        except MethodError as exc:
            request.fail(exc.code, exc.message)
            return
        except Exception as exc:  # noqa: BLE001 - a bug answers this client, never hangs it
            request.fail(wire.INTERNAL, f"attach failed: {exc!r}")
            return
        session.end_listeners.append(request.finish)
        delivered = request.push({"configured": session.describe()})
        if lifetime == "connection":
            if not delivered or request.connection.closed:
                session.end("its client went away")
            else:
                request.on_close(lambda: session.end("its client went away"))

    async def _container_status(self, endpoint: _Endpoint) -> dict:
        session = endpoint.session
        row: dict = {"name": endpoint.config.name, "engine": f"{endpoint.config.engine} (daemon)",
                     "tether_pid": os.getpid(), "pid": None, "uid": 0, "connections": 0, "denied": 0,
                     "bytes_up": 0, "bytes_down": 0, "uptime_s": 0.0, "state": "waiting"}
        if session is not None:
            described = session.describe()
            row.update(state=described["state"], uptime_s=described["uptime_s"], pid=session.peer.get("peer_pid"),
                       engine_state=described["engine_state"], restarts=described["restarts"])
            row.update(await session.totals())
        return row

    def _serve_later(self, request: Request, work) -> None:
        async def run() -> None:
            try:
                result = await work
            except MethodError as exc:
                request.fail(exc.code, exc.message)
            except TetherError as exc:
                request.fail(wire.INTERNAL, str(exc))
            except Exception as exc:  # noqa: BLE001 - one request's bug answers that request
                request.fail(wire.INTERNAL, f"{request.method} failed: {exc!r}")
            else:
                request.finish(result)

        asyncio.ensure_future(run())

    # -- admin methods ------------------------------------------------------------------------

    def _admin_methods(self) -> dict[str, Any]:
        def status(request: Request) -> dict:
            return {"name": ADMIN, "engine": "daemon", "pid": os.getpid(), "tether_pid": os.getpid(), "uid": 0,
                    "config": self.config.path, "runtime_dir": str(self.runtime_dir),
                    "containers": len(self.endpoints), "connections": 0, "denied": 0, "bytes_up": 0,
                    "bytes_down": 0, "uptime_s": 0.0,
                    "sessions": sum(1 for e in self.endpoints.values() if e.session is not None)}

        def sessions(request: Request) -> object:
            self._serve_later(request, self._sessions())
            return STREAMING

        def events(request: Request) -> object:
            return stream_events(request, self.log)

        def detach(request: Request) -> object:
            endpoint = self._endpoint_param(request)
            if endpoint.session is None:
                raise MethodError(wire.NOT_FOUND, f"container {endpoint.config.name!r} has no session")
            task = endpoint.session.end("detached by the administrator")
            self._serve_later(request, _after(task, {"detached": endpoint.config.name}))
            return STREAMING

        def attach(request: Request) -> object:
            endpoint = self._endpoint_param(request)
            pid = request.params.get("pid")
            if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
                raise MethodError(wire.BAD_PARAMS, "pid must be a positive integer")
            netns_fd, watch_fd = _open_process(pid)
            peer = {"peer_pid": request.connection.peer_pid, "peer_uid": request.connection.peer_uid,
                    "target_pid": pid}

            async def work() -> dict:
                return (await self._attach(endpoint, netns_fd, watch_fd, "admin", peer)).describe()

            self._serve_later(request, work())
            return STREAMING

        def reload(request: Request) -> object:
            self._serve_later(request, self.reload())
            return STREAMING

        return {"status": status, "sessions": sessions, "events": events, "detach": detach, "attach": attach,
                "reload": reload}

    def _endpoint_param(self, request: Request) -> _Endpoint:
        name = request.params.get("name")
        if not isinstance(name, str):
            raise MethodError(wire.BAD_PARAMS, "name must be a string")
        endpoint = self.endpoints.get(name)
        if endpoint is None:
            raise MethodError(wire.NOT_FOUND, f"no container {name!r} in the config")
        return endpoint

    async def _sessions(self) -> dict:
        rows = []
        for name, endpoint in self.endpoints.items():
            if endpoint.session is None:
                rows.append({"name": name, "engine": endpoint.config.engine, "state": "waiting",
                             "socket": str(endpoint.claim.socket_path)})
                continue
            row = endpoint.session.describe()
            row.update(await endpoint.session.totals(), socket=str(endpoint.claim.socket_path))
            rows.append(row)
        return {"sessions": rows}


async def _after(task: asyncio.Future, result: dict) -> dict:
    await task
    return result


def _host_namespaces() -> set[int]:
    """The netns tether must never configure: the daemon's own, and the machine's - pid 1's, or
    where pid 1 is out of reach (its links may be unreadable even to root), kthreadd's (pid 2:
    kernel threads live in the initial namespaces)."""
    found = {_sys.namespace_inode("/proc/self/ns/net")}
    for pid in (1, 2):
        try:
            found.add(_sys.namespace_inode(f"/proc/{pid}/ns/net"))
        except OSError:
            continue
    return found


def _shape_keys() -> tuple[str, ...]:
    from dataclasses import fields
    return tuple(f.name for f in fields(ContainerConfig) if f.name not in POLICY_KEYS + SOCKET_KEYS)


def _is_pidfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
    except OSError:
        return False


def _open_process(pid: int) -> tuple[int, int]:
    """The netns and a pidfd of ``pid`` (the admin names a process; the daemon opens them)."""
    try:
        watch = _sys.pidfd_open(pid)
    except OSError as exc:
        raise MethodError(wire.NOT_FOUND, f"no process {pid}: {exc.strerror}") from None
    try:
        netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        os.close(watch)
        raise MethodError(wire.NOT_FOUND, f"cannot open the netns of process {pid}: {exc.strerror}") from None
    return netns, watch


def _apply_socket_access(path: Path, config: ContainerConfig) -> None:
    uid = -1 if config.socket_uid is None else config.socket_uid
    gid = -1 if config.socket_gid is None else config.socket_gid
    try:
        if uid != -1 or gid != -1:
            os.chown(path, uid, gid)
        os.chmod(path, config.socket_mode)
    except OSError as exc:
        raise TetherError(f"cannot set the owner or mode of {path}: {exc.strerror}") from None


def default_runtime_dir() -> Path:
    return Path("/run/tether")


def serve(config: Config, runtime_dir: Path | None, log_path: str | None) -> int:
    """Run the daemon until SIGTERM/SIGINT; its exit code."""
    from tether.runner import _run_event_loop

    if os.getuid() != 0:
        raise DaemonError("tether serve must run as root", "run it as root (or from the systemd unit)")
    directory = runtime_dir or Path(config.daemon.runtime_dir)
    path = log_path or config.daemon.log
    try:
        sink = open(path, "a", buffering=1) if path else None
    except OSError as exc:
        raise DaemonError(f"cannot open the log {path}: {exc.strerror}") from None
    _sys.raise_fd_limit()
    log = DaemonLog(sink)
    try:
        return _run_event_loop(Daemon(config, directory, log).serve())
    finally:
        log.close()

