#!/usr/bin/env python3
"""Side-by-side network benchmark: tether vs slirp4netns, pasta and the rootful veth limit.

Builds a private test topology out of network namespaces (nothing here talks to a real network):

    netns tether-bench-host-<id>  --veth-->  netns tether-bench-world-<id>
      192.0.2.1/24, default via 192.0.2.2      192.0.2.2/24, servers on 203.0.113.10 (lo):
      sandboxing tools run here                 iperf3 -s, 1-byte TCP echo, UDP echo;
                                                wildcard DNS server on 203.0.113.53:53

    netns tether-bench-veth-<id>  --veth-->  host netns (routed, ip_forward=1, no NAT)
      198.51.100.2/25, the "veth" contender (rootful limit)

and measures, for every contender in the same run: iperf3 TCP throughput both directions,
short-connection latency (connect + 1-byte echo + close), UDP 1-byte echo latency, iperf3 UDP
at a fixed offered load (received rate and loss) both directions, DNS queries/s (through tether's
stub, cached and uncached; the others direct to the server as context), inbound TCP (a client in
the world, a server inside the sandbox reached through each tool's port forwarding: slirp4netns's
API add_hostfwd, pasta -t, tether -p and --listen) throughput both ways and connect+echo latency,
and start-up time.  Writes
benchmarks/results/<UTC>.json, latest.json, latest.png and the table in docs/benchmarks.md.

Must run as root (it creates namespaces).  Everything it creates is removed on exit, also on error
or SIGTERM/SIGINT.  See benchmarks/README.md and docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import json
import math
import os
import platform
import pwd
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
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
UDP_ECHO_PORT = 9008
DNS_IP, DNS_PORT = "203.0.113.53", 53   # the world's authoritative test DNS server (wildcard)
DNS_ANSWER_IP = WORLD_IP                # what it answers for every A query
DNS_TTL = 3600                          # long enough that nothing expires from tether's cache mid-run
SYS_PY = "/usr/bin/python3"
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

TARGET_VS_VETH = 0.7
TARGET_VS_SLIRP = 5.0
TARGET_STARTUP_MS = 150.0
TARGET_UDP_LOSS_PCT = 1.0        # at the offered load (--udp-rate, 1 Gbit/s)
TARGET_UDP_OFFERED_FRACTION = 0.9  # the sender must actually have offered >= 90 % of --udp-rate
TARGET_DNS_CACHED_QPS = 5000.0
# Inbound (issue 4): world -> a server inside the sandbox, world->sandbox throughput.
TARGET_IN_PUBLISH_VS_VETH = 0.7    # tether -p
TARGET_IN_PUBLISH_VS_SLIRP = 3.0   # tether -p vs slirp4netns (best MTU)
TARGET_IN_LISTEN_VS_VETH = 0.95    # tether --listen
INBOUND_PORT = 9100                 # the inbound server's port inside every sandbox
INBOUND_HOST_PORT = 9200            # + row index: the forwarders' ports in the host netns

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

UDP_ECHO_SERVER = r"""
import select, socket, sys, time
ip, port, life = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((ip, port))            # bound to the service address, so replies come from it
s.setblocking(False)
print("ready", flush=True)
end = time.monotonic() + life
while time.monotonic() < end:
    if not select.select([s], [], [], 1.0)[0]:
        continue
    for _ in range(64):
        try:
            b, a = s.recvfrom(65535)
        except BlockingIOError:
            break
        try:
            s.sendto(b, a)
        except OSError:
            pass
"""

# A wildcard authoritative DNS server, hand-rolled so it is never the bottleneck (it must outrun
# tether's stub): every A (or ANY) query IN gets one A record; other types get NODATA; responses
# and other opcodes are ignored / NOTIMP; malformed queries FORMERR.  An EDNS OPT in the query is
# answered with an OPT (payload 1232).  The question is echoed byte for byte (0x20-safe).
DNS_SERVER = r"""
import select, socket, struct, sys, time
ip, port, life, answer_ip, ttl = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind((ip, port))
s.setblocking(False)
ANSWER = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, ttl, 4) + socket.inet_aton(answer_ip)
OPT = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
n = 0
print("ready", flush=True)
end = time.monotonic() + life
def reply(q):
    if len(q) < 12 or q[2] & 0x80:              # too short to answer, or a response: drop
        return None
    rd = q[2] & 0x01
    opcode = (q[2] >> 3) & 0x0F
    if opcode != 0:
        return q[:2] + bytes([0x80 | (opcode << 3) | rd, 4]) + bytes(8)           # NOTIMP
    if q[4:6] != b"\x00\x01":
        return q[:2] + bytes([0x80 | rd, 1]) + bytes(8)                          # FORMERR
    i = 12
    try:
        while q[i]:
            if q[i] & 0xC0:
                raise IndexError
            i += 1 + q[i]
        qtype, qclass = struct.unpack_from("!HH", q, i + 1)
    except (IndexError, struct.error):
        return q[:2] + bytes([0x80 | rd, 1]) + bytes(8)
    qend = i + 5
    edns = q[10:12] != b"\x00\x00" and q[qend:qend + 3] == b"\x00\x00\x29"
    an = 1 if qtype in (1, 255) and qclass == 1 else 0
    return (q[:2] + bytes([0x84 | rd, 0]) + b"\x00\x01" + struct.pack("!HHH", an, 0, 1 if edns else 0)
            + q[12:qend] + (ANSWER if an else b"") + (OPT if edns else b""))
while time.monotonic() < end:
    if not select.select([s], [], [], 1.0)[0]:
        continue
    for _ in range(256):
        try:
            q, a = s.recvfrom(4096)
        except BlockingIOError:
            break
        r = reply(q)
        if r is not None:
            n += 1
            try:
                s.sendto(r, a)
            except OSError:
                pass
"""

UDP_LATENCY_CLIENT = r"""
import json, socket, sys, time
ip, port, n, warm, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
pc = time.perf_counter_ns
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((ip, port))         # a connected socket: only replies from ip:port are accepted
s.settimeout(1.0)
out, lost, stale = [], 0, 0
end = time.monotonic() + limit
i = 0
while i < n + warm and time.monotonic() < end:
    b = bytes([i & 0xFF])
    t = pc()
    s.send(b)
    while True:
        try:
            r = s.recv(16)
        except socket.timeout:
            r = None
            break
        if r == b:
            break
        stale += 1            # a late reply to an earlier, timed-out datagram: keep waiting
    d = pc() - t
    if r is None:
        lost += 1
        if lost > 20:
            sys.exit("more than 20 datagrams lost (1 s timeout each)")
    elif i >= warm:
        out.append(d)
    i += 1
print(json.dumps({"ns": out, "lost": lost, "stale": stale}))
"""

# DNS load generator (stdlib only: the sandbox's python has no dnspython).  Keeps `inflight`
# queries outstanding over one UDP socket; each answer (or a timeout) frees a slot for the next
# query.  mode "cached": the same name every time (queried once first, so it is in the cache);
# "uncached": a name never asked before for every query (a per-run random label + a counter).
DNS_CLIENT = r"""
import collections, json, os, select, socket, struct, sys, time
server, port, mode, inflight, dur, warm, tmo = (sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]),
                                                float(sys.argv[5]), float(sys.argv[6]), float(sys.argv[7]))
tag = os.urandom(4).hex()
def qname(text):
    return b"".join(bytes([len(l)]) + l for l in text.encode().split(b".")) + b"\x00"
FIXED = qname("cached-%s.bench.test" % tag)
SUFFIX = qname("u%s.bench.test" % tag)
def name(seq):
    if mode == "cached":
        return FIXED
    l = b"%x" % seq
    return bytes([len(l)]) + l + SUFFIX
