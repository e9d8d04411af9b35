"""Unit tests for tether.engine.proxy.relay: RelayPair and PipePool with real sockets.

Each test builds the production shape out of two loopback TCP connections:

    client ==TCP== inside   [RelayPair: splice through pipes]   outside ==TCP== server

``client`` plays the sandboxed process, ``server`` the world.  Everything runs on one asyncio
loop (the relay is readiness-driven, no threads), under a timeout so that a stuck relay fails
the test instead of hanging it.  Payloads are random and compared by SHA-256; fd leaks are
measured on /proc/self/fd around the whole loop.
"""

from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import hashlib
import os
import signal
import socket
import struct
import termios
from dataclasses import dataclass, field

import pytest

from tether.engine.proxy.relay import PIPE_SIZE, PipePool, RelayPair

F_GETPIPE_SZ = 1032
TIMEOUT = 60.0
MiB = 1 << 20


def run(coro, timeout: float = TIMEOUT):
    async def guarded():
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(guarded())


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def tcp_pair(bufsize: int | None = None) -> tuple[socket.socket, socket.socket]:
    """(connecting end, accepted end) of one loopback TCP connection, both non-blocking.

    ``bufsize`` clamps SO_RCVBUF and SO_SNDBUF of both ends (set before the handshake, through
    the listener for the accepted end, so the window is small from the start; no autotuning)."""
    def clamp(s: socket.socket) -> None:
        if bufsize is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)

    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        clamp(srv)
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        a = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        clamp(a)
        a.connect(srv.getsockname())
        b, _ = srv.accept()
    finally:
        srv.close()
    for s in (a, b):
        s.setblocking(False)
    return a, b


@dataclass
class Relay:
    client: socket.socket
    server: socket.socket
    pair: RelayPair
    pool: PipePool
    closed: asyncio.Future
    calls: list = field(default_factory=list)

    def close_ends(self) -> None:
        self.client.close()
        self.server.close()


def start_relay(pool: PipePool | None = None, *, small_buffers: bool = False) -> Relay:
    loop = asyncio.get_running_loop()
    buf = 64 * 1024 if small_buffers else None
    client, inside = tcp_pair(buf)
    outside, server = tcp_pair(buf)
    pool = pool or PipePool()
    closed = loop.create_future()
    calls: list = []

    def on_close(pair, error):
        calls.append((pair, error))
        if not closed.done():
            closed.set_result(error)

    pair = RelayPair(loop, pool, inside, outside, on_close)
    relay = Relay(client, server, pair, pool, closed, calls)
    pair.start()
    return relay


async def recv_all(sock: socket.socket) -> bytes:
    """Read until EOF."""
    loop = asyncio.get_running_loop()
    chunks = []
    while chunk := await loop.sock_recv(sock, 256 * 1024):
        chunks.append(chunk)
    return b"".join(chunks)


async def recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    chunks, got = [], 0
    while got < n:
        chunk = await loop.sock_recv(sock, min(256 * 1024, n - got))
        assert chunk, f"EOF after {got} of {n} bytes"
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


