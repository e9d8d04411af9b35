"""Missing prerequisites give one clear message saying what is missing and how to fix it, exit
code 2, and start nothing.

Each case takes one prerequisite away for a single run only: a private mount namespace hides
libnftables or /dev/net/tun from that tether process; user namespaces are switched off with the
per-user-namespace `user.max_user_namespaces` limit of a throwaway user namespace.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from world import TETHER_BIN, describe

pytestmark = pytest.mark.integration


def _run_with_mounts(tether, binds: list[tuple[str, str]], args: list[str]) -> subprocess.CompletedProcess:
    """tether ARGS in a private mount namespace where each (source, target) is bind-mounted."""
    script = "".join(f'mount --bind "{src}" "{dst}" && ' for src, dst in binds) + 'exec "$@"'
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
            *tether.command(args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=tether.env(),
                          cwd=tether.workdir)


def _library_path() -> str:
    for directory in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        path = os.path.join(directory, "libnftables.so.1")
        if os.path.exists(path):
            return os.path.realpath(path)
    pytest.skip("libnftables.so.1 not found in the usual places")


def test_missing_libnftables(tether):
    r = _run_with_mounts(tether, [("/dev/null", _library_path())], ["--", "true"])
    assert r.returncode == 2, describe(r)
    assert "libnftables" in r.stderr and "apt-get install nftables" in r.stderr, describe(r)
    assert r.stderr.count("tether:") == 1, describe(r)  # one message, not a traceback
    assert "Traceback" not in r.stderr


def test_no_access_to_dev_net_tun(tether, mode, tmp_path):
    if mode == "root":
        pytest.skip("root can open a 0600 root-owned /dev/net/tun")
    node = tmp_path / "tun"
    subprocess.run(["mknod", "-m", "0600", str(node), "c", "10", "200"], check=True)
    r = _run_with_mounts(tether, [(str(node), "/dev/net/tun")], ["--", "true"])
    assert r.returncode == 2, describe(r)
    assert "/dev/net/tun" in r.stderr and "chmod 0666 /dev/net/tun" in r.stderr, describe(r)
    assert "Traceback" not in r.stderr


def test_user_namespaces_disabled(tether, world, mode):
    """`user.max_user_namespaces` is per user namespace: tether runs as root of a fresh user
    namespace whose limit for nested namespaces is set to 0 (the host's sysctl is untouched)."""
    if mode == "rootless":
        pytest.skip("the limit is set by root of the enclosing user namespace; one run covers it")
    script = 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"'
    argv = ["ip", "netns", "exec", world.host_ns, "unshare", "--user", "--map-root-user", "sh", "-c", script,
            "sh", str(TETHER_BIN), "run", "--", "true"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=tether.env(), cwd=tether.workdir)
    assert r.returncode == 2, describe(r)
    assert "user namespaces" in r.stderr and "max_user_namespaces" in r.stderr, describe(r)
    assert "Traceback" not in r.stderr
