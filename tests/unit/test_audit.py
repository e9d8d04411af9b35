"""Unit tests for tether.audit: the JSON record, the sinks, the rate-limited denial lines.

The clock is injected, so the rate limit (DENIAL_LINES_PER_SECOND lines per one-second window,
then one "N more denials not shown" line when the window rolls over or on close) is tested
exactly, without sleeping.
"""

from __future__ import annotations

import io
import json
import sys
from datetime import datetime, timedelta, UTC

import pytest

from tether.audit import DENIAL_LINES_PER_SECOND, Audit, format_endpoint

FIELDS = ["ts", "sandbox", "event", "proto", "src", "dst", "rule", "verdict", "bytes_up", "bytes_down", "duration_ms"]


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def deny(audit: Audit, n: int = 1, dst: str = "203.0.113.7:443", rule: str = "203.0.113.0/24") -> None:
    for _ in range(n):
        audit.emit("deny", proto="tcp", src="10.0.2.100:40000", dst=dst, rule=rule, verdict="deny")


# --- the record --------------------------------------------------------------------------------


def test_record_has_exactly_the_documented_fields_in_order():
    sink = io.StringIO()
    audit = Audit("sbx-1", sink)
    before = datetime.now(UTC)
    record = audit.emit("close", proto="tcp", src="10.0.2.100:40000", dst="[2001:db8::1]:443", rule="2001:db8::/32",
                        verdict="allow", bytes_up=10, bytes_down=2000, duration_ms=12.34567)
    after = datetime.now(UTC)
    line = sink.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    parsed = json.loads(line)
    assert list(parsed) == FIELDS
    assert parsed == record
    assert {k: v for k, v in parsed.items() if k != "ts"} == {
        "sandbox": "sbx-1", "event": "close", "proto": "tcp", "src": "10.0.2.100:40000", "dst": "[2001:db8::1]:443",
        "rule": "2001:db8::/32", "verdict": "allow", "bytes_up": 10, "bytes_down": 2000, "duration_ms": 12.346,
    }
    ts = datetime.fromisoformat(parsed["ts"])
    assert ts.utcoffset() == timedelta(0)
    assert before - timedelta(milliseconds=1) <= ts <= after
    assert len(parsed["ts"].split("T")[1].split("+")[0]) == len("12:34:56.789")  # millisecond precision


def test_defaults_for_counts_and_duration():
    record = Audit("s", io.StringIO()).emit("connect", proto="tcp", src="a:1", dst="b:2", rule="default",
                                           verdict="allow")
    assert (record["bytes_up"], record["bytes_down"], record["duration_ms"]) == (0, 0, 0.0)


def test_error_event_adds_reason_after_the_stable_fields():
    sink = io.StringIO()
    Audit("s", sink).emit("error", proto="tcp", src="a:1", dst="b:2", rule="default", verdict="allow",
                          duration_ms=3.0, reason="Connection refused")
    parsed = json.loads(sink.getvalue())
    assert list(parsed) == FIELDS + ["reason"]
    assert parsed["reason"] == "Connection refused"


def test_file_sink_gets_one_line_per_event_of_every_kind(tmp_path):
    path = tmp_path / "audit.jsonl"
    stderr = io.StringIO()
    audit = Audit("sbx", open(path, "w"), stderr=stderr)
    events = ["connect", "deny", "close", "error", "deny"]
    for i, event in enumerate(events):
        audit.emit(event, proto="tcp", src="10.0.2.100:1", dst=f"203.0.113.{i}:80", rule="r",
                   verdict="deny" if event == "deny" else "allow")
        # flushed at once: a crash loses nothing already emitted
        assert path.read_text().count("\n") == i + 1
    audit.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == events
    assert [json.loads(line)["dst"] for line in lines] == [f"203.0.113.{i}:80" for i in range(5)]
    assert stderr.getvalue() == ""  # with a sink, no short denial lines
    assert audit.denied == 2


def test_close_closes_a_file_sink_but_not_stderr(monkeypatch):
    fake_stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", fake_stderr)
    audit = Audit("s", sys.stderr)  # --log -
    audit.emit("deny", proto="tcp", src="a:1", dst="b:2", rule="r", verdict="deny")
    audit.close()
    assert not fake_stderr.closed
    assert json.loads(fake_stderr.getvalue())["event"] == "deny"

    file_sink = io.StringIO()
    audit = Audit("s", file_sink)
    audit.close()
    assert file_sink.closed


# --- subscribers -------------------------------------------------------------------------------


def test_subscribers_receive_every_record_with_or_without_sink():
    for sink in (None, io.StringIO()):
        audit = Audit("s", sink, stderr=io.StringIO(), clock=FakeClock())
        got_a, got_b = [], []
        audit.subscribers.append(got_a.append)
        audit.subscribers.append(got_b.append)
        r1 = audit.emit("connect", proto="tcp", src="a:1", dst="b:2", rule="r", verdict="allow")
        deny(audit, 20)  # rate limiting applies to stderr lines, not to subscribers
        assert got_a == got_b
        assert got_a[0] is r1
        assert len(got_a) == 21
        assert [r["event"] for r in got_a] == ["connect"] + ["deny"] * 20


