"""The holder (pid 1 of the sandbox) keeps nothing of the host but its control socket.

With --root, CMD holds every capability of the sandbox's user namespace and could ptrace the
holder, so whatever the holder has open is reachable from the sandbox: the audit log and any fd
tether inherited must not be among them.
"""

from __future__ import annotations

import os

import pytest

from world import describe

pytestmark = pytest.mark.integration

LIST_HOLDER_FDS = r"""
import json, os
fds = {}
for fd in os.listdir("/proc/1/fd"):
    try:
        fds[fd] = os.readlink(f"/proc/1/fd/{fd}")
    except OSError as e:
        fds[fd] = f"unreadable: {e}"
print(json.dumps(fds))
"""


def test_holder_holds_only_stdio_and_its_control_socket(tether, tmp_path):
    log = tether.log_path()
    extra = os.open("/etc/hostname", os.O_RDONLY)  # an fd tether inherits from its caller
    os.set_inheritable(extra, True)
    try:
        fds, r = tether.python_json(LIST_HOLDER_FDS, opts=["--root", "--log", log], pass_fds=(extra,))
    finally:
        os.close(extra)
    beyond_stdio = {fd: target for fd, target in fds.items() if int(fd) > 2}
    sockets = [t for t in beyond_stdio.values() if t.startswith("socket:")]
    others = [t for t in beyond_stdio.values() if not t.startswith(("socket:", "pipe:"))]
    assert len(sockets) == 1, f"want only the control socket, got {beyond_stdio}\n{describe(r)}"
    assert others == [], f"holder holds host files: {others}"
    assert str(log) not in beyond_stdio.values()
