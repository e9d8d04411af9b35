"""``tether attach`` (inside a container) and ``tether oci-hook`` (on the host, run by runc/crun).

Theory of operation: ``tether attach``
--------------------------------------
1. Send this process's netns (``/proc/self/ns/net``) and a pidfd of itself to the container's
   socket with ``attach``.  The daemon answers with an ``event`` ``{"configured": {...}}`` once
   the netns has its tun, routes and capture rules, and keeps the request open: its final
   response ``{"ended": REASON, "reconnect": BOOL}`` comes when the session ends.
2. With a CMD: fork a *watchdog* (double fork: it is nobody's zombie) that keeps the connection
   and a pidfd of this process, then ``exec`` CMD - same pid, so the pidfd the daemon got now
   watches CMD.  The watchdog exits when CMD does (the connection closes: the daemon tears the
   session down).  If the daemon restarts (EOF) or asks for it (``reconnect``: the config changed
   the container's shape), the watchdog reconnects with backoff and attaches again; the app only
   sees a pause for new connections.  Without CMD, ``attach`` is itself the watchdog, in the
   foreground, until SIGINT/SIGTERM.
3. Nothing of the host is needed: the socket is the identity (bind-mounted into the container).

``/etc/resolv.conf`` is the container's business: point it at the DNS stub, ``nameserver
10.0.2.3`` (and ``fd00:7e7e::3``), to have domain rules apply.

Theory of operation: ``tether oci-hook``
----------------------------------------
Reads the OCI state JSON on stdin.  ``createRuntime`` (runc reports status ``creating``, crun
``created``; both give the container's host pid): open ``/proc/PID/ns/net`` and a pidfd of PID,
``attach`` with lifetime ``process`` (the session lives until PID exits or ``detach``), exit 0
once configured.  ``poststop`` (status ``stopped``): ``detach``.  Any failure exits non-zero
with one line on stderr, so the runtime refuses to start a container that would run without its
network policy.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from tether import __version__, _sys
from tether.control import ControlClient, ControlError
from tether.errors import TetherError

SOFTWARE = f"tether-attach {__version__}"
CONNECT_TIMEOUT = 10.0
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 2.0


class AttachError(TetherError):
    """The daemon refused or could not be reached; exit 1 with the message."""


def socket_path(runtime_dir: str, name: str | None, socket: str | None) -> Path:
    if socket:
        return Path(socket)
    if not name:
        raise AttachError("say which container: --socket PATH or --name NAME")
    from tether.runtime import check_name
    return Path(runtime_dir) / f"{check_name(name)}.sock"


def request_attach(path: Path, netns_fd: int, pidfd: int, lifetime: str,
                   timeout: float | None = CONNECT_TIMEOUT) -> tuple[ControlClient, int, dict]:
    """Connect, attach, wait until configured: the client, the request id, the description."""
    try:
        client = ControlClient(path, SOFTWARE, timeout=timeout)
    except ControlError as exc:
        raise AttachError(f"cannot reach the tether daemon at {path}: {exc.message}",
                          "is tether serve running, and this socket bind-mounted into the container?") from None
    try:
        request_id = client.request("attach", {"lifetime": lifetime}, [netns_fd, pidfd])
        for message in client.replies(request_id):
            if message.type == "event" and isinstance((message.event or {}).get("configured"), dict):
                return client, request_id, message.event["configured"]
            if message.type == "response":
                raise AttachError(f"the daemon ended the session at once: {message.result}")
        raise AttachError("the daemon closed the connection before configuring the network")
    except ControlError as exc:
        client.close()
        raise AttachError(f"attach refused: {exc.message} ({exc.code})") from None
    except BaseException:
        client.close()
        raise


def attach(path: Path, argv: list[str], quiet: bool = False) -> int:
    """``tether attach``: configure this netns, then exec ``argv`` (or hold it until signalled)."""
    stop_read, stop_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    if not argv:
        # Before anything is announced: a SIGTERM right after "configured" must end us cleanly.
        signal.set_wakeup_fd(stop_write)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
    netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    me = _sys.pidfd_open(os.getpid())
    client, request_id, described = request_attach(path, netns, me, "connection")
    if not quiet:
        print(f"tether: {described['name']}: network configured ({described['interface']}, "
              f"{', '.join(described['addresses'])}; engine {described['engine']})", file=sys.stderr)
    if not argv:
        return _watch(path, client, request_id, netns, me, stop_read)
    first = os.fork()
    if first == 0:
        try:
            if os.fork() == 0:
                os.setsid()
                _sys.close_fds_above(3, keep=(client.sock.fileno(), netns, me, stop_read, stop_write))
                os._exit(_watch(path, client, request_id, netns, me, stop_read))
        finally:
            os._exit(0)
    os.waitpid(first, 0)
    client.sock.close()
    for fd in (me, netns, stop_read, stop_write):
        os.close(fd)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"tether: {argv[0]}: {exc.strerror}", file=sys.stderr)
        return 127 if exc.errno == 2 else 126


def _watch(path: Path, client: ControlClient, request_id: int, netns: int, app: int, stop: int) -> int:
    """Hold the session while ``app`` (a pidfd) lives and ``stop`` (a pipe the signal handlers
    write to) stays empty; reconnect when the daemon goes away."""
    delay = BACKOFF_FIRST
    while True:
        reconnect, reason, failed = _hold(client, request_id, app, stop)
        client.close()
        if reconnect is None:  # the app exited or we were told to stop: the daemon tears down
            return 0
        if not reconnect:
            print(f"tether: session ended: {reason}", file=sys.stderr)
            return 1 if failed else 0
        while True:
            if _wait(app, stop, delay):
                return 0
            try:
                client, request_id, _ = request_attach(path, netns, app, "connection")
                print("tether: reattached to the daemon", file=sys.stderr)
                delay = BACKOFF_FIRST
                break
            except AttachError as exc:
                reason = str(exc)
                delay = min(BACKOFF_MAX, delay * 2)


def _hold(client: ControlClient, request_id: int, app: int, stop: int) -> tuple[bool | None, str, bool]:
    """Wait for the end: (None, ...) when the app exits or we are stopped; else whether to
    reconnect, why, and whether the session failed."""
    client.settimeout(None)
    replies = client.replies(request_id)
    while True:
        readable = _select([client.sock, app, stop])
        if app in readable or stop in readable:
            return None, "", False
        try:
            message = next(replies)
        except (ControlError, StopIteration) as exc:
            return True, str(exc) or "the daemon went away", False
        if message.type == "response":
            result = message.result if isinstance(message.result, dict) else {}
            return bool(result.get("reconnect")), str(result.get("ended", "ended")), bool(result.get("failed"))


def _select(fds: list) -> list:
    while True:
        try:
            return select.select(fds, [], [])[0]
        except InterruptedError:
            continue


def _wait(app: int, stop: int, seconds: float) -> bool:
    """Sleep ``seconds``; True if the app exited or we were stopped meanwhile."""
    readable, _, _ = select.select([app, stop], [], [], seconds)
    return bool(readable)


# ---------------------------------------------------------------------------------------------
# OCI hook


@dataclass(frozen=True)
class OciState:
    status: str
    pid: int | None
    id: str
    bundle: str


class OciStateError(TetherError):
    """The hook's stdin is not an OCI state document."""


