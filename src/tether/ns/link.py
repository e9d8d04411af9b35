"""tether's requests to the holder (pid 1 of the sandbox), and their answers.

The holder serves requests on its control socket one at a time, in the order they came, and
answers each with ``{"reply": KIND, "ok": bool, ...}`` (fds, if any, with SCM_RIGHTS).  So a FIFO
of callbacks is all the bookkeeping needed: the oldest waiting callback gets the next reply.
When the sandbox ends, every request still waiting is answered ``ok: False`` - no caller (a
``tether ctl`` client, a published port's client) waits forever.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Callable

from tether.ns.spawn import send_message

OnReply = Callable[[dict, list[int]], None]


class HolderLink:
    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self._waiting: deque[OnReply] = deque()

    def request(self, message: dict, on_reply: OnReply) -> None:
        """Send ``message``; ``on_reply(reply, fds)`` is called with its answer (it owns the fds)."""
        try:
            send_message(self.control, message)
        except OSError as exc:
            on_reply({"reply": "?", "ok": False, "reason": f"the sandbox is gone ({exc.strerror or exc})"}, [])
            return
        self._waiting.append(on_reply)

    def dispatch(self, message: dict, fds: list[int]) -> bool:
        """Hand a reply to its waiting callback; False if ``message`` is no reply (or unasked)."""
        if "reply" not in message or not self._waiting:
            return False
        self._waiting.popleft()(message, fds)
        return True

    def close(self, reason: str = "the sandbox ended") -> None:
        while self._waiting:
            self._waiting.popleft()({"reply": "?", "ok": False, "reason": reason}, [])


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