async def send_then_half_close(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)
    sock.shutdown(socket.SHUT_WR)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def reset(sock: socket.socket) -> None:
    """close() with an RST (SO_LINGER {1, 0})."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def pipe_bytes(fd: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


# --- data intact in both directions --------------------------------------------------------------

SIZES = [
    ("empty-both", 0, 0),
    ("one-byte-up", 1, 0),
    ("one-byte-down", 0, 1),
    ("pipe-size-exactly", PIPE_SIZE, PIPE_SIZE),
    ("several-MiB-both", 8 * MiB + 17, 6 * MiB + 5),
]


@pytest.mark.parametrize("up_size,down_size", [s[1:] for s in SIZES], ids=[s[0] for s in SIZES])
def test_bytes_arrive_intact_in_both_directions(up_size, down_size):
    up, down = os.urandom(up_size), os.urandom(down_size)

    async def main():
        r = start_relay()
        try:
            _, got_up, _, got_down = await asyncio.gather(
                send_then_half_close(r.client, up), recv_all(r.server),
                send_then_half_close(r.server, down), recv_all(r.client))
            error = await r.closed
            return got_up, got_down, error, r
        finally:
            r.close_ends()
            r.pool.close()

    got_up, got_down, error, r = run(main())
    assert (len(got_up), sha(got_up)) == (len(up), sha(up))
    assert (len(got_down), sha(got_down)) == (len(down), sha(down))
    assert error is None
    assert len(r.calls) == 1 and r.calls[0][0] is r.pair
    assert (r.pair.bytes_up, r.pair.bytes_down) == (up_size, down_size)
    assert r.pair.closed
    assert r.pair.inside.fileno() == -1 and r.pair.outside.fileno() == -1


def test_interleaved_request_response_exchanges():
    async def main():
        loop = asyncio.get_running_loop()
        r = start_relay()
        try:
            for i in range(50):
                request = os.urandom(1 + i * 997)
                await loop.sock_sendall(r.client, request)
                assert await recv_exactly(r.server, len(request)) == request
                response = os.urandom(1 + i * 1499)
                await loop.sock_sendall(r.server, response)
                assert await recv_exactly(r.client, len(response)) == response
            assert not r.pair.closed
            total = (r.pair.bytes_up, r.pair.bytes_down)
            r.client.shutdown(socket.SHUT_WR)
            r.server.shutdown(socket.SHUT_WR)
            assert await recv_all(r.server) == b"" and await recv_all(r.client) == b""
            assert await r.closed is None
            return total
        finally:
            r.close_ends()
            r.pool.close()

    up, down = run(main())
    assert up == sum(1 + i * 997 for i in range(50))
    assert down == sum(1 + i * 1499 for i in range(50))


def test_many_pairs_share_one_pool():
    n, size = 24, 300 * 1024

    async def main():
        pool = PipePool()
        relays = [start_relay(pool) for _ in range(n)]
        payloads = [(os.urandom(size), os.urandom(size // 3)) for _ in range(n)]
        try:
            results = await asyncio.gather(*(
                asyncio.gather(send_then_half_close(r.client, up), recv_all(r.server),
                               send_then_half_close(r.server, down), recv_all(r.client))
                for r, (up, down) in zip(relays, payloads)))
            errors = await asyncio.gather(*(r.closed for r in relays))
            return payloads, results, errors, len(pool._free)
        finally:
            for r in relays:
                r.close_ends()
            pool.close()

    payloads, results, errors, free = run(main())
    assert errors == [None] * n
    assert free <= n * 2  # at most one pipe per pump came back to the pool
    for (up, down), (_, got_up, _, got_down) in zip(payloads, results):
        assert sha(got_up) == sha(up) and sha(got_down) == sha(down)


# --- half-close ------------------------------------------------------------------------------------

@pytest.mark.parametrize("first", ["client", "server"], ids=["client-half-closes-first", "server-half-closes-first"])
def test_half_close_is_propagated_while_the_other_direction_keeps_flowing(first):
    request, reply = os.urandom(100_000), os.urandom(3 * MiB)

    async def main():
        loop = asyncio.get_running_loop()
        r = start_relay()
        try:
            closer, peer = (r.client, r.server) if first == "client" else (r.server, r.client)
            await send_then_half_close(closer, request)
            # The peer sees the whole request, then EOF ...
            assert await recv_all(peer) == request
            # ... but the connection is not closed: the peer still talks, and the closer still hears.
            assert not r.pair.closed and r.calls == []
            for i in range(3):
                chunk = reply[i * MiB:(i + 1) * MiB]
                await loop.sock_sendall(peer, chunk)
                assert await recv_exactly(closer, len(chunk)) == chunk
                assert not r.pair.closed
            peer.close()  # FIN: the last direction ends
            assert await recv_all(closer) == b""
            return await r.closed, r.pair.bytes_up, r.pair.bytes_down, len(r.calls)
        finally:
            r.close_ends()
            r.pool.close()

    error, up, down, calls = run(main())
    assert error is None and calls == 1
    expected = (len(request), len(reply)) if first == "client" else (len(reply), len(request))
    assert (up, down) == expected


# --- reset ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("victim", ["client", "server"], ids=["client-resets", "server-resets"])
@pytest.mark.parametrize("in_flight", [False, True], ids=["idle", "mid-transfer"])
def test_reset_on_one_side_resets_the_other(victim, in_flight):
    async def main():
        loop = asyncio.get_running_loop()
        r = start_relay(small_buffers=True)
        try:
            await loop.sock_sendall(r.client, b"hello")
            assert await recv_exactly(r.server, 5) == b"hello"
            resetter, survivor = (r.client, r.server) if victim == "client" else (r.server, r.client)
            sender = None
            if in_flight:
                # The survivor floods the resetter, who never reads: bytes are queued in the relay.
                sender = asyncio.ensure_future(loop.sock_sendall(survivor, os.urandom(16 * MiB)))
                await asyncio.sleep(0.2)
                assert not sender.done()
            reset(resetter)
            error = await r.closed
            with pytest.raises(ConnectionResetError):
                while await loop.sock_recv(survivor, 65536):
                    pass
            if sender is not None:
                with pytest.raises((ConnectionResetError, BrokenPipeError)):
                    await sender
            return error, list(r.calls)
        finally:
            r.client.close()
            r.server.close()
            r.pool.close()

    error, calls = run(main())
    assert len(calls) == 1
    assert isinstance(error, OSError)
    assert error.errno in (errno.ECONNRESET, errno.EPIPE)


def test_abort_resets_both_sides_and_calls_on_close_once():
    async def main():
        loop = asyncio.get_running_loop()
        r = start_relay()
        try:
            await loop.sock_sendall(r.server, b"x")
            assert await recv_exactly(r.client, 1) == b"x"
            cause = ConnectionAbortedError("sandbox stopped")
            r.pair.abort(cause)
            r.pair.abort(ConnectionAbortedError("again"))  # idempotent
            outcomes = []
            for sock in (r.client, r.server):
                try:
                    outcomes.append(await loop.sock_recv(sock, 10))
                except ConnectionResetError:
                    outcomes.append("reset")
            return cause, r.calls, outcomes
        finally:
            r.close_ends()
            r.pool.close()

    cause, calls, outcomes = run(main())
    assert outcomes == ["reset", "reset"]
    assert len(calls) == 1 and calls[0][1] is cause


# --- back-pressure -------------------------------------------------------------------------------------


def test_slow_reader_applies_back_pressure_and_loses_nothing():
    data = os.urandom(48 * MiB)

    async def main():
        loop = asyncio.get_running_loop()
        r = start_relay(small_buffers=True)
        try:
            sender = asyncio.ensure_future(send_then_half_close(r.client, data))
            await asyncio.sleep(0.5)  # the server does not read at all
            stalled = (sender.done(), r.pair.bytes_up)
            # Now read slowly, in small bites with pauses, then fast.
            got = bytearray()
            for _ in range(20):
                got += await loop.sock_recv(r.server, 4096)
                await asyncio.sleep(0.01)
            got += await recv_all(r.server)
            await sender
            r.server.shutdown(socket.SHUT_WR)
            assert await recv_all(r.client) == b""
            return stalled, bytes(got), await r.closed, r.pair.bytes_up
        finally:
            r.close_ends()
            r.pool.close()

    (sender_done, moved_while_stalled), got, error, moved = run(main())
    # Back-pressure reached the sender: it could not push 48 MiB into a stalled reader, and the
    # relay holds at most about a pipe plus socket buffers, not the whole stream.
    assert not sender_done
    assert moved_while_stalled < 8 * MiB
    assert (len(got), sha(got)) == (len(data), sha(data))
    assert error is None and moved == len(data)


# --- PipePool and fds ------------------------------------------------------------------------------------


def test_pool_pipes_are_nonblocking_cloexec_and_sized():
    pool = PipePool()
    try:
        r, w = pool.acquire()
        for fd in (r, w):
            assert os.get_blocking(fd) is False
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert fcntl.fcntl(w, F_GETPIPE_SZ) == PIPE_SIZE
        pool.release((r, w))
    finally:
        pool.close()


def test_pool_reuses_released_empty_pipes():
    pool = PipePool()
    try:
        a = pool.acquire()
        b = pool.acquire()
        assert a != b
        pool.release(a)
        assert pool.acquire() == a
        pool.release(b)
        pool.release(a)
        assert {pool.acquire(), pool.acquire()} == {a, b}
        pool.release(a)
        pool.release(b)
    finally:
        pool.close()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


def test_pool_closes_pipes_that_may_hold_bytes():
    pool = PipePool()
    try:
        r, w = pool.acquire()
        os.write(w, b"leftover")
        pool.release((r, w), empty=False)
        assert not _is_open(r) and not _is_open(w)
        fresh = pool.acquire()
        assert pipe_bytes(fresh[0]) == 0
        pool.release(fresh)
    finally:
        pool.close()


def test_pool_limit_closes_the_surplus_and_close_closes_the_rest():
    before = open_fds()
    pool = PipePool(limit=2)
    pipes = [pool.acquire() for _ in range(3)]
    for p in pipes:
        pool.release(p)
    assert not _is_open(pipes[2][0]) and not _is_open(pipes[2][1])
    assert all(_is_open(fd) for p in pipes[:2] for fd in p)
    pool.close()
    assert all(not _is_open(fd) for p in pipes for fd in p)
    assert open_fds() == before
    pool.close()  # idempotent


SCENARIOS = ["transfer", "half-close", "reset", "abort", "reset-mid-transfer"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_fd_leak(scenario):
    async def main():
        loop = asyncio.get_running_loop()
        pool = PipePool()
        r = start_relay(pool, small_buffers=True)
        try:
            if scenario in ("transfer", "half-close"):
                up = os.urandom(2 * MiB)
                if scenario == "transfer":
                    await asyncio.gather(send_then_half_close(r.client, up), recv_all(r.server),
                                         send_then_half_close(r.server, up), recv_all(r.client))
                else:
                    await asyncio.gather(send_then_half_close(r.client, up), recv_all(r.server))
                    r.server.close()
                    await recv_all(r.client)
            elif scenario == "reset":
                reset(r.server)
            elif scenario == "abort":
                r.pair.abort(ConnectionAbortedError("stop"))
            else:
                sender = asyncio.ensure_future(loop.sock_sendall(r.client, os.urandom(16 * MiB)))
                await asyncio.sleep(0.2)
                reset(r.server)
                with pytest.raises((ConnectionResetError, BrokenPipeError)):
                    await sender
            await r.closed
            # Every pipe back in the pool is empty: a pipe that held bytes is never reused.
            assert all(pipe_bytes(rd) == 0 for rd, _ in pool._free)
        finally:
            r.client.close()
            r.server.close()
            pool.close()

    before = open_fds()
    run(main())
    assert open_fds() == before


# --- blocking sockets ------------------------------------------------------------------------------------


def test_blocking_sockets_do_not_freeze_the_event_loop():
    class Stuck(BaseException):
        """Raised by SIGALRM inside a splice() that blocks the loop."""

    def on_alarm(*_):
        raise Stuck()

    async def main():
        loop = asyncio.get_running_loop()
        escaped: list = []
        loop.set_exception_handler(lambda _loop, ctx: escaped.append(ctx.get("exception")))
        client, inside = tcp_pair()
        outside, server = tcp_pair()
        inside.setblocking(True)  # as socket.accept() returns them
        outside.setblocking(True)
        pool = PipePool()
        pair = RelayPair(loop, pool, inside, outside, lambda *_: None)
        try:
            pair.start()
            signal.setitimer(signal.ITIMER_REAL, 2.0)
            await loop.sock_sendall(client, b"ping")
            assert await recv_exactly(server, 4) == b"ping"
            await asyncio.sleep(0.1)
            signal.setitimer(signal.ITIMER_REAL, 0)
            return [e for e in escaped if isinstance(e, Stuck)]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            pair.abort(ConnectionAbortedError("test over"))
            client.close()
            server.close()
            pool.close()

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        stuck = run(main(), timeout=10)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert stuck == [], "the event loop was blocked inside splice() until SIGALRM broke it"
