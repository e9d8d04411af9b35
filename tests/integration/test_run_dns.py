"""`tether run`: the DNS stub at 10.0.2.3 / fd00:7e7e::3 (issue 3, scope 2).

Every run passes ``--dns`` (the world's authoritative server of the test zones), never the host's
resolv.conf. The sandboxed clients are the standard-library ones of world.py (``DNS_LIB``): they
send EDNS when asked (``"edns": 1232``), which the Extended DNS Error of a denial needs.

Contract checked here:

* resolution through the stub over UDP and TCP, on both stub addresses, forwarding to a v4 or a
  v6 upstream; CNAME chains, several records, NXDOMAIN, answers larger than a UDP message (TC,
  then TCP);
* the cache: a second identical query within the TTL does not reach the world's server (its
  counter, ``world.dns_queries``), a query after the TTL does;
* denied names: REFUSED (or NXDOMAIN with ``--dns-deny nxdomain``) with EDE code 15 whose text
  names the rule (only when the query carried EDNS: no OPT record otherwise), nothing sent
  upstream, an audit event ``{"event": "deny", "proto": "dns", "name", "rule"}``;
* DNS sent to any other server (``dig @other``) is answered by the stub: the rogue server's
  counter stays 0 and the answer is the real one; ``--dns-passthrough`` relays it instead,
  subject to IP policy;
* malformed queries: FORMERR or nothing, and the stub keeps answering (named cases, plus a
  hypothesis-generated corpus of mutated queries).
"""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servers import BIG_TXT, HUGE_TXT
from world import (
    DNS,
    DNS_LIB,
    DNS_QUERY,
    SANDBOX_ADDR,
    check_event,
    describe,
    select_events,
)

DNS6 = "fd00:7e7e::3"
SANDBOX_ADDR6 = "fd00:7e7e::100"
EXAMPLE_A = "203.0.113.10"
EXAMPLE_AAAA = "2001:db8:10::10"
ROGUE_A = "198.51.100.10"  # what the rogue server answers for any A
ROGUE_AAAA = "2001:db8:10::20"
NOBODY = "203.0.113.200"  # routed to the world, owned by nothing there


def stub_for(server: str) -> str:
    return DNS6 if ":" in server else DNS


def dns(tether, world, queries: list[dict], opts=(), upstream: str | None = None):
    """Run DNS_QUERY in a sandbox whose stub forwards to the world's DNS server; returns
    (results, CompletedProcess)."""
    opts = ["--dns", upstream or world.dns_addr, *opts]
    return tether.python_json(DNS_QUERY, json.dumps(queries), opts=opts)


def answers(res: dict, rtype: str) -> set[str]:
    return {rr["data"] for rr in res["answer"] if rr["type"] == rtype}


def assert_answer(res: dict, rcode: str, r, **want: set[str]):
    assert res["ok"] and res["id_ok"], f"no usable answer for {res['name']}: {res}\n{describe(r)}"
    assert "qr" in res["flags"], res
    assert res["rcode"] == rcode, f"{res['name']} {res['qtype']}: rcode {res['rcode']}, want {rcode}: {res}"
    for rtype, addrs in want.items():
        assert answers(res, rtype) == addrs, f"{res['name']} {rtype}: got {answers(res, rtype)}, want {addrs}: {res}"


def dns_denies(events: list[dict]) -> list[dict]:
    return select_events(events, event="deny", proto="dns")


# --------------------------------------------------------------------------------------------
# resolution


