"""The world's IPv6, UDP, ICMP and DNS services themselves (no tether involved).

Everything runs from the *host* netns (``ip netns exec tether-host-<id> ...``), where tether's host
side will run: the same view tether has. DNS answers are checked with dnspython (the reference
client) and, for the stdlib client that the sandboxed tests will use (``world.DNS_QUERY``), against
dnspython's answers.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import struct
from pathlib import Path

import pytest
from servers import BIG_TXT, HUGE_TXT, WORLD_BODY, pattern_sha256
from world import (
    ADS_ADDR6,
    DNS_ADDR,
    DNS_ADDR6,
    DNS_QUERY,
    DOWNLOAD,
    HALF_CLOSE,
    HOST_ADDR,
    HOST_ADDR6,
    MARKER_DIR,
    PING,
    PORTS,
    ROGUE_DNS_ADDR,
    ROGUE_DNS_ADDR6,
    SANDBOX_PYTHON,
    UDP_ECHO,
    UPLOAD,
    WORLD_ADDR,
    WORLD_ADDR2,
    WORLD_ADDR2_6,
    WORLD_ADDR6,
    WORLD_ADDRS,
    WORLD_ADDRS6,
    World,
    WorldError,
    netns_list,
    reap_stale,
)

DNS_SERVERS = [pytest.param(DNS_ADDR, id="v4"), pytest.param(DNS_ADDR6, id="v6")]
ROGUE_SERVERS = [pytest.param(ROGUE_DNS_ADDR, id="v4"), pytest.param(ROGUE_DNS_ADDR6, id="v6")]
FAMILIES = [pytest.param(WORLD_ADDR, id="v4"), pytest.param(WORLD_ADDR6, id="v6")]
TEST_USER = os.environ.get("TETHER_TEST_USER", "tether-test")

# A dnspython client for the host netns (run with the venv's python). argv[1]: a JSON list of
# {"server", "name", "type", "transport": "udp"|"tcp"|"fallback", "edns": None|payload}.
DNSPY = r"""
import json, sys
import dns.edns, dns.flags, dns.message, dns.query, dns.rcode, dns.rdatatype

def rrsets(section):
    return [[rr.name.to_text(), dns.rdatatype.to_text(rr.rdtype), rr.ttl, sorted(x.to_text() for x in rr)]
            for rr in section]

out = []
for q in json.loads(sys.argv[1]):
    edns = q.get("edns")
    m = dns.message.make_query(q["name"], q.get("type", "A"), use_edns=0 if edns else False, payload=edns or 512)
    t = q["transport"]
    tcp_used = t == "tcp"
    if t == "udp":
        resp = dns.query.udp(m, q["server"], timeout=3)
    elif t == "tcp":
        resp = dns.query.tcp(m, q["server"], timeout=3)
    else:
        resp, tcp_used = dns.query.udp_with_fallback(m, q["server"], timeout=3)
    out.append({"rcode": dns.rcode.to_text(resp.rcode()), "flags": dns.flags.to_text(resp.flags).split(),
                "answer": rrsets(resp.answer), "authority": rrsets(resp.authority), "tcp_used": tcp_used,
                "edns": resp.edns,
                "ede": [[o.code, o.text] for o in resp.options if isinstance(o, dns.edns.EDEOption)]})
