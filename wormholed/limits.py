"""Connection limits, and the file descriptors kept back for the control channel.

Limits per wormhole: the `max-conns N` and `idle-timeout DURATION` create
words; the daemon's --max-conns and --idle-timeout are the defaults for
wormholes that say nothing. Without either, TCP has neither limit, and UDP
keeps at most UDP_MAX_FLOWS flows per wormhole, each closed after
UDP_IDLE_TIMEOUT seconds without a datagram either way: a UDP flow is made by
anyone's first datagram, so it must be bounded by default.

The reserve: whoever reaches a wormhole must not be able to take the
daemon's last file descriptors, or the control channel could no longer
accept (and `wormhole ping` would fail for a reason it cannot name). The
data plane refuses a new socket whose fd number falls within RESERVE of
RLIMIT_NOFILE: the kernel hands out the lowest free fd, so a high number
means nearly all are in use. UDP flows check their tail socket
(within_reserve); TCP relays reset a client accepted onto such an fd and
count it refused (tcp.py; the native engine, _engine.c's FD_RESERVE, reads
RLIMIT_NOFILE when it starts, after the daemon has raised it).
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
import time
from dataclasses import dataclass

UDP_MAX_FLOWS = 4096
UDP_IDLE_TIMEOUT = 60.0
RESERVE = 64  # fds under RLIMIT_NOFILE the data plane leaves to the control channel
OUT_OF_FDS = "out of file descriptors"


@dataclass(frozen=True)
class Defaults:
    """The daemon's defaults (--max-conns, --idle-timeout); None: the built-in ones above."""

    max_conns: int | None = None
    idle_timeout: float | None = None

    def resolve(self, proto: str, max_conns: int | None, idle_timeout: float | None) -> tuple[int, float]:
        """(max_conns, idle_timeout) for a wormhole: its own words, else these, else the
        built-in ones; 0 means none."""
        udp = proto == "udp"
        conns = max_conns or self.max_conns or (UDP_MAX_FLOWS if udp else 0)
        idle = idle_timeout or self.idle_timeout or (UDP_IDLE_TIMEOUT if udp else 0.0)
        return conns, idle


def fd_ceiling() -> int:
    """The lowest fd number the data plane may not keep."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(soft - RESERVE, RESERVE)


def is_out_of_fds(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE)


def reserve_error() -> OSError:
    return OSError(errno.EMFILE, f"{OUT_OF_FDS} (the last {RESERVE} are kept for the control channel)")


def out_of_fds_reason(exc: OSError) -> str:
    """What to log for an fd shortage: the reserve's message, or 'out of file descriptors (why)'."""
    return exc.strerror if OUT_OF_FDS in (exc.strerror or "") else f"{OUT_OF_FDS} ({exc.strerror})"


def within_reserve(sock: socket.socket) -> None:
    """Close ``sock`` and raise EMFILE if its fd is one of those kept for the control channel."""
    if sock.fileno() >= fd_ceiling():
        sock.close()
        raise reserve_error()


class DropLog:
    """Counts what a wormhole turned away and logs it at most once per ``interval`` seconds:
    the first drop at once, then how many were dropped since."""

    def __init__(self, log: logging.Logger, what: str, interval: float = 10.0):
        self.log, self.what, self.interval = log, what, interval
        self._count = 0
        self._last: float | None = None

    def dropped(self, why: str) -> None:
        self._count += 1
        now = time.monotonic()
        if self._last is None or now - self._last >= self.interval:
            since = "" if self._last is None else f" in the last {now - self._last:.0f} s"
            self.log.warning("%s: %d dropped%s: %s", self.what, self._count, since, why)
            self._count, self._last = 0, now
