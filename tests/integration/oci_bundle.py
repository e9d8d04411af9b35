"""OCI bundles for runc and crun, built from Debian's busybox-static, for the OCI-hook tests.

Why this exists: tether's OCI hook (DESIGN.md: the root daemon gets ``/proc/PID/ns/net`` of a
container from the hook) must be tested against the real runtimes, not a fake. A real image
would need the network, which the test topology forbids, so the rootfs is a handful of
directories, a *copy* of the static ``/bin/busybox`` (not a symlink into the host: the
container's root must not depend on host paths, and a rootless container must own its files)
and applet symlinks. ``config.json`` is generated here, not by ``runc spec``: the tests control
every field (hooks, netns, user namespace, binds) and both runtimes get the same document.

Layout, per container::

    tmp/<container_id>/bundle/   config.json, rootfs/, container.log   (Bundle.path)
    tmp/<container_id>/state/    the runtime's --root                  (Bundle.root)

One ``--root`` per container, so concurrent tests (and anyone's containers in /run/runc,
/run/crun) never see each other, and ``delete`` can show that nothing is left.

Rules: stdlib only; every runtime command has a timeout and runs in its own session, which is
killed as a whole on timeout (runtime, its half-created init, its hooks, an exec'd process);
what leaves that session (crun's detached monitor) carries an environment marker by which
``delete`` finds it; a failed ``run_detached`` deletes what it half-created, cgroups and state
dir included; ``delete`` is idempotent and never raises for a container that is gone.

What this machine does (Debian 12, kernel 6.18, runc 1.1.5, crun 1.8.1, cgroup v1+v2 "hybrid",
pid 1 is not systemd), and how this module copes:

* crun refuses *every* container here, rootful or rootless, whatever ``--cgroup-manager``:
  "cgroups in hybrid mode not supported, drop all controllers from cgroupv2" (the v2 hierarchy
  at /sys/fs/cgroup/unified has ``hugetlb``). ``crun run`` is therefore started in a private
  mount namespace with that hierarchy unmounted (needs root; see ``_argv``), always with
  ``--cgroup-manager=disabled``. runc needs nothing: rootful it creates ``/<id>`` cgroups
  (v1 and the v2 one) and removes them on delete; rootless it skips cgroups silently.
* Both runtimes bring ``lo`` UP (127.0.0.1/8, ::1) in a *new* netns; in a joined one they leave
  it as it was. The default capabilities lack CAP_NET_ADMIN: the container cannot change it.
* Hooks run on the host, as the runtime's user, cwd = the bundle, with exactly the hook's
  ``env`` (without one: the runtime's own environment, which is why ``_env`` is minimal).
  State on stdin -- createRuntime: runc ``status "creating"``, crun ``"created"``, both with
  ``pid``; poststop: ``"stopped"``, runc without ``pid``, crun with ``"pid": 0``.
* Rootless (user namespace, self-mapping of one uid/gid, no cgroups) works with both
  runtimes for a *new* netns. Joining a netns owned by another user namespace fails (EPERM), as
  the kernel demands. With rootless crun, a createRuntime hook (running as the user) cannot
  open ``/proc/PID/ns/net`` of the container (EACCES: at that point the init is still crun's
  non-dumpable clone, /proc/PID/* owned by root); root can, and so can a rootless runc hook.
* ``crun exec`` does not apply ``noNewPrivileges`` to the exec'd process (runc does).
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

__all__ = ["Bundle", "OCIError", "build_bundle", "run_detached", "exec_in", "delete", "state",
           "runtime_path", "APPLETS", "DEFAULT_CAPS"]

BUSYBOX = Path("/bin/busybox")
RUNTIMES = {"runc": "/usr/sbin/runc", "crun": "/usr/bin/crun"}
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONTAINER_PATH = "/bin:/sbin:/usr/bin:/usr/sbin"
ROOTLESS_USER = os.environ.get("TETHER_TEST_USER", "tether-test")
UNIFIED = Path("/sys/fs/cgroup/unified")

# Applets linked into rootfs/bin: what the tests are promised (first line), then cheap extras
# for debugging a failing test from inside the container.
APPLETS = (
    "sh wget nc sleep cat echo ping ip ifconfig ls sha256sum dd head true "
    "ping6 false env id ps kill mkdir rm touch test [ grep sed wc tail printf hostname nslookup "
    "uname mount stat readlink timeout tr cut od hexdump seq sort uniq tee xargs route netstat "
    "ash pwd whoami sync"
).split()

# Docker's default set (it includes CAP_NET_RAW, for ping). Not CAP_NET_ADMIN: as in
# production, the container must not reconfigure its own network; the hook (tether) does.
DEFAULT_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]

# As `runc spec` (1.1.5) writes them.
MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]

HOOK_KINDS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart",
              "poststop")
HOOK_FIELDS = {"path", "args", "env", "timeout"}
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")   # runc: ^[\w+-\.]+$
_TAIL = 4000                      # characters of runtime output kept in an error message
_GONE_WAIT = 10.0                 # seconds for a killed init to disappear


class OCIError(RuntimeError):
    """A runtime command failed. The message names the command, its exit status (or timeout)
    and its output -- for ``run``, the tail of the container log, where the runtime's own
    errors land too."""


@dataclass
class Bundle:
    """A built bundle and where its runtime keeps its state.

    ``uid``/``gid``: the host ids every runtime command of this bundle runs as: 0 when rootful;
    when rootless, the unprivileged user mapped to root in the container's user namespace
    (commands then go through ``setpriv`` if the caller is root).
    """

    path: Path            # bundle dir: config.json + rootfs/
    container_id: str
    runtime: str          # "runc" | "crun"
    root: Path            # --root state dir for the runtime (unique per bundle)
    rootless: bool = False
    uid: int = 0
    gid: int = 0

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def log_path(self) -> Path:
        """stdout+stderr of the container's init *and* of ``runtime run`` itself: with
        ``terminal: false`` the runtime hands its own stdio to the container, so the two
        cannot be told apart without a console socket."""
        return self.path / "container.log"

    def config(self) -> dict:
        return json.loads(self.config_path.read_text())


# --------------------------------------------------------------------------------------------
# building


def runtime_path(runtime: str) -> str:
    """Absolute path of ``runtime``; raises if it is unknown or not installed."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown OCI runtime {runtime!r} (expected one of {sorted(RUNTIMES)})")
    if os.access(RUNTIMES[runtime], os.X_OK):
        return RUNTIMES[runtime]
    found = shutil.which(runtime, path=HOST_PATH)
    if not found:
        raise FileNotFoundError(errno.ENOENT, f"{runtime} is not installed", RUNTIMES[runtime])
    return found


