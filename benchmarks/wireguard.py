#!/usr/bin/env python3
"""WireGuard benchmark (issue 6): tether's Python WireGuard engine against wireguard-go, same run.

Private topology (nothing here talks to a real network):

    netns twg-host-<id> 192.0.2.1/24  --veth-->  netns twg-world-<id> 192.0.2.2/24
      (a) tether run --wireguard conf               wireguard-go peer twgp<id>: 10.99.0.1/24,
          sandbox tun0 10.99.0.2/24                 listening on 192.0.2.2:51820
      (b) wireguard-go twgc<id>: 10.99.0.2/24       iperf3 -s and a 1-byte UDP echo server,
          (the reference, its own tun in this       both bound to 10.99.0.1
           netns; clients run in this netns)

Both contenders send their WireGuard datagrams from the host netns to the same peer, one at a time
(the peer's allowed-ips 10.99.0.2/32 is moved to the contender being measured).  Per contender:
iperf3 TCP both directions (-R), 3 runs each, round-robin, median of the receiver's rate; UDP
1-byte echo p50/p99; CPU time (utime+stime from /proc) of the contender's WireGuard process(es)
and of the peer over each iperf3 run, per Gbit moved.

Must run as root.  Everything it creates (namespaces, veths, wireguard-go processes and their
/var/run/wireguard sockets, tether, servers, the temporary directory) is removed on every exit
path, also on SIGTERM/SIGINT.  Writes benchmarks/results/wireguard-<UTC>[-quick].json and .png.
"""
from __future__ import annotations

import argparse
import atexit
import datetime as dt
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as R  # noqa: E402  (benchmarks/run.py: Reaper, sh, run, helpers; no import-time side effects)

REPO = R.REPO
RESULTS_DIR = R.RESULTS_DIR
HOST_IP, WORLD_LINK_IP = "192.0.2.1", "192.0.2.2"
PEER_TUN, CLIENT_TUN = "10.99.0.1", "10.99.0.2"
WG_PORT = 51820
IPERF_PORT = 5201
UDP_ECHO_PORT = 9008
MTU = 1420
TARGET_TPUT_RATIO = 2.0
TARGET_ECHO_RATIO = 1.2

REAPER = R.REAPER
HZ = os.sysconf("SC_CLK_TCK")

HOLD_PROG = "import sys; print('ready', flush=True); sys.stdin.read()"


