"""Unit tests for tether.policy: rule grammar, evaluation order, builtin profile, policy files,
domain rules (grammar, matching, evaluation with the names the DNS stub served, evaluate_name).

The evaluator is pure, so the properties are checked directly with hypothesis: rules are generated
as (network, ports, proto) or (scheme, pattern, port), formatted as the user would type them, and
parsed back; evaluation is checked against "first match over ordered_rules()".
"""

from __future__ import annotations

import pickle
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tether.names import normalize_name
from tether.policy import (
    BUILTIN_RANGES,
    IP_ALLOW_RULES,
    Decision,
    DomainPattern,
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
        Policy().evaluate("sctp", "203.0.113.1", 0)  # type: ignore[arg-type]
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
    ("bad-domain-rule-at-index-1", 'allow = ["example.test", "*.b\u00fccher.test"]\n',
     ["allow[1]", "bad rule '*.b\u00fccher.test': non-ASCII name", "'*.xn--bcher-kva.test'"]),
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


# === domain rules ===================================================================================
NAME_253 = ".".join(["a" * 63] * 3 + ["b" * 61])
assert len(NAME_253) == 253


def short_id(text: str) -> str:
    return repr(text) if len(text) <= 40 else f"<{len(text)} characters>"


DOMAIN_GOOD = [
    # text, pattern name, kind, ports, proto
    ("example.test", "example.test", "suffix", None, None),
    ("*.example.test", "example.test", "subdomains", None, None),
    ("=example.test", "example.test", "exact", None, None),
    ("tcp://*.example.test:443", "example.test", "subdomains", (443, 443), "tcp"),
    ("udp://=ns.example.test:53", "ns.example.test", "exact", (53, 53), "udp"),
    ("example.test:8000-8100", "example.test", "suffix", (8000, 8100), None),
    ("TCP://WWW.Example.TEST:80", "www.example.test", "suffix", (80, 80), "tcp"),
    ("example.test.", "example.test", "suffix", None, None),
    ("*.example.test.:443", "example.test", "subdomains", (443, 443), None),
    ("localhost", "localhost", "suffix", None, None),
    ("test", "test", "suffix", None, None),
    ("*.test", "test", "subdomains", None, None),
    ("_dmarc.example.test", "_dmarc.example.test", "suffix", None, None),
    ("a-b_c.x1.example-1.test", "a-b_c.x1.example-1.test", "suffix", None, None),
    ("xn--bcher-kva.test", "xn--bcher-kva.test", "suffix", None, None),
    ("1.2.3.4a", "1.2.3.4a", "suffix", None, None),  # last label has a letter: a name
    ("a" * 63 + ".test", "a" * 63 + ".test", "suffix", None, None),
    (NAME_253, NAME_253, "suffix", None, None),
    (NAME_253 + ".", NAME_253, "suffix", None, None),  # the final dot does not count
]


@pytest.mark.parametrize("text,name,kind,ports,proto", DOMAIN_GOOD, ids=[short_id(g[0]) for g in DOMAIN_GOOD])
@pytest.mark.parametrize("action", ["allow", "deny"])
def test_parse_accepts_domain_grammar(text, name, kind, ports, proto, action):
    rule = parse_rule(text, action)
    assert rule == Rule(text=text, action=action, network=None, ports=ports, proto=proto,
                        domain=DomainPattern(name, kind))
    assert rule.network is None


DOMAIN_BAD = [
    # text, fragment of the reason
    ("b\u00fccher.test", ("non-ASCII name: write internationalised names in their IDNA (punycode) form, "
                          "e.g. 'xn--bcher-kva.test'")),
    ("*.b\u00fccher.test", "e.g. '*.xn--bcher-kva.test'"),
    ("ex\u212aample.test", "non-ASCII name"),  # KELVIN SIGN: must not silently become 'k'
    ("\u0440\u0443.test", "non-ASCII name"),
    ("*", "'*' must be a whole first label"),
    ("**.example.test", "'*' must be a whole first label"),
    ("*example.test", "'*' must be a whole first label"),
    ("*.", "missing name after '*.'"),
    ("=", "missing name after '='"),
    ("tcp://=:443", "missing name after '='"),
    ("a.*.example.test", "'*' is allowed only as the whole first label"),
    ("=*.example.test", "'*' is allowed only as the whole first label"),
    ("*.=example.test", "'=' is allowed only at the start"),
    ("ex=ample.test", "'=' is allowed only at the start"),
    (".example.test", "a name cannot start with '.' (for the names below it write '*.example.test')"),
    ("example..test", "empty label ('..')"),
    ("example.test..", "empty label ('..')"),
    ("*..example.test", "a name cannot start with '.'"),
    ("a" * 64 + ".test", "is 64 characters long (at most 63)"),
    (NAME_253 + "a", "name is 254 characters long (at most 253)"),
    ("example.123", "the last label '123' has no letter"),
    ("10.0.0.1-5", "'10.0.0.1-5' is not an IP address or CIDR"),
    ("ex!ample.test", "character '!' is not allowed in names"),
    ("example.test!", "character '!' is not allowed in names"),
    ("example.test/24", "a prefix length ('/24') is for IP addresses, not names"),
    ("[example.test]:443", "brackets are only for IPv6 addresses"),
    ("example.test:", "missing port after ':'"),
    ("example.test:0", "port 0 is out of range"),
    ("example.test:http", "bad port 'http'"),
    ("example.test:80:90", "bad port '80:90'"),
    ("*.example.test:90-80", "port range 90-80 is reversed"),
    ("http://example.test", "unknown scheme 'http://'"),
    ("tcp://tcp://example.test", "unexpected '://'"),
    ("cafe:80:90", "'cafe:80:90' is not an IP address or CIDR"),  # a mistyped IPv6 address, not a name
]


@pytest.mark.parametrize("text,reason", DOMAIN_BAD, ids=[short_id(b[0]) for b in DOMAIN_BAD])
def test_parse_rejects_bad_domain_rules(text, reason):
    with pytest.raises(RuleError) as info:
        parse_rule(text, "allow")
    assert info.value.rule == text
    assert reason in info.value.reason, info.value.reason
    assert str(info.value).startswith(f"bad rule '{text}': ")


def test_domain_pattern_parse_and_str():
    for text, shown in [("Example.TEST.", "example.test"), ("*.a.Test", "*.a.test"), ("=A.test", "=a.test")]:
        pattern = DomainPattern.parse(text)
        assert str(pattern) == shown
        assert DomainPattern.parse(shown) == pattern
    with pytest.raises(ValueError, match="non-ASCII"):
        DomainPattern.parse("\u00e9.test")
    with pytest.raises(ValueError, match="kind"):
        DomainPattern("example.test", "prefix")  # type: ignore[arg-type]


def test_rule_needs_exactly_one_of_network_and_domain():
    with pytest.raises(ValueError, match="exactly one"):
        Rule("x", "allow", None, None, None)
    with pytest.raises(ValueError, match="exactly one"):
        Rule("x", "allow", ip_network("203.0.113.0/24"), None, None, DomainPattern("x.test"))


MATCH_CASES = [
    # pattern, name, matches
    ("example.test", "example.test", True),
    ("example.test", "www.example.test", True),
    ("example.test", "a.b.c.example.test", True),
    ("example.test", "notexample.test", False),  # a suffix of labels, not of characters
    ("example.test", "example.test.evil", False),
    ("example.test", "test", False),
    ("*.example.test", "example.test", False),  # the apex is not a subdomain
    ("*.example.test", "www.example.test", True),
    ("*.example.test", "a.b.example.test", True),
    ("*.example.test", "wwwexample.test", False),
    ("*.example.test", ".example.test", False),  # an empty label is not a subdomain
    ("=example.test", "example.test", True),
    ("=example.test", "www.example.test", False),
    ("example.test", "WWW.EXAMPLE.TEST", True),
    ("example.test", "Example.Test.", True),
    ("=example.test", "EXAMPLE.test.", True),
    ("*.example.test", "WWW.example.test.", True),
    ("example.test", "example.test..", False),  # only one final dot is ignored
    ("example.test", "ex\u212aample.test", False),  # KELVIN SIGN is not 'k'
    ("example.test", "\u00e9.example.test", True),  # a served name below example.test is below it
    ("example.test", "", False),
    ("example.test", ".", False),
]


@pytest.mark.parametrize("pattern,name,expected", MATCH_CASES, ids=[f"{p}~{n!r}" for p, n, _ in MATCH_CASES])
def test_domain_matching(pattern, name, expected):
    assert DomainPattern.parse(pattern).matches(name) is expected
    rule = parse_rule(pattern, "allow")
    assert rule.matches("tcp", IPv4Address("203.0.113.1"), 80, [name]) is expected
    assert rule.matching_name(["nomatch.invalid", name]) == (normalize_name(name) if expected else None)


labels_st = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1,
                    max_size=12)
