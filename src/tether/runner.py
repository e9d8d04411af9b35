"""``tether run``: validate, spawn the sandbox, serve its engine until CMD exits, clean up.

Ownership: ``run()`` owns the Sandbox (fds + holder process), the engine and the audit sink,
and releases all three on every exit path (normal exit, CMD crash, signals, engine error).  The
namespaces are anonymous: once the holder has exited and these fds are closed, nothing of the
sandbox remains on the host.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import sys
import time
from datetime import UTC, datetime
from dataclasses import dataclass, field
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TextIO

from tether import _sys, activation, runtime
from tether.audit import Audit
from tether.errors import TetherError
from tether.net.nft import TABLE, SandboxNet, compile_ruleset
from tether.net.rtnl import Rtnl
from tether.ns.holder import FORWARDED_SIGNALS, exit_code
from tether.ns.link import HolderLink, close_fds
from tether.ns.spawn import Sandbox, SandboxSpec, receive_message, send_message, spawn
from tether.policy import Policy, build_policy, load_policy_file
from tether.hostsock import HostSocketError
from tether.publish import PublishError, open_host_sockets, parse_publish
from tether.runtime import RuntimeDirError

if TYPE_CHECKING:
    from tether.sandbox_control import SandboxControl
    from tether.engine.proxy.engine import ProxyEngine

EXIT_USAGE = 2


class RunError(TetherError):
    """Refused before anything started; exit code 2."""


@dataclass
class RunOptions:
    argv: list[str]
    allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)
    default: str | None = None
    policy_file: str | None = None
    allow_host: list[int] = field(default_factory=list)
    log: str | None = None
    mtu: int = 65520
    connect_timeout: float = 10.0
    dns: list[str] = field(default_factory=list)
    dns_deny: str = "refused"
    dns_passthrough: bool = False
    udp_timeout: float = 60.0
    ipv4_only: bool = False
    ipv6_only: bool = False
    map_root: bool = False
    name: str | None = None
    listen: list[str] = field(default_factory=list)
    publish: list[str] = field(default_factory=list)
    wireguard: str | None = None
    verbose: bool = False


def check_prerequisites() -> None:
    """One clear message per missing piece, before any process is forked."""
    switches = [("/proc/sys/user/max_user_namespaces", "0", "user namespaces are disabled on this machine",
                 "sysctl -w user.max_user_namespaces=15000")]
    if os.getuid() != 0:
        switches += [
            ("/proc/sys/kernel/unprivileged_userns_clone", "0", "unprivileged user namespaces are disabled",
             "sysctl -w kernel.unprivileged_userns_clone=1"),
            ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1",
             "AppArmor restricts unprivileged user namespaces", "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"),
        ]
    for path, bad, message, hint in switches:
        try:
            with open(path) as f:
                if f.read().strip() == bad:
                    raise RunError(message, hint)
        except FileNotFoundError:
            pass
    if not os.path.exists("/dev/net/tun"):
        raise RunError("/dev/net/tun is missing (no tun support)", "modprobe tun")
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        raise RunError("no access to /dev/net/tun", "chmod 0666 /dev/net/tun (the default on most distributions)")
    if not _sys.nftables_available():
        raise RunError("libnftables is not installed", "apt-get install nftables")


def _build_policy(opts: RunOptions) -> Policy:
    from tether.policy import PolicyFileError, RuleError
    try:
        spec = load_policy_file(opts.policy_file) if opts.policy_file else None
        with Rtnl() as rtnl:
            host_addresses = rtnl.addresses()
        return build_policy(spec, opts.allow, opts.deny, opts.default, host_addresses)
    except (RuleError, PolicyFileError) as exc:
        raise RunError(str(exc)) from None
    except OSError as exc:
        raise RunError(f"cannot read policy file: {exc}") from None


def _open_log(path: str | None) -> TextIO | None:
    if path is None:
        return None
    if path == "-":
        return sys.stderr
    try:
        return open(path, "a", buffering=1)
    except OSError as exc:
        raise RunError(f"cannot open audit log {path}: {exc.strerror}") from None


def host_resolvers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The host's resolvers (``nameserver`` lines), which the DNS stub forwards to."""
    found = []
    try:
        with open(path) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "nameserver":
                    try:
                        found.append((str(ipaddress.ip_address(fields[1].split("%")[0])), 53))
                    except ValueError:
                        continue
    except OSError:
        pass
    return found


def _dns_upstreams(opts: RunOptions) -> list[tuple[str, int]]:
    upstreams = []
    for text in opts.dns:
        try:
            upstreams.append((str(ipaddress.ip_address(text)), 53))
        except ValueError:
            raise RunError(f"bad --dns {text!r}: not an IP address") from None
    return upstreams or host_resolvers()


