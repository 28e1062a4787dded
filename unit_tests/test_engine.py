"""wormholed._engine, the native relay, over real loopback sockets (no root needed).

Every test checks that it left no fd open. WORMHOLE_ENGINE_SO=path loads the
extension from that file instead (``make test-engine-asan`` points it at an
ASan/UBSan build).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import hashlib
import os
import random
import resource
import select
import socket
import stat
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest
from fds import describe, no_new_fds, open_fds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wormholed import engine as _engine  # WORMHOLE_ENGINE_SO: make test-engine-asan's build

LOCAL = "127.0.0.1"
LINGER0 = b"\1\0\0\0\0\0\0\0"
RESETS = (errno.ECONNRESET, errno.EPIPE)


@pytest.fixture(autouse=True)
def no_fd_leak():
    with no_new_fds():
        yield


@pytest.fixture
def eng():
    engine = _engine.Engine()
    try:
        yield engine
    finally:
        engine.close()


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in time"
        time.sleep(0.005)


def counted(stats, expected: tuple) -> None:
    """stats() reaches expected (counters move on the engine's thread, after the bytes do)."""
    wait_for(lambda: stats() == expected, what=f"stats {expected}")
    assert stats() == expected


def listening(host: str = LOCAL, backlog: int = 1024) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(backlog)
    return sock


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return s.getsockname()[1]


class Setup:
    """An engine listener on loopback whose target is a server socket the test accepts on."""

    def __init__(self, eng, target: bool = True, host: str = LOCAL, rcvbuf: int = 0):
        """rcvbuf: the SO_RCVBUF of the engine's client sockets (they inherit the head's)."""
        self.eng = eng
        self.server = listening(host)
        head = listening(host)
        head.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if rcvbuf:
            head.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        head.setblocking(False)
        self.addr = head.getsockname()[:2]
        self.lid = eng.listen(head.fileno())
        head.close()  # the engine has its own dup
        self.family = self.server.family
        if target:
            eng.set_target(self.lid, self.family, host, self.server.getsockname()[1])
        self.socks: list[socket.socket] = []

    def pair(self, bufsize: int = 0) -> tuple[socket.socket, socket.socket]:
        """(client, the server's end) of one relayed connection; bufsize: their SO_SNDBUF and SO_RCVBUF."""
        client = socket.socket(self.family)
        self.socks.append(client)
        for sock in (client, self.server) if bufsize else ():  # the server's end inherits its listener's
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
        client.settimeout(10)
        client.connect(self.addr)
        self.server.settimeout(10)
        conn, _ = self.server.accept()
        conn.settimeout(10)
        self.socks.append(conn)
        return client, conn

    def stats(self):
        return self.eng.stats(self.lid)

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.server.close()
        with contextlib.suppress(ValueError):
            self.eng.unlisten(self.lid)


@pytest.fixture
def setup(eng):
    s = Setup(eng)
    try:
        yield s
    finally:
        s.close()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(min(n - len(buf), 1 << 20))
        assert data, f"EOF after {len(buf)} of {n} bytes"
        buf += data
    return bytes(buf)


def outcome(sock: socket.socket, timeout: float = 5.0) -> str:
    """'eof', 'reset' or 'data' for what the socket gets next."""
    sock.settimeout(timeout)
    try:
        return "data" if sock.recv(65536) else "eof"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"


def reset_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
    sock.close()


def wait_handoffs(eng, count: int = 1, timeout: float = 10.0) -> list:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"{len(got)} handoffs of {count}"
        if select.select([eng.fileno()], [], [], left)[0]:
            got += eng.handoffs()
    return got


# --------------------------------------------------------------------------
# bytes


def test_bytes_both_ways(setup):
    client, server = setup.pair()
    client.sendall(b"ping")
    assert recv_exactly(server, 4) == b"ping"
    server.sendall(b"pong!")
    assert recv_exactly(client, 5) == b"pong!"
    counted(setup.stats, (1, 1, 4, 5, 0))  # the engine counts bytes once written: after the reader may have them


def test_ipv6(eng):
    if not socket.has_ipv6 or not os.path.exists("/proc/net/if_inet6"):
        pytest.skip("no IPv6")
    s = Setup(eng, host="::1")
    try:
        client, server = s.pair()
        client.sendall(b"six")
        assert recv_exactly(server, 3) == b"six"
    finally:
        s.close()


def _pump_concurrently(client, server, up: bytes, down: bytes, sent: tuple[int, int] = (0, 0)) -> None:
    """Send up from client and down from server (but for the first sent bytes of each, sent already),
    receive each whole at the other end."""
    results = {}

    def send(sock, data):
        sock.sendall(data)

    def receive(name, sock, n):
        h = hashlib.sha256()
        got = 0
        while got < n:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            h.update(chunk)
            got += len(chunk)
        results[name] = (got, h.hexdigest())

    threads = [threading.Thread(target=send, args=(client, up[sent[0]:])),
               threading.Thread(target=send, args=(server, down[sent[1]:])),
               threading.Thread(target=receive, args=("up", server, len(up))),
               threading.Thread(target=receive, args=("down", client, len(down)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results["up"] == (len(up), hashlib.sha256(up).hexdigest())
    assert results["down"] == (len(down), hashlib.sha256(down).hexdigest())


def test_64_mib_each_way_concurrently(setup):
    client, server = setup.pair()
    for s in (client, server):
        s.settimeout(60)
    up, down = os.urandom(64 << 20), os.urandom(64 << 20)
    _pump_concurrently(client, server, up, down)
    client.shutdown(socket.SHUT_WR)
    assert outcome(server) == "eof"
    server.close()
    assert outcome(client) == "eof"
    wait_for(lambda: setup.stats()[0] == 0)
    assert setup.stats() == (0, 1, 64 << 20, 64 << 20, 0)


def test_keep_alive_small_messages_and_bulk_in_between(setup):
    """Small request/replies (read/write mode), bulk bursts (splice), and back again."""
    client, server = setup.pair()
    rng = random.Random(7)
    up = down = 0
    for i in range(600):
        if i % 100 == 50:  # a bulk burst both ways switches to splice
            big = rng.randbytes(3 << 20)
            _pump_concurrently(client, server, big, big[::-1])
            up += len(big)
            down += len(big)
            continue
        request = rng.randbytes(rng.randrange(1, 300))
        client.sendall(request)
        assert recv_exactly(server, len(request)) == request
        reply = rng.randbytes(rng.randrange(1, 3000))
        server.sendall(reply)
        assert recv_exactly(client, len(reply)) == reply
        up += len(request)
        down += len(reply)
    counted(setup.stats, (1, 1, up, down, 0))  # the engine counts bytes once written: after the reader may have them


def test_many_connections_at_once(setup):
    pairs = [setup.pair() for _ in range(100)]
    for i, (client, server) in enumerate(pairs):
        client.sendall(b"%d" % i)
    for i, (client, server) in enumerate(pairs):
        assert recv_exactly(server, len(b"%d" % i)) == b"%d" % i
        server.sendall(b"r%d" % i)
    for i, (client, server) in enumerate(pairs):
        assert recv_exactly(client, len(b"r%d" % i)) == b"r%d" % i
    assert setup.stats()[:2] == (100, 100)


def stuff(sock: socket.socket, data: bytes, quiet: float = 0.5) -> int:
    """Send data until the path to a peer that reads nothing stays full for `quiet` seconds: how much
    was sent (the socket left with a 30 s timeout)."""
    sock.setblocking(False)
    sent = 0
    stalled = time.monotonic()
    while time.monotonic() - stalled < quiet:
        try:
            sent += sock.send(data[sent:sent + (1 << 20)])
            stalled = time.monotonic()
        except BlockingIOError:
            time.sleep(0.01)
        assert sent < len(data), "the sender never blocked"
    sock.settimeout(30)
    return sent


def test_back_pressure_loses_nothing(setup):
    """The server reads nothing for a while: the client blocks; then every byte arrives."""
    client, server = setup.pair()
    data = os.urandom(48 << 20)
    sent = stuff(client, data)
    assert setup.stats()[2] <= sent
    sender = threading.Thread(target=client.sendall, args=(data[sent:],))
    sender.start()
    assert recv_exactly(server, len(data)) == data
    sender.join()


SPLICE_SHIM = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
int refused;
static int is_socket(int fd) { struct stat st; return fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode); }
ssize_t splice(int in, loff_t *a, int out, loff_t *b, size_t len, unsigned int flags) {
    const char *side = getenv("REFUSE");
    if (side && is_socket(strcmp(side, "in") == 0 ? in : out)) {
        __atomic_fetch_add(&refused, 1, __ATOMIC_RELAXED);
        errno = EINVAL;
        return -1;
    }
    return syscall(SYS_splice, in, a, out, b, len, flags);
}
"""

SPLICE_CHILD = """
import ctypes, os, sys
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "..", "functional_tests")]  # test_engine; fds
import test_engine as t
eng = t._engine.Engine()
s = t.Setup(eng)
client, server = s.pair()
for sock in (client, server):
    sock.settimeout(30)
t._pump_concurrently(client, server, os.urandom(8 << 20), os.urandom(8 << 20))
client.sendall(b"small")
assert t.recv_exactly(server, 5) == b"small"
s.close()
eng.close()
print(ctypes.c_int.in_dll(ctypes.CDLL(sys.argv[2]), "refused").value)
"""


@pytest.mark.parametrize("side", ["in", "out"], ids=["socket to pipe", "pipe to socket"])
def test_copy_mode_when_splice_refuses_the_fds(tmp_path, side):
    """splice() EINVAL (an LD_PRELOAD shim says so for sockets): the bytes go by read/write, intact."""
    shim = tmp_path / "splice_shim.so"
    src = tmp_path / "splice_shim.c"
    src.write_text(SPLICE_SHIM)
    try:
        subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(shim), str(src)], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no C compiler for the shim: {exc}")
    env = dict(os.environ, REFUSE=side,
               LD_PRELOAD=f"{os.environ.get('LD_PRELOAD', '')} {shim}".strip())
    res = subprocess.run([sys.executable, "-c", SPLICE_CHILD, os.path.dirname(__file__), str(shim)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert int(res.stdout.split()[-1]) > 0  # splice was refused, and the engine copied instead


# --------------------------------------------------------------------------
# half-close and resets


@pytest.mark.parametrize("who", ["client", "server"])
def test_half_close_passes_on_and_the_other_way_still_flows(setup, who):
    client, server = setup.pair()
    a, b = (client, server) if who == "client" else (server, client)
    a.sendall(b"request")
    a.shutdown(socket.SHUT_WR)
    assert recv_exactly(b, 7) == b"request"
    assert outcome(b) == "eof"
    for _ in range(3):  # the other direction keeps flowing
        b.sendall(b"reply" * 1000)
        assert recv_exactly(a, 5000) == b"reply" * 1000
    b.sendall(os.urandom(2 << 20))  # bulk too, after the EOF
    assert len(recv_exactly(a, 2 << 20)) == 2 << 20
    b.shutdown(socket.SHUT_WR)
    assert outcome(a) == "eof"
    wait_for(lambda: setup.stats()[0] == 0, what="the relay closed after both EOFs")


@pytest.mark.parametrize("who", ["client", "server"])
def test_a_reset_passes_on_as_a_reset(setup, who):
    client, server = setup.pair()
    a, b = (client, server) if who == "client" else (server, client)
    a.sendall(b"ping")
    assert recv_exactly(b, 4) == b"ping"
    reset_close(a)
    assert outcome(b) == "reset"
    wait_for(lambda: setup.stats()[0] == 0)


@pytest.mark.parametrize("who", ["client", "server"])
def test_a_reset_after_eof_passes_on(setup, who):
    """a shuts, b sees EOF, then a resets while idle: b's socket is reset too."""
    client, server = setup.pair()
    a, b = (client, server) if who == "client" else (server, client)
    a.shutdown(socket.SHUT_WR)
    assert outcome(b) == "eof"
    reset_close(a)
    wait_for(lambda: setup.stats()[0] == 0, what="the relay reset")
    poller = select.poll()
    poller.register(b, select.POLLIN)
    assert poller.poll(5000)[0][1] & select.POLLERR
    assert b.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) in RESETS


