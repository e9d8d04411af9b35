"""Unit tests for tether.names: NameMap (address -> names the DNS stub served) with a fake clock.

Covers TTL + grace expiry, re-recording (extends, never shortens, becomes the most recent), CNAME
chains, the size limit (least recently recorded evicted first), address and name normalisation,
bad input (records nothing), and a model-based hypothesis test against a naive reference.
"""

from __future__ import annotations

import math
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.names import MAX_TTL, NameMap, normalize_address, normalize_name
from tether.policy import Decision, Policy, parse_rule


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(grace: float = 30.0, limit: int = 65536) -> tuple[NameMap, Clock]:
    clock = Clock()
    return NameMap(clock=clock, grace=grace, limit=limit), clock


A, B, C = "203.0.113.10", "203.0.113.11", "2001:db8::10"

# --- normalisation --------------------------------------------------------------------------------

NAMES = [
    ("example.test", "example.test"),
    ("Example.TEST", "example.test"),
    ("example.test.", "example.test"),
    ("EXAMPLE.test..", "example.test."),  # only one final dot is dropped
    (".", ""),
    ("", ""),
    ("ex\u212aample.test", "ex\u212aample.test"),  # KELVIN SIGN stays: only ASCII is lower-cased
    ("\u00c9.Test", "\u00c9.test"),
]


@pytest.mark.parametrize("name,expected", NAMES, ids=[repr(n) for n, _ in NAMES])
def test_normalize_name(name, expected):
    assert normalize_name(name) == expected


def test_normalize_name_rejects_non_str():
    with pytest.raises(TypeError):
        normalize_name(b"example.test")  # type: ignore[arg-type]


ADDRESSES = [
    ("203.0.113.10", IPv4Address("203.0.113.10")),
    (IPv4Address("203.0.113.10"), IPv4Address("203.0.113.10")),
    ("::ffff:203.0.113.10", IPv4Address("203.0.113.10")),
    (IPv6Address("::ffff:203.0.113.10"), IPv4Address("203.0.113.10")),
    ("2001:DB8::10", IPv6Address("2001:db8::10")),
    ("fe80::1%eth0", IPv6Address("fe80::1")),
]


@pytest.mark.parametrize("addr,expected", ADDRESSES, ids=[str(a) for a, _ in ADDRESSES])
def test_normalize_address(addr, expected):
    got = normalize_address(addr)
    assert got == expected and type(got) is type(expected)


# --- record / names_for ---------------------------------------------------------------------------


def test_record_and_lookup():
    m, _ = make()
    m.record("WWW.Example.Test.", [A, IPv4Address(B)], 60)
    assert m.names_for(A) == ("www.example.test",)
    assert m.names_for(IPv4Address(B)) == ("www.example.test",)
    assert m.names_for("203.0.113.12") == ()
    assert m.names_for(C) == ()
    assert len(m) == 2


def test_ttl_plus_grace_then_expired():
    m, clock = make(grace=30)
    m.record("a.test", [A], 60)
    clock.advance(89.999)
    assert m.names_for(A) == ("a.test",)
    clock.advance(0.001)  # record time + ttl + grace: no longer valid
    assert m.names_for(A) == ()
    assert len(m) == 0  # and purged


def test_grace_zero_and_ttl_zero():
    m, clock = make(grace=0)
    m.record("a.test", [A], 10)
    clock.advance(9.5)
    assert m.names_for(A) == ("a.test",)
    clock.advance(0.5)
    assert m.names_for(A) == ()
    m.record("b.test", [A], 0)  # TTL 0 and no grace: never usable
    assert m.names_for(A) == ()
    m2, clock2 = make(grace=30)
    m2.record("b.test", [A], 0)  # TTL 0: the grace period still applies
    clock2.advance(29)
    assert m2.names_for(A) == ("b.test",)


TTLS = [(-5, 0.0), (float("nan"), 0.0), (float("-inf"), 0.0), (float("inf"), MAX_TTL), (10 * MAX_TTL, MAX_TTL),
        (2**31, MAX_TTL), (42, 42.0)]


@pytest.mark.parametrize("ttl,effective", TTLS, ids=[repr(t) for t, _ in TTLS])
def test_ttl_is_clamped(ttl, effective):
    m, clock = make(grace=1)
    m.record("a.test", [A], ttl)
    clock.advance(effective + 0.999)
    assert m.names_for(A) == ("a.test",)
    clock.advance(0.001)
    assert m.names_for(A) == ()


