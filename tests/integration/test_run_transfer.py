"""`tether run`: bulk data both ways, half-close, many concurrent connections."""

from __future__ import annotations

from servers import pattern_sha256
from world import (
    DOWNLOAD,
    HALF_CLOSE,
    MANY_ECHO,
    PORTS,
    UPLOAD,
    WORLD_ADDR,
    check_event,
    select_events,
)

GIB = 1 << 30


def _one_close(tether, log, dst):
    events = tether.events(log)
    for ev in events:
        check_event(ev)
    closes = select_events(events, event="close", dst=dst)
    assert len(closes) == 1, f"want one close event for {dst}: {events}"
    return closes[0]


def test_upload_1gib(tether):
    log = tether.log_path()
    res, r = tether.python_json(UPLOAD, WORLD_ADDR, PORTS["sink"], GIB, opts=["--log", log], timeout=300)
    print(f"upload: {GIB} bytes in {res['seconds']:.2f}s = {GIB * 8 / res['seconds'] / 1e9:.2f} Gbit/s")
    assert res["sent"] == GIB
    assert res["reply"] == pattern_sha256(GIB), "sha256 seen by the sink differs from what was sent"
    ev = _one_close(tether, log, f"{WORLD_ADDR}:{PORTS['sink']}")
    assert ev["bytes_up"] == GIB and ev["bytes_down"] == 65, ev  # 64 hex digits + "\n"


def test_download_1gib(tether):
    log = tether.log_path()
    res, r = tether.python_json(DOWNLOAD, WORLD_ADDR, PORTS["source"], GIB, opts=["--log", log], timeout=300)
    print(f"download: {res['received']} bytes in {res['seconds']:.2f}s = "
          f"{res['received'] * 8 / res['seconds'] / 1e9:.2f} Gbit/s")
    assert res["received"] == GIB
    assert res["sha256"] == pattern_sha256(GIB), "sha256 of the received stream differs from the source's"
    ev = _one_close(tether, log, f"{WORLD_ADDR}:{PORTS['source']}")
    assert ev["bytes_up"] == len(b"%d\n" % GIB) and ev["bytes_down"] == GIB, ev


def test_half_close(tether):
    """The client's SHUT_WR reaches the server as EOF while the server's reply still flows back."""
    n = 300_000
    log = tether.log_path()
    res, r = tether.python_json(HALF_CLOSE, WORLD_ADDR, PORTS["halfclose"], n, opts=["--log", log], timeout=60)
    assert res["reply"] == f"got {n} bytes\n", res
    ev = _one_close(tether, log, f"{WORLD_ADDR}:{PORTS['halfclose']}")
    assert ev["bytes_up"] == n and ev["bytes_down"] == len(res["reply"]), ev


def test_500_concurrent_connections(tether):
    n = 500
    res, r = tether.python_json(MANY_ECHO, WORLD_ADDR, PORTS["echo"], n, timeout=180)
    print(f"{n} concurrent echo connections in {res['seconds']:.2f}s")
    assert res["n_errors"] == 0, res["errors"]
    assert res["open_at_once"] == n and res["ok"] == n, res
