"""The proxy engine of one sandbox: owns its capture fds and the tasks that serve them.

Fds owned (received from the spawner, closed by ``close()``): the TCP capture listener, the
NFLOG socket (the kernel's refusals, turned into ``deny`` events), and the tun device.  For now
whatever reaches ``tun0`` (non-TCP traffic that the ruleset did not refuse, e.g. ICMP) is read
and dropped, so the device queue never fills; the UDP/ICMP engines will consume it.
"""

from __future__ import annotations

import asyncio
import os
import socket

from tether.audit import Audit, format_endpoint
from tether.engine.proxy.tcp import CONNECT_TIMEOUT, TcpProxy
from tether.net import nflog
from tether.net.nft import Ruleset, SandboxNet
from tether.policy import Policy

TUN_READS_PER_WAKEUP = 256


class ProxyEngine:
    def __init__(self, *, listener: socket.socket, nflog_sock: socket.socket, tun: int, policy: Policy,
                 ruleset: Ruleset, audit: Audit, allow_host_ports: frozenset[int], net: SandboxNet,
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.audit = audit
        self.ruleset = ruleset
        self.nflog = nflog_sock
        self.tun = tun
        self.tcp = TcpProxy(listener, policy, audit, allow_host_ports, net, connect_timeout)
        self.dropped_packets = 0
        self.malformed_log_messages = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.tcp.start()
        self.nflog.setblocking(False)
        self._loop.add_reader(self.nflog.fileno(), self._on_nflog)
        os.set_blocking(self.tun, False)
        self._loop.add_reader(self.tun, self._on_tun)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.nflog.fileno())
            self._loop.remove_reader(self.tun)
        self.tcp.close()

    def _on_nflog(self) -> None:
        while True:
            try:
                datagram = self.nflog.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ENOBUFS: the kernel dropped log messages under a flood
                self.malformed_log_messages += 1
                return
            try:
                refusals = nflog.parse_refusals(datagram)
            except ValueError:
                self.malformed_log_messages += 1
                continue
            for refusal in refusals:
                rule = self.ruleset.label_of(refusal.prefix)
                if rule is None:
                    continue
                self.audit.emit("deny", proto=refusal.proto, src=format_endpoint(*refusal.src),
                                dst=format_endpoint(*refusal.dst), rule=rule, verdict="deny")

    def _on_tun(self) -> None:
        for _ in range(TUN_READS_PER_WAKEUP):
            try:
                os.read(self.tun, 65536)
            except (BlockingIOError, InterruptedError):
                return
            self.dropped_packets += 1
