"""Every syscall, ioctl and ctypes binding tether uses, in one place.

Rules of this module:

* Nothing else in tether imports ``ctypes`` or issues namespace-crossing, privileged or
  fd-passing syscalls; callers use the named helpers below.  A reviewer auditing what tether
  asks of the kernel reads this file and nothing else.
* Helpers raise ``OSError`` with the real errno (never return -1), so callers can turn them
  into precise user-facing messages.
* Every fd created here is O_CLOEXEC unless the caller explicitly passes it on (principle 5:
  a host fd that reaches the sandbox unintended is a sandbox escape).

Python 3.11 lacks ``os.unshare``/``os.setns`` and any mount API, hence libc through ctypes.
libnftables is loaded lazily: only the process that installs a ruleset pays for it.
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import os
import resource
import socket
import struct
from collections.abc import Sequence

# --- namespaces ------------------------------------------------------------------------------

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _check(result: int, what: str) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def unshare(flags: int) -> None:
    """unshare(2): move the calling process into new namespaces."""
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    """setns(2): join the namespace ``fd`` refers to (single-threaded callers only for userns)."""
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3)


def namespace_type(fd: int) -> int:
    """The CLONE_NEW* type of the namespace ``fd`` refers to; OSError (ENOTTY, EINVAL) when
    ``fd`` is no namespace at all (a regular file, a socket, ...)."""
    return fcntl.ioctl(fd, NS_GET_NSTYPE)


def namespace_inode(fd_or_path: int | str) -> int:
    """The nsfs inode number: two namespaces are the same namespace exactly when these are equal.
    A path under ``/proc/PID/ns/`` is read as its link text (``net:[4026531833]``), which needs no
    ptrace access to PID (``stat()`` of pid 1's may be refused even to root)."""
    if isinstance(fd_or_path, int):
        return os.fstat(fd_or_path).st_ino
    text = os.readlink(fd_or_path)
    if not (text.endswith("]") and ":[" in text):
        raise OSError(errno.EINVAL, f"{fd_or_path} is not a namespace link: {text!r}")
    return int(text[text.index(":[") + 2:-1])


def write_id_maps(uid_map: str, gid_map: str, pid: str = "self") -> None:
    """Write uid/gid maps of a fresh user namespace (setgroups denied first, as unprivileged
    gid mapping requires)."""
    with open(f"/proc/{pid}/setgroups", "w") as f:
        f.write("deny")
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(uid_map)
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(gid_map)


# --- mounts ----------------------------------------------------------------------------------

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    """mount(2)."""
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def umount(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    _check(_libc.umount2(os.fsencode(target), flags), f"umount {target}")


def make_mounts_private() -> None:
    """Stop mount events in this (new) mount namespace from propagating to the host's."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)


# --- process control -------------------------------------------------------------------------

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def set_child_subreaper() -> None:
    """Orphaned descendants (the sandbox's pid 1 once its spawner exits) are reparented to us."""
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


def set_parent_death_signal(sig: int) -> None:
    """Deliver ``sig`` to the caller when its parent exits."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


pidfd_open = os.pidfd_open


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (each relayed connection holds
    several fds); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def close_fds_above(lowest: int, keep: Sequence[int] = ()) -> None:
    """Close every fd >= ``lowest`` except those in ``keep`` (before exec: the sandboxed command
    gets 0, 1, 2 and its --listen sockets only; the holder keeps its control socket and those)."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    start = lowest
    for fd in sorted(fd for fd in set(keep) if fd >= lowest):
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, limit)


# --- tun ------------------------------------------------------------------------------------

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUN_F_CSUM = 0x01  # we complete partial checksums (reads may carry NEEDS_CSUM)
TUN_F_TSO4 = 0x02  # reads may be TCP/IPv4 super packets we segment
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08


def open_tun(name: str, vnet_header: bool = False, packet_info: bool = False) -> int:
    """Create tun device ``name``; it lands in the netns where /dev/net/tun is *opened*.
    ``vnet_header``: every read and write carries a virtio-net header first, which lets a write
    hand the kernel checksum and segmentation work (``tether.net.packet.UdpFramer``).
    ``packet_info``: a 4-byte flags/protocol header before every packet (for programs that
    expect it, like wireguard-go)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    flags = IFF_TUN | (0 if packet_info else IFF_NO_PI) | (IFF_VNET_HDR if vnet_header else 0)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except OSError:
        os.close(fd)
        raise
    return fd


def set_tun_offload(fd: int, flags: int) -> None:
    """Tell the kernel which offloads the reader of a vnet-header tun performs (``TUN_F_*``):
    with TSO it hands over whole TCP super packets instead of MTU-sized segments."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)


# --- sockets --------------------------------------------------------------------------------

SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
IP_TRANSPARENT = 19


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Destination a redirected TCP connection was addressed to before nft's ``redirect``."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


IP_RECVORIGDSTADDR = 20
IPV6_TRANSPARENT = 75
IPV6_RECVORIGDSTADDR = 74


def transparent_udp_socket(family: int, address: str, port: int = 0) -> socket.socket:
    """A UDP socket that can receive TPROXY-diverted datagrams and tells each one's original
    destination (IP[V6]_RECVORIGDSTADDR).  Must be created inside the sandbox's netns."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        set_receive_buffer(sock, CAPTURE_RECEIVE_BUFFER)
        sock.bind((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def connect_inside(sock: socket.socket, source: tuple[str, int], port: int) -> tuple:
    """On a socket of the sandbox's netns (made there, used from anywhere: a socket keeps its
    netns): bind to a *foreign* address (IP_TRANSPARENT: a published port's real client; the
    caller needs CAP_NET_ADMIN over that netns, which its creator's user has) and connect,
    non-blocking, to the loopback's ``port``.  If the client's port is taken in there, any port
    of that address will do.  Returns the address bound."""
    level, option = ((socket.IPPROTO_IPV6, IPV6_TRANSPARENT) if sock.family == socket.AF_INET6
                     else (socket.SOL_IP, IP_TRANSPARENT))
    sock.setsockopt(level, option, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(source)
    except OSError:
        sock.bind((source[0], 0))
    bound = sock.getsockname()
    try:
        sock.connect(("::1" if sock.family == socket.AF_INET6 else "127.0.0.1", port))
    except BlockingIOError:
        pass  # TCP: completes later (the caller waits for writability)
    return bound


ORIGDST_CMSG_SPACE = socket.CMSG_SPACE(28)

CAPTURE_RECEIVE_BUFFER = 4 << 20
SO_RCVBUFFORCE = 33
SOL_UDP = 17
UDP_SEGMENT = 103


def set_receive_buffer(sock: socket.socket, size: int) -> None:
    """Ask for a ``size``-byte receive buffer: beyond net.core.rmem_max where the caller holds
    CAP_NET_ADMIN over the socket's netns (SO_RCVBUFFORCE; tether's own sandbox netns, or root),
    else as much as rmem_max allows.  Datagram relays need room for a burst while busy."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def send_segmented(sock: socket.socket, datagrams: Sequence[bytes], address: tuple | None = None) -> None:
    """Send ``datagrams`` on a UDP socket (connected, or to ``address``) with one syscall and one
    pass through the stack: UDP GSO (``UDP_SEGMENT``).  All but the last must have the first one's size (see
    ``tether.net.gso``).  EMSGSIZE/EINVAL/EIO mean this path cannot segment that size (a segment
    beyond the route's MTU, no checksum offload on the egress device): the caller falls back to
    one ``send`` per datagram."""
    if len(datagrams) == 1:
        if address is None:
            sock.send(datagrams[0])
        else:
            sock.sendto(datagrams[0], address)
        return
    control = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(datagrams[0])))]
    if address is None:
        sock.sendmsg(datagrams, control)
    else:
        sock.sendmsg(datagrams, control, 0, address)


