"""Test peers for tether's integration world (see DESIGN.md, "Testing topology").

Run inside a test network namespace, never on a real network:

    ip netns exec tether-world-<id> /opt/tether/venv/bin/python servers.py --bind :: \
        --http 80 --echo 7 --sink 9000 --source 9001 --halfclose 9002 --udpecho 7

Once every listener is bound it prints one JSON line to stdout,
``{"ready": true, "pid": ..., "ports": {"http": 80, ...}}`` (port 0 picks a free port, the line
reports the real one), then serves until killed.

``--bind`` may be given several times; every service listens on every bind address. ``::`` means
dual-stack (IPV6_V6ONLY off): one socket serves IPv4 (as v4-mapped) and IPv6.

TCP services (each connection in its own thread):

* ``http``      -- any GET answers 200 with ``--body`` (default ``WORLD_BODY``).
* ``echo``      -- echoes everything back; on EOF half-closes and closes.
* ``sink``      -- reads to EOF, answers the sha256 hex digest of what it read + "\\n", closes.
* ``source``    -- reads a decimal byte count + "\\n", sends that many bytes of the deterministic
                   pattern (see ``pattern_block``/``pattern_sha256``), then closes.
* ``halfclose`` -- reads to EOF, then answers ``got N bytes\\n`` and closes: proves that the
                   client's shutdown(SHUT_WR) arrived while the other direction stayed open.

UDP services (one thread per socket; 4 MiB socket buffers):

* ``udpecho``   -- sends every datagram (up to 65507 B on IPv4, 65527 B on IPv6) back to its sender,
                   *from the address it was sent to* (IP_PKTINFO / IPV6_PKTINFO), so a connected
                   client socket accepts the reply even though the world owns many addresses.
* ``udpsink``   -- counts datagrams and bytes per sender ("addr:port", v4-mapped shown as IPv4).
* ``udpstats``  -- TCP query port of the sink: send one line, get one JSON line back:
                   ``stats [SETTLE]`` -> ``{"senders": {"192.0.2.1:40000": {"datagrams", "bytes",
                   "first", "last"}}, "datagrams", "bytes"}`` (times: CLOCK_MONOTONIC seconds;
                   SETTLE > 0 first waits until no datagram arrived for SETTLE s, at most 10 s);
                   ``reset`` -> ``{"ok": true}``.

DNS (``--dns PORT``, UDP *and* TCP on each bind address; needs dnspython, imported only then):

* ``--zone auth``  -- authoritative for the test zones in ``AUTH_ZONES`` (``example.test``,
                      ``other.test``) and for the root, so every other name is NXDOMAIN with an SOA
                      (negative TTL 5). Follows CNAME chains through the zones it serves. Answers
                      over UDP that exceed 512 B (or the query's EDNS payload size) are sent empty
                      with TC set, so the client retries over TCP.
* ``--zone rogue`` -- a server that must never be reached through tether: answers every A query
                      with ``ROGUE_A``, every AAAA with ``ROGUE_AAAA``, every TXT with
                      ``ROGUE_TXT``, and adds an EDE option (code 0, text ``ROGUE_EDE``) when the
                      query has EDNS.

Every query is counted by (name, type, transport); malformed ones under name ``""``, type
``"MALFORMED"``.

Control socket (``--control PATH``, a Unix stream socket, so the test process reaches it from
the root netns): one JSON line in, one JSON line out; ``{"cmd": "stats", "settle": 0.2}`` returns
``{"dns": {"counts": [[name, type, transport, n], ...], "log": [...]}, "udpsink": {...}}`` (the
parts this process serves), ``{"cmd": "reset"}`` zeroes every counter.

This module is also imported by the tests (constants, ``pattern_sha256``), so it has no
side effects at import time and uses only the standard library (dnspython only inside the DNS
server).
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import http.server
import ipaddress
import json
import os
import random
import resource
import signal
import socket
import socketserver
import struct
import sys
import threading
import time

WORLD_BODY = b"hello from the tether test world\n"
HOST_BODY = b"hello from the tether test host\n"

# The deterministic byte stream of the "source" server and of the upload clients: a 1 MiB block
# from a seeded generator, repeated.  Cheap to produce and to check at > 1 GB/s.
PATTERN_SEED = 0x7E7E_2024
PATTERN_BLOCK_SIZE = 1 << 20

TCP_SERVICES = ("http", "echo", "sink", "source", "halfclose", "udpstats")
UDP_SERVICES = ("udpecho", "udpsink")
SERVICES = TCP_SERVICES + UDP_SERVICES + ("dns",)

UDP_BUFFER = 4 << 20  # SO_RCVBUF / SO_SNDBUF of the UDP and DNS sockets
UDP_MAX = 65535  # receive buffer: the largest IPv6 payload without jumbograms, and more than IPv4's

# Linux values that Python 3.11's socket module does not export.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


@functools.lru_cache(maxsize=1)
def pattern_block() -> bytes:
    return random.Random(PATTERN_SEED).randbytes(PATTERN_BLOCK_SIZE)


@functools.lru_cache(maxsize=16)
def pattern_sha256(n: int) -> str:
    """sha256 hex digest of the first ``n`` bytes of the repeated pattern."""
    block = pattern_block()
    h = hashlib.sha256()
    full, rest = divmod(n, len(block))
    for _ in range(full):
        h.update(block)
    h.update(block[:rest])
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# the test zones

# big.example.test: more than 512 B and more than the usual EDNS size of 1232 B, less than 4096 B.
BIG_TXT = [f"big-{i:02d}-" + "b" * 60 for i in range(24)]
# huge.example.test: more than 4096 B, so truncated over UDP at every common EDNS size.
HUGE_TXT = [f"huge-{i:03d}-" + "h" * 100 for i in range(80)]


def _txt(name: str, strings: list[str]) -> str:
    return "".join(f'{name} TXT "{s}"\n' for s in strings)


AUTH_ZONES = {
    "example.test.": """