@pytest.mark.parametrize("stub, transport, upstream", [
    pytest.param(DNS, "udp", "198.51.100.53", id="udp-v4stub-v4upstream"),
    pytest.param(DNS, "tcp", "198.51.100.53", id="tcp-v4stub-v4upstream"),
    pytest.param(DNS6, "udp", "2001:db8:10::53", id="udp-v6stub-v6upstream"),
    pytest.param(DNS6, "tcp", "2001:db8:10::53", id="tcp-v6stub-v6upstream"),
    pytest.param(DNS6, "udp", "198.51.100.53", id="udp-v6stub-v4upstream"),
])
def test_resolve_through_stub(tether, fresh_dns, stub, transport, upstream):
    world = fresh_dns
    qs = [{"server": stub, "name": "example.test", "type": t, "transport": transport, "edns": 1232}
          for t in ("A", "AAAA")]
    res, r = dns(tether, world, qs, upstream=upstream)
    assert_answer(res[0], "NOERROR", r, A={EXAMPLE_A})
    assert_answer(res[1], "NOERROR", r, AAAA={EXAMPLE_AAAA})
    assert [x["transport"] for x in res] == [transport, transport], res
    for x in res:
        assert all(0 < rr["ttl"] <= 60 for rr in x["answer"]), x
    # It really came from the world's server (the stub forwards; it invents nothing).
    assert world.dns_queries("example.test", "A") == 1, world.dns_counts()
    assert world.dns_queries("example.test", "AAAA") == 1, world.dns_counts()
    assert world.dns_queries("example.test", server="rogue") == 0


def test_cname_chain_multi_and_nxdomain(tether, world):
    qs = [{"server": DNS, "name": n, "type": t, "edns": 1232} for n, t in (
        ("deep.example.test", "A"), ("multi.example.test", "A"), ("multi.example.test", "AAAA"),
        ("nope.example.test", "A"), ("private.example.test", "AAAA"))]
    res, r = dns(tether, world, qs)
    deep, multi4, multi6, nope, nodata = res
    assert_answer(deep, "NOERROR", r, A={EXAMPLE_A})
    assert [(rr["name"], rr["type"], rr["data"]) for rr in deep["answer"]] == [
        ("deep.example.test.", "CNAME", "www.example.test."),
        ("www.example.test.", "CNAME", "example.test."),
        ("example.test.", "A", EXAMPLE_A)], deep
    assert_answer(multi4, "NOERROR", r, A=set(world.multi_addrs))
    assert_answer(multi6, "NOERROR", r, AAAA=set(world.multi_addrs6))
    assert_answer(nope, "NXDOMAIN", r)
    assert nope["answer"] == [] and [rr["type"] for rr in nope["authority"]] == ["SOA"], nope
    assert_answer(nodata, "NOERROR", r)
    assert nodata["answer"] == [] and [rr["type"] for rr in nodata["authority"]] == ["SOA"], nodata


@pytest.mark.parametrize("name, strings, edns", [
    pytest.param("big.example.test", BIG_TXT, None, id="big-2KB-no-edns"),
    pytest.param("big.example.test", BIG_TXT, 1232, id="big-2KB-edns1232"),
    pytest.param("huge.example.test", HUGE_TXT, 4096, id="huge-10KB-edns4096"),
])
def test_large_answer_truncated_then_tcp(tether, world, name, strings, edns):
    """An answer too big for the client's UDP size comes back with TC; the retry over TCP to the
    stub gets all of it."""
    res, r = dns(tether, world, [{"server": DNS, "name": name, "type": "TXT", "transport": "auto", "edns": edns}])
    (x,) = res
    assert x.get("truncated_udp") is True, f"UDP answer for {name} was not truncated: {x}"
    assert x["transport"] == "tcp", x
    assert_answer(x, "NOERROR", r)
    assert sorted(rr["data"] for rr in x["answer"] if rr["type"] == "TXT") == sorted(strings), x


def test_several_queries_on_one_tcp_connection(tether, world):
    """RFC 7766: a client may send several queries on one connection before reading."""
    code = DNS_LIB + r"""
import json, sys
names = ["example.test", "other.test", "multi.example.test"]
wires = [dns_build(n, "A", 1000 + i, 1232) for i, n in enumerate(names)]
s = socket.create_connection((sys.argv[1], 53), timeout=5)
s.sendall(b"".join(struct.pack("!H", len(w)) + w for w in wires))
buf, out = b"", {}
while len(out) < len(wires):
    d = s.recv(65536)
    if not d:
        break
    buf += d
    while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
        n = struct.unpack("!H", buf[:2])[0]
        p = dns_parse(buf[2:2 + n])
        buf = buf[2 + n:]
        out[p["id"]] = {"rcode": p["rcode"], "a": sorted(rr["data"] for rr in p["answer"] if rr["type"] == "A")}
s.close()
print(json.dumps({str(k): v for k, v in out.items()}))
"""
    res, r = tether.python_json(code, DNS, opts=["--dns", world.dns_addr])
    assert res == {
        "1000": {"rcode": "NOERROR", "a": [EXAMPLE_A]},
        "1001": {"rcode": "NOERROR", "a": [world.world_addr2]},
        "1002": {"rcode": "NOERROR", "a": sorted(world.multi_addrs)},
    }, f"{res}\n{describe(r)}"