TAIL = struct.pack("!HH", 1, 1)       # A, IN
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
s.connect((server, port))
# Prime (and prove the path): the cached name must be answered once before the run.
s.settimeout(2.0)
for attempt in range(5):
    s.send(b"\xbe\xef\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + FIXED + TAIL)
    try:
        r = s.recv(4096)
    except socket.timeout:
        continue
    if r[:2] == b"\xbe\xef":
        break
else:
    sys.exit("no answer to the priming query from %s:%d" % (server, port))
if r[3] & 0x0F != 0 or r[6:8] == b"\x00\x00":
    sys.exit("priming query answered rcode=%d ancount=%d" % (r[3] & 0x0F, struct.unpack("!H", r[6:8])[0]))
s.setblocking(False)
pc = time.perf_counter
pending = {}                          # id -> (seq, sent_at, qname)
order = collections.deque()           # (sent_at, id, seq), in send order: the timeout queue
seq = 0
nid = 0
t0 = pc()
mstart, mend = t0 + warm, t0 + warm + dur
ok = bad = timeouts = sent = late = 0
rcodes = {}
lat = []
def send_one(now):
    global seq, nid, sent
    while True:
        nid = (nid + 1) & 0xFFFF
        if nid not in pending:
            break
    seq += 1
    q = name(seq)
    try:
        s.send(struct.pack("!HHHHHH", nid, 0x0100, 1, 0, 0, 0) + q + TAIL)
    except (BlockingIOError, ConnectionRefusedError):
        pass                          # counted as a timeout later
    pending[nid] = (seq, now, q)
    order.append((now, nid, seq))
    sent += 1
now = pc()
for _ in range(inflight):
    send_one(now)
poll = select.poll()
poll.register(s, select.POLLIN)
while True:
    now = pc()
    if now >= mend:
        break
    wait = min(mend, order[0][0] + tmo) - now if order else mend - now
    if wait > 0:
        poll.poll(max(1, int(wait * 1000)))
    while True:
        try:
            r = s.recv(4096)
        except BlockingIOError:
            break
        except ConnectionRefusedError:
            continue
        now = pc()
        if len(r) < 12:
            continue
        rid = (r[0] << 8) | r[1]
        p = pending.get(rid)
        if p is None or r[12:12 + len(p[2])] != p[2]:
            late += 1
            continue
        del pending[rid]
        if mstart <= now < mend:
            rc = r[3] & 0x0F
            if rc == 0 and r[6:8] != b"\x00\x00":
                ok += 1
                lat.append(now - p[1])
            else:
                bad += 1
                rcodes[rc] = rcodes.get(rc, 0) + 1
        send_one(now)
    now = pc()
    while order and order[0][0] + tmo <= now:
        t, rid, sq = order.popleft()
        p = pending.get(rid)
        if p is not None and p[0] == sq:
            del pending[rid]
            if mstart <= now < mend:
                timeouts += 1
            send_one(now)
    while order and (order[0][1] not in pending or pending[order[0][1]][0] != order[0][2]):
        order.popleft()               # answered already: drop from the timeout queue
lat.sort()
def pct(p):
    return lat[max(0, -(-len(lat) * p // 100) - 1)] * 1e6 if lat else None
print(json.dumps({"ok": ok, "errors": bad, "rcodes": rcodes, "timeouts": timeouts, "late": late,
                  "sent": sent, "seconds": dur, "qps": ok / dur, "inflight": inflight,
                  "p50_us": pct(50), "p99_us": pct(99)}))
"""

# The inbound server (in the sandbox) and its client (in the world), one program for every
# contender.  The server binds 0.0.0.0:PORT itself, or, with LISTEN_FDS set (tether --listen,
# systemd socket activation), accepts on fd 3.  It serves one connection at a time, chosen by the
# first byte: "x" = 1-byte echo (the latency client's), "S" = sink (receive until EOF, reply with
# the rate it measured), "R" = source (send until the client goes away).  The receiver measures:
# bytes that arrived between OMIT and OMIT+DUR seconds after the start, over the time between the
# first and the last recv of that window.  Blocking sockets with SO_RCVTIMEO/SO_SNDTIMEO of 10 s,
# so no call waits for ever; every loop is bounded in time.
INBOUND_PROG = r"""
import json, os, socket, struct, sys, time
mono = time.monotonic
BUF = 1 << 20
TV = struct.pack("ll", 10, 0)

def bounded(s):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, TV)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, TV)

def receive(s, omit, dur, stop):
    buf = bytearray(BUF)
    rin = s.recv_into
    t0 = mono()
    a, b = t0 + omit, t0 + omit + dur
    hard = b + 15
    total, ta, ca, tb, cb, now = 0, None, 0, None, 0, t0
    while True:
        n = rin(buf)
        if not n:
            break
        total += n
        now = mono()
        if ta is None:
            if now >= a:
                ta, ca = now, total
        elif tb is None and now >= b:
            tb, cb = now, total
            if stop:
                break
        if now > hard:
            break
    if ta is None:
        ta, ca = t0, 0
    if tb is None:
        tb, cb = now, total
    secs = tb - ta
    return {"gbps": (cb - ca) * 8 / secs / 1e9 if secs > 0 else 0.0, "bytes": cb - ca, "seconds": secs,
            "total_bytes": total, "complete": tb - ta >= dur * 0.99}

def send_for(s, secs):
    data = memoryview(bytes(BUF))
    snd = s.send
    end = mono() + secs
    sent = 0
    while mono() < end:
        sent += snd(data)
    return sent

def header(s):
    h = b""
    while not h.endswith(b"\n") and len(h) < 64:
        c = s.recv(1)
        if not c:
            raise OSError("short header")
        h += c
    omit, dur = h.split()
    return float(omit), float(dur)

def serve(port, life):
    if os.environ.get("LISTEN_FDS"):
        if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ["LISTEN_FDS"]) < 1:
            sys.exit("LISTEN_PID/LISTEN_FDS do not name this process: %r" % (
                {k: v for k, v in os.environ.items() if k.startswith("LISTEN_")},))
        ls, how = socket.socket(fileno=3), "fd3"
    else:
        ls, how = socket.socket(), "bound"
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("0.0.0.0", port))
        ls.listen(1024)
    ls.settimeout(1.0)
    print("ready", how, ls.getsockname(), flush=True)
    end = mono() + life
    while mono() < end:
        try:
            c, _ = ls.accept()
        except socket.timeout:
            continue
        try:
            c.setblocking(True)
            bounded(c)
            k = c.recv(1)
            if k == b"x":
                c.sendall(k)
            elif k == b"S":
                omit, dur = header(c)
                r = receive(c, omit, dur, False)
                c.sendall(json.dumps(r).encode() + b"\n")
            elif k == b"R":
                omit, dur = header(c)
                send_for(c, omit + dur + 15)
        except OSError:
            pass
        finally:
            c.close()

def client(ip, port, direction, omit, dur):
    s = socket.create_connection((ip, port), timeout=10)
    s.setblocking(True)
    bounded(s)
    if direction == "in":          # world -> sandbox: we send, the server receives and measures
        s.sendall(b"S%r %r\n" % (omit, dur))
        sent = send_for(s, omit + dur + 0.5)
        s.shutdown(socket.SHUT_WR)
        r = b""
        while not r.endswith(b"\n"):
            c = s.recv(4096)
            if not c:
                sys.exit("no result from the server (sent %d bytes)" % sent)
            r += c
        r = json.loads(r)
        r["sender_bytes"] = sent
    else:                          # sandbox -> world over the same inbound connection
        s.sendall(b"R%r %r\n" % (omit, dur))
        r = receive(s, omit, dur, True)
    s.close()
    print(json.dumps(r))

if sys.argv[1] == "serve":
    serve(int(sys.argv[2]), float(sys.argv[3]))
