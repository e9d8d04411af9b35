"""Configure (and unconfigure) the network of the netns the calling process is in.

Theory of operation
-------------------
One mechanism for every entry point: the ``tether run`` spawner calls ``configure`` right after
``unshare()``; the daemon's short-lived helper calls it after ``setns()`` into a container's netns
(``tether.daemon.enter``).  Either way the caller is single-threaded, holds CAP_NET_ADMIN over the
netns, and gets back open fds that work from any netns afterwards:

* ``tun`` - opened *here*, so the device lands in this netns (it vanishes with its last fd);
* with ``capture`` (the proxy engine): the TCP capture listeners and TPROXY UDP sockets on this
  netns' loopback (``tcp4``/``udp4``/``tcp6``/``udp6``), the capture ruleset (one nft
  transaction, replacing a table a crashed daemon left), the policy routes that loop marked UDP
  back to the TPROXY socket, and the NFLOG socket the engine learns the kernel's refusals from.

Without ``capture`` (an external engine owns the tun) only the tun, its addresses and its routes
are set up.  ``configure`` tolerates what a previous, crashed owner of the same netns left
(existing rules, the divert route, the nft table) so a restarted daemon can set a container up
again; ``unconfigure`` removes everything ``configure`` added that does not vanish with the tun.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from tether import _sys
from tether.errors import TetherError
from tether.net import nflog
from tether.net.nft import NFLOG_GROUP, TABLE, UDP_MARK, UDP_TABLE, SandboxNet
from tether.net.rtnl import NetlinkError, Rtnl

LOOPBACK_MTU = 65575
ANYWHERE = {4: ipaddress.ip_network("0.0.0.0/0"), 6: ipaddress.ip_network("::/0")}
LOOPBACK = {4: ipaddress.ip_address("127.0.0.1"), 6: ipaddress.ip_address("::1")}
FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class NetSetupError(TetherError):
    """The netns could not be configured; ``hint`` says how to fix the machine when we know."""


@dataclass
class NetPlan:
    """What to build in the netns.  ``capture``: the proxy engine's capture machinery."""

    interface: str = "tun0"
    mtu: int = 65520
    addresses: list[Interface] = field(default_factory=list)
    routes: list[tuple[Network, Address | None]] = field(default_factory=list)  # (destination, gateway)
    capture: bool = True
    families: tuple[int, ...] = (4, 6)  # the families the capture machinery serves
    vnet_header: bool = True
    packet_info: bool = False  # the tun's 4-byte PI header (wireguard-go reads with it)

    @classmethod
    def for_proxy(cls, net: SandboxNet, ipv4: bool = True, ipv6: bool = True, interface: str = "tun0") -> NetPlan:
        families = tuple(f for f, on in ((4, ipv4), (6, ipv6)) if on)
        addresses = [a for f, a in ((4, net.address), (6, net.address6)) if f in families]
        routes = [(ANYWHERE[f], g) for f, g in ((4, net.gateway), (6, net.gateway6)) if f in families]
        return cls(interface, net.mtu, addresses, routes, True, families, True)

    def to_json(self) -> dict:
        return {"interface": self.interface, "mtu": self.mtu, "addresses": [str(a) for a in self.addresses],
                "routes": [[str(d), None if g is None else str(g)] for d, g in self.routes],
                "capture": self.capture, "families": list(self.families), "vnet_header": self.vnet_header,
                "packet_info": self.packet_info}

    @classmethod
    def from_json(cls, obj: dict) -> NetPlan:
        return cls(obj["interface"], obj["mtu"], [ipaddress.ip_interface(a) for a in obj["addresses"]],
                   [(ipaddress.ip_network(d), None if g is None else ipaddress.ip_address(g))
                    for d, g in obj["routes"]],
                   obj["capture"], tuple(obj["families"]), obj["vnet_header"], obj.get("packet_info", False))


def configure(plan: NetPlan, ruleset_for_port: Callable[[int], str] | None = None,
              replace: bool = False) -> list[tuple[str, int | socket.socket]]:
    """Build ``plan`` in the current netns; the named fds, tun first (the caller owns them).
    ``replace``: an earlier owner may have left rules and a ruleset behind (a crashed daemon)."""
    made: list[tuple[str, int | socket.socket]] = []
    try:
        _configure(plan, ruleset_for_port, replace, made)
    except BaseException:
        close_named(made)
        raise
    return made


