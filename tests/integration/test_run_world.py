"""The test world itself (no tether involved): the harness the other scenarios rely on."""

from __future__ import annotations

import json

from servers import HOST_BODY, WORLD_BODY, pattern_sha256
from world import (
    DOWNLOAD,
    HALF_CLOSE,
    HOST_ADDR,
    PORTS,
    UPLOAD,
    VENV_PYTHON,
    WORLD_ADDR,
    WORLD_ADDR2,
    links,
)


def _client(world, code, *args, timeout=60):
    r = world.in_host(["/usr/bin/python3", "-c", code, *map(str, args)], timeout=timeout)
    assert r.returncode == 0, r
    return json.loads(r.stdout.splitlines()[-1])


def test_world_servers_reachable_from_host_netns(world):
    for addr in (WORLD_ADDR, WORLD_ADDR2):
        r = world.in_host(["curl", "-sS", "--noproxy", "*", "--max-time", "5", f"http://{addr}/"])
        assert r.returncode == 0 and r.stdout == WORLD_BODY.decode(), r
    r = world.in_host(["socat", "-t", "5", "-", f"TCP:{WORLD_ADDR}:{PORTS['echo']}"], input="ping\n")
    assert r.stdout == "ping\n", r
    n = 5_000_000
    assert _client(world, UPLOAD, WORLD_ADDR, PORTS["sink"], n)["reply"] == pattern_sha256(n)
    res = _client(world, DOWNLOAD, WORLD_ADDR, PORTS["source"], n)
    assert res["received"] == n and res["sha256"] == pattern_sha256(n)
    assert _client(world, HALF_CLOSE, WORLD_ADDR, PORTS["halfclose"], 1234)["reply"] == "got 1234 bytes\n"


def test_world_is_closed(world):
    """Only the world is reachable from the host netns: no default route, only lo and the veth."""
    r = world.in_host(["ip", "-j", "route", "show", "default"])
    assert json.loads(r.stdout or "[]") == [], r.stdout
    assert {link["ifname"] for link in links(world.host_ns)} == {"lo", "eth0"}
    assert {link["ifname"] for link in links(world.world_ns)} == {"lo", "eth0"}
    r = world.in_world(["ip", "-j", "route", "show", "default"])
    assert json.loads(r.stdout or "[]") == [], r.stdout


def test_host_server(world):
    with world.host_server(http=0) as srv:
        r = world.in_host(["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{srv.port}/"])
        assert r.stdout == HOST_BODY.decode(), r
        # bound to loopback only
        r = world.in_host(["curl", "-sS", "--max-time", "5", f"http://{HOST_ADDR}:{srv.port}/"])
        assert r.returncode != 0
    assert not srv.alive()


def test_servers_run_with_the_venv_python(world):
    assert world.python == str(VENV_PYTHON)