names_st = st.lists(labels_st, min_size=1, max_size=4).map(".".join).filter(
    lambda n: any(c.isalpha() for c in n.rsplit(".", 1)[-1]))


@given(names_st, st.sampled_from(["", "*.", "="]), port_ranges, protos, st.booleans(),
       st.sampled_from(["allow", "deny"]))
def test_domain_round_trip(name, prefix, ports, proto, final_dot, action):
    text = (f"{proto}://" if proto else "") + prefix + name + ("." if final_dot else "")
    if ports is not None:
        text += f":{ports[0]}" if ports[0] == ports[1] else f":{ports[0]}-{ports[1]}"
    rule = parse_rule(text, action)
    kind = {"": "suffix", "*.": "subdomains", "=": "exact"}[prefix]
    assert rule == Rule(text, action, None, ports, proto, DomainPattern(name.lower(), kind))
    assert parse_rule(str(rule.domain), action).domain == rule.domain


@given(names_st, names_st, st.sampled_from(["", "*.", "="]))
def test_domain_matching_property(base, sub, prefix):
    """suffix = exact OR subdomains; subdomains = ends with '.' + base; names compare case-blind."""
    pattern = DomainPattern.parse(prefix + base)
    for candidate in (base, f"{sub}.{base}", sub, base.upper() + ".", f"{sub}{base}"):
        n = candidate.lower().removesuffix(".")
        exact = n == base.lower()
        below = n.endswith("." + base.lower())
        expected = {"": exact or below, "*.": below, "=": exact}[prefix]
        assert pattern.matches(candidate) is expected, candidate


