"""The native TCP path: the asyncio shell around the native engine.

The engine (wormholed/_engine.c, built at install; its API is
wormholed.engine, through ctypes) accepts,
connects and relays on a thread of its own, without the GIL: a connection
costs no Python at all once its wormhole's tail is known. Python stays the
control plane:

- the daemon has one Engine (an ``EngineHub``); each TCP head is one of its
  listeners (a ``NativeTcpProxy``, the same interface as tcp.TcpProxy);
- a segment tells its proxy where the tail is (``set_target``) once it is
  armed, and forgets it (``clear_target``) when the tail stops answering;
- a connection the engine cannot finish comes back to Python (a handoff):
  accepted while the tail is unknown (a trigger runs first, or the tail is a
  name to resolve), or after the engine's connect failed (refused: the tail
  is still starting, and Python's dial() retries for 5 s). Python dials as
  the pure-Python proxy does and gives the pair back to the engine. Any
  other failed connect (timed out, unreachable) is final, as it is for
  dial(): the client is dropped and ``failed`` hears of it. A handed-off
  client stays one of the engine's open connections until Python gives it
  back (``relay``) or says it closed it (``dropped``).
- ``max_conns`` and ``idle_timeout`` are tcp.TcpProxy's, enforced by the
  engine (``set_limits``): handed-off clients count toward max_conns too.

``WORMHOLE_ENGINE=python`` selects the pure-Python relay (tcp.py) instead;
without the built extension the daemon uses it too, and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from typing import Callable

from wormhole.addr import literal_family

from .tcp import Connect, Stats, _abort, check_limits, prepare_listener

try:
    from wormholed import engine as _engine
except (ImportError, OSError) as e:  # not built (an install without a C compiler), or not loadable
    _engine = None
    IMPORT_ERROR = str(e)
else:
    IMPORT_ERROR = ""

__all__ = ["EngineHub", "NativeTcpProxy", "available", "wanted"]

_log = logging.getLogger("wormholed.proxy.native")


def wanted() -> str:
    """The engine WORMHOLE_ENGINE asks for: 'native' (the default) or 'python'."""
    choice = os.environ.get("WORMHOLE_ENGINE", "native").strip().lower() or "native"
    if choice not in ("native", "python"):
        raise ValueError(f"WORMHOLE_ENGINE must be native or python, not {choice!r}")
    return choice


def available() -> bool:
    return _engine is not None


class EngineHub:
    """The daemon's one engine, and the proxies (listeners) using it."""

    def __init__(self) -> None:
        self.engine = _engine.Engine()
        self._proxies: dict[int, NativeTcpProxy] = {}
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.engine.fileno(), self._on_handoffs)

    def _on_handoffs(self) -> None:
        for lid, fd, err in self.engine.handoffs():
            proxy = self._proxies.get(lid)
            if proxy is None:  # its proxy is closing
                _abort(socket.socket(fileno=fd))
                continue
            proxy._handoff(fd, err)

    def close(self) -> None:
        if self.engine is None:
            return
        self._loop.remove_reader(self.engine.fileno())
        self.engine.close()
        self.engine = None


