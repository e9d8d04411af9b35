"""`tether run`: domain rules (issue 3, scope 3).

A connection or datagram to an IP matches domain rules through the names the DNS stub served for
that IP to *this* sandbox (valid for the TTL plus a 30 s grace); an IP the sandbox never resolved
matches only IP rules. Domain allows never pierce the builtin denies. For TCP to ports 80 and 443
allowed through a domain rule, the engine reads the TLS SNI / HTTP Host before dialing and refuses
a name the policy does not allow.

Each test runs one sandboxed script of steps (``STEPS``: resolve through the stub, then connect)
in a single sandbox, because the name<->IP mapping is per sandbox. Every run passes ``--dns``.

How a refused TCP connection looks: an address decidable without names is rejected by the
sandbox's nftables (connect() fails with ECONNREFUSED); one that needs names reaches the engine's
listener first and is then reset (ECONNRESET on recv, or EOF). Both count as a refusal here if
they happen fast (< 3 s) and no byte of the world's answer arrives.
"""

from __future__ import annotations

import json
import re

import pytest

from servers import WORLD_BODY
from world import DNS, DNS_LIB, SANDBOX_ADDR, check_event, describe, select_events

DNS6 = "fd00:7e7e::3"
EXAMPLE_A = "203.0.113.10"
EXAMPLE_AAAA = "2001:db8:10::10"
ADS_A = "203.0.113.66"
PRIVATE_A = "10.1.2.3"

# Steps, argv[1] a JSON list; prints a JSON list of results (one per step except "sleep"):
#   {"op": "dns", "name", "type", "server"?, "transport"?}       -> dns_query() result
#   {"op": "tcp", "target": "addr:port", "send": str, "shut": bool, "timeout"}
#        -> {"connected", "errno", "data" (latin-1), "eof", "elapsed_ms"}
#   {"op": "tls", "target", "sni"}   the ClientHello of Python's ssl module, then as "tcp"
#   {"op": "udp", "target", "send": str} -> {"ok", "errno", "data"} (connected socket, 2 s)
#   {"op": "gai", "name"}  getaddrinfo through the sandbox's resolv.conf -> {"addrs" | "error"}
#   {"op": "sleep", "s"}
STEPS = DNS_LIB + r"""
import errno, json, ssl, sys

def _split(target):
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)

def tcp(target, send=b"", shut=False, timeout=5.0):
    host, port = _split(target)
    r = {"op": "tcp", "target": target, "connected": False, "errno": None, "data": "", "eof": False}
    t0 = time.monotonic()
    s = socket.socket(_fam(host), socket.SOCK_STREAM)
    s.settimeout(timeout)
    data = b""
    try:
        s.connect((host, port))
        r["connected"] = True
        if send:
            s.sendall(send)
        if shut:
            s.shutdown(socket.SHUT_WR)
        while len(data) < 1 << 20:
            d = s.recv(65536)
            if not d:
                r["eof"] = True
                break
            data += d
    except socket.timeout:
        r["errno"] = "TIMEOUT"
    except OSError as e:
        r["errno"] = errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()
    r["data"] = data.decode("latin-1")
    r["elapsed_ms"] = (time.monotonic() - t0) * 1000
    return r

def client_hello(sni):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()

def udp(target, send):
    host, port = _split(target)
    r = {"op": "udp", "target": target, "ok": False, "errno": None, "data": None}
    t0 = time.monotonic()
    with socket.socket(_fam(host), socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        try:
            s.connect((host, port))
            s.send(send)
            r["data"] = s.recv(65536).decode("latin-1")
            r["ok"] = True
        except socket.timeout:
            r["errno"] = "TIMEOUT"
        except OSError as e:
            r["errno"] = errno.errorcode.get(e.errno, str(e.errno))
    r["elapsed_ms"] = (time.monotonic() - t0) * 1000
    return r

out = []
for st in json.loads(sys.argv[1]):
    op = st["op"]
    if op == "sleep":
        time.sleep(st["s"])
    elif op == "dns":
        out.append(dns_query(st.get("server", "10.0.2.3"), st["name"], st.get("type", "A"),
                             st.get("transport", "udp"), 53, 1232, 3.0))
    elif op == "tcp":
        out.append(tcp(st["target"], st.get("send", "").encode("latin-1"), st.get("shut", False),
                       st.get("timeout", 5.0)))
    elif op == "tls":
        out.append(tcp(st["target"], client_hello(st["sni"]), False, st.get("timeout", 5.0)))
    elif op == "udp":
        out.append(udp(st["target"], st.get("send", "x").encode("latin-1")))
    elif op == "gai":
        try:
            infos = socket.getaddrinfo(st["name"], 80, type=socket.SOCK_STREAM)
            out.append({"op": "gai", "addrs": sorted({i[4][0] for i in infos}), "error": None})
        except socket.gaierror as e:
            out.append({"op": "gai", "addrs": [], "error": str(e)})
print(json.dumps(out))
"""


