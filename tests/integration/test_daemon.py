"""Daemon mode: ``tether serve`` in the world's host netns, containers (plain netns here) attached
with ``tether attach``, ``tether ctl --admin``, engine supervision, hostile clients, reloads.

Every scenario compares the daemon's open fds before and after, and checks that the container's
netns holds nothing of tether once its session is over (no tun, no nft table, no ip rule).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from daemon_harness import HTTP_GET, attach_argv, end_holder, start_holder, wait_clean
from world import ADS_ADDR, SANDBOX_PYTHON, TETHER_BIN, WORLD_ADDR, WORLD_ADDR2

from tether import wire
from tether.control import ControlClient, ControlError

WEB = f"""
[daemon]
max_pending = 8

[container.web]
default = "deny"
allow = ["{WORLD_ADDR}:80", "*.example.test"]
dns = ["198.51.100.53"]

[container.db]
default = "allow"
"""

SOFTWARE = "tether-tests"


# -- (a) attach: policy applies, teardown complete ---------------------------------------------------


def test_attach_applies_the_policy_then_leaves_nothing(daemons, netns):
    daemon = daemons(WEB)
    ns = netns()
    before = daemon.fds()
    client = ("import json, subprocess, sys\n"
              "out = [json.loads(subprocess.run([sys.executable, '-c', sys.argv[1], host, '80'], capture_output=True,"
              " text=True).stdout) for host in sys.argv[2:]]\n"
              "print(json.dumps(out))")
    r = ns.run(attach_argv(daemon, "web", SANDBOX_PYTHON, "-c", client, HTTP_GET, WORLD_ADDR, WORLD_ADDR2))
    assert r.returncode == 0, r.stderr
    allowed, denied = json.loads(r.stdout.strip().splitlines()[-1])
    assert allowed["ok"] and allowed["status"].startswith("HTTP/1.0 200"), allowed
    # refused at once: by the kernel (ECONNREFUSED), or - with a domain rule in the policy, which only
    # the engine can evaluate - by the engine's reset on accept (ECONNRESET)
    assert denied["ok"] is False and denied["errno"] in (111, 104), denied
    assert "web: network configured (tun0, 10.0.2.100/24" in r.stderr
    daemon.wait_event(lambda e: e["event"] == "detach" and e["sandbox"] == "web")
    assert wait_clean(ns) == ns.clean_state()
    assert sorted(daemon.wait_fds(before).values()) == sorted(before.values())
    events = daemon.events()
    kinds = [(e["event"], e.get("dst"), e.get("rule")) for e in events if e["sandbox"] == "web"]
    assert ("connect", f"{WORLD_ADDR}:80", f"{WORLD_ADDR}:80") in kinds, kinds
    assert ("deny", f"{WORLD_ADDR2}:80", "default") in kinds, kinds
    attach = next(e for e in events if e["event"] == "attach")
    assert attach["source"] == "attach" and attach["peer_uid"] == 0 and attach["peer_pid"] > 0


def test_dns_stub_and_domain_rules_work_through_the_daemon(daemons, netns):
    daemon = daemons(WEB)
    ns = netns()
    before = daemon.fds()
    code = "import json, socket; print(json.dumps(socket.getaddrinfo('example.test', 80, socket.AF_INET)[0][4][0]))"
    os.makedirs(f"/etc/netns/{ns.name}", exist_ok=True)  # ip netns exec binds it over /etc/resolv.conf
    try:
        with open(f"/etc/netns/{ns.name}/resolv.conf", "w") as f:
            f.write("nameserver 10.0.2.3\n")
        r = ns.run(attach_argv(daemon, "web", SANDBOX_PYTHON, "-c", code))
    finally:
        os.unlink(f"/etc/netns/{ns.name}/resolv.conf")
        os.rmdir(f"/etc/netns/{ns.name}")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == WORLD_ADDR
    r = ns.run(attach_argv(daemon, "web", SANDBOX_PYTHON, "-c", HTTP_GET, ADS_ADDR, "80"))
    assert json.loads(r.stdout.strip().splitlines()[-1])["ok"] is False  # no name was resolved for it
    assert wait_clean(ns) == ns.clean_state()
    assert sorted(daemon.wait_fds(before).values()) == sorted(before.values())


# -- (e) an engine killed is restarted ---------------------------------------------------------------


def test_killed_engine_is_restarted_on_the_same_fds(daemons, netns):
    daemon = daemons(WEB)
    ns = netns()
    before = daemon.fds()
    holder = start_holder(daemon, ns)
    try:
        assert ns.http_get(WORLD_ADDR)["ok"]
        first = daemon.engine_pid("web")
        assert first
        os.kill(first, signal.SIGKILL)
        daemon.wait_event(lambda e: e["event"] == "engine-start" and e.get("restarts") == 1)
        result = ns.http_get(WORLD_ADDR)
        assert result["ok"], result
        row = next(r for r in daemon.admin_json("sessions") if r["name"] == "web")
        assert row["restarts"] == 1 and row["engine_pid"] not in (None, first) and row["engine_state"] == "running"
        assert row["last_exit"] == "killed by signal 9"
        exit_event = daemon.wait_event(lambda e: e["event"] == "engine-exit")
        assert exit_event["reason"] == "killed by signal 9"
        assert ns.http_get(WORLD_ADDR2)["ok"] is False  # the policy came back with it
    finally:
        end_holder(holder)
    assert wait_clean(ns) == ns.clean_state()
    assert sorted(daemon.wait_fds(before).values()) == sorted(before.values())


def test_an_engine_that_keeps_dying_ends_its_session(daemons, netns):
    daemon = daemons(WEB.replace("max_pending = 8", "max_pending = 8\nrestart_max = 2\nrestart_window = 60"))
    ns = netns()
    before = daemon.fds()
    holder = start_holder(daemon, ns)
    try:
        for restarts in range(3):
            pid = None
            deadline = time.monotonic() + 10
            while pid is None and time.monotonic() < deadline:
                pid = daemon.engine_pid("web")
                time.sleep(0.05)
            assert pid, "no engine running"
            os.kill(pid, signal.SIGKILL)
            if restarts < 2:
                daemon.wait_event(lambda e, n=restarts + 1: e["event"] == "engine-start" and e.get("restarts") == n)
        failed = daemon.wait_event(lambda e: e["event"] == "engine-failed")
        assert "2 restarts in 60 s" in failed["reason"]
        # no engine: the session ends (connections fail at once instead of hanging captured), and the
        # client says why and exits non-zero
        detach = daemon.wait_event(lambda e: e["event"] == "detach")
        assert detach["reason"].startswith("its engine failed (2 restarts in 60 s; last: killed by signal 9")
        assert holder.wait(timeout=10) == 1
        assert "session ended: its engine failed" in holder.stderr.read().decode()
        assert wait_clean(ns) == ns.clean_state()
        unreachable = ns.http_get(WORLD_ADDR)
        assert unreachable == {"ok": False, "error": "OSError", "errno": 101}, unreachable  # ENETUNREACH
    finally:
        if holder.poll() is None:
            holder.kill()
    assert sorted(daemon.wait_fds(before).values()) == sorted(before.values())


# -- (f) the client vanishes -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["kill-holder", "kill-command"])
def test_client_vanishing_tears_the_session_down(daemons, netns, how):
    daemon = daemons(WEB)
    ns = netns()
    before = daemon.fds()
    if how == "kill-holder":
        proc = start_holder(daemon, ns)
    else:
        proc = subprocess.Popen(ns.argv(attach_argv(daemon, "web", "sleep", "300")), stderr=subprocess.PIPE,
                                env=daemon.env)
        assert "network configured" in proc.stderr.readline().decode()
    assert ns.state()["links"] == ["lo", "tun0"]
    proc.kill()  # `ip netns exec` and `tether attach` exec: this is the holder, or CMD itself
    proc.wait(timeout=10)
    event = daemon.wait_event(lambda e: e["event"] == "detach")
    assert event["reason"] in ("its client went away", "the container's process exited")
    assert wait_clean(ns) == ns.clean_state()
    assert sorted(daemon.wait_fds(before).values()) == sorted(before.values())
    assert [r["state"] for r in daemon.admin_json("sessions")] == ["waiting", "waiting"]


# -- (g) hostile clients -------------------------------------------------------------------------


def raw_frames(path, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def attach_with(path, fds: list[int], params: dict | None = None) -> ControlError:
    with ControlClient(path, SOFTWARE) as client:
        with pytest.raises(ControlError) as caught:
            list(client.stream("attach", params or {}, fds))
    return caught.value


def test_hostile_clients_are_refused_and_harm_no_session(daemons, netns, world, tmp_path):
    daemon = daemons(WEB)
    ns, other = netns(), netns()
    holder = start_holder(daemon, ns)
    try:
        assert ns.http_get(WORLD_ADDR)["ok"]
        baseline = daemon.fds()
        path = daemon.socket("web")
        # malformed frames: garbage length, non-JSON body, request before hello
        for payload in (b"\xff\xff\xff\xff", b"\x00\x00\x00\x05hello", wire.encode(wire.request(1, "attach"))):
            reply = raw_frames(path, payload)
            assert b'"type":"error"' in reply, reply
        # a regular file instead of a netns
        with open(tmp_path / "plain", "w") as plain:
            err = attach_with(path, [plain.fileno()])
        assert err.code == wire.BAD_PARAMS and "not a namespace" in err.message
        # another kind of namespace
        uts = os.open("/proc/self/ns/uts", os.O_RDONLY)
        try:
            assert "not a network namespace" in attach_with(path, [uts]).message
        finally:
            os.close(uts)
        # the daemon's own netns (the world's host netns) and the machine's
        for host in (f"/run/netns/{world.host_ns}", "/proc/self/ns/net"):
            fd = os.open(host, os.O_RDONLY)
            try:
                err = attach_with(path, [fd])
            finally:
                os.close(fd)
            assert err.code == wire.PERMISSION_DENIED and "host's network namespace" in err.message, host
        fd = os.open(other.path, os.O_RDONLY)
        try:
            # a second session for web while one is live
            assert attach_with(path, [fd]).code == wire.CONFLICT
            # naming another container through web's socket
            err = attach_with(path, [fd], {"name": "db"})
            assert err.code == wire.PERMISSION_DENIED and "cannot act on 'db'" in err.message
            # three fds; a second fd that is no pidfd; lifetime "process" without a pidfd; bad lifetime
            assert attach_with(path, [fd, fd, fd]).code == wire.BAD_PARAMS
            assert "pidfd" in attach_with(path, [fd, fd]).message
            assert "pidfd" in attach_with(daemon.socket("db"), [fd], {"lifetime": "process"}).message
            assert attach_with(daemon.socket("db"), [fd], {"lifetime": "forever"}).code == wire.BAD_PARAMS
            # fds to a method that takes none
            with ControlClient(path, SOFTWARE) as client, pytest.raises(ControlError) as caught:
                client.call("status", {}, [fd])
            assert caught.value.code == wire.UNEXPECTED_FD
        finally:
            os.close(fd)
        # a flood of connections: max_pending (8) at once, the rest refused with busy
        held = []
        try:
            refused = 0
            for _ in range(12):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(path))
                held.append(s)
            time.sleep(0.3)
            for s in held:
                s.settimeout(0.2)
                try:
                    if b"busy" in s.recv(4096):
                        refused += 1
                except TimeoutError:
                    pass
            assert refused >= 4, refused
        finally:
            for s in held:
                s.close()
        # a slow-loris: connected, silent - the slot is taken back after the hello timeout (5 s)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
            silent.settimeout(15)
            silent.connect(str(path))
            assert b"no hello within 5 s" in silent.recv(4096)
        assert other.state() == other.clean_state()
        assert ns.http_get(WORLD_ADDR)["ok"]  # the live session never noticed
        after = daemon.wait_fds(baseline)
        assert sorted(after.values()) == sorted(baseline.values())
        refusals = [e for e in daemon.events() if e["event"] == "refused"]
        assert any("host's network namespace" in e["reason"] for e in refusals)
    finally:
        end_holder(holder)
    assert wait_clean(ns) == ns.clean_state()


# -- admin -----------------------------------------------------------------------------------------


def test_admin_sessions_attach_by_pid_and_detach(daemons, netns):
    daemon = daemons(WEB)
    ns = netns()
    before = daemon.fds()
    sleeper = subprocess.Popen(ns.argv(["sleep", "300"]))
    try:
        r = daemon.admin("attach", "--pid", str(sleeper.pid), "--name", "db")
        assert r.returncode == 0, r.stderr
        assert "attached pid" in r.stdout and "tun0" in r.stdout
        rows = {row["name"]: row for row in daemon.admin_json("sessions")}
        assert rows["db"]["state"] == "running" and rows["db"]["source"] == "admin"
        assert rows["web"]["state"] == "waiting"
        human = daemon.admin("sessions").stdout
        assert "db" in human and "running" in human and "waiting" in human
        assert ns.http_get(WORLD_ADDR2)["ok"]  # db allows by default
        r = daemon.admin("detach", "db")
        assert r.returncode == 0 and "detached db" in r.stdout
        assert wait_clean(ns) == ns.clean_state()
        assert sleeper.poll() is None  # detaching never touches the container's processes
        r = daemon.admin("detach", "db")
        assert r.returncode == 1 and "has no session" in r.stderr
        r = daemon.admin("detach", "nope")
        assert r.returncode == 1 and "no container 'nope'" in r.stderr
        r = daemon.admin("attach", "--pid", str(2 ** 22 + 12345), "--name", "db")
        assert r.returncode == 1 and "no process" in r.stderr
        # a session tied to a process ends with it
        assert daemon.admin("attach", "--pid", str(sleeper.pid), "--name", "db").returncode == 0
        sleeper.kill()
        sleeper.wait()
        daemon.wait_event(lambda e: e["event"] == "detach" and e["reason"] == "the container's process exited")
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
    assert sorted(daemon.wait_fds(before).values()) == sorted(before.values())


def test_admin_events_follow_streams_the_log(daemons, netns):
    daemon = daemons(WEB)
    ns = netns()
    follow = subprocess.Popen([str(TETHER_BIN), "ctl", "--admin", "--runtime-dir", str(daemon.runtime_dir), "events",
                               "--follow", "--json", "--backlog", "0"], stdout=subprocess.PIPE, text=True,
                              env=daemon.env)
    try:
        time.sleep(0.3)
        ns.run(attach_argv(daemon, "web", SANDBOX_PYTHON, "-c", HTTP_GET, WORLD_ADDR2, "80"))
        seen = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(e["event"] == "detach" for e in seen):
            seen.append(json.loads(follow.stdout.readline()))
        kinds = [e["event"] for e in seen]
        assert kinds[0] == "engine-start" or "attach" in kinds, kinds
        assert "deny" in kinds and kinds[-1] == "detach", kinds
    finally:
        follow.terminate()
        follow.wait(timeout=10)


def test_admin_socket_is_root_only(daemons):
    daemon = daemons(WEB)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", str(TETHER_BIN), "ctl",
                        "--admin", "--runtime-dir", str(daemon.runtime_dir), "sessions"],
                       capture_output=True, text=True, timeout=30, env=daemon.env)
    assert r.returncode == 1
    assert "Permission denied" in r.stderr or "permission" in r.stderr


# -- restarts and reloads ----------------------------------------------------------------------------


def test_attach_client_reconnects_after_a_daemon_restart(daemons, netns):
    daemon = daemons(WEB)
    ns = netns()
    app = subprocess.Popen(ns.argv(attach_argv(daemon, "web", "sleep", "300")), stderr=subprocess.PIPE,
                           env=daemon.env)
    try:
        assert "network configured" in app.stderr.readline().decode()
        assert ns.http_get(WORLD_ADDR)["ok"]
        assert daemon.stop() == 0
        assert wait_clean(ns) == ns.clean_state()  # a stopping daemon unconfigures its containers
        daemon.start()
        daemon.wait_event(lambda e: e["event"] == "attach" and e["sandbox"] == "web"
                          and sum(1 for x in daemon.events() if x["event"] == "attach") == 2, timeout=15)
        assert "reattached to the daemon" in app.stderr.readline().decode()
        assert ns.http_get(WORLD_ADDR)["ok"]
        assert app.poll() is None  # the app never noticed more than a pause
    finally:
        app.kill()
        app.wait()
    daemon.wait_event(lambda e: e["event"] == "detach" and sum(1 for x in daemon.events()
                                                                  if x["event"] == "detach") == 2)
    assert wait_clean(ns) == ns.clean_state()


def test_sighup_reload_applies_policy_and_removes_containers(daemons, netns):
    daemon = daemons(WEB)
    ns, ns2 = netns(), netns()
    initial = daemon.fds()
    web = start_holder(daemon, ns)
    db = start_holder(daemon, ns2, "db")
    try:
        assert ns.http_get(WORLD_ADDR2)["ok"] is False
        daemon.config_path.write_text(WEB.replace(f'allow = ["{WORLD_ADDR}:80"', f'allow = ["{WORLD_ADDR2}:80"')
                                      .replace('[container.db]\ndefault = "allow"\n', ""))
        daemon.signal(signal.SIGHUP)
        reload = daemon.wait_event(lambda e: e["event"] == "reload")
        assert reload["policy"] == ["web"] and reload["removed"] == ["db"]
        assert ns.http_get(WORLD_ADDR2)["ok"] is True
        assert ns.http_get(WORLD_ADDR)["ok"] is False
        assert db.wait(timeout=10) == 0  # its session ended and was not to be re-established
        assert wait_clean(ns2) == ns2.clean_state()
        assert not daemon.socket("db").exists()
        # a broken config is refused; the running one stays
        daemon.config_path.write_text(WEB + "\n[container.web2]\nengine = \"warp\"\n")
        daemon.signal(signal.SIGHUP)
        refused = daemon.wait_event(lambda e: e["event"] == "error" and "reload refused" in e["reason"])
        assert "engine" in refused["reason"]
        assert ns.http_get(WORLD_ADDR2)["ok"] is True
        r = daemon.admin("reload")
        assert r.returncode == 1 and "the config has errors" in r.stderr
    finally:
        end_holder(web)
        if db.poll() is None:
            db.kill()
    assert wait_clean(ns) == ns.clean_state()
    # db's socket, claim lock and server are gone with it: two fds fewer than at the start
    left = sorted(daemon.wait_fds(initial).values())
    assert len(left) == len(initial) - 2 and str(daemon.socket("db")) not in " ".join(left), left


# -- (h) config errors ---------------------------------------------------------------------------


def test_check_config_lists_every_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[daemon]\nruntime_dir = "relative"\n\n[container.web]\nengine = "proxy"\ndefault = "maybe"\n'
                    'allow = ["300.1.2.3"]\nsocket_mode = 660\n')
    r = subprocess.run([str(TETHER_BIN), "serve", "--config", str(path), "--check-config"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2
    for needle in (f"{path}:2: daemon.runtime_dir", f"{path}:6: container.web.default",
                   f"{path}:7: container.web.allow", f"{path}:8: container.web.socket_mode"):
        assert needle in r.stderr, r.stderr
    path.write_text(WEB)
    r = subprocess.run([str(TETHER_BIN), "serve", "--config", str(path), "--check-config"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and "valid (2 containers: web, db)" in r.stdout


def test_a_second_daemon_on_the_same_runtime_dir_is_refused(daemons, world):
    daemon = daemons(WEB)
    r = subprocess.run(["ip", "netns", "exec", world.host_ns, str(TETHER_BIN), "serve", "--config",
                        str(daemon.config_path), "--runtime-dir", str(daemon.runtime_dir)],
                       capture_output=True, text=True, timeout=30, env=daemon.env)
    assert r.returncode == 2
    assert "cannot take 'admin'" in r.stderr and "already running" in r.stderr
    assert daemon.admin("sessions").returncode == 0  # the first one is untouched


# -- published ports -------------------------------------------------------------------------------

SERVER = r"""
import socket
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 80)); srv.listen(8)
print("listening", flush=True)
conn, peer = srv.accept()
conn.sendall(("hello " + peer[0] + "\n").encode()); conn.close()
"""


def test_ports_publish_a_container_server_on_the_daemons_host(daemons, netns, world):
    port = 18000 + os.getpid() % 1000
    daemon = daemons(f'[container.web]\nports = ["{port}:80", "0.0.0.0:{port + 1}:80"]\n')
    ns = netns()
    before = daemon.fds()
    server = subprocess.Popen(ns.argv(attach_argv(daemon, "web", SANDBOX_PYTHON, "-c", SERVER)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=daemon.env)
    try:
        assert server.stdout.readline().strip() == "listening"
        # from the world, through the address published on every interface: the server sees the client
        got = world.in_world([SANDBOX_PYTHON, "-c", "import socket, sys; s = socket.create_connection("
                              f"('{world.host_addr}', {port + 1}), timeout=10); print(s.recv(100).decode().strip())"])
        assert got.returncode == 0 and got.stdout.strip() == "hello 192.0.2.2", got
        assert server.wait(timeout=10) == 0
    finally:
        if server.poll() is None:
            server.kill()
    daemon.wait_event(lambda e: e["event"] == "detach")
    events = [e for e in daemon.events() if e["sandbox"] == "web" and e.get("proto") == "tcp"]
    assert any(e["event"] == "connect" and e.get("direction") == "in" for e in events), events
    assert wait_clean(ns) == ns.clean_state()
    assert sorted(daemon.wait_fds(before).values()) == sorted(before.values())  # host sockets closed too


def test_sigterm_right_after_configured_exits_cleanly(daemons, netns):
    """The handlers are in place before "configured" is printed (the daemon benchmark caught
    clients dying of a SIGTERM sent right after that line)."""
    daemon = daemons(WEB)
    ns = netns()
    before = daemon.fds()
    for attempt in range(10):
        holder = start_holder(daemon, ns)
        holder.send_signal(signal.SIGTERM)  # at once: no pause between the line and the signal
        assert holder.wait(timeout=10) == 0, f"attempt {attempt}: {holder.stderr.read().decode()}"
        daemon.wait_event(lambda e, n=attempt + 1: e["event"] == "detach"
                          and sum(1 for x in daemon.events() if x["event"] == "detach") == n)
    assert wait_clean(ns) == ns.clean_state()
    assert sorted(daemon.wait_fds(before).values()) == sorted(before.values())
