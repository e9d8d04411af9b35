"""Which names did the DNS stub serve for an address, to *this* sandbox (pure; clock injectable).

Domain rules (``tether.policy``) bind to connections through the DNS stub: when the stub answers
the sandbox with ``example.test A 203.0.113.10, TTL 60``, the engine records that mapping here,
and a later connection to 203.0.113.10 is evaluated with the names ``names_for(203.0.113.10)``
returns.  An address the sandbox never resolved has no names and matches only IP rules.

Theory of operation
-------------------
* One ``NameMap`` per sandbox: what sandbox A resolved says nothing about sandbox B.
* A mapping (address, name) is valid from ``record`` until ``record time + ttl + grace``: the TTL
  the stub served (a well-behaved client may use the answer that long) plus a grace period for
  clients that connect a little after the TTL ran out (a connection started from a cached answer
  at second 59 of 60, a slow start-up, a resolver that rounds up).  Recording the same mapping
  again never shortens it (the sandbox may still hold the earlier, longer answer).  TTLs are
  clamped to 0..``MAX_TTL`` (one week, as resolvers do, RFC 8767), so a hostile upstream cannot
  pin a mapping forever.
* CNAME chains: for ``a.test CNAME b.test``, ``b.test A 203.0.113.10`` the stub calls
  ``record_chain(["a.test", "b.test"], [203.0.113.10], ttl)``; ``names_for`` then returns both, the
  name the sandbox asked for first.  Every name on the chain is in play for the policy, so a deny
  of ``b.test`` cannot be bypassed by asking for ``a.test``.
* ``names_for`` lists the names whose mapping is still valid, most recently recorded first.
* Expired mappings are purged lazily (a heap ordered by expiry, on every call); when more than
  ``limit`` mappings exist, the least recently recorded ones are evicted, so memory is bounded
  whatever the sandbox resolves.
* Names are normalised like ``tether.policy`` does: ASCII letters lower-cased (only ASCII: the
  Kelvin sign must not become ``k``), one final dot dropped.  Addresses are normalised too:
  IPv4-mapped IPv6 (``::ffff:a.b.c.d``) is the IPv4 address, an IPv6 zone index is dropped.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import math
import string
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Address, IPv6Address

IPAddress = IPv4Address | IPv6Address

MAX_TTL = 7 * 24 * 3600.0  # one week (RFC 8767 suggests capping TTLs at 7 days)

_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def normalize_name(name: str) -> str:
    """``"WWW.Example.TEST."`` -> ``"www.example.test"``: ASCII lower case, one final dot dropped."""
    if not isinstance(name, str):
        raise TypeError(f"a name must be a str, not {type(name).__name__}")
    return name.translate(_ASCII_LOWER).removesuffix(".")


def normalize_address(addr: IPAddress | str) -> IPAddress:
    """An address as the policy sees it: ``::ffff:a.b.c.d`` -> ``a.b.c.d``, no IPv6 zone index."""
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id is not None:
            return IPv6Address(int(ip))
    return ip


def _clamp_ttl(ttl: float) -> float:
    ttl = float(ttl)
    if math.isnan(ttl) or ttl < 0:
        return 0.0
    return min(ttl, MAX_TTL)


class NameMap:
    """address -> names the DNS stub served for it, each valid for its TTL plus ``grace`` seconds.

    ``clock`` returns seconds (monotonic); ``limit`` bounds the number of (address, name) pairs.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, grace: float = 30.0,
                 limit: int = 65536) -> None:
        if not (isinstance(grace, (int, float)) and math.isfinite(grace) and grace >= 0):
            raise ValueError(f"grace must be a finite number of seconds >= 0, not {grace!r}")
        if not (isinstance(limit, int) and limit >= 1):
            raise ValueError(f"limit must be an int >= 1, not {limit!r}")
        self._clock = clock
        self.grace = float(grace)
        self.limit = limit
        # (address, name) -> expiry; iteration order = record order, least recent first (eviction)
        self._expiry: OrderedDict[tuple[IPAddress, str], float] = OrderedDict()
        # address -> its names, in record order (dict used as an ordered set)
        self._by_addr: dict[IPAddress, dict[str, None]] = {}
        # (expiry, tie-breaker, key); stale entries (extended or evicted) are skipped when popped
        self._heap: list[tuple[float, int, tuple[IPAddress, str]]] = []
        self._seq = itertools.count()

    # -- recording ------------------------------------------------------------------------------

    def record(self, name: str, addresses: Iterable[IPAddress | str], ttl: float) -> None:
        """The stub answered ``name`` with ``addresses`` (A/AAAA), valid for ``ttl`` seconds."""
        self.record_chain((name,), addresses, ttl)

    def record_chain(self, names: Sequence[str], addresses: Iterable[IPAddress | str], ttl: float) -> None:
        """The stub answered ``names[0]`` through the CNAME chain ``names`` (query name first, the
        owner of the A/AAAA records last) with ``addresses``; every name on the chain maps to every
        address.  ``names_for`` will list them in this order (the asked-for name first)."""
        if isinstance(names, str):
            raise TypeError("names must be a sequence of names, not a single str (use record())")
        # Validate everything before changing anything: bad input records nothing.
        addrs = list(dict.fromkeys(normalize_address(a) for a in addresses))
        chain = [n for n in dict.fromkeys(normalize_name(n) for n in names) if n]
        now = self._clock()
        self._purge(now)
        expiry = now + _clamp_ttl(ttl) + self.grace
        for addr in addrs:
            for name in reversed(chain):  # the query name last = most recent = listed first
                self._put(addr, name, expiry)
        while len(self._expiry) > self.limit:
            key, _ = self._expiry.popitem(last=False)
            self._unindex(key)

    def _put(self, addr: IPAddress, name: str, expiry: float) -> None:
        key = (addr, name)
        old = self._expiry.pop(key, None)
        if old is not None:
            del self._by_addr[addr][name]  # re-inserted below: now the most recent
            if old >= expiry:
                self._expiry[key] = old
                self._by_addr[addr][name] = None
                return
        self._expiry[key] = expiry
        self._by_addr.setdefault(addr, {})[name] = None
        heapq.heappush(self._heap, (expiry, next(self._seq), key))
        if len(self._heap) > 2 * len(self._expiry) + 1024:  # many extensions: drop stale entries
            self._heap = [(e, next(self._seq), k) for k, e in self._expiry.items()]
            heapq.heapify(self._heap)

    # -- lookup ---------------------------------------------------------------------------------

    def names_for(self, addr: IPAddress | str) -> tuple[str, ...]:
        """Names still validly mapped to ``addr``, most recently recorded first (may be empty)."""
        now = self._clock()
        self._purge(now)
        ip = normalize_address(addr)
        names = self._by_addr.get(ip)
        if not names:
            return ()
        return tuple(n for n in reversed(names) if self._expiry[(ip, n)] > now)

    def __len__(self) -> int:
        """Number of (address, name) mappings held (expired ones may linger until the next call)."""
        return len(self._expiry)

    def purge(self) -> int:
        """Drop every expired mapping now; return how many were dropped."""
        before = len(self._expiry)
        self._purge(self._clock())
        return before - len(self._expiry)

    def clear(self) -> None:
        self._expiry.clear()
        self._by_addr.clear()
        self._heap.clear()

    # -- internals ------------------------------------------------------------------------------

    def _purge(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            expiry, _, key = heapq.heappop(heap)
            if self._expiry.get(key) == expiry:  # else extended or evicted since: stale entry
                del self._expiry[key]
                self._unindex(key)

    def _unindex(self, key: tuple[IPAddress, str]) -> None:
        addr, name = key
        names = self._by_addr[addr]
        del names[name]
        if not names:
            del self._by_addr[addr]
