"""The daemon's event log: engine audit events and its own (sessions, engines, reloads).

One JSON object per line, to ``[daemon] log`` (or stderr when none is configured), kept in a
bounded ``recent`` buffer and fanned out to subscribers (``tether ctl --admin events --follow``).
Engine workers send their audit records already formed (``tether.audit`` fields); the daemon's
own records share ``ts``, ``sandbox`` (the container's name, ``-`` for the daemon itself) and
``event`` (``attach`` | ``detach`` | ``refused`` | ``engine-start`` | ``engine-exit`` |
``engine-failed`` | ``reload`` | ``error``) and add what the event is about.
"""

from __future__ import annotations

import json
import sys
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TextIO

from tether.audit import RECENT


class DaemonLog:
    def __init__(self, sink: TextIO | None = None) -> None:
        self._sink = sink
        self.recent: deque[dict] = deque(maxlen=RECENT)
        self.subscribers: list[Callable[[dict], None]] = []

    def emit(self, event: str, sandbox: str = "-", **fields: object) -> dict:
        record = {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), "sandbox": sandbox, "event": event,
                  **fields}
        self.record(record)
        return record

    def record(self, record: dict) -> None:
        """Log a record as it is (an engine's audit event)."""
        line = json.dumps(record)
        sink = self._sink if self._sink is not None else sys.stderr
        try:
            sink.write(line + "\n")
            sink.flush()
        except (OSError, ValueError):
            pass  # a full disk must not stop the daemon; the record still reaches subscribers
        self.recent.append(record)
        for subscriber in list(self.subscribers):
            subscriber(record)

    def close(self) -> None:
        if self._sink is not None and self._sink not in (sys.stderr, sys.stdout):
            self._sink.close()
