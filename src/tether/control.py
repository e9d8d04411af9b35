"""Control sockets: the server a running sandbox listens on, and the client ``tether ps`` and
``tether ctl`` use.  A transport shell around the sans-IO ``tether.wire``.

Theory of operation
-------------------
The server is a listening Unix stream socket on the event loop.  Each accepted connection:

1. is authorised by the kernel's record of the peer (SO_PEERCRED): only ``allowed_uids`` (the
   owner and root) get further than an ``permission-denied`` error frame;
2. must open with ``hello``; the server answers with the negotiated version;
3. sends requests; each is dispatched to ``methods[name](Request)``, whose return value is the
   response's ``result`` and whose ``MethodError`` becomes an ``error`` frame.  A method that
   streams (``events --follow``) pushes ``event`` frames and ends with ``Request.finish``.

A connection is one client's: whatever it sends (a malformed frame, a flood of fds, fds to a
method that takes none, a burst of requests, then vanishing) ends that connection with an error frame where possible and closes
every fd it sent; other connections and the sandbox never notice.  Limits: ``MAX_CONNECTIONS``
at once (beyond: refused with ``busy``; ``hello_timeout``: a connection that has not said hello by
then is closed), ``MAX_OUTPUT`` bytes queued to one client (a subscriber
that does not read is dropped, never allowed to grow the engine's memory).

Frames that carry fds are sent with one ``sendmsg`` each (fds ride on the frame's first byte);
the client reads with ``recvmsg`` and hands bytes and fds to ``wire.Decoder`` together.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tether import _sys, wire

if TYPE_CHECKING:
    import asyncio

MAX_CONNECTIONS = 128
MAX_OUTPUT = 1 << 20
RECV_SIZE = wire.MAX_FRAME + 4


class MethodError(Exception):
    """A request that cannot be served: a stable ``code`` (``wire`` error codes) and a message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class ControlError(Exception):
    """Client side: the server answered with an error (or the connection failed)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code, self.message = code, message


@dataclass
class Request:
    """One request as a method sees it.  ``fds`` are the caller's to keep or close; any left
    in the list when the method returns are closed by the server."""

    id: int
    method: str
    params: dict
    fds: list[int]
    peer_uid: int
    connection: _Connection

    def push(self, event: dict) -> bool:
        """Send one ``event`` frame of this request's stream; False once the client is gone.  An
        event too large for one frame is skipped (the stream goes on)."""
        try:
            return self.connection.send(wire.event(self.id, event))
        except ValueError:
            return not self.connection.closed

    def finish(self, result: Any = None) -> None:
        """End this request's stream with its response."""
        self.connection.end_stream(self.id)
        self.connection.answer(self.id, result)

    def fail(self, code: str, message: str) -> None:
        """End this request (answered later) with an ``error``."""
        self.connection.end_stream(self.id)
        self.connection.send(wire.error(self.id, code, message))

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the client goes away (to unsubscribe)."""
        self.connection.closers.append(callback)


STREAMING = object()  # returned by a method that answers later (``Request.finish``)
Method = Callable[[Request], Any]


class ControlServer:
    def __init__(self, listener: socket.socket, methods: dict[str, Method], allowed_uids: set[int] | None,
                 software: str, fd_methods: frozenset[str] = frozenset(),
                 max_connections: int | None = None, hello_timeout: float | None = None) -> None:
        self.methods = methods
        self.fd_methods = fd_methods  # the methods that take fds; anything else sent fds is a violation
        self.allowed_uids = allowed_uids  # None: whoever can reach the socket (its file mode decides)
        self.max_connections = MAX_CONNECTIONS if max_connections is None else max_connections
        self.hello_timeout = hello_timeout  # a connection silent that long after connecting is closed
        self.software = software
        self.connections: set[_Connection] = set()
        self.refused = 0
        self._sock: socket.socket | None = listener
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Serve the (bound, listening) socket on the running loop."""
        assert self._sock is not None
        import asyncio  # here, not at the top: clients (tether attach, the OCI hook) never pay its ~15 ms

        self._loop = asyncio.get_running_loop()
        self._sock.setblocking(False)
        self._loop.add_reader(self._sock.fileno(), self._on_acceptable)

    def close(self) -> None:
        for conn in list(self.connections):
            conn.close()
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _on_acceptable(self) -> None:
        assert self._sock is not None and self._loop is not None
        for _ in range(16):
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. EMFILE: the client sees its connection closed
            sock.setblocking(False)
            pid, uid, gid = _sys.peer_credentials(sock)
            conn = _Connection(self, sock, uid, pid, gid)
            if self.allowed_uids is not None and uid not in self.allowed_uids:
                self.refused += 1
                conn.fail(wire.ProtocolError(wire.PERMISSION_DENIED,
                                             f"uid {uid} may not control this sandbox (its owner and root may)"))
                continue
            if len(self.connections) >= self.max_connections:
                self.refused += 1
                conn.fail(wire.ProtocolError(wire.BUSY,
                                             f"too many control connections (limit {self.max_connections})"))
                continue
            self.connections.add(conn)
            conn.start()