else:
    client(sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5]), float(sys.argv[6]))
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
            "link set lo up", f"addr add {WORLD_IP}/32 dev lo", f"addr add {DNS_IP}/32 dev lo",
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
        # The UDP echo server and the wildcard DNS server (bounded lifetimes too).
        for key, argv in (("udp-echo", [UDP_ECHO_SERVER, WORLD_IP, str(UDP_ECHO_PORT), str(life_s)]),
                          ("dns", [DNS_SERVER, DNS_IP, str(DNS_PORT), str(life_s), DNS_ANSWER_IP, str(DNS_TTL)])):
            p = REAPER.popen(in_ns(w) + [SYS_PY, "-c", *argv],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
            if readline_timeout(p, 10) != "ready":
                raise BenchError(f"{key} server did not start")
            self.servers[key] = p

    def check_servers(self, *keys: str) -> None:
        dead = [f"{k} (rc={self.servers[k].poll()})" for k in keys
                if k in self.servers and self.servers[k].poll() is not None]
        if dead:
            raise BenchError("world server gone: " + ", ".join(dead))

    def world_wrap(self, argv: list[str], extra=()) -> list[str]:
        """argv run in the world netns (the inbound clients)."""
        return in_ns(self.world) + argv


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

    def wrap(self, argv: list[str], extra=()) -> list[str]:
        """argv run inside the sandbox; extra: more arguments for the sandboxing tool itself."""
        raise NotImplementedError

    def env(self):
        return self.user.env

    # Inbound (issue 4): a server inside the sandbox reached from the world.  One inbound row per
    # entry of inbound_modes: (mode, label suffix).  The server runs as
    # wrap(server, inbound_args(mode, hp, gp)); inbound_open() runs once it listens; the world's
    # client connects to inbound_target(hp, gp).
    inbound_modes: tuple = (("", ""),)

    def inbound_port(self, hp: int) -> int:
        """The server's port inside the sandbox."""
        return INBOUND_PORT

    def inbound_args(self, mode: str, hp: int, gp: int) -> list[str]:
        return []

    def inbound_open(self, hp: int, gp: int) -> None:
        pass

    def inbound_close(self) -> None:
        pass

    def inbound_target(self, hp: int, gp: int) -> tuple[str, int]:
        return HOST_IP, hp          # the forwarders listen in the host netns

    def inbound_how(self, mode: str, hp: int, gp: int) -> str:
        return " ".join(self.inbound_args(mode, hp, gp))

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

    def wrap(self, argv, extra=()):
        return in_ns(self.topo.veth) + argv

    def inbound_target(self, hp, gp):
        return VETH_SBX, gp         # routed through the host netns, no forwarder

    def inbound_how(self, mode, hp, gp):
        return f"routed to {VETH_SBX}:{gp} (no forwarder)"

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

    def _start(self, life_s: float, api: str | None = None):
        """unshare a user+net ns, attach slirp4netns to it, wait for --ready-fd.  Returns handles.
        api: path of an API socket (--api-socket) to create, for port forwarding."""
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
                    *([f"--api-socket={api}"] if api else []),
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
        # The API socket lives in a directory of its own that only the tools' user may write.
        self.api_dir = tempfile.mkdtemp(prefix=f"tether-bench-{self.key}-")
        os.chown(self.api_dir, self.user.uid, self.user.gid)
        self.api_path = os.path.join(self.api_dir, "api.sock")
        self.fwd_ids: list[int] = []
        self.pid, self.exit_w, self.procs = self._start(life_s, self.api_path)
        REAPER.fds.append(self.exit_w)

    def api(self, execute: str, **arguments) -> dict:
        """One request on slirp4netns's API socket (one JSON object per connection)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5.0)
            s.connect(self.api_path)
            s.sendall(json.dumps({"execute": execute, "arguments": arguments}).encode())
            s.shutdown(socket.SHUT_WR)
            data = b""
            while len(data) < 65536:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        j = json.loads(data or b"{}")
        if "error" in j or "return" not in j:
            raise BenchError(f"slirp4netns API {execute}: {j}")
        return j["return"]

    def inbound_open(self, hp, gp):
        r = self.api("add_hostfwd", proto="tcp", host_addr="0.0.0.0", host_port=hp, guest_port=gp)
        self.fwd_ids.append(r["id"])

    def inbound_close(self):
        while self.fwd_ids:
            i = self.fwd_ids.pop()
            try:
                self.api("remove_hostfwd", id=i)
            except ERRS as e:
                log(f"{self.key}: remove_hostfwd {i}: {e}")

    def inbound_how(self, mode, hp, gp):
        return f"--api-socket: add_hostfwd tcp 0.0.0.0:{hp} -> guest :{gp}"

    def teardown(self):
        if getattr(self, "api_dir", None):
            shutil.rmtree(self.api_dir, ignore_errors=True)
            self.api_dir = None
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

    def wrap(self, argv, extra=()):
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

    def wrap(self, argv, extra=()):
        runas = ["--runas", "0"] if self.user.root else []   # as root pasta would switch to nobody
        return in_ns(self.topo.host) + self.user.prefix() + ["pasta", *runas, "--config-net", *extra, "--"] + argv

    def inbound_args(self, mode, hp, gp):
        return ["-t", f"{hp}:{gp}"]


class Tether(Contender):
    key, label = "tether", "tether"

    def __init__(self, topo, user, args, cmd: list[str] | None, note: str = "") -> None:
        super().__init__(topo, user, args)
        self.cmd = cmd
        self.dns_args: list[str] = []
        self.has_stub = False
        if cmd is None:
            self.status, self.note = "skipped", note
            return
        # Point the DNS stub at the world's test server (never at the host's resolv.conf), unless
        # the caller chose upstreams with --tether-arg; a tether without --dns has no stub.
        if any(a == "--dns" or a.startswith("--dns=") for a in args.tether_arg):
            self.has_stub = True
        else:
            r = run(cmd + ["run", "--help"], timeout=30)
            if "--dns " in r.stdout or "--dns=" in r.stdout or "--dns\n" in r.stdout:
                self.dns_args, self.has_stub = ["--dns", DNS_IP], True
            else:
                self.note = "this tether has no DNS stub (no --dns option)"

    def wrap(self, argv, extra=()):
        return (in_ns(self.topo.host) + self.user.prefix() + self.cmd
                + ["run", *self.dns_args, *self.args.tether_arg, *extra, "--"] + argv)

    inbound_modes = (("p", " -p"), ("listen", " --listen"))

    def inbound_args(self, mode, hp, gp):
        return ["-p", f"0.0.0.0:{hp}:{gp}"] if mode == "p" else ["--listen", f"0.0.0.0:{hp}"]


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
    return iperf3_tcp(c.wrap, c.env(), c.topo.world, WORLD_IP, reverse, args)


def start_iperf_server(ns: str, ip: str) -> subprocess.Popen:
    """A one-shot `iperf3 -s` bound to ip in netns ns, once it listens."""
    p = REAPER.popen(in_ns(ns) + ["iperf3", "-s", "-1", "-B", ip, "-p", str(IPERF_PORT)],
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


def run_iperf3(wrap, env, server_ns: str, server_ip: str, options: list[str], timeout: float, what: str,
               window=None) -> dict:
    """One iperf3 client run by wrap() against `iperf3 -s` bound to server_ip in server_ns;
    returns iperf3's whole JSON report (BenchError with iperf3's words if it failed).  ``window``,
    a context manager, brackets the client run alone (wireguard.py measures CPU time in it)."""
    srv = start_iperf_server(server_ns, server_ip)
    r = None
    try:
        argv = ["iperf3", "-c", server_ip, "-p", str(IPERF_PORT), *options, "-J", "--connect-timeout", "5000"]
        with window or contextlib.nullcontext():
            r = run(wrap(argv), timeout=timeout, env=env)
    finally:
        try:
            srv.wait(5 if r is not None and r.returncode == 0 else 0.2)
        except subprocess.TimeoutExpired:
            pass
        REAPER.stop(srv)
    try:
        j = json.loads(r.stdout)
    except json.JSONDecodeError:
        raise BenchError(f"{what} rc={r.returncode}: {(r.stderr or r.stdout).strip()[-300:]}")
    if "error" in j:
        raise BenchError(f"{what}: {j['error']}")
    return j


def iperf3_tcp(wrap, env, server_ns: str, server_ip: str, reverse: bool, args) -> dict:
    """One iperf3 TCP run: `iperf3 -s` bound to server_ip in server_ns, the client run by wrap()."""
    options = ["-t", str(args.duration), "-O", str(args.omit)] + (["-R", "--rcv-timeout", "15000"] if reverse else [])
    end = run_iperf3(wrap, env, server_ns, server_ip, options, args.duration + args.omit + 30, "iperf3")["end"]
    return {"gbps": end["sum_received"]["bits_per_second"] / 1e9,
            "sender_gbps": end["sum_sent"]["bits_per_second"] / 1e9,
            "retransmits": end["sum_sent"].get("retransmits"),
            "cpu": end.get("cpu_utilization_percent")}


def measure_latency(c: Contender, args) -> dict:
    c.check_alive()
    return echo_latency(c.wrap, c.env(), WORLD_IP, ECHO_PORT, args)


def echo_latency(wrap, env, ip: str, port: int, args) -> dict:
    """LATENCY_CLIENT run by wrap(): connect + 1-byte echo + close to ip:port, sequentially."""
    limit = max(30.0, args.latency_count * 0.05)
    r = run(wrap([SYS_PY, "-c", LATENCY_CLIENT, ip, str(port), str(args.latency_count),
                  str(args.latency_warmup), str(limit)]), timeout=limit + 30, env=env)
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


def measure_udp_iperf(c: Contender, reverse: bool, args) -> dict:
    """iperf3 UDP at a fixed offered load (--udp-rate, datagrams of --udp-len bytes); the
    receiver's view (rate, loss) is what counts."""
    c.check_alive()
    options = ["-u", "-b", args.udp_rate, "-l", str(args.udp_len), "-t", str(args.udp_duration)]
    if args.udp_window:
        options += ["-w", args.udp_window]
    if reverse:
        options += ["-R", "--rcv-timeout", "15000"]
    end = run_iperf3(c.wrap, c.env(), c.topo.world, WORLD_IP, options, args.udp_duration + 40, "iperf3 -u")["end"]
    rx, tx = end.get("sum_received") or end["sum"], end.get("sum_sent") or end["sum"]
    return {"gbps": rx["bits_per_second"] / 1e9, "sender_gbps": tx["bits_per_second"] / 1e9,
            "lost_percent": rx.get("lost_percent"), "lost_packets": rx.get("lost_packets"),
            "packets": rx.get("packets"), "jitter_ms": rx.get("jitter_ms"),
            "cpu": end.get("cpu_utilization_percent")}


def measure_udp_latency(c: Contender, args) -> dict:
    c.check_alive()
    c.topo.check_servers("udp-echo")
    limit = max(30.0, args.udp_count * 0.05)
    r = run(c.wrap([SYS_PY, "-c", UDP_LATENCY_CLIENT, WORLD_IP, str(UDP_ECHO_PORT), str(args.udp_count),
                    str(args.udp_warmup), str(limit)]), timeout=limit + 60, env=c.env())
    if r.returncode != 0:
        raise BenchError(f"UDP latency client rc={r.returncode}: {r.stderr.strip()[-300:]}")
    j = json.loads(r.stdout.strip().splitlines()[-1])
    ns = j["ns"]
    if not ns:
        raise BenchError("UDP latency client returned no samples")
    us = sorted(x / 1000 for x in ns)
    res = {"count": len(us), "p50_us": statistics.median(us), "p99_us": pct(us, 99),
           "mean_us": statistics.fmean(us), "min_us": us[0], "max_us": us[-1],
           "lost": j["lost"], "stale_replies": j["stale"], "samples_us": [round(x / 1000, 1) for x in ns]}
    if len(us) < args.udp_count:
        res["note"] = f"only {len(us)} of {args.udp_count} round trips"
    return res


