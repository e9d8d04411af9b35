"""Interop of our sans-IO WireGuard handshake and transport framing (tether.engine.wireguard:
noise, crypto, keys) with Debian's wireguard-go.

Each test starts one ``wireguard-go -f tdw<hex>`` in its own netns ``tdw-<hex>`` (see wg_peer.py),
configures it with ``wg set`` and runs our side in the same netns, over 127.0.0.1 only:

* we initiate (with and without a preshared key): the handshake completes and ICMP echo requests
  that we seal go through wireguard-go's tun to the netns's kernel, whose replies come back to us
  sealed; we open and check them;
* wireguard-go initiates (a real ``ping`` of our tunnel address makes it): we respond, answer the
  echo requests, and ping counts the replies;
* the cookie path: a flood puts wireguard-go under load, it answers our initiation with a cookie
  reply, and our retry with mac2 completes (and traffic flows);
* wrong keys (our static key unknown to it, or its public key wrong, so mac1 fails): no answer at
  all, no handshake in ``wg show`` -- and the right keys, right after, get one.

Every positive case checks ``wg show IF latest-handshakes``. Teardown checks that wireguard-go
exits on SIGTERM, removes its UAPI socket and that the netns goes away.

Our side runs with PYTHONPATH=<repo>/src (see wg_peer.client_env): the installed venv carries a
tether too, possibly with older wireguard modules; the repository's are the ones under test.
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from wg_peer import CLEAN_PATH, OUR_ADDR, PEER_ADDR, WG_PORT, WgGo, genkey, genpsk, pubkey

MESSAGE_COOKIE_REPLY = 3


def _missing() -> str | None:
    tools = [t for t in ("wireguard-go", "wg", "ping", "ip") if shutil.which(t, path=CLEAN_PATH) is None]
    if tools:
        return f"missing {', '.join(tools)} (Debian: apt-get install wireguard-go wireguard-tools iputils-ping)"
    if not Path("/dev/net/tun").exists():
        return "no /dev/net/tun: wireguard-go needs a tun device"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")

PSK = pytest.mark.parametrize("psk", [False, True], ids=["nopsk", "psk"])


@dataclass
class Keys:
    srv_key_file: Path  # wireguard-go's private key (for `wg set ... private-key`)
    srv_public: str
    our_private: str
    our_public: str  # by `wg pubkey`
    psk_file: Path
    psk: str

    def client(self, psk: bool) -> dict:
        """Our side's keys, for the client's stdin."""
        return {"private": self.our_private, "peer_public": self.srv_public, "psk": self.psk if psk else None}


@pytest.fixture
def keys(tmp_path) -> Keys:
    kdir = tmp_path / "keys"
    kdir.mkdir(mode=0o700)
    srv = genkey(kdir / "wireguard-go.key")
    ours = genkey(kdir / "ours.key")
    psk = genpsk(kdir / "psk")
    return Keys(kdir / "wireguard-go.key", pubkey(srv), ours, pubkey(ours), kdir / "psk", psk)


@pytest.fixture
def wg_go(tmp_path, run_cgroup, request):
    """``wg_go()`` -> a started ``WgGo`` (in the test's cgroup). Teardown stops each one and
    fails the test if wireguard-go lingered, died early, left its UAPI socket or its netns."""
    peers: list[WgGo] = []

    def start() -> WgGo:
        peer = WgGo(tmp_path, run_cgroup)
        peers.append(peer)  # before start(): a half-started one is cleaned up too
        return peer.start()

    yield start
    problems = [p for peer in peers for p in peer.stop()]
    if problems:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            sys.stderr.write("\nwireguard-go teardown after failed test:\n  " + "\n  ".join(problems) + "\n")
        else:
            pytest.fail("wireguard-go teardown:\n  " + "\n  ".join(problems), pytrace=False)


def configured(wg_go, keys: Keys, psk: bool, endpoint: str | None = None) -> WgGo:
    peer = wg_go()
    peer.configure(private_key_file=keys.srv_key_file, peer_public=keys.our_public,
                   psk_file=keys.psk_file if psk else None, endpoint=endpoint)
    assert peer.latest_handshakes() == {keys.our_public: 0}, peer.log()
    return peer


def assert_handshake_recorded(peer: WgGo, keys: Keys) -> None:
    hs = peer.latest_handshakes()
    assert hs.get(keys.our_public, 0) > 0, f"wg show {peer.ifname} latest-handshakes: {hs}\n{peer.log()}"
    rx, tx = peer.transfer()[keys.our_public]
    assert rx > 0 and tx > 0, f"wg show {peer.ifname} transfer: rx {rx} tx {tx}"


def assert_echo_replies(echoes: list[dict], peer: WgGo) -> None:
    """Every echo request we sent through the tunnel came back as the kernel's reply, intact."""
    assert echoes, "no echo exchanged"
    for e in echoes:
        where = f"echo seq {e['want_seq']}: {e}\n{peer.log()}"
        assert (e["ip_version"], e["protocol"]) == (4, 1), where
        assert (e["src"], e["dst"]) == (PEER_ADDR, OUR_ADDR), where
        assert (e["icmp_type"], e["icmp_code"]) == (0, 0), where
        assert (e["ident"], e["seq"]) == (e["want_ident"], e["want_seq"]), where
        assert e["ip_checksum_ok"] and e["icmp_checksum_ok"], where
        assert e["payload_ok"], where
        assert e["plain_len"] >= e["ip_len"] and e["padding_zero"], where
    counters = [e["counter"] for e in echoes]
    assert counters[0] == 0 and counters == sorted(set(counters)), f"its transport counters: {counters}"


# --------------------------------------------------------------------------------------------


@PSK
def test_we_initiate(wg_go, keys, psk):
    peer = configured(wg_go, keys, psk)
    client = peer.client({"mode": "initiate", "echoes": 3, **keys.client(psk)})
    ready = client.wait_ready()
    assert ready["public"] == keys.our_public, "our public key derivation disagrees with wg pubkey"
    res = client.result()
    assert res["source"] == ["127.0.0.1", WG_PORT] and res["initiator"] is True, res
    assert_echo_replies(res["echoes"], peer)
    assert_handshake_recorded(peer, keys)


@PSK
def test_wireguard_go_initiates(wg_go, keys, psk):
    peer = configured(wg_go, keys, psk)
    client = peer.client({"mode": "respond", "echoes": 2, **keys.client(psk)})
    ready = client.wait_ready()
    peer.set_endpoint(keys.our_public, f"127.0.0.1:{ready['port']}")
    # The kernel routes the echo requests into wireguard-go's tun; having no session, wireguard-go
    # initiates a handshake with us, then sends them through it. Two, so that both sides use a
    # transport counter other than 0 too (0 would hide a wrong nonce layout).
    ping = peer.run(["ping", "-n", "-c", "2", "-i", "0.2", "-W", "5", OUR_ADDR], timeout=15)
    res = client.result()
    m = re.search(r"(\d+) packets transmitted, (\d+) received", ping.stdout)
    assert ping.returncode == 0 and m and m.groups() == ("2", "2"), \
        f"ping exit {ping.returncode}\n{ping.stdout}{ping.stderr}\n{peer.log()}"
    assert res["source"] == ["127.0.0.1", WG_PORT] and res["initiator"] is False, res
    assert len(res["requests"]) == 2, res
    for n, req in enumerate(res["requests"]):
        assert (req["ip_version"], req["protocol"]) == (4, 1), req
        assert (req["src"], req["dst"], req["icmp_type"], req["icmp_code"]) == (PEER_ADDR, OUR_ADDR, 8, 0), req
        assert req["ip_checksum_ok"] and req["icmp_checksum_ok"] and req["padding_zero"], req
        assert (req["counter"], req["seq"]) == (n, n + 1), req
    assert_handshake_recorded(peer, keys)


@PSK
def test_cookie_reply_then_mac2(wg_go, keys, psk):
    peer = configured(wg_go, keys, psk)
    client = peer.client({"mode": "cookie", "attempts": 6, "echoes": 2, **keys.client(psk)})
    client.wait_ready()
    res = client.result(timeout=40)
    assert res["cookie"], f"wireguard-go never answered with a cookie reply; attempts: {res['attempts']}"
    assert res["cookie_receiver_ok"], res
    # Under load before the retry (a control initiation without mac2 gets a cookie reply) and
    # still after it: so the retry was accepted *because* of its mac2, made with the cookie.
    assert res["control_before"] == MESSAGE_COOKIE_REPLY, res
    assert res["retry_has_mac2"], res
    assert res["control_after"] == MESSAGE_COOKIE_REPLY, res
    assert res["source"] == ["127.0.0.1", WG_PORT], res
    assert_echo_replies(res["echoes"], peer)
    assert_handshake_recorded(peer, keys)


@pytest.mark.parametrize("wrong", ["unknown-initiator", "wrong-responder-key"])
def test_wrong_key_gets_no_answer(wg_go, keys, tmp_path, wrong):
    peer = configured(wg_go, keys, psk=False)
    if wrong == "unknown-initiator":
        # A static key wireguard-go has no peer for: mac1 is right, the lookup fails.
        config = {"private": genkey(tmp_path / "keys" / "stranger.key"), "peer_public": keys.srv_public}
        refusal = r"Received invalid initiation message from 127\.0\.0\.1"
    else:
        # Addressed to another public key: mac1 is wrong, dropped before any DH.
        other = pubkey(genkey(tmp_path / "keys" / "other.key"))
        config = {"private": keys.our_private, "peer_public": other}
        refusal = r"Received packet with invalid mac1"
    res = peer.client({"mode": "silent", "silence": 1.5, **config}).result()
    assert res["received"] == [], f"wireguard-go answered: {res['received']}\n{peer.log()}"
    assert peer.latest_handshakes() == {keys.our_public: 0}, peer.log()
    # It did receive the initiation and refused it (not lost on the way).
    assert peer.log_count(refusal) >= 1, f"no {refusal!r} in its log\n{peer.log()}"
    # Control: the right keys, right after, in the same setup, get a handshake.
    res = peer.client({"mode": "initiate", "echoes": 2, **keys.client(False)}).result()
    assert_echo_replies(res["echoes"], peer)
    assert_handshake_recorded(peer, keys)