# --------------------------------------------------------------------------------------------
# cache

DNS_STEPS = DNS_LIB + r"""
import json, sys
out = []
for q in json.loads(sys.argv[1]):
    if "sleep" in q:
        time.sleep(q["sleep"])
        continue
    out.append(dns_query(q["server"], q["name"], q.get("type", "A"), q.get("transport", "auto"),
                         q.get("port", 53), q.get("edns"), q.get("timeout", 3.0)))
print(json.dumps(out))
"""


def test_cache_within_ttl(tether, fresh_dns):
    world = fresh_dns
    q = {"server": DNS, "name": "example.test", "type": "A", "edns": 1232}
    qs = [q, dict(q, transport="tcp"), dict(q, server=DNS6), dict(q, edns=None), dict(q, name="EXAMPLE.test")]
    res, r = dns(tether, world, qs)
    for x in res:
        assert_answer(x, "NOERROR", r, A={EXAMPLE_A})
    assert world.dns_queries("example.test", "A") == 1, \
        f"want 1 upstream query for 5 identical questions (cached within TTL 60), got {world.dns_counts()}"
    # Served from the cache: the TTL counts down, never up.
    assert all(x["answer"][0]["ttl"] <= res[0]["answer"][0]["ttl"] for x in res[1:]), res
    # The question keeps the client's spelling.
    assert res[4]["answer"][0]["name"] == "EXAMPLE.test.", res[4]


def test_cache_expires_after_ttl(tether, fresh_dns):
    """short.example.test has TTL 2: asked again after 3 s, the stub asks the world again."""
    world = fresh_dns
    q = {"server": DNS, "name": "short.example.test", "type": "A", "edns": 1232}
    res, r = tether.python_json(DNS_STEPS, json.dumps([q, q, {"sleep": 3.0}, q]), opts=["--dns", world.dns_addr])
    for x in res:
        assert_answer(x, "NOERROR", r, A={EXAMPLE_A})
        assert 0 <= x["answer"][0]["ttl"] <= 2, x
    assert world.dns_queries("short.example.test", "A") == 2, world.dns_counts()


# --------------------------------------------------------------------------------------------
# denied names


@pytest.mark.parametrize("deny_mode, rcode", [
    pytest.param(None, "REFUSED", id="default-refused"),
    pytest.param("refused", "REFUSED", id="refused"),
    pytest.param("nxdomain", "NXDOMAIN", id="nxdomain"),
])
@pytest.mark.parametrize("stub, transport", [
    pytest.param(DNS, "udp", id="udp-v4"),
    pytest.param(DNS6, "tcp", id="tcp-v6"),
])
def test_denied_name(tether, fresh_dns, deny_mode, rcode, stub, transport):
    world = fresh_dns
    log = tether.log_path()
    opts = ["--log", log, "--deny", "ads.example.test"] + (["--dns-deny", deny_mode] if deny_mode else [])
    qs = [{"server": stub, "name": "ads.example.test", "type": t, "transport": transport, "edns": 1232}
          for t in ("A", "AAAA")]
    qs.append({"server": stub, "name": "example.test", "type": "A", "transport": transport, "edns": 1232})
    res, r = dns(tether, world, qs, opts)
    for x in res[:2]:
        assert_answer(x, rcode, r)
        assert x["answer"] == [], x
        assert x["edns"] is not None, f"EDNS query answered without OPT: {x}"
        assert [e["code"] for e in x["ede"]] == [15], f"want one EDE code 15 (Blocked), got {x['ede']}: {x}"
        assert "ads.example.test" in x["ede"][0]["text"], f"EDE text does not name the rule: {x['ede']}"
    assert_answer(res[2], "NOERROR", r, A={EXAMPLE_A})  # control: other names resolve
    assert world.dns_queries("ads.example.test") == 0, f"a denied name reached the world: {world.dns_counts()}"

    events = tether.events(log)
    for ev in events:
        check_event(ev)
    denies = dns_denies(events)
    assert len(denies) == 2, f"want a dns deny event per query, got {denies}\nall: {events}"
    src = SANDBOX_ADDR6 if ":" in stub else SANDBOX_ADDR
    for ev in denies:
        assert ev["name"] == "ads.example.test" and ev["rule"] == "ads.example.test", ev
        assert ev["verdict"] == "deny", ev
        assert ev["src"].startswith(("[" + src + "]:") if ":" in src else (src + ":")), ev
    assert not select_events(events, event="deny", name="example.test"), events


