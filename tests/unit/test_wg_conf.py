"""The wg-quick config parser: what it accepts, how it normalises, and every error it reports."""

from __future__ import annotations

import ipaddress
import os
import pickle
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.engine.wireguard.conf import (
    DEFAULT_MTU, ConfError, Endpoint, InterfaceConf, PeerConf, WgConfig, format_conf, load_conf,
    parse_conf,
)
from tether.engine.wireguard.keys import SecretKey, clamp, encode_key, public_key


def key(n: int) -> bytes:
    """A distinct, deterministic private key per n."""
    return clamp(bytes([n]) * 32)


PRIV, PEER1, PEER2, PSK = key(1), key(2), key(3), key(4)
PRIV_T, PSK_T = encode_key(PRIV), encode_key(PSK)
PUB1_T, PUB2_T = encode_key(public_key(PEER1)), encode_key(public_key(PEER2))
SECRETS = [encode_key(k) for k in (PRIV, PEER1, PEER2, PSK)]
ALL_KEYS = SECRETS + [PUB1_T, PUB2_T, encode_key(public_key(PRIV))]

GOOD = f"""\
# a typical wg-quick file
[Interface]
PrivateKey = {PRIV_T}
Address = 10.64.0.2/32, fd00:64::2/128
DNS = 10.64.0.1, 2001:db8::53, corp.example.test
ListenPort = 51820

[Peer]
PublicKey = {PUB1_T}
PresharedKey = {PSK_T}
Endpoint = vpn.example.test:51820
AllowedIPs = 0.0.0.0/0, ::/0
PersistentKeepalive = 25

[Peer]  # a second site
PublicKey = {PUB2_T}
Endpoint = [2001:db8::1]:443
AllowedIPs = 192.0.2.0/24
AllowedIPs = 198.51.100.7
"""


def problems(text: str) -> list[tuple[int | None, str, str]]:
    with pytest.raises(ConfError) as info:
        parse_conf(text, "wg0.conf")
    return [(p.line, p.key, p.message) for p in info.value.problems]


def one_problem(text: str) -> tuple[int | None, str, str]:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


def conf(interface: str = "", peer: str = "", *, private: str = PRIV_T, public: str = PUB1_T) -> str:
    """A minimal valid file with extra lines in each section."""
    return f"[Interface]\nPrivateKey = {private}\n{interface}\n[Peer]\nPublicKey = {public}\n{peer}\n"


# ---------------------------------------------------------------------------------------------
# What a good file gives


