"""Unit tests for tether.policy: rule grammar, evaluation order, builtin profile, policy files.

The evaluator is pure, so the properties are checked directly with hypothesis: rules are generated
as (network, ports, proto), formatted as the user would type them, and parsed back.
"""

from __future__ import annotations

import pickle
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tether.policy import (
    BUILTIN_RANGES,
    Decision,
    Policy,
    PolicyFileError,
    PolicySpec,
    Rule,
    RuleError,
    build_policy,
    builtin_denies,
    load_policy_file,
    parse_rule,
)

MAPPED = IPv6Network("::ffff:0:0/96")
DOC_RANGES = ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"]


# --- parser: every grammar form -------------------------------------------------------------

GOOD = [
    # text, network, ports, proto
    ("203.0.113.7", "203.0.113.7/32", None, None),
    ("203.0.113.0/24", "203.0.113.0/24", None, None),
    ("0.0.0.0/0", "0.0.0.0/0", None, None),
    ("203.0.113.7:5432", "203.0.113.7/32", (5432, 5432), None),
    ("203.0.113.0/24:80-90", "203.0.113.0/24", (80, 90), None),
    ("203.0.113.0/24:1-65535", "203.0.113.0/24", (1, 65535), None),
    ("tcp://203.0.113.7", "203.0.113.7/32", None, "tcp"),
    ("udp://198.51.100.0/24:53", "198.51.100.0/24", (53, 53), "udp"),
    ("tcp://192.0.2.1:443", "192.0.2.1/32", (443, 443), "tcp"),
    ("2001:db8::1", "2001:db8::1/128", None, None),
    ("2001:db8::/32", "2001:db8::/32", None, None),
    ("::/0", "::/0", None, None),
    ("::", "::/128", None, None),
    ("[2001:db8::1]", "2001:db8::1/128", None, None),
    ("[2001:db8::1]:443", "2001:db8::1/128", (443, 443), None),
    ("[2001:db8::/32]:80-90", "2001:db8::/32", (80, 90), None),
    ("udp://[2001:db8::53]:53", "2001:db8::53/128", (53, 53), "udp"),
    ("tcp://2001:db8::/48", "2001:db8::/48", None, "tcp"),
    ("  203.0.113.7:80  ", "203.0.113.7/32", (80, 80), None),
    ("\t[::1]:8080\n", "::1/128", (8080, 8080), None),
    # IPv4-mapped IPv6 rules are stored as the IPv4 network they denote
    ("::ffff:203.0.113.7", "203.0.113.7/32", None, None),
    ("[::ffff:10.0.0.0/104]:22", "10.0.0.0/8", (22, 22), None),
]


@pytest.mark.parametrize("text,network,ports,proto", GOOD, ids=[g[0].strip() for g in GOOD])
@pytest.mark.parametrize("action", ["allow", "deny"])
def test_parse_accepts_grammar(text, network, ports, proto, action):
    rule = parse_rule(text, action)
    assert rule == Rule(text=text.strip(), action=action, network=ip_network(network), ports=ports, proto=proto)