def test_denied_name_without_edns_has_no_opt(tether, world):
    """The EDE needs EDNS: a query without an OPT record gets the bare rcode (RFC 6891)."""
    log = tether.log_path()
    res, r = dns(tether, world, [{"server": DNS, "name": "ads.example.test", "type": "A", "edns": None}],
                 ["--log", log, "--deny", "ads.example.test"])
    assert_answer(res[0], "REFUSED", r)
    assert res[0]["edns"] is None and res[0]["ede"] == [], res[0]
    (ev,) = dns_denies(tether.events(log))
    assert ev["name"] == "ads.example.test" and ev["rule"] == "ads.example.test", ev


@pytest.mark.parametrize("name", [
    pytest.param("cname-to-denied.other.test", id="cname-to-denied"),
])
def test_cname_to_denied_name_refused(tether, world, name):
    log = tether.log_path()
    qs = [{"server": s, "name": name, "type": t, "edns": 1232} for s, t in ((DNS, "A"), (DNS6, "AAAA"))]
    res, r = dns(tether, world, qs, ["--log", log, "--deny", "ads.example.test"])
    for x in res:
        assert_answer(x, "REFUSED", r)
        assert x["answer"] == [], f"the denied CNAME target's address was handed out: {x}"
        assert [e["code"] for e in x["ede"]] == [15] and "ads.example.test" in x["ede"][0]["text"], x
    denies = dns_denies(tether.events(log))
    assert len(denies) == 2 and all(ev["rule"] == "ads.example.test" for ev in denies), denies
    assert {ev["name"] for ev in denies} <= {name, "ads.example.test"}, denies


# --------------------------------------------------------------------------------------------
# DNS to other servers


@pytest.mark.parametrize("server, transport", [
    pytest.param("198.51.100.99", "udp", id="rogue-v4-udp"),
    pytest.param("198.51.100.99", "tcp", id="rogue-v4-tcp"),
    pytest.param("2001:db8:10::99", "udp", id="rogue-v6-udp"),
    pytest.param("2001:db8:10::99", "tcp", id="rogue-v6-tcp"),
    pytest.param(NOBODY, "udp", id="nonexistent-server-udp"),
])
def test_dns_to_other_server_answered_by_stub(tether, fresh_dns, server, transport):
    world = fresh_dns
    log = tether.log_path()
    qs = [{"server": server, "name": "example.test", "type": "A", "transport": transport, "edns": 1232},
          {"server": server, "name": "example.test", "type": "AAAA", "transport": transport, "edns": 1232},
          {"server": server, "name": "ads.example.test", "type": "A", "transport": transport, "edns": 1232}]
    res, r = dns(tether, world, qs, ["--log", log, "--deny", "ads.example.test"])
    assert_answer(res[0], "NOERROR", r, A={EXAMPLE_A})  # the rogue server would say 198.51.100.10
    assert_answer(res[1], "NOERROR", r, AAAA={EXAMPLE_AAAA})  # ... and 2001:db8:10::20
    assert_answer(res[2], "REFUSED", r)  # policy cannot be bypassed with dig @other
    assert [e["code"] for e in res[2]["ede"]] == [15], res[2]
    rogue = world.dns_counts("rogue")
    assert sum(n for *_, n in rogue) == 0, f"the rogue server was reached: {rogue}"
    assert world.dns_queries("example.test") == 2, world.dns_counts()
    (ev,) = dns_denies(tether.events(log))
    assert ev["name"] == "ads.example.test" and ev["dst"].rsplit(":", 1)[0].strip("[]") == server, ev


