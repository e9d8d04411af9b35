"""The name a client asks for in its first bytes: TLS ClientHello SNI or HTTP Host (sans-IO).

Why: under a domain allow rule, an address is reachable because the sandbox resolved an allowed
name to it.  Many sites share an address; without this check a sandbox could resolve an allowed
name and then ask the same server (a CDN, a shared host) for a different site.  For TCP to ports
80 and 443 the engine peeks (MSG_PEEK: nothing is consumed) at the client's first bytes before it
dials and checks the name found here against the policy.

``server_name(data)`` returns:

* ``NEED_MORE`` — the bytes so far are a plausible prefix of a ClientHello or an HTTP request
  head; peek again when more arrive (the caller bounds bytes and time);
* a lower-case name without a trailing dot or port — found;
* ``None`` — the request is complete (or is neither TLS nor HTTP) and names nothing.

Only what is needed is parsed: the TLS record and handshake headers, the ClientHello's fixed
fields, and the extensions up to ``server_name`` (RFC 6066); for HTTP, the header block up to the
first blank line.  Malformed input yields ``None``, never an exception.
"""

from __future__ import annotations

from typing import Final

NEED_MORE: Final = "need-more"
MAX_PEEK = 16384  # a ClientHello with post-quantum key shares fits; HTTP heads beyond are refused

_HTTP_METHODS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE ")


def server_name(data: bytes) -> str | None:
    if not data:
        return NEED_MORE
    if data[0] == 0x16:
        return _tls_sni(data)
    if any(m.startswith(data[: len(m)]) or data.startswith(m) for m in _HTTP_METHODS):
        return _http_host(data)
    return None


def _normalise(name: str) -> str | None:
    name = name.strip().lower().rstrip(".")
    return name or None


def _http_host(data: bytes) -> str | None:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return NEED_MORE if len(data) < MAX_PEEK else None
    lines = data[:end].split(b"\r\n")[1:]
    for line in lines:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == b"host":
            host = value.strip().decode("ascii", errors="replace")
            if host.startswith("["):  # [v6]:port
                return _normalise(host[1:host.find("]")]) if "]" in host else None
            return _normalise(host.rsplit(":", 1)[0] if host.count(":") == 1 else host)
    return None


def _tls_sni(data: bytes) -> str | None:
    # TLS record: type(1)=22 version(2) length(2); handshake: type(1)=1 length(3) ...
    if len(data) < 5:
        return NEED_MORE
    record_len = int.from_bytes(data[3:5], "big")
    available = data[5: 5 + record_len]
    if len(available) < 4:
        return NEED_MORE if len(data) < 5 + record_len else None
    if available[0] != 0x01:  # not a ClientHello
        return None
    hello_len = int.from_bytes(available[1:4], "big")
    hello = available[4: 4 + hello_len]
    if len(hello) < hello_len:
        # A ClientHello split over several records is rare; peek more while the record grows.
        return NEED_MORE if len(data) < 5 + record_len and len(data) < MAX_PEEK else None
    try:
        return _sni_from_client_hello(hello)
    except (IndexError, ValueError):
        return None


def _sni_from_client_hello(hello: bytes) -> str | None:
    pos = 2 + 32  # client_version, random
    pos += 1 + hello[pos]  # session_id
    pos += 2 + int.from_bytes(hello[pos: pos + 2], "big")  # cipher_suites
    pos += 1 + hello[pos]  # compression_methods
    if pos + 2 > len(hello):
        return None  # no extensions
    end = pos + 2 + int.from_bytes(hello[pos: pos + 2], "big")
    pos += 2
    while pos + 4 <= min(end, len(hello)):
        kind = int.from_bytes(hello[pos: pos + 2], "big")
        size = int.from_bytes(hello[pos + 2: pos + 4], "big")
        body = hello[pos + 4: pos + 4 + size]
        if kind == 0:  # server_name: list_len(2) then entries of type(1) len(2) name
            entry = 2
            while entry + 3 <= len(body):
                name_type = body[entry]
                name_len = int.from_bytes(body[entry + 1: entry + 3], "big")
                name = body[entry + 3: entry + 3 + name_len]
                if name_type == 0 and len(name) == name_len:
                    return _normalise(name.decode("ascii"))
                entry += 3 + name_len
            return None
        pos += 4 + size
    return None
