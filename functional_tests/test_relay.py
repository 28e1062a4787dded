"""The TCP/UDP relays over real sockets: loopback, and two network namespaces.

Each test runs its own uvloop event loop; an autouse fixture checks that the
test left no fd open (sockets, pipes, epoll) once its loop is closed.

The TCP tests run against both engines (`mode`): the pure-Python relay
(tcp.TcpProxy, dialling through its own epoll set or through the loop's
add_writer) and the native one (native.NativeTcpProxy over wormholed._engine,
which connects to the target itself and hands connections it cannot finish
back to Python's dial()).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import socket
import stat
import time
import warnings

import pytest
import uvloop

from wormholed import netns as netns_mod
from wormholed.netns import Netns, NetnsError, make_socket
from wormholed.proxy.native import EngineHub, NativeTcpProxy
from wormholed.proxy.tcp import Stats, TcpProxy, dial
from wormholed.proxy.udp import UdpProxy, dial_udp
from fds import no_new_fds

LOCAL = "127.0.0.1"


def uvloop_test(fn):
    """Run an async test function on a fresh uvloop loop."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(asyncio.wait_for(fn(*args, **kwargs), 30))

    return wrapper


@pytest.fixture(scope="session")
def process_wide_fds():
    """What stays open for the whole process once used: libuv's signal pipe, the home netns."""
    uvloop_test(asyncio.sleep)(0)
    netns_mod._home()


@pytest.fixture(autouse=True)
def no_fd_leak(process_wide_fds):
    with no_new_fds():
        yield


# --------------------------------------------------------------------------
# helpers


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except ConnectionError:
        pass
    finally:
        writer.close()


