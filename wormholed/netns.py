"""Sockets made inside a network namespace.

A socket belongs to the network namespace it was created in, whatever thread
later uses it. So a socket for another namespace is created on a helper
thread that enters the namespace (``setns``), makes the socket, and goes
home again; the event loop's own thread never changes namespace. A helper
thread that cannot get home ends instead of being reused. Plain sockets are
made a few at a time, the spares kept on the ``Netns``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import errno
import fcntl
import logging
import os
import select
import socket
import threading

from wormhole.spec import hostport

__all__ = ["NetnsError", "Netns", "make_socket", "hostport"]

log = logging.getLogger("wormholed.netns")

NETNS_RUN_DIR = "/run/netns"
SPARES = 8  # plain sockets made per trip into another namespace
_NS_GET_NSTYPE = 0xB703  # ioctl _IO(0xb7, 0x3): which kind of namespace an nsfs fd is


class NetnsError(Exception):
    """A namespace that cannot be used; the message is fit to print to a user."""


class Netns:
    """A network namespace held open by an fd (so it stays valid while used).

    Two ``Netns`` of the same namespace compare equal. Close it when done, or
    use it as a context manager.
    """

    __slots__ = ("_fd", "label", "prefix", "_key", "_spares", "pidfd", "root")

    def __init__(self, fd: int, label: str, prefix: str = "") -> None:
        """Take ownership of ``fd``, an open network-namespace file. ``label`` names it in
        messages; ``prefix`` is how a URL names it (``NAME@``, ``docker:NAME@``)."""
        self._fd = fd
        self.label = label
        self.prefix = prefix
        st = os.fstat(fd)
        self._key = (st.st_dev, st.st_ino)
        self._spares: dict[tuple[int, int], list[socket.socket]] = {}  # see make_socket
        self.pidfd = -1  # of_pid: the process it was found through; readable once it has exited
        self.root = ""  # of_pid: /proc/PID/root, where that process's files are (a container's)

    @classmethod
    def named(cls, name: str) -> Netns:
        """The namespace ``ip netns`` calls NAME (``/run/netns/NAME``)."""
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise NetnsError(f"invalid network namespace name {name!r}")
        try:
            fd = os.open(os.path.join(NETNS_RUN_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NetnsError(f"no network namespace named {name!r}") from None
        except OSError as exc:
            raise NetnsError(f"cannot open network namespace {name!r}: {exc.strerror}") from None
        ns = cls._checked(fd, f"netns:{name}")
        ns.prefix = f"{name}@"
        return ns

    @classmethod
    def of_pid(cls, pid: int) -> Netns:
        """The namespace process PID is in (``/proc/PID/ns/net``). It keeps a pidfd of the
        process (``pidfd``, ``process_exited()``): a container that restarts gets a new
        namespace, and whoever uses this one can tell that it is left behind."""
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise NetnsError(f"invalid process id {pid!r}")
        try:
            pidfd = os.pidfd_open(pid)  # first: the pid cannot be reused under us after this
        except ProcessLookupError:
            raise NetnsError(f"no process with id {pid}") from None
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            ns = cls._checked(fd, f"pid:{pid}")
        except FileNotFoundError:
            os.close(pidfd)
            raise NetnsError(f"no process with id {pid}") from None
        except OSError as exc:
            os.close(pidfd)
            raise NetnsError(f"cannot open the network namespace of process {pid}: {exc.strerror}") from None
        except BaseException:
            os.close(pidfd)
            raise
        ns.pidfd = pidfd
        ns.root = f"/proc/{pid}/root"
        if ns.process_exited():  # it exited before its namespace was opened: maybe not its namespace
            ns.close()
            raise NetnsError(f"no process with id {pid}")
        return ns

    def process_exited(self) -> bool:
        """of_pid's process has exited (False for namespaces found otherwise)."""
        return self.pidfd >= 0 and bool(select.select([self.pidfd], [], [], 0)[0])

    @classmethod
    def at(cls, path: str, label: str, prefix: str = "") -> Netns:
        """The namespace bound at `path` (a CRI runtime's /var/run/netns/cni-... file)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NetnsError(f"cannot open the network namespace of {label} ({path}): {exc.strerror}") from None
        ns = cls._checked(fd, label)
        ns.prefix = prefix
        return ns

    @classmethod
    def _checked(cls, fd: int, label: str) -> Netns:
        # A stale /run/netns entry is a plain file once its bind mount is gone.
        try:
            kind = fcntl.ioctl(fd, _NS_GET_NSTYPE)
        except OSError:
            kind = None
        if kind != os.CLONE_NEWNET:
            os.close(fd)
            raise NetnsError(f"{label} is not a network namespace")
        return cls(fd, label)

    def fileno(self) -> int:
        if self._fd < 0:
            raise NetnsError(f"{self.label} is closed")
        return self._fd

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        pidfd, self.pidfd = self.pidfd, -1
        if pidfd >= 0:
            os.close(pidfd)
        for socks in self._spares.values():
            _close(socks)
        self._spares.clear()

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Netns) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"<Netns {self.label} ino={self._key[1]}>"


# --------------------------------------------------------------------------
# The daemon's own namespace, opened once by the first caller of make_socket
# (the event loop thread, which never leaves it).

_home_fd = -1
_home_key: tuple[int, int] | None = None


def _home() -> int:
    global _home_fd, _home_key
    if _home_fd < 0:
        fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(fd)
        _home_fd, _home_key = fd, (st.st_dev, st.st_ino)
    return _home_fd


class _Stranded(Exception):
    """The helper thread could not return to the daemon's namespace."""


