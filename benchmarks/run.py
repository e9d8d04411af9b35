#!/usr/bin/env python3
"""Side-by-side network benchmark: tether vs slirp4netns, pasta and the rootful veth limit.

Builds a private test topology out of network namespaces (nothing here talks to a real network):

    netns tether-bench-host-<id>  --veth-->  netns tether-bench-world-<id>
      192.0.2.1/24, default via 192.0.2.2      192.0.2.2/24, servers on 203.0.113.10 (lo)
      sandboxing tools run here                 iperf3 -s, 1-byte TCP echo server

    netns tether-bench-veth-<id>  --veth-->  host netns (routed, ip_forward=1, no NAT)
      198.51.100.2/25, the "veth" contender (rootful limit)

and measures, for every contender in the same run: iperf3 TCP throughput both directions,
short-connection latency (connect + 1-byte echo + close), and start-up time.  Writes
benchmarks/results/<UTC>.json, latest.json, latest.png and the table in docs/benchmarks.md.

Must run as root (it creates namespaces).  Everything it creates is removed on exit, also on error
or SIGTERM/SIGINT.  See benchmarks/README.md and docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import atexit
import datetime as dt
import json
import math
import os
import platform
import pwd
import secrets
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
DOCS = REPO / "docs" / "benchmarks.md"

WORLD_IP = "203.0.113.10"          # TEST-NET-3: the world's servers
HOST_IP, WORLD_LINK_IP = "192.0.2.1", "192.0.2.2"     # TEST-NET-1: host <-> world veth
VETH_GW, VETH_SBX = "198.51.100.1", "198.51.100.2"    # TEST-NET-2 /25: veth contender
VSTART_GW, VSTART_SBX = "198.51.100.129", "198.51.100.130"  # /30: veth start-up probe
IPERF_PORT = 5201
ECHO_PORT = 9007
SYS_PY = "/usr/bin/python3"
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

TARGET_VS_VETH = 0.7
TARGET_VS_SLIRP = 5.0
TARGET_STARTUP_MS = 150.0

# --- programs run in the world / inside sandboxes (system python, no dependencies) ------------

ECHO_SERVER = r"""
import socket, sys, time
ip, port, life = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ip, port)); s.listen(1024); s.settimeout(1.0)
print("ready", flush=True)
end = time.monotonic() + life
while time.monotonic() < end:
    try:
        c, _ = s.accept()
    except socket.timeout:
        continue
    try:
        c.settimeout(5.0)
        b = c.recv(1)
        if b:
            c.sendall(b)
    except OSError:
        pass
    finally:
        c.close()
"""

LATENCY_CLIENT = r"""
import json, socket, sys, time
ip, port, n, warm, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
pc = time.perf_counter_ns
out = []
end = time.monotonic() + limit
for i in range(n + warm):
    if time.monotonic() > end:
        break
    t = pc()
    s = socket.socket()
    s.settimeout(5.0)
    s.connect((ip, port))
    s.sendall(b"x")
    b = s.recv(1)
    s.close()
    d = pc() - t
    if b != b"x":
        sys.exit("bad echo reply %r" % (b,))
    if i >= warm:
        out.append(d)
print(json.dumps(out))
"""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# What a single measurement may raise without aborting the whole run.
ERRS = (BenchError, subprocess.SubprocessError, OSError, ValueError, KeyError)


# --- process / namespace bookkeeping -------------------------------------------------------------

class Reaper:
    """Remembers every process and namespace we create and removes them (idempotently)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.netns: list[str] = []
        self.fds: list[int] = []
        self.done = False

    def popen(self, argv, **kw) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(argv, **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, grace: float = 3.0) -> None:
        if p.poll() is None:
            # Our children are session (and group) leaders: signal the group we created, only
            # while its leader is still ours (unreaped), so the id cannot have been reused.
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    p.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        for f in (p.stdout, p.stderr):
            if f:
                f.close()
        if p in self.procs:
            self.procs.remove(p)

    def add_netns(self, name: str) -> None:
        sh(["ip", "netns", "add", name])
        self.netns.append(name)

    def del_netns(self, name: str) -> None:
        # Kill whatever still runs in it (e.g. a daemonised helper), then delete it.
        for _ in range(3):
            r = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10)
            pids = [int(x) for x in r.stdout.split() if x.isdigit() and int(x) != os.getpid()]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        if name in self.netns:
            self.netns.remove(name)

    def cleanup(self) -> None:
        if self.done:
            return
        self.done = True
        for p in reversed(list(self.procs)):
            try:
                self.stop(p, grace=2.0)
            except Exception as e:  # keep cleaning
                log(f"cleanup: {e}")
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        for ns in reversed(list(self.netns)):
            try:
                self.del_netns(ns)
            except Exception as e:
                log(f"cleanup: netns {ns}: {e}")


REAPER = Reaper()