$TTL 60
@        5 SOA  ns1.example.test. hostmaster.example.test. 1 3600 600 86400 5
@          NS   ns1.example.test.
ns1        A    198.51.100.53
ns1        AAAA 2001:db8:10::53
@          A    203.0.113.10
@          AAAA 2001:db8:10::10
www        CNAME example.test.
deep       CNAME www.example.test.
multi      A    203.0.113.10
multi      A    203.0.113.11
multi      A    203.0.113.12
multi      AAAA 2001:db8:10::10
multi      AAAA 2001:db8:10::11
multi      AAAA 2001:db8:10::12
ads        A    203.0.113.66
ads        AAAA 2001:db8:10::66
private    A    10.1.2.3
short    2 A    203.0.113.10
short    2 AAAA 2001:db8:10::10
""" + _txt("big", BIG_TXT) + _txt("huge", HUGE_TXT),
    "other.test.": """
$TTL 60
@        5 SOA  ns1.example.test. hostmaster.example.test. 1 3600 600 86400 5
@          NS   ns1.example.test.
@          A    198.51.100.10
@          AAAA 2001:db8:10::20
cname-to-denied CNAME ads.example.test.
""",
    # Authoritative for the root as well: every name outside the test zones is NXDOMAIN.
    ".": """
$TTL 60
@        5 SOA  ns1.example.test. hostmaster.example.test. 1 3600 600 86400 5
@          NS   ns1.example.test.
""",
}
NEGATIVE_TTL = 5

ROGUE_A = "198.51.100.10"
ROGUE_AAAA = "2001:db8:10::20"
ROGUE_TXT = "answered by the rogue dns server"
ROGUE_EDE = "rogue"


# --------------------------------------------------------------------------------------------
# sockets


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _dual_stack(sock: socket.socket, addr: str) -> None:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if addr == "::" else 1)


def _show_addr(addr: tuple) -> str:
    """"ip:port" of a socket address; v4-mapped IPv6 shown as IPv4, IPv6 in brackets."""
    host, port = addr[0], addr[1]
    ip = ipaddress.ip_address(host.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _big_buffers(sock: socket.socket) -> None:
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, UDP_BUFFER)  # root: past net.core.[rw]mem_max
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, UDP_BUFFER)


def udp_socket(addr: str, port: int) -> socket.socket:
    sock = socket.socket(_family(addr), socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    _dual_stack(sock, addr)
    _big_buffers(sock)
    sock.bind((addr, port))
    return sock


def _spawn(name: str, target, *args) -> None:
    threading.Thread(target=target, args=args, name=name, daemon=True).start()


# --------------------------------------------------------------------------------------------
# TCP servers


class _TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 4096  # 500-connection bursts must not overflow the accept queue
    block_on_close = False

    def __init__(self, address, handler):
        self.address_family = _family(address[0])
        super().__init__(address, handler)

    def server_bind(self) -> None:
        _dual_stack(self.socket, self.server_address[0])
        super().server_bind()


class _HTTPServer(_TCPServer):
    def server_bind(self) -> None:
        # What http.server.HTTPServer.server_bind does, minus socket.getfqdn(): no name lookups.
        super().server_bind()
        self.server_name = str(self.server_address[0])
        self.server_port = self.server_address[1]


def _read_to_eof(sock: socket.socket, consume) -> int:
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    total = 0
    while True:
        n = sock.recv_into(buf)
        if not n:
            return total
        consume(view[:n])
        total += n


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = self.request
        buf = bytearray(1 << 16)
        view = memoryview(buf)
        try:
            while True:
                n = sock.recv_into(buf)
                if not n:
                    break
                sock.sendall(view[:n])
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class SinkHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = self.request
        h = hashlib.sha256()
        try:
            _read_to_eof(sock, h.update)
            sock.sendall(h.hexdigest().encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class SourceHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = self.request
        line = b""
        try:
            while not line.endswith(b"\n") and len(line) < 64:
                d = sock.recv(64 - len(line))
                if not d:
                    break
                line += d
            try:
                n = int(line.strip() or b"-1")
            except ValueError:
                n = -1
            if n < 0:
                sock.sendall(b"bad request: want a decimal byte count and a newline\n")
                return
            block = memoryview(pattern_block())
            left = n
            while left:
                k = min(left, len(block))
                sock.sendall(block[:k])
                left -= k
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class HalfCloseHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = self.request
        try:
            n = _read_to_eof(sock, lambda _chunk: None)
            sock.sendall(b"got %d bytes\n" % n)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _http_handler(body: bytes):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"
        server_version = "tether-test-world"

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_HEAD(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    return Handler


def _read_line(sock: socket.socket, limit: int = 4096) -> bytes:
    line = b""
    while not line.endswith(b"\n") and len(line) < limit:
        d = sock.recv(limit - len(line))
        if not d:
            break
        line += d
    return line


# --------------------------------------------------------------------------------------------
# UDP echo and sink


def udp_echo_loop(sock: socket.socket) -> None:
    """Echo every datagram from the address it was addressed to (the world owns many)."""
    v6 = sock.family == socket.AF_INET6
    if v6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    cmsg_space = socket.CMSG_SPACE(64)
    while True:
        try:
            data, anc, _flags, src = sock.recvmsg(UDP_MAX, cmsg_space)
        except OSError:
            continue
        out = []
        for level, kind, payload in anc:
            if v6 and level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
                out = [(level, kind, payload[:16] + struct.pack("=I", 0))]  # struct in6_pktinfo
            elif not v6 and level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                # struct in_pktinfo {int ipi_ifindex; in_addr ipi_spec_dst; in_addr ipi_addr}:
                # the destination it was sent to becomes the source of the reply.
                out = [(level, kind, struct.pack("=i", 0) + payload[8:12] + b"\0\0\0\0")]
        try:
            sock.sendmsg([data], out, 0, src)
        except OSError:
            pass


class UDPSink:
    """Counts datagrams and bytes per sender; ``snapshot()`` for the query port and control."""

    def __init__(self) -> None:
        self.flows: dict[tuple, list] = {}  # sender address -> [datagrams, bytes, first, last]
        self.last = 0.0
        self.lock = threading.Lock()

    def loop(self, sock: socket.socket) -> None:
        buf = bytearray(UDP_MAX)
        now = time.monotonic
        while True:
            try:
                n, src = sock.recvfrom_into(buf)
            except OSError:
                continue
            t = now()
            self.last = t
            flow = self.flows.get(src)
            if flow is None:
                with self.lock:
                    flow = self.flows.setdefault(src, [0, 0, t, t])
            flow[0] += 1
            flow[1] += n
            flow[3] = t

    def snapshot(self, settle: float = 0.0) -> dict:
        if settle > 0:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and time.monotonic() - self.last < settle:
                time.sleep(min(settle, 0.05))
        with self.lock:
            items = [(src, list(flow)) for src, flow in self.flows.items()]
        senders = {}
        for src, (n, b, first, last) in items:
            senders[_show_addr(src)] = {"datagrams": n, "bytes": b, "first": first, "last": last}
        return {"senders": senders, "datagrams": sum(s["datagrams"] for s in senders.values()),
                "bytes": sum(s["bytes"] for s in senders.values()), "now": time.monotonic()}

    def reset(self) -> None:
        with self.lock:
            self.flows = {}


def _udpstats_handler(sink: UDPSink):
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock = self.request
            try:
                words = _read_line(sock).decode(errors="replace").split()
                if words[:1] == ["stats"]:
                    settle = float(words[1]) if len(words) > 1 else 0.0
                    reply = sink.snapshot(min(max(settle, 0.0), 10.0))
                elif words == ["reset"]:
                    sink.reset()
                    reply = {"ok": True}
                else:
                    reply = {"error": "want 'stats [SETTLE]' or 'reset'"}
                sock.sendall(json.dumps(reply).encode() + b"\n")
            except (OSError, ValueError):
                pass

    return Handler


# --------------------------------------------------------------------------------------------
# DNS


class DNSCounter:
    """Queries seen, by (name, type, transport), plus a bounded log."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.log: collections.deque = collections.deque(maxlen=10000)
        self.lock = threading.Lock()

    def add(self, name: str, qtype: str, transport: str, src: tuple) -> None:
        with self.lock:
            self.counts[(name, qtype, transport)] += 1
            self.log.append({"name": name, "type": qtype, "transport": transport, "src": _show_addr(src),
                             "t": time.monotonic()})

    def snapshot(self) -> dict:
        with self.lock:
            return {"counts": [[*k, n] for k, n in sorted(self.counts.items())], "log": list(self.log)}

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()
            self.log.clear()