WIREGUARD_EXCLUDES = (("allow", "--allow"), ("deny", "--deny"), ("default", "--default"),
                      ("policy_file", "--policy"), ("allow_host", "--allow-host"), ("dns", "--dns"),
                      ("dns_passthrough", "--dns-passthrough"), ("publish", "-p/--publish"))


def _prepare_wireguard(opts: RunOptions):
    """``--wireguard FILE``: the sandbox's only way out is the tunnel, so the proxy's policy options
    mean nothing there and are refused; the file is read and its endpoints resolved now."""
    from tether.engine.wireguard.setup import WireGuardSetupError, prepare

    given = [flag for attr, flag in WIREGUARD_EXCLUDES if getattr(opts, attr)]
    if given:
        raise RunError(f"--wireguard sends everything through the tunnel; {', '.join(given)} "
                       f"{'does' if len(given) == 1 else 'do'} not apply to it")
    try:
        return prepare(opts.wireguard)
    except WireGuardSetupError as exc:
        raise RunError(str(exc), exc.hint) from None


def _foreground_tty() -> int | None:
    """The fd of our controlling terminal if we are its foreground job (CMD then takes it)."""
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                return fd
        except OSError:
            continue
    return None


def run(opts: RunOptions) -> int:
    if not opts.argv:
        raise RunError("no command given", "usage: tether run [OPTIONS] -- CMD [ARGS...]")
    for port in opts.allow_host:
        if not 1 <= port <= 65535:
            raise RunError(f"bad --allow-host port {port}: must be 1-65535")
    if not 576 <= opts.mtu <= 65520:
        raise RunError(f"bad --mtu {opts.mtu}: must be 576-65520")
    if opts.ipv4_only and opts.ipv6_only:
        raise RunError("--ipv4-only and --ipv6-only exclude each other")
    name = opts.name or f"sbx-{os.getpid()}"
    try:
        runtime.check_name(name)
    except RuntimeDirError as exc:
        raise RunError(f"bad --name: {exc}", exc.hint) from None
    try:
        listens = [activation.parse_listen(text) for text in opts.listen]
        publishes = [p for text in opts.publish for p in parse_publish(text)]
    except (activation.ListenError, PublishError) as exc:
        raise RunError(str(exc), exc.hint) from None
    wireguard = _prepare_wireguard(opts) if opts.wireguard else None
    policy = _build_policy(opts) if wireguard is None else Policy(allow=[], deny=[], default="deny")
    upstreams = _dns_upstreams(opts) if wireguard is None else []
    check_prerequisites()
    net = SandboxNet(mtu=opts.mtu)
    ipv4, ipv6 = not opts.ipv6_only, not opts.ipv4_only
    resolv_conf = "".join(f"nameserver {server}\n" for enabled, server in ((ipv4, net.dns), (ipv6, net.dns6))
                          if enabled) if wireguard is None else wireguard.resolv_conf
    rules = policy.ordered_rules()
    dns_to_stub = not opts.dns_passthrough
    ruleset = compile_ruleset(rules, policy.default, 0, opts.allow_host, net, dns_to_stub)
    sink = _open_log(opts.log)
    audit = Audit(name, sink)
    try:
        claim = runtime.claim(runtime.ensure_runtime_dir(runtime.runtime_dir(), allowed=runtime.allowed_mode()), name)
        try:
            listener = claim.listen()
        except RuntimeDirError:
            claim.release()
            raise
    except RuntimeDirError as exc:
        audit.close()
        raise RunError(str(exc), exc.hint) from None
    try:
        served = activation.open_listeners(listens)
        try:
            published = open_host_sockets(publishes)
        except HostSocketError:
            for sock in served:
                sock.close()
            raise
    except HostSocketError as exc:
        audit.close()
        listener.close()
        claim.release()
        raise RunError(str(exc), exc.hint) from None
    tty_fd = _foreground_tty()
    spec = SandboxSpec(
        argv=opts.argv,
        ruleset_for_port=lambda port: compile_ruleset(rules, policy.default, port, opts.allow_host, net,
                                                      dns_to_stub).script,
        net=net,
        map_root=opts.map_root,
        tty_fd=tty_fd,
        resolv_conf=resolv_conf,
        ipv4=ipv4,
        ipv6=ipv6,
        listen_fds=[sock.fileno() for sock in served],
        listen_names=[listen.name for listen in listens],
        plan=wireguard.plan if wireguard else None,
    )
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # we write to the tty while CMD owns it
    _sys.raise_fd_limit()
    # Signals that must reach CMD stay pending (not lost, not fatal to tether) until the event
    # loop's handlers forward them; the holder unblocks them once its own handlers are in place.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    tunnel = None
    try:
        tunnel = wireguard.start() if wireguard is not None else None  # its UDP socket in the host netns
        sandbox = spawn(spec)
    except TetherError as exc:  # SandboxError, or the tunnel's socket
        audit.close()
        listener.close()
        claim.release()
        for _, sock in published:
            sock.close()
        if tunnel is not None:
            tunnel.close()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
        raise RunError(str(exc), exc.hint) from None
    finally:
        for sock in served:  # CMD holds them now: tether never accepts on them
            sock.close()
    if opts.verbose:
        print(f"tether: sandbox {name} started (holder pid {sandbox.holder_pid}; "
              f"control socket {claim.socket_path})", file=sys.stderr)
    started, started_at = time.monotonic(), datetime.now(UTC)
    try:
        # Imported only now: asyncio and the engine (~30 ms of imports) load while the spawner
        # and the holder set the sandbox up on the other core.
        from tether.sandbox_control import SandboxControl, SandboxInfo

        link = HolderLink(sandbox.control)
        if wireguard is not None:
            assert tunnel is not None
            engine = tunnel.engine(sandbox.tun)
        else:
            from tether.engine.proxy.engine import DnsSettings, ProxyEngine

            dns = DnsSettings(upstreams, "NXDOMAIN" if opts.dns_deny == "nxdomain" else "REFUSED",
                              opts.dns_passthrough)
            engine = ProxyEngine(tcp_listeners=sandbox.tcp_listeners, udp_sockets=sandbox.udp_sockets,
                                 nflog_sock=sandbox.nflog, tun=sandbox.tun, policy=policy, ruleset=ruleset,
                                 audit=audit, allow_host_ports=frozenset(opts.allow_host), net=net, dns=dns,
                                 link=link, families=tuple(f for f, on in ((4, ipv4), (6, ipv6)) if on),
                                 connect_timeout=opts.connect_timeout, udp_timeout=opts.udp_timeout)
            engine.inbound.add(published)
        info = SandboxInfo(name, sandbox.holder_pid, list(opts.argv), opts.policy_file, started, started_at)
        current = [policy]
        control = SandboxControl(info, engine, audit, lambda: current[0],
                                 stop=lambda timeout: _stop_sandbox(sandbox, timeout),
                                 reload=_policy_reloader(opts, net, sandbox, engine, current, link))
        return _run_event_loop(_serve(sandbox, engine, tty_fd, listener, control, link))
    finally:
        _reap(sandbox.holder_pid)
        sandbox.close()
        if tunnel is not None:
            tunnel.close()
        audit.close()
        listener.close()
        claim.release()
        if tty_fd is not None:
            try:
                os.tcsetpgrp(tty_fd, os.getpgrp())
            except OSError:
                pass


