"""`tether run`: UDP (issue 3, scope 1).

Every datagram the sandbox sends is captured and relayed through one host socket per flow
(sandbox source addr:port + destination); replies come back from the destination's address.
Checked: exact echo of 1 B / 1400 B / 65507 B datagrams on IPv4 and IPv6, replies' source
addresses, 300 concurrent flows (all answered; the world sees one sender per flow), idle expiry
(``--udp-timeout``: a ``close`` event with the flow's bytes within a few seconds), denied
destinations (ECONNREFUSED on a connected socket, fast, plus a ``deny`` event), bursts of mixed
sizes both ways (exact and in order through the GSO paths, 3000 B ones falling back past the
world link's MTU, nothing lost when the sender exits at once), the cap of 4096 flows.
"""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from world import SANDBOX_ADDR, UDP_ECHO, check_event, describe, select_events

SANDBOX_ADDR6 = "fd00:7e7e::100"
ECHO = 7
SINK = 9100
FAMILIES = [pytest.param("203.0.113.10", id="v4"), pytest.param("2001:db8:10::10", id="v6")]


def ep(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def src_prefix(addr: str) -> str:
    return f"[{SANDBOX_ADDR6}]:" if ":" in addr else f"{SANDBOX_ADDR}:"


def events_of(tether, log) -> list[dict]:
    events = tether.events(log)
    for ev in events:
        check_event(ev)
    return events


def ts(ev: dict) -> float:
    return datetime.fromisoformat(ev["ts"]).timestamp()


# --------------------------------------------------------------------------------------------
# integrity


@pytest.mark.parametrize("addr", FAMILIES)
def test_echo_integrity(tether, addr):
    sizes = [1, 1400, 65507]
    log = tether.log_path()
    res, r = tether.python_json(UDP_ECHO, addr, ECHO, *sizes, opts=["--log", log])
    for x in res:
        assert x["ok"] and x["got"] == x["size"], f"{x['size']} B datagram to {addr}: {x}\n{describe(r)}"
    events = events_of(tether, log)
    dst = ep(addr, ECHO)
    connects = select_events(events, event="connect", proto="udp", dst=dst)
    assert len(connects) == 1, f"one socket, one destination: want one flow, got {connects}\n{events}"
    assert connects[0]["rule"] == "default" and connects[0]["src"].startswith(src_prefix(addr)), connects
    closes = select_events(events, event="close", proto="udp", dst=dst)
    assert len(closes) == 1, f"want the flow's close event (at exit at the latest), got {closes}\n{events}"
    sent = sum(x["size"] * x["tries"] for x in res)
    assert closes[0]["bytes_up"] == sent, (closes[0], res)
    if all(x["tries"] == 1 for x in res):
        assert closes[0]["bytes_down"] == sent, (closes[0], res)


# One unconnected socket sends a distinct payload to each destination; recvfrom must report the
# destination as the source of its reply. argv[1]: JSON list of [addr, port].
REPLY_SOURCES = r"""
import json, socket, sys, time
dests = [tuple(d) for d in json.loads(sys.argv[1])]
fam = socket.AF_INET6 if ":" in dests[0][0] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.settimeout(3)
for i, (a, p) in enumerate(dests):
    s.sendto(b"to-%d" % i, (a, p))
got = {}
try:
    while len(got) < len(dests):
        data, src = s.recvfrom(65536)
        got[data.decode()] = [src[0], src[1]]
except socket.timeout:
    pass
print(json.dumps(got))
"""


@pytest.mark.parametrize("dests", [
    pytest.param([["203.0.113.10", 7], ["203.0.113.11", 7], ["198.51.100.10", 7]], id="v4"),
    pytest.param([["2001:db8:10::10", 7], ["2001:db8:10::11", 7], ["2001:db8:10::20", 7]], id="v6"),
])
def test_replies_come_from_the_destination(tether, dests):
    got, r = tether.python_json(REPLY_SOURCES, json.dumps(dests))
    assert got == {f"to-{i}": d for i, d in enumerate(dests)}, f"reply sources: {got}\n{describe(r)}"


# --------------------------------------------------------------------------------------------
# many flows

# n connected sockets to host:port, one datagram each ("flow-00042"), replies collected with
# select; unanswered ones are re-sent once a second (UDP may drop), for at most 8 s.
# argv: host port n rounds (rounds: how many datagrams each socket sends in total, one per round).
MANY_UDP = r"""
import json, select, socket, sys, time
host, port, n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
want_reply = sys.argv[5] == "1"
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
socks = []
for i in range(n):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.connect((host, port))
    s.setblocking(False)
    socks.append(s)
ports = len({s.getsockname()[1] for s in socks})
errors, resent = [], 0
for rnd in range(rounds):
    for i, s in enumerate(socks):
        s.send(b"flow-%05d-%d" % (i, rnd))
    if rounds > 1:
        time.sleep(0.05)
answered = {}
if want_reply:
    by_fd = {s.fileno(): i for i, s in enumerate(socks)}
    deadline, next_resend = time.monotonic() + 8, time.monotonic() + 1
    while len(answered) < n and time.monotonic() < deadline:
        ready, _, _ = select.select([s for i, s in enumerate(socks) if i not in answered], [], [], 0.2)
        for s in ready:
            i = by_fd[s.fileno()]
            try:
                d = s.recv(65536)
            except OSError as e:
                errors.append("recv %d: %s" % (i, e))
                answered[i] = False
                continue
            answered[i] = d == b"flow-%05d-%d" % (i, rounds - 1)  # its own payload, on its own socket
        if time.monotonic() > next_resend:
            for i, s in enumerate(socks):
                if i not in answered:
                    s.send(b"flow-%05d-%d" % (i, rounds - 1))
                    resent += 1
            next_resend = time.monotonic() + 1
for s in socks:
    s.close()
print(json.dumps({"n": n, "distinct_ports": ports, "ok": sum(1 for v in answered.values() if v),
                  "answered": len(answered), "resent": resent, "errors": errors[:10]}))
"""


@pytest.mark.parametrize("addr", FAMILIES)
def test_many_concurrent_flows_all_answered(tether, addr):
    n = 300
    log = tether.log_path()
    res, r = tether.python_json(MANY_UDP, addr, ECHO, n, 1, 1, opts=["--log", log], timeout=90)
    assert res["distinct_ports"] == n, res
    assert res["ok"] == n, f"{n} concurrent flows: {res['ok']} answered correctly: {res}\n{describe(r)}"
    events = events_of(tether, log)
    connects = select_events(events, event="connect", proto="udp", dst=ep(addr, ECHO))
    assert len({ev["src"] for ev in connects}) == n, f"want {n} flows, got {len(connects)} connect events"


def test_one_host_socket_per_flow(tether, fresh_udp_sink):
    """300 flows, 2 datagrams each, to the world's UDP sink: the world sees exactly 300 senders,
    each with both datagrams (a flow keeps its host socket; flows do not share one)."""
    world = fresh_udp_sink
    n = 300
    res, r = tether.python_json(MANY_UDP, world.world_addr, SINK, n, 2, 0, timeout=90)
    assert res["distinct_ports"] == n, res
    stats = world.udp_sink_stats(settle=0.5)
    per_sender = sorted(v["datagrams"] for v in stats["senders"].values())
    assert len(stats["senders"]) == n, f"want {n} senders at the world, got {len(stats['senders'])}: {stats}"
    assert per_sender == [2] * n, f"datagrams per sender: {per_sender[:10]}...{per_sender[-10:]}"
    assert all(s.split(":")[0] == world.host_addr for s in stats["senders"]), list(stats["senders"])[:5]


# --------------------------------------------------------------------------------------------
# bursts: the batched paths (UDP GSO out of the host socket, GSO frames into the tun)

# One connected socket sends BURST_SIZES back to back (datagram i = byte i % 251, repeated), then,
# in "echo" mode, reads the echoes.  Equal runs become GSO sends / frames; the shorter and longer
# ones end runs; 3000 B exceeds the world link's 1500 B MTU, so the host socket must fall back
# from GSO to plain (fragmented) sends.  argv: host port mode.
BURST_SIZES = [1400] * 150 + [700] * 3 + [1400] * 60 + [1] * 10 + [3000] * 5 + [1400] * 20 + [9]
BURST = r"""
import json, socket, sys
host, port, mode, sizes = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # room for the whole burst's echoes
s.connect((host, port))
s.settimeout(5)
sent = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
for d in sent:
    s.send(d)
out = {"sent": len(sent)}
if mode == "echo":
    got = []
    try:
        while len(got) < len(sent):
            got.append(s.recv(65536))
    except socket.timeout:
        pass
    out.update(received=len(got), exact=sum(g == d for g, d in zip(got, sent)),
               sizes_seen=sorted({len(g) for g in got}))
print(json.dumps(out))
"""


def host_udp_out_datagrams(world) -> int:
    """OutDatagrams of the host netns's UDP MIB: one per send, a GSO send counting once."""
    r = world.in_host(["cat", "/proc/net/snmp"])
    assert r.returncode == 0, describe(r)
    header, values = [line.split()[1:] for line in r.stdout.splitlines() if line.startswith("Udp:")]
    return int(values[header.index("OutDatagrams")])


@pytest.mark.parametrize("addr", FAMILIES)
def test_burst_echo_exact_and_in_order(tether, addr):
    """Every datagram of a burst comes back exactly (content and boundaries) and in order: the
    batched relay neither merges, splits nor reorders datagrams, whatever their sizes."""
    log = tether.log_path()
    res, r = tether.python_json(BURST, addr, ECHO, "echo", json.dumps(BURST_SIZES), opts=["--log", log])
    n = len(BURST_SIZES)
    assert res["received"] == n and res["exact"] == n, \
        f"burst of {n}: {res} (sizes sent {sorted(set(BURST_SIZES))})\n{describe(r)}"
    closes = select_events(events_of(tether, log), event="close", proto="udp", dst=ep(addr, ECHO))
    assert [(c["bytes_up"], c["bytes_down"]) for c in closes] == [(sum(BURST_SIZES),) * 2], closes


@pytest.mark.parametrize("addr", FAMILIES)
def test_burst_leaves_as_segmented_sends(tether, fresh_udp_sink, addr):
    """The world counts every datagram of a burst, with its bytes - and the host netns counted
    fewer sends than datagrams: runs of equal datagrams left as single GSO sends.  The client
    exits right after sending, so most of the burst is relayed by the drain at exit."""
    world = fresh_udp_sink
    before = host_udp_out_datagrams(world)
    res, r = tether.python_json(BURST, addr, SINK, "sink", json.dumps(BURST_SIZES))
    stats = world.udp_sink_stats(settle=0.5)
    sends = host_udp_out_datagrams(world) - before
    assert len(stats["senders"]) == 1, stats
    (sender,) = stats["senders"].values()
    assert (sender["datagrams"], sender["bytes"]) == (len(BURST_SIZES), sum(BURST_SIZES)), (sender, describe(r))
    assert sends < len(BURST_SIZES) // 2, f"{sends} host sends for {len(BURST_SIZES)} datagrams: no GSO?"


# --------------------------------------------------------------------------------------------
# the flow cap

# N connected sockets each send one datagram; after a pause, each socket reports whether it was
# refused (ECONNREFUSED: an ICMP port unreachable came back).  argv: host port n.
FLOW_CAP = r"""
import json, resource, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 100), hard))
socks = []
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, port))
    s.setblocking(False)
    socks.append(s)
for i, s in enumerate(socks):
    s.send(b"cap-%05d" % i)
time.sleep(1.5)
refused = quiet = 0
for s in socks:
    try:
        s.recv(100)
    except ConnectionRefusedError:
        refused += 1
    except BlockingIOError:
        quiet += 1
print(json.dumps({"refused": refused, "quiet": quiet}))
"""


def test_flow_cap_refuses_beyond_4096(tether, fresh_udp_sink):
    """4096 flows at once are relayed; the 4097th and later are refused (port unreachable, so a
    connected socket sees ECONNREFUSED) with one ``error`` event naming the limit."""
    world = fresh_udp_sink
    extra = 20
    log = tether.log_path()
    res, r = tether.python_json(FLOW_CAP, world.world_addr, SINK, 4096 + extra, opts=["--log", log], timeout=120)
    assert (res["refused"], res["quiet"]) == (extra, 4096), f"{res}\n{describe(r)}"
    stats = world.udp_sink_stats(settle=1.0)
    assert len(stats["senders"]) == 4096, len(stats["senders"])
    errors = [e for e in events_of(tether, log) if e["event"] == "error" and "flow limit" in e.get("reason", "")]
    assert len(errors) == 1 and errors[0]["reason"] == "flow limit 4096 reached (1 refused)", errors


# --------------------------------------------------------------------------------------------
# expiry

# Echo once, stay idle ``idle_s`` seconds, echo again from the same socket (same flow key).
EXPIRY = r"""
import json, socket, sys, time
host, port, idle_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect((host, port))
out = {"port": s.getsockname()[1]}
s.send(b"before-idle")
out["first"] = s.recv(100).decode()
time.sleep(idle_s)
s.send(b"after-idle!!")
out["second"] = s.recv(100).decode()
print(json.dumps(out))
"""


@pytest.mark.parametrize("addr", FAMILIES)
def test_idle_flow_expires(tether, addr):
    """``--udp-timeout 1``: the flow closes (a close event with its bytes) within a few seconds
    of going idle, well before the sandbox ends; the same socket then starts a new flow."""
    log = tether.log_path()
    res, r = tether.python_json(EXPIRY, addr, ECHO, 5, opts=["--log", log, "--udp-timeout", "1"])
    assert res["first"] == "before-idle" and res["second"] == "after-idle!!", f"{res}\n{describe(r)}"
    events = events_of(tether, log)
    dst = ep(addr, ECHO)
    flow = [ev for ev in events if ev["dst"] == dst and ev["proto"] == "udp" and ev["event"] in ("connect", "close")]
    assert [ev["event"] for ev in flow] == ["connect", "close", "connect", "close"], \
        f"want the idle flow closed before the second datagram opened a new one: {flow}"
    first_connect, expiry_close, second_connect, _exit_close = flow
    assert expiry_close["src"] == first_connect["src"] == second_connect["src"], flow
    assert (expiry_close["bytes_up"], expiry_close["bytes_down"]) == (11, 11), expiry_close
    idle_for = ts(expiry_close) - ts(first_connect)
    assert 0.9 <= idle_for <= 3.5, f"flow closed {idle_for:.2f} s after it started (timeout 1 s): {flow}"
    assert expiry_close["duration_ms"] >= 900, expiry_close


def test_default_timeout_keeps_a_quiet_flow(tether):
    """Control for the expiry test: without --udp-timeout (60 s) a flow idle for 5 s stays open,
    so the second datagram travels in the same flow (one connect, one close at exit)."""
    log = tether.log_path()
    res, r = tether.python_json(EXPIRY, "203.0.113.10", ECHO, 5, opts=["--log", log])
    assert res["second"] == "after-idle!!", res
    flow = [ev["event"] for ev in events_of(tether, log) if ev["dst"] == "203.0.113.10:7"]
    assert flow == ["connect", "close"], flow


# --------------------------------------------------------------------------------------------
# denied destinations

# Connected UDP socket: send, recv -> {"errno", "data", "elapsed_ms"} for each target "addr:port".
UDP_PROBE = r"""
import errno, json, socket, sys, time
out = []
for target in sys.argv[1:]:
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    r = {"target": target, "errno": None, "data": None}
    t0 = time.monotonic()
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        try:
            s.connect((host, int(port)))
            s.send(b"probe")
            r["data"] = s.recv(100).decode("latin-1")
        except socket.timeout:
            r["errno"] = "TIMEOUT"
        except OSError as e:
            r["errno"] = errno.errorcode.get(e.errno, str(e.errno))
    r["elapsed_ms"] = (time.monotonic() - t0) * 1000
    out.append(r)
print(json.dumps(out))
"""


@pytest.mark.parametrize("rule, denied, allowed", [
    pytest.param("203.0.113.10", "203.0.113.10:7", "203.0.113.11:7", id="v4-address"),
    pytest.param("udp://203.0.113.0/24:7", "203.0.113.10:7", "198.51.100.10:7", id="v4-udp-cidr-port"),
    pytest.param("2001:db8:10::10", "[2001:db8:10::10]:7", "[2001:db8:10::11]:7", id="v6-address"),
    pytest.param("udp://[2001:db8:10::10]:7", "[2001:db8:10::10]:7", "[2001:db8:10::20]:7", id="v6-udp-port"),
])
def test_denied_destination_econnrefused(tether, rule, denied, allowed):
    log = tether.log_path()
    res, r = tether.python_json(UDP_PROBE, denied, allowed, opts=["--log", log, "--deny", rule])
    d, a = res
    assert d["errno"] == "ECONNREFUSED", f"UDP to denied {denied}: want ECONNREFUSED, got {d}\n{describe(r)}"
    assert d["elapsed_ms"] < 1000, f"refusal took {d['elapsed_ms']:.0f} ms: {d}"
    assert a["data"] == "probe", f"control {allowed}: {a}\n{describe(r)}"
    events = events_of(tether, log)
    denies = select_events(events, event="deny", dst=denied)
    assert len(denies) == 1, f"want one deny event for {denied}: {denies}\n{events}"
    assert denies[0]["proto"] == "udp" and denies[0]["rule"] == rule and denies[0]["verdict"] == "deny", denies
    assert not select_events(events, event="connect", dst=denied), events


def test_udp_rule_does_not_deny_tcp(tether):
    """``--deny udp://203.0.113.10:7``: the UDP echo is refused, the TCP echo on the same port is not."""
    code = UDP_PROBE + r"""
import socket
t = socket.create_connection(("203.0.113.10", 7), timeout=5)
t.sendall(b"tcp-too")
t.shutdown(socket.SHUT_WR)
print(json.dumps({"udp": out[0], "tcp": t.recv(100).decode()}))
"""
    res, r = tether.python_json(code, "203.0.113.10:7", opts=["--deny", "udp://203.0.113.10:7"])
    assert res["udp"]["errno"] == "ECONNREFUSED" and res["tcp"] == "tcp-too", f"{res}\n{describe(r)}"


@pytest.mark.parametrize("target, rule", [
    pytest.param("10.1.2.3:7", "builtin:private", id="private-10.1.2.3"),
    pytest.param("169.254.169.254:7", "builtin:link-local", id="metadata-169.254.169.254"),
    pytest.param("192.0.2.1:7", "builtin:host-address", id="host-own-192.0.2.1"),
    pytest.param("10.0.2.2:7", "gateway", id="gateway-10.0.2.2"),
])
def test_builtin_denies_for_udp(tether, target, rule):
    """The default profile applies to datagrams as to connections (IPv6: test_ipv6)."""
    log = tether.log_path()
    res, r = tether.python_json(UDP_PROBE, target, "203.0.113.10:7", opts=["--log", log])
    d, control = res
    assert d["errno"] == "ECONNREFUSED" and d["elapsed_ms"] < 1000, f"UDP to {target}: {d}\n{describe(r)}"
    assert control["data"] == "probe", control
    denies = select_events(events_of(tether, log), event="deny", dst=target)
    assert len(denies) == 1 and denies[0]["proto"] == "udp" and denies[0]["rule"] == rule, denies


@pytest.mark.parametrize("stub", [pytest.param("10.0.2.3", id="v4"), pytest.param("fd00:7e7e::3", id="v6")])
def test_stub_address_serves_only_port_53(tether, stub):
    """The DNS stub listens on port 53 of its address; a datagram to another port of it (here
    the echo port 7, e.g. NTP would be 123) is not DNS: refused like the rest of the sandbox's
    subnet (as TCP to [fd00:7e7e::3]:80 is: ECONNREFUSED, rule "gateway"), not parsed as a query."""
    log = tether.log_path()
    target = ep(stub, 7)
    res, r = tether.python_json(UDP_PROBE, target, opts=["--log", log])
    (x,) = res
    assert x["errno"] == "ECONNREFUSED", f"UDP to {target}: want ECONNREFUSED, got {x}\n{describe(r)}"
    events = events_of(tether, log)
    denies = select_events(events, event="deny", dst=target)
    assert len(denies) == 1 and denies[0]["proto"] == "udp" and denies[0]["rule"] == "gateway", \
        f"want one udp deny event (rule gateway) for {target}: {events}"