def test_most_recent_first_and_rerecord_moves_to_front():
    m, clock = make()
    m.record("a.test", [A], 300)
    clock.advance(1)
    m.record("b.test", [A], 300)
    clock.advance(1)
    m.record("c.test", [A], 300)
    assert m.names_for(A) == ("c.test", "b.test", "a.test")
    clock.advance(1)
    m.record("A.test.", [A], 300)
    assert m.names_for(A) == ("a.test", "c.test", "b.test")


def test_rerecord_extends_but_never_shortens():
    m, clock = make(grace=0)
    m.record("a.test", [A], 100)
    clock.advance(50)
    m.record("a.test", [A], 10)  # a shorter answer later: the sandbox may still hold the first one
    clock.advance(49)  # t=99 < 100
    assert m.names_for(A) == ("a.test",)
    clock.advance(1)
    assert m.names_for(A) == ()
    m.record("b.test", [A], 10)
    clock.advance(5)
    m.record("b.test", [A], 100)  # a longer answer extends
    clock.advance(90)
    assert m.names_for(A) == ("b.test",)
    clock.advance(15)
    assert m.names_for(A) == ()


def test_expiry_is_per_mapping():
    m, clock = make(grace=0)
    m.record("short.test", [A, B], 10)
    m.record("long.test", [A], 100)
    clock.advance(10)
    assert m.names_for(A) == ("long.test",)
    assert m.names_for(B) == ()
    assert len(m) == 1


def test_record_chain_maps_every_name_query_name_first():
    m, clock = make()
    # www.example.test CNAME cdn.example.net CNAME edge.cdn.test, A 203.0.113.10 / AAAA 2001:db8::10
    m.record_chain(["www.example.test", "CDN.example.net.", "edge.cdn.test"], [A, C], 60)
    assert m.names_for(A) == ("www.example.test", "cdn.example.net", "edge.cdn.test")
    assert m.names_for(C) == m.names_for(A)
    clock.advance(1)
    m.record("other.test", [A], 60)
    assert m.names_for(A) == ("other.test", "www.example.test", "cdn.example.net", "edge.cdn.test")


def test_record_chain_duplicates_and_empty_names():
    m, _ = make()
    m.record_chain(["a.test", "A.test.", "", ".", "b.test"], [A, A, "::ffff:" + A], 60)
    assert m.names_for(A) == ("a.test", "b.test")
    assert len(m) == 2
    m.record_chain([], [A], 60)
    m.record("x.test", [], 60)
    assert len(m) == 2


def test_record_chain_rejects_a_single_string():
    m, _ = make()
    with pytest.raises(TypeError, match="single str"):
        m.record_chain("a.test", [A], 60)  # type: ignore[arg-type]


def test_bad_input_records_nothing():
    m, _ = make()
    with pytest.raises(ValueError):
        m.record("a.test", [A, "not-an-address"], 60)
    with pytest.raises(TypeError):
        m.record_chain(["a.test", None], [A], 60)  # type: ignore[list-item]
    assert len(m) == 0 and m.names_for(A) == ()
    with pytest.raises(ValueError):
        m.names_for("example.test")


def test_mapped_addresses_are_ipv4():
    m, _ = make()
    m.record("a.test", ["::ffff:203.0.113.10"], 60)
    m.record("b.test", [IPv4Address(A)], 60)
    for spelling in (A, IPv4Address(A), "::ffff:203.0.113.10", IPv6Address("::ffff:" + A)):
        assert m.names_for(spelling) == ("b.test", "a.test")
    assert len(m) == 2


def test_limit_evicts_least_recently_recorded():
    m, clock = make(limit=3)
    for i, name in enumerate(["a.test", "b.test", "c.test"]):
        m.record(name, [A], 300)
        clock.advance(1)
    m.record("a.test", [A], 300)  # refreshed: now the most recent
    m.record("d.test", [A], 300)  # evicts b.test, the least recently recorded
    assert m.names_for(A) == ("d.test", "a.test", "c.test")
    m.record_chain(["e.test", "f.test"], [B], 300)
    assert len(m) == 3
    assert m.names_for(A) == ("d.test",)
    assert m.names_for(B) == ("e.test", "f.test")


def test_expired_mappings_are_purged_before_evicting():
    m, clock = make(grace=0, limit=2)
    m.record("old.test", [A], 1000)
    m.record("brief.test", [B], 1)
    clock.advance(2)
    m.record("new.test", [A], 1000)  # brief.test has expired: nothing valid is evicted
    assert m.names_for(A) == ("new.test", "old.test")


def test_purge_and_clear():
    m, clock = make(grace=0)
    m.record("a.test", [A, B], 10)
    m.record("b.test", [A], 20)
    clock.advance(10)
    assert m.purge() == 2
    assert len(m) == 1
    assert m.purge() == 0
    m.clear()
    assert len(m) == 0 and m.names_for(A) == ()


