"""One place that turns "the sandbox wants to reach ADDR:PORT" into a decision and a target.

Every protocol handler (TCP, UDP, ICMP) asks the same ``Decider`` so that the gateway mapping,
the sandbox's own subnets and the names served by the DNS stub are handled identically:

* the IPv4 gateway 10.0.2.2 on an ``--allow-host`` port becomes the host's 127.0.0.1:PORT;
  anything else in the sandbox's own subnets (IPv4 and IPv6) is refused with rule ``gateway``;
* otherwise the policy decides, with the names the stub served for that address to *this*
  sandbox (``NameMap``), so domain rules apply to connections and datagrams alike.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from tether.net.nft import GATEWAY_RULE, SandboxNet
from tether.policy import Decision, Policy

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Decider:
    def __init__(self, policy: Policy, net: SandboxNet, allow_host_ports: Iterable[int] = (),
                 names=None) -> None:
        self.policy = policy
        self.net = net
        self.allow_host_ports = frozenset(allow_host_ports)
        self.names = names  # tether.names.NameMap, or None before DNS exists
        self._own = (net.address.network, net.address6.network)

    def names_for(self, ip: IPAddress) -> tuple[str, ...]:
        return self.names.names_for(ip) if self.names is not None else ()

    def decide(self, proto: str, addr: str | IPAddress, port: int) -> tuple[Decision, tuple[str, int]]:
        """(decision, address to dial) for an original destination."""
        ip = ipaddress.ip_address(addr)
        if ip == self.net.gateway and proto in ("tcp", "udp") and port in self.allow_host_ports:
            return Decision("allow", f"allow-host:{port}"), ("127.0.0.1", port)
        if any(ip in network for network in self._own):  # a version mismatch is simply "not in"
            return Decision("deny", GATEWAY_RULE), (str(ip), port)
        names = self.names_for(ip)
        return self.policy.evaluate(proto, ip, port, names=names), (str(ip), port)
