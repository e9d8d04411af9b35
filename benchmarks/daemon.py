#!/usr/bin/env python3
"""Daemon-mode benchmark: `tether attach` / OCI-hook latency and a runc container's throughput
through `tether serve`, against the same container on a rootful veth and `tether run`.

Reuses the topology and helpers of benchmarks/run.py (imported as a module; nothing there runs at
import time):

    netns tether-bench-host-<id>  --veth-->  netns tether-bench-world-<id>
      192.0.2.1/24; `tether serve` runs here     servers on 203.0.113.10 (iperf3 -s, 1-byte echo)
      198.51.100.161/30 --veth--> runc container (198.51.100.162), the rootful reference
    netns tether-bench-veth-<id>: run.py's plain veth netns (198.51.100.2/25), a reference row

Measures, in one run:

* attach latency: `ip netns exec NS tether attach --socket RUNTIME/NAME.sock` in a fresh plain
  netns, from Popen to the client's "network configured" line on stderr (N sequential attaches:
  start, read the line, SIGTERM, wait for the exit and the daemon's `detach`); and, interleaved
  with it, what that time is made of: `ip netns exec NS true`, the interpreter (`python -c pass`),
  `tether --version`, `tether attach` refused at once (the client without a daemon), the daemon's
  own round trip (an in-process client in this script: connect + hello + attach -> configured),
  the daemon's steps replayed here with tether's own functions, the netns configuration alone
  (by part), `tether attach -- APP` up to APP's first echo through the engine, the same APP on the
  plain veth netns, and `tether run -- true` for context;
* OCI hook cost: `tether oci-hook` alone (a synthetic OCI state on stdin), and the wall time of
  `runc run -d` of a busybox container without hooks, with a no-op createRuntime hook (/bin/true),
  with a `sleep` hook as long as tether's, and with `tether oci-hook` (createRuntime + poststop);
* throughput: iperf3 TCP both directions from a runc busybox container (the host's /usr
  bind-mounted read-only, so /usr/bin/iperf3 runs inside) attached to the daemon by the OCI hook,
  vs the same container on a veth pair from the host netns (rootful: one end moved into its
  netns, routed by the host netns), vs `tether run` and run.py's plain veth netns, round-robin;
  plus connect + 1-byte echo latency from each, as context.

Writes benchmarks/results/daemon-<UTC>.json and .png (-quick suffix for --quick runs) and, for a
full run, the block between the daemon-results comment markers in docs/benchmarks.md.  Must run
as root.  Everything it creates (namespaces, veths, containers, the daemon, its runtime directory)
is removed on exit, also on error or SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import atexit
import datetime as dt
import hashlib
import json
import os
import secrets
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests" / "integration"))

import run as bench  # noqa: E402  (benchmarks/run.py: no import-time side effects)
import oci_bundle  # noqa: E402  (tests/integration/oci_bundle.py: stdlib only)

from run import REAPER, BenchError, ERRS, log, in_ns, sh, fmt, oneline  # noqa: E402

DEFAULT_TETHER = "/opt/tether/venv/bin/tether"
DOCS = REPO / "docs" / "benchmarks.md"
RESULTS_DIR = REPO / "benchmarks" / "results"
DOCS_START, DOCS_END = "<!-- daemon-results -->", "<!-- /daemon-results -->"

NAME_ATTACH, NAME_OCI, NAME_TPUT = "tbench-attach", "tbench-oci", "tbench-tput"
RUNC_GW, RUNC_IP = "198.51.100.161", "198.51.100.162"     # /30: the runc container's veth
TARGET_ATTACH_MS = 100.0
TARGET_VS_VETH = 0.7
CLIENT_ENV = {"PATH": bench.SAFE_PATH, "LANG": "C.UTF-8"}

DAEMON_CONFIG = """\
[daemon]
max_pending = 16

""" + "".join(f"""\
[container.{name}]
default = "deny"
allow = ["{bench.WORLD_IP}"]
dns = ["{bench.DNS_IP}"]

""" for name in (NAME_ATTACH, NAME_OCI, NAME_TPUT))

# The app of `tether attach -- APP`: one connect + 1-byte echo to the world's echo server.
FIRST_ECHO = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"x")
assert s.recv(1) == b"x"
print("ok", flush=True)
"""

# What the daemon's netns helper does, standalone (same functions, same config): run in a fresh
# netns by the venv's python; prints the time of netsetup.configure() and of the teardown.
CONFIGURE_PROBE = r"""
import json, sys, time
from tether.config import parse_config
from tether.daemon import plan
from tether.ns import netsetup
pc = time.perf_counter
path, name = sys.argv[1], sys.argv[2]
cfg = parse_config(open(path).read(), path).containers[name]
p = plan.net_plan(cfg)
make = plan.ruleset_for(cfg, plan.build_container_policy(cfg, []))
parts = {}
def timed(key, f):
    def wrapper(*a, **k):
        t = pc()
        try:
            return f(*a, **k)
        finally:
            parts[key] = parts.get(key, 0.0) + (pc() - t) * 1e3
    return wrapper
netsetup.run_nft = timed("nft", netsetup.run_nft)
if hasattr(netsetup, "_sys") and hasattr(netsetup._sys, "Nftables"):
    netsetup._sys.Nftables = timed("nft_context_(within_nft)", netsetup._sys.Nftables)    # part of "nft"
netsetup._capture_sockets = timed("capture_sockets", netsetup._capture_sockets)
if hasattr(netsetup, "nflog"):
    netsetup.nflog.open_socket = timed("nflog", netsetup.nflog.open_socket)
compile_ = timed("ruleset_compile", lambda port: make(port).script)
t0 = pc()
named = netsetup.configure(p, compile_, replace=True)
t1 = pc()
netsetup.close_named(named)
cparts = dict(parts)
parts.clear()
t2 = pc()
problems = netsetup.unconfigure(p)
t3 = pc()
cparts["rtnetlink_tun_rest"] = (t1 - t0) * 1e3 - sum(v for k, v in cparts.items() if k != "nft_context_(within_nft)")
print(json.dumps({"configure_ms": (t1 - t0) * 1e3, "unconfigure_ms": (t3 - t2) * 1e3, "problems": problems,
                  "configure_parts_ms": cparts, "unconfigure_parts_ms": {"nft": parts.get("nft", 0.0),
                  "nft_context_(within_nft)": parts.get("nft_context_(within_nft)", 0.0),
                  "rtnetlink_rest": (t3 - t2) * 1e3 - parts.get("nft", 0.0)}}))
"""

# What an engine worker imports before it serves (python -m tether.daemon.worker).
WORKER_IMPORTS = ("import importlib\n"
                  "for m in ('tether.daemon.worker', 'tether.runner', 'tether.engine.proxy.engine', 'uvloop'):\n"
                  "    try:\n        importlib.import_module(m)\n    except ImportError:\n        pass\n")


class Cleanup:
    """What this script adds to run.py's Reaper: containers first (their poststop hooks talk to
    the daemon), then the daemon (graceful: it unconfigures its sessions), then the Reaper
    (processes, namespaces), then temporary directories."""

    def __init__(self) -> None:
        self.bundles: list[oci_bundle.Bundle] = []
        self.daemon: Daemon | None = None
        self.dirs: list[Path] = []
        self.done = False

    def run(self) -> None:
        if self.done:
            return
        self.done = True
        for b in reversed(self.bundles):
            try:
                oci_bundle.delete(b, force=True)
            except Exception as e:   # keep cleaning
                log(f"cleanup: container {b.container_id}: {e}")
        if self.daemon is not None:
            try:
                self.daemon.stop()
            except Exception as e:
                log(f"cleanup: daemon: {e}")
        REAPER.cleanup()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


CLEANUP = Cleanup()


# --- the daemon -----------------------------------------------------------------------------------

