"""`tether run`: reaching the host through the gateway alias, and not reaching it otherwise."""

from __future__ import annotations

from servers import HOST_BODY
from world import (
    GATEWAY,
    HOST_ADDR,
    assert_connected,
    assert_refused,
    describe,
    one_deny,
    probe,
)


def _host_reachable_from_host_netns(world, addr: str, port: int) -> None:
    """Control: the host service is really there (so a refusal from the sandbox is tether's)."""
    r = world.in_host(["curl", "-sS", "--noproxy", "*", "--max-time", "5", f"http://{addr}:{port}/"])
    assert r.returncode == 0 and r.stdout == HOST_BODY.decode(), f"host server not reachable on {addr}:{port}: {r}"


def test_allow_host_reaches_host_loopback(tether, world):
    with world.host_server(bind="127.0.0.1", http=0, echo=0) as srv:
        http, echo = srv.ports["http"], srv.ports["echo"]
        _host_reachable_from_host_netns(world, "127.0.0.1", http)
        r = tether(["--allow-host", str(http), "--", "curl", "-sS", "--noproxy", "*", "--max-time", "20",
                    f"http://{GATEWAY}:{http}/"])
        assert r.returncode == 0, describe(r)
        assert r.stdout == HOST_BODY.decode(), describe(r)

        # Only the mapped port: another host loopback port stays refused.
        res, r = probe(tether, [f"{GATEWAY}:{http}", f"{GATEWAY}:{echo}"], ["--allow-host", str(http)])
        assert_connected(res[f"{GATEWAY}:{http}"], r)
        assert_refused(res[f"{GATEWAY}:{echo}"], r)


def test_host_unreachable_by_default(tether, world):
    # Bound to 0.0.0.0 in the host netns: reachable there on 127.0.0.1 *and* 192.0.2.1.
    with world.host_server(bind="0.0.0.0", http=0) as srv:
        port = srv.ports["http"]
        _host_reachable_from_host_netns(world, "127.0.0.1", port)
        _host_reachable_from_host_netns(world, HOST_ADDR, port)
        log = tether.log_path()
        res, r = probe(tether, [f"{GATEWAY}:{port}", f"{HOST_ADDR}:{port}"], ["--log", log])
        assert_refused(res[f"{GATEWAY}:{port}"], r)
        assert_refused(res[f"{HOST_ADDR}:{port}"], r)
        events = tether.events(log)
        one_deny(events, f"{HOST_ADDR}:{port}", "builtin:host-address")
        one_deny(events, f"{GATEWAY}:{port}")


def test_host_address_allowed_explicitly(tether, world):
    """The built-in denials yield to an explicit allow rule."""
    with world.host_server(bind="0.0.0.0", http=0) as srv:
        port = srv.ports["http"]
        r = tether(["--allow", f"{HOST_ADDR}:{port}", "--", "curl", "-sS", "--noproxy", "*", "--max-time", "20",
                    f"http://{HOST_ADDR}:{port}/"])
        assert r.returncode == 0, describe(r)
        assert r.stdout == HOST_BODY.decode(), describe(r)