BAD = [
    # text, fragment of the reason
    ("", "empty rule"),
    ("   ", "empty rule"),
    ("203.0.113.0 /24", "whitespace inside rule"),
    ("tcp:// 203.0.113.7", "whitespace inside rule"),
    ("http://203.0.113.7", "unknown scheme 'http://'"),
    ("sctp://203.0.113.7:80", "unknown scheme 'sctp://'"),
    ("tcp://tcp://203.0.113.7", "unexpected '://'"),
    ("tcp://", "missing address"),
    (":80", "missing address"),
    ("[]:80", "missing address"),
    ("example.com", "domain rules are not supported yet (IP/CIDR only)"),
    ("*.example.com", "domain rules are not supported yet (IP/CIDR only)"),
    ("tcp://example.com:443", "domain rules are not supported yet (IP/CIDR only)"),
    ("localhost", "domain rules are not supported yet (IP/CIDR only)"),
    ("203.0.113.7:", "missing port after ':'"),
    ("[2001:db8::1]:", "missing port after ':'"),
    ("203.0.113.7:0", "port 0 is out of range (1-65535)"),
    ("203.0.113.7:65536", "port 65536 is out of range (1-65535)"),
    ("203.0.113.7:0-80", "port 0 is out of range (1-65535)"),
    ("203.0.113.7:99999999999999999999", "port 99999999999999999999 is out of range"),
    ("203.0.113.7:90-80", "port range 90-80 is reversed"),
    ("203.0.113.7:http", "bad port 'http'"),
    ("203.0.113.7:80-", "bad port '80-'"),
    ("203.0.113.7:-80", "bad port '-80'"),
    ("203.0.113.7:80:90", "is not an IP address or CIDR"),
    ("10.0.0.0/33", "prefix length 33 is out of range for IPv4 (0-32)"),
    ("2001:db8::/129", "prefix length 129 is out of range for IPv6 (0-128)"),
    ("10.0.0.0/x", "prefix length 'x' is not a number"),
    ("10.0.0.0/", "prefix length '' is not a number"),
    ("10.0.0.0/-1", "prefix length '-1' is not a number"),
    ("10.0.0.1/8", "host bits set; did you mean 10.0.0.0/8?"),
    ("2001:db8::1/32", "host bits set; did you mean 2001:db8::/32?"),
    ("[203.0.113.7]:80", "brackets are only for IPv6"),
    ("[2001:db8::1", "missing ']'"),
    ("[2001:db8::1]443", "unexpected '443' after ']'"),
    ("2001:db8::/32:80", "must be in brackets: '[2001:db8::/32]:80'"),
    ("fe80::1%eth0", "zone index"),
    ("256.0.0.1", "is not an IP address or CIDR"),
    ("10.0.0", "is not an IP address or CIDR"),
    ("garbage!", "is not an IP address or CIDR"),
    ("2001:db8::g1", "is not an IP address or CIDR"),
    ("2001:db8:::443", "must be in brackets: '[2001:db8::]:443'"),
]


@pytest.mark.parametrize("text,reason", BAD, ids=[repr(b[0]) for b in BAD])
def test_parse_rejects_with_message_naming_rule_and_problem(text, reason):
    with pytest.raises(RuleError) as info:
        parse_rule(text, "deny")
    err = info.value
    assert err.rule == text.strip()
    assert reason in err.reason
    assert str(err) == f"bad rule '{text.strip()}': {err.reason}"
    assert isinstance(err, ValueError)


def test_rule_error_example_from_interface():
    with pytest.raises(RuleError) as info:
        parse_rule("10.0.0.0/33", "allow")
    assert str(info.value) == "bad rule '10.0.0.0/33': prefix length 33 is out of range for IPv4 (0-32)"


def test_rule_error_pickles():
    err = RuleError("x", "why")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.rule, copy.reason, str(copy)) == ("x", "why", str(err))


def test_parse_rejects_bad_action():
    with pytest.raises(ValueError):
        parse_rule("203.0.113.7", "maybe")  # type: ignore[arg-type]


# --- parser: round trip ---------------------------------------------------------------------


@st.composite
def networks(draw) -> IPv4Network | IPv6Network:
    v6 = draw(st.booleans())
    addr = draw(st.ip_addresses(v=6 if v6 else 4))
    plen = draw(st.integers(0, addr.max_prefixlen))
    net = ip_network((addr, plen), strict=False)
    assume(not (isinstance(net, IPv6Network) and plen >= 96 and net.subnet_of(MAPPED)))
    return net


port_ranges = st.none() | st.tuples(st.integers(1, 65535), st.integers(1, 65535)).map(lambda t: tuple(sorted(t)))
protos = st.sampled_from([None, "tcp", "udp"])


def format_rule(net, ports, proto, *, bare: bool, brackets: bool) -> str:
    """Write a rule the way a user might: bare address for host routes, brackets optional."""
    host = str(net.network_address) if bare and net.prefixlen == net.max_prefixlen else str(net)
    if net.version == 6 and (ports is not None or brackets):
        host = f"[{host}]"
    if ports is not None:
        host += f":{ports[0]}" if ports[0] == ports[1] else f":{ports[0]}-{ports[1]}"
    return (f"{proto}://" if proto else "") + host


@given(networks(), port_ranges, protos, st.booleans(), st.booleans(), st.sampled_from(["", " ", "\t\n"]),
       st.sampled_from(["allow", "deny"]))
