"""DNS stub: answer the sandbox's queries under the domain policy, forwarding to the host's resolvers.

Rules of this file:
  * ``DnsStub`` is sans-IO (the h11 shape): bytes and a clock in, a list of actions out.  It opens
    no socket, starts no task and never raises on bad input, whatever the bytes.  Everything that
    decides what a client is told lives in it.
  * ``DnsServer`` is the thin asyncio shell: it moves bytes between the engine's sockets, the
    upstream sockets and the stub, and schedules ``tick``.  It decides nothing.
  * The wire format is dnspython's (``dns.message``); nothing here parses DNS by hand except the
    first three header bytes, read before parsing (id, QR bit, opcode: enough to answer FORMERR
    or NOTIMP to bytes dnspython rejects).

Theory of operation
-------------------
What flows through.  The sandbox's queries reach the engine on 10.0.2.3:53 / [fd00:7e7e::3]:53 (or
on any :53, captured) over UDP and TCP.  The engine hands each UDP datagram to
``DnsServer.serve_udp_datagram(data, reply)`` and each accepted TCP stream to
``DnsServer.handle_tcp(reader, writer)``; both feed ``DnsStub.handle_query``.  For one query:

1. A message with QR set is a response, not a query: it is DROPPED, never answered, so two DNS
   speakers cannot bounce errors at each other forever (the "loop DoS" of CVE-2024-2169).  Opcode
   != QUERY -> NOTIMP (RFC 1035: "does not support the requested kind of query").  Unparsable
   bytes, QDCOUNT != 1 -> FORMERR (header only, the id taken from the first two bytes; fewer than
   two bytes: nothing can be answered, dropped).  EDNS version != 0 -> BADVERS (RFC 6891); meta
   query types (AXFR, IXFR, OPT, TSIG, ...; ANY is fine) -> NOTIMP.  The checks after parsing
   are the table ``_QUERY_CHECKS``; the first failing check wins.
2. ``decide(name)`` (the engine passes ``Policy.evaluate_name``).  Deny -> REFUSED (or NXDOMAIN,
   ``deny_rcode``) with an Extended DNS Error (RFC 8914, code 15 "Blocked") whose EXTRA-TEXT
   names the rule: ``blocked by tether rule "*.ads.example.test"``.  EDE rides in the OPT record,
   so a client that sent no EDNS gets the bare rcode (RFC 6891: no OPT in the answer when the
   query had none); the ``Event`` names the rule either way.
3. Allowed: a fresh cache entry answers at once, TTLs decremented by its age.  Otherwise a NEW
   query is built (fresh random id, RD, EDNS payload 1232, the client's DO and CD bits) and sent
   to an upstream resolver; an identical query already in flight is joined instead (one upstream
   query, several waiting clients).  No answer within ``attempt_timeout`` (2 s) -> the same query
   to the next upstream; none within ``total_timeout`` (5 s) -> SERVFAIL (EDE 22).  An upstream
   SERVFAIL/REFUSED/NOTIMP/FORMERR moves on to an upstream not tried yet before being passed on.
4. An upstream response is accepted only if its id names a pending query, it comes from an upstream
   that query was sent to, and its question is the question asked; anything else is dropped (an
   off-path spoofing attempt, or a late duplicate).  Accepted answers are cached: positive ones for
   their smallest answer TTL (at most 1 day), NXDOMAIN/NODATA for the SOA's negative TTL (RFC
   2308: min(SOA TTL, SOA MINIMUM), at most 5 min; without SOA not cached); others not at all.
5. Every answer served (fresh or cached) walks its CNAME chain from the question name.  If
   ``decide`` denies any name on it, the client gets the deny reply naming that rule instead (a
   CNAME into a denied domain does not bypass the policy).  Otherwise the A/AAAA records owned by
   the chain's last name go to ``on_answer(names, addresses, ttl)`` (names = the whole chain, ttl
   = the smallest remaining TTL on it) so the engine can map those IPs back to names; this
   happens for every answer served, cache hits included.  Records for other owners in the answer
   are passed to the client but never recorded.
6. A truncated upstream answer (TC, over UDP) is passed on to UDP clients as TC with empty
   sections (they retry over TCP; a partial answer would hand out addresses that were never
   recorded); for clients on TCP the same query is re-sent to that upstream over TCP.  Replies
   larger than the client can take (512 bytes without EDNS, its EDNS payload size otherwise,
   65535 on TCP) are likewise sent empty with TC set.  Neither is cached.

Replies are rebuilt from the cache entry for each client (its id, its question spelling, its EDNS),
never relayed byte for byte.  Names are compared case-insensitively; ``decide`` and ``on_answer`` see
lower-case names without the final dot ("www.example.test").

What it owns.  ``DnsStub``: the pending-query table (bounded, ``max_pending``; full -> SERVFAIL)
and the LRU answer cache (bounded in entries and in bytes).  ``DnsServer``: one unconnected UDP
socket per upstream address family, created in the process's own (host) netns; short-lived TCP
connections to upstreams; the ``tick`` timer.  Upstream sockets are plain non-blocking sockets
read from a loop reader callback, opened by ``start()`` or at first use.  It does NOT own the sandbox-side sockets: the
engine does, and gives the server a ``reply`` callable per datagram and the stream pair per TCP
connection (closed by ``handle_tcp`` when it returns).

Limits.  Upstream ids are random 16-bit from one source port per family: that is the defence
against off-path spoofing, adequate for a resolver on the host or LAN, not for resolvers across
the Internet.  No DNSSEC validation (DO/CD/AD are passed through for validating clients).
Upstream TCP is used only when a TCP client needs an answer that was truncated over UDP; no
DoT/DoH.  A client TCP connection is closed after ``TCP_IDLE_TIMEOUT`` (10 s) without a query, or
when more than ``TCP_MAX_BACKLOG`` of its replies sit unread; how many client connections may be
open at once is the engine's to bound.  Every constant below is named and commented.

API (what the engine calls)
---------------------------
::

    stub = DnsStub(upstreams=[("198.51.100.53", 53)], decide=policy.evaluate_name,
                   on_answer=names.record_chain, deny_rcode="REFUSED")
    server = DnsServer(stub, on_event=lambda event, peer: ...)   # Event -> audit
    server.start()                             # optional: upstream sockets now, not at first use
    server.serve_udp_datagram(data, reply, peer=("10.0.2.100", 41000))
    await server.handle_tcp(reader, writer)    # one task per accepted connection (peer:
                                               # defaults to the socket's peername)
    server.close()

``DnsStub`` alone: ``handle_query(wire, client, tcp=False)``, ``handle_upstream_response(wire,
upstream, tcp=False)``, ``tick(now=None)`` each return a list of ``Reply`` / ``SendUpstream`` /
``Event``; ``next_deadline()`` says when ``tick`` is next due (in ``clock`` time, which must be
the event loop's clock, ``time.monotonic``, when a ``DnsServer`` drives it).
"""

