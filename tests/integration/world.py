"""The integration test world of DESIGN.md ("Testing topology").

    root netns (untouched)

    tether-host-<id>                          tether-world-<id>
    ┌────────────────────────────────────┐ veth ┌─────────────────────────────────────────────┐
    │ lo up                              │      │ lo up, owning (/32 and /128):               │
    │ eth0 192.0.2.1/24 ─────────────────┼──────┼─ eth0 192.0.2.2/24                          │
    │      2001:db8:1::1/64              │      │      2001:db8:1::2/64                       │
    │ 203.0.113.0/24   via 192.0.2.2     │      │   203.0.113.10 .11 .12 .66                  │
    │ 198.51.100.0/24  via 192.0.2.2     │      │   198.51.100.10 .53 (dns) .99 (rogue dns)   │
    │ 2001:db8:10::/64 via 2001:db8:1::2 │      │   2001:db8:10::10 ::11 ::12 ::20 ::66       │
    │ (no default route, v4 or v6)       │      │   2001:db8:10::53 (dns) ::99 (rogue dns)    │
    │ ping_group_range "0 2147483647"    │      │ servers.py, dual-stack, every address:      │
    │ tether run ... (host side)         │      │   tcp  http :80  echo :7  sink :9000        │
    └────────────────────────────────────┘      │        source :9001  halfclose :9002        │
                                                │   udp  echo :7  sink :9100 (stats tcp :9101)│
                                                │ dns   udp+tcp :53 on .53 / ::53: test zones │
                                                │ rogue udp+tcp :53 on .99 / ::99             │
                                                └─────────────────────────────────────────────┘

The veth's IPv6 addresses skip duplicate address detection (nodad) and both ends know each other's MAC
(static neighbours), so IPv6 works at once, without the ~1 s loss of the first packets that
neighbour discovery right after setup causes.

Nothing here can reach a real network: both namespaces are new, the host netns has routes only
to documentation prefixes that live in the world netns, and the world has no other link.

Every address the world owns runs every main service (HTTP, TCP/UDP echo, ...) and answers
pings (the kernel does; the world's ICMP rate limits are off, so port-unreachable errors come
back every time too). The DNS zones (see ``servers.AUTH_ZONES``):

    example.test            A 203.0.113.10, AAAA 2001:db8:10::10
    www.example.test        CNAME example.test
    deep.example.test       CNAME www.example.test (two-step chain)
    multi.example.test      A 203.0.113.10 .11 .12, AAAA 2001:db8:10::10 ::11 ::12
    ads.example.test        A 203.0.113.66, AAAA 2001:db8:10::66
    private.example.test    A 10.1.2.3 (a private address: denied by tether)
    short.example.test      A 203.0.113.10, AAAA 2001:db8:10::10, TTL 2
    big.example.test        24 TXT, ~2 KB (> 512 and > 1232 B: TC over UDP, then TCP)
    huge.example.test       80 TXT, ~10 KB (> 4096 B: TC over UDP at any usual EDNS size)
    other.test              A 198.51.100.10, AAAA 2001:db8:10::20
    cname-to-denied.other.test  CNAME ads.example.test
    anything else           NXDOMAIN with an SOA, negative TTL 5 (NODATA likewise)

Every other TTL is 60. The rogue server answers any A with 198.51.100.10, any AAAA with
2001:db8:10::20. Both count their queries: ``World.dns_queries(name)``.

Every process the world starts (servers, and the tether runs of the fixtures via ``wrap()``) is
placed in a cgroup v2 under ``tether-it-<id>`` when cgroup2 is available, so teardown and the leak
checks see every descendant, even re-parented or in other pid namespaces, and can kill them all.
The servers' control sockets live in ``/run/tether-it/<id>/`` (0700).

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
import shutil
import socket
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
MULTI_ADDRS = ("203.0.113.10", "203.0.113.11", "203.0.113.12")  # multi.example.test
ADS_ADDR = "203.0.113.66"  # ads.example.test
DNS_ADDR = "198.51.100.53"  # the authoritative DNS server of the test zones
ROGUE_DNS_ADDR = "198.51.100.99"  # a DNS server the sandbox must never reach
PRIVATE_ADDR = "10.1.2.3"  # private.example.test (only in DNS: nothing owns it)
WORLD_PREFIXES = ("203.0.113.0/24", "198.51.100.0/24")

HOST_ADDR6 = "2001:db8:1::1"
WORLD_VETH_ADDR6 = "2001:db8:1::2"
WORLD_ADDR6 = "2001:db8:10::10"  # example.test's AAAA; same servers as WORLD_ADDR
WORLD_ADDR2_6 = "2001:db8:10::20"  # other.test's AAAA
MULTI_ADDRS6 = ("2001:db8:10::10", "2001:db8:10::11", "2001:db8:10::12")
ADS_ADDR6 = "2001:db8:10::66"
DNS_ADDR6 = "2001:db8:10::53"
ROGUE_DNS_ADDR6 = "2001:db8:10::99"
WORLD_PREFIXES6 = ("2001:db8:10::/64",)
HOST_MAC = "02:00:00:00:00:01"  # the veth ends (locally administered addresses)
WORLD_MAC = "02:00:00:00:00:02"

# Every address the world owns (on its lo); each one runs every main service and answers pings.
WORLD_ADDRS = (WORLD_ADDR, *MULTI_ADDRS[1:], ADS_ADDR, WORLD_ADDR2, DNS_ADDR, ROGUE_DNS_ADDR)
WORLD_ADDRS6 = (WORLD_ADDR6, *MULTI_ADDRS6[1:], WORLD_ADDR2_6, ADS_ADDR6, DNS_ADDR6, ROGUE_DNS_ADDR6)

# TCP: http echo sink source halfclose udpstats dns; UDP: udpecho udpsink dns.
PORTS = {"http": 80, "echo": 7, "sink": 9000, "source": 9001, "halfclose": 9002,
         "udpecho": 7, "udpsink": 9100, "udpstats": 9101, "dns": 53}
MAIN_SERVICES = ("http", "echo", "sink", "source", "halfclose", "udpecho")
SINK_SERVICES = ("udpsink", "udpstats")

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
    """A servers.py process in a netns; ``ports`` holds the real ports after it signalled ready.

    ``bind`` is one address or a list (every service on each). ``wait=False`` only starts the
    process: call ``wait_ready()`` later (the world starts its servers in parallel that way).
    """

    def __init__(self, world: World, netns: str, bind: str | list[str], ports: dict[str, int],
                 body: bytes | None, *, zone: str | None = None, control: Path | None = None,
                 name: str = "servers", wait: bool = True):
        self.netns = netns
        self.bind = bind
        self.control = control
        self.ports: dict[str, int] = {}
        self.pid: int | None = None
        argv = ["ip", "netns", "exec", netns, world.python, str(HERE / "servers.py")]
        for addr in [bind] if isinstance(bind, str) else bind:
            argv += ["--bind", addr]
        for service, port in ports.items():
            argv += [f"--{service}", str(port)]
        if body is not None:
            argv += ["--body", body.decode()]
        if zone is not None:
            argv += ["--zone", zone]
        if control is not None:
            argv += ["--control", str(control)]
        self.argv = argv
        self.proc = subprocess.Popen(world.wrap(argv, world.new_cgroup(name)), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 20) -> ServerProcess:
        if self.pid is not None:
            return self
        buf = bytearray()
        line = read_line(self.proc.stdout.fileno(), time.monotonic() + timeout, buf)
        if not line:
            if self.proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
            try:
                _out, err = self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                err = b""
            self.stop()
            raise WorldError(f"servers did not signal ready (exit {self.proc.returncode}): {' '.join(self.argv)}\n"
                             f"{(err or b'').decode(errors='replace')}")
        info = json.loads(line)
        self.ports = info["ports"]
        self.pid = info["pid"]
        return self

    def request(self, cmd: dict, timeout: float = 20) -> dict:
        """One command on the control socket (``{"cmd": "stats"}``, ``{"cmd": "reset"}``)."""
        if self.control is None:
            raise WorldError(f"server has no control socket: {' '.join(self.argv)}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.control))
            s.sendall(json.dumps(cmd).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                d = s.recv(1 << 20)
                if not d:
                    break
                data += d
        reply = json.loads(data)
        if "error" in reply:
            raise WorldError(f"control {cmd}: {reply['error']}")
        return reply

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
    """Build with ``with World() as w:``; see the module docstring for the topology.

    Addresses (also module constants): ``host_addr``/``host_addr6``, ``world_addr``/``world_addr6``
    (example.test), ``world_addr2``/``world_addr2_6`` (other.test), ``multi_addrs``/``multi_addrs6``,
    ``ads_addr``/``ads_addr6``, ``private_addr`` (DNS only), ``dns_addr``/``dns_addr6``,
    ``rogue_dns_addr``/``rogue_dns_addr6``, ``world_addrs``/``world_addrs6`` (all owned ones);
    ``ports`` (``PORTS``). Servers: ``main_server``, ``sink_server``, ``dns_server``,
    ``rogue_dns_server`` (``ServerProcess``). Counters: ``dns_queries()``, ``dns_counts()``,
    ``dns_log()``, ``reset_dns_counters()``, ``udp_sink_stats()``, ``reset_udp_sink()``.
    Running things: ``in_host()``, ``in_world()``, ``host_json()``, ``host_server()``.
    """

    def __init__(self, python: str | None = None):
        self.id = secrets.token_hex(4)
        self.host_ns = f"tether-host-{self.id}"
        self.world_ns = f"tether-world-{self.id}"
        self.host_addr = HOST_ADDR
        self.host_addr6 = HOST_ADDR6
        self.world_addr = WORLD_ADDR
        self.world_addr2 = WORLD_ADDR2
        self.world_addr6 = WORLD_ADDR6
        self.world_addr2_6 = WORLD_ADDR2_6
        self.world_addrs = WORLD_ADDRS
        self.world_addrs6 = WORLD_ADDRS6
        self.multi_addrs = MULTI_ADDRS
        self.multi_addrs6 = MULTI_ADDRS6
        self.ads_addr = ADS_ADDR
        self.ads_addr6 = ADS_ADDR6
        self.private_addr = PRIVATE_ADDR
        self.dns_addr = DNS_ADDR
        self.dns_addr6 = DNS_ADDR6
        self.rogue_dns_addr = ROGUE_DNS_ADDR
        self.rogue_dns_addr6 = ROGUE_DNS_ADDR6
        self.ports = dict(PORTS)
        self.python = python or (str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable)
        self.cgroup: Path | None = None
        self.servers: list[ServerProcess] = []
        self.main_server: ServerProcess | None = None  # http, echo, ..., udpecho on every address
        self.sink_server: ServerProcess | None = None  # udpsink + udpstats on every address
        self.dns_server: ServerProcess | None = None  # the test zones on DNS_ADDR(6)
        self.rogue_dns_server: ServerProcess | None = None  # on ROGUE_DNS_ADDR(6)
        self.run_dir: Path | None = None  # /run/tether-it/<id>: the servers' control sockets
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
        self.run_dir = MARKER_DIR / self.id
        self.run_dir.mkdir(mode=0o700)
        self._setup_cgroup()
        for ns in (self.host_ns, self.world_ns):
            sh(["ip", "netns", "add", ns])
            self._netns.append(ns)
        self._build_network()
        self._start_servers()
        self._self_check()
        self.reset_dns_counters()

    def _build_network(self) -> None:
        h, w = self.host_ns, self.world_ns
        sh(["ip", "-n", h, "link", "add", "eth0", "address", HOST_MAC, "type", "veth",
            "peer", "name", "eth0", "address", WORLD_MAC, "netns", w])
        host = [
            "link set lo up",
            f"addr add {HOST_ADDR}/24 dev eth0",
            f"addr add {HOST_ADDR6}/64 dev eth0 nodad",
            "link set eth0 up",
            *(f"route add {prefix} via {WORLD_VETH_ADDR}" for prefix in WORLD_PREFIXES),
            *(f"route add {prefix} via {WORLD_VETH_ADDR6}" for prefix in WORLD_PREFIXES6),
            # Static neighbours: no neighbour discovery right after setup, when the world's
            # solicited-node multicast group may not be joined yet (the first IPv6 packets would
            # wait ~1 s for a second solicitation).
            f"neigh replace {WORLD_VETH_ADDR6} lladdr {WORLD_MAC} dev eth0 nud permanent",
        ]
        world = [
            "link set lo up",
            f"addr add {WORLD_VETH_ADDR}/24 dev eth0",
            f"addr add {WORLD_VETH_ADDR6}/64 dev eth0 nodad",
            *(f"addr add {addr}/32 dev lo" for addr in WORLD_ADDRS),
            *(f"addr add {addr}/128 dev lo" for addr in WORLD_ADDRS6),
            "link set eth0 up",
            f"neigh replace {HOST_ADDR6} lladdr {HOST_MAC} dev eth0 nud permanent",
        ]
        sh(["ip", "-n", h, "-batch", "-"], input="\n".join(host) + "\n")
        sh(["ip", "-n", w, "-batch", "-"], input="\n".join(world) + "\n")
        # Unprivileged ICMP echo sockets for everyone in the host netns (tether's rootless engine).
        self.sysctl(h, "net.ipv4.ping_group_range", "0 2147483647")
        # The world answers every ping, and its ICMP errors (port unreachable) are not rate limited.
        self.sysctl(w, "net.ipv4.icmp_echo_ignore_all", "0")
        self.sysctl(w, "net.ipv6.icmp.echo_ignore_all", "0")
        for key, value in (("net.ipv4.icmp_ratelimit", "0"), ("net.ipv4.icmp_ratemask", "0"),
                           ("net.ipv6.icmp.ratelimit", "0"), ("net.ipv6.icmp.ratemask", ""),
                           ("net.ipv4.icmp_msgs_per_sec", "1000000")):
            self.sysctl(w, key, value, check=False)  # best effort: older kernels lack some

    @staticmethod
    def sysctl(netns: str, key: str, value: str, *, check: bool = True) -> None:
        """Set a per-netns sysctl (written to /proc/sys from inside the netns)."""
        path = "/proc/sys/" + key.replace(".", "/")
        sh(["ip", "netns", "exec", netns, "sh", "-c", 'printf "%s\\n" "$1" > "$0"', path, value], check=check)

    def _start_servers(self) -> None:
        w = self.world_ns
        both = [DNS_ADDR, DNS_ADDR6]
        rogue = [ROGUE_DNS_ADDR, ROGUE_DNS_ADDR6]
        for attr, kw in (
            ("main_server", dict(bind="::", ports={k: self.ports[k] for k in MAIN_SERVICES}, name="servers")),
            ("sink_server", dict(bind="::", ports={k: self.ports[k] for k in SINK_SERVICES}, name="udpsink",
                                 control=self.run_dir / "udpsink.sock")),
            ("dns_server", dict(bind=both, ports={"dns": self.ports["dns"]}, zone="auth", name="dns",
                                control=self.run_dir / "dns.sock")),
            ("rogue_dns_server", dict(bind=rogue, ports={"dns": self.ports["dns"]}, zone="rogue",
                                      name="rogue-dns", control=self.run_dir / "rogue-dns.sock")),
        ):
            srv = ServerProcess(self, w, body=None, wait=False, **kw)
            self.servers.append(srv)
            setattr(self, attr, srv)
        for srv in self.servers:
            srv.wait_ready()

    def _self_check(self) -> None:
        """From the host netns: HTTP on WORLD_ADDR, WORLD_ADDR2 and WORLD_ADDR6, UDP echo and ping
        on v4 and v6, a UDP query to each DNS server on each family; then the control sockets."""
        r = self.in_host([SANDBOX_PYTHON, "-c", SELF_CHECK, json.dumps({
            "http": [[a, self.ports["http"]] for a in (WORLD_ADDR, WORLD_ADDR2, WORLD_ADDR6)],
            "body": servers.WORLD_BODY.decode(),
            "udpecho": [[a, self.ports["udpecho"]] for a in (WORLD_ADDR, WORLD_ADDR6)],
            "ping": [WORLD_ADDR, WORLD_ADDR6],
            "dns": [[a, self.ports["dns"]] for a in (DNS_ADDR, DNS_ADDR6, ROGUE_DNS_ADDR, ROGUE_DNS_ADDR6)],
        })], timeout=60)
        lines = r.stdout.strip().splitlines()
        if r.returncode != 0 or not lines or json.loads(lines[-1]) != {"ok": True}:
            raise WorldError(f"world self-check failed:\n{describe(r)}")
        for srv in (self.sink_server, self.dns_server, self.rogue_dns_server):
            srv.request({"cmd": "stats"})

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
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
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

    def host_json(self, code: str, *args, python: str = SANDBOX_PYTHON, prefix: list[str] = (),
                  timeout: float = 60):
        """Run ``python -c code args`` as root in the host netns (``prefix`` goes before python,
        e.g. a setpriv); require exit 0 and return the last stdout line parsed as JSON."""
        r = self.in_host([*prefix, python, "-c", code, *map(str, args)], timeout=timeout)
        lines = [line for line in r.stdout.splitlines() if line.strip()]
        if r.returncode != 0 or not lines:
            raise AssertionError(f"client failed in {self.host_ns}\n{describe(r)}")
        return json.loads(lines[-1])

    # -- DNS and UDP sink counters ----------------------------------------------------------

    def _dns(self, server: str) -> ServerProcess:
        srv = {"auth": self.dns_server, "rogue": self.rogue_dns_server}[server]
        if srv is None:
            raise WorldError("the world's DNS servers are not running")
        return srv

    def dns_counts(self, server: str = "auth") -> list[tuple[str, str, str, int]]:
        """Every query counter of a DNS server ("auth" or "rogue"): [(name, type, transport, n)];
        names lower case without the trailing dot, transport "udp"/"tcp"."""
        return [tuple(c) for c in self._dns(server).request({"cmd": "stats"})["dns"]["counts"]]

    def dns_queries(self, name: str, qtype: str | None = None, transport: str | None = None, *,
                    server: str = "auth") -> int:
        """How many queries for ``name`` (any case, trailing dot or not; only the name asked
        for, not the CNAME targets the answer went through) reached the server since the last
        reset, optionally only of ``qtype`` ("A", "AAAA", ...) or ``transport`` ("udp"/"tcp")."""
        want = servers.normalize_name(name)
        return sum(n for cname, ctype, ctrans, n in self.dns_counts(server)
                   if cname == want and qtype in (None, ctype) and transport in (None, ctrans))

    def dns_log(self, server: str = "auth") -> list[dict]:
        """The last 10,000 queries: [{"name", "type", "transport", "src", "t"}] (t: monotonic)."""
        return self._dns(server).request({"cmd": "stats"})["dns"]["log"]

    def reset_dns_counters(self, server: str | None = None) -> None:
        """Zero the counters and the log of one DNS server ("auth"/"rogue") or of both."""
        for name in ("auth", "rogue") if server is None else (server,):
            self._dns(name).request({"cmd": "reset"})

    def udp_sink_stats(self, settle: float = 0.2) -> dict:
        """The UDP sink's counters: ``{"senders": {"192.0.2.1:40000": {"datagrams", "bytes",
        "first", "last"}}, "datagrams", "bytes", "now"}`` (times: CLOCK_MONOTONIC of the world's
        clock, comparable with ``time.monotonic()`` here). Waits first until no datagram arrived
        for ``settle`` seconds (at most 10 s). The same is served on TCP ``ports["udpstats"]``."""
        return self.sink_server.request({"cmd": "stats", "settle": settle})["udpsink"]

    def reset_udp_sink(self) -> None:
        self.sink_server.request({"cmd": "reset"})

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
        shutil.rmtree(MARKER_DIR / marker.stem, ignore_errors=True)  # control sockets
        with contextlib.suppress(OSError):
            marker.unlink()
        reaped.append(marker.stem)
    for d in MARKER_DIR.iterdir():  # a run dir whose marker is gone (removed before the marker)
        if d.is_dir() and re.fullmatch(r"[0-9a-f]{8}", d.name) and not (MARKER_DIR / f"{d.name}.json").exists():
            shutil.rmtree(d, ignore_errors=True)
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


# --- stdlib DNS/UDP/ICMP clients (no dnspython in the sandbox's /usr/bin/python3) -------------

# A DNS client library in the standard library only: ``dns_query(server, name, qtype, ...)``
# returns a dict (see DNS_QUERY). Used by DNS_QUERY and by the world's self-check.
DNS_LIB = r"""
import ipaddress, os, random, socket, struct, time
TYPES = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28,
         "SRV": 33, "OPT": 41, "SVCB": 64, "HTTPS": 65, "ANY": 255}