def test_round_trip(net, ports, proto, bare, brackets, pad, action):
    text = format_rule(net, ports, proto, bare=bare, brackets=brackets)
    rule = parse_rule(pad + text + pad, action)
    assert rule == Rule(text=text, action=action, network=net, ports=ports, proto=proto)


@given(st.ip_addresses(v=4), st.integers(0, 32))
def test_mapped_rule_equals_v4_rule(addr, plen):
    net = ip_network((addr, plen), strict=False)
    mapped = f"::ffff:{net.network_address}/{96 + plen}"
    assert parse_rule(mapped, "deny").network == net


# --- evaluator --------------------------------------------------------------------------------

rules_st = st.tuples(networks(), port_ranges, protos).map(
    lambda t: format_rule(*t, bare=False, brackets=False)
)


def addr_in(net, offset: int):
    return net.network_address + (offset % net.num_addresses)


@st.composite
def probes(draw, rules: list[Rule]):
    """A (proto, addr, port) that is often inside one of the rules, so matches actually happen."""
    proto = draw(st.sampled_from(["tcp", "udp"]))
    if rules and draw(st.booleans()):
        r = draw(st.sampled_from(rules))
        addr = addr_in(r.network, draw(st.integers(0, 2**128)))
        port = draw(st.integers(*r.ports)) if r.ports else draw(st.integers(1, 65535))
    else:
        addr = draw(st.ip_addresses())
        port = draw(st.integers(1, 65535))
    return proto, addr, port


@given(st.lists(rules_st, max_size=6), st.lists(rules_st, max_size=6), st.sampled_from(["allow", "deny"]),
       st.lists(st.ip_addresses(), max_size=3), st.data())
def test_evaluate_is_first_match_of_ordered_rules(allow, deny, default, hosts, data):
    policy = Policy([parse_rule(t, "allow") for t in allow], [parse_rule(t, "deny") for t in deny], default, hosts)
    ordered = policy.ordered_rules()
    proto, addr, port = data.draw(probes(ordered))
    first = next((r for r in ordered if r.matches(proto, addr, port)), None)
    expected = Decision(first.action, first.text) if first else Decision(default, "default")
    assert policy.evaluate(proto, addr, port) == expected
    assert policy.evaluate(proto, str(addr), port) == expected


@given(st.lists(rules_st, max_size=5), st.lists(rules_st, max_size=5), st.sampled_from(["allow", "deny"]),
       st.data())
def test_ordered_rules_layout(allow, deny, default, data):
    a = [parse_rule(t, "allow") for t in allow]
    d = [parse_rule(t, "deny") for t in deny]
    hosts = [IPv4Address("198.51.100.9")]
    ordered = Policy(a, d, default, hosts).ordered_rules()
    builtins = builtin_denies(hosts) if default == "allow" else []
    assert ordered == d + a + builtins


@given(rules_st, st.lists(rules_st, max_size=4), st.lists(rules_st, max_size=4), st.randoms(),
       st.sampled_from(["allow", "deny"]), st.data())
def test_deny_beats_allow_whatever_the_order(text, allow, deny, rnd, default, data):
    allow = allow + [text]
    deny = deny + [text]
    rnd.shuffle(allow)
    rnd.shuffle(deny)
    policy = Policy([parse_rule(t, "allow") for t in allow], [parse_rule(t, "deny") for t in deny], default)
    rule = parse_rule(text, "deny")
    addr = addr_in(rule.network, data.draw(st.integers(0, 2**128)))
    assume(not (addr.version == 6 and addr.ipv4_mapped))  # mapped addresses are IPv4: ::/0 does not cover them
    port = data.draw(st.integers(*rule.ports)) if rule.ports else data.draw(st.integers(1, 65535))
    proto = rule.proto or data.draw(st.sampled_from(["tcp", "udp"]))
    decision = policy.evaluate(proto, addr, port)
    assert decision.verdict == "deny"
    assert decision.rule in deny


@given(st.ip_addresses(), st.sampled_from(["tcp", "udp"]), st.integers(1, 65535))
def test_default_deny_applies_when_nothing_matches(addr, proto, port):
    assert Policy(default="deny").evaluate(proto, addr, port) == Decision("deny", "default")
    assert Policy(default="deny").ordered_rules() == []


