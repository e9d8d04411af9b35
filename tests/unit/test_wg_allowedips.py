"""Cryptokey routing: longest-prefix match over each peer's AllowedIPs, checked against brute force."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.engine.wireguard.allowedips import AllowedIPs


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_longest_prefix_wins_in_both_families() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("0.0.0.0/0", "default")
    table.insert("10.0.0.0/8", "corp")
    table.insert("10.1.0.0/16", "lab")
    table.insert("10.1.2.3/32", "host")
    table.insert("::/0", "default6")
    table.insert("2001:db8::/32", "doc")
    assert table.lookup(ip("192.0.2.1")) == "default"
    assert table.lookup(ip("10.200.0.1")) == "corp"
    assert table.lookup(ip("10.1.9.9")) == "lab"
    assert table.lookup(ip("10.1.2.3")) == "host"
    assert table.lookup(ip("10.1.2.4")) == "lab"
    assert table.lookup(ip("2001:db8::1")) == "doc"
    assert table.lookup(ip("2001:db9::1")) == "default6"
    assert len(table) == 6


def test_families_are_separate_and_empty_table_has_no_peer() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    assert table.lookup(ip("0.0.0.0")) is None
    table.insert("0.0.0.0/0", "v4")
    assert table.lookup(ip("::")) is None
    assert table.lookup(ip("::ffff:10.0.0.1")) is None  # a v4-mapped address is IPv6 here, as in wg


def test_lookup_takes_packed_bytes_from_packet_headers() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("192.0.2.0/24", "a")
    table.insert("2001:db8::/48", "b")
    header = bytes(12) + bytes([192, 0, 2, 77]) + bytes(4)
    assert table.lookup(header[12:16]) == "a"
    assert table.lookup(memoryview(header)[12:16]) == "a"
    assert table.lookup(bytearray(ip("2001:db8::5").packed)) == "b"
    with pytest.raises(ValueError, match="4 or 16 bytes, not 5"):
        table.lookup(b"\x00" * 5)


def test_host_bits_are_masked_like_wg() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("10.1.2.3/8", "a")
    assert table.entries("a") == [ipaddress.ip_network("10.0.0.0/8")]
    assert table.lookup(ip("10.9.9.9")) == "a"


def test_inserting_a_prefix_another_peer_holds_moves_it() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("10.0.0.0/8", "a")
    table.insert("10.0.0.0/24", "a")
    table.insert(ipaddress.ip_network("10.0.0.0/8"), "b")
    assert table.lookup(ip("10.5.0.0")) == "b"
    assert table.lookup(ip("10.0.0.5")) == "a"
    assert table.entries("a") == [ipaddress.ip_network("10.0.0.0/24")]
    assert table.entries("b") == [ipaddress.ip_network("10.0.0.0/8")]
    table.insert("10.0.0.0/24", "b")
    assert table.entries("a") == [] and sorted(table.peers()) == ["b"]


def test_remove_peer_and_remove() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    for net in ("10.0.0.0/8", "::/0", "192.0.2.0/24"):
        table.insert(net, "a")
    table.insert("10.0.0.0/16", "b")
    assert table.entries("a") == [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "192.0.2.0/24", "::/0")]
    table.remove_peer("a")
    table.remove_peer("never-there")
    assert table.lookup(ip("10.1.0.0")) is None and table.lookup(ip("10.0.1.0")) == "b"
    assert table.lookup(ip("::1")) is None and table.entries("a") == []
    assert table.remove("10.0.0.0/16") == "b" and table.remove("10.0.0.0/16") is None
    assert len(table) == 0 and table.peers() == []


def test_clear_and_none_peer() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("0.0.0.0/0", "a")
    table.clear()
    assert table.lookup(ip("1.2.3.4")) is None and len(table) == 0
    with pytest.raises(ValueError):
        table.insert("0.0.0.0/0", None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Against a brute-force reference: a dict network -> peer, the longest containing network wins


def _v4_network(bits: int, length: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network((bits, length), strict=False)


def _v6_network(bits: int, length: int) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network((bits, length), strict=False)


# Addresses from a small pool of high bits so that prefixes nest and collide often.
_v4_bits = st.integers(0, 15).map(lambda n: n << 28) | st.integers(0, 2**32 - 1)
_v6_bits = st.integers(0, 15).map(lambda n: n << 124) | st.integers(0, 2**128 - 1)
_networks = st.one_of(
    st.builds(_v4_network, _v4_bits, st.sampled_from([0, 1, 2, 3, 4, 8, 16, 24, 31, 32])),
    st.builds(_v6_network, _v6_bits, st.sampled_from([0, 1, 2, 4, 64, 127, 128])),
)
_addresses = st.one_of(_v4_bits.map(ipaddress.IPv4Address), _v6_bits.map(ipaddress.IPv6Address))
_peers = st.sampled_from("abcd")
_operations = st.lists(st.one_of(
    st.tuples(st.just("insert"), _networks, _peers),
    st.tuples(st.just("remove_peer"), st.none(), _peers),
    st.tuples(st.just("remove"), _networks, st.none()),
), max_size=40)


def _reference_lookup(ref: dict, address) -> str | None:  # type: ignore[type-arg]
    matches = [net for net in ref if net.version == address.version and address in net]
    return ref[max(matches, key=lambda n: n.prefixlen)] if matches else None


@settings(max_examples=300)
@given(_operations, st.lists(_addresses, max_size=20))
def test_matches_brute_force(operations: list, probes: list) -> None:  # type: ignore[type-arg]
    table: AllowedIPs[str] = AllowedIPs()
    ref: dict = {}  # type: ignore[type-arg]
    for op, net, peer in operations:
        if op == "insert":
            table.insert(net, peer)
            ref[net] = peer
        elif op == "remove_peer":
            table.remove_peer(peer)
            ref = {n: p for n, p in ref.items() if p != peer}
        else:
            assert table.remove(net) == ref.pop(net, None)
    probes += [net.network_address for net in ref] + [net.broadcast_address for net in ref]
    for address in probes:
        expected = _reference_lookup(ref, address)
        assert table.lookup(address) == expected
        assert table.lookup(address.packed) == expected
    for peer in "abcd":
        assert table.entries(peer) == sorted((n for n, p in ref.items() if p == peer), key=lambda n: (n.version, n))
    assert len(table) == len(ref) and sorted(table.peers()) == sorted(set(ref.values()))


def test_cached_answers_follow_every_change_to_the_table() -> None:
    from tether.engine.wireguard.allowedips import CACHED_ADDRESSES

    table: AllowedIPs[str] = AllowedIPs()
    address = bytes([10, 0, 0, 5])
    assert table.lookup(address) is None  # a cached "no peer"...
    table.insert("10.0.0.0/8", "wide")
    assert table.lookup(address) == "wide"  # ...forgotten on insert
    table.insert("10.0.0.0/24", "narrow")
    assert table.lookup(address) == "narrow"
    table.insert("10.0.0.0/24", "moved")  # a prefix taken by another peer
    assert table.lookup(address) == "moved"
    assert table.remove("10.0.0.0/24") == "moved"
    assert table.lookup(address) == "wide"
    table.remove_peer("wide")
    assert table.lookup(address) is None
    table.insert("0.0.0.0/0", "default")
    assert table.lookup(address) == "default"
    table.clear()
    assert table.lookup(address) is None
    # the cache stays bounded, and answers stay right past its size
    table.insert("0.0.0.0/0", "default")
    table.insert("10.0.0.0/8", "wide")
    for n in range(CACHED_ADDRESSES + 10):
        assert table.lookup(n.to_bytes(4, "big")) == "default"
        assert table.lookup(bytes([10]) + n.to_bytes(3, "big")) == "wide"
    assert len(table._cache) <= CACHED_ADDRESSES
    assert table.lookup(bytearray(address)) == "wide" and table.lookup(memoryview(address)) == "wide"
