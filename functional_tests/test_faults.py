"""Robustness: a soak through local wormholes, faults on the remote path (the far daemon
killed, the link down and up, a lossy slow link), many concurrent streams through a remote
chain, and a full state dir.

Each test is bounded in time (timeouts scale with harness.SLOW) and asserts what a user
sees: the bytes, the errors, what `list` shows; never speed. Hosts, links, qdiscs and
mounts go with the test hosts (conftest's make_host), whatever happens.
"""

import asyncio
import contextlib
import hashlib
import os
import select
import signal
import socket
import threading
import time

import pytest

from harness import SLOW, cmdline
from test_remote import pair  # noqa: F401  (the fixture: h1 192.0.2.1 <-> h2 192.0.2.2, same key)
from test_tunnels import MiB, roundtrip_eventually, veth_name
from test_wormholes import port_of, refused, roundtrip



# --- the daemon's own fds and memory

def daemon_pid(host) -> int:
    """The wormholed process of a host (host.daemon is the nsenter that execs it)."""
    [pid] = [p for p in host.pids() if any(a.endswith("/wormholed") for a in cmdline(p)[:2])]
    return pid


def usage(pid: int) -> tuple[int, int]:
    """(open fds, VmRSS in KiB) of a process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return fds, rss


def settled(pid: int, fds_at_most: int, wait: float = 10) -> tuple[int, int]:
    """usage(pid) once its fds are down to fds_at_most, or after `wait` seconds."""
    deadline = time.monotonic() + wait * SLOW
    while (now := usage(pid))[0] > fds_at_most and time.monotonic() < deadline:
        time.sleep(0.2)
    return now


# --- clients

def run_in(ns, coro, timeout: float):
    """Run a coroutine in ns's network namespace (this thread, for its duration), bounded."""
    with ns.entered():
        return asyncio.run(asyncio.wait_for(coro, timeout * SLOW))


async def short_connections(port: int, count: int, concurrency: int) -> list:
    """`count` connections to 127.0.0.1:port, `concurrency` at a time: each sends a few
    bytes, half-closes, reads the echo until EOF and closes. Returns the failures."""
    todo = iter(range(count))
    failures = []

    async def worker():
        for i in todo:
            payload = b"soak %d" % i
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                try:
                    writer.write(payload)
                    writer.write_eof()
                    got = await asyncio.wait_for(reader.read(), 10 * SLOW)
                finally:
                    writer.close()
                if got != payload:
                    failures.append((i, got))
            except (OSError, TimeoutError) as e:
                failures.append((i, repr(e)))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failures


def udp_flows(ns, port: int, count: int, batch: int = 100) -> list:
    """One datagram to 127.0.0.1:port from each of `count` sockets in ns (all open until the
    end, so `count` distinct source ports: `count` flows), `batch` at a time, each resent up
    to twice if its echo does not come. Returns the sockets' ports whose echo never came."""
    with ns.entered():
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    missing = []
    try:
        for s in socks:
            s.connect(("127.0.0.1", port))
            s.setblocking(False)
        assert len({s.getsockname()[1] for s in socks}) == count
        for start in range(0, count, batch):
            pending = {s.fileno(): s for s in socks[start:start + batch]}
            for _attempt in range(3):
                poll = select.poll()
                for fd, s in pending.items():
                    s.send(b"flow %d" % s.getsockname()[1])
                    poll.register(fd, select.POLLIN)
                deadline = time.monotonic() + 2 * SLOW
                while pending and (left := deadline - time.monotonic()) > 0:
                    for fd, _ in poll.poll(left * 1000):
                        s = pending.pop(fd)
                        poll.unregister(fd)
                        assert s.recv(100) == b"flow %d" % s.getsockname()[1]
                if not pending:
                    break
            missing += [s.getsockname()[1] for s in pending.values()]
    finally:
        for s in socks:
            s.close()
    return missing