@pytest.mark.parametrize("server, transport", [
    pytest.param("198.51.100.99", "udp", id="v4-udp"),
    pytest.param("2001:db8:10::99", "tcp", id="v6-tcp"),
])
def test_dns_passthrough_reaches_other_server(tether, fresh_dns, server, transport):
    world = fresh_dns
    qs = [{"server": server, "name": "example.test", "type": "A", "transport": transport, "edns": 1232},
          {"server": server, "name": "example.test", "type": "AAAA", "transport": transport, "edns": 1232},
          {"server": DNS, "name": "example.test", "type": "A", "edns": 1232}]
    res, r = dns(tether, world, qs, ["--dns-passthrough"])
    assert_answer(res[0], "NOERROR", r, A={ROGUE_A})
    assert_answer(res[1], "NOERROR", r, AAAA={ROGUE_AAAA})
    assert_answer(res[2], "NOERROR", r, A={EXAMPLE_A})  # the stub itself still answers
    assert world.dns_queries("example.test", server="rogue") == 2, world.dns_counts("rogue")
    assert world.dns_queries("example.test", server="rogue", transport=transport) == 2


@pytest.mark.parametrize("server, transport", [
    pytest.param("198.51.100.99", "udp", id="v4-udp"),
    pytest.param("198.51.100.99", "tcp", id="v4-tcp"),
    pytest.param("2001:db8:10::99", "udp", id="v6-udp"),
])
def test_dns_passthrough_subject_to_ip_policy(tether, fresh_dns, server, transport):
    world = fresh_dns
    log = tether.log_path()
    rule = server
    res, r = dns(tether, world, [{"server": server, "name": "example.test", "type": "A", "transport": transport,
                                  "edns": 1232, "timeout": 2}],
                 ["--log", log, "--dns-passthrough", "--deny", rule])
    (x,) = res
    assert not x["ok"] and (x["error"] or "").startswith(("ECONNREFUSED", "ECONNRESET")), \
        f"passthrough DNS to a denied server: want ECONNREFUSED, got {x}\n{describe(r)}"
    assert x["rtt_ms"] < 1500, f"refusal was not immediate: {x}"
    assert sum(n for *_, n in world.dns_counts("rogue")) == 0, world.dns_counts("rogue")
    denies = [ev for ev in select_events(tether.events(log), event="deny")
              if ev["dst"].rsplit(":", 1)[0].strip("[]") == server]
    assert denies and all(ev["proto"] == transport and ev["rule"] == rule for ev in denies), tether.events(log)


# --------------------------------------------------------------------------------------------
# malformed queries

def _q(name: bytes, qid: int = 0x4242, flags: int = 0x0100, qd: int = 1, an: int = 0, ar: int = 0,
       tail: bytes = b"\x00\x01\x00\x01") -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, 0, ar) + name + tail


GOOD_NAME = b"\x07example\x04test\x00"

