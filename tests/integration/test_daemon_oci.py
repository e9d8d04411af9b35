"""Daemon mode with real OCI runtimes: a busybox container run by runc or crun (detached), its
network given by ``tether oci-hook`` (createRuntime: attach; poststop: detach).

The runtime runs in this (root) netns, but every container gets a *new* netns: its only way out is
the tun the daemon - in the world's host netns - puts there.  Rootless runc runs as tether-test
(user namespace, no cgroups); rootless crun cannot be used with the hook, see docs/daemon.md.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

import oci_bundle
from conftest import TEST_USER
from servers import WORLD_BODY
from world import TETHER_BIN, WORLD_ADDR, WORLD_ADDR2

pytestmark = pytest.mark.skipif(not shutil.which("runc"), reason="runc is not installed")

CONFIG = f"""
[container.web]
default = "deny"
allow = ["{WORLD_ADDR}:80", "*.example.test"]
dns = ["198.51.100.53"]
{{socket}}
"""


@pytest.fixture
def bundle_dir():
    """A scratch directory the unprivileged test user can reach (rootless bundles live there)."""
    path = Path(tempfile.mkdtemp(prefix="tether-oci-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def hook(daemon, name: str = "web") -> dict:
    return {"path": str(TETHER_BIN),
            "args": ["tether", "oci-hook", "--name", name, "--runtime-dir", str(daemon.runtime_dir)],
            "timeout": 20}


def http_get(host: str) -> list[str]:
    """busybox nc, not wget: busybox-static's wget crashes in this glibc build (SIGSEGV in its
    address lookup, even for a literal address, also outside any container)."""
    return ["sh", "-c", f'printf "GET / HTTP/1.0\\r\\n\\r\\n" | nc -w 10 {host} 80']


CASES = [pytest.param("runc", False, id="runc"), pytest.param("crun", False, id="crun"),
         pytest.param("runc", True, id="runc-rootless")]


@pytest.mark.parametrize("runtime,rootless", CASES)
def test_oci_hook_gives_the_container_its_network_and_takes_it_back(daemons, bundle_dir, runtime, rootless):
    if not shutil.which(runtime):
        pytest.skip(f"{runtime} is not installed")
    test_uid = pwd.getpwnam(TEST_USER).pw_uid
    socket_line = f"socket_uid = {test_uid}" if rootless else ""
    # rootless: the hook runs as the user, who must reach the socket through its directories
    daemon = daemons(CONFIG.replace("{socket}", socket_line), base=bundle_dir if rootless else None)
    before = daemon.fds()
    bundle = oci_bundle.build_bundle(bundle_dir, runtime, f"t{secrets.token_hex(4)}", ["sleep", "300"],
                                     hooks={"createRuntime": [hook(daemon)], "poststop": [hook(daemon)]},
                                     rootless=rootless)
    try:
        pid = oci_bundle.run_detached(bundle)
        attach = daemon.wait_event(lambda e: e["event"] == "attach" and e["sandbox"] == "web")
        assert attach["source"] == "oci" and attach["peer_uid"] == (test_uid if rootless else 0)
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        links = oci_bundle.exec_in(bundle, ["ip", "-o", "addr"])
        assert "tun0" in links.stdout and "10.0.2.100/24" in links.stdout, links.stdout
        got = oci_bundle.exec_in(bundle, http_get(WORLD_ADDR))
        assert got.returncode == 0 and got.stdout.endswith(WORLD_BODY.decode()), got
        looked_up = oci_bundle.exec_in(bundle, ["nslookup", "example.test"])  # /etc/resolv.conf: the stub
        assert looked_up.returncode == 0 and WORLD_ADDR in looked_up.stdout, looked_up
        named = oci_bundle.exec_in(bundle, http_get("example.test"))
        assert named.returncode == 0 and named.stdout.endswith(WORLD_BODY.decode()), named
        denied = oci_bundle.exec_in(bundle, http_get(WORLD_ADDR2))
        # refused by the engine on accept (the policy has a domain rule, so the kernel leaves IP
        # verdicts to the engine): busybox nc sees a reset and nothing of the server
        assert WORLD_BODY.decode() not in denied.stdout and denied.stdout == "", denied
        kinds = {(e["event"], e.get("dst")) for e in daemon.events() if e["sandbox"] == "web"}
        assert ("connect", f"{WORLD_ADDR}:80") in kinds and ("deny", f"{WORLD_ADDR2}:80") in kinds, kinds
    finally:
        oci_bundle.delete(bundle)
    detach = daemon.wait_event(lambda e: e["event"] == "detach" and e["sandbox"] == "web")
    assert detach["reason"] in ("detached by its client", "the container's process exited")
    assert sorted(daemon.wait_fds(before).values()) == sorted(before.values())
    assert [row["state"] for row in daemon.admin_json("sessions")] == ["waiting"]


@pytest.mark.parametrize("runtime", ["runc", "crun"])
def test_a_failing_hook_keeps_the_container_from_starting(daemons, bundle_dir, runtime):
    if not shutil.which(runtime):
        pytest.skip(f"{runtime} is not installed")
    daemon = daemons(CONFIG.replace("{socket}", ""))
    bundle = oci_bundle.build_bundle(bundle_dir, runtime, f"t{secrets.token_hex(4)}", ["sleep", "300"],
                                     hooks={"createRuntime": [hook(daemon, "nosuch")]})
    try:
        with pytest.raises(oci_bundle.OCIError) as failed:
            oci_bundle.run_detached(bundle)
        # runc relays the hook's message; crun only says the hook failed
        expected = "cannot reach the tether daemon" if runtime == "runc" else "error executing hook"
        assert expected in str(failed.value)
        assert oci_bundle.state(bundle) is None  # nothing half-started remains
    finally:
        oci_bundle.delete(bundle)
    assert not [e for e in daemon.events() if e["event"] == "attach"]