TYPE_NAMES = {v: k for k, v in TYPES.items()}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}

def dns_build(name, qtype, qid, edns=None, rd=True):
    wire = struct.pack("!HHHHHH", qid, 0x0100 if rd else 0, 1, 0, 0, 1 if edns else 0)
    for label in name.rstrip(".").split(".") if name.strip(".") else []:
        raw = label.encode("idna") if not label.isascii() else label.encode()
        wire += bytes([len(raw)]) + raw
    wire += b"\0" + struct.pack("!HH", TYPES[qtype] if isinstance(qtype, str) else qtype, 1)
    if edns:
        wire += b"\0" + struct.pack("!HHIH", 41, edns, 0, 0)
    return wire

def dns_name(msg, off):
    labels, jumps, end = [], 0, None
    while True:
        n = msg[off]
        if n & 0xC0 == 0xC0:
            if end is None:
                end = off + 2
            off = ((n & 0x3F) << 8) | msg[off + 1]
            jumps += 1
            if jumps > 64:
                raise ValueError("compression loop")
            continue
        if n == 0:
            return (".".join(labels) + ".") if labels else ".", (end if end is not None else off + 1)
        labels.append(msg[off + 1:off + 1 + n].decode("ascii", "backslashreplace"))
        off += 1 + n

def dns_rdata(msg, off, rtype, rdlen):
    rd = msg[off:off + rdlen]
    if rtype == 1 or rtype == 28:
        return str(ipaddress.ip_address(rd))
    if rtype in (2, 5, 12):
        return dns_name(msg, off)[0]
    if rtype == 16:
        out, i = [], 0
        while i < len(rd):
            out.append(rd[i + 1:i + 1 + rd[i]].decode("utf-8", "backslashreplace"))
            i += 1 + rd[i]
        return "".join(out)
    if rtype == 6:
        mname, o = dns_name(msg, off)
        rname, o = dns_name(msg, o)
        return " ".join([mname, rname] + [str(x) for x in struct.unpack("!IIIII", msg[o:o + 20])])
    return rd.hex()