from __future__ import annotations

import asyncio
import heapq
import ipaddress
import itertools
import logging
import secrets
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Self

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from tether.policy import Decision

log = logging.getLogger(__name__)

# --- limits and timeouts (named where defined; see the theory of operation) ---------------------
ATTEMPT_TIMEOUT = 2.0  # s without an answer before the query goes to the next upstream
TOTAL_TIMEOUT = 5.0  # s without an answer before the client gets SERVFAIL
MAX_PENDING = 1024  # upstream queries in flight; one more -> SERVFAIL
MAX_WAITERS = 64  # clients waiting on one upstream query; one more -> SERVFAIL
CACHE_ENTRIES = 4096
CACHE_BYTES = 4 << 20  # sum of the upstream answers' wire sizes (parsed: several times more)
MAX_POSITIVE_TTL = 86400  # 1 day
MAX_NEGATIVE_TTL = 300  # RFC 2308 suggests 1-3 hours; a sandbox prefers to notice new names soon
EDNS_PAYLOAD = 1232  # advertised upstream and to clients (DNS flag day 2020)
MAX_CHAIN = 16  # CNAME links followed in one answer
EDE_TEXT_MAX = 200  # characters of EXTRA-TEXT (a deny reply must still fit in 512 bytes)
TCP_IDLE_TIMEOUT = 10.0  # s a client TCP connection may wait before its next query
TCP_MAX_BACKLOG = 256 << 10  # unsent reply bytes on a client TCP connection before it is cut
UPSTREAM_READS_PER_WAKEUP = 64  # datagrams read from an upstream socket per readiness callback

UDP_CLASSIC_SIZE = 512
UDP_MAX_MESSAGE = 65507  # the largest IPv4 UDP payload
TCP_MAX_MESSAGE = 65535

_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)
_TRY_NEXT_RCODES = frozenset({dns.rcode.SERVFAIL, dns.rcode.REFUSED, dns.rcode.NOTIMP,
                              dns.rcode.FORMERR})
_DENY_RCODES = {"REFUSED": dns.rcode.REFUSED, "NXDOMAIN": dns.rcode.NXDOMAIN}

Upstream = tuple[str, int]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
OnAnswer = Callable[[list[str], list[Address], float], None]


# --- actions: what the core asks its shell to do -------------------------------------------------

@dataclass(frozen=True, slots=True)
class Reply:
    """Send ``wire`` to the sandbox client (the object given to ``handle_query``); on TCP the shell
    adds the 2-byte length."""

    client: object
    wire: bytes


@dataclass(frozen=True, slots=True)
class SendUpstream:
    """Send ``wire`` to the upstream resolver ``upstream`` over UDP, or over TCP when ``tcp``."""

    upstream: Upstream
    wire: bytes
    tcp: bool = False


@dataclass(frozen=True, slots=True)
class Event:
    """Something for the audit log.

    kind: ``answer`` (a reply with data or a negative answer from upstream or the cache), ``deny``
    (the policy refused the name or a name on its CNAME chain; ``rule`` names the rule),
    ``malformed`` (FORMERR/NOTIMP/BADVERS, or dropped), ``servfail`` (timeout, table full, no
    upstream), ``drop`` (an upstream response that did not match the query it claimed to answer).
    ``name`` is lower-case without the final dot, None when unknown; ``rcode`` is the rcode sent to
    the client (None when nothing was sent); ``client`` is the client object of ``handle_query``.
    """

    kind: Literal["answer", "deny", "malformed", "servfail", "drop"]
    name: str | None
    qtype: str | None
    rule: str | None
    verdict: Literal["allow", "deny"] | None
    rcode: str | None
    detail: str = ""
    client: object = None


