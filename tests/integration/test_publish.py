"""`tether run -p` and `tether ctl NAME ports` (issue 4, scope 4): ports published into the sandbox.

A sandboxed TCP server (and a UDP one) listens on the sandbox's loopback; clients connect from the
host's loopback and from the world netns.  Checked, rootless and as root: the sandboxed server sees
each client's true address and port; 64 MiB echoed intact (sha256) (1 GiB once, as root); UDP
with a flow per client; ``ports add``/``rm`` at run time (a removed port refuses new clients,
a live connection stays); a host port already in use (exit 2 at start, ``conflict`` from ``ports
add``); ranges; bad specs; a published port nobody listens on (the client gets a reset, an
``error`` event says why); events carry ``direction: "in"``.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from world import HOST_ADDR, PEER_ECHO_CLIENT, SANDBOX_PYTHON, WORLD_VETH_ADDR, describe

# TCP echo server(s) on the sandbox's loopback: first line "peer ADDR PORT", then echo until EOF.
# UDP: answers each datagram with "peer ADDR PORT|" + the datagram.  argv: tcp-ports udp-ports.
SERVERS = r"""
import json, socket, sys, threading
tcp_ports = [int(p) for p in sys.argv[1].split(",") if p]
udp_ports = [int(p) for p in sys.argv[2].split(",") if p]
def serve_tcp(port):
    ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port)); ls.listen(64)
    while True:
        conn, peer = ls.accept()
        threading.Thread(target=echo, args=(conn, peer), daemon=True).start()
def echo(conn, peer):
    conn.sendall(f"peer {peer[0]} {peer[1]}\n".encode())
    while True:
        data = conn.recv(1 << 16)
        if not data:
            break
        conn.sendall(data)
    conn.close()
def serve_udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", port))
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(f"peer {peer[0]} {peer[1]}|".encode() + data, peer)
for p in tcp_ports:
    threading.Thread(target=serve_tcp, args=(p,), daemon=True).start()
for p in udp_ports:
    threading.Thread(target=serve_udp, args=(p,), daemon=True).start()
print("serving", flush=True)
sys.stdin.read()
"""

UDP_CLIENT = r"""
import json, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5); s.connect((host, port))
out = []
for i in range(n):
    s.send(b"d%d" % i)
    try:
        out.append(s.recv(65535).decode())
    except socket.timeout:
        out.append(None)
print(json.dumps({"me": [s.getsockname()[0], str(s.getsockname()[1])], "replies": out}))
"""


# Connects, says so, waits for a line on stdin, then sends "abc" and prints the echo.
HELD = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
f = s.makefile("rb")
print("connected " + f.readline().decode().strip(), flush=True)
sys.stdin.readline()
s.sendall(b"abc")
print("echo " + f.read(3).decode(), flush=True)
"""


class Server:
    def __init__(self, tether, opts: list[str], tcp=(), udp=()):
        self.proc = tether.popen([*opts, "--", SANDBOX_PYTHON, "-c", SERVERS, ",".join(map(str, tcp)),
                                  ",".join(map(str, udp))], stdin=subprocess.PIPE)
        self.proc.wait_for_line("serving")

    def stop(self) -> subprocess.CompletedProcess:
        return self.proc.finish(timeout=30, input=b"")


def client(tether, where: str, code: str, *argv) -> dict:
    run = tether.world.in_host if where == "host" else tether.world.in_world
    r = run([SANDBOX_PYTHON, "-c", code, *map(str, argv)], timeout=120)
    assert r.returncode == 0, describe(r)
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_tcp_publish_true_client_and_integrity(tether):
    log = tether.log_path()
    server = Server(tether, ["--log", str(log), "-p", "18100:80", "-p", "0.0.0.0:18101:80"], tcp=[80])
    size = (1 << 30) if tether.mode == "root" else (64 << 20)
    res = client(tether, "host", PEER_ECHO_CLIENT, "127.0.0.1", 18100, size)
    assert res.get("intact") and res["got"] == size, res
    assert res["peer"] == res["me"], f"the sandboxed server sees the real client: {res}"
    res = client(tether, "world", PEER_ECHO_CLIENT, HOST_ADDR, 18101, 1 << 20)
    assert res.get("intact") and res["peer"] == res["me"] and res["me"][0] == WORLD_VETH_ADDR, res
    # Published only where asked: 18100 is on the loopback only.
    assert client(tether, "world", PEER_ECHO_CLIENT, HOST_ADDR, 18100, 1)["error"] == "ConnectionRefusedError"
    assert server.stop().returncode == 0
    events = [e for e in tether.events(log) if e.get("direction") == "in"]
    connects = [e for e in events if e["event"] == "connect"]
    closes = [e for e in events if e["event"] == "close"]
    assert len(connects) == 2 and len(closes) == 2, events
    assert {e["rule"] for e in connects} == {"publish:127.0.0.1:18100", "publish:0.0.0.0:18101"}, connects
    assert all(e["dst"] == "10.0.2.100:80" and e["proto"] == "tcp" for e in connects), connects
    assert max(e["bytes_down"] for e in closes) == size and max(e["bytes_up"] for e in closes) > size, closes


