"""systemd socket activation (LISTEN_FDS) and readiness notification (NOTIFY_SOCKET)."""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


def listen_sockets() -> list[socket.socket]:
    """The sockets systemd passed us, if they are for this process; the variables are then unset."""
    try:
        if int(os.environ.get("LISTEN_PID", "0")) != os.getpid():
            return []
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    finally:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


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