def _stop_with_command(sandbox: Sandbox, tty_fd: int | None) -> None:
    """CMD was stopped from the terminal (Ctrl-Z): stop tether too, so the shell regains the
    terminal and lists a stopped job; when continued, resume CMD (with the terminal on ``fg``)."""
    if tty_fd is None:
        return
    try:
        os.tcsetpgrp(tty_fd, os.getpgrp())
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGSTOP)  # returns once the shell sends SIGCONT
    try:
        foreground = os.tcgetpgrp(tty_fd) == os.getpgrp()
    except OSError:
        foreground = False
    send_message(sandbox.control, {"continue": True, "foreground": foreground})


def _run_event_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on uvloop when it is installed, else on asyncio's own loop.  libuv's loop costs
    a fraction of asyncio's per wake-up, and a datagram relay pays a wake-up per direction of
    every round trip (UDP echo p50 on the benchmark: ~105 -> ~88 µs)."""
    try:
        import uvloop
    except ImportError:
        import asyncio

        return asyncio.run(main)
    return uvloop.run(main)


def _stop_sandbox(sandbox: Sandbox, timeout: float) -> None:
    """``tether ctl NAME stop``: SIGTERM to CMD (through the holder), SIGKILL to the holder - and
    with it the whole pid namespace - if the sandbox is still there after ``timeout`` seconds."""
    import asyncio

    def kill(sig: int) -> None:
        try:
            os.kill(sandbox.holder_pid, sig)
        except ProcessLookupError:
            pass

    kill(signal.SIGTERM)
    asyncio.get_running_loop().call_later(timeout, kill, signal.SIGKILL)


MAX_RULESET_MESSAGE = 60000  # the holder reads one SEQPACKET message of up to 64 KiB


def _policy_reloader(opts: RunOptions, net: SandboxNet, sandbox: Sandbox, engine: ProxyEngine,
                     current: list[Policy], link: HolderLink) -> Callable:
    """``tether ctl NAME policy reload``: re-read ``--policy FILE`` (with the same command-line
    rules), have the holder swap the sandbox's capture ruleset in one nft transaction, then switch
    the engine.  Kernel first: in between, the old engine policy only ever sees what the new
    kernel rules let through, and refuses what it denies.  Live connections are kept."""

    def reload(done: Callable[[dict | None, tuple[str, str] | None], None]) -> None:
        from tether import wire
        from tether.control import MethodError

        if not opts.policy_file:
            raise MethodError(wire.CONFLICT, "this sandbox was started without --policy FILE: nothing to reload")
        try:
            new = _build_policy(opts)
        except RunError as exc:
            raise MethodError(wire.INVALID_CONFIG, f"{exc} (the current policy stays)") from None
        port = sandbox.tcp_listeners[0].getsockname()[1]
        ruleset = compile_ruleset(new.ordered_rules(), new.default, port, opts.allow_host, net,
                                  not opts.dns_passthrough)
        script = f"delete table inet {TABLE}\n{ruleset.script}"
        if len(script) > MAX_RULESET_MESSAGE:
            raise MethodError(wire.INVALID_CONFIG, f"the new ruleset is {len(script)} bytes; at most "
                                                   f"{MAX_RULESET_MESSAGE} can be handed to the sandbox")

        def applied(reply: dict, fds: list[int]) -> None:
            close_fds(fds)
            if not reply.get("ok"):
                done(None, (wire.INTERNAL, f"the sandbox refused the new ruleset: {reply.get('reason')} "
                                           "(the current policy stays)"))
                return
            current[0] = new
            engine.set_policy(new, ruleset)
            done({"default": new.default, "rules": len(new.ordered_rules()), "file": opts.policy_file}, None)

        link.request({"nft": script}, applied)

    return reload


async def _serve(sandbox: Sandbox, engine: ProxyEngine, tty_fd: int | None, listener: socket.socket,
                 control: SandboxControl, link: HolderLink) -> int:
    import asyncio

    from tether import __version__
    from tether.control import ControlServer

    loop = asyncio.get_running_loop()
    finished: asyncio.Future[int] = loop.create_future()
    failure: list[str] = []

    def forward(sig: int) -> None:
        try:
            os.kill(sandbox.holder_pid, sig)
        except ProcessLookupError:
            pass

    def on_holder_exit() -> None:
        loop.remove_reader(sandbox.pidfd)
        try:
            _, status = os.waitpid(sandbox.holder_pid, 0)
        except ChildProcessError:
            status = 1 << 8
        if not finished.done():
            finished.set_result(exit_code(status))

    def on_control() -> None:
        if not _read_holder_message(sandbox, tty_fd, failure, link):
            loop.remove_reader(sandbox.control.fileno())

    for sig in FORWARDED_SIGNALS:
        loop.add_signal_handler(sig, forward, sig)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    loop.add_reader(sandbox.pidfd, on_holder_exit)
    loop.add_reader(sandbox.control.fileno(), on_control)
    engine.start()
    server = ControlServer(listener, control.methods(), {os.getuid(), 0}, f"tether {__version__}")
    server.start()
    try:
        code = await finished
        await engine.drain()
    finally:
        server.close()
        engine.close()
        loop.remove_reader(sandbox.control.fileno())
        for sig in FORWARDED_SIGNALS:
            loop.remove_signal_handler(sig)
    sandbox.control.setblocking(False)  # an error the holder reported just before exiting
    _read_holder_message(sandbox, tty_fd, failure, link)
    link.close()
    if failure:
        print(f"tether: {failure[0]}", file=sys.stderr)
        return EXIT_USAGE
    return code


def _read_holder_message(sandbox: Sandbox, tty_fd: int | None, failure: list[str], link: HolderLink) -> bool:
    """Handle one message from the holder (an error, CMD stopped by Ctrl-Z, or the answer to a
    request, in order); False when there is none to read any more (EOF, or nothing pending on a
    non-blocking socket)."""
    try:
        msg, fds = receive_message(sandbox.control)
    except (EOFError, OSError, ValueError):  # OSError includes BlockingIOError
        return False
    if link.dispatch(msg, fds):
        return True
    if "error" in msg:
        failure.append(msg["error"] + (f"\n  hint: {msg['hint']}" if msg.get("hint") else ""))
    elif "stopped" in msg:
        _stop_with_command(sandbox, tty_fd)
    close_fds(fds)  # nobody asked for them
    return True


def _reap(pid: int) -> None:
    """Make sure the holder is gone (it is, unless the engine itself failed)."""
    try:
        if os.waitpid(pid, os.WNOHANG) == (0, 0):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    except (ChildProcessError, ProcessLookupError):
        pass