def measure_dns(c: Contender, mode: str, server: str, args) -> dict:
    """Queries/s answered (NOERROR with an answer) with --dns-inflight queries outstanding."""
    c.check_alive()
    c.topo.check_servers("dns")
    r = run(c.wrap([SYS_PY, "-c", DNS_CLIENT, server, str(DNS_PORT), mode, str(args.dns_inflight),
                    str(args.dns_duration), str(args.dns_warmup), "1.0"]),
            timeout=args.dns_duration + args.dns_warmup + 60, env=c.env())
    if r.returncode != 0:
        raise BenchError(f"DNS client rc={r.returncode}: {r.stderr.strip()[-300:]}")
    j = json.loads(r.stdout.strip().splitlines()[-1])
    j["server"] = server
    j["mode"] = mode
    return j


def probe(c: Contender) -> None:
    """A few echo round-trips from inside the sandbox: proves the contender works end to end."""
    r = run(c.wrap([SYS_PY, "-c", LATENCY_CLIENT, WORLD_IP, str(ECHO_PORT), "3", "0", "20"]),
            timeout=60, env=c.env())
    if r.returncode != 0:
        raise BenchError(f"probe failed rc={r.returncode}: {(r.stderr or r.stdout).strip()[-400:]}")


# --- inbound (issue 4): world -> a server inside the sandbox -----------------------------------------

CLIENT_ENV = {"PATH": SAFE_PATH, "LANG": "C.UTF-8"}


class InboundRow:
    """One inbound contender: a sandbox (Contender) and how the world reaches a server inside it
    (mode: "" for the contender's one way, "p"/"listen" for tether).  tool "py" runs INBOUND_PROG
    as the server; "iperf3" (veth only, a calibration of INBOUND_PROG) runs a one-shot `iperf3 -s`
    in the veth netns for every throughput run instead."""

    def __init__(self, c: Contender, mode: str, suffix: str, hp: int, tool: str = "py") -> None:
        self.c, self.mode, self.tool = c, mode, tool
        self.key = c.key + (f"-{mode}" if mode else "") + ("-iperf3" if tool == "iperf3" else "")
        self.label = c.label + suffix + (", iperf3 (calibration)" if tool == "iperf3" else "")
        gp = IPERF_PORT if tool == "iperf3" else c.inbound_port(hp)
        self.hp, self.gp = hp, gp
        self.target = c.inbound_target(hp, gp)
        self.how = ("iperf3 -s in the veth netns, iperf3 -c from the world" if tool == "iperf3"
                    else c.inbound_how(mode, hp, gp))
        self.server: subprocess.Popen | None = None
        self.server_err = None
        self.opened = False

    def start(self, life_s: float) -> None:
        """Start the server in the sandbox (with the forwarding), then prove the path with echoes."""
        if self.tool != "py":
            return
        c = self.c
        self.server_err = tempfile.TemporaryFile()
        self.server = REAPER.popen(c.wrap([SYS_PY, "-c", INBOUND_PROG, "serve", str(self.gp), str(life_s)],
                                          c.inbound_args(self.mode, self.hp, self.gp)),
                                   stdout=subprocess.PIPE, stderr=self.server_err, env=c.env(), cwd="/")
        try:
            line = readline_timeout(self.server, 20)
        except BenchError as e:
            raise BenchError(f"{e}: {self.stderr_tail()}")
        if not line.startswith("ready"):
            raise BenchError(f"inbound server: {line!r}")
        c.inbound_open(self.hp, self.gp)
        self.opened = True
        end = time.monotonic() + 15       # the forwarder may bind a moment after the server
        while True:
            r = run(self.c.topo.world_wrap([SYS_PY, "-c", LATENCY_CLIENT, *map(str, self.target), "3", "0", "10"]),
                    timeout=30, env=CLIENT_ENV)
            if r.returncode == 0:
                return
            if time.monotonic() > end:
                raise BenchError(f"inbound probe to {self.target}: {(r.stderr or r.stdout).strip()[-300:]}; "
                                 f"server: {self.stderr_tail()}")
            time.sleep(0.2)

    def stderr_tail(self) -> str:
        if not self.server_err:
            return ""
        self.server_err.seek(0)
        return oneline(self.server_err.read().decode(errors="replace") or "(no stderr)", 300)

    def check_alive(self) -> None:
        self.c.check_alive()
        if self.server is not None and self.server.poll() is not None:
            raise BenchError(f"inbound server exited (rc={self.server.returncode}): {self.stderr_tail()}")

    def stop(self) -> None:
        if self.opened:
            self.c.inbound_close()
            self.opened = False
        if self.server is not None:
            REAPER.stop(self.server)
            self.server = None
        if self.server_err:
            self.server_err.close()
            self.server_err = None


class HostNetns(Veth):
    """Inbound context only: the server in the host netns itself (no sandbox, no forwarder), the
    path a --listen socket's connections take.  Its port is a host port of its own, not the
    sandboxes' 9100: pasta's default -T auto mirrors the host netns's listening ports into its
    namespace, and would take 9100 from pasta's own server."""
    key, label = "host", "host netns, no sandbox (context)"

    def wrap(self, argv, extra=()):
        return in_ns(self.topo.host) + argv

    def inbound_port(self, hp):
        return hp

    def inbound_target(self, hp, gp):
        return HOST_IP, hp

    def inbound_how(self, mode, hp, gp):
        return f"server bound to 0.0.0.0:{gp} in the host netns"


def inbound_rows(live: list[Contender], calibrate: bool) -> list[InboundRow]:
    """One row per contender and inbound mode; with the veth contender also two references: iperf3
    on the veth path (calibrates INBOUND_PROG) and the server in the host netns (the path
    --listen's connections take, without tether)."""
    rows = []
    for c in live:
        for mode, suffix in c.inbound_modes:
            rows.append(InboundRow(c, mode, suffix, INBOUND_HOST_PORT + len(rows)))
        if calibrate and isinstance(c, Veth):
            rows.append(InboundRow(c, "", "", 0, tool="iperf3"))
            rows.append(InboundRow(HostNetns(c.topo, c.user, c.args), "", "", INBOUND_HOST_PORT + len(rows)))
    return rows


def measure_inbound(row: InboundRow, direction: str, args) -> dict:
    """One throughput run over an inbound connection: "in" = world -> sandbox (the server
    receives), "out" = sandbox -> world on the same kind of connection."""
    row.check_alive()
    topo = row.c.topo
    if row.tool == "iperf3":
        return iperf3_tcp(topo.world_wrap, CLIENT_ENV, topo.veth, VETH_SBX, direction == "out", args)
    ip, port = row.target
    r = run(topo.world_wrap([SYS_PY, "-c", INBOUND_PROG, "client", ip, str(port), direction,
                             str(args.omit), str(args.duration)]),
            timeout=args.duration + args.omit + 45, env=CLIENT_ENV)
    if r.returncode != 0:
        raise BenchError(f"inbound client rc={r.returncode}: {(r.stderr or r.stdout).strip()[-300:]}")
    j = json.loads(r.stdout.strip().splitlines()[-1])
    if not j.get("complete"):
        j["note"] = f"the stream ended before the {args.duration} s window did ({j['seconds']:.1f} s counted)"
    return j


def measure_inbound_latency(row: InboundRow, args) -> dict:
    row.check_alive()
    return echo_latency(row.c.topo.world_wrap, CLIENT_ENV, *row.target, args)


def round_robin(items, dirs, repeats: int, fn, what: str, errors: dict, show=None) -> dict:
    """fn(item, d) for every repeat, item and direction, in that order (so drift hits all alike);
    returns {item.key: {d: [samples]}}; a failed run is logged and noted in errors[item.key]."""
    show = show or (lambda s: f"{s['gbps']:.2f} Gbit/s")
    samples = {it.key: {d: [] for d in dirs} for it in items}
    for rep in range(repeats):
        for it in items:
            for d in dirs:
                try:
                    smp = fn(it, d)
                    samples[it.key][d].append(smp)
                    log(f"{it.key}: {what} {d} #{rep + 1}: {show(smp)}")
                except ERRS as e:
                    errors[it.key].append(f"{what} {d} #{rep + 1}: {e}")
                    log(f"{it.key}: {what} {d} #{rep + 1} failed: {e}")
    return samples


def tput_summary(by_dir: dict) -> dict:
    return {d: {"gbps_median": statistics.median([x["gbps"] for x in ss]) if ss else None,
                "samples_gbps": [x["gbps"] for x in ss], "runs": ss} for d, ss in by_dir.items()}


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
        "cpus_allowed": sorted(os.sched_getaffinity(0)),
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



