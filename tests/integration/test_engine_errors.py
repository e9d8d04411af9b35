"""Upstream failures and hostile clients: every failure resets the sandboxed client at once,
is audited with a reason, and leaves every other connection untouched.

Bad inputs tried here: a destination whose port is closed (the world answers RST), a destination
that never answers (the world drops the SYN: timeout), and a sandboxed process that connects
straight to the engine's own capture socket (no original destination) while another
connection is being relayed.
"""

from __future__ import annotations

import pytest

from world import WORLD_ADDR, check_event, select_events, sh

pytestmark = pytest.mark.integration

# Connect, send, read: reports how the connection ended (after the connect succeeded, which it
# always does: the sandbox's own kernel accepts it on the engine's behalf).
FETCH = r"""
import errno, json, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
t0 = time.monotonic()
try:  # the engine's reset can arrive before connect() returns
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(b"hello\n")
    data = s.recv(100)
    outcome = {"outcome": "data" if data else "eof", "data": data.decode(errors="replace")}
except OSError as e:
    outcome = {"outcome": errno.errorcode.get(e.errno, str(e.errno))}
outcome["seconds"] = time.monotonic() - t0
print(json.dumps(outcome))
"""

# A process inside the sandbox finds the engine's capture listener (the only listening TCP
# socket in the netns) and connects to it directly, while a relayed echo connection is open.
DIRECT_TO_ENGINE = r"""
import json, socket, sys
def listeners():
    with open("/proc/net/tcp") as f:
        for line in list(f)[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state == "0A":
                yield int(local.split(":")[1], 16)
echo = socket.create_connection((sys.argv[1], 7), timeout=10)
echo.sendall(b"before\n")
before = echo.recv(100)
port = next(listeners())
try:  # the reset may come before connect() even returns
    hostile = socket.create_connection(("127.0.0.1", port), timeout=10)
    hostile.sendall(b"x")
    hostile_result = "data" if hostile.recv(10) else "eof"
except ConnectionResetError:
    hostile_result = "reset"
echo.sendall(b"after\n")
after = echo.recv(100)
print(json.dumps({"before": before.decode(), "after": after.decode(), "hostile": hostile_result}))
"""


def test_refused_upstream_resets_the_client(tether):
    log = tether.log_path()
    result, r = tether.python_json(FETCH, WORLD_ADDR, 9, opts=["--log", log])
    assert result["outcome"] in ("ECONNRESET", "eof"), result
    assert result["outcome"] == "ECONNRESET", f"want a reset, not a clean close: {result}"
    errors = select_events(tether.events(log), event="error", dst=f"{WORLD_ADDR}:9")
    assert len(errors) == 1, tether.events(log)
    check_event(errors[0])
    assert errors[0]["reason"] == "Connection refused", errors[0]
    assert errors[0]["verdict"] == "allow" and errors[0]["rule"] == "default", errors[0]


@pytest.fixture
def blackhole(world):
    """The world silently drops SYNs to port 9999 (nft table in the world netns, removed after)."""
    sh(["ip", "netns", "exec", world.world_ns, "nft",
        "add table inet blackhole; add chain inet blackhole in { type filter hook input priority 0; }; "
        "add rule inet blackhole in tcp dport 9999 drop"])
    yield 9999
    sh(["ip", "netns", "exec", world.world_ns, "nft", "delete table inet blackhole"])


def test_upstream_timeout_resets_the_client(tether, blackhole):
    log = tether.log_path()
    result, r = tether.python_json(FETCH, WORLD_ADDR, blackhole, opts=["--log", log, "--connect-timeout", "1"])
    assert result["outcome"] == "ECONNRESET", result
    # Reset by the timeout (1 s), not by the client's own 30 s socket timeout.
    assert result["seconds"] < 15, result
    errors = select_events(tether.events(log), event="error", dst=f"{WORLD_ADDR}:{blackhole}")
    assert len(errors) == 1 and errors[0]["reason"] == "timeout", tether.events(log)
    assert errors[0]["duration_ms"] >= 900, errors[0]


def test_direct_connection_to_the_engine_harms_nobody_else(tether):
    log = tether.log_path()
    result, r = tether.python_json(DIRECT_TO_ENGINE, WORLD_ADDR, opts=["--log", log])
    assert result["before"] == "before\n" and result["after"] == "after\n", result
    assert result["hostile"] in ("reset", "eof"), result
    events = tether.events(log)
    hostile = [ev for ev in events if ev["event"] == "error" and "original destination" in ev.get("reason", "")]
    assert len(hostile) == 1, events
    echo_closes = select_events(events, event="close", dst=f"{WORLD_ADDR}:7")
    assert len(echo_closes) == 1 and echo_closes[0]["bytes_up"] == len("before\nafter\n"), events
