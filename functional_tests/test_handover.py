"""Handing a running wormholed over to its successor (wormholed --takeover, and systemd's fd
store through a stand-in for its notify socket) without losing, duplicating or resetting
anything: real daemons in two test hosts joined by veth, streams checked by sha256, resets
counted by the kernel (nstat) in both namespaces."""

import functools
import hashlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from harness import WORMHOLED, recv_all, veth, wait_for

BIG = int(os.environ.get("WORMHOLE_HANDOVER_BYTES", str(1 << 30)))  # each way
HANDOVERS = 5
SMALL_CONNS = 300
CHUNK = 1 << 20
_BLOCK = os.urandom(CHUNK)
RESET_COUNTERS = ("TcpOutRsts", "TcpEstabResets", "TcpExtTCPAbortOnData", "TcpExtTCPAbortOnClose",
                  "TcpExtTCPAbortOnTimeout")


def chunk(seed: int, i: int, size: int = CHUNK) -> bytes:
    """The i-th chunk of stream `seed`: numbered, so a lost, doubled or swapped chunk shows."""
    return (struct.pack("!QQ", seed, i) + _BLOCK[16:])[:size]


def stream(seed: int, total: int):
    i = 0
    while total > 0:
        yield chunk(seed, i, min(CHUNK, total))
        total -= CHUNK
        i += 1


def digest(seed: int, total: int) -> str:
    h = hashlib.sha256()
    for c in stream(seed, total):
        h.update(c)
    return h.hexdigest()


class Server:
    """In host h2: each connection starts with (seed_up, n_up, seed_down, n_down); the server
    sends stream(seed_down, n_down), then EOF, while it reads n_up bytes and their sha256."""

    def __init__(self, ns, port):
        with ns.entered():
            self.sock = socket.create_server(("0.0.0.0", port), backlog=1024)
        self.results: dict[int, tuple[int, str, bool]] = {}  # seed_up -> (bytes, sha256, saw EOF)
        self.errors: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            with conn:
                head = b""
                while len(head) < 32:
                    head += conn.recv(32 - len(head))
                seed_up, n_up, seed_down, n_down = struct.unpack("!QQQQ", head)
                sender = threading.Thread(target=self._send, args=(conn, seed_down, n_down))
                sender.start()
                h, got = hashlib.sha256(), 0
                while data := conn.recv(1 << 20):
                    h.update(data)
                    got += len(data)
                sender.join()
                self.results[seed_up] = (got, h.hexdigest(), True)
        except OSError as e:
            self.errors.append(f"server: {e!r}")

    def _send(self, conn, seed, total):
        try:
            for c in stream(seed, total):
                conn.sendall(c)
            conn.shutdown(socket.SHUT_WR)
        except OSError as e:
            self.errors.append(f"server send: {e!r}")


class Client:
    """In host h1, through the wormhole: sends stream(seed, n_up) and reads what comes back;
    `pause` stops its reading (so the relay's pipes fill) and its sending."""

    def __init__(self, ns, port, seed, n_up, n_down, hold_at=None):
        """hold_at: stop sending after that many bytes until resume() (the connection stays
        open, mid-stream, across whatever happens meanwhile)."""
        with ns.entered():
            self.sock = socket.socket()
        self.sock.connect(("127.0.0.1", port))
        self.seed, self.n_up, self.n_down = seed, n_up, n_down
        self.sock.sendall(struct.pack("!QQQQ", seed, n_up, seed + 1, n_down))
        self.reading = threading.Event()
        self.sending = threading.Event()
        self.reading.set()
        self.sending.set()
        self.got, self.h, self.error = 0, hashlib.sha256(), None
        self.hold_at = hold_at
        self.sent = 0
        self.threads = [threading.Thread(target=self._read, daemon=True),
                        threading.Thread(target=self._send, daemon=True)]
        for t in self.threads:
            t.start()

    def _send(self):
        try:
            for c in stream(self.seed, self.n_up):
                view = memoryview(c)
                while view:
                    if self.hold_at is not None and self.sent >= self.hold_at:
                        self.hold_at = None
                        self.sending.clear()
                    self.sending.wait()
                    n = min(len(view), 1 << 16)
                    self.sock.sendall(view[:n])
                    self.sent += n
                    view = view[n:]
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            self.error = f"send: {e!r}"

    def _read(self):
        try:
            while True:
                self.reading.wait()
                data = self.sock.recv(1 << 20)
                if not data:
                    return
                self.h.update(data)
                self.got += len(data)
        except OSError as e:
            self.error = f"recv: {e!r}"

    def pause(self):
        self.reading.clear()
        self.sending.clear()

    def resume(self):
        self.reading.set()
        self.sending.set()

    def join(self, timeout):
        for t in self.threads:
            t.join(timeout)
        return not any(t.is_alive() for t in self.threads)