# --- other work on the machine -----------------------------------------------------------------------

class ContentionMonitor:
    """Samples, every `interval` seconds, the CPU time used by processes that are not this script,
    not its ancestors or descendants, not the rootless tools' user and not kernel threads: other work on this
    machine competing with the measurements (e.g. a test suite started beside the run).  Reads
    /proc only; a sample costs a few ms.  A lower bound: processes that start and end between two
    samples are not seen."""

    def __init__(self, exclude_uids: set[int], interval: float = 1.0) -> None:
        import threading
        self.exclude_uids, self.interval = exclude_uids, interval
        self.phase = "setup"
        self.by_phase: dict[str, list[float]] = {}
        self.cmd_ticks: dict[str, int] = {}
        self.hz = os.sysconf("SC_CLK_TCK")
        self.ncpu = os.cpu_count() or 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="contention-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _snap(self) -> dict:
        me = os.getpid()
        procs = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    raw = f.read()
                st = os.stat(f"/proc/{d}")
            except OSError:
                continue
            try:
                rest = raw[raw.rindex(b")") + 2:].split()
                # fields from 3 on: state ppid ... flags(9) ... utime(14) stime(15) ... starttime(22).
                # Live processes' own time only: cutime/cstime would add, when a child is reaped, all
                # the CPU it ever used, mostly before this sample.
                procs[int(d)] = (int(rest[1]), int(rest[6]), int(rest[11]) + int(rest[12]), int(rest[19]), st.st_uid)
            except (ValueError, IndexError):
                continue
        mine = {me}
        for pid in procs:          # descendants of this script (walk up the parent chain)
            chain, p = [], pid
            while p in procs and p not in mine and p > 1 and len(chain) < 64:
                chain.append(p)
                p = procs[p][0]
            if p in mine:
                mine.update(chain)
        p = procs.get(me, (0,))[0]
        while p > 1 and p in procs and p not in mine:   # and its ancestors (what runs this script)
            mine.add(p)
            p = procs[p][0]
        return {(pid, v[3]): v[2] for pid, v in procs.items()
                if pid not in mine and not v[1] & 0x00200000 and v[4] not in self.exclude_uids}

    def _label(self, pid: int) -> str:
        """The process's name (comm) only: other processes' arguments are none of this file's business."""
        try:
            with open(f"/proc/{pid}/comm") as f:
                return f.read().strip()[:32] or "?"
        except OSError:
            return "?"

    def _run(self) -> None:
        prev, t_prev, errors = {}, time.monotonic(), 0
        first = True
        while first or not self._stop.wait(self.interval):
            try:
                cur, t = self._snap(), time.monotonic()
                if not first:
                    total = 0
                    for key, ticks in cur.items():
                        d = ticks - prev.get(key, 0)
                        if d > 0:
                            total += d
                            if d >= 2:
                                lab = self._label(key[0])
                                self.cmd_ticks[lab] = self.cmd_ticks.get(lab, 0) + d
                    pct_ = 100.0 * total / (self.hz * max(t - t_prev, 1e-3) * self.ncpu)
                    self.by_phase.setdefault(self.phase, []).append(min(pct_, 100.0))
                prev, t_prev, first = cur, t, False
            except Exception as e:   # never disturb the run; give up after repeated failures
                errors += 1
                first = True
                if errors >= 5:
                    log(f"contention monitor stopped: {e!r}")
                    return

    def result(self) -> dict:
        allv = [v for vs in self.by_phase.values() for v in vs]
        top = sorted(self.cmd_ticks.items(), key=lambda kv: -kv[1])[:3]
        return {"what": "CPU used by other processes (not this script, its ancestors or descendants, not the "
                        "rootless tools' user's, not kernel threads), percent of all CPUs, sampled every "
                        f"{self.interval:g} s",
                "mean_pct": round(statistics.fmean(allv), 1) if allv else None,
                "max_pct": round(max(allv), 1) if allv else None,
                "by_phase_mean_pct": {k: round(statistics.fmean(v), 1) for k, v in self.by_phase.items() if v},
                "top": [{"comm": c, "cpu_s": round(t / self.hz, 1)} for c, t in top]}


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
    # UDP echo latency, UDP throughput at the offered load, DNS through the stub.
    def ulat(k):
        return (C.get(k, {}).get("udp_latency") or {}).get("p50_us")
    tu = ulat("tether")
    bu = min(((ulat(k), k) for k in slirps if ulat(k)), default=(None, None))
    ratios["udp_latency_p50_tether_over_best_slirp4netns"] = tu / bu[0] if tu and bu[0] else None
    targets.append({"id": "udp_latency_p50_vs_slirp4netns", "target": "UDP 1-byte echo p50 ≤ slirp4netns (best MTU)",
                    "measured": (f"{tu:.0f} µs vs {bu[0]:.0f} µs ({bu[1]})" if tu and bu[0] else why or "n/a"),
                    "verdict": verdict(None if not (tu and bu[0]) else tu <= bu[0])})
    p = res.get("params", {})
    rate, ln = p.get("udp_rate", "1G"), p.get("udp_len")
    want = _rate_bps(rate)
    for d, dname in (("up", "sandbox→world"), ("down", "world→sandbox")):
        u = (C.get("tether", {}).get("udp_throughput") or {}).get(d) or {}
        loss, got, sent = u.get("loss_pct_median"), u.get("gbps_median"), u.get("sender_gbps_median")
        ok = None
        if loss is not None and sent is not None:
            offered_ok = want is None or sent * 1e9 >= TARGET_UDP_OFFERED_FRACTION * want
            ok = loss < TARGET_UDP_LOSS_PCT and offered_ok
            m = (f"{loss:.2f} % lost, {got:.3f} Gbit/s received of {sent:.3f} sent "
                 f"(median of {len(u.get('runs', []))})")
            if not offered_ok:
                m += f"; the sender offered less than {TARGET_UDP_OFFERED_FRACTION:.0%} of {rate}"
        else:
            m = why or "n/a"
        targets.append({"id": f"udp_throughput_{d}_loss",
                        "target": f"UDP {dname} at {rate}bit/s offered ({ln} B datagrams): loss < {TARGET_UDP_LOSS_PCT:g} %",
                        "measured": m, "verdict": verdict(ok)})
    dn = C.get("tether", {}).get("dns") or {}
    qc = (dn.get("stub_cached") or {}).get("qps")
    targets.append({"id": "dns_cached_qps", "target": f"DNS via the stub, cached name ≥ {TARGET_DNS_CACHED_QPS:,.0f} queries/s",
                    "measured": (f"{qc:,.0f} queries/s ({dn['stub_cached']['inflight']} in flight, "
                                 f"{dn['stub_cached']['timeouts']} timeouts)" if qc is not None
                                 else why or oneline(dn.get("note") or "n/a")),
                    "verdict": verdict(None if qc is None else qc >= TARGET_DNS_CACHED_QPS)})
    qu = (dn.get("stub_uncached") or {}).get("qps")
    ratios["dns_stub_cached_qps"], ratios["dns_stub_uncached_qps"] = qc, qu

    ratios_in, targets_in = summarize_inbound(res, slirps, why, verdict)
    ratios.update(ratios_in)
    targets += targets_in

    ts = st("tether")
    for k in ("veth", *slirps, "pasta"):
        if ts and st(k):
            ratios[f"startup_tether_over_{k}"] = ts / st(k)
    targets.append({"id": "startup", "target": f"start-up (`tether run -- true`) ≤ {TARGET_STARTUP_MS:g} ms",
                    "measured": (f"{ts:.0f} ms (median)" if ts else why or "n/a"),
                    "verdict": verdict(None if ts is None else ts <= TARGET_STARTUP_MS)})
    return ratios, targets


def summarize_inbound(res: dict, slirps: list[str], why: str, verdict) -> tuple[dict, list[dict]]:
    """Issue 4's targets: world->sandbox throughput of tether -p and --listen against the veth row
    (the same server program) and slirp4netns's best MTU; inbound latency p50s as context."""
    inb = res.get("inbound") or {}

    def thr(k, d="in"):
        return ((inb.get(k) or {}).get("throughput") or {}).get(d, {}).get("gbps_median")

    ratios: dict = {}
    for d in ("in", "out"):
        for k in ("tether-p", "tether-listen"):
            for ref in ("veth", *slirps):
                if thr(k, d) and thr(ref, d):
                    ratios[f"inbound_{d}_{k}_over_{ref}"] = thr(k, d) / thr(ref, d)
    for k, row in inb.items():
        if (row.get("latency") or {}).get("p50_us") is not None:
            ratios[f"inbound_latency_p50_us_{k}"] = row["latency"]["p50_us"]
    if "inbound" not in res.get("params", {}).get("measures", ["inbound"]):
        return ratios, []
    v = thr("veth")
    best = max(((thr(k), k) for k in slirps if thr(k)), default=(None, None))
    ratios["inbound_in_best_slirp4netns"] = best[1]
    targets = []
    for k, flag, ref, refname, src, goal in (
            ("tether-p", "-p", v, "veth", "", TARGET_IN_PUBLISH_VS_VETH),
            ("tether-p", "-p", best[0], "slirp4netns (best MTU)", f", {best[1]}", TARGET_IN_PUBLISH_VS_SLIRP),
            ("tether-listen", "--listen", v, "veth", "", TARGET_IN_LISTEN_VS_VETH)):
        t = thr(k)
        r = t / ref if t and ref else None
        note = (inb.get(k) or {}).get("note") or ""
        targets.append({"id": f"inbound_{k}_vs_{refname.split()[0]}",
                        "target": f"inbound TCP world→sandbox, tether {flag} ≥ {goal:g}× {refname}",
                        "measured": (f"{r:.2f}× ({t:.2f} / {ref:.2f} Gbit/s{src})" if r
                                     else why or oneline(note or "n/a")),
                        "verdict": verdict(None if r is None else r >= goal)})
    return ratios, targets


