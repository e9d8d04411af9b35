"""`tether run`: exit status, signal forwarding, file descriptors, the view from inside."""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from world import DNS, GATEWAY, INSIDE_VIEW, LIST_FDS, SANDBOX_ADDR, SANDBOX_PYTHON, describe, probe

SANDBOX_ADDR6 = "fd00:7e7e::100"
DNS6 = "fd00:7e7e::3"

# -- exit status -----------------------------------------------------------------------------


@pytest.mark.parametrize("cmd, status", [
    pytest.param(["/bin/true"], 0, id="true-0"),
    pytest.param(["/bin/sh", "-c", "exit 3"], 3, id="exit-3"),
    pytest.param(["/bin/sh", "-c", "exit 255"], 255, id="exit-255"),
    pytest.param(["/bin/sh", "-c", "kill -9 $$"], 128 + 9, id="sigkill-137"),
    pytest.param(["/bin/sh", "-c", "kill -TERM $$"], 128 + 15, id="sigterm-143"),
    pytest.param([SANDBOX_PYTHON, "-c", "import os; os.abort()"], 128 + 6, id="abort-134"),
])
def test_exit_status(tether, cmd, status):
    r = tether(["--", *cmd], timeout=30)
    assert r.returncode == status, describe(r)


def test_stdio_passes_through(tether):
    r = tether(["--", "/bin/sh", "-c", "read line; echo \"out:$line\"; echo \"err:$line\" >&2"],
               input="hello\n", timeout=30)
    assert r.returncode == 0, describe(r)
    assert r.stdout == "out:hello\n", describe(r)
    assert "err:hello\n" in r.stderr, describe(r)


# -- signals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_forwarded_to_cmd(tether, sig):
    """A signal to tether reaches CMD, which handles it; tether exits with CMD's status."""
    name = sig.name[3:]
    marker = tether.workdir / f"marker-{name}"
    script = (f"trap 'echo got-{name} > {marker}; exit 7' {name}; "
              "echo ready; while :; do sleep 0.05; done")
    proc = tether.popen(["--", "/bin/sh", "-c", script])
    proc.wait_for_line("ready", timeout=30)
    proc.send_signal(sig)
    r = proc.finish(timeout=20)
    assert r.returncode == 7, describe(r)
    assert marker.read_text() == f"got-{name}\n"


# -- file descriptors ------------------------------------------------------------------------