def test_subscriber_may_unsubscribe_itself_during_delivery():
    audit = Audit("s", io.StringIO())
    seen = []

    def once(record):
        seen.append(record["event"])
        audit.subscribers.remove(once)

    audit.subscribers.append(once)
    audit.emit("connect", proto="tcp", src="a:1", dst="b:2", rule="r", verdict="allow")
    audit.emit("close", proto="tcp", src="a:1", dst="b:2", rule="r", verdict="allow")
    assert seen == ["connect"]


# --- denial lines on stderr without a sink -------------------------------------------------------


def test_denial_line_format():
    stderr = io.StringIO()
    audit = Audit("s", None, stderr=stderr, clock=FakeClock())
    deny(audit, dst="[2001:db8::1]:22", rule="builtin:private")
    assert stderr.getvalue() == "tether: denied tcp to [2001:db8::1]:22 (rule: builtin:private)\n"


@pytest.mark.parametrize("event", ["connect", "close", "error"])
def test_only_denials_reach_stderr_without_sink(event):
    stderr = io.StringIO()
    audit = Audit("s", None, stderr=stderr, clock=FakeClock())
    audit.emit(event, proto="tcp", src="a:1", dst="b:2", rule="r", verdict="allow")
    assert stderr.getvalue() == ""


def _lines(stderr: io.StringIO) -> list[str]:
    return stderr.getvalue().splitlines()


def test_rate_limit_shows_five_per_second_then_counts_the_rest_when_the_window_rolls_over():
    assert DENIAL_LINES_PER_SECOND == 5
    clock, stderr = FakeClock(), io.StringIO()
    audit = Audit("s", None, stderr=stderr, clock=clock)
    deny(audit, 8)
    assert len(_lines(stderr)) == 5
    assert all(line.startswith("tether: denied tcp to ") for line in _lines(stderr))
    clock.now += 0.999  # still the same window
    deny(audit, 2)
    assert len(_lines(stderr)) == 5
    clock.now += 0.001  # the window rolls over: the summary first, then the new line
    deny(audit)
    assert _lines(stderr)[5:] == ["tether: 5 more denials not shown",
                                  "tether: denied tcp to 203.0.113.7:443 (rule: 203.0.113.0/24)"]
    assert audit.denied == 11


def test_rate_limit_summary_on_close():
    clock, stderr = FakeClock(), io.StringIO()
    audit = Audit("s", None, stderr=stderr, clock=clock)
    deny(audit, 12)
    audit.close()
    assert _lines(stderr)[5:] == ["tether: 7 more denials not shown"]
    audit.close()  # idempotent: the count was reported once
    assert len(_lines(stderr)) == 6


def test_no_summary_when_nothing_was_suppressed():
    clock, stderr = FakeClock(), io.StringIO()
    audit = Audit("s", None, stderr=stderr, clock=clock)
    deny(audit, 5)
    clock.now += 5
    deny(audit, 5)
    audit.close()
    assert len(_lines(stderr)) == 10
    assert not any("not shown" in line for line in _lines(stderr))


def test_each_window_gets_its_own_five_lines():
    clock, stderr = FakeClock(), io.StringIO()
    audit = Audit("s", None, stderr=stderr, clock=clock)
    for second in range(3):
        deny(audit, 7)
        clock.now += 1.0
    audit.close()
    shown = [line for line in _lines(stderr) if line.startswith("tether: denied")]
    summaries = [line for line in _lines(stderr) if "not shown" in line]
    assert len(shown) == 15
    assert summaries == ["tether: 2 more denials not shown"] * 3


def test_denied_counter_counts_every_denial_regardless_of_sink():
    for sink in (None, io.StringIO()):
        audit = Audit("s", sink, stderr=io.StringIO(), clock=FakeClock())
        deny(audit, 9)
        audit.emit("connect", proto="tcp", src="a:1", dst="b:2", rule="r", verdict="allow")
        assert audit.denied == 9


# --- format_endpoint -----------------------------------------------------------------------------

ENDPOINTS = [
    ("203.0.113.7", 443, "203.0.113.7:443"),
    ("0.0.0.0", 0, "0.0.0.0:0"),
    ("2001:db8::1", 22, "[2001:db8::1]:22"),
    ("::1", 8080, "[::1]:8080"),
    ("::ffff:10.0.2.100", 1, "[::ffff:10.0.2.100]:1"),
    ("fe80::1%eth0", 65535, "[fe80::1%eth0]:65535"),
    ("?", 0, "?:0"),
]


@pytest.mark.parametrize("addr,port,expected", ENDPOINTS, ids=[e[0] for e in ENDPOINTS])
def test_format_endpoint_brackets_ipv6(addr, port, expected):
    assert format_endpoint(addr, port) == expected
