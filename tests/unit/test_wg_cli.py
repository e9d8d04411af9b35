"""``tether wg genkey | pubkey | genpsk``: wg(8)-compatible key helpers on the command line."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from click.testing import CliRunner

from tether.cli import main
from tether.engine.wireguard.keys import decode_key, encode_key, public_key


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, ["wg", *args], input=input)


def test_genkey_then_pubkey():
    private = run("genkey")
    assert private.exit_code == 0
    key = decode_key(private.output.strip())
    public = run("pubkey", input=private.output)
    assert public.exit_code == 0 and public.output.strip() == encode_key(public_key(key))


def test_genpsk_is_32_random_bytes():
    first, second = run("genpsk").output.strip(), run("genpsk").output.strip()
    assert len(decode_key(first)) == 32 and first != second


@pytest.mark.skipif(not shutil.which("wg"), reason="wg (wireguard-tools) is not installed")
def test_pubkey_agrees_with_wg():
    private = run("genkey").output
    theirs = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True, check=True).stdout
    assert run("pubkey", input=private).output == theirs


@pytest.mark.parametrize("text", ["", "not base64!", "QUJD", "A" * 43 + "=" + "B"], ids=["empty", "garbage", "short",
                                                                                         "trailing"])
def test_pubkey_refuses_bad_input_without_echoing_it(text):
    result = run("pubkey", input=text)
    assert result.exit_code == 1 and "the private key on stdin" in result.output
    if len(text) > 3:
        assert text not in result.output


def test_render_wg_lays_out_like_wg_show():
    import time

    from tether.ctl import render_wg

    show = {"public_key": "PUB=", "listen_port": 40001, "peers": [
        {"public_key": "PEER=", "endpoint": "192.0.2.2:51820", "allowed_ips": ["10.99.0.0/24", "fd99::/64"],
         "latest_handshake": time.time() - 75, "rx_bytes": 2048, "tx_bytes": 0, "persistent_keepalive": 25},
        {"public_key": "QUIET=", "endpoint": None, "allowed_ips": [], "latest_handshake": None}]}
    text = render_wg(show)
    lines = text.splitlines()
    assert lines[:3] == ["interface: tun0", "  public key: PUB=", "  listening port: 40001"]
    assert "peer: PEER=" in lines and "  endpoint: 192.0.2.2:51820" in lines
    assert "  allowed ips: 10.99.0.0/24, fd99::/64" in lines
    assert any(line.startswith("  latest handshake: 1m1") and line.endswith("s ago") for line in lines), text
    assert "  persistent keepalive: every 25 seconds" in lines
    quiet = lines[lines.index("peer: QUIET="):]
    assert quiet[1:4] == ["  endpoint: (none)", "  allowed ips: (none)", "  latest handshake: (none)"]
    assert "listening port" not in render_wg({"public_key": "PUB=", "peers": []})
