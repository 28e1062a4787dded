"""Moving a handover (its record and its fds) between two processes, two ways.

- Over a unix SOCK_SEQPACKET socket (`wormholed --takeover`): the first message carries a
  small JSON header and, attached, a memfd holding the record; then the fds go in
  messages of at most MAX_FDS (the kernel's SCM_MAX_FD is 253), in table order. A
  seqpacket socket keeps message boundaries, so each message's fds are its own.
- Through systemd's file-descriptor store (a restart under systemd): each fd is one
  datagram to $NOTIFY_SOCKET, `FDSTORE=1` and `FDNAME=<its name>`, the record's memfd
  named STATE_NAME; they come back at the next start as LISTEN_FDS/LISTEN_FDNAMES, in
  another order, and are matched by name. systemd keeps its own duplicate of each, so the
  successor removes them from the store (`FDSTOREREMOVE=1`) once it has them: a connection
  that ends later must not be held open by the store.
"""

from __future__ import annotations

import json
import os
import resource
import socket

from .record import FD_PREFIX, STATE_NAME, HandoverError, fd_index, fd_name

MAX_FDS = 253
SPARE_FDS = 16  # what a handover leaves free beyond the fds it moves


def memfd_with(data: bytes) -> int:
    """A memfd holding `data`, its offset at 0."""
    fd = os.memfd_create("wormhole-handover", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_fd(fd: int) -> bytes:
    """All of a (mem)fd's bytes from the start."""
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def send(sock: socket.socket, record: bytes, fds: list[int]) -> None:
    """The record and the fds over a connected SOCK_SEQPACKET socket (blocking)."""
    state = memfd_with(record)
    try:
        header = json.dumps({"record": len(record), "fds": len(fds)}).encode()
        socket.send_fds(sock, [header], [state])
    finally:
        os.close(state)
    for i in range(0, len(fds), MAX_FDS):
        socket.send_fds(sock, [b"F"], fds[i:i + MAX_FDS])


def free_fds() -> int:
    """How many more fds this process may open: RLIMIT_NOFILE's soft limit less those open."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0] - len(os.listdir("/proc/self/fd"))


def room_for(count: int, who: str) -> None:
    """HandoverError unless this process can open `count` more fds (and a few to spare)."""
    if count + SPARE_FDS > (free := free_fds()):
        raise HandoverError(f"{who} needs {count} more file descriptors and has room for {free} "
                            f"(RLIMIT_NOFILE; LimitNOFILE= in the unit): raise the limit")


def receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """What send() sent: (record, fds in table order). The fds are the caller's to close.
    HandoverError if the other side sent {"refused": WHY} instead."""
    got: list[int] = []
    try:
        data, fds, _, _ = socket.recv_fds(sock, 4096, 1)
        got.extend(fds)
        if not data:
            raise EOFError("the daemon closed the handover before sending it")
        header = json.loads(data)
        if isinstance(header, dict) and "refused" in header:
            raise HandoverError(str(header["refused"]))
        if len(fds) != 1:
            raise EOFError("the handover's record did not come")
        record = read_fd(fds[0])
        os.close(got.pop())
        if len(record) != header["record"]:
            raise EOFError("the handover's record came short")
        room_for(header["fds"], "taking the handover")
        while len(got) < header["fds"]:
            data, fds, flags, _ = socket.recv_fds(sock, 16, MAX_FDS)
            got.extend(fds)
            if flags & socket.MSG_CTRUNC:  # the kernel closed the fds that did not fit
                raise HandoverError("the handover's fds did not fit in this process (RLIMIT_NOFILE)")
            if not data:
                raise EOFError(f"the handover ended after {len(got)} of {header['fds']} fds")
        return record, got
    except BaseException:
        for fd in got:
            os.close(fd)
        raise


# --- systemd's fd store ---------------------------------------------------------------------

def _notify(path: str, message: str, fds: list[int] = ()) -> None:
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(path)
        if fds:
            socket.send_fds(s, [message.encode()], fds)
        else:
            s.sendall(message.encode())


def store(notify_socket: str, record: bytes, fds: list[int]) -> None:
    """Put the record (a memfd named STATE_NAME) and each fd (named by its index) in the
    store. OSError if the service manager is not there."""
    state = memfd_with(record)
    try:
        for i, fd in enumerate(fds):
            _notify(notify_socket, f"FDSTORE=1\nFDNAME={fd_name(i)}", [fd])
        _notify(notify_socket, f"FDSTORE=1\nFDNAME={STATE_NAME}", [state])  # last: the store is whole
    finally:
        os.close(state)


def unstore(notify_socket: str, names: list[str]) -> None:
    """Take fds out of the store (the successor has its own copies)."""
    for name in names:
        _notify(notify_socket, f"FDSTOREREMOVE=1\nFDNAME={name}")


def from_store(named: list[tuple[int, str]]) -> tuple[bytes | None, list[int] | None, list[int]]:
    """Sort the fds systemd passed: (record, its fds in table order, the others: the .socket
    unit's). The record is None when the store held no handover; its fds None if some are
    missing (ours are then closed: a handover is whole or not at all)."""
    ours: dict[int, int] = {}
    state_fd = None
    others = []
    for fd, name in named:
        if name == STATE_NAME:
            state_fd = fd
        elif name.startswith(FD_PREFIX) and fd_index(name) is not None:
            ours[fd_index(name)] = fd
        else:
            others.append(fd)
    if state_fd is not None:
        record = read_fd(state_fd)
        os.close(state_fd)
        if sorted(ours) == list(range(len(ours))):
            return record, [ours[i] for i in range(len(ours))], others
    for fd in ours.values():
        os.close(fd)
    return (record if state_fd is not None else None), None, others
