"""The daemon's configuration file (``tether serve --config FILE``): TOML in, validated dataclasses out.

Why this file is shaped the way it is
-------------------------------------
A daemon config is edited by an administrator, often on a host where the daemon is already serving
other containers.  A mistake must therefore be caught *before* anything is started, and it must be
reported so that it can be fixed in one pass: every problem in the file, each with the file, the
line and the dotted key, the way a compiler reports them::

    /etc/tether/tether.toml:7: container.web.default: must be "allow" or "deny", not "maybe"

``tether serve --check-config`` prints exactly that list (``ConfigError``'s ``str()``) and exits 2;
``docs/config.md`` is the reference of the keys, and its table is checked against ``_DAEMON`` and
``_CONTAINER`` by the unit tests.

**Lines.**  ``tomllib`` (stdlib, so no dependency) says where a *syntax* error is, but gives no
positions for the keys of a document it parsed.  ``locate_keys`` is a small sans-IO scanner that
recovers them: it tokenizes the text (strings of all four kinds, comments, brackets, bare words),
follows ``[table]`` / ``[[array]]`` headers, ``key = value`` lines (bare, quoted and dotted keys,
inline tables, array elements spread over lines) and maps each dotted key to the line where it is
defined.  It only has to be right for documents ``tomllib`` accepted, and it never raises: a key it
cannot place is reported at the line of its nearest placed parent (its table's header), or without
a line.

**Validation** is table-driven: ``_DAEMON`` and ``_CONTAINER`` map each key to the TOML type it must
have and a check that converts or refuses the value (element by element for lists, so that a bad
rule is reported as ``container.web.allow[1]``).  Unknown keys are errors, with the closest known
key suggested, because a misspelt ``dafault = "deny"`` that is silently ignored leaves a container
open.  After the per-key checks come the rules that tie keys together: which keys belong to which
engine, the external engine's command and how it learns the tun fd, ``ipv4``/``ipv6``.  Everything
found is collected; one ``ConfigError`` carries the whole list.  A value that failed its check is
left out, so one mistake produces one problem, not a cascade.

**The external engine's command** is a list of arguments, never a shell line.  The program learns
the number of the tun fd it inherits in one of two ways, exactly one of which must be configured:
an environment variable (``tun_fd_env = "WG_TUN_FD"``, wireguard-go's convention) or the
placeholder ``{fd}`` inside an argument (``"fd://{fd}"`` for tun2socks).  ``{fd}`` is the only
placeholder; literal braces are written ``{{`` and ``}}``, as in ``str.format``, so that a future
placeholder can never change the meaning of an argument that works today.  ``expand_command``
substitutes it.

What this file does not do: it opens no file but the config itself (``load_config``); ``policy``
paths are checked for being absolute, not for existing (the daemon loads them); user and group
names are resolved with ``pwd``/``grp`` at load time, so a config refers to the accounts of the
host that loads it.
"""

from __future__ import annotations

import difflib
import grp
import ipaddress
import json
import os
import pwd
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from tether.errors import TetherError
from tether.policy import RuleError, parse_rule
from tether.publish import PublishError, parse_publish
from tether.runtime import RuntimeDirError, check_name
from tether.textfile import TextFileError, read_text

MAX_CONFIG_BYTES: Final = 1 << 20  # a larger file is not a config file (and /dev/zero must not hang us)
MAX_ID: Final = 2**32 - 2  # largest uid/gid; 2**32 - 1 is (uid_t)-1, "no change" to chown
ENGINES: Final = ("proxy", "external", "wireguard")
AVAILABLE_ENGINES: Final = ("proxy", "external", "wireguard")
DEFAULT_MTU: Final = {"proxy": 65520, "external": 1420, "wireguard": 1420}
FD_PLACEHOLDER: Final = "{fd}"
RESERVED_NAME: Final = "admin"  # the daemon's admin.sock lives next to the containers' sockets
HINT: Final = "docs/config.md describes every key; tether serve --check-config FILE checks a file"

