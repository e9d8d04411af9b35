"""Unit tests for tether.config: the daemon's TOML config file.

Bad inputs tried: a TOML syntax error (and an unquoted socket_mode), unknown keys at every level
(with and without a suggestion, a key of the other section, a container written without
``container.``), a value of the wrong TOML type for every key, list elements of the wrong type,
bad rules, bad port specs, bad modes (an integer, non-octal, over 0777), unknown users and groups,
out-of-range numbers (mtu, timeouts, nan, inf, 10**400), both ipv4 and ipv6 false, an unknown and a
planned engine, an external engine without a command / with both or neither ways of passing the tun
fd / with a stray ``{x}`` or ``}``, policy keys on an external engine and external keys on a proxy,
bad interface names, addresses, routes (host bits set), DNS servers and env names, bad container
names, tables that are not tables, bad UTF-8, a lone surrogate, an unreadable and an oversized file,
and arbitrary text.  Several problems in one file must all be reported, each at its own line.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pickle
import pwd
import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.config import (
    _CONTAINER,
    _DAEMON,
    EXTERNAL_ONLY,
    WIREGUARD_ONLY,
    MAX_CONFIG_BYTES,
    PROXY_ONLY,
    Config,
    ConfigError,
    ConfigProblem,
    ContainerConfig,
    DaemonSettings,
    check_text,
    dotted,
    expand_command,
    load_config,
    locate_keys,
    parse_config,
)
from tether.errors import TetherError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"

EXAMPLE = """\
[daemon]
runtime_dir = "/run/tether"      # admin.sock and NAME.sock live here; --runtime-dir overrides
log = "/var/log/tether/events.jsonl"

[container.web]
engine = "proxy"                 # proxy | external | wireguard (next issue)
default = "deny"                 # same rule language as tether run
allow = ["203.0.113.10:80", "*.example.test"]
deny = []
ports = ["8080:80"]
socket_mode = "0660"             # of /run/tether/web.sock; socket_uid / socket_gid too

[container.vpn]
engine = "external"
command = ["wireguard-go", "-f", "wg-vpn"]
tun_fd_env = "WG_TUN_FD"         # or "{fd}" inside command for programs that take it in argv
"""


def problems(text: str) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "t.toml")
    return info.value.errors


def only(text: str) -> ConfigProblem:
    found = problems(text)
    assert len(found) == 1, check_text(found)
    return found[0]


def container(body: str, name: str = "c") -> str:
    return f"[container.{name}]\n{body}\n"


EXTERNAL = 'engine = "external"\ncommand = ["prog"]\ntun_fd_env = "FD"\n'


# ---------------------------------------------------------------------------------------------
# Valid files


def test_example_round_trips():
    config = parse_config(EXAMPLE, "/etc/tether/tether.toml")
    assert config == Config(
        path="/etc/tether/tether.toml",
        daemon=DaemonSettings(runtime_dir="/run/tether", log="/var/log/tether/events.jsonl"),
        containers={
            "web": ContainerConfig(name="web", engine="proxy", default="deny",
                                   allow=("203.0.113.10:80", "*.example.test"), deny=(), ports=("8080:80",),
                                   socket_mode=0o660),
            "vpn": ContainerConfig(name="vpn", engine="external", command=("wireguard-go", "-f", "wg-vpn"),
                                   tun_fd_env="WG_TUN_FD"),
        })
    assert list(config.containers) == ["web", "vpn"]
    assert config.containers["web"].effective_mtu == 65520
    assert config.containers["vpn"].effective_mtu == 1420


def test_every_key_given():
    user, group = pwd.getpwuid(os.getuid()), grp.getgrgid(os.getgid())
    text = f"""
[daemon]
runtime_dir = "/run/t"
log = "/var/log/t.jsonl"
max_pending = 1024
restart_max = 0
restart_window = 86400

[container.p]
engine = "proxy"
default = "allow"
allow = ["tcp://example.test:443", "udp:53", "2001:db8::/32"]
deny = ["203.0.113.0/24"]
policy = "/etc/tether/p.toml"
ports = ["127.0.0.1:5353:53/udp", "[::1]:8080:80"]
allow_host = [1, 65535]
dns = ["192.0.2.53", "2001:db8::53"]
dns_deny = "nxdomain"
mtu = 576
ipv4 = true
ipv6 = false
connect_timeout = 0.5
udp_timeout = 86400
socket_mode = "600"
socket_uid = "{user.pw_name}"
socket_gid = {group.gr_gid}

