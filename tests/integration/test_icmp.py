"""`tether run`: ICMP echo and other IP protocols (issue 3, scope 4).

``ping`` from the sandbox to an allowed address works (answered through the host's ICMP datagram
sockets; the world's host netns permits them); a denied destination gets ICMP "administratively
prohibited" at once (IPv4 type 3 code 13, IPv6 type 1 code 1) plus a ``deny`` event; any other IP
protocol reaching ``tun0`` gets "protocol unreachable" (IPv4 type 3 code 2; IPv6: parameter
problem type 4 code 1, unrecognized next header) plus a ``deny`` event.

Two clients: the system's ``/usr/bin/ping`` (what users run), and ``RAW_PING``, a raw-socket
client that checks the echoed payload byte for byte and decodes ICMP errors exactly. Raw sockets
need CAP_NET_RAW in the sandbox's netns, hence ``--root`` for it. (The world's ``PING`` client
uses ICMP datagram sockets, which the sandbox's own netns does not permit: its
ping_group_range is the kernel default.)
"""

from __future__ import annotations

import json
import re

import pytest

from world import DNS_LIB, EVENT_KEYS, check_event, describe

TARGETS = [pytest.param("203.0.113.10", id="v4"), pytest.param("2001:db8:10::10", id="v6")]

# Raw-socket ICMP helpers for the sandbox (run with --root).
RAW_LIB = r"""
import errno, json, os, select, socket, struct, sys, time

def _csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF

def _listener(v6):
    return socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                         socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)

def _icmp_of(data, v6):
    return data if v6 else data[(data[0] & 0x0F) * 4:]

def _quoted(icmp, v6):
    # (protocol, first 8 bytes of the payload) of the packet an ICMP error quotes
    q = icmp[8:]
    if v6:
        return q[6], q[40:48]
    ihl = (q[0] & 0x0F) * 4
    return q[9], q[ihl:ihl + 8]

ERROR_TYPES = {False: (3, 11, 12), True: (1, 2, 3, 4)}

def raw_ping(target, size=56, timeout=2.0, seq=1):
    v6 = ":" in target
    ident = (os.getpid() + seq * 7919) & 0xFFFF
    payload = os.urandom(size)
    res = {"target": target, "size": size, "reply": False, "payload_ok": None, "error": None,
           "sent": False, "elapsed_ms": None}
    with _listener(v6) as s:
        hdr = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, ident, seq)
        pkt = hdr + payload
        if not v6:
            pkt = hdr[:2] + struct.pack("!H", _csum(pkt)) + hdr[4:] + payload
        t0 = time.monotonic()
        try:
            s.sendto(pkt, (target, 0))
            res["sent"] = True
        except OSError as e:
            res["error"] = {"errno": errno.errorcode.get(e.errno, str(e.errno))}
            return res
        deadline = t0 + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select([s], [], [], left)
            if not r:
                break
            data, src = s.recvfrom(65535)
            icmp = _icmp_of(data, v6)
            if icmp[0] == (129 if v6 else 0) and struct.unpack("!HH", icmp[4:8]) == (ident, seq):
                res.update(reply=True, payload_ok=icmp[8:] == payload, got=len(icmp) - 8)
                break
            if icmp[0] in ERROR_TYPES[v6]:
                proto, head = _quoted(icmp, v6)
                if proto == (58 if v6 else 1) and len(head) >= 8 and struct.unpack("!HH", head[4:8]) == (ident, seq):
                    res["error"] = {"type": icmp[0], "code": icmp[1], "from": src[0]}
                    break
        res["elapsed_ms"] = (time.monotonic() - t0) * 1000
    return res

def raw_proto(target, proto, timeout=2.0):
    # one datagram of IP protocol ``proto``; the ICMP error that quotes it, if any
    v6 = ":" in target
    res = {"target": target, "proto": proto, "error": None, "elapsed_ms": None}
    marker = b"tether-%d" % os.getpid()
    with _listener(v6) as lst, socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW, proto) as s:
        t0 = time.monotonic()
        s.sendto(marker, (target, 0))
        deadline = t0 + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select([lst], [], [], left)
            if not r:
                break
            data, src = lst.recvfrom(65535)
            icmp = _icmp_of(data, v6)
            if icmp[0] in ERROR_TYPES[v6]:
                qproto, head = _quoted(icmp, v6)
                if qproto == proto and head.startswith(marker[:8]):
                    res["error"] = {"type": icmp[0], "code": icmp[1], "from": src[0]}
                    break
        res["elapsed_ms"] = (time.monotonic() - t0) * 1000
    return res
"""

RAW_PING = RAW_LIB + r"""
spec = json.loads(sys.argv[1])
print(json.dumps([raw_ping(t, size, spec.get("timeout", 2.0), seq)
                  for seq, (t, size) in enumerate(spec["pings"], 1)]))
"""

RAW_PROTO = RAW_LIB + r"""
print(json.dumps([raw_proto(t, int(p)) for t, p in json.loads(sys.argv[1])]))
"""