def test_many_extensions_keep_the_heap_bounded():
    m, clock = make()
    for i in range(20000):
        m.record("a.test", [A], 60 + i)  # each extends the mapping: the old heap entry goes stale
        clock.advance(0.001)
    assert len(m) == 1
    assert len(m._heap) <= 2 * len(m) + 1025
    assert m.names_for(A) == ("a.test",)


CTOR_BAD = [({"grace": -1}, "grace"), ({"grace": math.inf}, "grace"), ({"grace": math.nan}, "grace"),
            ({"limit": 0}, "limit"), ({"limit": 1.5}, "limit")]


@pytest.mark.parametrize("kwargs,word", CTOR_BAD, ids=[repr(k) for k, _ in CTOR_BAD])
def test_constructor_validates(kwargs, word):
    with pytest.raises(ValueError, match=word):
        NameMap(**kwargs)


def test_default_clock_is_monotonic():
    m = NameMap()
    m.record("a.test", [A], 60)
    assert m.names_for(A) == ("a.test",)


# --- with the policy --------------------------------------------------------------------------------


def test_names_feed_domain_rules():
    m, clock = make(grace=30)
    policy = Policy(allow=[parse_rule("*.example.test", "allow")], deny=[parse_rule("tracker.test", "deny")],
                    default="deny")
    m.record("www.example.test", [A], 60)
    m.record_chain(["cdn.example.test", "x.tracker.test"], [B], 60)  # CNAME to a denied name
    assert policy.evaluate("tcp", A, 443, names=m.names_for(A)) == Decision("allow", "*.example.test",
                                                                           "www.example.test")
    assert policy.evaluate("tcp", B, 443, names=m.names_for(B)) == Decision("deny", "tracker.test", "x.tracker.test")
    assert policy.evaluate("tcp", "203.0.113.99", 443, names=m.names_for("203.0.113.99")) == Decision(
        "deny", "default")  # never resolved
    clock.advance(90)  # after TTL + grace the name no longer opens the address
    assert policy.evaluate("tcp", A, 443, names=m.names_for(A)) == Decision("deny", "default")


# --- model-based ---------------------------------------------------------------------------------------

POOL_ADDRS = [A, B, C, "::ffff:" + B]
POOL_NAMES = ["a.test", "B.test", "c.test.", "d.test"]

ops = st.lists(st.one_of(
    st.tuples(st.just("record"), st.lists(st.sampled_from(POOL_NAMES), min_size=1, max_size=3),
              st.lists(st.sampled_from(POOL_ADDRS), max_size=3), st.sampled_from([0, 1, 5, 30, 100])),
    st.tuples(st.just("advance"), st.sampled_from([0.5, 1, 5, 20, 60])),
    st.tuples(st.just("lookup"), st.sampled_from(POOL_ADDRS)),
), max_size=40)


@settings(max_examples=300, deadline=None)
@given(ops, st.sampled_from([0, 10]), st.sampled_from([1, 3, 100]))
def test_matches_a_naive_model(operations, grace, limit):
    m, clock = make(grace=grace, limit=limit)
    model: dict[tuple, list] = {}  # (addr, name) -> [expiry, last record seq]
    seq = 0

    def purge():
        for key in [k for k, (exp, _) in model.items() if exp <= clock.now]:
            del model[key]

    for op in operations:
        if op[0] == "record":
            _, names, addrs, ttl = op
            m.record_chain(names, addrs, ttl)
            purge()
            chain = list(dict.fromkeys(normalize_name(n) for n in names))
            for addr in dict.fromkeys(normalize_address(a) for a in addrs):
                for name in reversed(chain):
                    seq += 1
                    old = model.get((addr, name))
                    expiry = clock.now + ttl + grace
                    model[(addr, name)] = [max(expiry, old[0]) if old else expiry, seq]
            while len(model) > limit:
                del model[min(model, key=lambda k: model[k][1])]
        elif op[0] == "advance":
            clock.advance(op[1])
        else:
            addr = normalize_address(op[1])
            purge()
            expected = tuple(name for (a, name), _ in sorted(model.items(), key=lambda kv: -kv[1][1])
                             if a == addr)
            assert m.names_for(op[1]) == expected
        assert len(m) >= len([k for k, (exp, _) in model.items() if exp > clock.now])
    purge()
    assert m.purge() >= 0 and len(m) == len(model)
    for addr in {normalize_address(a) for a in POOL_ADDRS}:
        assert set(m.names_for(addr)) == {name for (a, name) in model if a == addr}