def _rate_bps(rate: str) -> float | None:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?)", rate or "")
    if not m:
        return None
    return float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]


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
    lines.append(f"Run {res['timestamp']} — {kind}iperf3 TCP {p['duration']} s × {p['repeats']} per direction "
                 f"(median), {p['latency_count']} connections, {p['startup_runs']} start-ups; "
                 + (f"iperf3 UDP at {p['udp_rate']}bit/s offered, {p['udp_len']} B datagrams, "
                    f"{p['udp_duration']} s × {p['repeats']} per direction (median), "
                    f"{p['udp_count']} UDP echoes; DNS {p['dns_duration']:g} s per mode with "
                    f"{p['dns_inflight']} in flight; " if "dns_duration" in p else "")
                 + f"Linux {m['kernel']}, {m['cpu_count']} CPUs ({m['cpu_model']}); rootless tools run as "
                 f"`{p['as_user']}`. Raw numbers: `{json_name}`.")
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
    lines.append("")
    lines.append("| contender | UDP echo p50 µs | p99 µs | UDP sandbox→world Gbit/s (loss) "
                 "| UDP world→sandbox Gbit/s (loss) | DNS stub cached q/s | DNS stub uncached q/s "
                 "| DNS direct to server q/s (context) |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")

    def udp_cell(u):
        if not u or u.get("gbps_median") is None:
            return "—"
        return f"{u['gbps_median']:.3f} ({fmt(u.get('loss_pct_median'), '.2f', '?')} %)"
    for k, c in res["contenders"].items():
        if c["status"] != "ok":
            lines.append(f"| {c['label']} | {c['status']} | | | | | | |")
            continue
        ul, ut, dn = c.get("udp_latency") or {}, c.get("udp_throughput") or {}, c.get("dns") or {}
        q = {x: (dn.get(x) or {}).get("qps") for x in ("stub_cached", "stub_uncached", "direct")}
        stub_na = "n/a (no stub)" if k == "veth" else "n/a (not measured)"
        if k == "tether":
            cc, cu = fmt(q["stub_cached"], ",.0f"), fmt(q["stub_uncached"], ",.0f")
            direct = "n/a (captured by the stub)"
        else:
            cc = cu = stub_na if dn else "—"
            direct = fmt(q["direct"], ",.0f")
        lines.append(f"| {c['label']} | {fmt(ul.get('p50_us'), '.0f')} | {fmt(ul.get('p99_us'), '.0f')} "
                     f"| {udp_cell(ut.get('up'))} | {udp_cell(ut.get('down'))} | {cc} | {cu} | {direct} |")
    lines.append("")
    lines.append("UDP throughput is the receiver's rate (iperf3 `sum_received`) with its loss. DNS: answered "
                 "queries/s (NOERROR with an A record) from one stdlib client in the sandbox; \"direct\" "
                 "queries the world's server at " + DNS_IP + " with no stub in between, as context only "
                 "(slirp4netns and pasta have DNS forwarders, which relay to the host's resolv.conf and "
                 "so are not measured here).")
    if res.get("inbound"):
        lines.append("")
        lines += inbound_table(res)
    busy = m.get("cpu_busy_before_pct")
    if busy is not None and busy > 10:
        lines.append("")
        lines.append(f"**Caution:** other work used {busy:.0f}% of the CPUs just before the run started; "
                     "these numbers are noisier than usual.")
    ct = res.get("contention") or {}
    phases = {k: v for k, v in (ct.get("by_phase_mean_pct") or {}).items() if k != "setup"}
    if (ct.get("mean_pct") or 0) > 5 or any(v > 10 for v in phases.values()):
        worst = ", ".join(f"{k} {v:.0f} %" for k, v in phases.items())
        lines.append("")
        lines.append(f"**Caution: contended run.** Other processes used on average {ct['mean_pct']:.0f} % of the "
                     f"machine's CPU during the run (by phase: {worst}). These numbers are noisier than a "
                     "quiet run's; prefer a run without this warning.")
    allowed = m.get("cpus_allowed")
    if allowed and len(allowed) < (m.get("cpu_count") or 0):
        lines.append("")
        lines.append(f"**Pinned run:** everything ran on CPU(s) {','.join(map(str, allowed))} only (the "
                     "script's affinity, inherited by every process it started).")
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


