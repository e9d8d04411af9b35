"""Command line: parse, call, print.  No logic lives here."""

from __future__ import annotations

import sys

import click

from tether import __version__

RULE_HELP = ("CIDR or ADDR, optionally :PORT or :LO-HI, optionally prefixed tcp:// or udp://; "
             "IPv6 in brackets when a port follows. Repeatable.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tether")
def main() -> None:
    """Give a process exactly the network its owner allows."""


@main.command(context_settings={"allow_interspersed_args": False})
@click.option("--allow", "allow", multiple=True, metavar="RULE", help="Allow destinations. " + RULE_HELP)
@click.option("--deny", "deny", multiple=True, metavar="RULE", help="Deny destinations (beats --allow). " + RULE_HELP)
@click.option("--default", "default", type=click.Choice(["allow", "deny"]), default=None,
              help="Verdict when no rule matches [allow: public unicast; loopback, link-local, private, "
                   "CGNAT, multicast and the host's own addresses stay denied].")
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False), metavar="FILE.toml",
              help="Rules from a TOML file: default = \"deny\", allow = [...], deny = [...].")
@click.option("--allow-host", "allow_host", multiple=True, type=int, metavar="PORT",
              help="Make the host's 127.0.0.1:PORT reachable as 10.0.2.2:PORT. Repeatable.")
@click.option("--log", "log", metavar="PATH", help="Write every connection decision as JSON lines (- for stderr).")
@click.option("--connect-timeout", type=click.FloatRange(min=0.1, max=3600), default=10.0, show_default=True,
              metavar="SECONDS", help="Give up dialling a destination after this long (the sandboxed client gets a reset).")
@click.option("--dns", "dns", multiple=True, metavar="ADDR",
              help="Resolver the DNS stub forwards to (repeatable; default: the host's /etc/resolv.conf).")
@click.option("--dns-deny", type=click.Choice(["refused", "nxdomain"]), default="refused", show_default=True,
              help="Answer for names the policy denies (with an Extended DNS Error naming the rule).")
@click.option("--dns-passthrough", is_flag=True,
              help="Relay DNS sent to other servers (subject to IP policy) instead of answering it from the stub.")
@click.option("--udp-timeout", type=click.FloatRange(min=0.5, max=86400), default=60.0, show_default=True,
              metavar="SECONDS", help="Close a UDP flow after this long without traffic (DNS flows: at most 30 s).")
@click.option("--ipv4-only", is_flag=True, help="No IPv6 in the sandbox (IPv6 connections fail with ENETUNREACH).")
@click.option("--ipv6-only", is_flag=True, help="No IPv4 in the sandbox (IPv4 connections fail with ENETUNREACH).")
@click.option("--mtu", type=int, default=65520, show_default=True, help="MTU of the sandbox's tun0.")
@click.option("--root", "map_root", is_flag=True, help="Map your uid to 0 inside the sandbox.")
@click.option("--name", metavar="NAME",
              help="Sandbox name: audit events, tether ps, tether ctl NAME (default sbx-PID).")
@click.option("-p", "--publish", "publish", multiple=True, metavar="[HOSTADDR:]HOSTPORT:SANDBOXPORT[/tcp|/udp]",
              help="Publish a sandbox port on the host (default address 127.0.0.1); ranges 8000-8010:8000-8010. "
                   "The sandboxed server sees each client's real address. Repeatable.")
@click.option("--listen", "listen", multiple=True, metavar="[ADDR:]PORT",
              help="Listen on the host (default address 127.0.0.1) and hand the socket to CMD as "
                   "fd 3, 4, ... with LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES (systemd socket activation). Repeatable.")
@click.option("--wireguard", "wireguard", type=click.Path(dir_okay=False), metavar="FILE.conf",
              help="Send everything through this WireGuard tunnel (a wg-quick file): the sandbox gets its "
                   "addresses, routes and DNS, and nothing leaves except through the tunnel.")
@click.option("-v", "--verbose", is_flag=True, help="Say what is being set up.")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- CMD [ARGS]...")
def run(argv: tuple[str, ...], **options: object) -> None:
    """Run CMD in a rootless network sandbox whose every TCP connection is checked and relayed.

    Exits with CMD's exit status (128+N if CMD died of signal N), or 2 if the sandbox could not
    be set up (bad rule, missing prerequisite).
    """
    from tether.runner import EXIT_USAGE, RunError, RunOptions, run as run_sandbox

    opts = RunOptions(argv=list(argv), allow=list(options.pop("allow")), deny=list(options.pop("deny")),
                      allow_host=list(options.pop("allow_host")), dns=list(options.pop("dns")),
                      listen=list(options.pop("listen")), publish=list(options.pop("publish")),
                      **options)  # type: ignore[arg-type]
    try:
        code = run_sandbox(opts)
    except RunError as exc:
        click.echo(f"tether: {exc}", err=True)
        if exc.hint:
            click.echo(f"  hint: {exc.hint}", err=True)
        sys.exit(EXIT_USAGE)
    sys.exit(code)


