"""A wireguard-go peer in a throwaway netns, and our sans-IO handshake driven against it.

Used by test_wg_interop.py. Each ``WgGo`` owns one network namespace ``tdw-<hex>`` (deliberately
*not* ``tether*``: the leak check would take it for one of tether's) holding only ``lo`` and the
tun ``tdw<hex>`` of one Debian ``wireguard-go -f tdw<hex>`` process (UAPI socket
``/var/run/wireguard/tdw<hex>.sock``). Everything talks over 127.0.0.1 inside that netns:

    netns tdw-<hex>
    ┌──────────────────────────────────────────────────────────────────────┐
    │ wireguard-go  udp *:51820         tun tdw<hex> 192.0.2.1/24          │
    │ our client    udp 127.0.0.1:<any> (tunnel address 192.0.2.2; no tun: │
    │               it builds and parses the IP packets itself)            │
    └──────────────────────────────────────────────────────────────────────┘

Our side is ``CLIENT`` below, written to the test's tmp dir and run as ``ip netns exec NS
/opt/tether/venv/bin/python <tmp>/wg_interop_client.py`` with ``PYTHONPATH=<repo>/src``: the
installed venv has a tether too, but its wireguard modules may be older than the repository's, and
these are the ones under test. Keys reach the client on stdin (one JSON line), never on argv;
wireguard-go's own keys go to ``wg set`` as files.

The client prints JSON lines: ``{"event": "ready", "port", "public"}`` once its UDP socket is
bound, then ``{"event": "result", ...}`` (exit 0) or ``{"event": "error", "error", "trace"}``
(exit 1).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import time
from pathlib import Path

from world import VENV_PYTHON, World, read_line, sh

HERE = Path(__file__).resolve().parent
REPO_SRC = HERE.parent.parent / "src"
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UAPI_DIR = Path("/var/run/wireguard")
WG_PORT = 51820
PEER_ADDR = "192.0.2.1"  # wireguard-go's tunnel address (on its tun, inside our netns only)
OUR_ADDR = "192.0.2.2"  # our client's tunnel address (its allowed-ips at wireguard-go)


def tool_env() -> dict[str, str]:
    return {"PATH": CLEAN_PATH, "LANG": "C.UTF-8", "HOME": "/root"}


def client_env() -> dict[str, str]:
    # PYTHONPATH: the repository's wireguard modules, not the (possibly older) installed ones.
    # No bytecode: this runs as root and must not leave root-owned __pycache__ in the tree.
    return {**tool_env(), "PYTHONPATH": str(REPO_SRC), "PYTHONDONTWRITEBYTECODE": "1"}


# --------------------------------------------------------------------------------------------
# keys (made by wg(8), so the client's derivation of public keys is checked against it too)


def genkey(path: Path) -> str:
    """``wg genkey > path`` (mode 0600); returns the private key's text."""
    text = sh(["wg", "genkey"], env=tool_env()).stdout.strip()
    _write_secret(path, text)
    return text


def genpsk(path: Path) -> str:
    text = sh(["wg", "genpsk"], env=tool_env()).stdout.strip()
    _write_secret(path, text)
    return text


def pubkey(private_text: str) -> str:
    return sh(["wg", "pubkey"], input=private_text + "\n", env=tool_env()).stdout.strip()


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


# --------------------------------------------------------------------------------------------
# wireguard-go