class _Connection:
    def __init__(self, server: ControlServer, sock: socket.socket, peer_uid: int, peer_pid: int = 0,
                 peer_gid: int = -1) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.peer_uid = peer_uid
        self.peer_pid = peer_pid  # SO_PEERCRED at connect time: logged, never trusted as identity
        self.peer_gid = peer_gid
        self.decoder = wire.Decoder()
        self.version: int | None = None
        self.out: deque[list] = deque()  # [memoryview, fds] per frame still to send
        self.queued = 0
        self.streams: set[int] = set()
        self.closers: list[Callable[[], None]] = []
        self.closed = False
        self._writing = False
        self._loop = server._loop
        assert self._loop is not None

    def start(self) -> None:
        self._loop.add_reader(self.fd, self._on_readable)
        if self.server.hello_timeout is not None:
            self._loop.call_later(self.server.hello_timeout, self._hello_expired)

    def _hello_expired(self) -> None:
        """A connection that holds a slot without ever saying hello (a slow-loris) loses it."""
        if self.version is None and not self.closed:
            self.fail(wire.ProtocolError(wire.BAD_FIELD, f"no hello within {self.server.hello_timeout:g} s"))

    # -- input ------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data, fds = _sys.recv_fds(self.sock, RECV_SIZE, wire.MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno == 0:  # fds beyond the limit: the kernel truncated (recv_fds closed them)
                self.fail(wire.ProtocolError(wire.TOO_MANY_FDS, f"more than {wire.MAX_FDS} fds in one message"))
            else:
                self.close()
            return
        try:
            if not data:
                for fd in fds:
                    os.close(fd)
                self.decoder.eof()
                self.close()
                return
            self.decoder.feed(data, fds)
            while not self.closed:
                message = self.decoder.next()
                if message is None:
                    break
                self._handle(message)
        except wire.ProtocolError as exc:
            self.fail(exc)

    def _handle(self, message: wire.Message) -> None:
        if self.version is None:
            if message.type != "hello":
                _close_fds(message.fds)
                raise wire.ProtocolError(wire.BAD_FIELD, f"the first message must be hello, not {message.type}")
            self.version = wire.negotiate(wire.PROTOCOL_VERSIONS, message.versions or ())
            self.send(wire.hello(self.server.software, (self.version,)))
            return
        if message.type != "request":
            _close_fds(message.fds)
            raise wire.ProtocolError(wire.BAD_FIELD, f"a client sends requests, not {message.type}")
        assert message.id is not None and message.method is not None
        if message.fds and message.method not in self.server.fd_methods:
            _close_fds(message.fds)
            raise wire.ProtocolError(wire.UNEXPECTED_FD, f"{message.method} takes no file descriptors; "
                                                         f"{len(message.fds)} were sent (closed unread)")
        request = Request(message.id, message.method, dict(message.params or {}), list(message.fds),
                          self.peer_uid, self)
        method = self.server.methods.get(message.method)
        try:
            if method is None:
                raise MethodError(wire.UNKNOWN_METHOD, f"unknown method {message.method!r}")
            result = method(request)
        except MethodError as exc:
            self.send(wire.error(message.id, exc.code, exc.message))
        except Exception as exc:  # noqa: BLE001 - a bug in one method answers one request
            self.send(wire.error(message.id, wire.INTERNAL, f"{message.method} failed: {exc!r}"))
        else:
            if result is STREAMING:
                self.streams.add(message.id)
            else:
                self.answer(message.id, result)
        finally:
            _close_fds(request.fds)

    def answer(self, request_id: int, result: Any) -> None:
        """The response to ``request_id``, or an ``internal`` error if it cannot be one frame."""
        try:
            self.send(wire.response(request_id, result))
        except ValueError as exc:
            self.send(wire.error(request_id, wire.INTERNAL, f"the result cannot be sent: {exc}"))

    def end_stream(self, request_id: int) -> None:
        self.streams.discard(request_id)

    # -- output -----------------------------------------------------------------------------

    def send(self, obj: dict, fds: Sequence[int] = ()) -> bool:
        """Queue one frame; False (and the connection dropped) if the client stopped reading.
        ValueError (from ``wire.encode``) if ``obj`` cannot be one frame."""
        if self.closed:
            return False
        frame = wire.encode(obj, len(fds))
        if self.queued + len(frame) > MAX_OUTPUT:
            self.close()
            return False
        self.out.append([memoryview(frame), list(fds)])
        self.queued += len(frame)
        self._flush()
        return not self.closed

    def _flush(self) -> None:
        while self.out:
            item = self.out[0]
            view, fds = item
            try:
                if fds:
                    sent = _sys.send_fds(self.sock, view, fds)
                    item[1] = []  # delivered with the first byte sent
                else:
                    sent = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()
                return
            self.queued -= sent
            if sent == len(view):
                self.out.popleft()
            else:
                item[0] = view[sent:]
        want = bool(self.out)
        if want != self._writing:
            self._writing = want
            if want:
                self._loop.add_writer(self.fd, self._flush)
            else:
                self._loop.remove_writer(self.fd)

    # -- end --------------------------------------------------------------------------------

    def fail(self, error: wire.ProtocolError) -> None:
        """A protocol violation: tell the client why (best effort) and close."""
        try:
            self.sock.send(wire.encode(wire.error(None, error.code, error.message)))
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.connections.discard(self)
        if self._writing:
            self._loop.remove_writer(self.fd)
        try:
            self._loop.remove_reader(self.fd)
        except (ValueError, OSError):
            pass
        for callback in self.closers:
            try:
                callback()
            except Exception:  # noqa: BLE001 - an unsubscribe failing must not stop the others
                pass
        _close_fds(self.decoder.take_unclaimed_fds())
        for _, fds in self.out:
            del fds[:]  # fds queued to us are the method's: it keeps or closes them
        self.out.clear()
        self.sock.close()


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# client (blocking: the CLI)


