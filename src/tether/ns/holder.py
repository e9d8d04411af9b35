"""The holder: pid 1 of a sandbox.

Theory of operation
-------------------
The holder is forked by the spawner right after the network is configured, so it is the first
process of the new pid namespace and keeps every capability of the namespace owner (it never
execs).  It:

1. makes its mount namespace private, mounts a fresh ``/proc`` (for the new pid namespace) and
   ``/sys`` (so the sandbox sees only its own interfaces), and bind-mounts the sandbox's
   ``resolv.conf`` over ``/etc/resolv.conf`` — all in the sandbox's mount namespace only;
2. forks CMD: own process group, handed the terminal's foreground when tether had it (so
   Ctrl-C, Ctrl-\\ and window changes reach CMD, not tether), default signal dispositions, no
   fds but 0, 1 and 2 - and its ``--listen`` sockets at 3, 4, ... with ``LISTEN_*`` set
   (``tether.activation``) - then ``execvp``;
3. loops: reaps every child (orphans of the sandbox are re-parented to pid 1), forwards the
   signals tether relays to it (SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2) to CMD, and
   exits with CMD's status (128+N when CMD died of signal N) as soon as CMD is gone.  When pid 1
   exits the kernel kills whatever else is left in the namespace.
4. Job control: when CMD stops (Ctrl-Z) and tether owns a terminal, the holder tells tether,
   which takes the terminal back and stops itself, so the user's shell sees a stopped job; on
   ``fg`` tether asks the holder to return the terminal to CMD and continue it.
5. If tether dies (the control socket reaches EOF) the holder kills CMD and exits: a sandbox
   never outlives its engine.

The control socket is the holder's link to tether; later issues use it to create sockets
inside the netns on demand.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import sys

from tether import _sys, activation

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def exit_code(status: int) -> int:
    """Shell convention: the exit status, or 128+N for death by signal N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _bind_text_file(text: str, target: str, scratch: str = "/tmp") -> None:
    """Bind a file holding ``text`` over ``target`` in this mount namespace only.

    The file lives on a private tmpfs mounted over ``scratch`` just long enough to bind it,
    then lazily unmounted: the bind keeps the tmpfs alive, ``scratch`` shows its old contents
    again, and nothing is ever written to the host's filesystems.  (A bind from an O_TMPFILE
    fd is refused by the kernel, ENOENT.)
    """
    _sys.mount("tether", scratch, "tmpfs", _sys.MS_NOSUID | _sys.MS_NODEV | _sys.MS_NOEXEC, "size=64k,mode=0755")
    try:
        path = os.path.join(scratch, os.path.basename(target))
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o644)
        _sys.mount(path, target, None, _sys.MS_BIND)
    finally:
        _sys.umount(scratch, _sys.MNT_DETACH)


def _setup_mounts(resolv_conf: str) -> None:
    _sys.make_mounts_private()
    _sys.mount("proc", "/proc", "proc", _sys.MS_NOSUID | _sys.MS_NODEV | _sys.MS_NOEXEC)
    try:
        _sys.mount("sysfs", "/sys", "sysfs", _sys.MS_NOSUID | _sys.MS_NODEV | _sys.MS_NOEXEC | _sys.MS_RDONLY)
    except OSError:
        pass  # best effort: a locked-down /sys (e.g. inside a container) stays the host's view
    if os.path.exists("/etc/resolv.conf"):
        _bind_text_file(resolv_conf, "/etc/resolv.conf")


