"""Keep one engine process of a session running: start it, notice its death, restart it.

Theory of operation
-------------------
The daemon, not the engine, owns everything a session's network is made of (the tun, the capture
sockets, the published host sockets): an engine process only holds copies.  So an engine that
dies loses its live connections but nothing else; the supervisor starts a new one on the same
fds and the container's next connection works.

``RestartPolicy`` is the sans-IO part: given the exits so far (and a clock), whether and when to
restart - exponential backoff from ``FIRST_DELAY`` to ``MAX_DELAY``, and at most ``max_restarts``
restarts per ``window`` seconds, beyond which the engine is left dead (a crash loop would only
burn CPU and flood the log) and the session is reported failed.  ``Supervisor`` is the shell:
``subprocess.Popen``, a pidfd on the event loop for the exit, ``call_later`` for the backoff.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tether import _sys

FIRST_DELAY = 0.1
MAX_DELAY = 5.0
STOP_GRACE = 2.0


class RestartPolicy:
    def __init__(self, max_restarts: int = 5, window: float = 60.0, first_delay: float = FIRST_DELAY,
                 max_delay: float = MAX_DELAY) -> None:
        self.max_restarts = max_restarts
        self.window = window
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._restarts: deque[float] = deque()

    def next_delay(self, now: float) -> float | None:
        """The engine just died at ``now``: seconds to wait before restarting it, or None to give
        up (``max_restarts`` restarts already happened in the last ``window`` seconds)."""
        while self._restarts and now - self._restarts[0] >= self.window:
            self._restarts.popleft()
        if len(self._restarts) >= self.max_restarts:
            return None
        delay = min(self.max_delay, self.first_delay * 2 ** len(self._restarts))
        self._restarts.append(now + delay)
        return delay

    @property
    def recent_restarts(self) -> int:
        return len(self._restarts)


@dataclass
class Launch:
    """How to start the engine once: argv, env, the fds it inherits (at their own numbers), and
    what to do when it has started (send the worker its start message) and when it is gone
    (close this incarnation's end of its link)."""

    argv: list[str]
    env: dict[str, str]
    pass_fds: list[int]
    after_start: Callable[[subprocess.Popen], None] = lambda process: None
    after_exit: Callable[[], None] = lambda: None


class Supervisor:
    """Runs what ``make_launch()`` describes (asked anew for every start) until ``stop()``;
    ``on_event(kind, fields)`` for the daemon's log."""

    def __init__(self, make_launch: Callable[[], Launch], policy: RestartPolicy, on_event: Callable[[str, dict], None],
                 on_failed: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic) -> None:
        self.make_launch = make_launch
        self.launch: Launch | None = None
        self.policy = policy
        self.on_event = on_event
        self.on_failed = on_failed
        self.clock = clock
        self.process: subprocess.Popen | None = None
        self.state = "stopped"  # starting -> running -> (backoff -> running)* -> failed | stopped
        self.starts = 0
        self.last_exit: str | None = None
        self._pidfd: int | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._spawn()

    def _spawn(self) -> None:
        assert self._loop is not None
        self._timer = None
        launch = self.launch = self.make_launch()
        try:
            process = subprocess.Popen(launch.argv, env=launch.env, pass_fds=launch.pass_fds, stdin=subprocess.DEVNULL,
                                       preexec_fn=_die_with_parent, close_fds=True)
        except OSError as exc:
            launch.after_exit()
            self.last_exit = f"cannot start {launch.argv[0]}: {exc.strerror or exc}"
            self.on_event("engine-exit", {"reason": self.last_exit})
            self._schedule_restart()
            return
        self.process = process
        self.starts += 1
        self._pidfd = _sys.pidfd_open(process.pid)
        self._loop.add_reader(self._pidfd, self._on_exit)
        self.state = "running"
        self.on_event("engine-start", {"pid": process.pid, "restarts": self.restarts})
        launch.after_start(process)

    def _on_exit(self) -> None:
        assert self._loop is not None and self.process is not None and self._pidfd is not None
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        code = self.process.wait()
        self.last_exit = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        self.process = None
        if self.launch is not None:
            self.launch.after_exit()
        if self._stopping:
            return
        self.on_event("engine-exit", {"reason": self.last_exit})
        self._schedule_restart()

    def _schedule_restart(self) -> None:
        assert self._loop is not None
        delay = self.policy.next_delay(self.clock())
        if delay is None:
            self.state = "failed"
            self.on_event("engine-failed", {"reason": f"{self.policy.max_restarts} restarts in "
                                                      f"{self.policy.window:g} s; last: {self.last_exit}"})
            self.on_failed()
            return
        self.state = "backoff"
        self._timer = self._loop.call_later(delay, self._spawn)

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns once the process is reaped."""
        self._stopping = True
        self.state = "stopped"
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        process = self.process
        if process is None:
            return
        if self._pidfd is not None and self._loop is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if process.poll() is None:
            process.kill()
            process.wait()
        self.process = None
        if self.launch is not None:
            self.launch.after_exit()


def _die_with_parent() -> None:
    """In the child before exec: an engine never outlives its daemon."""
    _sys.set_parent_death_signal(signal.SIGTERM)
