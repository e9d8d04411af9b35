"""`tether ps` and `tether ctl` (issue 4): the per-sandbox control socket, for real.

Every test runs rootless and as root (the ``tether`` fixture).  Checked: ``ps`` (human and JSON,
the fields scripts rely on), ``ctl connections`` (a live TCP connection and UDP flow with their
bytes), ``ctl events`` (backlog, ``--follow`` seeing new events live), ``ctl policy show``,
``ctl stop`` (graceful exit; SIGKILL after ``--timeout`` for a CMD that ignores SIGTERM), a name
already in use (exit 2, clear message), a crashed run's stale socket (cleaned, never reused),
a peer of another uid (refused by SO_PEERCRED), hostile clients (garbage, oversized frames, fds
then vanishing: no fd leaks in tether, other clients unaffected) and 100 concurrent clients.
The leak check after each test also fails on a control socket or lock file left behind.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from world import SANDBOX_PYTHON, describe

SRC = Path(__file__).resolve().parents[2] / "src"
WORLD = "203.0.113.10"
SINK = 9000
UDP_ECHO = 7


def unique_name(prefix: str = "it") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def runtime_dir_of(tether) -> Path:
    return Path("/run/tether") if tether.mode == "root" else Path(f"/tmp/tether-{tether.test_pw.pw_uid}")


def wait_until(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def ps_json(tether, user: str | None = None) -> list[dict]:
    r = tether.tool(["ps", "--json"], user=user)
    assert r.returncode == 0, describe(r)
    return json.loads(r.stdout)


def entry(tether, name: str, user: str | None = None) -> dict | None:
    return next((row for row in ps_json(tether, user) if row.get("name") == name), None)


# A sandboxed script driven by stdin: one command per line, "ok ..." printed after each.
#   tcp   -> open and keep a TCP connection to the world's sink, send 1000 bytes on it
#   udp   -> send 100 bytes to the world's UDP echo and read the answer (the flow stays)
#   deny  -> connect to 198.51.100.99:80 (denied by --deny in the tests)
#   quit  -> exit 0
DRIVEN = r"""
import socket, sys
keep = []
print("ok ready", flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "tcp":
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
        s.sendall(b"x" * 1000)
        keep.append(s)
    elif cmd == "udp":
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(5)
        u.connect((sys.argv[1], int(sys.argv[3])))
        u.send(b"y" * 100)
        u.recv(1000)
        keep.append(u)
    elif cmd == "deny":
        try:
            socket.create_connection(("198.51.100.99", 80), timeout=5).close()
        except OSError as e:
            pass
    elif cmd == "quit":
        break
    print("ok " + cmd, flush=True)
"""


class Driven:
    """A running ``tether run --name NAME`` whose CMD obeys commands on stdin."""

    def __init__(self, tether, name: str, opts: list[str] = ()) -> None:
        self.tether, self.name = tether, name
        self.proc = tether.popen(["--name", name, *opts, "--", SANDBOX_PYTHON, "-c", DRIVEN, WORLD, SINK, UDP_ECHO],
                                 stdin=subprocess.PIPE)
        self.proc.wait_for_line("ok ready")

    def do(self, cmd: str) -> None:
        self.proc.popen.stdin.write(f"{cmd}\n".encode())
        self.proc.popen.stdin.flush()
        self.proc.wait_for_line(f"ok {cmd}")

    def quit(self) -> subprocess.CompletedProcess:
        return self.proc.finish(timeout=30, input=b"quit\n")


# --------------------------------------------------------------------------------------------
# ps


def test_ps_lists_the_running_sandbox(tether):
    name = unique_name("ps")
    box = Driven(tether, name)
    row = entry(tether, name)
    assert row is not None, ps_json(tether)
    for key, kind in (("name", str), ("pid", int), ("engine", str), ("uptime_s", float), ("connections", int),
                      ("denied", int), ("bytes_up", int), ("bytes_down", int)):
        assert isinstance(row[key], kind), (key, row)
    assert row["engine"] == "proxy" and row["connections"] == 0 and row["uptime_s"] < 60, row
    # pid is the sandbox's pid 1 (the holder), a child of tether.
    status = Path(f"/proc/{row['pid']}/status").read_text()
    assert f"PPid:\t{row['tether_pid']}" in status, status
    human = tether.tool(["ps"])
    assert human.returncode == 0, describe(human)
    header, *lines = human.stdout.splitlines()
    assert header.split() == ["NAME", "PID", "ENGINE", "UPTIME", "CONNS", "DENIED", "UP", "DOWN"], human.stdout
    mine = [line for line in lines if line.split()[0] == name]
    assert len(mine) == 1 and mine[0].split()[1:3] == [str(row["pid"]), "proxy"], human.stdout
    r = box.quit()
    assert r.returncode == 0, describe(r)
    assert entry(tether, name) is None, "gone from ps once it exited"
    assert not list(runtime_dir_of(tether).glob(f"{name}.*")), "socket and lock removed at exit"


def test_root_sees_every_users_sandboxes(tether):
    if tether.mode != "rootless":
        pytest.skip("the rootless sandbox is the one root must see")
    name = unique_name("seen")
    box = Driven(tether, name)
    row = entry(tether, name, user="root")
    assert row is not None and row["uid"] == tether.test_pw.pw_uid, ps_json(tether, user="root")
    r = tether.tool(["ctl", name, "connections", "--json"], user="root")
    assert r.returncode == 0 and json.loads(r.stdout) == [], describe(r)
    box.quit()


# --------------------------------------------------------------------------------------------
# connections, events, policy


def test_connections_and_counters(tether):
    name = unique_name("conns")
    box = Driven(tether, name)
    box.do("tcp")
    box.do("udp")
    r = tether.tool(["ctl", name, "connections", "--json"])
    assert r.returncode == 0, describe(r)
    rows = json.loads(r.stdout)
    tcp = [c for c in rows if c["proto"] == "tcp" and c["dst"] == f"{WORLD}:{SINK}"]
    udp = [c for c in rows if c["proto"] == "udp" and c["dst"] == f"{WORLD}:{UDP_ECHO}"]
    assert len(tcp) == 1 and len(udp) == 1, rows
    assert tcp[0]["state"] == "relaying" and tcp[0]["bytes_up"] == 1000 and tcp[0]["rule"] == "default", tcp
    assert (udp[0]["bytes_up"], udp[0]["bytes_down"]) == (100, 100), udp
    assert all(c["age_s"] >= 0 and c["src"].startswith("10.0.2.100:") for c in rows), rows
    human = tether.tool(["ctl", name, "connections"])
    assert f"{WORLD}:{SINK}" in human.stdout and "relaying" in human.stdout, human.stdout
    row = entry(tether, name)
    assert row["connections"] == 2 and row["bytes_up"] >= 1100 and row["bytes_down"] >= 100, row
    box.quit()


def test_events_backlog_and_follow(tether):
    name = unique_name("events")
    box = Driven(tether, name, ["--deny", "198.51.100.99"])
    box.do("deny")
    r = tether.tool(["ctl", name, "events", "--json"])
    assert r.returncode == 0, describe(r)
    events = [json.loads(line) for line in r.stdout.splitlines()]
    denies = [e for e in events if e["event"] == "deny" and e["dst"] == "198.51.100.99:80"]
    assert len(denies) == 1 and denies[0]["rule"] == "198.51.100.99" and denies[0]["sandbox"] == name, events
    follower = subprocess.Popen(tether.argv(["ctl", name, "events", "--follow", "--json", "--backlog", "0"],
                                            subcommand=""), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=tether.env(), text=True)
    try:
        time.sleep(0.5)  # subscribed
        box.do("tcp")
        box.do("deny")
        r = box.quit()
        out, err = follower.communicate(timeout=15)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate()
    assert follower.returncode == 0, err
    live = [json.loads(line) for line in out.splitlines()]
    kinds = [(e["event"], e["dst"]) for e in live]
    assert ("connect", f"{WORLD}:{SINK}") in kinds and ("deny", "198.51.100.99:80") in kinds, kinds
    assert ("close", f"{WORLD}:{SINK}") in kinds, f"the close at exit reaches the follower too: {kinds}"
    human = tether.tool(["ctl", name, "events"])
    assert human.returncode != 0 and "no running sandbox" in human.stderr, describe(human)


def test_policy_show(tether):
    name = unique_name("policy")
    box = Driven(tether, name, ["--default", "deny", "--allow", "tcp://203.0.113.0/24:80-90",
                                "--allow", "*.example.test", "--deny", "203.0.113.66"])
    r = tether.tool(["ctl", name, "policy", "show", "--json"])
    assert r.returncode == 0, describe(r)
    policy = json.loads(r.stdout)
    assert policy["default"] == "deny", policy
    texts = [rule["rule"] for rule in policy["rules"]]
    assert texts.index("203.0.113.66") < texts.index("tcp://203.0.113.0/24:80-90"), "denies first"
    assert {"action": "allow", "rule": "*.example.test", "match": "any name *.example.test"} in policy["rules"]
    assert {"action": "allow", "rule": "tcp://203.0.113.0/24:80-90",
            "match": "tcp 203.0.113.0/24 ports 80-90"} in policy["rules"]
    human = tether.tool(["ctl", name, "policy", "show"])
    assert human.stdout.startswith("default: deny") and "builtin:loopback" in human.stdout, human.stdout
    box.quit()


# --------------------------------------------------------------------------------------------
# stop


def test_stop_is_graceful(tether):
    name = unique_name("stop")
    proc = tether.popen(["--name", name, "--", "sleep", "60"])
    wait_until(lambda: entry(tether, name), what="the sandbox in ps")
    started = time.monotonic()
    r = tether.tool(["ctl", name, "stop", "--timeout", "5"])
    assert r.returncode == 0 and f"stopped {name}" in r.stdout, describe(r)
    result = proc.finish(timeout=10)
    assert result.returncode == 128 + 15, f"CMD died of SIGTERM: {describe(result)}"
    assert time.monotonic() - started < 4, "SIGTERM, not the timeout, ended it"


def test_stop_kills_after_timeout(tether):
    name = unique_name("stopkill")
    ignore = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    proc = tether.popen(["--name", name, "--", SANDBOX_PYTHON, "-c", ignore])
    proc.wait_for_line("up")
    started = time.monotonic()
    r = tether.tool(["ctl", name, "stop", "--timeout", "1", "--json"])
    assert r.returncode == 0 and json.loads(r.stdout) == {"name": name, "stopped": True}, describe(r)
    result = proc.finish(timeout=15)
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 8, f"SIGKILL about 1 s after the SIGTERM, took {elapsed:.1f} s"
    assert result.returncode == 128 + 9, describe(result)


def test_stop_bad_timeout_and_unknown_sandbox(tether):
    r = tether.tool(["ctl", unique_name("nobody"), "stop", "--timeout", "1"])
    assert r.returncode == 1 and "no running sandbox named" in r.stderr and "tether ps" in r.stderr, describe(r)
    r = tether.tool(["ctl", "../etc/passwd", "stop"])
    assert r.returncode == 1 and "bad sandbox name" in r.stderr, describe(r)


# --------------------------------------------------------------------------------------------
# names and stale sockets


def test_name_in_use_is_refused(tether):
    name = unique_name("dup")
    box = Driven(tether, name)
    r = tether.run(["--name", name, "--", "true"])
    assert r.returncode == 2 and f"a sandbox named '{name}' is already running" in r.stderr, describe(r)
    assert "tether ctl" in r.stderr, "the hint says how to stop it"
    assert entry(tether, name) is not None, "the running one is untouched"
    box.quit()


def test_stale_socket_is_cleaned_not_reused(tether):
    name = unique_name("stale")
    directory = runtime_dir_of(tether)
    # A crashed run: tether killed with SIGKILL leaves its socket and lock behind.
    proc = tether.popen(["--name", name, "--", "sleep", "60"])
    wait_until(lambda: entry(tether, name), what="the sandbox in ps")
    proc.kill_all()
    proc.finish(timeout=10)
    sock_path, lock_path = directory / f"{name}.sock", directory / f"{name}.lock"
    assert sock_path.exists() and lock_path.exists(), "SIGKILL leaves them (nothing can clean up)"
    assert entry(tether, name) is None, "ps does not list a dead sandbox"
    r = tether.tool(["ctl", name, "connections"])
    assert r.returncode == 1 and "not running (stale control socket" in r.stderr, describe(r)
    # A new sandbox of the same name cleans the stale socket and serves a fresh one.
    box = Driven(tether, name)
    row = entry(tether, name)
    assert row is not None and row["tether_pid"] == box.proc.pid, row
    box.quit()
    assert not sock_path.exists() and not lock_path.exists()


# --------------------------------------------------------------------------------------------
# the socket itself: credentials, hostile and many clients

sys.path.insert(0, str(SRC))


def frame(obj: dict) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack("!I", len(body)) + body


def read_frames(sock: socket.socket, count: int) -> list[dict]:
    """The next ``count`` frames from ``sock``, decoded."""
    buf, out = b"", []
    while True:
        while len(buf) >= 4 and len(buf) >= 4 + struct.unpack("!I", buf[:4])[0]:
            n = struct.unpack("!I", buf[:4])[0]
            out.append(json.loads(buf[4:4 + n]))
            buf = buf[4 + n:]
            if len(out) == count:
                return out
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {out}"
        buf += chunk


def tether_fds(pid: int) -> dict[str, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return out


def settled_fds(pid: int) -> dict[str, str]:
    """tether's fds once they stop changing (the server side of a finished call closes a moment
    after the client's)."""
    previous = tether_fds(pid)
    while True:
        time.sleep(0.2)
        now = tether_fds(pid)
        if now == previous:
            return now
        previous = now


def wait_for_fds(pid: int, baseline: dict[str, str], timeout: float = 5.0) -> None:
    """Until tether holds exactly the fds it held before (numbers and targets)."""
    deadline = time.monotonic() + timeout
    while True:
        now = tether_fds(pid)
        if now == baseline:
            return
        if time.monotonic() > deadline:
            extra = {k: v for k, v in now.items() if baseline.get(k) != v}
            gone = {k: v for k, v in baseline.items() if now.get(k) != v}
            raise AssertionError(f"tether's fds differ from before: extra {extra}, gone {gone}")
        time.sleep(0.05)


def hello_status(path: str) -> dict:
    from tether.control import ControlClient
    with ControlClient(path, "test") as client:
        return client.call("status")


def test_other_uid_is_refused(tether):
    """SO_PEERCRED: even when the socket file is reachable, only the owner and root get an answer."""
    if tether.mode != "root":
        pytest.skip("a root sandbox opened to everyone; the test user is the other uid")
    name = unique_name("creds")
    box = Driven(tether, name)
    directory = runtime_dir_of(tether)
    sock_path = directory / f"{name}.sock"
    assert oct(sock_path.stat().st_mode & 0o777) == "0o600" and oct(directory.stat().st_mode & 0o777) == "0o700"
    os.chmod(directory, 0o711)
    os.chmod(sock_path, 0o666)
    try:
        probe = ("import json, socket, struct\n"
                 "s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(%r)\n"
                 "b = json.dumps({'type': 'hello', 'versions': [1], 'software': 'x'}).encode()\n"
                 "try:\n    s.sendall(struct.pack('!I', len(b)) + b)\n"
                 "except BrokenPipeError:\n    pass  # refused and closed before reading: its error is queued\n"
                 "n = struct.unpack('!I', s.recv(4))[0]; print(s.recv(n).decode())\n") % str(sock_path)
        r = subprocess.run(["setpriv", f"--reuid={tether.test_pw.pw_uid}", f"--regid={tether.test_pw.pw_gid}",
                            "--init-groups", "--", SANDBOX_PYTHON, "-c", probe], capture_output=True, text=True,
                           timeout=20)
    finally:
        os.chmod(directory, 0o700)
        os.chmod(sock_path, 0o600)
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["type"] == "error" and answer["code"] == "permission-denied", answer
    assert str(tether.test_pw.pw_uid) in answer["message"], answer
    assert hello_status(str(sock_path))["name"] == name, "root still gets through"
    box.quit()


HOSTILE = [
    pytest.param(b"\xff\xff\xff\xff", "frame-too-large", id="oversized-length"),
    pytest.param(struct.pack("!I", 0), "empty-frame", id="zero-length"),
    pytest.param(struct.pack("!I", 5) + b"\xff\xfe\xfd\xfc\xfb", "bad-utf8", id="bad-utf8"),
    pytest.param(struct.pack("!I", 3) + b"{x}", "bad-json", id="bad-json"),
    pytest.param(frame([1, 2]), "not-an-object", id="array"),
    pytest.param(frame({"type": "launch"}), "unknown-type", id="unknown-type"),
    pytest.param(frame({"type": "request", "id": 1, "method": "status"}), "bad-field", id="request-before-hello"),
    pytest.param(frame({"type": "hello", "versions": [99], "software": "x"}), "version", id="no-common-version"),
]


@pytest.mark.parametrize("raw, code", HOSTILE)
def test_hostile_client_gets_an_error_and_harms_no_one(tether, raw, code):
    if tether.mode != "root":
        pytest.skip("the harness (root) inspects tether's fds; once is enough")
    name = unique_name("hostile")
    box = Driven(tether, name)
    path = str(runtime_dir_of(tether) / f"{name}.sock")
    assert hello_status(path)["name"] == name  # the event loop is up: its own fds exist
    baseline = settled_fds(box.proc.pid)
    bystander = socket.socket(socket.AF_UNIX)
    bystander.connect(path)
    bystander.sendall(frame({"type": "hello", "versions": [1], "software": "bystander"}))
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(path)
    s.sendall(raw)
    got = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    s.close()
    (length,) = struct.unpack("!I", got[:4])
    answer = json.loads(got[4:4 + length])
    assert answer["type"] == "error" and answer["code"] == code and answer["id"] is None, answer
    assert answer["message"], answer
    # The bystander's connection is untouched.
    bystander.settimeout(5)
    bystander.sendall(frame({"type": "request", "id": 7, "method": "status"}))
    hello, reply = read_frames(bystander, 2)
    assert hello["type"] == "hello", hello
    assert reply["type"] == "response" and reply["id"] == 7 and reply["result"]["name"] == name, reply
    bystander.close()
    wait_for_fds(box.proc.pid, baseline)
    box.quit()


def test_fds_then_vanish_leaks_nothing(tether):
    if tether.mode != "root":
        pytest.skip("the harness (root) inspects tether's fds; once is enough")
    name = unique_name("fds")
    box = Driven(tether, name)
    path = str(runtime_dir_of(tether) / f"{name}.sock")
    assert hello_status(path)["name"] == name  # the event loop is up: its own fds exist
    baseline = settled_fds(box.proc.pid)
    for fds_declared, fds_sent in ((2, 2), (0, 3), (3, 1), (16, 16)):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(frame({"type": "hello", "versions": [1], "software": "x"}))
        pipes = [os.pipe() for _ in range(fds_sent)]
        fds = [r for r, _ in pipes]
        body = frame({"type": "request", "id": 1, "method": "status", "fds": fds_declared})
        socket.send_fds(s, [body[:10]], fds)  # fds with the frame's first bytes ...
        s.close()  # ... and gone before the rest of it
        for r, w in pipes:
            os.close(r)
            os.close(w)
    # 17 fds in one message: more than the limit, truncated by the kernel and refused.
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    pipes = [os.pipe() for _ in range(17)]
    try:
        socket.send_fds(s, [frame({"type": "hello", "versions": [1], "software": "x"})], [r for r, _ in pipes])
        s.settimeout(5)
        assert b"too-many-fds" in s.recv(65536)
    finally:
        s.close()
        for r, w in pipes:
            os.close(r)
            os.close(w)
    wait_for_fds(box.proc.pid, baseline)
    assert hello_status(path)["name"] == name
    box.quit()


def test_hundred_concurrent_clients(tether):
    name = unique_name("many")
    box = Driven(tether, name)
    path = str(runtime_dir_of(tether) / f"{name}.sock")
    # The clients run as the sandbox's owner (the socket refuses anyone else).
    client = ("import json, socket, struct, sys\n"
              "def frame(o):\n    b = json.dumps(o).encode(); return struct.pack('!I', len(b)) + b\n"
              "def read(s):\n"
              "    buf = b''\n"
              "    while len(buf) < 4 or len(buf) < 4 + struct.unpack('!I', buf[:4])[0]:\n"
              "        c = s.recv(65536)\n        assert c, 'closed'\n        buf += c\n"
              "    n = struct.unpack('!I', buf[:4])[0]; return json.loads(buf[4:4 + n]), buf[4 + n:]\n"
              "socks = []\n"
              "for i in range(100):\n"
              "    s = socket.socket(socket.AF_UNIX); s.settimeout(20); s.connect(sys.argv[1]); socks.append(s)\n"
              "for s in socks:\n"
              "    s.sendall(frame({'type': 'hello', 'versions': [1], 'software': 'c'}) + "
              "frame({'type': 'request', 'id': 1, 'method': 'status'}))\n"
              "ok = 0\n"
              "for s in socks:\n"
              "    hello, rest = read(s)\n"
              "    if rest:\n        n = struct.unpack('!I', rest[:4])[0]; reply = json.loads(rest[4:4 + n])\n"
              "    else:\n        reply, _ = read(s)\n"
              "    ok += hello['type'] == 'hello' and reply['result']['name'] == sys.argv[2]\n"
              "print(ok)\n")
    argv = [SANDBOX_PYTHON, "-c", client, path, name]
    if tether.mode == "rootless":
        pw = tether.test_pw
        argv = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--", *argv]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "100", describe(r)
    box.quit()


# --------------------------------------------------------------------------------------------
# policy reload

# Probes the targets each time a line arrives on stdin ("probe"), until "quit".
PROBE_LOOP = r"""
import json, socket, sys
for line in sys.stdin:
    if line.strip() == "quit":
        break
    out = {}
    for target in sys.argv[1:]:
        host, port = target.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
            out[target] = "ok"
        except OSError as e:
            out[target] = type(e).__name__
    print("probe " + json.dumps(out), flush=True)
"""


def test_policy_reload(tether):
    name = unique_name("reload")
    policy_file = tether.workdir / "policy.toml"
    policy_file.write_text('default = "deny"\nallow = ["203.0.113.10:9000"]\n')
    os.chmod(tether.workdir, 0o755)
    os.chmod(policy_file, 0o644)
    a, b = f"{WORLD}:{SINK}", f"203.0.113.11:{SINK}"
    log = tether.log_path()
    proc = tether.popen(["--name", name, "--policy", str(policy_file), "--log", str(log), "--",
                         SANDBOX_PYTHON, "-c", PROBE_LOOP, a, b], stdin=subprocess.PIPE)

    def probe() -> dict:
        proc.popen.stdin.write(b"probe\n")
        proc.popen.stdin.flush()
        return json.loads(proc.wait_for_line("probe ").split(" ", 1)[1])

    assert probe() == {a: "ok", b: "ConnectionRefusedError"}
    # A broken file: refused with the file's error, nothing changes.
    policy_file.write_text('default = "deny"\nallow = ["203.0.113.300"]\n')
    r = tether.tool(["ctl", name, "policy", "reload"])
    assert r.returncode == 1 and "invalid-config" in r.stderr and "policy.toml" in r.stderr, describe(r)
    assert probe() == {a: "ok", b: "ConnectionRefusedError"}
    # The new policy: .11 allowed, .10 denied by name of its rule.
    policy_file.write_text('default = "deny"\nallow = ["203.0.113.0/24"]\ndeny = ["203.0.113.10"]\n')
    r = tether.tool(["ctl", name, "policy", "reload", "--json"])
    assert r.returncode == 0, describe(r)
    assert json.loads(r.stdout) == {"default": "deny", "rules": json.loads(r.stdout)["rules"],
                                    "file": str(policy_file)}
    assert probe() == {a: "ConnectionRefusedError", b: "ok"}
    shown = json.loads(tether.tool(["ctl", name, "policy", "show", "--json"]).stdout)
    assert [x["rule"] for x in shown["rules"]][:2] == ["203.0.113.10", "203.0.113.0/24"], shown
    proc.popen.stdin.write(b"quit\n")
    proc.popen.stdin.flush()
    assert proc.finish(timeout=30).returncode == 0
    denies = [e for e in tether.events(log) if e["event"] == "deny" and e["dst"] == a]
    assert denies and denies[-1]["rule"] == "203.0.113.10", denies


def test_policy_reload_without_policy_file(tether):
    name = unique_name("noreload")
    box = Driven(tether, name)
    r = tether.tool(["ctl", name, "policy", "reload"])
    assert r.returncode == 1 and "started without --policy FILE" in r.stderr, describe(r)
    box.quit()