class _Workers:
    """A few daemon threads that run jobs; a thread whose job raises _Stranded ends."""

    def __init__(self, max_threads: int = 4) -> None:
        self._max = max_threads
        self._jobs: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._threads = 0
        self._idle = 0

    def submit(self, fn, *args) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._jobs.append((fut, fn, args))
            if self._idle:
                self._wake.notify()
            elif self._threads < self._max:
                self._spawn()
        return fut

    def _spawn(self) -> None:  # with the lock held
        self._threads += 1
        threading.Thread(target=self._work, name="wormholed-netns", daemon=True).start()

    def _work(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._jobs:
                        self._idle += 1
                        self._wake.wait()
                        self._idle -= 1
                    fut, fn, args = self._jobs.popleft()
                if not fut.set_running_or_notify_cancel():
                    continue
                try:
                    fut.set_result(fn(*args))
                except _Stranded as exc:
                    log.critical("netns helper thread is stranded and ends: %s", exc)
                    fut.set_exception(OSError(errno.EIO, str(exc)))
                    return
                except BaseException as exc:  # handed to the caller
                    fut.set_exception(exc)
        finally:
            with self._lock:
                self._threads -= 1
                if self._jobs and self._threads < self._max:
                    self._spawn()


_workers = _Workers()


def _where(addr) -> str:
    return hostport(addr[0], addr[1]) if isinstance(addr, tuple) and len(addr) >= 2 else repr(addr)


def _create(family, type, bind, listen, reuse, label) -> socket.socket:
    sock = socket.socket(family, type | socket.SOCK_NONBLOCK)
    try:
        if bind is not None:
            if reuse and type == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(bind)
            except OSError as exc:
                where = f"{_where(bind)} in {label}" if label else _where(bind)
                raise OSError(exc.errno, f"cannot bind {where}: {exc.strerror}") from None
        if listen is not None:
            sock.listen(listen)
    except BaseException:
        sock.close()
        raise
    return sock


def _make_many(family, type, count) -> list[socket.socket]:
    socks = []
    try:
        for _ in range(count):
            socks.append(socket.socket(family, type | socket.SOCK_NONBLOCK))
    except OSError:
        if not socks:
            raise
    return socks


def _close(result) -> None:
    for sock in result if isinstance(result, list) else (result,):
        sock.close()


def _inside(ns_fd, home_fd, label, fn, *args):
    """fn(*args) run inside the namespace ns_fd, on this (helper) thread."""
    os.setns(ns_fd, os.CLONE_NEWNET)
    result = None
    try:
        result = fn(*args)
    finally:
        try:
            os.setns(home_fd, os.CLONE_NEWNET)
        except OSError as exc:
            if result is not None:
                _close(result)
            raise _Stranded(f"cannot return from {label}: {exc.strerror}") from exc
    return result


async def _run_inside(ns: Netns, fn, *args):
    """fn(*args) inside ns, on a helper thread. The thread enters a duplicate of ns's fd, its
    own until the job ends: ns may be closed meanwhile (its wormhole deleted), and the
    number then reused for another namespace's file, which the thread would enter instead."""
    fd = os.dup(ns.fileno())
    try:
        fut = _workers.submit(_inside, fd, _home(), ns.label, fn, *args)
    except BaseException:
        os.close(fd)
        raise
    fut.add_done_callback(lambda f: os.close(fd))  # run, failed, or cancelled before it ran
    try:
        return await asyncio.wrap_future(fut)
    except asyncio.CancelledError:  # the thread may still hand us sockets
        fut.add_done_callback(lambda f: f.cancelled() or f.exception() or _close(f.result()))
        raise


async def make_socket(
    ns: Netns | None,
    family: int,
    type: int,
    *,
    bind: tuple | None = None,
    listen: int | None = None,
    reuse: bool = True,
) -> socket.socket:
    """A non-blocking socket created in ``ns`` (None: the daemon's own).

    Optionally bound (SO_REUSEADDR first for TCP when ``reuse``) and
    listening. Binding errors raise OSError naming the address; the socket is
    closed on any error. Call it from the event loop thread.

    A trip to a helper thread costs far more than a socket, so plain sockets
    for another namespace are made SPARES at a time and the rest kept on the
    Netns for the next calls (dial() makes one per connection).
    """
    _home()
    if ns is None or ns._key == _home_key:
        return _create(family, type, bind, listen, reuse, None)
    if bind is not None or listen is not None:
        return await _run_inside(ns, _create, family, type, bind, listen, reuse, ns.label)
    spares = ns._spares.get((family, type))
    if spares:
        return spares.pop()
    socks = await _run_inside(ns, _make_many, family, type, SPARES)
    sock = socks.pop()
    if ns._fd >= 0:  # else closed meanwhile
        spares = ns._spares.setdefault((family, type), [])
        room = SPARES - len(spares)  # concurrent calls may have filled it already
        spares.extend(socks[:room])
        socks = socks[room:]
    _close(socks)
    return sock
