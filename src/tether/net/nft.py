"""The capture ruleset installed in a sandbox's network namespace (pure: policy in, nft text out).

Theory of operation
-------------------
Two chains in one ``inet tether`` table, both on the ``output`` hook (all sandbox traffic is
locally generated):

* ``decide`` (filter, priority -150: after conntrack at -200, before NAT at -100) sees the first
  packet of each new TCP connection with its *original* destination.  It is the compiled form of
  the policy: rules in evaluation order (``Policy.ordered_rules()``: first match wins), each
  ``accept`` (allow) or ``log group N prefix "tether:K" reject with tcp reset`` (deny).  So a
  denied ``connect()`` fails at once with ECONNREFUSED inside the kernel, and the NFLOG message
  tells the engine which rule (label K) refused it, for the audit log.
* ``capture`` (nat, priority -100) redirects every TCP connection that survived ``decide`` to
  the engine's listening socket on 127.0.0.1:PORT inside the sandbox netns; the engine reads
  SO_ORIGINAL_DST and dials from the host.

Traffic to the sandbox's own addresses leaves through ``lo`` and is never touched.  The gateway
10.0.2.2 is reachable only on ``--allow-host`` ports (the engine maps them to the host's
loopback); the rest of the sandbox subnet is refused.  UDP is refused with ICMP port unreachable
(and logged) until the UDP relay exists, so resolvers fail fast instead of timing out.

The engine evaluates the same policy again on every accepted connection (defence in depth), so
this compiler and ``Policy.evaluate`` must agree; tests check that they do.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from collections.abc import Sequence

from tether.policy import Rule, Verdict

TABLE = "tether"
NFLOG_GROUP = 1
LOG_PREFIX = "tether:"


@dataclass(frozen=True)
class SandboxNet:
    """Addresses of the sandbox side of the proxy engine."""

    address: ipaddress.IPv4Interface = ipaddress.IPv4Interface("10.0.2.100/24")
    gateway: ipaddress.IPv4Address = ipaddress.IPv4Address("10.0.2.2")
    dns: ipaddress.IPv4Address = ipaddress.IPv4Address("10.0.2.3")
    mtu: int = 65520


@dataclass
class Ruleset:
    """nft script plus the meaning of each NFLOG prefix label it uses."""

    script: str
    labels: list[str] = field(default_factory=list)

    def label_of(self, prefix: str) -> str | None:
        """Map an NFLOG prefix (``tether:K``) back to the rule text it stands for."""
        if not prefix.startswith(LOG_PREFIX):
            return None
        index = prefix[len(LOG_PREFIX):]
        if not (index.isascii() and index.isdigit()) or int(index) >= len(self.labels):
            return None
        return self.labels[int(index)]


GATEWAY_RULE = "gateway"
UDP_RULE = "udp-not-relayed"


def _match(rule: Rule) -> str:
    family = "ip" if rule.network.version == 4 else "ip6"
    parts = [f"meta l4proto tcp {family} daddr {rule.network}"]
    if rule.ports is not None:
        lo, hi = rule.ports
        parts.append(f"tcp dport {lo}" if lo == hi else f"tcp dport {lo}-{hi}")
    return " ".join(parts)


def compile_ruleset(rules: Sequence[Rule], default: Verdict, capture_port: int,
                    allow_host_ports: Sequence[int] = (), net: SandboxNet = SandboxNet()) -> Ruleset:
    """The nft script for ``rules`` (first match wins) and ``default``."""
    labels: list[str] = []

    def deny(match: str, label: str, reject: str = "reject with tcp reset") -> str:
        labels.append(label)
        return f'{match} log group {NFLOG_GROUP} prefix "{LOG_PREFIX}{len(labels) - 1}" {reject}'

    subnet = net.address.network
    lines = [
        'oifname "lo" accept',
        "ct state != new accept",
    ]
    if allow_host_ports:
        ports = ", ".join(str(p) for p in sorted(set(allow_host_ports)))
        lines.append(f"meta l4proto tcp ip daddr {net.gateway} tcp dport {{ {ports} }} accept")
    lines.append(deny(f"meta l4proto tcp ip daddr {subnet}", GATEWAY_RULE))
    for rule in rules:
        if rule.proto == "udp":
            continue
        lines.append(f"{_match(rule)} accept" if rule.action == "allow" else deny(_match(rule), rule.text))
    if default == "deny":
        lines.append(deny("meta l4proto tcp", "default"))
    lines.append(deny("meta l4proto udp", UDP_RULE, "reject with icmpx type port-unreachable"))

    body = "\n".join(f"\t\t{line}" for line in lines)
    script = f"""table inet {TABLE} {{
\tchain decide {{
\t\ttype filter hook output priority -150; policy accept;
{body}
\t}}
\tchain capture {{
\t\ttype nat hook output priority -100; policy accept;
\t\toifname "lo" return
\t\tmeta l4proto tcp redirect to :{capture_port}
\t}}
}}
"""
    return Ruleset(script, labels)