def _rootless_ids() -> tuple[int, int]:
    """The unprivileged ids a rootless bundle is for: the caller's own when not root, else the
    test user's (the integration suite runs as root and drops to it, as conftest does)."""
    if os.geteuid() != 0:
        return os.getuid(), os.getgid()
    try:
        pw = pwd.getpwnam(ROOTLESS_USER)
    except KeyError:
        raise LookupError(f"rootless bundle requested as root, but user {ROOTLESS_USER!r} does "
                          "not exist (set TETHER_TEST_USER)") from None
    if pw.pw_uid == 0:
        raise ValueError(f"rootless user {ROOTLESS_USER!r} has uid 0")
    return pw.pw_uid, pw.pw_gid


def _check_reachable(path: Path, uid: int, gid: int) -> None:
    """Fail early, with the reason, if ``uid`` cannot traverse to ``path``: a rootless runtime
    would fail later with a bare EACCES (pytest's ``tmp_path`` is under a 0700 root dir)."""
    groups = {gid, *os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)}
    for d in [*reversed(path.parents), path]:
        st = d.stat()
        if st.st_uid == uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            raise PermissionError(errno.EACCES, f"uid {uid} cannot traverse {d} "
                                  f"({stat.filemode(st.st_mode)}, owner {st.st_uid}); a rootless "
                                  "bundle needs a directory that user can reach", str(path))


