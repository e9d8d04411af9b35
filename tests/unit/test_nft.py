"""Unit tests for tether.net.nft: the script's shape, its labels, and agreement with the policy.

The module promises that the kernel ruleset and ``Policy.evaluate`` cannot disagree.  To check
that, this file carries a tiny, strict interpreter of the nft subset the compiler emits (it
fails the test on any token it does not know, so a change of output format is noticed, not
silently mis-evaluated), runs a new outgoing connection through the ``decide`` chain, and
compares the verdict with ``Policy.evaluate`` on random policies and addresses (hypothesis).
The sandbox subnet, the gateway and loopback are special in the kernel and are tested on their
own.  When ``nft`` is installed and we are root, the scripts are also checked by the real parser
(``nft --check`` validates against the kernel without changing the ruleset).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.engine.proxy.tcp import TcpProxy
from tether.net.nft import GATEWAY_RULE, LOG_PREFIX, NFLOG_GROUP, UDP_RULE, Ruleset, SandboxNet, compile_ruleset
from tether.policy import Policy, build_policy, parse_rule

NET = SandboxNet()
SUBNET = NET.address.network
LOOPBACK = (IPv4Network("127.0.0.0/8"), IPv6Network("::1/128"))


# --- a strict interpreter of the emitted nft subset ------------------------------------------


@dataclass(frozen=True)
class Packet:
    """The first packet of a new connection, as the output hook sees it."""

    proto: str  # "tcp" | "udp"
    daddr: IPv4Address | IPv6Address  # as on the wire (IPv4-mapped spellings are IPv4 packets)
    dport: int
    oif: str = "tun0"
    ct_new: bool = True


@dataclass(frozen=True)
class Outcome:
    verdict: str  # "accept" | "reject"
    prefix: str | None = None  # NFLOG prefix when logged
    reject_with: str | None = None


def _tokens(line: str) -> list[str]:
    return re.findall(r'"[^"]*"|\{[^}]*\}|\S+', line)


def _port_matches(spec: str, port: int) -> bool:
    if spec.startswith("{"):
        return port in {int(p.strip()) for p in spec.strip("{}").split(",")}
    lo, _, hi = spec.partition("-")
    return int(lo) <= port <= int(hi or lo)


def run_rule(line: str, pkt: Packet) -> Outcome | None:
    """Outcome if ``line`` matches ``pkt``, None if it falls through.  Unknown syntax fails."""
    toks = _tokens(line)
    i = 0
    while i < len(toks):
        t = toks[i]
        if t == "oifname":
            if pkt.oif != toks[i + 1].strip('"'):
                return None
            i += 2
        elif t == "ct" and toks[i + 1: i + 4] == ["state", "!=", "new"]:
            if pkt.ct_new:
                return None
            i += 4
        elif t == "meta" and toks[i + 1] == "l4proto":
            if pkt.proto != toks[i + 2]:
                return None
            i += 3
        elif t in ("ip", "ip6") and toks[i + 1] == "daddr":
            want = 4 if t == "ip" else 6
            net = ipaddress.ip_network(toks[i + 2])  # strict: host bits set would be a compiler bug
            assert net.version == want, line
            if pkt.daddr.version != want or pkt.daddr not in net:
                return None
            i += 3
        elif t in ("tcp", "udp") and toks[i + 1] == "dport":
            if pkt.proto != t or not _port_matches(toks[i + 2], pkt.dport):
                return None
            i += 3
        elif t == "accept":
            assert i == len(toks) - 1, line
            return Outcome("accept")
        elif t == "log":
            assert toks[i + 1: i + 3] == ["group", str(NFLOG_GROUP)] and toks[i + 3] == "prefix", line
            prefix = toks[i + 4].strip('"')
            assert toks[i + 5] == "reject", line
            rest = toks[i + 6:]
            assert rest in (["with", "tcp", "reset"], ["with", "icmpx", "type", "port-unreachable"]), line
            return Outcome("reject", prefix, " ".join(rest[1:]))
        else:
            raise AssertionError(f"interpreter does not know {t!r} in {line!r}")
    raise AssertionError(f"rule without verdict: {line!r}")


def chain(script: str, name: str) -> tuple[str, list[str]]:
    """(the chain's type line, its rules) from the compiled script."""
    m = re.search(r"\tchain " + name + r" \{\n(.*?)\n\t\}", script, re.S)
    assert m is not None, f"no chain {name}"
    lines = [line.strip() for line in m[1].splitlines()]
    return lines[0], lines[1:]


def run_decide(ruleset: Ruleset, pkt: Packet) -> Outcome:
    header, rules = chain(ruleset.script, "decide")
    assert header.endswith("policy accept;")
    for line in rules:
        outcome = run_rule(line, pkt)
        if outcome is not None:
            return outcome
    return Outcome("accept")


def wire(addr: IPv4Address | IPv6Address) -> IPv4Address | IPv6Address:
    """A dual-stack socket connecting to ::ffff:a.b.c.d sends an IPv4 packet."""
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def compiled(policy: Policy, port: int = 4321, allow_host=()) -> Ruleset:
    return compile_ruleset(policy.ordered_rules(), policy.default, port, allow_host)


# --- structure ---------------------------------------------------------------------------------


def test_script_has_one_inet_table_with_decide_and_capture_chains():
    rs = compiled(build_policy(None, [], [], None), port=4321)
    assert rs.script.startswith("table inet tether {\n")
    assert rs.script.rstrip().endswith("}")
    assert re.findall(r"\tchain (\w+) \{", rs.script) == ["decide", "capture"]
    decide_header, decide = chain(rs.script, "decide")
    assert decide_header == "type filter hook output priority -150; policy accept;"
    assert decide[:2] == ['oifname "lo" accept', "ct state != new accept"]
    capture_header, capture = chain(rs.script, "capture")
    assert capture_header == "type nat hook output priority -100; policy accept;"
    assert capture == ['oifname "lo" return', "meta l4proto tcp redirect to :4321"]


@pytest.mark.parametrize("port", [1, 1080, 40000, 65535])
def test_capture_redirects_tcp_to_the_listener_port(port):
    _, capture = chain(compiled(build_policy(None, [], [], None), port=port).script, "capture")
    assert capture[-1] == f"meta l4proto tcp redirect to :{port}"


def test_decide_runs_between_conntrack_and_nat():
    script = compiled(build_policy(None, [], [], "deny")).script
    decide, capture = (int(re.search(r"priority (-?\d+);", chain(script, name)[0])[1])
                       for name in ("decide", "capture"))
    assert -200 < decide < capture == -100  # conntrack (-200) < decide < nat (-100)


def test_every_deny_is_logged_with_a_label_that_maps_back_to_its_rule():
    policy = build_policy(None, ["203.0.113.0/24:443"], ["198.51.100.7", "tcp://[2001:db8::1]:22"], "deny")
    rs = compiled(policy)
    _, decide = chain(rs.script, "decide")
    denies = [line for line in decide if "reject" in line]
    prefixes = [re.search(r'log group (\d+) prefix "([^"]*)" reject', line).groups() for line in denies]
    assert all(group == str(NFLOG_GROUP) for group, _ in prefixes)
    assert [p for _, p in prefixes] == [f"{LOG_PREFIX}{k}" for k in range(len(denies))]
    assert [rs.label_of(p) for _, p in prefixes] == [GATEWAY_RULE, "198.51.100.7", "tcp://[2001:db8::1]:22",
                                                     "default", UDP_RULE]
    assert "meta l4proto tcp ip daddr 198.51.100.7/32 log" in denies[1]
    assert "meta l4proto tcp ip6 daddr 2001:db8::1/128 tcp dport 22 log" in denies[2]


def test_allow_rules_accept_without_logging():
    rs = compiled(build_policy(None, ["203.0.113.0/24:80-90", "2001:db8::/32"], [], "deny"))
    _, decide = chain(rs.script, "decide")
    assert "meta l4proto tcp ip daddr 203.0.113.0/24 tcp dport 80-90 accept" in decide
    assert "meta l4proto tcp ip6 daddr 2001:db8::/32 accept" in decide
    assert not any("log" in line and "accept" in line for line in decide)


LABEL_OF_BAD = ["", "tether:", "tether:x", "tether:-1x", "tether:99", "other:0", "TETHER:0", "tether: 0x"]


@pytest.mark.parametrize("prefix", LABEL_OF_BAD, ids=[repr(p) for p in LABEL_OF_BAD])
def test_label_of_unknown_prefix_is_none(prefix):
    rs = compiled(build_policy(None, [], ["198.51.100.7"], "deny"))
    assert rs.label_of(prefix) is None


@pytest.mark.parametrize("prefix", ["tether:-1", "tether:-2"])
def test_label_of_negative_index_is_none(prefix):
    rs = compiled(build_policy(None, [], ["198.51.100.7"], "deny"))
    assert rs.label_of(prefix) is None


def test_rules_are_emitted_in_policy_order_first_match_wins():
    policy = build_policy(None, ["198.51.100.0/24"], ["198.51.100.7:22"], "allow")
    rs = compiled(policy)
    _, decide = chain(rs.script, "decide")
    positions = [next(i for i, line in enumerate(decide) if f"daddr {r.network}" in line
                      and (r.ports is None or f"dport {r.ports[0]}" in line))
                 for r in policy.ordered_rules()[:2]]
    assert positions[0] < positions[1]
    assert run_decide(rs, Packet("tcp", IPv4Address("198.51.100.7"), 22)).verdict == "reject"
    assert run_decide(rs, Packet("tcp", IPv4Address("198.51.100.7"), 23)).verdict == "accept"


DEFAULT_CASES = [("deny", True), ("allow", False)]


@pytest.mark.parametrize("default,catch_all", DEFAULT_CASES, ids=[f"default-{d}" for d, _ in DEFAULT_CASES])
def test_default_deny_adds_a_logged_catch_all(default, catch_all):
    rs = compiled(build_policy(None, ["203.0.113.7"], [], default))
    _, decide = chain(rs.script, "decide")
    catch = [line for line in decide if line.startswith("meta l4proto tcp log ")]
    assert len(catch) == int(catch_all)
    if catch_all:
        prefix = re.search(r'prefix "([^"]*)"', catch[0])[1]
        assert rs.label_of(prefix) == "default"
        assert catch[0].endswith("reject with tcp reset")
        # it comes after every user rule, right before the UDP refusal
        assert decide.index(catch[0]) == len(decide) - 2


def test_udp_rules_are_skipped_and_udp_is_refused_with_port_unreachable():
    policy = build_policy(None, ["udp://9.9.9.9:53", "203.0.113.7"], ["udp://198.51.100.7"], "allow")
    rs = compiled(policy)
    _, decide = chain(rs.script, "decide")
    assert not any("9.9.9.9" in line or "198.51.100.7" in line for line in decide)
    assert "udp://9.9.9.9:53" not in rs.labels and "udp://198.51.100.7" not in rs.labels
    assert decide[-1].startswith("meta l4proto udp log group 1 prefix ")
    assert decide[-1].endswith("reject with icmpx type port-unreachable")
    for addr, port in [("9.9.9.9", 53), ("203.0.113.7", 53), ("2001:db8::1", 443)]:
        out = run_decide(rs, Packet("udp", ipaddress.ip_address(addr), port))
        assert (out.verdict, rs.label_of(out.prefix), out.reject_with) == (
            "reject", UDP_RULE, "icmpx type port-unreachable")


def test_tcp_scheme_rules_are_compiled():
    rs = compiled(build_policy(None, ["tcp://203.0.113.7:443"], [], "deny"))
    assert run_decide(rs, Packet("tcp", IPv4Address("203.0.113.7"), 443)).verdict == "accept"
    assert run_decide(rs, Packet("tcp", IPv4Address("203.0.113.7"), 80)).verdict == "reject"


def test_ipv6_rules_use_ip6_daddr_and_ipv4_rules_ip_daddr():
    rs = compiled(build_policy(None, ["[2001:db8::/32]:443", "203.0.113.0/24"], ["[2001:db8::dead]"], "deny"))
    _, decide = chain(rs.script, "decide")
    assert "meta l4proto tcp ip6 daddr 2001:db8::/32 tcp dport 443 accept" in decide
    assert "meta l4proto tcp ip daddr 203.0.113.0/24 accept" in decide
    assert any(line.startswith("meta l4proto tcp ip6 daddr 2001:db8::dead/128 log") for line in decide)
    assert not any(re.search(r"\bip daddr [0-9a-f]*:", line) for line in decide)
    assert not any(re.search(r"\bip6 daddr \d+\.\d+\.\d+\.\d+", line) for line in decide)


def test_ipv4_mapped_rule_is_compiled_as_ipv4():
    rs = compiled(build_policy(None, ["::ffff:203.0.113.7"], [], "deny"))
    _, decide = chain(rs.script, "decide")
    assert "meta l4proto tcp ip daddr 203.0.113.7/32 accept" in decide


PORT_CASES = [
    # rule, emitted dport, (port, verdict) probes
    ("203.0.113.7:443", "tcp dport 443 ", [(443, "accept"), (442, "reject"), (444, "reject")]),
    ("203.0.113.7:80-90", "tcp dport 80-90 ", [(79, "reject"), (80, "accept"), (85, "accept"), (90, "accept"),
                                               (91, "reject")]),
    ("203.0.113.7:1-65535", "tcp dport 1-65535 ", [(1, "accept"), (65535, "accept")]),
    ("203.0.113.7:65535", "tcp dport 65535 ", [(65535, "accept"), (65534, "reject")]),
    ("203.0.113.7", None, [(1, "accept"), (65535, "accept")]),
]


@pytest.mark.parametrize("rule,dport,probes", PORT_CASES, ids=[c[0] for c in PORT_CASES])
def test_port_ranges(rule, dport, probes):
    rs = compiled(build_policy(None, [rule], [], "deny"))
    _, decide = chain(rs.script, "decide")
    [line] = [line for line in decide if "203.0.113.7/32" in line]
    if dport is None:
        assert "dport" not in line
    else:
        assert dport in line
    for port, verdict in probes:
        assert run_decide(rs, Packet("tcp", IPv4Address("203.0.113.7"), port)).verdict == verdict


def test_established_and_loopback_traffic_is_never_decided():
    rs = compiled(build_policy(None, [], ["0.0.0.0/0", "::/0"], "deny"))
    assert run_decide(rs, Packet("tcp", IPv4Address("203.0.113.7"), 80, ct_new=False)) == Outcome("accept")
    for addr in ("127.0.0.1", "127.8.9.10", "::1"):
        # The sandbox's own loopback: sandbox-local, the policy is about leaving the sandbox.
        assert run_decide(rs, Packet("tcp", ipaddress.ip_address(addr), 80, oif="lo")) == Outcome("accept")


# --- the gateway and the sandbox subnet ------------------------------------------------------

GATEWAY_CASES = [
    # allow-host ports, addr, port, verdict, label
    ((22, 8080), "10.0.2.2", 22, "accept", None),
    ((22, 8080), "10.0.2.2", 8080, "accept", None),
    ((22, 8080), "10.0.2.2", 23, "reject", GATEWAY_RULE),
    ((22, 8080), "10.0.2.2", 80, "reject", GATEWAY_RULE),
    ((), "10.0.2.2", 22, "reject", GATEWAY_RULE),
    ((22,), "10.0.2.3", 22, "reject", GATEWAY_RULE),  # DNS alias: not a TCP host alias
    ((22,), "10.0.2.3", 53, "reject", GATEWAY_RULE),
    ((22,), "10.0.2.1", 22, "reject", GATEWAY_RULE),
    ((22,), "10.0.2.0", 22, "reject", GATEWAY_RULE),
    ((22,), "10.0.2.255", 22, "reject", GATEWAY_RULE),
    ((22,), "10.0.2.100", 22, "reject", GATEWAY_RULE),  # own address: only via lo, never via tun0
]


@pytest.mark.parametrize("default", ["allow", "deny"])
@pytest.mark.parametrize("allow_host,addr,port,verdict,label", GATEWAY_CASES,
                         ids=[f"{c[1]}:{c[2]}-allow-host{list(c[0])}" for c in GATEWAY_CASES])
def test_gateway_only_on_allow_host_ports_rest_of_subnet_refused(default, allow_host, addr, port, verdict, label):
    # Even a user rule allowing the whole subnet does not open it: the gateway line comes first.
    policy = build_policy(None, ["10.0.0.0/8", "0.0.0.0/0"], [], default)
    rs = compiled(policy, allow_host=allow_host)
    out = run_decide(rs, Packet("tcp", ipaddress.ip_address(addr), port))
    assert out.verdict == verdict
    if label is not None:
        assert rs.label_of(out.prefix) == label
        assert out.reject_with == "tcp reset"


def test_allow_host_beats_user_deny_of_the_gateway():
    # The engine's second check (TcpProxy._decide) maps allow-host before the policy too.
    rs = compiled(build_policy(None, [], ["10.0.0.0/8", "0.0.0.0/0"], "deny"), allow_host=(22,))
    assert run_decide(rs, Packet("tcp", IPv4Address("10.0.2.2"), 22)).verdict == "accept"
    out = run_decide(rs, Packet("tcp", IPv4Address("10.0.2.2"), 23))
    assert rs.label_of(out.prefix) == GATEWAY_RULE


def test_allow_host_ports_are_sorted_and_deduplicated():
    rs = compiled(build_policy(None, [], [], "deny"), allow_host=(8080, 22, 8080, 443))
    _, decide = chain(rs.script, "decide")
    assert "meta l4proto tcp ip daddr 10.0.2.2 tcp dport { 22, 443, 8080 } accept" in decide


def test_no_allow_host_line_without_ports():
    _, decide = chain(compiled(build_policy(None, [], [], "deny")).script, "decide")
    assert not any("10.0.2.2" in line for line in decide)


def test_custom_sandbox_net_is_used_for_gateway_and_subnet():
    net = SandboxNet(address=ipaddress.IPv4Interface("192.168.77.10/24"), gateway=IPv4Address("192.168.77.1"))
    policy = build_policy(None, [], [], "allow")
    rs = compile_ruleset(policy.ordered_rules(), policy.default, 1, (22,), net)
    _, decide = chain(rs.script, "decide")
    assert "meta l4proto tcp ip daddr 192.168.77.1 tcp dport { 22 } accept" in decide
    assert any(line.startswith("meta l4proto tcp ip daddr 192.168.77.0/24 log") for line in decide)
    assert run_decide(rs, Packet("tcp", IPv4Address("192.168.77.1"), 22)).verdict == "accept"
    assert rs.label_of(run_decide(rs, Packet("tcp", IPv4Address("192.168.77.5"), 22)).prefix) == GATEWAY_RULE


# --- agreement with Policy.evaluate (hypothesis) ---------------------------------------------

# Anchors near which rules and probe addresses are drawn, so that they often overlap.
V4_ANCHORS = ["203.0.113.0", "198.51.100.0", "192.0.2.0", "8.8.8.0", "1.1.1.0", "10.1.0.0", "172.16.5.0",
              "192.168.1.0", "169.254.169.254", "100.64.0.0", "224.0.0.0", "0.0.0.0", "255.255.255.255"]
V6_ANCHORS = ["2001:db8::", "2001:db8:1::", "2606:4700::", "fc00::", "fd12:3456::", "fe80::", "ff02::", "::",
              "2001:4860::8888"]


@st.composite
def addresses(draw) -> IPv4Address | IPv6Address:
    kind = draw(st.sampled_from(["v4-anchor", "v6-anchor", "v4-any", "v6-any", "mapped"]))
    if kind == "v4-anchor":
        base = int(IPv4Address(draw(st.sampled_from(V4_ANCHORS))))
        return IPv4Address((base ^ draw(st.integers(0, 2**draw(st.integers(0, 16)) - 1))) & 0xFFFFFFFF)
    if kind == "v6-anchor":
        base = int(IPv6Address(draw(st.sampled_from(V6_ANCHORS))))
        return IPv6Address(base ^ draw(st.integers(0, 2**draw(st.integers(0, 40)) - 1)))
    if kind == "v4-any":
        return IPv4Address(draw(st.integers(0, 2**32 - 1)))
    if kind == "v6-any":
        return IPv6Address(draw(st.integers(0, 2**128 - 1)))
    v4 = draw(addresses().filter(lambda a: a.version == 4))
    return IPv6Address("::ffff:" + str(v4))


ports = st.integers(1, 65535)


@st.composite
def rule_texts(draw) -> str:
    addr = draw(addresses())
    plen = draw(st.integers(0, addr.max_prefixlen))
    if addr.version == 6 and addr.ipv4_mapped is not None:
        plen = draw(st.integers(96, 128))
    net = ipaddress.ip_network((addr, plen), strict=False)
    host = str(net.network_address) if plen == addr.max_prefixlen else str(net)
    port = draw(st.one_of(st.none(), ports.map(str),
                          st.tuples(ports, ports).map(lambda t: f"{min(t)}-{max(t)}"),
                          st.sampled_from(["80", "443", "22", "80-90"])))
    scheme = draw(st.sampled_from(["", "", "tcp://", "udp://"]))
    if port is None:
        return f"{scheme}{host}"
    return f"{scheme}[{host}]:{port}" if net.version == 6 else f"{scheme}{host}:{port}"


@st.composite
def policies(draw) -> Policy:
    allow = draw(st.lists(rule_texts(), max_size=5))
    deny = draw(st.lists(rule_texts(), max_size=5))
    default = draw(st.sampled_from(["allow", "deny"]))
    hosts = draw(st.lists(addresses(), max_size=2))
    return Policy(allow=[parse_rule(t, "allow") for t in allow], deny=[parse_rule(t, "deny") for t in deny],
                  default=default, host_addresses=hosts)


def _special(addr: IPv4Address | IPv6Address) -> bool:
    """Handled by the kernel outside the policy: the sandbox subnet and loopback."""
    a = wire(addr)
    return a in SUBNET or any(a in net for net in LOOPBACK)


def _probe(policy: Policy, draw) -> tuple[IPv4Address | IPv6Address, int]:
    """A destination: often inside one of the policy's networks, near a port bound."""
    rules = policy.ordered_rules()
    if rules and draw(st.booleans()):
        rule = draw(st.sampled_from(rules))
        net = rule.network
        host = net.network_address + draw(st.integers(0, min(net.num_addresses - 1, 2**64)))
        if net.version == 4 and draw(st.booleans()):
            host = IPv6Address("::ffff:" + str(host))
        if rule.ports is not None and draw(st.booleans()):
            lo, hi = rule.ports
            return host, draw(st.sampled_from([p for p in (lo - 1, lo, hi, hi + 1) if 1 <= p <= 65535]))
        return host, draw(ports)
    return draw(addresses()), draw(ports)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(policies(), st.data())
def test_compiled_tcp_rules_agree_with_policy_evaluate(policy, data):
    rs = compiled(policy)
    for _ in range(10):
        addr, port = _probe(policy, data.draw)
        if _special(addr):
            continue
        expected = policy.evaluate("tcp", addr, port)
        out = run_decide(rs, Packet("tcp", wire(addr), port))
        assert out.verdict == {"allow": "accept", "deny": "reject"}[expected.verdict], (str(addr), port, expected)
        if out.verdict == "reject":
            assert rs.label_of(out.prefix) == expected.rule
            assert out.reject_with == "tcp reset"


@settings(max_examples=200, deadline=None)
@given(policies(), st.lists(ports, max_size=3), st.data())
def test_compiled_ruleset_agrees_with_the_engines_own_check(policy, allow_host, data):
    """Everywhere but loopback (sandbox-local), including the subnet and the gateway, the kernel
    refuses exactly what the engine's second line of defence (TcpProxy._decide) refuses."""
    rs = compiled(policy, allow_host=allow_host)
    proxy = TcpProxy(None, policy, None, frozenset(allow_host), NET)  # _decide uses neither listener nor audit
    probes = [_probe(policy, data.draw) for _ in range(6)]
    probes += [(IPv4Address("10.0.2.2"), data.draw(st.sampled_from(allow_host or [22]))),
               (IPv4Address("10.0.2.2"), data.draw(ports)),
               (data.draw(st.sampled_from([IPv4Address("10.0.2.3"), IPv4Address("10.0.2.77")])), data.draw(ports))]
    for addr, port in probes:
        a = wire(addr)
        if any(a in net for net in LOOPBACK):
            continue
        decision, _target = proxy._decide(str(a), port)
        out = run_decide(rs, Packet("tcp", a, port))
        assert out.verdict == {"allow": "accept", "deny": "reject"}[decision.verdict], (str(addr), port, decision)
        if out.verdict == "reject":
            assert rs.label_of(out.prefix) == decision.rule


def test_agreement_examples():
    """A few hand-picked cases of the property above, readable on failure."""
    policy = build_policy(None, ["203.0.113.0/24:443", "2001:db8::/32", "127.0.0.1:8080"],
                          ["203.0.113.66", "tcp://[2001:db8::bad]:22"], "allow", [IPv4Address("192.0.2.55")])
    rs = compiled(policy)
    for addr, port in [("203.0.113.5", 443), ("203.0.113.5", 80), ("203.0.113.66", 443), ("2001:db8::1", 22),
                       ("2001:db8::bad", 22), ("2001:db8::bad", 23), ("192.0.2.55", 80), ("192.0.2.56", 80),
                       ("169.254.169.254", 80), ("::ffff:169.254.169.254", 80), ("10.9.9.9", 80),
                       ("fd00::1", 80), ("8.8.8.8", 53), ("0.0.0.0", 80), ("::", 80), ("224.0.0.1", 80)]:
        ip = ipaddress.ip_address(addr)
        expected = policy.evaluate("tcp", ip, port)
        out = run_decide(rs, Packet("tcp", wire(ip), port))
        assert (out.verdict, rs.label_of(out.prefix) if out.prefix else expected.rule) == (
            {"allow": "accept", "deny": "reject"}[expected.verdict], expected.rule), (addr, port)


# --- the real nft parser -----------------------------------------------------------------------

NFT = shutil.which("nft")
needs_nft = pytest.mark.skipif(NFT is None or os.geteuid() != 0,
                               reason="needs nft and root (CAP_NET_ADMIN) for --check")


def _nft_check(script: str, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "ruleset.nft"
    path.write_text(script)
    return subprocess.run([NFT, "--check", "-f", str(path)], capture_output=True, text=True, timeout=30)


CHECK_CASES = [
    ("default-allow-builtins", [], [], "allow", ()),
    ("default-deny-empty", [], [], "deny", ()),
    ("allow-host-ports", ["203.0.113.0/24:80-90"], [], "deny", (22, 8080)),
    ("v6-and-ranges", ["2001:db8::/32", "[2001:db8::1]:443", "0.0.0.0/0:1-65535", "::/0"],
     ["tcp://198.51.100.7:22", "::ffff:192.0.2.9"], "allow", (443,)),
    ("udp-only-rules", ["udp://9.9.9.9:53"], ["udp://0.0.0.0/0"], "deny", ()),
]


@needs_nft
@pytest.mark.parametrize("allow,deny,default,allow_host", [c[1:] for c in CHECK_CASES], ids=[c[0] for c in CHECK_CASES])
def test_nft_accepts_the_script(allow, deny, default, allow_host, tmp_path):
    rs = compiled(build_policy(None, allow, deny, default, [IPv4Address("192.0.2.1")]), allow_host=allow_host)
    result = _nft_check(rs.script, tmp_path)
    assert result.returncode == 0, result.stderr


@needs_nft
@settings(max_examples=25, deadline=None)
@given(policies(), st.lists(ports, max_size=3), ports)
def test_nft_accepts_random_policies(policy, allow_host, capture_port):
    import tempfile
    import pathlib
    with tempfile.TemporaryDirectory() as tmp:
        rs = compile_ruleset(policy.ordered_rules(), policy.default, capture_port, allow_host)
        result = _nft_check(rs.script, pathlib.Path(tmp))
    assert result.returncode == 0, (result.stderr, rs.script)