def nstat(ns) -> dict[str, int]:
    out = ns.exec("nstat", "-asz", *RESET_COUNTERS, timeout=10).stdout
    return {line.split()[0]: int(line.split()[1]) for line in out.splitlines() if line and not line.startswith("#")}


def take_over(host, *args):
    """Start a successor with --takeover; the old daemon exits 0 once it took everything."""
    old = host.daemon
    host.start("--takeover", *args)
    assert old.wait(30) == 0, host.logs()
    assert "took over" in host.logs()


_WRAPPER = """import os, sys
fds = [int(x) for x in sys.argv[1].split(",")]
tmp = [os.dup(fd) for fd in fds]
for i, fd in enumerate(tmp):
    os.dup2(fd, 3 + i)
    os.set_inheritable(3 + i, True)
for fd in fds:
    if fd >= 3 + len(fds):
        os.close(fd)  # as systemd passes them: each fd once
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=sys.argv[2])
os.execv(sys.argv[3], sys.argv[3:])
"""


class StandIn:
    """As much of systemd as a daemon under --fd-store needs: its notify socket (READY=1,
    FDSTORE=1 with FDNAME=, FDSTOREREMOVE=1) and its restart, which passes the stored fds
    back as LISTEN_FDS/LISTEN_FDNAMES, in another order than they were stored."""

    def __init__(self, host, path, *args):
        self.host, self.args = host, args
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(30)
        self.env = dict(os.environ, NOTIFY_SOCKET=str(path))
        self.removed: set[str] = set()

    def start(self, stored: dict[str, int] | None = None) -> None:
        h = self.host
        argv = [WORMHOLED, "-H", h.sock, "-H", "tcp://:9999", "--state-dir", str(h.state), "--fd-store", *self.args]
        if stored:
            names = sorted(stored, reverse=True)
            fds = [stored[n] for n in names]
            argv = [sys.executable, "-c", _WRAPPER, ",".join(map(str, fds)), ":".join(names), *argv]
        else:
            fds = []
        h.daemon = h.popen(*argv, pass_fds=fds, stdout=subprocess.DEVNULL, stderr=open(h.log, "ab"), env=self.env)
        for fd in fds:
            os.close(fd)  # the store keeps nothing once passed back (the successor takes them out)
        self.removed = set()
        while (msg := self.sock.recv(1024).decode()) != "READY=1":
            if msg.startswith("FDSTOREREMOVE=1"):
                self.removed.add(msg.split("FDNAME=", 1)[1])

    def stop(self) -> dict[str, int]:
        """SIGTERM, and what the daemon put in the store before it exited (0)."""
        self.host.daemon.send_signal(signal.SIGTERM)
        stored: dict[str, int] = {}
        while True:
            msg, fds, _, _ = socket.recv_fds(self.sock, 1024, 10)
            fields = dict(line.split("=", 1) for line in msg.decode().split("\n") if "=" in line)
            if fields.get("FDSTORE") == "1":
                stored[fields["FDNAME"]] = fds[0]
                if fields["FDNAME"] == "wh-state":
                    break
        assert self.host.daemon.wait(15) == 0
        return stored

    def restart(self) -> None:
        stored = self.stop()
        self.start(stored)
        assert self.removed == set(stored), "the successor takes every fd out of the store"


@pytest.fixture
def pair(make_host):
    h1 = make_host(key="ho-key")
    h2 = make_host(key="ho-key", start=False)
    veth(h1, "192.0.2.1/24", h2, "192.0.2.2/24")
    return h1, h2


