"""Daemon mode, external engine: Debian's wireguard-go owns the container's tun (``WG_TUN_FD``),
configured with ``wg``, tunnelling to a wireguard-go peer in the world netns.

    container netns            world host netns (daemon)              world netns
    twgXXXX 10.99.0.2/24  ==fd==> wireguard-go (engine) --udp--> 192.0.2.2:PORT wireguard-go peer
                                                                  wgpXXXX 10.99.0.1/24, servers
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time

import pytest

from daemon_harness import Netns, attach_argv, wait_clean
from conftest import WG_PEER_PORT, wg_genkey
from world import SANDBOX_PYTHON, WORLD_VETH_ADDR, sh

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/wireguard-go"), reason="wireguard-go is not installed")

TRANSFER = 8 << 20

SINK = r"""
import hashlib, socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("10.99.0.1", int(sys.argv[1]))); srv.listen(1)
print("ready", flush=True)
conn, _ = srv.accept(); h = hashlib.sha256(); n = 0
while chunk := conn.recv(1 << 16):
    h.update(chunk); n += len(chunk)
print(n, h.hexdigest(), flush=True)
"""

SEND = r"""
import hashlib, os, socket, sys
data = os.urandom(int(sys.argv[2]))
with socket.create_connection(("10.99.0.1", int(sys.argv[1])), timeout=20) as s:
    s.sendall(data)
print(len(data), hashlib.sha256(data).hexdigest())
"""


def ping_and_transfer(ns: Netns, world) -> None:
    """From the container netns: 3 pings to the peer's tunnel address, then TRANSFER bytes to a sink
    behind it, the sha256 the same on both ends."""
    ping = ns.run(["ping", "-c", "3", "-i", "0.2", "-W", "5", "10.99.0.1"])
    assert ping.returncode == 0 and "3 received" in ping.stdout, ping.stdout + ping.stderr
    port = 20000 + secrets.randbelow(20000)
    sink = subprocess.Popen(["ip", "netns", "exec", world.world_ns, SANDBOX_PYTHON, "-c", SINK, str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout.readline().strip() == "ready"
        sent = ns.run([SANDBOX_PYTHON, "-c", SEND, str(port), str(TRANSFER)], timeout=120)
        assert sent.returncode == 0, sent.stderr
        received = sink.stdout.readline().split()
    finally:
        sink.kill()
        sink.wait()
    assert sent.stdout.split() == received and int(received[0]) == TRANSFER


def test_wireguard_go_as_external_engine_tunnels_ping_and_tcp(daemons, netns, world, wg_peer, tmp_path):
    iface = f"twg{secrets.token_hex(4)}"
    daemon = daemons(f"""
[container.vpn]
engine = "external"
command = ["wireguard-go", "-f", "{iface}"]
tun_fd_env = "WG_TUN_FD"
interface = "{iface}"
addresses = ["10.99.0.2/24"]
routes = ["10.99.0.0/24"]
mtu = 1420
tun_packet_info = true
""")
    ns: Netns = netns()
    before = daemon.fds()
    private, public = wg_genkey()
    (tmp_path / "vpn.key").write_text(private + "\n")
    holder = subprocess.Popen(ns.argv(attach_argv(daemon, "vpn")), stderr=subprocess.PIPE, env=daemon.env)
    try:
        line = holder.stderr.readline().decode()
        assert f"vpn: network configured ({iface}, 10.99.0.2/24; engine external)" in line, line
        # the program owns the tun: no capture rules, no nft table in the container
        assert ns.state() == {"links": sorted(["lo", iface]), "nft": "", "tether_rules": []}
        # the placeholder of the same name in the daemon's netns, which wireguard-go resolves
        assert iface in sh(["ip", "-n", world.host_ns, "-br", "link"]).stdout
        deadline = time.monotonic() + 10
        while not os.path.exists(f"/var/run/wireguard/{iface}.sock") and time.monotonic() < deadline:
            time.sleep(0.05)
        sh(["wg", "set", iface, "private-key", str(tmp_path / "vpn.key"), "peer", wg_peer["public"],
            "endpoint", f"{WORLD_VETH_ADDR}:{WG_PEER_PORT}",
            "allowed-ips", "10.99.0.0/24", "persistent-keepalive", "1"])
        sh(["wg", "set", wg_peer["name"], "peer", public, "allowed-ips", "10.99.0.2/32"])
        ping_and_transfer(ns, world)
        show = sh(["wg", "show", iface, "transfer"]).stdout.split()
        assert int(show[1]) > 0 and int(show[2]) > TRANSFER  # rx, tx bytes through the tunnel
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=10)
    daemon.wait_event(lambda e: e["event"] == "detach" and e["sandbox"] == "vpn")
    assert wait_clean(ns) == ns.clean_state()
    assert iface not in sh(["ip", "-n", world.host_ns, "-br", "link"]).stdout  # placeholder gone
    deadline = time.monotonic() + 5
    while os.path.exists(f"/var/run/wireguard/{iface}.sock") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/var/run/wireguard/{iface}.sock")  # wireguard-go stopped cleanly
    assert sorted(daemon.wait_fds(before).values()) == sorted(before.values())


def test_wireguard_engine_in_the_daemon(daemons, netns, world, wg_peer, tmp_path):
    """engine = "wireguard": tether's own WireGuard engine in a supervised worker, its UDP socket in
    the daemon's netns, the container's tun0 shaped by the wg-quick file."""
    private, public = wg_genkey()
    conf = tmp_path / "wg0.conf"
    conf.write_text(f"[Interface]\nPrivateKey = {private}\nAddress = 10.99.0.2/24\n\n[Peer]\n"
                    f"PublicKey = {wg_peer['public']}\nEndpoint = {WORLD_VETH_ADDR}:{WG_PEER_PORT}\n"
                    "AllowedIPs = 10.99.0.0/24\nPersistentKeepalive = 1\n")
    conf.chmod(0o600)
    sh(["wg", "set", wg_peer["name"], "peer", public, "allowed-ips", "10.99.0.2/32"])
    daemon = daemons(f'[container.vpn]\nengine = "wireguard"\nconfig = "{conf}"\n')
    ns: Netns = netns()
    before = daemon.fds()
    holder = subprocess.Popen(ns.argv(attach_argv(daemon, "vpn")), stderr=subprocess.PIPE, env=daemon.env)
    try:
        line = holder.stderr.readline().decode()
        assert "vpn: network configured (tun0, 10.99.0.2/24; engine wireguard)" in line, line
        assert ns.state() == {"links": ["lo", "tun0"], "nft": "", "tether_rules": []}
        ping_and_transfer(ns, world)
        row = next(r for r in daemon.admin_json("sessions") if r["name"] == "vpn")
        assert row["engine"] == "wireguard" and row["bytes_up"] > TRANSFER and row["connections"] == 1
        outside = ns.run([SANDBOX_PYTHON, "-c", "import socket\ntry:\n socket.create_connection(('203.0.113.10', 80),"
                                                " timeout=3)\nexcept OSError as e:\n print(e.errno)"])
        assert outside.stdout.strip() == "101"  # no route outside the tunnel
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=10)
    daemon.wait_event(lambda e: e["event"] == "detach" and e["sandbox"] == "vpn")
    assert wait_clean(ns) == ns.clean_state()
    assert sorted(daemon.wait_fds(before).values()) == sorted(before.values())