ADMIN_PROHIBITED = {4: (3, 13), 6: (1, 1)}
PROTOCOL_UNREACHABLE = {4: (3, 2), 6: (4, 1)}


def family(addr: str) -> int:
    return 6 if ":" in addr else 4


def icmp_proto(addr: str) -> tuple[str, ...]:
    # IPv4: "icmp". IPv6: "icmpv6" (the event names the protocol on the wire; "icmp" accepted).
    return ("icmpv6", "icmp") if ":" in addr else ("icmp",)


def bare(endpoint: str) -> str:
    """The address of an event's src/dst, with or without a port."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:\d+|([0-9.]+):\d+|([0-9a-fA-F:.]+)", endpoint)
    assert m, f"not an address: {endpoint!r}"
    return next(g for g in m.groups() if g)


def icmp_events(tether, log, target: str) -> list[dict]:
    events = [ev for ev in tether.events(log) if bare(ev["dst"]) == target]
    for ev in events:
        missing = [k for k in EVENT_KEYS if k not in ev]
        assert not missing, f"event lacks {missing}: {ev}"
    return events


def ping_cmd(target: str, count: int = 3, size: int = 56) -> list[str]:
    return ["/usr/bin/ping", *(["-6"] if ":" in target else []), "-n", "-c", str(count), "-i", "0.2", "-W", "2",
            "-s", str(size), target]


# --------------------------------------------------------------------------------------------
# allowed


@pytest.mark.parametrize("target", TARGETS)
def test_system_ping_works(tether, target):
    log = tether.log_path()
    r = tether(["--log", log, "--", *ping_cmd(target)], timeout=30)
    assert r.returncode == 0, describe(r)
    assert re.search(r"\b3 packets transmitted, 3 received\b", r.stdout), describe(r)
    events = icmp_events(tether, log, target)
    connects = [ev for ev in events if ev["event"] == "connect"]
    assert len(connects) == 1, f"want one connect event for the ping session: {events}"
    ev = connects[0]
    assert ev["proto"] in icmp_proto(target) and ev["verdict"] == "allow" and ev["rule"] == "default", ev
    assert not [e for e in events if e["event"] == "deny"], events


@pytest.mark.parametrize("size", [0, 56, 1400, 8000])
@pytest.mark.parametrize("target", TARGETS)
def test_echo_payload_comes_back_intact(tether, target, size):
    res, r = tether.python_json(RAW_PING, json.dumps({"pings": [[target, size], [target, size]]}), opts=["--root"])
    for x in res:
        assert x["reply"] and x["payload_ok"], f"echo {size} B to {target}: {x}\n{describe(r)}"


# --------------------------------------------------------------------------------------------
# denied


@pytest.mark.parametrize("target", TARGETS)
def test_denied_ping_gets_admin_prohibited(tether, target):
    log = tether.log_path()
    other = "203.0.113.11" if family(target) == 4 else "2001:db8:10::11"
    res, r = tether.python_json(RAW_PING, json.dumps({"pings": [[target, 56], [other, 56]]}),
                                opts=["--root", "--log", log, "--deny", target])
    denied, control = res
    assert not denied["reply"], f"a denied ping was answered: {denied}"
    want = ADMIN_PROHIBITED[family(target)]
    assert denied["error"] is not None and (denied["error"]["type"], denied["error"]["code"]) == want, \
        f"ping {target} (denied): want ICMP type/code {want} (administratively prohibited), got {denied}\n{describe(r)}"
    assert denied["elapsed_ms"] < 1000, f"the refusal took {denied['elapsed_ms']:.0f} ms: {denied}"
    assert control["reply"] and control["payload_ok"], f"control ping {other}: {control}"
    events = icmp_events(tether, log, target)
    assert len(events) == 1 and events[0]["event"] == "deny", f"want one deny event for {target}: {events}"
    ev = events[0]
    assert ev["proto"] in icmp_proto(target) and ev["verdict"] == "deny" and ev["rule"] == target, ev


@pytest.mark.parametrize("target", TARGETS)
def test_denied_system_ping_fails_fast(tether, target):
    r = tether(["--deny", target, "--", *ping_cmd(target, count=1)], timeout=30)
    assert r.returncode == 1, describe(r)
    assert re.search(r"\b1 packets transmitted, 0 received, \+1 errors\b", r.stdout), describe(r)
    assert re.search(r"Packet filtered|Administratively prohibited", r.stdout), describe(r)


@pytest.mark.parametrize("target", [pytest.param("10.1.2.3", id="v4-private"),
                                    pytest.param("fd12::1", id="v6-ula"),
                                    pytest.param("192.0.2.1", id="v4-host-address"),
                                    pytest.param("2001:db8:1::1", id="v6-host-address")])
def test_ping_to_builtin_denied_ranges(tether, target):
    log = tether.log_path()
    res, r = tether.python_json(RAW_PING, json.dumps({"pings": [[target, 56]]}), opts=["--root", "--log", log])
    (x,) = res
    want = ADMIN_PROHIBITED[family(target)]
    assert not x["reply"] and x["error"] and (x["error"]["type"], x["error"]["code"]) == want, \
        f"ping {target}: want administratively prohibited {want}, got {x}\n{describe(r)}"
    events = icmp_events(tether, log, target)
    assert [ev["event"] for ev in events] == ["deny"] and events[0]["rule"].startswith("builtin:"), events


def test_icmp_follows_domain_rules(tether, world):
    """``--default deny --allow example.test``: 203.0.113.10 is unreachable until the sandbox has
    resolved example.test, then it answers pings."""
    code = DNS_LIB + RAW_LIB + r"""