# --- evaluate with names --------------------------------------------------------------------------

PUBLIC = "203.0.113.10"


def pol(allow=(), deny=(), default="allow", hosts=()):
    return Policy([parse_rule(t, "allow") for t in allow], [parse_rule(t, "deny") for t in deny], default, hosts)


def test_domain_allow_under_default_deny_needs_a_matching_name():
    p = pol(["*.example.test"], default="deny")
    assert p.evaluate("tcp", PUBLIC, 443, names=["www.example.test"]) == Decision(
        "allow", "*.example.test", "www.example.test")
    assert p.evaluate("tcp", PUBLIC, 443) == Decision("deny", "default")  # never resolved: IP rules only
    assert p.evaluate("tcp", PUBLIC, 443, names=["example.test"]) == Decision("deny", "default")  # apex
    assert p.evaluate("tcp", PUBLIC, 443, names=["other.test"]) == Decision("deny", "default")
    # any one of the names suffices, and the decision names the one that matched (normalised)
    assert p.evaluate("udp", PUBLIC, 53, names=["other.test", "WWW.Example.Test."]) == Decision(
        "allow", "*.example.test", "www.example.test")


def test_domain_rule_proto_and_ports():
    p = pol(["tcp://*.example.test:443", "udp://=dns.example.test:53"], default="deny")
    www, dns = ["www.example.test"], ["dns.example.test"]
    assert p.evaluate("tcp", PUBLIC, 443, names=www).verdict == "allow"
    assert p.evaluate("tcp", PUBLIC, 80, names=www) == Decision("deny", "default")
    assert p.evaluate("udp", PUBLIC, 443, names=www) == Decision("deny", "default")
    assert p.evaluate("udp", PUBLIC, 53, names=dns) == Decision("allow", "udp://=dns.example.test:53",
                                                                 "dns.example.test")
    assert p.evaluate("tcp", PUBLIC, 53, names=dns).verdict == "deny"