def test_sending_to_a_closed_end_resets_the_sender(setup):
    client, server = setup.pair()
    server.close()
    assert outcome(client) == "eof"
    client.sendall(b"anyone there?")  # the server's kernel answers with a reset
    wait_for(lambda: setup.stats()[0] == 0)
    with pytest.raises(OSError) as exc:
        for _ in range(100):
            client.sendall(b"x")
            time.sleep(0.01)
    assert exc.value.errno in RESETS


# --------------------------------------------------------------------------
# handoffs and relay()


def test_without_target_every_connection_is_handed_off_and_relay_takes_it_back(eng):
    s = Setup(eng, target=False)
    try:
        clients = [socket.create_connection(s.addr, timeout=10) for _ in range(3)]
        s.socks += clients
        handed = wait_handoffs(eng, 3)
        assert [(lid, err) for lid, _, err in handed] == [(s.lid, 0)] * 3
        assert not select.select([eng.fileno()], [], [], 0)[0]  # reading them reset the eventfd
        assert eng.handoffs() == []
        assert s.stats() == (3, 3, 0, 0, 0)  # handed off: still open (Python holds them)
        for _, fd, _ in handed:
            tail = socket.create_connection(s.server.getsockname(), timeout=10)
            tail.setblocking(False)
            os.set_blocking(fd, False)
            eng.relay(s.lid, fd, tail.detach())
        assert s.stats()[:2] == (3, 3)  # relay() takes them back, counted once
        servers = []
        for _ in clients:
            conn, _ = s.server.accept()
            conn.settimeout(10)
            servers.append(conn)
        s.socks += servers
        for i, c in enumerate(clients):
            c.sendall(b"hello %d" % i)
        got = sorted(recv_exactly(conn, 7) for conn in servers)
        assert got == [b"hello %d" % i for i in range(3)]
        for conn in servers:
            conn.sendall(b"back")
        for c in clients:
            assert recv_exactly(c, 4) == b"back"
        counted(s.stats, (3, 3, 21, 12, 0))  # the engine counts bytes once written: after the reader may have them
    finally:
        s.close()