def _exec_command(argv: list[str], tty_fd: int | None, listen_fds: list[int], listen_names: list[str]) -> None:
    """In the forked child: become CMD, with its --listen sockets at fds 3... .  Never returns."""
    try:
        os.setpgid(0, 0)
        if tty_fd is not None:
            signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            try:
                os.tcsetpgrp(tty_fd, os.getpgrp())
            except OSError:
                pass
        for sig in (*FORWARDED_SIGNALS, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTTOU, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        env = activation.hand_over(listen_fds, listen_names, os.environ)
        _sys.close_fds_above(activation.FIRST_FD + len(listen_fds))
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        code = 127 if exc.errno in (errno.ENOENT, errno.ENOTDIR) else 126
        what = "command not found" if code == 127 else exc.strerror
        os.write(2, f"tether: {argv[0]}: {what}\n".encode())
        os._exit(code)
    except BaseException:  # noqa: BLE001
        os._exit(126)


def run_holder(spec, control: socket.socket) -> int:
    """Main loop of pid 1; returns the sandbox's exit code."""
    # Inside the sandbox, hold nothing of the host but the control socket (not the audit log,
    # not fds tether inherited): a CMD with --root could ptrace the holder and use them.
    _sys.close_fds_above(3, keep=(control.fileno(), *spec.listen_fds))
    _setup_mounts(spec.resolv_conf)

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    pending: list[int] = []
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, lambda signum, _frame: pending.append(signum))
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # we hand the terminal around from the background
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)  # blocked by tether until now

    cmd = os.fork()
    if cmd == 0:
        control.close()
        _exec_command(spec.argv, spec.tty_fd, spec.listen_fds, spec.listen_names)
    for fd in spec.listen_fds:  # CMD has them; pid 1 keeps no copy
        os.close(fd)

    while True:
        for signum in pending:
            try:
                os.kill(cmd, signum)
            except ProcessLookupError:
                pass
        pending.clear()
        # Reap everything: CMD and any orphan re-parented to us.
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG | os.WUNTRACED)
            except ChildProcessError:
                return 0
            if pid == 0:
                break
            if pid == cmd and os.WIFSTOPPED(status):
                if spec.tty_fd is not None:  # Ctrl-Z: tether stops too, so the shell gets the tty back
                    _send(control, {"stopped": os.WSTOPSIG(status)})
            elif pid == cmd:
                return exit_code(status)
        try:
            readable, _, _ = select.select([wake_r, control], [], [])
        except InterruptedError:
            continue
        if wake_r in readable:
            try:
                os.read(wake_r, 512)
            except BlockingIOError:
                pass
        if control in readable:
            try:
                data = control.recv(65536)
            except OSError:
                data = b""
            if not data:  # tether is gone: the sandbox goes with it
                os.kill(cmd, signal.SIGKILL)
                print("tether: engine exited; stopping the sandbox", file=sys.stderr)
                return 137
            _on_request(data, cmd, spec.tty_fd, control)


def _send(control: socket.socket, message: dict) -> None:
    try:
        control.send(json.dumps(message).encode())
    except OSError:
        pass


BLANK_SOCKETS_MAX = 8  # per request: what tether's receive_message takes in one message


def _make_blank_sockets(control: socket.socket, want: dict) -> None:
    """Sockets of this netns, not yet bound, for published ports' clients: tether binds and
    connects them itself (a socket keeps the netns it was made in), so a connection costs no
    round trip to pid 1."""
    made: list[socket.socket] = []
    try:
        family = socket.AF_INET6 if want["family"] == 6 else socket.AF_INET
        kind = socket.SOCK_DGRAM if want["kind"] == "udp" else socket.SOCK_STREAM
        for _ in range(max(1, min(int(want["count"]), BLANK_SOCKETS_MAX))):
            made.append(socket.socket(family, kind | socket.SOCK_NONBLOCK))
        _sys.send_fds(control, json.dumps({"reply": "blank", "ok": True}).encode(), [s.fileno() for s in made])
    except (OSError, KeyError, TypeError, ValueError) as exc:
        _send(control, {"reply": "blank", "ok": False, "reason": getattr(exc, "strerror", None) or str(exc)})
    finally:
        for sock in made:
            sock.close()


def _on_request(data: bytes, cmd: int, tty_fd: int | None, control: socket.socket) -> None:
    """Requests from tether.  ``continue``: tether was resumed after a Ctrl-Z; give CMD the
    terminal back when tether is the foreground job again (``fg``, not ``bg``), then SIGCONT.
    ``nft``: a new capture ruleset (``tether ctl NAME policy reload``), applied as one
    transaction in the sandbox's netns.  ``blank``: sockets of the sandbox's netns for published
    ports' clients, sent back with SCM_RIGHTS.  Both are answered, in order, with
    ``{"reply": KIND, "ok": bool, ...}``."""
    try:
        request = json.loads(data)
    except ValueError:
        return
    if "nft" in request:
        try:
            nft = _sys.Nftables()
            try:
                nft.run(request["nft"])
            finally:
                nft.close()
            _send(control, {"reply": "nft", "ok": True})
        except OSError as exc:
            _send(control, {"reply": "nft", "ok": False, "reason": exc.strerror or str(exc)})
        return
    if "blank" in request:
        _make_blank_sockets(control, request["blank"])
        return
    if request.get("continue"):
        if tty_fd is not None and request.get("foreground"):
            try:
                os.tcsetpgrp(tty_fd, cmd)
            except OSError:
                pass
        try:
            os.killpg(cmd, signal.SIGCONT)
        except ProcessLookupError:
            pass
