"""wg-quick configuration files (``tether run --wireguard wg0.conf``): text in, validated dataclasses out.

Theory of operation
-------------------
A user hands tether the file their VPN provider or ``wg-quick`` setup already has.  So the syntax is
wg-quick's, read the way wg-quick and ``wg setconf`` read it: lines of ``Key = Value`` under
``[Interface]`` and ``[Peer]`` headers; section names and keys are case-insensitive; ``#`` starts a
comment anywhere on a line (there is no ``;`` comment, as in wg-quick); blank lines, CRLF line ends
and a UTF-8 byte order mark are fine; the value is everything after the first ``=`` (base64 keys
end in ``=``), trimmed.  ``Address``, ``DNS`` and ``AllowedIPs`` take comma-separated lists and may
be repeated, the lists adding up; every other key may appear once per section.

**What each key means here.**  ``[Interface]``: ``PrivateKey`` (required); ``Address`` (v4 and v6,
with a prefix or without, which means a host address); ``DNS`` (an entry that is an IP address is a
server, anything else a search domain, wg-quick's rule); ``MTU`` (default ``DEFAULT_MTU``, at least
1280 when an address is IPv6, since Linux refuses IPv6 on a smaller link); ``ListenPort``
(``0`` means "any", as for ``wg``).  ``[Peer]``, one or more: ``PublicKey`` (required, unique among
peers, not the interface's own), ``PresharedKey``, ``Endpoint``, ``AllowedIPs``,
``PersistentKeepalive`` (seconds, ``0``/``off`` meaning off).  ``AllowedIPs`` with host bits set
(``10.0.0.7/24``) are accepted and masked (``10.0.0.0/24``), as ``wg`` does; a prefix claimed by two
peers is an error, because ``wg`` would silently hand it to the last one and the first would lose
its route.

**Endpoints are not resolved here.**  ``Endpoint = vpn.example.net:51820`` stays a host name in an
``Endpoint(host, port)``; the caller resolves it in the host's network namespace *before* the
sandbox is isolated (inside, there is no route except the tunnel itself).  IPv6 literals are
written ``[2001:db8::1]:51820``, as everywhere in WireGuard; a bare ``2001:db8::1:51820`` is refused
because it is ambiguous.

**What tether refuses.**  wg-quick's host-side keys ``PreUp``, ``PostUp``, ``PreDown``, ``PostDown``
(shell commands run as root), ``Table``, ``FwMark`` (host policy routing) and ``SaveConfig``
(rewrites the file) have no meaning for a tunnel that lives inside a sandbox: tether runs no hooks,
touches no host routing table and never writes the file.  Ignoring them would be silent surprise
(a ``PostUp`` kill-switch that never runs), so each is an error that says why; the fix is to delete
the line.  Unknown keys and sections are errors too (a misspelt ``AllowedIP`` silently dropped
would route nothing).

**Errors.**  Every problem in the file is collected, each with its line and key
(``wg0.conf:7: Endpoint: port 70000 is out of range 1..65535``), and one ``ConfError`` carries the
list, so a file is fixed in one pass.  A value that failed is left out, so one mistake is one
problem.  **Key material never appears in an error**: a key's problem is described, never quoted
(``BadKey``), and every other value is quoted only when it does not look like a key (a private key
pasted into ``Address`` stays hidden); a line that is not ``Key = Value`` is not quoted at all.
Private and preshared keys are held as ``SecretKey`` (its ``repr`` is ``<secret key>``), so the
dataclasses' ``repr`` never shows them either, and ``WgConfig.redacted()`` is the text to print.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias, TypeVar

from tether.errors import TetherError
from tether.textfile import TextFileError, read_text

from .keys import BadKey, SecretKey, check_key, decode_key, encode_key, public_key

DEFAULT_MTU: Final = 1420
MIN_MTU: Final = 576
MIN_MTU_IPV6: Final = 1280  # Linux drops IPv6 from a link whose MTU falls below this
MAX_MTU: Final = 65535
MAX_CONF_BYTES: Final = 1 << 20  # a larger file is not a wg-quick config (and /dev/zero must not hang us)
HINT: Final = "fix the lines listed and try again (the format is wg-quick's: man wg-quick)"

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface: TypeAlias = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

# ---------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class ConfProblem:
    """One thing wrong with a config file; ``str()`` is ``FILE:LINE: KEY: MESSAGE``."""

    path: str
    line: int | None
    key: str  # the key's canonical spelling ("AllowedIPs"), a section ("[Peer]"), or "" for the file
    message: str

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfError(TetherError):
    """A config that cannot be used; ``problems`` lists every problem, ``str()`` is the report."""

    def __init__(self, problems: list[ConfProblem], hint: str | None = HINT) -> None:
        ordered = sorted(problems, key=lambda p: (p.line or 0))
        super().__init__("\n".join(str(p) for p in ordered), hint)
        self.problems = ordered

    def __reduce__(self) -> tuple[Any, ...]:  # picklable despite the constructor's arguments
        return (type(self), (self.problems, self.hint))


# ---------------------------------------------------------------------------------------------
# The parsed configuration


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a peer is reached: an IP literal or a host name (not yet resolved), and a port."""

    host: str  # an IPv6 literal without brackets, possibly with a zone ("fe80::1%eth0")
    port: int

    @property
    def address(self) -> IPAddress | None:
        """The host as an IP address, or None when it is a name the caller must resolve."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class InterfaceConf:
    """``[Interface]``: our key, the tun's addresses and MTU, the sandbox's resolv.conf, our UDP port."""

    private_key: SecretKey
    addresses: tuple[IPInterface, ...] = ()
    dns: tuple[IPAddress, ...] = ()
    dns_search: tuple[str, ...] = ()
    mtu: int = DEFAULT_MTU
    listen_port: int | None = None  # None: any port

    def __post_init__(self) -> None:
        object.__setattr__(self, "private_key", _secret(self.private_key))

    @property
    def public_key(self) -> bytes:
        return public_key(self.private_key)


@dataclass(frozen=True, slots=True)
class PeerConf:
    """One ``[Peer]``: who it is, where to reach it, and which addresses it routes (cryptokey routing)."""

    public_key: bytes
    preshared_key: SecretKey | None = None
    endpoint: Endpoint | None = None
    allowed_ips: tuple[IPNetwork, ...] = ()
    persistent_keepalive: int | None = None  # seconds; None: off
    line: int = field(default=0, compare=False, repr=False)  # of its [Peer] header, for messages

    def __post_init__(self) -> None:
        check_key(self.public_key)
        if self.preshared_key is not None:
            object.__setattr__(self, "preshared_key", _secret(self.preshared_key))


@dataclass(frozen=True, slots=True)
class WgConfig:
    """A whole wg-quick file.  Its ``repr`` hides secrets; ``redacted()`` is the text to show."""

    interface: InterfaceConf
    peers: tuple[PeerConf, ...]

    def redacted(self) -> str:
        """The config as wg-quick text with private and preshared keys shown as ``(hidden)``."""
        return format_conf(self, hide_secrets=True)


def _secret(key: bytes) -> SecretKey:
    check_key(key)
    return key if isinstance(key, SecretKey) else SecretKey(key)


# ---------------------------------------------------------------------------------------------
# Entry points


def load_conf(path: str | os.PathLike[str]) -> WgConfig:
    """Read and parse the wg-quick file at ``path``; ConfError lists everything wrong with it."""
    name = os.fsdecode(path)
    try:
        text = read_text(name, MAX_CONF_BYTES, "a wg-quick file")
    except TextFileError as e:
        raise ConfError([ConfProblem(name, e.line, "", e.message)]) from None
    return parse_conf(text, name)


def parse_conf(text: str, path: str = "<conf>") -> WgConfig:
    """Parse wg-quick text (sans-IO); ConfError lists every problem, each with its line."""
    problems: list[ConfProblem] = []
    scanner = _Scanner(path, problems)
    scanner.scan(text)
    config = _build(scanner.interface, scanner.peers, path, problems)
    if problems or config is None:
        raise ConfError(problems)
    return config


def format_conf(config: WgConfig, *, strip: bool = False, hide_secrets: bool = False) -> str:
    """The config as wg-quick text that ``parse_conf`` reads back as the same config.

    ``strip`` leaves out wg-quick's own keys (Address, DNS, MTU), giving what ``wg setconf``
    accepts, like ``wg-quick strip``.  ``hide_secrets`` writes ``(hidden)`` for private and
    preshared keys and adds the interface's public key as a comment (``WgConfig.redacted()``).
    """
    def secret(key: bytes) -> str:
        return "(hidden)" if hide_secrets else encode_key(key)

    iface = config.interface
    lines = ["[Interface]", f"PrivateKey = {secret(iface.private_key)}"]
    if hide_secrets:
        lines.append(f"# PublicKey = {encode_key(iface.public_key)}")
    if iface.listen_port is not None:
        lines.append(f"ListenPort = {iface.listen_port}")
    if not strip:
        lines += _joined("Address", iface.addresses)
        lines += _joined("DNS", [*iface.dns, *iface.dns_search])
        lines.append(f"MTU = {iface.mtu}")
    for peer in config.peers:
        lines += ["", "[Peer]", f"PublicKey = {encode_key(peer.public_key)}"]
        if peer.preshared_key is not None:
            lines.append(f"PresharedKey = {secret(peer.preshared_key)}")
        if peer.endpoint is not None:
            lines.append(f"Endpoint = {peer.endpoint}")
        lines += _joined("AllowedIPs", peer.allowed_ips)
        if peer.persistent_keepalive is not None:
            lines.append(f"PersistentKeepalive = {peer.persistent_keepalive}")
    return "\n".join(lines) + "\n"


def _joined(key: str, values: Any) -> list[str]:
    return [f"{key} = {', '.join(str(v) for v in values)}"] if values else []


# ---------------------------------------------------------------------------------------------
# Values: each parser turns one value's text into a value or raises _Bad with a message that
# never quotes key material.


class _Bad(ValueError):
    pass


T = TypeVar("T")
_KEYLIKE = re.compile(r"[A-Za-z0-9+/=]{32,}")  # a run as long as this may be (part of) a key
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?")
_DIGITS = re.compile(r"[0-9]+")
_HOST_PORT = re.compile(r"\[(?P<v6>[^\]]*)\]:(?P<port>[^:]*)|(?P<host>[^\[\]:]*):(?P<port2>[^:\[\]]*)")


def _quote(text: str) -> str:
    """``'text'`` for a message, unless the text might hold key material."""
    if _KEYLIKE.search(text) or len(text) > 80:
        return "(value not shown: it might hold a key)"
    return repr(text)


def _secret_key(value: str) -> SecretKey:
    return SecretKey(_key(value))


def _key(value: str) -> bytes:
    try:
        return decode_key(value)
    except BadKey as e:
        raise _Bad(f"not a WireGuard key: {e} (expected the 44 characters that wg genkey/pubkey print)") from None


def _items(value: str, parse: Callable[[str], T], *, allow_empty: bool = False) -> list[T]:
    """A comma-separated list, each item parsed; every bad item is reported."""
    if value == "" and allow_empty:
        return []
    out: list[T] = []
    bad: list[str] = []
    for item in (i.strip() for i in value.split(",")):
        try:
            if item == "":
                raise _Bad("empty item (two commas in a row, or a comma at an end)")
            out.append(parse(item))
        except _Bad as e:
            bad.append(str(e))
    if bad:
        raise _Bad("; ".join(bad))
    return out


def _number(value: str, low: int, high: int, noun: str, alternative: str = "") -> int:
    if not _DIGITS.fullmatch(value):
        raise _Bad(f"{_quote(value)} is not a whole number{alternative}")
    n = int(value)
    if not low <= n <= high:
        raise _Bad(f"{noun} {n} is out of range {low}..{high}")
    return n


def _interface_address(item: str) -> IPInterface:
    try:
        return ipaddress.ip_interface(item)
    except ValueError:
        raise _Bad(f"{_quote(item)} is not an IP address with an optional /prefix") from None


def _network(item: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(item, strict=False)  # host bits are masked, as wg does
    except ValueError:
        raise _Bad(f"{_quote(item)} is not an IP network (address/prefix)") from None


def _dns_entry(item: str) -> IPAddress | str:
    """wg-quick's rule: digits and dots, or anything with a colon, is a server; else a domain."""
    if re.fullmatch(r"[0-9.]+", item) or ":" in item:
        try:
            return ipaddress.ip_address(item)
        except ValueError:
            raise _Bad(f"{_quote(item)} is not an IP address (DNS takes server addresses and search domains)") from None
    return _hostname(item, "search domain")


