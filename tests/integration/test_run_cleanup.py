"""`tether run` leaves nothing behind: no process, netns, interface, nft table or mount.

Each test checks for leftover processes itself (they must be gone promptly); the autouse
``leak_check`` fixture then checks netns, nft tables (host and root netns), mounts and links.
"""

from __future__ import annotations

import signal

import pytest

from world import SANDBOX_PYTHON, describe

READY_THEN_SLEEP = ["/bin/sh", "-c", "echo ready; exec sleep 1000"]


def _assert_nothing_left(tether, timeout: float = 5) -> None:
    left = tether.wait_no_leftovers(timeout)
    assert not left, "processes left behind:\n  " + "\n  ".join(left)


@pytest.mark.parametrize("cmd, status", [
    pytest.param(["/bin/true"], 0, id="normal-exit"),
    pytest.param([SANDBOX_PYTHON, "-c", "import os; os.abort()"], 134, id="cmd-crash"),
    pytest.param(["/bin/sh", "-c", "kill -9 $$"], 137, id="cmd-kill-9"),
    # Background processes still running when CMD exits must go too (and must not keep tether,
    # or our stdout pipe, waiting).
    pytest.param(["/bin/sh", "-c", "sleep 1000 & sleep 1000 & echo started"], 0, id="orphans-of-cmd"),
])
def test_nothing_left_after_cmd_ends(tether, cmd, status):
    r = tether(["--", *cmd], timeout=30)
    assert r.returncode == status, describe(r)
    _assert_nothing_left(tether, timeout=2)


def test_nothing_left_after_sigterm_to_tether(tether):
    proc = tether.popen(["--", *READY_THEN_SLEEP])
    proc.wait_for_line("ready", timeout=30)
    proc.send_signal(signal.SIGTERM)
    r = proc.finish(timeout=20)
    assert r.returncode == 128 + signal.SIGTERM, describe(r)  # forwarded; sleep died of it
    _assert_nothing_left(tether, timeout=2)


def test_nothing_left_after_sigkill_to_tether(tether):
    name = f"killed-{tether.mode}"
    proc = tether.popen(["--name", name, "--", *READY_THEN_SLEEP])
    proc.wait_for_line("ready", timeout=30)
    proc.send_signal(signal.SIGKILL)
    assert proc.popen.wait(timeout=10) == -signal.SIGKILL
    # Nobody can clean up after a SIGKILL but the kernel: the holder must die with tether
    # (pdeathsig / pid namespace), and with it CMD, the namespaces, the tun and the nft table.
    _assert_nothing_left(tether, timeout=5)
    proc.finish(timeout=10)
    # The control socket and its lock file stay (files outlive processes), but the lock died
    # with tether: ps ignores the name, and the next run of it cleans both up.
    ps = tether.tool(["ps", "--json"])
    assert ps.returncode == 0 and name not in ps.stdout, describe(ps)
    r = tether(["--name", name, "--", "true"], timeout=30)
    assert r.returncode == 0, describe(r)


def test_nothing_left_after_cmd_not_found(tether):
    r = tether(["--", "/nonexistent/command"], timeout=30)
    assert r.returncode != 0, describe(r)
    assert "Traceback" not in r.stderr, describe(r)
    _assert_nothing_left(tether, timeout=2)
