"""Test peers for tether's integration world (see DESIGN.md, "Testing topology").

Run inside a test network namespace, never on a real network:

    ip netns exec tether-world-<id> /opt/tether/venv/bin/python servers.py \
        --bind 0.0.0.0 --http 80 --echo 7 --sink 9000 --source 9001 --halfclose 9002

Once every listener is bound it prints one JSON line to stdout,
``{"ready": true, "pid": ..., "ports": {"http": 80, ...}}`` (port 0 picks a free port, the line
reports the real one), then serves until killed.

Services (each connection in its own thread):

* ``http``      -- any GET answers 200 with ``--body`` (default ``WORLD_BODY``).
* ``echo``      -- echoes everything back; on EOF half-closes and closes.
* ``sink``      -- reads to EOF, answers the sha256 hex digest of what it read + "\\n", closes.
* ``source``    -- reads a decimal byte count + "\\n", sends that many bytes of the deterministic
                   pattern (see ``pattern_block``/``pattern_sha256``), then closes.
* ``halfclose`` -- reads to EOF, then answers ``got N bytes\\n`` and closes: proves that the
                   client's shutdown(SHUT_WR) arrived while the other direction stayed open.

This module is also imported by the tests (constants, ``pattern_sha256``), so it has no
side effects at import time and uses only the standard library.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import json
import os
import random
import resource
import signal
import socket
import socketserver
import sys
import threading

WORLD_BODY = b"hello from the tether test world\n"
HOST_BODY = b"hello from the tether test host\n"

# The deterministic byte stream of the "source" server and of the upload clients: a 1 MiB block
# from a seeded generator, repeated.  Cheap to produce and to check at > 1 GB/s.
PATTERN_SEED = 0x7E7E_2024
PATTERN_BLOCK_SIZE = 1 << 20

SERVICES = ("http", "echo", "sink", "source", "halfclose")


@functools.lru_cache(maxsize=1)
def pattern_block() -> bytes:
    return random.Random(PATTERN_SEED).randbytes(PATTERN_BLOCK_SIZE)


@functools.lru_cache(maxsize=16)
def pattern_sha256(n: int) -> str:
    """sha256 hex digest of the first ``n`` bytes of the repeated pattern."""
    block = pattern_block()
    h = hashlib.sha256()
    full, rest = divmod(n, len(block))
    for _ in range(full):
        h.update(block)
    h.update(block[:rest])
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# servers


class _TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 4096  # 500-connection bursts must not overflow the accept queue
    block_on_close = False


class _HTTPServer(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 4096
    block_on_close = False


def _read_to_eof(sock: socket.socket, consume) -> int:
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    total = 0
    while True:
        n = sock.recv_into(buf)
        if not n:
            return total
        consume(view[:n])
        total += n


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = self.request
        buf = bytearray(1 << 16)
        view = memoryview(buf)
        try:
            while True:
                n = sock.recv_into(buf)
                if not n:
                    break
                sock.sendall(view[:n])
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class SinkHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = self.request
        h = hashlib.sha256()
        try:
            _read_to_eof(sock, h.update)
            sock.sendall(h.hexdigest().encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class SourceHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = self.request
        line = b""
        try:
            while not line.endswith(b"\n") and len(line) < 64:
                d = sock.recv(64 - len(line))
                if not d:
                    break
                line += d
            try:
                n = int(line.strip() or b"-1")
            except ValueError:
                n = -1
            if n < 0:
                sock.sendall(b"bad request: want a decimal byte count and a newline\n")
                return
            block = memoryview(pattern_block())
            left = n
            while left:
                k = min(left, len(block))
                sock.sendall(block[:k])
                left -= k
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class HalfCloseHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = self.request
        try:
            n = _read_to_eof(sock, lambda _chunk: None)
            sock.sendall(b"got %d bytes\n" % n)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _http_handler(body: bytes):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"
        server_version = "tether-test-world"

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_HEAD(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    return Handler


def start(bind: str, ports: dict[str, int], body: bytes) -> dict[str, int]:
    """Bind every requested service, serve each in a daemon thread; return the real ports."""
    handlers = {
        "echo": EchoHandler,
        "sink": SinkHandler,
        "source": SourceHandler,
        "halfclose": HalfCloseHandler,
    }
    bound: dict[str, int] = {}
    for name, port in ports.items():
        if name == "http":
            server = _HTTPServer((bind, port), _http_handler(body))
        else:
            server = _TCPServer((bind, port), handlers[name])
        bound[name] = server.server_address[1]
        threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return bound


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bind", default="0.0.0.0")
    for name in SERVICES:
        p.add_argument(f"--{name}", type=int, metavar="PORT")
    p.add_argument("--body", help="HTTP body (default: the world body)")
    args = p.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))

    ports = {name: getattr(args, name) for name in SERVICES if getattr(args, name) is not None}
    if not ports:
        p.error("no service requested")
    body = args.body.encode() if args.body is not None else WORLD_BODY
    bound = start(args.bind, ports, body)
    sys.stdout.write(json.dumps({"ready": True, "pid": os.getpid(), "ports": bound}) + "\n")
    sys.stdout.flush()
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