def normalize_name(name: str) -> str:
    """How the counters key names: lower case, no trailing dot ("" for the root)."""
    return name.lower().rstrip(".")


class DNSServer:
    """Answers one query message (bytes in, bytes out); the socket loops around it are below."""

    def __init__(self, zone_kind: str) -> None:
        try:
            import dns.edns
            import dns.exception
            import dns.flags
            import dns.message
            import dns.name
            import dns.opcode
            import dns.rcode
            import dns.rdataclass
            import dns.rdatatype
            import dns.rrset
            import dns.zone
        except ImportError as e:
            raise SystemExit(f"servers.py: the DNS server needs dnspython in {sys.executable} ({e}); "
                             "run ./scripts/install-deps.sh as root") from None

        self.dns = dns
        self.kind = zone_kind
        self.counter = DNSCounter()
        self.zones = []
        if zone_kind == "auth":
            for origin, text in AUTH_ZONES.items():
                self.zones.append(dns.zone.from_text(text, origin=origin, relativize=False, check_origin=True))
            # longest origin first, so the most specific zone wins
            self.zones.sort(key=lambda z: -len(z.origin.labels))
        elif zone_kind != "rogue":
            raise ValueError(f"unknown zone kind {zone_kind!r}")

    # -- wire level ---------------------------------------------------------------------------

    def handle(self, wire: bytes, transport: str, src: tuple) -> bytes | None:
        dns = self.dns
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 (anything malformed)
            self.counter.add("", "MALFORMED", transport, src)
            if len(wire) < 12 or wire[2] & 0x80:
                return None  # no header to answer, or a response: never answer those
            # FORMERR with the query's id and opcode, no sections.
            return struct.pack("!HBBHHHH", struct.unpack("!H", wire[:2])[0], 0x80 | (wire[2] & 0x78), 1, 0, 0, 0, 0)
        if query.flags & dns.flags.QR:
            self.counter.add("", "MALFORMED", transport, src)  # a response: never answered
            return None
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            self.counter.add("", "MALFORMED", transport, src)
            resp = dns.message.make_response(query)
            resp.set_rcode(dns.rcode.NOTIMP if query.opcode() != dns.opcode.QUERY else dns.rcode.FORMERR)
            return resp.to_wire()
        q = query.question[0]
        self.counter.add(normalize_name(q.name.to_text()), dns.rdatatype.to_text(q.rdtype), transport, src)
        resp = dns.message.make_response(query, our_payload=4096)
        if self.kind == "auth":
            self._answer_auth(resp, q.name, q.rdtype)
        else:
            self._answer_rogue(resp, query, q.name, q.rdtype)
        if transport == "tcp":
            return resp.to_wire(max_size=65535)
        max_size = 512 if query.edns < 0 else max(512, min(query.payload, 65535))
        try:
            return resp.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            tc = dns.message.make_response(query, our_payload=4096)
            tc.flags |= dns.flags.TC | (resp.flags & dns.flags.AA)
            tc.set_rcode(resp.rcode())
            return tc.to_wire(max_size=max_size)

    # -- answers ------------------------------------------------------------------------------

    def _zone_of(self, name):
        for zone in self.zones:
            if name.is_subdomain(zone.origin):
                return zone
        return None

    def _negative(self, resp, zone) -> None:
        dns = self.dns
        soa = zone.find_rdataset(zone.origin, dns.rdatatype.SOA)
        resp.authority.append(dns.rrset.from_rdata_list(zone.origin, min(soa.ttl, NEGATIVE_TTL), list(soa)))

    def _answer_auth(self, resp, qname, qtype) -> None:
        dns = self.dns
        resp.flags |= dns.flags.AA
        name = qname
        for _ in range(16):  # CNAME chain
            zone = self._zone_of(name)
            if zone is None:
                return
            node = zone.get_node(name)
            if node is None:
                resp.set_rcode(dns.rcode.NXDOMAIN)
                self._negative(resp, zone)
                return
            cname = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.CNAME)
            if cname is not None and qtype not in (dns.rdatatype.CNAME, dns.rdatatype.ANY):
                resp.answer.append(dns.rrset.from_rdata_list(name, cname.ttl, list(cname)))
                name = cname[0].target
                continue
            if qtype == dns.rdatatype.ANY:
                found = list(node.rdatasets)
            else:
                rds = node.get_rdataset(dns.rdataclass.IN, qtype)
                found = [rds] if rds is not None else []
            for rds in found:
                resp.answer.append(dns.rrset.from_rdata_list(name, rds.ttl, list(rds)))
            if not found:
                self._negative(resp, zone)  # NODATA
            return

    def _answer_rogue(self, resp, query, qname, qtype) -> None:
        dns = self.dns
        resp.flags |= dns.flags.AA
        data = {dns.rdatatype.A: ROGUE_A, dns.rdatatype.AAAA: ROGUE_AAAA, dns.rdatatype.TXT: f'"{ROGUE_TXT}"'}
        if qtype in data:
            resp.answer.append(dns.rrset.from_text(qname, 60, "IN", dns.rdatatype.to_text(qtype), data[qtype]))
        if query.edns >= 0:
            resp.use_edns(0, 0, 4096, options=[dns.edns.EDEOption(dns.edns.EDECode.OTHER, ROGUE_EDE)])

    # -- sockets ------------------------------------------------------------------------------

    def udp_loop(self, sock: socket.socket) -> None:
        while True:
            try:
                wire, src = sock.recvfrom(UDP_MAX)
            except OSError:
                continue
            try:
                out = self.handle(wire, "udp", src)
                if out is not None:
                    sock.sendto(out, src)
            except Exception as e:  # noqa: BLE001 (a test server must not die on one query)
                sys.stderr.write(f"dns: {type(e).__name__}: {e}\n")

    def tcp_handler(self):
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock = self.request
                sock.settimeout(10)
                try:
                    while True:
                        head = _recv_exact(sock, 2)
                        if head is None:
                            return
                        wire = _recv_exact(sock, struct.unpack("!H", head)[0])
                        if wire is None:
                            return
                        out = server.handle(wire, "tcp", self.client_address)
                        if out is None:
                            return
                        sock.sendall(struct.pack("!H", len(out)) + out)
                except (OSError, ValueError):
                    pass

        return Handler


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        d = sock.recv(n - len(data))
        if not d:
            return None
        data += d
    return data