print(json.dumps(out))
"""


def dnspy(world, queries: list[dict]) -> list[dict]:
    return world.host_json(DNSPY, json.dumps(queries), python=world.python)


def soa(origin: str) -> list:
    return [origin, "SOA", 5, ["ns1.example.test. hostmaster.example.test. 1 3600 600 86400 5"]]


def a(name, *addrs, ttl=60):
    return [name, "A", ttl, sorted(addrs)]


def aaaa(name, *addrs, ttl=60):
    return [name, "AAAA", ttl, sorted(addrs)]


def cname(name, target):
    return [name, "CNAME", 60, [target]]


# (name, type) -> (rcode, answer, authority): the zone contents of servers.AUTH_ZONES as a
# client sees them (CNAME chains followed by the server).
EXPECTED = {
    ("example.test", "A"): ("NOERROR", [a("example.test.", "203.0.113.10")], []),
    ("example.test", "AAAA"): ("NOERROR", [aaaa("example.test.", "2001:db8:10::10")], []),
    ("www.example.test", "A"): ("NOERROR", [cname("www.example.test.", "example.test."),
                                            a("example.test.", "203.0.113.10")], []),
    ("www.example.test", "AAAA"): ("NOERROR", [cname("www.example.test.", "example.test."),
                                               aaaa("example.test.", "2001:db8:10::10")], []),
    ("www.example.test", "CNAME"): ("NOERROR", [cname("www.example.test.", "example.test.")], []),
    ("deep.example.test", "A"): ("NOERROR", [cname("deep.example.test.", "www.example.test."),
                                             cname("www.example.test.", "example.test."),
                                             a("example.test.", "203.0.113.10")], []),
    ("deep.example.test", "AAAA"): ("NOERROR", [cname("deep.example.test.", "www.example.test."),
                                                cname("www.example.test.", "example.test."),
                                                aaaa("example.test.", "2001:db8:10::10")], []),
    ("multi.example.test", "A"): ("NOERROR", [a("multi.example.test.", "203.0.113.10", "203.0.113.11",
                                                "203.0.113.12")], []),
    ("multi.example.test", "AAAA"): ("NOERROR", [aaaa("multi.example.test.", "2001:db8:10::10",
                                                      "2001:db8:10::11", "2001:db8:10::12")], []),
    ("ads.example.test", "A"): ("NOERROR", [a("ads.example.test.", "203.0.113.66")], []),
    ("ads.example.test", "AAAA"): ("NOERROR", [aaaa("ads.example.test.", "2001:db8:10::66")], []),
    ("other.test", "A"): ("NOERROR", [a("other.test.", "198.51.100.10")], []),
    ("other.test", "AAAA"): ("NOERROR", [aaaa("other.test.", "2001:db8:10::20")], []),
    ("cname-to-denied.other.test", "A"): ("NOERROR", [cname("cname-to-denied.other.test.", "ads.example.test."),
                                                      a("ads.example.test.", "203.0.113.66")], []),
    ("cname-to-denied.other.test", "AAAA"): ("NOERROR", [cname("cname-to-denied.other.test.", "ads.example.test."),
                                                         aaaa("ads.example.test.", "2001:db8:10::66")], []),
    ("private.example.test", "A"): ("NOERROR", [a("private.example.test.", "10.1.2.3")], []),
    ("private.example.test", "AAAA"): ("NOERROR", [], [soa("example.test.")]),  # NODATA
    ("short.example.test", "A"): ("NOERROR", [a("short.example.test.", "203.0.113.10", ttl=2)], []),
    ("short.example.test", "AAAA"): ("NOERROR", [aaaa("short.example.test.", "2001:db8:10::10", ttl=2)], []),
    ("ads.example.test", "TXT"): ("NOERROR", [], [soa("example.test.")]),  # NODATA
    ("nope.example.test", "A"): ("NXDOMAIN", [], [soa("example.test.")]),
    ("nope.example.test", "AAAA"): ("NXDOMAIN", [], [soa("example.test.")]),
    ("x.ads.example.test", "A"): ("NXDOMAIN", [], [soa("example.test.")]),
    ("nope.other.test", "A"): ("NXDOMAIN", [], [soa("other.test.")]),
    ("example.com", "A"): ("NXDOMAIN", [], [soa(".")]),  # outside the test zones
    # The answer keeps the case of the question.
    ("Example.TEST", "A"): ("NOERROR", [a("Example.TEST.", "203.0.113.10")], []),
}


# --------------------------------------------------------------------------------------------
# topology


def test_ipv6_topology(world):
    r = world.in_host(["ip", "-j", "-6", "addr", "show", "dev", "eth0", "scope", "global"])
    addrs = {(x["local"], x["prefixlen"]) for link in json.loads(r.stdout) for x in link["addr_info"] if "local" in x}
    assert addrs == {(HOST_ADDR6, 64)}, r.stdout
    r = world.in_host(["ip", "-j", "-6", "route", "show", "2001:db8:10::/64"])
    routes = json.loads(r.stdout)
    assert [(x["dst"], x.get("gateway")) for x in routes] == [("2001:db8:10::/64", "2001:db8:1::2")], r.stdout
    for run in (world.in_host, world.in_world):
        r = run(["ip", "-j", "-6", "route", "show", "default"])
        assert json.loads(r.stdout or "[]") == [], r.stdout
    r = world.in_world(["ip", "-j", "addr", "show", "dev", "lo"])
    owned = {x["local"] for link in json.loads(r.stdout) for x in link["addr_info"] if "local" in x}
    assert set(WORLD_ADDRS) | set(WORLD_ADDRS6) <= owned, owned


def test_ping_group_range_only_in_host_netns(world):
    r = world.in_host(["cat", "/proc/sys/net/ipv4/ping_group_range"])
    assert r.stdout.split() == ["0", "2147483647"], r
    # The world keeps the kernel default (nobody may open ICMP datagram sockets there).
    r = world.in_world(["cat", "/proc/sys/net/ipv4/ping_group_range"])
    assert r.stdout.split() == ["1", "0"], r


# --------------------------------------------------------------------------------------------
# TCP services on every address, IPv6 included

SERVICES_EVERYWHERE = r"""
import json, socket, sys
body, port_http, port_echo, port_udp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out = {}
for host in sys.argv[5:]:
    r = {}
    with socket.create_connection((host, port_http), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            data += d
    r["http"] = data.startswith(b"HTTP/1.0 200") and data.endswith(body.encode())
    with socket.create_connection((host, port_echo), timeout=5) as s:
        s.sendall(b"echo " + host.encode())
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            data += d
    r["echo"] = data == b"echo " + host.encode()
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.connect((host, port_udp))  # connected: a reply from another source address is dropped
        s.send(b"udp " + host.encode())
        r["udpecho"] = s.recv(100) == b"udp " + host.encode()
    out[host] = r
print(json.dumps(out))
"""


def test_services_on_every_world_address(world):
    res = world.host_json(SERVICES_EVERYWHERE, WORLD_BODY.decode(), PORTS["http"], PORTS["echo"], PORTS["udpecho"],
                          *WORLD_ADDRS, *WORLD_ADDRS6)
    bad = {host: r for host, r in res.items() if not all(r.values())}
    assert not bad and set(res) == set(WORLD_ADDRS) | set(WORLD_ADDRS6), res


def test_http_over_ipv6_with_curl(world):
    for addr in (WORLD_ADDR6, WORLD_ADDR2_6):
        r = world.in_host(["curl", "-sS", "-g", "--noproxy", "*", "--max-time", "5", f"http://[{addr}]/"])
        assert r.returncode == 0 and r.stdout == WORLD_BODY.decode(), r


def test_tcp_transfers_over_ipv6(world):
    n = 5_000_000
    assert world.host_json(UPLOAD, WORLD_ADDR6, PORTS["sink"], n)["reply"] == pattern_sha256(n)
    res = world.host_json(DOWNLOAD, WORLD_ADDR6, PORTS["source"], n)
    assert res["received"] == n and res["sha256"] == pattern_sha256(n)
    assert world.host_json(HALF_CLOSE, WORLD_ADDR6, PORTS["halfclose"], 1234)["reply"] == "got 1234 bytes\n"


# --------------------------------------------------------------------------------------------
# UDP echo and sink


@pytest.mark.parametrize("addr", FAMILIES)
def test_udp_echo_integrity(world, addr):
    sizes = [1, 1400, 65507] + ([65527] if ":" in addr else [])  # the largest IPv4 / IPv6 payloads
    res = world.host_json(UDP_ECHO, addr, PORTS["udpecho"], *sizes)
    assert [r["size"] for r in res] == sizes
    for r in res:
        assert r["ok"] and r["tries"] == 1, res


def test_udp_socket_buffers(world):
    """Every UDP socket of the world has 4 MiB buffers (the kernel shows them doubled)."""
    r = world.in_world(["ss", "-uamnH"])
    lines = r.stdout.splitlines()
    socks = {line.split()[3]: nxt for line, nxt in zip(lines, lines[1:]) if not line.startswith("\t")}
    assert set(socks) == {"*:7", "*:9100", f"{DNS_ADDR}:53", f"[{DNS_ADDR6}]:53", f"{ROGUE_DNS_ADDR}:53",
                          f"[{ROGUE_DNS_ADDR6}]:53"}, r.stdout
    for local, skmem in socks.items():
        assert "rb8388608," in skmem and "tb8388608," in skmem, (local, skmem)


MANY_UDP = r"""
import json, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
socks = []
for i in range(n):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.connect((host, port))
    socks.append(s)
for i, s in enumerate(socks):
    s.send(b"flow-%05d" % i)
ok = sum(s.recv(100) == b"flow-%05d" % i for i, s in enumerate(socks))
print(json.dumps({"ok": ok}))
"""


@pytest.mark.parametrize("addr", FAMILIES)
def test_udp_echo_many_flows(world, addr):
    assert world.host_json(MANY_UDP, addr, PORTS["udpecho"], 500) == {"ok": 500}


UDP_BLAST = r"""
import json, socket, sys
port, plan = int(sys.argv[1]), json.loads(sys.argv[2])
out = []
for host, count, size in plan:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, port))
    for _ in range(count):
        s.send(b"x" * size)
    local = s.getsockname()
    out.append(("[%s]:%d" if ":" in local[0] else "%s:%d") % (local[0], local[1]))
    s.close()