DENY_BEATS_ALLOW = [
    # allow, deny, names, expected rule (all deny)
    (["203.0.113.0/24"], ["ads.example.test"], ["ads.example.test"], "ads.example.test"),
    (["203.0.113.0/24"], ["*.example.test"], ["a.example.test"], "*.example.test"),
    (["*.example.test"], ["203.0.113.10"], ["a.example.test"], "203.0.113.10"),
    (["example.test"], ["=ads.example.test"], ["ads.example.test"], "=ads.example.test"),
    (["=www.example.test"], ["*.example.test"], ["www.example.test"], "*.example.test"),
    # a CNAME chain: the asked-for name is allowed, the target is denied
    (["*.example.test"], ["tracker.other.test"], ["cdn.example.test", "tracker.other.test"], "tracker.other.test"),
    # IP deny before domain deny: the IP rule's label
    (["*.example.test"], ["ads.example.test", "203.0.113.0/24"], ["ads.example.test"], "203.0.113.0/24"),
]


@pytest.mark.parametrize("default", ["allow", "deny"])
@pytest.mark.parametrize("allow,deny,names,rule", DENY_BEATS_ALLOW,
                         ids=[f"allow{a}-deny{d}" for a, d, _, _ in DENY_BEATS_ALLOW])
def test_deny_beats_allow_across_kinds(allow, deny, names, rule, default):
    decision = pol(allow, deny, default).evaluate("tcp", PUBLIC, 443, names=names)
    assert (decision.verdict, decision.rule) == ("deny", rule)
    assert decision.name == (None if parse_rule(rule, "deny").domain is None else
                             next(n for n in names if parse_rule(rule, "deny").domain.matches(n)))


def test_domain_deny_is_not_applied_without_the_name():
    p = pol(["203.0.113.0/24"], ["ads.example.test"], "deny")
    assert p.evaluate("tcp", PUBLIC, 443) == Decision("allow", "203.0.113.0/24")
    assert p.evaluate("tcp", PUBLIC, 443, names=["www.example.test"]) == Decision("allow", "203.0.113.0/24")


REBINDING = [("127.0.0.1", "builtin:loopback"), ("::1", "builtin:loopback"),
             ("169.254.169.254", "builtin:link-local"), ("::ffff:169.254.169.254", "builtin:link-local"),
             ("fe80::1", "builtin:link-local"), ("10.1.2.3", "builtin:private"), ("192.168.1.1", "builtin:private"),
             ("fd00::1", "builtin:private"), ("100.64.0.1", "builtin:cgnat"), ("224.0.0.251", "builtin:multicast"),
             ("0.0.0.0", "builtin:unspecified"), ("198.51.100.5", "builtin:host-address")]