def _chown_tree(top: Path, uid: int, gid: int) -> None:
    os.chown(top, uid, gid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def _build_rootfs(rootfs: Path, resolv_conf: str, hostname: str) -> None:
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run", "var", "usr"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)
    os.chmod(rootfs / "root", 0o700)
    shutil.copyfile(BUSYBOX, rootfs / "bin" / "busybox")
    os.chmod(rootfs / "bin" / "busybox", 0o755)
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    etc = rootfs / "etc"
    (etc / "resolv.conf").write_text(resolv_conf)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    (etc / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"
                               f"127.0.1.1\t{hostname}\n")
    (etc / "hostname").write_text(hostname + "\n")


def _validate_hooks(hooks: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """A typo in a hook kind or field would be ignored by the runtimes (a hook that silently
    never runs): reject it here."""
    out: dict[str, list[dict]] = {}
    for kind, entries in hooks.items():
        if kind not in HOOK_KINDS:
            raise ValueError(f"unknown OCI hook kind {kind!r} (expected one of {HOOK_KINDS})")
        out[kind] = []
        for e in entries:
            if not isinstance(e, dict) or not str(e.get("path", "")).startswith("/"):
                raise ValueError(f"hook {kind}: an entry needs an absolute 'path': {e!r}")
            if set(e) - HOOK_FIELDS:
                raise ValueError(f"hook {kind}: unknown fields {sorted(set(e) - HOOK_FIELDS)}")
            out[kind].append(dict(e))
    return out


def _config(*, args: list[str], hostname: str, hooks: dict[str, list[dict]] | None,
            netns_path: str | None, rootless: bool, uid: int, gid: int,
            extra_binds: Iterable[tuple[str, str]], annotations: dict[str, str] | None) -> dict:
    """The config.json document (runtime spec 1.0.2), modelled on ``runc spec [--rootless]``
    minus the /sys/fs/cgroup mount (nothing needs it, and it differs per cgroup layout)."""
    devpts = ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]
    if not rootless:
        devpts.append("gid=5")      # gid 5 (tty) is not mapped in a rootless user namespace
    if rootless and netns_path is not None:
        # Only the owner of the netns' user namespace may mount sysfs; a joined netns is
        # someone else's, so bind the host's /sys, as `runc spec --rootless` does.
        sysfs = {"destination": "/sys", "type": "none", "source": "/sys",
                 "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}
    else:
        sysfs = {"destination": "/sys", "type": "sysfs", "source": "sysfs",
                 "options": ["nosuid", "noexec", "nodev", "ro"]}
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": devpts},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        sysfs,
    ]
    for src, dst in extra_binds:
        if not str(dst).startswith("/"):
            raise ValueError(f"bind destination must be absolute: {dst!r}")
        if not os.path.exists(src):
            raise FileNotFoundError(errno.ENOENT, "bind source does not exist", str(src))
        mounts.append({"destination": str(dst), "type": "bind", "source": str(src),
                       "options": ["rbind", "rw"]})

    net = {"type": "network"} if netns_path is None else {"type": "network", "path": netns_path}
    namespaces = [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, net]
    linux: dict = {"namespaces": namespaces, "maskedPaths": list(MASKED_PATHS),
                   "readonlyPaths": list(READONLY_PATHS)}
    if rootless:
        # A self-mapping of one uid and gid to root: no newuidmap, no /etc/subuid (there is
        # none here). No "resources" and no "cgroupsPath": with nothing to enforce, runc skips
        # cgroups it cannot write and crun runs with --cgroup-manager=disabled anyway.
        namespaces.append({"type": "user"})
        linux["uidMappings"] = [{"containerID": 0, "hostID": uid, "size": 1}]
        linux["gidMappings"] = [{"containerID": 0, "hostID": gid, "size": 1}]
    else:
        linux["resources"] = {"devices": [{"allow": False, "access": "rwm"}]}

    cfg: dict = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(args),
            "env": [f"PATH={CONTAINER_PATH}", "HOME=/root", f"HOSTNAME={hostname}"],
            "cwd": "/",
            "capabilities": {k: list(DEFAULT_CAPS)
                             for k in ("bounding", "effective", "permitted", "ambient")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": hostname,
        "mounts": mounts,
        "linux": linux,
    }
    if hooks:
        cfg["hooks"] = _validate_hooks(hooks)
    if annotations:
        cfg["annotations"] = {str(k): str(v) for k, v in annotations.items()}
    return cfg


def build_bundle(tmp: Path, runtime: str, container_id: str, args: list[str], *,
                 hooks: dict[str, list[dict]] | None = None,
                 resolv_conf: str = "nameserver 10.0.2.3\n",
                 netns_path: str | None = None,
                 rootless: bool = False,
                 extra_binds: Iterable[tuple[str, str]] = (),
                 annotations: dict[str, str] | None = None) -> Bundle:
    """Build ``tmp/<container_id>/{bundle,state}``: a busybox rootfs and its config.json.

    * ``args``: the container's init command (``["sleep", "300"]``); PATH is /bin.
    * ``hooks``: the OCI ``hooks`` object, passed through after a check of kinds and fields
      (entries ``{"path", "args", "env", "timeout"}``; ``args[0]`` is argv[0]).
    * ``netns_path``: None: a new network namespace (``lo`` up, nothing else); a path
      (``/proc/PID/ns/net``, ``/run/netns/NAME``): join that one, as it is.
    * ``rootless``: a user namespace mapping the unprivileged user (the caller, or
      ``$TETHER_TEST_USER``/tether-test if the caller is root) to root, no cgroup resources,
      the whole tree owned by that user, every runtime command run as that user. ``tmp`` must
      be reachable by it (pytest's ``tmp_path`` is not). A ``netns_path`` fails at ``run``
      unless the netns belongs to the container's own user namespace, i.e. always (EPERM).
    * ``extra_binds``: ``(host_src, container_dst)`` rbind mounts (sockets, files, dirs);
      the runtime creates ``container_dst``.
    * ``annotations``: OCI annotations; both runtimes pass them to the hooks in the state.

    On any failure the partially built directory is removed.
    """
    runtime_path(runtime)
    if not _ID_RE.match(container_id):
        raise ValueError(f"bad container id {container_id!r} (letters, digits, _ . + -; max 64)")
    if not args:
        raise ValueError("args must not be empty")
    if not BUSYBOX.is_file():
        raise FileNotFoundError(errno.ENOENT, "busybox-static is not installed", str(BUSYBOX))
    if not rootless and os.geteuid() != 0:
        raise PermissionError(errno.EPERM, "a rootful bundle needs root; pass rootless=True")
    uid, gid = _rootless_ids() if rootless else (0, 0)
    tmp = Path(tmp).resolve()
    if rootless:
        _check_reachable(tmp, uid, gid)
    base = tmp / container_id
    base.mkdir(mode=0o755)          # FileExistsError if the id was used in this tmp already
    try:
        path, root = base / "bundle", base / "state"
        path.mkdir(mode=0o755)
        root.mkdir(mode=0o700)
        hostname = container_id[:63]
        _build_rootfs(path / "rootfs", resolv_conf, hostname)
        cfg = _config(args=args, hostname=hostname, hooks=hooks, netns_path=netns_path,
                      rootless=rootless, uid=uid, gid=gid, extra_binds=extra_binds,
                      annotations=annotations)
        (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if rootless:
            _chown_tree(base, uid, gid)
        return Bundle(path=path, container_id=container_id, runtime=runtime, root=root,
                      rootless=rootless, uid=uid, gid=gid)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------
# running


def _hybrid_with_v2_controllers() -> bool:
    """True on a cgroup v1+v2 hybrid host whose v2 hierarchy has a controller (here hugetlb,
    the one not mounted as v1). crun 1.8.1 refuses to create any container there, whatever
    its --cgroup-manager: the check comes first in ``libcrun_cgroup_enter``."""
    try:
        return (os.path.ismount(UNIFIED)
                and bool((UNIFIED / "cgroup.controllers").read_text().strip()))
    except OSError:
        return False


def _argv(bundle: Bundle, *args: str, creates: bool = False) -> list[str]:
    """The runtime command line: the bundle's own --root; as the bundle's user (setpriv, when
    we are root and the bundle is rootless); for crun's creating command on a hybrid host,
    inside a private mount namespace without /sys/fs/cgroup/unified."""
    argv = [runtime_path(bundle.runtime), "--root", str(bundle.root)]
    if bundle.runtime == "crun":
        # No cgroups: crun's cgroupfs manager does not support this hybrid host, there is no
        # systemd, and an unprivileged user cannot write cgroup v1 anyway.
        argv.append("--cgroup-manager=disabled")
    argv += args
    if bundle.uid != 0 and os.geteuid() == 0:
        argv = ["setpriv", f"--reuid={bundle.uid}", f"--regid={bundle.gid}", "--init-groups",
                "--", *argv]
    if creates and bundle.runtime == "crun" and _hybrid_with_v2_controllers():
        # crun then sees a legacy v1 host and passes its hybrid check. The namespace dies with
        # crun and its hooks (the container has its own mount namespace); hooks run by
        # `crun run` (prestart, createRuntime, poststart) see the host's mounts minus that
        # hierarchy, and mounts they make stay private. Needs root: as an unprivileged caller
        # crun fails with its hybrid-mode message.
        if os.geteuid() == 0:
            argv = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                    f'umount -l {UNIFIED} && exec "$@"', "oci-bundle-crun", *argv]
    return argv


MARK = "OCI_BUNDLE_CONTAINER"


def _mark(bundle: Bundle) -> str:
    return f"{bundle.root}/{bundle.container_id}"


def _env(bundle: Bundle) -> dict[str, str]:
    """A minimal, explicit environment (hooks without "env" get the runtime's own), carrying
    a marker (``MARK=<root>/<id>``) by which ``delete`` finds runtime processes that escaped
    the session kill: crun's ``run -d`` double-forks into a new session; a container that
    started has exec'd and lost the marker (its env is the config's)."""
    env = {"PATH": HOST_PATH, "LANG": "C.UTF-8", "HOME": "/root", MARK: _mark(bundle)}
    if bundle.uid != 0:
        pw = pwd.getpwuid(bundle.uid)
        # XDG_RUNTIME_DIR only picks the default --root, which is never used; point it at a
        # directory the user owns rather than a /run/user/UID that does not exist.
        env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name,
                   XDG_RUNTIME_DIR=str(bundle.root))
    return env