def test_a_typical_file() -> None:
    config = parse_conf(GOOD)
    iface = config.interface
    assert iface.private_key == PRIV and isinstance(iface.private_key, SecretKey)
    assert iface.public_key == public_key(PRIV)
    assert iface.addresses == (ipaddress.ip_interface("10.64.0.2/32"), ipaddress.ip_interface("fd00:64::2/128"))
    assert iface.dns == (ipaddress.ip_address("10.64.0.1"), ipaddress.ip_address("2001:db8::53"))
    assert iface.dns_search == ("corp.example.test",)
    assert iface.mtu == DEFAULT_MTU == 1420
    assert iface.listen_port == 51820
    first, second = config.peers
    assert first.public_key == public_key(PEER1) and first.preshared_key == PSK
    assert first.endpoint == Endpoint("vpn.example.test", 51820) and first.endpoint.address is None
    assert first.allowed_ips == (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
    assert first.persistent_keepalive == 25
    assert first.line == 8 and second.line == 15
    assert second.preshared_key is None and second.persistent_keepalive is None
    assert second.endpoint == Endpoint("2001:db8::1", 443)
    assert second.endpoint.address == ipaddress.ip_address("2001:db8::1")
    assert str(second.endpoint) == "[2001:db8::1]:443"
    assert second.allowed_ips == (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("198.51.100.7/32"))


def test_minimal_file_defaults() -> None:
    config = parse_conf(conf())
    assert config.interface == InterfaceConf(PRIV)
    assert config.peers == (PeerConf(public_key(PEER1)),)
    assert config.interface.listen_port is None and config.interface.addresses == ()


def test_syntax_is_forgiving_like_wg_quick() -> None:
    text = (f"\ufeff[interface]\r\n  privatekey={PRIV_T}   # trailing comment\r\n\r\nADDRESS = 10.0.0.2/24\r\n"
            f"#[Peer]\n\t[ PEER ]\r\npublickey\t=\t{PUB1_T}\nallowedips = 10.0.0.0/24 ,10.1.0.0/16\n")
    config = parse_conf(text)
    assert config.interface.addresses == (ipaddress.ip_interface("10.0.0.2/24"),)
    assert [str(n) for n in config.peers[0].allowed_ips] == ["10.0.0.0/24", "10.1.0.0/16"]


def test_repeated_list_keys_add_up_and_duplicates_fold() -> None:
    config = parse_conf(conf("Address = 10.0.0.2\nAddress = fd00::2/64, 10.0.0.2/32\n"
                             "DNS = a.test\nDNS = 10.0.0.1, a.test",
                             "AllowedIPs = 10.0.0.0/8\nAllowedIPs = 10.0.0.0/8, 10.1.2.3/8"))
    assert [str(a) for a in config.interface.addresses] == ["10.0.0.2/32", "fd00::2/64"]
    assert config.interface.dns_search == ("a.test",)
    assert [str(n) for n in config.peers[0].allowed_ips] == ["10.0.0.0/8"]  # host bits masked, as wg


@pytest.mark.parametrize(("line", "expected"), [
    ("Endpoint = 192.0.2.1:51820", Endpoint("192.0.2.1", 51820)),
    ("Endpoint = [::1]:1", Endpoint("::1", 1)),
    ("Endpoint = [fe80::1%eth0]:65535", Endpoint("fe80::1%eth0", 65535)),
    ("Endpoint = host-1.example.test.:51820", Endpoint("host-1.example.test.", 51820)),
    ("Endpoint = localhost:9", Endpoint("localhost", 9)),
])
def test_endpoints(line: str, expected: Endpoint) -> None:
    assert parse_conf(conf(peer=line)).peers[0].endpoint == expected


@pytest.mark.parametrize(("line", "expected"), [
    ("PersistentKeepalive = off", None), ("PersistentKeepalive = OFF", None),
    ("PersistentKeepalive = 0", None), ("PersistentKeepalive = 65535", 65535),
])
def test_keepalive(line: str, expected: int | None) -> None:
    assert parse_conf(conf(peer=line)).peers[0].persistent_keepalive == expected


def test_listen_port_zero_means_any_and_mtu_bounds() -> None:
    assert parse_conf(conf("ListenPort = 0")).interface.listen_port is None
    assert parse_conf(conf("MTU = 576")).interface.mtu == 576
    assert parse_conf(conf("MTU = 65535\nAddress = fd00::1/64")).interface.mtu == 65535


def test_empty_allowed_ips_is_no_route() -> None:
    assert parse_conf(conf(peer="AllowedIPs =")).peers[0].allowed_ips == ()


# ---------------------------------------------------------------------------------------------
# Errors: every one with its line and key, all of them at once


@pytest.mark.parametrize(("interface", "peer", "key", "message"), [
    ("Address = 10.0.0.300/24", "", "Address", "'10.0.0.300/24' is not an IP address"),
    ("Address = 10.0.0.1/24,,10.0.0.2", "", "Address", "empty item"),
    ("DNS = 10.0.0", "", "DNS", "'10.0.0' is not an IP address"),
    ("DNS = bad_name!", "", "DNS", "search domain 'bad_name!' is not a valid DNS name"),
    ("DNS = 1.2.3.4.5", "", "DNS", "is not an IP address"),
    ("MTU = 575", "", "MTU", "MTU 575 is out of range 576..65535"),
    ("MTU = 1500 bytes", "", "MTU", "'1500 bytes' is not a whole number"),
    ("Address = fd00::1/64\nMTU = 1000", "", "MTU",
     "MTU 1000 is below 1280, the least IPv6 works with (Address on line 3 is IPv6)"),
    ("ListenPort = 65536", "", "ListenPort", "port 65536 is out of range 0..65535"),
    ("ListenPort = -1", "", "ListenPort", "'-1' is not a whole number"),
    ("", "Endpoint = 2001:db8::1:51820", "Endpoint", "write an IPv6 endpoint as [address]:port"),
    ("", "Endpoint = 192.0.2.1", "Endpoint", "is not host:port"),
    ("", "Endpoint = 192.0.2.1:0", "Endpoint", "port 0 is out of range 1..65535"),
    ("", "Endpoint = 192.0.2.1:70000", "Endpoint", "port 70000 is out of range"),
    ("", "Endpoint = 192.0.2.1:http", "Endpoint", "'http' is not a whole number"),
    ("", "Endpoint = [192.0.2.1]:53", "Endpoint", "in brackets is not an IPv6 address"),
    ("", "Endpoint = 192.0.2:53", "Endpoint", "'192.0.2' is not an IPv4 address"),
    ("", "Endpoint = bücher.test:53", "Endpoint", "IDNA"),
    ("", "Endpoint = :53", "Endpoint", "not a valid DNS name"),
    ("", "AllowedIPs = 10.0.0.0/33", "AllowedIPs", "'10.0.0.0/33' is not an IP network"),
    ("", "PersistentKeepalive = 65536", "PersistentKeepalive", "interval 65536 is out of range 0..65535"),
    ("", "PersistentKeepalive = on", "PersistentKeepalive", "'on' is not a whole number of seconds, or 'off'"),
    ("PostUp = iptables -I OUTPUT -j DROP", "", "PostUp", "tether runs no hooks"),
    ("PreDown = true", "", "PreDown", "tether runs no hooks"),
    ("Table = off", "", "Table", "host policy routing"),
    ("FwMark = 0x1234", "", "FwMark", "host policy routing"),
    ("SaveConfig = true", "", "SaveConfig", "never writes"),
    ("", "PostUp = x", "PostUp", "tether runs no hooks"),
    ("PublicKey = x", "", "PublicKey", "belongs under [Peer], not [Interface]"),
    ("", "ListenPort = 1", "ListenPort", "belongs under [Interface], not [Peer]"),
    ("", "AllowedIP = 10.0.0.0/8", "AllowedIP", "did you mean AllowedIPs?"),
    ("Foo = bar", "", "", "unknown key in [Interface] (name not shown"),
    ("MTU = 1400\nmtu = 1400", "", "MTU", "given twice in this [Interface] (first on line 3)"),
    ("", "Endpoint = a.test:1\nEndpoint = b.test:1", "Endpoint", "given twice in this [Peer]"),
    ("just words", "", "", "not a 'Key = Value' line"),
])
def test_one_bad_value(interface: str, peer: str, key: str, message: str) -> None:
    """Each case's problem is on its last line."""
    line, got_key, got = one_problem(conf(interface, peer))
    assert (line, got_key) == (3 + interface.count("\n") if interface else 6 + peer.count("\n"), key)
    assert message in got


def test_key_errors_describe_and_never_quote() -> None:
    bad_private = PRIV_T[:-2] + "h="  # non-canonical
    found = problems(conf(private=bad_private, public=PUB1_T[:-1], peer=f"PresharedKey = {PSK_T[1:]}"))
    assert [(line, key) for line, key, _ in found] == [(2, "PrivateKey"), (5, "PublicKey"), (6, "PresharedKey")]
    assert "not canonical" in found[0][2] and "not base64" in found[1][2] and "not base64" in found[2][2]


def test_missing_sections_and_keys() -> None:
    assert problems("") == [
        (None, "[Interface]", "missing: the file needs an [Interface] section with a PrivateKey"),
        (None, "[Peer]", "missing: the file needs at least one [Peer] section (a tunnel with no peer leads nowhere)"),
    ]
    assert problems("[Interface]\nAddress = 10.0.0.1\n[Peer]\nEndpoint = a.test:1\n") == [
        (1, "PrivateKey", "missing: [Interface] needs one (wg genkey makes one)"),
        (3, "PublicKey", "missing: every [Peer] needs the peer's public key"),
    ]


def test_structure_errors() -> None:
    text = f"PrivateKey = {PRIV_T}\n[Interface]\nPrivateKey = {PRIV_T}\n[Peers]\nAnything = here\n" \
           f"[Interface]\n[Peer]\nPublicKey = {PUB1_T}\n[Peer\n[Wat]\n"
    assert problems(text) == [
        (1, "PrivateKey", "outside any section: put it under [Interface] or [Peer]"),
        (4, "", "unknown section [Peers]: expected [Interface] or [Peer]"),
        (6, "[Interface]", "a second [Interface] section (the first is on line 2)"),
        (9, "", "unknown section (name not shown: it might be part of a key): expected [Interface] or [Peer]"),
        (10, "", "unknown section (name not shown: it might be part of a key): expected [Interface] or [Peer]"),
    ]


def test_cross_peer_rules() -> None:
    text = conf(peer="AllowedIPs = 10.0.0.0/8, 0.0.0.0/0") + \
        f"[Peer]\nPublicKey = {PUB1_T}\nAllowedIPs = 10.0.0.0/8\n" \
        f"[Peer]\nPublicKey = {encode_key(public_key(PRIV))}\nAllowedIPs = 10.1.2.3/8, ::/0\n"
    assert problems(text) == [
        (8, "PublicKey", "same key as the [Peer] on line 4"),
        (9, "AllowedIPs", "10.0.0.0/8 is already routed to the [Peer] on line 4 "
                          "(wg would move it to this peer, leaving that one without it)"),
        (11, "PublicKey", "is the interface's own public key (from its PrivateKey), not a peer's"),
        (12, "AllowedIPs", "10.0.0.0/8 is already routed to the [Peer] on line 4 "
                           "(wg would move it to this peer, leaving that one without it)"),
    ]


def test_every_problem_is_reported_in_line_order_with_path() -> None:
    text = "[Interface]\nMTU = 1\nListenPort = x\n[Peer]\nEndpoint = nope\nAllowedIPs = 1.2.3.4/40\n"
    with pytest.raises(ConfError) as info:
        parse_conf(text, "wg0.conf")
    report = str(info.value).splitlines()
    assert [line.split(":")[1] for line in report] == ["1", "2", "3", "4", "5", "6"]
    assert report[1] == "wg0.conf:2: MTU: MTU 1 is out of range 576..65535"
    assert info.value.hint and "wg-quick" in info.value.hint
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value) and again.problems == info.value.problems