print(json.dumps(out))
"""

STATS_QUERY = r"""
import json, socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20) as s:
    s.sendall(sys.argv[3].encode() + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        d = s.recv(65536)
        if not d:
            break
        data += d
print(data.decode().strip())
"""


def test_udp_sink_counts_per_sender(fresh_udp_sink):
    world = fresh_udp_sink
    plan = [[WORLD_ADDR, 200, 1000], [WORLD_ADDR2, 50, 1], [WORLD_ADDR6, 30, 1400]]
    senders = world.host_json(UDP_BLAST, PORTS["udpsink"], json.dumps(plan))
    assert senders[0].startswith(HOST_ADDR + ":") and senders[2].startswith(f"[{HOST_ADDR6}]:"), senders
    stats = world.udp_sink_stats(settle=0.2)
    want = {sender: (count, count * size) for sender, (_host, count, size) in zip(senders, plan)}
    got = {sender: (s["datagrams"], s["bytes"]) for sender, s in stats["senders"].items()}
    assert got == want, stats
    assert stats["datagrams"] == 280 and stats["bytes"] == 200_000 + 50 + 42_000
    for s in stats["senders"].values():
        assert s["first"] <= s["last"] <= stats["now"]
    # The same over the TCP query port, from the host netns, on IPv4 and IPv6.
    for addr in (WORLD_ADDR, WORLD_ADDR6):
        remote = world.host_json(STATS_QUERY, addr, PORTS["udpstats"], "stats 0.1")
        assert {k: (v["datagrams"], v["bytes"]) for k, v in remote["senders"].items()} == want
    assert world.host_json(STATS_QUERY, WORLD_ADDR, PORTS["udpstats"], "reset") == {"ok": True}
    assert world.udp_sink_stats(settle=0)["senders"] == {}
    assert "error" in world.host_json(STATS_QUERY, WORLD_ADDR, PORTS["udpstats"], "bogus")


def test_udp_port_unreachable_is_not_rate_limited(world):
    """The world's ICMP rate limits are off: each datagram to a closed port is refused."""
    code = r"""
import json, socket, sys
n, refused = 300, 0
for host in sys.argv[1:]:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect((host, 9))
    for _ in range(n):
        s.send(b"x")
        try:
            s.recv(10)
        except ConnectionRefusedError:
            refused += 1
        except socket.timeout:
            pass
print(json.dumps({"refused": refused}))
"""
    assert world.host_json(code, WORLD_ADDR, WORLD_ADDR6) == {"refused": 600}


# --------------------------------------------------------------------------------------------
# ICMP


def test_ping_every_world_address_as_root(world):
    res = world.host_json(PING, json.dumps({"targets": [*WORLD_ADDRS, *WORLD_ADDRS6], "count": 2}))
    assert all(r["ok"] for r in res) and len(res) == len(WORLD_ADDRS) + len(WORLD_ADDRS6), res


def test_ping_as_unprivileged_user(world):
    """ping_group_range lets any user open ICMP datagram sockets in the host netns (and only there)."""
    pw = pwd.getpwnam(TEST_USER)
    setpriv = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "--"]
    res = world.host_json(PING, WORLD_ADDR, WORLD_ADDR6, ADS_ADDR6, prefix=setpriv)
    assert all(r["ok"] for r in res), res
    r = world.in_world([*setpriv, SANDBOX_PYTHON, "-c", PING, "127.0.0.1"])
    res = json.loads(r.stdout.splitlines()[-1])
    assert not res[0]["ok"] and res[0]["error"].startswith("EACCES"), res


