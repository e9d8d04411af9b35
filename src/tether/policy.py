"""Network policy: parse IP/port and domain rules and decide allow or deny for one destination.

Rules of this file:
  * It is pure. Nothing here opens a socket or looks at the host; the only I/O is reading a policy
    file in `load_policy_file`. The host's own addresses and the names the DNS stub served come in
    as arguments.
  * Every decision names the rule that made it (its text as the user wrote it, a "builtin:..."
    label, or "default"), because every decision becomes an audit event and a deny must be loud.

Grammar. A rule is `[tcp://|udp://]TARGET[:PORT|:LO-HI]`; TARGET is one of

    203.0.113.7, 203.0.113.0/24, 2001:db8::/32   an address or CIDR (IPv6 in brackets before a port)
    example.test                                 that name AND every name below it (a.example.test)
    *.example.test                               every name below it, NOT example.test itself
    =example.test                                exactly that name

`parse_rule` turns the text into a `Rule` (network XOR domain, inclusive port range or None, proto
or None) or raises `RuleError` saying what is wrong. Names are ASCII (letters, digits, '-', '_';
labels of 1-63 characters, at most 253 in all; internationalised names in their IDNA "xn--" form,
which the error message suggests), compared case-insensitively, a final dot ignored. The last
label must contain a letter, so a mistyped address ("10.0.0.1-5") is an error, not a name.

Evaluation. A `Policy` is the rules plus a default verdict; `evaluate(proto, addr, port, names=...)`
is FIRST MATCH WINS over `Policy.ordered_rules()`:

    user IP denies -> user domain denies -> user IP allows -> builtin denies -> user domain allows
                                                                                  -> default

An IP rule matches the destination address; a domain rule matches when any of `names` does - the
names the DNS stub served for that address to this sandbox (`tether.names.NameMap`); an address
the sandbox never resolved has no names and matches only IP rules. So deny beats allow (of either
kind), and `Decision.name` says which name a domain rule matched.

SECURITY DECISION: a domain allow does NOT pierce the builtin denies (loopback, link-local incl.
the metadata address 169.254.169.254, private, CGNAT, multicast, unspecified, the host's own
addresses). A name is whatever some DNS server says it is: `evil.example.test A 127.0.0.1` (DNS
rebinding) must not open the sandbox's way to the host's loopback or to cloud metadata just because
`*.example.test` is allowed. Only an explicit IP allow (e.g. `127.0.0.1:8080`) overrides a builtin
deny. A domain deny beats an IP allow.

The builtin denies are in the list when they can matter: with default "allow", or with default
"deny" when there are domain allows (which they must not let through). With default "deny" and no
domain allows they would only repeat the default, so they are left out and such addresses are
denied as "default" - the same label the kernel logs (see tether.net.nft).

The same ordered list is what the nftables compiler works from: it emits what the kernel can
decide without names (IP rules, builtins, the default catch-all when no domain allow could apply)
and leaves the rest to the engine, which calls `evaluate` with the names; tests check that the
kernel never contradicts `evaluate`.

ICMP. `evaluate("icmp", addr, 0)` (echo requests) matches only rules without protocol and port.

Resolution. `Policy.evaluate_name(name)` answers the DNS stub's question "may this sandbox resolve
NAME?" (first row that applies wins):

    a domain deny without proto/port matches NAME     -> deny   (that rule)
    a domain allow (any proto/port) matches NAME      -> allow  (that rule)
    default "allow"                                   -> allow  ("default")
    default "deny", and there are user IP allow rules -> allow  ("ip-allow-rules": the answer may
                                                        point into an allowed CIDR; the IP policy
                                                        decides at connect time)
    default "deny", no user IP allow rules            -> deny   ("default")

A deny restricted to a protocol or port (`tcp://ads.example.test:443`) does not stop resolution:
other traffic to that name may be allowed. The stub asks for every name on a CNAME chain.

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

from tether.names import normalize_name

Verdict = Literal["allow", "deny"]
Proto = Literal["tcp", "udp"]
EvalProto = Literal["tcp", "udp", "icmp"]
DomainKind = Literal["suffix", "subdomains", "exact"]
IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

_VERDICTS = ("allow", "deny")
_PROTOS = ("tcp", "udp")
_EVAL_PROTOS = ("tcp", "udp", "icmp")
_MAPPED = IPv6Network("::ffff:0:0/96")

# evaluate_name's label when default deny lets a name resolve because IP allow rules exist
IP_ALLOW_RULES = "ip-allow-rules"

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
# Host text that is meant as a name (possibly a bad one) rather than an address: name characters
# only, and at least one that an address never has.
_NAMEISH = re.compile(r"[A-Za-z0-9_.*=-]+")
_NAME_MARK = re.compile(r"[A-Za-z_*=]")
_LABEL = re.compile(r"[A-Za-z0-9_-]+")
_LETTER = re.compile(r"[A-Za-z]")
_NOT_HEX = re.compile(r"[G-Zg-z_.*=]")  # cannot be the first group of an IPv6 address
MAX_NAME = 253
MAX_LABEL = 63


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


# --- domain patterns ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainPattern:
    """A name pattern: ``name`` normalised (lower case, no final dot, no ``*.``/``=``) and how it
    matches: "suffix" (``example.test``: the name and every name below it), "subdomains"
    (``*.example.test``: only names below it), "exact" (``=example.test``)."""

    name: str
    kind: DomainKind = "suffix"

    def __post_init__(self) -> None:
        if self.kind not in ("suffix", "subdomains", "exact"):
            raise ValueError(f"kind must be 'suffix', 'subdomains' or 'exact', not {self.kind!r}")

    @classmethod
    def parse(cls, text: str) -> DomainPattern:
        """``"*.Example.TEST."`` -> DomainPattern("example.test", "subdomains"); ValueError if bad."""
        return _parse_domain(text)

    def matches(self, name: str) -> bool:
        """Does ``name`` (any case, final dot or not) fall under this pattern?"""
        return self._matches_normalized(normalize_name(name))

    def _matches_normalized(self, name: str) -> bool:
        if name == self.name:
            return self.kind != "subdomains"
        if self.kind == "exact":
            return False
        return len(name) > len(self.name) + 1 and name.endswith(self.name) and name[-len(self.name) - 1] == "."

    def __str__(self) -> str:
        return {"suffix": "", "subdomains": "*.", "exact": "="}[self.kind] + self.name


class _DomainError(ValueError):
    pass


def _parse_domain(text: str) -> DomainPattern:
    kind: DomainKind = "suffix"
    body = text
    if body.startswith("="):
        kind, body, prefix = "exact", body[1:], "="
        if body == "":
            raise _DomainError("missing name after '='")
    elif body.startswith("*."):
        kind, body, prefix = "subdomains", body[2:], "*."
        if body == "":
            raise _DomainError("missing name after '*.'")
    elif body.startswith("*"):
        raise _DomainError("'*' must be a whole first label followed by a name, as in '*.example.test'")
    else:
        prefix = ""
    if not body.isascii():
        hint = ""
        try:
            hint = f", e.g. '{prefix}{body.encode('idna').decode('ascii')}'"
        except (UnicodeError, ValueError):
            pass
        raise _DomainError(f"non-ASCII name: write internationalised names in their IDNA (punycode) form{hint}")
    if "*" in body:
        raise _DomainError("'*' is allowed only as the whole first label, as in '*.example.test'")
    if "=" in body:
        raise _DomainError("'=' is allowed only at the start ('=example.test' means exactly that name)")
    for c in body:
        if not (c.isalnum() or c in "-_."):
            raise _DomainError(f"character {c!r} is not allowed in names (letters, digits, '-', '_')")
    body = body.removesuffix(".")
    if body.startswith("."):
        raise _DomainError(f"a name cannot start with '.' (for the names below it write '*{body}')")
    if len(body) > MAX_NAME:
        raise _DomainError(f"name is {len(body)} characters long (at most {MAX_NAME})")
    labels = body.split(".")
    for label in labels:
        if label == "":
            raise _DomainError("empty label ('..') in name")
        if len(label) > MAX_LABEL:
            raise _DomainError(f"label '{label[:16]}...' is {len(label)} characters long (at most {MAX_LABEL})")
    if not _LETTER.search(labels[-1]):
        raise _DomainError(f"the last label '{labels[-1]}' has no letter, so this is not a domain name "
                           "(a mistyped IP address?)")
    return DomainPattern(normalize_name(body), kind)


def _name_like(host: str) -> bool:
    """Is ``host`` meant as a domain name (possibly a bad one) rather than an address?"""
    if not host.isascii():
        return True
    return bool(_NAMEISH.fullmatch(host) and _NAME_MARK.search(host))


# --- rules ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    text: str  # as written by the user (stripped), or a builtin label "builtin:loopback" etc.
    action: Verdict
    network: IPNetwork | None  # the destination network of an IP rule; None for a domain rule
    ports: tuple[int, int] | None  # inclusive range, None = any port
    proto: Proto | None  # None = tcp and udp (and icmp)
    domain: DomainPattern | None = None  # the name pattern of a domain rule; None for an IP rule

    def __post_init__(self) -> None:
        if (self.network is None) == (self.domain is None):
            raise ValueError(f"rule {self.text!r} needs exactly one of network and domain")

    def applies(self, proto: EvalProto, port: int) -> bool:
        """Do the rule's protocol and ports cover (proto, port)?  ICMP: only rules without either."""
        if self.proto is not None and proto != self.proto:
            return False
        return self.ports is None or (proto != "icmp" and self.ports[0] <= port <= self.ports[1])

    def matches(self, proto: EvalProto, addr: IPAddress, port: int, names: Iterable[str] = ()) -> bool:
        """IP rule: the address is in the network.  Domain rule: one of ``names`` (the names the
        stub served for ``addr``) matches the pattern.  Both: protocol and port are covered."""
        if not self.applies(proto, port):
            return False
        if self.domain is not None:
            return self.matching_name(names) is not None
        return _unmap(addr) in self.network  # False, not an error, across address families

    def matching_name(self, names: Iterable[str]) -> str | None:
        """The first of ``names`` (normalised) that the rule's pattern matches, else None."""
        if self.domain is None:
            return None
        for name in names:
            n = normalize_name(name)
            if self.domain._matches_normalized(n):
                return n
        return None


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


