"""Unit tests for the engine's published ports (tether.engine.proxy.inbound), in one process.

The holder is faked: ``FakeLink`` answers "blank" requests with plain sockets (no namespaces),
or never answers, or fails; ``_sys.connect_inside`` is replaced by a plain connect to the local
test server (IP_TRANSPARENT needs privileges; the integration tests use the real one).  Checked:
TCP relay both ways with connect/close events; the pool of blank sockets (stocked at start,
refilled, shared by clients); UDP flows per client with replies; the holder failing (client
reset, error event); the limits (waiting TCP clients, UDP flows) refusing with one event;
``remove`` stopping new clients while a live connection goes on; close() ending everything.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from tether.audit import Audit
from tether.engine.proxy import inbound
from tether.engine.proxy.inbound import InboundProxy
from tether.engine.proxy.relay import PipePool
from tether.publish import Publish, open_host_sockets


class FakeLink:
    """Plays the holder: answers "blank" requests with ``count`` plain sockets."""

    def __init__(self, answer: bool = True, fail: bool = False) -> None:
        self.answer, self.fail, self.requests = answer, fail, []

    def request(self, message, on_reply):
        self.requests.append(message)
        if not self.answer:
            return
        if self.fail:
            on_reply({"reply": "blank", "ok": False, "reason": "no such thing"}, [])
            return
        want = message["blank"]
        kind = socket.SOCK_DGRAM if want["kind"] == "udp" else socket.SOCK_STREAM
        on_reply({"reply": "blank", "ok": True},
                 [socket.socket(socket.AF_INET, kind | socket.SOCK_NONBLOCK).detach() for _ in range(want["count"])])


@pytest.fixture(autouse=True)
def plain_connect(monkeypatch):
    """connect_inside without IP_TRANSPARENT: bind anywhere, connect to the loopback port."""
    def connect(sock, source, port):
        sock.bind(("127.0.0.1", 0))
        try:
            sock.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        return sock.getsockname()
    monkeypatch.setattr(inbound._sys, "connect_inside", connect)


class Events(list):
    def __call__(self, record):
        self.append(record)


def make(link, tmp_path):
    audit = Audit("box", sink=open(tmp_path / "log", "w"))
    events = Events()
    audit.subscribers.append(events)
    proxy = InboundProxy(link, audit, PipePool(), {4: "10.0.2.100"}, idle=60)
    return proxy, events


async def in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def tcp_echo_server():
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    return ls


async def serve_echo(ls):
    loop = asyncio.get_running_loop()
    ls.setblocking(False)
    while True:
        conn, _ = await loop.sock_accept(ls)
        data = await loop.sock_recv(conn, 1 << 16)
        await loop.sock_sendall(conn, data.upper())
        conn.close()


def published(proto="tcp", sandbox_port=80):
    """A host socket on a free port, and the spec naming that port (and ``sandbox_port``)."""
    (_, sock), = open_host_sockets([Publish(proto, "127.0.0.1", 0, sandbox_port)])
    port = sock.getsockname()[1]
    return Publish(proto, "127.0.0.1", port, sandbox_port), sock, port


def test_tcp_relay_and_events(tmp_path):
    async def main():
        ls = tcp_echo_server()
        server = asyncio.ensure_future(serve_echo(ls))
        proxy, events = make(FakeLink(), tmp_path)
        spec, sock, port = published(sandbox_port=ls.getsockname()[1])
        proxy.add([(spec, sock)])
        proxy.start()
        assert len(proxy.link.requests) == 1 and len(proxy._pools[(4, "tcp")]) == inbound.POOL_BATCH, \
            "the pool is stocked when the port is published"
        try:
            def talk():
                with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                    c.sendall(b"hello")
                    return c.recv(100)
            assert await in_thread(talk) == b"HELLO"
            for _ in range(100):
                if any(e["event"] == "close" for e in events):
                    break
                await asyncio.sleep(0.01)
            kinds = [e["event"] for e in events]
            assert kinds == ["connect", "close"], events
            close = events[1]
            assert close["direction"] == "in" and close["dst"] == f"10.0.2.100:{spec.sandbox_port}" and close["rule"].startswith("publish:")
            assert (close["bytes_up"], close["bytes_down"]) == (5, 5), close
            assert proxy.listing()[0]["accepted"] == 1
            assert len(proxy._pools[(4, "tcp")]) == inbound.POOL_BATCH - 1, "one blank socket used, no refill yet"
        finally:
            proxy.close()
            server.cancel()
            ls.close()
        assert not proxy._pools, "close() closes the pool"

    asyncio.run(main())


def test_holder_failure_resets_the_client(tmp_path):
    async def main():
        proxy, events = make(FakeLink(fail=True), tmp_path)
        spec, sock, port = published()
        proxy.add([(spec, sock)])
        proxy.start()
        try:
            def talk():
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                        return c.recv(100)
                except ConnectionResetError:
                    return "reset"
            assert await in_thread(talk) in ("reset", b"")
            assert [e["event"] for e in events] == ["error"] and events[0]["reason"] == "no such thing", events
        finally:
            proxy.close()

    asyncio.run(main())


def test_waiting_clients_are_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(inbound, "MAX_CONNECTING", 3)

    async def main():
        proxy, events = make(FakeLink(answer=False), tmp_path)  # the holder never answers
        spec, sock, port = published()
        proxy.add([(spec, sock)])
        proxy.start()
        clients = []
        try:
            for _ in range(5):
                try:
                    clients.append(await in_thread(socket.create_connection, ("127.0.0.1", port), 5))
                except ConnectionResetError:
                    pass  # the 4th and 5th are reset by tether, possibly before connect() returns
                await asyncio.sleep(0.02)
            assert len(proxy.link.requests) == 1, "one refill asked, the clients wait for it"
            assert proxy.refused == 2
            errors = [e for e in events if e["event"] == "error"]
            assert len(errors) == 1 and "3 connections already waiting (1 refused)" in errors[0]["reason"], events
            assert proxy.live == 3
        finally:
            for c in clients:
                c.close()
            proxy.close()
        assert proxy.live == 0, "close() ends the waiting ones too"

    asyncio.run(main())


def test_udp_flows_per_client_and_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(inbound, "MAX_FLOWS", 2)

    async def main():
        echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        echo.bind(("127.0.0.1", 0))
        echo.setblocking(False)
        loop = asyncio.get_running_loop()

        def on_echo():
            data, peer = echo.recvfrom(100)
            echo.sendto(b"re:" + data, peer)
        loop.add_reader(echo.fileno(), on_echo)
        proxy, events = make(FakeLink(), tmp_path)
        spec, sock, port = published("udp", sandbox_port=echo.getsockname()[1])
        proxy.add([(spec, sock)])
        proxy.start()
        clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
        try:
            def ask(c, text):
                c.settimeout(1)
                c.sendto(text, ("127.0.0.1", port))
                try:
                    return c.recv(100)
                except socket.timeout:
                    return None
            assert await in_thread(ask, clients[0], b"a") == b"re:a"
            assert await in_thread(ask, clients[1], b"b") == b"re:b"
            assert await in_thread(ask, clients[0], b"c") == b"re:c", "same client, same flow"
            assert await in_thread(ask, clients[2], b"d") is None, "a third client is beyond the cap"
            assert proxy.live == 2 and proxy.refused == 1
            assert [e["event"] for e in events] == ["connect", "connect", "error"], events
            rows = proxy.connections(proxy.clock())
            assert sorted((r["bytes_down"], r["bytes_up"]) for r in rows) == [(1, 4), (2, 8)], rows
            assert proxy.remove("udp", None, port) == [spec], "flows of a removed port end with it"
            assert proxy.live == 0 and [e["event"] for e in events][-2:] == ["close", "close"]
        finally:
            for c in clients:
                c.close()
            loop.remove_reader(echo.fileno())
            echo.close()
            proxy.close()

    asyncio.run(main())


def test_remove_keeps_live_connections(tmp_path):
    async def main():
        ls = tcp_echo_server()
        proxy, events = make(FakeLink(), tmp_path)
        spec, sock, port = published(sandbox_port=ls.getsockname()[1])
        proxy.add([(spec, sock)])
        proxy.start()
        try:
            client = await in_thread(socket.create_connection, ("127.0.0.1", port), 5)
            inside, _ = await in_thread(ls.accept)
            assert proxy.remove("tcp", "127.0.0.1", port) == [spec]
            with pytest.raises(ConnectionRefusedError):
                await in_thread(socket.create_connection, ("127.0.0.1", port), 5)
            await in_thread(client.sendall, b"still here")
            assert await in_thread(inside.recv, 100) == b"still here"
            assert proxy.remove("tcp", None, port) == [], "nothing left to remove"
            client.close()
            inside.close()
        finally:
            proxy.close()
            ls.close()

    asyncio.run(main())