@pytest.mark.parametrize("default", ["allow", "deny"])
@pytest.mark.parametrize("addr,label", REBINDING, ids=[a for a, _ in REBINDING])
def test_domain_allow_does_not_pierce_builtin_denies(addr, label, default):
    """DNS rebinding: evil.example.test A 127.0.0.1 must not open the host's loopback."""
    hosts = [IPv4Address("198.51.100.5")]
    p = pol(["*.example.test", "tcp://=evil.example.test:80"], default=default, hosts=hosts)
    for proto in ("tcp", "udp", "icmp"):
        port = 0 if proto == "icmp" else 80
        assert p.evaluate(proto, addr, port, names=["evil.example.test"]) == Decision("deny", label)
    # only an explicit IP allow pierces it
    q = pol(["*.example.test", addr if ":" not in addr else f"[{addr}]"], default=default, hosts=hosts)
    assert q.evaluate("tcp", addr, 80, names=["evil.example.test"]).verdict == "allow"


@given(st.lists(rules_st, max_size=3), st.lists(rules_st, max_size=3), st.sampled_from(["allow", "deny"]),
       st.sampled_from(BUILTIN_CASES), st.integers(0, 2**128), st.sampled_from(["tcp", "udp"]),
       st.integers(1, 65535))
def test_domain_allow_never_pierces_a_builtin(allow, deny, default, builtin, offset, proto, port):
    _label, cidr = builtin
    addr = addr_in(ip_network(cidr), offset)
    p = Policy([parse_rule(t, "allow") for t in allow] + [parse_rule("example.test", "allow")],
               [parse_rule(t, "deny") for t in deny], default)
    with_name = p.evaluate(proto, addr, port, names=["www.example.test"])
    without = p.evaluate(proto, addr, port)
    assert with_name == without  # the name changes nothing for a builtin address
    if without.verdict == "allow":
        assert without.rule in allow  # only an IP allow lets it through


def test_ordered_rules_with_domains():
    p = pol(allow=["a.test", "203.0.113.0/24", "*.b.test"], deny=["c.test", "198.51.100.7", "=d.test"],
            default="deny")
    texts = [r.text for r in p.ordered_rules()]
    builtin = [r.text for r in builtin_denies()]
    # IP denies, domain denies, IP allows, builtins (in play: domain allows exist), domain allows
    assert texts == ["198.51.100.7", "c.test", "=d.test", "203.0.113.0/24", *builtin, "a.test", "*.b.test"]
    assert [r.text for r in p.ip_rules()] == ["198.51.100.7", "203.0.113.0/24", *builtin]
    assert [r.text for r in p.domain_rules()] == ["c.test", "=d.test", "a.test", "*.b.test"]
    assert p.has_domain_rules
    # builtins are in play under default deny only when a domain allow exists
    assert pol(deny=["c.test"], default="deny").ordered_rules() == [parse_rule("c.test", "deny")]
    assert not pol(["203.0.113.0/24"]).has_domain_rules
    assert pol(deny=["c.test"]).has_domain_rules


def test_builtin_label_under_default_deny_depends_on_domain_allows():
    """Default deny: a private address is "default" unless domain allows put the builtins in play
    (the kernel logs the same label: see test_nft)."""
    assert pol(default="deny").evaluate("tcp", "10.1.2.3", 80) == Decision("deny", "default")
    assert pol(["x.test"], default="deny").evaluate("tcp", "10.1.2.3", 80) == Decision("deny", "builtin:private")


def test_icmp_matches_only_rules_without_proto_and_port():
    p = pol(["203.0.113.0/24", "tcp://198.51.100.0/24", "192.0.2.0/24:1-65535", "*.example.test"],
            default="deny")
    assert p.evaluate("icmp", "203.0.113.5", 0) == Decision("allow", "203.0.113.0/24")
    assert p.evaluate("icmp", "198.51.100.5", 0) == Decision("deny", "default")
    assert p.evaluate("icmp", "192.0.2.5", 0) == Decision("deny", "default")
    assert p.evaluate("icmp", "8.8.8.8", 0, names=["a.example.test"]).verdict == "allow"
    assert p.evaluate("icmp", "127.0.0.1", 0, names=["a.example.test"]) == Decision("deny", "builtin:loopback")