# --------------------------------------------------------------------------------------------
# DNS: the test zones


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("server", DNS_SERVERS)
def test_dns_zones(world, server, transport):
    keys = list(EXPECTED)
    res = dnspy(world, [{"server": server, "name": n, "type": t, "transport": transport} for n, t in keys])
    problems = []
    for (name, qtype), got in zip(keys, res):
        rcode, answer, authority = EXPECTED[(name, qtype)]
        if (got["rcode"], got["answer"], got["authority"]) != (rcode, answer, authority):
            problems.append(f"{name} {qtype}: want {rcode} {answer} {authority}\n"
                            f"   got {got['rcode']} {got['answer']} {got['authority']}")
        if "AA" not in got["flags"] or "TC" in got["flags"] or "RA" in got["flags"]:
            problems.append(f"{name} {qtype}: flags {got['flags']}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("server", DNS_SERVERS)
def test_dns_big_answers_truncate_over_udp(world, server):
    queries = [
        {"name": "big.example.test", "type": "TXT", "transport": "udp"},  # no EDNS: 512 B
        {"name": "big.example.test", "type": "TXT", "transport": "udp", "edns": 1232},
        {"name": "big.example.test", "type": "TXT", "transport": "udp", "edns": 4096},
        {"name": "big.example.test", "type": "TXT", "transport": "tcp"},
        {"name": "big.example.test", "type": "TXT", "transport": "fallback"},
        {"name": "huge.example.test", "type": "TXT", "transport": "udp", "edns": 4096},
        {"name": "huge.example.test", "type": "TXT", "transport": "fallback", "edns": 4096},
    ]
    res = dnspy(world, [dict(q, server=server) for q in queries])
    big = ["big.example.test.", "TXT", 60, sorted(f'"{s}"' for s in BIG_TXT)]
    huge = ["huge.example.test.", "TXT", 60, sorted(f'"{s}"' for s in HUGE_TXT)]
    for r in res[0], res[1], res[5]:
        assert "TC" in r["flags"] and r["answer"] == [] and r["rcode"] == "NOERROR", r
    assert "TC" not in res[2]["flags"] and res[2]["answer"] == [big], res[2]
    assert res[3]["answer"] == [big] and "TC" not in res[3]["flags"]
    assert res[4]["tcp_used"] and res[4]["answer"] == [big]
    assert res[6]["tcp_used"] and res[6]["answer"] == [huge]
    # The stdlib client of the sandboxed tests: TC over UDP, then TCP.
    (r,) = world.host_json(DNS_QUERY, json.dumps([{"server": server, "name": "big.example.test", "type": "TXT"}]))
    assert r["ok"] and r["truncated_udp"] and r["transport"] == "tcp", r
    assert sorted(x["data"] for x in r["answer"]) == sorted(BIG_TXT)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("server", ROGUE_SERVERS)
def test_rogue_dns(world, server, transport):
    world.reset_dns_counters()
    names = ["example.test", "www.example.test", "anything.invalid"]
    queries = [{"server": server, "name": n, "type": t, "transport": transport, "edns": 1232}
               for n in names for t in ("A", "AAAA")]
    res = dnspy(world, queries)
    for q, r in zip(queries, res):
        want = "198.51.100.10" if q["type"] == "A" else "2001:db8:10::20"
        assert r["rcode"] == "NOERROR" and r["answer"] == [[q["name"] + ".", q["type"], 60, [want]]], (q, r)
        assert r["ede"] == [[0, "rogue"]], r
    assert world.dns_queries("example.test", server="rogue") == 2
    assert world.dns_queries("example.test") == 0  # the real server saw nothing


def test_stdlib_dns_client_agrees_with_dnspython(world):
    """world.DNS_QUERY (stdlib only, for /usr/bin/python3 in the sandbox) parses what dnspython does."""
    keys = [k for k in EXPECTED if k[1] in ("A", "AAAA", "CNAME")]
    for server in (DNS_ADDR, DNS_ADDR6):
        for transport in ("udp", "tcp"):
            ref = dnspy(world, [{"server": server, "name": n, "type": t, "transport": transport} for n, t in keys])
            mine = world.host_json(DNS_QUERY, json.dumps([{"server": server, "name": n, "type": t,
                                                           "transport": transport} for n, t in keys]))
            for (name, qtype), want, got in zip(keys, ref, mine):
                assert got["ok"] and got["id_ok"] and got["transport"] == transport, got
                assert got["rcode"] == want["rcode"] and "aa" in got["flags"], (name, qtype, got)
                flat = sorted([x["name"], x["type"], x["ttl"], x["data"]] for x in got["answer"])
                assert flat == sorted([n, t, ttl, d] for n, t, ttl, ds in want["answer"] for d in ds), (got, want)
                auth = [[x["name"], x["type"], x["ttl"], [x["data"]]] for x in got["authority"]]
                assert auth == want["authority"], (got, want)
    (r,) = world.host_json(DNS_QUERY, json.dumps([{"server": ROGUE_DNS_ADDR, "name": "x.test", "edns": 1232}]))
    assert r["edns"] == 4096 and r["ede"] == [{"code": 0, "text": "rogue"}], r


# --------------------------------------------------------------------------------------------
# DNS: counters and robustness


def test_dns_query_counters(fresh_dns):
    world = fresh_dns
    assert world.dns_counts() == [] and world.dns_counts("rogue") == []
    dnspy(world, [
        {"server": DNS_ADDR, "name": "example.test", "type": "A", "transport": "udp"},
        {"server": DNS_ADDR6, "name": "EXAMPLE.test.", "type": "A", "transport": "udp"},
        {"server": DNS_ADDR, "name": "example.test", "type": "AAAA", "transport": "tcp"},
        {"server": DNS_ADDR, "name": "deep.example.test", "type": "A", "transport": "udp"},
        {"server": ROGUE_DNS_ADDR, "name": "example.test", "type": "A", "transport": "udp"},
    ])
    assert world.dns_queries("example.test") == 3
    assert world.dns_queries("Example.Test.") == 3
    assert world.dns_queries("example.test", "A") == 2
    assert world.dns_queries("example.test", transport="tcp") == 1
    assert world.dns_queries("example.test", "AAAA", "udp") == 0
    # Only the name asked for counts, not the CNAME chain the server followed.
    assert world.dns_queries("deep.example.test") == 1 and world.dns_queries("www.example.test") == 0
    assert world.dns_queries("example.test", server="rogue") == 1
    log = world.dns_log()
    assert [(e["name"], e["type"], e["transport"]) for e in log] == [
        ("example.test", "A", "udp"), ("example.test", "A", "udp"), ("example.test", "AAAA", "tcp"),
        ("deep.example.test", "A", "udp")]
    assert log[0]["src"].startswith(HOST_ADDR + ":") and log[1]["src"].startswith(f"[{HOST_ADDR6}]:"), log
    world.reset_dns_counters("auth")
    assert world.dns_queries("example.test") == 0 and world.dns_queries("example.test", server="rogue") == 1
    world.reset_dns_counters()
    assert world.dns_counts("rogue") == []


MALFORMED = r"""
import json, socket, struct, sys
server = sys.argv[1]
fam = socket.AF_INET6 if ":" in server else socket.AF_INET
out = {}
def udp(payload):
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.settimeout(1)
        s.connect((server, 53))
        s.send(payload)
        try:
            return s.recv(65535).hex()
        except socket.timeout:
            return None
out["short"] = udp(b"\x12\x34\x01")
out["garbage"] = udp(struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0) + b"\x3fabc")
out["response"] = udp(struct.pack("!HHHHHH", 0xBEEF, 0x8100, 0, 0, 0, 0))
out["two_questions"] = udp(struct.pack("!HHHHHH", 0xCAFE, 0x0100, 2, 0, 0, 0)
                           + b"\x07example\x04test\x00\x00\x01\x00\x01" * 2)
with socket.create_connection((server, 53), timeout=2) as s:
    bad = b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d"
    s.sendall(struct.pack("!H", len(bad)) + bad)
    data = s.recv(65535)
    out["tcp_garbage"] = data.hex()
print(json.dumps(out))
"""


@pytest.mark.parametrize("server", DNS_SERVERS)
def test_dns_server_survives_malformed_queries(world, server):
    world.reset_dns_counters()
    res = world.host_json(MALFORMED, server)
    assert res["short"] is None and res["response"] is None, res  # nothing to answer / never answer
    hdr = bytes.fromhex(res["garbage"])[:12]
    qid, flags = struct.unpack("!HH", hdr[:4])
    assert qid == 0xBEEF and flags & 0x8000 and flags & 0xF == 1, res  # FORMERR
    hdr = bytes.fromhex(res["two_questions"])[:4]
    assert struct.unpack("!HH", hdr)[0] == 0xCAFE and struct.unpack("!HH", hdr)[1] & 0xF == 1, res
    tcp = bytes.fromhex(res["tcp_garbage"])
    assert struct.unpack("!H", tcp[:2])[0] == len(tcp) - 2 and tcp[5] & 0xF == 1, res
    assert world.dns_queries("", "MALFORMED") == 5
    ok = dnspy(world, [{"server": server, "name": "example.test", "type": "A", "transport": t} for t in ("udp", "tcp")])
    assert [r["answer"] for r in ok] == [[a("example.test.", "203.0.113.10")]] * 2


def test_short_ttl_is_served_unchanged(world):
    """An authoritative server does not count TTLs down: short.example.test is always TTL 2."""
    res = dnspy(world, [{"server": DNS_ADDR, "name": "short.example.test", "type": "A", "transport": "udp"}] * 2)
    assert [r["answer"][0][2] for r in res] == [2, 2]


# --------------------------------------------------------------------------------------------
# lifecycle of the new parts


def test_world_teardown_removes_everything():
    with World() as w:
        run_dir = w.run_dir
        assert run_dir.is_dir() and oct(run_dir.stat().st_mode & 0o777) == "0o700"
        assert {p.name for p in run_dir.iterdir()} == {"udpsink.sock", "dns.sock", "rogue-dns.sock"}
        assert w.dns_queries("example.test") == 0
        names = (w.host_ns, w.world_ns)
    assert not run_dir.exists()
    assert not set(names) & netns_list()
    assert not (MARKER_DIR / f"{w.id}.json").exists()


class _FailingWorld(World):
    def __init__(self, fail_in: str):
        super().__init__()
        self.fail_in = fail_in

    def _start_servers(self):
        if self.fail_in == "servers":
            raise WorldError("injected failure before the servers")
        super()._start_servers()

    def _self_check(self):
        if self.fail_in == "self-check":
            raise WorldError("injected failure after the servers")
        super()._self_check()


@pytest.mark.parametrize("fail_in", ["servers", "self-check"])
def test_partial_setup_is_torn_down(fail_in):
    w = _FailingWorld(fail_in)
    with pytest.raises(WorldError, match="injected"):
        with w:
            pass  # pragma: no cover
    assert not {w.host_ns, w.world_ns} & netns_list()
    assert not w.run_dir.exists() and not (MARKER_DIR / f"{w.id}.json").exists()
    assert all(not srv.alive() for srv in w.servers)
    assert w.cgroup is None or not w.cgroup.exists()


def test_stale_world_is_reaped():
    """A world whose owner died (its marker names a dead pid) loses its netns and control sockets."""
    w = World().__enter__()
    try:
        marker = MARKER_DIR / f"{w.id}.json"
        data = json.loads(marker.read_text())
        data["start"] = -1  # no process ever had that start time: the owner is gone
        marker.write_text(json.dumps(data))
        assert w.id in reap_stale()
        assert not {w.host_ns, w.world_ns} & netns_list()
        assert not w.run_dir.exists() and not marker.exists()
        assert all(not srv.alive() for srv in w.servers)
    finally:
        w.close()


def test_orphan_run_dir_is_reaped():
    orphan = MARKER_DIR / "0badc0de"
    orphan.mkdir(mode=0o700, parents=True)
    Path(orphan, "dns.sock").touch()
    reap_stale()
    assert not orphan.exists()


def test_control_socket_errors_are_reported(world):
    with pytest.raises(WorldError, match="unknown command"):
        world.dns_server.request({"cmd": "nope"})
    with pytest.raises(WorldError, match="no control socket"):
        world.main_server.request({"cmd": "stats"})


def test_unix_control_socket_is_private(world):
    st = os.stat(world.run_dir / "dns.sock")
    assert st.st_uid == 0 and not st.st_mode & 0o077
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(world.run_dir / "dns.sock"))
        s.sendall(b'{"cmd": "stats"}\n')
        assert json.loads(s.makefile().readline())["dns"]["counts"] is not None