def test_a_refused_connect_is_handed_off_with_its_errno(eng):
    s = Setup(eng, target=False)
    try:
        eng.set_target(s.lid, socket.AF_INET, LOCAL, free_port())
        client = socket.create_connection(s.addr, timeout=10)
        s.socks.append(client)
        client.sendall(b"early")
        [(lid, fd, err)] = wait_handoffs(eng)
        assert (lid, err) == (s.lid, errno.ECONNREFUSED)
        with socket.socket(fileno=fd) as handed:  # Python owns it: the client's bytes are there
            handed.settimeout(5)
            assert handed.recv(100) == b"early"
        assert s.stats() == (1, 1, 0, 0, 0)  # open until Python says it dropped it
        eng.dropped(s.lid)
        assert s.stats() == (0, 1, 0, 0, 0)
        eng.clear_target(s.lid)
        s.socks.append(socket.create_connection(s.addr, timeout=10))
        [(lid, fd, err)] = wait_handoffs(eng)
        assert err == 0
        os.close(fd)
    finally:
        s.close()


@contextlib.contextmanager
def hanging_server():
    """The port of a server whose accept queue is full: it drops SYNs, a connect hangs."""
    full = listening(backlog=0)
    fillers = []
    try:
        for _ in range(8):  # fill the accept queue (backlog 0 still takes one or two)
            f = socket.socket()
            f.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                f.connect(full.getsockname())
            fillers.append(f)
        time.sleep(0.2)
        yield full.getsockname()[1]
    finally:
        for f in fillers:
            f.close()
        full.close()


def test_a_connect_that_hangs_is_handed_off_after_the_timeout(eng):
    """A server whose accept queue is full drops SYNs: the connect times out (5 s)."""
    s = Setup(eng, target=False)
    try:
        with hanging_server() as port:
            eng.set_target(s.lid, socket.AF_INET, LOCAL, port)
            started = time.monotonic()
            s.socks.append(socket.create_connection(s.addr, timeout=10))
            [(lid, fd, err)] = wait_handoffs(eng, timeout=20)
            os.close(fd)
            assert err == errno.ETIMEDOUT
            assert time.monotonic() - started >= _engine.CONNECT_TIMEOUT_MS / 1000 - 0.1
    finally:
        s.close()


def test_target_in_the_current_namespace_by_fd(eng):
    s = Setup(eng, target=False)
    ns = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        eng.set_target(s.lid, socket.AF_INET, LOCAL, s.server.getsockname()[1], ns)
        os.close(ns)  # the engine keeps its own dup (if it needs one)
        ns = -1
        for _ in range(40):  # more than a batch of spares
            client, server = s.pair()
            client.sendall(b"ns")
            assert recv_exactly(server, 2) == b"ns"
    finally:
        if ns >= 0:
            os.close(ns)
        s.close()