@pytest.mark.parametrize("way", ["takeover", "fd-store"])
def test_five_handovers_under_a_gigabyte_each_way_and_300_connections(make_host, tmp_path, way):
    h1 = make_host(key="ho-key", start=False)
    h2 = make_host(key="ho-key", start=False)
    pair = (h1, h2)
    veth(h1, "192.0.2.1/24", h2, "192.0.2.2/24")
    if way == "takeover":
        h1.start()
        hand_over = functools.partial(take_over, h1)
    else:
        systemd = StandIn(h1, tmp_path / "notify")
        systemd.start()
        hand_over = systemd.restart
    server = Server(h2, 7600)
    h1.create("id", "ho", "url", ":8600", "tail", "url", "192.0.2.2:7600")
    before = {h.name: nstat(h) for h in pair}
    big = Client(h1, 8600, 1000, BIG, BIG)
    # Mid-stream across every handover: half their bytes sent, their replies not read.
    small = [Client(h1, 8600, 2000 + 2 * i, 128 << 10, 256 << 10, hold_at=64 << 10) for i in range(SMALL_CONNS)]
    for c in small:
        c.reading.clear()
    half = Client(h1, 8600, 5000, 1 << 20, 8 << 20)  # sends all, EOF, then reads after the handovers
    half.reading.clear()
    assert half.join(0) is False
    deadline = time.monotonic() + 60
    while half.sent < (1 << 20) and time.monotonic() < deadline:
        time.sleep(0.05)
    refused, probes = [], []

    def probe():  # new connections all through the handovers: never refused
        n = 0
        while not stop_probing.is_set():
            try:
                c = Client(h1, 8600, 100000 + 2 * n, 1024, 1024)
                assert c.join(30) and c.error is None and c.got == 1024
                probes.append(c)
            except (OSError, AssertionError) as e:
                refused.append(repr(e))
            n += 1
            time.sleep(0.02)

    stop_probing = threading.Event()
    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    for i in range(HANDOVERS):
        while big.sent < BIG * (i + 1) // (HANDOVERS + 1) and big.error is None:
            time.sleep(0.01)
        big.pause()  # the pipes fill with what the client does not read
        time.sleep(0.2)
        hand_over()
        big.resume()
    for c in small + [half]:
        c.resume()
    stop_probing.set()
    prober.join(60)
    for c in [big, half] + small:
        assert c.join(300), f"connection {c.seed} did not finish: sent {c.sent}, got {c.got}"
    assert not refused, refused[:3]
    assert len(probes) > 5
    for c in [big, half] + small + probes:
        assert c.error is None, c.error
        assert (c.got, c.h.hexdigest()) == (c.n_down, digest(c.seed + 1, c.n_down)), f"down {c.seed}"
        assert server.results[c.seed] == (c.n_up, digest(c.seed, c.n_up), True), f"up {c.seed}"
    assert not server.errors, server.errors[:3]
    after = {h.name: nstat(h) for h in pair}
    for h in pair:
        resets = {k: after[h.name][k] - before[h.name][k] for k in RESET_COUNTERS}
        assert not any(resets.values()), f"{h.name}: {resets}"
    [row] = h1.list()
    assert row["total"] == 2 + SMALL_CONNS + len(probes)
    assert row["bytes_in"] == BIG + 32 + (1 << 20) + 32 + SMALL_CONNS * ((128 << 10) + 32) + len(probes) * (1024 + 32)
    assert h1.logs().count("took over 1 wormhole(s)") == HANDOVERS
    in_flight = [int(n) for n in re.findall(r"(\d+) bytes in flight", h1.logs())]
    assert len(in_flight) == HANDOVERS and min(in_flight) > 0, f"bytes in the relays at each handover: {in_flight}"