def parse_state(text: str | bytes) -> OciState:
    """The fields of the OCI runtime state (runtime-spec ``state``) the hook needs."""
    try:
        state = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise OciStateError(f"the OCI state on stdin is not JSON: {exc or 'nested too deeply'}") from None
    if not isinstance(state, dict):
        raise OciStateError("the OCI state on stdin is not a JSON object")
    status, pid, ident, bundle = state.get("status"), state.get("pid"), state.get("id"), state.get("bundle", "")
    if not isinstance(status, str) or not status:
        raise OciStateError('the OCI state has no "status"')
    if not isinstance(ident, str) or not ident:
        raise OciStateError('the OCI state has no "id"')
    if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool) or pid < 0):
        raise OciStateError(f'the OCI state\'s "pid" is not a process id: {pid!r}')
    return OciState(status, pid or None, ident, bundle if isinstance(bundle, str) else "")


CREATE_STATUSES = ("creating", "created")
STOP_STATUSES = ("stopped",)


def oci_hook(path: Path, stdin: bytes) -> str:
    """Run the hook for the state on ``stdin``; a one-line report (AttachError on failure)."""
    state = parse_state(stdin)
    if state.status in CREATE_STATUSES:
        if state.pid is None:
            raise OciStateError(f"container {state.id}: the OCI state has no pid (status {state.status})")
        try:
            netns = os.open(f"/proc/{state.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise AttachError(f"container {state.id}: cannot open the netns of pid {state.pid}: {exc.strerror}") from None
        try:
            pidfd = _sys.pidfd_open(state.pid)
        except OSError as exc:
            os.close(netns)
            raise AttachError(f"container {state.id}: pid {state.pid}: {exc.strerror}") from None
        try:
            client, _, described = request_attach(path, netns, pidfd, "process")
            client.close()
        finally:
            os.close(netns)
            os.close(pidfd)
        return f"container {state.id}: attached as {described['name']} ({described['interface']})"
    if state.status in STOP_STATUSES:
        try:
            with ControlClient(path, SOFTWARE, timeout=CONNECT_TIMEOUT) as client:
                result = client.call("detach")
        except ControlError as exc:
            raise AttachError(f"container {state.id}: detach failed: {exc.message}") from None
        return f"container {state.id}: " + ("detached" if result.get("detached") else "had no session")
    raise OciStateError(f"container {state.id}: nothing to do for status {state.status!r} "
                        "(use the hook for createRuntime and poststop)")