class Server:
    """An asyncio stream server on loopback (or on a given listening socket)."""

    def __init__(self, handler=echo, sock: socket.socket | None = None):
        self.handler = handler
        self.sock = sock
        self.conns: list[asyncio.Task] = []

    async def _handle(self, reader, writer):
        self.conns.append(asyncio.current_task())
        await self.handler(reader, writer)

    async def __aenter__(self):
        if self.sock is not None:
            self.server = await asyncio.start_server(self._handle, sock=self.sock)
        else:
            self.server = await asyncio.start_server(self._handle, LOCAL, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        for task in self.conns:
            task.cancel()
        await asyncio.gather(*self.conns, return_exceptions=True)
        await self.server.wait_closed()


MODES = ["finish_connect", "add_writer", "native"]  # python relay (two ways to dial), native engine
ENGINES = ["finish_connect", "native"]


class Proxy:
    """A TcpProxy (or, mode native, a NativeTcpProxy targeting ``port``) on 127.0.0.1:0 (or a given
    listening socket) dialling ``port``; ``limits``: max_conns, idle_timeout."""

    def __init__(self, port: int, *, connect=None, sock: socket.socket | None = None, timeout=5.0,
                 mode="finish_connect", target: tuple | None = None, **limits):
        # finish_connect: dial through the proxy's own epoll (wait=proxy.finish_connect)
        fast = mode == "finish_connect"
        self.connect = connect or (lambda: dial(None, LOCAL, port, timeout=timeout,
                                                wait=self.proxy.finish_connect if fast else None))
        self.mode = mode
        self.target = target if target is not None else (None, LOCAL, port) if connect is None else None
        self.sock = sock
        self.hub = None
        self.limits = limits

    async def __aenter__(self):
        if self.sock is None:
            self.sock = await make_socket(None, socket.AF_INET, socket.SOCK_STREAM,
                                          bind=(LOCAL, 0), listen=128)
        self.port = self.sock.getsockname()[1]
        if self.mode == "native":
            self.hub = EngineHub()
            self.proxy = NativeTcpProxy(self.sock, self.connect, hub=self.hub, **self.limits)
            self.proxy.start()
            if self.target is not None:
                self.proxy.set_target(*self.target)
        else:
            self.proxy = TcpProxy(self.sock, self.connect, **self.limits)
            self.proxy.start()
        return self.proxy

    async def __aexit__(self, *exc):
        await self.proxy.aclose()
        if self.hub is not None:
            self.hub.close()


async def connect(port: int):
    return await asyncio.open_connection(LOCAL, port)


async def closed(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return s.getsockname()[1]


async def read_outcome(reader: asyncio.StreamReader) -> str:
    """'eof', 'reset' or 'data' for what the client gets next."""
    try:
        data = await asyncio.wait_for(reader.read(65536), 5)
    except ConnectionResetError:
        return "reset"
    return "data" if data else "eof"


async def turned_away(port: int) -> str:
    """read_outcome() of a new client, which the proxy drops at once: its reset may come before the loop
    sees the connect complete."""
    try:
        reader, writer = await connect(port)
    except ConnectionResetError:
        return "reset"
    try:
        return await read_outcome(reader)
    finally:
        await closed(writer)


# --------------------------------------------------------------------------
# TCP


@pytest.mark.parametrize("mode", MODES)
@uvloop_test
async def test_one_mebibyte_is_echoed_intact(mode):
    await echo_one_mebibyte(mode)


async def echo_one_mebibyte(mode="finish_connect"):
    data = os.urandom(1 << 20)
    async with Server() as server, Proxy(server.port, mode=mode) as proxy:
        reader, writer = await connect(proxy_port(proxy))
        receiving = asyncio.create_task(reader.readexactly(len(data)))
        writer.write(data)
        await writer.drain()
        assert await receiving == data
        writer.write_eof()
        assert await reader.read() == b""
        await closed(writer)
        await wait_for(lambda: proxy.stats.connections == 0)
        assert proxy.stats == Stats(connections=0, total=1, bytes_in=len(data), bytes_out=len(data))


def proxy_port(proxy: TcpProxy) -> int:
    return proxy._sock.getsockname()[1]


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("refused", ["socket to pipe", "pipe to socket"])
def test_copy_mode_when_splice_refuses_the_fds(monkeypatch, refused):
    real_splice = os.splice

    def splice(src, dst, *args):
        side = src if refused == "socket to pipe" else dst
        if stat.S_ISSOCK(os.fstat(side).st_mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_splice(src, dst, *args)

    monkeypatch.setattr(os, "splice", splice)
    uvloop_test(echo_one_mebibyte)()


@pytest.mark.parametrize("mode", ENGINES)
@uvloop_test
async def test_half_close_passes_on_and_the_reply_still_flows(mode):
    async def reply_after_eof(reader, writer):
        request = await reader.read()  # everything until the client's EOF
        writer.write(b"got %d bytes: " % len(request) + request.upper())
        await writer.drain()
        writer.close()

    async with Server(reply_after_eof) as server, Proxy(server.port, mode=mode) as proxy:
        reader, writer = await connect(proxy_port(proxy))
        writer.write(b"hello")
        writer.write_eof()
        assert await reader.read() == b"got 5 bytes: HELLO"  # the full reply, then EOF
        await closed(writer)


@pytest.mark.parametrize("mode", ENGINES)
@uvloop_test
async def test_a_reset_by_the_server_reaches_the_client_as_a_reset(mode):
    async def abort(reader, writer):
        await reader.readexactly(4)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        writer.transport.abort()

    async with Server(abort) as server, Proxy(server.port, mode=mode) as proxy:
        reader, writer = await connect(proxy_port(proxy))
        writer.write(b"ping")
        assert await read_outcome(reader) == "reset"
        await closed(writer)
        await wait_for(lambda: proxy.stats.connections == 0)


@pytest.mark.parametrize("mode", ENGINES)
@uvloop_test
async def test_a_reset_by_the_client_reaches_the_server_as_a_reset(mode):
    outcome = asyncio.get_running_loop().create_future()

    async def watch(reader, writer):
        await reader.readexactly(4)
        outcome.set_result(await read_outcome(reader))
        writer.close()

    async with Server(watch) as server, Proxy(server.port, mode=mode) as proxy:
        sock = socket.create_connection((LOCAL, proxy_port(proxy)))
        sock.sendall(b"ping")
        await asyncio.sleep(0.1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        sock.close()
        assert await outcome == "reset"


@pytest.mark.parametrize("mode", MODES)
@uvloop_test
async def test_dial_retries_until_the_tail_listens(mode):
    port = free_port()
    async with Proxy(port, mode=mode) as proxy:
        reader, writer = await connect(proxy_port(proxy))
        writer.write(b"early bytes")  # held in the kernel until the tail is up
        await asyncio.sleep(1.0)
        async with Server(sock=bound_listener(port)):
            assert await asyncio.wait_for(reader.readexactly(11), 5) == b"early bytes"
            await closed(writer)


def bound_listener(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOCAL, port))
    sock.listen()
    return sock


@uvloop_test
async def test_dial_gives_up_naming_the_address():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError, match=f"127.0.0.1:{port}"):
        await dial(None, LOCAL, port, timeout=0.3)
    assert 0.25 < time.monotonic() - started < 2


@pytest.mark.parametrize("mode", MODES)
@uvloop_test
async def test_a_failed_connect_closes_the_client(mode):
    async with Proxy(free_port(), timeout=0.2, mode=mode) as proxy:
        reader, writer = await connect(proxy_port(proxy))
        assert await read_outcome(reader) in ("reset", "eof")
        await closed(writer)
        assert proxy.stats.connections == 0 and proxy.stats.total == 1


@pytest.mark.parametrize("mode", ENGINES)
@uvloop_test
async def test_aclose_resets_live_connections_and_stops_listening(mode):
    async with Server() as server:
        proxy_cm = Proxy(server.port, mode=mode)
        proxy = await proxy_cm.__aenter__()
        port = proxy_port(proxy)
        reader, writer = await connect(port)
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        await proxy.aclose()
        await proxy_cm.__aexit__(None, None, None)  # aclose() again: idempotent
        assert await read_outcome(reader) == "reset"
        await closed(writer)
        with pytest.raises(ConnectionRefusedError):
            await connect(port)
        assert proxy.stats.connections == 0


@pytest.mark.parametrize("mode", ENGINES)
@uvloop_test
async def test_aclose_during_connect_drops_the_pending_client(mode):
    started = asyncio.Event()

    async def never():
        started.set()
        await asyncio.sleep(3600)

    async with Proxy(0, connect=never, mode=mode) as proxy:
        reader, writer = await connect(proxy_port(proxy))
        await started.wait()
        await proxy.aclose()
        assert await read_outcome(reader) in ("reset", "eof")
        await closed(writer)
        assert proxy.stats.connections == 0


@pytest.mark.parametrize("mode", ENGINES)
@uvloop_test
async def test_back_pressure_blocks_a_fast_sender_and_loses_nothing(mode):
    reading = asyncio.Event()
    received = bytearray()

    async def slow_reader(reader, writer):
        await reading.wait()
        while data := await reader.read(1 << 20):
            received.extend(data)
        writer.close()

    def stream(start: int, end: int) -> memoryview:  # the bytes at [start, end) of the stream
        return memoryview(pattern)[start % 256: start % 256 + end - start]

    pattern = bytes(range(256)) * 1024  # period 256: any slice continues it
    async with Server(slow_reader) as server, Proxy(server.port, mode=mode) as proxy:
        client = socket.create_connection((LOCAL, proxy_port(proxy)))
        try:
            client.setblocking(False)
            sent = 0
            stalled_since = time.monotonic()
            while time.monotonic() - stalled_since < 1.0:  # until nothing moves for a second
                try:
                    sent += client.send(stream(sent, sent + 65536))
                    stalled_since = time.monotonic()
                except BlockingIOError:
                    await asyncio.sleep(0.01)
                assert sent < 256 << 20, "the sender never blocked"
            # what the kernel buffers on the way (the proxy holds at most a pipe)
            assert proxy.stats.bytes_in <= sent and sent < 96 << 20
            reading.set()
            total = sent + (1 << 20)
            for start in range(sent, total, 65536):
                await asyncio.get_running_loop().sock_sendall(client, stream(start, start + 65536))
            client.shutdown(socket.SHUT_WR)
            await wait_for(lambda: len(received) == total, 20)
            assert received == (bytes(range(256)) * (total // 256 + 1))[:total]
        finally:
            client.close()


@pytest.mark.parametrize("mode", ENGINES)
@uvloop_test
async def test_connections_counted_and_no_fds_left_after_aclose(mode):
    async with Server() as server, Proxy(server.port, mode=mode) as proxy:
        conns = [await connect(proxy_port(proxy)) for _ in range(20)]
        for reader, writer in conns:
            writer.write(b"abc")
            assert await reader.readexactly(3) == b"abc"
        assert proxy.stats.connections == 20
        for reader, writer in conns[:10]:
            writer.write_eof()
            assert await reader.read() == b""
            await closed(writer)
        await wait_for(lambda: proxy.stats.connections == 10)
        await proxy.aclose()
        assert proxy.stats.connections == 0
        for reader, writer in conns[10:]:
            await closed(writer)
    # the autouse fixture checks the fds


# --------------------------------------------------------------------------
# Limits: max_conns, idle_timeout


async def echoed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes = b"x") -> None:
    writer.write(data)
    assert await asyncio.wait_for(reader.readexactly(len(data)), 5) == data


@pytest.mark.parametrize("mode", ENGINES)
@uvloop_test
async def test_max_conns_resets_the_next_client_and_lets_one_in_once_another_closed(mode):
    async with Server() as server, Proxy(server.port, mode=mode, max_conns=2) as proxy:
        port = proxy_port(proxy)
        (r1, w1), (r2, w2) = await connect(port), await connect(port)
        await echoed(r1, w1)
        await echoed(r2, w2)
        assert await turned_away(port) == "reset"  # never relayed: the echo server sees 2 clients
        assert len(server.conns) == 2
        assert (proxy.stats.connections, proxy.stats.total, proxy.stats.refused) == (2, 2, 1)
        await echoed(r1, w1, b"the first two relay on")
        w1.write_eof()
        assert await r1.read() == b""
        await closed(w1)
        await wait_for(lambda: proxy.stats.connections == 1)
        r3, w3 = await connect(port)  # room again
        await echoed(r3, w3)
        await echoed(r2, w2)
        assert (proxy.stats.connections, proxy.stats.total, proxy.stats.refused) == (2, 3, 1)
        for writer in (w2, w3):
            await closed(writer)


@pytest.mark.parametrize("mode", MODES)
@uvloop_test
async def test_max_conns_counts_a_client_whose_tail_is_still_being_dialled(mode):
    """The tail refuses at first: the client waits in dial()'s retries (native: handed off to Python),
    and is one of the max_conns meanwhile."""
    port = free_port()
    async with Proxy(port, mode=mode, max_conns=1) as proxy:
        reader, writer = await connect(proxy_port(proxy))
        writer.write(b"early bytes")
        await wait_for(lambda: proxy.stats.total == 1)
        assert await turned_away(proxy_port(proxy)) == "reset"
        assert proxy.stats.refused == 1 and proxy.stats.connections == 1
        async with Server(sock=bound_listener(port)):
            assert await asyncio.wait_for(reader.readexactly(11), 5) == b"early bytes"
            await closed(writer)


@pytest.mark.parametrize("mode", ENGINES)
@uvloop_test
async def test_idle_timeout_resets_an_idle_connection_and_spares_a_trickling_one(mode):
    """idle_timeout 2 s: a connection silent after its first echo is reset on both sides; one
    moving a byte every 0.1 s for 2.5 times the timeout lives on (2 s: room for a stall of the
    test's own process, which is the Python engine's too)."""
    server_saw = []

    async def echo_and_tell(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            server_saw.append("eof")
        except ConnectionResetError:
            server_saw.append("reset")
        finally:
            writer.close()

    async with Server(echo_and_tell) as server, Proxy(server.port, mode=mode, idle_timeout=2.0) as proxy:
        idle_r, idle_w = await connect(proxy_port(proxy))
        busy_r, busy_w = await connect(proxy_port(proxy))
        await echoed(idle_r, idle_w)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            await echoed(busy_r, busy_w, b"t")
            await asyncio.sleep(0.1)
        assert await read_outcome(idle_r) == "reset"
        await wait_for(lambda: server_saw == ["reset"])
        assert proxy.stats.connections == 1  # its fds are closed: the autouse fixture checks at the end
        await echoed(busy_r, busy_w, b"still relaying")
        for writer in (idle_w, busy_w):
            await closed(writer)


# --------------------------------------------------------------------------
# UDP


class UdpEcho(asyncio.DatagramProtocol):
    def __init__(self):
        self.peers: list = []

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.peers.append(addr)
        self.transport.sendto(b"echo:" + data, addr)


async def udp_client(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect((LOCAL, port))
    return sock


async def udp_ask(sock: socket.socket, data: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, data)
    return await asyncio.wait_for(loop.sock_recv(sock, 65535), 5)


class UdpSetup:
    def __init__(self, idle_timeout=60.0):
        self.idle_timeout = idle_timeout

    async def __aenter__(self):
        loop = asyncio.get_running_loop()
        self.transport, self.echo = await loop.create_datagram_endpoint(
            UdpEcho, local_addr=(LOCAL, 0))
        tail_port = self.transport.get_extra_info("sockname")[1]
        head = await make_socket(None, socket.AF_INET, socket.SOCK_DGRAM, bind=(LOCAL, 0))
        self.port = head.getsockname()[1]
        self.proxy = UdpProxy(head, lambda: dial_udp(None, LOCAL, tail_port),
                              idle_timeout=self.idle_timeout)
        self.proxy.start()
        return self

    async def __aexit__(self, *exc):
        await self.proxy.aclose()
        self.transport.close()


@uvloop_test
async def test_udp_two_clients_get_their_own_flows():
    async with UdpSetup() as udp:
        a, b = await udp_client(udp.port), await udp_client(udp.port)
        try:
            assert await udp_ask(a, b"from a") == b"echo:from a"
            assert await udp_ask(b, b"from b") == b"echo:from b"
            assert await udp_ask(a, b"again a") == b"echo:again a"
            assert udp.proxy.stats.connections == 2 and udp.proxy.stats.total == 2
            peers = udp.echo.peers
            assert peers[0] == peers[2] != peers[1]  # one tail socket per client
            assert udp.proxy.stats.bytes_in == len(b"from afrom bagain a")
            assert udp.proxy.stats.bytes_out == len(b"echo:") * 3 + len(b"from afrom bagain a")
        finally:
            a.close()
            b.close()


@uvloop_test
async def test_udp_idle_flow_is_closed_and_reopened_on_demand():
    async with UdpSetup(idle_timeout=0.3) as udp:
        a = await udp_client(udp.port)
        try:
            assert await udp_ask(a, b"1") == b"echo:1"
            assert udp.proxy.stats.connections == 1
            await wait_for(lambda: udp.proxy.stats.connections == 0, 2)
            assert await udp_ask(a, b"2") == b"echo:2"
            assert udp.proxy.stats.total == 2
        finally:
            a.close()


@uvloop_test
async def test_udp_datagrams_sent_while_the_flow_opens_are_kept():
    async with UdpSetup() as udp:
        real_open = udp.proxy._open_flow

        async def slow_open():
            await asyncio.sleep(0.2)
            return await real_open()

        udp.proxy._open_flow = slow_open
        a = await udp_client(udp.port)
        try:
            for i in range(3):
                a.send(b"%d" % i)
            loop = asyncio.get_running_loop()
            replies = {await asyncio.wait_for(loop.sock_recv(a, 100), 5) for _ in range(3)}
            assert replies == {b"echo:0", b"echo:1", b"echo:2"}
        finally:
            a.close()


# --------------------------------------------------------------------------
# Namespaces (root)


def test_named_netns_errors_are_user_messages():
    with pytest.raises(NetnsError, match="no network namespace named 'wh-no-such-ns'"):
        Netns.named("wh-no-such-ns")
    with pytest.raises(NetnsError, match="invalid"):
        Netns.named("../etc")
    with pytest.raises(NetnsError, match="no process"):
        Netns.of_pid(2**22 + 1)


def test_of_pid_compares_equal_to_the_same_namespace():
    with Netns.of_pid(os.getpid()) as a, Netns.of_pid(os.getpid()) as b:
        assert a == b and hash(a) == hash(b) and a.label == f"pid:{os.getpid()}"


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creates network namespaces")


@pytest.fixture
def two_namespaces():
    """Namespaces A (192.0.2.1) and B (192.0.2.2) joined by a veth pair; always removed."""
    from pyroute2 import NetNS, netns

    names = [f"wh-relay-{tag}-{os.getpid()}" for tag in ("a", "b")]
    created = []
    quiet = warnings.catch_warnings  # pyroute2 forks, and our idle helper threads make Python warn
    try:
        with quiet(action="ignore", category=DeprecationWarning):
            for name in names:
                netns.create(name)
                created.append(name)
            with NetNS(names[0]) as ns:
                ns.link("add", ifname="veth-a", kind="veth",
                        peer={"ifname": "veth-b", "net_ns_fd": names[1]})
            for name, ifname, addr in zip(names, ("veth-a", "veth-b"), ("192.0.2.1", "192.0.2.2")):
                with NetNS(name) as ns:
                    ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
                    index = ns.link_lookup(ifname=ifname)[0]
                    ns.addr("add", index=index, address=addr, prefixlen=24)
                    ns.link("set", index=index, state="up")
        yield names
    finally:
        with quiet(action="ignore", category=DeprecationWarning):
            for name in created:
                netns.remove(name)


def thread_netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


@needs_root
@pytest.mark.parametrize("mode", ENGINES)
@uvloop_test
async def test_bytes_cross_namespaces_and_the_loop_thread_stays_home(two_namespaces, mode):
    home = thread_netns()
    with Netns.named(two_namespaces[0]) as ns_a, Netns.named(two_namespaces[1]) as ns_b:
        with Netns.named(two_namespaces[0]) as again:
            assert ns_a == again and hash(ns_a) == hash(again) and ns_a != ns_b
        # echo servers in B: one on B's own loopback, one on its veth address
        lo_b = await make_socket(ns_b, socket.AF_INET, socket.SOCK_STREAM, bind=(LOCAL, 0), listen=8)
        veth_b = await make_socket(ns_b, socket.AF_INET, socket.SOCK_STREAM,
                                   bind=("192.0.2.2", 0), listen=8)
        async with Server(sock=lo_b) as lo_server, Server(sock=veth_b) as veth_server:
            for tail_ns, host, port in ((ns_b, LOCAL, lo_server.port),
                                        (ns_a, "192.0.2.2", veth_server.port)):
                head = await make_socket(ns_a, socket.AF_INET, socket.SOCK_STREAM,
                                         bind=(LOCAL, 0), listen=8)
                head_port = head.getsockname()[1]

                async def tail(tail_ns=tail_ns, host=host, port=port):
                    return await dial(tail_ns, host, port)

                async with Proxy(0, connect=tail, sock=head, mode=mode, target=(tail_ns, host, port)):
                    # the head listens in A only: this namespace has nothing there
                    with pytest.raises(ConnectionRefusedError):
                        await connect(head_port)
                    client = await make_socket(ns_a, socket.AF_INET, socket.SOCK_STREAM)
                    loop = asyncio.get_running_loop()
                    await loop.sock_connect(client, (LOCAL, head_port))
                    data = os.urandom(256 << 10)
                    await loop.sock_sendall(client, data)
                    client.shutdown(socket.SHUT_WR)
                    got = bytearray()
                    while chunk := await loop.sock_recv(client, 65536):
                        got.extend(chunk)
                    client.close()
                    assert got == data
            assert thread_netns() == home


@needs_root
@uvloop_test
async def test_native_connect_failing_other_than_refused_drops_the_client_at_once(two_namespaces):
    """No route to the tail (namespace A routes only 192.0.2.0/24): the engine's connect fails
    with ENETUNREACH. Dialling again would fail the same way (or, for a timeout, wait as long
    again), so the client is dropped, ``failed`` hears why, and Python's dial() is not used."""
    dialled, failures = [], []

    async def dial_again():
        dialled.append(1)
        raise AssertionError("dialled again")

    with Netns.named(two_namespaces[0]) as ns_a:
        hub = EngineHub()
        head = await make_socket(None, socket.AF_INET, socket.SOCK_STREAM, bind=(LOCAL, 0), listen=8)
        proxy = NativeTcpProxy(head, dial_again, hub=hub, failed=failures.append)
        try:
            proxy.start()
            proxy.set_target(ns_a, "203.0.113.1", 80)
            assert await turned_away(head.getsockname()[1]) in ("reset", "eof")
            await wait_for(lambda: failures)
            assert [f.errno for f in failures] == [errno.ENETUNREACH] and not dialled
            assert "Network is unreachable" in str(failures[0])
            assert proxy.stats.connections == 0 and proxy.stats.total == 1
        finally:
            await proxy.aclose()
            hub.close()



@needs_root
@uvloop_test
async def test_a_namespace_closed_and_its_fd_number_reused_before_the_helper_runs(two_namespaces):
    """A wormhole deleted while a helper thread's job waits: its Netns is closed, and the fd
    number goes to another namespace's file. The job still runs in the namespace it was
    asked for (it holds its own duplicate): 192.0.2.1 is A's address, not B's."""
    import threading

    gate = threading.Event()
    busy = [netns_mod._workers.submit(gate.wait, 10) for _ in range(netns_mod._workers._max)]
    ns_a = Netns.named(two_namespaces[0])
    number = ns_a.fileno()
    job = asyncio.ensure_future(make_socket(ns_a, socket.AF_INET, socket.SOCK_STREAM, bind=("192.0.2.1", 0)))
    try:
        await asyncio.sleep(0.05)  # queued behind the busy helpers
        fd_b = os.open(f"/run/netns/{two_namespaces[1]}", os.O_RDONLY | os.O_CLOEXEC)
        ns_a.close()
        os.dup2(fd_b, number)  # the number now names B
        os.close(fd_b)
        gate.set()
        sock = await asyncio.wait_for(job, 10)
        with sock:
            assert sock.getsockname()[0] == "192.0.2.1"
    finally:
        gate.set()
        for f in busy:
            f.result(10)
        if not job.done():
            job.cancel()
        with contextlib.suppress(OSError):
            os.close(number)

@needs_root
@uvloop_test
async def test_bind_errors_name_the_address_and_namespace(two_namespaces):
    with Netns.named(two_namespaces[0]) as ns_a:
        with pytest.raises(OSError) as info:
            await make_socket(ns_a, socket.AF_INET, socket.SOCK_STREAM, bind=("192.0.2.2", 0))
        assert info.value.errno == errno.EADDRNOTAVAIL
        assert "192.0.2.2:0" in str(info.value) and two_namespaces[0] in str(info.value)
        first = await make_socket(ns_a, socket.AF_INET, socket.SOCK_DGRAM, bind=(LOCAL, 0))
        try:
            with pytest.raises(OSError) as info:
                await make_socket(ns_a, socket.AF_INET, socket.SOCK_DGRAM,
                                  bind=first.getsockname())
            assert info.value.errno == errno.EADDRINUSE
        finally:
            first.close()


@needs_root
@uvloop_test
async def test_udp_across_namespaces(two_namespaces):
    with Netns.named(two_namespaces[0]) as ns_a, Netns.named(two_namespaces[1]) as ns_b:
        loop = asyncio.get_running_loop()
        tail_sock = await make_socket(ns_b, socket.AF_INET, socket.SOCK_DGRAM, bind=("192.0.2.2", 0))
        transport, _ = await loop.create_datagram_endpoint(UdpEcho, sock=tail_sock)
        tail_port = tail_sock.getsockname()[1]
        head = await make_socket(ns_a, socket.AF_INET, socket.SOCK_DGRAM, bind=(LOCAL, 0))
        proxy = UdpProxy(head, lambda: dial_udp(ns_a, "192.0.2.2", tail_port))
        proxy.start()
        try:
            client = await make_socket(ns_a, socket.AF_INET, socket.SOCK_DGRAM)
            try:
                client.connect(head.getsockname())
                assert await udp_ask(client, b"hi") == b"echo:hi"
            finally:
                client.close()
        finally:
            await proxy.aclose()
            transport.close()


@needs_root
@uvloop_test
async def test_a_helper_thread_that_cannot_return_home_is_not_reused(two_namespaces, monkeypatch):
    real_setns = os.setns
    home_fd = netns_mod._home()
    fail_once = [True]

    def setns(fd, nstype=0):
        if fd == home_fd and fail_once[0]:
            fail_once[0] = False
            raise OSError(errno.EPERM, "refused by the test")
        return real_setns(fd, nstype)

    with Netns.named(two_namespaces[0]) as ns_a, Netns.named(two_namespaces[1]) as ns_b:
        (await make_socket(ns_a, socket.AF_INET, socket.SOCK_DGRAM)).close()  # start a helper
        threads = netns_mod._workers._threads
        monkeypatch.setattr(os, "setns", setns)
        with pytest.raises(OSError, match="cannot return from netns:wh-relay-a"):
            await make_socket(ns_a, socket.AF_INET, socket.SOCK_DGRAM, bind=(LOCAL, 0))
        await wait_for(lambda: netns_mod._workers._threads == threads - 1)  # it ended
        # every socket made from now on is made by a thread that went home
        for _ in range(8):
            sock = await make_socket(ns_b, socket.AF_INET, socket.SOCK_DGRAM, bind=("192.0.2.2", 0))
            sock.close()
            sock = await make_socket(ns_a, socket.AF_INET, socket.SOCK_DGRAM, bind=("192.0.2.1", 0))
            sock.close()
        assert thread_netns() == os.stat("/proc/self/ns/net").st_ino


@needs_root
@uvloop_test
async def test_plain_sockets_come_from_the_namespace_a_batch_at_a_time(two_namespaces):
    with Netns.named(two_namespaces[1]) as ns_b:
        for _ in range(netns_mod.SPARES * 2 + 1):  # fresh batches and spares alike
            sock = await make_socket(ns_b, socket.AF_INET, socket.SOCK_DGRAM)
            with sock:
                sock.bind(("192.0.2.2", 0))  # an address only B has
        assert 0 < len(ns_b._spares[(socket.AF_INET, socket.SOCK_DGRAM)]) < netns_mod.SPARES
    # closing the Netns closed its spares: the fixture finds no fd left
