"""Unit tests for tether.net.nft: the script's shape, its labels, and agreement with the policy.

The module promises that the kernel ruleset and ``Policy.evaluate`` cannot disagree.  To check
that, this file carries a tiny, strict interpreter of the nft subset the compiler emits (it
fails the test on any token it does not know, so a change of output format is noticed, not
silently mis-evaluated), runs the first packet of a new TCP connection or UDP flow through the
``decide`` chain (and, where it matters, ``capture``, ``mark_udp`` and ``divert_udp``), and
checks both protocols on random policies and addresses (hypothesis): for the protocols in
``KERNEL_DECIDED`` the kernel's verdict and NFLOG label are ``Policy.evaluate``'s; every flow the
kernel passes (all of the other protocols') must end at the engine (TCP redirected to the
listener, UDP tproxied to the transparent socket), which refuses what it denies.  The tests are
written against ``KERNEL_DECIDED``, so they hold whether UDP is decided in the kernel or not.

Special in the kernel, and tested on their own: loopback, the sandbox subnets and the gateway,
and DNS (port 53 to the stub's addresses, and with ``dns_to_stub`` to any address, is accepted
before any rule: the stub decides by NAME, so those are not compared with ``Policy.evaluate``).
For policies with domain rules the kernel cannot know the names, so the property is one way: a
kernel reject must be a deny for every set of names the DNS stub could have served, and a kernel
pass must be something some set of names allows (the engine decides those).  When ``nft`` is
installed and we are root, the scripts are also checked by the real parser (``nft --check``
validates against the kernel without changing the ruleset).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.engine.proxy.decide import Decider
from tether.net.nft import (
    GATEWAY_RULE,
    KERNEL_DECIDED,
    LOG_PREFIX,
    NFLOG_GROUP,
    UDP_MARK,
    UDP_TABLE,
    Ruleset,
    SandboxNet,
    compile_ruleset,
)
from tether.policy import Decision, Policy, build_policy, parse_rule

NET = SandboxNet()
SUBNET = NET.address.network
SUBNET6 = NET.address6.network
STUBS = (NET.dns, NET.dns6)
LOOPBACK = (IPv4Network("127.0.0.0/8"), IPv6Network("::1/128"))
PROTOS = ("tcp", "udp")
REJECT_WITH = {"tcp": "tcp reset", "udp": "icmpx type port-unreachable"}
VERDICT = {"allow": "accept", "deny": "reject"}
# The protocols whose IP policy the decide chain enforces (one block each, in this order); the
# others reach the engine undecided (mark_udp/divert_udp, capture), which refuses what it denies.
KERNEL = KERNEL_DECIDED
ENGINE_ONLY = tuple(p for p in PROTOS if p not in KERNEL)


# --- a strict interpreter of the emitted nft subset ------------------------------------------


@dataclass(frozen=True)
class Packet:
    """The first packet of a new connection or flow, as a hook sees it."""

    proto: str  # "tcp" | "udp"
    daddr: IPv4Address | IPv6Address  # as on the wire (IPv4-mapped spellings are IPv4 packets)
    dport: int
    oif: str = "tun0"
    ct_new: bool = True
    local: bool = False  # fib daddr type local (one of the netns's own addresses)
    mark: int = 0


@dataclass(frozen=True)
class Outcome:
    verdict: str  # "accept" | "reject"
    prefix: str | None = None  # NFLOG prefix when logged
    reject_with: str | None = None
    redirect: int | None = None  # capture: the port a connection is redirected to
    tproxy: str | None = None  # divert_udp: "127.0.0.1:P" | "[::1]:P"
    mark: int = 0  # the packet's mark when it leaves the chain
    by_policy: bool = False  # fell off the end of the chain or hit "return" (base chain: its policy)


def _tokens(line: str) -> list[str]:
    return re.findall(r'"[^"]*"|\{[^}]*\}|\S+', line)


def _set_items(tok: str) -> list[str]:
    """``{ a, b }`` -> [a, b]; a single value -> [value]."""
    if tok.startswith("{"):
        assert tok.endswith("}"), tok
        items = [p.strip() for p in tok[1:-1].split(",")]
        assert items and all(items), tok
        return items
    return [tok]


def _port_matches(spec: str, port: int) -> bool:
    for item in _set_items(spec):
        lo, _, hi = item.partition("-")
        assert lo.isdigit() and (hi == "" or hi.isdigit()), spec
        assert 1 <= int(lo) <= int(hi or lo) <= 65535, spec
        if int(lo) <= port <= int(hi or lo):
            return True
    return False


def _last(toks: list[str], i: int, line: str) -> None:
    assert i == len(toks) - 1, f"tokens after the verdict in {line!r}"


def run_rule(line: str, pkt: Packet) -> tuple[Outcome | None, Packet]:
    """(outcome, packet) if ``line`` ends the chain for ``pkt``; (None, packet) if the packet goes on
    to the next rule (maybe with a new mark).  Unknown or inconsistent syntax fails the test."""
    toks = _tokens(line)
    l4: set[str] | None = None  # the transport protocols the line is restricted to so far
    nfproto: int | None = None
    stmt = False  # a statement ran: no more matches may follow
    tproxy = None
    i = 0
    while i < len(toks):
        t = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        is_match = True
        if t == "oifname":
            if pkt.oif != toks[i + 1].strip('"'):
                return None, pkt
            i += 2
        elif t == "ct" and toks[i + 1: i + 4] == ["state", "!=", "new"]:
            if pkt.ct_new:
                return None, pkt
            i += 4
        elif t == "meta" and nxt == "l4proto":
            protos = set(_set_items(toks[i + 2]))
            assert protos <= {"tcp", "udp"}, line
            if pkt.proto not in protos:
                return None, pkt
            l4 = protos if l4 is None else l4 & protos
            i += 3
        elif t == "meta" and nxt == "nfproto":
            nfproto = {"ipv4": 4, "ipv6": 6}[toks[i + 2]]
            if pkt.daddr.version != nfproto:
                return None, pkt
            i += 3
        elif t == "meta" and nxt == "mark" and toks[i + 2] == "set":
            assert toks[i + 3].startswith("0x"), line
            pkt = replace(pkt, mark=int(toks[i + 3], 16))
            stmt, is_match = True, False
            i += 4
        elif t == "meta" and nxt == "mark":
            assert toks[i + 2].startswith("0x"), line
            if pkt.mark != int(toks[i + 2], 16):
                return None, pkt
            i += 3
        elif t == "fib" and toks[i + 1: i + 4] == ["daddr", "type", "local"]:
            if not pkt.local:
                return None, pkt
            i += 4
        elif t in ("ip", "ip6") and nxt == "daddr":
            want = 4 if t == "ip" else 6
            net = ipaddress.ip_network(toks[i + 2])  # strict: host bits set would be a compiler bug
            assert net.version == want, line
            if pkt.daddr.version != want or pkt.daddr not in net:
                return None, pkt
            i += 3
        elif t == "th" and nxt == "dport":
            assert l4 is not None, f"th dport without a transport protocol in {line!r}"
            assert toks[i + 2] != "!=", line
            if not _port_matches(toks[i + 2], pkt.dport):
                return None, pkt
            i += 3
        elif t in ("tcp", "udp") and nxt == "dport":
            assert l4 == {t}, f"{t} dport on a line not restricted to {t}: {line!r}"
            negate = toks[i + 2] == "!="
            if negate:
                i += 1
                assert toks[i + 2].startswith("{"), line
            if _port_matches(toks[i + 2], pkt.dport) == negate:
                return None, pkt
            i += 3
        elif t == "accept":
            _last(toks, i, line)
            return Outcome("accept", tproxy=tproxy, mark=pkt.mark), pkt
        elif t == "return":
            _last(toks, i, line)
            assert tproxy is None, line
            return Outcome("accept", mark=pkt.mark, by_policy=True), pkt
        elif t == "redirect" and nxt == "to":
            assert l4 == {"tcp"}, line
            m = re.fullmatch(r":(\d+)", toks[i + 2])
            assert m is not None and 1 <= int(m[1]) <= 65535, line
            _last(toks, i + 2, line)
            return Outcome("accept", redirect=int(m[1]), mark=pkt.mark), pkt
        elif t == "tproxy" and nxt in ("ip", "ip6") and toks[i + 2] == "to":
            assert l4 == {"udp"}, line
            assert nfproto == (4 if nxt == "ip" else 6), f"tproxy {nxt} without meta nfproto in {line!r}"
            m = re.fullmatch(r"(127\.0\.0\.1|\[::1\]):(\d+)", toks[i + 3])
            assert m is not None and 1 <= int(m[2]) <= 65535, line
            assert (m[1] == "127.0.0.1") == (nxt == "ip"), line
            tproxy = toks[i + 3]
            stmt, is_match = True, False
            i += 4
        elif t == "log":
            assert toks[i + 1: i + 3] == ["group", str(NFLOG_GROUP)] and toks[i + 3] == "prefix", line
            prefix = toks[i + 4].strip('"')
            assert toks[i + 5] == "reject", line
            rest = toks[i + 6:]
            assert rest in (["with", "tcp", "reset"], ["with", "icmpx", "type", "port-unreachable"]), line
            if rest[1] == "tcp":
                assert l4 == {"tcp"}, f"tcp reset on a line not restricted to tcp: {line!r}"
            else:
                assert l4 is not None, line
            return Outcome("reject", prefix, " ".join(rest[1:]), mark=pkt.mark), pkt
        else:
            raise AssertionError(f"interpreter does not know {t!r} in {line!r}")
        assert not (is_match and stmt), f"a match after a statement in {line!r}"
    if stmt:
        assert tproxy is None, f"tproxy without a verdict in {line!r}"
        return None, pkt
    raise AssertionError(f"rule without verdict or statement: {line!r}")


HEADER = re.compile(r"type (filter|nat|route) hook (output|prerouting) priority (-?\d+|mangle); policy accept;")
NAMED_PRIORITY = {"mangle": -150}


def chain(script: str, name: str) -> tuple[str, list[str]]:
    """(the chain's type line, its rules) from the compiled script."""
    m = re.search(r"\tchain " + name + r" \{\n(.*?)\n\t\}", script, re.DOTALL)
    assert m is not None, f"no chain {name}"
    lines = [line.strip() for line in m[1].splitlines()]
    return lines[0], lines[1:]


def header(script: str, name: str) -> tuple[str, str, int]:
    """(type, hook, numeric priority) of a chain."""
    m = HEADER.fullmatch(chain(script, name)[0])
    assert m is not None, chain(script, name)[0]
    prio = m[3]
    return m[1], m[2], NAMED_PRIORITY[prio] if prio in NAMED_PRIORITY else int(prio)


def run_chain(ruleset: Ruleset, name: str, pkt: Packet) -> Outcome:
    _, rules = chain(ruleset.script, name)
    header(ruleset.script, name)  # policy accept
    for line in rules:
        outcome, pkt = run_rule(line, pkt)
        if outcome is not None:
            return outcome
    return Outcome("accept", mark=pkt.mark, by_policy=True)


def run_decide(ruleset: Ruleset, pkt: Packet) -> Outcome:
    out = run_chain(ruleset, "decide", pkt)
    assert out.redirect is None and out.tproxy is None and out.mark == pkt.mark
    return Outcome(out.verdict, out.prefix, out.reject_with)


def run_output(ruleset: Ruleset, pkt: Packet) -> Outcome:
    """A locally generated packet through the output hooks in priority order and, when the route
    chain marked it for the policy route (``local default dev lo``), back in through prerouting."""
    decide = run_decide(ruleset, pkt)
    if decide.verdict == "reject":
        return decide
    out = run_chain(ruleset, "mark_udp", pkt)
    assert out.verdict == "accept", out
    marked = replace(pkt, mark=out.mark)
    nat = run_chain(ruleset, "capture", marked)
    assert nat.verdict == "accept" and nat.mark == marked.mark
    if marked.mark == UDP_MARK:
        assert nat.redirect is None
        looped = replace(marked, oif="", local=False)  # re-entering on lo: the original destination kept
        diverted = run_chain(ruleset, "divert_udp", looped)
        assert diverted.verdict == "accept"
        return replace(diverted, redirect=None, mark=marked.mark)
    return replace(nat, mark=marked.mark)


def wire(addr: IPv4Address | IPv6Address) -> IPv4Address | IPv6Address:
    """A dual-stack socket connecting to ::ffff:a.b.c.d sends an IPv4 packet."""
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def compiled(policy: Policy, port: int = 4321, allow_host=(), dns_to_stub: bool = True) -> Ruleset:
    return compile_ruleset(policy.ordered_rules(), policy.default, port, allow_host, dns_to_stub=dns_to_stub)


def blocks(decide: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The decide chain split into its preamble and one block per KERNEL_DECIDED protocol (each
    starting with its two gateway lines, in that order); every line of a block is restricted to
    the block's protocol, and no line at all to an ENGINE_ONLY protocol."""
    starts = [i for i, line in enumerate(decide) if re.match(rf"meta l4proto (tcp|udp) ip daddr {SUBNET} log ", line)]
    assert [decide[i].split()[2] for i in starts] == list(KERNEL), decide
    bounds = [*starts, len(decide)]
    parts = {proto: decide[bounds[k]:bounds[k + 1]] for k, proto in enumerate(KERNEL)}
    for proto, lines in parts.items():
        assert all(line.startswith(f"meta l4proto {proto} ") for line in lines), (proto, lines)
        assert lines[1].startswith(f"meta l4proto {proto} ip6 daddr {SUBNET6} log "), lines[1]
    for proto in ENGINE_ONLY:
        assert not any(line.startswith(f"meta l4proto {proto} ") for line in decide), proto
    return decide[:starts[0]], parts


def reaches_engine(rs: Ruleset, pkt: Packet, port: int = 4321) -> bool:
    """Does a packet that passed decide end at the engine (TCP: redirected to the listener, UDP:
    tproxied to the transparent socket of its family)?"""
    out = run_output(rs, pkt)
    if out.verdict != "accept":
        return False
    if pkt.proto == "tcp":
        return out.redirect == port and out.tproxy is None
    return out.tproxy == (f"127.0.0.1:{port}" if pkt.daddr.version == 4 else f"[::1]:{port}")


def assert_refused(rs: Ruleset, pkt: Packet, label: str, policy: Policy | None = None, allow_host=()) -> None:
    """Refused with ``label``: by the kernel for KERNEL_DECIDED protocols (logged, with the
    protocol's reject), else passed to the engine, whose Decider refuses it."""
    out = run_decide(rs, pkt)
    if pkt.proto in KERNEL:
        assert (out.verdict, rs.label_of(out.prefix), out.reject_with) == (
            "reject", label, REJECT_WITH[pkt.proto]), (pkt, out)
    else:
        assert out == Outcome("accept"), (pkt, out)
        assert reaches_engine(rs, pkt), pkt
        if policy is not None:
            decision, _ = Decider(policy, NET, allow_host).decide(pkt.proto, pkt.daddr, pkt.dport)
            assert (decision.verdict, decision.rule) == ("deny", label), (pkt, decision)


def kernel_verdict(proto: str, verdict: str) -> str:
    """What decide says for a final ``verdict``: the kernel passes all of ENGINE_ONLY protocols."""
    return verdict if proto in KERNEL else "accept"


def prefix_of(line: str) -> str | None:
    m = re.search(r'log group \d+ prefix "([^"]*)"', line)
    return m[1] if m else None


# --- the interpreter itself ----------------------------------------------------------------------


INTERPRETER_REJECTS = [
    # a line, and a packet that reaches its bad part
    ("meta l4proto tcp ip daddr 1.2.3.4 dport 80 accept", "tcp"),  # unknown token
    ("meta l4proto udp udp sport 53 accept", "udp"),
    ("meta l4proto { tcp, icmp } accept", "tcp"),
    ("th dport 53 accept", "udp"),  # th without a transport protocol
    ("meta l4proto udp tcp dport 80 accept", "udp"),  # tcp dport on a UDP line
    ("meta l4proto { tcp, udp } tcp dport 80 accept", "tcp"),
    ("meta l4proto tcp tcp dport != 80 accept", "tcp"),  # negation only of a set
    ('meta l4proto udp log group 1 prefix "tether:0" reject with tcp reset', "udp"),
    ('meta l4proto tcp log group 2 prefix "tether:0" reject with tcp reset', "tcp"),
    ('meta l4proto tcp log group 1 prefix "tether:0" reject', "tcp"),
    ("meta l4proto tcp accept drop", "tcp"),
    ("meta l4proto tcp", "tcp"),  # no verdict
    ("ip daddr 1.2.3.4/8 accept", "tcp"),  # host bits set
    ("meta l4proto udp meta mark set 0x1 ip daddr 1.2.3.4 accept", "udp"),  # a match after a statement
    ("meta l4proto udp tproxy ip to 127.0.0.1:1 accept", "udp"),  # tproxy without nfproto
    ("meta nfproto ipv4 meta l4proto udp tproxy ip to [::1]:1 accept", "udp"),
    ("meta nfproto ipv4 meta l4proto udp tproxy ip to 127.0.0.1:1", "udp"),  # tproxy without a verdict
    ("meta l4proto udp redirect to :1", "udp"),
    ("meta l4proto tcp redirect to :0", "tcp"),
]


@pytest.mark.parametrize("line,proto", INTERPRETER_REJECTS, ids=[c[0] for c in INTERPRETER_REJECTS])
def test_interpreter_fails_loudly_on_what_it_does_not_know(line, proto):
    with pytest.raises((AssertionError, ValueError)):
        run_rule(line, Packet(proto, IPv4Address("1.2.3.4"), 80))


def test_interpreter_understands_the_line_forms():
    v4, v6 = IPv4Address("203.0.113.7"), IPv6Address("2001:db8::7")
    both = "meta l4proto { tcp, udp } th dport { 22, 53, 80-90 } accept"
    for proto in PROTOS:
        for port, hit in [(22, True), (53, True), (80, True), (90, True), (91, False), (23, False)]:
            assert (run_rule(both, Packet(proto, v4, port))[0] is not None) == hit
    assert run_rule("meta l4proto udp udp dport != { 53 } accept", Packet("udp", v4, 53))[0] is None
    assert run_rule("meta l4proto udp udp dport != { 53 } accept", Packet("udp", v4, 54))[0] == Outcome("accept")
    assert run_rule("meta l4proto udp udp dport 1-10 accept", Packet("tcp", v4, 5))[0] is None
    assert run_rule("meta l4proto udp ip6 daddr 2001:db8::/32 accept", Packet("udp", v6, 5))[0] == Outcome("accept")
    assert run_rule("meta l4proto udp ip6 daddr 2001:db8::/32 accept", Packet("udp", v4, 5))[0] is None
    out, pkt = run_rule("meta l4proto udp meta mark set 0x7e7e", Packet("udp", v4, 5))
    assert out is None and pkt.mark == 0x7E7E
    assert run_rule("meta l4proto udp fib daddr type local return", Packet("udp", v4, 5, local=True))[0] == Outcome(
        "accept", by_policy=True)
    line = "meta nfproto ipv6 meta l4proto udp meta mark 0x7e7e tproxy ip6 to [::1]:9 accept"
    assert run_rule(line, Packet("udp", v6, 5, mark=0x7E7E))[0].tproxy == "[::1]:9"
    assert run_rule(line, Packet("udp", v4, 5, mark=0x7E7E))[0] is None
    assert run_rule(line, Packet("udp", v6, 5, mark=1))[0] is None
    rej = 'meta l4proto udp log group 1 prefix "tether:3" reject with icmpx type port-unreachable'
    assert run_rule(rej, Packet("udp", v4, 5))[0] == Outcome("reject", "tether:3", "icmpx type port-unreachable")


# --- structure ---------------------------------------------------------------------------------


def test_script_has_one_inet_table_with_four_chains():
    rs = compiled(build_policy(None, [], [], None), port=4321)
    assert rs.script.startswith("table inet tether {\n")
    assert rs.script.rstrip().endswith("}")
    assert rs.script.count("table ") == 1
    assert re.findall(r"\tchain (\w+) \{", rs.script) == ["decide", "capture", "mark_udp", "divert_udp"]
    decide_header, decide = chain(rs.script, "decide")
    assert decide_header == "type filter hook output priority -180; policy accept;"
    assert decide[:2] == ['oifname "lo" accept', "ct state != new accept"]
    capture_header, capture = chain(rs.script, "capture")
    assert capture_header == "type nat hook output priority -100; policy accept;"
    assert capture == ['oifname "lo" return', "meta l4proto tcp redirect to :4321"]
    mark_header, mark = chain(rs.script, "mark_udp")
    assert mark_header == "type route hook output priority mangle; policy accept;"
    assert mark == ["meta l4proto udp fib daddr type local return", "meta l4proto udp meta mark set 0x7e7e"]
    divert_header, divert = chain(rs.script, "divert_udp")
    assert divert_header == "type filter hook prerouting priority mangle; policy accept;"
    assert divert == ["meta nfproto ipv4 meta l4proto udp meta mark 0x7e7e tproxy ip to 127.0.0.1:4321 accept",
                      "meta nfproto ipv6 meta l4proto udp meta mark 0x7e7e tproxy ip6 to [::1]:4321 accept"]


def test_chain_hooks_and_priorities():
    """conntrack (-200) < decide < UDP marking (route, mangle -150) < capture (nat, -100) on output:
    decide must see the original destination before the mark reroutes UDP to lo and before NAT."""
    script = compiled(build_policy(None, [], [], "deny")).script
    assert header(script, "decide") == ("filter", "output", -180)
    assert header(script, "mark_udp") == ("route", "output", -150)
    assert header(script, "capture") == ("nat", "output", -100)
    assert header(script, "divert_udp") == ("filter", "prerouting", -150)
    prio = {name: header(script, name)[2] for name in ("decide", "mark_udp", "capture")}
    assert -200 < prio["decide"] < prio["mark_udp"] < prio["capture"]


def test_kernel_decides_tcp():
    assert "tcp" in KERNEL and set(KERNEL) <= set(PROTOS) and len(set(KERNEL)) == len(KERNEL)


def test_udp_mark_and_table_constants():
    assert UDP_MARK == 0x7E7E
    assert 0 < UDP_MARK < 2**32
    assert 0 < UDP_TABLE < 2**32 and UDP_TABLE not in (253, 254, 255)  # not default/main/local
    script = compiled(build_policy(None, [], [], "deny")).script
    assert script.count(f"{UDP_MARK:#x}") == 3  # set once, matched by both tproxy lines
    assert f"meta mark set {UDP_MARK:#x}" in script


@pytest.mark.parametrize("port", [1, 1080, 40000, 65535])
def test_capture_and_divert_use_the_listener_port(port):
    rs = compiled(build_policy(None, [], [], None), port=port)
    _, capture = chain(rs.script, "capture")
    assert capture[-1] == f"meta l4proto tcp redirect to :{port}"
    _, divert = chain(rs.script, "divert_udp")
    assert [line.split(" to ")[1] for line in divert] == [f"127.0.0.1:{port} accept", f"[::1]:{port} accept"]
    for proto in PROTOS:
        for addr in (IPv4Address("203.0.113.7"), IPv6Address("2001:db8::7")):
            assert reaches_engine(rs, Packet(proto, addr, 443), port), (proto, addr)


# --- mark_udp / divert_udp --------------------------------------------------------------------


MARK_CASES = [
    # proto, addr, local, marked
    ("udp", "203.0.113.7", False, True),
    ("udp", "2001:db8::7", False, True),
    ("udp", "10.0.2.3", False, True),  # DNS to the stub: through the engine too
    ("udp", "fd00:7e7e::3", False, True),
    ("udp", "10.0.2.77", False, True),
    ("udp", "10.0.2.100", True, False),  # own addresses: never diverted (the engine's replies)
    ("udp", "fd00:7e7e::100", True, False),
    ("udp", "127.0.0.1", True, False),
    ("udp", "::1", True, False),
    ("tcp", "203.0.113.7", False, False),
    ("tcp", "2001:db8::7", False, False),
    ("tcp", "10.0.2.100", True, False),
]


@pytest.mark.parametrize("proto,addr,local,marked", MARK_CASES, ids=[f"{c[0]}-{c[1]}" for c in MARK_CASES])
def test_mark_udp_marks_udp_not_to_local_addresses(proto, addr, local, marked):
    rs = compiled(build_policy(None, [], [], "allow"))
    out = run_chain(rs, "mark_udp", Packet(proto, ipaddress.ip_address(addr), 5000, local=local))
    assert out.verdict == "accept" and out.by_policy
    assert out.mark == (UDP_MARK if marked else 0)


DIVERT_CASES = [
    # proto, addr, mark, tproxy target (None: not diverted)
    ("udp", "203.0.113.7", UDP_MARK, "127.0.0.1:4321"),
    ("udp", "2001:db8::7", UDP_MARK, "[::1]:4321"),
    ("udp", "10.0.2.3", UDP_MARK, "127.0.0.1:4321"),
    ("udp", "fd00:7e7e::3", UDP_MARK, "[::1]:4321"),
    ("udp", "203.0.113.7", 0, None),  # e.g. the engine's replies injected through the tun
    ("udp", "2001:db8::7", 0, None),
    ("udp", "203.0.113.7", UDP_MARK + 1, None),
    ("tcp", "203.0.113.7", UDP_MARK, None),
    ("tcp", "2001:db8::7", UDP_MARK, None),
]


@pytest.mark.parametrize("proto,addr,mark,target", DIVERT_CASES,
                         ids=[f"{c[0]}-{c[1]}-mark{c[2]:#x}" for c in DIVERT_CASES])
def test_divert_udp_tproxies_marked_udp_to_the_family_loopback(proto, addr, mark, target):
    rs = compiled(build_policy(None, [], [], "allow"), port=4321)
    out = run_chain(rs, "divert_udp", Packet(proto, ipaddress.ip_address(addr), 53, oif="", mark=mark))
    assert out.verdict == "accept"
    assert out.tproxy == target
    assert out.by_policy == (target is None)


def test_output_path_end_to_end():
    rs = compiled(build_policy(None, [], ["198.51.100.7"], "allow"), port=7777)
    tcp = run_output(rs, Packet("tcp", IPv4Address("203.0.113.7"), 443))
    assert (tcp.verdict, tcp.redirect, tcp.tproxy, tcp.mark) == ("accept", 7777, None, 0)
    udp = run_output(rs, Packet("udp", IPv4Address("203.0.113.7"), 443))
    assert (udp.verdict, udp.redirect, udp.tproxy, udp.mark) == ("accept", None, "127.0.0.1:7777", UDP_MARK)
    udp6 = run_output(rs, Packet("udp", IPv6Address("2001:db8::1"), 443))
    assert udp6.tproxy == "[::1]:7777"
    assert run_output(rs, Packet("udp", NET.dns, 53)).tproxy == "127.0.0.1:7777"
    assert run_output(rs, Packet("udp", NET.dns6, 53)).tproxy == "[::1]:7777"
    assert run_output(rs, Packet("tcp", NET.dns6, 53)).redirect == 7777
    for proto in PROTOS:
        denied = run_output(rs, Packet(proto, IPv4Address("198.51.100.7"), 443))
        if proto in KERNEL:
            assert (denied.verdict, rs.label_of(denied.prefix), denied.mark, denied.tproxy, denied.redirect) == (
                "reject", "198.51.100.7", 0, None, None)
        else:  # the engine refuses it
            assert reaches_engine(rs, Packet(proto, IPv4Address("198.51.100.7"), 443), 7777)
        lo = run_output(rs, Packet(proto, IPv4Address("127.0.0.1"), 443, oif="lo", local=True))
        assert (lo.verdict, lo.tproxy, lo.redirect, lo.mark) == ("accept", None, None, 0)


# --- the decide chain: blocks, labels, rules ---------------------------------------------------


def _block(proto: str, first: int, allow_host: bool) -> tuple[list[str], list[str]]:
    reject = "reject with " + REJECT_WITH[proto]
    lines = [
        f'meta l4proto {proto} ip daddr 10.0.2.0/24 log group 1 prefix "tether:{first}" {reject}',
        f'meta l4proto {proto} ip6 daddr fd00:7e7e::/64 log group 1 prefix "tether:{first + 1}" {reject}',
        f'meta l4proto {proto} ip daddr 198.51.100.7/32 log group 1 prefix "tether:{first + 2}" {reject}',
    ]
    if proto == "tcp":
        lines.append("meta l4proto tcp ip daddr 203.0.113.0/24 tcp dport 443 accept")
    else:
        lines.append("meta l4proto udp ip daddr 198.51.100.9/32 udp dport 443 accept")
    lines += [f"meta l4proto {proto} ip6 daddr 2001:db8::1/128 {proto} dport 80-90 accept",
              f'meta l4proto {proto} log group 1 prefix "tether:{first + 3}" {reject}']
    return lines, [GATEWAY_RULE, GATEWAY_RULE, "198.51.100.7", "default"]


def test_decide_chain_golden():
    policy = build_policy(None, ["tcp://203.0.113.0/24:443", "udp://198.51.100.9:443", "[2001:db8::1]:80-90"],
                          ["198.51.100.7"], "deny")
    rs = compiled(policy, allow_host=(22,))
    _, decide = chain(rs.script, "decide")
    expected = [
        'oifname "lo" accept',
        "ct state != new accept",
        "meta l4proto { tcp, udp } ip daddr 10.0.2.3 th dport 53 accept",
        "meta l4proto { tcp, udp } ip6 daddr fd00:7e7e::3 th dport 53 accept",
        "meta l4proto { tcp, udp } th dport 53 accept",
        "meta l4proto { tcp, udp } ip daddr 10.0.2.2 th dport { 22 } accept",
    ]
    labels: list[str] = []
    for proto in KERNEL:
        lines, block_labels = _block(proto, len(labels), True)
        expected += lines
        labels += block_labels
    assert decide == expected
    assert rs.labels == labels


def test_every_deny_is_logged_with_a_label_that_maps_back_to_its_rule():
    policy = build_policy(None, ["203.0.113.0/24:443"], ["198.51.100.7", "tcp://[2001:db8::1]:22"], "deny")
    rs = compiled(policy)
    _, decide = chain(rs.script, "decide")
    denies = [line for line in decide if "reject" in line]
    prefixes = [re.search(r'log group (\d+) prefix "([^"]*)" reject', line).groups() for line in denies]
    assert all(group == str(NFLOG_GROUP) for group, _ in prefixes)
    assert [p for _, p in prefixes] == [f"{LOG_PREFIX}{k}" for k in range(len(denies))]
    assert len(rs.labels) == len(denies)
    expected = {"tcp": [GATEWAY_RULE, GATEWAY_RULE, "198.51.100.7", "tcp://[2001:db8::1]:22", "default"],
                "udp": [GATEWAY_RULE, GATEWAY_RULE, "198.51.100.7", "default"]}  # no tcp:// rule
    assert [rs.label_of(p) for _, p in prefixes] == [label for proto in KERNEL for label in expected[proto]]
    assert "meta l4proto tcp ip daddr 198.51.100.7/32 log" in denies[2]
    assert "meta l4proto tcp ip6 daddr 2001:db8::1/128 tcp dport 22 log" in denies[3]
    if "udp" in KERNEL:
        assert any(line.startswith("meta l4proto udp ip daddr 198.51.100.7/32 log") for line in denies)
    for line in denies:
        assert line.endswith("reject with " + REJECT_WITH[line.split()[2]])


def test_allow_rules_accept_without_logging_in_each_block():
    rs = compiled(build_policy(None, ["203.0.113.0/24:80-90", "2001:db8::/32"], [], "deny"))
    _, decide = chain(rs.script, "decide")
    for proto in KERNEL:
        assert f"meta l4proto {proto} ip daddr 203.0.113.0/24 {proto} dport 80-90 accept" in decide
        assert f"meta l4proto {proto} ip6 daddr 2001:db8::/32 accept" in decide
    assert not any("log" in line and "accept" in line for line in decide)


LABEL_OF_BAD = ["", "tether:", "tether:x", "tether:-1x", "tether:99", "other:0", "TETHER:0", "tether: 0x",
                "tether:\u0663", "tether:+1", "tether:1 ", "xtether:0"]


@pytest.mark.parametrize("prefix", LABEL_OF_BAD, ids=[repr(p) for p in LABEL_OF_BAD])
def test_label_of_unknown_prefix_is_none(prefix):
    rs = compiled(build_policy(None, [], ["198.51.100.7"], "deny"))
    assert rs.label_of(prefix) is None


@pytest.mark.parametrize("prefix", ["tether:-1", "tether:-2"])
def test_label_of_negative_index_is_none(prefix):
    rs = compiled(build_policy(None, [], ["198.51.100.7"], "deny"))
    assert rs.label_of(prefix) is None


def test_label_of_last_index_and_one_past():
    rs = compiled(build_policy(None, [], ["198.51.100.7"], "deny"))
    n = len(rs.labels)
    assert rs.label_of(f"{LOG_PREFIX}{n - 1}") == "default"
    assert rs.label_of(f"{LOG_PREFIX}{n}") is None
    assert rs.label_of(f"{LOG_PREFIX}0{n - 1}") == "default"  # a leading zero: the same index


def _expected_labels(policy: Policy, catch_all: dict[str, bool]) -> list[str]:
    labels = []
    for proto in KERNEL:
        labels += [GATEWAY_RULE, GATEWAY_RULE]
        labels += [r.text for r in policy.ip_rules() if r.action == "deny" and r.proto in (None, proto)]
        if catch_all[proto]:
            labels.append("default")
    return labels


def test_rules_are_emitted_in_policy_order_first_match_wins():
    policy = build_policy(None, ["198.51.100.0/24"], ["198.51.100.7:22"], "allow")
    rs = compiled(policy)
    _, parts = blocks(chain(rs.script, "decide")[1])
    for proto, lines in parts.items():
        positions = [next(i for i, line in enumerate(lines) if f"daddr {r.network}" in line
                          and (r.ports is None or f"dport {r.ports[0]}" in line))
                     for r in policy.ordered_rules()[:2]]
        assert positions[0] < positions[1]
    for proto in PROTOS:
        assert_refused(rs, Packet(proto, IPv4Address("198.51.100.7"), 22), "198.51.100.7:22", policy)
        assert run_decide(rs, Packet(proto, IPv4Address("198.51.100.7"), 23)).verdict == "accept"


DEFAULT_CASES = [("deny", True), ("allow", False)]


@pytest.mark.parametrize("default,catch_all", DEFAULT_CASES, ids=[f"default-{d}" for d, _ in DEFAULT_CASES])
def test_default_deny_adds_a_logged_catch_all_to_each_block(default, catch_all):
    rs = compiled(build_policy(None, ["203.0.113.7"], [], default))
    _, parts = blocks(chain(rs.script, "decide")[1])
    for proto, lines in parts.items():
        catch = [line for line in lines if line.startswith(f"meta l4proto {proto} log ")]
        assert len(catch) == int(catch_all)
        if catch_all:
            assert rs.label_of(prefix_of(catch[0])) == "default"
            assert catch[0].endswith("reject with " + REJECT_WITH[proto])
            assert lines[-1] == catch[0]  # the last line of its block


def test_proto_scheme_rules_go_to_their_own_block_only():
    policy = build_policy(None, ["udp://9.9.9.9:443", "tcp://203.0.113.7", "192.0.2.1"],
                          ["udp://198.51.100.7", "tcp://198.51.100.8:22"], "allow")
    rs = compiled(policy)
    preamble, parts = blocks(chain(rs.script, "decide")[1])
    text = {proto: "\n".join(parts.get(proto, [])) for proto in PROTOS}
    assert not any(a in line for line in preamble for a in ("9.9.9.9", "198.51.100", "203.0.113", "192.0.2"))
    assert "9.9.9.9" not in text["tcp"] and "198.51.100.7" not in text["tcp"]
    assert "203.0.113.7" not in text["udp"] and "198.51.100.8" not in text["udp"]
    for proto in KERNEL:
        assert "192.0.2.1/32" in text[proto]
    assert ("9.9.9.9" in text["udp"]) == ("udp" in KERNEL)
    assert "udp://198.51.100.7" not in rs.labels or "udp" in KERNEL
    assert_refused(rs, Packet("udp", IPv4Address("198.51.100.7"), 443), "udp://198.51.100.7", policy)
    assert run_decide(rs, Packet("tcp", IPv4Address("198.51.100.7"), 443)).verdict == "accept"
    assert_refused(rs, Packet("tcp", IPv4Address("198.51.100.8"), 22), "tcp://198.51.100.8:22", policy)
    assert run_decide(rs, Packet("udp", IPv4Address("198.51.100.8"), 22)).verdict == "accept"


@pytest.mark.parametrize("proto", PROTOS)
def test_scheme_rules_are_compiled_for_their_protocol(proto):
    other = "udp" if proto == "tcp" else "tcp"
    policy = build_policy(None, [f"{proto}://203.0.113.7:443"], [], "deny")
    rs = compiled(policy)
    assert run_decide(rs, Packet(proto, IPv4Address("203.0.113.7"), 443)).verdict == "accept"
    assert_refused(rs, Packet(proto, IPv4Address("203.0.113.7"), 80), "default", policy)
    assert_refused(rs, Packet(other, IPv4Address("203.0.113.7"), 443), "default", policy)


def test_ipv6_rules_use_ip6_daddr_and_ipv4_rules_ip_daddr():
    rs = compiled(build_policy(None, ["[2001:db8::/32]:443", "203.0.113.0/24"], ["[2001:db8::dead]"], "deny"))
    _, decide = chain(rs.script, "decide")
    for proto in KERNEL:
        assert f"meta l4proto {proto} ip6 daddr 2001:db8::/32 {proto} dport 443 accept" in decide
        assert f"meta l4proto {proto} ip daddr 203.0.113.0/24 accept" in decide
        assert any(line.startswith(f"meta l4proto {proto} ip6 daddr 2001:db8::dead/128 log") for line in decide)
    assert not any(re.search(r"\bip daddr [0-9a-f]*:", line) for line in decide)
    assert not any(re.search(r"\bip6 daddr \d+\.\d+\.\d+\.\d+", line) for line in decide)


def test_ipv4_mapped_rule_is_compiled_as_ipv4():
    rs = compiled(build_policy(None, ["::ffff:203.0.113.7"], [], "deny"))
    _, decide = chain(rs.script, "decide")
    for proto in KERNEL:
        assert f"meta l4proto {proto} ip daddr 203.0.113.7/32 accept" in decide
        assert run_decide(rs, Packet(proto, wire(IPv6Address("::ffff:203.0.113.7")), 1)).verdict == "accept"
    assert not any("::ffff" in line for line in decide)


PORT_CASES = [
    # rule, emitted dport (without the protocol), (port, verdict) probes
    ("203.0.113.7:443", "dport 443 ", [(443, "accept"), (442, "reject"), (444, "reject")]),
    ("203.0.113.7:80-90", "dport 80-90 ", [(79, "reject"), (80, "accept"), (85, "accept"), (90, "accept"),
                                           (91, "reject")]),
    ("203.0.113.7:1-65535", "dport 1-65535 ", [(1, "accept"), (65535, "accept")]),
    ("203.0.113.7:65535", "dport 65535 ", [(65535, "accept"), (65534, "reject")]),
    ("203.0.113.7:53", "dport 53 ", [(53, "accept"), (54, "reject")]),
    ("203.0.113.7", None, [(1, "accept"), (65535, "accept")]),
]


@pytest.mark.parametrize("proto", PROTOS)
@pytest.mark.parametrize("rule,dport,probes", PORT_CASES, ids=[c[0] for c in PORT_CASES])
def test_port_ranges(rule, dport, probes, proto):
    policy = build_policy(None, [rule], [], "deny")
    rs = compiled(policy, dns_to_stub=False)
    _, parts = blocks(chain(rs.script, "decide")[1])
    if proto in KERNEL:
        [line] = [line for line in parts[proto] if "203.0.113.7/32" in line]
        if dport is None:
            assert "dport" not in line
        else:
            assert f"{proto} {dport}" in line
    for port, verdict in probes:
        pkt = Packet(proto, IPv4Address("203.0.113.7"), port)
        if verdict == "reject":
            assert_refused(rs, pkt, "default", policy)
        else:
            assert run_decide(rs, pkt).verdict == "accept"
            assert reaches_engine(rs, pkt)


@pytest.mark.parametrize("proto", PROTOS)
def test_established_and_loopback_traffic_is_never_decided(proto):
    rs = compiled(build_policy(None, [], ["0.0.0.0/0", "::/0"], "deny"))
    assert run_decide(rs, Packet(proto, IPv4Address("203.0.113.7"), 80, ct_new=False)) == Outcome("accept")
    for addr in ("127.0.0.1", "127.8.9.10", "::1", "10.0.2.100", "fd00:7e7e::100"):
        # The sandbox's own addresses: sandbox-local, the policy is about leaving the sandbox.
        pkt = Packet(proto, ipaddress.ip_address(addr), 80, oif="lo", local=True)
        assert run_decide(rs, pkt) == Outcome("accept")
        out = run_output(rs, pkt)
        assert (out.redirect, out.tproxy, out.mark) == (None, None, 0)


# --- DNS ---------------------------------------------------------------------------------------


def test_dns_lines_come_first_after_conntrack():
    for dns_to_stub, extra in ((True, ["meta l4proto { tcp, udp } th dport 53 accept"]), (False, [])):
        rs = compiled(build_policy(None, [], ["0.0.0.0/0"], "deny"), allow_host=(80,), dns_to_stub=dns_to_stub)
        _, decide = chain(rs.script, "decide")
        assert decide[2:5 + len(extra)] == [
            "meta l4proto { tcp, udp } ip daddr 10.0.2.3 th dport 53 accept",
            "meta l4proto { tcp, udp } ip6 daddr fd00:7e7e::3 th dport 53 accept",
            *extra,
            "meta l4proto { tcp, udp } ip daddr 10.0.2.2 th dport { 80 } accept",
        ]
        assert sum("53" in line for line in decide) == 2 + len(extra)


DNS_DESTS = ["10.0.2.3", "fd00:7e7e::3", "8.8.8.8", "2001:4860:4860::8888", "198.51.100.7", "10.0.2.2",
             "10.0.2.77", "fd00:7e7e::2", "169.254.169.254", "0.0.0.0", "224.0.0.251", "::ffff:9.9.9.9"]


@pytest.mark.parametrize("dns_to_stub", [True, False], ids=["dns-to-stub", "dns-passthrough"])
@pytest.mark.parametrize("proto", PROTOS)
@pytest.mark.parametrize("addr", DNS_DESTS)
def test_dns_to_the_stub_always_passes_to_others_only_with_dns_to_stub(addr, proto, dns_to_stub):
    """Port 53 passes the decide chain before any rule (the stub decides by name, so this is not
    compared with Policy.evaluate) - to any address with dns_to_stub, else only to the stub."""
    policy = build_policy(None, [], ["0.0.0.0/0", "::/0"], "deny")
    rs = compiled(policy, dns_to_stub=dns_to_stub)
    ip = wire(ipaddress.ip_address(addr))
    pkt = Packet(proto, ip, 53)
    if dns_to_stub or ip in STUBS:
        assert run_decide(rs, pkt) == Outcome("accept")
        assert reaches_engine(rs, pkt)
    else:
        gateway = ip in SUBNET or ip in SUBNET6
        assert_refused(rs, pkt, GATEWAY_RULE if gateway else policy.evaluate(proto, ip, 53).rule, policy)


@pytest.mark.parametrize("dns_to_stub", [True, False], ids=["dns-to-stub", "dns-passthrough"])
@pytest.mark.parametrize("proto", PROTOS)
@pytest.mark.parametrize("port", [52, 54, 853, 5353, 1053, 5300])
def test_only_port_53_is_dns(port, proto, dns_to_stub):
    policy = build_policy(None, ["0.0.0.0/0"], [], "allow")
    rs = compiled(policy, allow_host=(22,), dns_to_stub=dns_to_stub)
    for stub in STUBS:
        assert_refused(rs, Packet(proto, stub, port), GATEWAY_RULE, policy, (22,))
    deny_all = build_policy(None, [], ["0.0.0.0/0"], "deny")
    assert_refused(compiled(deny_all, dns_to_stub=dns_to_stub), Packet(proto, IPv4Address("8.8.8.8"), port),
                   "0.0.0.0/0", deny_all)


def test_dns_uses_the_sandbox_net_stub_addresses():
    net = SandboxNet(dns=IPv4Address("192.168.77.53"), dns6=IPv6Address("fd00:1::53"))
    rs = compile_ruleset([], "deny", 1, (), net, dns_to_stub=False)
    _, decide = chain(rs.script, "decide")
    assert "meta l4proto { tcp, udp } ip daddr 192.168.77.53 th dport 53 accept" in decide
    assert "meta l4proto { tcp, udp } ip6 daddr fd00:1::53 th dport 53 accept" in decide
    assert not any("10.0.2.3" in line or "fd00:7e7e::3" in line for line in decide)
    for proto in PROTOS:
        assert run_decide(rs, Packet(proto, IPv4Address("192.168.77.53"), 53)).verdict == "accept"
        assert run_decide(rs, Packet(proto, IPv6Address("fd00:1::53"), 53)).verdict == "accept"
        assert run_decide(rs, Packet(proto, IPv4Address("10.0.2.3"), 53)).verdict == kernel_verdict(proto, "reject")


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_dns_property(data):
    """Any policy, any destination, either protocol: port 53 passes with dns_to_stub, and to the
    stub's addresses always, and reaches the engine (the stub); the kernel says nothing else
    (no label, no reset) about it."""
    policy = data.draw(st.one_of(policies(), domain_policies()))
    dns_to_stub = data.draw(st.booleans())
    allow_host = data.draw(st.lists(ports, max_size=3))
    rs = compiled(policy, allow_host=allow_host, dns_to_stub=dns_to_stub)
    proto = data.draw(st.sampled_from(PROTOS))
    addr = wire(data.draw(st.one_of(addresses(), st.sampled_from(STUBS))))
    if any(addr in net for net in LOOPBACK):
        return
    pkt = Packet(proto, addr, 53)
    out = run_decide(rs, pkt)
    if dns_to_stub or addr in STUBS:
        assert out == Outcome("accept"), (str(addr), proto)
        assert reaches_engine(rs, pkt)


# --- the gateway and the sandbox subnets -----------------------------------------------------

GATEWAY_CASES = [
    # allow-host ports, addr, port, verdict, label
    ((22, 8080), "10.0.2.2", 22, "accept", None),
    ((22, 8080), "10.0.2.2", 8080, "accept", None),
    ((22, 8080), "10.0.2.2", 23, "reject", GATEWAY_RULE),
    ((22, 8080), "10.0.2.2", 80, "reject", GATEWAY_RULE),
    ((), "10.0.2.2", 22, "reject", GATEWAY_RULE),
    ((22,), "10.0.2.3", 22, "reject", GATEWAY_RULE),  # the DNS address: not a host alias
    ((22,), "10.0.2.1", 22, "reject", GATEWAY_RULE),
    ((22,), "10.0.2.0", 22, "reject", GATEWAY_RULE),
    ((22,), "10.0.2.255", 22, "reject", GATEWAY_RULE),
    ((22,), "10.0.2.100", 22, "reject", GATEWAY_RULE),  # own address: only via lo, never via tun0
    ((53,), "10.0.2.2", 53, "accept", None),  # allow-host 53 (and DNS anyway with dns_to_stub)
    ((), "10.0.2.2", 53, "dns", GATEWAY_RULE),  # DNS: accepted only with dns_to_stub
    ((), "10.0.2.77", 53, "dns", GATEWAY_RULE),
    ((), "10.0.2.3", 53, "accept", None),  # the stub itself
]


@pytest.mark.parametrize("dns_to_stub", [True, False], ids=["dns-to-stub", "dns-passthrough"])
@pytest.mark.parametrize("proto", PROTOS)
@pytest.mark.parametrize("default", ["allow", "deny"])
@pytest.mark.parametrize("allow_host,addr,port,verdict,label", GATEWAY_CASES,
                         ids=[f"{c[1]}:{c[2]}-allow-host{list(c[0])}" for c in GATEWAY_CASES])
def test_gateway_only_on_allow_host_ports_rest_of_subnet_refused(default, allow_host, addr, port, verdict, label,
                                                                 proto, dns_to_stub):
    # Even a user rule allowing the whole subnet does not open it: the gateway lines come first.
    policy = build_policy(None, ["10.0.0.0/8", "0.0.0.0/0"], [], default)
    rs = compiled(policy, allow_host=allow_host, dns_to_stub=dns_to_stub)
    if verdict == "dns":
        verdict = "accept" if dns_to_stub else "reject"
    pkt = Packet(proto, ipaddress.ip_address(addr), port)
    if verdict == "reject":
        assert_refused(rs, pkt, label, policy, allow_host)
    else:
        assert run_decide(rs, pkt) == Outcome("accept")
        assert reaches_engine(rs, pkt)


@pytest.mark.parametrize("proto", PROTOS)
def test_allow_host_beats_user_deny_of_the_gateway(proto):
    # The engine's second check (Decider.decide) maps allow-host before the policy too.
    policy = build_policy(None, [], ["10.0.0.0/8", "0.0.0.0/0"], "deny")
    rs = compiled(policy, allow_host=(22,))
    assert run_decide(rs, Packet(proto, IPv4Address("10.0.2.2"), 22)).verdict == "accept"
    assert Decider(policy, NET, (22,)).decide(proto, "10.0.2.2", 22)[0].verdict == "allow"
    assert_refused(rs, Packet(proto, IPv4Address("10.0.2.2"), 23), GATEWAY_RULE, policy, (22,))


def test_allow_host_ports_are_sorted_and_deduplicated_for_tcp_and_udp():
    rs = compiled(build_policy(None, [], [], "deny"), allow_host=(8080, 22, 8080, 443))
    _, decide = chain(rs.script, "decide")
    assert "meta l4proto { tcp, udp } ip daddr 10.0.2.2 th dport { 22, 443, 8080 } accept" in decide
    assert sum("10.0.2.2" in line for line in decide) == 1


def test_no_allow_host_line_without_ports():
    _, decide = chain(compiled(build_policy(None, [], [], "deny")).script, "decide")
    assert not any("10.0.2.2" in line for line in decide)


def test_custom_sandbox_net_is_used_for_gateway_and_subnet():
    net = SandboxNet(address=ipaddress.IPv4Interface("192.168.77.10/24"), gateway=IPv4Address("192.168.77.1"))
    policy = build_policy(None, [], [], "allow")
    rs = compile_ruleset(policy.ordered_rules(), policy.default, 1, (22,), net)
    _, decide = chain(rs.script, "decide")
    assert "meta l4proto { tcp, udp } ip daddr 192.168.77.1 th dport { 22 } accept" in decide
    for proto in PROTOS:
        assert run_decide(rs, Packet(proto, IPv4Address("192.168.77.1"), 22)).verdict == "accept"
    for proto in KERNEL:
        assert any(line.startswith(f"meta l4proto {proto} ip daddr 192.168.77.0/24 log") for line in decide)
        assert rs.label_of(run_decide(rs, Packet(proto, IPv4Address("192.168.77.5"), 22)).prefix) == GATEWAY_RULE
    assert not any("10.0.2.2" in line or "10.0.2.0/24" in line for line in decide)  # (the stub: net.dns)


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
probe_ports = st.one_of(ports, st.sampled_from([53, 80, 443]))


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
                          st.sampled_from(["80", "443", "22", "80-90", "53", "50-60"])))
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
    """Handled by the kernel outside the policy: the sandbox subnets and loopback."""
    a = wire(addr)
    return a in SUBNET or a in SUBNET6 or any(a in net for net in LOOPBACK)


