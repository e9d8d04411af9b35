"""Socket activation (``tether run --listen [ADDR:]PORT``): the fast path for servers.

Theory of operation
-------------------
tether creates a listening TCP socket in the *host* netns before the sandbox starts and hands it
to CMD the way systemd does (``sd_listen_fds(3)``): the sockets are fds 3, 4, ... in the order
given, ``LISTEN_FDS`` says how many, ``LISTEN_PID`` is CMD's own pid (as CMD sees it, inside the
sandbox's pid namespace) and ``LISTEN_FDNAMES`` names them (``ADDR:PORT`` with ``:`` unusable, so
``tcp-PORT``).  CMD accepts directly: no relay, no copy, kernel speed, and ``getpeername`` is the
real client.  tether keeps no copy of a listening socket, so it never competes for connections.

What CMD reaches *out* to is still policed (the sandbox's own connections go through the proxy
engine); what comes *in* on these sockets is whatever the host lets reach ``ADDR:PORT``.  The
default address is 127.0.0.1: listening on every interface (``0.0.0.0:PORT`` or ``[::]:PORT``)
must be written out.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tether import hostsock
from tether.errors import TetherError

DEFAULT_ADDRESS = "127.0.0.1"
FIRST_FD = 3  # SD_LISTEN_FDS_START
ENV_KEYS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


class ListenError(TetherError):
    """A ``--listen`` that cannot be honoured."""


@dataclass(frozen=True)
class Listen:
    address: str
    port: int

    @property
    def name(self) -> str:
        """The ``LISTEN_FDNAMES`` entry (no ``:`` allowed there)."""
        return f"tcp-{self.port}"

    def __str__(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


def parse_endpoint(text: str, default_address: str = DEFAULT_ADDRESS) -> tuple[str, int]:
    """``PORT``, ``ADDR:PORT`` or ``[V6ADDR]:PORT`` -> (address, port).  ValueError says what is wrong."""
    address, port = hostsock.parse_endpoint(text, default_address)
    assert address is not None
    return address, port


def parse_listen(text: str) -> Listen:
    try:
        return Listen(*parse_endpoint(text))
    except ValueError as exc:
        raise ListenError(f"bad --listen {exc}", "--listen [ADDR:]PORT, e.g. --listen 8443 or "
                                                  "--listen 0.0.0.0:8443 or --listen '[::1]:8443'") from None


def open_listeners(listens: Sequence[Listen]) -> list[socket.socket]:
    """Bound, listening sockets for ``listens`` (all or none).  CMD accepts with blocking calls
    as it likes: the sockets it gets are blocking."""
    made = hostsock.open_all(listens, lambda listen: hostsock.bind(listen.address, listen.port,
                                                                   socket.SOCK_STREAM, f"listen on {listen}"))
    for _, sock in made:
        sock.setblocking(True)
    return [sock for _, sock in made]


def hand_over(fds: Sequence[int], names: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """In CMD's process, just before exec: put ``fds`` at 3, 4, ... (inheritable) and return the
    environment with ``LISTEN_*`` set - or, with no fds, with any inherited ``LISTEN_*`` removed
    (they would describe someone else's sockets).  Every other fd >= 3 is the caller's to close."""
    env = {k: v for k, v in environ.items() if k not in ENV_KEYS}
    if not fds:
        return env
    # Copies above the target slots first: a target slot may hold another of the fds.
    above = FIRST_FD + len(fds)
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above) for fd in fds]
    for index, fd in enumerate(high):
        os.dup2(fd, FIRST_FD + index, inheritable=True)
    for fd in high:
        os.close(fd)
    env.update(LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=":".join(names))
    return env