def steps(tether, world, steps_: list[dict], opts: list[str]):
    """Run STEPS in one sandbox (stub forwarding to the world's DNS server); (results, events, r)."""
    log = tether.log_path()
    res, r = tether.python_json(STEPS, json.dumps(steps_), opts=["--dns", world.dns_addr, "--log", log, *opts])
    events = tether.events(log)
    for ev in events:
        check_event(ev)
    return res, events, r


def resolve(name: str, qtype: str = "A", server: str = DNS) -> dict:
    return {"op": "dns", "name": name, "type": qtype, "server": server}


def echo(target: str, text: str = "tether-domain-echo\n") -> dict:
    """TCP echo (port 7): send, half-close, read until the server closes."""
    return {"op": "tcp", "target": target, "send": text, "shut": True}


def http(target: str, host: str) -> dict:
    return {"op": "tcp", "target": target,
            "send": f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"}


def ep(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def addrs(res: dict, rtype: str = "A") -> set[str]:
    return {rr["data"] for rr in res.get("answer", []) if rr["type"] == rtype}


def assert_rcode(res: dict, rcode: str, r):
    assert res["ok"], f"no DNS answer for {res['name']}: {res}\n{describe(r)}"
    assert res["rcode"] == rcode, f"{res['name']} {res['qtype']}: rcode {res['rcode']}, want {rcode}: {res}"


def assert_echoed(res: dict, r, text: str = "tether-domain-echo\n"):
    assert res["connected"] and res["errno"] is None and res["eof"] and res["data"] == text, \
        f"{res['target']}: want the echo {text!r}, got {res}\n{describe(r)}"


def assert_http_ok(res: dict, r):
    assert res["errno"] is None and res["data"].startswith("HTTP/1.0 200") \
        and res["data"].endswith(WORLD_BODY.decode()), f"{res['target']}: want HTTP 200, got {res}\n{describe(r)}"


def assert_tcp_refused(res: dict, r):
    """Refused fast, no data: ECONNREFUSED at connect, or a reset / close right after it."""
    # (A reset that arrives while connect() is still polling makes connect() fail with ECONNRESET.)
    kind = ("refused" if not res["connected"] and res["errno"] in ("ECONNREFUSED", "ECONNRESET") else
            "reset" if res["connected"] and res["errno"] in ("ECONNRESET", "EPIPE") else
            "closed" if res["connected"] and res["eof"] and res["errno"] is None else None)
    assert kind is not None and res["data"] == "", \
        f"{res['target']}: want a refusal (ECONNREFUSED, reset, or close without data), got {res}\n{describe(r)}"
    assert res["elapsed_ms"] < 3000, f"{res['target']}: refusal took {res['elapsed_ms']:.0f} ms: {res}"


def one_event(events: list[dict], kind: str, dst: str, **match) -> dict:
    found = select_events(events, event=kind, dst=dst)
    assert len(found) == 1, f"want one {kind} event for {dst}, got {found}\nall events: {events}"
    ev = found[0]
    for k, v in match.items():
        assert ev.get(k) == v, f"{kind} event for {dst}: {k}={ev.get(k)!r}, want {v!r}: {ev}"
    return ev


# --------------------------------------------------------------------------------------------
# allow by name


def test_allow_domain_resolve_then_connect(tether, world):
    res, events, r = steps(tether, world, [
        resolve("example.test"),
        echo(ep(EXAMPLE_A, 7)),
        echo(ep(ADS_A, 7)),  # never resolved by this sandbox
        resolve("other.test"),
    ], ["--default", "deny", "--allow", "example.test"])
    dns_ok, allowed, unresolved, other = res
    assert_rcode(dns_ok, "NOERROR", r)
    assert addrs(dns_ok) == {EXAMPLE_A}, dns_ok
    assert_echoed(allowed, r)
    assert_tcp_refused(unresolved, r)
    assert_rcode(other, "REFUSED", r)

    c = one_event(events, "connect", ep(EXAMPLE_A, 7), proto="tcp", verdict="allow", rule="example.test")
    assert c.get("name") == "example.test", f"connect event lacks the name the decision used: {c}"
    assert c["src"].startswith(SANDBOX_ADDR + ":"), c
    one_event(events, "deny", ep(ADS_A, 7), proto="tcp", verdict="deny", rule="default")
    assert not select_events(events, event="connect", dst=ep(ADS_A, 7)), events
    d = [ev for ev in select_events(events, event="deny", proto="dns") if ev.get("name") == "other.test"]
    assert len(d) == 1 and d[0]["rule"] == "default", events


def test_allow_domain_with_the_system_resolver_and_curl(tether, world):
    """The ordinary path: getaddrinfo (glibc, the sandbox's resolv.conf) and curl by name."""
    log = tether.log_path()
    script = ("curl -sS --noproxy '*' --max-time 10 http://example.test/; echo \"rc=$?\"; "
              "curl -sS --noproxy '*' --max-time 10 http://other.test/; echo \"rc=$?\"")
    r = tether(["--dns", world.dns_addr, "--log", log, "--default", "deny", "--allow", "example.test",
                "--", "/bin/sh", "-c", script], timeout=60)
    assert r.returncode == 0, describe(r)
    first, _, rest = r.stdout.partition("rc=")
    assert first == WORLD_BODY.decode() and rest.startswith("0\n"), f"curl http://example.test/ failed\n{describe(r)}"
    # other.test: the stub refuses the name, so curl cannot resolve it (exit 6).
    assert rest.rstrip().endswith("rc=6"), f"curl http://other.test/ should fail to resolve (6)\n{describe(r)}"
    events = tether.events(log)
    connects = select_events(events, event="connect", proto="tcp")
    assert len(connects) == 1, events
    assert connects[0]["name"] == "example.test" and connects[0]["rule"] == "example.test", connects
    assert connects[0]["dst"] in (ep(EXAMPLE_A, 80), ep(EXAMPLE_AAAA, 80)), connects


# --------------------------------------------------------------------------------------------
# the rule forms

FORMS = [
    # rule, [(name, rcode)]
    pytest.param("example.test", [("example.test", "NOERROR"), ("EXAMPLE.Test", "NOERROR"),
                                  ("www.example.test", "NOERROR"), ("multi.example.test", "NOERROR"),
                                  ("nope.example.test", "NXDOMAIN"), ("badexample.test", "REFUSED"),
                                  ("other.test", "REFUSED")], id="name-and-subdomains"),
    pytest.param("*.example.test", [("example.test", "REFUSED"), ("multi.example.test", "NOERROR"),
                                    ("ads.example.test", "NOERROR"), ("nope.example.test", "NXDOMAIN"),
                                    ("badexample.test", "REFUSED"), ("other.test", "REFUSED")],
                 id="wildcard-subdomains-only"),
    pytest.param("=example.test", [("example.test", "NOERROR"), ("multi.example.test", "REFUSED"),
                                   ("ads.example.test", "REFUSED"), ("other.test", "REFUSED")], id="exact"),
    pytest.param("tcp://example.test:7", [("example.test", "NOERROR"), ("other.test", "REFUSED")],
                 id="proto-port-allow-still-resolves"),
]


@pytest.mark.parametrize("rule, table", FORMS)
def test_rule_forms_decide_resolution(tether, world, rule, table):
    res, events, r = steps(tether, world, [resolve(n) for n, _ in table], ["--default", "deny", "--allow", rule])
    got = {n: x["rcode"] for (n, _), x in zip(table, res)}
    assert got == dict(table), f"--default deny --allow {rule}: got {got}, want {dict(table)}\n{describe(r)}"
    for (n, want), x in zip(table, res):
        if want == "REFUSED":
            assert [e["code"] for e in x["ede"]] == [15] and "default" in x["ede"][0]["text"], x


@pytest.mark.parametrize("rule, resolved, target, allowed, name", [
    pytest.param("*.example.test", "multi.example.test", "203.0.113.11", True, "multi.example.test", id="wildcard-sub"),
    pytest.param("*.example.test", "ads.example.test", ADS_A, True, "ads.example.test", id="wildcard-ads"),
    pytest.param("=example.test", "example.test", EXAMPLE_A, True, "example.test", id="exact"),
    pytest.param("=example.test", "multi.example.test", "203.0.113.11", False, None, id="exact-other-name-refused"),
    pytest.param("example.test", "deep.example.test", EXAMPLE_A, True, None, id="cname-chain"),
    pytest.param("example.test", "multi.example.test", "203.0.113.12", True, "multi.example.test", id="multi-third"),
    pytest.param("example.test", "multi.example.test", EXAMPLE_AAAA.replace("::10", "::11"), True,
                 "multi.example.test", id="multi-aaaa"),
])
def test_rule_forms_decide_connections(tether, world, rule, resolved, target, allowed, name):
    qtype = "AAAA" if ":" in target else "A"
    res, events, r = steps(tether, world, [resolve(resolved, qtype), echo(ep(target, 7))],
                           ["--default", "deny", "--allow", rule])
    answer, conn = res
    dst = ep(target, 7)
    if allowed:
        assert_rcode(answer, "NOERROR", r)
        assert_echoed(conn, r)
        c = one_event(events, "connect", dst, verdict="allow", rule=rule)
        if name is not None:
            assert c.get("name") == name, c
        else:  # a CNAME chain: any name on it that the rule matches
            assert c.get("name") in ("deep.example.test", "www.example.test", "example.test"), c
    else:
        assert_rcode(answer, "REFUSED", r)  # the name is not allowed: no mapping either
        assert_tcp_refused(conn, r)
        one_event(events, "deny", dst, verdict="deny", rule="default")


def test_deny_beats_allow_for_names(tether, world):
    res, events, r = steps(tether, world, [
        resolve("example.test"), resolve("ads.example.test"), resolve("x.ads.example.test"),
        resolve("ADS.example.TEST"), echo(ep(EXAMPLE_A, 7)), echo(ep(ADS_A, 7)),
    ], ["--default", "deny", "--allow", "example.test", "--deny", "ads.example.test"])
    ok, ads, sub, upper, conn_ok, conn_ads = res
    assert_rcode(ok, "NOERROR", r)
    for x in (ads, sub, upper):
        assert_rcode(x, "REFUSED", r)
        assert [e["code"] for e in x["ede"]] == [15] and "ads.example.test" in x["ede"][0]["text"], x
    assert_echoed(conn_ok, r)
    assert_tcp_refused(conn_ads, r)
    dns_denies = select_events(events, event="deny", proto="dns")
    assert len(dns_denies) == 3 and {ev["rule"] for ev in dns_denies} == {"ads.example.test"}, dns_denies


def test_default_deny_refuses_every_name(tether, world):
    res, events, r = steps(tether, world, [resolve("example.test"), resolve("other.test", "AAAA", DNS6)],
                           ["--default", "deny"])
    for x in res:
        assert_rcode(x, "REFUSED", r)
        assert [e["code"] for e in x["ede"]] == [15] and "default" in x["ede"][0]["text"], x
    assert len(select_events(events, event="deny", proto="dns", rule="default")) == 2, events


# --------------------------------------------------------------------------------------------
# nuances and bypass attempts


def test_denied_name_does_not_deny_its_ip_by_default(tether, world):
    """Documented nuance: ``--deny ads.example.test`` refuses the *name* (the stub never serves
    203.0.113.66 for it), so this sandbox never learns that 203.0.113.66 is ads.example.test.
    Connecting to 203.0.113.66 by address then matches only IP rules, and the default allows
    it. To block the address itself, deny the address (or use --default deny)."""
    res, events, r = steps(tether, world, [resolve("ads.example.test"), resolve("ads.example.test", "AAAA"),
                                           echo(ep(ADS_A, 7))], ["--deny", "ads.example.test"])
    a, aaaa, conn = res
    assert_rcode(a, "REFUSED", r)
    assert_rcode(aaaa, "REFUSED", r)
    assert a["answer"] == [] and aaaa["answer"] == [], res
    assert_echoed(conn, r)
    one_event(events, "connect", ep(ADS_A, 7), verdict="allow", rule="default")


def test_private_answer_does_not_pierce_builtin_deny(tether, world):
    """private.example.test -> 10.1.2.3: the name is allowed (and served), the address stays
    denied by the builtin profile; a domain allow never pierces a builtin deny."""
    res, events, r = steps(tether, world, [resolve("private.example.test"), echo(ep(PRIVATE_A, 7)),
                                           echo(ep(EXAMPLE_A, 7)), resolve("example.test"), echo(ep(EXAMPLE_A, 7))],
                           ["--default", "deny", "--allow", "example.test"])
    answer, conn, before, _, after = res
    assert_rcode(answer, "NOERROR", r)
    assert addrs(answer) == {PRIVATE_A}, answer
    assert_tcp_refused(conn, r)
    one_event(events, "deny", ep(PRIVATE_A, 7), verdict="deny", rule="builtin:private")
    assert not select_events(events, event="connect", dst=ep(PRIVATE_A, 7)), events
    # Control: the same allow does open example.test's address once it has been resolved.
    assert_tcp_refused(before, r)
    assert_echoed(after, r)


def test_ipv4_rule_does_not_cover_the_hosts_ipv6_address(tether, world):
    """Documented: an IP rule names addresses. ``--deny 203.0.113.10`` does not cover
    2001:db8:10::10, although both are example.test: the v6 route around an IPv4 rule is open
    by design (deny both addresses, or the name, to close it)."""
    res, events, r = steps(tether, world, [echo(ep(EXAMPLE_A, 7)), echo(ep(EXAMPLE_AAAA, 7))],
                           ["--deny", EXAMPLE_A])
    v4, v6 = res
    assert_tcp_refused(v4, r)
    assert_echoed(v6, r)
    one_event(events, "deny", ep(EXAMPLE_A, 7), rule=EXAMPLE_A)
    one_event(events, "connect", ep(EXAMPLE_AAAA, 7), rule="default")


def test_domain_deny_blocks_both_families_at_resolution(tether, world):
    """``--deny example.test``: neither the A nor the AAAA record is served."""
    res, events, r = steps(tether, world, [resolve("example.test", "A"), resolve("example.test", "AAAA", DNS6)],
                           ["--deny", "example.test"])
    for x in res:
        assert_rcode(x, "REFUSED", r)
        assert x["answer"] == [], x
    denies = select_events(events, event="deny", proto="dns")
    assert len(denies) == 2 and all(ev["rule"] == "example.test" for ev in denies), events


def test_domain_port_deny_blocks_both_families_after_resolution(tether, world):
    """``--deny tcp://example.test:7`` lets the name resolve (other ports may be used) and then
    binds to both addresses served for it: v4 and v6 port 7 are refused, port 80 is not."""
    rule = "tcp://example.test:7"
    res, events, r = steps(tether, world, [
        resolve("example.test", "A"), resolve("example.test", "AAAA"),
        echo(ep(EXAMPLE_A, 7)), echo(ep(EXAMPLE_AAAA, 7)),
        http(ep(EXAMPLE_A, 80), "example.test"), http(ep(EXAMPLE_AAAA, 80), "example.test"),
    ], ["--deny", rule])
    a, aaaa, v4, v6, h4, h6 = res
    assert_rcode(a, "NOERROR", r)
    assert_rcode(aaaa, "NOERROR", r)
    assert_tcp_refused(v4, r)
    assert_tcp_refused(v6, r)
    assert_http_ok(h4, r)
    assert_http_ok(h6, r)
    for addr in (EXAMPLE_A, EXAMPLE_AAAA):
        ev = one_event(events, "deny", ep(addr, 7), rule=rule)
        assert ev.get("name") == "example.test", ev


def test_mapping_expires_after_ttl_plus_grace(tether, world):
    """short.example.test has TTL 2; the stub's mapping lives TTL + 30 s grace. Within it the
    address is reachable, after it not (an allowed name's IP is not a standing permit), and
    resolving again restores it. (Slow: ~35 s.)"""
    rule = "short.example.test"
    res, events, r = steps(tether, world, [
        resolve("short.example.test"),
        echo(ep(EXAMPLE_A, 7), "first\n"),
        {"op": "sleep", "s": 5},  # past the TTL, within the grace
        echo(ep(EXAMPLE_A, 7), "in-grace\n"),
        {"op": "sleep", "s": 29},  # 34 s after the answer: TTL 2 + grace 30 are over
        echo(ep(EXAMPLE_A, 7), "expired\n"),
        resolve("short.example.test"),
        echo(ep(EXAMPLE_A, 7), "again\n"),
    ], ["--default", "deny", "--allow", rule])
    first_dns, first, in_grace, expired, again_dns, again = res
    assert_rcode(first_dns, "NOERROR", r)
    assert_echoed(first, r, "first\n")
    assert_echoed(in_grace, r, "in-grace\n")
    assert_tcp_refused(expired, r)
    assert_rcode(again_dns, "NOERROR", r)
    assert_echoed(again, r, "again\n")
    dst = ep(EXAMPLE_A, 7)
    assert [ev["event"] for ev in events if ev["dst"] == dst and ev["event"] in ("connect", "deny")] == \
        ["connect", "connect", "deny", "connect"], events
    assert select_events(events, event="deny", dst=dst)[0]["rule"] == "default", events


def test_udp_datagrams_match_domain_rules(tether, world):
    rule = "udp://example.test:7"
    res, events, r = steps(tether, world, [
        resolve("example.test"),
        {"op": "udp", "target": ep(EXAMPLE_A, 7), "send": "by-name"},
        {"op": "udp", "target": ep(ADS_A, 7), "send": "never-resolved"},
        echo(ep(EXAMPLE_A, 7)),  # the rule is for UDP only
    ], ["--default", "deny", "--allow", rule])
    _, ok, refused, tcp = res
    assert ok["ok"] and ok["data"] == "by-name", f"{ok}\n{describe(r)}"
    assert refused["errno"] == "ECONNREFUSED" and refused["elapsed_ms"] < 1500, f"{refused}\n{describe(r)}"
    assert_tcp_refused(tcp, r)
    c = one_event(events, "connect", ep(EXAMPLE_A, 7), proto="udp", rule=rule)
    assert c.get("name") == "example.test", c
    one_event(events, "deny", ep(ADS_A, 7), proto="udp", rule="default")


# --------------------------------------------------------------------------------------------
# SNI / Host check on 80 and 443

SNI_HOST = re.compile(r"(?i)\b(sni|host)\b")


ALLOW_EXAMPLE = ["--default", "deny", "--allow", "example.test"]
ALLOW_EXAMPLE_DENY_ADS = [*ALLOW_EXAMPLE, "--deny", "ads.example.test"]
ALLOW_EXACT = ["--default", "deny", "--allow", "=example.test"]


@pytest.mark.parametrize("opts, host, allowed", [
    pytest.param(ALLOW_EXAMPLE, "example.test", True, id="host-example.test-allowed"),
    pytest.param(ALLOW_EXAMPLE, "www.example.test", True, id="host-subdomain-allowed"),
    pytest.param(ALLOW_EXAMPLE, "EXAMPLE.TEST:80", True, id="host-uppercase-with-port-allowed"),
    # The check is against the policy, not against the names served for the address:
    # ads.example.test is a subdomain of the allowed example.test, so it passes here ...
    pytest.param(ALLOW_EXAMPLE, "ads.example.test", True, id="host-ads-allowed-as-subdomain"),
    # ... and is refused once the policy denies it.
    pytest.param(ALLOW_EXAMPLE_DENY_ADS, "ads.example.test", False, id="host-ads.example.test-denied-name"),
    pytest.param(ALLOW_EXAMPLE, "other.test", False, id="host-other.test-not-allowed"),
    pytest.param(ALLOW_EXACT, "www.example.test", False, id="host-www-under-exact-allow"),
])
def test_http_host_checked_against_policy(tether, world, opts, host, allowed):
    """A request to example.test's address (allowed through a domain rule) must name a site
    the policy allows in its Host header: a shared IP does not open other sites."""
    res, events, r = steps(tether, world, [resolve("example.test"), http(ep(EXAMPLE_A, 80), host)], opts)
    conn = res[1]
    dst = ep(EXAMPLE_A, 80)
    if allowed:
        assert_http_ok(conn, r)
        c = one_event(events, "connect", dst, verdict="allow")
        assert c["rule"] in ("example.test", "=example.test"), c
        assert not select_events(events, event="deny", dst=dst), events
    else:
        assert_tcp_refused(conn, r)
        ev = one_event(events, "deny", dst, proto="tcp", verdict="deny")
        assert SNI_HOST.search(ev["rule"]), f"deny rule does not mention the SNI/Host check: {ev}"
        assert ev.get("name") == host.lower(), f"deny event should name the Host it refused: {ev}"
        assert not select_events(events, event="connect", dst=dst), events


@pytest.mark.parametrize("sni, allowed", [
    pytest.param("example.test", True, id="sni-example.test-allowed"),
    pytest.param("ads.example.test", False, id="sni-ads.example.test-denied-name"),
    pytest.param("other.test", False, id="sni-other.test-not-allowed"),
])
def test_tls_sni_checked_before_dialing(tether, world, sni, allowed):
    """``--default deny --allow example.test --deny ads.example.test``, a TLS ClientHello to
    example.test's address. Nothing listens on :443 in the world: an SNI the policy does not
    allow is refused before dialing (a ``deny`` event naming the SNI check); an allowed one is
    dialed, and the world's refusal comes back as an ``error`` event (upstream refused). The
    client sees a refusal either way; the audit event tells which."""
    res, events, r = steps(tether, world, [resolve("example.test"), {"op": "tls", "target": ep(EXAMPLE_A, 443),
                                                                      "sni": sni}],
                           ALLOW_EXAMPLE_DENY_ADS)
    conn = res[1]
    dst = ep(EXAMPLE_A, 443)
    assert_tcp_refused(conn, r)
    if allowed:
        ev = one_event(events, "error", dst, verdict="allow", rule="example.test")
        assert "refused" in ev.get("reason", "").lower(), ev
        assert not select_events(events, event="deny", dst=dst), events
    else:
        ev = one_event(events, "deny", dst, proto="tcp", verdict="deny")
        assert SNI_HOST.search(ev["rule"]), f"deny rule does not mention the SNI check: {ev}"
        assert ev.get("name") == sni, ev
        assert not select_events(events, event="error", dst=dst), f"a denied SNI was dialed: {events}"
