"""``tether run --wireguard``'s preparation: the sandbox's network plan and resolv.conf from a
wg-quick file, and the refusals that happen before anything starts."""

from __future__ import annotations

import contextlib
import ipaddress
import time

import pytest

from tether.engine.wireguard import setup
from tether.engine.wireguard.conf import parse_conf
from tether.engine.wireguard.keys import encode_key, generate_private_key


def conf_text(interface: str = "Address = 10.99.0.2/24, fd99::2/64\nDNS = 198.51.100.53, example.test\n",
              allowed: str = "0.0.0.0/0, ::/0, 10.99.0.0/24") -> str:
    return (f"[Interface]\nPrivateKey = {encode_key(generate_private_key())}\n{interface}\n[Peer]\n"
            f"PublicKey = {encode_key(generate_private_key())}\nEndpoint = 192.0.2.2:51820\nAllowedIPs = {allowed}\n")


def test_plan_routes_every_allowed_prefix_into_tun0_without_capture():
    plan = setup.net_plan(parse_conf(conf_text()))
    assert plan.interface == "tun0" and plan.mtu == 1420 and not plan.capture and plan.vnet_header
    assert [str(a) for a in plan.addresses] == ["10.99.0.2/24", "fd99::2/64"]
    assert plan.routes == [(ipaddress.ip_network("0.0.0.0/0"), None), (ipaddress.ip_network("::/0"), None),
                           (ipaddress.ip_network("10.99.0.0/24"), None)]


def test_resolv_conf_from_dns_lines_or_a_comment_without_them():
    assert setup.resolv_conf(parse_conf(conf_text())) == "nameserver 198.51.100.53\nsearch example.test\n"
    bare = setup.resolv_conf(parse_conf(conf_text("Address = 10.99.0.2/24\n")))
    assert bare.startswith("#") and "nameserver" not in bare


def test_a_file_without_address_is_refused(tmp_path):
    path = tmp_path / "wg0.conf"
    path.write_text(conf_text(""))
    with pytest.raises(setup.WireGuardSetupError, match="has no Address"):
        setup.prepare(str(path))


def test_a_bad_file_is_refused_with_its_line(tmp_path):
    path = tmp_path / "wg0.conf"
    path.write_text(conf_text("Address = 10.99.0.2/24\nTable = off\n"))
    with pytest.raises(setup.WireGuardSetupError, match=r"wg0\.conf:4: .*Table"):
        setup.prepare(str(path))


def test_start_binds_a_socket_and_builds_the_device(tmp_path):
    path = tmp_path / "wg0.conf"
    path.write_text(conf_text())
    prepared = setup.prepare(str(path))
    tunnel = prepared.start()
    try:
        assert tunnel.sock.getsockname()[1] > 0 and tunnel.time_scale == 1.0
        (peer,) = tunnel.device.show()["peers"]
        assert peer["endpoint"] == "192.0.2.2:51820"
        assert tunnel.plan.vnet_header  # the engine segments and coalesces TCP itself
        engine = tunnel.engine(0)
        assert engine.vnet_header and engine.sock is tunnel.sock and engine.device is tunnel.device
    finally:
        tunnel.close()
    assert tunnel.sock.fileno() == -1


@pytest.fixture
def conf_path(tmp_path):
    path = tmp_path / "wg0.conf"
    path.write_text(conf_text())
    return str(path)


@contextlib.contextmanager
def started(path: str):
    """The tunnel ``tether run --wireguard`` would start from ``path``, closed afterwards."""
    tunnel = setup.prepare(path).start()
    try:
        yield tunnel
    finally:
        tunnel.close()


def test_the_test_time_scale_reaches_the_device_clock(conf_path, monkeypatch):
    monkeypatch.setenv("TETHER_WG_TEST_TIME_SCALE", "100")
    with started(conf_path) as tunnel:
        before = tunnel.device.now()
        time.sleep(0.05)
        assert tunnel.device.now() - before >= 4.9  # 50 ms of wall time, 5 s of protocol time
        assert tunnel.engine(0).time_scale == 100


@pytest.mark.parametrize("name, value", [("TETHER_WG_TEST_TIME_SCALE", v) for v in
                                         ("fast", "0.5", "0", "-3", "1e9", "nan", "251")]
                         + [("TETHER_WG_OFFLOADS", v) for v in ("jumbo", "tso,lro", "none,gso")])
def test_a_bad_knob_is_refused_before_anything_starts(conf_path, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(setup.WireGuardSetupError, match=name):
        setup.prepare(conf_path)


def test_offloads_reach_the_engine(conf_path, monkeypatch):
    monkeypatch.setenv("TETHER_WG_OFFLOADS", "gso")
    with started(conf_path) as tunnel:
        engine = tunnel.engine(0)
        assert engine.offloads == {"gso"} and engine.gso and not engine.gro
