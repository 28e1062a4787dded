"""The TCP relay: accept on a head socket, connect a tail, copy bytes both ways.

Bytes move with non-blocking ``splice`` (socket -> pipe -> socket) and never
enter Python. A proxy keeps its relays' sockets in its own edge-triggered
epoll set, which the event loop watches as one fd: adding a socket costs one
epoll_ctl (the loop's add_reader costs four or five) and back-pressure needs
no re-registration at all.

Each direction is a ``_Half`` with its own pipe:

- back-pressure: while the pipe cannot drain into the destination, the half
  stops reading its source until the destination's writable edge;
- half-close: EOF from the source becomes shutdown(SHUT_WR) of the
  destination and the other direction keeps flowing; both sockets are closed
  once, when both directions are done;
- reset: a reset on either side resets the other (SO_LINGER 0, close).

Limits, both optional (0: none), as the native engine has them:

- ``max_conns``: a client accepted while the proxy has that many connections
  open (relayed or being connected) is reset at once (SO_LINGER 0), never
  relayed, and counted in ``stats.refused``, not ``stats.total``;
- ``idle_timeout``: a relay that moved no byte either way for that many
  seconds is reset on both sides. Each relay keeps the time bytes last moved;
  one sweep every min(idle_timeout / 4, 1 s) resets the idle ones.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from wormhole.addr import literal_family
from wormholed.limits import DropLog, fd_ceiling, is_out_of_fds, out_of_fds_reason, reserve_error
from wormholed.netns import Netns, hostport, make_socket

__all__ = ["Stats", "Connect", "FinishConnect", "TcpProxy", "dial", "resolve"]

_log = logging.getLogger("wormholed.proxy.tcp")


@dataclass
class Stats:
    """Counters shared by one wormhole's proxy."""

    connections: int = 0  # currently open relayed connections (UDP: live flows)
    total: int = 0  # accepted and kept so far (not the refused)
    bytes_in: int = 0  # client -> tail
    bytes_out: int = 0  # tail -> client
    refused: int = 0  # turned away by a limit: max-conns, the fd reserve (UDP: new flows' datagrams)


Connect = Callable[[], Awaitable[socket.socket]]
Closed = Callable[[socket.socket], None]  # told of a tail socket connect() gave, before it is closed
_INET = (socket.AF_INET, socket.AF_INET6)  # TCP_NODELAY: not for a unix socket
FinishConnect = Callable[[socket.socket, float], Awaitable[None]]

PIPE_SIZE = 1 << 20  # asked for with F_SETPIPE_SZ; the kernel may give less
_F_SETPIPE_SZ = 1031
_SPLICE = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE
_ROUNDS = 16  # pipe-fulls per wake-up before letting other connections run
_EPOLL_MASK = select.EPOLLIN | select.EPOLLOUT | select.EPOLLET
_READABLE = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
_WRITABLE = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
_LINGER0 = struct.pack("ii", 1, 0)
_RESET = (errno.ECONNRESET, errno.EPIPE)
_EXHAUSTED = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS))
# accept() errors that concern only the connection being accepted (as in trio)
_ACCEPT_IGNORED = frozenset(
    getattr(errno, name)
    for name in ("EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN",
                 "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH")
    if hasattr(errno, name)
)
_ACCEPT_BATCH = 64
_POOL_MAX = 128  # idle pipes kept per proxy: short connections skip pipe2/fcntl/close
_monotonic = time.monotonic


def _new_pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:  # above /proc/sys/fs/pipe-max-size or the user's pipe quota
        pass
    return r, w