def dns_parse(msg):
    qid, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", msg[:12])
    off = 12
    for _ in range(qd):
        _, off = dns_name(msg, off)
        off += 4
    out = {"id": qid, "rcode": RCODES.get(flags & 15, str(flags & 15)),
           "flags": [f for f, bit in (("qr", 15), ("aa", 10), ("tc", 9), ("rd", 8), ("ra", 7), ("ad", 5), ("cd", 4))
                     if flags >> bit & 1],
           "answer": [], "authority": [], "additional": [], "edns": None, "ede": [], "size": len(msg)}
    for section, count in (("answer", an), ("authority", ns), ("additional", ar)):
        for _ in range(count):
            name, off = dns_name(msg, off)
            rtype, rclass, ttl, rdlen = struct.unpack("!HHIH", msg[off:off + 10])
            off += 10
            if rtype == 41:
                out["edns"] = rclass
                ext_rcode = ttl >> 24
                if ext_rcode:
                    out["rcode"] = str((ext_rcode << 4) | (flags & 15))
                o = off
                while o + 4 <= off + rdlen:
                    code, olen = struct.unpack("!HH", msg[o:o + 4])
                    if code == 15:
                        info = struct.unpack("!H", msg[o + 4:o + 6])[0]
                        out["ede"].append({"code": info, "text": msg[o + 6:o + 4 + olen].decode("utf-8", "replace")})
                    o += 4 + olen
            else:
                out[section].append({"name": name, "type": TYPE_NAMES.get(rtype, str(rtype)), "ttl": ttl,
                                     "data": dns_rdata(msg, off, rtype, rdlen)})
            off += rdlen
    return out

