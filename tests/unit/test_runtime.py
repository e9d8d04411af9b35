"""Unit tests for tether.runtime: names, the runtime directory, claiming a name, listing.

Real files and real flock in a temporary directory (no sandbox needed).  Bad names tried: empty,
too long, path separators, dot-dot, leading dot/dash, spaces, non-ASCII, NUL.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether import runtime
from tether.runtime import RuntimeDirError


@pytest.mark.parametrize("name", ["a", "web", "my-box_1.2", "A" * 64, "0start"])
def test_good_names(name):
    assert runtime.check_name(name) == name


@pytest.mark.parametrize("name", ["", "A" * 65, "a/b", "..", "../x", ".hidden", "-opt", "has space",
                                  "caf\u00e9", "nul\0byte", "x\n"],
                         ids=["empty", "too-long", "slash", "dotdot", "dotdot-path", "leading-dot", "leading-dash",
                              "space", "non-ascii", "nul", "newline"])
def test_bad_names(name):
    with pytest.raises(RuntimeDirError, match="bad sandbox name") as info:
        runtime.check_name(name)
    assert "letters, digits" in info.value.hint


@given(st.text(max_size=80))
def test_any_accepted_name_is_a_plain_file_name(name):
    try:
        runtime.check_name(name)
    except RuntimeDirError:
        return
    assert "/" not in name and name not in (".", "..") and not name.startswith((".", "-")) and name.isascii()


def test_runtime_dir_choices(tmp_path):
    assert runtime.runtime_dir(0) == Path("/run/tether")
    me = os.getuid()
    if me != 0:
        assert runtime.runtime_dir(me, {"XDG_RUNTIME_DIR": str(tmp_path)}) == tmp_path / "tether"
    # Another user's directory never comes from our environment.
    other = 54321
    assert runtime.runtime_dir(other, {"XDG_RUNTIME_DIR": str(tmp_path)}) == Path(f"/tmp/tether-{other}")


def test_ensure_runtime_dir_creates_private_dir(tmp_path):
    path = runtime.ensure_runtime_dir(tmp_path / "tether")
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    os.chmod(path, 0o755)
    runtime.ensure_runtime_dir(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700, "loosened permissions are tightened"


def test_ensure_runtime_dir_accepts_up_to_allowed(tmp_path):
    """Root's tether run shares /run/tether with the daemon, which opens it to 0755: created
    0700, a 0755 one is left alone, anything wider loses the extra bits only."""
    path = runtime.ensure_runtime_dir(tmp_path / "tether", allowed=0o755)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    os.chmod(path, 0o755)
    runtime.ensure_runtime_dir(path, allowed=0o755)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    os.chmod(path, 0o777)
    runtime.ensure_runtime_dir(path, allowed=0o755)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert runtime.allowed_mode(0) == 0o755 and runtime.allowed_mode(1000) == 0o700


def test_ensure_runtime_dir_refuses_a_file(tmp_path):
    (tmp_path / "tether").write_text("not a dir")
    with pytest.raises(RuntimeDirError, match="runtime directory"):
        runtime.ensure_runtime_dir(tmp_path / "tether")


def test_claim_listen_release(tmp_path):
    claim = runtime.claim(tmp_path, "box")
    sock = claim.listen()
    try:
        assert stat.S_ISSOCK(claim.socket_path.lstat().st_mode)
        assert stat.S_IMODE(claim.socket_path.lstat().st_mode) == 0o600
        assert claim.lock_path.read_text().strip() == str(os.getpid())
        assert runtime.is_locked(claim.lock_path)
        found = runtime.list_sockets([tmp_path])
        assert [(f.name, f.alive) for f in found] == [("box", True)]
    finally:
        sock.close()
        claim.release()
    assert not claim.socket_path.exists() and not claim.lock_path.exists()
    assert runtime.list_sockets([tmp_path]) == []


HOLD = """
import sys, time
sys.path[:0] = {path!r}
from pathlib import Path
from tether import runtime
c = runtime.claim(Path({dir!r}), "box")
print("held", flush=True)
sys.stdin.read()
"""


def test_claim_of_a_held_name_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(path=sys.path, dir=str(tmp_path))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeDirError, match=f"'box' is already running \\(tether pid {holder.pid}\\)") as info:
            runtime.claim(tmp_path, "box")
        assert "tether ctl box stop" in info.value.hint
    finally:
        holder.communicate("")
    # The holder died without releasing: the lock went with it, the name is free again.
    claim = runtime.claim(tmp_path, "box")
    claim.release()


def test_stale_socket_is_removed_by_the_next_claim(tmp_path):
    stale = tmp_path / "box.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    (tmp_path / "box.lock").write_text("999999\n")
    found = runtime.list_sockets([tmp_path])
    assert [(f.name, f.alive) for f in found] == [("box", False)], "listed, but not alive"
    with pytest.raises(RuntimeDirError, match="not running \\(stale control socket"):
        _find_in(tmp_path, "box")
    claim = runtime.claim(tmp_path, "box")
    try:
        assert not stale.exists(), "the stale socket is gone; listen() binds a fresh one"
        claim.listen().close()
    finally:
        claim.release()


def _find_in(directory: Path, name: str) -> Path:
    original = runtime.visible_directories
    runtime.visible_directories = lambda uid=None: [directory]
    try:
        return runtime.find(name)
    finally:
        runtime.visible_directories = original


def test_find_unknown_name(tmp_path):
    with pytest.raises(RuntimeDirError, match="no running sandbox named 'ghost'") as info:
        _find_in(tmp_path, "ghost")
    assert "tether ps" in info.value.hint


def test_list_ignores_what_is_not_a_control_socket(tmp_path):
    (tmp_path / "notes.sock").write_text("a regular file named like a socket")
    (tmp_path / "x.txt").write_text("")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "bad name.sock"))
    s.close()
    assert runtime.list_sockets([tmp_path, tmp_path / "missing"]) == []


def test_lock_file_that_is_a_symlink_is_refused(tmp_path):
    (tmp_path / "box.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RuntimeDirError, match="cannot open the lock file"):
        runtime.claim(tmp_path, "box")
    assert not (tmp_path / "elsewhere").exists(), "nothing created through the link"


def test_a_lock_file_replaced_while_waiting_is_not_trusted(tmp_path, monkeypatch):
    """The releasing owner unlinks the lock file; a claimer that locked the old inode must not
    believe it holds the name: it notices and takes the file now at the path."""
    real_flock = runtime.fcntl.flock
    swapped = []

    def flock(fd, op):
        real_flock(fd, op)
        if not swapped:  # just after our first lock: the old owner's release replaces the file
            swapped.append(True)
            (tmp_path / "box.lock").unlink()
            (tmp_path / "box.lock").write_text("")

    monkeypatch.setattr(runtime.fcntl, "flock", flock)
    claim = runtime.claim(tmp_path, "box")
    try:
        assert runtime._same_file(claim.lock_fd, claim.lock_path), "the claim holds the file at the path"
    finally:
        claim.release()