class EchoTransfer:
    """`data` through port (from ns) to an echo service: one thread sends (in `chunk`s,
    `pace` seconds apart, then half-closes), another reads the echo until EOF. A transfer
    ends with all the bytes, or short with an error (reset, EOF) in `errors`; `wait()`
    says whether both threads ended within `timeout`."""

    def __init__(self, ns, port: int, data: bytes, timeout: float, chunk: int = 1 << 16, pace: float = 0):
        self.data, self.chunk, self.pace, self.timeout = data, chunk, pace, timeout * SLOW
        self.sock = ns.connect(port, timeout=self.timeout)
        self.received = bytearray()
        self.errors: list[OSError] = []
        self.threads = [threading.Thread(target=self._guard, args=(f,), daemon=True) for f in (self._send, self._recv)]

    def __enter__(self):
        self.start = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        try:  # wakes threads still blocked in send or recv
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for t in self.threads:
            t.join(5)
        self.sock.close()

    def _guard(self, work) -> None:
        try:
            work()
        except OSError as e:
            self.errors.append(e)

    def _send(self) -> None:
        view = memoryview(self.data)
        for off in range(0, len(view), self.chunk):
            self.sock.sendall(view[off:off + self.chunk])
            if self.pace:
                time.sleep(self.pace)
        self.sock.shutdown(socket.SHUT_WR)

    def _recv(self) -> None:
        while chunk := self.sock.recv(1 << 16):
            self.received += chunk

    def wait_for(self, received: int) -> None:
        """Until at least `received` bytes are back (the transfer is under way)."""
        deadline = time.monotonic() + self.timeout
        while len(self.received) < received:
            assert time.monotonic() < deadline and all(t.is_alive() for t in self.threads), \
                f"only {len(self.received)} bytes back; errors: {self.errors}"
            time.sleep(0.01)

    def wait(self) -> bool:
        for t in self.threads:
            t.join(max(0.0, self.start + self.timeout - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)

    @property
    def complete(self) -> bool:
        return not self.errors and hashlib.sha256(self.received).digest() == hashlib.sha256(self.data).digest()

    def __repr__(self) -> str:
        return f"<{len(self.received)} of {len(self.data)} bytes back, errors {self.errors}>"


def echo_ok(ns, port: int, size: int = MiB, timeout: float = 30) -> None:
    """`size` random bytes through port to an echo service come back the same."""
    with EchoTransfer(ns, port, os.urandom(size), timeout) as t:
        assert t.wait() and t.complete, t


# --- 1. soak

TCP_CONNECTIONS, UDP_FLOWS, CONCURRENCY = 20_000, 2_000, 64
FD_SLACK = 0  # fds after deleting the wormholes, over the baseline
RSS_SLACK_KIB = 20 * 1024  # RSS after deleting the wormholes, over the baseline


@pytest.mark.timeout(240)
def test_soak_leaves_no_fds_and_bounded_memory(host):
    """20,000 short TCP connections through one wormhole and 2,000 UDP flows through another.

    The baseline is taken after a warm-up round (the same two wormholes, 500 connections
    and 50 flows, deleted), so that what the daemon makes once (pools, caches) is in it;
    after the soak and deleting the wormholes, its fds are back to the baseline
    (FD_SLACK) and its RSS within RSS_SLACK_KIB of it."""
    host.echo_server(7200)
    host.echo_server(7200, udp=True)
    pid = daemon_pid(host)
    specs = {"soak-tcp": ("url", ":8200", "tail", "url", ":7200"),
             "soak-udp": ("url", "udp://:8200", "tail", "url", "udp://:7200")}

    def traffic(connections: int, flows: int) -> None:
        for ident, words in specs.items():
            host.create("id", ident, *words)
        failures = run_in(host, short_connections(8200, connections, CONCURRENCY), 120)
        assert failures == [], f"{len(failures)} failed, first {failures[:5]}"
        assert udp_flows(host, 8200, flows) == []

    def delete() -> None:
        for ident in specs:
            host.ok("delete", ident)

    traffic(500, 50)
    delete()
    time.sleep(1)
    baseline = usage(pid)
    start = time.monotonic()
    traffic(TCP_CONNECTIONS, UDP_FLOWS)
    elapsed = time.monotonic() - start
    loaded = usage(pid)
    rows = {r["id"]: r for r in host.list()}
    delete()
    final = settled(pid, baseline[0])
    print(f"\nsoak: {TCP_CONNECTIONS} TCP connections, {UDP_FLOWS} UDP flows in {elapsed:.1f} s; "
          f"daemon fds/RSS: baseline {baseline[0]} / {baseline[1] // 1024} MiB, "
          f"after the traffic {loaded[0]} / {loaded[1] // 1024} MiB, "
          f"after delete {final[0]} / {final[1] // 1024} MiB")
    print(f"soak: rows after the traffic: {rows}")
    tcp, udp = rows["soak-tcp"], rows["soak-udp"]
    sent = sum(len(b"soak %d" % i) for i in range(TCP_CONNECTIONS))
    assert tcp["total"] == TCP_CONNECTIONS and tcp["bytes_in"] == tcp["bytes_out"] == sent
    assert udp["total"] == udp["connections"] == UDP_FLOWS, "every flow is still open"
    assert udp["bytes_in"] == udp["bytes_out"] and tcp.get("refused", 0) == udp.get("refused", 0) == 0
    assert final[0] <= baseline[0] + FD_SLACK, f"fds: {baseline[0]} before, {final[0]} after"
    assert final[1] <= baseline[1] + RSS_SLACK_KIB, f"RSS: {baseline[1]} KiB before, {final[1]} KiB after"
    assert host.list() == [] and "Traceback" not in host.logs()


# --- 2. faults on the remote path: h1's wormhole -> h2's child -> an echo service on h2

def remote_echo(hosts, port: int) -> None:
    """An echo service on h2's port and h1's wormhole on the same port to it."""
    h1, h2 = hosts
    h2.echo_server(port)
    h1.create("url", f":{port}", "remote", "192.0.2.2")


def ended(t: EchoTransfer, what: str) -> None:
    """The transfer ended within its timeout, with all the bytes or short with an error or
    an EOF (not by our timeout), and what came back is what was sent."""
    assert t.wait(), f"the transfer hangs: {t}"
    print(f"\n{what}: {t}, after {time.monotonic() - t.start:.1f} s")
    assert not any(isinstance(e, TimeoutError) for e in t.errors), f"it ended by our timeout: {t}"
    assert t.data.startswith(t.received), "what came back is what was sent"


def set_link(h, link: str, state: str) -> None:
    r = h.exec("ip", "link", "set", link, state)
    assert r.returncode == 0, r.stderr


def test_far_daemon_killed_mid_stream_then_the_next_connection_rebuilds(pair):  # noqa: F811
    h1, h2 = pair
    remote_echo(pair, 7300)
    with EchoTransfer(h1, 7300, os.urandom(16 * MiB), timeout=20, pace=0.005) as t:
        t.wait_for(MiB)
        h2.stop(signal.SIGKILL)
        ended(t, "far daemon killed mid-stream")
        assert len(t.received) < len(t.data), f"all the bytes came back through a dead daemon: {t}"
    h2.start()
    assert roundtrip_eventually(h1, 7300) == b"hello wormhole"
    assert len(h2.list()) == 1, "the child is built again"
    echo_ok(h1, 7300)
    assert "Traceback" not in h1.logs() + h2.logs()


@contextlib.contextmanager
def link_down(h, peer):
    """h's end of the link to peer down for the block, up again whatever happens."""
    set_link(h, veth_name(h, peer), "down")
    try:
        yield
    finally:
        set_link(h, veth_name(h, peer), "up")


def paced_transfer(h, port: int) -> EchoTransfer:
    """4 MiB echoed through port, 32 KiB every 20 ms: long enough to break a link under it."""
    return EchoTransfer(h, port, os.urandom(4 * MiB), timeout=60, chunk=1 << 15, pace=0.02)


def test_link_down_and_up(pair):  # noqa: F811
    """The link down for 1.5 s mid-transfer: the transfer waits (TCP retransmits) or fails
    with an error; never wrong bytes, never a hang. Then the far end's link down: a new
    connection fails within a bounded time, and once the link is up new transfers work."""
    h1, h2 = pair
    remote_echo(pair, 7310)
    with paced_transfer(h1, 7310) as t:
        t.wait_for(MiB // 2)
        with link_down(h1, h2):
            time.sleep(1.5)
        ended(t, "link down 1.5 s mid-transfer")
    echo_ok(h1, 7310)
    with link_down(h2, h1):
        start = time.monotonic()
        assert refused(h1, 7310), "no way through while the link is down"
        print(f"a connection while the far end is down failed after {time.monotonic() - start:.1f} s")
        assert time.monotonic() - start < 15 * SLOW
    assert roundtrip_eventually(h1, 7310) == b"hello wormhole"
    echo_ok(h1, 7310)
    assert "Traceback" not in h1.logs() + h2.logs()


def test_a_connection_tried_while_the_link_is_down_does_not_cut_live_ones(pair):  # noqa: F811
    """A connection that fails while the link is down makes h1 look for its child again once
    the link is back; h2 keeps the child it has (the same one is asked for), so a transfer
    that waited out the outage goes on intact."""
    h1, h2 = pair
    remote_echo(pair, 7315)
    with paced_transfer(h1, 7315) as t:
        t.wait_for(MiB // 2)
        with link_down(h1, h2):
            assert refused(h1, 7315), "no way through while the link is down"
            time.sleep(1)
        assert roundtrip_eventually(h1, 7315) == b"hello wormhole"
        assert t.wait() and t.complete, t
    assert "asked for again by its owner, kept" in h2.logs()


def impair(h, link: str) -> list[tuple[str, ...]]:
    """5% loss and 50 ms delay on h's end of link: `tc qdisc add dev LINK root netem loss 5%
    delay 50ms`. Where the kernel has no sch_netem (this machine's: CONFIG_NET_SCH_NETEM is
    not set), the same as near as the kernel allows: 5% of what arrives on link dropped
    (iptables' statistic match) and its egress through tbf at 8 Mbit/s with a 50 ms queue
    (the delay under load). Returns the commands that undo it."""
    r = h.exec("tc", "qdisc", "add", "dev", link, "root", "netem", "loss", "5%", "delay", "50ms")
    if r.returncode == 0:
        return [("tc", "qdisc", "del", "dev", link, "root")]
    assert "qdisc kind is unknown" in r.stderr, r.stderr
    drop = ("INPUT", "-i", link, "-m", "statistic", "--mode", "random", "--probability", "0.05", "-j", "DROP")
    undo = []
    for do, undo_ in ((("iptables", "-A", *drop), ("iptables", "-D", *drop)),
                      (("tc", "qdisc", "add", "dev", link, "root", "tbf", "rate", "8mbit", "burst", "16kb",
                        "latency", "50ms"), ("tc", "qdisc", "del", "dev", link, "root"))):
        r = h.exec(*do)
        assert r.returncode == 0, f"{do}: {r.stderr}"
        undo.append(undo_)
    return undo


@pytest.mark.timeout(240)
def test_lossy_slow_link_carries_the_bytes(pair):  # noqa: F811
    """5% loss and 50 ms delay on both ends of the link (impair()): 2 MiB each way arrive intact."""
    h1, h2 = pair
    remote_echo(pair, 7320)
    undo = []
    try:
        for h, link in ((h1, veth_name(h1, h2)), (h2, veth_name(h2, h1))):
            undo += [(h, argv) for argv in impair(h, link)]
        start = time.monotonic()
        echo_ok(h1, 7320, 2 * MiB, timeout=180)
        print(f"\n2 MiB each way over a lossy slow link: {time.monotonic() - start:.1f} s")
        for h, argv in undo:  # what was dropped
            stats = ("iptables", "-nvxL", "INPUT") if argv[0] == "iptables" else ("tc", "-s", "qdisc", "show", *argv[3:5])
            print(f"{h.name}: {' '.join(stats)}\n{h.exec(*stats).stdout}")
    finally:
        for h, argv in undo:
            h.exec(*argv)
    assert "Traceback" not in h1.logs() + h2.logs()


# --- 3. integrity

async def echo_streams(port: int, count: int, size: int) -> list:
    """`count` connections at once to an echo service behind 127.0.0.1:port, each sending
    its own `size` bytes (a random block rotated by its index) while reading the echo.
    Returns the connections whose echo was not the same bytes (index, why)."""
    block = memoryview(os.urandom(size))
    bad = []

    async def one(i: int) -> None:
        cut = i * 4099 % size
        parts = (block[cut:], block[:cut])
        want = hashlib.sha256(parts[0])
        want.update(parts[1])
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as e:
            bad.append((i, repr(e)))
            return

        async def send():
            for part in parts:
                for off in range(0, len(part), 1 << 16):
                    writer.write(part[off:off + (1 << 16)])
                    await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        got, n = hashlib.sha256(), 0
        try:
            while chunk := await reader.read(1 << 16):
                got.update(chunk)
                n += len(chunk)
            await sender
        except OSError as e:
            bad.append((i, f"{repr(e)} after {n} bytes"))
        else:
            if got.digest() != want.digest():
                bad.append((i, f"{n} bytes back, sha256 differs"))
        finally:
            sender.cancel()
            writer.close()

    await asyncio.gather(*(one(i) for i in range(count)))
    return bad


INTEGRITY_CONNECTIONS, INTEGRITY_SIZE = 1000, MiB


@pytest.mark.timeout(300)
def test_concurrent_streams_through_a_remote_chain_arrive_intact(pair):  # noqa: F811
    """1,000 connections at once x 1 MiB each way: h1's wormhole -> h2's child -> an echo
    service on h2. The full size (it takes 5-15 s here, on 2 cores): every connection's echo
    has the sha256 of what it sent, none lost."""
    h1, h2 = pair
    remote_echo(pair, 7330)
    start = time.monotonic()
    bad = run_in(h1, echo_streams(7330, INTEGRITY_CONNECTIONS, INTEGRITY_SIZE), 240)
    print(f"\n{INTEGRITY_CONNECTIONS} x {INTEGRITY_SIZE} bytes through a remote chain: "
          f"{time.monotonic() - start:.1f} s, {len(bad)} bad")
    assert bad == [], f"{len(bad)} connections lost or wrong, first {bad[:5]}"
    [row] = h1.list()
    assert row["total"] == INTEGRITY_CONNECTIONS
    assert row["bytes_in"] == row["bytes_out"] == INTEGRITY_CONNECTIONS * INTEGRITY_SIZE
    assert "Traceback" not in h1.logs() + h2.logs()


# --- 4. a full state dir

def test_a_full_state_dir_refuses_create_with_one_line_until_space_is_freed(make_host):
    """The state dir is a 64 KiB tmpfs, mounted in the host's own mount namespace (it goes
    with the host), filled up with a file."""
    host = make_host(start=False)
    host.state.mkdir()
    r = host.exec("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(host.state))
    assert r.returncode == 0, r.stderr
    host.start()
    host.echo_server(7340)
    filler = host.state / "filler"
    r = host.exec("sh", "-c", f"cat /dev/zero > {filler}")
    assert r.returncode != 0 and "No space left on device" in r.stderr, r.stderr
    state_files = host.exec("find", str(host.state)).stdout
    r = host.wormhole("create", "url", ":8340", "tail", "url", ":7340")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("wormhole: ") and "No space left on device" in r.stderr
    assert not host.listening(8340), "a refused create leaves nothing listening"
    assert host.list() == []
    assert host.exec("find", str(host.state)).stdout == state_files, "nor any file (a half-written record)"
    assert host.exec("rm", str(filler)).returncode == 0
    _, url = host.create("url", ":8340", "tail", "url", ":7340")
    assert roundtrip(host, port_of(url)) == b"hello wormhole"
    assert [w["head"] for w in host.list()] == [url]
    assert "Traceback" not in host.logs()