def test_unlisten_resets_live_connections_and_drops_pending_handoffs(eng):
    s = Setup(eng)
    port = s.addr[1]
    live = [s.pair() for _ in range(5)]
    for client, server in live:
        client.sendall(b"x")
        assert recv_exactly(server, 1) == b"x"
    eng.clear_target(s.lid)
    pending = socket.create_connection(s.addr, timeout=10)
    s.socks.append(pending)
    wait_for(lambda: select.select([eng.fileno()], [], [], 0)[0], what="a handoff")
    eng.unlisten(s.lid)
    for client, server in live:
        assert outcome(client) == "reset"
        assert outcome(server) == "reset"
    assert outcome(pending) == "reset"  # handed off, not taken: reset with its lid
    assert eng.handoffs() == []
    with pytest.raises(ValueError):
        eng.stats(s.lid)
    with pytest.raises(ValueError):
        eng.unlisten(s.lid)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOCAL, port), timeout=5).close()
    s.close()


def test_stats_count_open_and_total(setup):
    pairs = [setup.pair() for _ in range(10)]
    for client, server in pairs:
        client.sendall(b"abc")
        assert recv_exactly(server, 3) == b"abc"
    counted(setup.stats, (10, 10, 30, 0, 0))  # the engine counts bytes once written: after the reader may have them
    for client, server in pairs[:4]:
        client.close()
        server.close()
    wait_for(lambda: setup.stats()[0] == 6)
    assert setup.stats() == (6, 10, 30, 0, 0)


# --------------------------------------------------------------------------
# limits: max_conns, idle_ms


def exchange(client: socket.socket, server: socket.socket, data: bytes = b"x") -> None:
    client.sendall(data)
    assert recv_exactly(server, len(data)) == data
    server.sendall(data)
    assert recv_exactly(client, len(data)) == data


def turned_away(addr) -> str:
    """What a new client gets: 'reset' (at connect, or at its first read), 'eof' or 'data'."""
    try:
        sock = socket.create_connection(addr, timeout=10)
    except ConnectionResetError:
        return "reset"
    with sock:
        return outcome(sock)


def nothing_accepted(server: socket.socket) -> bool:
    server.settimeout(0.2)
    try:
        server.accept()[0].close()
    except TimeoutError:
        return True
    return False


def test_max_conns_resets_the_next_connection_and_the_others_relay_on(setup):
    setup.eng.set_limits(setup.lid, 3, 0)
    pairs = [setup.pair() for _ in range(3)]
    for client, server in pairs:
        exchange(client, server)
    assert turned_away(setup.addr) == "reset"  # accepted, then reset at once
    assert nothing_accepted(setup.server)  # never relayed
    counted(setup.stats, (3, 3, 3, 3, 1))  # refused, not in total
    for client, server in pairs:
        exchange(client, server, b"still relaying")


def test_max_conns_lets_new_connections_in_once_others_closed(setup):
    setup.eng.set_limits(setup.lid, 2, 0)
    (a, a_server), (b, b_server) = setup.pair(), setup.pair()
    a.close()
    a_server.close()
    wait_for(lambda: setup.stats()[0] == 1, what="a closed")
    client, server = setup.pair()  # room again
    exchange(client, server)
    exchange(b, b_server)
    assert turned_away(setup.addr) == "reset"
    counted(setup.stats, (2, 3, 2, 2, 1))


def test_max_conns_counts_handed_off_connections_until_dropped(eng):
    s = Setup(eng, target=False)
    try:
        eng.set_limits(s.lid, 1, 0)
        s.socks.append(socket.create_connection(s.addr, timeout=10))
        [(_, fd, _)] = wait_handoffs(eng)  # Python holds it: still one of lid's connections
        assert turned_away(s.addr) == "reset"
        assert s.stats() == (1, 1, 0, 0, 1)
        os.close(fd)
        eng.dropped(s.lid)
        s.socks.append(socket.create_connection(s.addr, timeout=10))
        [(_, fd, _)] = wait_handoffs(eng)
        os.close(fd)
        eng.dropped(s.lid)
        assert s.stats() == (0, 2, 0, 0, 1)
    finally:
        s.close()


def test_idle_timeout_resets_idle_connections_and_spares_a_trickling_one(setup):
    """idle_ms 2000: a pair relayed before set_limits and one after, both idle, are reset on both sides
    and their engine fds closed; a pair moving a byte every 250 ms (either way) lives on (1.75 s of
    room for a stall of this test's own process, which sends the trickle)."""
    idle_ms, every = 2000, 0.25
    trickle, before = setup.pair(), setup.pair()
    setup.eng.set_limits(setup.lid, 0, idle_ms)
    after = setup.pair()
    for pair in (trickle, before, after):
        exchange(*pair)
    fds = len(open_fds())
    deadline = time.monotonic() + 3 * idle_ms / 1000
    i = 0
    while time.monotonic() < deadline:
        time.sleep(every)
        a, b = trickle if i % 2 else trickle[::-1]
        a.sendall(b"t")
        assert recv_exactly(b, 1) == b"t"
        i += 1
    for client, server in (before, after):
        assert outcome(client) == "reset"
        assert outcome(server) == "reset"
    wait_for(lambda: setup.stats()[0] == 1, what="the idle relays closed")
    assert len(open_fds()) == fds - 4  # the engine's two fds of each
    exchange(*trickle, b"still here")
    setup.eng.set_limits(setup.lid, 0, 0)  # no timeout any more: trickle leaves the idle list
    time.sleep(idle_ms / 1000 + 0.3)
    exchange(*trickle, b"and here")


