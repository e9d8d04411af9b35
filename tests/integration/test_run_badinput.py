"""`tether run` refuses malformed rules and policy files before anything starts (exit 2)."""

from __future__ import annotations

import pytest

from world import describe

BAD_RULES = [
    pytest.param("10.0.0.0/33", id="cidr-prefix-33"),
    pytest.param("1.2.3.4:0", id="port-0"),
    pytest.param("1.2.3.4:99999", id="port-99999"),
    pytest.param("http://1.2.3.4", id="scheme-http"),
    pytest.param("[::1", id="ipv6-unclosed-bracket"),
    pytest.param("1.2.3.4:10-5", id="port-range-reversed"),
    pytest.param("", id="empty"),
    pytest.param("bücher.test", id="domain-not-ascii"),
    pytest.param("*.*.example.test", id="domain-double-wildcard"),
    pytest.param("bad..example.test", id="domain-empty-label"),
]


def _assert_refused_before_start(tether, r, *, mentions: list[str]) -> None:
    assert r.returncode == 2, describe(r)
    for text in mentions:
        assert text in r.stderr, f"stderr does not name {text!r}\n{describe(r)}"
    assert r.stderr.strip(), describe(r)
    assert "Traceback" not in r.stderr, describe(r)
    assert not (tether.workdir / "started").exists(), "CMD ran despite the bad input"


def _cmd(tether) -> list[str]:
    return ["--", "/bin/sh", "-c", f"touch {tether.workdir / 'started'}"]


@pytest.mark.parametrize("flag", ["--allow", "--deny"])
@pytest.mark.parametrize("rule", BAD_RULES)
def test_bad_rule(tether, flag, rule):
    r = tether([flag, rule, *_cmd(tether)], timeout=30)
    _assert_refused_before_start(tether, r, mentions=[rule] if rule else [])


@pytest.mark.parametrize("args, mention", [
    pytest.param(["--default", "maybe"], "maybe", id="default-maybe"),
    pytest.param(["--allow-host", "abc"], "abc", id="allow-host-not-a-number"),
    pytest.param(["--allow-host", "99999"], "99999", id="allow-host-port-99999"),
])
def test_bad_option(tether, args, mention):
    r = tether([*args, *_cmd(tether)], timeout=30)
    _assert_refused_before_start(tether, r, mentions=[mention])


BAD_POLICIES = [
    pytest.param('default = "deny"\ncolour = "blue"\n', ["colour"], id="unknown-key"),
    pytest.param('default = "deny"\nallow = ["203.0.113.10:80"\n', ["policy.toml"], id="bad-toml-syntax"),
    pytest.param('default = "maybe"\n', ["maybe"], id="default-maybe"),
    pytest.param('allow = ["10.0.0.0/33"]\n', ["10.0.0.0/33"], id="bad-rule-cidr-prefix-33"),
    pytest.param('deny = ["1.2.3.4:10-5"]\n', ["1.2.3.4:10-5"], id="bad-rule-port-range-reversed"),
    pytest.param('allow = ["bad..example.test"]\n', ["bad..example.test"], id="bad-rule-domain"),
]


@pytest.mark.parametrize("text, mentions", BAD_POLICIES)
def test_bad_policy_file(tether, text, mentions):
    policy = tether.workdir / "policy.toml"
    policy.write_text(text)
    policy.chmod(0o644)
    r = tether(["--policy", policy, *_cmd(tether)], timeout=30)
    _assert_refused_before_start(tether, r, mentions=mentions)


def test_missing_policy_file(tether):
    missing = tether.workdir / "no-such-policy.toml"
    r = tether(["--policy", missing, *_cmd(tether)], timeout=30)
    _assert_refused_before_start(tether, r, mentions=["no-such-policy.toml"])