Action = Reply | SendUpstream | Event


@dataclass
class StubStats:
    queries: int = 0
    cache_hits: int = 0
    forwarded: int = 0  # upstream queries started
    denied: int = 0
    servfail: int = 0
    malformed: int = 0
    dropped_responses: int = 0  # unknown id, wrong upstream, wrong question, unparsable


# --- small helpers -------------------------------------------------------------------------------

def name_text(name: dns.name.Name) -> str:
    """The form ``decide`` and ``on_answer`` see: lower case, no final dot, escapes kept ("." = root)."""
    return name.to_text(omit_final_dot=True).lower()


def normalize_upstream(host: str, port: int) -> Upstream:
    """("2001:DB8::53", 53) -> ("2001:db8::53", 53): how the shell names the sender of a datagram."""
    return (str(ipaddress.ip_address(host)), int(port))


def _header_reply(wire: bytes, rcode: int) -> bytes:
    """A 12-byte reply to the query whose id starts ``wire``: QR, the query's opcode and RD, rcode."""
    flags = (wire[2] << 8) if len(wire) > 2 else 0
    flags = dns.flags.QR | (flags & (0x7800 | dns.flags.RD)) | (rcode & 0xF)
    return struct.pack("!HHHHHH", int.from_bytes(wire[:2], "big"), flags, 0, 0, 0, 0)


def _blocked_text(rule: str, via: str | None) -> str:
    text = f'blocked by tether rule "{rule}"'
    if via is not None:
        text += f" (CNAME to {via})"
    return text[:EDE_TEXT_MAX]


# Checks on a parsed query, in order; the first one that matches decides the reply (h11-style
# table).  Each: (predicate, rcode, echo, reason); ``echo``: the reply carries the question (and
# EDNS, which BADVERS needs), else it is a bare 12-byte header (two questions cannot be echoed in
# one reply).  What does not fit here: the QR bit and the opcode, read from the raw header before
# parsing (dnspython parses UPDATE and NOTIFY by their own rules, and a malformed UPDATE is still
# "not implemented" here), and unparsable bytes (see handle_query).
_QUERY_CHECKS: tuple[tuple[Callable[[dns.message.Message], bool], int, bool, str], ...] = (
    (lambda m: len(m.question) != 1, dns.rcode.FORMERR, False, "question count is not 1"),
    (lambda m: m.edns > 0, dns.rcode.BADVERS, True, "EDNS version not supported"),
    (lambda m: dns.rdatatype.is_metatype(m.question[0].rdtype)
        and m.question[0].rdtype != dns.rdatatype.ANY, dns.rcode.NOTIMP, True,
     "query type not supported"),
)


# --- the cache -----------------------------------------------------------------------------------

CacheKey = tuple[dns.name.Name, int, int, bool, bool]  # qname, qtype, qclass, DO, CD


@dataclass(slots=True)
class _Entry:
    """One upstream answer, kept to rebuild replies from. TTLs are clamped to ``ttl`` when stored."""

    rcode: int
    ad: bool
    answer: list[dns.rrset.RRset]
    authority: list[dns.rrset.RRset]
    additional: list[dns.rrset.RRset]
    stored: float
    ttl: int  # seconds the entry may be served; 0 = not cached (served once)
    size: int
    chain: list[dns.name.Name]  # question name, then each CNAME target
    addresses: list[Address]  # A/AAAA owned by chain[-1]
    chain_ttl: int  # smallest TTL on the chain and its addresses