def test_errors(eng):
    with pytest.raises(ValueError):
        eng.stats(12345)
    with pytest.raises(ValueError):
        eng.set_target(12345, socket.AF_INET, LOCAL, 80)
    with pytest.raises(ValueError):
        eng.relay(12345, 100, 101)
    with pytest.raises(ValueError):
        eng.set_limits(12345, 1, 0)
    with pytest.raises(ValueError):
        eng.dropped(12345)
    with socket.socket() as s:  # not listening
        with pytest.raises(OSError) as exc:
            eng.listen(s.fileno())
        assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        eng.listen(9999)
    assert exc.value.errno == errno.EBADF
    s = Setup(eng, target=False)
    try:
        with pytest.raises(ValueError):
            eng.set_target(s.lid, socket.AF_INET, "not an address", 80)
        with pytest.raises(ValueError):
            eng.set_target(s.lid, socket.AF_INET6, LOCAL, 80)
        with pytest.raises(ValueError):
            eng.set_target(s.lid, socket.AF_UNIX, LOCAL, 80)
        with pytest.raises(ValueError):
            eng.set_target(s.lid, socket.AF_INET, LOCAL, 0)
        with pytest.raises(ValueError):
            eng.set_limits(s.lid, -1, 0)
        with pytest.raises(ValueError):
            eng.set_limits(s.lid, 0, -1)
    finally:
        s.close()


def engine_threads() -> int:
    n = 0
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/comm") as f:
            n += f.read().strip() == "wormhole-engine"
    return n


def thread_gone(before: int) -> None:
    """The joined thread leaves /proc/self/task: pthread_join returns when the kernel clears the
    thread's tid, a moment before the task is released."""
    wait_for(lambda: engine_threads() == before, timeout=5, what="the engine thread gone")


def test_close_joins_the_thread_and_is_idempotent():
    before = engine_threads()
    engine = _engine.Engine()
    assert engine_threads() == before + 1
    s = Setup(engine)
    client, server = s.pair()
    engine.close()
    thread_gone(before)
    assert outcome(client) == "reset"
    engine.close()
    with pytest.raises(ValueError):
        engine.stats(s.lid)
    with pytest.raises(ValueError):
        engine.fileno()
    for sock in s.socks:
        sock.close()
    s.server.close()
    engine = _engine.Engine()  # dealloc closes it too
    del engine
    gc.collect()
    thread_gone(before)


def test_calls_from_many_threads_while_connections_flow(eng):
    """listen/set_target/stats/unlisten from several threads at once, clients meanwhile, then close()."""
    server = listening()
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn():
        try:
            while not stop.is_set():
                head = listening()
                head.setblocking(False)
                lid = eng.listen(head.fileno())
                eng.set_target(lid, socket.AF_INET, LOCAL, server.getsockname()[1])
                with contextlib.suppress(OSError), socket.create_connection(head.getsockname(), timeout=5) as c:
                    c.sendall(b"x")
                head.close()
                eng.stats(lid)
                eng.clear_target(lid)
                eng.unlisten(lid)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def drain():
        server.settimeout(0.05)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                server.accept()[0].close()

    threads = [threading.Thread(target=churn) for _ in range(3)] + [threading.Thread(target=drain)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(10)
    server.close()
    assert not errors, errors
    eng.close()


@pytest.fixture
def many_fds():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_an_idle_relayed_connection_holds_two_fds_and_no_pipe(setup, many_fds):
    def pipes():
        return sum(1 for link in describe(open_fds()).values() if link.startswith("pipe:"))

    bulk = [setup.pair() for _ in range(2)]  # a bulk transfer fills the pipe pool...
    for client, server in bulk:
        _pump_concurrently(client, server, os.urandom(4 << 20), os.urandom(4 << 20))
    time.sleep(0.1)
    pooled = pipes()
    assert pooled >= 2  # ...with the pipes the bulk directions took back
    before = len(open_fds())
    pairs = [setup.pair() for _ in range(500)]
    for client, server in pairs:
        client.sendall(b"hi")
        assert recv_exactly(server, 2) == b"hi"
        server.sendall(b"there")
        assert recv_exactly(client, 5) == b"there"
    wait_for(lambda: setup.stats()[0] == 502)
    # the test's own two ends + the engine's two fds per connection; no pipe held
    assert len(open_fds()) - before == 500 * 4
    assert pipes() == pooled
    for client, server in bulk:  # pipes parked by idle bulk directions go back to the pool (PIPE_IDLE_MS)
        client.close()
        server.close()
    wait_for(lambda: setup.stats()[0] == 500)
    assert pipes() == pooled


def test_accepting_pauses_when_out_of_fds_and_resumes(setup):
    """EMFILE: the engine stops accepting for a while, then takes the waiting clients."""
    clients = [socket.socket() for _ in range(20)]
    setup.socks += clients
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = set(map(int, open_fds()))
    free = [fd for fd in range(len(used) + 8) if fd not in used]
    try:  # room for 4 more fds only (the limit bounds fd numbers); connect() needs none
        resource.setrlimit(resource.RLIMIT_NOFILE, (free[3] + 1, hard))
        for c in clients:
            c.connect(setup.addr)
        time.sleep(0.5)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # a client accepted just before the limit may have been handed off (no fd for its tail)
    handed = {fd: err for _, fd, err in setup.eng.handoffs()}
    assert set(handed.values()) <= {errno.EMFILE}
    for fd in handed:
        os.close(fd)
    wait_for(lambda: setup.stats()[1] == 20, what="every client accepted")
    relayed = 20 - len(handed)
    assert relayed > 0
    for _ in range(relayed):
        conn, _ = setup.server.accept()
        setup.socks.append(conn)
        conn.sendall(b"resumed")
    got = 0
    for c in clients:
        c.settimeout(5)
        try:
            if c.recv(7) == b"resumed":
                got += 1
        except (ConnectionResetError, TimeoutError):
            pass
    assert got == relayed


# --------------------------------------------------------------------------
# export and adopt: a successor takes the live connections over


TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSE_WAIT = 1, 4, 5, 8
LINGER_OFF = b"\0" * 8
NOTHING = (-1, -1, 0, b"", False)  # a half with no byte pending, not done


def sock_state(fd: int) -> tuple[int, bytes, int]:
    """(TCP state, SO_LINGER, SO_ERROR) of socket fd, read through a dup."""
    with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as s:
        return (s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0],
                s.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8), s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))