def inbound_table(res: dict) -> list[str]:
    p = res["params"]
    lines = ["| inbound: world → server in the sandbox | forwarding | world→sandbox Gbit/s "
             "| sandbox→world Gbit/s (same connection) | connect+echo p50 µs | p99 µs |",
             "|---|---|---:|---:|---:|---:|"]
    for k, r in res["inbound"].items():
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r['how']} | {r['status']}: {oneline(r.get('note', ''), 160)} | | | |")
            continue
        t, la = r.get("throughput") or {}, r.get("latency") or {}
        lat_na = "n/a" if r.get("tool") != "py" else "—"
        lines.append(f"| {r['label']} | {r['how']} | {fmt((t.get('in') or {}).get('gbps_median'), '.2f')} "
                     f"| {fmt((t.get('out') or {}).get('gbps_median'), '.2f')} "
                     f"| {fmt(la.get('p50_us'), '.0f', lat_na)} | {fmt(la.get('p99_us'), '.0f', lat_na)} |")
    lines.append("")
    lines.append(f"Inbound: one TCP stream per run from the world netns to the host netns's address "
                 f"({HOST_IP}; veth: routed to {VETH_SBX}), {p['duration']} s after {p['omit']} s of warm-up, "
                 f"× {p['repeats']} per direction (median), the receiver's rate; the same Python server "
                 f"(`INBOUND_PROG`) in every sandbox, and the same client; the iperf3 row calibrates it on veth. "
                 f"Latency: {p['latency_count']} sequential connections from the world.")
    return lines


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
    inb = [(k, r) for k, r in (res.get("inbound") or {}).items() if r.get("status") == "ok"]
    fig, axs2 = plt.subplots(3 if inb else 2, 3, figsize=(17, 15 if inb else 10))
    axs = [a for row in axs2 for a in row]

    def bars(ax, series, names, unit, fmt_, texts=None, xlabels=None):
        xs0 = list(range(len(series[0])))
        w = 0.8 / len(series)
        for i, (vals, name) in enumerate(zip(series, names)):
            xs = [xx + (i - (len(series) - 1) / 2) * w for xx in xs0]
            bs = ax.bar(xs, [v or 0 for v in vals], w, label=name)
            for j, (bar, v) in enumerate(zip(bs, vals)):
                t = "n/a" if v is None else format(v, fmt_)
                if texts and texts[i][j]:
                    t = texts[i][j] if v is None else t + "\n" + texts[i][j]
                ax.annotate(t, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(xs0)
        ax.set_xticklabels(xlabels or labels, fontsize=8)
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
    p = res.get("params", {})
    ax = axs[3]
    bars(ax, [[g(c, "udp_latency", "p50_us") for _, c in C], [g(c, "udp_latency", "p99_us") for _, c in C]],
         ["p50", "p99"], "µs", ".0f")
    ax.set_title("UDP 1-byte echo, connected socket (lower is better)")
    ax.legend(fontsize=8)
    ax = axs[4]
    ups = [g(c, "udp_throughput", "up", "gbps_median") for _, c in C]
    downs = [g(c, "udp_throughput", "down", "gbps_median") for _, c in C]
    w = 0.4
    for i, (vals, d, name) in enumerate(((ups, "up", "sandbox→world"), (downs, "down", "world→sandbox (-R)"))):
        xs = [xx + (i - 0.5) * w for xx in x]
        bs = ax.bar(xs, [v or 0 for v in vals], w, label=name)
        for bar, (_, c), v in zip(bs, C, vals):
            loss = g(c, "udp_throughput", d, "loss_pct_median")
            t = "n/a" if v is None else f"{v:.3f} Gbit/s, {fmt(loss, '.1f', '?')} % lost"
            ax.annotate(t, (bar.get_x() + bar.get_width() / 2, 0.02), rotation=90, ha="center", va="bottom",
                        fontsize=7, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75})
    want = _rate_bps(p.get("udp_rate", ""))
    if want:
        ax.axhline(want / 1e9, color="grey", ls=":", lw=1, label=f"offered {p.get('udp_rate')}bit/s")
    ax.set_ylim(0, max([want / 1e9 if want else 0] + [v for v in ups + downs if v]) * 1.25 or 1)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("Gbit/s received")
    ax.set_title(f"iperf3 UDP, {p.get('udp_rate')}bit/s offered, {p.get('udp_len')} B datagrams (target: < 1 % lost)")
    ax.legend(fontsize=7, loc="upper right", ncol=3)
    ax = axs[5]
    # Only what was measured: tether's stub (cached, uncached), the others direct to the server
    # (hatched: context, not a stub).
    series = (("stub_cached", "tether stub, cached name", "tab:blue", ""),
              ("stub_uncached", "tether stub, uncached names", "tab:orange", ""),
              ("direct", "direct to the world's server, no stub (context)", "tab:gray", "//"))
    seen = set()
    vals_all = []
    for xx, (_, c) in zip(x, C):
        have = [(k, lab, col, h, g(c, "dns", k, "qps")) for k, lab, col, h in series if g(c, "dns", k, "qps") is not None]
        for j, (k, lab, col, h, v) in enumerate(have):
            xb = xx + (j - (len(have) - 1) / 2) * 0.35
            bar = ax.bar([xb], [v], 0.35, color=col, hatch=h, alpha=0.55 if h else 1.0,
                         label=None if k in seen else lab)[0]
            seen.add(k)
            vals_all.append(v)
            ax.annotate(f"{v:,.0f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
        if not have:
            ax.annotate("not measured", (xx, TARGET_DNS_CACHED_QPS / 8), ha="center", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(TARGET_DNS_CACHED_QPS / 10, max(vals_all + [TARGET_DNS_CACHED_QPS]) * 4)
    ax.axhline(TARGET_DNS_CACHED_QPS, color="red", ls="--", lw=1,
               label=f"tether target {TARGET_DNS_CACHED_QPS:,.0f} q/s (cached)")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("answered queries/s (log)")
    ax.set_title(f"DNS over UDP, {p.get('dns_inflight')} queries in flight (higher is better)")
    ax.legend(fontsize=7, loc="upper right")
    if inb:
        ilabels = [r["label"].replace(" (rootful, routed)", "").replace(" MTU ", "\nMTU ")
                   .replace(", iperf3 (calibration)", "\niperf3 (calib.)")
                   .replace(", no sandbox (context)", "\n(context)") for _, r in inb]
        ax = axs[6]
        bars(ax, [[g(r, "throughput", "in", "gbps_median") for _, r in inb],
                  [g(r, "throughput", "out", "gbps_median") for _, r in inb]],
             ["world→sandbox (inbound)", "sandbox→world (same connection)"], "Gbit/s", ".2f", xlabels=ilabels)
        ax.set_title("inbound TCP, world → server in the sandbox (higher is better)")
        v = g(dict(inb).get("veth"), "throughput", "in", "gbps_median")
        for goal, flag, col in ((TARGET_IN_PUBLISH_VS_VETH, "-p", "red"), (TARGET_IN_LISTEN_VS_VETH, "--listen", "purple")):
            if v:
                ax.axhline(v * goal, color=col, ls="--", lw=1, label=f"tether {flag} target {goal:g}× veth (inbound)")
        ax.legend(fontsize=7)
        for tk in ax.get_xticklabels():
            tk.set_fontsize(7)
        ax = axs[7]
        bars(ax, [[g(r, "latency", "p50_us") for _, r in inb], [g(r, "latency", "p99_us") for _, r in inb]],
             ["p50", "p99"], "µs", ".0f", xlabels=ilabels)
        ax.set_title("inbound connect + 1-byte echo + close (context)")
        ax.legend(fontsize=8)
        for tk in ax.get_xticklabels():
            tk.set_fontsize(7)
        axs[8].axis("off")
    m = res["machine"]
    fig.suptitle(f"tether benchmark {res['timestamp']}{' (QUICK smoke run)' if res['quick'] else ''} — "
                 f"Linux {m['kernel']}, {m['cpu_count']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --- main ----------------------------------------------------------------------------------------

ALL = ["veth", "slirp4netns-1500", "slirp4netns-65520", "pasta", "tether"]
MEASURES = ["tcp", "latency", "udp", "udp-latency", "dns", "inbound", "inbound-latency", "startup"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Must run as root. Method and results: docs/benchmarks.md.")
    ap.add_argument("--quick", action="store_true",
                    help="short smoke run: --duration 2 --omit 0 --repeats 1 --latency-count 200 --startup-runs 5 "
                         "(also the inbound measures'; explicit flags still win)")
    ap.add_argument("--duration", type=int, help="iperf3 (and inbound) seconds per run [10; quick 2]")
    ap.add_argument("--omit", type=int, help="iperf3 -O warm-up seconds not counted [1; quick 0]")
    ap.add_argument("--repeats", type=int, help="iperf3 runs per contender and direction, median reported [3; quick 1]")
    ap.add_argument("--latency-count", type=int, help="connections measured [1000; quick 200]")
    ap.add_argument("--latency-warmup", type=int, default=20, help="connections made first and not counted [20]")
    ap.add_argument("--startup-runs", type=int, help="start-up runs, median reported [20; quick 5]")
    ap.add_argument("--udp-count", type=int, help="UDP 1-byte echo round trips measured [1000; quick 200]")
    ap.add_argument("--udp-warmup", type=int, default=20, help="UDP round trips made first and not counted [20]")
    ap.add_argument("--udp-rate", default="1G", help="iperf3 -u offered load (-b) [1G]")
    ap.add_argument("--udp-len", type=int, default=1400,
                    help="iperf3 -u datagram payload bytes (-l) [1400: fits a 1500 MTU, no fragments]")
    ap.add_argument("--udp-duration", type=int, help="iperf3 -u seconds per run [5; quick 2]")
    ap.add_argument("--udp-window", default="4M",
                    help="iperf3 -u socket buffers (-w) of both iperf3 ends; '' for iperf3's default [4M]")
    ap.add_argument("--dns-duration", type=float, help="DNS load seconds per mode, after warm-up [5; quick 2]")
    ap.add_argument("--dns-warmup", type=float, help="DNS load seconds not counted [1; quick 0.5]")
    ap.add_argument("--dns-inflight", type=int, default=32, help="DNS queries kept outstanding [32]")
    ap.add_argument("--measure", default=",".join(MEASURES),
                    help="comma-separated subset of: " + ",".join(MEASURES) + " [all]")
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
                              ("latency_count", 1000, 200), ("startup_runs", 20, 5),
                              ("udp_count", 1000, 200), ("udp_duration", 5, 2),
                              ("dns_duration", 5.0, 2.0), ("dns_warmup", 1.0, 0.5)):
        if getattr(a, name) is None:
            setattr(a, name, quick if q else full)
    ms = [s.strip() for s in a.measure.split(",") if s.strip()]
    bad = [s for s in ms if s not in MEASURES]
    if bad:
        ap.error(f"unknown measurement(s) {bad}; choose from {MEASURES}")
    a.measures = set(ms)
    if a.udp_window in ("0", "default"):
        a.udp_window = ""
    if not re.fullmatch(r"\d+(\.\d+)?[KMG]?", a.udp_rate) or (a.udp_window and not re.fullmatch(r"\d+[KM]?", a.udp_window)):
        ap.error("--udp-rate takes e.g. 1G, 500M; --udp-window e.g. 4M")
    if not (1 <= a.udp_len <= 65507 and 1 <= a.udp_count <= 100000 and 0 <= a.udp_warmup <= 1000
            and 1 <= a.udp_duration <= 600 and 0.5 <= a.dns_duration <= 600 and 0 <= a.dns_warmup <= 60
            and 1 <= a.dns_inflight <= 1024):
        ap.error("a UDP/DNS count, size or duration is out of range")
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
        "schema": 2, "timestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "quick": args.quick,
        "params": {"duration": args.duration, "omit": args.omit, "repeats": args.repeats,
                   "latency_count": args.latency_count, "latency_warmup": args.latency_warmup,
                   "startup_runs": args.startup_runs, "as_user": args.as_user,
                   "udp_count": args.udp_count, "udp_warmup": args.udp_warmup, "udp_rate": args.udp_rate,
                   "udp_len": args.udp_len, "udp_duration": args.udp_duration,
                   "udp_window": args.udp_window or None, "dns_duration": args.dns_duration,
                   "dns_warmup": args.dns_warmup, "dns_inflight": args.dns_inflight,
                   "measures": [m for m in MEASURES if m in args.measures],
                   "tether_cmd": tether_cmd, "tether_args": args.tether_arg},
        "machine": machine_info(tether_cmd),
        "topology": {"world_server": WORLD_IP, "host_netns_addr": f"{HOST_IP}/24 via veth to world {WORLD_LINK_IP}",
                     "veth_contender": f"{VETH_SBX}/25 routed through the host netns ({VETH_GW}), no NAT",
                     "iperf3_port": IPERF_PORT, "echo_port": ECHO_PORT, "udp_echo_port": UDP_ECHO_PORT,
                     "dns_server": f"{DNS_IP}:{DNS_PORT} (wildcard: every A -> {DNS_ANSWER_IP}, TTL {DNS_TTL})",
                     "inbound": f"server in each sandbox on :{INBOUND_PORT}; forwarders listen on "
                                f"0.0.0.0:{INBOUND_HOST_PORT}+row in the host netns; clients in the world "
                                f"connect to {HOST_IP} (veth: routed to {VETH_SBX})",
                     "link_mtu": 1500},
        "contenders": {},
    }

    # Upper bound for long-lived helpers (echo server, slirp namespaces): generous, but finite.
    n = len(args.selected)
    life = 600 + n * (2 * args.repeats * (args.duration + args.omit + 40) + args.latency_count * 0.05 + 120
                      + 2 * args.repeats * (args.udp_duration + 50) + args.udp_count * 0.05 + 150
                      + 3 * (args.dns_duration + args.dns_warmup + 70) + args.startup_runs * 35
                      + 2 * (2 * args.repeats * (args.duration + args.omit + 50) + args.latency_count * 0.05 + 90))

    bid = secrets.token_hex(3)
    topo = Topology(bid)
    mon = ContentionMonitor(set() if user.root else {user.uid})
    mon.start()
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

        M = args.measures
        # Throughput: round-robin over contenders, `repeats` times, so drift hits all alike.
        if "tcp" in M:
            mon.phase = "tcp"
            samples = round_robin(live, ("up", "down"), args.repeats, lambda c, d: measure_iperf(c, d == "down", args),
                                  "iperf3", {c.key: out[c.key]["errors"] for c in live})
            for c in live:
                out[c.key]["throughput"] = tput_summary(samples[c.key])

        # UDP throughput at a fixed offered load, round-robin likewise.
        if "udp" in M:
            mon.phase = "udp"
            samples = round_robin(live, ("up", "down"), args.repeats,
                                  lambda c, d: measure_udp_iperf(c, d == "down", args), "iperf3 -u",
                                  {c.key: out[c.key]["errors"] for c in live},
                                  lambda s: (f"{s['gbps']:.3f} Gbit/s received (sent {s['sender_gbps']:.3f}), "
                                             f"loss {fmt(s['lost_percent'], '.2f', '?')} %"))
            for c in live:
                thr = {"offered": args.udp_rate, "len": args.udp_len}
                for d in ("up", "down"):
                    ss = samples[c.key][d]

                    def med(k):
                        v = [x[k] for x in ss if x.get(k) is not None]
                        return statistics.median(v) if v else None
                    thr[d] = {"gbps_median": med("gbps"), "sender_gbps_median": med("sender_gbps"),
                              "loss_pct_median": med("lost_percent"),
                              "loss_pct_max": max((x["lost_percent"] for x in ss if x.get("lost_percent") is not None),
                                                  default=None),
                              "samples_gbps": [x["gbps"] for x in ss], "runs": ss}
                out[c.key]["udp_throughput"] = thr

        # Latency.
        if "latency" in M:
            mon.phase = "latency"
            for c in live:
                try:
                    out[c.key]["latency"] = la = measure_latency(c, args)
                    log(f"{c.key}: connect+echo p50 {la['p50_us']:.0f} µs, p99 {la['p99_us']:.0f} µs ({la['count']})")
                except ERRS as e:
                    out[c.key]["errors"].append(f"latency: {e}")
                    log(f"{c.key}: latency failed: {e}")
        if "udp-latency" in M:
            mon.phase = "udp-latency"
            for c in live:
                try:
                    out[c.key]["udp_latency"] = la = measure_udp_latency(c, args)
                    log(f"{c.key}: UDP echo p50 {la['p50_us']:.0f} µs, p99 {la['p99_us']:.0f} µs "
                        f"({la['count']}, lost {la['lost']})")
                except ERRS as e:
                    out[c.key]["errors"].append(f"UDP latency: {e}")
                    log(f"{c.key}: UDP latency failed: {e}")

        # DNS: tether's stub (cached and uncached names); every contender direct to the world's
        # server (context: the path without a stub; for tether that query is captured by the stub).
        if "dns" in M:
            mon.phase = "dns"
            for c in live:
                d = out[c.key]["dns"] = {}
                runs = [("direct", "uncached", DNS_IP)]
                if isinstance(c, Tether):
                    runs = [("stub_cached", "cached", "10.0.2.3"), ("stub_uncached", "uncached", "10.0.2.3")]
                    if not c.has_stub:
                        d["note"] = c.note or "no DNS stub"
                        runs = []
                elif isinstance(c, Veth):
                    d["note"] = "no DNS stub (plain routed netns)"
                else:
                    d["note"] = ("stub not measured: its built-in DNS forwarder relays to the host's "
                                 "/etc/resolv.conf, which this private topology must not reach")
                for key, mode, server in runs:
                    try:
                        d[key] = j = measure_dns(c, mode, server, args)
                        log(f"{c.key}: DNS {key} ({server}): {j['qps']:.0f} q/s, p50 {fmt(j['p50_us'], '.0f')} µs, "
                            f"{j['timeouts']} timeouts, {j['errors']} errors")
                    except ERRS as e:
                        out[c.key]["errors"].append(f"DNS {key}: {e}")
                        log(f"{c.key}: DNS {key} failed: {e}")

        # Inbound (issue 4): a server inside each sandbox, clients in the world netns; every row's
        # server runs for the whole phase (idle while another row is measured).
        if M & {"inbound", "inbound-latency"}:
            mon.phase = "inbound"
            rows = inbound_rows(live, "inbound" in M)
            inb = res["inbound"] = {}
            for r in rows:
                inb[r.key] = {"label": r.label, "contender": r.c.key, "mode": r.mode or None, "tool": r.tool,
                              "how": r.how, "target": f"{r.target[0]}:{r.target[1]}", "status": "ok",
                              "note": "", "errors": []}
            try:
                for r in rows:
                    try:
                        r.start(life)
                        log(f"{r.key}: inbound server ready, world -> {r.target[0]}:{r.target[1]} ({r.how})")
                    except ERRS as e:
                        inb[r.key].update(status="error", note=str(e))
                        log(f"{r.key}: inbound: {e}")
                        r.stop()
                ok = [r for r in rows if inb[r.key]["status"] == "ok"]
                errs = {r.key: inb[r.key]["errors"] for r in ok}
                if "inbound" in M:
                    samples = round_robin(ok, ("in", "out"), args.repeats, lambda r, d: measure_inbound(r, d, args),
                                          "inbound", errs)
                    for r in ok:
                        inb[r.key]["throughput"] = tput_summary(samples[r.key])
                if "inbound-latency" in M:
                    mon.phase = "inbound-latency"
                    for r in ok:
                        if r.tool != "py":
                            continue
                        try:
                            inb[r.key]["latency"] = la = measure_inbound_latency(r, args)
                            log(f"{r.key}: inbound connect+echo p50 {la['p50_us']:.0f} µs, "
                                f"p99 {la['p99_us']:.0f} µs ({la['count']})")
                        except ERRS as e:
                            errs[r.key].append(f"inbound latency: {e}")
                            log(f"{r.key}: inbound latency failed: {e}")
            finally:
                for r in rows:
                    r.stop()

        # The long-lived sandboxes are no longer needed.
        for c in live:
            c.teardown()

        # Start-up, interleaved; plus the fixed nsenter/fork/exec baseline.
        mon.phase = "startup"
        st = {c.key: [] for c in live}
        base = []
        for i in range(args.startup_runs if "startup" in M else 0):
            t0 = time.perf_counter()
            if run(in_ns(topo.host) + ["true"], timeout=10).returncode == 0:
                base.append(time.perf_counter() - t0)
            for c in live:
                try:
                    st[c.key].append(c.startup_once())
                except ERRS as e:
                    out[c.key]["errors"].append(f"start-up #{i + 1}: {e}")
        res["baseline_startup_ms"] = statistics.median(base) * 1000 if base else None
        for c in live if "startup" in M else []:
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
        mon.stop()
    res["elapsed_s"] = round(time.monotonic() - t_start, 1)
    res["contention"] = mon.result()
    res["machine"]["loadavg_end"] = os.getloadavg()

    res["ratios"], res["targets"] = summarize(res)
    args.out.mkdir(parents=True, exist_ok=True)
    jpath = args.out / f"{stamp}{'-quick' if args.quick else ''}.json"
    jpath.write_text(json.dumps(res, indent=1) + "\n")
    log(f"wrote {jpath}")
    try:
        shown = str(jpath.resolve().relative_to(REPO))
    except ValueError:
        shown = str(jpath)
    if not args.no_publish:
        (args.out / "latest.json").write_text(json.dumps(res, indent=1) + "\n")
        note = plot(res, args.out / "latest.png")
        if note:
            log(note)
        else:
            log(f"wrote {args.out / 'latest.png'}")
        update_docs(docs_block(res, shown))
        log(f"updated {DOCS}")
    print(docs_block(res, shown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
