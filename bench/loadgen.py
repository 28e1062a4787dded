#!/usr/bin/env python3
"""The bench's own targets and clients, each run by bench/run.py as a process of its own:

* ``idle-target PORT STATUS``: accepts TCP connections and holds them without a byte
  either way; closes one when its peer does. Writes "accepted A open O" to STATUS.
* ``idle-client PORT N STATUS``: opens N TCP connections to 127.0.0.1:PORT (at most
  CONNECTING at a time, below the proxies' listen backlogs) and holds them until killed.
  Writes "connected C failed F closed X" to STATUS (closed: by the far end since).
* ``echo-server PORT``: sends every byte back on each TCP connection (the handover
  section's target).
* ``udp-echo PORT``: sends every datagram back to where it came from.
* ``udp-client PORT SECONDS WINDOW SIZE``: keeps WINDOW datagrams of SIZE bytes in
  flight to 127.0.0.1:PORT for SECONDS and prints one JSON object: the echoes received,
  the seconds measured, the stalls (no echo for STALL s: the window was lost and sent
  again), and the client's CPU time per second measured (near 1.0: the client was the limit).

Every socket of the idle target, the echo server and the idle client has SO_LINGER 0, so that when the bench stops
them (SIGTERM) their connections end with a reset: no TIME_WAIT socket is left behind to
be freed, 60 s later, in the middle of another row's measurement of kernel memory.
STATUS files are replaced whole (rename), at most every 0.1 s while something changes.
Pure standard library; no output but STATUS, the JSON line and errors.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import struct
import sys
import time

LINGER0 = struct.pack("ii", 1, 0)
CONNECTING = 100  # connects in flight (wormholed listens with a backlog of 128)
STALL = 0.05  # seconds without an echo before the UDP window is sent again
HOST = "127.0.0.1"


class Status:
    """A one-line status file, replaced whole, at most every ``every`` seconds."""

    def __init__(self, path: str, every: float = 0.1):
        self.path, self.every = path, every
        self.text, self.written, self.at = None, None, 0.0

    def set(self, text: str, force: bool = False) -> None:
        self.text = text
        now = time.monotonic()
        if text != self.written and (force or now - self.at >= self.every):
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                f.write(text + "\n")
            os.replace(tmp, self.path)
            self.written, self.at = text, now

    def flush(self) -> None:
        if self.text is not None:
            self.set(self.text, force=True)


def _listener(port: int) -> socket.socket:
    """A non-blocking TCP listener on HOST:port with SO_LINGER 0, which accepted sockets inherit."""
    lst = socket.create_server((HOST, port), backlog=4096)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
    lst.setblocking(False)
    return lst


def _accept_all(lst: socket.socket, ep, conns: dict[int, socket.socket], events: int,
                nodelay: bool = False) -> int:
    """Accept every connection waiting on lst: each made non-blocking (and TCP_NODELAY with
    nodelay), kept in conns by fd and registered on ep for events. How many it accepted. An
    error (EMFILE...) is said on stderr, and the rest wait in the backlog."""
    accepted = 0
    while True:
        try:
            conn, _ = lst.accept()
        except (BlockingIOError, InterruptedError):
            return accepted
        except OSError as exc:
            print(f"loadgen: accept: {exc}", file=sys.stderr, flush=True)
            time.sleep(0.1)
            return accepted
        conn.setblocking(False)
        if nodelay:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns[conn.fileno()] = conn
        ep.register(conn.fileno(), events)
        accepted += 1


def idle_target(port: int, status_path: str) -> None:
    lst = _listener(port)
    ep = select.epoll()
    ep.register(lst.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    accepted = 0
    status = Status(status_path)
    status.set("accepted 0 open 0", force=True)
    while True:
        for fd, _ in ep.poll(0.1):
            if fd == lst.fileno():
                accepted += _accept_all(lst, ep, conns, select.EPOLLIN | select.EPOLLRDHUP)
            else:  # the peer closed (or sent something, which an idle client does not)
                conn = conns.pop(fd)
                ep.unregister(fd)
                conn.close()
        status.set(f"accepted {accepted} open {len(conns)}")
        status.flush()


def echo_server(port: int) -> None:
    """Send every byte back on each connection (epoll, one thread) until killed."""
    lst = _listener(port)
    ep = select.epoll()
    ep.register(lst.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    unsent: dict[int, bytes] = {}
    while True:
        for fd, events in ep.poll():
            if fd == lst.fileno():
                _accept_all(lst, ep, conns, select.EPOLLIN, nodelay=True)
                continue
            conn = conns[fd]
            try:
                data = b""
                if events & ~select.EPOLLOUT:
                    data = conn.recv(1 << 16)
                    if not data:
                        raise EOFError
                data = unsent.pop(fd, b"") + data
                sent = conn.send(data) if data else 0
                if sent < len(data):  # rare: the echo waits for room; reading stops meanwhile
                    unsent[fd] = data[sent:]
                    ep.modify(fd, select.EPOLLOUT)
                elif events & select.EPOLLOUT:
                    ep.modify(fd, select.EPOLLIN)
            except (BlockingIOError, InterruptedError):
                continue
            except (OSError, EOFError):
                ep.unregister(fd)
                conns.pop(fd).close()
                unsent.pop(fd, None)


def idle_client(port: int, n: int, status_path: str) -> None:
    ep = select.epoll()
    connecting: dict[int, socket.socket] = {}
    held: dict[int, socket.socket] = {}
    started = failed = closed = 0
    status = Status(status_path)
    while True:
        while started < n and len(connecting) < CONNECTING:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
            s.setblocking(False)
            err = s.connect_ex((HOST, port))
            started += 1
            if err not in (0, errno.EINPROGRESS):
                failed += 1
                s.close()
                continue
            connecting[s.fileno()] = s
            ep.register(s.fileno(), select.EPOLLOUT)
        for fd, ev in ep.poll(0.1):
            if fd in connecting:
                s = connecting.pop(fd)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    failed += 1
                    ep.unregister(fd)
                    s.close()
                    continue
                held[fd] = s
                ep.modify(fd, select.EPOLLIN | select.EPOLLRDHUP)
            elif fd in held:  # closed (or reset) by the proxy or the target
                closed += 1
                ep.unregister(fd)
                held.pop(fd).close()
        status.set(f"connected {len(held) + closed} failed {failed} closed {closed}")
        if started >= n and not connecting:
            status.flush()


def udp_echo(port: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.bind((HOST, port))
    recvfrom, sendto = s.recvfrom, s.sendto
    while True:
        data, addr = recvfrom(65535)
        try:
            sendto(data, addr)
        except OSError:  # the client's buffer is full: dropped, as UDP may
            pass


def udp_client(port: int, seconds: float, window: int, size: int) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.connect((HOST, port))
    payload = b"x" * size
    send, recv = s.send, s.recv
    # Warm-up: until one echo comes back (a proxy opens its flow on the first datagram).
    s.settimeout(0.2)
    deadline = time.monotonic() + 5
    while True:
        try:
            send(payload)
            recv(65535)
            break
        except (TimeoutError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                return {"error": "no echo within 5 s"}
    while True:  # drain stray echoes of the warm-up
        try:
            s.settimeout(0.05)
            recv(65535)
        except (TimeoutError, ConnectionRefusedError):
            break
    s.settimeout(STALL)
    received = stalls = refused = 0
    for _ in range(window):
        send(payload)
    start, cpu0 = time.monotonic(), time.process_time()
    end = start + seconds
    while time.monotonic() < end:
        try:
            recv(65535)
            received += 1
            send(payload)
        except TimeoutError:
            stalls += 1
            for _ in range(window):
                send(payload)
        except ConnectionRefusedError:
            refused += 1
            send(payload)
    elapsed = time.monotonic() - start
    return {"received": received, "seconds": elapsed, "stalls": stalls, "refused": refused,
            "window": window, "size": size, "client_cpu": (time.process_time() - cpu0) / elapsed}


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # the kernel closes (resets) every socket
    cmd, args = argv[0], argv[1:]
    if cmd == "idle-target":
        idle_target(int(args[0]), args[1])
    elif cmd == "idle-client":
        idle_client(int(args[0]), int(args[1]), args[2])
    elif cmd == "echo-server":
        echo_server(int(args[0]))
    elif cmd == "udp-echo":
        udp_echo(int(args[0]))
    elif cmd == "udp-client":
        print(json.dumps(udp_client(int(args[0]), float(args[1]), int(args[2]), int(args[3]))))
    else:
        print(f"loadgen: unknown command {cmd!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