def in_pipe(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def check_half(half) -> None:
    """An exported half: a pipe only if it holds bytes, and then exactly pipe_pending of them."""
    pr, pw, pending, buffered, done = half
    assert isinstance(buffered, bytes) and isinstance(done, bool)
    if pr < 0:
        assert (pw, pending) == (-1, 0)
    else:
        assert stat.S_ISFIFO(os.fstat(pr).st_mode) and stat.S_ISFIFO(os.fstat(pw).st_mode)
        assert pending > 0 and in_pipe(pr) == pending


@contextlib.contextmanager
def successor():
    """(engine, lid): a second engine and a listener of its, as a successor process would have."""
    engine = _engine.Engine()
    try:
        with listening() as head:
            lid = engine.listen(head.fileno())
        yield engine, lid
    finally:
        engine.close()


def tcp_pair(bufsize: int = 0) -> tuple[socket.socket, socket.socket]:
    """(a, b) connected over loopback; bufsize: a's SO_SNDBUF and b's SO_RCVBUF."""
    with listening() as srv:
        a = socket.socket()
        if bufsize:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)  # b inherits it
        a.settimeout(10)
        a.connect(srv.getsockname())
        b = srv.accept()[0]
    b.settimeout(10)
    return a, b


def test_export_mid_stream_then_adopt_loses_nothing(eng):
    """Both ways stuffed, nobody reading: the engine holds bytes in its buffers and pipes. Exported, every
    socket is open, established and untouched; adopted by a second engine, every byte arrives once and in
    order, and the two engines' byte counters add up to what moved."""
    s = Setup(eng, rcvbuf=16384)  # the engine's reads from the client stay short: read/write mode
    sizes = (16 << 20, 48 << 20)  # more than the paths hold (the engine's tail socket may take 32 MB)
    try:
        pairs = [s.pair(bufsize=65536) for _ in range(2)]  # small: the engine's buffers fill first
        data = [(os.urandom(sizes[0]), os.urandom(sizes[1])) for _ in pairs]
        sent = [(stuff(c, up, 0.3), stuff(srv, down, 0.3)) for (c, srv), (up, down) in zip(pairs, data)]
        relayed, clients = eng.export(s.lid)
        assert clients == [] and len(relayed) == 2
        assert s.stats()[:2] == (0, 2)
        for client_fd, tail_fd, up, down, last_ms_ago in relayed:
            for fd in (client_fd, tail_fd):
                assert sock_state(fd) == (TCP_ESTABLISHED, LINGER_OFF, 0)
            check_half(up)
            check_half(down)
            assert not up[4] and not down[4] and 0 <= last_ms_ago < 60_000
            assert up[0] < 0 and up[3]  # short reads: what the tail did not take is in the buffer
            assert down[2] or down[3]
        assert any(down[2] for _, _, _, down, _ in relayed)  # bulk reads: spliced, bytes in the pipe
        with successor() as (eng2, lid2):
            for r in relayed:
                eng2.adopt(lid2, *r[:4])
            assert eng2.stats(lid2)[:2] == (2, 2)
            for (client, server), (up, down), done in zip(pairs, data, sent):
                _pump_concurrently(client, server, up, down, done)
            wait_for(lambda: [a + b for a, b in zip(s.stats()[2:4], eng2.stats(lid2)[2:4])] == [2 * n for n in sizes],
                     what="each byte counted once")
            for client, server in pairs:
                client.shutdown(socket.SHUT_WR)
                assert outcome(server) == "eof"
                server.shutdown(socket.SHUT_WR)
                assert outcome(client) == "eof"
            wait_for(lambda: eng2.stats(lid2)[0] == 0, what="the adopted relays closed")
    finally:
        s.close()


def test_a_half_closed_connection_exported_flows_on_the_other_way(setup):
    client, server = setup.pair(bufsize=65536)
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)
    assert recv_exactly(server, 7) == b"request"
    assert outcome(server) == "eof"
    reply = os.urandom(48 << 20)
    sent = stuff(server, reply, 0.3)  # the client reads nothing yet
    [(client_fd, tail_fd, up, down, _)], [] = setup.eng.export(setup.lid)
    assert up == (-1, -1, 0, b"", True)  # EOF passed on
    check_half(down)
    assert not down[4] and (down[2] or down[3])
    assert sock_state(client_fd)[0] == TCP_CLOSE_WAIT  # the client's FIN came
    assert sock_state(tail_fd)[0] in (TCP_FIN_WAIT1, TCP_FIN_WAIT2)  # the engine's went
    with successor() as (eng2, lid2):
        eng2.adopt(lid2, client_fd, tail_fd, up, down)
        sender = threading.Thread(target=server.sendall, args=(reply[sent:],))
        sender.start()
        assert hashlib.sha256(recv_exactly(client, len(reply))).digest() == hashlib.sha256(reply).digest()
        sender.join()
        server.shutdown(socket.SHUT_WR)
        assert outcome(client) == "eof"
        wait_for(lambda: eng2.stats(lid2)[0] == 0, what="both EOFs: closed")
        assert eng2.stats(lid2)[:3] == (0, 1, 0)
        assert setup.stats()[3] + eng2.stats(lid2)[3] == len(reply)