class ControlClient:
    """One connection to a control socket: ``call`` for a result, ``stream`` for events."""

    def __init__(self, path: Path | str, software: str, timeout: float | None = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.decoder = wire.Decoder()
        self._next_id = 1
        try:
            self.sock.connect(str(path))
        except OSError as exc:
            self.sock.close()
            raise ControlError("unreachable", f"cannot connect to {path}: {exc.strerror or exc}") from None
        try:
            self._send(wire.hello(software))
        except ControlError as lost:
            # A server refusing us (uid, busy) may have closed before reading our hello: its
            # error frame is still ours to read, and says why.
            try:
                refusal = self._receive()
            except ControlError:
                refusal = None
            self.close()
            if refusal is not None and refusal.type == "error":
                raise ControlError(refusal.code or "error", refusal.message or "refused") from None
            raise lost
        reply = self._receive()
        if reply.type == "error":
            self.close()
            raise ControlError(reply.code or "error", reply.message or "refused")
        if reply.type != "hello":
            self.close()
            raise ControlError(wire.BAD_FIELD, f"server answered hello with {reply.type}")
        self.version = wire.negotiate(wire.PROTOCOL_VERSIONS, reply.versions or ())

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        _close_fds(self.decoder.take_unclaimed_fds())
        self.sock.close()

    def call(self, method: str, params: dict | None = None, fds: Sequence[int] = ()) -> Any:
        request_id = self.request(method, params, fds)
        for message in self.replies(request_id):
            if message.type == "event":
                continue
            return message.result
        raise AssertionError("unreachable")

    def stream(self, method: str, params: dict | None = None, fds: Sequence[int] = ()) -> Iterator[dict]:
        """Events of a streaming request, until its response (or the caller stops iterating)."""
        request_id = self.request(method, params, fds)
        for message in self.replies(request_id):
            if message.type == "event":
                yield message.event or {}
            else:
                return

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def request(self, method: str, params: dict | None = None, fds: Sequence[int] = ()) -> int:
        """Send a request (with ``fds``, which stay the caller's); its id, for ``replies``."""
        request_id = self._next_id
        self._next_id += 1
        self._send(wire.request(request_id, method, params or {}), fds)
        return request_id

    def replies(self, request_id: int) -> Iterator[wire.Message]:
        """The event frames and then the response of ``request_id``; an error raises ControlError."""
        while True:
            message = self._receive()
            _close_fds(message.fds)
            if message.type == "error":
                raise ControlError(message.code or "error", message.message or "")
            if message.id != request_id:
                continue
            yield message
            if message.type == "response":
                return

    def _send(self, obj: dict, fds: Sequence[int] = ()) -> None:
        try:
            frame = wire.encode(obj, len(fds))
            if fds:
                sent = _sys.send_fds(self.sock, frame, fds)
                if sent < len(frame):  # an empty send to a server that answered and closed: EPIPE
                    self.sock.sendall(frame[sent:])
            else:
                self.sock.sendall(frame)
        except OSError as exc:
            raise ControlError("unreachable", f"control connection lost: {exc.strerror or exc}") from None

    def _receive(self) -> wire.Message:
        while True:
            try:
                message = self.decoder.next()
            except wire.ProtocolError as exc:
                raise ControlError(exc.code, exc.message) from None
            if message is not None:
                return message
            try:
                data, fds = _sys.recv_fds(self.sock, RECV_SIZE, wire.MAX_FDS)
            except TimeoutError:
                raise ControlError("timeout", "no answer from the sandbox") from None
            except OSError as exc:
                raise ControlError("unreachable", f"control connection lost: {exc.strerror or exc}") from None
            if not data:
                _close_fds(fds)
                raise ControlError("closed", "the sandbox closed the control connection")
            try:
                self.decoder.feed(data, fds)
            except wire.ProtocolError as exc:
                raise ControlError(exc.code, exc.message) from None

