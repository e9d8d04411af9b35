"""The capture ruleset installed in a sandbox's network namespace (pure: policy in, nft text out).

Theory of operation
-------------------
Six chains in one ``inet tether`` table (all sandbox traffic is locally generated):

* ``decide`` (filter, output, priority -180: after conntrack at -200, before UDP marking at -150
  and NAT at -100) sees the first packet of each new TCP connection or UDP flow with its
  *original* destination.  It is the compiled form of what the policy can decide WITHOUT NAMES,
  for each protocol in ``KERNEL_DECIDED`` (TCP; UDP flows are decided by the engine): the rules of ``Policy.ordered_rules()`` in order (first match
  wins), each ``accept`` or ``log group N prefix "tether:K" reject`` (TCP: with a reset; UDP: ICMP
  port unreachable).  So a denied ``connect()`` fails at once inside the kernel with
  ECONNREFUSED, and the NFLOG message tells the engine which rule (label K) refused it.  DNS (port
  53) to the stub's addresses — and with ``dns_to_stub`` to any server — is accepted before any
  rule: the stub answers it and applies the name policy.
* ``capture`` (nat, output, -100) redirects every TCP connection that survived ``decide`` to the
  engine's listener on 127.0.0.1:PORT / [::1]:PORT inside the netns (SO_ORIGINAL_DST tells the
  engine where it was going).
* ``mark_udp`` (route, output, mangle) marks UDP not addressed to a local address; a policy route
  (fwmark ``UDP_MARK`` -> table ``UDP_TABLE``: ``local default dev lo``) loops it back into the
  netns, where ``divert_udp`` (filter, prerouting, mangle) hands it with ``tproxy`` to the
  engine's transparent UDP socket on the same PORT.  (Skipping local destinations matters: the
  engine's replies are injected through the tun and must not be diverted again.)
* ``untracked_udp_out`` / ``untracked_udp_in`` (raw priority, output and prerouting) exempt UDP
  from conntrack: nothing above needs a UDP flow's state (the engine decides flows), and a
  request/response crosses conntrack three times inside the sandbox - a few µs of every UDP
  round trip.

What the kernel decides, and what it leaves to the engine
---------------------------------------------------------
The kernel does not know which names the DNS stub served for an address, so it must never refuse
what a name could allow, and never let through what must be refused whatever the names:

* user IP deny rules -> reject, logged with the rule's text;
* domain rules (deny or allow) -> not compiled.  A kernel ``accept`` only means "to the engine",
  which evaluates again with the names and resets what it denies (e.g. an IP allow shadowed by a
  domain deny of a name the sandbox resolved);
* user IP allow rules -> accept;
* builtin denies -> reject, with their ``builtin:...`` label.  Domain allows do not pierce them
  (DNS rebinding), so they are sound in the kernel.  ``Policy`` lists them only when they can
  matter (default allow, or default deny with domain allows); otherwise the default catch-all
  refuses those addresses as ``default``, which is what ``Policy.evaluate`` says too;
* the default-deny catch-all -> reject as ``default``, except for TCP ports some domain allow
  rule covers (``tcp dport != { ... }``); with a domain allow for any port there is no catch-all
  and everything left goes to the engine.

``Policy.ordered_rules()`` puts IP denies before domain denies, so a kernel reject is always a
deny for every set of names, with the same label unless a domain deny also matches (then the
kernel's label is the IP rule's or builtin's, which is just as true).

Traffic to the sandbox's own addresses leaves through ``lo`` and is never touched.  The gateway
10.0.2.2 is reachable only on ``--allow-host`` ports (the engine maps them to the host's
loopback); the rest of the sandbox subnets (10.0.2.0/24 and fd00:7e7e::/64, whose gateway
fd00:7e7e::2 has no ``--allow-host`` ports) is refused, except DNS to the stub.

The engine evaluates the same policy again on every accepted connection (defence in depth), so
this compiler and ``Policy.evaluate`` must agree; tests check that they do.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

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
    address6: ipaddress.IPv6Interface = ipaddress.IPv6Interface("fd00:7e7e::100/64")
    gateway6: ipaddress.IPv6Address = ipaddress.IPv6Address("fd00:7e7e::2")  # no --allow-host
    dns6: ipaddress.IPv6Address = ipaddress.IPv6Address("fd00:7e7e::3")


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
UDP_MARK = 0x7E7E  # marks sandbox UDP for the policy route to the TPROXY socket
UDP_TABLE = 0x7E7E  # routing table with "local default dev lo" for marked UDP


def _match(rule: Rule, proto: str) -> str:
    assert rule.network is not None, rule
    family = "ip" if rule.network.version == 4 else "ip6"
    parts = [f"meta l4proto {proto} {family} daddr {rule.network}"]
    if rule.ports is not None:
        lo, hi = rule.ports
        parts.append(f"{proto} dport {lo}" if lo == hi else f"{proto} dport {lo}-{hi}")
    return " ".join(parts)


def _merge(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, overlapping or adjacent ranges joined."""
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _default_catch_all(rules: Sequence[Rule], proto: str = "tcp") -> str | None:
    """The match of the default-deny catch-all for ``proto``: everything except the ports a
    domain allow rule could still allow (the engine decides those, with names); None if that
    leaves nothing."""
    domain_allows = [r for r in rules if r.domain is not None and r.action == "allow" and r.proto in (None, proto)]
    if not domain_allows:
        return f"meta l4proto {proto}"
    if any(r.ports is None for r in domain_allows):
        return None
    ports = _merge([r.ports for r in domain_allows if r.ports is not None])
    if ports == [(1, 65535)]:
        return None
    spec = ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports)
    return f"meta l4proto {proto} {proto} dport != {{ {spec} }}"