def _fail(exc: Exception) -> None:
    """A ctl/ps failure the user can act on: one line (plus the hint), exit 1."""
    click.echo(f"tether: {exc}", err=True)
    hint = getattr(exc, "hint", None)
    if hint:
        click.echo(f"  hint: {hint}", err=True)
    sys.exit(1)


def _ctl_errors():
    from tether.control import ControlError
    from tether.errors import TetherError

    return (ControlError, TetherError)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="A JSON list of objects, one per sandbox.")
def ps(as_json: bool) -> None:
    """List your running sandboxes (root: everyone's)."""
    from tether import ctl

    try:
        rows = ctl.list_sandboxes()
    except _ctl_errors() as exc:
        _fail(exc)
    click.echo(ctl.dumps(rows) if as_json else ctl.render_ps(rows))


class _CtlGroup(click.Group):
    """``tether ctl NAME COMMAND`` for a sandbox; ``tether ctl --admin [--runtime-dir DIR] COMMAND``
    for the daemon: the admin form has no NAME, so a placeholder takes its place before parsing."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args[:1] == ["--admin"]:
            rest = args[1:]
            options: list[str] = []
            while rest[:1] and rest[0].startswith("--runtime-dir"):
                take = 1 if "=" in rest[0] else 2
                options, rest = options + rest[:take], rest[take:]
            args = ["--admin", *options, ADMIN_TARGET, *rest]
        return super().parse_args(ctx, args)


ADMIN_TARGET = ":admin"  # never a valid sandbox name


@main.group(cls=_CtlGroup)
@click.option("--admin", is_flag=True, help="Control the daemon (tether serve) instead of a sandbox: "
                                            "tether ctl --admin sessions|events|attach|detach|reload.")
@click.option("--runtime-dir", metavar="DIR", default="/run/tether", show_default=True,
              help="With --admin: where the daemon's admin.sock is.")
@click.argument("name")
@click.pass_context
def ctl(ctx: click.Context, admin: bool, runtime_dir: str, name: str) -> None:
    """Observe and control the running sandbox NAME (tether run --name NAME): tether ctl NAME COMMAND.

    With --admin (no NAME): the daemon, through its admin socket."""
    from tether import ctl as c

    if admin != (name == ADMIN_TARGET):
        raise click.UsageError("--admin comes first and takes no NAME: tether ctl --admin COMMAND")
    ctx.obj = c.admin_target(runtime_dir) if admin else name


@ctl.command()
@click.option("--json", "as_json", is_flag=True, help="A JSON list of objects, one per connection.")
@click.pass_obj
def connections(name: str, as_json: bool) -> None:
    """Live connections and UDP flows of NAME, with age and bytes."""
    from tether import ctl as c

    try:
        rows = c.call(name, "connections")["connections"]
    except _ctl_errors() as exc:
        _fail(exc)
    click.echo(c.dumps(rows) if as_json else c.render_connections(rows))


@ctl.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events until interrupted.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (the audit log's format).")
@click.option("--backlog", type=click.IntRange(0, 1000), default=100, show_default=True,
              help="How many recent events to print first.")
@click.pass_obj
def events(name: str, follow: bool, as_json: bool, backlog: int) -> None:
    """Audit events of NAME: the recent ones, then (--follow) new ones as they happen."""
    from tether import ctl as c

    try:
        for ev in c.events(name, follow, backlog):
            click.echo(c.dumps(ev) if as_json else c.render_event(ev))
    except KeyboardInterrupt:
        pass
    except _ctl_errors() as exc:
        if follow and getattr(exc, "code", None) == "closed":
            return  # the sandbox ended: the stream is complete
        _fail(exc)


@ctl.group()
def policy() -> None:
    """Show or reload NAME's policy."""


@policy.command("show")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def policy_show(name: str, as_json: bool) -> None:
    """The default and the rules in evaluation order (first match wins)."""
    from tether import ctl as c

    try:
        result = c.call(name, "policy.show")
    except _ctl_errors() as exc:
        _fail(exc)
    click.echo(c.dumps(result) if as_json else c.render_policy(result))


@policy.command("reload")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def policy_reload(name: str, as_json: bool) -> None:
    """Re-read NAME's --policy FILE: new connections and flows follow it, live ones stay."""
    from tether import ctl as c

    try:
        result = c.call(name, "policy.reload")
    except _ctl_errors() as exc:
        _fail(exc)
    click.echo(c.dumps(result) if as_json else
               f"tether: {name}: policy reloaded from {result['file']} (default {result['default']}, "
               f"{result['rules']} rules)")