@given(st.sampled_from(DOC_RANGES), st.integers(0, 2**128), st.sampled_from(["tcp", "udp"]),
       st.integers(1, 65535))
def test_documentation_ranges_are_public(cidr, offset, proto, port):
    addr = addr_in(ip_network(cidr), offset)
    assert Policy().evaluate(proto, addr, port) == Decision("allow", "default")
    assert Policy().evaluate(proto, f"::ffff:{addr}" if addr.version == 4 else addr, port).verdict == "allow"


BUILTIN_CASES = [(label, cidr) for label, cidrs in BUILTIN_RANGES for cidr in cidrs]


@pytest.mark.parametrize("label,cidr", BUILTIN_CASES, ids=[f"{l}-{c}" for l, c in BUILTIN_CASES])
@given(offset=st.integers(0, 2**128), proto=st.sampled_from(["tcp", "udp"]), port=st.integers(1, 65535))
@settings(max_examples=30)
def test_builtin_denied_under_default_allow_and_overridable(label, cidr, offset, proto, port):
    net = ip_network(cidr)
    addr = addr_in(net, offset)
    assert Policy().evaluate(proto, addr, port) == Decision("deny", label)
    # an explicit allow for the whole range, or just this address and port, pierces the profile
    assert Policy(allow=[parse_rule(cidr, "allow")]).evaluate(proto, addr, port) == Decision("allow", cidr)
    one = format_rule(ip_network(addr), (port, port), proto, bare=True, brackets=False)
    pierced = Policy(allow=[parse_rule(one, "allow")])
    assert pierced.evaluate(proto, addr, port) == Decision("allow", one)
    other_port = port % 65535 + 1
    assert pierced.evaluate(proto, addr, other_port) == Decision("deny", label)
    # under default deny the builtins are not in play at all: the default decides
    assert Policy(default="deny").evaluate(proto, addr, port) == Decision("deny", "default")


def test_builtin_examples():
    p = Policy()
    assert p.evaluate("tcp", "169.254.169.254", 80) == Decision("deny", "builtin:link-local")
    assert p.evaluate("tcp", "127.0.0.1", 8080) == Decision("deny", "builtin:loopback")
    assert p.evaluate("udp", "::1", 53) == Decision("deny", "builtin:loopback")
    assert p.evaluate("tcp", "172.31.255.255", 1) == Decision("deny", "builtin:private")
    assert p.evaluate("tcp", "172.32.0.0", 1) == Decision("allow", "default")
    assert p.evaluate("tcp", "100.127.255.255", 1) == Decision("deny", "builtin:cgnat")
    assert p.evaluate("tcp", "100.128.0.0", 1) == Decision("allow", "default")
    assert p.evaluate("udp", "239.255.255.250", 1900) == Decision("deny", "builtin:multicast")
    assert p.evaluate("tcp", "0.0.0.0", 80) == Decision("deny", "builtin:unspecified")
    assert p.evaluate("tcp", "0.0.0.1", 80) == Decision("allow", "default")  # the list is exhaustive
    assert p.evaluate("tcp", "fd12::1", 80) == Decision("deny", "builtin:private")
    assert p.evaluate("tcp", "8.8.8.8", 443) == Decision("allow", "default")


def test_loopback_allow_overrides_only_that_port():
    p = Policy(allow=[parse_rule("127.0.0.1:8080", "allow")])
    assert p.evaluate("tcp", "127.0.0.1", 8080) == Decision("allow", "127.0.0.1:8080")
    assert p.evaluate("udp", "127.0.0.1", 8080) == Decision("allow", "127.0.0.1:8080")
    assert p.evaluate("tcp", "127.0.0.1", 8081) == Decision("deny", "builtin:loopback")
    assert p.evaluate("tcp", "127.0.0.2", 8080) == Decision("deny", "builtin:loopback")