def _fam(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET

def dns_exchange(server, port, wire, transport, timeout):
    qid = wire[:2]
    if transport == "udp":
        with socket.socket(_fam(server), socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.connect((server, port))
            for _ in range(2):
                s.send(wire)
                deadline = time.monotonic() + timeout
                try:
                    while time.monotonic() < deadline:
                        msg = s.recv(65535)
                        if msg[:2] == qid:
                            return msg
                except socket.timeout:
                    continue
            raise socket.timeout("no answer over udp")
    with socket.create_connection((server, port), timeout=timeout) as s:
        s.sendall(struct.pack("!H", len(wire)) + wire)
        buf = b""
        while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
            d = s.recv(65536)
            if not d:
                raise ConnectionError("tcp connection closed after %d bytes" % len(buf))
            buf += d
        return buf[2:2 + struct.unpack("!H", buf[:2])[0]]

def dns_query(server, name, qtype="A", transport="auto", port=53, edns=None, timeout=3.0, rd=True):
    # transport "udp", "tcp" or "auto" (udp, then tcp when the answer has TC)
    import errno as _errno
    qid = random.randrange(65536)
    wire = dns_build(name, qtype, qid, edns, rd)
    res = {"server": server, "name": name, "qtype": qtype, "ok": False, "error": None}
    t0 = time.monotonic()
    try:
        msg = dns_exchange(server, port, wire, "tcp" if transport == "tcp" else "udp", timeout)
        used = "tcp" if transport == "tcp" else "udp"
        parsed = dns_parse(msg)
        if transport == "auto" and "tc" in parsed["flags"]:
            res["truncated_udp"] = True
            msg = dns_exchange(server, port, wire, "tcp", timeout)
            used, parsed = "tcp", dns_parse(msg)
        res.update(parsed, ok=True, transport=used, id_ok=parsed["id"] == qid)
    except socket.timeout as e:
        res.update(error="TIMEOUT: %s" % e)
    except OSError as e:
        res.update(error="%s: %s" % (_errno.errorcode.get(e.errno, e.errno), e))
    except (ValueError, IndexError, struct.error) as e:
        res.update(error="unparsable answer: %r" % e)
    res["rtt_ms"] = (time.monotonic() - t0) * 1000
    return res
"""

# DNS queries with the standard library. argv[1]: a JSON list of queries, each
# {"server", "name", "type": "A", "transport": "udp"|"tcp"|"auto", "port": 53, "edns": None|payload,
#  "timeout": 3}; prints a JSON list of results: {"ok", "error", "rcode": "NOERROR", "flags": ["qr",
# "aa", "tc", ...], "answer"/"authority"/"additional": [{"name" (as sent, trailing dot), "type",
# "ttl", "data"}], "edns": payload|None, "ede": [{"code", "text"}], "transport" (used),
# "truncated_udp" (auto saw TC), "id_ok", "size", "rtt_ms"}. data: A/AAAA text, names with a
# trailing dot, TXT strings concatenated, SOA "mname rname serial refresh retry expire minimum".
DNS_QUERY = DNS_LIB + r"""
import json, sys
out = []
for q in json.loads(sys.argv[1]):
    out.append(dns_query(q["server"], q["name"], q.get("type", "A"), q.get("transport", "auto"),
                         q.get("port", 53), q.get("edns"), q.get("timeout", 3.0), q.get("rd", True)))
print(json.dumps(out))
"""

# ICMP echo with unprivileged datagram sockets (the netns's ping_group_range must cover the
# caller's gid; root uses them too). argv: targets... , or one JSON object
# {"targets": [...], "count": 3, "size": 56, "timeout": 2}. Prints
# [{"target", "ok", "sent", "received", "rtt_ms" (list), "error"}].
PING_LIB = r"""
import errno, os, socket, struct, time

def ping(target, count=1, size=56, timeout=2.0):
    v6 = ":" in target
    res = {"target": target, "ok": False, "sent": 0, "received": 0, "rtt_ms": [], "error": None}
    try:
        s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM,
                          socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
    except OSError as e:
        res["error"] = "%s: %s" % (errno.errorcode.get(e.errno, e.errno), e)
        return res
    with s:
        s.settimeout(timeout)
        for seq in range(1, count + 1):
            payload = os.urandom(size)
            pkt = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, 0, seq) + payload
            t0 = time.monotonic()
            try:
                s.sendto(pkt, (target, 0))
                res["sent"] += 1
                while True:
                    data = s.recv(65535)
                    rtype, _code, _ck, _ident, rseq = struct.unpack("!BBHHH", data[:8])
                    if rtype == (129 if v6 else 0) and rseq == seq and data[8:] == payload:
                        res["received"] += 1
                        res["rtt_ms"].append((time.monotonic() - t0) * 1000)
                        break
            except socket.timeout:
                res["error"] = "TIMEOUT"
            except OSError as e:
                res["error"] = "%s: %s" % (errno.errorcode.get(e.errno, e.errno), e)
                break
    res["ok"] = res["sent"] == count and res["received"] == count
    return res
"""

PING = PING_LIB + r"""
import json, sys
if sys.argv[1].startswith("{"):
    opts = json.loads(sys.argv[1])
else:
    opts = {"targets": sys.argv[1:]}
print(json.dumps([ping(t, opts.get("count", 1), opts.get("size", 56), opts.get("timeout", 2.0))
                  for t in opts["targets"]]))
"""

# UDP echo integrity: argv host port size... ; for each size one datagram of a deterministic
# pattern through a *connected* socket (so a reply from another address than the one sent to would
# be dropped), up to 3 tries with 2 s timeout. Prints [{"size", "ok", "got", "tries", "rtt_ms", "error"}].
UDP_ECHO = r"""
import errno, json, random, socket, sys, time
host, port, sizes = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3:]]
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
s.settimeout(2)
out = []
try:
    s.connect((host, port))