Key = tuple[str | int, ...]  # a dotted key: ("container", "web", "allow", 1) is container.web.allow[1]


# ---------------------------------------------------------------------------------------------
# The schema


@dataclass(frozen=True)
class DaemonSettings:
    runtime_dir: str = "/run/tether"
    log: str | None = None
    max_pending: int = 16
    restart_max: int = 5
    restart_window: float = 60.0


@dataclass(frozen=True)
class ContainerConfig:
    name: str
    engine: str = "proxy"
    default: str | None = None  # None: the policy file's, else "allow"
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    policy: str | None = None
    ports: tuple[str, ...] = ()
    allow_host: tuple[int, ...] = ()
    dns: tuple[str, ...] = ()
    dns_deny: str = "refused"
    mtu: int | None = None
    ipv4: bool = True
    ipv6: bool = True
    connect_timeout: float = 10.0
    udp_timeout: float = 60.0
    socket_mode: int = 0o660
    socket_uid: int | None = None
    socket_gid: int | None = None
    command: tuple[str, ...] = ()
    tun_fd_env: str | None = None
    interface: str | None = None
    addresses: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()
    tun_packet_info: bool = False
    config: str | None = None  # engine = "wireguard": the wg-quick file

    @property
    def effective_mtu(self) -> int:
        """The tun MTU: the configured one, else the engine's default."""
        return self.mtu if self.mtu is not None else DEFAULT_MTU[self.engine]


@dataclass(frozen=True)
class Config:
    path: str
    daemon: DaemonSettings
    containers: dict[str, ContainerConfig]  # by name, in file order


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a config file; ``str()`` is ``FILE:LINE: KEY: MESSAGE``."""

    path: str
    line: int | None
    key: str  # dotted, e.g. 'container.web.allow[1]'; "" for the file as a whole
    message: str

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


def check_text(problems: list[ConfigProblem]) -> str:
    """The human report: one problem per line, in file order."""
    return "\n".join(str(p) for p in problems)


class ConfigError(TetherError):
    """A config file that cannot be used; ``errors`` lists every problem, ``str()`` is the report."""

    def __init__(self, errors: list[ConfigProblem], hint: str | None = HINT) -> None:
        super().__init__(check_text(errors), hint)
        self.errors = list(errors)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable despite the constructor's arguments
        return (type(self), (self.errors, self.hint))


# ---------------------------------------------------------------------------------------------
# Entry points


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file at ``path``; ConfigError lists everything wrong with it."""
    name = os.fsdecode(path)
    try:
        text = read_text(name, MAX_CONFIG_BYTES, "a config file")
    except TextFileError as e:
        raise ConfigError([ConfigProblem(name, e.line, "", e.message)]) from None
    return parse_config(text, name)


