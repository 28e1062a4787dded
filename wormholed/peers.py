"""Calls to other wormholeds that share our key: one TLS-PSK connection per call.

Whatever goes wrong (unreachable, wrong key, the peer refused) comes back as one
of the daemon's own errors whose message names the peer."""

from __future__ import annotations

import contextlib
import time

from wormhole.addr import Address, AddressError
from wormhole.async_client import connect
from wormhole.protocol import RpcError

from .errors import Failed, Refused, from_rpc

PEER_TIMEOUT = 5.0  # connect, and each answer: an unreachable peer fails within a few seconds


class Peers:
    def __init__(self, key: bytes, timeout: float = PEER_TIMEOUT):
        self._key = key
        self.timeout = timeout

    @staticmethod
    def address(host: str) -> Address:
        try:
            return Address.parse(host)
        except AddressError as e:
            raise Refused(str(e)) from None

    @contextlib.asynccontextmanager
    async def session(self, host: str):
        """An open channel to host's daemon: `await s.call(method, params)`; errors name host.
        `s.local_ip` is our address on it, the one that faces host."""
        addr = self.address(host)
        try:
            async with connect(addr, self._key, timeout=self.timeout) as client:
                yield _Session(client, host, self.timeout)
        except RpcError as e:
            raise from_rpc(e, host) from None

    async def call(self, host: str, method: str, params: dict | None = None, timeout: float | None = None):
        """The peer's result."""
        async with self.session(host) as s:
            return await s.call(method, params, timeout)

    async def ping(self, host: str) -> float:
        """Milliseconds for one request/answer on an open channel to host's daemon."""
        async with self.session(host) as s:
            start = time.perf_counter()
            await s.call("ping")
            return (time.perf_counter() - start) * 1000


class _Session:
    def __init__(self, client, host: str, timeout: float):
        self._client, self.host, self._timeout = client, host, timeout
        sockname = client.sockname
        self.local_ip = sockname[0] if isinstance(sockname, tuple) else None
        self.remote_ip = client.peername[0] if isinstance(client.peername, tuple) else None

    async def call(self, method: str, params: dict | None = None, timeout: float | None = None):
        try:
            return await self._client.call(method, params, timeout=timeout or self._timeout)
        except RpcError as e:
            raise from_rpc(e, self.host) from None


__all__ = ["Peers", "Failed", "Refused"]