class Daemon:
    def __init__(self, tether: list[str], host_ns: str, workdir: Path) -> None:
        self.tether, self.host_ns = tether, host_ns
        self.dir = workdir
        self.runtime_dir = workdir / "run"
        self.config_path = workdir / "tether.toml"
        self.log_path = workdir / "events.jsonl"
        self.config_path.write_text(DAEMON_CONFIG)
        self.popen: subprocess.Popen | None = None
        self._pos, self._events = 0, []

    def sock(self, name: str) -> Path:
        return self.runtime_dir / f"{name}.sock"

    def start(self, timeout: float = 20.0) -> None:
        r = bench.run(self.tether + ["serve", "--config", str(self.config_path), "--check-config"], timeout=30)
        if r.returncode != 0:
            raise BenchError(f"daemon config refused: {(r.stderr or r.stdout).strip()[-500:]}")
        notify_path = self.dir / "notify"
        ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            ns.bind(str(notify_path))
            ns.settimeout(timeout)
            err = open(self.dir / "serve.stderr", "wb")
            try:
                self.popen = REAPER.popen(
                    in_ns(self.host_ns) + self.tether + ["serve", "--config", str(self.config_path),
                                                         "--runtime-dir", str(self.runtime_dir),
                                                         "--log", str(self.log_path)],
                    env={**CLIENT_ENV, "NOTIFY_SOCKET": str(notify_path)}, stdout=subprocess.DEVNULL, stderr=err,
                    cwd="/")
            finally:
                err.close()
            try:
                msg = ns.recv(4096).decode()
            except TimeoutError:
                raise BenchError(f"tether serve: no READY=1 within {timeout:g} s: {self.stderr_tail()}") from None
            if "READY=1" not in msg.splitlines():
                raise BenchError(f"tether serve sent {msg!r} instead of READY=1")
        finally:
            ns.close()

    def stderr_tail(self) -> str:
        try:
            return (self.dir / "serve.stderr").read_text(errors="replace").strip()[-500:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            raise BenchError(f"tether serve is gone (rc={self.popen and self.popen.poll()}): {self.stderr_tail()}")

    def events(self) -> list[dict]:
        """Every event so far (the log is read incrementally)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._pos)
                data = f.read()
        except FileNotFoundError:
            return self._events
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            if line.strip():
                try:
                    self._events.append(json.loads(line))
                except ValueError:
                    pass
        self._pos += end
        return self._events

    def count(self, event: str, name: str) -> int:
        return sum(1 for e in self.events() if e.get("event") == event and e.get("sandbox") == name)

    def wait_count(self, event: str, name: str, n: int, timeout: float = 15.0) -> None:
        end = time.monotonic() + timeout
        while self.count(event, name) < n:
            self.check_alive()
            if time.monotonic() > end:
                raise BenchError(f"daemon: no {event!r} event #{n} for {name} within {timeout:g} s; "
                                 f"last events: {self.events()[-5:]}")
            time.sleep(0.005)

    def last(self, event: str, name: str) -> dict | None:
        return next((e for e in reversed(self.events()) if e.get("event") == event and e.get("sandbox") == name), None)

    def stop(self, timeout: float = 20.0) -> None:
        p = self.popen
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)   # ip netns exec exec'd: p is tether serve itself
            if not bench.wait_exit(p, timeout):
                log("tether serve did not exit within 20 s of SIGTERM; killing it")
        REAPER.stop(p)
        self.popen = None


def ts_epoch(ts: str) -> float:
    return dt.datetime.fromisoformat(ts).timestamp()


# --- timing helpers -------------------------------------------------------------------------------

def time_exit(argv: list[str], timeout: float = 30.0, env=None, rc: int = 0) -> float:
    """Seconds from Popen to the process's exit (pidfd), which must be rc."""
    t0 = time.perf_counter()
    p = REAPER.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env or CLIENT_ENV, cwd="/")
    try:
        if not bench.wait_exit(p, timeout):
            raise BenchError(f"{' '.join(argv[-3:])}: still running after {timeout:g} s")
        t = time.perf_counter() - t0
        if p.returncode != rc:
            raise BenchError(f"{' '.join(argv[-3:])}: rc={p.returncode}: {p.stderr.read().decode()[-300:]}")
        return t
    finally:
        REAPER.stop(p)


def read_lines_until(p: subprocess.Popen, want: dict, timeout: float) -> dict:
    """Read p's stdout and stderr until, for each (stream, substring) in want, a line holding
    the substring has arrived; returns {key: perf_counter of its arrival}.  want: {key: (stream, text)}."""
    fds = {p.stdout.fileno(): "stdout"} if p.stdout else {}
    if p.stderr:
        fds[p.stderr.fileno()] = "stderr"
    bufs = {"stdout": b"", "stderr": b""}
    got: dict[str, float] = {}
    seen = {"stdout": "", "stderr": ""}
    end = time.monotonic() + timeout
    while len(got) < len(want):
        left = end - time.monotonic()
        if left <= 0:
            raise BenchError(f"no {sorted(set(want) - set(got))} within {timeout:g} s; "
                             f"output: {(seen['stderr'] + seen['stdout']).strip()[-400:]!r}")
        r, _, _ = select.select(list(fds), [], [], left)
        now = time.perf_counter()
        for fd in r:
            chunk = os.read(fd, 4096)
            name = fds[fd]
            if not chunk:
                del fds[fd]
                if not fds and len(got) < len(want):
                    p.wait(5)
                    raise BenchError(f"exited (rc={p.returncode}) before {sorted(set(want) - set(got))}: "
                                     f"{(seen['stderr'] + seen['stdout']).strip()[-400:]!r}")
                continue
            bufs[name] += chunk
            while b"\n" in bufs[name]:
                line, bufs[name] = bufs[name].split(b"\n", 1)
                text = line.decode(errors="replace")
                seen[name] += text + "\n"
                for key, (stream, sub) in want.items():
                    if key not in got and stream == name and sub in text:
                        got[key] = now
    return got


def summary(vals_s: list[float]) -> dict:
    """Milliseconds: n, p50 (median), p95 and p99 (nearest rank), min, max, mean, samples."""
    ms = sorted(v * 1e3 for v in vals_s)
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "p50_ms": statistics.median(ms), "p95_ms": bench.pct(ms, 95), "max_ms": ms[-1],
            "min_ms": ms[0], "mean_ms": statistics.fmean(ms), "samples_ms": [round(v * 1e3, 2) for v in vals_s]}


# --- attach latency -------------------------------------------------------------------------------