def _probe(policy: Policy, draw) -> tuple[IPv4Address | IPv6Address, int]:
    """A destination: often inside one of the policy's networks, near a port bound."""
    rules = policy.ip_rules()
    if rules and draw(st.booleans()):
        rule = draw(st.sampled_from(rules))
        net = rule.network
        host = net.network_address + draw(st.integers(0, min(net.num_addresses - 1, 2**64)))
        if net.version == 4 and draw(st.booleans()):
            host = IPv6Address("::ffff:" + str(host))
        if rule.ports is not None and draw(st.booleans()):
            lo, hi = rule.ports
            return host, draw(st.sampled_from([p for p in (lo - 1, lo, hi, hi + 1) if 1 <= p <= 65535]))
        return host, draw(probe_ports)
    return draw(addresses()), draw(probe_ports)


def _is_dns(addr, port: int, dns_to_stub: bool) -> bool:
    """Accepted early as DNS (the stub decides by name: not compared with Policy.evaluate)."""
    return port == 53 and (dns_to_stub or wire(addr) in STUBS)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(policies(), st.booleans(), st.data())
def test_compiled_rules_agree_with_policy_evaluate_for_tcp_and_udp(policy, dns_to_stub, data):
    """For KERNEL_DECIDED protocols the kernel's verdict and label are Policy.evaluate's; every
    flow the kernel passes (all of the other protocols') reaches the engine."""
    rs = compiled(policy, dns_to_stub=dns_to_stub)
    for _ in range(10):
        addr, port = _probe(policy, data.draw)
        proto = data.draw(st.sampled_from(PROTOS))
        if _special(addr):
            continue
        pkt = Packet(proto, wire(addr), port)
        out = run_decide(rs, pkt)
        where = (proto, str(addr), port)
        if _is_dns(addr, port, dns_to_stub):
            assert out == Outcome("accept"), where
        elif proto in KERNEL:
            expected = policy.evaluate(proto, addr, port)
            where += (expected,)
            assert out.verdict == VERDICT[expected.verdict], where
            if out.verdict == "reject":
                assert rs.label_of(out.prefix) == expected.rule, where
                assert out.reject_with == REJECT_WITH[proto], where
        else:
            assert out == Outcome("accept"), where
        if out.verdict == "accept":
            assert reaches_engine(rs, pkt), where


