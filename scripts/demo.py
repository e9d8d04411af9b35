#!/usr/bin/env python3
"""Self-contained demo of `tether run` (needs nothing but loopback).

1. starts an HTTP server on the host's 127.0.0.1 (random port);
2. runs a sandboxed client that fetches a page from it through `--allow-host PORT`
   (the sandbox sees it as 10.0.2.2:PORT);
3. shows refusals: the host port without --allow-host, a private address, the host's loopback;
   all are refused inside the sandbox's own kernel, nothing leaves the machine;
4. prints the audit log;
5. runs a sandboxed server published on the host with `-p`: a client on the host's loopback
   talks to it, the server sees the client's real address; `tether ps` and
   `tether ctl NAME connections` show it running, `tether ctl NAME stop` ends it;
6. as root, daemon mode: `tether serve` with a one-container config, a "container" (a network
   namespace of the demo's own) attached with `tether attach`, which fetches the same page
   through the daemon; `tether ctl --admin sessions` while it runs; everything torn down;
7. as root, a per-app VPN: `tether run --wireguard wg0.conf` (rootless when the test user exists)
   against Debian's wireguard-go as the peer, in two network namespaces of the demo's own (the
   "host" where tether runs, and a "world" with the peer and a web server behind it): the page
   comes through the tunnel, the world's own address is unreachable (no route but the tunnel),
   and `tether ctl NAME wg show` shows the peer; everything torn down.

Run with `make demo` (as root it runs the sandbox as the unprivileged test user when that user
exists, to show the rootless path; as a normal user it runs as you).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading

CLIENT = r"""
import socket, sys, urllib.request
port = int(sys.argv[1])
print("inside: uid", __import__("os").getuid(), "| interfaces:", sorted(i[1] for i in socket.if_nameindex()))
body = urllib.request.urlopen(f"http://10.0.2.2:{port}/hello.txt", timeout=5).read().decode().strip()
print(f"inside: GET http://10.0.2.2:{port}/hello.txt -> {body!r}")
for host, p, why in (("10.0.2.2", port + 1, "host port not published"),
                     ("192.168.1.1", 80, "private range"),
                     ("127.0.0.1", port, "the sandbox's own loopback: the host server is not there")):
    try:
        socket.create_connection((host, p), timeout=5).close()
        print(f"inside: connect {host}:{p} -> connected ({why})")
    except OSError as exc:
        print(f"inside: connect {host}:{p} -> {exc.strerror or exc} ({why})")
"""


def main() -> int:
    tether = shutil.which("tether", path=os.path.dirname(sys.executable)) or shutil.which("tether")
    if tether is None:
        print("demo: `tether` not found; run `make demo` (it installs it)", file=sys.stderr)
        return 2
    user = None
    if os.getuid() == 0:
        try:
            user = pwd.getpwnam(os.environ.get("TETHER_TEST_USER", "tether-test")).pw_name
        except KeyError:
            pass
    with tempfile.TemporaryDirectory(prefix="tether-demo-") as workdir:
        os.chmod(workdir, 0o755)
        server, port = _serve_hello(workdir, "hello from the host\n")
        log = os.path.join(workdir, "events.jsonl")
        open(log, "w").close()
        os.chmod(log, 0o666)
        command = [tether, "run", "--allow-host", str(port), "--log", log, "--",
                   "/usr/bin/python3", "-c", CLIENT, str(port)]
        if user:
            command = ["runuser", "-u", user, "--"] + command
        print(f"host: HTTP server on 127.0.0.1:{port}" + (f"; sandbox runs as user {user}" if user else ""))
        print("host: $ " + " ".join(command[:-4]) + " python3 client.py")
        result = subprocess.run(command, cwd=workdir, timeout=60)
        server.shutdown()
        print(f"host: tether exited with {result.returncode}")
        print("host: audit log:")
        with open(log) as f:
            for line in f:
                event = json.loads(line)
                print(f"  {event['event']:7} {event['verdict']:5} {event['dst']:22} rule={event['rule']:<18}"
                      f" up={event['bytes_up']} down={event['bytes_down']}")
        if result.returncode != 0:
            return result.returncode
    code = publish_act(tether, user)
    if code != 0 or os.getuid() != 0:
        if os.getuid() != 0:
            print("\nhost: (daemon mode - tether serve - and the WireGuard act build network namespaces: "
                  "run `make demo` as root to see them)")
        return code
    code = daemon_act(tether)
    if code != 0:
        return code
    return wireguard_act(tether, user)


SERVER = r"""
import socket
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", 80)); ls.listen()
print("inside: web server listening on 127.0.0.1:80", flush=True)
while True:
    conn, peer = ls.accept()
    conn.recv(1024)
    conn.sendall(f"hello {peer[0]}:{peer[1]}, this is the sandbox\n".encode())
    conn.recv(1024)  # stay connected until the client leaves, so ctl can list it
    conn.close()