BAD_FILES_WITH_KEYS = [
    conf(f"Address = {PRIV_T}"),
    conf(f"DNS = {PRIV_T}"),
    conf(f"MTU = {PRIV_T}"),
    conf(peer=f"Endpoint = {PSK_T}"),
    conf(peer=f"Endpoint = {PSK_T}:51820"),
    conf(peer=f"Endpoint = [{PSK_T}]:1"),
    conf(peer=f"AllowedIPs = {PSK_T}"),
    conf(peer=f"PersistentKeepalive = {PSK_T}"),
    conf(f"{PRIV_T}"),  # a key on a line of its own: "KEY=" reads as an unknown key
    conf(f"{PRIV_T[:-1]} = x"),
    conf(f"{PRIV_T[:20]}"),  # a key that wrapped onto two lines
    conf(f"{PRIV_T[20:]}"),
    conf(f"PrivateKey = {PRIV_T}"),  # twice
    conf(private=PRIV_T + "A"),
    conf(private=PRIV_T[:-2] + "h="),
    conf(public=PSK_T[1:]),
    f"{PRIV_T}\n[Interface]\nPrivateKey={PRIV_T}",
    f"[{PRIV_T}]\n",
    f"[{PRIV_T[:20]}]\n",
    f"PrivateKey = {PRIV_T}\n",
    conf(f"Foo = {PRIV_T}"),
    conf(f"PostUp = echo {PRIV_T} > /tmp/x"),
]