def parse_config(text: str, path: str = "<config>") -> Config:
    """Validate a config document (sans-IO but for user/group names); ConfigError lists every problem."""
    text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark some editors write
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # only reachable from str input: a lone surrogate
        raise ConfigError([ConfigProblem(path, text.count("\n", 0, e.start) + 1, "",
                                         f"not valid Unicode: lone surrogate at character {e.start}")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([_syntax_problem(text, path, e)]) from None
    except RecursionError:
        message = "TOML syntax error: arrays or tables nested too deeply"
        raise ConfigError([ConfigProblem(path, None, "", message)]) from None
    ck = _Checker(path, locate_keys(text))
    for key in data:
        if key not in _TOP:
            ck.report((key,), _unknown_message(key, _TOP, data[key]))
    daemon = DaemonSettings(**_section(ck, ("daemon",), data["daemon"], _DAEMON) if "daemon" in data else {})
    containers = _containers(ck, data.get("container", {}))
    if ck.problems:
        raise ConfigError(sorted(ck.problems, key=lambda p: p.line or 0))
    return Config(path, daemon, containers)


def expand_command(command: tuple[str, ...], fd: int) -> list[str]:
    """The argv of an external engine whose tun fd is ``fd``: ``{fd}`` replaced, ``{{``/``}}`` unescaped.

    Raises ValueError for an argument ``parse_config`` would have refused."""
    return ["".join(str(fd) if piece is None else piece for piece in _split_arg(arg)) for arg in command]


# ---------------------------------------------------------------------------------------------
# Reading bytes and reporting syntax errors

_TOML_POSITION = re.compile(r"\s*\((?:at line (\d+), column (\d+)|at end of document)\)$")
_UNQUOTED_MODE = re.compile(r"\s*socket_mode\s*=\s*[0-9]")


def _syntax_problem(text: str, path: str, error: tomllib.TOMLDecodeError) -> ConfigProblem:
    message = str(error)
    m = _TOML_POSITION.search(message)
    lines = text.split("\n")
    if m and m[1]:
        line, detail = int(m[1]), f"{message[:m.start()]} (column {m[2]})"
    else:  # "at end of document": the last line that holds anything
        line = max((n for n, s in enumerate(lines, 1) if s.strip()), default=1)
        detail = message[:m.start()] if m else message
    source = lines[line - 1] if line <= len(lines) else ""
    if _UNQUOTED_MODE.match(source):
        detail += '; socket_mode is a quoted string of octal digits: socket_mode = "0660"'
    return ConfigProblem(path, line, "", f"TOML syntax error: {detail}")


# ---------------------------------------------------------------------------------------------
# The line locator


def locate_keys(text: str) -> dict[Key, int]:
    """Map every key defined in the TOML ``text`` to the line (1-based) where it is defined.

    Tables map to their header's line (or, when only implied by a dotted key, to that key's line);
    array elements to the line of their first token.  Sans-IO, never raises; exact for documents
    that ``tomllib`` accepts."""
    return _Locator(list(_tokens(text))).run()


_Token = tuple[str, str, int]  # kind ("nl", "str", "bare" or the punctuation itself), text, line
_PUNCTUATION = "[]{},="
_BARE_END = frozenset(_PUNCTUATION + "#\"' \t\r\n")


def _tokens(text: str) -> Iterator[_Token]:
    i, line, n = 0, 1, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r":
            i += 1
        elif c == "\n":
            yield ("nl", c, line)
            line, i = line + 1, i + 1
        elif c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif c in "\"'":
            end = _string_end(text, i)
            yield ("str", text[i:end], line)
            line, i = line + text.count("\n", i, end), end
        elif c in _PUNCTUATION:
            yield (c, c, line)
            i += 1
        else:
            start = i
            while i < n and text[i] not in _BARE_END:
                i += 1
            yield ("bare", text[start:i], line)


def _string_end(text: str, start: int) -> int:
    """Offset just past the string starting at ``start`` (any of the four TOML kinds)."""
    quote = text[start]
    triple = text.startswith(quote * 3, start)
    i, n = start + (3 if triple else 1), len(text)
    while i < n:
        c = text[i]
        if c == "\\" and quote == '"':
            i += 2
        elif c == "\n" and not triple:
            return i  # unterminated: not TOML, but stop at the line's end
        elif c == quote and not triple:
            return i + 1
        elif c == quote and text.startswith(quote * 3, i):
            run = 3
            while run < 5 and text.startswith(quote, i + run):  # """a"""" is 'a"': up to 2 quotes may precede the end
                run += 1
            return i + run
        else:
            i += 1
    return n


def _key_part(token: _Token) -> list[str]:
    kind, raw, _ = token
    if kind == "bare":
        return [part for part in raw.split(".") if part]
    if raw.startswith("'"):
        return [raw[1:-1]]
    try:
        return [tomllib.loads(f"k = {raw}")["k"]]
    except (tomllib.TOMLDecodeError, KeyError):
        return [raw.strip('"')]


@dataclass
class _Frame:
    path: Key
    inline: bool  # an inline table; else an array
    index: int = 0
    expecting: bool = True  # array: the next token starts element ``index``


class _Locator:
    def __init__(self, tokens: list[_Token]) -> None:
        self.toks = tokens
        self.lines: dict[Key, int] = {}
        self.stack: list[_Frame] = []
        self.table: Key = ()

    def run(self) -> dict[Key, int]:
        i = 0
        while i < len(self.toks):
            start = i
            i = self._in_frame(i) if self.stack else self._statement(i)
            if i == start:  # anything unexpected: never loop, never fail
                i += 1
        return self.lines

    def _note(self, path: Key, line: int) -> None:
        for n in range(1, len(path) + 1):
            self.lines.setdefault(path[:n], line)

    def _kind(self, i: int) -> str:
        return self.toks[i][0] if i < len(self.toks) else "end"

    def _key(self, i: int) -> tuple[Key, int]:
        parts: list[str] = []
        while self._kind(i) in ("bare", "str"):
            parts += _key_part(self.toks[i])
            i += 1
        return tuple(parts), i

    def _end_of_line(self, i: int) -> int:
        while self._kind(i) not in ("nl", "end"):
            i += 1
        return i

    def _statement(self, i: int) -> int:
        kind, _, line = self.toks[i]
        if kind == "nl":
            return i + 1
        if kind == "[":
            i += 2 if self._kind(i + 1) == "[" else 1
            self.table, i = self._key(i)
            self._note(self.table, line)
            return self._end_of_line(i)
        path, i = self._key(i)
        if not path or self._kind(i) != "=":
            return self._end_of_line(i)
        self._note(self.table + path, line)
        return self._value(self.table + path, i + 1)

    def _value(self, path: Key, i: int) -> int:
        kind = self._kind(i)
        if kind in ("[", "{"):
            self.stack.append(_Frame(path, inline=kind == "{"))
            return i + 1
        i = i if kind in ("nl", "end") else i + 1  # a scalar is one token (a date-time's time part is skipped)
        return i if self.stack else self._end_of_line(i)

    def _in_frame(self, i: int) -> int:
        frame = self.stack[-1]
        kind, _, line = self.toks[i]
        if kind in ("]", "}"):
            self.stack.pop()
            return i + 1 if self.stack else self._end_of_line(i + 1)
        if kind == "nl":
            return i + 1
        if kind == ",":
            frame.index, frame.expecting = frame.index + (not frame.inline), True
            return i + 1
        if frame.inline:
            path, i = self._key(i)
            if not path or self._kind(i) != "=":
                return i
            self._note(frame.path + path, line)
            return self._value(frame.path + path, i + 1)
        if not frame.expecting:
            return i + 1
        frame.expecting = False
        self._note(frame.path + (frame.index,), line)
        return self._value(frame.path + (frame.index,), i)


# ---------------------------------------------------------------------------------------------
# Showing keys and values in messages

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SHOWN_CHARS = 60


def dotted(key: Key) -> str:
    """``("container", "my web", "allow", 1)`` -> ``container."my web".allow[1]``."""
    out = ""
    for part in key:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)
            out += f".{text}" if out else text
    return out


def _show(value: object) -> str:
    """A value as TOML would write it (short), or what kind of thing it is."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value if len(value) <= _SHOWN_CHARS else value[:_SHOWN_CHARS - 3] + "..."
        return json.dumps(text, ensure_ascii=False)
    if isinstance(value, float):
        return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(repr(value), repr(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"  # date, time, datetime


# ---------------------------------------------------------------------------------------------
# Per-key checks: a value of the right TOML type in, the converted value out, or _Invalid


class _Invalid(Exception):
    """The message of a problem with one value."""


_Check = Callable[[Any], Any]


def _suggest(word: str, choices: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f'; did you mean "{close[0]}"?' if close else ""


def _one_of(*choices: str) -> _Check:
    quoted = [f'"{c}"' for c in choices]
    listed = " or ".join(quoted) if len(quoted) == 2 else "one of " + ", ".join(quoted)

    def check(value: str) -> str:
        if value not in choices:
            raise _Invalid(f"must be {listed}, not {_show(value)}{_suggest(value, choices)}")
        return value
    return check


def _engine(value: str) -> str:
    if value in ENGINES and value not in AVAILABLE_ENGINES:
        raise _Invalid(f'engine "{value}" is not available yet (planned)')
    return _one_of(*ENGINES)(value)


def _between(low: int, high: int) -> _Check:
    def check(value: int) -> int:
        if not low <= value <= high:
            raise _Invalid(f"must be between {low} and {high}, not {value}")
        return value
    return check


def _seconds(high: int) -> _Check:
    def check(value: int | float) -> float:
        if not 0 < value <= high:  # compared before float(): 10**400 is a TOML integer float() refuses
            raise _Invalid(f"must be more than 0 and at most {high} (seconds), not {_show(value)}")
        return float(value)
    return check


def _absolute_path(value: str) -> str:
    if not value.startswith("/"):
        raise _Invalid(f"must be an absolute path, not {_show(value)}")
    if "\0" in value:
        raise _Invalid("must not contain a NUL character")
    return value


def _rule(action: str) -> _Check:
    def check(value: str) -> str:
        try:
            parse_rule(value, action)  # type: ignore[arg-type]
        except RuleError as e:
            raise _Invalid(str(e)) from None
        return value
    return check


def _publish(value: str) -> str:
    try:
        parse_publish(value)
    except PublishError as e:
        raise _Invalid(str(e)) from None
    return value


def _ip_address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise _Invalid(f"must be an IP address, not {_show(value)}") from None
    return value


def _interface_address(value: str) -> str:
    try:
        ipaddress.ip_interface(value)
        if "/" not in value:
            raise ValueError
    except ValueError:
        raise _Invalid(f'must be ADDRESS/PREFIXLEN such as "10.9.0.2/24" or "fd00::2/64", not {_show(value)}') from None
    return value


def _route(value: str) -> str:
    try:
        ipaddress.ip_network(value)
    except ValueError:
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise _Invalid(f'must be a network such as "0.0.0.0/0", "::/0" or "10.9.0.0/24", '
                           f'not {_show(value)}') from None
        raise _Invalid(f'{_show(value)} has host bits set; the network is "{network}"') from None
    return value


def _octal_mode(value: str) -> int:
    if not value or value.strip("01234567"):
        raise _Invalid(f'must be octal digits such as "0660", not {_show(value)}')
    mode = int(value, 8)
    if mode > 0o777:
        raise _Invalid(f'must be at most "0777" (permission bits only), not {_show(value)}')
    return mode


def _owner(what: str, lookup: Callable[[str], int]) -> _Check:
    def check(value: int | str) -> int:
        if isinstance(value, int):
            return _between(0, MAX_ID)(value)
        try:
            return lookup(value)
        except (KeyError, ValueError):  # ValueError: a NUL in the name
            unquote = " (a number is written without quotes)" if value.isdigit() else ""
            raise _Invalid(f"no {what} named {_show(value)} on this system{unquote}") from None
    return check


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_name(value: str) -> str:
    if not _ENV_NAME.fullmatch(value):
        raise _Invalid(f"must be an environment variable name ([A-Za-z_][A-Za-z0-9_]*), not {_show(value)}")
    return value


def _interface_name(value: str) -> str:
    """What the kernel's dev_valid_name() accepts (IFNAMSIZ 16 with the NUL)."""
    if not 1 <= len(value.encode()) <= 15:
        raise _Invalid(f"must be 1 to 15 bytes long, not {_show(value)}")
    if value in (".", "..") or any(c in "/:\0" or c.isspace() for c in value):
        raise _Invalid(f'must not be "." or ".." nor contain "/", ":" or whitespace, not {_show(value)}')
    return value


def _split_arg(arg: str) -> list[str | None]:
    """An external command argument as text pieces and ``None`` where ``{fd}`` stands; ValueError if bad."""
    pieces: list[str | None] = []
    text, i = "", 0
    while i < len(arg):
        if arg.startswith(("{{", "}}"), i):
            text, i = text + arg[i], i + 2
        elif arg.startswith(FD_PLACEHOLDER, i):
            pieces += [text, None]
            text, i = "", i + len(FD_PLACEHOLDER)
        elif arg[i] == "{":
            end = arg.find("}", i)
            what = arg[i:end + 1] if end >= 0 else arg[i:]
            raise ValueError(f'"{what}" is not a placeholder: only "{{fd}}" is '
                             f'(write a literal "{{" as "{{{{" and "}}" as "}}}}")')
        elif arg[i] == "}":
            raise ValueError('a single "}" must be written "}}" ("{fd}" is the only placeholder)')
        else:
            text, i = text + arg[i], i + 1
    return pieces + [text] if text or not pieces else pieces


def _command_arg(value: str) -> str:
    try:
        _split_arg(value)
    except ValueError as e:
        raise _Invalid(str(e)) from None
    return value


# ---------------------------------------------------------------------------------------------
# The tables: key -> TOML type and check


@dataclass(frozen=True)
class _Field:
    kind: str  # a key of _KINDS
    check: _Check | None = None  # for list kinds: applied to each element


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_KINDS: Final[dict[str, tuple[str, Callable[[object], bool]]]] = {
    "string": ("a string", lambda v: isinstance(v, str)),
    "integer": ("an integer", _is_int),
    "number": ("a number", lambda v: _is_int(v) or isinstance(v, float)),
    "boolean": ("true or false", lambda v: isinstance(v, bool)),
    "strings": ("a list of strings", lambda v: isinstance(v, list)),
    "integers": ("a list of integers", lambda v: isinstance(v, list)),
    "mode": ('a string of octal digits such as "0660"', lambda v: isinstance(v, str)),
    "owner": ("a name (string) or a number", lambda v: isinstance(v, str) or _is_int(v)),
}
_ELEMENT: Final = {"strings": "string", "integers": "integer"}

_DAEMON: Final[dict[str, _Field]] = {
    "runtime_dir": _Field("string", _absolute_path),
    "log": _Field("string", _absolute_path),
    "max_pending": _Field("integer", _between(1, 1024)),
    "restart_max": _Field("integer", _between(0, 1000)),
    "restart_window": _Field("number", _seconds(86400)),
}

_CONTAINER: Final[dict[str, _Field]] = {
    "engine": _Field("string", _engine),
    "default": _Field("string", _one_of("allow", "deny")),
    "allow": _Field("strings", _rule("allow")),
    "deny": _Field("strings", _rule("deny")),
    "policy": _Field("string", _absolute_path),
    "ports": _Field("strings", _publish),
    "allow_host": _Field("integers", _between(1, 65535)),
    "dns": _Field("strings", _ip_address),
    "dns_deny": _Field("string", _one_of("refused", "nxdomain")),
    "mtu": _Field("integer", _between(576, 65520)),
    "ipv4": _Field("boolean"),
    "ipv6": _Field("boolean"),
    "connect_timeout": _Field("number", _seconds(600)),
    "udp_timeout": _Field("number", _seconds(86400)),
    "socket_mode": _Field("mode", _octal_mode),
    "socket_uid": _Field("owner", _owner("user", lambda name: pwd.getpwnam(name).pw_uid)),
    "socket_gid": _Field("owner", _owner("group", lambda name: grp.getgrnam(name).gr_gid)),
    "command": _Field("strings", _command_arg),
    "tun_fd_env": _Field("string", _env_name),
    "interface": _Field("string", _interface_name),
    "addresses": _Field("strings", _interface_address),
    "routes": _Field("strings", _route),
    "tun_packet_info": _Field("boolean"),
    "config": _Field("string", _absolute_path),
}

_TOP: Final = ("daemon", "container")
EXTERNAL_ONLY: Final = ("command", "tun_fd_env", "interface", "addresses", "routes", "tun_packet_info")
PROXY_ONLY: Final = ("default", "allow", "deny", "policy", "ports", "allow_host", "dns", "dns_deny")
WIREGUARD_ONLY: Final = ("config",)
FROM_THE_WG_FILE: Final = ("mtu", "ipv4", "ipv6")  # the WireGuard file says these (MTU, Address)
_BAD: Final = object()  # a value that failed its check (already reported)


# ---------------------------------------------------------------------------------------------
# Walking the document


class _Checker:
    """Collects problems, each placed at the line of its key (or of the nearest placed parent)."""

    def __init__(self, path: str, lines: dict[Key, int]) -> None:
        self.path = path
        self.lines = lines
        self.problems: list[ConfigProblem] = []

    def report(self, key: Key, message: str) -> None:
        self.problems.append(ConfigProblem(self.path, self._line(key), dotted(key), message))

    def _line(self, key: Key) -> int | None:
        for n in range(len(key), 0, -1):
            if key[:n] in self.lines:
                return self.lines[key[:n]]
        return None


def _wrong_type(kind: str, value: object) -> str:
    if kind == "mode" and _is_int(value):
        return f'must be a string of octal digits in quotes, such as "0660"; not the integer {value}'
    return f"must be {_KINDS[kind][0]}, not {_show(value)}"


def _checked(ck: _Checker, key: Key, value: object, check: _Check | None) -> object:
    if check is None:
        return value
    try:
        return check(value)
    except _Invalid as e:
        ck.report(key, str(e))
        return _BAD


def _value(ck: _Checker, key: Key, value: object, field: _Field) -> object:
    """The converted value of one key, or _BAD once every problem with it is reported."""
    if not _KINDS[field.kind][1](value):
        ck.report(key, _wrong_type(field.kind, value))
        return _BAD
    element = _ELEMENT.get(field.kind)
    if element is None:
        return _checked(ck, key, value, field.check)
    assert isinstance(value, list)
    out = []
    for i, item in enumerate(value):
        if not _KINDS[element][1](item):
            listed = f"{key[-1]} is {_KINDS[field.kind][0]}"
            ck.report(key + (i,), f"must be {_KINDS[element][0]} ({listed}), not {_show(item)}")
            out.append(_BAD)
        else:
            out.append(_checked(ck, key + (i,), item, field.check))
    return _BAD if _BAD in out else tuple(out)


def _unknown_message(name: str, known: tuple[str, ...] | list[str], value: object = None) -> str:
    if name == "name" and "engine" in known:
        return "unknown key; a container's name is its table's: [container.NAME]"
    for section, table in (("[daemon]", _DAEMON), ("[container.NAME]", _CONTAINER)):
        if name in table and name not in known:
            return f"unknown key here; {name} belongs in {section}"
    if (suggestion := _suggest(name, known)):
        return "unknown key" + suggestion
    if isinstance(value, dict) and any(k in _CONTAINER for k in value):
        return f"unknown key; a container is written [container.{dotted((name,))}]"
    return "unknown key"


def _section(ck: _Checker, key: Key, table: object, fields: dict[str, _Field],
             skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The valid values of a table (as dataclass keyword arguments); everything else reported."""
    if not isinstance(table, dict):
        ck.report(key, f"must be a table ([{dotted(key)}]), not {_show(table)}")
        return {}
    out: dict[str, Any] = {}
    for name, value in table.items():
        if name not in fields:
            ck.report(key + (name,), _unknown_message(name, list(fields), value))
        elif name not in skip and (converted := _value(ck, key + (name,), value, fields[name])) is not _BAD:
            out[name] = converted
    return out


def _containers(ck: _Checker, tables: object) -> dict[str, ContainerConfig]:
    if not isinstance(tables, dict):
        ck.report(("container",), f"must be a table of containers ([container.NAME]), not {_show(tables)}")
        return {}
    out = {}
    for name, table in tables.items():
        if (container := _container(ck, name, table)) is not None:
            out[name] = container
    return out


def _container(ck: _Checker, name: str, table: object) -> ContainerConfig | None:
    key: Key = ("container", name)
    try:
        check_name(name)
    except RuntimeDirError as e:
        ck.report(key, f"{e} ({e.hint})" if e.hint else str(e))
    if name == RESERVED_NAME:
        ck.report(key, f"the name {RESERVED_NAME!r} is the daemon's own socket ({RESERVED_NAME}.sock); choose another")
    if not isinstance(table, dict):
        ck.report(key, f"must be a table ([{dotted(key)}]), not {_show(table)}")
        return None
    engine = _value(ck, key + ("engine",), table["engine"], _CONTAINER["engine"]) if "engine" in table else "proxy"
    misplaced = _misplaced_keys(ck, key, table, engine)
    values = _section(ck, key, table, _CONTAINER, skip=misplaced | {"engine"})
    if engine is not _BAD:
        values["engine"] = engine
    if engine == "external":
        _check_external(ck, key, table, values)
    if engine == "wireguard":
        _check_wireguard(ck, key, table, values)
    if not (values.get("ipv4", True) or values.get("ipv6", True)):
        ck.report(key + ("ipv6",), "ipv4 and ipv6 are both false: the container would have no network")
    return ContainerConfig(name=name, **values)


def _misplaced_keys(ck: _Checker, key: Key, table: dict[str, Any], engine: object) -> frozenset[str]:
    """Report the keys this engine does not use (their values are then not checked)."""
    external = {name: 'only for engine = "external"' for name in EXTERNAL_ONLY}
    wireguard = {name: 'only for engine = "wireguard"' for name in WIREGUARD_ONLY}
    if engine == "proxy":
        wrong = {**external, **wireguard}
    elif engine == "external":
        policy = "the external program decides what leaves; policy keys apply to the proxy engine"
        wrong = {**{name: policy for name in PROXY_ONLY}, **wireguard}
    elif engine == "wireguard":
        policy = "nothing leaves but through the tunnel; policy keys apply to the proxy engine"
        from_file = "the WireGuard file (config) says this (MTU, Address)"
        wrong = {**{name: policy for name in PROXY_ONLY}, **external, **{name: from_file for name in FROM_THE_WG_FILE}}
    else:
        return frozenset()  # unknown or unavailable engine: already reported
    found = frozenset(name for name in wrong if name in table)
    for name in sorted(found, key=list(table).index):
        ck.report(key + (name,), wrong[name])
    return found


def _check_wireguard(ck: _Checker, key: Key, table: dict[str, Any], values: dict[str, Any]) -> None:
    """``config`` names a readable, valid wg-quick file (checked now: --check-config reports it)."""
    if "config" not in table:
        ck.report(key + ("engine",), 'engine = "wireguard" needs config = "/path/to/wg0.conf" (a wg-quick file)')
        return
    path = values.get("config")
    if path is None:
        return  # reported already
    from tether.engine.wireguard.conf import ConfError, load_conf

    try:
        load_conf(path)
    except ConfError as exc:  # its messages never hold key material
        ck.report(key + ("config",), "the WireGuard file has errors: " + "; ".join(str(p) for p in exc.problems))


def _check_external(ck: _Checker, key: Key, table: dict[str, Any], values: dict[str, Any]) -> None:
    """``command`` is there, and the program learns its tun fd in exactly one way."""
    if "command" not in table:
        ck.report(key, 'engine = "external" needs command = ["PROGRAM", "ARG", ...]')
        return
    command = values.get("command")
    if command is None:
        return  # reported already
    if not command or not command[0]:
        ck.report(key + ("command",), 'must name a program: command = ["PROGRAM", "ARG", ...]')
        return
    in_argv = any(None in _split_arg(arg) for arg in command)
    in_env = "tun_fd_env" in table
    if in_argv and in_env:
        ck.report(key + ("tun_fd_env",), 'the tun fd is passed one way only: either tun_fd_env (in the environment) '
                                         'or "{fd}" in an argument of command, not both')
    elif not in_argv and not in_env:
        ck.report(key + ("command",), 'the program must learn its tun fd number: set tun_fd_env = "VAR" to pass it in '
                                      'the environment, or write "{fd}" in an argument (e.g. "fd://{fd}")')