def test_a_client_whose_tail_connect_is_in_progress_is_exported_alone(eng):
    s = Setup(eng, target=False)
    try:
        with hanging_server() as port:
            eng.set_target(s.lid, socket.AF_INET, LOCAL, port)
            client = socket.create_connection(s.addr, timeout=10)
            s.socks.append(client)
            client.sendall(b"early")
            wait_for(lambda: s.stats()[:2] == (1, 1), what="the client accepted")
            before = len(open_fds())
            relayed, [fd] = eng.export(s.lid)
            assert len(open_fds()) == before - 2  # the tail being connected, the engine's listening dup
        assert relayed == []
        with socket.socket(fileno=fd) as handed:
            assert sock_state(fd) == (TCP_ESTABLISHED, LINGER_OFF, 0)
            assert handed.getpeername() == client.getsockname()
            assert handed.recv(5) == b"early"
            handed.sendall(b"still here")
            assert recv_exactly(client, 10) == b"still here"
        assert s.stats() == (0, 1, 0, 0, 0)
        assert eng.handoffs() == []
    finally:
        s.close()


def test_export_without_relayed_connections_and_lid_afterwards(eng):
    """([], []); the listening socket is Python's (a new client waits in its backlog); a client handed off
    stays open until dropped(); relay, adopt and export refused; stats, dropped and unlisten go on."""
    head = listening()
    lid = eng.listen(head.fileno())
    clients = [socket.create_connection(head.getsockname(), timeout=10)]
    try:
        [(_, fd, _)] = wait_handoffs(eng)
        assert eng.export(lid) == ([], [])
        assert eng.stats(lid) == (1, 1, 0, 0, 0)
        for call in (lambda: eng.export(lid), lambda: eng.relay(lid, fd, 1000),
                     lambda: eng.adopt(lid, fd, 1000, NOTHING, NOTHING)):
            with pytest.raises(ValueError, match="exported"):
                call()
        os.close(fd)
        eng.dropped(lid)
        assert eng.stats(lid) == (0, 1, 0, 0, 0)
        clients.append(socket.create_connection(head.getsockname(), timeout=10))
        time.sleep(0.2)
        assert eng.stats(lid)[1] == 1 and eng.handoffs() == []
        head.settimeout(5)
        head.accept()[0].close()
        eng.unlisten(lid)
        with pytest.raises(ValueError):
            eng.stats(lid)
    finally:
        for c in clients:
            c.close()
        head.close()


def test_adopt_writes_buffered_then_the_pipe_then_reads_on_and_counts():
    client, client_end = tcp_pair()  # *_end: the engine's sockets
    tail_end, server = tcp_pair()
    done_a, done_b = tcp_pair()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    os.write(w, b" world")
    ends = (client_end, tail_end, done_a, done_b)
    try:
        with successor() as (eng, lid):
            eng.add_stats(lid, 5, 100, 200, 3)
            assert eng.stats(lid) == (0, 5, 100, 200, 3)
            for bad in ((r, w, 5, b"", False), (r, -1, 6, b"", False), (-1, -1, 1, b"", False),
                        (-1, -1, 0, b"x", True), (r, w, 6, "str", False)):
                with pytest.raises((ValueError, TypeError)):
                    eng.adopt(lid, client_end.fileno(), tail_end.fileno(), bad, NOTHING)
            with pytest.raises(ValueError, match="no listener"):
                eng.adopt(lid + 1, client_end.fileno(), tail_end.fileno(), NOTHING, NOTHING)
            with pytest.raises(ValueError):
                eng.add_stats(lid, -1, 0, 0, 0)
            assert in_pipe(r) == 6 and eng.stats(lid)[:2] == (0, 5)  # refused: nothing taken, nothing read
            for sock in ends:
                sock.setblocking(False)
            eng.adopt(lid, client_end.detach(), tail_end.detach(), (r, w, 6, b"hello", False), (-1, -1, 0, b"back", False))
            assert eng.stats(lid)[:2] == (1, 6)
            client.sendall(b"!")
            assert recv_exactly(server, 12) == b"hello world!"
            assert recv_exactly(client, 4) == b"back"
            big = os.urandom(4 << 20)  # on through a pipe of the pool (the adopted one, emptied)
            _pump_concurrently(client, server, big, big[::-1])
            counted(lambda: eng.stats(lid), (1, 6, 112 + len(big), 204 + len(big), 3))
            for sock in (done_a, done_b):  # both halves done: closed at once
                sock.shutdown(socket.SHUT_WR)
            q, v = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # an empty pipe of a done half: the engine's too
            eng.adopt(lid, done_a.detach(), done_b.detach(), (q, v, 0, b"", True), (-1, -1, 0, b"", True))
            client.close()
            server.close()
            wait_for(lambda: eng.stats(lid)[:2] == (0, 7), what="both relays closed")
    finally:
        for sock in (client, server, *ends):
            sock.close()


def test_a_buffer_written_in_part_is_exported_from_where_it_stopped():
    """An adopted buffer of 1 MiB toward a destination that takes ~16 KiB, exported again: buffered is
    exactly what the counters say was not written (the buffer's offset); a third engine writes it."""
    client, client_end = tcp_pair()  # *_end: the engines'
    tail_end, server = tcp_pair(bufsize=4096)
    first = os.urandom(1 << 20)
    try:
        with successor() as (eng2, lid2), successor() as (eng3, lid3):
            for sock in (client_end, tail_end):
                sock.setblocking(False)
            eng2.adopt(lid2, client_end.detach(), tail_end.detach(), (-1, -1, 0, first, False), NOTHING)
            wait_for(lambda: eng2.stats(lid2)[2] > 0, what="bytes written")
            time.sleep(0.2)
            [(client_fd, tail_fd, up, down, _)], [] = eng2.export(lid2)
            written = eng2.stats(lid2)[2]  # final: the export ran after the engine's last write
            assert 0 < written < len(first)
            assert up == (-1, -1, 0, first[written:], False) and down == NOTHING
            eng3.adopt(lid3, client_fd, tail_fd, up, down)
            client.sendall(b"and on")
            assert recv_exactly(server, len(first) + 6) == first + b"and on"
            counted(lambda: eng3.stats(lid3), (1, 1, len(first) - written + 6, 0, 0))
    finally:
        for sock in (client, server, client_end, tail_end):
            sock.close()