# --------------------------------------------------------------------------------------------
# control socket


def _control_handler(parts: dict):
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            try:
                req = json.loads(self.rfile.readline() or b"{}")
                cmd = req.get("cmd")
                if cmd == "stats":
                    settle = min(max(float(req.get("settle", 0.0)), 0.0), 10.0)
                    reply = {name: (part.snapshot(settle) if name == "udpsink" else part.snapshot())
                             for name, part in parts.items()}
                elif cmd == "reset":
                    for part in parts.values():
                        part.reset()
                    reply = {"ok": True}
                else:
                    reply = {"error": f"unknown command {cmd!r}"}
            except (ValueError, TypeError, AttributeError) as e:
                reply = {"error": str(e)}
            self.wfile.write(json.dumps(reply).encode() + b"\n")

    return Handler


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    block_on_close = False


# --------------------------------------------------------------------------------------------


def start(binds: list[str] | str, ports: dict[str, int], body: bytes, zone: str = "auth",
          control: str | None = None) -> dict[str, int]:
    """Bind every requested service on every bind address, serve each socket in a daemon thread;
    return the real ports (a port 0 is chosen on the first bind address and reused on the others)."""
    if isinstance(binds, str):
        binds = [binds]
    handlers = {
        "echo": EchoHandler,
        "sink": SinkHandler,
        "source": SourceHandler,
        "halfclose": HalfCloseHandler,
    }
    parts: dict = {}
    sink = UDPSink() if {"udpsink", "udpstats"} & set(ports) else None
    if sink is not None:
        parts["udpsink"] = sink
    dns_server = DNSServer(zone) if "dns" in ports else None
    if dns_server is not None:
        parts["dns"] = dns_server.counter
    bound: dict[str, int] = {}
    for name, port in ports.items():
        for addr in binds:
            port = bound.get(name, port)
            if name in ("udpecho", "udpsink"):
                sock = udp_socket(addr, port)
                bound[name] = sock.getsockname()[1]
                _spawn(f"{name}-{addr}", udp_echo_loop if name == "udpecho" else sink.loop, sock)
                continue
            if name == "dns":
                sock = udp_socket(addr, port)
                bound[name] = port = sock.getsockname()[1]
                _spawn(f"dns-udp-{addr}", dns_server.udp_loop, sock)
                server = _TCPServer((addr, port), dns_server.tcp_handler())
            elif name == "http":
                server = _HTTPServer((addr, port), _http_handler(body))
            elif name == "udpstats":
                server = _TCPServer((addr, port), _udpstats_handler(sink))
            else:
                server = _TCPServer((addr, port), handlers[name])
            bound[name] = server.server_address[1]
            _spawn(f"{name}-{addr}", server.serve_forever)
    if control:
        old_umask = os.umask(0o077)
        try:
            server = _UnixServer(control, _control_handler(parts))
        finally:
            os.umask(old_umask)
        _spawn("control", server.serve_forever)
    return bound


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bind", action="append", help="address to listen on (repeatable; default 0.0.0.0)")
    for name in SERVICES:
        p.add_argument(f"--{name}", type=int, metavar="PORT")
    p.add_argument("--body", help="HTTP body (default: the world body)")
    p.add_argument("--zone", choices=("auth", "rogue"), default="auth", help="what the DNS server answers")
    p.add_argument("--control", metavar="PATH", help="Unix socket for counters (stats/reset)")
    args = p.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))

    ports = {name: getattr(args, name) for name in SERVICES if getattr(args, name) is not None}
    if not ports:
        p.error("no service requested")
    body = args.body.encode() if args.body is not None else WORLD_BODY
    bound = start(args.bind or ["0.0.0.0"], ports, body, zone=args.zone, control=args.control)
    sys.stdout.write(json.dumps({"ready": True, "pid": os.getpid(), "ports": bound}) + "\n")
    sys.stdout.flush()
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