@ctl.group("wg")
def ctl_wg() -> None:
    """NAME's WireGuard tunnel (tether run --wireguard)."""


@ctl_wg.command("show")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def wg_show(name: str, as_json: bool) -> None:
    """Peers, endpoints, latest handshake, transfer (keys shown as public keys only)."""
    from tether import ctl as c

    try:
        result = c.call(name, "wg.show")
    except _ctl_errors() as exc:
        _fail(exc)
    click.echo(c.dumps(result) if as_json else c.render_wg(result))


@ctl.group()
def ports() -> None:
    """List, add or remove NAME's published ports."""


@ports.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def ports_list(name: str, as_json: bool) -> None:
    """Published ports: host address and port, sandbox port, connections accepted."""
    from tether import ctl as c

    try:
        rows = c.call(name, "ports.list")["ports"]
    except _ctl_errors() as exc:
        _fail(exc)
    click.echo(c.dumps(rows) if as_json else c.render_ports(rows))


@ports.command("add")
@click.argument("spec", metavar="[HOSTADDR:]HOSTPORT:SANDBOXPORT[/tcp|/udp]")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def ports_add(name: str, spec: str, as_json: bool) -> None:
    """Publish another port while NAME runs."""
    from tether import ctl as c

    try:
        result = c.call(name, "ports.add", {"spec": spec})
    except _ctl_errors() as exc:
        _fail(exc)
    click.echo(c.dumps(result) if as_json else f"tether: {name}: published {', '.join(result['added'])}")


@ports.command("rm")
@click.argument("port", metavar="[HOSTADDR:]HOSTPORT[/tcp|/udp]")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def ports_rm(name: str, port: str, as_json: bool) -> None:
    """Stop publishing a port (connections in progress stay)."""
    from tether import ctl as c

    try:
        result = c.call(name, "ports.rm", {"port": port})
    except _ctl_errors() as exc:
        _fail(exc)
    click.echo(c.dumps(result) if as_json else f"tether: {name}: unpublished {', '.join(result['removed'])}")


@ctl.command()
@click.option("--timeout", type=click.FloatRange(0, 3600), default=10.0, show_default=True, metavar="SECONDS",
              help="SIGKILL the sandbox if CMD has not exited this long after SIGTERM.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def stop(name: str, timeout: float, as_json: bool) -> None:
    """Stop NAME gracefully: SIGTERM to CMD, SIGKILL after --timeout; returns once it is gone."""
    from tether import ctl as c

    try:
        gone = c.stop(name, timeout)
    except _ctl_errors() as exc:
        _fail(exc)
    if not gone:
        _fail(RuntimeError(f"sandbox {name!r} is still running {timeout + 5:g} s after the stop request"))
    click.echo(c.dumps({"name": name, "stopped": True}) if as_json else f"tether: stopped {name}")


@ctl.command()
@click.option("--json", "as_json", is_flag=True, help="A JSON list of objects, one per container.")
@click.pass_obj
def sessions(target: str, as_json: bool) -> None:
    """(--admin) Every configured container: session state, engine, restarts, traffic."""
    from tether import ctl as c

    try:
        rows = c.call(target, "sessions")["sessions"]
    except _ctl_errors() as exc:
        _fail(exc)
    click.echo(c.dumps(rows) if as_json else c.render_sessions(rows))


@ctl.command()
@click.argument("container")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def detach(target: str, container: str, as_json: bool) -> None:
    """(--admin) End CONTAINER's session: engine stopped, its netns unconfigured."""
    from tether import ctl as c

    try:
        result = c.call(target, "detach", {"name": container})
    except _ctl_errors() as exc:
        _fail(exc)
    click.echo(c.dumps(result) if as_json else f"tether: detached {container}")


@ctl.command("attach")
@click.option("--pid", type=click.IntRange(min=1), required=True, help="A process in the container's netns.")
@click.option("--name", "container", required=True, help="The configured container to attach it as.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def admin_attach(target: str, pid: int, container: str, as_json: bool) -> None:
    """(--admin) Give the netns of process PID the network of configured container NAME; the
    session lives until that process exits (or detach)."""
    from tether import ctl as c

    try:
        result = c.call(target, "attach", {"name": container, "pid": pid})
    except _ctl_errors() as exc:
        _fail(exc)
    click.echo(c.dumps(result) if as_json else
               f"tether: attached pid {pid} as {container} ({result['interface']}, {', '.join(result['addresses'])})")


@ctl.command("reload")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def admin_reload(target: str, as_json: bool) -> None:
    """(--admin) Re-read the daemon's config, as SIGHUP does."""
    from tether import ctl as c

    try:
        result = c.call(target, "reload")
    except _ctl_errors() as exc:
        _fail(exc)
    if as_json:
        click.echo(c.dumps(result))
    elif not result.get("ok"):
        _fail(RuntimeError("the config has errors; the running one stays:\n  " + "\n  ".join(result["errors"])))
    else:
        done = [f"{k}: {', '.join(v)}" for k, v in result.items() if k != "ok" and v]
        click.echo("tether: config reloaded" + (f" ({'; '.join(done)})" if done else " (no changes)"))


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default="/etc/tether/tether.toml",
              show_default=True, help="The daemon's config (TOML).")
@click.option("--runtime-dir", metavar="DIR", default=None,
              help="Where admin.sock and NAME.sock are created [default: the config's daemon.runtime_dir].")
@click.option("--log", "log_path", metavar="PATH", help="Event log (JSON lines) [default: the config's daemon.log, "
                                                         "else stderr].")
@click.option("--check-config", is_flag=True, help="Validate the config, list every error, exit 0 or 2.")
def serve(config_path: str, runtime_dir: str | None, log_path: str | None, check_config: bool) -> None:
    """Run the host daemon that gives configured containers their network (root)."""
    from pathlib import Path

    from tether.config import ConfigError, load_config
    from tether.errors import TetherError

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        click.echo(f"tether: {config_path}: the config has errors:\n{exc}", err=True)
        sys.exit(2)
    if check_config:
        click.echo(f"tether: {config_path}: valid ({len(config.containers)} containers: "
                   f"{', '.join(config.containers) or 'none'})")
        return
    from tether.daemon.server import serve as run_daemon

    try:
        code = run_daemon(config, Path(runtime_dir) if runtime_dir else None, log_path)
    except TetherError as exc:
        _fail_usage(exc)
    sys.exit(code)


@main.command(context_settings={"allow_interspersed_args": False})
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), help="The container's socket "
              "(bind-mounted from the host's RUNTIME_DIR/NAME.sock).")