[container.x]
engine = "external"
command = ["tun2socks", "-device", "fd://{{fd}}", "-x", "{{{{literal}}}}"]
interface = "tun-x"
addresses = ["10.9.0.2/24", "fd00::2/64"]
routes = ["0.0.0.0/0", "::/0", "10.9.0.0/24"]
mtu = 65520
"""
    config = parse_config(text)
    assert config.daemon == DaemonSettings("/run/t", "/var/log/t.jsonl", 1024, 0, 86400.0)
    p, x = config.containers["p"], config.containers["x"]
    assert p.allow == ("tcp://example.test:443", "udp:53", "2001:db8::/32") and p.deny == ("203.0.113.0/24",)
    assert (p.policy, p.allow_host, p.dns_deny) == ("/etc/tether/p.toml", (1, 65535), "nxdomain")
    assert p.dns == ("192.0.2.53", "2001:db8::53")
    assert (p.mtu, p.effective_mtu, p.ipv4, p.ipv6) == (576, 576, True, False)
    assert isinstance(p.udp_timeout, float) and (p.connect_timeout, p.udp_timeout) == (0.5, 86400.0)
    assert (p.socket_mode, p.socket_uid, p.socket_gid) == (0o600, user.pw_uid, group.gr_gid)
    assert x.command == ("tun2socks", "-device", "fd://{fd}", "-x", "{{literal}}") and x.tun_fd_env is None
    assert (x.interface, x.addresses) == ("tun-x", ("10.9.0.2/24", "fd00::2/64"))
    assert x.routes == ("0.0.0.0/0", "::/0", "10.9.0.0/24")
    assert expand_command(x.command, 7) == ["tun2socks", "-device", "fd://7", "-x", "{literal}"]


def test_empty_file_is_the_defaults():
    assert parse_config("") == Config("<config>", DaemonSettings(), {})
    assert parse_config("[daemon]\n[container]\n").containers == {}


def test_byte_order_mark_is_accepted():
    assert parse_config("\ufeff[daemon]\nmax_pending = 3\n").daemon.max_pending == 3


def test_quoted_and_dotted_container_names():
    text = '[container."web.1"]\ndefault = "deny"\n[container.\'b-2\']\n\ncontainer_c = 1\n'
    found = only(text)
    assert (found.line, found.key) == (5, "container.b-2.container_c")
    config = parse_config('[container."web.1"]\ndefault = "deny"\n')
    assert config.containers["web.1"].default == "deny"
    assert only('[container."web.1"]\ndefault = "maybe"\n').key == 'container."web.1".default'
    inline = only('container.web = { default = "maybe" }\n')
    assert (inline.line, inline.key) == (1, "container.web.default")


def test_containers_in_file_order():
    names = [f"n{i}" for i in (3, 1, 2, 0)]
    assert list(parse_config("".join(f"[container.{n}]\n" for n in names)).containers) == names


def test_load_config_reads_a_file(tmp_path):
    path = tmp_path / "tether.toml"
    path.write_text(EXAMPLE)
    config = load_config(path)
    assert config.path == str(path) and list(config.containers) == ["web", "vpn"]


def test_schema_tables_match_the_dataclasses():
    assert list(_DAEMON) == [f.name for f in dataclasses.fields(DaemonSettings)]
    assert list(_CONTAINER) == [f.name for f in dataclasses.fields(ContainerConfig) if f.name != "name"]
    assert set(EXTERNAL_ONLY) <= set(_CONTAINER) and set(PROXY_ONLY) <= set(_CONTAINER)


def test_docs_list_every_key():
    documented = set(re.findall(r"^\| `([a-z_0-9]+)` \|", DOCS.read_text(), re.MULTILINE))
    assert documented == set(_DAEMON) | set(_CONTAINER)


# ---------------------------------------------------------------------------------------------
# Whole-file problems


def test_syntax_error_names_its_line():
    found = only('[daemon]\nmax_pending = 3\nlog = "/x\n')
    assert found.line == 3 and found.key == "" and "TOML syntax error" in found.message
    assert str(found).startswith("t.toml:3: TOML syntax error: ")


def test_syntax_error_at_end_of_document_names_the_last_line():
    assert only("[daemon]\nlog = [1,\n\n\n").line == 2


def test_unquoted_socket_mode_is_explained():
    found = only('[container.c]\nsocket_mode = 0660\n')
    assert found.line == 2 and 'socket_mode = "0660"' in found.message


def test_deep_nesting_is_a_config_error():
    assert "nested too deeply" in only("x = " + "[" * 5000 + "]" * 5000).message


def test_bad_utf8(tmp_path):
    path = tmp_path / "t.toml"
    data = b'[daemon]\nlog = "/v\xffar"\n'
    path.write_bytes(data)
    assert data.index(b"\xff") == 18
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (found,) = info.value.errors
    assert (found.path, found.line, found.key) == (str(path), 2, "")
    assert "not UTF-8: byte 0xff at offset 18 (invalid start byte)" in found.message


def test_lone_surrogate_in_text():
    assert "lone surrogate" in only('log = "\ud800"\n').message


@pytest.mark.parametrize("make", [lambda d: d / "missing.toml", lambda d: d])
def test_unreadable_file(tmp_path, make):
    path = make(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (found,) = info.value.errors
    assert found.line is None and found.path == str(path)
    assert str(found) in (f"{path}: cannot read: No such file or directory", f"{path}: cannot read: Is a directory")


def test_oversized_file(tmp_path):
    path = tmp_path / "big.toml"
    path.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match="not a config file"):
        load_config(path)


def test_config_error_is_the_report():
    with pytest.raises(ConfigError) as info:
        parse_config('[daemon]\nmax_pending = 0\n[container.c]\nmtu = 1\n', "/etc/t.toml")
    error = info.value
    assert isinstance(error, TetherError) and error.hint and "docs/config.md" in error.hint
    assert str(error) == ("/etc/t.toml:2: daemon.max_pending: must be between 1 and 1024, not 0\n"
                          "/etc/t.toml:4: container.c.mtu: must be between 576 and 65520, not 1")
    assert str(error) == check_text(error.errors)
    copy = pickle.loads(pickle.dumps(error))
    assert copy.errors == error.errors and str(copy) == str(error) and copy.hint == error.hint


def test_several_problems_each_at_its_line():
    text = """\