def _abort(sock: socket.socket) -> None:
    """Close with a reset (RST) instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
    except OSError:
        pass
    sock.close()


class _Half:
    """One direction of a relay: src fd -> pipe -> dst fd."""

    __slots__ = ("relay", "peer", "stats", "src", "dst", "dsock", "rp", "wp", "pending",
                 "inbound", "done", "copy", "buf", "out")

    def __init__(self, relay: _Relay, stats: Stats, src: int, dsock: socket.socket,
                 pipe: tuple[int, int], inbound: bool) -> None:
        self.relay = relay  # None once the relay is closed
        self.stats = stats
        self.src = src
        self.dsock = dsock
        self.dst = dsock.fileno()
        self.rp, self.wp = pipe
        self.pending = 0  # bytes in the pipe (copy mode: in self.out)
        self.inbound = inbound
        self.done = False  # EOF passed on
        self.copy = False  # splice refused these fds: copy through self.buf

    def pump(self) -> None:
        """Move bytes until src or dst would block, as edge-triggering requires."""
        if self.copy:
            return self._pump_copy()
        src, dst, rp, wp = self.src, self.dst, self.rp, self.wp
        pending = self.pending
        moved = 0
        rounds = _ROUNDS
        while True:
            if pending:
                try:
                    m = os.splice(rp, dst, pending, None, None, _SPLICE)
                except BlockingIOError:
                    break
                except OSError as exc:
                    self._moved(moved, pending)
                    return self._failed(exc, dst)
                moved += m
                pending -= m
                if pending:
                    continue  # sure to block now; the writable edge resumes us
            rounds -= 1
            if not rounds:
                asyncio.get_running_loop().call_soon(self._again)
                break
            try:
                n = os.splice(src, wp, PIPE_SIZE, None, None, _SPLICE)
            except BlockingIOError:
                break
            except OSError as exc:
                self._moved(moved, 0)
                return self._failed(exc, src)
            if n == 0:
                self._moved(moved, 0)
                return self._eof()
            pending = n
        self._moved(moved, pending)

    def _moved(self, moved: int, pending: int) -> None:
        self.pending = pending
        if moved:
            self.relay.last = _monotonic()
            if self.inbound:
                self.stats.bytes_in += moved
            else:
                self.stats.bytes_out += moved

    def _again(self) -> None:
        if self.relay is not None and not self.done:
            self.pump()

    def state(self) -> tuple:
        """(pipe or None, bytes in it, bytes buffered in memory, EOF passed on): for export()."""
        if self.copy:
            return None, 0, bytes(self.out[:self.pending]), self.done
        return (self.rp, self.wp), self.pending, b"", self.done

    def _eof(self) -> None:
        self.done = True
        if self.peer.done:  # both read to EOF, so close() sends FINs, not RSTs
            return self.relay.close()
        try:
            self.dsock.shutdown(socket.SHUT_WR)
        except OSError:  # the destination is gone already; its own half will tell
            pass

    def _failed(self, exc: OSError, fd: int) -> None:
        relay = self.relay
        if exc.errno == errno.EINVAL and not self.copy:
            return self._to_copy_mode()
        if exc.errno in _RESET:
            return relay.close(reset=True)
        side = "client" if fd == relay.client.fileno() else "tail"
        relay.proxy.log.warning("connection closed after a %s socket error: %s", side, exc)
        relay.close()

    def _to_copy_mode(self) -> None:
        data = b""
        while len(data) < self.pending:  # what the pipe took already goes first
            data += os.read(self.rp, self.pending - len(data))
        self.copy = True
        self.out = memoryview(data)
        self.buf = memoryview(bytearray(65536))
        self._pump_copy()

    def _pump_copy(self) -> None:
        src, dst = self.src, self.dst
        moved = 0
        for _ in range(_ROUNDS):
            if self.pending:
                try:
                    m = os.write(dst, self.out)
                except BlockingIOError:
                    break
                except OSError as exc:
                    self._moved(moved, self.pending)
                    return self._failed(exc, dst)
                moved += m
                self.pending -= m
                self.out = self.out[m:]
                continue
            try:
                n = os.readv(src, [self.buf])
            except BlockingIOError:
                break
            except OSError as exc:
                self._moved(moved, 0)
                return self._failed(exc, src)
            if n == 0:
                self._moved(moved, 0)
                return self._eof()
            self.out = self.buf[:n]
            self.pending = n
        else:
            asyncio.get_running_loop().call_soon(self._again)
        self._moved(moved, self.pending)


class _Relay:
    """A client and a tail socket, and the two halves copying between them."""

    __slots__ = ("proxy", "client", "tail", "up", "down", "last")

    def __init__(self, proxy: TcpProxy, client: socket.socket, tail: socket.socket,
                 pipes: tuple[tuple[int, int], tuple[int, int]]) -> None:
        self.proxy = proxy  # None once closed
        self.client = client
        self.tail = tail
        stats = proxy.stats
        self.up = up = _Half(self, stats, client.fileno(), tail, pipes[0], True)
        self.down = down = _Half(self, stats, tail.fileno(), client, pipes[1], False)
        up.peer = down
        down.peer = up
        self.last = _monotonic()  # when bytes last moved (idle_timeout)

    def close(self, reset: bool = False) -> None:
        proxy = self.proxy
        if proxy is None:
            return
        self.proxy = None
        pool = proxy._pipes
        for half in (self.up, self.down):  # closing a socket takes it out of the epoll set
            del proxy._halves[half.src]
            if (half.copy or not half.pending) and len(pool) < _POOL_MAX:  # the pipe is empty
                pool.append((half.rp, half.wp))
            else:
                os.close(half.rp)
                os.close(half.wp)
            half.relay = half.peer = None  # no cycles: the relay is freed at once
        if proxy._closed_cb is not None:
            proxy._closed_cb(self.tail)
        if reset:
            _abort(self.client)
            _abort(self.tail)
        else:
            self.client.close()
            self.tail.close()
        proxy.stats.connections -= 1


class TcpProxy:
    """Accepts on a listening socket and relays each connection to ``connect()``."""

    def __init__(self, sock: socket.socket, connect: Connect, *, stats: Stats | None = None,
                 log: logging.Logger = _log, max_conns: int = 0, idle_timeout: float = 0.0,
                 closed: Closed | None = None) -> None:
        """``closed``: told of each tail socket ``connect()`` gave, before it is closed (a
        load balancer counting the connections each tail has open)."""
        self._sock = sock
        self._connect = connect
        self._closed_cb = closed
        self.stats = stats if stats is not None else Stats()
        self.log = log
        self._drops = DropLog(log, "TCP relay")
        check_limits(max_conns, idle_timeout)
        self._max_conns = max_conns
        self._fd_ceiling = 0  # start(): the last fds are the control channel's (limits.py)
        self._idle_timeout = idle_timeout
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._epoll: select.epoll | None = None
        self._halves: dict[int, _Half] = {}  # socket fd -> the half reading it
        self._connecting: dict[int, asyncio.Future] = {}  # fd -> finish_connect()'s future
        self._registered: set[int] = set()  # tails finish_connect() put in the epoll set already
        self._tasks: set[asyncio.Task] = set()  # connecting to the tail
        self._pipes: list[tuple[int, int]] = []
        self._family = 0
        self._accepting = False
        self._backoff: asyncio.TimerHandle | None = None
        self._closed = False
        self._exported: list[socket.socket] | None = None  # export(): clients whose dial it cut short

    def start(self) -> None:
        """Begin accepting; call from the event loop thread."""
        if self._closed or self._loop is not None:
            raise RuntimeError("TcpProxy already started or closed")
        self._loop = asyncio.get_running_loop()
        self._epoll = select.epoll()
        self._loop.add_reader(self._epoll.fileno(), self._on_events)
        prepare_listener(self._sock)
        self._fd_ceiling = fd_ceiling()  # once: the daemon raised RLIMIT_NOFILE before any proxy starts
        self._family = int(self._sock.family)
        self._resume_accepting()
        if self._idle_timeout > 0:
            self._sweep()

    def _sweep(self) -> None:
        """Reset the relays idle for idle_timeout; again in min(idle_timeout / 4, 1 s)."""
        cutoff = _monotonic() - self._idle_timeout
        for relay in [half.relay for half in self._halves.values() if half.inbound and half.relay.last <= cutoff]:
            relay.close(reset=True)
        self._sweeper = self._loop.call_later(min(self._idle_timeout / 4, 1.0), self._sweep)

    def _on_accept(self) -> None:
        accept = self._sock._accept  # an fd: socket.accept() costs more than the syscall
        loop = self._loop
        stats = self.stats
        max_conns = self._max_conns
        ceiling = self._fd_ceiling
        for _ in range(_ACCEPT_BATCH):
            try:
                fd, _addr = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_IGNORED:
                    continue
                self._pause_accepting()
                if exc.errno in _EXHAUSTED:
                    self.log.error("accept: %s; retrying in 100 ms", exc)
                    self._drop_pipes()  # idle pipes hold fds
                    self._backoff = loop.call_later(0.1, self._resume_accepting)
                else:
                    self.log.error("accept failed, no longer accepting: %s", exc)
                return
            conn = _socket.socket(self._family, socket.SOCK_STREAM, 0, fd)
            if fd >= ceiling or (max_conns and stats.connections >= max_conns):
                stats.refused += 1
                _abort(conn)  # at once: never relayed, not in total
                continue
            stats.total += 1
            stats.connections += 1
            task = asyncio.Task(self._open(conn), loop=loop, eager_start=True)
            if not task.done():
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _pause_accepting(self) -> None:
        if self._accepting:
            self._accepting = False
            self._loop.remove_reader(self._sock.fileno())

    def _resume_accepting(self) -> None:
        self._backoff = None
        if not self._closed and not self._accepting:
            self._accepting = True
            self._loop.add_reader(self._sock.fileno(), self._on_accept)

    async def _open(self, conn: _socket.socket) -> None:
        # Bytes the client sends meanwhile wait in the kernel.
        tail = None
        try:
            conn.setblocking(False)
            tail = await self._connect()
            if self._closed or self._exported is not None:  # connect() finished despite the cancellation
                raise asyncio.CancelledError
            if tail.family in _INET:
                tail.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tail.fileno() >= self._fd_ceiling:
                raise reserve_error()
            pipes = self._take_pipes()
        except BaseException as exc:
            self.stats.connections -= 1
            _abort(conn)
            if tail is not None:
                self._registered.discard(tail.fileno())
                if self._closed_cb is not None:
                    self._closed_cb(tail)
                _abort(tail)
            if self._exported is not None and isinstance(exc, asyncio.CancelledError):
                self._exported.append(conn)  # export(): the successor dials again; not reset
                raise
            if is_out_of_fds(exc):  # turned away, as at accept
                self.stats.total -= 1
                self.stats.refused += 1
                self._drops.dropped(f"connections refused: {out_of_fds_reason(exc)}")
                return
            if isinstance(exc, Exception):
                self.log.warning("connection dropped: %s", exc)
                return
            raise
        relay = _Relay(self, conn, tail, pipes)
        halves = self._halves
        halves[relay.up.src] = relay.up
        halves[relay.down.src] = relay.down
        # Registering reports the current state as edges: early bytes, writable.
        try:
            self._epoll.register(relay.up.src, _EPOLL_MASK)
            if relay.down.src in self._registered:  # dialled with wait=self.finish_connect
                self._registered.discard(relay.down.src)
            else:
                self._epoll.register(relay.down.src, _EPOLL_MASK)
        except OSError as exc:  # ENOSPC: fs.epoll.max_user_watches
            self.log.warning("connection dropped: %s", exc)
            relay.close(reset=True)

    def _take_pipes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Two pipes, from the pool or new; none on one of the fds kept for the control channel."""
        pool = self._pipes
        first = pool.pop() if pool else _new_pipe()
        try:
            second = pool.pop() if pool else _new_pipe()
        except OSError:
            pool.append(first)
            raise
        if max(*first, *second) >= self._fd_ceiling:
            for fd in (*first, *second):
                os.close(fd)
            raise reserve_error()
        return first, second

    def _drop_pipes(self) -> None:
        for r, w in self._pipes:
            os.close(r)
            os.close(w)
        self._pipes.clear()

    async def finish_connect(self, sock: socket.socket, deadline: float) -> None:
        """Wait for a socket's non-blocking connect() to finish; for ``dial(wait=)``.

        OSError if it failed, TimeoutError at ``deadline`` (loop time). Cheaper
        than the loop's add_writer: the socket joins this proxy's epoll set
        once, and stays there for its relay.
        """
        if self._closed:
            raise OSError(errno.ECONNABORTED, "the proxy is closed")
        fd = sock.fileno()
        fut = self._connecting[fd] = self._loop.create_future()
        self._epoll.register(fd, _EPOLL_MASK)
        timer = self._loop.call_at(deadline, _expire, fut)
        try:
            events = await fut
            if events & (select.EPOLLERR | select.EPOLLHUP):  # else connected: no SO_ERROR to read
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
        except BaseException:
            if not self._closed:
                self._epoll.unregister(fd)
            raise
        finally:
            timer.cancel()
            del self._connecting[fd]
        self._registered.add(fd)

    def _on_events(self) -> None:
        halves = self._halves
        for fd, ev in self._epoll.poll(0):
            half = halves.get(fd)  # fd -> the half reading it; its peer writes it
            if half is None:
                fut = self._connecting.get(fd)  # else closed earlier in this batch
                if fut is not None and not fut.done():
                    fut.set_result(ev)
                continue
            if ev & _WRITABLE and half.peer.pending:
                half.peer.pump()
                if half.relay is None:
                    continue
            if ev & _READABLE and not half.done and not half.pending:
                half.pump()
                if half.relay is None:
                    continue
            if ev & select.EPOLLERR and half.done and not half.peer.pending:
                # An idle socket was reset after its EOF: nobody else will notice.
                err = half.peer.dsock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    half._failed(OSError(err, os.strerror(err)), fd)

    async def export(self) -> tuple[list[tuple], list[socket.socket]]:
        """Hand everything over (a successor process takes it): stop accepting and moving
        bytes, and give up every connection untouched, neither closed nor reset.

        Returns (relays, clients): per relay (client, tail, up, down), each half as
        (pipe or None, bytes in the pipe, bytes buffered in memory, EOF passed on); and the
        clients whose tail was being dialled (the dial is dropped: the successor dials
        again). The proxy is closed afterwards; the sockets are the caller's."""
        if self._closed:
            raise RuntimeError("TcpProxy closed")
        self._closed = True
        self._exported = []
        for timer in (self._backoff, self._sweeper):
            if timer is not None:
                timer.cancel()
        if self._loop is not None:
            self._pause_accepting()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        relays = []
        for relay in {half.relay for half in self._halves.values()}:
            for half in (relay.up, relay.down):
                self._epoll.unregister(half.src)
            relays.append((relay.client, relay.tail, relay.up.state(), relay.down.state()))
            relay.proxy = None
            relay.up.relay = relay.up.peer = relay.down.relay = relay.down.peer = None
        self._halves.clear()
        if self._epoll is not None:
            self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
        self._drop_pipes()
        self.stats.connections = 0
        return relays, self._exported

    def adopt(self, client: socket.socket, tail: socket.socket, up: tuple, down: tuple) -> None:
        """Relay a connection a predecessor exported (export()'s halves); call after start()."""
        client.setblocking(False)
        tail.setblocking(False)
        pipes = []
        for pipe, _, _, _ in (up, down):
            pipes.append(pipe if pipe is not None else _new_pipe())
        relay = _Relay(self, client, tail, tuple(pipes))
        self.stats.connections += 1
        for half, (pipe, pending, buffered, done) in ((relay.up, up), (relay.down, down)):
            half.done = done
            half.pending = pending
            if buffered:  # bytes read and not written: they go first, then the pipe's
                half.pending = 0
                data = buffered + (os.read(half.rp, pending) if pending else b"")
                half.copy = True
                half.out = memoryview(data)
                half.buf = memoryview(bytearray(65536))
                half.pending = len(data)
        self._halves[relay.up.src] = relay.up
        self._halves[relay.down.src] = relay.down
        self._epoll.register(relay.up.src, _EPOLL_MASK)  # the current state comes as edges
        self._epoll.register(relay.down.src, _EPOLL_MASK)

    def redial(self, client: socket.socket) -> None:
        """A client a predecessor accepted and had not relayed yet: dial the tail for it."""
        self.stats.connections += 1
        task = asyncio.Task(self._open(client), loop=self._loop, eager_start=True)
        if not task.done():
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Stop accepting, close the listening socket, reset live connections."""
        if self._closed:
            return
        self._closed = True
        for timer in (self._backoff, self._sweeper):
            if timer is not None:
                timer.cancel()
        if self._loop is not None:
            self._pause_accepting()
        self._sock.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for relay in {half.relay for half in self._halves.values()}:
            relay.close(reset=True)
        if self._epoll is not None:
            self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
        self._drop_pipes()

    async def __aenter__(self) -> TcpProxy:
        self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


# --------------------------------------------------------------------------
# Dialling the tail


def check_limits(max_conns: int, idle_timeout: float) -> None:
    """ValueError unless both are 0 (no limit) or more."""
    if max_conns < 0 or idle_timeout < 0:
        raise ValueError(f"max_conns and idle_timeout must be 0 (none) or more, not {max_conns}, {idle_timeout}")


def prepare_listener(sock: socket.socket) -> None:
    """Non-blocking, and TCP_NODELAY, which accepted sockets inherit: one call, not one per client."""
    sock.setblocking(False)
    if sock.family in _INET:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def resolve(host: str, port: int, type: int) -> tuple[int, tuple]:
    """(family, address) for ``host``: a literal directly, a name via getaddrinfo.

    Names resolve in the daemon's own namespace, with its /etc/resolv.conf.
    """
    family = literal_family(host)
    if family:
        return family, (host, port)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=type)
    except socket.gaierror as exc:
        raise OSError(errno.EHOSTUNREACH, f"cannot resolve {host!r}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    return family, addr


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


async def _connect(loop: asyncio.AbstractEventLoop, sock: socket.socket, addr: tuple,
                   deadline: float, wait: FinishConnect | None) -> None:
    # loop.sock_connect would run getaddrinfo on a thread for every call (uvloop).
    try:
        sock.connect(addr)
        return
    except BlockingIOError:  # EINPROGRESS
        pass
    if wait is not None:
        return await wait(sock, deadline)
    fd = sock.fileno()
    fut = loop.create_future()
    loop.add_writer(fd, _wake, fut)
    timer = loop.call_at(deadline, _expire, fut)
    try:
        await fut
    finally:
        timer.cancel()
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


async def dial(ns: Netns | None, host: str, port: int, *, timeout: float = 5.0,
               wait: FinishConnect | None = None, retry: bool = True) -> socket.socket:
    """A connected non-blocking TCP socket to host:port, made in ``ns``.

    A refused connection (the service still starting) is retried every 50 ms
    until ``timeout`` seconds have passed (unless not ``retry``: a load
    balancer tries another tail at once). ``wait``: how to wait for the
    connection, e.g. the TcpProxy's ``finish_connect`` (faster than the
    event loop's default way).
    """
    loop = asyncio.get_running_loop()
    family, addr = await resolve(host, port, socket.SOCK_STREAM)
    deadline = loop.time() + timeout
    while True:
        sock = await make_socket(ns, family, socket.SOCK_STREAM)
        try:
            await _connect(loop, sock, addr, deadline, wait)
            return sock
        except ConnectionRefusedError:
            sock.close()
            if not retry or loop.time() + 0.05 >= deadline:
                raise ConnectionRefusedError(
                    errno.ECONNREFUSED, f"connection to {hostport(host, port)} refused") from None
        except TimeoutError:
            sock.close()
            raise TimeoutError(errno.ETIMEDOUT, f"connecting to {hostport(host, port)} timed out") from None
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot connect to {hostport(host, port)}: {exc.strerror}") from None
        except BaseException:
            sock.close()
            raise
        await asyncio.sleep(0.05)
