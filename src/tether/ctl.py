"""``tether ps`` and ``tether ctl``: find running sandboxes, ask them, render the answers.

Everything goes through a sandbox's control socket (``tether.control.ControlClient``); the
runtime directory (``tether.runtime``) says which sockets belong to live sandboxes.  Human output
is rich tables (aligned, no colour when not a terminal); ``--json`` output is stable for scripts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tether import __version__, runtime
from tether.control import ControlClient, ControlError

SOFTWARE = f"tether {__version__}"
PS_TIMEOUT = 2.0
PS_FIELDS = ("name", "pid", "engine", "uptime_s", "connections", "denied", "bytes_up", "bytes_down")


def list_sandboxes() -> list[dict]:
    """``status`` of every live sandbox the caller may see (a sandbox that does not answer in
    ``PS_TIMEOUT`` is listed with ``"error"``)."""
    rows = []
    for found in runtime.list_sockets(runtime.visible_directories()):
        if not found.alive:
            continue
        try:
            with ControlClient(found.socket_path, SOFTWARE, timeout=PS_TIMEOUT) as client:
                rows.append(client.call("status"))
        except ControlError as exc:
            rows.append({"name": found.name, "error": exc.message, "uid": found.owner_uid})
    return rows


ADMIN_PREFIX = "admin:"


def admin_target(runtime_dir: str) -> str:
    """The target string ``connect`` reads as the daemon's admin socket in ``runtime_dir``."""
    return ADMIN_PREFIX + str(Path(runtime_dir) / "admin.sock")


def connect(name: str, timeout: float | None = 10.0) -> ControlClient:
    """A sandbox by name, or the daemon (``admin_target``)."""
    if name.startswith(ADMIN_PREFIX):
        return ControlClient(name[len(ADMIN_PREFIX):], SOFTWARE, timeout=timeout)
    return ControlClient(runtime.find(name), SOFTWARE, timeout=timeout)


def call(name: str, method: str, params: dict | None = None) -> Any:
    with connect(name) as client:
        return client.call(method, params)


def events(name: str, follow: bool, backlog: int) -> Iterator[dict]:
    with connect(name, timeout=None if follow else 10.0) as client:
        yield from client.stream("events", {"follow": follow, "backlog": backlog})


def stop(name: str, timeout: float) -> bool:
    """Ask ``name`` to stop; True once it is gone (waits up to ``timeout`` + 5 s)."""
    path = runtime.find(name)
    with ControlClient(path, SOFTWARE) as client:
        client.call("stop", {"timeout": timeout})
    lock = path.with_suffix(runtime.LOCK_SUFFIX)
    deadline = time.monotonic() + timeout + 5.0
    while time.monotonic() < deadline:
        if not runtime.is_locked(lock):
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------------------------
# rendering


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _table(columns: list[tuple[str, str]], rows: list[list[str]]) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for title, justify in columns:
        table.add_column(title, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*row)
    console = Console(width=400, highlight=False, no_color=True)
    with console.capture() as capture:
        console.print(table)
    return "\n".join(line.rstrip() for line in capture.get().splitlines())


def render_ps(rows: list[dict]) -> str:
    columns = [("NAME", "left"), ("PID", "right"), ("ENGINE", "left"), ("UPTIME", "right"), ("CONNS", "right"),
               ("DENIED", "right"), ("UP", "right"), ("DOWN", "right")]
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["name"], "?", "?", "?", "?", "?", "?", f"({r['error']})"])
        else:
            out.append([r["name"], str(r["pid"]), r["engine"], human_duration(r["uptime_s"]), str(r["connections"]),
                        str(r["denied"]), human_bytes(r["bytes_up"]), human_bytes(r["bytes_down"])])
    return _table(columns, out)


