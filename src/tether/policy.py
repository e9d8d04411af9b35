"""Network policy: parse IP/port rules and decide allow or deny for one destination.

Rules of this file:
  * It is pure. Nothing here opens a socket or looks at the host; the only I/O is reading a policy
    file in `load_policy_file`. The host's own addresses come in as arguments.
  * Every decision names the rule that made it (its text as the user wrote it, a "builtin:..."
    label, or "default"), because every decision becomes an audit event and a deny must be loud.

Theory of operation. A rule is `[tcp://|udp://]ADDR_OR_CIDR[:PORT|:LO-HI]`, IPv6 in brackets when a
port follows. `parse_rule` turns the text into a `Rule` (network, inclusive port range or None,
proto or None) or raises `RuleError` saying what is wrong. A `Policy` is an ordered list of rules
and a default verdict; evaluation is FIRST MATCH WINS over `Policy.ordered_rules()`:

    user deny rules  ->  user allow rules  ->  builtin denies (only if default == "allow")  ->  default

so deny beats allow, and an explicit allow (e.g. 127.0.0.1:8080) pierces the builtin profile. The
same list is what the nftables compiler emits, so the kernel and `Policy.evaluate` cannot disagree.

The builtin profile (BUILTIN_RANGES) is written out as a table and is exhaustive on purpose: we do
not use `ipaddress.is_private`, which also calls the documentation ranges (192.0.2.0/24,
2001:db8::/32, ...) private, while tether treats them as public.

IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) are the IPv4 address: a dual-stack socket reports a v4
peer that way, and a policy must not be bypassable by spelling. Mapped rules are stored as IPv4.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Literal

Verdict = Literal["allow", "deny"]
Proto = Literal["tcp", "udp"]
IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

_VERDICTS = ("allow", "deny")
_PROTOS = ("tcp", "udp")
_MAPPED = IPv6Network("::ffff:0:0/96")

# The builtin default-deny profile, in evaluation order. Exhaustive: see the module docstring.
BUILTIN_RANGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("builtin:loopback", ("127.0.0.0/8", "::1/128")),
    ("builtin:link-local", ("169.254.0.0/16", "fe80::/10")),  # includes metadata 169.254.169.254
    ("builtin:private", ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")),
    ("builtin:cgnat", ("100.64.0.0/10",)),
    ("builtin:multicast", ("224.0.0.0/4", "ff00::/8")),
    ("builtin:unspecified", ("0.0.0.0/32", "::/128")),
)

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_PORTS = re.compile(r"([0-9]+)(?:-([0-9]+))?")
_PREFIX = re.compile(r"[0-9]+")
# Looks like a host name (optionally a "*." wildcard) rather than a mistyped address.
_DOMAIN = re.compile(r"(\*\.)?([A-Za-z0-9_-]+\.)*[A-Za-z0-9_-]*[A-Za-z][A-Za-z0-9_-]*\.?")


class RuleError(ValueError):
    """A rule string that cannot be parsed. str() names the rule and what is wrong, e.g.
    "bad rule '10.0.0.0/33': prefix length 33 is out of range for IPv4 (0-32)"."""

    def __init__(self, rule: str, reason: str) -> None:
        super().__init__(f"bad rule '{rule}': {reason}")
        self.rule = rule
        self.reason = reason

    def __reduce__(self):  # keep picklable despite the two-argument constructor
        return (type(self), (self.rule, self.reason))


_MEMO_LIMIT = 4096  # destinations remembered per policy (cleared when full)

class PolicyFileError(ValueError):
    """Bad policy TOML file: message names the file, the key (and line for TOML syntax errors) and what is wrong."""


def _unmap(addr: IPAddress) -> IPAddress:
    """::ffff:a.b.c.d -> a.b.c.d, so that a v4 destination matches v4 rules however it is spelled."""
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True)
class Rule:
    text: str  # as written by the user (stripped), or a builtin label "builtin:loopback" etc.
    action: Verdict
    network: IPNetwork
    ports: tuple[int, int] | None  # inclusive range, None = any port
    proto: Proto | None  # None = tcp and udp

    def matches(self, proto: Proto, addr: IPAddress, port: int) -> bool:
        if self.proto is not None and proto != self.proto:
            return False
        if self.ports is not None and not (self.ports[0] <= port <= self.ports[1]):
            return False
        return _unmap(addr) in self.network  # False, not an error, across address families


def _small_int(digits: str) -> int:
    """int() of a digit string, clamped so a 5000-digit "port" is out of range, not a crash."""
    return int(digits) if len(digits) <= 6 else 10**6


def _parse_ports(rule: str, spec: str) -> tuple[int, int]:
    if spec == "":
        raise RuleError(rule, "missing port after ':'")
    m = _PORTS.fullmatch(spec)
    if m is None:
        raise RuleError(rule, f"bad port '{spec}' (expected PORT or LO-HI, 1-65535)")
    lo = _small_int(m[1])
    hi = _small_int(m[2]) if m[2] is not None else lo
    for digits, p in ((m[1], lo), (m[2] or m[1], hi)):
        if not 1 <= p <= 65535:
            raise RuleError(rule, f"port {digits} is out of range (1-65535)")
    if lo > hi:
        raise RuleError(rule, f"port range {lo}-{hi} is reversed (LO must be <= HI)")
    return lo, hi


def _parse_network(rule: str, host: str, bracketed: bool) -> IPNetwork:
    if host == "":
        raise RuleError(rule, "missing address")
    addr_s, slash, plen_s = host.partition("/")
    if "%" in addr_s:
        raise RuleError(rule, f"IPv6 zone index in '{addr_s}' is not supported")
    try:
        addr = ipaddress.ip_address(addr_s)
    except ValueError:
        if not slash and _DOMAIN.fullmatch(host):
            raise RuleError(rule, "domain rules are not supported yet (IP/CIDR only)") from None
        raise RuleError(rule, f"'{host}' is not an IP address or CIDR") from None
    if bracketed and addr.version != 6:
        raise RuleError(rule, "brackets are only for IPv6 addresses")
    width = addr.max_prefixlen
    if not slash:
        plen = width
    elif not _PREFIX.fullmatch(plen_s):
        raise RuleError(rule, f"prefix length '{plen_s}' is not a number in 0-{width}")
    else:
        plen = _small_int(plen_s)
        if plen > width:
            raise RuleError(rule, f"prefix length {plen_s} is out of range for IPv{addr.version} (0-{width})")
    net = ipaddress.ip_network((addr, plen), strict=False)
    if net.network_address != addr:
        raise RuleError(rule, f"host bits set; did you mean {net}?")
    if isinstance(net, IPv6Network) and plen >= 96 and net.subnet_of(_MAPPED):
        net = IPv4Network((int(net.network_address) & 0xFFFFFFFF, plen - 96))
    return net


def parse_rule(text: str, action: Verdict) -> Rule:
    """Parse one rule of the grammar in the module docstring; raise RuleError naming the problem."""
    if action not in _VERDICTS:
        raise ValueError(f"action must be 'allow' or 'deny', not {action!r}")
    rule = text.strip()
    if rule == "":
        raise RuleError(rule, "empty rule")
    if any(c.isspace() for c in rule):
        raise RuleError(rule, "whitespace inside rule")
    proto: Proto | None = None
    rest = rule
    if m := _SCHEME.match(rule):
        scheme = m[1].lower()
        if scheme not in _PROTOS:
            raise RuleError(rule, f"unknown scheme '{m[1]}://' (expected tcp:// or udp://)")
        proto = scheme  # type: ignore[assignment]
        rest = rule[m.end():]
    if "://" in rest:
        raise RuleError(rule, "unexpected '://' (only one tcp:// or udp:// prefix is allowed)")

    port_spec: str | None = None
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise RuleError(rule, "missing ']' after IPv6 address")
        host, after = rest[1:close], rest[close + 1:]
        if after.startswith(":"):
            port_spec = after[1:]
        elif after:
            raise RuleError(rule, f"unexpected '{after}' after ']' (expected ':PORT' or ':LO-HI')")
        network = _parse_network(rule, host, bracketed=True)
    elif rest.count(":") >= 2:  # unbracketed IPv6: the whole thing is the address, no port
        try:
            network = _parse_network(rule, rest, bracketed=False)
        except RuleError:
            head, _, tail = rest.rpartition(":")
            if _PORTS.fullmatch(tail) and _looks_like_network(head):
                raise RuleError(rule, f"an IPv6 address with a port must be in brackets: '[{head}]:{tail}'") from None
            raise
    else:
        host, colon, port_part = rest.partition(":")
        port_spec = port_part if colon else None
        network = _parse_network(rule, host, bracketed=False)
    ports = _parse_ports(rule, port_spec) if port_spec is not None else None
    return Rule(text=rule, action=action, network=network, ports=ports, proto=proto)


def _looks_like_network(s: str) -> bool:
    try:
        ipaddress.ip_network(s, strict=False)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    rule: str  # the matching Rule.text, or "default"


def builtin_denies(host_addresses: Iterable[IPAddress] = ()) -> list[Rule]:
    """The default-deny profile as rules, one per network, each labelled with its category."""
    rules = [
        Rule(text=label, action="deny", network=ipaddress.ip_network(cidr), ports=None, proto=None)
        for label, cidrs in BUILTIN_RANGES
        for cidr in cidrs
    ]
    for a in host_addresses:
        addr = _unmap(ipaddress.ip_address(a))
        rules.append(Rule("builtin:host-address", "deny", ipaddress.ip_network(addr), None, None))
    return rules


class Policy:
    """Rules plus a default; `evaluate` is first match over `ordered_rules()`, else the default."""

    def __init__(
        self,
        allow: Sequence[Rule] = (),
        deny: Sequence[Rule] = (),
        default: Verdict = "allow",
        host_addresses: Iterable[IPAddress] = (),
    ) -> None:
        self._memo: dict[tuple[str, object, int], Decision] = {}
        if default not in _VERDICTS:
            raise ValueError(f"default must be 'allow' or 'deny', not {default!r}")
        for rules, action in ((allow, "allow"), (deny, "deny")):
            for r in rules:
                if r.action != action:  # the list, not the field, decides the order: keep them in step
                    raise ValueError(f"rule {r.text!r} has action {r.action!r} but was given as {action}")
        self.default: Verdict = default
        builtins = builtin_denies(host_addresses) if default == "allow" else []
        self._ordered: tuple[Rule, ...] = (*deny, *allow, *builtins)

    def ordered_rules(self) -> list[Rule]:
        """Evaluation order, first match wins: user denies, user allows, then builtin denies."""
        return list(self._ordered)

    def evaluate(self, proto: Proto, addr: IPAddress | str, port: int) -> Decision:
        """First matching rule's verdict, else the default.  Memoised per destination (a
        Policy never changes; the engine asks once per connection, often for the same few)."""
        key = (proto, addr, port)
        decision = self._memo.get(key)
        if decision is None:
            decision = self._evaluate(proto, addr, port)
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[key] = decision
        return decision

    def _evaluate(self, proto: Proto, addr: IPAddress | str, port: int) -> Decision:
        if proto not in _PROTOS:
            raise ValueError(f"proto must be 'tcp' or 'udp', not {proto!r}")
        ip = _unmap(ipaddress.ip_address(addr))
        for rule in self._ordered:
            if rule.matches(proto, ip, port):
                return Decision(rule.action, rule.text)
        return Decision(self.default, "default")


@dataclass(frozen=True)
class PolicySpec:
    default: Verdict | None  # None when the file does not set it
    allow: tuple[str, ...]
    deny: tuple[str, ...]


def load_policy_file(path: str | os.PathLike) -> PolicySpec:
    """Read and validate a TOML policy file (default, allow, deny); every error names file and key."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise PolicyFileError(f"{name}: cannot read policy file: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise PolicyFileError(f"{name}: not UTF-8 text (byte offset {e.start})") from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib says "(at line N, column M)", except for an unterminated construct: give a line there too
        where = f"(at end of document, after line {text.rstrip().count(chr(10)) + 1})"
        raise PolicyFileError(f"{name}: TOML syntax error: {str(e).replace('(at end of document)', where)}") from e
    for key in data:
        if key not in ("default", "allow", "deny"):
            raise PolicyFileError(f"{name}: unknown key '{key}' (expected default, allow, deny)")
    default = data.get("default")
    if default is not None and default not in _VERDICTS:
        raise PolicyFileError(f"{name}: key 'default': must be \"allow\" or \"deny\", got {default!r}")
    lists: dict[str, tuple[str, ...]] = {}
    for key in ("allow", "deny"):
        value = data.get(key, [])
        if not isinstance(value, list):
            raise PolicyFileError(f"{name}: key '{key}': must be a list of rule strings, got {type(value).__name__}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise PolicyFileError(f"{name}: {key}[{i}]: must be a string, got {type(item).__name__}")
            try:
                parse_rule(item, key)  # type: ignore[arg-type]
            except RuleError as e:
                raise PolicyFileError(f"{name}: {key}[{i}]: {e}") from e
        lists[key] = tuple(value)
    return PolicySpec(default=default, allow=lists["allow"], deny=lists["deny"])


def build_policy(
    spec_from_file: PolicySpec | None,
    cli_allow: Sequence[str],
    cli_deny: Sequence[str],
    cli_default: Verdict | None,
    host_addresses: Iterable[IPAddress] = (),
) -> Policy:
    """Merge file and CLI: rules add up (file first), the CLI default overrides, else "allow"."""
    spec = spec_from_file or PolicySpec(default=None, allow=(), deny=())
    default: Verdict = cli_default or spec.default or "allow"
    allow = [parse_rule(t, "allow") for t in (*spec.allow, *cli_allow)]
    deny = [parse_rule(t, "deny") for t in (*spec.deny, *cli_deny)]
    return Policy(allow=allow, deny=deny, default=default, host_addresses=host_addresses)
