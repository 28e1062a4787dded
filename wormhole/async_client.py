"""`async with connect(addr, key) as c: await c.call(method, params)`: the control channel's
client side on asyncio, what a daemon uses to call another (wormholed/peers.py).

Apart from client.py (the CLI's blocking `call_once`) so that the CLI never imports asyncio.
Both give the same errors: RpcError, the daemon's, or Failed when the channel cannot be
opened or breaks."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from . import protocol
from .addr import Address
from .client import CONNECT_TIMEOUT, failure_reason, lost_reason
from .keys import client_context
from .protocol import Failed, RpcError


class Client:
    def __init__(self, addr: Address, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.addr = addr
        self._reader, self._writer = reader, writer
        self._framer = protocol.LineFramer()
        self._lines: list = []
        self._next_id = 0

    async def call(self, method: str, params: dict | None = None, timeout: float | None = None):
        """The method's result; raises RpcError (the daemon's, or Failed when the channel breaks)."""
        self._next_id += 1
        id_ = self._next_id
        try:
            self._writer.write(protocol.request(id_, method, params))
            await self._writer.drain()
            return protocol.parse_response(await asyncio.wait_for(self._line(), timeout), id_)
        except TimeoutError:
            raise Failed(f"wormholed at {self.addr} did not answer {method!r} in time"
                         + (f" ({timeout:g} s)" if timeout is not None else "")) from None
        except (OSError, EOFError, ssl.SSLError) as e:
            raise Failed(f"lost the connection to wormholed at {self.addr}: {lost_reason(e)}") from None

    @property
    def sockname(self):
        """Our end of the channel: (ip, port, ...) on TCP."""
        return self._writer.get_extra_info("sockname")

    @property
    def peername(self):
        return self._writer.get_extra_info("peername")

    async def _line(self):
        while not self._lines:
            data = await self._reader.read(1 << 16)
            if not data:
                raise EOFError("the daemon closed the connection")
            self._lines.extend(self._framer.feed(data))
        return self._lines.pop(0)

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self._writer.wait_closed()


async def open_client(addr: Address, key: bytes, *, timeout: float = CONNECT_TIMEOUT,
                      identity: str | None = None) -> Client:
    ctx = client_context(key, identity)
    try:
        async with asyncio.timeout(timeout):
            if addr.kind == "unix":
                reader, writer = await asyncio.open_unix_connection(addr.path, ssl=ctx, server_hostname="")
            else:
                reader, writer = await asyncio.open_connection(addr.host or "127.0.0.1", addr.port,
                                                               ssl=ctx, server_hostname="")
    except TimeoutError:
        raise Failed(f"cannot reach wormholed at {addr}: no answer within {timeout:g} s") from None
    except (OSError, ssl.SSLError, EOFError) as e:
        raise Failed(f"cannot reach wormholed at {addr}: {failure_reason(e)}") from None
    return Client(addr, reader, writer)


@contextlib.asynccontextmanager
async def connect(addr: Address, key: bytes, **kw):
    client = await open_client(addr, key, **kw)
    try:
        yield client
    finally:
        await client.aclose()


__all__ = ["Client", "connect", "open_client", "RpcError"]
