"""Create a sandbox: user+mount+net+pid namespaces, configured network, a holder as pid 1.

Theory of operation
-------------------
Three processes take part::

    tether (host netns, engine)        -- fork -->  spawner  -- fork -->  holder (pid 1)
      subreaper; receives fds                        unshare(), netns setup     mounts, CMD, reaping

* **tether** marks itself child subreaper and forks the *spawner*.  It stays in the host netns
  for its whole life: every connection it dials goes out from there.
* The **spawner** calls ``unshare(USER|NS|NET|PID)``, gets its uid/gid maps written (``uid uid 1``
  rootless; ``0 uid 1`` with ``--root``; the full range for real root) and — still holding every
  capability in its new namespaces because it has not exec'd — configures the netns in-process:
  ``lo`` up, opens ``/dev/net/tun`` (the tun lands in the netns where it is opened), addresses,
  MTU, default routes and the UDP policy route (rtnetlink), the capture ruleset (libnftables),
  the engine's TCP listeners and TPROXY UDP sockets (one per family) and the NFLOG socket.  It
  then forks the holder, sends the named fds (``tun``, ``tcp4``, ``udp4``, ``tcp6``, ``udp6``,
  ``nflog``) to tether over the control socketpair (SCM_RIGHTS) and exits; the holder is
  reparented to tether (subreaper).
* The **holder** is pid 1 of the new pid namespace: see ``tether.ns.holder``.

Errors in the spawner or holder travel over the control socket as ``{"error": ..., "hint": ...}``
and become one clear message and exit code 2.  Nothing persists on the host: the namespaces are
anonymous and die with the last process/fd that pins them; the resolv.conf source lives on a
tmpfs private to the sandbox's mount namespace.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
from dataclasses import dataclass, field
from collections.abc import Callable

from tether import _sys
from tether.errors import TetherError
from tether.net.nft import SandboxNet
from tether.ns import netsetup
from tether.ns.netsetup import NetPlan

MAX_MESSAGE = 65536


class SandboxError(TetherError):
    """Creating the sandbox failed; ``hint`` says how to fix the machine when we know."""


@dataclass
class SandboxSpec:
    argv: list[str]
    ruleset_for_port: Callable[[int], str]  # nft script, given the capture sockets' port
    net: SandboxNet = field(default_factory=SandboxNet)
    map_root: bool = False
    tty_fd: int | None = None  # the caller's controlling-terminal fd when it is in the foreground
    resolv_conf: str = "nameserver 10.0.2.3\n"
    ipv4: bool = True
    ipv6: bool = True
    listen_fds: list[int] = field(default_factory=list)  # host listening sockets for CMD (--listen)
    listen_names: list[str] = field(default_factory=list)
    plan: NetPlan | None = None  # the netns to build; None: the proxy engine's (capture) plan for ``net``


@dataclass
class Sandbox:
    """What tether holds of a running sandbox.  Closing it releases every fd; the namespaces
    then die with the holder."""

    holder_pid: int
    control: socket.socket
    tun: int
    tcp_listeners: list[socket.socket]  # per family, bound to the loopback inside the netns
    udp_sockets: list[socket.socket]  # TPROXY sockets, per family
    nflog: socket.socket | None  # None without capture (an engine that owns the tun, e.g. WireGuard)
    pidfd: int

    def close(self) -> None:
        for sock in (*self.tcp_listeners, *self.udp_sockets, self.nflog, self.control):
            if sock is not None:
                sock.close()
        for fd in (self.tun, self.pidfd):
            try:
                os.close(fd)
            except OSError:
                pass


def send_message(sock: socket.socket, obj: dict, fds: list[int] = ()) -> None:
    data = json.dumps(obj).encode()
    if fds:
        _sys.send_fds(sock, data, fds)
    else:
        sock.send(data)


def receive_message(sock: socket.socket, maxfds: int = 8) -> tuple[dict, list[int]]:
    data, fds = _sys.recv_fds(sock, MAX_MESSAGE, maxfds)
    if not data:
        for fd in fds:
            os.close(fd)
        raise EOFError("control socket closed")
    return json.loads(data), fds


def spawn(spec: SandboxSpec) -> Sandbox:
    """Start the sandbox and return once its network is ready and CMD is being started."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    _sys.set_child_subreaper()
    pid = os.fork()
    if pid == 0:  # spawner
        parent_end.close()
        code = 1
        try:
            _spawner(spec, child_end)
            code = 0
        except BaseException as exc:  # noqa: BLE001 - everything must reach the parent
            _report_failure(child_end, exc)
        finally:
            os._exit(code)
    child_end.close()
    try:
        msg, fds = receive_message(parent_end)
        if msg.get("want") == "id_maps":
            # Written from here, in the parent user namespace: a process may map only its own
            # uid into a namespace it is inside, and real root wants the full range.
            try:
                _sys.write_id_maps(*_id_maps(spec.map_root), pid=str(pid))
                send_message(parent_end, {"ok": True})
            except OSError as exc:
                send_message(parent_end, {"ok": False, "error": f"cannot write uid/gid maps: {exc.strerror}"})
            msg, fds = receive_message(parent_end)
    except EOFError:
        os.waitpid(pid, 0)
        parent_end.close()
        raise SandboxError("the sandbox spawner exited without reporting") from None
    os.waitpid(pid, 0)
    if "error" in msg:
        parent_end.close()
        for fd in fds:
            os.close(fd)
        raise SandboxError(msg["error"], msg.get("hint"))
    named = dict(zip(msg["fds"], fds, strict=True))
    holder = msg["holder_pid"]
    return Sandbox(
        holder_pid=holder,
        control=parent_end,
        tun=named["tun"],
        tcp_listeners=[socket.socket(fileno=named[k]) for k in ("tcp4", "tcp6") if k in named],
        udp_sockets=[socket.socket(fileno=named[k]) for k in ("udp4", "udp6") if k in named],
        nflog=socket.socket(fileno=named["nflog"]) if "nflog" in named else None,
        pidfd=_sys.pidfd_open(holder),
    )