def test_host_addresses_denied_and_overridable():
    hosts = [IPv4Address("203.0.113.5"), IPv6Address("2001:db8::5"), IPv6Address("::ffff:198.51.100.5")]
    p = Policy(host_addresses=hosts)
    for h in ("203.0.113.5", "2001:db8::5", "198.51.100.5", "::ffff:203.0.113.5"):
        assert p.evaluate("tcp", h, 22) == Decision("deny", "builtin:host-address")
    assert p.evaluate("tcp", "203.0.113.6", 22) == Decision("allow", "default")
    allowed = Policy(allow=[parse_rule("tcp://203.0.113.5:22", "allow")], host_addresses=hosts)
    assert allowed.evaluate("tcp", "203.0.113.5", 22) == Decision("allow", "tcp://203.0.113.5:22")
    assert allowed.evaluate("udp", "203.0.113.5", 22) == Decision("deny", "builtin:host-address")
    host_rules = [r for r in builtin_denies(hosts) if r.text == "builtin:host-address"]
    assert [r.network for r in host_rules] == [
        ip_network("203.0.113.5/32"), ip_network("2001:db8::5/128"), ip_network("198.51.100.5/32")]


@given(st.ip_addresses(v=4), st.sampled_from(["tcp", "udp"]), st.integers(1, 65535))
def test_mapped_v4_evaluates_as_v4(v4, proto, port):
    mapped = IPv6Address(f"::ffff:{v4}")
    policy = Policy(allow=[parse_rule("198.51.100.0/24", "allow")], deny=[parse_rule("tcp://192.0.2.0/24", "deny")],
                    host_addresses=[IPv4Address("203.0.113.1")])
    assert policy.evaluate(proto, mapped, port) == policy.evaluate(proto, v4, port)
    assert policy.evaluate(proto, str(mapped), port) == policy.evaluate(proto, v4, port)


def test_mapped_examples():
    p = Policy(deny=[parse_rule("203.0.113.0/24", "deny")])
    assert p.evaluate("tcp", "::ffff:203.0.113.9", 443) == Decision("deny", "203.0.113.0/24")
    assert p.evaluate("tcp", "::ffff:127.0.0.1", 80) == Decision("deny", "builtin:loopback")
    assert p.evaluate("tcp", "::ffff:169.254.169.254", 80) == Decision("deny", "builtin:link-local")
    # a rule spelled in mapped form applies to the v4 destination
    q = Policy(allow=[parse_rule("::ffff:127.0.0.1", "allow")])
    assert q.evaluate("tcp", "127.0.0.1", 80) == Decision("allow", "::ffff:127.0.0.1")


def test_rule_matches_proto_port_and_family():
    r = parse_rule("tcp://203.0.113.0/24:80-90", "allow")
    assert r.matches("tcp", IPv4Address("203.0.113.200"), 80)
    assert r.matches("tcp", IPv4Address("203.0.113.200"), 90)
    assert not r.matches("tcp", IPv4Address("203.0.113.200"), 91)
    assert not r.matches("tcp", IPv4Address("203.0.113.200"), 79)
    assert not r.matches("udp", IPv4Address("203.0.113.200"), 80)
    assert not r.matches("tcp", IPv4Address("203.0.114.0"), 80)
    assert not r.matches("tcp", IPv6Address("2001:db8::1"), 80)
    assert r.matches("tcp", IPv6Address("::ffff:203.0.113.1"), 85)
    any_v6 = parse_rule("::/0", "deny")
    assert not any_v6.matches("tcp", IPv4Address("203.0.113.1"), 1)
    assert not any_v6.matches("tcp", IPv6Address("::ffff:203.0.113.1"), 1)  # mapped means IPv4


def test_policy_rejects_misfiled_rules_and_bad_default():
    with pytest.raises(ValueError, match="given as allow"):
        Policy(allow=[parse_rule("203.0.113.1", "deny")])
    with pytest.raises(ValueError, match="given as deny"):
        Policy(deny=[parse_rule("203.0.113.1", "allow")])
    with pytest.raises(ValueError, match="default"):
        Policy(default="maybe")  # type: ignore[arg-type]


