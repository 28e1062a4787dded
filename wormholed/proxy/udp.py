"""The UDP relay: one flow per client address, each with its own tail socket.

The first datagram from a new client address opens a flow (``open_flow()``:
a socket connected to the tail); datagrams that arrive while it opens wait in
a short queue. Replies from the tail go back to that client from the head
socket. A flow with no traffic either way for ``idle_timeout`` seconds is
closed. Datagrams that cannot be sent at once are dropped, as UDP may.

At most ``max_flows`` flows live at once: datagrams that would open another
are dropped, counted (``stats.refused``) and logged (at most every 10 s). A
flow socket is never taken from the fds kept for the control channel
(limits.within_reserve); running out is logged as "out of file descriptors".
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from typing import Awaitable, Callable

from wormholed.limits import (UDP_IDLE_TIMEOUT, UDP_MAX_FLOWS, DropLog, is_out_of_fds, out_of_fds_reason,
                              within_reserve)
from wormholed.netns import Netns, hostport, make_socket
from wormholed.proxy.tcp import Stats, resolve

__all__ = ["OpenFlow", "UdpProxy", "dial_udp"]

_log = logging.getLogger("wormholed.proxy.udp")

OpenFlow = Callable[[], Awaitable[socket.socket]]

MAX_DATAGRAM = 65535
QUEUE_MAX = 64  # datagrams held per flow while its tail socket opens
_BATCH = 64  # datagrams read per wake-up before letting others run
_RETRY_AFTER = 1.0  # a flow whose tail failed drops datagrams this long, then retries


class _Flow:
    __slots__ = ("proxy", "addr", "sock", "queue", "last", "timer", "task", "failed")

    def __init__(self, proxy: UdpProxy, addr) -> None:
        self.proxy = proxy
        self.addr = addr
        self.sock: socket.socket | None = None
        self.queue: collections.deque[bytes] | None = collections.deque()
        self.last = proxy._loop.time()
        self.timer = proxy._loop.call_at(self.last + proxy.idle_timeout, self._check_idle)
        self.task: asyncio.Task | None = None
        self.failed = False

    async def open(self) -> None:
        proxy = self.proxy
        try:
            sock = await proxy._open_flow()
            within_reserve(sock)
        except Exception as exc:
            if is_out_of_fds(exc):
                proxy.stats.refused += 1
                proxy._drops.dropped(f"new flows refused: {out_of_fds_reason(exc)}")
            else:
                proxy.log.warning("UDP flow from %s dropped, tail unreachable: %s", self.addr, exc)
            self.failed = True
            self.queue = None
            self.timer.cancel()
            self.timer = proxy._loop.call_later(_RETRY_AFTER, self.close)
            return
        finally:
            self.task = None
        if self.proxy is None:  # closed meanwhile
            if proxy._closed_cb is not None:
                proxy._closed_cb(sock)
            sock.close()
            return
        self.sock = sock
        proxy._loop.add_reader(sock.fileno(), self._on_tail)
        queue, self.queue = self.queue, None
        for data in queue:
            self.send(data)

    def send(self, data: bytes) -> None:
        """Client -> tail."""
        if self.sock is None:
            if self.queue is not None and len(self.queue) < QUEUE_MAX:
                self.queue.append(data)
            return
        try:
            self.sock.send(data)
        except (BlockingIOError, ConnectionRefusedError):
            return  # full, or an ICMP port-unreachable from an earlier datagram
        except OSError as exc:
            self.proxy.log.debug("UDP to tail for %s: %s", self.addr, exc)
            return
        self.proxy.stats.bytes_in += len(data)

    def _on_tail(self) -> None:
        """Tail -> client, from the head socket."""
        proxy = self.proxy
        head = proxy._sock
        for _ in range(_BATCH):
            try:
                data = self.sock.recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except ConnectionRefusedError:  # the tail port is closed (ICMP); keep the flow
                continue
            except OSError as exc:
                proxy.log.warning("UDP flow from %s closed: %s", self.addr, exc)
                return self.close()
            self.last = proxy._loop.time()
            try:
                head.sendto(data, self.addr)
            except OSError as exc:  # full, or the client is unreachable
                proxy.log.debug("UDP to client %s: %s", self.addr, exc)
                continue
            proxy.stats.bytes_out += len(data)

    def _check_idle(self) -> None:
        loop = self.proxy._loop
        due = self.last + self.proxy.idle_timeout
        if loop.time() >= due:
            self.close()
        else:
            self.timer = loop.call_at(due, self._check_idle)

    def close(self) -> None:
        proxy = self.proxy
        if proxy is None:
            return
        self.proxy = None
        self.timer.cancel()
        if self.task is not None:
            self.task.cancel()
        if self.sock is not None:
            proxy._loop.remove_reader(self.sock.fileno())
            if proxy._closed_cb is not None:
                proxy._closed_cb(self.sock)
            self.sock.close()
        del proxy._flows[self.addr]
        proxy.stats.connections -= 1


class UdpProxy:
    """Relays datagrams arriving on a bound UDP socket to per-client tail sockets."""

    def __init__(self, sock: socket.socket, open_flow: OpenFlow, *, idle_timeout: float = UDP_IDLE_TIMEOUT,
                 max_flows: int = UDP_MAX_FLOWS, stats: Stats | None = None, log: logging.Logger = _log,
                 name: str = "UDP relay", closed: Callable[[socket.socket], None] | None = None) -> None:
        """``closed``: told of each flow socket ``open_flow()`` gave, before it is closed."""
        self._sock = sock
        self._open_flow = open_flow
        self._closed_cb = closed
        self.idle_timeout = idle_timeout
        self.max_flows = max_flows
        self._drops = DropLog(log, f"{name}: UDP datagrams")
        self.stats = stats if stats is not None else Stats()
        self.log = log
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flows: dict[object, _Flow] = {}
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    def start(self) -> None:
        """Begin relaying; call from the event loop thread."""
        if self._closed or self._loop is not None:
            raise RuntimeError("UdpProxy already started or closed")
        self._loop = asyncio.get_running_loop()
        self._sock.setblocking(False)
        self._loop.add_reader(self._sock.fileno(), self._on_head)

    def _on_head(self) -> None:
        recvfrom = self._sock.recvfrom
        flows = self._flows
        for _ in range(_BATCH):
            try:
                data, addr = recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as exc:  # e.g. an ICMP error queued on the head socket
                self.log.debug("UDP head: %s", exc)
                continue
            flow = flows.get(addr)
            if flow is None:
                if len(flows) >= self.max_flows:
                    self.stats.refused += 1
                    self._drops.dropped(f"new flows refused, {self.max_flows} (max-conns) are open")
                    continue
                flow = flows[addr] = _Flow(self, addr)
                self.stats.total += 1
                self.stats.connections += 1
                task = flow.task = self._loop.create_task(flow.open())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif flow.failed:
                continue
            else:
                flow.last = self._loop.time()
            flow.send(data)

    async def export(self) -> list[tuple[object, socket.socket]]:
        """Hand the flows over (a successor process takes them): stop relaying and give up
        each flow's (client address, tail socket), untouched. Flows still opening are
        dropped (their client's next datagram opens one again). The proxy is closed."""
        if self._closed:
            raise RuntimeError("UdpProxy closed")
        self._closed = True
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        flows = []
        for flow in list(self._flows.values()):
            if flow.sock is not None:
                self._loop.remove_reader(flow.sock.fileno())
                flows.append((flow.addr, flow.sock))
                flow.sock = None
            flow.proxy = None
            flow.timer.cancel()
            if flow.task is not None:
                flow.task.cancel()
        self._flows.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.stats.connections = 0
        return flows

    def adopt(self, addr, sock: socket.socket) -> None:
        """A flow a predecessor exported: its client's datagrams go on to the same tail socket."""
        sock.setblocking(False)
        flow = self._flows[addr] = _Flow(self, addr)
        self.stats.connections += 1
        flow.queue = None
        flow.sock = sock
        self._loop.add_reader(sock.fileno(), flow._on_tail)

    async def aclose(self) -> None:
        """Stop relaying, close the head socket and every flow."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for flow in list(self._flows.values()):
            flow.close()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> UdpProxy:
        self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


async def dial_udp(ns: Netns | None, host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket made in ``ns`` and connected to host:port."""
    family, addr = await resolve(host, port, socket.SOCK_DGRAM)
    sock = await make_socket(ns, family, socket.SOCK_DGRAM)
    try:
        sock.connect(addr)  # no packets: the route is looked up in the socket's namespace
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot reach {hostport(host, port)}: {exc.strerror}") from None
    return sock