def _hostname(item: str, what: str) -> str:
    shown = _quote(item)
    if not item.isascii():
        raise _Bad(f"{what} {shown} is not ASCII: write it in its IDNA (punycode) form")
    labels = item.removesuffix(".").split(".")
    if len(item) > 253 or not all(len(label) <= 63 and _LABEL.fullmatch(label) for label in labels):
        raise _Bad(f"{what} {shown} is not a valid DNS name")
    if not re.search(r"[A-Za-z]", labels[-1]):
        raise _Bad(f"{what} {shown} is not a valid IP address or DNS name")
    return item


def _endpoint(value: str) -> Endpoint:
    m = _HOST_PORT.fullmatch(value)
    if not m:
        if value.count(":") > 1 and "[" not in value:
            raise _Bad(f"{_quote(value)}: write an IPv6 endpoint as [address]:port")
        raise _Bad(f"{_quote(value)} is not host:port or [IPv6 address]:port")
    port = _number(m["port"] if m["v6"] is not None else m["port2"], 1, 65535, "port")
    if m["v6"] is not None:
        try:
            ipaddress.IPv6Address(m["v6"])
        except ValueError:
            raise _Bad(f"{_quote(m['v6'])} in brackets is not an IPv6 address") from None
        return Endpoint(m["v6"], port)
    host = m["host"]
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise _Bad(f"{_quote(host)} is not an IPv4 address") from None
        return Endpoint(host, port)
    return Endpoint(_hostname(host, "host"), port)