def original_destination_of_datagram(ancdata: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """The (addr, port) a TPROXY-diverted datagram was sent to, from recvmsg's ancillary data."""
    for level, kind, data in ancdata:
        if level == socket.SOL_IP and kind == IP_RECVORIGDSTADDR and len(data) >= 8:
            return socket.inet_ntop(socket.AF_INET, data[4:8]), struct.unpack_from("!H", data, 2)[0]
        if level == socket.IPPROTO_IPV6 and kind == IPV6_RECVORIGDSTADDR and len(data) >= 24:
            return socket.inet_ntop(socket.AF_INET6, data[8:24]), struct.unpack_from("!H", data, 2)[0]
    return None


def set_reset_on_close(sock: socket.socket) -> None:
    """SO_LINGER {on, 0}: close() sends a TCP RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED), as the
    kernel recorded them at connect(): what the control socket authorises on."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def send_fds(sock: socket.socket, data: bytes | memoryview, fds: Sequence[int]) -> int:
    """sendmsg with SCM_RIGHTS; the receiver gets its own copies of ``fds``.  Returns the bytes
    sent (a stream socket may take fewer; the fds ride on the first of them)."""
    return socket.send_fds(sock, [data], list(fds))


def recv_fds(sock: socket.socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    """recvmsg with SCM_RIGHTS; received fds are made close-on-exec (MSG_CMSG_CLOEXEC)."""
    fds = array.array("i")
    msg, ancdata, flags, _ = sock.recvmsg(bufsize, socket.CMSG_LEN(maxfds * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise OSError(0, "control data truncated: too many fds in one message")
    return msg, list(fds)


# --- pipes and splice -------------------------------------------------------------------------

F_SETPIPE_SZ = 1031
splice = os.splice
SPLICE_F_MOVE = os.SPLICE_F_MOVE
SPLICE_F_NONBLOCK = os.SPLICE_F_NONBLOCK


def make_pipe(size: int) -> tuple[int, int]:
    """A non-blocking close-on-exec pipe, grown to ``size`` bytes when the per-user pipe
    budget allows (falls back to the kernel default otherwise)."""
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, size)
    except OSError:
        pass
    return r, w


# --- nftables ---------------------------------------------------------------------------------

class Nftables:
    """libnftables in-process: no ``nft`` exec, so the capabilities a rootless process holds in
    its own fresh namespaces (lost on execve) remain usable."""

    def __init__(self) -> None:
        lib = _load_libnftables()
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        if not self._ctx:
            raise OSError(ctypes.get_errno(), "nft_ctx_new failed")
        lib.nft_ctx_buffer_error(self._ctx)
        lib.nft_ctx_buffer_output(self._ctx)

    def run(self, commands: str) -> str:
        """Run an nft script; return its output or raise OSError with nft's error text."""
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
        if rc != 0:
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
            raise OSError(0, f"nft: {err.strip()}")
        return (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


def _load_libnftables() -> ctypes.CDLL:
    # Try the soname first: ctypes.util.find_library spawns ldconfig (tens of ms at start-up).
    try:
        return ctypes.CDLL("libnftables.so.1", use_errno=True)
    except OSError:
        from ctypes.util import find_library  # spawns ldconfig: only on this fallback path

        name = find_library("nftables")
        if not name:
            raise OSError(2, "libnftables not found (Debian: apt-get install nftables)") from None
        return ctypes.CDLL(name, use_errno=True)


def nftables_available() -> bool:
    try:
        _load_libnftables()
    except OSError:
        return False
    return True