class AttachBench:
    """One round (`one()`) measures, each in a fresh netns where one is needed, interleaved so that
    drift hits every part alike: the client's fixed costs, `tether attach` to "configured", the
    daemon's round trip without a client process, a replica of the daemon's steps, `tether attach
    -- APP` to APP's first echo, APP alone, and `tether run -- true`."""

    KEYS = ("netns_exec_true", "python_pass", "tether_version", "attach_refused", "import_asyncio",
            "worker_imports", "attach_configured", "attach_exit", "inproc_attach", "inproc_to_engine_start",
            "inproc_to_attach_event", "cli_popen_to_engine_start", "cli_popen_to_attach_event",
            "step_policy", "step_helper", "step_popen_worker", "step_helper_teardown",
            "configure", "unconfigure", "app_first_echo", "app_configured", "app_alone_veth", "tether_run_true")

    def __init__(self, topo: bench.Topology, daemon: Daemon, tether: list[str], venv_python: str,
                 tether_run: bench.Contender | None) -> None:
        self.topo, self.daemon, self.tether, self.py = topo, daemon, tether, venv_python
        self.tether_run = tether_run
        self.n = 0
        self.s: dict[str, list[float]] = {k: [] for k in self.KEYS}
        self.errors: list[str] = []
        self.sigterm_early = 0      # attach clients killed by SIGTERM before their handler was set
        self.importtime: list[dict] = []
        from tether.config import load_config
        self.cfg = load_config(daemon.config_path).containers[NAME_ATTACH]

    def fresh_ns(self) -> str:
        self.n += 1
        name = f"tether-bench-d{self.n}-{self.topo.id}"
        REAPER.add_netns(name)
        return name

    def one(self, record: bool) -> None:
        s = self.s if record else {k: [] for k in self.s}
        d, sock = self.daemon, str(self.daemon.sock(NAME_ATTACH))
        nosuch = str(d.runtime_dir / "no-such-container.sock")
        ns = self.fresh_ns()
        try:
            ex = ["ip", "netns", "exec", ns]
            s["netns_exec_true"].append(time_exit(ex + ["true"]))
            s["python_pass"].append(time_exit(ex + [self.py, "-c", "pass"]))
            s["import_asyncio"].append(time_exit(ex + [self.py, "-c", "import asyncio"]))
            s["tether_version"].append(time_exit(ex + self.tether + ["--version"]))
            # The whole client without a daemon: interpreter, every import of the attach path, a
            # connect() that fails at once (ENOENT), the error message; exit 1.
            s["attach_refused"].append(time_exit(ex + self.tether + ["attach", "--socket", nosuch], rc=1))
            s["worker_imports"].append(time_exit(ex + [self.py, "-c", WORKER_IMPORTS]))

            # tether attach, holding the session in the foreground until SIGTERM.
            n_det = d.count("detach", NAME_ATTACH)
            wall0 = time.time()
            t0 = time.perf_counter()
            p = REAPER.popen(ex + self.tether + ["attach", "--socket", sock], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=CLIENT_ENV, cwd="/")
            try:
                got = read_lines_until(p, {"cfg": ("stderr", "network configured")}, 20)
                s["attach_configured"].append(got["cfg"] - t0)
                p.send_signal(signal.SIGTERM)
                if not bench.wait_exit(p, 10):
                    raise BenchError("tether attach did not exit within 10 s of SIGTERM")
                s["attach_exit"].append(time.perf_counter() - t0)
                if p.returncode == -signal.SIGTERM:
                    # The client prints "configured" before it installs its SIGTERM handler: a
                    # signal in between kills it (the session still ends: its connection closes).
                    self.sigterm_early += 1
                elif p.returncode != 0:
                    raise BenchError(f"tether attach exited {p.returncode} on SIGTERM")
            finally:
                REAPER.stop(p)
            d.wait_count("detach", NAME_ATTACH, n_det + 1)
            self._record_session_events(s, "cli_popen", p.pid, wall0)
        finally:
            REAPER.del_netns(ns)

        # The daemon's own round trip: this script as the client (connect, hello, attach with the
        # netns fd and a pidfd, wait for "configured"), no interpreter start-up, no imports.
        ns = self.fresh_ns()
        try:
            from tether.daemon.client import request_attach
            n_det = d.count("detach", NAME_ATTACH)
            nsfd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            pidfd = os.pidfd_open(os.getpid())
            try:
                wall0 = time.time()
                t0 = time.perf_counter()
                client, _, _ = request_attach(Path(sock), nsfd, pidfd, "connection", timeout=20)
                s["inproc_attach"].append(time.perf_counter() - t0)
                client.close()
            finally:
                os.close(nsfd)
                os.close(pidfd)
            d.wait_count("detach", NAME_ATTACH, n_det + 1)
            self._record_session_events(s, "inproc", os.getpid(), wall0)
        finally:
            REAPER.del_netns(ns)

        # The daemon's steps replayed in this process with tether's own functions: the policy
        # (host addresses over netlink + rules), the forked netns helper (fork, setns, configure,
        # fds back over SCM_RIGHTS), the worker's Popen (fork + exec with a preexec_fn), the
        # teardown helper.  And configure() alone in a fresh interpreter, without fork or fds.
        ns = self.fresh_ns()
        try:
            for k, v in self._daemon_steps(ns).items():
                s[k].append(v)
        finally:
            REAPER.del_netns(ns)
        ns = self.fresh_ns()
        try:
            r = bench.run(["ip", "netns", "exec", ns, self.py, "-c", CONFIGURE_PROBE, str(d.config_path),
                           NAME_ATTACH], timeout=30, env=CLIENT_ENV)
            if r.returncode != 0:
                raise BenchError(f"configure probe rc={r.returncode}: {r.stderr.strip()[-400:]}")
            j = json.loads(r.stdout.strip().splitlines()[-1])
            if j["problems"]:
                raise BenchError(f"configure probe teardown: {j['problems']}")
            s["configure"].append(j["configure_ms"] / 1e3)
            s["unconfigure"].append(j["unconfigure_ms"] / 1e3)
            for part, v in j.get("configure_parts_ms", {}).items():
                s.setdefault(f"configure.{part}", []).append(v / 1e3)
            for part, v in j.get("unconfigure_parts_ms", {}).items():
                s.setdefault(f"unconfigure.{part}", []).append(v / 1e3)
        finally:
            REAPER.del_netns(ns)

        # tether attach -- APP: until APP's first echo through the engine (then APP exits, the
        # watchdog closes the connection, the daemon detaches).
        ns = self.fresh_ns()
        try:
            n_det = d.count("detach", NAME_ATTACH)
            t0 = time.perf_counter()
            p = REAPER.popen(["ip", "netns", "exec", ns] + self.tether
                             + ["attach", "--socket", sock, "--", bench.SYS_PY, "-c", FIRST_ECHO, bench.WORLD_IP,
                                str(bench.ECHO_PORT)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=CLIENT_ENV, cwd="/")
            try:
                got = read_lines_until(p, {"cfg": ("stderr", "network configured"), "ok": ("stdout", "ok")}, 30)
                s["app_configured"].append(got["cfg"] - t0)
                s["app_first_echo"].append(got["ok"] - t0)
                if not bench.wait_exit(p, 10) or p.returncode != 0:
                    raise BenchError(f"tether attach -- APP: rc={p.returncode}")
            finally:
                REAPER.stop(p)
            d.wait_count("detach", NAME_ATTACH, n_det + 1)
        finally:
            REAPER.del_netns(ns)
        # The same APP with no tether at all (run.py's plain veth netns), Popen to its echo.
        t0 = time.perf_counter()
        p = REAPER.popen(in_ns(self.topo.veth) + [bench.SYS_PY, "-c", FIRST_ECHO, bench.WORLD_IP,
                                                   str(bench.ECHO_PORT)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=CLIENT_ENV, cwd="/")
        try:
            got = read_lines_until(p, {"ok": ("stdout", "ok")}, 20)
            s["app_alone_veth"].append(got["ok"] - t0)
            bench.wait_exit(p, 10)
        finally:
            REAPER.stop(p)

        if self.tether_run is not None:
            s["tether_run_true"].append(self.tether_run.startup_once())

    def _daemon_steps(self, ns: str) -> dict[str, float]:
        import asyncio
        from tether.daemon import plan
        from tether.daemon.enter import run_in_netns
        from tether.daemon.supervisor import _die_with_parent
        from tether.net.rtnl import Rtnl
        from tether.ns import netsetup
        cfg, pc = self.cfg, time.perf_counter
        out = {}
        t0 = pc()
        with Rtnl() as rtnl:
            policy = plan.build_container_policy(cfg, rtnl.addresses())
        make = plan.ruleset_for(cfg, policy)
        job_plan = plan.net_plan(cfg)
        out["step_policy"] = pc() - t0

        def configure():
            named = netsetup.configure(job_plan, lambda port: make(port).script, replace=True)
            return {"fds": [name for name, _ in named]}, [netsetup.detach(item) for _, item in named]

        async def timed(job):
            t = pc()
            res = await run_in_netns(nsfd, job)
            return pc() - t, res

        nsfd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        fds: list[int] = []
        try:
            out["step_helper"], (_, fds) = asyncio.run(timed(configure))
            t0 = pc()
            proc = subprocess.Popen([self.py, "-c", "pass"], stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
                                    close_fds=True, pass_fds=fds)
            out["step_popen_worker"] = pc() - t0
            proc.wait(10)
        finally:
            for fd in fds:
                os.close(fd)
            try:
                out["step_helper_teardown"], (msg, _) = asyncio.run(
                    timed(lambda: ({"problems": netsetup.unconfigure(job_plan)}, [])))
                if msg.get("problems"):
                    raise BenchError(f"replica teardown: {msg['problems']}")
            finally:
                os.close(nsfd)
        return out

    def profile_imports(self) -> None:
        """One `python -X importtime` of the client (refused at once: no daemon behind the socket):
        the modules that cost the most, cumulative µs, nesting depth <= 2."""
        ns = self.fresh_ns()
        try:
            r = bench.run(["ip", "netns", "exec", ns, self.py, "-X", "importtime", self.tether[0], *self.tether[1:],
                           "attach", "--socket", str(self.daemon.runtime_dir / "no-such-container.sock")],
                          timeout=30, env=CLIENT_ENV)
        finally:
            REAPER.del_netns(ns)
        rows = []
        for line in r.stderr.splitlines():
            if not line.startswith("import time:") or "|" not in line:
                continue
            try:
                self_us, cum_us, name = line[len("import time:"):].split("|", 2)
                depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
                rows.append({"module": name.strip(), "depth": depth, "self_us": int(self_us), "cum_us": int(cum_us)})
            except ValueError:
                continue
        self.importtime = [x for x in rows if x["depth"] <= 2 and x["cum_us"] >= 1000]

    def _record_session_events(self, s: dict, prefix: str, peer_pid: int, wall0: float) -> None:
        """PREFIX_to_engine_start and PREFIX_to_attach_event: seconds from wall0 (the wall clock
        when the client started) to the daemon's events for that client's session."""
        es, ea = self._session_events(NAME_ATTACH, peer_pid)
        if es and ea:
            s[f"{prefix}_to_engine_start"].append(ts_epoch(es["ts"]) - wall0)
            s[f"{prefix}_to_attach_event"].append(ts_epoch(ea["ts"]) - wall0)

    def _session_events(self, name: str, peer_pid: int) -> tuple[dict | None, dict | None]:
        """The last session's engine-start and attach events (the attach one names peer_pid)."""
        ev = self.daemon.events()
        ia = next((i for i in range(len(ev) - 1, -1, -1) if ev[i].get("event") == "attach"
                   and ev[i].get("sandbox") == name and ev[i].get("peer_pid") == peer_pid), None)
        if ia is None:
            return None, None
        es = next((ev[i] for i in range(ia, -1, -1) if ev[i].get("event") == "engine-start"
                   and ev[i].get("sandbox") == name), None)
        return es, ev[ia]

    def result(self) -> dict:
        out: dict = {k: summary(v) for k, v in self.s.items()}
        med = {k: (v.get("p50_ms") if v.get("n") else None) for k, v in out.items()}
        cfg = med["attach_configured"]
        need = ("attach_configured", "netns_exec_true", "python_pass", "tether_version", "attach_refused",
                "inproc_attach")
        parts = daemon_parts = None
        if all(med[k] is not None for k in need):
            parts = {"ip netns exec + exec": med["netns_exec_true"],
                     "python start-up": med["python_pass"] - med["netns_exec_true"],
                     "click + tether.cli imports": med["tether_version"] - med["python_pass"],
                     "tether.daemon.client imports (+ a refused connect)": med["attach_refused"] - med["tether_version"],
                     "daemon round trip (in-process client)": med["inproc_attach"]}
            # The baselines are timed to their exit, interpreter shutdown included, while "configured"
            # is a line printed before it: so the rest may come out slightly negative.
            parts["rest (baselines include interpreter exit)"] = cfg - sum(parts.values())
        if all(med[k] is not None for k in ("inproc_attach", "step_policy", "step_helper", "step_popen_worker")):
            daemon_parts = {"policy (netlink addresses + rules)": med["step_policy"],
                            "netns helper: fork + setns + configure + fds back": med["step_helper"],
                            "engine worker Popen (fork + exec)": med["step_popen_worker"]}
            daemon_parts["rest: protocol, hello, checks, event loop"] = med["inproc_attach"] - sum(daemon_parts.values())
        out["breakdown_p50_ms"] = parts
        out["daemon_breakdown_p50_ms"] = daemon_parts
        out["client_fixed_cost_p50_ms"] = med["attach_refused"]
        out["daemon_share_by_subtraction_ms"] = {
            "configured - tether --version": cfg - med["tether_version"] if cfg and med["tether_version"] else None,
            "configured - refused attach": cfg - med["attach_refused"] if cfg and med["attach_refused"] else None}
        out["sigterm_before_handler"] = self.sigterm_early
        out["client_importtime_top"] = self.importtime
        out["errors"] = self.errors
        out["what"] = {
            "attach_configured": "Popen of `ip netns exec NS tether attach --socket S` -> its 'network configured' "
                                 "line on stderr (fresh plain netns each time)",
            "attach_exit": "the same, until it exited after SIGTERM",
            "netns_exec_true": "ip netns exec NS true (Popen -> exit)",
            "python_pass": "ip netns exec NS VENV/python -c pass",
            "import_asyncio": "ip netns exec NS VENV/python -c 'import asyncio'",
            "tether_version": "ip netns exec NS tether --version (python + click + tether.cli)",
            "attach_refused": "ip netns exec NS tether attach --socket NOSUCH: the whole client without a daemon "
                              "(every import of the attach path, connect fails with ENOENT, exit 1)",
            "worker_imports": "ip netns exec NS VENV/python importing tether.daemon.worker, tether.runner, "
                              "tether.engine.proxy.engine, uvloop (what an engine worker loads before it serves)",
            "inproc_attach": "this script as the client: request_attach() (connect, hello, attach with netns fd + "
                             "pidfd) until the 'configured' event; fresh netns",
            "inproc_to_engine_start": "from that request's start to the daemon's engine-start event (log ts, ms)",
            "inproc_to_attach_event": "from that request's start to the daemon's attach event (log ts, ms)",
            "cli_popen_to_engine_start": "Popen of tether attach -> the daemon's engine-start event (log ts, ms)",
            "cli_popen_to_attach_event": "Popen of tether attach -> the daemon's attach event (log ts, ms)",
            "step_policy": "replica in this process: Rtnl().addresses() + plan.build_container_policy()",
            "step_helper": "replica: tether.daemon.enter.run_in_netns(configure) - fork, setns, netsetup.configure "
                           "(tun, addresses, routes, rules, capture sockets, nft ruleset, NFLOG), fds back",
            "step_popen_worker": "replica: subprocess.Popen(python -c pass, preexec_fn=_die_with_parent, "
                                 "pass_fds=the session's fds) until it returns (the child has exec'd)",
            "step_helper_teardown": "replica: run_in_netns(unconfigure) after the fds are closed",
            "configure": "netsetup.configure() of the same plan in a fresh interpreter in a fresh netns (no fork, "
                         "no fd passing)",
            "unconfigure": "netsetup.unconfigure() after it",
            "app_configured": "tether attach -- APP: Popen -> 'network configured'",
            "app_first_echo": "tether attach -- APP: Popen -> APP's first 1-byte echo through the engine "
                              "(/usr/bin/python3, connect to 203.0.113.10:9007)",
            "app_alone_veth": "the same APP in run.py's plain veth netns, no tether: Popen -> echo",
            "tether_run_true": "tether run -- true as the rootless user (context; as run.py's start-up)",
        }
        return out


# --- OCI hook -------------------------------------------------------------------------------------

def usr_bundle(tmp: Path, cid: str, args: list[str], hooks: dict | None) -> oci_bundle.Bundle:
    """A rootful runc busybox bundle with the host's /usr bound read-only (and /lib, /lib64 as
    the host's merged-usr symlinks), so /usr/bin/iperf3 and /usr/bin/python3 run inside."""
    b = oci_bundle.build_bundle(tmp, "runc", cid, args, hooks=hooks, extra_binds=[("/usr", "/usr")])
    CLEANUP.bundles.append(b)
    cfg = b.config()
    for m in cfg["mounts"]:
        if m["destination"] == "/usr":
            m["options"] = ["rbind", "ro", "nosuid", "nodev"]
    b.config_path.write_text(json.dumps(cfg, indent=2) + "\n")
    for link in ("lib", "lib64"):
        target = os.readlink(f"/{link}") if os.path.islink(f"/{link}") else None
        if target and not target.startswith("/"):
            (b.rootfs / link).symlink_to(target)
        elif os.path.isdir(f"/{link}"):
            raise BenchError(f"/{link} is not a merged-usr symlink here; bind it too")
    return b


def tether_hook(tether: list[str], daemon: Daemon, name: str) -> dict:
    return {"path": tether[0], "args": [os.path.basename(tether[0]), *tether[1:], "oci-hook", "--name", name,
                                        "--runtime-dir", str(daemon.runtime_dir)], "timeout": 30}


def runc_run(b: oci_bundle.Bundle, timeout: float = 30) -> float:
    """Seconds of `runc run -d` (create, hooks, start) alone, as oci_bundle.run_detached runs it but
    without its `runc state` afterwards."""
    argv = oci_bundle._argv(b, "run", "-d", "--bundle", str(b.path), b.container_id, creates=True)
    with open(b.log_path, "ab") as out:
        t0 = time.perf_counter()
        try:
            rc = oci_bundle._run(b, argv, timeout, stdin=subprocess.DEVNULL, stdout=out, stderr=out).returncode
        except subprocess.TimeoutExpired:
            rc = None
        t = time.perf_counter() - t0
    if rc != 0:
        tail = b.log_path.read_text(errors="replace").strip()[-400:]
        oci_bundle.delete(b, force=True)
        raise BenchError(f"runc run -d {b.container_id}: rc={rc}: {tail}")
    return t


def hook_alone(tether: list[str], daemon: Daemon, bid: str, i: int, work: Path) -> float:
    """`tether oci-hook` by itself, as runc would run it on createRuntime: the OCI state of a process
    in a fresh netns (status "creating") on stdin; Popen -> exit 0.  Then that process exits and
    the session (lifetime "process") ends."""
    ns = f"tether-bench-o{i}-{bid}"
    REAPER.add_netns(ns)
    sleeper = None
    try:
        sleeper = REAPER.popen(in_ns(ns) + ["sleep", "600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):         # nsenter execs sleep (same pid) once it has joined the netns
            try:
                if os.stat(f"/proc/{sleeper.pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns}").st_ino:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.005)
        else:
            raise BenchError("the hook's stand-in process did not enter its netns")
        state = work / "state.json"
        state.write_text(json.dumps({"ociVersion": "1.0.2", "id": f"tbench-{bid}-alone", "status": "creating",
                                     "pid": sleeper.pid, "bundle": str(work)}))
        n_att, n_det = daemon.count("attach", NAME_OCI), daemon.count("detach", NAME_OCI)
        with open(state, "rb") as stdin:
            t0 = time.perf_counter()
            p = REAPER.popen(tether + ["oci-hook", "--name", NAME_OCI, "--runtime-dir", str(daemon.runtime_dir)],
                             stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=CLIENT_ENV, cwd="/")
        try:
            if not bench.wait_exit(p, 30):
                raise BenchError("tether oci-hook still running after 30 s")
            t = time.perf_counter() - t0
            if p.returncode != 0:
                raise BenchError(f"tether oci-hook rc={p.returncode}: {p.stderr.read().decode()[-300:]}")
        finally:
            REAPER.stop(p)
        daemon.wait_count("attach", NAME_OCI, n_att + 1, 5)
        REAPER.stop(sleeper)
        sleeper = None
        daemon.wait_count("detach", NAME_OCI, n_det + 1)
        return t
    finally:
        if sleeper is not None:
            REAPER.stop(sleeper)
        REAPER.del_netns(ns)


def bench_oci(tmp: Path, tether: list[str], daemon: Daemon, bid: str, n: int, warm: int) -> dict:
    # First the hook by itself, so that a `sleep` hook of the same length can show what runc adds.
    alone: list[float] = []
    errors: list[str] = []
    for i in range(warm + n):
        try:
            t = hook_alone(tether, daemon, bid, i, tmp)
            if i >= warm:
                alone.append(t)
        except (*ERRS, oci_bundle.OCIError) as e:
            errors.append(f"hook alone #{i}: {e}")
            log(f"oci hook alone #{i} failed: {e}")
    sleep_s = statistics.median(alone) if alone else 0.09
    variants = {
        "none": None,
        "noop_hook": {"createRuntime": [{"path": "/bin/true", "args": ["true"], "timeout": 30}]},
        "sleep_hook": {"createRuntime": [{"path": "/bin/sleep", "args": ["sleep", f"{sleep_s:.3f}"], "timeout": 30}]},
        "tether_hook": {"createRuntime": [tether_hook(tether, daemon, NAME_OCI)],
                        "poststop": [tether_hook(tether, daemon, NAME_OCI)]},
    }
    bundles = {k: oci_bundle.build_bundle(tmp, "runc", f"tbench-{bid}-{k.replace('_', '-')}", ["sleep", "600"],
                                          hooks=h) for k, h in variants.items()}
    CLEANUP.bundles.extend(bundles.values())
    samples: dict[str, list[float]] = {k: [] for k in variants}
    keys = list(variants)
    for i in range(warm + n):
        order = keys[i % len(keys):] + keys[:i % len(keys)]     # rotate, so no variant always goes first
        for k in order:
            b = bundles[k]
            try:
                n_att, n_det = daemon.count("attach", NAME_OCI), daemon.count("detach", NAME_OCI)
                t = runc_run(b)
                if k == "tether_hook":
                    daemon.wait_count("attach", NAME_OCI, n_att + 1, 5)   # the hook did attach
                oci_bundle.delete(b, force=True)
                if k == "tether_hook":
                    daemon.wait_count("detach", NAME_OCI, n_det + 1)
                if i >= warm:
                    samples[k].append(t)
            except (*ERRS, oci_bundle.OCIError) as e:
                errors.append(f"{k} #{i}: {e}")
                log(f"oci {k} #{i} failed: {e}")
                oci_bundle.delete(b, force=True)
    out = {k: summary(v) for k, v in samples.items()}
    out["hook_alone"] = summary(alone)
    out["sleep_hook_seconds"] = round(sleep_s, 3)
    med = {k: out[k].get("p50_ms") for k in [*keys, "hook_alone"]}

    def diff(a, b):
        return med[a] - med[b] if med[a] is not None and med[b] is not None else None
    out["hook_cost_p50_ms"] = diff("tether_hook", "none")
    out["tether_over_noop_p50_ms"] = diff("tether_hook", "noop_hook")
    out["tether_over_sleep_p50_ms"] = diff("tether_hook", "sleep_hook")
    out["errors"] = errors
    out["what"] = {"none": "runc run -d (busybox sleep, new netns), no hooks",
                   "noop_hook": "the same with a createRuntime hook /bin/true (runc's cost of running any hook)",
                   "sleep_hook": "the same with a createRuntime hook /bin/sleep S, S = the median of hook_alone: "
                                 "what runc makes of a hook that takes as long as tether's",
                   "tether_hook": "the same with tether oci-hook on createRuntime (attach, lifetime process) "
                                  "and poststop (detach)",
                   "hook_alone": "tether oci-hook run by this script with a synthetic OCI state (status creating, "
                                 "pid of a sleep in a fresh netns) on stdin: Popen -> exit 0"}
    return out


# --- throughput contenders ------------------------------------------------------------------------

class RuncBox(bench.Contender):
    """A runc busybox container (the host's /usr inside, read-only); argv runs via `runc exec`."""

    def __init__(self, topo, user, args, key: str, label: str, bundle: oci_bundle.Bundle) -> None:
        super().__init__(topo, user, args)
        self.key, self.label, self.bundle = key, label, bundle
        self.pid: int | None = None

    def start(self) -> None:
        runc_run(self.bundle)
        st = oci_bundle.state(self.bundle)
        if not st or st.get("status") != "running":
            raise BenchError(f"container {self.bundle.container_id} not running: {st}")
        self.pid = int(st["pid"])

    def wrap(self, argv, extra=()):
        return oci_bundle._argv(self.bundle, "exec", self.bundle.container_id, *argv)

    def env(self):
        return oci_bundle._env(self.bundle)

    def check_alive(self) -> None:
        if self.pid is None or oci_bundle._pid_gone(self.pid):
            raise BenchError(f"container {self.bundle.container_id} is gone")

    def teardown(self) -> None:
        oci_bundle.delete(self.bundle, force=True)

    def describe(self) -> str:
        return f"runc exec {self.bundle.container_id} CMD"


class RuncDaemon(RuncBox):
    def __init__(self, *a, daemon: Daemon) -> None:
        super().__init__(*a)
        self.daemon = daemon

    def start(self) -> None:
        n = self.daemon.count("attach", NAME_TPUT)
        super().start()
        self.daemon.wait_count("attach", NAME_TPUT, n + 1, 5)

    def check_alive(self) -> None:
        super().check_alive()
        self.daemon.check_alive()


class RuncVeth(RuncBox):
    def start(self) -> None:
        super().start()
        host, pid = self.topo.host, self.pid
        hv = f"tbr-{self.topo.id}"
        # One end moved into the container's netns at creation; the host netns (ours, with
        # ip_forward=1 set by run.py's Topology) routes; the world routes 198.51.100.0/24 back.
        sh(["ip", "-n", host, "-b", "-"], input="\n".join([
            f"link add {hv} type veth peer name eth0 netns {pid}",
            f"addr add {RUNC_GW}/30 dev {hv}", f"link set {hv} up", ""]))
        sh(["nsenter", f"--net=/proc/{pid}/ns/net", "--", "ip", "-b", "-"], input="\n".join([
            f"addr add {RUNC_IP}/30 dev eth0", "link set eth0 up", f"route add default via {RUNC_GW}", ""]))


# --- results ---------------------------------------------------------------------------------------

def ratios(res: dict) -> tuple[dict, list[dict]]:
    C = res.get("throughput", {}).get("contenders", {})

    def g(k, d):
        return ((C.get(k) or {}).get("throughput", {}).get(d) or {}).get("gbps_median")

    r, targets = {}, []
    for d in ("up", "down"):
        dm, rv, tr, pv = g("runc-daemon", d), g("runc-veth", d), g("tether-run", d), g("veth", d)
        r[d] = {"daemon_vs_runc_veth": dm / rv if dm and rv else None,
                "tether_run_vs_runc_veth": tr / rv if tr and rv else None,
                "daemon_vs_tether_run": dm / tr if dm and tr else None,
                "runc_veth_vs_plain_veth": rv / pv if rv and pv else None}
        x = r[d]["daemon_vs_runc_veth"]
        targets.append({"target": f"runc + daemon {'container→world' if d == 'up' else 'world→container'} "
                                  f"≥ {TARGET_VS_VETH:g}× runc + veth",
                        "measured": f"{x:.3f}× ({dm:.2f} / {rv:.2f} Gbit/s)" if x else "n/a",
                        "verdict": "N/A" if x is None else ("PASS" if x >= TARGET_VS_VETH else "MISS")})
    a = (res.get("attach") or {}).get("attach_configured") or {}
    if a.get("n"):
        targets.insert(0, {"target": f"tether attach → configured ≤ {TARGET_ATTACH_MS:g} ms (p50)",
                           "measured": f"{a['p50_ms']:.0f} ms p50, {a['p95_ms']:.0f} ms p95, {a['max_ms']:.0f} ms max",
                           "verdict": "PASS" if a["p50_ms"] <= TARGET_ATTACH_MS else "MISS"})
    else:
        targets.insert(0, {"target": f"tether attach → configured ≤ {TARGET_ATTACH_MS:g} ms (p50)",
                           "measured": "n/a", "verdict": "N/A"})
    return r, targets


def docs_block(res: dict, json_name: str, png_name: str) -> str:
    m, p = res["machine"], res["params"]
    L = []
    kind = "**quick smoke run** (not representative): " if res["quick"] else ""
    L.append(f"Run {res['timestamp']} — {kind}{p['attach_count']} attaches, {p['oci_count']} `runc run -d` per "
             f"variant, iperf3 TCP {p['duration']} s × {p['repeats']} per direction (median), "
             f"{p['latency_count']} connections; Linux {m['kernel']}, {m['cpu_count']} CPUs ({m['cpu_model']}); "
             f"{m.get('runc') or 'runc ?'}; `tether run` as `{p['as_user']}`. Raw numbers: `{json_name}`.")
    cont = res.get("contention") or {}
    if (cont.get("mean_pct") or 0) > 5 or any(v > 10 for v in (cont.get("by_phase_mean_pct") or {}).values()):
        top = ", ".join(f"{t['comm']} {t['cpu_s']} s" for t in cont.get("top", []))
        L.append("")
        L.append(f"**contended run**: other processes used {cont.get('mean_pct')} % of the CPUs on average "
                 f"(by phase: {cont.get('by_phase_mean_pct')}; busiest: {top}).")
    a = res.get("attach") or {}
    if a:
        L.append("")
        L.append("| attach: what | p50 ms | p95 ms | max ms |")
        L.append("|---|---:|---:|---:|")
        rows = [("attach_configured", "**`tether attach` → \"network configured\"** (Popen to the line)"),
                ("netns_exec_true", "`ip netns exec NS true`"),
                ("python_pass", "`ip netns exec NS python -c pass` (the venv's interpreter)"),
                ("tether_version", "`ip netns exec NS tether --version`"),
                ("attach_refused", "`ip netns exec NS tether attach --socket NOSUCH` (the client alone, refused)"),
                ("inproc_attach", "daemon round trip: in-process client, connect → configured"),
                ("inproc_to_engine_start", "… request → daemon's `engine-start` (log, ms resolution)"),
                ("step_helper", "… the netns helper replayed here (fork, setns, configure, fds back)"),
                ("configure", "… netns configuration alone (`netsetup.configure`, fresh interpreter)"),
                ("step_helper_teardown", "teardown helper after a detach (replayed; not on the attach path)"),
                ("worker_imports", "an engine worker's imports (`python -c 'import …'`)"),
                ("app_first_echo", "`tether attach -- APP` → APP's first echo through the engine"),
                ("app_alone_veth", "the same APP, no tether (plain veth netns)"),
                ("tether_run_true", "`tether run -- true` (context)")]
        for k, label in rows:
            v = a.get(k) or {}
            if v.get("n"):
                L.append(f"| {label} | {v['p50_ms']:.1f} | {v['p95_ms']:.1f} | {v['max_ms']:.1f} |")
        bd, dbd = a.get("breakdown_p50_ms"), a.get("daemon_breakdown_p50_ms")
        sub = a.get("daemon_share_by_subtraction_ms") or {}
        if bd:
            L.append("")
            L.append("Where the p50 goes (differences of the medians above): "
                     + "; ".join(f"{k} {v:.1f} ms" for k, v in bd.items()) + ".")
        if dbd:
            L.append("")
            L.append("Inside the daemon's round trip (its steps replayed in the benchmark process with tether's "
                     "own functions, medians): " + "; ".join(f"{k} {v:.1f} ms" for k, v in dbd.items()) + ".")
        cp = {k.split(".", 1)[1]: v["p50_ms"] for k, v in a.items() if k.startswith("configure.")
              and isinstance(v, dict) and v.get("n")}
        up = {k.split(".", 1)[1]: v["p50_ms"] for k, v in a.items() if k.startswith("unconfigure.")
              and isinstance(v, dict) and v.get("n")}
        if cp:
            L.append("")
            L.append("The netns configuration alone, by part (medians): " + "; ".join(
                f"{k.replace('_', ' ')} {v:.1f} ms" for k, v in cp.items())
                + (". Its teardown (after a detach): " + "; ".join(f"{k.replace('_', ' ')} {v:.1f} ms"
                                                                   for k, v in up.items()) if up else "") + ".")
        L.append("")
        L.append(f"Daemon share by subtraction: configured − `tether --version` = "
                 f"{fmt(sub.get('configured - tether --version'), '.1f')} ms; configured − refused attach = "
                 f"{fmt(sub.get('configured - refused attach'), '.1f')} ms.")
    o = res.get("oci") or {}
    if o:
        L.append("")
        L.append("| `runc run -d` (busybox, new netns) | p50 ms | p95 ms | max ms |")
        L.append("|---|---:|---:|---:|")
        for k, label in (("none", "no hooks"), ("noop_hook", "createRuntime hook `/bin/true`"),
                         ("sleep_hook", f"createRuntime hook `/bin/sleep {o.get('sleep_hook_seconds')}` "
                                        "(as long as tether's hook alone)"),
                         ("tether_hook", "`tether oci-hook` (createRuntime + poststop)"),
                         ("hook_alone", "`tether oci-hook` alone (synthetic state on stdin, Popen → exit)")):
            v = o.get(k) or {}
            if v.get("n"):
                L.append(f"| {label} | {v['p50_ms']:.1f} | {v['p95_ms']:.1f} | {v['max_ms']:.1f} |")
        L.append("")
        L.append(f"Hook cost (p50 difference): {fmt(o.get('hook_cost_p50_ms'), '.1f')} ms against no hooks, "
                 f"{fmt(o.get('tether_over_noop_p50_ms'), '.1f')} ms against a no-op hook, "
                 f"{fmt(o.get('tether_over_sleep_p50_ms'), '.1f')} ms against a `sleep` hook as long as tether's.")
    t = (res.get("throughput") or {}).get("contenders") or {}
    if t:
        L.append("")
        L.append("| contender | TCP out Gbit/s | TCP in (-R) Gbit/s | out / runc+veth | in / runc+veth "
                 "| connect+echo p50 µs | p99 µs |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        rv = {d: ((t.get("runc-veth") or {}).get("throughput", {}).get(d) or {}).get("gbps_median")
              for d in ("up", "down")}
        for k, c in t.items():
            if c["status"] != "ok":
                L.append(f"| {c['label']} | {c['status']}: {oneline(c.get('note', ''))} | | | | | |")
                continue
            th, la = c.get("throughput", {}), c.get("latency") or {}
            up, dn = (th.get("up") or {}).get("gbps_median"), (th.get("down") or {}).get("gbps_median")
            L.append(f"| {c['label']} | {fmt(up, '.2f')} | {fmt(dn, '.2f')} "
                     f"| {fmt(up / rv['up'] if up and rv['up'] else None, '.2f')}× "
                     f"| {fmt(dn / rv['down'] if dn and rv['down'] else None, '.2f')}× "
                     f"| {fmt(la.get('p50_us'), '.0f')} | {fmt(la.get('p99_us'), '.0f')} |")
    L.append("")
    L.append("| daemon target | measured | result |")
    L.append("|---|---|---|")
    for tg in res.get("targets", []):
        L.append(f"| {tg['target']} | {tg['measured']} | {tg['verdict']} |")
    L.append("")
    L.append(f"![daemon benchmark chart](../{png_name})")
    return "\n".join(L)


def update_docs(block: str) -> bool:
    """Rewrite only what lies between the daemon markers (run.py's block is left alone)."""
    text = DOCS.read_text()
    start, end = f"\n{DOCS_START}\n", f"\n{DOCS_END}"     # the markers on lines of their own
    if start not in text or end not in text or text.index(start) > text.index(end):
        log(f"{DOCS} has no {DOCS_START} ... {DOCS_END} lines; not updated")
        return False
    a = text.index(start) + len(start)
    b = text.index(end, a - 1)
    DOCS.write_text(text[:a] + block + text[b:])
    return True


def plot(res: dict, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not available ({e}); no chart written"
    fig, axs2 = plt.subplots(2, 3, figsize=(18, 10.5))
    axs = [a for row in axs2 for a in row]
    a, o = res.get("attach") or {}, res.get("oci") or {}
    T = (res.get("throughput") or {}).get("contenders") or {}

    def bars(ax, keys_labels, src, fields=(("p50_ms", "p50"), ("p95_ms", "p95"), ("max_ms", "max")), unit="ms",
             f=".0f"):
        keys = [k for k, _ in keys_labels if (src.get(k) or {}).get("n")]
        labels = [lab for k, lab in keys_labels if (src.get(k) or {}).get("n")]
        w = 0.8 / len(fields)
        for i, (fk, fl) in enumerate(fields):
            xs = [x + (i - (len(fields) - 1) / 2) * w for x in range(len(keys))]
            vals = [src[k][fk] for k in keys]
            bs = ax.bar(xs, vals, w, label=fl)
            for bar, v in zip(bs, vals):
                ax.annotate(format(v, f), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=6)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel(unit)
        ax.legend(fontsize=7)

    ax = axs[0]
    if a:
        bars(ax, [("attach_configured", "tether attach\n→ configured"), ("tether_version", "tether\n--version"),
                  ("attach_refused", "tether attach\n(no daemon)"), ("python_pass", "python\n-c pass"),
                  ("netns_exec_true", "ip netns\nexec true"), ("inproc_attach", "daemon round\ntrip (in-proc)"),
                  ("configure", "netns\nconfigure"), ("tether_run_true", "tether run\n-- true")], a)
        ax.axhline(TARGET_ATTACH_MS, color="red", ls="--", lw=1, label=f"target {TARGET_ATTACH_MS:g} ms")
        ax.legend(fontsize=7)
    ax.set_title("attach latency and its parts (Popen → event; lower is better)", fontsize=9)

    ax = axs[1]
    bd = a.get("breakdown_p50_ms")
    if bd:
        bottom = 0.0
        for (k, v), col in zip(bd.items(), ("tab:gray", "tab:blue", "tab:cyan", "tab:green", "tab:orange",
                                            "tab:purple")):
            ax.bar([0], [max(v, 0)], 0.5, bottom=bottom, color=col, label=f"{k}: {v:.1f} ms")
            bottom += max(v, 0)
        dbd = a.get("daemon_breakdown_p50_ms") or {}
        bottom = 0.0
        for (k, v), col in zip(dbd.items(), ("tab:olive", "tab:red", "tab:pink", "tab:brown")):
            ax.bar([1], [max(v, 0)], 0.5, bottom=bottom, color=col, label=f"daemon: {k}: {v:.1f} ms")
            bottom += max(v, 0)
        ax.axhline(TARGET_ATTACH_MS, color="red", ls="--", lw=1, label=f"target {TARGET_ATTACH_MS:g} ms")
        ax.set_xlim(-0.6, 3.6)
        ax.set_xticks([0, 1])
        ax.set_xticklabels(["tether attach\n→ configured", "daemon\nround trip"], fontsize=8)
        ax.set_ylabel("ms")
        ax.legend(fontsize=7, loc="upper right")
    ax.set_title("where the attach time goes (medians)", fontsize=9)

    ax = axs[2]
    if o:
        bars(ax, [("none", "runc run -d\nno hooks"), ("noop_hook", "+ hook\n/bin/true"),
                  ("sleep_hook", f"+ hook\nsleep {o.get('sleep_hook_seconds')}"),
                  ("tether_hook", "+ tether\noci-hook"), ("hook_alone", "tether oci-hook\nalone")], o)
    ax.set_title(f"OCI: runc run -d (hook cost p50 {fmt(o.get('hook_cost_p50_ms'), '.0f')} ms)", fontsize=9)

    ax = axs[3]
    if a:
        bars(ax, [("app_first_echo", "tether attach -- APP\n→ first echo"),
                  ("app_configured", "… → configured"), ("app_alone_veth", "APP alone\n(veth netns)"),
                  ("worker_imports", "engine worker\nimports")], a)
    ax.set_title("first connection of an attached app (lower is better)", fontsize=9)

    ok = [(k, c) for k, c in T.items() if c.get("status") == "ok"]
    ax = axs[4]
    if ok:
        labels = [c["label"].replace(" (", "\n(") for _, c in ok]
        rv = {d: ((T.get("runc-veth") or {}).get("throughput", {}).get(d) or {}).get("gbps_median") for d in ("up", "down")}
        for i, (d, name) in enumerate((("up", "container→world"), ("down", "world→container (-R)"))):
            xs = [x + (i - 0.5) * 0.4 for x in range(len(ok))]
            vals = [((c.get("throughput") or {}).get(d) or {}).get("gbps_median") for _, c in ok]
            bs = ax.bar(xs, [v or 0 for v in vals], 0.4, label=name)
            for bar, v in zip(bs, vals):
                t = "n/a" if v is None else f"{v:.2f}" + (f"\n{v / rv[d]:.2f}×" if rv[d] else "")
                ax.annotate(t, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                            fontsize=7)
        ax.set_xticks(range(len(ok)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("Gbit/s")
        top = max([v for _, c in ok for v in (((c.get("throughput") or {}).get(d) or {}).get("gbps_median")
                                                for d in ("up", "down")) if v] or [1])
        ax.set_ylim(0, top * 1.4)
        for d, col in (("up", "tab:blue"), ("down", "tab:orange")):
            if rv[d]:
                ax.axhline(rv[d] * TARGET_VS_VETH, color=col, ls="--", lw=1,
                           label=f"target {TARGET_VS_VETH:g}× runc+veth ({d})")
        ax.legend(fontsize=7, loc="upper center", ncol=2)
    ax.set_title("iperf3 TCP throughput (× = ratio to runc + veth; higher is better)", fontsize=9)

    ax = axs[5]
    if ok:
        la = [(c.get("latency") or {}) for _, c in ok]
        w = 0.4
        for i, (fk, fl) in enumerate((("p50_us", "p50"), ("p99_us", "p99"))):
            xs = [x + (i - 0.5) * w for x in range(len(ok))]
            vals = [v.get(fk) for v in la]
            bs = ax.bar(xs, [v or 0 for v in vals], w, label=fl)
            for bar, v in zip(bs, vals):
                ax.annotate(fmt(v, ".0f", "n/a"), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(ok)))
        ax.set_xticklabels([c["label"].replace(" (", "\n(") for _, c in ok], fontsize=7)
        ax.set_ylabel("µs")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.set_title("connect + 1-byte echo + close (context; log scale, lower is better)", fontsize=9)
    m = res["machine"]
    fig.suptitle(f"tether daemon mode {res['timestamp']}{' (QUICK smoke run)' if res['quick'] else ''} — "
                 f"Linux {m['kernel']}, {m['cpu_count']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --- main ------------------------------------------------------------------------------------------

MEASURES = ["attach", "oci", "tput"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Must run as root. Method and results: docs/benchmarks.md, 'Daemon mode'.")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 5 attaches, 3 runc runs per variant, 2 s iperf3, 1 run, 200 connections")
    ap.add_argument("--attach-count", type=int, help="attaches measured (and each part as often) [30; quick 5]")
    ap.add_argument("--attach-warmup", type=int, help="attach rounds made first and not counted [2; quick 1]")
    ap.add_argument("--oci-count", type=int, help="runc run -d per variant [10; quick 3]")
    ap.add_argument("--duration", type=int, help="iperf3 seconds per run [10; quick 2]")
    ap.add_argument("--omit", type=int, help="iperf3 -O warm-up seconds [1; quick 0]")
    ap.add_argument("--repeats", type=int, help="iperf3 runs per contender and direction (median) [3; quick 1]")
    ap.add_argument("--latency-count", type=int, help="connect+echo connections measured [1000; quick 200]")
    ap.add_argument("--latency-warmup", type=int, default=20)
    ap.add_argument("--measure", default=",".join(MEASURES), help="subset of " + ",".join(MEASURES) + " [all]")
    ap.add_argument("--tether", default=DEFAULT_TETHER, help=f"tether command [{DEFAULT_TETHER}]")
    ap.add_argument("--as-user", default="nobody", help="who runs `tether run` (context row) [nobody]")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory [benchmarks/results]")
    ap.add_argument("--no-publish", action="store_true",
                    help="do not rewrite the daemon block of docs/benchmarks.md (quick runs never do)")
    a = ap.parse_args(argv)
    for name, full, quick in (("attach_count", 30, 5), ("attach_warmup", 2, 1), ("oci_count", 10, 3),
                              ("duration", 10, 2), ("omit", 1, 0), ("repeats", 3, 1), ("latency_count", 1000, 200)):
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else full)
    a.measures = {s.strip() for s in a.measure.split(",") if s.strip()}
    if a.measures - set(MEASURES):
        ap.error(f"unknown measure(s) {sorted(a.measures - set(MEASURES))}")
    if not (1 <= a.attach_count <= 1000 and 0 <= a.attach_warmup <= 20 and 1 <= a.oci_count <= 200
            and 1 <= a.duration <= 600 and 0 <= a.omit <= 60 and 1 <= a.repeats <= 20 and 1 <= a.latency_count <= 100000):
        ap.error("a count or duration is out of range")
    a.tether_arg = []           # what run.py's Tether contender expects
    return a


def on_signal(signum, frame):
    raise SystemExit(128 + signum)


def package_digest() -> dict:
    """Which tether was measured: the installed package's path and a digest of its sources."""
    try:
        import tether
        root = Path(tether.__file__).parent
        h = hashlib.sha256()
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
        return {"path": str(root), "sha256_py": h.hexdigest()[:16], "version": getattr(tether, "__version__", None)}
    except Exception as e:   # informational only
        return {"error": repr(e)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("benchmarks/daemon.py must run as root (namespaces, veths, runc).", file=sys.stderr)
        return 2
    tether = args.tether.split()
    if not os.path.isabs(tether[0]) or not os.access(tether[0], os.X_OK):
        print(f"tether command must be an absolute executable path: {args.tether}", file=sys.stderr)
        return 2
    missing = [t for t in ("ip", "nsenter", "iperf3", "runc", bench.SYS_PY, "/bin/busybox") if not shutil.which(t)
               and not os.path.exists(t)]
    if missing:
        print(f"missing: {', '.join(missing)}", file=sys.stderr)
        return 2
    venv_python = str(Path(tether[0]).parent / "python")
    user = bench.RunAs(args.as_user)

    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, on_signal)
    atexit.register(CLEANUP.run)

    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    machine = bench.machine_info(tether)
    machine["runc"] = bench.first_line(["runc", "--version"])
    machine["tether_package"] = package_digest()
    res = {"schema": 1, "kind": "daemon", "timestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "quick": args.quick,
           "params": {"attach_count": args.attach_count, "attach_warmup": args.attach_warmup,
                      "oci_count": args.oci_count, "duration": args.duration, "omit": args.omit,
                      "repeats": args.repeats, "latency_count": args.latency_count,
                      "latency_warmup": args.latency_warmup, "as_user": args.as_user, "tether": tether,
                      "measures": [m for m in MEASURES if m in args.measures], "daemon_config": DAEMON_CONFIG},
           "machine": machine,
           "topology": {"world_server": bench.WORLD_IP, "daemon_netns": f"{bench.HOST_IP}/24 via veth to the world",
                        "runc_veth": f"{RUNC_IP}/30 via {RUNC_GW} in the host netns (routed, no NAT)",
                        "plain_veth": f"{bench.VETH_SBX}/25 (run.py's veth netns)", "link_mtu": 1500,
                        "daemon_tun_mtu": 65520}}

    bid = secrets.token_hex(3)
    topo = bench.Topology(bid)
    mon = bench.ContentionMonitor(set() if user.root else {user.uid})
    mon.start()
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="tether-bench-daemon-"))
    work.chmod(0o755)
    CLEANUP.dirs.append(work)
    life = 3600
    try:
        log(f"building topology {topo.host} <-> {topo.world} (+ {topo.veth})")
        topo.build(life)
        daemon = Daemon(tether, topo.host, work)
        CLEANUP.daemon = daemon
        daemon.start()
        log(f"tether serve ready in {topo.host} (runtime dir {daemon.runtime_dir})")
        trun = bench.Tether(topo, user, args, tether)

        if "attach" in args.measures:
            mon.phase = "attach"
            ab = AttachBench(topo, daemon, tether, venv_python, trun if trun.status == "ok" else None)
            for i in range(args.attach_warmup + args.attach_count):
                try:
                    ab.one(record=i >= args.attach_warmup)
                except ERRS as e:
                    ab.errors.append(f"round {i}: {e}")
                    log(f"attach round {i} failed: {e}")
                    if len(ab.errors) > 5:
                        log("attach: too many failures, giving up on this measure")
                        break
                if (i + 1) % 5 == 0:
                    log(f"attach: {i + 1}/{args.attach_warmup + args.attach_count} rounds")
            try:
                ab.profile_imports()
            except ERRS as e:
                ab.errors.append(f"importtime profile: {e}")
            res["attach"] = ab.result()
            a = res["attach"]
            log(f"attach -> configured p50 {fmt(a['attach_configured'].get('p50_ms'), '.1f')} ms, "
                f"p95 {fmt(a['attach_configured'].get('p95_ms'), '.1f')} ms; breakdown {a['breakdown_p50_ms']}")

        if "oci" in args.measures:
            mon.phase = "oci"
            (work / "oci").mkdir()
            res["oci"] = o = bench_oci(work / "oci", tether, daemon, bid, args.oci_count, 1)
            log(f"oci: runc run -d p50 none {fmt(o['none'].get('p50_ms'), '.1f')} ms, no-op hook "
                f"{fmt(o['noop_hook'].get('p50_ms'), '.1f')} ms, tether hook {fmt(o['tether_hook'].get('p50_ms'), '.1f')} ms")

        if "tput" in args.measures:
            mon.phase = "tput-setup"
            (work / "tput").mkdir()
            hooks = {"createRuntime": [tether_hook(tether, daemon, NAME_TPUT)],
                     "poststop": [tether_hook(tether, daemon, NAME_TPUT)]}
            cd = RuncDaemon(topo, user, args, "runc-daemon", "runc + tether serve (OCI hook)",
                            usr_bundle(work / "tput", f"tbench-{bid}-daemon", ["sleep", str(life)], hooks),
                            daemon=daemon)
            cv = RuncVeth(topo, user, args, "runc-veth", "runc + veth (rootful, routed)",
                          usr_bundle(work / "tput", f"tbench-{bid}-veth", ["sleep", str(life)], None))
            pv = bench.Veth(topo, user, args)
            pv.label = "plain veth netns (run.py's veth)"
            trun.label = f"tether run (as {user.name})"
            trun.key = "tether-run"
            contenders = [cd, cv, trun, pv]
            out = {c.key: {"label": c.label, "status": c.status, "note": c.note, "errors": []} for c in contenders}
            res["throughput"] = {"contenders": out}
            for c in contenders:
                if c.status != "ok":
                    continue
                try:
                    if isinstance(c, RuncBox):
                        c.start()
                    bench.probe(c)
                    out[c.key]["command"] = c.describe()
                    log(f"{c.key}: ready ({c.describe()})")
                except (*ERRS, oci_bundle.OCIError) as e:
                    c.status, c.note = "error", str(e)
                    out[c.key].update(status=c.status, note=c.note)
                    log(f"{c.key}: {e}")
                    c.teardown()
            live = [c for c in contenders if c.status == "ok"]
            mon.phase = "tput"
            samples = bench.round_robin(live, ("up", "down"), args.repeats,
                                        lambda c, d: bench.measure_iperf(c, d == "down", args), "iperf3",
                                        {c.key: out[c.key]["errors"] for c in live})
            for c in live:
                out[c.key]["throughput"] = bench.tput_summary(samples[c.key])
            mon.phase = "latency"
            for c in live:
                try:
                    out[c.key]["latency"] = la = bench.measure_latency(c, args)
                    log(f"{c.key}: connect+echo p50 {la['p50_us']:.0f} µs, p99 {la['p99_us']:.0f} µs")
                except ERRS as e:
                    out[c.key]["errors"].append(f"latency: {e}")
                    log(f"{c.key}: latency failed: {e}")
            for c in (cd, cv):
                try:
                    c.teardown()
                except Exception as e:
                    log(f"teardown {c.key}: {e}")
    finally:
        CLEANUP.run()
        mon.stop()
    res["elapsed_s"] = round(time.monotonic() - t_start, 1)
    res["contention"] = mon.result()
    res["machine"]["loadavg_end"] = os.getloadavg()
    res["ratios"], res["targets"] = ratios(res)

    args.out.mkdir(parents=True, exist_ok=True)
    base = f"daemon-{stamp}{'-quick' if args.quick else ''}"
    jpath, ppath = args.out / f"{base}.json", args.out / f"{base}.png"
    jpath.write_text(json.dumps(res, indent=1) + "\n")
    log(f"wrote {jpath}")
    note = plot(res, ppath)
    log(note or f"wrote {ppath}")

    def shown(p: Path) -> str:
        try:
            return str(p.resolve().relative_to(REPO))
        except ValueError:
            return str(p)
    block = docs_block(res, shown(jpath), shown(ppath))
    if not args.quick and not args.no_publish:
        if update_docs(block):
            log(f"updated {DOCS} (daemon block)")
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
