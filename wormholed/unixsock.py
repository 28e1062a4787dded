"""Unix stream sockets as wormhole ends: a head listening on a socket file or an
abstract name, a tail dialling one. The bytes then move on tcp.TcpProxy's relay,
which is family-blind (splice works on any stream socket).

Where a name lives:

- a socket *file* (`/run/app.sock`) is looked up in the filesystem of the
  end's container (docker-ns, docker-run) through ``/proc/PID/root``, since a
  threaded process may not setns() into a mount namespace; in a named netns
  or the daemon's own, in the host's filesystem;
- an *abstract* name (`@name`) belongs to a network namespace, so its socket
  is made inside the end's namespace, as TCP sockets are (netns.make_socket).

A head's socket file:

- a file left by a crash (a socket nobody accepts on: connect() is refused)
  is replaced; a socket another process serves is refused; anything else (a
  regular file, a directory) is never touched;
- gets its owner (root) and mode before listen(): until then a connect() is
  refused, so there is no moment with wider permissions than asked;
- is removed when the wormhole closes, if it is still the file this daemon
  made (same device and inode), never a file someone put there since.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat

from .netns import Netns, make_socket

__all__ = ["UnixHeadError", "adopt_unix", "dial_unix", "listen_unix", "sockaddr"]

# connect() errors that mean "not there yet": a service still starting.
_NOT_YET = (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN)


class UnixHeadError(OSError):
    """The head's socket file cannot be made; the message names it and why."""


def sockaddr(ns: Netns | None, path: str) -> str | bytes:
    """What bind()/connect() take for `path` as seen from `ns`'s place."""
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    root = ns.root if ns is not None else ""
    return root + path


def _describe(ns: Netns | None, path: str) -> str:
    where = f" in {ns.label}" if ns is not None else ""
    return f"unix:{path}{where}" if path.startswith("@") else f"unix://{path}{where}"


def _clear_stale(addr: str, what: str) -> None:
    """Make room for our socket at `addr`: a stale socket file goes, anything else stays."""
    try:
        st = os.lstat(addr)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UnixHeadError(errno.EEXIST, f"cannot listen on {what}: it exists and is not a socket (not replaced)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(addr)
    except ConnectionRefusedError:  # nobody accepts: left by a crash
        os.unlink(addr)
        return
    except OSError as exc:
        if exc.errno == errno.EAGAIN:  # a full backlog: someone serves it
            raise UnixHeadError(errno.EADDRINUSE, f"cannot listen on {what}: another process serves it") from None
        raise UnixHeadError(exc.errno, f"cannot listen on {what}: {exc.strerror}") from None
    finally:
        probe.close()
    raise UnixHeadError(errno.EADDRINUSE, f"cannot listen on {what}: another process serves it")


async def listen_unix(ns: Netns | None, path: str, mode: int, backlog: int = 1024):
    """(listening socket, remove) for a head at `path`; remove() deletes the socket file if
    it is still ours (a no-op for an abstract name). Raises UnixHeadError."""
    what = _describe(ns, path)
    addr = sockaddr(ns, path)
    if isinstance(addr, bytes):  # abstract: in the namespace, no file, no permissions
        try:
            sock = await make_socket(ns, socket.AF_UNIX, socket.SOCK_STREAM, bind=addr, listen=backlog)
        except OSError as exc:
            raise UnixHeadError(exc.errno, f"cannot listen on {what}: {exc.strerror}") from None
        return sock, lambda: None
    _clear_stale(addr, what)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.bind(addr)
        except OSError as exc:
            raise UnixHeadError(exc.errno, f"cannot listen on {what}: {exc.strerror}") from None
        st = os.lstat(addr)
        made = (st.st_dev, st.st_ino)
        try:
            os.chown(addr, 0, 0, follow_symlinks=False)
            os.chmod(addr, mode)
            sock.listen(backlog)
        except OSError as exc:
            _remove_if(addr, made)
            raise UnixHeadError(exc.errno, f"cannot listen on {what}: {exc.strerror}") from None
    except BaseException:
        sock.close()
        raise
    return sock, lambda: _remove_if(addr, made)


def adopt_unix(ns: Netns | None, path: str, sock: socket.socket):
    """remove() for a head socket a predecessor made and handed over: its file, if it is still
    there, is ours to remove when the wormhole closes. Raises UnixHeadError if it is gone."""
    addr = sockaddr(ns, path)
    if isinstance(addr, bytes):
        return lambda: None
    try:
        st = os.lstat(addr)
    except OSError as exc:
        raise UnixHeadError(exc.errno, f"the handed-over {_describe(ns, path)}: {exc.strerror}") from None
    made = (st.st_dev, st.st_ino)
    return lambda: _remove_if(addr, made)


def _remove_if(addr: str, made: tuple[int, int]) -> None:
    """Unlink the socket file at addr if it is the one we made."""
    try:
        st = os.lstat(addr)
        if (st.st_dev, st.st_ino) == made:
            os.unlink(addr)
    except OSError:
        pass


async def dial_unix(ns: Netns | None, path: str, *, timeout: float = 5.0) -> socket.socket:
    """A connected non-blocking unix stream socket to `path` as seen from ns's place.
    Refused or missing (the service still starting) is retried every 50 ms for `timeout` s."""
    loop = asyncio.get_running_loop()
    addr = sockaddr(ns, path)
    deadline = loop.time() + timeout
    what = _describe(ns, path)
    while True:
        if isinstance(addr, bytes):
            sock = await make_socket(ns, socket.AF_UNIX, socket.SOCK_STREAM)
        else:  # a file: the namespace does not matter, the path does
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.connect(addr)  # unix connects complete at once, or fail at once
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno not in _NOT_YET:
                raise OSError(exc.errno, f"cannot connect to {what}: {exc.strerror}") from None
            if loop.time() + 0.05 >= deadline:
                raise OSError(exc.errno, f"cannot connect to {what}: {exc.strerror}") from None
        except BaseException:
            sock.close()
            raise
        await asyncio.sleep(0.05)