def _listen_port(value: str) -> int | None:
    return _number(value, 0, 65535, "port") or None


def _keepalive(value: str) -> int | None:
    if value.lower() == "off":
        return None
    return _number(value, 0, 65535, "interval", " of seconds, or 'off'") or None


def _mtu(value: str) -> int:
    return _number(value, MIN_MTU, MAX_MTU, "MTU")


# ---------------------------------------------------------------------------------------------
# Keys


@dataclass(frozen=True)
class _Key:
    name: str  # canonical spelling, used in messages
    parse: Callable[[str], Any]
    repeat: bool = False  # may appear on several lines; the lists add up


_INTERFACE: Final = {k.name.lower(): k for k in (
    _Key("PrivateKey", _secret_key),
    _Key("Address", lambda v: _items(v, _interface_address), repeat=True),
    _Key("DNS", lambda v: _items(v, _dns_entry), repeat=True),
    _Key("MTU", _mtu),
    _Key("ListenPort", _listen_port),
)}
_PEER: Final = {k.name.lower(): k for k in (
    _Key("PublicKey", _key),
    _Key("PresharedKey", _secret_key),
    _Key("Endpoint", _endpoint),
    _Key("AllowedIPs", lambda v: _items(v, _network, allow_empty=True), repeat=True),
    _Key("PersistentKeepalive", _keepalive),
)}
_SECTIONS: Final = {"interface": ("Interface", _INTERFACE), "peer": ("Peer", _PEER)}

