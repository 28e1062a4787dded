"""The control server: TLS-PSK connections carrying JSON-RPC lines, methods -> daemon objects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable

from wormhole import protocol
from wormhole.keys import server_context
from wormhole.protocol import Failed, Refused, RpcError

from .segments import NOT_YET
from .wormholes import Wormholes

log = logging.getLogger("wormholed")
Method = Callable[[dict], Awaitable[object]]
HANDSHAKE_TIMEOUT = 10.0


def _str(params: dict, name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise RpcError(protocol.INVALID_PARAMS, f"parameter {name!r} must be a non-empty string")
    return value


def methods(wormholes: Wormholes) -> dict[str, Method]:
    async def echo(params):
        return params

    async def ping(params):
        if params.get("host"):
            raise Refused(NOT_YET["remote"].replace("'remote'", "'ping HOST'"))
        return {"pong": True}

    async def create(params):
        words = params.get("words")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise RpcError(protocol.INVALID_PARAMS, "parameter 'words' must be a list of strings")
        return await wormholes.create(words)

    async def delete(params):
        return await wormholes.delete(_str(params, "id"))

    async def list_(params):
        return wormholes.list()

    return {"echo": echo, "ping": ping, "create": create, "delete": delete, "list": list_}


class ControlServer:
    def __init__(self, methods: dict[str, Method], key: bytes):
        self._methods = methods
        self._ctx = server_context(key)
        self._servers: list[asyncio.AbstractServer] = []
        self._conns: set[asyncio.StreamWriter] = set()

    async def serve(self, sock: socket.socket) -> None:
        kw = dict(sock=sock, ssl=self._ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                  limit=protocol.MAX_LINE + 2)
        if sock.family == socket.AF_UNIX:
            server = await asyncio.start_unix_server(self._handle, **kw)
        else:
            server = await asyncio.start_server(self._handle, **kw)
        self._servers.append(server)

    async def aclose(self) -> None:
        for server in self._servers:
            server.close()
        for writer in list(self._conns):
            writer.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        framer = protocol.LineFramer()
        try:
            while data := await reader.read(1 << 16):
                for line in framer.feed(data):
                    writer.write(await self._answer(line))
                await writer.drain()
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        finally:
            self._conns.discard(writer)
            writer.close()

    async def _answer(self, line) -> bytes:
        try:
            req = protocol.parse_request(line)
        except RpcError as e:
            return protocol.error((e.data or {}).get("id"), e)
        method = self._methods.get(req.method)
        if method is None:
            return protocol.error(req.id, RpcError(protocol.METHOD_NOT_FOUND, f"unknown method {req.method!r}"))
        try:
            return protocol.result(req.id, await method(req.params))
        except RpcError as e:
            return protocol.error(req.id, e)
        except Exception as e:  # a bug or an unexpected system failure: the daemon stays up
            log.exception("method %s failed", req.method)
            return protocol.error(req.id, Failed(f"{req.method} failed: {e}"))
