"""server_name(): TLS ClientHello SNI and HTTP Host, from the client's first bytes."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.engine.proxy.peek import NEED_MORE, server_name


def client_hello(name: str | None) -> bytes:
    """A real ClientHello from Python's ssl module (OpenSSL), with SNI ``name``."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("name", ["example.test", "ads.example.test", "a-b.c_d.example.test"])
def test_sni_from_a_real_client_hello(name):
    assert server_name(client_hello(name)) == name


def test_client_hello_without_sni_names_nothing():
    assert server_name(client_hello(None)) is None


def test_every_prefix_of_a_client_hello_asks_for_more():
    hello = client_hello("example.test")
    for cut in range(0, len(hello)):
        assert server_name(hello[:cut]) == NEED_MORE, cut


@pytest.mark.parametrize("head, expected", [
    pytest.param(b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n", "example.test", id="host"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: Example.TEST.:8080\r\n\r\n", "example.test", id="case-dot-port"),
    pytest.param(b"POST /x HTTP/1.1\r\nAccept: */*\r\nhost:example.test\r\n\r\nbody", "example.test", id="lowercase-key"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n", "2001:db8::1", id="ipv6-literal"),
    pytest.param(b"GET / HTTP/1.0\r\nAccept: */*\r\n\r\n", None, id="no-host"),
    pytest.param(b"GET / HTTP/1.1\r\nX-Host: evil.test\r\n\r\n", None, id="not-the-host-header"),
])
def test_http_host(head, expected):
    assert server_name(head) == expected


@pytest.mark.parametrize("data", [
    pytest.param(b"", id="empty"),
    pytest.param(b"GE", id="method-prefix"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: exa", id="head-incomplete"),
    pytest.param(b"\x16\x03\x01", id="tls-record-header-incomplete"),
])
def test_incomplete_asks_for_more(data):
    assert server_name(data) == NEED_MORE


@pytest.mark.parametrize("data", [
    pytest.param(b"SSH-2.0-OpenSSH\r\n", id="ssh"),
    pytest.param(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", id="tls-server-hello-not-client-hello"),
    pytest.param(b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\xff\xff", id="tls-truncated-hello-in-short-record"),
    pytest.param(b"\x00" * 64, id="zeros"),
])
def test_neither_tls_nor_http_names_nothing(data):
    assert server_name(data) is None


@given(st.binary(max_size=2048))
def test_random_bytes_never_raise(data):
    assert server_name(data) is None or isinstance(server_name(data), str)


@given(st.binary(min_size=1, max_size=600), st.integers(min_value=0, max_value=599))
def test_corrupted_client_hellos_never_raise(noise, at):
    hello = bytearray(client_hello("example.test"))
    at %= len(hello)
    hello[at: at + len(noise)] = noise[: len(hello) - at]
    result = server_name(bytes(hello))
    assert result is None or isinstance(result, str)
