"""Test support for daemon mode: a ``tether serve`` in the world's host netns, and containers.

``DaemonProcess`` starts the daemon (root, in ``world.host_ns``, joined to the test's cgroup) with
its runtime directory and log under the test's workdir, and waits for systemd-style readiness:
``NOTIFY_SOCKET`` points at a datagram socket the harness binds, so ``READY=1`` is tested on every
start.  ``fds()`` lists the daemon's open fds (every scenario compares before and after).

``Netns`` is a plain network namespace standing in for a container (``ip netns add``); its
``state()`` says what tether put in it (links, nft tables, ip rules), for the teardown checks.
Names start with ``tdc-``: the leak check's rule for ``tether*`` namespaces stays about tether's own.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

from world import SANDBOX_PYTHON, TETHER_BIN, World, sh

READY_TIMEOUT = 15.0

# A client for inside the container: connect to HOST:PORT, send a line, print a JSON verdict.
HTTP_GET = r"""
import json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: t\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    print(json.dumps({"ok": True, "status": data.split(b"\r\n", 1)[0].decode(), "bytes": len(data)}))
except OSError as exc:
    print(json.dumps({"ok": False, "error": type(exc).__name__, "errno": exc.errno}))
"""


class DaemonProcess:
    def __init__(self, world: World, workdir: Path, cgroup: Path | None, config: str, env: dict[str, str]):
        self.world = world
        self.dir = workdir / f"daemon-{secrets.token_hex(3)}"
        self.dir.mkdir(mode=0o755)
        self.runtime_dir = self.dir / "run"
        self.config_path = self.dir / "tether.toml"
        self.log_path = self.dir / "events.jsonl"
        self.cgroup = cgroup
        self.env = env
        self.config_path.write_text(config)
        self.popen: subprocess.Popen | None = None
        self._notify: socket.socket | None = None
        self.stderr = ""

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> DaemonProcess:
        """Start (or, after ``stop()``, start again on the same directories)."""
        notify_path = self.dir / "notify"
        notify_path.unlink(missing_ok=True)
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(notify_path))
        self._notify.settimeout(READY_TIMEOUT)
        argv = ["ip", "netns", "exec", self.world.host_ns, str(TETHER_BIN), "serve", "--config", str(self.config_path),
                "--runtime-dir", str(self.runtime_dir), "--log", str(self.log_path)]
        self.popen = subprocess.Popen(World.wrap(argv, self.cgroup), env={**self.env, "NOTIFY_SOCKET": str(notify_path)},
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      start_new_session=True)
        try:
            message = self._notify.recv(4096).decode()
        except TimeoutError:
            self.popen.kill()
            out, err = self.popen.communicate(timeout=10)
            raise AssertionError(f"tether serve did not report READY=1 in {READY_TIMEOUT} s\n"
                                 f"exit {self.popen.returncode}\nstderr: {err.decode()[-3000:]}") from None
        assert "READY=1" in message.splitlines(), message
        self._settle()
        return self

    def _settle(self, quiet: float = 0.1, timeout: float = 3.0) -> None:
        """Wait until the daemon's fds stop changing (READY=1 is sent just before the notify
        socket is closed): so ``fds()`` right after ``start()`` is a baseline, not a transient."""
        deadline = time.monotonic() + timeout
        last = self.fds()
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = self.fds()
            if now == last:
                return
            last = now

    def socket(self, name: str) -> Path:
        return self.runtime_dir / f"{name}.sock"

    def fds(self) -> dict[int, str]:
        found = {}
        for entry in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                found[int(entry)] = os.readlink(f"/proc/{self.pid}/fd/{entry}")
            except OSError:
                pass
        return found

    def wait_fds(self, expected: dict[int, str], timeout: float = 5.0) -> dict[int, str]:
        """The daemon's fds once they equal ``expected`` (or after ``timeout``): teardown is async."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.fds()
            if _comparable(now) == _comparable(expected) or time.monotonic() > deadline:
                return now
            time.sleep(0.05)

    def admin(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([str(TETHER_BIN), "ctl", "--admin", "--runtime-dir", str(self.runtime_dir), *args],
                              capture_output=True, text=True, timeout=timeout, env=self.env)

    def admin_json(self, *args: str):
        r = self.admin(*args, "--json")
        assert r.returncode == 0, f"ctl --admin {' '.join(args)} failed: {r.stderr}"
        return json.loads(r.stdout)

    def events(self) -> list[dict]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def wait_event(self, predicate, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if predicate(event):
                    return event
            time.sleep(0.05)
        raise AssertionError(f"no matching daemon event in {timeout} s; events: {self.events()[-20:]}")

    def engine_pid(self, name: str) -> int | None:
        for row in self.admin_json("sessions"):
            if row["name"] == name:
                return row.get("engine_pid")
        return None

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; the exit code (idempotent)."""
        if self.popen is None:
            return 0
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        if self.popen.stdout is None or self.popen.stdout.closed:
            return self.popen.wait()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            _, err = self.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            _, err = self.popen.communicate(timeout=10)
            raise AssertionError("tether serve did not exit within 15 s of SIGTERM") from None
        finally:
            for stream in (self.popen.stdout, self.popen.stderr):
                if stream is not None:
                    stream.close()
        self.stderr += err.decode()
        return self.popen.returncode

    def stderr_text(self) -> str:
        return self.stderr


def _comparable(fds: dict[int, str]) -> list[str]:
    """fd targets, sorted: the numbers themselves may be reused differently."""
    return sorted(fds.values())


class Netns:
    """A network namespace standing in for a container."""

    def __init__(self) -> None:
        self.name = f"tdc-{secrets.token_hex(4)}"
        sh(["ip", "netns", "add", self.name])
        sh(["ip", "-n", self.name, "link", "set", "lo", "up"])
        self.path = f"/run/netns/{self.name}"

    def argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(argv), capture_output=True, text=True, timeout=timeout, **kw)

    def http_get(self, host: str, port: int = 80) -> dict:
        r = self.run([SANDBOX_PYTHON, "-c", HTTP_GET, host, str(port)])
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    def state(self) -> dict:
        links = json.loads(sh(["ip", "-j", "-n", self.name, "link"]).stdout or "[]")
        tables = sh(["ip", "netns", "exec", self.name, "nft", "list", "tables"]).stdout.split()
        rules = sh(["ip", "-n", self.name, "rule"]).stdout + sh(["ip", "-6", "-n", self.name, "rule"]).stdout
        return {"links": sorted(link["ifname"] for link in links),
                "nft": " ".join(tables),
                "tether_rules": [line.strip() for line in rules.splitlines() if "0x7e7e" in line or "32382" in line]}

    def clean_state(self) -> dict:
        return {"links": ["lo"], "nft": "", "tether_rules": []}

    def delete(self) -> None:
        sh(["ip", "netns", "del", self.name], check=False)


def attach_argv(daemon: DaemonProcess, name: str, *cmd: str) -> list[str]:
    return [str(TETHER_BIN), "attach", "--socket", str(daemon.socket(name)), *(["--", *cmd] if cmd else [])]


def start_holder(daemon: DaemonProcess, ns: Netns, name: str = "web") -> subprocess.Popen:
    """``tether attach`` without CMD (it holds the session in the foreground), once configured."""
    proc = subprocess.Popen(ns.argv(attach_argv(daemon, name)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=daemon.env)
    line = proc.stderr.readline().decode()
    if "network configured" not in line:
        proc.kill()
        raise AssertionError(line + proc.stderr.read().decode())
    return proc


def end_holder(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


def wait_clean(ns: Netns, timeout: float = 5.0) -> dict:
    """The netns's tether state once it is clean (or after ``timeout``): teardown is async."""
    deadline = time.monotonic() + timeout
    while True:
        state = ns.state()
        if state == ns.clean_state() or time.monotonic() > deadline:
            return state
        time.sleep(0.05)
