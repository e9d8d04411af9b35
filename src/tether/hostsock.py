"""Sockets tether opens on the host for others to reach the sandbox (``-p``, ``--listen``), and
the ``[ADDR:]PORT`` endpoints that name them.

One place binds them, so both get the same options (SO_REUSEADDR; IPv6 sockets v6-only unless
``[::]`` is meant as dual-stack, which the caller asks for) and the same errors: the address and
port, the kernel's reason and a hint for the usual causes.  A batch is all or none.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable, Sequence
from typing import TypeVar

from tether.errors import TetherError

BACKLOG = 4096
HINTS = {errno.EADDRINUSE: "another process (or another -p/--listen) uses it; pick another port",
         errno.EACCES: "ports below 1024 need root (or net.ipv4.ip_unprivileged_port_start)",
         errno.EADDRNOTAVAIL: "that address is not one of this host's"}

T = TypeVar("T")


class HostSocketError(TetherError):
    """A host socket that cannot be opened; the message says which and why."""


def parse_endpoint(text: str, default_address: str | None) -> tuple[str | None, int]:
    """``PORT``, ``ADDR:PORT`` or ``[V6ADDR]:PORT`` -> (address or ``default_address``, port).
    ValueError says what is wrong, quoting ``text``."""
    text = text.strip()
    address: str | None
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1:close + 2] != ":":
            raise ValueError(f"{text!r}: an IPv6 address is written [ADDR]:PORT")
        address, port_text = text[1:close], text[close + 2:]
    elif ":" in text:
        address, _, port_text = text.rpartition(":")
        if ":" in address:
            raise ValueError(f"{text!r}: an IPv6 address is written [ADDR]:PORT")
    else:
        address, port_text = default_address, text
    if address is not None:
        try:
            address = str(ipaddress.ip_address(address))
        except ValueError:
            raise ValueError(f"{text!r}: {address!r} is not an IP address") from None
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be 1-65535")
    return address, int(port_text)


def bind(address: str, port: int, kind: int, what: str, v6only: bool = True) -> socket.socket:
    """A socket bound to ``address:port`` (listening, for TCP), non-blocking.  ``what`` names it
    in the error ("publish 127.0.0.1:8080->80/tcp", "listen on 127.0.0.1:8443")."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        try:
            sock.bind((address, port))
        except OSError as exc:
            raise HostSocketError(f"cannot {what}: {exc.strerror}", HINTS.get(exc.errno or 0)) from None
        if kind == socket.SOCK_STREAM:
            sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def open_all(items: Sequence[T], opener: Callable[[T], socket.socket]) -> list[tuple[T, socket.socket]]:
    """``opener`` for each item, all or none: on a failure the sockets made are closed."""
    made: list[tuple[T, socket.socket]] = []
    try:
        for item in items:
            made.append((item, opener(item)))
    except BaseException:
        for _, sock in made:
            sock.close()
        raise
    return made
