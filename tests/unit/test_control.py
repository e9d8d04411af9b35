"""Unit tests for tether.control (server and client over a real Unix socket, in-process) and the
rendering and parameter helpers of ``tether ps``/``tether ctl``.

The server runs on an asyncio loop in this thread; blocking clients run in worker threads.
Covered: hello and calls, unknown methods, a method that fails (``internal``), a result too big
for one frame, streams (events then the response; the client leaving unsubscribes), a client
that never reads (dropped at ``MAX_OUTPUT``, others unaffected), a refused uid, the connection
limit (``busy``), and bad params of the sandbox methods.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from tether import control, ctl, wire
from tether.control import STREAMING, ControlClient, ControlError, ControlServer, MethodError
from tether.policy import DomainPattern, Rule
from tether.sandbox_control import _param, describe_match


def serve(tmp_path: Path, methods: dict, allowed: set[int] | None = None):
    """A started server on ``tmp_path/s.sock`` (call inside a running loop)."""
    path = tmp_path / "s.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(16)
    server = ControlServer(listener, methods, {os.getuid()} if allowed is None else allowed, "test-server")
    server.start()
    return server, str(path)


async def in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def call(path: str, method: str, params: dict | None = None):
    with ControlClient(path, "test-client", timeout=5) as client:
        return client.call(method, params)


def run(coro):
    return asyncio.run(coro)


def test_calls_and_errors(tmp_path):
    def boom(request):
        raise RuntimeError("kaput")

    def picky(request):
        raise MethodError(wire.BAD_PARAMS, "x must be odd")

    methods = {"echo": lambda r: {"params": r.params, "uid": r.peer_uid}, "boom": boom, "picky": picky,
               "huge": lambda r: "x" * (wire.MAX_FRAME + 1)}

    async def main():
        server, path = serve(tmp_path, methods)
        try:
            assert await in_thread(call, path, "echo", {"a": [1, 2]}) == {"params": {"a": [1, 2]}, "uid": os.getuid()}
            for method, code, text in (("nope", wire.UNKNOWN_METHOD, "unknown method 'nope'"),
                                       ("boom", wire.INTERNAL, "kaput"), ("picky", wire.BAD_PARAMS, "odd"),
                                       ("huge", wire.INTERNAL, "cannot be sent")):
                with pytest.raises(ControlError) as info:
                    await in_thread(call, path, method)
                assert info.value.code == code and text in info.value.message, (method, info.value)
            # One connection, several requests, errors in between: it stays usable.
            def session():
                with ControlClient(path, "c", timeout=5) as client:
                    with pytest.raises(ControlError):
                        client.call("boom")
                    return [client.call("echo", {"n": i})["params"]["n"] for i in range(3)]
            assert await in_thread(session) == [0, 1, 2]
        finally:
            server.close()

    run(main())


def test_stream_and_unsubscribe_on_close(tmp_path):
    closed = []

    def count(request):
        for i in range(request.params["n"]):
            request.push({"i": i})
        if request.params.get("follow"):
            request.on_close(lambda: closed.append(request.id))
            return STREAMING
        request.finish({"sent": request.params["n"]})
        return STREAMING

    async def main():
        server, path = serve(tmp_path, {"count": count})
        try:
            def finite():
                with ControlClient(path, "c", timeout=5) as client:
                    return list(client.stream("count", {"n": 5}))
            assert await in_thread(finite) == [{"i": i} for i in range(5)]

            def endless():
                with ControlClient(path, "c", timeout=5) as client:
                    events = client.stream("count", {"n": 3, "follow": True})
                    return [next(events) for _ in range(3)]
            assert await in_thread(endless) == [{"i": i} for i in range(3)]
            for _ in range(100):
                if closed:
                    break
                await asyncio.sleep(0.01)
            assert closed == [1], "the client left: its subscription was told"
        finally:
            server.close()

    run(main())


def test_slow_reader_is_dropped_others_served(tmp_path, monkeypatch):
    monkeypatch.setattr(control, "MAX_OUTPUT", 64 * 1024)
    pushed = {}

    def flood(request):
        n = 0
        while request.push({"pad": "x" * 1000}) and n < 10_000:
            n += 1
        pushed["n"] = n
        return STREAMING

    async def main():
        server, path = serve(tmp_path, {"flood": flood, "ping": lambda r: "pong"})
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.sendall(wire.encode(wire.hello("lazy")) + wire.encode(wire.request(1, "flood")))
            for _ in range(100):
                if "n" in pushed:
                    break
                await asyncio.sleep(0.01)
            assert pushed["n"] < 10_000, "the flood stopped when the client's queue hit the limit"
            assert not server.connections, "the lazy client was dropped"
            s.close()
            assert await in_thread(call, path, "ping") == "pong"
        finally:
            server.close()

    run(main())


def test_refused_uid_and_busy(tmp_path, monkeypatch):
    async def main():
        server, path = serve(tmp_path, {"ping": lambda r: "pong"}, allowed={os.getuid() + 1})
        try:
            with pytest.raises(ControlError) as info:
                await in_thread(call, path, "ping")
            assert info.value.code == wire.PERMISSION_DENIED and f"uid {os.getuid()}" in info.value.message
            assert server.refused == 1
        finally:
            server.close()

    run(main())
    monkeypatch.setattr(control, "MAX_CONNECTIONS", 2)

    async def busy():
        (tmp_path / "s.sock").unlink()
        server, path = serve(tmp_path, {"ping": lambda r: "pong"})
        try:
            held = [await in_thread(ControlClient, path, "held", 5) for _ in range(2)]
            with pytest.raises(ControlError) as info:
                await in_thread(call, path, "ping")
            assert info.value.code == wire.BUSY, info.value
            held[0].close()
            for _ in range(100):
                if len(server.connections) < 2:
                    break
                await asyncio.sleep(0.01)
            assert await in_thread(call, path, "ping") == "pong", "a slot freed, served again"
            held[1].close()
        finally:
            server.close()

    run(busy())


def test_client_errors_when_nobody_listens(tmp_path):
    with pytest.raises(ControlError, match="cannot connect") as info:
        ControlClient(tmp_path / "absent.sock", "c")
    assert info.value.code == "unreachable"


# ---------------------------------------------------------------------------------------------
# sandbox method helpers and rendering


class FakeRequest:
    def __init__(self, params):
        self.params = params


@pytest.mark.parametrize("params, key, kind, default, expect", [
    ({}, "follow", bool, False, False),
    ({"follow": True}, "follow", bool, False, True),
    ({"timeout": 3}, "timeout", (int, float), 10.0, 3),
    ({"timeout": 2.5}, "timeout", (int, float), 10.0, 2.5),
])
def test_param_accepts(params, key, kind, default, expect):
    assert _param(FakeRequest(params), key, kind, default) == expect


@pytest.mark.parametrize("params, key, kind, match", [
    ({"follow": "yes"}, "follow", bool, "wrong type"),
    ({"timeout": True}, "timeout", (int, float), "not a boolean"),
    ({"backlog": 1.5}, "backlog", int, "wrong type"),
    ({"timeout": None}, "timeout", (int, float), "wrong type"),
], ids=["string-for-bool", "bool-for-number", "float-for-int", "null"])
def test_param_refuses(params, key, kind, match):
    with pytest.raises(MethodError, match=match) as info:
        _param(FakeRequest(params), key, kind, 0)
    assert info.value.code == wire.BAD_PARAMS


def test_describe_match():
    import ipaddress
    net = ipaddress.ip_network
    assert describe_match(Rule("builtin:loopback", "deny", net("127.0.0.0/8"), None, None)) == "any 127.0.0.0/8"
    assert describe_match(Rule("x", "allow", net("10.0.0.0/8"), (80, 80), "tcp")) == "tcp 10.0.0.0/8 port 80"
    assert describe_match(Rule("x", "allow", net("::/0"), (1, 1024), "udp")) == "udp ::/0 ports 1-1024"
    for kind, shown in (("suffix", "example.test"), ("subdomains", "*.example.test"), ("exact", "=example.test")):
        rule = Rule("r", "allow", None, None, None, DomainPattern("example.test", kind))
        assert describe_match(rule) == f"any name {shown}"


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
                                     (5 * 2**20, "5.0 MiB"), (3 * 2**30, "3.0 GiB"), (2**50, "1024.0 TiB")])
def test_human_bytes(n, text):
    assert ctl.human_bytes(n) == text


@pytest.mark.parametrize("s, text", [(0, "0s"), (59.9, "59s"), (61, "1m01s"), (3661, "1h01m"), (90000, "1d01h")])
def test_human_duration(s, text):
    assert ctl.human_duration(s) == text


def test_render_ps_and_connections_align():
    rows = [{"name": "web", "pid": 12, "engine": "proxy", "uptime_s": 75, "connections": 3, "denied": 1,
             "bytes_up": 2048, "bytes_down": 10},
            {"name": "a-much-longer-name", "error": "timeout", "uid": 1000}]
    lines = ctl.render_ps(rows).splitlines()
    assert lines[0].split() == ["NAME", "PID", "ENGINE", "UPTIME", "CONNS", "DENIED", "UP", "DOWN"]
    assert lines[1].split()[:6] == ["web", "12", "proxy", "1m15s", "3", "1"] and "2.0 KiB" in lines[1]
    assert "(timeout)" in lines[2]
    assert lines[0].index("PID") < lines[1].index("12") + 2, "columns line up"
    conns = ctl.render_connections([{"proto": "tcp", "src": "10.0.2.100:4000", "dst": "203.0.113.10:80",
                                     "state": "relaying", "age_s": 5, "bytes_up": 1, "bytes_down": 2,
                                     "rule": "default", "name": "example.test"}])
    assert "example.test" in conns and "203.0.113.10:80" in conns and all(line == line.rstrip()
                                                                        for line in conns.splitlines())


def test_render_event_lines():
    line = ctl.render_event({"ts": "T", "event": "close", "proto": "tcp", "src": "a:1", "dst": "b:2",
                             "verdict": "allow", "rule": "default", "bytes_up": 2048, "bytes_down": 0})
    assert line == "T close   tcp  a:1 -> b:2 allow by default up 2.0 KiB down 0 B"
    line = ctl.render_event({"ts": "T", "event": "deny", "proto": "udp", "src": "a:1", "dst": "b:2",
                             "verdict": "deny", "rule": "b", "name": "x.test", "reason": "why"})
    assert line == "T deny    udp  a:1 -> b:2 (x.test) deny by b: why"
    assert "?" in ctl.render_event({}), "missing fields never crash the renderer"


def test_fds_to_a_method_that_takes_none_close_the_connection(tmp_path):
    async def main():
        server, path = serve(tmp_path, {"ping": lambda r: "pong"})
        try:
            r, w = os.pipe()
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.sendall(wire.encode(wire.hello("c")))
            socket.send_fds(s, [wire.encode(wire.request(1, "ping"), 1)], [r])
            os.close(r)
            s.settimeout(5)
            data = b""
            while True:
                chunk = await in_thread(s.recv, 65536)
                if not chunk:
                    break
                data += chunk
            assert b'"code":"unexpected-fd"' in data.replace(b" ", b""), data
            # The server closed its copy of the pipe's read end: the write end now sees EPIPE.
            for _ in range(100):
                try:
                    os.write(w, b"x")
                except BrokenPipeError:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the fd sent to the server was not closed")
            os.close(w)
            s.close()
            assert await in_thread(call, path, "ping") == "pong", "other clients unaffected"
        finally:
            server.close()

    run(main())


# ---------------------------------------------------------------------------------------------
# the sandbox's methods, on fakes (the real engine is covered by the integration tests)


class FakeEngine:
    class inbound:
        @staticmethod
        def listing():
            return [{"key": "127.0.0.1:8080"}]

        @staticmethod
        def remove(proto, address, port):
            return []

    def totals(self):
        return {"connections": 2, "denied": 1, "bytes_up": 10, "bytes_down": 20}

    def connections(self):
        return [{"proto": "tcp"}]


class Pushed:
    """A Request stand-in that records what a streaming method pushes."""

    def __init__(self, params):
        self.params, self.pushed, self.finished, self.closers = params, [], None, []

    def push(self, event):
        self.pushed.append(event)
        return True

    def finish(self, result=None):
        self.finished = result

    def on_close(self, callback):
        self.closers.append(callback)


def sandbox_control(stopped=None):
    from datetime import UTC, datetime

    from tether.audit import Audit
    from tether.policy import build_policy
    from tether.sandbox_control import SandboxControl, SandboxInfo

    audit = Audit("box", sink=open(os.devnull, "w"))
    policy = build_policy(None, ["203.0.113.10"], [], "deny", [])
    info = SandboxInfo("box", 4242, ["sleep", "1"], None, 0.0, datetime.now(UTC))
    return SandboxControl(info, FakeEngine(), audit, lambda: policy,
                          stop=(stopped.append if stopped is not None else lambda t: None),
                          reload=lambda done: None), audit


def test_status_and_connections():
    control, _ = sandbox_control()
    status = control.status(FakeRequest({}))
    assert status["name"] == "box" and status["pid"] == 4242 and status["engine"] == "proxy"
    assert (status["connections"], status["denied"], status["bytes_up"], status["bytes_down"]) == (2, 1, 10, 20)
    assert control.connections(FakeRequest({})) == {"connections": [{"proto": "tcp"}]}
    assert control.ports_list(FakeRequest({})) == {"ports": [{"key": "127.0.0.1:8080"}]}


def test_events_backlog_then_follow_then_unsubscribe():
    control, audit = sandbox_control()
    for i in range(5):
        audit.emit("deny", proto="tcp", src="a:1", dst=f"b:{i}", rule="r", verdict="deny")
    request = Pushed({"backlog": 2})
    assert control.events(request) is STREAMING
    assert [e["dst"] for e in request.pushed] == ["b:3", "b:4"] and request.finished == {"events": 2}
    follower = Pushed({"backlog": 0, "follow": True})
    control.events(follower)
    audit.emit("connect", proto="tcp", src="a:1", dst="c:1", rule="r", verdict="allow")
    assert [e["dst"] for e in follower.pushed] == ["c:1"] and follower.finished is None
    follower.closers[0]()
    audit.emit("connect", proto="tcp", src="a:1", dst="c:2", rule="r", verdict="allow")
    assert len(follower.pushed) == 1, "unsubscribed when the client left"


@pytest.mark.parametrize("method, params, match", [
    ("events", {"backlog": -1}, "backlog must be >= 0"),
    ("events", {"follow": 1}, "wrong type"),
    ("stop", {"timeout": -1}, "timeout must be 0-3600"),
    ("stop", {"timeout": 1e9}, "timeout must be 0-3600"),
    ("stop", {"timeout": "soon"}, "wrong type"),
    ("ports_add", {"spec": "nonsense"}, "bad -p"),
    ("ports_add", {}, "bad -p"),
    ("ports_rm", {"port": "x"}, "bad port"),
    ("ports_rm", {"port": "9999"}, "not published"),
], ids=["negative-backlog", "follow-int", "negative-timeout", "huge-timeout", "string-timeout", "bad-spec",
        "no-spec", "bad-port", "unknown-port"])
def test_bad_params(method, params, match):
    control, _ = sandbox_control()
    with pytest.raises(MethodError, match=match) as info:
        getattr(control, method)(FakeRequest(params))
    assert info.value.code in (wire.BAD_PARAMS, wire.NOT_FOUND)


def test_stop_passes_the_timeout():
    stopped = []
    control, _ = sandbox_control(stopped)
    assert control.stop(FakeRequest({"timeout": 3})) == {"stopping": True, "timeout": 3.0}
    assert stopped == [3.0]


def test_policy_show_lists_rules_in_order():
    control, _ = sandbox_control()
    shown = control.policy_show(FakeRequest({}))
    assert shown["default"] == "deny" and shown["file"] is None
    assert shown["rules"][0] == {"action": "allow", "rule": "203.0.113.10", "match": "any 203.0.113.10/32"}


def test_a_connection_that_never_says_hello_loses_its_slot(tmp_path):
    """Slow-loris: connecting and staying silent holds one of the server's limited slots; with
    ``hello_timeout`` the server closes it (with an error saying why), and a client that does
    say hello in time is served."""
    async def main():
        path = tmp_path / "s.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
        listener.listen(16)
        server = ControlServer(listener, {"ping": lambda r: "pong"}, {os.getuid()}, "test-server",
                               max_connections=1, hello_timeout=0.2)
        server.start()
        try:
            silent = socket.socket(socket.AF_UNIX)
            silent.connect(str(path))
            silent.setblocking(False)
            loop = asyncio.get_running_loop()
            reply = await asyncio.wait_for(loop.sock_recv(silent, 4096), 5)
            assert b'"code":"bad-field"' in reply and b"no hello within 0.2 s" in reply
            assert await asyncio.wait_for(loop.sock_recv(silent, 4096), 5) == b""  # closed
            silent.close()
            assert await in_thread(call, str(path), "ping") == "pong"  # the slot is free again
        finally:
            server.close()

    run(main())
