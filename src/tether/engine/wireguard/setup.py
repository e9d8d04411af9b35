"""``tether run --wireguard FILE``: what the run needs from a wg-quick file, before any isolation.

Everything that must happen in the host's context happens here, before the sandbox exists: the
file is parsed (``conf``), peers' host names are resolved (the sandbox will have no resolver but
the tunnel's), the tunnel's UDP socket is bound in the host netns (so the tunnel's own datagrams
never enter the sandbox, rootless or not), and the sandbox's network is planned: ``tun0`` with the
file's addresses and MTU (and a virtio-net header: the engine segments and coalesces TCP
itself, see ``engine``), a route for every peer's AllowedIPs (``0.0.0.0/0`` and ``::/0`` become
default routes), no capture rules - whatever the sandbox sends goes into the tunnel or nowhere
(with no handshake, nowhere: a kill switch by construction) - and ``/etc/resolv.conf`` from the
file's DNS lines.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from tether.engine.wireguard.conf import ConfError, WgConfig, load_conf
from tether.engine.wireguard.device import Device
from tether.engine.wireguard.engine import (ALL_OFFLOADS, WireGuardEngine, offloads_from_environment,
                                            open_udp_socket, protocol_clock, time_scale_from_environment)
from tether.errors import TetherError
from tether.ns.netsetup import NetPlan

INTERFACE = "tun0"


class WireGuardSetupError(TetherError):
    """The file or its endpoints cannot be used; nothing was started."""


@dataclass
class Tunnel:
    """The tunnel's host side before the sandbox's tun exists: its UDP socket (owned: ``close``)
    and the device."""

    sock: socket.socket
    device: Device
    plan: NetPlan
    time_scale: float
    offloads: frozenset[str] = ALL_OFFLOADS

    def engine(self, tun: int) -> WireGuardEngine:
        """The engine for the sandbox's ``tun`` (made from ``plan``)."""
        return WireGuardEngine(tun, self.sock, self.device, vnet_header=self.plan.vnet_header,
                               time_scale=self.time_scale, offloads=self.offloads)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Prepared:
    path: str
    config: WgConfig
    plan: NetPlan
    resolv_conf: str
    endpoints: dict[bytes, tuple[str, int]]  # peers' host names, resolved
    time_scale: float = 1.0  # tests only: TETHER_WG_TEST_TIME_SCALE
    offloads: frozenset[str] = ALL_OFFLOADS  # TETHER_WG_OFFLOADS

    def start(self) -> Tunnel:
        """Bind the tunnel's UDP socket (in the caller's - the host's - netns) and build the device."""
        port = self.config.interface.listen_port
        try:
            sock = open_udp_socket(port)
        except OSError as exc:
            raise WireGuardSetupError(f"cannot bind the tunnel's UDP port {port or 0}: {exc.strerror or exc}") from None
        try:
            device = Device.from_config(self.config, self.endpoints, clock=protocol_clock(self.time_scale))
        except ValueError as exc:
            sock.close()
            raise WireGuardSetupError(f"{self.path}: {exc}") from None
        return Tunnel(sock, device, self.plan, self.time_scale, self.offloads)


def prepare(path: str) -> Prepared:
    try:
        config = load_conf(path)
    except ConfError as exc:
        raise WireGuardSetupError(str(exc), exc.hint) from None
    if not config.interface.addresses:
        raise WireGuardSetupError(f"{path}: [Interface] has no Address: the sandbox would have no address "
                                  "inside the tunnel")
    try:
        time_scale = time_scale_from_environment()
        offloads = offloads_from_environment()
    except ValueError as exc:
        raise WireGuardSetupError(str(exc)) from None
    endpoints = {peer.public_key: _resolve(peer.endpoint.host, peer.endpoint.port)
                 for peer in config.peers if peer.endpoint is not None and peer.endpoint.address is None}
    return Prepared(path, config, net_plan(config), resolv_conf(config), endpoints, time_scale, offloads)


def net_plan(config: WgConfig) -> NetPlan:
    routes = []
    for peer in config.peers:
        for network in peer.allowed_ips:
            routes.append((ipaddress.ip_network(network), None))
    return NetPlan(INTERFACE, config.interface.mtu, list(config.interface.addresses), list(dict.fromkeys(routes)),
                   capture=False, families=(), vnet_header=True)


def resolv_conf(config: WgConfig) -> str:
    lines = [f"nameserver {server}" for server in config.interface.dns]
    if config.interface.dns_search:
        lines.append("search " + " ".join(config.interface.dns_search))
    if not lines:
        return "# no DNS in the WireGuard config: names do not resolve in this sandbox\n"
    return "\n".join(lines) + "\n"


def _resolve(host: str, port: int) -> tuple[str, int]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise WireGuardSetupError(f"cannot resolve the endpoint {host}: {exc.strerror}") from None
    return infos[0][4][0], port