@settings(max_examples=200, deadline=None)
@given(policies(), st.lists(ports, max_size=3), st.booleans(), st.data())
def test_compiled_ruleset_agrees_with_the_engines_own_check(policy, allow_host, dns_to_stub, data):
    """Everywhere but loopback (sandbox-local) and DNS (the engine hands it to the stub), including
    the subnets and the gateways, the kernel refuses exactly what the engine's second line of
    defence (Decider.decide) refuses, for KERNEL_DECIDED protocols; it passes everything else."""
    rs = compiled(policy, allow_host=allow_host, dns_to_stub=dns_to_stub)
    decider = Decider(policy, NET, allow_host)  # no NameMap: IP-only policies need no names
    probes = [_probe(policy, data.draw) for _ in range(6)]
    probes += [(IPv4Address("10.0.2.2"), data.draw(st.sampled_from(allow_host or [22]))),
               (IPv4Address("10.0.2.2"), data.draw(ports)),
               (data.draw(st.sampled_from([IPv4Address("10.0.2.3"), IPv4Address("10.0.2.77")])), data.draw(ports)),
               (data.draw(st.sampled_from([NET.gateway6, NET.dns6, IPv6Address("fd00:7e7e::99")])),
                data.draw(st.sampled_from(allow_host or [22])))]
    for addr, port in probes:
        a = wire(addr)
        if any(a in net for net in LOOPBACK) or _is_dns(a, port, dns_to_stub):
            continue
        proto = data.draw(st.sampled_from(PROTOS))
        decision, _target = decider.decide(proto, str(a), port)
        out = run_decide(rs, Packet(proto, a, port))
        where = (proto, str(addr), port, decision)
        assert out.verdict == kernel_verdict(proto, VERDICT[decision.verdict]), where
        if out.verdict == "reject":
            assert rs.label_of(out.prefix) == decision.rule, where


