"""Calls to other wormholeds that share our key (DESIGN §5): one TLS-PSK connection per call."""

from __future__ import annotations

import time

from wormhole.addr import Address, AddressError
from wormhole.client import connect
from wormhole.protocol import Failed, Refused, RpcError

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

    async def call(self, host: str, method: str, params: dict | None = None, timeout: float | None = None):
        """The peer's result; any failure is an RpcError whose message names the host."""
        addr = self.address(host)
        try:
            async with connect(addr, self._key, timeout=self.timeout) as client:
                return await client.call(method, params, timeout=timeout or self.timeout)
        except RpcError as e:
            raise RpcError(e.code, str(e) if host in str(e) else f"{host}: {e}") from None

    async def ping(self, host: str) -> float:
        """Milliseconds for one request/answer on an open channel to host's daemon."""
        addr = self.address(host)
        try:
            async with connect(addr, self._key, timeout=self.timeout) as client:
                start = time.perf_counter()
                await client.call("ping", timeout=self.timeout)
                return (time.perf_counter() - start) * 1000
        except RpcError as e:
            raise Failed(str(e) if host in str(e) else f"{host}: {e}") from None
