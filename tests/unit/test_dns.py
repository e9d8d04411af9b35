"""Unit tests for tether.engine.proxy.dns: the sans-IO DnsStub, then its asyncio shell on loopback.

The stub is driven with dnspython-built messages and a fake clock: queries in, actions out, nothing
else.  Upstream resolvers are documentation addresses that no packet ever reaches (the core opens
no socket).  The last tests run DnsServer for real, against a tiny DNS server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from typing import ClassVar

import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.tsigkeyring
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.engine.proxy.dns import (
    DnsServer,
    DnsStub,
    Event,
    Reply,
    SendUpstream,
)
from tether.policy import Decision

UP1 = ("198.51.100.53", 53)
UP2 = ("198.51.100.54", 53)
CLIENT_ID = 0x1234
UPSTREAM_ID = 0xBEEF

# name suffix -> deny rule; everything else allowed by "*.example.test" or "default"
DENY = {"ads.example.test": "*.ads.example.test", "tracker.other.test": "=tracker.other.test"}


def decide(name: str) -> Decision:
    for suffix, rule in DENY.items():
        if name == suffix or name.endswith("." + suffix):
            return Decision("deny", rule)
    if name.endswith(".example.test"):
        return Decision("allow", "*.example.test")
    return Decision("allow", "default")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list, float]] = []

    def __call__(self, names, addresses, ttl) -> None:
        self.calls.append((names, addresses, ttl))


def make_stub(**kw) -> tuple[DnsStub, Clock, Recorder]:
    clock, rec = Clock(), Recorder()
    ids = iter(range(UPSTREAM_ID, UPSTREAM_ID + 10_000))
    kw.setdefault("upstreams", [UP1, UP2])
    stub = DnsStub(decide=decide, on_answer=rec, clock=clock, new_id=lambda: next(ids), **kw)
    return stub, clock, rec


def query(name: str, qtype: str = "A", *, qid: int = CLIENT_ID, edns: bool = True,
          **kw) -> bytes:
    q = dns.message.make_query(name, qtype, use_edns=0 if edns else None, **kw)
    q.id = qid
    return q.to_wire()


def replies(actions) -> list[Reply]:
    return [a for a in actions if isinstance(a, Reply)]


def sends(actions) -> list[SendUpstream]:
    return [a for a in actions if isinstance(a, SendUpstream)]


def events(actions) -> list[Event]:
    return [a for a in actions if isinstance(a, Event)]


def only_reply(actions) -> dns.message.Message:
    rs = replies(actions)
    assert len(rs) == 1, actions
    return dns.message.from_wire(rs[0].wire)


def rrset(name: str, ttl: int, rdtype: str, *rdatas: str) -> dns.rrset.RRset:
    return dns.rrset.from_text(name, ttl, "IN", rdtype, *rdatas)


def upstream_answer(sent: SendUpstream, *answer, rcode=dns.rcode.NOERROR, authority=(),
                    additional=(), tc=False, qid=None) -> bytes:
    q = dns.message.from_wire(sent.wire)
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    r.answer = list(answer)
    r.authority = list(authority)
    r.additional = list(additional)
    if tc:
        r.flags |= dns.flags.TC
    if qid is not None:
        r.id = qid
    return r.to_wire(max_size=65535)


SOA = "ns.example.test. admin.example.test. 1 3600 600 86400 {minimum}"


def soa(ttl: int, minimum: int) -> dns.rrset.RRset:
    return rrset("example.test.", ttl, "SOA", SOA.format(minimum=minimum))


def forward(stub: DnsStub, name: str, qtype: str = "A", **kw) -> SendUpstream:
    actions = stub.handle_query(query(name, qtype, **kw), "client")
    (sent,) = sends(actions)
    assert replies(actions) == []
    return sent


def ede(msg: dns.message.Message) -> list[tuple[int, str]]:
    return [(o.code, o.text) for o in msg.options if isinstance(o, dns.edns.EDEOption)]


# --- malformed queries ---------------------------------------------------------------------------

def header(qid=CLIENT_ID, flags=0x0100, qd=1, an=0, ns=0, ar=0) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, an, ns, ar)


QUESTION = b"\x03www\x07example\x04test\x00\x00\x01\x00\x01"
good = header() + QUESTION


def _tsig_signed() -> bytes:
    q = dns.message.make_query("www.example.test", "A")
    q.id = CLIENT_ID
    q.use_tsig(dns.tsigkeyring.from_text({"key.": "Zm9vYmFyYmF6"}), "key.")
    return q.to_wire()


def _edns_version(version: int) -> bytes:
    wire = bytearray(query("www.example.test", "A"))  # OPT last, no options: TTL = rcode ver flags
    assert wire[-11:-8] == b"\x00\x00\x29" and wire[-2:] == b"\x00\x00"
    wire[-5] = version
    return bytes(wire)


# (id, wire, rcode of the reply or None = no reply at all)
MALFORMED = [
    ("empty", b"", None),
    ("one-byte", b"\x12", None),
    ("id-only", b"\x12\x34", dns.rcode.FORMERR),
    ("short-header", header()[:11], dns.rcode.FORMERR),
    ("header-without-question", header(), dns.rcode.FORMERR),
    ("truncated-question", header() + QUESTION[:-3], dns.rcode.FORMERR),
    ("no-question", header(qd=0), dns.rcode.FORMERR),
    ("two-questions", header(qd=2) + QUESTION + QUESTION, dns.rcode.FORMERR),
    ("qdcount-says-five", header(qd=5) + QUESTION, dns.rcode.FORMERR),
    ("ancount-without-answer", header(an=1) + QUESTION, dns.rcode.FORMERR),
    ("trailing-junk", good + b"\x00\x00junk", dns.rcode.FORMERR),
    ("bad-label-type-0x40", header() + b"\x43www\x00\x00\x01\x00\x01", dns.rcode.FORMERR),
    ("compression-loop", header() + b"\xc0\x0c\x00\x01\x00\x01", dns.rcode.FORMERR),
    ("label-overruns", header() + b"\x3fwww\x00\x00\x01\x00\x01", dns.rcode.FORMERR),
    ("tsig-without-key", _tsig_signed(), dns.rcode.FORMERR),
    ("qr-set-response", header(flags=0x8100) + QUESTION, None),
    ("qr-set-garbage", b"\x12\x34\x80", None),
    ("opcode-notify", header(flags=0x2000 | 0x0100) + QUESTION, dns.rcode.NOTIMP),
    ("opcode-update", header(flags=0x2800) + QUESTION, dns.rcode.NOTIMP),
    ("opcode-15", header(flags=0x7800) + QUESTION, dns.rcode.NOTIMP),
    ("edns-version-1", _edns_version(1), dns.rcode.BADVERS),
    ("qtype-axfr", query("example.test", "AXFR"), dns.rcode.NOTIMP),
    ("qtype-ixfr", query("example.test", "IXFR"), dns.rcode.NOTIMP),
    ("qtype-opt", header() + b"\x03www\x07example\x04test\x00\x00\x29\x00\x01", dns.rcode.NOTIMP),
]


@pytest.mark.parametrize("wire,rcode", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_query_gets_error_reply_or_nothing(wire, rcode):
    stub, _, _ = make_stub()
    actions = stub.handle_query(wire, "client")
    assert sends(actions) == []
    (event,) = events(actions)
    assert event.kind == "malformed" and event.client == "client" and event.detail
    if rcode is None:
        assert replies(actions) == [] and event.rcode is None
        return
    (reply,) = replies(actions)
    assert reply.client == "client"
    assert reply.wire[:2] == wire[:2]  # the client's id
    flags = int.from_bytes(reply.wire[2:4], "big")
    assert flags & dns.flags.QR
    assert (flags >> 11) & 0xF == ((wire[2] >> 3) & 0xF if len(wire) > 2 else 0)  # opcode echoed
    if rcode == dns.rcode.BADVERS:  # needs the OPT record for its upper bits
        msg = dns.message.from_wire(reply.wire)
        assert msg.rcode() == rcode and msg.edns == 0
    else:
        assert flags & 0xF == rcode
    assert event.rcode == dns.rcode.to_text(rcode)
    assert stub.stats.malformed == 1


def test_notimp_for_meta_type_echoes_the_question():
    stub, _, _ = make_stub()
    msg = only_reply(stub.handle_query(query("Example.test", "AXFR"), "c"))
    assert msg.rcode() == dns.rcode.NOTIMP
    assert msg.question[0].name == dns.name.from_text("example.test")


def _check_random_reply(stub: DnsStub, wire: bytes) -> None:
    actions = stub.handle_query(wire, "c")
    rs = replies(actions)
    assert len(rs) <= 1
    assert len(events(actions)) <= 1
    if rs:
        reply = rs[0].wire
        assert reply[:2] == wire[:2]
        flags = int.from_bytes(reply[2:4], "big")
        assert flags & dns.flags.QR
        # decide allows every such name, and nothing is pending: only a refusal of the input
        if flags & 0xF == 0:  # BADVERS = 16: the upper bits are in the OPT record
            assert dns.message.from_wire(reply).rcode() == dns.rcode.BADVERS
        else:
            assert flags & 0xF in (dns.rcode.FORMERR, dns.rcode.NOTIMP)
    else:
        assert len(sends(actions)) <= 1


@given(st.binary(max_size=600))
def test_random_bytes_never_raise_and_get_at_most_one_error_reply(wire):
    stub, _, _ = make_stub()
    _check_random_reply(stub, wire)


@given(st.lists(st.tuples(st.integers(0, len(good) + 30), st.integers(0, 255)), max_size=6),
       st.integers(0, 8))
def test_mutated_queries_never_raise(edits, cut):
    wire = bytearray(query("www.example.test", "A"))
    for pos, byte in edits:
        if pos < len(wire):
            wire[pos] = byte
        else:
            wire.append(byte)
    stub, _, _ = make_stub()
    _check_random_reply(stub, bytes(wire[:len(wire) - cut]))


@given(st.binary(max_size=600))
def test_random_upstream_bytes_with_a_pending_id_never_raise(tail):
    stub, _, _ = make_stub()
    forward(stub, "www.example.test")
    actions = stub.handle_upstream_response(UPSTREAM_ID.to_bytes(2, "big") + tail, UP1)
    assert replies(actions) == [] or len(replies(actions)) == 1


# --- policy: denied names ------------------------------------------------------------------------

@pytest.mark.parametrize("deny_rcode", ["REFUSED", "NXDOMAIN"])
@pytest.mark.parametrize("name,rule", [
    ("ads.example.test", "*.ads.example.test"),
    ("x.y.ADS.Example.TEST", "*.ads.example.test"),  # case-insensitive
    ("tracker.other.test.", "=tracker.other.test"),
])
def test_denied_name_gets_rcode_and_blocked_ede_naming_the_rule(deny_rcode, name, rule):
    stub, _, rec = make_stub(deny_rcode=deny_rcode)
    actions = stub.handle_query(query(name, "A"), "client")
    assert sends(actions) == []
    msg = only_reply(actions)
    assert msg.id == CLIENT_ID and msg.flags & dns.flags.QR
    assert msg.rcode() == dns.rcode.from_text(deny_rcode)
    assert ede(msg) == [(dns.edns.EDECode.BLOCKED, f'blocked by tether rule "{rule}"')]
    (event,) = events(actions)
    assert (event.kind, event.verdict, event.rule, event.rcode) == ("deny", "deny", rule, deny_rcode)
    assert event.name == name.lower().rstrip(".")
    assert rec.calls == []


def test_denied_name_without_edns_gets_bare_rcode_and_event_still_names_rule():
    stub, _, _ = make_stub()
    actions = stub.handle_query(query("ads.example.test", "AAAA", edns=False), "c")
    raw = replies(actions)[0].wire
    msg = dns.message.from_wire(raw)
    assert msg.rcode() == dns.rcode.REFUSED and msg.edns == -1  # RFC 6891: no OPT unasked
    assert events(actions)[0].rule == "*.ads.example.test"


def test_bad_deny_rcode_is_rejected():
    with pytest.raises(ValueError, match="REFUSED or NXDOMAIN"):
        DnsStub([UP1], decide, deny_rcode="SERVFAIL")


def test_decide_that_raises_fails_closed():
    def broken(name):
        raise RuntimeError("bug")
    stub = DnsStub([UP1], broken)
    msg = only_reply(stub.handle_query(query("www.example.test"), "c"))
    assert msg.rcode() == dns.rcode.REFUSED
    assert "internal error" in ede(msg)[0][1]


# --- forwarding ----------------------------------------------------------------------------------

def test_forward_uses_new_id_and_maps_the_answer_back():
    stub, _, _ = make_stub()
    sent = forward(stub, "WWW.Example.Test", "A")
    up = dns.message.from_wire(sent.wire)
    assert sent.upstream == UP1 and not sent.tcp
    assert up.id == UPSTREAM_ID != CLIENT_ID
    assert up.flags & dns.flags.RD and up.edns == 0 and up.payload == 1232
    assert up.question[0].name == dns.name.from_text("www.example.test")
    wire = upstream_answer(sent, rrset("www.example.test.", 300, "A", "203.0.113.10"))
    actions = stub.handle_upstream_response(wire, UP1)
    msg = only_reply(actions)
    assert msg.id == CLIENT_ID
    assert msg.question[0].name.to_text() == "WWW.Example.Test."  # the client's spelling
    assert msg.flags & dns.flags.RA and msg.rcode() == dns.rcode.NOERROR
    assert [rd.address for rd in msg.answer[0]] == ["203.0.113.10"]
    (event,) = events(actions)
    assert (event.kind, event.name, event.qtype, event.rule, event.verdict, event.rcode) == (
        "answer", "www.example.test", "A", "*.example.test", "allow", "NOERROR")
    assert stub.pending_count == 0


@pytest.mark.parametrize("qtype,rdata", [
    ("TXT", '"v=spf1 -all"'),
    ("MX", "10 mail.example.test."),
    ("SRV", "0 5 5060 sip.example.test."),
    ("ANY", None),
])
def test_other_query_types_are_forwarded(qtype, rdata):
    stub, _, rec = make_stub()
    sent = forward(stub, "example.test", qtype)
    assert dns.message.from_wire(sent.wire).question[0].rdtype == dns.rdatatype.from_text(qtype)
    answer = [rrset("example.test.", 60, qtype, rdata)] if rdata else []
    msg = only_reply(stub.handle_upstream_response(upstream_answer(sent, *answer), UP1))
    assert msg.id == CLIENT_ID and len(msg.answer) == len(answer)
    assert rec.calls == []


def test_identical_queries_in_flight_share_one_upstream_query():
    stub, _, _ = make_stub()
    sent = forward(stub, "www.example.test")
    actions = stub.handle_query(query("www.example.test", qid=0x4321), "second")
    assert actions == []
    rs = replies(stub.handle_upstream_response(
        upstream_answer(sent, rrset("www.example.test.", 300, "A", "203.0.113.10")), UP1))
    assert [(r.client, dns.message.from_wire(r.wire).id) for r in rs] == [
        ("client", CLIENT_ID), ("second", 0x4321)]


def _tamper(sent: SendUpstream, how: str) -> tuple[bytes, tuple[str, int]]:
    good_answer = rrset("www.example.test.", 300, "A", "203.0.113.66")
    q = dns.message.from_wire(sent.wire)
    if how == "wrong-id":
        return upstream_answer(sent, good_answer, qid=UPSTREAM_ID ^ 1), UP1
    if how == "wrong-upstream":
        return upstream_answer(sent, good_answer), ("198.51.100.99", 53)
    if how == "right-host-wrong-port":
        return upstream_answer(sent, good_answer), (UP1[0], 5353)
    if how in ("wrong-name", "wrong-type", "no-question", "qr-clear", "opcode-notify"):
        r = dns.message.make_response(q)
        r.answer = [good_answer]
        if how == "wrong-name":
            r.question = [dns.rrset.RRset(dns.name.from_text("evil.example.test"), 1, 1)]
        elif how == "wrong-type":
            r.question = [dns.rrset.RRset(q.question[0].name, 1, dns.rdatatype.AAAA)]
        elif how == "no-question":
            r.question = []
        elif how == "qr-clear":
            r.flags &= ~dns.flags.QR
        else:
            r.set_opcode(dns.opcode.NOTIFY)
        return r.to_wire(), UP1
    if how == "unparsable":
        return UPSTREAM_ID.to_bytes(2, "big") + b"\x81\x80\x00\x01garbage", UP1
    if how == "short":
        return UPSTREAM_ID.to_bytes(2, "big"), UP1
    raise AssertionError(how)


TAMPERED = ["wrong-id", "wrong-upstream", "right-host-wrong-port", "wrong-name", "wrong-type",
            "no-question", "qr-clear", "opcode-notify", "unparsable", "short"]


@pytest.mark.parametrize("how", TAMPERED)
def test_spoofed_or_mismatched_upstream_response_is_dropped(how):
    stub, _, rec = make_stub()
    sent = forward(stub, "www.example.test")
    wire, source = _tamper(sent, how)
    actions = stub.handle_upstream_response(wire, source)
    assert replies(actions) == [] and sends(actions) == []
    assert all(e.kind == "drop" for e in events(actions))
    assert stub.stats.dropped_responses == 1 and stub.pending_count == 1 and rec.calls == []
    # the genuine answer still gets through
    genuine = upstream_answer(sent, rrset("www.example.test.", 300, "A", "203.0.113.10"))
    msg = only_reply(stub.handle_upstream_response(genuine, UP1))
    assert msg.answer[0][0].address == "203.0.113.10"


def test_late_duplicate_after_the_answer_is_ignored():
    stub, _, _ = make_stub()
    sent = forward(stub, "www.example.test")
    wire = upstream_answer(sent, rrset("www.example.test.", 300, "A", "203.0.113.10"))
    assert len(replies(stub.handle_upstream_response(wire, UP1))) == 1
    assert stub.handle_upstream_response(wire, UP1) == []


# --- cache ---------------------------------------------------------------------------------------

def _answer(stub, name="www.example.test", qtype="A", *answer, **kw):
    sent = forward(stub, name, qtype)
    return stub.handle_upstream_response(upstream_answer(sent, *answer, **kw), UP1)


def test_cache_hit_decrements_ttl_and_expires():
    stub, clock, rec = make_stub()
    _answer(stub, "www.example.test", "A", rrset("www.example.test.", 300, "A", "203.0.113.10"))
    clock.now += 100.7
    actions = stub.handle_query(query("www.example.test", qid=7), "again")
    assert sends(actions) == []
    msg = only_reply(actions)
    assert msg.id == 7 and msg.answer[0].ttl == 200
    assert events(actions)[0].detail == "cached" and stub.stats.cache_hits == 1
    assert rec.calls[-1] == (["www.example.test"], [ipaddress.ip_address("203.0.113.10")], 200.0)
    clock.now += 199.3  # exactly 300 s after the answer: stale
    assert len(sends(stub.handle_query(query("www.example.test"), "c"))) == 1


def test_cache_is_case_insensitive_and_keeps_each_clients_spelling():
    stub, _, _ = make_stub()
    _answer(stub, "www.example.test", "A", rrset("www.example.test.", 300, "A", "203.0.113.10"))
    msg = only_reply(stub.handle_query(query("WwW.ExAmPlE.TeSt"), "c"))
    assert msg.question[0].name.to_text() == "WwW.ExAmPlE.TeSt."


def test_cache_separates_query_types_and_dnssec_ok():
    stub, _, _ = make_stub()
    _answer(stub, "www.example.test", "A", rrset("www.example.test.", 300, "A", "203.0.113.10"))
    assert len(sends(stub.handle_query(query("www.example.test", "AAAA"), "c"))) == 1
    assert len(sends(stub.handle_query(query("www.example.test", want_dnssec=True), "c"))) == 1


def test_positive_ttl_is_capped_at_one_day():
    stub, clock, _ = make_stub()
    _answer(stub, "www.example.test", "A",
            rrset("www.example.test.", 10 * 86400, "A", "203.0.113.10"))
    clock.now += 1
    assert only_reply(stub.handle_query(query("www.example.test"), "c")).answer[0].ttl == 86399
    clock.now += 86399
    assert len(sends(stub.handle_query(query("www.example.test"), "c"))) == 1


def test_zero_ttl_answer_is_served_but_not_cached():
    stub, _, _ = make_stub()
    _answer(stub, "www.example.test", "A", rrset("www.example.test.", 0, "A", "203.0.113.10"))
    assert len(sends(stub.handle_query(query("www.example.test"), "c"))) == 1


def test_cache_is_lru_bounded():
    stub, _, _ = make_stub(cache_entries=2)
    for i in range(3):
        name = f"h{i}.example.test"
        _answer(stub, name, "A", rrset(name + ".", 300, "A", f"203.0.113.{i}"))
    assert stub.cache_size == 2
    assert len(sends(stub.handle_query(query("h0.example.test"), "c"))) == 1  # evicted
    assert sends(stub.handle_query(query("h2.example.test"), "c")) == []


@pytest.mark.parametrize("kind,rcode,answer", [
    ("nxdomain", dns.rcode.NXDOMAIN, []),
    ("nodata", dns.rcode.NOERROR, []),
])
@pytest.mark.parametrize("soa_ttl,minimum,cached_for", [
    (3600, 60, 60),  # SOA MINIMUM
    (30, 600, 30),  # SOA TTL
    (3600, 3600, 300),  # capped at 5 min
])
def test_negative_answers_are_cached_per_soa(kind, rcode, answer, soa_ttl, minimum, cached_for):
    stub, clock, rec = make_stub()
    msg = only_reply(_answer(stub, "gone.example.test", "A", *answer, rcode=rcode,
                             authority=[soa(soa_ttl, minimum)]))
    assert msg.rcode() == rcode and msg.answer == []
    assert msg.authority[0].ttl == cached_for  # clamped to what we cache
    clock.now += cached_for - 1
    hit = stub.handle_query(query("gone.example.test"), "c")
    assert sends(hit) == [] and only_reply(hit).rcode() == rcode
    assert only_reply(hit).authority[0].ttl == 1
    clock.now += 1
    assert len(sends(stub.handle_query(query("gone.example.test"), "c"))) == 1
    assert rec.calls == []


def test_negative_answer_without_soa_is_not_cached():
    stub, _, _ = make_stub()
    _answer(stub, "gone.example.test", "A", rcode=dns.rcode.NXDOMAIN)
    assert len(sends(stub.handle_query(query("gone.example.test"), "c"))) == 1


# --- retries, timeouts, upstream failures ---------------------------------------------------------

def test_retry_next_upstream_then_servfail_after_total_timeout():
    stub, clock, _ = make_stub()
    t0 = clock.now
    sent = forward(stub, "slow.example.test")
    assert stub.next_deadline() == t0 + 2
    assert stub.tick(t0 + 1.9) == []
    (retry,) = stub.tick(t0 + 2)
    assert retry == SendUpstream(UP2, sent.wire)  # same query, same id
    (again,) = stub.tick(t0 + 4)
    assert again.upstream == UP1
    assert stub.next_deadline() == t0 + 5  # the last attempt is cut at the total timeout
    actions = stub.tick(t0 + 5)
    msg = only_reply(actions)
    assert msg.id == CLIENT_ID and msg.rcode() == dns.rcode.SERVFAIL
    assert ede(msg)[0][0] == dns.edns.EDECode.NO_REACHABLE_AUTHORITY
    (event,) = events(actions)
    assert event.kind == "servfail" and event.name == "slow.example.test"
    assert stub.pending_count == 0 and stub.next_deadline() is None
    late = upstream_answer(sent, rrset("slow.example.test.", 300, "A", "203.0.113.10"))
    assert stub.handle_upstream_response(late, UP1) == []


def test_answer_from_first_upstream_after_retry_is_accepted_and_preferred():
    stub, clock, _ = make_stub()
    sent = forward(stub, "www.example.test")
    stub.tick(clock.now + 2)
    wire = upstream_answer(sent, rrset("www.example.test.", 300, "A", "203.0.113.10"))
    assert len(replies(stub.handle_upstream_response(wire, UP2))) == 1
    assert forward(stub, "next.example.test").upstream == UP2  # the one that answered


@pytest.mark.parametrize("rcode", [dns.rcode.SERVFAIL, dns.rcode.REFUSED])
def test_upstream_failure_tries_the_other_upstream_then_passes_it_on(rcode):
    stub, _, _ = make_stub()
    sent = forward(stub, "www.example.test")
    (retry,) = stub.handle_upstream_response(upstream_answer(sent, rcode=rcode), UP1)
    assert retry.upstream == UP2
    msg = only_reply(stub.handle_upstream_response(upstream_answer(sent, rcode=rcode), UP2))
    assert msg.rcode() == rcode and msg.id == CLIENT_ID


def test_pending_table_full_gets_servfail():
    stub, _, _ = make_stub(max_pending=2)
    forward(stub, "a.example.test")
    forward(stub, "b.example.test")
    actions = stub.handle_query(query("c.example.test"), "c")
    assert sends(actions) == []
    msg = only_reply(actions)
    assert msg.rcode() == dns.rcode.SERVFAIL and "in flight" in ede(msg)[0][1]
    assert events(actions)[0].kind == "servfail"


def test_no_upstreams_gets_servfail():
    stub, _, _ = make_stub(upstreams=[])
    assert only_reply(stub.handle_query(query("a.example.test"), "c")).rcode() == dns.rcode.SERVFAIL


# --- CNAME chains and on_answer -----------------------------------------------------------------

def test_cname_chain_to_a_denied_name_is_refused_naming_its_rule():
    stub, _, rec = make_stub()
    actions = _answer(stub, "www.example.test", "A",
                      rrset("www.example.test.", 300, "CNAME", "cdn.example.test."),
                      rrset("cdn.example.test.", 300, "CNAME", "x.ads.example.test."),
                      rrset("x.ads.example.test.", 300, "A", "203.0.113.66"))
    msg = only_reply(actions)
    assert msg.rcode() == dns.rcode.REFUSED and msg.answer == []
    text = 'blocked by tether rule "*.ads.example.test" (CNAME to x.ads.example.test)'
    assert ede(msg) == [(15, text)]
    (event,) = events(actions)
    assert (event.kind, event.name, event.rule) == ("deny", "www.example.test", "*.ads.example.test")
    assert "x.ads.example.test" in event.detail
    assert rec.calls == []
    # and from the cache too
    assert only_reply(stub.handle_query(query("www.example.test"), "c")).rcode() == dns.rcode.REFUSED


def test_cname_to_denied_name_with_nxdomain_policy():
    stub, _, _ = make_stub(deny_rcode="NXDOMAIN")
    msg = only_reply(_answer(stub, "www.example.test", "A",
                             rrset("www.example.test.", 300, "CNAME", "tracker.other.test.")))
    assert msg.rcode() == dns.rcode.NXDOMAIN and ede(msg)[0][0] == 15


@pytest.mark.parametrize("qtype,addrs", [
    ("A", ["203.0.113.10", "203.0.113.11"]),
    ("AAAA", ["2001:db8:10::10", "2001:db8:10::11"]),
])
def test_on_answer_gets_chain_addresses_and_min_ttl(qtype, addrs):
    stub, _, rec = make_stub()
    msg = only_reply(_answer(stub, "WWW.example.test", qtype,
                             rrset("www.example.test.", 600, "CNAME", "cdn.other.test."),
                             rrset("cdn.other.test.", 60, "CNAME", "edge.other.test."),
                             rrset("edge.other.test.", 300, qtype, *addrs),
                             rrset("stray.other.test.", 300, qtype, addrs[0])))
    assert len(msg.answer) == 4  # the client sees everything the upstream said
    ((names, got, ttl),) = rec.calls
    assert names == ["www.example.test", "cdn.other.test", "edge.other.test"]
    assert sorted(got) == [ipaddress.ip_address(a) for a in addrs] and ttl == 60.0


def test_cname_loop_terminates():
    stub, _, rec = make_stub()
    msg = only_reply(_answer(stub, "a.example.test", "A",
                             rrset("a.example.test.", 60, "CNAME", "b.example.test."),
                             rrset("b.example.test.", 60, "CNAME", "a.example.test.")))
    assert msg.rcode() == dns.rcode.NOERROR and rec.calls == []


def test_on_answer_failure_gets_servfail():
    def broken(*a):
        raise RuntimeError("bug")
    stub = DnsStub([UP1], decide, on_answer=broken, new_id=lambda: UPSTREAM_ID)
    sent = forward(stub, "www.example.test")
    wire = upstream_answer(sent, rrset("www.example.test.", 300, "A", "203.0.113.10"))
    assert only_reply(stub.handle_upstream_response(wire, UP1)).rcode() == dns.rcode.SERVFAIL


# --- truncation and size limits ------------------------------------------------------------------

BIG_TXT = [f'"{i:03d}{"x" * 200}"' for i in range(8)]  # ~1.6 KB


def test_truncated_upstream_answer_is_passed_to_udp_client():
    stub, _, _ = make_stub()
    sent = forward(stub, "big.example.test", "TXT")
    actions = stub.handle_upstream_response(
        upstream_answer(sent, rrset("big.example.test.", 300, "TXT", BIG_TXT[0]), tc=True), UP1)
    msg = only_reply(actions)
    assert msg.flags & dns.flags.TC and msg.id == CLIENT_ID
    assert len(sends(stub.handle_query(query("big.example.test", "TXT"), "c"))) == 1  # not cached


def test_truncated_upstream_answer_is_refetched_over_tcp_for_tcp_client():
    stub, _, _ = make_stub()
    udp = stub.handle_query(query("big.example.test", "TXT", qid=1), "udp-client")
    stub.handle_query(query("big.example.test", "TXT", qid=2), "tcp-client", tcp=True)
    (sent,) = sends(udp)
    actions = stub.handle_upstream_response(upstream_answer(sent, tc=True), UP1)
    assert [r.client for r in replies(actions)] == ["udp-client"]
    (refetch,) = sends(actions)
    assert refetch == SendUpstream(UP1, sent.wire, tcp=True)
    full = upstream_answer(sent, rrset("big.example.test.", 300, "TXT", *BIG_TXT))
    actions = stub.handle_upstream_response(full, UP1, tcp=True)
    msg = only_reply(actions)
    assert replies(actions)[0].client == "tcp-client" and len(msg.answer[0]) == 8
    assert not msg.flags & dns.flags.TC


@pytest.mark.parametrize("edns,payload,truncated", [
    (False, None, True),  # 512 bytes without EDNS
    (True, 512, True),
    (True, 4096, False),
])
def test_reply_larger_than_the_client_takes_is_sent_empty_with_tc(edns, payload, truncated):
    stub, _, _ = make_stub()
    kw = {"payload": payload} if edns else {}
    sent = forward(stub, "big.example.test", "TXT", edns=edns, **kw)
    full = upstream_answer(sent, rrset("big.example.test.", 300, "TXT", *BIG_TXT))
    actions = stub.handle_upstream_response(full, UP1)
    msg = only_reply(actions)
    assert bool(msg.flags & dns.flags.TC) == truncated
    assert (msg.answer == []) == truncated


# --- the asyncio shell, on loopback ------------------------------------------------------------

class _Upstream(asyncio.DatagramProtocol):
    """A tiny authoritative-looking server on 127.0.0.1 (UDP and TCP on one port)."""

    ZONE: ClassVar[dict[tuple[str, str], list[dns.rrset.RRset]]] = {
        ("www.example.test.", "A"): [rrset("www.example.test.", 300, "A", "203.0.113.10")],
        ("www.example.test.", "AAAA"): [rrset("www.example.test.", 300, "AAAA", "2001:db8::10")],
        ("big.example.test.", "TXT"): [rrset("big.example.test.", 300, "TXT", *BIG_TXT)],
        ("alias.example.test.", "A"): [
            rrset("alias.example.test.", 300, "CNAME", "x.ads.example.test."),
            rrset("x.ads.example.test.", 300, "A", "203.0.113.66")],
    }

    def __init__(self, silent: bool = False) -> None:
        self.silent = silent
        self.udp_queries = 0
        self.tcp_queries = 0

    def answer(self, wire: bytes, max_size: int) -> bytes:
        q = dns.message.from_wire(wire)
        r = dns.message.make_response(q)
        key = (q.question[0].name.to_text().lower(), dns.rdatatype.to_text(q.question[0].rdtype))
        r.answer = list(self.ZONE.get(key, []))
        if not r.answer:
            r.set_rcode(dns.rcode.NXDOMAIN)
        try:
            return r.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            r.answer = []
            r.flags |= dns.flags.TC
            return r.to_wire()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data, addr) -> None:
        self.udp_queries += 1
        if not self.silent:
            self.transport.sendto(self.answer(data, 1232), addr)

    async def tcp(self, reader, writer) -> None:
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                data = await reader.readexactly(size)
                self.tcp_queries += 1
                out = self.answer(data, 65535)
                writer.write(len(out).to_bytes(2, "big") + out)
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()


async def _start_upstream(silent=False):
    """UDP and TCP on the same free loopback port."""
    loop = asyncio.get_running_loop()
    proto = _Upstream(silent)
    for _ in range(20):
        transport, _ = await loop.create_datagram_endpoint(lambda: proto, local_addr=("127.0.0.1", 0))
        port = transport.get_extra_info("sockname")[1]
        try:
            tcp = await asyncio.start_server(proto.tcp, "127.0.0.1", port)
        except OSError:
            transport.close()
            continue
        return proto, transport, tcp, port
    raise RuntimeError("no free port pair on 127.0.0.1")


class _Front(asyncio.DatagramProtocol):
    """What the engine does for UDP: datagram in, serve_udp_datagram with a reply callable."""

    def __init__(self, server: DnsServer) -> None:
        self.server = server

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data, addr) -> None:
        self.server.serve_udp_datagram(data, lambda wire: self.transport.sendto(wire, addr), addr)


async def _with_server(body, silent=False, **stub_kw):
    loop = asyncio.get_running_loop()
    proto, up_udp, up_tcp, port = await _start_upstream(silent)
    rec, seen = Recorder(), []
    stub = DnsStub([("127.0.0.1", port)], decide, on_answer=rec, **stub_kw)
    try:
        async with DnsServer(stub, on_event=lambda e, peer: seen.append((e, peer))) as server:
            front, _ = await loop.create_datagram_endpoint(lambda: _Front(server),
                                                           local_addr=("127.0.0.1", 0))
            tcp = await asyncio.start_server(server.handle_tcp, "127.0.0.1", 0)
            try:
                await body(front.get_extra_info("sockname")[1],
                           tcp.sockets[0].getsockname()[1], proto, rec, seen)
            finally:
                front.close()
                tcp.close()
                await tcp.wait_closed()
    finally:
        up_udp.close()
        up_tcp.close()
        await up_tcp.wait_closed()


def _q(name, qtype="A"):
    return dns.message.make_query(name, qtype, use_edns=0)


def test_server_answers_udp_and_tcp_on_loopback():
    async def body(udp_port, tcp_port, upstream, rec, seen):
        r = await dns.asyncquery.udp(_q("www.example.test"), "127.0.0.1", port=udp_port, timeout=3)
        assert r.answer[0][0].address == "203.0.113.10"
        r = await dns.asyncquery.tcp(_q("www.example.test", "AAAA"), "127.0.0.1", port=tcp_port,
                                     timeout=3)
        assert r.answer[0][0].address == "2001:db8::10"
        r = await dns.asyncquery.udp(_q("www.example.test"), "127.0.0.1", port=udp_port, timeout=3)
        assert r.answer[0].ttl <= 300 and upstream.udp_queries == 2  # the third was cached
        assert [c[1] for c in rec.calls] == [[ipaddress.ip_address("203.0.113.10")],
                                             [ipaddress.ip_address("2001:db8::10")],
                                             [ipaddress.ip_address("203.0.113.10")]]
        r = await dns.asyncquery.udp(_q("ads.example.test"), "127.0.0.1", port=udp_port, timeout=3)
        assert r.rcode() == dns.rcode.REFUSED and "*.ads.example.test" in ede(r)[0][1]
        r = await dns.asyncquery.tcp(_q("alias.example.test"), "127.0.0.1", port=tcp_port, timeout=3)
        assert r.rcode() == dns.rcode.REFUSED  # CNAME into a denied name
        deny = [e for e, _ in seen if e.kind == "deny"]
        assert [e.name for e in deny] == ["ads.example.test", "alias.example.test"]
        assert all(peer is not None for e, peer in seen if e.kind in ("deny", "answer"))
    asyncio.run(_with_server(body))


def test_server_tcp_pipelining_and_tcp_fallback_for_truncated_answers():
    async def body(udp_port, tcp_port, upstream, rec, seen):
        r = await dns.asyncquery.udp(_q("big.example.test", "TXT"), "127.0.0.1", port=udp_port,
                                     timeout=3)
        assert r.flags & dns.flags.TC  # passed on: the client retries over TCP
        reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port)
        ids = []
        for i, (name, qtype) in enumerate([("big.example.test", "TXT"), ("www.example.test", "A"),
                                           ("nope.example.test", "A")]):
            q = _q(name, qtype)
            q.id = 100 + i
            ids.append(q.id)
            wire = q.to_wire()
            writer.write(len(wire).to_bytes(2, "big") + wire)
        await writer.drain()
        got = {}
        for _ in ids:
            size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 3), "big")
            m = dns.message.from_wire(await reader.readexactly(size))
            got[m.id] = m
        writer.close()
        assert sorted(got) == ids
        assert len(got[100].answer[0]) == 8 and not got[100].flags & dns.flags.TC
        assert got[101].answer[0][0].address == "203.0.113.10"
        assert got[102].rcode() == dns.rcode.NXDOMAIN
        assert upstream.tcp_queries == 1  # only the truncated one went to upstream TCP
    asyncio.run(_with_server(body))


def test_server_servfail_when_upstream_is_silent_and_garbage_over_tcp():
    async def body(udp_port, tcp_port, upstream, rec, seen):
        r = await dns.asyncquery.udp(_q("www.example.test"), "127.0.0.1", port=udp_port, timeout=3)
        assert r.rcode() == dns.rcode.SERVFAIL
        assert upstream.udp_queries == 3  # 0, 0.2, 0.4 s; SERVFAIL at 0.5 s
        reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port)
        writer.write(b"\x00\x05\x12\x34\x00\x00\x00")  # 5-byte message: FORMERR
        size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 3), "big")
        reply = await reader.readexactly(size)
        assert reply[:2] == b"\x12\x34" and reply[3] & 0xF == dns.rcode.FORMERR
        writer.write(b"\x00")  # half a length prefix, then close: the server just closes
        writer.close()
        assert [e.kind for e, _ in seen] == ["servfail", "malformed"]
    asyncio.run(_with_server(body, silent=True, attempt_timeout=0.2, total_timeout=0.5))


def test_server_closes_idle_tcp_connection():
    async def body(udp_port, tcp_port, upstream, rec, seen):
        reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port)
        assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by the server
        writer.close()

    async def run():
        loop = asyncio.get_running_loop()
        stub = DnsStub([("127.0.0.1", 9)], decide)
        async with DnsServer(stub, tcp_idle_timeout=0.2) as server:
            tcp = await asyncio.start_server(server.handle_tcp, "127.0.0.1", 0)
            async with tcp:
                await body(None, tcp.sockets[0].getsockname()[1], None, None, None)
        assert not loop.is_closed()
    asyncio.run(run())


def test_server_upstream_sockets_are_cloexec_opened_on_first_use_and_closed():
    async def run():
        _, up_udp, up_tcp, port = await _start_upstream()
        stub = DnsStub([("127.0.0.1", port)], decide)
        server = DnsServer(stub, asyncio.get_running_loop())  # no start(): first use opens
        assert server._udp == {}
        answered = asyncio.get_running_loop().create_future()
        server.serve_udp_datagram(query("www.example.test"), answered.set_result)
        msg = dns.message.from_wire(await asyncio.wait_for(answered, 3))
        assert msg.answer[0][0].address == "203.0.113.10"
        (sock,) = server._udp.values()
        assert sock.family == socket.AF_INET and not sock.get_inheritable()
        server.close()
        assert sock.fileno() == -1
        up_udp.close()
        up_tcp.close()
    asyncio.run(run())