@settings(max_examples=200, deadline=None)
@given(st.one_of(policies(), st.deferred(lambda: domain_policies())), st.lists(ports, max_size=3),
       st.booleans())
def test_labels_follow_the_rules_in_order(policy, allow_host, dns_to_stub):
    """Label K is the K-th reject line's: gateway x2, the IP denies for the protocol in policy order,
    "default" when there is a catch-all - once per KERNEL_DECIDED protocol, in that order."""
    rs = compiled(policy, allow_host=allow_host, dns_to_stub=dns_to_stub)
    preamble, parts = blocks(chain(rs.script, "decide")[1])
    assert not any("reject" in line for line in preamble)
    catch_all = {proto: re.fullmatch(rf"meta l4proto {proto}( {proto} dport != \{{[^}}]*\}})? log .*",
                                     lines[-1]) is not None
                 for proto, lines in parts.items()}
    assert rs.labels == _expected_labels(policy, catch_all)
    rejects = [line for lines in parts.values() for line in lines if "reject" in line]
    assert [prefix_of(line) for line in rejects] == [f"{LOG_PREFIX}{k}" for k in range(len(rs.labels))]
    assert [rs.label_of(prefix_of(line)) for line in rejects] == rs.labels
    for proto, lines in parts.items():
        for line in lines:
            if "reject" in line:
                assert line.endswith("reject with " + REJECT_WITH[proto])
    if policy.default == "allow":
        assert not any(catch_all.values())