def sh(argv, timeout: float = 30, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    r = run(argv, timeout=timeout, input=input)
    if check and r.returncode != 0:
        raise BenchError(f"{shlex.join(argv)} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return r


def wait_exit(p: subprocess.Popen, timeout: float) -> bool:
    """Wait for p to exit, up to timeout; True if it did.  Uses a pidfd, so unlike Popen.wait(timeout)
    (which polls with sleeps of up to 50 ms) it adds no delay to start-up timings."""
    if p.poll() is not None:
        return True
    fd = os.pidfd_open(p.pid)   # p is not reaped yet, so the pid is still ours
    try:
        if not wait_readable(fd, timeout):
            return False
    finally:
        os.close(fd)
    p.wait()
    return True


def run(argv, timeout: float, input: str | None = None, env=None, cwd="/", pass_fds=()) -> subprocess.CompletedProcess:
    """Run to completion with a hard timeout; on timeout the whole process group is killed.
    Output goes through temporary files, so the call returns when the process exits (not when
    every descendant has closed a pipe)."""
    with tempfile.TemporaryFile() as fi, tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        if input is not None:
            fi.write(input.encode())
            fi.seek(0)
        p = REAPER.popen(argv, stdin=fi if input is not None else subprocess.DEVNULL, stdout=fo, stderr=fe,
                         env=env, cwd=cwd, pass_fds=pass_fds)
        try:
            rc = p.returncode if wait_exit(p, timeout) else None
        finally:
            REAPER.stop(p, grace=1.0)
        fo.seek(0)
        fe.seek(0)
        out = fo.read().decode(errors="replace")
        err = fe.read().decode(errors="replace")
    if rc is None:
        rc, err = -999, err + f"\ntimed out after {timeout:.0f} s"
    return subprocess.CompletedProcess(argv, rc, out, err)


def in_ns(name: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{name}", "--"]


def wait_readable(fd: int, timeout: float) -> bool:
    r, _, _ = select.select([fd], [], [], timeout)
    return bool(r)


def readline_timeout(p: subprocess.Popen, timeout: float) -> str:
    fd = p.stdout.fileno()
    buf = b""
    end = time.monotonic() + timeout
    while b"\n" not in buf:
        left = end - time.monotonic()
        if left <= 0 or not wait_readable(fd, left):
            raise BenchError(f"{shlex.join(p.args)}: no output within {timeout} s")
        chunk = os.read(fd, 256)
        if not chunk:
            raise BenchError(f"{shlex.join(p.args)}: exited early (rc={p.poll()})")
        buf += chunk
    return buf.split(b"\n", 1)[0].decode()


def tcp_listening(pid: int, port: int) -> bool:
    """Is anything listening on :port in the netns of pid?  (reads /proc/PID/net/tcp)"""
    try:
        with open(f"/proc/{pid}/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[1].endswith(f":{port:04X}") and parts[3] == "0A":
                    return True
    except (OSError, StopIteration):
        pass
    return False


# --- user to run the rootless tools as ------------------------------------------------------------

class RunAs:
    def __init__(self, name: str) -> None:
        pw = pwd.getpwnam(name)
        self.name, self.uid, self.gid = name, pw.pw_uid, pw.pw_gid
        home = pw.pw_dir if os.path.isdir(pw.pw_dir) else "/tmp"
        self.env = {"PATH": SAFE_PATH, "HOME": home, "USER": name, "LOGNAME": name, "LANG": "C.UTF-8"}

    @property
    def root(self) -> bool:
        return self.uid == 0

    def prefix(self) -> list[str]:
        if self.root:
            return []
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--"]


# --- topology ---------------------------------------------------------------------------------------

class Topology:
    def __init__(self, bid: str) -> None:
        self.id = bid
        self.host = f"tether-bench-host-{bid}"
        self.world = f"tether-bench-world-{bid}"
        self.veth = f"tether-bench-veth-{bid}"
        self.servers: dict[str, subprocess.Popen] = {}

    def build(self, life_s: float) -> None:
        h, w, v = self.host, self.world, self.veth
        for ns in (h, w, v):
            REAPER.add_netns(ns)
        hw, wh = f"tbh-{self.id}", f"tbw-{self.id}"
        hv, vh = f"tbv-{self.id}", f"tbvp-{self.id}"
        sh(["ip", "-n", h, "link", "add", hw, "type", "veth", "peer", "name", wh, "netns", w])
        sh(["ip", "-n", h, "link", "add", hv, "type", "veth", "peer", "name", vh, "netns", v])
        sh(["ip", "-n", h, "-b", "-"], input="\n".join([
            "link set lo up",
            f"addr add {HOST_IP}/24 dev {hw}", f"link set {hw} up",
            f"addr add {VETH_GW}/25 dev {hv}", f"link set {hv} up",
            f"route add default via {WORLD_LINK_IP}", ""]))
        sh(["ip", "-n", w, "-b", "-"], input="\n".join([
            "link set lo up", f"addr add {WORLD_IP}/32 dev lo",
            f"addr add {WORLD_LINK_IP}/24 dev {wh}", f"link set {wh} up",
            f"route add 198.51.100.0/24 via {HOST_IP}", ""]))
        sh(["ip", "-n", v, "-b", "-"], input="\n".join([
            "link set lo up", f"addr add {VETH_SBX}/25 dev {vh}", f"link set {vh} up",
            f"route add default via {VETH_GW}", ""]))
        sh(in_ns(h) + ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        # The world's 1-byte echo server (bounded lifetime).
        p = REAPER.popen(in_ns(w) + [SYS_PY, "-c", ECHO_SERVER, WORLD_IP, str(ECHO_PORT), str(life_s)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
        if readline_timeout(p, 10) != "ready":
            raise BenchError("echo server did not start")
        self.servers["echo"] = p

    def iperf_server(self) -> subprocess.Popen:
        p = REAPER.popen(in_ns(self.world) + ["iperf3", "-s", "-1", "-B", WORLD_IP, "-p", str(IPERF_PORT)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")
        end = time.monotonic() + 5
        while time.monotonic() < end:
            if p.poll() is not None:
                raise BenchError(f"iperf3 server exited: {p.stderr.read().decode()[-300:]}")
            if tcp_listening(p.pid, IPERF_PORT):
                return p
            time.sleep(0.01)
        REAPER.stop(p)
        raise BenchError("iperf3 server did not start listening within 5 s")


# --- contenders ------------------------------------------------------------------------------------

class Contender:
    key = ""
    label = ""

    def __init__(self, topo: Topology, user: RunAs, args) -> None:
        self.topo, self.user, self.args = topo, user, args
        self.status, self.note = "ok", ""

    def setup(self, life_s: float) -> None:
        pass

    def teardown(self) -> None:
        pass

    def check_alive(self) -> None:
        """Raise BenchError if a long-lived part of the sandbox has gone away."""

    def wrap(self, argv: list[str]) -> list[str]:
        raise NotImplementedError

    def env(self):
        return self.user.env

    def startup_once(self) -> float:
        """Wall time in seconds of one full start-up (sandbox up, `true` run, sandbox gone)."""
        t0 = time.perf_counter()
        r = run(self.wrap(["true"]), timeout=30, env=self.env())
        t = time.perf_counter() - t0
        if r.returncode != 0:
            raise BenchError(f"rc={r.returncode}: {r.stderr.strip()[-300:]}")
        return t

    def describe(self) -> str:
        return shlex.join(self.wrap(["CMD"]))


class Veth(Contender):
    key, label = "veth", "veth (rootful, routed)"

    def wrap(self, argv):
        return in_ns(self.topo.veth) + argv

    def env(self):
        return RunAs("root").env

    def startup_once(self) -> float:
        # A fresh netns + veth pair to the host netns, addressed and routed with iproute2, `true` run
        # in it, netns deleted: what a rootful container runtime does for its network.
        self.n = getattr(self, "n", 0) + 1
        ns = f"tether-bench-vs{self.n}-{self.topo.id}"
        a, b = f"tbs{self.n}-{self.topo.id}", f"tbsp{self.n}-{self.topo.id}"
        t0 = time.perf_counter()
        REAPER.add_netns(ns)
        try:
            sh(["ip", "-n", self.topo.host, "-b", "-"], input="\n".join([
                f"link add {a} type veth peer name {b} netns {ns}",
                f"addr add {VSTART_GW}/30 dev {a}", f"link set {a} up", ""]))
            sh(["ip", "-n", ns, "-b", "-"], input="\n".join([
                "link set lo up", f"addr add {VSTART_SBX}/30 dev {b}", f"link set {b} up",
                f"route add default via {VSTART_GW}", ""]))
            sh(in_ns(ns) + ["true"])
        finally:
            REAPER.del_netns(ns)
        return time.perf_counter() - t0


class Slirp(Contender):
    def __init__(self, topo, user, args, mtu: int) -> None:
        super().__init__(topo, user, args)
        self.mtu = mtu
        self.key, self.label = f"slirp4netns-{mtu}", f"slirp4netns MTU {mtu}"
        self.pid = None
        self.procs: list[subprocess.Popen] = []

    def _start(self, life_s: float):
        """unshare a user+net ns, attach slirp4netns to it, wait for --ready-fd.  Returns handles."""
        u = self.user
        ns = REAPER.popen(in_ns(self.topo.host) + u.prefix() + [
            "unshare", "--user", "--map-root-user", "--net", "--",
            "sh", "-c", f'echo $$; exec sleep {int(life_s)}'],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=u.env, cwd="/")
        procs = [ns]
        try:
            pid = int(readline_timeout(ns, 10))
            rr, rw = os.pipe()
            er, ew = os.pipe()
            try:
                sl = REAPER.popen(in_ns(self.topo.host) + u.prefix() + [
                    "slirp4netns", "--configure", f"--mtu={self.mtu}", "--disable-host-loopback",
                    f"--ready-fd={rw}", f"--exit-fd={er}", str(pid), "tap0"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=u.env, cwd="/",
                    pass_fds=(rw, er))
                procs.append(sl)
            finally:
                os.close(rw)
                os.close(er)
            try:
                if not wait_readable(rr, 10) or os.read(rr, 1) != b"1":
                    raise BenchError(f"slirp4netns not ready: rc={sl.poll()}")
            finally:
                os.close(rr)
            return pid, ew, procs
        except BaseException:
            for p in reversed(procs):
                REAPER.stop(p)
            raise

    def setup(self, life_s):
        self.pid, self.exit_w, self.procs = self._start(life_s)
        REAPER.fds.append(self.exit_w)

    def teardown(self):
        if getattr(self, "exit_w", -1) >= 0:
            os.close(self.exit_w)          # --exit-fd: tells slirp4netns to exit
            REAPER.fds.remove(self.exit_w)
            self.exit_w = -1
        for p in reversed(self.procs):
            REAPER.stop(p)
        self.procs = []

    def check_alive(self):
        dead = [f"{'slirp4netns' if 'slirp4netns' in p.args else 'namespace holder (unshare … sleep)'} "
                f"exited (rc={p.returncode})" for p in self.procs if p.poll() is not None]
        if dead:
            raise BenchError("sandbox gone (killed from outside?): " + ", ".join(dead))

    def wrap(self, argv):
        return ["nsenter", f"--target={self.pid}", "--net", "--"] + argv

    def describe(self):
        return (f"unshare --user --map-root-user --net sleep; slirp4netns --configure --mtu={self.mtu} "
                f"--disable-host-loopback --ready-fd=N PID tap0; nsenter -t PID -n CMD")

    def startup_once(self) -> float:
        t0 = time.perf_counter()
        pid, ew, procs = self._start(60)
        try:
            r = run(["nsenter", f"--target={pid}", "--net", "--", "true"], timeout=10)
            if r.returncode != 0:
                raise BenchError(f"nsenter true: {r.stderr.strip()}")
            os.close(ew)       # --exit-fd: slirp4netns exits
            ew = -1
            procs[0].kill()    # the namespace holder (sleep)
            for p in procs:
                if not wait_exit(p, 10):
                    raise BenchError(f"{p.args[-2:]} did not exit")
        finally:
            if ew >= 0:
                os.close(ew)
            for p in reversed(procs):
                REAPER.stop(p)
        return time.perf_counter() - t0


class Pasta(Contender):
    key, label = "pasta", "pasta"

    def wrap(self, argv):
        extra = ["--runas", "0"] if self.user.root else []   # as root pasta would switch to nobody
        return in_ns(self.topo.host) + self.user.prefix() + ["pasta", *extra, "--config-net", "--"] + argv


class Tether(Contender):
    key, label = "tether", "tether"

    def __init__(self, topo, user, args, cmd: list[str] | None, note: str = "") -> None:
        super().__init__(topo, user, args)
        self.cmd = cmd
        if cmd is None:
            self.status, self.note = "skipped", note

    def wrap(self, argv):
        return in_ns(self.topo.host) + self.user.prefix() + self.cmd + ["run", *self.args.tether_arg, "--"] + argv


def find_tether(args) -> tuple[list[str] | None, str]:
    if args.tether:
        cmd = shlex.split(args.tether)
        exe = shutil.which(cmd[0]) or (cmd[0] if os.path.exists(cmd[0]) else None)
        if not exe:
            return None, f"tether command not found: {args.tether}"
        return [os.path.abspath(exe) if os.path.exists(exe) else exe] + cmd[1:], ""
    venv = REPO / ".venv" / "bin"
    if (venv / "tether").exists():
        return [str(venv / "tether")], ""
    if (venv / "python").exists():
        return [str(venv / "python"), "-m", "tether"], ""
    return None, f"no tether found ({venv}/tether missing; pass --tether PATH)"


# --- measurements ----------------------------------------------------------------------------------

def pct(sorted_vals: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    k = max(1, math.ceil(p / 100 * len(sorted_vals)))
    return sorted_vals[k - 1]


def measure_iperf(c: Contender, reverse: bool, args) -> dict:
    c.check_alive()
    srv = c.topo.iperf_server()
    r = None
    try:
        argv = ["iperf3", "-c", WORLD_IP, "-p", str(IPERF_PORT), "-t", str(args.duration),
                "-O", str(args.omit), "-J", "--connect-timeout", "5000"]
        if reverse:
            argv += ["-R", "--rcv-timeout", "15000"]
        r = run(c.wrap(argv), timeout=args.duration + args.omit + 30, env=c.env())
    finally:
        try:
            srv.wait(5 if r is not None and r.returncode == 0 else 0.2)
        except subprocess.TimeoutExpired:
            pass
        REAPER.stop(srv)
    try:
        j = json.loads(r.stdout)
    except json.JSONDecodeError:
        raise BenchError(f"iperf3 rc={r.returncode}: {(r.stderr or r.stdout).strip()[-300:]}")
    if "error" in j:
        raise BenchError(f"iperf3: {j['error']}")
    end = j["end"]
    return {"gbps": end["sum_received"]["bits_per_second"] / 1e9,
            "sender_gbps": end["sum_sent"]["bits_per_second"] / 1e9,
            "retransmits": end["sum_sent"].get("retransmits"),
            "cpu": end.get("cpu_utilization_percent")}


def measure_latency(c: Contender, args) -> dict:
    c.check_alive()
    limit = max(30.0, args.latency_count * 0.05)
    r = run(c.wrap([SYS_PY, "-c", LATENCY_CLIENT, WORLD_IP, str(ECHO_PORT), str(args.latency_count),
                    str(args.latency_warmup), str(limit)]), timeout=limit + 30, env=c.env())
    if r.returncode != 0:
        raise BenchError(f"latency client rc={r.returncode}: {r.stderr.strip()[-300:]}")
    ns = json.loads(r.stdout.strip().splitlines()[-1])
    if not ns:
        raise BenchError("latency client returned no samples")
    us = sorted(x / 1000 for x in ns)
    res = {"count": len(us), "p50_us": statistics.median(us), "p99_us": pct(us, 99),
           "mean_us": statistics.fmean(us), "min_us": us[0], "max_us": us[-1],
           "samples_us": [round(x / 1000, 1) for x in ns]}
    if len(us) < args.latency_count:
        res["note"] = f"only {len(us)} of {args.latency_count} connections within {limit:.0f} s"
    return res


def probe(c: Contender) -> None:
    """A few echo round-trips from inside the sandbox: proves the contender works end to end."""
    r = run(c.wrap([SYS_PY, "-c", LATENCY_CLIENT, WORLD_IP, str(ECHO_PORT), "3", "0", "20"]),
            timeout=60, env=c.env())
    if r.returncode != 0:
        raise BenchError(f"probe failed rc={r.returncode}: {(r.stderr or r.stdout).strip()[-400:]}")


# --- machine info ----------------------------------------------------------------------------------

def first_line(argv) -> str | None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return ((r.stdout or r.stderr).strip().splitlines() or [None])[0]
    except (OSError, subprocess.TimeoutExpired):
        return None


def cpu_busy(interval: float = 1.0) -> float | None:
    """Percent of CPU time not idle over `interval` (before we start anything: others' load)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)
    try:
        t0, i0 = snap()
        time.sleep(interval)
        t1, i1 = snap()
        return round(100.0 * (1 - (i1 - i0) / max(1, t1 - t0)), 1)
    except (OSError, ValueError, IndexError):
        return None


def machine_info(tether_cmd) -> dict:
    cpu = None
    try:
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), None)
    except OSError:
        pass
    mem = None
    try:
        mem = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))) // 1024
    except (OSError, StopIteration):
        pass
    pkgs = {}
    for p in ("iperf3", "slirp4netns", "passt", "iproute2", "python3"):
        pkgs[p] = first_line(["dpkg-query", "-W", "-f=${Version}", p])
    return {
        "kernel": platform.release(), "kernel_version": platform.version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "cpu_model": cpu, "mem_mib": mem,
        "os": first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python_harness": platform.python_version(), "python_clients": first_line([SYS_PY, "--version"]),
        "versions": {
            "iperf3": first_line(["iperf3", "--version"]),
            "slirp4netns": first_line(["slirp4netns", "--version"]),
            "pasta": first_line(["pasta", "--version"]),
            "tether": first_line(tether_cmd + ["--version"]) if tether_cmd else None,
        },
        "debian_packages": pkgs,
        "loadavg_start": os.getloadavg(),
        "cpu_busy_before_pct": cpu_busy(),
    }


# --- results: ratios, targets, outputs -------------------------------------------------------------

def summarize(res: dict) -> tuple[dict, list[dict]]:
    C = res["contenders"]

    def thr(k, d):
        return (C.get(k, {}).get("throughput", {}).get(d) or {}).get("gbps_median")

    def lat(k):
        return (C.get(k, {}).get("latency") or {}).get("p50_us")

    def st(k):
        return (C.get(k, {}).get("startup") or {}).get("median_ms")

    slirps = [k for k in C if k.startswith("slirp4netns")]
    ratios: dict = {}
    targets: list[dict] = []
    tether_ok = C.get("tether", {}).get("status") == "ok"
    why = "" if tether_ok else f"tether not measured: {oneline(C.get('tether', {}).get('note') or 'not selected', 160)}"

    def verdict(ok):
        if ok is None:
            return "N/A"
        return "PASS" if ok else "MISS"

    for d, dname in (("up", "sandbox→world"), ("down", "world→sandbox")):
        t, v = thr("tether", d), thr("veth", d)
        best = max(((thr(k, d), k) for k in slirps if thr(k, d)), default=(None, None))
        r_v = t / v if t and v else None
        r_s = t / best[0] if t and best[0] else None
        ratios[f"throughput_{d}_tether_over_veth"] = r_v
        ratios[f"throughput_{d}_tether_over_best_slirp4netns"] = r_s
        ratios[f"throughput_{d}_best_slirp4netns"] = best[1]
        targets.append({"id": f"throughput_{d}_vs_veth", "target": f"TCP {dname} ≥ {TARGET_VS_VETH}× veth",
                        "measured": (f"{r_v:.2f}× ({t:.2f} / {v:.2f} Gbit/s)" if r_v else why or "n/a"),
                        "verdict": verdict(None if r_v is None else r_v >= TARGET_VS_VETH)})
        targets.append({"id": f"throughput_{d}_vs_slirp4netns",
                        "target": f"TCP {dname} ≥ {TARGET_VS_SLIRP:g}× slirp4netns (best MTU)",
                        "measured": (f"{r_s:.2f}× ({t:.2f} / {best[0]:.2f} Gbit/s, {best[1]})" if r_s else why or "n/a"),
                        "verdict": verdict(None if r_s is None else r_s >= TARGET_VS_SLIRP)})
    tl = lat("tether")
    bl = min(((lat(k), k) for k in slirps if lat(k)), default=(None, None))
    ratios["latency_p50_tether_over_best_slirp4netns"] = tl / bl[0] if tl and bl[0] else None
    targets.append({"id": "latency_p50_vs_slirp4netns", "target": "connect+echo p50 ≤ slirp4netns (best MTU)",
                    "measured": (f"{tl:.0f} µs vs {bl[0]:.0f} µs ({bl[1]})" if tl and bl[0] else why or "n/a"),
                    "verdict": verdict(None if not (tl and bl[0]) else tl <= bl[0])})
    ts = st("tether")
    for k in ("veth", *slirps, "pasta"):
        if ts and st(k):
            ratios[f"startup_tether_over_{k}"] = ts / st(k)
    targets.append({"id": "startup", "target": f"start-up (`tether run -- true`) ≤ {TARGET_STARTUP_MS:g} ms",
                    "measured": (f"{ts:.0f} ms (median)" if ts else why or "n/a"),
                    "verdict": verdict(None if ts is None else ts <= TARGET_STARTUP_MS)})
    return ratios, targets


def oneline(s, n: int = 200) -> str:
    """One table-safe line; keeps the end of long texts (where tracebacks say what went wrong)."""
    s = " ".join(str(s).replace("|", "/").split())
    return s if len(s) <= n else "…" + s[-n:]


def fmt(x, spec, dash="—"):
    return dash if x is None else format(x, spec)


def docs_block(res: dict, json_name: str) -> str:
    m, p = res["machine"], res["params"]
    lines = []
    kind = ("**quick smoke run** (not representative): " if res["quick"] else "")
    lines.append(f"Run {res['timestamp']} — {kind}iperf3 {p['duration']} s × {p['repeats']} per direction "
                 f"(median), {p['latency_count']} connections, {p['startup_runs']} start-ups; "
                 f"Linux {m['kernel']}, {m['cpu_count']} CPUs ({m['cpu_model']}); rootless tools run as "
                 f"`{p['as_user']}`. Raw numbers: `benchmarks/results/{json_name}`.")
    lines.append("")
    lines.append("| contender | TCP sandbox→world Gbit/s | TCP world→sandbox Gbit/s | connect+echo p50 µs "
                 "| p99 µs | start-up median ms |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    for k, c in res["contenders"].items():
        if c["status"] != "ok":
            note = oneline(c.get("note", ""))
            lines.append(f"| {c['label']} | {c['status']}: {note} | | | | |")
            continue
        t = c.get("throughput", {})
        la, su = c.get("latency") or {}, c.get("startup") or {}
        lines.append(f"| {c['label']} | {fmt((t.get('up') or {}).get('gbps_median'), '.2f')} "
                     f"| {fmt((t.get('down') or {}).get('gbps_median'), '.2f')} | {fmt(la.get('p50_us'), '.0f')} "
                     f"| {fmt(la.get('p99_us'), '.0f')} | {fmt(su.get('median_ms'), '.1f')} |")
    busy = m.get("cpu_busy_before_pct")
    if busy is not None and busy > 10:
        lines.append("")
        lines.append(f"**Caution:** other work used {busy:.0f}% of the CPUs just before the run started; "
                     "these numbers are noisier than usual.")
    b = res.get("baseline_startup_ms")
    if b is not None:
        lines.append("")
        lines.append(f"Start-up times include a fixed ~{b:.1f} ms for `nsenter` + fork/exec "
                     f"(median of `nsenter --net=HOST true`).")
    errs = [(c["label"], e) for c in res["contenders"].values() for e in c.get("errors", [])]
    if errs:
        lines.append("")
        lines.append("Errors during the run: " + "; ".join(
            f"{l}: {oneline(e)}" for l, e in errs[:8]))
    lines.append("")
    lines.append("| tether target | measured | result |")
    lines.append("|---|---|---|")
    for t in res["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {t['verdict']} |")
    lines.append("")
    lines.append("![benchmark chart](../benchmarks/results/latest.png)")
    return "\n".join(lines)


DOCS_TEMPLATE = """# Benchmarks

`benchmarks/run.py` (run by `make bench`) compares tether with slirp4netns, pasta and the rootful veth
limit, side by side in one run on the same topology. See `benchmarks/README.md` for the options.

## Latest results

<!-- results -->
<!-- /results -->
"""


def update_docs(block: str) -> None:
    text = DOCS.read_text() if DOCS.exists() else DOCS_TEMPLATE
    start, end = "<!-- results -->", "<!-- /results -->"
    if start not in text or end not in text:
        text = text.rstrip("\n") + "\n\n" + start + "\n" + end + "\n"
    a = text.index(start) + len(start)
    b = text.index(end)
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text[:a] + "\n" + block + "\n" + text[b:])


def plot(res: dict, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not available ({e}); no chart written"
    C = [(k, c) for k, c in res["contenders"].items() if c["status"] == "ok"]
    labels = [c["label"].replace(" (rootful, routed)", "\n(rootful)").replace(" MTU ", "\nMTU ") for _, c in C]
    x = list(range(len(C)))
    fig, axs = plt.subplots(1, 3, figsize=(16, 5))

    def bars(ax, series, names, unit, fmt_):
        w = 0.8 / len(series)
        for i, (vals, name) in enumerate(zip(series, names)):
            xs = [xx + (i - (len(series) - 1) / 2) * w for xx in x]
            bs = ax.bar(xs, [v or 0 for v in vals], w, label=name)
            for bar, v in zip(bs, vals):
                ax.annotate("n/a" if v is None else format(v, fmt_), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel(unit)

    def g(c, *path):
        for p in path:
            c = (c or {}).get(p)
        return c

    ax = axs[0]
    bars(ax, [[g(c, "throughput", "up", "gbps_median") for _, c in C],
              [g(c, "throughput", "down", "gbps_median") for _, c in C]],
         ["sandbox→world", "world→sandbox (-R)"], "Gbit/s", ".2f")
    ax.set_title("iperf3 TCP throughput (higher is better)")
    ax.legend(fontsize=8)
    ax = axs[1]
    bars(ax, [[g(c, "latency", "p50_us") for _, c in C], [g(c, "latency", "p99_us") for _, c in C]],
         ["p50", "p99"], "µs", ".0f")
    ax.set_title("connect + 1-byte echo + close (lower is better)")
    ax.legend(fontsize=8)
    ax = axs[2]
    sts = [g(c, "startup", "median_ms") for _, c in C]
    bars(ax, [sts], ["median"], "ms", ".0f")
    ax.set_ylim(0, max([TARGET_STARTUP_MS] + [v for v in sts if v]) * 1.2)
    ax.axhline(TARGET_STARTUP_MS, color="red", ls="--", lw=1, label=f"tether target {TARGET_STARTUP_MS:g} ms")
    ax.set_title("start-up: CONTENDER -- true (lower is better)")
    ax.legend(fontsize=8)
    m = res["machine"]
    fig.suptitle(f"tether benchmark {res['timestamp']}{' (QUICK smoke run)' if res['quick'] else ''} — "
                 f"Linux {m['kernel']}, {m['cpu_count']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --- main ----------------------------------------------------------------------------------------

ALL = ["veth", "slirp4netns-1500", "slirp4netns-65520", "pasta", "tether"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Must run as root. Method and results: docs/benchmarks.md.")
    ap.add_argument("--quick", action="store_true",
                    help="short smoke run: --duration 2 --omit 0 --repeats 1 --latency-count 200 --startup-runs 5 "
                         "(explicit flags still win)")
    ap.add_argument("--duration", type=int, help="iperf3 seconds per run [10; quick 2]")
    ap.add_argument("--omit", type=int, help="iperf3 -O warm-up seconds not counted [1; quick 0]")
    ap.add_argument("--repeats", type=int, help="iperf3 runs per contender and direction, median reported [3; quick 1]")
    ap.add_argument("--latency-count", type=int, help="connections measured [1000; quick 200]")
    ap.add_argument("--latency-warmup", type=int, default=20, help="connections made first and not counted [20]")
    ap.add_argument("--startup-runs", type=int, help="start-up runs, median reported [20; quick 5]")
    ap.add_argument("--contenders", default=",".join(ALL), help="comma-separated subset of: " + ",".join(ALL) + " [all]")
    ap.add_argument("--tether", help="tether command (path, or e.g. '.venv/bin/python -m tether') "
                                     "[.venv/bin/tether, else .venv/bin/python -m tether]")
    ap.add_argument("--tether-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for `tether run` (repeatable), e.g. --tether-arg=--mtu=65520")
    ap.add_argument("--as-user", default="nobody",
                    help="unprivileged user that runs the rootless tools (slirp4netns, pasta, tether); "
                         "'root' runs them as root [nobody; not tether-test: the integration tests' "
                         "leak check kills tether-test processes it did not start]")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory [benchmarks/results]")
    ap.add_argument("--no-publish", action="store_true",
                    help="only write the timestamped JSON; leave latest.json/latest.png/docs alone")
    a = ap.parse_args(argv)
    q = a.quick
    for name, full, quick in (("duration", 10, 2), ("omit", 1, 0), ("repeats", 3, 1),
                              ("latency_count", 1000, 200), ("startup_runs", 20, 5)):
        if getattr(a, name) is None:
            setattr(a, name, quick if q else full)
    sel = [s.strip() for s in a.contenders.split(",") if s.strip()]
    bad = [s for s in sel if s not in ALL]
    if bad:
        ap.error(f"unknown contender(s) {bad}; choose from {ALL}")
    a.selected = [s for s in ALL if s in sel]
    if not (1 <= a.duration <= 600 and 0 <= a.omit <= 60 and 1 <= a.repeats <= 20
            and 1 <= a.latency_count <= 100000 and 1 <= a.startup_runs <= 1000 and 0 <= a.latency_warmup <= 1000):
        ap.error("a count or duration is out of range")
    return a


def on_signal(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("benchmarks/run.py must run as root (it creates network namespaces and veth pairs).", file=sys.stderr)
        return 2
    missing = [t for t in ("ip", "nsenter", "unshare", "setpriv", "iperf3", SYS_PY) if not shutil.which(t)]
    missing += [t for t, k in (("slirp4netns", "slirp4netns-"), ("pasta", "pasta"))
                if any(s.startswith(k) for s in args.selected) and not shutil.which(t)]
    if missing:
        print(f"missing programs: {', '.join(missing)} (run `make deps` / scripts/install-deps.sh)", file=sys.stderr)
        return 2
    try:
        user = RunAs(args.as_user)
    except KeyError:
        print(f"no such user: {args.as_user}", file=sys.stderr)
        return 2

    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, on_signal)
    atexit.register(REAPER.cleanup)

    tether_cmd, tether_note = (None, "not selected")
    if "tether" in args.selected:
        tether_cmd, tether_note = find_tether(args)

    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    res = {
        "schema": 1, "timestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "quick": args.quick,
        "params": {"duration": args.duration, "omit": args.omit, "repeats": args.repeats,
                   "latency_count": args.latency_count, "latency_warmup": args.latency_warmup,
                   "startup_runs": args.startup_runs, "as_user": args.as_user,
                   "tether_cmd": tether_cmd, "tether_args": args.tether_arg},
        "machine": machine_info(tether_cmd),
        "topology": {"world_server": WORLD_IP, "host_netns_addr": f"{HOST_IP}/24 via veth to world {WORLD_LINK_IP}",
                     "veth_contender": f"{VETH_SBX}/25 routed through the host netns ({VETH_GW}), no NAT",
                     "iperf3_port": IPERF_PORT, "echo_port": ECHO_PORT, "link_mtu": 1500},
        "contenders": {},
    }

    # Upper bound for long-lived helpers (echo server, slirp namespaces): generous, but finite.
    n = len(args.selected)
    life = 600 + n * (2 * args.repeats * (args.duration + args.omit + 40) + args.latency_count * 0.05 + 120
                      + args.startup_runs * 35)

    bid = secrets.token_hex(3)
    topo = Topology(bid)
    contenders: list[Contender] = []
    t_start = time.monotonic()
    try:
        log(f"building topology {topo.host} <-> {topo.world} (+ {topo.veth}); rootless tools run as {user.name}")
        topo.build(life)
        for k in args.selected:
            if k == "veth":
                contenders.append(Veth(topo, user, args))
            elif k.startswith("slirp4netns-"):
                contenders.append(Slirp(topo, user, args, int(k.split("-")[1])))
            elif k == "pasta":
                contenders.append(Pasta(topo, user, args))
            elif k == "tether":
                contenders.append(Tether(topo, user, args, tether_cmd, tether_note))
        out = {}
        for c in contenders:
            out[c.key] = {"label": c.label, "status": c.status, "note": c.note, "errors": []}
        res["contenders"] = out

        # Set up and probe every contender.
        for c in contenders:
            if c.status != "ok":
                log(f"{c.key}: {c.status}: {c.note}")
                continue
            try:
                c.setup(life)
                probe(c)
                out[c.key]["command"] = c.describe()
                log(f"{c.key}: ready ({c.describe()})")
            except ERRS as e:
                c.status, c.note = ("skipped" if c.key == "tether" else "error"), str(e)
                out[c.key].update(status=c.status, note=c.note)
                log(f"{c.key}: {c.status}: {e}")
                c.teardown()
        live = [c for c in contenders if c.status == "ok"]

        # Throughput: round-robin over contenders, `repeats` times, so drift hits all alike.
        samples = {c.key: {"up": [], "down": []} for c in live}
        for rep in range(args.repeats):
            for c in live:
                for d in ("up", "down"):
                    try:
                        s = measure_iperf(c, d == "down", args)
                        samples[c.key][d].append(s)
                        log(f"{c.key}: iperf3 {d} #{rep + 1}: {s['gbps']:.2f} Gbit/s")
                    except ERRS as e:
                        out[c.key]["errors"].append(f"iperf3 {d} #{rep + 1}: {e}")
                        log(f"{c.key}: iperf3 {d} #{rep + 1} failed: {e}")
        for c in live:
            thr = {}
            for d in ("up", "down"):
                ss = samples[c.key][d]
                thr[d] = {"gbps_median": statistics.median([s["gbps"] for s in ss]) if ss else None,
                          "samples_gbps": [s["gbps"] for s in ss], "runs": ss}
            out[c.key]["throughput"] = thr

        # Latency.
        for c in live:
            try:
                out[c.key]["latency"] = la = measure_latency(c, args)
                log(f"{c.key}: connect+echo p50 {la['p50_us']:.0f} µs, p99 {la['p99_us']:.0f} µs ({la['count']})")
            except ERRS as e:
                out[c.key]["errors"].append(f"latency: {e}")
                log(f"{c.key}: latency failed: {e}")

        # The long-lived sandboxes are no longer needed.
        for c in live:
            c.teardown()

        # Start-up, interleaved; plus the fixed nsenter/fork/exec baseline.
        st = {c.key: [] for c in live}
        base = []
        for i in range(args.startup_runs):
            t0 = time.perf_counter()
            if run(in_ns(topo.host) + ["true"], timeout=10).returncode == 0:
                base.append(time.perf_counter() - t0)
            for c in live:
                try:
                    st[c.key].append(c.startup_once())
                except ERRS as e:
                    out[c.key]["errors"].append(f"start-up #{i + 1}: {e}")
        res["baseline_startup_ms"] = statistics.median(base) * 1000 if base else None
        for c in live:
            ms = [x * 1000 for x in st[c.key]]
            out[c.key]["startup"] = {"runs": len(ms), "median_ms": statistics.median(ms) if ms else None,
                                     "min_ms": min(ms, default=None), "max_ms": max(ms, default=None),
                                     "samples_ms": [round(x, 2) for x in ms],
                                     "what": {"veth": "ip netns add + veth pair + addresses/route (iproute2) "
                                                      "+ nsenter true + ip netns del",
                                              "pasta": "pasta --config-net -- true",
                                              "tether": "tether run -- true"}.get(
                                         c.key, "unshare user+net ns, slirp4netns --configure until --ready-fd, "
                                                "nsenter true, stop both")}
            if ms:
                log(f"{c.key}: start-up median {statistics.median(ms):.1f} ms")
    finally:
        for c in contenders:
            try:
                c.teardown()
            except Exception as e:
                log(f"teardown {c.key}: {e}")
        REAPER.cleanup()
    res["elapsed_s"] = round(time.monotonic() - t_start, 1)
    res["machine"]["loadavg_end"] = os.getloadavg()

    res["ratios"], res["targets"] = summarize(res)
    args.out.mkdir(parents=True, exist_ok=True)
    jpath = args.out / f"{stamp}{'-quick' if args.quick else ''}.json"
    jpath.write_text(json.dumps(res, indent=1) + "\n")
    log(f"wrote {jpath}")
    if not args.no_publish:
        (args.out / "latest.json").write_text(json.dumps(res, indent=1) + "\n")
        note = plot(res, args.out / "latest.png")
        if note:
            log(note)
        else:
            log(f"wrote {args.out / 'latest.png'}")
        update_docs(docs_block(res, jpath.name))
        log(f"updated {DOCS}")
    print(docs_block(res, jpath.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