except OSError as e:
    print(json.dumps([{"size": n, "ok": False, "error": "connect: %s" % e} for n in sizes]))
    sys.exit(0)
for i, n in enumerate(sizes):
    payload = random.Random(i * 7919 + n).randbytes(n)
    r = {"size": n, "ok": False, "got": None, "tries": 0, "rtt_ms": None, "error": None}
    for attempt in range(3):
        r["tries"] += 1
        t0 = time.monotonic()
        try:
            s.send(payload)
            while True:
                data = s.recv(65536)
                if data == payload:
                    r.update(ok=True, got=len(data), rtt_ms=(time.monotonic() - t0) * 1000, error=None)
                    break
                r.update(got=len(data), error="mismatch")
        except socket.timeout:
            r["error"] = "TIMEOUT"
            continue
        except OSError as e:
            r["error"] = "%s: %s" % (errno.errorcode.get(e.errno, e.errno), e)
            break
        break
    out.append(r)
print(json.dumps(out))
"""

# The world's self-check (see World._self_check); argv[1] is a JSON dict.
SELF_CHECK = DNS_LIB + PING_LIB + r"""
import json, sys
cfg = json.loads(sys.argv[1])
problems = []
for host, port in cfg["http"]:
    try:
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while True:
                d = s.recv(65536)
                if not d:
                    break
                data += d
        if not data.startswith(b"HTTP/1.0 200") or not data.endswith(cfg["body"].encode()):
            problems.append("http %s: %r" % (host, data[:200]))
    except OSError as e:
        problems.append("http %s: %s" % (host, e))