def test_agreement_examples():
    """A few hand-picked cases of the property above, readable on failure."""
    policy = build_policy(None, ["203.0.113.0/24:443", "2001:db8::/32", "127.0.0.1:8080", "udp://198.51.100.9:443"],
                          ["203.0.113.66", "tcp://[2001:db8::bad]:22", "udp://[2001:db8::bad]:23"], "allow",
                          [IPv4Address("192.0.2.55")])
    for dns_to_stub in (True, False):
        rs = compiled(policy, dns_to_stub=dns_to_stub)
        for proto in PROTOS:
            for addr, port in [("203.0.113.5", 443), ("203.0.113.5", 80), ("203.0.113.66", 443),
                               ("2001:db8::1", 22), ("2001:db8::bad", 22), ("2001:db8::bad", 23),
                               ("192.0.2.55", 80), ("192.0.2.56", 80), ("169.254.169.254", 80),
                               ("::ffff:169.254.169.254", 80), ("10.9.9.9", 80), ("fd00::1", 80), ("8.8.8.8", 80),
                               ("0.0.0.0", 80), ("::", 80), ("224.0.0.1", 80), ("198.51.100.9", 443),
                               ("224.0.0.251", 53)]:
                ip = ipaddress.ip_address(addr)
                out = run_decide(rs, Packet(proto, wire(ip), port))
                if _is_dns(ip, port, dns_to_stub) or proto not in KERNEL:
                    assert out.verdict == "accept"
                    continue
                expected = policy.evaluate(proto, ip, port)
                assert (out.verdict, rs.label_of(out.prefix) if out.prefix else expected.rule) == (
                    VERDICT[expected.verdict], expected.rule), (proto, addr, port)


