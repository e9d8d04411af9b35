"""Audit events: every connection decision as one JSON object per line.

Event fields (stable; scripts parse them): ``ts`` (ISO 8601 UTC), ``sandbox``, ``event``
(``connect`` | ``deny`` | ``close`` | ``error``), ``proto``, ``src`` and ``dst`` (``addr:port``,
IPv6 in brackets), ``rule`` (the rule's text, ``default``, or a builtin label), ``verdict``
(``allow`` | ``deny``), ``bytes_up`` (sandbox to world), ``bytes_down``, ``duration_ms``; an
``error`` event adds ``reason``.

Sinks: a JSONL file (``--log PATH``) or stderr (``--log -``).  Without ``--log`` denials are
still reported on stderr as one short line each, rate-limited so a flood of refused
connections cannot drown the user's terminal.  Subscribers (``tether ctl NAME events
--follow``) receive every event as a dict; the last ``RECENT`` are kept for ``events`` without
``--follow``.
"""

from __future__ import annotations

import json
from collections import deque
import sys
import time
from datetime import datetime, UTC
from typing import TextIO
from collections.abc import Callable

DENIAL_LINES_PER_SECOND = 5
RECENT = 1000


def format_endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


class Audit:
    def __init__(self, sandbox: str, sink: TextIO | None = None, stderr: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sandbox = sandbox
        self._sink = sink
        self._stderr = stderr if stderr is not None else sys.stderr
        self._clock = clock
        self._window_start = 0.0
        self._window_count = 0
        self._suppressed = 0
        self.subscribers: list[Callable[[dict], None]] = []
        self.recent: deque[dict] = deque(maxlen=RECENT)
        self.denied = 0

    def emit(self, event: str, *, proto: str, src: str, dst: str, rule: str, verdict: str,
             bytes_up: int = 0, bytes_down: int = 0, duration_ms: float = 0.0, **extra: object) -> dict:
        record = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "sandbox": self.sandbox,
            "event": event,
            "proto": proto,
            "src": src,
            "dst": dst,
            "rule": rule,
            "verdict": verdict,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "duration_ms": round(duration_ms, 3),
            **extra,
        }
        if event == "deny":
            self.denied += 1
        if self._sink is not None:
            self._sink.write(json.dumps(record) + "\n")
            self._sink.flush()
        elif event == "deny":
            self._report_denial(record)
        self.recent.append(record)
        for subscriber in list(self.subscribers):
            subscriber(record)
        return record

    def _report_denial(self, record: dict) -> None:
        now = self._clock()
        if now - self._window_start >= 1.0:
            if self._suppressed:
                self._stderr.write(f"tether: {self._suppressed} more denials not shown\n")
            self._window_start, self._window_count, self._suppressed = now, 0, 0
        if self._window_count >= DENIAL_LINES_PER_SECOND:
            self._suppressed += 1
            return
        self._window_count += 1
        self._stderr.write(f"tether: denied {record['proto']} to {record['dst']} (rule: {record['rule']})\n")
        self._stderr.flush()

    def close(self) -> None:
        if self._suppressed:
            self._stderr.write(f"tether: {self._suppressed} more denials not shown\n")
            self._suppressed = 0
        if self._sink is not None and self._sink not in (sys.stderr, sys.stdout):
            self._sink.close()