# (id, bytes, allowed answers): "FORMERR", "NONE" (no reply), "NOTIMP"
MALFORMED = [
    ("empty", b"", {"NONE"}),
    ("one-byte", b"\x42", {"NONE"}),
    ("header-11-bytes", _q(b"", tail=b"")[:11], {"FORMERR", "NONE"}),
    ("header-only-qdcount-1", _q(b"", tail=b""), {"FORMERR", "NONE"}),
    ("qdcount-0", _q(b"", qd=0, tail=b""), {"FORMERR", "NONE"}),
    ("qdcount-2", _q(GOOD_NAME, qd=2), {"FORMERR", "NONE"}),
    ("name-runs-past-end", _q(b"\x3fabc", tail=b""), {"FORMERR", "NONE"}),
    ("label-type-0x40", _q(b"\x41" + b"a" * 65 + b"\x00"), {"FORMERR", "NONE"}),
    ("compression-self-loop", _q(b"\xc0\x0c"), {"FORMERR", "NONE"}),
    ("compression-out-of-range", _q(b"\xc0\xff"), {"FORMERR", "NONE"}),
    ("name-over-255", _q((b"\x3f" + b"a" * 63) * 5 + b"\x00"), {"FORMERR", "NONE"}),
    ("missing-qtype", _q(GOOD_NAME, tail=b"\x00"), {"FORMERR", "NONE"}),
    ("arcount-1-no-record", _q(GOOD_NAME, ar=1), {"FORMERR", "NONE"}),
    ("ancount-garbage", _q(GOOD_NAME, an=3), {"FORMERR", "NONE"}),
    ("trailing-junk", _q(GOOD_NAME) + b"\xde\xad\xbe\xef" * 25, {"FORMERR", "NONE"}),
    ("opcode-update", _q(GOOD_NAME, flags=0x2900), {"FORMERR", "NOTIMP", "NONE"}),
    # A response (QR set) is never answered: two DNS speakers must not bounce errors forever.
    ("qr-set-response", _q(GOOD_NAME, flags=0x8180), {"NONE"}),
    ("random-512", bytes((i * 97 + 13) % 256 for i in range(512)), {"FORMERR", "NONE"}),
    ("all-ff-64", b"\xff" * 64, {"NONE", "FORMERR"}),
]

# Sends each input (hex, argv[2]: JSON list) on its own socket to the stub, waits ``wait`` s for
# replies, then checks that a valid query is still answered. Prints
# {"replies": [{"reply": hex|None, "error": ...}], "after": dns_query result}.
MALFORMED_CLIENT = DNS_LIB + r"""
import json, select, sys
server, inputs, transport, wait = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], float(sys.argv[4])
socks, out = [], []
for h in inputs:
    data = bytes.fromhex(h)
    r = {"reply": None, "error": None}
    try:
        if transport == "udp":
            s = socket.socket(_fam(server), socket.SOCK_DGRAM)
            s.connect((server, 53))
            s.send(data)
        else:
            s = socket.create_connection((server, 53), timeout=5)
            s.sendall(struct.pack("!H", len(data)) + data)
        s.setblocking(False)
        socks.append((s, r))
    except OSError as e:
        r["error"] = "send: %s" % e
    out.append(r)
deadline = time.monotonic() + wait
bufs = {}
while time.monotonic() < deadline:
    live = [s for s, r in socks if r["reply"] is None and r["error"] is None]
    if not live:
        break
    ready, _, _ = select.select(live, [], [], max(0, deadline - time.monotonic()))
    for s in ready:
        r = dict((id(x), y) for x, y in socks)[id(s)]
        try:
            d = s.recv(65536)
        except OSError as e:
            r["error"] = "recv: %s" % e
            continue
        if transport == "udp":
            r["reply"] = d.hex()
            continue
        if not d:
            r["error"] = "eof"
            continue
        b = bufs.setdefault(id(s), b"") + d
        bufs[id(s)] = b
        if len(b) >= 2 and len(b) >= 2 + struct.unpack("!H", b[:2])[0]:
            r["reply"] = b[2:2 + struct.unpack("!H", b[:2])[0]].hex()
for s, _ in socks:
    s.close()
after = [dns_query(server, "example.test", "A", transport, 53, 1232, 3.0),
         dns_query(server, "other.test", "A", "udp", 53, None, 3.0)]
print(json.dumps({"replies": out, "after": after}))
"""