_HOOK = "a shell command wg-quick runs as root; tether runs no hooks (delete the line)"
_HOST_ROUTING = "host policy routing; tether's tunnel routes only inside the sandbox (delete the line)"
_REFUSED_KEYS: Final = (
    ("PreUp", _HOOK),
    ("PostUp", _HOOK),
    ("PreDown", _HOOK),
    ("PostDown", _HOOK),
    ("Table", _HOST_ROUTING),
    ("FwMark", _HOST_ROUTING),
    ("SaveConfig", "tether never writes the config file back (delete the line)"),
)
_REFUSED: Final = {name.lower(): why for name, why in _REFUSED_KEYS}
_ALL_KEYS: Final = {name.lower(): name for name in
                    [k.name for k in (*_INTERFACE.values(), *_PEER.values())] + [n for n, _ in _REFUSED_KEYS]}


# ---------------------------------------------------------------------------------------------
# Scanning: lines -> sections of (line, key, parsed value)


@dataclass
class _Section:
    kind: str  # "Interface" or "Peer"
    line: int  # of its header
    values: dict[str, list[tuple[int, Any]]] = field(default_factory=dict)  # key name -> [(line, value)]
    first: dict[str, int] = field(default_factory=dict)  # key name -> line it first appeared on, valid or not

    def one(self, name: str, default: Any = None) -> Any:
        got = self.values.get(name)
        return got[0][1] if got else default

    def lines_of(self, name: str) -> Iterator[tuple[int, Any]]:
        """(line, item) for every item of a repeated key, in file order."""
        for line, items in self.values.get(name, ()):
            for item in items:
                yield line, item


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(number, content without comment, trimmed) of every line that holds anything."""
    for number, raw in enumerate(text.removeprefix("\ufeff").split("\n"), 1):
        content = raw.partition("#")[0].strip()
        if content:
            yield number, content


class _Scanner:
    """Reads lines into sections: the one [Interface] and the [Peer]s, each key's value parsed."""

    def __init__(self, path: str, problems: list[ConfProblem]) -> None:
        self.path, self.problems = path, problems
        self.interface: _Section | None = None
        self.peers: list[_Section] = []
        self.current: _Section | None = None  # None before any section and inside a bad one

    def report(self, line: int, key: str, message: str) -> None:
        self.problems.append(ConfProblem(self.path, line, key, message))

    def scan(self, text: str) -> None:
        outside = True  # before the first header: keys here are misplaced (in a bad section: ignored)
        for number, content in _lines(text):
            if content.startswith("["):
                self.current, outside = self._open(number, content), False
            elif self.current is not None:
                self._entry(self.current, number, content)
            elif outside:
                key_text = content.partition("=")[0].strip()
                self.report(number, _shown_key(key_text), "outside any section: put it under [Interface] or [Peer]")

    def _open(self, number: int, content: str) -> _Section | None:
        header = re.fullmatch(r"\[\s*([A-Za-z]+)\s*\]", content)
        kind = _SECTIONS.get(header[1].lower()) if header else None
        if kind is None:
            close = header and difflib.get_close_matches(header[1].lower(), _SECTIONS)
            shown = f"[{header[1]}]" if close else "(name not shown: it might be part of a key)"
            self.report(number, "", f"unknown section {shown}: expected [Interface] or [Peer]")
            return None
        if kind[0] == "Peer":
            self.peers.append(_Section("Peer", number))
            return self.peers[-1]
        if self.interface is not None:
            first = self.interface.line
            self.report(number, "[Interface]", f"a second [Interface] section (the first is on line {first})")
            return None
        self.interface = _Section("Interface", number)
        return self.interface

    def _entry(self, section: _Section, number: int, content: str) -> None:
        key_text, eq, value = content.partition("=")
        if not eq:
            self.report(number, "", "not a 'Key = Value' line (not shown: it might hold a key)")
        else:
            _scan_value(section, number, key_text.strip(), value.strip(), self.report)


