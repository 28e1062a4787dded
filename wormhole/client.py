"""`async with connect(addr, key) as c: await c.call(method, params)` — the control channel's client side."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

from . import protocol
from .addr import Address, literal_family
from .keys import client_context
from .protocol import Failed, RpcError

CONNECT_TIMEOUT = 5.0


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
            raise Failed(f"lost the connection to wormholed at {self.addr}: {_reason(e)}") from None

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


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return "it presented a certificate, so it is not a wormholed holding our key (refused)"
    if isinstance(e, (ssl.SSLError, ConnectionResetError, EOFError)):
        return f"TLS-PSK handshake failed; is the key the same on both sides? ({e.__class__.__name__})"
    return e.strerror or str(e) if isinstance(e, OSError) else str(e)


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
        raise Failed(f"cannot reach wormholed at {addr}: {_reason(e)}") from None
    return Client(addr, reader, writer)


def _blocking_socket(addr: Address, timeout: float) -> socket.socket:
    if addr.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(addr.path)
        except BaseException:
            sock.close()
            raise
        return sock
    host = addr.host or "127.0.0.1"
    family = literal_family(host)
    if not family:  # a name: resolved (create_connection tries each address)
        sock = socket.create_connection((host, addr.port), timeout=timeout)
    else:  # no getaddrinfo: its first call in a process costs ~2 ms (NSS set-up), more than the round trip
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((host, addr.port))
        except BaseException:
            sock.close()
            raise
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def call_once(addr: Address, key: bytes, method: str, params: dict | None = None, *,
              timeout: float = CONNECT_TIMEOUT, identity: str | None = None, ctx: ssl.SSLContext | None = None):
    """One call on a fresh connection, with blocking sockets: what the CLI makes. No event loop
    to build, and ssl's own socket I/O: a call costs the connection, the handshake and one
    round trip. ctx: a client_context(key, identity) made beforehand. Errors as open_client's
    and Client.call's."""
    ctx = ctx or client_context(key, identity)
    try:
        raw = _blocking_socket(addr, timeout)
        try:
            sock = ctx.wrap_socket(raw, server_hostname=None)  # the handshake, within the timeout
        except BaseException:
            raw.close()
            raise
    except TimeoutError:
        raise Failed(f"cannot reach wormholed at {addr}: no answer within {timeout:g} s") from None
    except (OSError, ssl.SSLError, EOFError) as e:
        raise Failed(f"cannot reach wormholed at {addr}: {_reason(e)}") from None
    with sock:
        sock.settimeout(None)  # a create may take long (a trigger starting a container)
        try:
            sock.sendall(protocol.request(1, method, params))
            framer = protocol.LineFramer()
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    raise EOFError("the daemon closed the connection")
                lines = framer.feed(data)
                if lines:
                    return protocol.parse_response(lines[0], 1)
        except (OSError, EOFError, ssl.SSLError) as e:
            raise Failed(f"lost the connection to wormholed at {addr}: {_reason(e)}") from None


@contextlib.asynccontextmanager
async def connect(addr: Address, key: bytes, **kw):
    client = await open_client(addr, key, **kw)
    try:
        yield client
    finally:
        await client.aclose()


__all__ = ["Client", "call_once", "connect", "open_client", "RpcError"]