def test_udp_flows_keep_their_mapping_and_a_unix_head_its_file(make_host, tmp_path):
    h = make_host()
    with h.entered():
        echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 7610))
    seen = []

    def serve():
        while True:
            data, addr = echo.recvfrom(2048)
            seen.append(addr)
            echo.sendto(data, addr)

    threading.Thread(target=serve, daemon=True).start()
    h.create("id", "u", "url", "udp://:8610", "tail", "url", ":7610")
    h.echo_server(7611)
    path = str(tmp_path / "head.sock")
    h.create("id", "x", "url", f"unix://{path}", "tail", "url", ":7611")
    client = h.connect(8610, udp=True)
    client.sendall(b"before")
    assert client.recv(100) == b"before"
    held = socket.socket(socket.AF_UNIX)
    held.connect(path)
    held.sendall(b"across ")
    take_over(h)
    client.sendall(b"after")
    assert client.recv(100) == b"after"
    assert seen[0] == seen[1], "the flow's tail socket (its source port) is the same after the handover"
    held.sendall(b"the handover")
    held.shutdown(socket.SHUT_WR)
    assert recv_all(held) == b"across the handover"
    with socket.socket(socket.AF_UNIX) as s:  # the file is the successor's: new connections work
        s.connect(path)
        s.sendall(b"new")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"new"
    assert h.stop() == 0
    assert not os.path.exists(path), "removed at the successor's stop"


def test_a_refused_or_broken_takeover_leaves_the_old_daemon_serving(host):
    host.echo_server(7620)
    host.create("url", ":8620", "tail", "url", ":7620")
    held = host.connect(8620)
    held.sendall(b"one ")
    old = host.daemon
    # A successor that reads no version the running daemon writes: refused, nothing moves.
    path = host.state / "handover.sock"
    code = ("import json, socket, sys; s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); "
            f"s.connect({str(path)!r}); s.send(json.dumps({{'hello': {{'versions': [99]}}}}).encode()); "
            "print(json.loads(s.recv(4096)))")
    r = host.exec(sys.executable, "-c", code, timeout=30)
    assert "refused" in r.stdout and "version" in r.stdout, r.stdout + r.stderr
    # A successor that takes the handover and vanishes before committing: the daemon takes it back.
    code = ("import json, socket; from wormholed.handover import transfer; "
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); "
            f"s.connect({str(path)!r}); s.send(json.dumps({{'hello': {{'versions': [1]}}}}).encode()); "
            "rec, fds = transfer.receive(s); print(len(fds))")
    r = host.exec(sys.executable, "-c", code, timeout=30)
    assert r.returncode == 0 and int(r.stdout) >= 3, r.stderr
    wait_for(lambda: "did not take over" in host.logs(), 15, "the old daemon's refusal logged")
    assert old.poll() is None
    held.sendall(b"two")
    held.shutdown(socket.SHUT_WR)
    assert recv_all(held) == b"one two"
    assert host.wormhole("ping").returncode == 0
    with host.connect(8620) as s:
        s.sendall(b"three")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"three"
    # No daemon to take over from: one line, exit 1.
    r = host.exec(WORMHOLED, "--takeover", "--state-dir", str(host.dir / "empty"), timeout=30)
    assert r.returncode == 1 and "cannot take over: no running wormholed" in r.stderr



def fd_limit(pid: int, limit: str) -> None:
    subprocess.run(["prlimit", "--pid", str(pid), f"--nofile={limit}"], check=True)


def test_a_takeover_without_room_for_the_fds_is_refused_by_either_side(host):
    """Too few free fds in the old daemon (for the duplicates it hands over) or in the
    successor (for what it takes): refused with one line naming RLIMIT_NOFILE, before
    anything stops; the old daemon serves on, its connections untouched."""
    host.echo_server(7630)
    for port in range(8631, 8651):
        host.create("url", f":{port}", "tail", "url", ":7630")
    held = host.connect(8631)
    held.sendall(b"one ")
    old = host.daemon
    limits = subprocess.run(["prlimit", "--pid", str(old.pid), "--nofile", "--raw", "--noheadings",
                             "--output=SOFT,HARD"], capture_output=True, text=True, check=True).stdout.split()
    open_fds = len(os.listdir(f"/proc/{old.pid}/fd"))
    fd_limit(old.pid, f"{open_fds + 20}:{limits[1]}")  # 20 heads and the control sockets need more
    try:
        r = host.exec(WORMHOLED, "--takeover", "--state-dir", str(host.state), timeout=60)
    finally:
        fd_limit(old.pid, ":".join(limits))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "cannot take over: handing over needs" in r.stderr and "RLIMIT_NOFILE" in r.stderr, r.stderr
    assert "asks to take over" in host.logs() and "handover: 20" not in host.logs()
    # The successor short of fds: it refuses what came, the old daemon takes it back.
    r = host.exec("prlimit", "--nofile=48:48", WORMHOLED, "--takeover", "--state-dir", str(host.state), timeout=60)
    assert r.returncode == 1 and "cannot take over: taking the handover needs" in r.stderr, r.stderr
    assert old.poll() is None
    held.sendall(b"two")
    held.shutdown(socket.SHUT_WR)
    assert recv_all(held) == b"one two"
    assert host.wormhole("ping").returncode == 0
    for port in (8631, 8650):
        with host.connect(port) as s:
            s.sendall(b"three")
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == b"three"
    take_over(host)  # with room: as ever
    with host.connect(8640) as s:
        s.sendall(b"four")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"four"