def render_sessions(rows: list[dict]) -> str:
    columns = [("NAME", "left"), ("STATE", "left"), ("ENGINE", "left"), ("ENGINE STATE", "left"), ("PID", "right"),
               ("RESTARTS", "right"), ("UPTIME", "right"), ("CONNS", "right"), ("DENIED", "right"), ("UP", "right"),
               ("DOWN", "right")]
    table = []
    for row in rows:
        live = row.get("state") not in ("waiting", None)
        table.append([row["name"], row.get("state", "?"), row.get("engine", "?"),
                      row.get("engine_state", "") if live else "", str(row.get("target_pid") or row.get("peer_pid") or "")
                      if live else "", str(row.get("restarts", "")) if live else "",
                      human_duration(row["uptime_s"]) if live else "", str(row.get("connections", "")),
                      str(row.get("denied", "")), human_bytes(row["bytes_up"]) if "bytes_up" in row else "",
                      human_bytes(row["bytes_down"]) if "bytes_down" in row else ""])
    return _table(columns, table)


def render_wg(show: dict) -> str:
    """``wg show``'s layout: the interface, then each peer."""
    lines = ["interface: tun0", f"  public key: {show.get('public_key', '?')}"]
    if show.get("listen_port"):
        lines.append(f"  listening port: {show['listen_port']}")
    lines.append("")
    for peer in show.get("peers", []):
        handshake = peer.get("latest_handshake")
        when = f"{human_duration(max(0.0, time.time() - handshake))} ago" if handshake else "(none)"
        lines += [f"peer: {peer['public_key']}", f"  endpoint: {peer.get('endpoint') or '(none)'}",
                  f"  allowed ips: {', '.join(peer.get('allowed_ips', [])) or '(none)'}",
                  f"  latest handshake: {when}",
                  f"  transfer: {human_bytes(peer.get('rx_bytes', 0))} received, "
                  f"{human_bytes(peer.get('tx_bytes', 0))} sent"]
        if peer.get("persistent_keepalive"):
            lines.append(f"  persistent keepalive: every {peer['persistent_keepalive']} seconds")
        lines.append("")
    return "\n".join(lines).rstrip()


def render_connections(rows: list[dict]) -> str:
    columns = [("PROTO", "left"), ("SOURCE", "left"), ("DESTINATION", "left"), ("NAME", "left"), ("STATE", "left"),
               ("AGE", "right"), ("UP", "right"), ("DOWN", "right"), ("RULE", "left")]
    return _table(columns, [[r["proto"], r["src"], r["dst"], r.get("name", ""), r["state"], human_duration(r["age_s"]),
                             human_bytes(r["bytes_up"]), human_bytes(r["bytes_down"]), r["rule"]] for r in rows])


def render_ports(rows: list[dict]) -> str:
    columns = [("PROTO", "left"), ("HOST", "left"), ("SANDBOX PORT", "right"), ("ACCEPTED", "right")]
    return _table(columns, [[r["proto"], r["key"].split("/")[0], str(r["sandbox_port"]), str(r["accepted"])]
                            for r in rows])


def render_event(ev: dict) -> str:
    """One audit event as one line: time, event, protocol, source -> destination, rule, bytes."""
    line = (f"{ev.get('ts', '?')} {ev.get('event', '?'):<7} {ev.get('proto', '?'):<4} "
            f"{ev.get('src', '?')} -> {ev.get('dst', '?')}"
            + (f" ({ev['name']})" if ev.get("name") else "")
            + f" {ev.get('verdict', '?')} by {ev.get('rule', '?')}")
    if ev.get("event") == "close":
        line += f" up {human_bytes(ev.get('bytes_up', 0))} down {human_bytes(ev.get('bytes_down', 0))}"
    if ev.get("reason"):
        line += f": {ev['reason']}"
    return line


def render_policy(policy: dict) -> str:
    head = f"default: {policy['default']}" + (f"  (file {policy['file']})" if policy.get("file") else "")
    if not policy["rules"]:
        return head + "\n(no rules)"
    return head + "\n" + _table([("#", "right"), ("ACTION", "left"), ("RULE", "left"), ("MATCHES", "left")],
                                [[str(i), r["action"], r["rule"], r["match"]] for i, r in enumerate(policy["rules"], 1)])


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