out = [raw_ping("203.0.113.10", 56, 2.0, 1)]
out.append(dns_query("10.0.2.3", "example.test", "A", "udp", 53, 1232, 3.0)["rcode"])
out.append(raw_ping("203.0.113.10", 56, 2.0, 2))
print(json.dumps(out))
"""
    log = tether.log_path()
    res, r = tether.python_json(code, opts=["--root", "--dns", world.dns_addr, "--log", log,
                                            "--default", "deny", "--allow", "example.test"])
    before, rcode, after = res
    assert not before["reply"] and before["error"] and (before["error"]["type"], before["error"]["code"]) == (3, 13), \
        f"ping before resolving: want administratively prohibited, got {before}\n{describe(r)}"
    assert rcode == "NOERROR", res
    assert after["reply"] and after["payload_ok"], f"ping after resolving example.test: {after}\n{describe(r)}"
    events = icmp_events(tether, log, "203.0.113.10")
    assert [(ev["event"], ev["rule"]) for ev in events] == [("deny", "default"), ("connect", "example.test")], events
    assert events[1].get("name") == "example.test", events[1]


# --------------------------------------------------------------------------------------------
# other protocols


@pytest.mark.parametrize("target, proto", [
    pytest.param("203.0.113.10", 253, id="v4-proto-253"),
    pytest.param("203.0.113.10", 132, id="v4-sctp"),
    pytest.param("2001:db8:10::10", 253, id="v6-proto-253"),
])
def test_other_protocol_gets_protocol_unreachable(tether, target, proto):
    log = tether.log_path()
    res, r = tether.python_json(RAW_PROTO, json.dumps([[target, proto]]), opts=["--root", "--log", log])
    (x,) = res
    want = PROTOCOL_UNREACHABLE[family(target)]
    assert x["error"] is not None and (x["error"]["type"], x["error"]["code"]) == want, \
        f"IP protocol {proto} to {target}: want ICMP {want} (protocol unreachable), got {x}\n{describe(r)}"
    assert x["elapsed_ms"] < 1000, x
    events = icmp_events(tether, log, target)
    assert len(events) == 1 and events[0]["event"] == "deny" and events[0]["verdict"] == "deny", events
    assert events[0]["proto"] == str(proto), events


# --------------------------------------------------------------------------------------------
# the audit format


def test_icmp_events_follow_the_audit_format(tether):
    """audit.py: src and dst are ``addr:port`` (IPv6 in brackets) in every event: scripts parse
    them. ICMP has no port; the events must still have the documented shape (e.g. port 0)."""
    log = tether.log_path()
    script = " ; ".join(" ".join(ping_cmd(t, count=1)) for t in ("203.0.113.10", "203.0.113.11", "2001:db8:10::10"))
    r = tether(["--log", log, "--deny", "203.0.113.11", "--", "/bin/sh", "-c", script], timeout=30)
    events = tether.events(log)
    assert len(events) == 3, f"{events}\n{describe(r)}"
    bad = []
    for ev in events:
        try:
            check_event(ev)
        except AssertionError:
            bad.append(f"{ev['event']} {ev['proto']}: src={ev['src']!r} dst={ev['dst']!r}")
    assert not bad, "ICMP events break the documented src/dst format addr:port: " + "; ".join(bad)


# --------------------------------------------------------------------------------------------
# a host that refuses ICMP sockets


@pytest.fixture
def no_ping_sockets(world):
    """The host netns's ping_group_range set to admit nobody, for one test."""
    before = world.in_host(["cat", "/proc/sys/net/ipv4/ping_group_range"]).stdout.split()
    world.sysctl(world.host_ns, "net.ipv4.ping_group_range", "1 0")
    yield world
    world.sysctl(world.host_ns, "net.ipv4.ping_group_range", " ".join(before))


def test_host_refusing_icmp_sockets_is_said_once(tether, no_ping_sockets):
    """Every echo is answered administratively prohibited (fast, not a timeout), and tether says
    once on stderr why and how to allow it."""
    target, other = "203.0.113.10", "203.0.113.11"
    res, r = tether.python_json(RAW_PING, json.dumps({"pings": [[target, 56], [other, 56], [target, 56]]}),
                                opts=["--root"])
    for ping in res:
        assert not ping["reply"] and ping["error"] is not None, res
        assert (ping["error"]["type"], ping["error"]["code"]) == ADMIN_PROHIBITED[4], res
        assert ping["elapsed_ms"] < 1000, res
    assert r.stderr.count("the host refuses ICMP sockets") == 1, r.stderr
    assert "sysctl -w net.ipv4.ping_group_range=" in r.stderr, r.stderr