for host, port in cfg["udpecho"]:
    with socket.socket(_fam(host), socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        try:
            s.connect((host, port))
            s.send(b"self-check")
            if s.recv(100) != b"self-check":
                problems.append("udp echo %s: wrong reply" % host)
        except OSError as e:
            problems.append("udp echo %s: %s" % (host, e))
for host in cfg["ping"]:
    r = ping(host, timeout=5)
    if not r["ok"]:
        problems.append("ping %s: %s" % (host, r["error"]))
for host, port in cfg["dns"]:
    r = dns_query(host, "_selfcheck.example.test", "A", "udp", port, timeout=5)
    if not r["ok"] or not r["id_ok"] or "qr" not in r["flags"]:
        problems.append("dns %s: %s" % (host, r))
print(json.dumps({"ok": True} if not problems else {"ok": False, "problems": problems}))
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


# Connects to a server that first sends "peer ADDR PORT\n" and then echoes: sends SIZE bytes while
# reading the echo; prints {"peer", "me", "got", "intact"} (or {"error": NAME} if it cannot).
# argv: host port size.
PEER_ECHO_CLIENT = r"""
import hashlib, json, socket, sys, threading
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
try:
    s = socket.create_connection((host, port), timeout=20)
    f = s.makefile("rb")
    line = f.readline().decode().split()
except OSError as e:
    print(json.dumps({"error": type(e).__name__})); sys.exit(0)
if not line:
    print(json.dumps({"error": "closed"})); sys.exit(0)
block = bytes(range(256)) * 4096
def send():
    left = size
    while left:
        n = min(left, len(block)); s.sendall(block[:n]); left -= n
    s.shutdown(socket.SHUT_WR)
t = threading.Thread(target=send); t.start()
h, want, got = hashlib.sha256(), hashlib.sha256(), 0
left = size
while left:
    n = min(left, len(block)); want.update(block[:n]); left -= n
while True:
    chunk = f.read1(1 << 16)
    if not chunk:
        break
    h.update(chunk); got += len(chunk)
t.join()
print(json.dumps({"peer": line[1:], "me": [s.getsockname()[0], str(s.getsockname()[1])], "got": got,
                  "intact": h.digest() == want.digest()}))
"""
