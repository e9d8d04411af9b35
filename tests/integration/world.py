"""The integration test world of DESIGN.md ("Testing topology").

    root netns (untouched)

    tether-host-<id>                         tether-world-<id>
    ┌──────────────────────────────┐  veth  ┌───────────────────────────────────────────┐
    │ lo up                        │        │ lo up, 203.0.113.10/32, 198.51.100.10/32   │
    │ eth0 192.0.2.1/24 ───────────┼────────┼── eth0 192.0.2.2/24                        │
    │ 203.0.113.0/24  via 192.0.2.2│        │ servers.py bound to 0.0.0.0:               │
    │ 198.51.100.0/24 via 192.0.2.2│        │   http :80, echo :7, sink :9000,           │
    │ (no default route)           │        │   source :9001, halfclose :9002            │
    │ tether run ... (host side)   │        └───────────────────────────────────────────┘
    └──────────────────────────────┘

Nothing here can reach a real network: both namespaces are new, the host netns has routes only
to documentation prefixes that live in the world netns, and the world has no other link.

Every process the world starts (servers, and the tether runs of the fixtures via ``wrap()``) is
placed in a cgroup v2 under ``tether-it-<id>`` when cgroup2 is available, so teardown and the leak
checks see every descendant, even re-parented or in other pid namespaces, and can kill them all.

``World`` is a context manager; teardown runs even after a failed or partial setup. A world whose
pytest process died without tearing down (SIGKILL, power loss) is reaped by the next ``World()``
through its marker in ``/run/tether-it/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import servers  # noqa: E402  (sibling module, also run as a script in the world)

VENV = Path("/opt/tether/venv")
VENV_PYTHON = VENV / "bin" / "python"
TETHER_BIN = VENV / "bin" / "tether"
SANDBOX_PYTHON = "/usr/bin/python3"  # what the sandboxed side runs (readable by the test user)

HOST_ADDR = "192.0.2.1"  # host netns end of the veth: one of "the host's own addresses"
WORLD_VETH_ADDR = "192.0.2.2"
WORLD_ADDR = "203.0.113.10"  # main server address
WORLD_ADDR2 = "198.51.100.10"  # second server address (same servers)
WORLD_PREFIXES = ("203.0.113.0/24", "198.51.100.0/24")

PORTS = {"http": 80, "echo": 7, "sink": 9000, "source": 9001, "halfclose": 9002}

# Inside the sandbox (the contract of `tether run`).
SANDBOX_ADDR = "10.0.2.100"
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"

NAME_RE = re.compile(r"^tether-(host|world)-([0-9a-f]{8})$")
MARKER_DIR = Path("/run/tether-it")
CGROUP_PREFIX = "tether-it-"


class WorldError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# small helpers


def sh(argv: list[str], *, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    """Run a helper command (ip, nft, ...) with captured text output."""
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise WorldError(f"{' '.join(argv)} -> exit {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def describe(r: subprocess.CompletedProcess) -> str:
    """argv, exit status and output tails of a finished run, for assertion messages."""
    return (f"argv: {' '.join(map(str, r.args))}\nexit: {r.returncode}\n"
            f"--- stdout ---\n{r.stdout[-4000:]}\n--- stderr ---\n{r.stderr[-4000:]}")


def proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a pid, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def proc_uid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_describe(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = "?"
    return f"pid {pid} uid {proc_uid(pid)} cgroup {proc_cgroup(pid)!r}: {cmd or '[' + proc_comm(pid) + ']'}"


def proc_comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def proc_cgroup(pid: int) -> str | None:
    """The cgroup v2 path of a pid ("0::/path" line)."""
    try:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        return None
    return None


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def netns_list() -> set[str]:
    r = sh(["ip", "netns", "list"], check=False)
    return {line.split()[0] for line in r.stdout.splitlines() if line.strip()}


def netns_pids(name: str) -> list[int]:
    r = sh(["ip", "netns", "pids", name], check=False)
    return [int(x) for x in r.stdout.split() if x.isdigit()]


def nft_tables(netns: str | None = None) -> set[str]:
    """``{"inet foo", ...}`` in the root netns (None) or the named one."""
    argv = ["nft", "list", "tables"]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    r = sh(argv, check=False)
    return {line[len("table "):].strip() for line in r.stdout.splitlines() if line.startswith("table ")}


def links(netns: str) -> list[dict]:
    """``ip -d -j link`` of a netns: [{"ifname", "kind", ...}] (kind None for plain links)."""
    r = sh(["ip", "-n", netns, "-d", "-j", "link", "show"], check=False)
    out = []
    for link in json.loads(r.stdout or "[]"):
        out.append({"ifname": link.get("ifname"), "kind": (link.get("linkinfo") or {}).get("info_kind"),
                    "flags": link.get("flags", []), "mtu": link.get("mtu")})
    return out


def read_line(fd: int, deadline: float, buf: bytearray) -> bytes | None:
    """Read from a raw pipe fd until a newline or the deadline; returns the line or None."""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return None
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line


# --------------------------------------------------------------------------------------------
# cgroups (v2 only; optional)


def _cgroup2_mount() -> Path | None:
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            pre, _, post = line.partition(" - ")
            if post.split()[0] == "cgroup2":
                return Path(pre.split()[4])
    except (OSError, IndexError):
        return None
    return None


def cgroup_pids(cg: Path | None) -> list[int]:
    """Every pid in a cgroup subtree."""
    if cg is None or not cg.exists():
        return []
    pids: list[int] = []
    for dirpath, _dirs, _files in os.walk(cg):
        try:
            pids += [int(x) for x in Path(dirpath, "cgroup.procs").read_text().split()]
        except OSError:
            pass
    return pids


def cgroup_kill(cg: Path | None, *, wait: float = 5.0) -> list[int]:
    """SIGKILL every process in a cgroup subtree; wait until empty. Returns pids still there."""
    if cg is None or not cg.exists():
        return []
    deadline = time.monotonic() + wait
    while True:
        pids = cgroup_pids(cg)
        if not pids or time.monotonic() > deadline:
            return pids
        try:
            (cg / "cgroup.kill").write_text("1")
        except OSError:
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


def cgroup_remove(cg: Path | None) -> None:
    if cg is None or not cg.exists():
        return
    cgroup_kill(cg)
    for dirpath, dirs, _files in sorted(os.walk(cg), key=lambda t: -len(t[0])):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


# --------------------------------------------------------------------------------------------
# servers


class ServerProcess:
    """A servers.py process in a netns; ``ports`` holds the real ports after it signalled ready."""

    def __init__(self, world: World, netns: str, bind: str, ports: dict[str, int], body: bytes | None):
        self.netns = netns
        self.bind = bind
        argv = ["ip", "netns", "exec", netns, world.python, str(HERE / "servers.py"), "--bind", bind]
        for name, port in ports.items():
            argv += [f"--{name}", str(port)]
        if body is not None:
            argv += ["--body", body.decode()]
        self.argv = argv
        self.proc = subprocess.Popen(world.wrap(argv, world.new_cgroup("servers")), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        buf = bytearray()
        line = read_line(self.proc.stdout.fileno(), time.monotonic() + 20, buf)
        if not line:
            if self.proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
            try:
                _out, err = self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                err = b""
            self.stop()
            raise WorldError(f"servers did not signal ready (exit {self.proc.returncode}): {' '.join(argv)}\n"
                             f"{err.decode(errors='replace')}")
        info = json.loads(line)
        self.ports: dict[str, int] = info["ports"]
        self.pid: int = info["pid"]

    @property
    def port(self) -> int:
        """The port, when the process serves exactly one service."""
        (port,) = self.ports.values()
        return port

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                with contextlib.suppress(OSError):
                    f.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# the world


class World:
    """Build with ``with World() as w:``; see the module docstring for the topology."""

    def __init__(self, python: str | None = None):
        self.id = secrets.token_hex(4)
        self.host_ns = f"tether-host-{self.id}"
        self.world_ns = f"tether-world-{self.id}"
        self.host_addr = HOST_ADDR
        self.world_addr = WORLD_ADDR
        self.world_addr2 = WORLD_ADDR2
        self.ports = dict(PORTS)
        self.python = python or (str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable)
        self.cgroup: Path | None = None
        self.servers: list[ServerProcess] = []
        self._netns: list[str] = []
        self._marker: Path | None = None
        self._cg_counter = 0
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> World:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def build(self) -> None:
        reap_stale()
        self._write_marker()
        self._setup_cgroup()
        for ns in (self.host_ns, self.world_ns):
            sh(["ip", "netns", "add", ns])
            self._netns.append(ns)
        h, w = self.host_ns, self.world_ns
        for argv in (
            ["ip", "-n", h, "link", "set", "lo", "up"],
            ["ip", "-n", w, "link", "set", "lo", "up"],
            ["ip", "-n", h, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", w],
            ["ip", "-n", h, "addr", "add", f"{HOST_ADDR}/24", "dev", "eth0"],
            ["ip", "-n", w, "addr", "add", f"{WORLD_VETH_ADDR}/24", "dev", "eth0"],
            ["ip", "-n", w, "addr", "add", f"{WORLD_ADDR}/32", "dev", "lo"],
            ["ip", "-n", w, "addr", "add", f"{WORLD_ADDR2}/32", "dev", "lo"],
            ["ip", "-n", h, "link", "set", "eth0", "up"],
            ["ip", "-n", w, "link", "set", "eth0", "up"],
            *(["ip", "-n", h, "route", "add", prefix, "via", WORLD_VETH_ADDR] for prefix in WORLD_PREFIXES),
        ):
            sh(argv)
        self.servers.append(ServerProcess(self, w, "0.0.0.0", self.ports, None))
        self._self_check()

    def _self_check(self) -> None:
        """The host netns reaches the world's HTTP server on both addresses."""
        for addr in (WORLD_ADDR, WORLD_ADDR2):
            r = sh(["ip", "netns", "exec", self.host_ns, "curl", "-sS", "--noproxy", "*", "--max-time", "10",
                    f"http://{addr}:{self.ports['http']}/"], check=False)
            if r.returncode != 0 or r.stdout.encode() != servers.WORLD_BODY:
                raise WorldError(f"world self-check failed for {addr}: rc={r.returncode} {r.stderr.strip()}")

    def close(self) -> None:
        """Remove everything; tolerant of partial setup and of being called twice."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for srv in self.servers:
            try:
                srv.stop()
            except Exception as e:  # noqa: BLE001 (teardown must go on)
                errors.append(f"stop server: {e}")
        try:
            cgroup_remove(self.cgroup)
        except Exception as e:  # noqa: BLE001
            errors.append(f"cgroup: {e}")
        for ns in reversed(self._netns):
            errors += _delete_netns(ns)
        if self._marker:
            with contextlib.suppress(OSError):
                self._marker.unlink()
        if errors:
            raise WorldError("world teardown: " + "; ".join(errors))

    # -- bookkeeping ------------------------------------------------------------------------

    def _write_marker(self) -> None:
        MARKER_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._marker = MARKER_DIR / f"{self.id}.json"
        pid = os.getpid()
        self._marker.write_text(json.dumps({"pid": pid, "start": proc_start_time(pid),
                                            "netns": [self.host_ns, self.world_ns],
                                            "cgroup": None}))

    def _setup_cgroup(self) -> None:
        mnt = _cgroup2_mount()
        if mnt is None:
            return
        own = (proc_cgroup(os.getpid()) or "/").lstrip("/")
        cg = mnt / own / f"{CGROUP_PREFIX}{self.id}"
        try:
            cg.mkdir()
        except OSError:
            return
        self.cgroup = cg
        # Check that moving a process in works here (a v2 "no internal processes" rule or a
        # read-only cgroupfs would make the wrapper fail).
        probe = self.new_cgroup("probe")
        r = subprocess.run(self.wrap(["/bin/true"], probe), capture_output=True)
        if r.returncode != 0:
            cgroup_remove(cg)
            self.cgroup = None
            return
        if self._marker:
            data = json.loads(self._marker.read_text())
            data["cgroup"] = str(cg)
            self._marker.write_text(json.dumps(data))

    def new_cgroup(self, name: str) -> Path | None:
        """A fresh child cgroup of this world's (None when cgroups are unavailable)."""
        if self.cgroup is None:
            return None
        self._cg_counter += 1
        cg = self.cgroup / f"{self._cg_counter:04d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:60]}"
        cg.mkdir()
        return cg

    @staticmethod
    def wrap(argv: list[str], cgroup: Path | None) -> list[str]:
        """Prefix argv so the process joins ``cgroup`` before exec (same pid, nothing in between)."""
        if cgroup is None:
            return list(argv)
        return ["/bin/sh", "-c", 'echo $$ > "$0" || exit 125; exec "$@"', str(cgroup / "cgroup.procs"), *argv]

    # -- helpers for tests --------------------------------------------------------------------

    def in_host(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        """Run a command as root in the host netns (not sandboxed)."""
        return sh(["ip", "netns", "exec", self.host_ns, *argv], check=False, **kw)

    def in_world(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return sh(["ip", "netns", "exec", self.world_ns, *argv], check=False, **kw)

    def host_server(self, *, bind: str = "127.0.0.1", body: bytes = servers.HOST_BODY,
                    **ports: int) -> ServerProcess:
        """Start servers.py in the *host* netns (default: HTTP on 127.0.0.1, free port).

        Use as a context manager or call ``.stop()``; the world's teardown kills it anyway.
        """
        if not ports:
            ports = {"http": 0}
        srv = ServerProcess(self, self.host_ns, bind, ports, body)
        self.servers.append(srv)
        return srv

    def nft_tables_host(self) -> set[str]:
        return nft_tables(self.host_ns)

    def host_links(self) -> list[dict]:
        return links(self.host_ns)

    def __repr__(self) -> str:
        return f"<World {self.id} host={self.host_ns} world={self.world_ns} cgroup={self.cgroup}>"


def _delete_netns(ns: str) -> list[str]:
    errors = []
    if ns not in netns_list():
        return errors
    for _ in range(50):
        pids = netns_pids(ns)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    r = sh(["ip", "netns", "del", ns], check=False)
    if r.returncode != 0:
        errors.append(f"ip netns del {ns}: {r.stderr.strip()}")
    return errors


def reap_stale() -> list[str]:
    """Remove worlds whose creating process is gone (left by a killed pytest). Returns their ids."""
    reaped = []
    if not MARKER_DIR.is_dir():
        return reaped
    for marker in MARKER_DIR.glob("*.json"):
        try:
            data = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        pid, start = data.get("pid"), data.get("start")
        if isinstance(pid, int) and proc_start_time(pid) == start and start is not None:
            continue  # owner alive
        if data.get("cgroup"):
            with contextlib.suppress(Exception):
                cgroup_remove(Path(data["cgroup"]))
        for ns in data.get("netns", []):
            if NAME_RE.match(ns):
                _delete_netns(ns)
        with contextlib.suppress(OSError):
            marker.unlink()
        reaped.append(marker.stem)
    return reaped


# --------------------------------------------------------------------------------------------
# clients that run *inside* the sandbox with /usr/bin/python3 -c CODE ARGS...
# Each prints one JSON document on its last stdout line.

PROBE_CONNECT = r"""
import errno, json, socket, sys
out = []
for target in sys.argv[1:]:
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    r = {"target": target}
    try:
        s.connect((host, int(port)))
        r.update(ok=True, errno=None)
    except socket.timeout as e:
        r.update(ok=False, errno="TIMEOUT", error=str(e))
    except OSError as e:
        r.update(ok=False, errno=errno.errorcode.get(e.errno, str(e.errno)), error=str(e))
    finally:
        s.close()
    out.append(r)
print(json.dumps(out))
"""

HTTP_GET = r"""
import json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=10)
s.sendall(b"GET / HTTP/1.0\r\nHost: " + host.encode() + b"\r\n\r\n")
data = b""
while True:
    d = s.recv(65536)
    if not d:
        break
    data += d
s.close()
head, _, body = data.partition(b"\r\n\r\n")
print(json.dumps({"status": head.split(b"\r\n")[0].decode(), "body": body.decode(errors="replace"),
                  "sent": len(b"GET / HTTP/1.0\r\nHost: " + host.encode() + b"\r\n\r\n"), "received": len(data)}))
"""

UPLOAD = r"""
import json, random, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
block = memoryview(random.Random(@SEED@).randbytes(@BLOCK@))
t0 = time.monotonic()
s = socket.create_connection((host, port), timeout=60)
sent = 0
while sent < n:
    k = min(len(block), n - sent)
    s.sendall(block[:k])
    sent += k
s.shutdown(socket.SHUT_WR)
reply = b""
while True:
    d = s.recv(4096)
    if not d:
        break
    reply += d
s.close()
print(json.dumps({"sent": sent, "reply": reply.decode(errors="replace").strip(), "seconds": time.monotonic() - t0}))
""".replace("@SEED@", str(servers.PATTERN_SEED)).replace("@BLOCK@", str(servers.PATTERN_BLOCK_SIZE))

DOWNLOAD = r"""
import hashlib, json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0 = time.monotonic()
s = socket.create_connection((host, port), timeout=60)
s.sendall(b"%d\n" % n)
h = hashlib.sha256()
buf = bytearray(1 << 20)
view = memoryview(buf)
got = 0
while True:
    k = s.recv_into(buf)
    if not k:
        break
    h.update(view[:k])
    got += k
s.close()
print(json.dumps({"received": got, "sha256": h.hexdigest(), "seconds": time.monotonic() - t0}))
"""

HALF_CLOSE = r"""
import json, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port), timeout=20)
s.sendall(b"x" * n)
s.shutdown(socket.SHUT_WR)
reply = b""
while True:
    d = s.recv(4096)
    if not d:
        break
    reply += d
# After the server closed, our write side is shut, the read side saw EOF: nothing more comes.
s.close()
print(json.dumps({"reply": reply.decode(errors="replace")}))
"""

MANY_ECHO = r"""
import errno, json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0 = time.monotonic()
socks, errors = [], []
for i in range(n):
    try:
        socks.append((i, socket.create_connection((host, port), timeout=30)))
    except OSError as e:
        errors.append("connect %d: %s" % (i, e))
open_at_once = len(socks)
for i, s in socks:
    try:
        s.sendall(b"tether-echo-%05d\n" % i)
    except OSError as e:
        errors.append("send %d: %s" % (i, e))
ok = 0
for i, s in socks:
    want = b"tether-echo-%05d\n" % i
    got = b""
    try:
        while len(got) < len(want):
            d = s.recv(len(want) - len(got))
            if not d:
                break
            got += d
    except OSError as e:
        errors.append("recv %d: %s" % (i, e))
    if got == want:
        ok += 1
    else:
        errors.append("conn %d: got %r" % (i, got))
for i, s in socks:
    s.close()
print(json.dumps({"ok": ok, "open_at_once": open_at_once, "errors": errors[:20], "n_errors": len(errors),
                  "seconds": time.monotonic() - t0}))
"""

LIST_FDS = r"""
import json, os
names = os.listdir("/proc/self/fd")
fds = {}
for name in names:
    fd = int(name)
    try:
        os.fstat(fd)  # the directory fd listdir used is closed again by now: EBADF
    except OSError:
        continue
    try:
        fds[fd] = os.readlink("/proc/self/fd/%d" % fd)
    except OSError as e:
        fds[fd] = "? %s" % e
print(json.dumps({str(k): v for k, v in sorted(fds.items())}))
"""

INSIDE_VIEW = r"""
import json, os, subprocess
def ipj(*args):
    r = subprocess.run(["/usr/sbin/ip", "-j", *args], capture_output=True, text=True)
    return json.loads(r.stdout or "null") if r.returncode == 0 else {"error": r.stderr}
try:
    resolv = open("/etc/resolv.conf").read()
except OSError as e:
    resolv = "ERROR %s" % e
print(json.dumps({
    "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "pid": os.getpid(),
    "sys_class_net": sorted(os.listdir("/sys/class/net")),
    "links": ipj("link", "show"),
    "addrs": ipj("addr", "show"),
    "routes": ipj("route", "show"),
    "resolv": resolv,
}))
"""


# --------------------------------------------------------------------------------------------
# audit events

EVENT_KEYS = ("ts", "sandbox", "event", "proto", "src", "dst", "rule", "verdict",
              "bytes_up", "bytes_down", "duration_ms")


def check_event(ev: dict) -> None:
    """Every event carries the contract's keys with sane types."""
    missing = [k for k in EVENT_KEYS if k not in ev]
    assert not missing, f"audit event lacks {missing}: {ev}"
    assert ev["event"] in ("connect", "deny", "close", "error"), ev
    assert ev["verdict"] in ("allow", "deny"), ev
    assert isinstance(ev["sandbox"], str) and ev["sandbox"], ev
    assert isinstance(ev["rule"], str) and ev["rule"], ev
    for k in ("src", "dst"):
        assert isinstance(ev[k], str) and re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[0-9.]+):\d+", ev[k]), (k, ev)
    for k in ("bytes_up", "bytes_down", "duration_ms"):
        assert isinstance(ev[k], (int, float)) and not isinstance(ev[k], bool) and ev[k] >= 0, (k, ev)


def select_events(events: list[dict], **match) -> list[dict]:
    return [ev for ev in events if all(ev.get(k) == v for k, v in match.items())]


# --------------------------------------------------------------------------------------------
# assertions shared by the scenario tests


def probe(tether, targets, opts=()):
    """Connect to each "addr:port" from inside the sandbox: {target: {"ok", "errno", ...}}."""
    res, r = tether.python_json(PROBE_CONNECT, *targets, opts=opts)
    return {x["target"]: x for x in res}, r


def assert_refused(result: dict, r):
    assert not result["ok"] and result["errno"] == "ECONNREFUSED", \
        f"{result['target']}: expected ECONNREFUSED, got {result}\n{describe(r)}"


def assert_connected(result: dict, r):
    assert result["ok"], f"{result['target']}: expected a connection, got {result}\n{describe(r)}"


def one_deny(events, dst, rule=None):
    """Exactly one deny event for dst (naming ``rule`` if given) and no connect event."""
    for ev in events:
        check_event(ev)
    denies = select_events(events, event="deny", dst=dst)
    assert len(denies) == 1, f"want one deny event for {dst}, got {denies}\nall events: {events}"
    ev = denies[0]
    assert ev["verdict"] == "deny" and ev["proto"] == "tcp", ev
    if rule is not None:
        assert ev["rule"] == rule, f"deny event for {dst} names rule {ev['rule']!r}, want {rule!r}: {ev}"
    assert ev["src"].startswith(SANDBOX_ADDR + ":"), ev
    assert not select_events(events, event="connect", dst=dst), f"a denied {dst} was also connected: {events}"
    return ev