class WgGo:
    """``start()`` a wireguard-go in a new netns; ``configure()`` it with ``wg set``; ``stop()``
    returns what it left behind (a list of problems, empty when clean) and is idempotent."""

    def __init__(self, workdir: Path, cgroup: Path | None):
        self.id = secrets.token_hex(4)
        self.netns = f"tdw-{self.id}"
        self.ifname = f"tdw{self.id}"  # 11 characters (IFNAMSIZ allows 15)
        self.uapi = UAPI_DIR / f"{self.ifname}.sock"
        self.dir = workdir
        self.cgroup = cgroup
        self.log_path = workdir / f"wireguard-go-{self.ifname}.log"
        self.proc: subprocess.Popen | None = None
        self.clients: list[Client] = []
        self._netns_made = False
        self._stopped = False

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 10) -> WgGo:
        if self.uapi.exists():
            raise RuntimeError(f"{self.uapi} exists before wireguard-go started")
        sh(["ip", "netns", "add", self.netns])
        self._netns_made = True
        sh(["ip", "-n", self.netns, "link", "set", "lo", "up"])
        env = {**tool_env(), "LOG_LEVEL": "verbose",
               # 2018 releases refuse to start without it; Debian's only prints a banner
               "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
        argv = ["ip", "netns", "exec", self.netns, "wireguard-go", "-f", self.ifname]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(World.wrap(argv, self.cgroup), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"wireguard-go exited {self.proc.returncode} at start\n{self.log()}")
            if self.uapi.is_socket() and self.wg("show", self.ifname, check=False).returncode == 0:
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"wireguard-go's UAPI socket {self.uapi} did not appear\n{self.log()}")
            time.sleep(0.02)

    def stop(self, timeout: float = 5) -> list[str]:
        """SIGTERM wireguard-go (SIGKILL if it lingers), delete the netns; report leftovers."""
        if self._stopped:
            return []
        self._stopped = True
        problems: list[str] = []
        for client in self.clients:  # normally finished already; not after a failure
            client.kill()
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(OSError):
                    self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    problems.append(f"wireguard-go (pid {self.proc.pid}) ignored SIGTERM for {timeout}s")
                    with contextlib.suppress(OSError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(timeout=5)
            else:
                problems.append(f"wireguard-go died during the test (exit {self.proc.returncode})")
        # It removes its UAPI socket itself when it exits on SIGTERM; give it a moment.
        deadline = time.monotonic() + 2
        while self.uapi.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.uapi.exists():
            problems.append(f"UAPI socket left behind: {self.uapi}")
            with contextlib.suppress(OSError):
                self.uapi.unlink()
        if self._netns_made:
            r = sh(["ip", "netns", "delete", self.netns], check=False)
            if r.returncode != 0:
                problems.append(f"ip netns delete {self.netns}: {r.stderr.strip()}")
            if Path("/run/netns", self.netns).exists():
                problems.append(f"netns {self.netns} still exists")
        return problems

    def log(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no wireguard-go log)"
        # The cookie test's flood logs hundreds of copies of a few messages: show each message
        # that repeats that much once, where it first appears, with its count.
        def key(line: str) -> str:  # without the time stamp and the client's port
            line = re.sub(r"^(\w+: \(\S+\)) \S+ \S+ ", r"\1 ", line)
            return re.sub(r"(127\.0\.0\.1:)\d+|@ .* UTC", r"\1*", line)

        lines = text.splitlines()
        counts: dict[str, int] = {}
        for line in lines:
            counts[key(line)] = counts.get(key(line), 0) + 1
        out, shown = [], set()
        for line in lines:
            k = key(line)
            if counts[k] <= 3:
                out.append(line)
            elif k not in shown:
                shown.add(k)
                out.append(f"{line}  [x{counts[k]} in all]")
        return "--- wireguard-go log (last 60 distinct lines) ---\n" + "\n".join(out[-60:])

    # -- configuration and state --------------------------------------------------------------

    def wg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh(["ip", "netns", "exec", self.netns, "wg", *args], check=check, env=tool_env())

    def configure(self, *, private_key_file: Path, peer_public: str, psk_file: Path | None = None,
                  endpoint: str | None = None) -> None:
        """Listen on WG_PORT (every address of this netns; the client uses 127.0.0.1), one peer
        (our client) with allowed-ips OUR_ADDR/32; the tun gets PEER_ADDR/24 and goes up."""
        args = ["set", self.ifname, "private-key", str(private_key_file), "listen-port", str(WG_PORT),
                "peer", peer_public, "allowed-ips", f"{OUR_ADDR}/32"]
        if psk_file is not None:
            args += ["preshared-key", str(psk_file)]
        if endpoint is not None:
            args += ["endpoint", endpoint]
        self.wg(*args)
        sh(["ip", "-n", self.netns, "addr", "add", f"{PEER_ADDR}/24", "dev", self.ifname])
        sh(["ip", "-n", self.netns, "link", "set", self.ifname, "up"])

    def set_endpoint(self, peer_public: str, endpoint: str) -> None:
        self.wg("set", self.ifname, "peer", peer_public, "endpoint", endpoint)

    def latest_handshakes(self) -> dict[str, int]:
        """``wg show IF latest-handshakes``: {peer public key: unix time, 0 = never}."""
        out = self.wg("show", self.ifname, "latest-handshakes").stdout
        return {key: int(t) for key, t in (line.split() for line in out.splitlines() if line.strip())}

    def transfer(self) -> dict[str, tuple[int, int]]:
        """``wg show IF transfer``: {peer public key: (received bytes, sent bytes)}."""
        out = self.wg("show", self.ifname, "transfer").stdout
        return {f[0]: (int(f[1]), int(f[2])) for f in (line.split() for line in out.splitlines() if line.strip())}

    def log_count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log_path.read_text(errors="replace")))

    # -- processes in the netns ---------------------------------------------------------------

    def popen(self, argv: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
        """``argv`` in this netns, in the test's cgroup."""
        return subprocess.Popen(World.wrap(["ip", "netns", "exec", self.netns, *argv], self.cgroup),
                                env=env, start_new_session=True, **kw)

    def run(self, argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess:
        proc = self.popen(argv, tool_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def client(self, config: dict) -> Client:
        client = Client(self, config)
        self.clients.append(client)
        return client


# --------------------------------------------------------------------------------------------
# our side


class Client:
    """CLIENT running in the peer's netns; ``config`` goes to its stdin (keys included)."""

    def __init__(self, peer: WgGo, config: dict):
        self.peer = peer
        self.config = config
        # A file rather than -c: readable process lists (the leak check prints them) and tracebacks.
        script = peer.dir / "wg_interop_client.py"
        if not script.exists():
            script.write_text(CLIENT)
        argv = [str(VENV_PYTHON), str(script)]
        self.proc = peer.popen(argv, client_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
        self._buf = bytearray()
        self._lines: list[bytes] = []
        try:
            self.proc.stdin.write(json.dumps({"peer_port": WG_PORT, "our_addr": OUR_ADDR,
                                              "peer_addr": PEER_ADDR, **config}).encode() + b"\n")
        except BrokenPipeError:
            pass  # it died at once: result() reports why
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        self.proc.stdin = None  # so that communicate() does not touch it

    def wait_ready(self, timeout: float = 15) -> dict:
        line = read_line(self.proc.stdout.fileno(), time.monotonic() + timeout, self._buf)
        if line is None:
            self.kill()
            raise AssertionError(f"client did not get ready within {timeout}s\n{self._describe()}")
        self._lines.append(line)
        msg = json.loads(line)
        if msg.get("event") != "ready":
            self.kill()
            raise AssertionError(f"client: expected a ready line, got {msg}\n{self._describe()}")
        return msg

    def result(self, timeout: float = 20) -> dict:
        """The result line; AssertionError (with its stderr and wireguard-go's log) otherwise."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = self.proc.communicate()
            self._err = err
            raise AssertionError(f"client did not finish within {timeout}s\n{self._describe(out)}") from None
        self._err = err
        lines = [ln for ln in (bytes(self._buf) + out).splitlines() if ln.strip()]
        self._lines += lines
        self._buf.clear()
        last = json.loads(self._lines[-1]) if self._lines else {}
        if self.proc.returncode != 0 or last.get("event") != "result":
            raise AssertionError(f"client failed (exit {self.proc.returncode}): "
                                 f"{last.get('error', last)}\n{self._describe()}")
        return last

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.proc.communicate(timeout=5)

    def _describe(self, extra: bytes = b"") -> str:
        stdout = b"\n".join(self._lines) + bytes(self._buf) + extra
        err = getattr(self, "_err", b"") or b""
        return (f"--- client stdout ---\n{stdout.decode(errors='replace')[-4000:]}\n"
                f"--- client stderr ---\n{err.decode(errors='replace')[-4000:]}\n{self.peer.log()}")


# The client. Modes (config "mode"):
#   initiate  we send an initiation, take the response, then ping PEER_ADDR through the tunnel
#             ("echoes" requests, each reply decrypted and checked: addresses, checksums, ids,
#             payload)
#   respond   wait for wireguard-go's initiation (the test's `ping OUR_ADDR` causes it), answer
#             it, then answer the "echoes" ICMP echo requests that follow
#   cookie    flood wireguard-go with initiations (valid mac1) until it is under load, so that
#             our own initiation gets a cookie reply; show that one without mac2 still gets a
#             cookie reply, retry with mac2, complete, show it is still under load (so the retry
#             really went through the mac2 check), then ping through as in initiate
#   silent    send one initiation (keys the test chose so that wireguard-go must drop it) and
#             report everything that arrives within "silence" seconds
CLIENT = r"""
import json, os, socket, struct, sys, time, traceback

from tether.engine.wireguard import noise
from tether.engine.wireguard.keys import decode_key, encode_key

cfg = json.loads(sys.stdin.readline())
OUR_IP = socket.inet_aton(cfg["our_addr"])
PEER_IP = socket.inet_aton(cfg["peer_addr"])
TARGET = ("127.0.0.1", cfg["peer_port"])
TIMEOUT = float(cfg.get("timeout", 5.0))


def emit(**kw):
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp_echo(kind, src, dst, ident, seq, payload):
    icmp = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0x1234, 0x4000, 64, 1, 0, src, dst)
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + icmp


def parse_icmp(plain):
    # An IPv4 packet carrying ICMP echo (or not): every field the test checks.
    version_ihl = plain[0]
    ihl = (version_ihl & 15) * 4
    total = struct.unpack_from("!H", plain, 2)[0]
    ip = plain[:total]
    out = {"ip_version": version_ihl >> 4, "plain_len": len(plain), "ip_len": total,
           "padding_zero": not any(plain[total:]), "protocol": ip[9],
           "src": socket.inet_ntoa(ip[12:16]), "dst": socket.inet_ntoa(ip[16:20]),
           "ip_checksum_ok": checksum(ip[:ihl]) == 0, "icmp_checksum_ok": checksum(ip[ihl:]) == 0}
    kind, code, _, ident, seq = struct.unpack_from("!BBHHH", ip, ihl)
    out.update(icmp_type=kind, icmp_code=code, ident=ident, seq=seq)
    return out, ip[ihl + 8:]


def recv(sock, timeout):
    sock.settimeout(timeout)
    return sock.recvfrom(65536)


def recv_until(sock, deadline, what, skipped):
    try:
        return recv(sock, max(0.01, deadline - time.monotonic()))
    except socket.timeout:
        raise TimeoutError("no %s within %ss (skipped meanwhile: %s)" % (what, TIMEOUT, skipped)) from None


def next_data(sock, keypair, skipped):
    # The next transport message with a non-empty packet (keepalives and others are noted).
    deadline = time.monotonic() + TIMEOUT
    while True:
        data, _ = recv_until(sock, deadline, "transport data", skipped)
        kind = noise.message_type(data)
        if kind != noise.MESSAGE_TRANSPORT:
            skipped.append(kind)
            continue
        counter, plain = noise.open_transport(keypair, data)
        if plain:
            return counter, plain
        skipped.append("keepalive")


def handshake_reply(sock, state, skipped):
    # The response to our initiation (other message types are noted and skipped).
    deadline = time.monotonic() + TIMEOUT
    while True:
        data, source = recv_until(sock, deadline, "handshake response", skipped)
        kind = noise.message_type(data)
        if kind == noise.MESSAGE_RESPONSE and noise.receiver_index(data) == state.local_index:
            return data, source
        skipped.append(kind)


def echo_through(sock, keypair, count):
    # Ping PEER_ADDR through the tunnel: our requests sealed with counters 0.., replies opened.
    out, skipped = [], []
    ident = 0xBEEF
    for seq in range(1, count + 1):
        payload = b"tether-wg-interop " + os.urandom(16 * seq)
        request = icmp_echo(8, OUR_IP, PEER_IP, ident, seq, payload)
        sock.sendto(noise.seal_transport(keypair, seq - 1, noise.pad16(request)), TARGET)
        counter, plain = next_data(sock, keypair, skipped)
        info, reply_payload = parse_icmp(plain)
        info.update(counter=counter, want_ident=ident, want_seq=seq, payload_ok=reply_payload == payload)
        out.append(info)
    return out, skipped


def peer_for(private, peer_public, psk):
    identity = noise.StaticIdentity(decode_key(private))
    psk = decode_key(psk) if psk else bytes(32)
    return identity, noise.KnownPeer(noise.PeerKeys(decode_key(peer_public), psk))


def bound_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", int(cfg.get("our_port", 0))))
    return sock


def initiate(identity, peer, sock):
    skipped = []
    message, state = noise.create_initiation(identity, peer, 0x11223344, time.monotonic())
    sock.sendto(message, TARGET)
    reply, source = handshake_reply(sock, state, skipped)
    keypair = noise.consume_response(state, reply, time.monotonic())
    echoes, skipped2 = echo_through(sock, keypair, int(cfg.get("echoes", 3)))
    return {"source": list(source), "initiator": keypair.is_initiator, "echoes": echoes,
            "skipped": skipped + skipped2}


def respond(identity, peer, sock):
    data, source = recv_until(sock, time.monotonic() + TIMEOUT, "handshake initiation", [])
    kind = noise.message_type(data)
    if kind != noise.MESSAGE_INITIATION:
        raise SystemExit("first message is of type %d, not an initiation" % kind)
    found, state = noise.consume_initiation(
        identity, data, lambda key: peer if key == peer.keys.public_key else None, time.monotonic())
    assert found is peer
    response, keypair = noise.create_response(state, 0x55667788, time.monotonic())
    sock.sendto(response, source)
    skipped, requests = [], []
    for n in range(int(cfg.get("echoes", 1))):  # answer each echo request, sealed with counter n
        counter, plain = next_data(sock, keypair, skipped)
        info, payload = parse_icmp(plain)
        info.update(counter=counter, payload_len=len(payload))
        requests.append(info)
        reply = icmp_echo(0, OUR_IP, PEER_IP, info["ident"], info["seq"], payload)
        sock.sendto(noise.seal_transport(keypair, n, noise.pad16(reply)), source)
    return {"source": list(source), "initiator": keypair.is_initiator, "requests": requests,
            "skipped": skipped}


def cookie(identity, peer, sock):
    # The flood: one initiation (valid mac1, from another socket and its own cookie jar, so the
    # cookie replies it earns are not ours), sent many times. wireguard-go is "under load" while
    # its handshake queue holds >= 128 messages, and stays so for 1 s after it last saw that.
    flood_peer = noise.KnownPeer(peer.keys)
    flood, _ = noise.create_initiation(identity, flood_peer, 1, time.monotonic())
    blaster = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blaster.bind(("127.0.0.1", 0))
    blaster.setblocking(False)
    control = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # cookie replies to controls land here
    control.bind(("127.0.0.1", 0))
    attempts = []
    reply = state = None
    for attempt in range(int(cfg.get("attempts", 6))):
        for _ in range(3000 * (attempt + 1)):
            try:
                blaster.sendto(flood, TARGET)
            except BlockingIOError:
                pass
        time.sleep(0.2)  # let its queue drain (a full queue drops; under load lasts 1 s)
        message, state = noise.create_initiation(identity, peer, 0x11223344 + attempt, time.monotonic())
        sock.sendto(message, TARGET)
        kind, deadline = None, time.monotonic() + 1.0
        while kind is None:
            try:
                reply, _ = recv(sock, max(0.01, deadline - time.monotonic()))
            except socket.timeout:
                break
            if noise.receiver_index(reply) == state.local_index:
                kind = noise.message_type(reply)
            # else: a late answer to an earlier attempt (only on a very slow machine): ignore it
        attempts.append("no answer" if kind is None else kind)
        if kind == noise.MESSAGE_COOKIE_REPLY:
            break
        if kind is not None:
            time.sleep(1.1)  # not under load: let any under-load state end before flooding afresh
    else:
        return {"attempts": attempts, "cookie": False}
    cookie_receiver_ok = noise.receiver_index(reply) == state.local_index
    noise.consume_cookie_reply(peer, reply, time.monotonic())

    def control_gets_cookie(index):
        # An initiation without mac2 (same keys, empty cookie jar): a cookie reply means under load.
        msg, _ = noise.create_initiation(identity, noise.KnownPeer(peer.keys), index, time.monotonic())
        control.sendto(msg, TARGET)
        try:
            data, _ = recv(control, 2.0)
        except socket.timeout:
            return None
        return noise.message_type(data)

    before = control_gets_cookie(0x77777777)
    time.sleep(0.05)  # a newer timestamp than the control's (they are whitened to ~16.8 ms)
    message, state = noise.create_initiation(identity, peer, 0x99AABBCC, time.monotonic())
    retry_has_mac2 = any(message[-16:])
    sock.sendto(message, TARGET)
    skipped = []
    reply, source = handshake_reply(sock, state, skipped)
    keypair = noise.consume_response(state, reply, time.monotonic())
    after = control_gets_cookie(0x77777778)
    echoes, skipped2 = echo_through(sock, keypair, int(cfg.get("echoes", 3)))
    return {"attempts": attempts, "cookie": True, "cookie_receiver_ok": cookie_receiver_ok,
            "control_before": before, "control_after": after, "retry_has_mac2": retry_has_mac2,
            "source": list(source), "echoes": echoes, "skipped": skipped + skipped2}


def silent(identity, peer, sock):
    message, _ = noise.create_initiation(identity, peer, 0x12345678, time.monotonic())
    sock.sendto(message, TARGET)
    got = []
    deadline = time.monotonic() + float(cfg["silence"])
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            data, source = recv(sock, left)
        except socket.timeout:
            break
        got.append({"len": len(data), "type": data[0], "source": list(source)})
    return {"received": got}


def main():
    identity, peer = peer_for(cfg["private"], cfg["peer_public"], cfg.get("psk"))
    sock = bound_socket()
    emit(event="ready", port=sock.getsockname()[1], public=encode_key(identity.public_key))
    mode = cfg["mode"]
    result = {"initiate": initiate, "respond": respond, "cookie": cookie, "silent": silent}[mode](
        identity, peer, sock)
    emit(event="result", mode=mode, **result)


try:
    main()
except BaseException as e:
    emit(event="error", error="%s: %s" % (type(e).__name__, e), trace=traceback.format_exc())
    sys.exit(1)
"""
