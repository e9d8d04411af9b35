"""Where running sandboxes can be found: the runtime directory, names, and their control sockets.

Theory of operation
-------------------
A running ``tether run`` owns, in its runtime directory (``/run/tether`` as root; rootless
``$XDG_RUNTIME_DIR/tether``, else ``/run/user/UID/tether`` when that exists, else
``/tmp/tether-UID``; mode 0700, owned by the user):

* ``NAME.lock`` — an ``flock``ed file holding its pid.  The lock *is* the liveness: the kernel
  drops it when the process dies, however it dies.
* ``NAME.sock`` — its control socket (mode 0600), speaking ``tether.wire``.

Claiming a name takes the lock first.  If the lock is held, another sandbox of that name is
running: a clear error, never a silent takeover.  If it is free, whatever ``NAME.sock`` is there
was left by a crashed run: it is removed and the socket bound afresh.  ``tether ps`` lists the
sockets whose lock is held (a stale one is reported as such and cleaned by the next claim).

Names are what users type: 1-64 characters of letters, digits, ``_ . -``, starting with a
letter or digit (no path tricks).
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from tether.errors import TetherError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
CLAIM_ATTEMPTS = 20
LISTEN_BACKLOG = 128
SOCKET_SUFFIX = ".sock"
LOCK_SUFFIX = ".lock"


class RuntimeDirError(TetherError):
    """The runtime directory or a name cannot be used."""


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise RuntimeDirError(f"bad sandbox name {name!r}",
                              "use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
    return name


def runtime_dir(uid: int | None = None, environ: dict[str, str] | None = None) -> Path:
    """The runtime directory of ``uid`` (default: ours): where its sandboxes' sockets live."""
    uid = os.getuid() if uid is None else uid
    environ = os.environ if environ is None else environ
    if uid == 0:
        return Path("/run/tether")
    xdg = environ.get("XDG_RUNTIME_DIR") if uid == os.getuid() else None
    if xdg:
        return Path(xdg) / "tether"
    if Path(f"/run/user/{uid}").is_dir():
        return Path(f"/run/user/{uid}/tether")
    return Path(f"/tmp/tether-{uid}")


def allowed_mode(uid: int | None = None) -> int:
    """The most open mode tether run accepts for its runtime directory: root's ``/run/tether``
    is shared with the daemon (``tether serve``), which makes it 0755 because containers' users
    reach their sockets there (each control socket is 0600, or as configured)."""
    return 0o755 if (os.getuid() if uid is None else uid) == 0 else 0o700


def ensure_runtime_dir(path: Path, mode: int = 0o700, allowed: int | None = None) -> Path:
    """Create ``path`` with ``mode`` if needed; refuse one that is not ours; take away
    permissions beyond ``allowed`` (default: ``mode``)."""
    allowed = mode if allowed is None else allowed
    try:
        path.mkdir(mode=mode, exist_ok=True)
        info = path.lstat()
    except OSError as exc:
        raise RuntimeDirError(f"cannot create the runtime directory {path}: {exc.strerror}",
                              "set XDG_RUNTIME_DIR to a directory you own") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise RuntimeDirError(f"runtime directory {path} is not a directory owned by uid {os.getuid()}")
    if info.st_mode & 0o777 & ~allowed:
        os.chmod(path, info.st_mode & allowed & 0o777)
    return path


@dataclass
class Claim:
    """A name held by this process: the lock fd (held open) and the socket path to bind."""

    name: str
    lock_fd: int
    socket_path: Path
    lock_path: Path

    def listen(self) -> socket.socket:
        """Bind and listen on the control socket (mode 0600 from birth).  Done before the
        sandbox starts, so a client that sees CMD running can always connect (early ones wait
        in the backlog until the event loop serves them)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.socket_path))
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            raise RuntimeDirError(f"cannot create the control socket {self.socket_path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        return sock

    def release(self) -> None:
        """Remove the socket and lock files, then drop the lock (order: no window for a stale file)."""
        for path in (self.socket_path, self.lock_path):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


def claim(directory: Path, name: str) -> Claim:
    """Take ``name`` in ``directory``: lock it, clean a crashed run's socket, or refuse."""
    check_name(name)
    lock_path = directory / (name + LOCK_SUFFIX)
    socket_path = directory / (name + SOCKET_SUFFIX)
    for attempt in range(CLAIM_ATTEMPTS):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise RuntimeDirError(f"cannot open the lock file {lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # A live owner, or a ``tether ps`` probing the lock this very moment: retry briefly.
            if attempt == CLAIM_ATTEMPTS - 1:
                holder = _read_pid(fd)
                os.close(fd)
                raise RuntimeDirError(f"a sandbox named {name!r} is already running"
                                      + (f" (tether pid {holder})" if holder else ""),
                                      f"choose another --name, or stop it: tether ctl {name} stop") from None
            os.close(fd)
            time.sleep(0.005)
            continue
        if _same_file(fd, lock_path):
            break
        os.close(fd)  # the previous owner removed the file while we waited for it: take the new one
    else:
        raise RuntimeDirError(f"cannot take the lock file {lock_path}: it keeps being replaced")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        socket_path.unlink()  # left by a run that died without cleaning up: the lock was free
    except FileNotFoundError:
        pass
    return Claim(name, fd, socket_path, lock_path)


def _same_file(fd: int, path: Path) -> bool:
    """Is ``fd`` still the file at ``path`` (not one unlinked by its releasing owner)?"""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class Found:
    """A control socket found in a runtime directory."""

    name: str
    socket_path: Path
    alive: bool  # its lock is held: a running sandbox
    owner_uid: int


def is_locked(lock_path: Path) -> bool:
    """Whether a live process holds ``lock_path`` (probing never takes it for long)."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def list_sockets(directories: list[Path]) -> list[Found]:
    """Every ``NAME.sock`` in ``directories`` with whether its sandbox is alive, sorted by name."""
    found = []
    for directory in directories:
        try:
            entries = sorted(directory.iterdir())
        except OSError:
            continue
        for entry in entries:
            if not entry.name.endswith(SOCKET_SUFFIX):
                continue
            name = entry.name[: -len(SOCKET_SUFFIX)]
            try:
                info = entry.lstat()
            except OSError:
                continue
            if not stat.S_ISSOCK(info.st_mode) or not NAME_RE.fullmatch(name):
                continue
            found.append(Found(name, entry, is_locked(directory / (name + LOCK_SUFFIX)), info.st_uid))
    return sorted(found, key=lambda f: (f.name, f.owner_uid))


def visible_directories(uid: int | None = None) -> list[Path]:
    """The runtime directories ``tether ps`` looks in: ours; as root, every user's as well."""
    uid = os.getuid() if uid is None else uid
    dirs = [runtime_dir(uid)]
    if uid == 0:
        for pattern, base in (("[0-9]*/tether", Path("/run/user")), ("tether-[0-9]*", Path("/tmp"))):
            try:
                dirs += sorted(base.glob(pattern))
            except OSError:
                pass
    return dirs


def find(name: str, uid: int | None = None) -> Path:
    """The control socket of the running sandbox ``name`` (ours first; root: any user's)."""
    check_name(name)
    for directory in visible_directories(uid):
        path = directory / (name + SOCKET_SUFFIX)
        if path.exists():
            if not is_locked(directory / (name + LOCK_SUFFIX)):
                raise RuntimeDirError(f"sandbox {name!r} is not running (stale control socket {path})")
            return path
    raise RuntimeDirError(f"no running sandbox named {name!r}", "list them with: tether ps")
