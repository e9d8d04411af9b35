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