REJECT = {"tcp": "reject with tcp reset", "udp": "reject with icmpx type port-unreachable"}
# Protocols whose static policy the kernel enforces.  Not UDP: a datagram refused on the output
# path fails send() with EPERM, while a denied flow must look like an unreachable port
# (ECONNREFUSED on a connected socket); the engine refuses UDP flows with an ICMP error instead.
KERNEL_DECIDED = ("tcp",)


def compile_ruleset(rules: Sequence[Rule], default: Verdict, capture_port: int,
                    allow_host_ports: Sequence[int] = (), net: SandboxNet = SandboxNet(),
                    dns_to_stub: bool = True) -> Ruleset:
    """The nft script for ``rules`` (first match wins; pass ``Policy.ordered_rules()``, domain
    rules included: they are not compiled, but they say what must be left to the engine) and
    ``default``.  ``dns_to_stub``: port 53 to any server goes to the DNS stub (not refused by IP
    policy: the stub applies the name policy); otherwise only the stub's own addresses do."""
    labels: list[str] = []

    def deny(match: str, label: str, proto: str) -> str:
        labels.append(label)
        return f'{match} log group {NFLOG_GROUP} prefix "{LOG_PREFIX}{len(labels) - 1}" {REJECT[proto]}'

    lines = [
        'oifname "lo" accept',
        "ct state != new accept",
        f"meta l4proto {{ tcp, udp }} ip daddr {net.dns} th dport 53 accept",
        f"meta l4proto {{ tcp, udp }} ip6 daddr {net.dns6} th dport 53 accept",
    ]
    if dns_to_stub:
        lines.append("meta l4proto { tcp, udp } th dport 53 accept")
    if allow_host_ports:
        ports = ", ".join(str(p) for p in sorted(set(allow_host_ports)))
        lines.append(f"meta l4proto {{ tcp, udp }} ip daddr {net.gateway} th dport {{ {ports} }} accept")
    for proto in KERNEL_DECIDED:
        lines.append(deny(f"meta l4proto {proto} ip daddr {net.address.network}", GATEWAY_RULE, proto))
        lines.append(deny(f"meta l4proto {proto} ip6 daddr {net.address6.network}", GATEWAY_RULE, proto))
        for rule in rules:
            if rule.domain is not None or rule.proto not in (None, proto):
                continue
            match = _match(rule, proto)
            lines.append(f"{match} accept" if rule.action == "allow" else deny(match, rule.text, proto))
        if default == "deny":
            catch_all = _default_catch_all(rules, proto)
            if catch_all is not None:
                lines.append(deny(catch_all, "default", proto))

    body = "\n".join(f"\t\t{line}" for line in lines)
    script = f"""table inet {TABLE} {{
\tchain decide {{
\t\ttype filter hook output priority -180; policy accept;
{body}
\t}}
\tchain capture {{
\t\ttype nat hook output priority -100; policy accept;
\t\toifname "lo" return
\t\tmeta l4proto tcp redirect to :{capture_port}
\t}}
\tchain mark_udp {{
\t\ttype route hook output priority mangle; policy accept;
\t\tmeta l4proto udp fib daddr type local return
\t\tmeta l4proto udp meta mark set {UDP_MARK:#x}
\t}}
\tchain divert_udp {{
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\tmeta nfproto ipv4 meta l4proto udp meta mark {UDP_MARK:#x} tproxy ip to 127.0.0.1:{capture_port} accept
\t\tmeta nfproto ipv6 meta l4proto udp meta mark {UDP_MARK:#x} tproxy ip6 to [::1]:{capture_port} accept
\t}}
}}
"""
    return Ruleset(script, labels)