def _configure(plan: NetPlan, ruleset_for_port: Callable[[int], str] | None, replace: bool,
               made: list[tuple[str, int | socket.socket]]) -> None:
    with Rtnl() as rtnl:
        # The largest IPv6 packet without jumbograms: diverted UDP loops through lo, and a
        # fragmented IPv6 datagram there would not reach the TPROXY socket (65527-byte payloads).
        rtnl.link_up("lo", mtu=LOOPBACK_MTU if plan.capture else None)
        try:
            made.append(("tun", _sys.open_tun(plan.interface, plan.vnet_header, plan.packet_info)))
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise NetSetupError(f"cannot create {plan.interface}: an interface of that name exists in the "
                                    "network namespace") from None
            raise NetSetupError(f"cannot create the tun device {plan.interface}: /dev/net/tun: {exc.strerror}",
                                "allow access to /dev/net/tun: chmod 0666 /dev/net/tun "
                                "(the default on most distributions)") from None
        rtnl.link_up(plan.interface, mtu=plan.mtu)
        for address in plan.addresses:
            rtnl.add_address(plan.interface, address)
        for destination, gateway in plan.routes:
            # EEXIST: the kernel's own route to an address's prefix, on this same tun already
            _tolerating(errno.EEXIST, lambda: rtnl.add_route(plan.interface, destination, gateway))
        if plan.capture:
            for family in plan.families:
                for add in _divert_steps(rtnl, family):
                    _tolerating(errno.EEXIST if replace else None, add)
    if not plan.capture:
        return
    made.extend(_capture_sockets(plan.families))
    port = made[1][1].getsockname()[1]  # type: ignore[union-attr]
    assert ruleset_for_port is not None
    script = ruleset_for_port(port)
    if replace:
        script = f"add table inet {TABLE}\ndelete table inet {TABLE}\n{script}"
    run_nft(script, "install the capture ruleset")
    made.append(("nflog", nflog.open_socket(NFLOG_GROUP)))


def _divert_steps(rtnl: Rtnl, family: int, delete: bool = False) -> list[Callable[[], None]]:
    """The policy routing of captured UDP: marked datagrams, and a published port's replies
    (from the loopback address the engine's inside socket connected to), are delivered locally,
    to the TPROXY / transparent sockets."""
    return [lambda: rtnl.add_rule(FAMILY[family], UDP_TABLE, priority=100, fwmark=UDP_MARK, delete=delete),
            lambda: rtnl.add_rule(FAMILY[family], UDP_TABLE, priority=99, source=LOOPBACK[family], delete=delete),
            lambda: rtnl.add_route("lo", ANYWHERE[family], table=UDP_TABLE, local=True, delete=delete)]


def _tolerating(code: int | None, step: Callable[[], None]) -> None:
    try:
        step()
    except NetlinkError as exc:
        if exc.errno != code:
            raise


def unconfigure(plan: NetPlan) -> list[str]:
    """Remove what ``configure`` added that outlives the tun (call after every copy of the tun fd
    is closed).  Best effort, every step tried: the problems, for the caller's log."""
    problems: list[str] = []
    if plan.capture:
        try:
            run_nft(f"add table inet {TABLE}\ndelete table inet {TABLE}\n", "remove the capture ruleset")
        except NetSetupError as exc:
            problems.append(str(exc))
        with Rtnl() as rtnl:
            for family in plan.families:
                for step in _divert_steps(rtnl, family, delete=True):
                    try:
                        _tolerating(errno.ENOENT, step)
                    except OSError as exc:
                        problems.append(str(exc))
    return problems


def run_nft(script: str, what: str) -> None:
    try:
        nft = _sys.Nftables()
    except OSError as exc:
        raise NetSetupError(f"cannot load libnftables: {exc}", "install nftables: apt-get install nftables") from None
    try:
        nft.run(script)
    except OSError as exc:
        raise NetSetupError(f"cannot {what}: {exc.strerror or exc}") from None
    finally:
        nft.close()


def _capture_sockets(families: tuple[int, ...]) -> list[tuple[str, socket.socket]]:
    """TCP listeners and TPROXY UDP sockets on the netns' loopback, all on one port (the first
    listener's ephemeral port; the others are free on it in a netns nobody else uses it in)."""
    made: list[tuple[str, socket.socket]] = []
    port = 0
    try:
        for family in families:
            loopback = str(LOOPBACK[family])
            listener = socket.socket(FAMILY[family], socket.SOCK_STREAM)
            made.append((f"tcp{family}", listener))
            listener.bind((loopback, port))
            listener.listen(4096)
            port = listener.getsockname()[1]
            made.append((f"udp{family}", _sys.transparent_udp_socket(FAMILY[family], loopback, port)))
    except BaseException:
        close_named(made)
        raise
    return made


def close_named(named: list[tuple[str, int | socket.socket]]) -> None:
    for _, item in named:
        try:
            item.close() if isinstance(item, socket.socket) else os.close(item)
        except OSError:
            pass


def fileno(item: int | socket.socket) -> int:
    return item.fileno() if isinstance(item, socket.socket) else item


def detach(item: int | socket.socket) -> int:
    """The fd, no longer closed when the socket object is collected (it is being handed over)."""
    return item.detach() if isinstance(item, socket.socket) else item