class NativeTcpProxy:
    """Accepts on a listening socket through the engine and relays each connection to the
    target (``set_target``), or to ``connect()`` while there is none."""

    def __init__(self, sock: socket.socket, connect: Connect, *, hub: EngineHub, stats: Stats | None = None,
                 failed: Callable[[OSError], None] | None = None, log: logging.Logger = _log,
                 max_conns: int = 0, idle_timeout: float = 0.0) -> None:
        self._sock = sock
        self._connect = connect
        self._failed = failed  # told of an engine connect that failed for good
        self._hub = hub
        self._stats = stats if stats is not None else Stats()
        self.log = log
        self._lid: int | None = None
        self._tasks: set[asyncio.Task] = set()  # handed-off connections being dialled
        self._closed = False
        self._exported: list[socket.socket] | None = None  # export(): handed-off clients, not dialled
        check_limits(max_conns, idle_timeout)
        idle_ms = min(max(1, round(idle_timeout * 1000)), 2**31 - 1) if idle_timeout else 0  # the engine's int
        self._limits = (max_conns, idle_ms)

    def start(self) -> None:
        if self._closed or self._lid is not None:
            raise RuntimeError("NativeTcpProxy already started or closed")
        prepare_listener(self._sock)
        self._lid = self._hub.engine.listen(self._sock.fileno())
        self._hub._proxies[self._lid] = self
        if any(self._limits):
            self._hub.engine.set_limits(self._lid, *self._limits)

    def set_target(self, ns, host: str, port: int) -> None:
        """Let the engine connect new clients to host:port in ns itself (an address, not a name)."""
        family = literal_family(host)
        if self._lid is None or self._closed:
            return
        if not family:  # a name: Python's dial() resolves it, per connection
            return self._hub.engine.clear_target(self._lid)
        self._hub.engine.set_target(self._lid, family, host, port, ns.fileno() if ns is not None else -1)

    def clear_target(self) -> None:
        if self._lid is not None and not self._closed:
            self._hub.engine.clear_target(self._lid)

    @property
    def stats(self) -> Stats:
        """The engine's counters (its open connections include those Python is dialling for)."""
        if self._lid is not None and not self._closed:  # once closed: the last counts
            self._read_stats()
        return self._stats

    def _read_stats(self) -> None:
        s = self._stats
        s.connections, s.total, s.bytes_in, s.bytes_out, s.refused = self._hub.engine.stats(self._lid)

    def _drop(self, conn: socket.socket) -> None:
        """Reset a client the engine handed off, which then no longer counts it open."""
        _abort(conn)
        with contextlib.suppress(ValueError):  # the listener is gone already
            self._hub.engine.dropped(self._lid)

    def _handoff(self, fd: int, err: int) -> None:
        conn = socket.socket(fileno=fd)
        if self._exported is not None:  # export(): the successor dials it
            self._exported.append(conn)
            return
        if err and err != errno.ECONNREFUSED:  # dialling again would fail the same way, or wait as long
            self._drop(conn)
            exc = OSError(err, f"cannot connect to the tail: {os.strerror(err)}")
            self.log.warning("connection dropped: %s", exc.strerror)
            if self._failed is not None:
                self._failed(exc)
            return
        task = asyncio.Task(self._dial(conn, err), loop=self._hub._loop, eager_start=True)
        if not task.done():
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _dial(self, conn: socket.socket, err: int) -> None:
        tail = None
        try:
            conn.setblocking(False)
            tail = await self._connect()  # a refused or failed engine connect: dialled again, with retries
            if self._closed:
                raise asyncio.CancelledError
            tail.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._hub.engine.relay(self._lid, conn.fileno(), tail.fileno())
        except BaseException as exc:
            if self._exported is not None and isinstance(exc, asyncio.CancelledError):
                if tail is not None:
                    tail.close()  # it never carried a byte
                self._exported.append(conn)  # export(): the successor dials again; not reset
                raise
            self._drop(conn)
            if tail is not None:
                _abort(tail)
            if isinstance(exc, Exception):
                self.log.warning("connection dropped: %s", exc)
                return
            raise
        conn.detach()  # the engine owns both now
        tail.detach()

    async def export(self) -> tuple[list[tuple], list[socket.socket]]:
        """tcp.TcpProxy.export's, through the engine's export (see _engine.c): every connection
        given up untouched, relayed ones with their halves, clients not relayed yet alone."""
        if self._closed or self._lid is None:
            raise RuntimeError("NativeTcpProxy closed or not started")
        self._exported = []
        self._hub._on_handoffs()  # those queued come to us, not to a dial
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        relayed, clients = self._hub.engine.export(self._lid)
        self._hub._on_handoffs()
        self._closed = True
        self._read_stats()
        taken = self._exported
        for _ in taken:  # Python's now, not the engine's open ones
            self._hub.engine.dropped(self._lid)
        self._hub._proxies.pop(self._lid, None)
        self._hub.engine.unlisten(self._lid)
        self._stats.connections = 0

        def half(h):
            r, w, pending, buffered, done = h
            return ((r, w) if r >= 0 else None), pending, buffered, done

        relays = [(socket.socket(fileno=c), socket.socket(fileno=t), half(up), half(down))
                  for c, t, up, down, _ in relayed]
        return relays, [socket.socket(fileno=fd) for fd in clients] + taken

    def adopt(self, client: socket.socket, tail: socket.socket, up: tuple, down: tuple) -> None:
        """A connection a predecessor exported (export()'s halves): the engine relays it on."""
        def half(h):
            pipe, pending, buffered, done = h
            r, w = pipe if pipe is not None else (-1, -1)
            return r, w, pending, buffered, done

        client.setblocking(False)
        tail.setblocking(False)
        self._hub.engine.adopt(self._lid, client.fileno(), tail.fileno(), half(up), half(down))
        client.detach()
        tail.detach()

    def redial(self, client: socket.socket) -> None:
        """A client a predecessor accepted and had not relayed: dial its tail, then adopt the pair."""
        async def dial() -> None:
            try:
                tail = await self._connect()
                tail.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except BaseException as exc:
                _abort(client)
                if isinstance(exc, Exception):
                    self.log.warning("connection dropped: %s", exc)
                    return
                raise
            self.adopt(client, tail, (None, 0, b"", False), (None, 0, b"", False))

        task = asyncio.Task(dial(), loop=self._hub._loop, eager_start=True)
        if not task.done():
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def add_stats(self, total: int, bytes_in: int, bytes_out: int, refused: int) -> None:
        """A predecessor's counters, carried on (adopt() counts each connection it takes)."""
        self._hub.engine.add_stats(self._lid, total, bytes_in, bytes_out, refused)

    async def aclose(self) -> None:
        """Stop accepting, close the listening socket, reset live connections."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._lid is not None:
            self._hub._proxies.pop(self._lid, None)
            with contextlib.suppress(ValueError):
                self._read_stats()
                self._hub.engine.unlisten(self._lid)
        self._stats.connections = 0  # unlisten reset them all
        self._sock.close()

    async def __aenter__(self) -> NativeTcpProxy:
        self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
