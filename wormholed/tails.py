"""A wormhole's tail side once it is built: where its connections go.

One tail is dialled as it always was. Several (`add-tail`) share the
connections through a balance.Balancer: a connection tries the tails in the
order it gives, each once and without the usual 5 s of retries, so a tail
that refuses or does not answer within CONNECT_TIMEOUT costs that client
one failed dial, not its connection; that tail is marked down, skipped, and
probed in the background with backoff until it answers again. Only when
every tail refuses does a connection wait and try them all again, for up to
5 s, as a single tail's does (services still starting after a trigger).

UDP tails share flows the same way (a flow goes to the first tail in the
order); a connected UDP socket cannot tell whether anyone listens, so UDP
tails are never marked down.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket

from .balance import Balancer
from .links import Target
from .proxy.tcp import FinishConnect, dial
from .proxy.udp import dial_udp
from .unixsock import dial_unix

log = logging.getLogger("wormholed")

CONNECT_TIMEOUT = 2.0  # a tail among several: how long a dial may take before the next is tried
RETRY_FOR = 5.0  # every tail refused: how long a connection keeps trying them
_NOT_YET = (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN)


@contextlib.asynccontextmanager
async def _namespace(t: Target):
    """The namespace to dial t in, for the time of one dial (a k8s-ns tail's pod looked up again,
    its namespace kept open until the dial ends)."""
    if t.resolve is None:
        yield t.ns
    else:
        async with t.resolve() as ns:
            yield ns


async def dial_target(t: Target, *, timeout: float = 5.0, wait: FinishConnect | None = None,
                      retry: bool = True) -> socket.socket:
    """A connected stream socket to a tail: tcp or unix."""
    async with _namespace(t) as ns:
        if t.path is not None:
            return await dial_unix(ns, t.path, timeout=timeout if retry else 0.0)
        return await dial(ns, t.host, t.port, timeout=timeout, wait=wait, retry=retry)


class Tails:
    def __init__(self, targets: list[Target], policy: str, name: str):
        self.targets = targets
        self.name = name  # "wormhole ID", for the log
        self.balancer = Balancer(len(targets), policy) if len(targets) > 1 else None
        self._open: dict[int, int] = {}  # id(tail socket) -> its tail's index
        self._prober: asyncio.Task | None = None

    async def connect(self, wait: FinishConnect | None = None) -> socket.socket:
        """A connected stream socket to the tail (or one of the tails)."""
        if self.balancer is None:
            return await dial_target(self.targets[0], wait=wait)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETRY_FOR
        while True:
            last: OSError | None = None
            for i in self.balancer.order(loop.time()):
                try:
                    sock = await dial_target(self.targets[i], timeout=CONNECT_TIMEOUT, wait=wait, retry=False)
                except OSError as exc:
                    self._down(i, exc)
                    last = exc
                    continue
                self._up(i)
                self.balancer.opened(i)
                self._open[id(sock)] = i
                return sock
            if last.errno not in _NOT_YET or loop.time() + 0.05 >= deadline:
                raise OSError(last.errno, f"no tail answered; the last: {last.strerror}")
            await asyncio.sleep(0.05)

    async def open_flow(self) -> socket.socket:
        """A UDP socket connected to the tail (or the next of the tails) for a new flow."""
        i = 0 if self.balancer is None else self.balancer.order(asyncio.get_running_loop().time())[0]
        t = self.targets[i]
        async with _namespace(t) as ns:
            sock = await dial_udp(ns, t.host, t.port)
        if self.balancer is not None:
            self.balancer.opened(i)
            self._open[id(sock)] = i
        return sock

    def index_of(self, sock: socket.socket) -> int:
        """Which tail a socket connect()/open_flow() gave goes to (0 with one tail)."""
        return self._open.get(id(sock), 0)

    def adopted(self, sock: socket.socket, i: int) -> None:
        """A predecessor's connection to tail i (a handover): counted as one of its own."""
        if self.balancer is not None and 0 <= i < len(self.targets):
            self.balancer.opened(i)
            self._open[id(sock)] = i

    def closed(self, sock: socket.socket) -> None:
        """A socket connect()/open_flow() gave is about to close."""
        i = self._open.pop(id(sock), None)
        if i is not None:
            self.balancer.closed(i)

    def _down(self, i: int, exc: OSError) -> None:
        loop = asyncio.get_running_loop()
        if self.balancer.failed(i, loop.time()):
            log.warning("%s: tail %s is down (%s); skipped, and probed again", self.name,
                        self.targets[i].label, exc.strerror or exc)
        if self._prober is None or self._prober.done():
            self._prober = loop.create_task(self._probe())

    def _up(self, i: int) -> None:
        if self.balancer.succeeded(i):
            log.info("%s: tail %s is up again", self.name, self.targets[i].label)

    async def _probe(self) -> None:
        """Dial the tails that are down when their backoff ends, until all are up."""
        loop = asyncio.get_running_loop()
        while (when := self.balancer.next_probe()) is not None:
            await asyncio.sleep(max(0.0, when - loop.time()))
            for i in self.balancer.due(loop.time()):
                try:
                    sock = await dial_target(self.targets[i], timeout=CONNECT_TIMEOUT, retry=False)
                except OSError as exc:
                    self.balancer.failed(i, loop.time())
                    log.debug("%s: tail %s still down: %s", self.name, self.targets[i].label, exc)
                else:
                    sock.close()
                    self._up(i)

    def describe(self, proto: str) -> list[dict]:
        """Each tail's url, and with several its state and counts (for `list`)."""
        if self.balancer is None:
            return [{"url": self.targets[0].url(proto)}]
        return [{"url": t.url(proto), **s.describe()} for t, s in zip(self.targets, self.balancer.tails)]

    def stop(self) -> None:
        """Stop probing (the segment let go without teardown)."""
        if self._prober is not None:
            self._prober.cancel()

    async def aclose(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
