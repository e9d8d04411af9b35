"""Unit tests for tether.activation: parsing --listen, opening the sockets, handing them over.

Bad inputs tried: port 0 / 65536 / a name / negative / empty, a malformed IPv4 address, a bare
IPv6 address with a port, brackets without a colon, an address that is not the host's.  The
hand-over runs in a child process (it rearranges fds 3, 4, ... of whoever calls it).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether import activation
from tether.activation import Listen, ListenError, open_listeners, parse_endpoint, parse_listen
from tether.hostsock import HostSocketError


@pytest.mark.parametrize("text, expect", [
    ("8443", ("127.0.0.1", 8443)),
    ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("192.0.2.1:1", ("192.0.2.1", 1)),
    ("[::1]:65535", ("::1", 65535)),
    ("[::]:8080", ("::", 8080)),
    (" 8443 ", ("127.0.0.1", 8443)),
])
def test_parse_endpoint(text, expect):
    assert parse_endpoint(text) == expect


@pytest.mark.parametrize("text, message", [
    ("0", "1-65535"), ("65536", "1-65535"), ("-1", "1-65535"), ("", "1-65535"), ("http", "1-65535"),
    ("1.2.3:80", "not an IP address"), ("::1:80", "written [ADDR]:PORT"), ("[::1]80", "written [ADDR]:PORT"),
    ("[::1", "written [ADDR]:PORT"), ("host.example:80", "not an IP address"),
], ids=["zero", "too-big", "negative", "empty", "name", "bad-v4", "bare-v6", "v6-no-colon", "v6-unclosed",
        "hostname"])
def test_parse_endpoint_refuses(text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_endpoint(text)
    with pytest.raises(ListenError, match="bad --listen") as info:
        parse_listen(text)
    assert info.value.hint.startswith("--listen [ADDR:]PORT")


@given(st.ip_addresses(), st.integers(1, 65535))
def test_endpoint_round_trip(address, port):
    listen = Listen(str(address), port)
    assert parse_listen(str(listen)) == listen
    assert ":" not in listen.name


def test_open_listeners_all_or_none():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(HostSocketError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use") as info:
            open_listeners([Listen("127.0.0.1", 0), Listen("127.0.0.1", port)])
        assert "another process" in info.value.hint
        with pytest.raises(HostSocketError, match="Cannot assign") as info:
            open_listeners([Listen("192.0.2.123", 5555)])
        assert info.value.hint == "that address is not one of this host's"
        made = open_listeners([Listen("127.0.0.1", 0), Listen("::1", 0)])
        try:
            assert [s.family for s in made] == [socket.AF_INET, socket.AF_INET6]
            assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) for s in made)
            assert all(s.getblocking() for s in made), "CMD gets blocking sockets, as from systemd"
            assert made[1].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        finally:
            for s in made:
                s.close()
    finally:
        taken.close()


HAND_OVER = r"""
import json, os, socket, sys
sys.path[:0] = json.loads(sys.argv[1])
from tether import activation
# Sockets at awkward numbers: one already in a target slot (3), one above, one far above.
a = socket.socket(); b = socket.socket(); c = socket.socket()
fds = [os.dup2(b.fileno(), 40), a.fileno(), os.dup2(c.fileno(), 3)]
inos = [os.fstat(fd).st_ino for fd in fds]
env = activation.hand_over(fds, ["x", "y", "z"], {"LISTEN_FDS": "9", "KEEP": "1"})
print(json.dumps({"env": env, "inos": [os.fstat(3 + i).st_ino for i in range(3)], "want": inos,
                  "inheritable": [os.get_inheritable(3 + i) for i in range(3)], "pid": os.getpid()}))
"""


def test_hand_over_places_fds_and_sets_environment():
    r = subprocess.run([sys.executable, "-c", HAND_OVER, json.dumps(sys.path)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["inos"] == out["want"], "each socket at 3 + its index, none clobbered"
    assert out["inheritable"] == [True, True, True]
    assert out["env"] == {"KEEP": "1", "LISTEN_FDS": "3", "LISTEN_PID": str(out["pid"]), "LISTEN_FDNAMES": "x:y:z"}


def test_hand_over_without_sockets_drops_inherited_variables():
    env = activation.hand_over([], [], {"LISTEN_FDS": "2", "LISTEN_PID": "1", "LISTEN_FDNAMES": "a:b", "PATH": "/bin"})
    assert env == {"PATH": "/bin"}
