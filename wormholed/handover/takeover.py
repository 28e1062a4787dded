"""Two daemons' conversation in a handover, and the old one's part of it.

`wormholed --takeover` (the successor, same --state-dir) connects to the running daemon's
handover socket, STATE_DIR/handover.sock (a SOCK_SEQPACKET unix socket, mode 0600):

    successor -> {"hello": {"versions": [1], "pid": N}}
    daemon    -> {"refused": WHY}                            (and serves on: a version the successor
                                                              does not read, too few free fds), or
                 the record and its fds (transfer.send)       (it stopped serving to send them)
    successor -> {"commit": true}                            the daemon exits at once: no
                                                              teardown, its fds just close
              or {"refused": WHY}, or the socket closes      the daemon takes it all back

Everything the successor can refuse for (a version it does not read, a record it cannot
decode, more fds than its RLIMIT_NOFILE leaves room for) it refuses before it takes an
fd, so a refused or broken takeover leaves the old daemon serving everything: it adopts
its own record again, as a successor would. After the commit the successor waits for the
state dir's lock (the old daemon's exit releases it) before it serves the control channel.
An export that fails part way (a bug, not a refusal) stops the old daemon instead: what
it stopped cannot be trusted to run on, and its records bring the wormholes back.

The old daemon's exit after a commit is os._exit: no exit stack runs, so no container is
removed, no remote child deleted, no unix socket file unlinked, and no socket is shut
down or reset; the kernel drops this process's references, and the successor's keep every
connection open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from . import transfer
from .record import SUPPORTED, VERSION, HandoverError, decode

log = logging.getLogger("wormholed")

SOCKET_NAME = "handover.sock"
TIMEOUT = 30.0  # seconds either side waits for the other


def _send(sock: socket.socket, msg: dict) -> None:
    sock.send(json.dumps(msg).encode())


def _recv(sock: socket.socket) -> dict:
    data = sock.recv(65536)
    if not data:
        raise EOFError("the other daemon closed the handover")
    msg = json.loads(data)
    if not isinstance(msg, dict):
        raise ValueError("not a handover message")
    return msg


class Server:
    """The running daemon's handover socket. `export()` stops the daemon's serving and gives
    (record, fds), or raises HandoverError before anything stops; `resume(record, fds)` takes
    it back when the successor does not; `broken(why)` is told when export() failed otherwise
    (part of the daemon may be stopped: it cannot serve on as it was)."""

    def __init__(self, state_dir: str, export: Callable[[], Awaitable[tuple[bytes, list[int]]]],
                 resume: Callable[[bytes, list[int]], Awaitable[None]], broken: Callable[[str], None]):
        self.path = str(Path(state_dir) / SOCKET_NAME)
        self._export, self._resume, self._broken = export, resume, broken
        self._sock: socket.socket | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Listen for a successor; where the state dir takes no socket (read-only), say that
        this daemon cannot be taken over, and serve on."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            old = os.umask(0o177)
            try:
                sock.bind(self.path)
            finally:
                os.umask(old)
            sock.listen(4)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            log.warning("no handover socket at %s (%s): a --takeover cannot take over from this daemon",
                        self.path, e.strerror or e)
            return
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            try:
                await self._handle(conn)
            except Exception as e:  # the daemon serves on whatever a successor did
                log.error("handover: %s: %s", type(e).__name__, e)
            finally:
                conn.close()

    async def _handle(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        conn.settimeout(TIMEOUT)
        hello = (await asyncio.to_thread(_recv, conn)).get("hello") or {}
        versions = hello.get("versions") or []
        if VERSION not in versions:
            why = f"this wormholed hands over version {VERSION}; the successor reads {versions}"
            log.error("handover to pid %s refused: %s; serving on", hello.get("pid"), why)
            _send(conn, {"refused": why})
            return
        log.info("handover: pid %s asks to take over", hello.get("pid"))
        try:
            record, fds = await self._export()
        except HandoverError as e:  # raised before anything stopped
            log.error("handover to pid %s refused: %s; serving on", hello.get("pid"), e)
            _send(conn, {"refused": str(e)})
            return
        except Exception as e:  # a bug: whatever it stopped cannot be trusted to run on
            why = f"{type(e).__name__}: {e}"
            log.critical("handover: the export failed (%s); stopping, as this daemon cannot serve on as "
                         "it was (its wormholes come back from their records at the next start)", why)
            with contextlib.suppress(OSError):
                _send(conn, {"refused": f"the running wormholed failed to hand over ({why}) and stops"})
            self._broken(why)
            return
        try:
            await asyncio.to_thread(transfer.send, conn, record, fds)
            reply = await asyncio.to_thread(_recv, conn)
        except (OSError, EOFError, ValueError) as e:
            reply = {"refused": f"the handover broke off ({type(e).__name__}: {e})"}
        if reply.get("commit") is True:
            log.info("handover: pid %s took over %d fds; exiting", hello.get("pid"), len(fds))
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(0)
        log.error("handover: the successor did not take over: %s; serving on", reply.get("refused", reply))
        await self._resume(record, fds)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def request(state_dir: str, timeout: float = TIMEOUT) -> tuple[dict, list[int], Callable[[], None]]:
    """The successor's side (blocking, before its event loop runs anything): the decoded
    record, its fds, and commit() to call once the fds are accepted. HandoverError when there
    is nothing to take over or the record cannot be taken (the old daemon serves on)."""
    path = str(Path(state_dir) / SOCKET_NAME)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise HandoverError(f"no running wormholed to take over at {path}: {e.strerror or e}") from None
    fds: list[int] = []
    try:
        _send(sock, {"hello": {"versions": list(SUPPORTED), "pid": os.getpid()}})
        try:
            record, fds = transfer.receive(sock)
        except json.JSONDecodeError:
            raise HandoverError("the running wormholed did not answer with a handover") from None
        except HandoverError as e:  # refused by either side: say so (the old daemon may wait for it)
            with contextlib.suppress(OSError):
                _send(sock, {"refused": str(e)})
            raise
        try:
            state = decode(record, len(fds))
        except HandoverError as e:
            _send(sock, {"refused": str(e)})
            raise
    except (OSError, EOFError, ValueError) as e:
        for fd in fds:
            os.close(fd)
        sock.close()
        raise HandoverError(f"the handover broke off: {e}") from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        sock.close()
        raise

    def commit() -> None:
        try:
            _send(sock, {"commit": True})
        finally:
            sock.close()

    return state, fds, commit