def _scan_value(section: _Section, number: int, key_text: str, value: str,
                report: Callable[[int, str, str], None]) -> None:
    table = _INTERFACE if section.kind == "Interface" else _PEER
    key = table.get(key_text.lower())
    if key is None:
        report(number, _shown_key(key_text), _unknown_message(key_text, section.kind))
        return
    if key.name in section.first and not key.repeat:
        report(number, key.name, f"given twice in this [{section.kind}] (first on line {section.first[key.name]})")
        return
    section.first[key.name] = number
    try:
        parsed = key.parse(value)
    except _Bad as e:
        report(number, key.name, str(e))
        return
    section.values.setdefault(key.name, []).append((number, parsed))


def _shown_key(key_text: str) -> str:
    """How a key is named in a message: its canonical spelling if it is known, itself if it is close
    to a known key (a typo), else "" -- an unknown word may be a piece of a key that wrapped."""
    known = _ALL_KEYS.get(key_text.lower())
    if known is not None:
        return known
    return key_text if _suggestion(key_text) else ""


def _suggestion(key_text: str) -> str | None:
    close = difflib.get_close_matches(key_text.lower(), _ALL_KEYS, n=1)
    return _ALL_KEYS[close[0]] if close else None


def _unknown_message(key_text: str, kind: str) -> str:
    refused = _REFUSED.get(key_text.lower())
    if refused is not None:
        return f"not supported: {refused}"
    for other_kind, other in _SECTIONS.values():
        if other_kind != kind and key_text.lower() in other:
            return f"belongs under [{other_kind}], not [{kind}]"
    names = ", ".join(k.name for k in (_INTERFACE if kind == "Interface" else _PEER).values())
    guess = _suggestion(key_text)
    if guess is not None:
        return f"unknown key in [{kind}]: did you mean {guess}? (known: {names})"
    return f"unknown key in [{kind}] (name not shown: it might be part of a key; known: {names})"


