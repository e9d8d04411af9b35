"""Fixtures for tether's integration tests: the test world, both run modes, the runner, leak checks.

Fixture API (see also world.py):

* ``world``    (module scope) -- a built ``world.World``: netns ``tether-host-<id>`` where tether's
               host side runs (192.0.2.1, 2001:db8:1::1), netns ``tether-world-<id>`` with the
               servers on every world address, IPv4 and IPv6 (203.0.113.10 / 2001:db8:10::10,
               198.51.100.10, ...: tcp http :80, echo :7, sink :9000, source :9001, halfclose
               :9002; udp echo :7, udp sink :9100 with its stats on tcp :9101), the DNS server of
               the test zones on 198.51.100.53 / 2001:db8:10::53 and a rogue one on
               198.51.100.99 / 2001:db8:10::99 (udp+tcp :53). See world.py for the zones and the
               API (``world.dns_queries(name)``, ``world.udp_sink_stats()``, ...).
* ``fresh_dns`` -- the ``world`` with both DNS servers' query counters zeroed before the test.
* ``fresh_udp_sink`` -- the ``world`` with the UDP sink's counters zeroed before the test.
* ``mode``     -- parametrized ``"rootless"`` (as the unprivileged user tether-test) / ``"root"``.
* ``workdir``  -- a fresh per-test directory under /tmp, writable by the user of ``mode``; the cwd
               of every run.
* ``tether``   -- a ``TetherRunner``:
      ``tether(args, *, timeout=60, input=None, user=mode, pass_fds=())`` or ``tether.run(...)``
          -> ``subprocess.CompletedProcess`` (text stdout/stderr) of
          ``ip netns exec tether-host-<id> [setpriv --reuid=tether-test ... --] tether run ARGS``;
      ``tether.popen(args, ...)`` -> ``TetherProcess`` (``.pid`` is tether's own pid;
          ``.wait_for_line(b"ready")``, ``.send_signal()``, ``.finish(timeout)``);
      ``tether.python(code, *argv, opts=[...])`` runs ``/usr/bin/python3 -c code argv`` in the
          sandbox; ``tether.python_json(...)`` additionally requires exit 0 and parses the last
          stdout line as JSON;
      ``tether.argv(args)`` / ``tether.command(args)`` (the same, joining the test's cgroup
          first) / ``tether.env()`` for harnesses that spawn tether themselves (e.g. on a pty);
      ``tether.log_path()`` / ``tether.events(path)`` for the audit log;
      ``tether.uid`` (what ``id -u`` prints inside), ``tether.leftovers()``.
* ``leak_check`` (autouse) -- after every test (3 s grace for exiting processes): no process
               left in the test's cgroup (every run joins a per-test cgroup v2, so re-parented and
               pid-namespaced descendants are seen; without cgroup2: new processes of tether-test),
               no new process carrying the runs' env marker or living in the world's netns, no new
               ``tether*`` named netns, no new nft table in the host or root netns, no new mount in
               this (root) process's mountinfo, no tun (or other new) link in the host netns.
               Leftovers are reported as a teardown error (only a note if the test itself failed);
               what is provably ours is then removed. Other sessions' worlds, the benchmark's
               ``tether-bench-*`` namespaces and other users' processes are left alone.

Rootless runs use ``setpriv`` rather than ``runuser``: it execs directly (no PAM, no parent that
stays behind), so the Popen pid *is* the tether process, which the signal tests need.

The directory is skipped as a whole, with the reason, when not root or when tether isn't installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

pytest.register_assert_rewrite("world")

from world import (  # noqa: E402
    NAME_RE,
    SANDBOX_PYTHON,
    TETHER_BIN,
    World,
    all_pids,
    describe,
    cgroup_kill,
    cgroup_pids,
    netns_list,
    nft_tables,
    proc_cgroup,
    proc_describe,
    proc_start_time,
    proc_uid,
    read_line,
    sh,
)

TEST_USER = os.environ.get("TETHER_TEST_USER", "tether-test")
MODES = ["rootless", "root"]
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# --------------------------------------------------------------------------------------------
# skip / mark the whole directory


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return ("integration tests need root (network namespaces, veth, nft, cgroups); "
                "run them as root: /opt/tether/venv/bin/python -m pytest tests")
    if not TETHER_BIN.exists():
        return f"{TETHER_BIN} is missing: run ./scripts/install-deps.sh as root"
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        return f"test user {TEST_USER!r} is missing: run ./scripts/install-deps.sh as root"
    missing = [t for t in ("ip", "nft", "setpriv", "curl") if shutil.which(t, path=CLEAN_PATH) is None]
    if missing:
        return f"missing tools {missing}: run ./scripts/install-deps.sh as root"
    if not Path(SANDBOX_PYTHON).exists():
        return f"{SANDBOX_PYTHON} is missing"
    return None


def pytest_collection_modifyitems(config, items):
    reason = None
    checked = False
    for item in items:
        if HERE not in Path(str(item.fspath)).resolve().parents:
            continue
        item.add_marker(pytest.mark.integration)
        if not checked:
            reason, checked = _skip_reason(), True
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


# --------------------------------------------------------------------------------------------
# world, mode, workdir


@pytest.fixture(scope="module")
def world():
    with World() as w:
        yield w


@pytest.fixture
def fresh_dns(world):
    world.reset_dns_counters()
    return world


@pytest.fixture
def fresh_udp_sink(world):
    world.reset_udp_sink()
    return world


@pytest.fixture(params=MODES)
def mode(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tmp_root():
    root = tempfile.mkdtemp(prefix="tether-it-", dir="/tmp")
    os.chmod(root, 0o755)
    yield Path(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def workdir(tmp_root, mode, request) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:80]
    d = Path(tempfile.mkdtemp(prefix=name + "-", dir=tmp_root))
    os.chmod(d, 0o755)
    if mode == "rootless":
        pw = pwd.getpwnam(TEST_USER)
        os.chown(d, pw.pw_uid, pw.pw_gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def run_cgroup(world, request):
    """The cgroup every tether run of this test joins (None without cgroup v2)."""
    return world.new_cgroup(request.node.name)


# --------------------------------------------------------------------------------------------
# the runner


class TetherTimeout(AssertionError):
    pass


class TetherProcess:
    """A running ``tether run``; ``pid`` is tether's own pid (ip netns exec and setpriv exec)."""

    def __init__(self, argv: list[str], popen: subprocess.Popen, cgroup: Path | None):
        self.argv = argv
        self.popen = popen
        self.pid = popen.pid
        self.cgroup = cgroup
        self._out = bytearray()  # stdout read so far by wait_for_line
        self._buf = bytearray()
        self.result: subprocess.CompletedProcess | None = None

    def wait_for_line(self, needle: bytes | str = b"", timeout: float = 20) -> str:
        """Read stdout lines until one contains ``needle``; returns it. Fails on timeout/EOF."""
        if isinstance(needle, str):
            needle = needle.encode()
        deadline = time.monotonic() + timeout
        while True:
            line = read_line(self.popen.stdout.fileno(), deadline, self._buf)
            if line is None:
                self._out += self._buf
                self._buf.clear()
                raise AssertionError(f"no line containing {needle!r} on stdout within {timeout}s "
                                     f"(exit={self.popen.poll()}); stdout so far: {bytes(self._out)!r}")
            self._out += line + b"\n"
            if needle in line:
                return line.decode(errors="replace")

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill_all(self) -> None:
        """SIGKILL tether and everything it started (the cgroup), for timeouts and teardown."""
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        if self.cgroup is not None:
            cgroup_kill(self.cgroup)
        else:
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGKILL)

    def finish(self, timeout: float = 60, input: bytes | str | None = None) -> subprocess.CompletedProcess:
        """Wait for exit and collect output; on timeout kill everything and fail with the output."""
        if self.result is not None:
            return self.result
        if isinstance(input, str):
            input = input.encode()
        try:
            out, err = self.popen.communicate(input=input, timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            self.kill_all()
            try:
                out, err = self.popen.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                out, err = b"", b"(pipes still held open after kill)"
            timed_out = True
        stdout = (bytes(self._out) + bytes(self._buf) + (out or b"")).decode(errors="replace")
        stderr = (err or b"").decode(errors="replace")
        self.result = subprocess.CompletedProcess(self.argv, self.popen.returncode, stdout, stderr)
        if timed_out:
            raise TetherTimeout(f"tether did not finish within {timeout}s: {' '.join(self.argv)}\n"
                                f"--- stdout ---\n{stdout[-4000:]}\n--- stderr ---\n{stderr[-4000:]}")
        return self.result


class TetherRunner:
    def __init__(self, world: World, mode: str, workdir: Path, cgroup: Path | None):
        self.world = world
        self.mode = mode
        self.workdir = workdir
        self.cgroup = cgroup
        self.test_pw = pwd.getpwnam(TEST_USER)
        self.procs: list[TetherProcess] = []
        self._logs = 0

    # what `id -u` prints inside without --root
    @property
    def uid(self) -> int:
        return self.test_pw.pw_uid if self.mode == "rootless" else 0

    def _user(self, user: str | None) -> str:
        user = user or self.mode
        if user not in MODES:
            raise ValueError(f"user must be one of {MODES}, not {user!r}")
        return user

    def argv(self, args: list[str], *, user: str | None = None, subcommand: str = "run") -> list[str]:
        argv = ["ip", "netns", "exec", self.world.host_ns]
        if self._user(user) == "rootless":
            pw = self.test_pw
            argv += ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--"]
        return argv + [str(TETHER_BIN), *([subcommand] if subcommand else []), *[str(a) for a in args]]

    def tool(self, args: list[str], *, user: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
        """``tether ARGS`` (ps, ctl, ...) as the same user and environment as ``run`` (so it
        finds the same runtime directory)."""
        return subprocess.run(self.argv(args, user=user, subcommand=""), capture_output=True, text=True,
                              timeout=timeout, cwd=self.workdir, env=self.env(user=user))

    def command(self, args: list[str], *, user: str | None = None) -> list[str]:
        """``argv()`` prefixed so that the process first joins this test's cgroup (same pid: the
        prefix execs). For harnesses that spawn tether themselves (e.g. on a pty), so that the
        leak check and the cleanup see everything it starts."""
        return World.wrap(self.argv(args, user=user), self.cgroup)

    def env(self, *, user: str | None = None) -> dict[str, str]:
        if self._user(user) == "rootless":
            pw = self.test_pw
            env = {"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name}
        else:
            env = {"HOME": "/root", "USER": "root", "LOGNAME": "root"}
        env.update(PATH=CLEAN_PATH, LANG="C.UTF-8", TETHER_IT_WORLD=self.world.id)
        # Debug switches of tether itself pass through; proxies and the like never do.
        env.update({k: v for k, v in os.environ.items() if k.startswith("TETHER_") and k != "TETHER_IT_WORLD"})
        return env

    def popen(self, args: list[str], *, user: str | None = None, stdin=subprocess.DEVNULL,
              pass_fds: tuple[int, ...] = ()) -> TetherProcess:
        argv = self.argv(args, user=user)
        popen = subprocess.Popen(self.command(args, user=user), stdin=stdin, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, cwd=self.workdir, env=self.env(user=user),
                                 pass_fds=pass_fds, start_new_session=True)
        proc = TetherProcess(argv, popen, self.cgroup)
        self.procs.append(proc)
        return proc

    def run(self, args: list[str], *, timeout: float = 60, input: bytes | str | None = None,
            user: str | None = None, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess:
        proc = self.popen(args, user=user, pass_fds=pass_fds,
                          stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL)
        return proc.finish(timeout=timeout, input=input)

    __call__ = run

    def python(self, code: str, *argv, opts: list[str] = (), **kw) -> subprocess.CompletedProcess:
        return self.run([*opts, "--", SANDBOX_PYTHON, "-c", code, *[str(a) for a in argv]], **kw)

    def python_json(self, code: str, *argv, opts: list[str] = (), **kw):
        r = self.python(code, *argv, opts=opts, **kw)
        assert r.returncode == 0, f"sandboxed client failed: exit {r.returncode}\n{describe(r)}"
        lines = [line for line in r.stdout.splitlines() if line.strip()]
        assert lines, f"no output from sandboxed client\n{describe(r)}"
        try:
            return json.loads(lines[-1]), r
        except ValueError as e:
            raise AssertionError(f"last stdout line is not JSON ({e})\n{describe(r)}") from None

    def log_path(self, name: str = "audit") -> Path:
        self._logs += 1
        return self.workdir / f"{name}-{self._logs}.jsonl"

    def events(self, path: Path) -> list[dict]:
        assert path.exists(), f"audit log {path} was not written"
        events = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except ValueError as e:
                raise AssertionError(f"{path}:{n}: not a JSON object ({e}): {line!r}") from None
        return events

    def leftovers(self) -> list[str]:
        """Descriptions of processes still in this test's cgroup (or new ones of the test user)."""
        if self.cgroup is not None:
            return [proc_describe(p) for p in cgroup_pids(self.cgroup)]
        # Without cgroups: the processes that inherited the runs' environment marker.
        return [proc_describe(p) for p in all_pids() if p != os.getpid() and _has_env_marker(p, self.world.id)]

    def wait_no_leftovers(self, timeout: float = 5) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            left = self.leftovers()
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.05)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.kill_all()
            with contextlib.suppress(Exception):
                proc.popen.communicate(timeout=10)


@pytest.fixture
def tether(world, mode, workdir, run_cgroup):
    runner = TetherRunner(world, mode, workdir, run_cgroup)
    yield runner
    runner.cleanup()


# --------------------------------------------------------------------------------------------
# daemon mode (daemon_harness.py)


@pytest.fixture
def daemons(world, tmp_path, run_cgroup):
    """``daemons(config_text, base=tmp_path)`` -> a started ``DaemonProcess`` (in the host netns, the
    test's cgroup; its files under ``base``); each is stopped at teardown, which must exit 0."""
    from daemon_harness import DaemonProcess

    started: list = []
    env = {"PATH": CLEAN_PATH, "LANG": "C.UTF-8", "HOME": "/root", "TETHER_IT_WORLD": world.id}

    def start(config: str, base=None):
        daemon = DaemonProcess(world, base or tmp_path, run_cgroup, config, env).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        assert daemon.stop() == 0, daemon.stderr_text()


@pytest.fixture
def netns():
    """``netns()`` -> a new ``daemon_harness.Netns`` standing in for a container; deleted at teardown."""
    from daemon_harness import Netns

    made: list = []

    def make():
        ns = Netns()
        made.append(ns)
        return ns

    yield make
    for ns in made:
        ns.delete()


# --------------------------------------------------------------------------------------------
# a WireGuard peer in the world (Debian's wireguard-go)

WG_PEER_PORT = 51820


def wg_genkey() -> tuple[str, str]:
    private = sh(["wg", "genkey"]).stdout.strip()
    public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True, check=True).stdout.strip()
    return private, public


@pytest.fixture
def wg_peer(world, tmp_path, run_cgroup):
    """wireguard-go in the world netns: wgpXXXX 10.99.0.1/24, listening on 192.0.2.2:51820."""
    name = f"wgp{secrets.token_hex(4)}"
    private, public = wg_genkey()
    (tmp_path / "peer.key").write_text(private + "\n")
    proc = subprocess.Popen(world.wrap(["ip", "netns", "exec", world.world_ns, "wireguard-go", "-f", name], run_cgroup),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin",
                                                                                       "LOG_LEVEL": "error"})
    deadline = time.monotonic() + 10
    while not os.path.exists(f"/var/run/wireguard/{name}.sock") and time.monotonic() < deadline:
        time.sleep(0.05)
    sh(["ip", "-n", world.world_ns, "addr", "add", "10.99.0.1/24", "dev", name])
    sh(["ip", "-n", world.world_ns, "link", "set", name, "up"])
    sh(["wg", "set", name, "listen-port", str(WG_PEER_PORT), "private-key", str(tmp_path / "peer.key")])
    yield {"name": name, "public": public}
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------------------------
# leak check


@dataclass
class Snapshot:
    procs: set = field(default_factory=set)  # {(pid, starttime)}
    netns: set = field(default_factory=set)
    nft_root: set = field(default_factory=set)
    nft_host: set = field(default_factory=set)
    mounts: set = field(default_factory=set)
    host_links: set = field(default_factory=set)  # {(ifname, kind)}
    runtime_files: set = field(default_factory=set)  # control sockets and locks of running sandboxes

    @classmethod
    def take(cls, world: World) -> Snapshot:
        procs = set()
        for pid in all_pids():
            st = proc_start_time(pid)
            if st is not None:
                procs.add((pid, st))
        return cls(
            procs=procs,
            netns=netns_list(),
            nft_root=nft_tables(None),
            nft_host=nft_tables(world.host_ns),
            mounts=set(Path("/proc/self/mountinfo").read_text().splitlines()),
            host_links={(link["ifname"], link["kind"]) for link in world.host_links()},
            runtime_files=runtime_files(),
        )


def runtime_files() -> set[str]:
    """Every file in the runtime directories tether uses (root's, the test user's)."""
    test_uid = pwd.getpwnam(TEST_USER).pw_uid
    dirs = [Path("/run/tether"), Path(f"/tmp/tether-{test_uid}"), Path(f"/run/user/{test_uid}/tether")]
    return {str(p) for d in dirs if d.is_dir() for p in d.iterdir()}


def _mount_point(line: str) -> str:
    return line.split()[4]


def _suspicious_netns_name(name: str) -> bool:
    """A named netns that tether may have left. Other test worlds (this harness, possibly in a
    concurrent session) and the benchmark harness's ``tether-bench-*`` namespaces are not."""
    return name.startswith("tether") and not NAME_RE.match(name) and not name.startswith("tether-bench-")


def _has_env_marker(pid: int, world_id: str) -> bool:
    try:
        return f"TETHER_IT_WORLD={world_id}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _netns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _find_leaks(before: Snapshot, after: Snapshot, world: World, cgroup: Path | None) -> tuple[list[str], dict]:
    """What the test left behind. ``found`` lists what is provably ours and may be removed."""
    problems: list[str] = []
    found: dict = {"pids": set(), "nft_host": set(), "links": set(), "runtime_files": set()}
    test_uid = pwd.getpwnam(TEST_USER).pw_uid
    our_netns = {_netns_inode(f"/run/netns/{ns}") for ns in (world.host_ns, world.world_ns)} - {None}
    server_pids = {srv.proc.pid for srv in world.servers}

    # Processes. Exact with cgroups: everything a run started, however re-parented or namespaced,
    # stays in the run's cgroup. Besides, any new process carrying the runs' environment marker or
    # living in the world's namespaces is ours. New processes of the test user that are neither
    # belong to someone else (a concurrent benchmark, another session): reported only without
    # cgroups, never killed.
    for pid in cgroup_pids(cgroup):
        found["pids"].add(pid)
        problems.append(f"process left in the test's cgroup: {proc_describe(pid)}")
    for pid, st in sorted(after.procs - before.procs):
        if pid in found["pids"] or pid in server_pids or proc_start_time(pid) != st:
            continue
        cg = (proc_cgroup(pid) or "") + "/"
        if world.cgroup is not None and f"/{world.cgroup.name}/" in cg:
            continue  # the world's own servers
        if _has_env_marker(pid, world.id) or _netns_inode(f"/proc/{pid}/ns/net") in our_netns:
            found["pids"].add(pid)
            problems.append(f"process left behind: {proc_describe(pid)}")
        elif cgroup is None and proc_uid(pid) == test_uid and "/tether-it-" not in cg:
            problems.append(f"process of {TEST_USER} left behind (or a concurrent user's): {proc_describe(pid)}")

    suspicious_ns = sorted(ns for ns in after.netns - before.netns if _suspicious_netns_name(ns))
    for ns in suspicious_ns:
        problems.append(f"named netns left behind: {ns}")
    for t in sorted(after.nft_root - before.nft_root):
        problems.append(f"nft table left in the root netns: {t}")
    for t in sorted(after.nft_host - before.nft_host):
        found["nft_host"].add(t)
        problems.append(f"nft table left in the host netns {world.host_ns}: {t}")
    for line in sorted(after.mounts - before.mounts):
        mp = _mount_point(line)
        if mp.startswith("/run/netns/") and not _suspicious_netns_name(mp.rsplit("/", 1)[1]):
            continue  # other worlds' / tools' named netns (a suspicious one is reported above too)
        problems.append(f"mount left in the root mount namespace: {line}")
    for ifname, kind in sorted(after.host_links - before.host_links, key=str):
        found["links"].add(ifname)
        problems.append(f"link left in the host netns: {ifname} (kind {kind})")
    for path in sorted(after.runtime_files - before.runtime_files):
        found["runtime_files"].add(path)
        problems.append(f"runtime file left behind (control socket or lock): {path}")
    for ifname, kind in sorted(after.host_links, key=str):
        if kind == "tun" and ifname not in found["links"]:
            found["links"].add(ifname)
            problems.append(f"tun interface in the host netns: {ifname}")
    return problems, found


def _remove_leaks(found: dict, world: World, cgroup: Path | None) -> None:
    """Remove what is provably ours (the run cgroup, marked processes, the host netns's tables and
    links, runtime files the test created); leaks elsewhere (root netns, mounts, named netns) are
    only reported."""
    cgroup_kill(cgroup)
    for pid in found["pids"]:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for t in found["nft_host"]:
        world.in_host(["nft", "delete", "table", *t.split()])
    for ifname in found["links"]:
        sh(["ip", "-n", world.host_ns, "link", "del", ifname], check=False)
    for path in found["runtime_files"]:  # created during the test: a killed run's socket and lock
        with contextlib.suppress(OSError):
            os.unlink(path)


@pytest.fixture(autouse=True)
def leak_check(request, world, run_cgroup):
    before = Snapshot.take(world)
    yield
    deadline = time.monotonic() + 3.0  # let exiting processes finish exiting
    while True:
        problems, found = _find_leaks(before, Snapshot.take(world), world, run_cgroup)
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if problems:
        _remove_leaks(found, world, run_cgroup)
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            # The test already failed (possibly mid-run); don't pile a second error on top.
            sys.stderr.write("\nleak check after failed test (cleaned up):\n  " + "\n  ".join(problems) + "\n")
            return
        pytest.fail("tether left things behind:\n  " + "\n  ".join(problems), pytrace=False)
