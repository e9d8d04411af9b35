"""What one configured container gets, derived from its ``ContainerConfig`` (pure).

The daemon (for the netns helper: the plan and the ruleset) and the engine worker (for its
policy and the NFLOG labels) derive the same things from the same config through these
functions, so the kernel's ruleset and the engine's decisions can never disagree.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Iterable

from tether.config import ContainerConfig
from tether.net.nft import Ruleset, SandboxNet, compile_ruleset
from tether.ns.netsetup import ANYWHERE, NetPlan
from tether.policy import Policy, build_policy, load_policy_file

PROXY_MTU = 65520
EXTERNAL_MTU = 1420
EXTERNAL_ADDRESS = "10.0.2.100/24"
IFNAMSIZ = 15  # usable bytes of an interface name


def sandbox_net(config: ContainerConfig) -> SandboxNet:
    return SandboxNet(mtu=config.mtu or PROXY_MTU)


def interface_name(config: ContainerConfig) -> str:
    """The tun's name.  An external program sees it in the daemon's netns too (a placeholder of
    the same name, see ``session``), so external engines get a name unique on the host."""
    if config.engine == "wireguard":
        from tether.engine.wireguard.setup import INTERFACE

        return INTERFACE
    if config.engine != "external":
        return "tun0"
    if config.interface:
        return config.interface
    name = "tt-" + config.name
    if len(name) <= IFNAMSIZ:
        return name
    # truncated names could collide (database-primary-1/-2): keep them apart with a digest
    return f"tt-{config.name[:7]}-{hashlib.sha256(config.name.encode()).hexdigest()[:4]}"


def net_plan(config: ContainerConfig) -> NetPlan:
    if config.engine == "wireguard":  # imported here: proxy workers never load the WireGuard stack
        from tether.engine.wireguard import setup
        from tether.engine.wireguard.conf import load_conf

        return setup.net_plan(load_conf(config.config))
    if config.engine == "external":
        addresses = [ipaddress.ip_interface(a) for a in (config.addresses or (EXTERNAL_ADDRESS,))]
        routes = [(ipaddress.ip_network(r), None) for r in config.routes] if config.routes else \
            [(ANYWHERE[a.version], None) for a in addresses]
        return NetPlan(interface_name(config), config.mtu or EXTERNAL_MTU, addresses,
                       list(dict.fromkeys(routes)), capture=False, families=(), vnet_header=False,
                       packet_info=config.tun_packet_info)
    return NetPlan.for_proxy(sandbox_net(config), config.ipv4, config.ipv6)


def build_container_policy(config: ContainerConfig, host_addresses: Iterable = ()) -> Policy:
    """The container's policy: its policy file's rules, then the config's; the default is the
    config's, else the policy file's, else "allow" - as ``tether run --policy FILE [--default]``
    (``PolicyFileError`` / ``RuleError`` for a bad or unreadable file)."""
    spec = load_policy_file(config.policy) if config.policy else None
    return build_policy(spec, list(config.allow), list(config.deny), config.default, host_addresses)


def ruleset_for(config: ContainerConfig, policy: Policy) -> Callable[[int], Ruleset]:
    net = sandbox_net(config)
    return lambda port: compile_ruleset(policy.ordered_rules(), policy.default, port, list(config.allow_host), net,
                                        dns_to_stub=True)