"""


def publish_act(tether: str, user: str | None) -> int:
    """A sandboxed server behind -p, watched and stopped with tether ps / ctl."""
    import socket
    import time

    with socket.socket() as probe:  # a free host port for -p
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    name = f"demo-{os.getpid()}"
    as_user = ["runuser", "-u", user, "--"] if user else []
    command = as_user + [tether, "run", "--name", name, "-p", f"{port}:80", "--", "/usr/bin/python3", "-c", SERVER]
    print()
    print("host: $ " + " ".join(command[:-2]) + " server.py")
    sandbox = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        print(sandbox.stdout.readline().rstrip())
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.sendall(b"hi")
            print(f"host: client {client.getsockname()[0]}:{client.getsockname()[1]} -> 127.0.0.1:{port} got: "
                  f"{client.recv(1024).decode().strip()!r}")
            for args in (["ps"], ["ctl", name, "connections"]):
                print("host: $ tether " + " ".join(args))
                out = subprocess.run(as_user + [tether, *args], capture_output=True, text=True, timeout=30)
                print("\n".join("  " + line for line in (out.stdout + out.stderr).rstrip().splitlines()))
        time.sleep(0.2)
        print(f"host: $ tether ctl {name} stop")
        out = subprocess.run(as_user + [tether, "ctl", name, "stop", "--timeout", "2"], capture_output=True,
                             text=True, timeout=30)
        print("  " + (out.stdout + out.stderr).strip())
        code = sandbox.wait(timeout=30)
        print(f"host: tether exited with {code} (the server died of SIGTERM: 128+15)")
        return 0 if code == 143 and out.returncode == 0 else 1
    finally:
        if sandbox.poll() is None:
            sandbox.kill()
            sandbox.wait()


DAEMON_CLIENT = r"""
import socket, sys, urllib.request
port = int(sys.argv[1])
print("container: interfaces:", sorted(i[1] for i in socket.if_nameindex()))
body = urllib.request.urlopen(f"http://10.0.2.2:{port}/hello.txt", timeout=5).read().decode().strip()
print(f"container: GET http://10.0.2.2:{port}/hello.txt -> {body!r}")
try:
    socket.create_connection(("192.168.1.1", 80), timeout=5).close()
except OSError as exc:
    print(f"container: connect 192.168.1.1:80 -> {exc.strerror} (default deny)")
