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
@click.option("--name", metavar="NAME", help="Sandbox name (audit events; default sbx-PID).")
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
                      **options)  # type: ignore[arg-type]
    try:
        code = run_sandbox(opts)
    except RunError as exc:
        click.echo(f"tether: {exc}", err=True)
        if exc.hint:
            click.echo(f"  hint: {exc.hint}", err=True)
        sys.exit(EXIT_USAGE)
    sys.exit(code)


if __name__ == "__main__":
    main()