def _not_an_address(rule: str, host: str) -> RuleError:
    if _LETTER.search(host) and ":" not in host:  # (a mistyped IPv6 address is not a bad name)
        bad = next((c for c in host if not (c.isalnum() or c in "-_.*=/")), None)
        if bad is not None:
            return RuleError(rule, f"'{host}' is not an IP address or CIDR, nor a domain name "
                                   f"(character {bad!r} is not allowed in names: letters, digits, '-', '_')")
    return RuleError(rule, f"'{host}' is not an IP address or CIDR")


def _parse_network(rule: str, host: str, bracketed: bool) -> IPNetwork:
    if host == "":
        raise RuleError(rule, "missing address")
    addr_s, slash, plen_s = host.partition("/")
    if "%" in addr_s:
        raise RuleError(rule, f"IPv6 zone index in '{addr_s}' is not supported")
    try:
        addr = ipaddress.ip_address(addr_s)
    except ValueError:
        if _name_like(addr_s):
            if bracketed:
                raise RuleError(rule, "brackets are only for IPv6 addresses") from None
            if slash:
                raise RuleError(rule, f"a prefix length ('/{plen_s}') is for IP addresses, not names") from None
        raise _not_an_address(rule, host) from None
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


def _parse_target(rule: str, host: str) -> tuple[IPNetwork | None, DomainPattern | None]:
    """(network, None) for an address or CIDR, (None, pattern) for a domain."""
    if _name_like(host):
        try:
            return None, _parse_domain(host)
        except _DomainError as e:
            raise RuleError(rule, str(e)) from None
    return _parse_network(rule, host, bracketed=False), None


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
    domain: DomainPattern | None = None
    network: IPNetwork | None
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
            name, _, port_part = rest.partition(":")
            if _name_like(name) and _NOT_HEX.search(name):  # "example.test:80:90": blame the port
                _parse_target(rule, name)
                _parse_ports(rule, port_part)
            raise
    else:
        host, colon, port_part = rest.partition(":")
        port_spec = port_part if colon else None
        network, domain = _parse_target(rule, host)
    ports = _parse_ports(rule, port_spec) if port_spec is not None else None
    return Rule(text=rule, action=action, network=network, ports=ports, proto=proto, domain=domain)