def log(msg: str) -> None:
    print(f"[wg-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def proc_ticks(pid: int) -> tuple[int, int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return int(parts[11]), int(parts[12])   # utime, stime
    except (OSError, IndexError, ValueError):
        return 0, 0


def tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/*/stat ppid)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_us(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of pids."""
    t = [proc_ticks(p) for p in pids]
    return sum(u for u, _ in t) / HZ, sum(s for _, s in t) / HZ


def cpu_s(pids: list[int]) -> float:
    return sum(cpu_us(pids))


DEVICE_MICRO_N = 50000


def device_micro() -> dict:
    """The sans-IO device alone, in this process (no I/O): µs per 1420-byte packet (1400 bytes of
    TCP payload + IP header) to encrypt (tun_packet) and to decrypt (udp_datagram), after a
    handshake between two in-memory devices; and cryptography's ChaCha20-Poly1305 seal alone."""
    import ipaddress
    import struct
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from tether.engine.wireguard import crypto
    from tether.engine.wireguard.device import Device, PeerSpec
    from tether.engine.wireguard.keys import clamp, public_key
    ak, bk = clamp(crypto.digest(b"bench-a")), clamp(crypto.digest(b"bench-b"))
    a_addr, b_addr = ("192.0.2.1", 51820), ("192.0.2.2", 51820)
    a = Device(ak, [PeerSpec(public_key(bk), endpoint=b_addr, allowed_ips=("10.99.0.1/32",))])
    b = Device(bk, [PeerSpec(public_key(ak), allowed_ips=("10.99.0.2/32",))])
    pkt = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 1420, 0, 0, 64, 6, 0, ipaddress.IPv4Address("10.99.0.2").packed,
                      ipaddress.IPv4Address("10.99.0.1").packed) + bytes(1400)
    pending = list(a.tun_packet(pkt).datagrams)
    for _ in range(8):   # the handshake: initiation -> response -> the staged packet (+ keepalive)
        nxt = []
        for d, _ in pending:
            for d2, _ in b.udp_datagram(d, a_addr).datagrams:
                nxt += a.udp_datagram(d2, b_addr).datagrams
        pending = nxt
        if not pending:
            break
    n = DEVICE_MICRO_N
    t = time.perf_counter()
    dgs = []
    for _ in range(n):
        dgs += a.tun_packet(pkt).datagrams
    enc = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    got = sum(len(b.udp_datagram(d, a_addr).packets) for d, _ in dgs)
    dec = (time.perf_counter() - t) / max(1, len(dgs)) * 1e6
    c, nonce = ChaCha20Poly1305(bytes(32)), bytes(12)
    t = time.perf_counter()
    for _ in range(n):
        c.encrypt(nonce, pkt, None)
    raw = (time.perf_counter() - t) / n * 1e6
    return {"packets": n, "datagrams": len(dgs), "delivered": got, "encrypt_us_per_packet": enc,
            "decrypt_us_per_packet": dec, "chacha20poly1305_seal_us_per_packet": raw}


def wg_keys() -> tuple[str, str]:
    priv = R.sh(["wg", "genkey"]).stdout.strip()
    pub = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True, check=True).stdout.strip()
    return priv, pub


def start_wireguard_go(ns: str, name: str) -> subprocess.Popen:
    p = REAPER.popen(R.in_ns(ns) + ["wireguard-go", "-f", name], stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, env={"PATH": R.SAFE_PATH, "LOG_LEVEL": "error"}, cwd="/")
    end = time.monotonic() + 10
    while not os.path.exists(f"/var/run/wireguard/{name}.sock"):
        if p.poll() is not None or time.monotonic() > end:
            raise R.BenchError(f"wireguard-go {name} did not start (rc={p.poll()})")
        time.sleep(0.02)
    return p


class CpuWindow:
    """CPU time (user, system) of the engine's processes and the peer's, and the clock, read just
    before and just after what it brackets (the iperf3 client run)."""

    def __init__(self, engine: list[int], peer: list[int]) -> None:
        self.engine, self.peer = engine, peer

    def _read(self) -> tuple[tuple[float, float], float, float]:
        return cpu_us(self.engine), cpu_s(self.peer), time.monotonic()

    def __enter__(self) -> CpuWindow:
        self.start = self._read()
        return self

    def __exit__(self, *exc) -> None:
        self.end = self._read()


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.id = secrets.token_hex(3)
        self.host, self.world = f"twg-host-{self.id}", f"twg-world-{self.id}"
        self.peer_if, self.ref_if = f"twgp{self.id}", f"twgc{self.id}"
        self.tmp = Path(tempfile.mkdtemp(prefix="tether-wgbench-"))
        self.wg_names: list[str] = []
        self.peer_proc = self.ref_proc = self.tether_proc = None
        self.sandbox_pid = None
        self.user = R.RunAs(args.as_user)

    # -- cleanup -------------------------------------------------------------------------------
    def cleanup(self) -> None:
        if self.tether_proc is not None and self.tether_proc.poll() is None:
            try:  # let tether end its sandbox cleanly: close CMD's stdin
                self.tether_proc.stdin.close()
                self.tether_proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        REAPER.cleanup()
        for n in self.wg_names:
            try:
                os.unlink(f"/var/run/wireguard/{n}.sock")
            except FileNotFoundError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- topology -------------------------------------------------------------------------------
    def build(self) -> None:
        h, w = self.host, self.world
        REAPER.add_netns(h)
        REAPER.add_netns(w)
        hw, wh = f"twh{self.id}", f"tww{self.id}"
        R.sh(["ip", "-n", h, "link", "add", hw, "type", "veth", "peer", "name", wh, "netns", w])
        R.sh(["ip", "-n", h, "-b", "-"], input="\n".join([
            "link set lo up", f"addr add {HOST_IP}/24 dev {hw}", f"link set {hw} up", ""]))
        R.sh(["ip", "-n", w, "-b", "-"], input="\n".join([
            "link set lo up", f"addr add {WORLD_LINK_IP}/24 dev {wh}", f"link set {wh} up", ""]))
        # The peer: wireguard-go in the world.
        self.peer_priv, self.peer_pub = wg_keys()
        (self.tmp / "peer.key").write_text(self.peer_priv + "\n")
        self.wg_names.append(self.peer_if)
        self.peer_proc = start_wireguard_go(w, self.peer_if)
        R.sh(["ip", "-n", w, "-b", "-"], input="\n".join([
            f"addr add {PEER_TUN}/24 dev {self.peer_if}", f"link set {self.peer_if} mtu {MTU} up", ""]))
        R.sh(["wg", "set", self.peer_if, "listen-port", str(WG_PORT), "private-key", str(self.tmp / "peer.key")])
        # Reference client: wireguard-go in the host netns, same tunnel address.
        self.ref_priv, self.ref_pub = wg_keys()
        (self.tmp / "ref.key").write_text(self.ref_priv + "\n")
        self.wg_names.append(self.ref_if)
        self.ref_proc = start_wireguard_go(h, self.ref_if)
        R.sh(["ip", "-n", h, "-b", "-"], input="\n".join([
            f"addr add {CLIENT_TUN}/24 dev {self.ref_if}", f"link set {self.ref_if} mtu {MTU} up", ""]))
        R.sh(["wg", "set", self.ref_if, "private-key", str(self.tmp / "ref.key"), "peer", self.peer_pub,
              "endpoint", f"{WORLD_LINK_IP}:{WG_PORT}", "allowed-ips", "10.99.0.0/24",
              "persistent-keepalive", "25"])
        # tether's keys and file.
        self.teth_priv, self.teth_pub = wg_keys()
        conf = self.tmp / "wg0.conf"
        conf.write_text(f"[Interface]\nPrivateKey = {self.teth_priv}\nAddress = {CLIENT_TUN}/24\nMTU = {MTU}\n\n"
                        f"[Peer]\nPublicKey = {self.peer_pub}\nEndpoint = {WORLD_LINK_IP}:{WG_PORT}\n"
                        "AllowedIPs = 10.99.0.0/24\nPersistentKeepalive = 25\n")
        os.chmod(conf, 0o600)
        os.chown(conf, self.user.uid, self.user.gid)
        os.chmod(self.tmp, 0o711)
        self.conf = conf
        # The world's servers on the peer's tunnel address (bounded life).
        life = str(self.args.life)
        p = REAPER.popen(R.in_ns(w) + [R.SYS_PY, "-c", R.UDP_ECHO_SERVER, PEER_TUN, str(UDP_ECHO_PORT), life],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
        if R.readline_timeout(p, 10) != "ready":
            raise R.BenchError("UDP echo server did not start")
        self.udp_echo = p

    def select_peer(self, which: str) -> None:
        """Give the peer's route to 10.99.0.2 to the contender measured next."""
        pub = self.teth_pub if which == "tether" else self.ref_pub
        R.sh(["wg", "set", self.peer_if, "peer", pub, "allowed-ips", f"{CLIENT_TUN}/32"])

    def start_tether(self, env: dict[str, str] | None = None) -> None:
        """``tether run --wireguard`` holding a Python that waits on stdin; ``env`` is added to
        the user's environment (``TETHER_WG_OFFLOADS`` for the ablation)."""
        self.select_peer("tether")
        argv = (R.in_ns(self.host) + self.user.prefix() + [str(REPO / ".venv" / "bin" / "tether"), "run",
                "--name", f"wgbench-{self.id}", "--wireguard", str(self.conf), "--", R.SYS_PY, "-c", HOLD_PROG])
        p = REAPER.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**self.user.env, **(env or {})}, cwd="/")
        self.tether_proc = p
        if R.readline_timeout(p, 30) != "ready":
            raise R.BenchError("tether run did not start")
        hn = os.stat(f"/run/netns/{self.host}").st_ino
        for pid in tree(p.pid):
            try:
                if os.stat(f"/proc/{pid}/ns/net").st_ino != hn:
                    self.sandbox_pid = pid
                    break
            except OSError:
                continue
        if self.sandbox_pid is None:
            raise R.BenchError("could not find the sandbox's netns")
        self.tether_tree = []
        for pid in tree(p.pid):
            try:
                self.tether_tree.append(open(f"/proc/{pid}/comm").read().strip())
            except OSError:
                pass

    def stop_tether(self) -> None:
        """End the run cleanly (EOF on the held Python's stdin); killed after 10 s."""
        p, self.tether_proc, self.sandbox_pid = self.tether_proc, None, None
        if p is None:
            return
        try:
            p.stdin.close()
            p.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            REAPER.stop(p)

    # -- wrappers ----------------------------------------------------------------------------------
    def wrap(self, which: str, argv: list[str]) -> list[str]:
        if which == "tether":
            return ["nsenter", "-t", str(self.sandbox_pid), "-n", "--"] + argv
        return R.in_ns(self.host) + argv

    def engine_pids(self, which: str) -> list[int]:
        if which == "tether":
            return [p for p in tree(self.tether_proc.pid)]
        return [self.ref_proc.pid]

    def check_alive(self) -> None:
        for what, p in (("peer wireguard-go", self.peer_proc), ("reference wireguard-go", self.ref_proc),
                        ("tether run", self.tether_proc)):
            if p is not None and p.poll() is not None:
                raise R.BenchError(f"{what} exited (rc={p.returncode})")

    # -- measurements ------------------------------------------------------------------------------
    def iperf(self, which: str, reverse: bool) -> dict:
        self.check_alive()
        a = self.args
        opts = ["-t", str(a.duration), "-O", str(a.omit)] + (["-R", "--rcv-timeout", "15000"] if reverse else [])
        window = CpuWindow(self.engine_pids(which), [self.peer_proc.pid])
        j = R.run_iperf3(lambda argv: self.wrap(which, argv), R.CLIENT_ENV, self.world, PEER_TUN, opts,
                         a.duration + a.omit + 30, "iperf3", window)
        (u0, s0), p0, t0 = window.start
        (u1, s1), p1, t1 = window.end
        c0, c1 = u0 + s0, u1 + s1
        end = j["end"]
        # Gbit moved over the whole client run (omitted warm-up included, like the CPU window).
        gbit = end["sum_sent"]["bytes"] * 8 / 1e9
        omit_bytes = sum(iv["sum"]["bytes"] for iv in j.get("intervals", []) if iv["sum"].get("omitted"))
        gbit_all = gbit + omit_bytes * 8 / 1e9
        return {"gbps": end["sum_received"]["bits_per_second"] / 1e9,
                "sender_gbps": end["sum_sent"]["bits_per_second"] / 1e9,
                "retransmits": end["sum_sent"].get("retransmits"),
                "gbit_in_window": gbit_all, "wall_s": t1 - t0,
                "engine_cpu_s": c1 - c0, "engine_user_s": u1 - u0, "engine_sys_s": s1 - s0,
                "peer_cpu_s": p1 - p0,
                "engine_cpu_s_per_gbit": (c1 - c0) / gbit_all if gbit_all else None,
                "peer_cpu_s_per_gbit": (p1 - p0) / gbit_all if gbit_all else None,
                "engine_cpu_pct": 100 * (c1 - c0) / (t1 - t0), "peer_cpu_pct": 100 * (p1 - p0) / (t1 - t0)}

    def udp_echo_latency(self, which: str) -> dict:
        self.check_alive()
        a = self.args
        limit = max(30.0, a.udp_count * 0.05)
        r = R.run(self.wrap(which, [R.SYS_PY, "-c", R.UDP_LATENCY_CLIENT, PEER_TUN, str(UDP_ECHO_PORT),
                                    str(a.udp_count), str(a.udp_warmup), str(limit)]),
                  timeout=limit + 60, env=R.CLIENT_ENV)
        if r.returncode != 0:
            raise R.BenchError(f"UDP latency client rc={r.returncode}: {r.stderr.strip()[-300:]}")
        j = json.loads(r.stdout.strip().splitlines()[-1])
        us = sorted(x / 1000 for x in j["ns"])
        if not us:
            raise R.BenchError("no UDP echo samples")
        return {"count": len(us), "p50_us": statistics.median(us), "p99_us": R.pct(us, 99),
                "mean_us": statistics.fmean(us), "min_us": us[0], "max_us": us[-1],
                "lost": j["lost"], "stale_replies": j["stale"]}


def summarize(runs: list[dict]) -> dict:
    ok = [x for x in runs if "error" not in x]
    for x in ok:
        x["engine_sys_fraction"] = x["engine_sys_s"] / x["engine_cpu_s"] if x["engine_cpu_s"] else None
    if not ok:
        return {"error": "; ".join(x["error"] for x in runs)}
    med = lambda k: statistics.median(x[k] for x in ok if x.get(k) is not None)  # noqa: E731
    return {"gbps": med("gbps"), "engine_cpu_s_per_gbit": med("engine_cpu_s_per_gbit"),
            "peer_cpu_s_per_gbit": med("peer_cpu_s_per_gbit"), "engine_cpu_pct": med("engine_cpu_pct"),
            "peer_cpu_pct": med("peer_cpu_pct"), "retransmits": med("retransmits"), "runs": len(ok),
            "engine_sys_fraction": med("engine_sys_fraction")}


LABELS = {"tether": "tether run --wireguard (Python engine)", "wireguard-go": "wireguard-go (reference)"}


def plot(res: dict, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return f"matplotlib not available ({e})"
    names = ["tether", "wireguard-go"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    s = res["summary"]
    for ax, (title, keys, unit) in zip(axes, [
            ("TCP throughput (iperf3, median)", [("up", "out"), ("down", "in (-R)")], "Gbit/s"),
            ("UDP 1-byte echo", [("p50_us", "p50"), ("p99_us", "p99")], "µs"),
            ("CPU per Gbit (engine, peer)", [("engine", "client-side engine"), ("peer", "wireguard-go peer")],
             "CPU s / Gbit")]):
        width = 0.38
        for i, n in enumerate(names):
            vals = []
            for k, _ in keys:
                if title.startswith("TCP"):
                    vals.append(s[n][k].get("gbps", 0))
                elif title.startswith("UDP"):
                    vals.append(s[n]["udp_echo"].get(k, 0))
                else:
                    f = "engine_cpu_s_per_gbit" if k == "engine" else "peer_cpu_s_per_gbit"
                    vals.append(statistics.fmean([s[n][d].get(f, 0) or 0 for d in ("up", "down")]))
            xs = [j + (i - 0.5) * width for j in range(len(keys))]
            bars = ax.bar(xs, vals, width, label=n)
            for b, v in zip(bars, vals):
                ax.annotate(f"{v:.2f}" if v < 100 else f"{v:.0f}", (b.get_x() + b.get_width() / 2, v),
                            ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(keys)), [lbl for _, lbl in keys])
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"WireGuard: tether vs wireguard-go, {res['timestamp']}" + (" (QUICK)" if res["quick"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def write_results(name: str, args, res: dict, chart) -> None:
    """results/NAME[-quick].json, and the chart ``chart(res, path)`` draws beside it."""
    base = RESULTS_DIR / f"{name}{'-quick' if args.quick else ''}"
    Path(str(base) + ".json").write_text(json.dumps(res, indent=1) + "\n")
    note = chart(res, Path(str(base) + ".png"))
    log(f"wrote {base}.json" + (f" ({note})" if note else f" and {base.name}.png"))


def logged_iperf(b: Bench, which: str, reverse: bool, tag: str) -> dict:
    """One iperf3 run, logged; a failed run is recorded as {"error"} and the benchmark goes on."""
    try:
        x = b.iperf(which, reverse)
    except R.ERRS as e:
        log(f"{tag}: ERROR {e}")
        return {"error": str(e)}
    log(f"{tag}: {x['gbps']:.3f} Gbit/s, engine {x['engine_cpu_s_per_gbit']:.2f} CPU s/Gbit "
        f"({x['engine_cpu_pct']:.0f} %), peer {x['peer_cpu_s_per_gbit']:.2f}")
    return x


ABLATION = [("all three", "tso,gso,gro"), ("no TSO", "gso,gro"), ("no GSO", "tso,gro"), ("no GRO", "tso,gso"),
            ("none", "none")]


def ablation(args) -> int:
    """tether alone, restarted once per TETHER_WG_OFFLOADS setting, on the usual topology: iperf3
    both ways, medians, CPU per Gbit.  Settings round-robin per repeat, so drift hits them alike."""
    b = Bench(args)
    atexit.register(b.cleanup)
    now = dt.datetime.now(dt.UTC)
    res = {"schema": 1, "kind": "ablation", "timestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "quick": args.quick,
           "params": {"duration": args.duration, "omit": args.omit, "repeats": args.repeats, "mtu": MTU,
                      "tether_as_user": args.as_user},
           "machine": {"kernel": os.uname().release, "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()},
           "runs": {label: {"up": [], "down": []} for label, _ in ABLATION}}
    try:
        log(f"building topology {b.id}")
        b.build()
        for rep in range(args.repeats):
            for label, offloads in ABLATION:
                b.start_tether({"TETHER_WG_OFFLOADS": offloads})
                try:
                    b.args = argparse.Namespace(**{**vars(args), "udp_count": 20, "udp_warmup": 5})
                    b.udp_echo_latency("tether")  # the handshake, before the clock starts
                    b.args = args
                    for d, rev in (("up", False), ("down", True)):
                        tag = f"{label} ({offloads}) {d} run {rep + 1}"
                        res["runs"][label][d].append(logged_iperf(b, "tether", rev, tag))
                finally:
                    b.stop_tether()
    finally:
        b.cleanup()
    res["summary"] = {label: {d: summarize(res["runs"][label][d]) for d in ("up", "down")} for label, _ in ABLATION}
    print(json.dumps(res["summary"], indent=1))
    if not args.no_write:
        write_results(f"wireguard-ablation-{now.strftime('%Y%m%dT%H%M%SZ')}", args, res, plot_ablation)
    return 0


def plot_ablation(res: dict, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return f"matplotlib not available ({e})"
    labels = [label for label, _ in ABLATION]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (field, title, unit) in zip(axes, [("gbps", "TCP throughput (iperf3, median)", "Gbit/s"),
                                               ("engine_cpu_s_per_gbit", "tether's CPU per Gbit", "CPU s / Gbit")]):
        width = 0.38
        for i, (d, name) in enumerate((("up", "out"), ("down", "in (-R)"))):
            vals = [res["summary"][label][d].get(field) or 0 for label in labels]
            xs = [j + (i - 0.5) * width for j in range(len(labels))]
            bars = ax.bar(xs, vals, width, label=name)
            for bar, v in zip(bars, vals):
                ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"tether --wireguard, TETHER_WG_OFFLOADS ablation, {res['timestamp']}"
                 + (" (QUICK)" if res["quick"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 s iperf3, 1 run, 300 echoes (smoke test)")
    ap.add_argument("--as-user", default="tether-test", help="run tether rootless as this user")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--ablation", action="store_true",
                    help="tether only, once per TETHER_WG_OFFLOADS setting (all, each one off, none): "
                         "what each offload is worth; 5 s iperf3 x 2 per direction (3 s x 1 with --quick)")
    a = ap.parse_args(argv)
    a.duration, a.omit, a.repeats = (3, 1, 1) if a.quick else (5, 1, 2) if a.ablation else (10, 1, 3)
    a.udp_count, a.udp_warmup = (300, 20) if a.quick else (2000, 50)
    a.life = 3600
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("benchmarks/wireguard.py must run as root", file=sys.stderr)
        return 2
    missing = [t for t in ("wireguard-go", "wg", "iperf3", "nsenter", "setpriv") if not shutil.which(t)]
    if missing:
        print(f"missing programs: {', '.join(missing)}", file=sys.stderr)
        return 2
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, R.on_signal)
    if args.ablation:
        return ablation(args)
    b = Bench(args)
    atexit.register(b.cleanup)
    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    res = {"schema": 1, "timestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "quick": args.quick,
           "params": {"duration": args.duration, "omit": args.omit, "repeats": args.repeats,
                      "udp_count": args.udp_count, "udp_warmup": args.udp_warmup, "mtu": MTU,
                      "tether_as_user": args.as_user},
           "machine": {"kernel": os.uname().release, "cpu_count": os.cpu_count(),
                       "cpus_allowed": sorted(os.sched_getaffinity(0)), "loadavg_start": os.getloadavg(),
                       "wireguard_go": R.first_line(["dpkg-query", "-W", "-f=${Version}", "wireguard-go"]),
                       "iperf3": R.first_line(["iperf3", "--version"]),
                       "tether": R.first_line([str(REPO / ".venv" / "bin" / "tether"), "--version"])},
           "topology": {"peer": f"wireguard-go in world netns, {PEER_TUN}/24, {WORLD_LINK_IP}:{WG_PORT}",
                        "tether": f"tether run --wireguard (as {args.as_user}, rootless) in host netns {HOST_IP}; "
                                  "clients entered into the sandbox netns with nsenter -n (as root)",
                        "wireguard-go": f"wireguard-go with its own tun ({CLIENT_TUN}/24) in the host netns; "
                                        "clients in the host netns",
                        "mtu": MTU},
           "runs": {"tether": {"up": [], "down": []}, "wireguard-go": {"up": [], "down": []}},
           "pytest_seen": []}

    def pytest_running() -> bool:
        r = subprocess.run(["pgrep", "-f", "pytest"], capture_output=True, text=True)
        return bool(r.stdout.strip())

    res["pytest_seen"].append(("start", pytest_running()))
    try:
        log(f"building topology {b.id}")
        b.build()
        b.start_tether()
        res["topology"]["tether_cpu_counted"] = ("utime+stime of the tether run process and all its descendants: "
                                                 + ", ".join(b.tether_tree))
        names = ["tether", "wireguard-go"]
        # Warm both tunnels (handshake) with a short echo each.
        for n in names:
            b.select_peer(n)
            sub = argparse.Namespace(**vars(args))
            b.args = sub
            sub.udp_count, sub.udp_warmup = 20, 5
            b.udp_echo_latency(n)
            b.args = args
        for rep in range(args.repeats):
            for d, rev in (("up", False), ("down", True)):
                order = names if rep % 2 == 0 else names[::-1]
                for n in order:
                    b.select_peer(n)
                    res["runs"][n][d].append(logged_iperf(b, n, rev, f"{n} {d} run {rep + 1}"))
        res["pytest_seen"].append(("after-iperf", pytest_running()))
        res["udp_echo"] = {}
        for n in names:
            b.select_peer(n)
            try:
                res["udp_echo"][n] = b.udp_echo_latency(n)
                log(f"{n} UDP echo p50 {res['udp_echo'][n]['p50_us']:.0f} µs p99 {res['udp_echo'][n]['p99_us']:.0f} µs")
            except R.ERRS as e:
                res["udp_echo"][n] = {"error": str(e)}
                log(f"{n} UDP echo ERROR {e}")
        res["pytest_seen"].append(("end", pytest_running()))
        try:
            res["device_micro"] = device_micro()
            log("device alone: encrypt {encrypt_us_per_packet:.2f} µs, decrypt {decrypt_us_per_packet:.2f} µs, "
                "AEAD seal {chacha20poly1305_seal_us_per_packet:.2f} µs per 1420-byte packet".format(**res["device_micro"]))
        except Exception as e:  # noqa: BLE001  (a diagnostic; never fails the run)
            res["device_micro"] = {"error": repr(e)}
    finally:
        b.cleanup()
    s = {}
    for n in ("tether", "wireguard-go"):
        s[n] = {d: summarize(res["runs"][n][d]) for d in ("up", "down")}
        s[n]["udp_echo"] = res["udp_echo"].get(n, {})
    res["summary"] = s
    t, g = s["tether"], s["wireguard-go"]
    verdicts = []
    for d, lbl in (("up", "sandbox→peer"), ("down", "peer→sandbox (-R)")):
        if "gbps" in t[d] and "gbps" in g[d]:
            ratio = t[d]["gbps"] / g[d]["gbps"]
            verdicts.append({"target": f"throughput {lbl} >= {TARGET_TPUT_RATIO}x wireguard-go",
                             "measured": f"{ratio:.2f}x ({t[d]['gbps']:.3f} / {g[d]['gbps']:.3f} Gbit/s)",
                             "ratio": ratio, "result": "PASS" if ratio >= TARGET_TPUT_RATIO else "MISS"})
    te, ge = t["udp_echo"], g["udp_echo"]
    if "p50_us" in te and "p50_us" in ge:
        ratio = te["p50_us"] / ge["p50_us"]
        verdicts.append({"target": f"UDP echo p50 <= {TARGET_ECHO_RATIO}x wireguard-go",
                         "measured": f"{ratio:.2f}x ({te['p50_us']:.0f} / {ge['p50_us']:.0f} µs)",
                         "ratio": ratio, "result": "PASS" if ratio <= TARGET_ECHO_RATIO else "MISS"})
    res["verdicts"] = verdicts
    res["contended"] = any(v for _, v in res["pytest_seen"])
    print(json.dumps({"summary": s, "verdicts": verdicts, "pytest_seen": res["pytest_seen"]}, indent=1))
    if not args.no_write:
        write_results(f"wireguard-{stamp}", args, res, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