# --- IPv6 sandbox subnet -------------------------------------------------------------------------


def test_sandbox_net_ipv6_defaults():
    assert NET.address6 == ipaddress.IPv6Interface("fd00:7e7e::100/64")
    assert NET.gateway6 == IPv6Address("fd00:7e7e::2")
    assert NET.dns6 == IPv6Address("fd00:7e7e::3")
    assert SandboxNet(ipaddress.IPv4Interface("10.0.2.100/24"), IPv4Address("10.0.2.2"),
                      IPv4Address("10.0.2.3"), 1500).mtu == 1500  # positional order unchanged


SUBNET6_CASES = ["fd00:7e7e::2", "fd00:7e7e::3", "fd00:7e7e::1", "fd00:7e7e::ffff:1", "fd00:7e7e::100"]


@pytest.mark.parametrize("proto", PROTOS)
@pytest.mark.parametrize("default", ["allow", "deny"])
@pytest.mark.parametrize("addr", SUBNET6_CASES)
def test_ipv6_subnet_refused_even_when_allowed_and_allow_host_is_ipv4_only(addr, default, proto):
    policy = build_policy(None, ["::/0", "fc00::/7", "*.example.test"], [], default)
    for dns_to_stub in (True, False):
        rs = compiled(policy, allow_host=(22, 80), dns_to_stub=dns_to_stub)
        for port in (22, 80, 54):
            assert_refused(rs, Packet(proto, IPv6Address(addr), port), GATEWAY_RULE, policy, (22, 80))
        dns = dns_to_stub or IPv6Address(addr) == NET.dns6
        assert run_decide(rs, Packet(proto, IPv6Address(addr), 53)).verdict == kernel_verdict(
            proto, "accept" if dns else "reject")
        _, decide = chain(rs.script, "decide")
        assert not any("fd00:7e7e::2" in line and "accept" in line for line in decide)


