"""Kernel-to-kernel relay of one TCP connection pair with splice(2).

Theory of operation
-------------------
A relayed connection is two sockets (the sandbox side, accepted from the capture listener, and
the upstream side, dialled from the host netns) and two ``Pump``s, one per direction.  A pump
moves bytes ``src -> pipe -> dst`` with ``splice``: the payload stays in kernel pages and never
enters Python (principle 1).  All pumps share the event loop; no threads.

Pump states, driven by readiness callbacks:

* reading: ``src`` registered for read.  On readiness, splice up to ``CHUNK`` bytes into a pipe,
  then straight out to ``dst``; repeat while data flows (bounded, to stay fair to other pumps).
* blocked: ``dst`` could not take everything; the pump stops reading ``src`` (back-pressure
  reaches the sender through TCP's own window) and waits for ``dst`` to become writable.
* EOF from ``src`` once the pipe is drained: ``shutdown(dst, SHUT_WR)`` — half-close is
  preserved; the other direction keeps flowing.  The pair closes when both pumps are done.
* Error (ECONNRESET, EPIPE, ...): the whole pair is aborted and the surviving side gets an RST
  (``SO_LINGER {1, 0}``), so a reset on one side resets the other.

Pipes come from a ``PipePool``: a pump holds one only while bytes are in flight, so thousands of
idle connections do not pin thousands of 1 MiB pipes (the per-user pipe budget is 64 MiB by
default).  Pipes that may still hold bytes (aborted mid-transfer) are closed, never reused.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable

from tether import _sys

PIPE_SIZE = 1 << 20
CHUNK = PIPE_SIZE
SPLICE_FLAGS = _sys.SPLICE_F_MOVE | _sys.SPLICE_F_NONBLOCK
ROUNDS_PER_WAKEUP = 16
POOL_LIMIT = 16  # idle 1 MiB pipes kept; the default per-user pipe budget is 64 MiB


class PipePool:
    """Reusable empty pipes; owned by the engine, closed with it."""

    def __init__(self, size: int = PIPE_SIZE, limit: int = POOL_LIMIT) -> None:
        self._size = size
        self._limit = limit
        self._free: list[tuple[int, int]] = []

    def acquire(self) -> tuple[int, int]:
        return self._free.pop() if self._free else _sys.make_pipe(self._size)

    def release(self, pipe: tuple[int, int], empty: bool = True) -> None:
        if empty and len(self._free) < self._limit:
            self._free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        while self._free:
            r, w = self._free.pop()
            os.close(r)
            os.close(w)


class Pump:
    """One direction of a relayed pair."""

    def __init__(self, pair: RelayPair, src: socket.socket, dst: socket.socket) -> None:
        self.pair = pair
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.pipe: tuple[int, int] | None = None
        self.pending = 0
        self.moved = 0
        self.eof = False
        self.done = False

    def start(self) -> None:
        self.pair.loop.add_reader(self.src_fd, self._on_readable)

    def stop(self) -> None:
        loop = self.pair.loop
        loop.remove_reader(self.src_fd)
        loop.remove_writer(self.dst_fd)
        if self.pipe is not None:
            self.pair.pool.release(self.pipe, empty=self.pending == 0)
            self.pipe = None

    def pump_now(self) -> None:
        """Move whatever ``src`` already holds without waiting for a readiness event."""
        if not self.done and not self.eof and self.pending == 0:
            self._on_readable()

    def _on_readable(self) -> None:
        try:
            for _ in range(ROUNDS_PER_WAKEUP):
                if self.pipe is None:
                    self.pipe = self.pair.pool.acquire()
                try:
                    n = _sys.splice(self.src_fd, self.pipe[1], CHUNK, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    break
                if n == 0:
                    self.eof = True
                    self.pair.loop.remove_reader(self.src_fd)
                    break
                self.pending += n
                if not self._flush():
                    self.pair.loop.remove_reader(self.src_fd)
                    self.pair.loop.add_writer(self.dst_fd, self._on_writable)
                    return
            self._after_drain()
        except Exception as exc:  # noqa: BLE001 - a failure (even a bug) ends this pair only
            self.pair.abort(exc)

    def _on_writable(self) -> None:
        try:
            if self._flush():
                self.pair.loop.remove_writer(self.dst_fd)
                if not self.eof:
                    self.pair.loop.add_reader(self.src_fd, self._on_readable)
                self._after_drain()
        except Exception as exc:  # noqa: BLE001 - a failure (even a bug) ends this pair only
            self.pair.abort(exc)

    def _flush(self) -> bool:
        """Move pending pipe bytes to dst; False if dst would block first."""
        assert self.pipe is not None
        while self.pending:
            try:
                m = _sys.splice(self.pipe[0], self.dst_fd, self.pending, flags=SPLICE_FLAGS)
            except BlockingIOError:
                return False
            self.pending -= m
            self.moved += m
        return True

    def _after_drain(self) -> None:
        if self.pending == 0 and self.pipe is not None:
            self.pair.pool.release(self.pipe)
            self.pipe = None
        if self.eof and self.pending == 0 and not self.done:
            self.done = True
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError as exc:
                if exc.errno != errno.ENOTCONN:
                    raise
            self.pair.pump_done()


class RelayPair:
    """Both directions of one relayed connection; calls ``on_close(error)`` exactly once."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: PipePool, inside: socket.socket,
                 outside: socket.socket, on_close: Callable[[RelayPair, BaseException | None], None]) -> None:
        self.loop = loop
        self.pool = pool
        self.inside, self.outside = inside, outside
        inside.setblocking(False)  # a blocking splice would stall every other connection
        outside.setblocking(False)
        self.up = Pump(self, inside, outside)
        self.down = Pump(self, outside, inside)
        self._on_close = on_close
        self.closed = False

    @property
    def bytes_up(self) -> int:
        return self.up.moved

    @property
    def bytes_down(self) -> int:
        return self.down.moved

    def start(self) -> None:
        self.up.start()
        self.down.start()

    def pump_done(self) -> None:
        if self.up.done and self.down.done:
            self._close(None)

    def abort(self, error: BaseException) -> None:
        """Reset both sides (a reset or failure on one side resets the other)."""
        for sock in (self.inside, self.outside):
            try:
                _sys.set_reset_on_close(sock)
            except OSError:
                pass
        self._close(error)

    def _close(self, error: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.up.stop()
        self.down.stop()
        self.inside.close()
        self.outside.close()
        self._on_close(self, error)