"""


def daemon_act(tether: str) -> int:
    """Daemon mode: tether serve, a container netns attached with tether attach, ctl --admin."""
    import time

    with tempfile.TemporaryDirectory(prefix="tether-demo-daemon-") as workdir:
        server, port = _serve_hello(workdir, "hello from the host, through the daemon\n")
        config = os.path.join(workdir, "tether.toml")
        with open(config, "w") as f:
            f.write(f'[container.web]\ndefault = "deny"\nallow_host = [{port}]\n')
        run_dir = os.path.join(workdir, "run")
        netns = f"tether-demo-{os.getpid()}"
        print()
        print(f"host: {config}:\n  " + open(config).read().strip().replace("\n", "\n  "))
        print(f"host: $ tether serve --config {config} --runtime-dir {run_dir} &")
        daemon = subprocess.Popen([tether, "serve", "--config", config, "--runtime-dir", run_dir, "--log",
                                   os.path.join(workdir, "daemon.jsonl")])
        subprocess.run(["ip", "netns", "add", netns], check=True)
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(os.path.join(run_dir, "web.sock")) and time.monotonic() < deadline:
                time.sleep(0.05)
            attach = ["ip", "netns", "exec", netns, tether, "attach", "--socket", os.path.join(run_dir, "web.sock"),
                      "--", "/usr/bin/python3", "-c", DAEMON_CLIENT, str(port)]
            print(f"host: $ ip netns exec {netns} tether attach --socket {run_dir}/web.sock -- python3 client.py")
            client = subprocess.run(attach, timeout=60)
            print(f"host: $ tether ctl --admin --runtime-dir {run_dir} sessions")
            out = subprocess.run([tether, "ctl", "--admin", "--runtime-dir", run_dir, "sessions"],
                                 capture_output=True, text=True, timeout=30)
            print("\n".join("  " + line for line in (out.stdout + out.stderr).rstrip().splitlines()))
            time.sleep(0.3)  # the session's teardown (the client has exited) finishes
            print("host: the daemon's log:")
            with open(os.path.join(workdir, "daemon.jsonl")) as f:
                for line in f:
                    event = json.loads(line)
                    detail = event.get("dst") or event.get("reason") or event.get("engine") or ""
                    print(f"  {event['sandbox']:4} {event['event']:13} {detail}")
            return client.returncode
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)
            subprocess.run(["ip", "netns", "del", netns], check=False)
            server.shutdown()
            print(f"host: daemon stopped (exit {daemon.returncode}); the container's netns removed")


VPN_CLIENT = r"""
import socket, sys, urllib.request
body = urllib.request.urlopen("http://10.99.0.1:8080/hello.txt", timeout=10).read().decode().strip()
print(f"inside: GET http://10.99.0.1:8080/hello.txt (through the tunnel) -> {body!r}")
try:
    socket.create_connection(("192.0.2.2", 8080), timeout=3).close()
    print("inside: connect 192.0.2.2:8080 (the world, outside the tunnel) -> connected")
except OSError as exc:
    print(f"inside: connect 192.0.2.2:8080 (the world, outside the tunnel) -> {exc.strerror or exc}")