def _id_maps(map_root: bool) -> tuple[str, str]:
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:
        return "0 0 4294967295\n", "0 0 4294967295\n"
    inside_uid, inside_gid = (0, 0) if map_root else (uid, gid)
    return f"{inside_uid} {uid} 1\n", f"{inside_gid} {gid} 1\n"


def _spawner(spec: SandboxSpec, control: socket.socket) -> None:
    real_root = os.getuid() == 0
    try:
        _sys.unshare(_sys.CLONE_NEWUSER | _sys.CLONE_NEWNS | _sys.CLONE_NEWNET | _sys.CLONE_NEWPID)
    except OSError as exc:
        raise SandboxError(
            f"cannot create the sandbox's user namespaces: {exc.strerror}",
            "enable unprivileged user namespaces: sysctl kernel.unprivileged_userns_clone=1 "
            "and user.max_user_namespaces > 0 (on Ubuntu also "
            "kernel.apparmor_restrict_unprivileged_userns=0)") from None
    send_message(control, {"want": "id_maps"})
    reply, _ = receive_message(control, maxfds=1)
    if not reply.get("ok"):
        raise SandboxError(reply.get("error", "uid/gid maps refused"))
    try:
        plan = spec.plan or NetPlan.for_proxy(spec.net, spec.ipv4, spec.ipv6)
        named = netsetup.configure(plan, spec.ruleset_for_port if plan.capture else None)
    except netsetup.NetSetupError as exc:
        raise SandboxError(str(exc), exc.hint) from None
    _allow_ping_sockets(full_id_range=real_root)
    _allow_low_ports()

    holder = os.fork()
    if holder == 0:
        from tether.ns.holder import run_holder
        netsetup.close_named(named)
        code = 1
        try:
            code = run_holder(spec, control)
        except BaseException as exc:  # noqa: BLE001
            _report_failure(control, exc)
        finally:
            os._exit(code)
    send_message(control, {"holder_pid": holder, "fds": [name for name, _ in named]},
                 [netsetup.fileno(item) for _, item in named])


def _allow_ping_sockets(full_id_range: bool) -> None:
    """Let CMD use unprivileged ICMP sockets inside (``ping`` without CAP_NET_RAW): the new
    netns starts with ``ping_group_range`` = "1 0" (nobody).  Only mapped gids may be named:
    our own (as seen inside), or every gid when the whole range is mapped (real root)."""
    gid = os.getgid()
    last = 2147483647 if full_id_range else gid
    try:
        with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
            f.write(f"{0 if full_id_range else gid} {last}")
    except OSError:
        pass  # best effort: ping with CAP_NET_RAW (setcap'd /usr/bin/ping) still works


def _allow_low_ports() -> None:
    """Let CMD bind any port in its own netns (a server on :80 behind ``-p 8080:80``), as
    container runtimes do: the netns is the sandbox's alone, so a low port there guards nothing."""
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start", "w") as f:
            f.write("0")
    except OSError:
        pass  # best effort: CMD then needs ports >= 1024 (or --root)


def _report_failure(control: socket.socket, exc: BaseException) -> None:
    if isinstance(exc, SandboxError):
        msg = {"error": str(exc), "hint": exc.hint}
    else:
        msg = {"error": f"internal error in sandbox setup: {exc!r}",
               "hint": "".join(traceback.format_exception(exc))[-2000:]}
    try:
        send_message(control, msg)
    except OSError:
        print(f"tether: {msg['error']}", file=sys.stderr)
