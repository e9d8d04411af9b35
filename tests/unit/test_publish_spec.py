"""Unit tests for tether.publish: ``-p`` specs and ``ports rm`` keys.

Bad inputs tried: a port of 0 / 65536 / a name, a backwards range, ranges of different lengths,
a range over the limit, an unknown protocol, a bad or unbracketed IPv6 address, too many or too
few fields, a hostname.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.publish import MAX_RANGE, Publish, PublishError, parse_key, parse_publish


@pytest.mark.parametrize("spec, expect", [
    ("8080:80", [Publish("tcp", "127.0.0.1", 8080, 80)]),
    ("0.0.0.0:8080:80", [Publish("tcp", "0.0.0.0", 8080, 80)]),
    ("127.0.0.1:5353:53/udp", [Publish("udp", "127.0.0.1", 5353, 53)]),
    ("[::1]:8080:80/tcp", [Publish("tcp", "::1", 8080, 80)]),
    ("[::]:1:2", [Publish("tcp", "::", 1, 2)]),
    ("8000-8002:9000-9002", [Publish("tcp", "127.0.0.1", 8000 + i, 9000 + i) for i in range(3)]),
    (" 7:7 ", [Publish("tcp", "127.0.0.1", 7, 7)]),
])
def test_parse_publish(spec, expect):
    assert parse_publish(spec) == expect


@pytest.mark.parametrize("spec, message", [
    ("0:80", "host port '0'"), ("8080:65536", "sandbox port '65536'"), ("http:80", "host port 'http'"),
    ("90-80:90-80", "runs backwards"), ("8000-8002:9000-9001", "differ in length"),
    (f"1-{MAX_RANGE + 1}:1-{MAX_RANGE + 1}", f"at most {MAX_RANGE}"), ("8080:80/sctp", "'sctp' is not tcp or udp"),
    ("::1:8080:80", "want HOSTPORT:SANDBOXPORT"), ("[::1]8080:80", "written [ADDR]"), ("[::1:8080:80", "written [ADDR]"),
    ("8080", "want HOSTPORT:SANDBOXPORT"), ("1.2.3:8080:80", "'1.2.3' is not an IP address"),
    ("example.test:8080:80", "not an IP address"), ("", "want HOSTPORT"),
], ids=["zero", "too-big", "name", "backwards", "lengths", "too-many", "proto", "bare-v6", "v6-no-colon",
        "v6-unclosed", "one-field", "bad-v4", "hostname", "empty"])
def test_parse_publish_refuses(spec, message):
    with pytest.raises(PublishError) as info:
        parse_publish(spec)
    assert message in str(info.value) and info.value.hint.startswith("-p [HOSTADDR:]")


@given(st.ip_addresses(), st.integers(1, 65535), st.integers(1, 65535), st.sampled_from(["tcp", "udp"]))
def test_key_and_spec_round_trip(address, host_port, sandbox_port, proto):
    p = Publish(proto, str(address), host_port, sandbox_port)
    host = f"[{address}]" if address.version == 6 else str(address)
    assert parse_publish(f"{host}:{host_port}:{sandbox_port}/{proto}") == [p]
    assert parse_key(p.key) == (proto, str(address), host_port)


@pytest.mark.parametrize("text, expect", [
    ("8080", ("tcp", None, 8080)), ("8080/udp", ("udp", None, 8080)), ("0.0.0.0:8080", ("tcp", "0.0.0.0", 8080)),
    ("[::1]:53/udp", ("udp", "::1", 53)),
])
def test_parse_key(text, expect):
    assert parse_key(text) == expect


@pytest.mark.parametrize("text", ["0", "x", "8080/icmp", "1.2.3:80", "[::1]80"])
def test_parse_key_refuses(text):
    with pytest.raises(PublishError, match="bad port"):
        parse_key(text)