@pytest.mark.parametrize("text", BAD_FILES_WITH_KEYS)
def test_no_error_ever_contains_key_material(text: str) -> None:
    with pytest.raises(ConfError) as info:
        parse_conf(text)
    report = str(info.value) + repr(info.value) + repr(info.value.problems)
    for k in ALL_KEYS:
        for piece in (k, k[:16], k[16:32], k[28:]):
            assert piece not in report, (piece, report)


def test_reprs_and_redacted_never_show_secrets() -> None:
    config = parse_conf(GOOD)
    for shown in (repr(config), str(config), repr(config.interface), repr(config.peers), config.redacted()):
        for secret in SECRETS:
            assert secret not in shown
        assert PRIV.hex() not in shown and repr(PRIV) not in shown and repr(PSK) not in shown
    redacted = config.redacted()
    assert "PrivateKey = (hidden)" in redacted and "PresharedKey = (hidden)" in redacted
    assert f"# PublicKey = {encode_key(public_key(PRIV))}" in redacted
    assert PUB1_T in redacted and PUB2_T in redacted  # public keys are fine to show


def test_hand_built_dataclasses_hide_secrets_and_check_lengths() -> None:
    iface = InterfaceConf(bytes(PRIV))
    peer = PeerConf(public_key(PEER1), preshared_key=bytes(PSK))
    assert isinstance(iface.private_key, SecretKey) and isinstance(peer.preshared_key, SecretKey)
    assert PRIV_T not in repr(WgConfig(iface, (peer,)))
    with pytest.raises(ValueError):
        InterfaceConf(b"short")
    with pytest.raises(ValueError):
        PeerConf(b"\x00" * 31)


