"""What wormholed does for systemd: socket activation (LISTEN_FDS), readiness and the
watchdog (NOTIFY_SOCKET), and logs fit for the journal (JOURNAL_STREAM).

The protocols are small and stable (sd_listen_fds(3), sd_notify(3), sd-daemon(3)), so
they are spoken here directly rather than through libsystemd bindings: one dependency
fewer, and the daemon runs the same with or without systemd.

Why the watchdog pings come from the event loop: a `loop.call_later` timer runs only
when the loop runs, so a loop that is stuck (a blocking call, a busy coroutine) stops
pinging and systemd restarts the daemon; a pinging thread would keep a dead daemon
looking alive. At a watchdog timeout systemd sends SIGABRT: faulthandler then writes
every thread's stack to stderr (the journal), which shows where the loop was stuck.

Why the journal format: under systemd, stderr is a stream to journald, which stamps
each line with the time and the unit, and reads a leading `<N>` as the line's syslog
priority. So there the lines carry `<N>` and no name or level of their own; elsewhere
they keep `wormholed: LEVEL message`."""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import socket
import sys

SD_LISTEN_FDS_START = 3

# logging levels -> syslog priorities (sd-daemon(3): SD_CRIT, SD_ERR, SD_WARNING, SD_INFO, SD_DEBUG)
PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
DEBUG_PRIORITY = 7
PLAIN_FORMAT = "wormholed: %(levelname)s %(message)s"


def listen_fds() -> list[tuple[int, str]]:
    """The fds systemd passed us, with their names (LISTEN_FDNAMES; "unknown" where it gave
    none), if they are for this process; the variables are then unset. Sockets from the
    .socket unit and fds from the fd store (a handover) come mixed, in no promised order."""
    try:
        if int(os.environ.get("LISTEN_PID", "0")) != os.getpid():
            return []
        count = int(os.environ.get("LISTEN_FDS", "0"))
        names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    except ValueError:
        return []
    finally:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    fds = []
    for i, fd in enumerate(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)):
        os.set_inheritable(fd, False)
        fds.append((fd, names[i] if i < len(names) and names[i] else "unknown"))
    return fds


def listen_sockets() -> list[socket.socket]:
    """listen_fds() as sockets (all of them: for a caller that takes no handover)."""
    return [socket.socket(fileno=fd) for fd, _ in listen_fds()]


def notify(state: str) -> bool:
    """Send e.g. 'READY=1' to the service manager; False when there is none or it is gone
    (a notification is never worth failing the daemon for)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(state.encode())
    except OSError:
        return False
    return True


def watchdog_interval(environ=os.environ, pid: int | None = None) -> float | None:
    """Seconds between two pings the manager wants (half its WATCHDOG_USEC), or None when
    it wants none or asked another process (WATCHDOG_PID), like sd_watchdog_enabled(3)."""
    pid = os.getpid() if pid is None else pid
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
        owner = int(environ.get("WATCHDOG_PID") or pid)
    except ValueError:
        return None
    if usec <= 0 or owner != pid:
        return None
    return usec / 2e6


class Watchdog:
    """Sends WATCHDOG=1 every `interval` seconds from the running event loop's own timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float):
        self.loop = loop
        self.interval = interval
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> Watchdog:
        self._handle = self.loop.call_later(self.interval, self._ping)
        return self

    def _ping(self) -> None:
        notify("WATCHDOG=1")
        self._handle = self.loop.call_later(self.interval, self._ping)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def start_watchdog() -> Watchdog | None:
    """If systemd watches this process, ping it from the running loop; a watchdog kill
    (SIGABRT) then dumps every thread's stack to stderr (faulthandler)."""
    interval = watchdog_interval()
    if interval is None:
        return None
    faulthandler.enable()
    logging.getLogger("wormholed").info("watchdog: WATCHDOG=1 every %.3g s", interval)
    return Watchdog(asyncio.get_running_loop(), interval).start()


def journal_stream(environ, stream) -> bool:
    """Whether `stream` is the journal stream systemd gave us: JOURNAL_STREAM is the
    "DEVICE:INODE" of that stream (systemd.exec(5)). A process that only inherited the
    variable (started from a shell in a service, or with stderr redirected) writes
    elsewhere and keeps the plain format."""
    try:
        dev, ino = (int(x) for x in environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def priority(levelno: int) -> int:
    """The syslog priority of a logging level."""
    for level, prio in PRIORITIES:
        if levelno >= level:
            return prio
    return DEBUG_PRIORITY


class JournalFormatter(logging.Formatter):
    """`<N>message`, every line of it (a traceback's too), for journald to read N from."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def log_handler(stream=None, environ=os.environ) -> logging.Handler:
    """A handler writing to `stream` (stderr): journal format when it is systemd's
    journal stream, else `wormholed: LEVEL message`."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    journal = journal_stream(environ, stream)
    handler.setFormatter(JournalFormatter("%(message)s") if journal else logging.Formatter(PLAIN_FORMAT))
    return handler


def setup_logging(verbose: bool = False) -> None:
    """The root logger to stderr (see log_handler); debug messages with `verbose`."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[log_handler()])