def test_custom_ipv6_subnet_is_used():
    net = SandboxNet(address6=ipaddress.IPv6Interface("2001:db8:7e::10/64"))
    rs = compile_ruleset([], "allow", 1, (), net)
    _, decide = chain(rs.script, "decide")
    for proto in KERNEL:
        assert any(line.startswith(f"meta l4proto {proto} ip6 daddr 2001:db8:7e::/64 log") for line in decide)
        out = run_decide(rs, Packet(proto, IPv6Address("2001:db8:7e::1"), 443))
        assert rs.label_of(out.prefix) == GATEWAY_RULE
    assert not any("fd00:7e7e::/64" in line for line in decide)


# --- domain rules: what the kernel decides and what it leaves to the engine -------------------


def test_domain_rules_are_not_compiled():
    policy = build_policy(None, ["*.example.test", "tcp://=api.example.test:443", "udp://q.example.test",
                                 "203.0.113.0/24"],
                          ["ads.example.test", "198.51.100.7"], "allow")
    rs = compiled(policy)
    _, decide = chain(rs.script, "decide")
    assert not any("example" in line for line in decide)
    assert not any("example" in label for label in rs.labels)
    for proto in KERNEL:
        assert f"meta l4proto {proto} ip daddr 203.0.113.0/24 accept" in decide
        assert any(line.startswith(f"meta l4proto {proto} ip daddr 198.51.100.7/32 log") for line in decide)


CATCH_ALL_CASES = [
    # id, allow rules, deny rules, default, the TCP catch-all match, the UDP one (None: no catch-all)
    ("no-domain-rules", ["203.0.113.0/24"], [], "deny", "meta l4proto tcp", "meta l4proto udp"),
    ("domain-deny-only", [], ["ads.example.test"], "deny", "meta l4proto tcp", "meta l4proto udp"),
    ("domain-allow-any-port", ["*.example.test", "tcp://x.test:443"], [], "deny", None, None),
    ("domain-allow-tcp-any-port", ["tcp://*.example.test"], [], "deny", None, "meta l4proto udp"),
    ("domain-allow-udp-any-port", ["udp://*.example.test"], [], "deny", "meta l4proto tcp", None),
    ("domain-allow-ports", ["tcp://*.example.test:443", "=a.test:80-90", "udp://b.test"], [], "deny",
     "meta l4proto tcp tcp dport != { 80-90, 443 }", None),
    ("domain-allow-ports-per-proto", ["tcp://*.example.test:443", "=a.test:80-90", "udp://b.test:53",
                                      "udp://c.test:5000-5010"], [], "deny",
     "meta l4proto tcp tcp dport != { 80-90, 443 }", "meta l4proto udp udp dport != { 53, 80-90, 5000-5010 }"),
    ("domain-allow-ports-merged", ["x.test:80", "y.test:81-85", "z.test:84-90", "w.test:8080"], [], "deny",
     "meta l4proto tcp tcp dport != { 80-90, 8080 }", "meta l4proto udp udp dport != { 80-90, 8080 }"),
    ("domain-allow-ports-cover-all", ["x.test:1-100", "y.test:101-65535"], [], "deny", None, None),
    ("domain-allow-ports-cover-all-udp", ["udp://x.test:1-100", "y.test:101-65535"], [], "deny",
     "meta l4proto tcp tcp dport != { 101-65535 }", None),
    ("default-allow", ["*.example.test:443"], ["ads.test"], "allow", None, None),
]


@pytest.mark.parametrize("allow,deny,default,tcp_match,udp_match", [c[1:] for c in CATCH_ALL_CASES],
                         ids=[c[0] for c in CATCH_ALL_CASES])
def test_default_catch_all_leaves_domain_allowed_ports_to_the_engine(allow, deny, default, tcp_match, udp_match):
    policy = build_policy(None, allow, deny, default)
    rs = compiled(policy)
    _, parts = blocks(chain(rs.script, "decide")[1])
    for proto, match in (("tcp", tcp_match), ("udp", udp_match)):
        if proto not in KERNEL:
            continue
        lines = parts[proto]
        catch = [line for line in lines if (p := prefix_of(line)) and rs.label_of(p) == "default"]
        if match is None:
            assert catch == []
        else:
            prefix = prefix_of(catch[0]) if catch else None
            assert catch == [f'{match} log group {NFLOG_GROUP} prefix "{prefix}" reject with {REJECT_WITH[proto]}']
            assert lines[-1] == catch[0]


@pytest.mark.parametrize("proto", PROTOS)
def test_catch_all_with_ports_in_the_interpreter(proto):
    policy = build_policy(None, [f"{proto}://*.example.test:443", "=a.test:80-90"], [], "deny")
    rs = compiled(policy)
    other = "udp" if proto == "tcp" else "tcp"
    for port, verdict, verdict_other in [(443, "accept", "reject"), (80, "accept", "accept"),
                                         (85, "accept", "accept"), (90, "accept", "accept"),
                                         (79, "reject", "reject"), (91, "reject", "reject"),
                                         (442, "reject", "reject"), (22, "reject", "reject")]:
        for p, v in ((proto, verdict), (other, verdict_other)):
            pkt = Packet(p, IPv4Address("203.0.113.10"), port)
            if v == "reject":
                assert_refused(rs, pkt, "default", policy)
            else:
                assert run_decide(rs, pkt).verdict == "accept", (p, port)


BUILTINS_DEFAULT_DENY = [("10.1.2.3", "builtin:private"), ("127.0.0.1", "builtin:loopback"),
                         ("169.254.169.254", "builtin:link-local"), ("::1", "builtin:loopback"),
                         ("fd12::1", "builtin:private"), ("192.0.2.55", "builtin:host-address")]


@pytest.mark.parametrize("proto", PROTOS)
@pytest.mark.parametrize("addr,label", BUILTINS_DEFAULT_DENY, ids=[a for a, _ in BUILTINS_DEFAULT_DENY])
def test_builtins_are_rejected_in_the_kernel_under_default_deny_with_domain_allows(addr, label, proto):
    """DNS rebinding: a domain allow must not reach loopback or metadata, so the kernel rejects
    builtin ranges itself - with the label Policy.evaluate gives, names or not - even when the
    domain allow is for the other protocol."""
    hosts = [IPv4Address("192.0.2.55")]
    ip = ipaddress.ip_address(addr)
    for allow in (["*.example.test"], ["tcp://*.example.test"], ["udp://*.example.test"]):
        with_domains = build_policy(None, allow, [], "deny", hosts)
        rs = compiled(with_domains)
        out = run_decide(rs, Packet(proto, ip, 80))
        if proto in KERNEL:
            assert (out.verdict, rs.label_of(out.prefix)) == ("reject", label)
        else:
            assert out.verdict == "accept"
        assert with_domains.evaluate(proto, ip, 80, names=["evil.example.test"]) == Decision("deny", label)
    # without domain allows the builtins are folded into the catch-all: "default", both sides
    ip_only = build_policy(None, ["203.0.113.0/24"], [], "deny", hosts)
    rs = compiled(ip_only)
    out = run_decide(rs, Packet(proto, ip, 80))
    if proto in KERNEL:
        assert (out.verdict, rs.label_of(out.prefix)) == ("reject", "default")
    assert ip_only.evaluate(proto, ip, 80) == Decision("deny", "default")


@pytest.mark.parametrize("proto", PROTOS)
def test_ip_allow_shadowed_by_domain_deny_passes_to_the_engine(proto):
    policy = build_policy(None, ["203.0.113.0/24"], ["ads.example.test"], "deny")
    rs = compiled(policy)
    pkt = Packet(proto, IPv4Address("203.0.113.66"), 443)
    assert run_decide(rs, pkt).verdict == "accept"
    assert reaches_engine(rs, pkt)
    assert policy.evaluate(proto, "203.0.113.66", 443, names=["ads.example.test"]) == Decision(
        "deny", "ads.example.test", "ads.example.test")  # the engine refuses it
    assert policy.evaluate(proto, "203.0.113.66", 443) == Decision("allow", "203.0.113.0/24")