@click.option("--name", help="Instead of --socket: RUNTIME_DIR/NAME.sock.")
@click.option("--runtime-dir", metavar="DIR", default="/run/tether", show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="Do not report the configured network on stderr.")
@click.argument("argv", nargs=-1, type=click.UNPROCESSED, metavar="[-- CMD [ARGS]...]")
def attach(socket_path: str | None, name: str | None, runtime_dir: str, quiet: bool, argv: tuple[str, ...]) -> None:
    """Inside a container: have the daemon configure this network namespace, then exec CMD (without
    CMD: hold the session in the foreground until interrupted)."""
    from tether.daemon.client import attach as run_attach, socket_path as resolve
    from tether.errors import TetherError

    try:
        sys.exit(run_attach(resolve(runtime_dir, name, socket_path), list(argv), quiet))
    except TetherError as exc:
        _fail(exc)


@main.command("oci-hook")
@click.option("--name", required=True, help="The configured container this OCI container is.")
@click.option("--runtime-dir", metavar="DIR", default="/run/tether", show_default=True)
def oci_hook(name: str, runtime_dir: str) -> None:
    """OCI runtime hook (createRuntime: attach; poststop: detach); reads the state JSON on stdin."""
    from tether.daemon.client import oci_hook as run_hook, socket_path as resolve
    from tether.errors import TetherError

    try:
        report = run_hook(resolve(runtime_dir, name, None), sys.stdin.buffer.read())
    except TetherError as exc:
        _fail(exc)
    click.echo(f"tether: {report}", err=True)


@main.group()
def wg() -> None:
    """WireGuard key helpers, compatible with wg(8): tether wg genkey | tether wg pubkey."""


@wg.command()
def genkey() -> None:
    """Print a new private key (base64), as wg genkey."""
    from tether.engine.wireguard.keys import encode_key, generate_private_key

    click.echo(encode_key(generate_private_key()))


@wg.command()
def genpsk() -> None:
    """Print a new preshared key (base64), as wg genpsk."""
    from tether.engine.wireguard.keys import encode_key, generate_preshared_key

    click.echo(encode_key(generate_preshared_key()))


@wg.command()
def pubkey() -> None:
    """Read a private key on stdin, print its public key, as wg pubkey."""
    from tether.engine.wireguard.keys import BadKey, decode_key, encode_key, public_key

    try:
        private = decode_key(sys.stdin.read().strip())
    except BadKey as exc:
        click.echo(f"tether: the private key on stdin: {exc}", err=True)
        sys.exit(1)
    click.echo(encode_key(public_key(private)))


def _fail_usage(exc: Exception) -> None:
    click.echo(f"tether: {exc}", err=True)
    hint = getattr(exc, "hint", None)
    if hint:
        click.echo(f"  hint: {hint}", err=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
