"""`tether run --listen` (issue 4, scope 5): host listening sockets handed to CMD, systemd-style.

The sandboxed server is a small Python program that uses only ``LISTEN_FDS``/``LISTEN_PID``/
``LISTEN_FDNAMES`` and fd 3, 4, ...  Checked, rootless and as root: the environment and the fds
CMD gets (nothing else leaks in), clients from the host's loopback (IPv4 and IPv6) and from the
world netns (``--listen 0.0.0.0:PORT``) are accepted by CMD itself and it sees their true
address, 16 MiB both ways intact (sha256), a port already in use (exit 2, nothing started), a
privileged port rootless (exit 2, with the reason), bad syntax.
"""

from __future__ import annotations

import json

import pytest

from world import HOST_ADDR, PEER_ECHO_CLIENT, SANDBOX_PYTHON, WORLD_VETH_ADDR, describe

BIG = 16 << 20

# Serves each accepted connection: first line "peer ADDR PORT", then echoes everything back
# until EOF.  Prints its activation environment first, then "done N" after N connections.
SERVER = r"""
import hashlib, json, os, select, socket, sys
want = int(sys.argv[1])
n = int(os.environ.get("LISTEN_FDS", "0"))
info = {"LISTEN_FDS": n, "pid_ok": os.environ.get("LISTEN_PID") == str(os.getpid()),
        "names": os.environ.get("LISTEN_FDNAMES", ""), "fds": sorted(int(f) for f in os.listdir("/proc/self/fd"))}
print(json.dumps(info), flush=True)
listeners = [socket.socket(fileno=3 + i) for i in range(n)]
for i in range(want):
    ready, _, _ = select.select(listeners, [], [], 30)
    if not ready:
        sys.exit("no client within 30 s")
    conn, peer = ready[0].accept()
    conn.sendall(f"peer {peer[0]} {peer[1]}\n".encode())
    while True:
        data = conn.recv(1 << 16)
        if not data:
            break
        conn.sendall(data)
    conn.close()
print(f"done {want}", flush=True)
"""

def client_in(tether, where: str, host: str, port: int, size: int = BIG) -> dict:
    argv = [SANDBOX_PYTHON, "-c", PEER_ECHO_CLIENT, host, str(port), str(size)]
    r = (tether.world.in_host if where == "host" else tether.world.in_world)(argv, timeout=60)
    assert r.returncode == 0, describe(r)
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_listen_hands_sockets_to_cmd(tether):
    port4, port6, port_any = 18080, 18081, 18082
    proc = tether.popen(["--listen", str(port4), "--listen", f"[::1]:{port6}", "--listen", f"0.0.0.0:{port_any}",
                         "--", SANDBOX_PYTHON, "-c", SERVER, "3"])
    info = json.loads(proc.wait_for_line("LISTEN_FDS"))
    assert info["LISTEN_FDS"] == 3 and info["pid_ok"], info
    assert info["names"] == f"tcp-{port4}:tcp-{port6}:tcp-{port_any}", info
    # 0-2, the three sockets, and the fd listdir itself opened: nothing else of the host's.
    assert info["fds"][:6] == [0, 1, 2, 3, 4, 5] and len(info["fds"]) == 7, info
    for where, host, port in (("host", "127.0.0.1", port4), ("host", "::1", port6),
                              ("world", HOST_ADDR, port_any)):
        res = client_in(tether, where, host, port)
        assert res["got"] == BIG and res["intact"], res
        assert res["peer"] == [res["me"][0], str(res["me"][1])], f"CMD sees the true client: {res}"
    assert res["me"][0] == WORLD_VETH_ADDR, res
    r = proc.finish(timeout=30)
    assert r.returncode == 0 and "done 3" in r.stdout, describe(r)


def test_listen_port_in_use(tether):
    port = 18090
    first = tether.popen(["--listen", str(port), "--", SANDBOX_PYTHON, "-c", SERVER, "1"])
    first.wait_for_line("LISTEN_FDS")
    r = tether.run(["--listen", str(port), "--", "true"])
    assert r.returncode == 2, describe(r)
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr, r.stderr
    assert "another process (or another -p/--listen) uses it" in r.stderr, r.stderr
    res = client_in(tether, "host", "127.0.0.1", port, size=256)
    assert res["intact"], "the first sandbox still serves"
    assert first.finish(timeout=30).returncode == 0


def test_listen_privileged_port_rootless(tether):
    if tether.mode != "rootless":
        pytest.skip("root may listen below 1024")
    r = tether.run(["--listen", "80", "--", "true"])
    assert r.returncode == 2 and "cannot listen on 127.0.0.1:80: Permission denied" in r.stderr, describe(r)
    assert "below 1024" in r.stderr


@pytest.mark.parametrize("spec, message", [
    ("0", "the port must be 1-65535"),
    ("65536", "the port must be 1-65535"),
    ("http", "the port must be 1-65535"),
    ("1.2.3:80", "'1.2.3' is not an IP address"),
    ("::1:80", "an IPv6 address is written [ADDR]:PORT"),
    ("[::1]80", "an IPv6 address is written [ADDR]:PORT"),
], ids=["zero", "too-big", "name", "bad-v4", "bare-v6", "v6-no-colon"])
def test_listen_bad_syntax(tether, spec, message):
    r = tether.run(["--listen", spec, "--", "true"])
    assert r.returncode == 2 and message in r.stderr and "hint: --listen [ADDR:]PORT" in r.stderr, describe(r)