def test_format_conf_round_trips_and_strip_leaves_wg_setconf_keys() -> None:
    config = parse_conf(GOOD)
    assert parse_conf(format_conf(config)) == config
    stripped = format_conf(config, strip=True)
    assert not re.search(r"^(Address|DNS|MTU)", stripped, re.M)
    assert parse_conf(stripped).peers == config.peers


# ---------------------------------------------------------------------------------------------
# Generated configs: format then parse gives the same config back


_v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
_v6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
_address = st.one_of(_v4, _v6)
_interface_address = st.one_of(
    st.tuples(_v4, st.integers(0, 32)).map(lambda t: ipaddress.IPv4Interface(t)),
    st.tuples(_v6, st.integers(0, 128)).map(lambda t: ipaddress.IPv6Interface(t)),
)
_network = _interface_address.map(lambda i: i.network)
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_domain = st.lists(_label, min_size=1, max_size=3).map(lambda ls: ".".join(ls + ["test"]))
_key = st.binary(min_size=32, max_size=32)
_endpoint = st.builds(Endpoint, st.one_of(_address.map(str), _domain), st.integers(1, 65535))


@st.composite
def _configs(draw: st.DrawFn) -> WgConfig:
    addresses = draw(st.lists(_interface_address, max_size=3, unique=True))
    v6 = any(a.version == 6 for a in addresses)
    private, *keys = draw(st.lists(_key, min_size=2, max_size=4, unique=True))
    iface = InterfaceConf(
        private_key=private, addresses=tuple(addresses),
        dns=tuple(draw(st.lists(_address, max_size=2, unique=True))),
        dns_search=tuple(draw(st.lists(_domain, max_size=2, unique=True))),
        mtu=draw(st.integers(1280 if v6 else 576, 65535)),
        listen_port=draw(st.none() | st.integers(1, 65535)),
    )
    keys = [k for k in keys if k != iface.public_key] or [bytes(32)]
    claimed = draw(st.lists(_network, max_size=6, unique=True))
    peers = tuple(PeerConf(
        public_key=k,
        preshared_key=draw(st.none() | st.just(bytes(range(32)))),
        endpoint=draw(st.none() | _endpoint),
        allowed_ips=tuple(claimed[i::len(keys)]),
        persistent_keepalive=draw(st.none() | st.integers(1, 65535)),
    ) for i, k in enumerate(keys))
    return WgConfig(iface, peers)


@settings(max_examples=150)
@given(_configs())
def test_generated_configs_round_trip(config: WgConfig) -> None:
    text = format_conf(config)
    assert parse_conf(text) == config
    for secret in [config.interface.private_key] + [p.preshared_key for p in config.peers if p.preshared_key]:
        assert encode_key(secret) not in config.redacted()


_TOKENS = list("[]=#,:/. \n\tabcPIeKy01") + ["[Interface]", "[Peer]", "PrivateKey", "PublicKey", "AllowedIPs",
                                             "Endpoint", "10.0.0.1/8", "[::1]", PRIV_T, PUB1_T]


@given(st.lists(st.sampled_from(_TOKENS), max_size=60).map("".join))
def test_any_text_parses_or_raises_conf_error(text: str) -> None:
    try:
        parse_conf(text)
    except ConfError as e:
        assert e.problems and all(PRIV_T not in str(p) for p in e.problems)


# ---------------------------------------------------------------------------------------------
# Files


def test_load_conf(tmp_path: Path) -> None:
    path = tmp_path / "wg0.conf"
    path.write_text(GOOD)
    assert load_conf(path) == parse_conf(GOOD)


def test_load_conf_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfError, match=r"missing\.conf: cannot read: No such file"):
        load_conf(tmp_path / "missing.conf")
    bad = tmp_path / "latin1.conf"
    bad.write_bytes(b"[Interface]\n# caf\xe9\n")
    with pytest.raises(ConfError, match=r"latin1\.conf:2: not UTF-8: byte 0xe9"):
        load_conf(bad)
    with pytest.raises(ConfError) as info:
        load_conf(tmp_path)
    assert info.value.problems[0].message.startswith("cannot read")
    if os.path.exists("/dev/zero"):
        with pytest.raises(ConfError, match="larger than"):
            load_conf("/dev/zero")