# ---------------------------------------------------------------------------------------------
# Building: sections -> dataclasses, then the rules that tie sections together


def _build(interface: _Section | None, peers: list[_Section], path: str,
           problems: list[ConfProblem]) -> WgConfig | None:
    def report(line: int | None, key: str, message: str) -> None:
        problems.append(ConfProblem(path, line, key, message))

    if interface is None:
        report(None, "[Interface]", "missing: the file needs an [Interface] section with a PrivateKey")
    if not peers:
        report(None, "[Peer]", "missing: the file needs at least one [Peer] section "
                               "(a tunnel with no peer leads nowhere)")
    iface = _build_interface(interface, report) if interface is not None else None
    built = [p for p in (_build_peer(section, report) for section in peers) if p is not None]
    _check_peers(iface.public_key if iface is not None else None, peers, report)
    if iface is None or len(built) != len(peers):
        return None
    return WgConfig(iface, tuple(built))


def _build_interface(section: _Section, report: Callable[[int | None, str, str], None]) -> InterfaceConf | None:
    addresses = [a for _, a in section.lines_of("Address")]
    dns = [d for _, d in section.lines_of("DNS")]
    mtu = section.one("MTU", DEFAULT_MTU)
    v6 = [line for line, a in section.lines_of("Address") if a.version == 6]
    if v6 and mtu < MIN_MTU_IPV6:
        report(section.first["MTU"], "MTU", f"MTU {mtu} is below {MIN_MTU_IPV6}, the least IPv6 works with "
                                f"(Address on line {v6[0]} is IPv6)")
    private = section.one("PrivateKey")
    if private is None:
        if "PrivateKey" not in section.first:  # else it was there but bad, and already reported
            report(section.line, "PrivateKey", "missing: [Interface] needs one (wg genkey makes one)")
        return None
    return InterfaceConf(
        private_key=private,
        addresses=tuple(dict.fromkeys(addresses)),
        dns=tuple(dict.fromkeys(d for d in dns if not isinstance(d, str))),
        dns_search=tuple(dict.fromkeys(d for d in dns if isinstance(d, str))),
        mtu=mtu,
        listen_port=section.one("ListenPort"),
    )


def _build_peer(section: _Section, report: Callable[[int | None, str, str], None]) -> PeerConf | None:
    key = section.one("PublicKey")
    if key is None:
        if "PublicKey" not in section.first:
            report(section.line, "PublicKey", "missing: every [Peer] needs the peer's public key")
        return None
    return PeerConf(
        public_key=key,
        preshared_key=section.one("PresharedKey"),
        endpoint=section.one("Endpoint"),
        allowed_ips=tuple(dict.fromkeys(net for _, net in section.lines_of("AllowedIPs"))),
        persistent_keepalive=section.one("PersistentKeepalive"),
        line=section.line,
    )


def _check_peers(own_key: bytes | None, sections: list[_Section],
                 report: Callable[[int | None, str, str], None]) -> None:
    """Rules across peers: distinct public keys, not our own, no prefix routed to two peers."""
    first_with_key: dict[bytes, int] = {}  # public key -> line of the first [Peer] that has it
    owners: dict[IPNetwork, int] = {}  # network -> line of the first [Peer] that routes it
    for section in sections:
        key = section.one("PublicKey")
        if key is not None:
            line = section.first["PublicKey"]
            if key == own_key:
                report(line, "PublicKey", "is the interface's own public key (from its PrivateKey), not a peer's")
            elif key in first_with_key:
                report(line, "PublicKey", f"same key as the [Peer] on line {first_with_key[key]}")
            else:
                first_with_key[key] = section.line
        for line, net in section.lines_of("AllowedIPs"):
            first = owners.setdefault(net, section.line)
            if first != section.line:
                report(line, "AllowedIPs", f"{net} is already routed to the [Peer] on line {first} "
                                           "(wg would move it to this peer, leaving that one without it)")