def _occupy_fd(path: Path, want: int = 5) -> int:
    """Open ``path`` as fd ``want`` if that is free, else the next free one above it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fstat(want)
    except OSError:
        os.dup2(fd, want, inheritable=False)
        os.close(fd)
        return want
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, want)
    os.close(fd)
    return new


def test_cmd_gets_only_stdio(tether):
    fds, r = tether.python_json(LIST_FDS)
    assert sorted(fds, key=int) == ["0", "1", "2"], f"CMD has extra fds: {fds}\n{describe(r)}"


def test_inherited_fd_does_not_reach_cmd(tether):
    secret = tether.workdir / "inherited-fd-target"
    secret.write_text("not for the sandbox\n")
    secret.chmod(0o644)
    fd = _occupy_fd(secret)
    try:
        # CMD lists its fds, then waits on stdin so that we can look at tether meanwhile.
        code = LIST_FDS + "\nimport sys; sys.stdout.flush(); sys.stdin.read()\n"
        proc = tether.popen(["--", SANDBOX_PYTHON, "-c", code], stdin=subprocess.PIPE, pass_fds=(fd,))
        line = proc.wait_for_line("{", timeout=30)
        # Control: tether itself did inherit the fd (so the check below means something).
        assert os.readlink(f"/proc/{proc.pid}/fd/{fd}") == str(secret)
        r = proc.finish(timeout=20, input=b"")
    finally:
        os.close(fd)
    assert r.returncode == 0, describe(r)
    fds = json.loads(line)
    assert str(secret) not in fds.values(), f"the inherited fd {fd} reached CMD: {fds}"
    assert sorted(fds, key=int) == ["0", "1", "2"], f"CMD has extra fds: {fds}"


# -- inside view -----------------------------------------------------------------------------


def _ipv4_addrs(addrs: list[dict]) -> set[tuple[str, str, int]]:
    return {(a["ifname"], i["local"], i["prefixlen"])
            for a in addrs for i in a.get("addr_info", []) if i.get("family") == "inet"}


def test_inside_view(tether):
    host_resolv = Path("/etc/resolv.conf").read_bytes()
    view, r = tether.python_json(INSIDE_VIEW)
    assert view["uid"] == tether.uid and view["euid"] == tether.uid, view

    names = {link["ifname"] for link in view["links"]}
    assert names == {"lo", "tun0"}, f"sandbox sees interfaces {names}"
    assert view["sys_class_net"] == ["lo", "tun0"], view["sys_class_net"]
    by_name = {link["ifname"]: link for link in view["links"]}
    assert "UP" in by_name["lo"]["flags"] and "UP" in by_name["tun0"]["flags"], by_name
    assert by_name["tun0"]["mtu"] == 65520, by_name["tun0"]

    assert _ipv4_addrs(view["addrs"]) == {("lo", "127.0.0.1", 8), ("tun0", SANDBOX_ADDR, 24)}, view["addrs"]
    for a in view["addrs"]:
        for i in a.get("addr_info", []):
            ip = ipaddress.ip_address(i["local"])
            assert ip not in ipaddress.ip_network("192.0.2.0/24"), f"host address visible inside: {a}"

    defaults = [rt for rt in view["routes"] if rt.get("dst") == "default"]
    assert len(defaults) == 1, view["routes"]
    assert defaults[0].get("gateway") == GATEWAY and defaults[0].get("dev") == "tun0", defaults

    assert _global_ipv6_addrs(view["addrs"]) == {("tun0", SANDBOX_ADDR6, 64)}, view["addrs"]

    assert _nameservers(view) == [DNS, DNS6], view["resolv"]
    assert Path("/etc/resolv.conf").read_bytes() == host_resolv, "the host's resolv.conf changed"


def _global_ipv6_addrs(addrs: list[dict]) -> set[tuple[str, str, int]]:
    return {(a["ifname"], i["local"], i["prefixlen"])
            for a in addrs for i in a.get("addr_info", []) if i.get("family") == "inet6" and i.get("scope") == "global"}


def _nameservers(view: dict) -> list[str]:
    return [line.split()[1] for line in view["resolv"].splitlines() if line.split()[:1] == ["nameserver"]]


@pytest.mark.parametrize("flag", ["--ipv4-only", "--ipv6-only"])
def test_single_family(tether, flag):
    view, r = tether.python_json(INSIDE_VIEW, opts=[flag])
    if flag == "--ipv4-only":
        assert _global_ipv6_addrs(view["addrs"]) == set(), view["addrs"]
        assert _ipv4_addrs(view["addrs"]) == {("lo", "127.0.0.1", 8), ("tun0", SANDBOX_ADDR, 24)}
        assert _nameservers(view) == [DNS]
    else:
        assert _ipv4_addrs(view["addrs"]) == {("lo", "127.0.0.1", 8)}, view["addrs"]
        assert _global_ipv6_addrs(view["addrs"]) == {("tun0", SANDBOX_ADDR6, 64)}
        assert _nameservers(view) == [DNS6]
    # The switched-off family fails fast with ENETUNREACH, not a timeout.
    target = "[2001:db8:10::10]:80" if flag == "--ipv4-only" else "203.0.113.10:80"
    res, r = probe(tether, [target], [flag])
    assert res[target]["errno"] == "ENETUNREACH", res


def test_id_maps_to_caller(tether):
    r = tether(["--", "id", "-u"], timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == str(tether.uid), describe(r)


def test_root_flag_maps_to_0(tether):
    r = tether(["--root", "--", "id", "-u"], timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "0", describe(r)


def test_mtu_option(tether):
    r = tether(["--mtu", "1500", "--", "cat", "/sys/class/net/tun0/mtu"], timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "1500", describe(r)
