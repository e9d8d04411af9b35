"""Run a job inside a container's network namespace, from the daemon's event loop.

Theory of operation
-------------------
``setns()`` must never run in the daemon itself: the daemon dials every allowed connection from
its own netns, and it runs an event loop.  So each job runs in a *forked helper*: a child that is
single-threaded by construction, joins the target netns (``CLONE_NEWNET`` only: root in the
initial user namespace holds CAP_NET_ADMIN over every netns, rootless containers' included, so it
never joins their user namespace), runs the job, sends the result and the fds it opened back over
a SEQPACKET socketpair (SCM_RIGHTS) and exits.  A socket or tun opened in there keeps belonging
to that netns wherever its fd goes.  The daemon's loop only waits for one readable socket: a
slow helper delays nothing else, and one that hangs is killed after ``timeout``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable

from tether import _sys
from tether.errors import TetherError
from tether.ns.spawn import receive_message, send_message

HELPER_TIMEOUT = 10.0
MAX_FDS = 16

Job = Callable[[], tuple[dict, list[int]]]


class EnterError(TetherError):
    """The helper failed; the message is the job's own error."""


async def run_in_netns(netns_fd: int, job: Job, timeout: float = HELPER_TIMEOUT) -> tuple[dict, list[int]]:
    """Run ``job`` in the netns of ``netns_fd``; its result and fds (the caller's to close)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the helper: never returns
        ours.close()
        _helper(netns_fd, job, theirs)
    theirs.close()
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[None] = loop.create_future()
    loop.add_reader(ours.fileno(), lambda: answered.done() or answered.set_result(None))
    try:
        await asyncio.wait_for(answered, timeout)
        message, fds = receive_message(ours, MAX_FDS)
    except (TimeoutError, asyncio.TimeoutError):
        os.kill(pid, signal.SIGKILL)
        raise EnterError(f"the netns helper did not finish within {timeout:g} s") from None
    except EOFError:
        raise EnterError("the netns helper exited without an answer") from None
    finally:
        loop.remove_reader(ours.fileno())
        ours.close()
        _reap(pid)
    if "error" in message:
        for fd in fds:
            os.close(fd)
        raise EnterError(message["error"], message.get("hint"))
    return message, fds


def _helper(netns_fd: int, job: Job, channel: socket.socket) -> None:
    code = 0
    try:
        signal.set_wakeup_fd(-1)  # the daemon's loop owns the one it set
        _sys.setns(netns_fd, _sys.CLONE_NEWNET)
        result, fds = job()
        send_message(channel, result, fds)
    except BaseException as exc:  # noqa: BLE001 - everything must reach the daemon
        code = 1
        message = {"error": str(exc) if isinstance(exc, (TetherError, OSError)) else
                   f"internal error in the netns helper: {exc!r}", "hint": getattr(exc, "hint", None)}
        if not isinstance(exc, (TetherError, OSError)):
            message["hint"] = "".join(traceback.format_exception(exc))[-1500:]
        try:
            send_message(channel, message)
        except OSError:
            print(f"tether: {message['error']}", file=sys.stderr)
    finally:
        os._exit(code)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