class _Cache:
    """LRU of answers, bounded in entries and in bytes."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._d: OrderedDict[CacheKey, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: CacheKey, now: float) -> _Entry | None:
        e = self._d.get(key)
        if e is None:
            return None
        if now >= e.stored + e.ttl:
            self._remove(key)
            return None
        self._d.move_to_end(key)
        return e

    def put(self, key: CacheKey, entry: _Entry) -> None:
        if entry.ttl <= 0 or entry.size > self.max_bytes or self.max_entries <= 0:
            return
        if key in self._d:
            self._remove(key)
        self._d[key] = entry
        self.bytes += entry.size
        while len(self._d) > self.max_entries or self.bytes > self.max_bytes:
            self._remove(next(iter(self._d)))

    def _remove(self, key: CacheKey) -> None:
        self.bytes -= self._d.pop(key).size


def _clamped(rrsets: list[dns.rrset.RRset], cap: int) -> list[dns.rrset.RRset]:
    out = []
    for rrset in rrsets:
        if rrset.ttl > cap:
            rrset = rrset.copy()
            rrset.ttl = cap
        out.append(rrset)
    return out


def _aged(rrsets: list[dns.rrset.RRset], age: int) -> list[dns.rrset.RRset]:
    if age <= 0:
        return rrsets
    out = []
    for rrset in rrsets:
        rrset = rrset.copy()
        rrset.ttl = max(0, rrset.ttl - age)
        out.append(rrset)
    return out


def _negative_ttl(authority: list[dns.rrset.RRset]) -> int | None:
    """RFC 2308 section 5: min(SOA TTL, SOA MINIMUM) of the SOA in the authority section."""
    for rrset in authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return min(rrset.ttl, rrset[0].minimum, MAX_NEGATIVE_TTL)
    return None


def _walk_chain(qname: dns.name.Name, answer: list[dns.rrset.RRset]
                ) -> tuple[list[dns.name.Name], list[Address], int]:
    cnames = {r.name: r for r in answer if r.rdtype == dns.rdatatype.CNAME and len(r)}
    chain = [qname]
    ttl = MAX_POSITIVE_TTL
    while chain[-1] in cnames and len(chain) <= MAX_CHAIN:
        link = cnames[chain[-1]]
        ttl = min(ttl, link.ttl)
        target = link[0].target
        if target in chain:  # a loop: stop at the first repeat
            break
        chain.append(target)
    addresses: list[Address] = []
    for r in answer:
        if r.name == chain[-1] and r.rdtype in _ADDRESS_TYPES and r.rdclass == dns.rdataclass.IN:
            addresses.extend(ipaddress.ip_address(rd.address) for rd in r)
            ttl = min(ttl, r.ttl)
    return chain, addresses, ttl


def _entry_from(response: dns.message.Message, qname: dns.name.Name, size: int, now: float) -> _Entry:
    """Classify an accepted upstream response and decide how long it may be cached."""
    rcode = response.rcode()
    answer = list(response.answer)
    if rcode == dns.rcode.NOERROR and answer:
        ttl = min(min(r.ttl for r in answer), MAX_POSITIVE_TTL)
        neg = _negative_ttl(response.authority)  # CNAME to a name with no data of this type
        if neg is not None:
            ttl = min(ttl, neg)
    elif rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):  # NODATA / NXDOMAIN
        ttl = _negative_ttl(response.authority) or 0
    else:
        ttl = 0
    if response.flags & dns.flags.TC:
        ttl = 0
    answer = _clamped(answer, ttl)
    authority = _clamped(response.authority, ttl)
    additional = _clamped(response.additional, ttl)
    chain, addresses, chain_ttl = _walk_chain(qname, answer)
    return _Entry(rcode=rcode, ad=bool(response.flags & dns.flags.AD), answer=answer,
                  authority=authority, additional=additional, stored=now, ttl=ttl, size=size,
                  chain=chain, addresses=addresses, chain_ttl=min(chain_ttl, ttl))


# --- pending upstream queries --------------------------------------------------------------------

@dataclass(slots=True)
class _Waiter:
    client: object
    query: dns.message.Message
    tcp: bool
    rule: str  # the allow rule for the question name


@dataclass(eq=False, slots=True)
class _Pending:
    id: int
    key: CacheKey
    wire: bytes  # the upstream query
    waiters: list[_Waiter]
    deadline: float  # SERVFAIL after this
    attempt_deadline: float  # next upstream after this
    upstream_index: int
    sent_to: set[Upstream] = field(default_factory=set)
    tcp: bool = False  # re-sent over TCP after a truncated answer


# --- the sans-IO core ----------------------------------------------------------------------------

class DnsStub:
    """Policy-aware forwarding DNS stub, no I/O. See the module docstring."""

    def __init__(self, upstreams: Sequence[Upstream], decide: Callable[[str], Decision],
                 on_answer: OnAnswer | None = None, deny_rcode: str = "REFUSED",
                 clock: Callable[[], float] = time.monotonic, *,
                 cache_entries: int = CACHE_ENTRIES, cache_bytes: int = CACHE_BYTES,
                 max_pending: int = MAX_PENDING, attempt_timeout: float = ATTEMPT_TIMEOUT,
                 total_timeout: float = TOTAL_TIMEOUT,
                 new_id: Callable[[], int] = lambda: secrets.randbits(16)) -> None:
        if deny_rcode.upper() not in _DENY_RCODES:
            raise ValueError(f"deny_rcode must be REFUSED or NXDOMAIN, not {deny_rcode!r}")
        self.upstreams = [normalize_upstream(h, p) for h, p in upstreams]
        self.decide = decide
        self.on_answer = on_answer
        self.deny_rcode = _DENY_RCODES[deny_rcode.upper()]
        self.clock = clock
        self.max_pending = max_pending
        self.attempt_timeout = attempt_timeout
        self.total_timeout = total_timeout
        self.new_id = new_id
        self.stats = StubStats()
        self._cache = _Cache(cache_entries, cache_bytes)
        self._pending: dict[int, _Pending] = {}  # by upstream id
        self._by_key: dict[CacheKey, _Pending] = {}
        self._timers: list[tuple[float, int, _Pending]] = []  # heap, lazily pruned
        self._seq = itertools.count()
        self._preferred = 0  # index of the upstream that answered last

    # .. inputs ..................................................................................

    def handle_query(self, wire: bytes, client: object, *, tcp: bool = False) -> list[Action]:
        """A message from a sandbox client (``tcp``: it came over TCP, without the length)."""
        self.stats.queries += 1
        if len(wire) < 2:
            return self._malformed(client, None, None, "shorter than a message id")
        if len(wire) > 2 and wire[2] & 0x80:
            return self._malformed(client, None, None, "QR set: a response, not a query")
        if len(wire) > 2 and (wire[2] >> 3) & 0xF != dns.opcode.QUERY:
            return self._malformed(client, _header_reply(wire, dns.rcode.NOTIMP), dns.rcode.NOTIMP,
                                   f"opcode {dns.opcode.to_text((wire[2] >> 3) & 0xF)} not supported")
        try:
            query = dns.message.from_wire(wire)
        except Exception as e:  # noqa: BLE001 - dnspython raises many types (FormError, BadLabelType...)
            return self._malformed(client, _header_reply(wire, dns.rcode.FORMERR),
                                   dns.rcode.FORMERR, f"unparsable: {type(e).__name__}")
        for bad, rcode, echo, reason in _QUERY_CHECKS:
            if bad(query):
                reply = self._skeleton(query, rcode).to_wire() if echo else None
                if reply is None or len(reply) > UDP_CLASSIC_SIZE:
                    reply = _header_reply(wire, rcode)
                return self._malformed(client, reply, rcode, reason, query)

        q = query.question[0]
        name = name_text(q.name)
        decision = self._decide(name)
        if decision.verdict != "allow":
            return self._deny(_Waiter(client, query, tcp, decision.rule), name, decision.rule, None)

        waiter = _Waiter(client, query, tcp, decision.rule)
        do = bool(query.ednsflags & dns.flags.DO) if query.edns >= 0 else False
        key: CacheKey = (q.name, q.rdtype, q.rdclass, do, bool(query.flags & dns.flags.CD))
        now = self.clock()
        entry = self._cache.get(key, now)
        if entry is not None:
            self.stats.cache_hits += 1
            return self._serve(waiter, entry, now, "cached")

        pending = self._by_key.get(key)
        if pending is not None:
            if len(pending.waiters) >= MAX_WAITERS:
                return self._servfail([waiter], "too many clients waiting for the same query")
            pending.waiters.append(waiter)  # a TCP waiter gets a TC answer refetched over TCP
            return []
        if not self.upstreams:
            return self._servfail([waiter], "no upstream resolvers configured")
        if len(self._pending) >= self.max_pending:
            return self._servfail([waiter], f"{self.max_pending} upstream queries in flight")
        return self._start(key, waiter, now)

    def handle_upstream_response(self, wire: bytes, upstream: Upstream, *,
                                 tcp: bool = False) -> list[Action]:
        """A message from upstream resolver ``upstream`` (as ``normalize_upstream`` spells it)."""
        if len(wire) < 12:
            self.stats.dropped_responses += 1
            return []
        pending = self._pending.get(int.from_bytes(wire[:2], "big"))
        if pending is None:  # unknown id: late duplicate or a guess; counted, not an event
            self.stats.dropped_responses += 1
            return []
        if upstream not in pending.sent_to:
            return self._drop(pending, f"response from {upstream[0]}:{upstream[1]}, "
                                       "which was not asked")
        qname, qtype, qclass = pending.key[0], pending.key[1], pending.key[2]
        try:
            response = dns.message.from_wire(wire)
        except Exception as e:  # noqa: BLE001 - as for queries
            return self._drop(pending, f"unparsable response from {upstream[0]}: {type(e).__name__}")
        if (not response.flags & dns.flags.QR or response.opcode() != dns.opcode.QUERY
                or len(response.question) != 1
                or (response.question[0].name, response.question[0].rdtype,
                    response.question[0].rdclass) != (qname, qtype, qclass)):
            return self._drop(pending, f"response from {upstream[0]} does not match the question")

        rcode = response.rcode()
        now = self.clock()
        if rcode in _TRY_NEXT_RCODES:
            untried = [i for i, u in enumerate(self.upstreams) if u not in pending.sent_to]
            if untried:
                return self._send(pending, untried[0], now)
        else:
            self._preferred = self.upstreams.index(upstream)  # new queries start with it

        actions: list[Action] = []
        if response.flags & dns.flags.TC and not tcp:
            tcp_waiters = [w for w in pending.waiters if w.tcp]
            udp_waiters = [w for w in pending.waiters if not w.tcp]
            entry = _entry_from(response, qname, len(wire), now)
            for w in udp_waiters:  # passed on truncated: the client retries over TCP
                actions += self._serve(w, entry, now, "truncated upstream answer", truncated=True)
            if tcp_waiters:
                pending.waiters = tcp_waiters
                pending.tcp = True
                actions += self._send(pending, self.upstreams.index(upstream), now)
                return actions
            self._finish(pending)
            return actions

        self._finish(pending)
        entry = _entry_from(response, qname, len(wire), now)
        self._cache.put(pending.key, entry)
        for w in pending.waiters:
            actions += self._serve(w, entry, now, "")
        return actions

    def tick(self, now: float | None = None) -> list[Action]:
        """Retries and timeouts due at ``now`` (default: ``clock()``)."""
        if now is None:
            now = self.clock()
        actions: list[Action] = []
        while self._timers and self._timers[0][0] <= now:
            when, _, pending = heapq.heappop(self._timers)
            if self._pending.get(pending.id) is not pending or when != pending.attempt_deadline:
                continue  # finished, or rescheduled since
            if now >= pending.deadline:
                self._finish(pending)
                actions += self._servfail(pending.waiters, "no answer from the upstream resolvers "
                                          f"within {self.total_timeout:g} s",
                                          ede=dns.edns.EDECode.NO_REACHABLE_AUTHORITY)
            else:
                nxt = (pending.upstream_index + 1) % len(self.upstreams)
                actions += self._send(pending, nxt, now)
        return actions

    def next_deadline(self) -> float | None:
        """When ``tick`` has work to do next (``clock`` time), or None."""
        while self._timers:
            when, _, pending = self._timers[0]
            if self._pending.get(pending.id) is pending and when == pending.attempt_deadline:
                return when
            heapq.heappop(self._timers)
        return None

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    # .. upstream queries ........................................................................

    def _start(self, key: CacheKey, waiter: _Waiter, now: float) -> list[Action]:
        qname, rdtype, rdclass, do, cd = key
        for _ in range(16):  # a free id; the table holds at most 1024 of 65536
            qid = self.new_id() & 0xFFFF
            if qid not in self._pending:
                break
        else:
            return self._servfail([waiter], "no free upstream query id")
        query = dns.message.make_query(qname, rdtype, rdclass, use_edns=0, payload=EDNS_PAYLOAD,
                                       want_dnssec=do)
        query.id = qid
        if cd:
            query.flags |= dns.flags.CD
        pending = _Pending(id=qid, key=key, wire=query.to_wire(), waiters=[waiter],
                           deadline=now + self.total_timeout, attempt_deadline=now,
                           upstream_index=self._preferred % len(self.upstreams))
        self._pending[qid] = pending
        self._by_key[key] = pending
        self.stats.forwarded += 1
        return self._send(pending, pending.upstream_index, now)

    def _send(self, pending: _Pending, index: int, now: float) -> list[Action]:
        upstream = self.upstreams[index]
        pending.upstream_index = index
        pending.sent_to.add(upstream)
        pending.attempt_deadline = min(now + self.attempt_timeout, pending.deadline)
        heapq.heappush(self._timers, (pending.attempt_deadline, next(self._seq), pending))
        return [SendUpstream(upstream, pending.wire, tcp=pending.tcp)]

    def _finish(self, pending: _Pending) -> None:
        del self._pending[pending.id]
        if self._by_key.get(pending.key) is pending:
            del self._by_key[pending.key]

    def _drop(self, pending: _Pending, detail: str) -> list[Action]:
        self.stats.dropped_responses += 1
        q = pending.key
        return [Event("drop", name_text(q[0]), dns.rdatatype.to_text(q[1]), None, None, None,
                      detail)]

    # .. replies .................................................................................

    def _decide(self, name: str) -> Decision:
        try:
            return self.decide(name)
        except Exception as e:  # a policy bug must fail closed and loud, not kill the stub
            log.exception("dns: decide(%r) failed", name)
            return Decision("deny", f"internal error: {type(e).__name__}")

    def _skeleton(self, query: dns.message.Message, rcode: int) -> dns.message.Message:
        """A reply to ``query``: its id and question, QR RA, RD and CD copied, EDNS if it had EDNS."""
        resp = dns.message.Message(id=query.id)
        resp.flags = dns.flags.QR | dns.flags.RA | (query.flags & (dns.flags.RD | dns.flags.CD))
        resp.question = list(query.question)
        if query.edns >= 0:
            resp.use_edns(0, query.ednsflags & dns.flags.DO, EDNS_PAYLOAD)
        resp.set_rcode(rcode)
        return resp

    @staticmethod
    def _with_ede(resp: dns.message.Message, code: int, text: str) -> dns.message.Message:
        if resp.edns >= 0:
            resp.use_edns(0, resp.ednsflags, EDNS_PAYLOAD,
                          options=[*resp.options, dns.edns.EDEOption(code, text)])
        return resp

    @staticmethod
    def _render(resp: dns.message.Message, waiter: _Waiter) -> bytes:
        """``resp`` as wire within the client's size limit, else emptied with TC set."""
        q = waiter.query
        if waiter.tcp:
            limit = TCP_MAX_MESSAGE
        elif q.edns >= 0:
            limit = max(UDP_CLASSIC_SIZE, min(q.payload, UDP_MAX_MESSAGE))
        else:
            limit = UDP_CLASSIC_SIZE
        try:
            return resp.to_wire(max_size=limit)
        except dns.exception.TooBig:
            resp.answer, resp.authority, resp.additional = [], [], []
            resp.flags |= dns.flags.TC
        try:
            return resp.to_wire(max_size=limit)
        except dns.exception.TooBig:  # cannot happen (a question fits in 512); header if it does
            return struct.pack("!HHHHHH", resp.id, resp.flags | (resp.rcode() & 0xF), 0, 0, 0, 0)

    def _serve(self, waiter: _Waiter, entry: _Entry, now: float, detail: str, *,
               truncated: bool = False) -> list[Action]:
        """Answer ``waiter`` from ``entry``: check the CNAME chain, record addresses, reply."""
        for link in entry.chain[1:]:
            link_name = name_text(link)
            decision = self._decide(link_name)
            if decision.verdict != "allow":
                return self._deny(waiter, name_text(entry.chain[0]), decision.rule, link_name)
        age = int(now - entry.stored)
        if entry.addresses and self.on_answer is not None and not truncated:
            try:
                self.on_answer([name_text(n) for n in entry.chain], list(entry.addresses),
                               float(max(0, entry.chain_ttl - age)))
            except Exception as e:  # the engine could not record the mapping: do not answer
                log.exception("dns: on_answer failed")
                return self._servfail([waiter], f"recording the answer failed: {type(e).__name__}")
        resp = self._skeleton(waiter.query, entry.rcode)
        if entry.ad and (waiter.query.flags & dns.flags.AD or waiter.query.ednsflags & dns.flags.DO):
            resp.flags |= dns.flags.AD
        if truncated:
            resp.flags |= dns.flags.TC
        else:
            resp.answer = _aged(entry.answer, age)
            resp.authority = _aged(entry.authority, age)
            resp.additional = _aged(entry.additional, age)
        wire = self._render(resp, waiter)
        q = waiter.query.question[0]
        return [Reply(waiter.client, wire),
                Event("answer", name_text(q.name), dns.rdatatype.to_text(q.rdtype), waiter.rule,
                      "allow", dns.rcode.to_text(entry.rcode), detail, waiter.client)]

    def _deny(self, waiter: _Waiter, name: str, rule: str, via: str | None) -> list[Action]:
        self.stats.denied += 1
        resp = self._with_ede(self._skeleton(waiter.query, self.deny_rcode),
                              dns.edns.EDECode.BLOCKED, _blocked_text(rule, via))
        q = waiter.query.question[0]
        detail = f"CNAME chain reaches {via}" if via is not None else ""
        return [Reply(waiter.client, self._render(resp, waiter)),
                Event("deny", name, dns.rdatatype.to_text(q.rdtype), rule, "deny",
                      dns.rcode.to_text(self.deny_rcode), detail, waiter.client)]

    def _servfail(self, waiters: list[_Waiter], reason: str,
                  ede: int = dns.edns.EDECode.OTHER) -> list[Action]:
        actions: list[Action] = []
        for w in waiters:
            self.stats.servfail += 1
            resp = self._with_ede(self._skeleton(w.query, dns.rcode.SERVFAIL), ede, reason)
            q = w.query.question[0]
            actions += [Reply(w.client, self._render(resp, w)),
                        Event("servfail", name_text(q.name), dns.rdatatype.to_text(q.rdtype),
                              w.rule, "allow", "SERVFAIL", reason, w.client)]
        return actions

    def _malformed(self, client: object, reply: bytes | None, rcode: int | None, reason: str,
                   query: dns.message.Message | None = None) -> list[Action]:
        self.stats.malformed += 1
        name = qtype = None
        if query is not None and len(query.question) == 1:
            name = name_text(query.question[0].name)
            qtype = dns.rdatatype.to_text(query.question[0].rdtype)
        event = Event("malformed", name, qtype, None, None,
                      None if rcode is None else dns.rcode.to_text(rcode), reason, client)
        return [event] if reply is None else [Reply(client, reply), event]