print("inside: ready", flush=True)
sys.stdin.read()  # until the demo has shown `ctl wg show`
"""


def wireguard_act(tether: str, user: str | None) -> int:
    """A per-app VPN: tether run --wireguard against a wireguard-go peer, all in the demo's own
    two network namespaces (192.0.2.1 <-> 192.0.2.2 on a veth; the tunnel is 10.99.0.0/24)."""
    import secrets

    if not (shutil.which("wireguard-go") and shutil.which("wg")):
        print("\nhost: (the WireGuard act needs wireguard-go and wg: `make deps` installs them)")
        return 0
    tag = secrets.token_hex(3)
    host_ns, world_ns, peer_if = f"tether-demo-h{tag}", f"tether-demo-w{tag}", f"tdwg{tag}"
    procs: list[subprocess.Popen] = []

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True)

    def keypair() -> tuple[str, str]:
        private = subprocess.run([tether, "wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
        public = subprocess.run([tether, "wg", "pubkey"], input=private, capture_output=True, text=True,
                                check=True).stdout.strip()
        return private, public

    print()
    with tempfile.TemporaryDirectory(prefix="tether-demo-wg-") as workdir:
        os.chmod(workdir, 0o755)
        try:
            ip("netns", "add", host_ns)
            ip("netns", "add", world_ns)
            ip("-n", host_ns, "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", world_ns)
            for ns, address in ((host_ns, "192.0.2.1/24"), (world_ns, "192.0.2.2/24")):
                ip("-n", ns, "addr", "add", address, "dev", "veth0")
                ip("-n", ns, "link", "set", "veth0", "up")
                ip("-n", ns, "link", "set", "lo", "up")
            # The peer: wireguard-go in the world, 10.99.0.1/24 on its tun, UDP 192.0.2.2:51820.
            peer_private, peer_public = keypair()
            our_private, our_public = keypair()
            key_file = os.path.join(workdir, "peer.key")
            with open(os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(peer_private + "\n")
            procs.append(subprocess.Popen(["ip", "netns", "exec", world_ns, "wireguard-go", "-f", peer_if],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _wait_for(lambda: os.path.exists(f"/var/run/wireguard/{peer_if}.sock"), "wireguard-go's socket")
            ip("-n", world_ns, "addr", "add", "10.99.0.1/24", "dev", peer_if)
            ip("-n", world_ns, "link", "set", peer_if, "mtu", "1420", "up")
            subprocess.run(["wg", "set", peer_if, "listen-port", "51820", "private-key", key_file, "peer",
                            our_public, "allowed-ips", "10.99.0.2/32"], check=True)
            with open(os.path.join(workdir, "hello.txt"), "w") as f:
                f.write("hello from behind the VPN\n")
            procs.append(subprocess.Popen(["ip", "netns", "exec", world_ns, "/usr/bin/python3", "-m", "http.server",
                                           "--bind", "10.99.0.1", "--directory", workdir, "8080"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            conf = os.path.join(workdir, "wg0.conf")
            with open(os.open(conf, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(f"[Interface]\nPrivateKey = {our_private}\nAddress = 10.99.0.2/24\n\n[Peer]\n"
                        f"PublicKey = {peer_public}\nEndpoint = 192.0.2.2:51820\nAllowedIPs = 10.99.0.0/24\n")
            as_user = ["runuser", "-u", user, "--"] if user else []
            if user:
                shutil.chown(conf, user)
            print(f"host: {conf} (keys from `tether wg genkey | tether wg pubkey`):")
            print("  [Interface] Address = 10.99.0.2/24   [Peer] Endpoint = 192.0.2.2:51820, AllowedIPs = 10.99.0.0/24")
            print(f"host: the peer is wireguard-go in netns {world_ns}; a web server listens on 10.99.0.1:8080")
            name = f"demo-vpn-{tag}"
            print(f"host: $ tether run --name {name} --wireguard wg0.conf -- python3 client.py"
                  + (f"   (as {user}, in netns {host_ns})" if user else f"   (in netns {host_ns})"))
            run = subprocess.Popen(["ip", "netns", "exec", host_ns, *as_user, tether, "run", "--name", name,
                                    "--wireguard", conf, "--", "/usr/bin/python3", "-c", VPN_CLIENT],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(run)
            for line in run.stdout:
                if line.strip() == "inside: ready":
                    break
                print(line, end="")
            print(f"host: $ tether ctl {name} wg show")
            shown = subprocess.run([*as_user, tether, "ctl", name, "wg", "show"], capture_output=True, text=True,
                                   timeout=30)
            print("\n".join("  " + line for line in (shown.stdout + shown.stderr).rstrip().splitlines()))
            run.stdin.close()
            code = run.wait(timeout=30)
            print(f"host: tether exited with {code}")
            return code
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            for ns in (host_ns, world_ns):
                subprocess.run(["ip", "netns", "del", ns], check=False, stderr=subprocess.DEVNULL)
            print("host: the VPN act's namespaces, wireguard-go and web server removed")


def _wait_for(ready, what: str, timeout: float = 10) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _serve_hello(directory: str, text: str) -> tuple[http.server.ThreadingHTTPServer, int]:
    """An HTTP server on the host's 127.0.0.1 (free port) serving ``text`` as /hello.txt."""
    with open(os.path.join(directory, "hello.txt"), "w") as f:
        f.write(text)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=directory))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    sys.exit(main())
