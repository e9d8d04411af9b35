"""`tether run`: IPv6 (issue 3, scope 5).

Dual stack inside (fd00:7e7e::100/64 on tun0, gateway fd00:7e7e::2, DNS fd00:7e7e::3); TCP,
UDP, DNS and the whole policy work for IPv6 exactly as for IPv4, including the default deny of
loopback, link-local, ULA and the host's own addresses. (UDP echo integrity, DNS through the v6
stub and ping6 are in test_udp / test_dns / test_icmp, parametrized over both families;
--ipv4-only / --ipv6-only in test_run_process.test_single_family.)
"""

from __future__ import annotations


import pytest

from servers import WORLD_BODY, pattern_sha256
from world import DOWNLOAD, HTTP_GET, UPLOAD, check_event, describe, select_events

SANDBOX_ADDR6 = "fd00:7e7e::100"
WORLD6 = "2001:db8:10::10"
WORLD6_B = "2001:db8:10::11"
WORLD4 = "203.0.113.10"

# Connect (TCP) or send+recv on a connected socket (UDP) for each "proto:[addr%ifname]:port";
# link-local addresses carry their interface (scope id). Prints
# [{"target", "ok", "errno", "data", "elapsed_ms"}].
PROBE = r"""
import errno, json, socket, sys, time
out = []
for spec in sys.argv[1:]:
    proto, _, target = spec.partition(":")
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    scope = 0
    if "%" in host:
        host, _, ifname = host.partition("%")
        scope = socket.if_nametoindex(ifname)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    addr = (host, int(port), 0, scope) if fam == socket.AF_INET6 else (host, int(port))
    r = {"target": spec, "ok": False, "errno": None, "data": None}
    t0 = time.monotonic()
    s = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(3)
    try:
        s.connect(addr)
        if proto == "udp":
            s.send(b"probe")
            r["data"] = s.recv(100).decode("latin-1")
        r["ok"] = True
    except socket.timeout:
        r["errno"] = "TIMEOUT"
    except OSError as e:
        r["errno"] = errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()
    r["elapsed_ms"] = (time.monotonic() - t0) * 1000
    out.append(r)
print(json.dumps(out))
"""


def probe(tether, specs: list[str], opts: list[str]):
    res, r = tether.python_json(PROBE, *specs, opts=opts)
    return {x["target"]: x for x in res}, r


def assert_refused(x: dict, r):
    assert x["errno"] == "ECONNREFUSED", f"{x['target']}: want ECONNREFUSED, got {x}\n{describe(r)}"
    assert x["elapsed_ms"] < 1500, f"{x['target']}: refusal took {x['elapsed_ms']:.0f} ms: {x}"


def assert_reached(x: dict, r):
    assert x["ok"] and (x["data"] in (None, "probe")), f"{x['target']}: want it reached, got {x}\n{describe(r)}"


def events_of(tether, log) -> list[dict]:
    events = tether.events(log)
    for ev in events:
        check_event(ev)
    return events


def one_deny(events, proto: str, dst: str, rule: str) -> dict:
    found = select_events(events, event="deny", dst=dst)
    assert len(found) == 1, f"want one deny event for {dst}: {found}\nall events: {events}"
    ev = found[0]
    assert ev["proto"] == proto and ev["rule"] == rule and ev["verdict"] == "deny", \
        f"deny event for {dst}: want proto {proto}, rule {rule!r}: {ev}"
    assert not select_events(events, event="connect", dst=dst), events
    return ev


# --------------------------------------------------------------------------------------------
# TCP over IPv6


def test_http_over_ipv6_with_curl(tether):
    log = tether.log_path()
    r = tether(["--log", log, "--", "curl", "-6", "-g", "-sS", "--noproxy", "*", "--max-time", "20",
                f"http://[{WORLD6}]/"], timeout=60)
    assert r.returncode == 0 and r.stdout == WORLD_BODY.decode(), describe(r)
    events = events_of(tether, log)
    dst = f"[{WORLD6}]:80"
    (c,) = select_events(events, event="connect", dst=dst)
    assert c["proto"] == "tcp" and c["rule"] == "default" and c["src"].startswith(f"[{SANDBOX_ADDR6}]:"), c
    (cl,) = select_events(events, event="close", dst=dst)
    assert cl["src"] == c["src"] and cl["bytes_up"] > 0 and cl["bytes_down"] > len(WORLD_BODY), cl


def test_http_exact_byte_counts_over_ipv6(tether):
    log = tether.log_path()
    res, r = tether.python_json(HTTP_GET, WORLD6, 80, opts=["--log", log])
    assert res["status"].startswith("HTTP/1.0 200") and res["body"] == WORLD_BODY.decode(), res
    (cl,) = select_events(events_of(tether, log), event="close", dst=f"[{WORLD6}]:80")
    assert (cl["bytes_up"], cl["bytes_down"]) == (res["sent"], res["received"]), (cl, res)


def test_transfers_over_ipv6_keep_every_byte(tether):
    n = 8_000_000
    down, r = tether.python_json(DOWNLOAD, WORLD6, 9001, n, timeout=120)
    assert down["received"] == n and down["sha256"] == pattern_sha256(n), f"{down}\n{describe(r)}"
    up, r = tether.python_json(UPLOAD, WORLD6, 9000, n, timeout=120)
    assert up["sent"] == n and up["reply"] == pattern_sha256(n), f"{up}\n{describe(r)}"


