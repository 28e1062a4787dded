"""The native relay engine's API: wormholed/_engine.c, called through ctypes.

The engine is plain C with a flat API (the ``we_*`` functions at the end of
_engine.c); this module is its Python face. ctypes releases the GIL around
every call, so a call that waits for the engine thread blocks no other
Python thread. The shared object is the extension ``wormholed._engine``
(built at install; importing it only finds the file), or the file named by
``WORMHOLE_ENGINE_SO`` (the tests' ASan build).

    eng = Engine()          an epoll set, two eventfds and a thread that never
                            touches Python
    eng.fileno() -> int     an eventfd, readable while handoffs() has entries
    eng.listen(fd) -> lid   accept on this listening TCP socket (dup()ed, made
                            non-blocking); until set_target, every accepted
                            connection is handed off
    eng.set_target(lid, family, host, port, netns_fd=-1)
                            connect each accepted client to host:port (a
                            numeric AF_INET or AF_INET6 literal), the tail
                            socket made in netns_fd (dup()ed; -1: the engine's
                            namespace); in force when it returns
    eng.clear_target(lid)   hand every accepted connection off again
    eng.set_limits(lid, max_conns, idle_ms)
                            0: none. A client accepted while lid has max_conns
                            open is reset at once and counted refused (not
                            total); a relayed connection idle (no byte either
                            way) for idle_ms is reset on both sides, at most
                            SWEEP_MS late; in force when it returns
    eng.relay(lid, client_fd, tail_fd)
                            relay a connected pair (a client lid handed off);
                            once it returns the engine owns both fds (detach()
                            the sockets); after an exception Python still does
    eng.handoffs() -> [(lid, client_fd, err)]
                            drains the queue and resets fileno(); Python owns
                            client_fd. err 0: no target; else the errno of the
                            engine's connect (ECONNREFUSED, ETIMEDOUT after
                            CONNECT_TIMEOUT_MS, ...)
    eng.dropped(lid)        Python closed a client lid handed off (instead of
                            relay())
    eng.stats(lid) -> (open, total, bytes client->tail, bytes tail->client, refused)
                            open: connecting, relayed, or handed off and not
                            dropped()
    eng.export(lid) -> (relayed, clients)
                            lid's connections leave the engine, none closed,
                            shut down or reset, no socket option changed: for a
                            successor. lid stops accepting (the engine closes
                            its dup: Python's listening socket is untouched)
                            and refuses relay(), adopt() and export() since
                            (ValueError); stats(), dropped() and unlisten() go
                            on: open then counts only the clients handed off
                            and not dropped() yet. Python owns every fd
                            returned. relayed: [(client_fd, tail_fd, up, down,
                            last_ms_ago)], up client->tail, down tail->client,
                            each half (pipe_r, pipe_w, pipe_pending, buffered,
                            done): bytes read, not yet written, are `buffered`
                            first, then pipe_pending in the pipe (-1, -1: none);
                            done: EOF passed on. clients: client fds whose tail
                            connect was in progress (the tail closed: it never
                            carried a byte)
    eng.adopt(lid, client_fd, tail_fd, up, down)
                            relay() of a pair with its halves as export() gives
                            them: writes buffered, then the pipe's bytes, then
                            reads on; a done half never reads again. Counted
                            open and in total; the idle clock starts anew. The
                            engine owns the sockets and pipes once it returns,
                            Python does after an exception (the pipe unread)
    eng.add_stats(lid, total, bytes_in, bytes_out, refused)
                            add to lid's counters (a successor's predecessor's)
    eng.unlisten(lid)       stop accepting, reset lid's connections and its
                            handoffs not taken, forget lid; returns once done
    eng.close()             unlisten all, join the thread, close everything;
                            idempotent

Relaying is wormholed.proxy.tcp's: back-pressure, half-close passed on as
shutdown(SHUT_WR), resets as resets. OSError for failed system calls,
ValueError for bad arguments, an unknown or exported lid, or a closed engine.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import sys
from ctypes import POINTER, Structure, byref, c_char_p, c_int, c_int64, c_uint32, c_void_p

__all__ = ["CONNECT_TIMEOUT_MS", "Engine"]

_NOLID, _EXPORTED, _CLOSED = -1000, -1001, -1002  # _engine.c's E_ codes


class _Handoff(Structure):
    _fields_ = [("lid", c_int), ("fd", c_int), ("err", c_int)]


class _Half(Structure):
    _fields_ = [("pr", c_int), ("pw", c_int), ("piped", c_uint32), ("nbuf", c_uint32), ("buf", c_void_p),
                ("done", c_int)]


class _Conn(Structure):
    _fields_ = [("fd", c_int * 2), ("idle_ms", c_int64), ("h", _Half * 2)]


def _load() -> ctypes.CDLL:
    path = os.environ.get("WORMHOLE_ENGINE_SO")
    if not path:
        from wormholed import _engine  # ImportError: not built
        path = _engine.__file__
    lib = ctypes.CDLL(path)
    sigs = {
        "we_new": (c_void_p, [POINTER(c_int)]),
        "we_close": (None, [c_void_p]),
        "we_free": (None, [c_void_p]),
        "we_fileno": (c_int, [c_void_p]),
        "we_listen": (c_int, [c_void_p, c_int]),
        "we_set_target": (c_int, [c_void_p, c_int, c_char_p, c_int, c_int]),
        "we_clear_target": (c_int, [c_void_p, c_int]),
        "we_set_limits": (c_int, [c_void_p, c_int, c_int, c_int]),
        "we_relay": (c_int, [c_void_p, c_int, c_int, c_int]),
        "we_unlisten": (c_int, [c_void_p, c_int]),
        "we_counts": (c_int, [c_void_p, c_int, c_int, POINTER(c_int64)]),
        "we_handoffs": (POINTER(_Handoff), [c_void_p, POINTER(c_int)]),
        "we_release": (None, [c_void_p]),
        "we_export": (c_int, [c_void_p, c_int, POINTER(POINTER(_Conn))]),
        "we_adopt": (c_int, [c_void_p, c_int, c_int, c_int, POINTER(_Half)]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


_lib = _load()
CONNECT_TIMEOUT_MS = c_int.in_dll(_lib, "we_connect_timeout_ms").value
_INT_MAX = 2**31 - 1


def _sockaddr(family: int, host: str, port: int) -> bytes:
    """struct sockaddr_in / sockaddr_in6 of a numeric address, as the C side takes it."""
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"family must be AF_INET or AF_INET6, not {family}")
    if not 1 <= port <= 65535:
        raise ValueError(f"bad port {port}")
    try:
        packed = socket.inet_pton(family, host)
    except (OSError, UnicodeError):
        raise ValueError(f"not a numeric IPv{4 if family == socket.AF_INET else 6} address: {host}") from None
    head = family.to_bytes(2, sys.byteorder) + port.to_bytes(2, "big")
    if family == socket.AF_INET:
        return head + packed + bytes(8)
    return head + bytes(4) + packed + bytes(4)  # flowinfo, address, scope id


def _fd(value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not -1 <= value <= _INT_MAX:
        raise ValueError(f"bad fd {value!r}")
    return value


class Engine:
    """An epoll set and a thread that accept, connect and relay TCP connections (see the module)."""

    def __init__(self) -> None:
        err = c_int(0)
        self._e = _lib.we_new(byref(err))
        if not self._e:
            raise OSError(err.value, os.strerror(err.value))
        self._closed = False

    def _handle(self) -> int:
        if self._closed:
            raise ValueError("the engine is closed")
        return self._e

    def _check(self, r: int, lid: int | None = None) -> int:
        if r >= 0:
            return r
        if r == _NOLID:
            raise ValueError(f"no listener {lid}")
        if r == _EXPORTED:
            raise ValueError(f"listener {lid} was exported")
        if r == _CLOSED:
            raise ValueError("the engine is closed")
        raise OSError(-r, os.strerror(-r))

    def fileno(self) -> int:
        return _lib.we_fileno(self._handle())

    def listen(self, fd: int) -> int:
        return self._check(_lib.we_listen(self._handle(), _fd(fd)))

    def set_target(self, lid: int, family: int, host: str, port: int, netns_fd: int = -1) -> None:
        addr = _sockaddr(family, host, port)
        self._check(_lib.we_set_target(self._handle(), lid, addr, len(addr), _fd(netns_fd)), lid)

    def clear_target(self, lid: int) -> None:
        self._check(_lib.we_clear_target(self._handle(), lid), lid)

    def set_limits(self, lid: int, max_conns: int, idle_ms: int) -> None:
        if not (0 <= max_conns <= _INT_MAX and 0 <= idle_ms <= _INT_MAX):
            raise ValueError("limits must be >= 0")
        self._check(_lib.we_set_limits(self._handle(), lid, max_conns, idle_ms), lid)

    def relay(self, lid: int, client_fd: int, tail_fd: int) -> None:
        if _fd(client_fd) < 0 or _fd(tail_fd) < 0 or client_fd == tail_fd:
            raise ValueError("bad fds")
        self._check(_lib.we_relay(self._handle(), lid, client_fd, tail_fd), lid)

    def _counts(self, lid: int, which: int, n: tuple[int, ...] = (0,) * 5) -> tuple[int, ...]:
        arr = (c_int64 * 5)(*n)
        self._check(_lib.we_counts(self._handle(), lid, which, arr), lid)
        return tuple(arr)

    def stats(self, lid: int) -> tuple[int, int, int, int, int]:
        return self._counts(lid, 0)

    def dropped(self, lid: int) -> None:
        self._counts(lid, -1)

    def add_stats(self, lid: int, total: int, bytes_in: int, bytes_out: int, refused: int) -> None:
        if min(total, bytes_in, bytes_out, refused) < 0:
            raise ValueError("counts must be >= 0")
        self._counts(lid, 1, (0, total, bytes_in, bytes_out, refused))

    def unlisten(self, lid: int) -> None:
        self._check(_lib.we_unlisten(self._handle(), lid), lid)

    def handoffs(self) -> list[tuple[int, int, int]]:
        n = c_int(0)
        block = _lib.we_handoffs(self._handle(), byref(n))
        try:
            return [(block[i].lid, block[i].fd, block[i].err) for i in range(n.value)]
        finally:
            _lib.we_release(block)

    def export(self, lid: int) -> tuple[list[tuple], list[int]]:
        block = POINTER(_Conn)()
        n = self._check(_lib.we_export(self._handle(), lid, byref(block)), lid)
        relayed, clients = [], []
        try:
            for i in range(n):
                c = block[i]
                if c.fd[1] < 0:
                    clients.append(c.fd[0])
                    continue
                halves = tuple((h.pr, h.pw, h.piped, ctypes.string_at(h.buf, h.nbuf) if h.nbuf else b"", bool(h.done))
                               for h in c.h)
                relayed.append((c.fd[0], c.fd[1], *halves, c.idle_ms))
        finally:
            for i in range(n):
                for h in block[i].h:
                    _lib.we_release(h.buf)
            _lib.we_release(block)
        return relayed, clients

    def adopt(self, lid: int, client_fd: int, tail_fd: int, up: tuple, down: tuple) -> None:
        if _fd(client_fd) < 0 or _fd(tail_fd) < 0 or client_fd == tail_fd:
            raise ValueError("bad fds")
        halves = (_Half * 2)()
        keep = []
        for h, state, name in zip(halves, (up, down), ("up", "down")):
            pr, pw, piped, buffered, done = state
            if not isinstance(buffered, bytes):
                raise TypeError(f"the {name} half's buffered bytes must be bytes")
            if not 0 <= piped <= 0xFFFFFFFF or len(buffered) > 0xFFFFFFFF:
                raise ValueError(f"bad state of the {name} half")
            buf = ctypes.create_string_buffer(buffered, len(buffered))
            keep.append(buf)
            h.pr, h.pw, h.piped, h.nbuf, h.done = _fd(pr), _fd(pw), piped, len(buffered), bool(done)
            h.buf = ctypes.cast(buf, c_void_p)
        r = _lib.we_adopt(self._handle(), lid, client_fd, tail_fd, halves)
        if r in (-errno.EINVAL, -errno.EBADMSG):
            raise ValueError("bad state of a half: its pipe and bytes do not agree")
        self._check(r, lid)

    def close(self) -> None:
        self._closed = True  # fileno() and every call refuse from now on
        _lib.we_close(self._e)  # idempotent, and safe against a concurrent call (E_CLOSED)

    def __del__(self) -> None:
        e, self._e = getattr(self, "_e", None), None
        if e:
            _lib.we_free(e)  # closes first