[daemon]
max_pending = 0
runtime_dri = "/run/x"

[container.web]
default = "maybe"
allow = [
  "203.0.113.1",
  "10.0.0.0/33",   # bad prefix
]
mtu = 10

[container."bad name"]
ipv4 = false
ipv6 = false
[unknown]
"""
    assert [(p.line, p.key) for p in problems(text)] == [
        (2, "daemon.max_pending"),
        (3, "daemon.runtime_dri"),
        (6, "container.web.default"),
        (9, "container.web.allow[1]"),
        (11, "container.web.mtu"),
        (13, 'container."bad name"'),
        (15, 'container."bad name".ipv6'),
        (16, "unknown"),
    ]


# ---------------------------------------------------------------------------------------------
# Unknown keys


@pytest.mark.parametrize("text, key, message", [  # the unknown key is on the last line
    ("daemn = 1\n", "daemn", 'unknown key; did you mean "daemon"?'),
    ("[containers.web]\n", "containers", 'unknown key; did you mean "container"?'),
    ("[daemon]\nruntime_dri = '/x'\n", "daemon.runtime_dri", 'unknown key; did you mean "runtime_dir"?'),
    ("[container.c]\ndafault = 'deny'\n", "container.c.dafault", 'unknown key; did you mean "default"?'),
    ("[container.c]\nzzz = 1\n", "container.c.zzz", "unknown key"),
    ("[container.c]\nmax_pending = 1\n", "container.c.max_pending",
     "unknown key here; max_pending belongs in [daemon]"),
    ("[daemon]\nmtu = 1500\n", "daemon.mtu", "unknown key here; mtu belongs in [container.NAME]"),
    ("runtime_dir = '/x'\n", "runtime_dir", "unknown key here; runtime_dir belongs in [daemon]"),
    ("[container.c]\nname = 'c'\n", "container.c.name",
     "unknown key; a container's name is its table's: [container.NAME]"),
    ("[daemon]\n\n# [x]\nbogus = 1\n", "daemon.bogus", "unknown key"),
    ("web.engine = 'proxy'\n", "web", "unknown key; a container is written [container.web]"),
])
def test_unknown_keys(text, key, message):
    found = problems(text)[-1]
    assert (found.line, found.key, found.message) == (text.count("\n"), key, message)


def test_unknown_table_suggests_a_container():
    found = only("[web]\nengine = 'proxy'\n")
    assert (found.line, found.key, found.message) == (1, "web", "unknown key; a container is written [container.web]")


# ---------------------------------------------------------------------------------------------
# Types

WRONG = {  # kind -> (TOML literal, message)
    "string": ("5", "must be a string, not 5"),
    "integer": ("true", "must be an integer, not true"),
    "number": ('"1"', 'must be a number, not "1"'),
    "boolean": ('"yes"', 'must be true or false, not "yes"'),
    "strings": ('"x"', 'must be a list of strings, not "x"'),
    "integers": ("{}", "must be a list of integers, not a table"),
    "mode": ("[]", 'must be a string of octal digits such as "0660", not a list'),
    "owner": ("1.5", "must be a name (string) or a number, not 1.5"),
}
ALL_KEYS = [("daemon", k) for k in _DAEMON] + [("container", k) for k in _CONTAINER]


def document(section: str, key: str, literal: str) -> tuple[str, int, str]:
    """A file whose only problem can be ``key = literal``: (text, its line, its dotted key)."""
    if section == "daemon":
        return f"[daemon]\n{key} = {literal}\n", 2, f"daemon.{key}"
    lines = ["[container.c]"]
    if key in EXTERNAL_ONLY:
        lines += ['engine = "external"'] + [line for line in ('command = ["prog"]', 'tun_fd_env = "FD"')
                                             if not line.startswith(key + " ")]
    if key in WIREGUARD_ONLY:
        lines += ['engine = "wireguard"']
    lines.append(f"{key} = {literal}")
    return "\n".join(lines) + "\n", len(lines), f"container.c.{key}"


@pytest.mark.parametrize("section, key", ALL_KEYS, ids=[f"{s}.{k}" for s, k in ALL_KEYS])
def test_wrong_type(section, key):
    kind = (_DAEMON if section == "daemon" else _CONTAINER)[key].kind
    literal, message = WRONG[kind]
    text, line, dotted_key = document(section, key, literal)
    assert only(text) == ConfigProblem("t.toml", line, dotted_key, message)


@pytest.mark.parametrize("literal, message", [
    ('["a", 1]', "must be a string (allow is a list of strings), not 1"),
    ('["a", ["b"]]', "must be a string (allow is a list of strings), not a list"),
])
def test_list_element_of_wrong_type(literal, message):
    found = only(container(f"allow = {literal}"))
    assert (found.line, found.key, found.message) == (2, "container.c.allow[1]", message)
    found = only(container('allow_host = [80, "443"]'))
    assert (found.key, found.message) == ("container.c.allow_host[1]",
                                          'must be an integer (allow_host is a list of integers), not "443"')


@pytest.mark.parametrize("literal", ["true", "1.0", "[]", '"1"'])
def test_integer_refuses_bool_float_and_text(literal):
    assert only(f"[daemon]\nrestart_max = {literal}\n").message.startswith("must be an integer")


def test_numbers_accept_integers():
    assert parse_config("[daemon]\nrestart_window = 5\n").daemon.restart_window == 5.0


@pytest.mark.parametrize("section, body, message", [
    ("daemon", "runtime_dir = 'run/tether'", 'must be an absolute path, not "run/tether"'),
    ("daemon", "log = ''", 'must be an absolute path, not ""'),
    ("daemon", "max_pending = 1025", "must be between 1 and 1024, not 1025"),
    ("daemon", "restart_max = -1", "must be between 0 and 1000, not -1"),
    ("daemon", "restart_window = 0", "must be more than 0 and at most 86400 (seconds), not 0"),
    ("daemon", "restart_window = nan", "must be more than 0 and at most 86400 (seconds), not nan"),
    ("daemon", "restart_window = inf", "must be more than 0 and at most 86400 (seconds), not inf"),
    ("daemon", f"restart_window = {10**400}", f"must be more than 0 and at most 86400 (seconds), not {10**400}"),
    ("container.c", "connect_timeout = 601", "must be more than 0 and at most 600 (seconds), not 601"),
    ("container.c", "udp_timeout = -0.5", "must be more than 0 and at most 86400 (seconds), not -0.5"),
    ("container.c", "mtu = 575", "must be between 576 and 65520, not 575"),
    ("container.c", "mtu = 65521", "must be between 576 and 65520, not 65521"),
    ("container.c", "allow_host = [0]", "must be between 1 and 65535, not 0"),
    ("container.c", "dns_deny = 'servfail'", 'must be "refused" or "nxdomain", not "servfail"'),
    ("container.c", "default = 'Deny'", 'must be "allow" or "deny", not "Deny"; did you mean "deny"?'),
    ("container.c", "engine = 'exernal'",
     'must be one of "proxy", "external", "wireguard", not "exernal"; did you mean "external"?'),
    ("container.c", "engine = 'wireguard'", 'engine = "wireguard" needs config = "/path/to/wg0.conf" (a wg-quick file)'),
    ("container.c", "policy = 'p.toml'", 'must be an absolute path, not "p.toml"'),
    ("container.c", "dns = ['dns.example.test']", 'must be an IP address, not "dns.example.test"'),
    ("container.c", "socket_uid = -1", "must be between 0 and 4294967294, not -1"),
])
def test_bad_values(section, body, message):
    found = only(f"[{section}]\n{body}\n")
    assert (found.line, found.message) == (2, message)


def test_long_values_are_shortened():
    message = only(f"[daemon]\nlog = '{'x' * 500}'\n").message
    assert len(message) < 100 and message.endswith('..."')


# ---------------------------------------------------------------------------------------------
# Rules, ports, modes, owners


def test_bad_rule():
    found = only(container('deny = ["example.test", "10.0.0.0/33"]'))
    assert (found.line, found.key) == (2, "container.c.deny[1]")
    assert found.message == "bad rule '10.0.0.0/33': prefix length 33 is out of range for IPv4 (0-32)"


@pytest.mark.parametrize("spec, fragment", [
    ("8080", "want HOSTPORT:SANDBOXPORT"), ("0:80", "host port '0'"),
    ("8080:80/sctp", "'sctp' is not tcp or udp"), ("\u00b2:80", "host port '\u00b2' is not a port"),
])
def test_bad_port_spec(spec, fragment):
    found = only(container(f'ports = ["80:80", "{spec}"]'))
    assert found.key == "container.c.ports[1]" and fragment in found.message


@pytest.mark.parametrize("mode, fragment", [
    ("660", 'in quotes, such as "0660"; not the integer 660'),
    ("0o660", "not the integer 432"),
    ('"0680"', 'must be octal digits such as "0660", not "0680"'),
    ('"rw-rw----"', "must be octal digits"),
    ('""', "must be octal digits"),
    ('"1777"', 'must be at most "0777" (permission bits only), not "1777"'),
    ('"01000"', "must be at most"),
])
def test_bad_socket_mode(mode, fragment):
    found = only(container(f"socket_mode = {mode}"))
    assert found.key == "container.c.socket_mode" and fragment in found.message


@pytest.mark.parametrize("mode, value", [
    ('"0660"', 0o660), ('"660"', 0o660), ('"0"', 0), ('"0777"', 0o777), ('"0000755"', 0o755),
])
def test_socket_mode(mode, value):
    assert parse_config(container(f"socket_mode = {mode}")).containers["c"].socket_mode == value


def test_unknown_user_and_group():
    found = problems(container('socket_uid = "tether-no-such-user"\nsocket_gid = "tether-no-such-group"'))
    assert [(p.line, p.key, p.message) for p in found] == [
        (2, "container.c.socket_uid", 'no user named "tether-no-such-user" on this system'),
        (3, "container.c.socket_gid", 'no group named "tether-no-such-group" on this system'),
    ]
    assert "written without quotes" in only(container('socket_uid = "4294967290"')).message
    assert "no user named" in only(container('socket_uid = "a\\u0000b"')).message


def test_user_and_group_names_resolve():
    user, group = pwd.getpwuid(os.getuid()), grp.getgrgid(os.getgid())
    c = parse_config(container(f'socket_uid = "{user.pw_name}"\nsocket_gid = "{group.gr_name}"')).containers["c"]
    assert (c.socket_uid, c.socket_gid) == (user.pw_uid, group.gr_gid)


def test_ipv4_and_ipv6_not_both_false():
    found = only(container("ipv4 = false\nipv6 = false"))
    assert (found.line, found.key) == (3, "container.c.ipv6") and "both false" in found.message
    assert not parse_config(container("ipv4 = false")).containers["c"].ipv4


@pytest.mark.parametrize("name", ["bad name", "-x", ".hidden", "a/b", "x" * 65, ""])
def test_bad_container_name(name):
    found = only(f'[container."{name}"]\n')
    assert found.line == 1 and "bad sandbox name" in found.message and "1-64 letters" in found.message


@pytest.mark.parametrize("text, key", [
    ("daemon = 1\n", "daemon"),
    ("container = []\n", "container"),
    ("[container]\nweb = 1\n", "container.web"),
    ("[[container]]\n", "container"),
    ("[[container.web]]\n", "container.web"),
])
def test_tables_that_are_not_tables(text, key):
    found = only(text)
    assert found.key == key and "must be a table" in found.message and found.line == text.count("\n")


# ---------------------------------------------------------------------------------------------
# Engines


def test_external_without_command():
    found = only(container('\nengine = "external"\ntun_fd_env = "FD"'))
    assert (found.line, found.key) == (1, "container.c") and 'needs command = ["PROGRAM"' in found.message
    assert "must name a program" in only(container('engine = "external"\ncommand = []\ntun_fd_env = "FD"')).message
    assert "must name a program" in only(container('engine = "external"\ncommand = [""]\ntun_fd_env = "FD"')).message


def test_external_fd_both_ways():
    found = only(container('engine = "external"\ncommand = ["p", "--fd={fd}"]\ntun_fd_env = "FD"'))
    assert (found.line, found.key) == (4, "container.c.tun_fd_env") and "not both" in found.message


@pytest.mark.parametrize("command", ['["p"]', '["p", "{{fd}}"]'])
def test_external_fd_neither_way(command):
    found = only(container(f'engine = "external"\ncommand = {command}'))
    assert (found.line, found.key) == (3, "container.c.command")
    assert "tun_fd_env" in found.message and '"{fd}"' in found.message


@pytest.mark.parametrize("arg, fragment", [
    ("{x}", '"{x}" is not a placeholder: only "{fd}" is'),
    ("fd://{fd", '"{fd" is not a placeholder'),
    ("{}", '"{}" is not a placeholder'),
    ("{fd!r}", '"{fd!r}" is not a placeholder'),
    ("a}b", 'a single "}" must be written "}}"'),
])
def test_stray_braces(arg, fragment):
    found = only(container(f'engine = "external"\ncommand = ["p", "{{fd}}", "{arg}"]'))
    assert (found.line, found.key) == (3, "container.c.command[2]") and fragment in found.message
    with pytest.raises(ValueError):
        expand_command(("p", arg), 3)


def test_expand_command():
    command = ("p", "{fd}", "x{fd}y{fd}", "{{fd}}", "}}{{", "")
    assert expand_command(command, 12) == ["p", "12", "x12y12", "{fd}", "}{", ""]
    assert expand_command((), 3) == []


@pytest.mark.parametrize("key", PROXY_ONLY)
def test_policy_keys_on_external(key):
    literals = {"default": '"deny"', "policy": '"/p.toml"', "dns_deny": '"refused"', "allow_host": "[80]"}
    literal = literals.get(key, '["x"]')
    found = only(container(EXTERNAL + f"{key} = {literal}"))
    assert (found.line, found.key) == (5, f"container.c.{key}")
    assert found.message == "the external program decides what leaves; policy keys apply to the proxy engine"


@pytest.mark.parametrize("key", EXTERNAL_ONLY)
@pytest.mark.parametrize("engine", ["", 'engine = "proxy"\n'])
def test_external_keys_on_proxy(key, engine):
    found = only(container(f'{engine}{key} = "whatever"'))  # the value is not checked: the key is wrong here
    assert found.key == f"container.c.{key}" and found.message == 'only for engine = "external"'


def test_wireguard_engine_keys(tmp_path):
    """engine = "wireguard": config names a valid wg-quick file (checked at load, errors without
    key material); policy, external and MTU/family keys are refused."""
    from tether.engine.wireguard.keys import encode_key, generate_private_key

    private = encode_key(generate_private_key())
    good = tmp_path / "wg0.conf"
    peer = encode_key(generate_private_key())  # any 32 bytes make a well-formed public key
    good.write_text(f"[Interface]\nPrivateKey = {private}\nAddress = 10.99.0.2/24\n\n"
                    f"[Peer]\nPublicKey = {peer}\nAllowedIPs = 10.99.0.0/24\n")
    config = parse_config(f'[container.vpn]\nengine = "wireguard"\nconfig = "{good}"\n', "t.toml")
    assert config.containers["vpn"].config == str(good)
    bad = tmp_path / "bad.conf"
    bad.write_text(f"[Interface]\nPrivateKey = {private}\nPostUp = true\n")
    with pytest.raises(ConfigError) as caught:
        parse_config(f'[container.vpn]\nengine = "wireguard"\nconfig = "{bad}"\nallow = ["x.test"]\nmtu = 1400\n'
                     'command = ["x"]\n', "t.toml")
    found = {p.key: p.message for p in caught.value.errors}
    assert "PostUp" in found["container.vpn.config"] and private not in found["container.vpn.config"]
    assert "nothing leaves but through the tunnel" in found["container.vpn.allow"]
    assert "the WireGuard file (config) says this" in found["container.vpn.mtu"]
    assert found["container.vpn.command"] == 'only for engine = "external"'
    assert only(container('config = "/x.conf"')).message == 'only for engine = "wireguard"'


@pytest.mark.parametrize("body, key, fragment", [
    ('interface = "a-very-long-name0"', "interface", "1 to 15 bytes"),
    ('interface = ""', "interface", "1 to 15 bytes"),
    ('interface = "tun 0"', "interface", "whitespace"),
    ('interface = "a/b"', "interface", '"/"'),
    ('interface = ".."', "interface", '".."'),
    ('tun_fd_env = "1FD"', "tun_fd_env", "environment variable name"),
    ('tun_fd_env = "WG-FD"', "tun_fd_env", "environment variable name"),
    ('addresses = ["10.9.0.2"]', "addresses[0]", 'such as "10.9.0.2/24"'),
    ('addresses = ["10.9.0.2/33"]', "addresses[0]", "ADDRESS/PREFIXLEN"),
    ('routes = ["10.9.0.1/24"]', "routes[0]", '"10.9.0.1/24" has host bits set; the network is "10.9.0.0/24"'),
    ('routes = ["::/0", "default"]', "routes[1]", 'must be a network such as "0.0.0.0/0"'),
])
def test_bad_external_values(body, key, fragment):
    base = EXTERNAL.replace('tun_fd_env = "FD"', 'ipv4 = true') if body.startswith("tun_fd_env") else EXTERNAL
    found = only(container(base + body))
    assert (found.line, found.key) == (5, f"container.c.{key}") and fragment in found.message


def test_effective_mtu():
    assert ContainerConfig("a").effective_mtu == 65520
    assert ContainerConfig("a", engine="external").effective_mtu == 1420
    assert ContainerConfig("a", engine="external", mtu=1280).effective_mtu == 1280


# ---------------------------------------------------------------------------------------------
# The line locator


def test_locate_keys_handles_strings_comments_and_arrays():
    text = '''\
# [not.a.table]
top = """
[not.a.table]
x = 1
"""   # comment with "quote
[a . "b.c"]   # header with spaces and a quoted part
'k"q' = 'lit[eral'
d.e = [ "x",   # first
  ['y', "z"],
  { f = 1, g = [2,
  3] },
]
when = 1979-05-27 07:32:00Z
[[arr]]
n = 1
'''
    lines = locate_keys(text)
    assert lines[("top",)] == 2
    assert ("not",) not in lines and ("x",) not in lines
    assert lines[("a",)] == lines[("a", "b.c")] == 6
    assert lines[("a", "b.c", 'k"q')] == 7
    assert lines[("a", "b.c", "d")] == lines[("a", "b.c", "d", "e")] == lines[("a", "b.c", "d", "e", 0)] == 8
    assert lines[("a", "b.c", "d", "e", 1)] == 9 and lines[("a", "b.c", "d", "e", 1, 1)] == 9
    assert lines[("a", "b.c", "d", "e", 2, "g")] == 10 and lines[("a", "b.c", "d", "e", 2, "g", 1)] == 11
    assert lines[("a", "b.c", "when")] == 13
    assert lines[("arr",)] == 14 and lines[("arr", "n")] == 15


@pytest.mark.parametrize("key, text", [
    (("container", "my web", "allow", 1), 'container."my web".allow[1]'),
    (("a-b_1",), "a-b_1"), (("a.b", "ü"), '"a.b"."ü"'), ((), ""),
])
def test_dotted(key, text):
    assert dotted(key) == text


_BARE = st.text(alphabet="abcXYZ019_-", min_size=1, max_size=6)
_ANY = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8)


def toml_string(text: str) -> str:
    out = "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else "\\" + c if c in '"\\' else c
                  for c in text)
    return f'"{out}"'


def toml_key(part: str) -> str:
    return part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else toml_string(part)


_SCALARS = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    _ANY.map(toml_string),
    st.text(alphabet="ab[]=#\"{} ", max_size=6).map(lambda s: f"'{s}'"),
    st.text(alphabet="ab\n[]=#' ", max_size=12).map(lambda s: f'"""{s}"""'),
    st.just("1979-05-27 07:32:00Z"), st.just("true"), st.just("{ x = 1, y = [2] }"),
)


@st.composite
def documents(draw):
    """A TOML text of tables, keys and arrays (some across lines) and the line of everything in it."""
    chunks: list[str] = []
    expect: dict[tuple, int] = {}

    def add(chunk: str) -> int:
        """Append ``chunk`` as the next line(s); return its first line's number."""
        chunks.append(chunk)
        return sum(c.count("\n") + 1 for c in chunks[:-1]) + 1

    for t in range(draw(st.integers(0, 4))):
        table = (f"t{t}",) + tuple(draw(st.lists(st.one_of(_BARE, _ANY), max_size=2)))
        for _ in range(draw(st.integers(0, 2))):
            add("")
        expect[table] = add("[" + " . ".join(toml_key(p) for p in table) + "]" + draw(st.sampled_from(["", "  # [x]"])))
        for k in range(draw(st.integers(0, 4))):
            key = (f"k{k}",) + tuple(draw(st.lists(st.one_of(_BARE, _ANY), max_size=1)))
            head = ".".join(toml_key(p) for p in key) + " = "
            if draw(st.booleans()):
                expect[table + key] = add(head + draw(_SCALARS))
            else:
                expect[table + key] = add(head + "[")
                for i, item in enumerate(draw(st.lists(_SCALARS, max_size=3))):
                    expect[table + key + (i,)] = add(f"  {item},  # item")
                add("]")
    return "\n".join(chunks) + "\n", expect


