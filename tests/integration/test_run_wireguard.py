"""``tether run --wireguard FILE``: the sandbox's only way out is a WireGuard tunnel, run by tether's
Python engine, to Debian's wireguard-go as the peer in the world netns.

    sandbox tun0 10.99.0.2/24  --tether (host netns, UDP 192.0.2.1:*)-->  192.0.2.2:51820 wireguard-go
                                                                          wgpXXXX 10.99.0.1/24 (world)
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess

import pytest

from conftest import TEST_USER, WG_PEER_PORT, wg_genkey
from world import SANDBOX_PYTHON, WORLD_ADDR, WORLD_VETH_ADDR, sh

pytestmark = pytest.mark.skipif(not shutil.which("wireguard-go") or not shutil.which("wg"),
                                reason="wireguard-go and wg are needed for the peer")

TRANSFER = 8 << 20

SINK = r"""
import hashlib, socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("10.99.0.1", int(sys.argv[1]))); srv.listen(1)
print("ready", flush=True)
conn, peer = srv.accept(); h = hashlib.sha256(); n = 0
while chunk := conn.recv(1 << 16):
    h.update(chunk); n += len(chunk)
conn.sendall(h.hexdigest().encode())
print(peer[0], n, h.hexdigest(), flush=True)
"""

CLIENT = r"""
import hashlib, json, os, socket, subprocess, sys
out = {}
ping = subprocess.run(["ping", "-c", "3", "-i", "0.2", "-W", "5", "10.99.0.1"], capture_output=True, text=True)
out["ping"] = ping.returncode
data = os.urandom(int(sys.argv[2]))
with socket.create_connection(("10.99.0.1", int(sys.argv[1])), timeout=20) as s:
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    out["echoed"] = s.recv(100).decode()
out["sent"] = hashlib.sha256(data).hexdigest()
try:  # not in AllowedIPs: no route at all, nothing leaves outside the tunnel
    socket.create_connection((sys.argv[3], 80), timeout=3).close()
    out["outside"] = "connected"
except OSError as exc:
    out["outside"] = exc.errno
out["resolv"] = open("/etc/resolv.conf").read()
print(json.dumps(out))
"""


def give(tether, path) -> None:
    """The config holds a private key: 0600, owned by whoever runs tether."""
    os.chmod(path, 0o600)
    if tether.mode == "rootless":
        user = pwd.getpwnam(TEST_USER)
        os.chown(path, user.pw_uid, user.pw_gid)


def write_conf(path, private: str, peer_public: str) -> None:
    path.write_text(f"[Interface]\nPrivateKey = {private}\nAddress = 10.99.0.2/24\nDNS = 198.51.100.53, example.test\n"
                    f"MTU = 1420\n\n[Peer]\nPublicKey = {peer_public}\nEndpoint = {WORLD_VETH_ADDR}:{WG_PEER_PORT}\n"
                    "AllowedIPs = 10.99.0.0/24\nPersistentKeepalive = 1\n")
    os.chmod(path, 0o600)


def test_run_through_a_wireguard_go_peer(tether, world, wg_peer, workdir):
    private, public = wg_genkey()
    conf = workdir / "wg0.conf"
    write_conf(conf, private, wg_peer["public"])
    give(tether, conf)
    sh(["wg", "set", wg_peer["name"], "peer", public, "allowed-ips", "10.99.0.2/32"])
    port = 20000 + os.getpid() % 20000
    sink = subprocess.Popen(["ip", "netns", "exec", world.world_ns, SANDBOX_PYTHON, "-c", SINK, str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout.readline().strip() == "ready"
        r = tether.run(["--wireguard", str(conf), "--", SANDBOX_PYTHON, "-c", CLIENT, str(port), str(TRANSFER),
                        WORLD_ADDR], timeout=120)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.strip().splitlines()[-1])
        peer, count, digest = sink.stdout.readline().split()
    finally:
        sink.kill()
        sink.wait()
    assert out["ping"] == 0, out
    assert peer == "10.99.0.2" and int(count) == TRANSFER and digest == out["sent"] == out["echoed"]
    assert out["outside"] == 101, out  # ENETUNREACH: the kill switch is the routing table itself
    assert out["resolv"] == "nameserver 198.51.100.53\nsearch example.test\n"
    handshakes = sh(["wg", "show", wg_peer["name"], "latest-handshakes"]).stdout.split()
    assert handshakes[0] == public and int(handshakes[1]) > 0


def test_wireguard_refuses_policy_options_and_bad_files(tether, workdir):
    private, _ = wg_genkey()
    conf = workdir / "wg0.conf"
    write_conf(conf, private, wg_genkey()[1])
    give(tether, conf)
    r = tether.run(["--wireguard", str(conf), "--default", "deny", "--", "true"])
    assert r.returncode == 2 and "--default does not apply to it" in r.stderr
    bad = workdir / "bad.conf"
    bad.write_text(f"[Interface]\nPrivateKey = {private}\nAddress = 10.99.0.2/24\nPostUp = iptables -A x\n")
    give(tether, bad)
    r = tether.run(["--wireguard", str(bad), "--", "true"])
    assert r.returncode == 2 and ":4:" in r.stderr and "PostUp" in r.stderr
    assert private not in r.stderr  # keys never appear in errors


def test_ctl_wg_show_reports_the_peer_without_secrets(tether, world, wg_peer, workdir):
    private, public = wg_genkey()
    conf = workdir / "wg0.conf"
    write_conf(conf, private, wg_peer["public"])
    give(tether, conf)
    sh(["wg", "set", wg_peer["name"], "peer", public, "allowed-ips", "10.99.0.2/32"])
    name = f"wg-{os.getpid()}"
    proc = tether.popen(["--name", name, "--wireguard", str(conf), "--", SANDBOX_PYTHON, "-c",
                         "import subprocess, sys; subprocess.run(['ping', '-c', '1', '-W', '5', '10.99.0.1']); "
                         "print('ready', flush=True); sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        proc.wait_for_line("ready")
        shown = tether.tool(["ctl", name, "wg", "show", "--json"])
        assert shown.returncode == 0, shown.stderr
        show = json.loads(shown.stdout)
        (peer,) = show["peers"]
        assert peer["public_key"] == wg_peer["public"] and peer["endpoint"] == f"{WORLD_VETH_ADDR}:{WG_PEER_PORT}"
        assert peer["allowed_ips"] == ["10.99.0.0/24"] and peer["latest_handshake"] and peer["rx_bytes"] > 0
        assert show["public_key"] == public
        human = tether.tool(["ctl", name, "wg", "show"]).stdout
        assert f"peer: {wg_peer['public']}" in human and "latest handshake:" in human and "ago" in human
        assert f"  listening port: {show['listen_port']}" in human and show["listen_port"] > 0
        for text in (shown.stdout, human):
            assert private not in text
        status = tether.tool(["ps", "--json"])
        assert any(row["name"] == name and row["engine"] == "wireguard" for row in json.loads(status.stdout))
        proxy_only = tether.tool(["ctl", name, "ports", "list"])
        assert proxy_only.returncode == 1 and "publishes no ports" in proxy_only.stderr
    finally:
        proc.finish(timeout=30, input="")
