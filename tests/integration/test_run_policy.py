"""`tether run`: allowed and denied destinations, policy rules and files, the audit log."""

from __future__ import annotations

import json

from servers import WORLD_BODY
from world import (
    assert_connected,
    assert_refused,
    one_deny,
    probe,
    HTTP_GET,
    SANDBOX_ADDR,
    WORLD_ADDR,
    WORLD_ADDR2,
    check_event,
    describe,
    select_events,
)


# -- allowed ---------------------------------------------------------------------------------


def test_allowed_http_with_curl(tether):
    log = tether.log_path()
    r = tether(["--log", log, "--", "curl", "-sS", "--noproxy", "*", "--max-time", "20",
                f"http://{WORLD_ADDR}/"])
    assert r.returncode == 0, describe(r)
    assert r.stdout == WORLD_BODY.decode(), describe(r)

    events = tether.events(log)
    for ev in events:
        check_event(ev)
    dst = f"{WORLD_ADDR}:80"
    connects = select_events(events, event="connect", dst=dst)
    closes = select_events(events, event="close", dst=dst)
    assert len(connects) == 1 and len(closes) == 1, events
    c, cl = connects[0], closes[0]
    assert c["verdict"] == "allow" and c["proto"] == "tcp" and c["rule"] == "default", c
    assert c["src"].startswith(SANDBOX_ADDR + ":"), c
    assert cl["src"] == c["src"] and cl["sandbox"] == c["sandbox"], (c, cl)
    assert cl["verdict"] == "allow", cl
    assert cl["bytes_up"] > 0, cl  # the request
    assert cl["bytes_down"] > len(WORLD_BODY), cl  # headers + body
    assert not select_events(events, event="deny"), events


def test_allowed_exact_byte_counts(tether):
    """Raw-socket HTTP GET to the second world address: the close event counts bytes exactly."""
    log = tether.log_path()
    res, r = tether.python_json(HTTP_GET, WORLD_ADDR2, 80, opts=["--log", log])
    assert res["status"].startswith("HTTP/1.0 200"), res
    assert res["body"] == WORLD_BODY.decode(), res
    closes = select_events(tether.events(log), event="close", dst=f"{WORLD_ADDR2}:80")
    assert len(closes) == 1, tether.events(log)
    check_event(closes[0])
    assert closes[0]["bytes_up"] == res["sent"], (closes[0], res)
    assert closes[0]["bytes_down"] == res["received"], (closes[0], res)


# -- denied ----------------------------------------------------------------------------------


def test_denied_by_deny_rule(tether):
    log = tether.log_path()
    res, r = probe(tether, [f"{WORLD_ADDR2}:80", f"{WORLD_ADDR2}:7", f"{WORLD_ADDR}:80"],
                    ["--log", log, "--deny", "198.51.100.0/24"])
    assert_refused(res[f"{WORLD_ADDR2}:80"], r)
    assert_refused(res[f"{WORLD_ADDR2}:7"], r)
    assert_connected(res[f"{WORLD_ADDR}:80"], r)  # control: the rest still works
    events = tether.events(log)
    one_deny(events, f"{WORLD_ADDR2}:80", "198.51.100.0/24")
    one_deny(events, f"{WORLD_ADDR2}:7", "198.51.100.0/24")
    assert select_events(events, event="connect", dst=f"{WORLD_ADDR}:80", verdict="allow"), events


def test_default_deny_with_one_allow(tether):
    log = tether.log_path()
    res, r = probe(tether, [f"{WORLD_ADDR}:7", f"{WORLD_ADDR}:80", f"{WORLD_ADDR2}:80"],
                    ["--log", log, "--default", "deny", "--allow", f"{WORLD_ADDR}:80"])
    assert_refused(res[f"{WORLD_ADDR}:7"], r)
    assert_connected(res[f"{WORLD_ADDR}:80"], r)
    assert_refused(res[f"{WORLD_ADDR2}:80"], r)
    events = tether.events(log)
    one_deny(events, f"{WORLD_ADDR}:7", "default")
    one_deny(events, f"{WORLD_ADDR2}:80", "default")
    allowed = select_events(events, event="connect", dst=f"{WORLD_ADDR}:80")
    assert len(allowed) == 1 and allowed[0]["rule"] == f"{WORLD_ADDR}:80", events


def test_deny_beats_allow(tether):
    log = tether.log_path()
    res, r = probe(tether, [f"{WORLD_ADDR2}:80"],
                    ["--log", log, "--allow", WORLD_ADDR2, "--deny", "198.51.100.0/24"])
    assert_refused(res[f"{WORLD_ADDR2}:80"], r)
    one_deny(tether.events(log), f"{WORLD_ADDR2}:80", "198.51.100.0/24")


def test_port_range_and_protocol_prefix(tether):
    res, r = probe(tether, [f"{WORLD_ADDR}:9001", f"{WORLD_ADDR}:80", f"{WORLD_ADDR2}:7", f"{WORLD_ADDR2}:80"],
                    ["--default", "deny", "--allow", f"{WORLD_ADDR}:9000-9002",
                     "--allow", f"tcp://{WORLD_ADDR2}:7", "--allow", f"udp://{WORLD_ADDR2}:80"])
    assert_connected(res[f"{WORLD_ADDR}:9001"], r)
    assert_refused(res[f"{WORLD_ADDR}:80"], r)
    assert_connected(res[f"{WORLD_ADDR2}:7"], r)
    assert_refused(res[f"{WORLD_ADDR2}:80"], r)  # a udp:// rule does not allow TCP


def test_denial_reported_on_stderr_without_log(tether):
    res, r = probe(tether, [f"{WORLD_ADDR2}:80"], ["--deny", "198.51.100.0/24"])
    assert_refused(res[f"{WORLD_ADDR2}:80"], r)
    assert WORLD_ADDR2 in r.stderr, f"denial not reported on stderr\n{describe(r)}"


def test_log_to_stderr(tether):
    res, r = probe(tether, [f"{WORLD_ADDR2}:80"], ["--log", "-", "--deny", "198.51.100.0/24"])
    assert_refused(res[f"{WORLD_ADDR2}:80"], r)
    events = []
    for line in r.stderr.splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    one_deny(events, f"{WORLD_ADDR2}:80", "198.51.100.0/24")


def test_policy_file(tether):
    policy = tether.workdir / "policy.toml"
    policy.write_text(f'default = "deny"\nallow = ["{WORLD_ADDR}:80"]\ndeny = ["{WORLD_ADDR2}/32"]\n')
    policy.chmod(0o644)
    log = tether.log_path()
    res, r = probe(tether, [f"{WORLD_ADDR}:80", f"{WORLD_ADDR}:7", f"{WORLD_ADDR2}:80"],
                    ["--log", log, "--policy", policy])
    assert_connected(res[f"{WORLD_ADDR}:80"], r)
    assert_refused(res[f"{WORLD_ADDR}:7"], r)
    assert_refused(res[f"{WORLD_ADDR2}:80"], r)
    events = tether.events(log)
    one_deny(events, f"{WORLD_ADDR}:7", "default")
    one_deny(events, f"{WORLD_ADDR2}:80", f"{WORLD_ADDR2}/32")