def test_ipv6_only_sandbox_resolves_and_connects_by_name(tether, world):
    """--ipv6-only: resolv.conf names only the v6 stub, the stub forwards to the v6 upstream,
    and curl http://example.test/ goes over IPv6 end to end."""
    log = tether.log_path()
    r = tether(["--ipv6-only", "--dns", world.dns_addr6, "--log", log, "--", "curl", "-sS", "--noproxy", "*",
                "--max-time", "20", "http://example.test/"], timeout=60)
    assert r.returncode == 0 and r.stdout == WORLD_BODY.decode(), describe(r)
    connects = select_events(events_of(tether, log), event="connect", proto="tcp")
    assert [c["dst"] for c in connects] == [f"[{WORLD6}]:80"], connects


def test_domain_allow_over_ipv6(tether, world):
    """``--default deny --allow example.test`` binds to the AAAA the stub served, too."""
    log = tether.log_path()
    r = tether(["--dns", world.dns_addr6, "--log", log, "--default", "deny", "--allow", "example.test", "--",
                "curl", "-6", "-sS", "--noproxy", "*", "--max-time", "20", "http://example.test/"], timeout=60)
    assert r.returncode == 0 and r.stdout == WORLD_BODY.decode(), describe(r)
    (c,) = select_events(events_of(tether, log), event="connect", proto="tcp")
    assert c["dst"] == f"[{WORLD6}]:80" and c["rule"] == "example.test" and c.get("name") == "example.test", c


# --------------------------------------------------------------------------------------------
# policy for IPv6


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_deny_ipv6_cidr(tether, proto):
    log = tether.log_path()
    rule = "2001:db8:10::/64"
    port = 80 if proto == "tcp" else 7
    denied = [f"{proto}:[{WORLD6}]:{port}", f"{proto}:[2001:db8:10::20]:{port}"]
    control = f"{proto}:{WORLD4}:{port}"
    res, r = probe(tether, [*denied, control], ["--log", log, "--deny", rule])
    for spec in denied:
        assert_refused(res[spec], r)
    assert_reached(res[control], r)
    events = events_of(tether, log)
    for spec in denied:
        ev = one_deny(events, proto, spec.partition(":")[2], rule)
        assert ev["src"].startswith(f"[{SANDBOX_ADDR6}]:"), ev


def test_ipv6_allow_rules_with_ports(tether):
    log = tether.log_path()
    rule = f"[{WORLD6}]:80"
    res, r = probe(tether, [f"tcp:[{WORLD6}]:80", f"tcp:[{WORLD6}]:7", f"tcp:[{WORLD6_B}]:80", f"tcp:{WORLD4}:80"],
                   ["--log", log, "--default", "deny", "--allow", rule])
    assert_reached(res[f"tcp:[{WORLD6}]:80"], r)
    for spec in (f"tcp:[{WORLD6}]:7", f"tcp:[{WORLD6_B}]:80", f"tcp:{WORLD4}:80"):
        assert_refused(res[spec], r)
    events = events_of(tether, log)
    (c,) = select_events(events, event="connect", dst=f"[{WORLD6}]:80")
    assert c["rule"] == rule, c
    one_deny(events, "tcp", f"[{WORLD6}]:7", "default")


# (target as PROBE spec without proto, the event's dst, the builtin rule)
BUILTIN_V6 = [
    pytest.param("[fd12::1]:{port}", "[fd12::1]:{port}", "builtin:private", id="ula-fd12::1"),
    pytest.param("[fe80::1%tun0]:{port}", "[fe80::1]:{port}", "builtin:link-local", id="link-local-fe80::1%tun0"),
    pytest.param("[2001:db8:1::1]:{port}", "[2001:db8:1::1]:{port}", "builtin:host-address",
                 id="host-own-2001:db8:1::1"),
    pytest.param("[::ffff:192.0.2.1]:{port}", "192.0.2.1:{port}", "builtin:host-address",
                 id="v4-mapped-host-address"),
    pytest.param("[::ffff:10.1.2.3]:{port}", "10.1.2.3:{port}", "builtin:private", id="v4-mapped-private"),
    pytest.param("[fd00:7e7e::2]:{port}", "[fd00:7e7e::2]:{port}", "gateway", id="gateway-fd00:7e7e::2"),
]


@pytest.mark.parametrize("target, dst, rule", BUILTIN_V6)
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_builtin_denies_for_ipv6(tether, proto, target, dst, rule):
    """The default profile (no rules at all) refuses ULA, link-local, the host's own addresses
    (also spelled as IPv4-mapped) and the sandbox's own subnet, over TCP and UDP alike."""
    port = 80 if proto == "tcp" else 7
    target, dst = target.format(port=port), dst.format(port=port)
    log = tether.log_path()
    spec = f"{proto}:{target}"
    res, r = probe(tether, [spec, f"{proto}:[{WORLD6}]:{port}"], ["--log", log])
    assert_refused(res[spec], r)
    assert_reached(res[f"{proto}:[{WORLD6}]:{port}"], r)
    one_deny(events_of(tether, log), proto, dst, rule)