def _classify(reply_hex: str | None, sent: bytes) -> str:
    if reply_hex is None:
        return "NONE"
    reply = bytes.fromhex(reply_hex)
    if len(reply) < 12:
        return f"SHORT:{reply_hex}"
    qid, flags = struct.unpack("!HH", reply[:4])
    if not flags & 0x8000:
        return "NO-QR-BIT"
    if len(sent) >= 2 and qid != struct.unpack("!H", sent[:2])[0]:
        return f"WRONG-ID:{qid:#x}"
    return {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}.get(
        flags & 15, str(flags & 15))


def _malformed_run(tether, world, inputs: list[bytes], transport: str, server: str = DNS, wait: float = 0.5):
    res, r = tether.python_json(MALFORMED_CLIENT, server, json.dumps([b.hex() for b in inputs]), transport, wait,
                                opts=["--dns", world.dns_addr])
    after_tcp, after_udp = res["after"]
    assert after_tcp["ok"] and after_tcp["rcode"] == "NOERROR" and answers(after_tcp, "A") == {EXAMPLE_A}, \
        f"the stub stopped answering after malformed input: {after_tcp}\n{describe(r)}"
    assert after_udp["ok"] and answers(after_udp, "A") == {world.world_addr2}, after_udp
    return res["replies"], r


@pytest.mark.parametrize("data, allowed", [pytest.param(d, a, id=i) for i, d, a in MALFORMED])
def test_malformed_query_udp(tether, world, data, allowed):
    (reply,), r = _malformed_run(tether, world, [data], "udp")
    got = _classify(reply["reply"], data)
    assert got in allowed, f"malformed query {data[:40].hex()}: want one of {sorted(allowed)}, got {got}: {reply}"


@pytest.mark.parametrize("data, allowed", [pytest.param(d, a, id=i) for i, d, a in MALFORMED
                                           if i in ("empty", "header-only-qdcount-1", "compression-self-loop",
                                                    "name-over-255", "qr-set-response", "random-512")])
def test_malformed_query_tcp(tether, world, data, allowed):
    """Over TCP (length-prefixed): FORMERR on the connection, or the connection closed without
    an answer; a new connection is answered."""
    (reply,), r = _malformed_run(tether, world, [data], "tcp", server=DNS6)
    got = _classify(reply["reply"], data)
    assert got in allowed, f"malformed query over TCP {data[:40].hex()}: want {sorted(allowed)}, got {got}: {reply}"


@st.composite
def mutated_queries(draw) -> bytes:
    """A valid query, then byte flips, truncation and junk: mostly-plausible DNS for the parser."""
    name = draw(st.sampled_from([GOOD_NAME, b"\x05multi" + GOOD_NAME, b"\x03ads" + GOOD_NAME, b"\x00"]))
    opt = draw(st.booleans())
    base = bytearray(_q(name, qid=draw(st.integers(0, 0xFFFF)), flags=draw(st.sampled_from([0x0100, 0x0000, 0x0120])),
                        ar=int(opt), tail=struct.pack("!HH", draw(st.sampled_from([1, 28, 16, 255, 0, 41, 252])), 1))
                     + (b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00" if opt else b""))
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(2, len(base) - 1))  # keep the id: replies are matched by it
        base[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        base = base[:draw(st.integers(2, len(base)))]
    base += draw(st.binary(max_size=16))
    return bytes(base)


@settings(max_examples=3, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(inputs=st.lists(st.one_of(mutated_queries(), st.binary(min_size=2, max_size=80)), min_size=40, max_size=40))
def test_fuzz_stub_parser(tether, world, inputs):
    """Any bytes: the reply (if any) is a response with the query's id; the stub keeps answering."""
    replies, r = _malformed_run(tether, world, inputs, "udp", wait=1.5)
    bad = []
    for data, reply in zip(inputs, replies):
        got = _classify(reply["reply"], data)
        if got.startswith(("SHORT", "NO-QR", "WRONG-ID")) or reply["error"]:
            bad.append((data.hex(), got, reply))
        # A message with QR set is a response: answering it would start a loop.
        if len(data) >= 3 and data[2] & 0x80 and got != "NONE":
            bad.append((data.hex(), "answered a response", got))
    assert not bad, f"bad replies to fuzzed input: {bad[:5]}"
