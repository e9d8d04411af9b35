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
   through the daemon; `tether ctl --admin sessions` while it runs; everything torn down.

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
            print("\nhost: (daemon mode - tether serve - needs root: run `make demo` as root to see it)")
        return code
    return daemon_act(tether)


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