def test_evaluate_memo_keeps_names_apart():
    p = pol(["x.test"], default="deny")
    assert p.evaluate("tcp", PUBLIC, 1, names=("x.test",)).verdict == "allow"
    assert p.evaluate("tcp", PUBLIC, 1).verdict == "deny"
    assert p.evaluate("tcp", PUBLIC, 1, names=iter(["y.test", "x.test"])).verdict == "allow"  # any iterable
    assert p.evaluate("tcp", PUBLIC, 1, names=["y.test"]).verdict == "deny"


def test_decision_is_positional_and_name_defaults_to_none():
    d = Decision("deny", "default")
    assert (d.verdict, d.rule, d.name) == ("deny", "default", None)
    assert Decision("allow", "x.test", "a.x.test").name == "a.x.test"
    assert pol().evaluate("tcp", PUBLIC, 80, names=["a.test"]) == Decision("allow", "default")


domain_texts = st.tuples(
    st.sampled_from(["", "tcp://", "udp://"]), st.sampled_from(["", "*.", "="]),
    st.sampled_from(["example.test", "www.example.test", "other.test", "test", "a.b.example.test"]),
    st.sampled_from(["", ":443", ":80-90", ":53"]),
).map("".join)
mixed_rules = st.one_of(rules_st, domain_texts)
probe_names = st.lists(st.sampled_from(["example.test", "www.example.test", "a.b.example.test", "other.test",
                                        "x.other.test", "test", "unrelated.invalid", "WWW.Example.Test."]),
                       max_size=3)


@given(st.lists(mixed_rules, max_size=6), st.lists(mixed_rules, max_size=6), st.sampled_from(["allow", "deny"]),
       st.lists(st.ip_addresses(), max_size=2), probe_names, st.data())
def test_evaluate_with_names_is_first_match_of_ordered_rules(allow, deny, default, hosts, names, data):
    policy = Policy([parse_rule(t, "allow") for t in allow], [parse_rule(t, "deny") for t in deny], default, hosts)
    ordered = policy.ordered_rules()
    proto, addr, port = data.draw(probes([r for r in ordered if r.network is not None]))
    first = next((r for r in ordered if r.matches(proto, addr, port, names)), None)
    if first is None:
        expected = Decision(default, "default")
    else:
        expected = Decision(first.action, first.text, first.matching_name(names))
    assert policy.evaluate(proto, addr, port, names=names) == expected
    # deny beats allow across kinds: an allow verdict means no deny rule of either kind matched
    if expected.verdict == "allow":
        assert not any(r.matches(proto, addr, port, names) for r in ordered if r.action == "deny"
                       and not r.text.startswith("builtin:"))


# --- evaluate_name ----------------------------------------------------------------------------------