def _cwd(bundle: Bundle) -> str:
    """The bundle, so hooks get the same cwd from every command (runc chdirs into --bundle
    for run, but runs poststop hooks from delete in the caller's cwd)."""
    return str(bundle.path) if bundle.path.is_dir() else "/"


def _run(bundle: Bundle, argv: list[str], timeout: float, *, input: str | bytes | None = None,
         **kw) -> subprocess.CompletedProcess:
    """subprocess.run in a new session, killed *as a whole* on timeout: the runtime, the
    stages of a half-created runc init, hooks, an exec'd process. (crun's ``run -d`` moves its
    monitor and the container into another session: ``delete`` finds those by the marker.)
    A started container stays in this session, which is harmless (its leader exited) and
    keeps it out of the caller's terminal signals."""
    if input is not None:
        kw["stdin"] = subprocess.PIPE
    with subprocess.Popen(argv, env=_env(bundle), cwd=_cwd(bundle), start_new_session=True,
                          **kw) as p:
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            _killpg(p.pid)
            try:
                p.communicate(timeout=2)
            except subprocess.TimeoutExpired:
                pass    # a process outside the session holds our pipes; Popen's exit closes them
            raise subprocess.TimeoutExpired(argv, timeout, e.output, e.stderr) from None
        except BaseException:
            _killpg(p.pid)
            raise
        return subprocess.CompletedProcess(argv, p.returncode, out, err)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _runtime(bundle: Bundle, *args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return _run(bundle, _argv(bundle, *args), timeout, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _describe(argv: list[str], rc: int | None, out: str) -> str:
    out = out.strip()
    if len(out) > _TAIL:
        out = "..." + out[-_TAIL:]
    status = "timed out" if rc is None else f"exited {rc}"
    return f"{' '.join(argv)} {status}: {out or '(no output)'}"


_GONE_MARKERS = ("does not exist", "No such file or directory")


def state(bundle: Bundle) -> dict | None:
    """``runtime state ID`` as a dict, or None when the container does not exist (never
    created, or deleted). Other failures raise ``OCIError``.

    Keys seen here -- runc: ociVersion "1.0.2-dev", id, pid, status, bundle, rootfs (absolute),
    created, owner ("" even when rootless), annotations; crun: ociVersion "1.0.0", the same
    with rootfs relative ("rootfs"), systemd-scope "", owner (the user name)."""
    if not (bundle.root / bundle.container_id).is_dir():
        # Checked first, without the runtime: every runtime command re-creates a missing --root.
        return None
    r = _runtime(bundle, "state", bundle.container_id)
    if r.returncode == 0:
        return json.loads(r.stdout)
    if (not (bundle.root / bundle.container_id).is_dir()
            or any(m in r.stderr for m in _GONE_MARKERS)):
        return None          # deleted meanwhile, or half-created (see _remove_remains)
    raise OCIError(_describe(r.args, r.returncode, r.stderr + r.stdout))


def run_detached(bundle: Bundle, timeout: float = 20) -> int:
    """``runtime run -d``: create and start the container; return its init's host pid.

    Its stdin is /dev/null, its stdout and stderr ``bundle.log_path``: never a pipe of ours,
    which the container would hold open (a reader would hang until it exits). On failure or
    timeout whatever was half-created is killed and deleted, and ``OCIError`` carries the
    log's tail (the runtime's error message, a failing hook's output)."""
    argv = _argv(bundle, "run", "-d", "--bundle", str(bundle.path), bundle.container_id,
                 creates=True)
    log = bundle.log_path
    start = log.stat().st_size if log.exists() else 0
    try:
        with open(log, "ab") as out:
            if bundle.uid != 0:
                os.fchown(out.fileno(), bundle.uid, bundle.gid)
            try:
                rc: int | None = _run(bundle, argv, timeout, stdin=subprocess.DEVNULL,
                                      stdout=out, stderr=out).returncode
            except subprocess.TimeoutExpired:
                rc = None
        if rc == 0:
            st = state(bundle)
            if st and st.get("status") == "running" and st.get("pid"):
                return int(st["pid"])
            raise OCIError(f"{' '.join(argv)} succeeded, but the container's state is {st!r};"
                           f" log: {_tail(log, start).strip()[-_TAIL:] or '(empty)'}")
        raise OCIError(_describe(argv, rc, _tail(log, start)))
    except BaseException:
        try:
            delete(bundle, force=True)
        except Exception:       # the original error says more; delete already did its best
            pass
        raise


def _tail(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError as e:
        return f"(log unreadable: {e})"


def exec_in(bundle: Bundle, argv: list[str], timeout: float = 30, *,
            input: str | bytes | None = None, text: bool = True) -> subprocess.CompletedProcess:
    """``runtime exec ID argv``, output captured (text unless ``text=False``), never raising
    on a non-zero exit (``.returncode`` is the command's). On timeout the runtime, the exec'd
    process and its children are killed and ``subprocess.TimeoutExpired`` is raised.

    The exec'd process gets the config's env and cwd and the default capabilities (no
    CAP_NET_ADMIN). crun does not set no_new_privs on it; runc does."""
    if not argv:
        raise ValueError("argv must not be empty")
    pidfile = bundle.path / f".exec-{uuid.uuid4().hex[:12]}.pid"
    cmd = _argv(bundle, "exec", "--pid-file", str(pidfile), bundle.container_id, *argv)
    try:
        return _run(bundle, cmd, timeout, input=input, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=text)
    except subprocess.TimeoutExpired:
        _kill_pidfile(pidfile)  # in case it left the session (setsid in the container)
        raise
    finally:
        pidfile.unlink(missing_ok=True)


def _kill_pidfile(pidfile: Path) -> None:
    try:
        os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
    except (OSError, ValueError):
        pass


def _pid_gone(pid: int) -> bool:
    """Gone or a zombie: a detached init is re-parented to pid 1, which reaps it when it
    pleases (here pid 1 is process_api; zombies were seen to last over a second)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _pid_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def delete(bundle: Bundle, force: bool = True) -> None:
    """Stop and delete the container; idempotent, a no-op when it is already gone.

    ``force``: SIGKILL (``delete --force``). Otherwise SIGTERM first and up to 10 s to exit
    -- an init without a SIGTERM handler (``sleep`` as pid 1 of its pid namespace) ignores
    it -- then the same. Returns once the init is gone (and with its pid namespace every
    container process), the runtime's state is removed and the poststop hooks ran. Then the
    remains of a half-created container (a ``run`` killed by its timeout) go too: processes
    carrying this bundle's marker, the runtime's state dir, runc's empty cgroups, the --root.
    Raises ``OCIError`` only if the container survived."""
    cid = bundle.container_id
    try:
        st = state(bundle)
    except OCIError:
        st = {}                 # unreadable state: still try to delete it
    if st is not None:
        pid = int(st.get("pid") or 0)
        if not force and st.get("status") == "running" and pid:
            _runtime(bundle, "kill", cid, "TERM")
            _wait_gone(pid, _GONE_WAIT)
        r = _runtime(bundle, "delete", "--force", cid, timeout=60)
        if r.returncode != 0 and state(bundle) is not None:
            raise OCIError(_describe(r.args, r.returncode, r.stderr + r.stdout))
        if pid and not _wait_gone(pid, _GONE_WAIT):
            raise OCIError(f"container {cid}: init pid {pid} still alive after delete")
    _remove_remains(bundle)


def _remove_remains(bundle: Bundle) -> None:
    """What a runtime killed mid-``run`` leaves, which neither ``state`` nor ``delete`` know:
    crun: its detached monitor and the container's not-yet-exec'd init (in a new session),
    and a state dir without ``status``; runc: a state dir with only ``exec.fifo`` and, rootful,
    the container's (empty) cgroups."""
    killed = _kill_marked(_mark(bundle))
    for pid in killed:
        _wait_gone(pid, _GONE_WAIT)
    shutil.rmtree(bundle.root / bundle.container_id, ignore_errors=True)
    if bundle.runtime == "runc" and bundle.uid == 0:
        for d in _own_cgroup_dirs(bundle.container_id):
            _remove_cgroup(d)
    _rmdir_root(bundle)


def _kill_marked(mark: str) -> list[int]:
    """SIGKILL every process whose environment holds ``MARK=mark``; their pids."""
    needle = f"{MARK}={mark}".encode() + b"\0"
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue          # gone, or not ours to read (non-dumpable when we are not root)
        if (b"\0" + env).find(b"\0" + needle) >= 0:
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
            except ProcessLookupError:
                pass
    return killed


def _own_cgroup_dirs(name: str) -> list[Path]:
    """``<hierarchy>/<our cgroup>/<name>`` in every mounted hierarchy: where runc, without a
    cgroupsPath, puts a container (observed: ``/<id>`` below the caller's cgroup)."""
    own: dict[str, str] = {}
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrls, path = line.split(":", 2)
            own[ctrls] = path
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    dirs = []
    for line in mountinfo:
        pre, _, post = line.partition(" - ")
        fields, post_fields = pre.split(), post.split()
        if len(post_fields) < 3 or post_fields[0] not in ("cgroup", "cgroup2"):
            continue
        mount_root, mount_point = fields[3], fields[4]
        if post_fields[0] == "cgroup2":
            key = ""
        else:
            opts = set(post_fields[2].split(","))
            key = next((k for k in own if k and set(k.split(",")) <= opts), None)
            if key is None:
                continue
        rel = own.get(key)
        if rel is None or not (rel + "/").startswith(mount_root.rstrip("/") + "/"):
            continue
        rel = rel[len(mount_root.rstrip("/")):]
        dirs.append(Path(mount_point + rel.rstrip("/")) / name)
    return dirs


def _remove_cgroup(d: Path) -> None:
    """Kill what is left in cgroup ``d`` and remove it (rmdir: only an empty cgroup goes)."""
    if not d.is_dir():
        return
    try:
        for pid in (d / "cgroup.procs").read_text().split():
            os.kill(int(pid), signal.SIGKILL)
    except (OSError, ValueError):
        pass
    for _ in range(50):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:       # EBUSY while the killed processes exit
            time.sleep(0.02)


def _rmdir_root(bundle: Bundle) -> None:
    try:
        bundle.root.rmdir()
    except OSError:
        pass        # absent, or not empty (left to the caller's tmp cleanup)