DOMAIN_BASES = ["example.test", "www.example.test", "a.b.example.test", "other.test", "test"]
FRESH = "zz-fresh"  # a label no pattern contains


@st.composite
def domain_rule_texts(draw) -> str:
    scheme = draw(st.sampled_from(["", "", "tcp://", "udp://"]))
    prefix = draw(st.sampled_from(["", "*.", "="]))
    base = draw(st.sampled_from(DOMAIN_BASES))
    port = draw(st.sampled_from(["", "", ":443", ":80", ":80-90", ":1-65535", ":53", f":{draw(ports)}"]))
    return scheme + prefix + base + port


@st.composite
def domain_policies(draw) -> Policy:
    allow = draw(st.lists(st.one_of(rule_texts(), domain_rule_texts()), max_size=5))
    deny = draw(st.lists(st.one_of(rule_texts(), domain_rule_texts()), max_size=5))
    default = draw(st.sampled_from(["allow", "deny"]))
    hosts = draw(st.lists(addresses(), max_size=2))
    return Policy(allow=[parse_rule(t, "allow") for t in allow], deny=[parse_rule(t, "deny") for t in deny],
                  default=default, host_addresses=hosts)


def _candidate_names(policy: Policy) -> list[str]:
    """Enough single names to decide "is there a set of names that allows?": for a pattern P,
    P's name and FRESH.P's name; a deny matching FRESH.name matches every name below it."""
    names = {"unrelated.invalid"}
    for rule in policy.domain_rules():
        names |= {rule.domain.name, f"{FRESH}.{rule.domain.name}"}
    return sorted(names)


def _domain_probe(policy: Policy, draw) -> tuple[IPv4Address | IPv6Address, int]:
    addr, port = _probe(policy, draw)
    bounds = [p for r in policy.domain_rules() if r.ports for lo, hi in [r.ports]
              for p in (lo - 1, lo, hi, hi + 1) if 1 <= p <= 65535]
    if bounds and draw(st.booleans()):
        port = draw(st.sampled_from(bounds))
    return addr, port


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(domain_policies(), st.booleans(), st.data())
def test_kernel_never_contradicts_evaluate_for_any_names(policy, dns_to_stub, data):
    """For TCP and UDP: kernel reject => Policy.evaluate denies whatever names the stub served,
    with the kernel's label unless a domain deny matched.  Kernel pass => some set of names (maybe
    none) makes evaluate allow, or the engine denies because every name a domain allow for that
    protocol and port could match is shadowed by a domain deny (which the compiler does not try to
    prove) - or the protocol is not KERNEL_DECIDED at all.  DNS (port 53) passes: the stub's."""
    rs = compiled(policy, dns_to_stub=dns_to_stub)
    singles = _candidate_names(policy)
    name_sets = [()] + [(n,) for n in singles]
    name_sets.append(tuple(data.draw(st.lists(st.sampled_from(singles), min_size=2, max_size=4))))
    domain_denies = {r.text for r in policy.domain_rules() if r.action == "deny"}
    for _ in range(8):
        addr, port = _domain_probe(policy, data.draw)
        proto = data.draw(st.sampled_from(PROTOS))
        if _special(addr):
            continue
        pkt = Packet(proto, wire(addr), port)
        out = run_decide(rs, pkt)
        if _is_dns(addr, port, dns_to_stub) or proto not in KERNEL:
            assert out == Outcome("accept")
            assert reaches_engine(rs, pkt)
            continue
        decisions = {names: policy.evaluate(proto, addr, port, names=names) for names in name_sets}
        where = (proto, str(addr), port, decisions)
        if out.verdict == "reject":
            label = rs.label_of(out.prefix)
            assert out.reject_with == REJECT_WITH[proto]
            assert all(d.verdict == "deny" for d in decisions.values()), where
            assert decisions[()].rule == label, where
            assert all(d.rule == label for d in decisions.values() if d.rule not in domain_denies), where
        else:
            assert reaches_engine(rs, pkt), where
            if not any(d.verdict == "allow" for d in decisions.values()):
                covering = [r for r in policy.domain_rules() if r.action == "allow" and r.applies(proto, port)]
                assert covering, where
                for rule in covering:
                    for n in singles:
                        if rule.domain.matches(n):
                            d = decisions[(n,)]
                            assert d.verdict == "deny" and d.rule in domain_denies, where


def test_kernel_agreement_examples_with_names():
    """Readable cases of the property above."""
    policy = build_policy(None, ["tcp://*.example.test:443", "udp://*.example.test:443", "203.0.113.0/24:22"],
                          ["ads.example.test", "198.51.100.66"], "deny")
    rs = compiled(policy)
    cases = [
        # proto, addr, port, final verdict, names -> evaluate
        ("tcp", "198.51.100.10", 443, "accept", ["www.example.test"],
         Decision("allow", "tcp://*.example.test:443", "www.example.test")),
        ("udp", "198.51.100.10", 443, "accept", ["www.example.test"],
         Decision("allow", "udp://*.example.test:443", "www.example.test")),
        ("tcp", "198.51.100.10", 443, "accept", ["x.ads.example.test"],
         Decision("deny", "ads.example.test", "x.ads.example.test")),
        ("udp", "198.51.100.10", 443, "accept", [], Decision("deny", "default")),  # engine: never resolved
        ("tcp", "198.51.100.10", 80, "reject", ["www.example.test"], Decision("deny", "default")),
        ("udp", "198.51.100.10", 80, "reject", ["www.example.test"], Decision("deny", "default")),
        ("udp", "198.51.100.66", 443, "reject", ["www.example.test"], Decision("deny", "198.51.100.66")),
        ("tcp", "127.0.0.1", 443, "reject", ["www.example.test"], Decision("deny", "builtin:loopback")),
        ("udp", "169.254.169.254", 443, "reject", ["www.example.test"], Decision("deny", "builtin:link-local")),
        ("tcp", "203.0.113.5", 22, "accept", [], Decision("allow", "203.0.113.0/24:22")),
        ("udp", "203.0.113.5", 22, "accept", ["ads.example.test"],
         Decision("deny", "ads.example.test", "ads.example.test")),
    ]
    for proto, addr, port, kernel, names, expected in cases:
        ip = ipaddress.ip_address(addr)
        out = run_decide(rs, Packet(proto, ip, port))
        assert out.verdict == kernel_verdict(proto, kernel), (proto, addr, port)
        if out.verdict == "reject":
            assert rs.label_of(out.prefix) == expected.rule
            assert out.reject_with == REJECT_WITH[proto]
        assert policy.evaluate(proto, ip, port, names=names) == expected, (proto, addr, port, names)


# --- the real nft parser -----------------------------------------------------------------------

NFT = shutil.which("nft")
needs_nft = pytest.mark.skipif(NFT is None or os.geteuid() != 0,
                               reason="needs nft and root (CAP_NET_ADMIN) for --check")


def _nft_check(script: str, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "ruleset.nft"
    path.write_text(script)
    return subprocess.run([NFT, "--check", "-f", str(path)], check=False, capture_output=True, text=True, timeout=30)


CHECK_CASES = [
    ("default-allow-builtins", [], [], "allow", (), True),
    ("default-deny-empty", [], [], "deny", (), True),
    ("dns-passthrough", [], [], "deny", (), False),
    ("allow-host-ports", ["203.0.113.0/24:80-90"], [], "deny", (22, 8080), True),
    ("v6-and-ranges", ["2001:db8::/32", "[2001:db8::1]:443", "0.0.0.0/0:1-65535", "::/0"],
     ["tcp://198.51.100.7:22", "::ffff:192.0.2.9"], "allow", (443,), True),
    ("udp-only-rules", ["udp://9.9.9.9:53"], ["udp://0.0.0.0/0"], "deny", (), False),
    ("udp-and-tcp-rules", ["udp://[2001:db8::1]:443", "tcp://203.0.113.0/24:80-90"], ["udp://198.51.100.0/24"],
     "deny", (53,), True),
    ("domain-allow-ports", ["tcp://*.example.test:443", "=a.test:80-90", "203.0.113.0/24"],
     ["ads.example.test"], "deny", (22,), True),
    ("domain-allow-udp-ports", ["udp://*.example.test:443", "udp://b.test:5000-5010"], [], "deny", (), True),
    ("domain-allow-one-port", ["tcp://*.example.test:443"], [], "deny", (), True),
    ("domain-allow-any-port", ["*.example.test"], ["tcp://ads.example.test:443"], "deny", (), True),
    ("domain-default-allow", ["*.example.test"], ["ads.example.test"], "allow", (), False),
]


@needs_nft
@pytest.mark.parametrize("allow,deny,default,allow_host,dns_to_stub", [c[1:] for c in CHECK_CASES],
                         ids=[c[0] for c in CHECK_CASES])
def test_nft_accepts_the_script(allow, deny, default, allow_host, dns_to_stub, tmp_path):
    rs = compiled(build_policy(None, allow, deny, default, [IPv4Address("192.0.2.1")]), allow_host=allow_host,
                  dns_to_stub=dns_to_stub)
    result = _nft_check(rs.script, tmp_path)
    assert result.returncode == 0, result.stderr


@needs_nft
@settings(max_examples=25, deadline=None)
@given(st.one_of(policies(), domain_policies()), st.lists(ports, max_size=3), ports, st.booleans())
def test_nft_accepts_random_policies(policy, allow_host, capture_port, dns_to_stub):
    import pathlib
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        rs = compile_ruleset(policy.ordered_rules(), policy.default, capture_port, allow_host,
                             dns_to_stub=dns_to_stub)
        result = _nft_check(rs.script, pathlib.Path(tmp))
    assert result.returncode == 0, (result.stderr, rs.script)