def test_udp_publish_flow_per_client(tether):
    log = tether.log_path()
    server = Server(tether, ["--log", str(log), "-p", "0.0.0.0:18200:53/udp"], udp=[53])
    res = client(tether, "world", UDP_CLIENT, HOST_ADDR, 18200, 3)
    want_peer = f"peer {res['me'][0]} {res['me'][1]}|"
    assert res["replies"] == [f"{want_peer}d{i}" for i in range(3)], res
    res2 = client(tether, "host", UDP_CLIENT, "127.0.0.1", 18200, 2)
    assert res2["replies"] == [f"peer 127.0.0.1 {res2['me'][1]}|d{i}" for i in range(2)], res2
    rows = json.loads(tether.tool(["ctl", _name_of(tether, log), "connections", "--json"]).stdout)
    inbound = [r for r in rows if r.get("direction") == "in" and r["proto"] == "udp"]
    assert len(inbound) == 2 and all(r["dst"] == "10.0.2.100:53" for r in inbound), rows
    assert server.stop().returncode == 0
    closes = [e for e in tether.events(log) if e.get("direction") == "in" and e["event"] == "close"]
    assert len(closes) == 2 and all(e["proto"] == "udp" for e in closes), closes


def _name_of(tether, log) -> str:
    return next(e["sandbox"] for e in tether.events(log))


def test_ports_add_rm_at_run_time(tether):
    name = f"ports-{tether.mode}"
    log = tether.log_path()
    server = Server(tether, ["--name", name, "--log", str(log), "-p", "18300:80"], tcp=[80, 81])
    assert client(tether, "host", PEER_ECHO_CLIENT, "127.0.0.1", 18301, 1)["error"] == "ConnectionRefusedError"
    r = tether.tool(["ctl", name, "ports", "add", "18301-18302:80-81"])
    assert r.returncode == 0 and "published 127.0.0.1:18301, 127.0.0.1:18302" in r.stdout, describe(r)
    assert client(tether, "host", PEER_ECHO_CLIENT, "127.0.0.1", 18302, 1000)["intact"]
    listing = json.loads(tether.tool(["ctl", name, "ports", "list", "--json"]).stdout)
    assert [(p["key"], p["sandbox_port"]) for p in listing] == [("127.0.0.1:18300", 80), ("127.0.0.1:18301", 80),
                                                                ("127.0.0.1:18302", 81)], listing
    assert [p["accepted"] for p in listing] == [0, 0, 1], listing
    human = tether.tool(["ctl", name, "ports", "list"]).stdout
    assert human.splitlines()[0].split() == ["PROTO", "HOST", "SANDBOX", "PORT", "ACCEPTED"], human
    # A conflict at run time: the port is ours already.
    r = tether.tool(["ctl", name, "ports", "add", "18300:81"])
    assert r.returncode == 1 and "Address already in use" in r.stderr and "conflict" in r.stderr, describe(r)
    # rm: new clients refused; a connection opened before stays.
    held = subprocess.Popen(["ip", "netns", "exec", tether.world.host_ns, SANDBOX_PYTHON, "-c", HELD, "18301"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline().startswith("connected peer 127.0.0.1")
        r = tether.tool(["ctl", name, "ports", "rm", "18301"])
        assert r.returncode == 0 and "unpublished 127.0.0.1:18301" in r.stdout, describe(r)
        assert client(tether, "host", PEER_ECHO_CLIENT, "127.0.0.1", 18301, 1)["error"] == "ConnectionRefusedError"
        out, _ = held.communicate("go\n", timeout=20)
    finally:
        if held.poll() is None:
            held.kill()
            held.communicate()
    assert out.strip() == "echo abc", f"the connection made before rm still works: {out!r}"
    r = tether.tool(["ctl", name, "ports", "rm", "18302", "--json"])
    assert r.returncode == 0 and json.loads(r.stdout) == {"removed": ["127.0.0.1:18302"]}, describe(r)
    r = tether.tool(["ctl", name, "ports", "add", "[::1]:18303:80", "--json"])
    assert r.returncode == 0 and json.loads(r.stdout) == {"added": ["[::1]:18303"]}, describe(r)
    r = tether.tool(["ctl", name, "ports", "rm", "18301"])
    assert r.returncode == 1 and "is not published" in r.stderr and "not-found" in r.stderr, describe(r)
    r = tether.tool(["ctl", name, "ports", "add", "nonsense"])
    assert r.returncode == 1 and "bad-params" in r.stderr, describe(r)
    assert server.stop().returncode == 0


def test_publish_conflict_at_start(tether):
    server = Server(tether, ["-p", "18400:80"], tcp=[80])
    r = tether.run(["-p", "18400:80", "--", "true"])
    assert r.returncode == 2, describe(r)
    assert "cannot publish 127.0.0.1:18400->80/tcp: Address already in use" in r.stderr, r.stderr
    assert "pick another port" in r.stderr
    assert server.stop().returncode == 0


def test_published_port_nobody_listens(tether):
    log = tether.log_path()
    server = Server(tether, ["--log", str(log), "-p", "18500:99"], tcp=[80])
    res = client(tether, "host", PEER_ECHO_CLIENT, "127.0.0.1", 18500, 1)
    assert res.get("error") in ("closed", "ConnectionResetError"), res
    assert server.stop().returncode == 0
    errors = [e for e in tether.events(log) if e["event"] == "error" and e.get("direction") == "in"]
    assert errors and "sandbox port 99: Connection refused" in errors[0]["reason"], errors


@pytest.mark.parametrize("spec, message", [
    ("0:80", "host port '0'"), ("8000-8002:9000-9001", "differ in length"), ("1.2.3:80:80", "not an IP address"),
    ("80:80/sctp", "not tcp or udp"),
], ids=["zero", "lengths", "bad-address", "protocol"])
def test_publish_bad_spec(tether, spec, message):
    r = tether.run(["-p", spec, "--", "true"])
    assert r.returncode == 2 and message in r.stderr and "hint: -p [HOSTADDR:]" in r.stderr, describe(r)