def test_evaluate_rejects_bad_proto_and_address():
    with pytest.raises(ValueError, match="proto"):
        Policy().evaluate("icmp", "203.0.113.1", 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Policy().evaluate("tcp", "example.com", 80)


# --- policy files -------------------------------------------------------------------------------


def write(tmp_path, content: str | bytes):
    path = tmp_path / "policy.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def test_load_good_file(tmp_path):
    path = write(tmp_path, 'default = "deny"\nallow = ["203.0.113.0/24", "tcp://[2001:db8::1]:443"]\n'
                           'deny = ["203.0.113.7"]\n')
    assert load_policy_file(path) == PolicySpec(
        default="deny", allow=("203.0.113.0/24", "tcp://[2001:db8::1]:443"), deny=("203.0.113.7",))
    assert load_policy_file(str(path)) == load_policy_file(path)


def test_load_empty_file(tmp_path):
    assert load_policy_file(write(tmp_path, "")) == PolicySpec(default=None, allow=(), deny=())


FILE_ERRORS = [
    ("unknown-key", 'default = "allow"\nallowed = ["203.0.113.1"]\n', ["unknown key 'allowed'"]),
    ("bad-default-value", 'default = "block"\n', ["key 'default'", "'block'", '"allow" or "deny"']),
    ("non-string-default", "default = true\n", ["key 'default'"]),
    ("bad-rule-at-index-2", 'deny = ["203.0.113.1", "198.51.100.0/24", "10.0.0.1/8"]\n',
     ["deny[2]", "bad rule '10.0.0.1/8': host bits set; did you mean 10.0.0.0/8?"]),
    ("domain-rule-at-index-0", 'allow = ["example.com"]\n',
     ["allow[0]", "domain rules are not supported yet"]),
    ("toml-syntax-error-line-2", 'default = "allow"\nallow = [203.0.113.1]\ndeny = []\n',
     ["TOML syntax error", "line 2"]),
    ("toml-unterminated-after-line-3", 'default = "allow"\nallow = []\ndeny = [\n\n',
     ["TOML syntax error", "end of document, after line 3"]),
    ("toml-duplicate-key-line-2", 'default = "allow"\ndefault = "deny"\n', ["TOML syntax error", "line 2"]),
    ("not-utf8", b'allow = ["\xff"]\n', ["not UTF-8"]),
    ("non-list-allow", 'allow = "203.0.113.1"\n', ["key 'allow'", "must be a list", "str"]),
    ("table-deny", '[deny]\nx = 1\n', ["key 'deny'", "must be a list", "dict"]),
    ("non-string-item", 'allow = ["203.0.113.1", 42]\n', ["allow[1]", "must be a string", "int"]),
]


@pytest.mark.parametrize("content,fragments", [c[1:] for c in FILE_ERRORS], ids=[c[0] for c in FILE_ERRORS])
def test_load_bad_file(tmp_path, content, fragments):
    path = write(tmp_path, content)
    with pytest.raises(PolicyFileError) as info:
        load_policy_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(PolicyFileError, match="cannot read"):
        load_policy_file(path)


def test_build_policy_merges_file_and_cli():
    spec = PolicySpec(default="deny", allow=("203.0.113.0/24",), deny=("203.0.113.7",))
    p = build_policy(spec, ["tcp://198.51.100.1:443"], ["203.0.113.8"], None)
    assert p.default == "deny"
    assert [r.text for r in p.ordered_rules()] == ["203.0.113.7", "203.0.113.8", "203.0.113.0/24",
                                                   "tcp://198.51.100.1:443"]
    assert p.evaluate("tcp", "203.0.113.7", 1) == Decision("deny", "203.0.113.7")
    assert p.evaluate("tcp", "203.0.113.9", 1) == Decision("allow", "203.0.113.0/24")
    assert p.evaluate("tcp", "198.51.100.1", 443) == Decision("allow", "tcp://198.51.100.1:443")
    assert p.evaluate("tcp", "198.51.100.2", 443) == Decision("deny", "default")


def test_build_policy_defaults():
    assert build_policy(PolicySpec("deny", (), ()), [], [], "allow").default == "allow"  # CLI overrides
    assert build_policy(PolicySpec(None, (), ()), [], [], None).default == "allow"
    assert build_policy(None, [], [], None).default == "allow"
    assert build_policy(None, [], [], "deny").default == "deny"
    hosts = [IPv4Address("198.51.100.77")]
    assert build_policy(None, [], [], None, hosts).evaluate("tcp", "198.51.100.77", 1) == Decision(
        "deny", "builtin:host-address")


def test_build_policy_raises_rule_error_for_bad_cli_rule():
    with pytest.raises(RuleError, match="bad rule 'http://x'"):
        build_policy(None, ["http://x"], [], None)
    with pytest.raises(RuleError, match="port 0"):
        build_policy(None, [], ["203.0.113.1:0"], None)