def test_systemd_fd_store_through_a_stand_in(make_host, tmp_path):
    """The daemon under --fd-store puts everything in the store at SIGTERM and exits; the next
    start gets it back as LISTEN_FDS/LISTEN_FDNAMES (in another order) and empties the store."""
    h = make_host(start=False)
    systemd = StandIn(h, tmp_path / "notify")
    systemd.start()
    h.echo_server(7630)
    h.create("id", "s", "url", ":8630", "tail", "url", ":7630")
    held = h.connect(8630)
    held.sendall(b"kept ")
    systemd.restart()
    held.sendall(b"across a restart")
    held.shutdown(socket.SHUT_WR)
    assert recv_all(held) == b"kept across a restart"
    assert "took over 1 wormhole(s)" in h.logs() and h.wormhole("ping").returncode == 0


def test_a_store_too_small_stops_without_handover_and_says_so(make_host, tmp_path):
    h = make_host(start=False)
    notify = tmp_path / "notify"
    store = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    store.bind(str(notify))
    store.settimeout(15)
    env = dict(os.environ, NOTIFY_SOCKET=str(notify))
    h.daemon = h.popen(WORMHOLED, "-H", h.sock, "--state-dir", str(h.state), "--fd-store", "--fd-store-max", "4",
                       stdout=subprocess.DEVNULL, stderr=open(h.log, "ab"), env=env)
    assert store.recv(100) == b"READY=1"
    h.echo_server(7640)
    h.create("url", ":8640", "tail", "url", ":7640")
    held = h.connect(8640)
    held.sendall(b"x")
    assert held.recv(1) == b"x"
    h.daemon.send_signal(signal.SIGTERM)
    assert h.daemon.wait(15) == 0
    messages = []
    store.settimeout(0.5)
    try:
        while True:
            messages.append(store.recv(1024))
    except TimeoutError:
        pass
    assert not [m for m in messages if m.startswith(b"FDSTORE")], "nothing half-stored"
    assert "do not fit in systemd's fd store (--fd-store-max 4" in h.logs()
    try:
        assert recv_all(held) == b"", "closed, as at a stop without handover"
    except ConnectionResetError:
        pass  # reset, as at a stop without handover


def test_a_remote_wormhole_lives_on_when_either_daemon_is_taken_over(pair):
    """The parent's daemon asks its peer again for the child with the same words and keeps it;
    the child's daemon hands over the child (a remote child has no record) with the rest."""
    h1, h2 = pair
    h2.start()
    h2.echo_server(7650)
    h1.create("id", "far", "url", ":8650", "remote", "192.0.2.2", "tail", "url", ":7650")
    held = h1.connect(8650)
    held.sendall(b"one ")
    take_over(h1)
    held.sendall(b"two ")
    take_over(h2)
    held.sendall(b"three")
    held.shutdown(socket.SHUT_WR)
    assert recv_all(held) == b"one two three"
    [child] = h2.list()
    assert child["total"] == 1 and child["parent"] == "far@192.0.2.1"
    with h1.connect(8650) as s:
        s.sendall(b"new")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"new"
    h1.ok("delete", "far")
    assert h2.list() == [], "the child taken over is still the parent's to delete"
