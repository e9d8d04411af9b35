"""Cryptokey routing: which peer owns an IP address, by longest-prefix match over AllowedIPs (sans-IO).

Theory of operation
-------------------
WireGuard ties routing to keys: each peer has a set of prefixes (its ``AllowedIPs``).  An outgoing
packet goes to the peer whose prefix is the longest match for its *destination*; an incoming packet,
once decrypted with a peer's session, is accepted only if the longest match for its *source* is that
same peer.  A prefix belongs to at most one peer: inserting a prefix another peer holds moves it
(``wg set ... allowed-ips`` semantics), so a table never has two answers.

**Structure.**  The kernel and wireguard-go walk a binary trie, bit by bit.  In Python a step costs
far more than a dict probe, so here each address family keeps one dict per prefix length in use,
mapping the masked address (an ``int``) to its peer, plus the list of those lengths, longest first.
A lookup masks the address once per length in use and probes that length's dict; the first hit is
the longest match.  That is at most 33 (IPv4) or 129 (IPv6) probes, so O(prefix length) like a trie,
and in the tables WireGuard sees (a ``/0`` default, a few ``/32``s and ``/24``s) only two or three;
it never depends on the number of peers or prefixes.  Inserting and removing are O(1) plus a sort of
the short length list when a length appears or disappears.

**Cache.**  The data path asks about the same few addresses over and over (one TCP flow's
segments, its ACKs), so answers for address bytes are remembered in a dict (at most
``CACHED_ADDRESSES``, emptied when full) that every change to the table empties: a probe instead of
a dozen Python operations per packet.

Each peer's own prefixes are indexed too, so ``remove_peer`` and ``entries`` cost O(that peer's
prefixes), not a scan of the table.

**Addresses.**  ``lookup`` takes what the data path has: the 4 or 16 address bytes cut from a packet
header (``bytes``, ``bytearray`` or ``memoryview``), or an ``ipaddress`` address.  Networks given to
``insert`` may have host bits set; they are masked, as ``wg`` does.  Peers are any hashable
objects; the table compares them by ``==``/``hash``, so use objects with identity semantics (the
engine's peer state) or immutable keys (a public key's bytes).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Generic, TypeAlias, TypeVar

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
AddressLike: TypeAlias = bytes | bytearray | memoryview | IPAddress

P = TypeVar("P")
_BITS = {4: 32, 6: 128}  # address bits per IP version
_VERSION_OF_LENGTH = {4: 4, 16: 6}  # IP version per packed address length


@dataclass
class _Family(Generic[P]):
    """One address family's table: a dict per prefix length in use."""

    bits: int
    by_length: dict[int, dict[int, P]] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)  # keys of by_length, longest first
    masks: list[int] = field(init=False)  # masks[n]: the top n of ``bits`` bits set

    def __post_init__(self) -> None:
        full = (1 << self.bits) - 1
        self.masks = [full ^ (full >> n) for n in range(self.bits + 1)]

    def put(self, length: int, key: int, peer: P) -> P | None:
        """Set the owner of one prefix; return the previous owner."""
        table = self.by_length.get(length)
        if table is None:
            table = self.by_length[length] = {}
            self.lengths = sorted(self.by_length, reverse=True)
        old = table.get(key)
        table[key] = peer
        return old

    def drop(self, length: int, key: int) -> None:
        table = self.by_length[length]
        del table[key]
        if not table:
            del self.by_length[length]
            self.lengths = sorted(self.by_length, reverse=True)

    def match(self, address: int) -> P | None:
        masks = self.masks
        for length in self.lengths:
            peer = self.by_length[length].get(address & masks[length])
            if peer is not None:
                return peer
        return None


_Prefix: TypeAlias = tuple[int, int, int]  # (IP version, prefix length, masked address as int)


CACHED_ADDRESSES = 4096


class AllowedIPs(Generic[P]):
    """A cryptokey routing table: prefixes (IPv4 and IPv6) to peers, looked up by longest match."""

    def __init__(self) -> None:
        self.clear()

    def insert(self, network: IPNetwork | str, peer: P) -> None:
        """Route ``network`` (host bits masked) to ``peer``, taking it from any peer that had it."""
        if peer is None:
            raise ValueError("peer must not be None (None is lookup's 'no peer')")
        prefix = _prefix(network)
        version, length, key = prefix
        old = self._families[version].put(length, key, peer)
        self._cache.clear()
        if old is not None:
            self._forget(old, prefix)
        self._of_peer.setdefault(peer, set()).add(prefix)

    def remove(self, network: IPNetwork | str) -> P | None:
        """Unroute ``network`` (exactly that prefix); return the peer that had it, if any."""
        prefix = _prefix(network)
        version, length, key = prefix
        peer = self._families[version].by_length.get(length, {}).get(key)
        if peer is not None:
            self._families[version].drop(length, key)
            self._forget(peer, prefix)
            self._cache.clear()
        return peer

    def remove_peer(self, peer: P) -> None:
        """Unroute every prefix of ``peer`` (a peer that is not in the table is fine)."""
        for version, length, key in self._of_peer.pop(peer, ()):
            self._families[version].drop(length, key)
        self._cache.clear()

    def lookup(self, address: AddressLike) -> P | None:
        """The peer whose prefix is the longest match for ``address``, or None."""
        if type(address) is bytes:
            try:
                return self._cache[address]
            except KeyError:
                pass
        if isinstance(address, (bytes, bytearray, memoryview)):
            version = _VERSION_OF_LENGTH.get(len(address))
            if version is None:
                raise ValueError(f"an IP address is 4 or 16 bytes, not {len(address)}")
            peer = self._families[version].match(int.from_bytes(address, "big"))
            if type(address) is bytes:
                if len(self._cache) >= CACHED_ADDRESSES:
                    self._cache.clear()
                self._cache[address] = peer
            return peer
        return self._families[address.version].match(int(address))

    def entries(self, peer: P) -> list[IPNetwork]:
        """The prefixes routed to ``peer``: IPv4 first, each family in address order."""
        return sorted((_network(p) for p in self._of_peer.get(peer, ())), key=lambda n: (n.version, n))

    def peers(self) -> list[P]:
        """Every peer that has at least one prefix."""
        return list(self._of_peer)

    def clear(self) -> None:
        """Remove every prefix of every peer."""
        self._families: dict[int, _Family[P]] = {v: _Family(bits) for v, bits in _BITS.items()}
        self._of_peer: dict[P, set[_Prefix]] = {}
        self._cache: dict[bytes, P | None] = {}  # address bytes -> lookup's answer

    def __len__(self) -> int:
        return sum(len(prefixes) for prefixes in self._of_peer.values())

    def _forget(self, peer: P, prefix: _Prefix) -> None:
        prefixes = self._of_peer[peer]
        prefixes.discard(prefix)
        if not prefixes:
            del self._of_peer[peer]


def _prefix(network: IPNetwork | str) -> _Prefix:
    net = ipaddress.ip_network(network, strict=False)
    return net.version, net.prefixlen, int(net.network_address)


def _network(prefix: _Prefix) -> IPNetwork:
    version, length, key = prefix
    address = ipaddress.IPv4Address(key) if version == 4 else ipaddress.IPv6Address(key)
    return ipaddress.ip_network((address, length))