# --------------------------------------------------------------------------
# random orders of send / shutdown / close / reset on both ends


class End:
    def __init__(self, sock: socket.socket, name: str):
        self.sock, self.name = sock, name
        sock.setblocking(False)
        self.alive = True  # not closed by the test
        self.closed_normally = False
        self.shut = False
        self.outbox = bytearray()
        self.got = bytearray()
        self.eof = self.reset = False  # observed
        self.want = bytearray()
        self.want_eof = self.want_reset = False  # expected

    def matches(self) -> bool:
        return (not self.outbox and self.got == self.want and self.eof == self.want_eof
                and self.reset == self.want_reset)

    def state(self) -> str:
        return (f"{self.name}: got {len(self.got)}/{len(self.want)} bytes, eof {self.eof}/{self.want_eof},"
                f" reset {self.reset}/{self.want_reset}, outbox {len(self.outbox)}")

    def service(self, ev: int) -> None:
        if ev & (select.POLLIN | select.POLLERR | select.POLLHUP) and not (self.eof or self.reset):
            try:
                while data := self.sock.recv(1 << 20):
                    self.got += data
                self.eof = True
            except BlockingIOError:
                pass
            except OSError as exc:
                assert exc.errno in RESETS, exc
                self.reset = True
        elif ev & select.POLLERR:  # after EOF: only SO_ERROR tells of a reset
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            assert err in (0, *RESETS), err
            self.reset = self.reset or bool(err)
        if self.outbox and not self.reset:
            try:
                while self.outbox:
                    n = self.sock.send(self.outbox[:1 << 20])
                    del self.outbox[:n]
            except BlockingIOError:
                pass
            except OSError as exc:
                assert exc.errno in RESETS, exc
                self.reset = True
                self.outbox.clear()


def settle(ends: list[End], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(e.matches() for e in ends if e.alive):
        assert time.monotonic() < deadline, "; ".join(e.state() for e in ends if e.alive)
        poller = select.poll()
        by_fd = {}
        for e in ends:
            if e.alive:
                mask = (0 if e.eof or e.reset else select.POLLIN) | (select.POLLOUT if e.outbox else 0)
                poller.register(e.sock, mask)
                by_fd[e.sock.fileno()] = e
        events = poller.poll(20)
        for fd, ev in events:
            by_fd[fd].service(ev)
        if all(ev & select.POLLHUP for _, ev in events) and events:
            time.sleep(0.002)  # hung-up sockets poll at once


SIZES = [1, 100, 5000, 70_000, 400_000]
ops = st.lists(st.tuples(st.sampled_from(["client", "server"]),
                         st.sampled_from(["send", "send", "shut", "close", "rst"]),
                         st.sampled_from(SIZES)), max_size=10)


class Model:
    """Both ends and what each should see, given what was done (settled after each step)."""

    def __init__(self, client: socket.socket, server: socket.socket):
        self.ends = {"client": End(client, "client"), "server": End(server, "server")}
        self.relay_alive = True

    def settle(self) -> None:
        settle(list(self.ends.values()))

    def apply(self, who: str, op: str, data: bytes = b"") -> None:
        x = self.ends[who]
        y = self.ends["server" if who == "client" else "client"]
        if not x.alive or (op in ("send", "shut") and (x.shut or x.reset)):
            return
        self.settle()  # nothing unread: close sends a FIN, not a RST
        if op == "send":
            x.outbox += data
            if y.alive:
                y.want += data
            elif self.relay_alive:  # y's kernel answers the bytes with a reset: the relay resets x
                x.want_reset = True
                self.relay_alive = False
        elif op in ("shut", "close"):
            if op == "close":
                x.sock.close()
                x.alive = False
            else:
                x.sock.shutdown(socket.SHUT_WR)
            if not x.shut and not x.reset and self.relay_alive:
                y.want_eof = True
                if y.shut:
                    self.relay_alive = False  # both EOFs passed: the relay closes
            x.shut = True
        else:  # rst
            reset_close(x.sock)
            x.alive = False
            if self.relay_alive and not x.reset:
                y.want_reset = True
                self.relay_alive = False
        self.settle()


@settings(max_examples=int(os.environ.get("ENGINE_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops)
def test_random_orders_of_send_shutdown_close_reset(script):
    before = open_fds()
    engine = _engine.Engine()
    s = Setup(engine)
    model = None
    try:
        client, server = s.pair()
        s.socks.clear()  # the model owns them
        client.sendall(b"?")  # connected: a reset now is the relay's, not the connect's (a handoff)
        assert recv_exactly(server, 1) == b"?"
        model = Model(client, server)
        rng = random.Random(len(script))
        for who, op, size in script:
            model.apply(who, op, rng.randbytes(size) if op == "send" else b"")
        for who in ("client", "server"):  # the end: close what is left
            model.apply(who, "close")
        wait_for(lambda: s.stats()[0] == 0, what="the relay closed")
    finally:
        if model is not None:
            for e in model.ends.values():
                e.sock.close()
        s.close()
        engine.close()
    gc.collect()
    leaked = open_fds() - before
    assert not leaked, describe(leaked)