EVALUATE_NAME = [
    # id, allow, deny, default, name, expected decision
    ("default-allow-nothing", [], [], "allow", "a.test", Decision("allow", "default")),
    ("default-deny-nothing", [], [], "deny", "a.test", Decision("deny", "default")),
    ("deny-matches", [], ["ads.example.test"], "allow", "x.ads.example.test",
     Decision("deny", "ads.example.test", "x.ads.example.test")),
    ("deny-beats-allow", ["*.example.test"], ["=ads.example.test"], "allow", "ADS.example.test.",
     Decision("deny", "=ads.example.test", "ads.example.test")),
    ("deny-beats-allow-default-deny", ["example.test"], ["*.ads.example.test"], "deny", "a.ads.example.test",
     Decision("deny", "*.ads.example.test", "a.ads.example.test")),
    ("deny-not-matching", [], ["*.ads.example.test"], "allow", "ads.example.test", Decision("allow", "default")),
    ("tcp-port-deny-does-not-stop-resolution", [], ["tcp://ads.example.test:443"], "allow", "ads.example.test",
     Decision("allow", "default")),
    ("udp-deny-does-not-stop-resolution", [], ["udp://ads.example.test"], "deny", "ads.example.test",
     Decision("deny", "default")),
    ("allow-matches-default-deny", ["*.example.test"], [], "deny", "www.example.test",
     Decision("allow", "*.example.test", "www.example.test")),
    ("allow-any-proto-port", ["tcp://=api.example.test:8443"], [], "deny", "api.example.test",
     Decision("allow", "tcp://=api.example.test:8443", "api.example.test")),
    ("allow-matches-default-allow", ["example.test"], [], "allow", "example.test",
     Decision("allow", "example.test", "example.test")),
    ("apex-not-subdomain", ["*.example.test"], [], "deny", "example.test", Decision("deny", "default")),
    ("default-deny-ip-allow-lets-names-resolve", ["203.0.113.0/24"], [], "deny", "www.other.test",
     Decision("allow", IP_ALLOW_RULES)),
    ("default-deny-ip-allow-udp-only", ["udp://203.0.113.53:53"], [], "deny", "x.test",
     Decision("allow", IP_ALLOW_RULES)),
    ("default-deny-ip-deny-only", [], ["203.0.113.0/24"], "deny", "x.test", Decision("deny", "default")),
    ("default-deny-ip-allow-and-domain-allow", ["203.0.113.0/24", "*.example.test"], [], "deny",
     "www.example.test", Decision("allow", "*.example.test", "www.example.test")),
    ("default-deny-ip-allow-domain-deny", ["203.0.113.0/24"], ["other.test"], "deny", "www.other.test",
     Decision("deny", "other.test", "www.other.test")),
    ("root-name", ["example.test"], [], "deny", ".", Decision("deny", "default")),
]


@pytest.mark.parametrize("allow,deny,default,name,expected", [c[1:] for c in EVALUATE_NAME],
                         ids=[c[0] for c in EVALUATE_NAME])
def test_evaluate_name(allow, deny, default, name, expected):
    assert pol(allow, deny, default).evaluate_name(name) == expected


@given(st.lists(mixed_rules, max_size=5), st.lists(mixed_rules, max_size=5), st.sampled_from(["allow", "deny"]),
       probe_names.filter(bool))
def test_a_name_whose_resolution_is_refused_can_never_allow_a_connection_by_name(allow, deny, default, names):
    """If evaluate_name refuses NAME, no connection is allowed *because of* NAME: any allow
    with NAME among the names is by an IP rule or the default."""
    p = Policy([parse_rule(t, "allow") for t in allow], [parse_rule(t, "deny") for t in deny], default)
    name = names[0]
    if p.evaluate_name(name).verdict == "deny":
        for proto, port in (("tcp", 443), ("udp", 53), ("tcp", 85)):
            d = p.evaluate(proto, PUBLIC, port, names=[name])
            assert d.verdict == "deny" or d.name is None


def test_policy_file_with_domain_rules(tmp_path):
    path = write(tmp_path, 'default = "deny"\nallow = ["*.example.test", "tcp://=api.other.test:443"]\n'
                           'deny = ["ads.example.test"]\n')
    spec = load_policy_file(path)
    p = build_policy(spec, ["203.0.113.0/24"], [], None)
    assert p.has_domain_rules
    assert p.evaluate("tcp", "198.51.100.10", 443, names=["api.other.test"]) == Decision(
        "allow", "tcp://=api.other.test:443", "api.other.test")
    assert p.evaluate("tcp", PUBLIC, 443, names=["api.other.test"]) == Decision("allow", "203.0.113.0/24")
    assert p.evaluate_name("x.ads.example.test") == Decision("deny", "ads.example.test", "x.ads.example.test")
    assert p.evaluate_name("unlisted.test") == Decision("allow", IP_ALLOW_RULES)  # an IP allow exists
