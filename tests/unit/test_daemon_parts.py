"""Unit tests for the daemon's parts that need neither root nor namespaces.

Covered: ``RestartPolicy`` (backoff, giving up, the sliding window, a property over arbitrary exit
times); ``Supervisor`` with real short-lived processes (a crash loop until the policy gives up,
``stop`` of a running and of a SIGTERM-ignoring process, callbacks once per incarnation, a program
that does not exist, ``stop`` during the backoff); ``parse_state``/``oci_hook`` (runc and crun
states, poststop, and bad inputs: not JSON, not UTF-8, an array, no status, an empty id, a pid that
is a string, a bool, negative or a float, nesting too deep, arbitrary bytes); ``sd_notify`` against
real datagram sockets (path, abstract, unset, relative, garbage, nobody listening); ``DaemonLog``;
``NetPlan`` JSON round trips and ``plan`` (net plans, policies, rulesets); the worker's config JSON;
the CLI's ``ctl --admin``, ``serve --check-config`` and the root check; ``render_sessions``; and fds
over ``ControlClient``/``ControlServer``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import ipaddress
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tether import audit, ctl, wire
from tether.cli import main
from tether.config import ContainerConfig, parse_config
from tether.control import ControlClient, ControlError, ControlServer
from tether.daemon import notify, plan
from tether.daemon.client import AttachError, OciState, OciStateError, oci_hook, parse_state, socket_path
from tether.daemon.log import DaemonLog
from tether.daemon.server import DaemonError
from tether.daemon.supervisor import FIRST_DELAY, MAX_DELAY, Launch, RestartPolicy, Supervisor
from tether.daemon.worker import config_from_json, config_to_json
from tether.net.nft import SandboxNet
from tether.ns.netsetup import NetPlan
from tether.policy import PolicyFileError
from tether.runtime import RuntimeDirError

ip = ipaddress.ip_address
net = ipaddress.ip_network
iface = ipaddress.ip_interface


# =============================================================================================
# 1. RestartPolicy


def test_restart_policy_defaults():
    policy = RestartPolicy()
    assert (policy.max_restarts, policy.window, policy.first_delay, policy.max_delay) == (5, 60.0, FIRST_DELAY,
                                                                                          MAX_DELAY)


def test_backoff_doubles_from_first_delay_up_to_max_delay():
    policy = RestartPolicy(max_restarts=10, window=1e9, first_delay=0.1, max_delay=1.0)
    delays = [policy.next_delay(now=10.0 * i) for i in range(10)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert policy.recent_restarts == 10


def test_gives_up_after_max_restarts_within_the_window():
    policy = RestartPolicy(max_restarts=3, window=60.0, first_delay=0.1, max_delay=5.0)
    assert [policy.next_delay(t) for t in (0.0, 1.0, 2.0)] == pytest.approx([0.1, 0.2, 0.4])
    assert policy.next_delay(3.0) is None, "a 4th restart within 60 s"
    assert policy.next_delay(30.0) is None, "still inside the window: still given up"
    assert policy.recent_restarts == 3, "a refusal is not a restart"


def test_window_slides_old_restarts_are_forgotten():
    policy = RestartPolicy(max_restarts=2, window=10.0, first_delay=0.5, max_delay=5.0)
    assert policy.next_delay(0.0) == 0.5  # restart at 0.5
    assert policy.next_delay(1.0) == 1.0  # restart at 2.0
    assert policy.next_delay(5.0) is None
    # The window counts from the restart (exit + delay): 10.4 - 0.5 < 10, still remembered.
    assert policy.next_delay(10.4) is None
    # 10.5 - 0.5 == 10: the first restart is forgotten, the second (at 2.0) still counts, so the
    # backoff is that of a second restart.
    assert policy.next_delay(10.5) == 1.0  # restart at 11.5
    assert policy.recent_restarts == 2
    # 12.0 - 2.0 == 10: forgotten too; only 11.5 is recent.
    assert policy.next_delay(12.0) == 1.0
    # Long after everything: a fresh start, first_delay again.
    assert policy.next_delay(1000.0) == 0.5
    assert policy.recent_restarts == 1


def test_max_restarts_zero_never_restarts():
    policy = RestartPolicy(max_restarts=0, window=60.0)
    assert [policy.next_delay(t) for t in (0.0, 100.0, 1e6)] == [None, None, None]
    assert policy.recent_restarts == 0


@settings(max_examples=300)
@given(max_restarts=st.integers(0, 6), window=st.floats(0.5, 100.0), first_delay=st.floats(0.001, 1.0),
       factor=st.floats(1.0, 64.0), gaps=st.lists(st.floats(0.001, 50.0), min_size=1, max_size=40))
def test_restart_policy_property(max_restarts, window, first_delay, factor, gaps):
    max_delay = first_delay * factor
    policy = RestartPolicy(max_restarts, window, first_delay, max_delay)
    now, decisions = 0.0, []
    for gap in gaps:
        now += gap
        decisions.append((now, policy.next_delay(now)))
    granted = [(t, d) for t, d in decisions if d is not None]
    for _, d in granted:
        assert first_delay <= d <= max_delay
    if max_restarts == 0:
        assert not granted
    else:
        assert decisions[0][1] == first_delay, "the first exit is always restarted after first_delay"
    exits = [t for t, _ in granted]
    restarts = sorted(t + d for t, d in granted)
    for times in (exits, restarts):  # any window starts at one of the times, at worst
        for start in times:
            inside = [t for t in times if start <= t < start + window]
            assert len(inside) <= max_restarts, (times, start)


# =============================================================================================
# 2. Supervisor, with real processes


def _launch(argv, counts, **kw) -> Launch:
    counts["made"] = counts.get("made", 0) + 1

    def after_start(process):
        counts.setdefault("started", []).append(process.pid)

    def after_exit():
        counts["exited"] = counts.get("exited", 0) + 1

    return Launch(list(argv), dict(os.environ), kw.pop("pass_fds", []), after_start, after_exit)


def _reaped(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def test_supervisor_restarts_a_crashing_engine_until_the_policy_gives_up():
    events, counts, failed = [], {}, []

    async def main_():
        done = asyncio.get_running_loop().create_future()
        sup = Supervisor(lambda: _launch([sys.executable, "-c", "import sys; sys.exit(3)"], counts),
                         RestartPolicy(max_restarts=2, window=60.0, first_delay=0.01, max_delay=0.02),
                         lambda kind, fields: events.append((kind, fields)),
                         on_failed=lambda: (failed.append(1), done.set_result(None)))
        sup.start()
        await asyncio.wait_for(done, 10)
        await asyncio.sleep(0.05)  # nothing more happens once failed
        return sup

    sup = asyncio.run(main_())
    kinds = [k for k, _ in events]
    assert kinds == ["engine-start", "engine-exit"] * 3 + ["engine-failed"]
    assert [f["restarts"] for k, f in events if k == "engine-start"] == [0, 1, 2]
    assert all(f["reason"] == "exit status 3" for k, f in events if k == "engine-exit")
    assert events[-1][1]["reason"] == "2 restarts in 60 s; last: exit status 3"
    started = [f["pid"] for k, f in events if k == "engine-start"]
    assert counts["started"] == started, "after_start got each incarnation's process"
    assert counts["made"] == 3 and counts["exited"] == 3, "make_launch and after_exit once per incarnation"
    assert failed == [1]
    assert (sup.state, sup.starts, sup.restarts, sup.process, sup.last_exit) == ("failed", 3, 2, None,
                                                                                 "exit status 3")
    assert all(_reaped(pid) for pid in started)


def test_supervisor_stop_terminates_and_reaps_promptly():
    events, counts = [], {}

    async def main_():
        sup = Supervisor(lambda: _launch(["sleep", "30"], counts), RestartPolicy(first_delay=0.01),
                         lambda kind, fields: events.append(kind))
        sup.start()
        assert sup.state == "running" and sup.process is not None
        pid = sup.process.pid
        await asyncio.sleep(0.05)
        began = time.monotonic()
        await sup.stop(grace=5.0)
        took = time.monotonic() - began
        await asyncio.sleep(0.05)  # no restart, no engine-exit after a stop
        return sup, pid, took

    sup, pid, took = asyncio.run(main_())
    assert took < 1.0, "SIGTERM, not the grace period, ended it"
    assert _reaped(pid), "no zombie left"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert events == ["engine-start"]
    assert (sup.state, sup.process) == ("stopped", None)
    assert counts["made"] == 1 and counts["started"] == [pid] and counts["exited"] == 1


def test_supervisor_stop_kills_a_process_that_ignores_sigterm():
    r, w = os.pipe()
    seen = {}
    code = ("import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            f"os.write({w}, b'x'); time.sleep(30)")

    async def main_():
        counts: dict = {}

        def make():
            launch = _launch([sys.executable, "-c", code], counts, pass_fds=[w])
            launch.after_start = lambda process: seen.setdefault("process", process)
            return launch

        sup = Supervisor(make, RestartPolicy(first_delay=0.01), lambda kind, fields: None)
        sup.start()
        assert await asyncio.get_running_loop().run_in_executor(None, os.read, r, 1) == b"x"
        began = time.monotonic()
        await sup.stop(grace=0.2)
        return time.monotonic() - began

    try:
        took = asyncio.run(main_())
    finally:
        os.close(r)
        os.close(w)
    assert 0.2 <= took < 2.0
    assert seen["process"].returncode == -signal.SIGKILL
    assert _reaped(seen["process"].pid)


def test_supervisor_nonexistent_program_counts_as_an_exit():
    events, counts = [], {}

    async def main_():
        done = asyncio.get_running_loop().create_future()
        sup = Supervisor(lambda: _launch(["/nonexistent/tether-engine", "--x"], counts),
                         RestartPolicy(max_restarts=1, window=60.0, first_delay=0.01),
                         lambda kind, fields: events.append((kind, fields)),
                         on_failed=lambda: done.set_result(None))
        sup.start()
        await asyncio.wait_for(done, 5)
        return sup

    sup = asyncio.run(main_())
    assert [k for k, _ in events] == ["engine-exit", "engine-exit", "engine-failed"]
    for _, fields in events[:2]:
        assert fields["reason"].startswith("cannot start /nonexistent/tether-engine: ")
        assert "No such file" in fields["reason"]
    assert "cannot start /nonexistent/tether-engine" in events[2][1]["reason"]
    assert sup.policy.recent_restarts == 1, "the failed start was counted by the policy"
    assert (sup.state, sup.starts) == ("failed", 0)
    assert counts["made"] == 2 and counts["exited"] == 2 and "started" not in counts


def test_supervisor_stop_during_backoff_cancels_the_restart():
    events = []

    async def main_():
        sup = Supervisor(lambda: Launch(["true"], dict(os.environ), []),
                         RestartPolicy(first_delay=0.3), lambda kind, fields: events.append(kind))
        sup.start()
        for _ in range(200):
            if sup.state == "backoff":
                break
            await asyncio.sleep(0.01)
        assert sup.state == "backoff"
        await sup.stop()
        await asyncio.sleep(0.4)  # past the backoff: no new start
        return sup

    sup = asyncio.run(main_())
    assert events == ["engine-start", "engine-exit"]
    assert sup.state == "stopped" and sup.starts == 1


def test_parse_state_runc_creating():
    text = '{"ociVersion":"1.0.2","id":"c1","status":"creating","pid":1234,"bundle":"/b"}'
    assert parse_state(text) == OciState("creating", 1234, "c1", "/b")
    assert parse_state(text.encode()) == OciState("creating", 1234, "c1", "/b")


def test_parse_state_crun_created():
    state = parse_state(b'{"ociVersion":"1.0.0","id":"web-1","status":"created","pid":77,"bundle":"/x",'
                        b'"annotations":{"a":"b"}}')
    assert state == OciState("created", 77, "web-1", "/x")


def test_parse_state_poststop_pid_zero_is_none():
    assert parse_state('{"ociVersion":"1.0.2","id":"c1","status":"stopped","pid":0,"bundle":"/b"}').pid is None
    assert parse_state('{"id":"c1","status":"stopped"}') == OciState("stopped", None, "c1", "")


def test_parse_state_bundle_not_a_string_is_empty():
    assert parse_state('{"id":"c1","status":"stopped","bundle":7}').bundle == ""


@pytest.mark.parametrize("data, message", [
    pytest.param(b"not json", "is not JSON", id="not-json"),
    pytest.param(b"", "is not JSON", id="empty"),
    pytest.param(b'{"id":"c1","status":"creat\xff"}', "is not JSON", id="not-utf8"),
    pytest.param(b"\xff\xfe\x00", "is not JSON", id="bad-utf16-bom"),
    pytest.param(b'[{"id":"c1","status":"creating"}]', "not a JSON object", id="array"),
    pytest.param(b'"creating"', "not a JSON object", id="string"),
    pytest.param(b"null", "not a JSON object", id="null"),
    pytest.param(b'{"id":"c1","pid":1}', 'no "status"', id="missing-status"),
    pytest.param(b'{"id":"c1","status":"","pid":1}', 'no "status"', id="empty-status"),
    pytest.param(b'{"id":"c1","status":7,"pid":1}', 'no "status"', id="status-number"),
    pytest.param(b'{"id":"","status":"creating","pid":1}', 'no "id"', id="empty-id"),
    pytest.param(b'{"status":"creating","pid":1}', 'no "id"', id="missing-id"),
    pytest.param(b'{"id":5,"status":"creating","pid":1}', 'no "id"', id="id-number"),
    pytest.param(b'{"id":"c1","status":"creating","pid":"1234"}', "not a process id: '1234'", id="pid-string"),
    pytest.param(b'{"id":"c1","status":"creating","pid":true}', "not a process id: True", id="pid-bool"),
    pytest.param(b'{"id":"c1","status":"creating","pid":-5}', "not a process id: -5", id="pid-negative"),
    pytest.param(b'{"id":"c1","status":"creating","pid":12.5}', "not a process id: 12.5", id="pid-float"),
    pytest.param(b'{"id":"c1","status":"creating","pid":12.0}', "not a process id: 12.0", id="pid-integral-float"),
    pytest.param(b'{"id":"c1","status":"creating","pid":NaN}', "not a process id: nan", id="pid-nan"),
    pytest.param(b'{"id":"c1","status":"creating","pid":[1]}', "not a process id: [1]", id="pid-list"),
])
def test_parse_state_refuses(data, message):
    with pytest.raises(OciStateError) as info:
        parse_state(data)
    assert message in str(info.value)


@pytest.mark.parametrize("data", [b"[" * 100_000, b'{"a":' * 100_000], ids=["deep-array", "deep-object"])
def test_parse_state_refuses_deep_nesting(data):
    with pytest.raises(OciStateError):
        parse_state(data)


@settings(max_examples=400)
@given(st.binary(max_size=300))
def test_parse_state_arbitrary_bytes_only_raise_oci_state_error(data):
    try:
        state = parse_state(data)
    except OciStateError:
        return
    assert state.status and state.id and (state.pid is None or state.pid > 0)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                 max_size=3), max_leaves=8)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(["status", "id", "pid", "bundle", "ociVersion"]), _json))
def test_parse_state_arbitrary_documents(doc):
    try:
        state = parse_state(json.dumps(doc))
    except OciStateError:
        return
    assert isinstance(doc["status"], str) and doc["status"] == state.status
    assert isinstance(doc["id"], str) and doc["id"] == state.id
    assert state.pid is None or (type(state.pid) is int and state.pid > 0)


RUNNING = b'{"ociVersion":"1.0.2","id":"c1","status":"running","pid":1234,"bundle":"/b"}'


@pytest.mark.parametrize("status", ["running", "paused", "creating-ish"])
def test_oci_hook_other_status_refused_before_connecting(tmp_path, status):
    doc = json.dumps({"id": "c1", "status": status, "pid": 1234}).encode()
    with pytest.raises(OciStateError) as info:
        oci_hook(tmp_path / "nobody.sock", doc)
    assert repr(status) in str(info.value) and "container c1" in str(info.value)


@pytest.mark.parametrize("doc", [
    pytest.param({"id": "c1", "status": "creating"}, id="creating-no-pid"),
    pytest.param({"id": "c1", "status": "created", "pid": 0}, id="created-pid-zero"),
])
def test_oci_hook_create_without_pid(tmp_path, doc):
    with pytest.raises(OciStateError, match="has no pid"):
        oci_hook(tmp_path / "nobody.sock", json.dumps(doc).encode())


def test_oci_hook_stop_with_nobody_listening_is_an_attach_error(tmp_path):
    with pytest.raises(AttachError, match="container c1: detach failed: cannot connect"):
        oci_hook(tmp_path / "nobody.sock", b'{"id":"c1","status":"stopped"}')


def test_socket_path():
    assert socket_path("/run/tether", None, "/s/web.sock") == Path("/s/web.sock")
    assert socket_path("/run/tether", "web", None) == Path("/run/tether/web.sock")
    with pytest.raises(AttachError, match="--socket PATH or --name NAME"):
        socket_path("/run/tether", None, None)
    with pytest.raises(RuntimeDirError):
        socket_path("/run/tether", "../etc", None)


def test_cli_oci_hook_running_exits_1(tmp_path):
    result = CliRunner().invoke(main, ["oci-hook", "--name", "web", "--runtime-dir", str(tmp_path)], input=RUNNING)
    assert result.exit_code == 1
    assert "nothing to do for status 'running'" in result.stderr


# =============================================================================================
# 4. sd_notify


def _datagram_socket(address) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    return sock


def test_sd_notify_sends_the_exact_datagram(tmp_path):
    path = tmp_path / "n.sock"
    with _datagram_socket(str(path)) as sock:
        state = "READY=1\nSTATUS=serving 3 containers\nMAINPID=42"
        assert notify.sd_notify(state, {"NOTIFY_SOCKET": str(path)}) is True
        assert sock.recv(4096) == state.encode()


def test_sd_notify_reads_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "n.sock"
    with _datagram_socket(str(path)) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify.sd_notify("STOPPING=1") is True
        assert sock.recv(4096) == b"STOPPING=1"


def test_sd_notify_abstract_socket():
    name = f"tether-test-{os.getpid()}-{time.monotonic_ns()}"
    with _datagram_socket("\0" + name) as sock:
        assert notify.sd_notify("READY=1", {"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(4096) == b"READY=1"


def test_sd_notify_without_notify_socket_sends_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)

    def no_socket(*args, **kwargs):
        raise AssertionError("a socket was created")

    monkeypatch.setattr(notify.socket, "socket", no_socket)
    assert notify.sd_notify("READY=1") is False
    assert notify.sd_notify("READY=1", {}) is False
    assert notify.sd_notify("READY=1", {"NOTIFY_SOCKET": ""}) is False


@pytest.mark.parametrize("value", ["run/notify", "notify", "./n.sock", "~/n", " /run/n", "\0abc", "@"],
                         ids=["relative", "bare-word", "dot-relative", "tilde", "leading-space", "nul", "at-alone"])
def test_sd_notify_garbage_value_is_false(value):
    assert notify.sd_notify("READY=1", {"NOTIFY_SOCKET": value}) is False


def test_sd_notify_nobody_listening_is_false(tmp_path):
    assert notify.sd_notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False
    stale = tmp_path / "stale.sock"
    _datagram_socket(str(stale)).close()  # the file stays, nobody reads it
    assert notify.sd_notify("READY=1", {"NOTIFY_SOCKET": str(stale)}) is False
    plain = tmp_path / "file"
    plain.write_text("")
    assert notify.sd_notify("READY=1", {"NOTIFY_SOCKET": str(plain)}) is False
    assert notify.sd_notify("READY=1", {"NOTIFY_SOCKET": "@tether-nobody-" + str(time.monotonic_ns())}) is False


# =============================================================================================
# 5. DaemonLog


def test_daemon_log_writes_json_lines_and_fans_out():
    sink, got = io.StringIO(), []
    log = DaemonLog(sink)
    log.subscribers.append(got.append)
    before = datetime.now(UTC)
    first = log.emit("attach", "web", pid=42, interface="tun0")
    second = log.emit("reload", added=["db"])
    log.record({"ts": "T", "sandbox": "web", "event": "deny", "dst": "1.2.3.4:443"})
    lines = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert lines == [first, second, {"ts": "T", "sandbox": "web", "event": "deny", "dst": "1.2.3.4:443"}]
    assert list(first)[:3] == ["ts", "sandbox", "event"]
    assert (first["sandbox"], first["event"], first["pid"], first["interface"]) == ("web", "attach", 42, "tun0")
    assert (second["sandbox"], second["event"], second["added"]) == ("-", "reload", ["db"])
    ts = datetime.fromisoformat(first["ts"])
    assert ts.utcoffset().total_seconds() == 0 and abs((ts - before).total_seconds()) < 5
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", first["ts"])
    assert got == lines and list(log.recent) == lines


def test_daemon_log_recent_is_bounded():
    log = DaemonLog(io.StringIO())
    for i in range(audit.RECENT + 7):
        log.emit("engine-start", n=i)
    assert len(log.recent) == audit.RECENT
    assert log.recent[0]["n"] == 7 and log.recent[-1]["n"] == audit.RECENT + 6


class _FullDisk(io.StringIO):
    def write(self, text):
        raise OSError(28, "No space left on device")


@pytest.mark.parametrize("sink", [_FullDisk(), io.StringIO()], ids=["write-enospc", "closed-sink"])
def test_daemon_log_failing_sink_does_not_stop_subscribers(sink):
    if not isinstance(sink, _FullDisk):
        sink.close()  # writing to it raises ValueError
    got = []
    log = DaemonLog(sink)
    log.subscribers.append(got.append)
    record = log.emit("error", reason="disk full")
    assert got == [record] and list(log.recent) == [record]


def test_daemon_log_defaults_to_stderr(capsys):
    log = DaemonLog()
    record = log.emit("start", pid=1)
    assert json.loads(capsys.readouterr().err) == record
    log.close()  # never closes stderr
    assert not sys.stderr.closed


def test_daemon_log_close_closes_its_file():
    sink = io.StringIO()
    DaemonLog(sink).close()
    assert sink.closed


# =============================================================================================
# 6. NetPlan and plan


def _roundtrip(netplan: NetPlan) -> NetPlan:
    return NetPlan.from_json(json.loads(json.dumps(netplan.to_json())))


@pytest.mark.parametrize("ipv4, ipv6", [(True, True), (True, False), (False, True)],
                         ids=["both", "ipv4-only", "ipv6-only"])
def test_netplan_proxy_roundtrip(ipv4, ipv6):
    sandbox = SandboxNet()
    netplan = NetPlan.for_proxy(sandbox, ipv4, ipv6)
    families = tuple(f for f, on in ((4, ipv4), (6, ipv6)) if on)
    assert netplan.families == families and netplan.capture and netplan.vnet_header
    assert netplan.addresses == [a for f, a in ((4, sandbox.address), (6, sandbox.address6)) if f in families]
    assert netplan.routes == [r for f, r in ((4, (net("0.0.0.0/0"), sandbox.gateway)),
                                             (6, (net("::/0"), sandbox.gateway6))) if f in families]
    back = _roundtrip(netplan)
    assert back == netplan
    assert isinstance(back.families, tuple) and all(isinstance(r, tuple) for r in back.routes)


def test_netplan_external_roundtrip():
    netplan = NetPlan("tt-wg", 1380, [iface("10.9.0.2/24"), iface("fd00:9::2/64")],
                      [(net("10.9.0.0/16"), ip("10.9.0.1")), (net("::/0"), None)], capture=False, families=(),
                      vnet_header=False, packet_info=True)
    obj = netplan.to_json()
    assert obj["routes"] == [["10.9.0.0/16", "10.9.0.1"], ["::/0", None]]
    assert _roundtrip(netplan) == netplan
    assert _roundtrip(dataclasses.replace(netplan, packet_info=False)).packet_info is False
    del obj["packet_info"]  # a plan written before the key existed
    assert NetPlan.from_json(obj) == dataclasses.replace(netplan, packet_info=False)


def container(body: str, name: str = "web") -> ContainerConfig:
    return parse_config(f"[container.{json.dumps(name)}]\n{body}\n").containers[name]


EXTERNAL = 'engine = "external"\ncommand = ["/usr/bin/wg", "fd://{fd}"]\n'


def test_net_plan_proxy():
    assert plan.net_plan(container("")) == NetPlan.for_proxy(SandboxNet(), True, True)
    v4 = plan.net_plan(container("ipv6 = false\nmtu = 9000"))
    assert v4 == NetPlan.for_proxy(SandboxNet(mtu=9000), True, False)
    assert (v4.interface, v4.mtu, v4.families) == ("tun0", 9000, (4,))


def test_net_plan_external_defaults():
    netplan = plan.net_plan(container(EXTERNAL))
    assert netplan == NetPlan("tt-web", 1420, [iface("10.0.2.100/24")], [(net("0.0.0.0/0"), None)],
                              capture=False, families=(), vnet_header=False)
    assert _roundtrip(netplan) == netplan


def test_net_plan_external_explicit_addresses_get_default_routes_once():
    netplan = plan.net_plan(container(EXTERNAL + 'addresses = ["10.9.0.2/24", "10.9.1.2/24", "fd00:9::2/64"]\n'
                                                 "mtu = 1280"))
    assert netplan.addresses == [iface("10.9.0.2/24"), iface("10.9.1.2/24"), iface("fd00:9::2/64")]
    assert netplan.routes == [(net("0.0.0.0/0"), None), (net("::/0"), None)]
    assert netplan.mtu == 1280


def test_net_plan_external_packet_info():
    assert plan.net_plan(container(EXTERNAL)).packet_info is False
    assert plan.net_plan(container(EXTERNAL + "tun_packet_info = true")).packet_info is True
    assert plan.net_plan(container("")).packet_info is False, "the proxy engine never uses PI"


def test_net_plan_external_explicit_routes():
    netplan = plan.net_plan(container(EXTERNAL + 'addresses = ["10.9.0.2/24"]\n'
                                                 'routes = ["10.9.0.0/16", "192.168.0.0/24", "fd00::/8"]'))
    assert netplan.routes == [(net("10.9.0.0/16"), None), (net("192.168.0.0/24"), None), (net("fd00::/8"), None)]


def test_net_plan_external_interface_names():
    long = plan.net_plan(container(EXTERNAL, "a-very-long-container-name")).interface
    assert long.startswith("tt-a-very-") and len(long) == 15  # truncated, with a digest of the full name
    assert plan.net_plan(container(EXTERNAL + 'interface = "wg7"', "a-very-long-container-name")).interface == "wg7"
    assert plan.interface_name(container("", "a-very-long-container-name")) == "tun0"


@settings(max_examples=200)
@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True))
def test_external_interface_name_is_a_valid_ifname(name):
    interface = plan.interface_name(ContainerConfig(name=name, engine="external"))
    assert 1 <= len(interface.encode()) <= 15 and interface.startswith("tt-")
    assert not any(c in "/: " for c in interface) and interface not in (".", "..")


def test_external_interface_names_are_unique_per_container():
    a = ContainerConfig(name="database-primary-1", engine="external")
    b = ContainerConfig(name="database-primary-2", engine="external")
    assert plan.interface_name(a) != plan.interface_name(b)


def test_build_container_policy_allow_deny_default():
    config = container('default = "deny"\nallow = ["10.1.0.0/16:443"]\ndeny = ["10.1.2.0/24"]')
    policy = plan.build_container_policy(config)
    assert policy.default == "deny"
    assert [r.text for r in policy.ordered_rules()] == ["10.1.2.0/24", "10.1.0.0/16:443"]
    decision = policy.evaluate("tcp", "10.1.2.3", 443)
    assert (decision.verdict, decision.rule) == ("deny", "10.1.2.0/24")
    decision = policy.evaluate("tcp", "10.1.5.5", 443)
    assert (decision.verdict, decision.rule) == ("allow", "10.1.0.0/16:443")
    assert policy.evaluate("tcp", "10.1.5.5", 80).rule == "default"
    assert policy.evaluate("tcp", "8.8.8.8", 443).verdict == "deny"


def test_build_container_policy_default_allow_keeps_builtin_denies():
    policy = plan.build_container_policy(container(""), host_addresses=[ip("203.0.113.5")])
    assert policy.default == "allow"
    assert policy.evaluate("tcp", "1.1.1.1", 443).verdict == "allow"
    for address in ("127.0.0.1", "192.168.1.1", "203.0.113.5"):
        decision = policy.evaluate("tcp", address, 22)
        assert decision.verdict == "deny" and decision.rule != "default", address


def test_build_container_policy_with_a_policy_file(tmp_path):
    path = tmp_path / "web.toml"
    path.write_text('allow = ["93.184.216.0/24"]\ndeny = ["93.184.216.34"]\n')
    policy = plan.build_container_policy(container(f'default = "deny"\npolicy = "{path}"\nallow = ["1.1.1.1"]'))
    assert [r.text for r in policy.ordered_rules()] == ["93.184.216.34", "93.184.216.0/24", "1.1.1.1"]
    assert policy.evaluate("tcp", "93.184.216.1", 443).verdict == "allow"
    assert policy.evaluate("tcp", "93.184.216.34", 443).verdict == "deny"
    assert policy.evaluate("tcp", "1.1.1.1", 53).verdict == "allow"
    with pytest.raises(PolicyFileError):
        plan.build_container_policy(container(f'policy = "{tmp_path}/missing.toml"'))


def test_policy_file_default_applies_when_the_config_sets_none(tmp_path):
    path = tmp_path / "strict.toml"
    path.write_text('default = "deny"\nallow = ["93.184.216.0/24"]\n')
    policy = plan.build_container_policy(container(f'policy = "{path}"'))
    assert policy.default == "deny", "docs: policy works as tether run --policy, where the file's default applies"


def test_ruleset_for_contains_the_port_and_rules():
    config = container('default = "deny"\nallow = ["10.1.0.0/16:443"]\ndeny = ["10.1.2.0/24"]\n'
                       "allow_host = [8080, 5432]")
    policy = plan.build_container_policy(config)
    ruleset = plan.ruleset_for(config, policy)(43117)
    assert "redirect to :43117" in ruleset.script
    assert "tproxy ip to 127.0.0.1:43117" in ruleset.script and "tproxy ip6 to [::1]:43117" in ruleset.script
    assert "10.1.2.0/24" in ruleset.script and "th dport { 5432, 8080 }" in ruleset.script
    assert "10.1.2.0/24" in ruleset.labels
    other = plan.ruleset_for(config, policy)(50000).script
    assert ":50000" in other and "43117" not in other


# =============================================================================================
# 7. The worker's config JSON


_CHOSEN = dict(
    name="web", engine="external", default="deny", allow=("10.0.0.0/8", "example.com"), deny=("10.1.0.0/16",),
    policy="/etc/tether/web.toml", ports=("8080:80", "53:53/udp"), allow_host=(5432, 6379), dns=("1.1.1.1",),
    dns_deny="nxdomain", mtu=1400, ipv4=False, ipv6=False, connect_timeout=3.5, udp_timeout=12.0,
    socket_mode=0o600, socket_uid=1000, socket_gid=1001, command=("/usr/bin/wg", "fd://{fd}"),
    tun_fd_env="WG_TUN_FD", interface="wg0", addresses=("10.9.0.2/24",), routes=("10.9.0.0/16",))
# A field added to ContainerConfig later gets a non-default value of its type from here.
_BY_TYPE = {"bool": lambda d: not d, "str": lambda d: d + "-x", "int": lambda d: d + 1, "float": lambda d: d + 1.5,
            "str | None": lambda d: "x", "int | None": lambda d: 7, "float | None": lambda d: 2.5,
            "tuple[str, ...]": lambda d: ("x", "y"), "tuple[int, ...]": lambda d: (1, 2)}
EVERY_FIELD = ContainerConfig(**{f.name: _CHOSEN[f.name] if f.name in _CHOSEN else _BY_TYPE[f.type](f.default)
                                 for f in dataclasses.fields(ContainerConfig)})


def test_every_field_is_exercised():
    defaults = ContainerConfig(name="other")
    same = [f.name for f in dataclasses.fields(ContainerConfig) if getattr(EVERY_FIELD, f.name) == getattr(defaults,
                                                                                                          f.name)]
    assert same == [], "EVERY_FIELD must differ from the defaults in every field"


@pytest.mark.parametrize("config", [EVERY_FIELD, ContainerConfig(name="min")], ids=["every-field", "defaults"])
def test_config_json_roundtrip(config):
    back = config_from_json(json.loads(json.dumps(config_to_json(config))))
    assert back == config
    for f in dataclasses.fields(ContainerConfig):
        assert type(getattr(back, f.name)) is type(getattr(config, f.name)), f.name


def test_config_from_json_ignores_unknown_keys_and_defaults_missing_ones():
    obj = config_to_json(EVERY_FIELD) | {"future_key": [1, 2], "engine_v2": "x"}
    assert config_from_json(obj) == EVERY_FIELD
    assert config_from_json({"name": "x", "allow": ["1.1.1.1"], "unknown": 1}) == ContainerConfig(name="x",
                                                                                                 allow=("1.1.1.1",))


# =============================================================================================
# 8. The CLI


@pytest.fixture
def calls(monkeypatch):
    made = []
    answers = {"sessions": {"sessions": []}, "connections": {"connections": []}, "detach": {"detached": True},
               "attach": {"interface": "tun0", "addresses": ["10.0.2.100/24"]},
               "reload": {"ok": True, "added": ["db"], "removed": []}}

    def fake(target, method, params=None):
        made.append((target, method, params))
        return answers[method]

    monkeypatch.setattr(ctl, "call", fake)
    return made


@pytest.mark.parametrize("args, target", [
    (["ctl", "--admin", "sessions"], "admin:/run/tether/admin.sock"),
    (["ctl", "--admin", "--runtime-dir", "/x", "sessions"], "admin:/x/admin.sock"),
    (["ctl", "--admin", "--runtime-dir=/x", "sessions"], "admin:/x/admin.sock"),
], ids=["default-dir", "runtime-dir", "runtime-dir-equals"])
def test_cli_ctl_admin_sessions(calls, args, target):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert calls == [(target, "sessions", None)]
    assert "NAME" in result.stdout and "STATE" in result.stdout


def test_cli_ctl_admin_sessions_json(calls):
    result = CliRunner().invoke(main, ["ctl", "--admin", "sessions", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout) == []


def test_cli_ctl_admin_detach(calls):
    result = CliRunner().invoke(main, ["ctl", "--admin", "detach", "web"])
    assert result.exit_code == 0, result.output
    assert calls == [("admin:/run/tether/admin.sock", "detach", {"name": "web"})]
    assert "tether: detached web" in result.stdout


def test_cli_ctl_admin_attach_and_reload(calls):
    runner = CliRunner()
    result = runner.invoke(main, ["ctl", "--admin", "attach", "--pid", "42", "--name", "web"])
    assert result.exit_code == 0, result.output
    assert calls[-1] == ("admin:/run/tether/admin.sock", "attach", {"name": "web", "pid": 42})
    assert "attached pid 42 as web (tun0, 10.0.2.100/24)" in result.stdout
    result = runner.invoke(main, ["ctl", "--admin", "reload"])
    assert result.exit_code == 0 and calls[-1][1] == "reload"
    assert "tether: config reloaded (added: db)" in result.stdout


def test_cli_ctl_admin_reload_with_errors_fails(calls, monkeypatch):
    monkeypatch.setattr(ctl, "call", lambda target, method, params=None: {"ok": False, "errors": ["f:1: x: bad"]})
    result = CliRunner().invoke(main, ["ctl", "--admin", "reload"])
    assert result.exit_code == 1 and "f:1: x: bad" in result.stderr


def test_cli_ctl_sandbox_still_works(calls):
    result = CliRunner().invoke(main, ["ctl", "web", "connections"])
    assert result.exit_code == 0, result.output
    assert calls == [("web", "connections", None)]


@pytest.mark.parametrize("args", [
    ["ctl", "web", "--admin", "sessions"],
    ["ctl", ":admin", "sessions"],
    ["ctl", "--runtime-dir", "/x", "--admin", "sessions"],
], ids=["admin-after-name", "forged-admin-name", "admin-not-first"])
def test_cli_ctl_admin_misplaced_is_a_usage_error(calls, args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert calls == []


def test_cli_ctl_forged_admin_name_says_why(calls):
    result = CliRunner().invoke(main, ["ctl", ":admin", "sessions"])
    assert "--admin comes first and takes no NAME" in result.stderr


VALID = '[container.web]\ndefault = "deny"\n\n[container.db]\nallow = ["10.0.0.0/8"]\n'


def test_cli_serve_check_config_valid(tmp_path):
    path = tmp_path / "tether.toml"
    path.write_text(VALID)
    result = CliRunner().invoke(main, ["serve", "--config", str(path), "--check-config"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"tether: {path}: valid (2 containers: web, db)"


def test_cli_serve_check_config_invalid(tmp_path):
    path = tmp_path / "tether.toml"
    path.write_text('[container.web]\ndefault = "maybe"\ndafault = "deny"\nmtu = 10\n')
    result = CliRunner().invoke(main, ["serve", "--config", str(path), "--check-config"])
    assert result.exit_code == 2
    problems = [line for line in result.stderr.splitlines() if line.startswith(f"{path}:")]
    assert len(problems) == 3, result.stderr
    for line in problems:
        assert re.fullmatch(re.escape(str(path)) + r":\d+: container\.web\.\w+: .+", line), line
    assert [line.split(":")[1] for line in problems] == ["2", "3", "4"]
    assert f"{path}:2: container.web.default: " in result.stderr


def test_cli_serve_check_config_missing_file(tmp_path):
    result = CliRunner().invoke(main, ["serve", "--config", str(tmp_path / "none.toml"), "--check-config"])
    assert result.exit_code == 2 and "cannot read" in result.stderr


def test_serve_refuses_non_root(monkeypatch, tmp_path):
    from tether.daemon import server

    config = parse_config(VALID, "t.toml")
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    with pytest.raises(DaemonError, match="must run as root"):
        server.serve(config, tmp_path / "run", None)
    assert not (tmp_path / "run").exists(), "refused before touching anything"


def test_cli_serve_refuses_non_root(monkeypatch, tmp_path):
    path = tmp_path / "tether.toml"
    path.write_text(VALID)
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    result = CliRunner().invoke(main, ["serve", "--config", str(path), "--runtime-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "tether serve must run as root" in result.stderr and "hint:" in result.stderr


# =============================================================================================
# 9. render_sessions


WAITING = {"name": "web", "engine": "proxy", "state": "waiting", "socket": "/run/tether/web.sock"}
RUNNING_ROW = {"name": "db", "state": "running", "engine": "proxy", "engine_state": "running", "peer_pid": 4242,
               "restarts": 2, "uptime_s": 3725.4, "connections": 3, "denied": 1, "bytes_up": 2048,
               "bytes_down": 5 * 1024 * 1024, "socket": "/run/tether/db.sock"}


def test_render_sessions():
    lines = ctl.render_sessions([WAITING, RUNNING_ROW]).splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["NAME", "STATE", "ENGINE", "ENGINE", "STATE", "PID", "RESTARTS", "UPTIME", "CONNS",
                                "DENIED", "UP", "DOWN"]
    assert lines[1].split() == ["web", "waiting", "proxy"]
    assert lines[2].split() == ["db", "running", "proxy", "running", "4242", "2", "1h02m", "3", "1", "2.0", "KiB",
                                "5.0", "MiB"]
    column = lines[0].index("STATE")
    assert lines[1].index("waiting") == column and lines[2].index("running") == column


def test_render_sessions_admin_attach_shows_the_target_pid():
    row = RUNNING_ROW | {"peer_pid": 111, "peer_uid": 0, "target_pid": 222}
    assert ctl.render_sessions([row]).splitlines()[1].split()[4] == "222"


# =============================================================================================
# 10. fds over the control protocol


def _serve(tmp_path: Path, methods: dict, fd_methods: frozenset) -> tuple[ControlServer, str]:
    path = tmp_path / "c.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(8)
    server = ControlServer(listener, methods, {os.getuid()}, "test-server", fd_methods=fd_methods)
    server.start()
    return server, str(path)


async def _in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _served_call(tmp_path: Path, methods: dict, fd_methods: frozenset, client):
    """Serve ``methods`` on a fresh socket and run ``client(path)`` in a thread against it."""
    async def main_():
        server, path = _serve(tmp_path, methods, fd_methods)
        try:
            return await _in_thread(client, path)
        finally:
            server.close()

    return asyncio.run(main_())


def _identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def test_fds_reach_a_method_that_takes_them(tmp_path):
    data = tmp_path / "data"
    data.write_text("hello")
    received, kept = [], []

    def attach(request):
        received.extend(_identity(fd) for fd in request.fds)
        kept.append(request.fds.pop(0))  # keep the first; the server closes what is left
        return {"n": len(received), "params": request.params}

    file_fd = os.open(data, os.O_RDONLY)
    r, w = os.pipe()
    sent = [_identity(file_fd), _identity(r)]

    def client(path):
        with ControlClient(path, "test", timeout=5) as c:
            return c.call("attach", {"lifetime": "process"}, fds=[file_fd, r])

    try:
        result = _served_call(tmp_path, {"attach": attach}, frozenset({"attach"}), client)
        assert result == {"n": 2, "params": {"lifetime": "process"}}
        assert received == sent, "the method got the very files the client sent"
        assert _identity(kept[0]) == sent[0] and os.pread(kept[0], 5, 0) == b"hello"
        os.close(r)  # the client's copy; the server closed the one left in request.fds
        with pytest.raises(BrokenPipeError):
            os.write(w, b"x")
    finally:
        for fd in (file_fd, w, *kept):
            os.close(fd)


def _call(path: str, method: str):
    with ControlClient(path, "other", timeout=5) as c:
        return c.call(method)


def test_fds_to_a_method_not_in_fd_methods_close_the_connection(tmp_path):
    """The server is held (its loop blocked) while the client sends, so that the client has sent
    all it will send before the server answers and closes: see the test below for the
    other order."""
    r, w = os.pipe()
    connected, go = threading.Event(), threading.Event()

    def client():
        with ControlClient(path, "test", timeout=5) as c:
            connected.set()
            go.wait(5)
            with pytest.raises(ControlError) as info:
                c.call("ping", fds=[r])
            with pytest.raises(ControlError) as after:
                c.call("ping")
            return info.value, after.value

    async def main_():
        nonlocal path
        server, path = _serve(tmp_path, {"ping": lambda request: "pong", "attach": lambda request: None},
                              frozenset({"attach"}))
        try:
            outcome = asyncio.ensure_future(_in_thread(client))
            while not connected.is_set():
                await asyncio.sleep(0.005)
            go.set()
            time.sleep(0.2)  # the loop is blocked: the request is sent in full before the server reads it
            first, second = await outcome
            other = await _in_thread(_call, path, "ping")
            return first, second, other
        finally:
            server.close()

    path = ""
    try:
        first, second, other = asyncio.run(main_())
    finally:
        os.close(r)
    try:
        assert first.code == wire.UNEXPECTED_FD, first
        assert "ping takes no file descriptors; 1 were sent" in first.message
        assert second.code in ("closed", "unreachable"), "the connection was closed"
        assert other == "pong", "other clients unaffected"
        with pytest.raises(BrokenPipeError):  # the server closed the fd it was sent, unread
            os.write(w, b"x")
    finally:
        os.close(w)


def test_fd_violation_is_reported_even_when_the_server_closes_first(tmp_path, monkeypatch):
    from tether import control

    real = control._sys.send_fds

    def send_fds_then_let_the_server_close(sock, data, fds):
        sent = real(sock, data, fds)
        time.sleep(0.3)  # the server reads the whole frame, sends unexpected-fd and closes meanwhile
        return sent

    monkeypatch.setattr(control._sys, "send_fds", send_fds_then_let_the_server_close)
    r, w = os.pipe()

    def client(path):
        with ControlClient(path, "test", timeout=5) as c:
            with pytest.raises(ControlError) as info:
                c.call("ping", fds=[r])
            return info.value

    try:
        error = _served_call(tmp_path, {"ping": lambda request: "pong"}, frozenset(), client)
    finally:
        os.close(r)
        os.close(w)
    assert error.code == wire.UNEXPECTED_FD, error
