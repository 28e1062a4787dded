"""The tunnel tables of `make bench`: a tunnel built by wormhole against the same tunnel
built by hand, between two test hosts, for one backend:

* wireguard-go (the host table): WireGuard run by the userspace wireguard-go;
* kernel-wireguard (the kernel lab, bench/lab.py): the kernel's WireGuard;
* ipsec (the kernel lab): ESP in tunnel mode through xfrm, AES-GCM.

Two network namespaces joined by a veth pair (198.18.0.1/24 and 198.18.0.2/24) are
the two hosts. On them:

* hand-built: made as an admin would. WireGuard: wireguard-go started by hand on each
  host (or a kernel `ip link add ... type wireguard`), configured with `wg set`
  (private key, listen port, peer, preshared key, endpoint, persistent keepalive 25)
  and `ip` (overlay address /32, MTU = veth MTU - 80, route to the far /32). ipsec:
  `ip xfrm state add` (two SAs, rfc4106(gcm(aes)), AES-128 + salt, 128-bit ICV,
  replay window 32) and `ip xfrm policy add` (out, in, fwd for the overlay /32 pair,
  an ESP tunnel template between the underlay addresses), the overlay address on lo
  and a route to the far /32 by the veth with it as source: what wormholed/tunnels
  ipsec.py and xfrm.py make;
* wormhole: a wormholed on each host (each its own key file, the same key) and
  `wormhole tunnel-create [--type ipsec] 198.18.0.2` run against the first (timed: the
  CLI's wall-clock, median of a few creates each made after a `tunnel-delete`).

Then iperf3, one TCP stream from host 1 to an `iperf3 -s` bound to host 2's overlay
address, through each tunnel in turn (A B B A ...), the median per tunnel, and the
ratio wormhole/hand-built.

Everything is made under unique names (whbench<PID>a/b) and removed at the end,
on error, on Ctrl-C and on SIGTERM: the hand-built tunnel (its processes, interfaces,
xfrm states and policies), wormhole's (tunnel-delete), the processes in the two
namespaces (the wireguard-go wormhole starts detaches too), the /run/wireguard sockets
of their interfaces, the namespaces with the veth pair, the temporary files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import statistics
import string
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

from run import WORMHOLE_BIN, BenchError, Proc, parse_iperf3, proc_cpu_seconds, run_tool

UNDERLAY = ("198.18.0.1", "198.18.0.2")  # the veth pair, RFC 2544 benchmarking range
UNDERLAY_PREFIX = 24
HAND_OVERLAY = ("198.19.0.1", "198.19.0.2")  # hand-built /32s, outside wormhole's -C
HAND_PORTS = (51820, 51821)  # wormhole's tunnels use -P (4500-4599): no clash
IPERF_PORT = 5201
KEEPALIVE = 25
MTU_OVERHEAD = 80  # WireGuard over IPv6 worst case; wormhole's rule too
GOAL = 0.95  # wormhole/hand-built throughput
CREATES = 3  # timed tunnel-creates, each after a tunnel-delete
ROUNDS = 4  # iperf3 runs per tunnel, in the order A B B A A B B A
TUNNEL_ROWS = ("hand-built", "wormhole")
NETNS_DIR = Path("/run/netns")
WG_RUN = Path("/run/wireguard")
NS_PREFIX = "whbench"
# The hand-built ipsec tunnel: wormhole's transform (wormholed/tunnels/xfrm.py, gcm_aes), and a
# reqid outside the range wormholed sweeps as its own strays (0x57480001..0x5748ffff).
ESP_AEAD = "rfc4106(gcm(aes))"
ESP_KEY_BYTES = 20  # AES-128 key + 4 bytes of salt (RFC 4106)
ESP_ICV_BITS = 128
ESP_REPLAY_WINDOW = 32
HAND_REQID = 0x4242
# Timeouts are multiplied by this (bench/lab.py raises it: qemu without KVM is slow).
SLOW = 1.0


@dataclasses.dataclass(frozen=True)
class Backend:
    """What carries both tunnels of one table."""
    name: str  # wireguard-go, kernel-wireguard, ipsec
    title: str  # in the table's header
    wormhole_backend: str  # what `tunnel-list` should say wormhole's tunnel runs on
    create_args: tuple[str, ...]  # tunnel-create options
    hand_built: str  # what the hand-built row is made with (progress line)
    tools: tuple[str, ...]

    @property
    def wireguard(self) -> bool:
        return self.name != "ipsec"


BACKENDS = {b.name: b for b in (
    Backend("wireguard-go", "WireGuard", "wireguard-go", (), "wireguard-go + wg + ip",
            ("ip", "ss", "iperf3", "wireguard-go", "wg")),
    Backend("kernel-wireguard", "kernel WireGuard", "kernel", (), "ip link add type wireguard + wg + ip",
            ("ip", "ss", "iperf3", "wg")),
    Backend("ipsec", f"ipsec (ESP tunnel mode, xfrm, {ESP_AEAD} AES-128)", "xfrm", ("--type", "ipsec"),
            "ip xfrm state + ip xfrm policy + ip", ("ip", "ss", "iperf3")),
)}
TOOLS = BACKENDS["wireguard-go"].tools  # the host table's


# --------------------------------------------------------------------------
# Pure functions: parsing tool output and formatting results


def cli_message(stderr: str, stdout: str = "", returncode: int | None = None) -> str:
    """The one line a failed CLI call has to say: its last non-empty stderr line
    (stdout's if stderr is empty), without the "wormhole: [error: ]" prefix."""
    for text in (stderr, stdout):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            return re.sub(r"^wormhole: (error: )?", "", lines[-1])[:300]
    return f"exit status {returncode}" if returncode is not None else "no output"


def parse_tunnel_create(text: str) -> tuple[str, str]:
    """``wormhole tunnel-create`` prints "SRC DST": the overlay IPs of the two ends."""
    words = text.split()
    if len(words) != 2:
        raise BenchError(f"unexpected output of tunnel-create: {text.strip()[:200]!r}")
    try:
        src, dst = (ipaddress.ip_address(w) for w in words)
    except ValueError:
        raise BenchError(f"tunnel-create printed no overlay IPs: {text.strip()[:200]!r}") from None
    if src == dst:
        raise BenchError(f"tunnel-create printed the same IP for both ends: {src}")
    return str(src), str(dst)


def parse_tunnel_list(text: str, peer: str) -> dict:
    """The entry for PEER in ``wormhole tunnel-list --json``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchError(f"tunnel-list --json is not JSON: {exc}") from None
    if not isinstance(data, list):
        raise BenchError("tunnel-list --json is not a list")
    for entry in data:
        if isinstance(entry, dict) and entry.get("peer") == peer:
            return entry
    raise BenchError(f"tunnel-list has no tunnel to {peer}")


def parse_ip_link(text: str) -> dict:
    """mtu, tx_bytes and rx_bytes of the one link in ``ip -j -s link show dev X``."""
    try:
        [link] = json.loads(text)
        return {"ifname": link["ifname"], "mtu": int(link["mtu"]),
                "tx_bytes": int(link["stats64"]["tx"]["bytes"]),
                "rx_bytes": int(link["stats64"]["rx"]["bytes"])}
    except (json.JSONDecodeError, ValueError, KeyError, TypeError):
        raise BenchError(f"cannot read ip -j -s link output: {text.strip()[:200]!r}") from None


def iface_with_address(text: str, ip: str) -> str:
    """The interface holding IP in ``ip -j addr show`` output."""
    try:
        links = json.loads(text)
        for link in links:
            for addr in link.get("addr_info", []):
                if addr.get("local") == ip:
                    return link["ifname"]
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
        raise BenchError(f"cannot read ip -j addr output: {text.strip()[:200]!r}") from None
    raise BenchError(f"no interface has the address {ip}")


def parse_listening(text: str, ip: str, port: int) -> bool:
    """Whether ``ss -Hltn`` output shows a listener on IP:PORT."""
    want = f"{ip}:{port}"
    return any(want in line.split() for line in text.splitlines())


def parse_xfrm_states(text: str) -> list[dict]:
    """The states in ``ip -s xfrm state list`` output: src, dst, spi, reqid and the bytes
    of "lifetime current" (what went through the SA), one dict per state."""
    states = []
    for block in re.split(r"^(?=src \S+ dst \S+\s*$)", text, flags=re.MULTILINE):
        head = re.match(r"src (\S+) dst (\S+)\s*\n\s*proto (\S+) spi (0x[0-9a-fA-F]+)\S* reqid ([0-9]+)",
                        block)
        if not head:
            if block.strip():
                raise BenchError(f"cannot read ip xfrm state output: {block.strip()[:200]!r}")
            continue
        current = re.search(r"lifetime current:\s*\n\s*([0-9]+)\(bytes\), ([0-9]+)\(packets\)", block)
        if not current:
            raise BenchError(f"ip xfrm state shows no counters (ip -s?): {block.strip()[:200]!r}")
        states.append({"src": head.group(1), "dst": head.group(2), "proto": head.group(3),
                       "spi": int(head.group(4), 16), "reqid": int(head.group(5)),
                       "bytes": int(current.group(1)), "packets": int(current.group(2))})
    return states


def xfrm_bytes(text: str, src: str, dst: str, spi: int) -> int:
    """Bytes through the ESP state src -> dst with SPI, from ``ip -s xfrm state list``."""
    for state in parse_xfrm_states(text):
        if (state["src"], state["dst"], state["spi"], state["proto"]) == (src, dst, spi, "esp"):
            return state["bytes"]
    raise BenchError(f"no ESP state {src} -> {dst} spi {spi:#010x}")


def tunnel_mtu(underlay_mtu: int) -> int:
    """wormhole's rule: the route MTU toward the peer minus WireGuard's worst-case overhead."""
    return underlay_mtu - MTU_OVERHEAD


def abba(names: tuple[str, ...] | list[str], rounds: int) -> list[str]:
    """Measurement order: forward, then backward, alternately (A B B A A B ...), so a
    machine that speeds up or slows down during the run hurts every row alike."""
    order: list[str] = []
    for r in range(rounds):
        order.extend(names if r % 2 == 0 else list(reversed(names)))
    return order


def ns_pid_of(name: str) -> int | None:
    """The bench PID in one of our namespace names (whbench<PID>a/b), else None."""
    m = re.fullmatch(rf"{NS_PREFIX}([0-9]+)[ab]", name)
    return int(m.group(1)) if m else None


@dataclasses.dataclass
class TunnelRow:
    name: str
    samples: list[float] = dataclasses.field(default_factory=list)  # iperf3 bits/s per run
    cpu_s_per_gb: float | None = None  # both wireguard-go processes, CPU s per GB received
    mtu: int | None = None
    interface: str | None = None
    backend: str | None = None
    create_s: list[float] = dataclasses.field(default_factory=list)  # timed creates
    create_first_s: float | None = None  # the first create (nothing to reuse, no delete)
    error: str | None = None  # whole row unavailable
    notes: dict[str, str] = dataclasses.field(default_factory=dict)  # per column

    @property
    def bps(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def create_median(self) -> float | None:
        return statistics.median(self.create_s) if self.create_s else None


def tunnel_ratio(rows: list[TunnelRow]) -> float | None:
    by = {r.name: r for r in rows}
    hand, wh = by.get("hand-built"), by.get("wormhole")
    if not hand or not wh or hand.error or wh.error or not hand.bps or wh.bps is None:
        return None
    return wh.bps / hand.bps


UNITS = {"Gbit/s": 1e9, "Mbit/s": 1e6}  # throughput column: Mbit/s for the lab's slow figures


def format_tunnel_table(rows: list[TunnelRow], header: str = "", unit: str = "Gbit/s") -> str:
    """The tunnel table; the ratio is wormhole against hand-built, with the goal."""
    ratio = tunnel_ratio(rows)
    width = max([len("tunnel")] + [len(r.name) for r in rows])
    cols = (f"{'throughput ' + unit:>18} {'ratio':>6} {'goal':>11} {'MTU':>5}"
            f" {'tunnel-create s':>16} {'wg CPU s/GB':>12}")
    lines = [header] if header else []
    lines.append(f"{'tunnel':<{width}}  {cols}")
    lines.append("-" * (width + 2 + len(cols)))
    footnotes: list[str] = []

    def note(row: TunnelRow, key: str, text: str) -> str:
        if key in row.notes:
            footnotes.append(f"{row.name} {key}: {row.notes[key]}")
            text += f" [{len(footnotes)}]"
        return text

    for row in rows:
        if row.error:
            lines.append(f"{row.name:<{width}}  n/a ({row.error})")
            continue
        bps = row.bps
        tput = note(row, "throughput", "n/a" if bps is None else f"{bps / UNITS[unit]:.2f}")
        if row.name == "hand-built":
            r, goal = ("1.00" if bps else "n/a"), "-"
        else:
            r = "n/a" if ratio is None else f"{ratio:.2f}"
            goal = (f">={GOAL:.2f} " + ("-" if ratio is None else "ok" if ratio >= GOAL else "MISS"))
        if row.name == "wormhole":
            med = row.create_median
            create = note(row, "tunnel-create", "n/a" if med is None else f"{med:.3f}")
        else:
            create = "-"
        mtu = "-" if row.mtu is None else str(row.mtu)
        cpu = "-" if row.cpu_s_per_gb is None else f"{row.cpu_s_per_gb:.2f}"
        lines.append(f"{row.name:<{width}}  {tput:>18} {r:>6} {goal:>11} {mtu:>5}"
                     f" {create:>16} {cpu:>12}")
    for row in rows:  # notes no cell refers to
        for key, text in row.notes.items():
            if key not in ("throughput", "tunnel-create") or row.error:
                footnotes.append(f"{row.name} {key}: {text}")
    for i, text in enumerate(footnotes, 1):
        lines.append(f"[{i}] {text}")
    return "\n".join(lines)


def tunnel_to_json(rows: list[TunnelRow], backend: str = "wireguard-go") -> dict:
    return {
        "backend": backend,
        "underlay": list(UNDERLAY),
        "goal_ratio": GOAL,
        "ratio": tunnel_ratio(rows),
        "rows": [{
            "name": r.name,
            "throughput_bps": r.bps,
            "throughput_samples_bps": r.samples,
            "mtu": r.mtu,
            "interface": r.interface,
            "backend": r.backend,
            "wg_cpu_s_per_gb": r.cpu_s_per_gb,
            "tunnel_create_s": r.create_median,
            "tunnel_create_samples_s": r.create_s,
            "tunnel_create_first_s": r.create_first_s,
            "error": r.error,
            "notes": r.notes,
        } for r in rows],
    }


def tunnel_header(duration: float, veth_mtu: int | None = None, backend: str = "wireguard-go",
                  rounds: int = ROUNDS) -> str:
    mtu = f" (MTU {veth_mtu})" if veth_mtu else ""
    return (f"tunnel: {BACKENDS[backend].title} between two namespaces joined by a veth pair{mtu}, "
            f"{UNDERLAY[0]} -> {UNDERLAY[1]}\n"
            f"throughput: iperf3, 1 TCP stream to host 2's overlay IP, median of {rounds} runs "
            f"of {duration:g} s per tunnel (order {' '.join(abba(('A', 'B'), rounds))}, A = hand-built);"
            f" ratio: wormhole / hand-built\n")


# --------------------------------------------------------------------------
# The test hosts


def _run(argv: list, timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess:
    argv = [str(a) for a in argv]
    timeout *= SLOW
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{argv[0]} did not finish within {timeout:.0f} s") from None
    except OSError as exc:
        raise BenchError(f"cannot run {argv[0]}: {exc.strerror}") from None


def _check(argv: list, timeout: float = 30, input: str | None = None) -> str:
    res = _run(argv, timeout, input)
    if res.returncode != 0:
        raise BenchError(f"{' '.join(str(a) for a in argv[:6])} failed: "
                         f"{cli_message(res.stderr, res.stdout, res.returncode)}")
    return res.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _ns_pids(ns: str) -> list[int]:
    res = _run(["ip", "netns", "pids", ns], timeout=10)
    return [int(p) for p in res.stdout.split() if p.isdigit()]


def _proc_cpu(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return proc_cpu_seconds(f.read(), os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class Testbed:
    """Two namespaces joined by a veth pair. Every process in them is ours (started
    here or by our daemons) and is killed by close(), which also removes the
    /run/wireguard sockets of the interfaces in them, and the namespaces."""

    def __init__(self, log: Callable[[str], None]):
        pid = os.getpid()
        self.log = log
        self.ns = (f"{NS_PREFIX}{pid}a", f"{NS_PREFIX}{pid}b")
        self.veth = (f"whb{pid}a", f"whb{pid}b")  # <= 15 characters
        self.made: list[str] = []
        self.ifaces: set[str] = set()  # WireGuard interfaces (their /run/wireguard sockets)
        self.veth_mtu: int | None = None

    def __enter__(self) -> "Testbed":
        sweep_stale(self.log)
        try:
            for ns in self.ns:
                _check(["ip", "netns", "add", ns])
                self.made.append(ns)
                _check(["ip", "-n", ns, "link", "set", "lo", "up"])
            a, b = self.veth
            _check(["ip", "link", "add", a, "netns", self.ns[0], "type", "veth",
                    "peer", "name", b, "netns", self.ns[1]])
            for i in (0, 1):
                _check(["ip", "-n", self.ns[i], "addr", "add", f"{UNDERLAY[i]}/{UNDERLAY_PREFIX}",
                        "dev", self.veth[i]])
                _check(["ip", "-n", self.ns[i], "link", "set", self.veth[i], "up"])
            self.veth_mtu = self.link(0, self.veth[0])["mtu"]
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def argv(self, i: int, *argv) -> list[str]:
        return ["ip", "netns", "exec", self.ns[i], *(str(a) for a in argv)]

    def check(self, i: int, *argv, timeout: float = 30) -> str:
        return _check(self.argv(i, *argv), timeout)

    def link(self, i: int, ifname: str) -> dict:
        return parse_ip_link(_check(["ip", "-n", self.ns[i], "-j", "-s", "link", "show", "dev", ifname]))

    def esp_bytes(self, i: int, src: str, dst: str, spi: int) -> int:
        """Bytes through an ESP state on host I+1 (its xfrm "lifetime current")."""
        return xfrm_bytes(_check(["ip", "-n", self.ns[i], "-s", "xfrm", "state", "list"]), src, dst, spi)

    def wait_listening(self, i: int, ip: str, port: int, proc: Proc, timeout: float = 10) -> None:
        timeout *= SLOW
        deadline = time.monotonic() + timeout
        while not parse_listening(self.check(i, "ss", "-Hltn"), ip, port):
            if not proc.alive():
                raise BenchError(f"{proc.name} exited with {proc.popen.returncode}: {proc.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"nothing listens on {ip}:{port} after {timeout:.0f} s ({proc.tail()})")
            time.sleep(0.05)

    def close(self) -> None:
        # A second Ctrl-C or a SIGTERM must not leave half of this behind.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for ns in self.made:
                _remove_ns(ns, self.ifaces, self.log)
            self.made.clear()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _remove_ns(ns: str, ifaces: set[str], log: Callable[[str], None]) -> None:
    """Kill every process in NS, remove the /run/wireguard sockets of its interfaces
    (and of IFACES, ours), then the namespace (its veth end and tunnels go with it)."""
    try:
        links = json.loads(_run(["ip", "-n", ns, "-j", "link", "show"], timeout=10).stdout or "[]")
        names = {link["ifname"] for link in links}
    except (BenchError, json.JSONDecodeError, KeyError, TypeError):
        names = set()
    pids = []
    with contextlib.suppress(BenchError):
        pids = _ns_pids(ns)
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while (pids := [p for p in pids if _pid_alive(p) and not _zombie(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not pids:
            break
    for name in (names | ifaces) - {"lo"}:
        sock = WG_RUN / f"{name}.sock"
        if sock.exists() and not _answers(sock):  # a live one is not ours (a name clash)
            with contextlib.suppress(OSError):
                sock.unlink()
                log(f"tunnel: removed stale {sock}")
    res = None
    with contextlib.suppress(BenchError):
        res = _run(["ip", "netns", "del", ns], timeout=10)
    if res is None or (res.returncode != 0 and (NETNS_DIR / ns).exists()):
        log(f"tunnel: could not remove namespace {ns}: {res and res.stderr.strip()}")


def _answers(path: Path) -> bool:
    """Whether a process still accepts on the unix socket PATH."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def sweep_stale(log: Callable[[str], None]) -> None:
    """Remove test hosts an earlier bench left behind when it was SIGKILLed (its PID is gone)."""
    try:
        names = [p.name for p in NETNS_DIR.iterdir()]
    except OSError:
        return
    for name in names:
        pid = ns_pid_of(name)
        if pid is not None and pid != os.getpid() and (not _pid_alive(pid) or _zombie(pid)):
            log(f"tunnel: removing {name}, left behind by bench run {pid}")
            _remove_ns(name, set(), log)


# --------------------------------------------------------------------------
# The two tunnels


@dataclasses.dataclass
class Tunnel:
    """A tunnel ready to measure: host 2's overlay IP and what carries it."""
    remote_ip: str
    iface: str | None  # host 1's tunnel interface (WireGuard); None for ipsec (no interface)
    wg_pids: Callable[[], list[int]]  # the wireguard-go processes (both hosts); none in the kernel
    sent: Callable[[], int]  # bytes host 1 has sent into the tunnel so far
    via: str  # what carries it, for messages


def _wireguard_sent(bed: "Testbed", iface: str) -> Callable[[], int]:
    return lambda: bed.link(0, iface)["tx_bytes"]


def _esp_sent(bed: "Testbed", spi: int) -> Callable[[], int]:
    """Host 1's outbound SA (198.18.0.1 -> 198.18.0.2, SPI)."""
    return lambda: bed.esp_bytes(0, UNDERLAY[0], UNDERLAY[1], spi)


class HandBuiltWireguard:
    """wireguard-go (or, kernel=True, the kernel's WireGuard) on each host, configured with
    wg and ip as an admin would."""

    def __init__(self, bed: Testbed, tmp: Path, kernel: bool = False):
        self.bed, self.tmp, self.kernel = bed, tmp / "hand-built", kernel
        pid = os.getpid()
        self.ifaces = (f"whbwg{pid}a", f"whbwg{pid}b")  # not wh-*: wormholed removes those
        self.procs: list[Proc] = []
        self.links: list[int] = []  # hosts where a kernel interface was added

    def __enter__(self) -> Tunnel:
        self.tmp.mkdir(mode=0o700)
        try:
            return self._build()
        except BaseException:
            self.__exit__()
            raise

    def _build(self) -> Tunnel:
        bed = self.bed
        keys, pubs = [], []
        for i in (0, 1):
            key = _check(["wg", "genkey"]).strip()
            keys.append(self._secret(f"private-{i}", key))
            pubs.append(_check(["wg", "pubkey"], input=key + "\n").strip())
        psk = self._secret("preshared", _check(["wg", "genpsk"]).strip())
        mtu = tunnel_mtu(bed.veth_mtu)
        for i in (0, 1):
            iface = self.ifaces[i]
            bed.ifaces.add(iface)
            if self.kernel:
                _check(["ip", "-n", bed.ns[i], "link", "add", iface, "type", "wireguard"])
                self.links.append(i)
                continue
            proc = Proc(f"wireguard-go-{i + 1}", bed.argv(i, "wireguard-go", "-f", iface), self.tmp)
            self.procs.append(proc.__enter__())
            self._wait_uapi(i, proc)
        for i, j in ((0, 1), (1, 0)):
            iface = self.ifaces[i]
            bed.check(i, "wg", "set", iface, "private-key", keys[i], "listen-port", HAND_PORTS[i],
                      "peer", pubs[j], "preshared-key", psk,
                      "endpoint", f"{UNDERLAY[j]}:{HAND_PORTS[j]}",
                      "allowed-ips", f"{HAND_OVERLAY[j]}/32", "persistent-keepalive", KEEPALIVE)
            ns = bed.ns[i]
            _check(["ip", "-n", ns, "addr", "add", f"{HAND_OVERLAY[i]}/32", "dev", iface])
            _check(["ip", "-n", ns, "link", "set", iface, "mtu", mtu, "up"])
            _check(["ip", "-n", ns, "route", "add", f"{HAND_OVERLAY[j]}/32", "dev", iface])
        pids = [p.popen.pid for p in self.procs]  # ip netns exec execs wireguard-go: same PID
        return Tunnel(HAND_OVERLAY[1], self.ifaces[0], lambda: pids, _wireguard_sent(bed, self.ifaces[0]),
                      self.ifaces[0])

    def _secret(self, name: str, value: str) -> Path:
        path = self.tmp / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
        return path

    def _wait_uapi(self, i: int, proc: Proc, timeout: float = 10) -> None:
        timeout *= SLOW
        deadline = time.monotonic() + timeout
        while not (WG_RUN / f"{self.ifaces[i]}.sock").exists():
            if not proc.alive():
                raise BenchError(f"wireguard-go exited with {proc.popen.returncode}: {proc.tail(1)}")
            if time.monotonic() > deadline:
                raise BenchError(f"wireguard-go made no {WG_RUN}/{self.ifaces[i]}.sock in {timeout:.0f} s")
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.stop()  # SIGTERM: wireguard-go removes its interface and socket
        self.procs.clear()
        for i in self.links:  # the kernel's interface goes with its link
            with contextlib.suppress(BenchError):
                _run(["ip", "-n", self.bed.ns[i], "link", "del", self.ifaces[i]], timeout=10)
        self.links.clear()


class HandBuiltIpsec:
    """ESP in tunnel mode made with ip xfrm and ip as an admin would, the way wormholed makes its
    ipsec tunnels (wormholed/tunnels/ipsec.py, xfrm.py): on each host two SAs between the
    underlay addresses (the one it sends with and the one it receives with: a fresh random
    SPI and key each, rfc4106(gcm(aes)) with 16 bytes of AES key + 4 of salt, a 128-bit ICV,
    replay window 32, no lifetime limits), three policies for the overlay /32 pair (out; in
    and fwd) with one ESP tunnel template between the underlay addresses, the overlay
    address on lo and a route to the far overlay address by the veth with it as source."""

    def __init__(self, bed: Testbed, tmp: Path):
        self.bed = bed
        self.undo: list[list] = []  # commands that remove what was made, in the order made

    def __enter__(self) -> Tunnel:
        try:
            return self._build()
        except BaseException:
            self.__exit__()
            raise

    def _build(self) -> Tunnel:
        bed, u, o = self.bed, UNDERLAY, HAND_OVERLAY
        spis: list[int] = []
        while len(spis) < 2:  # SPIs below 256 are reserved (RFC 4303)
            spi = 0x100 + secrets.randbelow(2**32 - 0x100)
            if spi not in spis:
                spis.append(spi)
        keys = [secrets.token_bytes(ESP_KEY_BYTES).hex() for _ in (0, 1)]  # host i sends with spis[i]
        for i, j in ((0, 1), (1, 0)):
            ip = ["ip", "-n", bed.ns[i]]
            for a, b in ((i, j), (j, i)):  # the SA host a sends to host b with
                sa = ["src", u[a], "dst", u[b], "proto", "esp", "spi", f"{spis[a]:#010x}"]
                self._do(ip + ["xfrm", "state", "add", *sa, "reqid", HAND_REQID, "mode", "tunnel",
                               "replay-window", ESP_REPLAY_WINDOW, "aead", ESP_AEAD, "0x" + keys[a],
                               ESP_ICV_BITS],
                         ip + ["xfrm", "state", "delete", *sa])
            for src, dst, direction, t_src, t_dst in ((o[i], o[j], "out", u[i], u[j]),
                                                      (o[j], o[i], "in", u[j], u[i]),
                                                      (o[j], o[i], "fwd", u[j], u[i])):
                sel = ["src", f"{src}/32", "dst", f"{dst}/32", "dir", direction]
                self._do(ip + ["xfrm", "policy", "add", *sel, "tmpl", "src", t_src, "dst", t_dst,
                               "proto", "esp", "reqid", HAND_REQID, "mode", "tunnel"],
                         ip + ["xfrm", "policy", "delete", *sel])
            self._do(ip + ["addr", "add", f"{o[i]}/32", "dev", "lo"],
                     ip + ["addr", "del", f"{o[i]}/32", "dev", "lo"])
            self._do(ip + ["route", "add", f"{o[j]}/32", "dev", bed.veth[i], "src", o[i]],
                     ip + ["route", "del", f"{o[j]}/32"])
        return Tunnel(o[1], None, lambda: [], _esp_sent(bed, spis[0]), f"ESP SA spi {spis[0]:#010x}")

    def _do(self, argv: list, undo: list) -> None:
        _check(argv)
        self.undo.append(undo)

    def __exit__(self, *exc) -> None:
        for argv in reversed(self.undo):
            with contextlib.suppress(BenchError):
                _run(argv, timeout=10)
        self.undo.clear()


def hand_built(backend: Backend, bed: Testbed, tmp: Path) -> HandBuiltWireguard | HandBuiltIpsec:
    if backend.name == "ipsec":
        return HandBuiltIpsec(bed, tmp)
    return HandBuiltWireguard(bed, tmp, kernel=backend.name == "kernel-wireguard")


class WormholeSide:
    """A wormholed on each host; the tunnel is `wormhole tunnel-create` from host 1."""

    def __init__(self, bed: Testbed, tmp: Path, log: Callable[[str], None],
                 backend: Backend = BACKENDS["wireguard-go"]):
        self.bed, self.tmp, self.log, self.backend = bed, tmp / "wormhole-tunnel", log, backend
        self.dirs = (self.tmp / "host1", self.tmp / "host2")
        self.procs: list[Proc] = []
        self.created = False

    def key(self, i: int) -> Path:
        return self.dirs[i] / "key.secret"

    def sock(self, i: int) -> Path:
        return self.dirs[i] / "ctl.sock"

    def cli(self, i: int, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """The CLI, run here (not in the namespace): it reaches the daemon by its unix socket."""
        return run_tool([str(WORMHOLE_BIN / "wormhole"), "-H", f"unix://{self.sock(i)}",
                         "-K", str(self.key(i)), *args], timeout * SLOW)

    def __enter__(self) -> "WormholeSide":
        # Each host its own key file, the same key (peers authenticate with it). The
        # daemons get it with -K rather than through /etc/netns/NAME/wormhole: that
        # binding needs /etc/wormhole to exist, which nothing here should create.
        alphabet = string.ascii_letters + string.digits
        key = "".join(secrets.choice(alphabet) for _ in range(32))
        try:
            for i in (0, 1):
                self.dirs[i].mkdir(parents=True, mode=0o700)
                fd = os.open(self.key(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(key + "\n")
                argv = self.bed.argv(i, WORMHOLE_BIN / "wormholed", "-H", f"unix://{self.sock(i)}",
                                     "-H", f"tcp://{UNDERLAY[i]}:9999", "-K", self.key(i),
                                     "--state-dir", self.dirs[i] / "state")
                self.procs.append(Proc(f"wormholed-{i + 1}", argv, self.dirs[i]).__enter__())
            for i in (0, 1):
                self._wait_ping(i)
            res = self.cli(0, "ping", UNDERLAY[1], timeout=20)
            if res.returncode != 0:
                raise BenchError(f"host 1's daemon cannot reach host 2's: "
                                 f"{cli_message(res.stderr, res.stdout, res.returncode)}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ping(self, i: int, timeout: float = 15) -> None:
        proc = self.procs[i]
        timeout *= SLOW
        deadline = time.monotonic() + timeout
        while True:
            if not proc.alive():
                raise BenchError(f"wormholed on host {i + 1} exited with "
                                 f"{proc.popen.returncode}: {proc.tail(1)}")
            if self.sock(i).exists() and self.cli(i, "ping", timeout=5).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"wormholed on host {i + 1} did not answer ping within "
                                 f"{timeout:.0f} s ({proc.tail(1)})")
            time.sleep(0.1)

    def create(self) -> tuple[str, str, float]:
        """tunnel-create from host 1: (local overlay IP, remote overlay IP, CLI seconds)."""
        was, self.created = self.created, True  # from here on, cleanup deletes the tunnel
        start = time.perf_counter()
        res = self.cli(0, "tunnel-create", *self.backend.create_args, UNDERLAY[1])
        seconds = time.perf_counter() - start
        if res.returncode == 2:  # a usage error (no such command): nothing was made
            self.created = was
        if res.returncode != 0:
            raise BenchError(f"tunnel-create failed: {cli_message(res.stderr, res.stdout, res.returncode)}")
        src, dst = parse_tunnel_create(res.stdout)
        return src, dst, seconds

    def delete(self) -> None:
        res = self.cli(0, "tunnel-delete", UNDERLAY[1])
        if res.returncode != 0:
            raise BenchError(f"tunnel-delete failed: {cli_message(res.stderr, res.stdout, res.returncode)}")

    def build(self, row: TunnelRow, creates: int) -> Tunnel:
        """The first create, then CREATES timed ones, each after a tunnel-delete."""
        src, dst, row.create_first_s = self.create()
        self.log(f"wormhole tunnel: {src} -> {dst} in {row.create_first_s:.3f} s (first create)")
        try:
            for _ in range(creates):
                self.delete()
                src, dst, seconds = self.create()
                row.create_s.append(seconds)
        except BenchError as exc:
            row.notes["tunnel-create"] = str(exc)
            if not self._has_address(src):  # deleted, not recreated: nothing to measure
                src, dst, _ = self.create()
        iface = None
        if self.backend.wireguard:
            iface = iface_with_address(self.bed.check(0, "ip", "-j", "addr", "show"), src)
            self.bed.ifaces.add(iface)
            row.interface = iface
        res = self.cli(0, "tunnel-list", "--json")
        entry: dict = {}
        try:
            if res.returncode != 0:
                raise BenchError(cli_message(res.stderr, res.stdout, res.returncode))
            entry = parse_tunnel_list(res.stdout, UNDERLAY[1])
            row.backend = entry.get("backend")
            want = self.backend.wormhole_backend
            if row.backend not in (None, want):
                row.notes["backend"] = (f"wormhole's tunnel runs on {row.backend}, the hand-built one "
                                        f"on {want}: the ratio compares implementations")
            if iface and entry.get("interface") not in (None, iface):
                row.notes["tunnel-list"] = f"names {entry.get('interface')}, but {src} is on {iface}"
        except BenchError as exc:
            row.notes["tunnel-list"] = f"tunnel-list: {exc}"
        bed = self.bed
        if iface:
            return Tunnel(dst, iface, lambda: _wireguard_go_pids(bed), _wireguard_sent(bed, iface), iface)
        # ipsec: no interface; what host 1 sends goes through the SA tunnel-list names.
        try:
            spi = int(entry["spi_out"], 16)
        except (KeyError, TypeError, ValueError):
            raise BenchError(f"tunnel-list names no outbound SA (spi_out) of the ipsec tunnel to "
                             f"{UNDERLAY[1]}: {row.notes.get('tunnel-list') or entry}") from None
        row.interface = None
        return Tunnel(dst, None, lambda: [], _esp_sent(bed, spi), f"ESP SA spi {spi:#010x}")

    def _has_address(self, ip: str) -> bool:
        try:
            iface_with_address(self.bed.check(0, "ip", "-j", "addr", "show"), ip)
            return True
        except BenchError:
            return False

    def __exit__(self, *exc) -> None:
        if self.created and self.procs and all(p.alive() for p in self.procs):
            with contextlib.suppress(BenchError):
                res = self.cli(0, "tunnel-delete", "--force", UNDERLAY[1], timeout=30)
                if res.returncode != 0 and "no tunnel" not in res.stderr.lower():
                    self.log(f"wormhole tunnel: cleanup: tunnel-delete: "
                             f"{cli_message(res.stderr, res.stdout, res.returncode)}")
        for proc in self.procs:
            proc.stop()
        self.procs.clear()  # the Testbed kills the wireguard-go processes left behind


def _wireguard_go_pids(bed: Testbed) -> list[int]:
    """wireguard-go processes serving wormhole's interfaces (wh-*) on either host."""
    pids = []
    for ns in bed.ns:
        with contextlib.suppress(BenchError):
            for pid in _ns_pids(ns):
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if Path(argv[0].decode(errors="replace")).name == "wireguard-go" and any(
                        a.startswith(b"wh-") for a in argv[1:]):
                    pids.append(pid)
    return pids


# --------------------------------------------------------------------------
# Measurement


@contextlib.contextmanager
def iperf3_server(bed: Testbed, ip: str, tmp: Path) -> Iterator[None]:
    """iperf3 -s on host 2, bound to the tunnel's overlay IP there."""
    with Proc(f"iperf3-server-{ip}", bed.argv(1, "iperf3", "-s", "-B", ip, "-p", IPERF_PORT), tmp) as p:
        bed.wait_listening(1, ip, IPERF_PORT, p)
        yield


def measure(bed: Testbed, tunnel: Tunnel, duration: float) -> tuple[float, float | None]:
    """One iperf3 run host 1 -> host 2 through TUNNEL: (bits/s, wireguard-go CPU s)."""
    before = tunnel.sent()
    pids = tunnel.wg_pids()
    cpu0 = [_proc_cpu(p) for p in pids]
    res = _run(bed.argv(0, "iperf3", "-c", tunnel.remote_ip, "-p", IPERF_PORT,
                        "-t", f"{duration:g}", "--json"), timeout=duration + 30)
    cpu1 = [_proc_cpu(p) for p in pids]
    try:
        bps = parse_iperf3(res.stdout)
    except BenchError:
        if res.returncode != 0 and not res.stdout.strip():
            raise BenchError(f"iperf3 exited with {res.returncode}: {cli_message(res.stderr)}") from None
        raise
    sent = tunnel.sent() - before
    if sent < 0.5 * bps * duration / 8:  # the stream went some other way
        raise BenchError(f"only {sent} bytes left through {tunnel.via} for "
                         f"{bps * duration / 8:.0f} received")
    cpu = None
    if pids and None not in cpu0 and None not in cpu1:
        cpu = sum(cpu1) - sum(cpu0)
    return bps, cpu


def run_tunnel(duration: float, log: Callable[[str], None], tmp: Path,
               rounds: int = ROUNDS, creates: int = CREATES,
               backend: str = "wireguard-go") -> tuple[list[TunnelRow], int | None]:
    """Both rows of one backend's tunnel table, and the veth MTU."""
    b = BACKENDS[backend]
    tag = "tunnel" if backend == "wireguard-go" else f"tunnel {backend}"
    rows = {name: TunnelRow(name) for name in TUNNEL_ROWS}
    if os.geteuid() != 0:
        for row in rows.values():
            row.error = "needs root (network namespaces)"
        return list(rows.values()), None
    tmp = tmp / f"tunnel-{backend}"
    tmp.mkdir(mode=0o700)
    with contextlib.ExitStack() as stack:
        try:
            bed = stack.enter_context(Testbed(log))
        except BenchError as exc:
            log(f"{tag}: test hosts: {exc}")
            for row in rows.values():
                row.error = f"test hosts: {exc}"
            return list(rows.values()), None
        tunnels: dict[str, Tunnel] = {}
        log(f"{tag}: hand-built: {b.hand_built} on both hosts")
        try:
            tunnels["hand-built"] = stack.enter_context(hand_built(b, bed, tmp))
            rows["hand-built"].interface = tunnels["hand-built"].iface
            rows["hand-built"].backend = b.wormhole_backend
        except BenchError as exc:
            log(f"{tag}: hand-built: {exc}")
            rows["hand-built"].error = str(exc)
        log(f"{tag}: wormhole: a wormholed on both hosts, tunnel-create "
            f"{' '.join(b.create_args + (UNDERLAY[1],))}")
        try:
            side = stack.enter_context(WormholeSide(bed, tmp, log, b))
            tunnels["wormhole"] = side.build(rows["wormhole"], creates)
        except BenchError as exc:
            log(f"{tag}: wormhole: {exc}")
            rows["wormhole"].error = str(exc)
        ready = []
        for name, tunnel in tunnels.items():
            try:
                if tunnel.iface:
                    rows[name].mtu = bed.link(0, tunnel.iface)["mtu"]
                stack.enter_context(iperf3_server(bed, tunnel.remote_ip, tmp))
                ready.append(name)
            except BenchError as exc:
                rows[name].notes["throughput"] = str(exc)
        cpu_used: dict[str, list[tuple[float, float]]] = {}  # name -> [(CPU s, bits/s)]
        for name in abba(ready, rounds):
            row = rows[name]
            log(f"{tag}: {name}: iperf3 to {tunnels[name].remote_ip} via {tunnels[name].via}")
            try:
                bps, cpu = measure(bed, tunnels[name], duration)
            except BenchError as exc:
                row.notes["throughput"] = str(exc)
                continue
            row.samples.append(bps)
            if cpu is not None:
                cpu_used.setdefault(name, []).append((cpu, bps))
        for name, used in cpu_used.items():
            gb = sum(bps for _, bps in used) * duration / 8 / 1e9
            if gb:
                rows[name].cpu_s_per_gb = sum(cpu for cpu, _ in used) / gb
        return list(rows.values()), bed.veth_mtu
