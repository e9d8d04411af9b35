"""``-p`` specs: which host ports are published to which sandbox ports (pure parsing).

``-p [HOSTADDR:]HOSTPORT:SANDBOXPORT[/tcp|/udp]``, repeatable; ranges of equal length map port by
port (``8000-8010:9000-9010``).  The host address defaults to 127.0.0.1: publishing on every
interface (``0.0.0.0:8080:80``, ``[::]:8080:80``) must be written out.  IPv6 host addresses go in
brackets.  A spec expands to one ``Publish`` per port.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Literal

from tether import hostsock
from tether.errors import TetherError

Proto = Literal["tcp", "udp"]
DEFAULT_HOST_ADDRESS = "127.0.0.1"
MAX_RANGE = 1024  # ports one spec may publish


class PublishError(TetherError):
    """A ``-p`` spec that cannot be honoured."""


@dataclass(frozen=True, order=True)
class Publish:
    proto: Proto
    host_address: str
    host_port: int
    sandbox_port: int

    @property
    def key(self) -> str:
        """How ``ports rm`` names it: ``[ADDR:]HOSTPORT[/udp]``."""
        host = f"[{self.host_address}]" if ":" in self.host_address else self.host_address
        return f"{host}:{self.host_port}" + ("/udp" if self.proto == "udp" else "")

    def __str__(self) -> str:
        host = f"[{self.host_address}]" if ":" in self.host_address else self.host_address
        return f"{host}:{self.host_port}->{self.sandbox_port}/{self.proto}"


HINT = "-p [HOSTADDR:]HOSTPORT:SANDBOXPORT[/tcp|/udp], e.g. -p 8080:80, -p 0.0.0.0:5353:53/udp, -p 8000-8010:8000-8010"


def _ports(text: str, what: str, spec: str) -> range:
    low, sep, high = text.partition("-")
    for part in (low, high) if sep else (low,):
        if not (part.isascii() and part.isdigit()) or not 1 <= int(part) <= 65535:
            raise PublishError(f"bad -p {spec!r}: {what} {text!r} is not a port (1-65535) or range", HINT)
    first, last = int(low), int(high) if sep else int(low)
    if last < first:
        raise PublishError(f"bad -p {spec!r}: {what} range {text!r} runs backwards", HINT)
    if last - first + 1 > MAX_RANGE:
        raise PublishError(f"bad -p {spec!r}: at most {MAX_RANGE} ports per spec", HINT)
    return range(first, last + 1)


def parse_publish(spec: str) -> list[Publish]:
    """One ``-p`` spec -> its ports, or PublishError saying what is wrong."""
    text = spec.strip()
    proto: Proto = "tcp"
    if "/" in text:
        text, _, suffix = text.rpartition("/")
        if suffix not in ("tcp", "udp"):
            raise PublishError(f"bad -p {spec!r}: protocol {suffix!r} is not tcp or udp", HINT)
        proto = suffix  # type: ignore[assignment]
    address = DEFAULT_HOST_ADDRESS
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1:close + 2] != ":":
            raise PublishError(f"bad -p {spec!r}: an IPv6 host address is written [ADDR]:HOSTPORT:SANDBOXPORT", HINT)
        address, text = text[1:close], text[close + 2:]
    parts = text.split(":")
    if len(parts) == 3:
        address, parts = parts[0], parts[1:]
    if len(parts) != 2:
        raise PublishError(f"bad -p {spec!r}: want HOSTPORT:SANDBOXPORT", HINT)
    try:
        address = str(ipaddress.ip_address(address))
    except ValueError:
        raise PublishError(f"bad -p {spec!r}: {address!r} is not an IP address", HINT) from None
    host_ports, sandbox_ports = _ports(parts[0], "host port", spec), _ports(parts[1], "sandbox port", spec)
    if len(host_ports) != len(sandbox_ports):
        raise PublishError(f"bad -p {spec!r}: the ranges differ in length ({len(host_ports)} and "
                           f"{len(sandbox_ports)} ports)", HINT)
    return [Publish(proto, address, h, s) for h, s in zip(host_ports, sandbox_ports)]


def parse_key(text: str) -> tuple[Proto, str | None, int]:
    """``ports rm`` argument: ``[ADDR:]HOSTPORT[/tcp|/udp]`` -> (proto, address or None = any, port)."""
    spec, proto = text.strip(), "tcp"
    if "/" in spec:
        spec, _, proto = spec.rpartition("/")
        if proto not in ("tcp", "udp"):
            raise PublishError(f"bad port {text!r}: protocol {proto!r} is not tcp or udp")
    try:
        address, port = hostsock.parse_endpoint(spec, None)
    except ValueError as exc:
        raise PublishError(f"bad port {exc}") from None
    return proto, address, port  # type: ignore[return-value]


def open_host_sockets(specs: list[Publish]) -> list[tuple[Publish, socket.socket]]:
    """Host sockets for ``specs`` (listening for TCP), all or none."""
    return hostsock.open_all(specs, lambda spec: hostsock.bind(
        spec.host_address, spec.host_port, socket.SOCK_DGRAM if spec.proto == "udp" else socket.SOCK_STREAM,
        f"publish {spec}"))