# --- the asyncio shell ---------------------------------------------------------------------------

class _UdpClient:
    __slots__ = ("peer", "reply")

    def __init__(self, reply: Callable[[bytes], None], peer: object) -> None:
        self.reply = reply
        self.peer = peer

    def send(self, wire: bytes) -> None:
        self.reply(wire)


class _TcpClient:
    __slots__ = ("closed", "peer", "writer")

    def __init__(self, writer: asyncio.StreamWriter, peer: object) -> None:
        self.writer = writer
        self.peer = peer
        self.closed = False

    def send(self, wire: bytes) -> None:
        if self.closed:
            return
        self.writer.write(len(wire).to_bytes(2, "big") + wire)
        if self.writer.transport.get_write_buffer_size() > TCP_MAX_BACKLOG:
            log.info("dns: TCP client %s does not read its answers; closing", self.peer)
            self.closed = True
            self.writer.transport.abort()


class DnsServer:
    """asyncio shell around a ``DnsStub``: see "API" in the module docstring.

    ``on_event(event, peer)`` receives every ``Event`` with the ``peer`` its client was given
    (None for upstream-side events).  The stub's clock must be ``time.monotonic`` (the loop's).
    """

    def __init__(self, stub: DnsStub, loop: asyncio.AbstractEventLoop | None = None, *,
                 on_event: Callable[[Event, object], None] | None = None,
                 tcp_idle_timeout: float = TCP_IDLE_TIMEOUT) -> None:
        self.stub = stub
        self.loop = loop
        self.on_event = on_event
        self.tcp_idle_timeout = tcp_idle_timeout
        self._udp: dict[int, socket.socket] = {}  # upstream sockets, by address family
        self._tasks: set[asyncio.Task] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closed = False

    def start(self) -> None:
        """Open the upstream UDP sockets now (in this process's netns, i.e. the host's), one per
        address family the upstreams use.  Optional: a socket is otherwise opened on first use."""
        for host, _ in self.stub.upstreams:
            self._upstream_socket(socket.AF_INET6 if ":" in host else socket.AF_INET)

    def close(self) -> None:
        """Stop: the timer, the upstream sockets, the upstream TCP queries.  Client TCP
        connections end when their ``handle_tcp`` notices (it checks before each read)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for sock in self._udp.values():
            if self.loop is not None:
                self.loop.remove_reader(sock.fileno())
            sock.close()
        self._udp.clear()
        for task in self._tasks:
            task.cancel()

    async def __aenter__(self) -> Self:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # .. sandbox side ............................................................................

    def serve_udp_datagram(self, data: bytes, reply: Callable[[bytes], None],
                           peer: object = None) -> None:
        """One datagram from the sandbox; ``reply(wire)`` sends an answer back to its sender."""
        self._run(self.stub.handle_query(data, _UdpClient(reply, peer)))

    async def handle_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         peer: object = None) -> None:
        """Serve one client TCP connection (RFC 1035 4.2.2 / RFC 7766 framing, pipelining) until
        the client closes it or stays idle for ``tcp_idle_timeout``; closes ``writer``.  ``peer``
        defaults to the socket's peer address."""
        if peer is None:
            peer = writer.get_extra_info("peername")
        client = _TcpClient(writer, peer)
        try:
            while not client.closed and not self._closed:
                try:
                    async with asyncio.timeout(self.tcp_idle_timeout):
                        size = int.from_bytes(await reader.readexactly(2), "big")
                        data = await reader.readexactly(size)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    break
                self._run(self.stub.handle_query(data, client, tcp=True))
        finally:
            client.closed = True
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    # .. driving the core ........................................................................

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            try:
                if isinstance(action, Reply):
                    action.client.send(action.wire)
                elif isinstance(action, SendUpstream):
                    self._send_upstream(action)
                elif self.on_event is not None:
                    self.on_event(action, getattr(action.client, "peer", None))
            except Exception:  # one failed send (or a bug) must not lose the other actions
                log.exception("dns: %s failed", type(action).__name__)
        self._schedule()

    def _send_upstream(self, action: SendUpstream) -> None:
        if self._closed:
            return
        if action.tcp:
            task = asyncio.ensure_future(self._query_tcp(action.upstream, action.wire))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        sock = self._upstream_socket(socket.AF_INET6 if ":" in action.upstream[0] else socket.AF_INET)
        if sock is None:
            return  # the stub times out and tries the next upstream
        try:
            sock.sendto(action.wire, action.upstream)
        except OSError as e:  # buffer full, unreachable: the stub's timers retry
            log.debug("dns: send to upstream %s failed: %s", action.upstream, e)

    def _upstream_socket(self, family: socket.AddressFamily) -> socket.socket | None:
        sock = self._udp.get(family)
        if sock is not None or self._closed:
            return sock
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        except OSError as e:  # e.g. no IPv6 on the host: those upstreams time out
            sock.close()
            log.warning("dns: no upstream socket for %s: %s", family.name, e)
            return None
        self.loop.add_reader(sock.fileno(), self._on_upstream_readable, sock)
        self._udp[family] = sock
        return sock

    def _on_upstream_readable(self, sock: socket.socket) -> None:
        for _ in range(UPSTREAM_READS_PER_WAKEUP):
            try:
                data, addr = sock.recvfrom(TCP_MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # an ICMP error for an earlier send; the stub's timers cover it
                log.debug("dns: upstream socket: %s", e)
                continue
            try:
                upstream = normalize_upstream(addr[0], addr[1])
            except ValueError:
                continue
            self._run(self.stub.handle_upstream_response(data, upstream))

    async def _query_tcp(self, upstream: Upstream, wire: bytes) -> None:
        try:
            async with asyncio.timeout(self.stub.total_timeout):
                reader, writer = await asyncio.open_connection(upstream[0], upstream[1])
                try:
                    writer.write(len(wire).to_bytes(2, "big") + wire)
                    await writer.drain()
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    data = await reader.readexactly(size)
                finally:
                    writer.close()
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            log.debug("dns: TCP query to %s failed: %s", upstream, e)
            return  # the stub's timers move on to the next upstream
        except Exception:  # a bug here must not go unnoticed in a dropped task
            log.exception("dns: TCP query to %s failed", upstream)
            return
        self._run(self.stub.handle_upstream_response(data, upstream, tcp=True))

    def _schedule(self) -> None:
        if self._closed or self.loop is None:
            return
        when = self.stub.next_deadline()
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._run(self.stub.tick(self.loop.time() if self.loop else None))


__all__ = ["Action", "DnsServer", "DnsStub", "Event", "Reply", "SendUpstream", "StubStats",
           "name_text", "normalize_upstream"]