def _looks_like_network(s: str) -> bool:
    try:
        ipaddress.ip_network(s, strict=False)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    rule: str  # the matching Rule.text, a builtin label, "default" (or IP_ALLOW_RULES, evaluate_name)
    name: str | None = None  # the name a domain rule matched (normalised), else None


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
        self._memo: dict[tuple[str, object, int, tuple[str, ...]], Decision] = {}
        if default not in _VERDICTS:
            raise ValueError(f"default must be 'allow' or 'deny', not {default!r}")
        for rules, action in ((allow, "allow"), (deny, "deny")):
            for r in rules:
                if r.action != action:  # the list, not the field, decides the order: keep them in step
                    raise ValueError(f"rule {r.text!r} has action {r.action!r} but was given as {action}")
        self.default: Verdict = default
        ip_deny = [r for r in deny if r.domain is None]
        ip_allow = [r for r in allow if r.domain is None]
        self._domain_deny = tuple(r for r in deny if r.domain is not None)
        self._domain_allow = tuple(r for r in allow if r.domain is not None)
        self._has_ip_allow = bool(ip_allow)
        in_play = default == "allow" or bool(self._domain_allow)  # see the module docstring
        builtins = builtin_denies(host_addresses) if in_play else []
        self._ordered: tuple[Rule, ...] = (*ip_deny, *self._domain_deny, *ip_allow, *builtins, *self._domain_allow)

    @property
    def has_domain_rules(self) -> bool:
        """True if any user rule is a domain rule (the engine then needs the names)."""
        return bool(self._domain_deny or self._domain_allow)

    def ordered_rules(self) -> list[Rule]:
        """Evaluation order, first match wins: user IP denies, user domain denies, user IP allows,
        builtin denies (when in play), user domain allows.  What `compile_ruleset` takes."""
        return list(self._ordered)

    def ip_rules(self) -> list[Rule]:
        """The static part: `ordered_rules()` without the domain rules (decidable without names)."""
        return [r for r in self._ordered if r.domain is None]

    def domain_rules(self) -> list[Rule]:
        """The domain rules, in evaluation order (denies first)."""
        return [*self._domain_deny, *self._domain_allow]

    def evaluate(self, proto: EvalProto, addr: IPAddress | str, port: int, *,
                 names: Iterable[str] = ()) -> Decision:
        """First matching rule's verdict, else the default.  ``names``: the names the DNS stub
        served for ``addr`` to this sandbox.  Memoised per (destination, names) (a Policy never
        changes; the engine asks once per connection, often for the same few)."""
        names_t = names if isinstance(names, tuple) else tuple(names)
        if not self.has_domain_rules:
            names_t = ()
        key = (proto, addr, port, names_t)
        decision = self._memo.get(key)
        if decision is None:
            decision = self._evaluate(proto, addr, port, names_t)
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[key] = decision
        return decision

    def _evaluate(self, proto: EvalProto, addr: IPAddress | str, port: int, names: tuple[str, ...]) -> Decision:
        if proto not in _EVAL_PROTOS:
            raise ValueError(f"proto must be 'tcp', 'udp' or 'icmp', not {proto!r}")
        ip = _unmap(ipaddress.ip_address(addr))
        norm = tuple(normalize_name(n) for n in names)
        for rule in self._ordered:
            if not rule.applies(proto, port):
                continue
            if rule.domain is None:
                if ip in rule.network:  # type: ignore[operator]
                    return Decision(rule.action, rule.text)
            else:
                for n in norm:
                    if rule.domain._matches_normalized(n):
                        return Decision(rule.action, rule.text, n)
        return Decision(self.default, "default")

    def evaluate_name(self, name: str) -> Decision:
        """May this sandbox resolve ``name``?  The table in the module docstring."""
        n = normalize_name(name)
        for rule in self._domain_deny:
            if rule.proto is None and rule.ports is None and rule.domain._matches_normalized(n):  # type: ignore[union-attr]
                return Decision("deny", rule.text, n)
        for rule in self._domain_allow:
            if rule.domain._matches_normalized(n):  # type: ignore[union-attr]
                return Decision("allow", rule.text, n)
        if self.default == "allow":
            return Decision("allow", "default")
        if self._has_ip_allow:
            return Decision("allow", IP_ALLOW_RULES)
        return Decision("deny", "default")


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