@given(documents())
def test_locator_finds_generated_keys(doc):
    text, expect = doc
    tomllib.loads(text)  # the generator writes valid TOML
    lines = locate_keys(text)
    for key, line in expect.items():
        assert lines.get(key) == line, (key, text)


# ---------------------------------------------------------------------------------------------
# Anything in, Config or ConfigError out


@given(st.text())
def test_arbitrary_text_only_raises_config_error(text):
    try:
        parse_config(text)
    except ConfigError as e:
        assert e.errors and all(isinstance(p, ConfigProblem) for p in e.errors)
    locate_keys(text)  # total too


_VALUES = st.one_of(
    st.sampled_from(['"proxy"', '"external"', '"deny"', '"0660"', '"root"', '"/x"', '"{fd}"', '"}"', '"8080:80"',
                     '"10.0.0.0/8"', '"WG_FD"', "true", "-1", "0", "80", "1e400", "nan", "{}", "[]", '["p", "{fd}"]',
                     '["1.2.3.4", 5]', '["10.9.0.2/24"]']),
    _ANY.map(toml_string), st.integers().map(str),
)
_KEYS = st.sampled_from(sorted(set(_CONTAINER) | set(_DAEMON) | {"bogus", "name"}))


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(["daemon", "container.a", 'container."b c"', "container.x-1"]),
                          st.lists(st.tuples(_KEYS, _VALUES), max_size=6)), max_size=4))
def test_schema_fuzz(sections):
    seen: set[tuple[str, str]] = set()
    text = ""
    for table, pairs in sections:
        if table in {t for t, _ in seen}:
            continue
        seen.add((table, ""))
        text += f"[{table}]\n" + "".join(f"{k} = {v}\n" for k, v in dict(pairs).items())
    try:
        config = parse_config(text)
    except ConfigError as e:
        assert all(p.line is not None and p.key for p in e.errors), str(e)
    else:
        assert all(isinstance(c, ContainerConfig) for c in config.containers.values())


def test_admin_is_not_a_container_name():
    with pytest.raises(ConfigError) as caught:
        parse_config('[container.admin]\nengine = "proxy"\n', "t.toml")
    (problem,) = caught.value.errors
    assert problem.key == "container.admin" and "the daemon's own socket" in problem.message
